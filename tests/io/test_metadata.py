from __future__ import annotations

import json
import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, PointsModel, ShapesModel
from spatialdata.transformations import Identity, Scale, set_transformation

from stpredict.io._metadata import VISIUM_SPOT_DIAMETER_UM, infer_um_per_px


def _image(attrs: dict | None = None, *, multiscale: bool = False, cs: str = "global"):
    data = np.zeros((3, 64, 48), dtype=np.uint8)
    image = Image2DModel.parse(
        data,
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        transformations={cs: Identity()},
        scale_factors=[2] if multiscale else None,
    )
    if attrs:
        if multiscale:
            next(iter(image["scale0"].data_vars.values())).attrs.update(attrs)
        else:
            image.attrs.update(attrs)
    return image


def _circles(n: int, radius: float, transformations: dict) -> object:
    xy = np.column_stack([np.linspace(10, 40, n), np.linspace(5, 50, n)])
    return ShapesModel.parse(xy, geometry=0, radius=np.full(n, radius), transformations=transformations)


def test_visium_fixture_scale(data_dir):
    import spatialdata_io as sio

    path = data_dir / "scanpy_visium_tiny" / "V1_Human_Heart_subset"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        sdata = sio.visium(path, dataset_id="heart")
    factors = json.loads((path / "spatial" / "scalefactors_json.json").read_text())
    expected = VISIUM_SPOT_DIAMETER_UM / (factors["spot_diameter_fullres"] * factors["tissue_lowres_scalef"])
    assert infer_um_per_px(sdata, "heart_lowres_image") == pytest.approx(expected, rel=1e-9)
    assert 13 < expected < 14.5  # 55 µm spots ~4 px across in the 600-px low-res image


def test_visium_requires_reader_attr():
    image = _image(cs="lib")
    shapes = _circles(5, 10.0, {"lib": Scale([2.0, 2.0], axes=("x", "y"))})
    sdata = SpatialData(images={"img": image}, shapes={"lib": shapes})
    assert infer_um_per_px(sdata, "img") is None  # circles of unknown physical size: no guessing
    sdata.attrs["spatialdata_io_reader"] = "visium"
    # diameter 20 intrinsic units -> 40 image px = 55 µm
    assert infer_um_per_px(sdata, "img") == pytest.approx(55.0 / 40.0)


def test_visium_hd_bins_circles_and_squares():
    image = _image(cs="hd")
    # 8 µm bins; full-res px of 0.25 µm: bin = 32 full-res px; image is the full-res image scaled by 0.5
    to_image = {"hd": Scale([0.5, 0.5], axes=("x", "y"))}
    circles = _circles(4, 16.0, to_image)
    sdata = SpatialData(images={"he": image}, shapes={"hd_square_008um": circles})
    sdata.attrs["spatialdata_io_reader"] = "visium_hd"
    assert infer_um_per_px(sdata, "he") == pytest.approx(8.0 / 16.0)

    squares = ShapesModel.parse(circles.buffer(16.0, cap_style=3).to_frame("geometry"), transformations=to_image)
    sdata2 = SpatialData(images={"he": _image(cs="hd")}, shapes={"hd_square_016um": squares})
    sdata2.attrs["spatialdata_io_reader"] = "visium_hd"
    assert infer_um_per_px(sdata2, "he") == pytest.approx(16.0 / 16.0)


@pytest.mark.parametrize("reader", ["xenium", "merscope"])
def test_points_in_um(reader):
    pixel_size = 0.2125
    df = pd.DataFrame({"x": [1.0, 20.0, 3.0], "y": [2.0, 5.0, 9.0]})
    points = PointsModel.parse(
        dd.from_pandas(df, npartitions=1), transformations={"global": Scale([1 / pixel_size] * 2, axes=("x", "y"))}
    )
    # H&E aligned to the morphology image at half its resolution
    image = _image()
    set_transformation(image, Scale([2.0, 2.0], axes=("x", "y")), to_coordinate_system="global")
    sdata = SpatialData(images={"he_image": image}, points={"transcripts": points})
    assert infer_um_per_px(sdata, "he_image") is None
    sdata.attrs["spatialdata_io_reader"] = reader
    assert infer_um_per_px(sdata, "he_image") == pytest.approx(pixel_size * 2)


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5}, 0.5),
        ({"PhysicalSizeX": 250.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 250.0, "PhysicalSizeYUnit": "nm"}, 0.25),
        ({"ome": {"Image": {"Pixels": {"@PhysicalSizeX": "0.7", "@PhysicalSizeY": "0.7"}}}}, 0.7),
        ({"metadata": {"physical_size_x": 0.001, "physical_size_x_unit": "mm"}}, 1.0),
        ({"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.6}, None),  # anisotropic: not used
        ({"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "parsec"}, None),  # unknown unit
        ({"stpredict": {"um_per_px": 3.19}}, 3.19),
        ({"unrelated": {"x": 1}}, None),
    ],
)
@pytest.mark.parametrize("multiscale", [False, True])
def test_attrs(attrs, expected, multiscale):
    sdata = SpatialData(images={"he": _image(attrs, multiscale=multiscale)})
    result = infer_um_per_px(sdata, "he")
    if expected is None:
        assert result is None
    else:
        assert result == pytest.approx(expected)


def test_unknown_key_and_nothing_recorded():
    sdata = SpatialData(images={"he": _image()})
    assert infer_um_per_px(sdata, "he") is None
    with pytest.raises(KeyError, match="available elements"):
        infer_um_per_px(sdata, "nope")


def test_a_path_instead_of_a_spatialdata_names_the_reader(tmp_path):
    with pytest.raises(TypeError, match=r"infer_um_per_px takes a SpatialData, got PosixPath .*st\.io\.read_visium"):
        infer_um_per_px(tmp_path, "he")
    with pytest.raises(KeyError, match="No element 'he' in the SpatialData; available elements: \\[\\]"):
        infer_um_per_px(SpatialData(), "he")
