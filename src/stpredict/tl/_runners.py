"""Running the work units of :func:`stpredict.tl.predict_dense`, in this process or on a dask.distributed cluster.

:func:`run_local` computes the units in order, reading the slide ahead and writing blocks behind in background
threads; :func:`run_distributed` computes them on a cluster's workers, whose blocks come back here. Both hand each
finished block to ``write``.
"""

from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._logging import get_logger

from ._blending import Predictor, blend_unit, prepare_unit
from ._slide_reader import SlideReader

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from stpredict.models._base import DenseModel

    from ._dense_plan import DensePlan

__all__ = ["run_distributed", "run_local"]

logger = get_logger(__name__)

#: The sums (weighted predictions, weights) a unit carries into the unit below it.
Carry = tuple[np.ndarray, np.ndarray]


def _acc_shape(plan: DensePlan, unit: tuple[int, int]) -> tuple[int, int, int]:
    y0, y1 = plan.gy.chunk_bounds(unit[0])
    x0, x1 = plan.panel_bounds(unit[1])
    return len(plan.channels), min(y1 + plan.gy.ramp, plan.gy.size) - y0, x1 - x0


def run_local(
    plan: DensePlan,
    array: Any,
    predictor: Predictor,
    units: list[tuple[int, int]],
    write: Any,
    carry_into: Callable[[tuple[int, int]], Carry | None] | None = None,
) -> float:
    """Compute units in order, reading ahead and writing behind in background threads; return seconds reading.

    The next unit's slide region is read, and finished blocks are written, while the model runs. At most two
    blocks wait for writing, so memory stays bounded. ``write(unit, block, carry)`` gets each block and the sums
    the unit carries into the unit below. A unit whose unit above is not computed just before it takes those sums
    from ``carry_into(unit)`` (a resumed run: the interrupted run stored them), so that it predicts the same tiles
    in the same batches as an uninterrupted run; only without them is the tile row above predicted again.
    """
    if not units:
        return 0.0
    position = {u: i for i, u in enumerate(units)}

    def chained(i: int) -> bool:
        j, p = units[i]
        return position.get((j - 1, p), -2) == i - 1

    stored = {i: c for i, u in enumerate(units) if not chained(i) and carry_into and (c := carry_into(u)) is not None}

    def use_carry(i: int) -> bool:
        return chained(i) or i in stored

    read_seconds = 0.0
    # the next unit of a panel reads from at most one tile (plus resampling support) above this one's last row
    reader = SlideReader(array, keep_rows=math.ceil(plan.tile * plan.ratio[0]) + 4)
    carry: Carry | None = None
    free: dict[tuple[int, ...], list] = {}  # accumulator buffers by shape, reused once their block is written
    with ThreadPoolExecutor(1) as read_ahead, ThreadPoolExecutor(1) as writer:
        pending: deque = deque()
        nxt = read_ahead.submit(prepare_unit, plan, reader, units[0], use_carry(0))
        try:
            for i, unit in enumerate(units):
                inp = nxt.result()
                read_seconds += inp.seconds
                if i + 1 < len(units):
                    nxt = read_ahead.submit(prepare_unit, plan, reader, units[i + 1], use_carry(i + 1))
                shape = _acc_shape(plan, unit)
                if shape not in free:  # a new shape (edge units): let buffers of other shapes go
                    free.clear()
                buffers = (
                    free[shape].pop()
                    if free.get(shape)
                    else (np.empty(shape, np.float32), np.empty(shape[1:], np.float32))
                )
                carry_in = carry if chained(i) else stored.pop(i, None)
                block, carry, touched = blend_unit(plan, predictor, inp, carry_in, buffers)
                pending.append((writer.submit(write, unit, block if touched else None, carry), shape, buffers))
                while len(pending) > 1:
                    future, done_shape, done_buffers = pending.popleft()
                    future.result()
                    free.setdefault(done_shape, []).append(done_buffers)
            while pending:
                pending.popleft()[0].result()
        finally:
            nxt.cancel()
    logger.debug("predict_dense: %d source chunks computed.", reader.n_computed)
    return read_seconds


class _Source:
    """Holds the slide level so that ``client.scatter`` ships it as an object, never computing a dask array."""

    def __init__(self, array: Any) -> None:
        self.array = array


def _remote_unit(
    plan: DensePlan, source: _Source, model: DenseModel, batch_size: int, device: str, unit: tuple[int, int]
) -> tuple[tuple[int, int], np.ndarray | None, int]:
    predictor = Predictor(model, batch_size, device)
    block, _, touched = blend_unit(plan, predictor, prepare_unit(plan, SlideReader(source.array), unit, False), None)
    return unit, (block if touched else None), predictor.n_calls


def run_distributed(
    client: Any,
    plan: DensePlan,
    array: Any,
    model: DenseModel,
    batch_size: int,
    device: str,
    units: list[tuple[int, int]],
    write: Any,
) -> None:
    """Compute units on a dask.distributed cluster; blocks come back here and are written as they finish."""
    from distributed import as_completed

    model_f = client.scatter(model, broadcast=True)
    array_f = client.scatter(_Source(array), broadcast=True)
    plan_f = client.scatter(plan, broadcast=True)
    window = 2 * max(1, sum(client.nthreads().values()))  # bounded number of blocks in flight
    pending = iter(units)
    futures = as_completed()
    for unit in _take(pending, window):
        futures.add(client.submit(_remote_unit, plan_f, array_f, model_f, batch_size, device, unit, pure=False))
    for future in futures:
        unit, block, _ = future.result()
        write(unit, block, None)
        del future
        for nxt in _take(pending, 1):
            futures.add(client.submit(_remote_unit, plan_f, array_f, model_f, batch_size, device, nxt, pure=False))


def _take(iterator: Iterator, k: int) -> list:
    out = []
    for item in iterator:
        out.append(item)
        if len(out) == k:
            break
    return out
