"""Models (``pyrovi.models``): the user API classes around the modules of :mod:`pyrovi.modules`."""

from pyrovi.models.base import BaseModel
from pyrovi.models.ldvae import LDVAE
from pyrovi.models.scanvi import SCANVI
from pyrovi.models.scvi import SCVI, library_size_priors
from pyrovi.models.totalvi import TOTALVI
from pyrovi.modules import (
    GENE_LIKELIHOODS,
    SCANVIModule,
    SCVIModule,
    TOTALVIModule,
    count_likelihood,
)

__all__ = [
    "GENE_LIKELIHOODS",
    "LDVAE",
    "SCANVI",
    "SCANVIModule",
    "SCVI",
    "BaseModel",
    "SCVIModule",
    "TOTALVI",
    "TOTALVIModule",
    "count_likelihood",
    "library_size_priors",
]
