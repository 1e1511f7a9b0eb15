"""SpotCNN, the ST-Net-like baseline: a CNN trained end to end on the crop around each measured unit."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stpredict.models._io import register_model
from stpredict.models._training import fit_options

from ._sliding_window import _backbone, _SlidingWindowModel

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence

    from spatialdata import SpatialData

__all__ = ["SpotCNN"]


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

    @fit_options
    def fit(self, data: SpatialData | Sequence[SpatialData], **kwargs: Any) -> SpotCNN:
        """Train on crops centred on measured units, with the training loop PixNet uses.

        ``tiles_per_epoch`` counts crops; ``loss`` must be ``"paper"`` (normalised targets).

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
