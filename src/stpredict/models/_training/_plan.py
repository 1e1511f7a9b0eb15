"""The training plan: the LightningModule around a model's ``nn.Module``, and the best-weights callback.

The plan turns a batch into the model's map, aggregates the map inside each supervised unit's footprint (tiles)
or takes one value per crop (units), and scores it with the chosen loss; the validation loss is taken over all
validation units at once. Lightning is imported only inside functions, so the classes are created on first use.
Tiles are ImageNet-normalised (:func:`normalize_tiles`) unless the network brings its own ``preprocess``.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._errors import InputError
from stpredict.models._data import sparse_weights
from stpredict.models._footprints import aggregate_map
from stpredict.models._losses import nb_nll, paper_loss, pearson_loss, poisson_nll

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "normalize_tiles"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_tiles(tiles: Any) -> Any:
    """``uint8 (B, 3, H, W)`` tensor → float32, ImageNet mean/std normalised."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tiles.device).view(1, 3, 1, 1)
    return (tiles.float() / 255.0 - mean) / std


def encoder_param_groups(
    params: Iterable[torch.nn.Parameter], encoder: Any, *, lr: float, encoder_lr: float | None
) -> list[dict[str, Any]]:
    """Optimiser groups of the trainable ``params``: the encoder's at ``encoder_lr``, the rest at ``lr``.

    ``encoder`` is a module or ``None``; ``encoder_lr=None`` means ``lr``. A group without parameters is left out.
    """
    import torch

    inside = {id(p) for p in encoder.parameters()} if isinstance(encoder, torch.nn.Module) else set()
    trainable = [p for p in params if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in inside], "lr": lr},
        {"params": [p for p in trainable if id(p) in inside], "lr": lr if encoder_lr is None else encoder_lr},
    ]
    return [g for g in groups if g["params"]]


@functools.cache
def _lightning_classes() -> tuple[type, type]:
    """The LightningModule and callback classes, created on first use so that Lightning stays a lazy import.

    They are published as this module's ``_Plan`` and ``_BestWeights`` (see :func:`__getattr__`), so that they
    pickle (DDP spawn, DataLoader workers on spawn platforms).
    """
    import lightning.pytorch as lp
    import torch

    class _Plan(lp.LightningModule):
        def __init__(
            self,
            module: torch.nn.Module,
            *,
            inputs: Literal["tiles", "units"],
            loss: str,
            reduce: str,
            pixel_area: float,
            pcc_weight: float,
            lr: float,
            weight_decay: float,
            n_genes: int,
            n_tables: int,
            encoder_lr: float | None = None,
            lr_schedule: Literal["constant", "cosine"] = "constant",
            total_steps: int = 1,
        ) -> None:
            super().__init__()
            self.module = module
            self.inputs = inputs
            self.loss_name = loss
            self.reduce = reduce
            self.pixel_area = pixel_area
            self.pcc_weight = pcc_weight
            self.lr = lr
            self.encoder_lr = encoder_lr
            self.lr_schedule = lr_schedule
            self.total_steps = max(1, int(total_steps))
            self.weight_decay = weight_decay
            self.n_tables = n_tables
            if loss == "nb":
                self.log_theta = torch.nn.Parameter(torch.zeros(n_genes))
            self._checked = False

        def _loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if self.loss_name == "paper":
                return paper_loss(pred, target, pcc_weight=self.pcc_weight)
            if self.loss_name == "poisson":
                return poisson_nll(pred, target)
            return nb_nll(pred, target, self.log_theta)

        def train(self, mode: bool = True) -> _Plan:
            """Train mode, except frozen batch-norm layers (a frozen encoder keeps its running statistics)."""
            super().train(mode)
            if mode:
                for sub in self.module.modules():
                    params = list(sub.parameters(recurse=False))
                    frozen = bool(params) and not any(p.requires_grad for p in params)
                    if frozen and isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                        sub.eval()
            return self

        def _predictions(self, batch: dict[str, Any]) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
            """The map of a batch, and per table the aggregated predictions and targets of its units."""
            preprocess = getattr(self.module, "preprocess", None)
            x = preprocess(batch["image"]) if callable(preprocess) else normalize_tiles(batch["image"])
            out = self.module(x)
            if self.loss_name != "paper" and not self._checked:
                self._checked = True
                if float(out.detach().min()) < 0:
                    msg = (
                        "The model's map has negative values, but loss='poisson'/'nb' needs a non-negative "
                        "expected-count density. End the network in a non-negative activation (e.g. softplus) "
                        "for value_kind='density'."
                    )
                    raise InputError(msg)
            pairs = []
            if self.inputs == "tiles":
                for entry in batch["tables"]:
                    if entry is None:
                        pairs.append((out.new_zeros((0, out.shape[1])), out.new_zeros((0, out.shape[1]))))
                        continue
                    weights, target = sparse_weights(entry), entry["targets"]
                    pairs.append((aggregate_map(out, weights, reduce=self.reduce, pixel_area=self.pixel_area), target))
            else:
                pred = out.float().reshape(out.shape[0], -1)
                for t in range(self.n_tables):
                    mask = batch["table"] == t
                    pairs.append((pred[mask], batch["target"][mask]))
            return out, pairs

        def _total_loss(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], out: torch.Tensor) -> torch.Tensor:
            """Sum over tables of the loss of their units; zero (with a graph) when no table has a unit."""
            total = out.new_zeros((), dtype=torch.float32)
            n_units = 0
            for pred, target in pairs:
                if target.shape[0]:
                    total = total + self._loss(pred, target)
                    n_units += target.shape[0]
            if n_units == 0:  # no complete unit in this batch: a zero loss that still has a graph
                total = total + 0.0 * out.float().sum()
            return total

        def _step(self, batch: dict[str, Any]) -> torch.Tensor:
            out, pairs = self._predictions(batch)
            return self._total_loss(pairs, out)

        def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
            loss = self._step(batch)
            self.log(
                "train_loss",
                loss,
                on_step=True,
                on_epoch=True,
                prog_bar=True,
                batch_size=batch["image"].shape[0],
                sync_dist=True,
            )
            return loss

        def on_validation_epoch_start(self) -> None:
            self._val_pairs: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(self.n_tables)]

        def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
            _, pairs = self._predictions(batch)
            for store, (pred, target) in zip(self._val_pairs, pairs, strict=True):
                store.append((pred.detach().float(), target.detach().float()))

        def on_validation_epoch_end(self) -> None:
            """The loss over all validation units at once (the PCC term across every unit, not per batch)."""
            pairs = [
                (torch.cat([p for p, _ in store]), torch.cat([t for _, t in store]))
                for store in self._val_pairs
                if store
            ]
            ref = pairs[0][0] if pairs else torch.zeros(1, device=self.device)
            self.log("val_loss", self._total_loss(pairs, ref), prog_bar=True, sync_dist=True)
            # PCC@M over all validation units (mean over tables of the gene-wise PCC): what the benchmarks score
            pccs = [1.0 - pearson_loss(p.float(), t.float()) for p, t in pairs if t.shape[0] > 1]
            # no table with two validation units: an undefined PCC counts as -1 (the published policy), not NaN,
            # which would stop a select_by="pcc" fit at once
            val_pcc = torch.stack(pccs).mean() if pccs else torch.tensor(-1.0, device=self.device)
            self.log("val_pcc", val_pcc, sync_dist=True)
            self._val_pairs = [[] for _ in range(self.n_tables)]

        def configure_optimizers(self) -> Any:
            # the pretrained part: PixNet's `encoder`, a crop regressor's `backbone`
            encoder = getattr(self.module, "encoder", None)
            encoder = getattr(self.module, "backbone", None) if encoder is None else encoder
            groups = encoder_param_groups(self.parameters(), encoder, lr=self.lr, encoder_lr=self.encoder_lr)
            opt = torch.optim.AdamW(groups, lr=self.lr, weight_decay=self.weight_decay)
            if self.lr_schedule == "constant":
                return opt
            total, warmup = self.total_steps, max(1, self.total_steps // 20)

            def factor(step: int) -> float:  # linear warm-up over 5 % of the steps, then cosine to zero
                if step < warmup:
                    return (step + 1) / warmup
                return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class _BestWeights(lp.Callback):
        """Per-epoch history; keeps the weights of the best epoch in memory and restores them at the end.

        The best epoch has the lowest validation loss (``select_by="loss"``) or the highest validation PCC@M
        (``"pcc"``); without validation data, the lowest training loss.
        """

        def __init__(self, *, has_val: bool, select_by: Literal["loss", "pcc"] = "loss") -> None:
            self.has_val = has_val
            self.select_by = select_by
            self.history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
            if has_val and select_by == "pcc":
                self.history["val_pcc"] = []
            self.best_score = float("inf")
            self.best_epoch = -1
            self.best_state: dict[str, Any] | None = None

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            metrics = trainer.callback_metrics
            train = float(metrics.get("train_loss_epoch", float("nan")))
            self.history["train_loss"].append(train)
            score = train
            if self.has_val:
                score = float(metrics.get("val_loss", float("nan")))
                self.history["val_loss"].append(score)
                if self.select_by == "pcc":
                    pcc = float(metrics.get("val_pcc", float("nan")))
                    self.history["val_pcc"].append(pcc)
                    score = -pcc
            if np.isfinite(score) and score < self.best_score:
                self.best_score = score
                self.best_epoch = trainer.current_epoch
                self.best_state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}

        def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
            if self.best_state is not None:
                pl_module.load_state_dict(self.best_state)

    for cls in (_Plan, _BestWeights):
        cls.__module__ = __name__
        cls.__qualname__ = cls.__name__
    return _Plan, _BestWeights


def __getattr__(name: str) -> Any:
    if name in ("_Plan", "_BestWeights"):
        plan, best = _lightning_classes()
        return plan if name == "_Plan" else best
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)


def _make_plan(**kwargs: Any) -> Any:
    """Build the LightningModule that trains ``kwargs["module"]``."""
    return _lightning_classes()[0](**kwargs)


def _make_callbacks(
    *, has_val: bool, patience: int, select_by: Literal["loss", "pcc"] = "loss"
) -> tuple[list[Any], Any]:
    import lightning.pytorch as lp

    best = _lightning_classes()[1](has_val=has_val, select_by=select_by)
    callbacks: list[Any] = [best]
    if has_val:
        monitor, mode = ("val_pcc", "max") if select_by == "pcc" else ("val_loss", "min")
        callbacks.append(lp.callbacks.EarlyStopping(monitor=monitor, mode=mode, patience=patience))
    return callbacks, best
