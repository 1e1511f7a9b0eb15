"""Computing one work unit of :func:`stpredict.tl.predict_dense`: predicting its tiles and blending them.

The unit's tiles are cut from the slide, the model is called on them in batches (the batch is halved when the GPU
runs out of memory), and the predictions are weighted by the tile window and summed into the unit's normalised
block, plus the carry of sums that reaches into the unit below.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from stpredict._errors import InputError
from stpredict._logging import get_logger

from ._slide_reader import SlideReader, read_model_region

if TYPE_CHECKING:
    from stpredict.models._base import DenseModel

    from ._dense_plan import DensePlan

__all__ = ["Predictor", "UnitInput", "blend_unit", "prepare_unit"]

logger = get_logger(__name__)


class Predictor:
    """Calls the model in batches; on a CUDA out-of-memory error halves the batch and retries."""

    def __init__(self, model: DenseModel, batch_size: int, device: str) -> None:
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.n_calls = 0
        self.seconds = 0.0  # in the model
        self.blend_seconds = 0.0

    def __call__(self, tiles: np.ndarray, origins: np.ndarray | None = None) -> np.ndarray:
        """Predictions for ``tiles``; ``origins`` (model pixels, ``(n, 2)`` y, x) go to models that use them."""
        out = []
        start = 0
        uses_origins = bool(getattr(self.model, "uses_tile_origins", False))
        while start < len(tiles):
            batch = tiles[start : start + self.batch_size]
            t0 = time.perf_counter()
            try:
                if uses_origins:
                    where = origins[start : start + len(batch)]
                    pred = np.asarray(self.model.predict_tiles(batch, origins=where, device=self.device))
                else:
                    pred = np.asarray(self.model.predict_tiles(batch, device=self.device))
                self.seconds += time.perf_counter() - t0
            except Exception as err:
                if not _is_cuda_oom(err):
                    raise
                if self.batch_size == 1:
                    msg = (
                        "The GPU ran out of memory with batch_size=1. Free GPU memory, use a smaller model tile "
                        "size, or run on the CPU with `device='cpu'`."
                    )
                    raise MemoryError(msg) from err
                self.batch_size = max(1, self.batch_size // 2)
                logger.warning("GPU out of memory; retrying with batch_size=%d.", self.batch_size)
                _empty_cuda_cache()
                continue
            self.n_calls += 1
            out.append(pred)
            start += len(batch)
        return np.concatenate(out) if len(out) > 1 else out[0]


def _is_cuda_oom(err: BaseException) -> bool:
    torch = sys.modules.get("torch")  # a model that runs on a GPU has imported torch; never import it here
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None) if torch is not None else None
    return oom is not None and isinstance(err, oom)


def _empty_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class UnitInput:
    """The tiles of one unit and the slide region they are cut from."""

    unit: tuple[int, int]
    tiles: list[tuple[int, int]]
    uses_carry: bool
    region: np.ndarray | None = None
    origin: tuple[int, int] = (0, 0)  # model-pixel position of region[:, 0, 0]
    seconds: float = 0.0


def prepare_unit(plan: DensePlan, reader: SlideReader, unit: tuple[int, int], use_carry: bool) -> UnitInput:
    """List the tiles of ``unit`` and read (and resample) the slide region under them.

    Without ``use_carry`` the tile row above the chunk row is included (its falling ramp reaches the
    block's first ``ramp`` rows); with it, that row's contribution comes from the carry of the unit above.
    """
    t0 = time.perf_counter()
    gy, gx = plan.gy, plan.gx
    j, p = unit
    y0, y1 = gy.chunk_bounds(j)
    x0, x1 = plan.panel_bounds(p)
    rows = list(gy.tiles_for(y0, y1))
    uses_carry = bool(use_carry and rows and rows[0] * gy.stride < y0)
    if uses_carry:
        rows = rows[1:]
    cols = gx.tiles_for(x0, x1)
    tiles = [(ky, kx) for ky in rows for kx in cols if plan.run[ky, kx]]
    inp = UnitInput(unit, tiles, uses_carry)
    if tiles:
        s, t = plan.stride, plan.tile
        kys = [k[0] for k in tiles]
        kxs = [k[1] for k in tiles]
        my0, mx0 = int(gy.origin(min(kys))) * s, int(gx.origin(min(kxs))) * s
        my1, mx1 = int(gy.origin(max(kys))) * s + t, int(gx.origin(max(kxs))) * s + t
        inp.region = read_model_region(reader, plan.ratio, my0, my1, mx0, mx1)
        inp.origin = (my0, mx0)
    inp.seconds = time.perf_counter() - t0
    return inp


def blend_unit(
    plan: DensePlan,
    predictor: Predictor,
    inp: UnitInput,
    carry: tuple[np.ndarray, np.ndarray] | None,
    buffers: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None, bool]:
    """Predict and blend the tiles of one unit into its normalised block, its carry and whether any tile counted.

    Sums are accumulated from zero in row-major tile order, and the carry of the unit above holds exactly the
    sums the recomputed tile row above would give, so both ways yield bit-identical blocks.
    """
    gy, gx = plan.gy, plan.gx
    j, p = inp.unit
    y0, y1 = gy.chunk_bounds(j)
    x0, x1 = plan.panel_bounds(p)
    y_end = min(y1 + gy.ramp, gy.size)  # rows accumulated, including the carry into the next chunk row
    n_genes = len(plan.channels)
    if buffers is None:
        acc = np.zeros((n_genes, y_end - y0, x1 - x0), dtype=np.float32)
        wsum = np.zeros((y_end - y0, x1 - x0), dtype=np.float32)
    else:  # reused: filling is cheaper than faulting in fresh pages
        acc, wsum = buffers
        acc.fill(0)
        wsum.fill(0)
    carried = inp.uses_carry and carry is not None
    if carried:
        acc[:, : carry[1].shape[0]] = carry[0]
        wsum[: carry[1].shape[0]] = carry[1]
    identity = plan.channels.size and np.array_equal(plan.channels, np.arange(plan.channels.size))
    s, n, t = plan.stride, gy.n, plan.tile
    my0, mx0 = inp.origin
    batch = max(1, predictor.batch_size)
    for start in range(0, len(inp.tiles), batch):
        chunk = inp.tiles[start : start + batch]
        inputs = np.stack(
            [
                inp.region[
                    :,
                    gy.origin(ky) * s - my0 : gy.origin(ky) * s - my0 + t,
                    gx.origin(kx) * s - mx0 : gx.origin(kx) * s - mx0 + t,
                ]
                for ky, kx in chunk
            ]
        )
        origins = np.array([(gy.origin(ky) * s, gx.origin(kx) * s) for ky, kx in chunk], dtype=np.int64)
        preds = predictor(inputs, origins)
        if preds.ndim != 4 or preds.shape[2:] != (n, n) or preds.shape[0] != len(chunk):
            msg = (
                f"The model returned an array of shape {preds.shape} for {len(chunk)} tiles of {t} px; "
                f"expected (batch, genes, {n}, {n}) (tile_size // output_stride)."
            )
            raise InputError(msg)
        if preds.dtype != np.float32:
            preds = preds.astype(np.float32)
        t_blend = time.perf_counter()
        for (ky, kx), pred in zip(chunk, preds, strict=True):
            oy, ox = int(gy.origin(ky)), int(gx.origin(kx))
            a, b = max(oy, y0), min(oy + n, y_end)
            c, d = max(ox, x0), min(ox + n, x1)
            if a >= b or c >= d:
                continue
            w = plan.window[a - oy : b - oy, c - ox : d - ox]
            part = pred[:, a - oy : b - oy, c - ox : d - ox] if identity else pred[plan.channels, a - oy : b - oy]
            if not identity:
                part = part[:, :, c - ox : d - ox]
            part = np.multiply(part, w, out=part)  # the model's output (or a copy of its channels) is ours
            acc[:, a - y0 : b - y0, c - x0 : d - x0] += part
            wsum[a - y0 : b - y0, c - x0 : d - x0] += w
        predictor.blend_seconds += time.perf_counter() - t_blend
    h = y1 - y0
    new_carry = (acc[:, h:].copy(), wsum[h:].copy()) if y_end > y1 else None
    inverse = np.zeros((h, x1 - x0), dtype=np.float32)
    np.divide(1.0, wsum[:h], out=inverse, where=wsum[:h] > 0)
    block = acc[:, :h]  # normalised in place: a view, no second block-sized array
    block *= inverse
    touched = bool(inp.tiles) or (carried and bool(carry[1].any()))
    return block, new_carry, touched
