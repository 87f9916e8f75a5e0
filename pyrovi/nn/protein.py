"""Decoder of TotalVI's protein likelihood: foreground scaling and background mixing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from pyrovi.nn.fc import FCLayers


class ProteinParams(NamedTuple):
    """Protein decoder outputs for a minibatch (each cells × proteins).

    ``foreground_scale`` (≥ 1) multiplies the background rate to give the foreground rate;
    ``mixing_logits`` are the logits of the background component's weight.
    """

    foreground_scale: torch.Tensor
    mixing_logits: torch.Tensor


class ProteinDecoder(nn.Module):
    """``z ↦ (foreground scale, background mixing logits)`` per protein (Gayoso et al. 2021).

    The foreground rate is the background rate times ``1 + ReLU(·)``, so a protein's
    foreground is never below its background; the mixing logits decide, per cell and
    protein, how much of the count is background.

    Parameters
    ----------
    n_input, n_proteins
        Latent width and number of proteins.
    n_cat_list, n_cont
        Covariates injected into the trunk.
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        Trunk options (see :class:`FCLayers`).

    Examples
    --------
    >>> decoder = ProteinDecoder(10, 14)
    >>> out = decoder(torch.randn(4, 10))
    >>> bool((out.foreground_scale >= 1).all()), tuple(out.mixing_logits.shape)
    (True, (4, 14))
    """

    def __init__(
        self,
        n_input: int,
        n_proteins: int,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.0,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
    ):
        super().__init__()
        self.trunk = FCLayers(
            n_input, n_hidden, n_cat_list, n_cont, n_layers=n_layers, n_hidden=n_hidden,
            dropout_rate=dropout_rate, use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm, inject_covariates=inject_covariates,
        )
        self.foreground_head = nn.Linear(n_hidden, n_proteins)
        self.mixing_head = nn.Linear(n_hidden, n_proteins)

    def forward(
        self, z: torch.Tensor, cats: Sequence[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> ProteinParams:
        """Decode ``z`` with covariates into :class:`ProteinParams`."""
        h = self.trunk(z, cats, cont)
        return ProteinParams(
            foreground_scale=1.0 + F.relu(self.foreground_head(h)) + 1e-8,
            mixing_logits=self.mixing_head(h),
        )
