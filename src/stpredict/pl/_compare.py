"""Measured vs predicted (vs ground truth) tables side by side: each unit at its place and true size in µm."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import apply_affine, to_um_affine
from stpredict._keys import Attrs, Keys
from stpredict.tl._matching import get_table, table_matrix

from ._utils import color_limits, finish, frame_matrix, new_figure, raster_view, resolve_show, style_spatial

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["compare"]

_MAX_PIXELS = 1024


@dataclass
class _Units:
    """Where a table's units sit, in µm, and how to draw one gene's values there."""

    kind: str  # "grid", "circles", "polygons" or "labels"
    bounds: tuple[float, float, float, float]  # x0, y0, x1, y1 in µm
    rows: list[np.ndarray] = field(default_factory=list)  # per region: the table rows drawn
    geometry: list[dict[str, Any]] = field(default_factory=list)  # per region: what the kind needs


def _grid_units(adata: AnnData, params: dict[str, Any]) -> _Units:
    size = float(params["bin_size_um"])
    ox, oy = (float(v) for v in params.get("origin_um", (0.0, 0.0)))
    r = np.asarray(adata.obs["array_row"], dtype=np.int64)
    c = np.asarray(adata.obs["array_col"], dtype=np.int64)
    r0, c0 = int(r.min()), int(c.min())
    nr, nc = int(r.max()) - r0 + 1, int(c.max()) - c0 + 1
    f = max(1, math.ceil(max(nr, nc) / _MAX_PIXELS))  # bins per drawn pixel: the raster stays small
    shape = (math.ceil(nr / f), math.ceil(nc / f))
    flat = ((r - r0) // f) * shape[1] + (c - c0) // f
    x0, y0 = ox + c0 * size, oy + r0 * size
    x1, y1 = x0 + shape[1] * f * size, y0 + shape[0] * f * size
    geometry = {"flat": flat, "shape": shape, "extent": (x0, x1, y1, y0), "bins_per_px": f}
    bounds = (x0, y0, ox + (c0 + nc) * size, oy + (r0 + nr) * size)
    return _Units("grid", bounds, [np.arange(adata.n_obs)], [geometry])


def _shape_units(sdata: SpatialData, key: str, ids: np.ndarray, table_key: str) -> tuple[str, dict[str, Any]]:
    import shapely

    gdf = sdata.shapes[key]
    pos = gdf.index.get_indexer(ids)
    if (pos < 0).any():
        msg = (
            f"{int((pos < 0).sum())} units of table {table_key!r} are not in shapes {key!r} (matched by instance id); "
            "write the table and its shapes together, e.g. with `st.tl.aggregate`."
        )
        raise InputError(msg)
    to_um = to_um_affine(sdata, key)
    geoms = gdf.geometry.to_numpy()[pos]
    types = shapely.get_type_id(geoms)
    if (types == shapely.GeometryType.POINT).all():
        if "radius" not in gdf.columns:
            msg = f"Shapes {key!r} hold points without a 'radius' column; parse them as circles."
            raise InputError(msg)
        lin = to_um[:2, :2]
        scale = float(np.sqrt(abs(np.linalg.det(lin))))
        xy = apply_affine(to_um, shapely.get_coordinates(geoms))
        radius = np.asarray(gdf["radius"].to_numpy()[pos], dtype=np.float64) * scale
        return "circles", {"xy": xy, "radius": radius}
    if not np.isin(types, [shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON]).all():
        msg = f"Shapes {key!r} mix circles and polygons, or hold other geometries; only one kind can be drawn."
        raise InputError(msg)
    parts, owner = shapely.get_parts(geoms, return_index=True)
    rings = shapely.get_exterior_ring(parts)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    coords = apply_affine(to_um, coords)
    splits = np.flatnonzero(np.diff(ring_of)) + 1
    return "polygons", {"verts": np.split(coords, splits), "owner": owner}


def _region_units(sdata: SpatialData, adata: AnnData, table_key: str) -> _Units:
    attrs = adata.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    if region is None:
        msg = (
            f"Table {table_key!r} annotates no element (no spatialdata region), so its units cannot be placed. "
            "Write it with `st.tl.aggregate` or `st.pp.bin_counts`, or parse it with `TableModel.parse(..., region=)`."
        )
        raise InputError(msg)
    regions = [region] if isinstance(region, str) else list(region)
    region_key = attrs.get("region_key", Keys.region_key)
    instance_key = attrs.get("instance_key", Keys.instance_key)
    if instance_key not in adata.obs:
        msg = f"Table {table_key!r} lacks its instance column {instance_key!r} in obs."
        raise KeyError(msg)
    ids = adata.obs[instance_key].to_numpy()
    labels = adata.obs[region_key].astype(str).to_numpy() if region_key in adata.obs else None
    units = _Units("", (np.inf, np.inf, -np.inf, -np.inf))
    kinds = set()
    for key in regions:
        rows = np.arange(adata.n_obs) if labels is None else np.flatnonzero(labels == key)
        if not rows.size:
            continue
        if key in sdata.shapes:
            kind, geom = _shape_units(sdata, key, ids[rows], table_key)
            if kind == "circles":
                lo, hi = geom["xy"] - geom["radius"][:, None], geom["xy"] + geom["radius"][:, None]
            else:
                allv = np.concatenate(geom["verts"])
                lo, hi = allv, allv
        elif key in sdata.labels:
            kind = "labels"
            element = sdata.labels[key]
            view = raster_view(element, frame_matrix(sdata, key, None, um=True), None, _MAX_PIXELS)
            lab, ext, _ = view  # type: ignore[misc]
            geom = {"labels": lab, "extent": ext, "ids": np.asarray(ids[rows])}
            lo, hi = np.array([[ext[0], ext[3]]]), np.array([[ext[1], ext[2]]])
        else:
            msg = f"Table {table_key!r} annotates {key!r}, which is neither shapes nor labels of the SpatialData."
            raise KeyError(msg)
        kinds.add(kind)
        units.rows.append(rows)
        units.geometry.append(geom | {"kind": kind})
        b = units.bounds
        units.bounds = (
            min(b[0], float(lo[:, 0].min())),
            min(b[1], float(lo[:, 1].min())),
            max(b[2], float(hi[:, 0].max())),
            max(b[3], float(hi[:, 1].max())),
        )
    if not units.rows:
        msg = f"No unit of table {table_key!r} belongs to its regions {regions}."
        raise InputError(msg)
    units.kind = kinds.pop() if len(kinds) == 1 else "mixed"
    return units


def _units(sdata: SpatialData, adata: AnnData, table_key: str) -> _Units:
    params = adata.uns.get(Attrs.root, {})
    if "bin_size_um" in params and {"array_row", "array_col"} <= set(adata.obs.columns) and adata.n_obs:
        return _grid_units(adata, params)
    return _region_units(sdata, adata, table_key)


def _draw(ax: Axes, units: _Units, values: np.ndarray, norm: Any, cmap: str) -> Any:
    """Draw one gene of one table; returns the last artist (for a colorbar)."""
    from matplotlib.collections import EllipseCollection, PolyCollection

    artist = None
    for rows, geom in zip(units.rows, units.geometry, strict=True):
        v = values[rows]
        kind = geom.get("kind", units.kind)
        if kind == "grid":
            sums = np.bincount(geom["flat"], weights=np.nan_to_num(v), minlength=int(np.prod(geom["shape"])))
            counts = np.bincount(geom["flat"], weights=np.isfinite(v), minlength=sums.size)
            with np.errstate(invalid="ignore", divide="ignore"):
                raster = np.where(counts > 0, sums / counts, np.nan).reshape(geom["shape"])
            artist = ax.imshow(
                raster, extent=geom["extent"], origin="upper", cmap=cmap, norm=norm, interpolation="nearest"
            )
        elif kind == "circles":
            artist = EllipseCollection(
                widths=2 * geom["radius"],
                heights=2 * geom["radius"],
                angles=0,
                units="xy",
                offsets=geom["xy"],
                offset_transform=ax.transData,
                array=v,
                cmap=cmap,
                norm=norm,
                linewidths=0,
            )
            ax.add_collection(artist)
        elif kind == "polygons":
            artist = PolyCollection(geom["verts"], array=v[geom["owner"]], cmap=cmap, norm=norm, linewidths=0)
            ax.add_collection(artist)
        else:  # labels
            order = np.argsort(geom["ids"], kind="stable")
            sorted_ids = geom["ids"][order]
            lab = geom["labels"]
            at = np.clip(np.searchsorted(sorted_ids, lab), 0, max(sorted_ids.size - 1, 0))
            hit = sorted_ids[at] == lab
            raster = np.where(hit, v[order][at], np.nan)
            artist = ax.imshow(
                raster, extent=geom["extent"], origin="upper", cmap=cmap, norm=norm, interpolation="nearest"
            )
    return artist


def _titles(tables: Sequence[str] | Mapping[str, str], titles: Sequence[str] | None) -> tuple[list[str], list[str]]:
    from collections.abc import Mapping

    if isinstance(tables, str):
        msg = f"tables must be a sequence of table keys or a mapping title → key, got the string {tables!r}."
        raise InputError(msg)
    if isinstance(tables, Mapping):
        if titles is not None:
            msg = "Pass titles either as the keys of a `tables` mapping or as `titles=`, not both."
            raise InputError(msg)
        return [str(t) for t in tables], [str(k) for k in tables.values()]
    keys = [str(k) for k in tables]
    names = keys if titles is None else [str(t) for t in titles]
    if len(names) != len(keys):
        msg = f"Pass one title per table: {len(keys)} tables, {len(names)} titles."
        raise InputError(msg)
    return names, keys


def _layers(layer: str | Sequence[str | None] | None, keys: list[str], adatas: list[AnnData]) -> list[str | None]:
    """The layer each table is read from (``None``: ``X``)."""
    if layer is None:
        return [None] * len(keys)
    if isinstance(layer, str):
        found = [layer if layer in adata.layers else None for adata in adatas]
        if not any(found):
            msg = f"No table in {keys} has a layer {layer!r}; pass layer=None to draw X, or name an existing layer."
            raise KeyError(msg)
        return found
    chosen = list(layer)
    if len(chosen) != len(keys):
        msg = f"Pass one layer per table (None for X): {len(keys)} tables, {len(chosen)} layers."
        raise InputError(msg)
    return chosen


def compare(
    sdata: SpatialData,
    genes: str | Sequence[str],
    *,
    tables: Sequence[str] | Mapping[str, str],
    titles: Sequence[str] | None = None,
    layer: str | Sequence[str | None] | None = None,
    shared_scale: bool = True,
    cmap: str = "viridis",
    ncols: int | None = None,
    panel_size: float = 3.0,
    scale_bar: bool = True,
    dpi: float | None = None,
    ax: Sequence[Axes] | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Figure | None:
    """Tables side by side (measured, predicted, ground truth), each unit drawn at its place and size in µm.

    Rows are genes, columns are tables. A table of square bins (from :func:`stpredict.tl.aggregate` or
    :func:`stpredict.pp.bin_counts`, with ``array_row``/``array_col`` and the grid in ``uns["stpredict"]``) is drawn
    as a raster of its bins (averaged into at most 1024 px a side); any other table is drawn through the element it
    annotates (spatialdata ``region``): circles and polygons of a shapes element at their true size, or the labels
    of a labels element filled with each label's value.

    Parameters
    ----------
    sdata
        SpatialData holding the tables and the elements they annotate (calibrated, :func:`stpredict.pp.calibrate`).
    genes
        Gene(s) to draw, one row each.
    tables
        Keys of tables in ``sdata.tables`` (e.g. the measured ``"table_16um"`` and the predicted
        ``"he_pixnet_16um"`` of ``st.tl.aggregate(sdata, "he_pixnet", bin_size=16)``), or a mapping title → key.
    titles
        Column titles (default the table keys, or the mapping's keys).
    layer
        Layer to draw instead of ``X`` (e.g. ``"log1p_cpm"``): a name, read from every table that has it (tables
        without it, such as predicted tables whose ``X`` is already normalised, draw ``X``; at least one table
        must have it), or one entry per table (``None`` for ``X``), each required.
    shared_scale
        One colour scale per gene, from the min to the max of that gene over all tables (one colorbar per row);
        otherwise each panel from its own min to max.
    cmap
        Colormap.
    ncols
        Genes per row of the figure (each with one panel per table); default one.
    panel_size
        Side of one panel in inches.
    scale_bar
        Draw a µm scale bar in each panel, in place of axis ticks.
    dpi
        Figure resolution.
    ax
        Axes to draw into, one per panel (gene-major: the tables of the first gene, then of the next ...).
    show
        Show the figure through pyplot and return ``None``; default: show unless ``save`` or ``ax`` is given.
    save
        Write the figure to this path (the format follows the suffix: ``.png``, ``.pdf``, ``.svg``, ...).

    Returns
    -------
    The figure (``None`` when shown); panels titled with the column titles, the first panel of each gene labelled
    with the gene on its y axis; every panel shows the same µm window (the union of the tables' units).

    Examples
    --------
    >>> import stpredict as st
    >>> sdata = st.datasets.synthetic(shape_um=(200, 200), n_genes=4, layout="visium_hd", bin_size_um=16)
    >>> st.tl.aggregate(sdata, "truth", bin_size=16, tissue_key=False)
    >>> key = next(k for k in sdata.tables if k != "truth_16um")
    >>> gene = sdata.tables[key].var_names[0]
    >>> fig = st.pl.compare(sdata, gene, tables={"measured": key, "truth": "truth_16um"}, show=False)
    >>> [a.get_title() for a in fig.axes if a.get_label() != "<colorbar>"]
    ['measured', 'truth']
    """
    from matplotlib.colors import Normalize

    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        msg = "Pass at least one gene to draw."
        raise InputError(msg)
    names, keys = _titles(tables, titles)
    if not keys:
        msg = "Pass at least one table key in `tables`."
        raise InputError(msg)
    adatas = [get_table(k, sdata, name="tables") for k in keys]
    for key, adata in zip(keys, adatas, strict=True):
        missing = [g for g in genes if g not in adata.var_names]
        if missing:
            msg = f"Genes {missing} are not in table {key!r} ({adata.n_vars} genes, e.g. {list(adata.var_names[:5])})."
            raise KeyError(msg)
    layers = _layers(layer, keys, adatas)
    show = resolve_show(show, ax=ax, save=save)
    units = [_units(sdata, adata, key) for key, adata in zip(keys, adatas, strict=True)]
    values = {}
    for t, (key, adata) in enumerate(zip(keys, adatas, strict=True)):
        x = table_matrix(adata, layers[t], f"{key!r}")
        for g in genes:
            column = x[:, adata.var_names.get_loc(g)]
            column = column.toarray() if hasattr(column, "toarray") else column
            values[g, t] = np.asarray(column, dtype=np.float64).ravel()

    n_t = len(keys)
    per_row = 1 if ncols is None else max(1, min(int(ncols), len(genes)))
    nrows = math.ceil(len(genes) / per_row)
    n_panels = len(genes) * n_t
    if ax is not None:
        axes = list(np.ravel(ax)) if isinstance(ax, list | tuple | np.ndarray) else [ax]
        if len(axes) != n_panels:
            msg = f"Pass {n_panels} axes (one per gene and table, gene-major), got {len(axes)}."
            raise InputError(msg)
        fig = axes[0].figure
    else:
        fig = new_figure(show, figsize=(panel_size * n_t * per_row, panel_size * nrows), dpi=dpi)
        grid = fig.subplots(nrows, n_t * per_row, squeeze=False, sharex=True, sharey=True).ravel()
        for extra in grid[n_panels:]:
            extra.remove()
        axes = list(grid[:n_panels])

    for i, gene in enumerate(genes):
        row_axes = axes[i * n_t : (i + 1) * n_t]
        if shared_scale:
            lo, hi = color_limits(np.concatenate([values[gene, t] for t in range(n_t)]), robust=False)
        artist = None
        for t, panel in enumerate(row_axes):
            if not shared_scale:
                lo, hi = color_limits(values[gene, t], robust=False)
            norm = Normalize(vmin=lo, vmax=hi)
            artist = _draw(panel, units[t], values[gene, t], norm, cmap)
            panel.set_title(names[t])
            if not shared_scale:
                fig.colorbar(artist, ax=panel, shrink=0.8)
        if shared_scale:
            fig.colorbar(artist, ax=row_axes, shrink=0.8)
    b = np.array([u.bounds for u in units])
    limits = (float(b[:, 0].min()), float(b[:, 2].max()), float(b[:, 3].max()), float(b[:, 1].min()))
    style_spatial(axes, limits, um=True, scale_bar=scale_bar)
    for i, gene in enumerate(genes):
        axes[i * n_t].set_ylabel(gene if scale_bar else f"{gene}: y (µm)")
    return finish(fig, fig, show=show, save=save, dpi=dpi)
