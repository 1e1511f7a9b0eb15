"""Whole-slide dense prediction: tiles over tissue, seam-free blending, chunked and resumable writing."""

from __future__ import annotations

import hashlib
import math
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import raster_shape, scale_levels, transformation_matrix, um_per_px
from stpredict._keys import Keys
from stpredict._logging import get_logger
from stpredict._meta import set_element_meta
from stpredict._settings import settings
from stpredict._version import __version__

from ._slide_reader import SlideReader
from ._tiling import AxisGrid, resample_matrix, window_1d
from ._zarr_writer import WorkStore, install_element, tmp_root

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from spatialdata import SpatialData
    from xarray import DataTree

    from stpredict.models._base import DenseModel

__all__ = ["predict_dense"]

logger = get_logger(__name__)

#: Maps up to this many bytes are kept in memory when the SpatialData is not backed and no ``tmp_dir`` is given.
IN_MEMORY_MAX_BYTES = 256 * 2**20
#: Budget for the float32 accumulator of one work unit (one chunk row × one panel of chunk columns).
UNIT_MAX_BYTES = 256 * 2**20
#: Default output chunk length in map pixels (rounded to a multiple of the tile stride).
DEFAULT_CHUNK = 512


@dataclass
class _Plan:
    """Everything a worker needs to compute one unit, picklable."""

    gy: AxisGrid
    gx: AxisGrid
    stride: int  # model pixels per map pixel
    tile: int  # model pixels
    ratio: tuple[float, float]  # level pixels per model pixel (y, x)
    run: np.ndarray  # (n_tiles_y, n_tiles_x) bool: tiles to predict
    channels: np.ndarray  # model output channels kept, in order
    panel: int  # chunk columns per panel
    window: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        wy = window_1d(self.gy.n, self.gy.context, self.gy.ramp)
        wx = window_1d(self.gx.n, self.gx.context, self.gx.ramp)
        self.window = wy[:, None] * wx[None, :]

    @property
    def n_panels(self) -> int:
        return math.ceil(self.gx.n_chunks / self.panel)

    def units(self) -> list[tuple[int, int]]:
        """Work units ``(chunk row, panel)`` in processing order: panel by panel, top to bottom."""
        return [(j, p) for p in range(self.n_panels) for j in range(self.gy.n_chunks)]

    def panel_bounds(self, p: int) -> tuple[int, int]:
        return p * self.panel * self.gx.chunk, min((p + 1) * self.panel * self.gx.chunk, self.gx.size)


class _Predictor:
    """Calls the model in batches; on a CUDA out-of-memory error halves the batch and retries."""

    def __init__(self, model: DenseModel, batch_size: int, device: str) -> None:
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.n_calls = 0
        self.seconds = 0.0  # in the model
        self.blend_seconds = 0.0

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        out = []
        start = 0
        while start < len(tiles):
            batch = tiles[start : start + self.batch_size]
            t0 = time.perf_counter()
            try:
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


def _read_model_region(
    reader: SlideReader, ratio: tuple[float, float], my0: int, my1: int, mx0: int, mx1: int
) -> np.ndarray:
    """Model pixels ``[my0, my1) × [mx0, mx1)`` of the slide, resampled from the level (uint8 ``(3, h, w)``)."""
    ry, rx = ratio
    if ry == 1.0 and rx == 1.0:
        return reader.read(my0, my1, mx0, mx1)
    from scipy import sparse

    wy, ly0, ly1 = resample_matrix(my0, my1, ry)
    wx, lx0, lx1 = resample_matrix(mx0, mx1, rx)
    raw = reader.read(ly0, ly1, lx0, lx1).astype(np.float32)
    sy, sx = sparse.csr_matrix(wy), sparse.csr_matrix(wx)
    out = np.empty((3, my1 - my0, mx1 - mx0), dtype=np.uint8)
    for c in range(3):
        rows = sy @ raw[c]
        out[c] = np.clip(np.rint((sx @ rows.T).T), 0, 255).astype(np.uint8)
    return out


@dataclass
class _UnitInput:
    """The tiles of one unit and the slide region they are cut from."""

    unit: tuple[int, int]
    tiles: list[tuple[int, int]]
    uses_carry: bool
    region: np.ndarray | None = None
    origin: tuple[int, int] = (0, 0)  # model-pixel position of region[:, 0, 0]
    seconds: float = 0.0


def _prepare_unit(plan: _Plan, reader: SlideReader, unit: tuple[int, int], use_carry: bool) -> _UnitInput:
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
    inp = _UnitInput(unit, tiles, uses_carry)
    if tiles:
        s, t = plan.stride, plan.tile
        kys = [k[0] for k in tiles]
        kxs = [k[1] for k in tiles]
        my0, mx0 = int(gy.origin(min(kys))) * s, int(gx.origin(min(kxs))) * s
        my1, mx1 = int(gy.origin(max(kys))) * s + t, int(gx.origin(max(kxs))) * s + t
        inp.region = _read_model_region(reader, plan.ratio, my0, my1, mx0, mx1)
        inp.origin = (my0, mx0)
    inp.seconds = time.perf_counter() - t0
    return inp


def _blend_unit(
    plan: _Plan,
    predictor: _Predictor,
    inp: _UnitInput,
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
        preds = predictor(inputs)
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


class _Source:
    """Holds the slide level so that ``client.scatter`` ships it as an object, never computing a dask array."""

    def __init__(self, array: Any) -> None:
        self.array = array


def _remote_unit(
    plan: _Plan, source: _Source, model: DenseModel, batch_size: int, device: str, unit: tuple[int, int]
) -> tuple[tuple[int, int], np.ndarray | None, int]:
    predictor = _Predictor(model, batch_size, device)
    block, _, touched = _blend_unit(plan, predictor, _prepare_unit(plan, SlideReader(source.array), unit, False), None)
    return unit, (block if touched else None), predictor.n_calls


class _TissueMask:
    """A tissue mask (labels, 1 = tissue) and the affine from the image's full-resolution pixels to its pixels."""

    def __init__(self, sdata: SpatialData, image_key: str, tissue_key: str | None) -> None:
        self.mask, self.to_mask, self.name = _load_tissue_mask(sdata, image_key, tissue_key)

    def at_map_pixels(self, y0: int, y1: int, x0: int, x1: int, f: float) -> np.ndarray:
        """Tissue (bool) at the centres of map pixels ``[y0, y1) × [x0, x1)`` (``f`` image pixels per map pixel)."""
        yc = (np.arange(y0, y1) + 0.5) * f
        xc = (np.arange(x0, x1) + 0.5) * f
        a = self.to_mask
        col = np.floor(a[0, 0] * xc[None, :] + a[0, 1] * yc[:, None] + a[0, 2]).astype(np.int64)
        row = np.floor(a[1, 0] * xc[None, :] + a[1, 1] * yc[:, None] + a[1, 2]).astype(np.int64)
        inside = (row >= 0) & (row < self.mask.shape[0]) & (col >= 0) & (col < self.mask.shape[1])
        out = np.zeros(row.shape, dtype=bool)
        out[inside] = self.mask[row[inside], col[inside]]
        return out


def _load_tissue_mask(sdata: SpatialData, image_key: str, tissue_key: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """The mask (bool), the image → mask pixel affine, and the mask's name (computed if absent)."""
    from spatialdata.transformations import get_transformation

    key = tissue_key or Keys.tissue_mask(image_key)
    if key in sdata.labels:
        mask_el = sdata.labels[key]
    elif tissue_key is not None:
        msg = f"No labels {tissue_key!r} in the SpatialData; available labels: {sorted(sdata.labels)}."
        raise KeyError(msg)
    else:
        from stpredict.pp import tissue_mask

        mask_el = tissue_mask(sdata, image_key, inplace=False)
        key = f"{key} (computed)"
    image_t = get_transformation(sdata.images[image_key], get_all=True)
    mask_t = get_transformation(mask_el, get_all=True)
    shared = [cs for cs in mask_t if cs in image_t]
    if not shared:
        msg = f"The tissue mask {key!r} shares no coordinate system with image {image_key!r}; recompute it."
        raise InputError(msg)
    to_mask = np.linalg.inv(transformation_matrix(mask_t[shared[0]])) @ transformation_matrix(image_t[shared[0]])
    return np.asarray(scale_levels(mask_el)[0].data) > 0, to_mask, key


def _tissue_tiles(tissue: _TissueMask, gy: AxisGrid, gx: AxisGrid, f: float) -> np.ndarray:
    """Which tiles have tissue in their support."""
    mask, to_mask = tissue.mask, tissue.to_mask
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = mask.cumsum(0).cumsum(1)
    ky, kx = np.meshgrid(np.arange(gy.n_tiles), np.arange(gx.n_tiles), indexing="ij")
    ys0, ys1 = ky * gy.stride, np.minimum((ky + 1) * gy.stride + gy.ramp, gy.size)
    xs0, xs1 = kx * gx.stride, np.minimum((kx + 1) * gx.stride + gx.ramp, gx.size)
    corners = [(xs0, ys0), (xs1, ys0), (xs0, ys1), (xs1, ys1)]
    mx = np.stack([to_mask[0, 0] * x * f + to_mask[0, 1] * y * f + to_mask[0, 2] for x, y in corners])
    my = np.stack([to_mask[1, 0] * x * f + to_mask[1, 1] * y * f + to_mask[1, 2] for x, y in corners])
    r0 = np.clip(np.floor(my.min(0)).astype(int), 0, mask.shape[0])
    r1 = np.clip(np.ceil(my.max(0)).astype(int), 0, mask.shape[0])
    c0 = np.clip(np.floor(mx.min(0)).astype(int), 0, mask.shape[1])
    c1 = np.clip(np.ceil(mx.max(0)).astype(int), 0, mask.shape[1])
    counts = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return counts > 0


def _pick_level(image: Any, f0: float) -> tuple[int, Any, float, float]:
    """The coarsest level at least as fine as the model's pixels; level index, array, y and x factors."""
    ny0, nx0 = raster_shape(image)
    best = None
    for i, level in enumerate(scale_levels(image)):
        ay, ax = ny0 / level.sizes["y"], nx0 / level.sizes["x"]
        if best is None or max(ay, ax) <= f0 * (1 + 1e-6):
            best = (i, level, ay, ax)
    return best


def _check_model(model: Any) -> None:
    from stpredict.models._base import DenseModel

    if not isinstance(model, DenseModel):
        missing = [a for a in ("name", "var_names", "um_per_px", "output_stride", "tile_size", "context",
                               "value_kind", "predict_tiles") if not hasattr(model, a)]  # fmt: skip
        msg = f"`model` does not satisfy stpredict.models.DenseModel; it lacks {missing}."
        raise InputError(msg)
    if model.output_stride < 1 or model.tile_size % model.output_stride:
        msg = (
            f"model.tile_size ({model.tile_size}) must be a positive multiple of output_stride ({model.output_stride})."
        )
        raise InputError(msg)
    if not model.um_per_px or model.um_per_px <= 0:
        msg = f"model.um_per_px must be positive, got {model.um_per_px!r}."
        raise InputError(msg)
    if len(set(model.var_names)) != len(model.var_names) or not len(model.var_names):
        msg = "model.var_names must be a non-empty list of unique gene names."
        raise InputError(msg)
    if model.value_kind not in ("density", "intensive"):
        msg = f"model.value_kind must be 'density' or 'intensive', got {model.value_kind!r}."
        raise InputError(msg)


def predict_dense(
    sdata: SpatialData,
    model: DenseModel,
    *,
    image_key: str = Keys.image,
    key_added: str | None = None,
    genes: Sequence[str] | None = None,
    tissue_only: bool = True,
    tissue_key: str | None = None,
    batch_size: int = 16,
    device: str = "auto",
    dtype: Literal["float32", "float16"] = "float32",
    overlap_um: float | None = None,
    chunk_size: int | None = None,
    max_rescale: float = 4.0,
    overwrite: bool = False,
    client: Any | None = None,
    tmp_dir: str | Path | None = None,
    inplace: bool = True,
    show_progress_bar: bool | None = None,
) -> DataTree | None:
    """Predict dense per-gene maps over a whole slide.

    The slide is read from the pyramid level closest to, but not coarser than, the model's µm per pixel and
    resampled to it (area mean when down-sampling, linear when up-sampling). Square tiles of
    ``model.tile_size`` px overlap by ``overlap_um``; each tile's prediction is weighted by a separable window
    that is 0 on the model's ``context`` band and rises and falls as sin²/cos² across the rest of the overlap,
    and the stitched map is the weighted sum divided by the summed weights, so it has no seams. With
    ``tissue_only``, tiles whose support has no tissue are not predicted (the map is 0 there), and a density map
    is 0 outside the tissue mask (at the centres of map pixels) also inside tiles that reach the tissue; an
    intensive map keeps the model's values there, since a 0 would bias unit means at the tissue edge.

    The map is computed one *unit* (a row of output chunks × a panel of chunk columns) at a time and each
    output chunk is written once, so memory does not grow with the slide. When ``sdata`` is backed by zarr, the
    chunks go to ``<sdata.path>/.stpredict_tmp/<key>/`` with a record of finished units; an interrupted run
    leaves nothing under the final key and a rerun with the same arguments resumes there and yields the same
    map. On completion the multiscale element is written to a staging folder and moved into
    ``images/<key>`` with one rename. A non-backed ``sdata`` keeps maps up to 256 MiB in memory and larger
    ones in ``tmp_dir`` (default: a new temporary folder that the element reads from lazily, so it must stay
    until the SpatialData is written elsewhere); with ``tmp_dir`` given, runs resume there too.

    Parameters
    ----------
    sdata
        SpatialData with a calibrated RGB image (:func:`stpredict.pp.calibrate`).
    model
        Any :class:`stpredict.models.DenseModel`.
    image_key
        Key of the H&E image.
    key_added
        Key of the map; default ``Keys.dense(image_key, model.name)`` (``"he_pixnet"``).
    genes
        Genes to keep, in this order; default all of ``model.var_names``.
    tissue_only
        Predict only tiles with tissue (and set a density map to 0 outside it), from labels ``tissue_key``, else
        labels ``"<image_key>_tissue"``, else a mask computed with :func:`stpredict.pp.tissue_mask` (not stored).
    tissue_key
        Labels element of the tissue mask (1 = tissue).
    batch_size
        Tiles per model call; halved automatically (with a warning) when the GPU runs out of memory.
    device
        Passed to ``model.predict_tiles``; ``"auto"`` uses ``settings.device``.
    dtype
        Storage type of the map; blending is always done in float32.
    overlap_um
        Overlap of neighbouring tiles in µm; at least ``2 * model.context`` px. Default: twice the context plus
        an eighth of the tile.
    chunk_size
        Output chunk length in map pixels, rounded to a multiple of the tile stride; default about 512.
    max_rescale
        Largest accepted factor between the µm per pixel of the level read and the model's.
    overwrite
        Replace an existing element ``key_added``.
    client
        A :class:`dask.distributed.Client`: units are computed on its workers (model and slide sent once with
        ``client.scatter``); the blocks come back to this process, which writes them, so workers need no
        access to the output store.
    tmp_dir
        Folder for the unfinished map of a non-backed ``sdata`` (resumable).
    inplace
        Add the map to ``sdata``; with ``False`` return it (computed in memory or ``tmp_dir``).
    show_progress_bar
        Default ``settings.show_progress_bar``.

    Returns
    -------
    ``None``, or with ``inplace=False`` the map: a multiscale image (``c`` = genes, ``y``, ``x``) whose
    transformations are the image's, each preceded by ``Scale`` of the image pixels per map pixel. Its
    ``attrs["stpredict"]`` (and ``sdata.attrs["stpredict"]["elements"][key]``) record ``value_kind``,
    ``model``, ``stpredict_version``, ``um_per_px`` and ``stride``.

    Raises
    ------
    CalibrationError
        If the image's µm per pixel is unknown.
    InputError
        On genes the model lacks, a slide/model scale mismatch beyond ``max_rescale``, no tissue, a key that
        exists without ``overwrite``, or invalid sizes.
    MemoryError
        If the GPU runs out of memory even with one tile per batch.
    """
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale, Sequence, get_transformation
    from tqdm.auto import tqdm

    # ---- validation: nothing is touched before all checks pass
    if image_key not in sdata.images:
        msg = f"No image {image_key!r} in the SpatialData; available images: {sorted(sdata.images)}."
        raise KeyError(msg)
    _check_model(model)
    key = key_added or Keys.dense(image_key, model.name)
    if key == image_key:
        msg = f"key_added must differ from image_key ({image_key!r})."
        raise InputError(msg)
    existing = [g for g in ("images", "labels", "points", "shapes", "tables") if key in getattr(sdata, g)]
    if inplace and existing and not overwrite:
        msg = (
            f"sdata.{existing[0]}[{key!r}] already exists; pass `overwrite=True` to replace it, or another `key_added`."
        )
        raise InputError(msg)
    if (
        inplace
        and not existing
        and not overwrite
        and sdata.is_backed()
        and (Path(sdata.path) / "images" / key).exists()
    ):
        msg = f"An image {key!r} exists in the zarr store {sdata.path}; pass `overwrite=True` to replace it."
        raise InputError(msg)
    if inplace and existing and existing[0] != "images":
        msg = f"{key!r} is a {existing[0][:-1]} element; choose another `key_added`."
        raise InputError(msg)
    gene_list = list(model.var_names) if genes is None else list(genes)
    missing = [g for g in gene_list if g not in set(model.var_names)]
    if missing or not gene_list or len(set(gene_list)) != len(gene_list):
        msg = (
            f"The model {model.name!r} does not predict {missing[:10]}{' …' if len(missing) > 10 else ''} "
            f"({len(missing)} of {len(gene_list)} requested genes); it predicts {len(model.var_names)} genes "
            "(model.var_names). Request a subset of those, without duplicates."
        )
        raise InputError(msg)
    if dtype not in ("float32", "float16"):
        msg = f"dtype must be 'float32' or 'float16', got {dtype!r}."
        raise InputError(msg)
    if batch_size < 1:
        msg = f"batch_size must be at least 1, got {batch_size}."
        raise InputError(msg)

    image = sdata.images[image_key]
    u_img = um_per_px(sdata, image_key)
    f0 = model.um_per_px / u_img  # full-resolution image pixels per model pixel
    level_index, level, ay, ax = _pick_level(image, f0)
    ratio = (f0 / ay, f0 / ax)
    ratio = tuple(1.0 if abs(r - 1) < 1e-9 else r for r in ratio)
    worst = max(max(ratio), 1 / min(ratio))
    if worst > max_rescale:
        msg = (
            f"The slide's level {level_index} is {u_img * max(ay, ax):.4g} µm/px and the model expects "
            f"{model.um_per_px:.4g} µm/px: a {worst:.3g}× resampling (max_rescale={max_rescale:g}). Check the "
            "calibration (`st.pp.calibrate`) and the model; for a slide much finer than the model add a pyramid "
            "(`Image2DModel.parse(..., scale_factors=[2, 2, ...])`); or pass a larger `max_rescale`."
        )
        raise InputError(msg)
    if level.sizes["c"] < 3:
        msg = f"Image {image_key!r} has {level.sizes['c']} channels; predict_dense needs an RGB H&E image."
        raise InputError(msg)

    s, t = model.output_stride, model.tile_size
    n = t // s
    context = math.ceil(model.context / s)
    if overlap_um is None:
        overlap = 2 * context + max(1, n // 8)
    else:
        overlap = round(overlap_um / (model.um_per_px * s))
        if overlap < 2 * context:
            msg = (
                f"overlap_um={overlap_um:g} is less than twice the model's context "
                f"({2 * model.context * model.um_per_px:g} µm); predictions in the context band would be used."
            )
            raise InputError(msg)
    ramp = overlap - 2 * context
    stride = n - overlap
    if stride < max(1, ramp):
        msg = (
            f"The overlap ({overlap * s} px) is too large for tiles of {t} px (stride {stride * s} px must be "
            f"positive and at least the blending ramp {ramp * s} px); use a smaller `overlap_um`."
        )
        raise InputError(msg)
    ny0, nx0 = raster_shape(image)
    f = f0 * s  # full-resolution pixels per map pixel
    height, width = math.ceil(ny0 / f - 1e-9), math.ceil(nx0 / f - 1e-9)
    m = max(1, round((chunk_size or DEFAULT_CHUNK) / stride))
    chunk = m * stride
    gy = AxisGrid(height, n, context, ramp, chunk)
    gx = AxisGrid(width, n, context, ramp, chunk)
    channels = np.array([list(model.var_names).index(g) for g in gene_list])
    panel = max(1, min(gx.n_chunks, UNIT_MAX_BYTES // (4 * (len(channels) + 1) * chunk * (chunk + ramp))))

    tissue = None
    if tissue_only:
        tissue = _TissueMask(sdata, image_key, tissue_key)
        run = _tissue_tiles(tissue, gy, gx, f)
        if not run.any():
            msg = (
                f"No tissue found under image {image_key!r} in the tissue mask {tissue.name!r}; check the mask "
                "(`st.pp.tissue_mask`), or predict everywhere with `tissue_only=False`."
            )
            raise InputError(msg)
    else:
        run = np.ones((gy.n_tiles, gx.n_tiles), dtype=bool)
    plan = _Plan(gy, gx, s, t, ratio, run, channels, panel)

    # ---- work store
    shape = (len(channels), height, width)
    n_channel_chunks = math.ceil(len(channels) / 16)  # chunks of at most 16 genes, as even as possible
    zchunks = (math.ceil(len(channels) / n_channel_chunks), chunk, chunk)
    fingerprint = {
        "image": image_key,
        "image_shape": [ny0, nx0],
        "level": level_index,
        "ratio": list(ratio),
        "model": model.name,
        "var_names": hashlib.sha1("\n".join(model.var_names).encode()).hexdigest(),
        "genes": hashlib.sha1("\n".join(gene_list).encode()).hexdigest(),
        "model_geometry": [model.um_per_px, s, t, model.context],
        "grid": [n, context, ramp, chunk, panel],
        "shape": list(shape),
        "dtype": dtype,
        "tiles": hashlib.sha1(np.packbits(run).tobytes()).hexdigest(),
        "tissue": None if tissue is None else hashlib.sha1(np.packbits(tissue.mask).tobytes()).hexdigest(),
    }
    # A density (expected counts per µm²) is 0 where there is no tissue; an intensive value (e.g. log1p CPM)
    # has no value there, and a 0 would bias every unit mean that reaches the tissue edge, so it is left as is.
    mask_outside = tissue is not None and model.value_kind == "density"
    backed = inplace and sdata.is_backed()
    if backed:
        work_path: Path | None = tmp_root(Path(sdata.path)) / key
    elif tmp_dir is not None:
        work_path = Path(tmp_dir) / key
    elif np.prod(shape) * np.dtype(dtype).itemsize <= IN_MEMORY_MAX_BYTES:
        work_path = None
    else:
        work_path = Path(tempfile.mkdtemp(prefix=f"stpredict_{key}_"))
    store = WorkStore(work_path, shape, zchunks, dtype, fingerprint)

    # ---- compute, unit by unit
    dev = settings.device if device == "auto" else device
    units = [u for u in plan.units() if u not in store.done]
    progress = tqdm(
        total=len(plan.units()),
        initial=len(plan.units()) - len(units),
        desc=f"predict_dense {key}",
        unit="unit",
        disable=not (settings.show_progress_bar if show_progress_bar is None else show_progress_bar),
    )
    n_tiles = int(run.sum())
    logger.info(
        "predict_dense %r: %d tiles of %d px over tissue, map %s, %d units (%d to do).",
        key, n_tiles, t, shape, len(plan.units()), len(units),
    )  # fmt: skip

    write_seconds = [0.0]

    def write(unit: tuple[int, int], block: np.ndarray | None) -> None:
        t0 = time.perf_counter()
        if block is not None:
            y0, y1 = gy.chunk_bounds(unit[0])
            x0, x1 = plan.panel_bounds(unit[1])
            if mask_outside:  # no expression off the tissue, also inside tiles that reach it
                block = block * tissue.at_map_pixels(y0, y0 + block.shape[1], x0, x0 + block.shape[2], f)[None]
            store.array[:, y0:y1, x0:x1] = block.astype(dtype, copy=False)
        store.mark_done(unit)
        progress.update(1)
        write_seconds[0] += time.perf_counter() - t0

    t_start = time.perf_counter()
    try:
        if client is None:
            predictor = _Predictor(model, batch_size, dev)
            read_seconds = _run_local(plan, level.data, predictor, units, write)
            logger.info(
                "predict_dense %r: %.1f s; model %.1f s (%d calls), blending %.1f s, reading %.1f s (prefetched), "
                "writing %.1f s (in the background).",
                key, time.perf_counter() - t_start, predictor.seconds, predictor.n_calls, predictor.blend_seconds,
                read_seconds, write_seconds[0],
            )  # fmt: skip
        else:
            _run_distributed(client, plan, level.data, model, batch_size, dev, units, write)
    finally:
        progress.close()

    # ---- build and install the multiscale element
    import dask.array as da

    data = da.from_zarr(store.array)
    scale_factors = [2] if min(height, width) >= 2 else []  # always multiscale, halved down to ~256 px
    side = min(height, width) // 2
    while side // 2 >= 256:
        scale_factors.append(2)
        side //= 2
    transformations = {
        cs: Sequence([Scale([f, f], axes=("x", "y")), tr]) for cs, tr in get_transformation(image, get_all=True).items()
    }
    element = Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=gene_list,
        transformations=transformations,
        scale_factors=scale_factors or None,
        chunks=zchunks,
    )
    meta = {
        "value_kind": model.value_kind,
        "model": model.name,
        "stpredict_version": __version__,
        "um_per_px": float(model.um_per_px * s),
        "stride": float(f),
        "image_key": image_key,
        "tile_size": int(t),
        "overlap_px": int(overlap * s),
        "tissue_only": bool(tissue_only),
        "dtype": dtype,
    }
    if not inplace:
        element.attrs["stpredict"] = meta
        return element
    if backed:
        element = install_element(sdata, key, element, staging=store.path, overwrite=overwrite)
        sdata.images[key] = element
        set_element_meta(sdata, key, element, meta)
        sdata.write_attrs()
        store.remove()
    else:
        sdata.images[key] = element
        set_element_meta(sdata, key, element, meta)
    logger.info("Added sdata.images[%r]: %d genes, %d × %d px at %.4g µm/px.", key, shape[0], height, width, f * u_img)
    return None


def _acc_shape(plan: _Plan, unit: tuple[int, int]) -> tuple[int, int, int]:
    y0, y1 = plan.gy.chunk_bounds(unit[0])
    x0, x1 = plan.panel_bounds(unit[1])
    return len(plan.channels), min(y1 + plan.gy.ramp, plan.gy.size) - y0, x1 - x0


def _run_local(plan: _Plan, array: Any, predictor: _Predictor, units: list[tuple[int, int]], write: Any) -> float:
    """Compute units in order, reading ahead and writing behind in background threads; return seconds reading.

    The next unit's slide region is read, and finished blocks are written, while the model runs. At most two
    blocks wait for writing, so memory stays bounded.
    """
    if not units:
        return 0.0
    position = {u: i for i, u in enumerate(units)}

    def use_carry(i: int) -> bool:
        j, p = units[i]
        return position.get((j - 1, p), -2) == i - 1

    read_seconds = 0.0
    # the next unit of a panel reads from at most one tile (plus resampling support) above this one's last row
    reader = SlideReader(array, keep_rows=math.ceil(plan.tile * plan.ratio[0]) + 4)
    carry: tuple[np.ndarray, np.ndarray] | None = None
    free: dict[tuple[int, ...], list] = {}  # accumulator buffers by shape, reused once their block is written
    with ThreadPoolExecutor(1) as read_ahead, ThreadPoolExecutor(1) as writer:
        pending: deque = deque()
        nxt = read_ahead.submit(_prepare_unit, plan, reader, units[0], False)
        try:
            for i, unit in enumerate(units):
                inp = nxt.result()
                read_seconds += inp.seconds
                if i + 1 < len(units):
                    nxt = read_ahead.submit(_prepare_unit, plan, reader, units[i + 1], use_carry(i + 1))
                shape = _acc_shape(plan, unit)
                if shape not in free:  # a new shape (edge units): let buffers of other shapes go
                    free.clear()
                buffers = (
                    free[shape].pop()
                    if free.get(shape)
                    else (np.empty(shape, np.float32), np.empty(shape[1:], np.float32))
                )
                block, carry, touched = _blend_unit(plan, predictor, inp, carry, buffers)
                pending.append((writer.submit(write, unit, block if touched else None), shape, buffers))
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


def _run_distributed(
    client: Any,
    plan: _Plan,
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
        write(unit, block)
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
