"""A saved model on disk: what ``model.save`` writes and every loader reads.

A model folder is a :mod:`bundle <pyrovi.io.bundle>` of kind ``"model"``::

    <folder>/
        manifest.json        format version, pyrovi version, size and SHA-256 of each file
        model.json           model class, constructor arguments, data registry, gene names,
                             training record and options, history, a fingerprint of the cells
        weights.safetensors  the module's state dict (parameters and buffers)
        cells.safetensors    the train/validation split (cell positions)
        adata.h5ad           the AnnData, with save_anndata=True

Folders written by pyrovi 0.1.0 hold one pickled ``model.pt`` instead; they are read with
the restricted reader of :mod:`pyrovi.io.legacy`.

:func:`model_state_files` and :func:`read_model_state` convert between these files and the
*model state*, the plain dictionary a model class builds itself from
(``pyrovi.models.persistence.saved_state``): ``model_class``, ``pyrovi_version``,
``init_params``, ``registry``, ``var_names``, ``state_dict``, ``history``, ``history_index``,
``train_indices``, ``validation_indices``, ``is_trained``, ``train_params``, ``data``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from pyrovi.io.bundle import Bundle, ModelFileError, json_bytes, tensor_file, write_bundle
from pyrovi.io.legacy import LEGACY_MODEL_FILE, read_legacy_model

MODEL_KIND = "model"
MODEL_JSON = "model.json"
WEIGHTS = "weights.safetensors"
CELLS = "cells.safetensors"
SAVED_ADATA = "adata.h5ad"
_ARRAYS = ("state_dict", "train_indices", "validation_indices")
_SPLIT = ("train_indices", "validation_indices")


def model_state_files(state: dict) -> dict[str, bytes]:
    """The files of a model folder (without its AnnData) that hold ``state``.

    Parameters
    ----------
    state
        A model state (see the module docstring).

    Returns
    -------
    dict
        ``{file name: bytes}`` for :func:`~pyrovi.io.bundle.write_bundle`.
    """
    description = {k: v for k, v in state.items() if k not in _ARRAYS}
    split = {name: torch.as_tensor(np.asarray(state[name], dtype=np.int64))
             for name in _SPLIT if state.get(name) is not None}
    return {MODEL_JSON: json_bytes(description), WEIGHTS: tensor_file(state["state_dict"]),
            CELLS: tensor_file(split)}


def _history_columns(history: dict | None) -> dict | None:
    # JSON stores NaN (an epoch without validation) as null.
    if history is None:
        return None
    return {name: [math.nan if v is None else v for v in values]
            for name, values in history.items()}


def read_model_state(bundle: Bundle) -> dict:
    """The model state held by the model files of ``bundle`` (see :func:`model_state_files`).

    Raises
    ------
    ModelFileError
        A file is missing, corrupted, altered, or does not hold a model state.
    """
    state = bundle.read_json(MODEL_JSON)
    if not isinstance(state, dict) or "model_class" not in state:
        raise ModelFileError(f"{os.fspath(bundle.path / MODEL_JSON)!r} does not describe a "
                             "pyrovi model.")
    state["state_dict"] = bundle.read_tensors(WEIGHTS)
    split = bundle.read_tensors(CELLS)
    for name in _SPLIT:
        state[name] = split[name].numpy() if name in split else None
    state["history"] = _history_columns(state.get("history"))
    return state


def save_model_folder(path: str | os.PathLike, state: dict, adata=None,
                      overwrite: bool = False) -> Path:
    """Write a model folder atomically (see :func:`~pyrovi.io.bundle.write_bundle`).

    Parameters
    ----------
    path
        The folder.
    state
        The model state.
    adata
        An AnnData to save beside the model, or ``None``.
    overwrite
        Replace an existing model folder (no file of it survives).

    Returns
    -------
    pathlib.Path
    """
    files: dict = model_state_files(state)
    if adata is not None:
        files[SAVED_ADATA] = adata.write_h5ad
    return write_bundle(path, MODEL_KIND, files, overwrite=overwrite)


class SavedModel:
    """A model folder, read: its state and, when saved with it, its AnnData.

    Parameters
    ----------
    path
        A folder written by ``model.save`` (this version's format or pyrovi 0.1.0's).

    Attributes
    ----------
    state
        The model state (see the module docstring).
    path
        The folder.

    Raises
    ------
    FileNotFoundError
        No saved model in the folder.
    ModelFileError
        A file is corrupted, altered, from a newer pyrovi, or (0.1.0 format) holds more
        than data.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._bundle = None
        if (self.path / "manifest.json").is_file():
            self._bundle = Bundle(self.path, MODEL_KIND)
            self.state = read_model_state(self._bundle)
        elif (self.path / LEGACY_MODEL_FILE).is_file():
            self.state = read_legacy_model(self.path / LEGACY_MODEL_FILE)
        elif self.path.is_file():
            raise FileNotFoundError(
                f"{os.fspath(self.path)!r} is a file; a saved pyrovi model is the folder that "
                "model.save wrote.")
        else:
            raise FileNotFoundError(f"No saved pyrovi model at {os.fspath(self.path)!r}.")

    @property
    def model_class(self) -> str:
        """Name of the model class (``"SCVI"``, ``"TOTALVI"``...)."""
        return str(self.state["model_class"])

    @property
    def var_names(self) -> list[str]:
        """The model's gene names, in its order."""
        return [str(g) for g in self.state["var_names"]]

    def read_adata(self):
        """The AnnData saved with the model.

        Raises
        ------
        ValueError
            The model was saved without its AnnData.
        """
        import anndata

        if self._bundle is not None:
            if SAVED_ADATA not in self._bundle:
                raise ValueError("No AnnData was saved with this model (save_anndata=False); "
                                 "pass adata=.")
            path = self._bundle.checked_path(SAVED_ADATA)
        else:
            path = self.path / SAVED_ADATA
            if not path.is_file():
                raise ValueError("No AnnData was saved with this model (save_anndata=False); "
                                 "pass adata=.")
        try:
            return anndata.read_h5ad(path)
        except (OSError, KeyError, ValueError) as error:
            raise ModelFileError(f"{os.fspath(path)!r} is not a readable h5ad file "
                                 f"({str(error).splitlines()[0][:200]}).") from None


__all__ = [
    "CELLS",
    "MODEL_JSON",
    "SAVED_ADATA",
    "WEIGHTS",
    "SavedModel",
    "model_state_files",
    "read_model_state",
    "save_model_folder",
]
