"""Folders written by scvi-tools' ``model.save`` and downloaded from scvi-hub.

A folder holds ``model.pt`` (optionally with a file-name prefix) and, when saved with the
data, ``adata.h5ad`` (``mdata.h5mu`` for MuData). A scvi-hub download adds its metadata
(``_scvi_required_metadata.json``) and model card (``README.md``). Everything is read as
data: ``model.pt`` through :func:`~pyrovi.io.scvi_tools.safe_pickle.read_model_pt`, the
data with anndata/mudata, the metadata with ``json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from pyrovi.io.bundle import MANIFEST, ModelFileError
from pyrovi.io.scvi_tools.safe_pickle import read_model_pt

#: scvi-hub's metadata file in a downloaded model folder.
HUB_METADATA = "_scvi_required_metadata.json"
#: Key of ``adata.uns`` naming the kind of minified data (scvi-tools' constant).
MINIFY_TYPE_KEY = "_scvi_adata_minify_type"


class ScviToolsFolder:
    """An scvi-tools model folder, read without running code from it.

    Parameters
    ----------
    path
        The folder (or its ``model.pt``).
    prefix
        File-name prefix given to scvi-tools' ``save(prefix=...)``, if any.

    Attributes
    ----------
    path
        The folder.
    model_name
        scvi-tools' class name (``"SCVI"``, ``"LinearSCVI"``, ``"TOTALVI"``...).
    state_dict
        The module's weights.
    var_names
        Genes (features) the model was trained on.
    attr_dict
        Model attributes (``init_params_``, ``registry_``, split indices...); pandas
        objects are :class:`~pyrovi.io.scvi_tools.safe_pickle.NotRead`.
    hub_metadata
        scvi-hub's metadata (``{}`` outside a hub download).

    Raises
    ------
    ModelFileError
        The path is not an scvi-tools model folder, or its ``model.pt`` is unreadable.
    """

    def __init__(self, path: str | os.PathLike, prefix: str | None = None):
        path = Path(path)
        if path.is_file():
            path = path.parent
        self.path = path
        self.prefix = prefix or ""
        if not path.is_dir():
            raise ModelFileError(f"{os.fspath(path)!r} is not a folder: give the folder that "
                                 "scvi-tools' model.save wrote (it holds model.pt).")
        model_file = path / f"{self.prefix}model.pt"
        if not model_file.is_file():
            raise ModelFileError(self._not_a_model_message(path))
        content = read_model_pt(model_file)
        attr_dict = content.get("attr_dict")
        if not isinstance(attr_dict, dict) or not isinstance(attr_dict.get("registry_"), dict):
            raise ModelFileError(
                f"{os.fspath(model_file)!r} has no attr_dict with a registry_: it was not "
                "written by scvi-tools 1.x (older files must be re-saved with scvi-tools 1.x)."
            )
        self.attr_dict = attr_dict
        # scvi-tools adds a non-tensor "pyro_param_store" entry; only tensors are weights.
        self.state_dict = {k: v for k, v in dict(content["model_state_dict"]).items()
                           if isinstance(v, torch.Tensor)}
        self.model_name = str(attr_dict["registry_"].get("model_name", ""))
        self.var_names = self._genes(content.get("var_names", []))
        self.hub_metadata = self._read_hub_metadata()

    def _genes(self, var_names) -> list[str]:
        """The genes: ``var_names``, or for a model set up from a MuData (one array per
        modality) the names of the modality its ``rna_layer`` was read from."""
        if isinstance(var_names, dict):
            modalities = dict(self.registry.get("setup_args", {}).get("modalities") or {})
            rna = modalities.get("rna_layer", "rna")
            if rna not in var_names:
                raise ModelFileError(f"{os.fspath(self.path)!r}: model.pt names the features "
                                     f"of {sorted(var_names)}, not of the RNA modality {rna!r}.")
            var_names = var_names[rna]
        return [str(v) for v in np.asarray(var_names, dtype=object).ravel()]

    def _not_a_model_message(self, path: Path) -> str:
        where = os.fspath(path)
        if (path / MANIFEST).is_file():
            return (f"{where!r} is a pyrovi model folder, not an scvi-tools one: load it with "
                    "pyrovi.<Model>.load(dir_path).")
        candidates = sorted(p.name for p in path.glob("*model.pt"))
        if candidates:
            return (f"{where!r} holds {candidates} but no {self.prefix}model.pt: pass the "
                    "prefix it was saved with (prefix=...).")
        return (f"{where!r} is not an scvi-tools model folder: it holds no model.pt (scvi-tools"
                " writes one with model.save(dir_path)).")

    @property
    def registry(self) -> dict:
        """scvi-tools' set-up registry (``attr_dict["registry_"]``)."""
        return self.attr_dict["registry_"]

    @property
    def init_params(self) -> dict:
        """scvi-tools' record of the constructor arguments (``attr_dict["init_params_"]``)."""
        params = self.attr_dict.get("init_params_")
        if not isinstance(params, dict):
            raise ModelFileError(f"{os.fspath(self.path)!r}: model.pt records no init_params_.")
        return params

    @property
    def scvi_version(self) -> str:
        """Version of scvi-tools that wrote the file."""
        return str(self.registry.get("scvi_version", "unknown"))

    def indices(self, name: str) -> np.ndarray | None:
        """The cells of a split (``"train"``, ``"validation"``), or ``None``."""
        value = self.attr_dict.get(f"{name}_indices_")
        return None if value is None else np.asarray(value, dtype=np.int64)

    def data_file(self) -> Path | None:
        """The AnnData (``adata.h5ad``) or MuData (``mdata.h5mu``) saved with the model."""
        for name in ("adata.h5ad", "mdata.h5mu"):
            candidate = self.path / f"{self.prefix}{name}"
            if candidate.is_file():
                return candidate
        return None

    def read_data(self):
        """The AnnData or MuData saved in the folder.

        Raises
        ------
        ModelFileError
            When the folder holds no data.
        """
        data_file = self.data_file()
        if data_file is None:
            raise ModelFileError(
                f"{os.fspath(self.path)!r} holds no adata.h5ad or mdata.h5mu: pass the data "
                "the model was set up with (adata=...), with the raw counts and the obs "
                "columns of its set-up."
            )
        if data_file.suffix == ".h5mu":
            import mudata

            return mudata.read_h5mu(data_file)
        import anndata

        return anndata.read_h5ad(data_file)

    def _read_hub_metadata(self) -> dict:
        metadata = self.path / HUB_METADATA
        if not metadata.is_file():
            return {}
        try:
            value = json.loads(metadata.read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise ModelFileError(f"{os.fspath(metadata)!r} is not valid JSON ({error}).") from None
        return value if isinstance(value, dict) else {}
