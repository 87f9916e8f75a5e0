"""Stochastic variational inference for every pyrovi model.

One loop serves all models: minibatches are index gathers on the device, the ELBO is
Pyro's (``Trace_ELBO`` or ``TraceMeanField_ELBO``; ``TraceEnum_ELBO`` for a pair that
declares ``required_elbo = "enum"``), scaled to the training set and weighted
for KL warm-up by the :class:`~pyrovi.infer.scaling.MinibatchScaling` handler around the
model's cell plate, and after every epoch the validation ELBO is evaluated for the history and
early stopping.

The optimiser is a single ``torch.optim.Adam`` over the module's parameters, driven by the
ELBO's differentiable loss (Pyro's documented pattern for custom SVI loops). Parameters
therefore live in the module, not in Pyro's global parameter store, so several models can be
trained and used side by side in one process.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyro
import torch
from tqdm.auto import tqdm

from pyrovi.data.tensors import CellData, as_cell_data
from pyrovi.infer.distributed import DataParallel
from pyrovi.infer.heap import retained_heap
from pyrovi.infer.objective import (
    CellTerms,
    enumeration_nesting,
    evaluate_terms,
    inference_mode,
    loss_and_terms,
    make_elbo,
)
from pyrovi.infer.scaling import CELL_PLATE, MinibatchScaling
from pyrovi.infer.schedules import LearningRateSchedule

logger = logging.getLogger(__name__)


def default_max_epochs(n_cells: int, cap: int = 400) -> int:
    """scvi-tools' size-based default: ``min(round(20000 / n_cells * 400), 400)``, at least 1."""
    return max(1, min(round(20000 / max(n_cells, 1) * 400), cap))


def kl_weight_schedule(
    epoch: int,
    step: int,
    n_epochs_kl_warmup: int | None = 400,
    n_steps_kl_warmup: int | None = None,
    max_kl_weight: float = 1.0,
    min_kl_weight: float = 0.0,
) -> float:
    """Linear KL warm-up, by step when ``n_steps_kl_warmup`` is set, else by epoch.

    Returns ``min_kl_weight`` at the start, rising linearly to ``max_kl_weight``.
    """
    span = max_kl_weight - min_kl_weight
    if n_steps_kl_warmup:
        return min_kl_weight + span * min(1.0, step / n_steps_kl_warmup)
    if n_epochs_kl_warmup:
        return min_kl_weight + span * min(1.0, epoch / n_epochs_kl_warmup)
    return max_kl_weight


def split_indices(
    candidates: np.ndarray,
    train_size: float = 0.9,
    validation_size: float | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random train/validation split of ``candidates`` (cell indices).

    ``n_train = ceil(train_size * n)``; the validation set gets ``validation_size * n`` cells
    (default: all the rest), as scvi-tools' ``DataSplitter`` does.

    Raises
    ------
    ValueError
        If the sizes are out of range or leave no training cells.
    """
    n = len(candidates)
    if not 0.0 < train_size <= 1.0:
        raise ValueError(f"train_size must be in (0, 1], got {train_size}.")
    n_train = math.ceil(train_size * n)
    if validation_size is None:
        n_val = n - n_train
    elif validation_size < 0 or train_size + validation_size > 1.0 + 1e-9:
        raise ValueError("train_size + validation_size must be at most 1.")
    else:
        n_val = min(math.floor(validation_size * n), n - n_train)
    if n_train == 0:
        raise ValueError(f"No training cells: {n} cells with train_size={train_size}.")
    rng = rng or np.random.default_rng()
    permuted = rng.permutation(np.asarray(candidates))
    return np.sort(permuted[:n_train]), np.sort(permuted[n_train : n_train + n_val])


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs."""

    monitor: str = "elbo_validation"
    patience: int = 45
    min_delta: float = 0.0
    best: float = math.inf
    wait: int = 0

    def should_stop(self, value: float) -> bool:
        """Record this epoch's value; return whether training should stop."""
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        return self.wait >= self.patience


def _check_count(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        what = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{name} must be {what}, got {value!r}.")


def has_batch_norm(module: torch.nn.Module) -> bool:
    """Whether ``module`` normalises with batch statistics (it then needs two cells a batch)."""
    kinds = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
             torch.nn.SyncBatchNorm)
    return any(isinstance(m, kinds) for m in module.modules())


@dataclass
class TrainingPlan:
    """Options of :func:`train_svi` (defaults as in scvi-tools).

    Attributes
    ----------
    max_epochs, batch_size, lr, weight_decay, eps
        Optimisation settings (Adam).
    n_epochs_kl_warmup, n_steps_kl_warmup
        KL warm-up length (steps take precedence when given).
    loss
        ``"trace"`` (Trace_ELBO; TraceEnum_ELBO for a pair that declares
        ``required_elbo = "enum"``), ``"meanfield"`` (TraceMeanField_ELBO), ``"enum"`` or an
        ELBO instance (see :func:`~pyrovi.infer.make_elbo`).
    early_stopping, early_stopping_monitor, early_stopping_patience, early_stopping_min_delta
        Early stopping on a history column (lower is better).
    reduce_lr_on_plateau, lr_factor, lr_patience, lr_threshold, lr_min, lr_scheduler_metric
        Multiply the learning rate by ``lr_factor`` when ``lr_scheduler_metric`` has not
        improved by more than ``lr_threshold`` for ``lr_patience`` epochs, down
        to ``lr_min`` (scvi-tools' names and defaults; see
        :class:`~pyrovi.infer.schedules.LearningRateSchedule`).
    lr_warmup_epochs
        Epochs over which the learning rate rises linearly to ``lr`` (0: none).
    lr_decay_to
        After the warm-up, decay the learning rate along half a cosine to ``lr_decay_to``
        times ``lr`` at the run's last epoch (``None``: no decay).
    check_val_every_n_epoch
        Validation frequency.
    validation_batch_size
        Minibatch size for evaluating the validation set.
    progress_bar
        Show a tqdm bar.
    """

    max_epochs: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: int | None = None
    loss: object = "trace"
    early_stopping: bool = False
    early_stopping_monitor: str = "elbo_validation"
    early_stopping_patience: int = 45
    early_stopping_min_delta: float = 0.0
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_min: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    lr_warmup_epochs: int = 0
    lr_decay_to: float | None = None
    check_val_every_n_epoch: int = 1
    validation_batch_size: int = 1024
    progress_bar: bool = True

    def __post_init__(self):
        for name, least in (("max_epochs", 1), ("batch_size", 1), ("check_val_every_n_epoch", 1),
                            ("validation_batch_size", 1), ("early_stopping_patience", 1),
                            ("lr_patience", 1), ("lr_warmup_epochs", 0)):
            _check_count(name, getattr(self, name), least)
        for name in ("n_epochs_kl_warmup", "n_steps_kl_warmup"):
            if getattr(self, name) is not None:
                _check_count(name, getattr(self, name), 0)
        # lr=0 is allowed: a pass that updates batch-norm statistics and priors only.
        for name, positive in (("lr", False), ("eps", True), ("weight_decay", False),
                               ("lr_threshold", False), ("lr_min", False)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or not math.isfinite(value) or \
                    value < 0 or (positive and value == 0):
                raise ValueError(f"{name} must be a {'positive' if positive else 'non-negative'} "
                                 f"number, got {value!r}.")
        if not isinstance(self.lr_factor, numbers.Real) or not 0 < self.lr_factor < 1:
            raise ValueError(f"lr_factor must be in (0, 1), got {self.lr_factor!r}.")
        if self.lr_decay_to is not None and not 0 <= self.lr_decay_to <= 1:
            raise ValueError(f"lr_decay_to must be in [0, 1], got {self.lr_decay_to!r}.")

    def lr_schedule(self, steps_per_epoch: int, first_step: int) -> LearningRateSchedule:
        """The learning rate by step of a run from ``first_step`` over ``max_epochs``
        (constant unless a warm-up, decay or plateau rule is set)."""
        return LearningRateSchedule(
            self.lr, self.lr_warmup_epochs * steps_per_epoch, self.reduce_lr_on_plateau,
            self.lr_factor, self.lr_patience, self.lr_threshold, self.lr_min,
            self.lr_decay_to, self.max_epochs * steps_per_epoch, first_step,
            self.lr_scheduler_metric)


@dataclass
class EpochEnd:
    """Where :func:`train_svi` stands after an epoch: what an ``on_epoch_end`` callback gets.

    Attributes
    ----------
    epoch
        The epoch just completed (numbered from ``start_epoch``).
    step
        Optimiser steps taken so far, counting those before ``start_epoch``.
    row
        The epoch's history row (``{"epoch": ..., "train_loss": ..., ...}``).
    optimizer
        The Adam optimiser (its ``state_dict()`` resumes the run).
    early_stopping
        The early-stopping tracker, ``None`` without early stopping.
    lr_schedule
        The learning-rate schedule (its ``state()`` resumes the run).
    last
        Whether this is the last epoch of the call (``max_epochs`` reached or early stop).
    """

    epoch: int
    step: int
    row: dict
    optimizer: torch.optim.Optimizer
    early_stopping: EarlyStopping | None
    lr_schedule: LearningRateSchedule
    last: bool


def _epoch_means(prefix: str, terms_sum: CellTerms, n_cells: int) -> dict[str, float]:
    reconstruction = float(terms_sum.reconstruction) / n_cells
    kl = float(terms_sum.kl) / n_cells
    return {
        f"elbo_{prefix}": reconstruction + kl,
        f"reconstruction_loss_{prefix}": reconstruction,
        f"kl_local_{prefix}": kl,
    }


#: Attribute marking a parameter that must not get weight decay (set on partly frozen ones).
NO_WEIGHT_DECAY = "_pyrovi_no_weight_decay"


@torch.no_grad()
def make_adam(params: list[torch.Tensor], **options) -> torch.optim.Adam:
    """Adam with torch's fused kernel where the parameters allow it.

    The fused update (one kernel for all parameters) avoids the multi-tensor ("foreach")
    one's fallback to a loop over parameters on CPU (see "Costs behind constants" in
    ``benchmarks/RESULTS.md``). It needs floating-point parameters on CPU or CUDA.

    Parameters
    ----------
    params
        Parameters to optimise; those with the attribute :data:`NO_WEIGHT_DECAY` set are
        optimised without weight decay.
    **options
        Passed to :class:`torch.optim.Adam` (``lr``, ``eps``, ``weight_decay``...).

    Returns
    -------
    torch.optim.Adam
    """
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    kernel = {"fused": True} if fusable else {"foreach": True}
    # Partly frozen parameters (reference mapping) get no weight decay: it would move the
    # entries whose gradient is held at zero.
    exempt = [p for p in params if getattr(p, NO_WEIGHT_DECAY, False)]
    if not exempt:
        return torch.optim.Adam(params, **options, **kernel)
    groups = [{"params": [p for p in params if not getattr(p, NO_WEIGHT_DECAY, False)]},
              {"params": exempt, "weight_decay": 0.0}]
    return torch.optim.Adam([g for g in groups if g["params"]], **options, **kernel)


def evaluate_dataset(
    module, data: CellData, indices, batch_size: int = 1024
) -> CellTerms:
    """Per-cell ELBO terms of ``indices`` (module in eval mode, full KL weight).

    A pair that enumerates (``required_elbo = "enum"``, as scANVI) is evaluated with its
    sites enumerated, as in training: the terms are exact in them, not one sample.

    Returns
    -------
    CellTerms
        Vectors over the requested cells, on the data's device.
    """
    data = as_cell_data(data)
    nesting = enumeration_nesting(module)
    reconstruction, kl = [], []
    with inference_mode(module):
        for _, batch in data.iter_minibatches(indices, batch_size):
            terms = evaluate_terms(module.model, module.guide, nesting, **batch)
            reconstruction.append(terms.reconstruction)
            kl.append(terms.kl)
    return CellTerms(torch.cat(reconstruction), torch.cat(kl))


def train_svi(
    module,
    data: CellData,
    train_indices: np.ndarray,
    validation_indices: np.ndarray,
    plan: TrainingPlan,
    start_epoch: int = 0,
    resume_state: dict | None = None,
    on_epoch_end: Callable[[EpochEnd], None] | None = None,
    parallel: DataParallel | None = None,
) -> pd.DataFrame:
    """Fit ``module`` (a model/guide pair) by SVI on ``data``.

    Parameters
    ----------
    module
        ``nn.Module`` with ``model(**minibatch)`` and ``guide(**minibatch)``, its per-cell
        sites inside :func:`~pyrovi.infer.cell_plate`, already on ``data.device``.
    data
        Per-cell data on the training device: registered data (:class:`CellTensors`, or on disk) or
        your own arrays (:class:`~pyrovi.data.ArrayTensors` or a mapping of them).
    train_indices, validation_indices
        Cells (rows of ``data``) to train on and to validate on.
    plan
        Training options.
    start_epoch
        Epoch number of the first epoch (to continue a history); the epoch-based KL
        warm-up continues from it.
    resume_state
        State of an interrupted run to continue exactly (see
        :mod:`pyrovi.infer.checkpoint`): ``"optimizer"`` (Adam's ``state_dict``),
        ``"step"`` (optimiser steps so far, for the step-based KL warm-up) and
        ``"early_stopping"`` (``{"best": ..., "wait": ...}`` or ``None``) and
        ``"lr_schedule"`` (the learning-rate schedule's state, or ``None``).
    on_epoch_end
        Called with an :class:`EpochEnd` after every epoch's history row (to write
        checkpoints, say); not called for an epoch whose loss is not finite.
    parallel
        Data-parallel context (:func:`pyrovi.infer.distributed.setup_data_parallel`): this
        rank trains on its shard of ``train_indices`` and validates on its share of
        ``validation_indices``, gradients are averaged over ranks after every backward
        pass, and the history is computed over all ranks' cells, so that every rank keeps
        the same parameters, history and early-stopping decision. ``None``: one process.

    Returns
    -------
    pandas.DataFrame
        One row per epoch: ``kl_weight``, ``train_loss`` (the weighted objective per cell),
        ``elbo_train``, ``reconstruction_loss_train``, ``kl_local_train`` and, on validation
        epochs, the same for ``_validation``. "elbo" is the negative ELBO per cell, as in
        scvi-tools: lower is better.
    """
    data = as_cell_data(data)
    device = data.device
    elbo = make_elbo(plan.loss, module)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = make_adam(params, lr=plan.lr, eps=plan.eps, weight_decay=plan.weight_decay)
    resume_state = resume_state or {}
    if resume_state.get("optimizer") is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
    # The ELBO is scaled to all training cells on every rank (each rank's minibatch is an
    # unbiased estimate of the full-data ELBO; their gradients are averaged).
    n_train = len(train_indices)
    has_validation = len(validation_indices) > 0
    if has_batch_norm(module) and (plan.batch_size < 2 or n_train < 2):
        what = (f"batch_size={plan.batch_size}" if plan.batch_size < 2
                else f"{n_train} training cell")
        raise ValueError(
            f"{what}: the model normalises with batch statistics (batch norm), which needs at "
            "least two cells per minibatch. Use batch_size >= 2 and more training cells, or "
            "build the model with use_batch_norm='none'.")
    if parallel is not None:
        parallel.broadcast_module(module)
        train_indices = parallel.shard(train_indices)
        validation_indices = np.array_split(np.asarray(validation_indices),
                                            parallel.world_size)[parallel.rank]
    train_index = torch.as_tensor(np.asarray(train_indices, dtype=np.int64), device=device)
    stopper = (
        EarlyStopping(plan.early_stopping_monitor, plan.early_stopping_patience,
                      plan.early_stopping_min_delta)
        if plan.early_stopping
        else None
    )
    if stopper is not None and stopper.monitor.endswith("_validation") and not has_validation:
        raise ValueError(
            f"early_stopping monitors {stopper.monitor!r} but there are no validation cells; "
            "use train_size < 1 or monitor a *_train column."
        )
    if stopper is not None and resume_state.get("early_stopping"):
        stopper.best = resume_state["early_stopping"]["best"]
        stopper.wait = resume_state["early_stopping"]["wait"]

    rows = []
    steps_per_epoch = math.ceil(train_index.numel() / plan.batch_size)
    # The counted steps of the interrupted run when resuming: the estimate below is off
    # when a one-cell last minibatch was merged into the previous one.
    step = resume_state.get("step", start_epoch * steps_per_epoch)
    schedule = plan.lr_schedule(steps_per_epoch, step)
    schedule.load_state(resume_state.get("lr_schedule"))
    if schedule.reduce_on_plateau and schedule.monitor.endswith("_validation") \
            and not has_validation:
        raise ValueError(
            f"reduce_lr_on_plateau monitors {schedule.monitor!r} but there are no validation "
            "cells; use train_size < 1 or set lr_scheduler_metric to a *_train column.")
    epochs = tqdm(
        range(start_epoch, start_epoch + plan.max_epochs),
        desc="Training",
        unit="epoch",
        disable=not plan.progress_bar or (parallel is not None and not parallel.is_main),
    )
    # The dataset size and the warm-up weight reach the model's sites through this handler.
    scaling = MinibatchScaling(n_train, plate_name=getattr(module, "cell_plate", CELL_PLATE),
                               warmup_sites=getattr(module, "kl_warmup_sites", None))
    module.train()
    # retained_heap: the step's large temporaries reuse the previous step's pages.
    with pyro.validation_enabled(False), retained_heap():
        for epoch in epochs:
            loss_sum = torch.zeros((), device=device)
            reconstruction_sum = torch.zeros((), device=device)
            kl_sum = torch.zeros((), device=device)
            # The data decides how an epoch is drawn: index gathers on the device for data
            # in memory, block-shuffled buffers read from the file for data on disk.
            for index, batch in data.training_batches(train_index, plan.batch_size):
                kl_weight = kl_weight_schedule(epoch, step, plan.n_epochs_kl_warmup,
                                               plan.n_steps_kl_warmup)
                if schedule.varies:
                    for group in optimizer.param_groups:
                        group["lr"] = schedule.rate(step)
                scaling.kl_weight = kl_weight
                with scaling:
                    loss, terms = loss_and_terms(elbo, module.model, module.guide, **batch)
                if not scaling.saw_cell_plate:
                    raise ValueError(
                        "The model has no sample site inside a plate named "
                        f"{scaling.plate_name!r}, so its minibatch ELBO cannot be scaled to "
                        "the training set. Put the per-cell sites inside "
                        "pyrovi.infer.cell_plate(n_cells) (or set the module's cell_plate "
                        "attribute to the name of your plate).")
                # Per-cell loss for the gradient, as scvi-tools optimises, so that Adam's eps
                # has the same meaning; the ELBO itself is scaled to the training set.
                optimizer.zero_grad(set_to_none=True)
                (loss / n_train).backward()
                if parallel is not None:
                    parallel.average_gradients(params)
                optimizer.step()
                step += 1
                loss_sum += loss.detach() * index.numel() / n_train
                reconstruction_sum += terms.reconstruction.sum()
                kl_sum += terms.kl.sum()

            if parallel is not None:
                # Each rank saw its shard: the epoch's sums over all cells, on every rank,
                # and one set of batch-norm statistics.
                loss_sum, reconstruction_sum, kl_sum = (
                    parallel.sum(t) for t in (loss_sum, reconstruction_sum, kl_sum))
                parallel.average_buffers(module)
            row = {"epoch": epoch, "kl_weight": kl_weight,
                   "train_loss": float(loss_sum) / n_train}
            if schedule.varies:
                row["lr"] = optimizer.param_groups[0]["lr"]
            row.update(_epoch_means("train", CellTerms(reconstruction_sum, kl_sum), n_train))
            if has_validation and (epoch + 1) % plan.check_val_every_n_epoch == 0:
                val = _validation_sums(module, data, validation_indices, plan, parallel)
                row.update(_epoch_means("validation", CellTerms(*val[:2]), val[2]))
            rows.append(row)
            if not math.isfinite(row["train_loss"]):
                raise FloatingPointError(
                    f"The training loss became {row['train_loss']} at epoch {epoch}; try a lower "
                    "learning rate (lr=) or check the input counts."
                )
            epochs.set_postfix(
                {k: f"{row[k]:.4g}" for k in ("train_loss", "elbo_validation") if k in row}
            )
            if schedule.monitor in row and schedule.end_epoch(row[schedule.monitor]):
                logger.info("%s did not improve for %d epochs: learning rate now %.3g.",
                            schedule.monitor, schedule.patience, schedule.rate(step))
            stop = (stopper is not None and stopper.monitor in row
                    and stopper.should_stop(row[stopper.monitor]))
            # After the early-stopping update, so that a checkpoint holds this epoch's state.
            if on_epoch_end is not None:
                on_epoch_end(EpochEnd(epoch, step, row, optimizer, stopper, schedule,
                                      last=stop or epoch == start_epoch + plan.max_epochs - 1))
            if stop:
                logger.info(
                    "Early stopping at epoch %d: %s did not improve for %d epochs (best %.4f).",
                    epoch, stopper.monitor, stopper.patience, stopper.best,
                )
                break
    epochs.close()
    module.eval()
    return pd.DataFrame(rows).set_index("epoch")


def _validation_sums(module, data, indices, plan: TrainingPlan,
                     parallel: DataParallel | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Summed reconstruction and KL of the validation cells, and their number (all ranks)."""
    if len(indices):
        terms = evaluate_dataset(module, data, indices, plan.validation_batch_size)
        sums = torch.stack([terms.reconstruction.sum(), terms.kl.sum(),
                            torch.tensor(float(len(indices)), device=data.device)])
    else:
        sums = torch.zeros(3, device=data.device)
    if parallel is not None:
        sums = parallel.sum(sums)
    return sums[0], sums[1], int(sums[2])
