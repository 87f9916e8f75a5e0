"""What ``train()`` does with the options it is not given.

Two regimes, chosen by whether the run's length is given:

- ``max_epochs`` given: every option left unset takes scvi-tools' value (for SCVI: batch 128,
  learning rate 1e-3, fixed, KL warm-up over 400 epochs, no early stopping), so that a
  notebook ported from scvi-tools with its settings reproduces its run.
- ``max_epochs`` not given: pyrovi trains until the model has converged: minibatches sized
  for about 32 steps per epoch (64 to 512 cells), a learning rate of 3e-3 (higher for
  minibatches over 128), a KL warm-up over 10 epochs, and stopping when the validation ELBO
  has not improved for 10 epochs; the epoch cap is scvi-tools' size-based default. What
  these values cost and give, against scvi-tools' defaults on the same cells, is measured
  by ``benchmarks/time_to_quality.py`` (``benchmarks/RESULTS.md``). Measured and not kept:
  minibatches of 512 at every size (too few steps on small data), lowering the rate on a
  plateau of the validation ELBO (a few hundred validation cells make it noisy: the rate
  fell early and training crawled), and a cosine decay over a fixed number of epochs (no
  better than the constant rate at the same epochs).

Options given explicitly are never changed, in either regime.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

#: Marks a KL warm-up option that was not given (``None`` means "no warm-up", as in scvi-tools).
AUTO = "auto"


@dataclass(frozen=True)
class RunDefaults:
    """Values of the training options a model uses when they are not given.

    Attributes
    ----------
    batch_size, lr
        Minibatch size (or a function of the number of cells giving it) and (peak) learning
        rate (or a function of the minibatch size giving it).
    n_epochs_kl_warmup, n_steps_kl_warmup
        KL warm-up; ``n_steps_kl_warmup`` may also be a callable of the number of cells.
    early_stopping
        Whether to stop on a plateau of the validation ELBO (when there are validation
        cells).
    plan
        Further :class:`~pyrovi.infer.TrainingPlan` options (patiences, warm-up of the
        learning rate, the plateau rule).
    """

    batch_size: int | Callable[[int], int] = 128
    lr: float | Callable[[int], float] = 1e-3
    n_epochs_kl_warmup: int | None = 400
    n_steps_kl_warmup: object = None
    early_stopping: bool = False
    plan: dict = field(default_factory=dict)


#: scvi-tools' SCVI defaults: what an SCVI or LDVAE run of given length uses.
SCVI_TOOLS = RunDefaults()

#: ``train(**SCVI_TOOLS_OPTIONS)``: scvi-tools' SCVI schedule in a run of pyrovi's length
#: rule (which is scvi-tools' own: ``min(round(20000 / n_cells * 400), 400)`` epochs).
SCVI_TOOLS_OPTIONS = {"batch_size": 128, "lr": 1e-3, "n_epochs_kl_warmup": 400,
                      "early_stopping": False}

#: scvi-tools' TOTALVI defaults (its learning rate is lowered on a plateau: patience 30).
SCVI_TOOLS_TOTALVI = RunDefaults(batch_size=256, lr=4e-3, n_epochs_kl_warmup=None,
                                 n_steps_kl_warmup=lambda n_cells: int(0.75 * n_cells),
                                 early_stopping=True, plan={"reduce_lr_on_plateau": True})

def converging_batch_size(n_cells: int) -> int:
    """Minibatch size of pyrovi's converging defaults: about 32 steps per epoch.

    A power of two between 64 and 512 near ``n_cells / 32``. Small data sets need many
    optimiser steps more than large minibatches (CellBench's 1,300 cells reach scvi-tools'
    held-out ELBO in about half the epochs at 64 as at 128); large ones need few epochs,
    whose per-step costs larger minibatches spread over more cells.
    """
    return int(min(512, max(64, 2 ** round(math.log2(max(n_cells, 1) / 32)))))


def converging_lr(batch_size: int) -> float:
    """Peak learning rate of pyrovi's converging defaults: 3e-3 up to minibatches of 128,
    then by the square root of the minibatch size (Adam's scaling)."""
    return 3e-3 * max(1.0, batch_size / 128) ** 0.5


#: pyrovi's defaults for a run whose length it chooses (SCVI, LDVAE, SCANVI).
CONVERGING = RunDefaults(
    batch_size=converging_batch_size,
    lr=converging_lr,
    n_epochs_kl_warmup=10,
    early_stopping=True,
    plan={"early_stopping_patience": 10},
)


#: pyrovi's defaults for a TOTALVI run whose length it chooses: those of SCVI's, with
#: TotalVI's learning rate (scvi-tools' 4e-3 at minibatches of 256, by the square root of
#: the minibatch size otherwise) and no plateau rule.
CONVERGING_TOTALVI = replace(CONVERGING, lr=lambda batch_size: 4e-3 * (batch_size / 256) ** 0.5)


def resolve_run(
    fixed: RunDefaults,
    converging: RunDefaults,
    n_cells: int,
    max_epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    early_stopping: bool | None,
    n_epochs_kl_warmup,
    n_steps_kl_warmup,
    options: dict,
) -> dict:
    """The training options of a run: those given, the others from the regime's defaults.

    Parameters
    ----------
    fixed, converging
        The model's defaults for a run of given length and for one of chosen length.
    n_cells
        Cells of the model's data (for a KL warm-up defined per cell).
    max_epochs, batch_size, lr, early_stopping, n_epochs_kl_warmup, n_steps_kl_warmup
        As given to ``train()`` (``None``, or :data:`AUTO` for the KL warm-up: not given).
    options
        Further :class:`~pyrovi.infer.TrainingPlan` options given; never overridden.

    Returns
    -------
    dict
        ``batch_size``, ``lr`` (the default's for the minibatch size, given or not),
        ``early_stopping``, ``n_epochs_kl_warmup``,
        ``n_steps_kl_warmup``, ``regime`` (``"fixed"`` or ``"converging"``) and
        ``plan`` (plan options to add).
    """
    defaults = fixed if max_epochs is not None else converging
    kl_given = not (n_epochs_kl_warmup == AUTO and n_steps_kl_warmup in (None, AUTO))
    if kl_given:
        epochs_warmup = None if n_epochs_kl_warmup == AUTO else n_epochs_kl_warmup
        steps_warmup = None if n_steps_kl_warmup == AUTO else n_steps_kl_warmup
    else:
        epochs_warmup, steps_warmup = defaults.n_epochs_kl_warmup, defaults.n_steps_kl_warmup
        if callable(steps_warmup):
            steps_warmup = steps_warmup(n_cells)
    plan = {k: v for k, v in defaults.plan.items() if k not in options}
    if batch_size is None:
        batch_size = (defaults.batch_size(n_cells) if callable(defaults.batch_size)
                      else defaults.batch_size)
    if lr is None:
        lr = defaults.lr(batch_size) if callable(defaults.lr) else defaults.lr
    return {
        "batch_size": batch_size,
        "lr": lr,
        "early_stopping": defaults.early_stopping if early_stopping is None
        else early_stopping,
        "n_epochs_kl_warmup": epochs_warmup,
        "n_steps_kl_warmup": steps_warmup,
        "regime": "fixed" if max_epochs is not None else "converging",
        "plan": plan,
    }
