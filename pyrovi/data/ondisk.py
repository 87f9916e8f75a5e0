"""Count matrices left on disk: lazy AnnData reading and contiguous row reads.

An atlas that does not fit in memory stays in its file. :func:`read_ondisk` opens an
``.h5ad`` file or a ``.zarr`` store with the small tables (``obs``, ``var``, ``uns``,
``obsm``, ``varm``) in memory and the count matrices (``X`` and every layer) on disk;
``anndata.read_h5ad(path, backed="r")`` works as well (it leaves only ``X`` on disk).
:class:`OnDiskMatrix` reads contiguous row ranges of such a matrix, dense or CSR; it is the
only code in pyrovi that touches the file, so that everything else (validation, training,
posterior outputs) sees bounded blocks of rows.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import anndata
import h5py
import numpy as np
import scipy.sparse as sp

logger = logging.getLogger(__name__)

try:  # anndata >= 0.11
    from anndata.io import read_elem, sparse_dataset
except ImportError:  # pragma: no cover - anndata 0.10
    from anndata.experimental import read_elem, sparse_dataset

#: Gaps between wanted rows smaller than this many bytes are read through rather than
#: skipped: one more read costs about as much as reading this much data (see "Costs behind
#: constants" in ``benchmarks/RESULTS.md``), so skipping a small gap would be slower.
READ_THROUGH_BYTES = 64 * 1024

#: Stored values per block of a pass over a whole matrix on disk (count validation, cell
#: totals, differential expression's count summaries). Each block is a fresh copy (values,
#: column indices, then masks) rather than a view, so it is kept small: 2M values are
#: about 16 MB read, some 50 MB with the temporaries.
PASS_BLOCK_VALUES = 2**21


def _is_dense_array(matrix) -> bool:
    if isinstance(matrix, h5py.Dataset):
        return True
    try:
        import zarr
    except ImportError:  # pragma: no cover - zarr comes with anndata
        return False
    return isinstance(matrix, zarr.Array)


def _is_sparse_dataset(matrix) -> bool:
    # anndata's backed CSR/CSC datasets (``anndata.abc.CSRDataset`` from 0.11 on): told
    # apart by their storage group rather than by a class that moved between versions.
    return hasattr(matrix, "group") and getattr(matrix, "format", None) in ("csr", "csc")


def is_on_disk(matrix) -> bool:
    """Whether ``matrix`` is a count matrix left on disk (read a block of rows at a time).

    True for an :class:`OnDiskMatrix`, anndata's backed sparse datasets (``X`` of
    ``read_h5ad(..., backed="r")`` or of :func:`read_ondisk`), and dense ``h5py`` datasets or
    ``zarr`` arrays.
    """
    return isinstance(matrix, OnDiskMatrix) or _is_sparse_dataset(matrix) or _is_dense_array(
        matrix
    )


class OnDiskMatrix:
    """Contiguous row reads of a cells × features matrix stored in an h5ad file or zarr store.

    CSR matrices are read from their ``data``/``indices`` arrays directly (about 50x less
    overhead per read than slicing anndata's sparse dataset); their ``indptr`` (one int64
    per cell) is read into memory once. Dense matrices are sliced by rows.

    Parameters
    ----------
    matrix
        An anndata backed CSR dataset, a 2-d ``h5py.Dataset`` or ``zarr.Array``, or an
        :class:`OnDiskMatrix` (returned as is by :meth:`of`).

    Raises
    ------
    ValueError
        For CSC storage: a row of a CSC matrix is spread over the whole file.
    TypeError
        For anything else.

    Examples
    --------
    >>> adata = anndata.read_h5ad("atlas.h5ad", backed="r")  # doctest: +SKIP
    >>> OnDiskMatrix(adata.X).read(0, 256)  # rows 0..255, one contiguous read  # doctest: +SKIP
    """

    def __init__(self, matrix):
        self.shape = tuple(int(n) for n in matrix.shape)
        if _is_sparse_dataset(matrix):
            if matrix.format != "csr":
                raise ValueError(
                    "The count matrix is stored on disk as CSC, whose rows (cells) cannot be "
                    "read without reading the whole matrix. Rewrite it as CSR once, e.g. "
                    "adata = anndata.read_h5ad(path); adata.X = adata.X.tocsr(); "
                    "adata.write_h5ad(path_csr) (in chunks with anndata.experimental."
                    "concat_on_disk if it does not fit in memory)."
                )
            group = matrix.group
            self.is_sparse = True
            self._data = group["data"]
            self._indices = group["indices"]
            self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
            self.dtype = np.dtype(self._data.dtype)
            stored = int(self.indptr[-1])
            per_value = self.dtype.itemsize + np.dtype(self._indices.dtype).itemsize
            self.bytes_per_row = per_value * stored / max(self.shape[0], 1)
        elif _is_dense_array(matrix) and len(matrix.shape) == 2:
            self.is_sparse = False
            self._dense = matrix
            self.dtype = np.dtype(matrix.dtype)
            self.bytes_per_row = float(self.dtype.itemsize * self.shape[1])
        else:
            raise TypeError(
                "Expected a count matrix on disk (anndata backed CSR dataset, h5py dataset or "
                f"zarr array), got {type(matrix).__name__}."
            )

    @classmethod
    def of(cls, matrix) -> OnDiskMatrix:
        """``matrix`` itself if it is an :class:`OnDiskMatrix`, else one reading it."""
        return matrix if isinstance(matrix, OnDiskMatrix) else cls(matrix)

    @property
    def n_obs(self) -> int:
        """Number of rows (cells)."""
        return self.shape[0]

    @property
    def read_through_rows(self) -> int:
        """Largest gap (in rows) between wanted rows that a read covers instead of skipping."""
        return int(READ_THROUGH_BYTES // max(self.bytes_per_row, 1.0))

    def read(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Rows ``start`` to ``stop - 1``, in one contiguous read.

        Returns
        -------
        scipy.sparse.csr_matrix or numpy.ndarray
            ``(stop - start, n_features)``, in the stored dtype.
        """
        if not self.is_sparse:
            return np.asarray(self._dense[start:stop])
        low, high = int(self.indptr[start]), int(self.indptr[stop])
        return sp.csr_matrix(
            (np.asarray(self._data[low:high]), np.asarray(self._indices[low:high]),
             self.indptr[start : stop + 1] - low),
            shape=(stop - start, self.shape[1]),
        )

    def read_rows(self, rows: np.ndarray, read_through: int | None = None):
        """Rows ``rows`` (sorted, unique), read as a few contiguous ranges.

        Parameters
        ----------
        rows
            Sorted unique row positions.
        read_through
            Largest gap between wanted rows read through in one range (default
            :attr:`read_through_rows`).

        Returns
        -------
        scipy.sparse.csr_matrix or numpy.ndarray
            The rows, in the order of ``rows``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if read_through is None:
            read_through = self.read_through_rows
        blocks = []
        for start, stop, lo, hi in contiguous_ranges(rows, read_through):
            block = self.read(start, stop)
            # A range with gaps holds rows nobody asked for: keep only the wanted ones.
            blocks.append(block if hi - lo == stop - start else block[rows[lo:hi] - start])
        if not blocks:
            return (sp.csr_matrix((0, self.shape[1]), dtype=self.dtype) if self.is_sparse
                    else np.zeros((0, self.shape[1]), dtype=self.dtype))
        if len(blocks) == 1:
            return blocks[0]
        return sp.vstack(blocks, format="csr") if self.is_sparse else np.concatenate(blocks)

    def row_blocks(
        self, max_values: int | None = None
    ) -> Iterator[tuple[int, sp.csr_matrix | np.ndarray]]:
        """Yield ``(first row, block)`` over the whole matrix, in order.

        Each block holds at most ``max_values`` stored values (default
        :data:`PASS_BLOCK_VALUES`; at least one row), so that a pass over the file
        (validation, totals) holds one bounded block at a time.
        """
        if max_values is None:
            max_values = PASS_BLOCK_VALUES
        n_rows = self.shape[0]
        start = 0
        while start < n_rows:
            if self.is_sparse:
                # Last row whose values still fit, found on the in-memory indptr.
                limit = self.indptr[start] + max_values
                stop = int(np.searchsorted(self.indptr, limit, side="right")) - 1
            else:
                stop = start + max_values // max(self.shape[1], 1)
            stop = min(max(stop, start + 1), n_rows)
            yield start, self.read(start, stop)
            start = stop


def contiguous_ranges(rows: np.ndarray, read_through: int = 0):
    """Cover sorted unique ``rows`` by contiguous ranges, bridging gaps of ``read_through`` rows.

    Parameters
    ----------
    rows
        Sorted unique row positions.
    read_through
        Largest number of unwanted rows between two wanted ones that stay in one range.

    Returns
    -------
    list of tuple
        ``(start, stop, lo, hi)``: file rows ``start..stop-1`` hold ``rows[lo:hi]``.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > read_through + 1) + 1
    firsts = np.concatenate([[0], breaks])
    lasts = np.concatenate([breaks, [rows.size]])
    return [(int(rows[lo]), int(rows[hi - 1]) + 1, int(lo), int(hi))
            for lo, hi in zip(firsts, lasts, strict=True)]


def _lazy_matrix(element):
    """A matrix element of the store left on disk: a backed sparse dataset or the array."""
    encoding = element.attrs.get("encoding-type", "")
    if encoding in ("csr_matrix", "csc_matrix"):
        return sparse_dataset(element)
    if _is_dense_array(element):
        return element
    return read_elem(element)  # e.g. a categorical or a dataframe-like layer: small, eager


def read_ondisk(path: str | os.PathLike) -> anndata.AnnData:
    """Open an ``.h5ad`` file or ``.zarr`` store with its count matrices left on disk.

    ``obs``, ``var``, ``uns``, ``obsm`` and ``varm`` (per-cell and per-gene tables, small
    next to the counts) are read into memory; ``X`` and every layer stay on disk and are read
    a block of rows at a time by training and the posterior outputs. ``obsp``, ``varp`` and
    ``raw`` are not read. The file is opened read-only: nothing is ever written to it
    (``setup_anndata`` stores its registry in the in-memory ``uns``).

    For an ``.h5ad`` file, ``anndata.read_h5ad(path, backed="r")`` works too, but reads the
    layers into memory; use this function when the counts are in a layer, and for zarr
    stores (anndata has no backed mode for zarr).

    Parameters
    ----------
    path
        An ``.h5ad`` file or a ``.zarr`` directory, as written by ``AnnData.write_h5ad``
        or ``AnnData.write_zarr``. CSR or dense matrices (CSC cannot be read by rows).

    Returns
    -------
    anndata.AnnData
        With ``X`` and ``layers`` on disk (``anndata`` backed sparse datasets, or h5py/zarr
        arrays for dense matrices).

    Examples
    --------
    >>> adata = pyrovi.data.read_ondisk("atlas.zarr")  # doctest: +SKIP
    >>> pyrovi.SCVI.setup_anndata(adata, batch_key="donor")  # doctest: +SKIP
    >>> pyrovi.SCVI(adata).train(loader_kwargs={"chunk_size": 256})  # doctest: +SKIP
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        import zarr

        store = zarr.open_group(path, mode="r")
    else:
        store = h5py.File(path, "r")

    def members(key) -> dict:  # by keys(): zarr 3 groups have no items()
        return {k: store[key][k] for k in store[key].keys()} if key in store else {}

    def tables(key):
        return {k: read_elem(v) for k, v in members(key).items()}

    def has_members(key):  # an empty element may be stored as a group or as an array
        return key in store and bool(list(getattr(store[key], "keys", list)()))

    left_out = [key for key in ("obsp", "varp", "raw") if has_members(key)]
    if left_out:
        logger.info("read_ondisk leaves %s of %s unread.", left_out, path)
    layers = {k: _lazy_matrix(v) for k, v in members("layers").items()}
    return anndata.AnnData(
        X=_lazy_matrix(store["X"]) if "X" in store else None,
        obs=read_elem(store["obs"]),
        var=read_elem(store["var"]),
        uns=read_elem(store["uns"]) if "uns" in store else {},
        obsm=tables("obsm"),
        varm=tables("varm"),
        layers=layers,
    )
