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

from stpredict.io._metadata import (
    VISIUM_PITCH_UM,
    VISIUM_SCALEFACTOR_SPOT_UM,
    VISIUM_SPOT_DIAMETER_UM,
    infer_um_per_px,
)


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
    # brute force: the mean distance between centres of spots in one array row that are two columns apart
    obs = sdata.tables["table"].obs
    xy = np.column_stack([sdata.shapes["heart"].geometry.x, sdata.shapes["heart"].geometry.y])
    by_pos = {(r, c): xy[i] for i, (r, c) in enumerate(zip(obs["array_row"], obs["array_col"], strict=True))}
    steps = [np.hypot(*(by_pos[(r, c + 2)] - p)) for (r, c), p in by_pos.items() if (r, c + 2) in by_pos]
    assert len(steps) >= 3  # the 100-spot subset holds three such pairs
    um_per_fullres_px = VISIUM_PITCH_UM / np.mean(steps)
    expected = um_per_fullres_px / factors["tissue_lowres_scalef"]
    assert infer_um_per_px(sdata, "heart_lowres_image") == pytest.approx(expected, rel=1e-3)
    # Space Ranger's spot_diameter_fullres is a theoretical 65 µm spot: it agrees with the pitch, 55 µm does not
    by_diameter = VISIUM_SCALEFACTOR_SPOT_UM / factors["spot_diameter_fullres"] / factors["tissue_lowres_scalef"]
    assert by_diameter == pytest.approx(expected, rel=0.01)
    assert abs(VISIUM_SPOT_DIAMETER_UM / VISIUM_SCALEFACTOR_SPOT_UM * by_diameter / expected - 1) > 0.15


def test_visium_requires_reader_attr():
    image = _image(cs="lib")
    shapes = _circles(5, 10.0, {"lib": Scale([2.0, 2.0], axes=("x", "y"))})
    sdata = SpatialData(images={"img": image}, shapes={"lib": shapes})
    assert infer_um_per_px(sdata, "img") is None  # circles of unknown physical size: no guessing
    sdata.attrs["spatialdata_io_reader"] = "visium"
    # no array coordinates: diameter 20 intrinsic units -> 40 image px = spot_diameter_fullres = 65 µm
    assert infer_um_per_px(sdata, "img") == pytest.approx(65.0 / 40.0)


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


def _visium_grid(units_per_col: float, radius: float, *, jitter: float = 0.0):
    """A Visium-like hexagonal grid of spots in intrinsic units, with a table holding the array coordinates."""
    import anndata as ad
    from spatialdata.models import TableModel

    rows, cols = np.meshgrid(np.arange(6), np.arange(12), indexing="ij")
    keep = (rows + cols) % 2 == 0  # Visium: even columns on even rows, odd on odd rows
    row, col = rows[keep], cols[keep]
    xy = np.column_stack([col * units_per_col, row * units_per_col * np.sqrt(3)]) + 100.0
    xy = xy + np.random.default_rng(0).normal(0, jitter, xy.shape)
    shapes = ShapesModel.parse(
        xy, geometry=0, radius=np.full(len(xy), radius), transformations={"lib": Scale([0.5, 0.5], axes=("x", "y"))}
    )
    table = ad.AnnData(np.zeros((len(xy), 1), dtype=np.float32))
    table.obs["array_row"], table.obs["array_col"] = row, col
    table.obs["region"] = pd.Categorical(["spots"] * len(xy))
    table.obs["spot_id"] = np.arange(len(xy))
    table = TableModel.parse(table, region="spots", region_key="region", instance_key="spot_id")
    sdata = SpatialData(images={"img": _image(cs="lib")}, shapes={"spots": shapes}, tables={"table": table})
    sdata.attrs["spatialdata_io_reader"] = "visium"
    return sdata


def test_visium_scale_from_the_array_pitch_wins_over_the_spot_diameter(caplog):
    # 40 units per array column = 50 µm; image px = 0.5 unit -> 2.5 µm per image px
    sdata = _visium_grid(40.0, radius=30.0)  # 60 units = "65 µm" would say 2.17 µm per px: 13 % off
    with caplog.at_level("WARNING", logger="stpredict"):
        assert infer_um_per_px(sdata, "img") == pytest.approx(2.5, rel=1e-9)
    assert "pitch" in caplog.text
    assert "65 µm" in caplog.text


def test_visium_scale_agrees_silently_and_ignores_a_broken_grid(caplog):
    consistent = _visium_grid(40.0, radius=0.5 * 65.0 / 50.0 * 40.0)
    with caplog.at_level("WARNING", logger="stpredict"):
        assert infer_um_per_px(consistent, "img") == pytest.approx(2.5, rel=1e-9)
    assert caplog.text == ""
    # centres scattered far off their array coordinates: not a grid, so the diameter decides (65 µm / 2·26 units)
    broken = _visium_grid(40.0, radius=26.0, jitter=15.0)
    with caplog.at_level("WARNING", logger="stpredict"):
        assert infer_um_per_px(broken, "img") == pytest.approx(65.0 / 52.0 / 0.5, rel=1e-9)
    assert "not on a Visium grid" in caplog.text
