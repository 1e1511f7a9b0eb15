"""Build stpredict's layout from an in-memory (or on-disk) image and an AnnData of units with pixel positions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stpredict._errors import InputError
from stpredict._keys import Keys
from stpredict._logging import get_logger

from ._build import GLOBAL_CS, assemble, check_positive, check_units_on_image, counts_matrix
from ._image import build_image, decode_image, image_size, to_rgb_uint8

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["from_image_and_table"]

logger = get_logger(__name__)


def from_image_and_table(
    image: str | Path | np.ndarray | Any,
    adata: AnnData,
    *,
    um_per_px: float,
    x_key: str = "x",
    y_key: str = "y",
    spatial_key: str | None = None,
    unit_diameter_um: float | None = None,
    layer: str | None = None,
    section: str | None = None,
    patient: str | None = None,
    image_key: str = Keys.image,
    shapes_key: str = Keys.spots,
    table_key: str = Keys.table,
    scale_factors: Sequence[int] | None = None,
    chunks: int = 1024,
) -> SpatialData:
    """Build a calibrated SpatialData from an H&E image and an AnnData whose units (spots, cells) have pixel positions.

    For data that no reader covers (a HEST-1k sample, a crop, a custom pipeline). Xenium, Visium and Visium HD
    bundles go through :func:`stpredict.io.read_xenium`, :func:`~stpredict.io.read_visium` and
    :func:`~stpredict.io.read_visium_hd`, which take the registration and scale from the bundle.

    Parameters
    ----------
    image
        An image file, a numpy array ``(y, x, 3|4)`` (channels last when the last axis has 3 or 4 entries) or
        ``(3|4, y, x)``, or an :class:`xarray.DataArray` with dims ``c``, ``y``, ``x``. RGB uint8 (alpha dropped);
        arrays are copied, never changed.
    adata
        Units × genes raw counts (in ``X`` or ``layers[layer]``); it is not modified.
    um_per_px
        Micrometres per pixel of ``image`` (required: nothing here records it).
    x_key, y_key
        Columns of ``adata.obs`` with the pixel column (x) and row (y) of each unit centre. Check the convention
        of your source: e.g. DeepSpot/HEST ``x_pixel`` is the ROW (pass ``x_key="y_pixel", y_key="x_pixel"``).
    spatial_key
        Instead of ``x_key``/``y_key``: a key of ``adata.obsm`` with ``(x, y)`` per unit in pixels.
    unit_diameter_um
        Diameter of the units in µm. Given: ``shapes[shapes_key]`` holds circles; ``None``: ``points[shapes_key]``
        holds the centres (no size is invented).
    layer
        Layer with the raw counts; default ``X``.
    section, patient
        Added to ``obs`` (``section``, ``patient``) when given.
    image_key, shapes_key, table_key
        Element names.
    scale_factors
        Pyramid factors; default: factors of 2 until the coarsest level is at most 1024 px.
    chunks
        Dask chunk edge in pixels.

    Returns
    -------
    SpatialData in the same layout as :func:`stpredict.io.read_st`: ``images[image_key]``, circles or points under
    ``shapes_key``, ``tables[table_key]`` (csr float32 counts, the caller's ``obs`` columns plus ``region`` and
    ``instance_id``, ``obsm["spatial"]`` in image pixels), calibrated in ``"um"``.

    Raises
    ------
    InputError
        If units lie outside the image or have no coordinates, counts are not raw, gene names are missing or
        duplicated, or the image is unreadable.
    KeyError
        If a coordinate key or the layer does not exist.
    """
    um_per_px = check_positive(um_per_px, "um_per_px", "Pass the image's pixel size in micrometres.")
    if unit_diameter_um is not None:
        unit_diameter_um = check_positive(unit_diameter_um, "unit_diameter_um", "Pass the unit diameter in µm.")
    xy = _coordinates(adata, x_key=x_key, y_key=y_key, spatial_key=spatial_key)
    counts = _layer(adata, layer)
    matrix = counts_matrix(counts, name="counts" if layer is None else f"counts in layers[{layer!r}]")

    fix = (
        "Check which column is x (image column) and which is y (image row), and that the coordinates are in this "
        "image's pixels (not µm or another resolution)."
    )
    if isinstance(image, str | Path):
        check_units_on_image(xy, image_size(image), what="units", fix=fix)
        array = decode_image(image)
        source = str(image)
    else:
        array = _array_yxc(image)
        source = "in-memory array"
        check_units_on_image(xy, array.shape[:2], what="units", fix=fix)

    obs = adata.obs.copy()
    clashes = [c for c in (Keys.region_key, Keys.instance_key) if c in obs.columns]
    if clashes:
        logger.info("obs columns %s are replaced by the table annotation.", clashes)
    if section is not None:
        obs["section"] = pd.Categorical([str(section)] * len(obs))
    if patient is not None:
        obs["patient"] = pd.Categorical([str(patient)] * len(obs))
    element = build_image(
        array, transformations=_identity(), scale_factors=scale_factors, chunks=chunks, name=image_key
    )
    uns = {
        "reader": "stpredict.io.from_image_and_table",
        "source": source,
        "coordinates": [spatial_key] if spatial_key is not None else [x_key, y_key],
        "um_per_px": um_per_px,
        "unit_diameter_um": unit_diameter_um,
        "layer": layer,
        "section": section,
        "patient": patient,
    }
    return assemble(
        element,
        xy=xy,
        counts=matrix,
        var=adata.var.copy(),
        obs=obs,
        um_per_px=um_per_px,
        diameter_um=unit_diameter_um,
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        uns=uns,
        image_meta={"source": source},
    )


def _identity() -> dict[str, Any]:
    from spatialdata.transformations import Identity

    return {GLOBAL_CS: Identity()}


def _coordinates(adata: AnnData, *, x_key: str, y_key: str, spatial_key: str | None) -> np.ndarray:
    if spatial_key is not None:
        if spatial_key not in adata.obsm:
            msg = f"No adata.obsm[{spatial_key!r}]; available: {sorted(adata.obsm)}."
            raise KeyError(msg)
        values = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
        if values.ndim != 2 or values.shape[1] < 2:
            msg = f"adata.obsm[{spatial_key!r}] must be (n_units, 2) with x, y; got shape {values.shape}."
            raise InputError(msg)
        return values[:, :2].copy()
    missing = [k for k in (x_key, y_key) if k not in adata.obs.columns]
    if missing:
        msg = (
            f"No column(s) {missing} in adata.obs (columns: {list(adata.obs.columns)}). Pass `x_key=`/`y_key=` "
            "(pixel column and row) or `spatial_key=`."
        )
        raise KeyError(msg)
    try:
        return np.column_stack([adata.obs[x_key].to_numpy(np.float64), adata.obs[y_key].to_numpy(np.float64)])
    except (TypeError, ValueError) as error:
        msg = f"adata.obs[{x_key!r}] and adata.obs[{y_key!r}] must be numeric pixel coordinates ({error})."
        raise InputError(msg) from error


def _layer(adata: AnnData, layer: str | None) -> Any:
    if layer is None:
        if adata.X is None:
            msg = "adata.X is empty; pass `layer=` with the raw counts."
            raise InputError(msg)
        return adata.X
    if layer not in adata.layers:
        msg = f"No adata.layers[{layer!r}]; available: {sorted(adata.layers)}."
        raise KeyError(msg)
    return adata.layers[layer]


def _array_yxc(image: Any) -> np.ndarray:
    """A private ``(y, x, 3)`` uint8 copy of an in-memory image."""
    from xarray import DataArray

    if isinstance(image, DataArray):
        if set(image.dims) != {"c", "y", "x"}:
            msg = f"The image DataArray must have dims c, y, x; got {image.dims}."
            raise InputError(msg)
        array = np.asarray(image.transpose("y", "x", "c").values)
    else:
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[-1] not in (3, 4) and array.shape[0] in (3, 4):
            array = np.moveaxis(array, 0, -1)
    return np.array(to_rgb_uint8(array, name="The image"), copy=True, order="C")
