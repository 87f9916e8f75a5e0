"""Inference (``pyrovi.infer``): the SVI loop, ELBO scaling, devices."""

from pyrovi.infer.devices import resolve_device
from pyrovi.infer.fit import FitResult, fit
from pyrovi.infer.objective import (
    CellTerms,
    cell_terms,
    evaluate_terms,
    inference_mode,
    loss_and_terms,
    make_elbo,
)
from pyrovi.infer.scaling import CELL_PLATE, MinibatchScaling, cell_plate, kl_scale
from pyrovi.infer.training import (
    EarlyStopping,
    EpochEnd,
    TrainingPlan,
    default_max_epochs,
    evaluate_dataset,
    kl_weight_schedule,
    split_indices,
    train_svi,
)

__all__ = [
    "CellTerms",
    "EarlyStopping",
    "EpochEnd",
    "FitResult",
    "TrainingPlan",
    "CELL_PLATE",
    "MinibatchScaling",
    "cell_plate",
    "cell_terms",
    "default_max_epochs",
    "evaluate_dataset",
    "evaluate_terms",
    "fit",
    "inference_mode",
    "kl_scale",
    "kl_weight_schedule",
    "loss_and_terms",
    "make_elbo",
    "resolve_device",
    "split_indices",
    "train_svi",
]
