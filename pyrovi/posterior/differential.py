"""Bayesian differential expression from posterior samples of normalized expression.

Two groups of cells are compared through samples of their normalized expression ``rho``
(one posterior draw of the latent per sampled cell, so the samples describe the whole
population, not one cell): the ``"vanilla"`` mode of Lopez et al. (2018) tests
``rho_1 > rho_2``; the ``"change"`` mode of Boyeau et al. (2019) tests whether the log fold
change ``log2 rho_1 − log2 rho_2`` falls outside ``[−delta, delta]``. Output columns are
those of scvi-tools' ``differential_expression``, so results and notebooks port over.

Nothing here knows which model produced the samples: a model supplies a function that
draws normalized expression for given cells (optionally decoded in a given batch).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from pyrovi._gaussian_mixture import fit_gaussian_mixture_1d
from pyrovi.data.ondisk import OnDiskMatrix, is_on_disk
from pyrovi.data.registry import categories_of
from pyrovi.data.validation import cell_totals

logger = logging.getLogger(__name__)

DE_MODES = ("vanilla", "change")
#: Keeps log Bayes factors finite when a probability is exactly 0 or 1 (as scvi-tools).
_EPS = 1e-8

#: ``sampler(cell_positions, batch_code)`` -> ``(len(cell_positions), n_features)`` array of
#: normalized expression, one posterior draw per position; ``batch_code=None`` decodes
#: each cell in its own batch.
ScaleSampler = Callable[[np.ndarray, "int | None"], np.ndarray]


@dataclass
class ScaleSamples:
    """Posterior samples of normalized expression for one group of cells.

    Attributes
    ----------
    scale
        ``(n_draws, n_features)``.
    batch
        ``(n_draws,)`` code of the batch each draw was decoded in (-1: the cell's own).
    """

    scale: np.ndarray
    batch: np.ndarray


def sample_group_scales(
    sampler: ScaleSampler,
    cells: np.ndarray,
    n_samples: int,
    batch_codes: Sequence[int | None],
    rng: np.random.Generator,
) -> ScaleSamples:
    """Draw ``n_samples`` normalized-expression samples for a group of cells.

    Cells are drawn at random with replacement, each contributing one posterior draw, so
    the samples follow the group's population distribution. With several ``batch_codes``
    (batch correction) the samples are split evenly between them.

    Parameters
    ----------
    sampler
        The model's sampler (see :data:`ScaleSampler`).
    cells
        Positions of the group's cells.
    n_samples
        Total number of draws for the group.
    batch_codes
        Batches to decode in; ``[None]`` keeps each cell's own batch.
    rng
        Random generator for the choice of cells.

    Returns
    -------
    ScaleSamples
    """
    per_batch = max(n_samples // len(batch_codes), 2)
    scales, batches = [], []
    for code in batch_codes:
        picks = rng.choice(cells, size=per_batch, replace=True)
        scales.append(np.asarray(sampler(picks, code)))
        batches.append(np.full(per_batch, -1 if code is None else code))
    return ScaleSamples(np.concatenate(scales), np.concatenate(batches))


def paired_draws(
    first: ScaleSamples,
    second: ScaleSamples,
    use_permutation: bool,
    m_permutation: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair samples of the two groups, within the same decoding batch when both share them.

    With ``use_permutation`` draw ``m_permutation`` random pairs (per batch, split evenly);
    otherwise pair the i-th samples of each group.
    """
    shared = set(np.unique(first.batch)) == set(np.unique(second.batch))
    groups = sorted(np.unique(first.batch)) if shared else [None]
    left, right = [], []
    for code in groups:
        a = first.scale if code is None else first.scale[first.batch == code]
        b = second.scale if code is None else second.scale[second.batch == code]
        if use_permutation:
            m = max(m_permutation // len(groups), 1)
            a, b = a[rng.integers(len(a), size=m)], b[rng.integers(len(b), size=m)]
        else:
            n = min(len(a), len(b))
            a, b = a[:n], b[:n]
        left.append(a)
        right.append(b)
    return np.concatenate(left), np.concatenate(right)


def estimate_pseudocounts(
    scale1: np.ndarray,
    scale2: np.ndarray,
    unexpressed1: np.ndarray,
    unexpressed2: np.ndarray,
    quantile: float = 0.9,
) -> float:
    """Pseudocount that shrinks the fold changes of unexpressed genes towards zero.

    The model gives every gene some expression, even one never observed in a group; the
    offset is the ``quantile`` of the largest sampled ``rho`` among such genes (the larger of
    the two groups), divided by the number of genes, as in scvi-tools.

    Parameters
    ----------
    scale1, scale2
        ``(n_draws, n_features)`` samples of normalized expression.
    unexpressed1, unexpressed2
        Boolean masks of features (nearly) without observed counts in each group.
    quantile
        Quantile of the unexpressed features' largest samples.

    Returns
    -------
    float
        At least ``1e-10``.
    """
    offsets = [1e-10]
    for scale, unexpressed in ((scale1, unexpressed1), (scale2, unexpressed2)):
        if unexpressed.any():
            offsets.append(float(np.quantile(scale.max(0)[unexpressed], quantile)))
    return max(1e-10, max(offsets) / scale1.shape[1])


def estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_delta: float = 0.1,
                   n_iter: int = 200) -> float:
    """Data-driven LFC threshold from the spread of mean log fold changes across genes.

    Fits a three-component Gaussian mixture (down, null, up) to the per-gene mean LFCs and
    returns ``coef`` times the mean absolute location of the outer components, at
    least ``min_delta`` (the rule of scvi-tools' ``delta=None``).

    Parameters
    ----------
    lfc_means
        Mean LFC per gene, 1-d.
    coef, min_delta
        Scale of the outer modes and lower bound of the result.
    n_iter
        EM iterations.

    Returns
    -------
    float
    """
    x = np.asarray(lfc_means, dtype=np.float64).ravel()
    if x.size < 3 or np.ptp(x) == 0:
        return float(min_delta)
    means = fit_gaussian_mixture_1d(x, 3, n_iter=n_iter).means
    return float(max(min_delta, coef * np.abs(means[[0, -1]]).mean()))


def fdr_de_prediction(proba_de: np.ndarray | pd.Series, fdr: float = 0.05) -> np.ndarray:
    """Flag the largest set of features whose posterior expected FDR is at most ``fdr``.

    Features are ranked by ``proba_de``; the expected false discovery rate of the top ``d``
    is the mean of ``1 − proba_de`` over them, and the top ``d`` with the largest such ``d``
    are called DE.

    Parameters
    ----------
    proba_de
        Posterior probability of differential expression per feature.
    fdr
        Target posterior expected FDR.

    Returns
    -------
    numpy.ndarray
        Boolean, in the input order.

    Examples
    --------
    >>> fdr_de_prediction(np.array([0.99, 0.2, 0.97, 0.9]), fdr=0.05).tolist()
    [True, False, True, True]
    """
    proba = np.asarray(proba_de, dtype=np.float64)
    order = np.argsort(-proba, kind="stable")
    expected_fdr = np.cumsum(1.0 - proba[order]) / np.arange(1, proba.size + 1)
    n_de = int((expected_fdr <= fdr).sum())  # expected_fdr is non-decreasing
    flags = np.zeros(proba.size, dtype=bool)
    flags[order[:n_de]] = True
    return flags


def bayes_factors(
    scale1: np.ndarray,
    scale2: np.ndarray,
    mode: str = "change",
    delta: float | None = 0.25,
    pseudocounts: float = 0.0,
    test_mode: str = "three",
) -> dict[str, np.ndarray | float]:
    """Posterior DE statistics from paired samples of the two groups.

    Parameters
    ----------
    scale1, scale2
        Paired ``(n_pairs, n_features)`` samples of normalized expression.
    mode
        ``"vanilla"``: ``proba_m1 = P(rho_1 > rho_2)``. ``"change"``: with
        ``lfc = log2(rho_1 + pc) − log2(rho_2 + pc)``, ``proba_de = max(P(lfc ≥ delta),
        P(lfc < −delta))`` (``test_mode="three"``) or their sum (``"two"``).
    delta
        LFC threshold (``None``: :func:`estimate_delta`).
    pseudocounts
        Offset ``pc`` added to both groups before the log.
    test_mode
        ``"three"`` (up and down regulation tested separately) or ``"two"``.

    Returns
    -------
    dict
        vanilla: ``proba_m1``, ``proba_m2``, ``bayes_factor``, ``scale1``, ``scale2``;
        change: ``proba_de``, ``proba_not_de``, ``bayes_factor``, ``scale1``, ``scale2``,
        ``pseudocounts``, ``delta``, ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``,
        ``lfc_max``. The Bayes factor is the log posterior odds of the tested hypothesis.
    """
    if mode not in DE_MODES:
        raise ValueError(f"mode must be one of {DE_MODES}, got {mode!r}.")
    means = {"scale1": scale1.mean(0), "scale2": scale2.mean(0)}
    if mode == "vanilla":
        proba_m1 = (scale1 > scale2).mean(0)
        return {
            "proba_m1": proba_m1,
            "proba_m2": 1.0 - proba_m1,
            "bayes_factor": np.log(proba_m1 + _EPS) - np.log(1.0 - proba_m1 + _EPS),
            **means,
        }
    if test_mode not in ("two", "three"):
        raise ValueError(f"test_mode must be 'two' or 'three', got {test_mode!r}.")
    lfc = np.log2(scale1 + pseudocounts) - np.log2(scale2 + pseudocounts)
    if delta is None:
        delta = estimate_delta(lfc.mean(0))
    up, down = (lfc >= delta).mean(0), (lfc < -delta).mean(0)
    proba_de = up + down if test_mode == "two" else np.maximum(up, down)
    # The summary of the LFC itself uses a much smaller offset, so that the pseudocount
    # stabilises the test without shrinking the reported effect sizes (as scvi-tools).
    effect = np.log2(scale1 + 1e-3 * pseudocounts) - np.log2(scale2 + 1e-3 * pseudocounts)
    return {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": np.log(proba_de + _EPS) - np.log(1.0 - proba_de + _EPS),
        **means,
        "pseudocounts": pseudocounts,
        "delta": delta,
        "lfc_mean": effect.mean(0),
        "lfc_median": np.median(effect, 0),
        "lfc_std": effect.std(0),
        "lfc_min": effect.min(0),
        "lfc_max": effect.max(0),
    }


def raw_counts_properties(
    counts, cells1: np.ndarray, cells2: np.ndarray, totals: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-feature summaries of the observed counts of two groups (scvi-tools' ``all_stats``).

    Parameters
    ----------
    counts
        Cells × features counts (dense or sparse).
    cells1, cells2
        Positions of the two groups' cells.
    totals
        Total counts per cell, when already known (several comparisons on one matrix).

    Returns
    -------
    dict
        ``raw_mean1/2`` (mean counts), ``non_zeros_proportion1/2`` (fraction of cells with a
        count), ``raw_normalized_mean1/2`` (mean counts per 10k counts of each cell).
    """
    counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
    if totals is None:
        totals = cell_totals(counts)
    scaling = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64),
                        where=totals > 0)[:, None]
    stats: dict[str, list[np.ndarray]] = {
        "raw_mean": [], "non_zeros_proportion": [], "raw_normalized_mean": []
    }
    for cells in (cells1, cells2):
        block = counts[cells]
        normalized = (block.multiply(scaling[cells]) if sp.issparse(block)
                      else block * scaling[cells])
        for name, matrix in (("raw_mean", block), ("non_zeros_proportion", block != 0),
                             ("raw_normalized_mean", normalized)):
            stats[name].append(np.asarray(matrix.mean(axis=0), dtype=np.float64).ravel())
    # Column order as in scvi-tools: raw_mean1, raw_mean2, non_zeros_proportion1, ...
    return {f"{name}{i + 1}": values[i] for name, values in stats.items() for i in range(2)}


def streamed_raw_counts_properties(
    counts, groups: Sequence[tuple[np.ndarray, np.ndarray]]
) -> list[dict[str, np.ndarray]]:
    """:func:`raw_counts_properties` of several comparisons in one pass over counts on disk.

    Gathering a group's rows would load the matrix for a one-versus-rest comparison; instead
    each block of rows adds its members' counts to every group's sums (a sparse indicator
    product), so memory holds one block and ``3 × n_groups`` feature vectors.

    Parameters
    ----------
    counts
        A count matrix on disk (see :mod:`pyrovi.data.ondisk`).
    groups
        ``(cells1, cells2)`` positions of each comparison.

    Returns
    -------
    list of dict
        One :func:`raw_counts_properties` result per comparison.
    """
    matrix = OnDiskMatrix.of(counts)
    cells = [np.sort(np.asarray(c, dtype=np.int64)) for pair in groups for c in pair]
    sums = {name: np.zeros((len(cells), matrix.shape[1]))
            for name in ("raw_mean", "non_zeros_proportion", "raw_normalized_mean")}
    for start, block in matrix.row_blocks():
        stop = start + block.shape[0]
        rows, members = [], []
        for g, positions in enumerate(cells):
            inside = positions[np.searchsorted(positions, start):
                               np.searchsorted(positions, stop)] - start
            rows.append(np.full(inside.size, g))
            members.append(inside)
        # Repeated positions count as often as they appear, as rows gathered in memory do.
        indicator = sp.csr_matrix(
            (np.ones(sum(m.size for m in members)), (np.concatenate(rows),
                                                      np.concatenate(members))),
            shape=(len(cells), block.shape[0]))
        block = sp.csr_matrix(block, dtype=np.float64)
        totals = np.asarray(block.sum(axis=1)).ravel()
        scaling = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        for name, values in (("raw_mean", block), ("non_zeros_proportion", block != 0),
                             ("raw_normalized_mean", sp.diags(scaling) @ block)):
            sums[name] += (indicator @ values).toarray()
    sizes = np.array([c.size for c in cells], dtype=np.float64)[:, None]
    means = {name: total / sizes for name, total in sums.items()}
    return [{f"{name}{i + 1}": means[name][2 * k + i] for name in means for i in range(2)}
            for k in range(len(groups))]


@dataclass
class Comparison:
    """One comparison: cell positions of both groups and the names reported for them."""

    cells1: np.ndarray
    cells2: np.ndarray
    group1: str | None = None
    group2: str | None = None


def _positions(selection, obs: pd.DataFrame, name: str) -> np.ndarray:
    """Cell positions from a boolean mask, integer positions, obs names or an obs query."""
    if isinstance(selection, str):
        selection = obs.index.get_indexer(obs.query(selection).index)
    selection = np.asarray(selection)
    if selection.dtype == bool:
        if selection.shape != (len(obs),):
            raise ValueError(
                f"{name} is a boolean mask of length {selection.size}; it must have one entry "
                f"per cell ({len(obs)})."
            )
        return np.flatnonzero(selection)
    if selection.dtype.kind in "OUS":
        positions = obs.index.get_indexer(selection)
        if (positions < 0).any():
            raise KeyError(f"{name}: cell names not in adata.obs_names: "
                           f"{list(selection[positions < 0][:5])}.")
        return positions
    if selection.size and (selection.min() < 0 or selection.max() >= len(obs)):
        raise IndexError(f"{name} has positions outside 0..{len(obs) - 1}.")
    return selection.astype(np.int64)


def plan_comparisons(
    obs: pd.DataFrame,
    groupby: str | None = None,
    group1: str | Sequence[str] | None = None,
    group2: str | None = None,
    idx1=None,
    idx2=None,
) -> list[Comparison]:
    """Turn scvi-tools' group arguments into a list of :class:`Comparison`.

    ``groupby`` with ``group1=None`` compares each group of ``obs[groupby]`` with all other
    cells; ``group1`` (one name or several) compares those groups with ``group2`` (default:
    the rest). Without ``groupby``, ``idx1`` (mask, positions, obs names or a
    ``DataFrame.query`` string) is compared with ``idx2`` (default: the rest).

    Raises
    ------
    KeyError
        For a missing ``obs`` column or a group name that is not in it.
    ValueError
        For inconsistent arguments or an empty group.
    """
    comparisons = []
    if idx1 is not None:
        cells1 = _positions(idx1, obs, "idx1")
        if idx2 is None:
            cells2 = np.setdiff1d(np.arange(len(obs)), cells1)
        else:
            cells2 = _positions(idx2, obs, "idx2")
        comparisons.append(Comparison(cells1, cells2))
    else:
        if groupby is None:
            raise ValueError("Pass groupby= (an adata.obs column) or idx1= (cells of group 1).")
        if groupby not in obs.columns:
            raise KeyError(
                f"groupby={groupby!r} is not a column of adata.obs. Available columns: "
                f"{list(obs.columns)}."
            )
        labels = obs[groupby].astype(str).to_numpy()
        present = categories_of(obs[groupby])
        if group1 is None:
            if len(present) < 2:
                raise ValueError(f"adata.obs[{groupby!r}] has a single group; nothing to compare.")
            group1 = present
        elif isinstance(group1, str) or not isinstance(group1, Sequence):
            group1 = [group1]
        for g in [*group1, *([] if group2 is None else [group2])]:
            if str(g) not in present:
                raise KeyError(
                    f"Group {g!r} is not in adata.obs[{groupby!r}] (groups: {present})."
                )
        for g in group1:
            cells1 = np.flatnonzero(labels == str(g))
            rest = labels != str(g) if group2 is None else labels == str(group2)
            comparisons.append(Comparison(cells1, np.flatnonzero(rest), str(g),
                                          "Rest" if group2 is None else str(group2)))
    for c in comparisons:
        if c.cells1.size == 0 or c.cells2.size == 0:
            which = "group1" if c.cells1.size == 0 else "group2"
            raise ValueError(f"The {which} of comparison {c.group1} vs {c.group2} has no cells.")
    return comparisons


def differential_expression(
    sampler: ScaleSampler,
    counts,
    obs: pd.DataFrame,
    feature_names: Sequence[str],
    groupby: str | None = None,
    group1: str | Sequence[str] | None = None,
    group2: str | None = None,
    idx1=None,
    idx2=None,
    mode: str = "vanilla",
    delta: float | None = 0.25,
    batch_codes1: Sequence[int | None] = (None,),
    batch_codes2: Sequence[int | None] = (None,),
    fdr_target: float = 0.05,
    n_samples: int = 5000,
    use_permutation: bool = False,
    m_permutation: int = 10000,
    pseudocounts: float | None = None,
    threshold_counts: float = 0.01,
    test_mode: str = "three",
    all_stats: bool = True,
    seed: int | None = None,
    silent: bool = False,
) -> pd.DataFrame:
    """Differential expression for any model that can sample normalized expression.

    See :meth:`pyrovi.models.BaseModel.differential_expression` for the user-facing
    description of the arguments; this function only needs the model's ``sampler``, the
    observed ``counts`` (for ``all_stats`` and the pseudocount estimate), ``obs`` (for the
    groups) and the ``feature_names``. ``counts=None`` (minified data) leaves the raw-count
    columns out and estimates the pseudocount with no gene known to be unexpressed.

    Returns
    -------
    pandas.DataFrame
        One row per feature and comparison (index: feature names), sorted by ``proba_de``
        (change mode) or ``bayes_factor`` (vanilla) within each comparison.
    """
    if mode not in DE_MODES:
        raise ValueError(f"mode must be one of {DE_MODES}, got {mode!r}.")
    rng = np.random.default_rng(seed)
    comparisons = plan_comparisons(obs, groupby, group1, group2, idx1, idx2)
    estimate_offset = mode == "change" and pseudocounts is None
    streamed = None
    if counts is None:
        all_stats = False
    elif is_on_disk(counts):
        # Counts left on disk: every comparison's summaries in one pass over the file.
        if all_stats or estimate_offset:
            streamed = streamed_raw_counts_properties(
                counts, [(c.cells1, c.cells2) for c in comparisons])
    else:
        counts = sp.csr_matrix(counts) if sp.issparse(counts) else np.asarray(counts)
        totals = cell_totals(counts)
    frames = []
    for i, comparison in enumerate(tqdm(comparisons, desc="Differential expression",
                                        disable=silent)):
        first = sample_group_scales(sampler, comparison.cells1, n_samples, batch_codes1, rng)
        second = sample_group_scales(sampler, comparison.cells2, n_samples, batch_codes2, rng)
        scale1, scale2 = paired_draws(first, second, use_permutation, m_permutation, rng)
        raw = {}
        if streamed is not None:
            raw = streamed[i]
        elif counts is not None and (all_stats or estimate_offset):
            raw = raw_counts_properties(counts, comparison.cells1, comparison.cells2, totals)
        offset = 0.0 if mode == "vanilla" else pseudocounts
        if estimate_offset:
            # Without counts no gene is known to be unexpressed.
            none = np.zeros(scale1.shape[1], dtype=bool)
            offset = estimate_pseudocounts(
                scale1, scale2, raw["raw_mean1"] < threshold_counts if raw else none,
                raw["raw_mean2"] < threshold_counts if raw else none)
        result = bayes_factors(scale1, scale2, mode, delta, offset, test_mode)
        # Group means over all draws, not only the paired ones.
        result["scale1"], result["scale2"] = first.scale.mean(0), second.scale.mean(0)
        if all_stats:
            result.update(raw)
        frame = pd.DataFrame(result, index=pd.Index(list(feature_names)))
        frame = frame.sort_values("proba_de" if mode == "change" else "bayes_factor",
                                  ascending=False)
        if mode == "change":
            frame[f"is_de_fdr_{fdr_target}"] = fdr_de_prediction(frame["proba_de"], fdr_target)
        if comparison.group1 is not None:
            frame["comparison"] = f"{comparison.group1} vs {comparison.group2}"
            frame["group1"] = comparison.group1
            frame["group2"] = comparison.group2
        frames.append(frame)
    return pd.concat(frames, axis=0)
