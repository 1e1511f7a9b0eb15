"""10x bundles (Visium, Visium HD, Xenium) that are empty or incomplete: one error that names every missing file.

spatialdata-io fails deep inside on such folders ("Cannot determine the `library_id`", a bare AssertionError, h5py
errors without a file name) or silently drops elements; the readers check the layout first.
"""

from __future__ import annotations

import json
import shutil
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
from _tenx_files import write_10x_h5
from PIL import Image

from stpredict._geometry import um_per_px
from stpredict.errors import InputError
from stpredict.io import read_visium, read_visium_hd, read_xenium

VISIUM_COUNTS = (
    "filtered_feature_bc_matrix.h5: the counts matrix (also accepted as `<library_id>_filtered_feature_bc_matrix.h5`; "
    "for another file, e.g. raw_feature_bc_matrix.h5, pass `counts_file=`)"
)
VISIUM_POSITIONS = (
    "spatial/tissue_positions.csv: the spot positions (Space Ranger 1.x names it spatial/tissue_positions_list.csv; "
    "elsewhere: pass `tissue_positions_file=`)"
)
VISIUM_SCALE = "spatial/scalefactors_json.json: the scale factors (spot diameter and image scales)"
VISIUM_IMAGE = (
    "an H&E image: spatial/tissue_hires_image.png or spatial/tissue_lowres_image.png, or the full-resolution image "
    "as `image_file=`"
)


def _problems(error: pytest.ExceptionInfo) -> list[str]:
    """The listed problems of a layout error, one per ``  - `` line."""
    return [line[4:] for line in str(error.value).splitlines() if line.startswith("  - ")]


def _quiet(reader, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return reader(*args, **kwargs)


# --------------------------------------------------------------------------- Visium


@pytest.fixture
def visium_copy(data_dir, tmp_path):
    """A private copy of the tiny Space Ranger 1.0 folder (counts h5, spatial/ with positions list, lowres)."""
    return shutil.copytree(data_dir / "scanpy_visium_tiny" / "V1_Human_Heart_subset", tmp_path / "outs")


def test_visium_empty_folder_lists_every_missing_piece(tmp_path):
    (tmp_path / "outs").mkdir()
    with pytest.raises(InputError) as info:
        read_visium(tmp_path / "outs")
    assert _problems(info) == [VISIUM_COUNTS, VISIUM_POSITIONS, VISIUM_SCALE, VISIUM_IMAGE]
    message = str(info.value)
    assert message.startswith(f"The Visium folder {str(tmp_path / 'outs')!r} is not a complete Space Ranger Visium")
    assert "Found: nothing (the folder is empty)." in message


@pytest.mark.parametrize(
    ("removed", "problem", "layout"),
    [
        ("filtered_feature_bc_matrix.h5", VISIUM_COUNTS, "Space Ranger 1.x"),
        ("spatial/scalefactors_json.json", VISIUM_SCALE, "Space Ranger 1.x"),
        ("spatial/tissue_positions_list.csv", VISIUM_POSITIONS, "from 2.0, tissue_positions_list.csv in 1.x"),
        ("spatial/tissue_lowres_image.png", VISIUM_IMAGE, "Space Ranger 1.x"),
    ],
)
def test_visium_names_the_one_missing_file(visium_copy, removed, problem, layout):
    (visium_copy / removed).unlink()
    with pytest.raises(InputError) as info:
        read_visium(visium_copy)
    assert _problems(info) == [problem]
    assert layout in str(info.value)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            ("filtered_feature_bc_matrix.h5", b""),
            "filtered_feature_bc_matrix.h5: the counts matrix (also accepted as "
            "`<library_id>_filtered_feature_bc_matrix.h5`; for another file, e.g. raw_feature_bc_matrix.h5, pass "
            "`counts_file=`), is unusable: the file is empty",
        ),
        (
            ("filtered_feature_bc_matrix.h5", b"not hdf5" * 100),
            "filtered_feature_bc_matrix.h5: the counts matrix (also accepted as "
            "`<library_id>_filtered_feature_bc_matrix.h5`; for another file, e.g. raw_feature_bc_matrix.h5, pass "
            "`counts_file=`), is unusable: not an HDF5 file (damaged, or not completely copied)",
        ),
        (
            ("spatial/scalefactors_json.json", b'{"tissue_lowres_scalef": 0.1}'),
            "spatial/scalefactors_json.json: the scale factors, lacks the key(s) "
            "['tissue_hires_scalef', 'spot_diameter_fullres']",
        ),
        (
            ("spatial/tissue_lowres_image.png", b"\x89PNG"),
            "spatial/tissue_lowres_image.png: an H&E image, is unusable: not a readable image (damaged, or not "
            "completely copied)",
        ),
    ],
)
def test_visium_names_an_unusable_file(visium_copy, damage, problem):
    name, content = damage
    (visium_copy / name).write_bytes(content)
    with pytest.raises(InputError) as info:
        read_visium(visium_copy)
    assert _problems(info) == [problem]


def test_visium_space_ranger_2_layout(visium_copy):
    positions = pd.read_csv(visium_copy / "spatial" / "tissue_positions_list.csv", header=None)
    positions.columns = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    positions.to_csv(visium_copy / "spatial" / "tissue_positions.csv", index=False)
    (visium_copy / "spatial" / "tissue_positions_list.csv").unlink()
    sdata = _quiet(read_visium, visium_copy)  # the check accepts Space Ranger 2.0's names
    assert sdata.tables["table"].n_obs == 100
    (visium_copy / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(InputError, match="not a complete Space Ranger 2.0\\+ Visium `outs` folder") as info:
        read_visium(visium_copy)
    assert _problems(info) == [VISIUM_SCALE]


def test_visium_accepts_a_library_prefix_and_points_at_outs(visium_copy, tmp_path):
    (visium_copy / "filtered_feature_bc_matrix.h5").rename(visium_copy / "lib1_filtered_feature_bc_matrix.h5")
    assert _quiet(read_visium, visium_copy).tables["table"].n_obs == 100
    run = tmp_path / "run"
    shutil.copytree(visium_copy, run / "outs")
    with pytest.raises(InputError, match=f"It holds an `outs/` folder: pass {str(run / 'outs')!r}"):
        read_visium(run)


def test_visium_image_options_checked_before_reading(visium_copy, tmp_path):
    with pytest.raises(InputError) as info:
        read_visium(visium_copy, image_resolution="hires")
    assert _problems(info) == ["spatial/tissue_hires_image.png: the image that image_resolution='hires' asks for"]
    with pytest.raises(InputError) as info:
        read_visium(visium_copy, image_file="he_full.tif")
    assert _problems(info) == ["he_full.tif: the full-resolution image given as `image_file=` (relative to the folder)"]
    with pytest.raises(InputError, match="image_resolution must be 'auto', 'full', 'hires' or 'lowres'"):
        read_visium(visium_copy, image_resolution="max")
    for bad in (tmp_path / "nope", visium_copy / "filtered_feature_bc_matrix.h5"):
        with pytest.raises(InputError, match="(does not exist|is a file, not a folder). Pass the Space Ranger"):
            read_visium(bad)


# --------------------------------------------------------------------------- Visium HD


def _write_image(path, shape):
    Image.fromarray(np.full((*shape, 3), 200, np.uint8)).save(path)


@pytest.fixture
def hd_folder(tmp_path):
    """A tiny Space Ranger 3.0 Visium HD `outs` folder: 0.5 µm per full-res px, 8 and 16 µm bins, hires at 0.1."""
    root = tmp_path / "outs"
    (root / "spatial").mkdir(parents=True)
    with h5py.File(root / "feature_slice.h5", "w") as f:
        f.attrs["metadata_json"] = json.dumps({"hd_layout_json": json.dumps({"file_format": "1.0"})})
    scale = {"tissue_hires_scalef": 0.1, "tissue_lowres_scalef": 0.05, "spot_diameter_fullres": 4.0}
    scale |= {"microns_per_pixel": 0.5, "bin_size_um": 2.0}
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(scale))
    _write_image(root / "spatial" / "tissue_hires_image.png", (40, 40))
    _write_image(root / "spatial" / "tissue_lowres_image.png", (20, 20))
    rng = np.random.default_rng(0)
    for size in (8, 16):
        folder = root / "binned_outputs" / f"square_{size:03d}um"
        (folder / "spatial").mkdir(parents=True)
        side, px = 400 // (2 * size), 2.0 * size
        rows, cols = np.divmod(np.arange(side * side), side)
        barcodes = [f"s_{size:03d}um_{r:05d}_{c:05d}-1" for r, c in zip(rows, cols, strict=True)]
        write_10x_h5(
            folder / "filtered_feature_bc_matrix.h5", rng.poisson(2.0, (side * side, 3)), barcodes, list("ABC")
        )
        pd.DataFrame(
            {
                "barcode": barcodes,
                "in_tissue": 1,
                "array_row": rows,
                "array_col": cols,
                "pxl_row_in_fullres": (rows + 0.5) * px,
                "pxl_col_in_fullres": (cols + 0.5) * px,
            }
        ).to_parquet(folder / "spatial" / "tissue_positions.parquet")
        bins = scale | {"bin_size_um": float(size), "spot_diameter_fullres": px}
        (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(bins))
    return root


def test_visium_hd_complete_layout_reads(hd_folder):
    sdata = _quiet(read_visium_hd, hd_folder, load_segmentations_only=False)
    assert sorted(sdata.tables) == ["square_008um", "square_016um"]
    assert sdata.tables["square_008um"].n_obs == 625
    assert um_per_px(sdata, "he") == pytest.approx(5.0, rel=1e-9)  # 0.5 µm per full-res px / hires scale 0.1


def test_visium_hd_image_file_is_relative_to_the_folder(hd_folder):
    _write_image(hd_folder / "he_full.png", (400, 400))
    sdata = _quiet(read_visium_hd, hd_folder, image_file="he_full.png", load_segmentations_only=False)
    assert sdata.images["he"]["scale0"].sizes["x"] == 400
    assert um_per_px(sdata, "he") == pytest.approx(0.5, rel=1e-9)


HD_FEATURE_SLICE = "feature_slice.h5 or <dataset_id>_feature_slice.h5: the feature slice file with the HD layout"
HD_BINS = (
    "binned_outputs/square_<NNN>um/: the binned outputs (at least one bin size, e.g. binned_outputs/square_008um/)"
)
HD_IMAGE = (
    "an H&E image: spatial/tissue_hires_image.png, spatial/tissue_lowres_image.png, or the full-resolution image as "
    "`image_file=`"
)


def test_visium_hd_empty_folder_lists_every_missing_piece(tmp_path):
    (tmp_path / "outs").mkdir()
    with pytest.raises(InputError, match="is not a complete Space Ranger 3.0\\+ Visium HD `outs` folder") as info:
        read_visium_hd(tmp_path / "outs")
    assert _problems(info) == [
        HD_FEATURE_SLICE,
        "spatial/scalefactors_json.json: the scale factors of the hires and lowres images",
        HD_BINS,
        HD_IMAGE,
    ]


@pytest.mark.parametrize(
    ("removed", "problem"),
    [
        ("feature_slice.h5", HD_FEATURE_SLICE),
        ("binned_outputs", HD_BINS),
        (
            "binned_outputs/square_008um/filtered_feature_bc_matrix.h5",
            "binned_outputs/square_008um/filtered_feature_bc_matrix.h5: the bins' counts matrix",
        ),
        (
            "binned_outputs/square_016um/spatial/tissue_positions.parquet",
            "binned_outputs/square_016um/spatial/tissue_positions.parquet: the bins' positions",
        ),
        (
            "binned_outputs/square_008um/spatial/scalefactors_json.json",
            "binned_outputs/square_008um/spatial/scalefactors_json.json: the bins' scale factors (bin size in µm and "
            "in pixels)",
        ),
        ("spatial/tissue_hires_image.png+spatial/tissue_lowres_image.png", HD_IMAGE),
    ],
)
def test_visium_hd_names_the_missing_piece(hd_folder, removed, problem):
    for name in removed.split("+"):
        path = hd_folder / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(InputError) as info:
        read_visium_hd(hd_folder, load_segmentations_only=False)
    assert _problems(info) == [problem]


def test_visium_hd_names_inconsistent_or_malformed_bins(hd_folder):
    bins = hd_folder / "binned_outputs" / "square_008um" / "spatial"
    scale = json.loads((bins / "scalefactors_json.json").read_text())
    (bins / "scalefactors_json.json").write_text(json.dumps(scale | {"bin_size_um": 16.0}))
    pd.read_parquet(bins / "tissue_positions.parquet").iloc[:, ::-1].to_parquet(bins / "tissue_positions.parquet")
    with pytest.raises(InputError) as info:
        read_visium_hd(hd_folder, load_segmentations_only=False, bin_size=[8, 32])
    problems = _problems(info)
    assert problems[0] == (
        "binned_outputs/square_032um/: the bin size asked for by bin_size=[8, 32] (present: ['square_008um', "
        "'square_016um'])"
    )
    assert problems[1].startswith("binned_outputs/square_008um/spatial/tissue_positions.parquet: the bins' positions")
    assert (
        "['pxl_col_in_fullres', 'pxl_row_in_fullres', 'array_col', 'array_row', 'in_tissue', 'barcode']" in problems[1]
    )
    assert problems[2] == (
        "binned_outputs/square_008um/spatial/scalefactors_json.json: the bins' scale factors must give bin_size_um = 8 "
        "(the folder's bin size) and microns_per_pixel = bin_size_um / spot_diameter_fullres; they give "
        "{'bin_size_um': 16.0, 'spot_diameter_fullres': 16.0, 'microns_per_pixel': 0.5}"
    )
    assert len(problems) == 3


# --------------------------------------------------------------------------- Xenium

XENIUM_FILES = (
    "experiment.xenium",
    "cells.zarr.zip",
    "cell_feature_matrix.h5",
    "cells.parquet",
    "cell_boundaries.parquet",
    "nucleus_boundaries.parquet",
    "transcripts.parquet",
    "morphology_focus.ome.tif",
    "sample_he_image.ome.tif",
    "sample_he_imagealignment.csv",
)


@pytest.fixture
def xenium_folder(tmp_path):
    """Every file spatialdata-io's xenium reader opens by default, as non-empty placeholders (the check reads names,
    HDF5 signatures and JSON, not the content)."""
    root = tmp_path / "xenium"
    root.mkdir()
    for name in XENIUM_FILES:
        (root / name).write_bytes(b"placeholder")
    (root / "experiment.xenium").write_text(json.dumps({"analysis_sw_version": "xenium-1.9.0"}))
    with h5py.File(root / "cell_feature_matrix.h5", "w"):
        pass
    return root


def _check_xenium(folder, **kwargs):
    import spatialdata_io

    from stpredict.io._tenx_layout import check_xenium_layout, reader_options

    check_xenium_layout(folder, options=reader_options(spatialdata_io.xenium, kwargs), source_image_key="he_image")


def test_xenium_complete_layout_passes_the_check(xenium_folder):
    _check_xenium(xenium_folder)


def test_xenium_empty_folder_lists_every_missing_file(tmp_path):
    (tmp_path / "xenium").mkdir()
    with pytest.raises(InputError, match="is not a complete Xenium Onboard Analysis output folder") as info:
        read_xenium(tmp_path / "xenium")
    assert [p.split(":")[0] for p in _problems(info)] == [
        "experiment.xenium",
        "cells.zarr.zip",
        "cell_feature_matrix.h5",
        "cells.parquet",
        "cell_boundaries.parquet",
        "nucleus_boundaries.parquet",
        "transcripts.parquet",
        "morphology_focus/ (XOA 2.0+) or morphology_focus.ome.tif (1.x)",
        "*he_image.ome.tif",
    ]


@pytest.mark.parametrize("removed", [n for n in XENIUM_FILES if n != "morphology_focus.ome.tif"])
def test_xenium_names_the_missing_file(xenium_folder, removed):
    (xenium_folder / removed).unlink()
    with pytest.raises(InputError) as info:
        read_xenium(xenium_folder)
    (problem,) = _problems(info)
    assert problem.split(":")[0] == ("*he_image.ome.tif" if removed == "sample_he_image.ome.tif" else removed)


def test_xenium_checks_follow_the_options(xenium_folder):
    for name in ("transcripts.parquet", "cell_boundaries.parquet"):
        (xenium_folder / name).unlink()
    with pytest.raises(InputError) as info:
        read_xenium(xenium_folder)
    assert _problems(info) == [
        "cell_boundaries.parquet: the cell boundaries (or pass `cells_boundaries=False`)",
        "transcripts.parquet: the transcripts (or pass `transcripts=False`)",
    ]
    _check_xenium(xenium_folder, transcripts=False, cells_boundaries=False)


def test_xenium_names_an_unreadable_specification(xenium_folder):
    (xenium_folder / "experiment.xenium").write_text("{not json")
    with pytest.raises(InputError) as info:
        read_xenium(xenium_folder)
    assert _problems(info) == [
        "experiment.xenium: the run specification, is not readable JSON (Expecting property name enclosed in double "
        "quotes: line 1 column 2 (char 1))"
    ]
