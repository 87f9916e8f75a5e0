"""The scANVI model: user API around :class:`~pyrovi.modules.SCANVIModule`.

Semi-supervised: cells whose ``labels_key`` value is the ``unlabeled_category`` get their
label predicted, learned from the labelled cells and from the structure of all cells. The
model shares scVI's set-up, outputs and reference mapping (:mod:`pyrovi.models.scvi_family`)
and adds ``from_scvi_model``, ``predict`` and the semi-supervised training options.

Interoperability seam: a model is the registry (with its ``unlabeled_category``), the
constructor arguments and the module's ``state_dict``; scvi-tools' SCANVAE holds the same
networks (encoder, decoder, ``classifier``, q(z2 | z1, y) and p(z1 | z2, y)), so an
import/export maps names and shapes of those tensors as for scVI.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from pyrovi.data import (
    AnnDataRegistry,
    CellData,
    LabelledEpochs,
    LabelsWithUnlabeledField,
    standard_fields,
)
from pyrovi.data import setup_anndata as register_anndata
from pyrovi.data.registry import register_new_data
from pyrovi.infer import default_max_epochs, inference_mode
from pyrovi.io.model_classes import register_model_class
from pyrovi.models import scvi_family
from pyrovi.models.base import BaseModel
from pyrovi.modules import SCANVIModule

logger = logging.getLogger(__name__)

#: Constructor arguments of SCVI that from_scvi_model carries over (its prior is scANVI's).
_SCVI_ARCHITECTURE = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion",
                      "gene_likelihood", "latent_distribution", "use_observed_lib_size",
                      "encode_covariates", "deeply_inject_covariates", "use_batch_norm",
                      "use_layer_norm")


@register_model_class
class SCANVI(BaseModel):
    """single-cell ANnotation using Variational Inference (Xu et al. 2021).

    scVI's model with the cell's latent state drawn given its cell type: labelled cells
    teach the classifier q(y | z1), and the labels of unlabelled cells are summed out
    exactly by Pyro's enumeration (see :mod:`pyrovi.modules.scanvi`).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`SCANVI.setup_anndata`.
    n_hidden, n_latent, n_layers, dropout_rate
        Network sizes (of scVI's networks and scANVI's alike).
    dispersion, gene_likelihood, latent_distribution, use_observed_lib_size
        As for :class:`~pyrovi.SCVI` (``dispersion="gene-label"`` uses each cell's label,
        summed out with the rest where unknown).
    encode_covariates, deeply_inject_covariates, use_batch_norm, use_layer_norm
        Architecture options as in scvi-tools.
    linear_classifier
        The classifier q(y | z1) is one linear layer.
    classifier_parameters
        Options of the classifier network: ``n_hidden``, ``n_layers``, ``dropout_rate``.
    y_prior
        Prior pi of the labels: ``None`` (uniform, as scvi-tools), ``"frequencies"`` (the
        labelled cells' label frequencies) or one positive number per label, in the order
        of ``registry.label_categories``.

    Examples
    --------
    >>> pyrovi.SCANVI.setup_anndata(adata, labels_key="cell_type",
    ...                             unlabeled_category="Unknown")  # doctest: +SKIP
    >>> model = pyrovi.SCANVI(adata).train(max_epochs=100)  # doctest: +SKIP
    >>> adata.obs["predicted"] = model.predict()  # doctest: +SKIP
    """

    _training_options = {"n_samples_per_label": None, "classification_ratio": 50.0}

    def __init__(
        self,
        adata,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str | Callable = "zinb",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = True,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_batch_norm: str = "both",
        use_layer_norm: str = "none",
        linear_classifier: bool = False,
        classifier_parameters: dict | None = None,
        y_prior: str | Sequence[float] | None = None,
    ):
        super().__init__(
            adata, n_hidden=n_hidden, n_latent=n_latent, n_layers=n_layers,
            dropout_rate=dropout_rate, dispersion=dispersion, gene_likelihood=gene_likelihood,
            latent_distribution=latent_distribution,
            use_observed_lib_size=use_observed_lib_size, encode_covariates=encode_covariates,
            deeply_inject_covariates=deeply_inject_covariates, use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm, linear_classifier=linear_classifier,
            classifier_parameters=classifier_parameters, y_prior=y_prior,
        )
        #: Started from a trained scVI (``from_scvi_model``): fewer default epochs.
        self.was_pretrained = False

    # Set-up shared with scVI is the registry of scANVI's fields; the rest is scVI's.
    load_query_data = classmethod(scvi_family.load_query_data)
    prepare_query_anndata = classmethod(scvi_family.prepare_query_anndata)
    get_normalized_expression = scvi_family.get_normalized_expression
    get_likelihood_parameters = scvi_family.get_likelihood_parameters
    _normalized_expression_sampler = scvi_family.rho_sampler

    @classmethod
    def setup_anndata(
        cls,
        adata,
        labels_key: str,
        unlabeled_category,
        layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: Sequence[str] | None = None,
        continuous_covariate_keys: Sequence[str] | None = None,
        allow_non_integer: bool = False,
        drop_empty_cells: bool = False,
    ) -> None:
        """Register the fields of ``adata`` scANVI reads (scvi-tools' arguments).

        The data are validated first; on error nothing in ``adata`` changes. The known
        labels get codes in their category order and the unlabelled category the last.

        Parameters
        ----------
        adata
            AnnData with raw counts.
        labels_key
            ``obs`` column with the labels, ``unlabeled_category`` where unknown.
        unlabeled_category
            The value marking unlabelled cells (e.g. ``"Unknown"``). It may be absent
            (a fully labelled reference), unless the column holds a look-alike of it,
            which is taken for a typo.
        layer, batch_key, size_factor_key, categorical_covariate_keys
            As for :meth:`pyrovi.SCVI.setup_anndata`.
        continuous_covariate_keys, allow_non_integer, drop_empty_cells
            As for :meth:`pyrovi.SCVI.setup_anndata`.

        Raises
        ------
        SetupError
            Missing column, missing values (NaN) among the labels, an
            ``unlabeled_category`` that is not the column's, no labelled cell, or any
            error of scVI's set-up.
        """
        if labels_key is None:
            raise ValueError("SCANVI needs labels_key, the obs column with the labels.")
        fields = [LabelsWithUnlabeledField(labels_key, unlabeled_category) if f.key == "labels"
                  else f for f in standard_fields(layer, batch_key, labels_key, size_factor_key,
                                                  categorical_covariate_keys,
                                                  continuous_covariate_keys)]
        register_anndata(adata, model_name=cls.__name__, fields=fields,
                         allow_non_integer=allow_non_integer, drop_empty_cells=drop_empty_cells)

    def _build_module(self, adata, registry: AnnDataRegistry, y_prior=None,
                      **params) -> SCANVIModule:
        if registry.unlabeled_category is None:
            raise ValueError("This AnnData was not set up with an unlabeled_category; call "
                             "SCANVI.setup_anndata(adata, labels_key, unlabeled_category).")
        return scvi_family.build_scvi_module(
            adata, registry, SCANVIModule, n_labels=registry.n_known_labels,
            label_prior=_label_prior(y_prior, adata, registry), **params)

    @property
    def labels(self) -> list[str]:
        """The known labels, in code order (the columns of ``predict(soft=True)``)."""
        return list(self.registry.label_categories[:-1])

    def _generative_inputs(self, posterior, batch: dict, batch_index, code) -> dict:
        inputs = scvi_family.generative_inputs(self, posterior, batch, batch_index, code)
        # The label a gene-label dispersion reads: the guide's (known, or drawn from q(y|z1)).
        inputs["labels"] = posterior.nodes["y"]["value"]
        return inputs

    @classmethod
    def from_scvi_model(cls, scvi_model, unlabeled_category, labels_key: str | None = None,
                        adata=None, **scanvi_kwargs) -> SCANVI:
        """A scANVI starting from a trained scVI's encoder, decoder and dispersion.

        The AnnData is set up for scANVI with the scVI's set-up and ``labels_key``; the
        scVI's architecture is kept (arguments of ``scanvi_kwargs`` that would change it
        are ignored with a warning, as in scvi-tools) and scANVI's networks start fresh.
        Train it with :meth:`train` (by default a few epochs: ``min(10, max(2,
        round(default / 3)))``).

        Parameters
        ----------
        scvi_model
            A trained :class:`~pyrovi.SCVI`.
        unlabeled_category
            The value of ``labels_key`` marking unlabelled cells.
        labels_key
            ``obs`` column with the labels; default the scVI's ``labels_key``.
        adata
            Data to build on (the scVI's genes); default the scVI's AnnData.
        **scanvi_kwargs
            Constructor arguments of scANVI's own (``linear_classifier``,
            ``classifier_parameters``, ``y_prior``).

        Returns
        -------
        SCANVI
            Not trained (``is_trained`` False).

        Raises
        ------
        TypeError
            ``scvi_model`` is not an SCVI.
        ValueError
            The scVI is not trained, or no ``labels_key`` is known.
        """
        if type(scvi_model).__name__ != "SCVI":
            raise TypeError(f"from_scvi_model starts from a pyrovi.SCVI, got "
                            f"{type(scvi_model).__name__}.")
        if not scvi_model.is_trained:
            raise ValueError("The scVI model is not trained; train it first.")
        registry = scvi_model.registry
        labels_key = labels_key or registry.labels_key
        if labels_key is None:
            raise ValueError("The scVI model was set up without labels_key; pass labels_key=.")
        adata = scvi_model.adata if adata is None else adata
        if adata is not scvi_model.adata:
            register_new_data(registry, adata, scvi_model.var_names, store=False)
        params = {k: v for k, v in scvi_model.init_params.items() if k in _SCVI_ARCHITECTURE}
        for name in sorted(set(scanvi_kwargs) & set(params)):
            warnings.warn(f"Ignoring {name}={scanvi_kwargs.pop(name)!r}: the scVI model was "
                          f"built with {name}={params[name]!r}.", UserWarning, stacklevel=2)
        if scvi_model.init_params.get("prior", "normal") != "normal":
            logger.warning("The scVI's latent prior %r is not carried over: scANVI's is "
                           "p(z1 | z2, y).", scvi_model.init_params["prior"])
        cls.setup_anndata(
            adata, labels_key, unlabeled_category, layer=registry.layer,
            batch_key=registry.batch_key, size_factor_key=registry.size_factor_key,
            categorical_covariate_keys=registry.categorical_covariate_keys or None,
            continuous_covariate_keys=registry.continuous_covariate_keys or None,
            allow_non_integer=registry.allow_non_integer,
            drop_empty_cells=registry.drop_empty_cells)
        model = cls(adata, **params, **scanvi_kwargs)
        _load_scvi_weights(model.module, scvi_model.module)
        model.was_pretrained = True
        return model

    def train(self, max_epochs: int | None = None, n_samples_per_label: int | None = None,
              **kwargs) -> SCANVI:
        """Fit the model by SVI with ``TraceEnum_ELBO`` (labels summed out exactly).

        Every epoch passes over all training cells once; minibatches mix labelled and
        unlabelled cells. The labelled cells of the epoch (all, or ``n_samples_per_label``
        of each label) add the classification loss ``classification_ratio · CE``, whose
        expected weight per step is scvi-tools'.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default scVI's size-based one, and for a model
            from :meth:`from_scvi_model` ``min(10, max(2, round(that / 3)))``.
        n_samples_per_label
            Labelled cells of each label drawn anew every epoch for the classification
            loss; ``None``: every labelled training cell.
        **kwargs
            :meth:`pyrovi.SCVI.train`'s arguments, and ``classification_ratio`` (default
            50, also accepted in ``plan_kwargs`` as in scvi-tools). ``loss="trace"`` (the
            default) trains with ``TraceEnum_ELBO``; ``"meanfield"`` is refused.

        Returns
        -------
        SCANVI
            The model itself.
        """
        if max_epochs is None and self.was_pretrained:
            max_epochs = min(10, max(2, round(default_max_epochs(self.adata.n_obs) / 3)))
        return super().train(max_epochs=max_epochs, n_samples_per_label=n_samples_per_label,
                             **kwargs)

    def _training_data(self, data: CellData) -> CellData:
        options = self.train_params
        per_label = options["n_samples_per_label"]
        if per_label is not None and (isinstance(per_label, bool) or not isinstance(
                per_label, numbers.Integral) or per_label < 1):
            raise ValueError(f"n_samples_per_label must be a positive integer or None, got "
                             f"{per_label!r}.")
        ratio = options["classification_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or \
                not math.isfinite(ratio) or ratio < 0:
            raise ValueError(f"classification_ratio must be a non-negative number, got "
                             f"{ratio!r}.")
        labels = self.registry.field("labels").cell_array(self.adata)
        return LabelledEpochs(data, labels, self.module.n_labels, self.train_indices,
                              per_label, ratio)

    def predict(self, adata=None, indices: Sequence[int] | None = None, soft: bool = False,
                batch_size: int | None = None) -> np.ndarray | pd.DataFrame:
        """Predicted labels: the most probable under q(y | z1) at the posterior mean of z1.

        Parameters
        ----------
        adata
            AnnData with the model's genes (default: the training data); its labels
            column is optional (labels it has must be known to the model).
        indices
            Cells of ``adata`` (default all).
        soft
            Return the probabilities of every label instead.
        batch_size
            Cells per forward pass.

        Returns
        -------
        numpy.ndarray or pandas.DataFrame
            One label per cell (strings), or with ``soft=True`` a cells × labels
            DataFrame of probabilities (rows sum to 1), indexed by cell names.
        """
        data, indices, adata_used = self.cell_data(adata, indices)
        logits = []
        with inference_mode(self.module):
            for _, batch in data.iter_minibatches(None, batch_size or 1024):
                logits.append(self.module.classify(batch["x"], batch["batch_index"],
                                                   batch["cat_covs"], batch["cont_covs"]))
        probs = torch.softmax(torch.cat(logits), -1).cpu().numpy()
        if soft:
            return pd.DataFrame(probs, index=adata_used.obs_names[indices],
                                columns=pd.Index(self.labels))
        return np.asarray(self.labels, dtype=object)[probs.argmax(1)]


def _label_prior(y_prior, adata, registry: AnnDataRegistry):
    """The label probabilities the module starts with (``None``: uniform)."""
    if y_prior is None or not isinstance(y_prior, str):
        return y_prior
    if y_prior != "frequencies":
        raise ValueError(f"y_prior must be None, 'frequencies' or one probability per label, "
                         f"got {y_prior!r}.")
    n_known = registry.n_known_labels
    codes = registry.field("labels").cell_array(adata)
    counts = np.bincount(codes[codes < n_known], minlength=n_known).astype(np.float64)
    if counts.sum() == 0:
        # Data without labelled cells (a query, or new data to load a model on): the
        # reference's or saved probabilities replace these when its weights are loaded.
        return None
    # A label without cells keeps a little mass: the prior must stay positive.
    return np.maximum(counts, 0.5) / max(counts.sum(), 1.0)


def _load_scvi_weights(module: SCANVIModule, scvi_module) -> None:
    """Copy every tensor the scVI's module shares (by name and shape) into ``module``."""
    own = module.state_dict()
    shared = {name: tensor for name, tensor in scvi_module.state_dict().items()
              if name in own and own[name].shape == tensor.shape}
    skipped = sorted(name for name, tensor in scvi_module.state_dict().items()
                     if name in own and own[name].shape != tensor.shape)
    if skipped:
        logger.warning("Not carried over from the scVI (other shapes, e.g. a gene-label "
                       "dispersion over other labels): %s", skipped)
    module.load_state_dict({**own, **shared})
