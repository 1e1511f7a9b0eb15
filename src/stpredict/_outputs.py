"""Output folders that stpredict creates, and replaces only when it wrote them.

No command or function deletes a folder it did not create. A folder that stpredict writes carries a marker file,
``.stpredict-output``: JSON naming the command that wrote it, the stpredict version and the entries it wrote. An
existing folder is used only when it is empty, or when it carries that marker and holds nothing but the entries
the marker lists; anything else is refused before any work starts, and nothing in it is touched.

A new output is written into a hidden staging folder inside the output folder and moved into place, entry by entry,
only once it is complete: a run that fails (or is interrupted) leaves the earlier output as it was. The output folder
itself is never renamed or removed, so ``--out .`` keeps the working directory, its links and its permissions; only
a folder this run created is removed again when the run fails, and only when it is empty by then.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stpredict._logging import get_logger
from stpredict._version import __version__

if TYPE_CHECKING:
    from collections.abc import Iterator

__all__ = ["MARKER_NAME", "OutputFolderError", "check_output_folder", "output_folder"]

logger = get_logger(__name__)

#: The file that marks a folder as an output of stpredict.
MARKER_NAME = ".stpredict-output"
_PARTIAL = MARKER_NAME + ".part"
_STAGE_PREFIX = ".stpredict-new-"  # a run's staging folder, inside the output folder
_TRASH_PREFIX = ".stpredict-old-"  # the replaced output, for the moment of the swap
_SHOWN = 5


class OutputFolderError(FileExistsError):
    """An output folder cannot be used without losing something stpredict did not write; nothing was changed."""


def _names(names: list[str]) -> str:
    names = sorted(names)
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of ``folder``; ``None`` when it has none; :class:`OutputFolderError` when it is not stpredict's."""
    path = folder / MARKER_NAME
    if not path.exists() and not path.is_symlink():
        return None
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        marker = None
    if not (
        isinstance(marker, dict)
        and str(marker.get("written_by", "")).startswith("stpredict")
        and isinstance(marker.get("entries"), list)
        and all(isinstance(name, str) for name in marker["entries"])
    ):
        msg = (
            f"The output folder {str(folder)!r} has a {MARKER_NAME} file that cannot be read as stpredict's marker; "
            "nothing was changed. Choose another folder, or remove that folder yourself."
        )
        raise OutputFolderError(msg)
    return marker


def _ours(name: str, marker: dict[str, Any]) -> bool:
    """Whether entry ``name`` of a marked folder was written by stpredict: listed, the marker, or a run's leftover."""
    return (
        name in marker["entries"] or name in (MARKER_NAME, _PARTIAL) or name.startswith((_STAGE_PREFIX, _TRASH_PREFIX))
    )


def check_output_folder(path: str | os.PathLike[str], *, overwrite: bool = True, option: str = "folder") -> None:
    """Refuse ``path`` as an output folder unless it is absent, empty, or an earlier output of stpredict.

    Parameters
    ----------
    path
        The output folder.
    overwrite
        Accept an earlier output of stpredict (to be replaced); with ``False`` only an absent or empty folder.
    option
        How the caller names the folder, for the error message (``"--out"``, ```out_dir```).

    Raises
    ------
    OutputFolderError
        With a one-line message naming the folder, a few of its entries and the fix.
    """
    path = Path(path)
    if not path.exists():
        if path.is_symlink():
            msg = f"The output folder {str(path)!r} is a broken link; choose another {option}, or remove the link."
            raise OutputFolderError(msg)
        return
    if not path.is_dir():
        msg = f"The output folder {str(path)!r} is a file; nothing was changed. Choose another {option}."
        raise OutputFolderError(msg)
    names = os.listdir(path)
    if not names:
        return
    marker = _read_marker(path)
    if marker is None:
        msg = (
            f"The output folder {str(path)!r} already holds {_names(names)}, which stpredict did not write (it "
            f"has no {MARKER_NAME} file); nothing was changed. Choose another {option}, or empty or remove that "
            "folder yourself."
        )
        raise OutputFolderError(msg)
    foreign = [name for name in names if not _ours(name, marker)]
    if foreign:
        msg = (
            f"The output folder {str(path)!r} holds an earlier output of {marker['written_by']}, but also "
            f"{_names(foreign)}, which it did not write; nothing was changed. Move those out, choose another "
            f"{option}, or remove that folder yourself."
        )
        raise OutputFolderError(msg)
    if not overwrite:
        msg = (
            f"The output folder {str(path)!r} holds an earlier output of {marker['written_by']}; pass "
            f"overwrite=True to replace it, or choose another {option}."
        )
        raise OutputFolderError(msg)


def _write_marker(folder: Path, written_by: str, entries: list[str]) -> None:
    text = json.dumps({"written_by": written_by, "version": __version__, "entries": sorted(entries)}, indent=2)
    (folder / _PARTIAL).write_text(text + "\n", encoding="utf-8")
    os.replace(folder / _PARTIAL, folder / MARKER_NAME)


def _make_folder(path: Path) -> list[Path]:
    """Create ``path`` and its missing parents; return the folders created, outermost first."""
    missing = [p for p in (path, *path.parents) if not p.exists()][::-1]
    path.mkdir(parents=True, exist_ok=True)
    return missing


def _release(path: Path, created: list[Path]) -> None:
    """Undo the claim on ``path`` of a run that failed: its marker, then the folders it created, if empty."""
    (path / MARKER_NAME).unlink(missing_ok=True)
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:  # not empty: something else was put there meanwhile
            break


def _install(path: Path, stage: Path, written_by: str, option: str) -> None:
    """Replace the entries of ``path`` (stpredict's, by its marker) with those of the finished ``stage``."""
    marker = _read_marker(path) or {"entries": []}
    new = sorted(name for name in os.listdir(stage) if name not in (MARKER_NAME, _PARTIAL))
    foreign = [name for name in os.listdir(path) if name != stage.name and not _ours(name, marker)]
    if foreign:
        msg = (
            f"{_names(foreign)} appeared in the output folder {str(path)!r} during the run; nothing there was "
            f"changed, and the new output is in {str(stage)!r}. Move it where you want it, or choose another {option}."
        )
        raise OutputFolderError(msg)
    # Until the swap is over, the marker lists the old and the new entries, so that an interruption in between
    # leaves a folder that the next run recognises as its own.
    _write_marker(path, written_by, sorted({*marker["entries"], *new}))
    old = [name for name in os.listdir(path) if name not in (stage.name, MARKER_NAME)]
    trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=path))
    for name in old:
        os.replace(path / name, trash / name)
    for name in new:
        os.replace(stage / name, path / name)
    _write_marker(path, written_by, new)
    stage.rmdir()
    shutil.rmtree(trash)
    if old:
        logger.info("Replaced the earlier output in %s.", path)


@contextmanager
def output_folder(
    path: str | os.PathLike[str], *, written_by: str, overwrite: bool = True, option: str = "folder"
) -> Iterator[Path]:
    """Write an output folder that stpredict owns: yield a staging folder, and install its contents on success.

    ``path`` is checked first (:func:`check_output_folder`): it must be absent, empty, or an earlier output of
    stpredict. The caller writes everything into the yielded folder, a hidden one inside ``path``. When the block
    ends without an error, the earlier output (the entries its marker lists, and leftovers of interrupted runs) is
    replaced by what the block wrote, and the marker is rewritten. When the block raises, what it wrote is removed
    and ``path`` is left as it was (a folder created for this run is removed again if it is empty).

    Parameters
    ----------
    path
        The output folder.
    written_by
        What writes it (``"stpredict demo"``), recorded in the marker.
    overwrite
        Replace an earlier output of stpredict; with ``False`` only an absent or empty folder is used.
    option
        How the caller names the folder, for error messages.

    Yields
    ------
    The staging folder to write into.
    """
    path = Path(path)
    check_output_folder(path, overwrite=overwrite, option=option)
    created = _make_folder(path)
    claimed = _read_marker(path) is None  # absent or empty: marked now, so a killed run's leftovers are recognised
    if claimed:
        _write_marker(path, written_by, [])
    stage = None
    try:
        stage = Path(tempfile.mkdtemp(prefix=_STAGE_PREFIX, dir=path))
        yield stage
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        if claimed:
            _release(path, created)
        raise
    _install(path, stage, written_by, option)
