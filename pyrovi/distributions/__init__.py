"""Count distributions for single-cell likelihoods (``pyrovi.distributions``).

All three are parameterized by their (component) mean ``mu``, so a model can switch
between them by name:

- :class:`NegativeBinomial` ``(mu, theta)``: Gamma-Poisson with inverse dispersion
  ``theta``, variance ``mu + mu**2 / theta``.
- :class:`ZeroInflatedNegativeBinomial` ``(mu, theta, zi_logits)``: the same with extra
  zeros of probability ``sigmoid(zi_logits)``.
- :class:`Poisson` ``(mu)``.
- :class:`NegativeBinomialMixture` ``(mu1, mu2, theta1, mixture_logits, theta2=None)``: a
  two-component negative binomial mixture, totalVI's protein background/foreground
  likelihood, with weight ``sigmoid(mixture_logits)`` on component 1.

:func:`log_nb_positive` and :func:`log_zinb_positive` are the numerically stable
log-densities they use, with hand-written gradients (about half the time of autograd on
a training minibatch; see ``benchmarks/RESULTS.md``).
"""

from pyrovi.distributions._nb_log_density import log_nb_positive, log_zinb_positive
from pyrovi.distributions.nb_mixture import NegativeBinomialMixture
from pyrovi.distributions.negative_binomial import NegativeBinomial
from pyrovi.distributions.poisson import Poisson
from pyrovi.distributions.zero_inflated import ZeroInflatedNegativeBinomial

__all__ = [
    "NegativeBinomial",
    "NegativeBinomialMixture",
    "Poisson",
    "ZeroInflatedNegativeBinomial",
    "log_nb_positive",
    "log_zinb_positive",
]
