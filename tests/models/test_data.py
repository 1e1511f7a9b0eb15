from __future__ import annotations

import _training_data as helpers
import numpy as np
import pytest

from stpredict.errors import InputError
from stpredict.models._data import (
    CoverTileDataset,
    TileDataset,
    UnitCropDataset,
    augment_geometry,
    build_sections,
    collate_tiles,
    hed_jitter,
    log1p_cpm,
    read_window,
    sparse_weights,
    split_by_position,
)
from stpredict.models._footprints import DISK, RECT

GENES = ["g0", "g1", "g2"]


def _sections(sdata, space="normalised", table_keys=("table",)):
    return build_sections(sdata, image_key="he", table_keys=list(table_keys), shapes_key=None, genes=GENES, space=space)


def test_build_sections_geometry_and_targets() -> None:
    sdata = helpers.make_sdata(um_per_px=0.5, radius=6.0)
    (section,) = _sections(sdata)
    units = section.units[0]
    table = sdata.tables["table"]
    np.testing.assert_allclose(units.centers, table.obsm["spatial"])  # shapes share the image's pixel space
    assert np.all(units.half_sizes == 6.0)
    assert np.all(units.kinds == DISK)
    assert section.image_um_per_px == pytest.approx(0.5)
    np.testing.assert_allclose(units.targets, log1p_cpm(table.X), rtol=1e-6)
    counts = _sections(sdata, space="counts")[0].units[0].targets
    np.testing.assert_array_equal(counts, table.X.toarray())


def test_log1p_cpm_and_square_units() -> None:
    x = np.array([[1.0, 3.0], [0.0, 0.0]])
    np.testing.assert_allclose(log1p_cpm(x), np.log1p([[2500.0, 7500.0], [0.0, 0.0]]), rtol=1e-6)
    np.testing.assert_allclose(log1p_cpm(x, columns=np.array([1])), np.log1p([[7500.0], [0.0]]), rtol=1e-6)
    sdata = helpers.make_sdata(squares=True, radius=4.0)
    units = _sections(sdata)[0].units[0]
    assert np.all(units.kinds == RECT)
    np.testing.assert_allclose(units.half_sizes, 4.0)
    np.testing.assert_allclose(units.centers, sdata.tables["table"].obsm["spatial"])


def test_missing_genes_and_normalised_layers() -> None:
    import stpredict as st

    sdata = helpers.make_sdata()
    with pytest.raises(InputError, match="lacks 1"):
        build_sections(
            sdata, image_key="he", table_keys=["table"], shapes_key=None, genes=["g0", "nope"], space="counts"
        )
    table = sdata.tables["table"]
    st.pp.normalize(table, method="log1p_cpm")
    # st.pp.normalize's layer and our own log1p CPM of X agree
    by_layer = (
        build_sections(
            sdata,
            image_key="he",
            table_keys=["table"],
            shapes_key=None,
            genes=GENES,
            space="normalised",
            target_layer="log1p_cpm",
        )[0]
        .units[0]
        .targets
    )
    np.testing.assert_allclose(by_layer, _sections(sdata)[0].units[0].targets, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="no layer 'other'"):
        build_sections(
            sdata,
            image_key="he",
            table_keys=["table"],
            shapes_key=None,
            genes=GENES,
            space="normalised",
            target_layer="other",
        )
    table.X = table.X.multiply(0.5).tocsr()  # not counts any more
    with pytest.raises(InputError, match="target_layer"):
        _sections(sdata)
    with pytest.raises(InputError, match="non-integer"):
        _sections(sdata, space="counts")
    with pytest.raises(KeyError, match="nope"):
        build_sections(sdata, image_key="he", table_keys=["nope"], shapes_key=None, genes=GENES, space="counts")


def test_read_window_resamples_with_exact_geometry() -> None:
    sdata = helpers.make_sdata(size=128, um_per_px=0.5, scale_factors=[2])
    img = np.asarray(sdata.images["he"]["scale0"]["image"].data)
    (section,) = _sections(sdata)
    assert section.level_factors == [1.0, 2.0]
    # model at 1 µm/px: a 32 px tile spans 64 image pixels and is read from the 2x level
    tile, origin, scale = read_window(section, 20.3, 10.7, 64.0, 32)
    assert tile.shape == (3, 32, 32)
    assert tile.dtype == np.uint8
    assert scale == pytest.approx(0.5)
    np.testing.assert_allclose(origin, [20.0, 10.0])
    ref = img[:, 10:74, 20:84].reshape(3, 32, 2, 32, 2).mean(axis=(2, 4))
    assert np.abs(tile.astype(float) - ref).mean() < 3.0
    # outside the slide: white padding
    tile, origin, _ = read_window(section, -40.0, -40.0, 64.0, 32)
    assert np.all(tile[:, :5, :5] == 255)


def test_augmentation_keeps_image_and_footprints_together() -> None:
    size = 32
    tile = np.zeros((3, size, size), dtype=np.uint8)
    centers = np.array([[5.5, 20.5], [25.0, 8.0]])
    half = np.array([[1.0, 3.0], [2.0, 2.0]])
    tile[:, 20, 5] = 255  # a bright dot under unit 0
    for k in range(4):
        for flip in (False, True):
            t, c, h = augment_geometry(tile, centers, half, size, k, flip)
            j, i = np.floor(c[0]).astype(int)
            assert t[0, i, j] == 255, (k, flip)
            assert t[0].sum() == 255
            assert np.allclose(sorted(h[0]), [1.0, 3.0])
            assert (h[0, 0] == 1.0) == (k % 2 == 0)


def test_hed_jitter() -> None:
    rng = np.random.default_rng(0)
    tile = rng.integers(60, 250, size=(3, 16, 16), dtype=np.uint8)
    same = hed_jitter(tile, rng, sigma=0.0, bias=0.0)
    assert np.abs(same.astype(int) - tile).max() <= 1  # colour deconvolution round trip
    moved = hed_jitter(tile, np.random.default_rng(1), sigma=0.2, bias=0.05)
    assert moved.dtype == np.uint8
    assert moved.shape == tile.shape
    assert np.abs(moved.astype(int) - tile).mean() > 2


def test_tile_dataset_supervises_complete_units_and_is_seeded() -> None:
    sdata = helpers.make_sdata(size=192, radius=6.0)
    sections = _sections(sdata)
    ds = TileDataset(sections, model_um_per_px=1.0, tile_size=64, output_stride=4, n_tiles=6, seed=3)
    item = ds[2]
    assert item["image"].shape == (3, 64, 64)
    weights, targets = item["tables"][0]
    assert weights.shape == (len(targets), 16 * 16)
    assert len(targets) >= 4
    # every supervised unit lies completely inside: its full disk area (in map pixels) is covered
    np.testing.assert_allclose(np.asarray(weights.sum(axis=1)).ravel(), np.pi * (6 / 4) ** 2, rtol=0.03)
    again = ds[2]
    np.testing.assert_array_equal(again["image"], item["image"])
    assert (again["tables"][0][0] != weights).nnz == 0
    next_epoch = ds[2 + len(ds)]
    assert not np.array_equal(next_epoch["image"], item["image"])
    batch = collate_tiles([ds[i] for i in range(3)])
    w, y = sparse_weights(batch["tables"][0]), batch["tables"][0]["targets"]
    assert batch["image"].shape == (3, 3, 64, 64)
    assert tuple(w.shape) == (len(y), 3 * 16 * 16)


def test_tile_targets_follow_augmented_image() -> None:
    """The unit with the brightest red under it carries the highest gene-0 target, whatever the augmentation."""
    sdata = helpers.make_sdata(size=192, radius=6.0)
    sections = _sections(sdata, space="counts")
    ds = TileDataset(sections, model_um_per_px=1.0, tile_size=64, output_stride=1, n_tiles=20, seed=0)
    agree = []
    for i in range(len(ds)):
        item = ds[i]
        weights, targets = item["tables"][0]
        red = weights @ item["image"][0].astype(float).ravel() / np.asarray(weights.sum(axis=1)).ravel()
        if len(targets) > 3:
            agree.append(np.corrcoef(red, targets[:, 0])[0, 1])
    assert np.mean(agree) > 0.5


def test_split_and_unit_crops() -> None:
    sdata = helpers.make_sdata(size=128)
    sections = _sections(sdata)
    train, val = split_by_position(sections, 0.25)
    tr, va = train[0].units[0].allowed, val[0].units[0].allowed
    assert not np.any(tr & va)
    assert np.all(tr | va)
    assert va.mean() == pytest.approx(0.25, abs=0.1)
    assert sections[0].units[0].centers[va, 0].min() > sections[0].units[0].centers[tr, 0].max()
    ds = UnitCropDataset(val, model_um_per_px=1.0, crop_size=16)
    assert len(ds) == int(va.sum())
    item = ds[0]
    u = np.flatnonzero(va)[0]
    assert item["image"].shape == (3, 16, 16)
    np.testing.assert_array_equal(item["target"], sections[0].units[0].targets[u])


@pytest.mark.parametrize(("image_um", "tile_size"), [(1.0, 64), (0.7, 48)])
def test_cover_supervises_every_unit_exactly_once(image_um, tile_size) -> None:
    """Validation tiles: each allowed unit once, completely inside its tile, with its own target."""
    sdata = helpers.make_sdata(size=192, radius=6.0, um_per_px=image_um)
    sections = _sections(sdata, table_keys=("table", "table"))  # two tables share units: each is covered
    allowed = sections[0].units[0].allowed.copy()
    allowed[::3] = False
    sections = [sections[0].subset([allowed, np.ones_like(allowed)])]
    ds = CoverTileDataset(sections, model_um_per_px=1.0, tile_size=tile_size, output_stride=2)
    assert len(ds) < allowed.sum()  # tiles hold several units
    seen = [[], []]
    n_map = tile_size // 2
    for i in range(len(ds)):
        item = ds[i]
        for t, (weights, targets) in enumerate(item["tables"]):
            idx = ds.tiles[i][2][t]
            seen[t].extend(idx.tolist())
            # complete footprints: the disk's whole area (in map pixels) lies inside the tile
            radius_map = 6.0 * image_um / 1.0 / 2  # image px → µm → model px (1 µm) → map px (stride 2)
            np.testing.assert_allclose(np.asarray(weights.sum(axis=1)).ravel(), np.pi * radius_map**2, rtol=0.03)
            np.testing.assert_array_equal(targets, sections[0].units[t].targets[idx])
            assert weights.shape[1] == n_map * n_map
    assert sorted(seen[0]) == np.flatnonzero(allowed).tolist()
    assert sorted(seen[1]) == list(range(len(allowed)))
    np.testing.assert_array_equal(ds[0]["image"], ds[0]["image"])  # fixed tiles, no augmentation
    capped = CoverTileDataset(sections, model_um_per_px=1.0, tile_size=tile_size, output_stride=2, n_tiles=2)
    assert len(capped) == 2
    assert all(any(np.array_equal(c[1], d[1]) for d in ds.tiles) for c in capped.tiles)
