"""Read scvi-tools' ``model.pt`` (a torch pickle) without letting it run code.

scvi-tools saves a model with ``torch.save``: a pickle holding the weights, the gene names,
the constructor arguments and the set-up registry (plain Python values and numpy arrays),
and the training history (pandas DataFrames). A pickle may name any importable callable
and have it called while it is read, so pyrovi reads these files only with PyTorch's
restricted unpickler (``torch.load(weights_only=True)``), extended by the explicit
allowlist below and nothing else:

- numpy arrays, dtypes and scalars (the gene names, category mappings and indices);
- ``collections.defaultdict`` read as a plain ``dict`` (scvi-tools' field registries);
- ``builtins`` ``dict``, ``bytes``, ``slice``;
- pandas objects, which only the training history uses, are *never constructed*: each
  pandas name read is bound to :class:`NotRead`, an inert placeholder that swallows its
  arguments, so no pandas code runs on the file's values. The history is therefore not
  imported.

Any other name in the file (``os.system``, ``builtins.eval``, a class of some package)
makes reading fail with :class:`~pyrovi.io.bundle.ModelFileError` naming it, before
anything is called.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Iterable

import numpy as np
import torch

from pyrovi.io.bundle import ModelFileError


class NotRead:
    """Placeholder for an object that pyrovi does not construct from an scvi-tools file.

    Stands for pandas objects (the training history): it accepts and discards whatever
    the pickle passes, so reading the file runs none of pandas' code.
    """

    def __new__(cls, *args, **kwargs):
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state) -> None:
        pass

    def __repr__(self) -> str:
        return "NotRead()"


def _not_read(*args, **kwargs) -> NotRead:
    return NotRead()


def _plain_dict(*args, **kwargs) -> dict:
    # defaultdict(dict) in the file: the default factory is irrelevant to reading.
    return {}


#: numpy's reconstruction functions, under the module paths numpy 1.x and 2.x pickle them.
_NUMPY_CORE = ("numpy.core.multiarray", "numpy._core.multiarray")

#: pandas names found in scvi-tools 1.4/1.5 files (the training history DataFrames).
_PANDAS_NAMES = (
    "pandas.DataFrame",
    "pandas.core.frame.DataFrame",
    "pandas.Index",
    "pandas.core.indexes.base.Index",
    "pandas.RangeIndex",
    "pandas.core.indexes.range.RangeIndex",
    "pandas.core.indexes.base._new_Index",
    "pandas.core.internals.managers.BlockManager",
    "pandas.core.internals.blocks.new_block",
    "pandas._libs.internals._unpickle_block",
    "pandas._libs.arrays.__pyx_unpickle_NDArrayBacked",
    "pandas.arrays.StringArray",
    "pandas.core.arrays.string_.StringArray",
    "pandas.StringDtype",
    "pandas.core.arrays.string_.StringDtype",
    "pandas.core.arrays.string_arrow.ArrowStringArray",
    "pandas.Series",
    "pandas.core.series.Series",
)


def _allowlist() -> list[tuple[object, str]]:
    """``(object, name)`` pairs: what each name allowed in an scvi-tools file is bound to."""
    entries: list[tuple[object, str]] = [
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
        (_plain_dict, "collections.defaultdict"),
        (dict, "builtins.dict"),
        (bytes, "builtins.bytes"),
        (slice, "builtins.slice"),
        # Never named by a file; listed so that the placeholders' state can be discarded.
        (NotRead, "pyrovi.io.scvi_tools.safe_pickle.NotRead"),
    ]
    # The functions numpy's own pickles name, found through numpy's public pickling
    # protocol rather than its private module.
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.float64(0).__reduce__()[0]
    for module in _NUMPY_CORE:
        entries.append((reconstruct, f"{module}.{reconstruct.__name__}"))
        entries.append((scalar, f"{module}.{scalar.__name__}"))
    # numpy >= 1.25 pickles a dtype through its class (numpy.dtypes.Float32DType...).
    for name in dir(np.dtypes):
        if name.endswith("DType"):
            entries.append((getattr(np.dtypes, name), f"numpy.dtypes.{name}"))
    # A class and a function each need their own placeholder object: the unpickler checks
    # "is this object allowlisted" for classes (NEWOBJ) and callables (REDUCE) alike.
    for name in _PANDAS_NAMES:
        leaf = name.rsplit(".", 1)[1]
        entries.append((_not_read if leaf[:1].islower() or leaf.startswith("_") else
                        type(leaf, (NotRead,), {}), name))
    return entries


def allowed_names() -> list[str]:
    """The global names (``module.name``) an scvi-tools file may contain.

    Returns
    -------
    list of str
    """
    return sorted(name for _, name in _allowlist())


def read_model_pt(path: str | os.PathLike, extra_allowed: Iterable = ()) -> dict:
    """The content of an scvi-tools ``model.pt``, read without running code from it.

    Parameters
    ----------
    path
        The file.
    extra_allowed
        More objects to allow (only for tests of the allowlist itself).

    Returns
    -------
    dict
        ``model_state_dict`` (tensors), ``var_names`` (numpy array) and ``attr_dict``;
        pandas objects in it are :class:`NotRead` placeholders.

    Raises
    ------
    ModelFileError
        The file is missing, is not a torch file, is damaged, or names a global outside
        the allowlist (the message names it).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelFileError(f"{path!r} does not exist: an scvi-tools model folder holds a "
                             "model.pt file.")
    try:
        with torch.serialization.safe_globals([*_allowlist(), *extra_allowed]):
            content = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ModelFileError(
            f"{path!r} holds something pyrovi does not read from an scvi-tools file ("
            f"{_unpickler_reason(error)}). pyrovi reads model.pt with PyTorch's weights-only "
            "unpickler and an allowlist of numpy types, so a file cannot run code; a file "
            "that needs more was not written by scvi-tools 1.x, or was altered."
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        raise ModelFileError(
            f"{path!r} is not a readable torch file ({_first_line(error)}); it may be "
            "truncated or damaged: download or save it again."
        ) from None
    if not isinstance(content, dict) or "model_state_dict" not in content:
        raise ModelFileError(
            f"{path!r} is a torch file but not an scvi-tools model (no model_state_dict); "
            "scvi-tools 1.x writes model.pt with model.save(dir_path)."
        )
    return content


#: Lines of PyTorch's message around the unpickler's own reason (advice, links).
_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation",
                "WeightsUnpickler error")


def _unpickler_reason(error: BaseException) -> str:
    """The restricted unpickler's own reason, without PyTorch's advice to disable it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(_BOILERPLATE)]
    return reasons[0] if reasons else type(error).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
