"""Weights of scvi-tools' ``VAE``/``LDVAE`` modules in pyrovi's :class:`SCVIModule`, and back.

The two libraries compute the same functions with the same parameters, stored under other
names. The correspondence, block by block (scvi-tools → pyrovi):

====================================  ==================================================
``z_encoder.encoder`` (FCLayers)       ``encoder.z_encoder.trunk``
``z_encoder.mean_encoder``             ``encoder.z_encoder.loc``
``z_encoder.var_encoder``              ``encoder.z_encoder.log_var`` (variance ``exp + 1e-4``)
``l_encoder.*``                        ``encoder.library_encoder.*`` (latent library only)
``decoder.px_decoder``                 ``decoder.trunk``
``decoder.px_scale_decoder.0``         ``decoder.rho_head``
``decoder.px_r_decoder``               ``decoder.theta_head`` (``dispersion="gene-cell"``)
``decoder.px_dropout_decoder``         ``decoder.zi_head`` (ZINB)
``decoder.factor_regressor`` (LDVAE)   ``decoder.factor_regressor``
``decoder.px_dropout_decoder`` (LDVAE) ``decoder.zi_head``
``px_r`` (genes × groups)              ``dispersion.log_theta`` (groups × genes)
``library_log_means/vars`` (1 × batch) ``library_log_means/vars`` (batch)
====================================  ==================================================

scvi-tools builds a library encoder and (for LDVAE) a zero-inflation map even when they are
unused; pyrovi does not, so importing skips them and exporting writes them at a fixed,
documented initial value (they never enter scvi-tools' computations for such a model).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pyrovi.io.scvi_tools.linear_blocks import (
    fc_layers_from_scvi_tools,
    fc_layers_to_scvi_tools,
    linear_from_scvi_tools,
    linear_to_scvi_tools,
    prefixed,
    take,
)
from pyrovi.modules import SCVIModule
from pyrovi.nn import ExpressionDecoder, GaussianEncoder, LinearExpressionDecoder

#: Names of scvi-tools' Gaussian networks' parts: ``Encoder`` and ``Decoder`` (p(z1 | z2, y)).
ENCODER_PARTS = ("encoder", "mean_encoder", "var_encoder")
DECODER_PARTS = ("decoder", "mean_decoder", "var_decoder")


def encoder_from_scvi_tools(state: dict, key: str, encoder: GaussianEncoder, name: str,
                            parts: tuple[str, str, str] = ENCODER_PARTS) -> dict:
    """pyrovi entries ``<name>.*`` of ``encoder`` from scvi-tools' Gaussian network ``key``.

    Parameters
    ----------
    state
        scvi-tools' state dict.
    key
        The network's key (``"z_encoder"``).
    encoder
        The pyrovi network (its trunk, ``loc`` and ``log_var``).
    name
        The pyrovi network's key.
    parts
        scvi-tools' names of the trunk and the two heads.

    Returns
    -------
    dict
    """
    trunk, mean, var = parts
    out = prefixed(f"{name}.trunk", fc_layers_from_scvi_tools(
        state, f"{key}.{trunk}", encoder.trunk, continuous_in_hidden_layers=False))
    out.update(linear_from_scvi_tools(state, f"{key}.{mean}", encoder.loc, f"{name}.loc"))
    out.update(linear_from_scvi_tools(state, f"{key}.{var}", encoder.log_var,
                                      f"{name}.log_var"))
    return out


def encoder_to_scvi_tools(encoder: GaussianEncoder, key: str, what: str,
                          parts: tuple[str, str, str] = ENCODER_PARTS) -> dict:
    """scvi-tools' entries of the Gaussian network ``key`` from the pyrovi ``encoder``
    (the inverse of :func:`encoder_from_scvi_tools`; ``what`` names it in messages)."""
    trunk, mean, var = parts
    out = fc_layers_to_scvi_tools(encoder.trunk, f"{key}.{trunk}", what,
                                  continuous_in_hidden_layers=False)
    out.update(linear_to_scvi_tools(encoder.loc, f"{key}.{mean}"))
    out.update(linear_to_scvi_tools(encoder.log_var, f"{key}.{var}"))
    return out


def _decoder_blocks(decoder: nn.Module) -> list[tuple[str, str, str]]:
    """``(kind, scvi-tools key, pyrovi name)`` of each block of a pyrovi decoder."""
    if isinstance(decoder, LinearExpressionDecoder):
        blocks = [("fc", "decoder.factor_regressor", "factor_regressor")]
        if decoder.zi_head is not None:
            blocks.append(("fc", "decoder.px_dropout_decoder", "zi_head"))
        if decoder.theta_head is not None:
            raise ValueError("scvi-tools' LinearSCVI has no per-cell dispersion "
                             "(dispersion='gene-cell').")
        return blocks
    if not isinstance(decoder, ExpressionDecoder):
        raise ValueError(f"A {type(decoder).__name__} decoder has no scvi-tools counterpart.")
    blocks = [("fc", "decoder.px_decoder", "trunk"),
              ("linear", "decoder.px_scale_decoder.0", "rho_head")]
    if decoder.theta_head is not None:
        blocks.append(("linear", "decoder.px_r_decoder", "theta_head"))
    if decoder.zi_head is not None:
        blocks.append(("linear", "decoder.px_dropout_decoder", "zi_head"))
    return blocks


def scvi_state_from_scvi_tools(state: dict, module: SCVIModule) -> dict:
    """A state dict for ``module`` from the state dict of scvi-tools' ``VAE`` or ``LDVAE``.

    Parameters
    ----------
    state
        ``model_state_dict`` of an scvi-tools ``model.pt``.
    module
        The pyrovi module built with the matching arguments (it gives every shape).

    Returns
    -------
    dict
        Every entry of ``module.state_dict()``; load it with ``strict=True``.

    Raises
    ------
    ValueError
        An entry is missing, has another shape than ``module`` needs, or has no place in
        ``module``.
    """
    return check_every_entry_placed(state, module, scvi_entries_from_scvi_tools(state, module),
                                    scvi_state_to_scvi_tools)


def scvi_entries_from_scvi_tools(state: dict, module: SCVIModule) -> dict:
    """The entries of scVI's networks in ``module`` (an SCVIModule or a subclass), read from
    scvi-tools' ``state`` (missing or mis-shaped entries raise ``ValueError``); entries of a
    subclass's own networks are the caller's, and so is the check that nothing is left."""
    out = encoder_from_scvi_tools(state, "z_encoder", module.encoder.z_encoder, "encoder.z_encoder")
    if module.encoder.library_encoder is not None:
        out.update(encoder_from_scvi_tools(state, "l_encoder", module.encoder.library_encoder,
                                 "encoder.library_encoder"))
    decoder = module.decoder
    for kind, key, name in _decoder_blocks(decoder):
        block = getattr(decoder, name)
        if kind == "fc":
            linear = isinstance(decoder, LinearExpressionDecoder)
            out.update(prefixed(f"decoder.{name}",
                                fc_layers_from_scvi_tools(state, key, block, batch_only=linear,
                                                          continuous_in_hidden_layers=False)))
        else:
            out.update(linear_from_scvi_tools(state, key, block, f"decoder.{name}"))
    log_theta = module.dispersion.log_theta
    if log_theta is not None:
        px_r = take(state, "px_r")
        groups, genes = log_theta.shape
        if px_r.dim() == 1:
            px_r = px_r.unsqueeze(-1)
        out["dispersion.log_theta"] = take({"px_r": px_r}, "px_r", (genes, groups)).T.clone()
    for name in ("library_log_means", "library_log_vars"):
        if module.use_observed_lib_size and name not in state:
            # scvi-tools keeps the library prior only for a latent library; pyrovi's copy
            # (estimated from the data, unused with an observed library) stays.
            out[name] = getattr(module, name).detach().clone()
            continue
        out[name] = take(state, name).reshape(-1).clone()
        if out[name].shape != getattr(module, name).shape:
            raise ValueError(f"The scvi-tools weight {name!r} has {out[name].numel()} batches,"
                             f" the set-up {getattr(module, name).numel()}.")
    for name, value in module.state_dict().items():
        if name.startswith("prior.") and name not in out:
            out[name] = value.clone()
    return out


def check_every_entry_placed(state: dict, module: nn.Module, mapped: dict, to_scvi_tools
                             ) -> dict:
    """``mapped``, once every tensor of scvi-tools' ``state`` is known to have a place.

    An entry the architecture does not explain would be a network pyrovi silently leaves
    out; the entries explained are those ``to_scvi_tools`` writes for ``module`` holding
    ``mapped``.

    Raises
    ------
    ValueError
        Naming the entries without a place.
    """
    probe = copy.deepcopy(module)
    probe.load_state_dict(mapped)
    extra = sorted(set(state) - set(to_scvi_tools(probe)))
    if extra:
        raise ValueError(f"The scvi-tools weights hold entries this architecture has no place "
                         f"for: {extra[:5]}{' ...' if len(extra) > 5 else ''}.")
    return mapped


def scvi_state_to_scvi_tools(module: SCVIModule) -> dict:
    """The state dict of scvi-tools' ``VAE`` (or ``LDVAE``) equivalent to ``module``.

    Parameters
    ----------
    module
        A pyrovi :class:`SCVIModule` with a standard normal prior.

    Returns
    -------
    dict
        Tensors on the CPU, under scvi-tools' keys and shapes.

    Raises
    ------
    ValueError
        A part of ``module`` scvi-tools cannot represent.
    """
    out = encoder_to_scvi_tools(module.encoder.z_encoder, "z_encoder", "the encoder")
    library = module.encoder.library_encoder
    out.update(encoder_to_scvi_tools(library, "l_encoder", "the library encoder")
               if library is not None else _unused_library_encoder(module))
    decoder = module.decoder
    for kind, key, name in _decoder_blocks(decoder):
        block = getattr(decoder, name)
        if kind == "fc":
            out.update(fc_layers_to_scvi_tools(
                block, key, "the decoder",
                batch_only=isinstance(decoder, LinearExpressionDecoder),
                continuous_in_hidden_layers=False))
        else:
            out.update(linear_to_scvi_tools(block, key))
    if isinstance(decoder, LinearExpressionDecoder) and decoder.zi_head is None:
        out.update(_unused_block(decoder.factor_regressor, "decoder.px_dropout_decoder",
                                 batch_only=True))
    if isinstance(decoder, ExpressionDecoder):
        # scvi-tools' decoder always has both heads; a model without them never reads them.
        for head, key in ((decoder.theta_head, "decoder.px_r_decoder"),
                          (decoder.zi_head, "decoder.px_dropout_decoder")):
            if head is None:
                out.update({k: torch.zeros_like(v) for k, v in
                            linear_to_scvi_tools(decoder.rho_head, key).items()})
    log_theta = module.dispersion.log_theta
    if log_theta is not None:
        px_r = log_theta.detach().T.clone().cpu()
        out["px_r"] = px_r[:, 0].contiguous() if module.dispersion.mode == "gene" else px_r
    if not module.use_observed_lib_size:
        for name in ("library_log_means", "library_log_vars"):
            out[name] = getattr(module, name).detach().reshape(1, -1).clone().cpu()
    return out


def _unused_block(fc, key: str, batch_only: bool = False) -> dict:
    """Entries of a block scvi-tools builds but never uses for this model: zeros (and the
    identity batch norm), a fixed value rather than random noise in the file."""
    out = {}
    for name, value in fc_layers_to_scvi_tools(fc, key, "an unused block", batch_only,
                                               continuous_in_hidden_layers=False).items():
        fill = 1.0 if name.endswith(("running_var", ".1.weight")) else 0.0
        out[name] = torch.full_like(value, fill) if value.dtype.is_floating_point else \
            torch.zeros_like(value)
    return out


def _unused_library_encoder(module: SCVIModule) -> dict:
    """scvi-tools' library encoder for a model with the observed library (never called)."""
    z = module.encoder.z_encoder
    n_hidden = z.loc.in_features
    trunk = module.encoder.z_encoder.trunk
    first = trunk.layers[0]
    stand_in = GaussianEncoder(
        first["linear"].linear.in_features, 1,
        n_cat_list=[n for n in first["linear"].n_cat_list],
        n_cont=first["linear"].cont_weight.in_features if first["linear"].cont_weight
        is not None else 0,
        n_layers=1, n_hidden=n_hidden,
        use_batch_norm=any(isinstance(m, nn.BatchNorm1d) for m in first["post"]),
    )
    out = _unused_block(stand_in.trunk, "l_encoder.encoder")
    for name, linear in (("mean_encoder", stand_in.loc), ("var_encoder", stand_in.log_var)):
        for entry, value in linear_to_scvi_tools(linear, f"l_encoder.{name}").items():
            out[entry] = torch.zeros_like(value)
    return out
