"""Plots of evaluation results: predicted vs measured, gene-wise PCC distribution, scale curves."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from stpredict._errors import InputError
from stpredict.tl._evaluate import EvaluationResult
from stpredict.tl._matching import _MATCHES, Match, dense_rows, match_units, resolve_match, table_matrix
from stpredict.tl._metrics import NAN_POLICIES, pcc_summary

from ._utils import axes_or_new, finish, resolve_show

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    import pandas as pd
    from anndata import AnnData
    from matplotlib.axes import Axes

__all__ = ["gene_scores", "predicted_vs_measured", "scale_curve"]

_SHORT = {
    "pcc_f": "PCC@F",
    "pcc_s": "PCC@S",
    "pcc_m": "PCC@M",
    "pcc_h": "PCC@H (TRIPLEX)",
    "mse": "MSE",
    "mae": "MAE",
    "spearman_m": "Spearman (mean)",
    "ssim_m": "SSIM (mean)",
    "spot_pcc": "spot-wise PCC (MagNet)",
}


def predicted_vs_measured(
    pred: AnnData,
    truth: AnnData,
    *,
    gene: str,
    match: Match = "auto",
    pred_layer: str | None = None,
    truth_layer: str | None = None,
    ax: Axes | None = None,
    s: float = 4.0,
    alpha: float = 0.5,
    figsize: tuple[float, float] = (4.0, 4.0),
    dpi: float | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | None:
    """Scatter of one gene's predicted against measured values over the matched units, titled with its PCC.

    Units are matched as in :func:`stpredict.tl.evaluate` (by instance id, or by grid position). The dashed
    line is ``y = x``; values are drawn as stored (normalise both tables first to compare in normalised space).

    Parameters
    ----------
    pred, truth
        Predicted and measured tables.
    gene
        Gene to draw.
    match
        How units are paired, as in :func:`stpredict.tl.evaluate`: ``"auto"``, ``"instance_id"``, ``"obs_names"``
        or ``"position"``.
    pred_layer, truth_layer
        Layer to read instead of ``X``.
    ax
        Axes to draw into (default: a new figure).
    s, alpha
        Marker size and opacity.
    figsize, dpi
        Size of a new figure.
    show
        Show the figure through pyplot and return ``None``; default: show unless ``save`` or axes are given.
    save
        Write the figure to this path (the format follows the suffix: ``.png``, ``.pdf``, ``.svg``, ...).

    Returns
    -------
    The axes; x = measured, y = predicted.
    """
    for side, adata in (("prediction", pred), ("truth", truth)):
        if gene not in adata.var_names:
            msg = f"Gene {gene!r} is not in the {side} table."
            raise KeyError(msg)
    if match not in _MATCHES:
        msg = f"match must be one of {_MATCHES}, got {match!r}."
        raise InputError(msg)
    common, p_rows, t_rows = match_units(pred, truth, resolve_match(pred, truth, match))
    y_hat = dense_rows(
        table_matrix(pred, pred_layer, "prediction"),
        p_rows,
        np.array([pred.var_names.get_loc(gene)]),
    )[:, 0]
    y = dense_rows(table_matrix(truth, truth_layer, "truth"), t_rows, np.array([truth.var_names.get_loc(gene)]))[:, 0]
    constant = np.ptp(y) == 0 or np.ptp(y_hat) == 0
    r = float("nan") if constant else float(np.corrcoef(y, y_hat)[0, 1])
    show = resolve_show(show, ax=ax, save=save)
    ax = axes_or_new(ax, show, figsize=figsize, dpi=dpi)
    ax.scatter(y, y_hat, s=s, alpha=alpha, linewidths=0)
    lo = float(min(y.min(), y_hat.min()))
    hi = float(max(y.max(), y_hat.max()))
    ax.plot([lo, hi], [lo, hi], ls="--", color="0.4", lw=1)
    ax.set_xlabel(f"measured {gene}")
    ax.set_ylabel(f"predicted {gene}")
    ax.set_title(f"{gene}: PCC = {r:.3f} (n = {len(common)})")
    return finish(ax.figure, ax, show=show, save=save, dpi=dpi)


def gene_scores(
    result: EvaluationResult | pd.DataFrame,
    *,
    metric: str = "pcc",
    nan_policy: str | None = None,
    bins: int = 30,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 3.5),
    dpi: float | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | None:
    """Distribution over genes of the gene-wise PCC, with PCC@F, PCC@S and PCC@M marked.

    Parameters
    ----------
    result
        An :class:`stpredict.tl.EvaluationResult` or its ``per_gene`` table.
    metric
        Per-gene column to draw (``"pcc"`` or ``"spearman"`` get quartile/median/mean lines).
    nan_policy
        How undefined correlations enter the histogram and the lines (default: the result's policy, else
        ``"minus_one"``): as −1, left out (``"omit"``/``"propagate"``: they cannot be drawn).
    bins
        Histogram bins.
    ax
        Axes to draw into (default: a new figure).
    figsize, dpi
        Size of a new figure.
    show
        Show the figure through pyplot and return ``None``; default: show unless ``save`` or axes are given.
    save
        Write the figure to this path (the format follows the suffix: ``.png``, ``.pdf``, ``.svg``, ...).

    Returns
    -------
    The axes: a histogram and three vertical lines labelled ``PCC@F``, ``PCC@S``, ``PCC@M`` with their values.
    """
    if isinstance(result, EvaluationResult):
        per_gene = result.per_gene
        policy = nan_policy or result.params.get("nan_policy", "minus_one")
    else:
        per_gene = result
        policy = nan_policy or "minus_one"
    if policy not in NAN_POLICIES:
        msg = f"nan_policy must be one of {NAN_POLICIES}, got {policy!r}."
        raise InputError(msg)
    if metric not in per_gene:
        msg = f"No per-gene column {metric!r}; columns: {list(per_gene.columns)}."
        raise KeyError(msg)
    raw = per_gene[metric].to_numpy(dtype=np.float64)
    values = np.nan_to_num(raw, nan=-1.0) if policy == "minus_one" else raw[np.isfinite(raw)]
    show = resolve_show(show, ax=ax, save=save)
    ax = axes_or_new(ax, show, figsize=figsize, dpi=dpi)
    ax.hist(values, bins=bins, color="0.7", edgecolor="0.4")
    name = "PCC" if metric == "pcc" else metric
    if metric in ("pcc", "spearman") and values.size:
        summary = pcc_summary(values, nan_policy="propagate")
        styles = {"pcc_f": ("tab:blue", ":"), "pcc_s": ("tab:orange", "--"), "pcc_m": ("tab:red", "-")}
        for key, (color, ls) in styles.items():
            label = f"{name}@{key[-1].upper()} = {summary[key]:.3f}"
            ax.axvline(summary[key], color=color, ls=ls, lw=1.5, label=label)
        ax.legend(loc="upper left", fontsize="small")
    n_nan = int(np.isnan(raw).sum())
    note = f"; {n_nan} undefined as −1" if policy == "minus_one" and n_nan else ""
    ax.set_title(f"gene-wise {name} ({len(raw)} genes{note})")
    ax.set_xlabel(f"gene-wise {name} across units")
    ax.set_ylabel("genes")
    return finish(ax.figure, ax, show=show, save=save, dpi=dpi)


def scale_curve(
    table: pd.DataFrame,
    *,
    metrics: str | Sequence[str] = "pcc_m",
    hue: str | None = None,
    logx: bool = False,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 3.5),
    dpi: float | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | None:
    """Metric against bin size, from the tidy table of :func:`stpredict.tl.evaluate_across_scales`.

    Parameters
    ----------
    table
        Columns ``bin_size_um``, ``metric``, ``value`` (and ``hue`` if given, e.g. a ``model`` column from
        concatenating several runs).
    metrics
        Metric name(s) to draw, one line each (per ``hue`` level).
    hue
        Column whose levels get separate lines.
    logx
        Logarithmic bin-size axis.
    ax
        Axes to draw into (default: a new figure).
    figsize, dpi
        Size of a new figure.
    show
        Show the figure through pyplot and return ``None``; default: show unless ``save`` or axes are given.
    save
        Write the figure to this path (the format follows the suffix: ``.png``, ``.pdf``, ``.svg``, ...).

    Returns
    -------
    The axes, one line per metric (× hue level), labelled ``"<metric>"`` or ``"<hue level> <metric>"``.
    """
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    needed = ["bin_size_um", "metric", "value"] + ([hue] if hue else [])
    missing = [c for c in needed if c not in table]
    if missing:
        msg = f"The table lacks columns {missing}; pass the output of st.tl.evaluate_across_scales."
        raise KeyError(msg)
    absent = [m for m in metrics if m not in set(table["metric"])]
    if absent:
        msg = f"Metrics {absent} are not in the table; it has {sorted(set(table['metric']))}."
        raise KeyError(msg)
    show = resolve_show(show, ax=ax, save=save)
    ax = axes_or_new(ax, show, figsize=figsize, dpi=dpi)
    groups = [(None, table)] if hue is None else list(table.groupby(hue, sort=False, observed=True))
    for level, sub in groups:
        for m in metrics:
            rows = sub[sub["metric"] == m].sort_values("bin_size_um")
            label = _SHORT.get(m, m) if level is None else f"{level} {_SHORT.get(m, m)}"
            ax.plot(rows["bin_size_um"], rows["value"], marker="o", label=label)
    sizes = np.sort(table["bin_size_um"].unique())
    if logx:
        ax.set_xscale("log")
    ax.set_xticks(sizes)
    ax.set_xticklabels([f"{s:g}" for s in sizes])
    ax.set_xlabel("bin size (µm)")
    ax.set_ylabel(_SHORT.get(metrics[0], metrics[0]) if len(metrics) == 1 else "value")
    if "spot_pcc" in metrics and any(m.startswith("pcc_") for m in metrics):
        ax.set_title("note: spot-wise PCC is not comparable to gene-wise PCC", fontsize="small")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return finish(ax.figure, ax, show=show, save=save, dpi=dpi)
