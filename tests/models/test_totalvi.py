"""TotalVI on simulated CITE-seq data with known truth, its set-up (AnnData and MuData),
missing-protein masking, validation errors and outputs."""

from __future__ import annotations

import logging

import anndata
import mudata
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

import pyrovi
from pyrovi.data import CountDataError, SetupError
from pyrovi.datasets import simulate_cite_seq


def negative_cell_log_error(adata, background):
    """Per protein: median over its negative cells of log(estimated / true background)."""
    positive = adata.obsm["protein_positive"]
    truth = adata.obsm["protein_background"]
    return np.array([
        np.median(np.log(background[~positive[:, t], t] / truth[~positive[:, t], t]))
        for t in range(positive.shape[1])
    ])


@pytest.fixture(scope="module")
def simulated():
    """TotalVI trained on 1500 simulated cells, 2 batches, 12 proteins with known truth."""
    adata = simulate_cite_seq(n_cells=1500, n_genes=100, n_proteins=12, seed=0)
    pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                 batch_key="batch")
    torch.manual_seed(0)
    model = pyrovi.TOTALVI(adata)
    untrained = model.get_protein_foreground_probability().to_numpy()
    model.train(max_epochs=200, n_epochs_kl_warmup=50, seed=0, progress_bar=False)
    return adata, model, untrained


def test_foreground_probability_separates_positive_from_negative_cells(simulated):
    adata, model, untrained = simulated
    positive = adata.obsm["protein_positive"]
    foreground = model.get_protein_foreground_probability(n_samples=5)
    assert list(foreground.columns) == [f"P{t}" for t in range(12)]
    auroc = [roc_auc_score(positive[:, t], foreground.iloc[:, t]) for t in range(12)]
    before = [roc_auc_score(positive[:, t], untrained[:, t]) for t in range(12)]
    # Simulation seeds 0-3: every protein 1.000; untrained ≈ 0.5.
    assert min(auroc) > 0.9 and np.median(auroc) > 0.95, auroc
    assert np.median(auroc) > np.median(before) + 0.3


def test_background_mean_is_recovered(simulated):
    adata, model, _ = simulated
    background = model.get_protein_background_mean(n_samples=5)
    assert background.shape == (adata.n_obs, 12) and np.isfinite(background).all()
    error = negative_cell_log_error(adata, background)
    # True background rates span 5-40 counts (a log range of 2.1) across proteins and
    # batches. Simulation seeds 0-3: largest |log error| 0.45-0.68, mean 0.17-0.28,
    # Spearman correlation of the protein/batch levels with the truth 0.94-0.96.
    assert np.abs(error).max() < 1.0 and np.abs(error).mean() < 0.4, error
    batch = adata.obs["batch"].cat.codes.to_numpy()
    positive = adata.obsm["protein_positive"]
    estimated = [np.median(background[(batch == b) & ~positive[:, t], t])
                 for b in range(2) for t in range(12)]
    truth = adata.uns["protein_background_rate"].ravel()
    assert stats.spearmanr(estimated, truth)[0] > 0.85


def test_training_history_and_latent_space(simulated):
    adata, model, _ = simulated
    history = model.history
    assert np.isfinite(history.to_numpy()).all()
    assert history["elbo_validation"].iloc[-1] < history["elbo_validation"].iloc[0] - 100
    latent = model.get_latent_representation()
    assert latent.shape == (adata.n_obs, 20)
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    accuracy = cross_val_score(KNeighborsClassifier(15), latent, adata.obs["cell_type"],
                               cv=5).mean()
    assert accuracy > 0.9, accuracy  # chance 0.25


def test_outputs_of_both_modalities(simulated, tmp_path):
    adata, model, _ = simulated
    idx = np.arange(20)
    rna, protein = model.get_normalized_expression(indices=idx, n_samples=2)
    assert rna.shape == (20, 100) and protein.shape == (20, 12)
    np.testing.assert_allclose(rna.sum(axis=1), 1.0, rtol=1e-4)
    assert list(protein.index) == list(adata.obs_names[:20])
    _, with_background = model.get_normalized_expression(
        indices=idx, include_protein_background=True, protein_list=["P3", "P0"])
    assert list(with_background.columns) == ["P3", "P0"]
    torch.manual_seed(1)
    _, plain = model.get_normalized_expression(indices=idx, protein_list=["P3", "P0"])
    torch.manual_seed(1)
    _, full = model.get_normalized_expression(indices=idx, protein_list=["P3", "P0"],
                                              include_protein_background=True)
    assert (full.to_numpy() >= plain.to_numpy()).all()
    _, scaled = model.get_normalized_expression(indices=idx, scale_protein=True)
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, rtol=1e-4)
    _, sampled = model.get_normalized_expression(indices=idx, sample_protein_mixing=True,
                                                 transform_batch="b1")
    assert np.isfinite(sampled.to_numpy()).all()
    draws = model.get_normalized_expression(indices=idx, n_samples=3, return_mean=False)
    assert draws[0].shape == (3, 20, 100) and draws[1].shape == (3, 20, 12)
    counts = model.posterior_predictive_sample(indices=idx, n_samples=2)
    assert counts.shape == (20, 112, 2)
    library = model.get_latent_library_size(indices=idx)
    np.testing.assert_allclose(library.ravel(), np.asarray(adata.X[:20].sum(1)).ravel(),
                               rtol=1e-4)
    assert np.isfinite(model.get_elbo()) and model.get_reconstruction_error()[
        "reconstruction_loss"] > 0
    model.save(tmp_path / "totalvi")
    loaded = pyrovi.TOTALVI.load(tmp_path / "totalvi", adata=adata.copy())
    np.testing.assert_allclose(loaded.get_latent_representation(),
                               model.get_latent_representation(), rtol=1e-5)
    with pytest.raises(KeyError, match="Proteins not in the model"):
        model.get_protein_foreground_probability(protein_list=["CD3"])


def test_differential_expression_covers_genes_and_proteins(simulated):
    adata, model, _ = simulated
    de = model.differential_expression(groupby="cell_type", group1="type0", mode="change",
                                       n_samples=1000, silent=True, seed=0)
    assert set(de.index) == {*adata.var_names, *[f"P{t}" for t in range(12)]}
    proteins = de.loc[[f"P{t}" for t in range(12)]]
    # Proteins positive in type0 but in few other cells are up; those off in type0 are down.
    positive = adata.obsm["protein_positive"]
    in_type0 = positive[(adata.obs["cell_type"] == "type0").to_numpy()].mean(0) > 0.5
    lfc = proteins["lfc_mean"].to_numpy()
    assert (lfc[in_type0] > lfc[~in_type0].max()).mean() > 0.5
    assert np.corrcoef(lfc, in_type0)[0, 1] > 0.7
    np.testing.assert_allclose(
        proteins.loc["P0", "raw_mean1"],
        adata.obsm["protein_expression"]["P0"][adata.obs["cell_type"] == "type0"].mean(),
        rtol=1e-5)


# -- missing proteins ---------------------------------------------------------------------

def test_proteins_zeroed_in_a_batch_are_masked_and_imputed(caplog):
    adata = simulate_cite_seq(n_cells=1200, n_genes=100, n_proteins=8, seed=2)
    second = (adata.obs["batch"] == "b1").to_numpy()
    truth = adata.obsm["protein_positive"]
    adata.obsm["protein_expression"].loc[second, ["P0", "P1", "P2"]] = 0.0
    with caplog.at_level(logging.WARNING, logger="pyrovi"):
        pyrovi.TOTALVI.setup_anndata(adata, "protein_expression", batch_key="batch")
    assert "all zero in batch 'b1'" in caplog.text and "P0" in caplog.text
    torch.manual_seed(0)
    model = pyrovi.TOTALVI(adata, n_hidden=128)
    mask = model.module.protein_batch_mask.numpy()
    assert mask[0].all() and not mask[1, :3].any() and mask[1, 3:].all()
    assert pyrovi.TOTALVI(adata, override_missing_proteins=True).module.protein_batch_mask.all()

    # The masked entries do not enter the likelihood: changing them changes nothing.
    data, _, _ = model.cell_data()
    batch = data.minibatch(torch.as_tensor(np.flatnonzero(second)[:50]))
    n_cells = batch["x"].shape[0]
    params = {
        "background": torch.full((n_cells, 8), 10.0), "foreground": torch.full((n_cells, 8), 90.0),
        "mixing_logits": torch.zeros(n_cells, 8), "protein_theta": torch.ones(8),
    }
    likelihood = model.module.protein_likelihood(params, batch["batch_index"])
    altered = batch["y"].clone()
    altered[:, :3] = 500.0
    torch.testing.assert_close(likelihood.log_prob(batch["y"]), likelihood.log_prob(altered))

    model.train(max_epochs=120, n_epochs_kl_warmup=40, seed=0, progress_bar=False)
    assert np.isfinite(model.history.to_numpy()).all()
    # Imputation: decoded in the batch that measured them, the zeroed proteins' foreground
    # probability still tells the positive cells of the other batch apart.
    imputed = model.get_protein_foreground_probability(
        indices=np.flatnonzero(second), transform_batch="b0", n_samples=5)
    auroc = [roc_auc_score(truth[second, t], imputed.iloc[:, t]) for t in range(3)]
    assert min(auroc) > 0.85, auroc


# -- AnnData and MuData -------------------------------------------------------------------

def as_mudata(adata, batch_in="rna"):
    proteins = adata.obsm["protein_expression"]
    rna = anndata.AnnData(X=adata.X.copy(), obs=adata.obs[["cell_type"]].copy(),
                          var=adata.var.copy())
    protein = anndata.AnnData(X=proteins.to_numpy(), obs=pd.DataFrame(index=adata.obs_names),
                              var=pd.DataFrame(index=proteins.columns))
    ({"rna": rna, "protein": protein}[batch_in]).obs["batch"] = adata.obs["batch"].to_numpy()
    return mudata.MuData({"rna": rna, "protein": protein})


@pytest.mark.parametrize("batch_in", ["rna", "protein"])
def test_anndata_and_mudata_set_ups_give_the_same_model_inputs(batch_in):
    adata = simulate_cite_seq(n_cells=200, n_genes=40, n_proteins=5, seed=3)
    mdata = as_mudata(adata, batch_in)
    pyrovi.TOTALVI.setup_anndata(adata, "protein_expression", batch_key="batch")
    pyrovi.TOTALVI.setup_mudata(mdata, batch_key="batch", modalities={"batch_key": batch_in})
    from_anndata = pyrovi.TOTALVI(adata, n_hidden=16)
    from_mudata = pyrovi.TOTALVI(mdata, n_hidden=16)
    assert from_mudata.mdata is mdata
    for model in (from_anndata, from_mudata):
        assert model.registry.batch_categories == ["b0", "b1"]
        assert list(model.protein_names) == [f"P{t}" for t in range(5)]
    index = torch.arange(200)
    a = from_anndata.cell_data()[0].minibatch(index)
    m = from_mudata.cell_data()[0].minibatch(index)
    for key in ("x", "y", "batch_index", "labels"):
        torch.testing.assert_close(a[key], m[key])
    from_mudata.train(max_epochs=2, seed=0, progress_bar=False)
    assert from_mudata.get_latent_representation(mdata).shape == (200, 20)


def test_mudata_errors_name_the_problem():
    adata = simulate_cite_seq(n_cells=100, n_genes=30, n_proteins=4, seed=4)
    mdata = as_mudata(adata)
    with pytest.raises(SetupError, match="not a modality"):
        pyrovi.TOTALVI.setup_mudata(mdata, modalities={"protein_layer": "adt"})
    with pytest.raises(SetupError, match="not a column of mdata.mod\\['rna'\\].obs"):
        pyrovi.TOTALVI.setup_mudata(mdata, batch_key="donor")
    with pytest.raises(SetupError, match="unknown key"):
        pyrovi.TOTALVI.setup_mudata(mdata, modalities={"batch": "rna"})
    shuffled = mudata.MuData({"rna": mdata.mod["rna"],
                              "protein": mdata.mod["protein"][::-1].copy()})
    with pytest.raises(SetupError, match="different order"):
        pyrovi.TOTALVI.setup_mudata(shuffled)
    assert "_pyrovi" not in mdata.uns


# -- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("bad_value", "message"),
    [(-1.0, "negative"), (np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
     (2.5, "non-integer")],
)
def test_bad_protein_counts_are_rejected_and_nothing_is_written(bad_value, message):
    adata = simulate_cite_seq(n_cells=60, n_genes=20, n_proteins=3, seed=5)
    adata.obsm["protein_expression"].iloc[7, 1] = bad_value
    with pytest.raises(CountDataError, match=message) as error:
        pyrovi.TOTALVI.setup_anndata(adata, "protein_expression")
    assert "adata.obsm['protein_expression']" in str(error.value)
    assert "cell7" in str(error.value) and "P1" in str(error.value)
    assert "_pyrovi" not in adata.uns


def test_protein_field_errors_and_array_input():
    adata = simulate_cite_seq(n_cells=60, n_genes=20, n_proteins=3, seed=6)
    with pytest.raises(SetupError, match="not in adata.obsm"):
        pyrovi.TOTALVI.setup_anndata(adata, "adt")
    frame = adata.obsm["protein_expression"]
    adata.obsm["array"] = frame.to_numpy()
    with pytest.raises(SetupError, match="protein_names_uns_key='names' is not in adata.uns"):
        pyrovi.TOTALVI.setup_anndata(adata, "array", protein_names_uns_key="names")
    adata.uns["names"] = np.array(["CD3", "CD4", "CD8"])
    pyrovi.TOTALVI.setup_anndata(adata, "array", protein_names_uns_key="names")
    assert pyrovi.TOTALVI(adata, n_hidden=16).protein_names.tolist() == ["CD3", "CD4", "CD8"]
    # Query data must carry the model's proteins in the model's order.
    model = pyrovi.TOTALVI(adata, n_hidden=16)
    query = simulate_cite_seq(n_cells=30, n_genes=20, n_proteins=3, seed=7)
    query.obsm["array"] = query.obsm["protein_expression"].set_axis(
        ["CD8", "CD4", "CD3"], axis=1)
    with pytest.raises(SetupError, match="same proteins, different order"):
        model.get_latent_representation(query)
    query.obsm["array"] = query.obsm["array"].set_axis(["CD3", "CD4", "CD19"], axis=1)
    with pytest.raises(SetupError, match="missing \\['CD8'\\], extra \\['CD19'\\]"):
        model.get_latent_representation(query)


@pytest.mark.parametrize(
    "options",
    [
        {"gene_dispersion": "gene-batch", "protein_dispersion": "protein-batch"},
        {"gene_dispersion": "gene-label", "protein_dispersion": "protein-label"},
        {"gene_dispersion": "gene-cell", "gene_likelihood": "zinb"},
        {"use_observed_lib_size": False, "latent_distribution": "ln"},
        {"empirical_protein_background_prior": False, "encode_covariates": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_model_variants_train_and_give_finite_outputs(options):
    adata = simulate_cite_seq(n_cells=200, n_genes=40, n_proteins=5, seed=8)
    pyrovi.TOTALVI.setup_anndata(adata, "protein_expression", batch_key="batch",
                                 labels_key="cell_type")
    model = pyrovi.TOTALVI(adata, n_hidden=32, n_latent=5, **options)
    model.train(max_epochs=5, seed=0, progress_bar=False)
    assert np.isfinite(model.history.to_numpy()).all()
    rna, protein = model.get_normalized_expression()
    assert np.isfinite(rna.to_numpy()).all() and np.isfinite(protein.to_numpy()).all()
    library = model.get_latent_library_size()
    assert library.shape == (200, 1) and (library > 0).all()


def test_invalid_options_are_rejected():
    adata = simulate_cite_seq(n_cells=50, n_genes=20, n_proteins=3, seed=9)
    pyrovi.TOTALVI.setup_anndata(adata, "protein_expression")
    with pytest.raises(ValueError, match="protein_dispersion must be one of"):
        pyrovi.TOTALVI(adata, protein_dispersion="protein-cell")
    with pytest.raises(ValueError, match="'nb', 'zinb' or a callable"):
        pyrovi.TOTALVI(adata, gene_likelihood="poisson")


def test_scvi_tools_network_layout_trains_saves_and_maps_a_query(tmp_path):
    """The layout whose weights map to scvi-tools' works through the whole model API."""
    adata = simulate_cite_seq(n_cells=300, n_genes=30, n_proteins=5, n_batches=3, seed=2)
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    last = sorted(adata.obs["batch"].unique())[-1]
    reference, query_adata = adata[adata.obs["batch"] != last].copy(), adata[
        adata.obs["batch"] == last].copy()
    pyrovi.TOTALVI.setup_anndata(reference, protein_expression_obsm_key="protein_expression",
                                 batch_key="batch")
    model = pyrovi.TOTALVI(reference, n_latent=4, n_hidden=16, network_layout="scvi-tools",
                           use_observed_lib_size=False, gene_likelihood="zinb")
    assert not hasattr(model.module, "protein_decoder")
    model.train(max_epochs=3, progress_bar=False, seed=0)
    # The per-batch efficiency is learned (it starts at exactly 0).
    assert model.module.log_protein_efficiency.abs().min() > 0
    rna, protein = model.get_normalized_expression(n_samples=2)
    assert np.isfinite(rna.to_numpy()).all() and np.isfinite(protein.to_numpy()).all()
    assert model.posterior_predictive_sample().shape == (reference.n_obs, 35)
    model.save(tmp_path / "model")
    loaded = pyrovi.TOTALVI.load(tmp_path / "model", reference)
    assert loaded.init_params["network_layout"] == "scvi-tools"
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  model.get_latent_representation())
    query = pyrovi.TOTALVI.load_query_data(query_adata, model)
    assert query.module.log_protein_efficiency.shape == (5, 3)
    query.train(max_epochs=2, progress_bar=False, seed=0)
    assert np.isfinite(query.get_latent_representation()).all()
