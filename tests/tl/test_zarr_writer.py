from __future__ import annotations

import logging

import numpy as np

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
    assert "Discarding an unfinished dense map" in caplog.text
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
