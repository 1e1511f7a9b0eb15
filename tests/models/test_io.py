from __future__ import annotations

import hashlib
import json
import pickle

import _training_data as helpers
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst

import stpredict as st
from stpredict.errors import InputError
from stpredict.models._io import CONFIG_NAME, WEIGHTS_NAME, load_state_dict, read_config, register_model

GENES = helpers.PIXNET_GENES


@pytest.fixture(scope="module")
def model():
    m = helpers.small_pixnet(output_stride=2, value_kind="density", um_per_px=0.5, freeze_encoder=1, seed=3)
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


def _seal(envelope):
    """Record the envelope's digest as model.save does: SHA-256 of its canonical JSON, without the digest itself."""
    body = {key: value for key, value in envelope.items() if key != "envelope_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    envelope["envelope_sha256"] = hashlib.sha256(text.encode("utf-8")).hexdigest()


def _edit_config(folder, edit, *, seal=True):
    """Edit config.json as another (foreign or newer) writer would: the edited envelope is sealed again."""
    envelope = json.loads((folder / CONFIG_NAME).read_text())
    edit(envelope)
    if seal and "envelope_sha256" in envelope:
        _seal(envelope)
    (folder / CONFIG_NAME).write_text(json.dumps(envelope))


def test_newer_major_format_is_refused_with_version(saved):
    def newer(env):
        env["format_version"] = "2.0"
        env["stpredict_version"] = "9.1.0"

    _edit_config(saved, newer)
    with pytest.raises(InputError, match=r"Install stpredict>=9\.1\.0"):
        st.models.load(saved)
    # a newer format that names this (or an older) stpredict as its writer was changed after saving
    _edit_config(saved, lambda env: env.update(stpredict_version=st.__version__))
    with pytest.raises(InputError, match=r"config\.json' names checkpoint format 2\.0.*damaged or edited"):
        st.models.load(saved)
    _edit_config(saved, lambda env: env.update(format_version="0.9"))
    with pytest.raises(InputError, match=r"config\.json' uses the old checkpoint format 0\.9"):
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
    with pytest.raises(InputError, match="damaged or edited"):
        st.models.load(saved)
    # without a digest to stop it (a checkpoint saved before digests), the reader refuses it as well
    _edit_config(
        saved, lambda env: [env.pop("weights_sha256"), env.pop("envelope_sha256"), env.update(format_version="1.0")]
    )
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


# --- integrity: digests of the weights and of config.json -------------------------------------------------------


@pytest.fixture(scope="module")
def sealed(model, tmp_path_factory):
    """One checkpoint for the module; tests that damage it restore it."""
    return model.save(tmp_path_factory.mktemp("sealed") / "ckpt")


def test_digests_are_recorded(sealed):
    envelope = json.loads((sealed / CONFIG_NAME).read_text())
    assert envelope["format_version"] == "1.1"
    assert envelope["weights_sha256"] == hashlib.sha256((sealed / WEIGHTS_NAME).read_bytes()).hexdigest()
    expected = dict(envelope)
    _seal(expected)
    assert envelope["envelope_sha256"] == expected["envelope_sha256"]


def test_4kb_of_damaged_weights_are_refused(model, saved):
    """The issue: 4 KB of damaged weight bytes loaded without complaint and predicted garbage."""
    weights = saved / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    recorded = hashlib.sha256(bytes(data)).hexdigest()
    start = len(data) // 2
    data[start : start + 4096] = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    weights.write_bytes(bytes(data))
    found = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(InputError, match="damaged") as info:
        st.models.load(saved)
    message = str(info.value)
    assert str(weights) in message
    assert recorded in message
    assert found in message
    assert "re-save" in message
    assert "download" in message


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=hst.data())
def test_any_flipped_weight_byte_is_detected(sealed, data):
    weights = sealed / WEIGHTS_NAME
    size = weights.stat().st_size
    offset = data.draw(hst.integers(0, size - 1), label="offset")
    mask = data.draw(hst.integers(1, 255), label="xor mask")
    with weights.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))
    try:
        with pytest.raises(InputError, match=WEIGHTS_NAME):
            st.models.load(sealed)
    finally:
        with weights.open("r+b") as f:
            f.seek(offset)
            f.write(bytes([byte]))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(data=hst.data())
def test_any_changed_config_byte_is_refused_unless_harmless(sealed, data):
    """A changed byte in config.json is refused, unless the JSON still means the same (whitespace, ``1.0``/``1e0``)."""
    config = sealed / CONFIG_NAME
    original = config.read_bytes()
    offset = data.draw(hst.integers(0, len(original) - 1), label="offset")
    mask = data.draw(hst.integers(1, 255), label="xor mask")
    damaged = bytearray(original)
    damaged[offset] ^= mask
    try:
        same = json.loads(bytes(damaged).decode("utf-8")) == json.loads(original)
    except (UnicodeDecodeError, json.JSONDecodeError):
        same = False
    config.write_bytes(bytes(damaged))
    try:
        if same:
            assert st.models.load(sealed).var_names == GENES
        else:
            with pytest.raises(InputError, match=CONFIG_NAME):
                st.models.load(sealed)
    finally:
        config.write_bytes(original)


def test_edited_config_value_is_refused(saved):
    """A value changed in place (here the target scale, which would silently rescale every prediction)."""
    config = saved / CONFIG_NAME
    text = config.read_text()
    assert text.count("2.0") == 1
    config.write_text(text.replace("2.0", "9.0"))
    with pytest.raises(InputError, match=r"config\.json.*damaged or edited") as info:
        st.models.load(saved)
    assert str(config) in str(info.value)
    # a digest that is not a SHA-256 is refused as such
    _edit_config(saved, lambda env: env.update(weights_sha256="abc"))
    with pytest.raises(InputError, match="weights_sha256"):
        st.models.load(saved)


def test_checkpoint_without_digests_loads_unverified(model, saved, tiles, caplog):
    """Checkpoints saved before digests (format 1.0) still load, with a log message that they are unverified."""

    def old(env):
        env.update(format_version="1.0")
        del env["weights_sha256"], env["envelope_sha256"]

    _edit_config(saved, old)
    with caplog.at_level("WARNING", logger="stpredict"):
        loaded = st.models.load(saved)
    np.testing.assert_array_equal(loaded.predict_tiles(tiles, device="cpu"), model.predict_tiles(tiles, device="cpu"))
    assert any("cannot be verified" in r.getMessage() and str(saved) in r.getMessage() for r in caplog.records)
    # re-saving adds the digests
    loaded.save(saved, overwrite=True)
    assert "weights_sha256" in json.loads((saved / CONFIG_NAME).read_text())


@pytest.mark.parametrize("key", ["weights_sha256", "envelope_sha256"])
def test_digests_missing_from_a_format_that_has_them_are_refused(saved, key):
    _edit_config(saved, lambda env: env.pop(key))
    with pytest.raises(InputError, match=rf"config\.json' lacks '{key}'.*damaged or edited"):
        st.models.load(saved)


# --- versions ------------------------------------------------------------------------------------------------------


def test_newer_stpredict_version_loads_with_a_warning(saved):
    _edit_config(saved, lambda env: env.update(stpredict_version="9.2.0"))
    with pytest.warns(UserWarning, match=r"stpredict 9\.2\.0") as record:
        loaded = st.models.load(saved)
    assert loaded.var_names == GENES
    (warning,) = record.list
    message = str(warning.message)
    assert f"stpredict {st.__version__}" in message
    assert "predictions may differ" in message
    assert warning.filename == __file__  # points at the user's call, not into stpredict


def test_same_or_older_stpredict_version_loads_silently(saved):
    import warnings

    for version in (st.__version__, "0.0.1"):
        _edit_config(saved, lambda env, v=version: env.update(stpredict_version=v))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert st.models.load(saved).var_names == GENES


# --- save(overwrite=True) replaces only checkpoints, and never loses the old one -----------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_checkpoint(model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_text("my notes")
    (data / "counts.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match=r"not an stpredict checkpoint.*counts\.csv.*notes\.txt"):
        model.save(data, overwrite=True)
    assert sorted(p.name for p in data.iterdir()) == ["counts.csv", "notes.txt"]
    assert (data / "notes.txt").read_text() == "my notes"
    # a user's file beside a checkpoint is not the checkpoint's to delete either
    ckpt = model.save(tmp_path / "ckpt")
    (ckpt / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        model.save(ckpt, overwrite=True)
    assert (ckpt / "notes.txt").read_text() == "mine"
    # nor is a file, or a folder holding another program's config.json
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        model.save(tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "x"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / CONFIG_NAME).write_text('{"format": "keras"}')
    with pytest.raises(FileExistsError, match="not an stpredict checkpoint"):
        model.save(foreign, overwrite=True)
    assert (foreign / CONFIG_NAME).read_text() == '{"format": "keras"}'
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_overwrite_replaces_an_empty_folder(model, tmp_path):
    (tmp_path / "empty").mkdir()
    assert st.models.load(model.save(tmp_path / "empty", overwrite=True)).var_names == GENES


def test_overwrite_leaves_unrelated_hidden_folders_alone(model, saved):
    """The old save deleted ``.ckpt.old`` beside the target, whatever it held."""
    stale = saved.with_name(f".{saved.name}.old")
    stale.mkdir()
    (stale / "keep.txt").write_text("keep")
    model.save(saved, overwrite=True)
    assert (stale / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("step", ["weights", "final rename"])
def test_failed_overwrite_keeps_the_old_checkpoint(model, saved, tiles, monkeypatch, step):
    import pathlib

    import safetensors.torch

    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    if step == "weights":

        def fail(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(safetensors.torch, "save_file", fail)
    else:
        rename = pathlib.Path.rename

        def fail_tmp(self, target):
            if self.name.endswith(".tmp"):
                raise OSError(5, "Input/output error")
            return rename(self, target)

        monkeypatch.setattr(pathlib.Path, "rename", fail_tmp)
    other = helpers.small_pixnet(seed=1)
    with pytest.raises(OSError, match="No space left|Input/output error"):
        other.save(saved, overwrite=True)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert not [p.name for p in saved.parent.iterdir() if p.name.startswith(".")]  # nothing left behind
    loaded = st.models.load(saved)
    np.testing.assert_array_equal(loaded.predict_tiles(tiles, device="cpu"), model.predict_tiles(tiles, device="cpu"))
