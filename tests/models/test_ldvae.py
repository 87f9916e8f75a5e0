"""LDVAE: linear decoder on the shared encoder, loadings recover a known linear model."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import ortho_group

import pyrovi
from pyrovi.posterior import varimax


def simulate_gene_programs(n_cells=2000, n_genes=200, n_programs=5, genes_per_program=20,
                           seed=0):
    """Counts from LDVAE's generative model with sparse, known loadings.

    ``x ~ NB(l · softmax(W z + b))`` with ``z ~ N(0, I)`` and each column of ``W`` a gene
    program on its own genes, of decreasing strength.
    """
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_genes, n_programs))
    members = rng.permutation(n_genes)[: n_programs * genes_per_program]
    for k, (genes, strength) in enumerate(zip(
            members.reshape(n_programs, genes_per_program),
            np.linspace(1.2, 0.6, n_programs), strict=True)):
        weights[genes, k] = (strength * rng.choice([-1, 1], genes_per_program)
                             * rng.uniform(0.5, 1.5, genes_per_program))
    logits = rng.normal(size=(n_cells, n_programs)) @ weights.T + rng.normal(0, 1, n_genes)
    rho = np.exp(logits)
    rho /= rho.sum(1, keepdims=True)
    library = np.exp(rng.normal(np.log(3000), 0.3, size=(n_cells, 1)))
    counts = rng.poisson(rng.gamma(10.0, library * rho / 10.0)).astype(np.float32)
    adata = anndata.AnnData(
        sp.csr_matrix(counts),
        obs=pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]),
    )
    adata.varm["W_true"] = weights
    return adata


def subspace_r2(true_loadings, learned_loadings):
    """R² of each true loading column regressed on the learned loadings (plus intercept)."""
    design = np.c_[learned_loadings, np.ones(len(learned_loadings))]
    beta, *_ = np.linalg.lstsq(design, true_loadings, rcond=None)
    residual = true_loadings - design @ beta
    return 1.0 - residual.var(0) / true_loadings.var(0)


def matched_abs_correlation(true_loadings, learned_loadings):
    """|correlation| of each true factor with its partner in the best one-to-one matching."""
    k = true_loadings.shape[1]
    correlation = np.abs(np.corrcoef(true_loadings.T, learned_loadings.T)[:k, k:])
    rows, cols = linear_sum_assignment(-correlation)
    return correlation[rows, cols]


@pytest.mark.slow
def test_loadings_recover_the_simulated_gene_programs():
    adata = simulate_gene_programs(seed=0)
    truth = adata.varm["W_true"]
    pyrovi.LDVAE.setup_anndata(adata)
    torch.manual_seed(0)
    model = pyrovi.LDVAE(adata, n_latent=5)
    untrained = model.get_loadings(rotation="varimax").to_numpy()
    model.train(max_epochs=200, n_epochs_kl_warmup=60, seed=0, progress_bar=False)
    loadings = model.get_loadings()
    assert list(loadings.columns) == [f"Z_{i}" for i in range(5)]
    assert list(loadings.index) == list(adata.var_names)
    # The raw loadings span the true programs (their axes are free to rotate) ...
    assert subspace_r2(truth, loadings.to_numpy()).min() > 0.8
    # ... and after varimax each program is one factor, up to sign and permutation.
    rotated = model.get_loadings(rotation="varimax")
    matched = matched_abs_correlation(truth, rotated.to_numpy())
    assert matched.min() > 0.85, matched  # seeds 0-2 reach 0.93-0.99
    assert matched_abs_correlation(truth, untrained).max() < 0.4
    rotation = rotated.attrs["rotation"]
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(5), atol=1e-8)
    np.testing.assert_allclose(loadings.to_numpy() @ rotation, rotated.to_numpy(), atol=1e-5)


def test_varimax_finds_planted_sparse_structure_under_any_rotation():
    rng = np.random.default_rng(1)
    sparse = np.zeros((80, 4))
    for k in range(4):
        sparse[20 * k: 20 * (k + 1), k] = rng.uniform(0.5, 1.5, 20) * rng.choice([-1, 1], 20)
    mixed = sparse @ ortho_group.rvs(4, random_state=2)
    rotated, rotation = varimax(mixed)
    np.testing.assert_allclose(matched_abs_correlation(sparse, rotated), 1.0, atol=1e-6)
    np.testing.assert_allclose(mixed @ rotation, rotated, atol=1e-10)
    with pytest.raises(ValueError, match="rotation"):
        pyrovi.LDVAE.get_loadings(None, rotation="promax")


def test_ldvae_shares_the_encoder_and_round_trips(small_adata, tmp_path):
    pyrovi.LDVAE.setup_anndata(small_adata, batch_key="batch")
    model = pyrovi.LDVAE(small_adata, n_latent=3, n_hidden=16, gene_likelihood="zinb")
    assert isinstance(model.module.encoder, pyrovi.nn.AmortizedEncoder)
    assert isinstance(model.module.decoder, pyrovi.nn.LinearExpressionDecoder)
    model.train(max_epochs=3, seed=0, progress_bar=False)
    # Batch norm scaling is folded into the reported loadings.
    decoder = model.module.decoder.factor_regressor.layers[0]
    bn = decoder["post"][0]
    expected = decoder["linear"].linear.weight * (
        bn.weight / torch.sqrt(bn.running_var + bn.eps)).unsqueeze(-1)
    np.testing.assert_allclose(model.get_loadings().to_numpy(), expected.detach().numpy(),
                               rtol=1e-6)
    # Differential expression comes from the same generic utility as for scVI.
    de = model.differential_expression(groupby="cluster", mode="change", n_samples=200,
                                       silent=True)
    assert len(de) == 3 * small_adata.n_vars and de["proba_de"].between(0, 1).all()
    model.save(tmp_path / "ldvae")
    loaded = pyrovi.LDVAE.load(tmp_path / "ldvae", adata=small_adata.copy())
    pd.testing.assert_frame_equal(loaded.get_loadings(), model.get_loadings())
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
