"""Posterior computations shared by every model/guide pair.

A module qualifies when it has ``model(**batch)`` and ``guide(**batch)`` taking the keyword
arguments of :meth:`pyrovi.data.CellTensors.minibatch`, with per-cell sites inside a
``cells`` plate. Nothing here knows which model it serves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from pyro import poutine

from pyrovi.data.tensors import CellTensors
from pyrovi.infer.objective import inference_mode
from pyrovi.nn.encoder import identity


def guide_trace(module, batch: dict) -> poutine.Trace:
    """One draw from the amortized posterior, as a Pyro trace."""
    return poutine.trace(module.guide).get_trace(**batch)


def model_trace(module, batch: dict, posterior: poutine.Trace, predictive: bool = False):
    """The model replayed on a posterior draw.

    With ``predictive=True`` the observed sites are sampled (posterior predictive) instead
    of conditioned on the data.
    """
    model = poutine.replay(module.model, trace=posterior)
    if predictive:
        model = poutine.uncondition(model)
    return poutine.trace(model).get_trace(**batch)


def _as_numpy(chunks: list[torch.Tensor], axis: int) -> np.ndarray:
    return torch.cat(chunks, dim=axis).cpu().numpy()


def latent_representation(
    module,
    data: CellTensors,
    indices=None,
    give_mean: bool = True,
    n_samples: int = 1,
    batch_size: int = 1024,
    site: str = "z",
    mc_samples_for_mean: int = 5000,
) -> np.ndarray:
    """Posterior of the latent ``site``, passed through ``module.z_transform`` if present.

    Parameters
    ----------
    module
        The model/guide module.
    data, indices
        Cells to encode.
    give_mean
        Return the posterior mean (exact for a Gaussian latent; a Monte Carlo average of
        ``mc_samples_for_mean`` draws when a non-linear transform such as the logistic normal
        is applied).
    n_samples
        With ``give_mean=False``: number of posterior draws.
    batch_size
        Cells per forward pass.
    site
        Name of the latent site in the guide.

    Returns
    -------
    numpy.ndarray
        ``(n_cells, n_latent)``, or ``(n_samples, n_cells, n_latent)`` for several draws.
    """
    transform = getattr(module, "z_transform", None)
    if transform is identity:
        transform = None
    chunks = []
    with inference_mode(module):
        for _, batch in data.iter_minibatches(indices, batch_size):
            fn = guide_trace(module, batch).nodes[site]["fn"]
            if give_mean:
                chunks.append(
                    fn.mean if transform is None
                    else transform(fn.sample((mc_samples_for_mean,))).mean(0)
                )
            else:
                draws = fn.sample((n_samples,))
                chunks.append(draws if transform is None else transform(draws))
    if give_mean:
        return _as_numpy(chunks, axis=0)
    draws = _as_numpy(chunks, axis=1)
    return draws[0] if n_samples == 1 else draws


def posterior_predictive(
    module,
    data: CellTensors,
    indices=None,
    n_samples: int = 1,
    batch_size: int = 1024,
    site: str | Sequence[str] = "x",
    columns=None,
) -> np.ndarray:
    """Samples of the observed ``site`` from the posterior predictive distribution.

    Parameters
    ----------
    site
        Observed site, or several (e.g. ``("x", "y")`` for RNA and protein), whose values
        from the same draw are concatenated along the feature axis.
    columns
        Optional integer positions of features to keep (limits memory for wide data).

    Returns
    -------
    numpy.ndarray
        ``(n_samples, n_cells, n_features)``.
    """
    chunks = []
    with inference_mode(module):
        for _, batch in data.iter_minibatches(indices, batch_size):
            draws = []
            for _ in range(n_samples):
                trace = model_trace(module, batch, guide_trace(module, batch), predictive=True)
                sites = [site] if isinstance(site, str) else list(site)
                value = torch.cat([trace.nodes[s]["value"] for s in sites], dim=-1)
                draws.append(value if columns is None else value[..., columns])
            chunks.append(torch.stack(draws))
    return _as_numpy(chunks, axis=1)


def marginal_log_likelihood(
    module,
    data: CellTensors,
    indices=None,
    n_mc_samples: int = 100,
    batch_size: int = 1024,
) -> np.ndarray:
    """Importance-sampling estimate of log p(x) per cell, with the guide as proposal.

    ``log p(x) ≈ logsumexp_k [log p(x, z_k) − log q(z_k | x)] − log K``.

    Returns
    -------
    numpy.ndarray
        One value per cell.
    """
    out = []
    with inference_mode(module):
        for _, batch in data.iter_minibatches(indices, batch_size):
            n_cells = batch["x"].shape[0]
            log_weights = []
            for _ in range(n_mc_samples):
                posterior = guide_trace(module, batch)
                joint = model_trace(module, batch, posterior)
                posterior.compute_log_prob()
                joint.compute_log_prob()
                log_w = torch.zeros(n_cells, device=data.device)
                for trace, sign in ((joint, 1.0), (posterior, -1.0)):
                    for node in trace.nodes.values():
                        if node["type"] == "sample" and node["unscaled_log_prob"].dim() >= 1:
                            log_w = log_w + sign * node["unscaled_log_prob"]
                log_weights.append(log_w)
            stacked = torch.stack(log_weights)
            out.append(torch.logsumexp(stacked, 0) - math.log(n_mc_samples))
    return torch.cat(out).cpu().numpy()
