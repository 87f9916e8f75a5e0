"""The scVI model: user API around :class:`~pyrovi.modules.SCVIModule`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from pyrovi.data import AnnDataRegistry
from pyrovi.io.model_classes import register_model_class
from pyrovi.models import scvi_family
from pyrovi.models.base import BaseModel
from pyrovi.models.scvi_family import library_size_priors
from pyrovi.modules import SCVIModule

__all__ = ["SCVI", "library_size_priors"]


@register_model_class
class SCVI(BaseModel):
    """single-cell Variational Inference (Lopez et al. 2018) as a Pyro model/guide pair.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`SCVI.setup_anndata`.
    n_hidden, n_latent, n_layers, dropout_rate
        Network sizes.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    gene_likelihood
        ``"zinb"``, ``"nb"``, ``"poisson"`` or a callable ``(mu, theta, zi_logits) ->
        Distribution`` (a Pyro distribution per gene; the model then learns a dispersion
        and a zero-inflation head for it to use, see
        :func:`~pyrovi.modules.scvi.count_likelihood`). A callable is not saved by
        :meth:`save`: pass it again to :meth:`load`.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    use_observed_lib_size
        Use the observed library size (default) or a latent log-normal one.
    encode_covariates, deeply_inject_covariates, use_batch_norm, use_layer_norm
        Architecture options as in scvi-tools.
    prior
        Latent prior: ``"normal"`` (N(0, I)), ``"mog"`` (learned mixture of Gaussians),
        ``"vamp"`` (VampPrior: mixture of the encoder's posteriors at learned pseudo-inputs,
        initialised from random training cells) or a prior module (see
        :mod:`pyrovi.priors`; not saved by :meth:`save`, pass a new instance to
        :meth:`load`, which restores its parameters).
    prior_kwargs
        Options of a named prior, e.g. ``{"n_components": 5}``.

    Examples
    --------
    >>> import pyrovi
    >>> adata = pyrovi.datasets.pbmc68k_reduced()  # doctest: +SKIP
    >>> pyrovi.SCVI.setup_anndata(adata, batch_key="phase")  # doctest: +SKIP
    >>> model = pyrovi.SCVI(adata)  # doctest: +SKIP
    >>> model.train(max_epochs=50)  # doctest: +SKIP
    >>> adata.obsm["X_scVI"] = model.get_latent_representation()  # doctest: +SKIP
    """

    def __init__(
        self,
        adata,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str | Callable = "zinb",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = True,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        prior: str | nn.Module = "normal",
        prior_kwargs: dict | None = None,
    ):
        super().__init__(
            adata,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            use_observed_lib_size=use_observed_lib_size,
            encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            prior=prior,
            prior_kwargs=prior_kwargs,
        )

    #: Key stem of the stored posterior in minified data: ``obsm["scvi_latent_qzm"]``...
    _minified_stem = "scvi"

    # Setup, reference mapping and outputs, shared with LDVAE (and TotalVI) as functions.
    setup_anndata = classmethod(scvi_family.setup_anndata)
    load_query_data = classmethod(scvi_family.load_query_data)
    prepare_query_anndata = classmethod(scvi_family.prepare_query_anndata)
    get_normalized_expression = scvi_family.get_normalized_expression
    get_likelihood_parameters = scvi_family.get_likelihood_parameters
    _generative_inputs = scvi_family.generative_inputs
    _normalized_expression_sampler = scvi_family.rho_sampler

    def _build_module(self, adata, registry: AnnDataRegistry, **params) -> SCVIModule:
        return scvi_family.build_scvi_module(adata, registry, **params)
