"""Evaluation of predicted tables against measured ones (SPEC.md §1.4), and the cross-scale protocol."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from stpredict._errors import InputError
from stpredict._keys import Attrs, Keys
from stpredict._logging import get_logger

from ._metrics import (
    NAN_POLICIES,
    genewise_pcc,
    genewise_spearman,
    grid_ssim,
    mae,
    mse,
    pcc_summary,
    policy_mean,
    spotwise_pcc,
)
from ._metrics import highly_predictive_genes as _hpg_from_pcc

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["METRIC_LABELS", "EvaluationResult", "evaluate", "evaluate_across_scales", "highly_predictive_genes"]

logger = get_logger(__name__)

_ROW, _COL = "array_row", "array_col"
_DEFAULT_BIN_SIZES = (8.0, 16.0, 55.0)
_PER_GENE = ("pcc", "spearman", "mse", "mae", "ssim")

#: What each summary metric is. ``spot_pcc`` is MagNet's quantity and is not comparable with the gene-wise ones.
METRIC_LABELS: dict[str, str] = {
    "pcc_f": "PCC@F: first quartile over genes of the gene-wise PCC across units",
    "pcc_s": "PCC@S: median over genes of the gene-wise PCC across units",
    "pcc_m": "PCC@M: mean over genes of the gene-wise PCC across units",
    "pcc_h": "PCC@H (TRIPLEX, not a PixNet metric): mean gene-wise PCC over the highly predictive genes",
    "mse": "MSE over all units × genes",
    "mae": "MAE over all units × genes",
    "spearman_m": "mean over genes of the gene-wise Spearman correlation",
    "ssim_m": "mean over genes of the SSIM of gene rasters on the unit grid",
    "spot_pcc": "spot-wise PCC (MagNet): PCC across genes within a unit, mean over units; NOT comparable to PCC@M",
}


@dataclass
class EvaluationResult:
    """Metrics of one prediction table against one measured table.

    Attributes
    ----------
    per_gene
        One row per evaluated gene: ``pcc``, ``spearman`` (undefined correlations kept as NaN whatever the
        policy), ``mse``, ``mae`` and ``ssim`` (NaN when the units do not form a grid).
    summary
        The summary metrics named in :data:`METRIC_LABELS` (``pcc_f``, ``pcc_s``, ``pcc_m``, ``pcc_h``, ``mse``,
        ``mae``, ``spearman_m``, ``ssim_m``, ``spot_pcc``), the correlations summarised under ``nan_policy``.
    per_unit
        MagNet's spot-wise PCC of each matched unit (``spot_pcc``, NaN kept), indexed by the unit key.
    params
        How the evaluation was run (``nan_policy``, ``match``, ``n_units``, ``n_genes``, ``hpg``, ...).
    """

    per_gene: pd.DataFrame
    summary: pd.Series
    per_unit: pd.DataFrame
    params: dict[str, Any] = field(default_factory=dict)

    def to_frame(self) -> pd.DataFrame:
        """The summary as a tidy table with columns ``metric``, ``value`` and ``description``."""
        return pd.DataFrame(
            {
                "metric": list(self.summary.index),
                "value": self.summary.to_numpy(dtype=np.float64),
                "description": [METRIC_LABELS.get(m, "") for m in self.summary.index],
            }
        )

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v:.4g}" for k, v in self.summary.items())
        return f"EvaluationResult(n_units={self.params.get('n_units')}, n_genes={self.params.get('n_genes')}, {items})"


def highly_predictive_genes(
    fold_results: Sequence[EvaluationResult | pd.Series | Mapping[str, float]] | pd.DataFrame,
    *,
    n: int = 50,
) -> list[str]:
    """TRIPLEX's highly predictive genes: the top ``n`` genes by gene-wise PCC rank averaged over folds.

    For each fold the genes are ranked by PCC (``argsort(argsort(pcc)) + 1``, best gene highest; undefined
    correlations as −1), the ranks are averaged over folds and the ``n`` genes with the highest mean rank are
    kept (``NEXGEM/TRIPLEX:src/model/model_interface.py`` and ``src/experiment/get_HPG.py``). Pass the result as
    ``evaluate(..., hpg=...)`` to get PCC@H, a TRIPLEX metric that PixNet does not report.

    Parameters
    ----------
    fold_results
        One :class:`EvaluationResult` (its ``per_gene["pcc"]``) or per-gene PCC series per fold, or a DataFrame
        with genes as rows and folds as columns. Genes missing from any fold are not ranked.
    n
        How many genes to keep (50 in TRIPLEX).

    Returns
    -------
    Gene names, best first.
    """
    if isinstance(fold_results, pd.DataFrame):
        return _hpg_from_pcc(fold_results, n=n)
    folds = [r.per_gene["pcc"] if isinstance(r, EvaluationResult) else r for r in fold_results]
    return _hpg_from_pcc(folds, n=n)


def _matrix(adata: AnnData, layer: str | None, side: str) -> Any:
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        msg = f"The {side} table has no layer {layer!r}; available layers: {sorted(adata.layers)}."
        raise KeyError(msg)
    return adata.layers[layer]


def _dense(x: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
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
    else:
        attrs = adata.uns.get("spatialdata_attrs", {})
        instance_key = attrs.get("instance_key", Keys.instance_key)
        if instance_key not in obs:
            msg = (
                f"The {side} table has no obs column {instance_key!r} to match units by. Write the instance ids "
                "(TableModel instance_key), or use match='position' for units made by the same grid."
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


def _match_units(pred: AnnData, truth: AnnData, match: str) -> tuple[pd.Index, np.ndarray, np.ndarray]:
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


def _resolve_genes(pred: AnnData, truth: AnnData, genes: Sequence[str] | None) -> list[str]:
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


def _normalised_pair(
    pred: AnnData,
    truth: AnnData,
    normalize: str | Mapping[str, Any] | Callable[[AnnData], AnnData] | None,
    pred_layer: str | None,
    truth_layer: str | None,
) -> tuple[AnnData, str | None, AnnData, str | None]:
    """Both tables in normalised space, with the layer to read on each (inputs are never modified)."""
    if normalize is None:
        return pred, pred_layer, truth, truth_layer
    if callable(normalize):
        out = []
        for adata, layer in ((pred, pred_layer), (truth, truth_layer)):
            work = adata.copy()
            if layer is not None:
                work.X = work.layers[layer].copy()
            result = normalize(work)
            out.append(work if result is None else result)
        for side, before, after in (("prediction", pred, out[0]), ("truth", truth, out[1])):
            if after.n_obs != before.n_obs:
                msg = f"The normalize callable changed the number of units of the {side} table; it must keep them."
                raise InputError(msg)
        return out[0], None, out[1], None
    import stpredict.pp as pp

    # Parameters are fitted on the truth (or given) and applied unchanged to the prediction, so that fitted
    # constants (log10_minmax's per-gene min/max, prop_log's scale) are the same on both sides.
    if isinstance(normalize, str):
        truth_n = pp.normalize(truth, method=normalize, layer=truth_layer, copy=True)
        key = normalize
        params = dict(truth_n.uns[Attrs.root]["normalize"][key])
    else:
        params = dict(normalize)
        key = str(params.get("method"))
        truth_n = pp.normalize(truth, params={**params, "layer": truth_layer}, copy=True)
    pred_n = pp.normalize(pred, params={**params, "layer": pred_layer}, copy=True)
    return pred_n, key, truth_n, key


def _describe_normalize(normalize: Any) -> str | None:
    if normalize is None or isinstance(normalize, str):
        return normalize
    if callable(normalize):
        return getattr(normalize, "__name__", repr(normalize))
    return f"params:{dict(normalize).get('method')}"


def evaluate(
    pred: AnnData,
    truth: AnnData,
    *,
    genes: Sequence[str] | None = None,
    match: Literal["instance_id", "position"] = "instance_id",
    pred_layer: str | None = None,
    truth_layer: str | None = None,
    normalize: str | Mapping[str, Any] | Callable[[AnnData], AnnData] | None = None,
    nan_policy: Literal["minus_one", "omit", "propagate"] = "minus_one",
    hpg: Sequence[str] | None = None,
    ssim: bool | None = None,
    inplace: bool = False,
    key_added: str = "evaluate",
) -> EvaluationResult:
    """Score a prediction table against a measured (or ground-truth) table over the same units.

    The metrics follow SPEC.md §1.4, computed on the matched units × shared genes ``Y, Ŷ``:

    * per gene: Pearson (``pcc``) and Spearman correlation across units, MSE, MAE, and SSIM of the gene's
      raster on the unit grid when the units carry ``array_row``/``array_col``;
    * ``pcc_f``/``pcc_s``/``pcc_m``: first quartile, median and mean of the gene-wise PCC (EGN/SGN/PixNet);
    * ``pcc_h``: mean gene-wise PCC over the highly predictive genes ``hpg``
      (TRIPLEX's PCC(H); see :func:`highly_predictive_genes`). PixNet does not report PCC@H;
    * ``mse``, ``mae``: means over all entries;
    * ``spot_pcc``: MagNet's spot-wise PCC (across genes within a unit, mean over units). It is a different
      quantity, inflated by between-gene mean differences, and must not be compared with ``pcc_m``.

    SPEC §1.4 pools the test units of all test slides of a fold before computing gene-wise PCC: concatenate
    the slides' tables (:func:`anndata.concat`) on both sides; units are then told apart by their region.
    MagNet instead reports per-slide metrics averaged over slides: evaluate each slide on its own.

    Metrics are only comparable under the same normalisation; both sides should be in the normalised space
    the metric is reported in (pass ``normalize`` to normalise both here, or normalise before).

    Parameters
    ----------
    pred
        Predicted table (e.g. from :func:`stpredict.tl.aggregate`).
    truth
        Measured or ground-truth table.
    genes
        Genes to score; default: all genes present in both tables, in ``pred``'s order.
    match
        ``"instance_id"`` pairs units by their TableModel instance id (and region when either table annotates
        several regions); ``"position"`` pairs them by ``(array_row, array_col)``, for units made by the same grid.
    pred_layer, truth_layer
        Layer to read on each side instead of ``X``.
    normalize
        ``None``: the inputs are already in the space to score (e.g. both normalised with
        :func:`stpredict.pp.normalize`). A method name (``"log1p_cpm"``, ``"log10_minmax"``, ``"prop_log"``): the
        parameters are fitted on ``truth`` with :func:`stpredict.pp.normalize` and applied unchanged to ``pred``.
        A parameter record (``train.uns["stpredict"]["normalize"][method]``, fitted on training slides): applied
        to both. These need counts on both sides, as :func:`stpredict.pp.normalize` does: raw integer counts, or
        the expected counts of a density map aggregated by sum (:func:`stpredict.tl.aggregate`); for other
        tables, normalise them first or pass a callable
        ``AnnData -> AnnData`` that is applied to a copy of each side (``X`` taken from the layer) and must keep
        the units.
    nan_policy
        Undefined correlations (a constant gene or unit): ``"minus_one"`` counts them as −1, the published
        convention (``Yan98/EGN``, ``Yan98/SGN``); ``"omit"`` leaves them out of the summaries; ``"propagate"``
        makes a summary NaN.
    hpg
        Highly predictive genes for ``pcc_h``; ``pcc_h`` is NaN when not given.
    ssim
        Compute the grid SSIM; default: when both tables' matched units carry grid indices.
    inplace
        Write the per-gene metrics into ``pred.var`` (columns ``pcc``, ``spearman``, ``mse``, ``mae``, ``ssim``;
        NaN for genes not scored) and the summary and parameters into ``pred.uns["stpredict"]["evaluate"][key_added]``.
    key_added
        Name of the record in ``pred.uns["stpredict"]["evaluate"]``.

    Returns
    -------
    The :class:`EvaluationResult`.

    Raises
    ------
    InputError
        If no unit or no gene is shared, unit keys are duplicated, or arguments are invalid.
    """
    if nan_policy not in NAN_POLICIES:
        msg = f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}."
        raise InputError(msg)
    if match not in ("instance_id", "position"):
        msg = f"match must be 'instance_id' or 'position', got {match!r}."
        raise InputError(msg)
    _matrix(pred, pred_layer, "prediction")
    _matrix(truth, truth_layer, "truth")

    common, p_rows, t_rows = _match_units(pred, truth, match)
    gene_list = _resolve_genes(pred, truth, genes)
    if hpg is not None:
        hpg = [str(g) for g in hpg]
        missing = [g for g in hpg if g not in gene_list]
        if missing:
            msg = f"{len(missing)} highly predictive genes are not among the evaluated genes (e.g. {missing[:5]})."
            raise InputError(msg)

    pred_n, p_layer, truth_n, t_layer = _normalised_pair(pred, truth, normalize, pred_layer, truth_layer)
    y_hat = _dense(_matrix(pred_n, p_layer, "prediction"), p_rows, pd.Index(pred_n.var_names).get_indexer(gene_list))
    y = _dense(_matrix(truth_n, t_layer, "truth"), t_rows, pd.Index(truth_n.var_names).get_indexer(gene_list))
    if not (np.isfinite(y).all() and np.isfinite(y_hat).all()):
        msg = "The tables hold non-finite values (NaN or inf) on the evaluated units and genes; fill or drop them."
        raise InputError(msg)

    pcc_raw = genewise_pcc(y, y_hat, nan_policy="propagate")
    spearman_raw = genewise_spearman(y, y_hat, nan_policy="propagate")
    grid = _grid(pred, truth, p_rows, t_rows) if ssim is not False else None
    if ssim and grid is None:
        msg = f"ssim=True needs {_ROW!r}/{_COL!r} on the matched units with unique pairs; they are missing."
        raise InputError(msg)
    ssim_values = grid_ssim(y, y_hat, *grid) if grid is not None else np.full(len(gene_list), np.nan)
    per_gene = pd.DataFrame(
        {
            "pcc": pcc_raw,
            "spearman": spearman_raw,
            "mse": ((y - y_hat) ** 2).mean(axis=0),
            "mae": np.abs(y - y_hat).mean(axis=0),
            "ssim": ssim_values,
        },
        index=pd.Index(gene_list, name="gene"),
    )
    spot = spotwise_pcc(y, y_hat, nan_policy="propagate")
    summary = pd.Series(
        {
            **pcc_summary(pcc_raw, nan_policy=nan_policy),
            "pcc_h": policy_mean(per_gene.loc[hpg, "pcc"].to_numpy(), nan_policy=nan_policy)
            if hpg is not None
            else float("nan"),
            "mse": mse(y, y_hat),
            "mae": mae(y, y_hat),
            "spearman_m": policy_mean(spearman_raw, nan_policy=nan_policy),
            "ssim_m": float(np.nanmean(ssim_values)) if np.isfinite(ssim_values).any() else float("nan"),
            "spot_pcc": policy_mean(spot, nan_policy=nan_policy),
        },
        dtype=np.float64,
    )
    params = {
        "nan_policy": nan_policy,
        "match": match,
        "n_units": len(common),
        "n_units_pred": pred.n_obs,
        "n_units_truth": truth.n_obs,
        "n_genes": len(gene_list),
        "normalize": _describe_normalize(normalize),
        "hpg": hpg,
        "pred_layer": pred_layer,
        "truth_layer": truth_layer,
    }
    per_unit = pd.DataFrame({"spot_pcc": spot}, index=common)
    result = EvaluationResult(per_gene=per_gene, summary=summary, per_unit=per_unit, params=params)
    if len(common) < min(pred.n_obs, truth.n_obs):
        logger.info("evaluate: %d of %d predicted units matched the truth table.", len(common), pred.n_obs)
    if inplace:
        _write(pred, result, key_added)
    return result


def _grid(pred: AnnData, truth: AnnData, p_rows: np.ndarray, t_rows: np.ndarray) -> tuple[np.ndarray, ...] | None:
    for adata, rows in ((pred, p_rows), (truth, t_rows)):
        if _ROW in adata.obs and _COL in adata.obs:
            r = adata.obs[_ROW].to_numpy()[rows]
            c = adata.obs[_COL].to_numpy()[rows]
            if not (np.issubdtype(r.dtype, np.integer) and np.issubdtype(c.dtype, np.integer)):
                continue
            if pd.MultiIndex.from_arrays([r, c]).has_duplicates:
                continue
            return r.astype(np.int64), c.astype(np.int64)
    return None


def _write(pred: AnnData, result: EvaluationResult, key_added: str) -> None:
    for col in _PER_GENE:
        values = pd.Series(np.nan, index=pred.var_names, dtype=np.float64)
        values.loc[result.per_gene.index] = result.per_gene[col].to_numpy()
        pred.var[col] = values.to_numpy()
    root = pred.uns.setdefault(Attrs.root, {})
    params = {k: (list(v) if isinstance(v, list | tuple) else v) for k, v in result.params.items() if v is not None}
    root.setdefault("evaluate", {})[key_added] = {
        "summary": {k: float(v) for k, v in result.summary.items()},
        "params": params,
    }


def _table(sdata: SpatialData, value: str | AnnData) -> AnnData:
    if isinstance(value, str):
        if value not in sdata.tables:
            msg = f"No table {value!r} in the SpatialData; available tables: {sorted(sdata.tables)}."
            raise KeyError(msg)
        return sdata.tables[value]
    return value


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
    truth: Mapping[float, str | AnnData] | None = None,
    *,
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
        Passed to :func:`evaluate` (``nan_policy``, ``normalize``, ``hpg``, ...).

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
        tables = {b: _table(sdata, by_size[b]) for b in sizes}
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
            result = evaluate(pred, measured, genes=genes, match="instance_id", **evaluate_kwargs)
        else:
            pred = tl.aggregate(sdata, map_key, bin_size=b, **agg_kwargs)
            reference = tl.aggregate(sdata, truth_map_key, bin_size=b, **agg_kwargs)
            result = evaluate(pred, reference, genes=genes, match="position", **evaluate_kwargs)
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
