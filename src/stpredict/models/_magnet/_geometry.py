"""Geometry and graph construction for MagNet (SPEC.md §3.1, §3.6, §3.8): pure numpy/scipy, no torch.

Conventions
-----------
- Positions are ``(x, y) = (column, row)`` in pixels of the model's resolution unless a name says otherwise. A pixel
  ``(row i, col j)`` covers ``[j, j + 1) × [i, i + 1)``.
- Bin and cell grids are anchored at the image origin ``(0, 0)`` unless an origin is given; every interval is
  half-open, so a point on a boundary belongs to the cell on its right / below.
- Edge indices follow torch_geometric's ``source_to_target`` flow: ``edge_index[0]`` is the source (the neighbour
  whose message is sent), ``edge_index[1]`` the target (the node that aggregates).

The kNN graphs use :class:`scipy.spatial.cKDTree` rather than ``torch_cluster.knn_graph``: torch_cluster is a compiled
extension that stpredict does not depend on, and the graphs here are small (a mini-batch of bins, the tiles of one
slide). Ties, which are everywhere on grids, are broken by an explicit rule (distance, then smaller index), so the
result never depends on the tree's traversal order.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from stpredict._errors import InputError

__all__ = [
    "cell_of",
    "crop_origins",
    "grid_indices",
    "isolated_nodes",
    "knn_edges",
    "neighbour_tokens",
    "symmetric_knn_edges",
    "window_bins",
]

#: Distances are compared after rounding to this fraction of the point cloud's bounding-box diagonal.
_DIST_RESOLUTION = 1e-9
_GRID_FIX = (
    "MagNet needs bins on a regular square grid of the model's bin size; make them with "
    "`st.pp.bin_counts(sdata, bin_size=<bin_um>)` from the 2 µm bins"
)


def _as_points(pos: np.ndarray, name: str, dim: int | None = None) -> np.ndarray:
    """Validate a ``(n, d)`` array of finite coordinates and return it as float64."""
    arr = np.asarray(pos, dtype=np.float64)
    if arr.ndim != 2 or (dim is not None and arr.shape[1] != dim):
        shape = f"(n, {dim})" if dim is not None else "(n, d)"
        msg = f"`{name}` must have shape {shape}, found {arr.shape}. Pass one row per point, e.g. `np.c_[x, y]`."
        raise InputError(msg)
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        msg = f"`{name}` has {bad} row(s) with NaN or infinite coordinates. Drop or fix those points first."
        raise InputError(msg)
    return arr


def _distance_keys(pos: np.ndarray, targets: np.ndarray, cand: np.ndarray, scale: float) -> np.ndarray:
    """Integer distance keys: ``rint(|pos[cand] - pos[target]| / scale / resolution)``."""
    diff = pos[cand] - pos[targets][:, None, :]
    dist = np.sqrt((diff * diff).sum(axis=-1))
    return np.rint(dist / (scale * _DIST_RESOLUTION)).astype(np.int64)


def _distance_scale(pos: np.ndarray) -> float:
    """Bounding-box diagonal of a point cloud (1 when all points coincide)."""
    diag = float(np.sqrt(((pos.max(axis=0) - pos.min(axis=0)) ** 2).sum()))
    return diag if diag > 0 else 1.0


def knn_edges(pos: np.ndarray, k: int) -> np.ndarray:
    """Directed k-nearest-neighbour graph.

    For every node ``i``, edges arrive from its ``min(k, n - 1)`` nearest *other* nodes ``j`` (Euclidean distance on
    ``pos``); there are no self-loops, and coincident points count as neighbours at distance 0. This is the authors'
    ``calcADJ`` bin graph (SPEC.md §3.6) in edge-list form.

    Ties are broken deterministically: neighbours are ranked by distance rounded to ``1e-9`` of the bounding-box
    diagonal of ``pos`` (so distances that differ only by floating-point noise count as equal), then by smaller ``j``.

    Parameters
    ----------
    pos
        ``(n, d)`` node coordinates.
    k
        Number of neighbours per node (``k >= 0``); fewer when ``n - 1 < k``.

    Returns
    -------
    ``(2, E)`` int64 edge index with ``E = n · min(k, n - 1)``: row 0 the source ``j`` (the neighbour), row 1 the target
    ``i``. Edges are sorted by target, then by (rounded distance, source). ``n <= 1`` gives shape ``(2, 0)``.
    """
    pos = _as_points(pos, "pos")
    if int(k) != k or k < 0:
        msg = f"`k` must be a non-negative integer, found {k!r}. MagNet uses `k=8`."
        raise InputError(msg)
    n = pos.shape[0]
    kk = min(int(k), n - 1)
    if n <= 1 or kk <= 0:
        return np.zeros((2, 0), dtype=np.int64)

    tree = cKDTree(pos)
    scale = _distance_scale(pos)
    src = np.empty((n, kk), dtype=np.int64)
    todo = np.arange(n)
    n_query = min(n, kk + 2)
    while todo.size:
        # Query a few more candidates than needed; rows whose last candidate may tie with the k-th neighbour are
        # re-queried with twice as many, so every point that could rank within the first k is considered.
        dist, cand = tree.query(pos[todo], k=n_query)
        dist, cand = dist.reshape(todo.size, n_query), cand.reshape(todo.size, n_query)
        keys = _distance_keys(pos, todo, cand, scale)
        keys[cand == todo[:, None]] = np.iinfo(np.int64).max  # self last, never selected
        order = np.lexsort((cand, keys), axis=-1)
        cand_sorted = np.take_along_axis(cand, order, axis=-1)
        kth_key = np.take_along_axis(keys, order[:, kk - 1 : kk], axis=-1)[:, 0]
        last = dist[:, -1] / (scale * _DIST_RESOLUTION)  # points not returned are at least this far
        done = (n_query >= n) | (last > kth_key + 1.5)
        src[todo[done]] = cand_sorted[done, :kk]
        todo = todo[~done]
        n_query = min(n, 2 * n_query)
    dst = np.repeat(np.arange(n, dtype=np.int64), kk)
    return np.stack([src.ravel(), dst])


def symmetric_knn_edges(pos: np.ndarray, k: int) -> np.ndarray:
    """Undirected, binarised kNN graph: the authors' 224- and 512-tile graphs (SPEC.md §3.6).

    The directed :func:`knn_edges` united with its reverse, each pair kept once per direction, no self-loops: what
    ``networkx.Graph`` + ``edge_index_to_adj_matrix`` produce in ``data_preprocessing/5_HD_graph_construction.py``.

    Parameters
    ----------
    pos
        ``(n, d)`` node coordinates (the tile grid indices in the original code).
    k
        Neighbours per node before symmetrisation; MagNet uses 8.

    Returns
    -------
    ``(2, E)`` int64 edge index (row 0 source, row 1 target) containing ``(j, i)`` iff it contains ``(i, j)``, sorted
    lexicographically by (target, source).
    """
    pos = _as_points(pos, "pos")
    n = pos.shape[0]
    edges = knn_edges(pos, k)
    both = np.concatenate([edges, edges[::-1]], axis=1)
    both = both[:, both[0] != both[1]]
    code = np.unique(both[1] * np.int64(n) + both[0])
    return np.stack([code % n, code // n]).astype(np.int64)


def isolated_nodes(edge_index: np.ndarray, n: int) -> np.ndarray:
    """Nodes with no incoming edge.

    Parameters
    ----------
    edge_index
        ``(2, E)`` edge index, row 1 the targets.
    n
        Number of nodes.

    Returns
    -------
    Sorted int64 ids in ``[0, n)`` that never appear in ``edge_index[1]``.
    """
    edge_index = np.asarray(edge_index)
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        msg = f"`edge_index` must have shape (2, E), found {edge_index.shape}. Pass it as `np.stack([src, dst])`."
        raise InputError(msg)
    has_in = np.zeros(n, dtype=bool)
    has_in[edge_index[1].astype(np.int64)] = True
    return np.flatnonzero(~has_in).astype(np.int64)


def _grid_axis(c: np.ndarray, pitch: float) -> tuple[np.ndarray, float]:
    """Origin in ``[0, pitch)`` and integer indices of 1-D coordinates ``c = origin + (idx + 0.5) · pitch``."""
    phase = 2 * np.pi * (c / pitch - 0.5)
    angle = np.arctan2(np.sin(phase).mean(), np.cos(phase).mean())
    x0 = (angle / (2 * np.pi)) % 1.0 * pitch
    idx = np.rint((c - x0) / pitch - 0.5)
    x0 += float(np.mean(c - (x0 + (idx + 0.5) * pitch)))  # least-squares refinement given the indices
    shift = np.floor(x0 / pitch)
    x0 -= shift * pitch
    idx += shift
    if x0 >= pitch * (1 - 1e-9):  # rounding noise just below the next grid line: wrap to 0
        x0 -= pitch
        idx += 1
    if abs(x0) <= pitch * 1e-9:
        x0 = 0.0
    return idx.astype(np.int64), float(x0)


def grid_indices(
    centers: np.ndarray, pitch: float, *, tol: float = 0.1
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Find the axis-aligned regular grid that bin centres lie on.

    The centres must satisfy ``x = x0 + (col + 0.5) · pitch`` and ``y = y0 + (row + 0.5) · pitch`` up to ``tol ·
    pitch``. The origin ``(x0, y0)``, with ``0 <= x0, y0 < pitch``, is estimated robustly as the circular mean of the
    centres' phases modulo ``pitch`` and then refined by least squares.

    Parameters
    ----------
    centers
        ``(n, 2)`` bin centres ``(x, y)`` in pixels.
    pitch
        Bin pitch (side) in pixels.
    tol
        Largest accepted distance of a centre from its grid position, as a fraction of ``pitch``.

    Returns
    -------
    rows
        int64 ``(n,)`` grid row of each bin (negative for bins above the origin cell).
    cols
        int64 ``(n,)`` grid column of each bin.
    origin
        ``(x0, y0)`` in pixels.

    Raises
    ------
    InputError
        When there are no bins, when a centre is off its grid position by more than ``tol · pitch``, or when two bins
        share a grid position.
    """
    centers = _as_points(centers, "centers", dim=2)
    if not pitch > 0:
        msg = f"`pitch` must be positive, found {pitch!r}. Pass the bin size in pixels of the model's resolution."
        raise InputError(msg)
    n = centers.shape[0]
    if n == 0:
        msg = f"There are no bins to place on a grid. {_GRID_FIX}."
        raise InputError(msg)
    cols, x0 = _grid_axis(centers[:, 0], pitch)
    rows, y0 = _grid_axis(centers[:, 1], pitch)
    ideal = np.stack([x0 + (cols + 0.5) * pitch, y0 + (rows + 0.5) * pitch], axis=1)
    off = np.sqrt(((centers - ideal) ** 2).sum(axis=1))
    bad = off > tol * pitch
    if bad.any():
        w = int(np.argmax(off))
        msg = (
            f"{int(bad.sum())} of {n} bin centres are more than {tol * pitch:g} px ({tol:g} × the pitch of {pitch:g} "
            f"px) off a regular grid; the worst, bin {w} at ({centers[w, 0]:g}, {centers[w, 1]:g}), is "
            f"{off[w]:.3g} px off its grid position. {_GRID_FIX}."
        )
        raise InputError(msg)
    code = (rows - rows.min()) * np.int64(cols.max() - cols.min() + 1) + (cols - cols.min())
    order = np.argsort(code, kind="stable")
    dup = np.flatnonzero(code[order][1:] == code[order][:-1])
    if dup.size:
        a, b = int(order[dup[0]]), int(order[dup[0] + 1])
        msg = (
            f"{dup.size} bin(s) share a grid position with another bin: e.g. bins {a} and {b} both sit at grid "
            f"(row {rows[a]}, col {cols[a]}), centres ({centers[a, 0]:g}, {centers[a, 1]:g}) and "
            f"({centers[b, 0]:g}, {centers[b, 1]:g}). {_GRID_FIX}."
        )
        raise InputError(msg)
    return rows, cols, (x0, y0)


def cell_of(xy: np.ndarray, cell: float, origin: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Cell of a non-overlapping square grid containing each point.

    ``floor((xy - origin) / cell)``: cells are half-open, so a point on a boundary goes to the cell on its right /
    below. These are the tile ids of SPEC.md §3.1 (``(x // 224, y // 224)``), computed from geometry instead of the
    authors' nearest-label-vector lookup (§3.8).

    Parameters
    ----------
    xy
        ``(n, 2)`` points ``(x, y)`` in pixels.
    cell
        Cell side in pixels.
    origin
        ``(x, y)`` of the top-left corner of cell ``(0, 0)``.

    Returns
    -------
    int64 ``(n, 2)`` ``(col, row)`` of each point's cell.
    """
    xy = _as_points(xy, "xy", dim=2)
    if not cell > 0:
        msg = f"`cell` must be positive, found {cell!r}. Pass the tile size in pixels, e.g. 224."
        raise InputError(msg)
    return np.floor((xy - np.asarray(origin, dtype=np.float64)) / cell).astype(np.int64)


def neighbour_tokens(cells: np.ndarray, table: np.ndarray, radius: int = 1) -> np.ndarray:
    """Indices of the cells around each query cell in a table of cells.

    Parameters
    ----------
    cells
        ``(n, 2)`` integer query cells ``(col, row)``.
    table
        ``(m, 2)`` unique integer cells ``(col, row)``, e.g. the kept tiles of a slide.
    radius
        Neighbourhood radius ``r`` in cells.

    Returns
    -------
    int64 ``(n, (2r + 1)²)``: for each query, the row in ``table`` of the cell at ``(col + dcol, row + drow)``, in
    row-major order over ``(drow, dcol)`` from ``-r`` to ``r`` (the query cell itself at index ``(2r + 1)² // 2``);
    ``-1`` where that cell is not in ``table``.
    """
    cells = np.asarray(cells)
    table = np.asarray(table)
    for name, arr in (("cells", cells), ("table", table)):
        if arr.ndim != 2 or arr.shape[1] != 2 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            msg = f"`{name}` must be an integer array of shape (n, 2) (col, row), found {arr.dtype} {arr.shape}."
            raise InputError(msg)
    if int(radius) != radius or radius < 0:
        msg = f"`radius` must be a non-negative integer, found {radius!r}."
        raise InputError(msg)
    r = int(radius)
    side = 2 * r + 1
    d = np.arange(-r, r + 1, dtype=np.int64)
    drow, dcol = np.repeat(d, side), np.tile(d, side)
    out = np.full((cells.shape[0], side * side), -1, dtype=np.int64)
    if cells.shape[0] == 0 or table.shape[0] == 0:
        return out
    cells = cells.astype(np.int64)
    table = table.astype(np.int64)
    qc = cells[:, 0:1] + dcol
    qr = cells[:, 1:2] + drow
    # Encode (col, row) as one int64 over the joint bounding box, then look the queries up by binary search.
    cmin = min(int(table[:, 0].min()), int(qc.min()))
    rmin = min(int(table[:, 1].min()), int(qr.min()))
    width = max(int(table[:, 0].max()), int(qc.max())) - cmin + 1
    height = max(int(table[:, 1].max()), int(qr.max())) - rmin + 1
    if width * height >= 2**62:
        msg = "Cell coordinates span too large a range to index. Pass cells relative to the slide, e.g. tile ids."
        raise InputError(msg)
    tkey = (table[:, 1] - rmin) * width + (table[:, 0] - cmin)
    order = np.argsort(tkey, kind="stable")
    skey = tkey[order]
    if skey.size > 1 and (dups := np.flatnonzero(skey[1:] == skey[:-1])).size:
        i = int(order[dups[0]])
        msg = (
            f"`table` has {dups.size} repeated cell(s), e.g. (col {table[i, 0]}, row {table[i, 1]}). "
            "Pass unique cells, e.g. `np.unique(cells, axis=0)`."
        )
        raise InputError(msg)
    qkey = (qr - rmin) * width + (qc - cmin)
    pos = np.searchsorted(skey, qkey).clip(max=skey.size - 1)
    hit = skey[pos] == qkey
    out[hit] = order[pos[hit]]
    return out


def _axis_range(lo: float, hi: float, origin: float, pitch: float) -> tuple[np.ndarray, np.ndarray]:
    """Grid indices whose centres ``origin + (idx + 0.5) · pitch`` lie in ``[lo, hi)``, and those centres."""
    first = int(np.ceil((lo - origin) / pitch - 0.5)) - 1
    last = int(np.ceil((hi - origin) / pitch - 0.5)) + 1
    idx = np.arange(first, max(first, last) + 1, dtype=np.int64)
    centre = origin + (idx + 0.5) * pitch
    keep = (centre >= lo) & (centre < hi)
    return idx[keep], centre[keep]


def window_bins(
    core: tuple[float, float, float, float], origin: tuple[float, float], pitch: float, halo: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grid positions of a spatially contiguous mini-batch: a core rectangle and a halo around it.

    A better batch than the authors' shuffled one (SPEC.md §3.6, pitfall 9): the bin graph of a window connects bins
    that are spatial neighbours, and the halo gives the core bins their full neighbourhood; only the core bins are
    supervised.

    Parameters
    ----------
    core
        ``(x0, y0, x1, y1)``: the half-open rectangle ``[x0, x1) × [y0, y1)`` in pixels.
    origin
        ``(x, y)`` origin of the bin grid, as returned by :func:`grid_indices`.
    pitch
        Bin pitch in pixels.
    halo
        Margin in pixels added on each side of ``core``.

    Returns
    -------
    rows
        int64 grid rows of every grid position whose centre ``origin + (idx + 0.5) · pitch`` lies in the rectangle
        grown by ``halo``.
    cols
        int64 grid columns of the same positions.
    in_core
        bool, whether the centre lies in ``core`` itself.

    Positions are in row-major order (by row, then column).
    """
    x0, y0, x1, y1 = (float(v) for v in core)
    if not pitch > 0:
        msg = f"`pitch` must be positive, found {pitch!r}. Pass the bin size in pixels."
        raise InputError(msg)
    if not halo >= 0:
        msg = f"`halo` must be non-negative, found {halo!r}. Pass a margin in pixels, e.g. 0 for none."
        raise InputError(msg)
    ci, cx = _axis_range(x0 - halo, x1 + halo, float(origin[0]), pitch)
    ri, cy = _axis_range(y0 - halo, y1 + halo, float(origin[1]), pitch)
    rows, cols = np.repeat(ri, ci.size), np.tile(ci, ri.size)
    in_x = (cx >= x0) & (cx < x1)
    in_y = (cy >= y0) & (cy < y1)
    in_core = np.repeat(in_y, ci.size) & np.tile(in_x, ri.size)
    return rows, cols, in_core


def crop_origins(centers: np.ndarray, size: int) -> np.ndarray:
    """Top-left pixel of a square crop centred on each point.

    ``floor(centre - size / 2 + 0.5)``: the crop covers pixels ``[x, x + size) × [y, y + size)``. For a bin of
    integer pitch ``p`` on a grid with an integer origin, the centre is a multiple of 0.5 and the crop is exactly
    centred on the bin when ``size - p`` is even (e.g. 112-px crops around 8- or 16-px bins); when it is odd, the
    crop's centre sits half a pixel right of / below the bin centre.

    Parameters
    ----------
    centers
        ``(n, 2)`` crop centres ``(x, y)`` in pixels.
    size
        Crop side in pixels, e.g. 112 for MagNet's bin level.

    Returns
    -------
    int64 ``(n, 2)`` ``(x, y)`` of each crop's top-left pixel.
    """
    centers = _as_points(centers, "centers", dim=2)
    if int(size) != size or size < 1:
        msg = f"`size` must be a positive integer number of pixels, found {size!r}. MagNet's bin crops use 112."
        raise InputError(msg)
    return np.floor(centers - size / 2 + 0.5).astype(np.int64)
