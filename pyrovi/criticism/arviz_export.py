"""Export posterior and posterior predictive draws of any pyrovi model to ArviZ.

Part of :mod:`pyrovi.criticism`: a trained model is read through
:class:`~pyrovi.criticism.TrainedModel`; a bare model/guide module with its per-cell arrays
works too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pyrovi.criticism.interface import TrainedModel
from pyrovi.data.indices import cell_positions
from pyrovi.data.minified import is_minified, needs_counts
from pyrovi.data.tensors import as_cell_data
from pyrovi.posterior.core import pointwise_log_likelihood, posterior_samples

if TYPE_CHECKING:
    import xarray as xr

logger = logging.getLogger(__name__)

#: Above this many values (draws × cells × features, all sites) ``to_arviz`` refuses and
#: asks for fewer cells, features or draws: ArviZ holds everything in memory, densely.
#: Observed sites that ``gene_list`` and ``protein_list`` select features of.
GENE_SITE, PROTEIN_SITE = "x", "y"
MAX_VALUES = 500_000_000
#: Fewest draws with which ``arviz.loo`` runs on the ``log_likelihood`` group.
MIN_LOO_DRAWS = 25


def _site_coords(model: TrainedModel, site: str, positions: dict[str, np.ndarray]):
    """Dimension names (after the cell axis) and coordinates of ``site``, from the module's
    ``site_dims`` declaration (``None``: undeclared, ArviZ names the dimensions).

    The feature dimension of each observed site (its declared dimension, e.g. ``gene`` for
    ``x``, ``protein`` for ``y``) is labelled with the exported features of that site
    (``positions``), wherever it appears.
    """
    declared = getattr(model.module, "site_dims", {})
    dims = declared.get(site)
    if dims is None:
        return None, {}
    labels = {declared[observed][0]: np.asarray(names[positions[observed]], dtype=str)
              for observed, names in model.observed_features().items()
              if declared.get(observed)}
    return list(dims), {dim: labels[dim] for dim in dims if dim in labels}


def to_arviz(
    model: TrainedModel | torch.nn.Module,
    adata=None,
    n_samples: int = 100,
    var_names: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
    gene_list: Sequence[str] | None = None,
    protein_list: Sequence[str] | None = None,
    batch_size: int = 1024,
    seed: int | None = None,
    data=None,
    coords: dict[str, Sequence] | None = None,
    log_likelihood: bool = False,
) -> xr.DataTree:
    """Posterior draws of a trained model as an ArviZ :class:`xarray.DataTree`.

    One chain of ``n_samples`` draws from the amortized posterior, as the
    :class:`xarray.DataTree` that ArviZ 1.x reads (the successor of ArviZ 0.x's
    ``InferenceData``; each group is a child node holding an :class:`xarray.Dataset`).
    Groups:

    - ``posterior``: the latent sites (``z`` with dims ``(cell, latent)``; ``library``
      ``(cell,)`` when the library size is latent; TotalVI's ``protein_background``
      ``(cell, protein)``);
    - ``posterior_predictive``: the observed sites drawn given each posterior draw
      (``x``: ``(cell, gene)``; TotalVI's ``y``: ``(cell, protein)``), as integers;
    - ``observed_data``: the counts of the same cells and features;
    - ``constant_data``: each cell's ``batch`` and, with an observed library size, its
      ``log_library``;
    - ``log_likelihood`` (with ``log_likelihood=True``): each cell's ``log p(x | latents)``,
      summed over all its features, for separate posterior draws of the latents; cells are
      the observations of ``arviz.loo`` and ``arviz.compare``.

    so that ``arviz.summary(idata, var_names=["z"])``, ``arviz.loo(idata)`` and the
    predictive checks of ``arviz_plots`` (``arviz.plot_ppc_rootogram`` for counts,
    ``arviz.plot_ppc_dist``) work directly. A group is absent when it would be empty (e.g.
    no ``posterior`` when ``var_names`` names observed sites only).

    PSIS-LOO needs at least 25 draws (its Pareto tail is a fifth of them, at least 5). When
    a cell's log-likelihood varies by hundreds of nats across draws (a latent library size,
    an untrained encoder) its Pareto k is far above 0.7 and ArviZ may return NaN for it;
    the held-out ELBO or ``get_marginal_ll`` are then the measures to compare models by.

    Your own model/guide pair works too: pass the ``nn.Module`` itself and its per-cell
    arrays as ``data``; observed sites whose name is a key of ``data`` get
    ``observed_data``, other one-dimensional arrays go to ``constant_data``, and the
    dimensions come from the module's ``site_dims`` with labels from ``coords``.

    ArviZ keeps every draw in memory as a dense array: choose ``indices``, ``gene_list``
    and ``n_samples`` accordingly (a call above 5e8 values is refused with that advice).

    Parameters
    ----------
    model
        A trained pyrovi model (``SCVI``, ``LDVAE``, ``TOTALVI``, ..., any
        :class:`~pyrovi.criticism.TrainedModel`), or a model/guide ``nn.Module`` of your own
        (then ``data`` is required).
    adata
        AnnData with the model's genes (default: the training data).
    n_samples
        Posterior draws (ArviZ's ``draw`` dimension; one chain).
    var_names
        Sites to export (default: every latent site and every observed site).
    indices
        Cells of ``adata`` (default: all).
    gene_list, protein_list
        Keep only these features of the observed sites.
    batch_size
        Cells per forward pass.
    seed
        Seed for the draws.
    data
        For a bare module: ``{argument name: per-cell array}`` (or
        :class:`~pyrovi.data.ArrayTensors`).
    coords
        For a bare module: labels of named dimensions, e.g. ``{"gene": var_names}``
        (cells are numbered unless ``coords["cell"]`` is given).
    log_likelihood
        Add the ``log_likelihood`` group (one more pass over the cells).

    Returns
    -------
    xarray.DataTree
        Child groups ``posterior``, ``posterior_predictive``, ``observed_data``,
        ``constant_data`` and (with ``log_likelihood=True``) ``log_likelihood``; the sample
        dimensions are ``chain`` (length 1) and ``draw``, and, e.g., ``idata.posterior["z"]``
        is an :class:`xarray.DataArray` on ``(chain, draw, cell, latent)``.

    Examples
    --------
    >>> import arviz as az
    >>> idata = pyrovi.criticism.to_arviz(model, n_samples=50, indices=range(200),
    ...                                   log_likelihood=True)  # doctest: +SKIP
    >>> az.summary(idata, var_names=["z"], kind="stats").head()  # doctest: +SKIP
    >>> az.loo(idata)  # PSIS-LOO over cells  # doctest: +SKIP
    >>> az.plot_ppc_rootogram(idata, var_names=["x"],
    ...                       coords={"gene": [idata.posterior_predictive.gene[0].item()]},
    ...                       backend="matplotlib")  # doctest: +SKIP
    """
    if seed is not None:
        torch.manual_seed(seed)
    if not isinstance(model, TrainedModel):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(
                f"to_arviz takes a trained pyrovi model (pyrovi.criticism.TrainedModel) or a "
                f"model/guide nn.Module, not a {type(model).__name__}.")
        if data is None:
            raise ValueError("A bare model/guide module needs its per-cell arrays: data={...}.")
        return _module_to_arviz(model, data, n_samples, var_names, indices, batch_size,
                                dict(coords or {}), log_likelihood)
    if is_minified(model.adata if adata is None else adata):
        raise needs_counts("to_arviz (its observed_data group holds the counts)")
    data, cells, adata_used = model.cell_data(adata, indices)
    features = model.observed_features()
    genes = model.feature_positions(GENE_SITE, gene_list)
    proteins = (model.feature_positions(PROTEIN_SITE, protein_list)
                if PROTEIN_SITE in features else None)
    if protein_list is not None and proteins is None:
        raise ValueError(f"{type(model).__name__} has no proteins; drop protein_list.")
    columns = {GENE_SITE: genes} if gene_list is not None else {}
    if protein_list is not None:
        columns[PROTEIN_SITE] = proteins

    module = model.module
    observed = tuple(getattr(module, "observed_sites", ()) or ())
    n_features = len(genes) + (0 if proteins is None else len(proteins))
    n_values = n_samples * len(cells) * (2 * n_features + 4 * module.n_latent)
    if n_values > MAX_VALUES:
        raise ValueError(
            f"Exporting {n_samples} draws of {len(cells)} cells × {n_features} features means "
            f"about {n_values:.1e} values held densely by ArviZ; pass indices= (fewer cells), "
            "gene_list= (fewer genes) or a smaller n_samples."
        )
    draws = posterior_samples(module, data, var_names, n_samples, batch_size=batch_size,
                              columns=columns)

    cell_names = np.asarray(adata_used.obs_names[cells], dtype=str)
    groups: dict[str, dict] = {"posterior": {}, "posterior_predictive": {}, "observed_data": {}}
    dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {"cell": cell_names}
    # Every cell's observed arrays, gathered once (counts, proteins, size factors).
    whole = data.minibatch(torch.arange(data.n_obs, device=data.device))
    positions = {GENE_SITE: genes, PROTEIN_SITE: proteins}
    for site, values in draws.items():
        site_dims, site_coords = _site_coords(model, site, positions)
        coords.update(site_coords)
        values = values[None]  # one chain
        if (site_dims is not None and len(site_dims) == values.ndim - 4
                and values.shape[-1] == 1):
            values = values[..., 0]  # a per-cell scalar stored with a trailing axis of 1
            site_dims = site_dims[:-1]
        if site_dims is not None:
            dims[site] = ["cell", *site_dims]
        if site in observed:
            groups["posterior_predictive"][site] = values.astype(np.int32)
            if whole.get(site) is not None:
                counts = whole[site].cpu().numpy()
                if site in columns:
                    counts = counts[:, columns[site]]
                groups["observed_data"][site] = counts.astype(np.int32)
        else:
            groups["posterior"][site] = values
    constant = {"batch": np.asarray(model.registry.batch_categories, dtype=str)[
        data.batch_index.cpu().numpy()]}
    dims["batch"] = ["cell"]
    if "library" not in draws and getattr(module, "use_observed_lib_size", False):
        constant["log_library"] = module.observed_log_library(
            whole["x"], whole["size_factor"])[:, 0].cpu().numpy()
        dims["log_library"] = ["cell"]
    if "latent" in {d for ds in dims.values() for d in ds}:
        coords["latent"] = np.arange(module.n_latent)
    groups["constant_data"] = constant
    idata = _data_tree(groups, coords, dims)
    if log_likelihood:
        _with_log_likelihood(idata, module, data, None, n_samples, batch_size, cell_names)
    return idata


def _data_tree(groups: dict[str, dict], coords: dict, dims: dict) -> xr.DataTree:
    """The ArviZ DataTree of the non-empty ``groups`` (``{group: {site: array}}``).

    ``arviz.from_dict`` drops the sample dimensions (``chain``, ``draw``) of groups whose
    name contains "data", so ``dims`` (without them) serves every group.
    """
    import arviz as az

    return az.from_dict({group: values for group, values in groups.items() if values},
                        coords=coords, dims=dims)


def _with_log_likelihood(idata: xr.DataTree, module, data, indices, n_samples, batch_size,
                         cell_names) -> xr.DataTree:
    """Add the ``log_likelihood`` group (one value per cell and draw) to ``idata``.

    Built on its own because an observed site here has the dimension ``cell`` only, while
    its ``dims`` in the other groups may name feature dimensions, or none (then ArviZ
    would name the cell axis ``x_dim_0``, and ``loo`` could not line it up with ``cell``).
    """
    import arviz as az

    if n_samples < MIN_LOO_DRAWS:
        logger.warning("arviz.loo and arviz.compare need n_samples >= %d (Pareto smoothing "
                       "fits a tail of a fifth of the draws, at least 5); got %d.",
                       MIN_LOO_DRAWS, n_samples)
    values = pointwise_log_likelihood(module, data, n_samples, indices, batch_size)
    idata["log_likelihood"] = az.dict_to_dataset(
        # float64: PSIS smoothing of float32 log-likelihoods in the hundreds returns NaN.
        {site: value[None].astype(np.float64) for site, value in values.items()},
        coords={"cell": cell_names}, dims={site: ["cell"] for site in values},
        sample_dims=["chain", "draw"])
    return idata


def _module_to_arviz(module, data, n_samples, var_names, indices, batch_size, coords,
                     log_likelihood) -> xr.DataTree:
    """:func:`to_arviz` for a bare model/guide module and its per-cell arrays."""
    data = as_cell_data(data)
    cells = cell_positions(indices, data.n_obs)
    draws = posterior_samples(module, data, var_names, n_samples, indices=cells,
                              batch_size=batch_size)
    whole = data.minibatch(torch.as_tensor(cells, device=data.device))
    observed = set(getattr(module, "observed_sites", ()) or ())
    declared = getattr(module, "site_dims", {})
    coords.setdefault("cell", np.arange(len(cells)))
    groups: dict[str, dict] = {"posterior": {}, "posterior_predictive": {}, "observed_data": {}}
    dims: dict[str, list[str]] = {}
    for site, values in draws.items():
        if site in declared:
            dims[site] = ["cell", *declared[site]]
        if site in observed or site in whole:
            groups["posterior_predictive"][site] = values[None]
            if whole.get(site) is not None:
                groups["observed_data"][site] = whole[site].cpu().numpy()
        else:
            groups["posterior"][site] = values[None]
    # Per-cell scalars only (not the likelihood's optional non-zero positions, say).
    constant = {name: value.cpu().numpy() for name, value in whole.items()
                if isinstance(value, torch.Tensor) and value.dim() == 1 and name not in draws}
    dims.update({name: ["cell"] for name in constant})
    used = {d for ds in dims.values() for d in ds}
    groups["constant_data"] = constant
    idata = _data_tree(groups, {k: np.asarray(v) for k, v in coords.items() if k in used}, dims)
    if log_likelihood:
        _with_log_likelihood(idata, module, data, cells, n_samples, batch_size,
                             np.asarray(coords["cell"]))
    return idata
