"""Empirical protein background prior of TotalVI: recovery on simulated data, and finite
values on degenerate inputs (few proteins, constant / all-zero columns, tiny batches,
proteins missing from a batch, sparse input)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import scipy.sparse as sp

from pyrovi._gaussian_mixture import GaussianMixture1D
from pyrovi.modules import protein_background as pb
from pyrovi.modules.protein_background import (
    default_protein_background_prior,
    empirical_protein_background_prior,
    missing_protein_mask,
)

LOGGER = "pyrovi.modules.protein_background"


def simulate_proteins(n_per_batch=600, n_proteins=6, theta=20.0, seed=0):
    """Background/foreground protein counts with known background levels.

    Negative cells have negative-binomial counts of mean ``mu_ts`` (the background), positive
    cells mean ``mu_ts * (1 + alpha_t)`` with ``alpha_t`` in [5, 20]; 30-70% of the cells are
    positive. Batch 1's background is 3 times batch 0's.
    """
    rng = np.random.default_rng(seed)
    mu0 = rng.uniform(6.0, 15.0, n_proteins)
    mu = np.stack([mu0, 3.0 * mu0], axis=1)  # (proteins, batches)
    alpha = rng.uniform(5.0, 20.0, n_proteins)
    frac_positive = rng.uniform(0.3, 0.7, n_proteins)
    codes = np.repeat([0, 1], n_per_batch)
    positive = rng.random((codes.size, n_proteins)) < frac_positive
    rate = mu.T[codes] * np.where(positive, 1.0 + alpha, 1.0)
    counts = rng.negative_binomial(theta, theta / (theta + rate))
    return counts, codes, mu, positive


def assert_valid(mean, scale, shape, min_scale=0.05, max_scale=3.0):
    assert mean.shape == scale.shape == shape
    assert mean.dtype == scale.dtype == np.float32
    assert np.isfinite(mean).all() and np.isfinite(scale).all()
    assert ((scale >= min_scale) & (scale <= max_scale) | (scale == 1.0)).all()


def test_recovers_background_level_in_each_batch():
    counts, codes, mu, positive = simulate_proteins()
    mean, scale = empirical_protein_background_prior(counts, codes, 2)
    assert_valid(mean, scale, mu.shape)

    # The mixture is fitted to log1p(counts), so what it estimates is the mean of log1p(count)
    # over the background (negative) cells: compare to that oracle tightly. It differs from
    # log(mu) by log(1 + 1/mu) (<= 0.16 for mu >= 6) minus a Jensen gap of about
    # var/(2 (1+mu)^2) (<= 0.1 here): compare to log(mu) more loosely.
    log_counts = np.log1p(counts)
    for s in (0, 1):
        cells = codes == s
        for t in range(mu.shape[0]):
            negative = log_counts[cells & ~positive[:, t], t]
            assert mean[t, s] == pytest.approx(negative.mean(), abs=0.1)
            assert mean[t, s] == pytest.approx(np.log(mu[t, s]), abs=0.25)
            # the background spread is that of the negatives, well below the 3.0 cap
            assert 0.5 * negative.std() < scale[t, s] < 1.5 * negative.std()
            assert scale[t, s] < 0.6
    # the two batches' levels are told apart (batch 1 background = 3x batch 0)
    np.testing.assert_allclose(mean[:, 1] - mean[:, 0], np.log(3.0), atol=0.2)


@pytest.mark.parametrize("n_proteins", [1, 2, 5])
def test_few_proteins_are_finite(n_proteins):
    counts, codes, mu, _ = simulate_proteins(n_per_batch=200, n_proteins=n_proteins, seed=3)
    mean, scale = empirical_protein_background_prior(counts, codes, 2)
    assert_valid(mean, scale, (n_proteins, 2))
    np.testing.assert_allclose(mean, np.log(mu), atol=0.3)


def test_constant_and_all_zero_columns_fall_back(caplog):
    counts, codes, _, _ = simulate_proteins(n_per_batch=100, n_proteins=3, seed=1)
    counts[:, 0] = 4
    counts[:, 1] = 0
    caplog.set_level(logging.INFO, logger=LOGGER)
    mean, scale = empirical_protein_background_prior(counts, codes, 2)
    assert_valid(mean, scale, (3, 2))
    np.testing.assert_allclose(mean[0], np.log1p(4.0), rtol=1e-6)
    np.testing.assert_array_equal(mean[1], 0.0)
    np.testing.assert_array_equal(scale[:2], 1.0)
    assert scale[2].max() < 1.0  # the ordinary protein is fitted
    assert "4 (protein, batch) pair(s) fell back" in caplog.text
    assert "constant" in caplog.text


def test_all_zero_protein_masked_everywhere_gets_default():
    counts, codes, _, _ = simulate_proteins(n_per_batch=100, n_proteins=2, seed=1)
    counts[:, 1] = 0
    mask = missing_protein_mask(counts, codes, 2)
    assert not mask[:, 1].any()
    mean, scale = empirical_protein_background_prior(counts, codes, 2, mask)
    assert_valid(mean, scale, (2, 2))
    np.testing.assert_array_equal(mean[1], 0.0)
    np.testing.assert_array_equal(scale[1], 1.0)


def test_tiny_batch_falls_back_to_log1p_mean(caplog):
    counts, codes, _, _ = simulate_proteins(n_per_batch=150, n_proteins=4, seed=2)
    codes = codes.copy()
    codes[:3] = 2  # batch 2 has 3 cells
    caplog.set_level(logging.INFO, logger=LOGGER)
    mean, scale = empirical_protein_background_prior(counts, codes, 3)
    assert_valid(mean, scale, (4, 3))
    np.testing.assert_allclose(mean[:, 2], np.log1p(counts[:3].mean(0)), rtol=1e-6)
    np.testing.assert_array_equal(scale[:, 2], 1.0)
    assert "too few cells" in caplog.text


def test_protein_missing_in_one_batch_borrows_other_batch():
    counts, codes, _, _ = simulate_proteins(n_per_batch=300, n_proteins=4, seed=4)
    counts[codes == 1, 2] = 0
    mask = missing_protein_mask(counts, codes, 2)
    expected_mask = np.ones((2, 4), dtype=bool)
    expected_mask[1, 2] = False
    np.testing.assert_array_equal(mask, expected_mask)

    mean, scale = empirical_protein_background_prior(counts, codes, 2, mask)
    assert_valid(mean, scale, (4, 2))
    assert mean[2, 1] == mean[2, 0] and scale[2, 1] == scale[2, 0]
    assert scale[2, 0] < 1.0  # batch 0's own value is a fit, not a fallback
    # the other proteins are unaffected by the mask
    unmasked_mean, unmasked_scale = empirical_protein_background_prior(counts, codes, 2)
    keep = np.arange(4) != 2
    np.testing.assert_array_equal(mean[keep], unmasked_mean[keep])
    np.testing.assert_array_equal(scale[keep], unmasked_scale[keep])


def test_missing_protein_averages_over_measuring_batches_and_empty_batch():
    counts, codes, _, _ = simulate_proteins(n_per_batch=200, n_proteins=3, seed=5)
    codes = np.where(np.arange(codes.size) % 2 == 0, codes, 2)  # 3 populated batches
    counts[codes == 2, 0] = 0
    mask = missing_protein_mask(counts, codes, 4)  # batch 3 has no cells
    assert mask[3].all() and not mask[2, 0]
    mean, scale = empirical_protein_background_prior(counts, codes, 4, mask)
    assert_valid(mean, scale, (3, 4))
    assert mean[0, 2] == pytest.approx(mean[0, :2].mean())
    assert scale[0, 2] == pytest.approx(scale[0, :2].mean())
    # a batch without cells takes the average of the batches with data
    np.testing.assert_allclose(mean[1:, 3], mean[1:, :3].mean(1), rtol=1e-6)
    np.testing.assert_allclose(mean[0, 3], mean[0, :2].mean(), rtol=1e-6)


def test_sparse_input_matches_dense():
    counts, codes, _, _ = simulate_proteins(n_per_batch=150, n_proteins=5, seed=6)
    counts[:, 1] = 0
    counts[codes == 0, 3] = 0
    dense_mask = missing_protein_mask(counts, codes, 2)
    for fmt in (sp.csr_matrix, sp.csc_matrix):
        sparse = fmt(counts)
        np.testing.assert_array_equal(missing_protein_mask(sparse, codes, 2), dense_mask)
        for mask in (None, dense_mask):
            dense_result = empirical_protein_background_prior(counts, codes, 2, mask)
            sparse_result = empirical_protein_background_prior(sparse, codes, 2, mask)
            np.testing.assert_array_equal(sparse_result[0], dense_result[0])
            np.testing.assert_array_equal(sparse_result[1], dense_result[1])


def test_non_finite_fit_falls_back(monkeypatch, caplog):
    def broken_fit(x, n_components):
        nan = np.full(n_components, np.nan)
        return GaussianMixture1D(nan, nan, nan)

    monkeypatch.setattr(pb, "fit_gaussian_mixture_1d", broken_fit)
    counts, codes, _, _ = simulate_proteins(n_per_batch=50, n_proteins=2, seed=7)
    caplog.set_level(logging.INFO, logger=LOGGER)
    mean, scale = empirical_protein_background_prior(counts, codes, 2)
    assert_valid(mean, scale, (2, 2))
    for s in (0, 1):
        np.testing.assert_allclose(mean[:, s], np.log1p(counts[codes == s].mean(0)), rtol=1e-6)
    np.testing.assert_array_equal(scale, 1.0)
    assert "non-finite fit" in caplog.text


def test_scales_are_clipped():
    rng = np.random.default_rng(8)
    codes = np.zeros(400, dtype=int)
    binary = rng.integers(0, 2, 400)  # two atoms: EM components collapse to ~0 variance
    wide = np.exp(rng.uniform(0, 12, 400)).round()  # background spread over many e-folds
    mean, scale = empirical_protein_background_prior(
        np.c_[binary, wide], codes, 1, min_scale=0.1, max_scale=0.5)
    assert_valid(mean, scale, (2, 1), min_scale=0.1, max_scale=0.5)
    assert scale[0, 0] == pytest.approx(0.1)
    assert scale[1, 0] == pytest.approx(0.5)


def test_subsampling_is_deterministic_and_close():
    counts, codes, _, _ = simulate_proteins(n_per_batch=600, n_proteins=3, seed=9)
    first = empirical_protein_background_prior(counts, codes, 2, max_cells=300)
    second = empirical_protein_background_prior(counts, codes, 2, max_cells=300)
    full = empirical_protein_background_prior(counts, codes, 2, max_cells=None)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_allclose(first[0], full[0], atol=0.1)


def test_missing_protein_mask_zeroed_proteins():
    rng = np.random.default_rng(10)
    counts = rng.poisson(5.0, (90, 6)) + 1
    codes = np.repeat([0, 1, 2], 30)
    assert missing_protein_mask(counts, codes, 3).all()
    counts[np.ix_(codes == 1, [0, 4])] = 0
    counts[np.ix_(codes == 2, [5])] = 0
    counts[0, 5] = 0  # a single zero in batch 0 does not make the protein missing
    mask = missing_protein_mask(counts, codes, 4)
    expected = np.ones((4, 6), dtype=bool)
    expected[1, [0, 4]] = False
    expected[2, 5] = False
    np.testing.assert_array_equal(mask, expected)


def test_default_prior():
    mean, scale = default_protein_background_prior(4, 3)
    assert mean.shape == scale.shape == (4, 3)
    assert mean.dtype == scale.dtype == np.float32
    np.testing.assert_array_equal(mean, 0.0)
    np.testing.assert_array_equal(scale, 1.0)


def test_input_validation():
    counts = np.ones((5, 2))
    with pytest.raises(ValueError, match="entries"):
        empirical_protein_background_prior(counts, np.zeros(4, int), 1)
    with pytest.raises(ValueError, match="0..1"):
        empirical_protein_background_prior(counts, np.array([0, 1, 2, 0, 1]), 2)
    with pytest.raises(ValueError, match="shape"):
        empirical_protein_background_prior(counts, np.zeros(5, int), 1, np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="min_scale"):
        empirical_protein_background_prior(counts, np.zeros(5, int), 1, min_scale=0.0)
