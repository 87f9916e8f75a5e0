"""Counts in a zarr store read through `annbatch <https://annbatch.readthedocs.io>`_'s loader.

annbatch (the scverse loader for AnnData stores that do not fit in memory, Python >= 3.12,
``pip install annbatch``) reads rows of a zarr-backed CSR matrix or dense zarr array: a
*load request* names the rows to fetch, annbatch fetches all of them with one concurrent
(asyncio) zarr selection into one preallocated CSR buffer, and yields the buffer's
*splits* as minibatches. It cannot read h5ad files (nor CSC matrices).

:class:`AnnbatchCellData` keeps pyrovi's minibatch contract and lets annbatch do the
reading: this module decides which rows make up each buffer and each minibatch (the block
shuffling of :mod:`pyrovi.data.streaming`, drawn from torch's generator) and hands that
plan to annbatch's :class:`annbatch.Loader` as a custom sampler. annbatch's own
:class:`~annbatch.samplers.RandomSampler` is not used because it draws from one contiguous
range of the store with a numpy generator, while training reads an arbitrary split of
cells, must honour ``pyro.set_rng_seed`` and checkpoint resumption, and must cut the epoch
into the minibatch sizes of in-memory shuffling.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import numpy as np
import torch

from pyrovi.data.ondisk import _is_dense_array, _is_sparse_dataset
from pyrovi.data.streaming import OnDiskCellData
from pyrovi.data.tensors import CountMatrix, Minibatch, planned_batch_sizes

INSTALL_HINT = "pip install annbatch"


def annbatch_available() -> bool:
    """Whether annbatch can be imported (it needs Python >= 3.12)."""
    try:
        import annbatch  # noqa: F401
    except ImportError:
        return False
    return True


def _require_annbatch():
    try:
        import annbatch
    except ImportError as error:
        raise ImportError(
            "The annbatch loader needs the annbatch package (Python >= 3.12): "
            f"`{INSTALL_HINT}`, or `pip install pyrovi[annbatch]`. Without it, counts on "
            "disk are read by pyrovi's own loader (loader_kwargs={'loader': 'pyrovi'})."
        ) from error
    return annbatch


def annbatch_can_read(matrix) -> bool:
    """Whether annbatch can read ``matrix`` a block of rows at a time.

    True for a CSR matrix stored in a zarr store (anndata's backed sparse dataset, as
    :func:`~pyrovi.data.read_ondisk` opens it) and for a dense 2-d ``zarr.Array``; false
    for h5ad files (backed or not), CSC storage and matrices in memory.
    """
    if _is_sparse_dataset(matrix):
        return matrix.format == "csr" and getattr(matrix, "backend", None) == "zarr"
    import zarr  # comes with anndata

    return isinstance(matrix, zarr.Array) and len(matrix.shape) == 2


def why_annbatch_cannot_read(matrix) -> str:
    """A sentence saying why annbatch cannot read ``matrix`` (see :func:`annbatch_can_read`)."""
    if _is_sparse_dataset(matrix) and matrix.format != "csr":
        return "the matrix is stored as CSC, whose rows cannot be read without the whole matrix"
    if _is_sparse_dataset(matrix) or _is_dense_array(matrix):
        return ("annbatch reads zarr stores only, not h5ad files; convert once with "
                "anndata.read_h5ad(path, backed='r').write_zarr(...) or open the zarr store "
                "with pyrovi.data.read_ondisk")
    return f"the matrix is a {type(matrix).__name__}, not a zarr array or zarr CSR dataset"


@functools.cache
def _plan_sampler_class():
    """The :class:`annbatch.abc.Sampler` replaying a precomputed plan (defined on first use,
    so that importing pyrovi does not import annbatch)."""
    annbatch = _require_annbatch()

    class PlanSampler(annbatch.abc.Sampler):
        """Yields the load requests of a plan: ``(rows to read, splits into them)``."""

        def __init__(self, plan: list[tuple[np.ndarray, list[np.ndarray]]], batch_size: int):
            self._plan = plan
            self._batch_size = batch_size

        @property
        def batch_size(self) -> int:
            return self._batch_size

        @property
        def shuffle(self) -> bool:
            # The splits are given with every request; annbatch never shuffles on its own.
            return False

        def n_batches(self, n_obs: int) -> int:
            return sum(len(splits) for _, splits in self._plan)

        def validate(self, n_obs: int) -> None:
            if any(rows.size and rows.max() >= n_obs for rows, _ in self._plan):
                raise ValueError(f"The plan reads rows beyond the store's {n_obs} rows.")

        def _sample(self, n_obs: int):
            for rows, splits in self._plan:
                yield {"requests": rows, "splits": splits}

    return PlanSampler


def _rows_to_read(wanted: np.ndarray, read_through: int, chunk_size: int | None) -> np.ndarray:
    """The file rows a buffer reads to get the sorted distinct rows ``wanted``.

    Gaps of at most ``read_through`` rows between wanted rows are read through, but not
    across the border of two chunks of ``chunk_size`` rows (training reads chunk by chunk,
    as :class:`~pyrovi.data.OnDiskCellData` does); ``None``: no chunk borders. zarr
    decodes a compressed chunk once per contiguous range that touches it, so reading a few
    unwanted rows is much cheaper than cutting the selection at every gap (an epoch of a
    90% training split took five to ten times longer cut at every gap).
    """
    if wanted.size == 0:
        return wanted
    new_range = np.diff(wanted) > read_through + 1
    if chunk_size is not None:
        new_range |= (wanted[1:] // chunk_size) != (wanted[:-1] // chunk_size)
    firsts = wanted[np.r_[True, new_range]]
    lengths = wanted[np.r_[new_range, True]] - firsts + 1
    # Every range's rows in one array: the range's first row plus the offset inside it.
    return np.repeat(firsts - np.cumsum(np.r_[0, lengths[:-1]]), lengths) \
        + np.arange(lengths.sum())


class AnnbatchCellData(OnDiskCellData):
    """Registered per-cell data whose counts stay in a zarr store, read by annbatch.

    The same data, minibatch contract and options as :class:`~pyrovi.data.OnDiskCellData`
    (which it extends: per-cell fields on the device, ``informative``, single
    :meth:`minibatch` reads), with the epoch's buffers and the in-order passes
    (validation, posterior outputs) read by :class:`annbatch.Loader`: each buffer is one
    concurrent zarr selection of its rows. Built by
    :func:`~pyrovi.data.build_cell_tensors` for a zarr store when
    ``loader_kwargs={"loader": "annbatch"}``; worth it for zarr stores as anndata writes
    them (large chunks), which annbatch measured faster to read than pyrovi's reader (see
    :func:`~pyrovi.data.loaders.on_disk_cell_data`).

    An epoch of training: the chunks of ``chunk_size`` file rows that hold training cells
    are visited in random order; their training cells, in that order, are cut into buffers
    of ``n_chunks_in_buffer * chunk_size // batch_size`` minibatches (at least one); the
    cells of a buffer are shuffled together and split into the minibatch sizes of
    in-memory shuffling (a last minibatch of one cell joins the previous one). Every
    training cell comes once per epoch; the order is drawn from torch's generator, so
    ``train(seed=)`` reproduces it.

    Parameters
    ----------
    matrix
        The count matrix in a zarr store: anndata's backed CSR dataset or a 2-d
        ``zarr.Array`` (see :func:`annbatch_can_read`).
    fields, device, indices, chunk_size, n_chunks_in_buffer
        As for :class:`~pyrovi.data.OnDiskCellData`.

    Attributes
    ----------
    peak_rows_held
        Most rows of counts one buffer read (the training cells of the buffer and the rows
        read through between them).

    Raises
    ------
    ImportError
        annbatch is not installed.
    TypeError
        annbatch cannot read ``matrix`` (an h5ad file, CSC storage, a matrix in memory).

    Examples
    --------
    >>> adata = pyrovi.data.read_ondisk("atlas.zarr")  # doctest: +SKIP
    >>> pyrovi.SCVI.setup_anndata(adata, batch_key="donor")  # doctest: +SKIP
    >>> pyrovi.SCVI(adata).train(loader_kwargs={"loader": "annbatch"})  # doctest: +SKIP
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
        _require_annbatch()
        if not annbatch_can_read(matrix):
            raise TypeError(f"annbatch cannot read this count matrix: "
                            f"{why_annbatch_cannot_read(matrix)}.")
        super().__init__(matrix, fields, device, indices, chunk_size, n_chunks_in_buffer)
        self._store_matrix = matrix

    def _read(self, buffers: list[list[np.ndarray]], batch_size: int,
              chunk_size: int | None = None) -> Iterator[Minibatch]:
        """Read ``buffers`` (each a list of minibatches, as cell positions) through annbatch.

        Each buffer is one load request of annbatch: the rows of :func:`_rows_to_read`
        (``chunk_size`` as there), with one split per minibatch. The rows read through are
        in no split: annbatch reads them with their neighbours and never yields them.

        Yields
        ------
        index, minibatch
            Each minibatch, in the order given.
        """
        annbatch = _require_annbatch()
        read_through = self.counts.read_through_rows
        plan = []
        for batches in buffers:
            rows = [self._file_rows(b) for b in batches]
            request = _rows_to_read(np.unique(np.concatenate(rows)), read_through, chunk_size)
            # The request is ascending and without repeats: a row's position is a search.
            plan.append((request, [np.searchsorted(request, r) for r in rows]))
        if not plan:
            return
        loader = annbatch.Loader(batch_sampler=_plan_sampler_class()(plan, batch_size),
                                 return_index=True, preload_to_gpu=False)
        loader.add_dataset(self._store_matrix)
        yielded = iter(loader)
        for batches, (request, splits) in zip(buffers, plan, strict=True):
            self.peak_rows_held = max(self.peak_rows_held, request.size)
            for positions, split in zip(batches, splits, strict=True):
                out = next(yielded)
                # The rows annbatch read must be the ones planned: its split semantics
                # changed once already (0.2.0), and a silent change would mislabel cells.
                if not np.array_equal(out["index"], request[split]):
                    raise RuntimeError(
                        f"annbatch {annbatch.__version__} returned other rows than requested; "
                        "use loader_kwargs={'loader': 'pyrovi'} and report this to pyrovi.")
                index = torch.as_tensor(positions, device=self._device)
                yield index, self._batch(index, out["X"])
        # annbatch's iteration ends here, releasing its buffer.
        if next(yielded, None) is not None:  # pragma: no cover - every split was consumed
            raise AssertionError("annbatch yielded more minibatches than planned")

    def training_batches(
        self, train_index, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Minibatch]:
        """One epoch of block-shuffled training minibatches, read by annbatch.

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
        # Chunks are aligned on the file's rows, as in OnDiskCellData.training_batches.
        chunk_of = rows // self.chunk_size
        starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]]) if rows.size \
            else np.zeros(0, dtype=np.int64)
        ends = np.r_[starts[1:], rows.size]
        chunk_order = torch.randperm(starts.size, generator=generator).numpy()
        sequence = (np.concatenate([positions[starts[c]:ends[c]] for c in chunk_order])
                    if rows.size else positions)
        sizes = planned_batch_sizes(rows.size, batch_size)
        per_buffer = max(1, self.buffer_rows // batch_size)
        buffers, first = [], 0
        for b in range(0, len(sizes), per_buffer):
            cut = np.cumsum(sizes[b : b + per_buffer])
            cells = sequence[first : first + cut[-1]]
            first += int(cut[-1])
            shuffled = cells[torch.randperm(cells.size, generator=generator).numpy()]
            buffers.append(np.split(shuffled, cut[:-1]))
        yield from self._read(buffers, batch_size, self.chunk_size)

    def iter_minibatches(self, indices=None, batch_size: int = 1024) -> Iterator[Minibatch]:
        """Yield ``(index, minibatch)`` over ``indices`` (all cells by default), in order.

        Consecutive minibatches are read together while the rows they read (their cells
        and the gaps read through) stay within a training buffer of rows; a minibatch
        whose rows alone exceed it is read on its own.

        Parameters
        ----------
        indices
            Cell positions, in the order wanted (repeats allowed); all cells when ``None``.
        batch_size
            Cells per minibatch.

        Yields
        ------
        index, minibatch
            The cells' positions (on :attr:`device`) and the model/guide keyword arguments.
        """
        if indices is None:
            indices = np.arange(self.n_obs)
        if isinstance(indices, torch.Tensor):
            indices = indices.cpu().numpy()
        indices = np.asarray(indices, dtype=np.int64)
        read_through = self.counts.read_through_rows
        buffers, held = [], self.buffer_rows
        for start in range(0, indices.size, batch_size):
            batch = indices[start : start + batch_size]
            rows = _rows_to_read(np.unique(self._file_rows(batch)), read_through, None).size
            if held + rows > self.buffer_rows:
                buffers.append([])
                held = 0
            buffers[-1].append(batch)
            held += rows
        yield from self._read(buffers, batch_size)
