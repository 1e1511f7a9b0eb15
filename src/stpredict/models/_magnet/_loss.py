"""MagNet's hybrid loss with cross-resolution consistency (SPEC.md §3.8, ``Junchao-Zhu/MagNet:models/losses.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stpredict._errors import InputError

__all__ = ["LossWeights", "magnet_loss", "pcc_loss", "pcc_rows"]


def pcc_rows(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pearson correlation across genes within each row, as the authors compute it.

    ``sum(x y) / sqrt(sum(x²) · sum(y²) + 1e-8)`` with ``x``, ``y`` the row-centred inputs (the ``1e-8`` sits under
    the square root, so a constant row gives 0, not NaN).

    Parameters
    ----------
    pred, target
        ``(n, genes)``; ``target`` is cast to ``pred``'s dtype.

    Returns
    -------
    ``(n,)`` correlations.
    """
    if pred.shape != target.shape or pred.ndim != 2:
        msg = (
            f"`pred` and `target` must both be (n, genes), got {tuple(pred.shape)} and {tuple(target.shape)}. "
            "Pass matching 2-d arrays."
        )
        raise InputError(msg)
    target = target.to(pred.dtype)
    x = pred - pred.mean(dim=1, keepdim=True)
    y = target - target.mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / torch.sqrt((x * x).sum(dim=1) * (y * y).sum(dim=1) + 1e-8)


def pcc_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``1 - mean(pcc_rows(pred, target))``; 0 (attached to ``pred``'s graph) for no rows.

    Parameters
    ----------
    pred, target
        ``(n, genes)``.

    Returns
    -------
    A scalar.
    """
    rows = pcc_rows(pred, target)
    if rows.numel() == 0:
        return pred.sum() * 0
    return 1 - rows.mean()


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (``nn.MSELoss``); 0 attached to the graph when empty."""
    if pred.numel() == 0:
        return pred.sum() * 0
    return F.mse_loss(pred, target.to(pred.dtype))


@dataclass(frozen=True)
class LossWeights:
    """Weights of :func:`magnet_loss`'s terms (the paper's defaults, SPEC.md §3.8).

    Parameters
    ----------
    mse
        Bin MSE.
    pcc
        Bin spot-wise PCC loss.
    levels
        PCC losses of the region and spot tiles against their own labels.
    consistency
        PCC losses of each bin's parent-tile prediction against the bin's label.
    """

    mse: float = 0.75
    pcc: float = 0.10
    levels: float = 0.05
    consistency: float = 0.05


def _rows(mask: torch.Tensor | None, n: int, name: str, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    if mask.shape != (n,):
        msg = f"`{name}` must be a boolean vector of length {n} (one per row), got shape {tuple(mask.shape)}."
        raise InputError(msg)
    return mask.bool()


def _parents(index: torch.Tensor, n_bins: int, n_tiles: int, name: str) -> torch.Tensor:
    if index.shape != (n_bins,):
        msg = f"`{name}` must have shape ({n_bins},) (one parent row per bin, -1 for none), got {tuple(index.shape)}."
        raise InputError(msg)
    index = index.long()
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= n_tiles):
        msg = f"`{name}` must index the {n_tiles} tile rows or be -1 (no parent); found values outside [-1, {n_tiles})."
        raise InputError(msg)
    return index


def magnet_loss(
    out_bin: torch.Tensor,
    y_bin: torch.Tensor,
    out_region: torch.Tensor,
    y_region: torch.Tensor,
    out_spot: torch.Tensor,
    y_spot: torch.Tensor,
    bin_region: torch.Tensor,
    bin_spot: torch.Tensor,
    *,
    weights: LossWeights = LossWeights(),
    bin_mask: torch.Tensor | None = None,
    region_mask: torch.Tensor | None = None,
    spot_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MagNet's loss (SPEC.md §3.8).

    ``L = w.mse·MSE(ŷ_bin, y_bin) + w.pcc·Lpcc(ŷ_bin, y_bin) + w.levels·[Lpcc(ŷ_region, y_region)
    + Lpcc(ŷ_spot, y_spot)] + w.consistency·[Lpcc(ŷ_region[bin_region], y_bin) + Lpcc(ŷ_spot[bin_spot], y_bin)]``
    with ``Lpcc`` = :func:`pcc_loss`. An empty set of rows contributes 0.

    Parameters
    ----------
    out_bin, y_bin
        ``(n_bins, genes)`` predictions and labels of the bins.
    out_region, y_region
        ``(n_region, genes)`` of the region (512-px) tiles.
    out_spot, y_spot
        ``(n_spot, genes)`` of the spot (224-px) tiles.
    bin_region, bin_spot
        ``(n_bins,)`` row of each bin's parent tile in ``out_region`` / ``out_spot``; -1 for none (the bin then
        leaves that consistency term out).
    weights
        Term weights.
    bin_mask
        ``(n_bins,)`` bool, the bins with labels: only these enter the MSE, PCC and consistency terms.
    region_mask, spot_mask
        ``(n_tiles,)`` bool, the tiles with labels: only these enter the level term.

    Returns
    -------
    The weighted total and the unweighted terms ``{"mse", "pcc", "levels", "consistency", "loss"}`` (``levels`` and
    ``consistency`` are the sums of their two brackets; ``loss`` is the total).
    """
    n_bins = out_bin.shape[0]
    for name, pred, target in (("bin", out_bin, y_bin), ("region", out_region, y_region), ("spot", out_spot, y_spot)):
        if pred.shape != target.shape:
            msg = (
                f"The {name} predictions {tuple(pred.shape)} and labels {tuple(target.shape)} differ in shape. "
                "Pass one label row per prediction row."
            )
            raise InputError(msg)
    bins = _rows(bin_mask, n_bins, "bin_mask", out_bin.device)
    region_rows = _rows(region_mask, out_region.shape[0], "region_mask", out_region.device)
    spot_rows = _rows(spot_mask, out_spot.shape[0], "spot_mask", out_spot.device)
    parent_region = _parents(bin_region, n_bins, out_region.shape[0], "bin_region")
    parent_spot = _parents(bin_spot, n_bins, out_spot.shape[0], "bin_spot")

    mse = _mse(out_bin[bins], y_bin[bins])
    pcc = pcc_loss(out_bin[bins], y_bin[bins])
    levels = pcc_loss(out_region[region_rows], y_region[region_rows]) + pcc_loss(out_spot[spot_rows], y_spot[spot_rows])
    consistency = out_bin.new_zeros(())
    for out_tile, parent in ((out_region, parent_region), (out_spot, parent_spot)):
        keep = bins & (parent >= 0)
        consistency = consistency + pcc_loss(out_tile[parent[keep]], y_bin[keep])
    total = weights.mse * mse + weights.pcc * pcc + weights.levels * levels + weights.consistency * consistency
    return total, {"mse": mse, "pcc": pcc, "levels": levels, "consistency": consistency, "loss": total}
