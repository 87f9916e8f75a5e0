"""ArviZ 1.x on pyrovi's export of scVI and TotalVI posteriors."""

from __future__ import annotations

import logging

import anndata
import arviz as az
import matplotlib
import numpy as np
import pytest
import torch
import xarray as xr
from arviz_plots import PlotCollection
from matplotlib.figure import Figure
from scipy.special import logsumexp

import pyrovi
from pyrovi.criticism import to_arviz
from pyrovi.datasets import simulate_counts
from tests.conftest import small_totalvi

matplotlib.use("Agg")

GROUPS = {"posterior", "posterior_predictive", "observed_data", "constant_data"}


def dense(matrix) -> np.ndarray:
    return matrix.toarray() if hasattr(matrix, "toarray") else np.asarray(matrix)


def simulated() -> anndata.AnnData:
    adata = simulate_counts(n_cells=150, n_genes=40, n_clusters=3, n_batches=2, seed=2)
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    return adata


@pytest.fixture(scope="module")
def scvi_model():
    """scVI with a latent library size (so the posterior has ``library``)."""
    adata = simulated()
    # Module fixtures are set up before the autouse seeding: seed the initial weights here.
    torch.manual_seed(0)
    model = pyrovi.SCVI(adata, n_latent=4, gene_likelihood="nb", use_observed_lib_size=False)
    model.train(max_epochs=30, progress_bar=False, seed=0)
    return adata, model


@pytest.fixture(scope="module")
def observed_library_models():
    """A trained and an untrained scVI with the observed library size, for PSIS-LOO.

    With a latent library size one cell's log-likelihood varies by hundreds to thousands
    of nats across posterior draws (an untrained encoder: tens of thousands); the
    importance ratios then underflow and ArviZ's Pareto smoothing returns NaN for some
    cells. The observed library size keeps the spread to tens of nats.
    """
    adata = simulated()
    torch.manual_seed(0)
    trained = pyrovi.SCVI(adata, n_latent=4, gene_likelihood="nb", use_observed_lib_size=True)
    trained.train(max_epochs=30, progress_bar=False, seed=0)
    untrained = pyrovi.SCVI(adata, n_latent=4, gene_likelihood="nb", use_observed_lib_size=True)
    return adata, trained, untrained


def test_scvi_export_has_named_groups_and_dims(scvi_model):
    adata, model = scvi_model
    cells = np.arange(0, 150, 3)
    idata = to_arviz(model, n_samples=100, indices=cells, seed=0)
    assert isinstance(idata, xr.DataTree)
    assert GROUPS == set(idata.children)
    z = idata.posterior["z"]
    assert z.dims == ("chain", "draw", "cell", "latent")
    assert z.shape == (1, 100, 50, 4)
    assert idata.posterior["library"].dims == ("chain", "draw", "cell")
    x = idata.posterior_predictive["x"]
    assert x.dims == ("chain", "draw", "cell", "gene")
    assert list(x.coords["gene"].values) == list(adata.var_names)
    assert list(x.coords["cell"].values) == list(adata.obs_names[cells])
    assert idata.observed_data["x"].dims == ("cell", "gene")
    np.testing.assert_array_equal(idata.observed_data["x"].values, dense(adata.X[cells]))
    assert list(idata.constant_data["batch"].values) == list(adata.obs["batch"].iloc[cells])
    # Posterior predictive draws average to the model's expected counts, gene by gene.
    predicted = x.mean(("chain", "draw", "cell")).values
    expected = model.get_normalized_expression(indices=cells, library_size="latent",
                                               n_samples=100).to_numpy().mean(0)
    assert np.corrcoef(np.log1p(predicted), np.log1p(expected))[0, 1] > 0.99


def test_arviz_summary_of_z_is_the_latent_representation(scvi_model):
    adata, model = scvi_model
    cells = np.arange(0, 150, 3)
    n_draws = 100
    idata = to_arviz(model, n_samples=n_draws, indices=cells, seed=0)
    summary = az.summary(idata, var_names=["z"], kind="stats", round_to="none")
    # One row per (cell, latent) entry, cells outer, labelled by the exported coordinates.
    assert len(summary) == 50 * 4
    assert summary.index[1] == f"z[{adata.obs_names[cells[0]]}, 1]"
    mean = summary["mean"].to_numpy().reshape(50, 4)
    assert np.isfinite(mean).all()
    # The posterior mean of z is the latent representation, to within 5 Monte Carlo
    # standard errors of a mean of independent draws (with 40 draws, whose estimated
    # standard errors have heavier tails, one CI run exceeded this bound on one of 200).
    standard_error = summary["sd"].to_numpy().reshape(50, 4) / np.sqrt(n_draws)
    latent = model.get_latent_representation(indices=cells)
    assert (np.abs(mean - latent) < 5 * standard_error).all()


def test_arviz_plots_run_on_the_export(scvi_model):
    adata, model = scvi_model
    idata = to_arviz(model, n_samples=20, indices=range(60), seed=0)
    gene = adata.var_names[0]
    observed = dense(adata.X[:60])[:, 0]
    ecdf = az.plot_ppc_dist(idata, var_names=["x"], coords={"gene": [gene]}, kind="ecdf",
                            num_samples=10, backend="matplotlib")
    assert isinstance(ecdf, PlotCollection)
    assert isinstance(ecdf.viz["figure"].item(), Figure)
    # Ten predictive ECDFs, and the observed one is that of the gene's counts in these cells.
    assert ecdf.viz["predictive_dist"]["x"].shape == (10,)
    line = ecdf.viz["observed_dist"]["x"].item()
    grid = np.asarray(line.get_xdata(), dtype=float)
    np.testing.assert_allclose(line.get_ydata(), (observed[:, None] <= grid).mean(0))
    rootogram = az.plot_ppc_rootogram(idata, var_names=["x"], coords={"gene": [gene]},
                                      backend="matplotlib")
    assert isinstance(rootogram.viz["figure"].item(), Figure)
    # Its observed markers are the frequencies of the observed counts.
    markers = {tuple(point) for point in
               rootogram.viz["observed_markers"]["x"].item().get_offsets().astype(float)}
    values, frequencies = np.unique(observed, return_counts=True)
    assert set(zip(values.astype(float), frequencies.astype(float), strict=True)) <= markers
    matplotlib.pyplot.close("all")


def test_scvi_export_subsets_sites_and_genes(scvi_model):
    adata, model = scvi_model
    genes = list(adata.var_names[[5, 1, 7]])
    idata = to_arviz(model, n_samples=5, var_names=["x"], indices=[0, 1, 2], gene_list=genes)
    assert set(idata.children) == {"posterior_predictive", "observed_data", "constant_data"}
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
    assert GROUPS == set(idata.children)
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
    summary = az.summary(idata, var_names=["protein_background"], kind="stats",
                         round_to="none")
    assert len(summary) == 120 * 5 and np.isfinite(summary["mean"]).all()
    collection = az.plot_ppc_rootogram(idata, var_names=["y"],
                                       coords={"protein": [proteins[0]]}, backend="matplotlib")
    assert isinstance(collection.viz["figure"].item(), Figure)
    matplotlib.pyplot.close("all")
    subset = to_arviz(model, n_samples=2, protein_list=proteins[2:4], var_names=["y"])
    assert list(subset.posterior_predictive["y"].coords["protein"].values) == proteins[2:4]


def test_log_likelihood_group_is_read_by_loo(observed_library_models):
    adata, model, _ = observed_library_models
    n_draws = 30
    idata = to_arviz(model, n_samples=n_draws, seed=0, log_likelihood=True)
    log_lik = idata.log_likelihood["x"]
    assert log_lik.dims == ("chain", "draw", "cell")
    assert log_lik.shape == (1, n_draws, adata.n_obs)
    # E_q[log p(x | z)] per cell: the negative reconstruction term, here averaged over
    # 30 draws per cell, there 20 evaluations of one draw per cell; both averaged over cells.
    reconstruction = np.mean([model.get_reconstruction_error()["reconstruction_loss"]
                              for _ in range(20)])
    assert abs(-float(log_lik.mean()) - reconstruction) < 0.05 * abs(reconstruction)

    loo = az.loo(idata, pointwise=True)
    assert loo.n_samples == n_draws and loo.n_data_points == adata.n_obs
    assert loo.elpd_i.dims == ("cell",)
    assert list(loo.elpd_i.coords["cell"].values) == list(adata.obs_names)
    elpd_i = loo.elpd_i.values
    assert np.isfinite(loo.elpd) and np.isfinite(elpd_i).all()
    np.testing.assert_allclose(elpd_i.sum(), loo.elpd)
    # Independent bounds, cell by cell: the LOO predictive density is a mean of the draws'
    # likelihoods under normalised weights, so it lies between their minimum and maximum;
    # the weights (Pareto-smoothed or not) decrease with the likelihood, so it is at most
    # the plain posterior mean of the likelihood (log pointwise predictive density).
    values = log_lik.values.reshape(n_draws, -1).astype(np.float64)
    lppd = logsumexp(values, axis=0) - np.log(n_draws)
    assert (elpd_i >= values.min(0) - 1e-6).all()
    assert (elpd_i <= lppd + 1e-6).all()
    np.testing.assert_allclose(loo.p, lppd.sum() - loo.elpd, rtol=1e-6)
    # And it stays near the sum of the cells' mean log-likelihoods (7-9% below it for
    # seeds 0-2: with 30 draws of a 40-gene likelihood most Pareto k exceed 1, so p_loo is
    # large; a mis-signed or mis-scaled group would be far off).
    in_sample = values.mean(0).sum()
    assert abs(loo.elpd - in_sample) < 0.2 * abs(in_sample)


def test_too_few_draws_for_loo_are_flagged(scvi_model, caplog):
    _, model = scvi_model
    with caplog.at_level(logging.WARNING, logger="pyrovi"):
        idata = to_arviz(model, n_samples=5, indices=range(10), log_likelihood=True, seed=0)
    assert "n_samples >= 25" in caplog.text
    with pytest.raises(ValueError, match="at least 5"):
        az.loo(idata)


def test_arviz_compare_ranks_trained_above_untrained(observed_library_models):
    _, trained, untrained = observed_library_models
    idatas = {name: to_arviz(model, n_samples=30, seed=0, log_likelihood=True)
              for name, model in (("trained", trained), ("untrained", untrained))}
    comparison = az.compare(idatas, round_to="none")
    assert list(comparison.index) == ["trained", "untrained"]
    assert np.isfinite(comparison["elpd"]).all()
    assert comparison.loc["trained", "elpd"] > comparison.loc["untrained", "elpd"]
    assert comparison.loc["untrained", "elpd_diff"] < 0


def test_pointwise_log_likelihood_of_rna_and_proteins():
    from pyrovi.posterior import pointwise_log_likelihood

    # 30 epochs: after 10, the protein log-likelihood of a draw could still reach -3,000 on
    # some cells, and az.loo's Pareto fit of such weights returned NaN on two of three seeds.
    adata, model = small_totalvi(n_cells=200, n_proteins=6, max_epochs=30)
    data, _, _ = model.cell_data()
    values = pointwise_log_likelihood(model.module, data, n_samples=40)
    assert set(values) == {"x", "y"}
    assert values["y"].shape == (40, adata.n_obs) and np.isfinite(values["y"]).all()
    total = -(values["x"] + values["y"]).mean()
    reconstruction = model.get_reconstruction_error()["reconstruction_loss"]
    assert abs(total - reconstruction) < 0.05 * abs(reconstruction)
    # The TotalVI export carries both sites in its log_likelihood group, read by az.loo.
    idata = to_arviz(model, n_samples=30, indices=range(50), seed=0, log_likelihood=True)
    assert set(idata.log_likelihood.data_vars) == {"x", "y"}
    for site in ("x", "y"):
        assert idata.log_likelihood[site].dims == ("chain", "draw", "cell")
        assert np.isfinite(az.loo(idata, var_name=site).elpd)
