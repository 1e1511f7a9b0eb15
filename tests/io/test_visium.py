from __future__ import annotations

import json
import warnings

import anndata as ad
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel, ShapesModel, TableModel
from spatialdata.transformations import Scale, get_transformation, set_transformation

from stpredict._geometry import affine_between, scale_levels, um_per_px
from stpredict.errors import InputError
from stpredict.io import read_visium
from stpredict.io._metadata import VISIUM_SCALEFACTOR_SPOT_UM
from stpredict.io._spatialdata_io import adopt_image, rename_element


@pytest.fixture(scope="module")
def visium_dir(data_dir):
    return data_dir / "scanpy_visium_tiny" / "V1_Human_Heart_subset"


def _read(path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return read_visium(path, **kwargs)


def test_visium_fixture_calibrated_and_usable(visium_dir):
    sdata = _read(visium_dir)
    factors = json.loads((visium_dir / "spatial" / "scalefactors_json.json").read_text())
    # from the array's 100 µm pitch; Space Ranger's spot_diameter_fullres is a theoretical 65 µm spot
    expected = VISIUM_SCALEFACTOR_SPOT_UM / factors["spot_diameter_fullres"] / factors["tissue_lowres_scalef"]
    assert um_per_px(sdata, "he") == pytest.approx(expected, rel=0.01)
    assert scale_levels(sdata.images["he"])[0].shape == (3, 600, 600)
    assert scale_levels(sdata.images["he"])[0].dtype == np.uint8

    # spots: circles in full-resolution pixels, 55 µm across in µm
    circles = sdata.shapes["spots"]
    assert um_per_px(sdata, "spots") * 2 * circles["radius"].iloc[0] == pytest.approx(55.0, rel=1e-9)
    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs["region"] == "spots"
    assert set(table.obs[attrs["region_key"]]) == {"spots"}
    assert set(table.obs[attrs["instance_key"]]) == set(circles.index)
    assert table.obsm["spatial"].shape == (100, 2)
    assert table.X.dtype == np.float32
    # the spot centres fall on the low-res image, on tissue
    matrix = affine_between(sdata, "spots", "he")
    xy = table.obsm["spatial"] @ matrix[:2, :2].T + matrix[:2, 2]
    assert (xy >= 0).all()
    assert (xy < 600).all()
    image = scale_levels(sdata.images["he"])[0].values.astype(float).mean(axis=0)
    assert image[xy[:, 1].astype(int), xy[:, 0].astype(int)].mean() < image.mean()
    assert sdata.images["he"].attrs["stpredict"]["reader"] == "visium"


def test_visium_options(visium_dir):
    sdata = _read(visium_dir, um_per_px=10.0, image_key="img", shapes_key="visium_spots", table_key="counts")
    assert um_per_px(sdata, "img") == 10.0
    assert sdata.tables["counts"].uns["spatialdata_attrs"]["region"] == "visium_spots"
    with pytest.raises(
        InputError, match="spatial/tissue_hires_image.png: the image that image_resolution='hires' asks"
    ):
        _read(visium_dir, image_resolution="hires")


def _xenium_like(pixel_size=0.2125):
    he = Image2DModel.parse(np.zeros((3, 40, 50), np.uint8), dims=("c", "y", "x"), c_coords=["r", "g", "b"])
    # H&E registered at half the resolution of the morphology image ("global" = morphology pixels)
    set_transformation(he, Scale([2.0, 2.0], axes=("x", "y")), to_coordinate_system="global")
    points = PointsModel.parse(
        dd.from_pandas(pd.DataFrame({"x": [1.0, 5.0], "y": [2.0, 3.0]}), npartitions=1),
        transformations={"global": Scale([1 / pixel_size] * 2, axes=("x", "y"))},
    )
    circles = ShapesModel.parse(
        np.array([[10.0, 10.0], [20.0, 20.0]]),
        geometry=0,
        radius=np.array([3.0, 3.0]),
        transformations={"global": Scale([1 / pixel_size] * 2, axes=("x", "y"))},
    )
    table = TableModel.parse(
        ad.AnnData(
            X=np.array([[1.0, 2.0], [0.0, 3.0]]),
            obs=pd.DataFrame({"region": pd.Categorical(["cell_circles"] * 2), "cell_id": [0, 1]}),
        ),
        region="cell_circles",
        region_key="region",
        instance_key="cell_id",
    )
    sdata = SpatialData(
        images={"he_image": he}, points={"transcripts": points}, shapes={"cell_circles": circles}, tables={"t": table}
    )
    sdata.attrs["spatialdata_io_reader"] = "xenium"
    return sdata


def test_adopt_image_renames_and_calibrates():
    sdata = _xenium_like()
    adopt_image(sdata, "he_image")
    assert "he_image" not in sdata.images
    assert um_per_px(sdata, "he") == pytest.approx(0.425)
    assert um_per_px(sdata, "cell_circles") == pytest.approx(1.0)  # circles are in µm
    assert set(get_transformation(sdata.images["he"], get_all=True)) == {"global", "um"}


def test_adopt_image_needs_scale_and_leaves_data_unchanged():
    sdata = _xenium_like()
    sdata.attrs.pop("spatialdata_io_reader")
    with pytest.raises(InputError, match="um_per_px="):
        adopt_image(sdata, "he_image")
    assert "he_image" in sdata.images
    assert "um" not in get_transformation(sdata.images["he_image"], get_all=True)
    adopt_image(sdata, "he_image", um_per_px=0.3)
    assert um_per_px(sdata, "he") == pytest.approx(0.3)


def test_rename_element_retargets_tables():
    sdata = _xenium_like()
    rename_element(sdata, "cell_circles", "cells")
    table = sdata.tables["t"]
    assert table.uns["spatialdata_attrs"]["region"] == "cells"
    assert set(table.obs["region"]) == {"cells"}
    assert "cells" in sdata.shapes
    with pytest.raises(InputError, match="exists"):
        rename_element(sdata, "cells", "transcripts")
