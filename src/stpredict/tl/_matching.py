"""Pairing two tables for evaluation: the tables (given or by key), which units match, which genes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from stpredict._errors import InputError
from stpredict._keys import Keys

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["Match", "dense_rows", "get_table", "match_units", "resolve_genes", "resolve_match", "table_matrix"]

_ROW, _COL = "array_row", "array_col"
Match = Literal["auto", "instance_id", "obs_names", "position"]
_MATCHES = ("auto", "instance_id", "obs_names", "position")


def get_table(value: AnnData | str, sdata: SpatialData | None, *, name: str, call: str | None = None) -> AnnData:
    """The table ``value`` names: an AnnData as given, or a key of ``sdata.tables``.

    Parameters
    ----------
    value
        An AnnData, or the key of a table of ``sdata``.
    sdata
        The SpatialData that holds the keyed tables (or None when only AnnData are given).
    name
        The parameter ``value`` was passed as, for the messages (``"pred"``, ``"truth[16.0]"``).
    call
        An example call with ``sdata=`` for the message when a key comes without a SpatialData.

    Raises
    ------
    KeyError
        If ``value`` is a key that ``sdata`` lacks; the message lists the tables it has.
    InputError
        If ``value`` is a key but no ``sdata`` is given, a SpatialData, or neither an AnnData nor a key.
    """
    from anndata import AnnData

    example = f" {call}" if call else ""
    if isinstance(value, AnnData):
        return value
    if isinstance(value, str):
        if sdata is None:
            msg = (
                f"`{name}` is the table key {value!r}, but no SpatialData was given to look it up in. Pass it as "
                f"`sdata=`:{example}."
            )
            raise InputError(msg)
        if value not in sdata.tables:
            msg = (
                f"No table {value!r} in the SpatialData; available tables: {sorted(sdata.tables)}. Pass one of them "
                f"as `{name}`."
            )
            raise KeyError(msg)
        return sdata.tables[value]
    if hasattr(value, "tables"):
        msg = f"`{name}` is a SpatialData; pass the key of its table as `{name}` and the SpatialData as `sdata=`:"
        msg += f"{example}."
        raise InputError(msg)
    msg = f"`{name}` must be an AnnData or a table key, got {type(value).__name__}."
    raise InputError(msg)


def table_matrix(adata: AnnData, layer: str | None, side: str) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        msg = f"The {side} table has no layer {layer!r}; available layers: {sorted(adata.layers)}."
        raise KeyError(msg)
    return adata.layers[layer]


def dense_rows(x: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    from scipy import sparse

    sub = x[rows][:, cols]
    if sparse.issparse(sub):
        sub = sub.toarray()
    return np.asarray(sub, dtype=np.float64)


def _regions(adata: AnnData) -> pd.Series | None:
    attrs = adata.uns.get("spatialdata_attrs", {})
    region_key = attrs.get("region_key", Keys.region_key)
    if region_key in adata.obs:
        return adata.obs[region_key].astype(str)
    return None


def _instance_key(adata: AnnData) -> str:
    return adata.uns.get("spatialdata_attrs", {}).get("instance_key", Keys.instance_key)


def resolve_match(pred: AnnData, truth: AnnData, match: str) -> str:
    """``match="auto"``: instance ids when both tables carry them, else AnnData's own index (``obs_names``)."""
    if match != "auto":
        return match
    if all(_instance_key(adata) in adata.obs for adata in (pred, truth)):
        return "instance_id"
    return "obs_names"


def _unit_index(adata: AnnData, match: str, use_region: bool, side: str) -> pd.Index:
    obs = adata.obs
    if match == "position":
        missing = [c for c in (_ROW, _COL) if c not in obs]
        if missing:
            msg = (
                f"match='position' needs obs columns {_ROW!r} and {_COL!r}; the {side} table lacks {missing}. "
                "Use match='instance_id' for units that are not on a grid."
            )
            raise InputError(msg)
        index = pd.MultiIndex.from_arrays(
            [obs[_ROW].to_numpy(np.int64), obs[_COL].to_numpy(np.int64)], names=[_ROW, _COL]
        )
    elif match == "obs_names":
        index = pd.Index(adata.obs_names.astype(str), name="obs_names")
    else:
        instance_key = _instance_key(adata)
        if instance_key not in obs:
            msg = (
                f"The {side} table has no obs column {instance_key!r} to match units by. Write the instance ids "
                "(TableModel instance_key), use match='obs_names' to pair units by the tables' obs_names, or "
                "match='position' for units made by the same grid."
            )
            raise InputError(msg)
        ids = obs[instance_key].astype(str).to_numpy()
        if use_region:
            index = pd.MultiIndex.from_arrays([_regions(adata).to_numpy(), ids], names=["region", instance_key])
        else:
            index = pd.Index(ids, name=instance_key)
    if index.has_duplicates:
        dup = index[index.duplicated()][:3].tolist()
        msg = f"The {side} table has duplicated unit keys under match={match!r} (e.g. {dup}); keys must be unique."
        raise InputError(msg)
    return index


def match_units(pred: AnnData, truth: AnnData, match: str) -> tuple[pd.Index, np.ndarray, np.ndarray]:
    """Shared unit keys (in ``pred``'s order) and their row positions in ``pred`` and ``truth``."""
    use_region = False
    if match == "instance_id":
        pr, tr = _regions(pred), _regions(truth)
        use_region = pr is not None and tr is not None and (pr.nunique() > 1 or tr.nunique() > 1)
    p_index = _unit_index(pred, match, use_region, "prediction")
    t_index = _unit_index(truth, match, use_region, "truth")
    common = p_index.intersection(t_index, sort=False)
    if len(common) == 0:
        msg = (
            f"The prediction ({pred.n_obs} units) and truth ({truth.n_obs} units) tables share no unit under "
            f"match={match!r} (e.g. prediction {list(p_index[:2])}, truth {list(t_index[:2])}). Aggregate the "
            "prediction onto the measured units (st.tl.aggregate(..., shapes_key=<their shapes>)), or use "
            "match='position' for units made by the same grid."
        )
        raise InputError(msg)
    return common, p_index.get_indexer(common), t_index.get_indexer(common)


def resolve_genes(pred: AnnData, truth: AnnData, genes: Sequence[str] | None) -> list[str]:
    shared = pd.Index(pred.var_names).intersection(pd.Index(truth.var_names), sort=False)
    if genes is not None:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in shared]
        if missing:
            msg = (
                f"{len(missing)} requested genes are not in both tables (e.g. {missing[:5]}); "
                f"{len(shared)} genes are shared."
            )
            raise InputError(msg)
        return genes
    if len(shared) == 0:
        msg = (
            f"The prediction ({pred.n_vars} genes, e.g. {list(pred.var_names[:3])}) and truth ({truth.n_vars} genes, "
            f"e.g. {list(truth.var_names[:3])}) tables share no gene name. Select the same genes on both sides "
            "(st.pp.select_genes) and check that var_names use the same identifiers."
        )
        raise InputError(msg)
    return [str(g) for g in shared]
