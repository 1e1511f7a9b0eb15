"""Property tests of the aggregation kernels against plain brute-force references."""

from __future__ import annotations

import concurrent.futures
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stpredict.kernels import _bins as kernels
from stpredict.kernels import axis_table, circle_pixel_area, labels_sum, polygon_pixel_area, rect_sum, shapes_sum

SETTINGS = settings(max_examples=40, deadline=None)


def _overlap_1d(a: float, b: float, n: int) -> np.ndarray:
    """Overlap of [a, b) with each pixel [j, j+1), j < n, written out plainly."""
    j = np.arange(n, dtype=np.float64)
    return np.maximum(0.0, np.minimum(b, j + 1) - np.maximum(a, j))


def _brute_rect(img: np.ndarray, ye: np.ndarray, xe: np.ndarray) -> np.ndarray:
    n_c, ny, nx = img.shape
    out = np.zeros((n_c, ye.size - 1, xe.size - 1))
    for r in range(ye.size - 1):
        wy = _overlap_1d(ye[r], ye[r + 1], ny)
        for k in range(xe.size - 1):
            wx = _overlap_1d(xe[k], xe[k + 1], nx)
            out[:, r, k] = (img * np.outer(wy, wx)[None]).sum(axis=(1, 2))
    return out


@SETTINGS
@given(
    ny=st.integers(1, 40),
    nx=st.integers(1, 40),
    step=st.floats(0.3, 50.0),
    oy=st.floats(-60.0, 0.0),
    ox=st.floats(-60.0, 0.0),
    dtype=st.sampled_from([np.float32, np.float64]),
    seed=st.integers(0, 2**16),
)
def test_rect_sum_matches_brute_force(ny, nx, step, oy, ox, dtype, seed):
    rng = np.random.default_rng(seed)
    img = rng.random((2, ny, nx)).astype(dtype)
    ye = oy + step * np.arange(math.ceil((ny - oy) / step) + 2)
    xe = ox + step * np.arange(math.ceil((nx - ox) / step) + 2)
    out = np.zeros((2, ye.size - 1, xe.size - 1))
    rect_sum(img, axis_table(ye[:-1], ye[1:], ny), axis_table(xe[:-1], xe[1:], nx), out)
    np.testing.assert_allclose(out, _brute_rect(img.astype(np.float64), ye, xe), rtol=1e-5, atol=1e-6)
    # the bins cover the raster: their sum is the raster's total
    np.testing.assert_allclose(out.sum(axis=(1, 2)), img.astype(np.float64).sum(axis=(1, 2)), rtol=1e-6)


@SETTINGS
@given(
    ny=st.integers(2, 60),
    nx=st.integers(2, 60),
    cut_y=st.integers(1, 59),
    cut_x=st.integers(1, 59),
    seed=st.integers(0, 99),
)
def test_rect_sum_blockwise_equals_whole(ny, nx, cut_y, cut_x, seed):
    cut_y, cut_x = min(cut_y, ny - 1), min(cut_x, nx - 1)
    rng = np.random.default_rng(seed)
    img = rng.random((1, ny, nx))
    ye = -1.3 + 7.7 * np.arange(12)
    xe = -0.2 + 7.7 * np.arange(12)
    whole = np.zeros((1, 11, 11))
    rect_sum(img, axis_table(ye[:-1], ye[1:], ny), axis_table(xe[:-1], xe[1:], nx), whole)
    parts = np.zeros_like(whole)
    for y0, y1 in ((0, cut_y), (cut_y, ny)):
        for x0, x1 in ((0, cut_x), (cut_x, nx)):
            block = img[:, y0:y1, x0:x1]
            ty = axis_table(ye[:-1] - y0, ye[1:] - y0, y1 - y0)
            tx = axis_table(xe[:-1] - x0, xe[1:] - x0, x1 - x0)
            rect_sum(block, ty, tx, parts)
    np.testing.assert_allclose(parts, whole, rtol=1e-10, atol=1e-12)


def _brute_labels(img, lab_hi, factor):
    """Labels at ``factor`` × the raster resolution: each map pixel splits into factor² label pixels."""
    up = np.repeat(np.repeat(img, factor, axis=1), factor, axis=2) / factor**2
    ids = np.unique(lab_hi[lab_hi > 0])
    return ids, np.stack([up[:, lab_hi == i].sum(axis=1) for i in ids], axis=1)


@SETTINGS
@given(
    ny=st.integers(1, 20),
    nx=st.integers(1, 20),
    factor=st.integers(1, 3),
    n_lab=st.integers(1, 6),
    seed=st.integers(0, 999),
)
def test_labels_sum_finer_labels(ny, nx, factor, n_lab, seed):
    rng = np.random.default_rng(seed)
    img = rng.random((3, ny, nx))
    lab = rng.integers(0, n_lab + 1, size=(ny * factor, nx * factor))
    lab[0, 0] = n_lab  # at least one labelled pixel
    ids, ref = _brute_labels(img, lab, factor)
    uniq, inv = np.unique(lab, return_inverse=True)
    compact = inv.reshape(lab.shape) - (1 if uniq[0] == 0 else 0)
    keep = uniq[uniq > 0]
    edges_y = np.arange(lab.shape[0] + 1) / factor
    edges_x = np.arange(lab.shape[1] + 1) / factor
    sums, geom = labels_sum(img, compact, edges_y, edges_x, keep.size)
    np.testing.assert_array_equal(keep, ids)
    np.testing.assert_allclose(sums, ref, rtol=1e-9, atol=1e-12)
    counts = np.array([(lab == i).sum() for i in ids]) / factor**2
    np.testing.assert_allclose(geom[0], counts, rtol=1e-12)


def _mc_area(inside, x0, y0, n=400):
    """Midpoint-rule area of a pixel's inside part (n² samples); error ≤ perimeter-ish / n."""
    t = (np.arange(n) + 0.5) / n
    xx, yy = np.meshgrid(x0 + t, y0 + t)
    return inside(xx, yy).mean()


@settings(max_examples=60, deadline=None)
@given(cx=st.floats(-3, 3), cy=st.floats(-3, 3), r=st.floats(0.05, 4), x0=st.integers(-4, 3), y0=st.integers(-4, 3))
def test_circle_pixel_area_against_sampling(cx, cy, r, x0, y0):
    exact = circle_pixel_area(cx, cy, r, x0, y0, x0 + 1.0, y0 + 1.0)
    ref = _mc_area(lambda x, y: (x - cx) ** 2 + (y - cy) ** 2 <= r * r, x0, y0)
    assert abs(exact - ref) < 0.01
    assert 0.0 <= exact <= 1.0 + 1e-12


@settings(max_examples=30, deadline=None)
@given(cx=st.floats(-2, 2), cy=st.floats(-2, 2), r=st.floats(0.1, 6))
def test_circle_areas_partition(cx, cy, r):
    total = sum(
        circle_pixel_area(cx, cy, r, float(i), float(j), i + 1.0, j + 1.0) for i in range(-9, 9) for j in range(-9, 9)
    )
    assert total == pytest.approx(math.pi * r * r, rel=1e-9)


def _random_star(rng, n, cx, cy, r):
    # one jittered angle per slot: consecutive angles < π apart, so the ring is simple (star-shaped about the centre)
    ang = (np.arange(n) + rng.uniform(0, 0.4, n)) * (2 * np.pi / n)
    rad = r * rng.uniform(0.3, 1.0, n)
    return cx + rad * np.cos(ang), cy + rad * np.sin(ang)


def _shoelace(xs, ys):
    return 0.5 * abs(np.dot(xs, np.roll(ys, -1)) - np.dot(np.roll(xs, -1), ys))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 12), seed=st.integers(0, 9999), r=st.floats(0.3, 5))
def test_polygon_pixel_areas_partition_and_sampling(n, seed, r):
    rng = np.random.default_rng(seed)
    xs, ys = _random_star(rng, n, rng.uniform(-1, 1), rng.uniform(-1, 1), r)
    areas = {
        (i, j): polygon_pixel_area(xs, ys, float(i), float(j), i + 1.0, j + 1.0)
        for i in range(-7, 7)
        for j in range(-7, 7)
    }
    assert sum(areas.values()) == pytest.approx(_shoelace(xs, ys), rel=1e-9, abs=1e-12)
    from matplotlib.path import Path

    path = Path(np.c_[xs, ys])
    for i, j in [(0, 0), (-1, 0), (0, -1)]:
        ref = _mc_area(lambda x, y: path.contains_points(np.c_[x.ravel(), y.ravel()]).reshape(x.shape), i, j, n=200)
        assert abs(areas[i, j] - ref) < 0.02


def _geometry(circles, polygons):
    """Pack circles [(cx, cy, r)] and polygons [[(xs, ys, sign), ...]] into the kernel layout."""
    kind, cx, cy, rr, bbox, ring_ptr, ring_sign, vx, vy, shape_ptr = [], [], [], [], [], [0], [], [], [], [0]
    for x, y, r in circles:
        kind.append(0), cx.append(x), cy.append(y), rr.append(r), bbox.append((x - r, y - r, x + r, y + r))
        shape_ptr.append(shape_ptr[-1])
    for rings in polygons:
        kind.append(1), cx.append(0), cy.append(0), rr.append(0)
        ext = rings[0]
        bbox.append((ext[0].min(), ext[1].min(), ext[0].max(), ext[1].max()))
        for xs, ys, sign in rings:
            vx.extend(xs), vy.extend(ys), ring_sign.append(sign), ring_ptr.append(ring_ptr[-1] + len(xs))
        shape_ptr.append(shape_ptr[-1] + len(rings))
    f = lambda v: np.asarray(v, dtype=np.float64)  # noqa: E731
    return {
        "kind": np.asarray(kind, np.int8),
        "cx": f(cx),
        "cy": f(cy),
        "r": f(rr),
        "bbox": f(bbox).reshape(-1, 4),
        "ring_ptr": np.asarray(ring_ptr, np.int64),
        "ring_sign": f(ring_sign),
        "vx": f(vx),
        "vy": f(vy),
        "shape_ptr": np.asarray(shape_ptr, np.int64),
    }


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 9999), cut=st.integers(1, 23))
def test_shapes_sum_matches_brute_force_blockwise(seed, cut):
    rng = np.random.default_rng(seed)
    img = rng.random((2, 24, 24))
    circles = [(rng.uniform(-2, 26), rng.uniform(-2, 26), rng.uniform(0.2, 7)) for _ in range(3)]
    xs, ys = _random_star(rng, 7, 12, 12, 9)
    hx, hy = _random_star(rng, 5, 12, 12, 0.1)
    hx, hy = 12 + (hx - 12), 12 + (hy - 12)
    polygons = [
        [(xs, ys, 1.0)],
        [
            (np.array([3, 15, 15, 3.0]), np.array([3, 3, 15, 15.0]), 1.0),
            (np.array([6, 9, 9, 6.0]), np.array([6, 6, 9, 9.0]), -1.0),
        ],
    ]
    geom = _geometry(circles, polygons)
    n = len(circles) + len(polygons)
    out = np.zeros((n, 2))
    wout = np.zeros(n)
    for y0, y1 in ((0, cut), (cut, 24)):
        block = img[:, y0:y1]
        shapes_sum(block, (y0, 0), geom, np.arange(n), out, wout)
    # brute force: per pixel weights from the scalar exact-area functions
    for s in range(n):
        w = np.zeros((24, 24))
        for i in range(24):
            for j in range(24):
                if s < len(circles):
                    w[i, j] = circle_pixel_area(*circles[s], j, i, j + 1.0, i + 1.0)
                else:
                    w[i, j] = sum(
                        sg * polygon_pixel_area(px, py, j, i, j + 1.0, i + 1.0)
                        for px, py, sg in polygons[s - len(circles)]
                    )
        np.testing.assert_allclose(out[s], (img * w).sum(axis=(1, 2)), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(wout[s], w.sum(), rtol=1e-9, atol=1e-12)
    assert wout[len(circles) + 1] == pytest.approx(144 - 9)


def test_kernels_from_worker_threads():
    rng = np.random.default_rng(0)
    img = rng.random((4, 64, 64)).astype(np.float32)
    e = np.arange(0, 65, 8.0)
    table = axis_table(e[:-1], e[1:], 64)

    def job(_):
        out = np.zeros((4, 8, 8))
        rect_sum(img, table, table, out)
        return out

    ref = job(0)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(job, range(8)))
    for r in results:
        np.testing.assert_allclose(r, ref, rtol=1e-12)
    np.testing.assert_allclose(ref, img.reshape(4, 8, 8, 8, 8).sum(axis=(2, 4)), rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    ny=st.integers(1, 70),
    nx=st.integers(1, 30),
    step=st.floats(0.3, 12.0),
    oy=st.floats(-15.0, 0.0),
    run_rows=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_runs_of_bin_rows_share_pixel_rows(ny, nx, step, oy, run_rows, seed):
    # short runs: many tasks, and bin rows whose shared pixel row is carried to the next bin row of the run
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_RUN_ROWS", run_rows)
        _check_runs(ny, nx, step, oy, seed)


def _check_runs(ny, nx, step, oy, seed):
    rng = np.random.default_rng(seed)
    img = rng.random((2, ny, nx)).astype(np.float32)
    ye = oy + step * np.arange(math.ceil((ny - oy) / step) + 2)
    xe = -0.4 + 3.3 * np.arange(math.ceil((nx + 0.4) / 3.3) + 1)
    out = np.zeros((2, ye.size - 1, xe.size - 1))
    rect_sum(img, axis_table(ye[:-1], ye[1:], ny), axis_table(xe[:-1], xe[1:], nx), out)
    np.testing.assert_allclose(out, _brute_rect(img.astype(np.float64), ye, xe), rtol=1e-5, atol=1e-6)
