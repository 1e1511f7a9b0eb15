"""Writing a folder safely: build it beside its final name, replace only a folder that is ours, never lose the old one.

Used by :func:`stpredict.models._io.save_model`; generic, so any writer of a folder output can follow the same rule:
a folder is replaced only when it is empty or holds nothing but the files this writer puts there, and those carry the
writer's marker; anything else (a user's data folder, a user's file beside ours) is refused and left untouched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from typing import TYPE_CHECKING

from stpredict._logging import get_logger

if TYPE_CHECKING:
    from collections.abc import Callable, Collection
    from pathlib import Path

__all__ = ["check_replaceable", "file_sha256", "fsync_file", "replace_folder"]

logger = get_logger(__name__)


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of the bytes of ``path``, read in chunks."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsync_file(path: Path) -> None:
    """Flush ``path`` to disk, so that a folder renamed into place after a crash holds complete files."""
    with path.open("r+b") as f:
        os.fsync(f.fileno())


def check_replaceable(path: Path, *, files: Collection[str], is_ours: Callable[[Path], bool], what: str) -> None:
    """Refuse to replace ``path`` unless it is an empty folder, or holds only ``files`` and ``is_ours(path)``.

    Parameters
    ----------
    path
        The existing folder that would be replaced.
    files
        The names the writer puts in its folder; any other entry is someone else's.
    is_ours
        Whether the folder carries the writer's marker (called only when its entries are all in ``files``).
    what
        What the writer writes, for the message (e.g. ``"an stpredict checkpoint folder (written by model.save)"``).

    Raises
    ------
    FileExistsError
        ``path`` is not a folder, holds other entries, or lacks the marker; the message lists what it holds.
    """
    if path.is_symlink() or not path.is_dir():
        msg = f"{str(path)!r} exists and is not a folder (or is a link); overwrite=True replaces only {what}."
        raise FileExistsError(msg)
    names = sorted(entry.name for entry in path.iterdir())
    if not names:
        return
    foreign = [name for name in names if name not in files]
    if not foreign and is_ours(path):
        return
    if foreign and len(foreign) < len(names) and is_ours(path):
        problem = f"holds files that stpredict did not write there ({', '.join(foreign[:10])}) beside {what}"
    else:
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        problem = f"is not {what} (it holds {shown})"
    msg = (
        f"{str(path)!r} {problem}; overwrite=True replaces only {what} or an empty folder, so nothing in it was "
        "touched. Choose another folder, or move those files away first."
    )
    raise FileExistsError(msg)


def replace_folder(
    tmp: Path, path: Path, *, files: Collection[str], is_ours: Callable[[Path], bool], what: str
) -> None:
    """Rename the finished folder ``tmp`` to ``path``; an existing folder there is checked, and restored on failure.

    The old folder is moved aside under a fresh hidden name (nothing else of that name is touched), the new one
    renamed into place, and only then is the old one deleted. If the rename fails the old folder goes back.
    Parameters are those of :func:`check_replaceable`.
    """
    if not (path.exists() or path.is_symlink()):
        tmp.rename(path)
        return
    check_replaceable(path, files=files, is_ours=is_ours, what=what)  # again: it may have changed meanwhile
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.old")
    path.rename(old)
    try:
        tmp.rename(path)
    except BaseException:
        old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if old.exists():
        logger.warning("could not remove the replaced folder %r; delete it yourself", str(old))
