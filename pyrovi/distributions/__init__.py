"""Count distributions for single-cell likelihoods (``pyrovi.distributions``).

All three are parameterized by their (component) mean ``mu``, so a model can switch
between them by name:

- :class:`NegativeBinomial` ``(mu, theta)``: Gamma-Poisson with inverse dispersion
  ``theta``, variance ``mu + mu**2 / theta``.
- :class:`ZeroInflatedNegativeBinomial` ``(mu, theta, zi_logits)``: the same with extra
  zeros of probability ``sigmoid(zi_logits)``.
- :class:`Poisson` ``(mu)``.
- :class:`NegativeBinomialMixture` ``(mu1, mu2, theta1, mixture_logits, theta2=None)``: a
  two-component negative binomial mixture (totalVI's background/foreground likelihood),
  with weight ``sigmoid(mixture_logits)`` on component 1.

:class:`Normal` is Pyro's Gaussian with a cheaper log-density, for the latent variables.

:func:`nb_log_prob` and :func:`zinb_log_prob` are the reference log-densities (the
formulas of the papers, plain autograd); :func:`log_nb_positive` and
:func:`log_zinb_positive` give the same numbers, numerically stable in float32 and with
hand-written gradients, evaluated as their ``method=`` says (the distributions take the
same keyword). The non-zero positions of observed counts
(:class:`NonzeroPositions`, a minibatch's ``x_nonzero``) go to the distributions as
``nonzero=``.
"""

from pyrovi._nonzero_positions import NonzeroPositions
from pyrovi.distributions.log_density import (
    log_nb_positive,
    log_zinb_positive,
    nb_log_prob,
    zinb_log_prob,
)
from pyrovi.distributions.nb_mixture import NegativeBinomialMixture
from pyrovi.distributions.negative_binomial import NegativeBinomial
from pyrovi.distributions.normal import Normal
from pyrovi.distributions.poisson import Poisson
from pyrovi.distributions.zero_inflated import ZeroInflatedNegativeBinomial

__all__ = [
    "NegativeBinomial",
    "NegativeBinomialMixture",
    "NonzeroPositions",
    "Normal",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
    "log_nb_positive",
    "log_zinb_positive",
    "nb_log_prob",
    "zinb_log_prob",
]
