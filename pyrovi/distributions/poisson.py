"""Poisson distribution parameterized by its mean ``mu``."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions import constraints

from pyrovi.distributions._functional import log_poisson
from pyrovi.distributions._utils import repr_params


class Poisson(dist.Poisson):
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

    def __repr__(self) -> str:
        return repr_params(self)

    def expand(self, batch_shape: torch.Size, _instance=None) -> Poisson:
        """Broadcast the parameter to ``batch_shape`` without copying it.

        Parameters
        ----------
        batch_shape
            The new batch shape.
        _instance
            Used by subclasses (torch's ``expand`` protocol).

        Returns
        -------
        Poisson
            A distribution of batch shape ``batch_shape``.
        """
        new = self._get_checked_instance(Poisson, _instance)
        return super().expand(batch_shape, _instance=new)

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
