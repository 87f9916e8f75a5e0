"""The plate a model marks its cells with, and the KL weight for evaluating a model by hand.

A model puts every per-cell site inside :func:`cell_plate` (a ``pyro.plate`` named
``"cells"``); the training loop scales the sites of that plate to the dataset and weights
the latent ones by the KL warm-up with :class:`~pyrovi.infer.scaling.MinibatchScaling`, so
neither number appears in a model's signature. This file is below the inference layer so
that the model/guide pairs of :mod:`pyrovi.modules` can use the plate without importing
the training loop; :mod:`pyrovi.infer` re-exports both names.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pyro
from pyro import poutine

#: Name of the plate over the cells of a minibatch, unless a module sets ``cell_plate``.
CELL_PLATE = "cells"


@contextmanager
def cell_plate(n_cells: int, n_obs: int | None = None, name: str = CELL_PLATE):
    """Plate over the cells of a minibatch.

    Under :class:`~pyrovi.infer.scaling.MinibatchScaling` (as in training) the sites in it
    are scaled to the training set. Called by hand, ``n_obs`` does the same for a dataset of
    ``n_obs`` cells.

    Parameters
    ----------
    n_cells
        Cells in the minibatch.
    n_obs
        Cells in the dataset the ELBO refers to, for evaluating a model by hand; ``None``
        leaves the scaling to :class:`~pyrovi.infer.scaling.MinibatchScaling` (or none
        outside it).
    name
        Plate name.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> def model(x):
    ...     with cell_plate(x.shape[0]):
    ...         pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
    """
    scale = 1.0 if n_obs is None else n_obs / n_cells
    with pyro.plate(name, n_cells), (poutine.scale(scale=scale) if scale != 1.0 else nullcontext()):
        yield


def kl_scale(kl_weight: float = 1.0):
    """Context that weights the latent sites' log-densities (model and guide) by ``kl_weight``.

    For evaluating a model by hand with a warm-up weight; training applies the weight
    through :class:`~pyrovi.infer.scaling.MinibatchScaling` instead. A weight of 0 masks
    the sites.
    """
    if kl_weight == 1.0:
        return nullcontext()
    if kl_weight == 0.0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=kl_weight)
