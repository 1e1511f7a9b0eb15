from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st_h
from scipy import ndimage

import stpredict as st
from stpredict._geometry import affine_between, um_per_px
from stpredict._meta import get_element_meta
from stpredict.datasets import _synthetic as S
from stpredict.datasets._cells import _cells_near
from stpredict.datasets._render import _render_image, _render_tissue_window, _render_truth_window
from stpredict.datasets._section import _make_section
from stpredict.datasets._units import _integrate_density, _Units
from stpredict.errors import InputError

SMALL = {"shape_um": (500.0, 600.0), "um_per_px": 1.0, "n_genes": 12, "seed": 3}


@pytest.fixture(scope="module")
def visium():
    return st.datasets.synthetic(**SMALL, layout="visium")


@pytest.fixture(scope="module")
def big_visium():
    return st.datasets.synthetic(shape_um=(1200.0, 1200.0), um_per_px=2.0, n_genes=20, layout="visium", seed=5)


def _he(sdata) -> np.ndarray:
    return sdata.images["he"]["scale0"]["image"].values


def test_elements_dtypes_and_calibration(visium):
    sd = visium
    he = sd.images["he"]
    levels = list(he.children)
    img = _he(sd)
    assert img.dtype == np.uint8
    assert img.shape == (3, 500, 600)
    assert list(he["scale0"]["image"].coords["c"].values) == ["r", "g", "b"]
    assert len(levels) >= 2
    assert max(he[levels[-1]]["image"].shape[1:]) <= 256
    truth = sd.images["truth"]
    assert truth.dtype == np.float32
    assert truth.shape == (12, 250, 300)
    assert list(truth.coords["c"].values) == [f"Gene{g:03d}" for g in range(12)]
    assert um_per_px(sd, "he") == pytest.approx(1.0)
    assert um_per_px(sd, "truth") == pytest.approx(2.0)
    np.testing.assert_allclose(affine_between(sd, "truth", "he"), np.diag([2.0, 2.0, 1.0]), atol=1e-12)
    np.testing.assert_allclose(affine_between(sd, "spots", "he"), np.eye(3), atol=1e-12)
    assert get_element_meta(sd, "truth", truth)["value_kind"] == "density"
    assert get_element_meta(sd, "truth")["units"] == "counts per um2"


def test_table_contract(visium):
    sd = visium
    t = sd.tables["table"]
    assert sp.issparse(t.X)
    assert isinstance(t.X, sp.csr_matrix)
    assert t.X.dtype == np.float32
    np.testing.assert_array_equal(t.X.data, np.round(t.X.data))
    assert list(t.var_names) == [f"Gene{g:03d}" for g in range(12)]
    for col in ("instance_id", "region", "array_row", "array_col", "section", "patient"):
        assert col in t.obs
    attrs = t.uns["spatialdata_attrs"]
    assert attrs["region"] == "spots"
    assert attrs["region_key"] == "region"
    assert attrs["instance_key"] == "instance_id"
    shapes = sd.shapes["spots"]
    np.testing.assert_array_equal(np.sort(shapes.index.values), np.sort(t.obs["instance_id"].values))
    centres = np.stack([shapes.geometry.x.values, shapes.geometry.y.values], axis=1)
    np.testing.assert_allclose(centres[t.obs["instance_id"].values], t.obsm["spatial"])
    np.testing.assert_allclose(shapes["radius"].values, 27.5)
    assert t.layers["expected"].shape == t.shape
    fr = t.obsm["cell_type_fractions"]
    assert fr.shape == (t.n_obs, 5)
    np.testing.assert_allclose(fr.sum(axis=1), 1.0, atol=1e-5)
    params = t.uns["stpredict"]["synthetic"]
    assert params["seed"] == 3
    assert params["layout"] == "visium"
    assert params["cell_types"] == ["tumour", "lymphocyte", "fibroblast", "epithelial", "adipocyte"]
    morph = t.var["morphology_driven"].to_numpy()
    assert morph.dtype == bool
    assert 0 < (~morph).sum() < morph.size
    profiles = t.varm["cell_type_profiles"]
    assert profiles.shape == (12, 5)
    assert np.all(profiles[~morph] == 0)
    assert np.all(profiles[morph] > 0)


def test_same_seed_identical_other_seed_differs():
    kw = {"shape_um": (300.0, 300.0), "um_per_px": 1.0, "n_genes": 6, "layout": "visium"}
    a, b = st.datasets.synthetic(**kw, seed=1), st.datasets.synthetic(**kw, seed=1)
    c = st.datasets.synthetic(**kw, seed=2)
    np.testing.assert_array_equal(_he(a), _he(b))
    np.testing.assert_array_equal(a.images["truth"].values, b.images["truth"].values)
    np.testing.assert_array_equal(a.tables["table"].X.toarray(), b.tables["table"].X.toarray())
    assert (_he(a) != _he(c)).mean() > 0.1
    assert not np.allclose(a.images["truth"].values, c.images["truth"].values)


def test_counts_match_integrated_density(big_visium):
    t = big_visium.tables["table"]
    x = t.X.toarray().astype(np.float64)
    mu = t.layers["expected"].astype(np.float64)
    assert mu.sum() > 1000
    # total over all units and genes: Poisson, so z-score against the summed mean
    z = (x.sum() - mu.sum()) / np.sqrt(mu.sum())
    assert abs(z) < 5
    # per gene
    zg = (x.sum(axis=0) - mu.sum(axis=0)) / np.sqrt(mu.sum(axis=0) + 1e-12)
    assert np.all(np.abs(zg) < 5.5)


def test_expected_equals_brute_force_integration(visium):
    """layers['expected'] = ∫ density over each spot's disk, checked by 16× supersampling the truth pixels."""
    sd = visium
    truth = sd.images["truth"].values.astype(np.float64)
    t = sd.tables["table"]
    tpx = 2.0
    sub = 16
    ny, nx = truth.shape[1:]
    for u in range(0, t.n_obs, max(t.n_obs // 6, 1)):
        cx, cy = t.obsm["spatial"][u]  # image px = µm here
        r = 27.5
        i0, i1 = int((cy - r) // tpx), int((cy + r) // tpx) + 1
        j0, j1 = int((cx - r) // tpx), int((cx + r) // tpx) + 1
        ys = (np.arange(i0 * sub, i1 * sub) + 0.5) / sub * tpx
        xs = (np.arange(j0 * sub, j1 * sub) + 0.5) / sub * tpx
        inside = ((xs[None] - cx) ** 2 + (ys[:, None] - cy) ** 2) < r * r
        frac = inside.reshape(i1 - i0, sub, j1 - j0, sub).mean(axis=(1, 3))
        i0c, j0c = max(i0, 0), max(j0, 0)
        block = truth[:, i0c : min(i1, ny), j0c : min(j1, nx)]
        frac = frac[i0c - i0 : i0c - i0 + block.shape[1], j0c - j0 : j0c - j0 + block.shape[2]]
        ref = (block * frac).sum(axis=(1, 2)) * tpx * tpx
        np.testing.assert_allclose(t.layers["expected"][u], ref, rtol=5e-3, atol=1e-4)


def test_density_zero_outside_tissue():
    sd = st.datasets.synthetic(shape_um=(1000.0, 1000.0), um_per_px=2.0, n_genes=10, layout=None, seed=7)
    truth = sd.images["truth"].values
    sec = _make_section(seed=7, tissue_seed=7, um_per_px=2.0, truth_um_per_px=2.0, stride=1, ny=500, nx=500,
                        n_genes=10,
                        n_cell_types=5, mean_counts_per_um2=0.1)  # fmt: skip
    tissue = _render_tissue_window(sec, 0, 0, 500, 500, 2.0) > 0
    assert 0.3 < tissue.mean() < 0.95
    # no footprint reaches further than 3σ ≤ 3 · 8 µm · 1.3 = 31.2 µm: 16 truth pixels
    near = ndimage.binary_dilation(tissue, iterations=17)
    assert np.all(truth[:, ~near] == 0)
    total = truth.sum(axis=0)
    assert np.mean(total[tissue] > 0) > 0.95
    # and the image is white-ish there
    img = _he(sd).astype(int)
    assert img[:, ~near].min() >= 240


def test_spots_mix_cell_types(big_visium):
    fr = big_visium.tables["table"].obsm["cell_type_fractions"]
    n_types = (fr > 0.1).sum(axis=1)
    assert np.mean(n_types >= 2) > 0.8


def test_cell_types_differ_in_morphology():
    """A nearest-centroid classifier on 4 features of each cell's own nucleus and surroundings finds its type."""
    sec = _make_section(seed=11, tissue_seed=11, um_per_px=0.5, truth_um_per_px=2.0, stride=4, ny=1200, nx=1200,
                        n_genes=5,
                        n_cell_types=5, mean_counts_per_um2=0.1)  # fmt: skip
    img = _render_image(sec, 0, 0, 1200, 1200).astype(float)
    c = _cells_near(sec, 0, 600, 0, 600)
    r = 20
    ok = (c.nx > 12) & (c.nx < 588) & (c.ny > 12) & (c.ny < 588)
    typ = c.kind[ok]
    feats = []
    for x, y in zip(c.nx[ok] / 0.5, c.ny[ok] / 0.5, strict=True):
        i, j = int(y), int(x)
        p = img[:, i - r : i + r, j - r : j + r]
        lab, _ = ndimage.label(p[0] < 160)
        own = lab == lab[r, r] if lab[r, r] else np.zeros(lab.shape, dtype=bool)
        ring = ~own & ndimage.binary_dilation(own, iterations=6)
        n = own.sum()
        feats.append([np.log1p(n), p[0][own].mean() if n else 255, p[1][ring].mean() if n else 255,
                      p[2][ring].mean() if n else 255])  # fmt: skip
    f = np.array(feats)
    z = (f - f.mean(0)) / f.std(0)
    train = np.arange(len(z)) % 2 == 0
    assert len(np.unique(typ[train])) == 5
    centroids = np.stack([z[train & (typ == k)].mean(0) for k in range(5)])
    pred = ((z[~train][:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    truth = typ[~train]
    balanced = np.mean([np.mean(pred[truth == k] == k) for k in range(5) if (truth == k).any()])
    assert balanced > 0.45  # chance: 0.2


def test_square_integration_exact_on_constant():
    values = np.full((1, 20, 30), 2.0)
    units = _Units("square", a=np.array([0.3, 5.0, 28.5]), b=np.array([0.7, 3.25, 10.0]), c=np.array([4.1, 2.5, 3.0]))
    out = _integrate_density(values, units, px_area_um2=4.0)
    # the third square sticks out of the raster: only 1.5 × 3 of it lies on pixels
    np.testing.assert_allclose(out[:, 0], 2.0 * 4.0 * np.array([4.1**2, 2.5**2, 1.5 * 3.0]), rtol=1e-12)


@settings(max_examples=30, deadline=None)
@given(
    left=st_h.floats(-3.0, 15.0),
    top=st_h.floats(-3.0, 15.0),
    side=st_h.floats(0.05, 9.0),
    seed=st_h.integers(0, 2**16),
)
def test_square_integration_matches_supersampled_reference(left, top, side, seed):
    rng = np.random.default_rng(seed)
    values = rng.random((2, 16, 18))
    units = _Units("square", a=np.array([left]), b=np.array([top]), c=np.array([side]))
    out = _integrate_density(values, units, px_area_um2=1.0)[0]
    sub = 256
    ys = (np.arange(16 * sub) + 0.5) / sub
    xs = (np.arange(18 * sub) + 0.5) / sub
    fy = ((ys >= top) & (ys < top + side)).reshape(16, sub).mean(axis=1)
    fx = ((xs >= left) & (xs < left + side)).reshape(18, sub).mean(axis=1)
    ref = np.einsum("cij,i,j->c", values, fy, fx)
    # each axis's overlap is off by at most 1/sub per edge in the reference
    np.testing.assert_allclose(out, ref, atol=2 * 2 * (side + 1) / sub * values.max() * (side + 2))
    # the kernel is exact: the overlap lengths are piecewise linear, so a block-wise split gives the same
    dask = pytest.importorskip("dask.array")
    split = _integrate_density(dask.from_array(values, chunks=(2, 5, 7)), units, px_area_um2=1.0)[0]
    np.testing.assert_allclose(split, out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("radius", [3.0, 13.75, 25.0])
def test_circle_area_error(radius):
    values = np.ones((1, 64, 64))
    units = _Units("circle", a=np.array([31.3]), b=np.array([32.1]), c=np.array([radius]))
    area = _integrate_density(values, units, px_area_um2=1.0)[0, 0]
    # supersampling 16 × 16 crossing pixels: the documented bound
    assert abs(area - np.pi * radius**2) < 0.06 + 0.004 * radius


def test_lazy_equals_eager():
    kw = {"shape_um": (300.0, 260.0), "um_per_px": 1.0, "n_genes": 7, "layout": "visium_hd", "seed": 4}
    eager = st.datasets.synthetic(**kw, lazy=False)
    lazy = st.datasets.synthetic(**kw, lazy=True, chunk_px=64)
    assert lazy.images["truth"].data.chunksize == (7, 32, 32)
    np.testing.assert_array_equal(_he(eager), _he(lazy))
    np.testing.assert_array_equal(eager.images["truth"].values, lazy.images["truth"].values)
    te, tl = eager.tables["table"], lazy.tables["table"]
    np.testing.assert_array_equal(te.obs["instance_id"].values, tl.obs["instance_id"].values)
    np.testing.assert_allclose(te.layers["expected"], tl.layers["expected"], rtol=1e-5, atol=1e-8)
    np.testing.assert_array_equal(te.X.toarray(), tl.X.toarray())


def test_crop_is_consistent():
    """Pixels depend on global coordinates only: a window rendered alone equals the same window of the whole."""
    sec = _make_section(seed=9, tissue_seed=9, um_per_px=1.0, truth_um_per_px=2.0, stride=2, ny=400, nx=400,
                        n_genes=4,
                        n_cell_types=5, mean_counts_per_um2=0.1)  # fmt: skip
    whole = _render_image(sec, 0, 0, 400, 400)
    np.testing.assert_array_equal(_render_image(sec, 123, 77, 91, 150), whole[:, 123:214, 77:227])
    truth = _render_truth_window(sec, 0, 0, 200, 200)
    np.testing.assert_array_equal(_render_truth_window(sec, 61, 38, 45, 75), truth[:, 61:106, 38:113])


@pytest.mark.parametrize(
    ("layout", "bin_size_um", "key"),
    [("st", None, "spots"), ("visium", None, "spots"), ("visium_hd", None, "bins"), ("visium_hd", 5.5, "bins")],
)
def test_layouts(layout, bin_size_um, key):
    sd = st.datasets.synthetic(**SMALL, layout=layout, bin_size_um=bin_size_um)
    t = sd.tables["table"]
    assert key in sd.shapes
    assert len(sd.shapes[key]) == t.n_obs > 0
    assert (t.obs["region"] == key).all()
    assert (t.obs["tissue_fraction"] >= 0.5).all()
    x, y = t.obsm["spatial"].T
    assert (x > 0).all()
    assert (x < 600).all()
    assert (y > 0).all()
    assert (y < 500).all()
    if layout == "visium_hd":
        side = bin_size_um or 8.0
        b = sd.shapes[key].geometry.bounds
        np.testing.assert_allclose(b["maxx"] - b["minx"], side)
        np.testing.assert_allclose(np.mod(b["minx"].to_numpy() / side + 1e-9, 1.0), 0.0, atol=1e-6)
        np.testing.assert_allclose(sd.shapes[key].geometry.area, side * side)
        assert t.obs["array_row"].max() <= 500 / side
    elif layout == "st":
        np.testing.assert_allclose(sd.shapes[key]["radius"], 50.0)
        spacing = np.diff(np.unique(x))
        np.testing.assert_allclose(spacing[spacing > 1], 200.0)


def test_cells_layout():
    sd = st.datasets.synthetic(**SMALL, layout="cells")
    labels = sd.labels["cells"].values
    assert labels.dtype == np.uint32
    assert labels.shape == (500, 600)
    t = sd.tables["table"]
    ids = np.unique(labels)
    np.testing.assert_array_equal(np.sort(t.obs["instance_id"].values), ids[ids > 0])
    assert t.uns["spatialdata_attrs"]["region"] == "cells"
    # obsm['spatial'] lies inside the cell's own territory
    cx, cy = t.obsm["spatial"].T
    own = labels[np.floor(cy).astype(int), np.floor(cx).astype(int)]
    assert np.mean(own == t.obs["instance_id"].values) > 0.9
    # cells are mostly of one type
    assert np.median(t.obsm["cell_type_fractions"].max(axis=1)) > 0.6
    # expected counts: density × area over the label pixels, checked on one cell
    truth = sd.images["truth"].values.astype(np.float64)
    i = int(np.argmax(t.layers["expected"].sum(axis=1)))
    mask = labels == t.obs["instance_id"].values[i]
    yy, xx = np.nonzero(mask)
    ref = truth[:, yy // 2, xx // 2].sum(axis=1) * 1.0
    np.testing.assert_allclose(t.layers["expected"][i], ref, rtol=1e-4)


def test_no_layout_and_nb_counts():
    sd = st.datasets.synthetic(**SMALL, layout=None)
    assert len(sd.tables) == 0
    assert set(sd.images) == {"he", "truth"}
    kw = {"shape_um": (1200.0, 1200.0), "um_per_px": 2.0, "n_genes": 10, "layout": "visium", "seed": 5}
    nb = st.datasets.synthetic(**kw, counts="nb", dispersion=0.5).tables["table"]
    x, mu = nb.X.toarray(), nb.layers["expected"]
    big = mu > 5
    # variance μ + 0.5 μ² is far above Poisson
    assert np.mean((x[big] - mu[big]) ** 2 / mu[big]) > 2.0


def test_more_cell_types_and_no_morph_genes():
    sd = st.datasets.synthetic(shape_um=(600.0, 600.0), um_per_px=1.0, n_genes=3, n_cell_types=7, layout="st")
    t = sd.tables["table"]
    assert t.obsm["cell_type_fractions"].shape[1] == 7
    assert len(t.uns["stpredict"]["synthetic"]["cell_types"]) == 7
    assert t.var["morphology_driven"].all()  # fewer than five genes: all follow the cells


@pytest.mark.parametrize(
    "kwargs",
    [
        {"truth_um_per_px": 1.3},
        {"layout": "spots"},
        {"bin_size_um": 8.0, "layout": "visium"},
        {"um_per_px": -1.0},
        {"n_genes": 0},
        {"counts": "zip"},
        {"layout": "cells", "lazy": True},
        {"shape_um": (60.0, 60.0), "layout": "st"},
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(InputError):
        st.datasets.synthetic(**{"shape_um": (200.0, 200.0), **kwargs})


def test_import_does_not_import_torch():
    code = "import sys, stpredict.datasets; stpredict.datasets.synthetic; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_auto_threshold(monkeypatch):
    monkeypatch.setattr(S, "_LAZY_THRESHOLD_PX", 10_000)
    sd = st.datasets.synthetic(shape_um=(200.0, 200.0), um_per_px=1.0, n_genes=3, layout=None, chunk_px=64)
    assert sd.images["truth"].data.numblocks == (1, 4, 4)
    assert sd.images["he"]["scale0"]["image"].data.numblocks == (1, 4, 4)
    assert sd.attrs["stpredict"]["elements"]["truth"]["value_kind"] == "density"


def test_zarr_round_trip(tmp_path):
    import spatialdata

    sd = st.datasets.synthetic(shape_um=(200.0, 200.0), um_per_px=1.0, n_genes=3, layout="visium_hd")
    sd.write(tmp_path / "s.zarr")
    back = spatialdata.read_zarr(tmp_path / "s.zarr")
    assert um_per_px(back, "truth") == pytest.approx(2.0)
    assert get_element_meta(back, "truth")["value_kind"] == "density"
    np.testing.assert_array_equal(back.images["truth"].values, sd.images["truth"].values)
    np.testing.assert_array_equal(back.tables["table"].X.toarray(), sd.tables["table"].X.toarray())
    assert back.tables["table"].uns["stpredict"]["synthetic"]["layout"] == "visium_hd"


def test_sections_of_one_tissue_share_the_gene_programme():
    a = st.datasets.synthetic(shape_um=(300.0, 300.0), n_genes=10, seed=0)
    b = st.datasets.synthetic(shape_um=(300.0, 300.0), n_genes=10, seed=1)
    c = st.datasets.synthetic(shape_um=(300.0, 300.0), n_genes=10, seed=1, tissue_seed=7)
    ta, tb, tc = (s.tables["table"] for s in (a, b, c))
    np.testing.assert_array_equal(ta.varm["cell_type_profiles"], tb.varm["cell_type_profiles"])
    np.testing.assert_array_equal(ta.var["morphology_driven"], tb.var["morphology_driven"])
    assert not np.array_equal(ta.varm["cell_type_profiles"], tc.varm["cell_type_profiles"])
    assert not np.array_equal(a.images["he"]["scale0"]["image"].values, b.images["he"]["scale0"]["image"].values)
