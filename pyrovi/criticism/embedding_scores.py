"""Scores of a cell embedding: neighbours, silhouettes, classifiers, Leiden clusterings.

The building blocks of :func:`pyrovi.criticism.embedding_metrics` (part of
:mod:`pyrovi.criticism`), each following the conventions of scib (Luecken et al. 2022,
*Nat. Methods* 19:41). They need the optional packages scikit-learn, python-igraph and
leidenalg: ``pip install "pyrovi[metrics]"``.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from types import ModuleType

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "batch_entropy",
    "batch_silhouette",
    "classifier_accuracies",
    "knn_indices",
    "label_silhouette",
    "leiden_nmi_ari",
]

INSTALL_HINT = 'pip install "pyrovi[metrics]"'

#: Leiden resolutions swept for the NMI/ARI scores (0.1, 0.2, ..., 2.0, as scib).
DEFAULT_RESOLUTIONS = tuple(round(0.1 * i, 1) for i in range(1, 21))

_PACKAGES = {"sklearn": "scikit-learn", "igraph": "python-igraph", "leidenalg": "leidenalg"}
_CLASSIFIERS = ("svm", "random_forest", "logistic_regression")


def _require(module: str) -> ModuleType:
    """Import an optional dependency, or fail with the install hint."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"Embedding metrics need the optional package {_PACKAGES[module]!r}, which could "
            f"not be imported ({err}). Install the metrics extra: {INSTALL_HINT}"
        ) from err


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
