"""What the reports of :mod:`pyrovi.criticism` need from a trained model.

:class:`TrainedModel` declares every attribute and method that the posterior predictive
checks, the ArviZ export and the model card read from the model they report on, so that
the reports depend on this interface rather than on a model class (the model classes of
:mod:`pyrovi.models` sit above the criticism layer and implement it). A model of your own
can be checked by the same reports once it provides these members.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from anndata import AnnData

    from pyrovi.data import AnnDataRegistry, CellData

__all__ = ["TrainedModel", "check_trained_model", "feature_columns"]


@runtime_checkable
class TrainedModel(Protocol):
    """A trained model as the criticism reports see it.

    Implemented by :class:`pyrovi.models.base.BaseModel` (``SCVI``, ``LDVAE``,
    ``TOTALVI``, ...). ``isinstance(model, TrainedModel)`` checks that every member exists
    (not their signatures).

    Attributes
    ----------
    module
        The Pyro model/guide pair (an ``nn.Module``). The reports read its
        ``observed_sites`` (names of the observed sample sites), ``site_dims`` (``{site:
        dimension names after the cell axis}``), ``n_latent`` and, for the ArviZ export,
        ``use_observed_lib_size`` and ``observed_log_library``.
    adata
        The AnnData the model was built on (for a multi-modal model set up from a MuData:
        its flattened AnnData).
    registry
        :class:`~pyrovi.data.AnnDataRegistry` of ``adata``: the set-up arguments, category
        names and summary that the model card lists, the declared data fields (whose
        ``modality`` names the observed modalities the checks select) and the batch names.
    is_trained
        Whether the model has been trained (or loaded trained).
    history
        Per-epoch training history (``pandas.DataFrame``), ``None`` before training.
    init_params
        The constructor's arguments.
    train_params
        The arguments of the last ``train`` call, ``None`` before training.
    train_indices, validation_indices
        Positions of the training and validation cells in ``adata`` (``None`` before
        training).
    """

    module: torch.nn.Module
    adata: AnnData
    registry: AnnDataRegistry
    is_trained: bool
    history: pd.DataFrame | None
    init_params: dict
    train_params: dict | None
    train_indices: np.ndarray | None
    validation_indices: np.ndarray | None

    def as_anndata(self, data) -> AnnData:
        """The AnnData the model reads from ``data`` (a multi-modal model flattens a MuData
        set up for it; other data is returned as it is)."""
        ...

    def is_own_data(self, data) -> bool:
        """Whether ``data`` is the object the model was built on: its AnnData or the MuData
        it was set up from."""
        ...

    def cell_data(
        self, adata=None, indices: Sequence[int] | None = None
    ) -> tuple[CellData, np.ndarray, AnnData]:
        """The requested cells as model input on the model's device.

        Parameters
        ----------
        adata
            AnnData (or MuData) with the model's features; default the model's own.
        indices
            Cells of ``adata`` (default all).

        Returns
        -------
        tuple
            The :class:`~pyrovi.data.CellData` of those cells (what the module's model and
            guide take, minibatch by minibatch), their positions in ``adata``, and the
            AnnData read.
        """
        ...

    def observed_features(self) -> dict[str, pd.Index]:
        """Names of the features of every observed site: ``{site: feature names}``.

        In the order of the columns of :meth:`posterior_predictive_sample`, which returns
        the observed sites side by side (e.g. ``{"x": genes}``, and one entry more for each
        further modality a multi-modal model observes).
        """
        ...

    def feature_positions(self, site: str, names: Sequence[str] | None = None) -> np.ndarray:
        """Positions of ``names`` (default all) among the features of the observed ``site``.

        Raises
        ------
        KeyError
            ``site`` is not an observed site, or a name is not one of its features.
        """
        ...

    def posterior_predictive_sample(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Counts of every observed site drawn from the posterior predictive distribution.

        Returns
        -------
        numpy.ndarray
            Cells × features (features of :meth:`observed_features`, side by side), with a
            trailing ``n_samples`` axis when ``n_samples > 1``.
        """
        ...

    def get_latent_representation(
        self, adata=None, indices: Sequence[int] | None = None
    ) -> np.ndarray:
        """Posterior mean of the latent space of the cells, ``(n_cells, n_latent)``."""
        ...

    def get_elbo(self, adata=None, indices: Sequence[int] | None = None) -> float:
        """Evidence lower bound per cell, averaged over the cells (higher is better)."""
        ...


#: Names of the members of :class:`TrainedModel`.
_MEMBERS: tuple[str, ...] = (*TrainedModel.__annotations__, *(
    name for name, value in vars(TrainedModel).items()
    if callable(value) and not name.startswith("_")))


def check_trained_model(model, name: str = "model") -> TrainedModel:
    """Return ``model`` if it provides the :class:`TrainedModel` members, else raise.

    Parameters
    ----------
    model
        The object to check.
    name
        How the error message names it.

    Returns
    -------
    TrainedModel
        ``model`` itself.

    Raises
    ------
    TypeError
        A member of :class:`TrainedModel` is missing; the message lists them.
    """
    if isinstance(model, TrainedModel):
        return model
    missing = [m for m in _MEMBERS if not hasattr(model, m)]
    raise TypeError(
        f"{name} is a {type(model).__name__}, not a trained pyrovi model: it lacks "
        f"{missing}. Pass a model such as pyrovi.SCVI, or implement "
        "pyrovi.criticism.TrainedModel.")


def feature_columns(model: TrainedModel, site: str) -> np.ndarray:
    """Columns of the observed ``site`` in the output of ``posterior_predictive_sample``.

    Parameters
    ----------
    model
        A trained model.
    site
        One of the keys of ``model.observed_features()``.

    Returns
    -------
    numpy.ndarray
        Integer positions, after the columns of the sites that come before ``site``.
    """
    offset = 0
    for other, names in model.observed_features().items():
        if other == site:
            return offset + np.arange(len(names))
        offset += len(names)
    raise KeyError(f"{type(model).__name__} has no observed site {site!r} (sites: "
                   f"{list(model.observed_features())}).")
