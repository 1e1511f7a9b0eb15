"""Numba kernels (arrays in, arrays out) shared by :func:`stpredict.tl.aggregate` and :func:`stpredict.pp.bin`."""

from __future__ import annotations

from ._aggregate import (
    axis_table,
    circle_pixel_area,
    gather_units,
    label_lut,
    labels_sum,
    polygon_pixel_area,
    rect_sum,
    rect_sum_units,
    shapes_sum,
)
from ._names import decimal_names

__all__ = [
    "axis_table",
    "circle_pixel_area",
    "decimal_names",
    "gather_units",
    "label_lut",
    "labels_sum",
    "polygon_pixel_area",
    "rect_sum",
    "rect_sum_units",
    "shapes_sum",
]
