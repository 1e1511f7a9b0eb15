"""Chunk-by-chunk, resumable storage of a dense map, and its atomic installation into a backed SpatialData."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stpredict._logging import get_logger

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
    """A zarr array written unit by unit, with a record of finished units.

    Parameters
    ----------
    path
        Folder for ``map.zarr``, ``plan.json`` and ``progress.json``; ``None`` keeps the array in memory
        (no resume).
    shape, chunks, dtype
        Of the map array.
    fingerprint
        JSON-serialisable description of everything that determines the map; a folder left by a run with a
        different fingerprint is discarded, one with the same fingerprint is resumed.
    """

    def __init__(
        self, path: Path | None, shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, fingerprint: dict
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
        if self.path is None:
            self.array = create(zarr.storage.MemoryStore())
            return
        plan_file = self.path / "plan.json"
        resumable = plan_file.is_file() and json.loads(plan_file.read_text()) == fingerprint
        if resumable:
            progress = self.path / "progress.json"
            if progress.is_file():
                self.done = {tuple(u) for u in json.loads(progress.read_text())}
            self.array = zarr.open_array(self.path / "map.zarr", mode="r+").with_config(config)
            logger.info("Resuming the dense map in %s: %d units already written.", self.path, len(self.done))
            return
        if self.path.exists() and any(self.path.iterdir()):
            logger.warning("Discarding an unfinished dense map in %s made with other parameters.", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.array = create(self.path / "map.zarr")
        _write_json_atomic(plan_file, fingerprint)

    def mark_done(self, unit: tuple[int, int]) -> None:
        """Record that ``unit`` is written (after its chunks are)."""
        self.done.add(unit)
        if self.path is not None:
            _write_json_atomic(self.path / "progress.json", sorted(self.done))

    def remove(self) -> None:
        """Delete the folder (after the map has been installed elsewhere)."""
        if self.path is not None and self.path.exists():
            shutil.rmtree(self.path)
            parent = self.path.parent
            if parent.name == _TMP_DIRNAME and not any(parent.iterdir()):
                parent.rmdir()


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
