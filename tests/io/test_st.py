from __future__ import annotations

import gzip
import json
import logging
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import sparse

from stpredict._geometry import affine_between, scale_levels, to_um_affine, um_per_px
from stpredict.errors import InputError
from stpredict.io import read_st
from stpredict.io._image import decode_image
from stpredict.io._st import mask_unspotted_border_regions

if TYPE_CHECKING:
    from pathlib import Path

# --------------------------------------------------------------------------- real data (read once per module)


@pytest.fixture(scope="module")
def her2st(data_dir):
    return data_dir / "her2st"


@pytest.fixture(scope="module")
def a1(her2st):
    return read_st(her2st / "A1")


@pytest.fixture(scope="module")
def c2_and_warnings(her2st):
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sdata = read_st(her2st / "C2")
    return sdata, caught, before


def _spot_colours(sdata, level=0):
    """RGB at the spot centres, sampled from the dask image without loading it whole."""
    image = scale_levels(sdata.images["he"])[level].data  # (c, y, x)
    xy = sdata.tables["table"].obsm["spatial"].astype(int)
    return np.stack([image[c].vindex[xy[:, 1], xy[:, 0]].compute() for c in range(3)], axis=1)


def test_a1_layout(a1, her2st):
    meta = json.loads((her2st / "A1" / "meta.json").read_text())
    image = a1.images["he"]
    levels = scale_levels(image)
    assert levels[0].dtype == np.uint8
    assert list(levels[0].coords["c"].values) == ["r", "g", "b"]
    assert levels[0].shape == (3, meta["image_size_wh"][1], meta["image_size_wh"][0])
    assert len(levels) >= 2
    assert max(levels[-1].shape[1:]) <= 1024
    assert levels[0].data.chunksize[1:] == (1024, 1024)

    table = a1.tables["table"]
    assert table.shape == (346, 15045)  # 348 selected spots, 2 without counts
    assert sparse.isspmatrix_csr(table.X)
    assert table.X.dtype == np.float32
    assert np.all(table.X.data == np.round(table.X.data))
    counts = pd.read_csv(her2st / "A1" / "counts.tsv.gz", sep="\t", index_col=0)
    np.testing.assert_array_equal(table.X.toarray(), counts.loc[table.obs["spot_id"]].to_numpy())
    assert list(table.var_names) == list(counts.columns)
    assert set(table.obs.columns) >= {
        "spot_id",
        "array_row",
        "array_col",
        "section",
        "patient",
        "region",
        "instance_id",
    }
    spots = pd.read_csv(her2st / "A1" / "spots.tsv", sep="\t").set_index("spot_id").loc[table.obs["spot_id"]]
    np.testing.assert_array_equal(table.obs["array_row"], spots["y"])
    np.testing.assert_array_equal(table.obs["array_col"], spots["x"])
    np.testing.assert_allclose(table.obsm["spatial"], spots[["img_x", "img_y"]].to_numpy())
    assert (table.obs["section"] == "A1").all()
    assert (table.obs["patient"] == "A").all()
    assert table.obs_names[0] == f"A1_{table.obs['spot_id'].iloc[0]}"
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["region_key"], attrs["instance_key"]) == ("spots", "region", "instance_id")

    circles = a1.shapes["spots"]
    np.testing.assert_array_equal(circles.index.to_numpy(), table.obs["instance_id"].to_numpy())
    np.testing.assert_array_equal(circles.index.to_numpy(), np.arange(len(table)))
    np.testing.assert_allclose(np.column_stack([circles.geometry.x, circles.geometry.y]), table.obsm["spatial"])
    np.testing.assert_allclose(circles["radius"], 100.0 / 2 / 3.19)


def test_a1_calibrated(a1):
    assert um_per_px(a1, "he") == pytest.approx(3.19)
    assert um_per_px(a1, "spots") == pytest.approx(3.19)
    np.testing.assert_allclose(affine_between(a1, "spots", "he"), np.eye(3))
    matrix = to_um_affine(a1, "spots")
    centre = a1.tables["table"].obsm["spatial"][0]
    np.testing.assert_allclose(matrix[:2, :2] @ centre + matrix[:2, 2], centre * 3.19)
    from spatialdata.transformations import get_transformation

    assert set(get_transformation(a1.images["he"], get_all=True)) == {"global", "um"}
    assert a1.images["he"].attrs["stpredict"]["um_per_px"] == pytest.approx(3.19)


def test_a1_rescaled_coordinates_land_on_tissue(a1, her2st, tmp_path):
    # A1 is a 2000-px render with a black background: spots must sit on tissue, not on the black mask
    colours = _spot_colours(a1)
    assert np.mean(colours.sum(axis=1) > 60) > 0.95
    image = scale_levels(a1.images["he"])[-1].values
    assert np.mean(image.astype(int).sum(axis=0) < 30) > 0.2  # the black background is there
    # The full-resolution pixel_x/pixel_y do not fit the render: without img_x/img_y the reader refuses
    folder = _copy_section(her2st / "A1", tmp_path / "A1")
    spots = pd.read_csv(folder / "spots.tsv", sep="\t").drop(columns=["img_x", "img_y"])
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="outside the image"):
        read_st(folder)


def test_a1_inset_is_masked(a1, her2st):
    image = scale_levels(a1.images["he"])[0].values
    assert image[:, :530, 1500:].max() == 0  # the annotated thumbnail in the top-right corner is gone
    assert a1.images["he"].attrs["stpredict"]["masked_regions_xyxy"] == [[1496, 0, 2000, 540]]
    raw = decode_image(her2st / "A1" / "image.png")
    np.testing.assert_array_equal(image[:, 560:, :1490], raw[560:, :1490].transpose(2, 0, 1))  # tissue untouched
    assert raw[:530, 1500:].max() > 200


def test_c2_whole_slide(c2_and_warnings, her2st):
    sdata, caught, before = c2_and_warnings
    assert before == Image.MAX_IMAGE_PIXELS  # no global side effect
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    levels = scale_levels(sdata.images["he"])
    assert levels[0].shape == (3, 9911, 9274)
    assert [lv.shape[1] for lv in levels] == [9911, 4955, 2477, 1238, 619]
    assert um_per_px(sdata, "he") == pytest.approx(0.6881)
    meta = json.loads((her2st / "C2" / "meta.json").read_text())
    np.testing.assert_allclose(2 * sdata.shapes["spots"]["radius"], meta["spot_diameter_px"], rtol=2e-3)
    assert (sdata.tables["table"].obs["patient"] == "C").all()
    # full-resolution pixels match the coarsest level's 16x block mean (pyramid computed once, same values)
    full = levels[0].data[:, :32, :32].compute().astype(np.float64)
    coarse = levels[-1].data[:, :2, :2].compute()
    trim_y, trim_x = 9911 % 16, 9274 % 16
    expected = levels[0].data[:, trim_y : trim_y + 32, trim_x : trim_x + 32].compute().astype(np.float64)
    expected = expected.reshape(3, 2, 16, 2, 16).mean(axis=(2, 4))
    assert full.shape == (3, 32, 32)
    assert np.abs(coarse.astype(np.float64) - expected).max() <= 4  # repeated halving truncates at each step
    colours = _spot_colours(sdata)
    assert np.mean(colours.mean(axis=1) < 235) > 0.9  # spots on stained tissue, not white glass


def test_gene_sets_differ_between_sections(a1, c2_and_warnings):
    c2 = c2_and_warnings[0]
    genes_a1, genes_c2 = set(a1.tables["table"].var_names), set(c2.tables["table"].var_names)
    assert genes_a1 != genes_c2
    assert len(genes_a1 & genes_c2) > 13000


def test_mob_needs_spot_diameter(data_dir):
    with pytest.raises(InputError, match=r"spot_diameter_um="):
        read_st(data_dir / "stutility_mob" / "MOB1")


def test_mob_selected_pixel_coordinates_and_symbols(data_dir):
    folder = data_dir / "stutility_mob" / "MOB1"
    sdata = read_st(folder, spot_diameter_um=100.0, gene_symbols=data_dir / "stutility_mob" / "mouse_genes.tsv.gz")
    table = sdata.tables["table"]
    spots = pd.read_csv(folder / "spots.tsv", sep="\t")
    selected = spots[spots["selected"] == 1].set_index("spot_id")
    assert len(table) == len(selected) == 379
    np.testing.assert_allclose(table.obsm["spatial"], selected.loc[table.obs["spot_id"], ["pixel_x", "pixel_y"]])
    assert table.obs["patient"].isna().all()  # "MOB1" is not a her2st-like name
    assert um_per_px(sdata, "he") == pytest.approx(4.445)
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 50.0 / 4.445)
    symbols = pd.read_csv(data_dir / "stutility_mob" / "mouse_genes.tsv.gz", sep="\t").set_index("gene_id")
    assert table.var["gene_ids"].iloc[0].startswith("ENSMUSG")
    np.testing.assert_array_equal(table.var_names, symbols.loc[table.var["gene_ids"], "gene_name"].to_numpy())


def test_explicit_arguments_override_meta(data_dir):
    sdata = read_st(
        data_dir / "stutility_mob" / "MOB2",
        um_per_px=5.0,
        spot_diameter_um=80.0,
        section="bulb",
        patient="mouse1",
        image_key="img",
        shapes_key="units",
        table_key="counts",
        scale_factors=[2, 2],
    )
    assert um_per_px(sdata, "img") == pytest.approx(5.0)
    np.testing.assert_allclose(sdata.shapes["units"]["radius"], 8.0)
    table = sdata.tables["counts"]
    assert (table.obs["section"] == "bulb").all()
    assert (table.obs["patient"] == "mouse1").all()
    assert table.uns["spatialdata_attrs"]["region"] == "units"
    assert len(scale_levels(sdata.images["img"])) == 3


# --------------------------------------------------------------------------- synthetic folders: bad input


def _copy_section(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for item in source.iterdir():
        (target / item.name).symlink_to(item)
    (target / "spots.tsv").unlink()
    (target / "spots.tsv").write_bytes((source / "spots.tsv").read_bytes())
    return target


def _write_section(
    folder: Path,
    *,
    n: int = 6,
    genes: list[str] | None = None,
    counts: np.ndarray | None = None,
    image_size: tuple[int, int] = (80, 60),  # (width, height)
    xy: np.ndarray | None = None,
    meta: dict | None = None,
    image_suffix: str = ".png",
) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    genes = genes if genes is not None else ["G1", "G2", "G3"]
    width, height = image_size
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"image{image_suffix}")
    array_x, array_y = np.arange(n) + 2, np.full(n, 5)
    if xy is None:
        xy = np.column_stack([np.linspace(5, width - 5, n), np.linspace(5, height - 5, n)])
    spot_ids = [f"{x}x{y}" for x, y in zip(array_x, array_y, strict=True)]
    pd.DataFrame(
        {"x": array_x, "y": array_y, "img_x": xy[:, 0], "img_y": xy[:, 1], "selected": 1, "spot_id": spot_ids}
    ).to_csv(folder / "spots.tsv", sep="\t", index=False)
    values = counts if counts is not None else rng.integers(0, 20, (n, len(genes)))
    lines = ["\t" + "\t".join(genes)]
    lines += [sid + "\t" + "\t".join(str(v) for v in row) for sid, row in zip(spot_ids, values, strict=True)]
    with gzip.open(folder / "counts.tsv.gz", "wt") as handle:
        handle.write("\n".join(lines) + "\n")
    meta = meta if meta is not None else {"um_per_px": 2.0, "spot_diameter_um": 100.0}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_synthetic_section_reads(tmp_path):
    folder = _write_section(tmp_path / "B7")
    sdata = read_st(folder)
    table = sdata.tables["table"]
    assert table.shape == (6, 3)
    assert (table.obs["patient"] == "B").all()
    np.testing.assert_allclose(sdata.shapes["spots"]["radius"], 25.0)
    expected = np.asarray(Image.open(folder / "image.png")).transpose(2, 0, 1)
    np.testing.assert_array_equal(scale_levels(sdata.images["he"])[0].values, expected)


def test_spots_without_counts_are_dropped_and_logged(tmp_path, caplog):
    folder = _write_section(tmp_path / "S1")
    path = folder / "counts.tsv.gz"
    with gzip.open(path, "rt") as handle:
        lines = handle.read().splitlines()
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(lines[:3] + lines[4:]) + "\n")  # the third spot loses its row
    with caplog.at_level(logging.WARNING, logger="stpredict"):
        sdata = read_st(folder)
    table = sdata.tables["table"]
    assert len(table) == 5
    assert "4x5" not in set(table.obs["spot_id"])
    np.testing.assert_array_equal(sdata.shapes["spots"].index, np.arange(5))
    assert any("1 of 6" in r.getMessage() and "dropped" in r.getMessage() for r in caplog.records)


def test_zarr_round_trip(tmp_path):
    from spatialdata import read_zarr

    sdata = read_st(_write_section(tmp_path / "section", image_size=(200, 150)))
    sdata.write(tmp_path / "s.zarr")
    back = read_zarr(tmp_path / "s.zarr")
    assert um_per_px(back, "he") == pytest.approx(2.0)
    assert um_per_px(back, "spots") == pytest.approx(2.0)
    np.testing.assert_array_equal(back.tables["table"].X.toarray(), sdata.tables["table"].X.toarray())
    assert back.tables["table"].obs["patient"].isna().all()  # "section" is not a her2st-like name
    np.testing.assert_array_equal(scale_levels(back.images["he"])[1].values, scale_levels(sdata.images["he"])[1].values)
    assert back.attrs["stpredict"]["elements"]["he"]["um_per_px"] == pytest.approx(2.0)


def _blobs(background: int) -> np.ndarray:
    image = np.full((120, 160, 3), background, dtype=np.uint8)
    image[40:80, 20:70] = 150  # tissue with spots
    image[0:30, 120:160] = 180  # spot-free inset touching the border
    image[90:110, 100:130] = 170  # spot-free fragment inside the image
    return image


def test_mask_unspotted_border_regions():
    xy = np.array([[30.0, 50.0], [60.0, 70.0]])
    image = _blobs(0)
    boxes = mask_unspotted_border_regions(image, xy, radius_px=3.0)
    assert boxes == [[119, 0, 160, 31]]  # the region, grown by one (black) pixel
    assert image[0:30, 120:160].max() == 0
    np.testing.assert_array_equal(image[40:80, 20:70], 150)
    np.testing.assert_array_equal(image[90:110, 100:130], 170)  # not at the border: kept
    bright = _blobs(240)
    assert mask_unspotted_border_regions(bright, xy, radius_px=3.0) == []
    np.testing.assert_array_equal(bright, _blobs(240))


def test_mask_inset_option(tmp_path):
    folder = _write_section(tmp_path / "S1", image_size=(160, 120))
    Image.fromarray(_blobs(0)).save(folder / "image.png")
    spots = pd.read_csv(folder / "spots.tsv", sep="\t")
    spots["img_x"], spots["img_y"] = np.linspace(25, 65, 6), np.linspace(45, 75, 6)
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    masked = scale_levels(read_st(folder).images["he"])[0].values
    kept = scale_levels(read_st(folder, mask_inset=False).images["he"])[0].values
    assert masked[:, 0:30, 120:160].max() == 0
    assert (kept[:, 0:30, 120:160] == 180).all()
    np.testing.assert_array_equal(masked[:, 40:, :], kept[:, 40:, :])


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_truncated_image(tmp_path, suffix):
    folder = _write_section(tmp_path / "S1", image_size=(300, 200), image_suffix=suffix)
    image = folder / f"image{suffix}"
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="unreadable or truncated"):
        read_st(folder)


def test_unreadable_image(tmp_path):
    folder = _write_section(tmp_path / "S1")
    (folder / "image.png").write_bytes(b"this is not an image")
    with pytest.raises(InputError, match="cannot be decoded"):
        read_st(folder)


def test_pil_path_scopes_the_pixel_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    path = tmp_path / "big.tif"
    Image.fromarray(np.full((60, 70, 4), 200, dtype=np.uint8)).save(path)  # 4200 px > 2 × limit, RGBA
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    array = decode_image(path)
    assert array.shape == (60, 70, 3)
    assert (array == 200).all()
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_spots_outside_image(tmp_path):
    xy = np.array([[5.0, 5.0], [10, 10], [200.0, 10.0], [20, 20], [30, 30], [40, 40]])
    folder = _write_section(tmp_path / "S1", xy=xy)
    with pytest.raises(InputError, match=r"1 of 6 spots lie outside the image \(80 × 60 px\)"):
        read_st(folder)


def test_nan_spot_coordinates(tmp_path):
    xy = np.array([[5.0, 5.0], [np.nan, 10], [20, 10.0], [20, 20], [30, 30], [40, 40]])
    with pytest.raises(InputError, match="NaN"):
        read_st(_write_section(tmp_path / "S1", xy=xy))


@pytest.mark.parametrize(
    ("value", "match"),
    [("1.5", "non-integer"), ("-2", "negative"), ("nan", "NaN"), ("abc", "non-numeric")],
)
def test_bad_counts(tmp_path, value, match):
    counts = np.arange(18).reshape(6, 3).astype(str).astype(object)
    counts[2, 1] = value
    with pytest.raises(InputError, match=match):
        read_st(_write_section(tmp_path / "S1", counts=counts))


@pytest.mark.parametrize(
    ("genes", "match"), [(["G1", "", "G3"], "missing or empty"), (["G1", "G2", "G1"], "duplicated")]
)
def test_bad_gene_names(tmp_path, genes, match):
    with pytest.raises(InputError, match=match):
        read_st(_write_section(tmp_path / "S1", genes=genes))


@pytest.mark.parametrize(
    ("name", "listed"),
    [
        ("image.png", "image (image.png or image.jpg or image.jpeg or image.tif or image.tiff)"),
        ("spots.tsv", "spot table (spots.tsv)"),
        ("counts.tsv.gz", "counts table (counts.tsv.gz or counts.tsv)"),
    ],
)
def test_missing_files(tmp_path, name, listed):
    folder = _write_section(tmp_path / "S1")
    (folder / name).unlink()
    with pytest.raises(InputError, match=r"lacks: ([^;]*)\. Found") as info:
        read_st(folder)
    assert info.value.args[0].split("lacks: ")[1].split(". Found")[0] == listed


def test_empty_folder_lists_every_missing_file(tmp_path):
    (tmp_path / "S1").mkdir()
    with pytest.raises(InputError) as info:
        read_st(tmp_path / "S1")
    message = info.value.args[0]
    assert (
        "lacks: image (image.png or image.jpg or image.jpeg or image.tif or image.tiff); spot table (spots.tsv); "
        "counts table (counts.tsv.gz or counts.tsv). Found []." in message
    )
    assert "`image_file=`" in message


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        read_st(tmp_path / "nope")


def test_empty_spot_table(tmp_path):
    folder = _write_section(tmp_path / "S1")
    header = (folder / "spots.tsv").read_text().splitlines()[0]
    (folder / "spots.tsv").write_text(header + "\n")
    with pytest.raises(InputError, match="no \\(selected\\) spots"):
        read_st(folder)
    spots = pd.read_csv(_write_section(tmp_path / "S2") / "spots.tsv", sep="\t").assign(selected=0)
    spots.to_csv(tmp_path / "S2" / "spots.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="no \\(selected\\) spots"):
        read_st(tmp_path / "S2")


def test_no_spot_has_counts(tmp_path):
    folder = _write_section(tmp_path / "S1")
    spots = pd.read_csv(folder / "spots.tsv", sep="\t")
    spots["spot_id"] = "other_" + spots["spot_id"]
    spots.to_csv(folder / "spots.tsv", sep="\t", index=False)
    with pytest.raises(InputError, match="same section"):
        read_st(folder)


def test_scale_required(tmp_path):
    folder = _write_section(tmp_path / "S1", meta={"spot_diameter_um": 100.0})
    with pytest.raises(InputError, match="um_per_px="):
        read_st(folder)
    sdata = read_st(folder, um_per_px=1.0)
    assert um_per_px(sdata, "he") == 1.0
    with pytest.raises(InputError, match="positive"):
        read_st(folder, um_per_px=-1.0)
    (folder / "meta.json").unlink()
    with pytest.raises(InputError, match="spot_diameter_um="):
        read_st(folder, um_per_px=1.0)
    assert len(read_st(folder, um_per_px=1.0, spot_diameter_um=55.0).tables["table"]) == 6


def test_bad_meta_json(tmp_path):
    folder = _write_section(tmp_path / "S1")
    (folder / "meta.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        read_st(folder)
