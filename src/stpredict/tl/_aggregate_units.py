"""The three unit paths of ``aggregate``: raw exact-overlap sums of the map over square bins, shapes or labels.

:func:`_bins` sums the map over the square µm bins of a :class:`~stpredict._grid.Grid` that meet it (and the tissue
mask), :func:`_shapes` over the circles and (multi)polygons of a shapes element, :func:`_labels` over the labels of
a labels element at any resolution. Each returns the sums and the ``obs`` columns (ids, pixel counts, areas,
centres) of the units that meet the map; :func:`_bins` also finishes its values, written straight into ``X``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import affine_between, apply_affine, scale_levels, to_um_affine
from stpredict._keys import Keys
from stpredict._logging import get_logger
from stpredict._meta import get_element_meta
from stpredict.kernels import axis_table, gather_units, label_lut, labels_sum, rect_sum_units, shapes_sum

from ._aggregate_map import _axis_aligned, _Map, _unit_scale
from ._raster import _grid_bands, _is_dask, _memory_chunks, _progress, _Raster, _whole_view

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from stpredict._grid import Grid

__all__ = ["_bins", "_labels", "_shapes", "_tissue_key"]

logger = get_logger(__name__)


def _tissue_key(sdata: SpatialData, image_key: str, tissue_key: str | None | bool) -> str | None:
    if tissue_key is False:
        return None
    if isinstance(tissue_key, str):
        if tissue_key not in sdata.labels:
            msg = f"No labels {tissue_key!r} for the tissue mask; available labels: {sorted(sdata.labels)}."
            raise KeyError(msg)
        return tissue_key
    meta = get_element_meta(sdata, image_key, sdata.images[image_key])
    candidates = [meta.get("tissue_key")] + [
        Keys.tissue_mask(k) for k in (image_key, meta.get("image_key"), meta.get("source"), Keys.image) if k
    ]
    return next((k for k in candidates if k and k in sdata.labels), None)


def _bins(
    sdata: SpatialData,
    m: _Map,
    grid: Grid,
    tissue: str | None,
    block_bytes: int,
    show: bool | None,
) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """``X`` (float32, finished values), ``obs`` columns and the unit of ``"sum"`` of the bins meeting the map."""
    a = m.to_um
    if not _axis_aligned(a):
        msg = (
            f"{m.key!r} is rotated or sheared relative to µm, so square µm bins are not axis-aligned on its pixels. "
            "Build the bins as polygons and aggregate with `shapes_key=`."
        )
        raise InputError(msg)
    n_c, ny, nx = (int(v) for v in m.data.shape)
    (ux0, uy0), (ux1, uy1) = apply_affine(a, np.array([[0.0, 0.0], [nx, ny]]))
    if ux0 < grid.x0 - 1e-9 or uy0 < grid.y0 - 1e-9:
        logger.warning(
            "%r extends to negative µm (before the image corner); bins are numbered from the corner, so that part "
            "is not aggregated.",
            m.key,
        )
    kx0, kx1 = grid.index_range(ux0, ux1, "x")
    ky0, ky1 = grid.index_range(uy0, uy1, "y")
    if kx1 <= kx0 or ky1 <= ky0:
        msg = f"The grid has no bin on {m.key!r}."
        raise InputError(msg)
    xe_um, ye_um = grid.edges(kx0, kx1, "x"), grid.edges(ky0, ky1, "y")
    xe = (xe_um - a[0, 2]) / a[0, 0]
    ye = (ye_um - a[1, 2]) / a[1, 1]
    wx = np.diff(np.clip(xe, 0, nx))
    wy = np.diff(np.clip(ye, 0, ny))
    n_px = np.outer(wy, wx)
    keep_grid = n_px > 0
    tissue_frac = None
    if tissue is not None:
        t_level = scale_levels(sdata.labels[tissue])[0]
        t_aff = to_um_affine(sdata, tissue)
        if not _axis_aligned(t_aff):
            msg = f"The tissue mask {tissue!r} is rotated relative to µm; pass tissue_key=False."
            raise InputError(msg)
        t_data = t_level.data[None]
        t_data = (t_data > 0).astype(np.float32)
        txe = (xe_um - t_aff[0, 2]) / t_aff[0, 0]
        tye = (ye_um - t_aff[1, 2]) / t_aff[1, 1]
        t_area = np.zeros(keep_grid.shape)
        for r0, r1, band in _grid_bands(_Raster.of(t_data), tye, txe, block_bytes, False, "tissue"):
            t_area[r0:r1] = band[0]
        bin_area_t = np.outer(np.diff(tye), np.diff(txe))
        tissue_frac = t_area / bin_area_t
        keep_grid &= t_area > 0
    r, c = np.nonzero(keep_grid)  # the kept bins, row-major: each band's bins are one slice
    if r.size == 0:
        msg = f"No bin of {grid.size:g} µm meets the tissue of {m.key!r}; check `tissue_key` and the grid origin."
        raise InputError(msg)
    array_row, array_col = r + ky0, c + kx0
    ids = grid.ids(array_row, array_col)
    px = n_px[r, c]
    scale, sum_unit = _unit_scale(px, m)
    x = np.empty((r.size, n_c), dtype=np.float32)  # X is float32; keeps memory low
    # touch the fresh pages once, in order: faulting them in from the kernel threads' scattered row writes cost
    # 40-60 ms more at 263,169 bins x 50 genes than this pass (about 10 ms)
    x.fill(0)
    whole = m.data.in_memory_whole()
    if whole is not None:  # each bin is computed whole: its row of X is written directly, scaled on the way
        units = np.full(keep_grid.shape, -1, dtype=np.int64)
        units[r, c] = np.arange(r.size)
        ty, tx = axis_table(ye[:-1], ye[1:], ny), axis_table(xe[:-1], xe[1:], nx)
        rect_sum_units(whole, ty, tx, units, scale, x, channels=m.data.chan)
    else:
        starts = np.searchsorted(r, np.arange(keep_grid.shape[0] + 1))
        filled = np.zeros(keep_grid.shape[0], dtype=bool)
        for r0, r1, band in _grid_bands(m.data, ye, xe, block_bytes, show, f"aggregate {m.key}"):
            k0, k1 = starts[r0], starts[r1]
            gather_units(band, r[k0:k1] - r0, c[k0:k1], x[k0:k1], scale[k0:k1])
            filled[r0:r1] = True
        if not filled[r].all():
            msg = "internal: a bin row with kept bins was not aggregated"
            raise AssertionError(msg)
    centres = np.c_[grid.x0 + (array_col + 0.5) * grid.size, grid.y0 + (array_row + 0.5) * grid.size]
    obs = {
        Keys.instance_key: ids,
        "array_row": array_row,
        "array_col": array_col,
        "n_pixels": px,
        "area_um2": px * float(abs(np.linalg.det(a[:2, :2]))),
        "spatial": centres,
    }
    if tissue_frac is not None:
        obs["tissue_fraction"] = tissue_frac[r, c]
    return x, obs, sum_unit


def _shape_geometry(sdata: SpatialData, shapes_key: str, image_key: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Kernel geometry of the shapes in the map's pixel space, and their centres in the shapes' own space."""
    import shapely

    gdf = sdata.shapes[shapes_key]
    if len(gdf) == 0:
        msg = f"Shapes {shapes_key!r} are empty."
        raise InputError(msg)
    m = affine_between(sdata, shapes_key, image_key)
    geoms = gdf.geometry.to_numpy()
    types = shapely.get_type_id(geoms)
    n = len(gdf)
    is_point = types == shapely.GeometryType.POINT
    is_poly = np.isin(types, [shapely.GeometryType.POLYGON, shapely.GeometryType.MULTIPOLYGON])
    if not np.all(is_point | is_poly):
        msg = f"Shapes {shapes_key!r} hold geometries other than circles and (multi)polygons."
        raise InputError(msg)
    if is_point.any() and "radius" not in gdf.columns:
        msg = f"Shapes {shapes_key!r} hold points without a 'radius' column; parse them as circles."
        raise InputError(msg)
    kind = np.where(is_point, 0, 1).astype(np.int8)
    cx = np.zeros(n)
    cy = np.zeros(n)
    r = np.zeros(n)
    bbox = np.zeros((n, 4))
    centres = np.zeros((n, 2))
    if is_point.any():
        lin = m[:2, :2]
        sx, sy = np.linalg.norm(lin[:, 0]), np.linalg.norm(lin[:, 1])
        if abs(sx - sy) > 1e-6 * max(sx, sy) or abs(lin[:, 0] @ lin[:, 1]) > 1e-6 * sx * sy:
            msg = (
                f"The transformation from {shapes_key!r} to {image_key!r} is not a similarity, so its circles "
                "become ellipses. Convert them to polygons (e.g. `geometry.buffer(radius)`) first."
            )
            raise InputError(msg)
        xy = shapely.get_coordinates(geoms[is_point])
        centres[is_point] = xy
        p = apply_affine(m, xy)
        rad = np.asarray(gdf["radius"].to_numpy()[is_point], dtype=np.float64) * sx
        cx[is_point], cy[is_point], r[is_point] = p[:, 0], p[:, 1], rad
        bbox[is_point] = np.c_[p[:, 0] - rad, p[:, 1] - rad, p[:, 0] + rad, p[:, 1] + rad]
    ring_ptr = [0]
    ring_sign: list[np.ndarray] = []
    vx: list[np.ndarray] = []
    vy: list[np.ndarray] = []
    rings_per_shape = np.zeros(n, dtype=np.int64)
    if is_poly.any():
        poly_idx = np.flatnonzero(is_poly)
        centres[is_poly] = shapely.get_coordinates(shapely.centroid(geoms[is_poly]))
        parts, part_of = shapely.get_parts(geoms[is_poly], return_index=True)
        rings, ring_of_part = shapely.get_rings(parts, return_index=True)
        first = np.r_[True, ring_of_part[1:] != ring_of_part[:-1]]
        coords, vertex_ring = shapely.get_coordinates(rings, return_index=True)
        coords = apply_affine(m, coords)
        counts = np.bincount(vertex_ring, minlength=len(rings))
        ring_ptr = np.r_[0, np.cumsum(counts)]
        sign = np.where(first, 1.0, -1.0)
        shape_of_ring = poly_idx[part_of[ring_of_part]]
        rings_per_shape = np.bincount(shape_of_ring, minlength=n)
        vx, vy = coords[:, 0], coords[:, 1]
        mins = np.full((len(rings), 2), np.inf)
        maxs = np.full((len(rings), 2), -np.inf)
        np.minimum.at(mins, vertex_ring, coords)
        np.maximum.at(maxs, vertex_ring, coords)
        for j, fn in ((0, np.minimum), (1, np.minimum), (2, np.maximum), (3, np.maximum)):
            init = np.inf if fn is np.minimum else -np.inf
            vals = np.full(n, init)
            fn.at(vals, shape_of_ring, (mins if j < 2 else maxs)[:, j % 2])
            bbox[is_poly, j] = vals[is_poly]
        order = np.argsort(shape_of_ring, kind="stable")
        if not np.array_equal(order, np.arange(order.size)):
            msg = "internal: rings are not grouped by shape"
            raise AssertionError(msg)
        ring_sign = sign
    else:
        ring_ptr = np.zeros(1, dtype=np.int64)
        ring_sign = np.zeros(0)
        vx = vy = np.zeros(0)
    shape_ptr = np.r_[0, np.cumsum(rings_per_shape)].astype(np.int64)
    geometry = {
        "kind": kind,
        "cx": cx,
        "cy": cy,
        "r": r,
        "bbox": bbox,
        "ring_ptr": np.asarray(ring_ptr, dtype=np.int64),
        "ring_sign": np.asarray(ring_sign, dtype=np.float64),
        "vx": np.ascontiguousarray(vx, dtype=np.float64),
        "vy": np.ascontiguousarray(vy, dtype=np.float64),
        "shape_ptr": shape_ptr,
    }
    return geometry, centres


def _shapes(
    sdata: SpatialData, m: _Map, shapes_key: str, block_bytes: int, show: bool | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    geometry, centres = _shape_geometry(sdata, shapes_key, m.key)
    n = centres.shape[0]
    n_c, ny, nx = (int(v) for v in m.data.shape)
    out = np.zeros((n, n_c))
    wout = np.zeros(n)
    bbox = geometry["bbox"]
    tiles = m.data.tiles(block_bytes)
    hits = [
        np.flatnonzero((bbox[:, 0] < x1) & (bbox[:, 2] > x0) & (bbox[:, 1] < y1) & (bbox[:, 3] > y0))
        for y0, y1, x0, x1 in tiles
    ]
    work = [(t, h) for t, h in zip(tiles, hits, strict=True) if h.size]
    if not work:
        msg = f"No shape of {shapes_key!r} meets {m.key!r}; check their transformations."
        raise InputError(msg)
    ids_by_tile = dict(work)
    for tile, block in _progress(m.data.read(list(ids_by_tile)), len(work), f"aggregate {m.key}", show):
        shapes_sum(block, (tile[0], tile[2]), geometry, ids_by_tile[tile], out, wout, channels=m.data.chan)
    keep = wout > 0
    if not keep.any():
        msg = f"No shape of {shapes_key!r} meets {m.key!r}; check their transformations."
        raise InputError(msg)
    index = sdata.shapes[shapes_key].index.to_numpy()
    obs = {
        Keys.instance_key: index[keep],
        "n_pixels": wout[keep],
        "area_um2": wout[keep] * m.px_area_um2 if m.px_area_um2 else np.full(int(keep.sum()), np.nan),
        "spatial": centres[keep],
    }
    return out[keep], obs


def _compact_labels(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Sorted non-zero label ids, and the image and lookup table :func:`labels_sum` reads.

    ``(ids, lab, lut)`` for dense non-negative ids (the image as it is, no copy); ``(ids, compact, None)`` otherwise
    (an int64 index image, -1 for background).
    """
    dense = label_lut(lab)
    if dense is not None:
        uniq, lut = dense
        return uniq.astype(lab.dtype), lab, lut
    uniq, inv = np.unique(lab, return_inverse=True)
    compact = inv.reshape(lab.shape).astype(np.int64)
    if uniq[0] == 0:
        compact -= 1
        uniq = uniq[1:]
    return uniq, compact, None


def _label_image(lab: Any) -> Any:
    """The label image in memory without a copy where its dask chunks are arrays (one, or views of one)."""
    chunks = _memory_chunks(lab)
    if chunks is None:
        return lab
    if len(chunks) == 1 and len(chunks[0]) == 1:
        return chunks[0][0]
    whole = _whole_view(chunks, tuple(int(v) for v in lab.shape))
    return whole if whole is not None else lab


def _labels(
    sdata: SpatialData, m: _Map, labels_key: str, block_bytes: int, show: bool | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    if labels_key not in sdata.labels:
        msg = f"No labels {labels_key!r} in the SpatialData; available labels: {sorted(sdata.labels)}."
        raise KeyError(msg)
    lab = _label_image(scale_levels(sdata.labels[labels_key])[0].data)
    aff = affine_between(sdata, labels_key, m.key)
    if not _axis_aligned(aff):
        msg = (
            f"{labels_key!r} is rotated or flipped relative to {m.key!r}; resample it onto the map's grid "
            "(e.g. spatialdata.transform) before aggregating."
        )
        raise InputError(msg)
    sx, tx, sy, ty = aff[0, 0], aff[0, 2], aff[1, 1], aff[1, 2]
    n_c, ny, nx = (int(v) for v in m.data.shape)
    nly, nlx = (int(v) for v in lab.shape)
    tiles = m.data.tiles(block_bytes)
    parts_ids, parts_sums, parts_geom = [], [], []
    for (y0, y1, x0, x1), block in _progress(m.data.read(tiles), len(tiles), f"aggregate {m.key}", show):
        ly0 = max(0, math.floor((y0 - ty) / sy))
        ly1 = min(nly, math.ceil((y1 - ty) / sy))
        lx0 = max(0, math.floor((x0 - tx) / sx))
        lx1 = min(nlx, math.ceil((x1 - tx) / sx))
        if ly1 <= ly0 or lx1 <= lx0:
            continue
        lab_block = lab[ly0:ly1, lx0:lx1]
        lab_block = np.asarray(lab_block.compute() if _is_dask(lab_block) else lab_block)
        uniq, compact, lut = _compact_labels(lab_block)
        if uniq.size == 0:
            continue
        ey = sy * np.arange(ly0, ly1 + 1, dtype=np.float64) + ty - y0
        ex = sx * np.arange(lx0, lx1 + 1, dtype=np.float64) + tx - x0
        sums, geom = labels_sum(block, compact, ey, ex, uniq.size, channels=m.data.chan, lut=lut)
        geom[1] += x0 * geom[0]
        geom[2] += y0 * geom[0]
        parts_ids.append(uniq)
        parts_sums.append(sums.T)
        parts_geom.append(geom.T)
    if not parts_ids:
        msg = f"No label of {labels_key!r} meets {m.key!r}; check their transformations."
        raise InputError(msg)
    ids = np.concatenate(parts_ids)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    sums = np.add.reduceat(np.concatenate(parts_sums)[order], starts, axis=0)
    geom = np.add.reduceat(np.concatenate(parts_geom)[order], starts, axis=0)
    ids = ids[starts]
    keep = geom[:, 0] > 0
    ids, sums, geom = ids[keep], sums[keep], geom[keep]
    if ids.size == 0:
        msg = f"No label of {labels_key!r} meets {m.key!r}; check their transformations."
        raise InputError(msg)
    centre_map = geom[:, 1:] / geom[:, :1]
    centres = apply_affine(np.linalg.inv(aff), centre_map)
    obs = {
        Keys.instance_key: ids,
        "n_pixels": geom[:, 0],
        "area_um2": geom[:, 0] * m.px_area_um2 if m.px_area_um2 else np.full(ids.size, np.nan),
        "spatial": centres,
    }
    return sums, obs
