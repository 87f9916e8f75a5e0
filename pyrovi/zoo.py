"""The model zoo under its documented name and ``python -m pyrovi.zoo``.

The zoo lives in :mod:`pyrovi.io.zoo`; this module keeps ``pyrovi.zoo.<name>`` and the
command line working.
"""

from pyrovi.io.zoo import (
    available_models,
    default_data_dir,
    load_pretrained,
    main,
    model_path,
    models_dir,
    read_config,
    top_variable_genes,
    train_reference,
)

__all__ = [
    "available_models",
    "default_data_dir",
    "load_pretrained",
    "main",
    "model_path",
    "models_dir",
    "read_config",
    "top_variable_genes",
    "train_reference",
]

if __name__ == "__main__":
    main()
