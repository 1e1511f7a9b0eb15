"""What every command shares: exit codes, error lines, help layout, reading stores, progress output."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from stpredict._errors import InputError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from spatialdata import SpatialData

__all__ = [
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "HelpFormatter",
    "Progress",
    "add_command",
    "read_store",
    "run_command",
]

EXIT_OK = 0
#: An unexpected failure (a bug, or the machine: out of memory, a full disk).
EXIT_FAILURE = 1
#: Bad usage or bad input: the one-line message says what to change; rerunning unchanged fails again.
EXIT_USAGE = 2
#: Interrupted (Ctrl-C, SIGINT): 128 + 2, as shells report it.
EXIT_INTERRUPTED = 130

#: Errors that mean "the input or the options are wrong": the library's messages already name the fix.
BAD_INPUT: tuple[type[BaseException], ...] = (
    InputError,  # includes CalibrationError, CoordinateSystemError
    FileNotFoundError,
    FileExistsError,  # includes OutputFolderError; a checkpoint folder that exists
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    KeyError,  # a table, shapes or layer the store lacks (the message lists what it has)
)

#: tqdm bars write at most this often (seconds) when stderr is not a terminal, so that logs stay readable.
LOG_MININTERVAL = "30"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written (examples keep their lines); defaults shown where they say something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (
            "%(default)" not in help_text
            and default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
            and not isinstance(default, list | tuple)
        ):
            help_text += " (default: %(default)s)"
        return help_text


def add_command(
    sub: Any, name: str, *, summary: str, description: str, examples: str, parents: list[argparse.ArgumentParser]
) -> argparse.ArgumentParser:
    """Add sub-command ``name``: a one-line ``summary`` for ``stpredict --help``, a description and examples."""
    return sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog="examples:\n" + examples.rstrip(),
        formatter_class=HelpFormatter,
        parents=parents,
    )


#: The library's messages name its arguments; on the command line the fix is an option.
_OPTION_NAMES = (
    ("`overwrite=True`", "--overwrite"),
    ("overwrite=True", "--overwrite"),
    ("`key_added=`", "--key-added"),
    ("`--key-added=`", "--key-added"),
)


def _message(err: BaseException) -> str:
    """The error's message on one line (a KeyError's message without the quotes its ``str`` adds)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename!r}"
    text = " ".join(str(text).split()) or type(err).__name__
    for api, option in _OPTION_NAMES:
        text = text.replace(api, option)
    return text


def run_command(command: str, func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command and turn how it ended into an exit status a scheduler can act on.

    ``0``: done. ``2``: bad usage or input (:data:`BAD_INPUT`), one line on stderr that says what to change.
    ``130``: interrupted. ``1``: anything else, with the traceback, since it is a bug or a problem of the machine.
    """
    try:
        return func(args)
    except KeyboardInterrupt:
        print(f"\nstpredict {command}: interrupted; nothing half-written was left under a final name.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BAD_INPUT as err:
        print(f"stpredict {command}: error: {_message(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - the last resort of a command line: report, and exit 1
        traceback.print_exc(file=sys.stderr)
        print(
            f"stpredict {command}: unexpected failure: {type(err).__name__}: {_message(err)} "
            "(the traceback is above; please report it if the machine is not the cause)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


def read_store(path: str | os.PathLike[str], *, what: str = "SDATA") -> SpatialData:
    """Read a SpatialData zarr store backed by ``path``; a missing or unreadable store is bad input (exit 2)."""
    import spatialdata as sd

    path = Path(path)
    if not path.exists():
        msg = (
            f"{what}: no SpatialData store at {str(path)!r}; check the path (a store is written with "
            "`sdata.write('name.zarr')`)."
        )
        raise InputError(msg)
    if not path.is_dir():
        msg = f"{what}: {str(path)!r} is a file, not a SpatialData zarr store (a folder); check the path."
        raise InputError(msg)
    try:
        return sd.read_zarr(path)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:
        msg = (
            f"{what}: {str(path)!r} cannot be read as a SpatialData zarr store ({type(err).__name__}: "
            f"{_message(err)}); check that it was written by spatialdata."
        )
        raise InputError(msg) from err


class Progress:
    """Stage lines and progress bars on stderr, as a terminal or a batch log wants them.

    On a terminal, training shows Lightning's progress bar and other work its tqdm bars. Elsewhere (a scheduler's log
    file), training prints one line per epoch and tqdm bars update at most every :data:`LOG_MININTERVAL` seconds.
    ``quiet`` turns all of it off; errors and results are still printed.

    Parameters
    ----------
    command
        The command's name, at the start of each stage line.
    quiet
        No stage lines, no bars.
    stream
        Where the lines go (default ``sys.stderr``); its ``isatty`` decides the style.
    """

    def __init__(self, command: str, *, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.command = command
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False

    @property
    def show_bars(self) -> bool:
        """Whether tqdm bars are shown (predict_dense, aggregate, embeddings)."""
        return not self.quiet

    def line(self, text: str) -> None:
        """Print one line, at once (logs are read while the job runs)."""
        if not self.quiet:
            print(f"stpredict {self.command}: {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, text: str) -> Iterator[None]:
        """Announce a stage before it starts and report its time when it ends."""
        self.line(f"{text} ...")
        start = time.perf_counter()
        yield
        self.line(f"{text}: done in {time.perf_counter() - start:.1f} s")

    @contextlib.contextmanager
    def bars(self) -> Iterator[None]:
        """While inside, tqdm bars of a non-terminal run update at most every :data:`LOG_MININTERVAL` seconds."""
        if self.tty or "TQDM_MININTERVAL" in os.environ:
            yield
            return
        os.environ["TQDM_MININTERVAL"] = LOG_MININTERVAL
        try:
            yield
        finally:
            os.environ.pop("TQDM_MININTERVAL", None)

    def fit_kwargs(self) -> dict[str, Any]:
        """Training progress options for a model's ``fit``: Lightning's bar on a terminal, else per-epoch lines."""
        if self.quiet:
            return {"show_progress_bar": False}
        if self.tty:
            return {"show_progress_bar": True}
        return {"show_progress_bar": False, "callbacks": [epoch_lines(self.line)]}


def epoch_lines(write: Callable[[str], None]) -> Any:
    """A Lightning callback that writes one line per training epoch: its number, losses and time."""
    import lightning.pytorch as lp

    class _EpochLines(lp.Callback):
        def __init__(self) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            metrics: dict[str, str] = {}  # "loss" and "loss_epoch" are one value: shown once
            for name, value in sorted(trainer.callback_metrics.items()):
                if name.endswith("_step"):
                    continue
                try:
                    metrics.setdefault(name.removesuffix("_epoch"), f"{name.removesuffix('_epoch')} {float(value):.4g}")
                except (TypeError, ValueError):
                    continue
            total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
            seconds = time.perf_counter() - self.start
            write(f"epoch {trainer.current_epoch + 1}/{total}  " + "  ".join([*metrics.values(), f"{seconds:.1f} s"]))

    return _EpochLines()
