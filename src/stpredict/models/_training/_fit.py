"""The fit loop shared by PixNet and SpotCNN: data sets, loaders and the Lightning trainer around the plan.

:func:`fit` checks the loss and aggregation, builds the training (and validation) sections and data sets, starts the
output bias near the mean target, and runs a ``lightning.Trainer`` on the training plan (:mod:`._plan`). Lightning
(imported only inside functions) gives device selection, mixed precision, early stopping, progress bars and
multi-GPU data parallelism (``devices=4, strategy="ddp"``) without code of our own.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import numbers
import textwrap
import warnings
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from stpredict._errors import InputError
from stpredict._keys import Attrs
from stpredict._logging import get_logger
from stpredict._settings import limit_threads, settings
from stpredict.models._data import (
    CoverTileDataset,
    EpochSampler,
    TileDataset,
    UnitCropDataset,
    build_sections,
    collate_tiles,
    collate_units,
    split_by_position,
)
from stpredict.models._footprints import DISK
from stpredict.models._losses import LOSSES

from ._plan import _make_callbacks, _make_plan

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from spatialdata import SpatialData

__all__ = ["fit", "fit_options", "resolve_accelerator"]

F = TypeVar("F", bound="Callable[..., Any]")

logger = get_logger(__name__)


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


def check_learning_rates(**rates: float | None) -> None:
    """Refuse a learning rate (given by keyword, ``None`` for "not set") that is not a positive finite number."""
    for name, value in rates.items():
        if value is not None and not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
            msg = f"{name} must be a positive learning rate, got {value!r}."
            raise InputError(msg)


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
    encoder_lr: float | None = None,
    lr_schedule: Literal["constant", "cosine"] = "constant",
    weight_decay: float = 1e-4,
    augment: bool = True,
    init_output_bias: bool = True,
    max_units_per_tile: int = 2048,
    validation_data: SpatialData | Sequence[SpatialData] | None = None,
    validation_fraction: float = 0.0,
    validation_tiles: int | None = None,
    patience: int = 10,
    select_by: Literal["loss", "pcc"] = "loss",
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
    encoder_lr
        Learning rate of the encoder's trainable blocks (a model built with ``freeze_encoder=False`` or a number of
        blocks to fine-tune); ``None``: ``lr``. Fine-tuning a pretrained encoder usually wants a tenth of ``lr``.
    lr_schedule
        ``"constant"``, or ``"cosine"``: a linear warm-up over the first 5 % of the steps, then cosine decay to 0.
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
    select_by
        What chooses the best epoch and stops early: the validation ``"loss"``, or the validation ``"pcc"`` (PCC@M,
        the mean over genes of their PCC across all validation units, what the benchmarks score).
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
    The model, trained, with the best epoch's weights (by ``select_by`` on validation, else training loss) restored,
    ``model.fit_history = {"train_loss": [...], "val_loss": [...], "best_epoch": int}`` and ``model.fit_params``.
    """
    import lightning.pytorch as lp
    import torch

    limit_threads()  # torch, numba and dask sized from the usable cores (or settings.n_jobs) before any work
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
    if lr_schedule not in ("constant", "cosine"):
        msg = f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}."
        raise InputError(msg)
    if select_by not in ("loss", "pcc"):
        msg = f"select_by must be 'loss' or 'pcc', got {select_by!r}."
        raise InputError(msg)
    check_learning_rates(lr=lr, encoder_lr=encoder_lr)
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
    resolve = getattr(model, "_resolve_resolution", None)
    if callable(resolve):  # PixNet(um_per_px="auto") picks its resolution from the training units
        resolve(sections)
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
            encoder_lr=encoder_lr,
            lr_schedule=lr_schedule,
            total_steps=max_epochs * len(train_loader),
            weight_decay=weight_decay,
            n_genes=len(model.var_names),
            n_tables=len(table_keys),
        )
        history = train_plan(
            plan,
            train_loader,
            val_loader,
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices if devices is not None else auto_devices,
            strategy=strategy,
            precision=precision,
            patience=patience,
            select_by=select_by,
            show_progress_bar=show_progress_bar,
            **trainer_kwargs,
        )

    model.module.cpu().eval()
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
        "lr": float(lr),
        "encoder_lr": None if encoder_lr is None else float(encoder_lr),
        "lr_schedule": lr_schedule,
        "weight_decay": weight_decay,
        "augment": augment,
        "select_by": select_by,
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


def train_plan(
    plan: Any,
    train_loader: Any,
    val_loader: Any | None,
    *,
    max_epochs: int,
    patience: int,
    show_progress_bar: bool,
    select_by: Literal["loss", "pcc"] = "loss",
    **trainer_kwargs: Any,
) -> dict[str, Any]:
    """Run Lightning on ``plan`` with the shared callbacks (best weights, early stopping); return the history.

    One trainer configuration for every model family: no logger or checkpoint files, no sanity validation, the
    best epoch's weights restored at the end (``history["best_epoch"]``). ``trainer_kwargs`` (accelerator,
    devices, precision, strategy, extra ``callbacks``, ...) go to :class:`lightning.pytorch.Trainer`.
    """
    import lightning.pytorch as lp

    callbacks, best = _make_callbacks(has_val=val_loader is not None, patience=patience, select_by=select_by)
    callbacks += list(trainer_kwargs.pop("callbacks", []))
    trainer = lp.Trainer(
        max_epochs=max_epochs,
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
    history: dict[str, Any] = dict(best.history)
    history["best_epoch"] = best.best_epoch
    return history


def _mean_target_per_pixel(sections: list[Any], model: Any, reduce: str) -> np.ndarray:
    """Per-gene map value that reproduces the mean training target: the output-bias starting point."""
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
    if target_layer is None:
        return {"method": "log1p_cpm", "target_sum": 1e4}
    first = data if not isinstance(data, list | tuple) else data[0]
    records = first.tables[table_key].uns.get(Attrs.root, {}).get("normalize", {})
    record = records.get(target_layer) if isinstance(records, dict) else None
    return dict(record) if isinstance(record, dict) else {"method": "unknown", "layer": target_layer}


def fit_options(method: F) -> F:
    """Write the training options of :func:`fit` into a model's ``fit`` docstring, at its ``{fit_options}`` line.

    The models' ``fit`` methods pass their options on to :func:`fit`; this keeps ``help(PixNet.fit)`` complete
    without a second copy of the option texts to keep in step.
    """
    doc = inspect.cleandoc(fit.__doc__ or "")
    start = doc.index("\nimage_key\n") + 1
    options = doc[start : doc.index("\n\nReturns\n")]
    template = method.__doc__ or ""
    line = next(line for line in template.splitlines() if line.strip() == "{fit_options}")
    indent = line[: len(line) - len(line.lstrip())]
    method.__doc__ = template.replace(line, textwrap.indent(options, indent))
    return method
