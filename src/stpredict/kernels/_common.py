"""Helpers shared by the aggregation kernels: fastmath flags, a prefetch hint, interval sums, thread and channel checks.

Every kernel takes plain arrays and writes into preallocated outputs, so the callers can run them block by block
on dask-backed maps and add the partial results. Geometry is in the raster's pixel space: pixel ``(i, j)``
covers ``[j, j+1) × [i, i+1)``. Only float32 and float64 rasters are passed in (callers cast other dtypes), so
each kernel compiles at most twice per output dtype.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_FASTMATH = {"reassoc", "contract"}  # vectorised sums; NaN and inf keep their IEEE meaning


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
