"""scvi-tools model folders: read without running code, imported and exported exactly."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovi
from pyrovi.datasets import simulate_counts
from pyrovi.io import ModelFileError
from pyrovi.io.scvi_tools import NotRead, ScviToolsFolder, read_model_pt


def _close(actual, expected, rtol: float = 1e-5) -> None:
    """Equal to ``rtol`` relative to each value, with values near 0 judged at the array's
    scale (float32 sums in another order differ by ~1e-7 of the largest term)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.fixture(scope="module")
def covariate_data():
    adata = simulate_counts(n_cells=120, n_genes=30, n_clusters=3, n_batches=2, seed=3)
    adata.obs["site"] = np.array(["p", "q", "r"])[np.arange(adata.n_obs) % 3]
    adata.obs["dose"] = np.linspace(-1.0, 1.0, adata.n_obs)
    return adata


def _trained(cls, adata, setup: dict, **params):
    adata = adata.copy()
    cls.setup_anndata(adata, **setup)
    model = cls(adata, n_latent=3, n_hidden=16, **params)
    model.train(max_epochs=2, batch_size=64, progress_bar=False, seed=0)
    return model


EXPORTED = [
    (pyrovi.SCVI, dict(batch_key="batch", labels_key="cluster",
                       categorical_covariate_keys=["site"], continuous_covariate_keys=["dose"]),
     dict(use_observed_lib_size=False)),
    (pyrovi.SCVI, dict(batch_key="batch"),
     dict(gene_likelihood="nb", dispersion="gene-batch", encode_covariates=True, n_layers=2,
          use_layer_norm="both", use_batch_norm="none")),
    (pyrovi.SCVI, dict(batch_key="batch", labels_key="cluster"),
     dict(gene_likelihood="poisson", dispersion="gene-label")),
    (pyrovi.LDVAE, dict(batch_key="batch"), dict(gene_likelihood="zinb", bias=True)),
]


@pytest.mark.parametrize(("cls", "setup", "params"), EXPORTED,
                         ids=["scvi-covariates", "scvi-nb-encoded", "scvi-poisson", "ldvae"])
def test_export_then_import_gives_the_same_model(tmp_path, covariate_data, cls, setup, params):
    model = _trained(cls, covariate_data, setup, **params)
    model.to_scvi_tools(tmp_path / "out", save_anndata=True)
    imported = pyrovi.from_scvi_tools(tmp_path / "out")
    assert type(imported) is cls
    assert imported.init_params == {**model.init_params, "prior": "normal",
                                    "prior_kwargs": None} | {
        k: v for k, v in imported.init_params.items() if k in ("prior", "prior_kwargs")}
    own, theirs = model.module.state_dict(), imported.module.state_dict()
    assert own.keys() == theirs.keys()
    for name in own:
        torch.testing.assert_close(theirs[name], own[name], rtol=0, atol=0, msg=name)
    np.testing.assert_array_equal(imported.train_indices, model.train_indices)
    _close(imported.get_latent_representation(), model.get_latent_representation())


def test_exported_file_is_read_back_as_data_only(tmp_path, covariate_data):
    model = _trained(pyrovi.SCVI, covariate_data, dict(batch_key="batch"))
    model.to_scvi_tools(tmp_path)
    content = read_model_pt(tmp_path / "model.pt")
    registry = content["attr_dict"]["registry_"]
    assert registry["model_name"] == "SCVI"
    assert list(registry["field_registries"]["batch"]["state_registry"]["categorical_mapping"]) \
        == list(model.registry.batch_categories)
    # The history is written as scvi-tools keeps it (DataFrames) and read back inert.
    assert all(isinstance(v, NotRead) for v in content["attr_dict"]["history_"].values())
    assert set(content["attr_dict"]["history_"]) == set(model.history.columns)


def test_export_refuses_what_scvi_tools_lacks(tmp_path, covariate_data):
    mog = _trained(pyrovi.SCVI, covariate_data, dict(batch_key="batch"), prior="mog")
    with pytest.raises(ValueError, match="prior='mog'"):
        mog.to_scvi_tools(tmp_path / "mog")
    assert not (tmp_path / "mog").exists()
    deep = _trained(pyrovi.SCVI, covariate_data,
                    dict(batch_key="batch", continuous_covariate_keys=["dose"]), n_layers=2)
    with pytest.raises(ValueError, match="first layer only"):
        deep.to_scvi_tools(tmp_path / "deep")
    plain = _trained(pyrovi.SCVI, covariate_data, dict(batch_key="batch"))
    plain.to_scvi_tools(tmp_path / "plain")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        plain.to_scvi_tools(tmp_path / "plain")


# -- reading safely -------------------------------------------------------------------------


class _Payload:
    """An object whose unpickling would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _planted(source: Path, target: Path, marker: Path) -> Path:
    """A copy of the scvi-tools-style folder ``source`` whose model.pt carries a payload."""
    shutil.copytree(source, target)
    content = torch.load(target / "model.pt", weights_only=False)  # our own test file
    content["attr_dict"]["history_"] = {"train_loss": _Payload(marker)}
    torch.save(content, target / "model.pt")
    return target


def test_a_payload_in_model_pt_does_not_run(tmp_path, covariate_data):
    model = _trained(pyrovi.SCVI, covariate_data, dict(batch_key="batch"))
    model.to_scvi_tools(tmp_path / "clean", save_anndata=True)
    marker = tmp_path / "pwned"
    folder = _planted(tmp_path / "clean", tmp_path / "planted", marker)
    for read in (lambda: read_model_pt(folder / "model.pt"),
                 lambda: ScviToolsFolder(folder),
                 lambda: pyrovi.from_scvi_tools(folder),
                 lambda: pyrovi.from_scvi_tools(folder, adata=model.adata)):
        with pytest.raises(ModelFileError, match="system"):
            read()
        assert not marker.exists()


def test_bad_folders_get_clear_errors(tmp_path, covariate_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="no model.pt"):
        pyrovi.from_scvi_tools(empty)
    model = _trained(pyrovi.SCVI, covariate_data, dict(batch_key="batch"))
    model.save(tmp_path / "pyrovi_folder")
    with pytest.raises(ModelFileError, match="pyrovi model folder"):
        pyrovi.from_scvi_tools(tmp_path / "pyrovi_folder")
    model.to_scvi_tools(tmp_path / "good")
    # a damaged file
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "good", damaged)
    data = (damaged / "model.pt").read_bytes()
    (damaged / "model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or damaged"):
        pyrovi.from_scvi_tools(damaged, adata=model.adata)
    # an scvi-tools class pyrovi does not have
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "good", other)
    content = torch.load(other / "model.pt", weights_only=False)  # our own test file
    content["attr_dict"]["registry_"]["model_name"] = "PEAKVI"
    torch.save(content, other / "model.pt")
    with pytest.raises(ValueError, match="PEAKVI; pyrovi imports"):
        pyrovi.from_scvi_tools(other, adata=model.adata)
    # weights of a network the arguments do not describe
    content["attr_dict"]["registry_"]["model_name"] = "SCVI"
    content["model_state_dict"]["decoder.px_new_head.weight"] = torch.zeros(3, 3)
    torch.save(content, other / "model.pt")
    with pytest.raises(ValueError, match="no place for: \\['decoder.px_new_head.weight'\\]"):
        pyrovi.from_scvi_tools(other, adata=model.adata)
    del content["model_state_dict"]["decoder.px_new_head.weight"]
    # an option of scvi-tools that pyrovi does not have
    content["attr_dict"]["init_params_"]["kwargs"]["kwargs"]["batch_representation"] = "embedding"
    torch.save(content, other / "model.pt")
    with pytest.raises(ValueError, match="batch_representation='embedding'"):
        pyrovi.from_scvi_tools(other, adata=model.adata)


def test_genes_that_do_not_match_are_refused_and_data_left_alone(tmp_path, covariate_data):
    model = _trained(pyrovi.SCVI, covariate_data, dict(batch_key="batch"))
    model.to_scvi_tools(tmp_path)
    adata = covariate_data[:, 2:].copy()
    uns, obs = dict(adata.uns), adata.obs.copy()
    with pytest.raises(ValueError, match="genes of adata do not match"):
        pyrovi.from_scvi_tools(tmp_path, adata=adata)
    no_data = tmp_path / "no_data"
    with pytest.raises(ModelFileError):
        pyrovi.from_scvi_tools(no_data)
    with pytest.raises(ModelFileError, match="adata="):
        pyrovi.from_scvi_tools(tmp_path)
    assert dict(adata.uns) == uns
    assert adata.obs.equals(obs)
    # the user's AnnData is not set up by importing
    imported = pyrovi.from_scvi_tools(tmp_path, adata=covariate_data)
    assert "_pyrovi" not in covariate_data.uns
    assert imported.adata is covariate_data


# -- against live scvi-tools ----------------------------------------------------------------


def _scvi_tools_outputs(model, adata):
    """scvi-tools' latent means and decoder outputs at the posterior mean, on all cells."""
    loader = model._make_data_loader(adata, batch_size=adata.n_obs)
    tensors = next(iter(loader))
    module = model.module.eval()
    with torch.no_grad():
        inference = module.inference(**module._get_inference_input(tensors))
        inputs = module._get_generative_input(tensors, inference)
        inputs["z"] = inference["qz"].loc
        if inference.get("ql") is not None:
            inputs["library"] = inference["ql"].loc
        px = module.generative(**inputs)["px"]
    return inference["qz"].loc.numpy(), px


def _pyrovi_outputs(model):
    data, _, _ = model.cell_data()
    batch = data.minibatch(torch.arange(model.adata.n_obs))
    module = model.module.eval()
    with torch.no_grad():
        q = module.encode(batch["x"], batch["batch_index"], batch.get("cat_covs"),
                          batch.get("cont_covs"))
        library = (q.library_loc if q.library_loc is not None
                   else module.observed_log_library(batch["x"]))
        return q.z_loc.numpy(), module.generative(q.z_loc, library, batch["batch_index"],
                                                  batch.get("labels"), batch.get("cat_covs"),
                                                  batch.get("cont_covs"))


LIVE = [
    ("SCVI", dict(batch_key="batch", labels_key="cluster", categorical_covariate_keys=["site"],
                  continuous_covariate_keys=["dose"]),
     dict(use_observed_lib_size=False)),
    ("SCVI", dict(batch_key="batch", continuous_covariate_keys=["dose"]),
     dict(gene_likelihood="nb", dispersion="gene-batch", encode_covariates=True, n_layers=2,
          use_layer_norm="both", use_batch_norm="none")),
    ("SCVI", dict(batch_key="batch"), dict(dispersion="gene-cell", n_layers=2,
                                           deeply_inject_covariates=False)),
    ("LinearSCVI", dict(batch_key="batch"), dict(gene_likelihood="zinb", bias=True,
                                                 use_observed_lib_size=True)),
]


@pytest.mark.parametrize(("name", "setup", "params"), LIVE,
                         ids=["scvi-covariates", "scvi-nb-encoded", "scvi-gene-cell", "linear"])
def test_live_scvi_tools_models_import_and_export_exactly(tmp_path, covariate_data, name,
                                                          setup, params):
    scvi = pytest.importorskip("scvi")
    adata = covariate_data.copy()
    cls = getattr(scvi.model, name)
    cls.setup_anndata(adata, **setup)
    reference = cls(adata, n_latent=3, n_hidden=16, **params)
    reference.train(max_epochs=3, enable_progress_bar=False)
    reference.save(tmp_path / "ref", save_anndata=True)
    latent, px = _scvi_tools_outputs(reference, adata)

    model = pyrovi.from_scvi_tools(tmp_path / "ref")
    z, out = _pyrovi_outputs(model)
    _close(z, latent)
    _close(model.get_latent_representation(), latent)
    _close(out["rho"], px.scale)
    _close(out["mu"], px.mu)
    if out["theta"] is not None:
        _close(torch.broadcast_to(out["theta"], out["mu"].shape),
               torch.broadcast_to(px.theta, out["mu"].shape))
    if out["zi_logits"] is not None:
        _close(out["zi_logits"], px.zi_logits)
    if name == "LinearSCVI":
        _close(model.get_loadings().to_numpy(), reference.get_loadings().to_numpy())

    model.to_scvi_tools(tmp_path / "back")
    reloaded = cls.load(tmp_path / "back", adata=adata)
    _close(reloaded.get_latent_representation(), latent)


# -- folders saved by scvi-tools 1.4.2 and 1.5.1 (committed, no scvi-tools needed) -----------

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "scvi_tools"
VERSIONS = ["1.4.2", "1.5.1"]


def _reference(folder: Path) -> dict:
    with np.load(folder / "reference.npz", allow_pickle=False) as arrays:
        return dict(arrays)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", ["scvi_batch_latent_library", "scvi_nb_encode_covariates",
                                  "linear_scvi"])
def test_scvi_tools_folders_give_scvi_tools_outputs(version, name):
    folder = FIXTURES / version / name
    expected = _reference(folder)
    model = pyrovi.from_scvi_tools(folder)
    assert type(model) is (pyrovi.LDVAE if name == "linear_scvi" else pyrovi.SCVI)
    _close(model.get_latent_representation(), expected["latent_mean"])
    z, out = _pyrovi_outputs(model)
    _close(z, expected["latent_mean"])
    _close(out["rho"], expected["px_scale"])
    _close(out["mu"], expected["px_rate"])
    _close(torch.broadcast_to(out["theta"], out["mu"].shape), expected["px_r"])
    if "px_dropout" in expected and out["zi_logits"] is not None:
        _close(out["zi_logits"], expected["px_dropout"])
    if name == "linear_scvi":
        _close(model.get_loadings().to_numpy(), expected["loadings"])
    data, _, _ = model.cell_data()
    batch = data.minibatch(torch.arange(model.adata.n_obs))
    np.testing.assert_array_equal(batch["batch_index"].numpy().ravel(), expected["batch_index"])


@pytest.mark.parametrize("version", VERSIONS)
def test_a_scvi_tools_folder_maps_a_query_and_is_criticised(version, tmp_path):
    reference = pyrovi.from_scvi_tools(FIXTURES / version / "scvi_nb_encode_covariates")
    query = reference.adata[:30].copy()
    query.obs["batch"] = "new_batch"
    query.obs_names = [f"query_{i}" for i in range(query.n_obs)]
    mapped = pyrovi.SCVI.load_query_data(query, reference)
    before = {k: v.clone() for k, v in mapped.module.state_dict().items()}
    mapped.train(max_epochs=3, progress_bar=False, seed=0)
    after = mapped.module.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("cat_weights.0" in k or "log_theta" in k or "running" in k
                           or "num_batches" in k for k in changed), changed
    assert mapped.get_latent_representation().shape == (30, 5)
    check = pyrovi.criticism.PosteriorPredictiveCheck(reference.adata, {"import": reference},
                                                      n_samples=2, progress_bar=False, seed=0)
    assert np.isfinite(check.calibration_error().to_numpy(dtype=float)).all()
    idata = pyrovi.criticism.to_arviz(reference, n_samples=2)
    assert idata["posterior_predictive"]["x"].shape[-2:] == (reference.adata.n_obs, 150)


#: reference.npz array → pyrovi TotalVI output (see tests/io/test_scvi_tools_totalvi.py).
TOTALVI_OUTPUTS = {"latent_mean": "z_loc", "px_scale": "rho", "px_rate": "mu", "px_r": "theta",
                   "py_back_alpha": "background_loc", "py_back_beta": "background_scale",
                   "py_rate_back": "background", "py_rate_fore": "foreground",
                   "py_mixing": "mixing_logits", "py_r": "protein_theta",
                   "per_batch_efficiency": "protein_efficiency"}


@pytest.mark.parametrize("version", VERSIONS)
def test_scvi_tools_totalvi_folders_give_scvi_tools_outputs(version, tmp_path):
    from tests.io.test_scvi_tools_totalvi import pyrovi_outputs

    folder = FIXTURES / version / "totalvi"
    expected = _reference(folder)
    model = pyrovi.from_scvi_tools(folder)
    assert type(model) is pyrovi.TOTALVI
    assert model.init_params["network_layout"] == "scvi-tools"
    _close(model.get_latent_representation(), expected["latent_mean"])
    data, _, _ = model.cell_data()
    batch = data.minibatch(torch.arange(model.adata.n_obs))
    cells = {"x": batch["x"], "y": batch["y"], "batch": batch["batch_index"],
             "cat": batch.get("cat_covs"), "cont": batch.get("cont_covs")}
    with torch.no_grad():
        out = pyrovi_outputs(model.module, cells, set(TOTALVI_OUTPUTS.values()))
    for theirs, ours in TOTALVI_OUTPUTS.items():
        value = out[ours].expand(expected[theirs].shape) if out[ours].dim() else out[ours]
        _close(value, expected[theirs])
    model.to_scvi_tools(tmp_path, save_anndata=True)
    again = pyrovi.from_scvi_tools(tmp_path)
    _close(again.get_latent_representation(), expected["latent_mean"])


@pytest.mark.parametrize("version", VERSIONS)
def test_minified_scvi_tools_folders_give_outputs_from_the_stored_posterior(version):
    folder = FIXTURES / version / "scvi_minified"
    expected = _reference(folder)
    model = pyrovi.from_scvi_tools(folder)
    assert model.minified_data_type == "latent_posterior_parameters"
    _close(model.get_latent_representation(), expected["latent_mean"])
    assert model.get_normalized_expression(n_samples=2).shape == (100, 150)
    de = model.differential_expression(groupby="bulk_labels", group1="CD14+ Monocyte")
    assert len(de) == 150
    assert model.posterior_predictive_sample(n_samples=2).shape == (100, 150, 2)
    with pytest.raises(pyrovi.data.MinifiedDataError, match="counts"):
        model.get_elbo()


def test_a_scvi_hub_download_loads(tmp_path):
    """A folder as scvi-hub downloads it: model.pt, adata.h5ad, metadata and card."""
    import json

    folder = tmp_path / "hub_model"
    shutil.copytree(FIXTURES / "1.5.1" / "scvi_batch_latent_library", folder)
    metadata = {"scvi_version": "1.5.1", "anndata_version": "0.12.0",
                "model_cls_name": "SCVI", "training_data_url": None,
                "model_parent_module": "scvi.model"}
    (folder / "_scvi_required_metadata.json").write_text(json.dumps(metadata))
    (folder / "README.md").write_text("---\nlibrary_name: scvi-tools\n---\n# A hub card\n")
    assert ScviToolsFolder(folder).hub_metadata["model_cls_name"] == "SCVI"
    model = pyrovi.from_scvi_tools(folder)
    _close(model.get_latent_representation(), _reference(folder)["latent_mean"])
    (folder / "_scvi_required_metadata.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        pyrovi.from_scvi_tools(folder)


def test_live_scvi_tools_totalvi_from_mudata_and_back(tmp_path):
    scvi = pytest.importorskip("scvi")
    import anndata
    import mudata
    import pandas as pd

    rng = np.random.default_rng(0)
    rna = anndata.AnnData(rng.poisson(2, (120, 40)).astype(np.float32))
    rna.var_names = [f"g{i}" for i in range(40)]
    rna.obs_names = [f"c{i}" for i in range(120)]
    rna.obs["batch"] = np.array(["x", "y"])[np.arange(120) % 2]
    protein = anndata.AnnData(rng.poisson(20, (120, 6)).astype(np.float32))
    protein.var_names = [f"p{i}" for i in range(6)]
    protein.obs_names = rna.obs_names
    mdata = mudata.MuData({"rna": rna, "protein": protein})
    scvi.model.TOTALVI.setup_mudata(mdata, batch_key="batch", modalities={
        "rna_layer": "rna", "protein_layer": "protein", "batch_key": "rna"})
    reference = scvi.model.TOTALVI(mdata, n_latent=4, n_hidden=16)
    reference.train(max_epochs=2, enable_progress_bar=False)
    reference.save(tmp_path / "mudata_model")
    own = mudata.MuData({"rna": rna.copy(), "protein": protein.copy()})
    model = pyrovi.from_scvi_tools(tmp_path / "mudata_model", adata=own)
    _close(model.get_latent_representation(), reference.get_latent_representation())
    assert dict(own.uns) == {}  # the user's MuData is not set up by importing

    adata = rna.copy()
    adata.obsm["proteins"] = pd.DataFrame(protein.X, index=adata.obs_names,
                                          columns=protein.var_names)
    pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="proteins",
                                 batch_key="batch")
    ours = pyrovi.TOTALVI(adata, n_latent=4, n_hidden=16, network_layout="scvi-tools")
    ours.train(max_epochs=2, progress_bar=False, seed=0)
    ours.to_scvi_tools(tmp_path / "for_scvi_tools")
    theirs = scvi.model.TOTALVI.load(tmp_path / "for_scvi_tools", adata=adata.copy())
    _close(theirs.get_latent_representation(), ours.get_latent_representation())
    with pytest.raises(ValueError, match="network_layout='scvi-tools'"):
        pyrovi.TOTALVI(adata, n_latent=4, n_hidden=16).to_scvi_tools(tmp_path / "pyrovi_layout")


@pytest.mark.parametrize("version", VERSIONS)
def test_scvi_tools_scanvi_folders_give_scvi_tools_predictions(version, tmp_path):
    import json

    folder = FIXTURES / version / "scanvi"
    expected = _reference(folder)
    labels = json.loads((folder / "reference.json").read_text())["labels"]
    model = pyrovi.from_scvi_tools(folder)
    assert type(model) is pyrovi.SCANVI
    assert model.labels == labels
    _close(model.get_latent_representation(), expected["latent_mean"])
    _close(model.predict(soft=True)[labels].to_numpy(), expected["predict_soft"])
    model.to_scvi_tools(tmp_path)
    again = pyrovi.from_scvi_tools(tmp_path, adata=model.adata)
    _close(again.predict(soft=True)[labels].to_numpy(), expected["predict_soft"])


def test_live_scvi_tools_scanvi_both_ways(tmp_path, covariate_data):
    scvi = pytest.importorskip("scvi")
    adata = covariate_data.copy()
    labels = adata.obs["cluster"].astype(str).to_numpy().copy()
    labels[::3] = "Unknown"
    adata.obs["partial"] = labels
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="partial")
    pretrained = scvi.model.SCVI(adata, n_latent=3, n_hidden=16)
    pretrained.train(max_epochs=2, enable_progress_bar=False)
    reference = scvi.model.SCANVI.from_scvi_model(pretrained, unlabeled_category="Unknown",
                                                  linear_classifier=True)
    reference.train(max_epochs=2, enable_progress_bar=False)
    reference.save(tmp_path / "ref", save_anndata=True)
    model = pyrovi.from_scvi_tools(tmp_path / "ref")
    soft = reference.predict(soft=True)
    _close(model.predict(soft=True)[list(soft.columns)].to_numpy(), soft.to_numpy())
    model.to_scvi_tools(tmp_path / "back")
    reloaded = scvi.model.SCANVI.load(tmp_path / "back", adata=adata)
    _close(reloaded.predict(soft=True).to_numpy(), soft.to_numpy())
