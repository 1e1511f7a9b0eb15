"""``st.io.read_xenium`` end to end on a folder in Xenium Onboard Analysis' own layout, then training and prediction.

A synthetic section with a cell layout (``st.datasets.synthetic(layout="cells")``: an H&E, cell territories as
labels, counts per cell) is rendered into an XOA 1.0 output folder: ``experiment.xenium``, ``cells.zarr.zip``
(zarr v2 in a zip: cell ids and the nucleus / cell masks at the morphology image's 0.2125 µm per pixel),
``cell_feature_matrix.h5`` (genes and control probes), ``cells.parquet``, ``transcripts.parquet`` (one row per
count, inside its cell), ``cell_boundaries.parquet`` / ``nucleus_boundaries.parquet``, and the post-Xenium H&E as
``*he_image.ome.tif`` with its ``*he_imagealignment.csv`` (H&E pixels → morphology pixels). XOA < 1.3 keeps
integer cell ids (no prefix/suffix encoding), equal to the mask values. The folder is read back with
``st.io.read_xenium`` (spatialdata-io parses it), and a tiny PixNet is trained for one epoch on the cells, run over
the slide and aggregated into the cells (circles and the raster labels).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
from _tenx_files import write_10x_h5

import stpredict as st
from stpredict._geometry import affine_between, apply_affine, scale_levels, to_um_affine, um_per_px

UM = 1.0  # µm per pixel of the synthetic H&E
PIXEL_SIZE = 0.2125  # µm per pixel of Xenium's morphology image (and of the masks in cells.zarr.zip)
OFFSET_UM = (37.0, 21.5)  # where the H&E's pixel corner (0, 0) lies in Xenium's µm coordinates (x, y)
CONTROLS = {"NegControlProbe_00001": "Negative Control Probe", "BLANK_0001": "Blank Codeword"}
READ = {"morphology_focus": False, "morphology_mip": False}  # cells as circles: read_xenium's default
FIT = {"max_epochs": 1, "batch_size": 4, "tiles_per_epoch": 8, "device": "cpu", "show_progress_bar": False}

_NY = 256  # H&E rows of the synthetic section (its size in µm / UM)
# np.rot90(rgb, -1) pixel corner (x', y') shows the section at (y', NY - x'): rotated px → section px
_ROT90 = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, _NY], [0.0, 0.0, 1.0]])


def _alignment(rotate: bool = False) -> np.ndarray:
    """The 3 × 3 affine from H&E pixels to morphology pixels (x, y, 1); ``rotate``: the H&E turned 90° clockwise."""
    scale = UM / PIXEL_SIZE
    matrix = np.array([[scale, 0.0, OFFSET_UM[0] / PIXEL_SIZE], [0.0, scale, OFFSET_UM[1] / PIXEL_SIZE], [0, 0, 1]])
    return matrix @ _ROT90 if rotate else matrix


def _counts(sdata) -> np.ndarray:
    x = sdata.tables["table"].X
    return np.asarray(x.todense() if hasattr(x, "todense") else x).astype(np.int64)


def _rgb(sdata) -> np.ndarray:
    return np.asarray(scale_levels(sdata.images["he"])[0].values).transpose(1, 2, 0)


def _write_cells_zarr(path, cell_id: np.ndarray, nuclei: np.ndarray, cells: np.ndarray) -> None:
    """``cells.zarr.zip`` as XOA 1.0 writes it: a zarr v2 group in a zip with ``cell_id`` and ``masks/{0,1}``."""
    import zarr

    store = zarr.storage.ZipStore(path, mode="w")
    root = zarr.open_group(store, mode="w", zarr_format=2)
    root.create_array("cell_id", data=cell_id.astype(np.uint32), chunks=(max(len(cell_id), 1),))
    masks = root.create_group("masks")
    for name, mask in (("0", nuclei), ("1", cells)):
        masks.create_array(name, data=mask.astype(np.uint32), chunks=(512, 512))
    store.close()


def _polygons(cell_id: np.ndarray, centres_um: np.ndarray, radii_um: np.ndarray) -> pd.DataFrame:
    """Boundary vertices (closed 13-gons, rows of one cell contiguous) in µm, as ``*_boundaries.parquet``."""
    angles = np.linspace(0.0, 2 * np.pi, 13)  # the last vertex repeats the first
    x = centres_um[:, :1] + radii_um[:, None] * np.cos(angles)
    y = centres_um[:, 1:] + radii_um[:, None] * np.sin(angles)
    return pd.DataFrame(
        {
            "cell_id": np.repeat(cell_id, angles.size),
            "vertex_x": x.ravel().astype(np.float32),
            "vertex_y": y.ravel().astype(np.float32),
        }
    )


def _transcripts(labels: np.ndarray, ids: np.ndarray, counts: np.ndarray, genes: list[str], rng) -> pd.DataFrame:
    """One transcript per count, at a random point of a random H&E pixel of its cell (µm, Xenium's frame).

    Cell ``k`` (1-based) is the territory ``ids[k - 1]`` of ``labels``. The control probes' counts (the last columns
    of ``counts``) are transcripts too (filtered out by ``gex_only``); gene transcripts outside every cell have
    ``cell_id = -1`` and are in no count.
    """
    flat = labels.ravel()
    order = np.argsort(flat, kind="stable")
    starts = np.searchsorted(flat[order], np.arange(int(flat.max()) + 2))

    def in_cell(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        gene = np.repeat(np.arange(counts.shape[1]), counts[k])
        pixels = order[starts[ids[k]] : starts[ids[k] + 1]]
        return np.full(gene.size, k + 1), gene, rng.choice(pixels, gene.size)

    cell_id, gene, pixel = (np.concatenate(parts) for parts in zip(*map(in_cell, range(ids.size)), strict=True))
    outside = rng.choice(np.flatnonzero(flat == 0), 200)
    cell_id = np.concatenate([cell_id, np.full(outside.size, -1)])
    gene = np.concatenate([gene, rng.integers(0, len(genes), outside.size)])
    pixel = np.concatenate([pixel, outside])
    y, x = np.divmod(pixel, labels.shape[1])
    x_um = (x + rng.uniform(0.1, 0.9, x.size)) * UM + OFFSET_UM[0]
    y_um = (y + rng.uniform(0.1, 0.9, y.size)) * UM + OFFSET_UM[1]
    names = np.array(genes + list(CONTROLS), dtype=object)
    return pd.DataFrame(
        {
            "transcript_id": np.arange(x.size, dtype=np.uint64) + 281_474_976_710_656,
            "cell_id": cell_id.astype(np.int64),
            "overlaps_nucleus": np.zeros(x.size, dtype=np.uint8),
            "feature_name": [n.encode() for n in names[gene]],  # XOA 1.0 stores bytes
            "x_location": x_um.astype(np.float32),
            "y_location": y_um.astype(np.float32),
            "z_location": rng.uniform(10.0, 20.0, x.size).astype(np.float32),
            "qv": rng.uniform(20.0, 40.0, x.size).astype(np.float32),
        }
    )


def _morphology_masks(labels: np.ndarray, lut: np.ndarray, centres_px: np.ndarray, nucleus_r_px: np.ndarray):
    """Cell and nucleus masks on the morphology pixel grid, sampled from the H&E-resolution territories."""
    ny, nx = labels.shape
    shape = (int(np.ceil((ny * UM + OFFSET_UM[1]) / PIXEL_SIZE)), int(np.ceil((nx * UM + OFFSET_UM[0]) / PIXEL_SIZE)))
    x_he = ((np.arange(shape[1]) + 0.5) * PIXEL_SIZE - OFFSET_UM[0]) / UM  # morphology pixel centres in H&E px
    y_he = ((np.arange(shape[0]) + 0.5) * PIXEL_SIZE - OFFSET_UM[1]) / UM
    inside_x, inside_y = (x_he >= 0) & (x_he < nx), (y_he >= 0) & (y_he < ny)
    cells = np.zeros(shape, dtype=np.uint32)
    sub = labels[np.floor(y_he[inside_y]).astype(int)][:, np.floor(x_he[inside_x]).astype(int)]
    cells[np.ix_(inside_y, inside_x)] = lut[sub]
    # nuclei: the part of each cell within its nucleus radius of the cell centre
    centre = np.vstack([[np.nan, np.nan], centres_px])[cells]
    radius = np.concatenate([[0.0], nucleus_r_px])[cells]
    d2 = (x_he[None, :] - centre[..., 0]) ** 2 + (y_he[:, None] - centre[..., 1]) ** 2
    nuclei = np.where(d2 <= radius**2, cells, 0).astype(np.uint32)
    return nuclei, cells


def _write_he(folder, rgb: np.ndarray, alignment: np.ndarray, prefix: str = "Xenium_V1_synthetic") -> None:
    """The post-Xenium H&E: pyramidal OME-TIFF (y, x, rgb) and its alignment CSV (3 × 3, no header)."""
    path = folder / f"{prefix}_he_image.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(rgb, photometric="rgb", subifds=1, metadata={"axes": "YXS"}, tile=(128, 128))
        tif.write(rgb[::2, ::2], photometric="rgb", subfiletype=1, tile=(128, 128))
    np.savetxt(folder / f"{prefix}_he_imagealignment.csv", alignment, delimiter=",")


# --------------------------------------------------------------------------- the folder


@pytest.fixture(scope="module")
def section():
    return st.datasets.synthetic(shape_um=(256.0, 256.0), um_per_px=UM, n_genes=6, layout="cells", seed=2)


@pytest.fixture(scope="module")
def xenium_outs(section, tmp_path_factory):
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("xenium") / "outs"
    root.mkdir()
    table = section.tables["table"]
    labels = np.asarray(section.labels["cells"])
    assert labels.shape == (_NY, _NY)
    ids = table.obs["instance_id"].to_numpy()
    n = ids.size
    cell_id = np.arange(1, n + 1)  # XOA 1.0: integer ids 1..N, the values of the masks
    lut = np.zeros(int(labels.max()) + 1, dtype=np.uint32)
    lut[ids] = cell_id
    centres_px = table.obsm["spatial"]  # H&E pixels
    centres_um = centres_px * UM + np.asarray(OFFSET_UM)
    area_um2 = np.bincount(labels.ravel(), minlength=lut.size)[ids] * UM * UM
    nucleus_area_um2 = 0.3 * area_um2

    specs = {
        "run_name": "synthetic",
        "region_name": "section",
        "panel_name": "synthetic panel",
        "panel_num_targets_predesigned": len(table.var_names),
        "pixel_size": PIXEL_SIZE,
        "instrument_sw_version": "1.0.2.0",
        "analysis_sw_version": "xenium-1.0.2.0",
    }
    (root / "experiment.xenium").write_text(json.dumps(specs, indent=2))

    genes = list(table.var_names)
    counts = _counts(section)
    controls = rng.poisson(0.2, (n, len(CONTROLS)))
    matrix = np.hstack([counts, controls])
    features = dict.fromkeys(genes, "Gene Expression") | CONTROLS  # name → feature type
    write_10x_h5(
        root / "cell_feature_matrix.h5",
        matrix,
        [str(i) for i in cell_id],
        list(features),
        ids=list(features),
        feature_types=list(features.values()),
        genome="Unknown",
    )
    pd.DataFrame(
        {
            "cell_id": cell_id,
            "x_centroid": centres_um[:, 0],
            "y_centroid": centres_um[:, 1],
            "transcript_counts": counts.sum(axis=1),
            "control_probe_counts": controls[:, 0],
            "control_codeword_counts": controls[:, 1],
            "total_counts": matrix.sum(axis=1),
            "cell_area": area_um2,
            "nucleus_area": nucleus_area_um2,
        }
    ).to_parquet(root / "cells.parquet")
    _transcripts(labels, ids, matrix, genes, rng).to_parquet(root / "transcripts.parquet")
    _polygons(cell_id, centres_um, np.sqrt(area_um2 / np.pi)).to_parquet(root / "cell_boundaries.parquet")
    nucleus_r_um = np.sqrt(nucleus_area_um2 / np.pi)
    _polygons(cell_id, centres_um, nucleus_r_um).to_parquet(root / "nucleus_boundaries.parquet")
    nuclei, cells = _morphology_masks(labels, lut, centres_px, nucleus_r_um / UM)
    _write_cells_zarr(root / "cells.zarr.zip", cell_id, nuclei, cells)
    _write_he(root, _rgb(section), _alignment())
    return root


def _read(folder):
    return st.io.read_xenium(folder, **READ)  # spatialdata-io reads this layout without a warning


def _truth_order(sdata) -> np.ndarray:
    """Row of the synthetic table for each row of the table read (Xenium cell id k is synthetic row k - 1)."""
    return sdata.tables["table"].obs["cell_id"].to_numpy().astype(np.int64) - 1


# --------------------------------------------------------------------------- tests


def test_xenium_layout_round_trips_counts_centroids_and_scale(section, xenium_outs):
    sdata = _read(xenium_outs)
    truth = section.tables["table"]
    table = sdata.tables["table"]
    order = _truth_order(sdata)
    assert sorted(order) == list(range(truth.n_obs))
    # genes only (gex_only drops the control probes), counts per cell as float32 csr
    assert list(table.var_names) == list(truth.var_names)
    assert table.X.dtype == np.float32
    np.testing.assert_array_equal(table.X.toarray(), _counts(section)[order])
    attrs = table.uns["spatialdata_attrs"]
    assert (attrs["region"], attrs["instance_key"]) == ("cell_circles", "cell_id")
    # centroids: Xenium µm in obsm (as spatialdata-io stores them); in the "um" system, the H&E's µm frame
    centres_px = truth.obsm["spatial"][order]
    np.testing.assert_allclose(table.obsm["spatial"], centres_px * UM + np.asarray(OFFSET_UM), atol=1e-9)
    circles = sdata.shapes["cell_circles"].loc[table.obs["cell_id"].to_numpy()]
    xy = np.column_stack([circles.geometry.x, circles.geometry.y])
    np.testing.assert_allclose(apply_affine(to_um_affine(sdata, "cell_circles"), xy), centres_px * UM, atol=1e-9)
    area_um2 = np.pi * (circles["radius"].to_numpy() * um_per_px(sdata, "cell_circles")) ** 2
    np.testing.assert_allclose(area_um2, table.obs["cell_area"].to_numpy(), rtol=1e-9)
    # the H&E pixel for pixel, its µm per pixel inferred from the transcripts (µm) through the alignment
    assert um_per_px(sdata, "he") == pytest.approx(UM, rel=1e-9)
    np.testing.assert_array_equal(_rgb(sdata), _rgb(section))
    np.testing.assert_allclose(affine_between(sdata, "he", "cell_labels"), _alignment(), atol=1e-9)
    assert um_per_px(sdata, "cell_labels") == pytest.approx(PIXEL_SIZE, rel=1e-9)
    # the raster cells: each cell's pixels, in µm, centre on the synthetic cell (within a morphology pixel)
    masks = np.asarray(scale_levels(sdata.labels["cell_labels"])[0].values)
    yy, xx = np.indices(masks.shape)
    n_px = np.bincount(masks.ravel(), minlength=truth.n_obs + 1)
    mean_xy = np.column_stack(
        [np.bincount(masks.ravel(), weights=(a + 0.5).ravel(), minlength=n_px.size) for a in (xx, yy)]
    )
    ids = table.obs["cell_id"].to_numpy()
    label_um = apply_affine(to_um_affine(sdata, "cell_labels"), mean_xy[ids] / n_px[ids, None])
    np.testing.assert_allclose(label_um, centres_px * UM, atol=PIXEL_SIZE)
    # transcripts: in the "um" system each one lies in a pixel of its own cell; per cell and gene they are the counts
    points = sdata.points["transcripts"].compute()
    xy_um = apply_affine(to_um_affine(sdata, "transcripts"), points[["x", "y"]].to_numpy())
    labels = np.asarray(section.labels["cells"])
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    lut[truth.obs["instance_id"].to_numpy()] = np.arange(1, truth.n_obs + 1)
    px = np.floor(xy_um / UM).astype(int)
    np.testing.assert_array_equal(lut[labels[px[:, 1], px[:, 0]]], np.maximum(points["cell_id"].to_numpy(), 0))
    assert set(points["feature_name"].cat.categories) == {*truth.var_names, *CONTROLS}
    genes = points[(points["cell_id"] > 0) & points["feature_name"].isin(truth.var_names)]
    per_cell = pd.crosstab(genes["cell_id"], genes["feature_name"].astype(str))
    per_cell = per_cell.reindex(index=ids, columns=truth.var_names, fill_value=0)
    np.testing.assert_array_equal(per_cell.to_numpy(), table.X.toarray())


def test_xenium_cell_labels_fall_on_their_cells_in_the_he(section, xenium_outs):
    """The H&E averaged over each raster cell (at 0.2125 µm, through the alignment) is its synthetic territory's."""
    sdata = _read(xenium_outs)
    he = st.tl.aggregate(sdata, "he", labels_key="cell_labels", reduce="mean", inplace=False, show_progress_bar=False)
    labels = np.asarray(section.labels["cells"])
    ids = section.tables["table"].obs["instance_id"].to_numpy()
    n_px = np.bincount(labels.ravel())[ids]
    rgb = _rgb(section).astype(np.float64)
    truth = np.column_stack([np.bincount(labels.ravel(), weights=rgb[..., k].ravel())[ids] / n_px for k in range(3)])
    order = he.obs["instance_id"].to_numpy().astype(np.int64) - 1
    assert sorted(order) == list(range(ids.size))
    assert list(he.var_names) == ["r", "g", "b"]
    np.testing.assert_allclose(np.asarray(he.X), truth[order], atol=8.0)  # 0-255; cells differ by ~35 (sd)
    # the cells' areas in H&E pixels (1 µm²): the same up to resampling the territories to the morphology grid
    np.testing.assert_allclose(he.obs["n_pixels"].to_numpy(), n_px[order], rtol=0.05)


def test_xenium_layout_rotated_he_round_trips(section, xenium_outs, tmp_path):
    """An H&E scanned turned 90° clockwise: its alignment carries the rotation, the µm frame is the H&E's."""
    folder = tmp_path / "outs"
    folder.mkdir()
    for path in xenium_outs.iterdir():
        if "_he_image" not in path.name:
            (folder / path.name).symlink_to(path)
    rotated = np.ascontiguousarray(np.rot90(_rgb(section), -1))
    _write_he(folder, rotated, _alignment(rotate=True))
    sdata = _read(folder)
    assert um_per_px(sdata, "he") == pytest.approx(UM, rel=1e-9)
    np.testing.assert_array_equal(_rgb(sdata), rotated)
    np.testing.assert_allclose(affine_between(sdata, "he", "cell_labels"), _alignment(rotate=True), atol=1e-9)
    table = sdata.tables["table"]
    circles = sdata.shapes["cell_circles"].loc[table.obs["cell_id"].to_numpy()]
    xy_um = apply_affine(to_um_affine(sdata, "cell_circles"), np.column_stack([circles.geometry.x, circles.geometry.y]))
    centres_px = section.tables["table"].obsm["spatial"][_truth_order(sdata)]
    np.testing.assert_allclose(xy_um, apply_affine(np.linalg.inv(_ROT90), centres_px) * UM, atol=1e-9)


def test_xenium_layout_trains_predicts_and_aggregates_into_cells(xenium_outs):
    sdata = _read(xenium_outs)
    table = sdata.tables["table"]
    genes = list(table.var_names)
    model = st.models.PixNet(
        genes, tile_size=32, decoder_channels=(8, 16, 16, 32, 32, 32), um_per_px=4 * UM, output_stride=1, seed=0
    ).fit(sdata, **FIT)
    assert len(model.fit_history["train_loss"]) == 1
    assert np.isfinite(model.fit_history["train_loss"][0])
    st.tl.predict_dense(sdata, model, tissue_only=False, show_progress_bar=False)
    assert scale_levels(sdata.images["he_pixnet"])[0].shape == (6, 64, 64)  # 256 µm at 4 µm per pixel
    assert um_per_px(sdata, "he_pixnet") == pytest.approx(4 * UM)
    circles = st.tl.aggregate(sdata, "he_pixnet", shapes_key="cell_circles", inplace=False, show_progress_bar=False)
    cells = st.tl.aggregate(sdata, "he_pixnet", labels_key="cell_labels", inplace=False, show_progress_bar=False)
    ids = table.obs["cell_id"].to_numpy()
    for pred in (circles, cells):
        assert list(pred.var_names) == genes
        np.testing.assert_array_equal(pred.obs["instance_id"].to_numpy(), ids)  # one row per cell, in table order
        assert np.isfinite(np.asarray(pred.X)).all()
    # each circle has the cell's area (exact pixel overlap, 16 µm² map pixels); the raster cell about the same
    area = table.obs["cell_area"].to_numpy()
    np.testing.assert_allclose(circles.obs["n_pixels"].to_numpy() * 16 * UM**2, area, rtol=1e-6)
    np.testing.assert_allclose(cells.obs["n_pixels"].to_numpy() * 16 * UM**2, area, rtol=0.05)
