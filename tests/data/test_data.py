"""Registration and validation of AnnData: clear errors, and nothing changed on error."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pyrovi
from pyrovi.data import (
    AnnDataRegistry,
    CellTensors,
    CountDataError,
    CountMatrix,
    SetupError,
    build_cell_tensors,
    get_registry,
)
from pyrovi.data.csr import gather_csr_rows
from pyrovi.data.tensors import dense_is_smaller


def snapshot(adata):
    X = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return X.copy(), adata.obs.copy(), dict(adata.uns), list(adata.layers.keys())


def assert_unchanged(adata, before):
    X, obs, uns, layers = before
    now = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    np.testing.assert_array_equal(now, X)
    pd.testing.assert_frame_equal(adata.obs, obs)
    assert set(adata.uns) == set(uns)
    assert list(adata.layers.keys()) == layers


def with_value(adata, value, dense=False):
    adata = adata.copy()
    X = adata.X.toarray()
    X[5, 3] = value
    adata.X = X if dense else sp.csr_matrix(X)
    return adata


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize(
    "value, message",
    [(-1.0, "negative"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
     (0.5, "non-integer")],
)
def test_bad_values_raise_and_leave_adata_unchanged(small_adata, value, message, dense):
    adata = with_value(small_adata, value, dense)
    before = snapshot(adata)
    with pytest.raises(CountDataError, match=message) as info:
        pyrovi.SCVI.setup_anndata(adata)
    assert "cell5" in str(info.value) and "gene3" in str(info.value)
    assert_unchanged(adata, before)


def test_non_integer_message_mentions_normalized_data_and_opt_out(small_adata):
    adata = small_adata.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    with pytest.raises(CountDataError, match="normalized or log-transformed") as info:
        pyrovi.SCVI.setup_anndata(adata)
    assert "allow_non_integer=True" in str(info.value)
    pyrovi.SCVI.setup_anndata(adata, allow_non_integer=True)
    assert get_registry(adata).allow_non_integer


def test_empty_cells_error_counts_them_and_drop_option(small_adata):
    adata = small_adata.copy()
    X = adata.X.toarray()
    X[[2, 7, 9]] = 0
    adata.X = sp.csr_matrix(X)
    before = snapshot(adata)
    with pytest.raises(CountDataError, match="3 cell\\(s\\) with zero total counts"):
        pyrovi.SCVI.setup_anndata(adata)
    assert_unchanged(adata, before)
    pyrovi.SCVI.setup_anndata(adata, drop_empty_cells=True)
    model = pyrovi.SCVI(adata, n_latent=2, n_hidden=16)
    model.train(max_epochs=1, progress_bar=False, seed=0)
    used = np.concatenate([model.train_indices, model.validation_indices])
    assert not set(used) & {2, 7, 9}
    assert len(used) == adata.n_obs - 3
    # The dropped cells still get a latent representation, so obsm can hold every cell.
    assert np.isfinite(model.get_latent_representation()).all()


def test_missing_obs_key_lists_columns(small_adata):
    before = snapshot(small_adata)
    with pytest.raises(KeyError, match="not a column of adata.obs") as info:
        pyrovi.SCVI.setup_anndata(small_adata, batch_key="sample")
    assert "'cluster'" in str(info.value) and "'batch'" in str(info.value)
    assert_unchanged(small_adata, before)
    for kwargs in ({"labels_key": "nope"}, {"categorical_covariate_keys": ["nope"]},
                   {"continuous_covariate_keys": ["nope"]}, {"size_factor_key": "nope"}):
        with pytest.raises(SetupError, match="'nope' is not a column"):
            pyrovi.SCVI.setup_anndata(small_adata, **kwargs)
    assert_unchanged(small_adata, before)


def test_missing_layer_lists_layers(small_adata):
    small_adata.layers["counts"] = small_adata.X.copy()
    with pytest.raises(KeyError, match=r"Layer 'raw' is not in adata.layers.*'counts'"):
        pyrovi.SCVI.setup_anndata(small_adata, layer="raw")
    pyrovi.SCVI.setup_anndata(small_adata, layer="counts")
    assert get_registry(small_adata).layer == "counts"


def test_bad_covariates_are_reported(small_adata):
    adata = small_adata.copy()
    adata.obs["depth"] = np.nan
    with pytest.raises(SetupError, match="missing value"):
        pyrovi.SCVI.setup_anndata(adata, continuous_covariate_keys=["depth"])
    adata.obs["depth"] = "deep"
    with pytest.raises(SetupError, match="not numeric"):
        pyrovi.SCVI.setup_anndata(adata, continuous_covariate_keys=["depth"])
    adata.obs["sf"] = 0.0
    with pytest.raises(SetupError, match="non-positive size factor"):
        pyrovi.SCVI.setup_anndata(adata, size_factor_key="sf")
    assert "_pyrovi" not in adata.uns


def test_registry_summary_mappings_and_h5ad_round_trip(small_adata, tmp_path):
    small_adata.obs["donor"] = pd.Categorical(
        np.where(np.arange(small_adata.n_obs) % 3 == 0, "d2", "d1"), categories=["d2", "d1"]
    )
    small_adata.obs["pct_mito"] = np.linspace(0, 1, small_adata.n_obs)
    pyrovi.SCVI.setup_anndata(
        small_adata, batch_key="batch", labels_key="cluster",
        categorical_covariate_keys=["donor"], continuous_covariate_keys=["pct_mito"],
    )
    registry = get_registry(small_adata, "SCVI")
    assert registry.summary() == {
        "n_cells": 300, "n_vars": 60, "n_batch": 2, "n_labels": 3,
        "n_extra_categorical_covs": 1, "n_extra_continuous_covs": 1,
    }
    assert registry.batch_categories == ["b0", "b1"]
    # The category order of a pandas Categorical is kept, as in scvi-tools.
    assert registry.covariate_categories["donor"] == ["d2", "d1"]
    path = tmp_path / "a.h5ad"
    small_adata.write_h5ad(path)
    assert get_registry(anndata.read_h5ad(path)) == registry
    assert AnnDataRegistry.from_dict(registry.to_dict()) == registry


def test_unregistered_adata_and_wrong_model(small_adata):
    with pytest.raises(SetupError, match="setup_anndata"):
        pyrovi.SCVI(small_adata)
    pyrovi.data.setup_anndata(small_adata, model_name="OTHER")
    with pytest.raises(SetupError, match="set up for OTHER"):
        pyrovi.SCVI(small_adata)


@pytest.mark.parametrize("fmt", ["csr", "csc", "dense", "mostly-non-zero csr"])
def test_cell_tensors_gather_matches_scipy(fmt, small_adata):
    X = small_adata.X.tocsr()
    if fmt != "mostly-non-zero csr":
        X = thinned(X)
    assert dense_is_smaller(X) == (fmt == "mostly-non-zero csr")
    small_adata.X = {"csc": X.tocsc(), "dense": X.toarray()}.get(fmt, X)
    before = small_adata.X.copy()
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch", labels_key="cluster")
    data = build_cell_tensors(small_adata, get_registry(small_adata), "cpu")
    # Sparse unless most entries are non-zero (then the dense rows take less memory).
    assert data.counts.is_sparse == (fmt in ("csr", "csc"))
    assert type(small_adata.X) is type(before)  # the user's matrix is left as it was
    assert (abs(small_adata.X - before)).sum() == 0
    index = torch.tensor([0, 299, 17, 17, 150])
    batch = data.minibatch(index)
    np.testing.assert_array_equal(batch["x"].numpy(), X[index.numpy()].toarray())
    expected = small_adata.obs["batch"].cat.codes.to_numpy()[index.numpy()]
    np.testing.assert_array_equal(batch["batch_index"].numpy(), expected)


def test_sparse_matrix_is_not_densified():
    # 200k × 2k with 2 non-zeros per cell: a dense copy would need 1.6 GB, the CSR ~5 MB.
    rng = np.random.default_rng(0)
    n_cells, n_genes, per_cell = 200_000, 2_000, 2
    indptr = np.arange(0, per_cell * n_cells + 1, per_cell)
    indices = np.sort(rng.choice(n_genes, size=(n_cells, per_cell), replace=True), 1).ravel()
    data = rng.integers(1, 6, size=indices.size).astype(np.float32)
    X = sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    X.sum_duplicates()
    matrix = CountMatrix(X, "cpu")
    stored = sum(t.numel() * t.element_size() for t in (matrix.indptr, matrix.indices, matrix.data))
    assert stored < 20 * 2**20
    rows = torch.tensor([3, 199_999, 12345])
    np.testing.assert_array_equal(matrix.gather(rows).numpy(), X[rows.numpy()].toarray())


def test_cpu_count_matrix_shares_the_csr_arrays():
    # No second copy of a large matrix: values (float32) and column indices (int32) are
    # the AnnData's own arrays.
    X = sp.random(500, 40, density=0.2, format="csr", dtype=np.float32, random_state=0)
    matrix = CountMatrix(X, "cpu")
    assert np.shares_memory(matrix.data.numpy(), X.data)
    assert np.shares_memory(matrix.indices.numpy(), X.indices)
    _, indices, data = matrix._host_arrays  # what CPU gathers read
    assert np.shares_memory(data, X.data)
    assert np.shares_memory(indices, X.indices)
    index = torch.tensor([499, 0, 250])
    np.testing.assert_array_equal(matrix.gather(index).numpy(), X[index.numpy()].toarray())


def test_cpu_gather_records_nonzero_positions_and_matches_the_device_path():
    # Non-canonical input (unsorted, duplicate entries, stored zeros): the CPU gather
    # (scipy) and the accelerator gather (index arithmetic, run here on the CPU) agree,
    # and the positions the CPU gather records are exactly the dense rows' non-zeros.
    data = np.array([2.0, 0.0, 1.0, 3.0, 1.0, 0.0, 4.0], dtype=np.float32)
    indices = np.array([3, 1, 0, 3, 3, 2, 0], dtype=np.int32)
    indptr = np.array([0, 3, 3, 5, 7])
    X = sp.csr_matrix((data, indices, indptr), shape=(4, 5))
    matrix = CountMatrix(X, "cpu")
    index = torch.tensor([2, 0, 1, 3, 2])
    x, recorded = matrix.gather_with_nonzero(index)
    np.testing.assert_array_equal(x.numpy(), X[index.numpy()].toarray())
    on_device = gather_csr_rows(matrix.indptr, matrix.indices, matrix.data, 5, index)
    assert on_device[1] is None and torch.equal(x, on_device[0])
    assert recorded.describe(x)
    expected = torch.nonzero(x.reshape(-1) > 0).squeeze(1)
    assert torch.equal(recorded.flat, expected)
    assert torch.equal(recorded.columns, expected % x.shape[1])
    assert torch.equal(recorded.values, x.reshape(-1)[expected])
    codes = torch.zeros(4, dtype=torch.int64)
    batch = CellTensors({"x": matrix, "batch_index": codes, "labels": codes},
                        np.ones(4, dtype=bool)).minibatch(index)
    assert batch["x_nonzero"].describe(batch["x"])


def thinned(X) -> sp.csr_matrix:
    """``X`` with a fifth of its non-zero entries kept: sparse enough to stay CSR."""
    X = sp.csr_matrix(X.multiply(np.random.default_rng(0).random(X.shape) < 0.2))
    X.eliminate_zeros()
    assert not dense_is_smaller(X)
    return X


def test_training_and_embedding_never_densify_the_whole_matrix(small_adata, monkeypatch):
    # A matrix with most entries non-zero is held dense on purpose (it takes less memory);
    # a sparse one never is.
    small_adata.X = thinned(small_adata.X)
    n_cells = small_adata.n_obs

    def guarded(original):
        def densify(self, *args, **kwargs):
            assert self.shape[0] < n_cells, "the whole count matrix was densified"
            return original(self, *args, **kwargs)
        return densify

    for cls in (sp.csr_matrix, sp.csr_array, sp.csc_matrix, sp.csc_array):
        monkeypatch.setattr(cls, "toarray", guarded(cls.toarray))
        monkeypatch.setattr(cls, "todense", guarded(cls.todense))
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    model = pyrovi.SCVI(small_adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=2, batch_size=64, progress_bar=False)
    assert model.get_latent_representation(batch_size=64).shape == (n_cells, 4)


def test_duplicate_gene_names_are_rejected(small_adata):
    small_adata.var_names = ["g"] * 2 + list(small_adata.var_names[2:])
    with pytest.raises(SetupError, match="var_names_make_unique"):
        pyrovi.SCVI.setup_anndata(small_adata)


@pytest.mark.parametrize("value", [np.nan, -1.0, 2.5])
def test_sparse_values_are_checked_in_chunks_to_the_last_one(small_adata, monkeypatch, value):
    # Chunks of 7 stored values: a bad value in the last chunk is still found.
    from pyrovi.data import validation

    monkeypatch.setattr(validation, "_SPARSE_CHUNK_VALUES", 7)
    X = sp.csr_matrix(small_adata.X, dtype=np.float32)
    X.data[-1] = value
    small_adata.X = X
    before = snapshot(small_adata)
    with pytest.raises(CountDataError):
        pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    assert_unchanged(small_adata, before)


def test_array_tensors_gather_dense_sparse_and_none():
    from pyrovi.data import ArrayTensors, as_cell_data

    rng = np.random.default_rng(0)
    counts = sp.random(20, 7, density=0.3, format="csr", random_state=0) * 10
    groups = rng.integers(0, 3, size=20)
    data = as_cell_data({"x": counts, "group": groups, "offset": rng.normal(size=20),
                         "unused": None})
    assert isinstance(data, ArrayTensors) and data.n_obs == 20
    index = torch.tensor([4, 0, 19])
    batch = data.minibatch(index)
    np.testing.assert_allclose(batch["x"].numpy(), counts[[4, 0, 19]].toarray(), rtol=1e-6)
    assert batch["group"].dtype == torch.int64 and batch["offset"].dtype == torch.float32
    assert batch["unused"] is None
    chunks = [i.tolist() for i, _ in data.iter_minibatches(np.arange(5), batch_size=2)]
    assert chunks == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="same number of rows"):
        as_cell_data({"x": np.zeros((3, 2)), "y": np.zeros(4)})
    with pytest.raises(TypeError, match="mapping"):
        as_cell_data(np.zeros((3, 2)))


def test_nonzero_positions_reach_only_models_that_take_them():
    # ArrayTensors with sparse counts gives x_nonzero; a model/guide pair without that
    # argument gets the minibatch without it, one with it (or **kwargs) gets it.
    from pyrovi.data import ArrayTensors, call_arguments

    data = ArrayTensors({"x": sp.random(6, 4, density=0.25, format="csr", random_state=0),
                         "g": np.arange(6)})
    batch = data.minibatch(torch.tensor([1, 3]))
    assert batch["x_nonzero"].describe(batch["x"])

    def without(x, g):
        pass

    def with_it(x, g, x_nonzero=None):
        pass

    def anything(**kwargs):
        pass

    assert set(call_arguments(batch, without, with_it)) == {"x", "g"}
    assert call_arguments(batch, with_it, anything) is batch
    dense = ArrayTensors({"x": np.ones((6, 4)), "g": np.arange(6)})
    assert set(dense.minibatch(torch.tensor([0]))) == {"x", "g"}


def test_cell_totals_of_csr_blocks_equal_scipys_row_sums():
    # Summed a block of rows at a time (no float64 copy of every stored value at once):
    # scipy's float64 totals exactly (integer counts), empty rows and all.
    from pyrovi.data import validation

    rng = np.random.default_rng(0)
    matrix = sp.random(500, 300, density=0.05, format="csr", random_state=rng,
                       dtype=np.float32, data_rvs=lambda n: rng.integers(1, 50, n))
    matrix[::7] = 0
    matrix.eliminate_zeros()
    expected = np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    np.testing.assert_array_equal(validation._sparse_row_sums(matrix, block_values=97), expected)
    np.testing.assert_array_equal(validation.cell_totals(matrix), expected)
    np.testing.assert_array_equal(validation.cell_totals(matrix.tocsc()), expected)
    # A gene subset in another order leaves the indices unsorted; they are summed as they
    # are (scipy would sort a copy first) and the matrix is left as it was.
    shuffled = matrix[:, rng.permutation(300)[:200]]
    assert not shuffled.has_sorted_indices
    indices = shuffled.indices.copy()
    np.testing.assert_array_equal(validation._sparse_row_sums(shuffled, block_values=97),
                                  np.asarray(shuffled.sum(axis=1, dtype=np.float64)).ravel())
    np.testing.assert_array_equal(shuffled.indices, indices)
