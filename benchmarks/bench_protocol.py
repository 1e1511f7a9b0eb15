"""Patient-aware benchmark protocol on real tissue (issue 14, item 1): can it tell the dense models apart?

Usage::

    python benchmarks/bench_protocol.py her2st --seeds 3 --genes 250
    python benchmarks/bench_protocol.py her2st --seeds 3 --genes 50          # the second table
    python benchmarks/bench_protocol.py stutility_mob --seeds 3
    python benchmarks/bench_protocol.py her2st --quick                       # a few minutes: checks the script
    python benchmarks/bench_protocol.py her2st --resume                      # skip (fold, seed, model) done

Folds (every model trained on identical data, selected by the same validation section):

* her2st (patients A: A1, A2; C: C2–C5), ``heldout``: train A1, C2, C3; validate C5; test A2 and C4. Both
  patients are in training and each has one held-out section, so it measures "a new section of a known patient"
  for both (the split of issue 14, A1 + C2 + C3 instead of A1, A2, C2–C4, so that two sections are tested).
* her2st ``lopo_C``: train C2, C3, C4, validate C5 (all of patient C) → test A1, A2 (a new patient).
* her2st ``lopo_A``: train A1, A2 (all of patient A; no third section to validate on, so the best epoch is chosen
  by training loss, as ``bench_models.py`` does without ``--val``) → test C2, C3, C4, C5.
* her2st A2 is read through a registered spot grid (``_registration.py``): its shipped coordinates miss the tissue
  of its render (rotated about 5° and shifted by about three spot pitches), and every model scored ≈ 0 on it.
* stutility_mob (one mouse): ``heldout``: train MOB1, validate MOB2, test MOB3. Leave-one-patient-out is skipped:
  the three sections come from one animal. Spot diameter 100 µm (the ST array's; the data do not record it).

Models: the mean map and EmbeddingRidge with the budget flags below; SpotCNN with them and its own best schedule
from ``bench_recipe.py`` (``--spotcnn-recipe long``: cosine, best epoch by validation PCC, 12 epochs;
``base`` keeps the flags); and PixNet as a user gets it, ``st.models.PixNet(genes)`` with ``fit``'s
defaults (the recipe ``bench_recipe.py`` measured; ``--pixnet-recipe protocol`` gives it the budget flags instead,
as before 2026-12-06).

Per fold, genes are the ``--genes`` top genes by mean raw count on the fold's training sections
(``st.pp.select_genes(method="mean")``, SPEC's ``fit_on="train"``; the ST-Net convention), zero-filled where a
section lacks one, and targets are log1p CPM over those genes (``log1p_cpm`` has no fitted statistic). Each model
predicts a dense map of every test section with ``st.tl.predict_dense``, aggregated over the measured spots and
scored with ``st.tl.evaluate`` (gene-wise PCC over spots: mean / median / first quartile = PCC@M/S/F; MSE). An
undefined PCC (the mean map, a constant) counts as −1 (the published policy).

Summary: per (fold, test section, model) the mean ± sd over seeds; per pair of models the paired per-gene
difference of PCC (per-gene PCC averaged over seeds) with a Wilcoxon signed-rank p-value. A pair is a **tie** when
``|Δ PCC@M| ≤ sqrt(sd_a² + sd_b²)`` (seed noise) or ``p ≥ 0.05``.

Caching: sections are read (image decoded once into memory, pyramid built once), tissue-masked once per run, and
normalised once per fold; every seed and model reads its tiles from those arrays. EmbeddingRidge's frozen-encoder
embeddings are memoised per crop (training) and per tile batch (prediction) in memory, keyed by the encoder, the
crop geometry and the pixels, so they are computed once per section and reused across seeds, folds and genes.
A partial JSON is written after every fit; ``--resume`` skips the (fold, seed, model) entries already in it.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _protocol_uncertainty import format_ensembles, save_spot_predictions, score_ensembles, spots_dir
from _registration import registered_folder
from bench_models import ConstantMap, _build_models, _fit, _mean_target, _score_spots  # the shared model settings

#: SpotCNN's schedules (``--spotcnn-recipe``): ``long`` won ``bench_recipe.py``'s validation (spotcnn_long).
SPOTCNN_RECIPES = {"base": {}, "long": {"lr_schedule": "cosine", "select_by": "pcc", "max_epochs": 12}}
REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MODELS = ("mean_map", "embedding_ridge", "spotcnn", "pixnet")
METRICS = ("pcc_m", "pcc_s", "pcc_f", "mse")
#: Settings that change the numbers: a ``--resume`` must match them.
RESULT_KEYS = (
    "dataset", "genes", "seed", "epochs", "tiles_per_epoch", "crops_per_epoch", "batch_size", "crop_batch_size", "lr",
    "patience", "max_units", "um_per_px", "tile_size", "output_stride", "decoder_channels", "crop_um", "stride_um",
    "n_components", "quick", "map_dtype", "pixnet_recipe", "spotcnn_recipe",
)  # fmt: skip


@dataclass
class Fold:
    """One train / validation / test split of the protocol."""

    name: str
    kind: str
    train: list[str]
    val: list[str]
    test: list[str]
    note: str = ""


@dataclass
class Dataset:
    """A real dataset of the protocol: its sections, how to read them and its folds."""

    folder: str
    sections: list[str]
    folds: list[Fold]
    quick_folds: list[Fold]
    read_kwargs: dict[str, Any] = field(default_factory=dict)
    patient: dict[str, str] = field(default_factory=dict)
    skipped: str = ""
    #: Sections whose shipped spot coordinates miss the tissue: read with a registered grid (``_registration.py``).
    register: tuple[str, ...] = ()


_QUICK = "quick check of the fold loop (2 sections), not a patient split"
DATASETS = {
    "her2st": Dataset(
        folder="her2st",
        sections=["A1", "A2", "C2", "C3", "C4", "C5"],
        patient={s: s[0] for s in ("A1", "A2", "C2", "C3", "C4", "C5")},
        register=("A2",),
        folds=[
            Fold("heldout", "held-out sections of training patients", ["A1", "C2", "C3"], ["C5"], ["A2", "C4"]),
            Fold("lopo_C", "leave-one-patient-out (train C → test A)", ["C2", "C3", "C4"], ["C5"], ["A1", "A2"]),
            Fold(
                "lopo_A",
                "leave-one-patient-out (train A → test C)",
                ["A1", "A2"],
                [],
                ["C2", "C3", "C4", "C5"],
                "no validation section: best epoch by training loss",
            ),
        ],
        quick_folds=[
            Fold("quick_A1", "quick", ["A1"], [], ["A2"], _QUICK),
            Fold("quick_A2", "quick", ["A2"], [], ["A1"], _QUICK),
        ],
    ),
    "stutility_mob": Dataset(
        folder="stutility_mob",
        sections=["MOB1", "MOB2", "MOB3"],
        patient=dict.fromkeys(("MOB1", "MOB2", "MOB3"), "mouse"),
        read_kwargs={"spot_diameter_um": 100.0, "gene_symbols": "mouse_genes.tsv.gz"},
        folds=[Fold("heldout", "held-out section (one animal)", ["MOB1"], ["MOB2"], ["MOB3"])],
        quick_folds=[
            Fold("quick_MOB1", "quick", ["MOB1"], [], ["MOB2"], _QUICK),
            Fold("quick_MOB2", "quick", ["MOB2"], [], ["MOB1"], _QUICK),
        ],
        skipped="leave-one-patient-out skipped: the three sections come from one mouse",
    ),
}


# ------------------------------------------------------------------------------------------------ embedding cache
class EmbeddingCache:
    """In-memory frozen-encoder embeddings keyed by encoder, crop geometry and the SHA-1 of the pixels."""

    def __init__(self) -> None:
        self.store: dict[tuple, np.ndarray] = {}
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0

    def stats(self) -> dict[str, Any]:
        """Hits, misses, entries, megabytes held and seconds spent computing embeddings."""
        mb = sum(v.nbytes for v in self.store.values()) / 2**20
        return {"hits": self.hits, "misses": self.misses, "entries": len(self.store), "mb": round(mb, 1),
                "compute_s": round(self.seconds, 2)}  # fmt: skip


CACHE = EmbeddingCache()
#: The raw (all genes, counts) table of each section read, by ``id`` of its SpatialData; fold tables replace it.
RAW_TABLES: dict[int, Any] = {}
#: The registration record of each section read through a registered spot grid (written into the JSON).
REGISTRATIONS: dict[str, dict[str, Any]] = {}
_RIDGE_CLASS: list[type] = []


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def cached_ridge_class() -> type:
    """EmbeddingRidge whose ``embed`` (fit) and ``predict_tiles`` (predict_dense) reuse :data:`CACHE`.

    ``EmbeddingRidge`` cannot take precomputed embeddings (``fit`` embeds the crops it reads, ``predict_tiles``
    embeds every sliding window), so this subclass memoises both. The results equal the parent's: the encoder is
    frozen and deterministic, the crops of ``fit`` are not augmented, and the ridge is applied as in
    ``_predict_crops``.
    """
    if _RIDGE_CLASS:
        return _RIDGE_CLASS[0]
    import torch

    import stpredict as st
    from stpredict.models._training import normalize_tiles

    class CachedEmbeddingRidge(st.models.EmbeddingRidge):
        def _key(self, *parts: Any) -> tuple:
            return (self.encoder, self.crop_size, *parts)

        def embed(self, crops: np.ndarray, *, device: str = "auto", batch_size: int = 64) -> np.ndarray:
            keys = [self._key("crop", _digest(c)) for c in crops]
            missing = [i for i, k in enumerate(keys) if k not in CACHE.store]
            CACHE.hits += len(keys) - len(missing)
            CACHE.misses += len(missing)
            if missing:
                t = time.perf_counter()
                emb = super().embed(crops[missing], device=device, batch_size=batch_size)
                CACHE.seconds += time.perf_counter() - t
                for i, e in zip(missing, emb, strict=True):
                    CACHE.store[keys[i]] = e
            return np.stack([CACHE.store[k] for k in keys]) if keys else super().embed(crops)

        def predict_tiles(self, tiles: np.ndarray, *, device: str = "auto", batch_size: int = 256) -> np.ndarray:
            from stpredict.models._device import resolve_device

            tiles = np.asarray(tiles)
            b, _, h, w = tiles.shape
            n_y, n_x = h // self.output_stride, w // self.output_stride
            key = self._key("tiles", self.output_stride, tiles.shape, _digest(tiles))
            dev = resolve_device(device)
            self._to(dev)
            if key in CACHE.store:
                CACHE.hits += 1
            else:
                CACHE.misses += 1
                t = time.perf_counter()
                x = normalize_tiles(torch.from_numpy(np.ascontiguousarray(tiles)).to(dev))
                with torch.inference_mode():
                    crops = self._windows(x)
                    emb = [self.module(crops[i : i + batch_size]).float() for i in range(0, len(crops), batch_size)]
                CACHE.store[key] = torch.cat(emb).cpu().numpy()
                CACHE.seconds += time.perf_counter() - t
            r = {k: v.numpy() for k, v in self.ridge.items()}
            out = ((CACHE.store[key] - r["mean"]) @ r["proj"]) @ r["coef"] + r["intercept"]
            return np.ascontiguousarray(out.reshape(b, n_y, n_x, -1).transpose(0, 3, 1, 2), dtype=np.float32)

    _RIDGE_CLASS.append(CachedEmbeddingRidge)
    return CachedEmbeddingRidge


# ------------------------------------------------------------------------------------------------ data
def read_sections(ds: Dataset, names: list[str], timings: dict[str, float]) -> dict[str, Any]:
    """Read and tissue-mask each section once; returns ``{name: SpatialData}`` with the raw table kept aside."""
    import stpredict as st

    kwargs = dict(ds.read_kwargs)
    if "gene_symbols" in kwargs:
        kwargs["gene_symbols"] = DATA / ds.folder / kwargs["gene_symbols"]
    folders = {n: DATA / ds.folder / n for n in names}
    t = time.perf_counter()
    for n in (n for n in names if n in ds.register):
        folders[n], REGISTRATIONS[n] = registered_folder(folders[n], REPO / ".cache" / "registered" / ds.folder)
        r = REGISTRATIONS[n]
        print(f"{n}: spot grid registered to the tissue (IoU {r['iou_shipped']:.3f} → {r['iou_registered']:.3f}, "
              f"rotation {r['params']['rotation_deg']:.1f}°, spots moved {r['shift_px_median']:.0f} px median)",
              flush=True)  # fmt: skip
    timings["register"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    out = {n: st.io.read_st(folders[n], section=n, patient=ds.patient.get(n), **kwargs) for n in names}
    timings["read"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    for sd in out.values():
        st.pp.tissue_mask(sd, "he")
        RAW_TABLES[id(sd)] = sd.tables["table"]
    timings["tissue_mask"] = round(time.perf_counter() - t, 2)
    return out


def fold_tables(fold: Fold, sections: dict[str, Any], n_genes: int) -> tuple[list[str], dict[str, Any]]:
    """The fold's genes (top by mean on its training sections) and each section's table, log1p CPM over them."""
    import stpredict as st

    raw = {n: RAW_TABLES[id(sections[n])] for n in dict.fromkeys(fold.train + fold.val + fold.test)}
    genes = st.pp.select_genes({n: raw[n] for n in fold.train}, n_top=n_genes, method="mean")
    tables = {}
    for n, table in raw.items():
        sub = st.pp.subset_genes(table, genes=genes)
        st.pp.normalize(sub, method="log1p_cpm")
        tables[n] = sub
    return genes, tables


# ------------------------------------------------------------------------------------------------ one entry
def _fit_pixnet_default(genes: list[str], train: list[Any], val: list[Any] | None, seed: int) -> tuple[Any, dict]:
    """PixNet as a user gets it: ``st.models.PixNet(genes)`` and ``fit``'s defaults (``--pixnet-recipe default``)."""
    import stpredict as st

    t = time.perf_counter()
    model = st.models.PixNet(genes, seed=seed)
    model.fit(train, validation_data=val, target_layer="log1p_cpm", seed=seed, show_progress_bar=False)
    hist = model.fit_history
    return model, {
        "model_kwargs": "defaults", "fit_kwargs": dict(model.fit_params), "fit_s": round(time.perf_counter() - t, 2),
        "best_epoch": hist["best_epoch"], "epochs_run": len(hist["train_loss"]),
        "train_loss": [round(float(x), 4) for x in hist["train_loss"]],
        "val_loss": [round(float(x), 4) for x in hist["val_loss"]],
        "val_pcc": [round(float(x), 4) for x in hist.get("val_pcc", [])],
    }  # fmt: skip


def run_entry(
    name: str, fold: Fold, seed: int, genes: list[str], sections: dict[str, Any], tables: dict[str, Any],
    args: argparse.Namespace, tmp: Path,
) -> dict[str, Any]:  # fmt: skip
    """Fit one model on one fold with one seed, predict and score every test section of the fold."""
    import stpredict as st

    for n, t in tables.items():
        sections[n].tables["table"] = t
    train = [sections[n] for n in fold.train]
    val = [sections[n] for n in fold.val] or None
    ns = argparse.Namespace(**{**vars(args), "seed": args.seed + seed})
    mean_values = _mean_target([tables[n] for n in fold.train], genes, "log1p_cpm")
    if name == "mean_map":
        model, rec = ConstantMap(genes, mean_values, um_per_px=args.um_per_px, output_stride=16), {"fit_s": 0.0}
    elif name == "pixnet" and args.pixnet_recipe == "default":
        model, rec = _fit_pixnet_default(genes, train, val, ns.seed)
    else:
        cls, kw = _build_models(ns, genes)[name]
        if name == "embedding_ridge":
            cls = cached_ridge_class()
        extra = SPOTCNN_RECIPES[args.spotcnn_recipe] if name == "spotcnn" else None
        model, _, rec = _fit(name, cls, kw, genes, train, val, ns, extra)
    rec.pop("values", None)
    tests = {}
    for tn in fold.test:
        sd, key = sections[tn], f"pred_{name}"
        t = time.perf_counter()
        st.tl.predict_dense(
            sd, model, image_key="he", key_added=key, dtype=args.map_dtype, tmp_dir=tmp, show_progress_bar=False
        )
        predict_s = time.perf_counter() - t
        t = time.perf_counter()
        constant = mean_values if name == "mean_map" else None
        spots = st.tl.aggregate(sd, key, shapes_key="spots", genes=genes, force=True, inplace=False)
        res = _score_spots(sd, key, tables[tn], genes, False, "spots", constant, pred=spots)
        score_s = time.perf_counter() - t
        if name != "mean_map":  # the seed ensemble's uncertainty (_protocol_uncertainty)
            save_spot_predictions(spots_dir(args.out), fold.name, name, tn, seed, spots, genes)
        del sd.images[key]
        shutil.rmtree(tmp / key, ignore_errors=True)
        pg = res.per_gene
        tests[tn] = {
            **{m: float(res.summary[m]) for m in METRICS},
            "n_spots": int(res.params.get("n_units", len(tables[tn]))),
            "predict_s": round(predict_s, 2),
            "score_s": round(score_s, 2),
            "per_gene_pcc": np.round(np.nan_to_num(pg["pcc"].to_numpy(), nan=-1.0), 5).tolist(),
            "per_gene_mse": np.round(pg["mse"].to_numpy(), 5).tolist(),
        }
    return {"fold": fold.name, "seed": seed, "model": name, "genes": genes, "fit": rec, "tests": tests}


# ------------------------------------------------------------------------------------------------ summary
def summarise(entries: list[dict[str, Any]], models: list[str]) -> tuple[list[dict], list[dict]]:
    """Mean ± sd over seeds per (fold, test, model), and the paired per-gene comparisons of every model pair."""
    from scipy.stats import wilcoxon

    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for e in entries:
        for tn, r in e["tests"].items():
            groups.setdefault((e["fold"], tn), {}).setdefault(e["model"], []).append(r)
    summary, comparisons = [], []
    for (fold, tn), by_model in groups.items():
        stats = {}
        for m in [m for m in models if m in by_model]:
            runs = by_model[m]
            rec = {"fold": fold, "test": tn, "model": m, "n_seeds": len(runs)}
            for k in METRICS:
                v = np.array([r[k] for r in runs], dtype=float)
                rec[k], rec[f"{k}_sd"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")
            rec["pcc_gene"] = np.mean([r["per_gene_pcc"] for r in runs], axis=0)
            rec["mse_gene"] = np.mean([r["per_gene_mse"] for r in runs], axis=0)
            stats[m] = rec
        for a, b in itertools.combinations(list(stats), 2):
            sa, sb = stats[a], stats[b]
            diff = sa["pcc_gene"] - sb["pcc_gene"]
            p = float(wilcoxon(sa["pcc_gene"], sb["pcc_gene"]).pvalue) if np.any(diff != 0) else 1.0
            dmse = sa["mse_gene"] - sb["mse_gene"]
            p_mse = float(wilcoxon(sa["mse_gene"], sb["mse_gene"]).pvalue) if np.any(dmse != 0) else 1.0
            delta = sa["pcc_m"] - sb["pcc_m"]
            noise = math.sqrt(sa["pcc_m_sd"] ** 2 + sb["pcc_m_sd"] ** 2)
            tie = p >= 0.05 or (math.isfinite(noise) and abs(delta) <= noise)
            verdict = "tie" if tie else (f"{a} better" if delta > 0 else f"{b} better")
            comparisons.append(
                {"fold": fold, "test": tn, "a": a, "b": b, "delta_pcc_m": delta, "seed_noise": noise,
                 "wilcoxon_p": p, "genes_a_higher": int((diff > 0).sum()), "n_genes": int(len(diff)),
                 "verdict": verdict + ("" if math.isfinite(noise) else " (1 seed: p only)"),
                 "delta_mse": sa["mse"] - sb["mse"], "wilcoxon_p_mse": p_mse}
            )  # fmt: skip
        summary += [{k: v for k, v in s.items() if not k.endswith("_gene")} for s in stats.values()]
    return summary, comparisons


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.3f}" if not math.isfinite(sd) else f"{mean:.3f}±{sd:.3f}"


def format_tables(summary: list[dict], comparisons: list[dict], entries: list[dict], header: str) -> str:
    """The printed report: metrics per (fold, test section), pairwise verdicts, wall times."""
    lines = [header]
    for fold, tn in dict.fromkeys((s["fold"], s["test"]) for s in summary):
        rows = [s for s in summary if (s["fold"], s["test"]) == (fold, tn)]
        lines.append(f"\n[{fold}] test {tn}  (mean ± sd over {max(r['n_seeds'] for r in rows)} seed(s))")
        lines.append(f"  {'model':<16}" + "".join(f"{m:>15}" for m in METRICS))
        lines += [f"  {r['model']:<16}" + "".join(f"{_fmt(r[m], r[m + '_sd']):>15}" for m in METRICS) for r in rows]
        for c in (c for c in comparisons if (c["fold"], c["test"]) == (fold, tn)):
            lines.append(
                f"    {c['a']:>15} vs {c['b']:<15} Δ PCC@M {c['delta_pcc_m']:+.3f} (noise {c['seed_noise']:.3f}) "
                f"genes {c['genes_a_higher']:>3}/{c['n_genes']} p={c['wilcoxon_p']:.2g}  Δ MSE {c['delta_mse']:+.3f} "
                f"(p={c['wilcoxon_p_mse']:.2g})  → {c['verdict']}"
            )
    lines.append("\nwall time (s), mean over seeds: fit / predict_dense per test section")
    for fold, model in dict.fromkeys((e["fold"], e["model"]) for e in entries):
        es = [e for e in entries if (e["fold"], e["model"]) == (fold, model)]
        pred = np.mean([np.mean([t["predict_s"] for t in e["tests"].values()]) for e in es])
        epochs = [e["fit"].get("epochs_run") or "-" for e in es]
        lines.append(f"  {fold:<10} {model:<16} fit {np.mean([e['fit']['fit_s'] for e in es]):8.1f}"
                     f"   predict {pred:7.1f}   epochs {epochs}")  # fmt: skip
    text = "\n".join(lines)
    print(text, flush=True)
    return text


# ------------------------------------------------------------------------------------------------ run
def _machine() -> dict[str, Any]:
    import torch

    import stpredict as st

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "stpredict": getattr(st, "__version__", None),
        "load_avg": os.getloadavg(),
    }


def _write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, path)


def _load_resume(path: Path, config: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Entries of an earlier run in ``path`` and the record of its runs (refused when its settings differ)."""
    if not path.exists():
        return [], []
    old = json.loads(path.read_text())
    before = old.get("config", {})
    diff = {k: (before.get(k), config[k]) for k in RESULT_KEYS if before.get(k) != config[k]}
    if diff:
        sys.exit(f"--resume: {path} was written with other settings {diff} (old, new); "
                 "rerun with the same flags, or pass another --out to start afresh.")  # fmt: skip
    runs = [*old.get("previous_runs", []), {k: old.get(k) for k in ("command", "machine", "timings_s", "partial")}]
    return list(old.get("entries", [])), runs


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the protocol for ``args.dataset`` and write ``args.out`` (partial after every fit)."""
    ds = DATASETS[args.dataset]
    folds = ds.quick_folds if args.quick else ds.folds
    if args.folds:
        folds = [f for f in folds if f.name in args.folds]
    config = {k: getattr(args, k) for k in RESULT_KEYS}
    config |= {
        "models": args.models, "seeds": args.seeds, "folds": [asdict(f) for f in folds], "skipped": ds.skipped,
        "gene_selection": "top --genes by mean raw count on each fold's training sections (select_genes 'mean')",
        "normalization": "log1p CPM over the fold's genes (target_sum 1e4; no fitted statistic)",
        "scoring": "predict_dense → aggregate over measured spots → evaluate vs log1p CPM; NaN PCC → −1",
        "tie_rule": "|Δ PCC@M| ≤ sqrt(sd_a² + sd_b²) or Wilcoxon p ≥ 0.05 (per-gene PCC averaged over seeds)",
        "model_seed": "--seed + seed index",
    }  # fmt: skip
    entries, previous = _load_resume(args.out, config) if args.resume else ([], [])
    done = {(e["fold"], e["seed"], e["model"]) for e in entries}
    timings: dict[str, Any] = {}
    names = list(dict.fromkeys(n for f in folds for n in f.train + f.val + f.test))
    t0 = time.perf_counter()
    sections = read_sections(ds, names, timings)
    spots = {n: int(sd.tables["table"].n_obs) for n, sd in sections.items()}
    print(f"read {names}: {timings['read']:.1f} s, tissue masks {timings['tissue_mask']:.1f} s; spots {spots}",
          flush=True)  # fmt: skip
    t = time.perf_counter()
    per_fold = {f.name: fold_tables(f, sections, args.genes) for f in folds}
    timings["normalise_s"] = round(time.perf_counter() - t, 2)
    result = {"benchmark": "protocol (issue 14 item 1)", "partial": True, "config": config, "n_spots": spots,
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": _machine(),
              "timings_s": timings, "registration": REGISTRATIONS, "previous_runs": previous,
              "entries": entries}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(prefix="bench_protocol_"))
    try:
        for seed, fold, name in itertools.product(range(args.seeds), folds, args.models):
            if (fold.name, seed, name) in done:
                print(f"[{fold.name} seed {seed}] {name}: in {args.out}, skipped (--resume)", flush=True)
                continue
            genes, tables = per_fold[fold.name]
            e = run_entry(name, fold, seed, genes, sections, tables, args, tmp)
            entries.append(e)
            scores = "  ".join(f"{tn} pcc_m {r['pcc_m']:.3f}" for tn, r in e["tests"].items())
            pred = sum(r["predict_s"] for r in e["tests"].values())
            print(f"[{fold.name} seed {seed}] {name:<16} fit {e['fit']['fit_s']:7.1f} s  predict {pred:6.1f} s  "
                  f"{scores}", flush=True)  # fmt: skip
            timings["embedding_cache"] = CACHE.stats()
            timings["elapsed"] = round(time.perf_counter() - t0, 2)
            _write(args.out, result)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary, comparisons = summarise(entries, args.models)
    header = (f"{args.dataset}: {args.genes} genes, {args.seeds} seed(s), models {args.models}"
              + (f"; {ds.skipped}" if ds.skipped and not args.quick else ""))  # fmt: skip
    print()
    ensembles = score_ensembles(
        spots_dir(args.out), entries, {f.name: {tn: per_fold[f.name][1][tn] for tn in f.test} for f in folds}
    )
    ensemble_table = format_ensembles(ensembles)
    print(ensemble_table, flush=True)
    result["table"] = format_tables(summary, comparisons, entries, header) + "\n" + ensemble_table
    result |= {"partial": False, "summary": summary, "comparisons": comparisons, "ensembles": ensembles}
    timings["total"] = round(time.perf_counter() - t0, 2)
    timings["embedding_cache"] = CACHE.stats()
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    _write(args.out, result)
    print(f"\ntotal {timings['total']:.1f} s; embedding cache {CACHE.stats()}\nwrote {args.out}", flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, fill the budget defaults and run the protocol."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", choices=tuple(DATASETS))
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/protocol_<dataset>.json)")
    p.add_argument("--quick", action="store_true", help="a few minutes: 2 sections, 1 seed, tiny epochs")
    p.add_argument("--resume", action="store_true", help="skip the (fold, seed, model) entries already in --out")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--folds", default="", help="comma-separated subset of the dataset's folds (default all)")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3; quick 1)")
    p.add_argument("--seed", type=int, default=0, help="base seed")
    p.add_argument("--genes", type=int, default=None, help="genes per fold (250; quick 50)")
    p.add_argument("--epochs", type=int, default=None, help="max epochs of PixNet and SpotCNN (6; quick 1)")
    p.add_argument("--tiles-per-epoch", type=int, default=None, help="PixNet tiles per epoch (48; quick 4)")
    p.add_argument("--crops-per-epoch", type=int, default=None, help="SpotCNN crops per epoch (384; quick 32)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--crop-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--patience", type=int, default=100)
    p.add_argument("--max-units", type=int, default=None, help="EmbeddingRidge units (20000; quick 300)")
    p.add_argument("--um-per-px", type=float, default=None, help="model resolution (2; quick 4)")
    p.add_argument("--tile-size", type=int, default=192, help="PixNet tile")
    p.add_argument("--output-stride", type=int, default=2, help="PixNet output stride")
    p.add_argument("--decoder-channels", default="32,64,128,192,256,320")
    p.add_argument("--crop-um", type=float, default=128.0, help="SpotCNN / EmbeddingRidge crop side")
    p.add_argument("--stride-um", type=float, default=100.0, help="SpotCNN / EmbeddingRidge map spacing")
    p.add_argument("--n-components", type=int, default=50)
    p.add_argument("--map-dtype", choices=("float32", "float16"), default="float32", help="predict_dense storage")
    p.add_argument("--threads", type=int, default=None, help="torch/numba threads (default: the usable cores)")
    p.add_argument(
        "--pixnet-recipe",
        choices=("default", "protocol"),
        default="default",
        help="PixNet as st.models.PixNet(genes) + fit's defaults (the measured recipe), or with the protocol's "
        "budget flags above (--um-per-px, --epochs, ..., as SpotCNN)",
    )
    p.add_argument(
        "--spotcnn-recipe",
        choices=tuple(SPOTCNN_RECIPES),
        default=None,
        help="SpotCNN with the budget flags (base; quick's default) or its validation-best schedule from "
        "bench_recipe.py (long, the default: cosine, best epoch by validation PCC, 12 epochs)",
    )
    args = p.parse_args(argv)
    q = args.quick
    defaults = {
        "seeds": 1 if q else 3,
        "genes": 50 if q else 250,
        "epochs": 1 if q else 6,
        "tiles_per_epoch": 4 if q else 48,
        "crops_per_epoch": 32 if q else 384,
        "max_units": 300 if q else 20000,
        "spotcnn_recipe": "base" if q else "long",
        "um_per_px": 4.0 if q else 2.0,  # quick: 4x fewer pixels to predict (it checks the script, not the models)
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.models = [m for m in args.models.split(",") if m]
    if set(args.models) - set(MODELS):
        p.error(f"unknown models {sorted(set(args.models) - set(MODELS))}; choose from {MODELS}")
    args.folds = [f for f in args.folds.split(",") if f]
    known = [f.name for f in (DATASETS[args.dataset].quick_folds if q else DATASETS[args.dataset].folds)]
    if set(args.folds) - set(known):
        p.error(f"unknown folds {sorted(set(args.folds) - set(known))}; choose from {known}")
    args.decoder_channels = [int(c) for c in args.decoder_channels.split(",")]
    args.density_loss = "poisson"  # read by bench_models._fit for pixnet_density only
    if args.out is None:
        suffix = ("_quick" if q else "") + ("" if args.genes == (50 if q else 250) else f"_{args.genes}genes")
        args.out = REPO / "benchmarks" / "results" / f"protocol_{args.dataset}{suffix}.json"
    args.out.parent.mkdir(parents=True, exist_ok=True)

    import stpredict as st

    st.settings.show_progress_bar = False
    if args.threads:
        st.settings.n_jobs = args.threads
    run(args)


if __name__ == "__main__":
    main()
