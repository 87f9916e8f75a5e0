"""Training a model: the SVI run, its checkpoints, resuming one, the seeded initial weights.

Plain functions behind :meth:`BaseModel.train <pyrovi.models.BaseModel.train>`; each takes
the model it trains and sets its history, split, device and training record.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyro
import torch

from pyrovi._settings import check_seed
from pyrovi.data import CellTensors, build_cell_tensors
from pyrovi.data.registry import check_registered_data
from pyrovi.data.streaming import LOADER_OPTIONS
from pyrovi.infer import (
    TrainingPlan,
    default_max_epochs,
    resolve_device,
    split_indices,
    train_svi,
)
from pyrovi.infer import checkpoint as checkpoints
from pyrovi.infer.defaults import resolve_run
from pyrovi.infer.distributed import local_device, setup_data_parallel
from pyrovi.io.checkpoint_files import read_checkpoint, write_checkpoint
from pyrovi.models import persistence
from pyrovi.models.minified import require_counts

logger = logging.getLogger(__name__)

#: Options of :class:`~pyrovi.infer.TrainingPlan`, which ``train`` takes by keyword.
PLAN_FIELDS = set(TrainingPlan.__dataclass_fields__)


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-1 of a module's parameters and buffers (tells whether they changed)."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train(
    model,
    max_epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    train_size: float,
    validation_size: float | None,
    early_stopping: bool | None,
    n_epochs_kl_warmup: int | None,
    n_steps_kl_warmup: int | None,
    device,
    seed: int | None,
    progress_bar: bool,
    loss: str,
    train_indices: Sequence[int] | None,
    validation_indices: Sequence[int] | None,
    plan_kwargs: dict | None,
    loader_kwargs: dict | None,
    checkpoint_dir,
    checkpoint_every: int | None,
    keep_checkpoints: int | None,
    resume_from,
    strategy: str,
    kwargs: dict,
):
    """Fit ``model`` by SVI, or resume its checkpointed run (see ``BaseModel.train``)."""
    require_counts(model, None, "train", fix=(
        "Train on the data with their counts (a model built on them), or load this model "
        "with them: type(model).load(folder, adata=adata_with_counts)."))
    if checkpoint_every is not None and checkpoint_dir is None and resume_from is None:
        raise ValueError("checkpoint_every needs checkpoint_dir= (where to write them).")
    if resume_from is not None and strategy != "single":
        raise ValueError("resume_from continues a single-process run; strategy='ddp' "
                         "cannot resume it.")
    if resume_from is not None:
        return resume(model, resume_from, max_epochs=max_epochs, device=device,
                      progress_bar=progress_bar, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, keep=keep_checkpoints)
    options = {**(plan_kwargs or {}), **kwargs}
    # The model's own training options (scANVI's classification weight, say) are recorded
    # with the run and read by the model's _training_data, not by the SVI loop.
    own = {name: options.pop(name, default)
           for name, default in model._training_options.items()}
    unknown = set(options) - PLAN_FIELDS
    if unknown:
        valid = sorted(PLAN_FIELDS | set(model._training_options))
        raise TypeError(f"Unknown training option(s) {sorted(unknown)}; valid: {valid}.")
    unknown = set(loader_kwargs or {}) - set(LOADER_OPTIONS)
    if unknown:
        raise TypeError(f"Unknown loader_kwargs {sorted(unknown)}; valid: {LOADER_OPTIONS}.")
    model.device = resolve_device(device)
    if strategy == "ddp":
        model.device = local_device(model.device)
    parallel = setup_data_parallel(strategy, model.device)
    if seed is not None:
        seed = check_seed(seed)
        seed_initial_weights(model, seed)
        # Each rank draws its own noise and minibatches; the split below uses `seed` alone.
        pyro.set_rng_seed(seed + (parallel.rank if parallel is not None else 0))
    model.module.to(model.device)
    check_registered_data(model.registry, model.adata)
    data = build_cell_tensors(model.adata, model.registry, model.device,
                              loader_kwargs=loader_kwargs)
    if train_indices is not None:
        explicit = (np.asarray(train_indices),
                    np.asarray([] if validation_indices is None else validation_indices))
        model._split = (("explicit",), explicit)
    elif model._split is None or model._split[0] != (train_size, validation_size):
        candidates = np.flatnonzero(data.informative)
        rng = np.random.default_rng(seed)
        model._split = ((train_size, validation_size),
                        split_indices(candidates, train_size, validation_size, rng))
    model.train_indices, model.validation_indices = model._split[1]
    run = resolve_run(model._fixed_defaults, model._converging_defaults, model.adata.n_obs,
                      max_epochs, batch_size, lr, early_stopping, n_epochs_kl_warmup,
                      n_steps_kl_warmup, options)
    early_stopping_given = early_stopping is not None
    batch_size, lr, early_stopping = run["batch_size"], run["lr"], run["early_stopping"]
    n_epochs_kl_warmup, n_steps_kl_warmup = run["n_epochs_kl_warmup"], run["n_steps_kl_warmup"]
    validating = len(model.validation_indices) > 0
    if not early_stopping_given and early_stopping and not validating:
        early_stopping = False
        logger.info("No validation cells (train_size=%s): training without early "
                    "stopping, which monitors them.", train_size)
    if not validating:
        # A default plateau rule (TOTALVI's) monitors the validation cells too.
        run["plan"].pop("reduce_lr_on_plateau", None)
    options = {**run["plan"], **options}
    if max_epochs is None:
        max_epochs = default_max_epochs(model.adata.n_obs)
    plan = TrainingPlan(
        max_epochs=max_epochs,
        batch_size=batch_size,
        lr=lr,
        n_epochs_kl_warmup=n_epochs_kl_warmup,
        n_steps_kl_warmup=n_steps_kl_warmup,
        loss=loss,
        early_stopping=early_stopping,
        progress_bar=progress_bar,
        **options,
    )
    logger.info(
        "Training %s on %s: %d training and %d validation cells, %s%d epochs, batch %d, "
        "learning rate %.3g.", type(model).__name__, model.device, len(model.train_indices),
        len(model.validation_indices), "at most " if early_stopping else "", max_epochs,
        batch_size, lr,
    )
    model.train_params = {
        "max_epochs": max_epochs, "batch_size": batch_size, "lr": lr,
        "train_size": train_size, "validation_size": validation_size,
        "early_stopping": early_stopping, "n_epochs_kl_warmup": n_epochs_kl_warmup,
        "n_steps_kl_warmup": n_steps_kl_warmup, "loss": loss, "seed": seed,
        "device": str(model.device), "defaults": run["regime"], **options, **own,
        **({"loader_kwargs": dict(loader_kwargs)} if loader_kwargs else {}),
        **({"strategy": strategy, "world_size": parallel.world_size} if parallel else {}),
    }
    data = model._training_data(data)
    initialize_prior(model, data)
    start = 0 if model.history is None else int(model.history.index.max()) + 1
    writer = None
    if checkpoint_dir is not None and (parallel is None or parallel.is_main):
        writer = checkpoint_writer(model, checkpoint_dir, checkpoint_every or 1,
                                   keep_checkpoints, start, max_epochs, start)
    return run_svi(model, data, plan, start, None, writer, parallel)


def seed_initial_weights(model, seed: int) -> None:
    """Redraw the initial weights from ``seed`` if they are still the constructor's.

    So that a seed covers everything random in a run: ``SCVI(adata).train(seed=0)`` in
    two fresh processes starts from the same weights. A model that was trained, loaded,
    built for reference mapping or changed by hand keeps its weights.
    """
    if model.history is not None or weights_digest(model.module) != model._initial_weights:
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = model._build_module(model.adata, model.registry, **model.init_params)
    # Into the same module object: references to model.module stay valid.
    model.module.load_state_dict(fresh.state_dict())
    model._initial_weights = weights_digest(model.module)


def run_svi(model, data: CellTensors, plan: TrainingPlan, start: int,
            resume_state: dict | None, writer, parallel=None):
    """The SVI loop from epoch ``start``; its history is appended to the model's."""
    history = train_svi(
        model.module, data, model.train_indices, model.validation_indices, plan, start,
        resume_state=resume_state, on_epoch_end=writer, parallel=parallel,
    )
    model.history = history if model.history is None else pd.concat([model.history, history])
    model.is_trained = True
    return model


def checkpoint_writer(model, directory, every: int, keep: int | None, first_epoch: int,
                      max_epochs: int, start: int,
                      replace_later: bool = False) -> checkpoints.CheckpointWriter:
    """The ``on_epoch_end`` callback writing this run's checkpoints."""
    fingerprint = checkpoints.data_fingerprint(model.adata)
    run = {"first_epoch": first_epoch, "max_epochs": max_epochs,
           "split_key": model._split[0], "data": fingerprint}
    return checkpoints.CheckpointWriter(
        directory, every, keep,
        lambda history: persistence.saved_state(model, history, True, fingerprint),
        write_checkpoint,
        model.history, run, model.device, start_epoch=start, replace_later=replace_later,
    )


def resume(model, path, max_epochs: int | None, device, progress_bar: bool,
           checkpoint_dir, checkpoint_every: int | None, keep: int | None):
    """Restore the run checkpointed at ``path`` and train its remaining epochs."""
    state = read_checkpoint(path)
    if max_epochs is not None and max_epochs != state["max_epochs"]:
        raise ValueError(
            f"The run in {os.fspath(state['path'])!r} was for max_epochs="
            f"{state['max_epochs']}; resume_from continues it to that end. Train further "
            "with another train() call once it has finished."
        )
    persistence.restore(model, state)
    done = state["epochs_done"]
    end = state["first_epoch"] + state["max_epochs"]
    if state["finished"] or done >= end:
        logger.info("%s is the end of its run (%d epochs); nothing left to train.",
                    state["path"].name, done)
        return model
    model.device = resolve_device(device)
    model.module.to(model.device)
    check_registered_data(model.registry, model.adata)
    # The interrupted run's on-disk chunking: it decides the minibatches of its epochs.
    data = build_cell_tensors(model.adata, model.registry, model.device,
                              loader_kwargs=model.train_params.get("loader_kwargs"))
    data = model._training_data(data)
    options = {k: v for k, v in model.train_params.items() if k in PLAN_FIELDS}
    plan = TrainingPlan(**{**options, "max_epochs": end - done,
                           "progress_bar": progress_bar})
    logger.info("Resuming %s from %s: epochs %d to %d of the run, on %s.",
                type(model).__name__, state["path"], done, end - 1, model.device)
    writer = checkpoint_writer(
        model,
        checkpoint_dir or state["path"].parent, checkpoint_every or state["checkpoint_every"],
        keep, state["first_epoch"], state["max_epochs"], done, replace_later=True,
    )
    # Last, so that nothing between here and the first minibatch draws from them.
    checkpoints.set_rng_state(state["rng"], model.device)
    resume_state = {k: state.get(k) for k in ("optimizer", "step", "early_stopping",
                                              "lr_schedule")}
    return run_svi(model, data, plan, done, resume_state, writer)


def initialize_prior(model, data: CellTensors) -> None:
    """Give a data-initialised prior (the VampPrior's pseudo-inputs) random training cells.

    Done once, when training starts: the split is known then, so no validation cell
    becomes a pseudo-input (which would flatter the held-out ELBO).
    """
    prior = getattr(model.module, "prior", None)
    n_cells = getattr(prior, "n_init_cells", 0)
    if not n_cells or not len(model.train_indices):
        return
    chosen = torch.randperm(len(model.train_indices))[:n_cells].numpy()
    index = torch.as_tensor(np.asarray(model.train_indices)[chosen], dtype=torch.int64,
                            device=data.device)
    model.module.initialize_prior(data.minibatch(index))
