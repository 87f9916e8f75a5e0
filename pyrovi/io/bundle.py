"""Folders of data-only files with a manifest: the container of pyrovi's model files.

A *bundle* is a folder holding JSON files, safetensors files and (for a saved AnnData) an
h5ad file, plus ``manifest.json``, which names the bundle's kind (``"model"``,
``"checkpoint"``), the format version, the pyrovi version that wrote it and the size and
SHA-256 of every other file. None of these formats can run code when read: JSON and
safetensors are parsed, never unpickled, and h5ad is read by anndata as arrays.

Reading checks the manifest first, then each file's size and digest before parsing the
exact bytes that were checked, so a corrupted or altered file is refused with a message
naming it, instead of loading as NaN weights. The digests protect against accidents
(a truncated download, a disk error, an edited file), not against someone who rewrites the
manifest too; the file formats are what keeps a hostile bundle from running code.

Writing goes to a temporary folder beside the target, flushed to disk, and is then swapped
in: an interrupted write leaves the previous bundle intact, and no file of the previous
bundle survives in the new one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pyrovi._version import __version__

MANIFEST = "manifest.json"
#: Version of the bundle format; pyrovi 0.1.0's single pickled ``model.pt`` was version 1.
FORMAT_VERSION = 2
_FORMAT = "pyrovi"
_PARTIAL = ".partial-"
_REPLACED = ".replaced-"


class ModelFileError(ValueError):
    """A file that pyrovi refuses to read: not a pyrovi file, corrupted, altered or unsafe."""


# -- plain JSON values ---------------------------------------------------------------------


def to_json_value(value):
    """``value`` as plain JSON values: lists, dicts with string keys, numbers, strings, None.

    numpy scalars and arrays become Python numbers and lists, tuples become lists and
    non-finite floats become ``None`` (JSON has no NaN).

    Raises
    ------
    TypeError
        For anything else (a callable, a tensor, an arbitrary object).
    """
    if isinstance(value, Mapping):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_value(v) for v in value]
    if isinstance(value, np.ndarray):
        return [to_json_value(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or value is None or isinstance(value, int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"{type(value).__name__} is not a plain value that JSON can hold: {value!r}")


def json_bytes(value) -> bytes:
    """UTF-8 JSON of ``value`` (see :func:`to_json_value`)."""
    return json.dumps(to_json_value(value), indent=1, allow_nan=False).encode()


# -- writing -------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_directory(directory: Path) -> None:
    # A rename is durable once the directory entry is on disk; Windows cannot open a folder.
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def tensor_file(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of named tensors (moved to the CPU, made contiguous)."""
    return save_safetensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def _exchange_function():
    """``renameat2(RENAME_EXCHANGE)`` of the C library, where there is one (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                         ctypes.c_uint]
    return function


def _swap_in(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``, whose previous folder is deleted afterwards.

    On Linux the two folders are exchanged in one atomic step (``RENAME_EXCHANGE``): at
    every moment ``target`` is either the old or the new bundle. Elsewhere the old folder is
    first renamed aside, then the new one renamed in.
    """
    exchange = _exchange_function()
    at_cwd = -100  # AT_FDCWD
    if exchange is not None and exchange(at_cwd, os.fsencode(new), at_cwd, os.fsencode(target),
                                         2) == 0:  # 2: RENAME_EXCHANGE
        shutil.rmtree(new, ignore_errors=True)  # now the old bundle
        return
    aside = target.with_name(f".{target.name}{_REPLACED}{uuid.uuid4().hex[:8]}")
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def _foreign_files(path: Path) -> list[str]:
    """Names in the folder ``path`` that are not part of the pyrovi bundle (or 0.1.0 model)
    it holds; every name when it holds none."""
    names = sorted(p.name for p in path.iterdir())
    try:
        listed = set(json.loads((path / MANIFEST).read_bytes())["files"])
        ours = listed | {MANIFEST}
    except (OSError, ValueError, KeyError, TypeError):
        ours = {"model.pt", "adata.h5ad"} if "model.pt" in names else set()
    return [name for name in names if name not in ours]


def write_bundle(
    path: str | os.PathLike,
    kind: str,
    files: Mapping[str, bytes | Callable[[Path], None]],
    overwrite: bool = False,
) -> Path:
    """Write a bundle folder (see the module docstring) atomically.

    Parameters
    ----------
    path
        The folder to create.
    kind
        What the bundle holds (``"model"``, ``"checkpoint"``), checked when it is read.
    files
        ``{file name: content}``: bytes (from :func:`json_bytes`, :func:`tensor_file`), or a
        function that writes the file at the path it is given (e.g. an AnnData's
        ``write_h5ad``).
    overwrite
        Replace an existing bundle at ``path`` (or a pyrovi 0.1.0 model folder). A folder
        that holds anything else is never replaced (those files are the user's).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` exists and ``overwrite`` is false, or it holds files that are not part
        of a pyrovi bundle.
    """
    target = Path(path)
    if target.exists():
        if not overwrite:
            raise FileExistsError(
                f"{os.fspath(target)!r} exists; pass overwrite=True to replace it.")
        if not target.is_dir():
            raise FileExistsError(f"{os.fspath(target)!r} is a file, not a pyrovi folder; "
                                  "choose another path.")
        foreign = _foreign_files(target)
        if foreign:
            raise FileExistsError(
                f"{os.fspath(target)!r} holds files that pyrovi did not write there "
                f"({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); "
                "overwrite=True replaces a folder of pyrovi's own only, so that nothing else "
                "is lost. Choose another path, or move those files.")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}{_PARTIAL}{uuid.uuid4().hex[:8]}")
    partial.mkdir()
    try:
        _write_files(partial, target, kind, files)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        full = " (the disk is full)" if error.errno == errno.ENOSPC else ""
        raise OSError(error.errno, f"Could not write {os.fspath(target)!r}: "
                      f"{error.strerror or error}{full}. Nothing was replaced: what was there "
                      "before is intact.") from error
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _fsync_directory(target.parent)
    return target


def _write_files(partial: Path, target: Path, kind: str, files: Mapping) -> None:
    """Write ``files`` and the manifest into ``partial``, then put it at ``target``."""
    entries = {}
    for name, content in files.items():
        if name == MANIFEST or Path(name).name != name:
            raise ValueError(f"{name!r} is not a valid bundle file name.")
        file = partial / name
        if callable(content):
            content(file)
            digest = _file_sha256(file)
        else:
            _write_bytes(file, content)
            digest = _sha256(content)
        entries[name] = {"bytes": file.stat().st_size, "sha256": digest}
    manifest = {"format": _FORMAT, "kind": kind, "format_version": FORMAT_VERSION,
                "pyrovi_version": __version__, "files": entries}
    _write_bytes(partial / MANIFEST, json_bytes(manifest))
    _fsync_directory(partial)
    if target.exists():
        _swap_in(partial, target)
    else:
        os.replace(partial, target)


# -- reading -------------------------------------------------------------------------------


class Bundle:
    """A bundle folder whose manifest has been read; files are checked when they are read.

    Parameters
    ----------
    path
        The folder.
    kind
        The kind the caller expects.

    Raises
    ------
    FileNotFoundError
        No bundle at ``path``.
    ModelFileError
        The manifest is unreadable, of another kind, or from a newer pyrovi.
    """

    def __init__(self, path: str | os.PathLike, kind: str):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"No pyrovi {kind} at {os.fspath(self.path)!r} "
                                    f"(no {MANIFEST}).")
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except (ValueError, UnicodeDecodeError) as error:
            raise ModelFileError(f"{os.fspath(manifest_path)!r} is not a readable pyrovi "
                                 f"manifest ({error}); the folder is damaged.") from None
        if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
            raise ModelFileError(f"{os.fspath(manifest_path)!r} is not a pyrovi manifest.")
        if manifest.get("kind") != kind:
            raise ModelFileError(f"{os.fspath(self.path)!r} holds a pyrovi "
                                 f"{manifest.get('kind')}, not a {kind}.")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ModelFileError(
                f"{os.fspath(self.path)!r} was written by pyrovi "
                f"{manifest.get('pyrovi_version')} in format {version}; this pyrovi "
                f"({__version__}) reads formats up to {FORMAT_VERSION}: update pyrovi.")
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise ModelFileError(f"{os.fspath(manifest_path)!r} lists no files.")
        self.kind = kind
        self.pyrovi_version = str(manifest.get("pyrovi_version"))
        self.files: dict[str, dict] = files

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _entry(self, name: str) -> dict:
        entry = self.files.get(name)
        if entry is None:
            raise ModelFileError(f"{os.fspath(self.path)!r} has no {name} in its manifest; "
                                 "the folder is incomplete.")
        if not (self.path / name).is_file():
            raise ModelFileError(f"{os.fspath(self.path / name)!r} is missing; the folder is "
                                 "incomplete.")
        return entry

    def _refuse(self, name: str, what: str):
        raise ModelFileError(
            f"{os.fspath(self.path / name)!r} {what} than its manifest records: the file was "
            "corrupted or altered after it was written, and is not read. Use an intact copy "
            "of the folder.")

    def read_bytes(self, name: str) -> bytes:
        """The bytes of file ``name``, checked against the manifest."""
        entry = self._entry(name)
        data = (self.path / name).read_bytes()
        if len(data) != entry.get("bytes"):
            self._refuse(name, "has another size")
        if _sha256(data) != entry.get("sha256"):
            self._refuse(name, "has other contents")
        return data

    def read_json(self, name: str):
        """The JSON value in file ``name``."""
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as error:
            raise ModelFileError(f"{os.fspath(self.path / name)!r} is not valid JSON "
                                 f"({error}).") from None

    def read_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The named tensors in safetensors file ``name`` (on the CPU)."""
        data = self.read_bytes(name)
        try:
            return load_safetensors(data)
        except (SafetensorError, ValueError) as error:
            raise ModelFileError(f"{os.fspath(self.path / name)!r} is not a valid safetensors "
                                 f"file ({error}).") from None

    def checked_path(self, name: str) -> Path:
        """The path of file ``name`` once its contents are checked (for readers of paths)."""
        entry = self._entry(name)
        path = self.path / name
        if path.stat().st_size != entry.get("bytes"):
            self._refuse(name, "has another size")
        if _file_sha256(path) != entry.get("sha256"):
            self._refuse(name, "has other contents")
        return path


__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "Bundle",
    "ModelFileError",
    "json_bytes",
    "tensor_file",
    "to_json_value",
    "write_bundle",
]
