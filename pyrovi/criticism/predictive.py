"""Posterior predictive datasets of trained models, as the checks store them.

The part of :class:`~pyrovi.criticism.PosteriorPredictiveCheck` (in :mod:`pyrovi.criticism`)
that talks to the models, through :class:`~pyrovi.criticism.TrainedModel` only: which
observed site a modality checks (as the models' data fields declare it), the observed
counts and feature names of that site, and the generated datasets, drawn in chunks of
cells and stored one matrix per sample.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp
from tqdm.auto import tqdm

from pyrovi.criticism.interface import TrainedModel, feature_columns
from pyrovi.criticism.stats import Matrix
from pyrovi.data.fields import DataField
from pyrovi.data.minified import is_minified, needs_counts

#: The modality checked when none is named: the counts of the ``x`` site.
DEFAULT_MODALITY = "rna"
#: Elements (cells × features × samples) of one dense block (calibration, sampling chunks).
BLOCK_ELEMENTS = 2**24


def declared_modalities() -> set[str]:
    """Every modality a data field class declares (of pyrovi or of a plug-in)."""
    found, stack = set(), [DataField]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.modality is not None:
            found.add(cls.modality)
    return found


def modality_field(model: TrainedModel, modality: str):
    """The data field of ``model`` that observes ``modality``, or ``None``."""
    return next((f for f in model.registry.fields if f.modality == modality), None)


def modalities(model: TrainedModel) -> dict[str, str]:
    """``{modality: observed site}`` of ``model``, as its registry's fields declare them."""
    return {f.modality: f.key for f in model.registry.fields if f.modality is not None}


def check_modality(modality: str | None, models: Mapping[str, TrainedModel]) -> str:
    """The checked modality (``"rna"`` by default); every model must observe it."""
    if modality is None:
        return DEFAULT_MODALITY
    known = sorted(declared_modalities())
    if modality not in known:
        raise ValueError(f"modality must be None or one of {known}, got {modality!r}.")
    lacking = [name for name, model in models.items() if modality not in modalities(model)]
    if lacking:
        raise ValueError(
            f"modality={modality!r} needs models that observe it; {lacking} observe only "
            f"{sorted(modalities(models[lacking[0]]))}: check them separately.")
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
        A modality every model observes (``"rna"``, or another a data field declares).
    key
        ``count_layer_key`` of the check: where to read the counts instead (a layer for
        RNA, an ``obsm`` key for another modality).

    Returns
    -------
    tuple
        The counts matrix of every cell of ``adata``, the feature names, and ``{model name:
        columns of the modality in its posterior_predictive_sample output}``.
    """
    if is_minified(adata):
        raise needs_counts(
            "A posterior predictive check (it compares generated counts with the observed "
            "ones)", "Pass the AnnData with the counts as adata (the models may keep their "
            "minified data).")
    fields = {name: modality_field(model, modality) for name, model in models.items()}
    site = next(iter(fields.values())).key
    first_name, first = next(iter(models.items()))
    # The genes are adata's own variables; another modality's features, the first model's.
    names = pd.Index((adata.var_names if site == "x" else
                      pd.Index(first.observed_features()[site])).astype(str))
    for name, model in models.items():
        model_names = pd.Index(pd.Index(model.observed_features()[site]).astype(str))
        if not model_names.equals(names):
            if site == "x":
                n_diff = len(model_names.symmetric_difference(names))
                raise ValueError(
                    f"Model {name!r} has {len(model_names)} genes and adata "
                    f"{len(names)}; {n_diff} differ (or their order does). Subset "
                    "adata to the model's genes, in the model's order "
                    "(adata[:, model.var_names]).")
            raise ValueError(f"Model {name!r} has other {modality} features than "
                             f"{first_name!r}: {list(model_names)}.")
    sources = {field.source for field in fields.values()}
    if key is None and len(sources) > 1:
        raise ValueError(f"The models read their {modality} counts from different places "
                         f"{sources}; pass count_layer_key=.")
    raw = next(iter(fields.values())).observed_counts(adata, key, names=list(names))
    columns = {name: feature_columns(model, site) for name, model in models.items()}
    return raw, names, columns


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
