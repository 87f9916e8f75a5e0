"""Neural building blocks shared by every pyrovi model (``pyrovi.nn``)."""

from pyrovi.nn.decoder import ExpressionDecoder, ExpressionParams, LinearExpressionDecoder
from pyrovi.nn.dispersion import DISPERSIONS, Dispersion
from pyrovi.nn.encoder import (
    LATENT_DISTRIBUTIONS,
    AmortizedEncoder,
    AmortizedPosterior,
    GaussianEncoder,
    latent_transform,
)
from pyrovi.nn.fc import CovariateLinear, FCLayers
from pyrovi.nn.protein import ProteinDecoder, ProteinParams, ScviToolsTotalVIDecoder

__all__ = [
    "DISPERSIONS",
    "LATENT_DISTRIBUTIONS",
    "AmortizedEncoder",
    "AmortizedPosterior",
    "CovariateLinear",
    "Dispersion",
    "ExpressionDecoder",
    "ExpressionParams",
    "FCLayers",
    "GaussianEncoder",
    "LinearExpressionDecoder",
    "ProteinDecoder",
    "ProteinParams",
    "ScviToolsTotalVIDecoder",
    "latent_transform",
]
