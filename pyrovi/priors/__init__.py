"""Latent priors (``pyrovi.priors``): modules returning p(z) for a plate of cells."""

from pyrovi.priors.normal import NormalPrior

PRIORS = {"normal": NormalPrior}


def build_prior(prior, n_latent: int):
    """Turn a prior name or module into a prior module.

    Parameters
    ----------
    prior
        ``"normal"`` or an ``nn.Module`` following the prior interface (called with the
        number of cells, returns a distribution of event shape ``(n_latent,)``).
    n_latent
        Latent dimension.
    """
    if isinstance(prior, str):
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {sorted(PRIORS)} or a prior module.")
        return PRIORS[prior](n_latent)
    return prior


__all__ = ["PRIORS", "NormalPrior", "build_prior"]
