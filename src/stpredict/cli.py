"""Command line: ``stpredict demo``."""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = ["main"]


def _error(command: str, err: Exception) -> int:
    """Print ``err`` as one line, as argparse prints usage errors, and return the exit status."""
    print(f"stpredict {command}: error: {err}", file=sys.stderr)
    return 1


def _demo(args: argparse.Namespace) -> int:
    import warnings

    import stpredict as st
    from stpredict._demo import DemoConfig, describe, run_demo
    from stpredict._outputs import OutputFolderError, check_output_folder

    try:  # refused before any work, in the command's own words
        check_output_folder(args.out, option="--out")
    except OutputFolderError as err:
        return _error("demo", err)

    st.settings.verbosity = "info"
    # zarr announces a future default on every array it writes; it says nothing about this run
    warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)

    config = DemoConfig(seed=args.seed, value_kind=args.value_kind)
    if args.quick:
        config.section_um, config.max_epochs, config.tiles_per_epoch = 1200.0, 2, 16
    try:
        metrics = run_demo(args.out, config=config)
    except OutputFolderError as err:  # something appeared in the folder during the run
        return _error("demo", err)
    print(describe(args.out, metrics, config.timings))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stpredict`` command."""
    from stpredict._demo import DemoConfig

    parser = argparse.ArgumentParser(prog="stpredict", description="Predict spatial gene expression from H&E.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the whole job on built-in synthetic data")
    demo.add_argument(
        "--out",
        default="stpredict_demo",
        help="output folder: created, or used when empty; an earlier demo output there (marked by a "
        ".stpredict-output file) is replaced, and a folder holding anything else is refused",
    )
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
