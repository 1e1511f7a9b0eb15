from __future__ import annotations

import numpy as np
import pytest
import torch

from stpredict.errors import InputError
from stpredict.models._magnet._layers import (
    CrossAttention,
    GatedGATBlock,
    GatedMeanConv,
    GeneHead,
    GNNTransformer,
    GraphLevel,
)
from stpredict.models._magnet._loss import LossWeights, magnet_loss, pcc_loss, pcc_rows

# ---------------------------------------------------------------------------------------------------------------------
# numpy references


def np_pcc_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The authors' formula, eps under the square root."""
    x = a - a.mean(1, keepdims=True)
    y = b - b.mean(1, keepdims=True)
    return (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1) + 1e-8)


def np_lpcc(a: np.ndarray, b: np.ndarray) -> float:
    return 0.0 if len(a) == 0 else 1.0 - float(np_pcc_rows(a, b).mean())


def np_mse(a: np.ndarray, b: np.ndarray) -> float:
    return 0.0 if a.size == 0 else float(((a - b) ** 2).mean())


def t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------------------------
# loss


def test_pcc_rows_matches_corrcoef_and_eps_placement() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 11)), rng.normal(size=(6, 11))
    want = [np.corrcoef(a[i], b[i])[0, 1] for i in range(6)]
    np.testing.assert_allclose(pcc_rows(t(a), t(b)).numpy(), want, rtol=1e-6)
    # tiny variance: the 1e-8 under the square root dominates, exactly as the authors wrote it
    small = np.array([[0.0, 1e-3, 2e-3]])
    np.testing.assert_allclose(pcc_rows(t(small), t(small)).numpy(), np_pcc_rows(small, small), rtol=1e-12)
    assert float(pcc_rows(t(small), t(small))[0]) < 0.9  # 2e-6 / sqrt(4e-12 + 1e-8) ≈ 0.02
    # constant row: 0, not NaN
    assert float(pcc_rows(torch.ones(1, 4), torch.arange(4.0)[None])[0]) == 0.0


def test_pcc_loss_and_empty() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(5, 7))
    assert float(pcc_loss(t(a), t(b))) == pytest.approx(np_lpcc(a, b), rel=1e-12)
    empty = torch.zeros(0, 7, requires_grad=True)
    out = pcc_loss(empty, torch.zeros(0, 7))
    assert out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert empty.grad is not None
    with pytest.raises(InputError, match="genes"):
        pcc_rows(torch.zeros(2, 3), torch.zeros(2, 4))


def _loss_inputs(seed: int = 0, n_bins: int = 9, n_region: int = 3, n_spot: int = 5, g: int = 6):
    rng = np.random.default_rng(seed)
    arrays = {
        "out_bin": rng.normal(size=(n_bins, g)),
        "y_bin": rng.normal(size=(n_bins, g)),
        "out_region": rng.normal(size=(n_region, g)),
        "y_region": rng.normal(size=(n_region, g)),
        "out_spot": rng.normal(size=(n_spot, g)),
        "y_spot": rng.normal(size=(n_spot, g)),
    }
    bin_region = rng.integers(-1, n_region, size=n_bins)
    bin_spot = rng.integers(-1, n_spot, size=n_bins)
    return arrays, bin_region, bin_spot


def _np_terms(arrays, bin_region, bin_spot, bm, rm, sm):
    ob, yb = arrays["out_bin"], arrays["y_bin"]
    mse = np_mse(ob[bm], yb[bm])
    pcc = np_lpcc(ob[bm], yb[bm])
    levels = np_lpcc(arrays["out_region"][rm], arrays["y_region"][rm]) + np_lpcc(
        arrays["out_spot"][sm], arrays["y_spot"][sm]
    )
    consistency = 0.0
    for key, parent in (("out_region", bin_region), ("out_spot", bin_spot)):
        rows = [b for b in range(len(ob)) if bm[b] and parent[b] >= 0]
        consistency += np_lpcc(arrays[key][parent[rows]], yb[rows])
    return {"mse": mse, "pcc": pcc, "levels": levels, "consistency": consistency}


@pytest.mark.parametrize("masked", [False, True])
def test_magnet_loss_matches_numpy(masked: bool) -> None:
    arrays, bin_region, bin_spot = _loss_inputs()
    rng = np.random.default_rng(5)
    bm = rng.random(9) < 0.6 if masked else np.ones(9, bool)
    rm = np.array([True, False, True]) if masked else np.ones(3, bool)
    sm = rng.random(5) < 0.6 if masked else np.ones(5, bool)
    kwargs = {"bin_mask": torch.tensor(bm), "region_mask": torch.tensor(rm), "spot_mask": torch.tensor(sm)}
    total, terms = magnet_loss(
        *(t(arrays[k]) for k in ("out_bin", "y_bin", "out_region", "y_region", "out_spot", "y_spot")),
        torch.tensor(bin_region),
        torch.tensor(bin_spot),
        **(kwargs if masked else {}),
    )
    want = _np_terms(arrays, bin_region, bin_spot, bm, rm, sm)
    for key, value in want.items():
        assert float(terms[key]) == pytest.approx(value, rel=1e-10, abs=1e-12), key
    expected = 0.75 * want["mse"] + 0.10 * want["pcc"] + 0.05 * want["levels"] + 0.05 * want["consistency"]
    assert float(total) == pytest.approx(expected, rel=1e-10)
    assert terms["loss"] is total


def test_magnet_loss_weights_and_parents() -> None:
    assert LossWeights() == LossWeights(mse=0.75, pcc=0.10, levels=0.05, consistency=0.05)
    arrays, _, _ = _loss_inputs(seed=2)
    tensors = [t(arrays[k]) for k in ("out_bin", "y_bin", "out_region", "y_region", "out_spot", "y_spot")]
    none = torch.full((9,), -1)
    w = LossWeights(mse=0.0, pcc=0.0, levels=0.0, consistency=1.0)
    total, terms = magnet_loss(*tensors, none, none, weights=w)
    assert float(total) == 0.0  # no bin has a parent: the consistency term is empty
    assert float(terms["mse"]) > 0
    # a bin's parent tile is the row it names: moving the tile rows with the index leaves the term unchanged
    parents = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, -1])
    perm = torch.tensor([2, 0, 1])
    inv = torch.argsort(perm)
    a, _ = magnet_loss(*tensors, parents, none, weights=w)
    moved = list(tensors)
    moved[2] = tensors[2][perm]
    b, _ = magnet_loss(*moved, torch.where(parents >= 0, inv[parents.clamp(min=0)], -1), none, weights=w)
    assert float(a) == pytest.approx(float(b), rel=1e-12)
    with pytest.raises(InputError, match="-1"):
        magnet_loss(*tensors, torch.full((9,), 3), none)
    with pytest.raises(InputError, match="bin_mask"):
        magnet_loss(*tensors, none, none, bin_mask=torch.ones(4, dtype=torch.bool))


def test_magnet_loss_empty_sets_have_a_graph() -> None:
    g = 4
    out_bin = torch.zeros(0, g, requires_grad=True)
    out_region = torch.randn(2, g, requires_grad=True)
    out_spot = torch.zeros(0, g, requires_grad=True)
    total, terms = magnet_loss(
        out_bin,
        torch.zeros(0, g),
        out_region,
        torch.randn(2, g),
        out_spot,
        torch.zeros(0, g),
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, dtype=torch.long),
        region_mask=torch.tensor([False, False]),
    )
    assert all(v.item() == 0.0 for v in terms.values())
    total.backward()
    assert out_bin.grad is not None
    assert out_region.grad is not None


# ---------------------------------------------------------------------------------------------------------------------
# cross-attention


def test_cross_attention_single_token_is_a_linear_map() -> None:
    torch.manual_seed(0)
    dim, n = 16, 5
    ca = CrossAttention(dim, n_tokens=1, num_heads=4).eval()
    assert ca.pos is None
    q, ctx = torch.randn(n, dim), torch.randn(n, dim)
    w, b = ca.attn.in_proj_weight, ca.attn.in_proj_bias
    v = ctx @ w[2 * dim :].T + b[2 * dim :]
    want = ca.attn.out_proj(v)
    with torch.no_grad():
        got = ca(q, ctx[:, None])
        torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
        # the query does not matter
        torch.testing.assert_close(ca(torch.randn(n, dim), ctx[:, None]), got, rtol=1e-5, atol=1e-6)
        # training mode: dropout on each head's single attention weight keeps that head's value slice (scaled by
        # 1 / (1 - p)) or drops it, as the authors' dropout on `attention_probs` (batch, heads, 1, 1)
        ca.train()
        torch.manual_seed(3)
        out = ca(q, ctx[:, None])
        heads = torch.linalg.solve(ca.attn.out_proj.weight, (out - ca.attn.out_proj.bias).T).T.reshape(n, 4, 4)
        v_heads = v.detach().reshape(n, 4, 4)
        kept = torch.isclose(heads, v_heads / 0.9, atol=1e-4).all(-1)
        dropped = torch.isclose(heads, torch.zeros(()), atol=1e-4).all(-1)
        assert (kept | dropped).all()
        assert dropped.any()
        assert kept.any()


def test_cross_attention_masking_and_shapes() -> None:
    torch.manual_seed(1)
    dim, n, k = 16, 4, 9
    ca = CrossAttention(dim, n_tokens=k, num_heads=4).eval()
    assert ca.pos.shape == (k, dim)
    assert float(ca.pos.detach().std()) < 0.05
    q, tokens = torch.randn(n, dim), torch.randn(n, k, dim)
    present = torch.rand(n, k) < 0.6
    present[:, 4] = True
    present[3] = False  # a bin with no context tile at all
    with torch.no_grad():
        out = ca(q, tokens, present)
        assert out.shape == (n, dim)
        assert torch.isfinite(out).all()
        assert torch.equal(out[3], torch.zeros(dim))
        # a masked token's value is ignored
        changed = tokens.clone()
        changed[~present] = 1e3 * torch.randn(int((~present).sum()), dim)
        torch.testing.assert_close(ca(q, changed, present), out)
        # a present token's value matters; None = all present
        assert not torch.allclose(ca(q, tokens + 1.0, present)[:2], out[:2])
        torch.testing.assert_close(ca(q, tokens), ca(q, tokens, torch.ones(n, k, dtype=torch.bool)))
        assert ca(q[:0], tokens[:0], present[:0]).shape == (0, dim)
    with pytest.raises(InputError, match="tokens"):
        ca(q, tokens[:, :3])
    with pytest.raises(InputError, match="divisible"):
        CrossAttention(10, n_tokens=1, num_heads=4)


def test_cross_attention_all_masked_row_has_finite_gradients() -> None:
    torch.manual_seed(2)
    ca = CrossAttention(8, n_tokens=3, num_heads=2)
    q = torch.randn(2, 8, requires_grad=True)
    tokens = torch.randn(2, 3, 8, requires_grad=True)
    present = torch.tensor([[True, False, True], [False, False, False]])
    ca(q, tokens, present).sum().backward()
    assert torch.isfinite(q.grad).all()
    assert torch.isfinite(tokens.grad).all()
    assert torch.equal(tokens.grad[1], torch.zeros(3, 8))


# ---------------------------------------------------------------------------------------------------------------------
# graph blocks


def _small_graph():
    # directed edges source -> target; node 4 has no in-edges (isolated as a target)
    edges = np.array([[1, 2, 0, 3, 0, 2, 1], [0, 0, 1, 1, 2, 3, 3]])
    return edges, torch.tensor(edges)


def _dense_gated_mean(x: np.ndarray, edges: np.ndarray, w: np.ndarray, a: np.ndarray) -> np.ndarray:
    """The authors' dense form: adj[i, j] = 1 when j -> i; mask = adj / deg; (mask * s[:, None]) @ x."""
    n = len(x)
    adj = np.zeros((n, n))
    adj[edges[1], edges[0]] = 1.0
    scores = (x @ a)[:, 0]
    s = np.exp(scores - scores.max())
    s /= s.sum()
    deg = adj.sum(1, keepdims=True)
    mask = np.divide(adj, deg, out=np.zeros_like(adj), where=deg > 0)
    agg = (mask * s[:, None]) @ x
    h = np.maximum(agg @ w.T, 0.0)
    norm = np.maximum(np.linalg.norm(h, axis=1, keepdims=True), 1e-12)
    return h / norm


def test_gated_mean_conv_matches_dense_computation() -> None:
    torch.manual_seed(0)
    edges_np, edges = _small_graph()
    conv = GatedMeanConv(6, 5).double()
    assert conv.weight.shape == (5, 6)
    assert conv.att_weight.shape == (6, 1)
    x = torch.randn(5, 6, dtype=torch.float64)
    got = conv(x, edges).detach().numpy()
    want = _dense_gated_mean(x.numpy(), edges_np, conv.weight.detach().numpy(), conv.att_weight.detach().numpy())
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert np.allclose(got[4], 0.0)  # no neighbours: zeros (the authors' dense form divides 0 by 0)
    # the node itself is not in its own mean unless the graph says so (the gate it moves cancels, see below)
    node0 = conv(x, edges)[0]
    x3 = x.clone()
    x3[0] = 5 * torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(conv(x3, edges)[0], node0)  # node 0's own features do not enter its output


def test_gated_mean_conv_gate_cancels() -> None:
    torch.manual_seed(1)
    _, edges = _small_graph()
    conv = GatedMeanConv(6).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    before = conv(x, edges).detach()
    with torch.no_grad():
        conv.att_weight.copy_(torch.randn(6, 1, dtype=torch.float64))  # a different gate
    torch.testing.assert_close(conv(x, edges), before, rtol=1e-12, atol=1e-12)
    (conv(x, edges) * torch.randn(5, 6, dtype=torch.float64)).sum().backward()
    assert conv.att_weight.grad.abs().max() < 1e-10
    assert conv.weight.grad.abs().max() > 1e-6


def test_gated_gat_block_runs_and_attends_neighbours() -> None:
    torch.manual_seed(2)
    _, edges = _small_graph()
    block = GatedGATBlock(16, heads=4, dropout=0.0).eval()
    x = torch.randn(5, 16)
    out = block(x, edges)
    assert out.shape == (5, 16)
    torch.testing.assert_close(out.mean(1), torch.zeros(5), atol=1e-5, rtol=0)  # ends in LayerNorm
    x2 = x.clone()
    x2[1] += 1.0  # node 1 feeds 0 and 3; node 4 hears nobody but itself
    out2 = block(x2, edges)
    assert not torch.allclose(out2[0], out[0])
    torch.testing.assert_close(out2[4], out[4])
    with pytest.raises(InputError, match="divisible"):
        GatedGATBlock(10, heads=4)


@pytest.mark.parametrize("mode", ["parallel", "stacked"])
def test_graph_level_shapes(mode: str) -> None:
    torch.manual_seed(3)
    _, edges = _small_graph()
    level = GraphLevel(16, depth=3, mode=mode, heads=4).eval()
    assert len(level.blocks) == 3
    kind = GatedMeanConv if mode == "parallel" else GatedGATBlock
    assert all(isinstance(b, kind) for b in level.blocks)
    out = level(torch.randn(5, 16), edges)
    assert out.shape == (5, 3, 16)
    assert level(torch.zeros(0, 16), torch.zeros(2, 0, dtype=torch.long)).shape == (0, 3, 16)


def test_graph_level_parallel_blocks_share_the_input_and_stacked_chain() -> None:
    torch.manual_seed(4)
    _, edges = _small_graph()
    x = torch.randn(5, 16)
    level = GraphLevel(16, depth=3, mode="parallel")
    out = level(x, edges)
    for k, block in enumerate(level.blocks):
        torch.testing.assert_close(out[:, k], block(x, edges))
    perm = [2, 0, 1]
    level.blocks = torch.nn.ModuleList([level.blocks[p] for p in perm])
    torch.testing.assert_close(level(x, edges), out[:, perm])
    stacked = GraphLevel(16, depth=2, mode="stacked", heads=4).eval()
    got = stacked(x, edges)
    first = stacked.blocks[0](x, edges)
    torch.testing.assert_close(got[:, 0], first)
    torch.testing.assert_close(got[:, 1], stacked.blocks[1](first, edges))
    with pytest.raises(InputError, match="stacked"):
        GraphLevel(16, mode="serial")  # type: ignore[arg-type]


def test_gnn_transformer_shapes_and_mean() -> None:
    torch.manual_seed(5)
    tr = GNNTransformer(16, depth=3, n_layers=2, num_heads=4).eval()
    assert tr.positional_encoding.shape == (3, 16)
    assert len(tr.encoder.layers) == 2
    assert tr.encoder.layers[0].linear1.out_features == 64
    tokens = torch.randn(7, 3, 16)
    out = tr(tokens)
    assert out.shape == (7, 16)
    with torch.no_grad():
        torch.testing.assert_close(out, tr.encoder(tokens + tr.positional_encoding).mean(1))
        # nodes are independent (no mixing across the batch, unlike the authors' view-reshape)
        torch.testing.assert_close(tr(tokens[2:4]), out[2:4], rtol=1e-5, atol=1e-6)
    assert tr(torch.zeros(0, 3, 16)).shape == (0, 16)
    with pytest.raises(InputError, match="tokens"):
        tr(torch.zeros(2, 4, 16))


def test_gene_head() -> None:
    head = GeneHead(16, 7)
    x = torch.randn(3, 16)
    out = head(x)
    assert out.shape == (3, 7)
    torch.testing.assert_close(
        out, head.linear(torch.nn.functional.layer_norm(x, (16,), head.norm.weight, head.norm.bias))
    )


# ---------------------------------------------------------------------------------------------------------------------
# end to end


@pytest.mark.parametrize("mode", ["parallel", "stacked"])
def test_gradients_reach_every_parameter(mode: str) -> None:
    torch.manual_seed(6)
    dim, g, n_bins, n_tiles, k = 16, 5, 6, 4, 3
    ca = CrossAttention(dim, n_tokens=k, num_heads=4)
    levels = torch.nn.ModuleDict({lvl: GraphLevel(dim, depth=2, mode=mode, heads=4) for lvl in ("bin", "tile")})
    tr = GNNTransformer(dim, depth=2, n_layers=1, num_heads=4, ff_mult=2)
    head = GeneHead(dim, g)
    modules = torch.nn.ModuleList([ca, levels, tr, head]).train()
    x = torch.randn(n_bins, dim)
    feats = torch.randn(n_tiles, dim)
    index = torch.randint(0, n_tiles, (n_bins, k))
    present = torch.rand(n_bins, k) < 0.8
    present[:, 1] = True
    ring = torch.arange(n_bins)
    bin_edges = torch.stack([torch.cat([ring, (ring + 1) % n_bins]), torch.cat([(ring + 1) % n_bins, ring])])
    tile_edges = torch.tensor([[0, 1, 1, 2, 2, 3, 3, 0], [1, 0, 2, 1, 3, 2, 0, 3]])
    fused = x + ca(x, feats[index], present)
    out_bin = head(tr(levels["bin"](fused, bin_edges)))
    out_tile = head(tr(levels["tile"](feats, tile_edges)))
    parent = index[:, 1]
    loss, _ = magnet_loss(
        out_bin, torch.randn(n_bins, g), out_tile, torch.randn(n_tiles, g), out_tile, torch.randn(n_tiles, g), parent,
        parent,
    )  # fmt: skip
    loss.backward()
    for name, p in modules.named_parameters():
        assert p.grad is not None, name
        if name.endswith("att_weight"):  # the paper's gate cancels (see test_gated_mean_conv_gate_cancels)
            assert float(p.grad.abs().max()) < 1e-6, name
        else:
            assert float(p.grad.abs().max()) > 0, name
