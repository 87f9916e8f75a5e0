"""pyrovi uses only the public API of anndata, mudata, pandas and scanpy.

Private names change between releases without notice (anndata 0.13 changed
``AnnData._init_as_actual``, which broke reference mapping), so the package must not import
private modules of these libraries nor reach for private attributes of their objects.
"""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import numpy as np
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyrovi"
LIBRARIES = ("anndata", "mudata", "pandas", "scanpy")
#: Private names known to be used by tools in this ecosystem; refused whatever the object.
ALWAYS_REFUSED = {"_init_as_actual", "_normalize_index", "_inplace_subset_var",
                  "_inplace_subset_obs", "_init_as_view", "_mod", "_X"}

#: Private names that pyrovi reads from objects of other libraries (not the four above),
#: where the same name also exists in one of them.
OTHER_LIBRARIES: dict[str, str] = {}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources() -> list[tuple[Path, ast.Module]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    return [(path, ast.parse(path.read_text(), str(path))) for path in paths]


def _library_private_names() -> set[str]:
    """Private attribute names of the libraries' modules and public classes."""
    import anndata
    import mudata
    import pandas as pd

    names = set(ALWAYS_REFUSED)
    objects = [importlib.import_module(library) for library in LIBRARIES]
    # Instances as well as classes: many private attributes are set in __init__.
    adata = anndata.AnnData(np.ones((1, 1)), obs=pd.DataFrame({"g": [1.0]}, index=["c"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mudata's notices about its future defaults
        mdata = mudata.MuData({"rna": adata})
    objects += [adata, mdata, adata.obs, adata.obs["g"], adata.obs_names,
                pd.Categorical(["a"]), pd.CategoricalDtype(["a"])]
    for obj in objects:
        names |= {name for name in dir(obj) if _is_private(name)}
    return names


def _names_defined_by_pyrovi(trees) -> set[str]:
    """Private names pyrovi defines itself (its own methods, attributes and functions)."""
    defined = set()
    for _, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                defined.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
    return defined


def private_uses(trees) -> list[str]:
    """``file:line: what`` for each private module import or private attribute found."""
    library_private = _library_private_names()
    own = (_names_defined_by_pyrovi(trees) - ALWAYS_REFUSED) | set(OTHER_LIBRARIES)
    found = []
    for path, tree in trees:
        where = path.relative_to(PACKAGE.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom | ast.Import):
                modules = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                           else [alias.name for alias in node.names])
                for module in modules:
                    parts = module.split(".")
                    if parts[0] in LIBRARIES and any(_is_private(p) for p in parts[1:]):
                        found.append(f"{where}:{node.lineno}: import of {module}")
            elif (isinstance(node, ast.Attribute) and _is_private(node.attr)
                  and node.attr in library_private and node.attr not in own):
                found.append(f"{where}:{node.lineno}: .{node.attr}")
    return found


def test_no_private_api_of_anndata_mudata_pandas_or_scanpy():
    uses = private_uses(_sources())
    assert not uses, "private API of anndata/mudata/pandas/scanpy in pyrovi/:\n" + "\n".join(uses)


@pytest.mark.parametrize("code", [
    "adata._init_as_actual(X=x)",
    "from anndata._core.index import _normalize_index",
    "adata._inplace_subset_var(keep)",
    "frame._mgr",
])
def test_the_check_finds_private_uses(code):
    assert private_uses([(PACKAGE / "example.py", ast.parse(code))])
