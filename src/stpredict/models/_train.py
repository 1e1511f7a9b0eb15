"""The fit loop shared by PixNet and SpotCNN: a Lightning training plan around the model's ``nn.Module``.

Lightning (imported only here, inside functions) gives device selection, mixed precision, early stopping,
progress bars and multi-GPU data parallelism (``devices=4, strategy="ddp"``) without code of our own.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._errors import InputError
from stpredict._logging import get_logger
from stpredict._settings import settings

from ._data import (
    CoverTileDataset,
    EpochSampler,
    TileDataset,
    UnitCropDataset,
    build_sections,
    collate_tiles,
    collate_units,
    split_by_position,
)
from ._losses import LOSSES, nb_nll, paper_loss, poisson_nll

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from spatialdata import SpatialData

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "fit", "normalize_tiles", "resolve_accelerator"]

logger = get_logger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_tiles(tiles: Any) -> Any:
    """``uint8 (B, 3, H, W)`` tensor → float32, ImageNet mean/std normalised."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN, device=tiles.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tiles.device).view(1, 3, 1, 1)
    return (tiles.float() / 255.0 - mean) / std


def resolve_accelerator(device: str) -> tuple[str, Any]:
    """Map a device string (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) to Lightning's pair."""
    device = settings.device if device in (None, "auto") else device
    if device == "auto":
        return "auto", "auto"
    kind, _, index = str(device).partition(":")
    if kind not in ("cpu", "cuda", "gpu", "mps"):
        msg = f"Unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:<index>' or 'mps'."
        raise InputError(msg)
    if kind == "cpu":
        return "cpu", 1
    return ("cuda" if kind == "gpu" else kind), ([int(index)] if index else "auto")


def _default_precision(accelerator: str) -> str:
    import torch

    on_cuda = accelerator in ("cuda", "auto") and torch.cuda.is_available()
    if not on_cuda:
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    names = ["lightning.pytorch", "lightning.fabric", "lightning"]
    previous = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*sparse.*beta.*")
        warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*torch.sparse.*")
        warnings.filterwarnings("ignore", message=".*`validation_step` but have no `val_dataloader`.*")
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
        try:
            yield
        finally:
            for n, level in previous.items():
                logging.getLogger(n).setLevel(level)


@functools.cache
def _lightning_classes() -> tuple[type, type]:
    """The LightningModule and callback classes, created on first use so that Lightning stays a lazy import.

    They are published as this module's ``_Plan`` and ``_BestWeights`` (see :func:`__getattr__`), so that they
    pickle (DDP spawn, DataLoader workers on spawn platforms).
    """
    import lightning.pytorch as lp
    import torch

    from ._data import sparse_weights
    from ._footprints import aggregate_map

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
        ) -> None:
            super().__init__()
            self.module = module
            self.inputs = inputs
            self.loss_name = loss
            self.reduce = reduce
            self.pixel_area = pixel_area
            self.pcc_weight = pcc_weight
            self.lr = lr
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
            self._val_pairs = [[] for _ in range(self.n_tables)]

        def configure_optimizers(self) -> torch.optim.Optimizer:
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    class _BestWeights(lp.Callback):
        """Per-epoch history; keeps the weights of the best epoch in memory and restores them at the end."""

        def __init__(self, *, has_val: bool) -> None:
            self.has_val = has_val
            self.history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
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


def _make_callbacks(*, has_val: bool, patience: int) -> tuple[list[Any], Any]:
    import lightning.pytorch as lp

    best = _lightning_classes()[1](has_val=has_val)
    callbacks: list[Any] = [best]
    if has_val:
        callbacks.append(lp.callbacks.EarlyStopping(monitor="val_loss", mode="min", patience=patience))
    return callbacks, best


def _check_mode(value_kind: str, loss: str | None, reduce: str | None) -> tuple[str, str]:
    if value_kind not in ("intensive", "density"):
        msg = f"model.value_kind must be 'intensive' or 'density', got {value_kind!r}."
        raise InputError(msg)
    if loss is None:
        loss = "paper" if value_kind == "intensive" else "nb"
    if loss not in LOSSES:
        msg = f"loss must be one of {sorted(LOSSES)}, got {loss!r}."
        raise InputError(msg)
    if value_kind == "intensive" and loss != "paper":
        msg = (
            f"loss={loss!r} models raw counts and needs a density map; this model's value_kind is 'intensive'. "
            "Use loss='paper', or build the model with value_kind='density'."
        )
        raise InputError(msg)
    if value_kind == "density" and loss == "paper":
        msg = "A density model is trained on raw counts: use loss='poisson' or loss='nb' (or value_kind='intensive')."
        raise InputError(msg)
    if reduce is None:
        reduce = "mean" if value_kind == "intensive" else "sum"
    if reduce not in ("sum", "mean"):
        msg = f"reduce must be 'sum' or 'mean', got {reduce!r}."
        raise InputError(msg)
    if value_kind == "density" and reduce != "sum":
        msg = "A density map integrates to expected counts only by sum; use reduce='sum' for value_kind='density'."
        raise InputError(msg)
    return loss, reduce


def fit(
    model: Any,
    data: SpatialData | Sequence[SpatialData],
    *,
    image_key: str = "he",
    table_key: str | Sequence[str] = "table",
    shapes_key: str | None = None,
    genes: Sequence[str] | None = None,
    target_layer: str | None = None,
    loss: Literal["paper", "poisson", "nb"] | None = None,
    reduce: Literal["sum", "mean"] | None = None,
    pcc_weight: float = 0.5,
    max_epochs: int = 50,
    batch_size: int = 8,
    tiles_per_epoch: int = 512,
    lr: float = 5e-4,
    weight_decay: float = 1e-4,
    augment: bool = True,
    init_output_bias: bool = True,
    max_units_per_tile: int = 2048,
    validation_data: SpatialData | Sequence[SpatialData] | None = None,
    validation_fraction: float = 0.0,
    validation_tiles: int | None = None,
    patience: int = 10,
    seed: int = 0,
    device: str = "auto",
    devices: int | str | list[int] | None = None,
    strategy: str | Any = "auto",
    precision: str | None = None,
    num_workers: int = 0,
    show_progress_bar: bool | None = None,
    **trainer_kwargs: Any,
) -> Any:
    """Train a dense model's network on measured units (spots or bins) of one or more sections.

    Tiles of ``model.tile_size`` pixels at ``model.um_per_px`` are sampled around measured units, read lazily from
    the image (resampled to the model's resolution), augmented (flips, 90° rotations, H&E colour), and the predicted
    map is aggregated inside each completely contained unit's footprint and compared with its target.

    Parameters
    ----------
    model
        A model with ``module`` (``nn.Module``: ImageNet-normalised ``(B, 3, H, W)`` → ``(B, genes, H/s, W/s)``),
        ``var_names``, ``um_per_px``, ``output_stride``, ``tile_size``, ``value_kind`` and ``normalization``.
        Trained in place; ``model.fit_history`` and ``model.fit_params`` are set.
    data
        One SpatialData or a list (one per training section). Images must be calibrated (µm per pixel).
    image_key
        H&E image.
    table_key
        Table(s) of measured units with raw counts (or normalised values, paper mode). Several tables (e.g. bins of
        2, 8 and 16 µm) train together; their losses are summed (SPEC.md §2.5).
    shapes_key
        Shapes element the tables annotate, if a table annotates several.
    genes
        Must equal ``model.var_names`` when given (the network's outputs are fixed at construction).
    target_layer
        Paper mode: layer of normalised targets, e.g. ``"log1p_cpm"`` from :func:`stpredict.pp.normalize`
        (its parameters are recorded as ``model.normalization``). ``None``: log1p CPM (target sum 1e4) of the
        raw counts in ``X``, totals over all of the table's genes.
    loss
        ``"paper"``: normalised (log1p CPM) targets, MSE + ``pcc_weight`` · (1 − PCC) (SPEC.md §2.4); needs
        ``value_kind="intensive"``. ``"poisson"`` / ``"nb"``: raw counts given expected counts, the map a density in
        counts per µm² integrated by sum; need ``value_kind="density"``. ``None``: ``"paper"`` for intensive
        models, ``"nb"`` for density models.
    reduce
        Aggregation inside a footprint. ``"mean"`` (default for intensive maps) is scale-free; ``"sum"`` reproduces
        PixNet's Eq. 9 (for intensive maps a sum over input pixels, so predictions grow with area); density maps
        always use ``"sum"`` over µm².
    pcc_weight
        λ of the paper loss.
    max_epochs, batch_size, tiles_per_epoch
        Epochs, tiles per batch, tiles per epoch.
    lr, weight_decay
        AdamW settings (SPEC.md §2.5: 5e-4, 1e-4).
    augment
        Flips, 90° rotations and HED colour jitter on training tiles.
    init_output_bias
        On a model's first fit, start its output near the mean target per gene (through
        ``model.module.set_output_bias`` where the network has one): the mean normalised value (``reduce="mean"``),
        the mean value per input pixel of a footprint (``reduce="sum"``), or the mean count per µm² (density).
    max_units_per_tile
        Cap on supervised units per table per tile (e.g. thousands of 2 µm bins).
    validation_data
        Held-out sections for validation, early stopping and best-epoch selection.
    validation_fraction
        Without ``validation_data``: hold out the right-most fraction of each section (a contiguous block).
    validation_tiles
        Most validation tiles (crops for unit models). Default: as many as it takes to supervise every validation
        unit exactly once. The validation loss is computed over all validation units at once, so its PCC term is
        taken across every unit rather than averaged over batches.
    patience
        Epochs without validation improvement before stopping.
    seed
        Seeds weights' dropout, tile sampling and augmentation: two fits with the same seed on CPU give identical
        weights.
    device
        ``"auto"`` (``settings.device``: CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
    devices, strategy
        Passed to ``lightning.Trainer`` for multi-GPU data parallelism, e.g. ``devices=4, strategy="ddp"``.
    precision
        Lightning precision; default ``"bf16-mixed"``/``"16-mixed"`` on CUDA, ``"32-true"`` elsewhere.
    num_workers
        DataLoader worker processes reading training tiles (the same tiles and the same model as with 0).
    show_progress_bar
        Progress bar with the loss; default ``settings.show_progress_bar``.
    trainer_kwargs
        Further ``lightning.Trainer`` arguments (e.g. ``accumulate_grad_batches``, ``gradient_clip_val``).

    Returns
    -------
    The model, trained, with the best epoch's weights (by validation loss, else training loss) restored,
    ``model.fit_history = {"train_loss": [...], "val_loss": [...], "best_epoch": int}`` and ``model.fit_params``.
    """
    import lightning.pytorch as lp
    import torch

    show_progress_bar = settings.show_progress_bar if show_progress_bar is None else show_progress_bar
    table_keys = [table_key] if isinstance(table_key, str) else list(table_key)
    if not table_keys:
        msg = "table_key is empty; name at least one table of measured units."
        raise InputError(msg)
    if genes is not None and list(genes) != list(model.var_names):
        msg = (
            "genes differ from model.var_names; the network's output channels are fixed when the model is built. "
            "Build the model with these genes instead."
        )
        raise InputError(msg)
    loss, reduce = _check_mode(model.value_kind, loss, reduce)
    if not 0.0 <= validation_fraction < 1.0:
        msg = f"validation_fraction must be in [0, 1), got {validation_fraction!r}."
        raise InputError(msg)
    if target_layer is not None and loss != "paper":
        msg = "target_layer names normalised targets (loss='paper'); poisson/nb losses use the raw counts in X."
        raise InputError(msg)
    inputs = getattr(model, "_fit_inputs", "tiles")
    if inputs == "units" and reduce != "mean":
        msg = f"{type(model).__name__} predicts each unit's value from its crop; reduce does not apply (leave it None)."
        raise InputError(msg)
    space = "normalised" if loss == "paper" else "counts"
    build = {
        "image_key": image_key,
        "table_keys": table_keys,
        "shapes_key": shapes_key,
        "space": space,
        "target_layer": target_layer,
    }
    sections = build_sections(data, genes=list(model.var_names), **build)
    val_sections = None
    if validation_data is not None:
        val_sections = build_sections(validation_data, genes=list(model.var_names), **build)
    elif validation_fraction > 0:
        sections, val_sections = split_by_position(sections, validation_fraction)

    if inputs == "tiles":
        common = {
            "model_um_per_px": model.um_per_px,
            "tile_size": model.tile_size,
            "output_stride": model.output_stride,
            "max_units_per_tile": max_units_per_tile,
        }
        train_ds = TileDataset(sections, n_tiles=tiles_per_epoch, seed=seed, augment=augment, **common)
        val_ds = None
        if val_sections is not None:
            val_ds = CoverTileDataset(val_sections, n_tiles=validation_tiles, seed=seed + 1, **common)
        collate = collate_tiles
    else:
        common = {"model_um_per_px": model.um_per_px, "crop_size": model.crop_size}
        train_ds = UnitCropDataset(sections, n_items=tiles_per_epoch, seed=seed, augment=augment, **common)
        val_ds = None
        if val_sections is not None:
            val_ds = UnitCropDataset(val_sections, n_items=validation_tiles, seed=seed + 1, augment=False, **common)
        collate = collate_units

    loader_kwargs = {"batch_size": batch_size, "collate_fn": collate, "num_workers": num_workers}
    if num_workers > 0:
        loader_kwargs["persistent_workers"] = True
    train_loader = torch.utils.data.DataLoader(train_ds, sampler=EpochSampler(len(train_ds)), **loader_kwargs)
    val_loader = None
    if val_ds is not None:
        # Validation reads its few fixed tiles in the main process (worker processes for it gain little).
        val_loader = torch.utils.data.DataLoader(val_ds, shuffle=False, batch_size=batch_size, collate_fn=collate)

    # Pixel area of one map pixel: in input pixels for an intensive sum (Eq. 9), in µm² for a density.
    stride = float(model.output_stride)
    pixel_area = stride**2 if model.value_kind == "intensive" else (stride * float(model.um_per_px)) ** 2

    setter = getattr(model.module, "set_output_bias", None)
    if init_output_bias and callable(setter) and not getattr(model, "fit_history", None):
        setter(torch.as_tensor(_mean_target_per_pixel(sections, model, reduce), dtype=torch.float32))
    model.module.train()  # a model may come back from predict or load in eval mode; frozen parts stay eval

    accelerator, auto_devices = resolve_accelerator(device)
    if precision is None:
        precision = _default_precision(accelerator)
    deterministic: bool | str = True if accelerator == "cpu" or not torch.cuda.is_available() else "warn"
    trainer_kwargs.setdefault("deterministic", deterministic)

    with _quiet_lightning():
        lp.seed_everything(seed, workers=True, verbose=False)
        plan = _make_plan(
            module=model.module,
            inputs=inputs,
            loss=loss,
            reduce=reduce,
            pixel_area=pixel_area,
            pcc_weight=pcc_weight,
            lr=lr,
            weight_decay=weight_decay,
            n_genes=len(model.var_names),
            n_tables=len(table_keys),
        )
        callbacks, best = _make_callbacks(has_val=val_loader is not None, patience=patience)
        callbacks += list(trainer_kwargs.pop("callbacks", []))
        trainer = lp.Trainer(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices if devices is not None else auto_devices,
            strategy=strategy,
            precision=precision,
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=bool(show_progress_bar),
            enable_model_summary=False,
            num_sanity_val_steps=0,
            log_every_n_steps=1,
            limit_val_batches=1.0 if val_loader is not None else 0,
            **trainer_kwargs,
        )
        trainer.fit(plan, train_dataloaders=train_loader, val_dataloaders=val_loader)

    model.module.cpu().eval()
    history: dict[str, Any] = dict(best.history)
    history["best_epoch"] = best.best_epoch
    model.fit_history = history
    params: dict[str, Any] = {
        "image_key": image_key,
        "table_keys": table_keys,
        "target_layer": target_layer,
        "loss": loss,
        "reduce": reduce,
        "pcc_weight": pcc_weight,
        "max_epochs": max_epochs,
        "epochs_run": len(history["train_loss"]),
        "batch_size": batch_size,
        "tiles_per_epoch": tiles_per_epoch,
        "lr": lr,
        "weight_decay": weight_decay,
        "augment": augment,
        "seed": seed,
        "n_sections": len(sections),
    }
    if loss == "nb":
        params["nb_theta"] = plan.log_theta.detach().cpu().exp().tolist()
    model.fit_params = params
    if loss == "paper" and getattr(model, "normalization", None) is None:
        model.normalization = _target_normalization(data, table_keys[0], target_layer)
    logger.info("fit: %d epochs, best epoch %d", params["epochs_run"], history["best_epoch"])
    return model


def _mean_target_per_pixel(sections: list[Any], model: Any, reduce: str) -> np.ndarray:
    """Per-gene map value that reproduces the mean training target: the output-bias starting point."""
    from ._footprints import DISK

    values, weights = [], []
    for section in sections:
        to_model_px = section.image_um_per_px / float(model.um_per_px)
        for units in section.units:
            keep = units.allowed
            if not keep.any():
                continue
            targets = units.targets[keep].astype(np.float64)
            if reduce == "mean":
                values.append(targets.sum(axis=0))
                weights.append(len(targets))
                continue
            half = units.half_sizes[keep] * to_model_px
            area_px = np.where(units.kinds[keep] == DISK, np.pi * half[:, 0] ** 2, 4 * half[:, 0] * half[:, 1])
            area = area_px if model.value_kind == "intensive" else area_px * float(model.um_per_px) ** 2
            values.append((targets / np.maximum(area, 1e-12)[:, None]).sum(axis=0))
            weights.append(len(targets))
    return np.sum(values, axis=0) / max(np.sum(weights), 1)


def _target_normalization(data: Any, table_key: str, target_layer: str | None) -> dict[str, Any]:
    """The normalisation paper-mode targets were in: the layer's ``st.pp.normalize`` record, or log1p CPM."""
    from stpredict._keys import Attrs

    if target_layer is None:
        return {"method": "log1p_cpm", "target_sum": 1e4}
    first = data if not isinstance(data, list | tuple) else data[0]
    records = first.tables[table_key].uns.get(Attrs.root, {}).get("normalize", {})
    record = records.get(target_layer) if isinstance(records, dict) else None
    return dict(record) if isinstance(record, dict) else {"method": "unknown", "layer": target_layer}
