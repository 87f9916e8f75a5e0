"""The scvi-tools model classes pyrovi reads and writes, and how each one is translated.

Each :class:`ModelKind` pairs an scvi-tools class with a pyrovi class and names the four
translations between them: constructor arguments, set-up registry, weights (both ways).
:func:`pyrovi.from_scvi_tools` and ``to_scvi_tools`` look the kind up here, so adding a
model pair is one more entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from pyrovi.io.scvi_tools import arguments
from pyrovi.io.scvi_tools.registry import registry_from_scvi_tools, registry_to_scvi_tools
from pyrovi.io.scvi_tools.scanvi import (
    scanvi_arguments_from_scvi_tools,
    scanvi_arguments_to_scvi_tools,
    scanvi_registry_from_scvi_tools,
    scanvi_registry_to_scvi_tools,
    scanvi_state_from_scvi_tools,
    scanvi_state_to_scvi_tools,
)
from pyrovi.io.scvi_tools.scvi_weights import scvi_state_from_scvi_tools, scvi_state_to_scvi_tools
from pyrovi.io.scvi_tools.totalvi import (
    totalvi_init_params_from_scvi_tools,
    totalvi_init_params_to_scvi_tools,
    totalvi_registry_from_scvi_tools,
    totalvi_registry_to_scvi_tools,
    totalvi_state_from_scvi_tools,
    totalvi_state_to_scvi_tools,
)


@dataclass(frozen=True)
class ModelKind:
    """An scvi-tools model class and its pyrovi counterpart.

    Attributes
    ----------
    scvi_tools_name, pyrovi_name
        The class names.
    arguments_from
        ``(init_params_, scvi_version) -> pyrovi constructor arguments``.
    arguments_to
        ``pyrovi init_params -> scvi-tools init_params_``.
    registry_from
        ``(registry_, pyrovi class name, n_vars) -> pyrovi registry dict``.
    registry_to
        ``(AnnDataRegistry, var_names, scvi-tools class name, version) -> registry_``.
    state_from
        ``(scvi-tools state dict, pyrovi module) -> pyrovi state dict``.
    state_to
        ``pyrovi module -> scvi-tools state dict``.
    """

    scvi_tools_name: str
    pyrovi_name: str
    arguments_from: Callable
    arguments_to: Callable
    registry_from: Callable
    registry_to: Callable
    state_from: Callable
    state_to: Callable


def _scvi_family(correspondence: arguments.ModelCorrespondence) -> ModelKind:
    def arguments_from(init_params: dict, scvi_version: str) -> dict:
        del scvi_version  # the same arguments mean the same networks in every 1.x release
        return arguments.arguments_from_scvi_tools(correspondence, init_params)

    return ModelKind(
        correspondence.scvi_tools_name, correspondence.pyrovi_name,
        arguments_from=arguments_from,
        arguments_to=partial(arguments.arguments_to_scvi_tools, correspondence),
        registry_from=registry_from_scvi_tools, registry_to=registry_to_scvi_tools,
        state_from=scvi_state_from_scvi_tools, state_to=scvi_state_to_scvi_tools,
    )


def _totalvi_arguments_from(init_params: dict, scvi_version: str) -> dict:
    return totalvi_init_params_from_scvi_tools(init_params, scvi_version=scvi_version)


KINDS: dict[str, ModelKind] = {
    kind.scvi_tools_name: kind for kind in (
        _scvi_family(arguments.SCVI),
        _scvi_family(arguments.LINEAR_SCVI),
        ModelKind("TOTALVI", "TOTALVI",
                  arguments_from=_totalvi_arguments_from,
                  arguments_to=totalvi_init_params_to_scvi_tools,
                  registry_from=totalvi_registry_from_scvi_tools,
                  registry_to=totalvi_registry_to_scvi_tools,
                  state_from=totalvi_state_from_scvi_tools,
                  state_to=totalvi_state_to_scvi_tools),
        ModelKind("SCANVI", "SCANVI",
                  arguments_from=scanvi_arguments_from_scvi_tools,
                  arguments_to=scanvi_arguments_to_scvi_tools,
                  registry_from=scanvi_registry_from_scvi_tools,
                  registry_to=scanvi_registry_to_scvi_tools,
                  state_from=scanvi_state_from_scvi_tools,
                  state_to=scanvi_state_to_scvi_tools),
    )
}


def kind_of_scvi_tools(name: str, where: str) -> ModelKind:
    """The kind of the scvi-tools class ``name`` read from ``where``.

    Raises
    ------
    ValueError
        For a class pyrovi does not import, naming those it does.
    """
    if name not in KINDS:
        raise ValueError(f"{where!r} holds an scvi-tools {name or 'model'}; pyrovi imports "
                         f"{', '.join(sorted(KINDS))}.")
    return KINDS[name]


def kind_of_pyrovi(name: str) -> ModelKind:
    """The kind of the pyrovi class ``name``.

    Raises
    ------
    ValueError
        For a pyrovi class with no scvi-tools counterpart.
    """
    for kind in KINDS.values():
        if kind.pyrovi_name == name:
            return kind
    names = ", ".join(sorted(k.pyrovi_name for k in KINDS.values()))
    raise ValueError(f"pyrovi writes {names} for scvi-tools; a {name} has no scvi-tools "
                     "counterpart.")
