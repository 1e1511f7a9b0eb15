"""Benchmark of the dense models side by side: PixNet (paper and density mode), SpotCNN, EmbeddingRidge, mean map.

Usage::

    python benchmarks/bench_models.py synthetic --out benchmarks/results/models.json
    python benchmarks/bench_models.py synthetic --quick
    python benchmarks/bench_models.py her2st --train C2,C3 --test C4 --out benchmarks/results/models_her2st.json

``synthetic``: three sections of one synthetic tissue (same ``tissue_seed``, different ``seed``): train, validation
and held-out test, measured by a Spatial-Transcriptomics-like layout (100 µm spots at 200 µm pitch). Every model
is trained only on the training section's 100 µm spot counts, predicts a dense map of the test section with
``st.tl.predict_dense``, and is scored by gene-wise PCC (mean/median/first quartile over genes) against the
ground-truth expression density binned at 8, 16 and 55 µm, and against the measured test spots.

``her2st``: sections read with ``st.io.read_st`` from ``--data-dir``; top genes by mean on the training sections;
log1p CPM with the training parameters; the models are scored against the measured spots of the test section(s).

Models (identical data, identical evaluation):

* ``pixnet``: PixNet, paper mode (intensive map, log1p CPM targets, MSE + λ(1 − PCC) loss);
* ``pixnet_density``: PixNet, density mode (expected counts per µm², Poisson loss on raw counts);
* ``spotcnn``: ST-Net-like crop regressor painted by a sliding window;
* ``embedding_ridge``: frozen EfficientNet-Lite0 embeddings → PCA → ridge (HEST-like);
* ``mean_map``: a constant map, the mean training target per gene. Its gene-wise PCC is undefined (constant
  prediction), so under the published policy (NaN → −1) it scores −1; reported as such, and its MSE is given.

The density model's spot predictions (expected counts) are put into the same space as the measured spots before
scoring (log1p of counts per 10,000, totals over the scored genes for both sides, through
``st.tl.evaluate(normalize="log1p_cpm")``).
Against the ground-truth density all maps are scored by correlation only (PCC is scale-free per gene, but not
invariant to the log transform: intensive maps are log1p CPM values, the truth is linear counts per µm²).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("pixnet", "pixnet_density", "spotcnn", "embedding_ridge", "mean_map")
SUMMARY = ("pcc_m", "pcc_s", "pcc_f", "mse")


# ------------------------------------------------------------------------------------------------ helpers
class ConstantMap:
    """A dense model that paints the same value everywhere: the mean training target per gene."""

    name = "mean_map"
    value_kind = "intensive"

    def __init__(self, genes: list[str], values: np.ndarray, *, um_per_px: float = 2.0, output_stride: int = 8):
        self.var_names = list(genes)
        self.values = np.asarray(values, dtype=np.float32).reshape(-1)
        self.um_per_px = float(um_per_px)
        self.output_stride = int(output_stride)
        self.tile_size = 32 * self.output_stride
        self.context = 0

    def predict_tiles(self, tiles: np.ndarray, *, device: str = "auto") -> np.ndarray:
        b, _, h, w = tiles.shape
        out = np.empty((b, len(self.values), h // self.output_stride, w // self.output_stride), np.float32)
        out[:] = self.values[None, :, None, None]
        return out


def _mean_target(tables: list[Any], genes: list[str], layer: str) -> np.ndarray:
    import scipy.sparse as sp

    vals = []
    for t in tables:
        x = t[:, genes].layers[layer]
        vals.append(x.toarray() if sp.issparse(x) else np.asarray(x))
    return np.concatenate(vals).mean(axis=0)


def _summary(res: Any) -> dict[str, float]:
    return {k: float(res.summary[k]) for k in SUMMARY if k in res.summary.index}


def _build_models(args: argparse.Namespace, genes: list[str]) -> dict[str, Any]:
    import stpredict as st

    pix = {
        "encoder": "tf_efficientnet_lite0",
        "pretrained": "efficientnet-lite0",
        "um_per_px": args.um_per_px,
        "tile_size": args.tile_size,
        "output_stride": args.output_stride,
        "decoder_channels": tuple(args.decoder_channels),
        "attention": "channel",
        "freeze_encoder": True,
        "seed": args.seed,
    }
    spot = {
        "encoder": "tf_efficientnet_lite0",
        "pretrained": "efficientnet-lite0",
        "um_per_px": args.um_per_px,
        "crop_um": args.crop_um,
        "stride_um": args.stride_um,
    }
    return {
        "pixnet": (st.models.PixNet, {**pix, "value_kind": "intensive"}),
        "pixnet_density": (st.models.PixNet, {**pix, "value_kind": "density"}),
        "spotcnn": (st.models.SpotCNN, spot),
        "embedding_ridge": (st.models.EmbeddingRidge, {**spot, "n_components": args.n_components}),
    }


def _fit(
    name: str, cls: Any, kwargs: dict[str, Any], genes: list[str], train: Any, val: Any, args: argparse.Namespace,
    extra_fit: dict[str, Any] | None = None,
):  # fmt: skip
    """Build and train one model; returns (model, seconds, fit record). ``extra_fit`` overrides the fit flags."""
    t0 = time.perf_counter()
    model = cls(genes, **kwargs)
    common = {"seed": args.seed, "show_progress_bar": False}
    if name == "embedding_ridge":
        model.fit(train, target_layer="log1p_cpm", max_units=args.max_units, **common)
        fit_kw: dict[str, Any] = {"target_layer": "log1p_cpm", "max_units": args.max_units}
    else:
        fit_kw = {
            "validation_data": val,
            "max_epochs": args.epochs,
            "tiles_per_epoch": args.tiles_per_epoch if name != "spotcnn" else args.crops_per_epoch,
            "batch_size": args.batch_size if name != "spotcnn" else args.crop_batch_size,
            "lr": args.lr,
            "patience": args.patience,
        }
        if name == "pixnet_density":
            fit_kw["loss"] = args.density_loss
        else:
            fit_kw["target_layer"] = "log1p_cpm"
        fit_kw |= extra_fit or {}
        model.fit(train, **fit_kw, **common)
    seconds = time.perf_counter() - t0
    hist = getattr(model, "fit_history", {}) or {}
    record = {
        "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "fit_kwargs": {k: v for k, v in fit_kw.items() if k != "validation_data"},
        "fit_s": round(seconds, 2),
        "best_epoch": hist.get("best_epoch"),
        "epochs_run": len(hist.get("train_loss", []) or []),
        "train_loss": [round(float(x), 4) for x in hist.get("train_loss", []) or []],
        "val_loss": [round(float(x), 4) for x in hist.get("val_loss", []) or []],
    }
    return model, seconds, record


def _exact_constant(pred: Any, constant: np.ndarray | None) -> Any:
    """The mean map's aggregated table with its values reset to the exact constant.

    Averaging a constant float32 map over footprints of different pixel counts leaves 1-ulp differences between
    units (e.g. 7.1234565 vs 7.123457), and ``st.tl.evaluate`` then reports a PCC computed on rounding noise
    instead of an undefined one. Resetting ``X`` restores what the constant map predicts.
    """
    if constant is None:
        return pred
    pred = pred.copy()
    pred.X = np.broadcast_to(np.asarray(constant, np.float32), pred.shape).copy()
    return pred


def _score_spots(
    test: Any,
    map_key: str,
    table: Any,
    genes: list[str],
    density: bool,
    shapes_key: str,
    constant: np.ndarray | None = None,
    pred: Any = None,
) -> Any:
    """Aggregate the map over the measured spots and score gene-wise against the measured log1p CPM.

    ``pred``: the map already aggregated over those spots (``st.tl.aggregate``), so that it is not aggregated twice.
    """
    import stpredict as st

    if pred is None:
        pred = st.tl.aggregate(test, map_key, shapes_key=shapes_key, genes=genes, force=True, inplace=False)
    pred = _exact_constant(pred, constant)
    if density:
        # Expected counts per spot → the measured spots' space (log1p CPM over the scored genes on both sides).
        # (st.pp.normalize accepts the expected counts of a density map summed over units)
        return st.tl.evaluate(pred, table[:, genes], normalize="log1p_cpm", genes=genes)
    return st.tl.evaluate(pred, table, truth_layer="log1p_cpm", genes=genes)


def _print_table(rows: list[dict[str, Any]], fits: dict[str, dict[str, Any]]) -> str:
    import pandas as pd

    df = pd.DataFrame(rows)
    lines = []
    for metric in ("pcc_m", "pcc_s", "pcc_f"):
        if metric not in df.columns:
            continue
        piv = df.pivot_table(index="model", columns="evaluation", values=metric, sort=False)
        lines += [f"\n{metric} (gene-wise PCC; mean / median / first quartile over genes)", piv.round(3).to_string()]
    lines.append("\nwall time (s)")
    for name, rec in fits.items():
        extra = f"  (best epoch {rec['best_epoch']} of {rec['epochs_run']})" if rec.get("epochs_run") else ""
        lines.append(
            f"  {name:<16} fit {rec['fit_s']:>8.1f}   predict_dense {rec.get('predict_s', float('nan')):>8.1f}{extra}"
        )
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------------------------ synthetic
def run_synthetic(args: argparse.Namespace) -> dict[str, Any]:
    import pandas as pd

    import stpredict as st

    timings: dict[str, float] = {}
    t = time.perf_counter()
    sections = []
    for i, (name, patient) in enumerate((("train", "P0"), ("val", "P1"), ("test", "P2"))):
        sections.append(
            st.datasets.synthetic(
                shape_um=(args.section_um, args.section_um),
                um_per_px=args.image_um_per_px,
                n_genes=args.genes,
                layout="st",
                seed=args.seed + 1 + i,
                tissue_seed=args.tissue_seed,
                section=name,
                patient=patient,
            )
        )
    train, val, test = sections
    for sd in sections:
        st.pp.tissue_mask(sd, "he")
    genes = st.pp.select_genes([train.tables["table"]], n_top=args.genes)
    st.pp.normalize(train.tables["table"], method="log1p_cpm")
    params = train.tables["table"].uns["stpredict"]["normalize"]["log1p_cpm"]
    for sd in (val, test):
        st.pp.normalize(sd.tables["table"], method="log1p_cpm", params=params)
    timings["data"] = round(time.perf_counter() - t, 2)
    n_spots = {n: int(sd.tables["table"].n_obs) for n, sd in zip(("train", "val", "test"), sections, strict=True)}
    print(f"data: 3 sections in {timings['data']:.1f} s; spots {n_spots}; {len(genes)} genes", flush=True)

    rows, fits = [], {}
    builders = _build_models(args, genes)
    mean_values = _mean_target([train.tables["table"]], genes, "log1p_cpm")
    for name in args.models:
        if name == "mean_map":
            model, rec = ConstantMap(genes, mean_values, um_per_px=args.um_per_px, output_stride=4), {"fit_s": 0.0}
            rec["values"] = [round(float(v), 4) for v in mean_values]
        else:
            cls, kw = builders[name]
            print(f"fitting {name} ...", flush=True)
            model, _, rec = _fit(name, cls, kw, genes, train, val, args)
        key = f"pred_{name}"
        t = time.perf_counter()
        st.tl.predict_dense(test, model, image_key="he", key_added=key, show_progress_bar=False)
        rec["predict_s"] = round(time.perf_counter() - t, 2)
        density = name == "pixnet_density"
        constant = mean_values if name == "mean_map" else None
        res = _score_spots(test, key, test.tables["table"], genes, density, "spots", constant)
        rows.append({"model": name, "evaluation": "measured spots (100 um)", **_summary(res)})
        scales = st.tl.evaluate_across_scales(
            test, key, bin_sizes=list(args.bin_sizes), truth_map_key="truth", genes=genes,
            aggregate_kwargs={"force": True, "allow_subpixel": True},
        )  # fmt: skip
        if constant is not None:
            # Through the pipeline the constant map scores a PCC on rounding noise (see _exact_constant): keep
            # that for the record, and score the exact constant against the same truth bins.
            rec["pipeline_scales"] = scales.to_dict(orient="records")
            exact = []
            for b in args.bin_sizes:
                tb = st.tl.aggregate(test, "truth", bin_size=b, genes=genes, force=True, inplace=False)
                r = st.tl.evaluate(_exact_constant(tb, constant), tb, genes=genes)
                exact += [{"bin_size_um": b, "metric": m, "value": float(v)} for m, v in r.summary.items()]
            scales = pd.DataFrame(exact)
        for b, grp in scales.groupby("bin_size_um"):
            vals = dict(zip(grp["metric"], grp["value"], strict=True))
            rows.append(
                {
                    "model": name,
                    "evaluation": f"truth {b:g} um",
                    **{m: float(vals[m]) for m in SUMMARY[:3] if m in vals},
                }
            )
        fits[name] = rec
        print(
            f"{name}: fit {rec['fit_s']:.1f} s, predict_dense {rec['predict_s']:.1f} s, "
            f"spots pcc_m {rows[-len(args.bin_sizes) - 1]['pcc_m']:.3f}",
            flush=True,
        )
        del test.images[key]
    table = _print_table(rows, fits)
    return {
        "mode": "synthetic",
        "config": {
            "section_um": args.section_um,
            "image_um_per_px": args.image_um_per_px,
            "layout": "st (100 um spots, 200 um pitch)",
            "n_genes": len(genes),
            "genes": genes,
            "seeds": {"train": args.seed + 1, "val": args.seed + 2, "test": args.seed + 3},
            "tissue_seed": args.tissue_seed,
            "n_spots": n_spots,
            "bin_sizes_um": list(args.bin_sizes),
            "normalization": "log1p_cpm fitted on train",
        },
        "timings_s": timings,
        "fits": fits,
        "results": rows,
        "table": table,
    }


# ------------------------------------------------------------------------------------------------ her2st
def run_her2st(args: argparse.Namespace) -> dict[str, Any]:
    from PIL import Image

    import stpredict as st

    Image.MAX_IMAGE_PIXELS = None
    data_dir = Path(args.data_dir)
    train_names = [s for s in args.train.split(",") if s]
    test_names = [s for s in args.test.split(",") if s]
    val_names = [s for s in (args.val or "").split(",") if s]
    timings: dict[str, float] = {}
    t = time.perf_counter()
    read = {}
    for name in dict.fromkeys(train_names + val_names + test_names):
        read[name] = st.io.read_st(data_dir / name, section=name, patient=name[0])
    timings["read"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    for sd in read.values():
        st.pp.tissue_mask(sd, "he")
    timings["tissue_mask"] = round(time.perf_counter() - t, 2)
    genes = st.pp.select_genes([read[n].tables["table"] for n in train_names], n_top=args.genes)
    for sd in read.values():
        sd.tables["table"] = st.pp.subset_genes(sd.tables["table"], genes=genes)
    train_tables = [read[n].tables["table"] for n in train_names]
    st.pp.normalize(train_tables, method="log1p_cpm")
    params = train_tables[0].uns["stpredict"]["normalize"]["log1p_cpm"]
    for n in dict.fromkeys(val_names + test_names):
        if n not in train_names:
            st.pp.normalize(read[n].tables["table"], method="log1p_cpm", params=params)
    n_spots = {n: int(sd.tables["table"].n_obs) for n, sd in read.items()}
    print(f"read {list(read)} in {timings['read']:.1f} s; spots {n_spots}; {len(genes)} genes", flush=True)

    train = [read[n] for n in train_names]
    val = [read[n] for n in val_names] or None
    rows, fits = [], {}
    builders = _build_models(args, genes)
    mean_values = _mean_target(train_tables, genes, "log1p_cpm")
    for name in args.models:
        if name == "mean_map":
            model, rec = ConstantMap(genes, mean_values, um_per_px=args.um_per_px, output_stride=16), {"fit_s": 0.0}
        else:
            cls, kw = builders[name]
            print(f"fitting {name} ...", flush=True)
            model, _, rec = _fit(name, cls, kw, genes, train, val, args)
        rec["predict_s"] = 0.0
        for tn in test_names:
            sd = read[tn]
            key = f"pred_{name}"
            t = time.perf_counter()
            st.tl.predict_dense(sd, model, image_key="he", key_added=key, show_progress_bar=False)
            rec["predict_s"] += round(time.perf_counter() - t, 2)
            constant = mean_values if name == "mean_map" else None
            res = _score_spots(sd, key, sd.tables["table"], genes, name == "pixnet_density", "spots", constant)
            rows.append({"model": name, "evaluation": f"{tn} spots", **_summary(res)})
            del sd.images[key]
        fits[name] = rec
        print(f"{name}: fit {rec['fit_s']:.1f} s, predict_dense {rec['predict_s']:.1f} s; {rows[-1]}", flush=True)
    table = _print_table(rows, fits)
    return {
        "mode": "her2st",
        "config": {
            "data_dir": str(data_dir),
            "train": train_names,
            "val": val_names,
            "test": test_names,
            "n_genes": len(genes),
            "genes": genes,
            "gene_selection": "top by mean on the training sections (st.pp.select_genes method='mean')",
            "normalization": "log1p_cpm fitted on the training sections",
            "n_spots": n_spots,
        },
        "timings_s": timings,
        "fits": fits,
        "results": rows,
        "table": table,
    }


# ------------------------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("synthetic", "her2st"))
    p.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/models[_her2st].json)")
    p.add_argument("--quick", action="store_true", help="a ~2-minute smoke run (small sections, few epochs)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--genes", type=int, default=None, help="genes (synthetic: 16; her2st: 50)")
    p.add_argument("--seed", type=int, default=0)
    # synthetic
    p.add_argument("--section-um", type=float, default=None, help="synthetic section side (2000; quick 1000)")
    p.add_argument("--image-um-per-px", type=float, default=1.0, help="synthetic H&E resolution")
    p.add_argument("--tissue-seed", type=int, default=7)
    p.add_argument("--bin-sizes", default="8,16,55")
    # her2st
    p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data" / "her2st"))
    p.add_argument("--train", default="C2,C3")
    p.add_argument("--val", default="", help="validation sections (default none: best epoch by training loss)")
    p.add_argument("--test", default="C4")
    # models and training
    p.add_argument("--um-per-px", type=float, default=2.0, help="model resolution")
    p.add_argument("--tile-size", type=int, default=None, help="PixNet tile (192)")
    p.add_argument("--output-stride", type=int, default=2, help="PixNet output stride")
    p.add_argument(
        "--decoder-channels",
        default="32,64,128,192,256,320",
        help="PixNet decoder channels at strides 1, 2, 4, ... (six reach the encoder's stride-32 stage)",
    )
    p.add_argument("--crop-um", type=float, default=128.0, help="SpotCNN / EmbeddingRidge crop side")
    p.add_argument("--stride-um", type=float, default=None, help="baseline map spacing (synthetic 16, her2st 100)")
    p.add_argument("--n-components", type=int, default=50)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--tiles-per-epoch", type=int, default=None)
    p.add_argument("--crops-per-epoch", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--density-loss", choices=("poisson", "nb"), default="poisson", help="loss of pixnet_density")
    p.add_argument("--patience", type=int, default=100)
    p.add_argument("--max-units", type=int, default=20000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)

    her = args.mode == "her2st"
    defaults = {
        "genes": 50 if her else 16,
        "section_um": 1000.0 if args.quick else 2000.0,
        "tile_size": 192,
        "stride_um": 100.0 if her else 16.0,
        "epochs": (2 if args.quick else (6 if her else 8)),
        "tiles_per_epoch": 16 if args.quick else 48,
        "crops_per_epoch": 64 if args.quick else (384 if her else 256),
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.models = [m for m in args.models.split(",") if m]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    args.bin_sizes = [float(b) for b in args.bin_sizes.split(",")]
    args.decoder_channels = [int(c) for c in args.decoder_channels.split(",")]
    if args.out is None:
        args.out = REPO / "benchmarks" / "results" / ("models_her2st.json" if her else "models.json")

    import torch

    import stpredict as st

    if args.threads:
        st.settings.n_jobs = args.threads  # sizes torch, numba and dask (each fit and predict_dense applies it)
    t0 = time.perf_counter()
    result = run_her2st(args) if her else run_synthetic(args)
    result["total_s"] = round(time.perf_counter() - t0, 2)
    result["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    result["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_avg_at_end": os.getloadavg(),
    }
    print(f"\ntotal {result['total_s']:.1f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
