"""The learning rate of the SVI loop over a run: warm-up, cosine decay, plateau rule.

scvi-tools trains at a fixed learning rate unless asked (``reduce_lr_on_plateau``); pyrovi
does the same when told how long to train, and uses a schedule for the run whose length
it chooses (see :mod:`pyrovi.infer.defaults`). The warm-up ramps the rate up over the
first steps, so that a higher peak does not meet the first, badly scaled gradients; the
cosine decay brings it down by the run's end, where a small rate settles the weights; the
plateau rule is torch's ``ReduceLROnPlateau`` in absolute-threshold mode, with the option
names, defaults and meaning of scvi-tools' training plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LearningRateSchedule:
    """Learning rate by optimiser step: linear warm-up, then reduced on a plateau.

    Attributes
    ----------
    lr
        Peak learning rate (reached after the warm-up, before any reduction).
    warmup_steps
        Steps over which the rate rises linearly from ``lr / warmup_steps`` to ``lr``;
        0: no warm-up.
    reduce_on_plateau
        Multiply the rate by ``factor`` when ``monitor`` has not improved for
        ``patience`` epochs (by more than ``threshold`` below its best value): on the
        next epoch without improvement, as torch counts.
    factor, patience, threshold, min_lr
        The plateau rule (as torch's ``ReduceLROnPlateau``; the rate never goes below
        ``min_lr``).
    decay_to, total_steps
        After the warm-up, the rate follows half a cosine from ``lr`` down to
        ``lr * decay_to`` at the run's last step, ``total_steps`` after its first;
        ``None``: no decay.
    first_step
        The optimiser step the run started from (steps count over a model's training).
    monitor
        History column watched by the plateau rule (lower is better).
    scale, best, wait
        State of the plateau rule: the factor applied so far, the best value seen and the
        epochs since it (saved in checkpoints).
    """

    lr: float
    warmup_steps: int = 0
    reduce_on_plateau: bool = False
    factor: float = 0.6
    patience: int = 30
    threshold: float = 0.0
    min_lr: float = 0.0
    decay_to: float | None = None
    total_steps: int = 0
    first_step: int = 0
    monitor: str = "elbo_validation"
    scale: float = 1.0
    best: float = math.inf
    wait: int = 0

    @property
    def varies(self) -> bool:
        """Whether the rate ever differs from ``lr`` (else the loop leaves Adam's alone)."""
        return self.warmup_steps > 0 or self.reduce_on_plateau or self.decay_to is not None

    def rate(self, step: int) -> float:
        """The learning rate of optimiser step ``step`` (counted over the model's training)."""
        rate = max(self.lr * self.scale, min(self.min_lr, self.lr))
        step -= self.first_step
        if self.warmup_steps and step < self.warmup_steps:
            return rate * (step + 1) / self.warmup_steps
        if self.decay_to is not None and self.total_steps > self.warmup_steps:
            done = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
            rate *= self.decay_to + (1 - self.decay_to) * 0.5 * (1 + math.cos(math.pi * done))
        return rate

    def end_epoch(self, value: float) -> bool:
        """Record the monitored value of an epoch; return whether the rate was reduced."""
        if not self.reduce_on_plateau:
            return False
        if value < self.best - self.threshold or math.isinf(self.best):
            self.best, self.wait = value, 0
            return False
        self.wait += 1
        if self.wait <= self.patience or self.lr * self.scale <= self.min_lr:
            return False
        self.scale *= self.factor
        self.wait = 0
        return True

    def state(self) -> dict:
        """The plateau rule's state, for a checkpoint."""
        return {"scale": self.scale, "best": self.best, "wait": self.wait,
                "first_step": self.first_step, "total_steps": self.total_steps}

    def load_state(self, state: dict | None) -> None:
        """Continue from a checkpoint's :meth:`state` (``None``: start afresh)."""
        if state:
            self.scale, self.best, self.wait = state["scale"], state["best"], state["wait"]
            # The interrupted run's start and length, not those of the epochs left.
            self.first_step = state.get("first_step", self.first_step)
            self.total_steps = state.get("total_steps", self.total_steps)
