"""Device-resident copies of registered data, gathered into minibatches by index.

Counts leave AnnData once: :func:`build_cell_tensors` moves the registered matrix and the
per-cell fields to the training device, and :meth:`CellTensors.minibatch` gathers rows there.
Sparse input stays sparse on the device (CSR arrays); only the gathered minibatch is dense.

Every kind of per-cell data is a :class:`CellData`: the training loop asks it for an epoch of
shuffled minibatches (:meth:`CellData.training_batches`) and the posterior utilities for the
cells in order (:meth:`CellData.iter_minibatches`). Counts left on disk (a backed AnnData) get
:class:`~pyrovi.data.streaming.OnDiskCellData` from :func:`build_cell_tensors`, which reads
them a block at a time behind the same two methods.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from pyrovi._nonzero_positions import NonzeroPositions
from pyrovi.data.csr import gather_csr_rows
from pyrovi.data.ondisk import is_on_disk
from pyrovi.data.proteins import protein_matrix
from pyrovi.data.registry import (
    AnnDataRegistry,
    category_codes,
    continuous_values,
    counts_matrix,
    size_factors,
)
from pyrovi.data.validation import cell_totals, informative_cells

#: What a loader yields: the cells' positions (on the data's device) and the keyword
#: arguments of a model/guide call for them.
Minibatch = tuple[torch.Tensor, dict[str, torch.Tensor | NonzeroPositions | None]]

#: Minibatch field holding the non-zero positions of the counts ``x``
#: (:class:`~pyrovi._nonzero_positions.NonzeroPositions`) when the loader densified them
#: from sparse rows on the CPU, else ``None``. pyrovi's models take it as the keyword
#: argument ``x_nonzero`` and pass it to their count distribution (``nonzero=``); the
#: training loop and the posterior utilities leave it out for a model or guide without
#: that argument (:func:`call_arguments`).
NONZERO_FIELD = "x_nonzero"


def _shared_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """``array`` as a tensor, sharing its memory on the CPU.

    pandas 3 and anndata hand out read-only arrays; torch warns that it cannot protect them,
    but these tensors are only ever read.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.as_tensor(array, device=device)


class CountMatrix:
    """A cells × features count matrix on a device, dense or CSR, with row gathers.

    Parameters
    ----------
    matrix
        numpy array or scipy sparse matrix (CSC is converted to CSR once).
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


def shuffled_minibatches(
    index: torch.Tensor, batch_size: int, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """Shuffle ``index`` (on its device) and cut it into minibatches.

    A last minibatch of a single cell is merged into the previous one: batch norm cannot
    normalise one cell.

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
    batches = list(torch.split(permuted, batch_size))
    if len(batches) > 1 and batches[-1].numel() < 2:
        batches[-2] = torch.cat(batches[-2:])
        batches.pop()
    return batches


class CellData(ABC):
    """Per-cell data the training loop and the posterior utilities read (the loader interface).

    Subclasses hold the cells on a device (:class:`CellTensors`, :class:`ArrayTensors`) or
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


@dataclass
class CellTensors(CellData):
    """All registered per-cell data of one AnnData on one device.

    Attributes
    ----------
    counts
        The count matrix.
    batch_index, labels
        int64 codes, shape ``(n_cells,)``.
    cat_covs
        int64 codes, shape ``(n_cells, n_categorical_covariates)`` or ``None``.
    cont_covs
        float32, shape ``(n_cells, n_continuous_covariates)`` or ``None``.
    size_factor
        float32 positive size factors, shape ``(n_cells,)``, or ``None``.
    informative
        Boolean mask of cells with at least one count, shape ``(n_cells,)`` (numpy).
    protein
        Protein counts (multi-modal data), or ``None``.
    """

    counts: CountMatrix
    batch_index: torch.Tensor
    labels: torch.Tensor
    cat_covs: torch.Tensor | None
    cont_covs: torch.Tensor | None
    size_factor: torch.Tensor | None
    informative: np.ndarray
    protein: CountMatrix | None = None

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return self.counts.n_obs

    @property
    def device(self) -> torch.device:
        """The device holding the tensors."""
        return self.counts.device

    def minibatch(self, index: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of a model/guide call for cells ``index``.

        Returns
        -------
        dict
            ``x``, ``x_nonzero`` (:data:`NONZERO_FIELD`), ``batch_index``, ``labels``,
            ``cat_covs``, ``cont_covs``, ``size_factor``, and ``y`` (protein counts) for
            multi-modal data.
        """

        def rows(t):
            return None if t is None else t.index_select(0, index)

        x, x_nonzero = self.counts.gather_with_nonzero(index)
        batch = {
            "x": x,
            NONZERO_FIELD: x_nonzero,
            "batch_index": rows(self.batch_index),
            "labels": rows(self.labels),
            "cat_covs": rows(self.cat_covs),
            "cont_covs": rows(self.cont_covs),
            "size_factor": rows(self.size_factor),
        }
        if self.protein is not None:
            batch["y"] = self.protein.gather(index)
        return batch


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
        self.arrays: dict[str, torch.Tensor | CountMatrix | None] = {}
        for name, value in arrays.items():
            if value is None or isinstance(value, CountMatrix):
                self.arrays[name] = value
            elif sp.issparse(value):
                self.arrays[name] = CountMatrix(value, self._device)
            elif isinstance(value, torch.Tensor):
                self.arrays[name] = value.to(self._device)
            else:
                array = np.asarray(value)
                dtype = (torch.float32 if np.issubdtype(array.dtype, np.floating)
                         else torch.int64 if np.issubdtype(array.dtype, np.integer) else None)
                self.arrays[name] = torch.as_tensor(array, dtype=dtype, device=self._device)
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
            if value is None:
                batch[name] = None
            elif isinstance(value, CountMatrix):
                batch[name], nonzero = value.gather_with_nonzero(index)
                if name == "x" and value.is_sparse and NONZERO_FIELD not in self.arrays:
                    batch[NONZERO_FIELD] = nonzero
            else:
                batch[name] = value.index_select(0, index)
        return batch


@functools.cache
def _takes_argument(function, name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass every field
        return True
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in parameters)


def call_arguments(batch: dict, *functions) -> dict:
    """``batch`` without :data:`NONZERO_FIELD` unless every one of ``functions`` takes it.

    The non-zero positions are an optional field: a model/guide pair written without an
    ``x_nonzero`` argument (or ``**kwargs``) gets the minibatch without it, and every
    other field as before.

    Parameters
    ----------
    batch
        A minibatch (:meth:`CellData.minibatch`).
    *functions
        The callables it is passed to (a model and its guide).

    Returns
    -------
    dict
        ``batch`` itself, or a copy without the field.
    """
    if NONZERO_FIELD not in batch or all(
            _takes_argument(getattr(f, "__func__", f), NONZERO_FIELD) for f in functions):
        return batch
    return {name: value for name, value in batch.items() if name != NONZERO_FIELD}


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


def cell_fields(adata, registry: AnnDataRegistry, device: torch.device | str = "cpu",
                indices=None) -> dict[str, torch.Tensor | CountMatrix | None]:
    """The registered per-cell fields of ``adata`` other than the counts, on ``device``.

    Parameters
    ----------
    adata
        AnnData registered with ``registry``.
    registry
        The registry describing which fields to read.
    device
        Target device.
    indices
        Only these cells (in this order); all cells when ``None``. The fields are read for
        every cell and then subset, so that ``adata`` itself is never sliced (a slice of a
        backed AnnData would read its counts).

    Returns
    -------
    dict
        ``batch_index``, ``labels``, ``cat_covs``, ``cont_covs``, ``size_factor`` (tensors or
        ``None``) and ``protein`` (:class:`CountMatrix` or ``None``).
    """
    device = torch.device(device)
    rows = slice(None) if indices is None else np.asarray(indices)

    def as_tensor(array, dtype):
        return torch.as_tensor(np.ascontiguousarray(array[rows]), dtype=dtype, device=device)

    batch = category_codes(adata, registry.batch_key, registry.batch_categories, "batch_key")
    labels_key = registry.labels_key if registry.labels_key in adata.obs.columns else None
    labels = category_codes(adata, labels_key, registry.label_categories, "labels_key")
    cat_covs = None
    if registry.categorical_covariate_keys:
        cat_covs = as_tensor(
            np.stack(
                [
                    category_codes(adata, k, registry.covariate_categories[k],
                                   "categorical_covariate_keys")
                    for k in registry.categorical_covariate_keys
                ],
                axis=1,
            ),
            torch.int64,
        )
    cont_covs = None
    if registry.continuous_covariate_keys:
        cont_covs = as_tensor(
            continuous_values(adata, registry.continuous_covariate_keys,
                              "continuous_covariate_keys"),
            torch.float32,
        )
    size_factor = None
    if registry.size_factor_key is not None:
        size_factor = as_tensor(size_factors(adata, registry.size_factor_key), torch.float32)
    protein = None
    if registry.has_proteins:
        protein = CountMatrix(
            protein_matrix(adata, registry.protein_expression_obsm_key)[rows], device)
    return {
        "batch_index": as_tensor(batch, torch.int64),
        "labels": as_tensor(labels, torch.int64),
        "cat_covs": cat_covs,
        "cont_covs": cont_covs,
        "size_factor": size_factor,
        "protein": protein,
    }


def build_cell_tensors(
    adata,
    registry: AnnDataRegistry,
    device: torch.device | str = "cpu",
    indices=None,
    loader_kwargs: Mapping | None = None,
) -> CellData:
    """The registered data of ``adata`` on ``device``: moved there once, or left on disk.

    Parameters
    ----------
    adata
        AnnData registered with ``registry``.
    registry
        The registry describing which fields to read.
    device
        Target device.
    indices
        Only these cells (in this order); all cells when ``None``.
    loader_kwargs
        Options of the on-disk loader (``loader``, ``chunk_size``, ``n_chunks_in_buffer``,
        see :func:`~pyrovi.data.streaming.on_disk_cell_data`); no effect on data in memory.

    Returns
    -------
    CellTensors or OnDiskCellData
        :class:`CellTensors` when the counts are in memory; when they are on disk (a backed
        AnnData, see :func:`~pyrovi.data.read_ondisk`), an
        :class:`~pyrovi.data.streaming.OnDiskCellData` that reads them a block at a time.
    """
    matrix = counts_matrix(adata, registry.layer)
    if is_on_disk(matrix):
        from pyrovi.data.streaming import on_disk_cell_data  # streaming imports this module

        if indices is not None:
            indices = np.asarray(indices)
            if indices.dtype == bool:
                indices = np.flatnonzero(indices)
        return on_disk_cell_data(matrix, cell_fields(adata, registry, device, indices),
                                 device, indices, **(loader_kwargs or {}))
    if indices is not None:
        indices = np.asarray(indices)
        adata = adata[indices]
        matrix = counts_matrix(adata, registry.layer)
    fields = cell_fields(adata, registry, device)
    return CellTensors(
        counts=CountMatrix(matrix, device),
        informative=informative_cells(cell_totals(matrix), adata.obs_names),
        **fields,
    )
