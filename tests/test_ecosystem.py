"""stpredict's outputs in squidpy, scanpy and spatialdata-plot, with no glue code, checked against known truth.

One synthetic section (known expression density) is predicted by a tiny colour model through
``st.tl.predict_dense`` and aggregated with ``st.tl.aggregate``; the predicted, ground-truth and measured tables
then go straight into squidpy and scanpy.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import ndimage, sparse, stats

import stpredict as st
from stpredict._elements import quiet_zarr_writes

BIN_UM = 16.0
STRIDE = 2  # model pixels (1 µm) per map pixel: the map is at the truth's 2 µm per pixel
N_GENES = 20


def _features(rgb: np.ndarray) -> np.ndarray:
    """Blurred optical density of each channel, its squares and two products, at the map's resolution; + 1."""
    od = -np.log((rgb.astype(np.float64) + 1) / 256)
    od = np.stack([ndimage.gaussian_filter(c, 3.0) for c in od])
    c, h, w = od.shape
    od = od.reshape(c, h // STRIDE, STRIDE, w // STRIDE, STRIDE).mean(axis=(2, 4))
    return np.concatenate([od, od**2, od[[0]] * od[[1]], od[[1]] * od[[2]], np.ones_like(od[:1])])


class ColourRidge:
    """A dense model in :class:`stpredict.models.DenseModel`'s protocol: least squares from colour to density."""

    name = "colour"
    value_kind = "density"
    um_per_px = 1.0
    output_stride = STRIDE
    tile_size = 64
    context = 12

    def __init__(self, sdata) -> None:
        rgb = np.asarray(sdata.images["he"]["scale0"]["image"].values)
        truth = sdata.images["truth"]
        features = _features(rgb)
        x = features.reshape(features.shape[0], -1).T
        y = np.asarray(truth.values).reshape(truth.shape[0], -1).T
        self.coef = np.linalg.solve(x.T @ x + 1e-6 * np.eye(x.shape[1]), x.T @ y)
        self.var_names = [str(g) for g in truth.c.values]

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"coef": self.coef}

    def predict_tiles(self, tiles: np.ndarray, *, device: str = "auto") -> np.ndarray:
        out = np.stack([np.einsum("fg,fyx->gyx", self.coef, _features(t)) for t in tiles])
        return np.clip(out, 0, None).astype(np.float32)


def _section(seed: int, shape_um: float):
    return st.datasets.synthetic(
        shape_um=(shape_um, shape_um), um_per_px=1.0, n_genes=N_GENES, layout="visium_hd", bin_size_um=BIN_UM, seed=seed
    )


@pytest.fixture(scope="module")
def sdata():
    """A 640 µm section with ``images["pred"]`` from a colour model and four tables.

    ``table`` (measured Poisson counts of 16 µm bins), ``pred_bins`` and ``truth_bins`` (the predicted and true
    maps summed over the same bins), and ``pred_16um`` (the predicted map on a full 16 µm grid, bins in µm). The
    model is fitted on the section it predicts: these tests are about the tables, not about the model.
    """
    sdata = _section(seed=0, shape_um=640.0)
    st.tl.predict_dense(sdata, ColourRidge(sdata), key_added="pred", tissue_only=False, show_progress_bar=False)
    for key in ("pred", "truth"):
        st.tl.aggregate(sdata, key, shapes_key="bins", key_added=f"{key}_bins", show_progress_bar=False)
    st.tl.aggregate(sdata, "pred", bin_size=BIN_UM, tissue_key=False, show_progress_bar=False)
    return sdata


def _aligned(sdata, key: str):
    """A copy of table ``key`` in the measured table's unit order (matched by instance id)."""
    measured = sdata.tables["table"]
    table = sdata.tables[key]
    order = {i: n for n, i in enumerate(table.obs["instance_id"])}
    return table[[order[i] for i in measured.obs["instance_id"]]].copy()


def _dense(x) -> np.ndarray:
    return x.toarray() if sparse.issparse(x) else np.asarray(x)


# --------------------------------------------------------------------------------------------------- squidpy
def test_tables_carry_what_squidpy_and_scanpy_read(sdata):
    for key in ("pred_bins", "truth_bins", "pred_16um"):
        table = sdata.tables[key]
        assert table.obsm["spatial"].shape == (table.n_obs, 2)
        assert list(table.var_names) == sdata.tables["table"].var_names.tolist()
        attrs = table.uns["spatialdata_attrs"]
        assert attrs["region"] in sdata.shapes
    grid = sdata.tables["pred_16um"]
    # bins of a grid are placed in µm: centre of (row, col) at ((col + ½) · 16, (row + ½) · 16)
    expected = (np.stack([grid.obs["array_col"], grid.obs["array_row"]], axis=1) + 0.5) * BIN_UM
    np.testing.assert_allclose(grid.obsm["spatial"], expected)
    assert grid.uns["stpredict"]["spatial_space"] == "um"


def test_spatial_neighbors_grid_and_generic_give_the_bin_lattice(sdata):
    import squidpy as sq

    table = sdata.tables["pred_16um"].copy()
    rows, cols = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    lattice = (np.abs(rows[:, None] - rows[None]) + np.abs(cols[:, None] - cols[None])) == 1
    assert table.n_obs == (640 / BIN_UM) ** 2

    sq.gr.spatial_neighbors_grid(table, n_neighs=4)
    np.testing.assert_array_equal(_dense(table.obsp["spatial_connectivities"]) != 0, lattice)

    generic = sdata.tables["pred_16um"].copy()
    sq.gr.spatial_neighbors_radius(generic, radius=1.01 * BIN_UM)  # generic coordinates, in µm
    np.testing.assert_array_equal(_dense(generic.obsp["spatial_connectivities"]) != 0, lattice)
    np.testing.assert_allclose(generic.obsp["spatial_distances"].data, BIN_UM)

    knn = sdata.tables["pred_16um"].copy()
    sq.gr.spatial_neighbors_knn(knn, n_neighs=4)
    interior = (rows > 0) & (rows < rows.max()) & (cols > 0) & (cols < cols.max())
    connected = _dense(knn.obsp["spatial_connectivities"]) != 0
    np.testing.assert_array_equal(connected[interior], lattice[interior])


def test_spatial_neighbors_on_the_spatialdata_itself(sdata):
    """Squidpy reads the bins' shapes in the ``"um"`` coordinate system: the same lattice, 16 µm apart."""
    import squidpy as sq

    copy = st.tl.aggregate(sdata, "pred", bin_size=BIN_UM, tissue_key=False, inplace=False, show_progress_bar=False)
    result = sq.gr.spatial_neighbors_radius(
        sdata, table_key="pred_16um", radius=1.01 * BIN_UM, elements_to_coordinate_systems={"pred_16um_bins": "um"},
        copy=True,
    )  # fmt: skip
    sq.gr.spatial_neighbors_radius(copy, radius=1.01 * BIN_UM)  # the table alone, from its obsm["spatial"] (µm)
    assert (result.connectivities != copy.obsp["spatial_connectivities"]).nnz == 0
    np.testing.assert_allclose(result.distances.data, BIN_UM)
    assert "spatial_connectivities" not in sdata.tables["pred_16um"].obsp  # copy=True wrote nothing


def _morans_i(table, genes: list[str]) -> np.ndarray:
    import squidpy as sq

    sq.gr.spatial_neighbors_grid(table, n_neighs=4)
    sq.gr.spatial_autocorr(table, mode="moran", genes=genes, n_perms=None)
    return table.uns["moranI"]["I"].reindex(genes).to_numpy()


def _brute_morans_i(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """I = n / ΣW · zᵀWz / zᵀz per column, z the centred values."""
    z = x - x.mean(axis=0)
    return len(x) / w.sum() * np.einsum("ig,ij,jg->g", z, w, z) / (z**2).sum(axis=0)


def test_morans_i_of_predicted_truth_and_measured_tables(sdata):
    measured = sdata.tables["table"].copy()
    truth, pred = _aligned(sdata, "truth_bins"), _aligned(sdata, "pred_bins")
    genes = measured.var_names.tolist()
    i_meas, i_truth, i_pred = (_morans_i(t, genes) for t in (measured, truth, pred))

    # squidpy's number is Moran's I on this graph (row-normalised weights, as squidpy uses them)
    w = _dense(truth.obsp["spatial_connectivities"]).astype(np.float64)
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(i_truth, _brute_morans_i(_dense(truth.X).astype(np.float64), w), rtol=1e-5)
    # the truth summed over the bins is the expected count that the measured counts were drawn from
    np.testing.assert_allclose(_dense(truth.X), _dense(measured.layers["expected"]), rtol=1e-4, atol=1e-4)

    # Poisson noise only lowers spatial autocorrelation; the smooth (gradient-only) genes keep I > 0.9 in truth
    assert (i_truth >= i_meas).all()
    smooth = ~measured.var["morphology_driven"].to_numpy()
    assert smooth.sum() >= 3
    assert (i_truth[smooth] > 0.9).all()
    assert (i_truth[smooth] - i_meas[smooth]).min() > 0.15
    # The predicted table's Moran's I is close to the truth's, the measured one's is not (0.12 against 0.30 here;
    # at most 0.17 against at least 0.27 over five seeds). Genes are ranked alike (Spearman 0.78 here, 0.39-0.79
    # over seeds: the 16 morphology-driven genes have nearly equal I, 0.33-0.53, so their ranks are noisy).
    assert np.abs(i_pred - i_truth).mean() < 0.15 < 0.25 < np.abs(i_meas - i_truth).mean()
    assert stats.spearmanr(i_pred, i_truth).statistic > 0.6


def test_leiden_clusters_of_a_predicted_table_are_spatially_enriched(sdata):
    import scanpy as sc
    import squidpy as sq

    table = _aligned(sdata, "pred_bins")  # the tissue's bins
    sc.pp.normalize_total(table, target_sum=1e3)
    sc.pp.log1p(table)
    sc.pp.pca(table, n_comps=10, random_state=0)
    # exact neighbours and Gaussian weights: umap's connectivities would import and compile umap (~20 s)
    sc.pp.neighbors(table, n_neighbors=15, transformer="sklearn", method="gauss", random_state=0)
    sc.tl.leiden(table, resolution=0.3, flavor="igraph", n_iterations=2, random_state=0)
    n_clusters = table.obs["leiden"].nunique()
    assert 2 <= n_clusters <= 15

    sq.gr.spatial_neighbors_grid(table, n_neighs=4)
    sq.gr.nhood_enrichment(table, cluster_key="leiden", n_perms=50, seed=0, show_progress_bar=False)
    result = table.uns["leiden_nhood_enrichment"]
    count, zscore = result["count"], result["zscore"]
    assert count.shape == zscore.shape == (n_clusters, n_clusters)
    # counts are the graph's edges by cluster pair
    codes = table.obs["leiden"].cat.codes.to_numpy()
    edges = sparse.coo_matrix(table.obsp["spatial_connectivities"])
    expected = np.zeros((n_clusters, n_clusters))
    np.add.at(expected, (codes[edges.row], codes[edges.col]), 1)
    np.testing.assert_array_equal(count, expected)
    # clusters of a smooth map are spatial domains: every cluster neighbours itself more than chance
    assert (np.diag(zscore) > 2).all()
    assert np.diag(zscore).mean() > zscore[~np.eye(n_clusters, dtype=bool)].mean()


# ---------------------------------------------------------------------------------------------------- plots
def test_scanpy_pl_spatial_draws_the_table_at_its_coordinates(sdata):
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    table = sdata.tables["pred_16um"]
    gene = table.var_names[6]
    with pytest.warns(FutureWarning, match="squidpy.pl.spatial_scatter"):  # deprecated in scanpy 1.11
        axes = sc.pl.spatial(table, color=gene, spot_size=BIN_UM, sort_order=False, show=False)  # no image
    try:
        (collection,) = axes[0].collections  # one circle per bin, 16 µm across, at the bin's centre
        boxes = np.array([[*p.vertices.min(axis=0), *p.vertices.max(axis=0)] for p in collection.get_paths()])
        np.testing.assert_allclose((boxes[:, :2] + boxes[:, 2:]) / 2, table.obsm["spatial"], atol=1e-6)
        np.testing.assert_allclose(boxes[:, 2:] - boxes[:, :2], BIN_UM, atol=1e-6)
        np.testing.assert_allclose(collection.get_array(), _dense(table[:, gene].X).ravel(), rtol=1e-6)
        bottom, top = axes[0].get_ylim()
        assert bottom > top  # y down, as in the image
        fig = axes[0].figure
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50  # a colour gradient, not a blank frame
    finally:
        plt.close("all")


def test_squidpy_spatial_scatter_draws_the_table_at_its_coordinates(sdata):
    """``squidpy.pl.spatial_scatter``, scanpy's recommended replacement, also needs no ``uns["spatial"]``."""
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import squidpy as sq

    table = sdata.tables["pred_16um"]
    gene = table.var_names[6]
    try:
        sq.pl.spatial_scatter(table, color=gene, shape=None, size=BIN_UM)
        ax = plt.gcf().axes[0]
        points = next(c for c in ax.collections if len(c.get_offsets()) == table.n_obs)
        drawn = np.column_stack([np.asarray(points.get_offsets()), np.asarray(points.get_array())])
        expected = np.column_stack([table.obsm["spatial"], _dense(table[:, gene].X).ravel()])
        order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731  (the points may be drawn in another order)
        np.testing.assert_allclose(order(drawn), order(expected), rtol=1e-6)
    finally:
        plt.close("all")


def test_spatialdata_plot_renders_the_dense_map(sdata):
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
    import spatialdata_plot  # noqa: F401  (registers the .pl accessor)
    from spatialdata import get_pyramid_levels

    gene = sdata.tables["table"].var_names[6]
    try:
        sdata.pl.render_images("pred", channel=gene).pl.show()  # one panel per coordinate system
        fig = plt.gcf()
        assert sorted(ax.get_title() for ax in fig.axes if ax.get_title()) == ["global", "um"]
        plt.close("all")

        fig, ax = plt.subplots(figsize=(4, 4), dpi=50)
        sdata.pl.render_images("pred", channel=gene).pl.show(ax=ax, coordinate_systems="um")
        (image,) = ax.get_images()
        rendered = np.ma.filled(image.get_array(), np.nan).astype(np.float64)
        # the map, 640 µm across, resampled to the axes' 200 × 200 pixels, and placed at its µm coordinates
        assert rendered.shape == (200, 200)
        assert ax.get_xlim() == (0.0, 640.0)
        assert ax.get_ylim() == (640.0, 0.0)
        values = get_pyramid_levels(sdata.images["pred"], n=0).sel(c=gene).values
        expected = ndimage.zoom(values.astype(np.float64), 200 / values.shape[0], order=1)
        assert np.corrcoef(rendered.ravel(), expected.ravel())[0, 1] > 0.98
        fig.canvas.draw()
        pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3].reshape(-1, 3)
        assert len(np.unique(pixels, axis=0)) > 50
    finally:
        plt.close("all")


# ---------------------------------------------------------------------------------------------------- writes
AUTOSHARD = "zarr v3 autosharding"


def _autoshard_warnings(record) -> list:
    return [w for w in record if AUTOSHARD in str(w.message)]


def test_quiet_zarr_writes_silences_only_the_autoshard_warning(tmp_path):
    import anndata as ad

    small = _section(seed=2, shape_um=64.0)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with quiet_zarr_writes():
            small.write(tmp_path / "quiet.zarr")
            warnings.warn("a warning of the user's own", UserWarning, stacklevel=1)
    assert not _autoshard_warnings(record)
    assert any("of the user's own" in str(w.message) for w in record)
    if ad.settings.auto_shard_zarr_v3 is None:  # anndata warns only while the setting is unset
        with pytest.warns(UserWarning, match=AUTOSHARD):
            small.write(tmp_path / "loud.zarr")
    with warnings.catch_warnings(record=True) as record:  # the filter is gone after the block
        warnings.simplefilter("always")
        warnings.warn("zarr v3 autosharding will be the default (test)", UserWarning, stacklevel=1)
    assert _autoshard_warnings(record)


def test_predict_dense_into_a_backed_store_warns_nothing_about_zarr(tmp_path, sdata):
    from spatialdata import read_zarr

    small = _section(seed=2, shape_um=64.0)
    with quiet_zarr_writes():
        small.write(tmp_path / "s.zarr")
    backed = read_zarr(tmp_path / "s.zarr")
    model = ColourRidge(small)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        st.tl.predict_dense(backed, model, key_added="pred", tissue_only=False, show_progress_bar=False)
    assert not _autoshard_warnings(record)
    assert "pred" in read_zarr(tmp_path / "s.zarr").images


def test_cli_aggregate_writes_its_table_without_autoshard_warnings(tmp_path):
    from stpredict.cli import main

    small = _section(seed=2, shape_um=64.0)
    with quiet_zarr_writes():
        small.write(tmp_path / "s.zarr")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert main(["aggregate", str(tmp_path / "s.zarr"), "--map", "truth", "--bin-size", "16", "-q"]) == 0
    assert not _autoshard_warnings(record)
