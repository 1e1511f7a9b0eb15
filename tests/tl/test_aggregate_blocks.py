"""How tl.aggregate reads a map: one in-memory array, in-memory chunks, or dask tasks give the same tables."""

from __future__ import annotations

import dask.array as da
import geopandas as gpd
import numpy as np
import pytest
import shapely
from hypothesis import given, settings
from hypothesis import strategies as st_
from spatialdata import SpatialData
from spatialdata.models import Image2DModel, Labels2DModel, ShapesModel
from spatialdata.transformations import Identity, Scale, Sequence, Translation

import stpredict as st
from stpredict._meta import set_element_meta
from stpredict.tl._raster import _Raster, _whole_view

GENES = ["g0", "g1", "g2", "g3"]


@pytest.fixture(autouse=True)
def _no_progress_bars(monkeypatch):
    monkeypatch.setattr(st.settings, "show_progress_bar", False)


def _bounds(n: int, sizes: list[int]) -> list[int]:
    """Chunk sizes along an axis of length n from a repeating list of sizes."""
    out, k = [], 0
    while sum(out) < n:
        out.append(min(sizes[k % len(sizes)], n - sum(out)))
        k += 1
    return out


def _chunked(values: np.ndarray, chunks: tuple[tuple[int, ...], ...], how: str) -> da.Array:
    """A dask array of ``values``: "views" (from_array), "copies" (one contiguous array per chunk in a materialised
    graph, as a reader might hold them) or "tasks" (every chunk computed by a task, like a zarr read)."""
    if how == "views":
        return da.from_array(values, chunks=chunks)
    if how == "tasks":
        return da.from_array(values, chunks=chunks).map_blocks(lambda b: b + np.float32(0), dtype=values.dtype)
    name = "copies-" + str(abs(hash((values.tobytes()[:64], chunks))))
    y_b = np.r_[0, np.cumsum(chunks[1])]
    x_b = np.r_[0, np.cumsum(chunks[2])]
    graph = {
        (name, 0, i, j): np.ascontiguousarray(values[:, y_b[i] : y_b[i + 1], x_b[j] : x_b[j + 1]])
        for i in range(len(chunks[1]))
        for j in range(len(chunks[2]))
    }
    return da.Array(graph, name, chunks=chunks, dtype=values.dtype)


def _sdata(data, scale: float = 1.0, tx: float = 0.0, ty: float = 0.0) -> SpatialData:
    um = Sequence([Scale([scale, scale], axes=("x", "y")), Translation([tx, ty], axes=("x", "y"))])
    image = Image2DModel.parse(
        data, dims=("c", "y", "x"), c_coords=GENES[: data.shape[0]], transformations={"um": um, "global": Identity()}
    )
    sdata = SpatialData(images={"map": image})
    set_element_meta(sdata, "map", sdata.images["map"], {"value_kind": "density"})
    return sdata


def test_raster_modes():
    values = np.arange(4 * 30 * 20, dtype=np.float32).reshape(4, 30, 20)
    chunks = ((4,), (7, 13, 10), (5, 15))
    dask_views = _chunked(values, chunks, "views")
    views = _Raster.of(dask_views)
    assert len(views.chunks) == 1
    assert len(views.chunks[0]) == 1
    graph = dict(dask_views.__dask_graph__())
    assert all(np.shares_memory(views.chunks[0][0], b) for b in graph.values())
    np.testing.assert_array_equal(views.chunks[0][0], values)
    copies = _Raster.of(_chunked(values, chunks, "copies"))
    assert [len(r) for r in copies.chunks] == [2, 2, 2]
    np.testing.assert_array_equal(copies.y_bounds, [0, 7, 20, 30])
    np.testing.assert_array_equal(copies.x_bounds, [0, 5, 20])
    tiles = copies.tiles(10**9)
    assert len(tiles) == 6
    for (y0, y1, x0, x1), block in copies.read(tiles):
        np.testing.assert_array_equal(block, values[:, y0:y1, x0:x1])
    assert copies.tiles(10**9, rows=(7, 20)) == [(7, 20, 0, 5), (7, 20, 5, 20)]
    tasks = _Raster.of(_chunked(values, chunks, "tasks"))
    assert tasks.chunks is None
    # a channel subset reads the in-memory chunks whole and aggregates only the chosen channels
    sub = _Raster.of(_chunked(values, chunks, "copies"), np.array([3, 1]))
    np.testing.assert_array_equal(sub.chan, [3, 1])
    assert sub.shape == (2, 30, 20)
    sub_tasks = _Raster.of(_chunked(values, chunks, "tasks"), np.array([3, 1]))
    np.testing.assert_array_equal(sub_tasks.chan, [0, 1])
    np.testing.assert_array_equal(np.asarray(sub_tasks.data), values[[3, 1]])


def test_whole_view_refuses_what_is_not_one_array():
    values = np.zeros((2, 8, 8), dtype=np.float32)
    views = [[values[:, :4, :4], values[:, :4, 4:]], [values[:, 4:, :4], values[:, 4:, 4:]]]
    assert _whole_view(views, values.shape) is not None
    swapped = [[views[0][1], views[0][0]], views[1]]
    assert _whole_view(swapped, values.shape) is None
    other = values.copy()
    mixed = [[views[0][0], other[:, :4, 4:]], views[1]]
    assert _whole_view(mixed, values.shape) is None
    wide = np.zeros((2, 8, 10), dtype=np.float32)  # views of a wider array: not contiguous as a whole
    inner = [[wide[:, :4, :4], wide[:, :4, 4:8]], [wide[:, 4:, :4], wide[:, 4:, 4:8]]]
    assert _whole_view(inner, (2, 8, 8)) is None


@settings(max_examples=12, deadline=None)
@given(
    size=st_.floats(1.0, 17.0),
    scale=st_.floats(0.4, 2.0),
    ox=st_.floats(-20.0, 20.0),
    oy=st_.floats(-20.0, 20.0),
    ys=st_.lists(st_.integers(5, 19), min_size=1, max_size=3),
    xs=st_.lists(st_.integers(5, 19), min_size=1, max_size=3),
    genes=st_.sampled_from([None, ["g2"], ["g3", "g0"]]),
    seed=st_.integers(0, 999),
)
def test_bins_same_for_every_storage(size, scale, ox, oy, ys, xs, genes, seed):
    rng = np.random.default_rng(seed)
    values = rng.random((4, 37, 29)).astype(np.float32)
    chunks = ((4,), tuple(_bounds(37, ys)), tuple(_bounds(29, xs)))
    kw = {"bin_size": size, "origin_um": (ox, oy), "inplace": False, "tissue_key": False, "genes": genes}
    kw["allow_subpixel"] = True
    ref = st.tl.aggregate(_sdata(values, scale, 1.5, 0.5), "map", **kw)
    for how in ("copies", "tasks"):
        data = _chunked(values, chunks, how)
        # a small block_bytes makes the dask path split chunk rows into several tiles
        out = st.tl.aggregate(_sdata(data, scale, 1.5, 0.5), "map", block_bytes=4 * 7 * 7 * 4, **kw)
        np.testing.assert_array_equal(out.obs_names, ref.obs_names)
        np.testing.assert_allclose(out.X, ref.X, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out.obs["n_pixels"], ref.obs["n_pixels"], rtol=1e-12)
    # and the total is the map's
    total = values[[GENES.index(g) for g in genes]] if genes else values
    np.testing.assert_allclose(
        np.asarray(ref.X, dtype=np.float64).sum(axis=0), total.sum(axis=(1, 2)) * scale**2, rtol=1e-5
    )


def test_shapes_and_labels_same_for_every_storage(rng):
    values = rng.random((4, 61, 47)).astype(np.float32)
    chunks = ((4,), (16, 9, 20, 16), (11, 30, 6))
    lab = np.repeat(np.repeat(rng.integers(0, 40, size=(21, 16)), 3, axis=0), 3, axis=1)[:61, :47].astype(np.int32)
    circles = rng.uniform((0, 0, 1), (47, 61, 12), size=(25, 3))
    polys = [shapely.Point(x, y).buffer(r, quad_segs=3) for x, y, r in rng.uniform((0, 0, 1), (47, 61, 9), (9, 3))]
    tables = {}
    for how in ("array", "views", "copies", "tasks"):
        data = values if how == "array" else _chunked(values, chunks, how)
        sdata = _sdata(data)
        sdata.labels["cells"] = Labels2DModel.parse(lab, dims=("y", "x"), transformations={"um": Identity()})
        sdata.shapes["spots"] = ShapesModel.parse(
            circles[:, :2], geometry=0, radius=circles[:, 2], transformations={"um": Identity()}
        )
        sdata.shapes["cells_poly"] = ShapesModel.parse(
            gpd.GeoDataFrame(geometry=polys), transformations={"um": Identity()}
        )
        for kw in ({"labels_key": "cells"}, {"shapes_key": "spots"}, {"shapes_key": "cells_poly", "genes": ["g1"]}):
            key = next(iter(kw.values()))
            tables[how, key] = st.tl.aggregate(sdata, "map", inplace=False, block_bytes=4 * 16 * 16 * 4, **kw)
    for key in ("cells", "spots", "cells_poly"):
        ref = tables["array", key]
        # brute force for the circles: exact area weights summed over all pixels
        for how in ("views", "copies", "tasks"):
            out = tables[how, key]
            np.testing.assert_array_equal(out.obs_names, ref.obs_names)
            np.testing.assert_allclose(out.X, ref.X, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out.obs["n_pixels"], ref.obs["n_pixels"], rtol=1e-9)
            np.testing.assert_allclose(out.obsm["spatial"], ref.obsm["spatial"], rtol=1e-9)
    labels = tables["array", "cells"]
    ids = labels.obs["instance_id"].to_numpy()
    expected = np.stack([values[:, lab == i].sum(axis=1) for i in ids])
    np.testing.assert_allclose(labels.X, expected, rtol=1e-5)


def test_labels_any_ids_and_storage(rng):
    values = rng.random((2, 40, 36)).astype(np.float32)
    small = np.repeat(np.repeat(rng.integers(0, 12, size=(10, 9)), 4, axis=0), 4, axis=1).astype(np.int64)
    sparse = np.where(small > 0, small * 10**12 + 7, 0)  # ids far beyond the pixel count: np.unique path
    tables = {}
    for name, lab in (("dense", small), ("sparse", sparse)):
        for how in ("array", "views", "tasks"):
            if how == "array":
                data = lab
            elif how == "views":
                data = da.from_array(lab, chunks=(13, 11))
            else:
                data = da.from_array(lab, chunks=(13, 11)).map_blocks(lambda b: b + 0, dtype=lab.dtype)
            sdata = _sdata(values)
            sdata.labels["cells"] = Labels2DModel.parse(data, dims=("y", "x"), transformations={"um": Identity()})
            tables[name, how] = st.tl.aggregate(sdata, "map", labels_key="cells", inplace=False)
    ref = tables["dense", "array"]
    ids = ref.obs["instance_id"].to_numpy()
    np.testing.assert_allclose(ref.X, np.stack([values[:, small == i].sum(axis=1) for i in ids]), rtol=1e-5)
    for key, table in tables.items():
        expected_ids = ids * 10**12 + 7 if key[0] == "sparse" else ids
        np.testing.assert_array_equal(table.obs["instance_id"], expected_ids)
        np.testing.assert_allclose(table.X, ref.X, rtol=1e-5)
        np.testing.assert_allclose(table.obsm["spatial"], ref.obsm["spatial"], rtol=1e-9)


def test_integer_maps_and_bands_of_an_in_memory_map(rng):
    # an integer map (H&E-like uint8) is converted block by block through dask, never whole
    values = rng.integers(0, 256, size=(3, 45, 38)).astype(np.uint8)
    u8 = _sdata(da.from_array(values, chunks=(3, 16, 16)))
    assert _Raster.of(u8.images["map"].data).chunks is None
    f32 = _sdata(values.astype(np.float32))
    kw = {"bin_size": 6.5, "origin_um": (0.4, -1.1), "inplace": False, "tissue_key": False}
    ref = st.tl.aggregate(f32, "map", **kw)
    np.testing.assert_allclose(st.tl.aggregate(u8, "map", block_bytes=3 * 16 * 16 * 4, **kw).X, ref.X, rtol=1e-6)
    # a small block_bytes splits the sums of a map in memory into bands of bin rows: same table
    banded = st.tl.aggregate(f32, "map", block_bytes=3 * 8 * 7 * 2, **kw)
    np.testing.assert_array_equal(banded.obs_names, ref.obs_names)
    np.testing.assert_allclose(banded.X, ref.X, rtol=1e-6)
