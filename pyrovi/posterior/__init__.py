"""Posterior utilities shared by every model (``pyrovi.posterior``)."""

from pyrovi.posterior.core import (
    guide_trace,
    inference_mode,
    latent_representation,
    marginal_log_likelihood,
    model_trace,
    posterior_predictive,
)
from pyrovi.posterior.differential import (
    bayes_factors,
    differential_expression,
    estimate_delta,
    estimate_pseudocounts,
    fdr_de_prediction,
    raw_counts_properties,
)
from pyrovi.posterior.loadings import varimax

__all__ = [
    "bayes_factors",
    "differential_expression",
    "estimate_delta",
    "estimate_pseudocounts",
    "fdr_de_prediction",
    "raw_counts_properties",
    "guide_trace",
    "inference_mode",
    "latent_representation",
    "marginal_log_likelihood",
    "model_trace",
    "posterior_predictive",
    "varimax",
]
