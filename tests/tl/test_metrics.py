from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_h
from scipy.stats import pearsonr, spearmanr

from stpredict.errors import InputError
from stpredict.tl._metrics import (
    genewise_pcc,
    genewise_spearman,
    grid_raster_index,
    grid_ssim,
    highly_predictive_genes,
    mae,
    mse,
    pcc_summary,
    policy_mean,
    spotwise_pcc,
)

# ---------------------------------------------------------------- plain reference implementations


def ref_pearson(a, b):
    """Textbook Pearson correlation with explicit loops; NaN for a constant vector."""
    n = len(a)
    if n < 2 or len(set(a)) == 1 or len(set(b)) == 1:
        return math.nan
    ma = sum(a) / n
    mb = sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb)


def ref_compute_correlations(y, y_hat):
    """Yan98/EGN compute_correlations: per-gene pearsonr, NaN -> -1."""
    r = [ref_pearson(list(y[:, g]), list(y_hat[:, g])) for g in range(y.shape[1])]
    return np.nan_to_num(np.array(r, dtype=float), nan=-1.0)


def ref_quartile(values, q):
    """Linear-interpolation quantile of a sorted list (numpy's default method), written out."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# ---------------------------------------------------------------- gene-wise PCC


def test_genewise_pcc_matches_loop_reference_and_scipy(rng):
    y = rng.normal(size=(40, 12))
    y_hat = 0.5 * y + rng.normal(size=y.shape)
    got = genewise_pcc(y, y_hat)
    want = ref_compute_correlations(y, y_hat)
    np.testing.assert_allclose(got, want, atol=1e-12)
    np.testing.assert_allclose(got, [pearsonr(y[:, g], y_hat[:, g])[0] for g in range(12)], atol=1e-12)


def test_hand_computed_cases():
    y = np.array([[1.0, 1.0, 2.0], [2.0, 2.0, 2.0], [3.0, 3.0, 2.0], [4.0, 4.0, 2.0]])
    perfect = y.copy()
    perfect[:, 1] = 10 * y[:, 1] + 3  # a positive affine map is still a perfect prediction
    r = genewise_pcc(y, perfect, nan_policy="propagate")
    assert r[0] == pytest.approx(1.0)
    assert r[1] == pytest.approx(1.0)
    assert math.isnan(r[2])  # constant truth
    anti = -y
    r = genewise_pcc(y, anti)
    np.testing.assert_allclose(r, [-1.0, -1.0, -1.0])  # third is NaN -> -1 under the published policy
    constant_pred = np.full_like(y, 0.1)
    r = genewise_pcc(y, constant_pred)
    np.testing.assert_array_equal(r, [-1.0, -1.0, -1.0])
    assert np.isnan(genewise_pcc(y, constant_pred, nan_policy="omit")).all()


def test_pcc_of_hand_example():
    # x = [1, 2, 3], y = [1, 3, 2]: cov = 1, var_x = var_y = 2  ->  r = 0.5
    assert genewise_pcc(np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [3.0], [2.0]]))[0] == pytest.approx(0.5)


def test_constant_float_column_is_nan_not_rounding_noise():
    y = np.array([[0.1], [0.2], [0.4]])
    y_hat = np.full((3, 1), 0.1 + 0.2)  # 0.30000000000000004 everywhere
    assert math.isnan(genewise_pcc(y, y_hat, nan_policy="propagate")[0])


def test_constant_map_aggregated_with_float32_rounding_is_undefined_not_scored():
    # A constant map averaged over units of different pixel counts differs by an ulp or two between units.
    y = np.array([[0.1], [0.2], [0.4], [0.3]])
    c = np.float32(5.3)
    y_hat = np.array([[c], [np.nextafter(c, np.float32(6))], [c], [np.nextafter(c, np.float32(0))]], dtype=np.float64)
    assert np.ptp(y_hat) > 0
    assert genewise_pcc(y, y_hat)[0] == -1.0  # undefined → −1 under the published policy
    # a real float32 signal, far above rounding, is still scored
    signal = np.array([[5.3], [5.31], [5.32], [5.33]], dtype=np.float32).astype(np.float64)
    assert genewise_pcc(y, signal)[0] == pytest.approx(np.corrcoef(y[:, 0], signal[:, 0])[0, 1])


def test_spearman_matches_scipy(rng):
    y = rng.integers(0, 5, size=(30, 6)).astype(float)  # ties
    y_hat = y + rng.normal(size=y.shape)
    got = genewise_spearman(y, y_hat)
    want = [spearmanr(y[:, g], y_hat[:, g])[0] for g in range(6)]
    np.testing.assert_allclose(got, want, atol=1e-12)


# ---------------------------------------------------------------- summaries and NaN policies


def test_pcc_summary_policies():
    pcc = np.array([0.2, np.nan, 0.6, 0.4, np.nan])
    s = pcc_summary(pcc, nan_policy="minus_one")
    filled = [0.2, -1.0, 0.6, 0.4, -1.0]
    assert s["pcc_f"] == pytest.approx(ref_quartile(filled, 0.25))
    assert s["pcc_s"] == pytest.approx(0.2)
    assert s["pcc_m"] == pytest.approx(sum(filled) / 5)
    s = pcc_summary(pcc, nan_policy="omit")
    assert s["pcc_f"] == pytest.approx(0.3)
    assert s["pcc_s"] == pytest.approx(0.4)
    assert s["pcc_m"] == pytest.approx(0.4)
    s = pcc_summary(pcc, nan_policy="propagate")
    assert all(math.isnan(v) for v in s.values())
    with pytest.raises(InputError, match="nan_policy"):
        pcc_summary(pcc, nan_policy="zero")


def test_summary_on_random_data_matches_reference(rng):
    y = rng.normal(size=(50, 250))
    y_hat = y * rng.uniform(-0.5, 1, size=250) + rng.normal(size=y.shape)
    y_hat[:, :3] = 1.0  # constant predictions -> -1 under the published convention
    pcc = genewise_pcc(y, y_hat)
    ref = list(ref_compute_correlations(y, y_hat))
    s = pcc_summary(pcc)
    assert s["pcc_f"] == pytest.approx(ref_quartile(ref, 0.25), abs=1e-12)
    assert s["pcc_s"] == pytest.approx(ref_quartile(ref, 0.5), abs=1e-12)
    assert s["pcc_m"] == pytest.approx(sum(ref) / len(ref), abs=1e-12)
    assert policy_mean(np.array([np.nan, 1.0]), nan_policy="omit") == 1.0


def test_mse_mae_hand_and_random(rng):
    y = np.array([[0.0, 1.0], [2.0, 3.0]])
    y_hat = np.array([[1.0, 1.0], [0.0, 6.0]])
    assert mse(y, y_hat) == pytest.approx((1 + 0 + 4 + 9) / 4)
    assert mae(y, y_hat) == pytest.approx((1 + 0 + 2 + 3) / 4)
    a = rng.normal(size=(7, 5))
    b = rng.normal(size=(7, 5))
    assert mse(a, b) == pytest.approx(sum((a[i, j] - b[i, j]) ** 2 for i in range(7) for j in range(5)) / 35)
    assert mse(a, a) == 0.0
    with pytest.raises(InputError, match="same shape"):
        mse(a, b[:, :4])


# ---------------------------------------------------------------- spot-wise PCC (MagNet)


def test_spotwise_pcc_matches_reference_rows(rng):
    y = rng.normal(size=(9, 30))
    y_hat = y + rng.normal(size=y.shape)
    got = spotwise_pcc(y, y_hat)
    np.testing.assert_allclose(got, [ref_pearson(list(y[n]), list(y_hat[n])) for n in range(9)], atol=1e-12)


def test_spotwise_pcc_rewards_mean_profile_where_genewise_does_not(rng):
    """Predicting the average profile everywhere: high spot-wise PCC, gene-wise PCC undefined (-1)."""
    gene_means = np.linspace(0.5, 8.0, 40)
    y = gene_means + rng.normal(scale=0.5, size=(60, 40))
    y_hat = np.tile(y.mean(axis=0), (60, 1))
    assert spotwise_pcc(y, y_hat).mean() > 0.9
    assert (genewise_pcc(y, y_hat) == -1).all()


# ---------------------------------------------------------------- property tests


@settings(max_examples=40, deadline=None)
@given(
    n=st_h.integers(3, 12),
    g=st_h.integers(1, 5),
    seed=st_h.integers(0, 2**16),
    scale=st_h.floats(0.1, 10),
    shift=st_h.floats(-5, 5),
)
def test_pcc_properties(n, g, seed, scale, shift):
    r = np.random.default_rng(seed)
    y = r.normal(size=(n, g))
    y_hat = r.normal(size=(n, g))
    base = genewise_pcc(y, y_hat, nan_policy="propagate")
    np.testing.assert_allclose(genewise_pcc(y, scale * y_hat + shift, nan_policy="propagate"), base, atol=1e-9)
    np.testing.assert_allclose(genewise_pcc(y_hat, y, nan_policy="propagate"), base, atol=1e-12)
    np.testing.assert_allclose(genewise_pcc(y, y, nan_policy="propagate"), 1.0, atol=1e-9)
    np.testing.assert_allclose(genewise_pcc(y, -y, nan_policy="propagate"), -1.0, atol=1e-9)
    assert np.all(np.abs(base) <= 1.0)
    np.testing.assert_allclose(base, [ref_pearson(list(y[:, j]), list(y_hat[:, j])) for j in range(g)], atol=1e-9)


# ---------------------------------------------------------------- SSIM on a grid


def test_grid_ssim_matches_skimage_on_full_grid(rng):
    from skimage.metrics import structural_similarity

    rows, cols = np.divmod(np.arange(100), 10)
    y = rng.random((100, 3))
    y_hat = y + 0.1 * rng.normal(size=y.shape)
    got = grid_ssim(y, y_hat, rows + 5, cols + 2)  # offsets do not matter
    for g in range(3):
        lo, hi = min(y[:, g].min(), y_hat[:, g].min()), max(y[:, g].max(), y_hat[:, g].max())
        a = ((y[:, g] - lo) / (hi - lo)).reshape(10, 10)
        b = ((y_hat[:, g] - lo) / (hi - lo)).reshape(10, 10)
        assert got[g] == pytest.approx(structural_similarity(a, b, win_size=7, data_range=1.0))
    assert grid_ssim(y, y, rows, cols) == pytest.approx(np.ones(3))


def ref_local_ssim(a, b, i, j, win=7):
    """SSIM of the win × win window centred on (i, j), as skimage computes it (sample covariances)."""
    h = win // 2
    wa = a[i - h : i + h + 1, j - h : j + h + 1].ravel()
    wb = b[i - h : i + h + 1, j - h : j + h + 1].ravel()
    n = wa.size
    ma, mb = wa.mean(), wb.mean()
    va = ((wa - ma) ** 2).sum() / (n - 1)
    vb = ((wb - mb) ** 2).sum() / (n - 1)
    cov = ((wa - ma) * (wb - mb)).sum() / (n - 1)
    c1, c2 = 0.01**2, 0.03**2
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))


def test_grid_ssim_partial_grid_averages_unit_cells_only(rng):
    rows, cols = np.divmod(np.arange(196), 14)
    keep = ~((rows < 6) & (cols < 6))  # an empty corner, as outside tissue
    rows, cols = rows[keep], cols[keep]
    y = rng.random((len(rows), 2))
    y_hat = rng.random((len(rows), 2))
    got = grid_ssim(y, y_hat, rows, cols)
    for g in range(2):
        lo, hi = min(y[:, g].min(), y_hat[:, g].min()), max(y[:, g].max(), y_hat[:, g].max())
        a, b = np.zeros((14, 14)), np.zeros((14, 14))
        a[rows, cols] = (y[:, g] - lo) / (hi - lo)
        b[rows, cols] = (y_hat[:, g] - lo) / (hi - lo)
        inner = [(i, j) for i, j in zip(rows, cols, strict=True) if 3 <= i < 11 and 3 <= j < 11]
        want = np.mean([ref_local_ssim(a, b, i, j) for i, j in inner])
        assert got[g] == pytest.approx(want, abs=1e-10)
    assert np.all(np.abs(got) < 0.3)  # independent noise: the zero-filled corner does not inflate SSIM


def test_hexagonal_grid_is_compacted():
    rows = np.repeat(np.arange(4), 4)
    cols = np.array([c + (r % 2) for r in range(4) for c in (0, 2, 4, 6)])  # Visium: row + col even
    r, c = grid_raster_index(rows + 10, cols + 20)
    assert np.array_equal(r, rows)
    assert np.array_equal(c, np.tile(np.arange(4), 4))
    square_r, square_c = grid_raster_index(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    assert np.array_equal(square_c, [0, 1, 0, 1])


def test_grid_ssim_too_small_or_constant_is_nan():
    y = np.arange(4.0).reshape(4, 1)
    assert np.isnan(grid_ssim(y, y, np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))).all()
    rows, cols = np.divmod(np.arange(25), 5)
    const = np.ones((25, 1))
    assert np.isnan(grid_ssim(const, const, rows, cols)[0])
    assert np.isfinite(grid_ssim(np.arange(25.0)[:, None], const, rows, cols)[0])  # 5×5 raster, window 5


# ---------------------------------------------------------------- highly predictive genes (TRIPLEX)


def test_highly_predictive_genes_reference():
    genes = [f"g{i}" for i in range(6)]
    folds = [
        pd.Series([0.1, 0.5, 0.3, 0.9, np.nan, 0.2], index=genes),
        pd.Series([0.2, 0.6, 0.1, 0.8, 0.0, 0.7], index=genes),
    ]
    # Per-fold ascending ranks (argsort(argsort(pcc)) + 1; NaN as -1), averaged, best first.
    r1 = np.array([2, 5, 4, 6, 1, 3])
    r2 = np.array([3, 4, 2, 6, 1, 5])
    mean = (r1 + r2) / 2
    want = [genes[i] for i in sorted(range(6), key=lambda i: -mean[i])][:3]
    assert highly_predictive_genes(folds, n=3) == want == ["g3", "g1", "g5"]
    assert highly_predictive_genes(pd.concat(folds, axis=1), n=3) == want
    assert highly_predictive_genes([dict(zip(genes, [0.1, 0.5, 0.3, 0.9, 0.0, 0.2], strict=True))], n=2) == [
        "g3",
        "g1",
    ]


def test_highly_predictive_genes_errors():
    with pytest.raises(InputError, match="at least one fold"):
        highly_predictive_genes([])
    with pytest.raises(InputError, match="share no gene"):
        highly_predictive_genes([pd.Series([0.1], index=["a"]), pd.Series([0.1], index=["b"])])
