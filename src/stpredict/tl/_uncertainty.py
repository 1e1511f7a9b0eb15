"""Does the predicted standard deviation mean something? Its rank agreement with the error, and the confident half."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from stpredict._errors import InputError

from ._matching import Match, dense_rows, get_table, match_units, resolve_genes, resolve_match, table_matrix
from ._metrics import genewise_pcc, genewise_spearman, policy_mean

if TYPE_CHECKING:
    from collections.abc import Sequence

    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["evaluate_uncertainty"]


def evaluate_uncertainty(
    pred: AnnData | str,
    truth: AnnData | str,
    *,
    sd: AnnData | str,
    sdata: SpatialData | None = None,
    genes: Sequence[str] | None = None,
    match: Match = "auto",
    pred_layer: str | None = None,
    sd_layer: str | None = None,
    truth_layer: str | None = None,
    confident_fraction: float = 0.5,
) -> pd.DataFrame:
    """Score a predicted standard deviation: does it rank the errors, is the prediction better where it is low.

    For each gene, over the units matched between the prediction and the truth:

    * ``spearman_sd_error``: the Spearman correlation between the predicted standard deviation and the absolute
      error ``|pred − truth|`` (positive: the model is unsure where it is wrong);
    * ``pcc_all``: the Pearson correlation of prediction and truth over all units;
    * ``pcc_confident``: the same over the ``confident_fraction`` of units with the lowest standard deviation
      for that gene.

    The row ``"mean"`` averages each column over genes (undefined correlations, e.g. of a constant gene, left out):
    ``pcc_confident`` against ``pcc_all`` there is PCC@M on the most confident half against PCC@M on all units.
    All three tables must be in the same space (e.g. aggregate the mean and sd maps of
    :func:`stpredict.tl.ensemble_maps` by the same units, and compare with a truth table normalised like the
    model's targets); the standard deviation is not transformed.

    Parameters
    ----------
    pred
        Predicted table (the ensemble mean aggregated into units), or its key in ``sdata.tables``.
    truth
        Measured or ground-truth table, or its key in ``sdata.tables``.
    sd
        Standard-deviation table over the same units and genes as ``pred`` (the sd map aggregated like the mean).
    sdata
        The SpatialData whose tables the keys name.
    genes
        Genes to score; default: all genes of ``pred`` also in ``truth``.
    match
        How the units of ``pred`` and ``truth`` are paired, as in :func:`stpredict.tl.evaluate`.
    pred_layer, sd_layer, truth_layer
        Layer to read on each table instead of ``X``.
    confident_fraction
        Fraction of units, per gene, kept as the confident ones (the lowest standard deviations).

    Returns
    -------
    One row per gene and a last row ``"mean"``; columns ``spearman_sd_error``, ``pcc_all``, ``pcc_confident``,
    ``n_confident``.

    Raises
    ------
    InputError
        If ``pred`` and ``sd`` do not hold the same units and genes, no unit or gene is shared with ``truth``, the
        tables hold non-finite values, a standard deviation is negative, or ``confident_fraction`` is not in
        (0, 1].
    """
    if not 0 < confident_fraction <= 1:
        msg = f"confident_fraction must be in (0, 1], got {confident_fraction}."
        raise InputError(msg)
    call = "st.tl.evaluate_uncertainty(pred, truth, sd=sd, sdata=sdata)"
    pred = get_table(pred, sdata, name="pred", call=call)
    sd = get_table(sd, sdata, name="sd", call=call)
    truth = get_table(truth, sdata, name="truth", call=call)
    if not (pred.obs_names.equals(sd.obs_names) and pred.var_names.equals(sd.var_names)):
        msg = (
            "The prediction and standard-deviation tables must hold the same units and genes in the same order; "
            "aggregate the mean and sd maps with the same units (the same `shapes_key`, `bin_size` or `labels_key`)."
        )
        raise InputError(msg)
    match = resolve_match(pred, truth, match)
    _, p_rows, t_rows = match_units(pred, truth, match)
    gene_list = resolve_genes(pred, truth, genes)
    p_cols = pd.Index(pred.var_names).get_indexer(gene_list)
    y_hat = dense_rows(table_matrix(pred, pred_layer, "prediction"), p_rows, p_cols)
    s = dense_rows(table_matrix(sd, sd_layer, "standard deviation"), p_rows, p_cols)
    y = dense_rows(table_matrix(truth, truth_layer, "truth"), t_rows, pd.Index(truth.var_names).get_indexer(gene_list))
    if not (np.isfinite(y).all() and np.isfinite(y_hat).all() and np.isfinite(s).all()):
        msg = "The tables hold non-finite values (NaN or inf) on the evaluated units and genes; fill or drop them."
        raise InputError(msg)
    if (s < 0).any():
        msg = "The standard-deviation table holds negative values; pass the sd map's table (`<key>_sd`)."
        raise InputError(msg)

    error = np.abs(y_hat - y)
    n_keep = max(2, round(confident_fraction * len(y)))
    confident = np.argsort(s, axis=0, kind="stable")[:n_keep]  # per gene: the units with the lowest sd
    cols = np.arange(len(gene_list))[None, :]
    per_gene = pd.DataFrame(
        {
            "spearman_sd_error": genewise_spearman(s, error, nan_policy="propagate"),
            "pcc_all": genewise_pcc(y, y_hat, nan_policy="propagate"),
            "pcc_confident": genewise_pcc(y[confident, cols], y_hat[confident, cols], nan_policy="propagate"),
            "n_confident": n_keep,
        },
        index=pd.Index(gene_list, name="gene"),
    )
    means = {c: policy_mean(per_gene[c].to_numpy(), nan_policy="omit") for c in per_gene.columns[:3]}
    per_gene.loc["mean"] = [*means.values(), n_keep]
    per_gene["n_confident"] = per_gene["n_confident"].astype(int)
    return per_gene
