"""scANVI: scvi-tools' ``SCANVAE`` ↔ pyrovi's :class:`~pyrovi.modules.SCANVIModule`.

scANVI is scVI plus three networks and the label prior; scVI's part maps as for ``SCVI``
(:mod:`pyrovi.io.scvi_tools.scvi_weights`), the rest as follows (scvi-tools → pyrovi):

=======================================  =================================================
``classifier.classifier.0`` (FCLayers)   ``classifier.0`` (``classifier`` when linear)
``classifier.classifier.1``              ``classifier.1``
``encoder_z2_z1`` (Encoder)              ``z2_encoder`` (q(z2 | z1, y))
``decoder_z1_z2`` (Decoder)              ``z1_decoder`` (p(z1 | z2, y))
``y_prior`` ``(1, labels)``              ``label_probs`` ``(labels,)``
=======================================  =================================================

Both libraries code the labels alike: the known labels in the registry's order, the
unlabelled category last. Two differences in training, none in the outputs: scvi-tools'
p(z1 | z2, y) has variance ``exp(v)`` where pyrovi's adds the floor ``1e-4`` of all its
Gaussian networks, and scvi-tools applies dropout in q(z2 | z1, y) while training.
"""

from __future__ import annotations

from torch import nn

from pyrovi.data import AnnDataRegistry
from pyrovi.io.scvi_tools import arguments
from pyrovi.io.scvi_tools.linear_blocks import (
    fc_layers_from_scvi_tools,
    fc_layers_to_scvi_tools,
    linear_from_scvi_tools,
    linear_to_scvi_tools,
    prefixed,
    take,
)
from pyrovi.io.scvi_tools.registry import registry_from_scvi_tools, registry_to_scvi_tools
from pyrovi.io.scvi_tools.scvi_weights import (
    DECODER_PARTS,
    check_every_entry_placed,
    encoder_from_scvi_tools,
    encoder_to_scvi_tools,
    scvi_entries_from_scvi_tools,
    scvi_state_to_scvi_tools,
)
from pyrovi.modules import SCANVIModule

SCANVI = arguments.ModelCorrespondence(
    "SCANVI", "SCANVI",
    arguments={**arguments.SCVI.arguments, "linear_classifier": False,
               "classifier_parameters": None},
    fixed={**arguments.SCVI.fixed, "datamodule": None, "labels_groups": None,
           "use_labels_groups": False, "y_prior": None},
    named=(*arguments.SCVI.named, "linear_classifier", "datamodule"),
    kwargs_name="model_kwargs",
)
#: Options of scvi-tools' classifier pyrovi takes; ``logits=True`` is what both compute.
_CLASSIFIER_OPTIONS = ("n_hidden", "n_layers", "dropout_rate")


def scanvi_arguments_from_scvi_tools(init_params: dict, scvi_version: str) -> dict:
    """pyrovi SCANVI arguments for an scvi-tools SCANVI's ``init_params_``.

    ``y_prior`` (a tensor in scvi-tools' weights) is read with the weights; the classifier's
    ``logits=True`` is dropped (pyrovi's classifier always returns logits).

    Raises
    ------
    ValueError
        An option pyrovi's SCANVI does not have, named.
    """
    del scvi_version
    params = arguments.flat_init_params(init_params)
    options = dict(params.get("classifier_parameters") or {})
    if options.pop("logits", True) is not True:
        raise ValueError("The scvi-tools SCANVI's classifier returns probabilities "
                         "(classifier_parameters={'logits': False}); pyrovi's returns logits.")
    refused = sorted(set(options) - set(_CLASSIFIER_OPTIONS))
    if refused:
        raise ValueError(f"The scvi-tools SCANVI's classifier_parameters {refused} have no "
                         f"pyrovi counterpart (it takes {list(_CLASSIFIER_OPTIONS)}).")
    params["classifier_parameters"] = options or None
    return arguments.arguments_from_scvi_tools(
        SCANVI, {"non_kwargs": params, "kwargs": {}})


def scanvi_arguments_to_scvi_tools(init_params: dict) -> dict:
    """scvi-tools SCANVI's ``init_params_`` for a pyrovi SCANVI (``y_prior`` goes with the
    weights, as scvi-tools keeps it)."""
    params = {k: v for k, v in init_params.items() if k != "y_prior"}
    return arguments.arguments_to_scvi_tools(SCANVI, params)


def scanvi_registry_from_scvi_tools(registry: dict, model_name: str, n_vars: int) -> dict:
    """pyrovi's SCANVI registry from scvi-tools' (the labels keep their unlabelled category).

    Raises
    ------
    ValueError
        A registry of minified data set up with ``use_minified`` or without an unlabelled
        category.
    """
    setup = registry.get("setup_args") or {}
    if setup.get("use_minified"):
        raise ValueError("The scvi-tools SCANVI was set up on minified data (use_minified=True)"
                         "; pyrovi reads scANVI with its counts.")
    record = registry_from_scvi_tools(registry, model_name, n_vars,
                                      ("unlabeled_category", "use_minified"))
    unlabeled = setup.get("unlabeled_category")
    if unlabeled is None or str(unlabeled) not in record["label_categories"]:
        raise ValueError(f"The scvi-tools SCANVI's labels {record['label_categories']} do not "
                         f"hold its unlabeled_category {unlabeled!r}.")
    record["unlabeled_category"] = str(unlabeled)
    return record


def scanvi_registry_to_scvi_tools(registry: AnnDataRegistry, var_names, model_name: str,
                                  scvi_version: str) -> dict:
    """scvi-tools' SCANVI ``registry_`` for a pyrovi SCANVI's set-up."""
    record = registry_to_scvi_tools(registry, var_names, model_name, scvi_version)
    record["setup_args"].update(unlabeled_category=registry.unlabeled_category,
                                use_minified=False)
    record["field_registries"]["labels"]["state_registry"]["unlabeled_category"] = \
        registry.unlabeled_category
    return record


def _classifier_blocks(classifier: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """``(kind, scvi-tools key, pyrovi name)`` of the classifier's parts."""
    if isinstance(classifier, nn.Linear):
        return [("linear", "classifier.classifier.0", "classifier")]
    return [("fc", "classifier.classifier.0", "classifier.0"),
            ("linear", "classifier.classifier.1", "classifier.1")]


def scanvi_state_from_scvi_tools(state: dict, module: SCANVIModule) -> dict:
    """A state dict for ``module`` from the state dict of scvi-tools' ``SCANVAE``.

    Raises
    ------
    ValueError
        An entry is missing, mis-shaped, or has no place in ``module``.
    """
    out = scvi_entries_from_scvi_tools(state, module)
    for kind, key, name in _classifier_blocks(module.classifier):
        block = module.get_submodule(name)
        if kind == "fc":
            out.update(prefixed(name, fc_layers_from_scvi_tools(state, key, block)))
        else:
            out.update(linear_from_scvi_tools(state, key, block, name))
    out.update(encoder_from_scvi_tools(state, "encoder_z2_z1", module.z2_encoder, "z2_encoder"))
    out.update(encoder_from_scvi_tools(state, "decoder_z1_z2", module.z1_decoder, "z1_decoder",
                                       DECODER_PARTS))
    prior = take(state, "y_prior").reshape(-1)
    out["label_probs"] = take({"y_prior": prior}, "y_prior",
                              tuple(module.label_probs.shape)).clone()
    return check_every_entry_placed(state, module, out, scanvi_state_to_scvi_tools)


def scanvi_state_to_scvi_tools(module: SCANVIModule) -> dict:
    """The state dict of scvi-tools' ``SCANVAE`` equivalent to ``module``."""
    out = scvi_state_to_scvi_tools(module)
    for kind, key, name in _classifier_blocks(module.classifier):
        block = module.get_submodule(name)
        out.update(fc_layers_to_scvi_tools(block, key, "the classifier") if kind == "fc"
                   else linear_to_scvi_tools(block, key))
    out.update(encoder_to_scvi_tools(module.z2_encoder, "encoder_z2_z1", "q(z2 | z1, y)"))
    out.update(encoder_to_scvi_tools(module.z1_decoder, "decoder_z1_z2", "p(z1 | z2, y)",
                                     DECODER_PARTS))
    out["y_prior"] = module.label_probs.detach().reshape(1, -1).clone().cpu()
    return out
