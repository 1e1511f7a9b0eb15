"""The plan and geometry of a dense map for :func:`stpredict.tl.predict_dense`.

Which pyramid level is read and how it is resampled, the tile grid and blending window, the map's size and chunks,
the work units, and which tiles lie over tissue: everything decided before any tile is predicted. The checks that
depend on the slide (scale mismatch, tile overlap, no tissue) raise here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import raster_shape, scale_levels, transformation_matrix, um_per_px
from stpredict._keys import Keys
from stpredict.pp import tissue_mask

from ._slide_input import SlideInput, slide_input
from ._tiling import AxisGrid, window_1d

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from stpredict.models._base import DenseModel

__all__ = ["DEFAULT_CHUNK", "UNIT_MAX_BYTES", "UNIT_MAX_LEVEL_PX", "DensePlan", "MapLayout", "TissueMask", "plan_map"]

#: Budget for the float32 accumulator of one work unit (one chunk row × one panel of chunk columns).
UNIT_MAX_BYTES = 256 * 2**20
#: Budget for the slide pixels one work unit reads at the source level (32 Mpx: 96 MiB as uint8 RGB). Bounds the
#: default chunk and the panel width of models with a coarse map (MagNet: one map pixel per bin), whose 512 map
#: pixels would otherwise read thousands of slide pixels per side.
UNIT_MAX_LEVEL_PX = 32 * 2**20
#: Default output chunk length in map pixels (rounded to a multiple of the tile stride).
DEFAULT_CHUNK = 512


@dataclass
class DensePlan:
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


@dataclass
class MapLayout:
    """The plan of one map together with what only the calling process needs: the source and the output's geometry."""

    plan: DensePlan
    image: Any  # the image element
    image_key: str  # its key
    level_index: int  # pyramid level read
    level: Any  # that level as uint8 red, green, blue ``(3, y, x)`` (lazy), or as stored when that is what it is
    image_shape: tuple[int, int]  # full-resolution image pixels (y, x)
    image_um_per_px: float  # µm per full-resolution image pixel
    image_px_per_map_px: float  # full-resolution image pixels per map pixel
    overlap: int  # overlap of neighbouring tiles in map pixels
    tissue: TissueMask | None  # the mask tiles were selected with (``tissue_only``)
    source: SlideInput = SlideInput()  # how RGB is read from the image: channel order and value scale

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of the map: ``(genes, height, width)``."""
        return (len(self.plan.channels), self.plan.gy.size, self.plan.gx.size)

    @property
    def chunks(self) -> tuple[int, int, int]:
        """Chunks of the stored map: chunks of at most 16 genes, as even as possible, and whole output chunks."""
        n_channel_chunks = math.ceil(len(self.plan.channels) / 16)
        chunk = self.plan.gy.chunk
        return (math.ceil(len(self.plan.channels) / n_channel_chunks), chunk, chunk)


class TissueMask:
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


def _tissue_tiles(tissue: TissueMask, gy: AxisGrid, gx: AxisGrid, f: float) -> np.ndarray:
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


def _source_level(
    image: Any, image_key: str, model: DenseModel, u_img: float, f0: float, max_rescale: float
) -> tuple[int, Any, tuple[float, float]]:
    """The pyramid level to read, its index, and its pixels per model pixel (y, x); checks the scale and channels.

    ``u_img`` is the image's µm per full-resolution pixel, ``f0`` its full-resolution pixels per model pixel.
    """
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
    return level_index, level, ratio


def _tile_overlap(model: DenseModel, overlap_um: float | None) -> tuple[int, int, int]:
    """Tile size, context band and overlap of neighbouring tiles, in map pixels; checks that they fit together."""
    s, t = model.output_stride, model.tile_size
    n = t // s
    context = math.ceil(model.context / s)
    if getattr(model, "tiling", "blend") == "partition":
        # each map pixel from the core of exactly one tile (no blending): the overlap is the two context bands
        if overlap_um is not None and round(overlap_um / (model.um_per_px * s)) != 2 * context:
            msg = (
                f"{type(model).__name__} predicts each map pixel from one tile (tiling='partition'), so tiles overlap "
                f"by exactly twice its context ({2 * model.context * model.um_per_px:g} µm); leave overlap_um=None."
            )
            raise InputError(msg)
        overlap = 2 * context
    elif overlap_um is None:
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
    return n, context, overlap


def plan_map(
    sdata: SpatialData,
    image_key: str,
    model: DenseModel,
    gene_list: list[str],
    *,
    tissue_only: bool,
    tissue_key: str | None,
    overlap_um: float | None,
    chunk_size: int | None,
    max_rescale: float,
) -> MapLayout:
    """Plan the map of ``model`` over image ``image_key``: source level, tile grid, chunks, units and tiles to run.

    Raises :class:`~stpredict._errors.InputError` on a slide/model scale mismatch beyond ``max_rescale``, an image
    that is not RGB (channels not named red, green, blue; values outside [0, 255]), an overlap that does not fit
    the tiles, or (with ``tissue_only``) no tissue under the image.
    """
    image = sdata.images[image_key]
    u_img = um_per_px(sdata, image_key)
    f0 = model.um_per_px / u_img  # full-resolution image pixels per model pixel
    level_index, level, ratio = _source_level(image, image_key, model, u_img, f0, max_rescale)
    source = slide_input(image, level, image_key)
    level = source.apply(level)

    s, t = model.output_stride, model.tile_size
    n, context, overlap = _tile_overlap(model, overlap_um)
    ramp = overlap - 2 * context
    stride = n - overlap
    ny0, nx0 = raster_shape(image)
    f = f0 * s  # full-resolution pixels per map pixel
    height, width = math.ceil(ny0 / f - 1e-9), math.ceil(nx0 / f - 1e-9)
    m = max(1, round((chunk_size or DEFAULT_CHUNK) / stride))

    def level_px(rows: int, cols: int) -> float:  # source-level pixels under a unit of rows × cols map pixels
        return (rows * s + t) * ratio[0] * (cols * s + t) * ratio[1]

    while chunk_size is None and m > 1 and level_px(m * stride, m * stride) > UNIT_MAX_LEVEL_PX:
        m -= 1
    chunk = m * stride
    gy = AxisGrid(height, n, context, ramp, chunk)
    gx = AxisGrid(width, n, context, ramp, chunk)
    channels = np.array([list(model.var_names).index(g) for g in gene_list])
    panel = max(1, min(gx.n_chunks, UNIT_MAX_BYTES // (4 * (len(channels) + 1) * chunk * (chunk + ramp))))
    while panel > 1 and level_px(chunk, panel * chunk) > UNIT_MAX_LEVEL_PX:
        panel -= 1

    tissue = None
    if tissue_only:
        tissue = TissueMask(sdata, image_key, tissue_key)
        run = _tissue_tiles(tissue, gy, gx, f)
        if not run.any():
            msg = (
                f"No tissue found under image {image_key!r} in the tissue mask {tissue.name!r}; check the mask "
                "(`st.pp.tissue_mask`), or predict everywhere with `tissue_only=False`."
            )
            raise InputError(msg)
    else:
        run = np.ones((gy.n_tiles, gx.n_tiles), dtype=bool)
    plan = DensePlan(gy, gx, s, t, ratio, run, channels, panel)
    return MapLayout(plan, image, image_key, level_index, level, (ny0, nx0), u_img, f, overlap, tissue, source)
