"""AnnData registration, validation, device tensors and on-disk data (``pyrovi.data``)."""

from pyrovi.data.annbatch_loader import AnnbatchCellData
from pyrovi.data.fields import (
    BatchField,
    CategoricalCovariatesField,
    ContinuousCovariatesField,
    CountsField,
    DataField,
    LabelsField,
    SizeFactorField,
    standard_fields,
)
from pyrovi.data.labels import (
    CLASSIFICATION_WEIGHT_FIELD,
    LabelledEpochs,
    LabelsWithUnlabeledField,
)
from pyrovi.data.loaders import build_cell_tensors
from pyrovi.data.minified import (
    MinifiedDataError,
    StoredPosteriorField,
    is_minified,
    minify_type,
)
from pyrovi.data.ondisk import OnDiskMatrix, is_on_disk, read_ondisk
from pyrovi.data.proteins import (
    ProteinField,
    check_protein_names,
    protein_matrix,
    read_protein_field,
)
from pyrovi.data.registry import (
    REGISTRY_UNS_KEY,
    AnnDataRegistry,
    SetupError,
    check_var_names,
    get_registry,
    register_new_data,
    setup_anndata,
)
from pyrovi.data.streaming import OnDiskCellData
from pyrovi.data.tensors import (
    NONZERO_FIELD,
    ArrayTensors,
    CellData,
    CellTensors,
    CountMatrix,
    as_cell_data,
    call_arguments,
)
from pyrovi.data.validation import CountDataError, cell_totals, validate_counts

__all__ = [
    "CLASSIFICATION_WEIGHT_FIELD",
    "NONZERO_FIELD",
    "REGISTRY_UNS_KEY",
    "AnnDataRegistry",
    "AnnbatchCellData",
    "ArrayTensors",
    "BatchField",
    "CategoricalCovariatesField",
    "CellData",
    "CellTensors",
    "ContinuousCovariatesField",
    "CountDataError",
    "CountMatrix",
    "CountsField",
    "DataField",
    "LabelledEpochs",
    "LabelsField",
    "LabelsWithUnlabeledField",
    "MinifiedDataError",
    "OnDiskCellData",
    "OnDiskMatrix",
    "ProteinField",
    "SetupError",
    "SizeFactorField",
    "StoredPosteriorField",
    "as_cell_data",
    "build_cell_tensors",
    "call_arguments",
    "cell_totals",
    "check_protein_names",
    "check_var_names",
    "get_registry",
    "is_minified",
    "is_on_disk",
    "minify_type",
    "protein_matrix",
    "read_ondisk",
    "read_protein_field",
    "register_new_data",
    "setup_anndata",
    "standard_fields",
    "validate_counts",
]
