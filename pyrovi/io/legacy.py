"""Reading pyrovi 0.1.0's ``model.pt`` without letting the file run code.

pyrovi 0.1.0 saved a model as one ``torch.save`` pickle. A pickle can name any Python
function to call while it is read, so these files are read with torch's restricted
unpickler (``weights_only=True``), which builds tensors, containers and plain values only,
plus an explicit allowlist: the three numpy names that 0.1.0 files use to store the
train/validation split (``numpy.ndarray``, its reconstructor and ``numpy.dtype``). Anything
else in the file is refused with a message that says the file may be unsafe.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from pyrovi.io.bundle import ModelFileError

#: File name of a pyrovi 0.1.0 saved model.
LEGACY_MODEL_FILE = "model.pt"


def _numpy_allowlist() -> list:
    # The function numpy pickles arrays with, found through the public pickle protocol.
    reconstruct = np.zeros(1).__reduce__()[0]
    dtype_classes = [type(np.dtype(t)) for t in (np.int64, np.int32, np.float32, np.float64,
                                                 np.bool_)]
    # Files written under numpy 1.x name the reconstructor by its old module path.
    return [np.ndarray, np.dtype, *dtype_classes, reconstruct,
            (reconstruct, "numpy.core.multiarray._reconstruct")]


def read_legacy_model(path: str | os.PathLike) -> dict:
    """The content of a pyrovi 0.1.0 ``model.pt``, read as data only.

    Parameters
    ----------
    path
        The ``model.pt`` file.

    Returns
    -------
    dict
        What 0.1.0's ``save`` stored: ``model_class``, ``init_params``, ``registry``,
        ``var_names``, ``state_dict``, ``history``, ``history_index``, the split, ...

    Raises
    ------
    ModelFileError
        The file holds anything but tensors, plain values and numpy arrays (it may be
        unsafe), or is not a pyrovi 0.1.0 model.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_numpy_allowlist()):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = [line.strip() for line in str(error).splitlines()
                 if "GLOBAL" in line or "global" in line or "but got" in line]
        raise ModelFileError(
            f"{os.fspath(path)!r} holds more than tensors, plain values and numpy arrays, "
            "so it was not read: the file may be unsafe (it could run code when loaded). "
            "Only load model files from sources you trust; a pyrovi 0.1.0 model holds "
            "nothing else." + (f" ({found[0][:200]})" if found else "")) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as error:
        raise ModelFileError(f"{os.fspath(path)!r} is not a readable torch file "
                             f"({str(error).splitlines()[0][:200]}).") from None
    if not isinstance(content, dict) or "model_class" not in content or "state_dict" not in \
            content:
        raise ModelFileError(f"{os.fspath(path)!r} is not a pyrovi 0.1.0 saved model.")
    return content


__all__ = ["LEGACY_MODEL_FILE", "read_legacy_model"]
