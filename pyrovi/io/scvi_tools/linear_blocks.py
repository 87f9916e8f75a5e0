"""Weights of scvi-tools' fully-connected blocks in pyrovi's layout, and back.

scvi-tools' ``FCLayers`` feeds each layer one ``nn.Linear`` over the concatenation
``[x, one-hot(c_1), one-hot(c_2), ...]``; continuous covariates are concatenated to ``x``
before the first layer only. pyrovi's :class:`~pyrovi.nn.fc.CovariateLinear` holds the same
weight matrix in pieces: ``linear.weight`` (the ``x`` columns), ``cont_weight`` (the
continuous covariates' columns) and one ``nn.Embedding`` table per categorical covariate
(the transpose of its one-hot columns, looked up instead of multiplied). The functions here
cut one layout into the other; no value is changed.

Keys: scvi-tools writes layer ``i`` of a block at ``<prefix>.fc_layers.Layer i.0`` (the
linear map) and ``Layer i.1`` (its batch norm, when used; layer norm has no parameters).
"""

from __future__ import annotations

import torch
from torch import nn

from pyrovi.nn.fc import CovariateLinear, FCLayers

#: The column blocks of a layer that reads only the batch (scvi-tools' linear decoder).
_BATCH_ONLY = ("linear.weight", "cat_weights.0.weight")
_BATCH_NORM_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def take(state: dict, key: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``state[key]``, checked to exist and to have ``shape``.

    Raises
    ------
    ValueError
        Naming the key that is missing or has another shape.
    """
    if key not in state:
        raise ValueError(f"The scvi-tools weights lack {key!r}: the file does not match the "
                         "architecture its constructor arguments describe.")
    value = state[key]
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"The scvi-tools weight {key!r} has shape {tuple(value.shape)}, "
                         f"expected {tuple(shape)} from the model's arguments and set-up.")
    return value


def _batch_norm(layer: nn.Module) -> nn.BatchNorm1d | None:
    return next((m for m in layer["post"] if isinstance(m, nn.BatchNorm1d)), None)


def _column_blocks(linear: CovariateLinear, first: bool) -> list[tuple[str, int]]:
    """``(pyrovi name, width)`` of each column block of the scvi-tools weight, in order."""
    blocks = [("linear.weight", linear.linear.in_features)]
    if first and linear.cont_weight is not None:
        blocks.append(("cont_weight.weight", linear.cont_weight.in_features))
    for k, n in enumerate(linear.n_cat_list):
        if n > 0:
            blocks.append((f"cat_weights.{k}.weight", n))
    return blocks


def fc_layers_from_scvi_tools(state: dict, prefix: str, fc: FCLayers,
                              batch_only: bool = False,
                              continuous_in_hidden_layers: bool = True) -> dict:
    """pyrovi state-dict entries of ``fc`` (keys relative to it) from scvi-tools' block.

    Parameters
    ----------
    state
        The scvi-tools module's state dict.
    prefix
        Key of the block in ``state`` (``"z_encoder.encoder"``, ``"decoder.px_decoder"``).
    fc
        The pyrovi block the weights are for (it gives the widths).
    batch_only
        scvi-tools' block reads only the first covariate (the batch), as its linear decoder
        does; pyrovi's tables of the other covariates are then zero.
    continuous_in_hidden_layers
        scvi-tools' block injects the continuous covariates into every layer it injects
        categorical ones into (an ``FCLayers`` built with ``n_cont``). ``False`` for the
        VAE's networks, which append them to the input of the first layer only.

    Returns
    -------
    dict
        Entries such as ``"layers.0.linear.linear.weight"``. Covariate weights scvi-tools
        does not have (continuous covariates beyond the first layer, which it feeds to the
        first layer only; covariates a ``batch_only`` block ignores) are zero.

    Raises
    ------
    ValueError
        A key is missing or has another shape.
    """
    out = {}
    for i, layer in enumerate(fc.layers):
        linear: CovariateLinear = layer["linear"]
        key = f"{prefix}.fc_layers.Layer {i}.0"
        blocks = _column_blocks(linear, first=i == 0 or continuous_in_hidden_layers)
        kept = [(name, width) for name, width in blocks if not batch_only or name in _BATCH_ONLY]
        weight = take(state, f"{key}.weight",
                      (linear.linear.out_features, sum(w for _, w in kept)))
        start = 0
        for name, width in kept:
            piece = weight[:, start:start + width]
            out[f"layers.{i}.linear.{name}"] = piece.T if name.startswith("cat_") else piece
            start += width
        for name, parameter in linear.named_parameters():
            if name.endswith("weight") and f"layers.{i}.linear.{name}" not in out:
                out[f"layers.{i}.linear.{name}"] = torch.zeros_like(parameter)
        if linear.linear.bias is not None:
            out[f"layers.{i}.linear.linear.bias"] = take(state, f"{key}.bias",
                                                         (linear.linear.out_features,))
        norm = _batch_norm(layer)
        if norm is not None:
            index = list(layer["post"]).index(norm)
            for entry in _BATCH_NORM_ENTRIES:
                out[f"layers.{i}.post.{index}.{entry}"] = take(
                    state, f"{prefix}.fc_layers.Layer {i}.1.{entry}",
                    tuple(getattr(norm, entry).shape))
    return {k: v.clone() for k, v in out.items()}


def fc_layers_to_scvi_tools(fc: FCLayers, prefix: str, what: str = "this network",
                            batch_only: bool = False,
                            continuous_in_hidden_layers: bool = True) -> dict:
    """scvi-tools' state-dict entries of the block ``prefix`` from the pyrovi block ``fc``.

    Parameters
    ----------
    fc
        The pyrovi block.
    prefix
        Key of the block in scvi-tools' module.
    what
        Name of the block for messages (``"the decoder"``).
    batch_only
        Write only the batch's columns (scvi-tools' linear decoder reads no other
        covariate).
    continuous_in_hidden_layers
        As for :func:`fc_layers_from_scvi_tools`.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        When ``fc`` uses covariates where scvi-tools' block has none (continuous
        covariates beyond the first layer; any but the batch in a ``batch_only`` block).
    """
    out = {}
    for i, layer in enumerate(fc.layers):
        linear: CovariateLinear = layer["linear"]
        blocks = [name for name, _ in _column_blocks(
            linear, first=i == 0 or continuous_in_hidden_layers)]
        kept = [name for name in blocks if not batch_only or name in _BATCH_ONLY]
        for name, parameter in linear.named_parameters():
            if name.endswith("weight") and name not in kept and parameter.any():
                raise ValueError(
                    f"{what} uses covariates in layer {i} that scvi-tools' block does not read"
                    f" ({name}: it feeds continuous covariates to the first layer only, and "
                    "its linear decoder reads only the batch), so this model cannot be "
                    "written in its format."
                )
        pieces = []
        for name in kept:
            piece = linear.get_parameter(name).detach()
            pieces.append(piece.T if name.startswith("cat_") else piece)
        key = f"{prefix}.fc_layers.Layer {i}.0"
        out[f"{key}.weight"] = torch.cat(pieces, dim=1)
        if linear.linear.bias is not None:
            out[f"{key}.bias"] = linear.linear.bias.detach()
        norm = _batch_norm(layer)
        if norm is not None:
            for entry in _BATCH_NORM_ENTRIES:
                out[f"{prefix}.fc_layers.Layer {i}.1.{entry}"] = getattr(norm, entry).detach()
    return {k: v.clone().cpu() for k, v in out.items()}


def linear_from_scvi_tools(state: dict, key: str, linear: nn.Linear, name: str) -> dict:
    """pyrovi entries ``<name>.weight``/``.bias`` of ``linear`` from scvi-tools' ``key``."""
    out = {f"{name}.weight": take(state, f"{key}.weight", tuple(linear.weight.shape))}
    if linear.bias is not None:
        out[f"{name}.bias"] = take(state, f"{key}.bias", tuple(linear.bias.shape))
    return {k: v.clone() for k, v in out.items()}


def linear_to_scvi_tools(linear: nn.Linear, key: str) -> dict:
    """scvi-tools entries ``<key>.weight``/``.bias`` of the pyrovi ``linear``."""
    out = {f"{key}.weight": linear.weight.detach().clone().cpu()}
    if linear.bias is not None:
        out[f"{key}.bias"] = linear.bias.detach().clone().cpu()
    return out


def prefixed(prefix: str, entries: dict) -> dict:
    """``entries`` with ``prefix.`` before every key."""
    return {f"{prefix}.{k}": v for k, v in entries.items()}
