"""Initial values of the TotalVI protein background prior.

In TotalVI the log background intensity of protein ``t`` in a cell of batch ``s`` has the
prior ``Normal(m_ts, s_ts)``. The *empirical* initialisation fits a two-component Gaussian
mixture to ``log1p`` of the protein's counts over the cells of batch ``s`` and takes the
lower-mean component (the cells without the epitope, whose counts are ambient/non-specific
background) as the prior.

The reference implementation yields NaN losses on degenerate protein data (few proteins,
constant or all-zero columns, tiny batches). Here every (protein, batch) pair that cannot
support a mixture fit gets an explicit, finite fallback, and proteins not measured in a
batch borrow the values of the batches where they are measured, so the result is always
finite.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from pyrovi._gaussian_mixture import fit_gaussian_mixture_1d

# The measured-protein mask is computed when the protein field is registered; it stays
# importable from here.
from pyrovi.data.proteins import (  # noqa: F401
    _as_matrix,
    _check_batch_codes,
    missing_protein_mask,
)

logger = logging.getLogger(__name__)

#: Scale of the fallback priors. When a column cannot be split into background and
#: foreground (too few cells, a single distinct value, or a failed fit), its mean mixes
#: both populations (or rests on a handful of cells), so it is only a rough guess of the
#: background level: a broad prior (one unit of log intensity, i.e. a factor e either way)
#: lets the background posterior move away from it, where a narrow one would pin the
#: background to a possibly wrong value. It equals the non-empirical default scale.
FALLBACK_SCALE = 1.0


def default_protein_background_prior(
    n_proteins: int, n_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """Non-empirical initialisation of the protein background prior.

    Mean 0 and scale 1 for every protein and batch. Unlike the reference implementation,
    which draws the mean at random, this is deterministic.

    Parameters
    ----------
    n_proteins
        Number of proteins.
    n_batch
        Number of batches.

    Returns
    -------
    mean, scale
        ``float32`` arrays of shape ``(n_proteins, n_batch)``.

    Examples
    --------
    >>> mean, scale = default_protein_background_prior(3, 2)
    >>> mean.shape, float(mean.max()), float(scale.min())
    ((3, 2), 0.0, 1.0)
    """
    if n_proteins < 0 or n_batch < 0:
        raise ValueError(f"n_proteins and n_batch must be >= 0, got {n_proteins}, {n_batch}.")
    shape = (int(n_proteins), int(n_batch))
    return np.zeros(shape, dtype=np.float32), np.ones(shape, dtype=np.float32)


def _column(matrix, j: int) -> np.ndarray:
    """Column ``j`` as a float64 vector."""
    if sp.issparse(matrix):
        return np.asarray(matrix[:, j].toarray(), dtype=np.float64).ravel()
    return np.asarray(matrix[:, j], dtype=np.float64).ravel()


def _fallback_mean(values: np.ndarray) -> float:
    """``log1p`` of the mean of the finite values (clipped at 0), 0 when there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0
    return float(np.log1p(max(float(finite.mean()), 0.0)))


def empirical_protein_background_prior(
    protein_counts,
    batch_codes: np.ndarray,
    n_batch: int,
    protein_batch_mask: np.ndarray | None = None,
    min_cells: int = 10,
    min_scale: float = 0.05,
    max_scale: float = 3.0,
    *,
    max_cells: int | None = 5000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Empirical initialisation of the protein background prior, per protein and batch.

    For each protein measured in a batch, a two-component Gaussian mixture is fitted to
    ``log1p`` of its counts over the batch's cells; the lower-mean component is the
    background, and its mean and standard deviation (clipped to ``[min_scale,
    max_scale]``) are the prior's mean and scale.

    Fallbacks, all finite:

    - fewer than ``min_cells`` cells, or fewer than 2 distinct values (constant column,
      including all zeros), or a non-finite fit: mean ``log1p(mean count)``, scale 1;
    - protein not measured in the batch (``protein_batch_mask`` False), or batch without
      cells: the average (mean of means, mean of scales) over the batches with cells where
      the protein is measured; mean 0 and scale 1 when there are none.

    Parameters
    ----------
    protein_counts
        Protein counts, cells × proteins, numpy array, pandas DataFrame or scipy sparse.
    batch_codes
        Integer batch code of each cell, in ``0..n_batch-1``.
    n_batch
        Number of batches.
    protein_batch_mask
        ``(n_batch, n_proteins)`` booleans, True where the protein is measured in the batch
        (see :func:`missing_protein_mask`). None: every protein is measured everywhere.
    min_cells
        Fewest cells of a batch for a mixture fit (at least 2 are always required).
    min_scale, max_scale
        Bounds of the fitted scales.
    max_cells
        Fit on at most this many cells per batch (a random subset drawn with ``seed``);
        the mixture's mean and spread are well determined by a few thousand cells, and EM
        cost grows with the cell count. None: use all cells.
    seed
        Seed of the cell subset.

    Returns
    -------
    mean, scale
        ``float32`` arrays of shape ``(n_proteins, n_batch)``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> counts = np.c_[rng.poisson(np.r_[np.full(100, 10), np.full(100, 200)])]
    >>> mean, scale = empirical_protein_background_prior(counts, np.zeros(200, int), 1)
    >>> bool(abs(mean[0, 0] - np.log1p(10)) < 0.1)  # background: the Poisson(10) cells
    True
    """
    if not 0 < min_scale <= max_scale:
        raise ValueError(
            f"Need 0 < min_scale <= max_scale, got min_scale={min_scale}, max_scale={max_scale}.")
    if max_cells is not None and max_cells < 2:
        raise ValueError(f"max_cells must be >= 2 or None, got {max_cells}.")
    matrix = _as_matrix(protein_counts)
    n_cells, n_proteins = matrix.shape
    codes = _check_batch_codes(batch_codes, n_cells, n_batch)
    if protein_batch_mask is None:
        measured = np.ones((n_batch, n_proteins), dtype=bool)
    else:
        measured = np.asarray(protein_batch_mask, dtype=bool)
        if measured.shape != (n_batch, n_proteins):
            raise ValueError(
                f"protein_batch_mask must have shape (n_batch, n_proteins) = "
                f"{(n_batch, n_proteins)}, got {measured.shape}."
            )
    min_cells = max(int(min_cells), 2)

    rng = np.random.default_rng(seed)
    batch_cells = [np.flatnonzero(codes == s) for s in range(n_batch)]
    fit_cells = []  # positions within batch_cells[s] used for the fit
    for cells in batch_cells:
        if max_cells is not None and cells.size > max_cells:
            fit_cells.append(np.sort(rng.choice(cells.size, size=max_cells, replace=False)))
        else:
            fit_cells.append(np.arange(cells.size))
    has_cells = np.array([cells.size > 0 for cells in batch_cells])

    mean = np.zeros((n_proteins, n_batch))
    scale = np.ones((n_proteins, n_batch))
    donor = measured.T & has_cells  # (protein, batch) pairs with values of their own
    fallbacks = {"too few cells": [], "constant": [], "non-finite fit": []}
    for t in range(n_proteins):
        if not donor[t].any():
            continue
        column = _column(matrix, t)
        for s in np.flatnonzero(donor[t]):
            values = column[batch_cells[s]]
            reason = None
            if values.size < min_cells:
                reason = "too few cells"
            elif np.unique(values[np.isfinite(values)]).size < 2:
                reason = "constant"
            else:
                with np.errstate(all="ignore"):
                    x = np.log1p(values[fit_cells[s]])
                    x = x[np.isfinite(x)]
                    if x.size >= 2:
                        mixture = fit_gaussian_mixture_1d(x, 2)
                        fitted_mean = float(mixture.means[0])
                        fitted_scale = float(np.sqrt(mixture.variances[0]))
                    else:
                        fitted_mean = fitted_scale = np.nan
                if np.isfinite(fitted_mean) and np.isfinite(fitted_scale):
                    mean[t, s] = fitted_mean
                    scale[t, s] = np.clip(fitted_scale, min_scale, max_scale)
                else:
                    reason = "non-finite fit"
            if reason is not None:
                fallbacks[reason].append((t, s))
                mean[t, s] = _fallback_mean(values)
                scale[t, s] = FALLBACK_SCALE

    # Proteins not measured in a batch (or batches without cells) borrow the average of
    # the batches where they are measured; proteins measured nowhere keep 0 / 1.
    n_imputed = n_nowhere = 0
    for t in range(n_proteins):
        missing = ~donor[t]
        if not missing.any():
            continue
        if donor[t].any():
            mean[t, missing] = mean[t, donor[t]].mean()
            scale[t, missing] = scale[t, donor[t]].mean()
            n_imputed += int(missing.sum())
        else:
            n_nowhere += 1

    for reason, pairs in fallbacks.items():
        if pairs:
            logger.info(
                "Protein background prior: %d (protein, batch) pair(s) fell back to "
                "log1p(mean count) with scale %.1f (%s).", len(pairs), FALLBACK_SCALE, reason)
            logger.debug("Pairs (protein, batch) with fallback '%s': %s", reason, pairs)
    if n_imputed:
        logger.info(
            "Protein background prior: %d (protein, batch) pair(s) not measured (or batch "
            "without cells) took the average over the batches where the protein is measured.",
            n_imputed)
    if n_nowhere:
        logger.info(
            "Protein background prior: %d protein(s) measured in no batch got mean 0, scale 1.",
            n_nowhere)
    n_fitted = int(donor.sum()) - sum(len(pairs) for pairs in fallbacks.values())
    logger.debug("Protein background prior: %d (protein, batch) pair(s) fitted by a mixture.",
                 n_fitted)

    # Last guard: nothing above should produce a non-finite value, but the model's loss
    # turns NaN if one slips through, so replace it by the default prior.
    bad = ~(np.isfinite(mean) & np.isfinite(scale) & (scale > 0))
    if bad.any():  # pragma: no cover - defensive
        logger.warning("Protein background prior: %d non-finite value(s) replaced by mean 0, "
                       "scale 1.", int(bad.sum()))
        mean[bad], scale[bad] = 0.0, 1.0
    return mean.astype(np.float32), scale.astype(np.float32)
