"""Minified data: a model's counts replaced by each cell's stored posterior (scvi-hub).

A model minified by ``minify_adata`` (or set up on data minified by scvi-tools) must give
the same posterior outputs as before from the stored posterior, refuse what needs the
counts, keep it through save and load, and leave the user's AnnData untouched on refusal.
"""

from __future__ import annotations

import logging

import numpy as np
import pyro
import pytest
import scipy.sparse as sp

import pyrovi
from pyrovi.criticism import PosteriorPredictiveCheck, to_arviz
from pyrovi.data import MinifiedDataError, SetupError
from pyrovi.datasets import simulate_counts

QZM, QZV, LIBRARY, TYPE = ("scvi_latent_qzm", "scvi_latent_qzv", "observed_lib_size",
                           "_scvi_adata_minify_type")


def small_data(seed: int = 1):
    adata = simulate_counts(n_cells=200, n_genes=40, n_clusters=3, n_batches=2, seed=seed)
    adata.layers["counts"] = adata.X.copy()
    return adata


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A briefly trained SCVI saved without its data, and those data (with counts)."""
    adata = small_data()
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cluster")
    model = pyrovi.SCVI(adata, n_latent=4, n_hidden=16)
    model.train(max_epochs=4, progress_bar=False, seed=0)
    folder = tmp_path_factory.mktemp("minified") / "scvi"
    model.save(folder)
    return folder, adata


@pytest.fixture
def pair(saved):
    """The same weights twice: on the data with counts, and minified."""
    folder, adata = saved
    full = pyrovi.SCVI.load(folder, adata=adata)
    minified = pyrovi.SCVI.load(folder, adata=adata)
    minified.minify_adata()
    return full, minified


def test_minify_writes_scvi_tools_keys_and_keeps_the_latent_means_exactly(saved, pair):
    _, adata = saved
    full, minified = pair
    qzm = full.get_latent_representation()
    mini = minified.adata
    assert minified.minified_data_type == "latent_posterior_parameters"
    assert full.minified_data_type is None
    assert mini is not adata and mini.uns[TYPE] == "latent_posterior_parameters"
    assert sp.issparse(mini.X) and mini.X.shape == adata.shape and mini.X.nnz == 0
    assert mini.layers["counts"].nnz == 0
    np.testing.assert_array_equal(mini.obsm[QZM], qzm)
    np.testing.assert_array_equal(mini.obsm["X_latent_qzm"], qzm)
    assert (mini.obsm[QZV] > 0).all() and mini.obsm[QZV].shape == qzm.shape
    # The library is the observed size, the sum of counts (not its log).
    np.testing.assert_array_equal(mini.obs[LIBRARY], np.asarray(adata.X.sum(1)).ravel())
    np.testing.assert_array_equal(minified.get_latent_representation(), qzm)
    # The user's AnnData keeps its counts and gets no minified keys.
    assert adata.X.nnz > 0 and TYPE not in adata.uns and QZM not in adata.obsm


def test_latent_draws_follow_the_stored_normal(pair):
    _, minified = pair
    draws = minified.get_latent_representation(give_mean=False, n_samples=500)
    assert draws.shape == (500, minified.adata.n_obs, 4)
    # Standardized by the stored mean and variance, the 400,000 draws are N(0, 1).
    standard = (draws - minified.adata.obsm[QZM]) / np.sqrt(minified.adata.obsm[QZV])
    assert abs(standard.mean()) < 0.01 and abs(standard.std() - 1) < 0.01


@pytest.mark.parametrize("library_size", [1, 1e4, "latent"])
def test_outputs_equal_the_unminified_model_for_the_same_z_draws(pair, library_size):
    # Same seed, same standard-normal noise: the stored Normal(qzm, sqrt(qzv)) gives the
    # very draws of z the encoder's posterior gives, and the stored library the same mean.
    full, minified = pair
    outputs = []
    for model in pair:
        pyro.set_rng_seed(7)
        outputs.append(model.get_normalized_expression(library_size=library_size,
                                                       n_samples=3, return_numpy=True))
    np.testing.assert_array_equal(*outputs)
    for name in ("posterior_predictive_sample", "get_likelihood_parameters"):
        values = []
        for model in (full, minified):
            pyro.set_rng_seed(11)
            values.append(getattr(model, name)(n_samples=2))
        if isinstance(values[0], dict):
            for key in values[0]:
                np.testing.assert_array_equal(values[0][key], values[1][key])
        else:
            np.testing.assert_array_equal(*values)


def test_differential_expression_runs_without_the_count_columns(pair, caplog):
    full, minified = pair
    with caplog.at_level(logging.WARNING, logger="pyrovi"):
        de = minified.differential_expression(groupby="cluster", mode="change",
                                              n_samples=300, seed=0, silent=True)
    assert "minified" in caplog.text
    assert {"proba_de", "lfc_mean", "bayes_factor"} <= set(de.columns)
    assert not any(c.startswith(("raw_", "non_zeros")) for c in de.columns)
    assert set(de["comparison"]) == {f"{g} vs Rest" for g in minified.adata.obs["cluster"]
                                     .astype(str).unique()}
    vanilla = minified.differential_expression(groupby="cluster", n_samples=200, seed=0,
                                               silent=True)
    assert np.isfinite(vanilla["bayes_factor"]).all()


def test_outputs_that_need_counts_raise_and_name_them(saved, pair):
    folder, adata = saved
    full, minified = pair
    calls = {
        "train": lambda: minified.train(max_epochs=1, progress_bar=False),
        "get_elbo": minified.get_elbo,
        "get_reconstruction_error": minified.get_reconstruction_error,
        "get_marginal_ll": lambda: minified.get_marginal_ll(n_mc_samples=2),
        "posterior predictive check": lambda: PosteriorPredictiveCheck(
            minified.adata, {"m": minified}, n_samples=1),
        "to_arviz": lambda: to_arviz(minified, n_samples=2),
        "load_query_data": lambda: pyrovi.SCVI.load_query_data(minified.adata.copy(), full),
        "elbo on other minified data": lambda: full.get_elbo(adata=minified.adata),
    }
    for what, call in calls.items():
        with pytest.raises(MinifiedDataError, match="minified") as error:
            call()
        assert "counts" in str(error.value), what
    # With the counts passed as data, the minified model scores them again.
    assert np.isfinite(minified.get_elbo(adata=adata))
    ppc = PosteriorPredictiveCheck(adata, {"m": minified}, n_samples=1, seed=0)
    assert np.isfinite(ppc.coefficient_of_variation("cells").to_numpy()).all()


def test_card_reports_what_does_not_need_counts(pair, tmp_path):
    _, minified = pair
    card = minified.card(tmp_path / "card", n_samples=1, embedding=False)
    assert "need them" in card["needs_counts"]
    assert card["posterior_predictive_checks"] == {}
    assert "differential_expression" not in card
    assert "heldout_elbo_per_cell" not in card["training"]
    assert card["model_parameters"]["n_latent"] == 4 and card["summary_statistics"]
    assert any("stored posterior" in row["field"] for row in card["data_registry"])
    markdown = (tmp_path / "card" / "README.md").read_text()
    assert "## Checks against the observed counts" in markdown


def test_save_and_load_keep_the_minified_data(saved, pair, tmp_path):
    _, adata = saved
    full, minified = pair
    qzm = minified.adata.obsm[QZM]
    minified.save(tmp_path / "with_data", save_anndata=True)
    loaded = pyrovi.SCVI.load(tmp_path / "with_data")
    assert loaded.minified_data_type == "latent_posterior_parameters"
    assert loaded.adata.X.nnz == 0
    np.testing.assert_array_equal(loaded.get_latent_representation(), qzm)
    minified.save(tmp_path / "without_data")
    again = pyrovi.SCVI.load(tmp_path / "without_data", adata=minified.adata.copy())
    np.testing.assert_array_equal(again.get_latent_representation(), qzm)
    # A minified model loaded onto the counts is an ordinary model again.
    ordinary = pyrovi.SCVI.load(tmp_path / "without_data", adata=adata)
    assert ordinary.minified_data_type is None and np.isfinite(ordinary.get_elbo())
    # And a model saved with counts reads minified data (scvi-hub's case).
    hub = pyrovi.SCVI.load(tmp_path / "without_data", adata=loaded.adata)
    np.testing.assert_array_equal(hub.get_latent_representation(), qzm)


def test_refused_minify_leaves_the_model_and_data_untouched():
    adata = small_data()
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    uns_before, obsm_before = dict(adata.uns), set(adata.obsm)
    model = pyrovi.SCVI(adata, n_latent=3, n_hidden=8, use_observed_lib_size=False)
    with pytest.raises(ValueError, match="library size is latent"):
        model.minify_adata()
    with pytest.raises(ValueError, match="latent_posterior_parameters"):
        pyrovi.SCVI(adata, n_latent=3, n_hidden=8).minify_adata(
            minified_data_type="latent_posterior_parameters_with_counts")
    assert model.adata is adata and model.minified_data_type is None
    assert adata.X.nnz > 0 and set(adata.uns) == set(uns_before)
    assert set(adata.obsm) == obsm_before


def test_totalvi_refuses_and_names_why(cite_seq_model):
    adata, model = cite_seq_model
    with pytest.raises(ValueError, match="protein background"):
        model.minify_adata()
    assert model.adata is adata and "_scvi_adata_minify_type" not in adata.uns


@pytest.fixture
def cite_seq_model():
    from pyrovi.datasets import simulate_cite_seq

    adata = simulate_cite_seq(n_cells=60, n_genes=20, n_proteins=3, seed=0)
    pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    return adata, pyrovi.TOTALVI(adata, n_latent=3, n_hidden=8)


def minified_by_hand(adata, n_latent: int = 3, prefix: str = "scvi_"):
    """scvi-tools' minified layout built directly: zero counts and a stored posterior."""
    rng = np.random.default_rng(0)
    totals = np.asarray(adata.X.sum(1)).ravel()
    adata.X = sp.csr_matrix(adata.shape, dtype=np.float64)
    del adata.layers["counts"]
    adata.obsm[f"{prefix}latent_qzm"] = rng.normal(size=(adata.n_obs, n_latent))
    adata.obsm[f"{prefix}latent_qzv"] = rng.uniform(0.1, 1.0, size=(adata.n_obs, n_latent))
    adata.obs["observed_lib_size" if prefix == "scvi_" else "_scvi_observed_lib_size"] = totals
    adata.uns[TYPE] = "latent_posterior_parameters"
    return adata


@pytest.mark.parametrize("damage", [
    "no_variances", "no_library", "zero_variance", "shapes", "counts_left", "other_type",
    "log_library_nan"])
def test_incomplete_or_inconsistent_keys_are_refused_and_data_untouched(damage):
    adata = minified_by_hand(small_data())
    if damage == "no_variances":
        del adata.obsm[QZV]
    elif damage == "no_library":
        del adata.obs[LIBRARY]
    elif damage == "zero_variance":
        adata.obsm[QZV][0, 0] = 0.0
    elif damage == "shapes":
        adata.obsm[QZV] = adata.obsm[QZV][:, :2]
    elif damage == "counts_left":
        adata.X = sp.csr_matrix(np.ones(adata.shape))
    elif damage == "other_type":
        adata.uns[TYPE] = "latent_posterior_parameters_with_counts"
    else:
        adata.obs[LIBRARY] = np.nan
    before = (set(adata.uns), set(adata.obs.columns), set(adata.obsm))
    with pytest.raises(SetupError, match="minif|stored posterior"):
        pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    assert (set(adata.uns), set(adata.obs.columns), set(adata.obsm)) == before


def test_complete_keys_are_read_in_both_namings_and_checked_against_the_model():
    for prefix in ("scvi_", "_scvi_"):
        adata = minified_by_hand(small_data(), prefix=prefix)
        pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
        model = pyrovi.SCVI(adata, n_latent=3, n_hidden=8)
        np.testing.assert_array_equal(model.get_latent_representation(),
                                      adata.obsm[f"{prefix}latent_qzm"].astype(np.float32))
        with pytest.raises(ValueError, match="n_latent=3"):
            pyrovi.SCVI(adata, n_latent=5, n_hidden=8)
        with pytest.raises(ValueError, match="library size is latent"):
            pyrovi.SCVI(adata, n_latent=3, use_observed_lib_size=False)
    # Another model's keys: LDVAE looks for ldvae_latent_qzm and says whose these are.
    adata = minified_by_hand(small_data())
    with pytest.raises(SetupError, match="ldvae_latent_qzm.*scvi_latent_qzm"):
        pyrovi.LDVAE.setup_anndata(adata)
    with pytest.raises(SetupError, match="TOTALVI cannot read it"):
        pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key=QZM)


def test_ldvae_minifies_under_its_own_keys():
    adata = small_data()
    pyrovi.LDVAE.setup_anndata(adata, batch_key="batch")
    model = pyrovi.LDVAE(adata, n_latent=3, n_hidden=8)
    qzm = model.get_latent_representation()
    model.minify_adata(use_latent_qzm_key=None, use_latent_qzv_key=None)
    assert {"ldvae_latent_qzm", "ldvae_latent_qzv"} <= set(model.adata.obsm)
    assert "X_latent_qzm" not in model.adata.obsm
    np.testing.assert_array_equal(model.get_latent_representation(), qzm)
    assert model.get_normalized_expression().shape == adata.shape


def test_scvi_tools_minified_data_are_read_and_ours_are_read_by_scvi_tools(pair):
    scvi = pytest.importorskip("scvi")
    adata = small_data(seed=4)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    reference = scvi.model.SCVI(adata, n_latent=3, n_hidden=16)
    reference.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    qzm, qzv = reference.get_latent_representation(return_dist=True)
    adata.obsm["X_latent_qzm"], adata.obsm["X_latent_qzv"] = qzm, qzv
    reference.minify_adata()
    theirs = reference.adata
    pyrovi.SCVI.setup_anndata(theirs, batch_key="batch")
    model = pyrovi.SCVI(theirs, n_latent=3)
    assert model.minified_data_type == "latent_posterior_parameters"
    np.testing.assert_allclose(model.get_latent_representation(), qzm, rtol=1e-6)
    assert np.isfinite(model.get_normalized_expression(library_size="latent")).all().all()
    with pytest.raises(MinifiedDataError):
        model.train(max_epochs=1)
    # The other way: scvi-tools registers pyrovi's minified data as minified.
    ours = pair[1].adata.copy()
    scvi.model.SCVI.setup_anndata(ours, batch_key="batch", labels_key="cluster")
    assert scvi.model.SCVI(ours, n_latent=4, n_hidden=16).minified_data_type == (
        "latent_posterior_parameters")
