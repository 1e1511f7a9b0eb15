"""MagNet end to end: window batches, faithful vs default, fit, save/load, predict_dense → aggregate, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stpredict as st
from stpredict.errors import InputError
from stpredict.models import DenseModel, MagNet
from stpredict.models._magnet._data import WindowDataset, prepare_sections
from stpredict.models._magnet._geometry import isolated_nodes

# image and model at 2 µm/px: 8 µm bins = 4 px, crops 14 px, spot tiles 28 px, region tiles 64 px
TINY = {
    "um_per_px": 2.0,
    "encoder": "test_efficientnet",
    "pretrained": None,
    "dim": 16,
    "num_heads": 2,
    "depth": 2,
    "n_layers": 1,
    "core_tiles": 1,
}
NORM = {"method": "log1p_cpm", "target_sum": 1e4, "layer": None}


@pytest.fixture(scope="module")
def sdata():
    return st.datasets.synthetic(
        shape_um=(512, 512), um_per_px=2.0, n_genes=6, layout="visium_hd", bin_size_um=8, seed=3, min_tissue_fraction=0
    )


@pytest.fixture(scope="module")
def genes(sdata):
    return list(sdata.tables["table"].var_names[:4])


@pytest.fixture(scope="module")
def trained(sdata, genes):
    model = MagNet(genes, **TINY)
    model.fit(sdata, max_epochs=1, batches_per_epoch=2, show_progress_bar=False, device="cpu")
    return model


def test_is_a_dense_model(genes):
    model = MagNet(genes, **TINY)
    assert isinstance(model, DenseModel)
    assert (model.output_stride, model.context, model.tile_size) == (4, 64, 3 * 64)
    assert (model.tiling, model.value_kind) == ("partition", "intensive")


def test_faithful_and_default_forward_shapes(sdata, genes):
    outs = {}
    for faithful in (False, True):
        model = MagNet(genes, faithful=faithful, **TINY)
        sections = prepare_sections(
            model, sdata, image_key="he", table_key="table", shapes_key=None, target_layer=None, normalization=NORM
        )
        ds = WindowDataset(
            sections, model, n_batches=1, window_cells=1, halo_px=model.halo_px, batch_bins=64,
            shuffle_bins=faithful, augment=False, seed=0,
        )  # fmt: skip
        batch = ds[0]
        with torch.no_grad():
            out = model.module.eval()(batch)
        outs[faithful] = (model, batch, out)
        n_bins = batch["crops"].shape[0]
        assert out["bin"].shape == (n_bins, len(genes))
        assert out["region"].shape == (batch["region_feats"].shape[0], len(genes))
        assert out["spot"].shape == (batch["spot_feats"].shape[0], len(genes))
        assert batch["bin_region"].shape == (n_bins, 1 if faithful else 9)
    default, faithful = outs[False][0].module, outs[True][0].module
    assert (len(default.heads), len(faithful.heads)) == (3, 1)
    assert all(p.requires_grad for p in default.context_proj.parameters())
    assert not any(p.requires_grad for p in faithful.context_proj.parameters())
    assert not any(p.requires_grad for p in default.context_encoder.parameters())
    assert outs[True][1]["crops"].shape[0] == 64  # the paper's shuffled batch of measured bins


def test_window_batches_are_contiguous(sdata, genes):
    model = MagNet(genes, **TINY)
    sections = prepare_sections(
        model, sdata, image_key="he", table_key="table", shapes_key=None, target_layer=None, normalization=NORM
    )
    bs = sections[0]
    ds = WindowDataset(
        sections, model, n_batches=None, window_cells=1, halo_px=model.halo_px, batch_bins=64, shuffle_bins=False,
        augment=False, seed=0,
    )  # fmt: skip
    assert len(ds) == len(bs.windows)
    batch = ds[0]
    n = batch["crops"].shape[0]
    # a 64 px region tile holds 16 × 16 bins of 4 px; the 16 µm halo adds 2 rings of bins: 20 × 20 positions
    assert n == 20 * 20
    assert int(batch["bin_mask"].sum()) <= 16 * 16
    edges = batch["bin_edges"].numpy()
    assert isolated_nodes(edges, n).size == 0
    # graph neighbours are grid neighbours: an interior bin's 8 nearest are its 3 × 3 ring (distance ≤ √2 bins)
    idx = np.arange(n).reshape(20, 20)
    interior = np.isin(edges[1], idx[1:-1, 1:-1].ravel())
    pos = np.stack(np.divmod(np.arange(n), 20), 1)
    d = np.linalg.norm(pos[edges[0]] - pos[edges[1]], axis=1)
    assert d[interior].max() <= np.sqrt(2) + 1e-9
    # labels come from the measured bins at those grid positions, and only core positions carry a loss
    from stpredict.models._magnet._geometry import window_bins

    cx, cy = bs.windows[0]
    r = model.region_px
    rows, cols, in_core = window_bins((cx * r, cy * r, (cx + 1) * r, (cy + 1) * r), bs.origin, bs.pitch, model.halo_px)
    index = bs.lookup(rows, cols)
    mask = batch["bin_mask"].numpy()
    np.testing.assert_array_equal(mask, in_core & (index >= 0))
    np.testing.assert_array_equal(batch["y_bin"].numpy()[mask], bs.targets[index[mask]])
    # the centre token is the bin's own region tile, the window's core cell for core bins
    centre = batch["bin_region"][:, 4].numpy()
    assert (centre[batch["bin_mask"].numpy()] >= 0).all()


def test_tile_labels_are_normalised_sums(sdata, genes):
    model = MagNet(genes, **TINY)
    st.pp.normalize(sdata.tables["table"], method="prop_log", key_added="prop_log")
    record = sdata.tables["table"].uns["stpredict"]["normalize"]["prop_log"]
    sections = prepare_sections(
        model, sdata, image_key="he", table_key="table", shapes_key=None, target_layer="prop_log", normalization=record
    )
    bs = sections[0]
    cache = bs.levels["region"]
    table = sdata.tables["table"]
    counts = table.X.toarray() if hasattr(table.X, "toarray") else np.asarray(table.X)
    centres = bs.centres(bs.rows, bs.cols)
    cells = np.floor(centres / model.region_px).astype(int)
    k = int(np.flatnonzero(cache.labelled)[0])
    inside = (cells == cache.cells[k]).all(axis=1)
    sums = counts[inside].sum(axis=0)
    expected = np.log1p(sums / sums.sum() * record["scale"])[table.var_names.get_indexer(genes)]
    np.testing.assert_allclose(cache.labels[k], expected, rtol=1e-5)
    np.testing.assert_allclose(bs.targets, table.layers["prop_log"][:, table.var_names.get_indexer(genes)], rtol=1e-6)


def test_fit_records_history(trained):
    assert len(trained.fit_history["train_loss"]) == 1
    assert np.isfinite(trained.fit_history["train_loss"]).all()
    assert trained.normalization["method"] == "log1p_cpm"


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "m")
    loaded = st.models.load(tmp_path / "m")
    assert isinstance(loaded, MagNet)
    assert loaded.config == trained.config
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (1, 3, 192, 192), dtype=np.uint8)
    np.testing.assert_array_equal(
        trained.predict_tiles(tiles, origins=[[0, 0]], device="cpu"),
        loaded.predict_tiles(tiles, origins=[[0, 0]], device="cpu"),
    )


def test_predict_dense_then_aggregate_gives_the_bins_back(sdata, trained):
    st.tl.predict_dense(sdata, trained, key_added="magnet", tissue_only=False, show_progress_bar=False, overwrite=True)
    image = sdata.images["magnet"]["scale0"]["image"].values
    assert image.shape == (4, 64, 64)  # one map pixel per 8 µm bin of the 512 µm section
    st.tl.aggregate(sdata, "magnet", bin_size=8, key_added="magnet_8um", overwrite=True)
    table = sdata.tables["magnet_8um"]
    rows, cols = table.obs["array_row"].to_numpy(), table.obs["array_col"].to_numpy()
    np.testing.assert_array_equal(np.asarray(table.X), image[:, rows, cols].T)
    # the map's pixels are the model's per-bin predictions: tile k = 1 (origin 0) predicts core bins 16 … 31
    he = np.asarray(sdata.images["he"]["scale0"]["image"].values)
    direct = trained.predict_tiles(he[None, :, :192, :192], origins=[[0, 0]], device="cpu")[0]
    np.testing.assert_array_equal(direct[:, 16:32, 16:32], image[:, 16:32, 16:32])


def test_partition_tiling_refuses_another_overlap(sdata, trained):
    with pytest.raises(InputError, match="overlap_um=None"):
        st.tl.predict_dense(sdata, trained, key_added="x", overlap_um=40.0, tissue_only=False)


# ------------------------------------------------------------------------------------------------ bad input
def _prepare(model, sdata, table_key="table"):
    return prepare_sections(
        model, sdata, image_key="he", table_key=table_key, shapes_key=None, target_layer=None, normalization=NORM
    )


def _shifted(sdata, dx):
    from spatialdata import SpatialData

    shapes = sdata.shapes["bins"].copy()
    shapes["geometry"] = shapes.geometry.translate(xoff=dx)
    return SpatialData(
        images={"he": sdata.images["he"]}, shapes={"bins": shapes}, tables={"table": sdata.tables["table"]}
    )


def test_bins_off_the_grid_are_refused(sdata, genes):
    from spatialdata import SpatialData

    shapes = sdata.shapes["bins"].copy()
    jitter = np.random.default_rng(0).uniform(-2, 2, len(shapes))
    shapes["geometry"] = [
        g.__class__(np.asarray(g.exterior.coords) + [d, 0]) for g, d in zip(shapes.geometry, jitter, strict=True)
    ]
    bad = SpatialData(
        images={"he": sdata.images["he"]}, shapes={"bins": shapes}, tables={"table": sdata.tables["table"]}
    )
    with pytest.raises(InputError, match="bin_counts"):
        _prepare(MagNet(genes, **TINY), bad)


def test_bins_outside_the_image_are_refused(sdata, genes):
    with pytest.raises(InputError, match="outside image"):
        _prepare(MagNet(genes, **TINY), _shifted(sdata, 2000.0))


def test_other_bin_size_is_refused(sdata, genes):
    with pytest.raises(InputError, match="16 µm bins"):
        _prepare(MagNet(genes, **{**TINY, "bin_um": 16.0}), sdata)


def test_fewer_bins_than_a_batch(sdata, genes):
    model = MagNet(genes, faithful=True, **TINY)
    with pytest.raises(InputError, match="fewer than one batch"):
        model.fit(sdata, batch_bins=10**6, max_epochs=1, show_progress_bar=False)


def test_slide_smaller_than_a_region_tile(genes):
    small = st.datasets.synthetic(
        shape_um=(96, 96), um_per_px=2.0, n_genes=6, layout="visium_hd", bin_size_um=8, seed=0, min_tissue_fraction=0
    )
    with pytest.raises(InputError, match="smaller than one region tile"):
        _prepare(MagNet(list(small.tables["table"].var_names[:4]), **TINY), small)


def test_geometry_that_does_not_fit_is_refused(genes):
    with pytest.raises(InputError, match="whole number of pixels"):
        MagNet(genes, **{**TINY, "bin_um": 7.0})
    with pytest.raises(InputError, match="multiple of bin_um"):
        MagNet(genes, **{**TINY, "region_um": 132.0})
    with pytest.raises(InputError, match="reach beyond one region tile"):
        MagNet(genes, **{**TINY, "halo_um": 40.0})


def test_context_encoder_with_a_fixed_input_size_is_refused(genes):
    with pytest.raises(InputError, match=r"takes 160 × 160 px inputs.*dynamic_img_size"):
        MagNet(genes, **{**TINY, "context_encoder": "test_vit"})


def test_other_bin_size_at_prediction_needs_force(trained):
    with pytest.raises(InputError, match="force=True"):
        trained.with_bin_size(bin_um=16.0)
    with pytest.warns(UserWarning, match="now predicts 16 µm bins"):
        other = trained.with_bin_size(bin_um=16.0, force=True)
    assert (other.bin_um, other.output_stride) == (16.0, 8)
    for a, b in zip(other.module.state_dict().values(), trained.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_trains_on_2um_bins_summed_with_bin_counts(genes):
    hd = st.datasets.synthetic(
        shape_um=(256, 256), um_per_px=2.0, n_genes=6, layout="visium_hd", bin_size_um=2, seed=1, min_tissue_fraction=0
    )
    st.pp.bin_counts(hd, "table", bin_size=8, key_added="bins_8um")
    model = MagNet(list(hd.tables["table"].var_names[:4]), **TINY)
    sections = _prepare(model, hd, table_key="bins_8um")
    table = hd.tables["bins_8um"]
    assert len(sections[0].rows) == table.n_obs
    # every 8 µm bin holds the summed counts of its sixteen 2 µm bins
    np.testing.assert_allclose(np.asarray(table.X.sum()), np.asarray(hd.tables["table"].X.sum()))


def test_windows_of_several_region_tiles(sdata, genes):
    model = MagNet(genes, **TINY)
    sections = _prepare(model, sdata)
    ds = WindowDataset(
        sections, model, n_batches=None, window_cells=2, halo_px=model.halo_px, batch_bins=64, shuffle_bins=False,
        augment=False, seed=0,
    )  # fmt: skip
    starts = {tuple(c) for _, c in ds.windows}
    assert starts == {tuple(c) for c in np.unique(sections[0].windows // 2, axis=0)}
    assert ds[0]["crops"].shape[0] == (2 * 16 + 4) ** 2  # a 2 × 2 block of region tiles and its halo


def test_target_layer_without_a_normalisation_record_is_refused(sdata, genes):
    table = sdata.tables["table"]
    table.layers["handmade"] = np.log1p(table.X.toarray() if hasattr(table.X, "toarray") else table.X)
    model = MagNet(genes, **TINY)
    with pytest.raises(InputError, match="no record of how it was normalised"):
        model.fit(sdata, target_layer="handmade", max_epochs=1, show_progress_bar=False)
    del table.layers["handmade"]


def _bn_state(model):
    return {k: v.clone() for k, v in model.module.bin_encoder.state_dict().items() if "running_mean" in k}


@pytest.mark.parametrize("faithful", [False, True])
def test_pretrained_bin_encoder_keeps_its_batch_norm_statistics(sdata, genes, tmp_path, faithful):
    """Contiguous windows are not i.i.d. batches: a pretrained bin encoder trains with its running statistics kept
    (its batch-norm weights still train). The faithful variant trains them, as the paper's shuffled loader does."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet", num_classes=0)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, path)
    model = MagNet(genes, **{**TINY, "pretrained": path}, faithful=faithful)
    before = _bn_state(model)
    bn = next(m for m in model.module.bin_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    weight = bn.weight.detach().clone()
    model.module.train()
    assert bn.training is faithful
    assert not model.module.context_encoder.training
    model.fit(sdata, max_epochs=1, batches_per_epoch=1, show_progress_bar=False, device="cpu")
    after = _bn_state(model)
    same = all(torch.equal(before[k], after[k]) for k in before)
    assert same is not faithful
    assert not torch.equal(bn.weight.detach(), weight)  # the affine terms train either way


def test_fit_trains_in_train_mode(sdata, genes):
    """A MagNet is built in eval mode and Lightning keeps the modes it finds: fit must switch dropout on."""
    model = MagNet(genes, **TINY)
    assert not model.module.training
    seen = []
    dropout = next(m for m in model.module.transformer.modules() if isinstance(m, torch.nn.Dropout))
    dropout.register_forward_pre_hook(lambda mod, inp: seen.append(mod.training))
    model.fit(sdata, max_epochs=1, batches_per_epoch=1, show_progress_bar=False, device="cpu")
    assert seen
    assert all(seen)
    assert not model.module.training  # back in eval mode for prediction
    assert model.fit_params["encoder_lr"] == pytest.approx(3e-4 * 0.1)


def test_bin_encoder_learning_rate(sdata, genes):
    from stpredict.models._magnet._fit import _plan_class
    from stpredict.models._magnet._loss import LossWeights

    model = MagNet(genes, **TINY)
    cfg = {"name": "adamw", "lr": 1e-3, "encoder_lr": 1e-5, "weight_decay": 0.0, "total_steps": 1}
    opt = _plan_class()(model.module, weights=LossWeights(), optimizer=cfg).configure_optimizers()
    rest, encoder = opt.param_groups
    assert encoder["lr"] == 1e-5
    assert rest["lr"] == 1e-3
    assert {id(p) for p in encoder["params"]} == {id(p) for p in model.module.bin_encoder.parameters()}
    assert not {id(p) for p in rest["params"]} & {id(p) for p in model.module.context_encoder.parameters()}
    with pytest.raises(InputError, match="encoder_lr must be a positive"):
        model.fit(sdata, encoder_lr=0.0, show_progress_bar=False, device="cpu")
