"""The non-zero entries of a dense count minibatch, as the loader found them.

On the CPU the count likelihoods evaluate their lgamma/digamma terms at the non-zero counts
only, and finding them in a dense minibatch (``torch.nonzero``) costs as much as gathering
the minibatch itself. When the minibatch is densified from CSR rows the positions are
already known: the loader returns them next to the dense counts, in the minibatch field
``x_nonzero`` (:data:`pyrovi.data.NONZERO_FIELD`); the model passes them to its count
distribution (``nonzero=``), which hands them to the log-density.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class NonzeroPositions(NamedTuple):
    """The non-zero entries of the dense count tensor ``counts``.

    The log-densities use them only for that very tensor (``value is positions.counts``),
    so positions never describe another value (a posterior predictive draw, a copy); the
    tensor must not be modified in place after they were recorded.
    """

    #: int64 positions in the flattened tensor, ascending.
    flat: torch.Tensor
    #: int64 column (last-dimension) index of each.
    columns: torch.Tensor
    #: Their values, in the tensor's dtype.
    values: torch.Tensor
    #: The dense tensor they describe.
    counts: torch.Tensor

    def describe(self, x: torch.Tensor) -> bool:
        """Whether these are the non-zero entries of ``x`` (the very tensor recorded)."""
        return x is self.counts
