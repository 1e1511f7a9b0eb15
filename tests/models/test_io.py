from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch

import stpredict as st
from stpredict._errors import InputError
from stpredict.models._io import CONFIG_NAME, WEIGHTS_NAME, load_state_dict, read_config, register_model

GENES = ["ACTB", "EPCAM", "PTPRC"]


@pytest.fixture(scope="module")
def model():
    m = st.models.PixNet(
        GENES,
        tile_size=32,
        decoder_channels=(8, 16, 16, 32, 32, 32),
        output_stride=2,
        value_kind="density",
        um_per_px=0.5,
        freeze_encoder=1,
        seed=3,
    )
    # move the weights away from their seeded init, so that a load that silently re-inits would be caught
    with torch.no_grad():
        for p in m.module.decoder.parameters():
            p.add_(0.01)
    m.normalization = {"method": "log1p_cpm", "target_sum": 1e6, "scale": np.array([1.0, 2.0, 3.0])}
    m.fit_history = {"train_loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "best_epoch": 1}
    return m


@pytest.fixture(scope="module")
def tiles():
    return np.random.default_rng(0).integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)


@pytest.fixture
def saved(model, tmp_path):
    return model.save(tmp_path / "ckpt")


def test_round_trip_identical_predictions(model, saved, tiles):
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = st.models.load(saved)
    assert type(loaded) is type(model)
    assert loaded.var_names == GENES
    assert (loaded.um_per_px, loaded.output_stride, loaded.tile_size, loaded.context) == (0.5, 2, 32, 4)
    assert loaded.value_kind == "density"
    assert loaded.config == model.config
    assert loaded.normalization == {"method": "log1p_cpm", "target_sum": 1e6, "scale": [1.0, 2.0, 3.0]}
    assert loaded.fit_history == model.fit_history
    np.testing.assert_array_equal(loaded.predict_tiles(tiles, device="cpu"), model.predict_tiles(tiles, device="cpu"))
    # the freezing option survives too
    assert [p.requires_grad for p in loaded.module.parameters()] == [p.requires_grad for p in model.module.parameters()]


def test_config_contents(saved):
    envelope = json.loads((saved / CONFIG_NAME).read_text())
    assert envelope["format"] == "stpredict-model"
    assert envelope["class"] == "PixNet"
    assert envelope["stpredict_version"] == st.__version__
    params = envelope["config"]["params"]
    assert params["encoder"] == "tf_efficientnet_lite0"
    assert params["um_per_px"] == 0.5
    assert params["value_kind"] == "density"
    assert envelope["config"]["var_names"] == GENES
    assert read_config(saved / CONFIG_NAME)["class"] == "PixNet"


def test_save_refuses_to_overwrite(model, saved, tiles):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(saved)
    other = st.models.PixNet(["X"], tile_size=32, decoder_channels=(8, 16, 16, 32, 32, 32))
    other.save(saved, overwrite=True)
    assert st.models.load(saved).var_names == ["X"]
    assert not list(saved.parent.glob(".ckpt*"))  # no temporary folders left behind


def _edit_config(folder, edit):
    envelope = json.loads((folder / CONFIG_NAME).read_text())
    edit(envelope)
    (folder / CONFIG_NAME).write_text(json.dumps(envelope))


def test_newer_major_format_is_refused_with_version(saved):
    def newer(env):
        env["format_version"] = "2.0"
        env["stpredict_version"] = "9.1.0"

    _edit_config(saved, newer)
    with pytest.raises(InputError, match=r"Install stpredict>=9\.1\.0"):
        st.models.load(saved)


def test_newer_minor_format_is_read(saved):
    _edit_config(saved, lambda env: env.update(format_version="1.7"))
    assert st.models.load(saved).var_names == GENES


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda env: env.pop("class"), "missing keys"),
        (lambda env: env.update(format="keras"), "not an stpredict checkpoint"),
        (lambda env: env.update(format_version="one"), "major.minor"),
        (lambda env: env.update({"class": "Sequential"}), "unknown"),
        (lambda env: env["config"].pop("params"), "lacks"),
        (lambda env: env["config"]["params"].update(decoder_channels=[8, 8, 16, 32, 32, 32]), "do not fit"),
        (lambda env: env["config"]["params"].update(new_option=1), "upgrade stpredict"),
    ],
)
def test_foreign_or_corrupt_configs_are_refused(saved, edit, match):
    _edit_config(saved, edit)
    with pytest.raises(InputError, match=match):
        st.models.load(saved)


def test_garbage_files_are_refused(saved, tmp_path):
    (saved / CONFIG_NAME).write_bytes(b"\x80\x04not json")
    with pytest.raises(InputError, match="not valid JSON"):
        st.models.load(saved)
    (saved / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(InputError, match="JSON object"):
        st.models.load(saved)
    with pytest.raises(InputError, match="not a checkpoint folder"):
        st.models.load(tmp_path / "nothing_here")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=CONFIG_NAME):
        st.models.load(empty)


class _Evil:
    target = ""

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Evil.target),))


def test_pickle_renamed_to_safetensors_is_refused_and_not_executed(saved, tmp_path):
    _Evil.target = str(tmp_path / "pwned")
    with (saved / WEIGHTS_NAME).open("wb") as f:
        pickle.dump({"head.weight": _Evil()}, f)
    with pytest.raises(InputError, match="not a readable safetensors file"):
        st.models.load(saved)
    assert not (tmp_path / "pwned").exists()
    (saved / WEIGHTS_NAME).write_bytes(b"\xff" * 8 + b"{garbage")
    with pytest.raises(InputError, match="safetensors"):
        st.models.load(saved)
    (saved / WEIGHTS_NAME).unlink()
    with pytest.raises(InputError, match="incomplete"):
        st.models.load(saved)


def test_load_state_dict(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2)}
    save_file(tensors, tmp_path / "w.safetensors")
    assert list(load_state_dict(tmp_path / "w.safetensors")) == ["a", "b"]
    torch.save({"model": tensors, "step": 10}, tmp_path / "w.pt")
    out = load_state_dict(tmp_path / "w.pt")
    torch.testing.assert_close(out["a"], tensors["a"])
    torch.save({"step": 10}, tmp_path / "none.pt")
    with pytest.raises(InputError, match="no tensors"):
        load_state_dict(tmp_path / "none.pt")
    with pytest.raises(InputError, match="does not exist"):
        load_state_dict(tmp_path / "missing.bin")


def test_register_model_requires_checkpoint_methods():
    with pytest.raises(TypeError, match="_checkpoint_state"):

        @register_model()
        class NotSavable:
            pass
