"""The one sampling core behind every posterior output, for any model/guide pair.

A *model/guide pair* is any object with ``model(**batch)`` and ``guide(**batch)`` methods
whose per-cell sample sites sit inside a plate over cells. It may declare

- ``observed_sites``: the names of its observed sites (default: every site the model
  conditions on data), and
- ``cell_plate``: the name of its plate over cells (default ``"cells"``, the name used by
  :func:`pyrovi.infer.cell_plate`).

``batch`` holds the keyword arguments of one minibatch: either what
:meth:`pyrovi.data.CellTensors.minibatch` gives (``x``, ``batch_index``, ...) or, for a
pair written outside pyrovi, rows of a plain ``{name: per-cell array}`` mapping.

Every function here walks the cells in minibatches (memory bounded by ``batch_size``
cells), draws from the amortized posterior with the guide, replays the model on the draw
(optionally with its observed sites sampled instead of conditioned — the posterior
predictive, as :class:`pyro.infer.Predictive` does with an unconditioned model) and hands
each draw to a callback. Nothing here knows which model it serves.

Minified data (:mod:`pyrovi.data.minified`) carry each cell's stored posterior of ``z``
instead of its counts. For them :func:`guide_trace` draws ``z`` from that stored
``Normal(qz_loc, sqrt(qz_var))`` instead of running the guide, so that every output built
on this loop reads the stored posterior with no case of its own; the model, replayed on
the draw, takes the stored library size as ``library_size``. What conditions the model on
the observed counts (log-likelihoods, importance weights) refuses such data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from tqdm.auto import tqdm

from pyrovi.data.indices import cell_positions
from pyrovi.data.minified import needs_counts
from pyrovi.data.tensors import (
    QZ_LOC_FIELD,
    QZ_VAR_FIELD,
    CellTensors,
    as_cell_data,
    call_arguments,
)
from pyrovi.infer.objective import cell_terms, inference_mode
from pyrovi.nn.encoder import identity

DEFAULT_CELL_PLATE = "cells"


class PosteriorDraw(NamedTuple):
    """One draw from the posterior for one minibatch of cells.

    Attributes
    ----------
    batch
        The keyword arguments the model and guide were called with.
    guide
        Trace of the guide (the amortized posterior draw).
    model
        Trace of the model replayed on that draw (``None`` unless requested); with
        ``predictive=True`` its observed sites hold posterior predictive samples.
    """

    batch: dict
    guide: poutine.Trace
    model: poutine.Trace | None


def stored_posterior_guide(qz_loc: torch.Tensor, qz_var: torch.Tensor,
                           plate: str = DEFAULT_CELL_PLATE) -> None:
    """The guide of minified data: ``z_n ~ Normal(qz_loc_n, sqrt(qz_var_n))``, as stored.

    Parameters
    ----------
    qz_loc, qz_var
        ``(n_cells, n_latent)`` stored posterior means and variances of ``z``.
    plate
        Name of the model's plate over cells.
    """
    with pyro.plate(plate, qz_loc.shape[0]):
        pyro.sample("z", dist.Normal(qz_loc, qz_var.sqrt()).to_event(1))


def guide_trace(module, batch: dict) -> poutine.Trace:
    """One draw from the amortized posterior, as a Pyro trace.

    For minified data (a minibatch with a stored posterior) the draw is from the stored
    posterior (:func:`stored_posterior_guide`) instead of the guide, whose input, the
    counts, is gone.
    """
    if QZ_LOC_FIELD in batch:
        plate = getattr(module, "cell_plate", DEFAULT_CELL_PLATE)
        return poutine.trace(stored_posterior_guide).get_trace(
            batch[QZ_LOC_FIELD], batch[QZ_VAR_FIELD], plate)
    return poutine.trace(module.guide).get_trace(**call_arguments(batch, module.guide))


def model_trace(module, batch: dict, posterior: poutine.Trace, predictive: bool = False):
    """The model replayed on a posterior draw.

    With ``predictive=True`` the observed sites are sampled (posterior predictive) instead
    of conditioned on the data.
    """
    batch = call_arguments(batch, module.model)
    model = poutine.replay(module.model, trace=posterior)
    if predictive:
        model = poutine.uncondition(model)
    return poutine.trace(model).get_trace(**batch)


def iterate_posterior(
    module,
    data,
    fn: Callable[[PosteriorDraw], dict],
    n_samples: int = 1,
    indices: Sequence[int] | None = None,
    batch_size: int = 1024,
    run_model: bool = False,
    predictive: bool = False,
    reduce: str | None = None,
    progress_bar: bool = False,
) -> dict:
    """Apply ``fn`` to ``n_samples`` posterior draws of every cell and collect the results.

    This is the loop every posterior output of pyrovi runs on: samples of sites, denoised
    expression, latent means, importance weights, differential-expression draws.

    Parameters
    ----------
    module
        The model/guide pair.
    data
        :class:`~pyrovi.data.CellTensors`, or a mapping ``{argument: per-cell array}``
        whose rows are passed to ``model`` and ``guide`` as keyword arguments.
    fn
        Called once per minibatch and draw; returns ``{key: tensor}`` (any hashable keys)
        with the cells of the minibatch on axis 0.
    n_samples
        Posterior draws per cell.
    indices
        Cells to use (positions in ``data``), default all.
    batch_size
        Cells per forward pass; memory is bounded by it (and ``n_samples`` unless
        ``reduce="mean"``).
    run_model
        Also replay the model on each draw (``draw.model``).
    predictive
        Sample the model's observed sites instead of conditioning on the data.
    reduce
        ``None`` keeps every draw; ``"mean"`` keeps a running mean over draws.
    progress_bar
        Show a tqdm bar over minibatches.

    Returns
    -------
    dict
        ``{name: tensor}`` of shape ``(n_samples, n_cells, ...)``, or ``(n_cells, ...)``
        with ``reduce="mean"``, on the module's device.

    Examples
    --------
    >>> z = iterate_posterior(module, data, lambda d: {"z": d.guide.nodes["z"]["value"]},
    ...                       n_samples=10)["z"]  # doctest: +SKIP
    """
    if reduce not in (None, "mean"):
        raise ValueError(f"reduce must be None or 'mean', got {reduce!r}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
    chunks: dict = {}
    data = as_cell_data(data)
    indices = cell_positions(indices, data.n_obs)
    n_cells = len(indices)
    with inference_mode(module):
        for _, batch in tqdm(data.iter_minibatches(indices, batch_size),
                             total=math.ceil(n_cells / batch_size),
                             disable=not progress_bar, desc="posterior"):
            if run_model and not predictive and QZ_LOC_FIELD in batch:
                raise needs_counts("Scoring the observed counts under the model "
                                   "(log-likelihood, ELBO, marginal likelihood)")
            draws: dict = {}
            for _ in range(n_samples):
                guide = guide_trace(module, batch)
                model = model_trace(module, batch, guide, predictive) if run_model else None
                for name, value in fn(PosteriorDraw(batch, guide, model)).items():
                    draws.setdefault(name, []).append(value)
            for name, values in draws.items():
                stacked = (torch.stack(values).mean(0) if reduce == "mean"
                           else torch.stack(values))
                chunks.setdefault(name, []).append(stacked)
    axis = 0 if reduce == "mean" else 1
    return {name: torch.cat(parts, dim=axis) for name, parts in chunks.items()}


def cell_axis(site: dict, cell_plate: str = DEFAULT_CELL_PLATE) -> int | None:
    """Axis of a trace site's value that indexes cells (``None``: the site is global)."""
    for frame in site["cond_indep_stack"]:
        if frame.name == cell_plate:
            event_dim = len(getattr(site["fn"], "event_shape", ()))
            return site["value"].dim() - event_dim + frame.dim
    return None


def observed_site_names(module, trace: poutine.Trace) -> tuple[str, ...]:
    """The pair's declared ``observed_sites``, else the sites its model conditions on data."""
    declared = getattr(module, "observed_sites", None)
    if declared:
        return tuple(declared)
    return tuple(
        name for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site_is_subsample(site)
        and (site["is_observed"] or site["infer"].get("was_observed", False))
    )


def posterior_samples(
    module,
    data,
    sites: Sequence[str] | None = None,
    n_samples: int = 1,
    indices: Sequence[int] | None = None,
    batch_size: int = 1024,
    columns: Mapping[str, Sequence[int]] | None = None,
    progress_bar: bool = False,
) -> dict[str, np.ndarray]:
    """Posterior draws of latent sites and posterior predictive draws of observed sites.

    The generic sampler of pyrovi, equivalent to :class:`pyro.infer.Predictive` with the
    guide as posterior and the observed sites unconditioned, but batched over cells so
    that memory stays bounded, and aware of which axis holds the cells.

    Parameters
    ----------
    module
        A model/guide pair (see the module docstring for what it may declare).
    data
        :class:`~pyrovi.data.CellTensors` or a mapping ``{argument: per-cell array}``.
    sites
        Sites to return: latent sites take the guide's draw, observed sites a draw from
        the model given it. Default: every latent site of the guide plus the observed
        sites.
    n_samples
        Draws per cell.
    indices
        Cells to use (positions in ``data``), default all.
    batch_size
        Cells per forward pass.
    columns
        ``{site: positions}`` to keep only some features of wide sites (the last axis).
    progress_bar
        Show a tqdm bar.

    Returns
    -------
    dict
        ``{site: array}`` with shape ``(n_samples, n_cells, ...)`` for sites in the cell
        plate. A site outside the plate (a global latent) is returned as drawn with the
        first minibatch, shape ``(n_samples, ...)``.

    Examples
    --------
    >>> draws = posterior_samples(model.module, data, sites=["z", "x"], n_samples=20)
    ... # doctest: +SKIP
    >>> draws["x"].shape  # (20, n_cells, n_genes)  # doctest: +SKIP
    """
    plate = getattr(module, "cell_plate", DEFAULT_CELL_PLATE)
    columns = {k: torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in
               (columns or {}).items()}
    global_sites: dict[str, list[torch.Tensor]] = {}
    wanted: list[str] = []

    def extract(draw: PosteriorDraw) -> dict[str, torch.Tensor]:
        if not wanted:
            latent = [n for n in draw.guide.stochastic_nodes
                      if not site_is_subsample(draw.guide.nodes[n])]
            wanted.extend(sites if sites is not None
                          else latent + list(observed_site_names(module, draw.model)))
        out = {}
        for name in wanted:
            site = draw.guide.nodes.get(name) or draw.model.nodes.get(name)
            if site is None or site["type"] != "sample" or site_is_subsample(site):
                raise KeyError(f"No sample site {name!r} in the model or guide.")
            value = site["value"]
            if name in columns:
                value = value.index_select(-1, columns[name].to(value.device))
            axis = cell_axis(site, plate)
            if axis is None:
                global_sites.setdefault(name, []).append(value)
                continue
            out[name] = value.movedim(axis, 0)
        return out

    draws = iterate_posterior(module, data, extract, n_samples, indices, batch_size,
                              run_model=True, predictive=True, progress_bar=progress_bar)
    result = {name: value.cpu().numpy() for name, value in draws.items()}
    for name, values in global_sites.items():
        result[name] = torch.stack(values[:n_samples]).cpu().numpy()
    return {name: result[name] for name in wanted}


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

    def mean(draw: PosteriorDraw) -> dict[str, torch.Tensor]:
        q = draw.guide.nodes[site]["fn"]
        if transform is None:
            return {site: q.mean}
        return {site: transform(q.sample((mc_samples_for_mean,))).mean(0)}

    def sample(draw: PosteriorDraw) -> dict[str, torch.Tensor]:
        value = draw.guide.nodes[site]["value"]
        return {site: value if transform is None else transform(value)}

    if give_mean:
        values = iterate_posterior(module, data, mean, 1, indices, batch_size, reduce="mean")
        return values[site].cpu().numpy()
    draws = iterate_posterior(module, data, sample, n_samples, indices, batch_size)[site]
    draws = draws.cpu().numpy()
    return draws[0] if n_samples == 1 else draws


def latent_posterior_parameters(
    module,
    data,
    indices: Sequence[int] | None = None,
    batch_size: int = 1024,
    site: str = "z",
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of each cell's posterior of ``site`` (before any transform).

    What minified data store (:mod:`pyrovi.data.minified`); the guide's distribution at
    ``site`` must have a mean and a variance (a Normal does).

    Parameters
    ----------
    module
        The model/guide pair.
    data, indices
        Cells to encode.
    batch_size
        Cells per forward pass.
    site
        Latent site of the guide.

    Returns
    -------
    tuple of numpy.ndarray
        ``(n_cells, n_latent)`` means and variances, float32.
    """

    def moments(draw: PosteriorDraw) -> dict[str, torch.Tensor]:
        q = draw.guide.nodes[site]["fn"]
        return {"loc": q.mean, "var": q.variance}

    values = iterate_posterior(module, data, moments, 1, indices, batch_size, reduce="mean")
    return values["loc"].cpu().numpy(), values["var"].cpu().numpy()


def posterior_predictive(
    module,
    data: CellTensors,
    indices=None,
    n_samples: int = 1,
    batch_size: int = 1024,
    site: str | Sequence[str] = "x",
    columns=None,
) -> np.ndarray:
    """Samples of the observed ``site``(s) from the posterior predictive distribution.

    Parameters
    ----------
    site
        Observed site, or several (e.g. ``("x", "y")`` for two modalities), whose values
        from the same draw are concatenated along the feature axis.
    columns
        Optional integer positions of features to keep, after concatenation (limits
        memory for wide data).

    Returns
    -------
    numpy.ndarray
        ``(n_samples, n_cells, n_features)``.
    """
    names = [site] if isinstance(site, str) else list(site)
    plate = getattr(module, "cell_plate", DEFAULT_CELL_PLATE)
    keep = None if columns is None else torch.as_tensor(np.asarray(columns, dtype=np.int64))

    def observed(draw: PosteriorDraw) -> dict[str, torch.Tensor]:
        nodes = [draw.model.nodes[s] for s in names]
        value = torch.cat([n["value"].movedim(cell_axis(n, plate), 0) for n in nodes], dim=-1)
        return {"counts": value if keep is None else value.index_select(-1, keep.to(value.device))}

    draws = iterate_posterior(module, data, observed, n_samples, indices, batch_size,
                              run_model=True, predictive=True)
    return draws["counts"].cpu().numpy()


def pointwise_log_likelihood(
    module,
    data,
    n_samples: int = 1,
    indices: Sequence[int] | None = None,
    batch_size: int = 1024,
    sites: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """``log p(x_n | latents)`` of every cell under posterior draws of its latents.

    One value per cell and draw for each observed site, summed over the site's features:
    the pointwise log-likelihood that ArviZ's ``loo``/``waic`` and ``compare`` read (cells
    are the observations).

    Parameters
    ----------
    module
        The model/guide pair.
    data
        :class:`~pyrovi.data.CellTensors`, :class:`~pyrovi.data.ArrayTensors` or a mapping
        ``{argument: per-cell array}``.
    n_samples
        Posterior draws per cell.
    indices
        Cells to use (positions in ``data``), default all.
    batch_size
        Cells per forward pass.
    sites
        Observed sites (default: the module's ``observed_sites`` or the sites its model
        conditions on data).

    Returns
    -------
    dict
        ``{site: array of shape (n_samples, n_cells)}``.
    """
    plate = getattr(module, "cell_plate", DEFAULT_CELL_PLATE)

    def log_likelihood(draw: PosteriorDraw) -> dict[str, torch.Tensor]:
        names = sites if sites is not None else observed_site_names(module, draw.model)
        out = {}
        for name in names:
            site = draw.model.nodes[name]
            log_prob = site["fn"].log_prob(site["value"])
            if site.get("mask") is not None:
                log_prob = torch.where(site["mask"], log_prob, torch.zeros_like(log_prob))
            # The cell axis has the same position in the log-density (batch dims only) as in
            # the value; other batch dims (a site without event dims) are summed.
            axis = cell_axis(site, plate)
            out[name] = log_prob.movedim(axis, 0).reshape(log_prob.shape[axis], -1).sum(-1)
        return out

    draws = iterate_posterior(module, data, log_likelihood, n_samples, indices, batch_size,
                              run_model=True)
    return {name: value.cpu().numpy() for name, value in draws.items()}


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

    def log_weight(draw: PosteriorDraw) -> dict[str, torch.Tensor]:
        draw.guide.compute_log_prob()
        draw.model.compute_log_prob()
        # log p(x, z) - log q(z | x) is the negative of the per-cell negative ELBO.
        terms = cell_terms(draw.model, draw.guide, draw.batch["x"].shape[0])
        return {"log_w": -terms.negative_elbo}

    log_w = iterate_posterior(module, data, log_weight, n_mc_samples, indices, batch_size,
                              run_model=True)["log_w"]
    return (torch.logsumexp(log_w, 0) - math.log(n_mc_samples)).cpu().numpy()
