from __future__ import annotations

import pickle

import _training_data as helpers
import numpy as np
import pytest
import torch

from stpredict.errors import InputError
from stpredict.models._io import load_state_dict
from stpredict.models._weights import packaged_weights_path

SMALL = helpers.SMALL_DECODER
GENES = helpers.PIXNET_GENES
small = helpers.small_pixnet


@pytest.fixture(scope="module")
def lite0():
    return small(pretrained="efficientnet-lite0")


def test_pretrained_packaged_checkpoint_is_loaded_exactly(lite0):
    checkpoint = list(load_state_dict(packaged_weights_path("efficientnet-lite0")).values())
    state = lite0.module.encoder.backbone.state_dict()
    names = list(state)
    for i in (0, 6, 100, len(names) - 1):
        assert torch.equal(state[names[i]], checkpoint[i])
    random = small()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        f_pre = lite0.module.encoder(x)[3]
        f_rand = random.module.encoder(x)[3]
    assert not torch.allclose(f_pre, f_rand)
    # the stems, decoder and head are initialised identically for one seed, whatever the encoder weights
    torch.testing.assert_close(lite0.module.head.weight, random.module.head.weight)


def test_pretrained_local_files(tmp_path, lite0):
    from safetensors.torch import save_file

    source = load_state_dict(packaged_weights_path("efficientnet-lite0"))
    # the same weights as .safetensors, under timm's own names with a wrapper prefix
    timm_names = {
        f"module.{k}": v.contiguous()
        for k, v in zip(lite0.module.encoder.backbone.state_dict(), source.values(), strict=False)
    }
    path = tmp_path / "w.safetensors"
    save_file(timm_names, path)
    model = small(pretrained=path)
    for key, value in lite0.module.encoder.backbone.state_dict().items():
        assert torch.equal(model.module.encoder.backbone.state_dict()[key], value)
    # a .pth nesting the state dict under "state_dict"
    torch.save({"state_dict": dict(source), "epoch": 3}, tmp_path / "w.pth")
    model = small(pretrained=str(tmp_path / "w.pth"))
    torch.testing.assert_close(
        model.module.encoder.backbone.conv_stem.weight, lite0.module.encoder.backbone.conv_stem.weight
    )
    with pytest.raises(InputError, match="neither an existing weights file"):
        small(pretrained=tmp_path / "missing.pth")
    with pytest.raises(InputError, match="do not fit the encoder"):
        small(encoder="resnet18", pretrained=path)
    with pytest.raises(InputError, match="tf_efficientnet_lite0"):
        small(encoder="resnet18", pretrained="efficientnet-lite0")


class _Evil:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(_Evil.target),))


def test_pretrained_pickle_with_code_is_refused(tmp_path):
    _Evil.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"conv_stem.weight": _Evil()}, f)
    with pytest.raises(InputError, match="nothing is unpickled"):
        small(pretrained=path)
    assert not (tmp_path / "pwned").exists()


def test_hub_offline_error_names_local_file(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        msg = "no network"
        raise OSError(msg)

    from stpredict.models._weights import pretrained_state_dict

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(InputError, match="pass the local file"):
        pretrained_state_dict("hf-hub:MahmoodLab/UNI2-h", encoder="uni2_h", arch="vit_giant_patch14_224", kwargs={})


def test_vit_pretrained_file_resamples_position_embedding(tmp_path):
    import timm
    from safetensors.torch import save_file

    full = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, depth=4)
    save_file({k: v.contiguous() for k, v in full.state_dict().items()}, tmp_path / "vit.safetensors")
    model = small(
        encoder="vit_tiny_patch16_224",
        encoder_kwargs={"depth": 4},
        decoder_channels=(8, 16, 16, 32),
        pretrained=tmp_path / "vit.safetensors",
    )
    backbone = model.module.encoder.backbone
    assert backbone.pos_embed.shape == (1, 1 + 2 * 2, 192)  # 32 px tiles, 16 px patches, one class token
    torch.testing.assert_close(backbone.blocks[3].attn.qkv.weight, full.blocks[3].attn.qkv.weight)
    torch.testing.assert_close(backbone.pos_embed[:, 0], full.pos_embed[:, 0])
    assert model.predict_tiles(np.zeros((1, 3, 32, 32), np.uint8), device="cpu").shape == (1, 3, 32, 32)


def test_uni2_h_preset_builds_offline():
    model = small(encoder="uni2_h", encoder_kwargs={"depth": 6, "embed_dim": 48, "num_heads": 2, "mlp_ratio": 2})
    backbone = model.module.encoder.backbone
    assert backbone.num_reg_tokens == 8
    assert backbone.patch_embed.patch_size == (14, 14)
    assert model.predict_tiles(np.zeros((1, 3, 28, 28), np.uint8), device="cpu").shape == (1, 3, 28, 28)
