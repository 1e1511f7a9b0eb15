from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

import stpredict as st
import stpredict.tl as tl
from stpredict.errors import InputError
from stpredict.tl._evaluate import METRIC_LABELS, EvaluationResult
from stpredict.tl._matching import _unit_index


def _table(x, *, ids=None, rows=None, cols=None, genes=None, region="bins", sparse_x=False):
    n, g = x.shape
    obs = pd.DataFrame(index=[f"u{i}" for i in range(n)])
    obs["instance_id"] = np.arange(n) if ids is None else ids
    obs["region"] = pd.Categorical([region] * n)
    if rows is not None:
        obs["array_row"] = np.asarray(rows, dtype=np.int64)
        obs["array_col"] = np.asarray(cols, dtype=np.int64)
    var = pd.DataFrame(index=genes if genes is not None else [f"g{j}" for j in range(g)])
    x = sparse.csr_matrix(x.astype(np.float32)) if sparse_x else x
    adata = ad.AnnData(x, obs=obs, var=var)
    adata.uns["spatialdata_attrs"] = {"region": region, "region_key": "region", "instance_key": "instance_id"}
    return adata


def ref_pcc(a, b):
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture
def pair(rng):
    rows, cols = np.divmod(np.arange(144), 12)
    y = rng.gamma(2.0, size=(144, 30))
    y_hat = 0.7 * y + rng.normal(scale=0.8, size=y.shape)
    return y, y_hat, rows, cols


def test_evaluate_matches_reference(pair):
    y, y_hat, rows, cols = pair
    pred = _table(y_hat, rows=rows, cols=cols)
    truth = _table(y, rows=rows, cols=cols, sparse_x=True)
    y = truth.X.toarray().astype(np.float64)
    res = st.tl.evaluate(pred, truth)
    assert isinstance(res, EvaluationResult)
    pcc = np.array([ref_pcc(y[:, g], y_hat[:, g]) for g in range(30)])
    np.testing.assert_allclose(res.per_gene["pcc"], pcc, atol=1e-10)
    filled = np.nan_to_num(pcc, nan=-1)
    assert res.summary["pcc_f"] == pytest.approx(np.percentile(filled, 25))
    assert res.summary["pcc_s"] == pytest.approx(np.median(filled))
    assert res.summary["pcc_m"] == pytest.approx(filled.mean())
    assert res.summary["mse"] == pytest.approx(((y - y_hat) ** 2).mean())
    assert res.summary["mae"] == pytest.approx(np.abs(y - y_hat).mean())
    spot = [ref_pcc(y[n], y_hat[n]) for n in range(144)]
    assert res.summary["spot_pcc"] == pytest.approx(np.mean(spot))
    assert np.isfinite(res.per_gene["ssim"]).all()
    assert math.isnan(res.summary["pcc_h"])
    assert res.params["n_units"] == 144
    assert res.params["n_genes"] == 30
    frame = res.to_frame()
    assert list(frame["metric"]) == list(res.summary.index)
    assert "NOT comparable" in METRIC_LABELS["spot_pcc"]
    assert "not a PixNet metric" in METRIC_LABELS["pcc_h"]


def test_perfect_anti_and_constant_predictions(pair):
    y, _, rows, cols = pair
    truth = _table(y, rows=rows, cols=cols)
    perfect = st.tl.evaluate(_table(y.copy(), rows=rows, cols=cols), truth)
    assert perfect.summary["pcc_m"] == pytest.approx(1.0)
    assert perfect.summary["pcc_f"] == pytest.approx(1.0)
    assert perfect.summary["mse"] == 0.0
    assert perfect.summary["ssim_m"] == pytest.approx(1.0)
    anti = st.tl.evaluate(_table(-y, rows=rows, cols=cols), truth)
    assert anti.summary["pcc_m"] == pytest.approx(-1.0)
    assert anti.summary["spearman_m"] == pytest.approx(-1.0)
    const = _table(np.ones_like(y), rows=rows, cols=cols)
    assert st.tl.evaluate(const, truth).summary["pcc_m"] == -1.0
    assert math.isnan(st.tl.evaluate(const, truth, nan_policy="omit").summary["pcc_m"])
    assert math.isnan(st.tl.evaluate(const, truth, nan_policy="propagate").summary["pcc_s"])


def test_nan_policy_on_partly_constant_prediction(pair):
    y, y_hat, rows, cols = pair
    y_hat = y_hat.copy()
    y_hat[:, :5] = 3.0
    pred, truth = _table(y_hat), _table(y)
    pcc = np.array([ref_pcc(y[:, g], y_hat[:, g]) for g in range(30)])
    r_omit = st.tl.evaluate(pred, truth, nan_policy="omit")
    assert r_omit.summary["pcc_m"] == pytest.approx(np.nanmean(pcc))
    assert r_omit.summary["pcc_f"] == pytest.approx(np.nanpercentile(pcc, 25))
    r_pub = st.tl.evaluate(pred, truth)
    assert r_pub.summary["pcc_m"] == pytest.approx(np.nan_to_num(pcc, nan=-1).mean())
    assert r_pub.per_gene["pcc"].isna().sum() == 5  # the table keeps undefined correlations visible
    assert math.isnan(r_pub.summary["ssim_m"])  # no grid indices: no SSIM


def test_matching_by_instance_id_reorders_and_subsets(pair):
    y, y_hat, _, _ = pair
    truth = _table(y, ids=np.arange(144))
    perm = np.random.default_rng(1).permutation(144)[:100]
    pred = _table(y_hat[perm], ids=perm)
    res = st.tl.evaluate(pred, truth)
    assert res.params["n_units"] == 100
    want = [ref_pcc(y[perm, g], y_hat[perm, g]) for g in range(30)]
    np.testing.assert_allclose(res.per_gene["pcc"], want, atol=1e-10)


def test_matching_by_position_and_gene_intersection(pair):
    y, y_hat, rows, cols = pair
    genes = [f"g{j}" for j in range(30)]
    truth = _table(y, rows=rows, cols=cols, ids=np.arange(144) + 1000)
    order = np.random.default_rng(2).permutation(144)
    pred = _table(y_hat[order][:, ::-1], rows=rows[order], cols=cols[order], genes=genes[::-1])
    pred = ad.concat([pred, _table(np.ones((144, 1)), genes=["extra"])[order]], axis=1, merge="first")
    with pytest.raises(InputError, match="share no unit"):
        st.tl.evaluate(pred, truth)
    res = st.tl.evaluate(pred, truth, match="position")
    assert set(res.per_gene.index) == set(genes)
    for g in ("g0", "g7"):
        j = int(g[1:])
        assert res.per_gene.loc[g, "pcc"] == pytest.approx(ref_pcc(y[:, j], y_hat[:, j]))
    sub = st.tl.evaluate(pred, truth, match="position", genes=["g3", "g4"])
    assert list(sub.per_gene.index) == ["g3", "g4"]
    with pytest.raises(InputError, match="not in both tables"):
        st.tl.evaluate(pred, truth, match="position", genes=["extra"])


def test_plain_tables_match_by_obs_names(pair):
    y, y_hat, _, _ = pair
    names = pd.Index([f"cell{i}" for i in range(144)])
    genes = pd.Index([f"g{j}" for j in range(30)])
    truth = ad.AnnData(y.astype(np.float32), obs=pd.DataFrame(index=names), var=pd.DataFrame(index=genes))
    order = np.random.default_rng(5).permutation(144)
    pred = ad.AnnData(
        y_hat[order].astype(np.float32), obs=pd.DataFrame(index=names[order]), var=pd.DataFrame(index=genes)
    )
    res = st.tl.evaluate(pred, truth)
    assert res.params["match"] == "obs_names"
    assert res.params["n_units"] == 144
    y32, yh32 = y.astype(np.float32), y_hat.astype(np.float32)
    want = [ref_pcc(y32[:, g].astype(np.float64), yh32[:, g].astype(np.float64)) for g in range(30)]
    np.testing.assert_allclose(res.per_gene["pcc"], want, atol=1e-6)
    # tables with instance ids keep matching by them: obs_names differ here, ids agree
    with_ids = st.tl.evaluate(_table(y_hat), _table(y), inplace=False)
    assert with_ids.params["match"] == "instance_id"
    with pytest.raises(InputError, match="obs_names"):
        st.tl.evaluate(pred, truth, match="instance_id")


def test_evaluate_writes_into_pred_by_default(pair):
    y, y_hat, _, _ = pair
    pred, truth = _table(y_hat), _table(y)
    res = st.tl.evaluate(pred, truth)
    np.testing.assert_allclose(pred.var["pcc"].to_numpy(), res.per_gene["pcc"].to_numpy())
    assert pred.uns["stpredict"]["evaluate"]["evaluate"]["summary"]["pcc_m"] == pytest.approx(res.summary["pcc_m"])
    untouched = _table(y_hat)
    st.tl.evaluate(untouched, truth, inplace=False)
    assert "pcc" not in untouched.var
    assert "stpredict" not in untouched.uns


def test_errors_leave_inputs_unchanged(pair):
    y, y_hat, _, _ = pair
    pred, truth = _table(y_hat), _table(y)
    other = _table(y, genes=[f"h{j}" for j in range(30)])
    with pytest.raises(InputError, match="share no gene name"):
        st.tl.evaluate(pred, other, inplace=True)
    assert "pcc" not in pred.var
    assert "stpredict" not in pred.uns
    with pytest.raises(InputError, match="array_row"):
        st.tl.evaluate(pred, truth, match="position")
    with pytest.raises(InputError, match="nan_policy"):
        st.tl.evaluate(pred, truth, nan_policy="zero")
    with pytest.raises(KeyError, match="layer"):
        st.tl.evaluate(pred, truth, pred_layer="counts")
    dup = _table(y, ids=np.zeros(144, dtype=int))
    with pytest.raises(InputError, match="duplicated"):
        st.tl.evaluate(pred, dup)
    bad = _table(np.where(np.eye(144, 30) > 0, np.nan, y_hat))
    with pytest.raises(InputError, match="non-finite"):
        st.tl.evaluate(bad, truth)


def _sdata(**tables):
    """A SpatialData holding ``tables``, all annotating 144 circles ``"bins"``."""
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    bins = ShapesModel.parse(np.zeros((144, 2)), geometry=0, radius=np.ones(144), index=np.arange(144))
    parsed = {k: TableModel.parse(t) for k, t in tables.items()}  # _table wrote the annotation
    return SpatialData(shapes={"bins": bins}, tables=parsed)


def test_evaluate_takes_table_keys_of_a_spatialdata(pair):
    y, y_hat, rows, cols = pair
    sdata = _sdata(pred=_table(y_hat, rows=rows, cols=cols), truth=_table(y, rows=rows, cols=cols))
    expected = st.tl.evaluate(sdata.tables["pred"].copy(), sdata.tables["truth"], inplace=False)
    res = st.tl.evaluate("pred", "truth", sdata=sdata)
    pd.testing.assert_series_equal(res.summary, expected.summary)
    # inplace writes into the table the key names, as with the AnnData itself
    np.testing.assert_array_equal(sdata.tables["pred"].var["pcc"].to_numpy(), res.per_gene["pcc"].to_numpy())
    assert sdata.tables["pred"].uns["stpredict"]["evaluate"]["evaluate"]["params"]["n_units"] == 144
    mixed = st.tl.evaluate(_table(y_hat, rows=rows, cols=cols), "truth", sdata=sdata, inplace=False)
    pd.testing.assert_series_equal(mixed.summary, expected.summary)


def test_evaluate_unknown_table_key_lists_the_tables(pair):
    y, y_hat, _, _ = pair
    sdata = _sdata(pred=_table(y_hat), truth=_table(y))
    with pytest.raises(KeyError) as info:
        st.tl.evaluate("pred", "nope", sdata=sdata)
    assert info.value.args[0] == (
        "No table 'nope' in the SpatialData; available tables: ['pred', 'truth']. Pass one of them as `truth`."
    )
    with pytest.raises(KeyError, match="No table 'he_pixnet' in the SpatialData; .* as `pred`"):
        st.tl.evaluate("he_pixnet", sdata.tables["truth"], sdata=sdata)
    assert "pcc" not in sdata.tables["pred"].var


def test_evaluate_table_key_without_sdata_names_it(pair):
    y, y_hat, _, _ = pair
    sdata = _sdata(pred=_table(y_hat), truth=_table(y))
    with pytest.raises(InputError) as info:
        st.tl.evaluate("pred", "truth")
    assert info.value.args[0] == (
        "`pred` is the table key 'pred', but no SpatialData was given to look it up in. Pass it as `sdata=`: "
        "st.tl.evaluate('pred', 'truth', sdata=sdata)."
    )
    with pytest.raises(InputError) as info:
        st.tl.evaluate(sdata, "truth")
    assert info.value.args[0] == (
        "`pred` is a SpatialData; pass the key of its table as `pred` and the SpatialData as `sdata=`: "
        "st.tl.evaluate('pred', 'truth', sdata=sdata)."
    )
    with pytest.raises(InputError, match="`truth` must be an AnnData or a table key, got ndarray"):
        st.tl.evaluate(sdata.tables["pred"], y)


def test_region_is_matched_when_tables_hold_several(pair):
    y, y_hat, _, _ = pair
    truth = ad.concat([_table(y[:72], region="a"), _table(y[72:], region="b")], index_unique="-")
    truth.uns["spatialdata_attrs"] = {"region": ["a", "b"], "region_key": "region", "instance_key": "instance_id"}
    # Same instance ids 0..71 in both regions: ids alone are ambiguous, (region, id) pairs are not.
    with pytest.raises(InputError, match="duplicated"):
        _unit_index(truth, "instance_id", False, "truth")
    pred = ad.concat([_table(y_hat[:72], region="a"), _table(y_hat[72:], region="b")], index_unique="-")
    pred.uns["spatialdata_attrs"] = truth.uns["spatialdata_attrs"]
    res = st.tl.evaluate(pred, truth)
    assert res.params["n_units"] == 144
    assert res.per_gene.loc["g0", "pcc"] == pytest.approx(ref_pcc(y[:, 0], y_hat[:, 0]))


def test_layers_hpg_and_inplace(pair):
    y, y_hat, rows, cols = pair
    pred = _table(np.zeros_like(y_hat), rows=rows, cols=cols)
    pred.layers["pred"] = y_hat
    truth = _table(np.zeros_like(y), rows=rows, cols=cols)
    truth.layers["counts"] = y
    hpg = ["g1", "g2", "g5"]
    res = st.tl.evaluate(
        pred, truth, pred_layer="pred", truth_layer="counts", highly_predictive_genes=hpg, key_added="k"
    )
    want = [ref_pcc(y[:, j], y_hat[:, j]) for j in (1, 2, 5)]
    assert res.summary["pcc_h"] == pytest.approx(np.mean(want))
    np.testing.assert_allclose(pred.var["pcc"].to_numpy(), res.per_gene["pcc"].to_numpy())
    assert set(pred.var.columns) >= {"pcc", "spearman", "mse", "mae", "ssim"}
    record = pred.uns["stpredict"]["evaluate"]["k"]
    assert record["summary"]["pcc_m"] == pytest.approx(res.summary["pcc_m"])
    assert record["params"]["highly_predictive_genes"] == hpg
    with pytest.raises(InputError, match="highly predictive"):
        st.tl.evaluate(pred, truth, highly_predictive_genes=["nope"])
    # HPG selected over folds by the helper feeds straight into evaluate
    folds = [res, res.per_gene["pcc"] + 0.01]
    top = tl._evaluate.highly_predictive_genes(folds, n_top=5)
    assert top == list(res.per_gene["pcc"].sort_values(ascending=False).index[:5])
    assert st.tl.evaluate(pred, truth, pred_layer="pred", truth_layer="counts", highly_predictive_genes=top).summary[
        "pcc_h"
    ] == (pytest.approx(res.per_gene["pcc"].loc[top].mean()))


def test_normalize_callable_and_named(pair, monkeypatch):
    y, y_hat, _, _ = pair
    pred, truth = _table(y_hat + 10), _table(y)

    def log1p_cpm(adata):
        x = np.asarray(adata.X, dtype=np.float64)
        adata.X = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
        return adata

    res = st.tl.evaluate(pred, truth, normalize=log1p_cpm)
    ny = log1p_cpm(_table(y)).X
    nh = log1p_cpm(_table(y_hat + 10)).X
    assert res.summary["mse"] == pytest.approx(((ny - nh) ** 2).mean())
    np.testing.assert_array_equal(pred.X, y_hat + 10)  # inputs untouched

    with pytest.raises(InputError, match="number of units"):
        st.tl.evaluate(pred, truth, normalize=lambda a: a[:10].copy())


def test_normalize_by_name_and_params(rng):
    pytest.importorskip("stpredict.pp._normalize")
    counts = rng.poisson(3.0, size=(50, 8)).astype(np.float32)
    pred_counts = rng.poisson(3.0, size=(50, 8)).astype(np.float32)
    truth, pred = _table(counts), _table(pred_counts)
    res = st.tl.evaluate(pred, truth, normalize="log1p_cpm")

    def cpm(x):
        return np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)

    assert res.summary["mse"] == pytest.approx(((cpm(counts) - cpm(pred_counts)) ** 2).mean(), rel=1e-5)
    assert res.params["normalize"] == "log1p_cpm"
    np.testing.assert_array_equal(pred.X, pred_counts)  # inputs untouched
    assert "log1p_cpm" not in pred.layers
    # log10_minmax: min/max fitted on the truth and applied unchanged to the prediction
    res = st.tl.evaluate(pred, truth, normalize="log10_minmax")
    y = np.log10(1 + counts.astype(np.float64))
    lo, hi = y.min(axis=0), y.max(axis=0)
    yh = (np.log10(1 + pred_counts.astype(np.float64)) - lo) / (hi - lo + 1e-8)
    assert res.summary["mae"] == pytest.approx(np.abs((y - lo) / (hi - lo + 1e-8) - yh).mean(), rel=1e-5)
    params = {"method": "log10_minmax", "layer": None, "smooth": False, "genes": list(truth.var_names)}
    params.update(min=[0.0] * 8, max=[1.0] * 8)
    res = st.tl.evaluate(pred, truth, normalize=params)
    want = np.abs(np.log10(1 + counts.astype(np.float64)) - np.log10(1 + pred_counts.astype(np.float64))).mean()
    assert res.summary["mae"] == pytest.approx(want / (1 + 1e-8), rel=1e-5)
    assert res.params["normalize"] == "params:log10_minmax"


# ---------------------------------------------------------------- cross-scale protocol (aggregate monkeypatched)


class _FakeSData:
    def __init__(self, images, tables=None):
        self.images = images
        self.tables = tables or {}


def _grid_table(values, bin_size, region):
    """What st.tl.aggregate returns: one row per square bin of a 2-d field per gene, with grid indices."""
    ny, nx, g = values.shape
    k = int(bin_size)
    by, bx = ny // k, nx // k
    binned = values[: by * k, : bx * k].reshape(by, k, bx, k, g).mean(axis=(1, 3)).reshape(by * bx, g)
    rows, cols = np.divmod(np.arange(by * bx), bx)
    return _table(binned, rows=rows, cols=cols, region=region)


def test_evaluate_across_scales_with_truth_map(monkeypatch, rng):
    truth_map = rng.gamma(2.0, size=(64, 64, 4))
    pred_map = truth_map + rng.normal(scale=1.0, size=truth_map.shape)
    maps = {"pred": pred_map, "gt": truth_map}
    calls = []

    def fake_aggregate(
        sdata, map_key, *, bin_size=None, shapes_key=None, inplace=True, genes=None, reduce=None, tissue_key=None
    ):
        calls.append((map_key, bin_size, shapes_key, inplace, reduce, tissue_key))
        return _grid_table(maps[map_key], bin_size, f"{map_key}_{bin_size}")

    monkeypatch.setitem(vars(tl), "aggregate", fake_aggregate)  # no lazy import of the real one
    sdata = _FakeSData({"pred": None, "gt": None})
    df = st.tl.evaluate_across_scales(
        sdata, "pred", truth_map_key="gt", bin_sizes=(2, 8), reduce="mean", aggregate_kwargs={"tissue_key": False}
    )
    assert all(c[5] is False for c in calls)
    assert set(df.columns) >= {"bin_size_um", "metric", "value", "n_units", "n_genes"}
    assert len(df) == 2 * len(METRIC_LABELS)
    assert all(c[3] is False and c[4] == "mean" for c in calls)
    pcc = df[df.metric == "pcc_m"].set_index("bin_size_um")["value"]
    for b in (2, 8):
        want = st.tl.evaluate(_grid_table(pred_map, b, "p"), _grid_table(truth_map, b, "t"), match="position")
        assert pcc[float(b)] == pytest.approx(want.summary["pcc_m"])
    assert pcc[8.0] > pcc[2.0]  # averaging out independent noise raises the correlation
    assert df[df.metric == "pcc_m"].n_units.tolist() == [32 * 32, 8 * 8]


def test_evaluate_across_scales_with_measured_tables(monkeypatch, rng):
    measured = {8: _table(rng.normal(size=(20, 3)), region="bins_8um"), 16: "t16"}
    t16 = _table(rng.normal(size=(10, 3)), region="bins_16um")
    seen = []

    def fake_aggregate(sdata, map_key, *, shapes_key=None, inplace=True, genes=None, **_):
        seen.append(shapes_key)
        table = measured[8] if shapes_key == "bins_8um" else t16
        return _table(np.asarray(table.X) * 2 + 1, region="he_pixnet_" + shapes_key)  # perfect up to affine

    monkeypatch.setitem(vars(tl), "aggregate", fake_aggregate)  # no lazy import of the real one
    sdata = _FakeSData({"m": None}, {"t16": t16})
    df = st.tl.evaluate_across_scales(sdata, "m", truth=measured)
    assert seen == ["bins_8um", "bins_16um"]
    assert sorted(df.bin_size_um.unique()) == [8.0, 16.0]
    np.testing.assert_allclose(df[df.metric == "pcc_m"].value, 1.0)
    with pytest.raises(InputError, match="No measured table"):
        st.tl.evaluate_across_scales(sdata, "m", truth=measured, bin_sizes=(55,))
    with pytest.raises(InputError, match="exactly one"):
        st.tl.evaluate_across_scales(sdata, "m")
    with pytest.raises(KeyError, match="available images"):
        st.tl.evaluate_across_scales(sdata, "nope", truth=measured)
    with pytest.raises(InputError, match="sets 'match'"):
        st.tl.evaluate_across_scales(sdata, "m", truth=measured, match="position")
    with pytest.raises(KeyError) as info:  # the same lookup as st.tl.evaluate's
        st.tl.evaluate_across_scales(sdata, "m", truth={16: "nope"})
    assert info.value.args[0] == (
        "No table 'nope' in the SpatialData; available tables: ['t16']. Pass one of them as `truth[16]`."
    )


# ---------------------------------------------------------------- real data (her2st A1, 346 spots)


def test_real_her2st_mean_profile_scores_spotwise_not_genewise(data_dir):
    """SPEC §1.4: the average profile everywhere has no gene-wise signal but a high spot-wise PCC."""
    counts = pd.read_csv(data_dir / "her2st" / "A1" / "counts.tsv.gz", sep="\t", index_col=0)
    top = counts.mean(axis=0).sort_values(ascending=False).index[:250]
    x = counts[top].to_numpy(np.float64)
    y = np.log1p(x / x.sum(axis=1, keepdims=True) * 1e4)
    xy = np.array([s.split("x") for s in counts.index], dtype=np.int64)  # '<x>x<y>' = array col, row
    obs = pd.DataFrame({"instance_id": counts.index, "array_col": xy[:, 0], "array_row": xy[:, 1]})
    obs.index = counts.index
    truth = ad.AnnData(y, obs=obs, var=pd.DataFrame(index=top))
    mean_profile = ad.AnnData(np.tile(y.mean(axis=0), (len(y), 1)), obs=obs.copy(), var=pd.DataFrame(index=top))
    where = {(r, c): i for i, (r, c) in enumerate(zip(obs.array_row, obs.array_col, strict=True))}
    smooth = np.empty_like(y)
    for i, (r, c) in enumerate(zip(obs.array_row, obs.array_col, strict=True)):
        steps = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
        around = [where[(r + dr, c + dc)] for dr, dc in steps if (r + dr, c + dc) in where]
        smooth[i] = y[around].mean(axis=0) if around else y.mean(axis=0)
    neighbours = ad.AnnData(smooth, obs=obs.copy(), var=pd.DataFrame(index=top))

    flat = st.tl.evaluate(mean_profile, truth)
    assert flat.params["n_units"] == 346
    assert flat.summary["pcc_m"] == -1.0  # every gene constant: undefined -> -1 (published convention)
    assert flat.summary["spot_pcc"] > 0.55  # ... yet MagNet's spot-wise PCC is high (0.607)
    near = st.tl.evaluate(neighbours, truth)
    assert 0.1 < near.summary["pcc_m"] < 0.4  # spatial signal from neighbours: PCC@M 0.196
    assert near.summary["pcc_f"] < near.summary["pcc_s"]
    assert abs(near.summary["spot_pcc"] - flat.summary["spot_pcc"]) < 0.05  # spot-wise PCC barely notices
