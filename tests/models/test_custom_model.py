"""A model that is not in the library, built from pyrovi's parts and used unchanged.

A Poisson-lognormal factor model (PLN-PCA): ``z ~ N(0, I_k)``,
``x_g ~ Poisson(l · exp(W_g z + b_g))`` with an observed library ``l``, an amortized
Gaussian guide from ``pyrovi.nn``, trained with ``pyrovi.infer.fit`` and checked with
``pyrovi.posterior`` (samples, posterior predictive checks, ArviZ). It must recover the
loading subspace of data simulated from it.
"""

from __future__ import annotations

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.sparse as sp
import torch
from scipy.linalg import subspace_angles
from torch import nn

from pyrovi.criticism import PosteriorPredictiveCheck, to_arviz
from pyrovi.distributions import Poisson
from pyrovi.infer import cell_plate, fit
from pyrovi.nn import GaussianEncoder
from pyrovi.posterior import posterior_predictive, posterior_samples
from pyrovi.priors import NormalPrior


class PoissonLogNormalPCA(nn.Module):
    """The whole model: what a methods researcher would write (about thirty lines)."""

    observed_sites = ("x",)
    cell_plate = "cells"
    site_dims = {"z": ("factor",), "x": ("gene",)}

    def __init__(self, n_genes: int, n_factors: int):
        super().__init__()
        self.prior = NormalPrior(n_factors)
        self.loadings = nn.Linear(n_factors, n_genes)  # W z + b
        self.encoder = GaussianEncoder(n_genes, n_factors, n_hidden=64, dropout_rate=0.0)

    def model(self, x, log_library):
        with cell_plate(x.shape[0]):
            z = pyro.sample("z", self.prior(x.shape[0]))
            rate = torch.exp(log_library.unsqueeze(-1) + self.loadings(z))
            pyro.sample("x", Poisson(mu=rate).to_event(1), obs=x)

    def guide(self, x, log_library):
        loc, scale = self.encoder(torch.log1p(x))
        with cell_plate(x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


N_CELLS, N_GENES, N_FACTORS = 1500, 60, 3


def _simulate(seed: int = 0):
    rng = np.random.default_rng(seed)
    loadings = rng.normal(0.0, 0.6, size=(N_GENES, N_FACTORS))
    offset = rng.normal(0.5, 0.5, size=N_GENES)
    z = rng.normal(size=(N_CELLS, N_FACTORS))
    log_library = rng.normal(0.0, 0.2, size=N_CELLS)
    counts = rng.poisson(np.exp(log_library[:, None] + z @ loadings.T + offset))
    data = {"x": counts.astype(np.float32), "log_library": log_library.astype(np.float32)}
    return data, loadings, z


@pytest.fixture(scope="module")
def fitted():
    data, loadings, z = _simulate()
    module = PoissonLogNormalPCA(N_GENES, N_FACTORS)
    result = fit(module, data, max_epochs=100, batch_size=128, lr=1e-2, seed=0,
                 n_epochs_kl_warmup=10, progress_bar=False)
    return module, data, loadings, z, result


def test_fit_records_a_decreasing_history(fitted):
    _, _, _, _, result = fitted
    history = result.history
    assert len(history) == 100
    assert np.isfinite(history["elbo_validation"]).all()
    assert history["elbo_validation"].iloc[-1] < 0.8 * history["elbo_validation"].iloc[0]
    assert len(result.train_indices) + len(result.validation_indices) == N_CELLS
    assert not set(result.train_indices) & set(result.validation_indices)


def test_recovers_the_loading_subspace_and_the_factors(fitted):
    module, data, loadings, z, _ = fitted
    learned = module.loadings.weight.detach().numpy()
    angles = np.degrees(subspace_angles(learned, loadings))
    # Seeds 0-2 give at most 3.0, 9.3 and 3.5 degrees.
    assert angles.max() < 15.0, angles
    # The posterior means explain the true factors up to a linear map.
    draws = posterior_samples(module, data, sites=["z"], n_samples=20)["z"].mean(0)
    design = np.column_stack([draws, np.ones(N_CELLS)])
    fitted_z = design @ np.linalg.lstsq(design, z, rcond=None)[0]
    r2 = 1 - ((z - fitted_z) ** 2).sum(0) / ((z - z.mean(0)) ** 2).sum(0)
    assert r2.min() > 0.9, r2


def test_posterior_predictive_check_prefers_the_trained_model(fitted):
    module, data, _, _, _ = fitted
    untrained = PoissonLogNormalPCA(N_GENES, N_FACTORS)
    pyro.set_rng_seed(1)
    samples = {
        "trained": list(posterior_predictive(module, data, n_samples=5)),
        "untrained": list(posterior_predictive(untrained, data, n_samples=5)),
    }
    ppc = PosteriorPredictiveCheck.from_samples(data["x"], samples)
    cv = ppc.summary("cv_gene")["mean_absolute_error"]
    zeros = ppc.summary("zero_fraction")["mean_absolute_error"]
    # Seeds 0-2: CV error ratios 0.17-0.18, zero-fraction errors 0.010-0.014.
    assert cv["trained"] < 0.35 * cv["untrained"]
    assert zeros["trained"] < 0.25 * zeros["untrained"]
    assert zeros["trained"] < 0.03


def test_arviz_export_of_a_bare_module(fitted):
    az = pytest.importorskip("arviz")
    module, data, _, _, _ = fitted
    genes = [f"g{i}" for i in range(N_GENES)]
    idata = to_arviz(
        module, data=data, n_samples=8, indices=np.arange(100), coords={"gene": genes}, seed=0)
    assert idata.posterior["z"].dims == ("chain", "draw", "cell", "factor")
    assert idata.posterior["z"].shape == (1, 8, 100, N_FACTORS)
    assert list(idata.posterior_predictive["x"].coords["gene"].values) == genes
    np.testing.assert_array_equal(idata.observed_data["x"].values, data["x"][:100])
    np.testing.assert_allclose(idata.constant_data["log_library"].values,
                               data["log_library"][:100])
    summary = az.summary(idata, var_names=["z"], kind="stats")
    assert len(summary) == 100 * N_FACTORS
    # Predictive gene means follow the observed ones.
    predicted = idata.posterior_predictive["x"].values.mean((0, 1, 2))
    observed = data["x"][:100].mean(0)
    assert np.corrcoef(predicted, observed)[0, 1] > 0.98


def test_arviz_export_of_a_bare_module_on_sparse_counts(fitted):
    # Sparse counts bring the likelihood's optional non-zero positions into the minibatch:
    # they are not data to export.
    module, data, _, _, _ = fitted
    sparse = {**data, "x": sp.csr_matrix(data["x"])}
    idata = to_arviz(module, data=sparse, n_samples=2, indices=np.arange(30), seed=0)
    assert set(idata.constant_data.data_vars) == {"log_library"}
    np.testing.assert_array_equal(idata.observed_data["x"].values, data["x"][:30])


def test_fit_rejects_ragged_data():
    module = PoissonLogNormalPCA(N_GENES, N_FACTORS)
    with pytest.raises(ValueError, match="same number of rows"):
        fit(module, {"x": np.zeros((10, N_GENES)), "log_library": np.zeros(9)}, max_epochs=1)
