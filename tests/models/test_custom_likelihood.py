"""A user's gene_likelihood callable through training, every output, save/load and TotalVI."""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyrovi
from pyrovi.criticism import PosteriorPredictiveCheck, to_arviz
from pyrovi.datasets import simulate_cite_seq


def gamma_poisson(mu, theta, zi_logits):
    """The negative binomial written as Pyro's gamma-Poisson (another parameterisation)."""
    return dist.GammaPoisson(concentration=theta, rate=theta / mu)


def gamma_poisson_per_cell(mu, theta, zi_logits):
    """The same, already a distribution over the genes of a cell."""
    return dist.GammaPoisson(theta.expand_as(mu), theta / mu).to_event(1)


class RecordingZIP:
    """Zero-inflated Poisson using the decoder's zero-inflation logits; counts its calls."""

    def __init__(self):
        self.shapes = []

    def __call__(self, mu, theta, zi_logits):
        self.shapes.append((tuple(mu.shape), tuple(theta.shape), tuple(zi_logits.shape)))
        return dist.ZeroInflatedPoisson(rate=mu, gate_logits=zi_logits)


def elbo_and_marginal(model, seed=3):
    pyro.set_rng_seed(seed)
    elbo = model.get_elbo(return_mean=False)
    pyro.set_rng_seed(seed)
    return elbo, model.get_marginal_ll(n_mc_samples=5, return_mean=False)


@pytest.mark.parametrize("likelihood", [gamma_poisson, gamma_poisson_per_cell])
def test_a_callable_negative_binomial_gives_the_builtin_nb_objective(small_adata, likelihood):
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    builtin = pyrovi.SCVI(small_adata, n_hidden=32, n_latent=3, gene_likelihood="nb")
    builtin.train(max_epochs=10, progress_bar=False, seed=0)
    custom = pyrovi.SCVI(small_adata, n_hidden=32, n_latent=3, gene_likelihood=likelihood)
    # A callable gets a zero-inflation head as well (unused by this likelihood).
    missing, unexpected = custom.module.load_state_dict(builtin.module.state_dict(),
                                                        strict=False)
    assert set(missing) == {"decoder.zi_head.weight", "decoder.zi_head.bias"} and not unexpected
    for expected, value in zip(elbo_and_marginal(builtin), elbo_and_marginal(custom),
                               strict=True):
        np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_a_custom_likelihood_runs_through_training_and_every_output(small_adata):
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch", labels_key="cluster")
    likelihood = RecordingZIP()
    model = pyrovi.SCVI(small_adata, n_hidden=32, n_latent=3, gene_likelihood=likelihood)
    model.train(max_epochs=20, lr=3e-3, progress_bar=False, seed=0)
    elbo = model.history["elbo_validation"]
    assert np.isfinite(elbo).all() and elbo.iloc[-1] < elbo.iloc[0] - 100
    # The callable sees per-cell means, per-gene inverse dispersions and per-cell logits.
    mu_shape, theta_shape, zi_shape = likelihood.shapes[0]
    assert mu_shape == zi_shape == (128, 60) and theta_shape[-1] == 60

    expression = model.get_normalized_expression()
    assert expression.shape == (300, 60)
    np.testing.assert_allclose(expression.sum(1), 1.0, rtol=1e-4)
    assert set(model.get_likelihood_parameters(indices=[0, 1])) == {
        "mean", "dispersions", "dropout"}

    calls = len(likelihood.shapes)
    counts = model.posterior_predictive_sample(n_samples=3)
    assert len(likelihood.shapes) > calls  # drawn from the user's distribution
    assert counts.shape == (300, 60, 3) and (counts == np.round(counts)).all()
    # The draws have the zero-inflated Poisson's mean (1 - sigmoid(gate logit)) * mu.
    params = model.get_likelihood_parameters(n_samples=3, give_mean=True)
    expected = (params["mean"] / (1 + np.exp(params["dropout"]))).sum()
    np.testing.assert_allclose(counts.mean(-1).sum(), expected, rtol=0.02)
    observed = small_adata.X.toarray()

    val = model.validation_indices
    marginal = model.get_marginal_ll(indices=val, n_mc_samples=20)
    assert np.isfinite(marginal) and marginal > model.get_elbo(indices=val)

    de = model.differential_expression(groupby="cluster", n_samples=300, seed=0)
    assert set(de["group1"]) == {"c0", "c1", "c2"}
    assert de["proba_m1"].between(0, 1).all() and np.isfinite(de["bayes_factor"]).all()

    ppc = PosteriorPredictiveCheck(small_adata, {"zip": model}, n_samples=3, seed=0,
                                   progress_bar=False)
    cv = ppc.coefficient_of_variation("features")
    assert list(cv.columns) == ["zip", "Raw"] and np.isfinite(cv.to_numpy()).all()

    idata = to_arviz(model, n_samples=4, indices=range(20), seed=0)
    assert idata.posterior_predictive["x"].shape == (1, 4, 20, 60)
    np.testing.assert_array_equal(idata.observed_data["x"].to_numpy(), observed[:20])


def test_a_custom_likelihood_is_asked_for_again_on_load(small_adata, tmp_path):
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    # A lambda cannot be pickled: save stores a marker instead and still succeeds.
    model = pyrovi.SCVI(small_adata, n_hidden=32, n_latent=3,
                        gene_likelihood=lambda mu, theta, zi: gamma_poisson(mu, theta, zi))
    model.train(max_epochs=5, progress_bar=False, seed=0)
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"gene_likelihood= \(it was .*<lambda>\).*"
                                         r"SCVI.load\(dir_path, adata, gene_likelihood=...\)"):
        pyrovi.SCVI.load(tmp_path / "m", adata=small_adata)
    loaded = pyrovi.SCVI.load(tmp_path / "m", adata=small_adata, gene_likelihood=gamma_poisson)
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
    for expected, value in zip(elbo_and_marginal(model), elbo_and_marginal(loaded),
                               strict=True):
        np.testing.assert_array_equal(value, expected)
    # Built-in likelihoods are saved as before and need nothing.
    nb = pyrovi.SCVI(small_adata, n_hidden=32, n_latent=3, gene_likelihood="nb")
    nb.save(tmp_path / "nb")
    assert pyrovi.SCVI.load(tmp_path / "nb", adata=small_adata).init_params[
        "gene_likelihood"] == "nb"
    with pytest.raises(TypeError, match="were saved with the model"):
        pyrovi.SCVI.load(tmp_path / "nb", adata=small_adata, gene_likelihood=gamma_poisson)


def test_a_callable_that_returns_the_wrong_thing_fails_with_a_clear_message(small_adata):
    pyrovi.SCVI.setup_anndata(small_adata)
    torch_only = pyrovi.SCVI(small_adata, n_hidden=16, n_latent=2,
                             gene_likelihood=lambda mu, theta, zi: torch.distributions.Poisson(mu))
    with pytest.raises(TypeError, match="must return a Pyro distribution"):
        torch_only.train(max_epochs=1, progress_bar=False)
    summed = pyrovi.SCVI(small_adata, n_hidden=16, n_latent=2,
                         gene_likelihood=lambda mu, theta, zi: dist.Poisson(mu.sum(-1)))
    with pytest.raises(ValueError, match=r"batch shape \(128,\).*mu of shape \(128, 60\)"):
        summed.train(max_epochs=1, progress_bar=False)


def test_totalvi_takes_a_custom_rna_likelihood():
    adata = simulate_cite_seq(n_cells=200, n_genes=30, n_proteins=6, seed=0)
    pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                 batch_key="batch")
    builtin = pyrovi.TOTALVI(adata, n_latent=4, n_hidden=32, gene_likelihood="nb")
    builtin.train(max_epochs=10, progress_bar=False, seed=0)
    custom = pyrovi.TOTALVI(adata, n_latent=4, n_hidden=32, gene_likelihood=gamma_poisson)
    custom.module.load_state_dict(builtin.module.state_dict(), strict=False)
    elbos = []
    for model in (builtin, custom):
        pyro.set_rng_seed(1)
        elbos.append(model.get_elbo(return_mean=False))
    np.testing.assert_allclose(elbos[1], elbos[0], rtol=1e-5)

    custom.train(max_epochs=5, progress_bar=False, seed=0)
    assert np.isfinite(custom.history["elbo_validation"]).all()
    rna, protein = custom.get_normalized_expression()
    assert rna.shape == (200, 30) and protein.shape == (200, 6)
    assert custom.posterior_predictive_sample(n_samples=2).shape == (200, 36, 2)
    with pytest.raises(ValueError, match="'nb', 'zinb' or a callable"):
        pyrovi.TOTALVI(adata, gene_likelihood="poisson")
