"""Shared plotting helpers: figure creation and level choice. matplotlib is imported inside functions."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import affine_between, is_calibrated, raster_shape, scale_levels, to_um_affine

from ._scalebar import add_scale_bar

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

T = TypeVar("T")

__all__ = [
    "axes_or_new",
    "color_limits",
    "display_level",
    "extent",
    "finish",
    "frame_matrix",
    "new_figure",
    "raster_view",
    "resolve_show",
    "style_spatial",
    "use_um",
]


def new_figure(show: bool, **kwargs: Any) -> Figure:
    """A figure with constrained layout: registered with pyplot only when it is to be shown."""
    kwargs.setdefault("layout", "constrained")
    if show:
        import matplotlib.pyplot as plt

        return plt.figure(**kwargs)
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def axes_or_new(ax: Axes | None, show: bool, **kwargs: Any) -> Axes:
    """``ax`` itself, or the axes of a new figure (see :func:`new_figure`)."""
    if ax is not None:
        return ax
    return new_figure(show, **kwargs).add_subplot()


def resolve_show(show: bool | None, *, ax: Any, save: str | os.PathLike[str] | None) -> bool:
    """Scanpy's rule for ``show=None``: show, unless the plot is saved or drawn into axes the caller passed."""
    if show is None:
        return ax is None and save is None
    return bool(show)


def finish(
    fig: Figure, drawn: T, *, show: bool, save: str | os.PathLike[str] | None, dpi: float | None = None
) -> T | None:
    """Save ``fig`` to ``save`` (format from the suffix) and show it when asked (scanpy's ``show``/``save``).

    Returns ``drawn`` (the figure or axes the plot function made), or ``None`` when the figure was shown, so that a
    notebook does not display it twice.
    """
    if save is not None:
        path = Path(save)
        if not path.suffix:
            msg = f"save={str(save)!r} has no file suffix; name the format, e.g. {str(save)!r} + '.png' or '.pdf'."
            raise InputError(msg)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi if dpi is not None else "figure", bbox_inches="tight")
    if show:
        import matplotlib.pyplot as plt

        plt.show()
        return None
    return drawn


def display_level(element: Any, max_pixels: int) -> Any:
    """The finest pyramid level whose longer side is at most ``max_pixels`` (the coarsest if none is)."""
    levels = scale_levels(element)
    for level in levels:
        if max(level.sizes["y"], level.sizes["x"]) <= max_pixels:
            return level
    return levels[-1]


def frame_matrix(sdata: SpatialData, key: str, frame_key: str | None, *, um: bool) -> np.ndarray:
    """The axis-aligned 3 × 3 affine from element ``key``'s intrinsic pixels to the plot frame.

    The frame is micrometres (``um``), else ``frame_key``'s pixels, else (``frame_key`` ``None`` or ``key``) the
    element's own pixels. Only scale and shift can be drawn with ``imshow``.
    """
    if um:
        matrix = to_um_affine(sdata, key)
    elif frame_key is not None and frame_key != key:
        matrix = affine_between(sdata, key, frame_key)
    else:
        matrix = np.eye(3)
    if abs(matrix[0, 1]) > 1e-9 or abs(matrix[1, 0]) > 1e-9 or matrix[0, 0] <= 0 or matrix[1, 1] <= 0:
        msg = f"Element {key!r} is rotated, sheared or flipped relative to the plot frame; only scale and shift plot."
        raise InputError(msg)
    return matrix


def extent(sdata: SpatialData, key: str, frame_key: str | None, *, um: bool) -> tuple[float, float, float, float]:
    """``(left, right, bottom, top)`` of element ``key``'s full raster for ``imshow(origin="upper")``.

    The full-resolution raster covers ``[0, nx) × [0, ny)`` in its intrinsic space (pixel corners), mapped by
    :func:`frame_matrix`.
    """
    ny, nx = raster_shape(sdata.images[key] if key in sdata.images else sdata.labels[key])
    matrix = frame_matrix(sdata, key, frame_key, um=um)
    x0, y0 = matrix[:2, 2]
    x1 = matrix[0, 0] * nx + x0
    y1 = matrix[1, 1] * ny + y0
    return float(x0), float(x1), float(y1), float(y0)


def raster_view(
    element: Any, matrix: np.ndarray, window: tuple[float, float, float, float] | None, max_pixels: int
) -> tuple[np.ndarray, tuple[float, float, float, float], int] | None:
    """The part of a raster inside ``window`` from the finest pyramid level that shows it in ``max_pixels``.

    Parameters
    ----------
    element
        Image or labels element (DataArray or multiscale DataTree).
    matrix
        Axis-aligned affine from the element's full-resolution pixels to the plot frame (:func:`frame_matrix`).
    window
        ``(x0, y0, x1, y1)`` in the plot frame, or ``None`` for the whole raster.
    max_pixels
        Longest side, in pixels of the level, of the window as drawn.

    Returns
    -------
    ``(values, extent, level)``: the window's pixels (``(c, y, x)`` or ``(y, x)``; only the chunks of that one
    level that meet the window are computed), ``(left, right, bottom, top)`` for ``imshow(origin="upper")`` and
    the pyramid level's index; ``None`` when the raster does not meet the window.
    """
    levels = scale_levels(element)
    ny0, nx0 = int(levels[0].sizes["y"]), int(levels[0].sizes["x"])
    sx, tx, sy, ty = matrix[0, 0], matrix[0, 2], matrix[1, 1], matrix[1, 2]
    if window is None:
        px0, px1, py0, py1 = 0.0, float(nx0), 0.0, float(ny0)
    else:
        px0, px1 = max(0.0, (window[0] - tx) / sx), min(float(nx0), (window[2] - tx) / sx)
        py0, py1 = max(0.0, (window[1] - ty) / sy), min(float(ny0), (window[3] - ty) / sy)
    if px1 <= px0 or py1 <= py0:
        return None
    index, level = len(levels) - 1, levels[-1]
    for k, candidate in enumerate(levels):
        fx, fy = nx0 / candidate.sizes["x"], ny0 / candidate.sizes["y"]
        if max((px1 - px0) / fx, (py1 - py0) / fy) <= max_pixels:
            index, level = k, candidate
            break
    nyk, nxk = int(level.sizes["y"]), int(level.sizes["x"])
    fx, fy = nx0 / nxk, ny0 / nyk
    j0, j1 = max(0, math.floor(px0 / fx + 1e-9)), min(nxk, math.ceil(px1 / fx - 1e-9))
    i0, i1 = max(0, math.floor(py0 / fy + 1e-9)), min(nyk, math.ceil(py1 / fy - 1e-9))
    data = level.data[..., i0:i1, j0:j1]
    values = np.asarray(data.compute() if hasattr(data, "dask") else data)
    left, right = tx + sx * j0 * fx, tx + sx * j1 * fx
    top, bottom = ty + sy * i0 * fy, ty + sy * i1 * fy
    return values, (float(left), float(right), float(bottom), float(top)), index


def use_um(sdata: SpatialData, keys: list[str], units: str) -> bool:
    """Whether to draw in µm: ``units="um"`` requires calibration, ``"auto"`` uses µm when every key has it."""
    if units not in ("auto", "um", "px"):
        msg = f"units must be 'auto', 'um' or 'px', got {units!r}."
        raise InputError(msg)
    if units == "px":
        return False
    if units == "um":
        for key in keys:
            to_um_affine(sdata, key)  # raises CalibrationError naming st.pp.calibrate
        return True
    return all(is_calibrated(sdata, key) for key in keys)


def color_limits(values: np.ndarray, *, robust: bool) -> tuple[float | None, float | None]:
    """``(vmin, vmax)`` of the finite values: their 1st and 99th percentiles with ``robust``, else min and max."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return None, None
    if robust:
        lo, hi = np.percentile(finite, [1, 99])
        return float(lo), float(hi)
    return float(finite.min()), float(finite.max())


def style_spatial(axes: Sequence[Axes], limits: Sequence[float], *, um: bool, scale_bar: bool) -> None:
    """Common view, equal aspect; a scale bar instead of ticks in µm, else axis labels in pixels."""
    for panel in axes:
        panel.set_xlim(limits[0], limits[1])
        panel.set_ylim(limits[2], limits[3])
        panel.set_aspect("equal")
        if um and scale_bar:
            panel.set_xticks([])
            panel.set_yticks([])
            add_scale_bar(panel)
        else:
            unit = "µm" if um else "px"
            panel.set_xlabel(f"x ({unit})")
            panel.set_ylabel(f"y ({unit})")
