"""scvi-tools models as pyrovi models (:func:`from_scvi_tools`), and back (:func:`to_scvi_tools`).

The files are read as data (see :mod:`pyrovi.io.scvi_tools`); the set-up, category orders
and constructor arguments come from the file, the weights are mapped block by block, and
the model is built on the given data exactly as :meth:`BaseModel.load
<pyrovi.models.BaseModel.load>` builds a pyrovi model (genes and obs columns checked, the
user's data left as it was).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from pyrovi.data import AnnDataRegistry, register_new_data
from pyrovi.infer import resolve_device
from pyrovi.io.model_classes import model_class
from pyrovi.io.scvi_tools import ScviToolsFolder
from pyrovi.io.scvi_tools.kinds import kind_of_pyrovi, kind_of_scvi_tools
from pyrovi.models.persistence import registry_in_uns

logger = logging.getLogger(__name__)

#: The scvi-tools version whose file layout :func:`to_scvi_tools` writes (read by 1.4 and 1.5).
WRITTEN_SCVI_VERSION = "1.4.2"


def from_scvi_tools(path: str | os.PathLike, adata=None, device: str = "cpu",
                    prefix: str | None = None):
    """The pyrovi model equivalent to an scvi-tools model saved in ``path``.

    Reads a folder written by scvi-tools 1.x ``model.save`` (or downloaded from scvi-hub)
    without running code from it, and returns the pyrovi model of the same kind with the
    same weights: ``SCVI`` → :class:`~pyrovi.SCVI`, ``LinearSCVI`` →
    :class:`~pyrovi.LDVAE`. On the same cells it gives scvi-tools' latent means and
    decoder outputs.

    Parameters
    ----------
    path
        The model folder (``model.pt``, optionally ``adata.h5ad``).
    adata
        Data to attach the model to: any AnnData with the model's genes (names and order,
        checked), raw counts in the set-up's layer and the set-up's obs columns. Default:
        the data saved in the folder.
    device
        ``"cpu"``, ``"cuda"``, ``"auto"``...
    prefix
        File-name prefix given to scvi-tools' ``save(prefix=...)``.

    Returns
    -------
    pyrovi.models.BaseModel
        A trained model (``is_trained`` as recorded by scvi-tools) with scvi-tools' train
        and validation cells; scvi-tools' training history is not imported.

    Raises
    ------
    pyrovi.io.ModelFileError
        ``path`` is not an scvi-tools model folder, or its files are damaged or unsafe.
    ValueError
        A model class or an option pyrovi does not have (named); genes that do not match.

    Examples
    --------
    >>> model = pyrovi.from_scvi_tools("scvi_model/", adata)  # doctest: +SKIP
    >>> adata.obsm["X_scVI"] = model.get_latent_representation()  # doctest: +SKIP
    """
    folder = ScviToolsFolder(path, prefix=prefix)
    kind = kind_of_scvi_tools(folder.model_name, os.fspath(folder.path))
    cls = model_class(kind.pyrovi_name)
    arguments = kind.arguments_from(folder.init_params, folder.scvi_version)
    registry = AnnDataRegistry.from_dict(
        kind.registry_from(folder.registry, cls.__name__, len(folder.var_names)))
    if adata is None:
        adata = folder.read_data()
    # A MuData is read through the model's own flat view, which needs the set-up in its uns
    # while the model is built; the user's MuData gets its uns back as it was.
    with registry_in_uns(adata, registry):
        flat = cls.as_anndata(adata)
    registry = register_new_data(registry, flat, folder.var_names, store=False,
                                 minified_stem=cls._minified_stem)
    with registry_in_uns(adata, registry):
        model = cls(adata, **arguments)
    try:
        model.module.load_state_dict(kind.state_from(folder.state_dict, model.module))
    except ValueError as error:
        raise ValueError(f"{os.fspath(folder.path)!r}: {error}") from None
    model.is_trained = bool(folder.attr_dict.get("is_trained_", True))
    model.train_indices = folder.indices("train")
    model.validation_indices = folder.indices("validation")
    model.device = resolve_device(device)
    model.module.to(model.device).eval()
    logger.info("Imported an scvi-tools %s (written by scvi-tools %s) as pyrovi.%s.",
                folder.model_name, folder.scvi_version, cls.__name__)
    return model


def _history(model) -> dict:
    """pyrovi's history as scvi-tools keeps it: one single-column DataFrame per metric."""
    if model.history is None:
        return {}
    return {name: model.history[[name]].rename_axis("epoch")
            for name in model.history.columns}


def to_scvi_tools(model, path: str | os.PathLike, overwrite: bool = False,
                  save_anndata: bool = False) -> None:
    """Write ``model`` as a folder that scvi-tools 1.4 and 1.5 load.

    Parameters
    ----------
    model
        A pyrovi :class:`~pyrovi.SCVI` (→ scvi-tools ``SCVI``) or :class:`~pyrovi.LDVAE`
        (→ ``LinearSCVI``).
    path
        Folder to write (``model.pt``, and ``adata.h5ad`` with ``save_anndata``).
    overwrite
        Replace the files of an existing folder.
    save_anndata
        Also write the model's AnnData.

    Raises
    ------
    ValueError
        An option scvi-tools lacks (a MoG or Vamp prior, a callable likelihood,
        covariates where scvi-tools' networks read none), named.
    FileExistsError
        The folder holds a model and ``overwrite`` is false.
    """
    kind = kind_of_pyrovi(type(model).__name__)
    init_params = kind.arguments_to(model.init_params)
    state = kind.state_to(model.module)
    path = Path(path)
    model_file = path / "model.pt"
    if model_file.exists() and not overwrite:
        raise FileExistsError(f"{os.fspath(model_file)!r} exists; pass overwrite=True to "
                              "replace it.")
    registry = kind.registry_to(model.registry, model.var_names, kind.scvi_tools_name,
                                WRITTEN_SCVI_VERSION)

    def indices(values) -> np.ndarray:
        return np.asarray([] if values is None else values, dtype=np.int64)

    attr_dict = {
        "init_params_": init_params,
        "registry_": registry,
        "is_trained_": bool(model.is_trained),
        "train_indices_": indices(model.train_indices),
        "validation_indices_": indices(model.validation_indices),
        "test_indices_": indices(None),
        "history_": _history(model),
    }
    path.mkdir(parents=True, exist_ok=True)
    content = {"model_state_dict": state,
               "var_names": np.asarray(list(map(str, model.var_names)), dtype=object),
               "attr_dict": attr_dict}
    partial = path / ".model.pt.partial"
    torch.save(content, partial)
    os.replace(partial, model_file)
    if save_anndata:
        model.adata.write_h5ad(path / "adata.h5ad")
    logger.info("Wrote %s for scvi-tools' %s to %s.", type(model).__name__,
                kind.scvi_tools_name, os.fspath(path))


__all__ = ["from_scvi_tools", "to_scvi_tools"]
