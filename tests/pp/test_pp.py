"""``pyrovi.pp.scvi``: the scanpy-style one-call API (contract of ``scanpy.external.pp.scvi``)."""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pyrovi
from pyrovi.data import REGISTRY_UNS_KEY, CountDataError
from pyrovi.datasets import simulate_counts

N_CELLS, N_GENES, N_HVG, N_LATENT = 300, 60, 40, 4
OUTPUT_KEYS = {"X_scvi", "X_scvi_denoised", "X_scvi_sample_rate"}
QUIET = {"progress_bar": False, "seed": 0}


def fast(**overrides):
    """Small, quick settings for API tests (a few epochs on the CPU)."""
    options = dict(n_hidden=16, n_latent=N_LATENT, n_epochs=3, use_cuda=False,
                   trainer_kwargs=QUIET)
    options.update(overrides)
    return options


@pytest.fixture
def adata():
    """300 cells × 60 genes with 2 batches and 40 genes flagged highly variable."""
    data = simulate_counts(n_cells=N_CELLS, n_genes=N_GENES, n_clusters=3, n_batches=2, seed=1)
    flags = np.zeros(N_GENES, dtype=bool)
    flags[np.random.default_rng(0).choice(N_GENES, N_HVG, replace=False)] = True
    data.var["highly_variable"] = flags
    data.uns["note"] = {"kept": "as is"}
    data.layers["counts"] = data.X.copy()
    return data


def hvg_names(data) -> list[str]:
    return list(data.var_names[data.var["highly_variable"]])


def snapshot(data) -> anndata.AnnData:
    """A deep copy to compare against later."""
    return data.copy()


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def assert_same_anndata(actual, expected):
    """Everything a user could look at is identical: X, obs, var, uns, obsm, varm, layers."""
    assert actual.shape == expected.shape
    assert type(actual.X) is type(expected.X)
    np.testing.assert_array_equal(dense(actual.X), dense(expected.X))
    pd.testing.assert_frame_equal(actual.obs, expected.obs)
    pd.testing.assert_frame_equal(actual.var, expected.var)
    assert set(actual.uns.keys()) == set(expected.uns.keys())
    for key in expected.uns:
        assert actual.uns[key] == expected.uns[key], key
    for name in ("obsm", "varm", "layers"):
        got, want = getattr(actual, name), getattr(expected, name)
        assert set(got.keys()) == set(want.keys()), name
        for key in want:
            np.testing.assert_array_equal(dense(got[key]), dense(want[key]), err_msg=key)


# -- gene selection -------------------------------------------------------------------------


def test_highly_variable_genes_are_fitted_on_an_internal_copy(adata):
    model = pyrovi.pp.scvi(adata, **fast())
    assert type(model) is pyrovi.SCVI
    assert list(model.var_names) == hvg_names(adata)
    assert model.registry.n_vars == N_HVG
    assert model.adata is not adata and model.adata.n_vars == N_HVG
    assert REGISTRY_UNS_KEY in model.adata.uns
    assert adata.obsm["X_scvi"].shape == (N_CELLS, N_LATENT)
    assert adata.obsm["X_scvi_denoised"].shape == (N_CELLS, N_HVG)
    assert adata.obsm["X_scvi_sample_rate"].shape == (N_CELLS, N_HVG)
    # The outputs are the model's own, for the fitted genes.
    np.testing.assert_allclose(adata.obsm["X_scvi"], model.get_latent_representation(),
                               rtol=1e-5, atol=1e-6)


def test_all_genes_without_highly_variable_selection(adata):
    del adata.var["highly_variable"]
    model = pyrovi.pp.scvi(adata, use_highly_variable_genes=False, **fast())
    assert list(model.var_names) == list(adata.var_names)
    assert adata.obsm["X_scvi_denoised"].shape == (N_CELLS, N_GENES)


def test_missing_highly_variable_column_is_an_error_and_changes_nothing(adata):
    del adata.var["highly_variable"]
    before = snapshot(adata)
    with pytest.raises(ValueError, match="highly_variable") as error:
        pyrovi.pp.scvi(adata, **fast())
    message = str(error.value)
    assert 'flavor="seurat_v3"' in message
    assert "use_highly_variable_genes=False" in message and "subset_genes" in message
    assert_same_anndata(adata, before)


def test_no_highly_variable_gene_flagged_is_an_error(adata):
    adata.var["highly_variable"] = False
    with pytest.raises(ValueError, match="No genes selected"):
        pyrovi.pp.scvi(adata, **fast())


@pytest.mark.parametrize("form", ["names", "mask", "positions"])
def test_subset_genes_overrides_highly_variable_genes(adata, form):
    positions = np.array([5, 0, 17, 33, 42, 59, 8, 21])
    if form == "names":
        subset = list(adata.var_names[positions])  # fitted in the given order
        expected = subset
    elif form == "mask":
        subset = np.zeros(N_GENES, dtype=bool)
        subset[positions] = True
        expected = list(adata.var_names[np.sort(positions)])
    else:
        subset = positions.tolist()
        expected = list(adata.var_names[positions])
    assert set(expected) != set(hvg_names(adata))
    model = pyrovi.pp.scvi(adata, subset_genes=subset, **fast())
    assert list(model.var_names) == expected
    assert adata.obsm["X_scvi_denoised"].shape == (N_CELLS, len(positions))
    # The counts fitted are those of the requested genes.
    np.testing.assert_array_equal(dense(model.adata.X), dense(adata[:, expected].X))


def test_subset_genes_works_without_highly_variable_column(adata):
    del adata.var["highly_variable"]
    genes = [f"gene{i}" for i in range(20, 35)]
    model = pyrovi.pp.scvi(adata, subset_genes=genes, **fast())
    assert list(model.var_names) == genes


def test_unknown_gene_names_are_listed(adata):
    before = snapshot(adata)
    with pytest.raises(KeyError, match="not in adata.var_names") as error:
        pyrovi.pp.scvi(adata, subset_genes=["gene1", "CD3E", "MS4A1"], **fast())
    assert "CD3E" in str(error.value) and "MS4A1" in str(error.value)
    assert "2 of the 3" in str(error.value)
    assert_same_anndata(adata, before)


@pytest.mark.parametrize(
    ("subset", "error", "match"),
    [
        (np.ones(N_GENES - 1, dtype=bool), ValueError, "boolean mask of length"),
        ([0, N_GENES], IndexError, "out of range"),
        (["gene1", "gene1"], ValueError, "more than once"),
    ],
)
def test_invalid_subset_genes(adata, subset, error, match):
    with pytest.raises(error, match=match):
        pyrovi.pp.scvi(adata, subset_genes=subset, **fast())


# -- models, arguments and devices ----------------------------------------------------------


def test_linear_decoder_fits_ldvae_and_stores_its_loadings(adata):
    model = pyrovi.pp.scvi(adata, linear_decoder=True, **fast())
    assert type(model) is pyrovi.LDVAE
    loadings = adata.uns["ldvae_loadings"]
    assert isinstance(loadings, pd.DataFrame)
    assert list(loadings.index) == hvg_names(adata)
    assert list(loadings.columns) == [f"Z_{i}" for i in range(N_LATENT)]
    pd.testing.assert_frame_equal(loadings, model.get_loadings())
    assert OUTPUT_KEYS <= set(adata.obsm)


def test_scvi_writes_no_loadings(adata):
    pyrovi.pp.scvi(adata, **fast())
    assert "ldvae_loadings" not in adata.uns


def test_arguments_reach_the_model_and_the_training_loop(adata, monkeypatch):
    calls = []
    original = pyrovi.SCVI.train

    def spy(self, **kwargs):
        calls.append(kwargs)
        return original(self, **kwargs)

    monkeypatch.setattr(pyrovi.SCVI, "train", spy)
    model = pyrovi.pp.scvi(
        adata, n_hidden=12, n_latent=3, n_layers=2, dispersion="gene-batch", n_epochs=4,
        lr=5e-3, train_size=0.8, batch_key="batch", use_cuda=False,
        trainer_kwargs={**QUIET, "batch_size": 64, "n_epochs_kl_warmup": 2},
        model_kwargs={"gene_likelihood": "nb", "dropout_rate": 0.2},
    )
    params = model.init_params
    assert (params["n_hidden"], params["n_latent"], params["n_layers"]) == (12, 3, 2)
    assert params["dispersion"] == "gene-batch"
    assert (params["gene_likelihood"], params["dropout_rate"]) == ("nb", 0.2)
    assert calls == [{"max_epochs": 4, "lr": 5e-3, "train_size": 0.8, "device": "cpu",
                      "progress_bar": False, "seed": 0, "batch_size": 64,
                      "n_epochs_kl_warmup": 2}]
    assert len(model.history) == 4
    assert len(model.train_indices) == 240 and len(model.validation_indices) == 60
    assert "elbo_validation" in model.history
    assert adata.obsm["X_scvi"].shape == (N_CELLS, 3)


def test_default_train_size_uses_every_cell_without_validation(adata):
    model = pyrovi.pp.scvi(adata, **fast())
    assert len(model.train_indices) == N_CELLS
    assert len(model.validation_indices) == 0
    assert "elbo_validation" not in model.history
    assert np.isfinite(model.history["elbo_train"]).all()
    assert len(model.history) == 3


def test_arguments_given_twice_are_rejected(adata):
    with pytest.raises(TypeError, match="n_epochs"):
        pyrovi.pp.scvi(adata, **fast(trainer_kwargs={"max_epochs": 5}))
    with pytest.raises(TypeError, match="n_latent"):
        pyrovi.pp.scvi(adata, **fast(model_kwargs={"n_latent": 5}))
    assert not OUTPUT_KEYS & set(adata.obsm)


def test_use_cuda_without_gpu_warns_and_trains_on_cpu(adata, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="no GPU was found"):
        model = pyrovi.pp.scvi(adata, **fast(use_cuda=True))
    assert model.device.type == "cpu"
    assert model.is_trained
    assert OUTPUT_KEYS <= set(adata.obsm)


def test_use_cuda_false_does_not_warn(adata):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = pyrovi.pp.scvi(adata, **fast(use_cuda=False))
    assert model.device.type == "cpu"


def test_use_cuda_with_gpu_trains_on_cuda(adata, monkeypatch):
    # The routing only: the (CPU-only) test machine pretends to have a GPU, and the spy
    # records the requested device before training on the CPU. Training itself must see the
    # machine as it is: on a CUDA build of torch, the optimiser asks the (absent) driver
    # whether a CUDA graph is being captured when torch says CUDA is available.
    real_is_available = torch.cuda.is_available
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    requested = []
    original = pyrovi.SCVI.train

    def spy(self, device="auto", **kwargs):
        requested.append(device)
        monkeypatch.setattr(torch.cuda, "is_available", real_is_available)
        return original(self, device="cpu", **kwargs)

    monkeypatch.setattr(pyrovi.SCVI, "train", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pyrovi.pp.scvi(adata, **fast(use_cuda=True))
    assert requested == ["cuda"]


def test_batch_key_registers_the_batches(adata):
    model = pyrovi.pp.scvi(adata, batch_key="batch", **fast())
    assert model.registry.n_batch == 2
    assert model.registry.batch_key == "batch"
    assert list(model.registry.batch_categories) == ["b0", "b1"]


def test_missing_batch_key_is_an_error_and_changes_nothing(adata):
    before = snapshot(adata)
    with pytest.raises(KeyError, match="sample"):
        pyrovi.pp.scvi(adata, batch_key="sample", **fast())
    assert_same_anndata(adata, before)


def test_seed_makes_the_call_reproducible(adata):
    first = pyrovi.pp.scvi(adata, copy=True, return_posterior=False, **fast())
    second = pyrovi.pp.scvi(adata, copy=True, return_posterior=False, **fast())
    for key in OUTPUT_KEYS:
        np.testing.assert_array_equal(first.obsm[key], second.obsm[key])


# -- outputs and what happens to the user's AnnData ----------------------------------------


def test_denoised_rows_sum_to_one_and_sample_rate_to_the_library(adata):
    model = pyrovi.pp.scvi(adata, **fast())
    denoised = adata.obsm["X_scvi_denoised"]
    sample_rate = adata.obsm["X_scvi_sample_rate"]
    assert (denoised > 0).all()
    np.testing.assert_allclose(denoised.sum(1), 1.0, rtol=1e-4)
    # Observed library over the fitted genes (not all genes) times rho.
    library = dense(adata[:, model.var_names].X).sum(1)
    assert not np.allclose(library, dense(adata.X).sum(1))
    np.testing.assert_allclose(sample_rate.sum(1), library, rtol=1e-3)
    np.testing.assert_allclose(sample_rate, denoised * library[:, None], rtol=1e-3)


@pytest.mark.parametrize(
    ("copy", "return_posterior"), [(False, False), (False, True), (True, False), (True, True)]
)
def test_return_values(adata, copy, return_posterior):
    result = pyrovi.pp.scvi(adata, copy=copy, return_posterior=return_posterior, **fast())
    if copy and return_posterior:
        assert isinstance(result, tuple) and len(result) == 2
        written, model = result
    elif copy:
        written, model = result, None
    elif return_posterior:
        written, model = adata, result
    else:
        assert result is None
        written, model = adata, None
    assert isinstance(written, anndata.AnnData)
    assert (written is adata) != copy
    assert OUTPUT_KEYS <= set(written.obsm)
    if model is not None:
        assert type(model) is pyrovi.SCVI and model.is_trained
        np.testing.assert_allclose(written.obsm["X_scvi"], model.get_latent_representation(),
                                   rtol=1e-5, atol=1e-6)


def test_copy_leaves_the_input_untouched(adata):
    before = snapshot(adata)
    written, model = pyrovi.pp.scvi(adata, copy=True, linear_decoder=True, batch_key="batch",
                                    **fast())
    assert_same_anndata(adata, before)
    assert written is not adata and model.adata is not adata
    assert OUTPUT_KEYS <= set(written.obsm)
    assert "ldvae_loadings" in written.uns
    assert REGISTRY_UNS_KEY not in written.uns
    # The copy holds everything else of the input.
    np.testing.assert_array_equal(dense(written.X), dense(before.X))
    pd.testing.assert_frame_equal(written.obs, before.obs)
    assert set(written.layers) - {None} == {"counts"}  # anndata 0.13 lists X as None


def test_in_place_adds_exactly_the_outputs(adata):
    before = snapshot(adata)
    pyrovi.pp.scvi(adata, batch_key="batch", **fast())
    assert set(adata.obsm) == set(before.obsm) | OUTPUT_KEYS
    assert REGISTRY_UNS_KEY not in adata.uns
    for key in OUTPUT_KEYS:
        del adata.obsm[key]
    assert_same_anndata(adata, before)


@pytest.mark.parametrize(
    ("value", "match"),
    [(-1.0, "negative"), (np.nan, "NaN"), (0.5, "non-integer")],
)
def test_bad_counts_raise_and_change_nothing(adata, value, match):
    counts = dense(adata.X).copy()
    counts[7, np.flatnonzero(adata.var["highly_variable"])[3]] = value
    adata.X = sp.csr_matrix(counts)
    before = snapshot(adata)
    with pytest.raises(CountDataError, match=match):
        pyrovi.pp.scvi(adata, **fast())
    assert_same_anndata(adata, before)
    assert not OUTPUT_KEYS & set(adata.obsm)


def test_cells_without_counts_over_the_selected_genes_are_explained(adata):
    counts = dense(adata.X).copy()
    counts[4, :2] = 0
    adata.X = sp.csr_matrix(counts)
    before = snapshot(adata)
    with pytest.raises(CountDataError, match="selected genes"):
        pyrovi.pp.scvi(adata, subset_genes=["gene0", "gene1"], **fast())
    assert_same_anndata(adata, before)


def test_dense_counts_and_anndata_views_are_accepted(adata):
    adata.X = dense(adata.X)
    view = adata[:150]
    # Writing into a view turns it into an actual AnnData, as anndata (and scanpy) do.
    with pytest.warns(anndata.ImplicitModificationWarning, match="view"):
        model = pyrovi.pp.scvi(view, **fast())
    assert not view.is_view
    assert model.adata.n_obs == 150
    assert view.obsm["X_scvi"].shape == (150, N_LATENT)
    assert REGISTRY_UNS_KEY not in adata.uns and "X_scvi" not in adata.obsm


# -- behaviour ------------------------------------------------------------------------------


def knn_accuracy(embedding: np.ndarray, labels: np.ndarray, k: int = 15) -> float:
    """Leave-one-out k-nearest-neighbour classification accuracy (majority vote)."""
    distances = ((embedding[:, None, :] - embedding[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    neighbours = np.argsort(distances, axis=1)[:, :k]
    codes, labels = np.unique(labels, return_inverse=True)
    votes = np.zeros((len(labels), len(codes)))
    np.add.at(votes, (np.repeat(np.arange(len(labels)), k), labels[neighbours].ravel()), 1)
    return float((votes.argmax(1) == labels).mean())


def test_latent_space_separates_the_simulated_clusters():
    adata = simulate_counts(n_cells=400, n_genes=80, n_clusters=4, n_batches=1,
                            batch_effect=0.0, cluster_separation=1.0, seed=3)
    labels = adata.obs["cluster"].to_numpy()
    # Reference: the same network before training (a random encoder of the counts already
    # groups cells somewhat, so beating chance alone would prove little).
    reference = adata.copy()
    pyrovi.SCVI.setup_anndata(reference)
    torch.manual_seed(0)
    untrained = knn_accuracy(
        pyrovi.SCVI(reference, n_hidden=32, n_latent=5).get_latent_representation(), labels
    )
    pyrovi.pp.scvi(adata, n_hidden=32, n_latent=5, n_epochs=20, use_highly_variable_genes=False,
                   use_cuda=False, return_posterior=False,
                   trainer_kwargs={**QUIET, "n_epochs_kl_warmup": 10})
    trained = knn_accuracy(adata.obsm["X_scvi"], labels)
    # Chance is 0.25 with four clusters; the true latent gives about 0.997.
    assert trained > 0.9, (untrained, trained)
    assert trained > untrained + 0.1, (untrained, trained)
