"""MagNet benchmark (issue #13): MagNet against PixNet, SpotCNN and EmbeddingRidge on synthetic Visium HD bins.

Usage::

    python benchmarks/bench_magnet.py --out benchmarks/results/magnet.json
    python benchmarks/bench_magnet.py --quick
    python benchmarks/bench_magnet.py --seeds 2 --out benchmarks/results/magnet.json
    python benchmarks/bench_magnet.py --seeds 3 --reuse pixnet,spotcnn,embedding_ridge   # refit the MagNets only
    python benchmarks/bench_magnet.py --models pixnet --pixnet-defaults \
        --out benchmarks/results/magnet_pixnet_defaults.json
    python benchmarks/bench_magnet.py --seeds 3 --magnet-budget long --train-um 8 \
        --models magnet,pixnet,spotcnn,embedding_ridge --reuse pixnet,spotcnn,embedding_ridge \
        --reuse-from benchmarks/results/magnet.json \
        --out benchmarks/results/magnet_long.json        # MagNet with three times the steps, in-scale rows only

Protocol (the protocol of ``bench_models.py``, on Visium HD bins):

* Data: per seed, three sections of one synthetic tissue (same ``tissue_seed``, different ``seed``): train,
  validation and held-out test, measured as Visium HD 8 µm bins (``layout="visium_hd"``). 16 µm and 55 µm bins are
  the 8 µm bins summed with :func:`stpredict.pp.bin_counts` (a bin goes to the larger bin holding its centre).
* Targets: ``prop_log`` (:func:`stpredict.pp.normalize`, the paper's), fitted on the training table of the scale a
  model is trained at; every table a model is scored on (measured bins and ground truth, at any scale) is
  normalised with those same training parameters, so prediction and reference share one space.
* Models, all trained on the same training bins with the same targets: ``magnet`` (default, fixed design),
  ``magnet_faithful`` (``faithful=True``, the published code's design), ``pixnet`` (paper mode, trained on the bins
  table directly), ``spotcnn`` (crop regressor centred on each bin) and ``embedding_ridge`` (frozen
  EfficientNet-Lite0 embeddings → PCA → ridge). Sizes and budgets are in :data:`CPU_BUDGET`.
* In-scale: models trained on 8 µm bins, scored at 8 and 16 µm. Cross-scale: models trained on 16 µm bins,
  scored at 8 and 55 µm. Each predicted map (``st.tl.predict_dense``) is aggregated into square bins with
  ``st.tl.aggregate`` and scored with ``st.tl.evaluate`` against the measured bins and against the ground-truth
  density (``images["truth"]`` summed over the same bins, i.e. expected counts, then normalised): MSE, MAE,
  PCC@F/S/M (gene-wise, across bins) and MagNet's spot-wise PCC (``spot_pcc``: across genes within a bin, mean
  over bins; SPEC §1.4; not comparable with PCC@M).
* Seeds: each seed draws new sections and new model initialisations. The summary gives mean ± sd over seeds, and
  for MagNet against each other model a paired Wilcoxon signed-rank test over genes on the per-gene PCC averaged
  over seeds. A difference of the means inside the seed noise (``|Δ| ≤ sqrt(sd_a² + sd_b²)``) is printed as a tie.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import _build_models  # the shared model settings of the dense-model benchmark

REPO = Path(__file__).resolve().parents[1]
MODELS = ("magnet", "magnet_faithful", "pixnet", "spotcnn", "embedding_ridge")
REFERENCE = "magnet"
METRICS = ("mse", "mae", "pcc_f", "pcc_s", "pcc_m", "spot_pcc")
#: (training bin size, evaluation bin sizes) in µm: in-scale, then cross-scale.
PROTOCOL = ((8.0, (8.0, 16.0)), (16.0, (8.0, 55.0)))

# ------------------------------------------------------------------------------------------------ budget
#: CPU budget for a 2-core box (a `--seeds 2` run in about 20 minutes with both cores free). These are NOT the
#: paper's settings (MagNet: 0.25 µm/px, dim 1024, ResNet-50, tens of epochs over whole slides; PixNet: hundreds of
#: tiles per epoch); they rank the models on small sections with a few epochs each.
CPU_BUDGET: dict[str, Any] = {
    "section_um": 384.0,  # train and test sections (3 × 3 MagNet region tiles)
    "val_section_um": 384.0,  # validation section (one PixNet tile)
    "image_um_per_px": 1.0,  # synthetic H&E resolution
    "n_genes": 32,
    "mean_counts_per_um2": 1.0,  # ≈ 64 counts per 8 µm bin over the genes
    "tissue_seed": 7,
    "magnet": {"um_per_px": 1.0, "dim": 64, "depth": 2, "n_layers": 2, "num_heads": 4},  # crops 28 px
    "magnet_fit": {"max_epochs": 8, "batches_per_epoch": 8, "patience": 3},  # ≈ 3 s per window on 2 cores
    "pixnet": {"um_per_px": 2.0, "tile_size": 192, "output_stride": 2, "decoder_channels": "32,64,128,192,256,320"},
    "pixnet_fit": {"max_epochs": 8, "tiles_per_epoch": 16, "batch_size": 4, "lr": 2e-3, "patience": 3},
    "crop": {"um_per_px": 1.0, "crop_um": 32.0},  # SpotCNN / EmbeddingRidge: a 32 µm crop around each bin
    "spotcnn_fit": {
        "max_epochs": 8,
        "tiles_per_epoch": 128,
        "batch_size": 32,
        "lr": 2e-3,
        "patience": 3,
        "validation_tiles": 256,
    },
    "ridge_fit": {"max_units": 1500, "n_components": 32},
}
#: ``--magnet-budget long``: three times MagNet's steps (at the CPU budget its best epoch was always the last and its
#: validation loss still falling, while SpotCNN's best epoch came before its last).
MAGNET_LONG: dict[str, Any] = {"max_epochs": 24, "batches_per_epoch": 8, "patience": 6}
#: The settings each model's results depend on, beside the data's (``--reuse`` compares only these).
DATA_KEYS = ("section_um", "val_section_um", "image_um_per_px", "n_genes", "mean_counts_per_um2", "tissue_seed")
MODEL_KEYS = {
    "magnet": ("magnet", "magnet_fit"),
    "magnet_faithful": ("magnet", "magnet_fit"),
    "pixnet": ("pixnet", "pixnet_fit"),
    "spotcnn": ("crop", "spotcnn_fit"),
    "embedding_ridge": ("crop", "ridge_fit"),
}
#: ``--quick``: a smoke run of the whole pipeline (about 10 minutes on one busy core).
QUICK: dict[str, Any] = {
    "n_genes": 16,
    "magnet": {"um_per_px": 1.0, "dim": 32, "depth": 1, "n_layers": 1, "num_heads": 4},
    "magnet_fit": {"max_epochs": 1, "batches_per_epoch": 2, "patience": 1},
    "pixnet_fit": {"max_epochs": 1, "tiles_per_epoch": 4, "batch_size": 4, "lr": 2e-3, "patience": 1},
    "spotcnn_fit": {
        "max_epochs": 1,
        "tiles_per_epoch": 32,
        "batch_size": 16,
        "lr": 2e-3,
        "patience": 1,
        "validation_tiles": 64,
    },
    "ridge_fit": {"max_units": 500, "n_components": 16},
}


# ------------------------------------------------------------------------------------------------ data
def _sections(cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train, validation and test sections of one tissue, with tissue masks and 16 µm bins."""
    import stpredict as st

    out = {}
    for i, (name, size) in enumerate(
        (("train", cfg["section_um"]), ("val", cfg["val_section_um"]), ("test", cfg["section_um"]))
    ):
        sd = st.datasets.synthetic(
            shape_um=(size, size),
            um_per_px=cfg["image_um_per_px"],
            n_genes=cfg["n_genes"],
            layout="visium_hd",
            bin_size_um=8,
            mean_counts_per_um2=cfg["mean_counts_per_um2"],
            seed=seed + 1 + i,
            tissue_seed=cfg["tissue_seed"],
            section=name,
            patient=f"P{i}",
        )
        st.pp.tissue_mask(sd, "he")
        st.pp.bin_counts(sd, "table", bin_size=16.0, key_added=_table_key(16.0))
        out[name] = sd
    return out


def _table_key(bin_um: float) -> str:
    return "table" if bin_um == 8.0 else f"table_{bin_um:g}um"


def _references(test: Any, genes: list[str], scales: tuple[float, ...], params: dict[str, Any]) -> dict[float, Any]:
    """Measured and ground-truth tables of the test section at each scale, normalised with ``params``."""
    import stpredict as st

    refs = {}
    for b in scales:
        measured = st.pp.bin_counts(test, "table", bin_size=b, inplace=False)[:, genes].copy()
        st.pp.normalize(measured, params=params)
        truth = st.tl.aggregate(test, "truth", bin_size=b, genes=genes, inplace=False)
        truth = truth[truth.obs["instance_id"].isin(measured.obs["instance_id"])].copy()  # the measured bins only
        st.pp.normalize(truth, params=params)
        refs[b] = {"measured": measured, "truth": truth}
    return refs


# ------------------------------------------------------------------------------------------------ models
def _make_model(name: str, genes: list[str], bin_um: float, cfg: dict[str, Any], seed: int, core_tiles: int) -> Any:
    import stpredict as st

    if name.startswith("magnet"):
        return st.models.MagNet(
            genes, bin_um=bin_um, faithful=name == "magnet_faithful", core_tiles=core_tiles, seed=seed, **cfg["magnet"]
        )
    if name == "pixnet" and cfg["pixnet"] == "defaults":  # --pixnet-defaults: what PixNet(genes) gives a user
        return st.models.PixNet(genes, seed=seed)
    pix, crop = cfg["pixnet"], cfg["crop"]
    ns = argparse.Namespace(
        um_per_px=pix["um_per_px"],
        tile_size=pix["tile_size"],
        output_stride=pix["output_stride"],
        decoder_channels=[int(c) for c in pix["decoder_channels"].split(",")],
        seed=seed,
        crop_um=crop["crop_um"],
        stride_um=bin_um,  # one map pixel per bin
        n_components=cfg["ridge_fit"]["n_components"],
    )
    cls, kw = _build_models(ns, genes)[name]
    if name != "pixnet":
        kw = {**kw, "um_per_px": crop["um_per_px"]}
    return cls(genes, **kw)


def _fit(model: Any, name: str, train: Any, val: Any, bin_um: float, cfg: dict[str, Any], seed: int) -> dict:
    common = {"table_key": _table_key(bin_um), "target_layer": "prop_log", "seed": seed, "show_progress_bar": False}
    if name.startswith("magnet"):
        kw = dict(cfg["magnet_fit"])
        n_bins = int(train.tables[common["table_key"]].n_obs)
        if n_bins < 256:  # a section with little tissue at 16 µm: one batch holds all its bins (the default is 256)
            kw["batch_bins"] = n_bins
        model.fit(train, validation_data=val, **kw, **common)
    elif name == "pixnet" and cfg["pixnet_fit"] == "defaults":
        kw = {}
        model.fit(train, validation_data=val, **common)
    elif name == "embedding_ridge":
        kw = {"max_units": cfg["ridge_fit"]["max_units"]}
        model.fit(train, **kw, **common)
    else:
        kw = dict(cfg["pixnet_fit" if name == "pixnet" else "spotcnn_fit"])
        model.fit(train, validation_data=val, **kw, **common)
    hist = getattr(model, "fit_history", None) or {}
    return {
        "fit_kwargs": kw,
        "best_epoch": hist.get("best_epoch"),
        "epochs_run": len(hist.get("train_loss", []) or []),
        "train_loss": [round(float(x), 4) for x in hist.get("train_loss", []) or []],
        "val_loss": [round(float(x), 4) for x in hist.get("val_loss", []) or []],
    }


def _score(test: Any, map_key: str, refs: dict[float, Any], genes: list[str]) -> tuple[list[dict], dict]:
    """Rows of metrics per (scale, reference) and the per-gene PCC of each."""
    import stpredict as st

    rows, per_gene = [], {}
    for b, ref in refs.items():
        pred = st.tl.aggregate(test, map_key, bin_size=b, genes=genes, allow_subpixel=True, inplace=False)
        for kind, table in ref.items():
            res = st.tl.evaluate(pred, table, truth_layer="prop_log", genes=genes, ssim=False, inplace=False)
            rows.append(
                {"eval_um": b, "reference": kind, "n_bins": int(res.params["n_units"])}
                | {m: float(res.summary[m]) for m in METRICS}
            )
            per_gene[f"{b:g}|{kind}"] = np.nan_to_num(res.per_gene["pcc"].to_numpy(), nan=-1.0).tolist()
    return rows, per_gene


# ------------------------------------------------------------------------------------------------ one seed
def run_seed(
    cfg: dict[str, Any], models: list[str], seed: int, base_seed: int, protocol: tuple = PROTOCOL
) -> dict[str, Any]:
    import stpredict as st

    t = time.perf_counter()
    secs = _sections(cfg, base_seed + 10 * seed)
    train, val, test = secs["train"], secs["val"], secs["test"]
    genes = st.pp.select_genes([train.tables["table"]], n_top=cfg["n_genes"])
    data_s = time.perf_counter() - t
    n_bins = {f"{n}_{b:g}um": int(sd.tables[_table_key(b)].n_obs) for n, sd in secs.items() for b in (8.0, 16.0)}
    print(f"[seed {seed}] data {data_s:.1f} s; bins {n_bins}", flush=True)
    core_tiles = math.ceil(cfg["section_um"] / 128.0)
    rows, per_gene, fits = [], {}, {}
    for bin_um, scales in protocol:
        key = _table_key(bin_um)
        st.pp.normalize(train.tables[key], method="prop_log")
        params = train.tables[key].uns["stpredict"]["normalize"]["prop_log"]
        st.pp.normalize(val.tables[key], params=params)
        refs = _references(test, genes, scales, params)
        for name in models:
            tag = f"{name}@{bin_um:g}"
            model = _make_model(name, genes, bin_um, cfg, base_seed + seed, core_tiles)
            t = time.perf_counter()
            rec = _fit(model, name, train, val, bin_um, cfg, base_seed + seed)
            rec["fit_s"] = round(time.perf_counter() - t, 2)
            map_key = f"pred_{name}"
            t = time.perf_counter()
            st.tl.predict_dense(test, model, image_key="he", key_added=map_key, show_progress_bar=False)
            rec["predict_s"] = round(time.perf_counter() - t, 2)
            r, g = _score(test, map_key, refs, genes)
            del test.images[map_key]
            rows += [{"seed": seed, "model": name, "train_um": bin_um} | x for x in r]
            per_gene |= {f"{name}|{bin_um:g}|{k}": v for k, v in g.items()}
            fits[tag] = rec
            first = r[0]
            print(
                f"[seed {seed}] {tag:<20} fit {rec['fit_s']:7.1f} s  predict {rec['predict_s']:6.1f} s  "
                f"@{first['eval_um']:g} measured pcc_m {first['pcc_m']:.3f} spot_pcc {first['spot_pcc']:.3f}",
                flush=True,
            )
    return {"seed": seed, "genes": genes, "n_bins": n_bins, "data_s": round(data_s, 2), "fits": fits, "rows": rows,
            "per_gene_pcc": per_gene}  # fmt: skip


# ------------------------------------------------------------------------------------------------ summary
def _summarise(
    per_seed: list[dict[str, Any]], models: list[str], protocol: tuple = PROTOCOL
) -> tuple[list[dict], list[dict]]:
    import pandas as pd
    from scipy.stats import wilcoxon

    df = pd.DataFrame([r for s in per_seed for r in s["rows"]])
    keys = ["model", "train_um", "eval_um", "reference"]
    agg = df.groupby(keys, sort=False)[list(METRICS)].agg(["mean", "std"])
    summary = []
    for idx, row in agg.iterrows():
        rec = dict(zip(keys, idx, strict=True))
        for m in METRICS:
            rec[m] = float(row[(m, "mean")])
            rec[f"{m}_sd"] = float(row[(m, "std")]) if len(per_seed) > 1 else float("nan")
        summary.append(rec)
    comparisons = []
    for bin_um, scales in protocol:
        for b in scales:
            for kind in ("measured", "truth"):
                ref_key = f"{REFERENCE}|{bin_um:g}|{b:g}|{kind}"
                if REFERENCE not in models:
                    continue
                ref = np.mean([s["per_gene_pcc"][ref_key] for s in per_seed], axis=0)
                a = next(x for x in summary if (x["model"], x["train_um"], x["eval_um"], x["reference"]) ==
                         (REFERENCE, bin_um, b, kind))  # fmt: skip
                for other in models:
                    if other == REFERENCE:
                        continue
                    pcc = np.mean([s["per_gene_pcc"][f"{other}|{bin_um:g}|{b:g}|{kind}"] for s in per_seed], axis=0)
                    diff = ref - pcc
                    p = float(wilcoxon(ref, pcc).pvalue) if np.any(diff != 0) else 1.0
                    o = next(x for x in summary if (x["model"], x["train_um"], x["eval_um"], x["reference"]) ==
                             (other, bin_um, b, kind))  # fmt: skip
                    delta = a["pcc_m"] - o["pcc_m"]
                    noise = math.sqrt(a["pcc_m_sd"] ** 2 + o["pcc_m_sd"] ** 2)
                    if not math.isfinite(noise):
                        verdict = "n/a (1 seed)"
                    elif abs(delta) <= noise:
                        verdict = "tie"
                    else:
                        verdict = f"{REFERENCE} better" if delta > 0 else f"{other} better"
                    comparisons.append(
                        {
                            "train_um": bin_um,
                            "eval_um": b,
                            "reference": kind,
                            "other": other,
                            "delta_pcc_m": delta,
                            "seed_noise": noise,
                            "verdict": verdict,
                            "genes_magnet_higher": int((diff > 0).sum()),
                            "n_genes": len(diff),
                            "wilcoxon_p": p,
                        }
                    )
    return summary, comparisons


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.3f}" if not math.isfinite(sd) else f"{mean:.3f}±{sd:.3f}"


def _print_table(
    summary: list[dict], comparisons: list[dict], per_seed: list[dict], models: list[str], protocol: tuple = PROTOCOL
) -> str:
    n = len(per_seed)
    lines = [f"mean ± sd over {n} seed(s); prop_log space of the training scale; spot_pcc is NOT comparable to PCC@M"]
    for bin_um, scales in protocol:
        for b in scales:
            for kind in ("measured", "truth"):
                lines.append(f"\ntrained {bin_um:g} µm → scored {b:g} µm vs {kind}")
                lines.append(f"  {'model':<16}" + "".join(f"{m:>15}" for m in METRICS))
                for x in summary:
                    if (x["train_um"], x["eval_um"], x["reference"]) == (bin_um, b, kind):
                        cells = "".join(f"{_fmt(x[m], x[m + '_sd']):>15}" for m in METRICS)
                        lines.append(f"  {x['model']:<16}{cells}")
    if comparisons:
        lines.append(f"\n{REFERENCE} vs others: Δ PCC@M (seed noise), verdict, Wilcoxon over genes (mean PCC)")
        lines.extend(
            f"  {c['train_um']:>4g}→{c['eval_um']:<4g} {c['reference']:<8} vs {c['other']:<16} "
            f"Δ {c['delta_pcc_m']:+.3f} ({c['seed_noise']:.3f})  {c['verdict']:<22} "
            f"genes {c['genes_magnet_higher']:>2}/{c['n_genes']}  p={c['wilcoxon_p']:.2g}"
            for c in comparisons
        )
    lines.append("\nwall time per seed (s): fit / predict_dense")
    for tag in per_seed[0]["fits"]:
        fit = [s["fits"][tag]["fit_s"] for s in per_seed]
        pred = [s["fits"][tag]["predict_s"] for s in per_seed]
        epochs = [s["fits"][tag]["epochs_run"] for s in per_seed]
        lines.append(f"  {tag:<22} fit {np.mean(fit):7.1f}   predict {np.mean(pred):6.1f}   epochs {epochs}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------------------------ CLI
def _reusable(path: Path, cfg: dict[str, Any], models: list[str], base_seed: int) -> dict[int, dict[str, Any]]:
    """Per seed, the earlier run's record in ``path`` (same configuration and base seed, holding ``models``)."""
    if not path.is_file():
        sys.exit(f"--reuse: {path} does not exist")
    old = json.loads(path.read_text())
    keys = set(DATA_KEYS).union(*(MODEL_KEYS[m] for m in models))  # the data's and the reused models' settings
    mine = {k: v for k, v in json.loads(json.dumps(cfg, default=str)).items() if k in keys}
    theirs = {k: v for k, v in (old.get("config") or {}).items() if k in keys}
    if mine != theirs or old["config"].get("base_seed", 0) != base_seed:
        sys.exit(f"--reuse: {path} was run with other data or other settings of {models}, or another base seed; "
                 "refit them")  # fmt: skip
    out = {}
    for r in old.get("per_seed", []):
        have = {tag.split("@")[0] for tag in r.get("fits", {})}
        if set(models) <= have:
            out[int(r["seed"])] = r | {"source": str(path)}
    return out


def _merge(old: dict[str, Any], new: dict[str, Any], reuse: list[str], train_um: list[float]) -> dict[str, Any]:
    """``new`` with the rows, per-gene PCCs and fits of the ``reuse`` models at ``train_um`` from ``old`` (one seed)."""
    if old["genes"] != new["genes"]:
        sys.exit("--reuse: the earlier run selected other genes for this seed; refit every model")

    def mine(key: str) -> bool:  # "spotcnn@8" or "spotcnn|8|16|truth"
        model, scale = key.split("@") if "@" in key else key.split("|")[:2]
        return model in reuse and float(scale) in train_um

    merged = dict(new)
    merged["rows"] = new["rows"] + [r for r in old["rows"] if r["model"] in reuse and r["train_um"] in train_um]
    merged["per_gene_pcc"] = new["per_gene_pcc"] | {k: v for k, v in old["per_gene_pcc"].items() if mine(k)}
    merged["fits"] = new["fits"] | {k: v for k, v in old["fits"].items() if mine(k)}
    merged["reused"] = {"models": reuse, "from": old.get("source")}
    return merged


def _resumed(out: Path, cfg: dict[str, Any], models: list[str], base_seed: int) -> list[dict[str, Any]]:
    """The finished seeds in ``out`` when its configuration, models and base seed are this run's, else none."""
    if not out.is_file():
        return []
    old = json.loads(out.read_text())
    same_run = json.loads(json.dumps(cfg, default=str)) == old.get("config") and old.get("base_seed", 0) == base_seed
    kept = [r for r in old.get("per_seed", []) if {tag.split("@")[0] for tag in r.get("fits", {})} == set(models)]
    if not same_run or not kept:
        print(f"--resume: nothing reusable in {out} (other settings or models); starting afresh", flush=True)
        return []
    return kept


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "magnet.json")
    p.add_argument("--quick", action="store_true", help="a smoke run: small sections, one short epoch, one seed")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--threads", type=int, default=None, help="torch/numba threads (default: the usable cores)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the finished seeds of --out when it was written with the same configuration and models",
    )
    p.add_argument(
        "--reuse",
        default="",
        help="comma-separated models whose per-seed results are taken from --reuse-from instead of refitted (only "
        "for models whose code and settings did not change since; the JSON records it)",
    )
    p.add_argument("--reuse-from", type=Path, default=None, help="JSON of an earlier run (default: --out)")
    p.add_argument(
        "--magnet-budget",
        choices=("cpu", "long"),
        default="cpu",
        help=f"MagNet's fit budget: CPU_BUDGET's (8 epochs of 8 windows) or long {MAGNET_LONG}",
    )
    p.add_argument(
        "--train-um",
        default="8,16",
        help="training bin sizes to run (8: the in-scale rows only; 16: the cross-scale rows only)",
    )
    p.add_argument(
        "--pixnet-defaults",
        action="store_true",
        help="PixNet as a user gets it: st.models.PixNet(genes) and fit's defaults (not the CPU_BUDGET settings)",
    )
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if set(models) - set(MODELS):
        p.error(f"unknown models {sorted(set(models) - set(MODELS))}; choose from {MODELS}")
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    cfg = {**CPU_BUDGET, **(QUICK if args.quick else {})}
    if args.pixnet_defaults:
        cfg |= {"pixnet": "defaults", "pixnet_fit": "defaults"}
    if args.magnet_budget == "long":
        cfg |= {"magnet_fit": MAGNET_LONG}
    train_um = [float(b) for b in args.train_um.split(",") if b]
    if set(train_um) - {b for b, _ in PROTOCOL}:
        p.error(f"--train-um must be among {[b for b, _ in PROTOCOL]}, got {train_um}")
    protocol = tuple((b, s) for b, s in PROTOCOL if b in train_um)

    import torch

    import stpredict as st

    if args.threads:
        st.settings.n_jobs = args.threads
    t0 = time.perf_counter()
    per_seed = _resumed(args.out, cfg, models, args.seed) if args.resume else []
    reuse = [m for m in args.reuse.split(",") if m]
    if set(reuse) - set(models):
        p.error(f"--reuse {sorted(set(reuse) - set(models))} are not among --models")
    earlier = _reusable(args.reuse_from or args.out, cfg, reuse, args.seed) if reuse else {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for s in range(seeds):
        if any(r["seed"] == s for r in per_seed):
            print(f"[seed {s}] kept from {args.out}", flush=True)
            continue
        if reuse and s not in earlier:
            sys.exit(f"--reuse: seed {s} is not in {args.reuse_from or args.out}; run without --reuse")
        rec = run_seed(cfg, [m for m in models if m not in reuse], s, args.seed, protocol)
        if reuse:
            rec = _merge(earlier[s], rec, reuse, train_um)
        per_seed.append(rec)
        # kept if a later seed does not finish
        partial = {"partial": True, "config": cfg, "base_seed": args.seed, "per_seed": per_seed}
        args.out.write_text(json.dumps(partial, indent=2, default=str))
    summary, comparisons = _summarise(per_seed, models, protocol)
    print()
    table = _print_table(summary, comparisons, per_seed, models, protocol)
    total = round(time.perf_counter() - t0, 2)
    result = {
        "benchmark": "magnet (issue #13)",
        "config": {
            **cfg,
            "quick": args.quick,
            "seeds": seeds,
            "base_seed": args.seed,
            "section_seeds": "base + 10 · seed + (1, 2, 3) for train / val / test",
            "model_seed": "base + seed",
            "models": models,
            "protocol": [{"train_um": b, "eval_um": list(s)} for b, s in protocol],
            "layout": "visium_hd 8 µm bins; 16 and 55 µm by st.pp.bin_counts",
            "normalization": "prop_log fitted on the training table of the training scale, applied to all tables",
            "truth": "images['truth'] summed over the measured bins (expected counts), normalised like the counts",
            "metrics": {m: st.tl.METRIC_LABELS[m] for m in METRICS} if hasattr(st.tl, "METRIC_LABELS") else METRICS,
        },
        "per_seed": per_seed,
        "summary": summary,
        "comparisons": comparisons,
        "timings_s": {
            "total": total,
            "per_seed_data": [s["data_s"] for s in per_seed],
            "fits": {
                tag: {
                    "fit_s": [s["fits"][tag]["fit_s"] for s in per_seed],
                    "predict_s": [s["fits"][tag]["predict_s"] for s in per_seed],
                }
                for tag in per_seed[0]["fits"]
            },
        },  # fmt: skip
        "table": table,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "stpredict": getattr(st, "__version__", None),
            "load_avg_at_end": os.getloadavg(),
        },
    }
    print(f"\ntotal {total:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
