"""Physical scale (µm per pixel) of an image, and checks that a table lines up with it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._errors import CalibrationError, CoordinateSystemError, InputError
from stpredict._geometry import (
    affine_between,
    apply_affine,
    get_element,
    is_calibrated,
    raster_shape,
    set_um_per_px,
)
from stpredict._geometry import (
    um_per_px as _um_per_px,
)
from stpredict._keys import Keys
from stpredict._logging import get_logger

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["calibrate", "check_same_coordinate_system", "check_units_inside_image", "unit_centers"]

logger = get_logger(__name__)

#: Relative difference below which two µm/px values count as the same.
_RTOL = 1e-6


def _infer_from_metadata(sdata: SpatialData, image_key: str) -> float | None:
    """µm/px from reader metadata (:func:`stpredict.io._metadata.infer_um_per_px`), or ``None``."""
    try:
        from stpredict.io._metadata import infer_um_per_px
    except ModuleNotFoundError as err:  # the metadata reader is not installed in this build
        if err.name != "stpredict.io._metadata":
            raise
        return None
    value = infer_um_per_px(sdata, image_key)
    return None if value is None else float(value)


def calibrate(
    sdata: SpatialData,
    image_key: str = Keys.image,
    *,
    um_per_px: float | None = None,
    table_key: str | None = None,
    inplace: bool = True,
) -> float:
    """Set or infer the physical pixel size of an image and record it as the ``"um"`` coordinate system.

    Every element sharing a coordinate system with the image (spots, bins, labels) gets a transformation to
    micrometres too (:func:`stpredict._geometry.set_um_per_px`), so every later step finds the scale.

    Parameters
    ----------
    sdata
        The SpatialData holding the image.
    image_key
        Key of the image in ``sdata.images``.
    um_per_px
        Micrometres per full-resolution pixel. ``None`` keeps an existing calibration, or else infers the
        scale from reader metadata (Visium scale factors, OME physical sizes). An explicit value always wins:
        it overwrites a different existing calibration (logged).
    table_key
        If given, first check that this table's region element shares a coordinate system with the image
        (:func:`check_same_coordinate_system`) and that its units lie on the image
        (:func:`check_units_inside_image`).
    inplace
        Write the calibration into ``sdata``. With ``False`` only the value is worked out and returned.

    Returns
    -------
    The µm per full-resolution pixel of the image (also when ``inplace=True``).

    Raises
    ------
    CalibrationError
        If ``um_per_px`` is ``None``, the image is not calibrated and no reader metadata gives the scale.
    CoordinateSystemError
        If ``table_key`` annotates an element that shares no coordinate system with the image.
    """
    if image_key not in sdata.images:
        msg = f"No image {image_key!r} in the SpatialData; available images: {sorted(sdata.images)}."
        raise KeyError(msg)
    if um_per_px is not None and (not np.isfinite(um_per_px) or um_per_px <= 0):
        msg = f"um_per_px must be a positive finite number of micrometres per pixel, got {um_per_px!r}."
        raise InputError(msg)
    if table_key is not None:
        check_same_coordinate_system(sdata, image_key, table_key)
        check_units_inside_image(sdata, image_key, table_key)

    current = _um_per_px(sdata, image_key) if is_calibrated(sdata, image_key) else None
    if um_per_px is None:
        value = current if current is not None else _infer_from_metadata(sdata, image_key)
        if value is None:
            msg = (
                f"The physical pixel size of image {image_key!r} is unknown and no reader metadata records it. "
                f"Pass it explicitly: `st.pp.calibrate(sdata, {image_key!r}, um_per_px=...)` "
                "(micrometres per full-resolution pixel, e.g. from the scanner's metadata)."
            )
            raise CalibrationError(msg)
    else:
        value = float(um_per_px)
        if current is not None and abs(current - value) > _RTOL * max(current, value):
            logger.warning(
                "Image %r was calibrated at %.6g µm/px; overwriting with %.6g µm/px.", image_key, current, value
            )
    if inplace and (current is None or abs(current - value) > _RTOL * max(current, value)):
        set_um_per_px(sdata, image_key, value)
        logger.info("Calibrated %r at %.6g µm/px (coordinate system 'um').", image_key, value)
    return float(value)


def _table_regions(sdata: SpatialData, table_key: str) -> list[str]:
    if table_key not in sdata.tables:
        msg = f"No table {table_key!r} in the SpatialData; available tables: {sorted(sdata.tables)}."
        raise KeyError(msg)
    attrs = sdata.tables[table_key].uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    if region is None:
        msg = (
            f"Table {table_key!r} annotates no element (no `region` in its spatialdata attrs). Parse it with "
            "`spatialdata.models.TableModel.parse(adata, region=..., region_key='region', instance_key=...)`."
        )
        raise InputError(msg)
    regions = [region] if isinstance(region, str) else [str(r) for r in region]
    missing = [r for r in regions if r not in {k for _, k, _ in sdata.gen_elements()}]
    if missing:
        msg = f"Table {table_key!r} annotates {missing}, which are not in the SpatialData. Add them or fix `region`."
        raise InputError(msg)
    return regions


def check_same_coordinate_system(sdata: SpatialData, image_key: str, table_key: str) -> dict[str, np.ndarray]:
    """Check that every element annotated by a table shares a coordinate system with the image.

    Parameters
    ----------
    sdata
        The SpatialData.
    image_key
        Key of the image.
    table_key
        Key of the table; its ``region`` names the annotated elements.

    Returns
    -------
    For each annotated element, the 3 × 3 affine matrix ``(x, y, 1)`` from its intrinsic space to the
    image's pixel space.

    Raises
    ------
    CoordinateSystemError
        If an annotated element shares no coordinate system with the image.
    """
    get_element(sdata, image_key)
    affines = {}
    for region in _table_regions(sdata, table_key):
        try:
            affines[region] = affine_between(sdata, region, image_key)
        except CoordinateSystemError as err:
            msg = f"Table {table_key!r} annotates {region!r}, which cannot be placed on image {image_key!r}: {err}"
            raise CoordinateSystemError(msg) from err
    return affines


def unit_centers(sdata: SpatialData, table_key: str, region: str) -> np.ndarray:
    """``(n, 2)`` centres ``(x, y)`` of the units of ``region`` annotated by ``table_key``, intrinsic coordinates.

    Taken from ``table.obsm["spatial"]`` when present, else from the centroids of the shapes element.
    """
    table = sdata.tables[table_key]
    region_key = table.uns["spatialdata_attrs"]["region_key"]
    rows = np.asarray(table.obs[region_key].astype(str) == region)
    if "spatial" in table.obsm:
        return np.asarray(table.obsm["spatial"], dtype=np.float64)[rows, :2]
    element = get_element(sdata, region)
    if region not in sdata.shapes:
        msg = (
            f"Table {table_key!r} has no `obsm['spatial']` and annotates {region!r}, which is not a shapes "
            "element, so its unit centres are unknown. Add `obsm['spatial']` (x, y in the element's pixels)."
        )
        raise InputError(msg)
    instance_key = table.uns["spatialdata_attrs"]["instance_key"]
    centroids = element.geometry.centroid
    xy = np.column_stack([centroids.x.to_numpy(), centroids.y.to_numpy()])
    position = {k: i for i, k in enumerate(element.index)}
    ids = table.obs.loc[rows, instance_key].to_numpy()
    return xy[[position[i] for i in ids]]


def check_units_inside_image(
    sdata: SpatialData, image_key: str, table_key: str, *, max_fraction_outside: float = 0.0
) -> int:
    """Check that the unit centres of a table lie on the image.

    Parameters
    ----------
    sdata
        The SpatialData.
    image_key
        Key of the image.
    table_key
        Key of the table.
    max_fraction_outside
        Largest tolerated fraction of units whose centre falls outside the image.

    Returns
    -------
    The number of units outside the image.

    Raises
    ------
    InputError
        If more than ``max_fraction_outside`` of the units lie outside the image; usually the coordinates
        belong to another resolution of the image (e.g. full-resolution spots on a down-sampled render).
    """
    ny, nx = raster_shape(get_element(sdata, image_key))
    n_out = n_total = 0
    example: list[Any] = []
    for region, affine in check_same_coordinate_system(sdata, image_key, table_key).items():
        xy = apply_affine(affine, unit_centers(sdata, table_key, region))
        outside = ~((xy[:, 0] >= 0) & (xy[:, 0] <= nx) & (xy[:, 1] >= 0) & (xy[:, 1] <= ny))
        n_out += int(outside.sum())
        n_total += len(xy)
        example.extend(xy[outside][:3].round(1).tolist())
    if n_total and n_out > max_fraction_outside * n_total:
        msg = (
            f"{n_out} of {n_total} units of table {table_key!r} lie outside image {image_key!r} "
            f"({nx} × {ny} px), e.g. at (x, y) = {example[:3]}. The unit coordinates probably belong to another "
            "resolution of the image (full-resolution coordinates on a down-sampled image, or x/y swapped); fix "
            "the shapes' transformation with `spatialdata.transformations.set_transformation`, or drop those units."
        )
        raise InputError(msg)
    return n_out
