"""Encoders that turn an image into a feature pyramid at strides 1, 2, 4, ... (any timm model).

Two kinds (SPEC §2.2):

- **CNN** (hierarchical timm models: EfficientNet, ResNet, ConvNeXt, ...): ``features_only=True`` stages,
  one per stride. Strides finer than the first stage come from a small trainable convolutional stem on the
  image; strides coarser than the last stage from trainable stride-2 convolutions.
- **ViT** (flat timm transformers: ViT, DeiT, EVA, UNI2-h, ...): tokens tapped after evenly spaced blocks
  (``forward_intermediates``; shallow taps feed fine levels), each projected by a 1×1 convolution to the level's
  channels and resampled to its stride (bilinear up, area down). Levels finer than the patch size also receive a
  trainable convolutional stem on the image, so the decoder sees pixel detail the tokens do not carry.

The pretrained timm network is ``encoder.backbone``; everything else (stems, projections) is an adapter that
always trains. :meth:`PyramidEncoder.freeze` freezes the backbone entirely, or all but its last ``k`` blocks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from stpredict._errors import InputError
from stpredict._logging import get_logger

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["PyramidEncoder", "build_encoder", "encoder_kind"]

logger = get_logger(__name__)

#: timm modules whose models are flat (one token grid), handled by tapping blocks.
_FLAT_MODULES = frozenset(
    {"vision_transformer", "vision_transformer_relpos", "vision_transformer_sam", "eva", "deit", "beit"}
)


def encoder_kind(arch: str) -> str:
    """``"vit"`` for flat transformer architectures, ``"cnn"`` for hierarchical ones."""
    import timm.models

    module = timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    return "vit" if module in _FLAT_MODULES else "cnn"


class ConvBNReLU(nn.Sequential):
    """3×3 convolution, batch norm, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class PyramidEncoder(nn.Module):
    """Base class: ``forward(x) -> list`` of feature maps, one per level, at :attr:`strides`."""

    strides: list[int]
    channels: list[int]
    backbone: nn.Module

    def __init__(self) -> None:
        super().__init__()
        self._frozen: list[nn.Module] = []

    def backbone_units(self) -> list[nn.Module]:
        """The backbone's blocks in depth order (what ``freeze(k)`` counts from the end)."""
        blocks = getattr(self.backbone, "blocks", None)
        if isinstance(blocks, nn.Sequential | nn.ModuleList) and len(blocks):
            return list(blocks)
        return [module for _, module in self.backbone.named_children()]

    def freeze(self, freeze: bool | int) -> None:
        """Freeze the pretrained backbone: ``True`` all of it, ``False`` none, an int ``k`` all but its last k blocks.

        Frozen parts get ``requires_grad=False`` and stay in eval mode (batch-norm statistics do not move) even
        when the module trains. Adapters (stems, projections) always train.
        """
        for param in self.backbone.parameters():
            param.requires_grad_(True)
        self._frozen = []
        if freeze is False:
            return
        if freeze is True:
            self._frozen = [self.backbone]
        else:
            k = int(freeze)
            units = self.backbone_units()
            if k < 0:
                msg = f"freeze_encoder={freeze}: give True, False, or the number k >= 0 of last blocks to fine-tune."
                raise InputError(msg)
            trainable = {id(p) for unit in units[len(units) - k :] if k for p in unit.parameters()}
            # the backbone's own parameters outside the blocks (stem, norms) stay frozen unless k covers all blocks
            if k >= len(units):
                return
            # modules outside the fine-tuned blocks that hold no fine-tuned parameter (their containers excluded)
            inside = {id(m) for unit in units[len(units) - k :] if k for m in unit.modules()}
            self._frozen = [
                m
                for m in self.backbone.modules()
                if id(m) not in inside and not any(id(p) in trainable for p in m.parameters())
            ]
            for param in self.backbone.parameters():
                if id(param) not in trainable:
                    param.requires_grad_(False)
            self.train(self.training)
            return
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> PyramidEncoder:
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self


def _stem(strides: Sequence[int], channels: Sequence[int]) -> nn.ModuleList:
    """A chain of ConvBNReLU from the image, one per stride (increasing), each downsampling from the previous."""
    layers = []
    prev_stride, prev_ch = 1, 3
    for stride, ch in zip(strides, channels, strict=True):
        layers.append(ConvBNReLU(prev_ch, ch, stride=stride // prev_stride))
        prev_stride, prev_ch = stride, ch
    return nn.ModuleList(layers)


class CNNPyramid(PyramidEncoder):
    """Pyramid from a hierarchical timm CNN (``features_only``), completed by a stem and extra downsampling."""

    def __init__(self, backbone: nn.Module, strides: list[int], channels: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        reductions = list(backbone.feature_info.reduction())
        feat_channels = list(backbone.feature_info.channels())
        # last stage at each reduction
        self._feature_of_stride = {r: i for i, r in enumerate(reductions)}
        self.strides = strides
        stem_strides = [s for s in strides if s < min(reductions)]
        stem_channels = [channels[strides.index(s)] for s in stem_strides]
        self.stem = _stem(stem_strides, stem_channels)
        self.channels = []
        extra: list[nn.Module] = []
        prev_ch = None
        for stride, ch in zip(strides, channels, strict=True):
            if stride < min(reductions):
                self.channels.append(ch)
            elif stride in self._feature_of_stride:
                self.channels.append(feat_channels[self._feature_of_stride[stride]])
            elif stride > max(reductions):
                extra.append(ConvBNReLU(prev_ch, ch, stride=2))
                self.channels.append(ch)
            else:
                msg = f"The encoder has no feature map at stride {stride} (it has {reductions})."
                raise InputError(msg)
            prev_ch = self.channels[-1]
        self.extra = nn.ModuleList(extra)
        self._out_indices = [self._feature_of_stride[s] for s in strides if s in self._feature_of_stride]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        h = x
        for layer in self.stem:
            h = layer(h)
            out.append(h)
        feats = self.backbone(x)
        out.extend(feats[i] for i in self._out_indices)
        for layer in self.extra:
            out.append(layer(out[-1]))
        return out


class ViTPyramid(PyramidEncoder):
    """Pyramid from a flat timm transformer: tapped blocks, 1×1 projections, resampling, and an image stem."""

    def __init__(self, backbone: nn.Module, strides: list[int], channels: list[int], taps: list[int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.strides = strides
        self.channels = list(channels)
        self.taps = taps
        patch = backbone.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, tuple | list) else patch)
        embed_dim = int(backbone.embed_dim)
        self.proj = nn.ModuleList(nn.Conv2d(embed_dim, ch, 1) for ch in channels)
        stem_strides = [s for s in strides if s < self.patch_size]
        self._n_stem = len(stem_strides)
        self.stem = _stem(stem_strides, channels[: self._n_stem])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        height, width = x.shape[-2:]
        tokens = self.backbone.forward_intermediates(x, indices=self.taps, intermediates_only=True, output_fmt="NCHW")
        out = []
        h = x
        for level, (stride, z) in enumerate(zip(self.strides, tokens, strict=True)):
            size = (height // stride, width // stride)
            f = self.proj[level](z)
            if size[0] > f.shape[-2] or size[1] > f.shape[-1]:
                f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            elif f.shape[-2:] != size:
                f = F.interpolate(f, size=size, mode="area")
            if level < self._n_stem:
                h = self.stem[level](h)
                f = f + h
            out.append(f)
        return out


def _taps(depth: int, n: int) -> list[int]:
    """``n`` evenly spaced block indices (0-based) ending at the last block, e.g. 24 blocks, 6 taps → 3, 7, ..., 23."""
    if n > depth:
        msg = f"Cannot tap {n} levels from a transformer with {depth} blocks; use fewer decoder levels."
        raise InputError(msg)
    return [math.ceil(depth * (i + 1) / n) - 1 for i in range(n)]


def build_encoder(
    arch: str,
    *,
    kwargs: dict[str, Any],
    decoder_channels: Sequence[int],
    output_stride: int,
    tile_size: int,
    kind: str = "auto",
) -> PyramidEncoder:
    """Create the timm backbone (random init) and wrap it into a pyramid at strides ``output_stride, ..., 2^(L-1)``.

    Parameters
    ----------
    arch
        timm architecture name.
    kwargs
        Extra keyword arguments for :func:`timm.create_model`.
    decoder_channels
        Channels per level at strides 1, 2, 4, ... (their number L sets the depth of the pyramid; for a CNN it is
        cut to the encoder's deepest stage). Used where the wrapper makes a level (stems, projections, extras).
    output_stride
        Stride of the finest level built (levels finer than it are skipped, saving memory).
    tile_size
        Input size a ViT is built for (its position embedding is interpolated for other sizes).
    kind
        ``"cnn"``, ``"vit"`` or ``"auto"`` (from the architecture's timm module).
    """
    import timm

    if kind == "auto":
        kind = encoder_kind(arch)
    n_levels = len(decoder_channels)
    if kind == "cnn":
        backbone = timm.create_model(arch, pretrained=False, features_only=True, **kwargs)
        deepest = max(backbone.feature_info.reduction())
        available = int(math.log2(deepest)) + 1
        if n_levels < available:
            logger.warning(
                "decoder_channels has %d entries (strides 1 to %d), so the decoder leaves out %s's deeper stages "
                "down to stride %d, its most semantic features. Give %d entries to use them all.",
                n_levels, 2 ** (n_levels - 1), arch, deepest, available,
            )  # fmt: skip
        n_levels = min(n_levels, available)
    elif kind == "vit":
        vit_kwargs = {
            "img_size": tile_size,
            "dynamic_img_size": True,
            "dynamic_img_pad": True,
            "num_classes": 0,
            **kwargs,
        }
        backbone = timm.create_model(arch, pretrained=False, **vit_kwargs)
    else:
        msg = f"encoder_kind={kind!r}: use 'auto', 'cnn' or 'vit'."
        raise InputError(msg)
    strides = [2**i for i in range(n_levels) if 2**i >= output_stride]
    if len(strides) < 2:
        msg = (
            f"output_stride={output_stride} leaves {len(strides)} pyramid level(s) of the {n_levels} available; "
            "the decoder needs at least two. Use a smaller output_stride or more decoder_channels."
        )
        raise InputError(msg)
    channels = [int(decoder_channels[int(math.log2(s))]) for s in strides]
    if kind == "cnn":
        return CNNPyramid(backbone, strides, channels)
    taps = _taps(len(backbone.blocks), len(strides))
    backbone.prune_intermediate_layers(taps, prune_norm=True, prune_head=True)
    return ViTPyramid(backbone, strides, channels, taps)
