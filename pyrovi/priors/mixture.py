"""A learnable mixture-of-Gaussians latent prior."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyrovi.distributions import Normal

#: Floor on the component scales: a component that shrinks onto a single cell would make
#: the prior density, and so the ELBO, unbounded.
_MIN_SCALE = 1e-3


def gaussian_mixture(logits, loc, scale, n_cells: int) -> dist.MixtureSameFamily:
    """Mixture of diagonal Gaussians (components on the first axis of ``loc``/``scale``),
    the same for each of ``n_cells`` cells: batch shape ``(n_cells,)``, event shape
    ``loc.shape[-1:]``."""
    components = Normal(loc, scale).to_event(1)
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), components).expand([n_cells])


def _inverse_softplus(value: float) -> float:
    return math.log(math.expm1(value))


class MixtureOfGaussiansPrior(nn.Module):
    """p(z) = Σ_k w_k N(z; m_k, diag(s_k²)), with weights, means and scales all learned.

    A standard normal prior pulls every cell's posterior towards one blob; a mixture lets
    the aggregate posterior keep the clusters the data have, which lowers the KL term of
    clustered data (and gives a better ELBO) without a larger decoder.

    The parameters are module parameters, so they are trained with the rest of the model
    and saved in its ``state_dict``.

    Parameters
    ----------
    n_latent
        Latent dimension.
    n_components
        Number of mixture components.
    init_scale
        Initial standard deviation of every component.
    init_spread
        Standard deviation of the initial component means (drawn from N(0, init_spread²)
        with torch's global random state), so components start apart and do not learn the
        same thing.

    Examples
    --------
    >>> prior = MixtureOfGaussiansPrior(10, n_components=5)
    >>> p = prior(4)
    >>> p.batch_shape, p.event_shape
    (torch.Size([4]), torch.Size([10]))
    """

    def __init__(
        self,
        n_latent: int,
        n_components: int = 10,
        init_scale: float = 1.0,
        init_spread: float = 1.0,
    ):
        super().__init__()
        if n_components < 1:
            raise ValueError(f"n_components must be at least 1, got {n_components}.")
        if init_scale <= _MIN_SCALE:
            raise ValueError(f"init_scale must be above {_MIN_SCALE}, got {init_scale}.")
        self.n_latent = n_latent
        self.n_components = n_components
        self.logits = nn.Parameter(torch.zeros(n_components))
        self.means = nn.Parameter(init_spread * torch.randn(n_components, n_latent))
        # Softplus rather than exp: gradients stay bounded when a scale grows.
        self.raw_scales = nn.Parameter(
            torch.full((n_components, n_latent), _inverse_softplus(init_scale - _MIN_SCALE)))

    @property
    def weights(self) -> torch.Tensor:
        """Mixture weights, shape ``(n_components,)``."""
        return torch.softmax(self.logits, -1)

    @property
    def scales(self) -> torch.Tensor:
        """Component standard deviations, shape ``(n_components, n_latent)``."""
        return F.softplus(self.raw_scales) + _MIN_SCALE

    def forward(self, n_cells: int) -> dist.Distribution:
        """The prior over ``n_cells`` independent latent vectors.

        Parameters
        ----------
        n_cells
            Number of cells in the plate.

        Returns
        -------
        pyro.distributions.MixtureSameFamily
            Batch shape ``(n_cells,)``, event shape ``(n_latent,)``.
        """
        return gaussian_mixture(self.logits, self.means, self.scales, n_cells)

    def extra_repr(self) -> str:
        return f"n_latent={self.n_latent}, n_components={self.n_components}"
