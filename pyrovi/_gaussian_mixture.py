"""One-dimensional Gaussian mixtures fitted by EM (no scikit-learn dependency).

Used where a small mixture summarises a distribution: the threshold of differential
expression (``delta=None``) and TotalVI's empirical background prior.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class GaussianMixture1D(NamedTuple):
    """Fitted mixture: component ``weights``, ``means`` and ``variances`` (sorted by mean)."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray


def fit_gaussian_mixture_1d(
    x: np.ndarray, n_components: int, n_iter: int = 200, min_variance: float = 1e-6,
    tol: float = 1e-8,
) -> GaussianMixture1D:
    """Maximum-likelihood Gaussian mixture of ``x`` by expectation-maximisation.

    Components start at evenly spaced quantiles of ``x`` with equal weights and variances;
    ``min_variance`` keeps a component from collapsing onto repeated values (as happens
    with count data).

    Parameters
    ----------
    x
        Values, 1-d.
    n_components
        Number of components.
    n_iter, tol
        Iteration limit; stop when the mean log-likelihood improves by less than ``tol``.
    min_variance
        Lower bound of every component's variance.

    Returns
    -------
    GaussianMixture1D
        Components sorted by increasing mean.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = np.r_[rng.normal(-3, 1, 500), rng.normal(3, 1, 500)]
    >>> np.round(fit_gaussian_mixture_1d(x, 2).means).tolist()
    [-3.0, 3.0]
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size < n_components:
        raise ValueError(f"Need at least {n_components} values, got {x.size}.")
    means = np.quantile(x, (np.arange(n_components) + 0.5) / n_components)
    variances = np.full(n_components, max(x.var() / n_components, min_variance))
    weights = np.full(n_components, 1.0 / n_components)
    previous = -np.inf
    for _ in range(n_iter):
        log_joint = (np.log(weights) - 0.5 * np.log(2 * np.pi * variances)
                     - 0.5 * (x[:, None] - means) ** 2 / variances)
        peak = log_joint.max(1, keepdims=True)
        log_norm = peak + np.log(np.exp(log_joint - peak).sum(1, keepdims=True))
        responsibilities = np.exp(log_joint - log_norm)
        mass = responsibilities.sum(0) + 1e-12
        weights = mass / x.size
        means = (responsibilities * x[:, None]).sum(0) / mass
        variances = np.maximum(
            (responsibilities * (x[:, None] - means) ** 2).sum(0) / mass, min_variance)
        log_likelihood = float(log_norm.mean())
        if log_likelihood - previous < tol:
            break
        previous = log_likelihood
    order = np.argsort(means)
    return GaussianMixture1D(weights[order], means[order], variances[order])
