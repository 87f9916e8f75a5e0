"""Decoders from the latent space to the parameters of count likelihoods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from pyrovi.nn.fc import FCLayers

SCALE_ACTIVATIONS = ("softmax", "softplus")


class ExpressionParams(NamedTuple):
    """Decoder outputs for a minibatch.

    ``rho`` are expression proportions (rows sum to 1 with the softmax activation);
    ``theta_logits`` the per-cell log inverse dispersion (``None`` unless the decoder
    predicts it); ``zi_logits`` the zero-inflation logits (``None`` without zero inflation).
    """

    rho: torch.Tensor
    theta_logits: torch.Tensor | None = None
    zi_logits: torch.Tensor | None = None


class ExpressionDecoder(nn.Module):
    """scVI's decoder: ``z ↦ (rho, [log theta], [zero-inflation logits])``.

    A shared :class:`FCLayers` trunk feeds one linear head per output. With
    ``scale_activation="softmax"`` rho is a composition over features; ``"softplus"`` gives
    unnormalised rates (used when size factors are given).

    Parameters
    ----------
    n_input, n_output
        Latent width (plus continuous covariates, if any) and number of features.
    n_cat_list, n_cont
        Covariates injected into the trunk.
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        Trunk options. scvi-tools applies no dropout in the decoder; neither do we.
    predict_dispersion
        Add a head for per-cell dispersion (``dispersion="gene-cell"``).
    zero_inflation
        Add a head for zero-inflation logits (ZINB).
    scale_activation
        ``"softmax"`` or ``"softplus"``.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        predict_dispersion: bool = False,
        zero_inflation: bool = False,
        scale_activation: str = "softmax",
    ):
        super().__init__()
        if scale_activation not in SCALE_ACTIVATIONS:
            raise ValueError(f"scale_activation must be one of {SCALE_ACTIVATIONS}.")
        self.trunk = FCLayers(
            n_input, n_hidden, n_cat_list, n_cont, n_layers=n_layers, n_hidden=n_hidden,
            dropout_rate=0.0, use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        self.scale_activation = scale_activation
        self.rho_head = nn.Linear(n_hidden, n_output)
        self.theta_head = nn.Linear(n_hidden, n_output) if predict_dispersion else None
        self.zi_head = nn.Linear(n_hidden, n_output) if zero_inflation else None

    def forward(
        self, z: torch.Tensor, cats: Sequence[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> ExpressionParams:
        """Decode ``z`` with covariates into :class:`ExpressionParams`."""
        h = self.trunk(z, cats, cont)
        logits = self.rho_head(h)
        if self.scale_activation == "softmax":
            rho = torch.softmax(logits, -1)
        else:
            rho = F.softplus(logits)
        return ExpressionParams(
            rho=rho,
            theta_logits=None if self.theta_head is None else self.theta_head(h),
            zi_logits=None if self.zi_head is None else self.zi_head(h),
        )


class LinearExpressionDecoder(nn.Module):
    """LDVAE's decoder (Svensson et al. 2020): expression logits linear in z.

    ``rho = softmax(W z + covariate terms [+ b])``, optionally with batch norm on the linear
    output (as in the reference implementation), so that each column of ``W`` is an
    interpretable gene program.

    Parameters
    ----------
    n_input, n_output
        Latent dimension and number of features.
    n_cat_list, n_cont
        Covariates entering the linear map.
    use_batch_norm
        Batch-normalise the linear output (affine, as in scvi-tools' LDVAE).
    bias
        Add a per-gene bias.
    predict_dispersion, zero_inflation
        Linear heads for per-cell dispersion and zero-inflation logits.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        use_batch_norm: bool = False,
        bias: bool = False,
        predict_dispersion: bool = False,
        zero_inflation: bool = False,
    ):
        super().__init__()

        def linear_map() -> FCLayers:
            return FCLayers(
                n_input, n_output, n_cat_list, n_cont, n_layers=1, dropout_rate=0.0,
                use_batch_norm=use_batch_norm, use_activation=False, bias=bias,
            )

        self.factor_regressor = linear_map()
        self.theta_head = linear_map() if predict_dispersion else None
        self.zi_head = linear_map() if zero_inflation else None

    def forward(
        self, z: torch.Tensor, cats: Sequence[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> ExpressionParams:
        """Decode ``z`` with covariates into :class:`ExpressionParams`."""
        return ExpressionParams(
            rho=torch.softmax(self.factor_regressor(z, cats, cont), -1),
            theta_logits=None if self.theta_head is None else self.theta_head(z, cats, cont),
            zi_logits=None if self.zi_head is None else self.zi_head(z, cats, cont),
        )

    def loadings(self) -> torch.Tensor:
        """Genes × latent loadings ``W``, scaled by the batch norm's ``gamma / sigma``."""
        layer = self.factor_regressor.layers[0]
        weight = layer["linear"].linear.weight.detach()
        for module in layer["post"]:
            if isinstance(module, nn.BatchNorm1d):
                scale = module.weight.detach() / torch.sqrt(module.running_var + module.eps)
                weight = weight * scale.unsqueeze(-1)
        return weight
