"""The math of scVI's module: the mean kept where every log-density is finite."""

from __future__ import annotations

import torch

from pyrovi.modules.scvi import MEAN_RANGE, keep_in_range


def test_keep_in_range_clamps_values_and_passes_gradients_through():
    x = torch.tensor([0.0, 1e-30, 3.0, 1e20], requires_grad=True)
    y = keep_in_range(x, *MEAN_RANGE)
    torch.testing.assert_close(y.detach(), torch.tensor([1e-20, 1e-20, 3.0, 1e15]))
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    # In range: the identity's gradient, exactly; out of range: the bound's, not zero.
    torch.testing.assert_close(x.grad, torch.tensor([1.0, 2.0, 3.0, 4.0]))


def test_keep_in_range_is_the_identity_inside_the_range():
    x = torch.rand(50, 7, dtype=torch.float64) * 100 + 1e-3
    x.requires_grad_()
    weights = torch.randn(50, 7, dtype=torch.float64)
    (keep_in_range(x, *MEAN_RANGE) * weights).sum().backward()
    assert torch.equal(keep_in_range(x, *MEAN_RANGE), x)
    assert torch.equal(x.grad, weights)
