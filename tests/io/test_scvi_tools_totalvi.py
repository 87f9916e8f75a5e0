"""TotalVI weights between scvi-tools' TOTALVAE and pyrovi's scvi-tools network layout.

Without scvi-tools: the mapping is a bijection (pyrovi → scvi-tools keys → pyrovi gives the
same tensors), the fully-connected blocks follow scvi-tools' column convention, and bad
weights or options are refused by name. With scvi-tools: a small trained scvi-tools TOTALVI
and the pyrovi module given its weights compute the same encoder and decoder outputs on
the same cells, and so do the two after pyrovi's weights go the other way.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from pyrovi.io.scvi_tools.linear_blocks import fc_layers_from_scvi_tools, fc_layers_to_scvi_tools
from pyrovi.io.scvi_tools.totalvi import (
    totalvi_init_params_from_scvi_tools,
    totalvi_init_params_to_scvi_tools,
    totalvi_state_from_scvi_tools,
    totalvi_state_to_scvi_tools,
)
from pyrovi.modules import TOTALVIModule
from pyrovi.nn import FCLayers

N_CELLS, N_GENES, N_PROTEINS = 120, 40, 6
#: scvi-tools TOTALVI arguments of the two settings compared: its defaults (at small sizes),
#: and one that exercises every mapped option (covariates, per-batch dispersions, ZINB,
#: latent library, logistic normal, deeper decoders, layer norm without batch norm).
SETTINGS = {
    "defaults": dict(n_latent=5, n_hidden=16),
    "options": dict(n_latent=5, n_hidden=16, gene_likelihood="zinb",
                    gene_dispersion="gene-batch", protein_dispersion="protein-batch",
                    latent_distribution="ln", use_observed_lib_size=False, n_layers_decoder=2,
                    n_layers_encoder=3, use_batch_norm="none", use_layer_norm="both"),
}
#: Settings with covariates: one categorical covariate of 3 categories, one continuous.
WITH_COVARIATES = {"options"}


def pyrovi_module(setting: str, scvi_init_params: dict | None = None) -> TOTALVIModule:
    """The pyrovi module for a setting, from scvi-tools' record of its arguments."""
    if scvi_init_params is None:
        scvi_init_params = {"non_kwargs": {}, "kwargs": {"model_kwargs": {}}}
        for name, value in SETTINGS[setting].items():
            group = ("non_kwargs" if name in ("n_latent", "gene_likelihood", "gene_dispersion",
                                              "protein_dispersion", "latent_distribution")
                     else "kwargs")
            target = scvi_init_params[group]
            (target if group == "non_kwargs" else target["model_kwargs"])[name] = value
    params = totalvi_init_params_from_scvi_tools(scvi_init_params)
    for model_only in ("empirical_protein_background_prior", "override_missing_proteins"):
        params.pop(model_only)
    covariates = setting in WITH_COVARIATES
    return TOTALVIModule(
        N_GENES, N_PROTEINS, n_batch=2, n_cats_per_cov=[3] if covariates else [],
        n_continuous_cov=1 if covariates else 0, library_log_means=torch.zeros(2),
        library_log_vars=torch.ones(2), **params)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Give every float tensor of ``module`` distinct random values (variances positive),
    but the standard normal latent prior's."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point() and not name.startswith("prior."):
                values = torch.randn(tensor.shape, generator=generator) * 0.3
                positive = name.endswith(("running_var", "_vars"))
                tensor.copy_(values.abs() + 0.5 if positive else values)


# -- without scvi-tools ---------------------------------------------------------------


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_state_maps_to_scvi_tools_keys_and_back_unchanged(setting):
    module = pyrovi_module(setting)
    randomise(module)
    scvi_state = totalvi_state_to_scvi_tools(module)
    assert all(" " in key for key in scvi_state if ".fc_layers." in key)  # "Layer i"
    assert "log_per_batch_efficiency" in scvi_state and "py_r" in scvi_state
    back = totalvi_state_from_scvi_tools(scvi_state, module)
    own = module.state_dict()
    assert list(back) == list(own)
    for key, value in own.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_fc_layers_follow_scvi_tools_column_order():
    """scvi-tools multiplies [x, continuous, one-hot per covariate] by one weight."""
    fc = FCLayers(7, 5, n_cat_list=[3, 1, 4], n_cont=2, n_layers=2, n_hidden=6,
                  use_batch_norm=True, inject_covariates=False).eval()
    randomise(fc)
    scvi_state = fc_layers_to_scvi_tools(fc, "net")
    weight, bias = scvi_state["net.fc_layers.Layer 0.0.weight"], scvi_state[
        "net.fc_layers.Layer 0.0.bias"]
    assert weight.shape == (6, 7 + 2 + 3 + 4)  # the 1-category covariate has no block
    assert scvi_state["net.fc_layers.Layer 1.0.weight"].shape == (5, 6)  # not injected
    assert "net.fc_layers.Layer 1.1.running_var" in scvi_state
    x, cont = torch.randn(9, 7), torch.randn(9, 2)
    cats = [torch.randint(3, (9,)), torch.zeros(9, dtype=torch.long), torch.randint(4, (9,))]
    joined = torch.cat([x, cont, F.one_hot(cats[0], 3), F.one_hot(cats[2], 4)], -1).float()
    torch.testing.assert_close(fc.layers[0]["linear"](x, cats, cont), joined @ weight.T + bias,
                               rtol=1e-6, atol=1e-6)
    back = fc_layers_from_scvi_tools(scvi_state, "net", fc)
    assert set(back) == set(fc.state_dict())
    assert all(torch.equal(back[k], v) for k, v in fc.state_dict().items())


@pytest.mark.parametrize("inject", [True, False])
def test_fc_layers_compute_what_scvi_tools_fc_layers_compute(inject):
    scvi_nn = pytest.importorskip("scvi.nn")
    options = dict(n_cat_list=[3, 1, 4], n_cont=2, n_layers=3, n_hidden=6,
                   use_layer_norm=True, inject_covariates=inject)
    theirs = scvi_nn.FCLayers(7, 5, **options).eval()
    randomise(theirs)
    ours = FCLayers(7, 5, **options).eval()
    scvi_state = {f"net.{k}": v for k, v in theirs.state_dict().items()}
    ours.load_state_dict(fc_layers_from_scvi_tools(scvi_state, "net", ours))
    x, cont = torch.randn(9, 7), torch.randn(9, 2)
    cats = [torch.randint(3, (9,)), torch.zeros(9, dtype=torch.long), torch.randint(4, (9,))]
    expected = theirs(x, *(c[:, None] for c in cats), cont=cont)
    torch.testing.assert_close(ours(x, cats, cont), expected, rtol=1e-5, atol=1e-6)
    mapped = fc_layers_to_scvi_tools(ours, "net")
    assert set(mapped) == set(scvi_state)
    assert all(torch.equal(mapped[k], v) for k, v in scvi_state.items())


def test_weights_that_do_not_fit_are_named():
    module = pyrovi_module("defaults")
    scvi_state = totalvi_state_to_scvi_tools(module)
    wrong = dict(scvi_state)
    wrong["decoder.px_decoder.fc_layers.Layer 0.0.weight"] = torch.zeros(16, 9)
    with pytest.raises(ValueError, match=r"'decoder.px_decoder.fc_layers.Layer 0.0.weight' has "
                                         r"shape \(16, 9\), this model needs \(16, 7\)"):
        totalvi_state_from_scvi_tools(wrong, module)
    missing = {k: v for k, v in scvi_state.items() if k != "py_r"}
    with pytest.raises(ValueError, match=r"missing \['py_r'\]"):
        totalvi_state_from_scvi_tools(missing, module)
    with pytest.raises(ValueError, match=r"not in this model \['library_log_means'\]"):
        totalvi_state_from_scvi_tools({**scvi_state, "library_log_means": torch.zeros(1, 2)},
                                      module)
    pyrovi_layout = TOTALVIModule(N_GENES, N_PROTEINS, n_batch=2)
    with pytest.raises(ValueError, match="network_layout='scvi-tools'"):
        totalvi_state_to_scvi_tools(pyrovi_layout)
    with pytest.raises(ValueError, match="network_layout='scvi-tools'"):
        totalvi_state_from_scvi_tools(scvi_state, pyrovi_layout)


def test_init_params_translate_both_ways_and_refuse_what_pyrovi_lacks():
    recorded = {"non_kwargs": {"n_latent": 7, "gene_likelihood": "zinb",
                               "empirical_protein_background_prior": None},
                "kwargs": {"model_kwargs": {"n_hidden": 32, "extra_payload_autotune": False}}}
    params = totalvi_init_params_from_scvi_tools(recorded)
    assert params["network_layout"] == "scvi-tools" and params["n_latent"] == 7
    assert params["dropout_rate_decoder"] == 0.2 and params["background_activation"] == "softplus"
    exported = totalvi_init_params_to_scvi_tools(params)
    assert exported["non_kwargs"]["gene_likelihood"] == "zinb"
    assert exported["kwargs"]["model_kwargs"]["n_hidden"] == 32
    assert totalvi_init_params_from_scvi_tools(exported) == params
    # scvi-tools loads models saved before 1.2 with the exponential background scale.
    assert totalvi_init_params_from_scvi_tools(
        recorded, scvi_version="1.1.6.post2")["background_activation"] == "exp"
    refused = {
        "gene_dispersion='gene-cell'": {"non_kwargs": {"gene_dispersion": "gene-cell"}},
        "log_variational=False": {"non_kwargs": {}, "kwargs": {"m": {"log_variational": False}}},
        "extra_encoder_kwargs": {"non_kwargs": {},
                                 "kwargs": {"m": {"extra_encoder_kwargs": {"n_layers": 3}}}},
        "n_panel=2": {"non_kwargs": {}, "kwargs": {"m": {"n_panel": 2}}},
    }
    for option, record in refused.items():
        with pytest.raises(ValueError, match=f"option {option}"):
            totalvi_init_params_from_scvi_tools(record)
    with pytest.raises(ValueError, match="network_layout='pyrovi'"):
        totalvi_init_params_to_scvi_tools({**params, "network_layout": "pyrovi"})
    with pytest.raises(ValueError, match="prior='mog'"):
        totalvi_init_params_to_scvi_tools({**params, "prior": "mog"})


def test_module_refuses_options_the_layout_cannot_express():
    with pytest.raises(ValueError, match="deeply_inject_covariates"):
        TOTALVIModule(10, 3, network_layout="scvi-tools", deeply_inject_covariates=False)
    with pytest.raises(ValueError, match="gene-cell"):
        TOTALVIModule(10, 3, network_layout="scvi-tools", gene_dispersion="gene-cell")
    with pytest.raises(ValueError, match="dropout_rate_decoder"):
        TOTALVIModule(10, 3, dropout_rate_decoder=0.2)
    with pytest.raises(ValueError, match="network_layout must be one of"):
        TOTALVIModule(10, 3, network_layout="scvi")


# -- against scvi-tools ----------------------------------------------------------------


def cite_seq_cells(seed: int = 0):
    """120 cells × 40 genes, 6 proteins, 2 batches, a categorical and a continuous covariate."""
    import anndata

    rng = np.random.default_rng(seed)
    adata = anndata.AnnData(rng.negative_binomial(2, 0.4, (N_CELLS, N_GENES)).astype(np.float32))
    adata.obs["batch"] = pd.Categorical(np.repeat(["a", "b"], N_CELLS // 2))
    adata.obs["kind"] = pd.Categorical(rng.choice(["u", "v", "w"], N_CELLS))
    adata.obs["score"] = rng.normal(size=N_CELLS)
    adata.obsm["proteins"] = rng.negative_binomial(3, 0.1, (N_CELLS, N_PROTEINS)).astype(
        np.float32)
    return adata


@pytest.fixture(scope="module", params=sorted(SETTINGS))
def scvi_tools_model(request):
    """A tiny scvi-tools TOTALVI trained for 2 epochs, its data and its setting's name."""
    scvi = pytest.importorskip("scvi")
    setting = request.param
    adata = cite_seq_cells()
    covariates = setting in WITH_COVARIATES
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scvi.settings.seed = 0
        scvi.model.TOTALVI.setup_anndata(
            adata, protein_expression_obsm_key="proteins", batch_key="batch",
            categorical_covariate_keys=["kind"] if covariates else None,
            continuous_covariate_keys=["score"] if covariates else None)
        model = scvi.model.TOTALVI(adata, **SETTINGS[setting])
        model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    model.module.eval()
    return setting, adata, model


def cell_tensors(adata, covariates: bool) -> dict:
    codes = torch.tensor(adata.obs["batch"].cat.codes.to_numpy(), dtype=torch.long)
    return {
        "x": torch.as_tensor(adata.X), "y": torch.as_tensor(adata.obsm["proteins"]),
        "batch": codes,
        "cat": (torch.tensor(adata.obs["kind"].cat.codes.to_numpy(), dtype=torch.long)[:, None]
                if covariates else None),
        "cont": (torch.as_tensor(adata.obs["score"].to_numpy(), dtype=torch.float32)[:, None]
                 if covariates else None),
    }


@torch.no_grad()
def scvi_tools_outputs(module, cells: dict) -> dict:
    """scvi-tools' encoder means and decoder outputs at them (background at its mean)."""
    batch = cells["batch"][:, None]
    inference = module.inference(cells["x"], cells["y"], batch, batch, None,
                                 cont_covs=cells["cont"], cat_covs=cells["cat"])
    qz, ql = inference["qz"], inference["ql"]
    z = module.encoder.z_transformation(qz.loc)
    if module.use_observed_lib_size:
        library = cells["x"].sum(1, keepdim=True)
    else:
        library = torch.exp(torch.clamp(ql.loc, max=15))
    out = module.generative(z, library, batch, torch.zeros_like(batch), cont_covs=cells["cont"],
                            cat_covs=cells["cat"])
    px, py = out["px_"], out["py_"]
    background = torch.exp(py["back_alpha"])
    result = {
        "z_loc": qz.loc, "z_scale": qz.scale, "rho": px["scale"], "mu": library * px["scale"],
        "theta": px["r"], "zi_logits": px["dropout"], "background": background,
        "foreground": background * py["fore_scale"], "mixing_logits": py["mixing"],
        "protein_theta": py["r"], "background_loc": py["back_alpha"],
        "background_scale": py["back_beta"], "protein_efficiency": out["per_batch_efficiency"],
    }
    if not module.use_observed_lib_size:
        result.update(library_loc=ql.loc, library_scale=ql.scale)
    return result


@torch.no_grad()
def pyrovi_outputs(module: TOTALVIModule, cells: dict, keys) -> dict:
    """The same quantities from the pyrovi module."""
    module.eval()
    q = module.encode(cells["x"], cells["batch"], cells["cat"], cells["cont"], y=cells["y"])
    loc, scale = module.background_posterior(q.z_loc, cells["batch"], cells["cat"], cells["cont"])
    log_library = (q.library_loc if q.library_loc is not None
                   else module.observed_log_library(cells["x"]))
    params = module.generative(q.z_loc, log_library, cells["batch"], None, cells["cat"],
                               cells["cont"], loc)
    params.update(z_loc=q.z_loc, z_scale=q.z_scale, library_loc=q.library_loc,
                  library_scale=q.library_scale, background_loc=loc, background_scale=scale)
    if params["zi_logits"] is None:  # scvi-tools computes the logits NB does not use
        module.decoder.zero_inflation = True
        expression, _ = module.decoder(module.z_transform(q.z_loc),
                                       module.covariates(cells["batch"], cells["cat"]),
                                       cells["cont"])
        module.decoder.zero_inflation = False
        params["zi_logits"] = expression.zi_logits
    return {key: params[key] for key in keys}


def assert_same_outputs(expected: dict, actual: dict) -> None:
    for key, value in expected.items():
        # 1e-5 relative to the tensor's magnitude (elements near 0 have no relative scale).
        scale = float(value.abs().max())
        torch.testing.assert_close(actual[key].expand_as(value), value, rtol=1e-5,
                                   atol=1e-5 * scale, msg=lambda m, key=key: f"{key}: {m}")


def test_scvi_tools_weights_give_scvi_tools_outputs(scvi_tools_model):
    setting, adata, model = scvi_tools_model
    module = pyrovi_module(setting, model.init_params_)
    module.load_state_dict(totalvi_state_from_scvi_tools(model.module.state_dict(), module))
    cells = cell_tensors(adata, setting in WITH_COVARIATES)
    expected = scvi_tools_outputs(model.module, cells)
    assert_same_outputs(expected, pyrovi_outputs(module, cells, expected))


def test_pyrovi_weights_give_the_same_outputs_in_scvi_tools(scvi_tools_model):
    setting, adata, model = scvi_tools_model
    module = pyrovi_module(setting, model.init_params_)
    randomise(module, seed=1)
    scvi_module = model.module
    original = {k: v.clone() for k, v in scvi_module.state_dict().items()}
    try:
        scvi_module.load_state_dict(totalvi_state_to_scvi_tools(module), strict=True)
        cells = cell_tensors(adata, setting in WITH_COVARIATES)
        expected = scvi_tools_outputs(scvi_module, cells)
        assert_same_outputs(expected, pyrovi_outputs(module, cells, expected))
    finally:  # the fixture's model is shared with the other test
        scvi_module.load_state_dict(original)
