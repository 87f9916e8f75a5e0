"""MuData input: one AnnData view of the modalities a multi-modal model reads.

A MuData keeps RNA and proteins as separate modalities (``mdata.mod["rna"]``,
``mdata.mod["protein"]``). pyrovi reads them through one flat AnnData — RNA counts in
``X``, protein counts as a DataFrame in ``obsm["protein_expression"]``, the ``obs`` columns
the model needs — so the rest of the library (registry, device tensors, posterior
utilities) serves AnnData and MuData alike. The matrices are referenced, not copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovi.data.registry import SetupError, counts_matrix

#: ``obsm`` key of the protein counts in the flat AnnData built from a MuData.
MUDATA_PROTEIN_KEY = "protein_expression"

#: Where each setup argument is read from, by default (scvi-tools' ``modalities``).
DEFAULT_MODALITIES = {
    "rna_layer": "rna",
    "protein_layer": "protein",
    "batch_key": "rna",
    "labels_key": "rna",
    "size_factor_key": "rna",
    "categorical_covariate_keys": "rna",
    "continuous_covariate_keys": "rna",
}


def is_mudata(data) -> bool:
    """Whether ``data`` is a MuData object (without importing mudata when it is not)."""
    return type(data).__name__ == "MuData" and hasattr(data, "mod")


def resolve_modalities(modalities: dict[str, str] | None) -> dict[str, str]:
    """The modality of every setup argument: the defaults updated with ``modalities``.

    Raises
    ------
    SetupError
        For an argument name that is not a setup argument.
    """
    unknown = set(modalities or {}) - set(DEFAULT_MODALITIES)
    if unknown:
        raise SetupError(
            f"modalities has unknown key(s) {sorted(unknown)}; valid keys: "
            f"{list(DEFAULT_MODALITIES)}."
        )
    return {**DEFAULT_MODALITIES, **(modalities or {})}


def _modality(mdata, name: str, role: str):
    if name not in mdata.mod:
        raise SetupError(
            f"modalities[{role!r}]={name!r} is not a modality of the MuData (modalities: "
            f"{list(mdata.mod.keys())}); pass modalities={{{role!r}: <name>}}."
        )
    return mdata.mod[name]


def _aligned_column(source, key: str, cells: pd.Index, modality: str, role: str) -> np.ndarray:
    """``source.obs[key]`` for ``cells``, matched by cell name (never by position).

    Raises
    ------
    SetupError
        When ``source`` lacks some of ``cells``, or names a cell twice.
    """
    column = source.obs[key]
    if source.obs_names.equals(cells):
        return column.to_numpy()
    if not source.obs_names.is_unique:
        raise SetupError(f"mdata.mod[{modality!r}] names some cells twice (obs_names not "
                         f"unique), so {role}={key!r} cannot be matched to the RNA cells by "
                         "name; call .obs_names_make_unique() on it.")
    missing = cells.difference(source.obs_names)
    if len(missing):
        raise SetupError(
            f"{role}={key!r} is read from mdata.mod[{modality!r}], which lacks {len(missing)} "
            f"of the RNA modality's cells (e.g. {list(missing[:3])}); its values are matched to "
            "the cells by name. Give that modality every RNA cell, or read the column from "
            "another modality with modalities=.")
    # Another order of the same cells: match by name.
    return column.reindex(cells).to_numpy()


def setup_obs_keys(
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: Sequence[str] | None = None,
    continuous_covariate_keys: Sequence[str] | None = None,
) -> dict[str, list[str]]:
    """The obs columns each setup argument names (only the arguments that name any), as
    :func:`flatten_mudata`'s ``obs_keys``.

    Parameters
    ----------
    batch_key, labels_key, size_factor_key
        Single obs columns (or ``None``).
    categorical_covariate_keys, continuous_covariate_keys
        Lists of obs columns (or ``None``).

    Returns
    -------
    dict
        ``{argument: [columns]}``.
    """
    keys = {
        "batch_key": [batch_key],
        "labels_key": [labels_key],
        "size_factor_key": [size_factor_key],
        "categorical_covariate_keys": list(categorical_covariate_keys or []),
        "continuous_covariate_keys": list(continuous_covariate_keys or []),
    }
    return {role: [k for k in ks if k] for role, ks in keys.items() if any(ks)}


def flatten_mudata(
    mdata,
    modalities: dict[str, str],
    rna_layer: str | None = None,
    protein_layer: str | None = None,
    obs_keys: dict[str, list[str]] | None = None,
) -> anndata.AnnData:
    """One AnnData with the RNA and protein counts of ``mdata`` and the needed obs columns.

    Parameters
    ----------
    mdata
        MuData with an RNA and a protein modality over the same cells.
    modalities
        Modality of each setup argument (see :func:`resolve_modalities`).
    rna_layer, protein_layer
        Layers of the two modalities holding raw counts (``None``: ``X``).
    obs_keys
        For each setup argument naming obs columns (``batch_key``...), the columns to take
        from that argument's modality.

    Returns
    -------
    anndata.AnnData
        RNA counts in ``X`` (the modality's own matrix, not a copy), the RNA modality's
        ``var`` and ``obs`` (plus the requested columns of other modalities), protein counts
        as a DataFrame in ``obsm["protein_expression"]``.

    Raises
    ------
    SetupError
        Missing modality, layer or obs column, or modalities with different cells.
    """
    rna = _modality(mdata, modalities["rna_layer"], "rna_layer")
    protein = _modality(mdata, modalities["protein_layer"], "protein_layer")
    if not rna.obs_names.equals(protein.obs_names):
        only_rna = rna.obs_names.difference(protein.obs_names)
        only_protein = protein.obs_names.difference(rna.obs_names)
        detail = (
            "the same cells in a different order" if not len(only_rna) and not len(only_protein)
            else f"{len(only_rna)} cells only in RNA (e.g. {list(only_rna[:3])}) and "
                 f"{len(only_protein)} only in protein (e.g. {list(only_protein[:3])})"
        )
        raise SetupError(
            f"The RNA and protein modalities do not have the same cells: {detail}. Keep the "
            "shared cells in the same order, e.g. muon.pp.intersect_obs(mdata)."
        )
    obs = rna.obs.copy()
    for role, keys in (obs_keys or {}).items():
        source = _modality(mdata, modalities[role], role)
        for key in keys:
            if key not in source.obs.columns:
                raise SetupError(
                    f"{role}={key!r} is not a column of mdata.mod[{modalities[role]!r}].obs "
                    f"(columns: {list(source.obs.columns)}); name the modality that has it "
                    f"with modalities={{{role!r}: <modality>}}."
                )
            obs[key] = _aligned_column(source, key, rna.obs_names, modalities[role], role)
    proteins = counts_matrix(protein, protein_layer)
    proteins = proteins.toarray() if sp.issparse(proteins) else np.asarray(proteins)
    flat = anndata.AnnData(X=counts_matrix(rna, rna_layer), obs=obs, var=rna.var.copy())
    flat.obsm[MUDATA_PROTEIN_KEY] = pd.DataFrame(
        proteins, index=obs.index, columns=[str(p) for p in protein.var_names])
    return flat


def flatten_query(query, registry, obs_keys: dict[str, list[str]]):
    """The flat AnnData of a reference-mapping query, laid out as the reference was.

    ``query`` is returned as it is unless it is a MuData; then the reference must have been
    set up from one (``registry.mudata_modalities``), and the query's modalities are read
    as the reference's were. ``obs_keys`` gives the obs columns of each setup argument the
    query must carry; the labels are taken where the query has them.
    """
    if not is_mudata(query):
        return query
    fields = registry.mudata_modalities
    if not fields:
        raise SetupError("The reference was set up from an AnnData; pass the query as an "
                         "AnnData with the same layout.")
    obs_keys = dict(obs_keys)
    if registry.labels_key is not None:
        labels_modality = query.mod.get(fields["labels_key"])
        if labels_modality is not None and registry.labels_key in labels_modality.obs:
            obs_keys["labels_key"] = [registry.labels_key]
    return flatten_mudata(query, fields, fields["rna_layer_name"] or None,
                          fields["protein_layer_name"] or None,
                          {role: keys for role, keys in obs_keys.items() if keys})
