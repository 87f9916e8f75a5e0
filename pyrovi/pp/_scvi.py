"""``pyrovi.pp.scvi``: fit scVI (or LDVAE) and write its outputs into an AnnData in one call.

The signature is that of the former ``scanpy.external.pp.scvi``, so scanpy pipelines that
used it can switch by changing the import.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import anndata
import numpy as np
import pandas as pd
import pyro
import torch

from pyrovi.data import CountDataError
from pyrovi.models import LDVAE, SCVI

logger = logging.getLogger(__name__)

#: ``model.train`` arguments set by ``scvi``'s own parameters.
_TRAIN_ARGUMENTS = {"max_epochs": "n_epochs", "lr": "lr", "train_size": "train_size",
                    "device": "use_cuda"}
#: Model constructor arguments set by ``scvi``'s own parameters.
_MODEL_ARGUMENTS = ("n_hidden", "n_latent", "n_layers", "dispersion")

_HVG_HINT = (
    'run sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000) on the raw '
    "counts first, or pass use_highly_variable_genes=False (all genes) or subset_genes=[...]"
)


def _selected_genes(
    adata: anndata.AnnData, use_highly_variable_genes: bool, subset_genes: object
) -> np.ndarray:
    """Positions in ``adata.var_names`` of the genes to fit, in the order the model uses."""
    n_vars = adata.n_vars
    if subset_genes is not None:
        if isinstance(subset_genes, str):
            subset_genes = [subset_genes]
        selection = np.asarray(subset_genes)
        if selection.ndim != 1:
            raise ValueError(f"subset_genes must be one-dimensional, got shape {selection.shape}.")
        if selection.dtype == bool:
            if selection.size != n_vars:
                raise ValueError(
                    f"subset_genes is a boolean mask of length {selection.size}, but adata has "
                    f"{n_vars} genes."
                )
            positions = np.flatnonzero(selection)
        elif selection.size and np.issubdtype(selection.dtype, np.integer):
            out_of_range = selection[(selection < -n_vars) | (selection >= n_vars)]
            if out_of_range.size:
                raise IndexError(
                    f"subset_genes positions {out_of_range[:10].tolist()} are out of range for "
                    f"adata with {n_vars} genes."
                )
            positions = selection % n_vars
        else:
            names = pd.Index(selection.astype(str).tolist() if selection.size else [],
                             dtype=object)
            missing = names[~names.isin(adata.var_names)]
            if len(missing):
                raise KeyError(
                    f"{len(missing)} of the {len(names)} genes in subset_genes are not in "
                    f"adata.var_names, e.g. {list(missing[:10])}."
                )
            if not adata.var_names.is_unique:
                raise ValueError(
                    "adata.var_names are not unique, so gene names are ambiguous; call "
                    "adata.var_names_make_unique() or pass a boolean mask / positions."
                )
            positions = adata.var_names.get_indexer(names)
        source = "subset_genes"
    elif use_highly_variable_genes:
        if "highly_variable" not in adata.var.columns:
            raise ValueError(
                "use_highly_variable_genes=True but adata.var has no 'highly_variable' column: "
                + _HVG_HINT + "."
            )
        positions = np.flatnonzero(adata.var["highly_variable"].to_numpy(dtype=bool))
        source = "adata.var['highly_variable']"
    else:
        positions = np.arange(n_vars)
        source = "all genes"
    if positions.size == 0:
        raise ValueError(f"No genes selected ({source}); nothing to fit.")
    if np.unique(positions).size != positions.size:
        duplicated = adata.var_names[positions][adata.var_names[positions].duplicated()]
        raise ValueError(f"Genes selected more than once ({source}): {list(duplicated[:10])}.")
    logger.info("Fitting %d of %d genes (%s).", positions.size, n_vars, source)
    return positions


def _training_device(use_cuda: bool) -> str:
    if not use_cuda:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    warnings.warn(
        "use_cuda=True but no GPU was found (torch.cuda.is_available() is False); training on "
        "the CPU. Pass use_cuda=False to silence this warning.",
        UserWarning,
        stacklevel=3,
    )
    return "cpu"


def _check_overlap(kwargs: dict, reserved: dict | tuple, what: str) -> None:
    clash = sorted(set(kwargs) & set(reserved))
    if clash:
        names = [reserved[k] if isinstance(reserved, dict) else k for k in clash]
        raise TypeError(
            f"{what} sets {clash}, which scvi() already sets from its own argument(s) "
            f"{names}; pass them there instead."
        )


def scvi(
    adata: anndata.AnnData,
    n_hidden: int = 128,
    n_latent: int = 10,
    n_layers: int = 1,
    dispersion: str = "gene",
    n_epochs: int = 400,
    lr: float = 1e-3,
    train_size: float = 1.0,
    batch_key: str | None = None,
    use_highly_variable_genes: bool = True,
    subset_genes: Sequence[str] | Sequence[int] | Sequence[bool] | np.ndarray | None = None,
    linear_decoder: bool = False,
    copy: bool = False,
    use_cuda: bool = True,
    return_posterior: bool = True,
    trainer_kwargs: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> anndata.AnnData | SCVI | tuple[anndata.AnnData, SCVI] | None:
    """Fit scVI (or LDVAE) on the raw counts in ``adata.X`` and store its outputs in ``adata``.

    The one-call API of the former ``scanpy.external.pp.scvi``. The model is built on an
    internal copy of the selected genes, so the user's AnnData only gains the outputs below
    (and no ``uns["_pyrovi"]`` registry); on any error it is left unchanged.

    Parameters
    ----------
    adata
        AnnData with raw counts (non-negative integers) in ``X``, cells × genes.
    n_hidden
        Units per hidden layer of the networks.
    n_latent
        Dimension of the latent space.
    n_layers
        Hidden layers of the encoder (and of the decoder for scVI).
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    n_epochs
        Training epochs (``max_epochs`` of :meth:`pyrovi.SCVI.train`).
    lr
        Adam learning rate.
    train_size
        Fraction of cells used for training; the rest are validation cells (``1.0``: all cells
        train, no validation).
    batch_key
        ``obs`` column with the batch of each cell, passed to ``setup_anndata``.
    use_highly_variable_genes
        Fit only the genes with ``adata.var["highly_variable"]`` True (as written by
        ``sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=2000)`` run on
        the counts).
    subset_genes
        Genes to fit, overriding ``use_highly_variable_genes``: gene names, a boolean mask
        over ``adata.var_names``, or integer positions. Names are fitted in the given order.
    linear_decoder
        Fit :class:`pyrovi.LDVAE` (linear decoder) instead of :class:`pyrovi.SCVI`, and store
        its gene loadings.
    copy
        Work on a copy of ``adata`` and return it; ``adata`` itself is not modified.
    use_cuda
        Train on the GPU when one is available; without one, warn and use the CPU.
    return_posterior
        Return the trained model.
    trainer_kwargs
        Further arguments of :meth:`pyrovi.SCVI.train` (``seed``, ``batch_size``,
        ``progress_bar``, ``n_epochs_kl_warmup``, ``early_stopping``...). A ``seed`` also
        seeds the model's initial weights, so the whole call is reproducible on the CPU.
    model_kwargs
        Further arguments of the model constructor (``gene_likelihood``, ``dropout_rate``,
        ``latent_distribution``...).

    Returns
    -------
    anndata.AnnData or pyrovi.SCVI or tuple or None
        ``adata`` (the copy) when ``copy=True``; the trained model when
        ``return_posterior=True``; ``(adata, model)`` when both; ``None`` when neither.
        The AnnData (``adata`` itself unless ``copy=True``) gains

        ``obsm["X_scvi"]``
            Posterior mean of the latent representation, cells × ``n_latent``.
        ``obsm["X_scvi_denoised"]``
            Denoised normalized expression (``rho``, each row sums to 1), cells × fitted
            genes.
        ``obsm["X_scvi_sample_rate"]``
            Mean of the count distribution (library size × ``rho``), cells × fitted genes.
        ``uns["ldvae_loadings"]``
            With ``linear_decoder=True``: gene loadings, a DataFrame of fitted genes ×
            ``Z_0 .. Z_{n_latent-1}``.

        The fitted gene names are ``model.var_names``.

    Raises
    ------
    ValueError
        If ``use_highly_variable_genes=True`` and ``adata.var`` has no ``highly_variable``
        column, if no gene is selected, or if the counts are not valid raw counts
        (:class:`pyrovi.data.CountDataError`).
    KeyError
        If ``subset_genes`` names genes that are not in ``adata``, or ``batch_key`` is not an
        ``obs`` column.

    Examples
    --------
    >>> import scanpy as sc
    >>> import pyrovi
    >>> adata = pyrovi.datasets.pbmc68k_reduced()  # doctest: +SKIP
    >>> sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=500)  # doctest: +SKIP
    >>> model = pyrovi.pp.scvi(adata, n_epochs=100, batch_key="phase")  # doctest: +SKIP
    >>> sc.pp.neighbors(adata, use_rep="X_scvi")  # doctest: +SKIP
    >>> sc.tl.umap(adata)  # doctest: +SKIP
    """
    trainer_kwargs = dict(trainer_kwargs or {})
    model_kwargs = dict(model_kwargs or {})
    _check_overlap(trainer_kwargs, _TRAIN_ARGUMENTS, "trainer_kwargs")
    _check_overlap(model_kwargs, _MODEL_ARGUMENTS, "model_kwargs")

    genes = _selected_genes(adata, use_highly_variable_genes, subset_genes)
    if adata.X is None:
        raise ValueError("adata.X is empty; scvi() fits the raw counts in adata.X.")
    # A lean copy of what the model reads (counts of the selected genes, obs, var): the
    # registry and everything the model keeps go there, never into the user's AnnData.
    # ``.copy()`` turns the slice of a view of an AnnData into a plain, detached matrix.
    fitted = anndata.AnnData(
        X=adata.X[:, genes].copy(), obs=adata.obs.copy(), var=adata.var.iloc[genes].copy()
    )
    model_class = LDVAE if linear_decoder else SCVI
    try:
        model_class.setup_anndata(fitted, batch_key=batch_key)
    except CountDataError as error:
        if "zero total counts" in str(error) and genes.size < adata.n_vars:
            raise CountDataError(
                f"{error} Note: the counts are those of the {genes.size} selected genes; "
                "cells can have no counts over them even when they have counts overall."
            ) from error
        raise

    device = _training_device(use_cuda)
    seed = trainer_kwargs.get("seed")
    if seed is not None:
        pyro.set_rng_seed(seed)
    model = model_class(
        fitted, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers, dispersion=dispersion,
        **model_kwargs,
    )
    model.train(max_epochs=n_epochs, lr=lr, train_size=train_size, device=device,
                **trainer_kwargs)

    latent = model.get_latent_representation()
    # Both outputs decode one posterior draw of z: the random state is rewound between the
    # two calls, so that X_scvi_sample_rate = library · X_scvi_denoised cell by cell.
    rng_devices = [] if model.device.type != "cuda" else [model.device]
    with torch.random.fork_rng(devices=rng_devices, device_type="cuda"):
        denoised = model.get_normalized_expression(library_size=1, return_numpy=True)
    sample_rate = model.get_normalized_expression(library_size="latent", return_numpy=True)
    loadings = model.get_loadings() if linear_decoder else None

    target = adata.copy() if copy else adata
    target.obsm["X_scvi"] = latent
    target.obsm["X_scvi_denoised"] = denoised
    target.obsm["X_scvi_sample_rate"] = sample_rate
    if loadings is not None:
        target.uns["ldvae_loadings"] = loadings
    logger.info(
        "Wrote obsm['X_scvi'], obsm['X_scvi_denoised'], obsm['X_scvi_sample_rate']%s.",
        " and uns['ldvae_loadings']" if loadings is not None else "",
    )

    if copy and return_posterior:
        return target, model
    if copy:
        return target
    if return_posterior:
        return model
    return None
