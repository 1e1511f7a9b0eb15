"""Command line: ``stpredict demo``."""

from __future__ import annotations

import argparse
import logging

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    import warnings

    import stpredict as st
    from stpredict._demo import DemoConfig, describe, run_demo

    st.settings.verbosity = "info"
    # zarr announces a future default on every array it writes; it says nothing about this run
    warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)

    config = DemoConfig(seed=args.seed, value_kind=args.value_kind)
    if args.quick:
        config.section_um, config.max_epochs, config.tiles_per_epoch = 1200.0, 2, 16
    metrics = run_demo(args.out, config=config)
    print(describe(args.out, metrics, config.timings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stpredict`` command."""
    from stpredict._demo import DemoConfig

    parser = argparse.ArgumentParser(prog="stpredict", description="Predict spatial gene expression from H&E.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole job on built-in synthetic data")
    demo.add_argument("--out", default="stpredict_demo", help="output folder (replaced if it exists)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quick", action="store_true", help="a smaller run, for smoke tests")
    demo.add_argument(
        "--value-kind",
        choices=("density", "intensive"),
        default=DemoConfig.value_kind,
        help="what PixNet's map holds: expected counts per µm² (Poisson loss; the demo's default, better on this "
        "synthetic tissue) or log1p CPM values (the paper's loss, PixNet's default)",
    )
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    return args.func(args)
