from __future__ import annotations

import _training_data as helpers
import numpy as np
import pytest
import torch

import stpredict as st
from stpredict.errors import InputError

SMALL = helpers.SMALL_DECODER
GENES = helpers.PIXNET_GENES
small = helpers.small_pixnet


@pytest.fixture(scope="module")
def tiles():
    return np.random.default_rng(0).integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)


@pytest.fixture(scope="module")
def lite0():
    return small(pretrained="efficientnet-lite0")


def test_satisfies_dense_model_protocol(lite0):
    assert isinstance(lite0, st.models.DenseModel)
    assert lite0.name == "pixnet"
    assert lite0.var_names == GENES
    assert (lite0.output_stride, lite0.tile_size, lite0.context) == (1, 32, 4)
    assert lite0.value_kind == "intensive"
    assert lite0.pixel_area_um2 == 1.0


@pytest.mark.parametrize(
    ("encoder", "output_stride", "attention", "size"),
    [
        ("tf_efficientnet_lite0", 1, "spatial", (40, 72)),
        ("tf_efficientnet_lite0", 4, "channel", (32, 32)),
        ("vit_tiny_patch16_224", 2, "spatial", (32, 48)),
    ],
)
def test_output_shapes(encoder, output_stride, attention, size):
    model = small(encoder=encoder, output_stride=output_stride, attention=attention)
    # sides that are not multiples of the deepest stride (32) are padded and cropped back
    tiles = np.random.default_rng(1).integers(0, 256, size=(2, 3, *size), dtype=np.uint8)
    out = model.predict_tiles(tiles, device="cpu")
    assert out.dtype == np.float32
    assert out.shape == (2, 3, size[0] // output_stride, size[1] // output_stride)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("encoder", ["tf_efficientnet_lite0", "vit_tiny_patch16_224"])
def test_gradients_flow_only_into_unfrozen_parts(encoder):
    model = small(encoder=encoder, freeze_encoder=2)
    module = model.module.train()
    module(torch.randn(2, 3, 32, 32)).square().mean().backward()
    units = module.encoder.backbone_units()
    assert module.encoder._frozen
    assert not any(m.training for m in module.encoder._frozen)  # frozen parts stay in eval mode while training
    assert all(m.training for u in units[-2:] for m in u.modules())
    # the last two backbone blocks fine-tune, the rest of the backbone is frozen and gets no gradient
    assert all(p.grad is not None for u in units[-2:] for p in u.parameters())
    assert sum(p.grad.abs().sum() for u in units[-2:] for p in u.parameters()) > 0
    assert all(p.grad is None for u in units[:-2] for p in u.parameters())
    frozen = [p for p in module.encoder.backbone.parameters() if not p.requires_grad]
    assert frozen
    assert all(p.grad is None for p in frozen)
    backbone = {id(p) for p in module.encoder.backbone.parameters()}
    adapters = [p for p in module.parameters() if id(p) not in backbone]
    assert all(p.grad is not None for p in adapters)
    assert module.head.weight.grad.abs().sum() > 0
    assert module.decoder.fuses[0].qkv.weight.grad.abs().sum() > 0
    assert module.encoder.stem[0][0].weight.grad.abs().sum() > 0


def test_density_head_is_nonnegative_and_bias_init(tiles):
    model = small(value_kind="density", output_stride=2, um_per_px=0.5, attention="channel")
    assert model.pixel_area_um2 == 1.0
    assert (model.predict_tiles(tiles, device="cpu") >= 0).all()
    with torch.no_grad():
        model.module.head.weight.zero_()
    model.module.set_output_bias(torch.tensor([1e-3, 0.5, 2.0]))
    out = model.predict_tiles(tiles[:1], device="cpu")
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), [1e-3, 0.5, 2.0], rtol=1e-4)
    # intensive: the identity, so the bias is the value itself (and may be negative)
    model.module.value_kind = "intensive"
    model.module.set_output_bias(torch.tensor([-1.0, 0.0, 3.0]))
    np.testing.assert_allclose(model.predict_tiles(tiles[:1], device="cpu")[0, :, 5, 7], [-1.0, 0.0, 3.0], atol=1e-6)


def test_seeded_and_batched_predictions_agree(tiles):
    a = small(attention="channel")
    b = small(attention="channel")
    c = small(attention="channel", seed=1)
    pa = a.predict_tiles(tiles, device="cpu")
    np.testing.assert_array_equal(pa, b.predict_tiles(tiles, device="cpu"))
    assert not np.allclose(pa, c.predict_tiles(tiles, device="cpu"))
    np.testing.assert_allclose(a.predict_tiles(tiles, device="cpu", batch_size=1), pa, rtol=1e-5, atol=1e-6)
    assert not a.module.training


def test_predict_tiles_rejects_bad_input(lite0, tiles):
    with pytest.raises(InputError, match="uint8"):
        lite0.predict_tiles(tiles.astype(np.float32), device="cpu")
    with pytest.raises(InputError, match="shape"):
        lite0.predict_tiles(tiles[:, :2], device="cpu")
    with pytest.raises(InputError, match="multiples"):
        small(output_stride=4).predict_tiles(tiles[..., :30], device="cpu")
    assert lite0.predict_tiles(tiles[:0], device="cpu").shape == (0, 3, 32, 32)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"output_stride": 3}, "power of two"),
        ({"output_stride": 64}, "output_stride=64"),
        ({"tile_size": 28, "output_stride": 8}, "multiple of output_stride"),
        ({"value_kind": "counts"}, "value_kind"),
        ({"attention": "global"}, "attention"),
        ({"um_per_px": 0}, "um_per_px"),
        ({"context": 16}, "context"),
        ({"freeze_encoder": -2}, "freeze_encoder"),
        ({"encoder": "no_such_net"}, "Unknown encoder"),
    ],
)
def test_bad_parameters(kwargs, match):
    with pytest.raises(InputError, match=match):
        small(**kwargs)


def test_bad_genes():
    with pytest.raises(InputError, match="empty"):
        st.models.PixNet([], tile_size=32, decoder_channels=SMALL)
    with pytest.raises(InputError, match="duplicated"):
        st.models.PixNet(["A", "A"], tile_size=32, decoder_channels=SMALL)


def test_repr_and_parameter_counts(lite0):
    assert "PixNet(3 genes" in repr(lite0)
    n_backbone = sum(p.numel() for p in lite0.module.encoder.backbone.parameters())
    assert lite0.n_parameters() - lite0.n_parameters(trainable_only=True) == n_backbone


def test_warns_about_frozen_random_encoder_but_not_on_load(caplog, tmp_path):
    with caplog.at_level("WARNING", logger="stpredict"):
        model = small(encoder="vit_tiny_patch16_224", encoder_kwargs={"depth": 6}, output_stride=4, pretrained=None)
    assert "random weights" in caplog.text
    model.save(tmp_path / "m")
    caplog.clear()
    with caplog.at_level("WARNING", logger="stpredict"):
        st.models.load(tmp_path / "m")
    assert "random weights" not in caplog.text


def test_numpy_numbers_are_accepted_and_stored_as_json_types(tmp_path):
    import json

    model = small(output_stride=np.int64(4), um_per_px=np.float32(0.5), tile_size=np.int32(32), attention="channel")
    assert (model.output_stride, model.tile_size) == (4, 32)
    assert type(model.output_stride) is int
    json.dumps(model.config)  # every constructor argument is plain JSON
