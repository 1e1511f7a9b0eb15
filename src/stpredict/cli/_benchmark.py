"""``stpredict benchmark``: PixNet against a baseline on synthetic sections with known expression."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from stpredict._errors import InputError

from ._common import EXIT_OK, Progress, add_command
from ._store import write_json

if TYPE_CHECKING:
    import argparse

    import pandas as pd
    from spatialdata import SpatialData

    from stpredict._demo import DemoConfig

__all__ = ["MODELS", "add_parser", "run"]

#: The models the benchmark compares, by their command-line names.
MODELS = ("pixnet", "embedding_ridge")

DESCRIPTION = """\
Benchmark PixNet against a baseline on synthetic data, where the true expression is known. Three
synthetic H&E sections of one tissue (train, validation, held-out test) are measured by Visium-like
55 µm spots. Each model is trained on the training section's spot counts, predicts a dense map of the
test section (st.tl.predict_dense), and is scored by gene-wise PCC: against the measured test spots
(normalised log1p CPM), and against the true expression density binned at several sizes in µm.

Models: pixnet (PixNet, density mode, Poisson loss; as `stpredict demo`) and embedding_ridge (frozen
EfficientNet-Lite0 embeddings of 64 µm crops → PCA → ridge, a HEST-like baseline). PCC@M/S/F are the
mean, median and first quartile of the gene-wise PCC; higher is better. Nothing is written unless --json.

For the full benchmark with more models and real data, see benchmarks/bench_models.py in the repository.

Exit status: 0 done; 2 bad options; 1 unexpected failure; 130 interrupted."""

EXAMPLES = """\
  stpredict benchmark --quick                         # about a minute on two CPU cores
  stpredict benchmark --json results/benchmark.json   # the default sizes, a few minutes
  stpredict benchmark --models pixnet --max-epochs 40 --seed 1"""


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``benchmark`` on the sub-command parser ``sub``."""
    p = add_command(
        sub,
        "benchmark",
        summary="benchmark PixNet against a baseline on synthetic data; print a table",
        description=DESCRIPTION,
        examples=EXAMPLES,
        parents=parents,
    )
    p.add_argument("--quick", action="store_true", help="smaller sections and a short training, for smoke tests")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated models to run, of {', '.join(MODELS)}")
    p.add_argument("--section-um", type=float, metavar="UM", help="side of each synthetic section in µm")
    p.add_argument("--max-epochs", type=int, metavar="N", help="PixNet's training epochs")
    p.add_argument("--genes", type=int, metavar="N", help="genes simulated and predicted")
    p.add_argument(
        "--bin-size", type=float, action="append", metavar="UM", help="bin sizes for the truth (repeat; default 16, 55)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the tissue, the models and the training")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--json", metavar="FILE", help="write the settings, results and timings as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> DemoConfig:
    from stpredict._demo import DemoConfig

    config = DemoConfig(seed=args.seed, bin_sizes=(16.0, 55.0))
    if args.quick:
        config.section_um, config.n_genes, config.max_epochs, config.tiles_per_epoch = 900.0, 8, 2, 16
    if args.section_um is not None:
        config.section_um = args.section_um
    if args.max_epochs is not None:
        config.max_epochs = args.max_epochs
    if args.genes is not None:
        config.n_genes = args.genes
    if args.bin_size:
        config.bin_sizes = tuple(args.bin_size)
    if config.section_um < 300 or config.max_epochs < 1 or config.n_genes < 2 or min(config.bin_sizes) <= 0:
        msg = "--section-um must be at least 300, --max-epochs at least 1, --genes at least 2, --bin-size positive."
        raise InputError(msg)
    return config


def _models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        msg = f"--models: unknown model(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(MODELS)}."
        raise InputError(msg)
    return list(dict.fromkeys(names))


def _build(name: str, genes: list[str], config: DemoConfig) -> Any:
    import stpredict as st

    if name == "pixnet":
        from stpredict._demo import demo_pixnet

        return demo_pixnet(genes, config, value_kind="density")
    return st.models.EmbeddingRidge(
        genes, pretrained="efficientnet-lite0", um_per_px=config.model_um_per_px, crop_um=64.0, stride_um=16.0
    )


def _fit(name: str, model: Any, train: SpatialData, val: SpatialData, config: DemoConfig, kw: dict[str, Any]) -> None:
    if name == "pixnet":
        model.fit(
            train,
            validation_data=val,
            loss="poisson",
            max_epochs=config.max_epochs,
            tiles_per_epoch=config.tiles_per_epoch,
            batch_size=config.batch_size,
            lr=config.lr,
            seed=config.seed,
            **kw,
        )
    else:
        model.fit(train, seed=config.seed, device=kw["device"], show_progress_bar=kw["show_progress_bar"])


def _score(
    name: str, test: SpatialData, map_key: str, genes: list[str], params: dict, config: DemoConfig
) -> pd.DataFrame:
    """Tidy rows (evaluation, bin_size_um, metric, value) of one model's map."""
    import pandas as pd

    import stpredict as st

    pred = st.tl.aggregate(test, map_key, shapes_key="spots", inplace=False)
    truth = test.tables["table"]
    if name == "pixnet":  # expected counts per spot, normalised like the measured counts (training parameters)
        spots = st.tl.evaluate(pred, truth, normalize=params, genes=genes, inplace=False)
    else:
        spots = st.tl.evaluate(pred, truth, truth_layer="log1p_cpm", genes=genes, inplace=False)
    rows = [
        {"evaluation": "measured 55 um spots", "bin_size_um": 55.0, "metric": k, "value": float(v)}
        for k, v in spots.summary.items()
    ]
    scales = st.tl.evaluate_across_scales(
        test, map_key, bin_sizes=list(config.bin_sizes), truth_map_key="truth", genes=genes,
        aggregate_kwargs={"force": True},
    )  # fmt: skip
    scales = scales[scales["metric"].str.startswith(("pcc", "spearman"))].assign(evaluation="ground-truth density")
    frame = pd.concat([pd.DataFrame(rows), scales[["evaluation", "bin_size_um", "metric", "value"]]], ignore_index=True)
    return frame.assign(model=name)


def format_table(results: pd.DataFrame, metrics: tuple[str, ...] = ("pcc_m", "pcc_s")) -> str:
    """Rows = (evaluation, bin size), columns = (metric, model)."""
    table = results[results["metric"].isin(metrics)].pivot_table(
        index=["evaluation", "bin_size_um"], columns=["metric", "model"], values="value"
    )
    return table.round(3).to_string()


def run(args: argparse.Namespace) -> int:
    """Run ``stpredict benchmark``."""
    import pandas as pd

    import stpredict as st
    from stpredict._demo import _section

    progress = Progress("benchmark", quiet=args.quiet)
    names = _models(args.models)
    config = _config(args)
    if args.json:  # refused before the work
        from pathlib import Path

        if Path(args.json).exists() and not args.overwrite:
            write_json(args.json, {}, overwrite=False)

    with progress.stage(f"synthetic tissue: 3 sections of {config.section_um:g} µm, {config.n_genes} genes"):
        train, val, test = (
            _section(config, section, patient, config.seed + i)
            for i, (section, patient) in enumerate([("train", "P0"), ("val", "P1"), ("test", "P2")])
        )
        st.pp.tissue_mask(test, "he")
        genes = st.pp.select_genes([train.tables["table"]], n_top=config.n_genes)
        st.pp.normalize(train.tables["table"], method="log1p_cpm")
        params = train.tables["table"].uns["stpredict"]["normalize"]["log1p_cpm"]
        for sdata in (val, test):
            st.pp.normalize(sdata.tables["table"], method="log1p_cpm", params=params)

    frames, timings = [], {}
    for name in names:
        model = _build(name, genes, config)
        fit_kw = {"device": args.device, **progress.fit_kwargs()}
        t0 = time.perf_counter()
        with progress.stage(f"{name}: training"), progress.bars():
            _fit(name, model, train, val, config, fit_kw)
        t1 = time.perf_counter()
        map_key = f"he_{name}"
        with progress.stage(f"{name}: predicting the test section"), progress.bars():
            st.tl.predict_dense(
                test, model, image_key="he", key_added=map_key, device=args.device,
                show_progress_bar=progress.show_bars,
            )  # fmt: skip
        t2 = time.perf_counter()
        with progress.stage(f"{name}: scoring"):
            frames.append(_score(name, test, map_key, genes, params, config))
        timings[name] = {"fit": round(t1 - t0, 2), "predict_dense": round(t2 - t1, 2)}

    results = pd.concat(frames, ignore_index=True)
    lines = ["", "stpredict benchmark: held-out synthetic section, gene-wise PCC (higher is better)", ""]
    lines += [format_table(results), "", "timings (s):"]
    lines += [
        f"  {name:<18} fit {t['fit']:>8.1f}   predict_dense {t['predict_dense']:>8.1f}" for name, t in timings.items()
    ]
    print("\n".join(lines))
    if args.json:
        record = {
            "settings": {
                "models": names,
                "section_um": config.section_um,
                "n_genes": config.n_genes,
                "max_epochs": config.max_epochs,
                "tiles_per_epoch": config.tiles_per_epoch,
                "bin_sizes_um": list(config.bin_sizes),
                "seed": config.seed,
                "quick": bool(args.quick),
                "stpredict_version": st.__version__,
            },
            "results": [
                {**row, "value": None if pd.isna(row["value"]) else float(row["value"])}
                for row in results.to_dict(orient="records")
            ],
            "timings_s": timings,
        }
        path = write_json(args.json, record, overwrite=args.overwrite)
        print(f"\nresults: {path.resolve()}")
    return EXIT_OK
