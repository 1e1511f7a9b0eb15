"""MagNet's building blocks: cross-attention fusion, graph blocks, the GNN transformer and the gene head.

SPEC.md §3.5 and §3.7. The paper's forms are reproduced from ``Junchao-Zhu/MagNet`` (``models/bs_block.py``,
``models/attention_transformer.py``, ``models/model.py``); the improved defaults are marked as ours.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import GATv2Conv, MessagePassing

from stpredict._errors import InputError

__all__ = ["CrossAttention", "GNNTransformer", "GatedGATBlock", "GatedMeanConv", "GeneHead", "GraphLevel"]


def _check_heads(dim: int, heads: int) -> None:
    if heads < 1 or dim % heads:
        msg = f"The width {dim} is not divisible by {heads} attention heads. Pick `dim` a multiple of the heads."
        raise InputError(msg)


class CrossAttention(nn.Module):
    """A bin feature attends over its context-tile tokens (SPEC.md §3.5).

    With ``n_tokens == 1`` this is the paper's form: the softmax over a single key is 1, so the layer is the linear
    map ``out_proj(v_proj(context))`` (with dropout on the trivial attention weight in training). With more tokens
    (ours, e.g. the bin's tile and the 8 around it) a learnable position embedding is added to the tokens, which
    serve as keys and values, and absent tokens are masked out.

    Parameters
    ----------
    dim
        Width of the query and the tokens.
    n_tokens
        Tokens per query.
    num_heads
        Attention heads (must divide ``dim``).
    dropout
        Dropout on the attention weights.
    """

    def __init__(self, dim: int, *, n_tokens: int, num_heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        if n_tokens < 1:
            msg = f"`n_tokens` must be at least 1, got {n_tokens}. Use 1 for the paper's form or e.g. 9."
            raise InputError(msg)
        self.dim = dim
        self.n_tokens = n_tokens
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        if n_tokens > 1:
            self.pos = nn.Parameter(torch.empty(n_tokens, dim))
            nn.init.trunc_normal_(self.pos, std=0.02)
        else:
            self.register_parameter("pos", None)

    def forward(self, query: torch.Tensor, tokens: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
        """Attend.

        Parameters
        ----------
        query
            ``(N, dim)`` bin features.
        tokens
            ``(N, n_tokens, dim)`` context features (keys and values).
        present
            ``(N, n_tokens)`` boolean, False for a missing token (its value is ignored); ``None``: all present.

        Returns
        -------
        ``(N, dim)``; zeros for a query with no present token.
        """
        n = query.shape[0]
        if tokens.ndim != 3 or tokens.shape != (n, self.n_tokens, self.dim):
            msg = (
                f"`tokens` must have shape ({n}, {self.n_tokens}, {self.dim}) for a query of shape "
                f"{tuple(query.shape)}, got {tuple(tokens.shape)}. Gather `n_tokens` context rows per query."
            )
            raise InputError(msg)
        if n == 0:
            return query.new_zeros((0, self.dim))
        if self.pos is not None:
            tokens = tokens + self.pos
        if present is None:
            out, _ = self.attn(query[:, None], tokens, tokens, need_weights=False)
            return out[:, 0]
        if present.shape != (n, self.n_tokens):
            msg = (
                f"`present` must have shape ({n}, {self.n_tokens}), got {tuple(present.shape)}. "
                "Pass one flag per token (False: missing)."
            )
            raise InputError(msg)
        present = present.bool()
        empty = ~present.any(dim=1)
        # a row with nothing to attend to would give NaN: unmask it for the computation, zero its output after
        padding = ~present & ~empty[:, None]
        out, _ = self.attn(query[:, None], tokens, tokens, key_padding_mask=padding, need_weights=False)
        return torch.where(empty[:, None], torch.zeros_like(out[:, 0]), out[:, 0])


class GatedMeanConv(MessagePassing):
    """The paper's "GAT" block: a GraphSAGE-mean layer with a node-score gate (SPEC.md §3.7).

    ``s = softmax_nodes(x a)`` over all ``N`` nodes, ``agg_i = s_i · mean_{j ∈ N(i)} x_j`` and
    ``h_i = L2normalize(ReLU(W agg_i))``, with ``W`` (no bias) and ``a`` xavier-uniform initialised, as
    ``gs_block_with_attention_fixed_weights(..., policy='mean', gcn=True, attention=True)``.

    Notes
    -----
    - With ``gcn=True`` the authors' block takes the mean over the adjacency as given: it neither adds nor removes the
      diagonal, and their graphs (``calcADJ``, the tile kNN graphs) have no self-loops. So the node itself is *not* in
      its mean; pass self-loops in ``edge_index`` to include it. Each edge counts once per occurrence, so pass
      ``edge_index`` without duplicates (their adjacency is binary). A node without neighbours gives zeros (the
      authors' dense form gives NaN).
    - **The gate has no effect.** ``s_i > 0`` is a per-node scalar and ``W`` has no bias, so
      ``ReLU(W s_i m_i) = s_i ReLU(W m_i)`` and the L2 normalisation removes ``s_i`` (up to its ``1e-12`` floor). The
      output does not depend on ``a``, which gets no gradient. The exception is a node whose ``s_i`` is so small
      (a very peaked softmax) that ``||ReLU(W s_i m_i)|| < 1e-12``: its output shrinks towards zero instead. The block
      is kept as written for faithfulness.

    Parameters
    ----------
    dim
        Input width.
    out_dim
        Output width (default ``dim``).
    """

    def __init__(self, dim: int, out_dim: int | None = None) -> None:
        super().__init__(aggr="mean", flow="source_to_target")
        out_dim = dim if out_dim is None else out_dim
        self.weight = nn.Parameter(torch.empty(out_dim, dim))
        self.att_weight = nn.Parameter(torch.empty(dim, 1))
        nn.init.xavier_uniform_(self.weight)
        nn.init.xavier_uniform_(self.att_weight)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Apply the block.

        Parameters
        ----------
        x
            ``(N, dim)`` node features.
        edge_index
            ``(2, E)`` edges, row 0 the source ``j`` (neighbour), row 1 the target ``i`` that averages it.

        Returns
        -------
        ``(N, out_dim)`` unit-norm (or zero) rows.
        """
        gate = torch.softmax((x @ self.att_weight)[:, 0], dim=0)
        mean = self.propagate(edge_index, x=x, size=(x.shape[0], x.shape[0]))
        return F.normalize(F.relu((gate[:, None] * mean) @ self.weight.T), p=2, dim=-1)

    def message(self, x_j: torch.Tensor) -> torch.Tensor:
        """Pass the neighbour's features unchanged (the aggregation averages them)."""
        return x_j


class GatedGATBlock(nn.Module):
    """Our default graph block: GATv2 attention with residuals, LayerNorm and a feed-forward [inferred].

    ``h = LayerNorm(x + Dropout(GATv2(x)))`` then ``out = LayerNorm(h + Dropout(FF(h)))`` with
    ``FF = Linear(dim, 2 dim) → GELU → Linear(2 dim, dim)``. The GATv2 layer has ``heads`` heads of width
    ``dim // heads``, concatenated, and adds self-loops.

    Parameters
    ----------
    dim
        Width (must be divisible by ``heads``).
    heads
        Attention heads.
    dropout
        Dropout on the attention coefficients and the residual branches.
    """

    def __init__(self, dim: int, *, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        _check_heads(dim, heads)
        self.gat = GATv2Conv(dim, dim // heads, heads=heads, concat=True, dropout=dropout, add_self_loops=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` ``(N, dim)`` on ``edge_index`` ``(2, E)`` (source, target); returns ``(N, dim)``."""
        h = self.norm1(x + self.dropout(self.gat(x, edge_index)))
        return self.norm2(h + self.dropout(self.ff(h)))


class GraphLevel(nn.Module):
    """The graph blocks of one level; their outputs are the tokens of the :class:`GNNTransformer` (SPEC.md §3.7).

    Parameters
    ----------
    dim
        Width.
    depth
        Number of blocks (= tokens).
    mode
        ``"parallel"``: the paper, ``depth`` :class:`GatedMeanConv` blocks all applied to the same input.
        ``"stacked"``: ours, ``depth`` :class:`GatedGATBlock` applied in sequence, each output a token.
    heads
        Attention heads of the stacked blocks.
    dropout
        Dropout of the stacked blocks.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 3,
        mode: Literal["stacked", "parallel"] = "stacked",
        heads: int = 8,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if depth < 1:
            msg = f"`depth` must be at least 1, got {depth}."
            raise InputError(msg)
        if mode == "parallel":
            blocks: list[nn.Module] = [GatedMeanConv(dim) for _ in range(depth)]
        elif mode == "stacked":
            blocks = [GatedGATBlock(dim, heads=heads, dropout=dropout) for _ in range(depth)]
        else:
            msg = f"Unknown graph mode {mode!r}. Use 'stacked' (GATv2 blocks) or 'parallel' (the paper)."
            raise InputError(msg)
        self.mode = mode
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """Run the blocks on ``x`` ``(N, dim)`` and ``edge_index`` ``(2, E)``; returns ``(N, depth, dim)``."""
        outs = []
        h = x
        for block in self.blocks:
            out = block(x if self.mode == "parallel" else h, edge_index)
            outs.append(out)
            h = out
        return torch.stack(outs, dim=1)


class GNNTransformer(nn.Module):
    """Transformer over the graph-block tokens of each node, averaged to one vector (SPEC.md §3.7).

    A learnable positional encoding ``(depth, dim)`` is added to the tokens, an ``nn.TransformerEncoder`` runs over
    the ``depth`` tokens of each node and the outputs are averaged. The positional encoding starts at trunc-normal
    std 0.02 [inferred]: the authors' ``torch.randn`` (std 1) would swamp the unit-norm outputs of the paper's blocks.

    Parameters
    ----------
    dim
        Width (``d_model``).
    depth
        Tokens per node.
    n_layers
        Encoder layers.
    num_heads
        Attention heads.
    ff_mult
        Feed-forward width as a multiple of ``dim``.
    dropout
        Encoder dropout.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int = 3,
        n_layers: int = 3,
        num_heads: int = 8,
        ff_mult: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        _check_heads(dim, num_heads)
        self.dim = dim
        self.depth = depth
        layer = nn.TransformerEncoderLayer(
            d_model=dim, nhead=num_heads, dim_feedforward=ff_mult * dim, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers=n_layers, enable_nested_tensor=False)
        self.positional_encoding = nn.Parameter(torch.empty(depth, dim))
        nn.init.trunc_normal_(self.positional_encoding, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encode ``tokens`` ``(N, depth, dim)``; returns ``(N, dim)`` (``N`` may be 0)."""
        if tokens.ndim != 3 or tokens.shape[1:] != (self.depth, self.dim):
            msg = (
                f"`tokens` must have shape (N, {self.depth}, {self.dim}), got {tuple(tokens.shape)}. "
                "Pass the stacked graph-block outputs of a GraphLevel with the same depth and width."
            )
            raise InputError(msg)
        if tokens.shape[0] == 0:
            return tokens.sum(dim=1)
        return self.encoder(tokens + self.positional_encoding).mean(dim=1)


class GeneHead(nn.Module):
    """``LayerNorm(dim) → Linear(dim, n_genes)`` (SPEC.md §3.7).

    Parameters
    ----------
    dim
        Input width.
    n_genes
        Outputs.
    """

    def __init__(self, dim: int, n_genes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, n_genes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, dim)`` to ``(N, n_genes)``."""
        return self.linear(self.norm(x))
