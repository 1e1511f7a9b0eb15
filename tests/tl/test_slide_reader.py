from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from stpredict.tl._slide_reader import FILL_VALUE, SlideReader


def _reference(image: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Pixel by pixel: the image where it exists, white elsewhere."""
    out = np.full((3, y1 - y0, x1 - x0), FILL_VALUE, dtype=np.uint8)
    for y in range(y0, y1):
        for x in range(x0, x1):
            if 0 <= y < image.shape[1] and 0 <= x < image.shape[2]:
                out[:, y - y0, x - x0] = image[:3, y, x]
    return out


def _counting(image: np.ndarray, chunks: tuple[int, int], counts: dict) -> da.Array:
    """``image`` as a dask array whose chunks are computed by a function that counts its calls per chunk."""

    def block(block_info=None):
        (c0, c1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        counts[y0, x0] = counts.get((y0, x0), 0) + 1
        return image[c0:c1, y0:y1, x0:x1]

    return da.map_blocks(block, dtype=image.dtype, chunks=da.core.normalize_chunks((4, *chunks), image.shape))


@settings(max_examples=40, deadline=None)
@given(
    seed=hst.integers(0, 2**16),
    shape=hst.tuples(hst.integers(1, 30), hst.integers(1, 30)),
    chunks=hst.tuples(hst.integers(1, 12), hst.integers(1, 12)),
    keep_rows=hst.integers(0, 10),
    rects=hst.lists(hst.tuples(*[hst.integers(-8, 38)] * 2, *[hst.integers(1, 20)] * 2), min_size=1, max_size=6),
)
def test_read_equals_pixelwise_reference(seed, shape, chunks, keep_rows, rects):
    image = np.random.default_rng(seed).integers(0, 255, (4, *shape), dtype=np.uint8)  # a 4th channel is dropped
    for array in (image, da.from_array(image, chunks=(4, *chunks))):
        reader = SlideReader(array, keep_rows=keep_rows)
        for y0, x0, h, w in rects:
            expected = _reference(image, y0, y0 + h, x0, x0 + w)
            np.testing.assert_array_equal(reader.read(y0, y0 + h, x0, x0 + w), expected)


def test_regions_read_top_to_bottom_compute_each_chunk_once():
    image = np.random.default_rng(0).integers(0, 255, (4, 100, 60), dtype=np.uint8)
    counts: dict = {}
    reader = SlideReader(_counting(image, (16, 16), counts), keep_rows=12)
    for y0 in range(-5, 100, 20):  # regions of 30 rows, 10 shared with the next: less than keep_rows
        np.testing.assert_array_equal(reader.read(y0, y0 + 30, 3, 50), _reference(image, y0, y0 + 30, 3, 50))
    assert set(counts) == {(y, x) for y in range(0, 100, 16) for x in range(0, 50, 16)}
    assert set(counts.values()) == {1}
    assert reader.n_computed == len(counts)


@pytest.mark.parametrize(("keep_rows", "computed_twice"), [(0, {(0, 0), (16, 0)}), (24, set())])
def test_keep_rows_decides_which_chunks_are_kept(keep_rows, computed_twice):
    image = np.random.default_rng(1).integers(0, 255, (3, 64, 16), dtype=np.uint8)
    counts: dict = {}
    reader = SlideReader(_counting(image, (16, 16), counts), keep_rows=keep_rows)
    reader.read(0, 32, 0, 16)  # chunk rows 0 and 1; both end within the last 24 rows
    np.testing.assert_array_equal(reader.read(8, 40, 0, 16), _reference(image, 8, 40, 0, 16))
    assert {k for k, v in counts.items() if v == 2} == computed_twice
    assert set(counts) == {(0, 0), (16, 0), (32, 0)}
