"""Fields: the parts of an AnnData a model reads, each registered, checked and gathered alike.

A model declares its data as a list of :class:`DataField` objects (``setup_anndata`` of
SCVI, LDVAE and TOTALVI pass theirs). Each field names the keyword it gives a minibatch
(``"x"``, ``"batch_index"``...), registers itself in an
:class:`~pyrovi.data.registry.AnnDataRegistry` (validating the data and recording keys,
categories and names), checks new data against what it recorded, and hands its per-cell
array to the loaders (:meth:`DataField.cell_array`). The registry and the loaders only
iterate over fields, so a new modality is a new field, not new branches in every loader.

The ``obs`` helpers the fields share (category codes, continuous columns, size factors)
live here too, below the registry, so that fields and registry import in one direction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import pandas as pd

from pyrovi.data.validation import (
    check_count_fingerprint,
    count_fingerprint,
    validate_counts,
)


class SetupError(KeyError, ValueError):
    """A field the model needs is missing from, or inconsistent with, the AnnData.

    Subclasses both ``KeyError`` (missing keys) and ``ValueError`` (mismatched genes).
    """

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return str(self.args[0])


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


class DataField(ABC):
    """One part of an AnnData that a model reads, and how it is read.

    Subclasses set :attr:`key` and override what they need: :meth:`register` at set-up,
    :meth:`check` for new data with a trained model's registry, :meth:`cell_array` for the
    loaders. A field that carries registry entries of its own (beyond the generic keys of
    :class:`~pyrovi.data.registry.AnnDataRegistry`) lists them in :attr:`registry_keys`
    and is then rebuilt from any registry by :meth:`from_registry`; such plug-in fields
    are collected in :attr:`plugins` when their class is defined.

    Attributes
    ----------
    key
        The minibatch keyword argument the field provides.
    is_counts
        Gathered as a count matrix (:class:`~pyrovi.data.tensors.CountMatrix`: kept
        sparse on the device, densified per minibatch) rather than as a tensor.
    modality
        For an observed modality (the model's sample site of the same name as :attr:`key`):
        its name in the reports (``modality=`` of the posterior predictive check, the
        model card's tables), else ``None``.
    """

    key: str = ""
    is_counts: bool = False
    modality: str | None = None
    #: Flat registry entries this kind of field owns, with their defaults (serialized with
    #: the registry, under the same names as the attributes pyrovi 0.1/0.2 saved).
    registry_keys: dict = {}
    #: Read-only registry attributes derived from the field's entries (name: function).
    derived: dict = {}
    #: Field kinds with registry entries of their own, in definition order.
    plugins: list[type[DataField]] = []

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.registry_keys:
            DataField.plugins.append(cls)

    def register(self, adata, registry) -> None:
        """Validate the field in ``adata`` and record it in ``registry`` (set-up)."""
        return None  # an optional step: fields with nothing to do keep this

    def check(self, adata, registry) -> None:
        """Check that new data carry the field as ``registry`` recorded it."""
        return None  # an optional step: fields with nothing to do keep this

    @abstractmethod
    def cell_array(self, adata):
        """Per-cell array (cells on axis 0; numpy or scipy sparse), or ``None``."""

    def cell_arrays(self, adata) -> dict:
        """``{minibatch keyword: per-cell array}`` of the field: its :meth:`cell_array` under
        :attr:`key`, unless the field gives several (the stored posterior of minified data)."""
        return {self.key: self.cell_array(adata)}

    @property
    def source(self) -> str | None:
        """Where in an AnnData the field is read (a layer or ``obsm`` key), for messages."""
        return None

    def location(self) -> str:
        """The field's place in an AnnData, as code (``adata.obsm['key']``)."""
        return "adata"

    def observed_counts(self, adata, source: str | None = None, names=None):
        """The observed counts of a modality field, every cell of ``adata``.

        Parameters
        ----------
        adata
            The (flattened) AnnData.
        source
            Another place to read them from (a layer or ``obsm`` key), default the field's.
        names
            The model's feature names, to check the columns against where the data name
            them.
        """
        raise TypeError(f"{type(self).__name__} is not an observed modality.")

    def setup_arguments(self) -> dict:
        """The ``setup_anndata`` arguments of a plug-in field (for the model card)."""
        return {}

    def card_row(self, registry) -> dict | None:
        """The plug-in field's row of the model card's data registry table."""
        return None

    def check_query(self, query, registry) -> None:
        """Check a reference-mapping query (which may add categories) against ``registry``."""
        return None  # an optional step: fields with nothing to do keep this

    def extend_for_query(self, query, reference, extended) -> None:
        """Record in ``extended`` (``reference``'s registry with the query's new categories)
        this field's entries for the new categories, read from the query."""
        return None  # an optional step: fields with nothing to do keep this

    @classmethod
    def from_registry(cls, registry) -> DataField | None:
        """The plug-in field ``registry`` recorded, or ``None`` if it has none."""
        return None

    @classmethod
    def read_record(cls, record: dict) -> dict:
        """This kind's entries of a saved registry as plain Python values."""
        return {k: record[k] for k in cls.registry_keys if k in record}

    @classmethod
    def summary(cls, registry) -> dict[str, int]:
        """Entries this kind adds to :meth:`AnnDataRegistry.summary`."""
        return {}


class CountsField(DataField):
    """The count matrix, ``adata.X`` or ``adata.layers[layer]`` (minibatch ``x``).

    Registering validates the counts (:func:`~pyrovi.data.validation.validate_counts`),
    records the shape and the fingerprint, and leaves the per-cell totals on the registry
    object (``registry.cell_totals``) for the library-size prior.
    """

    key = "x"
    is_counts = True
    modality = "rna"

    def __init__(self, layer: str | None = None):
        self.layer = layer

    @property
    def source(self) -> str | None:
        return self.layer

    def location(self) -> str:
        return counts_source(self.layer)

    def observed_counts(self, adata, source: str | None = None, names=None):
        return counts_matrix(adata, source if source is not None else self.layer)

    def register(self, adata, registry) -> None:
        matrix = counts_matrix(adata, self.layer)
        if adata.n_vars == 0:
            raise SetupError(f"{counts_source(self.layer)} has no genes (0 columns); set up an "
                             "AnnData with the genes to model.")
        totals = validate_counts(
            matrix, source=counts_source(self.layer), obs_names=adata.obs_names,
            var_names=adata.var_names, allow_non_integer=registry.allow_non_integer,
            allow_empty_cells=registry.drop_empty_cells or _minified(registry))
        _check_minified_counts(totals, self.layer, registry)
        if not adata.var_names.is_unique:
            duplicated = list(adata.var_names[adata.var_names.duplicated()][:5])
            raise SetupError(
                f"adata.var_names are not unique (e.g. {duplicated}); "
                "call adata.var_names_make_unique()."
            )
        registry.layer = self.layer
        registry.n_cells = adata.n_obs
        registry.n_vars = adata.n_vars
        registry.count_fingerprint = count_fingerprint(matrix)
        registry.remember_totals(matrix, totals)

    def check(self, adata, registry) -> None:
        matrix = counts_matrix(adata, self.layer)
        totals = validate_counts(
            matrix, source=counts_source(self.layer), obs_names=adata.obs_names,
            var_names=adata.var_names, allow_non_integer=registry.allow_non_integer,
            allow_empty_cells=True)
        _check_minified_counts(totals, self.layer, registry)
        registry.n_cells = adata.n_obs
        registry.count_fingerprint = count_fingerprint(matrix)
        registry.remember_totals(matrix, totals)

    def check_unchanged(self, adata, registry) -> None:
        """Raise ``DataChangedError`` if the counts differ from the registered fingerprint."""
        if not registry.count_fingerprint:  # registered by pyrovi 0.1.0
            return
        check_count_fingerprint(counts_matrix(adata, self.layer), registry.count_fingerprint,
                                counts_source(self.layer),
                                f"{registry.model_name}.setup_anndata(adata, ...)")

    def cell_array(self, adata):
        return counts_matrix(adata, self.layer)


def _minified(registry) -> bool:
    # The stored posterior field (registered first) records whether the data are minified.
    return getattr(registry, "minified_data_type", None) is not None


def _check_minified_counts(totals: np.ndarray, layer: str | None, registry) -> None:
    """Minified data promise all-zero counts; counts present contradict the promise."""
    if _minified(registry) and totals.any():
        raise SetupError(
            f"adata.uns['_scvi_adata_minify_type'] says the counts were removed (minified "
            f"data), but {counts_source(layer)} holds counts in {int((totals > 0).sum())} "
            "cell(s). To use the counts, delete that key (del "
            "adata.uns['_scvi_adata_minify_type']); otherwise minify the data again.")


class BatchField(DataField):
    """Batch codes from ``adata.obs[key]`` (minibatch ``batch_index``; all 0 without a key)."""

    key = "batch_index"

    def __init__(self, obs_key: str | None = None, categories: Sequence[str] | None = None):
        self.obs_key = obs_key
        self.categories = categories

    def register(self, adata, registry) -> None:
        registry.batch_key = self.obs_key
        registry.batch_categories = _categories(adata, self.obs_key, "batch_key")

    def check(self, adata, registry) -> None:
        self.cell_array(adata)

    def cell_array(self, adata):
        return category_codes(adata, self.obs_key, self.categories, "batch_key")


class LabelsField(DataField):
    """Label codes from ``adata.obs[key]`` (minibatch ``labels``; all 0 when absent)."""

    key = "labels"

    def __init__(self, obs_key: str | None = None, categories: Sequence[str] | None = None):
        self.obs_key = obs_key
        self.categories = categories

    def register(self, adata, registry) -> None:
        registry.labels_key = self.obs_key
        registry.label_categories = _categories(adata, self.obs_key, "labels_key")

    def check(self, adata, registry) -> None:
        # Labels are optional on new data (query cells are often unlabelled).
        if self.obs_key is not None and self.obs_key in adata.obs.columns:
            self.cell_array(adata)

    def cell_array(self, adata):
        key = self.obs_key if self.obs_key in adata.obs.columns else None
        return category_codes(adata, key, self.categories, "labels_key")


class CategoricalCovariatesField(DataField):
    """Codes of extra categorical ``obs`` columns (minibatch ``cat_covs``, or ``None``)."""

    key = "cat_covs"
    role = "categorical_covariate_keys"

    def __init__(self, obs_keys=None, categories: dict | None = None):
        self.obs_keys = column_names(obs_keys, self.role)
        self.categories = categories

    def register(self, adata, registry) -> None:
        registry.categorical_covariate_keys = self.obs_keys
        registry.covariate_categories = {
            k: _categories(adata, k, self.role) for k in self.obs_keys}

    def check(self, adata, registry) -> None:
        self.cell_array(adata)

    def cell_array(self, adata):
        if not self.obs_keys:
            return None
        return np.stack([category_codes(adata, k, self.categories[k], self.role)
                         for k in self.obs_keys], axis=1)


class ContinuousCovariatesField(DataField):
    """Extra numeric ``obs`` columns as float32 (minibatch ``cont_covs``, or ``None``)."""

    key = "cont_covs"
    role = "continuous_covariate_keys"

    def __init__(self, obs_keys=None):
        self.obs_keys = column_names(obs_keys, self.role)

    def register(self, adata, registry) -> None:
        continuous_values(adata, self.obs_keys, self.role)
        registry.continuous_covariate_keys = self.obs_keys

    def check(self, adata, registry) -> None:
        continuous_values(adata, self.obs_keys, self.role)

    def cell_array(self, adata):
        return continuous_values(adata, self.obs_keys, self.role) if self.obs_keys else None


class SizeFactorField(DataField):
    """Positive size factors from ``adata.obs[key]`` (minibatch ``size_factor``, or ``None``)."""

    key = "size_factor"

    def __init__(self, obs_key: str | None = None):
        self.obs_key = obs_key

    def register(self, adata, registry) -> None:
        if self.obs_key is not None:
            size_factors(adata, self.obs_key)
        registry.size_factor_key = self.obs_key

    def cell_array(self, adata):
        return None if self.obs_key is None else size_factors(adata, self.obs_key)


def standard_fields(
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys=None,
    continuous_covariate_keys=None,
) -> list[DataField]:
    """The fields of a single-modality model, as scvi-tools' ``setup_anndata`` names them.

    Returns
    -------
    list of DataField
        Counts, batch, labels, categorical and continuous covariates, size factor, in the
        order they are validated and handed to a minibatch.
    """
    # Covariate keys first: a malformed list is reported before the data are read.
    categorical = CategoricalCovariatesField(categorical_covariate_keys)
    continuous = ContinuousCovariatesField(continuous_covariate_keys)
    return [CountsField(layer), BatchField(batch_key), LabelsField(labels_key), categorical,
            continuous, SizeFactorField(size_factor_key)]


def _categories(adata, key: str | None, role: str) -> list[str]:
    return categories_of(_require_obs_key(adata, key, role)) if key else ["0"]
