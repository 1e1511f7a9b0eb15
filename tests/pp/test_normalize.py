from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import stpredict as st
from stpredict.errors import InputError
from stpredict.pp._normalize import fit_normalize, inverse_normalize, smooth_grid


def table(counts: np.ndarray, *, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> ad.AnnData:
    n, g = counts.shape
    obs = pd.DataFrame(index=[f"u{i}" for i in range(n)])
    if rows is not None:
        obs["array_row"], obs["array_col"] = rows, cols
    return ad.AnnData(
        sparse.csr_matrix(counts.astype(np.float32)), obs=obs, var=pd.DataFrame(index=[f"g{i}" for i in range(g)])
    )


@pytest.fixture
def train_test():
    rng = np.random.default_rng(0)
    lam = rng.gamma(1.0, 4.0, 8)
    train = [table(rng.poisson(lam, (30, 8))), table(rng.poisson(lam * 2, (20, 8)))]
    test = table(rng.poisson(lam * 3, (15, 8)))
    return train, test


def test_log1p_cpm_matches_reference(train_test):
    (adata, _), _ = train_test
    raw = adata.X.copy()
    st.pp.normalize(adata, method="log1p_cpm")
    counts = raw.toarray().astype(np.float64)
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(adata.layers["log1p_cpm"], expected, rtol=1e-6)
    assert adata.layers["log1p_cpm"].dtype == np.float32
    assert (raw != adata.X).nnz == 0  # raw counts stay in X
    record = adata.uns["stpredict"]["normalize"]["log1p_cpm"]
    assert record == {"method": "log1p_cpm", "layer": None, "smooth": False, "target_sum": 1e4}


def brute_smooth(values: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    for i in range(len(rows)):
        near = [j for j in range(len(rows)) if abs(rows[j] - rows[i]) <= 1 and abs(cols[j] - cols[i]) <= 1]
        out[i] = values[near].mean(axis=0)
    return out


def test_grid_smoothing_matches_brute_force():
    rng = np.random.default_rng(1)
    grid = [(r, c) for r in range(6) for c in range(7) if rng.random() < 0.7]
    rows, cols = np.array(grid).T
    counts = rng.poisson(5, (len(grid), 4))
    adata = table(counts, rows=rows, cols=cols)
    st.pp.normalize(adata, method="log1p_cpm", smooth=True)
    unsmoothed = np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(adata.layers["log1p_cpm"], brute_smooth(unsmoothed, rows, cols), rtol=1e-5)
    assert adata.uns["stpredict"]["normalize"]["log1p_cpm"]["smooth"] is True
    values = rng.random((len(grid), 3))
    np.testing.assert_allclose(smooth_grid(values, rows, cols), brute_smooth(values, rows, cols))


def test_log10_minmax_fitted_on_training_tables_only(train_test):
    train, test = train_test
    st.pp.normalize(train, method="log10_minmax")
    params = train[0].uns["stpredict"]["normalize"]["log10_minmax"]
    assert train[1].uns["stpredict"]["normalize"]["log10_minmax"] == params
    pooled = np.log10(1 + np.vstack([t.X.toarray() for t in train]).astype(np.float64))
    np.testing.assert_allclose(params["min"], pooled.min(axis=0))
    np.testing.assert_allclose(params["max"], pooled.max(axis=0))
    both = np.vstack([t.layers["log10_minmax"] for t in train])
    assert both.min() >= 0
    assert both.max() <= 1
    np.testing.assert_allclose(both.max(axis=0), 1.0, atol=1e-6)

    st.pp.normalize(test, params=params)
    y = np.log10(1 + test.X.toarray().astype(np.float64))
    lo, hi = np.array(params["min"]), np.array(params["max"])
    np.testing.assert_allclose(test.layers["log10_minmax"], (y - lo) / (hi - lo + 1e-8), rtol=1e-5)
    assert test.layers["log10_minmax"].max() > 1  # test counts are higher: not refitted
    assert json.loads(json.dumps(params)) == params


def test_prop_log_scale_is_training_mean_total(train_test):
    train, test = train_test
    st.pp.normalize(train, method="prop_log")
    params = train[0].uns["stpredict"]["normalize"]["prop_log"]
    totals = np.concatenate([np.asarray(t.X.sum(axis=1)).ravel() for t in train])
    assert params["scale"] == pytest.approx(totals.mean())
    st.pp.normalize(test, params=params, key_added="target")
    counts = test.X.toarray().astype(np.float64)
    expected = np.log1p(counts / counts.sum(axis=1, keepdims=True) * totals.mean())
    np.testing.assert_allclose(test.layers["target"], expected, rtol=1e-5)
    assert "target" in test.uns["stpredict"]["normalize"]


@pytest.mark.parametrize("method", ["log1p_cpm", "log10_minmax", "prop_log"])
def test_inverse_round_trip(train_test, method):
    train, _ = train_test
    st.pp.normalize(train, method=method)
    params = train[0].uns["stpredict"]["normalize"][method]
    counts = train[0].X.toarray().astype(np.float64)
    back = inverse_normalize(train[0].layers[method], params=params, total_counts=counts.sum(axis=1))
    np.testing.assert_allclose(back, counts, rtol=1e-4, atol=1e-3)


def test_copy_and_layer_input(train_test):
    (adata, _), _ = train_test
    adata.layers["counts"] = adata.X.copy()
    adata.X = sparse.csr_matrix(np.full(adata.shape, 0.5, dtype=np.float32))  # not counts: must not be read
    out = st.pp.normalize(adata, layer="counts", copy=True)
    assert "log1p_cpm" not in adata.layers
    assert "stpredict" not in adata.uns
    counts = adata.layers["counts"].toarray().astype(np.float64)
    np.testing.assert_allclose(
        out.layers["log1p_cpm"], np.log1p(counts / counts.sum(axis=1, keepdims=True) * 1e4), rtol=1e-6
    )
    assert out.uns["stpredict"]["normalize"]["log1p_cpm"]["layer"] == "counts"


def test_empty_units_give_zero():
    adata = table(np.array([[0, 0, 0], [1, 2, 3]]))
    st.pp.normalize(adata)
    np.testing.assert_array_equal(adata.layers["log1p_cpm"][0], 0)


@pytest.mark.parametrize(
    ("values", "match"),
    [(np.array([[1.5, 2.0]]), "non-integer"), (np.array([[-1.0, 2.0]]), "negative"), (np.array([[np.nan, 1]]), "NaN")],
)
def test_bad_counts_leave_every_table_unchanged(values, match):
    good = table(np.array([[1, 2], [3, 4]]))
    bad = ad.AnnData(values.astype(np.float32), var=pd.DataFrame(index=["g0", "g1"]))
    with pytest.raises(InputError, match=match):
        st.pp.normalize([good, bad])
    assert not good.layers
    assert not bad.layers
    assert "stpredict" not in good.uns


def test_gene_mismatch_with_params(train_test):
    train, test = train_test
    st.pp.normalize(train[0], method="log10_minmax")
    params = train[0].uns["stpredict"]["normalize"]["log10_minmax"]
    other = test[:, ::-1].copy()
    with pytest.raises(InputError, match="genes differ"):
        st.pp.normalize(other, params=params)
    assert not other.layers
    with pytest.raises(InputError, match="same genes in the same order"):
        fit_normalize([train[0], other], method="log10_minmax")


def test_duplicated_gene_names():
    adata = table(np.array([[1, 2]]))
    adata.var_names = ["a", "a"]
    with pytest.raises(InputError, match="duplicated"):
        st.pp.normalize(adata)


def test_bad_options(train_test):
    (adata, _), _ = train_test
    with pytest.raises(InputError, match="method must be one of"):
        st.pp.normalize(adata, method="zscore")
    with pytest.raises(InputError, match="smooth=True belongs to method='log1p_cpm'"):
        st.pp.normalize(adata, method="prop_log", smooth=True)
    with pytest.raises(InputError, match="obs columns"):
        st.pp.normalize(adata, smooth=True)
    with pytest.raises(InputError, match="not a normalisation record"):
        st.pp.normalize(adata, params={"min": [0]})
    assert not adata.layers


def test_expected_counts_of_a_density_map_are_normalised_like_counts():
    """A density map summed over units (st.tl.aggregate) gives expected counts: normalise them like measured ones."""
    sdata = st.datasets.synthetic(shape_um=(400.0, 400.0), um_per_px=2.0, n_genes=4, layout="visium", seed=1)
    measured = sdata.tables["table"]
    st.pp.normalize(measured, method="log1p_cpm")
    params = measured.uns["stpredict"]["normalize"]["log1p_cpm"]
    expected = st.tl.aggregate(sdata, "truth", shapes_key="spots", inplace=False)
    assert expected.uns["stpredict"]["value_kind"] == "density"
    assert np.any(np.round(expected.X) != expected.X)  # non-integer: refused as raw counts before
    st.pp.normalize(expected, params=params)
    x = np.asarray(expected.X, dtype=np.float64)
    reference = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    np.testing.assert_allclose(expected.layers["log1p_cpm"], reference, rtol=1e-5)
    result = st.tl.evaluate(expected, measured, normalize=params, genes=list(measured.var_names))
    assert result.summary["pcc_m"] > 0.5  # expected and Poisson-drawn counts of the same spots agree
    # the same non-integer values without the density record are not counts
    plain = ad.AnnData(expected.X.copy(), var=expected.var.copy())
    with pytest.raises(InputError, match="non-integer"):
        st.pp.normalize(plain, params=params)
