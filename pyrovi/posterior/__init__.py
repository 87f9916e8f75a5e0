"""Posterior utilities shared by every model (``pyrovi.posterior``)."""

from pyrovi.posterior.core import (
    guide_trace,
    inference_mode,
    latent_representation,
    marginal_log_likelihood,
    model_trace,
    posterior_predictive,
)

__all__ = [
    "guide_trace",
    "inference_mode",
    "latent_representation",
    "marginal_log_likelihood",
    "model_trace",
    "posterior_predictive",
]
