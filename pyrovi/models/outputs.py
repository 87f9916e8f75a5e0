"""A trained model's generic outputs: latent space, predictive draws, DE and ELBO metrics.

Plain functions behind the output methods of :class:`~pyrovi.models.BaseModel`; each reads
the cells through ``model.cell_data`` and calls the model-agnostic estimators of
:mod:`pyrovi.posterior` on ``model.module``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from pyrovi.data import build_cell_tensors, register_new_data
from pyrovi.data.registry import check_registered_data
from pyrovi.infer import evaluate_dataset
from pyrovi.models.minified import check_support, require_counts
from pyrovi.posterior import (
    differential_expression,
    latent_representation,
    marginal_log_likelihood,
    posterior_predictive,
)

logger = logging.getLogger(__name__)


def check_weights(module) -> None:
    """Refuse outputs from weights that hold NaN or infinity (a diverged training run)."""
    broken = [name for name, tensor in module.state_dict().items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise RuntimeError(
            f"The model's weights hold NaN or infinite values ({', '.join(broken[:3])}"
            f"{' ...' if len(broken) > 3 else ''}): training diverged, and every output "
            "would be NaN. Build the model again and train with a lower learning rate "
            "(lr=), or load a checkpoint from before the divergence.")


def registered_data(model, adata=None):
    """Return ``adata`` (default: the model's own) registered with the model's registry.

    Raises
    ------
    DataChangedError
        The model's own data changed after setup (normalized, subset...).
    RuntimeError
        The weights are not finite (training diverged).
    """
    check_weights(model.module)
    if adata is None or adata is model.adata:
        check_registered_data(model.registry, model.adata)
        return model.adata, model.registry
    adata = model.as_anndata(adata)
    # The registry stays with the model: the AnnData keeps its own set-up, if any.
    registry = register_new_data(model.registry, adata, model.var_names, store=False,
                                 minified_stem=model._minified_stem)
    check_support(model, adata, registry)
    return adata, registry


def latent(model, adata, indices, give_mean: bool, n_samples: int,
           batch_size: int | None) -> np.ndarray:
    """Latent representation under q(z | x) (see ``BaseModel.get_latent_representation``)."""
    data, _, _ = model.cell_data(adata, indices)
    return latent_representation(
        model.module, data, None, give_mean=give_mean, n_samples=n_samples,
        batch_size=batch_size or 1024,
    )


def predictive_counts(model, adata, indices, n_samples, columns, batch_size) -> np.ndarray:
    """Posterior predictive draws of the module's ``observed_sites`` (concatenated),
    cells × columns (× samples)."""
    data, _, _ = model.cell_data(adata, indices)
    draws = posterior_predictive(
        model.module, data, None, n_samples=n_samples, batch_size=batch_size or 1024,
        site=model.module.observed_sites, columns=columns,
    )
    return draws[0] if n_samples == 1 else np.moveaxis(draws, 0, -1)


def batch_codes(registry, transform_batch) -> list[int | None]:
    """Registry codes of batch names (``[None]``: each cell's own batch)."""
    if transform_batch is None:
        return [None]
    batches = (
        transform_batch if isinstance(transform_batch, list | tuple) else [transform_batch]
    )
    codes = []
    for b in batches:
        if str(b) not in registry.batch_categories:
            raise KeyError(
                f"transform_batch={b!r} is not a batch of the model "
                f"(batches: {registry.batch_categories})."
            )
        codes.append(registry.batch_categories.index(str(b)))
    return codes


def gene_positions(var_names: pd.Index, gene_list: Sequence[str]) -> np.ndarray:
    """Positions of ``gene_list`` in ``var_names``; ``KeyError`` names the missing ones."""
    positions = var_names.get_indexer(list(gene_list))
    if (positions < 0).any():
        missing = [g for g, p in zip(gene_list, positions, strict=True) if p < 0]
        raise KeyError(f"Genes not in the model: {missing[:10]}.")
    return positions


def model_differential_expression(model, adata, batch_size, batch_correction, batchid1,
                                  batchid2, sampler_kwargs: dict, **options) -> pd.DataFrame:
    """Bayesian differential expression (see ``BaseModel.differential_expression``);
    ``options`` go to :func:`pyrovi.posterior.differential_expression`."""
    adata, registry = registered_data(model, adata)
    if not batch_correction and (batchid1 is not None or batchid2 is not None):
        raise ValueError("batchid1/batchid2 choose the batches used for batch correction; "
                         "pass batch_correction=True with them.")

    def codes(batchid):
        if not batch_correction:
            return [None]
        return batch_codes(registry, list(registry.batch_categories if batchid is None
                                          else batchid))

    data = build_cell_tensors(adata, registry, model.device)
    counts, feature_names = model._de_features(adata, registry)
    if registry.is_minified:
        # The stored posterior gives the expression draws; the summaries of the counts
        # cannot be had, and saying so beats reporting the zeros that stand in for them.
        counts = None
        logger.warning(
            "The data are minified (no counts): the raw-count columns of all_stats are left "
            "out, and change mode's pseudocount estimate (pseudocounts=None), which needs "
            "the counts to find unexpressed genes, falls back to no offset (1e-10); pass "
            "pseudocounts= to choose one.")
    return differential_expression(
        model._normalized_expression_sampler(data, batch_size or 1024, **sampler_kwargs),
        counts,
        adata.obs,
        feature_names,
        batch_codes1=codes(batchid1), batch_codes2=codes(batchid2), **options,
    )


def elbo(model, adata, indices, batch_size, return_mean: bool) -> float | np.ndarray:
    """ELBO per cell (see ``BaseModel.get_elbo``)."""
    require_counts(model, adata, "get_elbo")
    data, _, _ = model.cell_data(adata, indices)
    terms = evaluate_dataset(model.module, data, None, batch_size or 1024)
    values = -terms.negative_elbo.cpu().numpy()
    return float(values.mean()) if return_mean else values


def reconstruction_error(model, adata, indices, batch_size, return_mean: bool) -> dict:
    """``-log p(x | z)`` per cell (see ``BaseModel.get_reconstruction_error``)."""
    require_counts(model, adata, "get_reconstruction_error")
    data, _, _ = model.cell_data(adata, indices)
    terms = evaluate_dataset(model.module, data, None, batch_size or 1024)
    loss = terms.reconstruction.cpu().numpy()
    return {"reconstruction_loss": float(loss.mean()) if return_mean else loss}


def marginal_ll(model, adata, indices, n_mc_samples, batch_size,
                return_mean: bool) -> float | np.ndarray:
    """Importance-sampled ``log p(x)`` per cell (see ``BaseModel.get_marginal_ll``)."""
    require_counts(model, adata, "get_marginal_ll")
    data, _, _ = model.cell_data(adata, indices)
    values = marginal_log_likelihood(model.module, data, None, n_mc_samples, batch_size or 256)
    return float(values.mean()) if return_mean else values
