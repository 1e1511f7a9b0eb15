"""MagNet, the Visium HD bin model: user-facing class, tile prediction for predict_dense, checkpoints."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stpredict._errors import InputError
from stpredict._logging import get_logger
from stpredict._validation import check_gene_names
from stpredict.models._device import resolve_device
from stpredict.models._io import network_checkpoint_state, register_model, restore_network, save_model
from stpredict.models._training._plan import normalize_tiles

from ._geometry import cell_of, crop_origins, knn_edges, neighbour_tokens
from ._module import MagNetModule

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from spatialdata import SpatialData

__all__ = ["MagNet"]

logger = get_logger(__name__)


def _positive(name: str, value: Any) -> float:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        msg = f"{name} must be a positive number of micrometres, got {value!r}."
        raise InputError(msg)
    return float(value)


def _pixels(name: str, um: float, um_per_px: float) -> int:
    px = um / um_per_px
    if abs(px - round(px)) > 1e-6 or round(px) < 1:
        msg = (
            f"{name}={um:g} µm is {px:g} pixels at um_per_px={um_per_px:g}; it must be a whole number of pixels. "
            f"Choose um_per_px so that it divides {name} (e.g. um_per_px={um / max(1, round(px)):g})."
        )
        raise InputError(msg)
    return round(px)


@register_model()
class MagNet:
    """MagNet (Zhu et al., MIDL 2025; SPEC.md §3): multi-resolution fusion and graph attention for HD bins.

    Each bin of ``bin_um`` is predicted from a crop of ``crop_um`` centred on it (trainable *bin encoder*) fused by
    cross-attention with the features of the context tiles that hold it, the cells of two non-overlapping grids of
    ``spot_um`` and ``region_um`` anchored at the image origin (frozen *context encoder*, features computed once
    per slide). A graph module (graph blocks on a kNN graph of the bins, a transformer shared across levels) then
    mixes each bin with its neighbours; the two tile levels run the same module on their tile graphs during
    training, for the loss terms that tie the levels together (0.75 MSE + 0.10 PCC on bins, 0.05 PCC on tiles,
    0.05 bin–tile consistency).

    Prediction goes through :func:`stpredict.tl.predict_dense` like any dense model: the map has one pixel per bin
    (stride ``bin_um``, on the grid anchored at the image origin that :func:`stpredict.tl.aggregate` uses), so
    aggregating it at ``bin_size=bin_um`` gives back the per-bin predictions exactly. The map's values are
    normalised expression (``value_kind="intensive"``).

    Parameters
    ----------
    genes
        Genes to predict, in order.
    bin_um
        Side of the bins the model is trained on and predicts (8 or 16 µm for Visium HD).
    um_per_px
        Resolution the images are read at. The paper's 112 / 224 / 512 px crops are about 0.25 µm/px; 0.5 (the
        default) halves every side, a quarter of the compute, at the same fields of view.
    crop_um, spot_um, region_um
        Fields of view of the bin crop and the two context tiles (the paper's 112 / 224 / 512 px ≈ 28 / 56 /
        128 µm). ``region_um`` must be a multiple of ``bin_um``.
    encoder, context_encoder
        timm architectures of the trainable bin encoder and the frozen context encoder (any timm model with pooled
        features; ``"resnet50"`` is the paper's).
    pretrained, context_pretrained
        Their weights, as for :class:`~stpredict.models.PixNet` (``"efficientnet-lite0"`` ships offline;
        ``"timm"``, ``"hf-hub:..."`` or a local file for others). ``context_pretrained`` defaults to
        ``pretrained``.
    dim
        Width of the fused features, graph blocks and transformer (the paper: 1024).
    depth, n_layers, num_heads
        Graph blocks per level, transformer layers, attention heads (the paper: 3, 3, 8).
    faithful
        Reproduce the published code's design (SPEC §3.10 items 7–11): single-token cross-attention (a linear
        map), parallel gated-mean graph blocks, a random frozen context projection, one head for all levels,
        shuffled (not contiguous) training batches, parent tiles found by the nearest label vector, and SGD with
        the poly schedule. The default fixes them: the bin attends over the 3 × 3 tiles around it at both levels,
        stacked GATv2 blocks, a trained projection, a head per level, contiguous batches and AdamW.
    halo_um
        Width of the ring of bins around a window (in training and in each predicted tile) that join the graph
        without a loss, so that edge bins have their neighbours (see Notes for its limit).
    core_tiles
        Region tiles per side of the core of one predicted tile (a larger core amortises the margin).
    dropout
        Dropout in attention, graph blocks and transformer.
    encoder_kwargs
        Extra :func:`timm.create_model` keyword arguments for both encoders.
    seed
        Seeds the random initialisation.

    Notes
    -----
    A predicted tile is its core plus a margin of one region tile on each side, so that every context tile a core
    bin (or halo bin) attends over lies wholly inside it: ``halo_um + 2 · spot_um ≤ region_um`` and
    ``halo_um + crop_um / 2 ≤ region_um`` are checked at construction.
    """

    name = "magnet"
    value_kind = "intensive"
    tiling = "partition"
    uses_tile_origins = True

    def __init__(
        self,
        genes: Sequence[str],
        *,
        bin_um: float = 8.0,
        um_per_px: float = 0.5,
        crop_um: float = 28.0,
        spot_um: float = 56.0,
        region_um: float = 128.0,
        encoder: str = "tf_efficientnet_lite0",
        context_encoder: str | None = None,
        pretrained: str | os.PathLike[str] | None = "efficientnet-lite0",
        context_pretrained: str | os.PathLike[str] | None = None,
        dim: int = 256,
        depth: int = 3,
        n_layers: int = 3,
        num_heads: int = 8,
        faithful: bool = False,
        halo_um: float = 16.0,
        core_tiles: int = 4,
        dropout: float = 0.1,
        encoder_kwargs: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        genes = [str(g) for g in genes] if not isinstance(genes, str) else [genes]
        if not genes:
            msg = "genes is empty; pass the gene names the model predicts, e.g. st.pp.select_genes(...)."
            raise InputError(msg)
        check_gene_names(genes)
        um_per_px = _positive("um_per_px", um_per_px)
        bin_um, crop_um, spot_um, region_um = (
            _positive(n, v) for n, v in (("bin_um", bin_um), ("crop_um", crop_um), ("spot_um", spot_um),
                                         ("region_um", region_um))
        )  # fmt: skip
        halo_um = float(halo_um)
        if halo_um < 0:
            msg = f"halo_um must be ≥ 0, got {halo_um!r}."
            raise InputError(msg)
        self.bin_px = _pixels("bin_um", bin_um, um_per_px)
        self.crop_px = _pixels("crop_um", crop_um, um_per_px)
        self.spot_px = _pixels("spot_um", spot_um, um_per_px)
        self.region_px = _pixels("region_um", region_um, um_per_px)
        if self.region_px % self.bin_px:
            msg = f"region_um={region_um:g} must be a multiple of bin_um={bin_um:g} (the map's tiles align to both)."
            raise InputError(msg)
        n_tokens = 1 if faithful else 9
        reach = halo_um + (2 if n_tokens > 1 else 1) * spot_um
        if reach > region_um + 1e-9 or halo_um + crop_um / 2 > region_um + 1e-9:
            msg = (
                f"halo_um={halo_um:g}, crop_um={crop_um:g} and spot_um={spot_um:g} reach beyond one region tile "
                f"({region_um:g} µm) around a predicted tile's core; use a smaller halo_um or spot_um, or a larger "
                "region_um."
            )
            raise InputError(msg)
        if not isinstance(core_tiles, int) or core_tiles < 1:
            msg = f"core_tiles must be a positive int, got {core_tiles!r}."
            raise InputError(msg)
        self.var_names: list[str] = genes
        self.um_per_px = um_per_px
        self.bin_um = bin_um
        self.faithful = bool(faithful)
        self.n_tokens = n_tokens
        self.halo_px = halo_um / um_per_px
        self.output_stride = self.bin_px
        self.context = self.region_px
        self.tile_size = (core_tiles + 2) * self.region_px
        self.normalization: dict[str, Any] | None = None
        self.fit_history: dict[str, Any] | None = None
        self.fit_params: dict[str, Any] | None = None
        context_encoder = context_encoder or encoder
        if context_pretrained is None and context_encoder == encoder:
            context_pretrained = pretrained
        self.config: dict[str, Any] = {
            "bin_um": bin_um,
            "um_per_px": um_per_px,
            "crop_um": crop_um,
            "spot_um": spot_um,
            "region_um": region_um,
            "encoder": encoder,
            "context_encoder": context_encoder,
            "pretrained": None if pretrained is None else os.fspath(pretrained),
            "context_pretrained": None if context_pretrained is None else os.fspath(context_pretrained),
            "dim": int(dim),
            "depth": int(depth),
            "n_layers": int(n_layers),
            "num_heads": int(num_heads),
            "faithful": self.faithful,
            "halo_um": halo_um,
            "core_tiles": core_tiles,
            "dropout": float(dropout),
            "encoder_kwargs": dict(encoder_kwargs or {}),
            "seed": int(seed),
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.module = MagNetModule(
                len(genes),
                bin_encoder=encoder,
                context_encoder=context_encoder,
                bin_pretrained=pretrained,
                context_pretrained=context_pretrained,
                dim=int(dim),
                depth=int(depth),
                n_layers=int(n_layers),
                num_heads=int(num_heads),
                n_tokens=n_tokens,
                faithful=self.faithful,
                dropout=float(dropout),
                encoder_kwargs=encoder_kwargs,
            )
        _check_context_input(self.module.context_encoder, context_encoder, self.spot_px, self.region_px)
        self.module.eval()

    # ------------------------------------------------------------------ info
    @property
    def region_um(self) -> float:
        """Side of the region-level context tile in µm."""
        return self.region_px * self.um_per_px

    def n_parameters(self, *, trainable_only: bool = False) -> int:
        """Number of parameters of the network.

        Parameters
        ----------
        trainable_only
            Count only the parameters that train (the context encoder is frozen).
        """
        return sum(p.numel() for p in self.module.parameters() if p.requires_grad or not trainable_only)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"MagNet({len(self.var_names)} genes, bin_um={self.bin_um:g}, um_per_px={self.um_per_px:g}, "
            f"crop/spot/region={c['crop_um']:g}/{c['spot_um']:g}/{c['region_um']:g} µm, encoder={c['encoder']!r}, "
            f"faithful={self.faithful}, {self.n_parameters() / 1e6:.2f}M parameters)"
        )

    # ------------------------------------------------------------------ training
    def fit(self, data: SpatialData | Sequence[SpatialData], **kwargs: Any) -> MagNet:
        """Train on the measured bins of one or more sections.

        Parameters
        ----------
        data
            One SpatialData or a list (training sections), each with a calibrated image and a table of bins of
            ``bin_um`` (raw counts in ``X``; bin 2 µm bins with :func:`stpredict.pp.bin_counts`).
        kwargs
            Keyword-only options:

            ``image_key`` (``"he"``), ``table_key`` (``"table"``), ``shapes_key`` (when the table annotates
            several), ``target_layer`` (normalised targets from :func:`stpredict.pp.normalize`, e.g. ``prop_log``,
            the paper's; ``None``: log1p CPM of ``X``; tile labels are normalised the same way),
            ``validation_data`` (sections for early stopping and the best epoch), ``max_epochs`` (30),
            ``batches_per_epoch`` (default: one pass over the windows, or over the bins in batches when faithful),
            ``window_cells`` (region tiles per side of a training window, 1), ``batch_bins`` (faithful batches, 256),
            ``optimizer`` (``"adamw"``; ``"sgd"`` with the poly schedule when faithful), ``lr`` (3e-4 AdamW,
            0.005 SGD), ``encoder_lr`` (the bin encoder's rate: a tenth of ``lr``, or ``lr`` when faithful; at the
            full rate its pretrained features collapsed on small data), ``weight_decay`` (1e-4), ``loss_weights``
            ((0.75, 0.10, 0.05, 0.05)), ``augment`` (flips and 90° rotations of the bin crops), ``patience`` (5),
            ``seed``, ``device``, ``precision``, ``show_progress_bar``, and further :class:`lightning.pytorch.Trainer`
            arguments.

        Returns
        -------
        ``self``, trained.
        """
        from ._fit import fit_magnet

        return fit_magnet(self, data, **kwargs)

    def with_bin_size(self, *, bin_um: float, force: bool = False) -> MagNet:
        """A copy that predicts bins of another size (the same network on crops centred on the new bins).

        The network was trained on bins of :attr:`bin_um`; its targets (expression of one bin) do not transfer to
        another size, so this needs ``force=True`` and warns. To compare sizes, aggregate the map of the trained
        size instead (:func:`stpredict.tl.aggregate` with any ``bin_size``).

        Parameters
        ----------
        bin_um
            The new bin side in µm (``region_um`` must be a multiple of it).
        force
            Acknowledge that the model was trained at another bin size.

        Returns
        -------
        A new :class:`MagNet` with the same weights.
        """
        bin_um = _positive("bin_um", bin_um)
        if bin_um == self.bin_um:
            return self
        if not force:
            msg = (
                f"This MagNet was trained on {self.bin_um:g} µm bins; predicting {bin_um:g} µm bins changes what "
                "its outputs mean. Aggregate its map to other sizes with st.tl.aggregate(..., bin_size=...), train "
                f"a MagNet(bin_um={bin_um:g}), or pass force=True."
            )
            raise InputError(msg)
        warnings.warn(
            f"MagNet trained on {self.bin_um:g} µm bins now predicts {bin_um:g} µm bins (force=True).", UserWarning,
            stacklevel=2,
        )  # fmt: skip
        config, tensors = self._checkpoint_state()
        config["params"] = {**config["params"], "bin_um": bin_um}
        return type(self)._from_checkpoint_state(config, tensors)

    # ------------------------------------------------------------------ prediction
    def predict_tiles(
        self, tiles: np.ndarray, *, origins: np.ndarray | None = None, device: str = "auto"
    ) -> np.ndarray:
        """Predict the bins of tiles cut by :func:`stpredict.tl.predict_dense` (``tiling="partition"``).

        Parameters
        ----------
        tiles
            ``uint8`` ``(batch, 3, tile_size, tile_size)`` at :attr:`um_per_px`.
        origins
            Model-pixel position ``(y, x)`` of each tile's first pixel; must lie on the region grid (as
            predict_dense's partition tiling places them). Default: every tile at the origin.
        device
            Torch device or ``"auto"``.

        Returns
        -------
        ``float32`` ``(batch, genes, n, n)``, ``n = tile_size // bin_px``: one value per bin of the tile's core
        and halo, 0 elsewhere (the margin, whose weight is 0 in the stitched map).
        """
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[1] != 3:
            msg = f"tiles must be uint8 (batch, 3, H, W), got {tiles.dtype} {tiles.shape}."
            raise InputError(msg)
        t = tiles.shape[-1]
        if tiles.shape[-2] != t or t % self.region_px or t < 3 * self.region_px:
            msg = (
                f"MagNet tiles must be squares of a multiple (≥ 3) of the region tile ({self.region_px} px), got "
                f"{tiles.shape[-2:]}; predict through st.tl.predict_dense, which cuts them."
            )
            raise InputError(msg)
        origins = np.zeros((len(tiles), 2), np.int64) if origins is None else np.asarray(origins, np.int64)
        if (origins % self.region_px).any():
            msg = f"Tile origins {origins.tolist()} are not on the region grid ({self.region_px} px)."
            raise InputError(msg)
        dev = resolve_device(device)
        self.module.to(dev).eval()
        out = np.zeros((len(tiles), len(self.var_names), t // self.bin_px, t // self.bin_px), np.float32)
        with torch.inference_mode():
            for b in range(len(tiles)):
                out[b] = self._predict_tile(tiles[b], origins[b], dev)
        return out

    def _predict_tile(self, tile: np.ndarray, origin: np.ndarray, dev: torch.device) -> np.ndarray:
        s, r = self.bin_px, self.region_px
        t = tile.shape[-1]
        n = t // s
        h = math.ceil(self.halo_px / s - 1e-9)
        lo, hi = r // s - h, n - r // s + h  # bins of the core and halo, in tile bins
        idx = np.arange(lo, hi)
        rows, cols = np.repeat(idx, len(idx)), np.tile(idx, len(idx))
        local = np.stack([(cols + 0.5) * s, (rows + 0.5) * s], axis=1)  # tile-pixel centres (x, y)
        glob = local + origin[::-1][None, :]  # model-pixel centres on the slide
        oy, ox = int(origin[0]), int(origin[1])
        origins = crop_origins(local, self.crop_px)
        c = self.crop_px
        crops = np.stack([tile[:, y : y + c, x : x + c] for x, y in origins])
        batch: dict[str, torch.Tensor] = {
            "bin_edges": torch.from_numpy(knn_edges(np.stack([cols, rows], 1).astype(np.float64), 8)).to(dev)
        }
        radius = 1 if self.n_tokens > 1 else 0
        for level, cell in (("region", r), ("spot", self.spot_px)):
            bin_cells = cell_of(glob, cell)
            offsets = np.array([(dx, dy) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)])
            cells = np.unique((bin_cells[:, None, :] + offsets[None]).reshape(-1, 2), axis=0)
            x0 = cells[:, 0] * cell - ox
            y0 = cells[:, 1] * cell - oy
            inside = (x0 >= 0) & (y0 >= 0) & (x0 + cell <= t) & (y0 + cell <= t)
            if level == "spot" and not inside.all():  # pragma: no cover - guarded by the construction checks
                msg = "internal: a context tile reaches beyond the predicted tile; report this with the model config."
                raise RuntimeError(msg)
            # region tiles beyond the margin (neighbours of halo bins) are left out, as in a training window
            cells, x0, y0 = cells[inside], x0[inside], y0[inside]
            images = np.stack([tile[:, y : y + cell, x : x + cell] for x, y in zip(x0, y0, strict=True)])
            feats = self._encode_context(images, dev)
            batch[f"bin_{level}"] = torch.from_numpy(neighbour_tokens(bin_cells, cells, radius=radius)).to(dev)
            batch[f"{level}_feats"] = feats
        preds = []
        step = 1024
        x_bins = []
        for start in range(0, len(crops), step):  # the bin encoder in chunks (memory)
            x = normalize_tiles(torch.from_numpy(np.ascontiguousarray(crops[start : start + step])).to(dev))
            x_bins.append(x)
        batch["crops"] = torch.cat(x_bins) if len(x_bins) > 1 else x_bins[0]
        preds = self.module(batch, tile_levels=False)["bin"].float().cpu().numpy()
        grid = np.zeros((len(self.var_names), n, n), np.float32)
        grid[:, rows, cols] = preds.T
        return grid

    def _encode_context(self, images: np.ndarray, dev: torch.device) -> torch.Tensor:
        feats = []
        step = max(1, int(2**22 // (images.shape[-1] ** 2)))
        for start in range(0, len(images), step):
            x = normalize_tiles(torch.from_numpy(np.ascontiguousarray(images[start : start + step])).to(dev))
            feats.append(self.module.encode_context(x))
        return torch.cat(feats)

    # ------------------------------------------------------------------ checkpoints
    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Save as ``config.json`` + ``weights.safetensors`` (load with :func:`stpredict.models.load`).

        Parameters
        ----------
        path
            Checkpoint folder.
        overwrite
            Replace an earlier checkpoint in ``path``.

        Returns
        -------
        The checkpoint folder.
        """
        return save_model(self, path, overwrite=overwrite)

    def _checkpoint_state(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return network_checkpoint_state(self)

    @classmethod
    def _from_checkpoint_state(cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> MagNet:
        if "params" not in config or "var_names" not in config:
            msg = "MagNet checkpoint config lacks 'params' or 'var_names'; the checkpoint is corrupt."
            raise InputError(msg)
        params = dict(config["params"])
        provenance = (params.pop("pretrained", None), params.pop("context_pretrained", None))
        try:
            model = cls(config["var_names"], pretrained=None, context_pretrained=None, **params)
        except TypeError as err:
            msg = f"MagNet checkpoint has parameters this stpredict does not know ({err}); upgrade stpredict."
            raise InputError(msg) from err
        restore_network(model, config, tensors)
        model.config["pretrained"], model.config["context_pretrained"] = provenance
        return model


def _check_context_input(encoder: torch.nn.Module, name: str, spot_px: int, region_px: int) -> None:
    """Refuse a context encoder built for one input size (e.g. a ViT) whose size differs from the tiles."""
    size = getattr(getattr(encoder, "patch_embed", None), "img_size", None)
    dynamic = getattr(getattr(encoder, "patch_embed", None), "dynamic_img_size", False)
    if size is None or dynamic:
        return
    size = tuple(size)
    for what, px in (("spot", spot_px), ("region", region_px)):
        if (px, px) != size:
            msg = (
                f"context_encoder={name!r} takes {size[0]} × {size[1]} px inputs, but the {what} tiles are {px} px. "
                f"Choose um_per_px and {what}_um so that the tiles are {size[0]} px, pass "
                "encoder_kwargs={'dynamic_img_size': True}, or use a CNN context encoder."
            )
            raise InputError(msg)
