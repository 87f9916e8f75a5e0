"""The ELBO objective and its per-cell terms, read off Pyro traces.

Gradients come from Pyro's own estimators (``Trace_ELBO``, ``TraceMeanField_ELBO``, and
``TraceEnum_ELBO`` for a pair that sums a discrete latent out by enumeration): their
traces, and for ``Trace_ELBO`` the same surrogate loss computed without reading values
back to the host. This module adds a per-cell breakdown (reconstruction, KL) for
monitoring and evaluation, taken from the same traces, so monitoring costs no extra model
evaluation; for enumerated traces each term is its expectation over the enumerated values.

A model/guide pair states the estimator it needs by two attributes, read by
:func:`make_elbo`: ``required_elbo = "enum"`` (its guide enumerates a discrete site, e.g.
``infer={"enumerate": "parallel"}``) and ``max_plate_nesting`` (default 1, the cell plate).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import pyro
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.infer.trace_elbo import _compute_log_r
from pyro.infer.traceenum_elbo import _compute_dice_elbo
from pyro.infer.util import is_identically_zero, is_validation_enabled
from pyro.poutine import Trace

from pyrovi.data.minified import needs_counts
from pyrovi.data.tensors import QZ_LOC_FIELD, call_arguments


class LazyPackingTraceEnum_ELBO(TraceEnum_ELBO):  # noqa: N801 - Pyro's naming
    """Pyro's ``TraceEnum_ELBO``, whose traces :func:`loss_and_terms` may take unpacked.

    ``TraceEnum_ELBO`` packs every site's tensors for its tensor contraction (about 1% of
    a scANVI training step on the CPU); :func:`guide_enumeration_surrogate_loss`, which
    serves a guide enumerating one site, reads the unpacked tensors and needs none of it.
    :meth:`unpacked_traces` hands out the traces before packing (Pyro's validation, when
    enabled, still runs in full); every method of ``TraceEnum_ELBO`` behaves as Pyro's.
    """

    _packing = True

    def _get_trace(self, model, guide, args, kwargs):
        if self._packing or is_validation_enabled():
            return super()._get_trace(model, guide, args, kwargs)
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def unpacked_traces(self, model, guide, args, kwargs) -> Iterator[tuple[Trace, Trace]]:
        """``_get_traces`` without packing; :func:`pack_traces` packs a pair where needed."""
        self._packing = False
        try:
            yield from self._get_traces(model, guide, args, kwargs)
        finally:
            self._packing = True


def pack_traces(model_trace: Trace, guide_trace: Trace) -> None:
    """Pack a pair of traces as ``TraceEnum_ELBO`` does, unless they are packed already."""
    if not hasattr(guide_trace, "plate_to_symbol"):
        guide_trace.pack_tensors()
        model_trace.pack_tensors(guide_trace.plate_to_symbol)


ELBO_CLASSES = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO,
                "enum": LazyPackingTraceEnum_ELBO}


def make_elbo(loss: str | ELBO = "trace", module=None) -> ELBO:
    """Build the ELBO estimator from a name, for ``module``, or pass an instance through.

    Parameters
    ----------
    loss
        ``"trace"`` (``Trace_ELBO``), ``"meanfield"`` (``TraceMeanField_ELBO``: analytic KL
        divergences where Pyro knows them), ``"enum"`` (``TraceEnum_ELBO``, as
        :class:`LazyPackingTraceEnum_ELBO`) or an ELBO instance, used as it is.
    module
        The model/guide pair. One that declares ``required_elbo = "enum"`` gets
        ``TraceEnum_ELBO`` for ``"trace"`` (the sum over its enumerated values is exact,
        where ``Trace_ELBO`` would sample them); ``max_plate_nesting`` (default 1) is
        read from it.

    Returns
    -------
    pyro.infer.ELBO

    Raises
    ------
    ValueError
        An unknown name, or ``"meanfield"`` for a pair that needs enumeration.
    """
    if isinstance(loss, ELBO):
        return loss
    if loss not in ELBO_CLASSES:
        raise ValueError(f"loss must be one of {sorted(ELBO_CLASSES)} or a pyro ELBO instance.")
    if getattr(module, "required_elbo", None) == "enum":
        if loss == "meanfield":
            raise ValueError(
                f"{type(module).__name__} sums a discrete latent out by enumeration, which "
                "TraceMeanField_ELBO does not do; train it with loss='trace' (it then gets "
                "TraceEnum_ELBO).")
        loss = "enum"
    return ELBO_CLASSES[loss](max_plate_nesting=getattr(module, "max_plate_nesting", 1))


class CellTerms(NamedTuple):
    """Per-cell ELBO terms (each of shape ``(n_cells,)``), unscaled and unweighted.

    ``reconstruction`` is ``-log p(x | latents)`` summed over observed sites, ``kl`` is
    ``log q(latents) - log p(latents)`` summed over latent sites (a one-sample estimate).
    The negative ELBO of a cell is their sum.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor

    @property
    def negative_elbo(self) -> torch.Tensor:
        """``reconstruction + kl`` per cell."""
        return self.reconstruction + self.kl


def _per_cell(log_prob: torch.Tensor, n_cells: int) -> torch.Tensor | None:
    return log_prob if log_prob.dim() >= 1 and log_prob.shape[-1] == n_cells else None


def enumerated_log_weights(guide_trace: Trace) -> torch.Tensor | None:
    """``log q`` of the values the guide enumerated (summed over its enumerated sites).

    ``None`` for a trace without enumeration. Its leading dimensions are the enumeration
    dimensions, the last the cells.
    """
    log_weights = None
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None:
            log_q = site["unscaled_log_prob"]
            log_weights = log_q if log_weights is None else log_weights + log_q
    return log_weights


class _Expectation:
    """A per-cell sum of terms, each averaged over the guide's enumerated values.

    The terms are summed before the one weighting (an expectation is linear). Values of
    zero probability are left out rather than multiplied by 0: their terms may be
    infinite (a labelled cell's ``log q`` of any other label).
    """

    def __init__(self, log_weights: torch.Tensor | None):
        self.log_weights = log_weights
        self.plain = 0.0  # the terms without an enumeration dimension
        self.enumerated = 0.0

    def add(self, term: torch.Tensor) -> None:
        if self.log_weights is None or term.dim() <= 1:
            self.plain = self.plain + term
        else:
            self.enumerated = self.enumerated + term

    def per_cell(self) -> torch.Tensor | float:
        """The sum of the expectations, shape ``(n_cells,)`` (``0.0`` without terms)."""
        if not torch.is_tensor(self.enumerated):
            return self.plain
        weighted = _weighted(self.enumerated, self.log_weights.exp())
        return self.plain + weighted.reshape(-1, weighted.shape[-1]).sum(0)


def _weighted(term: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights * term`` (broadcast), 0 where a weight is 0 even if the term is infinite."""
    term, weights = torch.broadcast_tensors(term, weights)
    return weights * term.masked_fill(weights == 0, 0.0)


def _model_enumerated_dims(model_trace: Trace, guide_trace: Trace) -> set[int]:
    """The enumeration dimensions of the sites the model enumerates (not in the guide)."""
    return {site["infer"]["_enumerate_dim"] for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and name not in guide_trace.nodes
            and site["infer"].get("_enumerate_dim") is not None}


class _Marginal:
    """The model's factors that involve a site it enumerates, summed out: ``log Σ exp``
    over those dimensions of their sum (for sites local to the cell plate, the exact
    marginal of each cell)."""

    def __init__(self, dims: set[int]):
        self.dims = dims
        self.total = 0.0
        self.has_observed = False

    def takes(self, term: torch.Tensor) -> bool:
        """Whether ``term`` varies along one of the dimensions."""
        return any(term.dim() >= -dim and term.shape[dim] > 1 for dim in self.dims)

    def add(self, term: torch.Tensor, observed: bool) -> None:
        self.total = self.total + term
        self.has_observed = self.has_observed or observed

    def log_density(self) -> torch.Tensor | None:
        """Per cell (the guide's enumeration dimensions kept), or ``None`` without terms."""
        if not torch.is_tensor(self.total):
            return None
        total = self.total
        for dim in self.dims:
            if total.dim() >= -dim:
                total = total.logsumexp(dim, keepdim=True)
        # The model allocates its dimensions left of the guide's: they lead, now of size 1.
        while total.dim() > 1 and total.shape[0] == 1:
            total = total.squeeze(0)
        return total


def cell_terms(model_trace: Trace, guide_trace: Trace, n_cells: int) -> CellTerms:
    """Per-cell reconstruction and KL from a model trace replayed against a guide trace.

    Both traces must have had their log-densities computed (Pyro's ELBOs do this; otherwise
    call ``trace.compute_log_prob()``). Only sites inside the cell plate contribute. Where
    the guide enumerated a discrete site (``TraceEnum_ELBO``), each term is its
    expectation under the guide's probabilities of the enumerated values, so the terms are
    exact in that site. Where the model enumerated one (a site it has and the guide has
    not, local to the cells), the factors that involve it are summed over its values: their
    marginal is part of the reconstruction when an observed site is among them, else of
    the KL (a prior such as a mixture's).
    """
    log_weights = enumerated_log_weights(guide_trace)
    log_likelihood = _Expectation(log_weights)
    kl = _Expectation(log_weights)
    marginal = _Marginal(_model_enumerated_dims(model_trace, guide_trace))
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or "unscaled_log_prob" not in site:
            continue
        log_p = _per_cell(site["unscaled_log_prob"], n_cells)
        if log_p is None:
            continue
        summed_out = marginal.takes(log_p)
        if summed_out:
            marginal.add(log_p, site["is_observed"])
        if site["is_observed"]:
            if not summed_out:
                log_likelihood.add(log_p)
        elif name in guide_trace.nodes:
            log_q = _per_cell(guide_trace.nodes[name]["unscaled_log_prob"], n_cells)
            kl.add(log_q if summed_out else log_q - log_p)
    summed = marginal.log_density()
    if summed is not None:
        if marginal.has_observed:
            log_likelihood.add(summed)
        else:
            kl.add(-summed)
    reconstruction = -log_likelihood.per_cell()
    kl = kl.per_cell()
    device = next(s["value"].device for s in model_trace.nodes.values() if s["type"] == "sample")

    def as_vector(term):
        return term.detach() if torch.is_tensor(term) else torch.zeros(n_cells, device=device)

    return CellTerms(as_vector(reconstruction), as_vector(kl))


def trace_elbo_surrogate_loss(model_trace: Trace, guide_trace: Trace) -> torch.Tensor:
    """``Trace_ELBO``'s differentiable surrogate loss of one particle, without host syncs.

    The same quantity as ``Trace_ELBO._differentiable_loss_particle(...)[1]``: minus the
    model's log-density, plus the guide's entropy terms, minus the score-function terms of
    guide sites that are not reparameterised. Pyro's method also returns the ELBO's value
    as a Python float, reading every site's log-density back from the device (``.item()``)
    at every step; on a GPU that stalls the loop, and training never uses that float.

    Parameters
    ----------
    model_trace, guide_trace
        Traces with their log-densities and score parts computed (as Pyro's
        ``Trace_ELBO._get_traces`` returns them).

    Returns
    -------
    torch.Tensor
        The surrogate loss, a differentiable scalar.
    """
    surrogate = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            surrogate = surrogate + site["log_prob_sum"]
    log_r = None
    for site in guide_trace.nodes.values():
        if site["type"] != "sample":
            continue
        _, score_function_term, entropy_term = site["score_parts"]
        if not is_identically_zero(entropy_term):
            surrogate = surrogate - entropy_term.sum()
        if not is_identically_zero(score_function_term):
            if log_r is None:
                log_r = _compute_log_r(model_trace, guide_trace)
            weight = log_r.sum_to(site["cond_indep_stack"])
            surrogate = surrogate + (weight * score_function_term).sum()
    return -surrogate


def counts_arguments(batch: dict, model, guide) -> dict:
    """:func:`~pyrovi.data.tensors.call_arguments` of a minibatch the ELBO scores, which
    must hold counts: minified data (a stored posterior in place of the counts) are refused,
    since the guide would read zeros and the model would score them."""
    if QZ_LOC_FIELD in batch:
        raise needs_counts("The ELBO (training, validation, get_elbo, "
                           "get_reconstruction_error)")
    return call_arguments(batch, model, guide)


def _summable_enumeration(model_trace: Trace, guide_trace: Trace) -> bool:
    """Whether the traces are of the kind :func:`guide_enumeration_surrogate_loss` serves:
    one site enumerated in parallel, in the guide, every other guide site reparameterised."""
    enumerated = 0
    for site in guide_trace.nodes.values():
        if site["type"] != "sample":
            continue
        if site["infer"].get("_enumerate_dim") is not None:
            enumerated += 1
            if site["infer"].get("enumerate") != "parallel":
                return False
        elif not is_identically_zero(site["score_parts"].score_function):
            return False
    return enumerated == 1 and not _model_enumerated_dims(model_trace, guide_trace)


def guide_enumeration_surrogate_loss(model_trace: Trace, guide_trace: Trace) -> torch.Tensor:
    """``TraceEnum_ELBO``'s loss where the guide enumerates one discrete site.

    For a guide that enumerates a single site y in parallel and reparameterises every
    other site, ``TraceEnum_ELBO`` computes, for each cost (a model site's log-density, a
    guide site's negative one), its sum over the enumerated values weighted by q(y), with
    the gradient through those weights. This is that sum written out, without the
    tensor packing and contraction Pyro needs for the general case (about a tenth of a
    scANVI training step). Values of probability 0 (a labelled cell's other labels) are
    left out, as Pyro's DiCE does, so their infinite costs never meet a zero weight.

    Parameters
    ----------
    model_trace, guide_trace
        Traces as ``TraceEnum_ELBO._get_traces`` returns them.

    Returns
    -------
    torch.Tensor
        The surrogate loss, a differentiable scalar.
    """
    weights = enumerated_log_weights(guide_trace).exp()
    elbo = 0.0  # the costs without an enumeration dimension: q(y) sums to 1
    enumerated = 0.0  # the others, summed before the one weighting by q(y)

    for site in model_trace.nodes.values():
        if site["type"] != "sample":
            continue
        if site["log_prob"].dim() < weights.dim():
            elbo = elbo + site["log_prob"].sum()
        else:
            enumerated = enumerated + site["log_prob"]
    for site in guide_trace.nodes.values():
        if site["type"] != "sample":
            continue
        is_enumerated = site["infer"].get("_enumerate_dim") is not None
        cost = site["log_prob"] if is_enumerated else site["score_parts"].entropy_term
        if is_identically_zero(cost):
            continue
        if cost.dim() < weights.dim():
            elbo = elbo - cost.sum()
        else:
            enumerated = enumerated - cost
    if torch.is_tensor(enumerated):
        elbo = elbo + _weighted(enumerated, weights).sum()
    return -elbo


def loss_and_terms(elbo: ELBO, model, guide, **kwargs) -> tuple[torch.Tensor, CellTerms]:
    """Differentiable ELBO loss of one call, plus its per-cell terms.

    Parameters
    ----------
    elbo
        A Pyro ELBO (``Trace_ELBO``, ``TraceMeanField_ELBO`` or ``TraceEnum_ELBO``).
    model, guide
        The model/guide pair, called with ``**kwargs``; ``kwargs["x"]`` fixes the cell count.

    Returns
    -------
    loss
        Pyro's surrogate loss (negative ELBO estimate), differentiable.
    terms
        :class:`CellTerms` from the same traces (averaged over particles).
    """
    n_cells = kwargs["x"].shape[0]
    kwargs = counts_arguments(kwargs, model, guide)
    loss = 0.0
    reconstruction = 0.0
    kl = 0.0
    traces = getattr(elbo, "unpacked_traces", elbo._get_traces)
    for model_trace, guide_trace in traces(model, guide, (), kwargs):
        if type(elbo) is Trace_ELBO:
            surrogate = trace_elbo_surrogate_loss(model_trace, guide_trace)
        elif isinstance(elbo, TraceEnum_ELBO):
            # The sum over enumerated values, weighted by their guide probabilities (DiCE).
            if _summable_enumeration(model_trace, guide_trace):
                surrogate = guide_enumeration_surrogate_loss(model_trace, guide_trace)
            else:
                pack_traces(model_trace, guide_trace)
                surrogate = -_compute_dice_elbo(model_trace, guide_trace)
        else:
            _, surrogate = elbo._differentiable_loss_particle(model_trace, guide_trace)
        with torch.no_grad():  # monitoring only: no graph for the terms
            terms = cell_terms(model_trace, guide_trace, n_cells)
        loss = loss + surrogate / elbo.num_particles
        reconstruction = reconstruction + terms.reconstruction / elbo.num_particles
        kl = kl + terms.kl / elbo.num_particles
    return loss, CellTerms(reconstruction, kl)


@contextmanager
def inference_mode(module):
    """Evaluate ``module`` deterministically: eval mode, no gradients, no Pyro validation."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            yield
    finally:
        module.train(was_training)


@torch.no_grad()
def evaluate_terms(model, guide, max_plate_nesting: int | None = None, **kwargs) -> CellTerms:
    """Per-cell terms of one posterior sample, without gradients (for evaluation).

    Parameters
    ----------
    model, guide
        The model/guide pair, called with ``**kwargs`` (a minibatch).
    max_plate_nesting
        For a pair that enumerates (``required_elbo = "enum"``): its plate nesting. Sites
        marked ``infer={"enumerate": "parallel"}`` are then enumerated as in training, the
        guide's from dimension ``-1 - max_plate_nesting`` and the model's to their left,
        so the terms are exact in them (see :func:`cell_terms`). ``None``: every site is
        sampled.

    Returns
    -------
    CellTerms
    """
    kwargs = counts_arguments(kwargs, model, guide)
    if max_plate_nesting is not None:
        guide = pyro.poutine.enum(guide, first_available_dim=-1 - max_plate_nesting)
        model = pyro.poutine.enum(model)  # continues allocating left of the guide's dims
    guide_trace = pyro.poutine.trace(guide).get_trace(**kwargs)
    model_trace = pyro.poutine.trace(pyro.poutine.replay(model, trace=guide_trace)).get_trace(
        **kwargs
    )
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    return cell_terms(model_trace, guide_trace, kwargs["x"].shape[0])


def enumeration_nesting(module) -> int | None:
    """The ``max_plate_nesting`` :func:`evaluate_terms` enumerates with for ``module``:
    its own (default 1) for a pair that declares ``required_elbo = "enum"``, else ``None``."""
    if getattr(module, "required_elbo", None) != "enum":
        return None
    return getattr(module, "max_plate_nesting", 1)
