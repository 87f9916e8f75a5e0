"""scvi-tools' fully-connected blocks ↔ pyrovi's :class:`~pyrovi.nn.FCLayers`.

scvi-tools' ``FCLayers`` holds layer ``i`` as ``fc_layers.Layer i``, a ``Sequential`` of a
``Linear`` (index 0), a ``BatchNorm1d`` (index 1, when used), an affine-free ``LayerNorm``,
the activation and dropout (no weights). A layer that takes covariates multiplies
``[x, continuous covariates, one-hot of each categorical covariate]`` by one weight matrix
(covariates with a single category have no one-hot block). pyrovi's
:class:`~pyrovi.nn.CovariateLinear` holds the same matrix split into ``linear.weight``
(the ``x`` columns), ``cont_weight.weight`` (the continuous columns) and one
``cat_weights.<k>.weight`` table per categorical covariate, ``n_categories × n_out``: the
transpose of its one-hot block. The functions here read each pyrovi layer's own widths, so
they serve any stack: covariates in the first layer only or in every layer, continuous
covariates injected or not (scvi-tools' models append them to ``x`` instead, which is then
simply a wider ``x``).
"""

from __future__ import annotations

import torch
from torch import nn

from pyrovi.nn.fc import CovariateLinear, FCLayers

#: State entries of a batch norm, in scvi-tools and pyrovi alike.
_BATCH_NORM_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _batch_norm_position(post: nn.Sequential) -> int | None:
    """Index of the batch norm among a pyrovi layer's post-linear modules, if it has one."""
    for position, block in enumerate(post):
        if isinstance(block, nn.BatchNorm1d):
            return position
    return None


def _column_blocks(linear: CovariateLinear) -> list[tuple[str, int, bool]]:
    """``(pyrovi entry, width, transposed)`` for each column block of scvi-tools' weight, in
    scvi-tools' order: the input, the continuous covariates, each categorical covariate."""
    blocks = [("linear.weight", linear.linear.in_features, False)]
    if linear.cont_weight is not None:
        blocks.append(("cont_weight.weight", linear.cont_weight.in_features, False))
    for k, n_categories in enumerate(linear.n_cat_list):
        if n_categories > 0:
            blocks.append((f"cat_weights.{k}.weight", n_categories, True))
    return blocks


def _entry(scvi_state: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]
           ) -> torch.Tensor:
    """``scvi_state[key]``, checked to exist and to have ``shape``."""
    if key not in scvi_state:
        raise ValueError(f"The scvi-tools weights have no {key!r} (expected shape {shape}).")
    value = scvi_state[key]
    if tuple(value.shape) != tuple(shape):
        raise ValueError(f"The scvi-tools weight {key!r} has shape {tuple(value.shape)}; this "
                         f"model needs {tuple(shape)}.")
    return value


def fc_layers_from_scvi_tools(
    scvi_state: dict[str, torch.Tensor], prefix: str, fc: FCLayers
) -> dict[str, torch.Tensor]:
    """The state of ``fc`` from the scvi-tools ``FCLayers`` at ``prefix`` in ``scvi_state``.

    Parameters
    ----------
    scvi_state
        An scvi-tools module's state dict (only the entries under ``prefix`` are read).
    prefix
        The scvi-tools block's name, e.g. ``"decoder.px_decoder"``.
    fc
        The pyrovi block the weights are for; its layer widths and covariates decide how
        each weight is split.

    Returns
    -------
    dict
        New tensors under ``fc``'s own state-dict keys (``layers.0.linear.linear.weight``...).

    Raises
    ------
    ValueError
        Naming the scvi-tools entry that is missing or has the wrong shape.
    """
    state = {}
    for i, layer in enumerate(fc.layers):
        linear, here = layer["linear"], f"layers.{i}."
        blocks = _column_blocks(linear)
        n_out = linear.linear.out_features
        weight = _entry(scvi_state, f"{prefix}.fc_layers.Layer {i}.0.weight",
                        (n_out, sum(width for _, width, _ in blocks)))
        start = 0
        for name, width, transposed in blocks:
            block = weight[:, start:start + width]
            state[here + "linear." + name] = (block.T if transposed else block).clone()
            start += width
        if linear.linear.bias is not None:
            state[here + "linear.linear.bias"] = _entry(
                scvi_state, f"{prefix}.fc_layers.Layer {i}.0.bias", (n_out,)).clone()
        position = _batch_norm_position(layer["post"])
        if position is not None:
            norm = layer["post"][position]
            for entry in _BATCH_NORM_ENTRIES:
                own = getattr(norm, entry)
                state[f"{here}post.{position}.{entry}"] = _entry(
                    scvi_state, f"{prefix}.fc_layers.Layer {i}.1.{entry}", tuple(own.shape)
                ).clone()
    return state


def fc_layers_to_scvi_tools(fc: FCLayers, prefix: str) -> dict[str, torch.Tensor]:
    """The state of ``fc`` as scvi-tools' ``FCLayers`` at ``prefix`` holds it.

    Parameters
    ----------
    fc
        A pyrovi block.
    prefix
        The scvi-tools block's name, e.g. ``"decoder.px_decoder"``.

    Returns
    -------
    dict
        New tensors under ``<prefix>.fc_layers.Layer <i>.<j>.<entry>`` keys: each layer's
        joined weight and bias, and its batch norm's state when it has one.
    """
    state = {}
    for i, layer in enumerate(fc.layers):
        linear, here = layer["linear"], f"{prefix}.fc_layers.Layer {i}."
        parts = dict(linear.named_parameters())
        columns = [parts[name].detach().T if transposed else parts[name].detach()
                   for name, _, transposed in _column_blocks(linear)]
        state[here + "0.weight"] = torch.cat(columns, dim=1).clone()
        if linear.linear.bias is not None:
            state[here + "0.bias"] = linear.linear.bias.detach().clone()
        position = _batch_norm_position(layer["post"])
        if position is not None:
            norm = layer["post"][position]
            for entry in _BATCH_NORM_ENTRIES:
                state[f"{here}1.{entry}"] = getattr(norm, entry).detach().clone()
    return state
