"""``train`` and ``load_checkpoint``: the training API every pyrovi model shares.

The arguments are documented here once; the work is done by :mod:`pyrovi.models.training`,
and what an option left unset becomes by :mod:`pyrovi.infer.defaults`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from pyrovi.infer.defaults import AUTO, CONVERGING, SCVI_TOOLS, RunDefaults
from pyrovi.models import persistence, training


class TrainingMixin:
    """Training methods of :class:`~pyrovi.models.BaseModel`."""

    #: Defaults of a run of given length (``max_epochs`` set): scvi-tools' for the model.
    _fixed_defaults: RunDefaults = SCVI_TOOLS
    #: Defaults of a run whose length pyrovi chooses (``max_epochs=None``).
    _converging_defaults: RunDefaults = CONVERGING
    #: The model's own ``train`` options (name: default), kept in ``train_params``.
    _training_options: dict = {}

    def train(
        self, max_epochs: int | None = None, batch_size: int | None = None,
        lr: float | None = None, train_size: float = 0.9, validation_size: float | None = None,
        early_stopping: bool | None = None, n_epochs_kl_warmup: int | None | str = AUTO,
        n_steps_kl_warmup: int | None | str = AUTO, device: str | torch.device = "auto",
        seed: int | None = None, progress_bar: bool = True, loss: str = "trace",
        train_indices: Sequence[int] | None = None, validation_indices: Sequence[int] | None = None,
        plan_kwargs: dict | None = None, loader_kwargs: dict | None = None,
        checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
        keep_checkpoints: int | None = 1, resume_from: str | os.PathLike | None = None,
        strategy: str = "single", **kwargs,
    ) -> TrainingMixin:
        """Fit the model by stochastic variational inference (Pyro ELBO, Adam).

        **Defaults.** Given ``max_epochs``, options left unset take scvi-tools' values
        (SCVI, LDVAE: batch 128, fixed learning rate 1e-3, KL warm-up over 400 epochs, no
        early stopping; TOTALVI and SCANVI: theirs), so a run ported from scvi-tools with
        its settings is that run. Without ``max_epochs``, pyrovi trains until converged:
        minibatches of about a 32nd of the cells (64 to 512), learning rate 3e-3 (times
        ``sqrt(batch_size / 128)`` above 128), KL warm-up over 10 epochs, and a stop when
        the validation ELBO has not improved for 10 epochs (at most scvi-tools' epoch count,
        ``min(round(20000 / n_cells * 400), 400)``). On real data this reaches scvi-tools'
        default quality in a fraction of its time (``benchmarks/RESULTS.md``, "Time to a
        trained model"; :mod:`pyrovi.infer.defaults`). An option given is used as given;
        scvi-tools' schedule in full: ``train(max_epochs=400)`` or
        ``train(**pyrovi.infer.defaults.SCVI_TOOLS_OPTIONS)``.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; ``None``: until converged (see above).
        batch_size
            Cells per minibatch.
        lr
            Adam learning rate (``None``: the default for the minibatch size).
        train_size, validation_size
            Fractions of cells for training and validation (default: the rest). The split
            is kept across repeated ``train`` calls with the same fractions.
        early_stopping
            Stop when ``elbo_validation`` stops improving (patience 45 epochs, or the
            default's; change with ``early_stopping_patience=``, ``early_stopping_monitor=``,
            ``early_stopping_min_delta=``). ``None``: the default (when there are
            validation cells to monitor).
        n_epochs_kl_warmup, n_steps_kl_warmup
            Linear KL warm-up from 0 to 1 over this many epochs (or steps, which win);
            ``None`` for both: no warm-up; ``"auto"``: the default.
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
            ``reduce_lr_on_plateau``, ``lr_patience``, ``lr_warmup_epochs``,
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
        return training.train(
            self, max_epochs, batch_size, lr, train_size, validation_size, early_stopping,
            n_epochs_kl_warmup, n_steps_kl_warmup, device, seed, progress_bar, loss,
            train_indices, validation_indices, plan_kwargs, loader_kwargs, checkpoint_dir,
            checkpoint_every, keep_checkpoints, resume_from, strategy, kwargs,
        )

    @classmethod
    def load_checkpoint(cls, path: str | os.PathLike, adata, device: str = "cpu",
                        **custom_params) -> TrainingMixin:
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
        return persistence.load_checkpoint(cls, path, adata, device, custom_params)
