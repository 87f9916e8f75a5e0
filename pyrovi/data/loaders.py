"""Which loader holds a registered AnnData, and the per-cell arrays of its fields.

:func:`build_cell_tensors` asks each field the registry declares for its per-cell array
(:meth:`~pyrovi.data.fields.DataField.cell_array`) and hands them, under their minibatch
keywords, to the loader that fits: :class:`~pyrovi.data.tensors.CellTensors` for counts in
memory, :class:`~pyrovi.data.streaming.OnDiskCellData` or
:class:`~pyrovi.data.annbatch_loader.AnnbatchCellData` for counts on disk. The loaders know
no field by name (only that ``x``, the counts, may stay on disk); this module sits above
them so that none of them imports another to choose.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from pyrovi.data.annbatch_loader import AnnbatchCellData
from pyrovi.data.fields import counts_matrix
from pyrovi.data.ondisk import is_on_disk
from pyrovi.data.registry import AnnDataRegistry
from pyrovi.data.streaming import LOADERS, OnDiskCellData
from pyrovi.data.tensors import CellData, CellTensors, CountMatrix, per_cell_tensor
from pyrovi.data.validation import cell_totals, informative_cells


def cell_fields(adata, registry: AnnDataRegistry, device: torch.device | str = "cpu",
                indices=None) -> dict[str, torch.Tensor | CountMatrix | None]:
    """The registered per-cell fields of ``adata`` other than the counts, on ``device``.

    Parameters
    ----------
    adata
        AnnData registered with ``registry``.
    registry
        The registry whose fields are read.
    device
        Target device.
    indices
        Only these cells (in this order); all cells when ``None``. The fields are read for
        every cell and then subset, so that ``adata`` itself is never sliced (a slice of a
        backed AnnData would read its counts).

    Returns
    -------
    dict
        ``{minibatch keyword: tensor, CountMatrix or None}``, in the fields' order
        (``batch_index``, ``labels``, ``cat_covs``, ``cont_covs``, ``size_factor``, then
        plug-in fields such as ``y``).
    """
    device = torch.device(device)
    rows = slice(None) if indices is None else np.asarray(indices)
    arrays = {}
    for field in registry.fields:
        if field.key == "x":  # the counts: kept on disk or moved by the caller
            continue
        for key, array in field.cell_arrays(adata).items():
            if array is not None:
                array = array[rows]
            # Count-like fields stay sparse (CSR) on the device even when given dense.
            arrays[key] = (CountMatrix(array, device) if field.is_counts and array is not None
                           else per_cell_tensor(array, device))
    return arrays


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
        The registry whose fields are read.
    device
        Target device.
    indices
        Only these cells (in this order); all cells when ``None``.
    loader_kwargs
        Options of the on-disk loader (``loader``, ``chunk_size``, ``n_chunks_in_buffer``,
        see :func:`on_disk_cell_data`); no effect on data in memory.

    Returns
    -------
    CellTensors or OnDiskCellData
        :class:`~pyrovi.data.tensors.CellTensors` when the counts are in memory; when they
        are on disk (a backed AnnData, see :func:`~pyrovi.data.read_ondisk`), an
        :class:`~pyrovi.data.streaming.OnDiskCellData` that reads them a block at a time.

    Notes
    -----
    The per-cell totals (which cells are informative) are read here on every call rather
    than taken from set-up: they are the check that no count was made NaN or negative in
    place since then, which the fingerprint cannot see
    (:func:`~pyrovi.data.validation.informative_cells`).
    """
    device = torch.device(device)
    matrix = counts_matrix(adata, registry.layer)
    if is_on_disk(matrix):
        if indices is not None:
            indices = np.asarray(indices)
            if indices.dtype == bool:
                indices = np.flatnonzero(indices)
        return on_disk_cell_data(matrix, cell_fields(adata, registry, device, indices),
                                 device, indices, **(loader_kwargs or {}))
    if indices is not None:
        adata = adata[np.asarray(indices)]
    matrix = counts_matrix(adata, registry.layer)
    arrays = {"x": CountMatrix(matrix, device), **cell_fields(adata, registry, device)}
    return CellTensors(arrays, informative_cells(cell_totals(matrix), adata.obs_names), device)


def on_disk_cell_data(
    matrix,
    fields: Mapping[str, torch.Tensor | CountMatrix | None],
    device: torch.device | str = "cpu",
    indices=None,
    loader: str = "pyrovi",
    **options,
) -> OnDiskCellData:
    """The loader of a count matrix left on disk, as ``loader_kwargs`` choose it.

    Parameters
    ----------
    matrix, fields, device, indices
        As for :class:`OnDiskCellData`.
    loader
        ``"pyrovi"`` (the default): :class:`OnDiskCellData`, for any h5ad file or zarr
        store. ``"annbatch"``: :class:`~pyrovi.data.annbatch_loader.AnnbatchCellData`, the
        reads done by annbatch (zarr stores only; an error for an h5ad file or when
        annbatch is not installed).
    **options
        ``chunk_size`` and ``n_chunks_in_buffer``, for either loader.

    Returns
    -------
    OnDiskCellData
        Or its subclass :class:`~pyrovi.data.annbatch_loader.AnnbatchCellData`.

    Notes
    -----
    pyrovi's reader is the default because ``benchmarks/out_of_core.py`` (the "Out-of-core
    training" section of ``benchmarks/RESULTS.md``) found annbatch faster only on zarr
    stores as anndata writes them, never on its own sharded layout, always with more
    memory (it keeps the previous buffer while it fetches the next), and unable to read
    h5ad files, which are the cheapest to read of all. annbatch is there on request.
    """
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {loader!r}.")
    if loader == "annbatch":
        return AnnbatchCellData(matrix, fields, device, indices, **options)
    return OnDiskCellData(matrix, fields, device, indices, **options)
