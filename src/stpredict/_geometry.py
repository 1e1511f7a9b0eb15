"""The micrometre and pixel-geometry contract (DESIGN.md "Contracts"), owned by this module alone.

* Pixel ``(row i, column j)`` of an element covers ``[j, j+1) × [i, i+1)`` in that element's intrinsic
  pixel space; ``x`` is the column, ``y`` the row. Pixel centres sit at half-integers.
* The physical scale lives in the SpatialData itself: :func:`stpredict.pp.calibrate` writes a coordinate
  system in micrometres (``settings.um_coordinate_system``, ``"um"`` by default) onto the image and every
  element that shares a coordinate system with it. Its origin is the image's pixel corner ``(0, 0)``.
  The transformations persist in zarr and are read by spatialdata-plot and napari-spatialdata.
* Every other module asks this one for µm per pixel and for the affine map between two elements' pixel
  spaces; nothing else reads transformations directly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ._errors import CalibrationError, CoordinateSystemError, InputError
from ._settings import settings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from spatialdata import SpatialData

__all__ = [
    "ANISOTROPY_TOLERANCE",
    "affine_between",
    "apply_affine",
    "get_element",
    "is_calibrated",
    "pixel_centers",
    "raster_shape",
    "scale_levels",
    "set_um_per_px",
    "to_um_affine",
    "transformation_matrix",
    "um_per_px",
]

#: Relative difference between the x and y pixel size above which an element counts as anisotropic.
ANISOTROPY_TOLERANCE = 1e-3
_AXES = ("x", "y")
_GROUPS = ("images", "labels", "shapes", "points")


def get_element(sdata: SpatialData, key: str) -> Any:
    """Return the element ``key`` of any type, or raise an error that lists what exists."""
    for group in _GROUPS:
        elements = getattr(sdata, group)
        if key in elements:
            return elements[key]
    available = [k for g in _GROUPS for k in getattr(sdata, g)]
    msg = f"No element {key!r} in the SpatialData; available elements: {sorted(available)}."
    raise KeyError(msg)


def _elements(sdata: SpatialData) -> Iterator[Any]:
    for group in _GROUPS:
        yield from getattr(sdata, group).values()


def _transformations(element: Any) -> dict[str, Any]:
    from spatialdata.transformations import get_transformation

    return get_transformation(element, get_all=True)


def transformation_matrix(transformation: Any) -> np.ndarray:
    """The 3 × 3 affine matrix (x, y, 1) of a spatialdata transformation."""
    return np.asarray(transformation.to_affine_matrix(input_axes=_AXES, output_axes=_AXES), dtype=np.float64)


def _um_matrix_or_none(sdata: SpatialData, key: str) -> np.ndarray | None:
    cs_um = settings.um_coordinate_system
    own = _transformations(get_element(sdata, key))
    if cs_um in own:
        return transformation_matrix(own[cs_um])
    # An element added after calibration: reach µm through any calibrated element in a shared system.
    for cs, transformation in own.items():
        for other in _elements(sdata):
            other_t = _transformations(other)
            if cs in other_t and cs_um in other_t:
                other_to_um = transformation_matrix(other_t[cs_um]) @ np.linalg.inv(transformation_matrix(other_t[cs]))
                return other_to_um @ transformation_matrix(transformation)
    return None


def is_calibrated(sdata: SpatialData, key: str) -> bool:
    """Whether the physical pixel size of element ``key`` is known."""
    return _um_matrix_or_none(sdata, key) is not None


def to_um_affine(sdata: SpatialData, key: str) -> np.ndarray:
    """The 3 × 3 affine matrix (x, y, 1) from element ``key``'s intrinsic space to micrometres.

    Raises
    ------
    CalibrationError
        If no µm scale is known; the message names :func:`stpredict.pp.calibrate`.
    """
    matrix = _um_matrix_or_none(sdata, key)
    if matrix is None:
        msg = (
            f"The physical pixel size of {key!r} is unknown. Set it once with "
            f"`st.pp.calibrate(sdata, image_key, um_per_px=...)` (or let it infer the scale from reader "
            f"metadata); every later step then finds it."
        )
        raise CalibrationError(msg)
    return matrix


def um_per_px(sdata: SpatialData, key: str) -> float:
    """Micrometres per intrinsic unit (pixel) of element ``key``; requires an isotropic scale.

    Raises
    ------
    CalibrationError
        If the element is not calibrated, or its pixels are not square.
    """
    linear = to_um_affine(sdata, key)[:2, :2]
    sx, sy = np.linalg.norm(linear[:, 0]), np.linalg.norm(linear[:, 1])
    if abs(sx - sy) > ANISOTROPY_TOLERANCE * max(sx, sy):
        msg = (
            f"Element {key!r} has non-square pixels ({sx:.6g} × {sy:.6g} µm); stpredict needs square pixels. "
            "Resample the image, or fix its transformation."
        )
        raise CalibrationError(msg)
    return float((sx + sy) / 2)


def set_um_per_px(sdata: SpatialData, image_key: str, value: float) -> None:
    """Write the µm coordinate system: the image's pixel is ``value`` µm wide, everything else follows.

    Every element that shares a coordinate system with the image gets a transformation to the µm system
    composed through that shared system, so shapes, labels and points line up with the image in µm.
    """
    from spatialdata.transformations import Scale, Sequence, set_transformation

    if not np.isfinite(value) or value <= 0:
        msg = f"um_per_px must be a positive finite number, got {value!r}."
        raise InputError(msg)
    cs_um = settings.um_coordinate_system
    image = get_element(sdata, image_key)
    image_t = {cs: t for cs, t in _transformations(image).items() if cs != cs_um}
    scale = Scale([value, value], axes=_AXES)
    set_transformation(image, scale, to_coordinate_system=cs_um)
    for element in _elements(sdata):
        if element is image:
            continue
        # Through the first coordinate system shared with the image; an element sharing none is left as is.
        for cs, transformation in _transformations(element).items():
            if cs in image_t:
                to_um = Sequence([transformation, image_t[cs].inverse(), scale])
                set_transformation(element, to_um, to_coordinate_system=cs_um)
                break


def affine_between(sdata: SpatialData, source_key: str, target_key: str) -> np.ndarray:
    """The 3 × 3 affine matrix (x, y, 1) from ``source_key``'s intrinsic space to ``target_key``'s.

    Raises
    ------
    CoordinateSystemError
        If the two elements share no coordinate system.
    """
    source_t = _transformations(get_element(sdata, source_key))
    target_t = _transformations(get_element(sdata, target_key))
    shared = [cs for cs in source_t if cs in target_t]
    if not shared:
        msg = (
            f"{source_key!r} (coordinate systems {sorted(source_t)}) and {target_key!r} (coordinate systems "
            f"{sorted(target_t)}) share no coordinate system, so they cannot be related. Register one to the "
            "other with `spatialdata.transformations.set_transformation(...)` into a common coordinate system."
        )
        raise CoordinateSystemError(msg)
    cs = settings.um_coordinate_system if settings.um_coordinate_system in shared else shared[0]
    return np.linalg.inv(transformation_matrix(target_t[cs])) @ transformation_matrix(source_t[cs])


def apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Apply a 3 × 3 affine matrix to an ``(n, 2)`` array of ``(x, y)`` points."""
    xy = np.asarray(xy, dtype=np.float64)
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def pixel_centers(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Column (x) and row (y) coordinates of pixel centres for a raster of ``shape = (ny, nx)``."""
    ny, nx = shape
    return np.arange(nx) + 0.5, np.arange(ny) + 0.5


def raster_shape(element: Any) -> tuple[int, int]:
    """``(ny, nx)`` of the full-resolution level of an image or labels element (DataArray or DataTree)."""
    array = scale_levels(element)[0]
    return int(array.sizes["y"]), int(array.sizes["x"])


def scale_levels(element: Any) -> list[Any]:
    """The pyramid levels of an image or labels element as DataArrays, finest first.

    A single-scale element (DataArray) gives a one-item list.
    """
    from xarray import DataTree

    if not isinstance(element, DataTree):
        return [element]
    levels = sorted(element.children, key=lambda name: int(name.removeprefix("scale")))
    return [next(iter(element[name].data_vars.values())) for name in levels]
