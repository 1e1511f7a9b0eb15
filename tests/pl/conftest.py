"""Small fixed data for the plot tests, and a headless, deterministic matplotlib."""

from __future__ import annotations

import dask.array as da
import matplotlib as mpl
import matplotlib.style
import numpy as np
import pytest
import spatialdata as sd
from spatialdata.models import Image2DModel
from spatialdata.transformations import Scale, Sequence, Translation
from xarray import DataTree

from stpredict._geometry import set_um_per_px

mpl.use("Agg")


@pytest.fixture(autouse=True)
def _default_style():
    """Matplotlib's default rcParams (DejaVu Sans) in every test, as pytest-mpl uses with ``style="default"``."""
    with mpl.style.context("default", after_reset=True):
        mpl.rcParams["svg.hashsalt"] = "stpredict"
        yield


def _make_sdata(*, calibrate=True, multiscale=False, offset=0.0):
    """H&E 3 × 64 × 96 px (0.5 µm/px: 48 × 32 µm) and a 3-gene map at stride 4 (16 × 24 px)."""
    rng = np.random.default_rng(0)
    he = Image2DModel.parse(
        rng.integers(0, 255, size=(3, 64, 96), dtype=np.uint8),
        dims=("c", "y", "x"),
        c_coords=["r", "g", "b"],
        scale_factors=[2] if multiscale else None,
    )
    stride = Scale([4.0, 4.0], axes=("x", "y"))
    t = stride if offset == 0 else Sequence([stride, Translation([offset, offset], axes=("x", "y"))])
    values = rng.random((3, 16, 24)).astype(np.float32)
    values[1] = np.arange(24, dtype=np.float32)[None, :]  # gene B increases along x
    dense = Image2DModel.parse(values, dims=("c", "y", "x"), c_coords=["A", "B", "C"], transformations={"global": t})
    sdata = sd.SpatialData(images={"he": he, "he_pixnet": dense})
    if calibrate:
        set_um_per_px(sdata, "he", 0.5)
    return sdata, values


class _ChunkLog:
    """Counts the chunks computed per pyramid level; reading a forbidden level raises."""

    def __init__(self, forbidden=()):
        self.forbidden = set(forbidden)
        self.reads: dict[int, int] = {}

    def block(self, level, dtype):
        def fn(x):
            if level in self.forbidden:
                msg = f"pyramid level {level} was read"
                raise AssertionError(msg)
            self.reads[level] = self.reads.get(level, 0) + 1
            return x.astype(dtype)

        return fn


def _lazy_pyramid(shape, log, *, c_coords, dtype, transformations=None, n_levels=6, chunk=512):
    """A multiscale image ``(c, y, x)`` whose every level is an independent, logged dask array.

    Level ``k`` is ``shape`` halved ``k`` times, placed like spatialdata's own pyramids (``Scale(2**k)`` then the
    level-0 transformations). Values are constant (cheap at any size) and no level is derived from another, so
    computing one level touches no other: ``log`` tells which were read.
    """
    import xarray as xr
    from spatialdata.transformations import Identity

    transformations = transformations or {"global": Identity()}
    nodes = {}
    for k in range(n_levels):
        f = 2**k
        c, ny, nx = shape[0], shape[1] // f, shape[2] // f
        base = da.ones((c, ny, nx), dtype=np.float32, chunks=(c, chunk, chunk))
        data = base.map_blocks(log.block(k, dtype), dtype=dtype, meta=np.empty((0, 0, 0), dtype=dtype))
        t = {
            cs: (tr if k == 0 else Sequence([Scale([f, f], axes=("y", "x")), tr])) for cs, tr in transformations.items()
        }
        coords = {"c": list(c_coords), "y": (np.arange(ny) + 0.5) * f, "x": (np.arange(nx) + 0.5) * f}
        array = xr.DataArray(data, dims=("c", "y", "x"), coords=coords, attrs={"transform": t})
        nodes[f"scale{k}"] = xr.Dataset({"image": array})
    return DataTree.from_dict(nodes)


@pytest.fixture
def make_sdata():
    """Builds the small H&E + map SpatialData: ``make_sdata(calibrate=True, multiscale=False, offset=0.0)``."""
    return _make_sdata


@pytest.fixture
def whole_slide():
    """Builds a 20 × 20 mm slide at 0.5 µm/px and a 50-gene map at 4 µm/px, lazy; returns ``(sdata, logs)``."""
    from spatialdata.transformations import Scale as _Scale

    def build(forbid_full_resolution=True):
        forbidden = [0] if forbid_full_resolution else []
        he_log, map_log = _ChunkLog(forbidden), _ChunkLog(forbidden)
        he = _lazy_pyramid((3, 40000, 40000), he_log, c_coords=["r", "g", "b"], dtype=np.uint8, n_levels=8, chunk=4096)
        genes = [f"g{i}" for i in range(50)]
        t = {"global": _Scale([8.0, 8.0], axes=("x", "y"))}
        pred = _lazy_pyramid((50, 5000, 5000), map_log, c_coords=genes, dtype=np.float32, transformations=t, chunk=1024)
        sdata = sd.SpatialData(images={"he": he, "he_pixnet": pred})
        set_um_per_px(sdata, "he", 0.5)
        return sdata, he_log, map_log

    return build
