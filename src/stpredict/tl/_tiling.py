"""Tile-grid geometry, blending windows and resampling for :func:`stpredict.tl.predict_dense`.

All positions here are in *output* pixels (map pixels) unless a name says ``model`` (model-input pixels,
``output_stride`` per map pixel) or ``level`` (pixels of the pyramid level the slide is read from).

Along each axis, tile ``k`` has its origin at map pixel ``k * stride - context`` and is ``n`` map pixels wide.
Its blending weight is 0 in its ``context`` band, rises over ``ramp`` pixels as ``sin²``, is 1 on the
plateau and falls as ``cos²``; the falling ramp of tile ``k`` lies exactly on the rising ramp of tile
``k + 1``, so the weights of neighbouring tiles sum to 1 and the stitched map has no seams. Tile ``k``
contributes to ``[k * stride, (k + 1) * stride + ramp)`` (its *support*), so output rows/columns
``[j * chunk, (j + 1) * chunk)`` with ``chunk = m * stride`` need tiles ``j*m - 1 … (j+1)*m - 1`` only,
the first of them for its falling ramp alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AxisGrid", "resample_matrix", "window_1d"]


def window_1d(n: int, context: int, ramp: int) -> np.ndarray:
    """Blending weight over the ``n`` map pixels of a tile: 0 on the context bands, sin²/cos² ramps, 1 between."""
    w = np.zeros(n, dtype=np.float64)
    w[context + ramp : n - context - ramp] = 1.0
    if ramp:
        up = np.sin(0.5 * np.pi * (np.arange(ramp) + 0.5) / ramp) ** 2
        w[context : context + ramp] = up
        w[n - context - ramp : n - context] = up[::-1]
    return w.astype(np.float32)


@dataclass(frozen=True)
class AxisGrid:
    """Tiles along one axis of a map of ``size`` pixels.

    Attributes
    ----------
    size
        Map pixels along the axis.
    n
        Tile size in map pixels.
    context
        Map pixels on each side of a tile with zero weight.
    ramp
        Length of the blending ramps; ``overlap = 2 * context + ramp``.
    chunk
        Output chunk length, a multiple of the tile stride.
    """

    size: int
    n: int
    context: int
    ramp: int
    chunk: int

    @property
    def stride(self) -> int:
        """Distance between tile origins."""
        return self.n - 2 * self.context - self.ramp

    @property
    def n_tiles(self) -> int:
        """Tiles needed so that the supports cover ``[0, size)``."""
        return max(1, math.ceil(self.size / self.stride))

    @property
    def n_chunks(self) -> int:
        """Output chunks along the axis."""
        return max(1, math.ceil(self.size / self.chunk))

    def origin(self, k: int | np.ndarray) -> int | np.ndarray:
        """Map-pixel position of tile ``k``'s first pixel (may be negative)."""
        return k * self.stride - self.context

    def support(self, k: int) -> tuple[int, int]:
        """Map pixels ``[start, stop)`` where tile ``k`` has non-zero weight."""
        return k * self.stride, (k + 1) * self.stride + self.ramp

    def chunk_bounds(self, j: int) -> tuple[int, int]:
        """Map pixels ``[start, stop)`` of output chunk ``j``."""
        return j * self.chunk, min((j + 1) * self.chunk, self.size)

    def tiles_for(self, start: int, stop: int) -> range:
        """Tiles whose support intersects ``[start, stop)``."""
        first = max(0, -(-(start - self.stride - self.ramp + 1) // self.stride))
        last = min(self.n_tiles, -(-stop // self.stride))
        return range(first, max(first, last))


def resample_matrix(start: int, stop: int, ratio: float) -> tuple[np.ndarray, int, int]:
    """Separable resampling weights from a pyramid level to model pixels ``[start, stop)``.

    Model pixel ``p`` covers level pixels ``[p * ratio, (p + 1) * ratio)``. With ``ratio >= 1`` (down-sampling)
    its value is the area-weighted mean of the level pixels it covers; with ``ratio < 1`` it is linearly
    interpolated at its centre. Because the weights depend on absolute positions only, resampling a region
    and cutting tiles from it gives the same tiles as resampling each tile.

    Returns
    -------
    ``(weights, lo, hi)``: ``weights`` has shape ``(stop - start, hi - lo)`` over level pixels ``[lo, hi)``;
    ``lo``/``hi`` may fall outside ``[0, n_level)`` (the caller pads).
    """
    p = np.arange(start, stop, dtype=np.float64)
    if ratio >= 1:
        lo = math.floor(start * ratio)
        hi = math.ceil(stop * ratio)
        j = np.arange(lo, hi, dtype=np.float64)
        a = (p * ratio)[:, None]
        b = ((p + 1) * ratio)[:, None]
        w = np.clip(np.minimum(b, j[None, :] + 1) - np.maximum(a, j[None, :]), 0, None) / ratio
    else:
        centre = (p + 0.5) * ratio - 0.5
        lo = math.floor(centre[0]) if len(centre) else 0
        hi = (math.floor(centre[-1]) + 2) if len(centre) else 0
        j = np.arange(lo, hi, dtype=np.float64)
        w = np.clip(1 - np.abs(centre[:, None] - j[None, :]), 0, None)
    return w.astype(np.float32), lo, hi
