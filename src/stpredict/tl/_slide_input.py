"""Which channels of a slide are red, green and blue, and how its values become the uint8 RGB models take.

:func:`slide_input` decides both from the image element (channel names, dtype and value range) before any tile is
read, and :meth:`SlideInput.apply` turns the pyramid level that is read into lazy uint8 RGB. An image that is
uint8 with unnamed channels (or channels named r, g, b in that order) is read exactly as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import scale_levels

from ._slide_reader import FILL_VALUE

__all__ = ["SlideInput", "rgb_channels", "slide_input"]

_NAMES = (("r", "g", "b"), ("red", "green", "blue"))
_HOW_TO_NAME = (
    "Name the channels red, green and blue, e.g. `Image2DModel.parse(data, dims=('c', 'y', 'x'), "
    "c_coords=['r', 'g', 'b'])`, or use integer channel names 0, 1, 2 for red, green, blue."
)


@dataclass(frozen=True)
class SlideInput:
    """How to read RGB from a slide: the indices of its red, green and blue channels and the value scale.

    ``scale`` is ``None`` for a uint8 image (read as is); otherwise values are multiplied by it, rounded to the
    nearest integer and clipped to [0, 255].
    """

    channels: tuple[int, int, int] = (0, 1, 2)
    scale: float | None = None

    def apply(self, level: Any) -> Any:
        """``level`` (``(c, y, x)`` DataArray) as lazy uint8 red, green, blue; unchanged when there is nothing to do."""
        if self.channels != (0, 1, 2):
            level = level.isel(c=list(self.channels))
        if self.scale is None:
            return level
        data = level.data
        if hasattr(data, "map_blocks"):
            data = data.map_blocks(_to_uint8, self.scale, dtype=np.uint8)
        else:
            data = _to_uint8(np.asarray(data), self.scale)
        return level.copy(data=data)


def _to_uint8(block: np.ndarray, scale: float) -> np.ndarray:
    if np.issubdtype(block.dtype, np.integer):  # checked to lie in [0, 255]
        return block.astype(np.uint8)
    x = np.nan_to_num(block * scale, nan=FILL_VALUE, posinf=255, neginf=0)  # NaN reads as glass, like off the slide
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def rgb_channels(names: Any, image_key: str) -> tuple[int, int, int]:
    """Indices of red, green and blue among channel ``names``: from their names, else the first three.

    Integer names (spatialdata's default) and the names ``"0"``, ``"1"``, ``"2"``… keep the first three channels.
    Names ``r``/``g``/``b`` or ``red``/``green``/``blue`` (any case, any order, other channels beside them) are
    honoured; any other names are refused, since which channel is which cannot be told.
    """
    names = list(np.asarray(names).tolist())
    if all(isinstance(n, int | np.integer) for n in names) or [str(n) for n in names] == [
        str(i) for i in range(len(names))
    ]:
        return (0, 1, 2)
    lowered = [str(n).strip().lower() for n in names]
    for vocabulary in _NAMES:
        if all(lowered.count(v) == 1 for v in vocabulary):
            return tuple(lowered.index(v) for v in vocabulary)
    msg = f"Image {image_key!r} has channels {names}: which are red, green and blue cannot be told. {_HOW_TO_NAME}"
    raise InputError(msg)


def _value_scale(image: Any, image_key: str, channels: tuple[int, int, int]) -> float | None:
    """The factor to [0, 255] of a non-uint8 image, from the value range of its coarsest level (one read of it)."""
    coarsest = scale_levels(image)[-1]
    dtype = coarsest.dtype
    if dtype == np.uint8:
        return None
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        msg = f"Image {image_key!r} has dtype {dtype}; predict_dense needs RGB values, uint8 or float."
        raise InputError(msg)
    data = coarsest.isel(c=list(channels)).data
    lo, hi = (float(v) for v in _compute(np.nanmin(data), np.nanmax(data)))
    if np.issubdtype(dtype, np.integer):
        if lo >= 0 and hi <= 255:
            return 1.0
        msg = (
            f"Image {image_key!r} has {dtype} values from {lo:g} to {hi:g}; predict_dense reads RGB in [0, 255]. "
            "Scale it to uint8 first, e.g. `(x // 257).astype(np.uint8)` for 16-bit values."
        )
        raise InputError(msg)
    if lo >= 0 and hi <= 1:
        return 255.0
    if lo >= 0 and hi <= 255:
        return 1.0
    msg = (
        f"Image {image_key!r} has {dtype} values from {lo:.4g} to {hi:.4g}; predict_dense reads float RGB in [0, 1] "
        "or [0, 255] (a normalised image is not RGB). Pass the RGB values, e.g. "
        "`np.clip(np.rint(x), 0, 255).astype(np.uint8)` for values in [0, 255]."
    )
    raise InputError(msg)


def _compute(*values: Any) -> tuple[Any, ...]:
    if any(hasattr(v, "compute") for v in values):
        import dask

        return dask.compute(*values, scheduler="threads")
    return values


def slide_input(image: Any, level: Any, image_key: str) -> SlideInput:
    """How to read uint8 RGB from ``image`` (whose level ``level`` is read): channel order and value scale.

    Raises :class:`~stpredict._errors.InputError` on channel names that do not say which is red, green and blue,
    and on values that are not RGB (negative, or above 255, or above 1 and 255 for floats).
    """
    channels = rgb_channels(level.coords["c"].values if "c" in level.coords else range(level.sizes["c"]), image_key)
    return SlideInput(channels, _value_scale(image, image_key, channels))
