"""Seed ensembles in the benchmark protocol (issue 14, item 3): does the spread over seeds say where it is wrong?

Each fit of ``bench_protocol.py`` keeps its predictions aggregated over the measured spots of every test section
(``<out>.spots/<fold>__<model>__<section>__seed<k>.npz``: the spot ids and the spots × genes values). Per (fold,
model, test section) with at least two seeds, the ensemble is the mean over seeds and its spread the sample
standard deviation (``ddof=1``); both are scored with :func:`stpredict.tl.evaluate_uncertainty` against the
measured log1p CPM:

* ``spearman_sd_error``: Spearman correlation of the sd with the absolute error, per gene over spots, mean over
  genes (positive: the ensemble is unsure where it is wrong);
* ``pcc_all`` (the ensemble's PCC@M over all spots) against ``pcc_confident`` (over the half of the spots with the
  lowest sd, per gene), and ``pcc_single``, the mean over seeds of the single models' PCC@M: the gain of
  ensembling itself.

The spread is taken over the spot values. ``st.tl.ensemble_maps`` gives the same mean (aggregation is linear)
and a per-pixel sd map whose spot average is larger than or equal to the sd of the spot means (Jensen), so the
ranking of spots by sd, which is what these metrics use, is close but not identical.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict.tl._matching import _instance_key  # the instance-id column a table declares

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["format_ensembles", "save_spot_predictions", "score_ensembles", "spots_dir"]


def spots_dir(out: Path) -> Path:
    """Folder beside the result JSON that holds the per-seed spot predictions."""
    return out.with_suffix(".spots")


def save_spot_predictions(
    folder: Path, fold: str, model: str, section: str, seed: int, pred: Any, genes: list[str]
) -> None:
    """Write one fit's spots × genes predictions of one test section (``pred``: an AnnData from aggregate)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = pred[:, genes].X
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    path = folder / f"{fold}__{model}__{section}__seed{seed}.npz"
    tmp = path.with_suffix(".tmp.npz")
    ids = np.asarray(pred.obs[_instance_key(pred)].astype(str), dtype=str)  # not object: loads without pickle
    np.savez_compressed(tmp, obs=ids, X=x.astype(np.float32), genes=np.asarray(genes, dtype=str))
    tmp.replace(path)


def score_ensembles(folder: Path, entries: list[dict[str, Any]], tables: dict[str, dict[str, Any]]) -> list[dict]:
    """One row per (fold, model, test section) with ≥ 2 seeds saved: the ensemble's uncertainty scores.

    ``tables[fold][section]`` is the measured table (layer ``log1p_cpm``) the fold was scored against.
    """
    import anndata as ad

    import stpredict as st

    groups: dict[tuple[str, str, str], list[Path]] = defaultdict(list)
    for path in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
        fold, model, section, _ = path.stem.split("__")
        groups[(fold, model, section)].append(path)
    single = defaultdict(list)
    for e in entries:
        for section, r in e["tests"].items():
            single[(e["fold"], e["model"], section)].append(r["pcc_m"])
    rows = []
    for (fold, model, section), paths in sorted(groups.items()):
        if len(paths) < 2 or model == "mean_map" or fold not in tables:
            continue
        loaded = [np.load(p) for p in paths]
        obs, genes = loaded[0]["obs"], [str(g) for g in loaded[0]["genes"]]
        if any(not np.array_equal(z["obs"], obs) for z in loaded):
            continue  # spots differ between seeds: not one ensemble
        stack = np.stack([z["X"] for z in loaded]).astype(np.float64)
        mean = ad.AnnData(stack.mean(axis=0).astype(np.float32))
        sd = ad.AnnData(stack.std(axis=0, ddof=1).astype(np.float32))
        for table in (mean, sd):
            table.obs_names, table.var_names = obs.astype(str), genes
        truth = tables[fold][section]
        truth = ad.AnnData(
            truth.X, obs=truth.obs[[]].set_axis(truth.obs[_instance_key(truth)].astype(str).to_numpy()),
            var=truth.var[[]], layers={"log1p_cpm": truth.layers["log1p_cpm"]},
        )  # fmt: skip
        res = st.tl.evaluate_uncertainty(mean, truth, sd=sd, genes=genes, match="obs_names", truth_layer="log1p_cpm")
        m = res.loc["mean"]
        singles = single[(fold, model, section)]
        rows.append(
            {
                "fold": fold,
                "model": model,
                "test": section,
                "seeds": len(paths),
                "spearman_sd_error": float(m["spearman_sd_error"]),
                "pcc_all": float(m["pcc_all"]),
                "pcc_confident": float(m["pcc_confident"]),
                "pcc_single": float(np.mean(singles)) if singles else None,
            }
        )
    return rows


def format_ensembles(rows: list[dict]) -> str:
    """The printed table of :func:`score_ensembles`."""
    if not rows:
        return "\nseed ensembles: none (fewer than two seeds per fold and model)"
    lines = [
        "\nseed ensembles (spots): Spearman(sd, |error|) and PCC@M of the ensemble over all spots / the confident half,"
        " against the single seeds' mean PCC@M",
        f"{'fold':<10} {'test':<6} {'model':<16} {'seeds':>5} {'spearman':>9} {'pcc_all':>8} {'confident':>9} "
        f"{'single':>7}",
    ]
    for r in rows:
        single = f"{r['pcc_single']:.3f}" if r["pcc_single"] is not None else "–"
        lines.append(
            f"{r['fold']:<10} {r['test']:<6} {r['model']:<16} {r['seeds']:>5} {r['spearman_sd_error']:>9.3f} "
            f"{r['pcc_all']:>8.3f} {r['pcc_confident']:>9.3f} {single:>7}"
        )
    return "\n".join(lines)
