"""Checks on count matrices: raw, finite, non-negative integers with no empty cells.

Every check runs before anything is written into the user's AnnData, so a failed setup
leaves the object exactly as it was. A matrix left on disk (backed AnnData) is checked in one
pass over bounded blocks of rows, never loaded whole.
"""

from __future__ import annotations

import hashlib

import numpy as np
import scipy.sparse as sp

from pyrovi.data.ondisk import OnDiskMatrix, is_on_disk

# Rows checked at a time for dense input, and stored values at a time for sparse input, so
# that temporaries (masks, rounded copies) stay small next to the matrix.
_DENSE_CHUNK_ROWS = 8192
_SPARSE_CHUNK_VALUES = 2**24


#: Rows of the count matrix whose values the fingerprint hashes (evenly spaced).
FINGERPRINT_ROWS = 64


class CountDataError(ValueError):
    """Raised when a matrix handed to a count model is not a valid count matrix."""


class DataChangedError(CountDataError):
    """Raised when the registered data changed after ``setup_anndata``."""


def _value_blocks(matrix):
    """Yield blocks of stored values (non-zeros for sparse, row chunks for dense)."""
    if sp.issparse(matrix):
        values = np.asarray(matrix.data)
        for start in range(0, values.size, _SPARSE_CHUNK_VALUES):
            yield values[start : start + _SPARSE_CHUNK_VALUES]
        return
    array = np.asarray(matrix) if not hasattr(matrix, "shape") else matrix
    for start in range(0, array.shape[0], _DENSE_CHUNK_ROWS):
        yield np.asarray(array[start : start + _DENSE_CHUNK_ROWS])


def _first_offender(matrix, predicate) -> tuple[int, int, float]:
    """Locate the first (row, column, value) whose value satisfies ``predicate``."""
    if sp.issparse(matrix):
        coo = matrix.tocoo()
        hit = np.flatnonzero(predicate(coo.data))[0]
        return int(coo.row[hit]), int(coo.col[hit]), float(coo.data[hit])
    for start in range(0, matrix.shape[0], _DENSE_CHUNK_ROWS):
        block = np.asarray(matrix[start : start + _DENSE_CHUNK_ROWS])
        rows, cols = np.nonzero(predicate(block))
        if rows.size:
            return start + int(rows[0]), int(cols[0]), float(block[rows[0], cols[0]])
    raise AssertionError("predicate matched no value")  # pragma: no cover


def _scan_on_disk(matrix: OnDiskMatrix, predicates) -> tuple[list, np.ndarray]:
    """One pass over a matrix on disk: the first offender of each predicate, and row totals.

    A pass per check, as for in-memory matrices, would read the file up to four times.
    Offenders are found in row-major storage order, as in memory, so a file gives the same
    error whether it is read backed or loaded. The pass stops early once the first
    predicate (the one reported first) has a hit.

    Returns
    -------
    offenders, totals
        ``(row, column, value)`` or ``None`` per predicate; total counts per row (partial
        when the pass stopped early).
    """
    first: list = [None] * len(predicates)
    totals = np.zeros(matrix.shape[0], dtype=np.float64)
    for start, block in matrix.row_blocks():
        values = block.data if matrix.is_sparse else block
        for i, predicate in enumerate(predicates):
            if first[i] is not None:
                continue
            hits = np.flatnonzero(predicate(values).ravel())
            if not hits.size:
                continue
            if matrix.is_sparse:
                row = int(np.searchsorted(block.indptr, hits[0], side="right")) - 1
                col = int(block.indices[hits[0]])
            else:
                row, col = divmod(int(hits[0]), block.shape[1])
            first[i] = (start + row, col, float(values.ravel()[hits[0]]))
        totals[start : start + block.shape[0]] = np.asarray(
            block.sum(axis=1, dtype=np.float64)).ravel()
        if first and first[0] is not None:
            break
    return first, totals


def _sparse_row_sums(matrix, block_values: int = _SPARSE_CHUNK_VALUES) -> np.ndarray:
    """Row sums in float64, a block of rows (``block_values`` stored values) at a time for CSR.

    scipy sums a sparse matrix's rows as a product with a vector of ones in the result's
    dtype, which first copies every stored value to float64: twice the values of a float32
    matrix at once; and it first sorts the indices of a matrix whose columns were reordered
    (a gene subset), a copy of its own. The stored values of a block of rows are summed
    cumulatively instead (exact for counts), and read at the rows' boundaries.
    """
    if matrix.format != "csr":
        return np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    n_rows, indptr = matrix.shape[0], matrix.indptr
    totals = np.empty(n_rows, dtype=np.float64)
    start = 0
    while start < n_rows:
        stop = int(np.searchsorted(indptr, indptr[start] + block_values, side="right"))
        stop = min(max(stop - 1, start + 1), n_rows)
        first = indptr[start]
        running = np.zeros(indptr[stop] - first + 1, dtype=np.float64)
        np.cumsum(matrix.data[first:indptr[stop]], dtype=np.float64, out=running[1:])
        totals[start:stop] = np.diff(running[indptr[start:stop + 1] - first])
        start = stop
    return totals


def cell_totals(matrix) -> np.ndarray:
    """Total counts per cell (row sums) as a float64 vector, without densifying.

    Parameters
    ----------
    matrix
        Dense array or scipy sparse matrix of shape (cells, genes), or a matrix on disk
        (read in blocks of rows).

    Returns
    -------
    numpy.ndarray
        Vector of length ``matrix.shape[0]``.
    """
    if is_on_disk(matrix):
        return _scan_on_disk(OnDiskMatrix.of(matrix), [])[1]
    if sp.issparse(matrix):
        return _sparse_row_sums(matrix)
    totals = np.empty(matrix.shape[0], dtype=np.float64)
    for start in range(0, matrix.shape[0], _DENSE_CHUNK_ROWS):
        block = np.asarray(matrix[start : start + _DENSE_CHUNK_ROWS], dtype=np.float64)
        totals[start : start + block.shape[0]] = block.sum(axis=1)
    return totals


def validate_counts(
    matrix,
    *,
    source: str,
    obs_names=None,
    var_names=None,
    allow_non_integer: bool = False,
    allow_empty_cells: bool = False,
) -> np.ndarray:
    """Check that ``matrix`` holds raw counts and return the total counts per cell.

    Parameters
    ----------
    matrix
        Dense array or scipy sparse matrix (cells × features), or a matrix on disk (checked
        in one pass over blocks of rows, see :mod:`pyrovi.data.ondisk`).
    source
        How the user refers to this matrix (``"adata.X"``, ``"adata.layers['counts']"``),
        used in error messages.
    obs_names, var_names
        Optional cell and feature names, used to point at the first offending entry.
    allow_non_integer
        Accept non-integer values (for counts on another scale, e.g. ambient-corrected).
    allow_empty_cells
        Accept cells whose counts are all zero.

    Returns
    -------
    numpy.ndarray
        Total counts per cell.

    Raises
    ------
    CountDataError
        On NaN, infinite, negative or (unless allowed) non-integer values, and on
        cells with zero total counts (unless allowed).
    """

    def where(row: int, col: int) -> str:
        cell = obs_names[row] if obs_names is not None else row
        feature = var_names[col] if var_names is not None else col
        return f"cell {cell!r}, feature {feature!r}"

    def non_integer(v):
        return v != np.round(v)

    checks = [
        (lambda v: ~np.isfinite(v), "NaN or infinite values",
         "Remove or impute them before setup; count models need finite counts."),
        (lambda v: v < 0, "negative values",
         "Counts cannot be negative: pass the raw count matrix (e.g. layer='counts'), "
         "not scaled or centred data."),
    ]
    if not allow_non_integer:
        checks.append((
            non_integer, "non-integer values",
            "pyrovi models raw counts; this looks like normalized or log-transformed data. "
            "Register the raw counts instead (e.g. layer='counts', or counts restored from "
            "adata.raw), or pass allow_non_integer=True if you know these values are counts "
            "on another scale.",
        ))
    on_disk = is_on_disk(matrix)
    if on_disk:
        offenders, totals = _scan_on_disk(OnDiskMatrix.of(matrix), [c[0] for c in checks])
    for i, (predicate, what, fix) in enumerate(checks):
        if on_disk:
            offender = offenders[i]
        elif any(predicate(block).any() for block in _value_blocks(matrix)):
            offender = _first_offender(matrix, predicate)
        else:
            offender = None
        if offender is not None:
            row, col, value = offender
            raise CountDataError(
                f"{source} contains {what} (first: {value!r} at {where(row, col)}). {fix}"
            )

    if not on_disk:
        totals = cell_totals(matrix)
    n_empty = int((totals == 0).sum())
    if n_empty and not allow_empty_cells:
        first = np.flatnonzero(totals == 0)[0]
        first_name = obs_names[first] if obs_names is not None else first
        raise CountDataError(
            f"{source} has {n_empty} cell(s) with zero total counts (first: {first_name!r}). "
            "Remove them (e.g. scanpy.pp.filter_cells(adata, min_counts=1)) or pass "
            "drop_empty_cells=True to leave them out of training."
        )
    return totals


# -- fingerprint of the registered data ------------------------------------------------------


def fingerprint_rows(n_obs: int, n_rows: int = FINGERPRINT_ROWS) -> np.ndarray:
    """Positions of the rows a fingerprint hashes: evenly spaced, first and last included."""
    if n_obs == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_obs - 1, min(n_obs, n_rows)).round().astype(np.int64))


def _read_rows(matrix, rows: np.ndarray):
    if is_on_disk(matrix):
        return OnDiskMatrix.of(matrix).read_rows(rows, read_through=0)
    return matrix[rows]


def _stored_values(matrix) -> int | None:
    """Stored non-zeros of a sparse matrix (in memory or on disk), read without a pass."""
    if sp.issparse(matrix):
        return int(matrix.nnz)
    if is_on_disk(matrix):
        on_disk = OnDiskMatrix.of(matrix)
        return int(on_disk.indptr[-1]) if on_disk.is_sparse else None
    return None


def count_fingerprint(matrix) -> dict:
    """A cheap fingerprint of a count matrix, to tell later whether it changed.

    Its shape, the number of stored values (sparse matrices) and a SHA-256 of the values and
    column positions of :data:`FINGERPRINT_ROWS` evenly spaced rows. Computing or checking
    it reads those rows only, so it costs the same for a thousand cells or a million.
    Normalizing, log-transforming, negating or subsetting the matrix changes it; an edit of
    a single value may not (training and outputs check the values they read).

    Parameters
    ----------
    matrix
        Dense array, scipy sparse matrix or matrix on disk (cells × features).

    Returns
    -------
    dict
        ``{"shape": [n_obs, n_vars], "rows_sha256": str}`` and, for sparse matrices,
        ``"stored_values"``.
    """
    rows = fingerprint_rows(matrix.shape[0])
    sample = sp.csr_matrix(_read_rows(matrix, rows), dtype=np.float64)
    sample.sum_duplicates()
    sample.eliminate_zeros()
    digest = hashlib.sha256()
    for array in (sample.indptr.astype(np.int64), sample.indices.astype(np.int64), sample.data):
        digest.update(np.ascontiguousarray(array).tobytes())
    fingerprint = {"shape": [int(n) for n in matrix.shape], "rows_sha256": digest.hexdigest()}
    stored = _stored_values(matrix)
    if stored is not None:  # h5ad cannot store None inside uns
        fingerprint["stored_values"] = stored
    return fingerprint


def check_count_fingerprint(matrix, expected: dict, source: str, setup_call: str) -> None:
    """Raise :class:`DataChangedError` if ``matrix`` no longer matches its fingerprint.

    Parameters
    ----------
    matrix
        The registered count matrix as it is now.
    expected
        :func:`count_fingerprint` at setup.
    source
        How messages name the matrix (``"adata.X"``).
    setup_call
        What the user should run again (``"SCVI.setup_anndata(adata, ...)"``).
    """
    shape = [int(n) for n in matrix.shape]
    redo = (f"If the change was intended, run {setup_call} again (and build the model anew); "
            "otherwise restore the raw counts.")
    if shape != list(expected["shape"]):
        raise DataChangedError(
            f"{source} is {shape[0]} cells x {shape[1]} genes, but was {expected['shape'][0]} x "
            f"{expected['shape'][1]} at setup: cells or genes were subset or added after "
            f"setup_anndata. {redo}")
    now = count_fingerprint(matrix)
    if now.get("stored_values") != expected.get("stored_values") or \
            now["rows_sha256"] != expected["rows_sha256"]:
        raise DataChangedError(
            f"{source} changed after setup_anndata (its values differ from those registered: "
            f"normalized, log-transformed or edited in place?). pyrovi models the raw counts "
            f"registered at setup. {redo}")


def informative_cells(totals: np.ndarray, obs_names=None) -> np.ndarray:
    """Which cells have counts (total > 0), from totals read when training or an output
    reads the counts, refusing values that set-up would not have let through.

    The fingerprint cannot see an edit of a single value; the totals, which training and
    every output compute anyway, can: a NaN, infinite or negative count anywhere makes its
    cell's total so.

    Raises
    ------
    DataChangedError
        A cell's total is NaN, infinite or negative.
    """
    bad = ~np.isfinite(totals) | (totals < 0)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        name = obs_names[first] if obs_names is not None else first
        what = "NaN or infinite" if not np.isfinite(totals[first]) else "negative"
        raise DataChangedError(
            f"{int(bad.sum())} cell(s) hold {what} counts (first: {name!r}), which set-up "
            "would have refused: the counts changed after setup_anndata. Restore the raw "
            "counts, or fix them and run setup_anndata again.")
    return totals > 0
