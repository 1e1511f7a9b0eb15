"""Assemble stpredict's SpatialData layout from an image, unit centres and counts.

Layout (shared by :func:`stpredict.io.read_st` and :func:`stpredict.io.from_image_and_table`):

* ``images[image_key]``: ``(c, y, x)`` uint8, ``c = ["r", "g", "b"]``, multiscale, dask-backed;
  transformation ``Identity`` to the coordinate system ``"global"`` (image pixel space) and ``Scale(µm/px)`` to
  ``"um"``.
* ``shapes[shapes_key]``: circles (``radius`` in image pixels) when the unit diameter is known; otherwise
  ``points[shapes_key]``, a :class:`~spatialdata.models.PointsModel` element of the centres with an
  ``instance_id`` column (no radius is invented). Index/ids = integers ``0..n-1``; transformations as the image.
* ``tables[table_key]``: raw counts, csr float32; ``obs`` with ``region``, ``instance_id`` and the
  caller's columns; ``obsm["spatial"]`` = unit centres in image pixels (x, y); annotates ``shapes_key``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from stpredict._errors import InputError
from stpredict._geometry import set_um_per_px
from stpredict._keys import Attrs, Keys
from stpredict._logging import get_logger
from stpredict._meta import set_element_meta
from stpredict._validation import check_gene_names, check_raw_counts

if TYPE_CHECKING:
    from collections.abc import Mapping

    from spatialdata import SpatialData

__all__ = ["GLOBAL_CS", "assemble", "check_positive", "check_units_on_image", "counts_matrix"]

logger = get_logger(__name__)

#: Coordinate system of the image's pixel space (identity for the image).
GLOBAL_CS = "global"


def check_positive(value: Any, name: str, fix: str) -> float:
    """``value`` as a positive finite float, else an InputError that names ``fix``."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or number <= 0:
        msg = f"{name} must be a positive number, got {value!r}. {fix}"
        raise InputError(msg)
    return number


def counts_matrix(values: Any, *, name: str) -> sparse.csr_matrix:
    """Validate raw counts (finite, non-negative integers) and return them as csr float32."""
    if sparse.issparse(values):
        matrix = sparse.csr_matrix(values)
    else:
        array = np.asarray(values)
        if array.dtype == object:
            msg = f"{name} contain non-numeric entries; raw integer counts are required. Fix or remove them."
            raise InputError(msg)
        matrix = sparse.csr_matrix(array)
    check_raw_counts(matrix, name=name)
    matrix = matrix.astype(np.float32)
    matrix.eliminate_zeros()
    return matrix


def check_units_on_image(xy: np.ndarray, shape_yx: tuple[int, int], *, what: str, fix: str) -> None:
    """Raise if any unit centre is not finite or lies outside the image ``[0, nx) × [0, ny)``."""
    finite = np.isfinite(xy).all(axis=1)
    if not finite.all():
        msg = f"{int((~finite).sum())} {what} have missing (NaN) or infinite coordinates. Drop them or fill them in."
        raise InputError(msg)
    ny, nx = shape_yx
    outside = (xy[:, 0] < 0) | (xy[:, 0] >= nx) | (xy[:, 1] < 0) | (xy[:, 1] >= ny)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        msg = (
            f"{int(outside.sum())} of {len(xy)} {what} lie outside the image ({nx} × {ny} px), e.g. at "
            f"x={xy[i, 0]:.1f}, y={xy[i, 1]:.1f}. The coordinates are not in this image's pixel space. {fix}"
        )
        raise InputError(msg)


def assemble(
    image: Any,
    *,
    xy: np.ndarray,
    counts: sparse.csr_matrix,
    var: pd.DataFrame,
    obs: pd.DataFrame,
    um_per_px: float,
    diameter_um: float | None,
    image_key: str = Keys.image,
    shapes_key: str = Keys.spots,
    table_key: str = Keys.table,
    uns: Mapping[str, Any] | None = None,
    image_meta: Mapping[str, Any] | None = None,
) -> SpatialData:
    """Build the layout described in the module docstring and calibrate it.

    Parameters
    ----------
    image
        A parsed image element (DataTree or DataArray) with an ``Identity`` transformation to ``"global"``.
    xy
        ``(n, 2)`` unit centres ``(x = column, y = row)`` in the image's pixel space.
    counts
        ``(n, n_genes)`` csr float32 raw counts, already validated.
    var
        Gene table; its index (gene names) is validated here.
    obs
        Per-unit annotations (index = unit names); ``region`` and ``instance_id`` are added.
    um_per_px
        Micrometres per image pixel.
    diameter_um
        Unit (spot) diameter in µm; ``None`` writes points instead of circles.
    image_key, shapes_key, table_key
        Element names.
    uns
        Stored under ``table.uns["stpredict"]`` (None values dropped, so that zarr can write it).
    image_meta
        Provenance of the image (:func:`stpredict._meta.set_element_meta`); ``um_per_px`` is added.
    """
    import anndata as ad
    from spatialdata import SpatialData
    from spatialdata.models import PointsModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity

    check_gene_names(var.index, name="gene names (var_names)")
    n = len(xy)
    if n == 0:
        msg = "There are no units (spots/cells) left to read; check the spot selection and the counts table."
        raise InputError(msg)
    if counts.shape[0] != n or len(obs) != n:
        msg = f"Internal mismatch: {n} centres, {counts.shape[0]} count rows, {len(obs)} obs rows."
        raise InputError(msg)
    transformations = {GLOBAL_CS: Identity()}
    instance_ids = np.arange(n, dtype=np.int64)
    xy = np.asarray(xy, dtype=np.float64)
    if diameter_um is not None:
        radius_px = diameter_um / 2.0 / um_per_px
        units = ShapesModel.parse(
            xy,
            geometry=0,
            radius=np.full(n, radius_px),
            index=pd.Index(instance_ids, name=Keys.instance_key),
            transformations=transformations,
        )
    else:
        frame = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], Keys.instance_key: instance_ids})
        units = PointsModel.parse(frame, instance_key=Keys.instance_key, transformations=transformations)

    obs = obs.copy()
    obs[Keys.region_key] = pd.Categorical([shapes_key] * n)
    obs[Keys.instance_key] = instance_ids
    adata = ad.AnnData(X=counts, obs=obs, var=var.copy())
    adata.obsm["spatial"] = xy.copy()
    adata.uns[Attrs.root] = _drop_none(dict(uns or {}))
    table = TableModel.parse(adata, region=shapes_key, region_key=Keys.region_key, instance_key=Keys.instance_key)

    sdata = SpatialData(
        images={image_key: image},
        shapes={shapes_key: units} if diameter_um else {},
        points={} if diameter_um else {shapes_key: units},
        tables={table_key: table},
    )
    set_um_per_px(sdata, image_key, um_per_px)
    set_element_meta(
        sdata, image_key, sdata.images[image_key], _drop_none({**dict(image_meta or {}), "um_per_px": um_per_px})
    )
    logger.info(
        "Read %d units × %d genes; %r at %.6g µm/px, %s %r.",
        n,
        counts.shape[1],
        image_key,
        um_per_px,
        "circles" if diameter_um else "points",
        shapes_key,
    )
    return sdata


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value if v is not None]
    return value
