"""Minified data: AnnData whose counts were replaced by each cell's stored posterior.

Model hubs (scvi-hub) ship *minified* AnnData: the count matrix (``X`` and every layer) is
an all-zero sparse matrix of the same shape, and each cell carries what the outputs of a
trained model need instead, under scvi-tools' keys (as scvi-tools 1.5 writes them):

- ``adata.obsm["<stem>_latent_qzm"]``, ``adata.obsm["<stem>_latent_qzv"]``: mean and
  variance (not the standard deviation) of the cell's posterior q(z | x), before any
  transform of ``z`` (the logistic normal's softmax). ``<stem>`` is the model's:
  ``scvi`` for SCVI, ``ldvae`` for LDVAE.
- ``adata.obs["observed_lib_size"]``: the cell's library size, the sum of its counts (not
  its log).
- ``adata.uns["_scvi_adata_minify_type"] = "latent_posterior_parameters"``.

Older scvi-tools releases wrote ``_<stem>_latent_qzm``, ``_<stem>_latent_qzv`` and
``_<stem>_observed_lib_size``; those are read too. :class:`StoredPosteriorField` checks
that the keys are complete and consistent and hands them to a minibatch as ``qz_loc``,
``qz_var`` and ``library_size`` (:data:`~pyrovi.data.tensors.QZ_LOC_FIELD`, ...);
registration accepts the all-zero counts of such data only when it does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pyrovi.data.fields import DataField, SetupError
from pyrovi.data.tensors import LIBRARY_SIZE_FIELD, QZ_LOC_FIELD, QZ_VAR_FIELD

#: ``adata.uns`` key of the minification type, and the one type that replaces the counts.
MINIFY_TYPE_UNS_KEY = "_scvi_adata_minify_type"
LATENT_POSTERIOR = "latent_posterior_parameters"
#: ``adata.obs`` column of the observed library size (scvi-tools 1.5; older releases:
#: ``_<stem>_observed_lib_size``).
OBSERVED_LIB_SIZE_KEY = "observed_lib_size"


class MinifiedDataError(ValueError):
    """An output needs the counts, and the data are minified (the counts were removed)."""


@dataclass(frozen=True)
class MinifiedKeys:
    """Where minified data keep a model's stored posterior.

    Attributes
    ----------
    qzm, qzv
        ``adata.obsm`` keys of the posterior means and variances of ``z``.
    library
        ``adata.obs`` column of the observed library sizes.
    """

    qzm: str
    qzv: str
    library: str

    @classmethod
    def of(cls, stem: str) -> MinifiedKeys:
        """The keys scvi-tools 1.5 writes for the model of key stem ``stem``."""
        return cls(f"{stem}_latent_qzm", f"{stem}_latent_qzv", OBSERVED_LIB_SIZE_KEY)

    @classmethod
    def legacy(cls, stem: str) -> MinifiedKeys:
        """The keys older scvi-tools releases wrote."""
        return cls(f"_{stem}_latent_qzm", f"_{stem}_latent_qzv", f"_{stem}_observed_lib_size")

    def present(self, adata) -> list[str]:
        """The keys ``adata`` holds, as code (``adata.obsm['...']``)."""
        found = [f"adata.obsm[{k!r}]" for k in (self.qzm, self.qzv) if k in adata.obsm]
        return found + ([f"adata.obs[{self.library!r}]"] if self.library in adata.obs else [])

    def describe(self) -> str:
        """The three keys, as code."""
        return (f"adata.obsm[{self.qzm!r}], adata.obsm[{self.qzv!r}] and "
                f"adata.obs[{self.library!r}]")


def minify_type(adata) -> str | None:
    """``adata.uns["_scvi_adata_minify_type"]`` as a string, or ``None`` when not minified.

    Parameters
    ----------
    adata
        An AnnData or MuData (anything else counts as not minified).

    Returns
    -------
    str or None
    """
    value = getattr(adata, "uns", {}).get(MINIFY_TYPE_UNS_KEY)
    return None if value is None else str(value)


def is_minified(adata) -> bool:
    """Whether ``adata`` says its counts were replaced by a stored posterior.

    Parameters
    ----------
    adata
        An AnnData or MuData.

    Returns
    -------
    bool
    """
    return minify_type(adata) is not None


def needs_counts(what: str, fix: str = "") -> MinifiedDataError:
    """The error of an output that needs counts on minified data.

    Parameters
    ----------
    what
        The output (``"get_elbo"``) and what it does with the counts.
    fix
        How to get the output anyway (default: pass the data with the counts).

    Returns
    -------
    MinifiedDataError
    """
    return MinifiedDataError(
        f"{what} needs the observed counts, and these data are minified: their counts were "
        f"replaced by each cell's stored posterior (adata.uns[{MINIFY_TYPE_UNS_KEY!r}] = "
        f"{LATENT_POSTERIOR!r}; the count matrix is all zero). "
        + (fix or "Pass an AnnData with the model's genes and the raw counts instead "
                  "(adata=...)."))


def _posterior_array(adata, key: str, n_obs: int) -> np.ndarray:
    values = adata.obsm[key]
    values = values.to_numpy() if isinstance(values, pd.DataFrame) else np.asarray(values)
    if values.ndim != 2 or values.shape[0] != n_obs or values.shape[1] == 0:
        raise SetupError(f"adata.obsm[{key!r}] has shape {values.shape}; the stored posterior "
                         "of minified data has one row per cell and one column per latent "
                         "dimension.")
    if not np.issubdtype(values.dtype, np.number) or not np.isfinite(values).all():
        raise SetupError(f"adata.obsm[{key!r}] holds non-numeric, NaN or infinite values; "
                         "the stored posterior is damaged.")
    return values.astype(np.float32)


def read_stored_posterior(adata, keys: MinifiedKeys) -> dict[str, np.ndarray]:
    """The stored posterior and library size of minified ``adata``, checked.

    Parameters
    ----------
    adata
        Minified AnnData holding ``keys``.
    keys
        Where they are.

    Returns
    -------
    dict
        ``{qz_loc: (n_cells, n_latent), qz_var: (n_cells, n_latent), library_size:
        (n_cells,)}``, float32.

    Raises
    ------
    SetupError
        Means and variances of different shapes, a variance not above 0, a library size
        missing, non-numeric, negative or not finite.
    """
    loc = _posterior_array(adata, keys.qzm, adata.n_obs)
    var = _posterior_array(adata, keys.qzv, adata.n_obs)
    if loc.shape != var.shape:
        raise SetupError(f"adata.obsm[{keys.qzm!r}] has shape {loc.shape} but "
                         f"adata.obsm[{keys.qzv!r}] {var.shape}: means and variances of the "
                         "stored posterior must match.")
    if (var <= 0).any():
        raise SetupError(f"adata.obsm[{keys.qzv!r}] holds {int((var <= 0).sum())} variance(s) "
                         "that are not above 0; the stored posterior's variances (scale²) "
                         "must be.")
    column = adata.obs[keys.library]
    if not pd.api.types.is_numeric_dtype(column):
        raise SetupError(f"adata.obs[{keys.library!r}] is not numeric (dtype {column.dtype}); "
                         "with the stored posterior it must hold each cell's observed library "
                         "size.")
    library = column.to_numpy(dtype=np.float64)
    if not np.isfinite(library).all() or (library < 0).any():
        raise SetupError(f"adata.obs[{keys.library!r}] holds NaN, infinite or negative "
                         "library sizes; with the stored posterior it must hold each cell's "
                         "total count (not its log).")
    return {QZ_LOC_FIELD: loc, QZ_VAR_FIELD: var,
            LIBRARY_SIZE_FIELD: library.astype(np.float32)}


def find_keys(adata, stem: str, model_name: str) -> MinifiedKeys:
    """The keys of minified ``adata`` for the model of key stem ``stem`` (current or legacy).

    Raises
    ------
    SetupError
        The type is not ``"latent_posterior_parameters"``, or neither naming has all three
        keys (the message names those present and missing).
    """
    kind = minify_type(adata)
    if kind != LATENT_POSTERIOR:
        raise SetupError(
            f"adata.uns[{MINIFY_TYPE_UNS_KEY!r}] is {kind!r}; pyrovi reads minified data of "
            f"type {LATENT_POSTERIOR!r} only. If the counts are still in adata, delete that "
            f"key (del adata.uns[{MINIFY_TYPE_UNS_KEY!r}]) to use them as ordinary data.")
    candidates = (MinifiedKeys.of(stem), MinifiedKeys.legacy(stem))
    for keys in candidates:
        if len(keys.present(adata)) == 3:
            return keys
    found = [k for keys in candidates for k in keys.present(adata)]
    # X_latent_qzm is where scvi-tools' workflow keeps the user's own copy, not a model's.
    others = sorted(k for k in map(str, adata.obsm) if k.endswith("_latent_qzm")
                    and not k.startswith("X_") and k not in (keys.qzm for keys in candidates))
    raise SetupError(
        f"adata is minified (adata.uns[{MINIFY_TYPE_UNS_KEY!r}] = {kind!r}) but does not "
        f"hold {model_name}'s stored posterior completely: it needs "
        f"{candidates[0].describe()} (or scvi-tools' older {candidates[1].describe()}); "
        f"found {found or 'none of them'}"
        + (f", and the stored posterior of another model ({others})" if others else "")
        + ". Set up the AnnData for the model that minified it, or use the data with "
        "their counts.")


class StoredPosteriorField(DataField):
    """The stored posterior of minified data (minibatch ``qz_loc``, ``qz_var``, ``library_size``).

    A model that can read minified data declares this field in ``setup_anndata``; on data
    that are not minified it records nothing and gives no arrays. Registering it before
    the counts tells the counts field to expect them all zero. The registry keeps the type
    and the keys (``minified_data_type``, ``latent_qzm_key``, ``latent_qzv_key``,
    ``observed_lib_size_key``, all ``None`` for data with counts).

    Parameters
    ----------
    stem
        The model's key stem (``"scvi"``: ``adata.obsm["scvi_latent_qzm"]``...); ``None``
        for a model that cannot read minified data, which are then refused.
    keys
        The keys of registered data (as :meth:`from_registry` rebuilds the field).
    """

    key = QZ_LOC_FIELD
    registry_keys = {"minified_data_type": None, "latent_qzm_key": None,
                     "latent_qzv_key": None, "observed_lib_size_key": None}
    derived = {"is_minified": lambda registry: registry.minified_data_type is not None}

    def __init__(self, stem: str | None = None, keys: MinifiedKeys | None = None):
        self.stem = stem
        self.keys = keys

    def register(self, adata, registry) -> None:
        """Record whether ``adata`` is minified, and where its stored posterior is.

        Also called for new data with a trained model's registry: being minified is a
        property of the data, not of the model.

        Raises
        ------
        SetupError
            Minified data for a model that cannot read them, or keys incomplete or
            inconsistent (see :func:`find_keys`, :func:`read_stored_posterior`).
        """
        for name in self.registry_keys:
            setattr(registry, name, None)
        if not is_minified(adata):
            return
        if self.stem is None:
            raise SetupError(
                f"adata is minified (adata.uns[{MINIFY_TYPE_UNS_KEY!r}] = "
                f"{minify_type(adata)!r}): its counts were replaced by a stored posterior of "
                f"z, which stands in for the counts only in models whose posterior has no "
                f"other per-cell latent (SCVI and LDVAE with the observed library size). "
                f"{registry.model_name} cannot read it; set it up with the raw counts.")
        keys = find_keys(adata, self.stem, registry.model_name)
        read_stored_posterior(adata, keys)
        registry.minified_data_type = LATENT_POSTERIOR
        registry.latent_qzm_key, registry.latent_qzv_key = keys.qzm, keys.qzv
        registry.observed_lib_size_key = keys.library
        self.keys = keys

    def cell_arrays(self, adata) -> dict:
        if self.keys is None:
            return {}
        return read_stored_posterior(adata, self.keys)

    def cell_array(self, adata):
        return self.cell_arrays(adata).get(self.key)

    def location(self) -> str:
        return "adata" if self.keys is None else self.keys.describe()

    def card_row(self, registry) -> dict | None:
        return {"field": "stored posterior (minified data)", "location": self.location(),
                "size": None}

    @classmethod
    def from_registry(cls, registry) -> StoredPosteriorField | None:
        if registry.minified_data_type is None:
            return None
        return cls(keys=MinifiedKeys(registry.latent_qzm_key, registry.latent_qzv_key,
                                     registry.observed_lib_size_key))

    @classmethod
    def read_record(cls, record: dict) -> dict:
        return {k: str(record[k]) for k in cls.registry_keys if record.get(k) is not None}


def stored_posterior_field(fields) -> StoredPosteriorField:
    """The :class:`StoredPosteriorField` among a model's declared ``fields``, or one that
    refuses minified data when the model declares none."""
    return next((f for f in fields if isinstance(f, StoredPosteriorField)),
                StoredPosteriorField(None))
