"""Per-gene tables of the NB's count terms, and the NB/ZINB evaluated from them at every entry.

With one ``theta`` per gene, the terms of the negative binomial that depend on the count
``k`` and ``theta`` together (``lgamma(theta + k) - lgamma(theta)`` and its derivative)
take one value per gene and count: for the small counts that make up most of single-cell
data they are read from a ``(counts, genes)`` table built once per evaluation, and
lgamma/digamma run only at the few larger counts.

:mod:`pyrovi.distributions._fast_nb` reads the tables at the gathered non-zero counts
(``method="tables"``, best for sparse minibatches). :func:`dense_table_terms` reads them
at every entry (``method="dense-tables"``): with most counts non-zero, as in deeply
sequenced data, gathering the non-zeros and scattering results back costs more than it
saves. It computes the value and the elementwise derivatives together, with as few
``(cells, genes)`` temporaries as it can (each costs a pass through memory), and falls back
(returns ``None``) where its closed forms need care: a mean of exactly 0 or non-integer
counts.

With ``r = mu / theta``, ``L = log1p(r)``, ``log p0 = -theta L`` (the log-probability of a
zero) and the table entries ``R(k) = lgamma(theta + k) - lgamma(theta) - k log(theta) -
lgamma(k + 1)``, ``D(k) = dR/dtheta``::

    log NB(x)  = log p0 + E,   E = R(x) + x (log mu - L)       (E = 0 at x = 0)
    dE/dmu     = x / (mu (1 + r))
    dE/dtheta  = D(x) + x r / (theta (1 + r))

and for the ZINB with gate logits ``l`` (``z`` = 1 at zero counts, ``w`` = the share of a
zero the NB explains, 1 at non-zero counts)::

    log p      = (1 - z) log NB(x) + z logaddexp(l, log p0) - softplus(l)
    w          = 1 - z + z exp(log p0 - logaddexp(l, log p0))
    d/d l      = exp(-softplus(l)) - w
    d/d mu     = (x / mu - w) / (1 + r)
    d/d theta  = w (r / (1 + r) - L) + dE/dtheta
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Counts below this read the dense evaluation's tables; larger ones take lgamma/digamma.
DENSE_TABLE_COUNTS = 64

_constants: dict[tuple[int, torch.dtype, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _table_constants(size: int, dtype: torch.dtype, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``j = 0 .. size - 2`` (in ``dtype``) and ``lgamma(k + 1)`` for ``k < size``
    (float64), cached."""
    key = (size, dtype, device)
    if key not in _constants:
        j = torch.arange(size - 1, dtype=dtype, device=device)
        k = torch.arange(size, dtype=torch.float64, device=device)
        _constants[key] = (j, torch.lgamma(k + 1.0))
    return _constants[key]


def rising_factorial_tables(theta: torch.Tensor, size: int,
                            counts_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``R(k)`` and ``D(k)`` (see the module docstring) for every gene and count ``k < size``.

    Summed term by term, ``log1p(j / theta)`` and ``-j / (theta (theta + j))`` for ``j < k``:
    exact for every ``theta``, with none of the cancellation of the lgamma and digamma
    differences at large ``theta`` (where ``D(k)`` is about ``-k**2 / (2 theta**2)``). The
    terms are evaluated in ``theta``'s precision (float32 unless float64). ``R``'s are
    summed in float64, so that ``lgamma(k + 1)``, which it nearly cancels at small
    ``theta``, is taken from a sum as accurate as its terms; ``D``'s terms are all of one
    sign, so their sum in the terms' precision is accurate to a few roundings.

    Parameters
    ----------
    theta
        One inverse dispersion per gene (any shape, ``G`` values).
    size
        Number of counts, ``0 .. size - 1``.
    counts_first
        Shape ``(size, G)`` instead of ``(G, size)``.

    Returns
    -------
    tuple of torch.Tensor
        ``R`` and ``D`` in ``theta``'s dtype.
    """
    dim = 0 if counts_first else 1  # the counts' dimension
    # float32 transcendental functions are several times faster than float64 ones.
    precision = torch.float64 if theta.dtype == torch.float64 else torch.float32
    t = theta.reshape(-1).to(precision).unsqueeze(dim)
    j, log_factorial = _table_constants(size, precision, theta.device)
    j, log_factorial = j.unsqueeze(1 - dim), log_factorial.unsqueeze(1 - dim)
    shape = (size, t.numel()) if counts_first else (t.numel(), size)
    rising = torch.empty(shape, dtype=torch.float64, device=theta.device)
    d_rising = torch.empty(shape, dtype=precision, device=theta.device)
    rising.narrow(dim, 0, 1).zero_()
    d_rising.narrow(dim, 0, 1).zero_()
    ratio = j / t
    torch.cumsum(torch.log1p(ratio), dim, dtype=torch.float64,
                 out=rising.narrow(dim, 1, size - 1))
    torch.cumsum(ratio.div_(t + j).neg_(), dim, out=d_rising.narrow(dim, 1, size - 1))
    rising.sub_(log_factorial)
    return rising.to(theta.dtype), d_rising.to(theta.dtype)


def flat_positions_at_least(x: torch.Tensor, size: int) -> torch.Tensor:
    """Positions in the flattened ``x`` of the entries ``>= size`` (int64, ascending)."""
    if x.device.type == "cpu":
        # numpy finds them in about half the time of torch.nonzero on the CPU.
        return torch.from_numpy(np.flatnonzero(x.detach().numpy() >= size))
    return torch.nonzero(x.reshape(-1) >= size).squeeze(1)


def dense_table_terms(x, mu, theta, zi_logits, with_grads: bool, large_terms):
    """NB (``zi_logits=None``) or ZINB log-density and its derivatives at every entry.

    Parameters
    ----------
    x
        Counts, ``(..., G)``.
    mu
        Means, of ``x``'s shape.
    theta
        One inverse dispersion per gene (``G`` values).
    zi_logits
        Gate logits of ``x``'s shape, or ``None``.
    with_grads
        Also return ``(d_mu, d_theta, d_zi_logits)``.
    large_terms
        ``large_terms(x, mu, theta, with_grads)`` -> ``(E, dE/dtheta)`` at gathered entries
        (the lgamma/digamma/Stirling evaluation of the caller), for counts of
        :data:`DENSE_TABLE_COUNTS` or more.

    Returns
    -------
    tuple or None
        ``(value, (d_mu, d_theta, d_zi_logits))`` (derivatives ``None`` without
        ``with_grads``, ``d_zi_logits`` ``None`` for the NB), all of ``x``'s shape; ``None``
        where this evaluation does not apply (a mean of 0, counts that are not integers in
        ``[0, 2**31)``, ``theta`` not one value per gene).
    """
    if x.dim() == 0 or x.numel() == 0 or theta.numel() != x.shape[-1]:
        return None
    n_genes = x.shape[-1]
    # int32 (converting to it is a few times faster than to int64; index_select takes it),
    # so counts of 2**31 or more do not round-trip and fall back with non-integer ones.
    counts = x.int()
    if not bool(mu.min() > 0) or not bool(counts.min() >= 0) or \
            not torch.equal(counts.to(x.dtype), x):
        return None
    size = DENSE_TABLE_COUNTS
    theta_row = theta.reshape(1, n_genes)
    rising, d_rising = rising_factorial_tables(theta_row, size, counts_first=True)
    shape = x.shape
    x, mu = x.reshape(-1, n_genes), mu.reshape(-1, n_genes)
    large = flat_positions_at_least(x, size)
    # Position in the flattened (counts, genes) tables.
    index = counts.reshape(-1).clamp_(max=size - 1).view(-1, n_genes).mul_(n_genes).add_(
        torch.arange(n_genes, dtype=torch.int32, device=x.device)).view(-1)
    ratio = mu / theta_row
    log1p_ratio = torch.log1p(ratio)
    extra = rising.view(-1).index_select(0, index).view_as(x)
    extra.add_(mu.log().sub_(log1p_ratio).mul_(x))
    d_extra_theta = q = None
    if with_grads:
        inv_one_plus = ratio.add(1.0).reciprocal_()
        q = ratio.mul_(inv_one_plus)  # r / (1 + r), in place of r
        d_extra_theta = d_rising.view(-1).index_select(0, index).view_as(x).addcmul_(
            x, q / theta_row)
    if large.numel():
        genes = large % n_genes
        value_large, d_theta_large = large_terms(
            x.reshape(-1).index_select(0, large), mu.reshape(-1).index_select(0, large),
            theta_row.reshape(-1).index_select(0, genes), with_grads)
        extra.view(-1).index_copy_(0, large, value_large)
        if with_grads:
            d_extra_theta.view(-1).index_copy_(0, large, d_theta_large)
    log_p0 = log1p_ratio * theta_row.neg()
    value = extra.add_(log_p0)  # log NB(x)
    weight = d_logits = None
    if zi_logits is not None:
        zi_logits = zi_logits.reshape(-1, n_genes)
        nonzero = x.clamp(max=1.0)  # 1 at non-zero counts, 0 at zeros
        at_zero = torch.logaddexp(zi_logits, log_p0)
        softplus_logits = F.softplus(zi_logits)
        # Blended by products with the 0/1 mask, exact where either side is 0 (a lerp's
        # sum would cancel where log p0 is very negative): t - t * nonzero is t at zeros
        # and exactly 0 elsewhere.
        if with_grads:
            weight = log_p0.sub_(at_zero).exp_()  # log p0 is not needed any more
            weight.addcmul_(weight, nonzero, value=-1.0).add_(nonzero)
        at_zero.addcmul_(at_zero, nonzero, value=-1.0)
        value.mul_(nonzero).add_(at_zero).sub_(softplus_logits)
        if with_grads:
            d_logits = softplus_logits.neg_().exp_().sub_(weight)
    if not with_grads:
        return value.reshape(shape), (None, None, None)
    d_mu = torch.div(x, mu)
    d_theta = q.sub_(log1p_ratio)
    if weight is None:
        d_mu.sub_(1.0)
    else:
        d_mu.sub_(weight)
        d_theta.mul_(weight)
    d_mu.mul_(inv_one_plus)
    d_theta.add_(d_extra_theta)
    derivatives = (d_mu, d_theta, d_logits)
    return value.reshape(shape), tuple(None if d is None else d.reshape(shape)
                                       for d in derivatives)
