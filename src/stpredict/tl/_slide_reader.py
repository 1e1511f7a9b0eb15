"""Reading rectangles of a slide level for :func:`stpredict.tl.predict_dense`, each source chunk decoded once.

:func:`read_model_region` resamples such a rectangle from the level's pixels to the model's.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._tiling import resample_matrix

__all__ = ["FILL_VALUE", "SlideReader", "read_model_region"]

#: White, the glass background of an H&E scan: the value of pixels outside the slide.
FILL_VALUE = 255
#: Source chunks larger than this are read slice by slice instead of being kept whole.
MAX_CACHED_CHUNK_BYTES = 64 * 2**20


class SlideReader:
    """Reads pixel rectangles of the first three channels of a ``(c, y, x)`` slide level as uint8.

    ``predict_dense`` reads one region per unit, top to bottom within a panel of columns, and neighbouring
    regions share rows (a tile's height at least). With a chunked (dask) level, every source chunk a region
    needs is computed whole (dask computes whole chunks anyway), and those that reach into the last
    ``keep_rows`` rows of the region (or below it) are kept for the next read, so a chunk under two units is
    decoded once, not twice. Other arrays (numpy, or dask chunks over ``MAX_CACHED_CHUNK_BYTES``) are sliced
    directly.

    Parameters
    ----------
    array
        The level, numpy or dask, ``(c, y, x)`` with at least three channels.
    keep_rows
        Rows at the bottom of a region that the next region may read again: the chunks that reach into them (or
        below the region) are kept until the next read.
    """

    def __init__(self, array: Any, *, keep_rows: int = 0) -> None:
        self.array = array
        self.keep_rows = keep_rows
        self._cache: dict[tuple[int, int], np.ndarray] = {}
        self.n_computed = 0  # chunks computed (for tests and logging)
        chunks = getattr(array, "chunks", None)
        self._chunked = (
            isinstance(chunks, tuple)
            and len(chunks) == 3
            and all(isinstance(c, tuple) for c in chunks)
            and max(chunks[1]) * max(chunks[2]) * 3 * array.dtype.itemsize <= MAX_CACHED_CHUNK_BYTES
        )
        if self._chunked:
            self._ybounds = np.concatenate([[0], np.cumsum(chunks[1])])
            self._xbounds = np.concatenate([[0], np.cumsum(chunks[2])])

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0, y1) × [x0, x1)`` as uint8 ``(3, y1 - y0, x1 - x0)``; white outside the slide."""
        ny, nx = self.array.shape[1], self.array.shape[2]
        out = np.full((3, y1 - y0, x1 - x0), FILL_VALUE, dtype=np.uint8)
        cy0, cy1, cx0, cx1 = max(y0, 0), min(y1, ny), max(x0, 0), min(x1, nx)
        if cy1 <= cy0 or cx1 <= cx0:
            return out
        if not self._chunked:
            part = self.array[:3, cy0:cy1, cx0:cx1]
            if hasattr(part, "compute"):
                part = part.compute(scheduler="threads")
            out[:, cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0] = np.asarray(part)
            return out
        yb, xb = self._ybounds, self._xbounds
        rows = range(int(np.searchsorted(yb, cy0, "right")) - 1, int(np.searchsorted(yb, cy1, "left")))
        cols = range(int(np.searchsorted(xb, cx0, "right")) - 1, int(np.searchsorted(xb, cx1, "left")))
        needed = [(i, j) for i in rows for j in cols]
        missing = [k for k in needed if k not in self._cache]
        if missing:
            import dask

            parts = [self.array[:3, yb[i] : yb[i + 1], xb[j] : xb[j + 1]] for i, j in missing]
            for k, block in zip(missing, dask.compute(*parts, scheduler="threads"), strict=True):
                self._cache[k] = np.asarray(block)
            self.n_computed += len(missing)
        for i, j in needed:
            a, b = max(yb[i], cy0), min(yb[i + 1], cy1)
            c, d = max(xb[j], cx0), min(xb[j + 1], cx1)
            block = self._cache[i, j]
            out[:, a - y0 : b - y0, c - x0 : d - x0] = block[:, a - yb[i] : b - yb[i], c - xb[j] : d - xb[j]]
        self._cache = {k: self._cache[k] for k in needed if yb[k[0] + 1] > cy1 - self.keep_rows}
        return out


def read_model_region(
    reader: SlideReader, ratio: tuple[float, float], my0: int, my1: int, mx0: int, mx1: int
) -> np.ndarray:
    """Model pixels ``[my0, my1) × [mx0, mx1)`` of the slide, resampled from the level (uint8 ``(3, h, w)``)."""
    ry, rx = ratio
    if ry == 1.0 and rx == 1.0:
        return reader.read(my0, my1, mx0, mx1)
    from scipy import sparse

    wy, ly0, ly1 = resample_matrix(my0, my1, ry)
    wx, lx0, lx1 = resample_matrix(mx0, mx1, rx)
    raw = reader.read(ly0, ly1, lx0, lx1)
    sy, sx = sparse.csr_matrix(wy), sparse.csr_matrix(wx)
    out = np.empty((3, my1 - my0, mx1 - mx0), dtype=np.uint8)
    for c in range(3):  # one channel in float at a time: a third of the memory of converting the region whole
        rows = sy @ raw[c].astype(np.float32)
        out[c] = np.clip(np.rint((sx @ rows.T).T), 0, 255).astype(np.uint8)
    return out
