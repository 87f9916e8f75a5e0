"""Posterior predictive checks (PPC) of count models, as reported on scvi-hub model cards.

:class:`PosteriorPredictiveCheck` draws counts from each model's posterior predictive
distribution for the observed cells and compares summary statistics of the draws with the
same statistics of the observed counts:

- coefficient of variation of each cell (across features) or of each feature (across cells);
- fraction of zeros per feature;
- calibration of central posterior predictive intervals;
- agreement of a Wilcoxon rank-sum differential expression analysis (each group of cells
  against the rest) run on the observed counts and on generated counts.

It is pyrovi's own implementation of the checks of ``scvi.criticism.PosteriorPredictiveCheck``
(scvi-tools) with the same metric names; where a definition differs, the method's docstring
says how and why. The rank-sum test, Benjamini–Hochberg correction, ROC AUC and average
precision are implemented here (sparse-aware, no scanpy or scikit-learn at run time) and are
public: :func:`wilcoxon_rank_sum`, :func:`benjamini_hochberg`, :func:`log_normalize`,
:func:`roc_auc`, :func:`average_precision`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy import stats
from tqdm.auto import tqdm

from pyrovi.data.indices import cell_positions
from pyrovi.data.multimodal import is_mudata
from pyrovi.data.proteins import protein_matrix
from pyrovi.data.registry import counts_matrix

logger = logging.getLogger(__name__)

RAW = "Raw"
METRIC_CV_CELL = "cv_cell"
METRIC_CV_GENE = "cv_gene"
METRIC_ZERO_FRACTION = "zero_fraction"
METRIC_CALIBRATION = "calibration"
METRIC_DIFF_EXP = "diff_exp"

#: Quantile levels of scvi-tools' default intervals: central 95%, 90%, ..., 65% intervals.
DEFAULT_INTERVAL_LEVELS: tuple[float, ...] = (
    0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.825, 0.85, 0.875, 0.9, 0.925, 0.95, 0.975,
)

#: Elements (cells × features × samples) of one dense block (calibration, sampling chunks).
_BLOCK_ELEMENTS = 2**24
#: Stored entries per gene chunk of the rank-sum test.
_RANK_CHUNK_ENTRIES = 2**23
#: Offset of scanpy's log fold changes, kept so that LFCs match ``rank_genes_groups``.
_LFC_EPS = 1e-9

Dims = Literal["cells", "features"]
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


# ---------------------------------------------------------------------------------------
# The check itself.
# ---------------------------------------------------------------------------------------


class PosteriorPredictiveCheck:
    """Posterior predictive checks comparing count models with the observed counts.

    On construction, ``n_samples`` posterior predictive datasets are drawn from every model
    for the chosen cells (through the model's public ``posterior_predictive_sample``, in
    chunks of cells) and stored one matrix per sample: as scipy CSR matrices when the
    observed counts are sparse — never a dense cells × features × samples array — and as
    dense float32 arrays otherwise. Metrics are then computed with the methods below and
    stored in :attr:`metrics` under scvi-tools' keys (``"cv_cell"``, ``"cv_gene"``,
    ``"zero_fraction"``, ``"calibration"``, ``"diff_exp"``).

    Parameters
    ----------
    adata
        AnnData (or, for TOTALVI, the MuData it was set up with) holding the observed
        counts of the cells to check.
    models_dict
        ``{name: model}``: trained pyrovi models (SCVI, LDVAE, TOTALVI, ...) with the same
        features as ``adata``. ``"Raw"`` is reserved for the observed counts.
    n_samples
        Posterior predictive datasets drawn per model.
    indices
        Cells of ``adata`` to check (positions or a boolean mask), e.g. a model's
        ``train_indices`` or ``validation_indices``; default all.
    modality
        ``"rna"`` (default) checks genes; ``"protein"`` checks the protein counts of TOTALVI
        models (``posterior_predictive_sample`` returns genes then proteins; the protein
        columns are kept). Single-modality models accept only ``None``/``"rna"``.
    count_layer_key
        Where the observed counts are: an ``adata.layers`` key for RNA, an ``adata.obsm`` key
        for proteins; default the models' registered field.
    batch_size
        Cells per call to ``posterior_predictive_sample`` (default: as many as fit in
        ``2**24`` values of a cells × features × samples block).
    seed
        Seed for the draws (``pyro.set_rng_seed``); ``None`` leaves the RNG as it is.
    progress_bar
        Show tqdm bars (sampling, calibration, differential expression).

    Attributes
    ----------
    raw_counts
        Observed counts of the checked cells (CSR or dense float32).
    samples
        ``{model name: [cells × features matrix per sample]}``.
    obs
        ``adata.obs`` of the checked cells.
    var_names
        Feature names (genes, or proteins for ``modality="protein"``).
    metrics
        Computed metrics.

    Examples
    --------
    >>> ppc = PosteriorPredictiveCheck(adata, {"nb": model_nb, "poisson": model_poisson},
    ...                                n_samples=10, indices=model_nb.validation_indices)
    ... # doctest: +SKIP
    >>> ppc.coefficient_of_variation("features")  # cell-wise CV  # doctest: +SKIP
    >>> ppc.summary("cv_cell")  # doctest: +SKIP
    >>> ppc.differential_expression(de_groupby="cell_type")  # doctest: +SKIP
    """

    def __init__(
        self,
        adata,
        models_dict: Mapping[str, Any],
        *,
        n_samples: int = 10,
        indices: Sequence[int] | np.ndarray | None = None,
        modality: str | None = None,
        count_layer_key: str | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress_bar: bool = True,
    ):
        if not isinstance(models_dict, Mapping) or not models_dict:
            raise ValueError("models_dict must be a non-empty {name: model} mapping.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be at least 1, got {n_samples}.")
        names = [str(name) for name in models_dict]
        if RAW in names:
            raise ValueError(f"{RAW!r} is reserved for the observed counts; rename that model.")
        models = dict(zip(names, models_dict.values(), strict=True))
        first = next(iter(models.values()))
        flat = type(first)._as_anndata(adata) if is_mudata(adata) and hasattr(
            first, "_as_anndata") else adata
        if is_mudata(flat):
            raise ValueError("MuData input is supported for TOTALVI models set up with "
                             "setup_mudata; pass the AnnData of the modality otherwise.")
        modality = self._check_modality(modality, models)
        positions = cell_positions(indices, flat.n_obs)
        raw, var_names, columns = self._observed(flat, models, modality, count_layer_key)
        raw = raw[positions]
        sparse = sp.issparse(raw)
        raw = _as_matrix(raw, sparse, raw.shape, "The observed counts")
        self.models = models
        self.modality = modality
        self.count_layer_key = count_layer_key
        self.indices = positions
        self.progress_bar = progress_bar
        if seed is not None:
            import pyro

            pyro.set_rng_seed(seed)
        samples = {
            name: self._draw(name, model, adata, flat, positions, columns, n_samples, sparse,
                             batch_size)
            for name, model in models.items()
        }
        self._set_data(raw, samples, flat.obs.iloc[positions].copy(), var_names)

    # -- construction helpers ---------------------------------------------------------

    @staticmethod
    def _check_modality(modality: str | None, models: Mapping[str, Any]) -> str:
        if modality is None:
            return "rna"
        if modality not in ("rna", "protein"):
            raise ValueError(f"modality must be None, 'rna' or 'protein', got {modality!r}.")
        if modality == "protein":
            lacking = [name for name, model in models.items() if not model.registry.has_proteins]
            if lacking:
                raise ValueError(
                    f"modality='protein' needs models with protein counts (TOTALVI); "
                    f"{lacking} model(s) only RNA: use modality=None or 'rna' for them.")
        return modality

    @staticmethod
    def _observed(adata, models: Mapping[str, Any], modality: str, key: str | None):
        """Observed counts, feature names and the sample columns of the modality per model."""
        if modality == "rna":
            var_names = pd.Index(adata.var_names.astype(str))
            for name, model in models.items():
                model_names = pd.Index(pd.Index(model.var_names).astype(str))
                if not model_names.equals(var_names):
                    n_diff = len(model_names.symmetric_difference(var_names))
                    raise ValueError(
                        f"Model {name!r} has {len(model_names)} genes and adata "
                        f"{len(var_names)}; {n_diff} differ (or their order does). Subset "
                        "adata to the model's genes, in the model's order "
                        "(adata[:, model.var_names]).")
            layers = {getattr(m.registry, "layer", None) for m in models.values()}
            if key is None and len(layers) > 1:
                raise ValueError(f"The models read counts from different layers {layers}; "
                                 "pass count_layer_key=.")
            layer = key if key is not None else layers.pop()
            columns = {name: np.arange(len(var_names)) for name in models}
            return counts_matrix(adata, layer), var_names, columns
        first = next(iter(models.values()))
        proteins = pd.Index(pd.Index(first.protein_names).astype(str))
        for name, model in models.items():
            if not pd.Index(model.protein_names).astype(str).equals(proteins):
                raise ValueError(f"Model {name!r} has other proteins than "
                                 f"{next(iter(models))!r}: {list(model.protein_names)}.")
        obsm_key = key if key is not None else first.registry.protein_expression_obsm_key
        raw = protein_matrix(adata, obsm_key)
        stored = adata.obsm[obsm_key]
        if isinstance(stored, pd.DataFrame) and not pd.Index(
                stored.columns.astype(str)).equals(proteins):
            raise ValueError(f"The proteins of adata.obsm[{obsm_key!r}] "
                             f"({list(stored.columns)}) are not the models' {list(proteins)}.")
        if raw.shape[1] != len(proteins):
            raise ValueError(f"adata.obsm[{obsm_key!r}] has {raw.shape[1]} columns; the models "
                             f"have {len(proteins)} proteins.")
        columns = {name: model.registry.n_vars + np.arange(len(proteins))
                   for name, model in models.items()}
        return raw, proteins, columns

    def _draw(self, name, model, adata, flat, positions, columns, n_samples, sparse,
              batch_size) -> list[Matrix]:
        """Posterior predictive samples of one model, drawn in chunks of cells."""
        n_features = len(columns[name])
        width = getattr(model.registry, "n_vars", n_features) + (
            model.registry.n_proteins if model.registry.has_proteins else 0)
        if batch_size is None:
            batch_size = max(1, _BLOCK_ELEMENTS // max(1, width * n_samples))
        own = flat is model.adata or adata is getattr(model, "mdata", None)
        parts: list[list[Matrix]] = [[] for _ in range(n_samples)]
        starts = range(0, positions.size, batch_size)
        for start in tqdm(starts, desc=f"Sampling {name}", disable=not self.progress_bar):
            chunk = positions[start:start + batch_size]
            if own:
                draws = model.posterior_predictive_sample(
                    model.adata, indices=chunk, n_samples=n_samples,
                    batch_size=min(chunk.size, 1024))
            else:
                # Register only the chunk's cells with the model (validation is per call).
                draws = model.posterior_predictive_sample(
                    flat[chunk].copy(), n_samples=n_samples, batch_size=min(chunk.size, 1024))
            draws = np.asarray(draws)
            if draws.ndim == 2:
                draws = draws[..., None]
            if draws.shape[:2] != (chunk.size, width) or draws.shape[2] != n_samples:
                raise ValueError(f"Model {name!r} returned samples of shape {draws.shape}; "
                                 f"expected ({chunk.size}, {width}, {n_samples}).")
            draws = draws[:, columns[name], :]
            for s in range(n_samples):
                block = draws[:, :, s]
                parts[s].append(sp.csr_matrix(block, dtype=np.float32) if sparse
                                else block.astype(np.float32))
        stack = sp.vstack if sparse else np.vstack
        out = []
        for pieces in parts:
            matrix = stack(pieces, format="csr") if sparse else stack(pieces)
            if sparse:
                matrix.eliminate_zeros()
            out.append(matrix)
        return out

    def _set_data(self, raw: Matrix, samples: dict[str, list[Matrix]], obs: pd.DataFrame,
                  var_names: pd.Index) -> None:
        self.raw_counts = raw
        self.samples = samples
        self.obs = obs
        self.var_names = pd.Index(var_names)
        self.n_samples = len(next(iter(samples.values())))
        self.metrics: dict[str, Any] = {}

    @classmethod
    def from_samples(
        cls,
        raw_counts,
        samples: Mapping[str, Sequence | np.ndarray],
        *,
        obs: pd.DataFrame | None = None,
        var_names: Sequence[str] | None = None,
        progress_bar: bool = False,
    ) -> PosteriorPredictiveCheck:
        """A check from precomputed posterior predictive samples (no model needed).

        Parameters
        ----------
        raw_counts
            Observed cells × features counts (dense or scipy sparse). Sparse input keeps
            every sample sparse (CSR); dense input keeps them dense.
        samples
            ``{model name: samples}``: a list of cells × features matrices, or a cells ×
            features × samples array (what ``posterior_predictive_sample`` returns), the
            same number of samples for every model.
        obs
            Cell annotations (one row per cell; needed by :meth:`differential_expression`).
        var_names
            Feature names (default ``"0", "1", ...``).
        progress_bar
            Show tqdm bars.

        Returns
        -------
        PosteriorPredictiveCheck

        Examples
        --------
        >>> ppc = PosteriorPredictiveCheck.from_samples(counts, {"m": draws},
        ...                                             obs=adata.obs)  # doctest: +SKIP
        >>> ppc.zero_fraction()  # doctest: +SKIP
        """
        if not isinstance(samples, Mapping) or not samples:
            raise ValueError("samples must be a non-empty {name: samples} mapping.")
        sparse = sp.issparse(raw_counts)
        if not sparse:
            raw_counts = np.asarray(raw_counts)
        if raw_counts.ndim != 2:
            raise ValueError(f"raw_counts must be cells × features, got {raw_counts.shape}.")
        shape = tuple(raw_counts.shape)
        raw = _as_matrix(raw_counts, sparse, shape, "raw_counts")
        stored: dict[str, list[Matrix]] = {}
        for name, values in samples.items():
            if str(name) == RAW:
                raise ValueError(f"{RAW!r} is reserved for the observed counts.")
            if isinstance(values, np.ndarray):
                if values.ndim == 2:
                    values = [values]
                elif values.ndim == 3:
                    values = [values[:, :, s] for s in range(values.shape[2])]
                else:
                    raise ValueError(f"Samples of {name!r} must be 2-d or 3-d, got {values.ndim}.")
            stored[str(name)] = [_as_matrix(v, sparse, shape, f"A sample of {name!r}")
                                 for v in values]
        lengths = {len(v) for v in stored.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"Every model needs the same, positive number of samples; got "
                             f"{ {k: len(v) for k, v in stored.items()} }.")
        if obs is None:
            obs = pd.DataFrame(index=pd.Index([str(i) for i in range(shape[0])]))
        elif len(obs) != shape[0]:
            raise ValueError(f"obs has {len(obs)} rows for {shape[0]} cells.")
        if var_names is None:
            var_names = [str(i) for i in range(shape[1])]
        elif len(var_names) != shape[1]:
            raise ValueError(f"{len(var_names)} var_names for {shape[1]} features.")
        check = cls.__new__(cls)
        check.models = {}
        check.modality = None
        check.count_layer_key = None
        check.indices = np.arange(shape[0])
        check.progress_bar = progress_bar
        check._set_data(raw, stored, obs.copy(), pd.Index(var_names))
        return check

    def __repr__(self) -> str:
        kind = "sparse (CSR)" if sp.issparse(self.raw_counts) else "dense"
        return (f"PosteriorPredictiveCheck({self.raw_counts.shape[0]} cells × "
                f"{self.raw_counts.shape[1]} features, {kind}; models {list(self.samples)}; "
                f"{self.n_samples} samples; metrics {list(self.metrics)})")

    @property
    def model_names(self) -> list[str]:
        """Names of the checked models."""
        return list(self.samples)

    # -- metrics ----------------------------------------------------------------------

    def coefficient_of_variation(self, dim: Dims = "cells") -> pd.DataFrame:
        """Coefficient of variation (CV) of each cell or each feature, per model and raw.

        ``dim`` is the dimension the CV is computed **over**, as in scvi-tools:
        ``dim="features"`` gives one CV per cell (its values across features), stored as
        ``metrics["cv_cell"]``; ``dim="cells"`` gives one CV per feature (across cells),
        stored as ``metrics["cv_gene"]``.

        For each generated sample, ``CV = std / mean`` with the population standard
        deviation (ddof 0); the model's value is the mean over samples of the per-sample
        CVs, skipping samples where the cell/feature is all zero (CV undefined), as
        scvi-tools. The raw value is the CV of the observed counts, 0 when all zero (as
        scvi-tools). Differs from scvi-tools: a model value undefined in every sample is 0
        too (scvi-tools leaves NaN), so raw and model columns treat all-zero rows alike.

        Works on the stored matrices (sparse stays sparse).

        Parameters
        ----------
        dim
            ``"features"`` (cell-wise CV) or ``"cells"`` (feature-wise CV).

        Returns
        -------
        pandas.DataFrame
            Indexed by cell (``cv_cell``) or feature (``cv_gene``); one column per model and
            ``"Raw"``.

        Examples
        --------
        >>> ppc.coefficient_of_variation("features")  # doctest: +SKIP
        >>> ppc.metrics["cv_cell"].head()  # doctest: +SKIP
        """
        if dim not in ("cells", "features"):
            raise ValueError(f"dim must be 'cells' or 'features', got {dim!r}.")
        axis = 1 if dim == "features" else 0
        key = METRIC_CV_CELL if dim == "features" else METRIC_CV_GENE
        index = (pd.Index(self.obs.index, name="cells") if axis == 1
                 else pd.Index(self.var_names, name="features"))
        columns = {}
        for name, samples in self.samples.items():
            per_sample = np.stack([_coefficient_of_variation(s, axis) for s in samples])
            defined = np.isfinite(per_sample)
            total = np.where(defined, per_sample, 0.0).sum(0)
            count = defined.sum(0)
            columns[name] = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        columns[RAW] = np.nan_to_num(_coefficient_of_variation(self.raw_counts, axis))
        frame = pd.DataFrame(columns, index=index)
        self.metrics[key] = frame
        return frame

    def zero_fraction(self) -> pd.DataFrame:
        """Fraction of zero counts of every feature, per model (mean over samples) and raw.

        Differs from scvi-tools, whose ``zero_fraction`` computes the fraction of
        **non-zero** counts under this name; here it is the fraction of zeros, as named
        (one minus scvi-tools' values). The overall fraction of zeros is the mean of a
        column.

        Returns
        -------
        pandas.DataFrame
            Indexed by feature, one column per model and ``"Raw"``; stored as
            ``metrics["zero_fraction"]``.

        Examples
        --------
        >>> ppc.zero_fraction().mean()  # overall fraction of zeros  # doctest: +SKIP
        """
        columns = {name: np.mean([_zero_fraction(s) for s in samples], axis=0)
                   for name, samples in self.samples.items()}
        columns[RAW] = _zero_fraction(self.raw_counts)
        frame = pd.DataFrame(columns, index=pd.Index(self.var_names, name="features"))
        self.metrics[METRIC_ZERO_FRACTION] = frame
        return frame

    def calibration_error(
        self, confidence_intervals: Sequence[float] | None = None
    ) -> pd.DataFrame:
        """Calibration error of central posterior predictive intervals (lower is better).

        The quantile levels ``q_1 < ... < q_2K`` pair up from the outside in into central
        intervals ``[q_i, q_{2K+1−i}]`` of nominal level ``q_{2K+1−i} − q_i``. For every
        observed count (cell, feature), the interval's bounds are quantiles of that entry's
        ``n_samples`` generated values (linear interpolation, numpy's default, as xarray in
        scvi-tools); coverage is the fraction of entries with
        ``lower <= observed <= upper``, and the error is
        ``Σ_intervals (coverage − nominal)²``. Same definition as scvi-tools, computed for
        every model (scvi-tools' code always reads the model named ``"model1"``).

        This needs every entry's sample distribution: it builds dense cells × features ×
        samples blocks of at most ``2**24`` values, chunk by chunk over cells, so memory
        stays bounded for large sparse data.

        Parameters
        ----------
        confidence_intervals
            Increasing quantile levels in [0, 1], an even number of them; default
            scvi-tools' ``0.025, 0.05, ..., 0.175, 0.825, ..., 0.975`` (95% ... 65%).

        Returns
        -------
        pandas.DataFrame
            Indexed by model: ``calibration_error`` and ``coverage_<nominal>`` per interval;
            stored as ``metrics["calibration"]``.

        Examples
        --------
        >>> ppc.calibration_error()["calibration_error"]  # doctest: +SKIP
        """
        levels = np.asarray(DEFAULT_INTERVAL_LEVELS if confidence_intervals is None
                            else confidence_intervals, dtype=np.float64)
        if levels.ndim != 1 or levels.size == 0 or levels.size % 2:
            raise ValueError("confidence_intervals needs an even number of quantile levels "
                             "(lower and upper bound of each central interval).")
        if (levels < 0).any() or (levels > 1).any() or (np.diff(levels) < 0).any():
            raise ValueError("confidence_intervals must be increasing levels in [0, 1].")
        n_intervals = levels.size // 2
        nominal = levels[::-1][:n_intervals] - levels[:n_intervals]
        n_cells, n_features = self.raw_counts.shape
        rows = max(1, _BLOCK_ELEMENTS // max(1, n_features * self.n_samples))
        sparse = sp.issparse(self.raw_counts)
        records = {}
        for name, samples in self.samples.items():
            covered = np.zeros(n_intervals)
            starts = range(0, n_cells, rows)
            for start in tqdm(starts, desc=f"Calibration {name}", disable=not self.progress_bar):
                stop = min(start + rows, n_cells)
                block = np.stack([s[start:stop].toarray() if sparse else s[start:stop]
                                  for s in samples], axis=-1)
                raw = self.raw_counts[start:stop]
                raw = raw.toarray() if sparse else raw
                quantiles = _interval_quantiles(block, levels)
                for i in range(n_intervals):
                    inside = (raw >= quantiles[i]) & (raw <= quantiles[-1 - i])
                    covered[i] += np.count_nonzero(inside)
            coverage = covered / max(n_cells * n_features, 1)
            record = {"calibration_error": float(np.sum((coverage - nominal) ** 2))}
            record.update({f"coverage_{w:.3g}": c for w, c in zip(nominal, coverage,
                                                                   strict=True)})
            records[name] = record
        frame = pd.DataFrame.from_dict(records, orient="index")
        frame.index.name = "model"
        self.metrics[METRIC_CALIBRATION] = frame
        return frame

    def differential_expression(
        self,
        de_groupby: str,
        *,
        p_val_thresh: float = 0.001,
        n_top_genes_fallback: int = 100,
        cell_scale_factor: float = 1e4,
        n_samples: int = 1,
        groups: Sequence[str] | None = None,
        min_cells_per_group: int = 3,
        tie_correct: bool = True,
    ) -> pd.DataFrame:
        """Agreement of one-vs-rest differential expression on raw and generated counts.

        For every group ``g`` of ``obs[de_groupby]``: a Wilcoxon rank-sum test of the cells
        of ``g`` against all other labelled cells on ``log1p`` of counts scaled to
        ``cell_scale_factor`` per cell (:func:`log_normalize`, :func:`wilcoxon_rank_sum`,
        tie-corrected), Benjamini–Hochberg over features, log2 fold changes as scanpy
        (``log2((expm1(mean_g) + 1e-9) / (expm1(mean_rest) + 1e-9))``) — on the observed
        counts and on each of the first ``n_samples`` generated samples of every model.
        Per group and model (averaged over the samples):

        - ``gene_f1``: F1 score of the model's DE features against the raw data's. DE
          features: adjusted p < ``p_val_thresh``. When that gives the raw data no DE
          feature or more than half of the features (an uninformative set), both sets are
          instead the ``n_top_genes_fallback`` features with the largest ``|z|`` (then
          ``fallback`` is True for that row).
        - ``lfc_mae``, ``lfc_pearson``, ``lfc_spearman``: mean absolute difference and
          correlations of the model's log fold changes with the raw ones, all features.
        - ``roc_auc``, ``pr_auc``: ROC AUC and average precision of the model's ``|z|``
          as a predictor of the raw DE set (the same set as for ``gene_f1``).
        - ``n_cells``: cells in the group; ``n_de_raw``: raw DE features (p threshold).

        Differences from scvi-tools (``de_method="t-test"`` through scanpy; this is always
        the rank-sum test, without scanpy): scvi-tools' ``gene_f1`` always compares the top
        ``n_top_genes_fallback`` features, ranked by signed score (up-regulated only); here
        the thresholded sets are compared, as the ROC truth. ROC/PR use ``|z|`` (scvi-tools:
        the signed score against a two-sided truth, which penalises down-regulated features
        found by the model). ``n_top_genes_fallback`` is capped at 10% of the features as in
        scvi-tools. ``de_groupby`` is required (scvi-tools clusters with Leiden when
        ``None``). Cells without a label are left out of every test.

        Parameters
        ----------
        de_groupby
            ``obs`` column with the groups (e.g. cell types).
        p_val_thresh
            Adjusted p-value threshold of a DE call (scvi-hub model cards use 0.2).
        n_top_genes_fallback
            Size of the top-``|z|`` sets used when the threshold gives no usable raw set.
        cell_scale_factor
            Per-cell total after normalization.
        n_samples
            Generated samples per model to test (at most the stored ``n_samples``).
        groups
            Groups to report (default: every group with at least ``min_cells_per_group``
            cells; smaller ones are skipped with a warning). Every cell labelled with any
            group still takes part in the "rest".
        min_cells_per_group
            Fewest cells in a reported group and in its rest.
        tie_correct
            Tie correction of the rank-sum variance.

        Returns
        -------
        pandas.DataFrame
            One row per group and model: ``group``, ``model``, ``gene_f1``, ``lfc_mae``,
            ``lfc_pearson``, ``lfc_spearman``, ``roc_auc``, ``pr_auc``, ``n_cells``,
            ``n_de_raw``, ``fallback``. Stored with the per-group log fold changes and raw
            test results in ``metrics["diff_exp"]`` (``"summary"``,
            ``"lfc_per_model_per_group"`` ``{model: {group: DataFrame(raw, approx)}}``,
            ``"raw"`` ``{group: DataFrame}``).

        Raises
        ------
        KeyError
            ``de_groupby`` is not an ``obs`` column, or ``groups`` names an unknown group.
        ValueError
            Fewer than two groups, a requested group (or its rest) smaller than
            ``min_cells_per_group``, or no group large enough.

        Examples
        --------
        >>> ppc.differential_expression(de_groupby="cell_type", p_val_thresh=0.2)
        ... # doctest: +SKIP
        """
        if de_groupby not in self.obs.columns:
            raise KeyError(f"de_groupby={de_groupby!r} is not a column of adata.obs "
                           f"(columns: {list(self.obs.columns)}).")
        if n_samples < 1 or n_samples > self.n_samples:
            raise ValueError(f"n_samples={n_samples} must be between 1 and the "
                             f"{self.n_samples} samples stored.")
        column = self.obs[de_groupby]
        if isinstance(column.dtype, pd.CategoricalDtype):
            categories = [str(c) for c in column.cat.categories]
            labels = column.cat.codes.to_numpy().astype(np.int64)
        else:
            present = column.notna().to_numpy()
            values = column.astype(str).to_numpy()
            categories = sorted(set(values[present]))
            lookup = {c: i for i, c in enumerate(categories)}
            labels = np.array([lookup[v] if ok else -1 for v, ok in zip(values, present,
                                                                         strict=True)])
        sizes = np.bincount(labels[labels >= 0], minlength=len(categories))
        n_labelled = int(sizes.sum())
        if np.count_nonzero(sizes) < 2:
            raise ValueError(f"obs[{de_groupby!r}] has fewer than two groups among the checked "
                             f"cells ({dict(zip(categories, sizes.tolist(), strict=True))}).")

        def too_small(k: int) -> bool:
            return sizes[k] < min_cells_per_group or n_labelled - sizes[k] < min_cells_per_group

        if groups is None:
            tested = [k for k in range(len(categories)) if sizes[k] > 0 and not too_small(k)]
            skipped = [categories[k] for k in range(len(categories))
                       if sizes[k] > 0 and too_small(k)]
            if skipped:
                logger.warning("Skipping group(s) with fewer than %d cells (or rest): %s",
                               min_cells_per_group, skipped)
            if not tested:
                raise ValueError(f"No group of obs[{de_groupby!r}] has at least "
                                 f"{min_cells_per_group} cells (and as many in the rest).")
        else:
            unknown = [g for g in groups if str(g) not in categories]
            if unknown:
                raise KeyError(f"Group(s) {unknown} not in obs[{de_groupby!r}] "
                               f"(groups: {categories}).")
            tested = [categories.index(str(g)) for g in groups]
            small = [categories[k] for k in tested if too_small(k)]
            if small:
                raise ValueError(
                    f"Group(s) {small} of obs[{de_groupby!r}] have fewer than "
                    f"{min_cells_per_group} cells, or leave fewer in the rest "
                    f"(sizes {dict(zip(categories, sizes.tolist(), strict=True))}); lower "
                    "min_cells_per_group or leave them out of groups.")
        n_features = self.raw_counts.shape[1]
        n_top = int(n_top_genes_fallback)
        if 10 * n_top > n_features:
            n_top = max(1, int(0.1 * n_features))
            logger.warning("n_top_genes_fallback=%d is more than 10%% of the %d features; "
                           "using %d.", n_top_genes_fallback, n_features, n_top)

        def run(counts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            result = wilcoxon_rank_sum(log_normalize(counts, cell_scale_factor), labels,
                                       len(categories), tie_correct=tie_correct)
            return (result.scores, benjamini_hochberg(result.pvals),
                    result.log_fold_changes())

        raw_z, raw_padj, raw_lfc = run(self.raw_counts)
        raw_sets, fallback = {}, {}
        for k in tested:
            calls = raw_padj[k] < p_val_thresh
            fallback[k] = not 0 < calls.sum() <= 0.5 * n_features
            raw_sets[k] = self._top(raw_z[k], n_top) if fallback[k] else calls
        rows: list[dict] = []
        lfc_store: dict[str, dict[str, pd.DataFrame]] = {}
        jobs = [(name, s) for name in self.samples for s in range(n_samples)]
        per_job: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        for name, s in tqdm(jobs, desc="Differential expression",
                            disable=not self.progress_bar):
            per_job.setdefault(name, []).append(run(self.samples[name][s]))
        for name, results in per_job.items():
            lfc_store[name] = {}
            for k in tested:
                values = []
                for z, padj, lfc in results:
                    truth = raw_sets[k]
                    predicted = self._top(z[k], n_top) if fallback[k] else padj[k] < p_val_thresh
                    overlap = np.count_nonzero(truth & predicted)
                    denominator = truth.sum() + predicted.sum()
                    values.append({
                        "gene_f1": 2.0 * overlap / denominator if denominator else float("nan"),
                        "lfc_mae": float(np.mean(np.abs(lfc[k] - raw_lfc[k]))),
                        "lfc_pearson": _safe_correlation("pearson", lfc[k], raw_lfc[k]),
                        "lfc_spearman": _safe_correlation("spearman", lfc[k], raw_lfc[k]),
                        "roc_auc": roc_auc(truth, np.abs(z[k])),
                        "pr_auc": average_precision(truth, np.abs(z[k])),
                    })
                row = {"group": categories[k], "model": name}
                row.update(pd.DataFrame(values).mean().to_dict())
                row.update(n_cells=int(sizes[k]), n_de_raw=int((raw_padj[k] < p_val_thresh).sum()),
                           fallback=bool(fallback[k]))
                rows.append(row)
                approx = np.mean([lfc[k] for _, _, lfc in results], axis=0)
                lfc_store[name][categories[k]] = pd.DataFrame(
                    {"raw": raw_lfc[k], "approx": approx}, index=self.var_names)
        summary = pd.DataFrame(rows, columns=[
            "group", "model", "gene_f1", "lfc_mae", "lfc_pearson", "lfc_spearman", "roc_auc",
            "pr_auc", "n_cells", "n_de_raw", "fallback"])
        raw_tables = {
            categories[k]: pd.DataFrame({"scores": raw_z[k], "pvals_adj": raw_padj[k],
                                         "logfoldchanges": raw_lfc[k]}, index=self.var_names)
            for k in tested
        }
        self.metrics[METRIC_DIFF_EXP] = {"summary": summary, "lfc_per_model_per_group": lfc_store,
                                         "raw": raw_tables}
        return summary

    @staticmethod
    def _top(scores: np.ndarray, n: int) -> np.ndarray:
        """Mask of the ``n`` features with the largest ``|score|`` (stable for ties)."""
        mask = np.zeros(scores.size, dtype=bool)
        mask[np.argsort(-np.abs(scores), kind="stable")[:n]] = True
        return mask

    def summary(
        self, metric: str = METRIC_CV_CELL, indices: Sequence[int] | np.ndarray | None = None
    ) -> pd.DataFrame:
        """Tidy comparison of each model with the raw data for one metric.

        For ``"cv_cell"``, ``"cv_gene"`` and ``"zero_fraction"`` (computed first if needed),
        each model's column ``m`` is compared with the ``"Raw"`` column ``r``:
        ``mean_absolute_error`` ``mean |m − r|``, ``pearson`` and ``spearman`` correlations,
        and ``r2`` as on scvi-hub model cards, which call scikit-learn's
        ``r2_score(model_values, raw_values)``: ``R² = 1 − Σ (r − m)² / Σ (m − mean m)²``,
        i.e. the model's values in the role of the reference (not the usual "raw as truth"
        R²; kept so that pyrovi's cards read like scvi-hub's; NaN when the model's values
        are constant, as are correlations with a constant column). ``n``: values compared
        (pairs with a NaN are dropped). For ``"calibration"`` and ``"diff_exp"`` the stored
        table is returned.

        Parameters
        ----------
        metric
            ``"cv_cell"``, ``"cv_gene"``, ``"zero_fraction"``, ``"calibration"`` or
            ``"diff_exp"``.
        indices
            For ``"cv_cell"`` only: positions among the checked cells to summarise (e.g. a
            model's ``train_indices`` when the check covers every cell), as model cards
            split training and validation cells.

        Returns
        -------
        pandas.DataFrame
            Indexed by model.

        Examples
        --------
        >>> ppc.summary("cv_gene")  # doctest: +SKIP
        """
        computed = {
            METRIC_CV_CELL: lambda: self.coefficient_of_variation("features"),
            METRIC_CV_GENE: lambda: self.coefficient_of_variation("cells"),
            METRIC_ZERO_FRACTION: self.zero_fraction,
            METRIC_CALIBRATION: self.calibration_error,
        }
        if metric == METRIC_DIFF_EXP:
            if metric not in self.metrics:
                raise KeyError("Run differential_expression(de_groupby=...) first.")
            return self.metrics[metric]["summary"]
        if metric not in computed:
            raise ValueError(f"metric must be one of {[*computed, METRIC_DIFF_EXP]}, got "
                             f"{metric!r}.")
        frame = self.metrics[metric] if metric in self.metrics else computed[metric]()
        if metric == METRIC_CALIBRATION:
            return frame
        if indices is not None:
            if metric != METRIC_CV_CELL:
                raise ValueError("indices selects cells: only for metric='cv_cell'.")
            frame = frame.iloc[cell_positions(indices, len(frame))]
        raw = frame[RAW].to_numpy(dtype=np.float64)
        table = pd.DataFrame.from_dict(
            {name: _stats_pair(frame[name].to_numpy(dtype=np.float64), raw)
             for name in self.samples}, orient="index")
        table.index.name = "model"
        return table
