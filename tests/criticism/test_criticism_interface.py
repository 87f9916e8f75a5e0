"""The criticism layer: its declared interface to trained models, its place in the layering,
and the old ``pyrovi.posterior`` names of its reports."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import pyrovi
from pyrovi.criticism import PosteriorPredictiveCheck, TrainedModel, to_arviz
from pyrovi.criticism.interface import feature_columns
from tests.conftest import small_totalvi

PACKAGE = Path(__file__).resolve().parents[2] / "pyrovi"


def _imported_modules(folder: Path) -> dict[str, set[str]]:
    """``{file: pyrovi modules it imports}``, imports inside functions included."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[str(path.relative_to(PACKAGE.parent))] = {
            n for n in names if n == "pyrovi" or n.startswith("pyrovi.")}
    return found


@pytest.mark.parametrize(("layer", "above"), [
    ("criticism", ("pyrovi.models", "pyrovi.io", "pyrovi.cli", "pyrovi.zoo", "pyrovi.pp")),
    ("posterior", ("pyrovi.criticism", "pyrovi.models", "pyrovi.io", "pyrovi.cli")),
])
def test_layer_imports_nothing_above_it(layer, above):
    bad = {path: sorted(n for n in names if n.startswith(above) or n == "pyrovi")
           for path, names in _imported_modules(PACKAGE / layer).items()}
    assert not {path: names for path, names in bad.items() if names}


def test_no_criticism_module_over_600_lines():
    lengths = {p.name: len(p.read_text().splitlines())
               for p in (PACKAGE / "criticism").glob("*.py")}
    assert max(lengths.values()) <= 600, lengths


def test_old_posterior_names_are_the_criticism_objects():
    from pyrovi.posterior import PosteriorPredictiveCheck as old_ppc
    from pyrovi.posterior import embedding_metrics, model_card, write_card
    from pyrovi.posterior import to_arviz as old_to_arviz

    assert old_ppc is PosteriorPredictiveCheck
    assert old_to_arviz is to_arviz
    assert model_card is pyrovi.criticism.model_card
    assert write_card is pyrovi.criticism.write_card
    assert embedding_metrics is pyrovi.criticism.embedding_metrics


def test_models_implement_the_interface(small_adata):
    pyrovi.SCVI.setup_anndata(small_adata)
    scvi = pyrovi.SCVI(small_adata, n_latent=2, n_hidden=8)
    adata, totalvi = small_totalvi(n_cells=40, n_proteins=4, max_epochs=1)
    ldvae_data = small_adata.copy()
    pyrovi.LDVAE.setup_anndata(ldvae_data)
    for model in (scvi, totalvi, pyrovi.LDVAE(ldvae_data, n_latent=2, n_hidden=8)):
        assert isinstance(model, TrainedModel)
    assert list(scvi.observed_features()) == ["x"]
    features = totalvi.observed_features()
    assert list(features) == ["x", "y"]
    assert features["y"].equals(pd.Index(totalvi.protein_names))
    n_genes = len(features["x"])
    np.testing.assert_array_equal(feature_columns(totalvi, "y"), n_genes + np.arange(4))
    names = list(features["y"][[2, 0]])
    np.testing.assert_array_equal(totalvi.feature_positions("y", names), [2, 0])
    np.testing.assert_array_equal(scvi.feature_positions("x"), np.arange(small_adata.n_vars))
    with pytest.raises(KeyError, match="no observed site 'y'"):
        scvi.feature_positions("y")
    assert scvi.is_own_data(small_adata) and not scvi.is_own_data(small_adata.copy())
    assert totalvi.is_own_data(adata)
    draws = totalvi.posterior_predictive_sample(indices=[0, 1, 2])
    assert draws.shape == (3, n_genes + 4)


def test_reports_refuse_what_is_not_a_model(small_adata):
    with pytest.raises(TypeError, match="not a trained pyrovi model"):
        PosteriorPredictiveCheck(small_adata, {"m": object()})
    with pytest.raises(TypeError, match="TrainedModel"):
        to_arviz(object())
    with pytest.raises(TypeError, match="not a trained pyrovi model"):
        pyrovi.criticism.model_card(object())
