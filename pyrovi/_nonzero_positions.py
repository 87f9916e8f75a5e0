"""Where a dense count minibatch is non-zero, remembered from the sparse rows it came from.

On the CPU the count likelihoods evaluate their lgamma/digamma terms at the non-zero counts
only, and finding them in a dense minibatch (``torch.nonzero``) costs as much as gathering
the minibatch itself. When the minibatch is densified from CSR rows the positions are
already known, so the loader tags the dense tensor with them and the likelihood reads them
back. A tag is ignored once the tensor has been modified in place (its version counter
moved), so a stale tag cannot be used.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

_TAG = "_pyrovi_nonzero_positions"


class NonzeroPositions(NamedTuple):
    """The non-zero entries of a dense count tensor."""

    #: int64 positions in the flattened tensor, ascending.
    flat: torch.Tensor
    #: int64 column (last-dimension) index of each.
    columns: torch.Tensor
    #: Their values, in the tensor's dtype.
    values: torch.Tensor


def tag_nonzero_positions(x: torch.Tensor, positions: NonzeroPositions) -> None:
    """Record that ``x`` is non-zero exactly at ``positions``.

    Parameters
    ----------
    x
        Dense, contiguous count tensor.
    positions
        Its non-zero entries: flat positions (ascending), columns and values.
    """
    setattr(x, _TAG, (x._version, tuple(x.shape), positions))


def tagged_nonzero_positions(x: torch.Tensor) -> NonzeroPositions | None:
    """The :class:`NonzeroPositions` recorded by :func:`tag_nonzero_positions`, or ``None``.

    ``None`` when ``x`` carries no tag, or when it was modified in place or reshaped in
    place since it was tagged.
    """
    tag = getattr(x, _TAG, None)
    if tag is None:
        return None
    version, shape, positions = tag
    if version != x._version or shape != tuple(x.shape) or not x.is_contiguous():
        return None
    return positions


def dense_csr_rows(block: sp.csr_matrix) -> torch.Tensor:
    """A canonical CSR block (host memory) as a dense float32 CPU tensor, tagged.

    The tensor carries the positions of the block's non-zero entries (see
    :func:`tagged_nonzero_positions`).

    Parameters
    ----------
    block
        CSR matrix in canonical format (sorted column indices, no duplicates); stored
        zeros are left out of the recorded positions.

    Returns
    -------
    torch.Tensor
        ``block.toarray()`` as float32.

    Examples
    --------
    >>> block = sp.csr_matrix(np.array([[0, 2, 0], [1, 0, 3]], dtype=np.float32))
    >>> x = dense_csr_rows(block)
    >>> tagged_nonzero_positions(x).flat
    tensor([1, 3, 5])
    """
    return gather_csr_rows(block.indptr, block.indices, block.data, block.shape[1],
                           np.arange(block.shape[0]))


def gather_csr_rows(
    indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_columns: int, rows: np.ndarray
) -> torch.Tensor:
    """Rows ``rows`` of a canonical CSR matrix (host arrays) as a dense float32 tensor, tagged.

    Index arithmetic on the CSR arrays, without building a scipy matrix of the rows
    (scipy's row indexing spends most of its time checking its input for a minibatch).

    Parameters
    ----------
    indptr, indices, data
        The CSR arrays (sorted column indices, no duplicates).
    n_columns
        Number of columns.
    rows
        Row positions to gather (int64), in the order wanted.

    Returns
    -------
    torch.Tensor
        Shape ``(len(rows), n_columns)``, with the positions of its non-zero entries
        recorded (:func:`tagged_nonzero_positions`); stored zeros are not among them.
    """
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
    out = np.zeros(n_rows * n_columns, dtype=np.float32)
    out[flat] = values
    x = torch.from_numpy(out).view(n_rows, n_columns)
    tag_nonzero_positions(x, NonzeroPositions(torch.from_numpy(flat), torch.from_numpy(columns),
                                              torch.from_numpy(values)))
    return x
