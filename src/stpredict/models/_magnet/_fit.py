"""Training MagNet on the shared Lightning loop: the plan (loss of SPEC.md §3.8), optimiser and data loaders.

The trainer, device choice, mixed precision, early stopping and best-epoch weights are those of PixNet's loop
(:mod:`stpredict.models._training`); only the batch and its loss differ. The validation score is the bin part of
the loss (``0.75 · MSE + 0.10 · (1 − PCC)`` over every validation bin at once), on which the best epoch is chosen.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stpredict._errors import InputError
from stpredict._logging import get_logger
from stpredict._settings import limit_threads, settings
from stpredict.models._training._fit import (
    _default_precision,
    _quiet_lightning,
    _target_normalization,
    check_learning_rates,
    resolve_accelerator,
    train_plan,
)
from stpredict.models._training._plan import encoder_param_groups

from ._data import WindowDataset, epoch_callback, prepare_sections
from ._loss import LossWeights, magnet_loss, pcc_loss

if TYPE_CHECKING:
    from collections.abc import Sequence

    from spatialdata import SpatialData

__all__ = ["fit_magnet"]

logger = get_logger(__name__)

#: The pretrained bin encoder's learning rate as a fraction of ``lr`` (default design; faithful: 1). Fine-tuned at
#: the full rate on a few sections, its features collapsed to one direction (benchmarks/README.md, MagNet).
ENCODER_LR_FACTOR = 0.1


@functools.cache
def _plan_class() -> type:
    import lightning.pytorch as lp

    class _MagNetPlan(lp.LightningModule):
        def __init__(self, module: torch.nn.Module, *, weights: LossWeights, optimizer: dict[str, Any]) -> None:
            super().__init__()
            self.module = module
            self.weights = weights
            self.optimizer_cfg = optimizer
            self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

        def train(self, mode: bool = True) -> _MagNetPlan:
            super().train(mode)
            self.module.train(mode)
            return self

        def _loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            out = self.module(batch)
            return magnet_loss(
                out["bin"], batch["y_bin"], out["region"], batch["y_region"], out["spot"], batch["y_spot"],
                batch["parent_region"], batch["parent_spot"], weights=self.weights, bin_mask=batch["bin_mask"],
                region_mask=batch["region_mask"], spot_mask=batch["spot_mask"],
            )  # fmt: skip

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss, terms = self._loss(batch)
            n = int(batch["bin_mask"].sum())
            self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=max(n, 1))
            return loss

        def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
            out = self.module(batch, tile_levels=False)
            mask = batch["bin_mask"]
            self._val.append((out["bin"][mask].detach().float(), batch["y_bin"][mask].float()))

        def on_validation_epoch_end(self) -> None:
            if not self._val:
                return
            pred = torch.cat([p for p, _ in self._val])
            target = torch.cat([t for _, t in self._val])
            self._val = []
            w = self.weights
            score = w.mse * torch.mean((pred - target) ** 2) + w.pcc * pcc_loss(pred, target)
            self.log("val_loss", score, prog_bar=True)

        def configure_optimizers(self) -> Any:
            cfg = self.optimizer_cfg
            params = encoder_param_groups(
                self.module.parameters(), self.module.bin_encoder, lr=cfg["lr"], encoder_lr=cfg.get("encoder_lr")
            )
            if cfg["name"] == "sgd":  # the paper: SGD, momentum 0.9, poly schedule (SPEC §3.9)
                opt = torch.optim.SGD(params, lr=cfg["lr"], momentum=0.9, weight_decay=cfg["weight_decay"])
                total = max(1, int(cfg["total_steps"]))
                sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: max(0.0, 1 - min(it, total) / total) ** 0.9)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
            return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])

    _MagNetPlan.__module__ = __name__
    _MagNetPlan.__qualname__ = "_MagNetPlan"
    return _MagNetPlan


def __getattr__(name: str) -> Any:
    if name == "_MagNetPlan":
        return _plan_class()
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def fit_magnet(
    model: Any,
    data: SpatialData | Sequence[SpatialData],
    *,
    image_key: str = "he",
    table_key: str = "table",
    shapes_key: str | None = None,
    target_layer: str | None = None,
    validation_data: SpatialData | Sequence[SpatialData] | None = None,
    max_epochs: int = 30,
    batches_per_epoch: int | None = None,
    window_cells: int = 1,
    batch_bins: int = 256,
    optimizer: str | None = None,
    lr: float | None = None,
    encoder_lr: float | None = None,
    weight_decay: float = 1e-4,
    loss_weights: tuple[float, float, float, float] = (0.75, 0.10, 0.05, 0.05),
    augment: bool = True,
    patience: int = 5,
    seed: int = 0,
    device: str = "auto",
    precision: str | None = None,
    show_progress_bar: bool | None = None,
    **trainer_kwargs: Any,
) -> Any:
    """Train ``model`` (a :class:`~stpredict.models.MagNet`) in place; see :meth:`MagNet.fit` for the options."""
    import lightning.pytorch as lp

    show_progress_bar = settings.show_progress_bar if show_progress_bar is None else show_progress_bar
    if window_cells < 1 or batch_bins < 2:
        msg = f"window_cells must be ≥ 1 and batch_bins ≥ 2, got {window_cells} and {batch_bins}."
        raise InputError(msg)
    optimizer = optimizer or ("sgd" if model.faithful else "adamw")
    if optimizer not in ("sgd", "adamw"):
        msg = f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}."
        raise InputError(msg)
    lr = lr if lr is not None else (0.005 if optimizer == "sgd" else 3e-4)
    if encoder_lr is None:
        encoder_lr = lr if model.faithful else lr * ENCODER_LR_FACTOR
    check_learning_rates(lr=lr, encoder_lr=encoder_lr)
    normalization = _target_normalization(data, table_key, target_layer)
    if model.normalization is not None and model.fit_history and model.normalization != normalization:
        logger.warning("MagNet.fit: the targets' normalisation differs from the one the model was trained on.")

    limit_threads()  # torch, numba and dask sized from the usable cores before any work
    accelerator, devices = resolve_accelerator(device)
    model.module.to("cuda" if accelerator == "cuda" else "cpu")
    sections = prepare_sections(
        model, data, image_key=image_key, table_key=table_key, shapes_key=shapes_key, target_layer=target_layer,
        normalization=normalization, show_progress_bar=show_progress_bar,
    )  # fmt: skip
    val_sections = None
    if validation_data is not None:
        val_sections = prepare_sections(
            model, validation_data, image_key=image_key, table_key=table_key, shapes_key=shapes_key,
            target_layer=target_layer, normalization=normalization, show_progress_bar=show_progress_bar,
        )  # fmt: skip
    common = {"window_cells": window_cells, "halo_px": model.halo_px, "batch_bins": batch_bins, "seed": seed}
    train_ds = WindowDataset(
        sections, model, n_batches=batches_per_epoch, shuffle_bins=model.faithful, augment=augment, **common
    )
    loader = torch.utils.data.DataLoader(train_ds, batch_size=None, shuffle=False)
    val_loader = None
    if val_sections is not None:
        val_ds = WindowDataset(val_sections, model, n_batches=None, shuffle_bins=False, augment=False, **common)
        val_loader = torch.utils.data.DataLoader(val_ds, batch_size=None, shuffle=False)
    if not model.fit_history:
        _init_head_bias(model, sections)
    # A MagNet is built, predicts and loads in eval mode, and Lightning keeps the modes it finds: train mode here,
    # or dropout is off and every batch-norm layer frozen during training (the frozen parts stay eval).
    model.module.train()
    if precision is None:
        precision = _default_precision(accelerator)
    cfg = {"name": optimizer, "lr": lr, "encoder_lr": encoder_lr, "weight_decay": weight_decay,
           "total_steps": max_epochs * len(train_ds)}  # fmt: skip
    with _quiet_lightning():
        lp.seed_everything(seed, workers=True, verbose=False)
        plan = _plan_class()(model.module, weights=LossWeights(*loss_weights), optimizer=cfg)
        history = train_plan(
            plan,
            loader,
            val_loader,
            max_epochs=max_epochs,
            patience=patience,
            show_progress_bar=bool(show_progress_bar),
            accelerator=accelerator,
            devices=devices,
            precision=precision,
            deterministic=accelerator == "cpu" or not torch.cuda.is_available(),
            callbacks=[epoch_callback(), *trainer_kwargs.pop("callbacks", [])],
            **trainer_kwargs,
        )
    model.module.cpu().eval()
    model.fit_history = history
    model.normalization = normalization
    model.fit_params = {
        "image_key": image_key,
        "table_key": table_key,
        "target_layer": target_layer,
        "max_epochs": max_epochs,
        "epochs_run": len(history["train_loss"]),
        "batches_per_epoch": len(train_ds),
        "window_cells": window_cells,
        "batch_bins": batch_bins,
        "optimizer": optimizer,
        "lr": float(lr),
        "encoder_lr": float(encoder_lr),
        "weight_decay": weight_decay,
        "loss_weights": list(loss_weights),
        "augment": augment,
        "seed": seed,
        "n_sections": len(sections),
    }
    logger.info("MagNet.fit: %d epochs, best epoch %d", len(history["train_loss"]), history["best_epoch"])
    return model


@torch.no_grad()
def _init_head_bias(model: Any, sections: list[Any]) -> None:
    """Start every gene head at the mean training target (small weights), as PixNet's output bias does."""
    mean = np.concatenate([bs.targets for bs in sections]).mean(axis=0)
    for head in model.module.heads:
        linear = head.linear
        linear.weight.mul_(0.1)
        linear.bias.copy_(torch.as_tensor(mean, dtype=linear.bias.dtype))
