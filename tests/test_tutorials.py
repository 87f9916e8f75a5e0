"""Tutorial notebooks run top to bottom (at small settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA

# Real data or whole runs: the slowest of the suite (kept in it; `-m "not slow"` skips).
pytestmark = pytest.mark.slow

TUTORIALS = sorted((Path(__file__).resolve().parents[1] / "tutorials").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", TUTORIALS, ids=lambda p: p.name)
def test_tutorial_runs(notebook, tmp_path, monkeypatch):
    pytest.importorskip("scanpy")
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYROVI_TUTORIAL_EPOCHS", "20")
    monkeypatch.setenv("PYROVI_TUTORIAL_QUICK", "1")  # fewer posterior draws
    content = json.loads(notebook.read_text())
    if content["metadata"].get("pyrovi", {}).get("needs_shared_data"):
        if not SHARED_DATA.exists():
            pytest.skip(f"{notebook.name} reads {SHARED_DATA}, which is absent (a fresh clone).")
        monkeypatch.setenv("PYROVI_SHARED_DATA", str(SHARED_DATA))
    namespace: dict = {}
    try:
        for i, cell in enumerate(content["cells"]):
            if cell["cell_type"] == "code":
                source = "".join(cell["source"])
                exec(compile(source, f"{notebook.name}[cell {i}]", "exec"), namespace)
    finally:
        matplotlib.pyplot.close("all")  # figures of one notebook do not pile up into the next
