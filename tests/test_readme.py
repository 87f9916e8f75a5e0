"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quick_start_runs_and_writes_the_latent_space(tmp_path, monkeypatch):
    pytest.importorskip("scanpy")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(quick_start_code(), str(README), "exec"), namespace)
    adata, model = namespace["adata"], namespace["model"]
    assert adata.obsm["X_scVI"].shape == (700, 10)
    assert adata.layers["scvi_normalized"].shape == (700, 765)
    assert (tmp_path / "pbmc_scvi" / "model.pt").exists()
    assert model.history["elbo_validation"].iloc[-1] < model.history["elbo_validation"].iloc[0]
