"""Latent priors (``pyrovi.priors``): modules returning p(z) for a plate of cells.

Every prior is an ``nn.Module`` called with the number of cells in the plate and returning
a Pyro distribution with batch shape ``(n_cells,)`` and event shape ``(n_latent,)``.
Learnable priors keep their parameters as module parameters: the model's optimiser trains
them and the model's ``state_dict`` saves them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyro.distributions as dist
import torch
from torch import nn

from pyrovi.priors.mixture import MixtureOfGaussiansPrior
from pyrovi.priors.normal import NormalPrior
from pyrovi.priors.vamp import EncoderFn, VampPrior

PRIORS = {"normal": NormalPrior, "mog": MixtureOfGaussiansPrior, "vamp": VampPrior}


def check_prior(prior: nn.Module, n_latent: int, n_cells: int = 3) -> None:
    """Call ``prior`` once and check that it follows the prior interface.

    Parameters
    ----------
    prior
        The prior module.
    n_latent
        Latent dimension the model expects.
    n_cells
        Number of cells to call it with.

    Raises
    ------
    TypeError
        If ``prior`` is not an ``nn.Module`` or does not return a Pyro distribution.
    ValueError
        If the call fails or the distribution has the wrong batch or event shape.
    """
    name = type(prior).__name__
    if not isinstance(prior, nn.Module):
        raise TypeError(
            f"A prior must be an nn.Module called with the number of cells; got {name}."
        )
    try:
        with torch.no_grad():
            p = prior(n_cells)
    except Exception as error:
        raise ValueError(
            f"The prior {name} failed when called with the number of cells ({n_cells}): "
            f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(p, dist.Distribution):
        raise TypeError(
            f"The prior {name} returned {type(p).__name__}; it must return a Pyro "
            "distribution (from pyro.distributions)."
        )
    if tuple(p.batch_shape) != (n_cells,) or tuple(p.event_shape) != (n_latent,):
        raise ValueError(
            f"The prior {name} called with {n_cells} cells returned batch shape "
            f"{tuple(p.batch_shape)} and event shape {tuple(p.event_shape)}; a prior must "
            f"return batch shape (n_cells,) = ({n_cells},) and event shape (n_latent,) = "
            f"({n_latent},) (e.g. dist.Normal(loc, scale).expand([n_cells, n_latent])"
            ".to_event(1))."
        )


def build_prior(
    prior: str | nn.Module,
    n_latent: int,
    prior_kwargs: Mapping | None = None,
    encoder: EncoderFn | None = None,
    n_input: int | None = None,
    n_cat_list: Sequence[int] = (),
    n_cont: int = 0,
) -> nn.Module:
    """Turn a prior name or module into a checked prior module.

    Parameters
    ----------
    prior
        ``"normal"`` (:class:`NormalPrior`), ``"mog"`` (:class:`MixtureOfGaussiansPrior`),
        ``"vamp"`` (:class:`VampPrior`), or an ``nn.Module`` following the prior interface.
    n_latent
        Latent dimension.
    prior_kwargs
        Options of the named prior (e.g. ``{"n_components": 5}``); not allowed with a
        module.
    encoder
        The model's encoder of q(z | x), for ``"vamp"`` (held, not registered; see
        :class:`VampPrior`); also attached to a :class:`VampPrior` instance, in place of
        the encoder it held.
    n_input
        Width of the encoder's input, for ``"vamp"``.
    n_cat_list, n_cont
        Covariates the encoder takes, for ``"vamp"``.

    Returns
    -------
    torch.nn.Module
        The prior, checked once with :func:`check_prior`.

    Raises
    ------
    ValueError
        For an unknown name, ``prior_kwargs`` with a module, or a prior whose distribution
        has the wrong shape.
    TypeError
        For a prior that is not a module or does not return a Pyro distribution.

    Examples
    --------
    >>> build_prior("mog", 10, {"n_components": 5}).n_components
    5
    """
    kwargs = dict(prior_kwargs or {})
    if isinstance(prior, str):
        if prior not in PRIORS:
            raise ValueError(
                f"Unknown prior {prior!r}: prior must be one of {sorted(PRIORS)} or a prior "
                "module (nn.Module called with the number of cells)."
            )
        if prior == "vamp" and (encoder is None or n_input is None):
            raise ValueError("prior='vamp' needs the model's encoder and its input width.")
        try:
            if prior == "vamp":
                module = VampPrior(n_latent, n_input, encoder=encoder, n_cat_list=n_cat_list,
                                   n_cont=n_cont, **kwargs)
            else:
                module = PRIORS[prior](n_latent, **kwargs)
        except TypeError as error:
            raise TypeError(f"Invalid prior_kwargs for prior={prior!r}: {error}") from error
    else:
        if kwargs:
            raise ValueError(
                "prior_kwargs configure a named prior ('normal', 'mog', 'vamp'); a prior "
                "module is used as given."
            )
        module = prior
        # A VampPrior instance serves the model it is given to: whatever encoder it held
        # (none, or another model's, e.g. in a deep copy of settings) is replaced.
        if isinstance(module, VampPrior) and encoder is not None:
            module.attach_encoder(encoder)
    check_prior(module, n_latent)
    return module


__all__ = [
    "PRIORS",
    "MixtureOfGaussiansPrior",
    "NormalPrior",
    "VampPrior",
    "build_prior",
    "check_prior",
]
