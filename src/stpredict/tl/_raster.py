"""Block-wise reading of a ``(c, y, x)`` raster, and exact-overlap sums over a separable grid of its pixels.

A raster held in memory is read where it is (its dask chunks when they are arrays, or the one array they are views
of); any other dask array is read in chunk-aligned tiles of at most ``block_bytes``, the next tile computed in a
background thread while the caller works on the current one. :func:`_grid_bands` sums such a raster over a grid of
axis-aligned bins one band of bin rows at a time, so memory stays bounded by a band and one block.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._settings import settings
from stpredict.kernels import axis_table, rect_sum

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["BLOCK_BYTES", "_Raster", "_grid_bands", "_is_dask", "_memory_chunks", "_progress", "_whole_view"]

#: Default memory for one block of the map read at a time.
BLOCK_BYTES = 128 * 2**20


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
