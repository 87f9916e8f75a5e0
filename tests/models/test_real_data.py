"""scVI on real data: the embedded pbmc68k_reduced and the datasets in ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import pyrovi
from tests.conftest import shared_dataset

# Real data or whole runs: the slowest of the suite (kept in it; `-m "not slow"` skips).
pytestmark = pytest.mark.slow


def test_pbmc68k_reduced_counts_are_restored_exactly():
    pytest.importorskip("scanpy")
    adata = pyrovi.datasets.pbmc68k_reduced()
    assert adata.shape == (700, 765)
    X = adata.X.toarray()
    assert np.array_equal(X, np.round(X)) and X.min() == 0
    assert adata.obs["bulk_labels"].nunique() == 10
    # Renormalizing the restored counts gives back scanpy's stored log-normalized values
    # up to their storage precision.
    import scanpy as sc

    raw = sc.datasets.pbmc68k_reduced().raw.X.toarray()
    renormalized = np.log1p(X / adata.obs["n_counts"].to_numpy()[:, None] * 1e4)
    np.testing.assert_allclose(renormalized, raw, atol=2e-2)


def test_pbmc68k_latent_separates_cell_types_better_after_training():
    pytest.importorskip("scanpy")
    adata = pyrovi.datasets.pbmc68k_reduced()
    pyrovi.SCVI.setup_anndata(adata)
    model = pyrovi.SCVI(adata, n_latent=10)
    labels = adata.obs["bulk_labels"]

    def accuracy():
        latent = model.get_latent_representation()
        return cross_val_score(KNeighborsClassifier(15), latent, labels, cv=5).mean()

    before = accuracy()
    model.train(max_epochs=100, seed=0, progress_bar=False)
    after = accuracy()
    history = model.history["elbo_validation"]
    assert history.iloc[-1] < history.iloc[0]
    assert after > before + 0.05, (before, after)
    assert after > 0.6, after  # 10 types; the largest is 24% of cells


@pytest.mark.parametrize(
    "name, batch_key, n_cells",
    [
        ("mouse_brain_10k.h5ad", None, 3000),
        ("pbmc10k_5k_rna_2batch.h5ad", "batch", 2000),
        ("cellbench_lung_celllines_5batch.h5ad", "batch", None),
    ],
)
def test_shared_datasets_train_and_validation_elbo_decreases(name, batch_key, n_cells):
    adata = shared_dataset(name)
    if n_cells is not None:
        adata = adata[np.random.default_rng(0).choice(adata.n_obs, n_cells, replace=False)].copy()
    # mouse_brain_10k has a cell without counts among the 522 kept genes.
    pyrovi.SCVI.setup_anndata(adata, batch_key=batch_key, drop_empty_cells=True)
    model = pyrovi.SCVI(adata)
    model.train(max_epochs=5, batch_size=256, seed=0, progress_bar=False)
    elbo = model.history["elbo_validation"]
    assert elbo.iloc[-1] < elbo.iloc[0], elbo.tolist()
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 10) and np.isfinite(latent).all()
    expression = model.get_normalized_expression(indices=np.arange(50))
    assert expression.shape == (50, adata.n_vars)
    assert np.isfinite(expression.to_numpy()).all()
