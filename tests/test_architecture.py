"""The package's layers, read from its own imports (those inside functions too).

Data flows down ``data → (nn, distributions, priors) → modules → infer → posterior →
criticism → io → models``: each layer imports only from the layers before it, no module
imports itself back through others, no module grows past 600 lines, and knowledge of
proteins stays in the modules that model them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyrovi"

#: Rank of each part of the package; an import may point only to the same or a lower rank.
LAYERS = {
    "pyrovi._version": 0,
    "pyrovi._gaussian_mixture": 0,
    "pyrovi._nonzero_positions": 0,
    "pyrovi._settings": 0,
    "pyrovi.data": 1,
    "pyrovi.datasets": 1,
    "pyrovi.nn": 2,
    "pyrovi.distributions": 2,
    "pyrovi.priors": 2,
    "pyrovi.modules": 3,
    "pyrovi.infer": 4,
    "pyrovi.posterior": 5,
    "pyrovi.criticism": 6,
    "pyrovi.plotting": 6,
    "pyrovi.io": 7,
    "pyrovi.models": 8,
    "pyrovi.pp": 9,
    "pyrovi.zoo": 9,
    "pyrovi": 10,
    "pyrovi.cli": 11,
    "pyrovi.__main__": 12,
}
MAX_LINES = 600
#: Where proteins may be named: their data field, likelihood and decoder, TotalVI's files
#: (its scvi-tools weight mapping included), the protein background prior, and the places
#: that list every model or field by name.
MAX_PROTEIN_MODULES = 11


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        # The package itself is its __init__ only, not a catch-all for its submodules.
        if module == prefix or (prefix != "pyrovi" and module.startswith(prefix + ".")):
            return LAYERS[prefix]
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def imports_of(module: str) -> set[str]:
    """pyrovi modules that ``module`` imports, at module level or inside functions."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("pyrovi") and name != module:
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_imports_point_only_to_earlier_layers():
    upward = [
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    # A package's __init__ re-exports its submodules; an edge from a submodule back to its
    # own package's __init__ would close a cycle, and counts as one.
    state: dict[str, int] = {}
    cycles = []

    def visit(module, path):
        state[module] = 1
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    # Package __init__ files import their submodules, which is not a cycle unless the
    # submodule imports the package back.
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_600_lines(module):
    n_lines = len(MODULES[module].read_text().splitlines())
    assert n_lines <= MAX_LINES, f"{module} has {n_lines} lines"


def mentions_outside_reexports(path: Path, word: str) -> bool:
    """Whether ``word`` appears in ``path`` other than in imports and ``__all__``: naming
    what another module defines, to re-export it, is no knowledge of it."""
    tree = ast.parse(path.read_text())
    reexport_lines = set()
    for node in tree.body:
        is_all = isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        if isinstance(node, (ast.Import, ast.ImportFrom)) or is_all:
            reexport_lines.update(range(node.lineno, node.end_lineno + 1))
    return any(word in line.lower()
               for number, line in enumerate(path.read_text().splitlines(), start=1)
               if number not in reexport_lines)


def test_proteins_are_known_to_few_modules():
    mentioning = sorted(m for m, p in MODULES.items()
                        if mentions_outside_reexports(p, "protein"))
    assert len(mentioning) <= MAX_PROTEIN_MODULES, mentioning
