"""EmbeddingRidge, the HEST-Benchmark-like baseline: frozen encoder embeddings of unit crops → PCA → ridge."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stpredict._errors import InputError
from stpredict._settings import limit_threads, settings
from stpredict.models._data import UnitCropDataset, build_sections, collate_units
from stpredict.models._device import resolve_device
from stpredict.models._io import register_model
from stpredict.models._training import normalize_tiles
from stpredict.models._training._fit import _target_normalization

from ._sliding_window import _backbone, _SlidingWindowModel

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from spatialdata import SpatialData

__all__ = ["EmbeddingRidge"]


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
        """Frozen encoder embeddings of image crops.

        Parameters
        ----------
        crops
            ``uint8 (n, 3, c, c)`` RGB crops.
        device
            Torch device (``"auto"``: ``settings.device``).
        batch_size
            Crops per forward pass.

        Returns
        -------
        ``float32 (n, features)`` embeddings.
        """
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

        limit_threads()
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
