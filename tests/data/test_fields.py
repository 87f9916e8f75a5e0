"""Fields: a model's declared data, registered, serialized flat and gathered by keyword."""

from __future__ import annotations

import numpy as np
import torch

from pyrovi.data import (
    NONZERO_FIELD,
    AnnDataRegistry,
    ProteinField,
    build_cell_tensors,
    setup_anndata,
    standard_fields,
)
from pyrovi.datasets import simulate_cite_seq, simulate_counts

#: The flat keys pyrovi 0.1/0.2 wrote for a registry with proteins (models on disk have them).
SAVED_KEYS = [
    "model_name", "batch_key", "categorical_covariate_keys",
    "continuous_covariate_keys", "batch_categories", "label_categories",
    "covariate_categories", "allow_non_integer", "drop_empty_cells", "n_cells", "n_vars",
    "protein_expression_obsm_key", "protein_names", "protein_batch_mask",
    "mudata_modalities", "count_fingerprint",
]


def test_declared_fields_give_the_minibatch_keywords():
    adata = simulate_cite_seq(n_cells=60, n_genes=20, n_proteins=4, seed=0)
    fields = [*standard_fields(batch_key="batch"), ProteinField("protein_expression")]
    registry = setup_anndata(adata, model_name="TOTALVI", fields=fields)
    assert [f.key for f in registry.fields] == [
        "x", "batch_index", "labels", "cat_covs", "cont_covs", "size_factor", "y"]
    batch = build_cell_tensors(adata, registry).minibatch(torch.tensor([0, 5]))
    # Sparse counts also bring their non-zero positions, the likelihood's optional field.
    assert [k for k in batch if k != NONZERO_FIELD] == [f.key for f in registry.fields]
    expected = adata.obsm["protein_expression"].to_numpy()[[0, 5]]
    np.testing.assert_array_equal(batch["y"].numpy(), expected)
    assert batch["cat_covs"] is None


def test_registry_serializes_with_the_keys_saved_models_have():
    adata = simulate_cite_seq(n_cells=60, n_genes=20, n_proteins=4, seed=0)
    fields = [*standard_fields(batch_key="batch"), ProteinField("protein_expression")]
    record = setup_anndata(adata, model_name="TOTALVI", fields=fields).to_dict()
    assert list(record) == SAVED_KEYS
    again = AnnDataRegistry.from_dict(record)
    assert again.to_dict() == record
    assert again.n_proteins == 4 and again.has_proteins
    assert again.summary()["n_proteins"] == 4


def test_registry_without_proteins_keeps_their_empty_entries():
    adata = simulate_counts(n_cells=50, n_genes=15, seed=0)
    record = setup_anndata(adata, model_name="SCVI").to_dict()
    assert record["protein_names"] == [] and "protein_expression_obsm_key" not in record
    registry = AnnDataRegistry.from_dict(record)
    assert not registry.has_proteins and registry.field("y") is None
