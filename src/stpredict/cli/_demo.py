"""``stpredict demo``: the whole job on built-in synthetic data, into an output folder stpredict owns."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ._common import EXIT_OK, Progress, add_command

if TYPE_CHECKING:
    import argparse

__all__ = ["add_parser", "run"]

DESCRIPTION = """\
Run the whole job on built-in synthetic data: three synthetic H&E sections with known expression
(train, validation, held-out test), PixNet trained on the measured Visium-like spots, a dense map of the
held-out section, tables at several bin sizes, and the scores against the measured spots and the true
expression density. Each step is announced when it starts and timed when it ends; training shows a
progress bar on a terminal and one line per epoch in a log file.

Everything lands in the --out folder: demo.zarr, demo.png, metrics.csv, summary.json and model/. The
folder is created, or used when empty; an earlier demo output there (marked by a .stpredict-output file)
is replaced once the new one is complete; a folder holding anything else is refused before any work,
and nothing in it is touched.

Exit status: 0 done; 2 the output folder cannot be used (the message says why and what to do);
1 unexpected failure; 130 interrupted (an earlier output is left as it was)."""

EXAMPLES = """\
  stpredict demo                         # a few minutes on two CPU cores, into ./stpredict_demo
  stpredict demo --quick --out /tmp/demo # a smaller run, for smoke tests
  stpredict demo --value-kind intensive  # PixNet's log1p CPM maps and the paper's loss"""


def add_parser(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``demo`` on the sub-command parser ``sub``."""
    from stpredict._demo import DemoConfig

    p = add_command(
        sub,
        "demo",
        summary="run the whole job on built-in synthetic data",
        description=DESCRIPTION,
        examples=EXAMPLES,
        parents=parents,
    )
    p.add_argument(
        "--out",
        default="stpredict_demo",
        help="output folder: created, or used when empty; an earlier demo output there (marked by a "
        ".stpredict-output file) is replaced, and a folder holding anything else is refused",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the tissue, the model and the training")
    p.add_argument("--quick", action="store_true", help="a smaller run, for smoke tests")
    p.add_argument(
        "--value-kind",
        choices=("density", "intensive"),
        default=DemoConfig.value_kind,
        help="what PixNet's map holds: expected counts per µm² (Poisson loss; the demo's default, better on this "
        "synthetic tissue) or log1p CPM values (the paper's loss, PixNet's default)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``stpredict demo``."""
    import stpredict as st
    from stpredict._demo import DemoConfig, describe, run_demo
    from stpredict._outputs import check_output_folder

    check_output_folder(args.out, option="--out")  # refused before any work, in the command's own words
    progress = Progress("demo", quiet=args.quiet)
    if not args.quiet:
        st.settings.verbosity = "info"  # the demo's steps are logged as they start and end

    config = DemoConfig(seed=args.seed, value_kind=args.value_kind)
    if args.quick:
        config.section_um, config.max_epochs, config.tiles_per_epoch = 1200.0, 2, 16
    logging.getLogger("stpredict").info("stpredict demo: writing into %s", args.out)
    with progress.bars():
        metrics = run_demo(
            args.out,
            config=config,
            show_progress_bar=progress.show_bars,
            fit_kwargs=progress.fit_kwargs(),
        )
    print(describe(args.out, metrics, config.timings))
    return EXIT_OK
