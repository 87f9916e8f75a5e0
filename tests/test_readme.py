"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def section_code(heading: str) -> str:
    """The first python block after ``heading`` in the README."""
    section = README.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs_and_writes_the_latent_space(tmp_path, monkeypatch):
    pytest.importorskip("scanpy")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(section_code("## Quick start"), str(README), "exec"), namespace)
    adata, model = namespace["adata"], namespace["model"]
    assert adata.obsm["X_scVI"].shape == (700, 10)
    assert adata.layers["scvi_normalized"].shape == (700, 765)
    assert (tmp_path / "pbmc_scvi" / "manifest.json").exists()
    assert model.history["elbo_validation"].iloc[-1] < model.history["elbo_validation"].iloc[0]


def test_readme_scanpy_one_call_runs_and_writes_its_outputs(tmp_path, monkeypatch):
    pytest.importorskip("scanpy")
    pytest.importorskip("skmisc", reason="seurat_v3 gene selection needs scikit-misc")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(section_code("## Fastest path for scanpy users"), str(README), "exec"),
         namespace)
    adata, model, de = namespace["adata"], namespace["model"], namespace["de"]
    assert adata.obsm["X_scvi"].shape == (700, 10)
    assert adata.obsm["X_scvi_denoised"].shape == (700, 400)
    assert "X_umap" in adata.obsm and model.is_trained
    assert de["group1"].nunique() == adata.obs["bulk_labels"].nunique()


def test_readme_totalvi_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(section_code("### TotalVI: RNA and proteins"), str(README), "exec"), namespace)
    adata, protein, de = namespace["adata"], namespace["protein"], namespace["de"]
    assert protein.shape == (adata.n_obs, 12)
    assert namespace["foreground"].to_numpy().max() <= 1.0
    assert {"P0", "gene0"} <= set(de.index)


def test_readme_model_checking_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("scanpy")
    pytest.importorskip("leidenalg", reason="embedding metrics need the metrics extra")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(section_code("### Checking a model"), str(README), "exec"), namespace)
    cv, de, scores = namespace["cv"], namespace["de"], namespace["scores"]
    # Both models reproduce which genes vary most across held-out cells. (On these 765
    # variable genes a Poisson scVI matches the CV as well as the NB one: its latent space
    # absorbs the overdispersion; tests/criticism/test_ppc.py shows NB winning on simulated data.)
    assert (cv["spearman"] > 0.5).all() and (cv["mean_absolute_error"] < 1.5).all()
    assert set(de["model"]) == {"nb", "poisson"}
    assert "leiden_nmi" in set(scores["metric"])
    assert namespace["idata"].posterior["z"].shape == (1, 20, 100, 10)
    assert (tmp_path / "pbmc_scvi_card" / "README.md").exists()


EXTENDING = README.parent / "docs" / "extending.md"


def test_extension_guide_runs_as_one_script(tmp_path, monkeypatch):
    """docs/extending.md: every python block, in order, as one script."""
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", EXTENDING.read_text(), re.S)
    assert len(blocks) >= 5
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(EXTENDING), "exec"), namespace)
    assert namespace["model"].is_trained and namespace["mog"].module.prior.n_components == 3
    assert float(namespace["student"].module.prior.log_df.detach()) != 1.0  # df learns
    assert namespace["z"].shape == (10, namespace["adata"].n_obs, 3)
    assert namespace["replicates"].shape == (5, *namespace["counts"].shape)
    assert namespace["log_lik"].shape == (10, namespace["adata"].n_obs)
    assert {"posterior", "posterior_predictive", "log_likelihood"} <= set(
        namespace["idata"].children)


def test_readme_extending_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(section_code("### Extending: your own likelihood, prior or model"),
                 str(README), "exec"), namespace)
    model = namespace["model"]
    assert model.module.prior.n_components == 4 and model.is_trained
    assert np.isfinite(namespace["elbo"])


def test_every_test_the_bad_inputs_table_names_exists():
    # docs/bad_inputs.md points each row at the test that checks it; a renamed test must not
    # leave the table pointing nowhere.
    table = (README.parent / "docs" / "bad_inputs.md").read_text()
    tests = README.parent / "tests"
    named = re.findall(r"`(?:(test_\w+)\.py::)?(test_\w+)`", table)
    assert len(named) >= 25
    for module, test in named:
        # The table names test files by name; they sit in folders mirroring the package.
        [path] = tests.rglob(f"{module or 'test_bad_inputs'}.py")
        source = path.read_text()
        assert f"def {test}(" in source, f"{module}::{test}"


def test_ci_runs_the_readmes_two_setup_commands():
    import subprocess

    ci = (README.parent / ".ci" / "run").read_text()
    extract = re.search(r"mapfile -t commands < <\((.*?)\)\n", ci, re.S).group(1)
    commands = subprocess.run(["bash", "-c", extract], cwd=README.parent, check=True,
                              capture_output=True, text=True).stdout.splitlines()
    assert commands[0].startswith("pip install -e \".[test]\" && pyrovi train pbmc68k_reduced")
    assert commands[1] == "python -m pytest"
