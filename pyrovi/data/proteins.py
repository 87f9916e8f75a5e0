"""The protein field of multi-modal (CITE-seq) data: counts in ``obsm``, names, checks.

:class:`ProteinField` is the one place that knows how proteins are registered (key,
names, which batch measured which protein), checked on new data and handed to a
minibatch (keyword ``y``); models with proteins add it to their declared fields.

Protein (ADT) counts live in ``adata.obsm[key]``, either as a DataFrame whose columns are
the protein names or as an array whose names are in ``adata.uns[names_key]``. They are
validated like RNA counts (finite, non-negative integers), but a cell may have no protein
counts at all.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovi.data.fields import DataField, SetupError, category_codes
from pyrovi.data.validation import validate_counts

logger = logging.getLogger(__name__)

# Rows turned dense at a time when scanning a dense matrix for non-zeros.
_DENSE_CHUNK_ROWS = 8192


def protein_matrix(adata, key: str):
    """Cells × proteins counts of ``adata.obsm[key]`` (numpy array or scipy sparse).

    Raises
    ------
    SetupError
        If ``key`` is not in ``adata.obsm`` (the message lists the keys there are).
    """
    if key not in adata.obsm:
        raise SetupError(
            f"Protein counts {key!r} are not in adata.obsm (keys: {list(adata.obsm.keys())}). "
            "Store them as adata.obsm[key] (a DataFrame with protein names as columns, or an "
            "array with the names in adata.uns) and pass protein_expression_obsm_key=key."
        )
    values = adata.obsm[key]
    if isinstance(values, pd.DataFrame):
        return values.to_numpy()
    return values if sp.issparse(values) else np.asarray(values)


def read_protein_field(
    adata, key: str, names_uns_key: str | None = None, allow_non_integer: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Validated protein counts and names of ``adata`` (nothing is written).

    Parameters
    ----------
    adata
        AnnData with protein counts in ``obsm[key]``.
    key
        ``obsm`` key of the counts.
    names_uns_key
        ``uns`` key of the names when ``obsm[key]`` is an array (default names
        ``protein_0 ..`` when neither columns nor this key give them).
    allow_non_integer
        Accept non-integer values.

    Returns
    -------
    counts, names
        Dense float32 cells × proteins counts and the protein names.

    Raises
    ------
    SetupError
        Missing key, names or cells that do not match, duplicated names.
    CountDataError
        Negative, NaN, infinite or non-integer counts (the message points at the first).
    """
    matrix = protein_matrix(adata, key)
    values = adata.obsm[key]
    if isinstance(values, pd.DataFrame):
        if not values.index.equals(adata.obs_names):
            raise SetupError(
                f"The rows of adata.obsm[{key!r}] are not the cells of adata (index differs "
                "from adata.obs_names); align it with df.loc[adata.obs_names]."
            )
        names = [str(c) for c in values.columns]
    elif names_uns_key is not None:
        if names_uns_key not in adata.uns:
            raise SetupError(
                f"protein_names_uns_key={names_uns_key!r} is not in adata.uns "
                f"(keys: {list(adata.uns.keys())})."
            )
        names = [str(n) for n in np.asarray(adata.uns[names_uns_key]).ravel()]
    else:
        names = [f"protein_{i}" for i in range(matrix.shape[1])]
    if len(names) != matrix.shape[1]:
        raise SetupError(
            f"{len(names)} protein names for {matrix.shape[1]} columns of adata.obsm[{key!r}]."
        )
    if matrix.shape[1] == 0:
        raise SetupError(f"adata.obsm[{key!r}] has no protein columns.")
    if len(set(names)) != len(names):
        duplicated = pd.Index(names)[pd.Index(names).duplicated()]
        raise SetupError(f"Protein names are not unique (e.g. {list(duplicated[:5])}).")
    dense = matrix.toarray() if sp.issparse(matrix) else matrix
    dense = np.asarray(dense, dtype=np.float32)
    validate_counts(
        dense, source=f"adata.obsm[{key!r}]", obs_names=adata.obs_names, var_names=names,
        allow_non_integer=allow_non_integer, allow_empty_cells=True,
    )
    return dense, names


def check_protein_names(registry, adata) -> None:
    """Check that new data carry the model's proteins, in the model's order.

    ``registry`` is the model's :class:`~pyrovi.data.registry.AnnDataRegistry`.

    Raises
    ------
    SetupError
        Naming the missing and extra proteins and how to fix them.
    """
    _, names = read_protein_field(adata, registry.protein_expression_obsm_key,
                                  allow_non_integer=registry.allow_non_integer)
    if isinstance(adata.obsm[registry.protein_expression_obsm_key], pd.DataFrame):
        expected = registry.protein_names
        if names != expected:
            missing = sorted(set(expected) - set(names))
            extra = sorted(set(names) - set(expected))
            raise SetupError(
                f"The proteins of adata.obsm[{registry.protein_expression_obsm_key!r}] do not "
                f"match the model's: missing {missing[:10]}, extra {extra[:10]}"
                + ("" if missing or extra else " (same proteins, different order)")
                + ". Reorder the columns to the model's proteins "
                "(df[model.protein_names]); a protein not measured can be a zero column."
            )
    elif len(names) != registry.n_proteins:
        raise SetupError(
            f"adata has {len(names)} proteins, the model {registry.n_proteins}."
        )


def _check_batch_codes(batch_codes, n_cells: int, n_batch: int) -> np.ndarray:
    """Return ``batch_codes`` as an int vector after checking its length and range."""
    codes = np.asarray(batch_codes).ravel()
    if codes.shape[0] != n_cells:
        raise ValueError(
            f"batch_codes has {codes.shape[0]} entries but the protein matrix has "
            f"{n_cells} cells."
        )
    if n_batch < 1:
        raise ValueError(f"n_batch must be >= 1, got {n_batch}.")
    if codes.size and not np.issubdtype(codes.dtype, np.integer):
        if not np.all(codes == np.round(codes)):
            raise ValueError("batch_codes must be integer codes.")
    codes = codes.astype(np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= n_batch):
        raise ValueError(
            f"batch_codes must lie in 0..{n_batch - 1}, got values in "
            f"{codes.min()}..{codes.max()}."
        )
    return codes


def _as_matrix(protein_counts):
    """CSC matrix for sparse input (fast column access), a 2-d ndarray otherwise."""
    if sp.issparse(protein_counts):
        return sp.csc_matrix(protein_counts)
    if hasattr(protein_counts, "to_numpy"):  # pandas DataFrame in adata.obsm
        protein_counts = protein_counts.to_numpy()
    matrix = np.asarray(protein_counts)
    if matrix.ndim != 2:
        raise ValueError(f"protein_counts must be 2-d (cells × proteins), got {matrix.shape}.")
    return matrix


def missing_protein_mask(protein_counts, batch_codes: np.ndarray, n_batch: int) -> np.ndarray:
    """Which proteins are measured in which batch.

    A protein whose counts are all zero among the cells of a batch is taken as not measured
    there (the usual encoding of a protein absent from that batch's antibody panel).

    Parameters
    ----------
    protein_counts
        Protein counts, cells × proteins, numpy array or scipy sparse matrix.
    batch_codes
        Integer batch code of each cell, in ``0..n_batch-1``.
    n_batch
        Number of batches.

    Returns
    -------
    numpy.ndarray
        Boolean array of shape ``(n_batch, n_proteins)``, True where the protein has at
        least one non-zero count in the batch. Batches without cells are all True (nothing
        says that a protein is missing there).

    Examples
    --------
    >>> counts = np.array([[1, 0], [2, 0], [0, 3], [1, 1]])
    >>> missing_protein_mask(counts, np.array([0, 0, 1, 1]), 3).tolist()
    [[True, False], [True, True], [True, True]]
    """
    matrix = _as_matrix(protein_counts)
    n_cells, n_proteins = matrix.shape
    codes = _check_batch_codes(batch_codes, n_cells, n_batch)
    # indicator[s, n] = 1 if cell n is in batch s; indicator @ (X != 0) counts non-zeros.
    indicator = sp.csr_matrix(
        (np.ones(n_cells), (codes, np.arange(n_cells))), shape=(n_batch, n_cells))
    if sp.issparse(matrix):
        nonzero = (matrix != 0).astype(np.float64)
        per_batch = np.asarray((indicator @ nonzero).todense())
    else:
        per_batch = np.zeros((n_batch, n_proteins))
        for start in range(0, n_cells, _DENSE_CHUNK_ROWS):
            block = np.asarray(matrix[start : start + _DENSE_CHUNK_ROWS]) != 0
            per_batch += indicator[:, start : start + block.shape[0]] @ block.astype(np.float64)
    mask = per_batch > 0
    mask[np.bincount(codes, minlength=n_batch) == 0] = True
    return mask



def _warn_unmeasured(names, mask, batch_categories, first_batch: int = 0, where: str = "") -> None:
    """Log the proteins each batch from ``first_batch`` on did not measure."""
    for b in range(first_batch, mask.shape[0]):
        if not mask[b].all():
            missing = [n for n, measured in zip(names, mask[b], strict=True) if not measured]
            logger.warning(
                "%d protein(s) are all zero in %sbatch %r and will be treated as missing "
                "there (masked out of the likelihood, imputed by the model): %s",
                len(missing), where, batch_categories[b], missing[:10],
            )


class ProteinField(DataField):
    """Protein counts in ``adata.obsm[key]`` (minibatch ``y``), for multi-modal models.

    Registering validates the counts and names (:func:`read_protein_field`) and records
    the key, the names and which proteins each batch measured (:func:`missing_protein_mask`;
    a protein all zero in a batch is taken as not measured there). Declare it after the
    batch field, whose categories the mask is indexed by. Data from a MuData are first
    flattened (:func:`~pyrovi.data.multimodal.flatten_mudata`) so that the proteins are an
    ``obsm`` entry here too.

    Parameters
    ----------
    obsm_key
        ``obsm`` key of the protein counts.
    names_uns_key
        ``uns`` key of the protein names when ``obsm[obsm_key]`` is an array.
    """

    key = "y"
    is_counts = True
    modality = "protein"
    registry_keys = {"protein_expression_obsm_key": None, "protein_names": [],
                     "protein_batch_mask": []}
    derived = {
        "has_proteins": lambda registry: registry.protein_expression_obsm_key is not None,
        "n_proteins": lambda registry: len(registry.protein_names),
    }

    def __init__(self, obsm_key: str, names_uns_key: str | None = None):
        self.obsm_key = obsm_key
        self.names_uns_key = names_uns_key

    def register(self, adata, registry) -> None:
        proteins, names = read_protein_field(adata, self.obsm_key, self.names_uns_key,
                                             registry.allow_non_integer)
        batch = category_codes(adata, registry.batch_key, registry.batch_categories, "batch_key")
        mask = missing_protein_mask(proteins, batch, registry.n_batch)
        registry.protein_expression_obsm_key = self.obsm_key
        registry.protein_names = names
        registry.protein_batch_mask = mask.tolist()
        _warn_unmeasured(names, mask, registry.batch_categories)

    def check(self, adata, registry) -> None:
        check_protein_names(registry, adata)

    def cell_array(self, adata):
        return protein_matrix(adata, self.obsm_key)

    @property
    def source(self) -> str | None:
        return self.obsm_key

    def setup_arguments(self) -> dict:
        return {"protein_expression_obsm_key": self.obsm_key}

    def card_row(self, registry) -> dict | None:
        return {"field": "proteins", "size": registry.n_proteins, "location": self.location()}

    def location(self) -> str:
        return f"adata.obsm[{self.obsm_key!r}]"

    def observed_counts(self, adata, source: str | None = None, names=None):
        key = source if source is not None else self.obsm_key
        counts = protein_matrix(adata, key)
        stored = adata.obsm[key]
        if names is not None:
            names = [str(n) for n in names]
            if isinstance(stored, pd.DataFrame) and list(stored.columns.astype(str)) != names:
                raise ValueError(f"The proteins of adata.obsm[{key!r}] "
                                 f"({list(stored.columns)}) are not the models' {names}.")
            if counts.shape[1] != len(names):
                raise ValueError(f"adata.obsm[{key!r}] has {counts.shape[1]} columns; the "
                                 f"models have {len(names)} proteins.")
        return counts

    def check_query(self, query, registry) -> None:
        check_protein_names(registry, query)

    def extend_for_query(self, query, reference, extended) -> None:
        """Which proteins the query's new batches measured, from the query's counts."""
        if extended.n_batch <= reference.n_batch:
            return
        batch = category_codes(query, extended.batch_key, extended.batch_categories,
                               "batch_key")
        proteins = protein_matrix(query, extended.protein_expression_obsm_key)
        mask = missing_protein_mask(proteins, batch, extended.n_batch)
        extended.protein_batch_mask = (
            [list(row) for row in reference.protein_batch_mask]
            + mask[reference.n_batch:].tolist()
        )
        for b in range(reference.n_batch, extended.n_batch):
            if not mask[b].all():
                absent = [n for n, m in zip(extended.protein_names, mask[b], strict=True) if not m]
                logger.warning(
                    "%d protein(s) are all zero in query batch %r and will be treated as "
                    "missing there: %s", len(absent), extended.batch_categories[b], absent[:10])

    @classmethod
    def from_registry(cls, registry) -> ProteinField | None:
        if registry.protein_expression_obsm_key is None:
            return None
        return cls(registry.protein_expression_obsm_key)

    @classmethod
    def read_record(cls, record: dict) -> dict:
        entries = super().read_record(record)
        if "protein_expression_obsm_key" in entries:
            entries["protein_expression_obsm_key"] = str(entries["protein_expression_obsm_key"])
        if "protein_names" in entries:
            entries["protein_names"] = [
                str(v) for v in np.asarray(entries["protein_names"], dtype=object).ravel()]
        if "protein_batch_mask" in entries:
            entries["protein_batch_mask"] = [
                [bool(v) for v in np.asarray(row).ravel()] for row in entries["protein_batch_mask"]
            ]
        return entries

    @classmethod
    def summary(cls, registry) -> dict[str, int]:
        return {"n_proteins": registry.n_proteins} if registry.has_proteins else {}
