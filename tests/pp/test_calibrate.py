from __future__ import annotations

import sys
import types

import anndata as ad
import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from shapely.geometry import Point
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, ShapesModel, TableModel
from spatialdata.transformations import Identity, Scale, get_transformation, set_transformation

import stpredict as st
from stpredict._geometry import affine_between, um_per_px
from stpredict.errors import CalibrationError, CoordinateSystemError, InputError
from stpredict.pp._calibrate import check_same_coordinate_system, check_units_inside_image, unit_centers


def make_sdata(*, spot_scale: float = 0.5, xy: np.ndarray | None = None) -> SpatialData:
    """A 100 × 120 px image; spots stored in a 2× finer pixel space (e.g. full-res coordinates on a render)."""
    rng = np.random.default_rng(0)
    image = Image2DModel.parse(
        rng.integers(0, 255, (3, 100, 120), dtype=np.uint8), dims=("c", "y", "x"), c_coords=["r", "g", "b"]
    )
    if xy is None:
        xy = np.array([[20.0, 20.0], [100.0, 60.0], [200.0, 180.0], [230.0, 10.0]])
    circles = gpd.GeoDataFrame(geometry=[Point(x, y) for x, y in xy], index=np.arange(len(xy)))
    circles["radius"] = 5.0
    spots = ShapesModel.parse(circles, transformations={"global": Scale([spot_scale, spot_scale], axes=("x", "y"))})
    adata = ad.AnnData(
        sparse.csr_matrix(rng.poisson(2, (len(xy), 5)).astype(np.float32)),
        obs=pd.DataFrame(
            {"region": pd.Categorical(["spots"] * len(xy)), "instance_id": np.arange(len(xy))},
            index=[str(i) for i in range(len(xy))],
        ),
        var=pd.DataFrame(index=[f"g{i}" for i in range(5)]),
    )
    adata.obsm["spatial"] = xy.copy()
    table = TableModel.parse(adata, region="spots", region_key="region", instance_key="instance_id")
    return SpatialData(images={"he": image}, shapes={"spots": spots}, tables={"table": table})


def test_explicit_value_sets_um_on_image_and_spots():
    sdata = make_sdata()
    assert st.pp.calibrate(sdata, "he", um_per_px=2.0) == 2.0
    assert um_per_px(sdata, "he") == pytest.approx(2.0)
    # spots live in a 2x finer pixel space, so one spot unit is 1 µm
    assert um_per_px(sdata, "spots") == pytest.approx(1.0)
    assert "um" in get_transformation(sdata.images["he"], get_all=True)


def test_existing_calibration_is_kept_and_explicit_value_overwrites(caplog):
    sdata = make_sdata()
    st.pp.calibrate(sdata, "he", um_per_px=2.0)
    assert st.pp.calibrate(sdata, "he") == pytest.approx(2.0)
    with caplog.at_level("WARNING", logger="stpredict"):
        assert st.pp.calibrate(sdata, "he", um_per_px=0.5) == 0.5
    assert "overwriting" in caplog.text
    assert um_per_px(sdata, "he") == pytest.approx(0.5)
    assert um_per_px(sdata, "spots") == pytest.approx(0.25)


def test_inplace_false_does_not_write():
    sdata = make_sdata()
    assert st.pp.calibrate(sdata, "he", um_per_px=3.0, inplace=False) == 3.0
    assert "um" not in get_transformation(sdata.images["he"], get_all=True)


def test_missing_scale_raises_naming_calibrate():
    sdata = make_sdata()
    with pytest.raises(CalibrationError, match=r"st\.pp\.calibrate\(sdata, 'he', um_per_px=\.\.\.\)"):
        st.pp.calibrate(sdata, "he")
    assert "um" not in get_transformation(sdata.images["he"], get_all=True)


def test_inference_uses_reader_metadata(monkeypatch):
    calls = []

    def infer_um_per_px(sdata, image_key):
        calls.append(image_key)
        return 0.75

    module = types.ModuleType("stpredict.io._metadata")
    module.infer_um_per_px = infer_um_per_px
    monkeypatch.setitem(sys.modules, "stpredict.io._metadata", module)
    sdata = make_sdata()
    assert st.pp.calibrate(sdata, "he") == 0.75
    assert calls == ["he"]
    assert um_per_px(sdata, "he") == pytest.approx(0.75)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_value(value):
    sdata = make_sdata()
    with pytest.raises(InputError, match="positive finite"):
        st.pp.calibrate(sdata, "he", um_per_px=value)


def test_unknown_image():
    with pytest.raises(KeyError, match="available images"):
        st.pp.calibrate(make_sdata(), "hires", um_per_px=1.0)


def test_same_coordinate_system_gives_affine():
    sdata = make_sdata()
    affines = check_same_coordinate_system(sdata, "he", "table")
    np.testing.assert_allclose(affines["spots"], np.diag([0.5, 0.5, 1.0]))
    np.testing.assert_allclose(affines["spots"], affine_between(sdata, "spots", "he"))


def test_different_coordinate_systems_raise_and_leave_data_unchanged():
    sdata = make_sdata()
    set_transformation(sdata.shapes["spots"], {"aligned": Identity()}, set_all=True)
    with pytest.raises(CoordinateSystemError, match="annotates 'spots'.*share no coordinate system"):
        check_same_coordinate_system(sdata, "he", "table")
    with pytest.raises(CoordinateSystemError):
        st.pp.calibrate(sdata, "he", um_per_px=1.0, table_key="table")
    assert "um" not in get_transformation(sdata.images["he"], get_all=True)


def test_units_outside_image():
    sdata = make_sdata()
    assert check_units_inside_image(sdata, "he", "table") == 0
    # the same spot coordinates without the 0.5 scale: two of four land beyond the 120 x 100 px image
    bad = make_sdata(spot_scale=1.0)
    with pytest.raises(InputError, match="2 of 4 units .* lie outside image 'he'"):
        check_units_inside_image(bad, "he", "table")
    assert check_units_inside_image(bad, "he", "table", max_fraction_outside=0.5) == 2
    with pytest.raises(InputError, match="outside"):
        st.pp.calibrate(bad, "he", um_per_px=1.0, table_key="table")
    assert "um" not in get_transformation(bad.images["he"], get_all=True)


def test_unit_centers_from_shapes_when_no_obsm():
    sdata = make_sdata()
    expected = np.asarray(sdata.tables["table"].obsm["spatial"])
    del sdata.tables["table"].obsm["spatial"]
    np.testing.assert_allclose(unit_centers(sdata, "table", "spots"), expected)
    assert check_units_inside_image(sdata, "he", "table") == 0


def test_table_without_region():
    sdata = make_sdata()
    sdata.tables["table"].uns["spatialdata_attrs"]["region"] = None
    with pytest.raises(InputError, match="annotates no element"):
        check_same_coordinate_system(sdata, "he", "table")


def test_inference_from_ome_attrs_with_real_metadata_reader():
    sdata = make_sdata()
    sdata.images["he"].attrs["ome"] = {"Image": {"Pixels": {"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}}}
    assert st.pp.calibrate(sdata, "he") == pytest.approx(0.5)
    assert um_per_px(sdata, "he") == pytest.approx(0.5)
    assert um_per_px(sdata, "spots") == pytest.approx(0.25)
