"""Negative binomial distribution parameterized by mean and inverse dispersion."""

from __future__ import annotations

import torch
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from pyrovi._nonzero_positions import NonzeroPositions
from pyrovi.distributions._base import CountDistribution, gamma_poisson_sample
from pyrovi.distributions.log_density import log_nb_positive


class NegativeBinomial(CountDistribution):
    """Negative binomial of mean ``mu`` and inverse dispersion ``theta`` (scVI's NB).

    The Gamma-Poisson mixture ``x ~ Poisson(lambda)``, ``lambda ~ Gamma(theta, theta / mu)``,
    so that ``E[x] = mu`` and ``Var[x] = mu + mu**2 / theta``. It approaches the Poisson as
    ``theta -> inf``. In the ``total_count``/``probs`` parameterization of
    :class:`torch.distributions.NegativeBinomial` this is ``total_count = theta`` and
    ``probs = mu / (mu + theta)``.

    The log-probability is computed by :func:`~pyrovi.distributions.log_nb_positive`,
    which stays accurate in float32 for ``theta`` up to at least ``1e6`` and has a
    hand-written gradient.

    Parameters
    ----------
    mu
        Mean, ``mu >= 0``. ``mu = 0`` is the point mass at zero.
    theta
        Inverse dispersion, ``theta > 0``.
    validate_args
        Check the parameters (and values passed to :meth:`log_prob`) against their
        constraints; ``None`` follows the global setting.
    method
        How :meth:`log_prob` evaluates the log-density (see
        :func:`~pyrovi.distributions.log_nb_positive`; default ``"auto"``).
    nonzero
        The non-zero entries of the counts this distribution will score (a minibatch's
        ``x_nonzero``), used when :meth:`log_prob` gets that very tensor.

    Examples
    --------
    >>> import torch
    >>> d = NegativeBinomial(mu=torch.tensor([1.0, 10.0]), theta=torch.tensor(2.0))
    >>> d.variance
    tensor([ 1.5000, 60.0000])
    >>> d.log_prob(torch.tensor([0.0, 10.0])).shape
    torch.Size([2])
    """

    arg_constraints = {"mu": constraints.nonnegative, "theta": constraints.positive}
    support = constraints.nonnegative_integer
    has_rsample = False
    _expanded = ("mu", "theta")
    _copied = ("method", "nonzero")

    def __init__(
        self,
        mu: torch.Tensor | float,
        theta: torch.Tensor | float,
        validate_args: bool | None = None,
        *,
        method: str = "auto",
        nonzero: NonzeroPositions | None = None,
    ) -> None:
        self.mu, self.theta = broadcast_all(mu, theta)
        self.method, self.nonzero = method, nonzero
        super().__init__(self.mu.shape, validate_args=validate_args)

    @property
    def mean(self) -> torch.Tensor:
        """The mean, ``mu``."""
        return self.mu

    @property
    def variance(self) -> torch.Tensor:
        """The variance, ``mu + mu**2 / theta``."""
        return self.mu + self.mu.square() / self.theta

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Draw counts from the Gamma-Poisson mixture.

        Parameters
        ----------
        sample_shape
            Shape of the independent draws prepended to the batch shape.

        Returns
        -------
        torch.Tensor
            Counts (as floats, like :class:`torch.distributions.Poisson`) of shape
            ``sample_shape + batch_shape``.
        """
        shape = self._extended_shape(sample_shape)
        return gamma_poisson_sample(self.mu.expand(shape), self.theta.expand(shape))

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
        return log_nb_positive(value, self.mu, self.theta, method=self.method,
                               nonzero=self.nonzero)
