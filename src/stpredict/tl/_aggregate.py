"""Aggregate any image with channels (dense maps, ground truth, H&E) into an AnnData table.

Three kinds of units, all with exact pixel-area weights (each pixel counts by the area it shares with the unit):

* square bins of any size in µm on a grid defined in the ``"um"`` coordinate system (see :class:`stpredict._grid.Grid`),
* circles and polygons of a shapes element,
* the labels of a labels element at any resolution.

Value semantics (``reduce``)
    ``"mean"``: the area-weighted mean ``Σ v·a / Σ a`` over the pixels of the map, ``a`` being the area each
    pixel shares with the unit. ``"sum"``: the integral of the map over the unit. For a map declared
    ``"density"`` (expected counts per µm²) it is ``Σ v·a`` with ``a`` in µm², i.e. expected counts in the unit;
    for a map with no declared kind it is ``Σ v·a`` with ``a`` in pixels (a plain pixel sum, like
    ``spatialdata.aggregate``). ``uns["stpredict"]["sum_unit"]`` records which.

Reading the map
    A map held in memory is read where it is: ``Image2DModel.parse`` of a numpy array gives a dask array whose
    chunks are views of that array, so the kernels run once over the array itself (no copy, no dask task); chunks
    that are separate in-memory arrays are passed to the kernels one by one, as they are. Any other dask array
    (zarr-backed, computed lazily) is read in chunk-aligned blocks of at most ``block_bytes``, the next block
    computed in a background thread while the kernels work on the current one.

Pyramids
    Only the full-resolution level is read: spatialdata builds coarser levels by resampling, which is not the
    exact area mean, so no coarser level gives a result identical to the finest one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._elements import add_elements, check_new_elements
from stpredict._errors import InputError
from stpredict._grid import bins_geodataframe, grid_from_args, grid_transformations
from stpredict._keys import Attrs, Keys
from stpredict._logging import get_logger
from stpredict.kernels import decimal_names

from ._aggregate_map import _check_map, _finish
from ._aggregate_units import _bins, _labels, _shapes, _tissue_key
from ._raster import BLOCK_BYTES

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["aggregate"]

logger = get_logger(__name__)


def aggregate(
    sdata: SpatialData,
    map_key: str,
    *,
    bin_size: float | None = None,
    shapes_key: str | None = None,
    labels_key: str | None = None,
    reduce: Literal["mean", "sum"] | None = None,
    genes: str | list[str] | None = None,
    key_added: str | None = None,
    origin_um: tuple[float, float] | None = None,
    align_to: str | None = None,
    tissue_key: str | Literal[False] | None = None,
    allow_subpixel: bool = False,
    force: bool = False,
    block_bytes: int = BLOCK_BYTES,
    overwrite: bool = False,
    inplace: bool = True,
    show_progress_bar: bool | None = None,
) -> AnnData | None:
    """Aggregate a dense map (any image with named channels) into a table of square bins, shapes or labels.

    Every pixel contributes by the exact area it shares with a unit. The map is read block by block
    (dask-backed, multiscale maps stay out of core: memory is bounded by ``block_bytes`` plus the output).

    Parameters
    ----------
    sdata
        SpatialData holding the image.
    map_key
        Image ``(c, y, x)`` in ``sdata.images`` whose channel names become ``var_names`` (a dense map from
        :func:`stpredict.tl.predict_dense`, a ground-truth map, or any image with named channels).
    bin_size
        Side of square bins in µm, on a grid with a corner at ``origin_um`` or on ``align_to``'s grid (the grid of
        :func:`stpredict.pp.bin_counts`, so the two tables line up bin for bin). Exactly one of ``bin_size``,
        ``shapes_key`` and ``labels_key``.
    shapes_key
        Shapes element of circles (``radius`` column) and/or (multi)polygons (holes respected).
    labels_key
        Labels element at any resolution, axis-aligned with the map; label 0 is background.
    reduce
        ``"mean"`` or ``"sum"`` (see the module notes for their exact meaning). Default from the map's declared
        value kind: ``"sum"`` for ``"density"``, ``"mean"`` for ``"intensive"``; required when undeclared.
    genes
        Channels to aggregate (default all).
    key_added
        Table key; default ``Keys.binned(map_key, bin_size)`` for bins, ``f"{map_key}_{shapes_key}"`` or
        ``f"{map_key}_{labels_key}"`` otherwise. Square bins are written as shapes ``f"{key_added}_bins"``.
    origin_um
        A bin corner ``(x, y)`` in µm (default the image corner ``(0, 0)``).
    align_to
        Shapes of an existing axis-aligned grid (e.g. Visium HD 2 µm bins) whose corners the grid should share.
    tissue_key
        Labels whose non-zero pixels are tissue; bins that do not meet it are left out. Default: the map's
        recorded tissue mask or ``Keys.tissue_mask`` of the map or of ``"he"`` if present; ``False`` keeps every
        bin that meets the map.
    allow_subpixel
        Allow bins smaller than a map pixel (they only interpolate the map).
    force
        Allow the reduction that does not fit the map's declared value kind.
    block_bytes
        Bytes of the map read at a time when it is not in memory (a map in memory is read where it is).
    overwrite
        Replace an existing table ``key_added`` (and, for bins, shapes ``f"{key_added}_bins"``). Without it, a call
        whose table or bins key exists raises before any work; an element of another type is never replaced.
    inplace
        Write the table (and the bins shapes) into ``sdata``; otherwise return the table and write nothing (and
        check no key).
    show_progress_bar
        Default ``settings.show_progress_bar``.

    Returns
    -------
    The table when ``inplace=False``. ``X`` (float32) holds the values; ``obs`` has ``instance_id``, ``region``,
    ``n_pixels`` (map pixels inside the unit, fractional), ``area_um2`` (the unit's area on the map) and, for bins,
    ``array_row``, ``array_col`` (and ``tissue_fraction``); ``obsm["spatial"]`` the unit centres in the annotated
    element's intrinsic coordinates (µm for bins); ``uns["stpredict"]`` the parameters.

    Raises
    ------
    InputError
        On invalid arguments, or (with ``inplace``) a table or bins key that exists without ``overwrite``, or
        that names an element of another type.
    """
    from anndata import AnnData
    from spatialdata.models import ShapesModel, TableModel

    chosen = [
        k for k, v in (("bin_size", bin_size), ("shapes_key", shapes_key), ("labels_key", labels_key)) if v is not None
    ]
    if len(chosen) != 1:
        msg = f"Pass exactly one of bin_size, shapes_key and labels_key (got {chosen or 'none'})."
        raise InputError(msg)
    if shapes_key is not None and shapes_key not in sdata.shapes:
        msg = f"No shapes {shapes_key!r} in the SpatialData; available shapes: {sorted(sdata.shapes)}."
        raise KeyError(msg)
    if bin_size is None and (origin_um is not None or align_to is not None):
        msg = "origin_um and align_to only apply to square bins (bin_size)."
        raise InputError(msg)
    m = _check_map(sdata, map_key, genes, reduce, force, need_um=bin_size is not None)
    params: dict[str, Any] = {"map_key": map_key, "reduce": m.reduce, "value_kind": m.value_kind}
    grid = grid_from_args(sdata, bin_size, origin_um, align_to) if bin_size is not None else None
    if grid is not None:
        px_um = math.sqrt(m.px_area_um2)
        if grid.size < px_um * (1 - 1e-9) and not allow_subpixel:
            msg = (
                f"bin_size={bin_size} µm is smaller than a pixel of {map_key!r} ({px_um:.4g} µm): such bins only "
                "interpolate the map. Use a larger bin, or pass allow_subpixel=True."
            )
            raise InputError(msg)
        tissue = _tissue_key(sdata, map_key, tissue_key)
        key = key_added or Keys.binned(map_key, grid.size)
        region = f"{key}_bins"
    else:
        unit_key = shapes_key if shapes_key is not None else labels_key
        key = key_added or f"{map_key}_{unit_key}"
        region = unit_key
    if inplace:  # every key this call writes, before any work
        check_new_elements(
            sdata, {key: "tables", region: "shapes"} if grid is not None else {key: "tables"}, overwrite=overwrite
        )
    if grid is not None:
        x, obs, sum_unit = _bins(sdata, m, grid, tissue, block_bytes, show_progress_bar)
        params |= grid.params() | {"tissue_key": tissue, "align_to": align_to, "spatial_space": "um"}
    elif shapes_key is not None:
        sums, obs = _shapes(sdata, m, shapes_key, block_bytes, show_progress_bar)
        x, sum_unit = _finish(sums, obs, m)
        params |= {"shapes_key": shapes_key, "spatial_space": "intrinsic"}
    else:
        sums, obs = _labels(sdata, m, labels_key, block_bytes, show_progress_bar)
        x, sum_unit = _finish(sums, obs, m)
        params |= {"labels_key": labels_key, "spatial_space": "intrinsic"}
    params["sum_unit"] = sum_unit
    spatial = obs.pop("spatial")
    import anndata
    import pandas as pd

    ids = np.asarray(obs[Keys.instance_key])
    integer = np.issubdtype(ids.dtype, np.integer)
    names = decimal_names(ids) if integer else np.array(list(map(str, ids.tolist())), dtype=object)
    obs_df = pd.DataFrame(obs, index=pd.Index(names, dtype=object, copy=False))
    obs_df[Keys.region_key] = pd.Categorical.from_codes(np.zeros(len(obs_df), dtype=np.int8), categories=[region])
    # bin and label ids are unique by construction; a shapes element's index is the user's, so it is checked
    with anndata.settings.override(check_uniqueness=shapes_key is not None):
        adata = AnnData(X=x, obs=obs_df, var=pd.DataFrame(index=m.channels), obsm={"spatial": spatial})
    adata.uns[Attrs.root] = params
    # what TableModel.parse writes, without its per-call validation (groupby over millions of bins)
    adata.uns[TableModel.ATTRS_KEY] = {
        TableModel.REGION_KEY: region,
        TableModel.REGION_KEY_KEY: Keys.region_key,
        TableModel.INSTANCE_KEY: Keys.instance_key,
    }
    if not inplace:
        return adata
    elements: dict[str, Any] = {}
    if grid is not None:
        gdf = bins_geodataframe(grid, obs["array_row"], obs["array_col"], obs[Keys.instance_key])
        elements[region] = ("shapes", ShapesModel.parse(gdf, transformations=grid_transformations(sdata, map_key)))
    elements[key] = ("tables", adata)
    add_elements(sdata, elements)
    return None
