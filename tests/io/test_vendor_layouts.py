"""The 10x readers end to end on folders written in the vendor's own layout, then training and prediction on them.

A synthetic section (image, units, counts: ``st.datasets.synthetic``) is rendered into a Space Ranger ``outs``
folder (Visium; Visium HD), read back with ``st.io.read_visium`` / ``read_visium_hd`` (spatialdata-io parses it),
and a tiny PixNet is trained for one epoch and run over the slide on what was read.
"""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
from _tenx_files import write_10x_h5
from PIL import Image

import stpredict as st
from stpredict._geometry import apply_affine, scale_levels, to_um_affine, um_per_px

UM = 2.0  # µm per full-resolution pixel of the synthetic scans
HIRES, LOWRES = 0.5, 0.25  # Space Ranger's scale factors of the hires and lowres PNGs
FIT = {"max_epochs": 1, "batch_size": 4, "tiles_per_epoch": 8, "device": "cpu", "show_progress_bar": False}


def _quiet(reader, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reader(*args, **kwargs)


def _rgb(sdata) -> np.ndarray:
    return np.asarray(scale_levels(sdata.images["he"])[0].values).transpose(1, 2, 0)


def _write_images(spatial, rgb: np.ndarray, full_path) -> None:
    """Full-resolution TIFF, and the hires / lowres PNGs Space Ranger writes (downscaled by their scale factors)."""
    tifffile.imwrite(full_path, rgb, photometric="rgb")
    for name, factor in (("tissue_hires_image.png", HIRES), ("tissue_lowres_image.png", LOWRES)):
        size = (round(rgb.shape[1] * factor), round(rgb.shape[0] * factor))
        Image.fromarray(rgb).resize(size, Image.Resampling.BOX).save(spatial / name)


def _counts(sdata) -> np.ndarray:
    x = sdata.tables["table"].X
    return np.asarray(x.todense() if hasattr(x, "todense") else x).astype(np.int64)


def _pixnet(genes, um: float = 2 * UM):
    return st.models.PixNet(
        genes, tile_size=32, decoder_channels=(8, 16, 16, 32, 32, 32), um_per_px=um, output_stride=1, seed=0
    )


# --------------------------------------------------------------------------- Visium (Space Ranger 2.0+)


@pytest.fixture(scope="module")
def visium_section():
    return st.datasets.synthetic(shape_um=(800.0, 800.0), um_per_px=UM, n_genes=6, layout="visium", seed=0)


@pytest.fixture(scope="module")
def visium_outs(visium_section, tmp_path_factory):
    root = tmp_path_factory.mktemp("visium") / "outs"
    spatial = root / "spatial"
    spatial.mkdir(parents=True)
    table = visium_section.tables["table"]
    barcodes = [f"AAAC{i:08d}-1" for i in range(table.n_obs)]
    write_10x_h5(root / "filtered_feature_bc_matrix.h5", _counts(visium_section), barcodes, list(table.var_names))
    xy = table.obsm["spatial"]  # full-resolution pixels (x, y)
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": table.obs["array_row"].to_numpy(),
            "array_col": table.obs["array_col"].to_numpy(),
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    ).to_csv(spatial / "tissue_positions.csv", index=False)
    scale = {
        "spot_diameter_fullres": 55.0 / UM,
        "fiducial_diameter_fullres": 89.5 / UM,
        "tissue_hires_scalef": HIRES,
        "tissue_lowres_scalef": LOWRES,
    }
    (spatial / "scalefactors_json.json").write_text(json.dumps(scale))
    _write_images(spatial, _rgb(visium_section), root / "he_full.tif")
    return root


def test_visium_layout_round_trips_counts_coordinates_and_scale(visium_section, visium_outs):
    sdata = _quiet(st.io.read_visium, visium_outs, image_file="he_full.tif")
    truth = visium_section.tables["table"]
    table = sdata.tables["table"]
    order = [int(b[4:12]) for b in table.obs_names]  # the barcodes encode the synthetic spot's position
    assert sorted(order) == list(range(truth.n_obs))
    assert list(table.var_names) == list(truth.var_names)
    np.testing.assert_array_equal(table.X.toarray(), _counts(visium_section)[order])
    assert table.X.dtype == np.float32
    np.testing.assert_allclose(table.obsm["spatial"], truth.obsm["spatial"][order])
    # the full-resolution image, pixel for pixel, at the section's µm per pixel (55 µm spot ↔ its diameter in px)
    assert um_per_px(sdata, "he") == pytest.approx(UM, rel=1e-9)
    np.testing.assert_array_equal(_rgb(sdata), _rgb(visium_section))
    # spots in µm: same centres, 55 µm across
    spots = sdata.shapes["spots"]
    centres_um = apply_affine(to_um_affine(sdata, "spots"), np.column_stack([spots.geometry.x, spots.geometry.y]))
    ids = table.obs[table.uns["spatialdata_attrs"]["instance_key"]].to_numpy()
    by_id = pd.DataFrame(centres_um, index=spots.index).loc[ids].to_numpy()
    np.testing.assert_allclose(by_id, truth.obsm["spatial"][order] * UM, atol=1e-9)
    assert 2 * spots["radius"].iloc[0] * um_per_px(sdata, "spots") == pytest.approx(55.0)
    # the hires PNG: half the pixels, twice the µm per pixel, same spots in µm
    hires = _quiet(st.io.read_visium, visium_outs, image_resolution="hires")
    assert um_per_px(hires, "he") == pytest.approx(UM / HIRES, rel=1e-9)
    assert scale_levels(hires.images["he"])[0].shape == (3, 200, 200)
    np.testing.assert_allclose(to_um_affine(hires, "spots"), to_um_affine(sdata, "spots"), atol=1e-9)


def test_visium_layout_trains_and_predicts(visium_outs):
    sdata = _quiet(st.io.read_visium, visium_outs, image_file="he_full.tif")
    genes = list(sdata.tables["table"].var_names)
    model = _pixnet(genes).fit(sdata, **FIT)
    assert len(model.fit_history["train_loss"]) == 1
    assert np.isfinite(model.fit_history["train_loss"][0])
    st.tl.predict_dense(sdata, model, tissue_only=False, show_progress_bar=False)
    dense = scale_levels(sdata.images["he_pixnet"])[0]
    assert dense.shape == (6, 200, 200)  # 800 µm at the model's 4 µm per pixel
    assert um_per_px(sdata, "he_pixnet") == pytest.approx(2 * UM)
    pred = st.tl.aggregate(sdata, "he_pixnet", shapes_key="spots", inplace=False, show_progress_bar=False)
    assert pred.n_obs == sdata.tables["table"].n_obs
    assert list(pred.var_names) == genes
    assert np.isfinite(np.asarray(pred.X)).all()


# --------------------------------------------------------------------------- Visium HD (Space Ranger 3.0+)


@pytest.fixture(scope="module")
def hd_section():
    return st.datasets.synthetic(
        shape_um=(400.0, 400.0), um_per_px=UM, n_genes=6, layout="visium_hd", bin_size_um=8.0, seed=1
    )


@pytest.fixture(scope="module")
def hd_outs(hd_section, tmp_path_factory):
    root = tmp_path_factory.mktemp("visium_hd") / "outs"
    (root / "spatial").mkdir(parents=True)
    (root / "microscope_image").mkdir()
    with h5py.File(root / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps({"file_format": "1.0"})})
    bin_px = 8.0 / UM
    scale = {"tissue_hires_scalef": HIRES, "tissue_lowres_scalef": LOWRES, "spot_diameter_fullres": 2.0 / UM}
    scale |= {"microns_per_pixel": UM, "bin_size_um": 2.0, "fiducial_diameter_fullres": 50.0}
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(scale))
    _write_images(root / "spatial", _rgb(hd_section), root / "microscope_image" / "he_full.tif")

    table = hd_section.tables["table"]
    rows, cols = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    barcodes = [f"s_008um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
    folder = root / "binned_outputs" / "square_008um"
    (folder / "spatial").mkdir(parents=True)
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", _counts(hd_section), barcodes, list(table.var_names))
    xy = table.obsm["spatial"]
    pd.DataFrame(
        {
            "barcode": barcodes,
            "in_tissue": 1,
            "array_row": rows,
            "array_col": cols,
            "pxl_row_in_fullres": xy[:, 1],
            "pxl_col_in_fullres": xy[:, 0],
        }
    ).to_parquet(folder / "spatial" / "tissue_positions.parquet")
    bins = scale | {"bin_size_um": 8.0, "spot_diameter_fullres": bin_px}
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(bins))
    return root


def _read_hd(path):
    return _quiet(st.io.read_visium_hd, path, load_segmentations_only=False)


def test_visium_hd_layout_round_trips_counts_coordinates_and_scale(hd_section, hd_outs):
    sdata = _read_hd(hd_outs)
    truth = hd_section.tables["table"]
    table = sdata.tables["square_008um"]
    assert table.n_obs == truth.n_obs
    key = {(r, c): i for i, (r, c) in enumerate(zip(truth.obs["array_row"], truth.obs["array_col"], strict=True))}
    order = [key[int(r), int(c)] for r, c in zip(table.obs["array_row"], table.obs["array_col"], strict=True)]
    np.testing.assert_array_equal(table.X.toarray(), _counts(hd_section)[order])
    assert list(table.var_names) == list(truth.var_names)
    assert um_per_px(sdata, "he") == pytest.approx(UM, rel=1e-9)  # the full-resolution microscope image
    np.testing.assert_array_equal(_rgb(sdata), _rgb(hd_section))
    region = table.uns["spatialdata_attrs"]["region"]
    bins = sdata.shapes[region]
    # bins in µm: 8 µm squares centred where the synthetic bins are
    to_um = to_um_affine(sdata, region)
    centres = apply_affine(to_um, np.column_stack([bins.geometry.centroid.x, bins.geometry.centroid.y]))
    ids = table.obs[table.uns["spatialdata_attrs"]["instance_key"]].to_numpy()
    centres = pd.DataFrame(centres, index=bins.index).loc[ids].to_numpy()
    np.testing.assert_allclose(centres, truth.obsm["spatial"][order] * UM, atol=1e-6)
    side_um = np.sqrt(bins.geometry.area.median()) * um_per_px(sdata, region)
    assert side_um == pytest.approx(8.0, rel=1e-6)


def test_visium_hd_layout_trains_and_predicts(hd_outs):
    sdata = _read_hd(hd_outs)
    genes = list(sdata.tables["square_008um"].var_names)
    model = _pixnet(genes).fit(sdata, table_key="square_008um", **FIT)
    assert np.isfinite(model.fit_history["train_loss"][0])
    st.tl.predict_dense(sdata, model, tissue_only=False, show_progress_bar=False)
    assert scale_levels(sdata.images["he_pixnet"])[0].shape == (6, 100, 100)  # 400 µm at 4 µm per pixel
    pred = st.tl.aggregate(sdata, "he_pixnet", bin_size=16.0, inplace=False, show_progress_bar=False)
    assert pred.n_obs == 25 * 25
    assert np.isfinite(np.asarray(pred.X)).all()
