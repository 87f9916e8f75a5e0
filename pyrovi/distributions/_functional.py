"""Elementwise log-densities shared by the count distributions."""

from __future__ import annotations

import torch
from torch.distributions.utils import broadcast_all

# Above this inverse dispersion the direct formula is abandoned: lgamma(theta) and
# lgamma(x + theta) grow like theta * log(theta) and their difference, which is all that
# matters, drowns in their rounding error (about 1 nat at theta = 1e6 in float32).
# At theta = 10 the four-term Stirling series below is already accurate to ~1e-12.
THETA_SWITCH = 10.0


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
