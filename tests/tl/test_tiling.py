from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as hst

from stpredict.tl._tiling import AxisGrid, resample_matrix, window_1d


@hst.composite
def grids(draw):
    context = draw(hst.integers(0, 4))
    ramp = draw(hst.integers(0, 8))
    stride = draw(hst.integers(max(1, ramp), 20))
    n = stride + 2 * context + ramp
    m = draw(hst.integers(1, 4))
    size = draw(hst.integers(1, 150))
    return AxisGrid(size=size, n=n, context=context, ramp=ramp, chunk=m * stride)


def _coverage(grid: AxisGrid) -> np.ndarray:
    """Summed blending weight over map pixels [0, size), brute force over every tile."""
    w = window_1d(grid.n, grid.context, grid.ramp).astype(np.float64)
    total = np.zeros(grid.size + grid.n + grid.stride)
    for k in range(grid.n_tiles):
        o = grid.origin(k)
        lo = max(0, o)
        total[lo : o + grid.n] += w[lo - o :]
    return total[: grid.size]


@settings(max_examples=200, deadline=None)
@given(grids())
def test_window_weights_partition_unity_and_cover_the_map(grid):
    total = _coverage(grid)
    assert (total > 0).all()
    np.testing.assert_allclose(total[grid.ramp :], 1.0, atol=1e-6)  # only the first ramp lacks a left tile


@settings(max_examples=200, deadline=None)
@given(grids(), hst.data())
def test_tiles_for_matches_brute_force(grid, data):
    start = data.draw(hst.integers(0, grid.size - 1))
    stop = data.draw(hst.integers(start + 1, grid.size))
    w = window_1d(grid.n, grid.context, grid.ramp)
    brute = [
        k
        for k in range(grid.n_tiles)
        if any(w[x - grid.origin(k)] > 0 for x in range(start, stop) if 0 <= x - grid.origin(k) < grid.n)
    ]
    assert list(grid.tiles_for(start, stop)) == brute
    for k in brute:
        a, b = grid.support(k)
        nz = np.flatnonzero(w) + grid.origin(k)
        assert (a, b) == (nz[0], nz[-1] + 1)
    if start % grid.chunk == 0 and start > 0:  # a chunk row needs the tile row above only for its ramp
        first = grid.tiles_for(start, stop)[0]
        if grid.ramp:
            assert grid.support(first)[1] - start == grid.ramp
        else:
            assert grid.support(first)[0] == start


def test_window_shape():
    w = window_1d(12, 2, 3)
    assert (w[:2] == 0).all()
    assert (w[-2:] == 0).all()
    assert (w[5:7] == 1).all()
    np.testing.assert_allclose(w[2:5] + w[7:10], [1, 1, 1], atol=1e-6)  # rising + falling ramp = 1
    assert np.all(np.diff(w[1:6]) > 0)


@settings(max_examples=100, deadline=None)
@given(hst.floats(0.3, 4.0), hst.integers(0, 40), hst.integers(1, 30), hst.integers(0, 20))
def test_resample_matrix_is_positionally_consistent(ratio, start, length, cut):
    w, lo, hi = resample_matrix(start, start + length, ratio)
    assert w.shape == (length, hi - lo)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-5)  # a constant image stays constant
    cut = min(cut, length - 1)
    part, plo, phi = resample_matrix(start + cut, start + length, ratio)
    # the weights of a pixel do not depend on the region it is resampled with
    np.testing.assert_allclose(part, w[cut:, plo - lo : phi - lo], atol=1e-6)
    assert np.abs(w[:, : plo - lo][cut:]).sum() == 0
