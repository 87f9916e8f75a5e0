"""The scVI model: user API around :class:`~pyrovi.modules.SCVIModule`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from pyrovi.data import AnnDataRegistry, CellTensors, setup_anndata, standard_fields
from pyrovi.io.model_classes import register_model_class
from pyrovi.models import outputs, transfer
from pyrovi.models.base import BaseModel
from pyrovi.modules import SCVIModule
from pyrovi.posterior.core import PosteriorDraw, iterate_posterior


def library_size_priors(adata, registry: AnnDataRegistry) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and variance of log library size (cells with counts only).

    Used as the prior of the latent library size, as in scvi-tools; see
    :meth:`~pyrovi.data.AnnDataRegistry.library_size_priors`, which reuses the per-cell
    totals registration computed.
    """
    return registry.library_size_priors(adata)


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

    @classmethod
    def setup_anndata(
        cls,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        allow_non_integer: bool = False,
        drop_empty_cells: bool = False,
    ) -> None:
        """Register the fields of ``adata`` this model reads (same arguments as scvi-tools).

        The data are validated first (raw, finite, non-negative integer counts; every key
        present); on error nothing in ``adata`` changes. The registry is stored in
        ``adata.uns["_pyrovi"]``.

        Parameters
        ----------
        adata
            AnnData with raw counts.
        layer
            Layer with raw counts (default ``adata.X``).
        batch_key, labels_key
            ``obs`` columns with batch and label categories.
        size_factor_key
            ``obs`` column with size factors (used as the observed library size).
        categorical_covariate_keys, continuous_covariate_keys
            Extra covariates in ``obs``.
        allow_non_integer
            Accept non-integer values (opt-out for counts on another scale).
        drop_empty_cells
            Leave cells without counts out of training instead of raising.
        """
        setup_anndata(
            adata,
            model_name=cls.__name__,
            fields=standard_fields(layer, batch_key, labels_key, size_factor_key,
                                   categorical_covariate_keys, continuous_covariate_keys),
            allow_non_integer=allow_non_integer,
            drop_empty_cells=drop_empty_cells,
        )

    # -- reference mapping (scArches) ----------------------------------------------------

    @classmethod
    def load_query_data(
        cls,
        query_adata,
        reference_model,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = False,
        unfrozen: bool = False,
        device: str | torch.device = "auto",
    ):
        """Extend a trained reference model to a query's new batches (scArches).

        The query is registered with the reference's setup; its batches (and categories of
        extra covariates and labels) that the reference lacks are appended, and the model is
        rebuilt with the extended tables and the reference's weights. Only the new batches'
        entries train (covariate-embedding rows, gene-batch dispersion, and for TotalVI the
        protein background prior), plus what the options below release; every other weight
        stays exactly the reference's, so reference cells keep their latent representation.
        New rows start at the mean of the reference's; the new batches' library-size prior
        (and TotalVI's protein background prior and measured proteins) come from the
        query's counts. Fine-tune with :meth:`train`. Works for :class:`~pyrovi.SCVI`,
        :class:`~pyrovi.LDVAE` and :class:`~pyrovi.TOTALVI` (call it on the reference's
        class); see :mod:`pyrovi.models.transfer` for the freezing rule and why.

        Parameters
        ----------
        query_adata
            Raw counts with the reference's genes in its order (see
            :meth:`prepare_query_anndata`) and its ``obs`` columns (batch, covariates);
            need not be set up. TotalVI: the reference's proteins (AnnData or MuData).
        reference_model
            A trained model of this class, or the directory it was saved to.
        freeze_dropout
            Set every dropout probability to 0.
        freeze_expression
            Freeze the encoder and decoder except the new categories' weights; ``False``
            trains the whole encoder. (With ``encode_covariates=False`` the encoder does not
            see the batch, so with this on, fine-tuning does not move the query's latent
            representation: train the reference with ``encode_covariates=True``.)
        freeze_decoder_first_layer
            ``False`` trains the first layer of every decoder network in full.
        freeze_batchnorm_encoder, freeze_batchnorm_decoder
            Keep the running statistics of batch norm (momentum 0) and, unless its network
            trains in full, its affine parameters.
        unfrozen
            Train every weight (the options above are then ignored).
        device
            Where to put the query model.

        Returns
        -------
        A model of this class on ``query_adata``, not yet trained on it (``is_trained``
        False). It saves and loads as an ordinary model with the extended batches; the
        freezing is for the fine-tuning of the returned object only.

        Raises
        ------
        SetupError
            Missing genes (named; see :meth:`prepare_query_anndata`), obs columns or
            proteins; ``query_adata`` is left unchanged.
        TypeError
            A reference of another model class.
        ValueError
            Nothing would train (no new category and everything else frozen).

        Examples
        --------
        >>> pyrovi.SCVI.prepare_query_anndata(query, reference)  # doctest: +SKIP
        >>> mapped = pyrovi.SCVI.load_query_data(query, reference)  # doctest: +SKIP
        >>> mapped.train(max_epochs=100)  # doctest: +SKIP
        >>> query.obsm["X_scVI"] = mapped.get_latent_representation()  # doctest: +SKIP
        """
        return transfer.load_query_data(
            cls, query_adata, reference_model, freeze_dropout=freeze_dropout,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder, unfrozen=unfrozen, device=device,
        )

    @classmethod
    def prepare_query_anndata(
        cls,
        query_adata,
        reference_model,
        return_reference_var_names: bool = False,
        inplace: bool = True,
        min_gene_fraction: float = 0.5,
    ):
        """Give a query the reference's genes in the reference's order.

        Genes the reference does not have are dropped; reference genes missing from the
        query are added as all-zero columns (with a warning giving their number) in ``X``
        and every layer. Padded genes read as "not expressed", so keep them few.

        Parameters
        ----------
        query_adata
            AnnData with raw counts.
        reference_model
            A model of this class, or the directory it was saved to.
        return_reference_var_names
            Only return the reference's genes; ``query_adata`` is not touched.
        inplace
            Change ``query_adata`` in place (``varm``/``varp`` are dropped); otherwise
            return a new AnnData.
        min_gene_fraction
            Raise when fewer than this fraction of the reference's genes are in the query
            (0 to pad whatever the overlap; no overlap at all always raises).

        Returns
        -------
        None, or the new AnnData (``inplace=False``), or a ``pandas.Index`` of the
        reference's genes (``return_reference_var_names=True``).

        Raises
        ------
        ValueError
            No or too little gene overlap, duplicated gene names, or a view with
            ``inplace=True``; ``query_adata`` is left unchanged.
        """
        return transfer.prepare_query_anndata(cls, query_adata, reference_model,
                                              return_reference_var_names, inplace,
                                              min_gene_fraction)

    def _build_module(self, adata, registry: AnnDataRegistry, **params) -> SCVIModule:
        means, variances = library_size_priors(adata, registry)
        return SCVIModule(
            n_input=registry.n_vars,
            n_batch=registry.n_batch,
            n_labels=registry.n_labels,
            n_cats_per_cov=registry.n_cats_per_covariate,
            n_continuous_cov=registry.n_continuous_covariates,
            library_log_means=torch.as_tensor(means),
            library_log_vars=torch.as_tensor(variances),
            use_size_factor=registry.size_factor_key is not None,
            **params,
        )

    # -- scVI-specific outputs ------------------------------------------------------------

    def _posterior_generative(self, draw: PosteriorDraw, batch_codes=(None,)) -> list[dict]:
        """Likelihood parameters of a posterior draw, decoded in each of ``batch_codes``.

        ``None`` keeps each cell's own batch; the draw is shared by all codes.
        """
        batch = draw.batch
        decoded = []
        for code in batch_codes:
            batch_index = batch["batch_index"]
            if code is not None:
                batch_index = torch.full_like(batch_index, code)
            decoded.append(self.module.generative(
                **self._generative_inputs(draw.guide, batch, batch_index, code)))
        return decoded

    def _generative_inputs(self, posterior, batch: dict, batch_index, code) -> dict:
        """Arguments of ``module.generative`` for a posterior draw decoded in ``batch_index``."""
        if "library" in posterior.nodes:
            log_library = posterior.nodes["library"]["value"]
        else:
            log_library = self.module.observed_log_library(batch["x"], batch["size_factor"])
        return {
            "z": posterior.nodes["z"]["value"],
            "log_library": log_library,
            "batch_index": batch_index,
            "labels": batch["labels"],
            "cat_covs": batch["cat_covs"],
            "cont_covs": batch["cont_covs"],
        }

    def _decoded_draws(
        self,
        data: CellTensors,
        positions: np.ndarray | None,
        codes: Sequence[int | None],
        extractors: Sequence[Callable[[dict], torch.Tensor]],
        n_samples: int,
        batch_size: int,
    ) -> list[torch.Tensor]:
        """Draws of decoded quantities, one ``(n_samples, n_cells, ...)`` tensor per extractor.

        Each extractor maps the generative parameters of a minibatch to a cells × columns
        tensor. Every draw of the latents is decoded in each batch of ``codes``, and the
        extracted values are averaged over the codes; all extractors see the same draws.
        """
        def decode(draw: PosteriorDraw) -> dict[int, torch.Tensor]:
            decoded = self._posterior_generative(draw, codes)
            return {i: torch.stack([extract(out) for out in decoded]).mean(0)
                    for i, extract in enumerate(extractors)}

        values = iterate_posterior(self.module, data, decode, n_samples, positions, batch_size)
        return [values[i] for i in range(len(extractors))]

    def _column_extractor(self, key: str, columns: np.ndarray):
        columns_t = torch.as_tensor(columns, device=self.device)
        return lambda params: params[key].index_select(-1, columns_t)

    def _normalized_expression_sampler(self, data: CellTensors, batch_size: int):
        """Draws of ``rho`` for differential expression (see ``BaseModel``)."""
        columns = np.arange(self.registry.n_vars)

        extract_rho = self._column_extractor("rho", columns)

        def sample(positions: np.ndarray, code: int | None) -> np.ndarray:
            [draws] = self._decoded_draws(data, positions, [code], [extract_rho], 1, batch_size)
            return draws[0].cpu().numpy()

        return sample

    def _as_frames(self, values: list[torch.Tensor], adata_used, indices, column_names,
                   n_samples: int, return_mean: bool, return_numpy: bool):
        """Average draws and label them (cells × columns frames), as the outputs return."""
        arrays = [v.cpu().numpy() for v in values]
        if not (return_mean or n_samples == 1):
            return tuple(arrays) if len(arrays) > 1 else arrays[0]
        arrays = [a.mean(0) for a in arrays]
        if not return_numpy:
            arrays = [pd.DataFrame(a, index=adata_used.obs_names[indices], columns=names)
                      for a, names in zip(arrays, column_names, strict=True)]
        return tuple(arrays) if len(arrays) > 1 else arrays[0]

    def get_normalized_expression(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        transform_batch=None,
        gene_list: Sequence[str] | None = None,
        library_size: float | str = 1,
        n_samples: int = 1,
        return_mean: bool = True,
        return_numpy: bool = False,
        batch_size: int | None = None,
    ) -> pd.DataFrame | np.ndarray:
        """Denoised, library-size-normalized expression ``library_size · rho``.

        Parameters
        ----------
        adata, indices
            Cells to use (default: all cells of the training data).
        transform_batch
            Decode every cell as if it came from this batch (or average over a list of
            batches) — batch-corrected expression.
        gene_list
            Return only these genes.
        library_size
            Scale of the output (``1`` gives proportions; ``1e4`` counts per 10k), or
            ``"latent"`` for the expected counts at each cell's own library size.
        n_samples
            Posterior draws of z per cell.
        return_mean
            Average over the draws; otherwise return ``(n_samples, n_cells, n_genes)``.
        return_numpy
            Return an array instead of a DataFrame (cells × genes, with names).
        batch_size
            Cells per forward pass.

        Returns
        -------
        pandas.DataFrame or numpy.ndarray
        """
        data, indices, adata_used = self.cell_data(adata, indices)
        columns = np.arange(self.registry.n_vars)
        if gene_list is not None:
            columns = outputs.gene_positions(self.var_names, gene_list)
        key = "mu" if library_size == "latent" else "rho"
        scale = 1.0 if library_size == "latent" else float(library_size)
        [values] = self._decoded_draws(
            data, None, outputs.batch_codes(self.registry, transform_batch),
            [self._column_extractor(key, columns)], n_samples, batch_size or 1024,
        )
        return self._as_frames([values * scale], adata_used, indices, [self.var_names[columns]],
                               n_samples, return_mean, return_numpy)

    def get_likelihood_parameters(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of the count likelihood for each cell and gene.

        Returns
        -------
        dict
            ``"mean"`` (expected counts), ``"dispersions"`` (theta, absent for Poisson) and
            ``"dropout"`` (zero-inflation logits, ZINB only), each ``(n_cells, n_genes)``
            (``(n_samples, n_cells, n_genes)`` for several draws unless ``give_mean``).
        """
        data, _, _ = self.cell_data(adata, indices)
        names = {"mean": "mu", "dispersions": "theta", "dropout": "zi_logits"}

        def parameters(draw: PosteriorDraw) -> dict[str, torch.Tensor]:
            [params] = self._posterior_generative(draw)
            return {out: params[key].expand_as(params["mu"]) for out, key in names.items()
                    if params[key] is not None}

        values = iterate_posterior(self.module, data, parameters, n_samples, None,
                                   batch_size or 1024)
        result = {}
        for name, draws in values.items():
            draws = draws.cpu().numpy()
            result[name] = draws.mean(0) if give_mean or n_samples == 1 else draws
        return result
