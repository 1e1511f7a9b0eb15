"""Command line: ``stpredict train | predict | aggregate | evaluate | benchmark | demo``.

Each command mirrors the Python API for batch jobs: inputs and outputs are SpatialData zarr stores and model
folders, sizes are in µm, long work shows progress (bars on a terminal, lines in a log), and the exit status says
what a scheduler should do: ``0`` done, ``2`` bad usage or input (one line on stderr naming the fix; rerunning
unchanged fails again), ``1`` an unexpected failure (with the traceback), ``130`` interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys

from stpredict._version import __version__

from . import _benchmark, _demo, _store, _train
from ._common import EXIT_INTERRUPTED, HelpFormatter, run_command

__all__ = ["build_parser", "main"]

DESCRIPTION = """\
Predict spatially resolved gene expression from H&E images, densely: train PixNet or MagNet on
SpatialData zarr stores, predict dense per-gene maps into a store, aggregate them into tables of bins,
spots or cells, and evaluate them. Sizes are in µm. Run `stpredict COMMAND --help` for each command."""

EPILOG = """\
a batch job, step by step:
  stpredict train train1.zarr train2.zarr --model pixnet --out models/pixnet --validation val.zarr
  stpredict predict test.zarr --model models/pixnet                 # images/he_pixnet in test.zarr
  stpredict aggregate test.zarr --map he_pixnet --shapes spots       # tables/he_pixnet_spots
  stpredict evaluate test.zarr --pred he_pixnet_spots --truth table --normalize log1p_cpm --json metrics.json

exit status: 0 done; 2 bad usage or input (the message names the fix); 1 unexpected failure;
130 interrupted (rerun `predict` to resume)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``stpredict`` argument parser with every command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-q", "--quiet", action="store_true", help="no progress output; errors and results are still printed"
    )
    parser = argparse.ArgumentParser(
        prog="stpredict", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"stpredict {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _train.add_parser(sub, [common])
    _store.add_parsers(sub, [common])
    _benchmark.add_parser(sub, [common])
    _demo.add_parser(sub, [common])
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stpredict`` command.

    Parameters
    ----------
    argv
        The arguments after the program name; ``sys.argv[1:]`` when ``None``.

    Returns
    -------
    The exit status: 0 done, 2 bad usage or input, 1 unexpected failure, 130 interrupted. Usage errors found by
    the parser (a missing option, an unknown command) exit with 2 through :class:`SystemExit`, as argparse does.
    """
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    return run_command(args.command, args.func, args)
