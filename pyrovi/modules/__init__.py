"""Modules (``pyrovi.modules``): the math of each model, a Pyro model/guide pair.

A module is a ``torch.nn.Module`` whose ``model`` and ``guide`` take a minibatch's tensors
by keyword and put every per-cell site inside :func:`cell_plate`. The user API classes of
:mod:`pyrovi.models` build, train and query them (scvi-tools' module/model split).
"""

from pyrovi.modules.plates import CELL_PLATE, cell_plate, kl_scale
from pyrovi.modules.scanvi import SCANVIModule
from pyrovi.modules.scvi import GENE_LIKELIHOODS, SCVIModule, count_likelihood
from pyrovi.modules.totalvi import TOTALVIModule

__all__ = [
    "CELL_PLATE",
    "GENE_LIKELIHOODS",
    "SCANVIModule",
    "SCVIModule",
    "TOTALVIModule",
    "cell_plate",
    "count_likelihood",
    "kl_scale",
]
