"""Device consistency on a machine without a GPU: training and outputs on the meta device.

CUDA code paths cannot run here, so these tests run them with the model and data on torch's
``meta`` device (see ``tests/meta_device.py``): any tensor made on the CPU inside the
training loop, the loaders' accelerator gather, the likelihoods, the priors or the
posterior utilities fails as it would on a GPU. The meta device takes the accelerator
branches (``device.type != "cpu"``), not the CUDA-only ones. Values are placeholders, so
only devices and shapes are checked.
"""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

import pyrovi
from pyrovi.datasets import simulate_cite_seq, simulate_counts
from tests.meta_device import META, MetaHost, assert_on_meta


@pytest.fixture
def on_meta():
    """Placeholders for host transfers; Pyro's argument checks read values, so they are off."""
    with MetaHost(), pyro.validation_enabled(False):
        yield


@pytest.fixture
def counts():
    adata = simulate_counts(n_cells=80, n_genes=25, n_clusters=2, n_batches=2, seed=3)
    rng = np.random.default_rng(0)
    adata.obs["site"] = rng.choice(["x", "y"], adata.n_obs)
    adata.obs["depth"] = rng.normal(size=adata.n_obs)
    adata.obs["size_factor"] = rng.uniform(0.5, 2.0, adata.n_obs)
    return adata


SCVI_VARIANTS = {
    "zinb-covariates": ({"categorical_covariate_keys": ["site"],
                         "continuous_covariate_keys": ["depth"], "labels_key": "cluster"},
                        {"dispersion": "gene-batch", "encode_covariates": True}),
    "nb-latent-library": ({}, {"gene_likelihood": "nb", "use_observed_lib_size": False,
                               "dispersion": "gene-cell"}),
    "poisson-size-factors": ({"size_factor_key": "size_factor"},
                             {"gene_likelihood": "poisson"}),
    "mog-prior": ({"labels_key": "cluster"}, {"prior": "mog", "dispersion": "gene-label"}),
    "vamp-prior": ({}, {"prior": "vamp", "latent_distribution": "ln"}),
}


@pytest.mark.parametrize("variant", sorted(SCVI_VARIANTS))
def test_scvi_trains_and_answers_on_one_device(counts, on_meta, variant):
    setup, options = SCVI_VARIANTS[variant]
    pyrovi.SCVI.setup_anndata(counts, batch_key="batch", **setup)
    model = pyrovi.SCVI(counts, n_hidden=8, n_latent=3, **options)
    model.train(max_epochs=2, batch_size=32, device="meta", progress_bar=False,
                early_stopping=True, early_stopping_patience=1)
    assert model.device == META
    assert_on_meta(model.module)
    assert len(model.history) >= 1
    n, g = counts.shape
    assert model.get_latent_representation().shape == (n, 3)
    assert model.get_latent_representation(give_mean=False, n_samples=2).shape == (2, n, 3)
    assert model.get_normalized_expression(transform_batch="b1", n_samples=2).shape == (n, g)
    assert model.posterior_predictive_sample(n_samples=2).shape == (n, g, 2)
    assert model.get_elbo(return_mean=False).shape == (n,)
    assert model.get_marginal_ll(n_mc_samples=3, return_mean=False).shape == (n,)
    assert set(model.get_likelihood_parameters()) >= {"mean"}
    de = model.differential_expression(groupby="cluster", n_samples=20, silent=True)
    assert len(de) == 2 * g


def test_ldvae_loadings_come_off_the_device(counts, on_meta):
    pyrovi.LDVAE.setup_anndata(counts, batch_key="batch")
    model = pyrovi.LDVAE(counts, n_hidden=8, n_latent=3)
    model.train(max_epochs=2, batch_size=32, device="meta", progress_bar=False)
    assert_on_meta(model.module)
    assert model.get_loadings().shape == (counts.n_vars, 3)
    assert model.get_latent_representation().shape == (counts.n_obs, 3)


def test_totalvi_trains_and_answers_on_one_device(on_meta):
    adata = simulate_cite_seq(n_cells=90, n_genes=20, n_proteins=4, seed=1)
    pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                 batch_key="batch")
    model = pyrovi.TOTALVI(adata, n_latent=3, n_hidden=8)
    model.train(max_epochs=2, batch_size=32, device="meta", progress_bar=False)
    assert_on_meta(model.module)
    n = adata.n_obs
    rna, protein = model.get_normalized_expression(n_samples=2, transform_batch="b0")
    assert rna.shape == (n, 20) and protein.shape == (n, 4)
    assert model.get_protein_foreground_probability().shape == (n, 4)
    assert model.get_latent_library_size().shape[0] == n
    assert model.posterior_predictive_sample().shape == (n, 24)
    de = model.differential_expression(groupby="cell_type", n_samples=20, silent=True)
    assert {"proba_m1", "bayes_factor"} <= set(de.columns)


def test_a_tensor_made_on_the_host_is_caught(counts, on_meta, monkeypatch):
    # The check itself: a likelihood that adds a CPU tensor (a forgotten device=) fails on
    # the meta device exactly as it would on a GPU.
    pyrovi.SCVI.setup_anndata(counts)
    model = pyrovi.SCVI(counts, n_hidden=8, n_latent=2)
    likelihood = model.module.likelihood

    def forgets_the_device(params, nonzero=None):
        params = dict(params)
        params["mu"] = params["mu"] + torch.zeros(params["mu"].shape[-1])
        return likelihood(params, nonzero)

    monkeypatch.setattr(model.module, "likelihood", forgets_the_device)
    with pytest.raises(RuntimeError, match="expected device meta"):
        model.train(max_epochs=1, device="meta", progress_bar=False)
