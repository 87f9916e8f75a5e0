"""Minifying a model's data, and the model's side of reading minified data.

:class:`MinifiedDataMixin` gives every model ``minify_adata`` and ``minified_data_type``
(scvi-tools' names): the model's AnnData is replaced by a minified copy holding each
cell's posterior of ``z`` and observed library size under scvi-tools' keys (see
:mod:`pyrovi.data.minified`), so that a folder saved with it is exchangeable with
scvi-tools. The outputs then read the stored posterior through the sampling core of
:mod:`pyrovi.posterior`; those that need the counts refuse, through :func:`require_counts`.
"""

from __future__ import annotations

import copy
import logging

import anndata
import numpy as np
import scipy.sparse as sp

from pyrovi.data import REGISTRY_UNS_KEY, is_minified, register_new_data
from pyrovi.data.minified import (
    LATENT_POSTERIOR,
    MINIFY_TYPE_UNS_KEY,
    MinifiedKeys,
    needs_counts,
)
from pyrovi.posterior import latent_posterior_parameters

logger = logging.getLogger(__name__)


def refusal(model) -> str | None:
    """Why ``model`` cannot read minified data (``None``: it can)."""
    reason = getattr(model.module, "minify_refusal", lambda: "it declares no support")()
    if reason is None and model._minified_stem is None:
        reason = "it does not read a stored posterior"
    return reason


def check_support(model, adata, registry) -> None:
    """Refuse minified ``adata`` that ``model`` cannot read, or whose stored posterior has
    another latent dimension than the model's.

    Raises
    ------
    ValueError
        Naming why.
    """
    if not registry.is_minified:
        return
    reason = refusal(model)
    if reason is not None:
        raise ValueError(f"This {type(model).__name__} cannot read minified data: {reason}. "
                         "Use the data with their counts.")
    width = np.shape(adata.obsm[registry.latent_qzm_key])[1]
    n_latent = model.module.n_latent
    if width != n_latent:
        raise ValueError(
            f"adata.obsm[{registry.latent_qzm_key!r}] stores a posterior of {width} latent "
            f"dimensions, the model has n_latent={n_latent}: the data were minified by "
            f"another model. Build the model with n_latent={width}, or use that model.")


def require_counts(model, adata, what: str, fix: str = "") -> None:
    """Raise :class:`~pyrovi.data.MinifiedDataError` when ``what`` would read the counts of
    minified data (``adata``, default the model's own)."""
    if is_minified(model.adata if adata is None else adata):
        raise needs_counts(what, fix)


def minify(model, minified_data_type: str, use_latent_qzm_key: str | None,
           use_latent_qzv_key: str | None, batch_size: int) -> None:
    """Replace ``model.adata`` by its minified copy (see ``MinifiedDataMixin.minify_adata``)."""
    if minified_data_type != LATENT_POSTERIOR:
        raise ValueError(
            f"minified_data_type must be {LATENT_POSTERIOR!r} (the posterior of z and the "
            f"library size stand in for the counts), got {minified_data_type!r}; pyrovi does "
            "not write scvi-tools' 'latent_posterior_parameters_with_counts'.")
    reason = refusal(model)
    if reason is not None:
        raise ValueError(f"This {type(model).__name__} cannot minify its data: {reason}.")
    if model.registry.is_minified:
        logger.info("The model's data are minified already; nothing to do.")
        return
    # The model's own cells, checked unchanged since set-up and with finite weights.
    data, _, source = model.cell_data()
    qzm, qzv = latent_posterior_parameters(model.module, data, batch_size=batch_size)
    keys = MinifiedKeys.of(model._minified_stem)
    library = model.registry.cell_totals(source).astype(np.float32)

    # A new AnnData from the metadata: the counts are never copied (a backed matrix is
    # never read whole), and nothing is shared with the user's AnnData, which stays as it is.
    zeros = sp.csr_matrix(source.shape, dtype=np.float32)
    uns = {k: copy.deepcopy(v) for k, v in source.uns.items() if k != REGISTRY_UNS_KEY}
    minified = anndata.AnnData(
        X=zeros, obs=source.obs.copy(), var=source.var.copy(), uns=uns,
        obsm={k: copy.deepcopy(v) for k, v in source.obsm.items()},
        varm={k: copy.deepcopy(v) for k, v in source.varm.items()},
        obsp={k: copy.deepcopy(v) for k, v in source.obsp.items()},
        varp={k: copy.deepcopy(v) for k, v in source.varp.items()},
        layers={k: zeros.copy() for k in source.layers if k is not None},
    )
    minified.uns[MINIFY_TYPE_UNS_KEY] = LATENT_POSTERIOR
    minified.obsm[keys.qzm], minified.obsm[keys.qzv] = qzm, qzv
    for key, values in ((use_latent_qzm_key, qzm), (use_latent_qzv_key, qzv)):
        if key is not None:
            minified.obsm[key] = values.copy()
    minified.obs[keys.library] = library
    registry = register_new_data(model.registry, minified, model.var_names,
                                 minified_stem=model._minified_stem)
    model.adata, model.registry = minified, registry


class MinifiedDataMixin:
    """``minify_adata`` and ``minified_data_type`` of pyrovi models (scvi-tools' names)."""

    #: Stem of the keys of the model's stored posterior in minified data (scvi-tools':
    #: ``"scvi"`` gives ``adata.obsm["scvi_latent_qzm"]``); ``None``: the model cannot
    #: read minified data.
    _minified_stem: str | None = None

    @property
    def minified_data_type(self) -> str | None:
        """``"latent_posterior_parameters"`` when the model's data are minified, else ``None``."""
        return self.registry.minified_data_type

    def minify_adata(
        self,
        minified_data_type: str = LATENT_POSTERIOR,
        use_latent_qzm_key: str | None = "X_latent_qzm",
        use_latent_qzv_key: str | None = "X_latent_qzv",
        batch_size: int = 1024,
    ) -> None:
        """Replace the model's data by a minified copy: the posterior of each cell instead
        of its counts (scvi-tools' ``minify_adata``).

        The posterior of every cell's ``z`` is computed with the model, and a copy of the
        model's AnnData gets, under scvi-tools' keys (``<stem>`` is ``scvi`` for SCVI,
        ``ldvae`` for LDVAE):

        - ``obsm["<stem>_latent_qzm"]``, ``obsm["<stem>_latent_qzv"]``: mean and variance
          of q(z | x) (before the logistic normal's transform, for ``latent_distribution=
          "ln"``);
        - ``obs["observed_lib_size"]``: the cell's library size, the sum of its counts (not
          its log);
        - ``uns["_scvi_adata_minify_type"] = "latent_posterior_parameters"``;
        - ``X`` and every layer all-zero sparse matrices of the same shape (``raw`` is
          dropped), the rest (obs, var, obsm, uns...) as it was.

        The model then reads that copy (``model.adata``); the AnnData it was built on is
        not changed. Outputs that read the posterior work as before, from the stored
        posterior (``z ~ Normal(qzm, sqrt(qzv))``) and library size:
        ``get_latent_representation``, ``get_normalized_expression``,
        ``differential_expression``, ``posterior_predictive_sample``,
        ``get_likelihood_parameters``, ``card`` (without the sections that compare with the
        counts). Those that need the counts (``train``, ``get_elbo``,
        ``get_reconstruction_error``, ``get_marginal_ll``, posterior predictive checks,
        ``load_query_data`` with minified data as the query) raise
        :class:`~pyrovi.data.MinifiedDataError`; pass them data with counts (``adata=``).
        ``save(..., save_anndata=True)`` keeps the minified data with the model.

        Parameters
        ----------
        minified_data_type
            ``"latent_posterior_parameters"``, the only type pyrovi writes.
        use_latent_qzm_key, use_latent_qzv_key
            Also store the means and variances under these ``obsm`` keys (where
            scvi-tools' workflow keeps them); ``None`` to leave them out.
        batch_size
            Cells per forward pass when computing the posterior.

        Raises
        ------
        ValueError
            Another ``minified_data_type``, or a model whose posterior minified data cannot
            hold (a latent library size, TotalVI's other per-cell latents); the model and
            its data are then unchanged.

        Examples
        --------
        >>> model.minify_adata()  # doctest: +SKIP
        >>> model.adata.obsm["scvi_latent_qzm"].shape  # (n_cells, n_latent)  # doctest: +SKIP
        >>> model.save("hub_model", save_anndata=True)  # doctest: +SKIP
        """
        minify(self, minified_data_type, use_latent_qzm_key, use_latent_qzv_key, batch_size)
