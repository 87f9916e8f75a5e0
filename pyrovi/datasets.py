"""Small datasets to try pyrovi on: a real one that ships with scanpy, and simulations.

:data:`PACKAGED_DATASETS` names the datasets that the command line accepts in place of an
h5ad path (``pyrovi train pbmc68k_reduced --labels-key bulk_labels --out demo``;
``pyrovi datasets`` lists them); :func:`load_dataset` loads one by name. Adding a dataset is
one :class:`PackagedDataset` entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import scipy.sparse as sp


def pbmc68k_reduced():
    """700 PBMCs × 765 genes with integer counts, from scanpy's ``pbmc68k_reduced``.

    scanpy keeps log1p of counts scaled to 1e4 per cell in ``.raw.X``; the counts are
    restored exactly as ``round(expm1(raw.X) · n_counts / 1e4)``. Cell annotations
    (``bulk_labels`` with 10 cell types, ``phase``, ``louvain``...) are kept in ``obs``.

    Returns
    -------
    anndata.AnnData
        Counts in ``X`` (CSR, float32) and in ``layers["counts"]``.

    Raises
    ------
    ImportError
        If scanpy is not installed (``pip install scanpy``).
    """
    try:
        import scanpy as sc
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "pbmc68k_reduced ships with scanpy; install it with `pip install scanpy` "
            "(it is part of pyrovi's [test] extra)."
        ) from error
    import anndata

    source = sc.datasets.pbmc68k_reduced()
    log_norm = source.raw.X.toarray() if sp.issparse(source.raw.X) else np.asarray(source.raw.X)
    scale = source.obs["n_counts"].to_numpy()[:, None] / 1e4
    counts = sp.csr_matrix(np.round(np.expm1(log_norm) * scale).astype(np.float32))
    adata = anndata.AnnData(
        X=counts,
        obs=source.obs.copy(),
        var=source.raw.var.copy(),
        obsm={k: v.copy() for k, v in source.obsm.items()},
    )
    adata.layers["counts"] = counts.copy()
    return adata


def simulate_counts(
    n_cells: int = 1000,
    n_genes: int = 200,
    n_clusters: int = 4,
    n_batches: int = 2,
    n_latent: int = 5,
    batch_effect: float = 0.8,
    cluster_separation: float = 3.0,
    mean_library: float = 2000.0,
    theta: float = 5.0,
    zero_inflation: float = 0.0,
    seed: int = 0,
):
    """Counts drawn from an scVI-like generative process with known clusters and batches.

    ``z_n = c_{k_n} + 0.5 ε`` around cluster centres ``c_k ~ N(0, cluster_separation² I)``;
    ``rho_n = softmax(W z_n + b + β_{s_n})`` with a per-batch, per-gene logit shift
    ``β_s ~ N(0, batch_effect²)``; library ``l_n ~ LogNormal(log mean_library, 0.3)``;
    ``x_ng ~ NB(mean l_n rho_ng, inverse dispersion theta_g)``, with extra zeros at rate
    ``zero_inflation``.

    Parameters
    ----------
    n_cells, n_genes, n_clusters, n_batches, n_latent
        Sizes.
    batch_effect
        Standard deviation of the batch logit shifts (0: no batch effect).
    cluster_separation
        Standard deviation of the cluster centres in latent space.
    mean_library
        Typical total counts per cell.
    theta
        Median inverse dispersion (per-gene values vary log-normally around it).
    zero_inflation
        Probability of an extra zero per entry.
    seed
        Random seed.

    Returns
    -------
    anndata.AnnData
        Integer counts (CSR) in ``X``; ``obs["cluster"]`` and ``obs["batch"]`` (categorical);
        the true latent in ``obsm["z_true"]``, loadings in ``varm["W_true"]``, inverse
        dispersion in ``var["theta_true"]``.
    """
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, cluster_separation, size=(n_clusters, n_latent))
    cluster = rng.integers(n_clusters, size=n_cells)
    batch = rng.integers(n_batches, size=n_cells)
    z = centres[cluster] + 0.5 * rng.normal(size=(n_cells, n_latent))
    weights = rng.normal(0.0, 1.0 / np.sqrt(n_latent), size=(n_genes, n_latent))
    baseline = rng.normal(0.0, 1.0, size=n_genes)
    shifts = rng.normal(0.0, batch_effect, size=(n_batches, n_genes))
    logits = z @ weights.T + baseline + shifts[batch]
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    library = np.exp(rng.normal(np.log(mean_library), 0.3, size=(n_cells, 1)))
    theta_g = theta * np.exp(rng.normal(0.0, 0.3, size=n_genes))
    rates = rng.gamma(shape=theta_g, scale=library * rho / theta_g)
    counts = rng.poisson(rates).astype(np.float32)
    if zero_inflation > 0:
        counts[rng.random(counts.shape) < zero_inflation] = 0.0
    obs = pd.DataFrame(
        {
            "cluster": pd.Categorical([f"c{k}" for k in cluster]),
            "batch": pd.Categorical([f"b{s}" for s in batch]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame({"theta_true": theta_g}, index=[f"gene{g}" for g in range(n_genes)])
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.obsm["z_true"] = z
    adata.varm["W_true"] = weights
    return adata


def simulate_cite_seq(
    n_cells: int = 1500,
    n_genes: int = 150,
    n_proteins: int = 12,
    n_cell_types: int = 4,
    n_batches: int = 2,
    n_latent: int = 5,
    background_range: tuple[float, float] = (5.0, 40.0),
    foreground_range: tuple[float, float] = (8.0, 30.0),
    seed: int = 0,
):
    """RNA and protein counts with known cell types, backgrounds and positive populations.

    RNA as in :func:`simulate_counts` (cell-type clusters in a latent space, NB counts).
    Each protein is positive in a random subset of cell types (at least one type, not all).
    A protein's count is NB (inverse dispersion 10) around its background rate
    ``b_{ts}`` — per protein and batch, log-uniform in ``background_range``, with 20%
    cell-to-cell variation — in negative cells, and around ``b_{ts} · a_t`` with
    ``a_t`` uniform in ``foreground_range`` in positive cells.

    Parameters
    ----------
    n_cells, n_genes, n_proteins, n_cell_types, n_batches, n_latent
        Sizes.
    background_range, foreground_range
        Ranges of the background rates and of the foreground/background ratios.
    seed
        Random seed.

    Returns
    -------
    anndata.AnnData
        RNA counts (CSR) in ``X``; protein counts in ``obsm["protein_expression"]`` (a
        DataFrame, proteins ``P0..``); ``obs["cell_type"]`` and ``obs["batch"]``; the truth:
        ``obsm["protein_positive"]`` (cells × proteins booleans), ``obsm["protein_background"]``
        (each cell's background rate) and ``uns["protein_background_rate"]`` (batches ×
        proteins).
    """
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    cell_type = rng.integers(n_cell_types, size=n_cells)
    batch = rng.integers(n_batches, size=n_cells)
    centres = rng.normal(0.0, 2.0, size=(n_cell_types, n_latent))
    z = centres[cell_type] + 0.5 * rng.normal(size=(n_cells, n_latent))
    logits = z @ rng.normal(0.0, 0.5, size=(n_genes, n_latent)).T + rng.normal(size=n_genes)
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)
    library = np.exp(rng.normal(np.log(1500.0), 0.3, size=(n_cells, 1)))
    rna = rng.poisson(rng.gamma(5.0, library * rho / 5.0)).astype(np.float32)

    positive_types = np.zeros((n_proteins, n_cell_types), dtype=bool)
    for t in range(n_proteins):
        chosen = rng.choice(n_cell_types, size=rng.integers(1, n_cell_types), replace=False)
        positive_types[t, chosen] = True
    positive = positive_types[:, cell_type].T
    low, high = np.log(background_range[0]), np.log(background_range[1])
    rates = np.exp(rng.uniform(low, high, size=(n_batches, n_proteins)))
    background = rates[batch] * np.exp(rng.normal(0.0, 0.2, size=(n_cells, n_proteins)))
    ratio = rng.uniform(*foreground_range, size=n_proteins)
    mean = np.where(positive, background * ratio, background)
    protein = rng.poisson(rng.gamma(10.0, mean / 10.0)).astype(np.float32)

    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{k}" for k in cell_type]),
            "batch": pd.Categorical([f"b{s}" for s in batch]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    adata = anndata.AnnData(
        X=sp.csr_matrix(rna), obs=obs,
        var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]),
    )
    adata.obsm["protein_expression"] = pd.DataFrame(
        protein, index=obs.index, columns=[f"P{t}" for t in range(n_proteins)])
    adata.obsm["protein_positive"] = positive
    adata.obsm["protein_background"] = background.astype(np.float32)
    adata.uns["protein_background_rate"] = rates
    return adata


@dataclass(frozen=True)
class PackagedDataset:
    """A dataset the command line knows by name.

    Attributes
    ----------
    loader
        Returns the AnnData, raw counts in ``X``.
    description
        One line for ``pyrovi datasets``.
    n_cells, n_genes
        The size of what ``loader`` returns (stated here so that listing costs no loading).
    obs_keys
        Useful ``obs`` columns and what they hold, e.g. ``{"bulk_labels": "10 cell types"}``.
    """

    loader: Callable[[], object]
    description: str
    n_cells: int
    n_genes: int
    obs_keys: Mapping[str, str] = field(default_factory=dict)


#: Datasets known by name, in the order ``pyrovi datasets`` lists them.
PACKAGED_DATASETS: Mapping[str, PackagedDataset] = MappingProxyType({
    "pbmc68k_reduced": PackagedDataset(
        pbmc68k_reduced,
        "700 PBMCs (10x, scanpy's pbmc68k_reduced) with their counts restored exactly; "
        "needs scanpy",
        700, 765,
        {"bulk_labels": "10 cell types", "louvain": "11 clusters",
         "phase": "cell-cycle phase"},
    ),
    "simulated": PackagedDataset(
        simulate_counts,
        "counts simulated from an scVI-like model (simulate_counts(), seed 0) with known "
        "clusters, batches and latent space",
        1000, 200,
        {"cluster": "4 clusters", "batch": "2 batches"},
    ),
})


def load_dataset(name: str):
    """Load a dataset of :data:`PACKAGED_DATASETS` by name.

    Parameters
    ----------
    name
        A key of :data:`PACKAGED_DATASETS`, e.g. ``"pbmc68k_reduced"``.

    Returns
    -------
    anndata.AnnData
        Raw counts in ``X``.

    Raises
    ------
    KeyError
        If no dataset has this name (the message lists the names).
    ImportError
        If the dataset needs a package that is not installed.

    Examples
    --------
    >>> adata = pyrovi.datasets.load_dataset("pbmc68k_reduced")  # doctest: +SKIP
    """
    if name not in PACKAGED_DATASETS:
        raise KeyError(f"No packaged dataset {name!r}; the packaged datasets are "
                       f"{', '.join(PACKAGED_DATASETS)}.")
    return PACKAGED_DATASETS[name].loader()
