from __future__ import annotations

import math

import _training_data as helpers
import numpy as np
import pytest
import torch

import stpredict as st
from stpredict.errors import InputError
from stpredict.models import DenseModel
from stpredict.models._baselines import EmbeddingRidge, SpotCNN

GENES = ["g0", "g1", "g2"]
TINY = {"encoder": "test_efficientnet", "crop_um": 24.0, "stride_um": 8.0, "tile_size": 64}


@pytest.fixture(scope="module")
def sdata():
    return helpers.make_sdata(size=192)


def _spot_values(model, sdata) -> tuple[np.ndarray, np.ndarray]:
    """Paint the whole (192 px) image in one tile and read the map at the spot centres."""
    img = np.asarray(sdata.images["he"].data)
    maps = model.predict_tiles(img[None], device="cpu")[0]
    xy = sdata.tables["table"].obsm["spatial"]
    s = model.output_stride
    pred = maps[:, (xy[:, 1] // s).astype(int), (xy[:, 0] // s).astype(int)].T
    from stpredict.models._data import log1p_cpm

    return pred, log1p_cpm(sdata.tables["table"].X)


def test_windows_are_centred_on_map_pixels() -> None:
    model = SpotCNN(GENES, **TINY)
    tile = torch.arange(64 * 64, dtype=torch.float32).reshape(1, 1, 64, 64).repeat(1, 3, 1, 1)
    crops = model._windows(tile)
    c, s = model.crop_size, model.output_stride
    assert crops.shape == (64, 3, c, c)
    for i, j in [(0, 0), (3, 5), (7, 7)]:
        centre = crops[i * 8 + j, 0, c // 2, c // 2]
        assert float(centre) == float(tile[0, 0, i * s + s // 2, j * s + s // 2])


def test_spotcnn_fit_predict_save_load(sdata, tmp_path) -> None:
    torch.manual_seed(0)
    model = SpotCNN(GENES, **TINY)
    assert isinstance(model, DenseModel)
    assert (model.crop_size, model.output_stride, model.context, model.value_kind) == (24, 8, 12, "intensive")
    model.fit(sdata, max_epochs=2, batch_size=8, tiles_per_epoch=16, show_progress_bar=False, device="cpu")
    assert len(model.fit_history["train_loss"]) == 2
    tiles = np.random.default_rng(0).integers(0, 255, (2, 3, 64, 64), dtype=np.uint8)
    out = model.predict_tiles(tiles, device="cpu")
    assert out.shape == (2, 3, 8, 8)
    assert out.dtype == np.float32
    model.save(tmp_path / "cnn")
    loaded = st.models.load(tmp_path / "cnn")
    assert isinstance(loaded, SpotCNN)
    np.testing.assert_allclose(loaded.predict_tiles(tiles, device="cpu"), out, atol=1e-5)
    assert loaded.fit_history == model.fit_history
    assert loaded.normalization == {"method": "log1p_cpm", "target_sum": 1e4}
    with pytest.raises(InputError, match="density"):
        model.fit(sdata, loss="nb", max_epochs=1, show_progress_bar=False)


def test_embedding_ridge_learns_the_signal(sdata, tmp_path) -> None:
    torch.manual_seed(0)
    model = EmbeddingRidge(GENES, n_components=16, **TINY)
    with pytest.raises(InputError, match="not fitted"):
        model.predict_tiles(np.zeros((1, 3, 64, 64), np.uint8), device="cpu")
    model.fit(sdata, show_progress_bar=False, device="cpu")
    assert model.fit_params["n_units"] == len(sdata.tables["table"])
    pred, truth = _spot_values(model, sdata)
    # gene 0 follows the red blobs: even a frozen random encoder + PCA + ridge picks it up
    assert np.corrcoef(pred[:, 0], truth[:, 0])[0, 1] > 0.6
    model.save(tmp_path / "ridge")
    loaded = EmbeddingRidge.load(tmp_path / "ridge")
    tiles = np.asarray(sdata.images["he"].data)[None, :, :64, :64]
    np.testing.assert_allclose(loaded.predict_tiles(tiles, device="cpu"), model.predict_tiles(tiles, device="cpu"))
    with pytest.raises(InputError, match="holds a EmbeddingRidge"):
        SpotCNN.load(tmp_path / "ridge")


def test_ridge_closed_form_recovers_linear_map() -> None:
    rng = np.random.default_rng(0)
    model = EmbeddingRidge(GENES, n_components=5, alpha=1e-8, **TINY)
    X = rng.normal(size=(200, 5)) @ rng.normal(size=(5, 12))  # rank-5 embeddings
    W = rng.normal(size=(12, 3))
    Y = X @ W + 0.5
    model._fit_ridge(X, Y)
    r = {k: v.double().numpy() for k, v in model.ridge.items()}
    pred = ((X - r["mean"]) @ r["proj"]) @ r["coef"] + r["intercept"]
    np.testing.assert_allclose(pred, Y, atol=1e-3)


def test_baseline_arguments_are_checked() -> None:
    with pytest.raises(InputError, match="crop_um"):
        SpotCNN(GENES, encoder="test_efficientnet", crop_um=-1)
    with pytest.raises(InputError, match="multiple"):
        SpotCNN(GENES, encoder="test_efficientnet", stride_um=8, tile_size=60)
    with pytest.raises(InputError, match="n_components"):
        EmbeddingRidge(GENES, encoder="test_efficientnet", n_components=0)


def test_coarse_baseline_map_runs_through_predict_dense(sdata) -> None:
    # A map pixel every 100 µm with 24 µm crops: the default tile must still leave predict_dense a positive step
    # (it used to be 3 map pixels, all taken by the default overlap).
    model = SpotCNN(GENES, encoder="test_efficientnet", um_per_px=1.0, crop_um=24.0, stride_um=100.0)
    assert model.tile_size // model.output_stride >= 2 * math.ceil(model.context / model.output_stride) + 8
    out = st.tl.predict_dense(sdata, model, tissue_only=False, inplace=False, show_progress_bar=False)
    level = out["scale0"]["image"]
    assert level.sizes["c"] == len(GENES)
    assert np.isfinite(level.values).all()
