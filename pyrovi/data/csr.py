"""Rows of a CSR matrix as a dense float32 tensor: the one gather every loader uses.

In-memory counts (:class:`~pyrovi.data.CountMatrix`) and blocks read from disk
(:mod:`pyrovi.data.streaming`, :mod:`pyrovi.data.annbatch_loader`) are densified here.
Where the CSR arrays are (host or device) decides how the index arithmetic runs: numpy on
the host (faster than torch's for a minibatch on the CPU, see ``benchmarks/RESULTS.md``),
torch on the device otherwise, so that device-resident arrays never travel back.
"""

from __future__ import annotations

import numpy as np
import torch

from pyrovi._nonzero_positions import NonzeroPositions


def gather_csr_rows(
    indptr, indices, data, n_columns: int, rows, device: torch.device | str | None = None
) -> tuple[torch.Tensor, NonzeroPositions | None]:
    """Rows ``rows`` of a canonical CSR matrix as a dense float32 tensor.

    Index arithmetic on the CSR arrays, without building a scipy matrix of the rows
    (scipy's row indexing spends most of its time checking its input for a minibatch).

    Parameters
    ----------
    indptr, indices, data
        The CSR arrays (sorted column indices, no duplicates): numpy arrays in host memory,
        or torch tensors on one device.
    n_columns
        Number of columns.
    rows
        Row positions to gather (int64), in the order wanted: a numpy array with host
        arrays, a tensor on the arrays' device with tensors.
    device
        Where the dense rows go, for host arrays (default: the CPU); tensors stay on their
        device.

    Returns
    -------
    dense : torch.Tensor
        Shape ``(len(rows), n_columns)``.
    nonzero : NonzeroPositions or None
        The positions of its non-zero entries (stored zeros are not among them) when the
        dense rows are on the CPU, else ``None`` (accelerators evaluate every entry).

    Examples
    --------
    >>> import scipy.sparse as sp
    >>> m = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 3]], dtype=np.float32))
    >>> x, nonzero = gather_csr_rows(m.indptr, m.indices, m.data, 3, np.array([1, 0]))
    >>> nonzero.flat
    tensor([0, 2, 4])
    """
    if isinstance(indptr, torch.Tensor):
        return _gather_with_torch(indptr, indices, data, n_columns, rows), None
    flat, columns, values = _entries_on_host(indptr, indices, data, n_columns, rows)
    n_rows = len(rows)
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu":
        # The device receives the non-zeros only and scatters them into zeros.
        out = torch.zeros(n_rows * n_columns, dtype=torch.float32, device=device)
        out[torch.from_numpy(flat).to(device)] = torch.from_numpy(values).to(device)
        return out.view(n_rows, n_columns), None
    out = np.zeros(n_rows * n_columns, dtype=np.float32)
    out[flat] = values
    x = torch.from_numpy(out).view(n_rows, n_columns)
    return x, NonzeroPositions(torch.from_numpy(flat), torch.from_numpy(columns),
                               torch.from_numpy(values), x)


def _entries_on_host(indptr, indices, data, n_columns, rows):
    """Flat positions (in the dense rows), columns and values of the gathered non-zeros."""
    n_rows = len(rows)
    starts = indptr[rows].astype(np.int64, copy=False)
    lengths = indptr[rows + 1] - starts
    ends = np.cumsum(lengths)
    # Position in the CSR arrays of every gathered entry: its row's start in the arrays
    # plus its offset within the row.
    positions = np.arange(ends[-1] if n_rows else 0, dtype=np.int64)
    positions += np.repeat(starts - (ends - lengths), lengths)
    values = np.asarray(data[positions], dtype=np.float32)
    columns = indices[positions].astype(np.int64)
    flat = np.repeat(np.arange(0, n_rows * n_columns, n_columns, dtype=np.int64), lengths)
    flat += columns
    if not values.all():  # stored zeros are not non-zero positions
        stored = values != 0
        flat, columns, values = flat[stored], columns[stored], values[stored]
    return flat, columns, values


def _gather_with_torch(indptr, indices, data, n_columns, index) -> torch.Tensor:
    """Any device: index arithmetic on the CSR tensors, one scatter into zeros."""
    device = indptr.device
    starts = indptr.index_select(0, index)
    lengths = indptr.index_select(0, index + 1) - starts
    rows = torch.repeat_interleave(torch.arange(index.numel(), device=device), lengths)
    # Position of every gathered non-zero inside the CSR arrays: the row's start plus the
    # running offset within the row.
    first_of_row = torch.cumsum(lengths, 0) - lengths
    offsets = torch.arange(rows.numel(), device=device)
    offsets = offsets - first_of_row.index_select(0, rows)
    positions = starts.index_select(0, rows) + offsets
    out = torch.zeros(index.numel(), n_columns, device=device)
    out[rows, indices.index_select(0, positions)] = data.index_select(0, positions)
    return out
