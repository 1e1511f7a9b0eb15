"""Resuming an interrupted predict_dense: the work store knows what it computes, and resuming changes no bit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy import ndimage

import stpredict as st
from stpredict._geometry import set_um_per_px
from stpredict.errors import InputError
from stpredict.tl import _dense_plan

GENES = ["g0", "g1", "g2"]
MIX = np.array([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [-0.5, 1.0, 0.25]], dtype=np.float32)
KWARGS = {"tissue_only": False, "chunk_size": 24, "batch_size": 5, "show_progress_bar": False}


class MixModel:
    """Genes = ``weights`` × box-blurred colour; with ``batch_sensitive`` the last bits depend on the batch size.

    Real networks behave so: PixNet on a CPU gives a tile computed alone other last bits than the same tile in a
    batch (oneDNN picks its kernels by batch size), so a tile must be predicted in the same batch on resume.
    """

    name = "mix"
    value_kind = "intensive"
    var_names = GENES
    tile_size, output_stride, context, um_per_px = 32, 2, 4, 1.0

    def __init__(self, weights=MIX, *, batch_sensitive=True, fail_at=None):
        self.weights = np.asarray(weights, dtype=np.float32)
        self.batch_sensitive, self.fail_at = batch_sensitive, fail_at
        self.calls = 0

    def state_dict(self):
        return {"weights": self.weights}

    def predict_tiles(self, tiles, *, device="auto"):
        if self.fail_at is not None and self.calls >= self.fail_at:
            msg = "simulated interruption"
            raise KeyboardInterrupt(msg)
        self.calls += 1
        x = tiles.astype(np.float32) / 255
        blurred = ndimage.uniform_filter(x, size=(1, 1, 2 * self.context + 1, 2 * self.context + 1), mode="constant")
        out = np.einsum("gc,bcyx->bgyx", self.weights, blurred)
        out = out.reshape(*out.shape[:2], 16, 2, 16, 2).mean(axis=(3, 5), dtype=np.float32)
        if self.batch_sensitive:  # the rounding of a kernel picked by batch size
            out = out * np.float32(1 + 2**-22 * (len(tiles) % 3))
        return out.astype(np.float32)


def _sdata(seed=0, shape=(150, 200)):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    rng = np.random.default_rng(seed)
    smooth = np.stack([ndimage.gaussian_filter(c, 3) for c in rng.random((3, *shape))])
    rgb = (40 + 200 * (smooth - smooth.min()) / np.ptp(smooth)).astype(np.uint8)
    sdata = SpatialData(images={"he": Image2DModel.parse(rgb, dims=("c", "y", "x"), c_coords=["r", "g", "b"])})
    set_um_per_px(sdata, "he", 1.0)
    return sdata


def _map(sdata, key="he_mix"):
    return np.asarray(st._geometry.scale_levels(sdata.images[key])[0].data.compute())


@pytest.fixture
def panels(monkeypatch):
    """Three panels of 2, 2 and 1 chunk columns × 4 chunk rows: 12 units, carries in every panel."""
    monkeypatch.setattr(_dense_plan, "UNIT_MAX_BYTES", 2 * 4 * 4 * 20 * 22)


def _uninterrupted(model):
    sdata = _sdata()
    st.tl.predict_dense(sdata, model, **KWARGS)
    return _map(sdata)


def _interrupted(tmp_path, model, name="s.zarr"):
    sdata = _sdata()
    sdata.write(tmp_path / name)
    with pytest.raises(KeyboardInterrupt):
        st.tl.predict_dense(sdata, model, **KWARGS)
    assert "he_mix" not in sdata.images
    return sdata


def _n_calls():
    model = MixModel()
    _uninterrupted(model)
    return model.calls


N_CALLS = 24  # model calls of an uninterrupted run with the ``panels`` layout (checked below)


def test_layout_of_the_resume_tests(panels):
    assert _n_calls() == N_CALLS


@pytest.mark.parametrize("k", range(1, N_CALLS))
def test_resume_after_any_model_call_gives_the_identical_map(panels, tmp_path, k):
    reference = _uninterrupted(MixModel())
    sdata = _interrupted(tmp_path, MixModel(fail_at=k))
    resumed = MixModel()
    st.tl.predict_dense(sdata, resumed, **KWARGS)
    assert np.array_equal(_map(sdata), reference)
    assert resumed.calls <= N_CALLS - k + 1  # finished units are not computed again


def test_repeated_interruptions_give_the_identical_map(panels, tmp_path):
    reference = _uninterrupted(MixModel())
    sdata = _interrupted(tmp_path, MixModel(fail_at=3))
    for fail_at in (2, 4, 1):  # interrupted again while resuming, at other places
        with pytest.raises(KeyboardInterrupt):
            st.tl.predict_dense(sdata, MixModel(fail_at=fail_at), **KWARGS)
    st.tl.predict_dense(sdata, MixModel(), **KWARGS)
    assert np.array_equal(_map(sdata), reference)


def test_resume_logs_the_work_it_skips(panels, tmp_path, caplog):
    sdata = _interrupted(tmp_path, MixModel(fail_at=9))
    with caplog.at_level(logging.INFO, logger="stpredict"):
        st.tl.predict_dense(sdata, MixModel(), **KWARGS)
    resumed = [r.getMessage() for r in caplog.records if "resum" in r.getMessage()]
    assert len(resumed) == 1
    assert not (tmp_path / "s.zarr" / ".stpredict_tmp").exists()  # the work folder goes once the map is installed
    assert "4 of 12 units are written and skipped" in resumed[0]


def test_resume_with_other_weights_restarts_and_says_why(panels, tmp_path, caplog):
    other = MIX[::-1].copy()
    reference = _uninterrupted(MixModel(other))
    assert not np.array_equal(reference, _uninterrupted(MixModel()))
    sdata = _interrupted(tmp_path, MixModel(fail_at=10))
    second = MixModel(other)
    with caplog.at_level(logging.INFO, logger="stpredict"):
        st.tl.predict_dense(sdata, second, **KWARGS)
    assert np.array_equal(_map(sdata), reference)
    assert second.calls == N_CALLS  # nothing of the first model's map was reused
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "model weights" in warnings[0]
    assert "genes" not in warnings[0]  # only what differs is named


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"genes": ["g2", "g0"]}, "genes"),
        ({"dtype": "float16"}, "dtype"),
        ({"chunk_size": 48}, "tiling"),
    ],
)
def test_resume_with_other_arguments_restarts_naming_them(panels, tmp_path, caplog, change, named):
    sdata = _interrupted(tmp_path, MixModel(fail_at=10))
    model = MixModel()
    with caplog.at_level(logging.WARNING, logger="stpredict"):
        st.tl.predict_dense(sdata, model, **{**KWARGS, **change})
    assert named in caplog.text
    assert "model weights" not in caplog.text
    reference = _sdata()
    st.tl.predict_dense(reference, MixModel(), **{**KWARGS, **change})
    assert np.array_equal(_map(sdata), _map(reference))


def test_a_model_without_weights_to_check_is_never_resumed(panels, tmp_path, caplog):
    class Opaque(MixModel):
        state_dict = None

    sdata = _interrupted(tmp_path, Opaque(fail_at=10))
    model = Opaque()
    with caplog.at_level(logging.WARNING, logger="stpredict"):
        st.tl.predict_dense(sdata, model, **KWARGS)
    assert model.calls == N_CALLS
    assert "exposes no weights" in caplog.text
    assert np.array_equal(_map(sdata), _uninterrupted(MixModel()))


def test_a_folder_not_made_by_stpredict_is_never_deleted(tmp_path):
    notes = tmp_path / "he_mix" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("mine")
    with pytest.raises(InputError, match="tmp_dir"):
        st.tl.predict_dense(_sdata(), MixModel(), tmp_dir=tmp_path, **KWARGS)
    assert notes.read_text() == "mine"


def test_model_digest_follows_the_weights():
    from stpredict.tl._work_identity import model_digest

    assert model_digest(MixModel()) == model_digest(MixModel(MIX.copy()))
    assert model_digest(MixModel()) != model_digest(MixModel(MIX * np.float32(1 + 2**-20)))
    assert model_digest(MixModel()) != model_digest(MixModel(MIX.reshape(1, 9)))  # same bytes, other shape
    assert model_digest(object()) is None


def test_model_digest_of_a_pixnet():
    pytest.importorskip("torch")
    from stpredict.tl._work_identity import model_digest

    a = st.models.PixNet(["A", "B"], tile_size=64, output_stride=2, um_per_px=2.0, seed=0)
    b = st.models.PixNet(["A", "B"], tile_size=64, output_stride=2, um_per_px=2.0, seed=0)
    c = st.models.PixNet(["A", "B"], tile_size=64, output_stride=2, um_per_px=2.0, seed=1)
    assert model_digest(a) == model_digest(b) != model_digest(c)
    next(iter(b.module.parameters())).data.view(-1)[0] += 1e-6
    assert model_digest(a) != model_digest(b)


def test_resumed_pixnet_map_is_bit_identical(tmp_path):
    """The real case: PixNet on a CPU, a tile alone in its last batch when the unit is computed without carry."""
    pytest.importorskip("torch")
    model = st.models.PixNet(["A", "B", "C"], tile_size=64, output_stride=2, um_per_px=1.0, seed=0)
    kwargs = {"tissue_only": False, "chunk_size": 48, "batch_size": 19, "show_progress_bar": False, "device": "cpu"}
    reference = _sdata(shape=(300, 400))
    st.tl.predict_dense(reference, model, **kwargs)
    sdata = _sdata(shape=(300, 400))
    sdata.write(tmp_path / "s.zarr")
    predict, calls = model.predict_tiles, []

    def failing(tiles, **kw):
        if len(calls) == 4:
            raise KeyboardInterrupt
        calls.append(len(tiles))
        return predict(tiles, **kw)

    model.predict_tiles = failing
    with pytest.raises(KeyboardInterrupt):
        st.tl.predict_dense(sdata, model, key_added="he_pixnet", **kwargs)
    model.predict_tiles = predict
    st.tl.predict_dense(sdata, model, key_added="he_pixnet", **kwargs)
    assert np.array_equal(_map(sdata, "he_pixnet"), _map(reference, "he_pixnet"))
