"""User-facing API shared by every pyrovi model: training, inference, save/load.

A model class pairs a registry (what it reads from AnnData) with a module (the Pyro
model/guide pair, see ``*_module.py``). Subclasses only say how to build their module and
add their model-specific outputs; everything else is here, once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pyro
import torch

from pyrovi._settings import check_seed
from pyrovi._version import __version__
from pyrovi.criticism.card import model_card
from pyrovi.data import (
    REGISTRY_UNS_KEY,
    AnnDataRegistry,
    CellData,
    CellTensors,
    build_cell_tensors,
    get_registry,
    register_new_data,
)
from pyrovi.data.indices import cell_positions
from pyrovi.data.registry import check_registered_data, counts_matrix
from pyrovi.data.streaming import LOADER_OPTIONS
from pyrovi.infer import (
    TrainingPlan,
    default_max_epochs,
    evaluate_dataset,
    resolve_device,
    split_indices,
    train_svi,
)
from pyrovi.infer import checkpoint as checkpoints
from pyrovi.infer.distributed import local_device, setup_data_parallel
from pyrovi.io.bundle import to_json_value
from pyrovi.io.checkpoint_files import read_checkpoint, write_checkpoint
from pyrovi.io.model_files import SavedModel, save_model_folder
from pyrovi.posterior import (
    differential_expression,
    latent_representation,
    marginal_log_likelihood,
    posterior_predictive,
)

logger = logging.getLogger(__name__)

_PLAN_FIELDS = set(TrainingPlan.__dataclass_fields__)
#: Key of the marker that stands in a checkpoint for a constructor argument save cannot
#: store (a callable likelihood, a prior module instance).
_UNSAVED = "__pyrovi_unsaved__"


def _is_unsaved(value) -> bool:
    return isinstance(value, dict) and set(value) == {_UNSAVED}


def _as_plain(value):
    """``value`` as JSON stores it, or ``None`` when JSON cannot hold it."""
    try:
        return to_json_value(value)
    except TypeError:
        return None


def saved_init_params(init_params: dict) -> dict:
    """Constructor arguments as :meth:`BaseModel.save` stores them (plain JSON values).

    Custom objects (callables such as a ``gene_likelihood`` function, modules such as a
    prior instance, anything JSON cannot hold) are replaced by a marker naming them: a
    model file holds data only, never code. Their learned parameters are in the weights
    all the same.

    Parameters
    ----------
    init_params
        The model's ``init_params``.

    Returns
    -------
    dict
    """
    saved = {}
    for name, value in init_params.items():
        plain = None if callable(value) else _as_plain(value)
        if plain is None and value is not None:
            label = getattr(value, "__qualname__", None) or type(value).__name__
            saved[name] = {_UNSAVED: label}
        else:
            saved[name] = plain
    return saved


def restored_init_params(saved: dict, given: dict, model_name: str) -> dict:
    """Constructor arguments of a saved model, with the custom objects passed again.

    Parameters
    ----------
    saved
        ``init_params`` from a checkpoint (see :func:`saved_init_params`).
    given
        Arguments passed to ``load`` for the custom objects that were not saved.
    model_name
        Class name, for the messages.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        If a custom object that was not saved is not given again.
    TypeError
        If ``given`` names an argument that was saved (only unsaved ones can be given).
    """
    unsaved = {name: value[_UNSAVED] for name, value in saved.items() if _is_unsaved(value)}
    extra = sorted(set(given) - set(unsaved))
    if extra:
        raise TypeError(
            f"load takes again only the constructor arguments that save could not store "
            f"({sorted(unsaved) or 'none for this model'}); {extra} were saved with the model."
        )
    missing = {name: label for name, label in unsaved.items() if name not in given}
    if missing:
        listed = ", ".join(f"{name}= (it was {label})" for name, label in missing.items())
        call = ", ".join(f"{name}=..." for name in missing)
        raise ValueError(
            f"This {model_name} was built with custom objects that save does not store: "
            f"{listed}. Pass them again: {model_name}.load(dir_path, adata, {call}). A prior "
            "module is given as a new instance of the same class; its learned parameters are "
            "restored from the checkpoint."
        )
    return {**saved, **given}


def _weights_digest(module: torch.nn.Module) -> str:
    """SHA-1 of a module's parameters and buffers (tells whether they changed)."""
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@contextmanager
def _registry_in_uns(adata, registry: AnnDataRegistry):
    """``adata.uns`` holds ``registry`` while a model is built on it (the constructor reads it
    there); whatever ``adata.uns`` held before is back afterwards."""
    missing = object()
    before = adata.uns.get(REGISTRY_UNS_KEY, missing)
    adata.uns[REGISTRY_UNS_KEY] = registry.to_dict()
    try:
        yield
    finally:
        if before is missing:
            del adata.uns[REGISTRY_UNS_KEY]
        else:
            adata.uns[REGISTRY_UNS_KEY] = before


class BaseModel(ABC):
    """Shared user API of pyrovi models (not used directly).

    Implements :class:`pyrovi.criticism.TrainedModel`, the interface through which the
    reports of :mod:`pyrovi.criticism` read a model.

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

    #: Whether ``train(early_stopping=None)`` stops early (when there are validation cells).
    _early_stopping_default = False

    def __init__(self, adata, **init_params):
        self.adata = adata
        self.registry = get_registry(adata, type(self).__name__)
        check_registered_data(self.registry, adata)
        self.init_params = dict(init_params)
        self.module = self._build_module(adata, self.registry, **init_params)
        # Until training or loading changes them, the weights are the constructor's draw,
        # which train(seed=...) may redraw from its seed (see _seed_initial_weights).
        self._initial_weights = _weights_digest(self.module)
        self.history: pd.DataFrame | None = None
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None
        self.is_trained = False
        self.device = torch.device("cpu")
        self._split = None
        #: Arguments of the last ``train`` call (reported by the model card).
        self.train_params: dict | None = None

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

    @classmethod
    def as_anndata(cls, data):
        """The AnnData the model reads from ``data`` (multi-modal models flatten MuData).

        Parameters
        ----------
        data
            AnnData (or, for a multi-modal model, a MuData set up for it).

        Returns
        -------
        anndata.AnnData
            ``data`` itself for single-modality models.
        """
        return data

    def is_own_data(self, data) -> bool:
        """Whether ``data`` is the object the model was built on (its AnnData).

        Parameters
        ----------
        data
            An AnnData or MuData.

        Returns
        -------
        bool
        """
        return data is self.adata

    def observed_features(self) -> dict[str, pd.Index]:
        """Feature names of every observed site, in the column order of
        :meth:`posterior_predictive_sample`: ``{"x": genes}``.

        Returns
        -------
        dict
            ``{site: pandas.Index of feature names}``.
        """
        return {"x": self.var_names}

    def feature_positions(self, site: str, names: Sequence[str] | None = None) -> np.ndarray:
        """Positions of ``names`` (default all) among the features of the observed ``site``.

        Parameters
        ----------
        site
            An observed site (a key of :meth:`observed_features`).
        names
            Feature names; ``None`` for every feature.

        Returns
        -------
        numpy.ndarray
            Integer positions, in the order of ``names``.

        Raises
        ------
        KeyError
            ``site`` is not observed by the model, or a name is not one of its features.
        """
        features = self.observed_features()
        if site not in features:
            raise KeyError(f"{type(self).__name__} has no observed site {site!r} (sites: "
                           f"{list(features)}).")
        if names is None:
            return np.arange(len(features[site]))
        return self._gene_positions(names)

    def _validate_anndata(self, adata=None):
        """Return ``adata`` (default: the model's) registered with the model's registry.

        Raises
        ------
        DataChangedError
            The model's own data changed after setup (normalized, subset...).
        RuntimeError
            The weights are not finite (training diverged).
        """
        self._check_weights()
        if adata is None or adata is self.adata:
            check_registered_data(self.registry, self.adata)
            return self.adata, self.registry
        adata = self.as_anndata(adata)
        # The registry stays with the model: the AnnData keeps its own set-up, if any.
        return adata, register_new_data(self.registry, adata, self.var_names, store=False)

    def _check_weights(self) -> None:
        """Refuse outputs from weights that hold NaN or infinity (a diverged training run)."""
        broken = [name for name, tensor in self.module.state_dict().items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
        if broken:
            raise RuntimeError(
                f"The model's weights hold NaN or infinite values ({', '.join(broken[:3])}"
                f"{' ...' if len(broken) > 3 else ''}): training diverged, and every output "
                "would be NaN. Build the model again and train with a lower learning rate "
                "(lr=), or load a checkpoint from before the divergence.")

    def cell_data(self, adata=None, indices=None) -> tuple[CellData, np.ndarray, object]:
        """The requested cells on the model's device, their indices, and the AnnData used.

        Parameters
        ----------
        adata
            AnnData (or MuData for a multi-modal model) with the model's features; default
            the model's own, checked for changes since set-up.
        indices
            Cells of ``adata`` (default all).

        Returns
        -------
        tuple
            The :class:`~pyrovi.data.CellData` the module's model and guide read, the cells'
            positions in ``adata``, and the AnnData read.
        """
        adata, registry = self._validate_anndata(adata)
        indices = cell_positions(indices, adata.n_obs)
        return build_cell_tensors(adata, registry, self.device, indices), indices, adata

    # -- training -----------------------------------------------------------------------

    def train(
        self,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = 1e-3,
        train_size: float = 0.9,
        validation_size: float | None = None,
        early_stopping: bool | None = None,
        n_epochs_kl_warmup: int | None = 400,
        n_steps_kl_warmup: int | None = None,
        device: str | torch.device = "auto",
        seed: int | None = None,
        progress_bar: bool = True,
        loss: str = "trace",
        train_indices: Sequence[int] | None = None,
        validation_indices: Sequence[int] | None = None,
        plan_kwargs: dict | None = None,
        loader_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
        keep_checkpoints: int | None = 1,
        resume_from: str | os.PathLike | None = None,
        strategy: str = "single",
        **kwargs,
    ) -> BaseModel:
        """Fit the model by stochastic variational inference (Pyro ELBO, Adam).

        With ``checkpoint_dir``, the run writes a checkpoint every ``checkpoint_every``
        epochs and at its end; ``resume_from`` continues an interrupted run from its last
        checkpoint as if it had not stopped: same minibatches, draws, optimiser state, KL
        warm-up, history and split (bit for bit on the CPU; on a GPU, up to its
        non-deterministic kernels).

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
            ``early_stopping_min_delta=``). ``None``: the model's default (off for SCVI and
            LDVAE; for TOTALVI on, when there are validation cells to monitor).
        n_epochs_kl_warmup, n_steps_kl_warmup
            Linear KL warm-up from 0 to 1 over this many epochs (or steps, which win).
        device
            ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        seed
            Seed of everything random in the run: the split, the minibatch order, the Monte
            Carlo draws and, for a model not trained or changed since it was built, its
            initial weights (drawn again from the seed). The same call with the same seed
            gives the same run in any fresh process on the CPU (on a GPU, up to its
            non-deterministic kernels). See also ``pyrovi.settings.seed``.
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
        loader_kwargs
            Options of the on-disk loader, used when the counts are on disk (a backed
            AnnData, see :func:`pyrovi.data.read_ondisk`): ``chunk_size`` (rows of the file
            per contiguous read and unit of shuffling, default 256) and ``n_chunks_in_buffer``
            (chunks read and shuffled together, default 16); host memory holds about
            ``chunk_size * n_chunks_in_buffer`` rows of counts; ``loader``: ``"pyrovi"``
            (default, h5ad or zarr) or ``"annbatch"`` (zarr stores only, ``pip install
            annbatch``: reads stores written by ``AnnData.write_zarr`` faster, for more memory;
            the measured speed and memory are in ``benchmarks/RESULTS.md``, which this
            docstring does not repeat so that they cannot drift apart). No effect on data in
            memory.
        checkpoint_dir
            Folder for training checkpoints (``checkpoint-<epochs done>``, a folder; see
            :mod:`pyrovi.infer.checkpoint`). Each holds the weights, Adam's state, the random
            generators' states, the epoch and step counters, the history, the split and
            these options, and is written atomically. Refused if the folder holds
            checkpoints of another run.
        checkpoint_every
            Epochs between checkpoints (default 1; on resume, the interrupted run's). The
            last epoch (or the early-stopping one) is always checkpointed.
        keep_checkpoints
            How many of the newest checkpoints to keep; ``None`` keeps all.
        strategy
            ``"single"`` (one process) or ``"ddp"``: data-parallel training over the
            processes of a ``torchrun`` launch (one per GPU, or CPU workers with Gloo), each
            on its shard of the training cells, with gradients averaged over processes; see
            :mod:`pyrovi.infer.distributed`. Only rank 0 shows progress and writes
            checkpoints; every rank ends with the same parameters and history.
        resume_from
            A checkpoint file, or a checkpoint folder (its newest), of an interrupted run of
            this model (same class, constructor arguments, setup and cells). The weights,
            split, history, options and optimiser and generator states are restored and
            the remaining epochs of the run's ``max_epochs`` are trained; the training
            arguments of this call are then not used, except ``device``, ``progress_bar``
            and the checkpoint ones (checkpoints go on in the same folder unless
            ``checkpoint_dir`` says otherwise). A finished run is restored, not trained.

        Returns
        -------
        The model itself, trained; per-epoch history in ``model.history``.

        Raises
        ------
        FileExistsError
            ``checkpoint_dir`` holds checkpoints of another run.
        ValueError, TypeError
            ``resume_from`` is a checkpoint of another model, data or setup, or
            ``max_epochs`` contradicts the run being resumed.

        Examples
        --------
        >>> model.train(max_epochs=400, checkpoint_dir="run/checkpoints")  # doctest: +SKIP
        >>> # after an interruption, in a new process:
        >>> model = pyrovi.SCVI(adata)  # doctest: +SKIP
        >>> model.train(resume_from="run/checkpoints")  # doctest: +SKIP
        """
        if checkpoint_every is not None and checkpoint_dir is None and resume_from is None:
            raise ValueError("checkpoint_every needs checkpoint_dir= (where to write them).")
        if resume_from is not None and strategy != "single":
            raise ValueError("resume_from continues a single-process run; strategy='ddp' "
                             "cannot resume it.")
        if resume_from is not None:
            return self._resume(resume_from, max_epochs=max_epochs, device=device,
                                progress_bar=progress_bar, checkpoint_dir=checkpoint_dir,
                                checkpoint_every=checkpoint_every, keep=keep_checkpoints)
        options = {**(plan_kwargs or {}), **kwargs}
        unknown = set(options) - _PLAN_FIELDS
        if unknown:
            raise TypeError(
                f"Unknown training option(s) {sorted(unknown)}; valid: {sorted(_PLAN_FIELDS)}."
            )
        unknown = set(loader_kwargs or {}) - set(LOADER_OPTIONS)
        if unknown:
            raise TypeError(f"Unknown loader_kwargs {sorted(unknown)}; valid: {LOADER_OPTIONS}.")
        self.device = resolve_device(device)
        if strategy == "ddp":
            self.device = local_device(self.device)
        parallel = setup_data_parallel(strategy, self.device)
        if seed is not None:
            seed = check_seed(seed)
            self._seed_initial_weights(seed)
            # Each rank draws its own noise and minibatches; the split below uses `seed` alone.
            pyro.set_rng_seed(seed + (parallel.rank if parallel is not None else 0))
        self.module.to(self.device)
        check_registered_data(self.registry, self.adata)
        data = build_cell_tensors(self.adata, self.registry, self.device,
                                  loader_kwargs=loader_kwargs)
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
        if early_stopping is None:
            early_stopping = self._early_stopping_default and len(self.validation_indices) > 0
            if self._early_stopping_default and not early_stopping:
                logger.info("No validation cells (train_size=%s): training without early "
                            "stopping, which monitors them.", train_size)
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
        self.train_params = {
            "max_epochs": max_epochs, "batch_size": batch_size, "lr": lr,
            "train_size": train_size, "validation_size": validation_size,
            "early_stopping": early_stopping, "n_epochs_kl_warmup": n_epochs_kl_warmup,
            "n_steps_kl_warmup": n_steps_kl_warmup, "loss": loss, "seed": seed,
            "device": str(self.device), **options,
            **({"loader_kwargs": dict(loader_kwargs)} if loader_kwargs else {}),
            **({"strategy": strategy, "world_size": parallel.world_size} if parallel else {}),
        }
        self._initialize_prior(data)
        start = 0 if self.history is None else int(self.history.index.max()) + 1
        writer = None
        if checkpoint_dir is not None and (parallel is None or parallel.is_main):
            writer = self._checkpoint_writer(checkpoint_dir, checkpoint_every or 1,
                                             keep_checkpoints, start, max_epochs, start)
        return self._run_svi(data, plan, start, None, writer, parallel)

    def _seed_initial_weights(self, seed: int) -> None:
        """Redraw the initial weights from ``seed`` if they are still the constructor's.

        So that a seed covers everything random in a run: ``SCVI(adata).train(seed=0)`` in
        two fresh processes starts from the same weights. A model that was trained, loaded,
        built for reference mapping or changed by hand keeps its weights.
        """
        if self.history is not None or _weights_digest(self.module) != self._initial_weights:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self._build_module(self.adata, self.registry, **self.init_params)
        # Into the same module object: references to model.module stay valid.
        self.module.load_state_dict(fresh.state_dict())
        self._initial_weights = _weights_digest(self.module)

    def _run_svi(self, data: CellTensors, plan: TrainingPlan, start: int,
                 resume_state: dict | None, writer, parallel=None) -> BaseModel:
        """The SVI loop from epoch ``start``; its history is appended to the model's."""
        history = train_svi(
            self.module, data, self.train_indices, self.validation_indices, plan, start,
            resume_state=resume_state, on_epoch_end=writer, parallel=parallel,
        )
        self.history = history if self.history is None else pd.concat([self.history, history])
        self.is_trained = True
        return self

    def _checkpoint_writer(self, directory, every: int, keep: int | None, first_epoch: int,
                           max_epochs: int, start: int,
                           replace_later: bool = False) -> checkpoints.CheckpointWriter:
        """The ``on_epoch_end`` callback writing this run's checkpoints."""
        fingerprint = checkpoints.data_fingerprint(self.adata)
        run = {"first_epoch": first_epoch, "max_epochs": max_epochs,
               "split_key": self._split[0], "data": fingerprint}
        return checkpoints.CheckpointWriter(
            directory, every, keep,
            lambda history: self._saved_state(history, True, fingerprint), write_checkpoint,
            self.history, run, self.device, start_epoch=start, replace_later=replace_later,
        )

    def _resume(self, path, max_epochs: int | None, device, progress_bar: bool,
                checkpoint_dir, checkpoint_every: int | None, keep: int | None) -> BaseModel:
        """Restore the run checkpointed at ``path`` and train its remaining epochs."""
        state = read_checkpoint(path)
        if max_epochs is not None and max_epochs != state["max_epochs"]:
            raise ValueError(
                f"The run in {os.fspath(state['path'])!r} was for max_epochs="
                f"{state['max_epochs']}; resume_from continues it to that end. Train further "
                "with another train() call once it has finished."
            )
        self._restore(state)
        done = state["epochs_done"]
        end = state["first_epoch"] + state["max_epochs"]
        if state["finished"] or done >= end:
            logger.info("%s is the end of its run (%d epochs); nothing left to train.",
                        state["path"].name, done)
            return self
        self.device = resolve_device(device)
        self.module.to(self.device)
        check_registered_data(self.registry, self.adata)
        # The interrupted run's on-disk chunking: it decides the minibatches of its epochs.
        data = build_cell_tensors(self.adata, self.registry, self.device,
                                  loader_kwargs=self.train_params.get("loader_kwargs"))
        options = {k: v for k, v in self.train_params.items() if k in _PLAN_FIELDS}
        plan = TrainingPlan(**{**options, "max_epochs": end - done,
                               "progress_bar": progress_bar})
        logger.info("Resuming %s from %s: epochs %d to %d of the run, on %s.",
                    type(self).__name__, state["path"], done, end - 1, self.device)
        writer = self._checkpoint_writer(
            checkpoint_dir or state["path"].parent, checkpoint_every or state["checkpoint_every"],
            keep, state["first_epoch"], state["max_epochs"], done, replace_later=True,
        )
        # Last, so that nothing between here and the first minibatch draws from them.
        checkpoints.set_rng_state(state["rng"], self.device)
        resume_state = {k: state[k] for k in ("optimizer", "step", "early_stopping")}
        return self._run_svi(data, plan, done, resume_state, writer)

    def _restore(self, state: dict) -> None:
        """Set weights, history, split and options from a checkpoint of a run of this model.

        Raises
        ------
        TypeError
            A checkpoint of another model class.
        ValueError
            Other genes, constructor arguments, setup or cells than this model's.
        """
        saved = state["model"]
        where = os.fspath(state["path"])
        if saved["model_class"] != type(self).__name__:
            raise TypeError(f"{where!r} is a checkpoint of a {saved['model_class']}, not of a "
                            f"{type(self).__name__}.")
        if saved["var_names"] != list(map(str, self.var_names)):
            raise ValueError(f"{where!r} is a checkpoint of a model on other genes.")
        own = saved_init_params(self.init_params)
        differ = sorted(k for k in set(own) | set(saved["init_params"])
                        if own.get(k) != saved["init_params"].get(k))
        if differ:
            theirs = ", ".join(f"{k}={saved['init_params'].get(k)!r}" for k in differ)
            raise ValueError(
                f"{where!r} is a checkpoint of a {type(self).__name__} built with other "
                f"arguments ({theirs}); build the model with them, or use "
                f"{type(self).__name__}.load_checkpoint."
            )
        registry = to_json_value(self.registry.to_dict())
        # The cells are compared below, with a message of their own.
        differ = sorted(k for k in set(registry) | set(saved["registry"])
                        if k not in ("n_cells", "count_fingerprint")
                        and registry.get(k) != saved["registry"].get(k))
        if differ:
            raise ValueError(f"{where!r} is a checkpoint of a model set up differently "
                             f"({differ} differ); call setup_anndata as for that run.")
        if state["data"] != checkpoints.data_fingerprint(self.adata):
            raise ValueError(
                f"{where!r} is a checkpoint of a run on other cells ({state['data']['n_obs']} "
                "cells, or other names); its train/validation split would not apply."
            )
        self._set_saved_state(saved)
        self._split = (state["split_key"], (self.train_indices, self.validation_indices))

    @classmethod
    def load_checkpoint(cls, path: str | os.PathLike, adata, device: str = "cpu",
                        **custom_params) -> BaseModel:
        """The model of a training checkpoint, as it was at that epoch.

        Built from the checkpoint's constructor arguments and setup (``adata`` need not be
        set up), with its weights, history and split. Continue the run with
        ``model.train(resume_from=path)``, or use the model as it is.

        Parameters
        ----------
        path
            A checkpoint file, or a checkpoint folder (its newest checkpoint).
        adata
            The data of the run (same genes; the same cells to resume it).
        device
            Where to put the module.
        **custom_params
            Custom constructor objects, as for :meth:`load`.

        Returns
        -------
        The model.

        Examples
        --------
        >>> model = pyrovi.SCVI.load_checkpoint("run/checkpoints", adata)  # doctest: +SKIP
        >>> model.train(resume_from="run/checkpoints")  # doctest: +SKIP
        """
        state = read_checkpoint(path)
        model = cls._from_saved(state["model"], adata, device, custom_params,
                                os.fspath(state["path"]))
        model._split = (state["split_key"], (model.train_indices, model.validation_indices))
        return model

    def _initialize_prior(self, data: CellTensors) -> None:
        """Give a data-initialised prior (the VampPrior's pseudo-inputs) random training cells.

        Done once, when training starts: the split is known then, so no validation cell
        becomes a pseudo-input (which would flatter the held-out ELBO).
        """
        prior = getattr(self.module, "prior", None)
        n_cells = getattr(prior, "n_init_cells", 0)
        if not n_cells or not len(self.train_indices):
            return
        chosen = torch.randperm(len(self.train_indices))[:n_cells].numpy()
        index = torch.as_tensor(np.asarray(self.train_indices)[chosen], dtype=torch.int64,
                                device=data.device)
        self.module.initialize_prior(data.minibatch(index))

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
        data, _, _ = self.cell_data(adata, indices)
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
        columns = None if gene_list is None else self._gene_positions(gene_list)
        return self._predictive_counts(adata, indices, n_samples, columns, batch_size)

    def _predictive_counts(self, adata, indices, n_samples, columns, batch_size) -> np.ndarray:
        """Posterior predictive draws of the module's ``observed_sites`` (concatenated),
        cells × columns (× samples)."""
        data, _, _ = self.cell_data(adata, indices)
        draws = posterior_predictive(
            self.module, data, None, n_samples=n_samples, batch_size=batch_size or 1024,
            site=self.module.observed_sites, columns=columns,
        )
        return draws[0] if n_samples == 1 else np.moveaxis(draws, 0, -1)

    def _batch_codes(self, transform_batch) -> list[int | None]:
        """Registry codes of batch names (``[None]``: each cell's own batch)."""
        if transform_batch is None:
            return [None]
        batches = (
            transform_batch if isinstance(transform_batch, list | tuple) else [transform_batch]
        )
        codes = []
        for b in batches:
            if str(b) not in self.registry.batch_categories:
                raise KeyError(
                    f"transform_batch={b!r} is not a batch of the model "
                    f"(batches: {self.registry.batch_categories})."
                )
            codes.append(self.registry.batch_categories.index(str(b)))
        return codes

    # -- differential expression ----------------------------------------------------------

    @abstractmethod
    def _normalized_expression_sampler(self, data: CellTensors, batch_size: int):
        """``sample(cell_positions, batch_code) -> (n, n_features)`` draws of normalized
        expression, one posterior draw per position (what differential expression compares)."""

    def differential_expression(
        self,
        adata=None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        mode: str = "vanilla",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        n_samples: int = 5000,
        use_permutation: bool = False,
        m_permutation: int = 10000,
        pseudocounts: float | None = None,
        test_mode: str = "three",
        seed: int | None = None,
        **sampler_kwargs,
    ) -> pd.DataFrame:
        """Bayesian differential expression between groups of cells (scvi-tools' interface).

        Each group is represented by ``n_samples`` draws of normalized expression, taken from
        cells picked at random in the group (one posterior draw each). ``mode="vanilla"``
        (Lopez et al. 2018) reports ``proba_m1 = P(rho_1 > rho_2)``; ``mode="change"``
        (Boyeau et al. 2019) reports ``proba_de``, the posterior probability that the log2
        fold change lies outside ``[-delta, delta]``, with LFC summaries and an FDR call.

        Parameters
        ----------
        adata
            AnnData with the model's genes (default: the training data).
        groupby
            ``adata.obs`` column defining the groups.
        group1
            Group(s) to test; default: every group of ``groupby``, each against the rest.
        group2
            Reference group; default: all cells not in the tested group (``"Rest"``).
        idx1, idx2
            Instead of ``groupby``: the cells of each group, as a boolean mask, positions,
            obs names or an ``adata.obs.query`` string (``idx2`` default: the rest).
        mode
            ``"vanilla"`` or ``"change"``.
        delta
            LFC threshold of the change mode (``None``: estimated from the data).
        batch_size
            Cells per forward pass.
        all_stats
            Add the raw count summaries ``raw_mean1/2``, ``non_zeros_proportion1/2`` and
            ``raw_normalized_mean1/2``.
        batch_correction
            Decode every sampled cell in each batch (``batchid1``/``batchid2``, default all)
            and compare draws decoded in the same batch; otherwise cells keep their own batch.
        batchid1, batchid2
            Batches to decode group 1 / group 2 in (with ``batch_correction=True``).
        fdr_target
            Target posterior expected FDR of the ``is_de_fdr_<fdr_target>`` column (change).
        silent
            Hide the progress bar.
        n_samples
            Draws of normalized expression per group (scvi-tools' ``n_samples_overall``).
        use_permutation, m_permutation
            Compare ``m_permutation`` random pairs of draws instead of the draws in order.
        pseudocounts
            Offset added to both groups before the log (change mode); ``None`` estimates it
            from genes without counts in a group, as scvi-tools does.
        test_mode
            ``"three"`` (``proba_de = max(P(lfc ≥ δ), P(lfc < -δ))``) or ``"two"`` (their sum).
        seed
            Seed for the choice of cells and pairs (posterior draws follow torch's seed).
        **sampler_kwargs
            Model-specific options of the expression samples (TotalVI:
            ``protein_prior_count``, ``scale_protein``, ``sample_protein_mixing``,
            ``include_protein_background``).

        Returns
        -------
        pandas.DataFrame
            Indexed by gene, sorted by ``proba_de`` (change) or ``bayes_factor`` (vanilla);
            with ``groupby``, one block per comparison with ``comparison`` (``"A vs Rest"``),
            ``group1`` and ``group2`` columns. Vanilla columns: ``proba_m1``, ``proba_m2``,
            ``bayes_factor``, ``scale1``, ``scale2``; change columns: ``proba_de``,
            ``proba_not_de``, ``bayes_factor``, ``scale1``, ``scale2``, ``pseudocounts``,
            ``delta``, ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_min``, ``lfc_max``,
            ``is_de_fdr_<fdr_target>``.

        Examples
        --------
        >>> de = model.differential_expression(groupby="bulk_labels", mode="change")
        >>> de[de["is_de_fdr_0.05"] & (de["group1"] == "CD14+ Monocyte")].head()
        """
        adata, registry = self._validate_anndata(adata)
        if not batch_correction and (batchid1 is not None or batchid2 is not None):
            raise ValueError("batchid1/batchid2 choose the batches used for batch correction; "
                             "pass batch_correction=True with them.")

        def codes(batchid):
            if not batch_correction:
                return [None]
            return self._batch_codes(list(registry.batch_categories if batchid is None
                                          else batchid))

        data = build_cell_tensors(adata, registry, self.device)
        counts, feature_names = self._de_features(adata, registry)
        return differential_expression(
            self._normalized_expression_sampler(data, batch_size or 1024, **sampler_kwargs),
            counts,
            adata.obs,
            feature_names,
            groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2,
            mode=mode, delta=delta, batch_codes1=codes(batchid1), batch_codes2=codes(batchid2),
            fdr_target=fdr_target, n_samples=n_samples, use_permutation=use_permutation,
            m_permutation=m_permutation, pseudocounts=pseudocounts, test_mode=test_mode,
            all_stats=all_stats, seed=seed, silent=silent,
        )

    def _de_features(self, adata, registry: AnnDataRegistry):
        """Observed counts and names of the features differential expression reports."""
        return counts_matrix(adata, registry.layer), list(map(str, self.var_names))

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
        data, _, _ = self.cell_data(adata, indices)
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
        data, _, _ = self.cell_data(adata, indices)
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
        data, _, _ = self.cell_data(adata, indices)
        values = marginal_log_likelihood(self.module, data, None, n_mc_samples, batch_size or 256)
        return float(values.mean()) if return_mean else values

    # -- model card -----------------------------------------------------------------------

    def card(self, path=None, **kwargs) -> dict:
        """Write this model's card (Markdown and JSON) and return its content.

        A thin call into :func:`pyrovi.criticism.model_card`, which lists the sections and
        options (``adata``, ``title``, ``description``, ``reproduce``, ``labels_key``,
        ``batch_key``, ``n_samples``, ``max_cells``, ``embedding``, ``seed``).

        Parameters
        ----------
        path
            A directory (gets ``README.md`` and ``card.json``) or a ``.md`` file;
            ``None`` writes nothing.

        Returns
        -------
        dict
            The card's content.

        Examples
        --------
        >>> model.card("cards/my_scvi", description="scVI on my PBMCs")  # doctest: +SKIP
        """
        return model_card(self, path, **kwargs)

    # -- persistence ----------------------------------------------------------------------

    def save(
        self, dir_path: str | os.PathLike, overwrite: bool = False, save_anndata: bool = False
    ) -> None:
        """Save parameters, settings, registry and history to the folder ``dir_path``.

        The folder holds data only, which loading never executes (see
        :mod:`pyrovi.io.model_files`): the weights as safetensors, everything else as JSON,
        and a manifest with each file's SHA-256, so that a damaged or altered file is
        refused when loaded. It is written beside ``dir_path`` and swapped in, so an
        interrupted save leaves the previous model intact and no file of it survives.

        Constructor arguments that are custom objects (a callable ``gene_likelihood``, a
        prior module instance) are not stored, only named; :meth:`load` asks for them
        again. Their learned parameters (a custom prior's, say) are saved as usual.

        Parameters
        ----------
        dir_path
            Folder to create.
        overwrite
            Replace the model saved in ``dir_path`` (a folder that holds anything else than
            a pyrovi model is never replaced).
        save_anndata
            Also write the AnnData as ``adata.h5ad``.

        Raises
        ------
        FileExistsError
            ``dir_path`` exists and ``overwrite`` is false, or it is not a pyrovi folder.
        """
        save_model_folder(dir_path, self._saved_state(self.history, self.is_trained),
                          self.adata if save_anndata else None, overwrite=overwrite)

    def _saved_state(self, history: pd.DataFrame | None, is_trained: bool,
                     fingerprint: dict | None = None) -> dict:
        """The model as :meth:`save` stores it (and training checkpoints embed it).

        ``fingerprint`` is :func:`~pyrovi.infer.checkpoint.data_fingerprint` of the model's
        data when already known (a checkpoint writer computes it once per run).
        """
        return {
            "model_class": type(self).__name__,
            "pyrovi_version": __version__,
            "init_params": saved_init_params(self.init_params),
            "registry": self.registry.to_dict(),
            "var_names": list(map(str, self.var_names)),
            "state_dict": {k: v.cpu() for k, v in self.module.state_dict().items()},
            "history": None if history is None else history.to_dict("list"),
            "history_index": None if history is None else list(history.index),
            "train_indices": self.train_indices,
            "validation_indices": self.validation_indices,
            "is_trained": is_trained,
            "train_params": self.train_params,
            # Which cells the split refers to (tools such as the command line's card check it).
            "data": fingerprint or checkpoints.data_fingerprint(self.adata),
        }

    def _set_saved_state(self, saved: dict) -> None:
        """Weights, history, split and training record from :meth:`_saved_state` output."""
        self.module.load_state_dict(saved["state_dict"])
        self.history = None
        if saved["history"] is not None:
            self.history = pd.DataFrame(saved["history"],
                                        index=pd.Index(saved["history_index"], name="epoch"))
        self.train_indices = saved["train_indices"]
        self.validation_indices = saved["validation_indices"]
        self.is_trained = saved["is_trained"]
        self.train_params = saved.get("train_params")

    @classmethod
    def _from_saved(cls, saved: dict, adata, device, custom_params: dict, where: str):
        """A model of class ``cls`` on ``adata`` from :meth:`_saved_state` output."""
        if saved["model_class"] != cls.__name__:
            raise TypeError(
                f"{where!r} holds a {saved['model_class']}; use pyrovi.{saved['model_class']} "
                "to load it."
            )
        init_params = restored_init_params(saved["init_params"], custom_params, cls.__name__)
        registry = AnnDataRegistry.from_dict(saved["registry"])
        adata = cls.as_anndata(adata)
        registry = register_new_data(registry, adata, saved["var_names"], store=False)
        with _registry_in_uns(adata, registry):
            model = cls(adata, **init_params)
        model._set_saved_state(saved)
        model.device = resolve_device(device)
        model.module.to(model.device).eval()
        return model

    @classmethod
    def load(cls, dir_path: str | os.PathLike, adata=None, device: str = "cpu",
             **custom_params):
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
        **custom_params
            Constructor arguments that ``save`` could not store, passed again: a callable
            ``gene_likelihood``, a prior module instance (``prior=``, a new instance; its
            learned parameters come from the checkpoint).

        Raises
        ------
        ValueError
            If ``adata``'s genes do not match the model's (the message says how many differ),
            or a custom object the model was built with is not passed again.
        """
        saved = SavedModel(dir_path)
        if saved.model_class != cls.__name__:
            raise TypeError(
                f"{os.fspath(dir_path)!r} holds a {saved.model_class}; load it with "
                f"pyrovi.{saved.model_class}.load."
            )
        # Checked before reading a saved AnnData, so that a missing object is reported first.
        restored_init_params(saved.state["init_params"], custom_params, cls.__name__)
        if adata is None:
            adata = saved.read_adata()
        return cls._from_saved(saved.state, adata, device, custom_params, os.fspath(dir_path))
