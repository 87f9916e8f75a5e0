"""Constructor arguments of scvi-tools' models as pyrovi's, and back.

scvi-tools stores a model's constructor arguments as ``attr_dict["init_params_"] =
{"non_kwargs": {...}, "kwargs": {"<name of **kwargs>": {...}}}``, only those the call named
or the signature lists; everything else takes the module's default. pyrovi's model
classes use scvi-tools' argument names, so the translation is a table of the options each
class supports, their scvi-tools defaults, and the options that must keep their default
because pyrovi has no counterpart (an error names them).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelCorrespondence:
    """How an scvi-tools model class and a pyrovi model class correspond.

    Attributes
    ----------
    scvi_tools_name, pyrovi_name
        The class names.
    arguments
        scvi-tools' default of every argument pyrovi takes under the same name.
    fixed
        scvi-tools arguments pyrovi supports only at this value.
    named
        The arguments scvi-tools' signature lists (``non_kwargs``); the others go to its
        ``**kwargs`` (``kwargs_name``).
    kwargs_name
        Name of the class's ``**kwargs``.
    """

    scvi_tools_name: str
    pyrovi_name: str
    arguments: dict
    fixed: dict = field(default_factory=dict)
    named: tuple[str, ...] = ()
    kwargs_name: str = "kwargs"


#: Options of scvi-tools' VAE module that pyrovi has only at their default. ``None`` and an
#: empty dict both mean "not given".
_VAE_FIXED = {
    "log_variational": True,
    "batch_representation": "one-hot",
    "var_activation": None,
    "extra_encoder_kwargs": None,
    "extra_decoder_kwargs": None,
    "batch_embedding_kwargs": None,
}
_SCVI_NAMED = ("n_hidden", "n_latent", "n_layers", "dropout_rate", "dispersion",
               "gene_likelihood", "use_observed_lib_size", "latent_distribution")

SCVI = ModelCorrespondence(
    "SCVI", "SCVI",
    arguments={"n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1,
               "dispersion": "gene", "gene_likelihood": "zinb",
               "use_observed_lib_size": True, "latent_distribution": "normal",
               "encode_covariates": False, "deeply_inject_covariates": True,
               "use_batch_norm": "both", "use_layer_norm": "none"},
    fixed=_VAE_FIXED,
    named=_SCVI_NAMED,
)
LINEAR_SCVI = ModelCorrespondence(
    "LinearSCVI", "LDVAE",
    arguments={"n_hidden": 128, "n_latent": 10, "n_layers": 1, "dropout_rate": 0.1,
               "dispersion": "gene", "gene_likelihood": "nb",
               "use_observed_lib_size": False, "latent_distribution": "normal",
               "use_batch_norm": True, "bias": False},
    # LDVAE builds its own encoder (batch norm, no covariates) and linear decoder, so
    # scvi-tools ignores the VAE's architecture options; pyrovi refuses them instead.
    fixed={**_VAE_FIXED, "encode_covariates": False, "deeply_inject_covariates": True,
           "use_layer_norm": "none"},
    named=_SCVI_NAMED,
    kwargs_name="model_kwargs",
)
CORRESPONDENCES = {c.scvi_tools_name: c for c in (SCVI, LINEAR_SCVI)}


def _empty(value) -> bool:
    return value is None or (isinstance(value, dict | list | tuple) and len(value) == 0)


def flat_init_params(init_params: dict) -> dict:
    """scvi-tools' ``init_params_`` as one dict of argument names and values.

    Parameters
    ----------
    init_params
        ``attr_dict["init_params_"]``.

    Returns
    -------
    dict
    """
    if "non_kwargs" in init_params:
        flat = dict(init_params["non_kwargs"])
        for values in (init_params.get("kwargs") or {}).values():
            flat.update(values or {})
        return flat
    # Files of scvi-tools < 0.15 kept everything at one level, **kwargs as nested dicts.
    flat = {k: v for k, v in init_params.items() if not isinstance(v, dict)}
    for values in (v for v in init_params.values() if isinstance(v, dict)):
        flat.update(values)
    flat.pop("use_cuda", None)
    return flat


def arguments_from_scvi_tools(correspondence: ModelCorrespondence, init_params: dict) -> dict:
    """pyrovi constructor arguments for an scvi-tools model's ``init_params_``.

    Parameters
    ----------
    correspondence
        The pair of classes.
    init_params
        ``attr_dict["init_params_"]``.

    Returns
    -------
    dict
        Every argument of ``correspondence.arguments``, at its value in the file or at
        scvi-tools' default.

    Raises
    ------
    ValueError
        Naming each option pyrovi does not have (an option of a newer scvi-tools, or a
        supported one at a value pyrovi lacks).
    """
    given = flat_init_params(init_params)
    given.pop("adata", None)
    given.pop("registry", None)
    refused = []
    for name, value in given.items():
        if name in correspondence.arguments:
            continue
        if name in correspondence.fixed:
            default = correspondence.fixed[name]
            if not (value == default or (_empty(default) and _empty(value))):
                refused.append(f"{name}={value!r} (pyrovi has only {default!r})")
        elif not _empty(value):
            refused.append(f"{name}={value!r}")
    if refused:
        raise ValueError(
            f"This scvi-tools {correspondence.scvi_tools_name} uses options pyrovi's "
            f"{correspondence.pyrovi_name} does not have: {', '.join(refused)}. Its weights "
            "would compute something else in pyrovi, so it is not imported."
        )
    arguments = {name: given.get(name, default)
                 for name, default in correspondence.arguments.items()}
    if arguments["gene_likelihood"] not in ("zinb", "nb", "poisson"):
        raise ValueError(f"gene_likelihood={arguments['gene_likelihood']!r} of the scvi-tools "
                         "model has no pyrovi counterpart (pyrovi has zinb, nb and poisson).")
    return arguments


def arguments_to_scvi_tools(correspondence: ModelCorrespondence, init_params: dict) -> dict:
    """scvi-tools' ``init_params_`` for a pyrovi model built with ``init_params``.

    Parameters
    ----------
    correspondence
        The pair of classes.
    init_params
        The pyrovi model's ``init_params``.

    Returns
    -------
    dict
        ``{"non_kwargs": {...}, "kwargs": {<kwargs name>: {...}}}``.

    Raises
    ------
    ValueError
        A pyrovi option scvi-tools lacks (a prior other than ``"normal"``, a callable
        likelihood), named.
    """
    refused = []
    prior = init_params.get("prior", "normal")
    if prior != "normal":
        label = prior if isinstance(prior, str) else type(prior).__name__
        refused.append(f"prior={label!r} (scvi-tools' {correspondence.scvi_tools_name} has "
                       "only the standard normal prior)")
    if callable(init_params.get("gene_likelihood")):
        refused.append("a callable gene_likelihood (scvi-tools has zinb, nb and poisson)")
    if refused:
        raise ValueError(
            f"This {correspondence.pyrovi_name} cannot be written for scvi-tools: "
            f"{'; '.join(refused)}."
        )
    values = {name: init_params.get(name, default)
              for name, default in correspondence.arguments.items()}
    named = {k: v for k, v in values.items() if k in correspondence.named}
    rest = {k: v for k, v in values.items() if k not in correspondence.named}
    return {"non_kwargs": named, "kwargs": {correspondence.kwargs_name: rest}}
