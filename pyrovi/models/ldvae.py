"""LDVAE: scVI with a linear decoder and interpretable loadings (Svensson et al. 2020)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
from torch import nn

from pyrovi.data import AnnDataRegistry
from pyrovi.io.model_classes import register_model_class
from pyrovi.models import outputs, scvi_family
from pyrovi.models.base import BaseModel
from pyrovi.nn import LinearExpressionDecoder
from pyrovi.posterior.loadings import varimax


@register_model_class
class LDVAE(BaseModel):
    """Linearly decoded VAE: the scVI model/guide with ``rho = softmax(W z + ...)``.

    The encoder is scVI's (the same :class:`~pyrovi.nn.AmortizedEncoder`); only the decoder
    is linear, so each latent dimension is a gene program with loadings
    :meth:`get_loadings`. Likelihood, dispersion and library options are scVI's.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`LDVAE.setup_anndata`.
    n_hidden, n_latent, n_layers, dropout_rate
        Encoder sizes and latent dimension (``n_layers`` applies to the encoder).
    dispersion, gene_likelihood, latent_distribution, use_observed_lib_size, prior, prior_kwargs
        As for :class:`~pyrovi.SCVI` (default likelihood ``"nb"``, as in scvi-tools).
    use_batch_norm
        Batch-normalise the linear decoder's output (the reference implementation does).
    bias
        Per-gene bias in the linear decoder.

    Examples
    --------
    >>> pyrovi.LDVAE.setup_anndata(adata)  # doctest: +SKIP
    >>> model = pyrovi.LDVAE(adata, n_latent=10).train(max_epochs=100)  # doctest: +SKIP
    >>> model.get_loadings().sort_values("Z_0").head()  # doctest: +SKIP
    """

    def __init__(
        self,
        adata,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str | Callable = "nb",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = True,
        use_batch_norm: bool = True,
        bias: bool = False,
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
            use_batch_norm=use_batch_norm,
            bias=bias,
            prior=prior,
            prior_kwargs=prior_kwargs,
        )

    #: Key stem of the stored posterior in minified data: ``obsm["ldvae_latent_qzm"]``...
    _minified_stem = "ldvae"

    # scVI's setup, reference mapping and outputs, as functions shared with SCVI.
    setup_anndata = classmethod(scvi_family.setup_anndata)
    load_query_data = classmethod(scvi_family.load_query_data)
    prepare_query_anndata = classmethod(scvi_family.prepare_query_anndata)
    get_normalized_expression = scvi_family.get_normalized_expression
    get_likelihood_parameters = scvi_family.get_likelihood_parameters
    _generative_inputs = scvi_family.generative_inputs
    _normalized_expression_sampler = scvi_family.rho_sampler

    def _build_module(self, adata, registry: AnnDataRegistry, use_batch_norm=True, bias=False,
                      **params):
        likelihood = params["gene_likelihood"]
        decoder = LinearExpressionDecoder(
            params["n_latent"],
            registry.n_vars,
            n_cat_list=[registry.n_batch, *registry.n_cats_per_covariate],
            n_cont=registry.n_continuous_covariates,
            use_batch_norm=use_batch_norm,
            bias=bias,
            predict_dispersion=params["dispersion"] == "gene-cell",
            zero_inflation=likelihood == "zinb" or callable(likelihood),
        )
        return scvi_family.build_scvi_module(
            adata, registry, decoder=decoder, use_batch_norm="encoder", **params
        )

    def get_loadings(self, rotation: str | None = None) -> pd.DataFrame:
        """Gene loadings of each latent dimension.

        Parameters
        ----------
        rotation
            ``None`` (the decoder's own axes, as scvi-tools) or ``"varimax"``. The prior and
            the likelihood are unchanged by a rotation of the latent space, so the axes of
            the raw loadings are arbitrary; varimax turns them into one gene program per
            factor where the data have distinct programs.

        Returns
        -------
        pandas.DataFrame
            Genes × latent (``Z_0 .. Z_{k-1}``), the linear decoder's weights scaled by its
            batch norm (``gamma / sigma``) when batch norm is used, as in scvi-tools. With a
            rotation, the orthogonal matrix ``R`` is in ``.attrs["rotation"]``: the matching
            latent coordinates are ``model.get_latent_representation() @ R``.

        Examples
        --------
        >>> programs = model.get_loadings(rotation="varimax")  # doctest: +SKIP
        >>> programs["Z_0"].abs().sort_values().tail(10)  # doctest: +SKIP
        """
        if rotation not in (None, "varimax"):
            raise ValueError(f"rotation must be None or 'varimax', got {rotation!r}.")
        outputs.check_weights(self.module)
        weights = self.module.decoder.loadings().cpu().numpy()
        matrix = None
        if rotation == "varimax":
            weights, matrix = varimax(weights)
        columns = [f"Z_{i}" for i in range(weights.shape[1])]
        loadings = pd.DataFrame(weights, index=self.var_names, columns=columns)
        if matrix is not None:
            loadings.attrs["rotation"] = matrix
        return loadings
