"""Which cells an output reads: one check of the ``indices`` every output accepts."""

from __future__ import annotations

import numpy as np


def cell_positions(indices, n_obs: int) -> np.ndarray:
    """Cell positions (int64) from ``None``, a boolean mask or integer positions.

    Every output of pyrovi (``get_latent_representation``, posterior predictive checks,
    ArviZ export, the posterior utilities) reads its ``indices`` argument through this one
    check, so the same mistake gets the same message everywhere, instead of fewer rows or
    silently truncated positions.

    Parameters
    ----------
    indices
        ``None`` (all cells), a boolean mask with one entry per cell, or integer positions
        (a list, array or ``range``), in ``0 .. n_obs - 1``; repeats are allowed.
    n_obs
        Number of cells.

    Returns
    -------
    numpy.ndarray
        1-d int64 positions.

    Raises
    ------
    ValueError
        A mask of the wrong length, no cell selected, or positions out of range.
    TypeError
        Floats, strings or other values that are not positions.

    Examples
    --------
    >>> cell_positions([True, False, True], 3)
    array([0, 2])
    """
    if indices is None:
        return np.arange(n_obs, dtype=np.int64)
    positions = np.asarray(indices)
    if positions.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {positions.shape}.")
    if positions.dtype == bool:
        if positions.size != n_obs:
            raise ValueError(f"indices is a boolean mask of {positions.size} entries, but there "
                             f"are {n_obs} cells: a mask needs one entry per cell.")
        positions = np.flatnonzero(positions)
    elif positions.size and not np.issubdtype(positions.dtype, np.integer):
        if np.issubdtype(positions.dtype, np.floating):
            raise TypeError(f"indices holds floats (e.g. {positions[0]!r}); pass integer cell "
                            "positions (e.g. indices.astype(int)) or a boolean mask.")
        raise TypeError(f"indices holds {positions.dtype} values (e.g. {positions[0]!r}); pass "
                        "integer cell positions or a boolean mask (for cell names: "
                        "adata.obs_names.get_indexer(names)).")
    if positions.size == 0:
        raise ValueError("indices selects no cell.")
    positions = positions.astype(np.int64)
    outside = positions[(positions < 0) | (positions >= n_obs)]
    if outside.size:
        raise ValueError(f"indices holds positions outside 0..{n_obs - 1} (e.g. "
                         f"{int(outside[0])}); there are {n_obs} cells.")
    return positions
