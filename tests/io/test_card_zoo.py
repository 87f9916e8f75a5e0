"""Model cards, the model zoo (train from config, load_pretrained) and query data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

import pyrovi
from pyrovi.criticism import PosteriorPredictiveCheck
from pyrovi.datasets import simulate_counts
from pyrovi.zoo import load_pretrained, model_path, top_variable_genes, train_reference
from tests.conftest import shared_dataset, small_totalvi

MODELS = Path(__file__).resolve().parents[2] / "models"


@pytest.fixture(scope="module")
def trained():
    adata = simulate_counts(n_cells=300, n_genes=50, n_clusters=3, n_batches=2, seed=4)
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cluster")
    model = pyrovi.SCVI(adata, n_latent=5, gene_likelihood="nb")
    model.train(max_epochs=60, progress_bar=False, seed=0)
    return adata, model


def test_card_has_the_scvi_hub_sections_in_markdown_and_json(trained, tmp_path):
    adata, model = trained
    card = model.card(tmp_path / "card", reproduce="python make_it.py", n_samples=2)
    markdown = (tmp_path / "card" / "README.md").read_text()
    stored = json.loads((tmp_path / "card" / "card.json").read_text())
    assert stored == card
    for heading in ("## Model parameters", "## Setup arguments", "## Data registry",
                    "## Summary statistics", "### Hyperparameters", "### History summary",
                    "### Cell-wise coefficient of variation",
                    "### Gene-wise coefficient of variation", "## Differential expression",
                    "## Embedding quality", "## Versions", "python make_it.py"):
        assert heading in markdown
    assert card["model_parameters"]["n_latent"] == 5
    assert card["setup_arguments"] == {"batch_key": "batch", "labels_key": "cluster"}
    assert card["summary_statistics"]["n_cells"] == 300
    assert card["training"]["hyperparameters"]["max_epochs"] == 60
    assert card["training"]["history"]["epochs_trained"] == 60
    assert card["versions"]["torch"] == torch.__version__
    assert card["versions"]["pyrovi"] == pyrovi.__version__
    cv = card["posterior_predictive_checks"]["cv_gene"]
    assert cv["index"][0] == "Mean absolute error"
    assert set(cv) == {"index", "Training set", "Validation set"}
    # The validation column is the posterior predictive check of the validation cells.
    direct = PosteriorPredictiveCheck(adata, {"model": model}, n_samples=2,
                                      indices=model.validation_indices, seed=0,
                                      progress_bar=False).summary("cv_gene")
    np.testing.assert_allclose(cv["Validation set"][0],
                               direct.loc["model", "mean_absolute_error"], rtol=1e-6)
    groups = {row["group"] for row in card["differential_expression"]}
    assert groups == set(adata.obs["cluster"].cat.categories)
    metrics = {row["metric"]: row["value"] for row in card["embedding_metrics"]}
    assert metrics["leiden_nmi"] > 0.8 and "batch_entropy" in metrics


def test_card_of_a_trained_model_beats_an_untrained_one(trained):
    adata, model = trained
    untrained = pyrovi.SCVI(adata, n_latent=5, gene_likelihood="nb")
    untrained.train(max_epochs=1, progress_bar=False, seed=0)
    options = dict(n_samples=2, embedding=False)
    good = model.card(**options)["posterior_predictive_checks"]["cv_gene"]
    bad = untrained.card(**options)["posterior_predictive_checks"]["cv_gene"]
    assert good["Training set"][0] < 0.7 * bad["Training set"][0]  # mean absolute error


def test_card_paths_errors_and_missing_metric_dependencies(trained, tmp_path, monkeypatch):
    adata, model = trained
    monkeypatch.setitem(sys.modules, "leidenalg", None)
    card = model.card(tmp_path / "my_card.md", n_samples=1)
    assert (tmp_path / "my_card.md").exists() and (tmp_path / "my_card.json").exists()
    assert "pyrovi[metrics]" in card["embedding_metrics_skipped"]
    assert "Not computed" in (tmp_path / "my_card.md").read_text()
    with pytest.raises(KeyError, match="no column 'tissue'"):
        model.card(labels_key="tissue")
    fresh = pyrovi.SCVI(adata)
    with pytest.raises(ValueError, match="not trained"):
        fresh.card()


def test_totalvi_card_has_protein_tables():
    _, model = small_totalvi(n_cells=200, n_proteins=4)
    card = model.card(n_samples=1, embedding=False)
    checks = card["posterior_predictive_checks"]
    assert {"cv_cell", "cv_gene", "cv_cell_protein", "cv_gene_protein"} <= set(checks)
    assert card["summary_statistics"]["n_proteins"] == 4


# -- the zoo ------------------------------------------------------------------------------


def write_tiny_zoo_model(tmp_path) -> tuple[Path, Path, anndata.AnnData]:
    adata = simulate_counts(n_cells=240, n_genes=80, n_clusters=3, n_batches=2, seed=7)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    adata.write_h5ad(data_dir / "tiny.h5ad")
    folder = tmp_path / "zoo" / "scvi_tiny"
    folder.mkdir(parents=True)
    config = {"title": "tiny", "model_class": "SCVI", "dataset": "tiny.h5ad",
              "n_top_genes": 40, "setup": {"batch_key": "batch", "labels_key": "cluster"},
              "model": {"n_latent": 4, "gene_likelihood": "nb"},
              "train": {"max_epochs": 40}, "seed": 3,
              "card": {"n_samples": 1, "embedding": False}}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, data_dir, adata


def test_zoo_trains_from_config_and_loads_for_new_data(tmp_path, monkeypatch):
    folder, data_dir, adata = write_tiny_zoo_model(tmp_path)
    model = train_reference(folder, data_dir=data_dir)
    assert {"config.json", "model", "README.md", "card.json"} <= {
        p.name for p in folder.iterdir()}
    card = json.loads((folder / "card.json").read_text())
    assert card["reproduce"] == "python -m pyrovi.zoo train scvi_tiny"
    genes = top_variable_genes(adata, 40)
    assert list(model.var_names) == genes
    # A name resolves inside the zoo folder.
    monkeypatch.setenv("PYROVI_MODELS", str(folder.parent))
    assert model_path("scvi_tiny") == folder
    with pytest.raises(FileNotFoundError, match="available: \\['scvi_tiny'\\]"):
        model_path("scvi_huge")
    # The full gene set is subset to the model's genes; the embedding is the trained one.
    loaded = load_pretrained("scvi_tiny", adata.copy())
    np.testing.assert_allclose(loaded.get_latent_representation(),
                               model.get_latent_representation(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="another order"):
        load_pretrained(folder, adata[:, genes[::-1]].copy(), subset_genes=False)
    with pytest.raises(ValueError, match="lacks 1 of the 40 genes"):
        load_pretrained(folder, adata[:, [g for g in adata.var_names if g != genes[3]]].copy())


def test_query_cells_are_embedded_like_the_reference():
    adata = simulate_counts(n_cells=500, n_genes=60, n_clusters=4, n_batches=2, seed=11)
    rng = np.random.default_rng(0)
    query_mask = rng.random(adata.n_obs) < 0.3
    reference, query = adata[~query_mask].copy(), adata[query_mask].copy()
    pyrovi.SCVI.setup_anndata(reference, batch_key="batch")
    model = pyrovi.SCVI(reference, n_latent=6, gene_likelihood="nb")
    model.train(max_epochs=80, progress_bar=False, seed=0)
    query_latent = model.get_latent_representation(query)
    # Amortized: a query cell's embedding is what it would get inside any other AnnData.
    np.testing.assert_allclose(
        query_latent, model.get_latent_representation(adata)[query_mask], rtol=1e-5, atol=1e-5)
    # Known structure transfers: nearest reference neighbours give the query's clusters.
    ref_latent = model.get_latent_representation()
    distances = ((query_latent[:, None] - ref_latent[None]) ** 2).sum(-1)
    predicted = reference.obs["cluster"].to_numpy()[distances.argmin(1)]
    assert (predicted == query.obs["cluster"].to_numpy()).mean() > 0.9


def test_query_data_errors_say_what_differs_and_write_nothing():
    adata = simulate_counts(n_cells=200, n_genes=30, n_clusters=2, n_batches=2, seed=1)
    reference = adata[:150].copy()
    pyrovi.SCVI.setup_anndata(reference, batch_key="batch")
    model = pyrovi.SCVI(reference, n_latent=3).train(max_epochs=2, progress_bar=False)
    query = adata[150:].copy()
    with pytest.raises(ValueError, match="2 of its 30 genes are missing"):
        model.get_latent_representation(query[:, 2:].copy())
    with pytest.raises(ValueError, match="different order"):
        model.get_latent_representation(query[:, ::-1].copy())
    unknown = query.copy()
    unknown.obs["batch"] = unknown.obs["batch"].astype(str).replace({"b0": "lab_x"})
    with pytest.raises(ValueError, match="lab_x"):
        model.get_latent_representation(unknown)
    broken = query.copy()
    broken.X = broken.X.toarray()
    broken.X[0, 0] = 0.5
    with pytest.raises(ValueError, match="non-integer"):
        model.get_latent_representation(broken)
    assert "_pyrovi" not in broken.uns


# -- the reference models committed in models/ ------------------------------------------

ZOO = sorted(p.name for p in MODELS.iterdir() if (p / "config.json").exists())


def test_the_zoo_has_an_scvi_and_a_totalvi_model():
    classes = {json.loads((MODELS / n / "config.json").read_text())["model_class"] for n in ZOO}
    assert {"SCVI", "TOTALVI"} <= classes


@pytest.mark.parametrize("name", ZOO)
def test_committed_zoo_models_are_small_and_complete(name):
    folder = MODELS / name
    assert {"config.json", "model", "README.md", "card.json"} <= {
        p.name for p in folder.iterdir()}
    assert sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 6 * 2**20
    card = json.loads((folder / "card.json").read_text())
    assert card["reproduce"] == f"python -m pyrovi.zoo train {name}"
    assert card["posterior_predictive_checks"]["cv_gene"]["Validation set"]


@pytest.mark.parametrize("name", ZOO)
def test_committed_zoo_models_reproduce_their_card_on_the_real_data(name):
    """Loaded on the real data, a zoo model gives the held-out ELBO its card reports."""
    config = json.loads((MODELS / name / "config.json").read_text())
    adata = shared_dataset(config["dataset"])
    model = load_pretrained(name, adata)  # full gene set: subset to the model's genes
    card = json.loads((MODELS / name / "card.json").read_text())
    torch.manual_seed(0)
    elbo = np.mean([model.get_elbo(indices=model.validation_indices) for _ in range(3)])
    reported = card["training"]["heldout_elbo_per_cell"]
    assert abs(elbo - reported) < 0.01 * abs(reported)
    labels = config["setup"].get("labels_key")
    if labels:
        # The latent space separates the annotated cell types (5-fold nearest neighbours).
        latent = model.get_latent_representation()
        truth = adata.obs[labels].to_numpy()
        fold = np.arange(adata.n_obs) % 5 == 0
        distances = ((latent[fold][:, None] - latent[~fold][None]) ** 2).sum(-1)
        predicted = truth[~fold][distances.argmin(1)]
        assert (predicted == truth[fold]).mean() > 0.8
