"""A micrometre scale bar for spatial plots drawn in µm (matplotlib's ``AnchoredSizeBar``, no extra dependency)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

__all__ = ["add_scale_bar", "nice_length"]


def nice_length(width_um: float, fraction: float = 0.2) -> float:
    """The largest 1, 2 or 5 × 10^k µm at most ``fraction`` of ``width_um`` (the smallest such length if none)."""
    target = abs(float(width_um)) * fraction
    if not math.isfinite(target) or target <= 0:
        return 1.0
    exponent = math.floor(math.log10(target))
    best = 10.0**exponent
    for mantissa in (1, 2, 5):
        length = mantissa * 10.0**exponent
        if length <= target * (1 + 1e-9):
            best = length
    return best


def _label(length_um: float) -> str:
    if length_um >= 1000:
        return f"{length_um / 1000:g} mm"
    return f"{length_um:g} µm"


def add_scale_bar(ax: Axes, *, loc: str = "lower right") -> AnchoredSizeBar:
    """Draw a scale bar into axes whose data coordinates are µm; its length is :func:`nice_length` of the view.

    The artist carries ``length_um`` (the bar's length in µm); its label reads e.g. ``"50 µm"`` or ``"1 mm"``.
    """
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    x0, x1 = ax.get_xlim()
    y0, y1 = ax.get_ylim()
    length = nice_length(x1 - x0)
    bar = AnchoredSizeBar(
        ax.transData,
        length,
        _label(length),
        loc=loc,
        pad=0.3,
        borderpad=0.4,
        sep=2,
        frameon=True,
        size_vertical=abs(y1 - y0) / 100,
        color="black",
        fontproperties={"size": "small"},
    )
    bar.patch.set_facecolor("white")
    bar.patch.set_alpha(0.7)
    bar.patch.set_edgecolor("none")
    bar.length_um = length
    ax.add_artist(bar)
    return bar
