from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse
from scipy.ndimage import uniform_filter
from xarray import DataArray

from stpredict._geometry import scale_levels, um_per_px
from stpredict.errors import InputError
from stpredict.io import from_image_and_table


@pytest.fixture(scope="module")
def xenium_crop(data_dir):
    folder = data_dir / "deepspot_xenium" / "NCBI858"
    return folder / "image.jpg", ad.read_h5ad(folder / "cells.h5ad")


def test_deepspot_cells_land_on_tissue(xenium_crop):
    image_path, cells = xenium_crop
    before = cells.copy()
    # obs.x_pixel is the image ROW and obs.y_pixel the COLUMN
    sdata = from_image_and_table(
        image_path, cells, x_key="y_pixel", y_key="x_pixel", um_per_px=0.5, unit_diameter_um=10.0, shapes_key="cells"
    )
    table = sdata.tables["table"]
    assert table.shape == (200, 338)
    assert sparse.isspmatrix_csr(table.X)
    assert table.X.dtype == np.float32
    np.testing.assert_array_equal(table.X.toarray(), cells.X)
    np.testing.assert_allclose(table.obsm["spatial"], cells.obs[["y_pixel", "x_pixel"]].to_numpy())
    assert um_per_px(sdata, "he") == pytest.approx(0.5)
    assert um_per_px(sdata, "cells") == pytest.approx(0.5)
    np.testing.assert_allclose(sdata.shapes["cells"]["radius"], 10.0)  # 5 µm radius at 0.5 µm/px
    assert table.uns["spatialdata_attrs"]["region"] == "cells"

    grey = scale_levels(sdata.images["he"])[0].values.astype(np.float64).mean(axis=0)
    assert grey.shape == (1249, 1431)
    smooth = uniform_filter(grey, 15)
    xy = table.obsm["spatial"].astype(int)
    on_tissue = np.mean(smooth[xy[:, 1], xy[:, 0]] < 200)
    chance = np.mean(smooth < 200)
    assert on_tissue > 0.7
    assert on_tissue > chance + 0.3
    # the caller's AnnData is untouched
    np.testing.assert_array_equal(cells.X, before.X)
    assert list(cells.obs.columns) == list(before.obs.columns)


def test_deepspot_unswapped_coordinates_are_refused(xenium_crop):
    image_path, cells = xenium_crop
    with pytest.raises(InputError, match="outside the image"):
        from_image_and_table(image_path, cells, x_key="x_pixel", y_key="y_pixel", um_per_px=0.5)


def test_points_without_diameter(xenium_crop):
    image_path, cells = xenium_crop
    sdata = from_image_and_table(image_path, cells, x_key="y_pixel", y_key="x_pixel", um_per_px=0.5)
    assert "spots" in sdata.points
    assert "spots" not in sdata.shapes
    points = sdata.points["spots"].compute()
    np.testing.assert_allclose(points[["x", "y"]].to_numpy(), sdata.tables["table"].obsm["spatial"])
    np.testing.assert_array_equal(points["instance_id"].to_numpy(), np.arange(200))
    assert um_per_px(sdata, "spots") == pytest.approx(0.5)


def _toy(rng, n=5, counts=None):
    x = counts if counts is not None else rng.integers(0, 9, (n, 4)).astype(np.float64)
    obs = pd.DataFrame({"col": np.linspace(1, 28, n), "row": np.linspace(2, 18, n)}, index=[f"c{i}" for i in range(n)])
    return ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=["A", "B", "C", "D"]))


@pytest.mark.parametrize("layout", ["yxc", "cyx", "rgba", "dataarray"])
def test_in_memory_image_layouts(rng, layout):
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    image = {
        "yxc": rgb,
        "cyx": rgb.transpose(2, 0, 1),
        "rgba": np.concatenate([rgb, np.full((20, 30, 1), 7, np.uint8)], axis=2),
        "dataarray": DataArray(rgb.transpose(2, 0, 1), dims=("c", "y", "x")),
    }[layout]
    original = np.array(image, copy=True)
    adata = _toy(rng)
    sdata = from_image_and_table(image, adata, x_key="col", y_key="row", um_per_px=2.0, unit_diameter_um=4.0)
    np.testing.assert_array_equal(scale_levels(sdata.images["he"])[0].values, rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(np.asarray(image), original)
    if isinstance(image, np.ndarray):
        assert image.flags.writeable  # the caller's array is not frozen
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 1.0)


def test_spatial_key_layer_and_labels(rng):
    adata = _toy(rng)
    adata.obsm["spatial"] = adata.obs[["col", "row"]].to_numpy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="non-integer"):
        from_image_and_table(image, adata, spatial_key="spatial", um_per_px=1.0)
    sdata = from_image_and_table(
        image, adata, spatial_key="spatial", layer="counts", um_per_px=1.0, section="s1", patient="p1"
    )
    table = sdata.tables["table"]
    np.testing.assert_array_equal(table.X.toarray(), adata.layers["counts"])
    assert (table.obs["section"] == "s1").all()
    assert (table.obs["patient"] == "p1").all()
    with pytest.raises(KeyError, match="layers"):
        from_image_and_table(image, adata, spatial_key="spatial", layer="nope", um_per_px=1.0)
    with pytest.raises(KeyError, match="x_key"):
        from_image_and_table(image, adata, x_key="nope", um_per_px=1.0)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.X.__setitem__((0, 0), -1), "negative"),
        (lambda a: a.X.__setitem__((0, 0), np.nan), "NaN"),
        (lambda a: setattr(a, "var_names", ["A", "B", "A", "D"]), "duplicated"),
        (lambda a: setattr(a, "var_names", ["A", "", "C", "D"]), "missing or empty"),
        (lambda a: a.obs.__setitem__("col", np.r_[np.nan, a.obs["col"].to_numpy()[1:]]), "NaN"),
    ],
)
def test_bad_input(rng, mutate, match):
    adata = _toy(rng)
    mutate(adata)
    with pytest.raises(InputError, match=match):
        from_image_and_table(
            rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), adata, x_key="col", y_key="row", um_per_px=1.0
        )


def test_bad_scale_and_image(rng, tmp_path):
    adata = _toy(rng)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="um_per_px"):
        from_image_and_table(image, adata, x_key="col", y_key="row", um_per_px=0.0)
    with pytest.raises(InputError, match="8-bit"):
        from_image_and_table(image.astype(np.uint16), adata, x_key="col", y_key="row", um_per_px=1.0)
    path = tmp_path / "he.jpg"
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:-4000])
    with pytest.raises(InputError, match="truncated"):
        from_image_and_table(path, adata, x_key="col", y_key="row", um_per_px=1.0)


def test_image_path_that_is_a_folder_or_missing(rng, tmp_path):
    adata = _toy(rng)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "he.png")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError) as info:
        from_image_and_table(tmp_path, adata, x_key="col", y_key="row", um_per_px=1.0)
    assert str(info.value) == (
        f"{str(tmp_path)!r} is a folder, not an image file. Pass the H&E image file inside it (images: ['he.png'])."
    )
    with pytest.raises(InputError, match="Image file '.*nope.png' does not exist. Pass the path of the H&E image."):
        from_image_and_table(tmp_path / "nope.png", adata, x_key="col", y_key="row", um_per_px=1.0)
