"""scanpy-style one-call API (``pyrovi.pp``): fit a model and write its outputs into AnnData.

>>> import pyrovi
>>> model = pyrovi.pp.scvi(adata, n_epochs=100)  # doctest: +SKIP
>>> adata.obsm["X_scvi"].shape  # doctest: +SKIP
(700, 10)
"""

from pyrovi.pp._scvi import scvi

__all__ = ["scvi"]
