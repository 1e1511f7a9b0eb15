"""Decimal names of integer ids, for the ``obs_names`` of tables with millions of units.

``list(map(str, ids.tolist()))`` makes a Python int and then a str per id; here numba writes all the digits into one
byte buffer and ``str.split`` makes the strings in C, about twice as fast for the 263,169 bins of an 8 µm grid.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["decimal_names"]

#: Ids beyond this magnitude take the plain path (``-id`` of the smallest int64 overflows).
_MAX_ABS = 2**62


@numba.njit(cache=True, nogil=True)
def _decimal_bytes(ids):
    # "id0\nid1\n…\nidN": digits of each id (a leading "-" for negatives), newline-separated. Magnitudes are
    # unsigned, so that division by 10 compiles to a multiply and a shift.
    n = ids.size
    widths = np.empty(n, dtype=np.int64)
    total = 0
    for k in range(n):
        v = ids[k]
        a = np.uint64(v) if v >= 0 else np.uint64(-v)
        w = 1 if v >= 0 else 2
        p = np.uint64(10)
        while a >= p and w < 20:
            p *= np.uint64(10)
            w += 1
        widths[k] = w
        total += w + 1
    buf = np.empty(max(total - 1, 0), dtype=np.uint8)
    ten = np.uint64(10)
    pos = 0
    for k in range(n):
        v = ids[k]
        a = np.uint64(v) if v >= 0 else np.uint64(-v)
        end = pos + widths[k]
        i = end - 1
        while True:
            q = a // ten
            buf[i] = np.uint8(48 + (a - q * ten))
            a = q
            i -= 1
            if a == 0:
                break
        if v < 0:
            buf[pos] = 45
        if k + 1 < n:
            buf[end] = 10
        pos = end + 1
    return buf


def decimal_names(ids: np.ndarray) -> np.ndarray:
    """``str(i)`` for each integer id, as an object array (what a pandas index of strings holds).

    Parameters
    ----------
    ids
        1-D integer array.

    Returns
    -------
    Object array of Python ``str``, equal to ``np.array([str(int(i)) for i in ids], dtype=object)``.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        msg = f"ids must be a 1-D integer array, got {ids.dtype} with shape {ids.shape}."
        raise ValueError(msg)
    out = np.empty(ids.size, dtype=object)
    if ids.size == 0:
        return out
    if int(ids.max()) > _MAX_ABS or int(ids.min()) < -_MAX_ABS:
        out[:] = list(map(str, ids.tolist()))
        return out
    out[:] = _decimal_bytes(ids.astype(np.int64, copy=False)).tobytes().decode("ascii").split("\n")
    return out
