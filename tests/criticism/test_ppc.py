"""Posterior predictive checks: every metric against a direct numpy/scipy computation on small
precomputed samples, then on tiny trained SCVI and TOTALVI models."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sp
import torch
from scipy import stats

import pyrovi
from pyrovi.criticism import PosteriorPredictiveCheck
from pyrovi.criticism.ppc import DEFAULT_INTERVAL_LEVELS
from pyrovi.criticism.stats import (
    average_precision,
    benjamini_hochberg,
    log_normalize,
    roc_auc,
    wilcoxon_rank_sum,
)
from pyrovi.datasets import simulate_cite_seq, simulate_counts


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models train much faster on one thread when the cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _toy(n_cells=40, n_genes=12, n_samples=5, seed=0):
    """Observed counts (one all-zero cell and gene) and two models' samples (3-d, list)."""
    rng = np.random.default_rng(seed)
    mu = rng.gamma(1.0, 2.0, size=(n_cells, n_genes))
    raw = rng.poisson(mu).astype(np.float32)
    raw[0] = 0
    raw[:, 1] = 0
    noise = rng.gamma(2.0, 0.5, size=(n_cells, n_genes, n_samples))
    draws = rng.poisson(mu[..., None] * noise).astype(np.float32)
    draws[1, :, 0] = 0  # a cell without counts in one sample only
    draws[:, 1, :] = 0  # a gene without counts in every sample
    other = [rng.poisson(mu * 1.5).astype(np.float32) for _ in range(n_samples)]
    return raw, draws, other


def _expected_cv(matrix, axis):
    mean = matrix.mean(axis=axis)
    std = matrix.std(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, std / mean, np.nan)


# ---------------------------------------------------------------------------------------
# Metrics against direct computations (no training).
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_coefficient_of_variation_matches_numpy(sparse):
    raw, draws, other = _toy()
    counts = sp.csr_matrix(raw) if sparse else raw
    ppc = PosteriorPredictiveCheck.from_samples(counts, {"a": draws, "b": other})
    assert all(sp.isspmatrix_csr(s) == sparse for s in ppc.samples["a"] + ppc.samples["b"])
    for dim, key, axis in (("features", "cv_cell", 1), ("cells", "cv_gene", 0)):
        frame = ppc.coefficient_of_variation(dim)
        assert ppc.metrics[key] is frame
        assert list(frame.columns) == ["a", "b", "Raw"]
        assert len(frame) == raw.shape[1 - axis]
        per_sample = np.stack([_expected_cv(draws[:, :, s].astype(np.float64), axis)
                               for s in range(draws.shape[2])])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: mean of nothing
            expected_a = np.nan_to_num(np.nanmean(per_sample, axis=0))
        np.testing.assert_allclose(frame["a"], expected_a, rtol=1e-6)
        expected_b = np.mean([_expected_cv(o.astype(np.float64), axis) for o in other], axis=0)
        np.testing.assert_allclose(frame["b"], np.nan_to_num(expected_b), rtol=1e-6)
        np.testing.assert_allclose(frame["Raw"], np.nan_to_num(_expected_cv(raw, axis)),
                                   rtol=1e-6)
    # the all-zero gene is 0; the cell empty in one sample averages the other samples
    assert ppc.metrics["cv_gene"].iloc[1][["a", "Raw"]].tolist() == [0.0, 0.0]
    cell = _expected_cv(draws[1].T.astype(np.float64), 1)  # samples × 1 CV each
    assert ppc.metrics["cv_cell"]["a"].iloc[1] == pytest.approx(np.mean(cell[1:]))


@pytest.mark.parametrize("sparse", [False, True])
def test_zero_fraction_matches_numpy(sparse):
    raw, draws, other = _toy()
    counts = sp.csr_matrix(raw) if sparse else raw
    frame = PosteriorPredictiveCheck.from_samples(counts, {"a": draws, "b": other}).zero_fraction()
    np.testing.assert_allclose(frame["a"], (draws == 0).mean(axis=0).mean(axis=-1))
    np.testing.assert_allclose(frame["b"], np.mean([(o == 0).mean(0) for o in other], axis=0))
    np.testing.assert_allclose(frame["Raw"], (raw == 0).mean(0))
    assert frame.loc["1", ["a", "Raw"]].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("levels", [None, [0.1, 0.3, 0.6, 0.95]])
def test_calibration_error_matches_brute_force_quantiles(sparse, levels):
    raw, draws, _ = _toy(n_cells=15, n_genes=6, n_samples=7)
    counts = sp.csr_matrix(raw) if sparse else raw
    ppc = PosteriorPredictiveCheck.from_samples(counts, {"a": draws, "shifted": draws + 2})
    frame = ppc.calibration_error(levels)
    ps = np.asarray(DEFAULT_INTERVAL_LEVELS if levels is None else levels)
    k = len(ps) // 2
    for name, values in (("a", draws), ("shifted", draws + 2)):
        inside = np.zeros(k)
        for i in range(raw.shape[0]):
            for j in range(raw.shape[1]):
                q = np.quantile(values[i, j].astype(np.float64), ps)
                for m in range(k):
                    inside[m] += q[m] <= raw[i, j] <= q[-1 - m]
        coverage = inside / raw.size
        expected = np.sum((coverage - (ps[::-1][:k] - ps[:k])) ** 2)
        assert frame.loc[name, "calibration_error"] == pytest.approx(expected, rel=1e-9)
    assert frame.loc["a", "calibration_error"] < frame.loc["shifted", "calibration_error"]
    with pytest.raises(ValueError, match="even number"):
        ppc.calibration_error([0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="increasing"):
        ppc.calibration_error([0.9, 0.1])


def test_summary_metrics_and_card_r2():
    from sklearn.metrics import r2_score

    raw, draws, other = _toy()
    ppc = PosteriorPredictiveCheck.from_samples(raw, {"a": draws, "b": other})
    table = ppc.summary("cv_gene")  # computed on demand
    cv = ppc.metrics["cv_gene"]
    for name in ("a", "b"):
        m, r = cv[name].to_numpy(), cv["Raw"].to_numpy()
        assert table.loc[name, "mean_absolute_error"] == pytest.approx(np.abs(m - r).mean())
        assert table.loc[name, "pearson"] == pytest.approx(stats.pearsonr(m, r)[0])
        assert table.loc[name, "spearman"] == pytest.approx(stats.spearmanr(m, r)[0])
        # scvi-hub model cards: sklearn's r2_score(model values, raw values)
        assert table.loc[name, "r2"] == pytest.approx(r2_score(m, r))
    cells = np.arange(10, 30)
    subset = ppc.summary("cv_cell", indices=cells)
    cell_cv = ppc.metrics["cv_cell"].iloc[cells]
    assert subset.loc["a", "mean_absolute_error"] == pytest.approx(
        np.abs(cell_cv["a"] - cell_cv["Raw"]).mean())
    assert ppc.summary("calibration") is ppc.metrics["calibration"]
    with pytest.raises(ValueError, match="metric must be"):
        ppc.summary("nonsense")
    with pytest.raises(KeyError, match="differential_expression"):
        ppc.summary("diff_exp")


def test_from_samples_validates_shapes():
    raw, draws, _ = _toy()
    with pytest.raises(ValueError, match="expected"):
        PosteriorPredictiveCheck.from_samples(raw, {"a": draws[:-1]})
    with pytest.raises(ValueError, match="same, positive number"):
        PosteriorPredictiveCheck.from_samples(raw, {"a": draws, "b": [draws[:, :, 0]]})
    with pytest.raises(ValueError, match="reserved"):
        PosteriorPredictiveCheck.from_samples(raw, {"Raw": draws})
    with pytest.raises(ValueError, match="obs has"):
        PosteriorPredictiveCheck.from_samples(raw, {"a": draws}, obs=pd.DataFrame(index=["x"]))


# ---------------------------------------------------------------------------------------
# Rank-sum test, BH, ROC/PR against scipy and scikit-learn.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sparse", [False, True])
def test_wilcoxon_matches_mannwhitneyu_with_ties(sparse):
    rng = np.random.default_rng(1)
    x = rng.poisson(rng.uniform(0.1, 3.0, size=9), size=(70, 9)).astype(np.float64)
    x[:, 4] = 0.0  # all tied
    x[:, 5] -= 1.0  # negative values below the (implicit) zeros
    labels = rng.integers(3, size=70)
    labels[:5] = -1  # unlabelled cells are in no group and not in the rest
    x[labels == 1, 2] += 2  # group 1 up in gene 2
    matrix = sp.csr_matrix(x) if sparse else x
    result = wilcoxon_rank_sum(matrix, labels, max_chunk_entries=40)  # several chunks
    same = wilcoxon_rank_sum(matrix, labels)
    np.testing.assert_allclose(result.scores, same.scores)
    keep = labels >= 0
    for k in range(3):
        group, rest = x[labels == k], x[keep & (labels != k)]
        np.testing.assert_allclose(result.means[k], group.mean(0))
        np.testing.assert_allclose(result.rest_means[k], rest.mean(0))
        assert result.n_cells[k] == len(group)
        for g in range(x.shape[1]):
            if g == 4:
                assert result.scores[k, g] == 0 and result.pvals[k, g] == 1
                continue
            test = stats.mannwhitneyu(group[:, g], rest[:, g], method="asymptotic",
                                      use_continuity=False)
            assert result.pvals[k, g] == pytest.approx(test.pvalue, rel=1e-9)
            u_centred = test.statistic - len(group) * len(rest) / 2
            assert np.sign(result.scores[k, g]) == np.sign(u_centred)
            assert abs(result.scores[k, g]) == pytest.approx(
                stats.norm.isf(test.pvalue / 2), rel=1e-6)
    assert result.scores[1, 2] > 3
    # without tie correction: scipy's ranksums (which does not correct for ties)
    plain = wilcoxon_rank_sum(matrix, labels, tie_correct=False)
    for g in (0, 2, 5):
        expected = stats.ranksums(x[labels == 0, g], x[keep & (labels != 0), g])
        assert plain.scores[0, g] == pytest.approx(expected.statistic, rel=1e-9)
        assert plain.pvals[0, g] == pytest.approx(expected.pvalue, rel=1e-9)


def test_wilcoxon_without_ties_is_ranksums():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 6))
    labels = (rng.random(50) < 0.4).astype(int)
    result = wilcoxon_rank_sum(sp.csc_matrix(x), labels)
    for g in range(6):
        expected = stats.ranksums(x[labels == 1, g], x[labels == 0, g])
        assert result.scores[1, g] == pytest.approx(expected.statistic, rel=1e-9)
        assert result.scores[0, g] == pytest.approx(-expected.statistic, rel=1e-9)
        assert result.pvals[1, g] == pytest.approx(expected.pvalue, rel=1e-9)


def test_wilcoxon_and_lfc_match_scanpy():
    sc = pytest.importorskip("scanpy")
    import numba

    # scanpy's rank_genes_groups runs numba's OpenMP threads, which share the OpenMP runtime
    # with torch: on one thread, later torch training in this process is not slowed down.
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        _compare_with_scanpy(sc)
    finally:
        numba.set_num_threads(threads)


def _compare_with_scanpy(sc):
    adata = simulate_counts(n_cells=150, n_genes=25, n_clusters=3, n_batches=1, seed=4)
    normalized = log_normalize(adata.X)
    labels = adata.obs["cluster"].cat.codes.to_numpy()
    result = wilcoxon_rank_sum(normalized, labels)
    padj = benjamini_hochberg(result.pvals)
    lfc = result.log_fold_changes()
    reference = adata.copy()
    sc.pp.normalize_total(reference, target_sum=1e4)
    sc.pp.log1p(reference)
    np.testing.assert_allclose(reference.X.toarray(), normalized.toarray(), rtol=1e-5, atol=1e-6)
    sc.tl.rank_genes_groups(reference, "cluster", method="wilcoxon", tie_correct=True)
    for k, group in enumerate(adata.obs["cluster"].cat.categories):
        table = sc.get.rank_genes_groups_df(reference, group=group).set_index("names")
        table = table.loc[adata.var_names]
        np.testing.assert_allclose(result.scores[k], table["scores"], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(padj[k], table["pvals_adj"], rtol=1e-3, atol=1e-12)
        np.testing.assert_allclose(lfc[k], table["logfoldchanges"], rtol=1e-4, atol=1e-4)


def test_benjamini_hochberg_by_hand():
    p = np.array([0.01, 0.04, 0.03, 0.005, 0.5])
    # sorted 0.005, 0.01, 0.03, 0.04, 0.5 -> ·5/rank: 0.025, 0.025, 0.05, 0.05, 0.5
    np.testing.assert_allclose(benjamini_hochberg(p), [0.025, 0.05, 0.05, 0.025, 0.5])
    assert benjamini_hochberg([0.9, 0.8]).tolist() == [0.9, 0.9]
    rows = np.random.default_rng(3).random((4, 30)) ** 3
    expected = np.stack([stats.false_discovery_control(r) for r in rows])
    np.testing.assert_allclose(benjamini_hochberg(rows), expected)


def test_roc_auc_and_average_precision_match_sklearn():
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(5)
    for _ in range(5):
        truth = rng.random(60) < 0.3
        scores = np.round(rng.normal(size=60) + truth, 1)  # with ties
        assert roc_auc(truth, scores) == pytest.approx(roc_auc_score(truth, scores))
        assert average_precision(truth, scores) == pytest.approx(
            average_precision_score(truth, scores))
    assert np.isnan(roc_auc([True, True], [0.1, 0.2]))


# ---------------------------------------------------------------------------------------
# Differential expression metrics against an independent computation.
# ---------------------------------------------------------------------------------------


def _de_toy(seed=6):
    rng = np.random.default_rng(seed)
    n_cells, n_genes = 90, 30
    groups = np.repeat(["A", "B", "C"], [30, 35, 25])
    rates = rng.gamma(2.0, 2.0, size=n_genes)
    shift = np.ones((3, n_genes))
    shift[0, :5] = 4.0
    shift[1, 5:8] = 0.2
    shift[2, 8:10] = 3.0
    code = pd.Categorical(groups).codes
    mean = rates * shift[code]
    raw = rng.poisson(mean).astype(np.float32)
    samples = [rng.poisson(mean * rng.gamma(5.0, 0.2, size=mean.shape)).astype(np.float32)
               for _ in range(2)]
    obs = pd.DataFrame({"group": pd.Categorical(groups)},
                       index=[f"c{i}" for i in range(n_cells)])
    return raw, samples, obs


def _reference_de(counts, groups, group):
    """z, BH-adjusted p and scanpy LFC of one group vs the rest, gene by gene with scipy."""
    normalized = np.log1p(counts / counts.sum(1, keepdims=True) * 1e4)
    inside = groups == group
    n1, n2 = inside.sum(), (~inside).sum()
    n = n1 + n2
    z, p = [], []
    for g in range(counts.shape[1]):
        ranks = stats.rankdata(normalized[:, g])
        sd = np.sqrt(stats.tiecorrect(ranks) * n1 * n2 * (n + 1) / 12)
        z.append((ranks[inside].sum() - n1 * (n + 1) / 2) / sd if sd > 0 else 0.0)
        p.append(stats.mannwhitneyu(normalized[inside, g], normalized[~inside, g],
                                    method="asymptotic", use_continuity=False).pvalue
                 if sd > 0 else 1.0)
    lfc = np.log2((np.expm1(normalized[inside].mean(0)) + 1e-9)
                  / (np.expm1(normalized[~inside].mean(0)) + 1e-9))
    return np.array(z), stats.false_discovery_control(np.array(p)), lfc


@pytest.mark.parametrize("sparse", [False, True])
def test_differential_expression_metrics_match_sklearn_and_scipy(sparse):
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    raw, samples, obs = _de_toy()
    counts = sp.csr_matrix(raw) if sparse else raw
    ppc = PosteriorPredictiveCheck.from_samples(counts, {"m": samples}, obs=obs,
                                                var_names=[f"g{i}" for i in range(30)])
    groups = obs["group"].to_numpy()
    for thresh in (1e-3, 1e-300):  # thresholded sets, then the top-3 fallback (no raw call)
        summary = ppc.differential_expression("group", p_val_thresh=thresh,
                                              n_top_genes_fallback=3, n_samples=2)
        assert ppc.metrics["diff_exp"]["summary"] is summary
        assert summary["group"].tolist() == ["A", "B", "C"]
        for _, row in summary.iterrows():
            rz, rp, rl = _reference_de(raw.astype(np.float64), groups, row["group"])
            fallback = not 0 < (rp < thresh).sum() <= 15
            assert row["fallback"] == fallback and row["fallback"] == (thresh < 1e-100)
            truth = np.isin(np.arange(30), np.argsort(-np.abs(rz))[:3]) if fallback else (
                rp < thresh)
            expected = []
            for sample in samples:
                z, p, lfc = _reference_de(sample.astype(np.float64), groups, row["group"])
                predicted = (np.isin(np.arange(30), np.argsort(-np.abs(z))[:3]) if fallback
                             else p < thresh)
                expected.append([
                    f1_score(truth, predicted), np.abs(lfc - rl).mean(),
                    stats.pearsonr(lfc, rl)[0], stats.spearmanr(lfc, rl)[0],
                    roc_auc_score(truth, np.abs(z)), average_precision_score(truth, np.abs(z)),
                ])
            expected = np.mean(expected, axis=0)
            got = row[["gene_f1", "lfc_mae", "lfc_pearson", "lfc_spearman", "roc_auc",
                       "pr_auc"]].to_numpy(dtype=float)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
            assert row["n_cells"] == (groups == row["group"]).sum()
            assert row["n_de_raw"] == (rp < thresh).sum()
    lfcs = ppc.metrics["diff_exp"]["lfc_per_model_per_group"]["m"]["A"]
    assert list(lfcs.columns) == ["raw", "approx"] and list(lfcs.index[:2]) == ["g0", "g1"]
    # group A's 5 up-regulated genes are up in the raw data, one of them the top gene
    scores = ppc.metrics["diff_exp"]["raw"]["A"]["scores"]
    assert (scores.iloc[:5] > 2).all() and scores.idxmax() in {f"g{i}" for i in range(5)}


def test_differential_expression_errors_and_small_groups(caplog):
    raw, samples, obs = _de_toy()
    obs = obs.copy()
    obs["tiny"] = pd.Categorical(np.where(np.arange(90) < 2, "rare", "common"))
    obs["mixed"] = pd.Categorical(
        np.where(np.arange(90) < 2, "rare", obs["group"].astype(str)))
    ppc = PosteriorPredictiveCheck.from_samples(raw, {"m": samples}, obs=obs)
    with pytest.raises(KeyError, match="not a column of adata.obs"):
        ppc.differential_expression("cell_type")
    with pytest.raises(ValueError, match="fewer than 3 cells"):
        ppc.differential_expression("mixed", groups=["rare", "A"])
    with pytest.raises(KeyError, match="not in obs"):
        ppc.differential_expression("group", groups=["Z"])
    with pytest.raises(ValueError, match="No group"):
        ppc.differential_expression("tiny", min_cells_per_group=3)
    with pytest.raises(ValueError, match="n_samples=3"):
        ppc.differential_expression("group", n_samples=3)
    one = PosteriorPredictiveCheck.from_samples(raw, {"m": samples},
                                                obs=obs.assign(group="same"))
    with pytest.raises(ValueError, match="fewer than two groups"):
        one.differential_expression("group")
    with caplog.at_level(logging.WARNING, logger="pyrovi"):
        summary = ppc.differential_expression("mixed")
    assert "rare" in caplog.text and "rare" not in set(summary["group"])
    assert set(summary["group"]) == {"A", "B", "C"}


# ---------------------------------------------------------------------------------------
# Tiny trained models.
# ---------------------------------------------------------------------------------------


def _train(model, epochs):
    model.train(max_epochs=epochs, batch_size=400, lr=1e-2, train_size=1.0,
                n_epochs_kl_warmup=20, seed=0, progress_bar=False)
    return model


@pytest.fixture(scope="module")
def scvi_models():
    """Overdispersed counts (theta 1); NB and Poisson SCVI trained alike, an untrained NB."""
    adata = simulate_counts(n_cells=300, n_genes=40, n_clusters=3, n_batches=1, theta=1.0,
                            seed=3)
    pyrovi.SCVI.setup_anndata(adata)
    sizes = {"n_hidden": 32, "n_latent": 5}
    models = {
        "nb": _train(pyrovi.SCVI(adata, gene_likelihood="nb", **sizes), 150),
        "poisson": _train(pyrovi.SCVI(adata, gene_likelihood="poisson", **sizes), 150),
        "untrained": pyrovi.SCVI(adata, gene_likelihood="nb", **sizes),
    }
    return adata, models


def test_trained_nb_scvi_beats_poisson_and_untrained(scvi_models):
    adata, models = scvi_models
    ppc = PosteriorPredictiveCheck(adata, models, n_samples=10, seed=0, progress_bar=False)
    assert all(sp.isspmatrix_csr(s) and s.shape == adata.shape
               for samples in ppc.samples.values() for s in samples)
    assert (ppc.raw_counts != adata.X).nnz == 0
    cv_gene = ppc.summary("cv_gene")["mean_absolute_error"]
    cv_cell = ppc.summary("cv_cell")["mean_absolute_error"]
    zeros = ppc.summary("zero_fraction")["mean_absolute_error"]
    calibration = ppc.calibration_error()["calibration_error"]
    # Poisson cannot produce the overdispersion: too few zeros, too little gene-wise CV,
    # too narrow intervals.
    assert cv_gene["nb"] < cv_gene["poisson"] < cv_gene["untrained"]
    assert zeros["nb"] < 0.75 * zeros["poisson"]
    assert calibration["nb"] < 0.6 * calibration["poisson"]
    assert ppc.calibration_error()["coverage_0.95"]["poisson"] < 0.8
    for metric in (cv_gene, cv_cell, zeros, calibration):
        assert metric["nb"] < 0.7 * metric["untrained"]
    summary = ppc.differential_expression("cluster", p_val_thresh=0.2)  # as model cards
    assert len(summary) == 3 * 3
    means = summary.groupby("model")[["gene_f1", "roc_auc", "lfc_mae"]].mean()
    assert means.loc["nb", "gene_f1"] > means.loc["untrained", "gene_f1"] + 0.3
    assert means.loc["nb", "roc_auc"] > means.loc["untrained", "roc_auc"] + 0.2
    assert means.loc["nb", "lfc_mae"] < means.loc["untrained", "lfc_mae"]


def test_samples_follow_posterior_predictive_sample(scvi_models):
    adata, models = scvi_models
    model = models["nb"]
    cells = np.arange(0, 300, 7)
    ppc = PosteriorPredictiveCheck(adata, {"nb": model}, n_samples=3, indices=cells, seed=4,
                                   progress_bar=False)
    pyro.set_rng_seed(4)
    direct = model.posterior_predictive_sample(adata, indices=cells, n_samples=3)
    for s in range(3):
        np.testing.assert_array_equal(ppc.samples["nb"][s].toarray(), direct[:, :, s])
    assert list(ppc.obs.index) == list(adata.obs_names[cells])
    assert (ppc.raw_counts != adata.X[cells]).nnz == 0
    assert list(ppc.coefficient_of_variation("features").index) == list(adata.obs_names[cells])
    # chunks of 5 cells and a boolean mask: same cells, reproducible with a seed
    mask = np.isin(np.arange(300), cells)
    chunked = [PosteriorPredictiveCheck(adata, {"nb": model}, n_samples=2, indices=mask,
                                        batch_size=5, seed=1, progress_bar=False)
               for _ in range(2)]
    assert chunked[0].samples["nb"][0].shape == (cells.size, 40)
    assert (chunked[0].samples["nb"][1] != chunked[1].samples["nb"][1]).nnz == 0


def test_dense_and_foreign_anndata_keep_dense_samples(scvi_models):
    adata, models = scvi_models
    dense = adata[:50].copy()
    dense.X = dense.X.toarray()
    ppc = PosteriorPredictiveCheck(dense, {"nb": models["nb"]}, n_samples=2, batch_size=20,
                                   seed=0, progress_bar=False)
    assert isinstance(ppc.raw_counts, np.ndarray)
    assert all(isinstance(s, np.ndarray) and s.shape == (50, 40) for s in ppc.samples["nb"])
    np.testing.assert_array_equal(ppc.raw_counts, dense.X)
    assert ppc.zero_fraction().shape == (40, 2)


def test_constructor_errors(scvi_models):
    adata, models = scvi_models
    with pytest.raises(ValueError, match="modality='protein' needs"):
        PosteriorPredictiveCheck(adata, {"nb": models["nb"]}, modality="protein")
    with pytest.raises(ValueError, match="modality must be"):
        PosteriorPredictiveCheck(adata, {"nb": models["nb"]}, modality="atac")
    renamed = adata[:20].copy()
    renamed.var_names = [f"other{i}" for i in range(40)]
    with pytest.raises(ValueError, match="80 differ"):
        PosteriorPredictiveCheck(renamed, {"nb": models["nb"]})
    with pytest.raises(ValueError, match="genes"):
        PosteriorPredictiveCheck(adata[:, :30].copy(), {"nb": models["nb"]})
    with pytest.raises(ValueError, match="reserved"):
        PosteriorPredictiveCheck(adata, {"Raw": models["nb"]})
    with pytest.raises(ValueError, match="non-empty"):
        PosteriorPredictiveCheck(adata, {})


def test_totalvi_rna_and_protein_modalities():
    adata = simulate_cite_seq(n_cells=120, n_genes=30, n_proteins=4, seed=3)
    pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                 batch_key="batch")
    model = pyrovi.TOTALVI(adata, n_latent=5, n_hidden=32)
    model.train(max_epochs=10, batch_size=120, train_size=1.0, early_stopping=False, seed=0,
                progress_bar=False)
    pyro.set_rng_seed(2)
    direct = model.posterior_predictive_sample(adata, n_samples=3)  # genes then proteins
    proteins = adata.obsm["protein_expression"]
    for modality, columns, names in (
        (None, slice(0, 30), list(adata.var_names)),
        ("rna", slice(0, 30), list(adata.var_names)),
        ("protein", slice(30, 34), list(proteins.columns)),
    ):
        ppc = PosteriorPredictiveCheck(adata, {"totalvi": model}, n_samples=3,
                                       modality=modality, seed=2, progress_bar=False)
        assert ppc.modality == (modality or "rna")
        assert list(ppc.var_names) == names
        for s, sample in enumerate(ppc.samples["totalvi"]):
            values = sample.toarray() if sp.issparse(sample) else sample
            np.testing.assert_array_equal(values, direct[:, columns, s])
        if modality == "protein":
            assert isinstance(ppc.raw_counts, np.ndarray)  # obsm DataFrame: dense
            np.testing.assert_array_equal(ppc.raw_counts, proteins.to_numpy())
        else:
            assert sp.isspmatrix_csr(ppc.raw_counts)
        assert list(ppc.zero_fraction().index) == names
        assert np.isfinite(ppc.calibration_error()["calibration_error"]["totalvi"])
        assert set(ppc.summary("cv_gene").columns) >= {"mean_absolute_error", "r2"}
        assert len(ppc.differential_expression("cell_type")) == 4
