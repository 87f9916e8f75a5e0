"""Global settings of pyrovi (``pyrovi.settings``), as scvi-tools' ``scvi.settings``.

>>> import pyrovi
>>> pyrovi.settings.seed = 0  # doctest: +SKIP
"""

from __future__ import annotations

import numbers

import pyro


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int, or a clear error.

    Raises
    ------
    TypeError
        ``seed`` is not an integer (a float, a string...).
    ValueError
        ``seed`` is negative or does not fit numpy's generators (below 2**32).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {seed!r} ({type(seed).__name__}).")
    seed = int(seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"{name} must be between 0 and 2**32 - 1, got {seed}.")
    return seed


class Settings:
    """pyrovi's global settings.

    Attributes
    ----------
    seed
        Setting it seeds every generator pyrovi draws from (torch's on the CPU and CUDA,
        numpy's and Python's global ones), so that models built afterwards get the same
        initial weights, and training the same split, minibatches and Monte Carlo draws,
        in every fresh process. ``None`` until set. ``model.train(seed=...)`` seeds a run
        likewise, including the initial weights of a model that has not been trained or
        changed since it was built.
    """

    def __init__(self):
        self._seed: int | None = None

    @property
    def seed(self) -> int | None:
        """The last global seed set (``None``: never set in this process)."""
        return self._seed

    @seed.setter
    def seed(self, value: int | None) -> None:
        if value is None:
            self._seed = None
            return
        self._seed = check_seed(value, "pyrovi.settings.seed")
        # Seeds torch (CPU and every CUDA device), numpy and Python's random.
        pyro.set_rng_seed(self._seed)

    def __repr__(self) -> str:
        return f"pyrovi.settings(seed={self._seed!r})"


#: The settings object (``pyrovi.settings``).
settings = Settings()
