"""The standard normal latent prior."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from pyrovi.distributions import Normal


class NormalPrior(nn.Module):
    """p(z) = N(0, I), the default latent prior of scVI-class models.

    Every prior is an ``nn.Module`` called with the number of cells in the plate and
    returning a distribution with batch shape ``(n_cells,)`` and event shape ``(n_latent,)``;
    learnable priors keep their parameters as module parameters.

    Parameters
    ----------
    n_latent
        Latent dimension.

    Examples
    --------
    >>> NormalPrior(10)(4).batch_shape, NormalPrior(10)(4).event_shape
    (torch.Size([4]), torch.Size([10]))
    """

    def __init__(self, n_latent: int):
        super().__init__()
        self.n_latent = n_latent
        # Buffers, not constants, so the prior follows the module to its device.
        self.register_buffer("loc", torch.zeros(n_latent))
        self.register_buffer("scale", torch.ones(n_latent))

    def forward(self, n_cells: int) -> dist.Distribution:
        """The prior over ``n_cells`` independent latent vectors."""
        return Normal(self.loc, self.scale).expand([n_cells, self.n_latent]).to_event(1)
