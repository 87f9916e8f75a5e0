"""Differential expression: closed-form checks of the statistics, recovery of simulated DE
genes, agreement with observed fold changes on real data, and the scvi-tools interface."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

import pyrovi
from pyrovi.posterior import (
    bayes_factors,
    estimate_delta,
    estimate_pseudocounts,
    fdr_de_prediction,
    raw_counts_properties,
)
from pyrovi.posterior.differential import plan_comparisons

CHANGE_COLUMNS = [
    "proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2", "pseudocounts", "delta",
    "lfc_mean", "lfc_median", "lfc_std", "lfc_min", "lfc_max", "raw_mean1", "raw_mean2",
    "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
    "raw_normalized_mean2", "is_de_fdr_0.05", "comparison", "group1", "group2",
]
VANILLA_COLUMNS = [
    "proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2", "raw_mean1", "raw_mean2",
    "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
    "raw_normalized_mean2", "comparison", "group1", "group2",
]


# -- the statistics against closed forms --------------------------------------------------

def test_vanilla_probability_matches_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    gaps = np.array([-1.0, 0.0, 0.3, 2.0])
    first = rng.normal(gaps, 1.0, size=(200_000, 4))
    second = rng.normal(0.0, 1.0, size=(200_000, 4))
    result = bayes_factors(first, second, mode="vanilla")
    expected = stats.norm.cdf(gaps / np.sqrt(2.0))  # P(X > Y) for X - Y ~ N(gap, 2)
    np.testing.assert_allclose(result["proba_m1"], expected, atol=5e-3)
    np.testing.assert_allclose(result["proba_m1"] + result["proba_m2"], 1.0)
    np.testing.assert_allclose(
        result["bayes_factor"], np.log(expected / (1 - expected)), atol=0.05)


def test_change_mode_matches_the_lognormal_closed_form():
    # log2 rho1 - log2 rho2 ~ N(mu, 2 s²) exactly when both are log-normal (no pseudocount).
    rng = np.random.default_rng(1)
    mu = np.array([0.0, 0.2, -0.6, 1.5])
    s = 0.3
    first = 2.0 ** rng.normal(mu - 10, s, size=(200_000, 4))
    second = 2.0 ** rng.normal(-10, s, size=(200_000, 4))
    result = bayes_factors(first, second, mode="change", delta=0.25, pseudocounts=0.0)
    lfc = stats.norm(mu, s * np.sqrt(2))
    up, down = lfc.sf(0.25), lfc.cdf(-0.25)
    np.testing.assert_allclose(result["proba_de"], np.maximum(up, down), atol=5e-3)
    np.testing.assert_allclose(result["lfc_mean"], mu, atol=5e-3)
    np.testing.assert_allclose(result["lfc_median"], mu, atol=5e-3)
    np.testing.assert_allclose(result["lfc_std"], s * np.sqrt(2), rtol=1e-2)
    two_sided = bayes_factors(first, second, mode="change", delta=0.25, test_mode="two")
    np.testing.assert_allclose(two_sided["proba_de"], up + down, atol=5e-3)
    assert result["delta"] == 0.25 and result["pseudocounts"] == 0.0


def test_fdr_call_is_the_largest_prefix_with_expected_fdr_below_target():
    rng = np.random.default_rng(2)
    proba = rng.beta(0.5, 0.5, size=300)
    flags = fdr_de_prediction(proba, fdr=0.1)
    # Brute force: among the top-d genes by proba, the mean of (1 - proba) is the expected
    # FDR; the call is the largest d with that mean at most the target.
    ranked = np.sort(proba)[::-1]
    admissible = [d for d in range(1, 301) if (1 - ranked[:d]).mean() <= 0.1]
    assert flags.sum() == max(admissible)
    assert proba[flags].min() >= proba[~flags].max()
    assert not fdr_de_prediction(np.full(5, 0.5), fdr=0.05).any()


def test_delta_estimate_finds_the_outer_modes():
    rng = np.random.default_rng(3)
    lfc = np.concatenate([rng.normal(-2, 0.2, 300), rng.normal(0, 0.2, 1400),
                          rng.normal(2, 0.2, 300)])
    assert estimate_delta(lfc) == pytest.approx(0.6 * 2.0, abs=0.05)
    assert estimate_delta(np.zeros(50)) == 0.1  # no spread: the lower bound


def test_pseudocounts_come_from_unexpressed_genes():
    scale1 = np.array([[0.5, 0.01, 0.49], [0.6, 0.03, 0.37]])
    scale2 = np.array([[0.5, 0.2, 0.3], [0.5, 0.2, 0.3]])
    unexpressed = np.array([False, True, False])
    # Largest draw of the only unexpressed gene, divided by the number of genes.
    assert estimate_pseudocounts(scale1, scale2, unexpressed, ~np.ones(3, bool)) == (
        pytest.approx(0.03 / 3))
    assert estimate_pseudocounts(scale1, scale2, ~np.ones(3, bool), ~np.ones(3, bool)) == 1e-10


def test_raw_count_statistics_dense_and_sparse():
    counts = np.array([[0, 2, 8], [1, 0, 9], [4, 4, 2], [0, 0, 5]], dtype=float)
    for matrix in (counts, sp.csr_matrix(counts), sp.csc_matrix(counts)):
        result = raw_counts_properties(matrix, np.array([0, 1]), np.array([2, 3]))
        np.testing.assert_allclose(result["raw_mean1"], [0.5, 1.0, 8.5])
        np.testing.assert_allclose(result["non_zeros_proportion2"], [0.5, 0.5, 1.0])
        per_10k = counts / counts.sum(1, keepdims=True) * 1e4
        np.testing.assert_allclose(result["raw_normalized_mean2"], per_10k[2:].mean(0))


# -- recovery of simulated DE genes ---------------------------------------------------------

def simulate_two_groups(n_cells=1200, n_genes=200, n_de=40, seed=0):
    """NB counts for groups A and B differing (log fold change 0.7-1.5) in ``n_de`` genes,
    with a within-group continuous program shared by both groups."""
    rng = np.random.default_rng(seed)
    group = rng.integers(2, size=n_cells)
    log_fold = np.zeros(n_genes)
    de_genes = rng.choice(n_genes, n_de, replace=False)
    log_fold[de_genes] = rng.choice([-1, 1], n_de) * rng.uniform(0.7, 1.5, n_de)
    program = rng.normal(size=(n_cells, 3)) @ rng.normal(0, 0.3, size=(n_genes, 3)).T
    logits = rng.normal(0, 1.0, size=n_genes) + log_fold * group[:, None] + program
    rho = np.exp(logits)
    rho /= rho.sum(1, keepdims=True)
    library = np.exp(rng.normal(np.log(1500), 0.3, size=(n_cells, 1)))
    counts = rng.poisson(rng.gamma(5.0, library * rho / 5.0)).astype(np.float32)
    obs = pd.DataFrame({"group": pd.Categorical(np.where(group, "B", "A"))},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame({"log_fold": log_fold}, index=[f"gene{g}" for g in range(n_genes)])
    return anndata.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture(scope="module")
def two_groups():
    adata = simulate_two_groups()
    pyrovi.SCVI.setup_anndata(adata)
    torch.manual_seed(0)
    model = pyrovi.SCVI(adata, n_latent=5, gene_likelihood="nb")
    untrained = model.differential_expression(
        groupby="group", group1="B", group2="A", mode="change", silent=True, seed=0)
    model.train(max_epochs=40, n_epochs_kl_warmup=10, seed=0, progress_bar=False)
    return adata, model, untrained


def test_change_mode_ranks_the_simulated_de_genes_first(two_groups):
    adata, model, untrained = two_groups
    de = model.differential_expression(groupby="group", group1="B", group2="A",
                                       mode="change", silent=True, seed=0)
    truth = adata.var["log_fold"].reindex(de.index) != 0
    auroc = roc_auc_score(truth, de["proba_de"])
    assert auroc > 0.9, auroc  # chance: 0.5
    assert auroc > roc_auc_score(truth, untrained.loc[de.index, "proba_de"]) + 0.2
    # The FDR call is precise, and estimated LFCs track the simulated ones.
    called = de["is_de_fdr_0.05"]
    assert called.sum() >= 5 and truth[called].mean() >= 0.9
    true_lfc = adata.var["log_fold"].reindex(de.index) * np.log2(np.e)
    assert np.corrcoef(de["lfc_mean"], true_lfc)[0, 1] > 0.9


def test_vanilla_mode_bayes_factors_point_in_the_direction_of_change(two_groups):
    adata, model, _ = two_groups
    de = model.differential_expression(groupby="group", group1="B", group2="A",
                                       silent=True, seed=0)
    assert list(de.columns) == VANILLA_COLUMNS
    log_fold = adata.var["log_fold"].reindex(de.index)
    assert roc_auc_score(log_fold != 0, de["bayes_factor"].abs()) > 0.9
    up, down = log_fold > 0, log_fold < 0
    assert (de.loc[up, "proba_m1"] > 0.5).mean() > 0.9
    assert (de.loc[down, "proba_m1"] < 0.5).mean() > 0.9


# -- real data ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pbmc_model():
    adata = pyrovi.datasets.pbmc68k_reduced()
    pyrovi.SCVI.setup_anndata(adata, layer="counts")
    torch.manual_seed(0)
    model = pyrovi.SCVI(adata, n_latent=10)
    model.train(max_epochs=60, seed=0, progress_bar=False)
    return adata, model


def test_change_mode_lfc_agrees_with_observed_fold_changes_on_pbmcs(pbmc_model):
    adata, model = pbmc_model
    de = model.differential_expression(groupby="bulk_labels", mode="change", silent=True,
                                       seed=0)
    assert list(de.columns) == CHANGE_COLUMNS
    groups = adata.obs["bulk_labels"].cat.categories
    assert sorted(de["group1"].unique()) == sorted(groups)
    assert (de["group2"] == "Rest").all() and len(de) == len(groups) * adata.n_vars
    sizes = adata.obs["bulk_labels"].value_counts()
    for group, block in de.groupby("group1"):
        observed = (np.log2(block["raw_normalized_mean1"] + 0.1)
                    - np.log2(block["raw_normalized_mean2"] + 0.1))
        rho = stats.spearmanr(block["lfc_mean"], observed)[0]
        assert rho > (0.6 if sizes[group] >= 30 else 0.3), (group, rho)
        assert block["proba_de"].is_monotonic_decreasing


def test_batch_correction_and_index_selection(pbmc_model):
    adata, model = pbmc_model
    monocytes = (adata.obs["bulk_labels"] == "CD14+ Monocyte").to_numpy()
    by_mask = model.differential_expression(idx1=monocytes, silent=True, seed=1, n_samples=500)
    by_query = model.differential_expression(
        idx1="bulk_labels == 'CD14+ Monocyte'", silent=True, seed=1, n_samples=500)
    assert "comparison" not in by_mask.columns  # as in scvi-tools for idx1/idx2
    np.testing.assert_allclose(by_mask["raw_mean1"], by_query.loc[by_mask.index, "raw_mean1"])
    np.testing.assert_allclose(
        by_mask.loc["FCN1", "raw_mean1"],
        adata[monocytes, "FCN1"].X.toarray().mean(), rtol=1e-6)
    # A classical monocyte marker is called up in monocytes against the rest.
    assert by_mask.loc["FCN1", "proba_m1"] > 0.9


def test_batch_corrected_draws_are_paired_within_a_batch(small_adata):
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    model = pyrovi.SCVI(small_adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, seed=0, progress_bar=False)
    decoded_in = []
    sampler = model._normalized_expression_sampler

    def recording_sampler(data, batch_size):
        sample = sampler(data, batch_size)

        def wrapped(positions, code):
            decoded_in.append((len(positions), code))
            return sample(positions, code)

        return wrapped

    model._normalized_expression_sampler = recording_sampler
    de = model.differential_expression(groupby="cluster", group1="c0", batch_correction=True,
                                       n_samples=100, silent=True)
    # Both groups are decoded in both batches, half of the draws each.
    assert sorted(decoded_in) == [(50, 0), (50, 0), (50, 1), (50, 1)]
    assert np.isfinite(de["bayes_factor"]).all()
    one_batch = model.differential_expression(groupby="cluster", group1="c0", group2="c1",
                                              batch_correction=True, batchid1=["b1"],
                                              batchid2=["b1"], n_samples=100, silent=True)
    assert (one_batch["comparison"] == "c0 vs c1").all()
    assert decoded_in[-2:] == [(100, 1), (100, 1)]


# -- the interface and its errors -----------------------------------------------------------

def test_group_arguments_and_clear_errors(small_adata):
    obs = small_adata.obs
    plans = plan_comparisons(obs, groupby="cluster")
    assert [(p.group1, p.group2) for p in plans] == [("c0", "Rest"), ("c1", "Rest"),
                                                     ("c2", "Rest")]
    for plan in plans:
        assert len(plan.cells1) + len(plan.cells2) == len(obs)
        assert not set(plan.cells1) & set(plan.cells2)
    [plan] = plan_comparisons(obs, groupby="cluster", group1="c2", group2="c0")
    assert set(obs["cluster"].iloc[plan.cells2]) == {"c0"}
    with pytest.raises(KeyError, match="not a column of adata.obs"):
        plan_comparisons(obs, groupby="celltype")
    with pytest.raises(KeyError, match="'c9' is not in"):
        plan_comparisons(obs, groupby="cluster", group1="c9")
    with pytest.raises(ValueError, match="groupby= .* or idx1="):
        plan_comparisons(obs)
    with pytest.raises(ValueError, match="one entry per cell"):
        plan_comparisons(obs, idx1=np.ones(5, dtype=bool))
    with pytest.raises(ValueError, match="has no cells"):
        plan_comparisons(obs, idx1=np.zeros(len(obs), dtype=bool))
    with pytest.raises(ValueError, match="single group"):
        plan_comparisons(obs.assign(one="x"), groupby="one")


def test_model_level_errors_leave_the_data_unchanged(small_adata):
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    model = pyrovi.SCVI(small_adata, n_latent=3, n_hidden=16)
    before = small_adata.obs.copy()
    with pytest.raises(ValueError, match="batch_correction=True"):
        model.differential_expression(groupby="cluster", batchid1=["b0"])
    with pytest.raises(KeyError, match="not a batch of the model"):
        model.differential_expression(groupby="cluster", batch_correction=True,
                                      batchid1=["b7"])
    with pytest.raises(ValueError, match="mode must be"):
        model.differential_expression(groupby="cluster", mode="bayes")
    other = small_adata[:, ::-1].copy()
    with pytest.raises(ValueError, match="order"):
        model.differential_expression(other, groupby="cluster")
    pd.testing.assert_frame_equal(small_adata.obs, before)
