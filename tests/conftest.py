"""Shared fixtures: small simulated data and access to ../shared/data."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata
import pytest
import torch

import pyrovi
from pyrovi.datasets import simulate_cite_seq, simulate_counts

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_dataset(name: str) -> anndata.AnnData:
    """Read ``../shared/data/<name>``, skipping the test when it is not there."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(
            f"{path} not found: the real datasets live in ../shared/data beside the repository "
            "(present in CI, absent in a fresh clone)."
        )
    return anndata.read_h5ad(path)


@pytest.fixture(autouse=True)
def _quiet_and_seeded():
    torch.manual_seed(0)
    logging.getLogger("pyrovi").setLevel(logging.WARNING)


@pytest.fixture
def small_adata():
    """300 cells × 60 genes, 3 clusters, 2 batches: fast enough for API tests."""
    return simulate_counts(n_cells=300, n_genes=60, n_clusters=3, n_batches=2, seed=1)


def small_totalvi(n_cells: int, n_proteins: int, seed: int = 0, max_epochs: int = 5):
    """A small TotalVI (5 latent, 32 hidden) briefly trained on simulated CITE-seq with two
    batches and 30 genes: enough to exercise outputs, not to test accuracy."""
    adata = simulate_cite_seq(n_cells=n_cells, n_genes=30, n_proteins=n_proteins, seed=seed)
    pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                 batch_key="batch")
    model = pyrovi.TOTALVI(adata, n_latent=5, n_hidden=32)
    model.train(max_epochs=max_epochs, progress_bar=False, seed=0)
    return adata, model
