"""pyrovi: deep generative models for single-cell omics, written as Pyro model/guide pairs.

>>> import pyrovi
>>> adata = pyrovi.datasets.pbmc68k_reduced()  # doctest: +SKIP
>>> pyrovi.SCVI.setup_anndata(adata)  # doctest: +SKIP
>>> model = pyrovi.SCVI(adata).train(max_epochs=100)  # doctest: +SKIP
>>> adata.obsm["X_scVI"] = model.get_latent_representation()  # doctest: +SKIP
"""

import logging

__version__ = "0.1.0"

from pyrovi import (  # noqa: E402
    data,
    datasets,
    distributions,
    infer,
    models,
    nn,
    posterior,
    pp,
    priors,
    zoo,
)
from pyrovi.models import LDVAE, SCVI, TOTALVI  # noqa: E402
from pyrovi.zoo import load_pretrained  # noqa: E402

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "LDVAE",
    "SCVI",
    "TOTALVI",
    "__version__",
    "load_pretrained",
    "data",
    "datasets",
    "distributions",
    "infer",
    "models",
    "nn",
    "posterior",
    "pp",
    "priors",
    "zoo",
]
