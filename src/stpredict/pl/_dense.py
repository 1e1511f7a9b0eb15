"""Dense per-gene maps beside (or over) the H&E image."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stpredict._errors import InputError
from stpredict._keys import Keys

from ._utils import display_level, extent, finish, new_figure, resolve_show, use_um

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["dense_maps"]


def dense_maps(
    sdata: SpatialData,
    map_key: str,
    *,
    genes: str | Sequence[str],
    image_key: str | None = Keys.image,
    overlay: bool = False,
    alpha: float = 0.6,
    cmap: str = "viridis",
    robust: bool = True,
    units: str = "auto",
    ncols: int | None = None,
    panel_size: float = 3.0,
    dpi: float | None = None,
    max_pixels: int = 1024,
    axes: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Figure | None:
    """The H&E image and the dense maps of a few genes, side by side on one coordinate frame.

    Every panel shares the same axes limits, and each map is drawn with the extent given by its transformation
    (:mod:`stpredict._geometry`), so a map pixel sits exactly over the image pixels it was predicted from.
    Large rasters are drawn from the finest pyramid level that fits ``max_pixels``.

    Parameters
    ----------
    sdata
        SpatialData with the map (and the image).
    map_key
        Dense map in ``sdata.images`` (channels = gene names).
    genes
        Gene name(s) to draw.
    image_key
        H&E image to draw first (and under the maps with ``overlay``); ``None`` draws maps only.
    overlay
        Draw each map semi-transparently over the image instead of on an empty panel.
    alpha
        Map opacity with ``overlay``.
    cmap
        Colormap of the maps.
    robust
        Colour limits from the 1st and 99th percentiles of each map, else its min and max.
    units
        Axes in ``"um"`` (needs calibration, :func:`stpredict.pp.calibrate`), ``"px"`` (pixels of the image, or of
        the map without an image) or ``"auto"`` (µm when calibrated).
    ncols
        Panels per row (default: all in one row).
    panel_size
        Side of one panel in inches.
    dpi
        Figure resolution.
    max_pixels
        Longest side of the pyramid level drawn.
    axes
        Draw into these axes (one per panel, e.g. a row of a larger grid) instead of a new figure.
    show
        Show the figure through pyplot and return ``None``; default: show unless ``save`` or axes are given.
    save
        Write the figure to this path (the format follows the suffix: ``.png``, ``.pdf``, ``.svg``, ...).

    Returns
    -------
    The figure (``None`` when shown); its axes are the image panel (if any), then one panel per gene titled with
    the gene name.
    """
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    show = resolve_show(show, ax=axes, save=save)
    if map_key not in sdata.images:
        msg = f"No dense map {map_key!r} in sdata.images; available images: {sorted(sdata.images)}."
        raise KeyError(msg)
    if image_key is not None and image_key not in sdata.images:
        msg = f"No image {image_key!r} in sdata.images; pass image_key=None to draw the maps alone."
        raise KeyError(msg)
    if not genes:
        msg = "Pass at least one gene to draw."
        raise InputError(msg)
    level = display_level(sdata.images[map_key], max_pixels)
    channels = [str(c) for c in level.coords["c"].values]
    missing = [g for g in genes if g not in channels]
    if missing:
        msg = f"Genes {missing} are not channels of {map_key!r} (it has {len(channels)}, e.g. {channels[:5]})."
        raise KeyError(msg)
    if overlay and image_key is None:
        msg = "overlay=True needs an image_key to draw under the maps."
        raise InputError(msg)

    keys = [map_key] if image_key is None else [map_key, image_key]
    um = use_um(sdata, keys, units)
    map_extent = extent(sdata, map_key, image_key, um=um)
    he = None
    if image_key is not None:
        he_level = display_level(sdata.images[image_key], max_pixels)
        he = np.moveaxis(np.asarray(he_level.values), 0, -1)
        if he.shape[-1] == 1:
            he = he[..., 0]
        elif he.shape[-1] > 3:
            he = he[..., :3]
        he_extent = extent(sdata, image_key, image_key, um=um)

    n_panels = len(genes) + (image_key is not None and not overlay)
    ncols = n_panels if ncols is None else max(1, min(ncols, n_panels))
    nrows = int(np.ceil(n_panels / ncols))
    if axes is not None:
        axes = list(axes)
        if len(axes) != n_panels:
            msg = f"Pass {n_panels} axes (the image panel, then one per gene), got {len(axes)}."
            raise InputError(msg)
        fig = axes[0].figure
        drawn = list(axes)
    else:
        fig = new_figure(show, figsize=(panel_size * ncols, panel_size * nrows), dpi=dpi)
        grid = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
        for ax in grid[n_panels:]:
            ax.remove()
        axes = list(grid[:n_panels])
        drawn = list(axes)
    unit = "µm" if um else "px"
    if image_key is not None and not overlay:
        ax = axes.pop(0)
        ax.imshow(he, extent=he_extent, origin="upper", interpolation="nearest")
        ax.set_title(image_key)
    for gene, ax in zip(genes, axes, strict=True):
        values = np.asarray(level.sel(c=gene).values, dtype=np.float64)
        finite = values[np.isfinite(values)]
        if finite.size and robust:
            vmin, vmax = np.percentile(finite, [1, 99])
        elif finite.size:
            vmin, vmax = finite.min(), finite.max()
        else:
            vmin = vmax = None
        if overlay:
            ax.imshow(he, extent=he_extent, origin="upper", interpolation="nearest")
        im = ax.imshow(
            values,
            extent=map_extent,
            origin="upper",
            cmap=cmap,
            vmin=vmin,
            vmax=vmax,
            alpha=alpha if overlay else None,
            interpolation="nearest",
        )
        ax.set_title(gene)
        fig.colorbar(im, ax=ax, shrink=0.8)
    limits = he_extent if image_key is not None else map_extent
    for ax in drawn:
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[2], limits[3])
        ax.set_aspect("equal")
        ax.set_xlabel(f"x ({unit})")
    drawn[0].set_ylabel(f"y ({unit})")
    return finish(fig, fig, show=show, save=save, dpi=dpi)
