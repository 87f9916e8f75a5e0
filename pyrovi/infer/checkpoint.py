"""Training checkpoints: what an interrupted run needs to continue exactly where it stopped.

A checkpoint is a folder, ``checkpoint-<epochs done>`` in a checkpoint directory, holding

- the model as :meth:`~pyrovi.models.base.BaseModel.save` stores it (weights, constructor
  arguments, registry, genes, history so far, train/validation split, training options),
- the optimiser state (Adam's moments and step counts), the optimiser step and epoch
  counters (the KL warm-up position follows from them) and the early-stopping tracker,
- the random number generator states (torch's, and CUDA's when training there; Python's
  and numpy's global ones, as :func:`pyro.util.get_rng_state` gathers them), so that the
  minibatch order and Monte Carlo draws after a resume are those of an uninterrupted run,
- where the run ends (``first_epoch + max_epochs``) and whether it ended.

This module knows the names, the content and when to write; how the content is laid out
in files (data only: JSON and safetensors with a manifest of digests) is
:mod:`pyrovi.io.checkpoint_files`, which the models pass to :class:`CheckpointWriter`.
Folders are written beside their final name and renamed into place, so an interruption
during a write leaves the previous checkpoint intact. Only the last ``keep`` checkpoints
are kept.

Models write checkpoints with ``model.train(checkpoint_dir=...)`` and continue with
``model.train(resume_from=...)``; this module is the machinery.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pyro.util
import torch

from pyrovi.infer.training import EpochEnd

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
#: pyrovi 0.1.0 wrote each checkpoint as one pickle, which is never read.
_LEGACY_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")
#: Temporary folders of a write in progress start with this (see pyrovi.io.bundle).
_TEMP_PREFIX = ".checkpoint-"


class LegacyCheckpointError(ValueError):
    """A checkpoint of pyrovi 0.1.0 (a pickle, which pyrovi does not read: it could run code)."""


def checkpoint_path(directory: str | os.PathLike, epochs_done: int) -> Path:
    """Path of the checkpoint written after ``epochs_done`` epochs in ``directory``."""
    # Zero-padded so that a plain listing sorts in training order.
    return Path(directory) / f"checkpoint-{epochs_done:06d}"


def epochs_done(path: str | os.PathLike) -> int:
    """Epochs completed at the checkpoint ``path`` (read from its name)."""
    match = _NAME.match(Path(path).name)
    if match is None:
        raise ValueError(f"{os.fspath(path)!r} is not named like a checkpoint "
                         "(checkpoint-<epochs>).")
    return int(match.group(1))


def list_checkpoints(directory: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``directory``, oldest first (none if it does not exist).

    Temporary folders of an interrupted write are not listed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and p.is_dir()]
    return sorted(found, key=epochs_done)


def _legacy_refusal(path: Path) -> LegacyCheckpointError:
    return LegacyCheckpointError(
        f"{os.fspath(path)!r} is a checkpoint of pyrovi 0.1.0, stored as a pickle, which this "
        "pyrovi does not read (a pickle can run code when loaded). Finish that run with "
        "pyrovi 0.1.0, or train again; saved models of 0.1.0 (model.save) still load.")


def latest_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint ``path`` names: itself if a checkpoint folder, else the newest in it.

    Raises
    ------
    FileNotFoundError
        Nothing at ``path``, or a folder without checkpoints.
    LegacyCheckpointError
        ``path`` is, or holds only, checkpoints of pyrovi 0.1.0.
    """
    path = Path(path)
    if _LEGACY_NAME.match(path.name):
        raise _legacy_refusal(path)
    if _NAME.match(path.name) and path.is_dir():
        return path
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {os.fspath(path)!r}: no such file or folder.")
    found = list_checkpoints(path)
    if not found:
        legacy = sorted(p for p in path.iterdir() if _LEGACY_NAME.match(p.name)) \
            if path.is_dir() else []
        if legacy:
            raise _legacy_refusal(legacy[-1])
        raise FileNotFoundError(
            f"No checkpoint in {os.fspath(path)!r} (folders named checkpoint-<epochs>, "
            "written by model.train(checkpoint_dir=...))."
        )
    return found[-1]


def remove_checkpoints(directory: str | os.PathLike) -> int:
    """Delete the checkpoints (and temporary folders) of ``directory``; return how many.

    Other files are left alone.
    """
    removed = 0
    directory = Path(directory)
    for path in list_checkpoints(directory) + _temporary_folders(directory):
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def _temporary_folders(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return [p for p in directory.iterdir() if p.name.startswith(_TEMP_PREFIX)]


# -- random number generators --------------------------------------------------------------


def rng_state(device: torch.device | str = "cpu") -> dict:
    """States of the generators training draws from (torch, Python, numpy; CUDA's if used)."""
    state = pyro.util.get_rng_state()
    device = torch.device(device)
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device | str = "cpu") -> None:
    """Restore generator states saved by :func:`rng_state`.

    A CUDA state is restored only when training on CUDA again; resuming on another device
    continues correctly but not draw for draw.
    """
    pyro.util.set_rng_state(state)
    device = torch.device(device)
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# -- writing ------------------------------------------------------------------------------


def data_fingerprint(adata) -> dict:
    """Number of cells and a digest of their names: the cells a split refers to."""
    names = "\0".join(map(str, adata.obs_names)).encode()
    return {"n_obs": int(adata.n_obs), "obs_names_sha1": hashlib.sha1(names).hexdigest()}


class CheckpointWriter:
    """``on_epoch_end`` callback of :func:`~pyrovi.infer.train_svi` that writes checkpoints.

    Parameters
    ----------
    directory
        Checkpoint folder (created if needed).
    every
        Write after every ``every`` epochs, and after the last epoch of the run.
    keep
        Number of checkpoints to keep (the newest); ``None`` keeps all.
    model_state
        ``model_state(history) -> dict``: the model as ``save`` stores it, with the given
        history.
    write
        ``write(path, content)``: writes a checkpoint's content (a dict) as the folder
        ``path``, replacing nothing that exists (see
        :func:`pyrovi.io.checkpoint_files.write_checkpoint`).
    history
        History before this run (``None`` for a first run); the writer appends each epoch.
    run
        Further entries of every checkpoint: ``first_epoch`` and ``max_epochs`` of the run,
        the split's key, the data fingerprint...
    device
        Training device (whose generator state is saved).
    start_epoch
        Epochs done when the writer starts (default: the run's ``first_epoch``; on resume,
        the checkpoint's).
    replace_later
        Delete checkpoints of ``directory`` from after ``start_epoch`` instead of refusing
        them (when resuming from an earlier checkpoint of the same run, they are
        superseded).

    Raises
    ------
    FileExistsError
        ``directory`` holds checkpoints from after ``start_epoch``: another run's, which the
        new ones would mix with.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        every: int,
        keep: int | None,
        model_state: Callable[[pd.DataFrame | None], dict],
        write: Callable[[Path, dict], None],
        history: pd.DataFrame | None,
        run: dict,
        device: torch.device | str = "cpu",
        start_epoch: int | None = None,
        replace_later: bool = False,
    ):
        if int(every) < 1:
            raise ValueError(f"checkpoint_every must be a positive number of epochs, got {every}.")
        if keep is not None and int(keep) < 1:
            raise ValueError(f"keep_checkpoints must be at least 1 (or None: all), got {keep}.")
        self.directory = Path(directory)
        self.every = int(every)
        self.keep = None if keep is None else int(keep)
        self.model_state = model_state
        self.write = write
        self.previous = history
        self.rows: list[dict] = []
        self.run = dict(run)
        self.device = torch.device(device)
        self.written: list[Path] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        for stale in _temporary_folders(self.directory):
            shutil.rmtree(stale, ignore_errors=True)
        start = self.run.get("first_epoch", 0) if start_epoch is None else start_epoch
        later = [p for p in list_checkpoints(self.directory) if epochs_done(p) > start]
        if later and not replace_later:
            raise FileExistsError(
                f"{os.fspath(self.directory)!r} already holds checkpoints after epoch {start} "
                f"({later[-1].name}), of another run: resume it with "
                "train(resume_from=...), or write to another checkpoint_dir (or delete them)."
            )
        for path in later:
            logger.info("Removing %s: the run continues from an earlier checkpoint.", path.name)
            shutil.rmtree(path, ignore_errors=True)

    def history(self) -> pd.DataFrame | None:
        """History up to the last epoch seen (as ``model.history`` will be)."""
        if not self.rows:
            return self.previous
        new = pd.DataFrame(self.rows).set_index("epoch")
        return new if self.previous is None else pd.concat([self.previous, new])

    def __call__(self, end: EpochEnd) -> None:
        """Record the epoch's history row; write a checkpoint when one is due."""
        self.rows.append(dict(end.row))
        done = end.epoch + 1
        if not end.last and (done - self.run.get("first_epoch", 0)) % self.every:
            return
        stopper = end.early_stopping
        content = {
            **self.run,
            "model": self.model_state(self.history()),
            "epochs_done": done,
            "step": end.step,
            "finished": end.last,
            "optimizer": end.optimizer.state_dict(),
            "early_stopping": None if stopper is None else {"best": stopper.best,
                                                            "wait": stopper.wait},
            "lr_schedule": end.lr_schedule.state() if end.lr_schedule.varies else None,
            "rng": rng_state(self.device),
            "checkpoint_every": self.every,
        }
        path = checkpoint_path(self.directory, done)
        self.write(path, content)
        logger.debug("Checkpoint after epoch %d: %s", end.epoch, path)
        self.written.append(path)
        self._prune(done)

    def _prune(self, done: int) -> None:
        if self.keep is None:
            return
        earlier = [p for p in list_checkpoints(self.directory) if epochs_done(p) <= done]
        for path in earlier[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)


__all__ = [
    "CheckpointWriter",
    "LegacyCheckpointError",
    "checkpoint_path",
    "data_fingerprint",
    "epochs_done",
    "latest_checkpoint",
    "list_checkpoints",
    "remove_checkpoints",
    "rng_state",
    "set_rng_state",
]
