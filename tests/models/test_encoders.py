from __future__ import annotations

import numpy as np
import pytest
import torch

from stpredict.errors import InputError
from stpredict.models._encoders import _taps, build_encoder, encoder_kind
from stpredict.models._io import load_state_dict
from stpredict.models._weights import map_state_dict, packaged_weights_path, resolve_encoder

SMALL = (8, 16, 16, 32, 32, 32)


def test_encoder_kind():
    assert encoder_kind("tf_efficientnet_lite0") == "cnn"
    assert encoder_kind("resnet18") == "cnn"
    assert encoder_kind("vit_tiny_patch16_224") == "vit"
    assert encoder_kind("vit_giant_patch14_224") == "vit"


def test_taps_evenly_spaced():
    assert _taps(24, 6) == [3, 7, 11, 15, 19, 23]  # blocks 4, 8, ..., 24 (SPEC §2.2)
    assert _taps(12, 6) == [1, 3, 5, 7, 9, 11]
    assert _taps(12, 5)[-1] == 11
    with pytest.raises(InputError, match="Cannot tap"):
        _taps(4, 6)


def test_short_decoder_warns_that_deep_stages_are_left_out(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="stpredict"):
        enc = build_encoder(
            "tf_efficientnet_lite0", kwargs={}, decoder_channels=SMALL[:5], output_stride=2, tile_size=64
        )
    assert enc.strides == [2, 4, 8, 16]
    assert "down to stride 32" in caplog.text
    assert "Give 6 entries" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stpredict"):
        build_encoder("tf_efficientnet_lite0", kwargs={}, decoder_channels=SMALL, output_stride=2, tile_size=64)
    assert "leaves out" not in caplog.text


@pytest.mark.parametrize("output_stride", [1, 4])
def test_cnn_pyramid_strides_and_channels(output_stride):
    enc = build_encoder(
        "tf_efficientnet_lite0", kwargs={}, decoder_channels=SMALL, output_stride=output_stride, tile_size=64
    )
    expected = [s for s in (1, 2, 4, 8, 16, 32) if s >= output_stride]
    assert enc.strides == expected
    feats = enc(torch.randn(2, 3, 64, 96))
    assert [f.shape[-2:] for f in feats] == [(64 // s, 96 // s) for s in expected]
    assert [f.shape[1] for f in feats] == enc.channels
    # stages of the backbone keep their own channels; the stride-1 level comes from the stem
    lite0 = {2: 16, 4: 24, 8: 40, 16: 112, 32: 320}
    for s, c in zip(enc.strides, enc.channels, strict=True):
        assert c == (SMALL[0] if s == 1 else lite0[s])


def test_cnn_pyramid_truncates_to_encoder_depth():
    enc = build_encoder("tf_efficientnet_lite0", kwargs={}, decoder_channels=(8,) * 8, output_stride=1, tile_size=64)
    assert enc.strides == [1, 2, 4, 8, 16, 32]


def test_vit_pyramid_shapes():
    enc = build_encoder("vit_tiny_patch16_224", kwargs={}, decoder_channels=SMALL, output_stride=1, tile_size=64)
    assert enc.strides == [1, 2, 4, 8, 16, 32]
    assert enc.taps == [1, 3, 5, 7, 9, 11]
    feats = enc(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (1, c, 64 // s, 64 // s) for s, c in zip(enc.strides, SMALL, strict=True)
    ]
    # other input sizes: position embeddings are interpolated (dynamic_img_size)
    feats = enc(torch.randn(1, 3, 96, 128))
    assert feats[0].shape[-2:] == (96, 128)


def test_vit_pruned_after_last_tap():
    enc = build_encoder("vit_tiny_patch16_224", kwargs={}, decoder_channels=SMALL[:3], output_stride=1, tile_size=64)
    assert enc.taps == [3, 7, 11]
    enc = build_encoder(
        "vit_tiny_patch16_224", kwargs={"depth": 6}, decoder_channels=SMALL[:3], output_stride=1, tile_size=64
    )
    assert len(enc.backbone.blocks) == 6


def test_freeze_all_keeps_adapters_trainable_and_bn_stats_fixed():
    enc = build_encoder("tf_efficientnet_lite0", kwargs={}, decoder_channels=SMALL, output_stride=1, tile_size=64)
    enc.freeze(True)
    assert not any(p.requires_grad for p in enc.backbone.parameters())
    assert all(p.requires_grad for p in enc.stem.parameters())
    enc.train()
    assert not enc.backbone.training
    assert enc.stem.training
    before = enc.backbone.bn1.running_mean.clone()
    enc(torch.randn(2, 3, 64, 64))
    torch.testing.assert_close(enc.backbone.bn1.running_mean, before)
    enc.freeze(False)
    assert all(p.requires_grad for p in enc.backbone.parameters())
    enc.train()
    assert enc.backbone.training


def test_freeze_last_k_blocks():
    enc = build_encoder("vit_tiny_patch16_224", kwargs={}, decoder_channels=SMALL, output_stride=1, tile_size=64)
    enc.freeze(2)
    blocks = list(enc.backbone.blocks)
    assert all(p.requires_grad for b in blocks[-2:] for p in b.parameters())
    assert not any(p.requires_grad for b in blocks[:-2] for p in b.parameters())
    assert not enc.backbone.patch_embed.proj.weight.requires_grad
    assert all(p.requires_grad for p in enc.proj.parameters())
    with pytest.raises(InputError):
        enc.freeze(-1)


def test_map_state_dict_by_names_strips_prefixes():
    target = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(4)}
    source = {
        "module.backbone.a.weight": torch.ones(2, 3),
        "module.backbone.b.bias": torch.ones(4),
        "head.w": torch.ones(1),
    }
    mapped, how = map_state_dict(source, target)
    assert how == "names"
    assert set(mapped) == set(target)
    assert torch.equal(mapped["a.weight"], torch.ones(2, 3))


def test_map_state_dict_by_order_and_mismatch():
    target = {"x": torch.zeros(2, 3), "y": torch.zeros(4)}
    source = {"_p": torch.full((2, 3), 2.0), "_q": torch.full((4,), 3.0), "_fc": torch.ones(10)}
    mapped, how = map_state_dict(source, target)
    assert how == "order"
    assert torch.equal(mapped["y"], torch.full((4,), 3.0))
    with pytest.raises(InputError, match="do not fit the encoder"):
        map_state_dict({"_p": torch.zeros(3, 2), "_q": torch.zeros(4)}, target)
    with pytest.raises(InputError, match="fewer tensors"):
        map_state_dict({"_p": torch.zeros(2, 3)}, target)


def test_packaged_lite0_weights_classify_a_cat():
    """The shipped checkpoint maps in order onto timm's tf_efficientnet_lite0 and is a working ImageNet model."""
    import timm
    from skimage import data

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    mapped, how = map_state_dict(load_state_dict(packaged_weights_path("efficientnet-lite0")), model.state_dict())
    assert how == "order"
    model.load_state_dict(mapped)
    image = torch.from_numpy(data.chelsea().astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    x = (image - 0.5) / 0.5
    with torch.no_grad():
        top = int(model(x).argmax())
    assert top in (281, 282, 283, 284, 285)  # ImageNet domestic cats


def test_resolve_encoder():
    arch, kwargs = resolve_encoder("uni2_h")
    assert arch == "vit_giant_patch14_224"
    assert kwargs["embed_dim"] == 1536
    assert kwargs["reg_tokens"] == 8
    assert callable(kwargs["mlp_layer"])
    assert resolve_encoder("resnet18", {"in_chans": 3}) == ("resnet18", {"in_chans": 3})
    with pytest.raises(InputError, match="Unknown encoder"):
        resolve_encoder("not_a_model_xyz")
    with pytest.raises(InputError, match="pretrained="):
        resolve_encoder("hf-hub:MahmoodLab/UNI2-h")
