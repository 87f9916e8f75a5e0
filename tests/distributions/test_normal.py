"""The latent variables' Gaussian: Pyro's Normal with a shorter log-density."""

from __future__ import annotations

import math

import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from pyrovi.distributions import Normal


def test_log_density_is_scipys_and_its_gradient_torchs():
    generator = torch.Generator().manual_seed(0)
    # An enumerated value (3, 1, ...) against parameters of the cells (5, 4), as in scANVI.
    loc = torch.randn(5, 4, generator=generator, dtype=torch.float64).requires_grad_()
    scale = (torch.rand(5, 4, generator=generator, dtype=torch.float64) * 3 + 0.01
             ).requires_grad_()
    value = torch.randn(3, 1, 4, generator=generator, dtype=torch.float64) * 4
    ours = Normal(loc, scale).log_prob(value)
    expected = stats.norm.logpdf(value.numpy(), loc.detach().numpy(), scale.detach().numpy())
    assert ours.shape == (3, 5, 4)
    torch.testing.assert_close(ours.detach(), torch.from_numpy(expected), rtol=1e-12,
                               atol=1e-12)
    grads = torch.autograd.grad(ours.sum(), [loc, scale])
    torchs = torch.autograd.grad(dist.Normal(loc, scale).log_prob(value).sum(), [loc, scale])
    for a, b in zip(grads, torchs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_behaves_as_pyros_normal_elsewhere():
    d = Normal(torch.zeros(2, 3), torch.ones(2, 3)).to_event(1)
    assert d.batch_shape == (2,) and d.event_shape == (3,)
    expanded = Normal(torch.tensor(0.0), torch.tensor(2.0)).expand([4, 3])
    assert isinstance(expanded, Normal) and expanded.batch_shape == (4, 3)
    kl = torch.distributions.kl_divergence(Normal(torch.tensor(1.0), torch.tensor(2.0)),
                                           Normal(torch.tensor(0.0), torch.tensor(1.0)))
    # KL(N(1, 2²) || N(0, 1)) = log(1/2) + (2² + 1²) / 2 - 1/2
    torch.testing.assert_close(kl, torch.tensor(2.0 - math.log(2.0)))
    with pytest.raises(ValueError):
        Normal(torch.zeros(3), torch.ones(3), validate_args=True).log_prob(
            torch.tensor([0.0, float("nan"), 0.0]))
