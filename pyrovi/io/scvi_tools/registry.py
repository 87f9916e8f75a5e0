"""scvi-tools' set-up registry (``attr_dict["registry_"]``) as pyrovi's, and back.

scvi-tools records ``setup_anndata``'s arguments (``setup_args``) and, per field, the
category order it encoded (``field_registries[<field>]["state_registry"]``). pyrovi's
:class:`~pyrovi.data.AnnDataRegistry` records the same facts under the same argument names,
so new data are encoded in the same category order in either library.
"""

from __future__ import annotations

import numpy as np

from pyrovi.data import AnnDataRegistry

#: ``setup_anndata`` arguments both libraries share (scvi-tools' SCVI/LinearSCVI names).
SHARED_SETUP_ARGS = ("layer", "batch_key", "labels_key", "size_factor_key",
                     "categorical_covariate_keys", "continuous_covariate_keys")
#: scvi-tools' obs column of a batch or label field set up without a key.
_DEFAULT_COLUMNS = {"batch": "_scvi_batch", "labels": "_scvi_labels"}


def strings(values) -> list[str]:
    return [str(v) for v in np.asarray(values, dtype=object).ravel()]


def _state(fields: dict, name: str) -> dict:
    return dict((fields.get(name) or {}).get("state_registry") or {})


def registry_from_scvi_tools(registry: dict, model_name: str, n_vars: int,
                             other_setup_args: tuple[str, ...] = ()) -> dict:
    """pyrovi's registry (:meth:`AnnDataRegistry.to_dict` form) from scvi-tools' ``registry_``.

    Parameters
    ----------
    registry
        ``attr_dict["registry_"]`` of an scvi-tools model file.
    model_name
        The pyrovi class the registry is for.
    n_vars
        Number of genes.
    other_setup_args
        Set-up arguments the caller maps itself (a model's own fields), not refused here.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        A set-up argument pyrovi does not read (named), or a registry without
        ``setup_args``.
    """
    setup = registry.get("setup_args")
    if not isinstance(setup, dict):
        raise ValueError("The scvi-tools registry has no setup_args; the file was not written "
                         "by scvi-tools 1.x.")
    unknown = sorted(k for k, v in setup.items()
                     if k not in SHARED_SETUP_ARGS + other_setup_args and v)
    if unknown:
        raise ValueError(
            f"The scvi-tools model was set up with {unknown}, which pyrovi's "
            f"{model_name}.setup_anndata does not have."
        )
    fields = dict(registry.get("field_registries") or {})
    record = AnnDataRegistry(model_name=model_name, n_vars=int(n_vars))
    record.layer = setup.get("layer")
    record.size_factor_key = setup.get("size_factor_key")
    for field, key_name, categories in (("batch", "batch_key", "batch_categories"),
                                        ("labels", "labels_key", "label_categories")):
        key = setup.get(key_name)
        setattr(record, key_name, key)
        if key is not None:
            setattr(record, categories, strings(_state(fields, field)["categorical_mapping"]))
    record.categorical_covariate_keys = list(setup.get("categorical_covariate_keys") or [])
    mappings = _state(fields, "extra_categorical_covs").get("mappings", {})
    record.covariate_categories = {key: strings(mappings[key])
                                   for key in record.categorical_covariate_keys}
    record.continuous_covariate_keys = list(setup.get("continuous_covariate_keys") or [])
    record.n_cells = int(_state(fields, "X").get("n_obs", 0))
    return record.to_dict()


def registry_to_scvi_tools(registry: AnnDataRegistry, var_names, model_name: str,
                           scvi_version: str) -> dict:
    """scvi-tools' ``registry_`` for a model set up as ``registry`` describes.

    Parameters
    ----------
    registry
        The pyrovi model's registry.
    var_names
        Its genes.
    model_name
        scvi-tools' class name (``"SCVI"``, ``"LinearSCVI"``).
    scvi_version
        Version of scvi-tools to name in the file.

    Returns
    -------
    dict
        Plain values and numpy arrays, as scvi-tools writes them.
    """
    var_names = np.asarray([str(v) for v in var_names], dtype=object)

    def categorical(field: str, key: str | None, categories: list[str]) -> dict:
        column = _DEFAULT_COLUMNS[field]
        mapping = np.asarray(categories, dtype=object) if key is not None else np.array([0])
        count = {"batch": "n_batch", "labels": "n_labels"}[field]
        return {"data_registry": {"attr_key": column, "attr_name": "obs"},
                "state_registry": {"categorical_mapping": mapping,
                                   "original_key": key if key is not None else column},
                "summary_stats": {count: len(mapping)}}

    cat_keys = list(registry.categorical_covariate_keys)
    cont_keys = list(registry.continuous_covariate_keys)
    fields = {
        "X": {"data_registry": {"attr_key": registry.layer,
                                "attr_name": "layers" if registry.layer else "X"},
              "state_registry": {"n_obs": int(registry.n_cells), "n_vars": len(var_names),
                                 "column_names": var_names},
              "summary_stats": {"n_cells": int(registry.n_cells), "n_vars": len(var_names)}},
        "batch": categorical("batch", registry.batch_key, registry.batch_categories),
        "labels": categorical("labels", registry.labels_key, registry.label_categories),
        "size_factor": ({"data_registry": {"attr_key": registry.size_factor_key,
                                           "attr_name": "obs"},
                         "state_registry": {}, "summary_stats": {}}
                        if registry.size_factor_key else
                        {"data_registry": {}, "state_registry": {}, "summary_stats": {}}),
        "extra_categorical_covs": (
            {"data_registry": {"attr_key": "_scvi_extra_categorical_covs", "attr_name": "obsm"},
             "state_registry": {
                 "mappings": {k: np.asarray(registry.covariate_categories[k], dtype=object)
                              for k in cat_keys},
                 "field_keys": cat_keys,
                 "n_cats_per_key": [len(registry.covariate_categories[k]) for k in cat_keys]},
             "summary_stats": {"n_extra_categorical_covs": len(cat_keys)}}
            if cat_keys else {"data_registry": {}, "state_registry": {},
                              "summary_stats": {"n_extra_categorical_covs": 0}}),
        "extra_continuous_covs": (
            {"data_registry": {"attr_key": "_scvi_extra_continuous_covs", "attr_name": "obsm"},
             "state_registry": {"columns": np.asarray(cont_keys, dtype=object)},
             "summary_stats": {"n_extra_continuous_covs": len(cont_keys)}}
            if cont_keys else {"data_registry": {}, "state_registry": {},
                               "summary_stats": {"n_extra_continuous_covs": 0}}),
    }
    return {
        "scvi_version": scvi_version,
        "model_name": model_name,
        "setup_args": {"layer": registry.layer, "batch_key": registry.batch_key,
                       "labels_key": registry.labels_key,
                       "size_factor_key": registry.size_factor_key,
                       "categorical_covariate_keys": cat_keys or None,
                       "continuous_covariate_keys": cont_keys or None},
        "field_registries": fields,
        "setup_method_name": "setup_anndata",
    }
