"""Reading a square window of a section's image, resampled to the model's resolution.

The window is read from the finest pyramid level that is not coarser than the model's resolution and resampled to
the requested size; the geometry of the resampling is exact (the ``(origin, scale)`` actually used is returned, so
footprints can be mapped onto the tile). Pixels outside the slide are white glass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ._sections import Section

__all__ = ["read_window", "window_geometry"]

_BACKGROUND = 255  # padding value outside the slide: white glass


def _window_on_level(section: Section, x0: float, y0: float, extent: float, size: int) -> tuple[int, int, int, int]:
    """Pyramid level, first column and row on it, and side in its pixels of the window :func:`read_window` reads."""
    ratio = extent / size  # full-resolution pixels per tile pixel
    level = max((k for k, f in enumerate(section.level_factors) if f <= ratio * (1 + 1e-6)), default=0)
    f = section.level_factors[level]
    return level, int(np.floor(x0 / f)), int(np.floor(y0 / f)), max(int(np.ceil(extent / f)), 1)


def window_geometry(section: Section, x0: float, y0: float, extent: float, size: int) -> tuple[np.ndarray, float]:
    """The ``(origin, scale)`` that :func:`read_window` returns for this window, without reading it."""
    level, lx0, ly0, n = _window_on_level(section, x0, y0, extent, size)
    f = section.level_factors[level]
    return np.array([lx0 * f, ly0 * f]), size / (n * f)


def read_window(
    section: Section, x0: float, y0: float, extent: float, size: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Read a square window of ``extent`` full-resolution pixels at ``(x0, y0)``, resampled to ``size`` pixels.

    Returns the ``uint8 (3, size, size)`` tile and the exact ``(origin, scale)`` used: a full-resolution point ``p``
    lands at tile pixel coordinate ``(p − origin) · scale`` (same for x and y).
    """
    import torch

    level, lx0, ly0, n = _window_on_level(section, x0, y0, extent, size)
    f = section.level_factors[level]
    array = section.levels[level]
    ny, nx = array.sizes["y"], array.sizes["x"]
    out = np.full((3, n, n), _BACKGROUND, dtype=np.uint8)
    ys, ye = max(ly0, 0), min(ly0 + n, ny)
    xs, xe = max(lx0, 0), min(lx0 + n, nx)
    if ye > ys and xe > xs:
        window = array.data[:, ys:ye, xs:xe]
        if hasattr(window, "compute"):
            # In this thread: DataLoader workers are forked, and a forked child has no threads of the parent's
            # dask pool to wait on (the threaded scheduler hangs there forever).
            window = window.compute(scheduler="synchronous")
        window = np.asarray(window)
        out[:, ys - ly0 : ye - ly0, xs - lx0 : xe - lx0] = window.astype(np.uint8, copy=False)
    if n != size:
        t = torch.from_numpy(out).float()[None]
        t = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=n > size)
        out = t[0].round().clamp(0, 255).to(torch.uint8).numpy()
    return out, np.array([lx0 * f, ly0 * f]), size / (n * f)
