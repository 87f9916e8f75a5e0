"""``fit``: the SVI loop of pyrovi's models, for a model/guide pair of your own."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import pyro
import torch

from pyrovi.data.tensors import as_cell_data
from pyrovi.infer.devices import resolve_device
from pyrovi.infer.training import TrainingPlan, split_indices, train_svi


class FitResult(NamedTuple):
    """What :func:`fit` returns: the per-epoch ``history`` and the cells of each split."""

    history: pd.DataFrame
    train_indices: np.ndarray
    validation_indices: np.ndarray


def fit(
    module,
    data,
    max_epochs: int = 100,
    batch_size: int = 128,
    lr: float = 1e-3,
    train_size: float = 0.9,
    validation_size: float | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    progress_bar: bool = True,
    **plan_options,
) -> FitResult:
    """Train any model/guide pair by SVI: the loop of pyrovi's models, for your own.

    The module needs ``model(**minibatch)`` and ``guide(**minibatch)``, the keyword
    arguments being the names of ``data``, with the per-cell sites inside
    :func:`~pyrovi.infer.cell_plate`. The loop scales the minibatch ELBO to the training
    cells and applies the KL warm-up weight to the latent sites through
    :class:`~pyrovi.infer.MinibatchScaling`; neither reaches the model's signature.

    Parameters
    ----------
    module
        ``nn.Module`` holding every parameter (they are optimised directly; Pyro's parameter
        store is not used).
    data
        ``{argument name: per-cell array}`` (numpy, torch, scipy sparse), or
        :class:`~pyrovi.data.ArrayTensors` / :class:`~pyrovi.data.CellTensors`.
    max_epochs, batch_size, lr
        Passes over the training cells, cells per minibatch, Adam learning rate.
    train_size, validation_size
        Fractions of cells for training and validation (default: the rest validates).
    device
        Where to train (``"cpu"``, ``"cuda"``, ``"auto"``); the module is moved there.
    seed
        Seed for the split, the minibatch order and the Monte Carlo draws.
    progress_bar
        Show a tqdm bar.
    **plan_options
        Further :class:`TrainingPlan` options (``n_epochs_kl_warmup``, ``loss``,
        ``early_stopping``, ``weight_decay``...).

    Returns
    -------
    FitResult
        ``history`` (one row per epoch, columns as ``model.history`` of pyrovi's models),
        ``train_indices`` and ``validation_indices``.

    Examples
    --------
    >>> result = fit(module, {"x": counts}, max_epochs=50, seed=0)  # doctest: +SKIP
    >>> result.history["elbo_validation"].iloc[-1]  # doctest: +SKIP
    """
    if seed is not None:
        pyro.set_rng_seed(seed)
    device = resolve_device(device)
    module.to(device)
    data = as_cell_data(data, device)
    train_indices, validation_indices = split_indices(
        np.arange(data.n_obs), train_size, validation_size, np.random.default_rng(seed))
    plan = TrainingPlan(max_epochs=max_epochs, batch_size=batch_size, lr=lr,
                        progress_bar=progress_bar, **plan_options)
    history = train_svi(module, data, train_indices, validation_indices, plan)
    return FitResult(history, train_indices, validation_indices)
