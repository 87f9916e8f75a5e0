"""The generic sampling core on a model/guide pair written here, outside pyrovi.

A linear-Gaussian factor model with an exact amortized posterior: every posterior and
posterior predictive moment has a closed form to check the samples against.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovi.datasets import simulate_counts
from pyrovi.posterior import iterate_posterior, posterior_samples
from pyrovi.posterior.core import PosteriorDraw

N_LATENT, N_FEATURES, NOISE = 2, 5, 0.5


class LinearGaussianPair(nn.Module):
    """z ~ N(0, I); x | z ~ N(W z, s² I); q(z | x) the exact posterior (a user's own pair)."""

    observed_sites = ("x",)
    cell_plate = "my_cells"

    def __init__(self, loadings: torch.Tensor, noise: float):
        super().__init__()
        self.register_buffer("loadings", loadings)
        self.noise = noise
        precision = torch.eye(loadings.shape[1]) + loadings.T @ loadings / noise**2
        self.register_buffer("posterior_cov", torch.linalg.inv(precision))

    def model(self, x):
        with pyro.plate("my_cells", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], N_LATENT]).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.loadings.T, self.noise).to_event(1), obs=x)

    def guide(self, x):
        loc = x @ self.loadings @ self.posterior_cov / self.noise**2
        with pyro.plate("my_cells", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, self.posterior_cov))


@pytest.fixture
def pair_and_data():
    torch.manual_seed(0)
    loadings = torch.randn(N_FEATURES, N_LATENT)
    pair = LinearGaussianPair(loadings, NOISE)
    z = torch.randn(40, N_LATENT)
    x = z @ loadings.T + NOISE * torch.randn(40, N_FEATURES)
    return pair, x


def test_samples_of_a_user_pair_match_the_closed_form(pair_and_data):
    pair, x = pair_and_data
    draws = posterior_samples(pair, {"x": x}, n_samples=1500, batch_size=24)
    assert list(draws) == ["z", "x"]  # latent sites of the guide, then the declared observed
    assert draws["z"].shape == (1500, 40, N_LATENT)
    assert draws["x"].shape == (1500, 40, N_FEATURES)
    cov = pair.posterior_cov.numpy()
    z_mean = (x @ pair.loadings @ pair.posterior_cov / NOISE**2).numpy()
    W = pair.loadings.numpy()
    # Posterior predictive: x* | x ~ N(W E[z|x], W Σ W' + s² I).
    x_mean = z_mean @ W.T
    x_var = np.diag(W @ cov @ W.T) + NOISE**2
    se_z = np.sqrt(np.diag(cov) / 1500)
    se_x = np.sqrt(x_var / 1500)
    assert np.abs(draws["z"].mean(0) - z_mean).max() < 5 * se_z.max()
    assert np.abs(draws["x"].mean(0) - x_mean).max() < 5 * se_x.max()
    np.testing.assert_allclose(draws["z"].var(0).mean(0), np.diag(cov), rtol=0.12)
    np.testing.assert_allclose(draws["x"].var(0).mean(0), x_var, rtol=0.12)
    # The posterior predictive is sampled, not the data handed back.
    assert not np.allclose(draws["x"][0], x.numpy())


def test_batching_and_cell_order_do_not_change_the_draws(pair_and_data):
    pair, x = pair_and_data
    picked = [39, 3, 17, 0]
    torch.manual_seed(1)
    small = posterior_samples(pair, {"x": x}, ["z"], n_samples=1, indices=picked, batch_size=1)
    torch.manual_seed(1)
    whole = posterior_samples(pair, {"x": x[picked]}, ["z"], n_samples=1, batch_size=64)
    # Same cells, same order; draws differ only by Monte Carlo noise around the same means.
    z_mean = (x @ pair.loadings @ pair.posterior_cov / NOISE**2).numpy()[picked]
    for draws in (small, whole):
        assert draws["z"].shape == (1, 4, N_LATENT)
        assert np.abs(draws["z"][0] - z_mean).max() < 5 * pair.posterior_cov.max().sqrt().item()


def test_cell_axis_is_found_from_the_plate_when_cells_are_not_first():
    """A pair whose per-cell site puts features first: samples still come cells-first."""

    class FeaturesFirst(nn.Module):
        cell_plate = "cells"

        def model(self, x):
            with pyro.plate("cells", x.shape[0], dim=-1):
                with pyro.plate("features", x.shape[1], dim=-2):
                    pyro.sample("x", dist.Poisson(torch.full((x.shape[1], x.shape[0]), 3.0)),
                                obs=x.T)

        def guide(self, x):
            pass

    x = torch.ones(7, 3)
    draws = posterior_samples(FeaturesFirst(), {"x": x}, n_samples=300, batch_size=4)
    assert list(draws) == ["x"]  # observed sites found without a declaration
    assert draws["x"].shape == (300, 7, 3)
    np.testing.assert_allclose(draws["x"].mean(), 3.0, rtol=0.03)


def test_iterate_posterior_running_mean_equals_mean_of_kept_draws(pair_and_data):
    pair, x = pair_and_data

    def z(draw: PosteriorDraw):
        return {"z": draw.guide.nodes["z"]["value"]}

    torch.manual_seed(3)
    kept = iterate_posterior(pair, {"x": x}, z, n_samples=6, batch_size=16)["z"]
    torch.manual_seed(3)
    mean = iterate_posterior(pair, {"x": x}, z, n_samples=6, batch_size=16, reduce="mean")["z"]
    torch.testing.assert_close(kept.mean(0), mean)


def test_bad_arguments_are_reported(pair_and_data):
    pair, x = pair_and_data
    with pytest.raises(KeyError, match="No sample site 'w'"):
        posterior_samples(pair, {"x": x}, ["w"])
    with pytest.raises(ValueError, match="same number of rows"):
        posterior_samples(pair, {"x": x, "other": x[:3]}, ["z"])
    with pytest.raises(TypeError, match="CellTensors, ArrayTensors or a mapping"):
        posterior_samples(pair, x, ["z"])
    with pytest.raises(ValueError, match="n_samples"):
        posterior_samples(pair, {"x": x}, ["z"], n_samples=0)


def test_scvi_outputs_are_thin_calls_into_the_core():
    """SCVI's public outputs agree with the generic sampler on the same module."""
    import pyrovi
    from pyrovi.data import build_cell_tensors

    adata = simulate_counts(n_cells=120, n_genes=30, n_clusters=2, seed=0)
    pyrovi.SCVI.setup_anndata(adata)
    model = pyrovi.SCVI(adata, n_latent=3, gene_likelihood="nb")
    model.train(max_epochs=3, progress_bar=False, seed=0)
    data = build_cell_tensors(adata, model.registry)
    torch.manual_seed(5)
    generic = posterior_samples(model.module, data, ["x"], n_samples=3)["x"]
    torch.manual_seed(5)
    specific = model.posterior_predictive_sample(n_samples=3)
    np.testing.assert_array_equal(np.moveaxis(specific, -1, 0), generic)
    latent = posterior_samples(model.module, data, ["z"], n_samples=300)["z"].mean(0)
    np.testing.assert_allclose(latent, model.get_latent_representation(), atol=0.25)
