"""pp.bin_counts: measured units summed into square bins that line up with tl.aggregate's bins."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import scipy.sparse as sp
import shapely
from anndata import AnnData
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Scale, Sequence, Translation

import stpredict as st
from stpredict._grid import ID_STRIDE
from stpredict._meta import set_element_meta
from stpredict.errors import InputError


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setattr(st.settings, "show_progress_bar", False)


def _hd_sdata(rng, n=24, genes=("a", "b", "c")):
    """2 µm units with corners at (1, 1) + 2k µm, their counts, and a density map on the same 2 µm lattice."""
    counts = rng.poisson(2.0, size=(n * n, len(genes))).astype(np.float32)
    xs, ys = np.meshgrid(np.arange(n) * 2.0 + 1, np.arange(n) * 2.0 + 1)
    # shapes in their own pixel space (0.5 µm per unit), like a reader's full-resolution pixels
    boxes = shapely.box(2 * xs.ravel(), 2 * ys.ravel(), 2 * xs.ravel() + 4, 2 * ys.ravel() + 4)
    shapes = ShapesModel.parse(
        gpd.GeoDataFrame(geometry=boxes), transformations={"um": Scale([0.5, 0.5], axes=("x", "y"))}
    )
    centres = np.c_[xs.ravel() + 1, ys.ravel() + 1] * 2  # intrinsic (0.5 µm) coordinates
    adata = AnnData(X=sp.csr_matrix(counts), obs={"region": ["hd_002um"] * n * n, "instance_id": np.arange(n * n)})
    adata.var_names = list(genes)
    adata.obsm["spatial"] = centres
    table = TableModel.parse(adata, region="hd_002um", region_key="region", instance_key="instance_id")
    density = counts.reshape(n, n, len(genes)).transpose(2, 0, 1) / 4.0  # counts per µm² over 2 × 2 µm pixels
    to_um = Sequence([Scale([2.0, 2.0], axes=("x", "y")), Translation([1.0, 1.0], axes=("x", "y"))])
    image = Image2DModel.parse(density, dims=("c", "y", "x"), c_coords=list(genes), transformations={"um": to_um})
    sdata = SpatialData(images={"truth": image}, shapes={"hd_002um": shapes}, tables={"table": table})
    set_element_meta(sdata, "truth", sdata.images["truth"], {"value_kind": "density"})
    return sdata, counts, centres / 2


def test_bin_sums_by_centre_and_matches_aggregate(rng):
    sdata, counts, centres_um = _hd_sdata(rng)
    st.pp.bin_counts(sdata, "table", bin_size=8, align_to="hd_002um")
    binned = sdata.tables["table_8um"]
    assert sp.issparse(binned.X)
    assert binned.X.dtype == np.float32
    # brute force: the grid through (1, 1) reduced into (-8, 0] is x0 = y0 = -7
    col = np.floor((centres_um[:, 0] + 7) / 8).astype(int)
    row = np.floor((centres_um[:, 1] + 7) / 8).astype(int)
    ids = row * ID_STRIDE + col
    for i, uid in enumerate(binned.obs["instance_id"]):
        np.testing.assert_array_equal(binned.X[i].toarray().ravel(), counts[ids == uid].sum(axis=0))
    assert binned.X.sum() == counts.sum()
    assert binned.obs["n_units"].sum() == len(counts)
    assert len(sdata.shapes["table_8um_bins"]) == len(binned)
    # the predicted table of a map on the same grid lines up unit for unit, with the same numbers
    pred = st.tl.aggregate(sdata, "truth", bin_size=8, align_to="hd_002um", inplace=False)
    assert list(pred.obs["instance_id"]) == list(binned.obs["instance_id"])
    np.testing.assert_array_equal(pred.obs["array_row"], binned.obs["array_row"])
    np.testing.assert_allclose(pred.X, binned.X.toarray(), rtol=1e-5)
    np.testing.assert_allclose(pred.obsm["spatial"], binned.obsm["spatial"])


def test_bin_non_multiple_size_and_errors(rng):
    sdata, counts, _ = _hd_sdata(rng, n=10)
    out = st.pp.bin_counts(sdata, "table", bin_size=5.5, inplace=False)
    assert out.X.sum() == counts.sum()
    assert "table_5p5um" not in sdata.tables
    with pytest.raises(InputError, match="positive"):
        st.pp.bin_counts(sdata, "table", bin_size=0)
    with pytest.raises(KeyError, match="available tables"):
        st.pp.bin_counts(sdata, "nope", bin_size=8)
    sdata.tables["table"].X = sdata.tables["table"].X * 0.5
    with pytest.raises(InputError):
        st.pp.bin_counts(sdata, "table", bin_size=8)
    assert set(sdata.tables) == {"table"}
