"""Device-resident copies of registered data, gathered into minibatches by index.

Counts leave AnnData once: :func:`build_cell_tensors` moves the registered matrix and the
per-cell fields to the training device, and :meth:`CellTensors.minibatch` gathers rows there.
Sparse input stays sparse on the device (CSR arrays); only the gathered minibatch is dense.

Every kind of per-cell data is a :class:`CellData`: the training loop asks it for an epoch of
shuffled minibatches (:meth:`CellData.training_batches`) and the posterior utilities for the
cells in order (:meth:`CellData.iter_minibatches`). Counts left on disk (a backed AnnData) get
:class:`~pyrovi.data.streaming.OnDiskCellData` from
:func:`~pyrovi.data.loaders.build_cell_tensors`, which reads them a block at a time behind
the same two methods. This module is the bottom of the loaders: the on-disk loaders build on
it, and :mod:`pyrovi.data.loaders` chooses between them.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping

import numpy as np
import scipy.sparse as sp
import torch

from pyrovi._nonzero_positions import NonzeroPositions
from pyrovi.data.csr import gather_csr_rows

#: What a loader yields: the cells' positions (on the data's device) and the keyword
#: arguments of a model/guide call for them.
Minibatch = tuple[torch.Tensor, dict[str, torch.Tensor | None]]

#: Minibatch field holding the non-zero positions of the counts ``x``
#: (:class:`~pyrovi._nonzero_positions.NonzeroPositions`) when the loader densified them
#: from sparse rows on the CPU, else ``None``. pyrovi's models take it as the keyword
#: argument ``x_nonzero`` and pass it to their count distribution (``nonzero=``); the
#: training loop and the posterior utilities leave it out for a model or guide without
#: that argument (:func:`call_arguments`).
NONZERO_FIELD = "x_nonzero"

#: Minibatch fields of minified data (:mod:`pyrovi.data.minified`): the stored mean and
#: variance of each cell's posterior of ``z``, which the sampling core of
#: :mod:`pyrovi.posterior` draws ``z`` from in place of the guide, and the cell's observed
#: library size, which a model that reads minified data takes as ``library_size`` (its
#: counts, all zero, no longer give it).
QZ_LOC_FIELD = "qz_loc"
QZ_VAR_FIELD = "qz_var"
LIBRARY_SIZE_FIELD = "library_size"

#: Fields that reach only the callables taking them (:func:`call_arguments`): the
#: non-zero positions (a speed hint) and the stored posterior (read by the sampling core,
#: never by a model or guide).
OPTIONAL_FIELDS = (NONZERO_FIELD, QZ_LOC_FIELD, QZ_VAR_FIELD)


def _shared_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor, sharing its memory on the CPU.

    pandas 3 and anndata hand out read-only arrays; torch warns that it cannot protect them,
    but these tensors are only ever read.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array, device=device)


#: Largest count matrix (bytes of float32) that a sparse matrix is densified into.
DENSE_LIMIT_BYTES = 2**30


def dense_is_smaller(matrix) -> bool:
    """Whether the dense float32 form of the sparse ``matrix`` takes no more memory than its
    CSR arrays (int32 column and float32 value per stored entry: at least half the entries
    non-zero), and at most :data:`DENSE_LIMIT_BYTES`."""
    dense_bytes = 4 * matrix.shape[0] * matrix.shape[1]
    return dense_bytes <= min(8 * matrix.nnz, DENSE_LIMIT_BYTES)


class CountMatrix:
    """A cells × features count matrix on a device, dense or CSR, with row gathers.

    Parameters
    ----------
    matrix
        numpy array or scipy sparse matrix (CSC is converted to CSR once; a sparse matrix
        with at least half its entries non-zero is held dense, :func:`dense_is_smaller`).
    device
        Where the tensors live.

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> m = CountMatrix(sp.random(100, 20, density=0.1, format="csr"), "cpu")
    >>> m.gather(torch.tensor([3, 7])).shape
    torch.Size([2, 20])
    """

    def __init__(self, matrix, device: torch.device | str = "cpu"):
        self.shape = tuple(matrix.shape)
        self.device = torch.device(device)
        if sp.issparse(matrix) and dense_is_smaller(matrix):
            # Most entries non-zero (deeply sequenced cells): the dense matrix takes no more
            # memory than the CSR arrays, and a row gather is one index_select instead of
            # index arithmetic over every non-zero.
            matrix = matrix.astype(np.float32).toarray()
        if sp.issparse(matrix):
            csr = matrix.tocsr() if matrix.format != "csr" else matrix
            if not csr.has_canonical_format:
                csr = csr.copy()
                csr.sum_duplicates()
            self.is_sparse = True
            self.indptr = _shared_tensor(csr.indptr.astype(np.int64), self.device)
            # Column indices stay int32 (what scipy stores for < 2**31 features) and the
            # values float32: on the CPU both then share memory with the AnnData's matrix
            # instead of doubling it (1M cells x 2,000 genes at 15% non-zero: 2.4 GB saved).
            self.indices = _shared_tensor(np.asarray(csr.indices, dtype=np.int32), self.device)
            self.data = _shared_tensor(np.asarray(csr.data, dtype=np.float32), self.device)
            if self.device.type == "cpu":
                # On the CPU rows are gathered by numpy index arithmetic on these arrays,
                # the fastest of numpy, scipy's row indexing and torch (benchmarks/RESULTS.md).
                self._host_arrays = (self.indptr.numpy(), self.indices.numpy(),
                                     self.data.numpy())
        else:
            self.is_sparse = False
            self.dense = _shared_tensor(np.asarray(matrix, dtype=np.float32), self.device)

    @property
    def n_obs(self) -> int:
        """Number of rows (cells)."""
        return self.shape[0]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Dense float32 rows ``index`` of the matrix, on the matrix's device.

        Parameters
        ----------
        index
            1-d int64 tensor of row indices on the same device.

        Returns
        -------
        torch.Tensor
            Shape ``(len(index), n_features)``.
        """
        return self.gather_with_nonzero(index)[0]

    def gather_with_nonzero(
        self, index: torch.Tensor
    ) -> tuple[torch.Tensor, NonzeroPositions | None]:
        """:meth:`gather`, with the positions of the rows' non-zero entries where known.

        Returns
        -------
        dense : torch.Tensor
            As :meth:`gather`.
        nonzero : NonzeroPositions or None
            On the CPU, for a sparse matrix (rows gathered on the host); else ``None``.
        """
        if not self.is_sparse:
            return self.dense.index_select(0, index), None
        if self.device.type == "cpu":
            indptr, indices, data = self._host_arrays
            return gather_csr_rows(indptr, indices, data, self.shape[1], index.numpy())
        return gather_csr_rows(self.indptr, self.indices, self.data, self.shape[1], index)


def planned_batch_sizes(n_cells: int, batch_size: int) -> list[int]:
    """Minibatch sizes of an epoch of ``n_cells``: the one rule every loader cuts by.

    ``batch_size`` cells each and the rest last, where a last minibatch of one cell joins
    the previous one (batch norm cannot normalise one cell).
    """
    sizes = [batch_size] * (n_cells // batch_size)
    if n_cells % batch_size:
        sizes.append(n_cells % batch_size)
    if len(sizes) > 1 and sizes[-1] < 2:
        # Pop first: ``sizes[-2] += sizes.pop()`` would add to the first of the last two
        # (the target index is resolved against the shortened list).
        last = sizes.pop()
        sizes[-1] += last
    return sizes


def shuffled_minibatches(
    index: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Shuffle ``index`` (on its device) and cut it into minibatches.

    The sizes are :func:`planned_batch_sizes` (a last minibatch of a single cell is merged
    into the previous one: batch norm cannot normalise one cell).

    Parameters
    ----------
    index
        1-d int64 tensor of cell positions.
    batch_size
        Cells per minibatch.
    generator
        Random generator on ``index``'s device (default: torch's global one, which
        ``train(seed=)`` seeds).
    """
    permuted = index[torch.randperm(index.numel(), device=index.device, generator=generator)]
    sizes = planned_batch_sizes(index.numel(), batch_size)
    return list(torch.split(permuted, sizes if sizes else batch_size))


class CellData(ABC):
    """Per-cell data the training loop and the posterior utilities read (the loader interface).

    Subclasses hold the cells on a device (:class:`ArrayTensors`, :class:`CellTensors`) or
    on disk (:class:`~pyrovi.data.streaming.OnDiskCellData`) and provide ``n_obs``,
    ``device`` and :meth:`minibatch`; the two loaders below default to index gathers.
    """

    n_obs: int
    device: torch.device

    @abstractmethod
    def minibatch(self, index: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of a model/guide call for cells ``index``."""

    def training_batches(
        self, train_index, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Minibatch]:
        """One epoch of training minibatches: every cell of ``train_index`` once, shuffled.

        Parameters
        ----------
        train_index
            Positions of the training cells (1-d tensor on :attr:`device`, or an array).
        batch_size
            Cells per minibatch (a last minibatch of one cell joins the previous one).
        generator
            Random generator (default: torch's global one, which ``train(seed=)`` seeds).

        Yields
        ------
        index, minibatch
            The cells' positions and the model/guide keyword arguments for them.
        """
        index = torch.as_tensor(train_index, dtype=torch.int64, device=self.device)
        for batch in shuffled_minibatches(index, batch_size, generator):
            yield batch, self.minibatch(batch)

    def iter_minibatches(self, indices=None, batch_size: int = 1024) -> Iterator[Minibatch]:
        """Yield ``(index, minibatch)`` over ``indices`` (all cells by default), in order."""
        if indices is None:
            indices = np.arange(self.n_obs)
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64), device=self.device)
        for start in range(0, index.numel(), batch_size):
            chunk = index[start : start + batch_size]
            yield chunk, self.minibatch(chunk)


def per_cell_tensor(value, device: torch.device) -> torch.Tensor | CountMatrix | None:
    """A per-cell array on ``device``, as every loader holds it.

    ``None`` and :class:`CountMatrix` stay as they are, scipy sparse matrices become a
    :class:`CountMatrix`, torch tensors keep their dtype, floating-point numpy arrays become
    float32 and integer ones int64.
    """
    if value is None or isinstance(value, CountMatrix):
        return value
    if sp.issparse(value):
        return CountMatrix(value, device)
    if isinstance(value, torch.Tensor):
        return value.to(device)
    array = np.asarray(value)
    dtype = (torch.float32 if np.issubdtype(array.dtype, np.floating)
             else torch.int64 if np.issubdtype(array.dtype, np.integer) else None)
    return torch.as_tensor(array, dtype=dtype, device=device)


def gather_rows(value, index: torch.Tensor) -> torch.Tensor | None:
    """Rows ``index`` of a per-cell value held by :func:`per_cell_tensor`."""
    if value is None:
        return None
    return value.gather(index) if isinstance(value, CountMatrix) else value.index_select(0, index)


class ArrayTensors(CellData):
    """Per-cell arrays of your own model/guide pair, on one device, gathered by index.

    The counterpart of :class:`CellTensors` for data that did not go through
    ``setup_anndata``: every keyword argument of the model and guide that varies per cell
    (axis 0 indexes cells). Training (:func:`pyrovi.infer.fit`) and the posterior utilities
    (:mod:`pyrovi.posterior`) accept it, or the plain mapping it is built from.

    Parameters
    ----------
    arrays
        ``{argument name: per-cell array}``: numpy arrays, torch tensors, scipy sparse
        matrices (kept sparse, densified per minibatch) or ``None`` (passed as ``None``).
        Floating-point numpy arrays become float32 and integer ones int64; torch tensors
        keep their dtype.
    device
        Where the tensors live (default: the device of the first torch tensor, else CPU).

    Examples
    --------
    >>> import numpy as np
    >>> data = ArrayTensors({"x": np.ones((5, 3)), "group": np.arange(5)})
    >>> data.minibatch(torch.tensor([0, 4]))["group"]
    tensor([0, 4])
    """

    def __init__(self, arrays: Mapping[str, object], device: torch.device | str | None = None):
        if device is None:
            device = next((v.device for v in arrays.values() if isinstance(v, torch.Tensor)),
                          "cpu")
        self._device = torch.device(device)
        self.arrays = {name: per_cell_tensor(value, self._device)
                       for name, value in arrays.items()}
        n_cells = {v.shape[0] for v in self.arrays.values() if v is not None}
        if len(n_cells) != 1:
            raise ValueError(
                "data needs at least one per-cell array, and every array the same number of "
                f"rows (cells on axis 0); got row counts {sorted(n_cells)}."
            )
        self._n_obs = n_cells.pop()

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return self._n_obs

    @property
    def device(self) -> torch.device:
        """The device holding the tensors."""
        return self._device

    def minibatch(self, index: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of a model/guide call for cells ``index``.

        A sparse ``x`` also gives ``x_nonzero`` (:data:`NONZERO_FIELD`), which reaches
        only a model and guide that take it (:func:`call_arguments`).
        """
        batch = {}
        for name, value in self.arrays.items():
            if isinstance(value, CountMatrix):
                batch[name], nonzero = value.gather_with_nonzero(index)
                if name == "x" and value.is_sparse and NONZERO_FIELD not in self.arrays:
                    batch[NONZERO_FIELD] = nonzero
            else:
                batch[name] = gather_rows(value, index)
        return batch


class CellTensors(ArrayTensors):
    """The registered fields of one AnnData on one device, gathered into minibatches.

    Built by :func:`~pyrovi.data.loaders.build_cell_tensors`: one per-cell array for each
    field the model declared, under its minibatch keyword (``x``, ``batch_index``,
    ``labels``, ``cat_covs``, ``cont_covs``, ``size_factor``, and those of plug-in fields).

    Parameters
    ----------
    arrays
        ``{minibatch keyword: per-cell array}``, as for :class:`ArrayTensors`; count-like
        fields as :class:`CountMatrix`.
    informative
        Boolean mask of cells with at least one count, shape ``(n_cells,)`` (numpy).
    device
        Where the tensors live.

    Attributes
    ----------
    counts
        The count matrix (the ``x`` field).
    informative
        As above.

    Each field is also an attribute of its keyword (``data.batch_index``...).
    """

    def __init__(self, arrays: Mapping[str, object], informative: np.ndarray,
                 device: torch.device | str = "cpu"):
        super().__init__(arrays, device)
        self.informative = informative

    @property
    def counts(self) -> CountMatrix:
        """The count matrix (field ``x``)."""
        return self.arrays["x"]

    def __getattr__(self, name):
        arrays = self.__dict__.get("arrays", {})
        if name in arrays:
            return arrays[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


@functools.cache
def _takes_argument(function, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass every field
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def call_arguments(batch: dict, *functions) -> dict:
    """``batch`` without the :data:`OPTIONAL_FIELDS` that not every one of ``functions`` takes.

    The non-zero positions are an optional field: a model/guide pair written without an
    ``x_nonzero`` argument (or ``**kwargs``) gets the minibatch without it, and every
    other field as before. The stored posterior of minified data (``qz_loc``, ``qz_var``)
    is read by the sampling core and reaches no model or guide that does not name it.

    Parameters
    ----------
    batch
        A minibatch (:meth:`CellData.minibatch`).
    *functions
        The callables it is passed to (a model and its guide).

    Returns
    -------
    dict
        ``batch`` itself, or a copy without those fields.
    """
    dropped = [name for name in OPTIONAL_FIELDS if name in batch and not all(
        _takes_argument(getattr(f, "__func__", f), name) for f in functions)]
    if not dropped:
        return batch
    return {name: value for name, value in batch.items() if name not in dropped}


def as_cell_data(data, device: torch.device | str | None = None) -> CellData:
    """Per-cell data in the form the training loop and the posterior utilities read.

    Parameters
    ----------
    data
        :class:`CellData` (registered AnnData in memory or on disk, :class:`ArrayTensors`),
        or a mapping ``{argument name: per-cell array}``.
    device
        Device for a mapping's arrays (ignored for data already on a device).

    Returns
    -------
    CellData
    """
    if isinstance(data, CellData):
        return data
    if isinstance(data, Mapping):
        return ArrayTensors(data, device)
    raise TypeError(
        "data must be pyrovi CellTensors, ArrayTensors or a mapping {argument name: per-cell "
        f"array}}, got {type(data).__name__}."
    )
