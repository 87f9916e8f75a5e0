"""Posterior predictive datasets of trained models, as the checks store them.

The part of :class:`~pyrovi.criticism.PosteriorPredictiveCheck` (in :mod:`pyrovi.criticism`)
that talks to the models, through :class:`~pyrovi.criticism.TrainedModel` only: which
observed site a modality checks, the observed counts and feature names of that site, and
the generated datasets, drawn in chunks of cells and stored one matrix per sample.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from pyrovi.criticism.interface import GENE_SITE, PROTEIN_SITE, TrainedModel, feature_columns
from pyrovi.criticism.stats import Matrix
from pyrovi.data.proteins import protein_matrix
from pyrovi.data.registry import counts_matrix

#: Observed site checked for each modality.
MODALITY_SITES = {"rna": GENE_SITE, "protein": PROTEIN_SITE}
#: Elements (cells × features × samples) of one dense block (calibration, sampling chunks).
BLOCK_ELEMENTS = 2**24


def check_modality(modality: str | None, models: Mapping[str, TrainedModel]) -> str:
    """The checked modality (``"rna"`` by default); every model must observe its site."""
    if modality is None:
        return "rna"
    if modality not in MODALITY_SITES:
        raise ValueError(f"modality must be None, 'rna' or 'protein', got {modality!r}.")
    if modality == "protein":
        site = MODALITY_SITES[modality]
        lacking = [name for name, model in models.items()
                   if site not in model.observed_features()]
        if lacking:
            raise ValueError(
                f"modality='protein' needs models with protein counts (TOTALVI); "
                f"{lacking} model(s) only RNA: use modality=None or 'rna' for them.")
    return modality


def observed_counts(adata, models: Mapping[str, TrainedModel], modality: str,
                    key: str | None):
    """Observed counts, feature names and the sample columns of the modality per model.

    Parameters
    ----------
    adata
        The (flattened) AnnData of the checked cells.
    models
        ``{name: model}``.
    modality
        ``"rna"`` or ``"protein"``.
    key
        ``count_layer_key`` of the check: a layer (RNA) or ``obsm`` key (proteins).

    Returns
    -------
    tuple
        The counts matrix of every cell of ``adata``, the feature names, and ``{model name:
        columns of the modality in its posterior_predictive_sample output}``.
    """
    site = MODALITY_SITES[modality]
    if modality == "rna":
        var_names = pd.Index(adata.var_names.astype(str))
        for name, model in models.items():
            model_names = pd.Index(pd.Index(model.observed_features()[site]).astype(str))
            if not model_names.equals(var_names):
                n_diff = len(model_names.symmetric_difference(var_names))
                raise ValueError(
                    f"Model {name!r} has {len(model_names)} genes and adata "
                    f"{len(var_names)}; {n_diff} differ (or their order does). Subset "
                    "adata to the model's genes, in the model's order "
                    "(adata[:, model.var_names]).")
        layers = {m.registry.layer for m in models.values()}
        if key is None and len(layers) > 1:
            raise ValueError(f"The models read counts from different layers {layers}; "
                             "pass count_layer_key=.")
        layer = key if key is not None else layers.pop()
        columns = {name: feature_columns(model, site) for name, model in models.items()}
        return counts_matrix(adata, layer), var_names, columns
    first = next(iter(models.values()))
    proteins = pd.Index(pd.Index(first.observed_features()[site]).astype(str))
    for name, model in models.items():
        names = pd.Index(model.observed_features()[site])
        if not names.astype(str).equals(proteins):
            raise ValueError(f"Model {name!r} has other proteins than "
                             f"{next(iter(models))!r}: {list(names)}.")
    obsm_key = key if key is not None else first.registry.protein_expression_obsm_key
    raw = protein_matrix(adata, obsm_key)
    stored = adata.obsm[obsm_key]
    if isinstance(stored, pd.DataFrame) and not pd.Index(
            stored.columns.astype(str)).equals(proteins):
        raise ValueError(f"The proteins of adata.obsm[{obsm_key!r}] "
                         f"({list(stored.columns)}) are not the models' {list(proteins)}.")
    if raw.shape[1] != len(proteins):
        raise ValueError(f"adata.obsm[{obsm_key!r}] has {raw.shape[1]} columns; the models "
                         f"have {len(proteins)} proteins.")
    columns = {name: feature_columns(model, site) for name, model in models.items()}
    return raw, proteins, columns


def draw_datasets(name: str, model: TrainedModel, adata, flat, positions: np.ndarray,
                  columns: np.ndarray, n_samples: int, sparse: bool, batch_size: int | None,
                  progress_bar: bool) -> list[Matrix]:
    """Posterior predictive samples of one model, drawn in chunks of cells.

    Parameters
    ----------
    name
        The model's name in the check (for messages).
    model
        The model.
    adata, flat
        The data passed to the check and its flattened AnnData.
    positions
        Checked cells of ``flat``.
    columns
        Columns of the checked modality in the model's samples.
    n_samples
        Samples to draw.
    sparse
        Store CSR matrices (else dense float32).
    batch_size
        Cells per call to ``posterior_predictive_sample`` (default: blocks of at most
        :data:`BLOCK_ELEMENTS` values).
    progress_bar
        Show a tqdm bar.

    Returns
    -------
    list
        One cells × features matrix per sample.
    """
    width = sum(len(names) for names in model.observed_features().values())
    if batch_size is None:
        batch_size = max(1, BLOCK_ELEMENTS // max(1, width * n_samples))
    own = model.is_own_data(adata)
    parts: list[list[Matrix]] = [[] for _ in range(n_samples)]
    starts = range(0, positions.size, batch_size)
    for start in tqdm(starts, desc=f"Sampling {name}", disable=not progress_bar):
        chunk = positions[start:start + batch_size]
        if own:
            draws = model.posterior_predictive_sample(
                model.adata, indices=chunk, n_samples=n_samples,
                batch_size=min(chunk.size, 1024))
        else:
            # Register only the chunk's cells with the model (validation is per call).
            draws = model.posterior_predictive_sample(
                flat[chunk].copy(), n_samples=n_samples, batch_size=min(chunk.size, 1024))
        draws = np.asarray(draws)
        if draws.ndim == 2:
            draws = draws[..., None]
        if draws.shape[:2] != (chunk.size, width) or draws.shape[2] != n_samples:
            raise ValueError(f"Model {name!r} returned samples of shape {draws.shape}; "
                             f"expected ({chunk.size}, {width}, {n_samples}).")
        draws = draws[:, columns, :]
        for s in range(n_samples):
            block = draws[:, :, s]
            parts[s].append(sp.csr_matrix(block, dtype=np.float32) if sparse
                            else block.astype(np.float32))
    stack = sp.vstack if sparse else np.vstack
    out = []
    for pieces in parts:
        matrix = stack(pieces, format="csr") if sparse else stack(pieces)
        if sparse:
            matrix.eliminate_zeros()
        out.append(matrix)
    return out
