"""Kernel paths beyond the property tests: channel subsets, runs of bin rows sharing pixel rows, unit gathering."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stpredict.kernels import (
    _areas,
    _bins,
    axis_table,
    circle_pixel_area,
    gather_units,
    label_lut,
    labels_sum,
    rect_sum,
    rect_sum_units,
    shapes_sum,
)


def test_runs_split_at_width():
    lo = np.array([0, 3, 7, 8, 20, 21])
    hi = np.array([4, 8, 9, 20, 22, 30])
    np.testing.assert_array_equal(_bins._runs(lo, hi, 8), [0, 2, 3, 4, 5, 6])
    np.testing.assert_array_equal(_bins._runs(lo, hi, 100), [0, 6])
    np.testing.assert_array_equal(_bins._runs(lo[:0], hi[:0], 8), [0])


def test_channel_subsets_match_the_sliced_raster(rng):
    img = rng.random((5, 33, 27))
    chan = np.array([4, 1, 1])
    ye = -0.7 + 4.1 * np.arange(10)
    xe = 0.2 + 3.9 * np.arange(8)
    ty, tx = axis_table(ye[:-1], ye[1:], 33), axis_table(xe[:-1], xe[1:], 27)
    sub, ref = np.zeros((3, 9, 7)), np.zeros((3, 9, 7))
    rect_sum(img, ty, tx, sub, channels=chan)
    rect_sum(np.ascontiguousarray(img[chan]), ty, tx, ref)
    np.testing.assert_allclose(sub, ref, rtol=1e-12)
    lab = rng.integers(-1, 6, size=(33, 27))
    s_sub, g_sub = labels_sum(img, lab, np.arange(34.0), np.arange(28.0), 6, channels=chan)
    s_ref, g_ref = labels_sum(np.ascontiguousarray(img[chan]), lab, np.arange(34.0), np.arange(28.0), 6)
    np.testing.assert_allclose(s_sub, s_ref, rtol=1e-12)
    np.testing.assert_allclose(g_sub, g_ref, rtol=1e-12)
    geometry = {
        "kind": np.zeros(2, np.int8),
        "cx": np.array([10.0, 20.3]),
        "cy": np.array([12.5, 4.0]),
        "r": np.array([6.2, 3.1]),
        "bbox": np.array([[3.8, 6.3, 16.2, 18.7], [17.2, 0.9, 23.4, 7.1]]),
        "ring_ptr": np.zeros(1, np.int64),
        "ring_sign": np.zeros(0),
        "vx": np.zeros(0),
        "vy": np.zeros(0),
        "shape_ptr": np.zeros(3, np.int64),
    }
    o_sub, w_sub = np.zeros((2, 3)), np.zeros(2)
    o_ref, w_ref = np.zeros((2, 3)), np.zeros(2)
    shapes_sum(img, (0, 0), geometry, np.arange(2), o_sub, w_sub, channels=chan)
    shapes_sum(np.ascontiguousarray(img[chan]), (0, 0), geometry, np.arange(2), o_ref, w_ref)
    np.testing.assert_allclose(o_sub, o_ref, rtol=1e-12)
    np.testing.assert_allclose(w_sub, [math.pi * 6.2**2, math.pi * 3.1**2], rtol=1e-9)
    with pytest.raises(ValueError, match="channels"):
        rect_sum(img, ty, tx, sub, channels=np.array([5]))


def test_gather_units(rng):
    grid = rng.random((3, 40, 70))
    rows = rng.integers(0, 40, 1000)
    cols = rng.integers(0, 70, 1000)
    out = np.empty((1000, 3), dtype=np.float32)
    gather_units(grid, rows, cols, out)
    np.testing.assert_array_equal(out, grid[:, rows, cols].T.astype(np.float32))
    gather_units(grid, rows[:0], cols[:0], out[:0])
    view = grid[:, 5:30]  # not contiguous
    gather_units(view, rows % 25, cols, out)
    np.testing.assert_array_equal(out, view[:, rows % 25, cols].T.astype(np.float32))
    with pytest.raises(ValueError, match="index"):
        gather_units(grid, rows - 1, cols, out)
    with pytest.raises(ValueError, match="out must be"):
        gather_units(grid, rows, cols, out[:10])
    scale = rng.random(1000) * 3
    gather_units(grid, rows, cols, out, scale)
    np.testing.assert_array_equal(out, (grid[:, rows, cols] * scale).T.astype(np.float32))
    with pytest.raises(ValueError, match="scale"):
        gather_units(grid, rows, cols, out, scale[:-1])


@settings(max_examples=60, deadline=None)
@given(
    ny=st.integers(1, 50),
    nx=st.integers(1, 50),
    step=st.floats(0.4, 30.0),
    oy=st.floats(-40.0, 0.0),
    ox=st.floats(-40.0, 0.0),
    dtype=st.sampled_from([np.float32, np.float64]),
    n_c=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_rect_sum_units_equals_grid_then_gather_bit_for_bit(ny, nx, step, oy, ox, dtype, n_c, seed):
    # the direct path writes the same float64 sums, times the same factor, as the grid of sums and the gather
    rng = np.random.default_rng(seed)
    img = rng.random((n_c + 1, ny, nx)).astype(dtype)
    chan = rng.permutation(n_c + 1)[:n_c]
    ye = oy + step * np.arange(math.ceil((ny - oy) / step) + 2)
    xe = ox + step * np.arange(math.ceil((nx - ox) / step) + 2)
    ty, tx = axis_table(ye[:-1], ye[1:], ny), axis_table(xe[:-1], xe[1:], nx)
    keep = rng.random((ye.size - 1, xe.size - 1)) < 0.7
    rows, cols = np.nonzero(keep)
    units = np.full(keep.shape, -1)
    units[rows, cols] = rng.permutation(rows.size)  # any row order
    scale = rng.random(rows.size) + 0.5
    grid = np.zeros((n_c, ye.size - 1, xe.size - 1))
    rect_sum(img, ty, tx, grid, channels=chan)
    ref = np.empty((rows.size, n_c), dtype=np.float32)
    order = np.argsort(units[rows, cols])
    gather_units(grid, rows[order], cols[order], ref, scale)
    out = np.full((rows.size, n_c), np.nan, dtype=np.float32)
    rect_sum_units(img, ty, tx, units, scale, out, channels=chan)
    np.testing.assert_array_equal(out, ref)


def test_rect_sum_units_leaves_unmapped_rows_and_checks_its_arguments(rng):
    img = rng.random((2, 12, 12))
    edges = np.arange(0.0, 13.0, 4.0)
    t = axis_table(edges[:-1], edges[1:], 12)
    units = np.full((3, 3), -1)
    units[1, 2] = 0
    out = np.full((2, 2), 7.0, dtype=np.float32)
    rect_sum_units(img, t, t, units, np.array([2.0, 1.0]), out)
    np.testing.assert_allclose(out[0], 2 * img[:, 4:8, 8:12].sum(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_array_equal(out[1], [7.0, 7.0])  # no rectangle maps to row 1
    wide = axis_table(np.arange(0.0, 13.0, 4.0), np.arange(4.0, 17.0, 4.0), 12)  # the last column is off the image
    units_wide = np.full((3, 4), -1)
    units_wide[0, 3] = 1
    rect_sum_units(img, t, wide, units_wide, np.ones(2), out)
    np.testing.assert_array_equal(out[1], [0.0, 0.0])
    with pytest.raises(ValueError, match="float32"):
        rect_sum_units(img, t, t, units, np.ones(2), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="float32"):
        rect_sum_units(img, t, t, units, np.ones(2), np.zeros((2, 2), dtype=np.float32).T)
    with pytest.raises(ValueError, match="units must be"):
        rect_sum_units(img, t, t, units[:2], np.ones(2), out)
    with pytest.raises(ValueError, match="units must be"):
        rect_sum_units(img, t, t, units, np.ones(3), out)
    with pytest.raises(ValueError, match="units must be"):
        rect_sum_units(img, t, t, units, np.ones(2), out, channels=np.array([0]))
    with pytest.raises(ValueError, match="rows of out"):
        rect_sum_units(img, t, t, units + 2, np.ones(2), out)


def test_labels_sum_reads_raw_ids_through_a_lookup_table(rng):
    img = rng.random((2, 20, 30))
    ids = np.array([0, 3, 17, 40])
    big = np.zeros((25, 40), dtype=np.int32)
    big[:20, :30] = ids[rng.integers(0, 4, size=(20, 30))]
    raw = big[:20, :30]  # a strided view: read as it is
    uniq, lut = label_lut(raw)
    np.testing.assert_array_equal(uniq, [3, 17, 40])
    assert lut.size == 41
    np.testing.assert_array_equal(lut[[0, 3, 17, 40]], [-1, 0, 1, 2])
    compact = lut[raw]
    edges_y, edges_x = np.arange(21.0), np.arange(31.0)
    s_raw, g_raw = labels_sum(img, raw, edges_y, edges_x, 3, lut=lut)
    s_ref, g_ref = labels_sum(img, compact, edges_y, edges_x, 3)
    np.testing.assert_allclose(s_raw, s_ref, rtol=1e-12)
    np.testing.assert_allclose(g_raw, g_ref, rtol=1e-12)
    np.testing.assert_allclose(s_raw, np.stack([img[:, raw == i].sum(axis=1) for i in (3, 17, 40)], axis=1))
    assert label_lut(np.array([[0, -2]])) is None  # negative ids: np.unique instead
    assert label_lut(np.array([[0, 10**9]])) is None  # sparse ids: a table would be larger than the image
    uniq, lut = label_lut(np.zeros((0, 3), dtype=np.int32))
    assert uniq.size == 0


@settings(max_examples=200, deadline=None)
@given(
    r=st.one_of(st.floats(0.0, 30.0), st.integers(0, 12).map(float), st.sampled_from([0.5, 1e-9])),
    cx=st.one_of(st.floats(-4.0, 4.0), st.integers(-4, 4).map(float), st.integers(-4, 4).map(lambda v: v + 0.5)),
    cy=st.one_of(st.floats(-4.0, 4.0), st.integers(-4, 4).map(float), st.integers(-4, 4).map(lambda v: v + 0.5)),
    pad=st.integers(0, 2),
)
def test_circle_window_weights_equal_circle_pixel_area_bit_for_bit(r, cx, cy, pad):
    # the per-window weights reuse the quadrant terms of shared pixel corners: same numbers, not just close ones
    gx0, gy0 = math.floor(cx - r) - pad, math.floor(cy - r) - pad
    w, h = math.ceil(cx + r) - gx0 + pad, math.ceil(cy + r) - gy0 + pad
    weights = np.zeros((h, w))
    _areas._circle_weights(cx, cy, r, gx0, gy0, h, w, weights)
    ref = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            px, py = gx0 + j, gy0 + i
            outside = max(0.0, px - cx, cx - px - 1.0) ** 2 + max(0.0, py - cy, cy - py - 1.0) ** 2 >= r * r
            inside = max(abs(px - cx), abs(px + 1.0 - cx)) ** 2 + max(abs(py - cy), abs(py + 1.0 - cy)) ** 2 <= r * r
            if inside:
                ref[i, j] = 1.0
            elif not outside:
                ref[i, j] = circle_pixel_area(cx, cy, r, float(px), float(py), px + 1.0, py + 1.0)
    np.testing.assert_array_equal(weights, ref)
    assert weights.sum() == pytest.approx(math.pi * r * r, rel=1e-9, abs=1e-12)
