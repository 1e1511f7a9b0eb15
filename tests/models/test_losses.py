from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from stpredict.models._losses import nb_nll, paper_loss, pearson_loss, poisson_nll


def test_paper_loss_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
    mse = np.mean((pred - target) ** 2)
    pcc = np.mean([np.corrcoef(pred[:, g], target[:, g])[0, 1] for g in range(4)])
    got = paper_loss(torch.tensor(pred), torch.tensor(target))
    assert float(got) == pytest.approx(mse + 0.5 * (1 - pcc), rel=1e-9)
    assert float(paper_loss(torch.tensor(pred), torch.tensor(target), pcc_weight=0.0)) == pytest.approx(mse)


def test_pearson_loss_edges() -> None:
    x = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    assert float(pearson_loss(x, 2 * x + 1)) == pytest.approx(0.0, abs=1e-6)
    assert float(pearson_loss(x, -x)) == pytest.approx(2.0, abs=1e-6)
    const = torch.ones(3, 2)
    assert float(pearson_loss(const, x)) == pytest.approx(1.0)  # constant prediction: PCC 0, not NaN
    # a single unit: the PCC term is skipped, MSE only
    assert float(paper_loss(x[:1], x[:1] + 1)) == pytest.approx(1.0)


def test_poisson_nll_matches_scipy() -> None:
    mu = np.array([[0.5, 3.0], [10.0, 0.1]])
    y = np.array([[0.0, 4.0], [7.0, 1.0]])
    ref = -stats.poisson.logpmf(y, mu).mean()
    assert float(poisson_nll(torch.tensor(mu), torch.tensor(y))) == pytest.approx(ref, rel=1e-9)


def test_nb_nll_matches_scipy_and_gradients_flow() -> None:
    mu = np.array([[0.5, 3.0, 20.0], [10.0, 0.1, 2.0]])
    y = np.array([[0.0, 4.0, 25.0], [7.0, 1.0, 0.0]])
    theta = np.array([0.7, 5.0, 50.0])
    ref = -stats.nbinom.logpmf(y, theta, theta / (theta + mu)).mean()
    log_theta = torch.tensor(np.log(theta), requires_grad=True)
    mu_t = torch.tensor(mu, requires_grad=True)
    got = nb_nll(mu_t, torch.tensor(y), log_theta)
    assert float(got.detach()) == pytest.approx(ref, rel=1e-9)
    got.backward()
    assert torch.all(torch.isfinite(log_theta.grad))
    assert torch.any(log_theta.grad != 0)
    # d/dmu at mu = y is zero for the NB mean parameterisation
    mu_eq = torch.tensor([[4.0]], requires_grad=True)
    nb_nll(mu_eq, torch.tensor([[4.0]]), torch.tensor([0.3])).backward()
    assert float(mu_eq.grad) == pytest.approx(0.0, abs=1e-9)
