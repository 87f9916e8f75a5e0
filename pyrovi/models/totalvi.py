"""TotalVI: user API around :class:`~pyrovi.modules.TOTALVIModule`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pyro.distributions as dist
import scipy.sparse as sp
import torch

from pyrovi.data import (
    AnnDataRegistry,
    CellTensors,
    ProteinField,
    protein_matrix,
    setup_anndata,
    standard_fields,
)
from pyrovi.data.multimodal import (
    MUDATA_PROTEIN_KEY,
    flatten_mudata,
    is_mudata,
    resolve_modalities,
    setup_obs_keys,
)
from pyrovi.data.registry import REGISTRY_UNS_KEY, category_codes, counts_matrix, get_registry
from pyrovi.infer.defaults import CONVERGING_TOTALVI, SCVI_TOOLS_TOTALVI
from pyrovi.io.model_classes import register_model_class
from pyrovi.models import outputs, scvi_family
from pyrovi.models.base import BaseModel
from pyrovi.modules import TOTALVIModule, protein_background

logger = logging.getLogger(__name__)


@register_model_class
class TOTALVI(BaseModel):
    """total Variational Inference (Gayoso et al. 2021): joint model of RNA and proteins.

    A shared latent space from the amortized encoder over log1p RNA ⊕ log1p protein; RNA as
    in scVI; protein counts from a negative-binomial mixture of a background (mean β) and a
    foreground (mean β·α) component. Proteins that are all zero within a batch are treated as
    not measured there: masked out of the likelihood and imputed by the outputs.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`, or MuData registered with
        :meth:`setup_mudata`.
    n_latent, n_hidden, n_layers_encoder, n_layers_decoder, dropout_rate_encoder
        Network sizes (defaults 20, 256, 2, 1, 0.2 as scvi-tools).
    gene_dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    protein_dispersion
        ``"protein"``, ``"protein-batch"`` or ``"protein-label"``.
    gene_likelihood
        ``"nb"``, ``"zinb"`` or a callable ``(mu, theta, zi_logits) -> Distribution`` for
        the RNA, as for :class:`~pyrovi.SCVI`.
    latent_distribution
        ``"normal"`` or ``"ln"``.
    empirical_protein_background_prior
        Initialise the prior of each protein's background per batch from a two-component
        mixture fit of its log counts (default), or from a standard normal (``False``).
        scvi-tools turns it on only above 10 proteins because its estimate pools proteins
        within each cell; ours is per protein across cells, so it is reliable with any
        number of proteins, and without it the mixture can settle with the background
        absorbing the positive population (foreground AUROC 0.14-0.63 instead of 0.65-1.0
        for the hardest protein of 8 in simulations).
    override_missing_proteins
        Treat proteins that are all zero within a batch as measured (no masking).
    use_observed_lib_size, encode_covariates, use_batch_norm, use_layer_norm, prior, prior_kwargs
        As for :class:`~pyrovi.SCVI` (covariates are encoded by default, as in scvi-tools).
    network_layout, dropout_rate_decoder, background_activation
        ``"scvi-tools"``: scvi-tools' TotalVI networks and computations, whose weights map one
        to one, with its decoder dropout (default 0.2) and background scale activation
        (default ``"softplus"``); see :class:`~pyrovi.modules.TOTALVIModule`.

    Examples
    --------
    >>> pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
    ...                              batch_key="batch")  # doctest: +SKIP
    >>> model = pyrovi.TOTALVI(adata).train(max_epochs=200)  # doctest: +SKIP
    >>> rna, protein = model.get_normalized_expression()  # doctest: +SKIP
    >>> foreground = model.get_protein_foreground_probability()  # doctest: +SKIP
    """

    _fixed_defaults = SCVI_TOOLS_TOTALVI
    _converging_defaults = CONVERGING_TOTALVI

    # Reference mapping and the RNA likelihood parameters, as functions shared with SCVI.
    load_query_data = classmethod(scvi_family.load_query_data)
    prepare_query_anndata = classmethod(scvi_family.prepare_query_anndata)
    get_likelihood_parameters = scvi_family.get_likelihood_parameters

    def __init__(
        self,
        adata,
        n_latent: int = 20,
        gene_dispersion: str = "gene",
        protein_dispersion: str = "protein",
        gene_likelihood: str | Callable = "nb",
        latent_distribution: str = "normal",
        empirical_protein_background_prior: bool = True,
        override_missing_proteins: bool = False,
        n_hidden: int = 256,
        n_layers_encoder: int = 2,
        n_layers_decoder: int = 1,
        dropout_rate_encoder: float = 0.2,
        use_observed_lib_size: bool = True,
        encode_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        prior="normal",
        prior_kwargs: dict | None = None,
        network_layout: str = "pyrovi",
        dropout_rate_decoder: float | None = None,
        background_activation: str | None = None,
    ):
        self.mdata = adata if is_mudata(adata) else None
        adata = self.as_anndata(adata)
        super().__init__(
            adata,
            n_latent=n_latent,
            gene_dispersion=gene_dispersion,
            protein_dispersion=protein_dispersion,
            gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            empirical_protein_background_prior=empirical_protein_background_prior,
            override_missing_proteins=override_missing_proteins,
            n_hidden=n_hidden,
            n_layers_encoder=n_layers_encoder,
            n_layers_decoder=n_layers_decoder,
            dropout_rate_encoder=dropout_rate_encoder,
            use_observed_lib_size=use_observed_lib_size,
            encode_covariates=encode_covariates,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            prior=prior,
            prior_kwargs=prior_kwargs,
            network_layout=network_layout,
            dropout_rate_decoder=dropout_rate_decoder,
            background_activation=background_activation,
        )

    # -- data -----------------------------------------------------------------------------

    @classmethod
    def setup_anndata(
        cls,
        adata,
        protein_expression_obsm_key: str,
        protein_names_uns_key: str | None = None,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        allow_non_integer: bool = False,
        drop_empty_cells: bool = False,
    ) -> None:
        """Register RNA and protein counts of ``adata`` (scvi-tools' arguments).

        Both matrices are validated first (raw, finite, non-negative integer counts, the
        protein matrix aligned with the cells); on error nothing in ``adata`` changes.
        Proteins that are all zero within a batch are reported and treated as not measured
        in that batch.

        Parameters
        ----------
        adata
            AnnData with RNA counts in ``X`` (or ``layers[layer]``).
        protein_expression_obsm_key
            ``obsm`` key of the protein counts: a DataFrame (names from its columns) or an
            array (names from ``uns[protein_names_uns_key]``).
        protein_names_uns_key
            ``uns`` key of the protein names for an array.
        layer, batch_key, labels_key, size_factor_key
            As for :meth:`pyrovi.SCVI.setup_anndata`.
        categorical_covariate_keys, continuous_covariate_keys, allow_non_integer, drop_empty_cells
            As for :meth:`pyrovi.SCVI.setup_anndata`.
        """
        setup_anndata(
            adata,
            model_name=cls.__name__,
            fields=[*standard_fields(layer, batch_key, labels_key, size_factor_key,
                                     categorical_covariate_keys, continuous_covariate_keys),
                    ProteinField(protein_expression_obsm_key, protein_names_uns_key)],
            allow_non_integer=allow_non_integer,
            drop_empty_cells=drop_empty_cells,
        )

    @classmethod
    def setup_mudata(
        cls,
        mdata,
        rna_layer: str | None = None,
        protein_layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        modalities: dict[str, str] | None = None,
        allow_non_integer: bool = False,
        drop_empty_cells: bool = False,
    ) -> None:
        """Register a MuData with RNA and protein modalities (scvi-tools' arguments).

        Parameters
        ----------
        mdata
            MuData whose RNA and protein modalities have the same cells.
        rna_layer, protein_layer
            Layers with raw counts in the two modalities (``None``: ``X``).
        batch_key, labels_key, size_factor_key
            ``obs`` columns, read from the modality that ``modalities`` names for each.
        categorical_covariate_keys, continuous_covariate_keys
            ``obs`` columns, read from the modality that ``modalities`` names for each.
        modalities
            Modality of each argument, default ``{"rna_layer": "rna", "protein_layer":
            "protein", "batch_key": "rna", ...}`` (every obs key from ``"rna"``).
        allow_non_integer, drop_empty_cells
            As for :meth:`setup_anndata`.

        Examples
        --------
        >>> pyrovi.TOTALVI.setup_mudata(mdata, batch_key="batch",
        ...                             modalities={"batch_key": "rna"})  # doctest: +SKIP
        >>> model = pyrovi.TOTALVI(mdata)  # doctest: +SKIP
        """
        fields = resolve_modalities(modalities)
        flat = flatten_mudata(mdata, fields, rna_layer, protein_layer, setup_obs_keys(
            batch_key, labels_key, size_factor_key, categorical_covariate_keys,
            continuous_covariate_keys))
        cls.setup_anndata(
            flat, MUDATA_PROTEIN_KEY, batch_key=batch_key, labels_key=labels_key,
            size_factor_key=size_factor_key, categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
            allow_non_integer=allow_non_integer, drop_empty_cells=drop_empty_cells,
        )
        registry = get_registry(flat, cls.__name__)
        registry.mudata_modalities = {
            **fields, "rna_layer_name": rna_layer or "", "protein_layer_name": protein_layer or ""}
        mdata.uns[REGISTRY_UNS_KEY] = registry.to_dict()

    @classmethod
    def _flatten(cls, mdata):
        """The flat AnnData of a registered MuData, with the registry in its ``uns``."""
        registry = get_registry(mdata, cls.__name__)
        fields = registry.mudata_modalities
        if not fields:
            raise ValueError("This MuData was not set up with TOTALVI.setup_mudata.")
        flat = flatten_mudata(
            mdata, fields, fields["rna_layer_name"] or None, fields["protein_layer_name"] or None,
            setup_obs_keys(registry.batch_key, registry.labels_key, registry.size_factor_key,
                      registry.categorical_covariate_keys, registry.continuous_covariate_keys),
        )
        flat.uns[REGISTRY_UNS_KEY] = registry.to_dict()
        return flat

    @classmethod
    def as_anndata(cls, data):
        """``data``, or the flat AnnData of a MuData set up with :meth:`setup_mudata`."""
        return cls._flatten(data) if is_mudata(data) else data

    def is_own_data(self, data) -> bool:
        """Whether ``data`` is the model's AnnData or the MuData it was set up from."""
        return data is self.adata or (self.mdata is not None and data is self.mdata)

    def _build_module(self, adata, registry: AnnDataRegistry,
                      empirical_protein_background_prior=True, override_missing_proteins=False,
                      use_observed_lib_size=True, **params):
        # Validated at setup: read the matrix as it is.
        proteins = protein_matrix(adata, registry.protein_expression_obsm_key)
        mask = np.asarray(registry.protein_batch_mask, dtype=bool)
        if override_missing_proteins:
            mask = np.ones_like(mask)
        if empirical_protein_background_prior:
            batch = category_codes(adata, registry.batch_key, registry.batch_categories,
                                   "batch_key")
            prior_mean, prior_scale = protein_background.empirical_protein_background_prior(
                proteins, batch, registry.n_batch, protein_batch_mask=mask)
        else:
            prior_mean, prior_scale = protein_background.default_protein_background_prior(
                registry.n_proteins, registry.n_batch)
        means, variances = scvi_family.library_size_priors(adata, registry)
        return TOTALVIModule(
            n_input=registry.n_vars,
            n_proteins=registry.n_proteins,
            n_batch=registry.n_batch,
            n_labels=registry.n_labels,
            n_cats_per_cov=registry.n_cats_per_covariate,
            n_continuous_cov=registry.n_continuous_covariates,
            protein_background_prior_mean=torch.as_tensor(prior_mean),
            protein_background_prior_scale=torch.as_tensor(prior_scale),
            protein_batch_mask=torch.as_tensor(mask),
            use_observed_lib_size=use_observed_lib_size,
            library_log_means=torch.as_tensor(means),
            library_log_vars=torch.as_tensor(variances),
            use_size_factor=registry.size_factor_key is not None,
            **params,
        )

    @property
    def protein_names(self) -> pd.Index:
        """Protein names the model was built on."""
        return pd.Index(self.registry.protein_names)

    def observed_features(self) -> dict[str, pd.Index]:
        """``{"x": genes, "y": proteins}``, the columns of :meth:`posterior_predictive_sample`."""
        return {"x": self.var_names, "y": self.protein_names}

    def feature_positions(self, site: str, names: Sequence[str] | None = None) -> np.ndarray:
        """Positions of ``names`` (default all) among the genes (``site="x"``) or the
        proteins (``site="y"``); see :meth:`BaseModel.feature_positions`."""
        if site != "y":
            return super().feature_positions(site, names)
        if names is None:
            return np.arange(self.registry.n_proteins)
        positions = self.protein_names.get_indexer(list(names))
        if (positions < 0).any():
            missing = [p for p, i in zip(names, positions, strict=True) if i < 0]
            raise KeyError(f"Proteins not in the model: {missing[:10]} "
                           f"(proteins: {list(self.protein_names)}).")
        return positions

    # -- training -------------------------------------------------------------------------

    def train(self, max_epochs: int | None = None, **kwargs) -> TOTALVI:
        """Fit by SVI; the options are :meth:`pyrovi.SCVI.train`'s.

        A run of given length uses scvi-tools' TOTALVI defaults for the options left
        unset: learning rate 4e-3, minibatches of 256 cells, the rate lowered by 0.6 after
        30 epochs without improvement of the validation ELBO, early stopping after 45
        (when there are validation cells; without them, e.g. ``train_size=1.0``, training
        runs without either and says so in the log, while an explicit
        ``early_stopping=True`` is an error), and a KL warm-up over ``0.75 · n_cells``
        steps. Without ``max_epochs`` it trains until converged, as SCVI does, at
        TotalVI's learning rate (4e-3 at minibatches of 256, by the square root of the
        minibatch size otherwise).

        Returns
        -------
        The model itself, trained.
        """
        return super().train(max_epochs=max_epochs, **kwargs)

    # -- decoding -------------------------------------------------------------------------

    def _generative_inputs(self, posterior, batch: dict, batch_index, code) -> dict:
        inputs = scvi_family.generative_inputs(self, posterior, batch, batch_index, code)
        if code is None:
            log_background = posterior.nodes["protein_background"]["value"]
        else:
            # The background posterior depends on the batch: decode it in the new one.
            loc, scale = self.module.background_posterior(
                inputs["z"], batch_index, batch["cat_covs"], batch["cont_covs"])
            log_background = dist.Normal(loc, scale).sample()
        inputs["log_background"] = log_background
        return inputs

    def _protein_extractor(
        self,
        columns: np.ndarray,
        include_protein_background: bool = False,
        sample_protein_mixing: bool = False,
        scale_protein: bool = False,
    ):
        """Denoised protein expression from generative parameters (scvi-tools' definition).

        ``(1 − w)·β·α`` with ``w`` the background weight (a Bernoulli draw of it with
        ``sample_protein_mixing``), plus ``w·β`` with ``include_protein_background``; rows
        rescaled to sum to 1 with ``scale_protein``.
        """
        columns_t = torch.as_tensor(columns, device=self.device)

        def extract(params: dict) -> torch.Tensor:
            background_weight = torch.sigmoid(params["mixing_logits"])
            if sample_protein_mixing:
                background_weight = torch.bernoulli(background_weight)
            value = params["foreground"] * (1 - background_weight)
            if include_protein_background:
                value = value + params["background"] * background_weight
            if scale_protein:
                value = value / value.sum(-1, keepdim=True)
            return value.index_select(-1, columns_t)

        return extract

    # -- outputs --------------------------------------------------------------------------

    def get_normalized_expression(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        transform_batch=None,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        library_size: float | str = 1,
        n_samples: int = 1,
        sample_protein_mixing: bool = False,
        scale_protein: bool = False,
        include_protein_background: bool = False,
        return_mean: bool = True,
        return_numpy: bool = False,
        batch_size: int | None = None,
    ):
        """Denoised RNA (``library_size · rho``) and protein expression.

        Parameters
        ----------
        adata, indices, gene_list, library_size, n_samples, return_mean, return_numpy
            As for :meth:`pyrovi.SCVI.get_normalized_expression`.
        batch_size
            Cells per forward pass.
        transform_batch
            As for :meth:`pyrovi.SCVI.get_normalized_expression`; ``transform_batch`` also
            imputes proteins not measured in a cell's own batch from a batch that has them.
        protein_list
            Return only these proteins.
        sample_protein_mixing
            Draw the background/foreground assignment instead of weighting by its
            probability.
        scale_protein
            Rescale each cell's protein values to sum to 1.
        include_protein_background
            Add the background component (the expected count, not only the foreground).

        Returns
        -------
        rna, protein
            Cells × genes and cells × proteins DataFrames (arrays with ``return_numpy``;
            ``(n_samples, n_cells, n)`` arrays when ``return_mean=False``).
        """
        data, indices, adata_used = self.cell_data(adata, indices)
        genes = (np.arange(self.registry.n_vars) if gene_list is None
                 else outputs.gene_positions(self.var_names, gene_list))
        proteins = self.feature_positions("y", protein_list)
        key = "mu" if library_size == "latent" else "rho"
        scale = 1.0 if library_size == "latent" else float(library_size)
        rna, protein = scvi_family.decoded_draws(
            self, data, None, outputs.batch_codes(self.registry, transform_batch),
            [scvi_family.column_extractor(self, key, genes),
             self._protein_extractor(proteins, include_protein_background,
                                     sample_protein_mixing, scale_protein)],
            n_samples, batch_size or 1024,
        )
        return scvi_family.as_frames([rna * scale, protein], adata_used, indices,
                                     [self.var_names[genes], self.protein_names[proteins]],
                                     n_samples, return_mean, return_numpy)

    def get_protein_foreground_probability(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        transform_batch=None,
        protein_list: Sequence[str] | None = None,
        n_samples: int = 1,
        return_mean: bool = True,
        return_numpy: bool = False,
        batch_size: int | None = None,
    ):
        """Probability that a protein's counts come from the foreground: ``sigmoid(−π)``.

        Parameters
        ----------
        adata, indices, transform_batch, n_samples, return_mean, return_numpy, batch_size
            As for :meth:`get_normalized_expression`.
        protein_list
            Return only these proteins.

        Returns
        -------
        pandas.DataFrame or numpy.ndarray
            Cells × proteins.
        """
        data, indices, adata_used = self.cell_data(adata, indices)
        proteins = self.feature_positions("y", protein_list)
        columns = torch.as_tensor(proteins, device=self.device)
        [values] = scvi_family.decoded_draws(
            self, data, None, outputs.batch_codes(self.registry, transform_batch),
            [lambda p: torch.sigmoid(-p["mixing_logits"]).index_select(-1, columns)],
            n_samples, batch_size or 1024,
        )
        return scvi_family.as_frames([values], adata_used, indices,
                                     [self.protein_names[proteins]], n_samples, return_mean,
                                     return_numpy)

    def get_protein_background_mean(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Posterior mean background rate β of each cell's proteins.

        Returns
        -------
        numpy.ndarray
            Cells × proteins (averaged over ``n_samples`` posterior draws).
        """
        data, _, _ = self.cell_data(adata, indices)
        [values] = scvi_family.decoded_draws(
            self, data, None, [None], [lambda p: p["background"]], n_samples, batch_size or 1024)
        return values.mean(0).cpu().numpy()

    def get_latent_library_size(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """RNA library size per cell: observed, or the latent one's posterior (mean).

        Returns
        -------
        numpy.ndarray
            ``(n_cells, 1)``.
        """
        data, _, _ = self.cell_data(adata, indices)
        n_samples = 30 if give_mean and not self.module.use_observed_lib_size else 1
        [values] = scvi_family.decoded_draws(
            self, data, None, [None], [lambda p: p["mu"].sum(-1, keepdim=True) / p["rho"].sum(
                -1, keepdim=True)], n_samples, batch_size or 1024)
        return values.mean(0).cpu().numpy()

    def posterior_predictive_sample(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        protein_list: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """RNA and protein counts drawn from the posterior predictive, side by side.

        Proteins not measured in a cell's batch are drawn too (imputed).

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_genes + n_proteins)`` for one sample, else with a trailing
            ``n_samples`` axis (genes first, then proteins, as scvi-tools).
        """
        genes = (np.arange(self.registry.n_vars) if gene_list is None
                 else outputs.gene_positions(self.var_names, gene_list))
        columns = np.concatenate([genes, self.registry.n_vars
                                  + self.feature_positions("y", protein_list)])
        return outputs.predictive_counts(self, adata, indices, n_samples, columns, batch_size)

    # -- differential expression over genes and proteins ---------------------------------

    def _normalized_expression_sampler(
        self,
        data: CellTensors,
        batch_size: int,
        protein_prior_count: float = 0.1,
        scale_protein: bool = False,
        sample_protein_mixing: bool = False,
        include_protein_background: bool = False,
    ):
        """Draws of ``rho`` ⊕ (denoised protein + ``protein_prior_count``), as scvi-tools."""
        extractors = [
            scvi_family.column_extractor(self, "rho", np.arange(self.registry.n_vars)),
            self._protein_extractor(np.arange(self.registry.n_proteins),
                                    include_protein_background, sample_protein_mixing,
                                    scale_protein),
        ]

        def sample(positions: np.ndarray, code: int | None) -> np.ndarray:
            rna, protein = scvi_family.decoded_draws(self, data, positions, [code], extractors,
                                                     1, batch_size)
            return torch.cat([rna[0], protein[0] + protein_prior_count], -1).cpu().numpy()

        return sample

    def _de_features(self, adata, registry: AnnDataRegistry):
        counts = counts_matrix(adata, registry.layer)
        proteins = protein_matrix(adata, registry.protein_expression_obsm_key)
        counts = sp.hstack([sp.csr_matrix(counts), sp.csr_matrix(proteins)], format="csr")
        return counts, [*map(str, self.var_names), *self.registry.protein_names]
