"""Whole-slide scans opened lazily with read_wsi: the file's own pyramid, µm per pixel, tile-by-tile reads."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import tifffile
from scipy import ndimage

import stpredict as st
from stpredict._geometry import affine_between, scale_levels, um_per_px
from stpredict.errors import InputError
from stpredict.io._wsi import read_wsi

H, W, TILE = 2048, 3072, 256
GENES = ["g0", "g1", "g2"]
MIX = np.array([[1.0, 0.0, 0.0], [0.2, 0.5, 0.3], [-0.5, 1.0, 0.25]])


def _halve(a: np.ndarray) -> np.ndarray:
    ny, nx = a.shape[0] // 2, a.shape[1] // 2
    return (a[: 2 * ny, : 2 * nx].astype(np.uint16).reshape(ny, 2, nx, 2, -1).sum(axis=(1, 3)) >> 2).astype(np.uint8)


def _scan(seed: int = 0, shape: tuple[int, int] = (H, W)) -> list[np.ndarray]:
    """A smooth H&E-like RGB scan (y, x, 3) with pixel noise, and its 2× and 4× block means."""
    rng = np.random.default_rng(seed)
    small = ndimage.gaussian_filter(rng.random((shape[0] // 16, shape[1] // 16, 3)), (2, 2, 0))
    small = (60 + 180 * (small - small.min()) / np.ptp(small)).astype(np.uint8)
    noise = rng.integers(0, 16, (*shape, 3), dtype=np.uint8)
    level0 = np.repeat(np.repeat(small, 16, axis=0), 16, axis=1) + noise
    return [level0, _halve(level0), _halve(_halve(level0))]


def _write_svs(path, levels, mpp: float | None = 0.5) -> None:
    """Aperio layout: baseline, thumbnail, then the reduced levels; MPP in the ImageDescription."""
    ny, nx = levels[0].shape[:2]
    desc = f"Aperio Image Library v12.0.0\r\n{nx}x{ny} [0,0 {nx}x{ny}] ({TILE}x{TILE}) JPEG/RGB Q=70|AppMag = 20"
    if mpp is not None:
        desc += f"|MPP = {mpp}"
    kwargs = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "zlib", "metadata": None}
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], description=desc, **kwargs)
        tw.write(levels[-1][::4, ::4], photometric="rgb", description="thumbnail", metadata=None)
        for level in levels[1:]:
            tw.write(level, description="level", **kwargs)


def _write_ome(path, levels, size_um: float = 0.25) -> None:
    """Pyramidal OME-TIFF: reduced levels as SubIFDs, µm per pixel as OME PhysicalSizeX/Y."""
    kwargs = {"tile": (TILE, TILE), "photometric": "rgb", "compression": "zlib"}
    meta = {"axes": "YXS", "PhysicalSizeX": size_um, "PhysicalSizeY": size_um, "PhysicalSizeXUnit": "µm"}
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **kwargs)
        for level in levels[1:]:
            tw.write(level, subfiletype=1, metadata=None, **kwargs)


@pytest.fixture(scope="module")
def levels():
    return _scan()


@pytest.fixture(scope="module")
def svs(levels, tmp_path_factory):
    path = tmp_path_factory.mktemp("wsi") / "scan.svs"
    _write_svs(path, levels)
    return path


@pytest.fixture
def tile_reads(monkeypatch):
    """Keys of the tiles decoded from any TIFF (``"<level>/<row>.<col>.0"``), in the order requested."""
    import tifffile.zarr as tz

    keys: list[str] = []
    original = tz.ZarrTiffStore.get

    async def get(self, key, *args, **kwargs):
        if not key.rsplit("/", 1)[-1].startswith("."):  # metadata (.zarray, .zgroup, ...) is no pixel data
            keys.append(key)
        return await original(self, key, *args, **kwargs)

    monkeypatch.setattr(tz.ZarrTiffStore, "get", get)
    return keys


def test_svs_levels_shapes_values_and_calibration(svs, levels):
    sdata = read_wsi(svs)
    image = sdata.images["he"]
    arrays = scale_levels(image)
    assert [a.shape for a in arrays] == [(3, 2048, 3072), (3, 1024, 1536), (3, 512, 768)]
    assert all(a.dtype == np.uint8 and list(a.coords["c"].values) == ["r", "g", "b"] for a in arrays)
    assert arrays[0].data.chunksize == (3, 1024, 1024)  # 4 × 4 file tiles per dask chunk
    assert um_per_px(sdata, "he") == 0.5
    for i, a in enumerate(arrays):  # each level's transformation is its downsample, composed with the calibration
        matrix = st._geometry.to_um_affine(sdata, "he") @ np.diag([2.0**i, 2.0**i, 1.0])
        level_t = a.attrs["transform"]["um"].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
        np.testing.assert_allclose(level_t, matrix)
    np.testing.assert_array_equal(arrays[0].data.compute(), levels[0].transpose(2, 0, 1))
    np.testing.assert_array_equal(arrays[2].data.compute(), levels[2].transpose(2, 0, 1))
    meta = image.attrs["stpredict"]
    assert meta["vendor"] == "aperio"
    assert meta["file_levels"] == 3
    assert meta["level_downsamples"] == [1.0, 2.0, 4.0]
    assert st.io.infer_um_per_px(sdata, "he") == 0.5
    assert read_wsi(svs, um_per_px=0.25, image_key="slide").images["slide"].attrs["stpredict"]["um_per_px"] == 0.25


def test_ome_tiff_physical_size_and_pixels(levels, tmp_path):
    path = tmp_path / "scan.ome.tif"
    _write_ome(path, levels, size_um=0.25)
    sdata = read_wsi(path)
    assert um_per_px(sdata, "he") == 0.25
    arrays = scale_levels(sdata.images["he"])
    assert [a.shape[1:] for a in arrays] == [(2048, 3072), (1024, 1536), (512, 768)]
    np.testing.assert_array_equal(
        arrays[1].data[:, 100:400, 900:1300].compute(), levels[1][100:400, 900:1300].T.swapaxes(1, 2)
    )
    assert sdata.images["he"].attrs["stpredict"]["vendor"] == "ome"


def test_opening_reads_no_pixels_and_a_region_reads_its_tiles(svs, levels, tile_reads):
    sdata = read_wsi(svs)
    level0 = scale_levels(sdata.images["he"])[0]
    assert tile_reads == []  # opening reads metadata only
    region = level0.data[:, 300:600, 1100:1300].compute()
    np.testing.assert_array_equal(region, levels[0][300:600, 1100:1300].transpose(2, 0, 1))
    # the one dask chunk under the region: rows 0-1023, columns 1024-2047 = file tiles rows 0-3, columns 4-7
    assert sorted(tile_reads) == sorted(f"0/{i}.{j}.0" for i in range(4) for j in range(4, 8))
    # the graph pickles without the open file (dask.distributed workers reopen it)
    import pickle

    corner = pickle.loads(pickle.dumps(level0.data[:, :8, :8]))
    np.testing.assert_array_equal(corner.compute(), levels[0][:8, :8].transpose(2, 0, 1))


def test_flat_tiff_needs_um_per_px_and_gets_lazy_levels(levels, tmp_path):
    path = tmp_path / "flat.tif"
    tifffile.imwrite(path, levels[0], tile=(TILE, TILE), photometric="rgb", compression="zlib", metadata=None)
    with pytest.raises(InputError, match=r"not recorded in the file.*Pass `um_per_px=`"):
        read_wsi(path)
    sdata = read_wsi(path, um_per_px=0.5)
    arrays = scale_levels(sdata.images["he"])
    assert [a.shape[1:] for a in arrays] == [(2048, 3072), (1024, 1536), (512, 768)]  # two added: ≤ 1024 px
    assert sdata.images["he"].attrs["stpredict"]["file_levels"] == 1
    for i in (1, 2):
        np.testing.assert_array_equal(arrays[i].data.compute(), levels[i].transpose(2, 0, 1))
    # a writer's default 72 dpi is no scan resolution
    tifffile.imwrite(path, levels[2], tile=(TILE, TILE), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(InputError, match="um_per_px="):
        read_wsi(path)
    tifffile.imwrite(
        path, levels[2], tile=(TILE, TILE), photometric="rgb", resolution=(4e4, 4e4), resolutionunit="CENTIMETER"
    )
    assert um_per_px(read_wsi(path), "he") == pytest.approx(0.25)  # 40,000 px per cm


def test_bad_slides_are_refused_with_the_fix(levels, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_wsi(tmp_path / "missing.svs")
    with pytest.raises(InputError, match="is a folder, not a slide file"):
        read_wsi(tmp_path)
    (tmp_path / "notes.svs").write_text("not a slide")
    with pytest.raises(InputError, match="cannot read .*notes.svs"):
        read_wsi(tmp_path / "notes.svs", backend="tiffslide")
    sixteen = tmp_path / "fluo.tif"
    tifffile.imwrite(sixteen, np.zeros((512, 512), np.uint16), tile=(TILE, TILE))
    with pytest.raises(InputError, match="uint16 pixels .* 8-bit RGB"):
        read_wsi(sixteen, um_per_px=0.5)
    anisotropic = tmp_path / "aniso.ome.tif"
    with tifffile.TiffWriter(anisotropic, ome=True) as tw:
        tw.write(levels[2], tile=(TILE, TILE), photometric="rgb", metadata={"PhysicalSizeX": 0.5, "PhysicalSizeY": 0.6})
    with pytest.raises(InputError, match="not square"):
        read_wsi(anisotropic)
    with pytest.raises(InputError, match="backend must be"):
        read_wsi(anisotropic, backend="vips")


class ColourModel:
    """Genes = linear mixes of box-blurred colour, block-averaged by the stride: depends only on nearby pixels."""

    name = "colour"
    value_kind = "intensive"

    def __init__(self, *, um: float, tile_size: int = 64, stride: int = 2, context: int = 4) -> None:
        self.var_names = list(GENES)
        self.tile_size, self.output_stride, self.context, self.um_per_px = tile_size, stride, context, um

    def state_dict(self):
        return {"mix": MIX}

    def predict_tiles(self, tiles, *, device="auto"):
        x = tiles.astype(np.float64) / 255
        blurred = ndimage.uniform_filter(x, size=(1, 1, 2 * self.context + 1, 2 * self.context + 1), mode="constant")
        genes = np.einsum("gc,ncyx->ngyx", MIX, blurred)
        n, g, h, w = genes.shape
        s = self.output_stride
        return genes.reshape(n, g, h // s, s, w // s, s).mean(axis=(3, 5)).astype(np.float32)


def test_predict_dense_reads_the_coarse_file_level_chunk_by_chunk(svs, levels, tile_reads):
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel

    from stpredict._geometry import set_um_per_px

    sdata = read_wsi(svs)
    st.tl.predict_dense(sdata, ColourModel(um=2.0), tissue_only=False, chunk_size=96, show_progress_bar=False)
    # 2 µm/px is the file's third level (0.5 µm × 4): only its tiles are read, each once
    assert {k.split("/")[0] for k in tile_reads} == {"2"}
    assert sorted(tile_reads) == sorted(set(tile_reads))
    assert len(tile_reads) == 2 * 3  # 512 × 768 px = 2 × 3 tiles of 256
    memory = SpatialData(images={"he": Image2DModel.parse(levels[2].transpose(2, 0, 1), dims=("c", "y", "x"))})
    set_um_per_px(memory, "he", 2.0)
    st.tl.predict_dense(memory, ColourModel(um=2.0), tissue_only=False, chunk_size=96, show_progress_bar=False)
    lazy_map = scale_levels(sdata.images["he_colour"])[0]
    np.testing.assert_array_equal(lazy_map.values, scale_levels(memory.images["he_colour"])[0].values)
    assert lazy_map.shape == (3, 256, 384)
    assert um_per_px(sdata, "he_colour") == pytest.approx(4.0)
    np.testing.assert_allclose(affine_between(sdata, "he_colour", "he"), np.diag([8.0, 8.0, 1.0]))


def _sparse_scan(path, n: int = 100_000, tissue_um: tuple[float, float] = (2048.0, 4096.0)) -> None:
    """An Aperio-style 100,000 × 100,000 px scan at 0.5 µm/px, levels 1, 4, 16, 64: only the tiles over a square of
    tissue (``tissue_um`` along both axes, value 180) are stored; all others are empty (a few MB in all)."""
    lo, hi = tissue_um

    def tiles(size: int, um: float):
        span = TILE * um  # µm per tile

        def meets(k: int) -> bool:
            return k * span < hi and (k + 1) * span > lo

        for i in range(-(-size // TILE)):
            for j in range(-(-size // TILE)):
                if (i, j) != (0, 0) and not (meets(i) and meets(j)):  # the first tile tells tifffile the dtype
                    yield None
                    continue
                ys, xs = ((np.arange(k * TILE, (k + 1) * TILE) + 0.5) * um for k in (i, j))
                inside = ((ys >= lo) & (ys < hi))[:, None] & ((xs >= lo) & (xs < hi))[None, :]
                yield np.where(inside[:, :, None], np.uint8(180), np.uint8(255)).repeat(3, axis=2)

    desc = f"Aperio Image Library v12.0.0\r\n{n}x{n} [0,0 {n}x{n}] ({TILE}x{TILE}) JPEG/RGB Q=70|MPP = 0.5"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, ds in enumerate((1, 4, 16, 64)):
            size = -(-n // ds)
            tw.write(
                tiles(size, 0.5 * ds),
                shape=(size, size, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="zlib",
                description=desc if k == 0 else "level",
                metadata=None,
            )
            if k == 0:
                tw.write(np.full((64, 64, 3), 255, np.uint8), photometric="rgb", description="thumbnail", metadata=None)


def test_a_100k_scan_is_opened_planned_and_predicted_from_the_tiles_read(tmp_path, tile_reads):
    from spatialdata.models import Labels2DModel
    from spatialdata.transformations import Scale

    from stpredict.tl._dense_plan import plan_map

    path = tmp_path / "huge.svs"
    _sparse_scan(path)
    assert path.stat().st_size < 8 * 2**20
    sdata = read_wsi(path)
    arrays = scale_levels(sdata.images["he"])
    assert [a.shape[1] for a in arrays] == [100_000, 25_000, 6250, 1563, 781]  # 4 file levels + 1 computed
    assert tile_reads == []
    # the tissue: 128 µm mask pixels, tissue at 2048-4096 µm
    mask = np.zeros((391, 391), np.uint8)
    mask[16:32, 16:32] = 1
    sdata.labels["he_tissue"] = Labels2DModel.parse(
        mask, dims=("y", "x"), transformations={"global": Scale([256.0, 256.0], axes=("x", "y"))}
    )
    model = ColourModel(um=8.0, tile_size=32, context=2)
    layout = plan_map(
        sdata, "he", model, GENES, tissue_only=True, tissue_key=None, overlap_um=None, chunk_size=None, max_rescale=4.0
    )
    assert layout.level_index == 2  # 8 µm/px = the file's 16× level, read as it is
    assert layout.plan.ratio == (1.0, 1.0)
    assert layout.shape == (3, 3125, 3125)
    assert tile_reads == []  # planning reads no pixels
    st.tl.predict_dense(sdata, model, tmp_dir=tmp_path / "work", show_progress_bar=False)
    # of 152,881 + 9,604 + 625 + 49 tiles, only the 4 × 4 under one dask chunk of the 16× level are decoded
    assert sorted(tile_reads) == sorted(f"2/{i}.{j}.0" for i in range(4) for j in range(4))
    dense = scale_levels(sdata.images["he_colour"])[0]
    inside = dense.data[:, 140:240, 140:240].compute()  # map px of 16 µm: tissue = 128-256, context inside
    expected = MIX @ np.full(3, 180 / 255)
    np.testing.assert_allclose(inside, np.broadcast_to(expected[:, None, None], inside.shape), atol=1e-5)


class _FakeOpenSlide:
    """The few members of openslide.OpenSlide that read_wsi uses, over an in-memory RGBA pyramid."""

    def __init__(self, path: str) -> None:
        self._levels = []
        for level in _scan(1, (512, 768))[:2]:
            rgba = np.concatenate([level, np.full((*level.shape[:2], 1), 255, np.uint8)], axis=2)
            rgba[:32, :32] = 0  # not scanned: transparent
            self._levels.append(rgba)
        self.level_dimensions = [(a.shape[1], a.shape[0]) for a in self._levels]
        self.level_downsamples = [1.0, 2.0]
        self.properties = {"openslide.mpp-x": "0.243", "openslide.mpp-y": "0.243", "openslide.vendor": "mirax"}
        self.properties |= {f"openslide.level[{i}].tile-{s}": "128" for i in (0, 1) for s in ("width", "height")}

    def read_region(self, location, level, size):
        from PIL import Image

        x0, y0 = (round(v / self.level_downsamples[level]) for v in location)
        return Image.fromarray(self._levels[level][y0 : y0 + size[1], x0 : x0 + size[0]], "RGBA")


def test_mrxs_through_openslide_when_installed(tmp_path, monkeypatch):
    path = tmp_path / "scan.mrxs"
    path.write_bytes(b"MIRAX index")
    monkeypatch.setitem(sys.modules, "openslide", None)  # not installed
    with pytest.raises(InputError, match="needs OpenSlide.*pip install openslide-python openslide-bin"):
        read_wsi(path)
    fake = types.ModuleType("openslide")
    fake.OpenSlide, fake.OpenSlideError = _FakeOpenSlide, RuntimeError
    monkeypatch.setitem(sys.modules, "openslide", fake)
    sdata = read_wsi(path, chunk_px=200)
    arrays = scale_levels(sdata.images["he"])
    assert [a.shape for a in arrays] == [(3, 512, 768), (3, 256, 384)]
    assert arrays[0].data.chunksize == (3, 256, 256)  # whole tiles of 128 px
    assert um_per_px(sdata, "he") == pytest.approx(0.243)
    assert sdata.images["he"].attrs["stpredict"]["reader"] == "stpredict.io.read_wsi (openslide)"
    expected = _scan(1, (512, 768))[1].transpose(2, 0, 1).copy()
    expected[:, :32, :32] = 255  # transparent → white glass
    np.testing.assert_array_equal(arrays[1].data.compute(), expected)
