"""Embedding quality metrics on constructed embeddings whose scores are known."""

from __future__ import annotations

import math
import sys

import anndata
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("igraph")
pytest.importorskip("leidenalg")

from pyrovi.criticism import embedding_metrics  # noqa: E402
from pyrovi.criticism.embedding import knn_indices  # noqa: E402

CLASSIFIERS = ("svm", "random_forest", "logistic_regression")


def make_adata(x: np.ndarray, rep: str = "X_scvi", **obs) -> anndata.AnnData:
    index = [f"cell{i}" for i in range(len(x))]
    adata = anndata.AnnData(obs=pd.DataFrame(obs, index=index))
    adata.obsm[rep] = x
    return adata


def values(scores: pd.DataFrame) -> pd.Series:
    return scores.set_index("metric")["value"]


def blobs(n_per_blob: int, n_blobs: int, distance: float, dim: int = 10, seed: int = 0):
    """``n_blobs`` unit Gaussian blobs whose centres are ``distance`` apart."""
    rng = np.random.default_rng(seed)
    centres = distance / math.sqrt(2) * np.eye(n_blobs, dim)
    blob = np.repeat(np.arange(n_blobs), n_per_blob)
    return centres[blob] + rng.normal(size=(len(blob), dim)), blob


def hand_silhouette(x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Silhouette of every cell straight from its definition (0 for a singleton label)."""
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    s = np.zeros(len(x))
    for i in range(len(x)):
        own = (labels == labels[i]) & (np.arange(len(x)) != i)
        if not own.any():
            continue
        a = d[i, own].mean()
        b = min(d[i, labels == other].mean() for other in np.unique(labels)
                if other != labels[i])
        s[i] = (b - a) / max(a, b)
    return s


# -- known answers -------------------------------------------------------------------------


def test_separated_label_clusters_score_perfectly():
    """Three blobs 100 SD apart, one per label: NMI = ARI = 1, every classifier right,
    (ASW + 1) / 2 equal to the hand silhouette and above 0.95; only bio rows come back."""
    x, blob = blobs(100, 3, distance=100.0)
    labels = np.array(["B", "NK", "T"])[blob]
    scores = embedding_metrics(make_adata(x, cell_type=labels), label_key="cell_type")

    assert list(scores.columns) == ["rep", "metric", "category", "key", "value", "detail"]
    assert set(scores["category"]) == {"bio_conservation"}
    assert set(scores["key"]) == {"cell_type"}
    v = values(scores)
    assert v["leiden_nmi"] == pytest.approx(1.0)
    assert v["leiden_ari"] == pytest.approx(1.0)
    for name in CLASSIFIERS:
        assert v[f"{name}_accuracy"] == 1.0
    assert v["silhouette_label"] > 0.95
    assert v["silhouette_label"] == pytest.approx((hand_silhouette(x, labels).mean() + 1) / 2)
    assert scores.attrs["n_cells"] == 300


def test_random_labels_on_one_blob_score_near_chance():
    """Labels drawn at random over one blob: NMI and ARI near 0 even for the best of the
    Leiden resolutions, accuracies within 0.1 of chance (1/3), silhouette near 0.5."""
    x, _ = blobs(600, 1, distance=0.0)
    rng = np.random.default_rng(1)
    labels = rng.permutation(np.repeat(["a", "b", "c"], 200))
    v = values(embedding_metrics(make_adata(x, cell_type=labels), label_key="cell_type"))

    assert 0 <= v["leiden_nmi"] < 0.05
    assert abs(v["leiden_ari"]) < 0.05
    for name in CLASSIFIERS:
        assert abs(v[f"{name}_accuracy"] - 1 / 3) < 0.1, name
    assert abs(v["silhouette_label"] - 0.5) < 0.05


def test_perfectly_mixed_batches():
    """Two balanced batches assigned at random over one blob.

    Neighbour batches are then Binomial(k, 1/2), so the entropy score is close to
    E[H(X/k)] / log 2 with X ~ Binomial(15, 1/2) (about 0.95, below 1 only from sampling
    k neighbours); 1 - |s_i| is close to 1; a classifier of the batch does no better than
    chance (1/2), so 1 - accuracy is 0.5 within 0.1 (not 1).
    """
    x, _ = blobs(800, 1, distance=0.0)
    batch = np.random.default_rng(2).permutation(np.repeat(["b1", "b2"], 400))
    scores = embedding_metrics(make_adata(x, batch=batch), batch_key="batch")
    assert set(scores["category"]) == {"batch_correction"}
    v = values(scores)

    k = 15
    expected = sum(math.comb(k, j) / 2**k * -sum(p * math.log(p) for p in (j / k, 1 - j / k)
                                                  if p > 0)
                   for j in range(k + 1)) / math.log(2)
    assert 0.9 < expected < 1
    assert v["batch_entropy"] == pytest.approx(expected, abs=0.02)
    assert v["silhouette_batch"] > 0.95
    for name in CLASSIFIERS:
        assert abs(v[f"{name}_1_minus_accuracy"] - 0.5) < 0.1, name


def test_fully_separated_batches():
    """Each batch its own far blob (two cell types inside each): entropy exactly 0, every
    batch classifier right (1 - accuracy = 0), batch silhouette near 0 per cell type."""
    x, blob = blobs(120, 2, distance=100.0)
    batch = np.array(["b1", "b2"])[blob]
    cell_type = np.tile(["B", "T"], 120)
    scores = embedding_metrics(make_adata(x, batch=batch, cell_type=cell_type),
                               batch_key="batch", label_key="cell_type",
                               metrics=["silhouette", "entropy", "classifier"])
    v = values(scores)

    assert v["batch_entropy"] == 0.0
    for name in CLASSIFIERS:
        assert v[f"{name}_1_minus_accuracy"] == 0.0
    assert v["silhouette_batch"] < 0.1
    detail = scores.set_index("metric").loc["silhouette_batch", "detail"]
    assert "2 groups of 'cell_type'" in detail
    # Leiden is a label score that was not asked for here.
    assert "leiden_nmi" not in v.index


# -- each score against a direct computation -----------------------------------------------


def test_label_silhouette_matches_hand_computation():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(12, 2))
    labels = np.array(list("aaaabbbbbccc"))
    v = values(embedding_metrics(make_adata(x, ct=labels), label_key="ct",
                                 metrics=["silhouette"], n_neighbors=3))
    assert v["silhouette_label"] == pytest.approx((hand_silhouette(x, labels).mean() + 1) / 2)


def test_batch_silhouette_matches_hand_computation():
    """scib's form: within each cell type the batch silhouette, 1 - |s_i| averaged over the
    cells of the type, then over the types; a type seen in one batch only is skipped."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(14, 3))
    cell_type = np.array(list("AAAAAABBBBBCCC"))
    batch = np.array(list("xxyyyxyxyxyxxx"))  # type C is all in batch x
    v = values(embedding_metrics(make_adata(x, ct=cell_type, batch=batch), batch_key="batch",
                                 label_key="ct", metrics=["silhouette"], n_neighbors=3))
    per_type = [np.mean(1 - np.abs(hand_silhouette(x[cell_type == t], batch[cell_type == t])))
                for t in "AB"]
    assert v["silhouette_batch"] == pytest.approx(np.mean(per_type))

    # Without cell types: all cells form one group.
    plain = values(embedding_metrics(make_adata(x, batch=batch), batch_key="batch",
                                     metrics=["silhouette"], n_neighbors=3))
    assert plain["silhouette_batch"] == pytest.approx(
        np.mean(1 - np.abs(hand_silhouette(x, batch))))


def test_batch_entropy_matches_hand_computation_on_tiny_graph():
    """Four triples of points far apart on a line: with 2 neighbours each cell's neighbours
    are the two others of its triple, so the entropies can be written down by hand."""
    x = np.array([0, 1, 3, 100, 101, 103, 200, 201, 203, 300, 301, 303], float)[:, None]
    batch = np.array(list("aaa" "aab" "abc" "bcc"))
    neighbors = knn_indices(x, 2)
    assert [set(row) for row in neighbors[:3]] == [{1, 2}, {0, 2}, {0, 1}]

    # Neighbour batches of each cell, triple by triple.
    by_hand = ["aa", "aa", "aa",  "ab", "ab", "aa",  "bc", "ac", "ab",  "cc", "bc", "bc"]

    def entropy(pair: str) -> float:
        return 0.0 if pair[0] == pair[1] else math.log(2)

    expected = np.mean([entropy(pair) for pair in by_hand]) / math.log(3)
    v = values(embedding_metrics(make_adata(x, batch=batch), batch_key="batch",
                                 metrics=["entropy"], n_neighbors=2))
    assert v["batch_entropy"] == pytest.approx(expected)


def test_classifier_accuracy_is_the_documented_stratified_split():
    """Same number as fitting scikit-learn directly on a stratified 60/40 split (seeded)."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    x, blob = blobs(60, 3, distance=3.0, dim=4)
    labels = np.array(["a", "b", "c"])[blob]
    v = values(embedding_metrics(make_adata(x, ct=labels), label_key="ct",
                                 metrics=["classifier"], seed=7))
    codes = pd.factorize(labels, sort=True)[0]
    x_tr, x_te, y_tr, y_te = train_test_split(x, codes, test_size=0.4, stratify=codes,
                                              random_state=7)
    assert np.bincount(y_te).tolist() == [24, 24, 24]
    assert v["svm_accuracy"] == pytest.approx(np.mean(SVC().fit(x_tr, y_tr).predict(x_te)
                                                      == y_te))


def test_leiden_picks_the_best_resolution_and_reports_it():
    x, blob = blobs(50, 4, distance=50.0, dim=5)
    scores = embedding_metrics(make_adata(x, ct=blob.astype(str)), label_key="ct",
                               metrics=["leiden"], resolutions=[0.1, 1.0])
    v = values(scores)
    assert v["leiden_nmi"] == pytest.approx(1.0)
    assert "4 clusters" in scores.set_index("metric").loc["leiden_nmi", "detail"]


# -- subsampling ---------------------------------------------------------------------------


def test_subsampling_above_max_cells_is_seeded():
    x, blob = blobs(150, 2, distance=4.0, dim=4)
    adata = make_adata(x, ct=blob.astype(str), batch=np.tile(["p", "q"], 150))
    kwargs = dict(label_key="ct", batch_key="batch", max_cells=100,
                  metrics=["silhouette", "entropy"])
    first = embedding_metrics(adata, seed=5, **kwargs)
    again = embedding_metrics(adata, seed=5, **kwargs)
    pd.testing.assert_frame_equal(first, again)
    assert first.attrs["n_cells"] == 100 and first.attrs["n_cells_total"] == 300
    assert first["detail"].str.contains("random subsample of 300").all()

    everything = embedding_metrics(adata, **{**kwargs, "max_cells": None})
    assert everything.attrs["n_cells"] == 300
    assert not everything["detail"].str.contains("subsample").any()


# -- optional dependencies and bad input ---------------------------------------------------


@pytest.mark.parametrize(("module", "metrics"), [("leidenalg", None), ("igraph", ["leiden"]),
                                                 ("sklearn", ["silhouette"])])
def test_missing_dependency_gives_the_install_hint(monkeypatch, module, metrics):
    x, blob = blobs(20, 2, distance=10.0, dim=3)
    adata = make_adata(x, ct=blob.astype(str))
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=r'pip install "pyrovi\[metrics\]"'):
        embedding_metrics(adata, label_key="ct", metrics=metrics)


def test_leiden_dependencies_are_only_needed_for_leiden(monkeypatch):
    x, blob = blobs(20, 2, distance=10.0, dim=3)
    monkeypatch.setitem(sys.modules, "leidenalg", None)
    monkeypatch.setitem(sys.modules, "igraph", None)
    scores = embedding_metrics(make_adata(x, ct=blob.astype(str)), label_key="ct",
                               metrics=["silhouette"])
    assert scores["metric"].tolist() == ["silhouette_label"]


def test_rep_absent_from_obsm():
    x, blob = blobs(20, 2, distance=10.0, dim=3)
    adata = make_adata(x, rep="X_pca", ct=blob.astype(str))
    with pytest.raises(KeyError, match=r"no embedding 'X_scvi'.*available: 'X_pca'"):
        embedding_metrics(adata, label_key="ct")


def _bad_inputs():
    x, blob = blobs(10, 2, distance=10.0, dim=3)
    ct = blob.astype(str)
    with_nan = x.copy()
    with_nan[3, 1] = np.nan
    missing_label = pd.Series(ct, dtype=object)
    missing_label[0] = None
    cases = [
        ("no key", make_adata(x, ct=ct), {}, ValueError, "label_key.*batch_key"),
        ("obs key", make_adata(x, ct=ct), {"label_key": "cell_type"}, KeyError,
         "'cell_type' is not a column of adata.obs"),
        ("batch key", make_adata(x, ct=ct), {"batch_key": "batch"}, KeyError,
         "batch_key='batch' is not a column"),
        ("nan", make_adata(with_nan, ct=ct), {"label_key": "ct"}, ValueError,
         "NaN or infinite values in 1 of 20 cells"),
        ("single category", make_adata(x, ct=ct, batch=["b"] * 20),
         {"label_key": "ct", "batch_key": "batch"}, ValueError, "single category"),
        ("missing obs value", make_adata(x, ct=missing_label.to_numpy()), {"label_key": "ct"},
         ValueError, "missing for 1 cells"),
        ("too few cells", make_adata(x[:8], ct=ct[:8]), {"label_key": "ct"}, ValueError,
         "Only 8 cells.*at least 16"),
        ("too few for n_neighbors", make_adata(x, ct=ct), {"label_key": "ct",
                                                           "n_neighbors": 30},
         ValueError, "at least 31"),
        ("max_cells below n_neighbors", make_adata(x, ct=ct),
         {"label_key": "ct", "n_neighbors": 15, "max_cells": 12}, ValueError,
         "max_cells must be at least"),
        ("unknown metric", make_adata(x, ct=ct), {"label_key": "ct", "metrics": ["lisi"]},
         ValueError, "Unknown metrics"),
        ("not a matrix", make_adata(np.empty((20, 0)), ct=ct),
         {"label_key": "ct"}, ValueError, "cells × dimensions"),
    ]
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize(("adata", "kwargs", "error", "message"), _bad_inputs())
def test_bad_input_is_reported(adata, kwargs, error, message):
    with pytest.raises(error, match=message):
        embedding_metrics(adata, **kwargs)
