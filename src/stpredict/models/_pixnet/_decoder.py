"""PixNet's U-Net-style decoder (SPEC §2.3): DSUB and bilinear upsampling, SAFB fusion, per level.

- **CB** (composite block): (3×3 conv, BN, ReLU) × 2, as MCADS' ``conv_block``.
- **DSUB** (deep stages): ``CB(ReLU(Conv3(D2S(ReLU(Conv3(F, 4C))))))`` with ``nn.PixelShuffle(2)``.
- **Bilinear** (fine stages): ``CB(BilinearInterp×2(CB(F)))``.
- **SAFB** fuses the encoder skip ``F`` with the upsampled ``U``:
  ``F_mid = LN(Conv1(SiLU(DWC3(F))))``, ``F̂ = BN(SiLU(DWC3(F) + F_mid))``, ``F_u = [F̂, U]``,
  ``Q, K, V = Conv1(F_u)``, ``D = F_u + Proj(Attention(Q, K, V))``, then a 1×1 conv-BN-ReLU to the level's channels.
  Attention is over spatial positions (``softmax(QKᵀ/√d)V``, tokens = pixels) or over channels
  ("transposed" attention, ``softmax(Q̂K̂ᵀ·τ)V`` with L2-normalised rows and a learnt temperature τ per head,
  memory linear in the number of pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

__all__ = ["Decoder", "SAFB"]


class CB(nn.Sequential):
    """Composite block: (3×3 conv, batch norm, ReLU) twice."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class DSUB(nn.Sequential):
    """Depth-to-space upsampling block (2×): conv to 4C, pixel shuffle, conv, composite block."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch * 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.PixelShuffle(2),
            nn.Conv2d(out_ch, out_ch, 3, padding=1),
            nn.ReLU(inplace=True),
            CB(out_ch, out_ch),
        )


class BilinearUp(nn.Module):
    """Bilinear upsampling block (2×): composite block, bilinear ×2, composite block."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.pre = CB(in_ch, out_ch)
        self.post = CB(out_ch, out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.post(x)


class SpatialAttention(nn.Module):
    """Multi-head attention over pixels: ``softmax(QKᵀ/√d)V`` (``scaled_dot_product_attention``)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, h, w = q.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, self.heads, c // self.heads, h * w).transpose(-1, -2)

        out = F.scaled_dot_product_attention(tokens(q), tokens(k), tokens(v))
        return out.transpose(-1, -2).reshape(b, c, h, w)


class ChannelAttention(nn.Module):
    """Multi-head "transposed" attention over channels (Restormer's MDTA): a d×d map per head, linear in pixels."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, h, w = q.shape
        q, k, v = (t.reshape(b, self.heads, c // self.heads, h * w) for t in (q, k, v))
        q = F.normalize(q.float(), dim=-1)
        k = F.normalize(k.float(), dim=-1)
        attn = (q @ k.transpose(-1, -2)) * self.temperature
        out = attn.softmax(dim=-1).to(v.dtype) @ v
        return out.reshape(b, c, h, w)


class SAFB(nn.Module):
    """Separable attention fusion block: skip ``F`` (``skip_ch``) + upsampled ``U`` (``up_ch``) → ``out_ch``."""

    def __init__(self, skip_ch: int, up_ch: int, out_ch: int, *, attention: str) -> None:
        super().__init__()
        self.dwc = nn.Conv2d(skip_ch, skip_ch, 3, padding=1, groups=skip_ch)
        self.mid = nn.Sequential(nn.SiLU(), nn.Conv2d(skip_ch, skip_ch, 1), LayerNorm2d(skip_ch))
        self.bn = nn.BatchNorm2d(skip_ch)
        fused = skip_ch + up_ch
        latent = out_ch
        heads = max(1, latent // 64)
        self.qkv = nn.Conv2d(fused, 3 * latent, 1)
        self.attention_kind = attention
        self.attn = SpatialAttention(heads) if attention == "spatial" else ChannelAttention(heads)
        self.proj = nn.Conv2d(latent, fused, 1)
        self.out = nn.Sequential(nn.Conv2d(fused, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))

    def forward(self, f: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        d = self.dwc(f)
        f_hat = self.bn(F.silu(d + self.mid(d)))
        fused = torch.cat([f_hat, u], dim=1)
        q, k, v = self.qkv(fused).chunk(3, dim=1)
        fused = fused + self.proj(self.attn(q, k, v))
        return self.out(fused)


class Decoder(nn.Module):
    """From the deepest level up to the finest: upsample (DSUB for the first ``n_d2s_stages``, then bilinear), fuse.

    Parameters
    ----------
    skip_channels
        Channels of the encoder levels, finest first.
    strides
        Their strides, finest first.
    channels
        Decoder channels at each level, finest first (the deepest entry is unused: that level enters as is).
    n_d2s_stages
        How many of the deepest stages upsample by depth-to-space.
    attention
        ``"spatial"`` (attention over pixels at strides ≥ 4, over channels at strides 1 and 2, which bounds
        memory) or ``"channel"`` (over channels everywhere).
    """

    def __init__(
        self,
        skip_channels: list[int],
        strides: list[int],
        channels: list[int],
        *,
        n_d2s_stages: int,
        attention: str,
    ) -> None:
        super().__init__()
        n = len(skip_channels)
        ups, fuses = [], []
        in_ch = skip_channels[-1]
        for stage, level in enumerate(range(n - 2, -1, -1)):
            out_ch = channels[level]
            ups.append(DSUB(in_ch, out_ch) if stage < n_d2s_stages else BilinearUp(in_ch, out_ch))
            kind = "spatial" if attention == "spatial" and strides[level] >= 4 else "channel"
            fuses.append(SAFB(skip_channels[level], out_ch, out_ch, attention=kind))
            in_ch = out_ch
        self.ups = nn.ModuleList(ups)
        self.fuses = nn.ModuleList(fuses)
        self.out_channels = in_ch

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for stage, (up, fuse) in enumerate(zip(self.ups, self.fuses, strict=True)):
            skip = feats[len(feats) - 2 - stage]
            u = up(x)
            if u.shape[-2:] != skip.shape[-2:]:
                u = F.interpolate(u, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = fuse(skip, u)
        return x
