"""Training losses on aggregated unit predictions (SPEC.md §2.4; DESIGN.md "What a map value means").

* ``"paper"``: MSE + λ·(1 − PCC) on normalised targets, PCC per gene across the units of a batch, then averaged
  over genes (``Yan98/EGN:v1/train.py:correlationMetric``), λ = 0.5.
* ``"poisson"``: Poisson negative log-likelihood of raw counts given expected counts.
* ``"nb"``: negative-binomial negative log-likelihood (mean μ, per-gene inverse dispersion θ, learned).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["LOSSES", "nb_nll", "pearson_loss", "paper_loss", "poisson_nll"]

#: Accepted ``loss=`` names and the target space each works in.
LOSSES = {"paper": "normalised", "poisson": "counts", "nb": "counts"}

_EPS = 1e-8


def pearson_loss(pred: torch.Tensor, target: torch.Tensor, *, eps: float = _EPS) -> torch.Tensor:
    """``1 − mean_g PCC_g``, each gene's PCC taken across units (rows).

    A gene that is constant in ``pred`` or ``target`` contributes PCC 0 (loss 1), not NaN.
    """
    pred_c = pred - pred.mean(dim=0, keepdim=True)
    target_c = target - target.mean(dim=0, keepdim=True)
    cov = (pred_c * target_c).sum(dim=0)
    denom = (pred_c.pow(2).sum(dim=0) * target_c.pow(2).sum(dim=0)).clamp_min(eps * eps).sqrt()
    return 1.0 - (cov / denom).mean()


def paper_loss(pred: torch.Tensor, target: torch.Tensor, *, pcc_weight: float = 0.5) -> torch.Tensor:
    """PixNet's loss: ``MSE + pcc_weight · (1 − PCC)`` (SPEC.md §2.4).

    Parameters
    ----------
    pred, target
        ``(units, genes)`` aggregated predictions and normalised targets.
    pcc_weight
        λ; 0.5 in the paper.
    """
    mse = (pred - target).pow(2).mean()
    if pred.shape[0] < 2 or pcc_weight == 0:
        return mse
    return mse + pcc_weight * pearson_loss(pred, target)


def poisson_nll(mu: torch.Tensor, counts: torch.Tensor, *, eps: float = _EPS) -> torch.Tensor:
    """Mean Poisson negative log-likelihood ``μ − y·log μ + log y!`` over all entries."""
    import torch

    mu = mu.clamp_min(eps)
    return (mu - counts * torch.log(mu) + torch.lgamma(counts + 1)).mean()


def nb_nll(mu: torch.Tensor, counts: torch.Tensor, log_theta: torch.Tensor, *, eps: float = _EPS) -> torch.Tensor:
    """Mean negative-binomial negative log-likelihood over all entries.

    ``P(y) = Γ(y+θ) / (Γ(θ) y!) · (θ/(θ+μ))^θ · (μ/(θ+μ))^y``, Var = μ + μ²/θ.

    Parameters
    ----------
    mu
        ``(units, genes)`` expected counts (≥ 0).
    counts
        ``(units, genes)`` observed counts.
    log_theta
        ``(genes,)`` log inverse dispersion.
    """
    import torch

    mu = mu.clamp_min(eps)
    theta = log_theta.exp().clamp_min(eps)
    log_theta_mu = torch.log(theta + mu)
    ll = (
        torch.lgamma(counts + theta)
        - torch.lgamma(theta)
        - torch.lgamma(counts + 1)
        + theta * (torch.log(theta) - log_theta_mu)
        + counts * (torch.log(mu) - log_theta_mu)
    )
    return -ll.mean()
