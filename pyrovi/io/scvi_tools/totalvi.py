"""TotalVI weights and settings: scvi-tools' ``TOTALVAE`` ↔ pyrovi's ``TOTALVIModule``.

The pyrovi module must be built with ``network_layout="scvi-tools"``: its networks then
have scvi-tools' structure (see :class:`~pyrovi.nn.ScviToolsTotalVIDecoder`), and every
scvi-tools tensor has exactly one pyrovi counterpart:

===========================================  =============================================
scvi-tools                                   pyrovi
===========================================  =============================================
``encoder.encoder`` (FCLayers)               ``encoder.z_encoder.trunk``
``encoder.z_mean_encoder``, ``z_var_...``    ``encoder.z_encoder.loc``, ``.log_var``
``encoder.l_gene_encoder`` (FCLayers)        ``encoder.library_encoder.trunk``
``encoder.l_gene_mean_encoder``, ``var``     ``encoder.library_encoder.loc``, ``.log_var``
``decoder.<network>`` (10 FCLayers)          ``decoder.<network>`` (same names)
``px_r`` ``(genes[, groups])``               ``dispersion.log_theta`` ``(groups, genes)``
``py_r`` ``(proteins[, groups])``            ``protein_dispersion.log_theta``
``background_pro_alpha``, ``..._log_beta``   ``background_prior_mean``, ``..._log_scale``
``log_per_batch_efficiency``                 ``log_protein_efficiency``
``library_log_means``, ``_vars`` ``(1, B)``  ``library_log_means``, ``_vars`` ``(B,)``
===========================================  =============================================

The FCLayers are split and joined by :mod:`pyrovi.io.scvi_tools.linear_blocks`. pyrovi's
own entries with no scvi-tools counterpart (the latent prior's buffers, the
measured-protein mask, the library prior when the library size is observed) keep the
module's values: the mask and the library prior come from the data the module was built
on, and scvi-tools stores neither in its weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from pyrovi.data import AnnDataRegistry
from pyrovi.data.multimodal import DEFAULT_MODALITIES, MUDATA_PROTEIN_KEY, resolve_modalities
from pyrovi.io.scvi_tools.arguments import flat_init_params
from pyrovi.io.scvi_tools.linear_blocks import fc_layers_from_scvi_tools, fc_layers_to_scvi_tools
from pyrovi.io.scvi_tools.registry import registry_from_scvi_tools, registry_to_scvi_tools, strings
from pyrovi.modules import TOTALVIModule
from pyrovi.nn.fc import FCLayers
from pyrovi.priors import NormalPrior

#: The networks of scvi-tools' DecoderTOTALVI, named alike in pyrovi's scvi-tools layout.
DECODER_NETWORKS = (
    "px_decoder", "px_scale_decoder", "py_back_decoder", "py_back_mean_log_alpha",
    "py_back_mean_log_beta", "py_fore_decoder", "py_fore_scale_decoder", "sigmoid_decoder",
    "px_dropout_decoder_gene", "py_background_decoder",
)
#: The encoder's two Gaussian networks: pyrovi's (a trunk, a ``loc`` and a ``log_var`` head)
#: ↔ scvi-tools' trunk, mean head and variance head.
_ENCODER_NETWORKS = (
    ("encoder.z_encoder", "encoder.encoder", "encoder.z_mean_encoder",
     "encoder.z_var_encoder"),
    ("encoder.library_encoder", "encoder.l_gene_encoder", "encoder.l_gene_mean_encoder",
     "encoder.l_gene_var_encoder"),
)
#: Tensors stored alike (same shape) under two names: pyrovi ↔ scvi-tools.
_SAME_TENSORS = {
    "background_prior_mean": "background_pro_alpha",
    "background_prior_log_scale": "background_pro_log_beta",
    "log_protein_efficiency": "log_per_batch_efficiency",
}
#: pyrovi's dispersion modules ↔ scvi-tools' log inverse dispersions.
_DISPERSIONS = {"dispersion": "px_r", "protein_dispersion": "py_r"}
#: A tensor's reshaping between the two layouts.
Rule = Callable[[torch.Tensor], torch.Tensor]


def _check_layout(module: TOTALVIModule) -> None:
    if getattr(module, "network_layout", None) != "scvi-tools":
        raise ValueError(
            "scvi-tools' TotalVI weights map only onto a TOTALVIModule built with "
            f"network_layout='scvi-tools'; this one has {module.network_layout!r}.")


def _fc_blocks(module: TOTALVIModule) -> list[tuple[str, str, FCLayers]]:
    """``(pyrovi prefix, scvi-tools prefix, block)`` of every fully-connected block."""
    blocks = [(f"{own}.trunk", trunk, module.get_submodule(f"{own}.trunk"))
              for own, trunk, _, _ in _ENCODER_NETWORKS]
    return blocks + [(f"decoder.{name}", f"decoder.{name}", getattr(module.decoder, name))
                     for name in DECODER_NETWORKS]


def _linear_heads() -> list[tuple[str, str]]:
    """``(pyrovi key, scvi-tools key)`` of the weight and bias of the encoder's heads."""
    return [(f"{own}.{head}.{entry}", f"{theirs}.{entry}")
            for own, _, mean, variance in _ENCODER_NETWORKS
            for head, theirs in (("loc", mean), ("log_var", variance))
            for entry in ("weight", "bias")]


def _grouped(module: nn.Module) -> bool:
    """Whether a dispersion has one row per group (scvi-tools: one column per group)."""
    return module.mode != "gene"


def _tensor_rules(module: TOTALVIModule) -> list[tuple[str, str, Rule, Rule]]:
    """``(pyrovi key, scvi-tools key, to scvi-tools, from scvi-tools)`` of the tensors
    outside the networks, in scvi-tools' order."""
    rules = [(own, theirs, _identity, _identity) for own, theirs in _SAME_TENSORS.items()]
    for own, theirs in _DISPERSIONS.items():
        if _grouped(getattr(module, own)):  # (groups, n) ↔ (n, groups)
            rules.append((f"{own}.log_theta", theirs, _transpose, _transpose))
        else:  # (1, n) ↔ (n,)
            rules.append((f"{own}.log_theta", theirs, _first_row, _as_row))
    if not module.use_observed_lib_size:
        # scvi-tools registers the library prior only for a latent library, as (1, n_batch).
        for name in ("library_log_means", "library_log_vars"):
            rules.append((name, name, _as_row, _first_row))
    return rules


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _transpose(t: torch.Tensor) -> torch.Tensor:
    return t.T


def _first_row(t: torch.Tensor) -> torch.Tensor:
    return t[0]


def _as_row(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0)


def totalvi_state_to_scvi_tools(module: TOTALVIModule) -> dict[str, torch.Tensor]:
    """The weights of ``module`` as scvi-tools' ``TOTALVAE`` state dict.

    Parameters
    ----------
    module
        A :class:`~pyrovi.modules.TOTALVIModule` built with ``network_layout="scvi-tools"``
        and the standard normal latent prior.

    Returns
    -------
    dict
        New tensors under exactly the keys, and with the shapes, of the state dict of the
        scvi-tools module of the same settings.

    Raises
    ------
    ValueError
        For another layout or a latent prior scvi-tools' TotalVI does not have.
    """
    _check_layout(module)
    prior = module.prior
    if not isinstance(prior, NormalPrior):
        raise ValueError("scvi-tools' TotalVI has a standard normal latent prior; this module "
                         f"has {type(prior).__name__}.")
    if not (bool((prior.loc == 0).all()) and bool((prior.scale == 1).all())):
        raise ValueError("scvi-tools' TotalVI has a standard normal latent prior; this "
                         "module's normal prior has another mean or scale.")
    own = module.state_dict()
    state = {theirs: to_theirs(own[key]).detach().clone()
             for key, theirs, to_theirs, _ in _tensor_rules(module)}
    for _, theirs, block in _fc_blocks(module):
        state.update(fc_layers_to_scvi_tools(block, theirs))
    for key, theirs in _linear_heads():
        state[theirs] = own[key].detach().clone()
    return state


def totalvi_state_from_scvi_tools(
    scvi_state: dict[str, torch.Tensor], module: TOTALVIModule
) -> dict[str, torch.Tensor]:
    """A full state dict for ``module`` from an scvi-tools ``TOTALVAE`` state dict.

    Parameters
    ----------
    scvi_state
        The scvi-tools module's state dict (``model.module.state_dict()``, or the
        ``model_state_dict`` of its ``model.pt``).
    module
        A :class:`~pyrovi.modules.TOTALVIModule` built with ``network_layout="scvi-tools"``
        and the same sizes and options as the scvi-tools model.

    Returns
    -------
    dict
        New tensors for every entry of ``module.state_dict()`` (entries without an scvi-tools
        counterpart keep the module's values), ready for ``module.load_state_dict``.

    Raises
    ------
    ValueError
        For another layout, or naming every scvi-tools entry that is missing, extra or of
        another shape than this module needs.
    """
    _check_layout(module)
    expected = {key: tuple(t.shape) for key, t in totalvi_state_to_scvi_tools(module).items()}
    given = {key: tuple(t.shape) for key, t in scvi_state.items()}
    problems = []
    missing = [key for key in expected if key not in given]
    extra = [key for key in given if key not in expected]
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"not in this model {extra}")
    problems += [f"{key!r} has shape {given[key]}, this model needs {shape}"
                 for key, shape in expected.items() if key in given and given[key] != shape]
    if problems:
        raise ValueError("The scvi-tools TotalVI weights do not fit this module (built with "
                         "other sizes or options?): " + "; ".join(problems) + ".")
    own = module.state_dict()
    state = {key: value.detach().clone() for key, value in own.items()}
    for key, theirs, _, from_theirs in _tensor_rules(module):
        state[key] = from_theirs(scvi_state[theirs]).clone()
    for key, theirs in _linear_heads():
        state[key] = scvi_state[theirs].clone()
    for prefix, theirs, block in _fc_blocks(module):
        for key, value in fc_layers_from_scvi_tools(scvi_state, theirs, block).items():
            state[f"{prefix}.{key}"] = value
    return {key: value.to(own[key].dtype).contiguous() for key, value in state.items()}


# -- constructor arguments ---------------------------------------------------------------

#: scvi-tools TOTALVI's own arguments that pyrovi's TOTALVI takes under the same name, with
#: scvi-tools' defaults (written out, so that pyrovi's defaults never stand in for them).
_MODEL_ARGUMENTS = {
    "n_latent": 20, "gene_dispersion": "gene", "protein_dispersion": "protein",
    "gene_likelihood": "nb", "latent_distribution": "normal",
    "override_missing_proteins": False,
}
#: Arguments of scvi-tools' TOTALVAE (its TOTALVI's ``**model_kwargs``) that pyrovi's TOTALVI
#: takes under the same name, with scvi-tools' defaults.
_MODULE_ARGUMENTS = {
    "n_hidden": 256, "n_layers_encoder": 2, "n_layers_decoder": 1,
    "dropout_rate_decoder": 0.2, "dropout_rate_encoder": 0.2, "encode_covariates": True,
    "use_observed_lib_size": True, "use_batch_norm": "both", "use_layer_norm": "none",
}
_BACKGROUND_ACTIVATIONS = ("softplus", "exp")


def _before_1_2(version: str | None) -> bool:
    """Whether ``version`` (scvi-tools' version that saved a model) is older than 1.2."""
    if version is None:
        return False
    numbers = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if numbers is None:
        raise ValueError(f"Cannot read the scvi-tools version {version!r}.")
    return tuple(map(int, numbers.groups())) < (1, 2)


def _refuse(option: str, why: str) -> ValueError:
    return ValueError(f"scvi-tools' TOTALVI option {option} cannot be mapped to pyrovi: {why}.")


def totalvi_init_params_from_scvi_tools(init_params: dict, *, scvi_version: str | None = None
                                        ) -> dict:
    """pyrovi TOTALVI arguments reproducing an scvi-tools TOTALVI's networks.

    Parameters
    ----------
    init_params
        scvi-tools' record of the constructor arguments (``attr_dict["init_params_"]``).
    scvi_version
        The scvi-tools version that saved the model (its registry's ``scvi_version``):
        scvi-tools loads models saved before 1.2 with the exponential background scale.

    Returns
    -------
    dict
        Keyword arguments of :class:`pyrovi.TOTALVI`, with ``network_layout="scvi-tools"``
        and every size and option written out (scvi-tools' defaults where it recorded none).
        ``empirical_protein_background_prior=None`` (scvi-tools: only above 10 proteins)
        becomes pyrovi's default, ``True``: it sets initial values only, which the mapped
        weights replace.

    Raises
    ------
    ValueError
        Naming the first scvi-tools option pyrovi cannot reproduce: ``gene-cell``
        dispersion, ``log_variational=False``, encoder options, decoder options other than
        ``activation_function_bg``, or any option unknown here (such as the prior
        initialisations or a panel), which scvi-tools' TOTALVI sets itself.

    Examples
    --------
    >>> totalvi_init_params_from_scvi_tools(
    ...     {"non_kwargs": {"n_latent": 10}, "kwargs": {"model_kwargs": {"n_hidden": 64}}}
    ... )["n_hidden"]
    64
    """
    arguments = flat_init_params(init_params)
    result = {name: arguments.pop(name, default)
              for name, default in {**_MODEL_ARGUMENTS, **_MODULE_ARGUMENTS}.items()}
    result["network_layout"] = "scvi-tools"
    if result["gene_dispersion"] == "gene-cell":
        raise _refuse("gene_dispersion='gene-cell'", "scvi-tools' TotalVI module has no "
                      "per-cell dispersion network")
    empirical = arguments.pop("empirical_protein_background_prior", None)
    result["empirical_protein_background_prior"] = True if empirical is None else bool(empirical)
    if not arguments.pop("log_variational", True):
        raise _refuse("log_variational=False", "pyrovi's encoder always reads log counts")
    # Only adds monitoring outputs to scvi-tools' loss; nothing is computed differently.
    arguments.pop("extra_payload_autotune", None)
    encoder_options = arguments.pop("extra_encoder_kwargs", None) or {}
    if encoder_options:
        raise _refuse(f"extra_encoder_kwargs={encoder_options!r}",
                      "pyrovi builds the encoder from the model's own options")
    decoder_options = dict(arguments.pop("extra_decoder_kwargs", None) or {})
    activation = decoder_options.pop("activation_function_bg", None)
    if decoder_options:
        raise _refuse(f"extra_decoder_kwargs={decoder_options!r}",
                      "only activation_function_bg is supported")
    if activation is None:
        activation = "exp" if _before_1_2(scvi_version) else "softplus"
    if activation not in _BACKGROUND_ACTIVATIONS:
        raise _refuse(f"activation_function_bg={activation!r}",
                      f"pyrovi has {_BACKGROUND_ACTIVATIONS}")
    result["background_activation"] = activation
    if arguments:
        name = sorted(arguments)[0]
        raise _refuse(f"{name}={arguments[name]!r}", "pyrovi's TOTALVI has no such option")
    return result


def totalvi_init_params_to_scvi_tools(init_params: dict) -> dict:
    """scvi-tools TOTALVI's record of constructor arguments for a pyrovi TOTALVI's.

    Parameters
    ----------
    init_params
        The pyrovi model's ``init_params``; it must have ``network_layout="scvi-tools"``.

    Returns
    -------
    dict
        ``{"non_kwargs": {...}, "kwargs": {"model_kwargs": {...}}}`` as scvi-tools records
        ``init_params_``: the arguments pyrovi recorded, under scvi-tools' names, and the
        background scale's activation always written out (``extra_decoder_kwargs``).

    Raises
    ------
    ValueError
        For another layout, or naming the pyrovi option scvi-tools' TOTALVI cannot take: a
        latent prior other than the standard normal, a callable likelihood, an unknown one.
    """
    params = dict(init_params)
    layout = params.pop("network_layout", "pyrovi")
    if layout != "scvi-tools":
        raise ValueError("Only a TOTALVI built with network_layout='scvi-tools' has scvi-tools' "
                         f"networks; this one has network_layout={layout!r}.")
    prior, prior_kwargs = params.pop("prior", "normal"), params.pop("prior_kwargs", None)
    if prior != "normal" or prior_kwargs:
        raise ValueError(f"pyrovi's option prior={prior!r} (prior_kwargs={prior_kwargs!r}) has no "
                         "scvi-tools counterpart: its TOTALVI has a standard normal prior.")
    if callable(params.get("gene_likelihood")):
        raise ValueError("pyrovi's option gene_likelihood=<callable> has no scvi-tools "
                         "counterpart ('nb' or 'zinb').")
    non_kwargs = {name: params.pop(name) for name in _MODEL_ARGUMENTS if name in params}
    if "empirical_protein_background_prior" in params:
        non_kwargs["empirical_protein_background_prior"] = bool(
            params.pop("empirical_protein_background_prior"))
    model_kwargs = {name: params.pop(name) for name in _MODULE_ARGUMENTS if name in params}
    if model_kwargs.get("dropout_rate_decoder", 0.2) is None:  # pyrovi: the layout's default
        model_kwargs["dropout_rate_decoder"] = _MODULE_ARGUMENTS["dropout_rate_decoder"]
    activation = params.pop("background_activation", None) or "softplus"
    if activation not in _BACKGROUND_ACTIVATIONS:
        raise ValueError(f"pyrovi's option background_activation={activation!r} has no "
                         f"scvi-tools counterpart {_BACKGROUND_ACTIVATIONS}.")
    # Written out, so scvi-tools never falls back to an older version's default.
    model_kwargs["extra_decoder_kwargs"] = {"activation_function_bg": activation}
    if params:
        name = sorted(params)[0]
        raise ValueError(f"pyrovi's option {name}={params[name]!r} has no scvi-tools "
                         "counterpart.")
    return {"non_kwargs": non_kwargs, "kwargs": {"model_kwargs": model_kwargs}}


# -- the set-up: scvi-tools' protein field ↔ pyrovi's ProteinField --------------------------

#: scvi-tools TOTALVI set-up arguments beyond scVI's that pyrovi maps (``panel_key`` only
#: when unset: pyrovi has no protein panels).
_TOTALVI_SETUP_ARGS = ("protein_expression_obsm_key", "protein_names_uns_key", "panel_key",
                       "rna_layer", "protein_layer", "modalities")


def totalvi_registry_from_scvi_tools(registry: dict, model_name: str, n_vars: int) -> dict:
    """pyrovi's TOTALVI registry from an scvi-tools TOTALVI ``registry_``.

    Adds to :func:`~pyrovi.io.scvi_tools.registry.registry_from_scvi_tools` the proteins'
    obsm key, names and per-batch measured mask, and for a model set up with
    ``setup_mudata`` the modality of each argument.

    Parameters
    ----------
    registry
        ``attr_dict["registry_"]`` of an scvi-tools TOTALVI.
    model_name
        ``"TOTALVI"``.
    n_vars
        Number of genes.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        A protein panel (``panel_key``), which pyrovi's TOTALVI does not have.
    """
    setup = registry.get("setup_args") or {}
    if setup.get("panel_key"):
        raise ValueError(f"The scvi-tools TOTALVI was set up with panel_key="
                         f"{setup['panel_key']!r}; pyrovi's TOTALVI has no protein panels.")
    record = registry_from_scvi_tools(registry, model_name, n_vars, _TOTALVI_SETUP_ARGS)
    proteins = dict((registry["field_registries"].get("proteins") or {})
                    .get("state_registry") or {})
    names = strings(proteins.get("column_names", []))
    if not names:
        raise ValueError("The scvi-tools TOTALVI registry names no proteins.")
    measured = [[True] * len(names) for _ in record["batch_categories"]]
    for code, row in dict(proteins.get("protein_batch_mask") or {}).items():
        measured[int(code)] = [bool(v) for v in np.asarray(row).ravel()]
    record.update(protein_names=names, protein_batch_mask=measured,
                  protein_expression_obsm_key=setup.get("protein_expression_obsm_key")
                  or MUDATA_PROTEIN_KEY)
    if registry.get("setup_method_name") == "setup_mudata":
        record["layer"] = None  # the flat view holds the RNA layer's counts in X
        record["mudata_modalities"] = {
            **resolve_modalities({k: v for k, v in dict(setup.get("modalities") or {}).items()
                                  if k in DEFAULT_MODALITIES}),
            "rna_layer_name": setup.get("rna_layer") or "",
            "protein_layer_name": setup.get("protein_layer") or ""}
    return record


def totalvi_registry_to_scvi_tools(registry: AnnDataRegistry, var_names, model_name: str,
                                   scvi_version: str) -> dict:
    """scvi-tools' TOTALVI ``registry_`` for a pyrovi TOTALVI set up with ``setup_anndata``.

    Parameters
    ----------
    registry
        The pyrovi model's registry.
    var_names
        Its genes.
    model_name
        ``"TOTALVI"``.
    scvi_version
        Version of scvi-tools to name in the file.

    Returns
    -------
    dict

    Raises
    ------
    ValueError
        A model set up from a MuData or with labels (scvi-tools' ``TOTALVI.setup_anndata``
        takes no ``labels_key``).
    """
    if registry.mudata_modalities:
        raise ValueError(
            "This TOTALVI was set up from a MuData; pyrovi writes scvi-tools' TOTALVI only for "
            "AnnData set-ups. Set the model up with TOTALVI.setup_anndata (proteins in obsm).")
    if registry.labels_key is not None:
        raise ValueError("scvi-tools' TOTALVI.setup_anndata takes no labels_key; this TOTALVI "
                         f"was set up with labels_key={registry.labels_key!r}.")
    record = registry_to_scvi_tools(registry, var_names, model_name, scvi_version)
    record["setup_args"].update(protein_expression_obsm_key=registry.protein_expression_obsm_key,
                                protein_names_uns_key=None, panel_key=None)
    names = list(registry.protein_names)
    state = {"column_names": names}  # a list: scvi-tools compares it with a list
    mask = np.asarray(registry.protein_batch_mask, dtype=bool)
    if mask.size and not mask.all():
        state["protein_batch_mask"] = {str(b): row for b, row in enumerate(mask)}
    record["field_registries"]["proteins"] = {
        "data_registry": {"attr_name": "obsm",
                          "attr_key": registry.protein_expression_obsm_key},
        "state_registry": state,
        "summary_stats": {"n_proteins": len(names)},
    }
    return record
