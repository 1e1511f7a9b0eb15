"""Evaluation of predicted tables against measured ones (SPEC.md §1.4): the metrics and their record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from stpredict._errors import InputError
from stpredict._keys import Attrs
from stpredict._logging import get_logger

from ._matching import (
    _COL,
    _MATCHES,
    _ROW,
    Match,
    dense_rows,
    get_table,
    match_units,
    resolve_genes,
    resolve_match,
    table_matrix,
)
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

__all__ = ["METRIC_LABELS", "EvaluationResult", "evaluate", "highly_predictive_genes"]

logger = get_logger(__name__)

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
        How the evaluation was run (``nan_policy``, ``match``, ``n_units``, ``n_genes``,
        ``highly_predictive_genes``, ...).
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
    n_top: int = 50,
) -> list[str]:
    """TRIPLEX's highly predictive genes: the top ``n_top`` genes by gene-wise PCC rank averaged over folds.

    For each fold the genes are ranked by PCC (``argsort(argsort(pcc)) + 1``, best gene highest; undefined
    correlations as −1), the ranks are averaged over folds and the ``n_top`` genes with the highest mean rank are
    kept (``NEXGEM/TRIPLEX:src/model/model_interface.py`` and ``src/experiment/get_HPG.py``). Pass the result as
    ``evaluate(..., highly_predictive_genes=...)`` to get PCC@H, a TRIPLEX metric that PixNet does not report.

    Parameters
    ----------
    fold_results
        One :class:`EvaluationResult` (its ``per_gene["pcc"]``) or per-gene PCC series per fold, or a DataFrame
        with genes as rows and folds as columns. Genes missing from any fold are not ranked.
    n_top
        How many genes to keep (50 in TRIPLEX).

    Returns
    -------
    Gene names, best first.
    """
    if isinstance(fold_results, pd.DataFrame):
        return _hpg_from_pcc(fold_results, n=n_top)
    folds = [r.per_gene["pcc"] if isinstance(r, EvaluationResult) else r for r in fold_results]
    return _hpg_from_pcc(folds, n=n_top)


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
    pred: AnnData | str,
    truth: AnnData | str,
    *,
    sdata: SpatialData | None = None,
    genes: Sequence[str] | None = None,
    match: Match = "auto",
    pred_layer: str | None = None,
    truth_layer: str | None = None,
    normalize: str | Mapping[str, Any] | Callable[[AnnData], AnnData] | None = None,
    nan_policy: Literal["minus_one", "omit", "propagate"] = "minus_one",
    highly_predictive_genes: Sequence[str] | None = None,
    ssim: bool | None = None,
    inplace: bool = True,
    key_added: str = "evaluate",
) -> EvaluationResult:
    """Score a prediction table against a measured (or ground-truth) table over the same units.

    The metrics follow SPEC.md §1.4, computed on the matched units × shared genes ``Y, Ŷ``:

    * per gene: Pearson (``pcc``) and Spearman correlation across units, MSE, MAE, and SSIM of the gene's
      raster on the unit grid when the units carry ``array_row``/``array_col``;
    * ``pcc_f``/``pcc_s``/``pcc_m``: first quartile, median and mean of the gene-wise PCC (EGN/SGN/PixNet);
    * ``pcc_h``: mean gene-wise PCC over the ``highly_predictive_genes``
      (TRIPLEX's PCC(H); see :func:`highly_predictive_genes`). PixNet does not report PCC@H;
    * ``mse``, ``mae``: means over all entries;
    * ``spot_pcc``: MagNet's spot-wise PCC (across genes within a unit, mean over units). It is a different
      quantity, inflated by between-gene mean differences, and must not be compared with ``pcc_m``.

    SPEC §1.4 pools the test units of all test slides of a fold before computing gene-wise PCC: concatenate
    the slides' tables (:func:`anndata.concat`) on both sides; units are then told apart by their region.
    MagNet instead reports per-slide metrics averaged over slides: evaluate each slide on its own.

    Metrics are only comparable under the same normalisation; both sides should be in the normalised space
    the metric is reported in (pass ``normalize`` to normalise both here, or normalise before).

    Both tables may be given as AnnData or, like squidpy's ``table_key``, as keys of ``sdata.tables``:
    ``st.tl.evaluate("he_pixnet_spots", "table", sdata=sdata)`` scores the aggregated prediction against the
    measured table of the same SpatialData (and, with ``inplace=True``, records the result in
    ``sdata.tables["he_pixnet_spots"]``).

    Parameters
    ----------
    pred
        Predicted table (e.g. from :func:`stpredict.tl.aggregate`), or its key in ``sdata.tables``.
    truth
        Measured or ground-truth table, or its key in ``sdata.tables``.
    sdata
        The SpatialData whose tables ``pred`` and ``truth`` name when they are given as keys.
    genes
        Genes to score; default: all genes present in both tables, in ``pred``'s order.
    match
        How units are paired. ``"instance_id"``: by their TableModel instance id (and region when either table
        annotates several regions); ``"obs_names"``: by AnnData's own index; ``"position"``: by
        ``(array_row, array_col)``, for units made by the same grid; ``"auto"``: ``"instance_id"`` when both tables
        carry instance ids, else ``"obs_names"``.
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
    highly_predictive_genes
        Genes for ``pcc_h`` (see :func:`highly_predictive_genes`); ``pcc_h`` is NaN when not given.
    ssim
        Compute the grid SSIM; default: when both tables' matched units carry grid indices.
    inplace
        Also write the per-gene metrics into ``pred.var`` (columns ``pcc``, ``spearman``, ``mse``, ``mae``, ``ssim``;
        NaN for genes not scored) and the summary and parameters into ``pred.uns["stpredict"]["evaluate"][key_added]``.
    key_added
        Name of the record in ``pred.uns["stpredict"]["evaluate"]``.

    Returns
    -------
    The :class:`EvaluationResult`.

    Raises
    ------
    KeyError
        If ``pred`` or ``truth`` is a key that ``sdata`` lacks (the message lists its tables), or a layer is missing.
    InputError
        If no unit or no gene is shared, unit keys are duplicated, a table key comes without ``sdata``, or arguments
        are invalid.
    """
    call = f"st.tl.evaluate({pred if isinstance(pred, str) else 'pred'!r}, "
    call += f"{truth if isinstance(truth, str) else 'truth'!r}, sdata=sdata)"
    pred = get_table(pred, sdata, name="pred", call=call)
    truth = get_table(truth, sdata, name="truth", call=call)
    if nan_policy not in NAN_POLICIES:
        msg = f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}."
        raise InputError(msg)
    if match not in _MATCHES:
        msg = f"match must be one of {_MATCHES}, got {match!r}."
        raise InputError(msg)
    match = resolve_match(pred, truth, match)
    table_matrix(pred, pred_layer, "prediction")
    table_matrix(truth, truth_layer, "truth")

    common, p_rows, t_rows = match_units(pred, truth, match)
    gene_list = resolve_genes(pred, truth, genes)
    hpg = None if highly_predictive_genes is None else [str(g) for g in highly_predictive_genes]
    if hpg is not None:
        missing = [g for g in hpg if g not in gene_list]
        if missing:
            msg = f"{len(missing)} highly predictive genes are not among the evaluated genes (e.g. {missing[:5]})."
            raise InputError(msg)

    pred_n, p_layer, truth_n, t_layer = _normalised_pair(pred, truth, normalize, pred_layer, truth_layer)
    y_hat = dense_rows(
        table_matrix(pred_n, p_layer, "prediction"), p_rows, pd.Index(pred_n.var_names).get_indexer(gene_list)
    )
    y = dense_rows(table_matrix(truth_n, t_layer, "truth"), t_rows, pd.Index(truth_n.var_names).get_indexer(gene_list))
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
        "highly_predictive_genes": hpg,
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
