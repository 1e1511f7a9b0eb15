"""Chunk-by-chunk, resumable storage of a dense map, and its atomic installation into a backed SpatialData."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stpredict._elements import quiet_zarr_writes
from stpredict._errors import InputError
from stpredict._logging import get_logger

from ._work_identity import differences

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["WorkStore", "install_element", "tmp_root"]

logger = get_logger(__name__)

_TMP_DIRNAME = ".stpredict_tmp"


def tmp_root(sdata_path: Path) -> Path:
    """Folder inside a SpatialData zarr store where unfinished maps live (ignored by spatialdata)."""
    return Path(sdata_path) / _TMP_DIRNAME


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


class WorkStore:
    """A zarr array written unit by unit, with a record of finished units and of the sums they carry downwards.

    Parameters
    ----------
    path
        Folder for ``plan.json`` (written first: it marks the folder as a work store), ``map.zarr``,
        ``progress.json`` and ``carry/``; ``None`` keeps the array in memory (no resume).
    shape, chunks, dtype
        Of the map array.
    fingerprint
        JSON-serialisable identity of the map (:func:`~stpredict.tl._work_identity.identity`). A folder left by a
        run with the same identity is resumed; one with another identity is discarded with a warning that names
        the fields that differ, and the map is computed again.
    no_resume
        Why a folder left by a run must not be resumed even with the same identity (e.g. the model's weights
        cannot be checked); it is discarded with a warning giving this reason.

    Raises
    ------
    InputError
        If ``path`` is a non-empty folder without ``plan.json`` outside a SpatialData's ``.stpredict_tmp``: a
        folder this class did not create is never deleted.
    """

    def __init__(
        self,
        path: Path | None,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: str,
        fingerprint: dict,
        *,
        no_resume: str | None = None,
    ) -> None:
        import zarr
        from zarr.codecs import BloscCodec

        codec = BloscCodec(cname="lz4", clevel=1, shuffle="shuffle")  # fast: the store is rewritten at the end
        # zarr's test of every chunk for "all fill value" (to skip writing it) costs more than writing a chunk of
        # zeros: lz4 compresses those to almost nothing; chunks of units without tissue are not written at all.
        config = {"write_empty_chunks": True}

        def create(store: Any) -> Any:
            return zarr.create_array(
                store=store, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, compressors=codec, config=config
            )

        self.path = None if path is None else Path(path)
        self.done: set[tuple[int, int]] = set()
        self.resumed = False
        if self.path is None:
            self.array = create(zarr.storage.MemoryStore())
            return
        plan_file = self.path / "plan.json"
        if plan_file.is_file():
            reason = _why_not_resumable(plan_file, fingerprint, no_resume)
            if reason is None and (self.path / "map.zarr" / "zarr.json").is_file():
                progress = self.path / "progress.json"
                if progress.is_file():
                    self.done = {tuple(u) for u in json.loads(progress.read_text())}
                self.array = zarr.open_array(self.path / "map.zarr", mode="r+").with_config(config)
                self.resumed = True
                return
            if reason is not None:
                logger.warning("Discarding the unfinished dense map in %s: %s; computing it again.", self.path, reason)
            shutil.rmtree(self.path)
        elif self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            if self.path.parent.name != _TMP_DIRNAME:  # stpredict's own folder inside a SpatialData store
                msg = (
                    f"{self.path} exists and was not made by stpredict (it has no plan.json), so it is not "
                    "replaced. Pass another `tmp_dir` or `key_added`, or move it away."
                )
                raise InputError(msg)
            logger.warning("Discarding the unfinished dense map in %s (no record); computing it again.", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        _write_json_atomic(plan_file, fingerprint)  # first: it marks the folder as ours
        self.array = create(self.path / "map.zarr")

    def _carry_file(self, unit: tuple[int, int]) -> Path:
        return self.path / "carry" / f"{unit[0]}_{unit[1]}.npz"

    def mark_done(self, unit: tuple[int, int], carry: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """Record that ``unit`` is written (after its chunks are), with the sums it carries into the unit below."""
        if self.path is not None and carry is not None:
            file = self._carry_file(unit)
            file.parent.mkdir(exist_ok=True)
            part = file.with_suffix(".part")
            with part.open("wb") as out:
                np.savez(out, acc=carry[0], wsum=carry[1])
            os.replace(part, file)
        self.done.add(unit)
        if self.path is not None:
            _write_json_atomic(self.path / "progress.json", sorted(self.done))
            self._carry_file((unit[0] - 1, unit[1])).unlink(missing_ok=True)  # used up by this unit

    def carry_into(self, unit: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
        """The sums that the finished unit above ``unit`` carried into it, as stored; ``None`` if there are none."""
        above = (unit[0] - 1, unit[1])
        if self.path is None or above not in self.done or not self._carry_file(above).is_file():
            return None
        with np.load(self._carry_file(above)) as stored:
            return stored["acc"], stored["wsum"]

    def remove(self) -> None:
        """Delete the folder (after the map has been installed elsewhere)."""
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path)
            parent = self.path.parent
            if parent.name == _TMP_DIRNAME and not any(parent.iterdir()):
                parent.rmdir()


def _why_not_resumable(plan_file: Path, fingerprint: dict, no_resume: str | None) -> str | None:
    """Why the work store with record ``plan_file`` cannot be resumed for ``fingerprint``; ``None`` if it can."""
    try:
        stored = json.loads(plan_file.read_text())
    except (OSError, ValueError):
        stored = None
    diffs = differences(stored, fingerprint)
    if diffs:
        return "it was made with other " + ", other ".join(diffs)
    return no_resume


def install_element(sdata: SpatialData, key: str, element: Any, *, staging: Path, overwrite: bool) -> Any:
    """Write image ``element`` to ``sdata``'s store under ``images/key`` atomically; return it read back (lazy).

    The element is first written as a complete SpatialData in ``staging`` (inside the same store, so on the
    same file system), then its folder is moved into place with one rename, so an interruption never leaves a
    half-written element under ``key``. An element already there is replaced only with ``overwrite``.
    """
    import zarr
    from spatialdata import SpatialData, read_zarr

    root = Path(sdata.path)
    stage = staging / "stage.zarr"
    if stage.exists():
        shutil.rmtree(stage)
    with quiet_zarr_writes():
        SpatialData(images={key: element}).write(stage, consolidate_metadata=False)
    target = root / "images" / key
    zarr.open_group(root, mode="r+").require_group("images")
    trash = staging / "replaced"
    if target.exists():
        if not overwrite:  # checked before any work; re-checked here in case the store changed meanwhile
            msg = f"An element {key!r} appeared on disk in {root} during the run; pass `overwrite=True`."
            raise FileExistsError(msg)
        os.replace(target, trash)
    os.replace(stage / "images" / key, target)
    if trash.exists():
        shutil.rmtree(trash)
    shutil.rmtree(stage)
    if sdata.has_consolidated_metadata():
        sdata.write_consolidated_metadata()
    return read_zarr(root, selection=("images",)).images[key]
