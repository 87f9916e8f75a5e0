"""AnnData registration, validation and device tensors (``pyrovi.data``)."""

from pyrovi.data.proteins import check_protein_names, protein_matrix, read_protein_field
from pyrovi.data.registry import (
    REGISTRY_UNS_KEY,
    AnnDataRegistry,
    SetupError,
    check_var_names,
    get_registry,
    register_new_data,
    setup_anndata,
)
from pyrovi.data.tensors import (
    ArrayTensors,
    CellTensors,
    CountMatrix,
    as_cell_data,
    build_cell_tensors,
)
from pyrovi.data.validation import CountDataError, cell_totals, validate_counts

__all__ = [
    "REGISTRY_UNS_KEY",
    "AnnDataRegistry",
    "ArrayTensors",
    "CellTensors",
    "CountDataError",
    "CountMatrix",
    "SetupError",
    "as_cell_data",
    "build_cell_tensors",
    "cell_totals",
    "check_protein_names",
    "check_var_names",
    "get_registry",
    "protein_matrix",
    "read_protein_field",
    "register_new_data",
    "setup_anndata",
    "validate_counts",
]
