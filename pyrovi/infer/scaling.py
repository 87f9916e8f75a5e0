"""ELBO scaling shared by every model: the cell plate and KL warm-up.

Models call these two context managers instead of scaling anything themselves, so the
minibatch scaling is written once for the whole library.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pyro
from pyro import poutine


@contextmanager
def cell_plate(n_cells: int, n_obs: int | None = None, name: str = "cells"):
    """Plate over the cells of a minibatch, scaled to a dataset of ``n_obs`` cells.

    Inside the plate every log-density is multiplied by ``n_obs / n_cells``, so a minibatch
    gives an unbiased estimate of the full-data ELBO (the same scaling as
    ``pyro.plate(name, n_obs, subsample=...)``).

    Parameters
    ----------
    n_cells
        Cells in the minibatch.
    n_obs
        Cells in the dataset the ELBO refers to; ``None`` means the minibatch is the dataset.
    name
        Plate name.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model(x, n_obs=None):
    ...     with cell_plate(x.shape[0], n_obs):
    ...         pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
    """
    scale = 1.0 if n_obs is None else n_obs / n_cells
    with pyro.plate(name, n_cells), (poutine.scale(scale=scale) if scale != 1.0 else nullcontext()):
        yield


def kl_scale(kl_weight: float = 1.0):
    """Context that weights the latent sites' log-densities (model and guide) by ``kl_weight``.

    Wrapping the latent ``pyro.sample`` statements of both model and guide in this context
    multiplies their KL contribution to the ELBO by ``kl_weight`` (KL warm-up). A weight of
    0 masks the sites, since Pyro scales must be positive.
    """
    if kl_weight == 1.0:
        return nullcontext()
    if kl_weight == 0.0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=kl_weight)
