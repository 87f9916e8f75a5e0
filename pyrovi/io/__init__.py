"""Files a user saves and loads: models and checkpoints as data only (``pyrovi.io``).

Nothing read here can run code: JSON and safetensors files in folders with a manifest of
SHA-256 digests (:mod:`~pyrovi.io.bundle`), and pyrovi 0.1.0's pickled ``model.pt`` through
a restricted reader (:mod:`~pyrovi.io.legacy`).
"""

from pyrovi.io.bundle import FORMAT_VERSION, Bundle, ModelFileError, write_bundle
from pyrovi.io.legacy import read_legacy_model
from pyrovi.io.model_files import SavedModel, save_model_folder

__all__ = [
    "FORMAT_VERSION",
    "Bundle",
    "ModelFileError",
    "SavedModel",
    "read_legacy_model",
    "save_model_folder",
    "write_bundle",
]
