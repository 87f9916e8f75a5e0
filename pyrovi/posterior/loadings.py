"""Rotations of factor loadings (for models with a linear decoder, such as LDVAE)."""

from __future__ import annotations

import numpy as np


def varimax(
    loadings: np.ndarray, max_iter: int = 100, tol: float = 1e-8
) -> tuple[np.ndarray, np.ndarray]:
    """Varimax rotation (Kaiser 1958): the orthogonal rotation with the sparsest loadings.

    With an isotropic Gaussian prior and a linear decoder, rotating the latent space
    changes neither the prior nor the likelihood, so the loadings of a trained model are
    determined only up to a rotation. Varimax picks the rotation that maximises the
    variance of the squared loadings within each factor, which makes factors driven by
    distinct gene programs come out one program per factor.

    Parameters
    ----------
    loadings
        Features × factors.
    max_iter, tol
        Sweeps over all pairs of factors at most, and the rotation angle (radians) below
        which a sweep counts as converged.

    Returns
    -------
    rotated
        ``loadings @ rotation``.
    rotation
        Orthogonal factors × factors matrix; latent coordinates ``z @ rotation`` go with the
        rotated loadings (``W z = (W R)(Rᵀ z)``).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> sparse = np.kron(np.eye(2), np.ones((5, 1)))   # two disjoint programs
    >>> angle = 0.6
    >>> mixed = sparse @ np.array([[np.cos(angle), -np.sin(angle)],
    ...                            [np.sin(angle), np.cos(angle)]])
    >>> rotated, rotation = varimax(mixed)
    >>> np.allclose(np.abs(rotated), sparse) and np.allclose(mixed @ rotation, rotated)
    True
    """
    rotated = np.array(loadings, dtype=np.float64)
    n_features, n_factors = rotated.shape
    rotation = np.eye(n_factors)
    for _ in range(max_iter):
        largest_angle = 0.0
        # Kaiser's sweep of planar rotations: for each pair of factors the angle that
        # maximises the criterion has a closed form, so every step increases it.
        for j in range(n_factors - 1):
            for k in range(j + 1, n_factors):
                x, y = rotated[:, j], rotated[:, k]
                u, v = x**2 - y**2, 2 * x * y
                numerator = 2 * (u * v).sum() - 2 * u.sum() * v.sum() / n_features
                denominator = ((u**2 - v**2).sum()
                               - (u.sum() ** 2 - v.sum() ** 2) / n_features)
                angle = 0.25 * np.arctan2(numerator, denominator)
                largest_angle = max(largest_angle, abs(angle))
                planar = np.array([[np.cos(angle), -np.sin(angle)],
                                   [np.sin(angle), np.cos(angle)]])
                rotated[:, [j, k]] = rotated[:, [j, k]] @ planar
                rotation[:, [j, k]] = rotation[:, [j, k]] @ planar
        if largest_angle < tol:
            break
    return rotated, rotation
