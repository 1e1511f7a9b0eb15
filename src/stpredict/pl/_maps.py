"""Dense per-gene maps over the H&E image, from the pyramid level that fits the view."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import is_calibrated, scale_levels, to_um_affine
from stpredict._keys import Attrs, Keys
from stpredict._meta import get_element_meta

from ._utils import color_limits, extent, finish, frame_matrix, new_figure, raster_view, resolve_show, style_spatial

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["gene_map"]


def _dense_map_keys(sdata: SpatialData, image_key: str | None = None) -> list[str]:
    """Images that are dense maps: a declared value kind (``attrs["stpredict"]``) or floating-point values."""
    keys = []
    for key, element in sdata.images.items():
        if key == image_key:
            continue
        meta = get_element_meta(sdata, key, element)
        data = scale_levels(element)[0]
        if Attrs.value_kind in meta or np.issubdtype(data.dtype, np.floating):
            keys.append(key)
    return sorted(keys)


def _resolve_map_key(sdata: SpatialData, map_key: str | None, image_key: str | None) -> str:
    if map_key is not None:
        if map_key not in sdata.images:
            msg = f"No dense map {map_key!r} in sdata.images; available images: {sorted(sdata.images)}."
            raise KeyError(msg)
        return map_key
    candidates = _dense_map_keys(sdata, image_key)
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        msg = (
            f"sdata holds no dense map (images: {sorted(sdata.images)}); predict one with "
            "`st.tl.predict_dense(sdata, model)`, or name it with `map_key=`."
        )
        raise InputError(msg)
    msg = f"sdata holds several dense maps {candidates}; choose one with `map_key=`, e.g. map_key={candidates[0]!r}."
    raise InputError(msg)


def _check_roi(roi_um: Any) -> tuple[float, float, float, float]:
    roi = tuple(float(v) for v in roi_um)
    if len(roi) != 4 or not all(np.isfinite(roi)) or roi[2] <= roi[0] or roi[3] <= roi[1]:
        msg = f"roi_um must be (x0, y0, x1, y1) in µm with x1 > x0 and y1 > y0, got {roi_um!r}."
        raise InputError(msg)
    return roi  # type: ignore[return-value]


def _rgb(values: np.ndarray) -> np.ndarray:
    rgb = np.moveaxis(values, 0, -1)
    if rgb.shape[-1] == 1:
        return rgb[..., 0]
    return rgb[..., :3]


def gene_map(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    map_key: str | None = None,
    image_key: str | None = Keys.image,
    roi_um: tuple[float, float, float, float] | None = None,
    tissue_key: str | None = "auto",
    shared_scale: bool = False,
    overlay: bool = True,
    alpha: float = 0.6,
    cmap: str = "viridis",
    robust: bool = True,
    ncols: int | None = None,
    panel_size: float = 3.0,
    scale_bar: bool = True,
    max_pixels: int | None = None,
    dpi: float | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Figure | None:
    """Dense maps of one or several genes over the H&E image, whole slide or a region of interest in µm.

    Each map is drawn with the extent given by its transformation (:mod:`stpredict._geometry`), so a map pixel sits
    exactly over the image pixels it was predicted from. Each raster is read from the finest pyramid level that
    shows the view in ``max_pixels`` pixels, and only the chunks of that level that meet the view are computed:
    a whole-slide view never reads full resolution, a small ``roi_um`` reads a few full-resolution chunks.

    Parameters
    ----------
    sdata
        SpatialData with the map (and the image).
    genes
        Gene name(s) to draw, one panel each.
    map_key
        Dense map in ``sdata.images`` (channels = gene names); default the only dense map (an image with a
        declared value kind, or floating-point values).
    image_key
        H&E image drawn under the maps (or in a panel of its own without ``overlay``); ``None`` draws maps only.
    roi_um
        ``(x0, y0, x1, y1)`` in µm in the image's coordinate system (needs :func:`stpredict.pp.calibrate`):
        the view, and the part of each raster that is read.
    tissue_key
        Labels element (e.g. from :func:`stpredict.pp.tissue_mask`) outside whose non-zero pixels the maps are
        left transparent, so that values predicted over background glass are not drawn. ``"auto"``: the tissue
        mask of ``image_key`` (``"he_tissue"``) where it exists; ``None``: draw the maps everywhere.
    shared_scale
        One colour scale (and one colorbar) for all genes, else one per gene.
    overlay
        Draw each map semi-transparently over the image; otherwise the image gets the first panel.
    alpha
        Map opacity with ``overlay``.
    cmap
        Colormap of the maps.
    robust
        Colour limits from the 1st and 99th percentiles of the drawn values, else their min and max.
    ncols
        Panels per row (default: all in one row).
    panel_size
        Side of one panel in inches.
    scale_bar
        Draw a µm scale bar in each panel (when the plot is in µm), in place of axis ticks.
    max_pixels
        Longest side, in pixels, of a raster's view as drawn (default: twice the panel's size in pixels).
    dpi
        Figure resolution.
    ax
        Axes to draw into, one per panel (the image panel first without ``overlay``), instead of a new figure.
    show
        Show the figure through pyplot and return ``None``; default: show unless ``save`` or ``ax`` is given.
    save
        Write the figure to this path (the format follows the suffix: ``.png``, ``.pdf``, ``.svg``, ...).

    Returns
    -------
    The figure (``None`` when shown); its panels are titled with the image key (without ``overlay``) and the gene
    names. Axes are in µm when the elements are calibrated, else in the image's (or the map's) pixels.

    Examples
    --------
    >>> import stpredict as st
    >>> sdata = st.datasets.synthetic(shape_um=(200, 200), n_genes=4, layout=None)
    >>> genes = list(sdata.images["truth"].coords["c"].values[:2])
    >>> fig = st.pl.gene_map(sdata, genes, map_key="truth", roi_um=(0, 0, 100, 100), show=False)
    >>> [a.get_title() for a in fig.axes if a.get_label() != "<colorbar>"] == genes
    True
    """
    from matplotlib.colors import Normalize

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        msg = "Pass at least one gene to draw."
        raise InputError(msg)
    if image_key is not None and image_key not in sdata.images:
        msg = f"No image {image_key!r} in sdata.images; pass image_key=None to draw the maps alone."
        raise KeyError(msg)
    map_key = _resolve_map_key(sdata, map_key, image_key)
    element = sdata.images[map_key]
    channels = [str(c) for c in scale_levels(element)[0].coords["c"].values]
    missing = [g for g in genes if g not in channels]
    if missing:
        msg = f"Genes {missing} are not channels of {map_key!r} (it has {len(channels)}, e.g. {channels[:5]})."
        raise KeyError(msg)
    if overlay and image_key is None:
        msg = "overlay=True needs an image_key to draw under the maps; pass overlay=False."
        raise InputError(msg)
    show = resolve_show(show, ax=ax, save=save)

    frame = image_key if image_key is not None else map_key
    um = all(is_calibrated(sdata, k) for k in {frame, map_key})
    if roi_um is not None:
        roi = _check_roi(roi_um)
        to_um_affine(sdata, frame)  # raises CalibrationError naming st.pp.calibrate
        window: tuple[float, float, float, float] | None = roi
        limits = (roi[0], roi[2], roi[3], roi[1])
    else:
        window = None
        limits = extent(sdata, frame, frame, um=um)

    n_panels = len(genes) + (image_key is not None and not overlay)
    ncols = n_panels if ncols is None else max(1, min(int(ncols), n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    if ax is not None:
        axes = [ax] if not isinstance(ax, list | tuple | np.ndarray) else list(np.ravel(ax))
        if len(axes) != n_panels:
            msg = f"Pass {n_panels} axes (the image panel without overlay, then one per gene), got {len(axes)}."
            raise InputError(msg)
        fig = axes[0].figure
    else:
        fig = new_figure(show, figsize=(panel_size * ncols, panel_size * nrows), dpi=dpi)
        grid = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
        for extra in grid[n_panels:]:
            extra.remove()
        axes = list(grid[:n_panels])
    if max_pixels is None:
        max_pixels = max(64, int(round(2 * panel_size * fig.dpi)))

    he = None
    if image_key is not None:
        he_matrix = frame_matrix(sdata, image_key, frame, um=um)
        he = raster_view(sdata.images[image_key], he_matrix, window, max_pixels)
    view = raster_view(element, frame_matrix(sdata, map_key, frame, um=um), window, max_pixels)
    if view is None:
        msg = f"The map {map_key!r} does not meet roi_um={roi_um}; choose a region inside the map."
        raise InputError(msg)
    values, map_extent, _ = view
    index = {c: i for i, c in enumerate(channels)}
    planes = {g: np.asarray(values[index[g]], dtype=np.float64) for g in genes}
    tissue_key = _resolve_tissue_key(sdata, tissue_key, image_key)
    if tissue_key is not None:
        shape = next(iter(planes.values())).shape
        outside = ~_mask_on_grid(sdata, tissue_key, frame, um, window, max_pixels, map_extent, shape)
        for plane in planes.values():
            plane[outside] = np.nan
    if shared_scale:
        shared = color_limits(np.concatenate([p.ravel() for p in planes.values()]), robust=robust)

    panels = list(axes)
    if image_key is not None and not overlay:
        first = panels.pop(0)
        if he is not None:
            first.imshow(_rgb(he[0]), extent=he[1], origin="upper", interpolation="nearest")
        first.set_title(image_key)
    images = []
    for gene, panel in zip(genes, panels, strict=True):
        if overlay and he is not None:
            panel.imshow(_rgb(he[0]), extent=he[1], origin="upper", interpolation="nearest")
        vmin, vmax = shared if shared_scale else color_limits(planes[gene], robust=robust)
        im = panel.imshow(
            planes[gene],
            extent=map_extent,
            origin="upper",
            cmap=cmap,
            norm=Normalize(vmin=vmin, vmax=vmax),
            alpha=alpha if overlay else None,
            interpolation="nearest",
        )
        images.append(im)
        panel.set_title(gene)
        if not shared_scale:
            fig.colorbar(im, ax=panel, shrink=0.8)
    if shared_scale:
        fig.colorbar(images[-1], ax=panels, shrink=0.8)
    style_spatial(axes, limits, um=um, scale_bar=scale_bar)
    return finish(fig, fig, show=show, save=save, dpi=dpi)


def _resolve_tissue_key(sdata: SpatialData, tissue_key: str | None, image_key: str | None) -> str | None:
    if tissue_key == "auto":
        key = Keys.tissue_mask(image_key) if image_key is not None else None
        return key if key is not None and key in sdata.labels else None
    if tissue_key is not None and tissue_key not in sdata.labels:
        msg = (
            f"No labels {tissue_key!r} in sdata.labels (it has {sorted(sdata.labels)}); compute a tissue mask with "
            "st.pp.tissue_mask(sdata) or pass tissue_key=None to draw the maps everywhere."
        )
        raise KeyError(msg)
    return tissue_key


def _mask_on_grid(
    sdata: SpatialData,
    tissue_key: str,
    frame: str,
    um: bool,
    window: tuple[float, float, float, float] | None,
    max_pixels: int,
    grid_extent: tuple[float, float, float, float],
    shape: tuple[int, int],
) -> np.ndarray:
    """Whether the centre of each pixel of a ``shape`` raster drawn at ``grid_extent`` lies on a non-zero label."""
    view = raster_view(sdata.labels[tissue_key], frame_matrix(sdata, tissue_key, frame, um=um), window, max_pixels)
    inside = np.zeros(shape, dtype=bool)
    if view is None:
        return inside
    labels, (l_left, l_right, l_bottom, l_top), _ = view
    left, right, bottom, top = grid_extent
    xs = left + (np.arange(shape[1]) + 0.5) * (right - left) / shape[1]
    ys = top + (np.arange(shape[0]) + 0.5) * (bottom - top) / shape[0]
    cols = np.floor((xs - l_left) / (l_right - l_left) * labels.shape[1]).astype(np.int64)
    rows = np.floor((ys - l_top) / (l_bottom - l_top) * labels.shape[0]).astype(np.int64)
    col_ok = (cols >= 0) & (cols < labels.shape[1])
    row_ok = (rows >= 0) & (rows < labels.shape[0])
    hit = np.asarray(labels)[np.ix_(rows[row_ok], cols[col_ok])] != 0
    inside[np.ix_(np.flatnonzero(row_ok), np.flatnonzero(col_ok))] = hit
    return inside
