"""Plots of evaluation results: predicted vs measured, gene-wise PCC distribution, scale curves."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np

from stpredict._errors import InputError
from stpredict.tl._evaluate import EvaluationResult
from stpredict.tl._matching import _MATCHES, Match, dense_rows, match_units, resolve_match, table_matrix
from stpredict.tl._metrics import NAN_POLICIES, pcc_summary

from ._utils import axes_or_new, finish, resolve_show

if TYPE_CHECKING:
    import os
    from collections.abc import Mapping, Sequence

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

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> import stpredict as st
    >>> rng = np.random.default_rng(0)
    >>> truth = ad.AnnData(rng.normal(size=(50, 3)))
    >>> pred = ad.AnnData(truth.X + rng.normal(scale=0.5, size=truth.shape))
    >>> ax = st.pl.predicted_vs_measured(pred, truth, gene="1", show=False)
    >>> ax.get_title().startswith("1: PCC = 0.")
    True
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


def _per_gene(result: EvaluationResult | pd.DataFrame, metric: str, nan_policy: str | None, name: str) -> dict:
    """The metric's values over genes of one result, with undefined values handled by the NaN policy."""
    if isinstance(result, EvaluationResult):
        per_gene = result.per_gene
        policy = nan_policy or result.params.get("nan_policy", "minus_one")
    elif hasattr(result, "columns"):
        per_gene = result
        policy = nan_policy or "minus_one"
    else:
        msg = f"Result {name!r} must be an EvaluationResult or its per_gene DataFrame, got {type(result).__name__}."
        raise InputError(msg)
    if policy not in NAN_POLICIES:
        msg = f"nan_policy must be one of {NAN_POLICIES}, got {policy!r}."
        raise InputError(msg)
    if metric not in per_gene:
        msg = f"No per-gene column {metric!r} in result {name!r}; columns: {list(per_gene.columns)}."
        raise KeyError(msg)
    raw = per_gene[metric].to_numpy(dtype=np.float64)
    keep = np.ones(raw.shape, dtype=bool) if policy == "minus_one" else np.isfinite(raw)
    values = np.nan_to_num(raw, nan=-1.0)[keep]
    genes = np.asarray(per_gene.index)[keep]
    return {"values": values, "genes": genes, "n": raw.size, "n_nan": int(np.isnan(raw).sum()), "policy": policy}


def gene_scores(
    results: EvaluationResult | pd.DataFrame | Mapping[str, EvaluationResult | pd.DataFrame],
    *,
    metric: str = "pcc",
    kind: Literal["box", "hist", "rank"] = "box",
    nan_policy: str | None = None,
    bins: int = 30,
    ax: Axes | None = None,
    figsize: tuple[float, float] = (5.0, 3.5),
    dpi: float | None = None,
    show: bool | None = None,
    save: str | os.PathLike[str] | None = None,
) -> Axes | None:
    """Distribution and ranking over genes of a per-gene score, for one model or several side by side.

    Parameters
    ----------
    results
        An :class:`stpredict.tl.EvaluationResult` (or its ``per_gene`` table), or a mapping model name → result
        to compare models (e.g. ``{"PixNet": r1, "MagNet": r2}``).
    metric
        Per-gene column to draw, e.g. ``"pcc"``, ``"spearman"``, ``"mse"``.
    kind
        ``"box"``: one box per model (median, quartiles; the mean, i.e. PCC@M for ``"pcc"``, as a white dot);
        ``"hist"``: histograms on shared bins (one model: filled, with PCC@F, PCC@S and PCC@M marked for
        ``"pcc"``/``"spearman"``; several: outlines); ``"rank"``: each model's genes sorted from best to worst
        (score against rank).
    nan_policy
        How undefined correlations are drawn (default: each result's policy, else ``"minus_one"``): as −1, or left
        out (``"omit"``/``"propagate"``: they cannot be drawn).
    bins
        Histogram bins (``kind="hist"``).
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
    The axes. ``"box"``: one box per model at x = 1, 2, ... labelled with the model names (the median and mean
    artists have gids ``"median <name>"``, ``"mean <name>"``). ``"hist"``: one
    histogram per model (labelled with its name), and for one model three vertical lines labelled ``PCC@F``,
    ``PCC@S``, ``PCC@M`` with their values. ``"rank"``: one line per model labelled with its name, y = its sorted
    scores.

    Examples
    --------
    >>> import anndata as ad, numpy as np
    >>> import stpredict as st
    >>> rng = np.random.default_rng(0)
    >>> truth = ad.AnnData(rng.normal(size=(50, 8)))
    >>> good = st.tl.evaluate(ad.AnnData(truth.X + rng.normal(scale=0.5, size=truth.shape)), truth)
    >>> poor = st.tl.evaluate(ad.AnnData(truth.X + rng.normal(scale=2.0, size=truth.shape)), truth)
    >>> ax = st.pl.gene_scores({"good": good, "poor": poor}, kind="rank", show=False)
    >>> [line.get_label() for line in ax.get_lines()]
    ['good', 'poor']
    """
    from collections.abc import Mapping

    if kind not in ("box", "hist", "rank"):
        msg = f"kind must be 'box', 'hist' or 'rank', got {kind!r}."
        raise InputError(msg)
    named = dict(results) if isinstance(results, Mapping) else {"": results}
    if not named:
        msg = "Pass at least one result."
        raise InputError(msg)
    scores = {str(name): _per_gene(r, metric, nan_policy, str(name)) for name, r in named.items()}
    show = resolve_show(show, ax=ax, save=save)
    ax = axes_or_new(ax, show, figsize=figsize, dpi=dpi)
    label = "PCC" if metric == "pcc" else metric
    single = len(scores) == 1
    if kind == "box":
        data = [s["values"] for s in scores.values()]
        parts = ax.boxplot(
            data,
            positions=np.arange(1, len(data) + 1),
            widths=0.6,
            showmeans=True,
            meanprops={"marker": "o", "markerfacecolor": "white", "markeredgecolor": "black"},
            flierprops={"markersize": 3},
        )
        for name, median, mean in zip(scores, parts["medians"], parts["means"], strict=True):
            median.set_gid(f"median {name}".strip())
            mean.set_gid(f"mean {name}".strip())
        ax.set_xticks(np.arange(1, len(data) + 1))
        ax.set_xticklabels(list(scores) if not single or next(iter(scores)) else [label])
        ax.set_ylabel(f"gene-wise {label}")
        ax.grid(axis="y", alpha=0.3)
    elif kind == "hist":
        pooled = np.concatenate([s["values"] for s in scores.values()])
        edges = np.histogram_bin_edges(pooled if pooled.size else [0.0, 1.0], bins=bins)
        for name, s in scores.items():
            if single:
                ax.hist(s["values"], bins=edges, color="0.7", edgecolor="0.4", label=name or None)
            else:
                ax.hist(s["values"], bins=edges, histtype="step", lw=1.5, label=name)
        if single and metric in ("pcc", "spearman") and pooled.size:
            summary = pcc_summary(pooled, nan_policy="propagate")
            styles = {"pcc_f": ("tab:blue", ":"), "pcc_s": ("tab:orange", "--"), "pcc_m": ("tab:red", "-")}
            for key, (color, ls) in styles.items():
                line_label = f"{label}@{key[-1].upper()} = {summary[key]:.3f}"
                ax.axvline(summary[key], color=color, ls=ls, lw=1.5, label=line_label)
        ax.set_xlabel(f"gene-wise {label} across units")
        ax.set_ylabel("genes")
    else:
        for name, s in scores.items():
            ranked = np.sort(s["values"])
            ranked = ranked if metric in ("mse", "mae") else ranked[::-1]  # best first
            ax.plot(np.arange(1, ranked.size + 1), ranked, marker=".", label=name or label)
        ax.set_xlabel("gene rank (best first)")
        ax.set_ylabel(f"gene-wise {label}")
        ax.grid(alpha=0.3)
    if kind != "box" and (not single or kind == "hist") and ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    n_genes = max(s["n"] for s in scores.values())
    undefined = {name: s["n_nan"] for name, s in scores.items() if s["policy"] == "minus_one" and s["n_nan"]}
    if single:
        note = f"\n{sum(undefined.values())} undefined as −1" if undefined else ""
    else:
        note = "\nundefined as −1: " + ", ".join(f"{k} {v}" for k, v in undefined.items()) if undefined else ""
    ax.set_title(f"gene-wise {label} ({n_genes} genes){note}", fontsize="medium")
    return finish(ax.figure, ax, show=show, save=save, dpi=dpi)


def scale_curve(
    table: pd.DataFrame | Mapping[str, pd.DataFrame],
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
        concatenating several runs), or a mapping model name → such table (drawn with ``hue="model"``).
    metrics
        Metric name(s) to draw, one line each (per ``hue`` level).
    hue
        Column whose levels get separate lines (one colour per level; one line style per metric).
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

    Examples
    --------
    >>> import pandas as pd
    >>> import stpredict as st
    >>> pixnet = pd.DataFrame({"bin_size_um": [8, 16, 55], "metric": "pcc_m", "value": [0.2, 0.3, 0.5]})
    >>> ridge = pd.DataFrame({"bin_size_um": [8, 16, 55], "metric": "pcc_m", "value": [0.1, 0.2, 0.4]})
    >>> ax = st.pl.scale_curve({"PixNet": pixnet, "ridge": ridge}, show=False)
    >>> [line.get_label() for line in ax.get_lines()]
    ['PixNet PCC@M', 'ridge PCC@M']
    """
    import pandas as pd

    if not isinstance(table, pd.DataFrame):
        table = pd.concat({str(k): v for k, v in dict(table).items()}, names=["model", None]).reset_index(0)
        hue = hue or "model"
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
    by = ["bin_size_um", "metric"] + ([hue] if hue else [])
    if table[table["metric"].isin(metrics)].duplicated(by).any():
        msg = (
            f"The table has several values for one metric at one bin size{' per ' + hue if hue else ''}; pass "
            "`hue=` naming the column that tells them apart (e.g. 'model'), or filter the table first."
        )
        raise InputError(msg)
    show = resolve_show(show, ax=ax, save=save)
    ax = axes_or_new(ax, show, figsize=figsize, dpi=dpi)
    groups = [(None, table)] if hue is None else list(table.groupby(hue, sort=False, observed=True))
    styles = ["-", "--", ":", "-."]
    for g, (level, sub) in enumerate(groups):
        for k, m in enumerate(metrics):
            rows = sub[sub["metric"] == m].sort_values("bin_size_um")
            label = _SHORT.get(m, m) if level is None else f"{level} {_SHORT.get(m, m)}"
            color = f"C{g}" if hue is not None else f"C{k}"
            ls = styles[k % len(styles)] if hue is not None else "-"
            ax.plot(rows["bin_size_um"], rows["value"], marker="o", color=color, ls=ls, label=label)
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
