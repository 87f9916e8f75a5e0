"""The protein field of multi-modal (CITE-seq) data: counts in ``obsm``, names, checks.

Protein (ADT) counts live in ``adata.obsm[key]``, either as a DataFrame whose columns are
the protein names or as an array whose names are in ``adata.uns[names_key]``. They are
validated like RNA counts (finite, non-negative integers), but a cell may have no protein
counts at all.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pyrovi.data.registry import AnnDataRegistry, SetupError
from pyrovi.data.validation import validate_counts


def protein_matrix(adata, key: str):
    """Cells × proteins counts of ``adata.obsm[key]`` (numpy array or scipy sparse).

    Raises
    ------
    SetupError
        If ``key`` is not in ``adata.obsm`` (the message lists the keys there are).
    """
    if key not in adata.obsm:
        raise SetupError(
            f"Protein counts {key!r} are not in adata.obsm (keys: {list(adata.obsm.keys())}). "
            "Store them as adata.obsm[key] (a DataFrame with protein names as columns, or an "
            "array with the names in adata.uns) and pass protein_expression_obsm_key=key."
        )
    values = adata.obsm[key]
    if isinstance(values, pd.DataFrame):
        return values.to_numpy()
    return values if sp.issparse(values) else np.asarray(values)


def read_protein_field(
    adata, key: str, names_uns_key: str | None = None, allow_non_integer: bool = False
) -> tuple[np.ndarray, list[str]]:
    """Validated protein counts and names of ``adata`` (nothing is written).

    Parameters
    ----------
    adata
        AnnData with protein counts in ``obsm[key]``.
    key
        ``obsm`` key of the counts.
    names_uns_key
        ``uns`` key of the names when ``obsm[key]`` is an array (default names
        ``protein_0 ..`` when neither columns nor this key give them).
    allow_non_integer
        Accept non-integer values.

    Returns
    -------
    counts, names
        Dense float32 cells × proteins counts and the protein names.

    Raises
    ------
    SetupError
        Missing key, names or cells that do not match, duplicated names.
    CountDataError
        Negative, NaN, infinite or non-integer counts (the message points at the first).
    """
    matrix = protein_matrix(adata, key)
    values = adata.obsm[key]
    if isinstance(values, pd.DataFrame):
        if not values.index.equals(adata.obs_names):
            raise SetupError(
                f"The rows of adata.obsm[{key!r}] are not the cells of adata (index differs "
                "from adata.obs_names); align it with df.loc[adata.obs_names]."
            )
        names = [str(c) for c in values.columns]
    elif names_uns_key is not None:
        if names_uns_key not in adata.uns:
            raise SetupError(
                f"protein_names_uns_key={names_uns_key!r} is not in adata.uns "
                f"(keys: {list(adata.uns.keys())})."
            )
        names = [str(n) for n in np.asarray(adata.uns[names_uns_key]).ravel()]
    else:
        names = [f"protein_{i}" for i in range(matrix.shape[1])]
    if len(names) != matrix.shape[1]:
        raise SetupError(
            f"{len(names)} protein names for {matrix.shape[1]} columns of adata.obsm[{key!r}]."
        )
    if matrix.shape[1] == 0:
        raise SetupError(f"adata.obsm[{key!r}] has no protein columns.")
    if len(set(names)) != len(names):
        duplicated = pd.Index(names)[pd.Index(names).duplicated()]
        raise SetupError(f"Protein names are not unique (e.g. {list(duplicated[:5])}).")
    dense = matrix.toarray() if sp.issparse(matrix) else matrix
    dense = np.asarray(dense, dtype=np.float32)
    validate_counts(
        dense, source=f"adata.obsm[{key!r}]", obs_names=adata.obs_names, var_names=names,
        allow_non_integer=allow_non_integer, allow_empty_cells=True,
    )
    return dense, names


def check_protein_names(registry: AnnDataRegistry, adata) -> None:
    """Check that new data carry the model's proteins, in the model's order.

    Raises
    ------
    SetupError
        Naming the missing and extra proteins and how to fix them.
    """
    _, names = read_protein_field(adata, registry.protein_expression_obsm_key,
                                  allow_non_integer=registry.allow_non_integer)
    if isinstance(adata.obsm[registry.protein_expression_obsm_key], pd.DataFrame):
        expected = registry.protein_names
        if names != expected:
            missing = sorted(set(expected) - set(names))
            extra = sorted(set(names) - set(expected))
            raise SetupError(
                f"The proteins of adata.obsm[{registry.protein_expression_obsm_key!r}] do not "
                f"match the model's: missing {missing[:10]}, extra {extra[:10]}"
                + ("" if missing or extra else " (same proteins, different order)")
                + ". Reorder the columns to the model's proteins "
                "(df[model.protein_names]); a protein not measured can be a zero column."
            )
    elif len(names) != registry.n_proteins:
        raise SetupError(
            f"adata has {len(names)} proteins, the model {registry.n_proteins}."
        )
