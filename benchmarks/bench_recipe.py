"""Training-recipe search for PixNet and SpotCNN on real tissue (issue 14, item 2): which settings win, measured.

Usage::

    python benchmarks/bench_recipe.py stutility_mob --seeds 2
    python benchmarks/bench_recipe.py stutility_mob --seeds 2 --recipes pixnet_base,pixnet_cosine --resume
    python benchmarks/bench_recipe.py stutility_mob --list                 # the recipes and what they change

Every recipe trains on the first fold of ``bench_protocol.py`` for the dataset (stutility_mob: train MOB1, validate
MOB2, test MOB3; her2st: the held-out fold), with that protocol's genes (top by mean on the training sections),
targets (log1p CPM) and scoring (``predict_dense`` → ``aggregate`` over the measured spots → ``evaluate``). A recipe
is a set of changes to the model's constructor and ``fit`` arguments on top of the protocol's budget (the *base*
recipe, the settings ``bench_protocol.py`` ran with).

Each recipe is scored on the **validation** section (what a user may select on) and on the **test** section (what
is reported). The winner is chosen on validation; its test number is then an honest estimate. Per recipe: mean ±
sd over seeds of PCC@M, and against the base recipe of the same model the paired per-gene difference on the test
section (per-gene PCC averaged over seeds) with a Wilcoxon signed-rank p-value. A difference inside the seed noise
(``|Δ| ≤ sqrt(sd_a² + sd_b²)``) or with ``p ≥ 0.05`` is a tie.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import _score_spots
from bench_protocol import DATASETS, REGISTRATIONS, _machine, _write, fold_tables, read_sections

REPO = Path(__file__).resolve().parents[1]

#: The base settings: those of ``bench_protocol.py`` (its defaults), per model family.
BASE: dict[str, dict[str, dict[str, Any]]] = {
    "pixnet": {
        "model": {
            "encoder": "tf_efficientnet_lite0",
            "pretrained": "efficientnet-lite0",
            "um_per_px": 2.0,
            "tile_size": 192,
            "output_stride": 2,
            "decoder_channels": (32, 64, 128, 192, 256, 320),
            "attention": "channel",
            "freeze_encoder": True,
            "value_kind": "intensive",
        },
        # every setting explicit: PixNet.fit's own defaults (the recipe this search chose) must not leak into a recipe
        "fit": {
            "max_epochs": 6,
            "tiles_per_epoch": 48,
            "batch_size": 8,
            "lr": 2e-3,
            "patience": 100,
            "lr_schedule": "constant",
            "select_by": "loss",
        },
    },
    "spotcnn": {
        "model": {
            "encoder": "tf_efficientnet_lite0",
            "pretrained": "efficientnet-lite0",
            "um_per_px": 2.0,
            "crop_um": 128.0,
            "stride_um": 100.0,
        },
        "fit": {
            "max_epochs": 6,
            "tiles_per_epoch": 384,
            "batch_size": 32,
            "lr": 2e-3,
            "patience": 100,
            "lr_schedule": "constant",
            "select_by": "loss",
        },
    },
}

#: name → (family, model changes, fit changes, what it tests).
RECIPES: dict[str, tuple[str, dict[str, Any], dict[str, Any], str]] = {
    "pixnet_base": ("pixnet", {}, {}, "the protocol's settings: frozen encoder, lr 2e-3 constant, 6 × 48 tiles"),
    "pixnet_lr5e-4": ("pixnet", {}, {"lr": 5e-4}, "the paper's learning rate"),
    "pixnet_cosine": ("pixnet", {}, {"lr_schedule": "cosine"}, "warm-up + cosine decay"),
    "pixnet_cosine_pcc": (
        "pixnet", {}, {"lr_schedule": "cosine", "select_by": "pcc"}, "cosine, best epoch by validation PCC@M",
    ),
    "pixnet_4um": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc"},
        "4 µm/px (cosine, PCC selection): a 768 µm tile, about 15 spots of a 200 µm array instead of 4",
    ),
    "pixnet_finetune": (
        "pixnet", {"freeze_encoder": 2}, {"lr_schedule": "cosine", "select_by": "pcc", "encoder_lr": 2e-4},
        "fine-tune the last 2 encoder blocks at a tenth of the learning rate",
    ),
    "pixnet_mse": (
        "pixnet", {}, {"lr_schedule": "cosine", "select_by": "pcc", "pcc_weight": 0.0}, "MSE only (no PCC term)",
    ),
    "pixnet_long": (
        "pixnet", {}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12}, "twice the epochs",
    ),
    "pixnet_4um_long": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12},
        "4 µm/px, cosine, PCC selection, twice the epochs",
    ),
    "pixnet_4um_lr5e-3": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc", "lr": 5e-3},
        "4 µm/px, cosine, PCC selection, peak learning rate 5e-3",
    ),
    "pixnet_4um_finetune": (
        "pixnet", {"um_per_px": 4.0, "freeze_encoder": 2},
        {"lr_schedule": "cosine", "select_by": "pcc", "encoder_lr": 2e-4},
        "4 µm/px, cosine, PCC selection, the last 2 encoder blocks fine-tuned at a tenth of the learning rate",
    ),
    "pixnet_8um": (
        "pixnet", {"um_per_px": 8.0}, {"lr_schedule": "cosine", "select_by": "pcc"},
        "8 µm/px (cosine, PCC selection): a 1.5 mm tile, about 50 spots",
    ),
    "pixnet_4um_long_lr5e-3": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12, "lr": 5e-3},
        "4 µm/px, twice the epochs, peak learning rate 5e-3",
    ),
    "pixnet_4um_long_constant": (
        "pixnet", {"um_per_px": 4.0}, {"max_epochs": 12},
        "4 µm/px, twice the epochs, constant learning rate and selection by validation loss (is cosine + PCC needed?)",
    ),
    "pixnet_4um_e24": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 24},
        "the default recipe (4 µm/px, cosine, PCC selection) with 24 epochs of 48 tiles instead of 12",
    ),
    "pixnet_4um_t96": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12,
                                       "tiles_per_epoch": 96},
        "the default recipe with 12 epochs of 96 tiles instead of 48",
    ),
    "pixnet_4um_e24_t96": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 24,
                                       "tiles_per_epoch": 96},
        "the default recipe with four times the steps (24 epochs of 96 tiles)",
    ),
    "pixnet_4um_long_finetune": (
        "pixnet", {"um_per_px": 4.0, "freeze_encoder": 2},
        {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12, "encoder_lr": 2e-4},
        "the default recipe, the last 2 encoder blocks fine-tuned at a tenth of the learning rate",
    ),
    "pixnet_4um_long_unfrozen": (
        "pixnet", {"um_per_px": 4.0, "freeze_encoder": False},
        {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12, "encoder_lr": 2e-4},
        "the default recipe, the whole encoder trained at a tenth of the learning rate (as SpotCNN's backbone is)",
    ),
    "pixnet_4um_e24_lr5e-3": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 24, "lr": 5e-3},
        "the default recipe with 24 epochs and a peak learning rate of 5e-3",
    ),
    "pixnet_4um_long_lr1e-2": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12, "lr": 1e-2},
        "the default recipe with a peak learning rate of 1e-2",
    ),
    "pixnet_4um_long_b4": (
        "pixnet", {"um_per_px": 4.0}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12, "batch_size": 4},
        "the default recipe with batches of 4 tiles (twice the optimiser steps for the same tiles)",
    ),
    "pixnet_4um_long_b4_lr5e-3": (
        "pixnet", {"um_per_px": 4.0},
        {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12, "batch_size": 4, "lr": 5e-3},
        "the default recipe with batches of 4 tiles and a peak learning rate of 5e-3",
    ),
    "pixnet_4um_long_unfrozen_lr": (
        "pixnet", {"um_per_px": 4.0, "freeze_encoder": False},
        {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12, "encoder_lr": 2e-3},
        "the default recipe, the whole encoder trained at the full learning rate (as SpotCNN's backbone is)",
    ),
    "pixnet_2um_tile384": (
        "pixnet", {"tile_size": 384}, {"lr_schedule": "cosine", "select_by": "pcc", "tiles_per_epoch": 12,
                                       "batch_size": 4},
        "2 µm/px with the 4 µm/px recipe's 768 µm field of view (the same pixels per epoch): field or resolution?",
    ),
    "spotcnn_base": ("spotcnn", {}, {}, "the protocol's settings: whole network at lr 2e-3 constant, 6 × 384 crops"),
    "spotcnn_cosine_pcc": (
        "spotcnn", {}, {"lr_schedule": "cosine", "select_by": "pcc"}, "cosine, best epoch by validation PCC@M",
    ),
    "spotcnn_encoder_lr": (
        "spotcnn", {}, {"lr_schedule": "cosine", "select_by": "pcc", "encoder_lr": 2e-4},
        "cosine, PCC selection, the pretrained backbone at a tenth of the learning rate",
    ),
    "spotcnn_long": (
        "spotcnn", {}, {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12},
        "cosine, PCC selection, twice the epochs (PixNet's winning schedule)",
    ),
}  # fmt: skip
DEFAULT_RECIPES = tuple(RECIPES)


def _model(family: str, genes: list[str], changes: dict[str, Any], seed: int) -> Any:
    import stpredict as st

    kwargs = {**BASE[family]["model"], **changes}
    if family == "pixnet":
        return st.models.PixNet(genes, **kwargs, seed=seed)
    import torch

    torch.manual_seed(seed)  # SpotCNN draws its head from torch's global generator
    return st.models.SpotCNN(genes, **kwargs)


def _score(sd: Any, model: Any, table: Any, genes: list[str], tmp: Path) -> dict[str, Any]:
    import stpredict as st

    key = "pred_recipe"
    st.tl.predict_dense(sd, model, image_key="he", key_added=key, tmp_dir=tmp, show_progress_bar=False)
    spots = st.tl.aggregate(sd, key, shapes_key="spots", genes=genes, force=True, inplace=False)
    res = _score_spots(sd, key, table, genes, False, "spots", pred=spots)
    del sd.images[key]
    shutil.rmtree(tmp / key, ignore_errors=True)  # the next section's map starts afresh, not as a resume
    pcc = np.nan_to_num(res.per_gene["pcc"].to_numpy(), nan=-1.0)
    return {"pcc_m": float(pcc.mean()), "mse": float(res.summary["mse"]), "per_gene_pcc": np.round(pcc, 5).tolist()}


def run_recipe(name: str, seed: int, genes: list[str], secs: dict[str, Any], tables: dict[str, Any], fold: Any,
               tmp: Path) -> dict[str, Any]:  # fmt: skip
    """Fit one recipe with one seed on the fold; score the validation and the test sections."""
    family, model_changes, fit_changes, _ = RECIPES[name]
    for n, t in tables.items():
        secs[n].tables["table"] = t
    model = _model(family, genes, model_changes, seed)
    fit_kw = {**BASE[family]["fit"], **fit_changes}
    t = time.perf_counter()
    model.fit(
        [secs[n] for n in fold.train], validation_data=[secs[n] for n in fold.val], target_layer="log1p_cpm",
        seed=seed, show_progress_bar=False, **fit_kw,
    )  # fmt: skip
    fit_s = time.perf_counter() - t
    hist = model.fit_history
    scores = {n: _score(secs[n], model, tables[n], genes, tmp) for n in (*fold.val, *fold.test)}
    return {
        "recipe": name, "seed": seed, "fit_s": round(fit_s, 1), "best_epoch": hist["best_epoch"],
        "val_loss": [round(float(v), 4) for v in hist["val_loss"]],
        "val_pcc": [round(float(v), 4) for v in hist.get("val_pcc", [])], "scores": scores,
    }  # fmt: skip


def summarise(entries: list[dict[str, Any]], fold: Any) -> tuple[list[dict], str]:
    """Per recipe: mean ± sd over seeds on validation and test; paired test against the family's base recipe."""
    from scipy.stats import wilcoxon

    by: dict[str, list[dict]] = {}
    for e in entries:
        by.setdefault(e["recipe"], []).append(e)
    rows = []
    for name in [r for r in RECIPES if r in by]:
        runs = by[name]
        row: dict[str, Any] = {"recipe": name, "family": RECIPES[name][0], "what": RECIPES[name][3], "n": len(runs)}
        for split, sections in (("val", fold.val), ("test", fold.test)):
            v = np.array([np.mean([r["scores"][s]["pcc_m"] for s in sections]) for r in runs])
            row[f"{split}_pcc_m"] = float(v.mean())
            row[f"{split}_sd"] = float(v.std(ddof=1)) if len(v) > 1 else math.nan
        row["fit_s"] = float(np.mean([r["fit_s"] for r in runs]))
        row["test_gene_pcc"] = np.mean([np.concatenate([r["scores"][s]["per_gene_pcc"] for s in fold.test])
                                        for r in runs], axis=0)  # fmt: skip
        rows.append(row)
    lines = [f"{'recipe':<22}{'val PCC@M':>16}{'test PCC@M':>16}{'fit s':>8}  vs base (test): Δ, genes up, p, verdict"]
    for row in rows:
        base = next((b for b in rows if b["recipe"] == f"{row['family']}_base"), None)
        cmp_txt = ""
        if base is not None and base is not row:
            a, b = row["test_gene_pcc"], base["test_gene_pcc"]
            p = float(wilcoxon(a, b).pvalue) if np.any(a != b) else 1.0
            delta = row["test_pcc_m"] - base["test_pcc_m"]
            noise = math.hypot(row["test_sd"], base["test_sd"])
            direction = "better" if delta > 0 else "worse"
            if not math.isfinite(noise):  # one seed: no noise band, only the paired test
                verdict = f"{direction} (1 seed)" if p < 0.05 else "tie (1 seed)"
            else:
                verdict = direction if abs(delta) > noise and p < 0.05 else "tie"
            row |= {"delta_vs_base": delta, "p_vs_base": p, "genes_up": int((a > b).sum()), "verdict": verdict}
            cmp_txt = f"  {delta:+.3f}, {int((a > b).sum())}/{len(a)}, p={p:.1g}, {verdict}"
        cells = "".join(
            f"{row[f'{k}_pcc_m']:>9.3f}" + (f"±{row[f'{k}_sd']:.3f}" if math.isfinite(row[f"{k}_sd"]) else " (1 seed)")
            for k in ("val", "test")
        )
        lines.append(f"{row['recipe']:<22}{cells}{row['fit_s']:>8.0f}{cmp_txt}")
    for row in rows:
        row.pop("test_gene_pcc")
    return rows, "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Parse the flags and run the recipes."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=tuple(DATASETS))
    p.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated recipe names")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--genes", type=int, default=250)
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/recipe_<dataset>.json)")
    p.add_argument("--resume", action="store_true", help="keep the (recipe, seed) entries already in --out")
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (family, m, f, what) in RECIPES.items():
            print(f"{name:<22}{family:<9}{what}\n{'':<31}model {m or '{}'}  fit {f or '{}'}")
        return
    recipes = [r for r in args.recipes.split(",") if r]
    if unknown := sorted(set(recipes) - set(RECIPES)):
        p.error(f"unknown recipes {unknown}; --list shows them")
    out = args.out or REPO / "benchmarks" / "results" / f"recipe_{args.dataset}.json"
    ds = DATASETS[args.dataset]
    fold = ds.folds[0]
    entries: list[dict[str, Any]] = []
    if args.resume and out.exists():
        old = json.loads(out.read_text())
        if old.get("genes_n") == args.genes and old.get("fold") == fold.name:
            entries = old.get("entries", [])
    timings: dict[str, float] = {}
    secs = read_sections(ds, list(dict.fromkeys(fold.train + fold.val + fold.test)), timings)
    genes, tables = fold_tables(fold, secs, args.genes)
    result: dict[str, Any] = {
        "registration": REGISTRATIONS,
        "benchmark": "bench_recipe", "dataset": args.dataset, "fold": fold.name, "train": fold.train,
        "val": fold.val, "test": fold.test, "genes_n": args.genes, "base": BASE,
        "recipes": {r: {"family": RECIPES[r][0], "model": RECIPES[r][1], "fit": RECIPES[r][2], "what": RECIPES[r][3]}
                    for r in RECIPES},
        "command": "python benchmarks/bench_recipe.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": _machine(),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name in recipes:
                if any(e["recipe"] == name and e["seed"] == seed for e in entries):
                    continue
                e = run_recipe(name, seed, genes, secs, tables, fold, Path(tmp))
                entries.append(e)
                s = " ".join(f"{k} {v['pcc_m']:.3f}" for k, v in e["scores"].items())
                print(f"[seed {seed}] {name:<22} fit {e['fit_s']:6.0f} s  best {e['best_epoch']}  {s}", flush=True)
                _write(out, {**result, "partial": True, "entries": entries})
    rows, table = summarise(entries, fold)
    print(table)
    _write(out, {**result, "partial": False, "entries": entries, "summary": rows, "table": table})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
