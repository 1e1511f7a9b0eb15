from __future__ import annotations

import numpy as np
import pytest
from anndata import AnnData

import stpredict as st
from stpredict._geometry import scale_levels, set_um_per_px
from stpredict._meta import get_element_meta, set_element_meta
from stpredict.errors import InputError

GENES = ["g0", "g1", "g2"]


def _sdata(n_members=3, seed=0, shape=(40, 60)):
    """An image ``he`` and ``n_members`` intensive maps ``m0``… at 2 image px per map px (two pyramid levels)."""
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel
    from spatialdata.transformations import Scale

    rng = np.random.default_rng(seed)
    he = Image2DModel.parse(
        rng.integers(0, 255, (3, 2 * shape[0], 2 * shape[1]), dtype=np.uint8),
        dims=("c", "y", "x"),
        c_coords=list("rgb"),
    )
    sdata = SpatialData(images={"he": he})
    set_um_per_px(sdata, "he", 0.5)
    maps = rng.normal(size=(n_members, len(GENES), *shape)).astype(np.float32)
    for i, values in enumerate(maps):
        el = Image2DModel.parse(
            values,
            dims=("c", "y", "x"),
            c_coords=GENES,
            transformations={"global": Scale([2.0, 2.0], axes=("x", "y"))},
            scale_factors=[2],
            chunks=(3, 16, 16),
        )
        sdata.images[f"m{i}"] = el
        set_element_meta(sdata, f"m{i}", el, {"value_kind": "intensive", "image_key": "he", "model": f"s{i}"})
    return sdata, maps


def test_mean_and_sd_maps_match_numpy_and_keep_the_contract():
    sdata, maps = _sdata()
    st.tl.ensemble_maps(sdata, map_keys=["m0", "m1", "m2"], key_added="ens")
    mean = scale_levels(sdata.images["ens"])[0]
    sd = scale_levels(sdata.images["ens_sd"])[0]
    np.testing.assert_allclose(mean.values, maps.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(sd.values, maps.std(0, ddof=1), rtol=1e-5, atol=1e-6)
    assert list(mean.coords["c"].values) == GENES
    assert len(scale_levels(sdata.images["ens"])) == len(scale_levels(sdata.images["m0"])) == 2
    meta = get_element_meta(sdata, "ens_sd")
    assert meta["value_kind"] == "intensive"
    assert meta["ensemble"] == {"members": ["m0", "m1", "m2"], "statistic": "sd", "ddof": 1}
    assert get_element_meta(sdata, "ens")["ensemble"]["statistic"] == "mean"

    st.tl.ensemble_maps(sdata, map_keys=["m0", "m1"], ddof=0, key_added="pop")
    np.testing.assert_allclose(
        scale_levels(sdata.images["pop_sd"])[0].values, np.abs(maps[0] - maps[1]) / 2, rtol=1e-5, atol=1e-6
    )


def test_ensemble_maps_aggregate_like_any_map():
    sdata, maps = _sdata()
    st.tl.ensemble_maps(sdata, map_keys=["m0", "m1", "m2"])  # default key from the image: he_ensemble
    table = st.tl.aggregate(sdata, "he_ensemble_sd", bin_size=8.0, tissue_key=False, inplace=False)
    # 8 µm bins = 8 map px at 1 µm per map px: the mean of the pixel sds of each 8 × 8 block
    sd = maps.std(0, ddof=1)
    first = table.obs.sort_values(["array_row", "array_col"]).index[0]
    np.testing.assert_allclose(np.asarray(table[first].X).ravel(), sd[:, :8, :8].mean(axis=(1, 2)), rtol=1e-5)


@pytest.mark.parametrize(
    ("keys", "kwargs", "match"),
    [
        (["m0"], {}, "at least two different maps"),
        (["m0", "m0"], {}, "at least two different maps"),
        (["m0", "nope"], {}, r"No images \['nope'\].*available images"),
        (["m0", "m1"], {"ddof": 2}, "ddof=2"),
    ],
)
def test_bad_input_is_refused_before_any_write(keys, kwargs, match):
    sdata, _ = _sdata()
    before = set(sdata.images)
    with pytest.raises(InputError, match=match):
        st.tl.ensemble_maps(sdata, map_keys=keys, **kwargs)
    assert set(sdata.images) == before


def test_members_must_be_maps_of_one_image_with_the_same_genes():
    from spatialdata.models import Image2DModel

    sdata, maps = _sdata()
    sdata.images["other_genes"] = Image2DModel.parse(maps[0][::-1].copy(), dims=("c", "y", "x"), c_coords=GENES[::-1])
    with pytest.raises(InputError, match="different genes"):
        st.tl.ensemble_maps(sdata, map_keys=["m0", "other_genes"])
    sdata.images["small"] = Image2DModel.parse(maps[0][:, :20], dims=("c", "y", "x"), c_coords=GENES)
    with pytest.raises(InputError, match="differ in shape"):
        st.tl.ensemble_maps(sdata, map_keys=["m0", "small"])
    sdata.images["unscaled"] = Image2DModel.parse(maps[0], dims=("c", "y", "x"), c_coords=GENES)
    with pytest.raises(InputError, match="placed differently"):
        st.tl.ensemble_maps(sdata, map_keys=["m0", "unscaled"])
    set_element_meta(sdata, "m2", sdata.images["m2"], {"value_kind": "density", "image_key": "he"})
    with pytest.raises(InputError, match="one kind"):
        st.tl.ensemble_maps(sdata, map_keys=["m0", "m2"])


# ------------------------------------------------------------------------------------------------ uncertainty
def _tables(n=400, seed=0):
    """Truth, a prediction whose error grows with a known sd, and that sd (gene g2 constant truth)."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(n, 3))
    truth[:, 2] = 1.0
    sd = rng.uniform(0.05, 2.0, size=(n, 3))
    pred = truth + rng.normal(size=(n, 3)) * sd
    names = [f"u{i}" for i in range(n)]

    def table(x):
        ad = AnnData(x.astype(np.float64))
        ad.obs_names, ad.var_names = names, GENES
        return ad

    return table(pred), table(sd), table(truth), (pred, sd, truth)


def test_uncertainty_scores_match_a_hand_computation():
    from scipy.stats import pearsonr, spearmanr

    pred_t, sd_t, truth_t, (pred, sd, truth) = _tables()
    out = st.tl.evaluate_uncertainty(pred_t, truth_t, sd=sd_t, confident_fraction=0.5)
    assert list(out.index) == [*GENES, "mean"]
    for j, g in enumerate(GENES[:2]):
        assert out.loc[g, "spearman_sd_error"] == pytest.approx(spearmanr(sd[:, j], np.abs(pred - truth)[:, j])[0])
        assert out.loc[g, "pcc_all"] == pytest.approx(pearsonr(pred[:, j], truth[:, j])[0])
        keep = np.argsort(sd[:, j], kind="stable")[:200]
        assert out.loc[g, "pcc_confident"] == pytest.approx(pearsonr(pred[keep, j], truth[keep, j])[0])
    assert np.isnan(out.loc["g2", "pcc_all"])  # constant truth: undefined, left out of the mean
    assert out.loc["mean", "pcc_all"] == pytest.approx(out.loc[GENES[:2], "pcc_all"].mean())
    # an informative sd: it ranks the errors and the confident half is predicted better
    assert out.loc["mean", "spearman_sd_error"] > 0.4
    assert out.loc["mean", "pcc_confident"] > out.loc["mean", "pcc_all"] + 0.1
    assert (out["n_confident"] == 200).all()


def test_an_uninformative_sd_scores_near_zero():
    pred_t, sd_t, truth_t, _ = _tables()
    sd_t.X = np.random.default_rng(5).permutation(sd_t.X)  # the sd of other units
    out = st.tl.evaluate_uncertainty(pred_t, truth_t, sd=sd_t)
    assert abs(out.loc["mean", "spearman_sd_error"]) < 0.1


def test_uncertainty_bad_input():
    pred_t, sd_t, truth_t, _ = _tables()
    with pytest.raises(InputError, match="same units and genes"):
        st.tl.evaluate_uncertainty(pred_t, truth_t, sd=sd_t[::-1].copy())
    neg = sd_t.copy()
    neg.X[0, 0] = -1
    with pytest.raises(InputError, match="negative"):
        st.tl.evaluate_uncertainty(pred_t, truth_t, sd=neg)
    with pytest.raises(InputError, match="confident_fraction"):
        st.tl.evaluate_uncertainty(pred_t, truth_t, sd=sd_t, confident_fraction=0)
