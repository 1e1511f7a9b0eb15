from __future__ import annotations

import logging

import numpy as np
import pytest

from stpredict.errors import InputError
from stpredict.tl._zarr_writer import WorkStore

SHAPE, CHUNKS = (2, 8, 8), (2, 4, 4)


def _chunk_files(path) -> int:
    return sum(1 for p in (path / "map.zarr").rglob("*") if p.is_file() and p.name != "zarr.json")


def test_work_store_resumes_and_writes_zero_chunks(tmp_path, caplog):
    fingerprint = {"model": "m", "shape": list(SHAPE)}
    store = WorkStore(tmp_path / "w", SHAPE, CHUNKS, "float32", fingerprint)
    store.array[:, :4, :4] = 0.0  # a chunk of zeros is written, not tested against the fill value and skipped
    store.array[:, :4, 4:] = 1.5
    store.mark_done((0, 0))
    assert _chunk_files(tmp_path / "w") == 2

    resumed = WorkStore(tmp_path / "w", SHAPE, CHUNKS, "float32", fingerprint)
    assert resumed.done == {(0, 0)}
    np.testing.assert_array_equal(resumed.array[:, :4, 4:], 1.5)
    resumed.array[:, 4:, :4] = 0.0  # the resumed array writes zero chunks too
    assert _chunk_files(tmp_path / "w") == 3

    with caplog.at_level(logging.WARNING):
        fresh = WorkStore(tmp_path / "w", SHAPE, CHUNKS, "float32", {**fingerprint, "model": "other"})
    assert "Discarding the unfinished dense map" in caplog.text
    assert 'model (class and name) ("m" → "other")' in caplog.text
    assert fresh.done == set()
    assert _chunk_files(tmp_path / "w") == 0


def test_in_memory_work_store():
    store = WorkStore(None, SHAPE, CHUNKS, "float16", {})
    store.array[:, 2:6, 2:6] = 2.0
    out = store.array[:]
    assert out.dtype == np.float16
    assert out.sum() == 2 * 16 * 2.0
    store.mark_done((0, 0))
    assert store.done == {(0, 0)}


def test_carries_are_stored_until_the_unit_below_is_done(tmp_path):
    fingerprint = {"format": 2, "model": "m"}
    store = WorkStore(tmp_path / "w", SHAPE, CHUNKS, "float32", fingerprint)
    carry = (np.arange(2 * 1 * 8, dtype=np.float32).reshape(2, 1, 8) / 3, np.full((1, 8), 0.25, np.float32))
    store.mark_done((0, 0), carry)
    resumed = WorkStore(tmp_path / "w", SHAPE, CHUNKS, "float32", fingerprint)
    assert resumed.resumed
    got = resumed.carry_into((1, 0))
    assert got[0].tobytes() == carry[0].tobytes()
    assert got[1].tobytes() == carry[1].tobytes()
    assert resumed.carry_into((1, 1)) is None  # another panel
    assert resumed.carry_into((2, 0)) is None  # the unit above is not done
    resumed.mark_done((1, 0))
    assert not list((tmp_path / "w" / "carry").iterdir())  # used up


def test_only_folders_of_stpredict_are_discarded(tmp_path, caplog):
    old = tmp_path / "old"  # a work folder of an earlier stpredict: its record lacks the format
    store = WorkStore(old, SHAPE, CHUNKS, "float32", {"model": "m"})
    store.mark_done((0, 0))
    with caplog.at_level(logging.WARNING):
        fresh = WorkStore(old, SHAPE, CHUNKS, "float32", {"format": 2, "model": "m"})
    assert "work store format" in caplog.text
    assert fresh.done == set()

    inside = tmp_path / "s.zarr" / ".stpredict_tmp" / "he_x"  # inside a SpatialData's own folder: ours
    inside.mkdir(parents=True)
    (inside / "stale").write_text("")
    WorkStore(inside, SHAPE, CHUNKS, "float32", {"format": 2})
    assert not (inside / "stale").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not made by stpredict"):
        WorkStore(foreign, SHAPE, CHUNKS, "float32", {"format": 2})
    assert (foreign / "notes.txt").read_text() == "keep"
