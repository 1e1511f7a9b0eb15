from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
from scipy import ndimage

import stpredict as st
from stpredict._geometry import set_um_per_px, um_per_px
from stpredict._meta import get_element_meta
from stpredict.errors import CalibrationError, InputError
from stpredict.tl import _dense_plan
from stpredict.tl import _predict_dense as pdm
from stpredict.tl._tiling import resample_matrix

GENES = ["g0", "g1", "g2"]
MIX = np.array([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [-0.5, 1.0, 0.25]])


def _colour_map(rgb: np.ndarray, radius: int, stride: int) -> np.ndarray:
    """Genes = linear mixes of box-blurred colour, block-averaged by ``stride``; zero padding outside."""
    x = rgb.astype(np.float64) / 255
    blurred = np.stack([ndimage.uniform_filter(c, size=2 * radius + 1, mode="constant") for c in x])
    genes = np.einsum("gc,cyx->gyx", MIX, blurred)
    g, h, w = genes.shape
    return genes.reshape(g, h // stride, stride, w // stride, stride).mean(axis=(2, 4))


class ColourModel:
    """Output depends only on the image around each pixel (within ``context``): stitching must be exact."""

    name = "colour"
    value_kind = "intensive"

    def __init__(self, *, tile_size=32, stride=2, context=4, um=1.0, fail_after=None, tile_bias=0.0):
        self.var_names = list(GENES)
        self.tile_size, self.output_stride, self.context, self.um_per_px = tile_size, stride, context, um
        self.fail_after, self.tile_bias = fail_after, tile_bias
        self.calls = 0
        self.tiles = 0

    def state_dict(self):  # what identifies the model's map to a resumed run
        return {"mix": MIX, "tile_bias": np.float64(self.tile_bias)}

    def predict_tiles(self, tiles, *, device="auto"):
        assert tiles.dtype == np.uint8
        assert tiles.shape[1:] == (3, self.tile_size, self.tile_size)
        if self.fail_after is not None and self.calls >= self.fail_after:
            msg = "simulated interruption"
            raise KeyboardInterrupt(msg)
        self.calls += 1
        self.tiles += len(tiles)
        out = np.stack([_colour_map(t, self.context, self.output_stride) for t in tiles])
        if self.tile_bias:  # depends on the position inside the tile: seams unless blended
            n = self.tile_size // self.output_stride
            out = out + self.tile_bias * (np.arange(n) / n)[None, None, None, :]
        return out.astype(np.float32)


def _image(shape=(150, 200), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    noise = rng.random((3, *shape))
    smooth = np.stack([ndimage.gaussian_filter(c, 3) for c in noise])
    smooth = (smooth - smooth.min()) / np.ptp(smooth)
    return (40 + 200 * smooth).astype(np.uint8)


def _sdata(rgb, um=1.0, scale_factors=None, calibrate=True, channels=("r", "g", "b")):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    c_coords = None if channels is None else list(channels)
    img = Image2DModel.parse(rgb, dims=("c", "y", "x"), c_coords=c_coords, scale_factors=scale_factors)
    sdata = SpatialData(images={"he": img})
    if calibrate:
        set_um_per_px(sdata, "he", um)
    return sdata


def _map(sdata, key="he_colour") -> np.ndarray:
    return np.asarray(st._geometry.scale_levels(sdata.images[key])[0].data.compute())


@pytest.fixture(scope="module")
def rgb():
    return _image()


def test_stitched_map_equals_whole_image_reference(rgb):
    sdata = _sdata(rgb)
    model = ColourModel()
    st.tl.predict_dense(sdata, model, tissue_only=False, chunk_size=24, show_progress_bar=False)
    pred = _map(sdata)
    ref = _colour_map(rgb, model.context, model.output_stride)
    assert pred.shape == ref.shape == (3, 75, 100)
    b = model.context // model.output_stride + 1  # away from the slide border (zero vs white padding)
    np.testing.assert_allclose(pred[:, b:-b, b:-b], ref[:, b:-b, b:-b], atol=1e-5)
    el = st._geometry.scale_levels(sdata.images["he_colour"])[0]
    assert list(el.coords["c"].values) == GENES
    assert um_per_px(sdata, "he_colour") == pytest.approx(model.um_per_px * model.output_stride)
    meta = get_element_meta(sdata, "he_colour")
    assert meta["value_kind"] == "intensive"
    assert meta["model"] == "colour"
    assert meta["stride"] == 2.0
    assert "stpredict_version" in meta
    t = st._geometry.affine_between(sdata, "he_colour", "he")
    np.testing.assert_allclose(t, np.diag([2.0, 2.0, 1.0]))


def test_chunked_slide_gives_the_same_map_and_decodes_each_chunk_once(rgb):
    import dask.array as da
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    counts: dict = {}

    def block(block_info=None):
        (y0, y1), (x0, x1) = block_info[None]["array-location"][1:]
        counts[y0, x0] = counts.get((y0, x0), 0) + 1
        return rgb[:, y0:y1, x0:x1]

    lazy = da.map_blocks(block, dtype=np.uint8, chunks=da.core.normalize_chunks((3, 40, 40), rgb.shape))
    chunked = SpatialData(images={"he": Image2DModel.parse(lazy, dims=("c", "y", "x"), c_coords=["r", "g", "b"])})
    set_um_per_px(chunked, "he", 1.0)
    whole = _sdata(rgb)
    for sdata in (chunked, whole):  # units of 24 map px (48 slide px): each 40 px chunk row is under two units
        st.tl.predict_dense(sdata, ColourModel(), tissue_only=False, chunk_size=24, show_progress_bar=False)
    np.testing.assert_array_equal(_map(chunked), _map(whole))
    assert len(counts) == 4 * 5
    assert set(counts.values()) == {1}


def test_blending_window_removes_seams(rgb):
    flat = np.full_like(rgb, 128)
    model = ColourModel(tile_bias=1.0, context=2, stride=1)  # 32 map px per tile, bias 0 → 31/32 across it
    kwargs = {"tissue_only": False, "show_progress_bar": False}
    hard = _sdata(flat)
    st.tl.predict_dense(hard, model, overlap_um=4.0, **kwargs)  # overlap = 2 × context: no ramp
    soft = _sdata(flat)
    st.tl.predict_dense(soft, model, overlap_um=16.0, **kwargs)  # 12 px ramp, tile stride 16
    inner = (slice(None), slice(5, -5), slice(5, -5))
    step_hard = np.abs(np.diff(_map(hard)[inner], axis=2)).max()
    step_soft = np.abs(np.diff(_map(soft)[inner], axis=2)).max()
    curv_soft = np.abs(np.diff(_map(soft)[inner], n=2, axis=2)).max()
    assert step_hard > 0.45  # a seam: the bias drops by 16/32 at every tile border
    assert step_soft < 0.1  # blended: the 0.5 mismatch is spread smoothly over the 12 px ramp
    assert curv_soft < 0.03  # and without kinks
    assert np.abs(np.diff(_map(soft)[inner], axis=1)).max() < 1e-5  # the bias varies along x only


def test_resampled_slide_matches_resampled_reference(rgb):
    sdata = _sdata(rgb, um=0.4)  # model at 1.0 µm/px: read at full resolution, down-sample 2.5×
    model = ColourModel()
    st.tl.predict_dense(sdata, model, tissue_only=False, show_progress_bar=False)
    pred = _map(sdata)
    h, w = (np.array(rgb.shape[1:]) / 2.5).astype(int)
    wy, ly0, _ = resample_matrix(0, h, 2.5)
    wx, lx0, _ = resample_matrix(0, w, 2.5)
    assert ly0 == lx0 == 0
    resampled = np.stack([wy @ c.astype(np.float32) @ wx.T for c in rgb[:, : wy.shape[1], : wx.shape[1]]])
    resampled = np.clip(np.rint(resampled), 0, 255).astype(np.uint8)
    ref = _colour_map(resampled, model.context, model.output_stride)
    assert pred.shape[1:] == (30, 40)
    np.testing.assert_allclose(pred[:, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=1e-5)
    assert um_per_px(sdata, "he_colour") == pytest.approx(2.0)
    np.testing.assert_allclose(st._geometry.affine_between(sdata, "he_colour", "he")[0, 0], 5.0)


def test_pyramid_level_is_used(rgb):
    sdata = _sdata(rgb, um=0.5, scale_factors=[2])
    model = ColourModel()
    st.tl.predict_dense(sdata, model, tissue_only=False, show_progress_bar=False)
    level1 = np.asarray(st._geometry.scale_levels(sdata.images["he"])[1].data)
    assert level1.shape == (3, 75, 100)
    ref = _colour_map(level1[:, :74], 4, 2)
    pred = _map(sdata)
    assert pred.shape == (3, 38, 50)
    np.testing.assert_allclose(pred[:, 3:34, 3:-3], ref[:, 3:34, 3:-3], atol=1e-5)


def _tissue(sdata, half=True):
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale, Sequence, get_transformation

    mask = np.zeros((15, 20), dtype=np.uint8)  # 10 image px per mask px
    if half:
        mask[:, :8] = 1
    ts = get_transformation(sdata.images["he"], get_all=True)
    tr = {cs: Sequence([Scale([10.0, 10.0], axes=("x", "y")), t]) for cs, t in ts.items()}
    sdata.labels["he_tissue"] = Labels2DModel.parse(mask, dims=("y", "x"), transformations=tr)


def test_tissue_only_skips_background_tiles(rgb):
    full = _sdata(rgb)
    m_full = ColourModel()
    st.tl.predict_dense(full, m_full, tissue_only=False, batch_size=1, show_progress_bar=False)
    part = _sdata(rgb)
    _tissue(part)
    m_part = ColourModel()
    st.tl.predict_dense(part, m_part, batch_size=1, show_progress_bar=False)
    assert m_part.tiles < 0.7 * m_full.tiles
    a, b = _map(full), _map(part)
    # tissue: image x < 80 px = map x < 40 (stride 2); tiles reaching it run, the rest stays 0
    np.testing.assert_array_equal(b[:, :, 60:], 0)  # far from tissue: no tile
    np.testing.assert_allclose(b[:, :, :40], a[:, :, :40], atol=1e-6)  # inside tissue: the same map
    assert np.count_nonzero(b[:, :, 40:60]) > 0  # intensive: the model's values kept off the tissue in run tiles

    class Density(ColourModel):
        value_kind = "density"

    dens = _sdata(rgb)
    _tissue(dens)
    st.tl.predict_dense(dens, Density(), batch_size=1, show_progress_bar=False)
    c = _map(dens)
    np.testing.assert_array_equal(c[:, :, 40:], 0)  # a density is 0 off the tissue, also inside run tiles
    np.testing.assert_allclose(c[:, :, :40], a[:, :, :40], atol=1e-6)


def test_no_tissue_and_missing_mask(rgb):
    sdata = _sdata(rgb)
    _tissue(sdata, half=False)
    with pytest.raises(InputError, match="No tissue found"):
        st.tl.predict_dense(sdata, ColourModel(), show_progress_bar=False)
    with pytest.raises(KeyError, match="nope"):
        st.tl.predict_dense(sdata, ColourModel(), tissue_key="nope", show_progress_bar=False)
    assert "he_colour" not in sdata.images


def test_bad_inputs_leave_sdata_unchanged(rgb):
    sdata = _sdata(rgb, calibrate=False)
    with pytest.raises(CalibrationError, match="calibrate"):
        st.tl.predict_dense(sdata, ColourModel(), tissue_only=False, show_progress_bar=False)
    sdata = _sdata(rgb)
    with pytest.raises(InputError, match="does not predict"):
        st.tl.predict_dense(sdata, ColourModel(), genes=["g0", "XIST"], tissue_only=False)
    with pytest.raises(InputError, match="max_rescale"):
        st.tl.predict_dense(sdata, ColourModel(um=8.0), tissue_only=False)
    with pytest.raises(InputError, match="context"):
        st.tl.predict_dense(sdata, ColourModel(), overlap_um=2.0, tissue_only=False)
    with pytest.raises(InputError, match="DenseModel"):
        st.tl.predict_dense(sdata, object(), tissue_only=False)
    with pytest.raises(KeyError, match="available images"):
        st.tl.predict_dense(sdata, ColourModel(), image_key="hne")
    assert set(sdata.images) == {"he"}
    st.tl.predict_dense(sdata, ColourModel(), genes=["g2", "g0"], tissue_only=False, show_progress_bar=False)
    assert list(st._geometry.scale_levels(sdata.images["he_colour"])[0].coords["c"].values) == ["g2", "g0"]
    with pytest.raises(InputError, match="overwrite=True"):
        st.tl.predict_dense(sdata, ColourModel(), tissue_only=False, show_progress_bar=False)
    st.tl.predict_dense(sdata, ColourModel(), tissue_only=False, overwrite=True, show_progress_bar=False)
    assert list(st._geometry.scale_levels(sdata.images["he_colour"])[0].coords["c"].values) == GENES


def test_float16_and_not_inplace(rgb):
    sdata = _sdata(rgb)
    el = st.tl.predict_dense(sdata, ColourModel(), tissue_only=False, dtype="float16", inplace=False)
    assert "he_colour" not in sdata.images
    arr = st._geometry.scale_levels(el)[0]
    assert arr.dtype == np.float16
    ref = _colour_map(rgb, 4, 2)
    np.testing.assert_allclose(np.asarray(arr)[:, 3:-3, 3:-3], ref[:, 3:-3, 3:-3], atol=2e-3)
    assert el.attrs["stpredict"]["value_kind"] == "intensive"


def test_large_unbacked_map_goes_through_a_quiet_temporary_folder(rgb, tmp_path, monkeypatch, caplog):
    """A map too big for memory lives in a fresh temporary folder (its backing store), without a stale-run warning."""
    import tempfile

    monkeypatch.setattr(pdm, "IN_MEMORY_MAX_BYTES", 16)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    reference = _sdata(rgb)
    st.tl.predict_dense(reference, ColourModel(), tissue_only=False, chunk_size=24, show_progress_bar=False)
    monkeypatch.setattr(pdm, "IN_MEMORY_MAX_BYTES", 0)
    sdata = _sdata(rgb)
    with caplog.at_level(logging.INFO, logger="stpredict"):
        st.tl.predict_dense(sdata, ColourModel(), tissue_only=False, chunk_size=24, show_progress_bar=False)
    assert "Discarding" not in caplog.text
    folders = sorted(tmp_path.iterdir())
    assert len(folders) == 2  # one per call, each backing its map
    assert all((f / "map.zarr").is_dir() for f in folders)
    np.testing.assert_array_equal(_map(sdata), _map(reference))


def test_backed_run_interrupted_resumes_to_identical_map(rgb, tmp_path, monkeypatch):
    from spatialdata import read_zarr

    monkeypatch.setattr(_dense_plan, "UNIT_MAX_BYTES", 2 * 4 * 4 * 20 * 22)  # 3 panels of 2, 2, 1 chunk columns
    plans, real_plan = [], _dense_plan.DensePlan
    monkeypatch.setattr(_dense_plan, "DensePlan", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    reference = _sdata(rgb)
    full = ColourModel()
    st.tl.predict_dense(reference, full, tissue_only=False, chunk_size=24, batch_size=4, show_progress_bar=False)

    sdata = _sdata(rgb)
    sdata.write(tmp_path / "s.zarr")
    failing = ColourModel(fail_after=full.calls // 2)
    kwargs = {"tissue_only": False, "chunk_size": 24, "batch_size": 4, "show_progress_bar": False}
    with pytest.raises(KeyboardInterrupt):
        st.tl.predict_dense(sdata, failing, **kwargs)
    assert "he_colour" not in sdata.images
    assert not (tmp_path / "s.zarr" / "images" / "he_colour").exists()
    assert (tmp_path / "s.zarr" / ".stpredict_tmp" / "he_colour" / "progress.json").is_file()
    assert set(read_zarr(tmp_path / "s.zarr").images) == {"he"}  # the unfinished map is invisible

    resumed = ColourModel()
    st.tl.predict_dense(sdata, resumed, **kwargs)
    assert (plans[-1].n_panels, plans[-1].gx.n_chunks, plans[-1].gy.n_chunks) == (3, 5, 4)
    # finished units are skipped; the unit in flight and one halo tile row above it are predicted again
    assert full.calls - failing.calls <= resumed.calls <= full.calls - failing.calls + 2
    np.testing.assert_array_equal(_map(sdata), _map(reference))
    assert not (tmp_path / "s.zarr" / ".stpredict_tmp").exists()
    back = read_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(_map(back), _map(reference))
    assert get_element_meta(back, "he_colour")["model"] == "colour"

    partial = read_zarr(tmp_path / "s.zarr", selection=("images",))
    del partial.images["he_colour"]  # on disk only
    with pytest.raises(InputError, match="overwrite=True"):
        st.tl.predict_dense(partial, ColourModel(), **kwargs)
    st.tl.predict_dense(sdata, ColourModel(), genes=["g1"], overwrite=True, **kwargs)  # replaced on disk
    again = read_zarr(tmp_path / "s.zarr")
    np.testing.assert_array_equal(_map(again), _map(reference)[1:2])


def test_units_read_a_bounded_slide_region(rgb, monkeypatch):
    """The default chunk and panel shrink until a unit reads at most UNIT_MAX_LEVEL_PX slide pixels; same map."""
    from stpredict.tl import _blending

    reference = _sdata(rgb)
    st.tl.predict_dense(reference, ColourModel(), tissue_only=False, show_progress_bar=False)
    budget = 120 * 120  # a unit of 40 × 40 map px reads (40·2 + 32)² = 12,544 px; 50 × 50 would read 17,424
    monkeypatch.setattr(_dense_plan, "UNIT_MAX_LEVEL_PX", budget)
    plans, real_plan = [], _dense_plan.DensePlan
    monkeypatch.setattr(_dense_plan, "DensePlan", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    reads, real_read = [], _blending.read_model_region
    monkeypatch.setattr(_blending, "read_model_region", lambda r, *a: reads.append(real_read(r, *a)) or reads[-1])
    sdata = _sdata(rgb)
    st.tl.predict_dense(sdata, ColourModel(), tissue_only=False, show_progress_bar=False)
    assert (plans[-1].gy.chunk, plans[-1].panel) == (40, 1)  # 510 map px and all columns without the budget
    assert len(reads) == plans[-1].gy.n_chunks * plans[-1].gx.n_chunks == 2 * 3
    assert max(r.shape[1] * r.shape[2] for r in reads) <= budget
    np.testing.assert_array_equal(_map(sdata), _map(reference))


def test_distributed_client_gives_the_same_map(rgb, monkeypatch):
    distributed = pytest.importorskip("distributed")
    monkeypatch.setattr(_dense_plan, "UNIT_MAX_BYTES", 2 * 4 * 4 * 20 * 22)
    local = _sdata(rgb)
    st.tl.predict_dense(local, ColourModel(), tissue_only=False, chunk_size=24, show_progress_bar=False)
    remote = _sdata(rgb)
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        st.tl.predict_dense(
            remote, ColourModel(), tissue_only=False, chunk_size=24, client=client, show_progress_bar=False
        )
    np.testing.assert_array_equal(_map(remote), _map(local))


def test_gpu_out_of_memory_halves_the_batch(rgb, monkeypatch, caplog):
    class OutOfMemoryError(RuntimeError):
        pass

    fake_torch = types.SimpleNamespace(
        cuda=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError, is_available=lambda: False)
    )
    monkeypatch.setitem(sys.modules, "torch", fake_torch)

    class Greedy(ColourModel):
        def predict_tiles(self, tiles, *, device="auto"):
            if len(tiles) > 2:
                msg = "CUDA out of memory"
                raise OutOfMemoryError(msg)
            return super().predict_tiles(tiles, device=device)

    sdata = _sdata(rgb)
    with caplog.at_level(logging.WARNING, logger="stpredict"):
        st.tl.predict_dense(sdata, Greedy(), tissue_only=False, batch_size=8, show_progress_bar=False)
    assert "batch_size=2" in caplog.text
    np.testing.assert_allclose(_map(sdata)[:, 3:-3, 3:-3], _colour_map(rgb, 4, 2)[:, 3:-3, 3:-3], atol=1e-5)

    class Hopeless(ColourModel):
        def predict_tiles(self, tiles, *, device="auto"):
            msg = "CUDA out of memory"
            raise OutOfMemoryError(msg)

    with pytest.raises(MemoryError, match="batch_size=1"):
        st.tl.predict_dense(_sdata(rgb), Hopeless(), tissue_only=False, show_progress_bar=False)
    with pytest.raises(RuntimeError, match="plain"):  # other errors are not retried
        st.tl.predict_dense(_sdata(rgb), _Raising(), tissue_only=False, show_progress_bar=False)


class _Raising(ColourModel):
    def predict_tiles(self, tiles, *, device="auto"):
        msg = "plain failure"
        raise RuntimeError(msg)


def test_runs_a_real_pixnet(rgb):
    pytest.importorskip("torch")
    model = st.models.PixNet(["A", "B"], tile_size=64, output_stride=2, um_per_px=2.0, seed=0)
    sdata = _sdata(rgb, um=1.0)
    st.tl.predict_dense(sdata, model, tissue_only=False, device="cpu", show_progress_bar=False)
    pred = _map(sdata, "he_pixnet")
    assert pred.shape == (2, 38, 50)  # 150 × 200 px at 1 µm/px → 2 µm/px model pixels → stride 2
    assert np.isfinite(pred).all()
    assert np.abs(pred).sum() > 0
    assert um_per_px(sdata, "he_pixnet") == pytest.approx(4.0)
    assert get_element_meta(sdata, "he_pixnet")["value_kind"] == model.value_kind


def _he_like(shape=(200, 240)) -> np.ndarray:
    """Pink tissue (an ellipse with texture) on white glass, for the computed tissue mask."""
    texture = _image(shape).astype(np.float64) / 255
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    tissue = ((yy - 100) / 80) ** 2 + ((xx - 100) / 90) ** 2 < 1
    pink = np.array([200.0, 120.0, 170.0])[:, None, None] * (0.6 + 0.4 * texture)
    return np.where(tissue, pink, 242).astype(np.uint8)


@pytest.mark.parametrize(
    "convert",
    [
        lambda u: u / 255,
        lambda u: (u / 255).astype(np.float32),
        lambda u: u.astype(np.float32),
        lambda u: u.astype(np.uint16),
    ],
    ids=["float64 [0, 1]", "float32 [0, 1]", "float32 [0, 255]", "uint16 [0, 255]"],
)
def test_float_images_give_the_map_of_the_uint8_image(convert):
    """Float RGB in [0, 1] or [0, 255] is read as the uint8 image it encodes, tissue mask included."""
    rgb = _he_like()
    reference = _sdata(rgb)
    st.tl.predict_dense(reference, ColourModel(), show_progress_bar=False)  # tissue mask computed
    converted = _sdata(convert(rgb))
    st.tl.predict_dense(converted, ColourModel(), show_progress_bar=False)
    np.testing.assert_array_equal(_map(converted), _map(reference))
    assert 0.2 < np.mean(_map(reference)[0] != 0) < 0.9  # the mask selected part of the slide
    mask = st.pp.tissue_mask(_sdata(convert(rgb)), "he", inplace=False)
    expected = st.pp.tissue_mask(_sdata(rgb), "he", inplace=False)
    np.testing.assert_array_equal(np.asarray(mask.data), np.asarray(expected.data))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ((np.arange(24.0).reshape(2, 3, 4) - 10) / 5, "normalised"),  # standardised, not RGB
        (np.linspace(0, 300, 24).reshape(2, 3, 4), r"\[0, 255\]"),
        (np.linspace(0, 4000, 24).reshape(2, 3, 4).astype(np.uint16), "257"),
    ],
    ids=["negative", "float over 255", "16-bit"],
)
def test_images_that_are_not_rgb_values_are_refused(rgb, values, match):
    image = np.resize(values, rgb.shape).astype(values.dtype)
    with pytest.raises(InputError, match=match):
        st.tl.predict_dense(_sdata(image), ColourModel(), tissue_only=False, show_progress_bar=False)


def test_channel_names_say_which_is_red_green_blue(rgb):
    reference = _sdata(rgb)
    st.tl.predict_dense(reference, ColourModel(), tissue_only=False, show_progress_bar=False)
    bgr = _sdata(rgb[::-1].copy(), channels=["b", "g", "r"])
    st.tl.predict_dense(bgr, ColourModel(), tissue_only=False, show_progress_bar=False)
    np.testing.assert_array_equal(_map(bgr), _map(reference))
    alpha = np.full_like(rgb[:1], 255)
    named = _sdata(np.concatenate([alpha, rgb[[1, 2, 0]]]), channels=["Alpha", "Green", "Blue", "Red"])
    st.tl.predict_dense(named, ColourModel(), tissue_only=False, show_progress_bar=False)
    np.testing.assert_array_equal(_map(named), _map(reference))
    unnamed = _sdata(np.concatenate([rgb, alpha]), channels=None)  # integer names: the first three, as before
    st.tl.predict_dense(unnamed, ColourModel(), tissue_only=False, show_progress_bar=False)
    np.testing.assert_array_equal(_map(unnamed), _map(reference))
    for names in (["x", "y", "z"], ["r", "r", "b"], ["hematoxylin", "eosin", "dab"]):
        with pytest.raises(InputError, match="c_coords=\\['r', 'g', 'b'\\]"):
            st.tl.predict_dense(_sdata(rgb, channels=names), ColourModel(), tissue_only=False)
