"""Helpers shared by the distribution classes."""

from __future__ import annotations

from torch.distributions import Distribution


def repr_params(d: Distribution) -> str:
    """``Name(param: value-or-shape, ...)`` over ``d.arg_constraints``.

    torch's ``Distribution.__repr__`` only lists parameters stored in the instance
    ``__dict__``, which leaves out parameters exposed as properties (``mu`` of the
    Poisson, all three of the zero-inflated negative binomial).

    Parameters
    ----------
    d
        The distribution to describe.

    Returns
    -------
    str
        Scalars are shown by value, other parameters by shape, as torch does.
    """
    parts = []
    for name in d.arg_constraints:
        value = getattr(d, name)
        parts.append(f"{name}: {value if value.numel() == 1 else value.size()}")
    return f"{type(d).__name__}({', '.join(parts)})"
