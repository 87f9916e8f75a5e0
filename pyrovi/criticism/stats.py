"""Statistics of the posterior predictive checks, implemented without scanpy or scikit-learn.

The building blocks of :class:`~pyrovi.criticism.PosteriorPredictiveCheck` (part of
:mod:`pyrovi.criticism`): sparse-aware ``log1p`` normalization, a Wilcoxon rank-sum test of
every group against the rest, Benjamini–Hochberg correction, ROC AUC and average precision
(each tested against scipy / scikit-learn), and the summary statistics of stored count
matrices that the checks compare (coefficient of variation, fraction of zeros, interval
quantiles, agreement of two vectors). Public: :func:`wilcoxon_rank_sum`,
:func:`benjamini_hochberg`, :func:`log_normalize`, :func:`roc_auc`,
:func:`average_precision`, :class:`RankSumResult`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy import stats
from tqdm.auto import tqdm

__all__ = [
    "RankSumResult",
    "average_precision",
    "benjamini_hochberg",
    "log_normalize",
    "roc_auc",
    "wilcoxon_rank_sum",
]

#: Stored entries per gene chunk of the rank-sum test.
_RANK_CHUNK_ENTRIES = 2**23
#: Offset of scanpy's log fold changes, kept so that LFCs match ``rank_genes_groups``.
_LFC_EPS = 1e-9

Matrix = np.ndarray | sp.csr_matrix

# ---------------------------------------------------------------------------------------
# Statistical building blocks (public, tested against scipy / scikit-learn).
# ---------------------------------------------------------------------------------------


def log_normalize(counts, target_sum: float = 1e4) -> Matrix:
    """``log1p`` of counts scaled to ``target_sum`` per cell (scanpy's ``normalize_total``
    followed by ``log1p``).

    Cells without counts stay at zero. Sparse input stays sparse (CSR).

    Parameters
    ----------
    counts
        Cells × features counts, dense or scipy sparse.
    target_sum
        Total of every cell after scaling.

    Returns
    -------
    numpy.ndarray or scipy.sparse.csr_matrix
        float32 matrix of the same shape.

    Examples
    --------
    >>> log_normalize(np.array([[1.0, 3.0], [0.0, 0.0]]), target_sum=4.0)
    array([[0.6931472, 1.3862944],
           [0.       , 0.       ]], dtype=float32)
    """
    if sp.issparse(counts):
        matrix = sp.csr_matrix(counts, dtype=np.float32, copy=True)
        totals = np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()
        scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
        matrix.data *= np.repeat(scale, np.diff(matrix.indptr)).astype(np.float32)
        np.log1p(matrix.data, out=matrix.data)
        return matrix
    matrix = np.asarray(counts, dtype=np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    scale = np.divide(target_sum, totals, out=np.zeros_like(totals), where=totals > 0)
    return np.log1p(matrix * scale).astype(np.float32)


def benjamini_hochberg(pvals) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values along the last axis.

    ``p_adj_(i) = min_{j >= i} min(1, p_(j) · m / j)`` for the p-values sorted increasingly,
    ``m`` values per row (what scanpy's ``corr_method="benjamini-hochberg"`` and scipy's
    ``false_discovery_control`` compute).

    Parameters
    ----------
    pvals
        Array of p-values; each row along the last axis is corrected separately.

    Returns
    -------
    numpy.ndarray
        Adjusted p-values, same shape.

    Examples
    --------
    >>> benjamini_hochberg([0.01, 0.04, 0.03, 0.005, 0.5])
    array([0.025, 0.05 , 0.05 , 0.025, 0.5  ])
    """
    p = np.asarray(pvals, dtype=np.float64)
    if p.size == 0:
        return p.copy()
    m = p.shape[-1]
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1) * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[..., ::-1], axis=-1)[..., ::-1]
    adjusted = np.empty_like(p)
    np.put_along_axis(adjusted, order, np.minimum(ranked, 1.0), axis=-1)
    return adjusted


def roc_auc(truth, scores) -> float:
    """Area under the ROC curve (ties in ``scores`` count one half, as scikit-learn).

    Computed as the Mann–Whitney probability ``P(score_pos > score_neg) + ½ P(=)``.

    Parameters
    ----------
    truth
        Boolean labels.
    scores
        Predictions, higher meaning more likely positive.

    Returns
    -------
    float
        NaN when only one class is present.

    Examples
    --------
    >>> roc_auc([True, False, True], [0.9, 0.1, 0.4])
    1.0
    """
    truth = np.asarray(truth, dtype=bool)
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(scores, dtype=np.float64), method="average")
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(truth, scores) -> float:
    """Average precision, the area under the precision–recall step curve.

    ``AP = Σ_k (R_k − R_{k−1}) P_k`` over the distinct score thresholds in decreasing order
    (tied scores enter together), scikit-learn's ``average_precision_score``.

    Parameters
    ----------
    truth
        Boolean labels.
    scores
        Predictions, higher meaning more likely positive.

    Returns
    -------
    float
        NaN when there is no positive.

    Examples
    --------
    >>> average_precision([True, False, True], [0.9, 0.5, 0.1])
    0.8333333333333333
    """
    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(truth.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_truth = scores[order], truth[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), scores.size - 1]
    true_pos = np.cumsum(sorted_truth)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall_steps = np.diff(np.r_[0, true_pos]) / n_pos
    return float(np.sum(recall_steps * precision))


@dataclass
class RankSumResult:
    """Result of :func:`wilcoxon_rank_sum`: each group against all other (labelled) cells.

    Attributes
    ----------
    scores
        ``(n_groups, n_features)`` z-scores (positive: higher in the group).
    pvals
        Two-sided p-values of the normal approximation.
    means, rest_means
        Mean of each feature in the group and in the rest.
    n_cells
        Cells per group.
    """

    scores: np.ndarray
    pvals: np.ndarray
    means: np.ndarray
    rest_means: np.ndarray
    n_cells: np.ndarray

    def log_fold_changes(self, expm1: bool = True) -> np.ndarray:
        """log2 fold changes of the group over the rest, scanpy's definition.

        ``log2((expm1(mean_group) + 1e-9) / (expm1(mean_rest) + 1e-9))`` for means of
        log1p-normalized data (``expm1=True``), else ``log2`` of the ratio of the means.
        """
        group, rest = (np.expm1(self.means), np.expm1(self.rest_means)) if expm1 else (
            self.means, self.rest_means)
        return np.log2((group + _LFC_EPS) / (rest + _LFC_EPS))


def _gene_chunks(matrix, n_rows: int, max_entries: int) -> list[tuple[int, int]]:
    """Column ranges with at most ``max_entries`` stored entries each (at least 1 column)."""
    n_cols = matrix.shape[1]
    if sp.issparse(matrix):
        nnz = np.cumsum(np.diff(matrix.indptr))
    else:
        nnz = np.arange(1, n_cols + 1, dtype=np.int64) * max(n_rows, 1)
    bounds, start = [], 0
    while start < n_cols:
        done = nnz[start - 1] if start else 0
        stop = int(np.searchsorted(nnz, done + max_entries, side="right"))
        stop = max(stop, start + 1)
        bounds.append((start, stop))
        start = stop
    return bounds


def _rank_sums_chunk(block: sp.csc_matrix, codes: np.ndarray, group_sizes: np.ndarray):
    """Rank sums, tie terms and value sums of one gene chunk (CSC, cells × genes).

    Implicit zeros form one tie block ranked between the negative and positive entries;
    only stored entries are sorted.
    """
    n_cells, n_genes = block.shape
    n_groups = group_sizes.size
    nnz_per_col = np.diff(block.indptr)
    col = np.repeat(np.arange(n_genes), nnz_per_col)
    values = block.data.astype(np.float64)
    order = np.lexsort((values, col))
    sorted_values, sorted_col = values[order], col[order]
    n_entries = values.size
    new_run = np.ones(n_entries, dtype=bool)
    if n_entries > 1:
        new_run[1:] = ((sorted_col[1:] != sorted_col[:-1])
                       | (sorted_values[1:] != sorted_values[:-1]))
    starts = np.flatnonzero(new_run)
    lengths = np.diff(np.r_[starts, n_entries]).astype(np.float64)
    run_col = sorted_col[starts]
    n_zero = (n_cells - nnz_per_col).astype(np.float64)
    # Average 1-based rank among the column's stored entries, shifted past the zero block
    # for positive values.
    run_rank = (starts - block.indptr[run_col]).astype(np.float64) + (lengths + 1) / 2
    run_rank += np.where(sorted_values[starts] > 0, n_zero[run_col], 0.0)
    ranks = np.empty(n_entries, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, lengths.astype(np.int64))

    def counts(keys, weights, length):  # bincount is integer-typed for empty input
        return np.bincount(keys, weights=weights, minlength=length).astype(np.float64)

    zero_rank = counts(col, values < 0, n_genes) + (n_zero + 1) / 2
    ties = counts(run_col, lengths**3 - lengths, n_genes) + n_zero**3 - n_zero
    flat = codes[block.indices] * n_genes + col
    size = n_groups * n_genes
    rank_sum = counts(flat, ranks, size).reshape(n_groups, n_genes)
    stored = counts(flat, None, size).reshape(n_groups, n_genes)
    value_sum = counts(flat, values, size).reshape(n_groups, n_genes)
    rank_sum += (group_sizes[:, None] - stored) * zero_rank[None, :]
    return rank_sum, ties, value_sum


def wilcoxon_rank_sum(
    matrix,
    labels,
    n_groups: int | None = None,
    tie_correct: bool = True,
    max_chunk_entries: int = _RANK_CHUNK_ENTRIES,
    progress_bar: bool = False,
) -> RankSumResult:
    """Wilcoxon rank-sum (Mann–Whitney) test of every group against the rest, every feature.

    For group ``k`` with ``n1`` cells and ``n2 = n − n1`` others, ``R1`` the sum of the
    group's ranks among all ``n`` labelled cells (average ranks for ties),

    ``z = (R1 − n1 (n + 1) / 2) / sqrt(T · n1 n2 (n + 1) / 12)``,
    ``T = 1 − Σ_ties (t³ − t) / (n³ − n)`` (``T = 1`` without tie correction),

    and the two-sided p-value ``2 Φ(−|z|)`` of the normal approximation without continuity
    correction — scipy's ``mannwhitneyu(method="asymptotic", use_continuity=False)`` and
    scanpy's ``rank_genes_groups(method="wilcoxon", tie_correct=True)``. A feature whose
    values are all tied gets ``z = 0``, ``p = 1``.

    Ranks are computed once per feature (they do not depend on the group), over chunks of
    features; for sparse input only stored entries are sorted (the implicit zeros are one
    tie block), so memory and time scale with the number of non-zeros.

    Parameters
    ----------
    matrix
        Cells × features values (dense or scipy sparse).
    labels
        Integer group code of every cell, ``0 .. n_groups − 1``; negative codes leave the
        cell out of the test (in neither the group nor the rest).
    n_groups
        Number of groups (default: ``max(labels) + 1``).
    tie_correct
        Apply the tie correction ``T``.
    max_chunk_entries
        Stored entries per chunk of features (bounds memory).
    progress_bar
        Show a tqdm bar over chunks.

    Returns
    -------
    RankSumResult
        Scores, p-values, group and rest means and group sizes, ``(n_groups, n_features)``.

    Examples
    --------
    >>> x = np.array([[0.0, 1.0], [0.0, 2.0], [1.0, 3.0], [2.0, 4.0]])
    >>> result = wilcoxon_rank_sum(x, labels=np.array([0, 0, 1, 1]))
    >>> result.scores[1].round(3)  # group 1 against group 0
    array([1.633, 1.549])
    >>> padj = benjamini_hochberg(result.pvals)
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size != matrix.shape[0]:
        raise ValueError(f"labels must have one entry per cell ({matrix.shape[0]}), got shape "
                         f"{labels.shape}.")
    labels = labels.astype(np.int64)
    if n_groups is None:
        n_groups = int(labels.max()) + 1 if labels.size else 0
    if (labels >= n_groups).any():
        raise ValueError(f"labels must be below n_groups={n_groups}.")
    keep = labels >= 0
    if not keep.all():
        matrix = matrix[np.flatnonzero(keep)]
        labels = labels[keep]
    n_cells, n_features = matrix.shape
    group_sizes = np.bincount(labels, minlength=n_groups).astype(np.float64)
    if sp.issparse(matrix):
        matrix = sp.csc_matrix(matrix)
        matrix.sum_duplicates()
    rank_sum = np.zeros((n_groups, n_features))
    value_sum = np.zeros((n_groups, n_features))
    ties = np.zeros(n_features)
    chunks = _gene_chunks(matrix, n_cells, max_chunk_entries)
    for start, stop in tqdm(chunks, desc="Rank-sum test", disable=not progress_bar):
        block = sp.csc_matrix(matrix[:, start:stop], dtype=np.float64)
        block.eliminate_zeros()
        r, t, v = _rank_sums_chunk(block, labels, group_sizes)
        rank_sum[:, start:stop], ties[start:stop], value_sum[:, start:stop] = r, t, v

    n1 = group_sizes[:, None]
    n2 = n_cells - n1
    correction = 1.0 - ties / (float(n_cells) ** 3 - n_cells) if n_cells > 1 else np.ones(
        n_features)
    if not tie_correct:
        correction = np.ones(n_features)
    variance = np.clip(correction, 0.0, None)[None, :] * n1 * n2 * (n_cells + 1) / 12.0
    centred = rank_sum - n1 * (n_cells + 1) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(variance > 0, centred / np.sqrt(variance), 0.0)
        means = np.where(n1 > 0, value_sum / np.maximum(n1, 1), 0.0)
        rest_means = np.where(
            n2 > 0, (value_sum.sum(0, keepdims=True) - value_sum) / np.maximum(n2, 1), 0.0)
    pvals = 2.0 * stats.norm.sf(np.abs(scores))
    return RankSumResult(scores=scores, pvals=pvals, means=means, rest_means=rest_means,
                         n_cells=group_sizes.astype(np.int64))


# ---------------------------------------------------------------------------------------
# Summary statistics of stored matrices.
# ---------------------------------------------------------------------------------------


def _moments(matrix: Matrix, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and mean of squares along ``axis`` (float64)."""
    if sp.issparse(matrix):
        mean = np.asarray(matrix.mean(axis=axis, dtype=np.float64)).ravel()
        square = np.asarray(matrix.multiply(matrix).mean(axis=axis, dtype=np.float64)).ravel()
        return mean, square
    values = np.asarray(matrix, dtype=np.float64)
    return values.mean(axis=axis), np.square(values).mean(axis=axis)


def _coefficient_of_variation(matrix: Matrix, axis: int) -> np.ndarray:
    """Population standard deviation over mean along ``axis``; NaN where the mean is 0."""
    mean, square = _moments(matrix, axis)
    std = np.sqrt(np.clip(square - mean**2, 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, std / np.where(mean > 0, mean, 1.0), np.nan)


def _zero_fraction(matrix: Matrix) -> np.ndarray:
    """Fraction of zero entries of every column."""
    n_rows = matrix.shape[0]
    if sp.issparse(matrix):
        nonzero = np.asarray((matrix != 0).sum(axis=0)).ravel()
    else:
        nonzero = np.count_nonzero(np.asarray(matrix), axis=0)
    return 1.0 - nonzero / max(n_rows, 1)


def _interval_quantiles(block: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Quantiles along the last axis by linear interpolation (numpy's default method).

    Returns ``(len(levels), *block.shape[:-1])``.
    """
    ordered = np.sort(block, axis=-1)
    n = ordered.shape[-1]
    position = levels * (n - 1)
    low = np.floor(position).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    fraction = (position - low).astype(np.float32)
    lower = np.moveaxis(ordered[..., low], -1, 0)
    upper = np.moveaxis(ordered[..., high], -1, 0)
    shape = (-1,) + (1,) * (block.ndim - 1)
    return lower + fraction.reshape(shape) * (upper - lower)


def _stats_pair(model_values: np.ndarray, raw_values: np.ndarray) -> dict[str, float]:
    """MAE, Pearson, Spearman and the model-card R² of two vectors (NaN pairs dropped)."""
    keep = np.isfinite(model_values) & np.isfinite(raw_values)
    x, y = model_values[keep], raw_values[keep]
    out = {"mean_absolute_error": float("nan"), "pearson": float("nan"),
           "spearman": float("nan"), "r2": float("nan"), "n": int(keep.sum())}
    if x.size == 0:
        return out
    out["mean_absolute_error"] = float(np.mean(np.abs(x - y)))
    if x.size > 1:
        out["pearson"] = _safe_correlation("pearson", x, y)
        out["spearman"] = _safe_correlation("spearman", x, y)
        spread = np.sum((x - x.mean()) ** 2)
        if spread > 0:
            out["r2"] = float(1.0 - np.sum((x - y) ** 2) / spread)
    return out


def _safe_correlation(kind: str, x: np.ndarray, y: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            return float("nan")
        return float((stats.pearsonr if kind == "pearson" else stats.spearmanr)(x, y)[0])


def _as_matrix(values, sparse: bool, shape: tuple[int, int], what: str) -> Matrix:
    """A stored sample: CSR float32 without explicit zeros, or a dense float32 array."""
    if values.shape != shape:
        raise ValueError(f"{what} has shape {values.shape}; expected {shape} (cells × features).")
    if sparse:
        matrix = sp.csr_matrix(values, dtype=np.float32, copy=True)
        matrix.eliminate_zeros()
        matrix.sort_indices()
        return matrix
    return np.asarray(values.toarray() if sp.issparse(values) else values, dtype=np.float32)

