"""Posterior utilities shared by every model/guide pair (``pyrovi.posterior``).

Sampling batched over cells, latent representations, posterior predictive draws, ELBO
terms, marginal and pointwise log-likelihoods, Bayesian differential expression and the
varimax rotation of loadings: each takes a module and its data, never a model class. The
reports built on them (posterior predictive checks, embedding metrics, ArviZ export, model
cards) are in :mod:`pyrovi.criticism`, a layer above; ``import pyrovi`` also sets their
names on this module (``pyrovi.posterior.PosteriorPredictiveCheck`` ...), where they lived
before.
"""

from pyrovi.posterior.core import (
    PosteriorDraw,
    guide_trace,
    inference_mode,
    iterate_posterior,
    latent_posterior_parameters,
    latent_representation,
    marginal_log_likelihood,
    model_trace,
    pointwise_log_likelihood,
    posterior_predictive,
    posterior_samples,
    stored_posterior_guide,
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
    "latent_posterior_parameters",
    "latent_representation",
    "marginal_log_likelihood",
    "model_trace",
    "pointwise_log_likelihood",
    "posterior_predictive",
    "posterior_samples",
    "stored_posterior_guide",
    "PosteriorDraw",
    "iterate_posterior",
    "varimax",
]
