"""Benchmark: does PixNet's training loop keep up with the model? ``fit`` throughput against bare optimizer steps.

Run ``python benchmarks/bench_fit_throughput.py`` (a few minutes on two cores) or ``--quick`` (seconds, checks the
script, not a measurement). The workload is the demo's training (``stpredict demo``, built by ``_demo_training`` of
``benchmarks/bench_load.py``): PixNet with a frozen EfficientNet-lite0 encoder, 128 px tiles at 2 µm/px, batches
of 8, a Poisson loss on Visium-like spots, without validation (only the training loop is measured). Cases:

* **fit** (``num_workers`` 0, 1, 2): ``model.fit(train, ...)`` on ``epochs × tiles`` tiles, timed as a whole call
  and, by a Lightning callback, as the training loop alone (first batch to last; the rest is set-up: sections,
  trainer). The callback also sums the time inside each training step; the loop minus that is the time the loop
  waited for data (and Lightning's epoch bookkeeping).
* **bare**: the same network in the same training plan (LightningModule), the same batch size and loss; the batches
  that fit would see (same dataset, seed, tiles, footprints and augmentation) are drawn once into memory, then
  timed optimizer steps (zero_grad, forward, loss, backward, step) over the same number of tiles.

Runs interleave (fit 0, bare, fit 1, bare, fit 2, bare, ... ``--repeats`` times) so that machine noise hits both;
medians are reported, with overhead = fit time / bare time − 1 (target ≤ 25 %). Drawing the bare batches wraps the
dataset and times each part of ``TileDataset.__getitem__`` per tile (unit draw, window read and resampling,
units inside, flips/rotations, stain jitter, footprints) and the collate per batch. JSON goes to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import _demo_training  # the demo's model, training section and fit kwargs

TARGET = 0.25


# ------------------------------------------------------------------------------------------------ set-up
def setup(epochs: int, tiles: int, quick: bool) -> tuple[Any, Any, dict[str, Any]]:
    """The demo's model, training section and fit kwargs: ``epochs × tiles`` tiles on CPU, no validation."""
    model, train, fit_kwargs = _demo_training(quick, epochs)
    fit_kwargs.pop("validation_data")
    # On CPU, as the bare case runs (a GPU run would compare a bf16 CUDA fit with CPU steps).
    fit_kwargs.update(max_epochs=epochs, tiles_per_epoch=tiles, show_progress_bar=False, device="cpu")
    return model, train, fit_kwargs


def training_dataset(model: Any, train: Any, fit_kwargs: dict[str, Any]) -> Any:
    """The ``TileDataset`` that ``fit`` builds for these arguments (same sections, seed, augmentation)."""
    from stpredict.models._data import TileDataset, build_sections

    sections = build_sections(
        train,
        genes=list(model.var_names),
        image_key="he",
        table_keys=["table"],
        shapes_key=None,
        space="counts",
        target_layer=None,
    )
    return TileDataset(
        sections,
        model_um_per_px=model.um_per_px,
        tile_size=model.tile_size,
        output_stride=model.output_stride,
        max_units_per_tile=2048,
        n_tiles=fit_kwargs["tiles_per_epoch"],
        seed=fit_kwargs["seed"],
        augment=True,
    )


@contextlib.contextmanager
def profiled(dataset: Any, seconds: dict[str, float]) -> Iterator[None]:
    """Add the time of each part of ``dataset.__getitem__`` to ``seconds`` while inside (wrappers, then restored)."""
    import torch

    from stpredict.models._data import _datasets

    def timed(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - t0

        return wrapper

    functional = torch.nn.functional
    patches = [
        (_datasets, "read_window"),
        (_datasets, "augment_geometry"),
        (_datasets, "hed_jitter"),
        (_datasets, "footprint_weights"),
        (functional, "interpolate"),  # the resampling inside read_window
        (dataset, "_inside"),
        (dataset.sampler, "draw"),
    ]
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name in patches]
    for obj, name in patches:
        setattr(obj, name, timed(name, getattr(obj, name)))
    try:
        yield
    finally:
        for obj, name, old in saved:
            if old is None:
                delattr(obj, name)  # an instance attribute shadowing the class's method
            else:
                setattr(obj, name, old)


def draw_batches(dataset: Any, epochs: int, batch_size: int) -> tuple[list[Any], dict[str, Any]]:
    """Every batch fit sees (epoch by epoch, in order), and the per-tile cost of each part of the data pipeline."""
    from stpredict.models._data import EpochSampler, collate_tiles

    seconds: dict[str, float] = defaultdict(float)
    batches, n = [], 0
    sampler = EpochSampler(len(dataset))
    with profiled(dataset, seconds):
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            indices = list(sampler)
            for start in range(0, len(indices), batch_size):
                items = []
                for index in indices[start : start + batch_size]:
                    t0 = time.perf_counter()
                    items.append(dataset[index])
                    seconds["getitem"] += time.perf_counter() - t0
                t0 = time.perf_counter()
                batches.append(collate_tiles(items))
                seconds["collate"] += time.perf_counter() - t0
                n += len(items)
    ms = defaultdict(float, {k: 1e3 * v / n for k, v in seconds.items()})  # a part never called took 0
    split = {
        "unit draw": ms["draw"],
        "window read (dask)": ms["read_window"] - ms["interpolate"],
        "resampling": ms["interpolate"],
        "units inside": ms["_inside"],
        "flips/rotations": ms["augment_geometry"],
        "stain jitter": ms["hed_jitter"],
        "footprints": ms["footprint_weights"],
    }
    split["rest of __getitem__"] = ms["getitem"] - sum(split.values())
    split["collate (per tile)"] = ms["collate"]
    return batches, {"tiles": n, "ms_per_tile": split, "total_ms_per_tile": ms["getitem"] + ms["collate"]}


# ------------------------------------------------------------------------------------------------ cases
def run_fit(model: Any, train: Any, fit_kwargs: dict[str, Any], num_workers: int) -> dict[str, float]:
    """Time ``model.fit`` as a whole, its training loop, and the time inside its training steps."""
    import lightning.pytorch as lp

    class LoopTimer(lp.Callback):
        def __init__(self) -> None:
            self.first = self.last = self.batch_start = 0.0
            self.in_steps = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.first = time.perf_counter()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            self.batch_start = time.perf_counter()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.in_steps += time.perf_counter() - self.batch_start

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.last = time.perf_counter()

    timer = LoopTimer()
    t0 = time.perf_counter()
    model.fit(train, **fit_kwargs, num_workers=num_workers, callbacks=[timer])
    total = time.perf_counter() - t0
    loop = timer.last - timer.first
    return {"s": total, "loop_s": loop, "steps_s": timer.in_steps, "data_wait_s": loop - timer.in_steps}


def run_bare(model: Any, batches: list[Any], fit_kwargs: dict[str, Any]) -> dict[str, float]:
    """Time optimizer steps of the fit's training plan over pre-loaded batches (no data loading inside)."""
    import torch

    from stpredict._settings import limit_threads
    from stpredict.models._training._plan import _make_plan

    limit_threads()
    torch.use_deterministic_algorithms(True)  # as fit on CPU (Lightning's deterministic=True)
    torch.manual_seed(fit_kwargs["seed"])
    stride, um = float(model.output_stride), float(model.um_per_px)
    plan = _make_plan(
        module=model.module,
        inputs="tiles",
        loss=fit_kwargs["loss"],
        reduce="sum",
        pixel_area=(stride * um) ** 2,  # density map: µm² per map pixel
        pcc_weight=0.5,
        lr=fit_kwargs["lr"],
        weight_decay=1e-4,
        n_genes=len(model.var_names),
        n_tables=1,
    )
    plan.train()  # frozen batch-norm layers stay in eval, as in fit
    optimizer = plan.configure_optimizers()
    t0 = time.perf_counter()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = plan._step(batch)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    model.module.eval()
    return {"s": seconds, "loop_s": seconds, "steps_s": seconds, "data_wait_s": 0.0}


# ------------------------------------------------------------------------------------------------ driver
def machine() -> dict[str, Any]:
    """The machine and its load now."""
    import torch

    from stpredict._settings import usable_cores

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }


def main() -> None:
    """Parse the options, run the interleaved cases, print the table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/fit_throughput.json)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--tiles", type=int, default=48, help="tiles per epoch")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every case (at least 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="num_workers values of fit")
    parser.add_argument("--quick", action="store_true", help="a tiny run, to check the script (not a measurement)")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.tiles, args.repeats = 2, 8, 2
    out = args.out or Path(f"benchmarks/results/fit_throughput{'_quick' * args.quick}.json")
    load_before = os.getloadavg()

    model, train, fit_kwargs = setup(args.epochs, args.tiles, args.quick)
    batch_size = fit_kwargs["batch_size"]
    model.fit(train, **{**fit_kwargs, "max_epochs": 1, "tiles_per_epoch": batch_size})  # warm-up: imports, bias
    batches, profile = draw_batches(training_dataset(model, train, fit_kwargs), args.epochs, batch_size)
    n_tiles = profile["tiles"]

    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    for repeat in range(args.repeats):
        for workers in args.workers:
            for name, run in (
                (f"fit, num_workers={workers}", lambda w=workers: run_fit(model, train, fit_kwargs, w)),
                ("bare", lambda: run_bare(model, batches, fit_kwargs)),
            ):
                result = run()
                runs[name].append(result)
                print(f"  repeat {repeat}  {name:<22}{result['s']:8.2f} s", flush=True)

    bare = statistics.median(r["s"] for r in runs["bare"])
    cases: dict[str, Any] = {}
    for name in ["bare", *(n for n in runs if n != "bare")]:
        results = runs[name]
        median = {k: statistics.median(r[k] for r in results) for k in results[0]}
        cases[name] = {
            **median,
            "tiles_per_s": n_tiles / median["s"],
            "overhead": median["s"] / bare - 1,
            "loop_overhead": median["loop_s"] / bare - 1,
            "runs": results,
        }
    info = machine()
    info["load_average_before"] = load_before
    result = {
        "command": shlex.join(["python", *sys.argv]),
        "machine": info,
        "workload": "quick (not a measurement)" if args.quick else "stpredict demo's PixNet fit, no validation",
        "device": "cpu",
        "tiles": n_tiles,
        "epochs": args.epochs,
        "tiles_per_epoch": args.tiles,
        "batch_size": batch_size,
        "repeats": args.repeats,
        "target_overhead": TARGET,
        "cases": cases,
        "data_pipeline": profile,
    }

    print(
        f"\n{result['workload']}: {n_tiles} tiles ({args.epochs} × {args.tiles}), batch {batch_size}, "
        f"median of {args.repeats}; {info['usable_cores']} usable cores of {info['cpus']}, load average "
        f"{load_before[0]:.2f} before, {info['load_average'][0]:.2f} after"
    )
    print(
        f"{'case':<22}{'tiles/s':>9}{'fit s':>8}{'loop s':>8}{'steps s':>9}{'data wait s':>13}"
        f"{'overhead':>10}{'loop ovh':>10}"
    )
    for name, c in cases.items():
        print(
            f"{name:<22}{c['tiles_per_s']:>9.1f}{c['s']:>8.2f}{c['loop_s']:>8.2f}{c['steps_s']:>9.2f}"
            f"{c['data_wait_s']:>13.2f}{c['overhead']:>10.0%}{c['loop_overhead']:>10.0%}"
        )
    print(f"target: overhead ≤ {TARGET:.0%}\n\ndata pipeline, main process (ms per tile):")
    for part, ms in profile["ms_per_tile"].items():
        print(f"  {part:<24}{ms:>8.2f}")
    bare_ms = 1e3 * bare / n_tiles
    print(f"  {'total':<24}{profile['total_ms_per_tile']:>8.2f}   (bare step: {bare_ms:.2f} ms per tile)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
