"""PixNet through the shared fit loop: the integration of the network with training and checkpoints."""

from __future__ import annotations

import _training_data as helpers
import numpy as np
import pytest
import torch

import stpredict as st

FAST = {"batch_size": 4, "tiles_per_epoch": 8, "show_progress_bar": False, "device": "cpu"}


@pytest.mark.slow
@pytest.mark.parametrize("value_kind", ["intensive", "density"])
def test_fit_updates_trainable_parts_only_and_round_trips(value_kind, tmp_path):
    sdata = helpers.make_sdata(size=96)
    model = st.models.PixNet(
        ["g0", "g1", "g2"],
        pretrained="efficientnet-lite0",
        tile_size=32,
        output_stride=2,
        decoder_channels=(8, 16, 16, 32, 32, 32),
        attention="channel",
        value_kind=value_kind,
        freeze_encoder=True,
    )
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    assert model.fit(sdata, max_epochs=1, validation_fraction=0.25, **FAST) is model
    after = model.module.state_dict()
    backbone = {f"encoder.backbone.{k}" for k in model.module.encoder.backbone.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in backbone)  # frozen: weights and BN statistics fixed
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert len(model.fit_history["train_loss"]) == 1
    tiles = np.random.default_rng(0).integers(0, 256, size=(1, 3, 32, 32), dtype=np.uint8)
    pred = model.predict_tiles(tiles, device="cpu")
    assert np.isfinite(pred).all()
    if value_kind == "density":
        assert (pred >= 0).all()
    loaded = st.models.load(model.save(tmp_path / "m"))
    np.testing.assert_array_equal(loaded.predict_tiles(tiles, device="cpu"), pred)
    assert loaded.fit_history == model.fit_history
    assert loaded.fit_params["max_epochs"] == 1


def test_defaults_are_the_measured_recipe():
    """PixNet(genes) is the recipe that won bench_recipe.py: pretrained, frozen, 4 µm/px, and fit's own schedule."""
    from stpredict.models._pixnet._model import FIT_DEFAULTS
    from stpredict.models._weights import load_state_dict, packaged_weights_path

    model = st.models.PixNet(["g0", "g1"])
    assert (model.output_stride, model.tile_size) == (2, 192)
    assert "um_per_px=auto" in repr(model)
    with pytest.raises(st.errors.InputError, match="fit it first"):
        _ = model.um_per_px
    source = load_state_dict(packaged_weights_path("efficientnet-lite0"))
    stem = next(v for k, v in source.items() if v.ndim == 4)  # the first convolution: the stem
    torch.testing.assert_close(model.module.encoder.backbone.conv_stem.weight, stem)
    assert not any(p.requires_grad for p in model.module.encoder.backbone.parameters())
    sdata = helpers.make_sdata(size=96)
    model.fit(sdata, max_epochs=1, validation_fraction=0.25, **FAST)  # the user's arguments win
    assert model.um_per_px == 2.0  # 12 µm spots are bins to the auto resolution
    assert model.config["um_per_px"] == 2.0  # saved resolved
    params = model.fit_params
    assert (params["max_epochs"], params["tiles_per_epoch"], params["batch_size"]) == (1, 8, 4)
    for key in ("lr", "lr_schedule", "select_by"):
        assert params[key] == FIT_DEFAULTS[key]
    assert (params["lr_schedule"], params["select_by"]) == ("cosine", "pcc")
    assert "val_pcc" in model.fit_history
    with pytest.raises(st.errors.InputError, match="pretrained=None for a random start"):
        st.models.PixNet(["g0"], encoder="resnet18")


def test_auto_resolution_follows_the_training_units():
    """um_per_px='auto': 4 µm/px for spots of 50 µm and wider (median), 2 µm/px for finer units; a number is kept."""
    from types import SimpleNamespace

    def sections(widths_px, image_um_per_px):
        half = np.repeat(np.asarray(widths_px, float)[:, None] / 2, 2, axis=1)
        units = SimpleNamespace(half_sizes=half, allowed=np.ones(len(half), bool))
        return [SimpleNamespace(units=[units], image_um_per_px=image_um_per_px)]

    for widths, expected in (
        ([110, 110, 110], 4.0),  # Visium spots: 55 µm at 0.5 µm per pixel
        ([100, 100, 100], 4.0),  # exactly 50 µm: spots
        ([98, 98, 98], 2.0),  # 49 µm
        ([16, 16, 200], 2.0),  # mostly 8 µm bins: the median decides
    ):
        model = st.models.PixNet(["g0"], pretrained=None)
        model._resolve_resolution(sections(widths, 0.5))
        assert model.um_per_px == expected
    fixed = st.models.PixNet(["g0"], pretrained=None, um_per_px=1.0)
    fixed._resolve_resolution(sections([200], 1.0))
    assert fixed.um_per_px == 1.0
    with pytest.raises(st.errors.InputError, match="or 'auto'"):
        st.models.PixNet(["g0"], um_per_px="fine")
