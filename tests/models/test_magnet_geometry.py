from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_

from stpredict.errors import InputError
from stpredict.models._magnet._geometry import (
    cell_of,
    crop_origins,
    grid_indices,
    isolated_nodes,
    knn_edges,
    neighbour_tokens,
    symmetric_knn_edges,
    window_bins,
)

# ---------------------------------------------------------------------------------------------------------------------
# kNN graphs


def _brute_knn(pos: np.ndarray, k: int) -> np.ndarray:
    """O(n²) reference with the documented rule: rank by distance rounded to 1e-9 of the bbox diagonal, then by j."""
    n = pos.shape[0]
    kk = min(k, n - 1)
    if n <= 1 or kk <= 0:
        return np.zeros((2, 0), dtype=np.int64)
    diag = float(np.sqrt(((pos.max(0) - pos.min(0)) ** 2).sum())) or 1.0
    src, dst = [], []
    for i in range(n):
        diff = pos - pos[i]
        dist = np.sqrt((diff * diff).sum(-1))
        key = np.rint(dist / (diag * 1e-9)).astype(np.int64)
        ranked = sorted((int(key[j]), j) for j in range(n) if j != i)
        src += [j for _, j in ranked[:kk]]
        dst += [i] * kk
    return np.array([src, dst], dtype=np.int64)


@st_.composite
def _point_sets(draw: st_.DrawFn) -> np.ndarray:
    n = draw(st_.integers(0, 40))
    kind = draw(st_.sampled_from(["float", "grid", "scaled_grid"]))
    seed = draw(st_.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "float":
        return rng.uniform(-50, 50, size=(n, 2))
    side = draw(st_.integers(1, 7))
    ij = rng.integers(0, side, size=(n, 2)).astype(np.float64)  # exact ties and coincident points
    if kind == "grid":
        return ij
    return 0.3 + ij * 0.7  # ties up to floating-point noise


@settings(max_examples=150, deadline=None)
@given(pos=_point_sets(), k=st_.integers(0, 12))
def test_knn_edges_matches_brute_force(pos, k):
    got = knn_edges(pos, k)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _brute_knn(pos, k))


def test_knn_edges_grid_ties_smaller_index_wins():
    # 5×5 grid, k=4 at an interior node: the 4 axis neighbours (distance 1) exactly; k=6 adds the 2 diagonals with
    # the smallest indices among the 4 at distance √2.
    ii, jj = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    pos = np.c_[jj.ravel(), ii.ravel()].astype(float)
    centre = 12
    e = knn_edges(pos, 4)
    assert e[0, e[1] == centre].tolist() == [7, 11, 13, 17]
    e = knn_edges(pos, 6)
    assert e[0, e[1] == centre].tolist() == [7, 11, 13, 17, 6, 8]
    # where the k nearest are unambiguous (interior nodes, k=4), relabelling the input relabels the graph
    perm = np.random.default_rng(0).permutation(25)
    e_perm = knn_edges(pos[perm], 4)
    interior = {int(i) for i in np.flatnonzero((pos.min(1) > 0) & (pos.max(1) < 4))}
    mapped = {(int(perm[s]), int(perm[t])) for s, t in e_perm.T if perm[t] in interior}
    assert mapped == {(int(s), int(t)) for s, t in knn_edges(pos, 4).T if t in interior}
    assert len(mapped) == 4 * 9


def test_knn_edges_many_duplicates_requery():
    # 30 coincident points plus 3 far ones: every tie must be resolved by index, far beyond the first kd-tree query.
    pos = np.r_[np.zeros((30, 2)), [[10.0, 0.0], [0.0, 10.0], [10.0, 10.0]]]
    np.testing.assert_array_equal(knn_edges(pos, 8), _brute_knn(pos, 8))
    assert knn_edges(pos, 8)[0, :8].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize(("n", "k"), [(0, 8), (1, 8), (2, 8), (5, 4), (5, 5), (5, 100)])
def test_knn_edges_small_n_and_large_k(n, k):
    pos = np.random.default_rng(n).normal(size=(n, 2))
    e = knn_edges(pos, k)
    kk = max(min(k, n - 1), 0)
    assert e.shape == (2, n * kk)
    if n <= 1:
        assert e.shape == (2, 0)
    if k >= n - 1 and n > 1:  # complete graph without self-loops
        assert {(int(s), int(t)) for s, t in e.T} == {(s, t) for s in range(n) for t in range(n) if s != t}


def test_knn_edges_rejects_bad_input():
    with pytest.raises(InputError, match="non-negative integer"):
        knn_edges(np.zeros((3, 2)), -1)
    with pytest.raises(InputError, match="shape"):
        knn_edges(np.zeros(3), 2)
    with pytest.raises(InputError, match="NaN"):
        knn_edges(np.array([[0.0, np.nan], [1.0, 1.0]]), 1)


@settings(max_examples=60, deadline=None)
@given(pos=_point_sets(), k=st_.integers(1, 10))
def test_symmetric_knn_edges_properties(pos, k):
    e = symmetric_knn_edges(pos, k)
    assert e.dtype == np.int64
    pairs = [(int(s), int(t)) for s, t in e.T]
    assert len(pairs) == len(set(pairs))  # no duplicates
    assert all(s != t for s, t in pairs)  # no self-loops
    assert set(pairs) == {(t, s) for s, t in pairs}  # symmetric
    assert {(int(s), int(t)) for s, t in knn_edges(pos, k).T} <= set(pairs)  # contains the directed kNN
    # exactly the union of the directed graph and its reverse
    d = {(int(s), int(t)) for s, t in knn_edges(pos, k).T}
    assert set(pairs) == d | {(t, s) for s, t in d}
    assert pairs == sorted(pairs, key=lambda st: (st[1], st[0]))


def test_isolated_nodes():
    e = np.array([[0, 1, 2], [1, 2, 1]])
    np.testing.assert_array_equal(isolated_nodes(e, 5), [0, 3, 4])
    assert isolated_nodes(np.zeros((2, 0), dtype=np.int64), 3).tolist() == [0, 1, 2]
    assert isolated_nodes(symmetric_knn_edges(np.random.default_rng(0).normal(size=(10, 2)), 3), 10).size == 0
    assert isolated_nodes(knn_edges(np.zeros((1, 2)), 8), 1).tolist() == [0]
    assert isolated_nodes(e, 5).dtype == np.int64


# ---------------------------------------------------------------------------------------------------------------------
# Bin grids


@pytest.mark.parametrize("pitch", [8.0, 16.0, 7.3])
def test_grid_indices_recovers_shifted_grid(pitch):
    rng = np.random.default_rng(1)
    ii, jj = np.meshgrid(np.arange(2, 12), np.arange(3, 15), indexing="ij")
    rows, cols = ii.ravel(), jj.ravel()
    keep = rng.random(rows.size) > 0.3  # some positions missing
    rows, cols = rows[keep], cols[keep]
    x0, y0 = 0.3 * pitch, 0.6 * pitch
    centers = np.c_[x0 + (cols + 0.5) * pitch, y0 + (rows + 0.5) * pitch]
    centers += rng.uniform(-0.03, 0.03, size=centers.shape) * pitch  # within tolerance
    perm = rng.permutation(rows.size)
    r, c, origin = grid_indices(centers[perm], pitch)
    assert r.dtype == np.int64
    assert c.dtype == np.int64
    np.testing.assert_array_equal(r, rows[perm])
    np.testing.assert_array_equal(c, cols[perm])
    np.testing.assert_allclose(origin, (x0, y0), atol=0.01 * pitch)


def test_grid_indices_integer_grid_at_origin():
    # Bins of pitch 8 anchored at (0, 0): centres at 4, 12, ...; the origin must come out as exactly 0, not ≈ pitch.
    rows, cols = np.meshgrid(np.arange(5), np.arange(7), indexing="ij")
    centers = np.c_[(cols.ravel() + 0.5) * 8, (rows.ravel() + 0.5) * 8]
    r, c, origin = grid_indices(centers, 8)
    assert origin == (0.0, 0.0)
    np.testing.assert_array_equal(r, rows.ravel())
    np.testing.assert_array_equal(c, cols.ravel())


def test_grid_indices_origin_near_pitch_wraps_consistently():
    pitch = 10.0
    centers = np.array([[9.999 + 5 + 10 * j, 5.0 + 10 * i] for i in range(3) for j in range(4)])
    r, c, (x0, y0) = grid_indices(centers, pitch)
    assert 0 <= x0 < pitch
    assert 0 <= y0 < pitch
    ideal = np.c_[x0 + (c + 0.5) * pitch, y0 + (r + 0.5) * pitch]
    np.testing.assert_allclose(ideal, centers, atol=1e-6)


def test_grid_indices_rejects_jitter():
    pitch = 8.0
    rows, cols = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    centers = np.c_[(cols.ravel() + 0.5) * pitch, (rows.ravel() + 0.5) * pitch]
    centers[7] += [2.5, 0.0]  # 0.31 pitch off
    centers[20] += [0.0, 1.5]  # 0.19 pitch off
    with pytest.raises(InputError, match=r"2 of 36 bin centres") as info:
        grid_indices(centers, pitch)
    msg = str(info.value)
    assert "bin 7" in msg
    assert "st.pp.bin_counts(sdata, bin_size=<bin_um>)" in msg
    # a larger tolerance accepts them
    r, c, _ = grid_indices(centers, pitch, tol=0.4)
    assert (r[7], c[7]) == (1, 1)


def test_grid_indices_rejects_duplicates_and_empty():
    centers = np.array([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.1, 4.0]])
    with pytest.raises(InputError, match=r"bins 1 and 3 both sit at grid \(row 0, col 1\)") as info:
        grid_indices(centers, 8)
    assert "bin_counts" in str(info.value)
    with pytest.raises(InputError, match="no bins") as info:
        grid_indices(np.zeros((0, 2)), 8)
    assert "bin_counts" in str(info.value)
    with pytest.raises(InputError, match="pitch"):
        grid_indices(centers[:1], 0)


# ---------------------------------------------------------------------------------------------------------------------
# Cells, neighbourhoods, windows, crops


def test_cell_of_boundaries_are_half_open():
    xy = np.array([[0.0, 0.0], [223.999, 223.999], [224.0, 0.0], [0.0, 224.0], [447.9, 448.0], [-0.001, -224.0]])
    np.testing.assert_array_equal(cell_of(xy, 224), [[0, 0], [0, 0], [1, 0], [0, 1], [1, 2], [-1, -1]])
    # with an origin: boundaries move with it
    got = cell_of(np.array([[10.0, 20.0], [9.999, 19.999], [110.0, 120.0]]), 100, origin=(10.0, 20.0))
    np.testing.assert_array_equal(got, [[0, 0], [-1, -1], [1, 1]])
    assert cell_of(xy, 224).dtype == np.int64


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_neighbour_tokens_matches_brute_force(radius):
    rng = np.random.default_rng(radius)
    table = np.unique(rng.integers(-3, 8, size=(40, 2)), axis=0)
    table = table[rng.permutation(len(table))]
    cells = rng.integers(-5, 10, size=(60, 2))
    got = neighbour_tokens(cells, table, radius)
    lookup = {(int(c), int(r)): i for i, (c, r) in enumerate(table)}
    side = 2 * radius + 1
    want = np.full((len(cells), side * side), -1, dtype=np.int64)
    for q, (c, r) in enumerate(cells):
        for t, (dr, dc) in enumerate(itertools.product(range(-radius, radius + 1), repeat=2)):
            want[q, t] = lookup.get((int(c + dc), int(r + dr)), -1)
    np.testing.assert_array_equal(got, want)
    assert (got == -1).any()
    assert (got >= 0).any()
    # the centre token is the query cell itself when it is in the table
    centre = got[:, side * side // 2]
    for q, (c, r) in enumerate(cells):
        assert centre[q] == lookup.get((int(c), int(r)), -1)


def test_neighbour_tokens_order_and_edge_cases():
    table = np.array([[5, 5], [6, 5], [5, 6], [4, 4]])  # (col, row)
    got = neighbour_tokens(np.array([[5, 5]]), table)
    # row-major over (drow, dcol): (-1,-1) → (4,4)=3; centre → 0; (0,+1) → (6,5)=1; (+1,0) → (5,6)=2
    assert got.tolist() == [[3, -1, -1, -1, 0, 1, -1, 2, -1]]
    assert neighbour_tokens(np.zeros((0, 2), dtype=int), table).shape == (0, 9)
    assert neighbour_tokens(np.array([[0, 0]]), np.zeros((0, 2), dtype=int)).tolist() == [[-1] * 9]
    with pytest.raises(InputError, match="repeated"):
        neighbour_tokens(np.array([[0, 0]]), np.array([[1, 1], [1, 1]]))


def test_neighbour_tokens_large_is_vectorised():
    rng = np.random.default_rng(3)
    table = np.unique(rng.integers(0, 400, size=(50_000, 2)), axis=0)
    cells = table[rng.integers(0, len(table), size=200_000)]
    got = neighbour_tokens(cells, table)
    assert got.shape == (200_000, 9)
    np.testing.assert_array_equal(table[got[:, 4]], cells)


@pytest.mark.parametrize(
    ("core", "origin", "pitch", "halo"),
    [
        ((0.0, 0.0, 64.0, 64.0), (0.0, 0.0), 8.0, 0.0),
        ((0.0, 0.0, 64.0, 64.0), (0.0, 0.0), 8.0, 8.0),
        ((13.2, 7.9, 101.0, 57.3), (2.5, 5.1), 8.0, 12.0),
        ((224.0, 448.0, 448.0, 672.0), (0.3, 0.7), 16.0, 20.0),
        ((3.0, 3.0, 4.0, 4.0), (0.0, 0.0), 8.0, 0.0),  # no centre inside
        ((-40.0, -40.0, 10.0, 10.0), (1.0, 1.0), 7.0, 3.5),  # negative indices
    ],
)
def test_window_bins_matches_brute_force(core, origin, pitch, halo):
    rows, cols, in_core = window_bins(core, origin, pitch, halo)
    x0, y0, x1, y1 = core
    want_rc, want_core = [], []
    for r in range(-50, 120):
        cy = origin[1] + (r + 0.5) * pitch
        for c in range(-50, 120):
            cx = origin[0] + (c + 0.5) * pitch
            if x0 - halo <= cx < x1 + halo and y0 - halo <= cy < y1 + halo:
                want_rc.append((r, c))
                want_core.append(x0 <= cx < x1 and y0 <= cy < y1)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == want_rc  # row-major
    assert in_core.tolist() == want_core
    assert rows.dtype == np.int64
    assert in_core.dtype == bool


def test_window_bins_centre_on_boundary():
    # centres at 4, 12, 20, ...; a core edge at 12 keeps the centre 12 on the right (half-open)
    rows, cols, in_core = window_bins((12.0, 12.0, 20.0, 20.0), (0.0, 0.0), 8.0, 0.0)
    assert (rows.tolist(), cols.tolist(), in_core.tolist()) == ([1], [1], [True])
    rows, cols, in_core = window_bins((4.0, 4.0, 12.0, 12.0), (0.0, 0.0), 8.0, 8.0)
    assert sorted(set(cols.tolist())) == [-1, 0, 1]
    assert in_core.sum() == 1


@pytest.mark.parametrize(("pitch", "size"), [(8, 112), (16, 112), (2, 224), (7, 113)])
def test_crop_origins_exactly_centred_when_parity_matches(pitch, size):
    assert (size - pitch) % 2 == 0
    idx = np.array([[0, 0], [3, 5], [10, 2]])
    for origin in [(0, 0), (3, 1)]:
        centers = np.asarray(origin) + (idx + 0.5) * pitch
        tl = crop_origins(centers, size)
        assert tl.dtype == np.int64
        np.testing.assert_array_equal(tl + size / 2, centers)  # crop centre == bin centre


def test_crop_origins_half_pixel_off_when_parity_differs():
    centers = np.array([[4.0, 12.0]])  # pitch 8 bins, size 111: half a pixel right of / below
    tl = crop_origins(centers, 111)
    np.testing.assert_array_equal(tl + 111 / 2, centers + 0.5)
    # the formula itself
    pts = np.random.default_rng(0).uniform(-100, 1000, size=(50, 2))
    np.testing.assert_array_equal(crop_origins(pts, 112), np.floor(pts - 56 + 0.5))
    with pytest.raises(InputError, match="positive integer"):
        crop_origins(pts, 0)
