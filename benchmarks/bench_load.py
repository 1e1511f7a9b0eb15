"""Benchmark of training under load: the demo's PixNet fit alone, two side by side, and beside a busy process.

Run ``python benchmarks/bench_load.py --out benchmarks/results/load.json`` on an otherwise quiet machine (the
timings are the point; another job on the same cores makes them meaningless). Pin it to the cores you want to
measure with ``taskset -c 0,1 python benchmarks/bench_load.py ...`` (the children inherit the affinity mask).

The workload is what ``stpredict demo`` trains: the same synthetic sections, preprocessing, PixNet and ``fit`` call
(:mod:`stpredict._demo`, :class:`~stpredict._demo.DemoConfig` defaults: 20 epochs of 96 tiles, about a minute on
two cores). Each training runs in its own Python process, which prepares its data, waits until every process of
the case is ready, then times ``model.fit`` alone. Cases, each as a ratio to the first:

1. **alone**: one training;
2. **two side by side**: two trainings started together (ratio: the mean of their times; the fair share of the
   machine is 2);
3. **beside a busy process**: one training beside a single-threaded pure-Python spin loop (fair share: 2 on two
   cores, ``cores / (cores - 1)`` with more).

With ``--spin`` every case is run again with ``GOMP_SPINCOUNT=300000`` (GNU OpenMP's default, which stpredict's
``OMP_WAIT_POLICY=PASSIVE`` replaces: idle threads busy-wait instead of sleeping), to compare with the behaviour
before in the same run. ``--n-jobs`` sets ``st.settings.n_jobs`` in the trainings. ``--quick`` runs a tiny fit
(seconds) to check the script, not to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# The busy loop stops when its parent (this driver) is gone, so an interrupted benchmark leaves nothing spinning.
BUSY_LOOP = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    pass\n"


# ------------------------------------------------------------------------------------------------ worker
def _demo_training(quick: bool, epochs: int | None) -> tuple[Any, Any, dict[str, Any]]:
    """The demo's training set-up (as ``stpredict._demo.run_demo`` builds it): model, training and validation data."""
    import stpredict as st
    from stpredict._demo import DemoConfig, _section, demo_pixnet

    config = DemoConfig(section_um=600.0, max_epochs=1, tiles_per_epoch=16) if quick else DemoConfig()
    if epochs is not None:
        config.max_epochs = epochs
    train = _section(config, "train", "P0", config.seed)
    val = _section(config, "val", "P1", config.seed + 1)
    for sdata in (train, val):
        st.pp.tissue_mask(sdata, "he")
    genes = st.pp.select_genes([train.tables["table"]], n_top=config.n_genes)
    model = demo_pixnet(genes, config)
    fit_kwargs = {
        "validation_data": val,
        "loss": "poisson",
        "max_epochs": config.max_epochs,
        "tiles_per_epoch": config.tiles_per_epoch,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "show_progress_bar": False,
    }
    return model, train, fit_kwargs


def worker(args: argparse.Namespace) -> None:
    """One training: prepare, say ready, wait for the start signal, time ``model.fit``, print JSON."""
    import stpredict as st
    from stpredict._settings import usable_cores

    if args.n_jobs is not None:
        st.settings.n_jobs = args.n_jobs
    model, train, fit_kwargs = _demo_training(args.quick, args.epochs)
    sync = Path(args.sync)
    (sync / f"ready-{args.index}").touch()
    while not (sync / "go").exists():
        time.sleep(0.02)
    t0, c0 = time.perf_counter(), time.process_time()
    model.fit(train, **fit_kwargs)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    import numba
    import torch

    print(
        json.dumps(
            {
                "fit_s": seconds,
                "cpu_s": cpu,
                "epochs": len(model.fit_history["train_loss"]),
                "torch_threads": torch.get_num_threads(),
                "numba_threads": numba.get_num_threads(),
                "usable_cores": usable_cores(),
                "wait_env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")},
            }
        )
    )


# ------------------------------------------------------------------------------------------------ driver
def run_case(args: argparse.Namespace, n_trainings: int, busy: bool, env: dict[str, str]) -> dict[str, Any]:
    """Start ``n_trainings`` trainings (and a busy loop), release them together, return their results."""
    with tempfile.TemporaryDirectory(prefix="bench_load_") as sync:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--sync", sync]
        command += ["--quick"] * args.quick + (["--epochs", str(args.epochs)] if args.epochs is not None else [])
        command += ["--n-jobs", str(args.n_jobs)] if args.n_jobs is not None else []
        procs = [
            subprocess.Popen([*command, "--index", str(i)], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO)
            for i in range(n_trainings)
        ]
        spinner = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
        try:
            while not all((Path(sync) / f"ready-{i}").exists() for i in range(n_trainings)):
                if any(p.poll() not in (None, 0) for p in procs):
                    msg = "a training process failed while preparing; run it alone with --quick to see why"
                    raise RuntimeError(msg)
                time.sleep(0.05)
            load = os.getloadavg()[0]
            (Path(sync) / "go").touch()
            outputs = [p.communicate()[0] for p in procs]
        finally:
            for p in [*procs, spinner]:
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()
    if any(p.returncode != 0 for p in procs):
        msg = f"a training process exited with {[p.returncode for p in procs]}"
        raise RuntimeError(msg)
    runs = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    times = [r["fit_s"] for r in runs]
    return {"load_average_at_start": load, "fit_s": times, "mean_fit_s": sum(times) / len(times), "runs": runs}


def _cases(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    alone = run_case(args, 1, busy=False, env=env)
    pair = run_case(args, 2, busy=False, env=env)
    busy = run_case(args, 1, busy=True, env=env)
    base = alone["mean_fit_s"]
    for case in (alone, pair, busy):
        case["ratio_to_alone"] = case["mean_fit_s"] / base
    return {"alone": alone, "two side by side": pair, "beside a busy process": busy}


def _interrupt(signum: int, frame: object) -> None:
    """A SIGTERM (``kill``, a scheduler) unwinds like Ctrl-C, so each case's ``finally`` kills its children."""
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/load.json"))
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo's 20)")
    parser.add_argument("--n-jobs", type=int, default=None, help="st.settings.n_jobs in the trainings")
    parser.add_argument("--spin", action="store_true", help="also run every case with GOMP_SPINCOUNT=300000")
    parser.add_argument("--quick", action="store_true", help="a tiny fit, to check the script (not a measurement)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sync", help=argparse.SUPPRESS)
    parser.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    signal.signal(signal.SIGTERM, _interrupt)

    from stpredict._settings import WAIT_VARIABLES, usable_cores

    # Each variant fixes the wait policy itself; the caller's environment otherwise passes through.
    clean = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    variants = {"stpredict (passive wait)": clean}
    if args.spin:
        variants["spinning (GOMP_SPINCOUNT=300000)"] = {**clean, "GOMP_SPINCOUNT": "300000"}
    cores = usable_cores()
    result: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "usable_cores": cores,
            "python": sys.version.split()[0],
            "load_average_before": os.getloadavg(),
        },
        "workload": "quick (not a measurement)" if args.quick else "stpredict demo's PixNet fit",
        "epochs": args.epochs,
        "n_jobs": args.n_jobs,
        "variants": {name: _cases(args, env) for name, env in variants.items()},
    }

    fair_busy = 2.0 if cores <= 2 else cores / (cores - 1)
    load = result["machine"]["load_average_before"][0]
    print(f"{result['workload']}, {cores} usable cores, load average before {load:.2f}")
    print(f"{'variant':<34}{'case':<24}{'fit s':>16}{'ratio':>7}{'fair':>6}{'threads':>9}")
    for name, cases in result["variants"].items():
        for case, fair in (("alone", 1.0), ("two side by side", 2.0), ("beside a busy process", fair_busy)):
            c = cases[case]
            seconds = ", ".join(f"{t:.1f}" for t in c["fit_s"])
            threads = c["runs"][0]["torch_threads"]
            print(f"{name:<34}{case:<24}{seconds:>16}{c['ratio_to_alone']:>7.2f}{fair:>6.2f}{threads:>9}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
