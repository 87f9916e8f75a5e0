"""The Gaussian of the latent variables, with a log-density of fewer tensor operations."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


class Normal(dist.Normal):
    """Pyro's ``Normal``, its log-density evaluated in four tensor operations.

    ``log N(v; m, s) = -z²/2 - log s - log(2π)/2`` with ``z = (v - m) / s``: the same
    number as torch's formula (``-(v - m)² / (2 s²) - log s - ...``, nine operations), up
    to rounding. A training step evaluates it for every latent variable of every cell, in
    the guide and in the model; forward and backward, it takes half the time of torch's
    on the CPU for a minibatch's latent variables. Sampling, moments and KL divergences are
    Pyro's.

    Examples
    --------
    >>> Normal(torch.zeros(3), torch.ones(3)).log_prob(torch.zeros(3))
    tensor([-0.9189, -0.9189, -0.9189])
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        # log() returns a fresh tensor, which its backward does not read: updated in place.
        return torch.addcmul(self.scale.log().add_(_HALF_LOG_2PI).neg_(), z, z, value=-0.5)
