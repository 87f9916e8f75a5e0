"""Agreement of differential expression on observed and generated counts.

The computation behind :meth:`PosteriorPredictiveCheck.differential_expression
<pyrovi.criticism.PosteriorPredictiveCheck.differential_expression>` (part of
:mod:`pyrovi.criticism`): one-vs-rest Wilcoxon rank-sum tests on the observed counts and on
each generated dataset, and the scores comparing their calls and log fold changes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pyrovi.criticism.stats import (
    Matrix,
    _safe_correlation,
    average_precision,
    benjamini_hochberg,
    log_normalize,
    roc_auc,
    wilcoxon_rank_sum,
)

logger = logging.getLogger(__name__)


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Mask of the ``n`` features with the largest ``|score|`` (stable for ties)."""
    mask = np.zeros(scores.size, dtype=bool)
    mask[np.argsort(-np.abs(scores), kind="stable")[:n]] = True
    return mask


def de_agreement(
    raw_counts: Matrix,
    samples: Mapping[str, Sequence[Matrix]],
    obs: pd.DataFrame,
    var_names: pd.Index,
    de_groupby: str,
    *,
    p_val_thresh: float,
    n_top_genes_fallback: int,
    cell_scale_factor: float,
    n_samples: int,
    groups: Sequence[str] | None,
    min_cells_per_group: int,
    tie_correct: bool,
    progress_bar: bool,
) -> dict:
    """One-vs-rest differential expression on raw and generated counts, and its agreement.

    See :meth:`pyrovi.criticism.PosteriorPredictiveCheck.differential_expression` for the
    definitions, the arguments and the errors raised.

    Parameters
    ----------
    raw_counts
        Observed cells × features counts.
    samples
        ``{model name: [cells × features matrix per generated sample]}``; the first
        ``n_samples`` of each model are tested.
    obs
        Annotations of the cells, with the column ``de_groupby``.
    var_names
        Feature names (the index of the log fold change and raw tables).
    de_groupby, p_val_thresh, n_top_genes_fallback, cell_scale_factor, n_samples, groups, \
min_cells_per_group, tie_correct
        As in :meth:`~pyrovi.criticism.PosteriorPredictiveCheck.differential_expression`.
    progress_bar
        Show a tqdm bar over the generated samples.

    Returns
    -------
    dict
        ``"summary"`` (one row per group and model), ``"lfc_per_model_per_group"``
        ``{model: {group: DataFrame(raw, approx)}}`` and ``"raw"`` ``{group: DataFrame}``.
    """
    column = obs[de_groupby]
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
    n_features = raw_counts.shape[1]
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

    raw_z, raw_padj, raw_lfc = run(raw_counts)
    raw_sets, fallback = {}, {}
    for k in tested:
        calls = raw_padj[k] < p_val_thresh
        fallback[k] = not 0 < calls.sum() <= 0.5 * n_features
        raw_sets[k] = _top(raw_z[k], n_top) if fallback[k] else calls
    rows: list[dict] = []
    lfc_store: dict[str, dict[str, pd.DataFrame]] = {}
    jobs = [(name, s) for name in samples for s in range(n_samples)]
    per_job: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for name, s in tqdm(jobs, desc="Differential expression",
                        disable=not progress_bar):
        per_job.setdefault(name, []).append(run(samples[name][s]))
    for name, results in per_job.items():
        lfc_store[name] = {}
        for k in tested:
            values = []
            for z, padj, lfc in results:
                truth = raw_sets[k]
                predicted = _top(z[k], n_top) if fallback[k] else padj[k] < p_val_thresh
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
                {"raw": raw_lfc[k], "approx": approx}, index=var_names)
    summary = pd.DataFrame(rows, columns=[
        "group", "model", "gene_f1", "lfc_mae", "lfc_pearson", "lfc_spearman", "roc_auc",
        "pr_auc", "n_cells", "n_de_raw", "fallback"])
    raw_tables = {
        categories[k]: pd.DataFrame({"scores": raw_z[k], "pvals_adj": raw_padj[k],
                                     "logfoldchanges": raw_lfc[k]}, index=var_names)
        for k in tested
    }
    return {"summary": summary, "lfc_per_model_per_group": lfc_store, "raw": raw_tables}
