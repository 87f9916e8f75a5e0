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

import importlib
import logging
import math
from collections.abc import Collection, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = [
    "batch_entropy",
    "batch_silhouette",
    "classifier_accuracies",
    "embedding_metrics",
    "knn_indices",
    "label_silhouette",
    "leiden_nmi_ari",
]

INSTALL_HINT = 'pip install "pyrovi[metrics]"'

#: Metric groups that :func:`embedding_metrics` can compute (its ``metrics`` argument).
METRIC_GROUPS = ("leiden", "silhouette", "classifier", "entropy")

#: Leiden resolutions swept for the NMI/ARI scores (0.1, 0.2, ..., 2.0, as scib).
DEFAULT_RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 21))

MIN_CELLS = 10

_PACKAGES = {"sklearn": "scikit-learn", "igraph": "python-igraph", "leidenalg": "leidenalg"}
_NEEDS = {
    "leiden": ("sklearn", "igraph", "leidenalg"),
    "silhouette": ("sklearn",),
    "classifier": ("sklearn",),
    "entropy": ("sklearn",),
}
_CLASSIFIERS = ("svm", "random_forest", "logistic_regression")
_COLUMNS = ["rep", "metric", "category", "key", "value", "detail"]


def _require(module: str) -> ModuleType:
    """Import an optional dependency, or fail with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"Embedding metrics need the optional package {_PACKAGES[module]!r}, which could "
            f"not be imported ({err}). Install the metrics extra: {INSTALL_HINT}"
        ) from err


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


def knn_indices(
    x: np.ndarray, n_neighbors: int, n_jobs: int | None = None
) -> np.ndarray:
    """The ``n_neighbors`` nearest other cells of every cell (Euclidean).

    Parameters
    ----------
    x
        Cells × dimensions embedding.
    n_neighbors
        Neighbours per cell; the cell itself is never among them, even when other cells
        share its coordinates.
    n_jobs
        Parallel jobs of scikit-learn's neighbour search.

    Returns
    -------
    numpy.ndarray
        Cells × ``n_neighbors`` integer indices, nearest first.

    Examples
    --------
    >>> knn_indices(np.array([[0.0], [1.0], [3.0], [7.0]]), 1).ravel().tolist()
    [1, 0, 1, 2]
    """
    _require("sklearn")
    from sklearn.neighbors import NearestNeighbors

    n = x.shape[0]
    if not 0 < n_neighbors < n:
        raise ValueError(f"n_neighbors must be between 1 and n_cells - 1 = {n - 1}; "
                         f"got {n_neighbors}.")
    search = NearestNeighbors(n_neighbors=n_neighbors + 1, n_jobs=n_jobs).fit(x)
    idx = search.kneighbors(x, return_distance=False)
    # Drop the cell itself; with duplicated coordinates it need not come first.
    is_self = idx == np.arange(n)[:, None]
    order = np.argsort(is_self, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)[:, :n_neighbors]


def batch_entropy(neighbors: np.ndarray, batches: np.ndarray) -> float:
    """Mean normalised entropy of the batches among each cell's neighbours.

    For cell *i* with neighbours holding batch *b* in proportion ``p_ib`` the entropy is
    ``H_i = -sum_b p_ib log p_ib`` (0 log 0 = 0); the score is ``mean_i H_i / log B`` with
    ``B`` the number of distinct batches among all cells. 1 = every neighbourhood holds all
    batches in equal shares, 0 = every neighbourhood is a single batch.

    Parameters
    ----------
    neighbors
        Cells × k neighbour indices (from :func:`knn_indices`).
    batches
        Integer batch code of every cell.

    Returns
    -------
    float
        The score in [0, 1].

    Examples
    --------
    >>> neighbors = np.array([[1, 2], [0, 2], [0, 1]])
    >>> round(batch_entropy(neighbors, np.array([0, 1, 1])), 4)   # (1 + 1 + 0) / 3
    0.6667
    """
    codes = np.unique(batches, return_inverse=True)[1].ravel()
    n_batches = int(codes.max()) + 1
    if n_batches < 2:
        raise ValueError("batch_entropy needs at least two batches.")
    n, k = neighbors.shape
    flat = (np.arange(n)[:, None] * n_batches + codes[neighbors]).ravel()
    p = np.bincount(flat, minlength=n * n_batches).reshape(n, n_batches) / k
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return float(np.mean(-terms.sum(axis=1)) / math.log(n_batches))


def label_silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Rescaled average silhouette width of the labels, ``(ASW + 1) / 2`` (scib).

    ``ASW`` is the mean over cells of ``s_i = (b_i - a_i) / max(a_i, b_i)`` on Euclidean
    distances, with ``a_i`` the mean distance to the other cells of the same label and
    ``b_i`` the smallest mean distance to the cells of another label (``s_i = 0`` for a cell
    alone in its label).

    Parameters
    ----------
    x
        Cells × dimensions embedding.
    labels
        Label of every cell (at least two distinct, fewer than the cells).

    Returns
    -------
    float
        The score in [0, 1]; 1 = compact, well separated labels.

    Examples
    --------
    >>> x = np.array([[0.0], [0.1], [10.0], [10.1]])
    >>> round(label_silhouette(x, np.array([0, 0, 1, 1])), 3)
    0.995
    """
    _require("sklearn")
    from sklearn.metrics import silhouette_score

    return float((silhouette_score(x, labels) + 1) / 2)


def batch_silhouette(
    x: np.ndarray, batches: np.ndarray, labels: np.ndarray | None = None
) -> tuple[float, int]:
    """Batch silhouette as in scib: mean over labels of ``mean_i (1 - |s_i|)``.

    Within each label group, ``s_i`` is the silhouette of cell *i* with respect to the
    batches, computed on the group's cells only; ``1 - |s_i|`` is 1 when the cell is as close
    to the other batches as to its own, and near 0 when batches separate (or, with
    ``s_i < 0``, when the cell sits in another batch's cluster). Each group's mean is averaged
    over groups with equal weights. Groups holding a single batch, or as many batches as
    cells, are skipped. Without ``labels`` all cells form one group.

    Parameters
    ----------
    x
        Cells × dimensions embedding.
    batches
        Batch of every cell.
    labels
        Cell type of every cell, or None.

    Returns
    -------
    score
        The score in [0, 1] (NaN when no group could be scored).
    n_groups
        Number of label groups that entered the mean.

    Examples
    --------
    >>> x = np.array([[0.0], [0.1], [10.0], [10.1]])
    >>> score, _ = batch_silhouette(x, np.array([0, 0, 1, 1]))
    >>> round(score, 3)   # batches fully separated
    0.01
    """
    _require("sklearn")
    from sklearn.metrics import silhouette_samples

    groups = np.zeros(len(batches), dtype=np.int64) if labels is None else labels
    per_group = []
    for group in np.unique(groups):
        mask = groups == group
        n_batches = np.unique(batches[mask]).size
        if n_batches < 2 or n_batches >= mask.sum():
            continue
        s = silhouette_samples(x[mask], batches[mask])
        per_group.append(np.mean(1.0 - np.abs(s)))
    if not per_group:
        return float("nan"), 0
    return float(np.mean(per_group)), len(per_group)


def classifier_accuracies(
    x: np.ndarray,
    y: np.ndarray,
    test_size: float = 0.4,
    seed: int = 0,
    n_jobs: int | None = None,
) -> dict[str, float]:
    """Held-out accuracy of SVM, random-forest and logistic-regression classifiers of ``y``.

    The cells are split once into a stratified training set (``1 - test_size``) and test set
    (``test_size``); each classifier, with scikit-learn's defaults (RBF ``SVC``,
    ``RandomForestClassifier`` with 100 trees and ``random_state=seed``, ``LogisticRegression``
    with ``max_iter=1000``), is fitted on the embedding of the training cells and scored by
    the fraction of test cells it classifies correctly. Categories with fewer than two cells
    cannot be stratified and are left out.

    Parameters
    ----------
    x
        Cells × dimensions embedding.
    y
        Class of every cell.
    test_size
        Fraction of the cells held out for testing.
    seed
        Seed of the split and of the random forest.
    n_jobs
        Parallel jobs of the random forest.

    Returns
    -------
    dict
        ``{"svm": ..., "random_forest": ..., "logistic_regression": ...}`` accuracies; NaN
        when fewer than two categories remain or the split cannot hold every category.

    Examples
    --------
    >>> x = np.repeat([[0.0], [10.0]], 10, axis=0) + np.tile(np.arange(10) / 10, 2)[:, None]
    >>> classifier_accuracies(x, np.repeat([0, 1], 10))
    {'svm': 1.0, 'random_forest': 1.0, 'logistic_regression': 1.0}
    """
    _require("sklearn")
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    nan = dict.fromkeys(_CLASSIFIERS, float("nan"))
    classes, counts = np.unique(y, return_counts=True)
    keep = np.isin(y, classes[counts >= 2])
    if not keep.all():
        logger.warning("Classifiers: %d categories with a single cell left out.",
                       int((counts < 2).sum()))
    x, y = x[keep], y[keep]
    n_classes = int((counts >= 2).sum())
    n_test = math.ceil(test_size * len(y))
    if n_classes < 2 or n_test < n_classes or len(y) - n_test < n_classes:
        logger.warning("Classifiers: %d cells cannot be split to hold all %d categories in "
                       "both sets; accuracies set to NaN.", len(y), n_classes)
        return nan
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed)
    models = {
        "svm": SVC(),
        "random_forest": RandomForestClassifier(random_state=seed, n_jobs=n_jobs),
        "logistic_regression": LogisticRegression(max_iter=1000),
    }
    return {name: float(np.mean(model.fit(x_train, y_train).predict(x_test) == y_test))
            for name, model in models.items()}


def leiden_nmi_ari(
    neighbors: np.ndarray,
    labels: np.ndarray,
    resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
    seed: int = 0,
) -> dict[str, float]:
    """NMI and ARI between the labels and the best Leiden clustering of the kNN graph.

    The kNN graph is made undirected and unweighted (an edge wherever either cell is among
    the other's neighbours). It is clustered with Leiden (leidenalg's
    ``RBConfigurationVertexPartition``, i.e. modularity with a resolution parameter, seeded)
    at every resolution; as in scib the clustering with the highest NMI to the labels is
    kept and its NMI and ARI are reported. NMI is scikit-learn's
    ``normalized_mutual_info_score`` (arithmetic normalisation), ARI its
    ``adjusted_rand_score``.

    Parameters
    ----------
    neighbors
        Cells × k neighbour indices (from :func:`knn_indices`).
    labels
        Label of every cell.
    resolutions
        Leiden resolutions to sweep.
    seed
        Seed of Leiden.

    Returns
    -------
    dict
        ``nmi``, ``ari``, and the ``resolution`` and ``n_clusters`` of the kept clustering.

    Examples
    --------
    >>> neighbors = np.array([[1], [2], [0], [4], [5], [3]])   # two triangles
    >>> leiden_nmi_ari(neighbors, np.array([0, 0, 0, 1, 1, 1]))["nmi"]
    1.0
    """
    igraph = _require("igraph")
    leidenalg = _require("leidenalg")
    _require("sklearn")
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    if len(resolutions) == 0:
        raise ValueError("resolutions must hold at least one Leiden resolution.")
    n, k = neighbors.shape
    edges = np.stack([np.repeat(np.arange(n), k), neighbors.ravel()], axis=1)
    edges = np.unique(np.sort(edges, axis=1), axis=0)
    graph = igraph.Graph(n=n, edges=edges.tolist())
    best: dict[str, float] = {"nmi": -1.0}
    for resolution in resolutions:
        partition = leidenalg.find_partition(
            graph, leidenalg.RBConfigurationVertexPartition,
            resolution_parameter=float(resolution), seed=seed)
        clusters = np.asarray(partition.membership)
        nmi = normalized_mutual_info_score(labels, clusters)
        logger.debug("Leiden resolution %.2f: %d clusters, NMI %.4f",
                     resolution, clusters.max() + 1, nmi)
        if nmi > best["nmi"]:
            best = {"nmi": float(nmi), "ari": float(adjusted_rand_score(labels, clusters)),
                    "resolution": float(resolution), "n_clusters": int(clusters.max() + 1)}
    return best


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
