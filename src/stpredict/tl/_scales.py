"""The cross-scale protocol: one dense map aggregated and evaluated at several bin sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from stpredict._errors import InputError

from ._evaluate import evaluate
from ._matching import get_table

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["evaluate_across_scales"]

_DEFAULT_BIN_SIZES = (8.0, 16.0, 55.0)


def _annotated_region(table: AnnData) -> str:
    region = table.uns.get("spatialdata_attrs", {}).get("region")
    if isinstance(region, list | tuple | np.ndarray) and len(region) == 1:
        region = region[0]
    if not isinstance(region, str):
        msg = (
            "A measured table must annotate exactly one shapes element (TableModel region) so that the prediction "
            f"can be aggregated onto its units; it annotates {region!r}."
        )
        raise InputError(msg)
    return region


def evaluate_across_scales(
    sdata: SpatialData,
    map_key: str,
    *,
    truth: Mapping[float, str | AnnData] | None = None,
    bin_sizes: Sequence[float] | None = None,
    truth_map_key: str | None = None,
    genes: Sequence[str] | None = None,
    reduce: str | None = None,
    aggregate_kwargs: Mapping[str, Any] | None = None,
    **evaluate_kwargs: Any,
) -> pd.DataFrame:
    """The cross-scale protocol: one prediction map aggregated and evaluated at several bin sizes.

    For each bin size the dense map ``map_key`` is aggregated with :func:`stpredict.tl.aggregate`
    (``inplace=False``, nothing is written into ``sdata``) and scored with :func:`evaluate`:

    * with ``truth_map_key`` (a ground-truth density map, e.g. from the synthetic generator) both maps are
      aggregated onto the same square bins and matched by grid position;
    * with ``truth`` (measured tables, one per bin size, given as table keys or AnnData) the prediction is
      aggregated onto the shapes each table annotates and matched by instance id.

    Use ``reduce="mean"`` to compare scales on an intensive footing (PixNet's sum grows with area, SPEC.md §2).

    Parameters
    ----------
    sdata
        SpatialData holding the map (and truth map or tables).
    map_key
        Predicted dense map in ``sdata.images``.
    truth
        ``{bin_size: table key or AnnData}`` of measured tables; exclusive with ``truth_map_key``.
    bin_sizes
        Bin sizes in µm; default: the keys of ``truth``, else 8, 16 and 55 µm.
    truth_map_key
        Ground-truth dense map in ``sdata.images``.
    genes
        Genes to aggregate and score (default: all shared).
    reduce
        Passed to :func:`stpredict.tl.aggregate` (default: from the map's value semantics).
    aggregate_kwargs
        Further arguments of :func:`stpredict.tl.aggregate` (e.g. ``tissue_key``, ``origin_um``).
    **evaluate_kwargs
        Passed to :func:`evaluate` (``nan_policy``, ``normalize``, ``highly_predictive_genes``, ...).

    Returns
    -------
    A tidy table with columns ``bin_size_um``, ``metric``, ``value``, ``n_units``, ``n_genes``
    (one row per bin size × summary metric).
    """
    import stpredict.tl as tl

    if (truth is None) == (truth_map_key is None):
        msg = "Give exactly one of `truth` (measured tables per bin size) and `truth_map_key` (a ground-truth map)."
        raise InputError(msg)
    for forbidden in ("match", "inplace", "genes"):
        if forbidden in evaluate_kwargs or forbidden in (aggregate_kwargs or {}):
            msg = f"evaluate_across_scales sets {forbidden!r} itself; do not pass it."
            raise InputError(msg)
    if map_key not in sdata.images:
        msg = f"No image {map_key!r} in the SpatialData; available images: {sorted(sdata.images)}."
        raise KeyError(msg)
    if bin_sizes is None:
        bin_sizes = tuple(truth) if truth is not None else _DEFAULT_BIN_SIZES
    sizes = [float(b) for b in bin_sizes]
    if not sizes or any(not np.isfinite(b) or b <= 0 for b in sizes):
        msg = f"bin_sizes must be positive sizes in µm, got {list(bin_sizes)}."
        raise InputError(msg)
    tables: dict[float, AnnData] = {}
    if truth is not None:
        by_size = {float(k): v for k, v in truth.items()}
        missing = [b for b in sizes if b not in by_size]
        if missing:
            msg = f"No measured table for bin sizes {missing} µm; `truth` has {sorted(by_size)}."
            raise InputError(msg)
        tables = {b: get_table(by_size[b], sdata, name=f"truth[{b:g}]") for b in sizes}
    elif truth_map_key not in sdata.images:
        msg = f"No image {truth_map_key!r} in the SpatialData; available images: {sorted(sdata.images)}."
        raise KeyError(msg)

    rows = []
    for b in sizes:
        agg_kwargs: dict[str, Any] = {**(aggregate_kwargs or {}), "inplace": False, "genes": genes}
        if reduce is not None:
            agg_kwargs["reduce"] = reduce
        if truth is not None:
            measured = tables[b]
            pred = tl.aggregate(sdata, map_key, shapes_key=_annotated_region(measured), **agg_kwargs)
            result = evaluate(pred, measured, genes=genes, match="instance_id", inplace=False, **evaluate_kwargs)
        else:
            pred = tl.aggregate(sdata, map_key, bin_size=b, **agg_kwargs)
            reference = tl.aggregate(sdata, truth_map_key, bin_size=b, **agg_kwargs)
            result = evaluate(pred, reference, genes=genes, match="position", inplace=False, **evaluate_kwargs)
        for metric, value in result.summary.items():
            rows.append(
                {
                    "bin_size_um": b,
                    "metric": metric,
                    "value": float(value),
                    "n_units": result.params["n_units"],
                    "n_genes": result.params["n_genes"],
                }
            )
    return pd.DataFrame(rows)
