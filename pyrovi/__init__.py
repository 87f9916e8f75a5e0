"""pyrovi: deep generative models for single-cell omics, written as Pyro model/guide pairs.

>>> import pyrovi
>>> adata = pyrovi.datasets.pbmc68k_reduced()  # doctest: +SKIP
>>> pyrovi.SCVI.setup_anndata(adata)  # doctest: +SKIP
>>> model = pyrovi.SCVI(adata).train(max_epochs=100)  # doctest: +SKIP
>>> adata.obsm["X_scVI"] = model.get_latent_representation()  # doctest: +SKIP
"""

import logging

from pyrovi import (
    criticism,
    data,
    datasets,
    distributions,
    infer,
    io,
    models,
    nn,
    posterior,
    pp,
    priors,
    zoo,
)
from pyrovi._settings import settings
from pyrovi._version import __version__
from pyrovi.io.zoo import load_pretrained
from pyrovi.models import LDVAE, SCANVI, SCVI, TOTALVI
from pyrovi.models.interop import from_scvi_tools

logging.getLogger(__name__).addHandler(logging.NullHandler())

# The reports moved from pyrovi.posterior to pyrovi.criticism, a layer above it; the old
# names stay reachable there without pyrovi.posterior importing upwards.
for _name in criticism.FORMER_POSTERIOR_NAMES:
    setattr(posterior, _name, getattr(criticism, _name))
del _name

__all__ = [
    "LDVAE",
    "SCANVI",
    "SCVI",
    "TOTALVI",
    "__version__",
    "from_scvi_tools",
    "load_pretrained",
    "criticism",
    "data",
    "datasets",
    "distributions",
    "infer",
    "io",
    "models",
    "nn",
    "posterior",
    "pp",
    "priors",
    "settings",
    "zoo",
]
