"""Aggregate any image with channels (dense maps, ground truth, H&E) into an AnnData table.

Three kinds of units, all with exact pixel-area weights (each pixel counts by the area it shares with the unit):

* square bins of any size in µm on a grid defined in the ``"um"`` coordinate system (see :class:`Grid`),
* circles and polygons of a shapes element,
* the labels of a labels element at any resolution.

Value semantics (``reduce``)
    ``"mean"``: the area-weighted mean ``Σ v·a / Σ a`` over the pixels of the map, ``a`` being the area each
    pixel shares with the unit. ``"sum"``: the integral of the map over the unit. For a map declared
    ``"density"`` (expected counts per µm²) it is ``Σ v·a`` with ``a`` in µm², i.e. expected counts in the unit;
    for a map with no declared kind it is ``Σ v·a`` with ``a`` in pixels (a plain pixel sum, like
    ``spatialdata.aggregate``). ``uns["stpredict"]["sum_unit"]`` records which.

Reading the map
    A map held in memory is read where it is: ``Image2DModel.parse`` of a numpy array gives a dask array whose
    chunks are views of that array, so the kernels run once over the array itself (no copy, no dask task); chunks
    that are separate in-memory arrays are passed to the kernels one by one, as they are. Any other dask array
    (zarr-backed, computed lazily) is read in chunk-aligned blocks of at most ``block_bytes``, the next block
    computed in a background thread while the kernels work on the current one.

Pyramids
    Only the full-resolution level is read: spatialdata builds coarser levels by resampling, which is not the
    exact area mean, so no coarser level gives a result identical to the finest one.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import (
    affine_between,
    apply_affine,
    get_element,
    scale_levels,
    to_um_affine,
    transformation_matrix,
)
from stpredict._keys import Attrs, Keys
from stpredict._logging import get_logger
from stpredict._meta import get_element_meta
from stpredict._settings import settings
from stpredict.kernels import (
    axis_table,
    decimal_names,
    gather_units,
    label_lut,
    labels_sum,
    rect_sum,
    rect_sum_units,
    shapes_sum,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import geopandas as gpd
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["ID_STRIDE", "Grid", "aggregate", "bins_geodataframe", "grid_from_args", "grid_transformations"]

logger = get_logger(__name__)

#: Default memory for one block of the map read at a time.
BLOCK_BYTES = 128 * 2**20
_AXIS_TOL = 1e-9

#: Instance id of bin (r, k) is ``r * ID_STRIDE + k``.
ID_STRIDE = 10**7


@dataclass(frozen=True)
class Grid:
    """A square grid in µm: bin size and the origin reduced into ``(-size, 0]``."""

    size: float
    x0: float
    y0: float

    @classmethod
    def make(cls, size: float, origin: tuple[float, float] = (0.0, 0.0)) -> Grid:
        """Grid of ``size`` µm through ``origin`` (µm); the origin is reduced modulo ``size``."""
        size = float(size)

        def reduce(o: float) -> float:
            q = o / size
            if abs(q - round(q)) < 1e-9:  # on the lattice up to float noise
                return 0.0
            return o - math.ceil(q) * size

        return cls(size, reduce(float(origin[0])), reduce(float(origin[1])))

    def index_range(self, lo: float, hi: float, axis: str) -> tuple[int, int]:
        """Bin indices ``[k0, k1)`` along ``axis`` ("x"/"y") that meet the µm interval ``[lo, hi)``."""
        o = self.x0 if axis == "x" else self.y0
        return max(0, math.floor((lo - o) / self.size + 1e-9)), max(0, math.ceil((hi - o) / self.size - 1e-9))

    def edges(self, k0: int, k1: int, axis: str) -> np.ndarray:
        """µm edges of bins ``k0 … k1-1`` (``k1 - k0 + 1`` values)."""
        o = self.x0 if axis == "x" else self.y0
        return o + self.size * np.arange(k0, k1 + 1, dtype=np.float64)

    def assign(self, x_um: np.ndarray, y_um: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(array_row, array_col)`` of the bins holding points at ``(x_um, y_um)`` (a point on an edge goes up)."""
        col = np.floor((np.asarray(x_um) - self.x0) / self.size).astype(np.int64)
        row = np.floor((np.asarray(y_um) - self.y0) / self.size).astype(np.int64)
        return row, col

    def ids(self, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Instance ids of bins; raises where an index falls outside ``[0, ID_STRIDE)``."""
        row, col = np.asarray(row, dtype=np.int64), np.asarray(col, dtype=np.int64)
        if row.size and (row.min() < 0 or col.min() < 0 or col.max() >= ID_STRIDE or row.max() >= ID_STRIDE):
            msg = (
                "Some units lie at negative µm coordinates (before the grid origin) or more than "
                f"{ID_STRIDE} bins away; bins are numbered from the image corner. Check the transformations."
            )
            raise InputError(msg)
        return row * ID_STRIDE + col

    def params(self) -> dict[str, Any]:
        """JSON-serialisable description, stored in ``uns``."""
        return {"bin_size_um": self.size, "origin_um": [self.x0, self.y0], "id_stride": ID_STRIDE}


def _grid_origin_from_shapes(sdata: SpatialData, key: str) -> tuple[float, float]:
    """Origin (µm) of an existing axis-aligned grid of square bins or circles stored as shapes ``key``."""
    import shapely

    shapes = sdata.shapes[key]
    if len(shapes) == 0:
        msg = f"Shapes {key!r} are empty; `align_to` needs an existing grid of bins."
        raise InputError(msg)
    to_um = to_um_affine(sdata, key)
    geoms = shapes.geometry.to_numpy()
    if "radius" in shapes.columns and (shapes.geometry.geom_type == "Point").all():
        um = apply_affine(to_um, shapely.get_coordinates(geoms))
        xs = np.unique(np.round(um[:, 0], 6))
        pitch = float(np.median(np.diff(xs))) if xs.size > 1 else None
    else:
        # bounding-box centres: the centroids of square bins (also rotated ones), without shapely's centroid pass
        # (1.3 s for 2.25 million boxes)
        b = shapely.bounds(geoms)
        lo, hi = apply_affine(to_um, b[:, :2]), apply_affine(to_um, b[:, 2:])
        um = (lo + hi) / 2
        pitch = float(np.median(np.abs(hi[:, 0] - lo[:, 0])))
    if not pitch or pitch <= 0:
        msg = f"Cannot find the pitch of the grid {key!r}; pass `origin_um=(x0, y0)` instead of `align_to`."
        raise InputError(msg)
    fx = (um[:, 0] / pitch) - np.round(um[:, 0] / pitch)
    fy = (um[:, 1] / pitch) - np.round(um[:, 1] / pitch)
    # the centres sit on a lattice offset by a common fraction of the pitch when the grid is axis-aligned
    dx = fx - np.median(fx)
    dy = fy - np.median(fy)
    dx, dy = (d - np.round(d) for d in (dx, dy))
    if np.abs(dx).max() > 0.01 or np.abs(dy).max() > 0.01:
        msg = (
            f"The units of {key!r} are not on an axis-aligned square lattice in µm (for example a Visium HD grid "
            "registered with a rotation), so square bins cannot match them one to one. Aggregate onto their "
            f"shapes with `shapes_key={key!r}` instead, or pass `origin_um`."
        )
        raise InputError(msg)
    i = int(np.argmin(um[:, 0] + um[:, 1]))
    return float(um[i, 0] - pitch / 2), float(um[i, 1] - pitch / 2)


def grid_from_args(
    sdata: SpatialData,
    bin_size: float,
    origin_um: tuple[float, float] | None,
    align_to: str | None,
) -> Grid:
    """Validate the grid arguments and build the :class:`Grid`."""
    if isinstance(bin_size, bool) or not isinstance(bin_size, int | float | np.number) or not np.isfinite(bin_size):
        msg = f"bin_size must be a positive number of µm, got {bin_size!r}."
        raise InputError(msg)
    if bin_size <= 0:
        msg = f"bin_size must be positive (µm), got {bin_size!r}."
        raise InputError(msg)
    if origin_um is not None and align_to is not None:
        msg = "Pass either `origin_um` or `align_to`, not both."
        raise InputError(msg)
    if align_to is not None:
        if align_to not in sdata.shapes:
            msg = f"No shapes {align_to!r} to align the grid to; available shapes: {sorted(sdata.shapes)}."
            raise KeyError(msg)
        origin_um = _grid_origin_from_shapes(sdata, align_to)
    if origin_um is not None:
        origin = tuple(float(v) for v in origin_um)
        if len(origin) != 2 or not all(np.isfinite(origin)):
            msg = f"origin_um must be two finite numbers (x, y) in µm, got {origin_um!r}."
            raise InputError(msg)
    else:
        origin = (0.0, 0.0)
    return Grid.make(float(bin_size), origin)


def bins_geodataframe(grid: Grid, row: np.ndarray, col: np.ndarray, ids: np.ndarray) -> gpd.GeoDataFrame:
    """Square polygons of the bins in µm, indexed by instance id (built vectorised with ``shapely.box``)."""
    import geopandas as gpd
    import shapely

    x0 = grid.x0 + grid.size * np.asarray(col, dtype=np.float64)
    y0 = grid.y0 + grid.size * np.asarray(row, dtype=np.float64)
    geometry = shapely.box(x0, y0, x0 + grid.size, y0 + grid.size)
    return gpd.GeoDataFrame(geometry=geometry, index=np.asarray(ids))


def grid_transformations(sdata: SpatialData, reference_key: str) -> dict[str, Any]:
    """Transformations for an element in µm intrinsic coordinates placed like ``reference_key``.

    ``"um"`` gets the identity; every other coordinate system of the reference gets its transformation composed
    with the inverse of the reference's µm affine.
    """
    from spatialdata.transformations import Affine, Identity, get_transformation

    from stpredict._settings import settings

    to_um = to_um_affine(sdata, reference_key)
    out: dict[str, Any] = {settings.um_coordinate_system: Identity()}
    for cs, t in get_transformation(get_element(sdata, reference_key), get_all=True).items():
        if cs == settings.um_coordinate_system:
            continue
        out[cs] = Affine(transformation_matrix(t) @ np.linalg.inv(to_um), input_axes=("x", "y"), output_axes=("x", "y"))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Map access, block by block


def _float_block(block: Any) -> np.ndarray:
    arr = np.asarray(block)
    if arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float32)
    return np.ascontiguousarray(arr)


def _is_dask(data: Any) -> bool:
    return hasattr(data, "dask") and hasattr(data, "chunks")


def _col_blocks(nx: int, cw: int, rows: int, n_c: int, itemsize: int, block_bytes: int) -> list[tuple[int, int]]:
    """Column ranges of whole chunk columns (or parts of one) with ``n_c·rows·w·itemsize <= block_bytes``."""
    per_col = n_c * rows * itemsize
    w = max(1, block_bytes // max(per_col, 1))
    w = (w // cw) * cw if w >= cw else max(min(64, nx), w)
    return [(x, min(nx, x + w)) for x in range(0, nx, w)]


def _tiles(shape: tuple[int, int, int], itemsize: int, chunks: Any, block_bytes: int) -> list[tuple[int, ...]]:
    """Tiles ``(y0, y1, x0, x1)`` of the raster with ``c·h·w·itemsize <= block_bytes``, aligned to dask chunks."""
    n_c, ny, nx = shape
    if n_c * ny * nx * itemsize <= block_bytes:
        return [(0, ny, 0, nx)]
    ch = int(chunks[1][0]) if chunks is not None else ny
    cw = int(chunks[2][0]) if chunks is not None else nx
    if n_c * ch * itemsize * min(cw, nx) <= block_bytes:
        h = ch * max(1, int(block_bytes // (n_c * ch * itemsize * nx)))  # whole chunk rows when they fit
    else:
        h = max(1, min(ch, int(math.sqrt(block_bytes / (n_c * itemsize)))))
    tiles = []
    for y in range(0, ny, h):
        y1 = min(ny, y + h)
        tiles += [(y, y1, x0, x1) for x0, x1 in _col_blocks(nx, cw, y1 - y, n_c, itemsize, block_bytes)]
    return tiles


def _memory_chunks(data: Any) -> list[list[np.ndarray]] | None:
    """The chunks of ``data`` ((c,) y, x) when they are numpy arrays held in its dask graph, else None.

    ``Image2DModel.parse`` (and ``dask.array.from_array``) of an in-memory array stores each chunk as an array in a
    materialised graph layer: reading them there runs no task and copies nothing. A plain numpy array is one chunk.
    A ``(c, y, x)`` array qualifies only with one chunk along ``c``.
    """
    if isinstance(data, np.ndarray):
        return [[data]]
    if not _is_dask(data) or data.ndim not in (2, 3) or (data.ndim == 3 and len(data.chunks[0]) != 1):
        return None
    from dask.highlevelgraph import MaterializedLayer

    graph = data.__dask_graph__()
    layer = getattr(graph, "layers", {}).get(data.name)
    if not isinstance(layer, MaterializedLayer):  # tasks (zarr reads, map_blocks, slicing) run through dask
        return None
    try:
        from dask._task_spec import DataNode
    except ImportError:  # pragma: no cover - older dask keeps the arrays themselves in the graph
        DataNode = None
    lead = (0,) if data.ndim == 3 else ()
    out = []
    for iy, h in enumerate(data.chunks[-2]):
        row = []
        for ix, w in enumerate(data.chunks[-1]):
            value = layer.get((data.name, *lead, iy, ix))
            if DataNode is not None and isinstance(value, DataNode):
                value = value.value
            if not isinstance(value, np.ndarray) or value.shape != (*data.shape[:-2], h, w):
                return None
            row.append(value)
        out.append(row)
    return out


def _root_array(a: np.ndarray) -> np.ndarray:
    """The array that owns the memory ``a`` views (``a`` itself when it owns it)."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _whole_view(chunks: list[list[np.ndarray]], shape: tuple[int, ...]) -> np.ndarray | None:
    """The C-contiguous array of which the chunks are exactly the tiles, when they are views of one, else None.

    ``dask.array.from_array`` slices views out of the array it is given; one kernel call over that array reads it
    once, with no copy (each view alone is not contiguous, so the kernels would copy it).
    """
    first = chunks[0][0]
    strides, dtype = first.strides, first.dtype
    p0 = first.__array_interface__["data"][0]
    root = _root_array(first)
    y = 0
    for row in chunks:
        x = 0
        for b in row:
            if (
                b.dtype != dtype
                or b.strides != strides
                or b.__array_interface__["data"][0] != (p0 + y * strides[-2] + x * strides[-1])
            ):
                return None
            if _root_array(b) is not root:
                return None
            x += b.shape[-1]
        y += row[0].shape[-2]
    whole = np.lib.stride_tricks.as_strided(first, shape=shape, strides=strides, writeable=False)
    return whole if whole.flags.c_contiguous else None


@dataclass
class _Raster:
    """A ``(c, y, x)`` raster read block by block: in-memory chunks as they are, anything else through dask.

    ``data`` is the raster with the selected channels (shape and dtype); ``chunks`` the in-memory chunks with all
    channels, ``chan`` the channels of a block to aggregate (the selection for in-memory chunks, all otherwise).
    """

    data: Any
    chunks: list[list[np.ndarray]] | None
    chan: np.ndarray
    y_bounds: np.ndarray
    x_bounds: np.ndarray

    @classmethod
    def of(cls, data: Any, index: np.ndarray | None = None) -> _Raster:
        """Raster of ``data`` (all channels) restricted to channels ``index`` (default all)."""
        n_c = int(data.shape[0])
        all_channels = index is None or np.array_equal(index, np.arange(n_c))
        # in-memory chunks are used as they are only when the kernels can read them (float): any other dtype is
        # converted block by block through dask, so the float copy stays within block_bytes
        chunks = _memory_chunks(data) if data.dtype in (np.float32, np.float64) else None
        if chunks is None and _is_dask(data) and data.npartitions == 1:  # one chunk is read whole on any access
            chunks = [[np.asarray(data.compute())]]
        if chunks is not None and (len(chunks) > 1 or len(chunks[0]) > 1):
            whole = _whole_view(chunks, tuple(int(v) for v in data.shape))
            chunks = [[whole]] if whole is not None else chunks
        selected = data if all_channels else data[index]
        if chunks is not None:
            chan = np.arange(n_c) if all_channels else np.asarray(index, dtype=np.int64)
            y_b = np.r_[0, np.cumsum([row[0].shape[1] for row in chunks])]
            x_b = np.r_[0, np.cumsum([b.shape[2] for b in chunks[0]])]
            return cls(selected, chunks, chan.astype(np.int64), y_b.astype(np.int64), x_b.astype(np.int64))
        if _is_dask(selected):
            y_b, x_b = (np.r_[0, np.cumsum(c)].astype(np.int64) for c in selected.chunks[1:])
        else:
            y_b, x_b = np.array([0, selected.shape[1]]), np.array([0, selected.shape[2]])
        return cls(selected, None, np.arange(selected.shape[0], dtype=np.int64), y_b, x_b)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.data.shape)

    def in_memory_whole(self) -> np.ndarray | None:
        """The raster as one float array in memory (all channels, read where it is), or None."""
        if self.chunks is None or self.y_bounds.size != 2 or self.x_bounds.size != 2:
            return None
        return self.chunks[0][0]

    def tiles(self, block_bytes: int, rows: tuple[int, int] | None = None) -> list[tuple[int, ...]]:
        """Tiles ``(y0, y1, x0, x1)``: the in-memory chunks, else chunk-aligned tiles of at most ``block_bytes``.

        ``rows`` restricts them to one band of chunk rows.
        """
        n_c, ny, nx = self.shape
        if self.chunks is not None:
            y_b, x_b = self.y_bounds, self.x_bounds
            return [
                (int(y_b[i]), int(y_b[i + 1]), int(x_b[j]), int(x_b[j + 1]))
                for i in range(y_b.size - 1)
                if rows is None or (y_b[i] >= rows[0] and y_b[i + 1] <= rows[1])
                for j in range(x_b.size - 1)
            ]
        itemsize = 8 if self.data.dtype == np.float64 else 4
        if rows is None:
            return _tiles((n_c, ny, nx), itemsize, self.data.chunks if _is_dask(self.data) else None, block_bytes)
        cw = int(self.data.chunks[2][0]) if _is_dask(self.data) else nx
        y0, y1 = rows
        return [(y0, y1, a, b) for a, b in _col_blocks(nx, cw, y1 - y0, n_c, itemsize, block_bytes)]

    def read(self, tiles: list[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        """Yield ``(tile, block)``; dask tiles are computed one ahead in a background thread."""
        if self.chunks is not None:
            for t in tiles:
                iy = int(np.searchsorted(self.y_bounds, t[0], side="right")) - 1
                ix = int(np.searchsorted(self.x_bounds, t[2], side="right")) - 1
                yield t, _float_block(self.chunks[iy][ix])
            return
        yield from _prefetched(self.data, tiles)


def _prefetched(data: Any, tiles: list[tuple[int, ...]]) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
    """Yield ``(tile, block)`` with the next block read in a background thread while the caller computes."""

    def load(t: tuple[int, ...]) -> np.ndarray:
        y0, y1, x0, x1 = t
        block = data[:, y0:y1, x0:x1]
        if _is_dask(block):
            block = block.compute()
        return _float_block(block)

    if not _is_dask(data) or len(tiles) == 1:
        for t in tiles:
            yield t, load(t)
        return
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(load, tiles[0]) if tiles else None
        for i, t in enumerate(tiles):
            block = future.result()
            future = pool.submit(load, tiles[i + 1]) if i + 1 < len(tiles) else None
            yield t, block


def _progress(iterable: Any, total: int, desc: str, show: bool | None) -> Any:
    from tqdm.auto import tqdm

    show = settings.show_progress_bar if show is None else show
    return tqdm(iterable, total=total, desc=desc, disable=not show or total <= 1)


def _grid_bands(
    raster: _Raster, ye: np.ndarray, xe: np.ndarray, block_bytes: int, show: bool | None, desc: str
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Exact-overlap sums over a separable grid, one band of bin rows at a time.

    ``ye``/``xe`` are bin edges in the raster's pixel space. Yields ``(r0, r1, sums)`` with ``sums`` of shape
    ``(c, r1 - r0, len(xe) - 1)`` (float64), memory bounded by the band and one block of the raster.
    """
    n_c, ny, nx = raster.shape
    nby, nbx = ye.size - 1, xe.size - 1
    if raster.y_bounds.size == 2 and raster.x_bounds.size == 2:  # one block, read where it is
        ((_, block),) = raster.read([(0, ny, 0, nx)])
        ty, tx = axis_table(ye[:-1], ye[1:], ny), axis_table(xe[:-1], xe[1:], nx)
        # bands of whole bin rows over the whole block: the sums held at a time stay within block_bytes
        rows = max(1, block_bytes // (8 * n_c * max(nbx, 1)))
        bands = [(r0, min(nby, r0 + rows)) for r0 in range(0, nby, rows)]
        for r0, r1 in _progress(bands, len(bands), desc, show):
            out = np.zeros((n_c, r1 - r0, nbx))
            rect_sum(block, tuple(t[r0:r1] for t in ty), tx, out, channels=raster.chan)
            yield r0, r1, out
        return
    # one band per chunk row of pixels (each chunk is read once); the bin row cut by a band's lower edge is
    # carried into the next band
    bounds = raster.y_bounds
    pending: tuple[int, np.ndarray] | None = None
    bands = list(zip(bounds[:-1], bounds[1:], strict=True))
    for y0, y1 in _progress(bands, len(bands), desc, show):
        # rows that overlap [y0, y1) by more than float noise (the same tolerance as the carry test below)
        r0 = max(0, int(np.searchsorted(ye, y0 + 1e-9, side="right")) - 1)
        r1 = min(nby, int(np.searchsorted(ye, y1 - 1e-9, side="left")))
        if r1 <= r0:
            continue
        if pending is not None and pending[0] != r0:
            yield pending[0], pending[0] + 1, pending[1][:, None]
            pending = None
        out = np.zeros((n_c, r1 - r0, nbx))
        if pending is not None:
            out[:, 0] += pending[1]
            pending = None
        ty = axis_table(ye[r0:r1] - y0, ye[r0 + 1 : r1 + 1] - y0, y1 - y0)
        for (_, _, x0, x1), block in raster.read(raster.tiles(block_bytes, rows=(int(y0), int(y1)))):
            k0 = max(0, int(np.searchsorted(xe, x0, side="right")) - 1)
            k1 = min(nbx, int(np.searchsorted(xe, x1, side="left")))
            if k1 <= k0:
                continue
            tx = axis_table(xe[k0:k1] - x0, xe[k0 + 1 : k1 + 1] - x0, x1 - x0)
            rect_sum(block, ty, tx, out, offset=(0, k0), channels=raster.chan)
        if y1 < ny and ye[r1] > y1 + 1e-9:  # the last bin row continues in the next band
            pending = (r1 - 1, out[:, -1].copy())
            if r1 - 1 > r0:
                yield r0, r1 - 1, out[:, :-1]
        else:
            yield r0, r1, out
    if pending is not None:
        yield pending[0], pending[0] + 1, pending[1][:, None]


# --------------------------------------------------------------------------------------------------------------------
# Validation


@dataclass
class _Map:
    key: str
    data: _Raster  # the full-resolution level, selected channels
    channels: list[str]
    channel_index: np.ndarray
    px_area_um2: float | None
    to_um: np.ndarray | None
    value_kind: str | None
    reduce: str


def _axis_aligned(m: np.ndarray) -> bool:
    scale = max(abs(m[0, 0]), abs(m[1, 1]), 1e-300)
    return abs(m[0, 1]) <= _AXIS_TOL * scale and abs(m[1, 0]) <= _AXIS_TOL * scale and m[0, 0] > 0 and m[1, 1] > 0


def _check_map(sdata: SpatialData, image_key: str, genes: Any, reduce: str | None, force: bool, need_um: bool) -> _Map:
    if image_key not in sdata.images:
        msg = f"No image {image_key!r} in the SpatialData; available images: {sorted(sdata.images)}."
        raise KeyError(msg)
    element = sdata.images[image_key]
    level = scale_levels(element)[0]
    names = [str(c) for c in level.coords["c"].values] if "c" in level.coords else []
    if not names or not all(isinstance(c, str) for c in level.coords["c"].values.tolist()):
        msg = (
            f"The channels of {image_key!r} have no names (c = {names}); aggregate writes them as var_names. "
            "Parse the image with `Image2DModel.parse(..., c_coords=[gene names])`."
        )
        raise InputError(msg)
    if len(set(names)) != len(names):
        msg = f"The channel names of {image_key!r} are not unique; rename the duplicated channels."
        raise InputError(msg)
    if genes is None:
        index = np.arange(len(names))
    else:
        genes = [genes] if isinstance(genes, str) else list(genes)
        missing = [g for g in genes if g not in names]
        if missing or not genes:
            msg = f"Genes {missing[:10]} are not channels of {image_key!r} (it has {len(names)}, e.g. {names[:5]})."
            raise KeyError(msg) if missing else InputError("`genes` is empty; pass None for all channels.")
        position = {n: i for i, n in enumerate(names)}
        index = np.array([position[g] for g in genes])
    meta = get_element_meta(sdata, image_key, element)
    kind = meta.get(Attrs.value_kind)
    default = {Attrs.density: "sum", Attrs.intensive: "mean"}.get(kind)
    if reduce is None:
        if default is None:
            msg = (
                f"The value kind of {image_key!r} is not declared ('density' or 'intensive'), so the reduction "
                "is ambiguous: pass reduce='mean' (area-weighted mean) or reduce='sum' (pixel sum)."
            )
            raise InputError(msg)
        reduce = default
    if reduce not in ("sum", "mean"):
        msg = f"reduce must be 'sum' or 'mean', got {reduce!r}."
        raise InputError(msg)
    if default is not None and reduce != default and not force:
        msg = (
            f"{image_key!r} is declared {kind!r}, which aggregates by {default!r}; reduce={reduce!r} would mix "
            f"units of different size. Use reduce={default!r}, or pass force=True if you mean it."
        )
        raise InputError(msg)
    to_um = None
    px_area = None
    if need_um or kind == Attrs.density:
        to_um = to_um_affine(sdata, image_key)
        px_area = float(abs(np.linalg.det(to_um[:2, :2])))
    raster = _Raster.of(level.data, None if genes is None else index)
    return _Map(image_key, raster, [names[i] for i in index], index, px_area, to_um, kind, reduce)


# --------------------------------------------------------------------------------------------------------------------
# Units


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


# --------------------------------------------------------------------------------------------------------------------
# Public function


def _unit_scale(n_px: np.ndarray, m: _Map) -> tuple[np.ndarray, str]:
    """Factor per unit from the raw pixel-overlap sum to the value, and the unit of ``"sum"``.

    ``"mean"`` divides by the unit's pixel count; ``"sum"`` of a density map multiplies by the pixel area (µm²), of
    any other map keeps pixel sums.
    """
    n_px = np.asarray(n_px, dtype=np.float64)
    if m.reduce == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            return 1.0 / n_px, "mean"
    if m.value_kind == Attrs.density:
        return np.full(n_px.size, float(m.px_area_um2)), "um2"
    return np.ones(n_px.size), "px"


def _finish(sums: np.ndarray, obs: dict[str, np.ndarray], m: _Map) -> tuple[np.ndarray, str]:
    """Float32 values from float64 raw pixel-overlap sums (scaled in place), and the unit of ``"sum"``."""
    scale, sum_unit = _unit_scale(obs["n_pixels"], m)
    sums *= scale[:, None]
    return sums.astype(np.float32), sum_unit


def aggregate(
    sdata: SpatialData,
    image_key: str,
    *,
    bin_size: float | None = None,
    shapes_key: str | None = None,
    labels_key: str | None = None,
    reduce: Literal["mean", "sum"] | None = None,
    genes: str | list[str] | None = None,
    key_added: str | None = None,
    origin_um: tuple[float, float] | None = None,
    align_to: str | None = None,
    tissue_key: str | Literal[False] | None = None,
    allow_subpixel: bool = False,
    force: bool = False,
    block_bytes: int = BLOCK_BYTES,
    inplace: bool = True,
    show_progress_bar: bool | None = None,
) -> AnnData | None:
    """Aggregate an image with named channels into a table of square bins, shapes or labels.

    Every pixel contributes by the exact area it shares with a unit. The map is read block by block
    (dask-backed, multiscale maps stay out of core: memory is bounded by ``block_bytes`` plus the output).

    Parameters
    ----------
    sdata
        SpatialData holding the image.
    image_key
        Image ``(c, y, x)`` whose channel names become ``var_names`` (a dense map, a ground-truth map, H&E).
    bin_size
        Side of square bins in µm, on the grid described in :class:`Grid`. Exactly one of ``bin_size``,
        ``shapes_key`` and ``labels_key``.
    shapes_key
        Shapes element of circles (``radius`` column) and/or (multi)polygons (holes respected).
    labels_key
        Labels element at any resolution, axis-aligned with the map; label 0 is background.
    reduce
        ``"mean"`` or ``"sum"`` (see the module notes for their exact meaning). Default from the map's declared
        value kind: ``"sum"`` for ``"density"``, ``"mean"`` for ``"intensive"``; required when undeclared.
    genes
        Channels to aggregate (default all).
    key_added
        Table key; default ``Keys.binned(image_key, bin_size)`` for bins, ``f"{image_key}_{shapes_key}"`` or
        ``f"{image_key}_{labels_key}"`` otherwise. Square bins are written as shapes ``f"{key_added}_bins"``.
    origin_um
        A bin corner ``(x, y)`` in µm (default the image corner ``(0, 0)``).
    align_to
        Shapes of an existing axis-aligned grid (e.g. Visium HD 2 µm bins) whose corners the grid should share.
    tissue_key
        Labels whose non-zero pixels are tissue; bins that do not meet it are left out. Default: the map's
        recorded tissue mask or ``Keys.tissue_mask`` of the map or of ``"he"`` if present; ``False`` keeps every
        bin that meets the map.
    allow_subpixel
        Allow bins smaller than a map pixel (they only interpolate the map).
    force
        Allow the reduction that does not fit the map's declared value kind.
    block_bytes
        Bytes of the map read at a time when it is not in memory (a map in memory is read where it is).
    inplace
        Write the table (and the bins shapes) into ``sdata``; otherwise return the table and write nothing.
    show_progress_bar
        Default ``settings.show_progress_bar``.

    Returns
    -------
    The table when ``inplace=False``. ``X`` (float32) holds the values; ``obs`` has ``instance_id``, ``region``,
    ``n_pixels`` (map pixels inside the unit, fractional), ``area_um2`` (the unit's area on the map) and, for bins,
    ``array_row``, ``array_col`` (and ``tissue_fraction``); ``obsm["spatial"]`` the unit centres in the annotated
    element's intrinsic coordinates (µm for bins); ``uns["stpredict"]`` the parameters.
    """
    from anndata import AnnData
    from spatialdata.models import ShapesModel, TableModel

    chosen = [
        k for k, v in (("bin_size", bin_size), ("shapes_key", shapes_key), ("labels_key", labels_key)) if v is not None
    ]
    if len(chosen) != 1:
        msg = f"Pass exactly one of bin_size, shapes_key and labels_key (got {chosen or 'none'})."
        raise InputError(msg)
    if shapes_key is not None and shapes_key not in sdata.shapes:
        msg = f"No shapes {shapes_key!r} in the SpatialData; available shapes: {sorted(sdata.shapes)}."
        raise KeyError(msg)
    if bin_size is None and (origin_um is not None or align_to is not None):
        msg = "origin_um and align_to only apply to square bins (bin_size)."
        raise InputError(msg)
    m = _check_map(sdata, image_key, genes, reduce, force, need_um=bin_size is not None)
    params: dict[str, Any] = {"image_key": image_key, "reduce": m.reduce, "value_kind": m.value_kind}
    shapes_el = None
    if bin_size is not None:
        grid = grid_from_args(sdata, bin_size, origin_um, align_to)
        px_um = math.sqrt(m.px_area_um2)
        if grid.size < px_um * (1 - 1e-9) and not allow_subpixel:
            msg = (
                f"bin_size={bin_size} µm is smaller than a pixel of {image_key!r} ({px_um:.4g} µm): such bins only "
                "interpolate the map. Use a larger bin, or pass allow_subpixel=True."
            )
            raise InputError(msg)
        tissue = _tissue_key(sdata, image_key, tissue_key)
        x, obs, sum_unit = _bins(sdata, m, grid, tissue, block_bytes, show_progress_bar)
        key = key_added or Keys.binned(image_key, grid.size)
        region = f"{key}_bins"
        params |= grid.params() | {"tissue_key": tissue, "align_to": align_to, "spatial_space": "um"}
    elif shapes_key is not None:
        sums, obs = _shapes(sdata, m, shapes_key, block_bytes, show_progress_bar)
        x, sum_unit = _finish(sums, obs, m)
        key = key_added or f"{image_key}_{shapes_key}"
        region = shapes_key
        params |= {"shapes_key": shapes_key, "spatial_space": "intrinsic"}
    else:
        sums, obs = _labels(sdata, m, labels_key, block_bytes, show_progress_bar)
        x, sum_unit = _finish(sums, obs, m)
        key = key_added or f"{image_key}_{labels_key}"
        region = labels_key
        params |= {"labels_key": labels_key, "spatial_space": "intrinsic"}
    if inplace and key in sdata.tables:
        logger.info("Overwriting table %r.", key)
    params["sum_unit"] = sum_unit
    spatial = obs.pop("spatial")
    import anndata
    import pandas as pd

    ids = np.asarray(obs[Keys.instance_key])
    integer = np.issubdtype(ids.dtype, np.integer)
    names = decimal_names(ids) if integer else np.array(list(map(str, ids.tolist())), dtype=object)
    obs_df = pd.DataFrame(obs, index=pd.Index(names, dtype=object, copy=False))
    obs_df[Keys.region_key] = pd.Categorical.from_codes(np.zeros(len(obs_df), dtype=np.int8), categories=[region])
    # bin and label ids are unique by construction; a shapes element's index is the user's, so it is checked
    with anndata.settings.override(check_uniqueness=shapes_key is not None):
        adata = AnnData(X=x, obs=obs_df, var=pd.DataFrame(index=m.channels), obsm={"spatial": spatial})
    adata.uns[Attrs.root] = params
    # what TableModel.parse writes, without its per-call validation (groupby over millions of bins)
    adata.uns[TableModel.ATTRS_KEY] = {
        TableModel.REGION_KEY: region,
        TableModel.REGION_KEY_KEY: Keys.region_key,
        TableModel.INSTANCE_KEY: Keys.instance_key,
    }
    if not inplace:
        return adata
    if bin_size is not None:
        gdf = bins_geodataframe(grid, obs["array_row"], obs["array_col"], obs[Keys.instance_key])
        shapes_el = ShapesModel.parse(gdf, transformations=grid_transformations(sdata, image_key))
        sdata.shapes[region] = shapes_el
    sdata.tables[key] = adata
    return None
