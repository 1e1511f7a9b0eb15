"""MagNet's network: bin encoder, frozen context encoder, cross-attention fusion, graph levels and gene heads.

One forward pass takes a *window*: the bins of a spatially contiguous patch (crops, kNN graph), the context-tile
features around them (cached, from the frozen encoder) and the tile graphs, and returns a gene vector per bin
and per context tile (SPEC.md §3.3–§3.7)::

    x_bin  = proj_bin(bin_encoder(crop))                                    (trainable)
    f_ctx  = proj_ctx(context_encoder(tile))                                (encoder frozen, features cached)
    x      = x_bin + CA_region(x_bin, f_region[tokens]) + CA_spot(x_bin, f_spot[tokens])
    h      = mean_tokens(Transformer(GraphLevel_bin(x, bin graph)))          (the transformer is shared)
    ŷ_bin  = head_bin(h);   ŷ_tile = head_tile(Transformer(GraphLevel_tile(f_tile, tile graph)))

With ``faithful=True`` the cross-attention sees one token (the paper's linear map), the graph blocks run in
parallel on the same input (gated GraphSAGE-mean), the context projection is random and frozen, and one head
serves all levels; otherwise the bin attends over the 3 × 3 neighbourhood of its tiles, the blocks are stacked
GATv2 layers, the projection trains and each level has its own head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stpredict.models._weights import pooled_backbone

from ._layers import CrossAttention, GeneHead, GNNTransformer, GraphLevel

__all__ = ["LEVELS", "MagNetModule"]

#: The three levels, in the order of the module's outputs.
LEVELS = ("bin", "region", "spot")


class MagNetModule(nn.Module):
    """The network (see the module docstring).

    Parameters
    ----------
    n_genes
        Outputs per unit.
    bin_encoder, context_encoder
        timm architectures (pooled features).
    bin_pretrained, context_pretrained
        Their weights (``pretrained=`` sources of :func:`~stpredict.models._weights.pretrained_state_dict`).
    dim
        Width of the fused features, graph blocks and transformer (the paper: 1024).
    depth
        Graph blocks per level (tokens of the transformer).
    n_layers, num_heads
        Transformer layers and attention heads (also of the cross-attention).
    n_tokens
        Context tokens a bin attends over per level: 9 (its tile and the 8 around it) or 1 (the paper).
    faithful
        The paper's parallel gated-mean blocks, frozen random context projection and shared head.
        Otherwise a pretrained bin encoder keeps its batch-norm statistics in training (see :meth:`train`).
    dropout
        Dropout of attention, graph blocks and transformer (the paper: 0.1).
    encoder_kwargs
        Extra :func:`timm.create_model` keyword arguments for both encoders.
    """

    def __init__(
        self,
        n_genes: int,
        *,
        bin_encoder: str,
        context_encoder: str,
        bin_pretrained: Any = None,
        context_pretrained: Any = None,
        dim: int = 256,
        depth: int = 3,
        n_layers: int = 3,
        num_heads: int = 8,
        n_tokens: int = 9,
        faithful: bool = False,
        dropout: float = 0.1,
        encoder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.faithful = faithful
        self.n_tokens = n_tokens
        self.bin_encoder = pooled_backbone(bin_encoder, bin_pretrained, encoder_kwargs)
        # Spatially contiguous windows are far from i.i.d. batches: batch statistics of one patch of tissue drift the
        # running statistics away from what the encoder sees in eval mode, and the fine-tuned features collapsed to one
        # direction (benchmarks/README.md, MagNet). A pretrained encoder keeps its statistics; its affine terms train.
        self.frozen_bin_bn = bin_pretrained is not None and not faithful
        self.context_encoder = pooled_backbone(context_encoder, context_pretrained, encoder_kwargs)
        for p in self.context_encoder.parameters():
            p.requires_grad_(False)
        self.context_encoder.eval()
        self.bin_proj = nn.Linear(int(self.bin_encoder.num_features), dim)
        self.context_proj = nn.Linear(int(self.context_encoder.num_features), dim)
        if faithful:  # SPEC §3.3: a random 2048 → 1024 layer that is never trained
            self.context_proj.requires_grad_(False)
        self.attend = nn.ModuleDict(
            {lvl: CrossAttention(dim, n_tokens=n_tokens, num_heads=num_heads, dropout=dropout) for lvl in LEVELS[1:]}
        )
        mode = "parallel" if faithful else "stacked"
        self.graphs = nn.ModuleDict(
            {lvl: GraphLevel(dim, depth=depth, mode=mode, heads=num_heads, dropout=dropout) for lvl in LEVELS}
        )
        self.transformer = GNNTransformer(dim, depth=depth, n_layers=n_layers, num_heads=num_heads, dropout=dropout)
        n_heads = 1 if faithful else len(LEVELS)
        self.heads = nn.ModuleList([GeneHead(dim, n_genes) for _ in range(n_heads)])

    @property
    def context_features(self) -> int:
        """Width of the context encoder's pooled features (what the feature cache stores)."""
        return int(self.context_encoder.num_features)

    def train(self, mode: bool = True) -> MagNetModule:
        """Train mode for everything but the frozen parts.

        The context encoder stays in eval mode, and so, unless faithful, do the batch-norm layers of a pretrained
        bin encoder (their running statistics stay; their weights and biases still train).
        """
        super().train(mode)
        self.context_encoder.eval()
        if self.frozen_bin_bn:
            for sub in self.bin_encoder.modules():
                if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                    sub.eval()
        return self

    def head(self, level: str) -> GeneHead:
        """The gene head of ``level`` (the shared one when faithful)."""
        return self.heads[0 if len(self.heads) == 1 else LEVELS.index(level)]

    @torch.no_grad()
    def encode_context(self, tiles: torch.Tensor) -> torch.Tensor:
        """Pooled features of the frozen context encoder for normalised tiles ``(n, 3, s, s)``."""
        self.context_encoder.eval()
        return self.context_encoder(tiles)

    def _tokens(self, level: str, feats: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected context tokens ``(n_bins, n_tokens, dim)`` gathered by ``index`` (-1: missing) and presence."""
        present = index >= 0
        projected = self.context_proj(feats)
        if projected.shape[0] == 0:
            projected = projected.new_zeros((1, projected.shape[1]))
        tokens = projected[index.clamp(min=0)]
        return tokens, present

    def forward(self, batch: dict[str, torch.Tensor], *, tile_levels: bool = True) -> dict[str, torch.Tensor]:
        """Predict the bins (and, with ``tile_levels``, the context tiles) of a window.

        Parameters
        ----------
        batch
            ``crops`` (normalised bin crops ``(n_bins, 3, c, c)``), ``bin_edges`` (2, E), ``region_feats`` and
            ``spot_feats`` (cached pooled context features ``(n_tiles, F)``), ``bin_region`` and ``bin_spot``
            (``(n_bins, n_tokens)`` indices into those rows, -1 for a missing neighbour; the centre column is the
            bin's own tile), ``region_edges`` and ``spot_edges`` (tile graphs).
        tile_levels
            Also run the two tile graphs (training needs them for their loss terms; prediction does not).

        Returns
        -------
        ``{"bin": (n_bins, genes)}``, plus ``"region"`` and ``"spot"`` ``(n_tiles, genes)`` with ``tile_levels``.
        """
        x = self.bin_proj(self.bin_encoder(batch["crops"]))
        fused = x
        for level in LEVELS[1:]:
            index = batch[f"bin_{level}"]
            if self.n_tokens == 1 and index.shape[1] > 1:
                index = index[:, index.shape[1] // 2 : index.shape[1] // 2 + 1]
            tokens, present = self._tokens(level, batch[f"{level}_feats"], index)
            fused = fused + self.attend[level](x, tokens, present)
        out = {"bin": self._level("bin", fused, batch["bin_edges"])}
        if tile_levels:
            for level in LEVELS[1:]:
                feats = self.context_proj(batch[f"{level}_feats"])
                out[level] = self._level(level, feats, batch[f"{level}_edges"])
        return out

    def _level(self, level: str, x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
        tokens = self.graphs[level](x, edges)
        return self.head(level)(self.transformer(tokens))
