"""Bin measured units (e.g. Visium HD 2 µm bins, cells, spots) into larger square bins on the aggregate grid."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._elements import add_elements, check_new_elements
from stpredict._errors import InputError
from stpredict._geometry import apply_affine, to_um_affine
from stpredict._grid import ID_STRIDE, bins_geodataframe, grid_from_args, grid_transformations
from stpredict._keys import Attrs, Keys
from stpredict._logging import get_logger
from stpredict._validation import check_raw_counts
from stpredict.kernels import decimal_names

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["bin_counts"]

logger = get_logger(__name__)


def _regions(adata: AnnData, table_key: str) -> tuple[list[str], np.ndarray]:
    attrs = adata.uns.get("spatialdata_attrs", {})
    region = attrs.get("region")
    region_key = attrs.get("region_key")
    if region is None or region_key is None or region_key not in adata.obs:
        msg = (
            f"Table {table_key!r} does not say which element it annotates (TableModel region/region_key), so its "
            "unit centres cannot be placed in µm. Parse it with `TableModel.parse(..., region=..., region_key=...)`."
        )
        raise InputError(msg)
    regions = [region] if isinstance(region, str) else list(region)
    return regions, adata.obs[region_key].astype(str).to_numpy()


def bin_counts(
    sdata: SpatialData,
    table_key: str = Keys.table,
    *,
    bin_size: float,
    origin_um: tuple[float, float] | None = None,
    align_to: str | None = None,
    key_added: str | None = None,
    layer: str | None = None,
    overwrite: bool = False,
    inplace: bool = True,
) -> AnnData | None:
    """Sum the counts of measured units into square bins of ``bin_size`` µm on the aggregate grid.

    A unit goes to the bin that holds its centre (``obsm["spatial"]``, mapped to µm through the transformation of
    the element it annotates); a centre on an edge goes to the bin above/right of it. With the same ``bin_size``
    and ``origin_um``/``align_to``, bins get the same ``array_row``, ``array_col`` and ``instance_id`` as in
    ``st.tl.aggregate(sdata, map_key, bin_size=...)``, so the two tables line up unit for unit.

    Parameters
    ----------
    sdata
        SpatialData holding the table and the element it annotates.
    table_key
        Table of raw counts with ``obsm["spatial"]`` and TableModel region metadata.
    bin_size
        Side of the bins in µm.
    origin_um
        A bin corner ``(x, y)`` in µm (default the image corner ``(0, 0)``).
    align_to
        Shapes of an existing axis-aligned grid whose corners the bins should share.
    key_added
        Key of the new table (default ``Keys.binned(table_key, bin_size)``); its bins are written as shapes
        ``f"{key_added}_bins"``.
    layer
        Layer with the raw counts (default ``X``).
    overwrite
        Replace an existing table ``key_added`` and shapes ``f"{key_added}_bins"``. Without it, a call whose table or
        bins key exists raises before any work; an element of another type is never replaced.
    inplace
        Write the table and shapes into ``sdata``; otherwise return the table only (and write or check nothing).

    Returns
    -------
    The binned table when ``inplace=False``: ``X`` float32 CSR counts (sums), ``obs`` with ``instance_id``,
    ``region``, ``array_row``, ``array_col``, ``n_units``, ``area_um2``; ``obsm["spatial"]`` bin centres in µm.

    Raises
    ------
    InputError
        On invalid arguments or counts, or (with ``inplace``) a table or bins key that exists without
        ``overwrite``, or that names an element of another type.
    """
    import pandas as pd
    import scipy.sparse as sp
    from anndata import AnnData
    from spatialdata.models import ShapesModel, TableModel

    if table_key not in sdata.tables:
        msg = f"No table {table_key!r} in the SpatialData; available tables: {sorted(sdata.tables)}."
        raise KeyError(msg)
    adata = sdata.tables[table_key]
    grid = grid_from_args(sdata, bin_size, origin_um, align_to)
    key = key_added or Keys.binned(table_key, grid.size)
    shapes_key = f"{key}_bins"
    if "spatial" not in adata.obsm:
        msg = f"Table {table_key!r} has no obsm['spatial'] unit centres; they are needed to assign units to bins."
        raise InputError(msg)
    if layer is not None and layer not in adata.layers:
        msg = f"No layer {layer!r} in table {table_key!r}; available layers: {sorted(adata.layers)}."
        raise KeyError(msg)
    counts = adata.X if layer is None else adata.layers[layer]
    check_raw_counts(counts, name=f"counts of table {table_key!r}")
    regions, unit_region = _regions(adata, table_key)
    if inplace:  # every key this call writes, before any work
        check_new_elements(sdata, {key: "tables", shapes_key: "shapes"}, overwrite=overwrite)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    um = np.full_like(xy, np.nan)
    for region in regions:
        sel = unit_region == region
        if sel.any():
            um[sel] = apply_affine(to_um_affine(sdata, region), xy[sel])
    if not np.isfinite(um).all():
        msg = f"Some units of {table_key!r} have no finite centre or annotate an element not listed in its region."
        raise InputError(msg)
    row, col = grid.assign(um[:, 0], um[:, 1])
    ids = grid.ids(row, col)
    uniq, unit_bin = np.unique(ids, return_inverse=True)
    n_bins, n_units = uniq.size, ids.size
    assign = sp.csr_matrix(
        (np.ones(n_units, dtype=np.float32), (unit_bin, np.arange(n_units))), shape=(n_bins, n_units)
    )
    x = sp.csr_matrix(assign @ sp.csr_matrix(counts, dtype=np.float32))
    x.sum_duplicates()
    b_row, b_col = uniq // ID_STRIDE, uniq % ID_STRIDE
    obs = pd.DataFrame(
        {
            Keys.instance_key: uniq,
            "array_row": b_row,
            "array_col": b_col,
            "n_units": np.bincount(unit_bin, minlength=n_bins),
            "area_um2": np.full(n_bins, grid.size**2),
        },
        index=pd.Index(decimal_names(uniq), dtype=object, copy=False),
    )
    obs[Keys.region_key] = pd.Categorical.from_codes(np.zeros(n_bins, dtype=np.int8), categories=[shapes_key])
    centres = np.c_[grid.x0 + (b_col + 0.5) * grid.size, grid.y0 + (b_row + 0.5) * grid.size]
    out = AnnData(X=x, obs=obs, var=adata.var.copy(), obsm={"spatial": centres})
    params: dict[str, Any] = {"table_key": table_key, "assignment": "centre", "spatial_space": "um", "layer": layer}
    out.uns[Attrs.root] = params | grid.params() | {"align_to": align_to}
    out = TableModel.parse(out, region=shapes_key, region_key=Keys.region_key, instance_key=Keys.instance_key)
    if not inplace:
        return out
    reference = regions[0]
    gdf = bins_geodataframe(grid, b_row, b_col, uniq)
    shapes = ShapesModel.parse(gdf, transformations=grid_transformations(sdata, reference))
    add_elements(sdata, {shapes_key: ("shapes", shapes), key: ("tables", out)})
    return None
