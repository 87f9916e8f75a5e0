"""A training checkpoint on disk: the model, the optimiser and the random generators.

A checkpoint folder is a :mod:`bundle <pyrovi.io.bundle>` of kind ``"checkpoint"`` holding
the files of a model folder (:mod:`pyrovi.io.model_files`) and::

    checkpoint.json          epochs and steps done, where the run ends, the split's key,
                             the early-stopping tracker, Adam's hyperparameters, the scalar
                             parts of the generator states
    optimizer.safetensors    Adam's per-parameter state (step, first and second moments)
    rng.safetensors          torch's (and CUDA's) generator states, numpy's key array

:func:`checkpoint_files` and :func:`read_checkpoint_content` convert between these files
and the checkpoint content that :mod:`pyrovi.infer.checkpoint` builds: the model state
under ``"model"``, ``"optimizer"`` (a torch optimiser state dict), ``"rng"`` (as
:func:`pyro.util.get_rng_state` returns it, plus ``"cuda"``) and plain values.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from pyrovi.infer.checkpoint import latest_checkpoint
from pyrovi.io.bundle import Bundle, ModelFileError, json_bytes, tensor_file, write_bundle
from pyrovi.io.model_files import model_state_files, read_model_state

CHECKPOINT_KIND = "checkpoint"
CHECKPOINT_JSON = "checkpoint.json"
OPTIMIZER = "optimizer.safetensors"
RNG = "rng.safetensors"
_SEPARATE = ("model", "optimizer", "rng")


def _optimizer_parts(state_dict: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """A torch optimiser state dict as plain values and named tensors."""
    tensors, scalars = {}, {}
    for index, per_parameter in state_dict["state"].items():
        for key, value in per_parameter.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return {"param_groups": state_dict["param_groups"], "scalars": scalars}, tensors


def _optimizer_state_dict(plain: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for index, values in plain.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in plain["param_groups"]:
        # JSON turned tuples (Adam's betas) into lists.
        groups.append({k: tuple(v) if k == "betas" else v for k, v in group.items()})
    return {"state": state, "param_groups": groups}


def checkpoint_files(content: dict) -> dict[str, bytes]:
    """The files of a checkpoint folder holding ``content``.

    Parameters
    ----------
    content
        A checkpoint's content (see the module docstring).

    Returns
    -------
    dict
        ``{file name: bytes}`` for :func:`~pyrovi.io.bundle.write_bundle`.
    """
    optimizer, optimizer_tensors = _optimizer_parts(content["optimizer"])
    rng = content["rng"]
    numpy_name, numpy_keys, *numpy_rest = rng["numpy"]
    rng_tensors = {"torch": rng["torch"], "numpy_keys": torch.as_tensor(numpy_keys.astype(
        "int64"))}
    if "cuda" in rng:
        rng_tensors["cuda"] = rng["cuda"]
    plain = {k: v for k, v in content.items() if k not in _SEPARATE}
    plain["optimizer"] = optimizer
    plain["rng"] = {"random": rng["random"], "numpy": [numpy_name, *numpy_rest]}
    return {**model_state_files(content["model"]), CHECKPOINT_JSON: json_bytes(plain),
            OPTIMIZER: tensor_file(optimizer_tensors), RNG: tensor_file(rng_tensors)}


def read_checkpoint_content(bundle: Bundle) -> dict:
    """The checkpoint content held by ``bundle`` (see :func:`checkpoint_files`).

    Raises
    ------
    ModelFileError
        A file is missing, corrupted, altered, or not part of a checkpoint.
    """
    import numpy as np

    plain = bundle.read_json(CHECKPOINT_JSON)
    if not isinstance(plain, dict) or "epochs_done" not in plain:
        raise ModelFileError(f"{bundle.path / CHECKPOINT_JSON} does not describe a pyrovi "
                             "checkpoint.")
    rng_tensors = bundle.read_tensors(RNG)
    version, internal, gauss = plain["rng"]["random"]
    numpy_name, *numpy_rest = plain["rng"]["numpy"]
    rng = {"torch": rng_tensors["torch"],
           "random": (version, tuple(internal), gauss),
           "numpy": (numpy_name, rng_tensors["numpy_keys"].numpy().astype(np.uint32),
                     *numpy_rest)}
    if "cuda" in rng_tensors:
        rng["cuda"] = rng_tensors["cuda"]
    content = {k: v for k, v in plain.items() if k not in ("optimizer", "rng")}
    content["optimizer"] = _optimizer_state_dict(plain["optimizer"],
                                                 bundle.read_tensors(OPTIMIZER))
    content["rng"] = rng
    content["model"] = read_model_state(bundle)
    return content


def write_checkpoint(path: str | os.PathLike, content: dict) -> None:
    """Write ``content`` as the checkpoint folder ``path`` (atomically; see ``write_bundle``).

    The ``write`` of :class:`~pyrovi.infer.checkpoint.CheckpointWriter`.
    """
    write_bundle(path, CHECKPOINT_KIND, checkpoint_files(content), overwrite=True)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint (a checkpoint folder, or the newest in a checkpoint directory).

    Parameters
    ----------
    path
        A checkpoint folder or the directory holding checkpoints.

    Returns
    -------
    dict
        The checkpoint's content, with ``"path"`` added (the checkpoint read).

    Raises
    ------
    FileNotFoundError
        No checkpoint at ``path``.
    ModelFileError
        The checkpoint is damaged, altered, from a newer pyrovi, or not a checkpoint (a saved
        model is loaded with ``load``, not resumed).
    ~pyrovi.infer.checkpoint.LegacyCheckpointError
        A checkpoint of pyrovi 0.1.0 (never read).
    """
    folder = latest_checkpoint(path)
    try:
        bundle = Bundle(folder, CHECKPOINT_KIND)
    except ModelFileError as error:
        raise ModelFileError(f"{error} (A saved model is loaded with load, not resumed.)") \
            from None
    content = read_checkpoint_content(bundle)
    content["split_key"] = tuple(content["split_key"])
    content["path"] = Path(folder)
    return content


__all__ = [
    "CHECKPOINT_KIND",
    "checkpoint_files",
    "read_checkpoint",
    "read_checkpoint_content",
    "write_checkpoint",
]
