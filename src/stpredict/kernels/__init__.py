"""Numba kernels (arrays in, arrays out) shared by :func:`stpredict.tl.aggregate` and :func:`stpredict.pp.bin`."""

from __future__ import annotations

from ._areas import circle_pixel_area, polygon_pixel_area
from ._bins import axis_table, gather_units, rect_sum, rect_sum_units
from ._labels import label_lut, labels_sum
from ._names import decimal_names
from ._shapes import shapes_sum

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
