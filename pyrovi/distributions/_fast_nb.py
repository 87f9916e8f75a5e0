"""The fast evaluations of the NB and ZINB log-densities, with a hand-written backward pass.

:mod:`pyrovi.distributions.log_density` holds the definition (:func:`nb_log_prob`,
:func:`zinb_log_prob`, plain autograd); this module computes the same numbers faster, and
accurately in float32 where ``theta`` is large. Written with autograd, the ZINB
log-density of a minibatch and its gradient take about twenty elementwise passes over the
``(cells, genes)`` matrix forward and as many backward, each allocating its own result; on
CPU that was half of a training step (``benchmarks/RESULTS.md``). Here the forward pass
computes the value together with the elementwise derivatives ``d log p / d mu``,
``d log p / d theta`` and ``d log p / d zi_logits`` from shared intermediates, and the
backward pass is one multiplication per parameter (for a per-gene parameter under the
per-cell gradient of a sum over genes, a matrix-vector product).

The caller chooses the evaluation with ``method`` (:data:`METHODS`; ``"auto"`` is
``"tables"`` or ``"dense-tables"`` on the CPU, by the share of non-zero counts, and
``"dense"`` elsewhere, :func:`default_method`):

- ``"dense"``: the terms that vanish at ``x = 0`` (lgamma, digamma) at every entry, with
  ``where`` choosing Stirling's series where ``theta`` is large: no index search, so the
  host never waits for an accelerator.
- ``"gather"``: those terms only at the non-zero counts, gathered by index (at the
  positions the loader recorded, :class:`~pyrovi._nonzero_positions.NonzeroPositions`,
  when given), Stirling's series selected by index.
- ``"tables"``: as ``"gather"``, and where ``theta`` is one value per gene, integer counts
  below ``_TABLE_COUNTS`` (most of them in single-cell data) read their lgamma and
  digamma differences from per-gene tables (:func:`rising_factorial_tables`: sums of
  terms, exact for every theta), so that lgamma and digamma run only at the few larger
  counts.
- ``"dense-tables"``: where ``theta`` is one value per gene, every entry reads the
  per-gene tables (:mod:`pyrovi.distributions._count_tables`), with nothing gathered or
  scattered: faster than ``"tables"`` when most counts are non-zero. Where it does not
  apply (a mean of exactly 0, non-integer counts, ``theta`` not per gene) it is
  ``"tables"``.

Every entry gets the log-probability of a zero count, ``log p0 = -theta * log1p(mu / theta)``.
Functions of ``theta`` alone are computed once per gene. Derivatives (with
``r = mu / theta``)::

    d log p0 / d mu    = -1 / (1 + r)
    d log p0 / d theta = r / (1 + r) - log1p(r)
    d E / d mu         = x theta / (mu (theta + mu))          (E = log p - log p0)
    d E / d theta      = psi(x + theta) - psi(theta) - x / (theta + mu)

and for large ``theta`` the derivative of the Stirling form of ``E`` (the digamma
difference cancels catastrophically there). For the ZINB with gate logits ``l``,
``log p = -softplus(l) + (logaddexp(l, log p0) if x = 0 else log p0 + E)``, so with
``w = sigmoid(log p0 - l)`` at zeros (the share of a zero explained by the negative
binomial) and ``w = 1`` elsewhere: ``d/d l = 1 - w - sigmoid(l)`` and the negative
binomial's derivatives are weighted by ``w``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributions.utils import broadcast_all

from pyrovi._nonzero_positions import NonzeroPositions
from pyrovi.distributions._count_tables import (
    dense_table_terms,
    flat_positions_at_least,
    rising_factorial_tables,
)
from pyrovi.distributions._functional import (
    THETA_SWITCH,
    _stirling_rising_excess,
    _unbroadcast,
)


def _stirling_remainder_derivative(y: torch.Tensor) -> torch.Tensor:
    """Derivative of ``_stirling_remainder``: ``-1/(12 y^2) + 1/(120 y^4) - ...``."""
    inv2 = y.reciprocal().square()
    return -inv2 * (1.0 / 12.0 - inv2 * (1.0 / 120.0 - inv2 * (1.0 / 252.0 - inv2 / 240.0)))


def _stirling_terms(x, mu, theta, lgamma_x1, x_log_mu, with_grads: bool):
    """``E`` and ``dE/dtheta`` by Stirling's series, for entries with ``theta > THETA_SWITCH``."""
    value = (
        _stirling_rising_excess(x, theta) - lgamma_x1 - x * torch.log1p(mu / theta) + x_log_mu
    )
    if not with_grads:
        return value, None
    # d/d theta of the Stirling form, free of the cancelling digamma difference.
    d_theta = (
        torch.log1p(x / theta)
        - x / theta
        + 0.5 * x / (theta * (theta + x))
        + _stirling_remainder_derivative(theta + x)
        - _stirling_remainder_derivative(theta)
        + x * mu / (theta * (theta + mu))
    )
    return value, d_theta


#: Evaluation methods of the log-densities (see the module docstring).
METHODS = ("auto", "tables", "dense-tables", "gather", "dense")

# Module-level caches. Both hold constants that depend only on their key (a dtype and
# device, a table size and device), built on first use and kept for the life of the
# process, so that a training step never rebuilds them: lgamma of every count below
# _FACTORIAL_TABLE_SIZE (512 KiB in float64 per key) and the arguments of the per-gene
# count tables (tiny). Nothing else in this module keeps state between calls.
_FACTORIAL_TABLE_SIZE = 2**16
_log_factorial_tables: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _as_integer_counts(x: torch.Tensor) -> torch.Tensor | None:
    """``x`` as int64 when every entry is an integer (counts, as usual), else ``None``."""
    as_index = x.long()
    return as_index if torch.equal(as_index.to(x.dtype), x) else None


def _log_factorial(x: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + 1)``, from a table when every count is an integer below 65,536.

    A table lookup is cheaper than ``lgamma`` on the CPU; other values (rare large
    counts, or non-integer input) take ``lgamma``.
    """
    if x.numel() == 0:
        return x.clone()
    as_index = _as_integer_counts(x)
    if as_index is None or float(x.max()) >= _FACTORIAL_TABLE_SIZE:
        return torch.lgamma(x + 1.0)
    key = (x.dtype, x.device)
    if key not in _log_factorial_tables:
        counts = torch.arange(_FACTORIAL_TABLE_SIZE, dtype=torch.float64)
        _log_factorial_tables[key] = torch.lgamma(counts + 1.0).to(x.dtype).to(x.device)
    return _log_factorial_tables[key].index_select(0, as_index)


def _nonzero_terms_and_derivatives(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    lgamma_theta: torch.Tensor,
    digamma_theta: torch.Tensor | None,
    with_grads: bool,
    dense: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``E = log p(x) - log p(0)`` and its derivatives in ``mu`` and ``theta``, for ``x > 0``.

    ``lgamma_theta``/``digamma_theta`` are those functions of ``theta`` clamped to at most
    ``THETA_SWITCH`` (computed once per gene by the caller). Where ``mu = 0`` the value is
    ``-inf`` and the derivatives are 0 (the entry is impossible whatever ``mu`` is). With
    ``dense``, ``x`` may hold zeros (where everything is 0) and the Stirling branch is
    selected by ``where`` instead of by index, so that nothing waits for the device.
    """
    possible = (mu > 0) | (x == 0) if dense else mu > 0
    x_log_mu = torch.where(possible, x * mu.clamp(min=torch.finfo(mu.dtype).tiny).log(), -torch.inf)
    lgamma_x1 = torch.lgamma(x + 1.0) if dense else _log_factorial(x)
    theta_small = theta.clamp(max=THETA_SWITCH)
    x_theta_small = x + theta_small
    value = torch.lgamma(x_theta_small).sub_(lgamma_theta).sub_(lgamma_x1).add_(x_log_mu)
    value.sub_(x * torch.log(theta_small + mu))
    d_mu = d_theta = None
    if with_grads:
        x_over_theta_mu = x / (theta + mu)
        d_mu = torch.where(mu > 0, x_over_theta_mu * theta / mu, 0.0)
        d_theta = torch.digamma(x_theta_small).sub_(digamma_theta).sub_(x_over_theta_mu)
    if dense:
        large = theta > THETA_SWITCH
        at = (x, mu, theta.clamp(min=THETA_SWITCH), lgamma_x1, x_log_mu)
        large_value, large_d_theta = _stirling_terms(*at, with_grads)
        value = torch.where(large, large_value, value)
        if with_grads:
            d_theta = torch.where(large, large_d_theta, d_theta)
        return value, d_mu, d_theta
    large = torch.nonzero(theta > THETA_SWITCH).squeeze(1)
    if large.numel():
        # lgamma(x + theta) - lgamma(theta) drowns in rounding error for large theta.
        at = [t.index_select(0, large) for t in (x, mu, theta, lgamma_x1, x_log_mu)]
        large_value, large_d_theta = _stirling_terms(*at, with_grads)
        value.index_copy_(0, large, large_value)
        if with_grads:
            d_theta.index_copy_(0, large, large_d_theta)
    return value, d_mu, d_theta


#: Counts below this use per-gene tables of the lgamma/digamma differences (CPU path).
_TABLE_COUNTS = 16


def _uses_count_tables(positions: _ZeroTermPositions, theta: torch.Tensor) -> bool:
    """Whether the table path applies: gathered non-zeros, one ``theta`` per gene, and
    enough non-zero counts to pay for tables of ``genes x _TABLE_COUNTS`` entries."""
    n_genes = positions.shape[-1]
    return (
        not positions.dense
        and theta.numel() == n_genes
        and theta.shape[-1:] == positions.shape[-1:]
        and 4 * positions.flat.numel() >= n_genes * _TABLE_COUNTS
    )


def _small_count_terms(
    x: torch.Tensor,
    counts: torch.Tensor,
    mu: torch.Tensor,
    log1p_ratio: torch.Tensor,
    columns: torch.Tensor,
    theta_per_gene: torch.Tensor,
    lgamma_theta: torch.Tensor,
    digamma_theta: torch.Tensor | None,
    with_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``log p(x)`` and the derivatives of ``E = log p(x) - log p(0)`` in ``mu`` and
    ``theta`` at gathered non-zero counts, one ``theta`` per gene, the lgamma/digamma
    differences read from per-gene tables.

    ``counts`` is ``x`` as int64 (integer counts only), ``log1p_ratio`` is
    ``log1p(mu / theta)`` at the same entries and ``columns`` their genes. With ``R(k) =
    lgamma(theta + k) - lgamma(theta) - k log(theta) - lgamma(k + 1)`` and ``D(k)`` the
    derivative of its first three terms in ``theta`` (:func:`rising_factorial_tables`)::

        log p(x)  = R(x) + x log(mu) - (x + theta) log1p(mu / theta)
        dE/dtheta = D(x) + x mu / (theta (theta + mu))

    Counts of ``_TABLE_COUNTS`` or more (a few percent in single-cell data) take
    :func:`_nonzero_terms_and_derivatives`. ``lgamma_theta``/``digamma_theta`` are per
    gene, of ``theta`` clamped to ``THETA_SWITCH``, as that function expects.
    """
    size = _TABLE_COUNTS
    theta_per_gene = theta_per_gene.reshape(-1)
    rising, d_rising = rising_factorial_tables(theta_per_gene, size)
    index = columns * size + counts.clamp(max=size - 1)
    theta = theta_per_gene.index_select(0, columns)
    possible = mu > 0
    x_log_mu = torch.where(possible, x * mu.clamp(min=torch.finfo(mu.dtype).tiny).log(), -torch.inf)
    value = rising.view(-1).index_select(0, index).add_(x_log_mu)
    value.sub_((x + theta).mul_(log1p_ratio))
    d_mu = d_theta = None
    if with_grads:
        theta_mu = theta + mu
        x_over_theta_mu = x / theta_mu
        d_mu = torch.where(possible, x_over_theta_mu * theta / mu, 0.0)
        d_theta = d_rising.view(-1).index_select(0, index).add_(x_over_theta_mu * mu / theta)
    large = flat_positions_at_least(x, size)
    if large.numel():
        genes = columns.index_select(0, large)
        large_theta = theta.index_select(0, large)
        large_value, large_d_mu, large_d_theta = _nonzero_terms_and_derivatives(
            x.index_select(0, large), mu.index_select(0, large), large_theta,
            lgamma_theta.reshape(-1).index_select(0, genes),
            None if digamma_theta is None else digamma_theta.reshape(-1).index_select(0, genes),
            with_grads,
        )
        large_value.sub_(large_theta * log1p_ratio.index_select(0, large))  # + log p(0)
        value.index_copy_(0, large, large_value)
        if with_grads:
            d_mu.index_copy_(0, large, large_d_mu)
            d_theta.index_copy_(0, large, large_d_theta)
    return value, d_mu, d_theta


def _gather_flat(
    t: torch.Tensor, flat: torch.Tensor, columns: torch.Tensor, shape: torch.Size
) -> torch.Tensor:
    """Entries ``flat`` (positions in the flattened ``shape``) of ``t`` broadcast to ``shape``.

    A per-gene vector is gathered by ``columns`` (``flat % n_genes``) without materialising
    its broadcast.
    """
    if t.shape == shape and t.is_contiguous():
        return t.view(-1).index_select(0, flat)
    if t.shape[-1:] == shape[-1:] and t.numel() == shape[-1]:
        return t.reshape(-1).index_select(0, columns)
    return t.expand(shape).reshape(-1).index_select(0, flat)


#: Share of non-zero counts above which ``"auto"`` evaluates every entry on the CPU.
DENSE_SHARE = 0.35
#: Rows of a minibatch whose non-zero share ``"auto"`` reads when their positions are unknown.
DENSITY_SAMPLE_ROWS = 16


def default_method(x: torch.Tensor, nonzero: NonzeroPositions | None = None) -> str:
    """The evaluation ``method="auto"`` stands for.

    On the CPU, ``"tables"``: the terms that vanish at zero are evaluated at the gathered
    non-zero counts (it saves their work at every zero), unless more than
    :data:`DENSE_SHARE` of the counts are non-zero, where gathering and scattering cost
    more than they save and ``"dense-tables"`` reads the tables at every entry (without
    known positions, the share is that of the first :data:`DENSITY_SAMPLE_ROWS` cells). On
    accelerators, ``"dense"``: the elementwise work is cheap, and finding the non-zeros
    would make the host wait for the device at every step.

    Parameters
    ----------
    x
        The counts.
    nonzero
        Their non-zero positions, when known (saves counting them).

    Returns
    -------
    str
        One of :data:`METHODS` other than ``"auto"``.
    """
    if x.device.type != "cpu":
        return "dense"
    if nonzero is not None:
        share = nonzero.flat.numel() / max(x.numel(), 1)
    else:
        # Both evaluations are exact, so the choice is one of speed: the share among the
        # first cells (a minibatch's come in random order) costs an eighth of a full count.
        rows = x.reshape(-1, x.shape[-1])[:DENSITY_SAMPLE_ROWS] if x.dim() else x
        share = int(torch.count_nonzero(rows)) / max(rows.numel(), 1)
    return "dense-tables" if share > DENSE_SHARE else "tables"


def _large_count_terms(x, mu, theta, with_grads: bool):
    """``E = log p(x) - log p(0)`` and ``dE/dtheta`` at gathered counts, one theta each."""
    small = theta.clamp(max=THETA_SWITCH)
    value, _, d_theta = _nonzero_terms_and_derivatives(
        x, mu, theta, torch.lgamma(small), torch.digamma(small) if with_grads else None,
        with_grads)
    return value, d_theta


def _derivatives_of_zero_terms(ratio, log1p_ratio, weight, zi_logits, softplus_logits):
    """``d log p0 / d mu`` and ``d log p0 / d theta`` (weighted), and ``d / d zi_logits``.

    ``ratio`` is overwritten.
    """
    one_plus_ratio = ratio.add(1.0)
    # r / (1 + r) rather than 1 - 1 / (1 + r), which cancels when mu << theta.
    d_theta = ratio.div_(one_plus_ratio).sub_(log1p_ratio).contiguous()
    if zi_logits is None:
        return one_plus_ratio.reciprocal_().neg_().contiguous(), d_theta, None
    d_theta.mul_(weight)
    d_mu = torch.div(weight, one_plus_ratio).neg_().contiguous()
    # d / d l = 1 - sigmoid(l) - w, and 1 - sigmoid(l) = exp(-softplus(l)) for any l.
    d_logits = softplus_logits.neg().exp_().sub_(weight)
    return d_mu, d_theta, d_logits


class _ZeroTermPositions:
    """Where the terms that vanish at zero are evaluated, and how results go back.

    Gathered (``dense=False``): the non-zero counts are found once (or ``known``) and
    everything else is index arithmetic on them. Dense: every entry is evaluated and
    ``where`` picks the non-zero ones, so that nothing waits for the device.
    """

    def __init__(self, x: torch.Tensor, known: NonzeroPositions | None = None,
                 dense: bool = False):
        self.shape = x.shape
        self.dense = dense
        self.known = None if self.dense else known
        if self.dense:
            self.positive = x > 0
        elif known is not None:
            # Densified from sparse rows: the loader recorded where the non-zeros are.
            self.flat, self.columns = known.flat, known.columns
        else:
            # nonzero() of a bool mask reads a byte per entry instead of a float's four.
            self.flat = torch.nonzero(x.reshape(-1) > 0).squeeze(1)
            self.columns = self.flat % self.shape[-1]

    def at(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (broadcastable to the counts) at the evaluated positions."""
        return t if self.dense else _gather_flat(t, self.flat, self.columns, self.shape)

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        """The counts ``x`` at the evaluated positions (recorded ones are not gathered)."""
        if self.known is not None:
            return self.known.values.to(x.dtype)
        return self.at(x)

    def put(self, target: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``target`` with the non-zero positions replaced by ``values``."""
        if self.dense:
            return torch.where(self.positive, values, target)
        target = target.contiguous()
        # scatter_ / scatter_add_ take half the time of index_copy_ / index_add_ on the CPU.
        target.view(-1).scatter_(0, self.flat, values)
        return target

    def fill_one(self, target: torch.Tensor) -> torch.Tensor:
        """``target`` with 1 at the non-zero positions (in place)."""
        if self.dense:
            return target.masked_fill_(self.positive, 1.0)
        target.view(-1).scatter_(0, self.flat, torch.ones_like(self.flat, dtype=target.dtype))
        return target

    def add(self, target: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``target`` plus ``values`` at the non-zero positions (in place)."""
        if self.dense:
            return target.add_(values)
        target.view(-1).scatter_add_(0, self.flat, values)
        return target


def _log_prob_and_derivatives(
    x: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    zi_logits: torch.Tensor | None,
    with_grads: bool,
    method: str,
    known_nonzero: NonzeroPositions | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Elementwise NB (``zi_logits=None``) or ZINB log-density and local derivatives.

    ``x``, ``mu`` and ``zi_logits`` share one shape; ``theta`` is broadcastable to it
    (typically one value per gene). ``method`` is one of :data:`METHODS` other than
    ``"auto"``; ``known_nonzero`` holds the non-zero counts when the caller knows them.
    Returns the value and ``(d_mu, d_theta, d_zi_logits)`` (``None`` where not computed),
    all of the full shape.
    """
    if method == "dense-tables":
        result = dense_table_terms(x, mu, theta, zi_logits, with_grads, _large_count_terms)
        if result is not None:
            return result
        method = "tables"
    theta_small = theta.clamp(max=THETA_SWITCH)
    lgamma_theta = torch.lgamma(theta_small)
    digamma_theta = torch.digamma(theta_small) if with_grads else None

    ratio = mu * theta.reciprocal()
    log1p_ratio = torch.log1p(ratio)
    log_p0 = log1p_ratio * theta.neg()
    if zi_logits is None:
        value = log_p0.clone()
        weight = None
    else:
        value = torch.logaddexp(zi_logits, log_p0)
        # Share of a zero that the negative binomial explains (the gate explains the rest).
        weight = torch.sub(log_p0, value).exp_() if with_grads else None

    positions = _ZeroTermPositions(x, known_nonzero, dense=method == "dense")
    at = positions.at
    x_at = positions.counts(x)
    tables = method == "tables" and _uses_count_tables(positions, theta)
    counts = _as_integer_counts(x_at) if tables else None
    if counts is not None:
        log_p, extra_d_mu, extra_d_theta = _small_count_terms(
            x_at, counts, at(mu), at(log1p_ratio), positions.columns, theta, lgamma_theta,
            digamma_theta, with_grads)
    else:
        extra, extra_d_mu, extra_d_theta = _nonzero_terms_and_derivatives(
            x_at, at(mu), at(theta), at(lgamma_theta),
            None if digamma_theta is None else at(digamma_theta), with_grads,
            dense=positions.dense,
        )
        log_p = extra.add_(at(log_p0))
    value = positions.put(value, log_p)
    softplus_logits = None
    if zi_logits is not None:
        softplus_logits = F.softplus(zi_logits)
        value.sub_(softplus_logits)
    if not with_grads:
        return value, (None, None, None)

    if weight is not None:
        positions.fill_one(weight)
    d_mu, d_theta, d_logits = _derivatives_of_zero_terms(
        ratio, log1p_ratio, weight, zi_logits, softplus_logits)
    return value, (positions.add(d_mu, extra_d_mu), positions.add(d_theta, extra_d_theta),
                   d_logits)


class _CountLogProb(torch.autograd.Function):
    """Autograd wrapper: value and local derivatives forward, products backward."""

    @staticmethod
    def forward(ctx, x, mu, theta, zi_logits, method, known_nonzero):
        shape = x.shape
        value, derivatives = _log_prob_and_derivatives(
            x,
            mu.expand(shape),
            theta,
            None if zi_logits is None else zi_logits.expand(shape),
            with_grads=True,
            method=method,
            known_nonzero=known_nonzero,
        )
        ctx.save_for_backward(*(d for d in derivatives if d is not None))
        ctx.shapes = (mu.shape, theta.shape, None if zi_logits is None else zi_logits.shape)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        grads = [None]  # x
        for shape, needed in zip(ctx.shapes, ctx.needs_input_grad[1:4], strict=True):
            if shape is None:
                grads.append(None)
                continue
            derivative = next(saved)
            grads.append(_chain(grad, derivative, shape) if needed else None)
        return (*grads, None, None)  # nothing for method and known_nonzero


def _chain(grad: torch.Tensor, derivative: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``(grad * derivative)`` summed to a parameter's ``shape``.

    The gradient of a per-cell sum over genes (every ``to_event(1)`` log-density) is one
    value per cell broadcast over the genes; then a per-gene parameter's gradient is a
    matrix-vector product, without the ``(cells, genes)`` product in between.
    """
    per_gene = len(shape) == 2 and shape[0] == 1 and shape[1] == derivative.shape[-1]
    if per_gene and grad.dim() == 2 and grad.stride(1) == 0 and derivative.dim() == 2:
        return torch.mv(derivative.t(), grad[:, 0]).view(shape)
    return (grad * derivative).sum_to_size(shape)


def log_count(
    x: torch.Tensor,
    mu,
    theta,
    zi_logits=None,
    method: str = "auto",
    nonzero: NonzeroPositions | None = None,
) -> torch.Tensor:
    """NB (``zi_logits=None``) or ZINB log-density of ``x``, evaluated by ``method``.

    ``nonzero`` is used only by the gathering methods and only when it describes ``x``
    itself (:meth:`~pyrovi._nonzero_positions.NonzeroPositions.describe`) and broadcasting
    leaves ``x``'s shape unchanged; otherwise the non-zeros are found in ``x``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} or 'reference', got {method!r}.")
    known = nonzero if nonzero is not None and nonzero.describe(x) else None
    tensors = [x, mu, theta] if zi_logits is None else [x, mu, theta, zi_logits]
    shape_before = x.shape
    x, mu, theta, *rest = broadcast_all(*tensors)
    if x.shape != shape_before:
        known = None
    zi_logits = rest[0] if rest else None
    x = x.to(mu.dtype)
    if method == "auto":
        method = default_method(x, known)
    if x.dim() == 0:  # the index arithmetic below wants at least one dimension
        one = log_count(x.reshape(1), mu.reshape(1), theta.reshape(1),
                        None if zi_logits is None else zi_logits.reshape(1), method)
        return one.reshape(())
    params = [p for p in (mu, theta, zi_logits) if p is not None]
    if not (torch.is_grad_enabled() and any(p.requires_grad for p in params)):
        value, _ = _log_prob_and_derivatives(
            x, mu, _unbroadcast(theta), zi_logits, with_grads=False, method=method,
            known_nonzero=known,
        )
        return value
    return _CountLogProb.apply(
        x,
        _unbroadcast(mu),
        _unbroadcast(theta),
        None if zi_logits is None else _unbroadcast(zi_logits),
        method,
        known,
    )
