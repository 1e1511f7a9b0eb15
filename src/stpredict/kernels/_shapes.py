"""Numba kernels for exact area-weighted sums of a raster over shapes (circles and polygons with holes).

:func:`shapes_sum` computes each shape's exact pixel weights (from the disc and polygon areas) over the window of
its bounding box in a block of the raster, then streams the block's rows through bands of shapes sorted by x (the
map is read row by row, not in small scattered windows), adding each shape's weighted sums and covered area to
the accumulators.
"""

from __future__ import annotations

import numba
import numpy as np

from ._areas import _circle_weights, _clip_area
from ._common import _FASTMATH, _channels, _parallel_ok, _prefetch

__all__ = ["shapes_sum"]


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


# Serial twin for threads where numba's threading layer is not thread-safe ("workqueue"): prange runs as range.
_shapes_sum_serial = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)(_shapes_sum.py_func)
