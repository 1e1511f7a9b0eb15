from __future__ import annotations

import anndata as ad
import geopandas as gpd
import numpy as np
import pytest
import spatialdata as sd
from matplotlib.collections import EllipseCollection, PolyCollection
from matplotlib.figure import Figure
from shapely.geometry import Point
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel
from spatialdata.transformations import Scale

import stpredict as st
from stpredict._geometry import set_um_per_px
from stpredict.errors import InputError

DPI = 50
TOL = 15  # RMS, STYLE.md: 15-25 at most


def _panels(fig):
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


@pytest.fixture
def sdata():
    """A 64 × 64 µm H&E (1 µm/px), truth and predicted maps (2 genes, 2 µm/px), spots, cells, tables at 16 µm."""
    rng = np.random.default_rng(0)
    he = Image2DModel.parse(rng.integers(0, 255, (3, 64, 64), dtype=np.uint8), dims=("c", "y", "x"))
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    truth = np.stack([xx, yy])  # g0 grows along x, g1 along y
    pred = truth + rng.normal(scale=3.0, size=truth.shape).astype(np.float32)
    stride = {"global": Scale([2.0, 2.0], axes=("x", "y"))}
    maps = {
        k: Image2DModel.parse(v, dims=("c", "y", "x"), c_coords=["g0", "g1"], transformations=stride)
        for k, v in (("truth", truth), ("he_pixnet", pred))
    }
    spots = ShapesModel.parse(
        gpd.GeoDataFrame(
            {"radius": [8.0, 8.0, 8.0, 4.0]},
            geometry=[Point(16, 16), Point(48, 16), Point(16, 48), Point(48, 48)],
            index=[10, 11, 12, 13],
        )
    )
    cells = np.zeros((64, 64), dtype=np.int32)
    cells[:32, :32], cells[:32, 32:], cells[32:, :32] = 1, 2, 3  # label 0 (background) in the last quadrant
    s = sd.SpatialData(
        images={"he": he, **maps},
        shapes={"spots": spots},
        labels={"cells": Labels2DModel.parse(cells, dims=("y", "x"))},
    )
    set_um_per_px(s, "he", 1.0)
    for key in ("truth", "he_pixnet"):
        st.tl.aggregate(s, key, bin_size=16, reduce="mean", tissue_key=False)
    st.tl.aggregate(s, "he_pixnet", shapes_key="spots", reduce="mean")
    st.tl.aggregate(s, "he_pixnet", labels_key="cells", reduce="mean")
    return s


def test_compare_grid_tables_on_one_scale_per_gene(sdata):
    tables = ["truth_16um", "he_pixnet_16um", "he_pixnet_spots"]
    fig = st.pl.compare(sdata, ["g0", "g1"], tables=tables, dpi=DPI, show=False)
    assert isinstance(fig, Figure)
    panels = _panels(fig)
    assert len(panels) == 6
    assert len(fig.axes) == 6 + 2  # one colorbar per gene (row)
    assert [ax.get_title() for ax in panels] == tables * 2
    assert [panels[0].get_ylabel(), panels[3].get_ylabel()] == ["g0", "g1"]
    for row, gene in enumerate(["g0", "g1"]):
        values = np.concatenate([np.asarray(sdata.tables[k][:, gene].X).ravel() for k in tables])
        for ax in panels[3 * row : 3 * row + 3]:
            artist = ax.get_images()[0] if ax.get_images() else ax.collections[0]
            assert (artist.norm.vmin, artist.norm.vmax) == pytest.approx((values.min(), values.max()))
    # the bins as a raster in µm: row r, column c of the 4 × 4 grid holds bin (r, c)
    table = sdata.tables["he_pixnet_16um"]
    expected = np.full((4, 4), np.nan)
    expected[table.obs["array_row"], table.obs["array_col"]] = table[:, "g1"].X.ravel()
    im = panels[4].get_images()[0]
    np.testing.assert_allclose(im.get_array(), expected, rtol=1e-6)
    assert im.get_extent() == pytest.approx([0, 64, 64, 0])
    # spots: circles at their centres with their true diameters in µm
    (circles,) = [c for c in panels[2].collections if isinstance(c, EllipseCollection)]
    np.testing.assert_allclose(circles.get_offsets(), [[16, 16], [48, 16], [16, 48], [48, 48]])
    np.testing.assert_allclose(circles.get_widths(), [16, 16, 16, 8])
    np.testing.assert_allclose(circles.get_array(), sdata.tables["he_pixnet_spots"][:, "g0"].X.ravel())
    for ax in panels:  # one window for all: the union of the units
        assert ax.get_xlim() == pytest.approx((0, 64))
        assert ax.get_ylim() == pytest.approx((64, 0))
    fig.canvas.draw()


def test_compare_own_scales_titles_polygons_and_labels(sdata):
    poly = sdata.tables["he_pixnet_16um"].copy()
    del poly.uns["stpredict"]  # no grid record: drawn through the bins' polygons
    sdata.tables["poly"] = poly
    tables = {"measured": "truth_16um", "bins": "poly", "cells": "he_pixnet_cells"}
    fig = st.pl.compare(sdata, "g0", tables=tables, shared_scale=False, scale_bar=False, dpi=DPI, show=False)
    panels = _panels(fig)
    assert [ax.get_title() for ax in panels] == ["measured", "bins", "cells"]
    assert len(fig.axes) == 3 + 3  # a colorbar per panel
    assert panels[0].get_ylabel() == "g0: y (µm)"
    assert panels[1].get_xlabel() == "x (µm)"
    (polys,) = [c for c in panels[1].collections if isinstance(c, PolyCollection)]
    first = polys.get_paths()[0].vertices
    row, col = poly.obs["array_row"].iloc[0], poly.obs["array_col"].iloc[0]
    assert first[:, 0].min() == pytest.approx(16 * col)
    assert first[:, 1].max() == pytest.approx(16 * (row + 1))
    values = np.asarray(poly[:, "g0"].X).ravel()
    np.testing.assert_allclose(polys.get_array(), values)
    assert (polys.norm.vmin, polys.norm.vmax) == pytest.approx((values.min(), values.max()))
    im = panels[2].get_images()[0]  # labels filled with each cell's value, background empty
    cells = sdata.tables["he_pixnet_cells"]
    by_id = dict(zip(cells.obs["instance_id"], cells[:, "g0"].X.ravel(), strict=True))
    arr = np.ma.filled(im.get_array().astype(float), np.nan)
    assert arr[0, 0] == pytest.approx(by_id[1])
    assert arr[0, 63] == pytest.approx(by_id[2])
    assert np.isnan(arr[63, 63])
    assert im.get_extent() == pytest.approx([0, 64, 64, 0])


def test_compare_into_axes_and_layers(sdata):
    fig = Figure(dpi=DPI)
    grid = fig.subplots(2, 2)
    sdata.tables["truth_16um"].layers["double"] = sdata.tables["truth_16um"].X * 2
    sdata.tables["he_pixnet_16um"].layers["double"] = sdata.tables["he_pixnet_16um"].X * 2
    out = st.pl.compare(
        sdata, ["g0", "g1"], tables=["truth_16um", "he_pixnet_16um"], layer="double", ax=grid, show=False
    )
    assert out is fig
    expected = 2 * np.asarray(sdata.tables["truth_16um"][:, "g1"].X).ravel()
    assert np.nanmax(grid[1][0].get_images()[0].get_array()) == pytest.approx(expected.max())
    # a layer name reads that layer where a table has it, X elsewhere; or one layer per table
    fig = st.pl.compare(sdata, "g0", tables=["truth_16um", "he_pixnet_spots"], layer="double", dpi=DPI, show=False)
    drawn = _panels(fig)[1].collections[0].get_array()
    np.testing.assert_allclose(drawn, np.asarray(sdata.tables["he_pixnet_spots"][:, "g0"].X).ravel())
    fig = st.pl.compare(sdata, "g0", tables=["truth_16um"] * 2, layer=["double", None], dpi=DPI, show=False)
    first, second = (np.nanmax(ax.get_images()[0].get_array()) for ax in _panels(fig))
    assert first == pytest.approx(2 * second)
    with pytest.raises(KeyError, match="has no layer 'double'"):
        st.pl.compare(sdata, "g0", tables=["he_pixnet_spots"], layer=["double"], show=False)
    with pytest.raises(KeyError, match="No table in"):
        st.pl.compare(sdata, "g0", tables=["he_pixnet_spots"], layer="nope", show=False)
    with pytest.raises(InputError, match="one layer per table"):
        st.pl.compare(sdata, "g0", tables=["he_pixnet_spots"], layer=["a", "b"], show=False)
    with pytest.raises(InputError, match="Pass 4 axes"):
        st.pl.compare(sdata, ["g0", "g1"], tables=["truth_16um", "he_pixnet_16um"], ax=grid[0], show=False)


def test_compare_errors(sdata):
    with pytest.raises(KeyError, match="No table 'nope'"):
        st.pl.compare(sdata, "g0", tables=["nope"], show=False)
    with pytest.raises(KeyError, match=r"Genes \['zz'\] are not in table"):
        st.pl.compare(sdata, "zz", tables=["truth_16um"], show=False)
    with pytest.raises(InputError, match="one title per table"):
        st.pl.compare(sdata, "g0", tables=["truth_16um"], titles=["a", "b"], show=False)
    with pytest.raises(InputError, match="sequence of table keys"):
        st.pl.compare(sdata, "g0", tables="truth_16um", show=False)
    sdata.tables["loose"] = ad.AnnData(np.ones((2, 1), np.float32), var={"x": ["g0"]}).copy()
    sdata.tables["loose"].var_names = ["g0"]
    with pytest.raises(InputError, match="annotates no element"):
        st.pl.compare(sdata, "g0", tables=["loose"], show=False)
    orphan = sdata.tables["he_pixnet_spots"].copy()
    orphan.obs["instance_id"] = [10, 11, 12, 99]
    sdata.tables["orphan"] = orphan
    with pytest.raises(InputError, match="not in shapes 'spots'"):
        st.pl.compare(sdata, "g0", tables=["orphan"], show=False)


@pytest.mark.mpl_image_compare(baseline_dir="baseline", tolerance=TOL, style="default")
def test_image_compare(sdata):
    tables = {"truth": "truth_16um", "PixNet": "he_pixnet_16um", "PixNet, spots": "he_pixnet_spots"}
    return st.pl.compare(sdata, ["g0", "g1"], tables=tables, panel_size=2.0, dpi=DPI, show=False)
