"""PixNet as a plain ``nn.Module``: normalised image tensors in, per-gene maps out."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ._decoder import Decoder

if TYPE_CHECKING:
    from stpredict.models._encoders import PyramidEncoder

__all__ = ["PixNetModule"]


class PixNetModule(nn.Module):
    """Encoder pyramid → U-Net decoder with SAFB fusion → 1×1 head (one channel per gene).

    ``forward(x)`` takes a float tensor ``(B, 3, H, W)`` already normalised with :attr:`input_mean` and
    :attr:`input_std` (see :meth:`preprocess`) and returns ``(B, n_genes, H / s, W / s)`` with ``s`` the output
    stride (the finest level of the pyramid). Inputs whose sides are not multiples of the deepest stride are
    padded (reflection) and the output cropped, so any ``H, W`` divisible by ``s`` works.

    For ``value_kind="density"`` the head passes through softplus (non-negative values); for ``"intensive"`` it
    is the identity.
    """

    def __init__(
        self,
        encoder: PyramidEncoder,
        *,
        n_genes: int,
        decoder_channels: list[int],
        n_d2s_stages: int,
        attention: str,
        value_kind: str,
        input_mean: tuple[float, float, float],
        input_std: tuple[float, float, float],
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = Decoder(
            encoder.channels, encoder.strides, decoder_channels, n_d2s_stages=n_d2s_stages, attention=attention
        )
        self.head = nn.Conv2d(self.decoder.out_channels, n_genes, 1)
        self.value_kind = value_kind
        self.output_stride = encoder.strides[0]
        self.pad_multiple = encoder.strides[-1]
        mean = torch.tensor(input_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(input_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("input_mean", mean, persistent=False)
        self.register_buffer("input_std", std, persistent=False)

    def preprocess(self, tiles: torch.Tensor) -> torch.Tensor:
        """``uint8`` (or 0–255 float) tiles ``(B, 3, H, W)`` → float32 normalised with the encoder's mean and std."""
        x = tiles.to(torch.float32) / 255.0
        return (x - self.input_mean) / self.input_std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        m = self.pad_multiple
        pad_h, pad_w = math.ceil(height / m) * m - height, math.ceil(width / m) * m - width
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        feats = self.encoder(x)
        out = self.head(self.decoder(feats))
        s = self.output_stride
        out = out[..., : math.ceil(height / s), : math.ceil(width / s)]
        if self.value_kind == "density":
            out = F.softplus(out)
        return out

    @torch.no_grad()
    def set_output_bias(self, values: torch.Tensor) -> None:
        """Start the head near ``values`` (one per gene): bias = values (intensive) or softplus⁻¹(values) (density).

        Useful before training: with a small head weight the initial map is close to the per-gene mean target.
        """
        values = torch.as_tensor(values, dtype=self.head.bias.dtype, device=self.head.bias.device).reshape(-1)
        if self.value_kind == "density":
            values = values.clamp_min(1e-8)
            values = values + torch.log(-torch.expm1(-values))  # inverse softplus
        self.head.bias.copy_(values)
