"""What scVI, LDVAE and TotalVI share: setup, reference mapping, decoding posterior draws.

The three model classes are built from these plain functions rather than from one another:
each class body names the ones it uses (``get_likelihood_parameters =
scvi_family.get_likelihood_parameters``, ``load_query_data =
classmethod(scvi_family.load_query_data)``), so that every class's ``__init__`` is its
own and calls :class:`~pyrovi.models.BaseModel`'s. The functions taking ``self`` are
methods of those classes and are documented as such; the others decode posterior draws of
a model whose module has scVI's ``generative`` (``rho``, ``mu``, ``theta``, ``zi_logits``,
and the parameters of a multi-modal module's other modalities).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from pyrovi.data import AnnDataRegistry, CellTensors, StoredPosteriorField, standard_fields
from pyrovi.data import setup_anndata as register_anndata
from pyrovi.data.tensors import LIBRARY_SIZE_FIELD
from pyrovi.models import outputs, transfer
from pyrovi.modules import SCVIModule
from pyrovi.posterior.core import PosteriorDraw, iterate_posterior


def library_size_priors(adata, registry: AnnDataRegistry) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and variance of log library size (cells with counts only).

    Used as the prior of the latent library size, as in scvi-tools; see
    :meth:`~pyrovi.data.AnnDataRegistry.library_size_priors`, which reuses the per-cell
    totals registration computed.
    """
    return registry.library_size_priors(adata)


def build_scvi_module(adata, registry: AnnDataRegistry, module_class: type = SCVIModule,
                      **params) -> SCVIModule:
    """The module of ``registry``'s data: an :class:`~pyrovi.modules.SCVIModule` (SCVI's and
    LDVAE's) or a subclass (SCANVI's), with the sizes and library-size prior of the data;
    ``params`` add to them or override them."""
    means, variances = library_size_priors(adata, registry)
    sizes = {
        "n_input": registry.n_vars,
        "n_batch": registry.n_batch,
        "n_labels": registry.n_labels,
        "n_cats_per_cov": registry.n_cats_per_covariate,
        "n_continuous_cov": registry.n_continuous_covariates,
        "library_log_means": torch.as_tensor(means),
        "library_log_vars": torch.as_tensor(variances),
        "use_size_factor": registry.size_factor_key is not None,
    }
    return module_class(**{**sizes, **params})


# -- public methods of the model classes ------------------------------------------------


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

    Minified data (``adata.uns["_scvi_adata_minify_type"]``, written by ``minify_adata``
    of pyrovi or scvi-tools) are read as well: their counts must be all zero and the
    stored posterior complete and consistent (``obsm["<stem>_latent_qzm"]``,
    ``obsm["<stem>_latent_qzv"]``, ``obs["observed_lib_size"]``, or scvi-tools' older
    ``_<stem>_...`` keys; ``<stem>`` is ``scvi`` for SCVI, ``ldvae`` for LDVAE), else a
    :class:`~pyrovi.data.SetupError` says what is missing.

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
    register_anndata(
        adata,
        model_name=cls.__name__,
        fields=[*standard_fields(layer, batch_key, labels_key, size_factor_key,
                                 categorical_covariate_keys, continuous_covariate_keys),
                StoredPosteriorField(cls._minified_stem)],
        allow_non_integer=allow_non_integer,
        drop_empty_cells=drop_empty_cells,
    )


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
    entries train (covariate-embedding rows, gene-batch dispersion, and the per-batch priors
    of other modalities, such as TotalVI's background prior), plus what the options below
    release; every other weight stays exactly the reference's, so reference cells keep
    their latent representation.
    New rows start at the mean of the reference's; the new batches' library-size prior
    (and every other data-driven tensor the module declares, TotalVI's among them) come
    from the query's counts. Fine-tune with :meth:`train`. Works for :class:`~pyrovi.SCVI`,
    :class:`~pyrovi.LDVAE`, :class:`~pyrovi.SCANVI` and :class:`~pyrovi.TOTALVI` (call it
    on the reference's class); see :mod:`pyrovi.models.transfer` for the freezing rule and
    why. A scANVI query's cells are unlabelled unless its labels column (optional) says
    otherwise with the reference's labels; a label the reference was not trained on is
    refused, and the classifier stays the reference's.

    Parameters
    ----------
    query_adata
        Raw counts with the reference's genes in its order (see
        :meth:`prepare_query_anndata`) and its ``obs`` columns (batch, covariates);
        need not be set up. A multi-modal model's other modalities too (AnnData or MuData).
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
        features of another modality; ``query_adata`` is left unchanged.
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
    [values] = decoded_draws(
        self, data, None, outputs.batch_codes(self.registry, transform_batch),
        [column_extractor(self, key, columns)], n_samples, batch_size or 1024,
    )
    return as_frames([values * scale], adata_used, indices, [self.var_names[columns]],
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
        [params] = posterior_generative(self, draw)
        return {out: params[key].expand_as(params["mu"]) for out, key in names.items()
                if params[key] is not None}

    values = iterate_posterior(self.module, data, parameters, n_samples, None,
                               batch_size or 1024)
    result = {}
    for name, draws in values.items():
        draws = draws.cpu().numpy()
        result[name] = draws.mean(0) if give_mean or n_samples == 1 else draws
    return result


# -- decoding posterior draws -----------------------------------------------------------


def generative_inputs(model, posterior, batch: dict, batch_index, code) -> dict:
    """Arguments of ``module.generative`` for a posterior draw decoded in ``batch_index``
    (scVI's; a multi-modal module adds those of its other modalities)."""
    if "library" in posterior.nodes:
        log_library = posterior.nodes["library"]["value"]
    else:
        log_library = model.module.observed_log_library(batch["x"], batch["size_factor"],
                                                        batch.get(LIBRARY_SIZE_FIELD))
    return {
        "z": posterior.nodes["z"]["value"],
        "log_library": log_library,
        "batch_index": batch_index,
        "labels": batch["labels"],
        "cat_covs": batch["cat_covs"],
        "cont_covs": batch["cont_covs"],
    }


def posterior_generative(model, draw: PosteriorDraw, batch_codes=(None,)) -> list[dict]:
    """Likelihood parameters of a posterior draw, decoded in each of ``batch_codes``.

    ``None`` keeps each cell's own batch; the draw is shared by all codes.
    """
    batch = draw.batch
    decoded = []
    for code in batch_codes:
        batch_index = batch["batch_index"]
        if code is not None:
            batch_index = torch.full_like(batch_index, code)
        decoded.append(model.module.generative(
            **model._generative_inputs(draw.guide, batch, batch_index, code)))
    return decoded


def decoded_draws(
    model,
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
        decoded = posterior_generative(model, draw, codes)
        return {i: torch.stack([extract(out) for out in decoded]).mean(0)
                for i, extract in enumerate(extractors)}

    values = iterate_posterior(model.module, data, decode, n_samples, positions, batch_size)
    return [values[i] for i in range(len(extractors))]


def column_extractor(model, key: str, columns: np.ndarray):
    """Generative parameters -> the ``columns`` of ``params[key]`` (on the model's device)."""
    columns_t = torch.as_tensor(columns, device=model.device)
    return lambda params: params[key].index_select(-1, columns_t)


def rho_sampler(model, data: CellTensors, batch_size: int):
    """Draws of ``rho`` for differential expression (SCVI's and LDVAE's
    ``_normalized_expression_sampler``, see ``BaseModel``)."""
    columns = np.arange(model.registry.n_vars)

    extract_rho = column_extractor(model, "rho", columns)

    def sample(positions: np.ndarray, code: int | None) -> np.ndarray:
        [draws] = decoded_draws(model, data, positions, [code], [extract_rho], 1, batch_size)
        return draws[0].cpu().numpy()

    return sample


def as_frames(values: list[torch.Tensor], adata_used, indices, column_names,
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
