"""Decoders of TotalVI's protein likelihood: foreground scaling and background mixing.

:class:`ProteinDecoder` is pyrovi's (a shared trunk and two heads);
:class:`ScviToolsTotalVIDecoder` holds all of TotalVI's decoding networks in scvi-tools'
layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from pyrovi.nn.decoder import SCALE_ACTIVATIONS, ExpressionParams
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


BACKGROUND_ACTIVATIONS = ("softplus", "exp")


class ScviToolsTotalVIDecoder(nn.Module):
    """TotalVI's decoders in scvi-tools' layout (``DecoderTOTALVI``): one network per output.

    Four hidden networks read ``z ⊕ u`` (the latent sample and the continuous covariates
    ``u``, appended to the first layer's input only) with the categorical covariates injected
    into every layer: ``px_decoder`` (expression), ``py_back_decoder`` (background
    posterior), ``py_fore_decoder`` (foreground scaling) and ``sigmoid_decoder`` (shared by
    the zero-inflation and the background-mixing logits). Every output is a one-layer map of
    that network's hidden state next to ``z ⊕ u``, again with the categorical covariates.
    The submodules carry scvi-tools' names, so its weights map one to one (see
    :mod:`pyrovi.io.scvi_tools`). The mathematics is :class:`ProteinDecoder`'s and
    :class:`~pyrovi.nn.ExpressionDecoder`'s; the networks are not shared between outputs.

    Parameters
    ----------
    n_latent, n_genes, n_proteins
        Latent width and output widths.
    n_cat_list
        Categories per categorical covariate (the batch first).
    n_cont
        Number of continuous covariates.
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm
        Options of the four hidden networks (scvi-tools' defaults: 1, 256, 0.2, batch norm,
        no layer norm); the output maps have no dropout or normalisation.
    scale_activation
        ``"softmax"`` (expression proportions) or ``"softplus"`` (with size factors).
    background_activation
        Map from the network to the background posterior's scale: ``"softplus"``
        (scvi-tools ≥ 1.2) or ``"exp"`` (models saved by earlier versions); ``1e-8`` is
        added either way.
    zero_inflation
        Compute the zero-inflation logits (their weights exist either way, as in
        scvi-tools).

    Examples
    --------
    >>> decoder = ScviToolsTotalVIDecoder(5, 30, 4, n_cat_list=[2], n_hidden=16).eval()
    >>> expression, params = decoder(torch.randn(3, 5), [torch.tensor([0, 1, 1])])
    >>> tuple(expression.rho.shape), bool((params.foreground_scale >= 1).all())
    ((3, 30), True)
    """

    def __init__(
        self,
        n_latent: int,
        n_genes: int,
        n_proteins: int,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        n_layers: int = 1,
        n_hidden: int = 256,
        dropout_rate: float = 0.2,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        scale_activation: str = "softmax",
        background_activation: str = "softplus",
        zero_inflation: bool = True,
    ):
        super().__init__()
        if scale_activation not in SCALE_ACTIVATIONS:
            raise ValueError(f"scale_activation must be one of {SCALE_ACTIVATIONS}, got "
                             f"{scale_activation!r}.")
        if background_activation not in BACKGROUND_ACTIVATIONS:
            raise ValueError(f"background_activation must be one of {BACKGROUND_ACTIVATIONS}, "
                             f"got {background_activation!r}.")
        self.n_cont = n_cont
        self.scale_activation = scale_activation
        self.background_activation = background_activation
        self.zero_inflation = zero_inflation
        n_in = n_latent + n_cont

        def hidden() -> FCLayers:
            return FCLayers(n_in, n_hidden, n_cat_list, n_layers=n_layers, n_hidden=n_hidden,
                            dropout_rate=dropout_rate, use_batch_norm=use_batch_norm,
                            use_layer_norm=use_layer_norm, inject_covariates=True)

        def output(n_out: int, relu: bool = False) -> FCLayers:
            return FCLayers(n_hidden + n_in, n_out, n_cat_list, n_layers=1, dropout_rate=0.0,
                            use_batch_norm=False, use_layer_norm=False, use_activation=relu)

        self.px_decoder = hidden()
        self.px_scale_decoder = output(n_genes)
        self.py_back_decoder = hidden()
        self.py_back_mean_log_alpha = output(n_proteins)
        self.py_back_mean_log_beta = output(n_proteins)
        self.py_fore_decoder = hidden()
        self.py_fore_scale_decoder = output(n_proteins, relu=True)
        self.sigmoid_decoder = hidden()
        self.px_dropout_decoder_gene = output(n_genes)
        self.py_background_decoder = output(n_proteins)

    def _input(self, z: torch.Tensor, cont: torch.Tensor | None) -> torch.Tensor:
        """``z ⊕ u``: scvi-tools appends the continuous covariates to the latent sample."""
        if self.n_cont == 0:
            return z
        if cont is None:
            raise ValueError(f"This decoder was built for {self.n_cont} continuous "
                             "covariate(s); pass them as cont.")
        return torch.cat([z, cont], dim=-1)

    def forward(
        self, z: torch.Tensor, cats: Sequence[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> tuple[ExpressionParams, ProteinParams]:
        """Decode ``z`` into the expression and the foreground/mixing parameters.

        Parameters
        ----------
        z
            Latent values (after the latent transform), shape ``(..., n_latent)``.
        cats
            Category codes of each categorical covariate, batch first.
        cont
            Continuous covariates, shape ``(..., n_cont)``.

        Returns
        -------
        ExpressionParams, ProteinParams
        """
        z_in = self._input(z, cont)

        def with_z(h: torch.Tensor) -> torch.Tensor:
            return torch.cat([h, z_in], dim=-1)

        scale_logits = self.px_scale_decoder(with_z(self.px_decoder(z_in, cats)), cats)
        rho = (torch.softmax(scale_logits, -1) if self.scale_activation == "softmax"
               else F.softplus(scale_logits))
        # ReLU inside the output map, then 1 + 1e-8: the foreground never falls below the
        # background (scvi-tools' order of operations).
        fore = self.py_fore_scale_decoder(with_z(self.py_fore_decoder(z_in, cats)), cats)
        mixing_hidden = with_z(self.sigmoid_decoder(z_in, cats))
        zi_logits = (self.px_dropout_decoder_gene(mixing_hidden, cats) if self.zero_inflation
                     else None)
        return (
            ExpressionParams(rho=rho, zi_logits=zi_logits),
            ProteinParams(foreground_scale=fore + 1 + 1e-8,
                          mixing_logits=self.py_background_decoder(mixing_hidden, cats)),
        )

    def background_posterior(
        self, z: torch.Tensor, cats: Sequence[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of the Gaussian posterior of the log background rate.

        The scale is ``softplus(·) + 1e-8`` (or ``exp(·) + 1e-8``) of the network: a
        standard deviation, where :class:`~pyrovi.nn.GaussianEncoder` parameterises a
        log-variance.
        """
        z_in = self._input(z, cont)
        h = torch.cat([self.py_back_decoder(z_in, cats), z_in], dim=-1)
        raw_scale = self.py_back_mean_log_beta(h, cats)
        scale = (F.softplus(raw_scale) if self.background_activation == "softplus"
                 else torch.exp(raw_scale))
        return self.py_back_mean_log_alpha(h, cats), scale + 1e-8
