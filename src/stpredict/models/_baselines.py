"""Spot-level baselines under the dense-model API: SpotCNN (ST-Net-like) and EmbeddingRidge (HEST-Benchmark-like).

Both predict one gene vector from a square crop centred on a point. As dense models they paint a map by sliding
that crop over a tile every ``output_stride`` pixels (one map pixel per window centre), so
:func:`stpredict.tl.predict_dense`, :func:`stpredict.tl.aggregate` and :func:`stpredict.tl.evaluate` treat them
exactly like PixNet. Values are normalised expression (``value_kind="intensive"``, aggregate by mean).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from stpredict._errors import InputError
from stpredict._logging import get_logger
from stpredict._settings import settings
from stpredict._validation import check_gene_names

from ._device import resolve_device
from ._io import register_model, save_model
from ._train import normalize_tiles

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence
    from pathlib import Path

    from spatialdata import SpatialData

__all__ = ["EmbeddingRidge", "SpotCNN"]

logger = get_logger(__name__)


def _backbone(encoder: str, pretrained: str | os.PathLike[str] | None) -> nn.Module:
    """A timm backbone returning pooled features (``num_classes=0``), with pretrained weights if asked."""
    import timm

    from ._weights import map_state_dict, pretrained_state_dict, resolve_encoder

    arch, kwargs = resolve_encoder(encoder)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    state = pretrained_state_dict(pretrained, encoder=encoder, arch=arch, kwargs=kwargs)
    if state is not None:
        target = model.state_dict()
        source = {k: v for k, v in state.items() if not k.startswith(("classifier.", "head.", "fc."))}
        mapped, how = map_state_dict(source, target)
        model.load_state_dict(mapped)
        logger.info("loaded pretrained weights for %s (matched by %s)", encoder, how)
    return model


#: Map pixels a default baseline tile has beyond its two context bands (room for the ramp and the step).
_MIN_STEP_PX = 8


class _CropRegressor(nn.Module):
    """Backbone → linear head: one gene vector per crop."""

    def __init__(self, backbone: nn.Module, n_genes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(int(backbone.num_features), n_genes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @torch.no_grad()
    def set_output_bias(self, values: torch.Tensor) -> None:
        """Start at ``values`` (the mean target per gene): head bias = values, head weights scaled down."""
        self.head.weight.mul_(0.1)
        self.head.bias.copy_(torch.as_tensor(values, dtype=self.head.bias.dtype).reshape(-1))


class _SlidingWindowModel:
    """Shared geometry, sliding-window prediction and checkpoint plumbing of the spot baselines."""

    name = "baseline"
    value_kind = "intensive"

    def _init_geometry(
        self, genes: Sequence[str], *, um_per_px: float, crop_um: float, stride_um: float, tile_size: int | None
    ) -> None:
        genes = [str(g) for g in genes]
        check_gene_names(genes)
        if not genes:
            msg = "genes is empty; pass the genes to predict, e.g. from `st.pp.select_genes`."
            raise InputError(msg)
        for label, value in (("um_per_px", um_per_px), ("crop_um", crop_um), ("stride_um", stride_um)):
            if not np.isfinite(value) or value <= 0:
                msg = f"{label} must be a positive number of micrometres, got {value!r}."
                raise InputError(msg)
        self.var_names = genes
        self.um_per_px = float(um_per_px)
        self.crop_um = float(crop_um)
        self.stride_um = float(stride_um)
        self.crop_size = max(int(round(crop_um / um_per_px)), 8)
        self.output_stride = max(int(round(stride_um / um_per_px)), 1)
        if tile_size is None:
            # At least 256 px and two crops, and enough map pixels that predict_dense's default overlap
            # (twice the context plus a blending ramp) leaves a positive tile step even for coarse strides.
            context_px = math.ceil(self.crop_size // 2 / self.output_stride)
            n_map_px = max(math.ceil(max(256, 2 * self.crop_size) / self.output_stride), 2 * context_px + _MIN_STEP_PX)
            tile_size = self.output_stride * n_map_px
        if tile_size % self.output_stride:
            msg = f"tile_size ({tile_size}) must be a multiple of the output stride ({self.output_stride} px)."
            raise InputError(msg)
        self.tile_size = int(tile_size)
        self.context = self.crop_size // 2
        self.normalization: dict[str, Any] | None = None
        self.fit_history: dict[str, Any] = {}
        self.fit_params: dict[str, Any] = {}

    def _predict_crops(self, crops: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _windows(self, tiles: torch.Tensor) -> torch.Tensor:
        """All crops of a batch, ``(B·n·n, 3, c, c)``; crop ``(i, j)`` is centred on map pixel ``(i, j)``'s centre."""
        b, _, h, w = tiles.shape
        s, c = self.output_stride, self.crop_size
        n_y, n_x = h // s, w // s
        pad_lo = c // 2
        pad_hi_y = max((n_y - 1) * s + s // 2 + c - h - pad_lo, 0)
        pad_hi_x = max((n_x - 1) * s + s // 2 + c - w - pad_lo, 0)
        mode = "reflect" if max(pad_lo, pad_hi_x, pad_hi_y) < min(h, w) else "replicate"
        x = torch.nn.functional.pad(tiles, (pad_lo, pad_hi_x, pad_lo, pad_hi_y), mode=mode)
        x = x[:, :, s // 2 :, s // 2 :].unfold(2, c, s).unfold(3, c, s)[:, :, :n_y, :n_x]
        return x.permute(0, 2, 3, 1, 4, 5).reshape(b * n_y * n_x, 3, c, c)

    def predict_tiles(self, tiles: np.ndarray, *, device: str = "auto", batch_size: int = 256) -> np.ndarray:
        """Paint maps for a batch of RGB tiles by sliding the crop window every ``output_stride`` pixels.

        Parameters
        ----------
        tiles
            ``uint8 (batch, 3, H, W)`` at :attr:`um_per_px`; ``H`` and ``W`` multiples of :attr:`output_stride`.
        device
            Torch device, or ``"auto"``.
        batch_size
            Crops per forward pass.

        Returns
        -------
        ``float32 (batch, n_genes, H // output_stride, W // output_stride)``.
        """
        tiles = np.asarray(tiles)
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            msg = f"tiles must be uint8 (batch, 3, H, W), got shape {tiles.shape}."
            raise InputError(msg)
        dev = resolve_device(device)
        self._to(dev)
        b, _, h, w = tiles.shape
        n_y, n_x = h // self.output_stride, w // self.output_stride
        x = normalize_tiles(torch.from_numpy(np.ascontiguousarray(tiles)).to(dev))
        with torch.inference_mode():
            crops = self._windows(x)
            out = torch.cat([self._predict_crops(crops[i : i + batch_size]) for i in range(0, len(crops), batch_size)])
        out = out.float().reshape(b, n_y, n_x, -1).permute(0, 3, 1, 2)
        return out.cpu().numpy().astype(np.float32, copy=False)

    def _to(self, device: torch.device) -> None:
        raise NotImplementedError

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``config.json`` + ``weights.safetensors`` to the folder ``path`` (read back by ``st.models.load``)."""
        return save_model(self, path, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Any:
        """Read a model written by :meth:`save`."""
        from ._io import load

        model = load(path)
        if not isinstance(model, cls):
            msg = f"{str(path)!r} holds a {type(model).__name__}, not a {cls.__name__}; use st.models.load(path)."
            raise InputError(msg)
        return model

    def _geometry_config(self) -> dict[str, Any]:
        return {
            "genes": list(self.var_names),
            "um_per_px": self.um_per_px,
            "crop_um": self.crop_um,
            "stride_um": self.stride_um,
            "tile_size": self.tile_size,
            "normalization": self.normalization,
            "fit_history": self.fit_history,
            "fit_params": self.fit_params,
        }

    def _restore_extras(self, config: dict[str, Any]) -> None:
        self.normalization = config.get("normalization")
        self.fit_history = config.get("fit_history") or {}
        self.fit_params = config.get("fit_params") or {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self.var_names)} genes, {self.um_per_px:g} µm/px, crop {self.crop_um:g} µm, "
            f"stride {self.stride_um:g} µm)"
        )


@register_model()
class SpotCNN(_SlidingWindowModel):
    """ST-Net-like baseline: a CNN on the crop around a spot regresses the spot's (normalised) expression.

    Parameters
    ----------
    genes
        Genes to predict, one output each.
    encoder
        timm architecture (or stpredict preset) of the CNN.
    pretrained
        Encoder weights: ``None`` (random), ``"efficientnet-lite0"`` (shipped offline for
        ``"tf_efficientnet_lite0"``), a local weights file, ``"timm"`` or ``"hf-hub:..."``
        (see :class:`stpredict.models.PixNet`).
    um_per_px
        Resolution the crops are read at.
    crop_um
        Crop side in µm (ST-Net: the spot and a margin).
    stride_um
        Spacing of the painted map's pixels in µm.
    tile_size
        Preferred tile size in pixels for :func:`stpredict.tl.predict_dense`.
    """

    name = "spotcnn"
    _fit_inputs = "units"

    def __init__(
        self,
        genes: Sequence[str],
        *,
        encoder: str = "tf_efficientnet_lite0",
        pretrained: str | os.PathLike[str] | None = None,
        um_per_px: float = 1.0,
        crop_um: float = 64.0,
        stride_um: float = 16.0,
        tile_size: int | None = None,
    ) -> None:
        self._init_geometry(genes, um_per_px=um_per_px, crop_um=crop_um, stride_um=stride_um, tile_size=tile_size)
        self.encoder = encoder
        self.module = _CropRegressor(_backbone(encoder, pretrained), len(self.var_names))

    def fit(self, data: SpatialData | Sequence[SpatialData], **kwargs: Any) -> SpotCNN:
        """Train on crops centred on measured units; see :func:`stpredict.models._train.fit` for the arguments.

        ``tiles_per_epoch`` counts crops; ``loss`` must be ``"paper"`` (normalised targets).
        """
        from ._train import fit

        return fit(self, data, **kwargs)

    def _predict_crops(self, crops: torch.Tensor) -> torch.Tensor:
        return self.module(crops)

    def _to(self, device: torch.device) -> None:
        self.module.to(device).eval()

    def _checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        config = {"encoder": self.encoder, **self._geometry_config()}
        return config, dict(self.module.state_dict())

    @classmethod
    def _from_checkpoint_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> SpotCNN:
        model = cls(
            config["genes"],
            encoder=config["encoder"],
            pretrained=None,
            um_per_px=config["um_per_px"],
            crop_um=config["crop_um"],
            stride_um=config["stride_um"],
            tile_size=config["tile_size"],
        )
        model.module.load_state_dict(tensors)
        model.module.eval()
        model._restore_extras(config)
        return model


@register_model()
class EmbeddingRidge(_SlidingWindowModel):
    """HEST-Benchmark-like baseline: frozen encoder embeddings of spot crops → PCA → ridge regression.

    Parameters
    ----------
    genes
        Genes to predict.
    encoder
        timm architecture (or stpredict preset) of the frozen encoder.
    pretrained
        Encoder weights (see :class:`SpotCNN`); a frozen random encoder is only useful for tests.
    um_per_px
        Resolution the crops are read at.
    crop_um
        Crop side in µm.
    stride_um
        Spacing of the painted map's pixels in µm.
    n_components
        PCA components kept (capped by the number of units and the embedding size).
    alpha
        Ridge penalty on standardised PCA scores; ``None``: HEST's ``100 / (n_components · n_genes)``.
    tile_size
        Preferred tile size in pixels for :func:`stpredict.tl.predict_dense`.
    """

    name = "embeddingridge"

    def __init__(
        self,
        genes: Sequence[str],
        *,
        encoder: str = "tf_efficientnet_lite0",
        pretrained: str | os.PathLike[str] | None = None,
        um_per_px: float = 1.0,
        crop_um: float = 64.0,
        stride_um: float = 16.0,
        n_components: int = 50,
        alpha: float | None = None,
        tile_size: int | None = None,
    ) -> None:
        self._init_geometry(genes, um_per_px=um_per_px, crop_um=crop_um, stride_um=stride_um, tile_size=tile_size)
        if n_components < 1:
            msg = f"n_components must be at least 1, got {n_components}."
            raise InputError(msg)
        if alpha is not None and alpha < 0:
            msg = f"alpha must be non-negative, got {alpha}."
            raise InputError(msg)
        self.encoder = encoder
        self.n_components = int(n_components)
        self.alpha = alpha
        self.module = _backbone(encoder, pretrained).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.ridge: dict[str, torch.Tensor] | None = None

    def embed(self, crops: np.ndarray, *, device: str = "auto", batch_size: int = 64) -> np.ndarray:
        """Frozen embeddings of ``uint8 (n, 3, c, c)`` crops, ``float32 (n, features)``."""
        dev = resolve_device(device)
        self.module.to(dev).eval()
        out = []
        with torch.inference_mode():
            for i in range(0, len(crops), batch_size):
                x = normalize_tiles(torch.from_numpy(np.ascontiguousarray(crops[i : i + batch_size])).to(dev))
                out.append(self.module(x).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, int(self.module.num_features)), np.float32)

    def fit(
        self,
        data: SpatialData | Sequence[SpatialData],
        *,
        image_key: str = "he",
        table_key: str | Sequence[str] = "table",
        shapes_key: str | None = None,
        target_layer: str | None = None,
        max_units: int = 20000,
        batch_size: int = 64,
        seed: int = 0,
        device: str = "auto",
        num_workers: int = 0,
        show_progress_bar: bool | None = None,
    ) -> EmbeddingRidge:
        """Embed a crop around every measured unit (or ``max_units`` of them), fit PCA and ridge in closed form.

        Parameters
        ----------
        data
            One SpatialData or a list of them; images calibrated.
        image_key, table_key, shapes_key, target_layer
            As in PixNet's fit: targets are ``table.layers[target_layer]``, or log1p CPM of the raw counts in ``X``.
        max_units
            Units embedded at most (a seeded random subset beyond it).
        batch_size
            Crops per forward pass.
        seed
            Seeds the subset.
        device
            Torch device or ``"auto"``.
        num_workers
            DataLoader workers reading crops.
        show_progress_bar
            Default ``settings.show_progress_bar``.
        """
        from tqdm.auto import tqdm

        from ._data import UnitCropDataset, build_sections, collate_units
        from ._train import _target_normalization

        show_progress_bar = settings.show_progress_bar if show_progress_bar is None else show_progress_bar
        table_keys = [table_key] if isinstance(table_key, str) else list(table_key)
        sections = build_sections(
            data,
            image_key=image_key,
            table_keys=table_keys,
            shapes_key=shapes_key,
            genes=self.var_names,
            space="normalised",
            target_layer=target_layer,
        )
        total = sum(len(u.centers) for s in sections for u in s.units)
        if total > max_units:
            rng = np.random.default_rng(seed)
            keep = set(rng.choice(total, max_units, replace=False).tolist())
            masks, start = [], 0
            for s in sections:
                m = []
                for u in s.units:
                    m.append(np.array([start + k in keep for k in range(len(u.centers))], dtype=bool))
                    start += len(u.centers)
                masks.append(m)
            sections = [s.subset(m) for s, m in zip(sections, masks, strict=True)]
        dataset = UnitCropDataset(sections, model_um_per_px=self.um_per_px, crop_size=self.crop_size, seed=seed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_units, num_workers=num_workers
        )
        feats, targets = [], []
        for batch in tqdm(loader, desc="embedding units", disable=not show_progress_bar):
            feats.append(self.embed(batch["image"].numpy(), device=device, batch_size=batch_size))
            targets.append(batch["target"].numpy())
        X = np.concatenate(feats).astype(np.float64)
        Y = np.concatenate(targets).astype(np.float64)
        self._fit_ridge(X, Y)
        self.fit_params = {
            "image_key": image_key,
            "table_keys": table_keys,
            "target_layer": target_layer,
            "n_units": len(X),
            "seed": seed,
            "n_components": int(self.ridge["components"].shape[0]),
            "alpha": float(self.ridge["alpha"]),
        }
        if self.normalization is None:
            self.normalization = _target_normalization(data, table_keys[0], target_layer)
        return self

    def _fit_ridge(self, X: np.ndarray, Y: np.ndarray) -> None:
        """PCA (SVD of centred embeddings) → standardised scores → closed-form ridge with intercept."""
        if len(X) < 2:
            msg = f"EmbeddingRidge needs at least 2 units to fit, got {len(X)}."
            raise InputError(msg)
        mean = X.mean(axis=0)
        _, svals, vt = np.linalg.svd(X - mean, full_matrices=False)
        k = int(min(self.n_components, len(vt), int(np.sum(svals > svals[0] * 1e-9)) if len(svals) else 0))
        k = max(k, 1)
        components = vt[:k]
        Z = (X - mean) @ components.T
        scale = Z.std(axis=0)
        scale[scale == 0] = 1.0
        Z = Z / scale
        y_mean = Y.mean(axis=0)
        alpha = self.alpha if self.alpha is not None else 100.0 / (k * Y.shape[1])
        coef = np.linalg.solve(Z.T @ Z + alpha * np.eye(k), Z.T @ (Y - y_mean))
        # Fold the standardisation into the projection: score = (x − mean) @ proj, pred = score @ coef + y_mean.
        proj = components.T / scale
        self.ridge = {
            "mean": torch.from_numpy(mean.astype(np.float32)),
            "components": torch.from_numpy(components.astype(np.float32)),
            "proj": torch.from_numpy(proj.astype(np.float32)),
            "coef": torch.from_numpy(coef.astype(np.float32)),
            "intercept": torch.from_numpy(y_mean.astype(np.float32)),
            "alpha": torch.tensor(float(alpha)),
        }

    def _predict_crops(self, crops: torch.Tensor) -> torch.Tensor:
        if self.ridge is None:
            msg = "EmbeddingRidge is not fitted; call `model.fit(sdata, ...)` first."
            raise InputError(msg)
        r = {k: v.to(crops.device) for k, v in self.ridge.items()}
        emb = self.module(crops).float()
        return ((emb - r["mean"]) @ r["proj"]) @ r["coef"] + r["intercept"]

    def _to(self, device: torch.device) -> None:
        self.module.to(device).eval()

    def _checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        if self.ridge is None:
            msg = "EmbeddingRidge is not fitted; fit it before saving."
            raise InputError(msg)
        config = {
            "encoder": self.encoder,
            "n_components": self.n_components,
            "alpha": self.alpha,
            **self._geometry_config(),
        }
        tensors = {f"encoder.{k}": v for k, v in self.module.state_dict().items()}
        tensors.update({f"ridge.{k}": v for k, v in self.ridge.items()})
        return config, tensors

    @classmethod
    def _from_checkpoint_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> EmbeddingRidge:
        model = cls(
            config["genes"],
            encoder=config["encoder"],
            pretrained=None,
            um_per_px=config["um_per_px"],
            crop_um=config["crop_um"],
            stride_um=config["stride_um"],
            n_components=config["n_components"],
            alpha=config["alpha"],
            tile_size=config["tile_size"],
        )
        model.module.load_state_dict(
            {k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")}
        )
        model.ridge = {k.removeprefix("ridge."): v for k, v in tensors.items() if k.startswith("ridge.")}
        model._restore_extras(config)
        return model
