"""Small real datasets that ship inside registry packages."""

from __future__ import annotations

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
