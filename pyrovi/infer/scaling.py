"""ELBO scaling shared by every model: the minibatch plate and KL warm-up.

A model marks its cells with one plate, :func:`cell_plate` (a ``pyro.plate`` named
``"cells"``); the training loop runs model and guide under :class:`MinibatchScaling`, the
effect handler that knows the two numbers of the inference, not of the model:

- the dataset size: every site inside the cell plate is scaled by ``n_obs / n_cells``, so a
  minibatch gives an unbiased estimate of the full-data ELBO (the scaling of
  ``pyro.plate(name, n_obs, subsample=...)``);
- the KL warm-up weight: every latent (unobserved) site, in the model and in the guide, is
  scaled by ``kl_weight``, which weights the KL part of the ELBO; a weight of 0 masks them,
  since Pyro's scales must be positive. A model that warms up only some of its latent
  sites names them in its ``kl_warmup_sites`` attribute (scANVI: not its ``z``, as in
  scvi-tools).

So neither number appears in a model's signature, and a model file holds only its math.
Models written for pyrovi 0.2 and earlier, which took ``n_obs`` and ``kl_weight`` and passed
them to :func:`cell_plate` and :func:`kl_scale` themselves, keep working: the loop no longer
passes them, their defaults leave both contexts neutral, and the handler does the scaling.
"""

from __future__ import annotations

from pyro.poutine.messenger import Messenger

# The plate and the by-hand KL context live with the models that use them; they stay
# importable from here and from pyrovi.infer.
from pyrovi.modules.plates import CELL_PLATE, cell_plate, kl_scale

__all__ = ["CELL_PLATE", "MinibatchScaling", "cell_plate", "kl_scale"]


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
    warmup_sites
        The latent sites ``kl_weight`` applies to; ``None``: every latent site.

    Attributes
    ----------
    saw_cell_plate
        Whether a sample site inside the cell plate ran under the handler; the training loop
        checks it so that a model without the plate fails loudly instead of training on an
        unscaled ELBO.

    Examples
    --------
    >>> import torch, pyro, pyro.distributions as dist
    >>> from pyro import poutine
    >>> def model(x):
    ...     with cell_plate(x.shape[0]):
    ...         pyro.sample("x", dist.Normal(0.0, 1.0), obs=x)
    >>> with MinibatchScaling(n_obs=100):
    ...     trace = poutine.trace(model).get_trace(torch.zeros(4))
    >>> trace.nodes["x"]["scale"]
    25.0
    """

    def __init__(self, n_obs: int | None = None, kl_weight: float = 1.0,
                 plate_name: str = CELL_PLATE, warmup_sites=None):
        super().__init__()
        self.n_obs = n_obs
        self.kl_weight = kl_weight
        self.plate_name = plate_name
        self.warmup_sites = None if warmup_sites is None else frozenset(warmup_sites)
        self.saw_cell_plate = False

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if not msg["is_observed"] and (self.warmup_sites is None
                                       or msg["name"] in self.warmup_sites):
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
