"""ArviZ export of scVI and TotalVI posteriors."""

from __future__ import annotations

import arviz as az
import matplotlib
import numpy as np
import pytest

import pyrovi
from pyrovi.datasets import simulate_counts
from pyrovi.posterior import to_arviz

from .conftest import small_totalvi

matplotlib.use("Agg")


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


@pytest.fixture(scope="module")
def scvi_model():
    adata = simulate_counts(n_cells=150, n_genes=40, n_clusters=3, n_batches=2, seed=2)
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    model = pyrovi.SCVI(adata, n_latent=4, gene_likelihood="nb", use_observed_lib_size=False)
    model.train(max_epochs=30, progress_bar=False, seed=0)
    return adata, model


def test_scvi_export_has_named_groups_and_dims(scvi_model):
    adata, model = scvi_model
    cells = np.arange(0, 150, 3)
    idata = to_arviz(model, n_samples=100, indices=cells, seed=0)
    assert {"posterior", "posterior_predictive", "observed_data", "constant_data"} <= set(
        idata.groups())
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "cell", "latent")
    assert z.shape == (1, 100, 50, 4)
    assert idata.posterior["library"].dims == ("chain", "draw", "cell")
    x = idata.posterior_predictive["x"]
    assert x.dims == ("chain", "draw", "cell", "gene")
    assert list(x.coords["gene"].values) == list(adata.var_names)
    assert list(x.coords["cell"].values) == list(adata.obs_names[cells])
    np.testing.assert_array_equal(idata.observed_data["x"].values, dense(adata.X[cells]))
    assert list(idata.constant_data["batch"].values) == list(adata.obs["batch"].iloc[cells])
    # The posterior mean of z is the latent representation (a 100-draw Monte Carlo estimate;
    # with 40 draws, whose estimated standard errors have heavier tails, one CI run exceeded
    # the 5-SE bound on one of the 200 entries).
    summary = az.summary(idata, var_names=["z"], kind="stats")
    assert len(summary) == 50 * 4
    mean = idata.posterior["z"].mean(("chain", "draw")).values
    standard_error = idata.posterior["z"].std(("chain", "draw")).values / np.sqrt(100)
    latent = model.get_latent_representation(indices=cells)
    assert (np.abs(mean - latent) < 5 * standard_error).all()
    # Posterior predictive draws average to the model's expected counts, gene by gene.
    predicted = x.mean(("chain", "draw", "cell")).values
    expected = model.get_normalized_expression(indices=cells, library_size="latent",
                                               n_samples=100).to_numpy().mean(0)
    assert np.corrcoef(np.log1p(predicted), np.log1p(expected))[0, 1] > 0.99
    axes = az.plot_ppc(idata, var_names=["x"], num_pp_samples=10, random_seed=0)
    assert np.size(axes) >= 1
    matplotlib.pyplot.close("all")


def test_scvi_export_subsets_sites_and_genes(scvi_model):
    adata, model = scvi_model
    genes = list(adata.var_names[[5, 1, 7]])
    idata = to_arviz(model, n_samples=5, var_names=["x"], indices=[0, 1, 2], gene_list=genes)
    assert "posterior" not in idata.groups()
    assert list(idata.posterior_predictive["x"].coords["gene"].values) == genes
    np.testing.assert_array_equal(idata.observed_data["x"].values, dense(adata[[0, 1, 2], genes].X))
    with pytest.raises(ValueError, match="pass indices="):
        to_arviz(model, n_samples=10**6)
    with pytest.raises(ValueError, match="has no proteins"):
        to_arviz(model, n_samples=2, protein_list=["CD3"])


def test_totalvi_export_has_protein_groups():
    adata, model = small_totalvi(n_cells=120, n_proteins=5)
    idata = to_arviz(model, n_samples=8, seed=0)
    proteins = list(adata.obsm["protein_expression"].columns)
    assert idata.posterior["z"].dims == ("chain", "draw", "cell", "latent")
    background = idata.posterior["protein_background"]
    assert background.dims == ("chain", "draw", "cell", "protein")
    assert list(background.coords["protein"].values) == proteins
    y = idata.posterior_predictive["y"]
    assert y.dims == ("chain", "draw", "cell", "protein") and y.shape == (1, 8, 120, 5)
    np.testing.assert_array_equal(idata.observed_data["y"].values,
                                  adata.obsm["protein_expression"].to_numpy())
    assert idata.posterior_predictive["x"].shape == (1, 8, 120, 30)
    # Observed library size: a constant, not a posterior variable.
    assert "library" not in idata.posterior
    np.testing.assert_allclose(idata.constant_data["log_library"].values,
                               np.log(dense(adata.X).sum(1)), rtol=1e-5)
    assert len(az.summary(idata, var_names=["protein_background"], kind="stats")) == 120 * 5
    az.plot_ppc(idata, var_names=["y"], num_pp_samples=5, random_seed=0)
    matplotlib.pyplot.close("all")
    subset = to_arviz(model, n_samples=2, protein_list=proteins[2:4], var_names=["y"])
    assert list(subset.posterior_predictive["y"].coords["protein"].values) == proteins[2:4]


def test_log_likelihood_group_supports_model_comparison(scvi_model):
    adata, model = scvi_model
    idata = to_arviz(model, n_samples=30, seed=0, log_likelihood=True)
    log_lik = idata.log_likelihood["x"]
    assert log_lik.dims == ("chain", "draw", "cell")
    assert log_lik.shape == (1, 30, adata.n_obs)
    # E_q[log p(x | z, l)] per cell: the negative reconstruction term, here averaged over
    # 30 draws per cell, there 20 evaluations of one draw per cell; both averaged over cells
    # (the draws of a latent library make single values heavy-tailed, hence 5%).
    reconstruction = np.mean([model.get_reconstruction_error()["reconstruction_loss"]
                              for _ in range(20)])
    assert abs(-float(log_lik.mean()) - reconstruction) < 0.05 * abs(reconstruction)
    untrained = pyrovi.SCVI(adata, n_latent=4, gene_likelihood="nb",
                            use_observed_lib_size=False)
    untrained_idata = to_arviz(untrained, n_samples=30, seed=0, log_likelihood=True)
    comparison = az.compare({"trained": idata, "untrained": untrained_idata})
    assert comparison.index[0] == "trained"
    assert comparison.loc["trained", "elpd_loo"] > comparison.loc["untrained", "elpd_loo"]


def test_pointwise_log_likelihood_of_rna_and_proteins():
    from pyrovi.posterior import pointwise_log_likelihood

    adata, model = small_totalvi(n_cells=200, n_proteins=6, max_epochs=10)
    data, _, _ = model._cell_tensors()
    values = pointwise_log_likelihood(model.module, data, n_samples=40)
    assert set(values) == {"x", "y"}
    assert values["y"].shape == (40, adata.n_obs) and np.isfinite(values["y"]).all()
    total = -(values["x"] + values["y"]).mean()
    reconstruction = model.get_reconstruction_error()["reconstruction_loss"]
    assert abs(total - reconstruction) < 0.05 * abs(reconstruction)
