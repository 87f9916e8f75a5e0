"""Registration of AnnData fields for pyrovi models.

``setup_anndata`` records which parts of an AnnData a model reads (the counts layer, batch,
labels, size factors, extra covariates), the category mappings and summary statistics. The
record is an :class:`AnnDataRegistry`, kept in ``adata.uns["_pyrovi"]`` and saved with every
model, so that new data can be checked and encoded exactly like the training data.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from pyrovi.data.validation import (
    CountDataError,
    DataChangedError,
    check_count_fingerprint,
    count_fingerprint,
    validate_counts,
)

logger = logging.getLogger(__name__)

#: Key of ``adata.uns`` under which the registry is stored.
REGISTRY_UNS_KEY = "_pyrovi"


class SetupError(KeyError, ValueError):
    """A field the model needs is missing from, or inconsistent with, the AnnData.

    Subclasses both ``KeyError`` (missing keys) and ``ValueError`` (mismatched genes).
    """

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


@dataclass
class AnnDataRegistry:
    """What a model reads from an AnnData and how it encodes it.

    Attributes
    ----------
    model_name
        Name of the model class the data was registered for.
    layer
        Layer holding raw counts, or ``None`` for ``adata.X``.
    batch_key, labels_key, size_factor_key
        ``obs`` columns, or ``None``.
    categorical_covariate_keys, continuous_covariate_keys
        Extra ``obs`` columns used as covariates.
    batch_categories, label_categories
        Category order used for the integer codes (a single ``"0"`` when unregistered).
    covariate_categories
        Category order of each extra categorical covariate.
    allow_non_integer, drop_empty_cells
        The validation options chosen at setup.
    n_cells, n_vars
        Shape of the registered data.
    protein_expression_obsm_key
        ``obsm`` key of the protein counts (multi-modal models), or ``None``.
    protein_names
        Protein names, in column order.
    protein_batch_mask
        ``n_batch`` rows of ``n_proteins`` flags: ``False`` where a protein was not measured
        in a batch (all zero there).
    mudata_modalities
        For data set up from a MuData: which modality (and layer) each field came from.
    count_fingerprint
        :func:`~pyrovi.data.validation.count_fingerprint` of the registered counts, checked
        before training and outputs (empty for registries saved by pyrovi 0.1.0).
    """

    model_name: str
    layer: str | None = None
    batch_key: str | None = None
    labels_key: str | None = None
    size_factor_key: str | None = None
    categorical_covariate_keys: list[str] = field(default_factory=list)
    continuous_covariate_keys: list[str] = field(default_factory=list)
    batch_categories: list[str] = field(default_factory=lambda: ["0"])
    label_categories: list[str] = field(default_factory=lambda: ["0"])
    covariate_categories: dict[str, list[str]] = field(default_factory=dict)
    allow_non_integer: bool = False
    drop_empty_cells: bool = False
    n_cells: int = 0
    n_vars: int = 0
    protein_expression_obsm_key: str | None = None
    protein_names: list[str] = field(default_factory=list)
    protein_batch_mask: list[list[bool]] = field(default_factory=list)
    mudata_modalities: dict[str, str] = field(default_factory=dict)
    count_fingerprint: dict = field(default_factory=dict)

    @property
    def n_batch(self) -> int:
        """Number of batch categories."""
        return len(self.batch_categories)

    @property
    def n_labels(self) -> int:
        """Number of label categories."""
        return len(self.label_categories)

    @property
    def n_cats_per_covariate(self) -> list[int]:
        """Number of categories of each extra categorical covariate, in key order."""
        return [len(self.covariate_categories[k]) for k in self.categorical_covariate_keys]

    @property
    def n_proteins(self) -> int:
        """Number of registered proteins (0 without a protein field)."""
        return len(self.protein_names)

    @property
    def has_proteins(self) -> bool:
        """Whether a protein field is registered (multi-modal models)."""
        return self.protein_expression_obsm_key is not None

    @property
    def n_continuous_covariates(self) -> int:
        """Number of continuous covariates."""
        return len(self.continuous_covariate_keys)

    def summary(self) -> dict[str, int]:
        """Summary statistics as scvi-tools reports them."""
        summary = {
            "n_cells": self.n_cells,
            "n_vars": self.n_vars,
            "n_batch": self.n_batch,
            "n_labels": self.n_labels,
            "n_extra_categorical_covs": len(self.categorical_covariate_keys),
            "n_extra_continuous_covs": self.n_continuous_covariates,
        }
        if self.has_proteins:
            summary["n_proteins"] = self.n_proteins
        return summary

    def to_dict(self) -> dict:
        """Plain-Python form, JSON- and h5ad-safe (``None`` entries are left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, record) -> AnnDataRegistry:
        """Rebuild a registry from :meth:`to_dict` output, also after an h5ad round trip."""

        def strings(values) -> list[str]:
            return [str(v) for v in np.asarray(values, dtype=object).ravel()]

        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: record[k] for k in record if k in known}
        for key in ("categorical_covariate_keys", "continuous_covariate_keys",
                    "batch_categories", "label_categories"):
            if key in kwargs:
                kwargs[key] = strings(kwargs[key])
        if "covariate_categories" in kwargs:
            kwargs["covariate_categories"] = {
                str(k): strings(v) for k, v in dict(kwargs["covariate_categories"]).items()
            }
        if "protein_names" in kwargs:
            kwargs["protein_names"] = strings(kwargs["protein_names"])
        if "protein_batch_mask" in kwargs:
            kwargs["protein_batch_mask"] = [
                [bool(v) for v in np.asarray(row).ravel()] for row in kwargs["protein_batch_mask"]
            ]
        if "mudata_modalities" in kwargs:
            kwargs["mudata_modalities"] = {
                str(k): str(v) for k, v in dict(kwargs["mudata_modalities"]).items()
            }
        if "count_fingerprint" in kwargs:
            kwargs["count_fingerprint"] = _plain_fingerprint(kwargs["count_fingerprint"])
        for key in ("allow_non_integer", "drop_empty_cells"):
            if key in kwargs:
                kwargs[key] = bool(kwargs[key])
        for key in ("n_cells", "n_vars"):
            if key in kwargs:
                kwargs[key] = int(kwargs[key])
        return cls(**kwargs)


def _plain_fingerprint(record) -> dict:
    """A fingerprint read back from h5ad (numpy values) or JSON as plain Python values."""
    record = dict(record)
    plain = {}
    if "shape" in record:
        plain["shape"] = [int(n) for n in np.asarray(record["shape"]).ravel()]
    if "rows_sha256" in record:
        plain["rows_sha256"] = str(record["rows_sha256"])
    if "stored_values" in record:
        plain["stored_values"] = int(record["stored_values"])
    return plain


def counts_matrix(adata, layer: str | None):
    """Return the registered count matrix (``adata.X`` or ``adata.layers[layer]``).

    Raises
    ------
    SetupError
        If ``layer`` is not in ``adata.layers`` (the message lists the layers there are).
    """
    if layer is None:
        if adata.X is None:
            raise SetupError("adata.X is empty; pass layer= naming the layer with raw counts.")
        return adata.X
    if layer not in adata.layers:
        available = list(adata.layers.keys()) or "none"
        raise SetupError(
            f"Layer {layer!r} is not in adata.layers (available: {available}). "
            "Pass the name of the layer holding raw counts, or layer=None for adata.X."
        )
    return adata.layers[layer]


def counts_source(layer: str | None) -> str:
    """How error messages name the registered count matrix."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


#: Largest covariate or size factor accepted: float32 holds up to 3.4e38, and a network's
#: products and the log-library arithmetic overflow long before that.
_LARGEST_INPUT = 1e15


def column_names(keys, role: str) -> list[str]:
    """``keys`` as a list of obs column names; one name alone is taken as a list of one.

    Raises
    ------
    SetupError
        ``keys`` is neither a column name nor a list of them.
    """
    if keys is None:
        return []
    if isinstance(keys, str):
        return [keys]
    try:
        names = list(keys)
    except TypeError:
        raise SetupError(f"{role} must be a list of obs column names, got {keys!r}.") from None
    if not all(isinstance(name, str) for name in names):
        raise SetupError(f"{role} must be a list of obs column names (strings), got {names!r}.")
    return names


def check_names(adata) -> None:
    """Cell and gene names must be strings (anndata's outputs and files need them).

    Raises
    ------
    SetupError
        For integer (or other non-string) ``obs_names`` or ``var_names``, with the fix.
    """
    for axis in ("obs_names", "var_names"):
        names = getattr(adata, axis)
        if len(names) and pd.api.types.infer_dtype(names, skipna=False) != "string":
            raise SetupError(
                f"adata.{axis} are not strings (dtype {names.dtype}, e.g. {str(names[0])!r}); "
                "anndata needs string names for its outputs and files. Convert them first: "
                f"adata.{axis} = adata.{axis}.astype(str).")


def _require_obs_key(adata, key: str, role: str) -> pd.Series:
    if key not in adata.obs.columns:
        raise SetupError(
            f"{role}={key!r} is not a column of adata.obs. Available columns: "
            f"{list(adata.obs.columns)}."
        )
    column = adata.obs[key]
    if column.isna().any():
        raise SetupError(
            f"adata.obs[{key!r}] has {int(column.isna().sum())} missing value(s); fill them "
            "(e.g. with 'unknown') or remove those cells before setup."
        )
    return column


def categories_of(column: pd.Series) -> list[str]:
    """Categories present in ``column``: categorical order if categorical, else sorted."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        used = set(column.astype(str))
        return [str(c) for c in column.cat.categories if str(c) in used]
    return sorted(map(str, pd.unique(column)))


def category_codes(adata, key: str | None, categories: Sequence[str], role: str) -> np.ndarray:
    """Integer codes of ``adata.obs[key]`` under a fixed category order.

    Parameters
    ----------
    adata
        The AnnData.
    key
        ``obs`` column, or ``None`` (every cell gets code 0).
    categories
        Category order fixed at registration.
    role
        Argument name used in error messages (``"batch_key"``...).

    Returns
    -------
    numpy.ndarray
        int64 codes, one per cell.

    Raises
    ------
    SetupError
        If the column is missing or holds a category not in ``categories``.
    """
    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    column = _require_obs_key(adata, key, role).astype(str)
    codes = pd.Categorical(column, categories=list(categories)).codes.astype(np.int64)
    if (codes < 0).any():
        unknown = sorted(set(column[codes < 0]))
        raise SetupError(
            f"adata.obs[{key!r}] has categories the model was not set up with: {unknown[:10]} "
            f"(known: {list(categories)[:20]}). Map them to known categories, or use "
            "load_query_data to extend the model to new categories."
        )
    return codes


def continuous_values(adata, keys: Sequence[str], role: str) -> np.ndarray:
    """Stack numeric ``obs`` columns into a float32 matrix, checking they are finite."""
    columns = []
    for key in keys:
        column = _require_obs_key(adata, key, role)
        if not pd.api.types.is_numeric_dtype(column):
            raise SetupError(
                f"adata.obs[{key!r}] is not numeric (dtype {column.dtype}); continuous covariates "
                "must be numbers. Register it with categorical_covariate_keys instead."
            )
        values = column.to_numpy(dtype=np.float64)
        if not np.isfinite(values).all():
            raise SetupError(f"adata.obs[{key!r}] has NaN or infinite values; fix them first.")
        largest = float(np.abs(values).max()) if values.size else 0.0
        if largest > _LARGEST_INPUT:
            raise SetupError(
                f"adata.obs[{key!r}] holds values up to {largest:.3g}, beyond what the model's "
                f"float32 arithmetic can use (|value| <= {_LARGEST_INPUT:.0e}): rescale or "
                "log-transform it first.")
        columns.append(values)
    return np.stack(columns, axis=1).astype(np.float32) if columns else np.zeros((adata.n_obs, 0),
                                                                             np.float32)


def size_factors(adata, key: str) -> np.ndarray:
    """Read and check a strictly positive size factor per cell from ``adata.obs[key]``."""
    values = continuous_values(adata, [key], "size_factor_key")[:, 0]
    if (values <= 0).any():
        raise SetupError(
            f"adata.obs[{key!r}] has {int((values <= 0).sum())} non-positive size factor(s); "
            "size factors must be > 0."
        )
    return values


def setup_anndata(
    adata,
    *,
    model_name: str,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
    allow_non_integer: bool = False,
    drop_empty_cells: bool = False,
) -> AnnDataRegistry:
    """Validate an AnnData and record how a model reads it.

    Everything is checked before anything is written: on error the AnnData is unchanged.
    On success the registry is stored in ``adata.uns["_pyrovi"]``; nothing else is touched.

    Parameters
    ----------
    adata
        AnnData with raw counts in ``X`` or in ``layers[layer]`` (dense or scipy sparse).
    model_name
        Name of the model class registering the data.
    layer
        Layer with raw counts; ``None`` uses ``adata.X``.
    batch_key, labels_key
        ``obs`` columns with batch and cell-type labels.
    size_factor_key
        ``obs`` column with a positive size factor per cell, used as observed library size.
    categorical_covariate_keys, continuous_covariate_keys
        Extra ``obs`` columns injected as covariates.
    allow_non_integer
        Accept non-integer values.
    drop_empty_cells
        Leave cells with zero total counts out of training instead of raising an error.

    Returns
    -------
    AnnDataRegistry
        The registry that was stored.
    """
    categorical_covariate_keys = column_names(categorical_covariate_keys,
                                              "categorical_covariate_keys")
    continuous_covariate_keys = column_names(continuous_covariate_keys,
                                             "continuous_covariate_keys")
    check_names(adata)
    matrix = counts_matrix(adata, layer)
    if adata.n_vars == 0:
        raise SetupError(f"{counts_source(layer)} has no genes (0 columns); set up an AnnData "
                         "with the genes to model.")
    totals = validate_counts(
        matrix,
        source=counts_source(layer),
        obs_names=adata.obs_names,
        var_names=adata.var_names,
        allow_non_integer=allow_non_integer,
        allow_empty_cells=drop_empty_cells,
    )
    if not adata.var_names.is_unique:
        duplicated = list(adata.var_names[adata.var_names.duplicated()][:5])
        raise SetupError(
            f"adata.var_names are not unique (e.g. {duplicated}); "
            "call adata.var_names_make_unique()."
        )

    def categories(key, role):
        return categories_of(_require_obs_key(adata, key, role)) if key else ["0"]

    registry = AnnDataRegistry(
        model_name=model_name,
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=categorical_covariate_keys,
        continuous_covariate_keys=continuous_covariate_keys,
        batch_categories=categories(batch_key, "batch_key"),
        label_categories=categories(labels_key, "labels_key"),
        covariate_categories={
            k: categories(k, "categorical_covariate_keys") for k in categorical_covariate_keys
        },
        allow_non_integer=allow_non_integer,
        drop_empty_cells=drop_empty_cells,
        n_cells=adata.n_obs,
        n_vars=adata.n_vars,
        count_fingerprint=count_fingerprint(matrix),
    )
    continuous_values(adata, continuous_covariate_keys, "continuous_covariate_keys")
    if size_factor_key is not None:
        size_factors(adata, size_factor_key)

    n_empty = int((totals == 0).sum())
    if n_empty:
        logger.warning("%d cell(s) with zero total counts will be left out of training.", n_empty)
    adata.uns[REGISTRY_UNS_KEY] = registry.to_dict()
    logger.info("Registered AnnData for %s: %s", model_name, registry.summary())
    return registry


def get_registry(adata, model_name: str | None = None) -> AnnDataRegistry:
    """Read the registry that ``setup_anndata`` stored in ``adata``.

    Raises
    ------
    SetupError
        If the AnnData was never set up (or was set up for another model).
    """
    if REGISTRY_UNS_KEY not in adata.uns:
        name = model_name or "the model"
        raise SetupError(
            f"This AnnData has not been set up for {name}; call "
            f"{model_name or 'Model'}.setup_anndata(adata, ...) first."
        )
    registry = AnnDataRegistry.from_dict(adata.uns[REGISTRY_UNS_KEY])
    if model_name is not None and registry.model_name != model_name:
        raise SetupError(
            f"This AnnData was set up for {registry.model_name}, not {model_name}; call "
            f"{model_name}.setup_anndata(adata, ...) first."
        )
    return registry


def check_var_names(reference_var_names: Sequence[str], adata, what: str = "the model") -> None:
    """Check that ``adata`` has exactly the genes, in the order, a model was trained on.

    Raises
    ------
    SetupError
        Naming how many genes are missing, extra or reordered, and how to fix it.
    """
    reference = pd.Index(reference_var_names)
    if reference.equals(adata.var_names):
        return
    missing = reference.difference(adata.var_names)
    extra = adata.var_names.difference(reference)
    if len(missing) == 0 and len(extra) == 0:
        raise SetupError(
            f"adata has the genes of {what} but in a different order; reorder with "
            "adata = adata[:, model.adata.var_names].copy()."
        )
    raise SetupError(
        f"The genes of adata do not match {what}: {len(missing)} of its {len(reference)} genes "
        f"are missing (e.g. {list(missing[:5])}) and {len(extra)} are extra "
        f"(e.g. {list(extra[:5])}). Subset and reorder adata to the model's genes "
        "(adata[:, model_var_names]) and add missing genes as zero columns."
    )


def register_new_data(reference: AnnDataRegistry, adata, var_names: Sequence[str],
                      store: bool = True):
    """Register ``adata`` with a trained model's registry (same genes and categories).

    Used for query data, outputs on other data and ``load``: the fields and category
    mappings are the reference's and the counts are validated.

    Parameters
    ----------
    reference
        The trained model's registry.
    adata
        The new data.
    var_names
        The model's genes.
    store
        Store the registry in ``adata.uns`` (as ``setup_anndata`` would); otherwise the
        AnnData is left exactly as it was (its own set-up, if any, stays).

    Returns
    -------
    AnnDataRegistry
        The reference registry with ``n_cells`` of the new data.
    """
    check_var_names(var_names, adata)
    matrix = counts_matrix(adata, reference.layer)
    validate_counts(
        matrix,
        source=counts_source(reference.layer),
        obs_names=adata.obs_names,
        var_names=adata.var_names,
        allow_non_integer=reference.allow_non_integer,
        allow_empty_cells=True,
    )
    category_codes(adata, reference.batch_key, reference.batch_categories, "batch_key")
    if reference.labels_key is not None and reference.labels_key in adata.obs.columns:
        category_codes(adata, reference.labels_key, reference.label_categories, "labels_key")
    for key in reference.categorical_covariate_keys:
        category_codes(
            adata, key, reference.covariate_categories[key], "categorical_covariate_keys"
        )
    continuous_values(adata, reference.continuous_covariate_keys, "continuous_covariate_keys")
    if reference.protein_expression_obsm_key is not None:
        from pyrovi.data.proteins import check_protein_names  # proteins imports this module

        check_protein_names(reference, adata)
    registry = AnnDataRegistry.from_dict({**reference.to_dict(), "n_cells": adata.n_obs,
                                          "count_fingerprint": count_fingerprint(matrix)})
    if store:
        adata.uns[REGISTRY_UNS_KEY] = registry.to_dict()
    return registry


def check_registered_data(registry: AnnDataRegistry, adata) -> None:
    """Raise :class:`DataChangedError` if ``adata``'s counts changed since they were registered.

    Reads a few dozen rows (see :func:`~pyrovi.data.validation.count_fingerprint`), so it is
    cheap before every training run and output.
    """
    if not registry.count_fingerprint:  # registered by pyrovi 0.1.0
        return
    check_count_fingerprint(counts_matrix(adata, registry.layer), registry.count_fingerprint,
                            counts_source(registry.layer),
                            f"{registry.model_name}.setup_anndata(adata, ...)")


__all__ = [
    "REGISTRY_UNS_KEY",
    "AnnDataRegistry",
    "CountDataError",
    "DataChangedError",
    "SetupError",
    "categories_of",
    "category_codes",
    "check_registered_data",
    "check_var_names",
    "continuous_values",
    "counts_matrix",
    "get_registry",
    "register_new_data",
    "setup_anndata",
    "size_factors",
]
