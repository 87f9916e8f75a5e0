"""Quality of a cell embedding: conservation of biology and removal of batch effects.

:func:`embedding_metrics` scores ``adata.obsm[rep]`` (for instance the posterior mean of the
latent space of a trained model) with the metrics of the CELLxGENE Census model cards, which
follow the conventions of scib (Luecken et al. 2022, *Nat. Methods* 19:41):

* **bio-conservation** against a cell-type column (``label_key``): Leiden-cluster NMI and ARI,
  the rescaled label silhouette, and the test accuracy of three classifiers (SVM, random
  forest, logistic regression) of the labels;
* **batch correction** against a batch column (``batch_key``): the batch silhouette, the
  normalised entropy of batches in the kNN neighbourhoods, and one minus the test accuracy of
  the same classifiers of the batches.

Every score lies in [0, 1] (ARI can dip slightly below 0) and higher is better. The heavy
dependencies (scikit-learn, python-igraph, leidenalg) are optional: ``pip install
"pyrovi[metrics]"``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np
import pandas as pd

from pyrovi.criticism.embedding_scores import (
    _CLASSIFIERS,
    DEFAULT_RESOLUTIONS,
    INSTALL_HINT,
    _require,
    batch_entropy,
    batch_silhouette,
    classifier_accuracies,
    knn_indices,
    label_silhouette,
    leiden_nmi_ari,
)

logger = logging.getLogger(__name__)

__all__ = [
    "INSTALL_HINT",
    "batch_entropy",
    "batch_silhouette",
    "classifier_accuracies",
    "embedding_metrics",
    "knn_indices",
    "label_silhouette",
    "leiden_nmi_ari",
]

#: Metric groups that :func:`embedding_metrics` can compute (its ``metrics`` argument).
METRIC_GROUPS = ("leiden", "silhouette", "classifier", "entropy")

MIN_CELLS = 10

_NEEDS = {
    "leiden": ("sklearn", "igraph", "leidenalg"),
    "silhouette": ("sklearn",),
    "classifier": ("sklearn",),
    "entropy": ("sklearn",),
}
_COLUMNS = ["rep", "metric", "category", "key", "value", "detail"]


def _embedding(adata, rep: str) -> np.ndarray:
    """``adata.obsm[rep]`` as a finite, dense float64 cells × dimensions array."""
    if rep not in adata.obsm:
        available = ", ".join(repr(k) for k in adata.obsm) or "none"
        raise KeyError(
            f"adata.obsm has no embedding {rep!r} (available: {available}). Store the latent "
            f"space first, e.g. adata.obsm[{rep!r}] = model.get_latent_representation(), or "
            "pass the key of an existing embedding as rep=..."
        )
    values = adata.obsm[rep]
    if hasattr(values, "toarray"):
        values = values.toarray()
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != adata.n_obs or x.shape[1] == 0:
        raise ValueError(
            f"adata.obsm[{rep!r}] must be a cells × dimensions matrix with {adata.n_obs} rows "
            f"and at least one column; got shape {x.shape}."
        )
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(
            f"adata.obsm[{rep!r}] has NaN or infinite values in {int(bad.sum())} of "
            f"{x.shape[0]} cells. Drop those cells first, e.g. "
            f"adata = adata[np.isfinite(adata.obsm[{rep!r}]).all(axis=1)].copy()"
        )
    return x


def _codes(adata, key: str, role: str) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes and category names of ``adata.obs[key]``."""
    if key not in adata.obs.columns:
        raise KeyError(
            f"{role}={key!r} is not a column of adata.obs (columns: "
            f"{', '.join(map(repr, adata.obs.columns)) or 'none'}). Pass the name of the obs "
            "column that holds the " + ("cell types." if role == "label_key" else "batches.")
        )
    column = adata.obs[key]
    missing = column.isna().to_numpy()
    if missing.any():
        raise ValueError(
            f"adata.obs[{key!r}] is missing for {int(missing.sum())} cells. Drop those cells "
            f"(adata = adata[adata.obs[{key!r}].notna()].copy()) or fill them with a category."
        )
    codes, names = pd.factorize(column.astype(str), sort=True)
    return codes.astype(np.int64), np.asarray(names)


def _check_categories(codes: np.ndarray, key: str, role: str, n_total: int, n_used: int) -> None:
    n_categories = np.unique(codes).size
    if n_categories < 2:
        where = (f" among the {n_used} subsampled cells (raise max_cells)"
                 if n_used < n_total else "")
        raise ValueError(
            f"{role}={key!r} has a single category{where}: its scores compare at least two "
            f"groups. Pass a column with two or more categories, or leave {role}=None."
        )


def embedding_metrics(
    adata,
    rep: str = "X_scvi",
    label_key: str | None = None,
    batch_key: str | None = None,
    n_neighbors: int = 15,
    max_cells: int | None = 20_000,
    seed: int = 0,
    metrics: Collection[str] | None = None,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    test_size: float = 0.4,
    n_jobs: int | None = None,
) -> pd.DataFrame:
    """Bio-conservation and batch-correction scores of an embedding (Census model card).

    All scores lie in [0, 1] (ARI can be slightly negative) and higher is better.

    Bio-conservation (needs ``label_key``):

    * ``leiden_nmi``, ``leiden_ari``: the kNN graph of the embedding (``n_neighbors``,
      Euclidean, undirected, unweighted) is clustered by Leiden at each of ``resolutions``;
      the clustering with the highest NMI to the labels is kept (scib's strategy) and its NMI
      and ARI reported (see :func:`leiden_nmi_ari`).
    * ``silhouette_label``: ``(ASW + 1) / 2`` with ASW the mean silhouette of the labels
      (see :func:`label_silhouette`).
    * ``svm_accuracy``, ``random_forest_accuracy``, ``logistic_regression_accuracy``: test
      accuracy of classifiers of the labels on a stratified split, ``1 - test_size`` for
      training (see :func:`classifier_accuracies`).

    Batch correction (needs ``batch_key``):

    * ``silhouette_batch``: scib's batch silhouette, the mean over label groups of
      ``mean_i (1 - |s_i|)`` with ``s_i`` the batch silhouette within the group; all cells
      form one group without ``label_key`` (see :func:`batch_silhouette`).
    * ``batch_entropy``: mean over cells of the entropy of the batches among their
      ``n_neighbors`` neighbours, divided by ``log(n_batches)`` (see :func:`batch_entropy`).
      Under perfect mixing it approaches the entropy of the global batch proportions
      (1 for balanced batches) minus a small finite-``k`` sampling bias.
    * ``svm_1_minus_accuracy``, ``random_forest_1_minus_accuracy``,
      ``logistic_regression_1_minus_accuracy``: one minus the test accuracy of the same
      classifiers trained to predict the batch. Under perfect mixing a classifier does no
      better than chance, so the score approaches ``1 - max_b share_b`` (0.5 for two
      balanced batches), not 1.

    Parameters
    ----------
    adata
        AnnData holding the embedding and the obs columns.
    rep
        Key of the embedding in ``adata.obsm`` (cells × dimensions, finite).
    label_key
        ``adata.obs`` column of cell types, or None to skip bio-conservation.
    batch_key
        ``adata.obs`` column of batches, or None to skip batch correction. At least one of
        ``label_key`` and ``batch_key`` is required.
    n_neighbors
        Neighbours per cell of the kNN graph (Leiden and entropy).
    max_cells
        When the AnnData has more cells, every score is computed on a uniform random
        subsample of ``max_cells`` cells drawn once with ``seed``: silhouettes, the neighbour
        search and the SVM grow quadratically with the number of cells. None = all cells.
    seed
        Seed of the subsample, the classifier split, the random forest and Leiden.
    metrics
        Subset of ``("leiden", "silhouette", "classifier", "entropy")`` to compute; None =
        all. ``entropy`` is a batch score only, ``leiden`` a label score only.
    resolutions
        Leiden resolutions swept for NMI/ARI (default 0.1, 0.2, ..., 2.0).
    test_size
        Fraction of cells held out to test the classifiers.
    n_jobs
        Parallel jobs of the neighbour search and the random forest.

    Returns
    -------
    pandas.DataFrame
        One row per score with columns ``rep``, ``metric``, ``category``
        (``"bio_conservation"`` or ``"batch_correction"``), ``key`` (the obs column scored),
        ``value`` (NaN where a score could not be computed) and ``detail`` (how it was
        obtained). ``attrs`` holds ``n_cells`` (cells scored), ``n_cells_total``,
        ``n_neighbors`` and ``seed``.

    Raises
    ------
    KeyError
        ``rep`` is not in ``adata.obsm`` or a key is not an ``adata.obs`` column.
    ValueError
        No key given, a non-finite embedding, missing obs values, a key with a single
        category, fewer than ``max(10, n_neighbors + 1)`` cells, or an unknown metric.
    ImportError
        scikit-learn, python-igraph or leidenalg is missing (``pip install
        "pyrovi[metrics]"``).

    Examples
    --------
    >>> import anndata
    >>> rng = np.random.default_rng(0)
    >>> adata = anndata.AnnData(obs=pd.DataFrame(
    ...     {"cell_type": np.repeat(["B", "T"], 50), "batch": np.tile(["a", "b"], 50)},
    ...     index=[f"c{i}" for i in range(100)]))
    >>> adata.obsm["X_scvi"] = rng.normal(size=(100, 5)) + 20 * (adata.obs["cell_type"]
    ...     == "T").to_numpy()[:, None]
    >>> scores = embedding_metrics(adata, label_key="cell_type", batch_key="batch")
    >>> values = scores.set_index("metric")["value"]
    >>> float(values["leiden_nmi"]), float(values["svm_accuracy"])
    (1.0, 1.0)
    >>> bool(values["batch_entropy"] > 0.9)   # batches alternate: well mixed
    True
    """
    if label_key is None and batch_key is None:
        raise ValueError("Pass label_key (cell types, for bio-conservation) and/or batch_key "
                         "(batches, for batch correction): there is nothing to score.")
    groups = set(METRIC_GROUPS if metrics is None else metrics)
    unknown = groups - set(METRIC_GROUPS)
    if unknown:
        raise ValueError(f"Unknown metrics {sorted(unknown)}; choose among {METRIC_GROUPS}.")
    if not 0 < test_size < 1:
        raise ValueError(f"test_size must be in (0, 1); got {test_size}.")
    if n_neighbors < 1:
        raise ValueError(f"n_neighbors must be at least 1; got {n_neighbors}.")
    min_cells = max(MIN_CELLS, n_neighbors + 1)
    if max_cells is not None and max_cells < min_cells:
        raise ValueError(f"max_cells must be at least max({MIN_CELLS}, n_neighbors + 1) = "
                         f"{min_cells} (or None); got {max_cells}.")

    x = _embedding(adata, rep)
    labels = batches = None
    if label_key is not None:
        labels, _ = _codes(adata, label_key, "label_key")
    if batch_key is not None:
        batches, _ = _codes(adata, batch_key, "batch_key")
    if label_key is None:
        groups -= {"leiden"}
    if batch_key is None:
        groups -= {"entropy"}
    for module in sorted({m for group in groups for m in _NEEDS[group]}):
        _require(module)

    n_total = x.shape[0]
    if n_total < min_cells:
        raise ValueError(
            f"Only {n_total} cells in adata; embedding metrics need at least {min_cells} "
            f"(max({MIN_CELLS}, n_neighbors + 1)). Score more cells or lower n_neighbors.")
    if max_cells is not None and n_total > max_cells:
        keep = np.sort(np.random.default_rng(seed).choice(n_total, max_cells, replace=False))
        logger.info("Scoring a random subsample of %d of %d cells (max_cells, seed %d).",
                    max_cells, n_total, seed)
        x = x[keep]
        labels = None if labels is None else labels[keep]
        batches = None if batches is None else batches[keep]
    n = x.shape[0]
    if labels is not None:
        _check_categories(labels, label_key, "label_key", n_total, n)
    if batches is not None:
        _check_categories(batches, batch_key, "batch_key", n_total, n)

    cells = f"{n} cells" + (f" (random subsample of {n_total})" if n < n_total else "")
    rows: list[dict[str, Any]] = []

    def add(metric: str, category: str, key: str, value: float, detail: str) -> None:
        rows.append({"rep": rep, "metric": metric, "category": category, "key": key,
                     "value": value, "detail": f"{detail}; {cells}"})

    neighbors = None
    if {"leiden", "entropy"} & groups:
        neighbors = knn_indices(x, n_neighbors, n_jobs=n_jobs)

    if labels is not None:
        bio = "bio_conservation"
        if "leiden" in groups:
            best = leiden_nmi_ari(neighbors, labels, resolutions, seed=seed)
            how = (f"Leiden on the {n_neighbors}-NN graph, best NMI over "
                   f"{len(resolutions)} resolutions: resolution {best['resolution']:g}, "
                   f"{best['n_clusters']} clusters")
            add("leiden_nmi", bio, label_key, best["nmi"], how)
            add("leiden_ari", bio, label_key, best["ari"], how)
        if "silhouette" in groups:
            add("silhouette_label", bio, label_key, label_silhouette(x, labels),
                "(ASW + 1) / 2, Euclidean")
        if "classifier" in groups:
            accuracies = classifier_accuracies(x, labels, test_size, seed, n_jobs)
            for name in _CLASSIFIERS:
                add(f"{name}_accuracy", bio, label_key, accuracies[name],
                    f"test accuracy, stratified {1 - test_size:.0%}/{test_size:.0%} split")

    if batches is not None:
        batch = "batch_correction"
        if "silhouette" in groups:
            score, n_groups = batch_silhouette(x, batches, labels)
            within = (f"mean over {n_groups} groups of {label_key!r} with 2+ batches"
                      if labels is not None else "all cells as one group")
            add("silhouette_batch", batch, batch_key, score, f"mean of 1 - |s_i|, {within}")
        if "entropy" in groups:
            n_batches = np.unique(batches).size
            add("batch_entropy", batch, batch_key, batch_entropy(neighbors, batches),
                f"mean entropy of batches among {n_neighbors} neighbours / log({n_batches})")
        if "classifier" in groups:
            accuracies = classifier_accuracies(x, batches, test_size, seed, n_jobs)
            for name in _CLASSIFIERS:
                add(f"{name}_1_minus_accuracy", batch, batch_key, 1.0 - accuracies[name],
                    f"1 - test accuracy, stratified {1 - test_size:.0%}/{test_size:.0%} split")

    frame = pd.DataFrame(rows, columns=_COLUMNS)
    frame.attrs.update({"n_cells": n, "n_cells_total": n_total, "n_neighbors": n_neighbors,
                        "seed": seed})
    return frame
