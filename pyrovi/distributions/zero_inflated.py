"""Zero-inflated negative binomial distribution."""

from __future__ import annotations

import torch
from pyro.distributions import ZeroInflatedDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from pyrovi._nonzero_positions import NonzeroPositions
from pyrovi.distributions._base import CountDistribution
from pyrovi.distributions.log_density import log_zinb_positive
from pyrovi.distributions.negative_binomial import NegativeBinomial


class ZeroInflatedNegativeBinomial(CountDistribution, ZeroInflatedDistribution):
    """Negative binomial with extra zeros, scVI's ZINB.

    ``x = 0`` with probability ``pi = sigmoid(zi_logits)`` (the dropout, or gate), and
    ``x ~ NegativeBinomial(mu, theta)`` otherwise. Note that ``mu`` is the mean of the
    negative binomial component, not of ``x``: ``E[x] = (1 - pi) * mu``.

    Parameters
    ----------
    mu
        Mean of the negative binomial component, ``mu >= 0``.
    theta
        Inverse dispersion of the negative binomial component, ``theta > 0``.
    zi_logits
        Logits of the probability of an extra zero.
    validate_args
        Check the parameters (and values passed to :meth:`log_prob`) against their
        constraints; ``None`` follows the global setting.
    method
        How :meth:`log_prob` evaluates the log-density (see
        :func:`~pyrovi.distributions.log_zinb_positive`; default ``"auto"``).
    nonzero
        The non-zero entries of the counts this distribution will score (a minibatch's
        ``x_nonzero``), used when :meth:`log_prob` gets that very tensor.

    Examples
    --------
    >>> import torch
    >>> d = ZeroInflatedNegativeBinomial(
    ...     mu=torch.tensor(4.0), theta=torch.tensor(2.0), zi_logits=torch.tensor(0.0)
    ... )
    >>> d.mean, d.zi_probs
    (tensor(2.), tensor(0.5000))
    """

    arg_constraints = {
        "mu": constraints.nonnegative,
        "theta": constraints.positive,
        "zi_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    _copied = ("method", "nonzero")

    def __init__(
        self,
        mu: torch.Tensor | float,
        theta: torch.Tensor | float,
        zi_logits: torch.Tensor | float,
        validate_args: bool | None = None,
        *,
        method: str = "auto",
        nonzero: NonzeroPositions | None = None,
    ) -> None:
        self.method, self.nonzero = method, nonzero
        mu, theta, zi_logits = broadcast_all(mu, theta, zi_logits)
        base_dist = NegativeBinomial(mu, theta, validate_args=validate_args)
        super().__init__(base_dist, gate_logits=zi_logits, validate_args=validate_args)

    @property
    def mu(self) -> torch.Tensor:
        """Mean of the negative binomial component."""
        return self.base_dist.mu

    @property
    def theta(self) -> torch.Tensor:
        """Inverse dispersion of the negative binomial component."""
        return self.base_dist.theta

    @property
    def zi_logits(self) -> torch.Tensor:
        """Logits of the probability of an extra zero."""
        return self.gate_logits

    @property
    def zi_probs(self) -> torch.Tensor:
        """Probability of an extra zero, ``sigmoid(zi_logits)``."""
        return torch.sigmoid(self.gate_logits)

    @property
    def mean(self) -> torch.Tensor:
        """The mean, ``(1 - pi) * mu``."""
        # sigmoid(-logits) rather than 1 - sigmoid(logits): exact for large logits.
        return torch.sigmoid(-self.gate_logits) * self.mu

    @property
    def variance(self) -> torch.Tensor:
        """The variance, ``(1 - pi) * (mu + mu**2 / theta) + pi * (1 - pi) * mu**2``."""
        # The law of total variance over the gate; the textbook E[x^2] - E[x]^2 cancels.
        keep = torch.sigmoid(-self.gate_logits)
        return keep * self.base_dist.variance + keep * (1.0 - keep) * self.mu.square()

    def _expand_into(self, new: ZeroInflatedNegativeBinomial, batch_shape: torch.Size) -> None:
        # Not ZeroInflatedDistribution.expand: it raises once the lazy ``gate`` has been
        # computed, because it then passes both ``gate`` and ``gate_logits``.
        ZeroInflatedDistribution.__init__(
            new,
            self.base_dist.expand(batch_shape),
            gate_logits=self.gate_logits.expand(batch_shape),
            validate_args=False,
        )

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-probability of the counts ``value``.

        ``log(pi + (1 - pi) * p_nb(0))`` at zero and ``log(1 - pi) + log p_nb(x)`` elsewhere,
        both computed from the logits (as ``logaddexp(logits, log p_nb(0)) - softplus(logits)``
        and ``log p_nb(x) - softplus(logits)``), with a hand-written gradient.

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
        # Always from the logits: the inherited log_prob switches to the less stable
        # probability form as soon as the lazy ``gate`` has been read.
        return log_zinb_positive(value, self.mu, self.theta, self.gate_logits,
                                 method=self.method, nonzero=self.nonzero)
