from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st_

from stpredict.models._footprints import DISK, RECT, aggregate_map, footprint_weights


def _brute(cx: float, cy: float, hx: float, hy: float, kind: int, shape: tuple[int, int], ss: int = 128) -> np.ndarray:
    """Coverage of each pixel by dense supersampling (the reference)."""
    ny, nx = shape
    off = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(nx)[:, None] + off[None, :]).ravel()
    ys = (np.arange(ny)[:, None] + off[None, :]).ravel()
    X, Y = np.meshgrid(xs, ys)
    if kind == DISK:
        inside = (X - cx) ** 2 + (Y - cy) ** 2 <= hx**2
    else:
        inside = (np.abs(X - cx) <= hx) & (np.abs(Y - cy) <= hy)
    return inside.reshape(ny, ss, nx, ss).mean(axis=(1, 3)).ravel()


@settings(max_examples=25, deadline=None)
@given(
    cx=st_.floats(2, 14),
    cy=st_.floats(2, 14),
    hx=st_.floats(0.3, 6),
    hy=st_.floats(0.3, 6),
)
def test_rect_weights_exact(cx: float, cy: float, hx: float, hy: float) -> None:
    w = footprint_weights(np.array([[cx, cy]]), np.array([[hx, hy]]), np.array([RECT]), (16, 16)).toarray()[0]
    ref = _brute(cx, cy, hx, hy, RECT, (16, 16))
    assert np.abs(w - ref).max() < 2.5 / 128  # the reference itself is sampled
    x_len = min(cx + hx, 16) - max(cx - hx, 0)
    y_len = min(cy + hy, 16) - max(cy - hy, 0)
    assert w.sum() == pytest.approx(x_len * y_len, rel=1e-9)


@settings(max_examples=25, deadline=None)
@given(cx=st_.floats(5, 11), cy=st_.floats(5, 11), r=st_.floats(0.4, 5))
def test_disk_weights_match_supersampling(cx: float, cy: float, r: float) -> None:
    w = footprint_weights(np.array([[cx, cy]]), np.array([[r, r]]), np.array([DISK]), (16, 16)).toarray()[0]
    ref = _brute(cx, cy, r, r, DISK, (16, 16))
    assert np.abs(w - ref).max() <= 1 / 16 + 0.02
    assert w.sum() == pytest.approx(np.pi * r**2, rel=0.03, abs=0.05)
    assert np.all((w >= 0) & (w <= 1))


def test_disk_area_error_small_for_larger_disks() -> None:
    rng = np.random.default_rng(0)
    for _ in range(10):
        r = rng.uniform(2, 10)
        c = rng.uniform(12, 20, 2)
        w = footprint_weights(c[None], np.array([[r, r]]), np.array([DISK]), (32, 32))
        assert w.sum() == pytest.approx(np.pi * r**2, rel=5e-3)


def test_clipped_to_raster_and_several_units() -> None:
    centers = np.array([[0.0, 0.0], [8.0, 8.0], [30.0, 30.0]])
    half = np.array([[2.0, 2.0], [1.0, 1.0], [1.0, 1.0]])
    w = footprint_weights(centers, half, np.array([RECT, DISK, RECT]), (10, 10))
    assert w.shape == (3, 100)
    sums = np.asarray(w.sum(axis=1)).ravel()
    assert sums[0] == pytest.approx(4.0)  # a quarter of the 4x4 square is on the raster
    assert sums[1] == pytest.approx(np.pi, rel=0.03)
    assert sums[2] == 0


def test_aggregate_map_sum_mean_and_gradient() -> None:
    rng = np.random.default_rng(0)
    maps = torch.tensor(rng.normal(size=(2, 3, 5, 5)), dtype=torch.float32, requires_grad=True)
    w = footprint_weights(
        np.array([[2.5, 2.5], [1.0, 3.0]]), np.array([[1.5, 1.5], [1.0, 2.0]]), np.array([DISK, RECT]), (5, 5)
    )
    dense = w.toarray()
    # Unit 0 on tile 0, unit 1 on tile 1: block-diagonal weights over the batch.
    big = np.zeros((2, 50))
    big[0, :25] = dense[0]
    big[1, 25:] = dense[1]
    coo = torch.tensor(big, dtype=torch.float32).to_sparse()
    flat = maps.detach().numpy().transpose(0, 2, 3, 1).reshape(50, 3)
    out_sum = aggregate_map(maps, coo, reduce="sum", pixel_area=4.0)
    np.testing.assert_allclose(out_sum.detach().numpy(), big @ flat * 4.0, rtol=1e-5, atol=1e-5)
    out_mean = aggregate_map(maps, coo, reduce="mean")
    np.testing.assert_allclose(
        out_mean.detach().numpy(), (big @ flat) / big.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-5
    )
    out_sum[:, 1].sum().backward()
    grad = maps.grad.numpy()
    np.testing.assert_allclose(grad[0, 1].ravel(), dense[0] * 4.0, atol=1e-6)
    np.testing.assert_allclose(grad[1, 1].ravel(), dense[1] * 4.0, atol=1e-6)
    assert np.all(grad[:, [0, 2]] == 0)
    with pytest.raises(ValueError, match="reduce"):
        aggregate_map(maps, coo, reduce="median")  # type: ignore[arg-type]
