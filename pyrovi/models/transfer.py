"""Reference mapping by architecture surgery (scArches; Lotfollahi et al. 2022).

A model trained on reference batches is extended to a query with new batches: the query is
registered with the reference's setup, every category table (batch, extra categorical
covariates, labels) grows by the query's new categories, the reference weights are copied
and most of them are frozen, so that fine-tuning on the query only learns what the new
categories need. The model classes expose this as ``load_query_data`` and
``prepare_query_anndata`` classmethods (:class:`~pyrovi.SCVI`, :class:`~pyrovi.LDVAE`,
:class:`~pyrovi.TOTALVI`).

Freezing rule
-------------
Only the *entries that belong to the new categories* are added to what trains by default:
the rows of new batches (and new covariate categories) in every covariate embedding, their
gene-batch (gene-label) dispersion rows and, for TotalVI, their background prior.
Rows of categories the reference already had stay fixed, also when query cells use them.
scArches trains the covariate weights of every category instead; we do not, because then
the reference's own batch rows move (through the query cells of a shared batch, or through
weight decay) and the reference cells' latent representation under the query model would
no longer be the reference model's. With this rule it is, exactly: the reference embedding
never needs recomputing and the query is placed into it. Rows of reference categories that
no query cell uses get no gradient anyway, so for them the two rules differ only by weight
decay drift.

New rows start at the mean of the reference's rows (the average reference batch; zero when
the reference had a single batch and so no table). Data-driven quantities (those a module
declares in ``data_driven_tensors``: the library-size prior; for TotalVI the background
prior and which features each batch measured) are computed from the query's counts, as
``setup_anndata`` would. The module also declares its ``encoders`` (the networks reading
the data), which the freezing options below treat apart from the decoders.

Frozen entries are held by ``requires_grad=False`` (whole tensors) or by a gradient hook
that zeroes them (partly trainable tensors, which are also exempt from weight decay: Adam's
decay term would otherwise move entries whose gradient is zero). The options of
``load_query_data`` (``freeze_expression``, ``freeze_decoder_first_layer``,
``freeze_batchnorm_*``, ``unfrozen``) release more, as in scvi-tools.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from torch import nn

from pyrovi.data import AnnDataRegistry, SetupError, is_minified
from pyrovi.data.minified import needs_counts
from pyrovi.data.multimodal import flatten_query, is_mudata
from pyrovi.data.registry import REGISTRY_UNS_KEY, categories_of, register_new_data
from pyrovi.infer import resolve_device
from pyrovi.infer.training import NO_WEIGHT_DECAY
from pyrovi.io.model_files import SavedModel
from pyrovi.models.persistence import restored_init_params
from pyrovi.nn.fc import CovariateLinear, FCLayers

logger = logging.getLogger(__name__)

_MISSING = object()


@dataclass
class Reference:
    """What a query model needs from a reference: its class, setup, genes and weights."""

    model_class: str
    registry: AnnDataRegistry
    var_names: list[str]
    init_params: dict
    state_dict: dict[str, torch.Tensor]
    is_trained: bool


def read_reference(cls: type, reference_model) -> Reference:
    """The :class:`Reference` of a model instance or of a directory written by ``save``.

    Raises
    ------
    TypeError
        If the reference is of another model class than ``cls``.
    FileNotFoundError
        If a directory holds no saved model.
    """
    if isinstance(reference_model, str | os.PathLike):
        checkpoint = SavedModel(reference_model).state
        try:
            init_params = restored_init_params(checkpoint["init_params"], {},
                                               checkpoint["model_class"])
        except ValueError as error:
            raise ValueError(
                f"{error} For load_query_data, load the reference that way and pass the "
                "model instance as reference_model."
            ) from None
        reference = Reference(
            model_class=checkpoint["model_class"],
            registry=AnnDataRegistry.from_dict(checkpoint["registry"]),
            var_names=list(map(str, checkpoint["var_names"])),
            init_params=init_params,
            state_dict=checkpoint["state_dict"],
            is_trained=bool(checkpoint["is_trained"]),
        )
    else:
        if not hasattr(reference_model, "module") or not hasattr(reference_model, "registry"):
            raise TypeError(
                "reference_model must be a trained pyrovi model or the directory it was "
                f"saved to, got {type(reference_model).__name__}."
            )
        reference = Reference(
            model_class=type(reference_model).__name__,
            registry=AnnDataRegistry.from_dict(reference_model.registry.to_dict()),
            var_names=list(map(str, reference_model.var_names)),
            # A prior module in the settings must not be shared with the reference.
            init_params=copy.deepcopy(reference_model.init_params),
            state_dict={k: v.detach().cpu().clone()
                        for k, v in reference_model.module.state_dict().items()},
            is_trained=bool(reference_model.is_trained),
        )
    if reference.model_class != cls.__name__:
        raise TypeError(
            f"The reference is a {reference.model_class}; map a query onto it with "
            f"pyrovi.{reference.model_class}.load_query_data."
        )
    return reference


# -- query genes -------------------------------------------------------------------------


def _reference_var_names(cls: type, reference_model) -> pd.Index:
    if isinstance(reference_model, str | os.PathLike):
        return pd.Index(read_reference(cls, reference_model).var_names)
    if type(reference_model).__name__ != cls.__name__:
        raise TypeError(f"The reference is a {type(reference_model).__name__}, not a "
                        f"{cls.__name__}.")
    return pd.Index(map(str, reference_model.var_names))


def _pad_columns(matrix, positions: np.ndarray):
    """Columns ``positions`` of ``matrix``, ``-1`` giving a zero column (sparse stays sparse,
    as CSR; dense stays dense)."""
    present = positions >= 0
    n_missing = int((~present).sum())
    taken = matrix[:, positions[present]]
    if sp.issparse(matrix):
        zeros = sp.csr_matrix((matrix.shape[0], n_missing), dtype=matrix.dtype)
        stacked = sp.hstack([sp.csr_matrix(taken), zeros], format="csr")
    else:
        taken = np.asarray(taken)
        stacked = np.hstack([taken, np.zeros((matrix.shape[0], n_missing), dtype=taken.dtype)])
    # stacked holds the present genes, then the missing ones; put them in reference order.
    order = np.concatenate([np.flatnonzero(present), np.flatnonzero(~present)])
    result = stacked[:, np.argsort(order, kind="stable")]
    if sp.issparse(result):
        result.sort_indices()
    return result


def prepare_query_anndata(
    cls: type,
    query_adata,
    reference_model,
    return_reference_var_names: bool = False,
    inplace: bool = True,
    min_gene_fraction: float = 0.5,
):
    """Give a query the reference's genes, in the reference's order.

    Parameters
    ----------
    cls
        The model class of the reference.
    query_adata, reference_model, return_reference_var_names, inplace, min_gene_fraction
        See :meth:`pyrovi.SCVI.prepare_query_anndata`.

    Returns
    -------
    None, a new AnnData (``inplace=False``) or the reference's genes
    (``return_reference_var_names=True``).
    """
    reference_genes = _reference_var_names(cls, reference_model)
    if return_reference_var_names:
        return reference_genes
    if is_mudata(query_adata):
        raise TypeError(
            "prepare_query_anndata works on an AnnData; prepare the RNA modality "
            "(mdata.mod['rna']) and call mdata.update()."
        )
    if not query_adata.var_names.is_unique:
        duplicated = list(query_adata.var_names[query_adata.var_names.duplicated()][:5])
        raise ValueError(f"The query's var_names are not unique (e.g. {duplicated}); call "
                         "query_adata.var_names_make_unique() first.")
    query_genes = pd.Index(map(str, query_adata.var_names))
    positions = query_genes.get_indexer(reference_genes)
    n_present = int((positions >= 0).sum())
    if n_present == 0:
        raise ValueError(
            f"None of the reference's {len(reference_genes)} genes (e.g. "
            f"{list(reference_genes[:3])}) is in the query (e.g. {list(query_genes[:3])}); "
            "are both named the same way (symbols vs Ensembl IDs)?"
        )
    fraction = n_present / len(reference_genes)
    if fraction < min_gene_fraction:
        raise ValueError(
            f"Only {n_present} of the reference's {len(reference_genes)} genes "
            f"({fraction:.0%}) are in the query, below min_gene_fraction={min_gene_fraction}; "
            "the reference model would read mostly padded zeros. Pass a smaller "
            "min_gene_fraction to pad anyway."
        )
    if inplace and query_adata.is_view:
        raise ValueError("query_adata is a view; pass query_adata.copy() or inplace=False.")
    n_missing = len(reference_genes) - n_present
    n_extra = len(query_genes) - n_present
    if n_missing:
        missing = list(reference_genes[positions < 0][:5])
        warnings.warn(
            f"{n_missing} of the reference's {len(reference_genes)} genes are not in the query "
            f"(e.g. {missing}); they were added as all-zero columns.",
            UserWarning, stacklevel=3,
        )
    if n_extra:
        logger.info("Dropped %d query genes that the reference does not have.", n_extra)

    X = None if query_adata.X is None else _pad_columns(query_adata.X, positions)
    # anndata >= 0.13 also lists X under the key None.
    layers = {k: _pad_columns(v, positions) for k, v in query_adata.layers.items()
              if k is not None}
    var = query_adata.var.reindex(reference_genes)
    if len(query_adata.varm) or len(query_adata.varp):
        logger.info("varm and varp of the query are dropped (they cannot be padded).")
    if not inplace:
        return anndata.AnnData(
            X=X, obs=query_adata.obs.copy(), var=var, uns=copy.deepcopy(dict(query_adata.uns)),
            obsm={k: v.copy() for k, v in query_adata.obsm.items()},
            obsp={k: v.copy() for k, v in query_adata.obsp.items()}, layers=layers,
        )
    prepared = anndata.AnnData(
        X=X, obs=query_adata.obs, var=var, uns=query_adata.uns, obsm=dict(query_adata.obsm),
        obsp=dict(query_adata.obsp), layers=layers, raw=query_adata.raw,
    )
    # An AnnData cannot change its number of variables through its attributes; running its
    # public constructor again on the same object is the one public way to do it in place
    # (the private re-initialiser other tools call changed in anndata 0.13).
    anndata.AnnData.__init__(query_adata, prepared)
    return None


def check_query_genes(cls: type, var_names: Sequence[str], query) -> None:
    """Raise a :class:`SetupError` naming the genes a query lacks, pointing to the fix."""
    reference = pd.Index(var_names)
    if reference.equals(query.var_names):
        return
    missing = reference.difference(query.var_names, sort=False)
    extra = query.var_names.difference(reference, sort=False)
    fix = (f"call pyrovi.{cls.__name__}.prepare_query_anndata(query_adata, reference_model) "
           "first (it reorders the genes, drops extra ones and adds missing ones as zeros)")
    if len(missing):
        raise SetupError(
            f"The query lacks {len(missing)} of the reference's {len(reference)} genes: "
            f"{list(missing[:10])}{' ...' if len(missing) > 10 else ''}; {fix}."
        )
    detail = f"{len(extra)} extra genes" if len(extra) else "the genes in another order"
    raise SetupError(f"The query has the reference's genes but {detail}; {fix}.")


# -- registration ------------------------------------------------------------------------


def _obs_roles(registry: AnnDataRegistry) -> dict[str, list[str]]:
    """The obs columns of each setup argument that a query must carry (labels optional)."""
    roles = {
        "batch_key": [registry.batch_key],
        "size_factor_key": [registry.size_factor_key],
        "categorical_covariate_keys": list(registry.categorical_covariate_keys),
        "continuous_covariate_keys": list(registry.continuous_covariate_keys),
    }
    return {role: [k for k in keys if k] for role, keys in roles.items()}


def _check_query_obs(registry: AnnDataRegistry, query) -> None:
    for role, keys in _obs_roles(registry).items():
        for key in keys:
            if key not in query.obs.columns:
                example = (f"query_adata.obs[{key!r}] = 'query'"
                           if role == "batch_key" else f"query_adata.obs[{key!r}] = ...")
                raise SetupError(
                    f"The query has no obs column {key!r}, the reference's {role}; add it "
                    f"(e.g. {example}; new batch names become new batches)."
                )


def _extended(categories: Sequence[str], query, key: str | None) -> list[str]:
    """``categories`` followed by the query's categories of ``obs[key]`` not among them."""
    if key is None or key not in query.obs.columns:
        return list(categories)
    column = query.obs[key]
    if column.isna().any():
        raise SetupError(f"query_adata.obs[{key!r}] has {int(column.isna().sum())} missing "
                         "value(s); fill them or remove those cells first.")
    known = set(categories)
    return list(categories) + [c for c in categories_of(column) if c not in known]


def extend_registry(reference: AnnDataRegistry, query) -> AnnDataRegistry:
    """The reference's registry with the query's new batch, covariate and label categories.

    Reference categories keep their codes; new ones are appended in the query's order.
    Each field then records its own entries for the new categories
    (:meth:`~pyrovi.data.DataField.extend_for_query`, e.g. which features of another
    modality the new batches measured).
    """
    registry = AnnDataRegistry.from_dict(reference.to_dict())
    registry.batch_categories = _extended(reference.batch_categories, query, reference.batch_key)
    registry.label_categories = _extended(reference.label_categories, query, reference.labels_key)
    registry.covariate_categories = {
        key: _extended(reference.covariate_categories[key], query, key)
        for key in reference.categorical_covariate_keys
    }
    registry.n_cells = query.n_obs
    for data_field in reference.fields:
        data_field.extend_for_query(query, reference, registry)
    return registry


# -- weights -----------------------------------------------------------------------------


def _category_growth(reference: AnnDataRegistry, extended: AnnDataRegistry) -> dict[int, int]:
    """Category counts of the covariate tables (0 batch, k the k-th extra covariate)."""
    old = [reference.n_batch, *reference.n_cats_per_covariate]
    new = [extended.n_batch, *extended.n_cats_per_covariate]
    return dict(enumerate(zip(old, new, strict=True)))


def transfer_weights(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    reference: AnnDataRegistry,
    extended: AnnDataRegistry,
) -> dict[str, torch.Tensor]:
    """Copy the reference's ``state`` into the extended ``module``.

    Tensors of the same shape are copied. Tensors that grew along a category axis get the
    reference's block; their new entries start at the mean of the reference's entries along
    that axis, or (the module's declared ``data_driven_tensors``) keep the values the query
    model was built with. Covariate tables missing from the reference (a covariate with a single
    category has none: its effect is 0) start at 0.

    Returns
    -------
    dict
        For every tensor of ``module``'s state, a boolean mask of its new entries.
    """
    growth = _category_growth(reference, extended)
    valid_sizes = {pair for pair in growth.values() if pair[0] != pair[1]}
    valid_sizes |= {(reference.n_labels, extended.n_labels)}
    target = module.state_dict()
    extra = set(state) - set(target)
    if extra:
        raise RuntimeError(f"Reference weights the query model does not have: {sorted(extra)}.")
    data_driven = set(module.data_driven_tensors)
    merged, new_entries = {}, {}
    for name, built in target.items():
        new = torch.zeros(built.shape, dtype=torch.bool)
        if name not in state:
            covariate = CovariateLinear.covariate_table(name)
            if covariate is None:
                raise RuntimeError(f"The query model has a tensor {name!r} the reference lacks.")
            n_old = growth[covariate][0]
            value = torch.zeros_like(built)  # the reference's single category adds nothing
            new[n_old:] = True
        else:
            old = state[name].to(built.dtype)
            if old.shape == built.shape:
                value = old.clone()
            else:
                value, new = _grown(name, old, built, valid_sizes, name in data_driven)
        merged[name] = value
        new_entries[name] = new
    module.load_state_dict(merged)
    return new_entries


def _grown(name: str, old: torch.Tensor, built: torch.Tensor, valid_sizes: set,
           data_driven: bool):
    """``built`` with ``old`` in its leading block and the new entries initialised (left as
    built for a ``data_driven`` tensor)."""
    grown = [d for d in range(built.dim()) if old.shape[d] != built.shape[d]]
    if (old.dim() != built.dim() or len(grown) != 1
            or (old.shape[grown[0]], built.shape[grown[0]]) not in valid_sizes):
        raise RuntimeError(
            f"Cannot extend {name!r} from {tuple(old.shape)} to {tuple(built.shape)}: only "
            "tensors indexed by a category can grow."
        )
    axis = grown[0]
    n_old = old.shape[axis]
    value = built.clone()
    value.narrow(axis, 0, n_old).copy_(old)
    if not data_driven and value.is_floating_point():
        fill = old.mean(axis, keepdim=True)
        value.narrow(axis, n_old, built.shape[axis] - n_old).copy_(
            fill.expand_as(value.narrow(axis, n_old, built.shape[axis] - n_old)))
    new = torch.zeros(built.shape, dtype=torch.bool)
    new.narrow(axis, n_old, built.shape[axis] - n_old).fill_(True)
    return value, new


# -- freezing ----------------------------------------------------------------------------


def _mask_gradient(parameter: nn.Parameter, trainable: torch.Tensor) -> None:
    """Zero the gradient of the frozen entries of ``parameter`` and exempt it from weight
    decay (which would otherwise move the frozen entries)."""
    frozen = {"mask": ~trainable}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        if frozen["mask"].device != grad.device:
            frozen["mask"] = frozen["mask"].to(grad.device)
        return grad.masked_fill(frozen["mask"], 0.0)

    parameter.register_hook(hook)
    setattr(parameter, NO_WEIGHT_DECAY, True)


def freeze_for_query(
    module: nn.Module,
    new_entries: dict[str, torch.Tensor],
    freeze_dropout: bool = False,
    freeze_expression: bool = True,
    freeze_decoder_first_layer: bool = True,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = False,
    unfrozen: bool = False,
) -> dict[str, torch.Tensor]:
    """Make only the query's part of ``module`` trainable (see the module docstring).

    Whole tensors are frozen with ``requires_grad=False``; partly trainable ones get a
    gradient hook zeroing the frozen entries and no weight decay, so frozen entries stay
    bit-for-bit equal under Adam.

    Returns
    -------
    dict
        Boolean mask of the trainable entries of every parameter.
    """
    parameters = dict(module.named_parameters())
    trainable = {name: new_entries[name].clone() for name in parameters}
    if unfrozen:
        for name, parameter in parameters.items():
            parameter.requires_grad_(True)
            trainable[name].fill_(True)
        return trainable

    def train_whole(prefix: str) -> None:
        for name in parameters:
            if name.startswith(prefix):
                trainable[name].fill_(True)

    # The module declares its encoders (the networks reading the data); the rest decodes.
    encoders = tuple(module.encoders)

    def is_encoder(name: str) -> bool:
        return any(name == e or name.startswith(f"{e}.") for e in encoders)

    if not freeze_expression:
        for encoder in encoders:
            train_whole(f"{encoder}.")
    for name, block in module.named_modules():
        if isinstance(block, FCLayers) and not is_encoder(name) and not freeze_decoder_first_layer:
            train_whole(f"{name}.layers.0.linear.")
        if isinstance(block, nn.modules.batchnorm._BatchNorm):
            frozen = freeze_batchnorm_encoder if is_encoder(name) else freeze_batchnorm_decoder
            if frozen:
                block.momentum = 0.0  # running statistics stay the reference's
            else:
                train_whole(f"{name}.")
        if freeze_dropout and isinstance(block, nn.Dropout):
            block.p = 0.0
    for name, parameter in parameters.items():
        mask = trainable[name]
        parameter.requires_grad_(bool(mask.any()))
        if mask.any() and not mask.all():
            _mask_gradient(parameter, mask)
    return trainable


# -- the classmethod ---------------------------------------------------------------------


def load_query_data(
    cls: type,
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
    """Build the query model of ``cls`` from a reference model.

    Parameters
    ----------
    cls
        The model class of the reference.
    query_adata, reference_model, freeze_dropout, freeze_expression
        See :meth:`pyrovi.SCVI.load_query_data`.
    freeze_decoder_first_layer, freeze_batchnorm_encoder, freeze_batchnorm_decoder
        See :meth:`pyrovi.SCVI.load_query_data`.
    unfrozen, device
        See :meth:`pyrovi.SCVI.load_query_data`.

    Returns
    -------
    The query model, not trained on the query.
    """
    if is_minified(query_adata):
        raise needs_counts(
            "load_query_data (the query model trains on the query's counts)",
            "Map the query with its raw counts; minified data can only be read by the "
            "model that minified them.")
    reference = read_reference(cls, reference_model)
    if not reference.is_trained:
        logger.warning("The reference model is not trained; the query model starts from "
                       "untrained weights.")
    flat = flatten_query(query_adata, reference.registry, _obs_roles(reference.registry))
    check_query_genes(cls, reference.var_names, flat)
    _check_query_obs(reference.registry, flat)
    for data_field in reference.registry.fields:
        data_field.check_query(flat, reference.registry)
    registry = extend_registry(reference.registry, flat)
    resolved = resolve_device(device)

    # Registration writes the registry into the query's uns; undo that on any later error.
    holders = [query_adata] if flat is query_adata else [query_adata, flat]
    saved = [h.uns.get(REGISTRY_UNS_KEY, _MISSING) for h in holders]
    try:
        registry = register_new_data(registry, flat, reference.var_names)
        if flat is not query_adata:
            query_adata.uns[REGISTRY_UNS_KEY] = registry.to_dict()
        model = cls(query_adata, **reference.init_params)
        new_entries = transfer_weights(model.module, reference.state_dict, reference.registry,
                                       registry)
        trainable = freeze_for_query(
            model.module, new_entries, freeze_dropout=freeze_dropout,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder, unfrozen=unfrozen,
        )
        n_trainable = sum(int(m.sum()) for m in trainable.values())
        if n_trainable == 0:
            raise ValueError(
                "Nothing to fine-tune: the query adds no batch or covariate category to the "
                f"reference (batches {reference.registry.batch_categories[:10]}) and the "
                "options freeze every other weight. Use the reference as it is "
                "(reference_model.get_latent_representation(query_adata)), or pass "
                "freeze_expression=False or unfrozen=True."
            )
    except BaseException:
        for holder, value in zip(holders, saved, strict=True):
            if value is _MISSING:
                holder.uns.pop(REGISTRY_UNS_KEY, None)
            else:
                holder.uns[REGISTRY_UNS_KEY] = value
        raise

    encoder_sees_batch = reference.init_params.get("encode_covariates", False)
    if freeze_expression and not unfrozen and not encoder_sees_batch:
        logger.warning(
            "The reference encoder does not read the batch (encode_covariates=False): with "
            "freeze_expression=True the query's latent representation is the frozen "
            "reference encoder's and fine-tuning does not change it. Train the reference with "
            "encode_covariates=True, or pass freeze_expression=False."
        )
    n_total = sum(p.numel() for p in model.module.parameters())
    new_batches = registry.batch_categories[reference.registry.n_batch:]
    logger.info(
        "Query model: %d new batch(es) %s; %d of %d parameter entries train.",
        len(new_batches), new_batches[:10], n_trainable, n_total,
    )
    model.device = resolved
    model.module.to(resolved).eval()
    return model
