"""User-facing API shared by every pyrovi model: training, inference, save/load.

A model class pairs a registry (what it reads from AnnData) with a module (the Pyro
model/guide pair, see ``*_module.py``). Subclasses only say how to build their module and
add their model-specific outputs; everything else is here, once.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import anndata
import numpy as np
import pandas as pd
import pyro
import torch

from pyrovi import __version__
from pyrovi.data import (
    AnnDataRegistry,
    CellTensors,
    build_cell_tensors,
    get_registry,
    register_new_data,
)
from pyrovi.infer import (
    TrainingPlan,
    default_max_epochs,
    evaluate_dataset,
    resolve_device,
    split_indices,
    train_svi,
)
from pyrovi.posterior import latent_representation, marginal_log_likelihood, posterior_predictive

logger = logging.getLogger(__name__)

_CHECKPOINT = "model.pt"
_SAVED_ADATA = "adata.h5ad"
_PLAN_FIELDS = set(TrainingPlan.__dataclass_fields__)


class BaseModel(ABC):
    """Shared user API of pyrovi models (not used directly).

    Attributes
    ----------
    adata
        The registered AnnData the model was built on.
    registry
        :class:`~pyrovi.data.AnnDataRegistry` of ``adata``.
    module
        The Pyro model/guide pair (an ``nn.Module``).
    history
        Per-epoch training history (``pandas.DataFrame``), ``None`` before training.
    train_indices, validation_indices
        Cells used for training and validation.
    device
        Device holding the module.
    """

    #: Name of the observed site sampled by ``posterior_predictive_sample``.
    observed_site = "x"

    def __init__(self, adata, **init_params):
        self.adata = adata
        self.registry = get_registry(adata, type(self).__name__)
        self.init_params = dict(init_params)
        self.module = self._build_module(adata, self.registry, **init_params)
        self.history: pd.DataFrame | None = None
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None
        self.is_trained = False
        self.device = torch.device("cpu")
        self._split = None

    @abstractmethod
    def _build_module(self, adata, registry: AnnDataRegistry, **init_params):
        """Build the model/guide module from the registry (each model says how)."""

    def __repr__(self) -> str:
        summary = ", ".join(f"{k}={v}" for k, v in self.registry.summary().items())
        params = ", ".join(f"{k}={v!r}" for k, v in self.init_params.items())
        state = "trained" if self.is_trained else "not trained"
        return f"{type(self).__name__}({params}) on {summary}; {state}"

    # -- data ---------------------------------------------------------------------------

    @property
    def var_names(self) -> pd.Index:
        """Feature names the model was built on."""
        return self.adata.var_names

    def _validate_anndata(self, adata=None):
        """Return ``adata`` (default: the model's) registered with the model's registry."""
        if adata is None or adata is self.adata:
            return self.adata, self.registry
        return adata, register_new_data(self.registry, adata, self.var_names)

    def _cell_tensors(self, adata=None, indices=None) -> tuple[CellTensors, np.ndarray, object]:
        """The requested cells on the model's device, their indices, and the AnnData used."""
        adata, registry = self._validate_anndata(adata)
        if indices is None:
            indices = np.arange(adata.n_obs)
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        return build_cell_tensors(adata, registry, self.device, indices), indices, adata

    # -- training -----------------------------------------------------------------------

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool = False,
        n_epochs_kl_warmup: int | None = 400,
        n_steps_kl_warmup: int | None = None,
        device: str | torch.device = "auto",
        seed: int | None = None,
        progress_bar: bool = True,
        loss: str = "trace",
        train_indices: Sequence[int] | None = None,
        validation_indices: Sequence[int] | None = None,
        plan_kwargs: dict | None = None,
        **kwargs,
    ) -> BaseModel:
        """Fit the model by stochastic variational inference (Pyro ELBO, Adam).

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default ``min(round(20000 / n_cells * 400), 400)``.
        batch_size
            Cells per minibatch.
        lr
            Adam learning rate.
        train_size, validation_size
            Fractions of cells for training and validation (default: the rest). The split
            is kept across repeated ``train`` calls with the same fractions.
        early_stopping
            Stop when ``elbo_validation`` stops improving (patience 45 epochs; change with
            ``early_stopping_patience=``, ``early_stopping_monitor=``,
            ``early_stopping_min_delta=``).
        n_epochs_kl_warmup, n_steps_kl_warmup
            Linear KL warm-up from 0 to 1 over this many epochs (or steps, which win).
        device
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        seed
            Seed for the split, minibatch order and Monte Carlo draws; with the same seed a
            CPU run is reproducible.
        progress_bar
            Show a tqdm progress bar.
        loss
            ``"trace"`` (Pyro ``Trace_ELBO``) or ``"meanfield"`` (``TraceMeanField_ELBO``,
            analytic KL).
        train_indices, validation_indices
            An explicit split (cell positions), overriding ``train_size``/``validation_size``;
            e.g. to reuse the split of another tool for a side-by-side comparison.
        plan_kwargs, **kwargs
            Further :class:`~pyrovi.infer.TrainingPlan` options (``weight_decay``, ``eps``,
            ``check_val_every_n_epoch``, ``validation_batch_size``...).

        Returns
        -------
        The model itself, trained; per-epoch history in ``model.history``.
        """
        options = {**(plan_kwargs or {}), **kwargs}
        unknown = set(options) - _PLAN_FIELDS
        if unknown:
            raise TypeError(
                f"Unknown training option(s) {sorted(unknown)}; valid: {sorted(_PLAN_FIELDS)}."
            )
        if seed is not None:
            pyro.set_rng_seed(seed)
        self.device = resolve_device(device)
        self.module.to(self.device)
        data = build_cell_tensors(self.adata, self.registry, self.device)
        if train_indices is not None:
            explicit = (np.asarray(train_indices),
                        np.asarray([] if validation_indices is None else validation_indices))
            self._split = (("explicit",), explicit)
        elif self._split is None or self._split[0] != (train_size, validation_size):
            candidates = np.flatnonzero(data.informative)
            rng = np.random.default_rng(seed)
            self._split = ((train_size, validation_size),
                           split_indices(candidates, train_size, validation_size, rng))
        self.train_indices, self.validation_indices = self._split[1]
        if max_epochs is None:
            max_epochs = default_max_epochs(self.adata.n_obs)
        plan = TrainingPlan(
            max_epochs=max_epochs,
            batch_size=batch_size,
            lr=lr,
            n_epochs_kl_warmup=n_epochs_kl_warmup,
            n_steps_kl_warmup=n_steps_kl_warmup,
            loss=loss,
            early_stopping=early_stopping,
            progress_bar=progress_bar,
            **options,
        )
        logger.info(
            "Training %s on %s: %d training and %d validation cells, %d epochs.",
            type(self).__name__, self.device, len(self.train_indices),
            len(self.validation_indices), max_epochs,
        )
        start = 0 if self.history is None else int(self.history.index.max()) + 1
        history = train_svi(
            self.module, data, self.train_indices, self.validation_indices, plan, start
        )
        self.history = history if self.history is None else pd.concat([self.history, history])
        self.is_trained = True
        return self

    # -- generic posterior outputs --------------------------------------------------------

    def get_latent_representation(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        n_samples: int = 1,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Latent representation of cells under the amortized posterior q(z | x).

        Parameters
        ----------
        adata
            AnnData with the model's genes (default: the training data).
        indices
            Cells of ``adata`` to use (default: all).
        give_mean
            Posterior mean; otherwise ``n_samples`` posterior draws.
        n_samples
            Draws when ``give_mean=False``.
        batch_size
            Cells per forward pass.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_latent)``, or ``(n_samples, n_cells, n_latent)``.

        Examples
        --------
        >>> adata.obsm["X_scVI"] = model.get_latent_representation()  # doctest: +SKIP
        """
        data, _, _ = self._cell_tensors(adata, indices)
        return latent_representation(
            self.module, data, None, give_mean=give_mean, n_samples=n_samples,
            batch_size=batch_size or 1024,
        )

    def posterior_predictive_sample(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Counts drawn from the posterior predictive distribution.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_genes)`` for one sample, else ``(n_cells, n_genes, n_samples)``.
        """
        data, _, _ = self._cell_tensors(adata, indices)
        columns = None if gene_list is None else self._gene_positions(gene_list)
        draws = posterior_predictive(
            self.module, data, None, n_samples=n_samples, batch_size=batch_size or 1024,
            site=self.observed_site, columns=columns,
        )
        return draws[0] if n_samples == 1 else np.moveaxis(draws, 0, -1)

    def _gene_positions(self, gene_list: Sequence[str]) -> np.ndarray:
        positions = self.var_names.get_indexer(list(gene_list))
        if (positions < 0).any():
            missing = [g for g, p in zip(gene_list, positions, strict=True) if p < 0]
            raise KeyError(f"Genes not in the model: {missing[:10]}.")
        return positions

    def get_elbo(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Evidence lower bound per cell (a one-sample estimate; higher is better).

        Same convention as scvi-tools' ``get_elbo``: the ELBO itself, not its negative.
        """
        data, _, _ = self._cell_tensors(adata, indices)
        terms = evaluate_dataset(self.module, data, None, batch_size or 1024)
        elbo = -terms.negative_elbo.cpu().numpy()
        return float(elbo.mean()) if return_mean else elbo

    def get_reconstruction_error(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> dict[str, float | np.ndarray]:
        """Reconstruction loss ``-log p(x | z)`` per cell for one posterior draw (lower is better).

        Returns
        -------
        dict
            ``{"reconstruction_loss": value}`` (mean, or one value per cell).
        """
        data, _, _ = self._cell_tensors(adata, indices)
        terms = evaluate_dataset(self.module, data, None, batch_size or 1024)
        loss = terms.reconstruction.cpu().numpy()
        return {"reconstruction_loss": float(loss.mean()) if return_mean else loss}

    def get_marginal_ll(
        self,
        adata=None,
        indices: Sequence[int] | None = None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Marginal log-likelihood ``log p(x)`` per cell by importance sampling.

        Parameters
        ----------
        n_mc_samples
            Importance samples per cell (more: tighter, slower).

        Returns
        -------
        float or numpy.ndarray
            Mean over cells, or one value per cell. Higher is better; it is at least the ELBO
            in expectation.
        """
        data, _, _ = self._cell_tensors(adata, indices)
        values = marginal_log_likelihood(self.module, data, None, n_mc_samples, batch_size or 256)
        return float(values.mean()) if return_mean else values

    # -- persistence ----------------------------------------------------------------------

    def save(
        self, dir_path: str | os.PathLike, overwrite: bool = False, save_anndata: bool = False
    ) -> None:
        """Save parameters, settings, registry and history to ``dir_path``.

        Parameters
        ----------
        dir_path
            Directory to create.
        overwrite
            Replace an existing directory's model files.
        save_anndata
            Also write the AnnData as ``adata.h5ad``.
        """
        if os.path.exists(dir_path) and not overwrite:
            raise FileExistsError(
                f"{os.fspath(dir_path)!r} exists; pass overwrite=True to replace its contents."
            )
        os.makedirs(dir_path, exist_ok=True)
        checkpoint = {
            "model_class": type(self).__name__,
            "pyrovi_version": __version__,
            "init_params": self.init_params,
            "registry": self.registry.to_dict(),
            "var_names": list(map(str, self.var_names)),
            "state_dict": {k: v.cpu() for k, v in self.module.state_dict().items()},
            "history": None if self.history is None else self.history.to_dict("list"),
            "history_index": None if self.history is None else list(self.history.index),
            "train_indices": self.train_indices,
            "validation_indices": self.validation_indices,
            "is_trained": self.is_trained,
        }
        torch.save(checkpoint, os.path.join(dir_path, _CHECKPOINT))
        if save_anndata:
            self.adata.write_h5ad(os.path.join(dir_path, _SAVED_ADATA))

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata=None, device: str = "cpu"):
        """Load a model saved with :meth:`save`.

        Parameters
        ----------
        dir_path
            Directory written by ``save``.
        adata
            AnnData to attach; must have the model's genes in the model's order. Default:
            the AnnData saved with ``save_anndata=True``.
        device
            Where to put the module.

        Raises
        ------
        ValueError
            If ``adata``'s genes do not match the model's (the message says how many differ).
        """
        path = os.path.join(dir_path, _CHECKPOINT)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No saved pyrovi model at {os.fspath(dir_path)!r}.")
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if checkpoint["model_class"] != cls.__name__:
            raise TypeError(
                f"{os.fspath(dir_path)!r} holds a {checkpoint['model_class']}; load it with "
                f"pyrovi.{checkpoint['model_class']}.load."
            )
        if adata is None:
            saved = os.path.join(dir_path, _SAVED_ADATA)
            if not os.path.exists(saved):
                raise ValueError(
                    "No AnnData was saved with this model (save_anndata=False); pass adata=."
                )
            adata = anndata.read_h5ad(saved)
        registry = AnnDataRegistry.from_dict(checkpoint["registry"])
        register_new_data(registry, adata, checkpoint["var_names"])
        model = cls(adata, **checkpoint["init_params"])
        model.module.load_state_dict(checkpoint["state_dict"])
        model.device = resolve_device(device)
        model.module.to(model.device).eval()
        if checkpoint["history"] is not None:
            model.history = pd.DataFrame(checkpoint["history"],
                                         index=pd.Index(checkpoint["history_index"], name="epoch"))
        model.train_indices = checkpoint["train_indices"]
        model.validation_indices = checkpoint["validation_indices"]
        model.is_trained = checkpoint["is_trained"]
        return model
