"""Careless and hostile inputs get a clear error, and nothing is used silently.

Each test names the input a user got wrong and checks the message and that the user's
objects are left as they were (the table in docs/bad_inputs.md lists them all).
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap
import warnings

import anndata
import mudata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import pyrovi
from pyrovi.data import REGISTRY_UNS_KEY
from pyrovi.data.validation import DataChangedError, fingerprint_rows
from pyrovi.datasets import simulate_cite_seq, simulate_counts
from tests.conftest import SHARED_DATA


@pytest.fixture
def adata():
    data = simulate_counts(n_cells=120, n_genes=30, n_clusters=2, n_batches=2, seed=5)
    data.obs["batch"] = data.obs["batch"].astype(str)
    return data


def trained(adata, **setup):
    pyrovi.SCVI.setup_anndata(adata, **setup)
    return pyrovi.SCVI(adata, n_hidden=8, n_latent=2).train(max_epochs=1, progress_bar=False,
                                                             seed=0)


# -- data changed after set-up --------------------------------------------------------------


def normalize_in_place(x):
    totals = np.asarray(x.sum(1)).ravel()
    x.data /= np.repeat(totals, np.diff(x.indptr)) / 1e4


def log_in_place(x):
    np.log1p(x.data, out=x.data)


def negate_in_place(x):
    x.data *= -1


@pytest.mark.parametrize("change", [normalize_in_place, log_in_place, negate_in_place],
                         ids=["normalize_total", "log1p", "negate"])
def test_counts_changed_in_place_after_setup_are_refused(adata, change):
    model = trained(adata)
    change(adata.X)
    for use in (lambda: model.train(max_epochs=1, progress_bar=False),
                model.get_latent_representation, model.get_normalized_expression,
                lambda: pyrovi.SCVI(adata)):
        with pytest.raises(DataChangedError, match="changed after setup_anndata.*setup_anndata"):
            use()


def test_nan_written_into_any_cell_is_refused(adata):
    model = trained(adata)
    hashed = set(fingerprint_rows(adata.n_obs))
    row = next(r for r in range(adata.n_obs) if r not in hashed)  # the fingerprint cannot see it
    adata.X[row, int(adata.X[row].indices[0])] = np.nan
    with pytest.raises(DataChangedError, match="NaN"):
        model.train(max_epochs=1, progress_bar=False)
    with pytest.raises(DataChangedError, match="NaN"):
        model.get_latent_representation(indices=[row])


def test_genes_subset_without_a_new_setup_are_refused(adata):
    trained(adata)
    subset = adata[:, :20].copy()  # carries the old registry in uns
    with pytest.raises(DataChangedError, match="30 genes at setup|was 120 x 30"):
        pyrovi.SCVI(subset)


# -- MuData: obs columns are matched by cell name -----------------------------------------


def cite_mudata(seed=0):
    cells = simulate_cite_seq(n_cells=80, n_genes=20, n_proteins=4, seed=seed)
    rna = anndata.AnnData(cells.X.copy(), obs=cells.obs[["cell_type"]].copy(),
                          var=cells.var.copy())
    protein = anndata.AnnData(cells.obsm["protein_expression"].to_numpy().astype(np.float32),
                              obs=pd.DataFrame(index=cells.obs_names))
    protein.var_names = [str(c) for c in cells.obsm["protein_expression"].columns]
    return cells, rna, protein


def test_a_batch_column_from_another_modality_is_matched_by_cell_name():
    cells, rna, protein = cite_mudata()
    meta = anndata.AnnData(obs=cells.obs[["batch"]].iloc[::-1].copy())  # reversed cell order
    mdata = mudata.MuData({"rna": rna, "protein": protein, "meta": meta})
    pyrovi.TOTALVI.setup_mudata(mdata, batch_key="batch", modalities={
        "rna_layer": "rna", "protein_layer": "protein", "batch_key": "meta"})
    model = pyrovi.TOTALVI(mdata, n_latent=2, n_hidden=8)
    codes = np.asarray(model.registry.batch_categories)[
        model.cell_data()[0].batch_index.numpy()]
    np.testing.assert_array_equal(codes, cells.obs["batch"].astype(str).to_numpy())


def test_a_modality_without_every_rna_cell_is_refused():
    cells, rna, protein = cite_mudata()
    meta = anndata.AnnData(obs=cells.obs[["batch"]].iloc[:50].copy())
    mdata = mudata.MuData({"rna": rna, "protein": protein, "meta": meta})
    with pytest.raises(KeyError, match="lacks 30 of the RNA modality's cells"):
        pyrovi.TOTALVI.setup_mudata(mdata, batch_key="batch", modalities={
            "rna_layer": "rna", "protein_layer": "protein", "batch_key": "meta"})


# -- outputs on other data leave that data's set-up alone ---------------------------------


def test_outputs_and_load_leave_the_querys_own_setup_alone(adata, tmp_path):
    model = trained(adata, batch_key="batch")
    query = adata.copy()
    del query.uns[REGISTRY_UNS_KEY]
    pyrovi.SCVI.setup_anndata(query)  # the query's own set-up: no batch key
    own = dict(query.uns[REGISTRY_UNS_KEY])
    model.get_latent_representation(query)
    model.differential_expression(query, groupby="cluster", n_samples=10, silent=True)
    assert query.uns[REGISTRY_UNS_KEY] == own
    model.save(tmp_path / "model")
    loaded = pyrovi.SCVI.load(tmp_path / "model", query)
    assert query.uns[REGISTRY_UNS_KEY] == own
    assert loaded.registry.batch_key == "batch"
    assert pyrovi.SCVI(query).registry.batch_key is None  # still the query's own


# -- indices ------------------------------------------------------------------------------


@pytest.mark.parametrize("indices, error, message", [
    (np.ones(50, dtype=bool), ValueError, "mask of 50 entries, but there are 120 cells"),
    (np.array([0.0, 1.7]), TypeError, "floats"),
    ([], ValueError, "no cell"),
    ([0, 120], ValueError, "outside 0..119"),
    ([-1], ValueError, "outside 0..119"),
    (["AAA"], TypeError, "get_indexer"),
])
def test_indices_are_checked_the_same_way_by_every_output(adata, indices, error, message):
    from pyrovi.criticism import PosteriorPredictiveCheck, to_arviz

    model = trained(adata)
    for output in (lambda: model.get_latent_representation(indices=indices),
                   lambda: model.get_elbo(indices=indices),
                   lambda: model.get_normalized_expression(indices=indices),
                   lambda: model.posterior_predictive_sample(indices=indices),
                   lambda: to_arviz(model, n_samples=2, indices=indices),
                   lambda: PosteriorPredictiveCheck(adata, {"m": model}, n_samples=1,
                                                    indices=indices, progress_bar=False)):
        with pytest.raises(error, match=message):
            output()


# -- numerical edge cases -----------------------------------------------------------------


def test_a_cell_of_a_million_counts_keeps_the_elbo_finite(adata):
    counts = adata.X.toarray()
    counts[0] = 0
    counts[0, 3] = 1e6
    adata.X = sp.csr_matrix(counts)
    pyrovi.SCVI.setup_anndata(adata)
    model = pyrovi.SCVI(adata, n_hidden=8, n_latent=2, use_observed_lib_size=False)
    assert np.isfinite(model.get_elbo(return_mean=False)).all()
    # A library drawn far below the data: the mean would underflow to 0 and log p be -inf.
    module = model.module
    z = torch.zeros(2, 2)
    params = module.generative(z, torch.full((2, 1), -200.0), torch.zeros(2, 1, dtype=torch.long))
    x = torch.zeros(2, adata.n_vars)
    x[:, 3] = 1e6
    assert torch.isfinite(module.likelihood(params).log_prob(x)).all()


def test_outputs_refuse_after_training_diverged(adata):
    pyrovi.SCVI.setup_anndata(adata)
    model = pyrovi.SCVI(adata, n_hidden=8, n_latent=2)
    with torch.no_grad():
        next(model.module.decoder.parameters()).fill_(float("nan"))  # what divergence leaves
    with pytest.raises(FloatingPointError):
        model.train(max_epochs=1, progress_bar=False)
    with pytest.raises(RuntimeError, match="training diverged"):
        model.get_latent_representation()


def test_integer_gene_names_are_refused_at_setup(adata):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own notice about names that are not text
        adata.var_names = pd.Index(range(adata.n_vars))
    with pytest.raises(KeyError, match="astype\\(str\\)"):
        pyrovi.SCVI.setup_anndata(adata)
    assert REGISTRY_UNS_KEY not in adata.uns


# -- clear errors for the unclear ones ------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    ({"max_epochs": 0}, "max_epochs must be a positive integer"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
    ({"batch_size": 1}, "at least two cells per minibatch"),
    ({"train_indices": [0], "validation_indices": [1, 2]}, "1 training cell"),
    ({"seed": 0.5}, "seed must be an integer"),
    ({"seed": "0"}, "seed must be an integer"),
    ({"lr": -1.0}, "lr must be a non-negative number"),
])
def test_bad_training_arguments_get_clear_errors(adata, options, message):
    pyrovi.SCVI.setup_anndata(adata)
    model = pyrovi.SCVI(adata, n_hidden=8, n_latent=2)
    with pytest.raises((ValueError, TypeError), match=message):
        model.train(progress_bar=False, **options)


@pytest.mark.parametrize("options", [{"n_latent": 0}, {"n_hidden": -3}, {"n_layers": 0},
                                     {"n_hidden": 2.5}])
def test_bad_layer_sizes_get_clear_errors(adata, options):
    pyrovi.SCVI.setup_anndata(adata)
    name = next(iter(options))
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        pyrovi.SCVI(adata, **options)


def test_one_covariate_key_given_as_a_string_is_one_column(adata):
    adata.obs["site"] = np.where(np.arange(adata.n_obs) % 2, "x", "y")
    adata.obs["depth"] = np.linspace(0.0, 1.0, adata.n_obs)
    pyrovi.SCVI.setup_anndata(adata, categorical_covariate_keys="site",
                              continuous_covariate_keys="depth")
    registry = pyrovi.SCVI(adata, n_hidden=8).registry
    assert registry.categorical_covariate_keys == ["site"]
    assert registry.continuous_covariate_keys == ["depth"]


def test_covariates_and_size_factors_beyond_float32_are_refused(adata):
    adata.obs["huge"] = 1e30
    with pytest.raises(KeyError, match="float32"):
        pyrovi.SCVI.setup_anndata(adata, continuous_covariate_keys=["huge"])
    with pytest.raises(KeyError, match="float32"):
        pyrovi.SCVI.setup_anndata(adata, size_factor_key="huge")
    assert REGISTRY_UNS_KEY not in adata.uns


def test_an_anndata_without_genes_is_named_as_such(adata):
    empty = adata[:, []].copy()
    with pytest.raises(KeyError, match="no genes"):
        pyrovi.SCVI.setup_anndata(empty)


def test_a_full_disk_gets_our_message_and_keeps_the_previous_model(adata, tmp_path,
                                                                      monkeypatch):
    from pyrovi.io import bundle

    model = trained(adata)
    model.save(tmp_path / "model")

    def no_space(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bundle, "_write_bytes", no_space)
    with pytest.raises(OSError, match="disk is full.*intact"):
        model.save(tmp_path / "model", overwrite=True)
    monkeypatch.undo()
    pyrovi.SCVI.load(tmp_path / "model", adata)


def test_a_corrupt_data_file_gets_a_one_line_error(tmp_path, capsys):
    from pyrovi.cli import main

    (tmp_path / "broken.h5ad").write_bytes(b"\x89HDF\r\n" + bytes(200))
    assert main(["train", str(tmp_path / "broken.h5ad"), "--out", str(tmp_path / "run"),
                 "-q"]) == 1
    assert "is not a readable h5ad file" in capsys.readouterr().err


def test_totalvi_trains_on_all_cells_without_the_early_stopping_it_cannot_do():
    cells = simulate_cite_seq(n_cells=60, n_genes=15, n_proteins=3, seed=2)
    pyrovi.TOTALVI.setup_anndata(cells, protein_expression_obsm_key="protein_expression")
    model = pyrovi.TOTALVI(cells, n_latent=2, n_hidden=8)
    model.train(max_epochs=2, train_size=1.0, progress_bar=False)
    assert model.train_params["early_stopping"] is False and len(model.history) == 2
    with pytest.raises(ValueError, match="no validation cells"):
        model.train(max_epochs=2, train_size=1.0, early_stopping=True, progress_bar=False)


def test_resume_with_other_max_epochs_gets_the_librarys_error(adata, tmp_path, capsys):
    from pyrovi.cli import main

    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)
    run = ["train", str(data), "--out", str(tmp_path / "run"), "-q", "--no-progress",
           "--no-umap", "--no-card", "--n-hidden", "8"]
    assert main([*run, "--max-epochs", "3"]) == 0
    assert main([*run, "--max-epochs", "5", "--resume"]) == 1
    assert "max_epochs=3" in capsys.readouterr().err


# -- seeds ----------------------------------------------------------------------------------

SEEDED_RUN = textwrap.dedent("""
    import hashlib, sys
    import anndata, torch
    import pyrovi
    adata = anndata.read_h5ad(sys.argv[1])[:1500].copy()
    pyrovi.SCVI.setup_anndata(adata, drop_empty_cells=True)
    model = pyrovi.SCVI(adata).train(max_epochs=2, seed=0, progress_bar=False)
    latent = model.get_latent_representation()
    print(model.history["elbo_train"].tolist(), hashlib.sha1(latent.tobytes()).hexdigest())
""")


@pytest.mark.slow
def test_a_seeded_run_is_the_same_in_two_fresh_processes():
    # Real sparse data; the initial weights come from the seed too, not from the process's
    # randomly seeded generator.
    path = SHARED_DATA / "mouse_brain_10k.h5ad"
    if not path.exists():
        pytest.skip(f"{path} not found: the real datasets live in ../shared/data.")
    runs = [subprocess.run([sys.executable, "-c", SEEDED_RUN, str(path)], check=True,
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
            for _ in range(2)]
    assert runs[0] == runs[1]


def test_settings_seed_seeds_the_initial_weights(adata):
    pyrovi.SCVI.setup_anndata(adata)
    pyrovi.settings.seed = 3
    first = pyrovi.SCVI(adata, n_hidden=8).module.state_dict()
    pyrovi.settings.seed = 3
    second = pyrovi.SCVI(adata, n_hidden=8).module.state_dict()
    for name, tensor in first.items():
        torch.testing.assert_close(tensor, second[name], rtol=0, atol=0)
    with pytest.raises(TypeError, match="integer"):
        pyrovi.settings.seed = 1.5
