"""Numba kernels for exact area-weighted sums of a raster over separable grids of rectangles (square bins).

:func:`rect_sum` adds the sums of a grid of rectangles to a grid of sums (block by block), :func:`rect_sum_units`
writes them straight into the rows of a table, and :func:`gather_units` copies per-unit rows out of a grid of sums.

Axis tables
    A 1-D interval ``[a, b)`` clipped to ``[0, n)`` covers pixels ``lo … hi-1``; ``w_lo`` is the overlap of
    pixel ``lo`` and ``w_hi`` that of pixel ``hi-1`` (when ``hi - lo == 1`` both equal ``b - a``); inner
    pixels have weight 1. :func:`axis_table` builds these tables for a set of intervals. The overlap area of a
    rectangle with a pixel is the product of the two axis overlaps, so square bins (and labels at any resolution
    with an axis-aligned transformation) are separable weighted sums over contiguous rows.
"""

from __future__ import annotations

import numba
import numpy as np

from ._common import _FASTMATH, _channels, _parallel_ok, _prefetch, _row_interval

__all__ = ["axis_table", "gather_units", "rect_sum", "rect_sum_units"]

_SNAP = 1e-9  # interval ends this close to an integer are snapped to it (float noise on bin edges)


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


# Serial twins for threads where numba's threading layer is not thread-safe ("workqueue"): prange runs as range.
_rect_sum_serial = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)(_rect_sum_parallel.py_func)
_gather_units_serial = numba.njit(cache=True, nogil=True)(_gather_units.py_func)
