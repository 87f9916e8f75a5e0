"""Shared fixtures: small simulated data and access to ../shared/data."""

from __future__ import annotations

import logging
from pathlib import Path

import anndata
import pytest
import torch

from pyrovi.datasets import simulate_counts

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
