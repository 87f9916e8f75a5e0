"""Amortized encoders: the networks behind every pyrovi guide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from pyrovi.nn.fc import FCLayers

LATENT_DISTRIBUTIONS = ("normal", "ln")


def latent_transform(distribution: str):
    """Map from the Gaussian latent sample to the decoder's input.

    ``"normal"`` is the identity; ``"ln"`` (logistic normal) applies a softmax over the
    latent dimensions, so the decoder sees a point on the simplex.
    """
    if distribution == "normal":
        return identity
    if distribution == "ln":
        return _softmax
    raise ValueError(
        f"latent_distribution must be one of {LATENT_DISTRIBUTIONS}, got {distribution!r}."
    )


def identity(z: torch.Tensor) -> torch.Tensor:
    """The identity latent transform (Gaussian latent space)."""
    return z


def _softmax(z: torch.Tensor) -> torch.Tensor:
    return torch.softmax(z, dim=-1)


class GaussianEncoder(nn.Module):
    """``x ↦ (loc, scale)`` of a diagonal Gaussian, through an :class:`FCLayers` trunk.

    The variance is ``exp(v) + var_eps`` as in scvi-tools, so scales never collapse to 0.

    Parameters
    ----------
    n_input, n_output
        Input width and latent dimension.
    n_cat_list, n_cont
        Covariates injected into the trunk.
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        Trunk options (see :class:`FCLayers`).
    var_eps
        Floor added to the variance.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        var_eps: float = 1e-4,
    ):
        super().__init__()
        self.trunk = FCLayers(
            n_input, n_hidden, n_cat_list, n_cont, n_layers=n_layers, n_hidden=n_hidden,
            dropout_rate=dropout_rate, use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm, inject_covariates=inject_covariates,
        )
        self.loc = nn.Linear(n_hidden, n_output)
        self.log_var = nn.Linear(n_hidden, n_output)
        self.var_eps = var_eps

    def forward(
        self, x: torch.Tensor, cats: Sequence[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loc, scale)``, each of shape ``(..., n_output)``."""
        h = self.trunk(x, cats, cont)
        scale = torch.sqrt(torch.exp(self.log_var(h)) + self.var_eps)
        return self.loc(h), scale


class AmortizedPosterior(NamedTuple):
    """Parameters of the amortized posterior for a minibatch of cells.

    ``z_loc``/``z_scale`` parameterize q(z | x); ``library_loc``/``library_scale``
    parameterize q(log library | x), and are ``None`` when the library size is observed.
    """

    z_loc: torch.Tensor
    z_scale: torch.Tensor
    library_loc: torch.Tensor | None = None
    library_scale: torch.Tensor | None = None


class AmortizedEncoder(nn.Module):
    """The shared amortized encoder: q(z | x) and, optionally, q(log library | x).

    Input is ``log1p`` of the counts (and, for multi-modal models, of the other modalities
    concatenated by the caller). Every pyrovi guide is built from this class.

    Parameters
    ----------
    n_input
        Input width (number of features).
    n_latent
        Dimension of z.
    n_cat_list, n_cont
        Covariates injected into both networks (empty when covariates are not encoded).
    latent_library
        Also encode a log-normal library size (scVI's ``use_observed_lib_size=False``).
    library_network
        Build the library network even when the library size is observed. scvi-tools'
        TotalVI encoder always has one, so its weights need a place; it is not evaluated
        unless ``latent_library``.
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        Options of the z network; the library network has one layer, as in scvi-tools.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal); the guide samples a Gaussian either way and
        ``transform`` maps samples to the decoder's input.

    Examples
    --------
    >>> enc = AmortizedEncoder(200, 10, latent_library=True)
    >>> q = enc(torch.rand(4, 200))
    >>> q.z_loc.shape, q.library_loc.shape
    (torch.Size([4, 10]), torch.Size([4, 1]))
    """

    def __init__(
        self,
        n_input: int,
        n_latent: int,
        n_cat_list: Sequence[int] = (),
        n_cont: int = 0,
        latent_library: bool = False,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        latent_distribution: str = "normal",
        library_network: bool = False,
    ):
        super().__init__()
        self.transform = latent_transform(latent_distribution)
        self.latent_library = latent_library
        self.latent_distribution = latent_distribution
        common = dict(
            n_cat_list=n_cat_list, n_cont=n_cont, n_hidden=n_hidden, dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        self.z_encoder = GaussianEncoder(n_input, n_latent, n_layers=n_layers, **common)
        self.library_encoder = (
            GaussianEncoder(n_input, 1, n_layers=1, **common)
            if latent_library or library_network else None
        )

    def forward(
        self, x: torch.Tensor, cats: Sequence[torch.Tensor] = (), cont: torch.Tensor | None = None
    ) -> AmortizedPosterior:
        """Encode already-transformed input ``x`` (e.g. ``log1p`` counts)."""
        z_loc, z_scale = self.z_encoder(x, cats, cont)
        if not self.latent_library:
            return AmortizedPosterior(z_loc, z_scale)
        library_loc, library_scale = self.library_encoder(x, cats, cont)
        return AmortizedPosterior(z_loc, z_scale, library_loc, library_scale)
