"""Shared plotting helpers: figure creation and level choice. matplotlib is imported inside functions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from stpredict._errors import InputError
from stpredict._geometry import affine_between, is_calibrated, raster_shape, scale_levels, to_um_affine

if TYPE_CHECKING:
    import os

    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

T = TypeVar("T")

__all__ = ["axes_or_new", "display_level", "extent", "finish", "new_figure", "resolve_show", "use_um"]


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


def extent(sdata: SpatialData, key: str, frame_key: str | None, *, um: bool) -> tuple[float, float, float, float]:
    """``(left, right, bottom, top)`` of element ``key`` for ``imshow(origin="upper")``.

    Coordinates are ``frame_key``'s pixels (or, with ``um``, micrometres through the µm coordinate system);
    with ``frame_key=None`` and ``um=False``, the element's own pixels. The element's full-resolution raster
    covers ``[0, nx) × [0, ny)`` in its intrinsic space (pixel corners), mapped through the affine transform
    given by :mod:`stpredict._geometry`; only axis-aligned transforms (scale and translation) can be drawn.
    """
    ny, nx = raster_shape(sdata.images[key])
    if um:
        matrix = to_um_affine(sdata, key)
    elif frame_key is not None and frame_key != key:
        matrix = affine_between(sdata, key, frame_key)
    else:
        matrix = np.eye(3)
    if abs(matrix[0, 1]) > 1e-9 or abs(matrix[1, 0]) > 1e-9 or matrix[0, 0] <= 0 or matrix[1, 1] <= 0:
        msg = f"Element {key!r} is rotated, sheared or flipped relative to the plot frame; only scale and shift plot."
        raise InputError(msg)
    x0, y0 = matrix[:2, 2]
    x1 = matrix[0, 0] * nx + x0
    y1 = matrix[1, 1] * ny + y0
    return float(x0), float(x1), float(y1), float(y0)


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
