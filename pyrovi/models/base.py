"""User-facing API shared by every pyrovi model: its state, data access, public methods.

A model pairs a registry (what it reads from AnnData) with a module (a Pyro model/guide
pair of :mod:`pyrovi.modules`). The methods delegate to plain functions: training in
:mod:`~pyrovi.models.training`, outputs in :mod:`~pyrovi.models.outputs`, saving and loading
in :mod:`~pyrovi.models.persistence`.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from pyrovi.criticism.card import model_card
from pyrovi.data import AnnDataRegistry, CellData, CellTensors, build_cell_tensors, get_registry
from pyrovi.data.indices import cell_positions
from pyrovi.data.registry import check_registered_data, counts_matrix
from pyrovi.models import interop, minified, outputs, persistence, training
from pyrovi.models.trainable import TrainingMixin


class BaseModel(minified.MinifiedDataMixin, TrainingMixin, ABC):
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

    def __init__(self, adata, **init_params):
        self.adata = adata
        self.registry = get_registry(adata, type(self).__name__)
        check_registered_data(self.registry, adata)
        self.init_params = dict(init_params)
        self.module = self._build_module(adata, self.registry, **init_params)
        minified.check_support(self, adata, self.registry)
        # Until training or loading changes them, the weights are the constructor's draw,
        # which train(seed=...) may redraw from its seed (see training.seed_initial_weights).
        self._initial_weights = training.weights_digest(self.module)
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

    def _training_data(self, data: CellData) -> CellData:
        """The data a run reads once split and ``train_params`` are set (wrapped per model)."""
        return data

    def __repr__(self) -> str:
        summary = ", ".join(f"{k}={v}" for k, v in self.registry.summary().items())
        params = ", ".join(f"{k}={v!r}" for k, v in self.init_params.items())
        state = "trained" if self.is_trained else "not trained"
        return f"{type(self).__name__}({params}) on {summary}; {state}"

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
        return outputs.gene_positions(self.var_names, names)

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
        adata, registry = outputs.registered_data(self, adata)
        indices = cell_positions(indices, adata.n_obs)
        return build_cell_tensors(adata, registry, self.device, indices), indices, adata

    def get_latent_representation(
        self, adata=None, indices: Sequence[int] | None = None, give_mean: bool = True,
        n_samples: int = 1, batch_size: int | None = None,
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
        return outputs.latent(self, adata, indices, give_mean, n_samples, batch_size)

    def posterior_predictive_sample(
        self, adata=None, indices: Sequence[int] | None = None, n_samples: int = 1,
        gene_list: Sequence[str] | None = None, batch_size: int | None = None,
    ) -> np.ndarray:
        """Counts drawn from the posterior predictive distribution.

        Returns
        -------
        numpy.ndarray
            ``(n_cells, n_genes)`` for one sample, else ``(n_cells, n_genes, n_samples)``.
        """
        columns = None if gene_list is None else outputs.gene_positions(self.var_names, gene_list)
        return outputs.predictive_counts(self, adata, indices, n_samples, columns, batch_size)

    @abstractmethod
    def _normalized_expression_sampler(self, data: CellTensors, batch_size: int):
        """``sample(cell_positions, batch_code) -> (n, n_features)`` draws of normalized
        expression, one posterior draw per position (what differential expression compares)."""

    def differential_expression(
        self, adata=None, groupby: str | None = None, group1: str | Sequence[str] | None = None,
        group2: str | None = None, idx1=None, idx2=None, mode: str = "vanilla",
        delta: float | None = 0.25, batch_size: int | None = None, all_stats: bool = True,
        batch_correction: bool = False, batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None, fdr_target: float = 0.05, silent: bool = False,
        n_samples: int = 5000, use_permutation: bool = False, m_permutation: int = 10000,
        pseudocounts: float | None = None, test_mode: str = "three", seed: int | None = None,
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
            Model-specific options of the expression samples (those of the model's
            ``get_normalized_expression``, e.g. TotalVI's).

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
        return outputs.model_differential_expression(
            self, adata, batch_size, batch_correction, batchid1, batchid2, sampler_kwargs,
            groupby=groupby, group1=group1, group2=group2, idx1=idx1, idx2=idx2,
            mode=mode, delta=delta, fdr_target=fdr_target, n_samples=n_samples,
            use_permutation=use_permutation, m_permutation=m_permutation,
            pseudocounts=pseudocounts, test_mode=test_mode, all_stats=all_stats, seed=seed,
            silent=silent,
        )

    def _de_features(self, adata, registry: AnnDataRegistry):
        """Observed counts and names of the features differential expression reports."""
        return counts_matrix(adata, registry.layer), list(map(str, self.var_names))

    def get_elbo(
        self, adata=None, indices: Sequence[int] | None = None, batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Evidence lower bound per cell (a one-sample estimate; higher is better).

        Same convention as scvi-tools' ``get_elbo``: the ELBO itself, not its negative.
        """
        return outputs.elbo(self, adata, indices, batch_size, return_mean)

    def get_reconstruction_error(
        self, adata=None, indices: Sequence[int] | None = None, batch_size: int | None = None,
        return_mean: bool = True,
    ) -> dict[str, float | np.ndarray]:
        """Reconstruction loss ``-log p(x | z)`` per cell for one posterior draw (lower is better).

        Returns
        -------
        dict
            ``{"reconstruction_loss": value}`` (mean, or one value per cell).
        """
        return outputs.reconstruction_error(self, adata, indices, batch_size, return_mean)

    def get_marginal_ll(
        self, adata=None, indices: Sequence[int] | None = None, n_mc_samples: int = 1000,
        batch_size: int | None = None, return_mean: bool = True,
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
        return outputs.marginal_ll(self, adata, indices, n_mc_samples, batch_size, return_mean)

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

    to_scvi_tools = interop.to_scvi_tools  # a folder scvi-tools' load reads

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
        persistence.save(self, dir_path, overwrite, save_anndata)

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
        return persistence.load(cls, dir_path, adata, device, custom_params)
