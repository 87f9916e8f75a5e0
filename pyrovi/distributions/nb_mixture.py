"""Two-component negative binomial mixture (totalVI's protein likelihood)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from pyrovi.distributions._base import CountDistribution, gamma_poisson_sample
from pyrovi.distributions.log_density import log_nb_positive


class NegativeBinomialMixture(CountDistribution):
    r"""Mixture of two negative binomials, totalVI's background/foreground protein model.

    With ``w = sigmoid(mixture_logits)``,

    ``p(x) = w * NB(x; mu1, theta1) + (1 - w) * NB(x; mu2, theta2)``,

    where ``NB(x; mu, theta)`` is the negative binomial of mean ``mu`` and inverse
    dispersion ``theta`` (see :class:`~pyrovi.distributions.NegativeBinomial`). In totalVI
    component 1 is a protein's background (ambient) signal and component 2 its foreground,
    ``mu2 = mu1 * (1 + scale)``; this is the convention of scvi-tools'
    ``NegativeBinomialMixture`` (``mixture_logits`` are the logits of the weight of
    component 1).

    The moments are

    ``E[x] = w * mu1 + (1 - w) * mu2``,

    ``Var[x] = w * v1 + (1 - w) * v2 + w * (1 - w) * (mu1 - mu2)**2``,

    with ``v_i = mu_i + mu_i**2 / theta_i`` (the law of total variance over the component).

    The log-probability never forms ``w`` or ``1 - w``: it is

    ``log p(x) = logaddexp(log NB1(x) - softplus(-l), log NB2(x) - softplus(l))``,

    with ``l = mixture_logits`` and both component log-densities from
    :func:`~pyrovi.distributions.log_nb_positive`, so it is exact for any logits (even
    ``+-inf``, where it reduces to a single negative binomial) and keeps that function's
    float32 accuracy for large ``theta``.

    Parameters
    ----------
    mu1
        Mean of component 1 (totalVI's background), ``mu1 > 0``.
    mu2
        Mean of component 2 (totalVI's foreground), ``mu2 > 0``.
    theta1
        Inverse dispersion of component 1, ``theta1 > 0``.
    mixture_logits
        Logits of the weight ``w`` of component 1.
    theta2
        Inverse dispersion of component 2, ``theta2 > 0``; defaults to ``theta1`` (as in
        totalVI, where both components share one dispersion per protein).
    validate_args
        Check the parameters (and values passed to :meth:`log_prob` and
        :meth:`component_posterior`) against their constraints; ``None`` follows the
        global setting.

    Examples
    --------
    >>> import torch
    >>> d = NegativeBinomialMixture(
    ...     mu1=torch.tensor(2.0), mu2=torch.tensor(50.0),
    ...     theta1=torch.tensor(10.0), mixture_logits=torch.tensor(0.0),
    ... )
    >>> d.mean
    tensor(26.)
    >>> d.variance
    tensor(727.2000)
    >>> d.component_posterior(torch.tensor([1.0, 10.0, 20.0]))  # P(background | x)
    tensor([1.0000e+00, 5.0000e-01, 1.0240e-07])
    """

    arg_constraints = {
        "mu1": constraints.positive,
        "mu2": constraints.positive,
        "theta1": constraints.positive,
        "theta2": constraints.positive,
        "mixture_logits": constraints.real,
    }
    support = constraints.nonnegative_integer
    has_rsample = False
    _expanded = ("mu1", "mu2", "theta1", "theta2", "mixture_logits")

    def __init__(
        self,
        mu1: torch.Tensor | float,
        mu2: torch.Tensor | float,
        theta1: torch.Tensor | float,
        mixture_logits: torch.Tensor | float,
        theta2: torch.Tensor | float | None = None,
        validate_args: bool | None = None,
    ) -> None:
        if theta2 is None:
            self.mu1, self.mu2, self.theta1, self.mixture_logits = broadcast_all(
                mu1, mu2, theta1, mixture_logits
            )
            self.theta2 = self.theta1
        else:
            self.mu1, self.mu2, self.theta1, self.mixture_logits, self.theta2 = broadcast_all(
                mu1, mu2, theta1, mixture_logits, theta2
            )
        super().__init__(self.mu1.shape, validate_args=validate_args)

    @property
    def mixture_probs(self) -> torch.Tensor:
        """Weight of component 1, ``w = sigmoid(mixture_logits)``."""
        return torch.sigmoid(self.mixture_logits)

    @property
    def mean(self) -> torch.Tensor:
        """The mean, ``w * mu1 + (1 - w) * mu2``."""
        # sigmoid(-l) rather than 1 - sigmoid(l): exact for large logits.
        return self.mixture_probs * self.mu1 + torch.sigmoid(-self.mixture_logits) * self.mu2

    @property
    def variance(self) -> torch.Tensor:
        """The variance, ``w * v1 + (1 - w) * v2 + w * (1 - w) * (mu1 - mu2)**2``."""
        w1 = self.mixture_probs
        w2 = torch.sigmoid(-self.mixture_logits)
        v1 = self.mu1 + self.mu1.square() / self.theta1
        v2 = self.mu2 + self.mu2.square() / self.theta2
        return w1 * v1 + w2 * v2 + w1 * w2 * (self.mu1 - self.mu2).square()

    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Draw counts: a component with probabilities ``(w, 1 - w)``, then its NB.

        Parameters
        ----------
        sample_shape
            Shape of the independent draws prepended to the batch shape.

        Returns
        -------
        torch.Tensor
            Counts (as floats) of shape ``sample_shape + batch_shape``.
        """
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            first = torch.bernoulli(self.mixture_probs.expand(shape)).bool()
            mu = torch.where(first, self.mu1, self.mu2)
            theta = torch.where(first, self.theta1, self.theta2)
            return gamma_poisson_sample(mu, theta)

    def _component_log_probs(self, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``log NB1(value)`` and ``log NB2(value)``, after validating ``value``."""
        if self._validate_args:
            self._validate_sample(value)
        log_nb1 = log_nb_positive(value, self.mu1, self.theta1)
        log_nb2 = log_nb_positive(value, self.mu2, self.theta2)
        return log_nb1, log_nb2

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-probability of the counts ``value``.

        ``logaddexp(log NB1(x) - softplus(-l), log NB2(x) - softplus(l))``, where
        ``-softplus(-l) = log w`` and ``-softplus(l) = log(1 - w)``.

        Parameters
        ----------
        value
            Non-negative integer counts, broadcastable to the batch shape.

        Returns
        -------
        torch.Tensor
            Elementwise log-probabilities.
        """
        log_nb1, log_nb2 = self._component_log_probs(value)
        logits = self.mixture_logits
        return torch.logaddexp(log_nb1 - F.softplus(-logits), log_nb2 - F.softplus(logits))

    def component_posterior(self, value: torch.Tensor) -> torch.Tensor:
        """Posterior probability of component 1 (the background) given the counts.

        By Bayes' rule

        ``P(1 | x) = w NB1(x) / (w NB1(x) + (1 - w) NB2(x))
        = sigmoid(l + log NB1(x) - log NB2(x))``,

        which is how it is computed (no ratio of small probabilities). ``value`` must have
        positive probability under at least one component.

        Parameters
        ----------
        value
            Non-negative integer counts, broadcastable to the batch shape.

        Returns
        -------
        torch.Tensor
            ``P(component 1 | x)``, elementwise, in ``[0, 1]``.
        """
        log_nb1, log_nb2 = self._component_log_probs(value)
        return torch.sigmoid(self.mixture_logits + (log_nb1 - log_nb2))
