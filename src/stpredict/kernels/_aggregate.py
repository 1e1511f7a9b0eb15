"""Numba kernels for aggregating rasters (c, y, x) into units with exact pixel-area weights.

Every kernel takes plain arrays and writes into preallocated outputs, so the callers can run them block by block
on dask-backed maps and add the partial results. Geometry is in the raster's pixel space: pixel ``(i, j)``
covers ``[j, j+1) × [i, i+1)``. Only float32 and float64 rasters are passed in (callers cast other dtypes), so
each kernel compiles at most twice per output dtype.

Axis tables
    A 1-D interval ``[a, b)`` clipped to ``[0, n)`` covers pixels ``lo … hi-1``; ``w_lo`` is the overlap of
    pixel ``lo`` and ``w_hi`` that of pixel ``hi-1`` (when ``hi - lo == 1`` both equal ``b - a``); inner
    pixels have weight 1. :func:`axis_table` builds these tables for a set of intervals. The overlap area of a
    rectangle with a pixel is the product of the two axis overlaps, so square bins (and labels at any resolution
    with an axis-aligned transformation) are separable weighted sums over contiguous rows.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = [
    "axis_table",
    "circle_pixel_area",
    "gather_units",
    "label_lut",
    "labels_sum",
    "polygon_pixel_area",
    "rect_sum",
    "rect_sum_units",
    "shapes_sum",
]

_SNAP = 1e-9  # interval ends this close to an integer are snapped to it (float noise on bin edges)
_FASTMATH = {"reassoc", "contract"}  # vectorised sums; NaN and inf keep their IEEE meaning


def axis_table(starts: np.ndarray, ends: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pixel ranges and edge weights of intervals ``[starts[k], ends[k])`` clipped to ``[0, n)``.

    Returns
    -------
    ``(lo, hi, w_lo, w_hi)``: int64 pixel range ``lo … hi-1`` per interval (``hi <= lo`` when the clipped
    interval is empty) and float64 overlaps of the first and last pixel.
    """
    a = np.clip(np.asarray(starts, dtype=np.float64), 0, n)
    b = np.clip(np.asarray(ends, dtype=np.float64), 0, n)
    a = np.where(np.abs(a - np.round(a)) < _SNAP, np.round(a), a)
    b = np.where(np.abs(b - np.round(b)) < _SNAP, np.round(b), b)
    lo = np.floor(a).astype(np.int64)
    hi = np.ceil(b).astype(np.int64)
    empty = b <= a
    hi = np.where(empty, lo, hi)
    w_lo = np.where(hi - lo == 1, b - a, np.minimum(lo + 1, b) - a)
    w_hi = np.where(hi - lo == 1, b - a, b - np.maximum(hi - 1, a))
    w_lo = np.where(empty, 0.0, w_lo)
    w_hi = np.where(empty, 0.0, w_hi)
    return lo, hi, w_lo, w_hi


@intrinsic
def _prefetch(typingctx, arr, idx):
    """Hint the CPU to bring ``arr[idx]`` (a 1-D array) into L2 (``llvm.prefetch``; never faults, no effect)."""
    if not isinstance(arr, types.Array) or arr.ndim != 1:
        return None
    sig = types.void(arr, types.intp)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]], wraparound=False, boundscheck=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0"
        )
        # read, moderate temporal locality (into L2: a bin row of pixel rows does not fit in L1), data cache
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(inline="always")
def _row_interval(row, lo, hi, w_lo, w_hi):
    if hi <= lo:
        return 0.0
    if hi - lo == 1:
        return w_lo * row[lo]
    inner = row[lo + 1 : hi - 1]
    s = 0.0
    for i in range(inner.size):  # indices from 0: no wraparound checks, so LLVM vectorises
        s += inner[i]
    return s + w_lo * row[lo] + w_hi * row[hi - 1]


@numba.njit(inline="always")
def _row_weight(y, lo, hi, w_lo, w_hi):
    if y == lo:
        return w_lo
    if y == hi - 1:
        return w_hi
    return 1.0


#: Columns per strip of the row buffer (64 KiB of float64), bounding the per-task buffer for very wide maps.
_STRIP = 8192
#: Pixel rows per task of :func:`rect_sum` (a run of whole bin rows). Long runs keep the reads streaming: each bin
#: row's pixel rows are prefetched during the previous bin row, so only a run's first bin row is read cold (256 rows
#: read 5-15 % faster than 64 on the benchmark map; 1024 no better). Shorter where needed for four tasks per thread.
_RUN_ROWS = 256


def _run_rows(ny: int, n_channels: int) -> int:
    """Pixel rows per task: :data:`_RUN_ROWS`, or fewer so that every thread gets about four tasks."""
    tasks_wanted = 4 * numba.get_num_threads()
    return int(min(_RUN_ROWS, max(8, -(-ny * n_channels // tasks_wanted))))


@numba.njit(inline="always")
def _pass(img, c, y, k, x0, x1, lo, hi, wl, wh, buf, first):
    # buf (+)= Σ_{y <= row < y+k} weight(row) · img[c, row, x0:x1], 1 <= k <= 6, in one pass over buf
    w0 = _row_weight(y, lo, hi, wl, wh)
    r0 = img[c, y, x0:x1]
    if k == 1:
        if first:
            for i in range(r0.size):
                buf[i] = w0 * r0[i]
        else:
            for i in range(r0.size):
                buf[i] += w0 * r0[i]
        return
    w1 = _row_weight(y + 1, lo, hi, wl, wh)
    r1 = img[c, y + 1, x0:x1]
    if k == 2:
        if first:
            for i in range(r0.size):
                buf[i] = w0 * r0[i] + w1 * r1[i]
        else:
            for i in range(r0.size):
                buf[i] += w0 * r0[i] + w1 * r1[i]
        return
    w2 = _row_weight(y + 2, lo, hi, wl, wh)
    r2 = img[c, y + 2, x0:x1]
    if k == 3:
        if first:
            for i in range(r0.size):
                buf[i] = (w0 * r0[i] + w1 * r1[i]) + w2 * r2[i]
        else:
            for i in range(r0.size):
                buf[i] += (w0 * r0[i] + w1 * r1[i]) + w2 * r2[i]
        return
    w3 = _row_weight(y + 3, lo, hi, wl, wh)
    r3 = img[c, y + 3, x0:x1]
    if k == 4:
        if first:
            for i in range(r0.size):
                buf[i] = (w0 * r0[i] + w1 * r1[i]) + (w2 * r2[i] + w3 * r3[i])
        else:
            for i in range(r0.size):
                buf[i] += (w0 * r0[i] + w1 * r1[i]) + (w2 * r2[i] + w3 * r3[i])
        return
    w4 = _row_weight(y + 4, lo, hi, wl, wh)
    r4 = img[c, y + 4, x0:x1]
    if k == 5:
        if first:
            for i in range(r0.size):
                buf[i] = (w0 * r0[i] + w1 * r1[i]) + (w2 * r2[i] + w3 * r3[i]) + w4 * r4[i]
        else:
            for i in range(r0.size):
                buf[i] += (w0 * r0[i] + w1 * r1[i]) + (w2 * r2[i] + w3 * r3[i]) + w4 * r4[i]
        return
    w5 = _row_weight(y + 5, lo, hi, wl, wh)
    r5 = img[c, y + 5, x0:x1]
    if first:
        for i in range(r0.size):
            buf[i] = (w0 * r0[i] + w1 * r1[i]) + (w2 * r2[i] + w3 * r3[i]) + (w4 * r4[i] + w5 * r5[i])
    else:
        for i in range(r0.size):
            buf[i] += (w0 * r0[i] + w1 * r1[i]) + (w2 * r2[i] + w3 * r3[i]) + (w4 * r4[i] + w5 * r5[i])


@numba.njit(inline="always")
def _stream_rows(img, c, lo, hi, x0, x1, wl, wh, buf):
    # buf = Σ_{lo <= row < hi} weight(row) · img[c, row, x0:x1] (hi > lo): passes of four rows, the last of up to six,
    # so no pass over the buffer (a load and a store per column) carries only one or two rows; the first assigns
    y = lo
    first = True
    while y < hi:
        n = hi - y
        k = n if n <= 6 else 4
        _pass(img, c, y, k, x0, x1, lo, hi, wl, wh, buf, first)
        first = False
        y += k


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
def _rect_sum_parallel(
    img, chan, ylo, yhi, ywlo, ywhi, xlo, xhi, xwlo, xwhi, groups, runs, out, by_off, bx_off, units, scale, xout
):
    # Separable: one task per (run of consecutive bin rows, channel). For each strip of whole bins
    # (groups[g] … groups[g+1]-1), the weighted sum of a bin row's pixel rows streams into a row buffer (vectorised),
    # then the column intervals of that buffer give the bins. A pixel row cut by a bin edge is read for both bin rows,
    # the second time from cache (splitting it between two buffers in one pass cost more than the read).
    # Output: out[ci, by + by_off, bx + bx_off] += sum; or, when ``units`` is not empty (direct),
    # xout[u, ci] = sum * scale[u] for u = units[by + by_off, bx + bx_off] >= 0. The channels of one run are
    # consecutive tasks, so the rows of xout they write stay in cache between them.
    n_runs = runs.size - 1
    n_groups = groups.size - 1
    n_c = chan.size
    direct = units.size > 0
    for t in numba.prange(n_c * n_runs):
        ci = t % n_c
        c = chan[ci]
        run = t // n_c
        r_a = runs[run]
        r_b = runs[run + 1]
        for g in range(n_groups):
            b0 = groups[g]
            b1 = groups[g + 1]
            x0 = xlo[b0]
            x1 = x0
            for bx in range(b0, b1):
                x0 = min(x0, xlo[bx])
                x1 = max(x1, xhi[bx])
            if x1 <= x0:
                continue
            buf = np.empty(x1 - x0, dtype=np.float64)
            for by in range(r_a, r_b):
                lo, hi, wl, wh = ylo[by], yhi[by], ywlo[by], ywhi[by]
                if hi <= lo:
                    continue
                _stream_rows(img, c, lo, hi, x0, x1, wl, wh, buf)
                # the next bin row's pixel rows are prefetched, a few cache lines per bin, while this one's bins are
                # summed from the buffer, so the memory reads go on during that computation (row and column counters:
                # an integer division per prefetch cost more than the prefetch saved)
                pf0 = hi
                pf1 = hi
                if by + 1 < r_b and yhi[by + 1] > ylo[by + 1]:
                    pf0 = max(hi, ylo[by + 1])
                    pf1 = yhi[by + 1]
                lines = (x1 - x0 + 15) // 16
                n_pf = (pf1 - pf0) * lines
                per_bin = n_pf // (b1 - b0) + 1
                pf_row = pf0
                pf_col = x0
                for bx in range(b0, b1):
                    v = _row_interval(buf, xlo[bx] - x0, xhi[bx] - x0, xwlo[bx], xwhi[bx])
                    if direct:
                        u = units[by + by_off, bx + bx_off]
                        if u >= 0:
                            xout[u, ci] = v * scale[u]
                    else:
                        out[ci, by + by_off, bx + bx_off] += v
                    for _ in range(per_bin):
                        if pf_row < pf1:
                            _prefetch(img[c, pf_row], pf_col)
                            pf_col += 16
                            if pf_col >= x1:
                                pf_col = x0
                                pf_row += 1


@numba.njit(parallel=True, cache=True, nogil=True)
def _gather_units(grid, rows, cols, scale, out):
    # out[k, c] = grid[c, rows[k], cols[k]] * scale[k], in blocks of units so that reads run along grid rows and the
    # strided writes stay in cache; unsigned flat indices (validated by the caller) need no negative-index handling
    n = rows.size
    n_c = grid.shape[0]
    nbx = grid.shape[2]
    flat = grid.reshape(n_c, grid.shape[1] * nbx)
    step = 256
    for t in numba.prange((n + step - 1) // step):
        k0 = t * step
        k1 = min(n, k0 + step)
        idx = np.empty(k1 - k0, dtype=np.uint64)
        for k in range(k0, k1):
            idx[k - k0] = np.uint64(rows[k] * nbx + cols[k])
        for c in range(n_c):
            src = flat[c]
            for k in range(k1 - k0):
                out[k0 + k, c] = src[idx[k]] * scale[k0 + k]


def gather_units(
    grid: np.ndarray, rows: np.ndarray, cols: np.ndarray, out: np.ndarray, scale: np.ndarray | None = None
) -> None:
    """``out[k, c] = grid[c, rows[k], cols[k]] · scale[k]``: per-unit rows of a ``(c, n_rows, n_cols)`` grid of sums.

    ``out`` is ``(len(rows), c)`` (e.g. float32, the table's ``X``); the product is taken in float64 and cast on
    the way. ``scale`` defaults to ones.
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    if rows.size == 0:
        return
    n_c, n_rows, n_cols = grid.shape
    scale = np.ones(rows.size) if scale is None else np.ascontiguousarray(scale, dtype=np.float64)
    if out.shape != (rows.size, n_c) or cols.shape != rows.shape or scale.shape != rows.shape:
        msg = (
            f"out must be (len(rows), {n_c}), cols and scale like rows, got {out.shape}, {rows.shape}, "
            f"{cols.shape}, {scale.shape}."
        )
        raise ValueError(msg)
    if rows.min() < 0 or rows.max() >= n_rows or cols.min() < 0 or cols.max() >= n_cols:
        msg = f"rows and cols must index the grid's {n_rows} × {n_cols} units."
        raise ValueError(msg)
    grid = np.ascontiguousarray(grid)
    if _parallel_ok():
        _gather_units(grid, rows, cols, scale, out)
    else:
        _gather_units_serial(grid, rows, cols, scale, out)


@numba.njit(cache=True)
def _runs(lo, hi, width):
    # Boundaries of runs of consecutive intervals spanning at most ``width`` pixels (at least one interval each).
    n = lo.size
    starts = np.empty(n + 1, dtype=np.int64)
    starts[0] = 0
    m = 1
    first = lo[0] if n else 0
    for k in range(1, n):
        if hi[k] - first > width:
            starts[m] = k
            m += 1
            first = lo[k]
    starts[m] = n
    return starts[: m + 1].copy()


def _strip_groups(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Boundaries of runs of consecutive bins spanning at most ``_STRIP`` pixels (at least one bin each)."""
    return _runs(np.asarray(lo, dtype=np.int64), np.asarray(hi, dtype=np.int64), _STRIP)


def _parallel_ok() -> bool:
    """Parallel kernels are safe in this thread: main thread, or a thread-safe numba threading layer."""
    if threading.current_thread() is threading.main_thread():
        return True
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer is chosen on first use
        layer = numba.config.THREADING_LAYER
    return layer in ("tbb", "omp")


def _channels(channels: np.ndarray | None, n_c: int) -> np.ndarray:
    if channels is None:
        return np.arange(n_c, dtype=np.int64)
    chan = np.asarray(channels, dtype=np.int64)
    if chan.ndim != 1 or (chan.size and (chan.min() < 0 or chan.max() >= n_c)):
        msg = f"channels must index the raster's {n_c} channels, got {channels!r}."
        raise ValueError(msg)
    return chan


#: Placeholders for the arguments of the mode of :func:`_rect_sum_parallel` not used (same types: one compilation).
_NO_UNITS = np.empty((0, 0), dtype=np.int64)
_NO_SCALE = np.empty(0, dtype=np.float64)
_NO_X = np.empty((0, 0), dtype=np.float32)
_NO_OUT = np.empty((0, 0, 0), dtype=np.float64)


def _rect_kernel(
    img: np.ndarray,
    chan: np.ndarray,
    y_table: tuple[np.ndarray, ...],
    x_table: tuple[np.ndarray, ...],
    out: np.ndarray,
    offset: tuple[int, int],
    units: np.ndarray,
    scale: np.ndarray,
    xout: np.ndarray,
) -> None:
    """Run :func:`_rect_sum_parallel` (or its serial twin off the main thread) in one of its two output modes."""
    groups = _strip_groups(x_table[0], x_table[1])
    run_rows = _run_rows(int(img.shape[1]), int(chan.size))
    runs = _runs(np.asarray(y_table[0], dtype=np.int64), np.asarray(y_table[1], dtype=np.int64), run_rows)
    kernel = _rect_sum_parallel if _parallel_ok() else _rect_sum_serial
    kernel(
        np.ascontiguousarray(img), chan, *y_table, *x_table, groups, runs, out, int(offset[0]), int(offset[1]),
        units, scale, xout,
    )  # fmt: skip


def rect_sum(
    img: np.ndarray,
    y_table: tuple[np.ndarray, ...],
    x_table: tuple[np.ndarray, ...],
    out: np.ndarray,
    offset: tuple[int, int] = (0, 0),
    channels: np.ndarray | None = None,
) -> None:
    """Add ``Σ_pixels overlap(pixel, rectangle) · img[c, pixel]`` for a separable grid of rectangles to ``out``.

    Parameters
    ----------
    img
        ``(c, ny, nx)`` float32 or float64 raster (C-contiguous, or it is copied).
    y_table, x_table
        :func:`axis_table` of the rectangles' row and column intervals in ``img``'s pixel space.
    out
        ``(n_channels, n_rows_total, n_cols_total)`` float64 accumulator; rectangle ``(r, k)`` of channel
        ``channels[i]`` goes to ``out[i, r + offset[0], k + offset[1]]``.
    offset
        Position of this grid inside ``out`` (block-wise accumulation).
    channels
        Channels of ``img`` to aggregate (default all), so a subset needs no copy of the raster.
    """
    if x_table[0].size == 0 or y_table[0].size == 0:
        return
    chan = _channels(channels, img.shape[0])
    _rect_kernel(img, chan, y_table, x_table, out, offset, _NO_UNITS, _NO_SCALE, _NO_X)


def rect_sum_units(
    img: np.ndarray,
    y_table: tuple[np.ndarray, ...],
    x_table: tuple[np.ndarray, ...],
    units: np.ndarray,
    scale: np.ndarray,
    out: np.ndarray,
    channels: np.ndarray | None = None,
) -> None:
    """Write ``scale[u] · Σ_pixels overlap(pixel, rectangle) · img[c, pixel]`` straight into a table's rows.

    The same sums as :func:`rect_sum`, for a raster that holds the rectangles whole (each unit is computed in one
    call, so it is assigned, not added), written as ``out[u, i]`` for unit ``u = units[r, k]`` of rectangle
    ``(r, k)`` and channel ``channels[i]``: no grid of sums, no gather, and the per-unit factor (a mean's
    ``1 / n_pixels``, a density's pixel area) applied on the way.

    Parameters
    ----------
    img
        ``(c, ny, nx)`` float32 or float64 raster (C-contiguous, or it is copied).
    y_table, x_table
        :func:`axis_table` of the rectangles' row and column intervals in ``img``'s pixel space.
    units
        ``(n_rows, n_cols)`` integer row of ``out`` per rectangle; negative: not computed.
    scale
        ``(len(out),)`` factor per unit.
    out
        ``(n_units, n_channels)`` float32 C-contiguous array (e.g. ``X``); rows no rectangle maps to are untouched,
        rows of rectangles outside ``img`` are 0.
    channels
        Channels of ``img`` to aggregate (default all).
    """
    chan = _channels(channels, img.shape[0])
    n_rows, n_cols = y_table[0].size, x_table[0].size
    units = np.ascontiguousarray(units, dtype=np.int64)
    scale = np.ascontiguousarray(scale, dtype=np.float64)
    if out.dtype != np.float32 or out.ndim != 2 or not out.flags.c_contiguous or not out.flags.writeable:
        msg = f"out must be a writeable C-contiguous 2-D float32 array, got {out.dtype} with shape {out.shape}."
        raise ValueError(msg)
    if units.shape != (n_rows, n_cols) or out.shape[1] != chan.size or scale.shape != (out.shape[0],):
        msg = (
            f"units must be ({n_rows}, {n_cols}), out (n_units, {chan.size}) and scale (n_units,), got "
            f"{units.shape}, {out.shape} and {scale.shape}."
        )
        raise ValueError(msg)
    if n_rows == 0 or n_cols == 0 or units.size == 0:
        return
    if units.max() >= out.shape[0]:
        msg = f"units must index the {out.shape[0]} rows of out, got up to {units.max()}."
        raise ValueError(msg)
    # the kernel skips empty bin rows and strips: their units get 0 here
    empty = (y_table[1] <= y_table[0])[:, None] | (x_table[1] <= x_table[0])[None, :]
    missed = units[empty]
    out[missed[missed >= 0]] = 0.0
    _rect_kernel(img, chan, y_table, x_table, _NO_OUT, (0, 0), units, scale, out)


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
def _labels_sum(img, chan, lab, lut, base, ylo, yhi, ywlo, ywhi, xlo, xhi, xwlo, xwhi, geo, n_chunks, buf, wbuf):
    # buf: (n_chunks, n_channels, n_labels); wbuf: (n_chunks, 3, n_labels) = weight, weight·x, weight·y (first
    # channel only). The compact index of label pixel (ly, lx) is lut[lab[ly, lx] - base] (-1: background).
    n_c = chan.size
    nly = ylo.size
    nlx = xlo.size
    rows_per_chunk = (nly + n_chunks - 1) // n_chunks
    for t in numba.prange(n_c * n_chunks):
        ci = t // n_chunks
        c = chan[ci]
        k = t % n_chunks
        idx_row = np.empty(nlx, dtype=np.int64)
        for ly in range(k * rows_per_chunk, min(nly, (k + 1) * rows_per_chunk)):
            for lx in range(nlx):
                idx_row[lx] = lut[lab[ly, lx] - base]
            if ci == 0:  # exact overlap rectangle of each label pixel: area and midpoint
                for lx in range(nlx):
                    idx = idx_row[lx]
                    if idx >= 0:
                        w = geo[0, ly] * geo[1, lx]
                        wbuf[k, 0, idx] += w
                        wbuf[k, 1, idx] += w * geo[3, lx]
                        wbuf[k, 2, idx] += w * geo[2, ly]
            for y in range(ylo[ly], yhi[ly]):
                wy = 1.0
                if y == ylo[ly]:
                    wy = ywlo[ly]
                elif y == yhi[ly] - 1:
                    wy = ywhi[ly]
                row = img[c, y]
                for lx in range(nlx):
                    idx = idx_row[lx]
                    if idx < 0:
                        continue
                    buf[k, ci, idx] += wy * _row_interval(row, xlo[lx], xhi[lx], xwlo[lx], xwhi[lx])


@numba.njit(cache=True, nogil=True)
def _label_range(lab):
    lo = np.iinfo(np.int64).max
    hi = np.iinfo(np.int64).min
    for i in range(lab.shape[0]):
        for j in range(lab.shape[1]):
            v = np.int64(lab[i, j])
            lo = min(lo, v)
            hi = max(hi, v)
    return lo, hi


@numba.njit(cache=True, nogil=True)
def _label_lut(lab, hi):
    present = np.zeros(hi + 1, dtype=np.bool_)
    for i in range(lab.shape[0]):
        for j in range(lab.shape[1]):
            present[lab[i, j]] = True
    present[0] = False
    lut = np.full(hi + 1, -1, dtype=np.int64)
    n = 0
    for v in range(hi + 1):
        if present[v]:
            lut[v] = n
            n += 1
    return lut, n


def label_lut(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Present non-zero ids (sorted) of a label image and a lookup table id → compact index (-1: absent or 0).

    For non-negative ids up to a few times the number of pixels (one pass, no sort); None otherwise (use
    ``np.unique``).
    """
    if lab.size == 0:
        return np.zeros(0, dtype=np.int64), np.full(1, -1, dtype=np.int64)
    lo, hi = _label_range(lab)
    if lo < 0 or hi >= 4 * lab.size + 1024:
        return None
    lut, _ = _label_lut(lab, hi)
    return np.flatnonzero(lut >= 0), lut


def labels_sum(
    img: np.ndarray,
    lab: np.ndarray,
    y_edges: np.ndarray,
    x_edges: np.ndarray,
    n_labels: int,
    channels: np.ndarray | None = None,
    lut: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-label area-weighted sums of ``img`` over label pixels mapped (axis-aligned) onto its pixel grid.

    Parameters
    ----------
    img
        ``(c, ny, nx)`` float32/float64 raster.
    lab
        ``(nly, nlx)`` integer compact label index per label pixel, ``-1`` for background; or, with ``lut``, the
        label ids themselves (any integer dtype, any strides: no copy).
    y_edges, x_edges
        ``nly + 1`` and ``nlx + 1`` increasing edges of the label pixels in ``img``'s pixel space.
    n_labels
        Number of compact labels (``lab.max() + 1``).
    channels
        Channels of ``img`` to aggregate (default all).
    lut
        Compact index of each label id ``0 … lab.max()`` (``-1`` for background), e.g. from :func:`label_lut`.

    Returns
    -------
    ``sums`` of shape ``(n_channels, n_labels)`` and ``geom`` of shape ``(3, n_labels)``: overlap area in ``img``
    pixels and the area-weighted x and y of the overlap (divide by the area for the exact centroid).
    """
    _, ny, nx = img.shape
    chan = _channels(channels, img.shape[0])
    n_c = chan.size
    parallel = _parallel_ok()
    n_threads = numba.get_num_threads() if parallel else 1
    n_chunks = 1 if n_c >= n_threads else max(1, min(n_threads, lab.shape[0]))
    buf = np.zeros((n_chunks, n_c, n_labels), dtype=np.float64)
    wbuf = np.zeros((n_chunks, 3, n_labels), dtype=np.float64)
    if lut is None:  # compact indices: -1 … n_labels - 1
        lab = np.asarray(lab)
        lut, base = np.arange(-1, n_labels, dtype=np.int64), -1
    else:
        lut, base = np.asarray(lut, dtype=np.int64), 0
    y_edges = np.asarray(y_edges, dtype=np.float64)
    x_edges = np.asarray(x_edges, dtype=np.float64)
    geo = np.zeros((4, max(lab.shape[0], lab.shape[1])))
    for i, (e, n) in enumerate(((y_edges, ny), (x_edges, nx))):
        a, b = np.clip(e[:-1], 0, n), np.clip(e[1:], 0, n)
        geo[i, : a.size] = b - a
        geo[2 + i, : a.size] = (a + b) / 2
    y_table = axis_table(y_edges[:-1], y_edges[1:], ny)
    x_table = axis_table(x_edges[:-1], x_edges[1:], nx)
    kernel = _labels_sum if parallel else _labels_sum_serial
    kernel(np.ascontiguousarray(img), chan, lab, lut, base, *y_table, *x_table, geo, n_chunks, buf, wbuf)
    return buf.sum(axis=0), wbuf.sum(axis=0)


@numba.njit(inline="always")
def _prim(t, r):
    # ∫ sqrt(r² - t²) dt for t in [-r, r]
    s = math.sqrt(max(r * r - t * t, 0.0))
    return 0.5 * (t * s + r * r * math.asin(min(1.0, max(-1.0, t / r))))


@numba.njit(inline="always")
def _chord_integral(a, b, r):
    # ∫_a^b sqrt(r² - t²) dt with a, b clamped to [-r, r]
    a = min(max(a, -r), r)
    b = min(max(b, -r), r)
    if b <= a:
        return 0.0
    return _prim(b, r) - _prim(a, r)


@numba.njit(cache=True, fastmath=False)  # never inherit a caller's fastmath (numba would)
def _quadrant(x, y, r):
    # Area of the disc of radius r at the origin with X <= x and Y <= y.
    if x <= -r or y <= -r:
        return 0.0
    xc = min(x, r)
    if y >= r:
        return 2.0 * _chord_integral(-r, xc, r)
    w = math.sqrt(r * r - y * y)
    if y >= 0.0:
        # integrand 2 s(t) for |t| > w, y + s(t) for |t| <= w
        area = 2.0 * _chord_integral(-r, min(xc, -w), r)
        if xc > -w:
            hi = min(xc, w)
            area += y * (hi + w) + _chord_integral(-w, hi, r)
        if xc > w:
            area += 2.0 * _chord_integral(w, xc, r)
        return area
    # y < 0: integrand y + s(t) for |t| < w, else 0
    if xc <= -w:
        return 0.0
    hi = min(xc, w)
    return y * (hi + w) + _chord_integral(-w, hi, r)


@numba.njit(cache=True, fastmath=False)  # never inherit a caller's fastmath (numba would)
def circle_pixel_area(cx, cy, r, x0, y0, x1, y1):
    """Exact area of the disc ``(cx, cy, r)`` intersected with the rectangle ``[x0, x1) × [y0, y1)``."""
    if r <= 0.0:
        return 0.0
    ax0 = x0 - cx
    ax1 = x1 - cx
    ay0 = y0 - cy
    ay1 = y1 - cy
    return max(0.0, _quadrant(ax1, ay1, r) - _quadrant(ax0, ay1, r) - _quadrant(ax1, ay0, r) + _quadrant(ax0, ay0, r))


@numba.njit(cache=True, fastmath=False)  # never inherit a caller's fastmath (numba would)
def _clip_area(xs, ys, x0, y0, x1, y1, bx, by, tx, ty):
    # Sutherland–Hodgman clip of the ring (xs, ys) to the convex box; returns the signed shoelace area.
    # bx, by, tx, ty are scratch buffers of length >= 2 * len(xs) + 8.
    n = xs.size
    for i in range(n):
        bx[i] = xs[i]
        by[i] = ys[i]
    for edge in range(4):
        m = 0
        for i in range(n):
            px = bx[i]
            py = by[i]
            qx = bx[(i + 1) % n]
            qy = by[(i + 1) % n]
            if edge == 0:
                pin = px >= x0
                qin = qx >= x0
            elif edge == 1:
                pin = px <= x1
                qin = qx <= x1
            elif edge == 2:
                pin = py >= y0
                qin = qy >= y0
            else:
                pin = py <= y1
                qin = qy <= y1
            if pin:
                tx[m] = px
                ty[m] = py
                m += 1
            if pin != qin:
                if edge == 0 or edge == 1:
                    xe = x0 if edge == 0 else x1
                    f = (xe - px) / (qx - px)
                    tx[m] = xe
                    ty[m] = py + f * (qy - py)
                else:
                    ye = y0 if edge == 2 else y1
                    f = (ye - py) / (qy - py)
                    tx[m] = px + f * (qx - px)
                    ty[m] = ye
                m += 1
        n = m
        for i in range(n):
            bx[i] = tx[i]
            by[i] = ty[i]
        if n == 0:
            return 0.0
    area = 0.0
    for i in range(n):
        j = (i + 1) % n
        area += bx[i] * by[j] - bx[j] * by[i]
    return 0.5 * area


@numba.njit(cache=True, fastmath=False)  # never inherit a caller's fastmath (numba would)
def polygon_pixel_area(xs, ys, x0, y0, x1, y1):
    """Exact (unsigned) area of a simple polygon ring ``(xs, ys)`` intersected with ``[x0, x1) × [y0, y1)``."""
    m = 2 * xs.size + 8
    bx = np.empty(m)
    by = np.empty(m)
    tx = np.empty(m)
    ty = np.empty(m)
    return abs(_clip_area(xs, ys, x0, y0, x1, y1, bx, by, tx, ty))


@numba.njit(inline="always")
def _ci_pre(a, pa, b, pb, r):
    # _chord_integral(a, b, r) with _prim of the clamped a and b given
    a = min(max(a, -r), r)
    b = min(max(b, -r), r)
    if b <= a:
        return 0.0
    return pb - pa


@numba.njit(inline="always")
def _quadrant_pre(x, y, r, xc, pxc, w, pw, pmw, pmr):
    # _quadrant(x, y, r) step for step, with the square roots and arcsines of its chord integrals precomputed:
    # xc = min(x, r) and pxc = _prim(clamped xc) per corner column; w = sqrt(r² - y²), pw, pmw = _prim(clamped ±w)
    # per corner row; pmr = _prim(-r). Every _prim argument of _quadrant is one of -r, xc, ±w (min picks one).
    if x <= -r or y <= -r:
        return 0.0
    if y >= r:
        return 2.0 * _ci_pre(-r, pmr, xc, pxc, r)
    if y >= 0.0:
        lo = min(xc, -w)
        area = 2.0 * _ci_pre(-r, pmr, lo, pxc if lo == xc else pmw, r)
        if xc > -w:
            hi = min(xc, w)
            area += y * (hi + w) + _ci_pre(-w, pmw, hi, pxc if hi == xc else pw, r)
        if xc > w:
            area += 2.0 * _ci_pre(w, pw, xc, pxc, r)
        return area
    if xc <= -w:
        return 0.0
    hi = min(xc, w)
    return y * (hi + w) + _ci_pre(-w, pmw, hi, pxc if hi == xc else pw, r)


@numba.njit(cache=True, nogil=True, fastmath=False)  # exact areas: no reassociation
def _circle_weights(cx, cy, r, gx0, gy0, h, w, weights):
    # weights[i, j] = circle_pixel_area(cx, cy, r, gx0 + j, gy0 + i, gx0 + j + 1, gy0 + i + 1), bit for bit: the
    # same quadrant terms, with the transcendental parts computed once per corner column and row instead of for
    # each of the four corners of each pixel the circle cuts.
    if not r > 0.0:  # an empty circle covers nothing (as circle_pixel_area says)
        return
    r2 = r * r
    xs = np.empty(w + 1)
    xc = np.empty(w + 1)
    pxc = np.empty(w + 1)
    for j in range(w + 1):
        xs[j] = (gx0 + j) - cx
        xc[j] = min(xs[j], r)
        pxc[j] = _prim(min(max(xc[j], -r), r), r) if xs[j] > -r else 0.0
    ys = np.empty(h + 1)
    wr = np.empty(h + 1)
    pw = np.empty(h + 1)
    pmw = np.empty(h + 1)
    for i in range(h + 1):
        ys[i] = (gy0 + i) - cy
        if -r < ys[i] < r:
            wr[i] = math.sqrt(r * r - ys[i] * ys[i])
            pw[i] = _prim(min(max(wr[i], -r), r), r)
            pmw[i] = _prim(min(max(-wr[i], -r), r), r)
        else:
            wr[i] = pw[i] = pmw[i] = 0.0
    pmr = _prim(-r, r)
    for i in range(h):
        py = gy0 + i
        fy = max(abs(py - cy), abs(py + 1.0 - cy))
        ny_ = max(0.0, max(py - cy, cy - py - 1.0))
        # Along a row, "whole pixel inside" and "pixel touches the disc" each hold on one run of columns (the
        # pixel's farthest and nearest x distances to the centre fall, then rise), so the row is scanned from both
        # ends up to the inside run, which is filled with 1 without testing its pixels. Every pixel is classified
        # by the same tests as in circle_pixel_area, so the weights stay bit-identical to it.
        j = 0
        while j < w and not _inside(gx0 + j, cx, fy, r2):
            if _touches(gx0 + j, cx, ny_, r2):
                weights[i, j] = _cut_area(i, j, xs, ys, r, xc, pxc, wr, pw, pmw, pmr)
            j += 1
        if j == w:
            continue
        k = w - 1
        while not _inside(gx0 + k, cx, fy, r2):
            if _touches(gx0 + k, cx, ny_, r2):
                weights[i, k] = _cut_area(i, k, xs, ys, r, xc, pxc, wr, pw, pmw, pmr)
            k -= 1
        weights[i, j : k + 1] = 1.0


@numba.njit(inline="always")
def _inside(px, cx, fy, r2):
    # the whole pixel [px, px + 1) × row lies in the disc (its farthest corner does)
    fx = max(abs(px - cx), abs(px + 1.0 - cx))
    return fx * fx + fy * fy <= r2


@numba.njit(inline="always")
def _touches(px, cx, ny_, r2):
    # the pixel's nearest point lies strictly inside the disc
    nx_ = max(0.0, max(px - cx, cx - px - 1.0))
    return nx_ * nx_ + ny_ * ny_ < r2


@numba.njit(inline="always")
def _cut_area(i, j, xs, ys, r, xc, pxc, wr, pw, pmw, pmr):
    # circle_pixel_area of window pixel (i, j), from the precomputed corner terms
    q11 = _quadrant_pre(xs[j + 1], ys[i + 1], r, xc[j + 1], pxc[j + 1], wr[i + 1], pw[i + 1], pmw[i + 1], pmr)
    q01 = _quadrant_pre(xs[j], ys[i + 1], r, xc[j], pxc[j], wr[i + 1], pw[i + 1], pmw[i + 1], pmr)
    q10 = _quadrant_pre(xs[j + 1], ys[i], r, xc[j + 1], pxc[j + 1], wr[i], pw[i], pmw[i], pmr)
    q00 = _quadrant_pre(xs[j], ys[i], r, xc[j], pxc[j], wr[i], pw[i], pmw[i], pmr)
    return max(0.0, q11 - q01 - q10 + q00)


@numba.njit(cache=True, nogil=True, fastmath=False)  # exact areas: no reassociation
def _shape_weights(s, gx0, gy0, h, w, kind, cx, cy, rad, ring_ptr, ring_sign, vx, vy, shape_ptr, weights):
    # Exact area of shape s in each pixel of the (h, w) window at global pixel (gy0, gx0), into the zeroed weights.
    if kind[s] == 0:
        _circle_weights(cx[s], cy[s], rad[s], gx0, gy0, h, w, weights)
        return
    m = 8
    for ring in range(shape_ptr[s], shape_ptr[s + 1]):
        m = max(m, 2 * (ring_ptr[ring + 1] - ring_ptr[ring]) + 8)
    bx = np.empty(m)
    by = np.empty(m)
    tx = np.empty(m)
    ty = np.empty(m)
    for ring in range(shape_ptr[s], shape_ptr[s + 1]):
        xs = vx[ring_ptr[ring] : ring_ptr[ring + 1]]
        ys = vy[ring_ptr[ring] : ring_ptr[ring + 1]]
        sign = ring_sign[ring]
        for i in range(h):
            for j in range(w):
                px = gx0 + j
                py = gy0 + i
                a = abs(_clip_area(xs, ys, px, py, px + 1.0, py + 1.0, bx, by, tx, ty))
                weights[i, j] += sign * a


@numba.njit(parallel=True, cache=True, nogil=True, fastmath=_FASTMATH)
def _shapes_sum(
    img, chan, oy, ox, ids, win, band_ptr, kind, cx, cy, rad, ring_ptr, ring_sign, vx, vy, shape_ptr, out, wout
):
    # One task per band of shapes (tops within about one window height, sorted by x): the exact weights of the
    # band's windows (win: x0, y0, x1, y1 in global pixels) are computed once and stay in cache while, channel by
    # channel, the band's pixel rows are read top to bottom and each row left to right through the windows it
    # crosses, so the map streams instead of being read in small scattered windows.
    for b in numba.prange(band_ptr.size - 1):
        k0 = band_ptr[b]
        k1 = band_ptr[b + 1]
        woff = np.empty(k1 - k0 + 1, dtype=np.int64)
        woff[0] = 0
        y0 = win[k0, 1]
        y1 = y0
        for k in range(k0, k1):
            woff[k - k0 + 1] = woff[k - k0] + (win[k, 2] - win[k, 0]) * (win[k, 3] - win[k, 1])
            y0 = min(y0, win[k, 1])
            y1 = max(y1, win[k, 3])
        wbuf = np.empty(woff[k1 - k0], dtype=np.float64)
        for k in range(k0, k1):
            s = ids[k]
            h = win[k, 3] - win[k, 1]
            w = win[k, 2] - win[k, 0]
            flat = wbuf[woff[k - k0] : woff[k - k0 + 1]]
            flat[:] = 0.0
            _shape_weights(
                s, win[k, 0], win[k, 1], h, w, kind, cx, cy, rad, ring_ptr, ring_sign, vx, vy, shape_ptr,
                flat.reshape((h, w)),
            )  # fmt: skip
            total = 0.0
            for q in range(flat.size):
                total += flat[q]
            wout[s] += total
        acc = np.empty(k1 - k0)
        for ci in range(chan.size):
            c = chan[ci]
            acc[:] = 0.0
            for y in range(y0, y1):
                for k in range(k0, k1):
                    if win[k, 1] <= y < win[k, 3]:
                        w = win[k, 2] - win[k, 0]
                        off = woff[k - k0] + (y - win[k, 1]) * w
                        row = img[c, y - oy, win[k, 0] - ox : win[k, 2] - ox]
                        if y + 2 < win[k, 3]:  # the window two rows down: short runs defeat the hardware prefetcher
                            ahead = img[c, y + 2 - oy, win[k, 0] - ox : win[k, 2] - ox]
                            for q in range(0, w, 16):
                                _prefetch(ahead, q)
                        wrow = wbuf[off : off + w]
                        a = 0.0
                        for j in range(w):  # indices from 0: vectorised
                            a += wrow[j] * row[j]
                        acc[k - k0] += a
            for k in range(k0, k1):
                out[ids[k], ci] += acc[k - k0]


@numba.njit(cache=True)
def _shape_bands(top, max_rows):
    # Bands of consecutive shapes (sorted by window top) whose tops lie within max_rows rows.
    n = top.size
    band_ptr = np.empty(n + 1, dtype=np.int64)
    band_ptr[0] = 0
    nb = 0
    first = top[0] if n else 0
    for k in range(1, n):
        if top[k] - first >= max_rows:
            nb += 1
            band_ptr[nb] = k
            first = top[k]
    if n:
        nb += 1
        band_ptr[nb] = n
    return band_ptr[: nb + 1].copy()


def shapes_sum(
    img: np.ndarray,
    origin: tuple[int, int],
    geometry: dict[str, np.ndarray],
    ids: np.ndarray,
    out: np.ndarray,
    wout: np.ndarray,
    channels: np.ndarray | None = None,
) -> None:
    """Add exact area-weighted sums of a raster block over circles and polygons to ``out``.

    Parameters
    ----------
    img
        ``(c, ny, nx)`` float32/float64 block whose pixel ``(0, 0)`` is global pixel ``origin = (row, col)``.
    origin
        Global pixel position of the block.
    geometry
        Arrays in global pixel coordinates: ``kind`` (int8, 0 = circle, 1 = polygon), ``cx``, ``cy``, ``r``
        (circles), ``bbox`` (``(n, 4)`` x0, y0, x1, y1), ``ring_ptr``, ``ring_sign`` (+1 exterior, -1 hole),
        ``vx``, ``vy`` (ring vertices, concatenated), ``shape_ptr`` (rings of shape ``s`` are
        ``shape_ptr[s] … shape_ptr[s+1]-1``).
    ids
        int64 indices of the shapes to process (those whose bbox meets the block).
    out, wout
        ``(n_shapes, n_channels)`` and ``(n_shapes,)`` float64 accumulators: weighted sums and covered area in
        pixels; column ``i`` of ``out`` is channel ``channels[i]``.
    channels
        Channels of ``img`` to aggregate (default all).
    """
    g = geometry
    img = np.ascontiguousarray(img)
    chan = _channels(channels, img.shape[0])
    oy, ox = int(origin[0]), int(origin[1])
    _, ny, nx = img.shape
    ids = np.asarray(ids, dtype=np.int64)
    bbox = g["bbox"][ids]
    # each shape's window: its bbox in global pixels, clipped to this block
    win = np.empty((ids.size, 4), dtype=np.int64)
    win[:, 0] = np.maximum(np.floor(bbox[:, 0]), ox)
    win[:, 1] = np.maximum(np.floor(bbox[:, 1]), oy)
    win[:, 2] = np.minimum(np.ceil(bbox[:, 2]), ox + nx)
    win[:, 3] = np.minimum(np.ceil(bbox[:, 3]), oy + ny)
    keep = (win[:, 2] > win[:, 0]) & (win[:, 3] > win[:, 1])
    ids, win = ids[keep], win[keep]
    if ids.size == 0:
        return
    # bands about one window high, each sorted by x
    order = np.lexsort((win[:, 0], win[:, 1]))
    ids, win = ids[order], win[order]
    band_ptr = _shape_bands(win[:, 1], max(1, int(np.median(win[:, 3] - win[:, 1]))))
    order = np.lexsort((win[:, 0], np.repeat(np.arange(band_ptr.size - 1), np.diff(band_ptr))))
    ids, win = ids[order], win[order]
    kernel = _shapes_sum if _parallel_ok() else _shapes_sum_serial
    kernel(
        img, chan, oy, ox, ids, win, band_ptr, g["kind"], g["cx"], g["cy"], g["r"], g["ring_ptr"], g["ring_sign"],
        g["vx"], g["vy"], g["shape_ptr"], out, wout,
    )  # fmt: skip


# Serial twins for threads where numba's threading layer is not thread-safe ("workqueue"): prange runs as range.
_rect_sum_serial = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)(_rect_sum_parallel.py_func)
_gather_units_serial = numba.njit(cache=True, nogil=True)(_gather_units.py_func)
_labels_sum_serial = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)(_labels_sum.py_func)
_shapes_sum_serial = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)(_shapes_sum.py_func)
