"""Saving and loading a model: its saved state, model folders and training checkpoints.

Plain functions behind :meth:`BaseModel.save <pyrovi.models.BaseModel.save>`,
:meth:`~pyrovi.models.BaseModel.load` and :meth:`~pyrovi.models.BaseModel.load_checkpoint`:
the state a model folder (and each training checkpoint) stores, the constructor arguments
as JSON holds them, and a model rebuilt from that state.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pandas as pd

from pyrovi._version import __version__
from pyrovi.data import REGISTRY_UNS_KEY, AnnDataRegistry, register_new_data
from pyrovi.infer import checkpoint as checkpoints
from pyrovi.infer import resolve_device
from pyrovi.io.bundle import to_json_value
from pyrovi.io.checkpoint_files import read_checkpoint
from pyrovi.io.model_files import SavedModel, save_model_folder

#: Key of the marker that stands in a checkpoint for a constructor argument save cannot
#: store (a callable likelihood, a prior module instance).
_UNSAVED = "__pyrovi_unsaved__"


def _is_unsaved(value) -> bool:
    return isinstance(value, dict) and set(value) == {_UNSAVED}


def _as_plain(value):
    """``value`` as JSON stores it, or ``None`` when JSON cannot hold it."""
    try:
        return to_json_value(value)
    except TypeError:
        return None


def saved_init_params(init_params: dict) -> dict:
    """Constructor arguments as :meth:`BaseModel.save <pyrovi.models.BaseModel.save>` stores
    them (plain JSON values).

    Custom objects (callables such as a ``gene_likelihood`` function, modules such as a
    prior instance, anything JSON cannot hold) are replaced by a marker naming them: a
    model file holds data only, never code. Their learned parameters are in the weights
    all the same.

    Parameters
    ----------
    init_params
        The model's ``init_params``.

    Returns
    -------
    dict
    """
    saved = {}
    for name, value in init_params.items():
        plain = None if callable(value) else _as_plain(value)
        if plain is None and value is not None:
            label = getattr(value, "__qualname__", None) or type(value).__name__
            saved[name] = {_UNSAVED: label}
        else:
            saved[name] = plain
    return saved


def restored_init_params(saved: dict, given: dict, model_name: str) -> dict:
    """Constructor arguments of a saved model, with the custom objects passed again.

    Parameters
    ----------
    saved
        ``init_params`` from a checkpoint (see :func:`saved_init_params`).
    given
        Arguments passed to ``load`` for the custom objects that were not saved.
    model_name
        Class name, for the messages.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        If a custom object that was not saved is not given again.
    TypeError
        If ``given`` names an argument that was saved (only unsaved ones can be given).
    """
    unsaved = {name: value[_UNSAVED] for name, value in saved.items() if _is_unsaved(value)}
    extra = sorted(set(given) - set(unsaved))
    if extra:
        raise TypeError(
            f"load takes again only the constructor arguments that save could not store "
            f"({sorted(unsaved) or 'none for this model'}); {extra} were saved with the model."
        )
    missing = {name: label for name, label in unsaved.items() if name not in given}
    if missing:
        listed = ", ".join(f"{name}= (it was {label})" for name, label in missing.items())
        call = ", ".join(f"{name}=..." for name in missing)
        raise ValueError(
            f"This {model_name} was built with custom objects that save does not store: "
            f"{listed}. Pass them again: {model_name}.load(dir_path, adata, {call}). A prior "
            "module is given as a new instance of the same class; its learned parameters are "
            "restored from the checkpoint."
        )
    return {**saved, **given}


@contextmanager
def registry_in_uns(adata, registry: AnnDataRegistry):
    """``adata.uns`` holds ``registry`` while a model is built on it (the constructor reads it
    there); whatever ``adata.uns`` held before is back afterwards."""
    missing = object()
    before = adata.uns.get(REGISTRY_UNS_KEY, missing)
    adata.uns[REGISTRY_UNS_KEY] = registry.to_dict()
    try:
        yield
    finally:
        if before is missing:
            del adata.uns[REGISTRY_UNS_KEY]
        else:
            adata.uns[REGISTRY_UNS_KEY] = before


def saved_state(model, history: pd.DataFrame | None, is_trained: bool,
                fingerprint: dict | None = None) -> dict:
    """The model as :meth:`~pyrovi.models.BaseModel.save` stores it (and training
    checkpoints embed it).

    ``fingerprint`` is :func:`~pyrovi.infer.checkpoint.data_fingerprint` of the model's
    data when already known (a checkpoint writer computes it once per run).
    """
    return {
        "model_class": type(model).__name__,
        "pyrovi_version": __version__,
        "init_params": saved_init_params(model.init_params),
        "registry": model.registry.to_dict(),
        "var_names": list(map(str, model.var_names)),
        "state_dict": {k: v.cpu() for k, v in model.module.state_dict().items()},
        "history": None if history is None else history.to_dict("list"),
        "history_index": None if history is None else list(history.index),
        "train_indices": model.train_indices,
        "validation_indices": model.validation_indices,
        "is_trained": is_trained,
        "train_params": model.train_params,
        # Which cells the split refers to (tools such as the command line's card check it).
        "data": fingerprint or checkpoints.data_fingerprint(model.adata),
    }


def save(model, dir_path: str | os.PathLike, overwrite: bool, save_anndata: bool) -> None:
    """Write ``model`` to the folder ``dir_path`` (see ``BaseModel.save``)."""
    save_model_folder(dir_path, saved_state(model, model.history, model.is_trained),
                      model.adata if save_anndata else None, overwrite=overwrite)


def set_saved_state(model, saved: dict) -> None:
    """Weights, history, split and training record from :func:`saved_state` output."""
    model.module.load_state_dict(saved["state_dict"])
    model.history = None
    if saved["history"] is not None:
        model.history = pd.DataFrame(saved["history"],
                                     index=pd.Index(saved["history_index"], name="epoch"))
    model.train_indices = saved["train_indices"]
    model.validation_indices = saved["validation_indices"]
    model.is_trained = saved["is_trained"]
    model.train_params = saved.get("train_params")


def from_saved(cls, saved: dict, adata, device, custom_params: dict, where: str):
    """A model of class ``cls`` on ``adata`` from :func:`saved_state` output."""
    if saved["model_class"] != cls.__name__:
        raise TypeError(
            f"{where!r} holds a {saved['model_class']}; use pyrovi.{saved['model_class']} "
            "to load it."
        )
    init_params = restored_init_params(saved["init_params"], custom_params, cls.__name__)
    registry = AnnDataRegistry.from_dict(saved["registry"])
    adata = cls.as_anndata(adata)
    registry = register_new_data(registry, adata, saved["var_names"], store=False,
                                 minified_stem=cls._minified_stem)
    with registry_in_uns(adata, registry):
        model = cls(adata, **init_params)
    set_saved_state(model, saved)
    model.device = resolve_device(device)
    model.module.to(model.device).eval()
    return model


def load(cls, dir_path: str | os.PathLike, adata, device, custom_params: dict):
    """The model of class ``cls`` saved in the folder ``dir_path`` (see ``BaseModel.load``)."""
    saved = SavedModel(dir_path)
    if saved.model_class != cls.__name__:
        raise TypeError(
            f"{os.fspath(dir_path)!r} holds a {saved.model_class}; load it with "
            f"pyrovi.{saved.model_class}.load."
        )
    # Checked before reading a saved AnnData, so that a missing object is reported first.
    restored_init_params(saved.state["init_params"], custom_params, cls.__name__)
    if adata is None:
        adata = saved.read_adata()
    return from_saved(cls, saved.state, adata, device, custom_params, os.fspath(dir_path))


def load_checkpoint(cls, path: str | os.PathLike, adata, device, custom_params: dict):
    """The model of the training checkpoint ``path`` (see ``BaseModel.load_checkpoint``)."""
    state = read_checkpoint(path)
    model = from_saved(cls, state["model"], adata, device, custom_params, os.fspath(state["path"]))
    model._split = (state["split_key"], (model.train_indices, model.validation_indices))
    return model


def restore(model, state: dict) -> None:
    """Set weights, history, split and options from a checkpoint of a run of this model.

    Raises
    ------
    TypeError
        A checkpoint of another model class.
    ValueError
        Other genes, constructor arguments, setup or cells than this model's.
    """
    saved = state["model"]
    where = os.fspath(state["path"])
    if saved["model_class"] != type(model).__name__:
        raise TypeError(f"{where!r} is a checkpoint of a {saved['model_class']}, not of a "
                        f"{type(model).__name__}.")
    if saved["var_names"] != list(map(str, model.var_names)):
        raise ValueError(f"{where!r} is a checkpoint of a model on other genes.")
    own = saved_init_params(model.init_params)
    differ = sorted(k for k in set(own) | set(saved["init_params"])
                    if own.get(k) != saved["init_params"].get(k))
    if differ:
        theirs = ", ".join(f"{k}={saved['init_params'].get(k)!r}" for k in differ)
        raise ValueError(
            f"{where!r} is a checkpoint of a {type(model).__name__} built with other "
            f"arguments ({theirs}); build the model with them, or use "
            f"{type(model).__name__}.load_checkpoint."
        )
    registry = to_json_value(model.registry.to_dict())
    # The cells are compared below, with a message of their own.
    differ = sorted(k for k in set(registry) | set(saved["registry"])
                    if k not in ("n_cells", "count_fingerprint")
                    and registry.get(k) != saved["registry"].get(k))
    if differ:
        raise ValueError(f"{where!r} is a checkpoint of a model set up differently "
                         f"({differ} differ); call setup_anndata as for that run.")
    if state["data"] != checkpoints.data_fingerprint(model.adata):
        raise ValueError(
            f"{where!r} is a checkpoint of a run on other cells ({state['data']['n_obs']} "
            "cells, or other names); its train/validation split would not apply."
        )
    set_saved_state(model, saved)
    model._split = (state["split_key"], (model.train_indices, model.validation_indices))
