"""The model classes a saved file may name, registered by the classes themselves.

A model file, a zoo ``config.json`` or a checkpoint names its model class as text. Loading
turns that text into a class only through this table, so a file can never name something
else; and the file-format layer (:mod:`pyrovi.io`) finds the classes without importing the
model layer above it. Each model class registers itself with :func:`register_model_class`
where it is defined.
"""

from __future__ import annotations

_MODEL_CLASSES: dict[str, type] = {}


def register_model_class(cls: type) -> type:
    """Make ``cls`` loadable by its name (a class decorator).

    Parameters
    ----------
    cls
        A model class with ``load`` (pyrovi's :class:`~pyrovi.models.base.BaseModel`
        subclasses).

    Returns
    -------
    type
        ``cls`` itself.

    Examples
    --------
    >>> @register_model_class  # doctest: +SKIP
    ... class MyModel(BaseModel): ...
    """
    _MODEL_CLASSES[cls.__name__] = cls
    return cls


def model_class(name: str) -> type:
    """The registered model class called ``name``.

    Parameters
    ----------
    name
        Class name read from a file (``"SCVI"``, ``"LDVAE"``, ``"TOTALVI"``...).

    Returns
    -------
    type

    Raises
    ------
    ValueError
        When no model class of that name is registered.
    """
    if name not in _MODEL_CLASSES:
        known = ", ".join(sorted(_MODEL_CLASSES)) or "none registered: import pyrovi first"
        raise ValueError(f"{name!r} is not a pyrovi model class ({known}).")
    return _MODEL_CLASSES[name]


def model_class_names() -> list[str]:
    """Names of the registered model classes, sorted."""
    return sorted(_MODEL_CLASSES)
