"""Registration of AnnData fields for pyrovi models.

``setup_anndata`` records which parts of an AnnData a model reads (the counts layer, batch,
labels, size factors, extra covariates), the category mappings and summary statistics. The
record is an :class:`AnnDataRegistry`, kept in ``adata.uns["_pyrovi"]`` and saved with every
model, so that new data can be checked and encoded exactly like the training data.
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from pyrovi.data.fields import (
    DataField,
    SetupError,
    _require_obs_key,  # noqa: F401 - kept importable from here
    categories_of,
    category_codes,
    check_names,
    column_names,  # noqa: F401 - kept importable from here
    continuous_values,
    counts_matrix,
    counts_source,  # noqa: F401 - kept importable from here
    size_factors,
    standard_fields,
)
from pyrovi.data.minified import StoredPosteriorField, stored_posterior_field
from pyrovi.data.validation import CountDataError, DataChangedError, cell_totals

logger = logging.getLogger(__name__)

#: Key of ``adata.uns`` under which the registry is stored.
REGISTRY_UNS_KEY = "_pyrovi"


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
    plugin_entries
        Entries of plug-in fields (:attr:`~pyrovi.data.fields.DataField.plugins`, each
        listing its own in ``registry_keys``), readable and settable as attributes of
        their own name and serialized flat, as pyrovi 0.1/0.2 saved them.
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
    plugin_entries: dict = field(default_factory=dict)
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
        for kind in DataField.plugins:
            summary.update(kind.summary(self))
        return summary

    # -- fields ---------------------------------------------------------------------------

    @property
    def fields(self) -> list[DataField]:
        """The registered fields, as loaders read them (counts first, plug-ins last, except
        those that replace a standard field, which take its place)."""
        found = standard_fields(self.layer, self.batch_key, self.labels_key,
                                self.size_factor_key, self.categorical_covariate_keys,
                                self.continuous_covariate_keys)
        found[1].categories = self.batch_categories
        found[2].categories = self.label_categories
        found[3].categories = self.covariate_categories
        plugins = [f for f in (kind.from_registry(self) for kind in DataField.plugins)
                   if f is not None]
        # A plug-in field for a keyword a standard field provides takes its place (the
        # labels of a semi-supervised model, which know their unlabelled category).
        replacing = {f.key: f for f in plugins}
        found = [replacing.pop(f.key, f) for f in found]
        return found + list(replacing.values())

    def field(self, key: str) -> DataField | None:
        """The registered field providing minibatch keyword ``key``, or ``None``."""
        return next((f for f in self.fields if f.key == key), None)

    def __getattr__(self, name):
        # Only called when normal lookup fails: the plug-in fields' entries and derived
        # attributes (DataField.registry_keys and DataField.derived).
        if not name.startswith("_"):
            entries = self.__dict__.get("plugin_entries", {})
            for kind in DataField.plugins:
                if name in kind.registry_keys:
                    if name in entries:
                        return entries[name]
                    return copy.deepcopy(kind.registry_keys[name])
                if name in kind.derived:
                    return kind.derived[name](self)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if any(name in kind.registry_keys for kind in DataField.plugins):
            self.__dict__.setdefault("plugin_entries", {})[name] = value
        else:
            object.__setattr__(self, name, value)

    # -- per-cell totals (in memory only) -------------------------------------------------

    def remember_totals(self, matrix, totals: np.ndarray) -> None:
        """Keep the per-cell totals of ``matrix`` that registration computed.

        The matrix is held by a weak reference: the registry must not keep a count matrix
        alive (nor copy it with the registry) after the AnnData let it go.
        """
        try:
            reference = weakref.ref(matrix)
        except TypeError:  # not weakly referable: recompute when asked
            return
        self.__dict__["_totals"] = (reference, totals)

    def cell_totals(self, adata) -> np.ndarray:
        """Per-cell totals of the registered counts of ``adata`` (float64).

        Those computed at registration when ``adata`` holds the same matrix object; read
        from the counts otherwise (a registry read back from ``uns`` or a file).
        """
        matrix = counts_matrix(adata, self.layer)
        remembered = self.__dict__.get("_totals")
        if remembered is not None and remembered[0]() is matrix:
            return remembered[1]
        totals = cell_totals(matrix)
        self.remember_totals(matrix, totals)
        return totals

    def library_size_priors(self, adata) -> tuple[np.ndarray, np.ndarray]:
        """Per-batch mean and variance of log library size (cells with counts only).

        The prior of the latent library size, as in scvi-tools; float32, one entry a batch.
        """
        totals = self.cell_totals(adata)
        batch = category_codes(adata, self.batch_key, self.batch_categories, "batch_key")
        means = np.zeros(self.n_batch, dtype=np.float32)
        variances = np.ones(self.n_batch, dtype=np.float32)
        for b in range(self.n_batch):
            logs = np.log(totals[(batch == b) & (totals > 0)])
            if logs.size:
                means[b] = logs.mean()
                variances[b] = logs.var() if logs.size > 1 else 1.0
        return means, variances

    # -- serialized form ------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Plain-Python form, JSON- and h5ad-safe (``None`` entries are left out).

        Plug-in entries are written flat, after ``n_vars``, where pyrovi 0.1/0.2 wrote them.
        """
        record = {}
        for key, value in asdict(self).items():
            if key == "plugin_entries":
                for kind in DataField.plugins:
                    for name in kind.registry_keys:
                        record[name] = copy.deepcopy(getattr(self, name))
            else:
                record[key] = value
        return {k: v for k, v in record.items() if v is not None}

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
        kwargs["plugin_entries"] = {}
        for kind in DataField.plugins:
            kwargs["plugin_entries"].update(kind.read_record(record))
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
    fields: Sequence[DataField] | None = None,
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
    fields
        The fields the model reads, registered in this order (counts first); default
        :func:`~pyrovi.data.fields.standard_fields` of the keys above, which are then
        ignored. A :class:`~pyrovi.data.minified.StoredPosteriorField` among them registers
        before all others (minified data then have all-zero counts); without one, minified
        data (:mod:`pyrovi.data.minified`) are refused.

    Returns
    -------
    AnnDataRegistry
        The registry that was stored.
    """
    if fields is None:
        fields = standard_fields(layer, batch_key, labels_key, size_factor_key,
                                 categorical_covariate_keys, continuous_covariate_keys)
    check_names(adata)
    registry = AnnDataRegistry(model_name=model_name, allow_non_integer=allow_non_integer,
                               drop_empty_cells=drop_empty_cells)
    # Whether the data are minified first: the counts are then expected all zero. A model
    # that declares no stored posterior field refuses minified data here.
    stored = stored_posterior_field(fields)
    stored.register(adata, registry)
    for data_field in fields:
        if data_field is not stored:
            data_field.register(adata, registry)

    n_empty = int((registry.cell_totals(adata) == 0).sum())
    if n_empty and not registry.is_minified:
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
                      store: bool = True, minified_stem: str | None = None):
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
    minified_stem
        Key stem of the model's stored posterior when it can read minified data
        (:class:`~pyrovi.data.minified.StoredPosteriorField`); ``None`` refuses them.

    Returns
    -------
    AnnDataRegistry
        The reference registry with ``n_cells`` of the new data, minified or not as the
        new data are (a model saved on minified data reads data with counts, and back).
    """
    check_var_names(var_names, adata)
    registry = AnnDataRegistry.from_dict(reference.to_dict())
    StoredPosteriorField(minified_stem).register(adata, registry)
    for data_field in registry.fields:
        if not isinstance(data_field, StoredPosteriorField):
            data_field.check(adata, registry)
    if store:
        adata.uns[REGISTRY_UNS_KEY] = registry.to_dict()
    return registry


def check_registered_data(registry: AnnDataRegistry, adata) -> None:
    """Raise :class:`DataChangedError` if ``adata``'s counts changed since they were registered.

    Reads a few dozen rows (see :func:`~pyrovi.data.validation.count_fingerprint`), so it is
    cheap before every training run and output.
    """
    registry.fields[0].check_unchanged(adata, registry)


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
