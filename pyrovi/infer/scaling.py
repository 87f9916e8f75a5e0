"""ELBO scaling shared by every model: the minibatch plate and KL warm-up.

A model marks its cells with one plate, :func:`cell_plate` (a ``pyro.plate`` named
``"cells"``); the training loop runs model and guide under :class:`MinibatchScaling`, the
effect handler that knows the two numbers of the inference, not of the model:

- the dataset size: every site inside the cell plate is scaled by ``n_obs / n_cells``, so a
  minibatch gives an unbiased estimate of the full-data ELBO (the scaling of
  ``pyro.plate(name, n_obs, subsample=...)``);
- the KL warm-up weight: every latent (unobserved) site, in the model and in the guide, is
  scaled by ``kl_weight``, which weights the KL part of the ELBO; a weight of 0 masks them,
  since Pyro's scales must be positive.

So neither number appears in a model's signature, and a model file holds only its math.
Models written for pyrovi 0.2 and earlier, which took ``n_obs`` and ``kl_weight`` and passed
them to :func:`cell_plate` and :func:`kl_scale` themselves, keep working: the loop no longer
passes them, their defaults leave both contexts neutral, and the handler does the scaling.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import pyro
from pyro import poutine
from pyro.poutine.messenger import Messenger

#: Name of the plate over the cells of a minibatch, unless a module sets ``cell_plate``.
CELL_PLATE = "cells"


@contextmanager
def cell_plate(n_cells: int, n_obs: int | None = None, name: str = CELL_PLATE):
    """Plate over the cells of a minibatch.

    Under :class:`MinibatchScaling` (as in training) the sites in it are scaled to the
    training set. Called by hand, ``n_obs`` does the same for a dataset of ``n_obs`` cells.

    Parameters
    ----------
    n_cells
        Cells in the minibatch.
    n_obs
        Cells in the dataset the ELBO refers to, for evaluating a model by hand; ``None``
        leaves the scaling to :class:`MinibatchScaling` (or none outside it).
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

    For evaluating a model by hand with a warm-up weight; training applies the weight through
    :class:`MinibatchScaling` instead. A weight of 0 masks the sites.
    """
    if kl_weight == 1.0:
        return nullcontext()
    if kl_weight == 0.0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=kl_weight)


class MinibatchScaling(Messenger):
    """Effect handler that scales a minibatch ELBO to the dataset and weights its KL part.

    Parameters
    ----------
    n_obs
        Cells in the dataset (the training set): sites inside the plate ``plate_name`` are
        scaled by ``n_obs`` over the plate's size. ``None``: no dataset scaling.
    kl_weight
        Weight of every latent (unobserved) site, in model and guide; 0 masks them.
    plate_name
        Name of the cell plate.

    Attributes
    ----------
    saw_cell_plate
        Whether a sample site inside the cell plate ran under the handler; the training loop
        checks it so that a model without the plate fails loudly instead of training on an
        unscaled ELBO.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> def model(x):
    ...     with cell_plate(x.shape[0]):
    ...         pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
    >>> with MinibatchScaling(n_obs=100):
    ...     trace = poutine.trace(model).get_trace(torch.zeros(4))
    >>> trace.nodes["x"]["scale"]
    25.0
    """

    def __init__(self, n_obs: int | None = None, kl_weight: float = 1.0,
                 plate_name: str = CELL_PLATE):
        super().__init__()
        self.n_obs = n_obs
        self.kl_weight = kl_weight
        self.plate_name = plate_name
        self.saw_cell_plate = False

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if not msg["is_observed"]:
            # Applied before the dataset scale, as the contexts it replaces nested.
            if self.kl_weight == 0.0:
                msg["mask"] = False if msg["mask"] is None else msg["mask"] & False
            elif self.kl_weight != 1.0:
                msg["scale"] = self.kl_weight * msg["scale"]
        for frame in msg["cond_indep_stack"]:
            if frame.name == self.plate_name:
                self.saw_cell_plate = True
                if self.n_obs is not None and self.n_obs != frame.size:
                    msg["scale"] = (self.n_obs / frame.size) * msg["scale"]
                break
