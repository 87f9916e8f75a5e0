"""LDVAE: linear decoder on the shared encoder, loadings recover a known linear model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

import pyrovi
from pyrovi.datasets import simulate_counts


def subspace_r2(true_loadings, learned_loadings):
    """R² of each true loading column regressed on the learned loadings (plus intercept)."""
    design = np.c_[learned_loadings, np.ones(len(learned_loadings))]
    beta, *_ = np.linalg.lstsq(design, true_loadings, rcond=None)
    residual = true_loadings - design @ beta
    return 1.0 - residual.var(0) / true_loadings.var(0)


def test_loadings_recover_the_simulated_gene_programs():
    # Counts from softmax(W z + b): exactly LDVAE's generative model, with W known.
    adata = simulate_counts(n_cells=2000, n_genes=200, n_clusters=6, n_batches=1, n_latent=5,
                            batch_effect=0.0, cluster_separation=1.5, seed=4)
    pyrovi.LDVAE.setup_anndata(adata)
    torch.manual_seed(0)
    model = pyrovi.LDVAE(adata, n_latent=5)
    untrained = subspace_r2(adata.varm["W_true"], model.get_loadings().to_numpy())
    model.train(max_epochs=150, n_epochs_kl_warmup=50, seed=0, progress_bar=False)
    loadings = model.get_loadings()
    assert list(loadings.columns) == [f"Z_{i}" for i in range(5)]
    assert list(loadings.index) == list(adata.var_names)
    trained = subspace_r2(adata.varm["W_true"], loadings.to_numpy())
    # A Gaussian prior leaves the latent axes free to rotate, so the learned loadings span
    # the true programs rather than match them one by one.
    assert trained.mean() > 0.75, trained
    assert trained.mean() > untrained.mean() + 0.5, (untrained, trained)


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
    model.save(tmp_path / "ldvae")
    loaded = pyrovi.LDVAE.load(tmp_path / "ldvae", adata=small_adata.copy())
    pd.testing.assert_frame_equal(loaded.get_loadings(), model.get_loadings())
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
