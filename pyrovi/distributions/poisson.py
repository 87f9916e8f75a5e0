"""Poisson distribution parameterized by its mean ``mu``."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyrovi.distributions._base import CountDistribution
from pyrovi.distributions._functional import log_poisson


class Poisson(CountDistribution, dist.Poisson):
    """Poisson of mean ``mu``: :class:`pyro.distributions.Poisson` with ``rate = mu``.

    It shares the ``mu=`` keyword with :class:`NegativeBinomial` and
    :class:`ZeroInflatedNegativeBinomial`, so the three are interchangeable as count
    likelihoods, and its log-probability has a finite gradient at ``x = mu = 0``.

    Parameters
    ----------
    mu
        Mean (rate), ``mu >= 0``.
    validate_args
        Check the parameter (and values passed to :meth:`log_prob`) against its
        constraint; ``None`` follows the global setting.

    Examples
    --------
    >>> import torch
    >>> Poisson(mu=torch.tensor([0.0, 2.0])).log_prob(torch.tensor([0.0, 2.0]))
    tensor([ 0.0000, -1.3069])
    """

    arg_constraints = {"mu": constraints.nonnegative}

    def __init__(self, mu: torch.Tensor | float, validate_args: bool | None = None) -> None:
        super().__init__(mu, validate_args=validate_args)

    @property
    def mu(self) -> torch.Tensor:
        """The mean, an alias of ``rate``."""
        return self.rate

    def _expand_into(self, new: Poisson, batch_shape: torch.Size) -> None:
        dist.Poisson.expand(self, batch_shape, _instance=new)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-probability of the counts ``value``.

        Parameters
        ----------
        value
            Non-negative integer counts, broadcastable to the batch shape.

        Returns
        -------
        torch.Tensor
            Elementwise log-probabilities.
        """
        if self._validate_args:
            self._validate_sample(value)
        return log_poisson(value, self.rate)
