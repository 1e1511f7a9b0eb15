from __future__ import annotations

import _training_data as helpers
import numpy as np
import pytest
import torch

from stpredict.errors import InputError
from stpredict.models._training import fit, resolve_accelerator

GENES = ["g0", "g1", "g2"]
FAST = {"batch_size": 4, "tiles_per_epoch": 8, "show_progress_bar": False, "device": "cpu"}


@pytest.fixture(scope="module")
def sdata():
    return helpers.make_sdata(size=160)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def test_fit_paper_mode_is_reproducible(sdata) -> None:
    a = helpers.TinyModel(GENES)
    start = _weights(a)
    fit(a, sdata, max_epochs=2, validation_fraction=0.25, **FAST)
    b = helpers.TinyModel(GENES)
    fit(b, sdata, max_epochs=2, validation_fraction=0.25, **FAST)
    wa, wb = _weights(a), _weights(b)
    assert any(not torch.equal(start[k], wa[k]) for k in wa)  # it trained
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # same seed, same weights
    assert len(a.fit_history["train_loss"]) == 2
    assert len(a.fit_history["val_loss"]) == 2
    assert a.fit_history["best_epoch"] == int(np.argmin(a.fit_history["val_loss"]))
    assert a.fit_params["loss"] == "paper"
    assert a.fit_params["reduce"] == "mean"
    assert a.normalization == {"method": "log1p_cpm", "target_sum": 1e4}
    c = helpers.TinyModel(GENES)
    fit(c, sdata, max_epochs=2, validation_fraction=0.25, seed=1, **FAST)
    assert any(not torch.equal(wa[k], v) for k, v in _weights(c).items())


def test_fit_learns_and_restores_best_weights(sdata) -> None:
    model = helpers.TinyModel(GENES)
    val = helpers.make_sdata(size=160, seed=5)
    fit(model, sdata, max_epochs=4, lr=2e-2, validation_data=[val], validation_tiles=8, **FAST)
    hist = model.fit_history
    assert min(hist["val_loss"]) < hist["val_loss"][0]
    assert min(hist["train_loss"]) < hist["train_loss"][0]
    # the restored weights are those of the best epoch: refitting for exactly best_epoch + 1 epochs gives them
    again = helpers.TinyModel(GENES)
    fit(again, sdata, max_epochs=hist["best_epoch"] + 1, lr=2e-2, validation_data=[val], validation_tiles=8, **FAST)
    best, rerun = _weights(model), _weights(again)
    assert all(torch.equal(best[k], rerun[k]) for k in best)


def test_validation_loss_is_taken_over_all_validation_units(sdata) -> None:
    """val_loss of the best epoch = the paper loss of the restored weights over every validation unit at once."""
    from stpredict.models._data import CoverTileDataset, build_sections, collate_tiles, sparse_weights
    from stpredict.models._footprints import aggregate_map
    from stpredict.models._losses import paper_loss

    model = helpers.TinyModel(GENES)
    val = helpers.make_sdata(size=160, seed=5)
    fit(model, sdata, max_epochs=3, lr=2e-2, validation_data=val, **FAST)
    hist = model.fit_history
    sections = build_sections(
        val, image_key="he", table_keys=["table"], shapes_key=None, genes=GENES, space="normalised"
    )
    ds = CoverTileDataset(sections, model_um_per_px=1.0, tile_size=64, output_stride=4, seed=1)
    batch = collate_tiles([ds[i] for i in range(len(ds))])
    entry = batch["tables"][0]
    assert entry["targets"].shape[0] == val.tables["table"].n_obs  # every unit is validated (all fit in a tile)
    with torch.no_grad():
        out = model.module(_normalised(batch["image"]))
        pred = aggregate_map(out, sparse_weights(entry), reduce="mean")
        expected = float(paper_loss(pred, entry["targets"]))
    assert hist["val_loss"][hist["best_epoch"]] == pytest.approx(expected, rel=1e-5)
    assert hist["val_loss"][hist["best_epoch"]] == min(hist["val_loss"])


def _normalised(images: torch.Tensor) -> torch.Tensor:
    from stpredict.models._training import normalize_tiles

    return normalize_tiles(images)


def test_worker_processes_with_validation_give_the_same_model(sdata) -> None:
    """Tiles draw from (seed, epoch, index): reading them in worker processes changes nothing, validation included."""
    val = helpers.make_sdata(size=160, seed=5)
    kwargs = {"max_epochs": 3, "lr": 2e-2, "validation_data": val, **FAST}
    serial, parallel = helpers.TinyModel(GENES), helpers.TinyModel(GENES)
    fit(serial, sdata, **kwargs)
    fit(parallel, sdata, num_workers=2, **kwargs)
    assert parallel.fit_history == serial.fit_history
    a, b = _weights(serial), _weights(parallel)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_density_multiscale() -> None:
    import anndata as ad
    from spatialdata.models import ShapesModel, TableModel

    # a second table: 8 px square bins with their own counts, trained together with the spots
    sdata = helpers.make_sdata(size=160)
    bins_sd = helpers.make_sdata(size=160, squares=True, radius=4.0, spacing=8.0)
    sdata.shapes["bins"] = ShapesModel.parse(bins_sd.shapes["spots"])
    table = bins_sd.tables["table"]
    obs = table.obs.copy()
    obs["region"] = "bins"
    obs["region"] = obs["region"].astype("category")
    new = ad.AnnData(table.X.copy(), obs=obs, var=table.var.copy(), obsm={"spatial": table.obsm["spatial"]})
    sdata.tables["bins_table"] = TableModel.parse(new, region="bins", region_key="region", instance_key="instance_id")
    from stpredict._geometry import set_um_per_px

    set_um_per_px(sdata, "he", 1.0)
    model = helpers.TinyModel(GENES, value_kind="density")
    fit(model, sdata, table_key=["table", "bins_table"], max_epochs=1, **FAST)
    assert model.fit_params["table_keys"] == ["table", "bins_table"]
    assert model.fit_params["loss"] == "nb"
    assert model.fit_params["reduce"] == "sum"
    assert len(model.fit_params["nb_theta"]) == 3
    assert np.isfinite(model.fit_history["train_loss"][0])
    poisson = helpers.TinyModel(GENES, value_kind="density")
    fit(poisson, sdata, table_key="bins_table", loss="poisson", max_epochs=1, **FAST)
    assert np.isfinite(poisson.fit_history["train_loss"][0])


def test_fit_rejects_inconsistent_settings(sdata) -> None:
    model = helpers.TinyModel(GENES)
    with pytest.raises(InputError, match="density map"):
        fit(model, sdata, loss="nb", **FAST)
    with pytest.raises(InputError, match="reduce"):
        fit(helpers.TinyModel(GENES, value_kind="density"), sdata, reduce="mean", **FAST)
    with pytest.raises(InputError, match="genes differ"):
        fit(model, sdata, genes=["g0"], **FAST)
    with pytest.raises(InputError, match="target_layer"):
        fit(helpers.TinyModel(GENES, value_kind="density"), sdata, target_layer="log1p_cpm", **FAST)
    with pytest.raises(InputError, match="validation_fraction"):
        fit(model, sdata, validation_fraction=1.5, **FAST)
    negative = helpers.TinyModel(GENES, value_kind="density")
    negative.module = negative.module[:-1]  # no softplus: the map can go negative
    with torch.no_grad():
        negative.module[-1].bias.fill_(-5.0)
    with pytest.raises(InputError, match="non-negative"):
        fit(negative, sdata, max_epochs=1, **FAST)


def test_resolve_accelerator() -> None:
    assert resolve_accelerator("cpu") == ("cpu", 1)
    assert resolve_accelerator("cuda:1") == ("cuda", [1])
    assert resolve_accelerator("mps") == ("mps", "auto")
    with pytest.raises(InputError, match="Unknown device"):
        resolve_accelerator("tpu7")


class _BiasedTiny(helpers.TinyModel):
    """TinyModel whose network has PixNet's ``set_output_bias`` hook."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        conv = self.module[3]

        @torch.no_grad()
        def set_output_bias(values: torch.Tensor) -> None:
            conv.weight.zero_()
            if self.value_kind == "density":
                values = values + torch.log(-torch.expm1(-values))
            conv.bias.copy_(values)

        self.module.set_output_bias = set_output_bias


@pytest.mark.parametrize(("value_kind", "reduce"), [("intensive", "mean"), ("intensive", "sum"), ("density", "sum")])
def test_output_bias_starts_at_the_mean_target(sdata, value_kind, reduce) -> None:
    from stpredict.models._data import build_sections
    from stpredict.models._training._fit import _mean_target_per_pixel

    space = "normalised" if value_kind == "intensive" else "counts"
    sections = build_sections(sdata, image_key="he", table_keys=["table"], shapes_key=None, genes=GENES, space=space)
    model = _BiasedTiny(GENES, value_kind=value_kind)
    values = _mean_target_per_pixel(sections, model, reduce)
    targets = sections[0].units[0].targets
    area = np.pi * 6.0**2  # radius 6 px at 1 µm/px: the same number in model pixels and µm²
    expected = targets.mean(axis=0) if reduce == "mean" else targets.mean(axis=0) / area
    np.testing.assert_allclose(values, expected, rtol=1e-6)
    # fit(max_epochs=0) only sets the bias: the map is flat at those values
    fit(model, sdata, reduce=reduce, max_epochs=0, **FAST)
    out = model.module(torch.zeros(1, 3, 8, 8)).detach().numpy()[0]
    np.testing.assert_allclose(out[:, 0, 0], expected, rtol=1e-4)


def test_batches_without_complete_units_do_not_break_training(sdata) -> None:
    model = helpers.TinyModel(GENES, tile=8)  # an 8 px tile never holds a whole 12 px spot
    fit(model, sdata, max_epochs=1, **FAST)
    assert model.fit_history["train_loss"] == [0.0]


def test_training_plan_pickles() -> None:
    import pickle

    from stpredict.models._training import _plan

    model = helpers.TinyModel(GENES)
    plan = _plan._make_plan(
        module=model.module,
        inputs="tiles",
        loss="nb",
        reduce="sum",
        pixel_area=1.0,
        pcc_weight=0.5,
        lr=1e-3,
        weight_decay=0.0,
        n_genes=3,
        n_tables=1,
    )
    again = pickle.loads(pickle.dumps(plan))  # DDP spawn and spawn-started workers pickle it
    assert type(again) is _plan._Plan
    assert torch.equal(again.log_theta, plan.log_theta)
    callbacks, best = _plan._make_callbacks(has_val=True, patience=3)
    assert type(pickle.loads(pickle.dumps(best))) is _plan._BestWeights
    assert len(callbacks) == 2


class _EncoderDecoder(torch.nn.Module):
    """TinyModel's layers split into an ``encoder`` and the rest, as PixNet names its parts."""

    def __init__(self, layers: torch.nn.Sequential) -> None:
        super().__init__()
        self.encoder = layers[0]
        self.rest = layers[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rest(self.encoder(x))


def test_encoder_lr_and_cosine_schedule(sdata) -> None:
    """The encoder's parameters train at ``encoder_lr``, the rest at ``lr``; the schedule warms up, then decays."""
    import math

    from stpredict.models._training import _plan

    model = helpers.TinyModel(GENES)
    model.module = _EncoderDecoder(model.module)
    plan = _plan._make_plan(module=model.module, inputs="tiles", loss="paper", reduce="mean", pixel_area=1.0,
                            pcc_weight=0.5, lr=1e-2, weight_decay=0.0, n_genes=3, n_tables=1, encoder_lr=1e-4,
                            lr_schedule="cosine", total_steps=40)  # fmt: skip
    cfg = plan.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]["scheduler"]
    head, enc = opt.param_groups
    assert {id(p) for p in enc["params"]} == {id(p) for p in model.module.encoder.parameters()}
    assert len(head["params"]) == 2  # the 1x1 conv's weight and bias
    lrs = []
    for _ in range(40):
        lrs.append((opt.param_groups[0]["lr"], opt.param_groups[1]["lr"]))
        opt.step()
        sched.step()
    warmup = 2  # 5 % of 40 steps
    for step, (lr, lr_enc) in enumerate(lrs):
        if step < warmup:
            factor = (step + 1) / warmup
        else:
            factor = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (40 - warmup)))
        assert lr == pytest.approx(1e-2 * factor, abs=1e-12)
        assert lr_enc == pytest.approx(1e-4 * factor, abs=1e-14)
    assert lrs[1][0] == pytest.approx(1e-2)  # the peak
    assert lrs[-1][0] < 2e-4  # almost zero at the end

    # through fit: a near-zero encoder_lr leaves the encoder where it was while the rest trains
    start = {k: v.clone() for k, v in model.module.state_dict().items()}
    fit(model, sdata, max_epochs=2, lr=2e-2, encoder_lr=1e-12, lr_schedule="cosine", **FAST)
    after = model.module.state_dict()
    assert torch.allclose(after["encoder.weight"], start["encoder.weight"], atol=1e-8)
    assert not torch.allclose(after["rest.3.weight"], start["rest.3.weight"])
    assert model.fit_params["encoder_lr"] == 1e-12
    assert model.fit_params["lr_schedule"] == "cosine"


def test_select_by_pcc_restores_the_epoch_with_the_best_validation_pcc(sdata) -> None:
    """val_pcc is PCC@M over every validation unit at once; the best epoch is its maximum, not the loss minimum."""
    from stpredict.models._data import CoverTileDataset, build_sections, collate_tiles, sparse_weights
    from stpredict.models._footprints import aggregate_map

    model = helpers.TinyModel(GENES)
    val = helpers.make_sdata(size=160, seed=5)
    fit(model, sdata, max_epochs=4, lr=2e-2, validation_data=val, select_by="pcc", **FAST)
    hist = model.fit_history
    assert len(hist["val_pcc"]) == len(hist["val_loss"]) == 4
    assert hist["best_epoch"] == int(np.argmax(hist["val_pcc"]))
    sections = build_sections(val, image_key="he", table_keys=["table"], shapes_key=None, genes=GENES,
                              space="normalised")  # fmt: skip
    ds = CoverTileDataset(sections, model_um_per_px=1.0, tile_size=64, output_stride=4, seed=1)
    batch = collate_tiles([ds[i] for i in range(len(ds))])
    entry = batch["tables"][0]
    with torch.no_grad():
        pred = aggregate_map(model.module(_normalised(batch["image"])), sparse_weights(entry), reduce="mean").numpy()
    target = entry["targets"].numpy()
    expected = np.mean([np.corrcoef(pred[:, g], target[:, g])[0, 1] for g in range(len(GENES))])
    assert hist["val_pcc"][hist["best_epoch"]] == pytest.approx(expected, abs=1e-5)
    assert model.fit_params["select_by"] == "pcc"


def test_fit_rejects_unknown_schedules_and_learning_rates(sdata) -> None:
    model = helpers.TinyModel(GENES)
    with pytest.raises(InputError, match="lr_schedule must be 'constant' or 'cosine'"):
        fit(model, sdata, lr_schedule="step", **FAST)
    with pytest.raises(InputError, match="select_by must be 'loss' or 'pcc'"):
        fit(model, sdata, select_by="r2", **FAST)
    with pytest.raises(InputError, match="encoder_lr must be a positive"):
        fit(model, sdata, encoder_lr=-1e-4, **FAST)
    # numpy numbers are numbers, and the record stays JSON (checkpoints write it)
    fit(model, sdata, lr=np.float32(1e-3), encoder_lr=np.float32(1e-4), max_epochs=0, **FAST)
    assert type(model.fit_params["lr"]) is float
    assert type(model.fit_params["encoder_lr"]) is float
