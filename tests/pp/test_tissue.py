from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from spatialdata import SpatialData
from spatialdata.models import Image2DModel

import stpredict as st
from stpredict._geometry import affine_between, raster_shape, um_per_px
from stpredict._meta import get_element_meta
from stpredict.errors import CalibrationError, InputError

PINK = np.array([220, 140, 190], dtype=np.float64)
WHITE = np.array([245, 245, 245], dtype=np.float64)
BLACK = np.array([0, 0, 0], dtype=np.float64)


def blob_image(n: int = 2000, background: np.ndarray = WHITE, *, hole: bool = False, dot: bool = False) -> tuple:
    """A pink disk (radius n/4) on a plain background with noise; optional white hole and a tiny pink dot."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:n, :n]
    disk = (yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n / 4) ** 2
    rgb = np.broadcast_to(background, (n, n, 3)).copy()
    rgb[disk] = PINK
    if hole:
        rgb[(yy - n / 2) ** 2 + (xx - n / 2) ** 2 < (n / 16) ** 2] = WHITE
    if dot:
        rgb[(yy - n / 10) ** 2 + (xx - n / 10) ** 2 < 20**2] = PINK
    rgb += rng.normal(0, 4, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8).transpose(2, 0, 1), disk


def make_sdata(rgb: np.ndarray, um: float | None = 1.0, scale_factors: list[int] | None = None) -> SpatialData:
    image = Image2DModel.parse(rgb, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=scale_factors)
    sdata = SpatialData(images={"he": image})
    if um is not None:
        st.pp.calibrate(sdata, "he", um_per_px=um)
    return sdata


def upsample(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    return np.kron(mask, np.ones((factor, factor), dtype=mask.dtype))[: shape[0], : shape[1]]


@pytest.mark.parametrize("background", [WHITE, BLACK], ids=["white", "black"])
def test_blob_on_plain_background(background):
    rgb, disk = blob_image(n=1024, background=background)
    sdata = make_sdata(rgb, scale_factors=[2, 2, 2])
    st.pp.tissue_mask(sdata, "he")
    mask = sdata.labels["he_tissue"]
    assert mask.dtype == np.uint8
    # pyramid levels at 1, 2, 4, 8 µm/px: the 8 µm level is used as is
    assert mask.shape == (128, 128)
    assert um_per_px(sdata, "he_tissue") == pytest.approx(8.0)
    np.testing.assert_allclose(affine_between(sdata, "he_tissue", "he"), np.diag([8.0, 8.0, 1.0]))
    full = upsample(np.asarray(mask), 8, disk.shape).astype(bool)
    iou = (full & disk).sum() / (full | disk).sum()
    assert iou > 0.97
    meta = get_element_meta(sdata, "he_tissue")
    assert meta["image_key"] == "he"
    assert meta["downsample"] == [8.0, 8.0]
    assert meta["tissue_fraction"] == pytest.approx(np.asarray(mask).mean())


def test_single_scale_image_is_block_averaged_and_fast():
    rgb, disk = blob_image(n=2000)
    sdata = make_sdata(rgb, um=0.5)
    st.pp.tissue_mask(sdata, "he", key_added="warmup")  # imports scipy/skimage once
    start = time.perf_counter()
    st.pp.tissue_mask(sdata, "he", target_um_per_px=8.0)
    elapsed = time.perf_counter() - start
    mask = np.asarray(sdata.labels["he_tissue"])
    # 0.5 µm/px, target 8 µm: blocks of 16 px
    assert mask.shape == (125, 125)
    assert um_per_px(sdata, "he_tissue") == pytest.approx(8.0)
    iou = (upsample(mask, 16, disk.shape).astype(bool) & disk).sum() / disk.sum()
    assert iou > 0.97
    assert elapsed < 3.0  # measured ≈ 0.06 s (her2st A1, 2000 × 2138 px: ≈ 0.35 s)


def test_holes_filled_and_small_objects_removed():
    rgb, disk = blob_image(n=800, hole=True, dot=True)
    sdata = make_sdata(rgb, um=1.0)
    st.pp.tissue_mask(sdata, "he", target_um_per_px=4.0, min_area_um2=2_000.0)
    mask = np.asarray(sdata.labels["he_tissue"]).astype(bool)
    assert mask.shape == (200, 200)
    assert mask[100, 100]  # centre of the white hole is filled
    assert not mask[20, 20]  # the 1,257 µm² dot is dropped
    keep = st.pp.tissue_mask(sdata, "he", target_um_per_px=4.0, min_area_um2=0.0, inplace=False)
    assert np.asarray(keep)[20, 20] == 1


def test_inplace_false_returns_element_without_writing():
    rgb, _ = blob_image(n=400)
    sdata = make_sdata(rgb)
    out = st.pp.tissue_mask(sdata, "he", target_um_per_px=4.0, inplace=False)
    assert "he_tissue" not in sdata.labels
    assert out.attrs["stpredict"]["method"] == "otsu"
    assert out.shape == (100, 100)


def test_fixed_threshold():
    rgb, disk = blob_image(n=400)
    sdata = make_sdata(rgb)
    st.pp.tissue_mask(sdata, "he", target_um_per_px=4.0, method="fixed", threshold=0.2)
    assert get_element_meta(sdata, "he_tissue")["threshold"] == 0.2
    assert np.asarray(sdata.labels["he_tissue"]).mean() == pytest.approx(disk.mean(), abs=0.02)


@pytest.mark.parametrize("background", [WHITE, BLACK], ids=["white", "black"])
def test_empty_tissue_raises_and_writes_nothing(background):
    rgb = np.broadcast_to(background.astype(np.uint8)[:, None, None], (3, 300, 300)).copy()
    sdata = make_sdata(rgb)
    with pytest.raises(InputError, match="No tissue found.*lower the threshold"):
        st.pp.tissue_mask(sdata, "he")
    assert len(sdata.labels) == 0


def test_uncalibrated_image_raises():
    rgb, _ = blob_image(n=200)
    sdata = make_sdata(rgb, um=None)
    with pytest.raises(CalibrationError, match=r"st\.pp\.calibrate"):
        st.pp.tissue_mask(sdata, "he")
    assert len(sdata.labels) == 0


def test_her2st_black_masked_render(data_dir):
    from PIL import Image

    section = data_dir / "her2st" / "A1"
    rgb = np.asarray(Image.open(section / "image.png").convert("RGB")).transpose(2, 0, 1)
    sdata = make_sdata(rgb, um=3.19)
    st.pp.tissue_mask(sdata, "he")
    mask = np.asarray(sdata.labels["he_tissue"])
    ny, nx = raster_shape(sdata.images["he"])
    # 3.19 µm/px, target 8 µm: blocks of 2 px
    assert mask.shape == ((ny + 1) // 2, nx // 2)
    assert 0.25 < mask.mean() < 0.45
    assert mask[-20:, :].sum() == 0  # black margin at the bottom
    assert mask[:, :10].sum() == 0  # and at the left
    spots = pd.read_csv(section / "spots.tsv", sep="\t")
    rows = (spots["img_y"].to_numpy() / 2).astype(int)
    cols = (spots["img_x"].to_numpy() / 2).astype(int)
    assert mask[rows, cols].mean() > 0.95  # measured spots lie on tissue
