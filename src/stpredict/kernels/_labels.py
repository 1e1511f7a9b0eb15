"""Numba kernels for area-weighted sums of a raster over the labels of a label image (segmentation masks).

The label image is mapped onto the raster's pixel grid by an axis-aligned transformation, at any resolution:
:func:`label_lut` maps label ids to compact indices in one pass, and :func:`labels_sum` adds each label pixel's
exact overlap with the raster's pixels (separable :func:`~stpredict.kernels.axis_table` weights) to its label's
sums, with each label's covered area and centroid.
"""

from __future__ import annotations

import numba
import numpy as np

from ._bins import axis_table
from ._common import _FASTMATH, _channels, _parallel_ok, _row_interval

__all__ = ["label_lut", "labels_sum"]


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


# Serial twin for threads where numba's threading layer is not thread-safe ("workqueue"): prange runs as range.
_labels_sum_serial = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)(_labels_sum.py_func)
