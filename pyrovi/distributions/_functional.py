"""Elementwise log-densities shared by the count distributions."""

from __future__ import annotations

import torch
from torch.distributions.utils import broadcast_all

# Above this inverse dispersion the direct formula is abandoned: lgamma(theta) and
# lgamma(x + theta) grow like theta * log(theta) and their difference, which is all that
# matters, drowns in their rounding error (about 1 nat at theta = 1e6 in float32).
# At theta = 10 the four-term Stirling series below is already accurate to ~1e-12.
THETA_SWITCH = 10.0
# Fraction of non-zero counts below which only the non-zero entries are evaluated (index
# gathers then cost less than dense elementwise work; measured on CPU, see benchmarks/).
SPARSE_BELOW = 0.3


def _stirling_remainder(y: torch.Tensor) -> torch.Tensor:
    """``lgamma(y) - [(y - 1/2) log y - y + log(2 pi) / 2]`` for ``y >= 10``.

    Four terms of the asymptotic series ``1/(12 y) - 1/(360 y^3) + 1/(1260 y^5)
    - 1/(1680 y^7)``; the first omitted term, ``1 / (1188 y^9)``, is below ``1e-12`` for
    ``y >= 10``, and its derivative below ``1e-12`` too, so gradients are as accurate as
    values.
    """
    inv = y.reciprocal()
    inv2 = inv * inv
    return inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 / 1680.0)))


def _x_log_mu(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``x * log(mu)``, with ``0 * log(0) = 0``, and finite gradients everywhere.

    ``torch.xlogy`` gets the value right but its gradient with respect to ``mu`` is
    ``x / mu``: ``0 / 0`` at ``x = mu = 0``, and ``inf`` at ``mu = 0 < x``, which turns
    into NaN as soon as that entry is masked or summed with weight 0. Here ``log`` only
    ever sees ``mu = 1`` (where ``x = 0``) or ``mu >= tiny``, and the ``-inf`` of
    ``mu = 0 < x`` is a constant, so those entries get a zero gradient instead.
    """
    safe_mu = torch.where(x > 0, mu, torch.ones_like(mu)).clamp(min=torch.finfo(mu.dtype).tiny)
    impossible = (x > 0) & (mu == 0)
    return torch.where(impossible, -torch.inf, x * safe_mu.log())


def log_nb_positive(
    x: torch.Tensor, mu: torch.Tensor | float, theta: torch.Tensor | float
) -> torch.Tensor:
    """Elementwise log-probability of counts under a negative binomial of mean ``mu``.

    The negative binomial of mean ``mu`` and inverse dispersion ``theta`` (variance
    ``mu + mu**2 / theta``) is the Gamma-Poisson mixture

    ``log p(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
    + theta * log(theta / (theta + mu)) + x * log(mu / (theta + mu))``.

    Evaluated as written, this loses all precision in float32 once ``theta`` is large,
    because ``lgamma(theta)`` is then huge (``1.3e7`` at ``theta = 1e6``). For
    ``theta > 10`` the lgamma difference is therefore expanded with Stirling's series,
    which cancels the large terms analytically:

    ``log p(x) = (theta + x - 1/2) * log1p(x / theta) - x + S(theta + x) - S(theta)
    - lgamma(x + 1) - (theta + x) * log1p(mu / theta) + x * log(mu)``,

    with ``S(y) = 1 / (12 y) - 1 / (360 y^3) + 1 / (1260 y^5) - 1 / (1680 y^7)`` (the
    tail of Stirling's series for ``lgamma``). Each branch is evaluated
    on ``theta`` clamped to its own range, so the branch that is not selected stays finite
    and cannot poison gradients with NaN.

    Parameters
    ----------
    x
        Observed counts (non-negative integers, stored as floats or integers).
    mu
        Mean, ``mu >= 0``. At ``mu = 0`` the result is ``0`` for ``x = 0`` and ``-inf``
        for ``x > 0``.
    theta
        Inverse dispersion, ``theta > 0``.

    Returns
    -------
    torch.Tensor
        ``log p(x)`` of the broadcast shape of the three inputs, in the floating dtype of
        ``mu`` and ``theta``.

    Examples
    --------
    >>> import torch
    >>> log_nb_positive(torch.tensor([0.0, 3.0]), torch.tensor(2.0), torch.tensor(1e6))
    tensor([-2.0000, -1.7123])
    """
    x, mu, theta = broadcast_all(x, mu, theta)
    x = x.to(mu.dtype)
    # Every entry gets the log-probability of a zero count, -theta * log(1 + mu / theta)
    # (log1p keeps it exact when mu << theta); the remaining terms vanish at x = 0.
    log_p = -theta * torch.log1p(mu / theta)
    if x.dim() == 0 or x.device.type == "meta":
        # No index tricks for scalars or shape-only tensors.
        return log_p + _log_nb_nonzero_terms(x, mu, theta)
    positive = x > 0
    density = float(positive.sum()) / max(positive.numel(), 1)
    if density > SPARSE_BELOW:
        return log_p + _log_nb_dense_terms(x, mu, theta)
    # Sparse counts (most single-cell data): evaluate the careful two-branch terms only at
    # the non-zero entries, which is cheaper than the naive formula everywhere.
    nonzero = torch.nonzero(positive, as_tuple=True)
    if nonzero[0].numel() == 0:
        return log_p
    extra = _log_nb_nonzero_terms(x[nonzero], mu[nonzero], theta[nonzero])
    return log_p.index_put(nonzero, extra, accumulate=True)


def _stirling_rising_excess(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + theta) - lgamma(theta) - x * log(theta)`` by Stirling's series (theta >= 10).

    Free of large cancelling terms: it is about ``x**2 / (2 theta)`` when theta is large.
    """
    return (
        (theta + x - 0.5) * torch.log1p(x / theta)
        - x
        + _stirling_remainder(theta + x)
        - _stirling_remainder(theta)
    )


def _unbroadcast(t: torch.Tensor) -> torch.Tensor:
    """The tensor behind a broadcast view: stride-0 dimensions narrowed to size 1.

    A per-gene theta broadcast to (cells, genes) holds one value per gene; functions of
    theta alone are computed on that instead of once per cell.
    """
    for dim, (size, stride) in enumerate(zip(t.shape, t.stride(), strict=True)):
        if stride == 0 and size > 1:
            t = t.narrow(dim, 0, 1)
    return t


def _log_nb_dense_terms(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The terms that vanish at ``x = 0``, for dense counts (full tensors).

    The direct ``lgamma(x + theta) - lgamma(theta)`` is computed everywhere; entries with
    ``theta > THETA_SWITCH``, where it loses precision, are recomputed with Stirling's series.
    """
    theta_own = _unbroadcast(theta)
    rising = torch.lgamma(x + theta) - torch.lgamma(theta_own)
    if bool((theta_own > THETA_SWITCH).any()):
        large = torch.nonzero((theta > THETA_SWITCH) & (x > 0), as_tuple=True)
        if large[0].numel():
            xl, tl = x[large], theta[large]
            rising = rising.index_put(large, xl * torch.log(tl) + _stirling_rising_excess(xl, tl))
    # x * log(mu) needs care only where mu is exactly 0 (see _x_log_mu); that is rare.
    x_log_mu = _x_log_mu(x, mu) if bool((mu == 0).any()) else x * torch.log(mu)
    return rising - torch.lgamma(x + 1.0) + x_log_mu - x * torch.log(theta + mu)


def _log_nb_nonzero_terms(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``log p(x) + theta * log1p(mu / theta)``: the terms of the NB density that vanish at 0."""
    lgamma_x1 = torch.lgamma(x + 1.0)
    x_log_mu = _x_log_mu(x, mu)

    # Small theta: the direct formula.
    theta_small = theta.clamp(max=THETA_SWITCH)
    small = (
        torch.lgamma(x + theta_small)
        - torch.lgamma(theta_small)
        - lgamma_x1
        + x_log_mu
        - x * torch.log(theta_small + mu)
    )

    # Large theta: Stirling's series for lgamma(x + theta) - lgamma(theta); the
    # x * log(theta) it produces cancels the one hidden in x * log(theta + mu).
    theta_large = theta.clamp(min=THETA_SWITCH)
    large = (
        _stirling_rising_excess(x, theta_large)
        - lgamma_x1
        - x * torch.log1p(mu / theta_large)
        + x_log_mu
    )
    return torch.where(theta > THETA_SWITCH, large, small)


def log_poisson(x: torch.Tensor, mu: torch.Tensor | float) -> torch.Tensor:
    """Elementwise Poisson log-probability ``x * log(mu) - mu - lgamma(x + 1)``.

    Unlike ``torch.distributions.Poisson.log_prob`` the gradient with respect to ``mu``
    stays finite (``-1``) at ``x = mu = 0``.

    Parameters
    ----------
    x
        Observed counts.
    mu
        Mean (rate), ``mu >= 0``.

    Returns
    -------
    torch.Tensor
        ``log p(x)`` of the broadcast shape of ``x`` and ``mu``.
    """
    x, mu = broadcast_all(x, mu)
    x = x.to(mu.dtype)
    return _x_log_mu(x, mu) - mu - torch.lgamma(x + 1.0)
