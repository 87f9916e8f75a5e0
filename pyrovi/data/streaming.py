"""Training and posterior outputs from counts left on disk, a bounded buffer at a time.

:class:`OnDiskCellData` is the on-disk counterpart of :class:`~pyrovi.data.CellTensors`:
the per-cell fields (batch, labels, covariates, size factors: a few numbers per cell) are on
the device, the count matrix stays in its file and is read in contiguous blocks of rows.

An epoch of training uses **block shuffling**: the file's rows are cut into aligned chunks of
``chunk_size`` rows; the chunks holding training cells are visited in random order,
``n_chunks_in_buffer`` at a time; each chunk is read with one contiguous read (or a few,
when most of its rows are not training cells); the training cells of the buffer are
shuffled together and cut into minibatches, and only a minibatch is densified and moved to
the device. Every training cell is visited once per epoch, as with in-memory shuffling, and
a minibatch mixes cells of ``n_chunks_in_buffer`` random places in the file, so a file
sorted by cell type or donor still gives mixed minibatches. Posterior outputs and
validation read the requested cells in order, a minibatch at a time.

For a zarr store, ``loader_kwargs={"loader": "annbatch"}`` gives
:class:`~pyrovi.data.annbatch_loader.AnnbatchCellData` instead: the same contract, with the
reads done by annbatch (an optional dependency); see
:func:`~pyrovi.data.loaders.on_disk_cell_data`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from functools import cached_property

import numpy as np
import scipy.sparse as sp
import torch

from pyrovi._nonzero_positions import NonzeroPositions
from pyrovi.data.csr import gather_csr_rows
from pyrovi.data.ondisk import OnDiskMatrix
from pyrovi.data.tensors import (
    NONZERO_FIELD,
    CellData,
    CountMatrix,
    Minibatch,
    gather_rows,
    planned_batch_sizes,  # noqa: F401 - the splitter moved to tensors; importable here too
)
from pyrovi.data.validation import cell_totals, informative_cells

logger = logging.getLogger(__name__)

#: Options of the on-disk loaders, as ``train(loader_kwargs=...)`` takes them.
LOADER_OPTIONS = ("loader", "chunk_size", "n_chunks_in_buffer")

#: Values of the ``loader`` option (see :func:`~pyrovi.data.loaders.on_disk_cell_data`).
LOADERS = ("pyrovi", "annbatch")


def dense_rows(block, device: torch.device) -> tuple[torch.Tensor, NonzeroPositions | None]:
    """A block of rows (CSR or dense, host memory) as a dense float32 tensor on ``device``.

    Sparse rows travel as their stored values and are scattered into zeros on the device
    (:func:`~pyrovi.data.csr.gather_csr_rows`), so a GPU receives the non-zeros only; on the
    CPU their non-zero positions come with them.
    """
    if not sp.issparse(block):
        return torch.as_tensor(np.asarray(block, dtype=np.float32)).to(device), None
    block = sp.csr_matrix(block)
    block.sum_duplicates()  # non-canonical CSR on disk: entries of one position add up
    return gather_csr_rows(block.indptr, block.indices, block.data, block.shape[1],
                           np.arange(block.shape[0]), device)


def _stack(blocks: list):
    if len(blocks) == 1:
        return blocks[0]
    return sp.vstack(blocks, format="csr") if sp.issparse(blocks[0]) else np.concatenate(blocks)


class OnDiskCellData(CellData):
    """Registered per-cell data whose counts stay on disk, read a bounded buffer at a time.

    Built by :func:`~pyrovi.data.build_cell_tensors` when the registered count matrix is on
    disk; models and :func:`~pyrovi.infer.train_svi` use it exactly like
    :class:`~pyrovi.data.CellTensors`.

    Host memory holds the per-cell fields, the CSR ``indptr`` (8 bytes a cell) and, while
    training, one buffer: at most ``chunk_size * n_chunks_in_buffer`` rows read per buffer
    (``peak_rows_held`` records the most rows held, buffer plus the partial minibatch carried
    to the next buffer). The device receives one densified minibatch at a time.

    Parameters
    ----------
    matrix
        The count matrix on disk (see :class:`~pyrovi.data.ondisk.OnDiskMatrix`).
    fields
        The other registered fields on ``device``, ``{minibatch keyword: tensor,
        CountMatrix or None}`` (:func:`~pyrovi.data.loaders.cell_fields`), already
        restricted to ``indices``.
    device
        Where minibatches go.
    indices
        Rows of the file these cells are, in order (all rows when ``None``).
    chunk_size
        Rows of the file per chunk: the unit of shuffling and of a contiguous read.
    n_chunks_in_buffer
        Chunks read and shuffled together; minibatches mix cells of that many chunks.

    Attributes
    ----------
    counts
        The :class:`~pyrovi.data.ondisk.OnDiskMatrix` read.
    rows
        File row of each cell, or ``None`` for all rows in order.
    peak_rows_held
        Most rows of counts held in host memory at once by :meth:`training_batches`.

    Examples
    --------
    >>> adata = anndata.read_h5ad("atlas.h5ad", backed="r")  # doctest: +SKIP
    >>> pyrovi.SCVI.setup_anndata(adata, batch_key="donor")  # doctest: +SKIP
    >>> model = pyrovi.SCVI(adata)  # doctest: +SKIP
    >>> model.train(loader_kwargs={"chunk_size": 256, "n_chunks_in_buffer": 16})  # doctest: +SKIP
    """

    def __init__(
        self,
        matrix,
        fields: Mapping[str, torch.Tensor | CountMatrix | None],
        device: torch.device | str = "cpu",
        indices=None,
        chunk_size: int = 256,
        n_chunks_in_buffer: int = 16,
    ):
        for name, value in (("chunk_size", chunk_size),
                            ("n_chunks_in_buffer", n_chunks_in_buffer)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        self.counts = OnDiskMatrix.of(matrix)
        self._device = torch.device(device)
        self.rows = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.fields: dict[str, torch.Tensor | CountMatrix | None] = dict(fields)
        self.chunk_size = int(chunk_size)
        self.n_chunks_in_buffer = int(n_chunks_in_buffer)
        self.peak_rows_held = 0

    @property
    def n_obs(self) -> int:
        """Number of cells."""
        return self.counts.n_obs if self.rows is None else self.rows.size

    @property
    def device(self) -> torch.device:
        """Where minibatches go."""
        return self._device

    @property
    def buffer_rows(self) -> int:
        """Most rows read from the file per buffer of training: ``chunk_size * n_chunks``."""
        return self.chunk_size * self.n_chunks_in_buffer

    @cached_property
    def informative(self) -> np.ndarray:
        """Boolean mask of cells with at least one count (one pass over the file, on first use)."""
        totals = cell_totals(self.counts)
        return informative_cells(totals if self.rows is None else totals[self.rows])

    def _file_rows(self, positions: np.ndarray) -> np.ndarray:
        return positions if self.rows is None else self.rows[positions]

    def _read_sorted(self, rows: np.ndarray):
        """Counts of sorted file ``rows`` (repeats allowed), in that order."""
        unique, inverse = np.unique(rows, return_inverse=True)
        block = self.counts.read_rows(unique)
        return block if unique.size == rows.size else block[inverse]

    def _batch(self, index: torch.Tensor, block) -> dict[str, torch.Tensor | None]:
        x, x_nonzero = dense_rows(block, self._device)
        batch = {"x": x, NONZERO_FIELD: x_nonzero}
        batch.update({name: gather_rows(value, index) for name, value in self.fields.items()})
        return batch

    def minibatch(self, index: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Keyword arguments of a model/guide call for cells ``index`` (read from disk).

        The requested rows are read in file order as a few contiguous ranges and put back
        in the requested order.
        """
        index = torch.as_tensor(index, dtype=torch.int64, device=self._device)
        rows = self._file_rows(index.cpu().numpy())
        order = np.argsort(rows, kind="stable")
        block = self._read_sorted(rows[order])
        if (order != np.arange(order.size)).any():
            back = np.empty_like(order)
            back[order] = np.arange(order.size)
            block = block[back]
        return self._batch(index, block)

    def training_batches(
        self, train_index, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Minibatch]:
        """One epoch of block-shuffled training minibatches (see the module docstring).

        Parameters
        ----------
        train_index
            Positions of the training cells (tensor on any device, or array).
        batch_size
            Cells per minibatch; the sizes are those of in-memory shuffling (a last
            minibatch of one cell joins the previous one).
        generator
            CPU random generator for the chunk order and the shuffles (default: torch's
            global one, which ``train(seed=)`` seeds).

        Yields
        ------
        index, minibatch
            The cells' positions (on :attr:`device`) and the model/guide keyword arguments.
        """
        if isinstance(train_index, torch.Tensor):
            train_index = train_index.cpu().numpy()
        positions = np.asarray(train_index, dtype=np.int64)
        rows = self._file_rows(positions)
        order = np.argsort(rows, kind="stable")
        positions, rows = positions[order], rows[order]
        # Chunks are aligned on the file's rows, not on the training cells, so that a chunk
        # is one stretch of at most chunk_size rows of the file whatever the split.
        chunk_of = rows // self.chunk_size
        starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]]) if rows.size \
            else np.zeros(0, dtype=np.int64)
        ends = np.r_[starts[1:], rows.size]
        chunk_order = torch.randperm(starts.size, generator=generator).numpy()
        sizes = planned_batch_sizes(rows.size, batch_size)
        logger.debug("Block-shuffled epoch: %d cells in %d chunks of %d rows, %d chunks a "
                     "buffer.", rows.size, starts.size, self.chunk_size, self.n_chunks_in_buffer)

        next_size = 0
        carried_positions = np.zeros(0, dtype=np.int64)
        carried = []
        for first in range(0, chunk_order.size, self.n_chunks_in_buffer):
            chunks = chunk_order[first : first + self.n_chunks_in_buffer]
            blocks = carried + [self._read_sorted(rows[starts[c] : ends[c]]) for c in chunks]
            pool = _stack(blocks)
            del blocks
            pool_positions = np.concatenate(
                [carried_positions] + [positions[starts[c] : ends[c]] for c in chunks])
            self.peak_rows_held = max(self.peak_rows_held, pool.shape[0])
            shuffled = torch.randperm(pool_positions.size, generator=generator).numpy()
            used = 0
            # Whole minibatches only: the cells left over wait for the next buffer, so every
            # minibatch has the size in-memory shuffling would give it.
            while next_size < len(sizes) and used + sizes[next_size] <= shuffled.size:
                take = shuffled[used : used + sizes[next_size]]
                index = torch.as_tensor(pool_positions[take], device=self._device)
                yield index, self._batch(index, pool[take])
                used += sizes[next_size]
                next_size += 1
            rest = shuffled[used:]
            carried_positions = pool_positions[rest]
            carried = [pool[rest]] if rest.size else []
            del pool
        if next_size != len(sizes):  # pragma: no cover - the sizes add up to the cells
            raise AssertionError("block shuffling lost cells")
