"""What pyrovi's count distributions share: expansion, printing, gamma-Poisson draws."""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import Distribution, Gamma

from pyrovi.distributions._utils import repr_params


class CountDistribution(TorchDistribution):
    """Base of pyrovi's count distributions.

    :meth:`expand` broadcasts the tensors named in ``_expanded`` (instance attributes) and
    copies those named in ``_copied`` (settings such as the evaluation ``method`` and the
    ``nonzero`` positions of the observed counts); a subclass whose parameters live
    elsewhere overrides :meth:`_expand_into`. ``repr`` lists every parameter, including
    those exposed as properties.
    """

    _expanded: tuple[str, ...] = ()
    _copied: tuple[str, ...] = ()

    def expand(self, batch_shape: torch.Size, _instance=None) -> CountDistribution:
        """Broadcast the parameters to ``batch_shape`` without copying them.

        Parameters
        ----------
        batch_shape
            The new batch shape.
        _instance
            Used by subclasses (torch's ``expand`` protocol).

        Returns
        -------
        CountDistribution
            A distribution of the same class, of batch shape ``batch_shape``.
        """
        new = self._get_checked_instance(type(self), _instance)
        self._expand_into(new, torch.Size(batch_shape))
        for name in self._copied:
            setattr(new, name, getattr(self, name))
        new._validate_args = self._validate_args
        return new

    def _expand_into(self, new: CountDistribution, batch_shape: torch.Size) -> None:
        for name in self._expanded:
            setattr(new, name, getattr(self, name).expand(batch_shape))
        Distribution.__init__(new, batch_shape, validate_args=False)

    def __repr__(self) -> str:
        return repr_params(self)


def gamma_poisson_sample(mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Counts drawn from the negative binomial of mean ``mu``, inverse dispersion ``theta``.

    ``mu`` and ``theta`` have the shape of the draw. Sampling a unit-rate Gamma and scaling
    by ``mu / theta``, rather than using ``Gamma(theta, theta / mu)``, keeps ``mu = 0`` legal
    (an infinite rate) and gives a Poisson rate of exactly 0 there; it is also accurate for
    ``theta = 1e6``, where the unit-rate Gamma draw is ~1e6 +/- 1e3 and the ratio
    ~1 +/- 1e-3.
    """
    with torch.no_grad():
        unit_gamma = Gamma(theta, torch.ones_like(theta), validate_args=False).sample()
        return torch.poisson(unit_gamma * (mu / theta))
