"""Posterior utilities shared by every model (``pyrovi.posterior``)."""

from pyrovi.posterior.arviz_export import to_arviz
from pyrovi.posterior.card import model_card, write_card
from pyrovi.posterior.core import (
    PosteriorDraw,
    guide_trace,
    inference_mode,
    iterate_posterior,
    latent_representation,
    marginal_log_likelihood,
    model_trace,
    pointwise_log_likelihood,
    posterior_predictive,
    posterior_samples,
)
from pyrovi.posterior.differential import (
    bayes_factors,
    differential_expression,
    estimate_delta,
    estimate_pseudocounts,
    fdr_de_prediction,
    raw_counts_properties,
)
from pyrovi.posterior.embedding import embedding_metrics
from pyrovi.posterior.loadings import varimax
from pyrovi.posterior.ppc import PosteriorPredictiveCheck

__all__ = [
    "PosteriorPredictiveCheck",
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
    "pointwise_log_likelihood",
    "posterior_predictive",
    "posterior_samples",
    "PosteriorDraw",
    "iterate_posterior",
    "to_arviz",
    "model_card",
    "write_card",
    "varimax",
    "embedding_metrics",
]
