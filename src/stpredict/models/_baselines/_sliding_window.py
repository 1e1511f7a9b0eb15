"""The shared base of the spot baselines: a crop regressor painted into a dense map by a sliding window.

Both baselines predict one gene vector from a square crop centred on a point. As dense models they paint a map by
sliding that crop over a tile every ``output_stride`` pixels (one map pixel per window centre), so
:func:`stpredict.tl.predict_dense`, :func:`stpredict.tl.aggregate` and :func:`stpredict.tl.evaluate` treat them
exactly like PixNet. Values are normalised expression (``value_kind="intensive"``, aggregate by mean). This module
holds their geometry, the sliding-window prediction, the checkpoint plumbing and the timm backbone they share.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stpredict._errors import InputError
from stpredict._logging import get_logger
from stpredict._validation import check_gene_names
from stpredict.models._device import resolve_device
from stpredict.models._io import save_model
from stpredict.models._training import normalize_tiles
from stpredict.models._weights import pooled_backbone as _backbone

if TYPE_CHECKING:
    import os
    from collections.abc import Sequence
    from pathlib import Path


__all__ = ["_SlidingWindowModel", "_backbone"]

logger = get_logger(__name__)


#: Map pixels a default baseline tile has beyond its two context bands (room for the ramp and the step).
_MIN_STEP_PX = 8


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
        """Write ``config.json`` + ``weights.safetensors`` to the folder ``path`` (read back by ``st.models.load``).

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

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Any:
        """Read a model written by :meth:`save`."""
        from stpredict.models._io import load

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
