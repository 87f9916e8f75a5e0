"""Model files never run code, and damaged files are refused, through every way of loading.

The attack: a pickle whose unpickling calls ``os.mkdir`` (a stand-in for any code). It is
planted in each file of a saved model folder and of a checkpoint folder (as the file's
content, with the manifest left as it was or updated to match), and as a bare pyrovi 0.1.0
``model.pt``; then every load path of the library and the command line is tried. Nothing
may create the marker folder, and each refusal must say what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import pyrovi
from pyrovi.cli import main
from pyrovi.datasets import simulate_counts
from pyrovi.io import ModelFileError
from pyrovi.io.checkpoint_files import read_checkpoint
from pyrovi.io.model_files import SAVED_ADATA

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy_0_1_0"


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (os.fspath(self.marker),)


def payload_bytes(marker: Path, tmp_path: Path) -> bytes:
    """A torch.save file (the 0.1.0 model format) whose loading with pickle runs the payload."""
    path = tmp_path / "payload.pt"
    torch.save({"model_class": "SCVI", "state_dict": {}, "hook": Payload(marker)}, path)
    return path.read_bytes()


def plant(folder: Path, name: str, data: bytes, update_manifest: bool) -> None:
    (folder / name).write_bytes(data)
    if update_manifest and name != "manifest.json":
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A saved SCVI (with its AnnData), its checkpoints, the data file and a zoo-style folder."""
    root = tmp_path_factory.mktemp("trained")
    adata = simulate_counts(n_cells=120, n_genes=30, n_clusters=2, n_batches=2, seed=4)
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    data = root / "data.h5ad"
    adata.write_h5ad(data)
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    model = pyrovi.SCVI(adata, n_hidden=8, n_latent=2)
    model.train(max_epochs=2, progress_bar=False, seed=0, checkpoint_dir=root / "run" /
                "checkpoints")
    model.save(root / "run" / "model", save_anndata=True)
    zoo = root / "zoo" / "tiny"
    zoo.mkdir(parents=True)
    (zoo / "config.json").write_text(json.dumps({"model_class": "SCVI"}))
    model.save(zoo / "model")
    return {"root": root, "data": data, "model": root / "run" / "model",
            "checkpoints": root / "run" / "checkpoints", "zoo": zoo,
            "latent": model.get_latent_representation()}


def query(trained):
    import anndata

    return anndata.read_h5ad(trained["data"])


def load_paths(trained, folder: Path):
    """Every way a saved model folder is read: ``{name: call}``."""
    paths = {
        "SCVI.load": lambda: pyrovi.SCVI.load(folder),
        "SCVI.load(adata)": lambda: pyrovi.SCVI.load(folder, query(trained)),
        "load_query_data": lambda: pyrovi.SCVI.load_query_data(query(trained), folder),
        "prepare_query_anndata": lambda: pyrovi.SCVI.prepare_query_anndata(query(trained),
                                                                          folder),
        "pyrovi embed": lambda: main(["embed", str(folder), str(trained["data"]), "--out",
                                      str(folder.parent / "embedded.h5ad"), "-q"]),
        "pyrovi card": lambda: main(["card", str(folder), str(trained["data"]), "--out",
                                     str(folder.parent / "card"), "-q", "--no-embedding"]),
    }
    if (folder.parent / "config.json").exists():  # a zoo-style folder
        paths["load_pretrained"] = lambda: pyrovi.load_pretrained(folder.parent, query(trained))
    return paths


def assert_refused(call, marker: Path, capsys, match: str) -> None:
    try:
        result = call()
    except (ModelFileError, FileNotFoundError, ValueError, TypeError) as error:
        message = str(error)
    else:
        # The command line reports errors in one line, with exit status 1.
        assert result == 1, f"loaded without complaint: {result!r}"
        message = capsys.readouterr().err
    assert not marker.exists(), "the planted payload ran"
    assert match in message, message


MODEL_FILES = ["manifest.json", "model.json", "weights.safetensors", "cells.safetensors",
               SAVED_ADATA]
MODEL_LOAD_PATHS = ["SCVI.load", "SCVI.load(adata)", "load_query_data",
                    "prepare_query_anndata", "pyrovi embed", "pyrovi card", "load_pretrained"]
#: What the refusal says when the manifest was updated to match the planted file, so that
#: its digest passes and the file's format is what refuses it.
UNREADABLE = {"model.json": "not valid JSON", "checkpoint.json": "not valid JSON",
              SAVED_ADATA: "not a readable h5ad"}


def expected_refusal(name: str, update_manifest: bool) -> str:
    if name == "manifest.json":
        return "manifest"
    if not update_manifest:
        return "corrupted or altered"
    return UNREADABLE.get(name, "not a valid safetensors")


@pytest.mark.parametrize("update_manifest", [False, True],
                         ids=["manifest-as-was", "manifest-updated"])
@pytest.mark.parametrize("name", MODEL_FILES)
def test_a_payload_in_any_model_file_never_runs(trained, tmp_path, capsys, name, update_manifest):
    marker = tmp_path / "payload-ran"
    data = payload_bytes(marker, tmp_path)
    # Only loading without an AnnData reads the saved one.
    paths = ["SCVI.load"] if name == SAVED_ADATA else MODEL_LOAD_PATHS
    for path_name in paths:
        zoo = tmp_path / path_name.replace(" ", "_") / "zoo"
        shutil.copytree(trained["zoo"], zoo)
        shutil.copytree(trained["model"], zoo / "model", dirs_exist_ok=True)
        plant(zoo / "model", name, data, update_manifest)
        assert_refused(load_paths(trained, zoo / "model")[path_name], marker, capsys,
                       expected_refusal(name, update_manifest))


def test_a_bare_legacy_model_pt_payload_never_runs(trained, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "zoo" / "model"
    folder.mkdir(parents=True)
    (tmp_path / "zoo" / "config.json").write_text(json.dumps({"model_class": "SCVI"}))
    (folder / "model.pt").write_bytes(payload_bytes(marker, tmp_path))
    for call in load_paths(trained, folder).values():
        assert_refused(call, marker, capsys, "may be unsafe")


CHECKPOINT_FILES = ["manifest.json", "model.json", "weights.safetensors", "cells.safetensors",
                    "checkpoint.json", "optimizer.safetensors", "rng.safetensors"]


def resume_paths(trained, checkpoints: Path):
    adata = query(trained)
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    run = checkpoints.parent
    return {
        "load_checkpoint": lambda: pyrovi.SCVI.load_checkpoint(checkpoints, query(trained)),
        "train(resume_from)": lambda: pyrovi.SCVI(adata, n_hidden=8, n_latent=2).train(
            resume_from=checkpoints, progress_bar=False),
        "read_checkpoint": lambda: read_checkpoint(checkpoints),
        "pyrovi train --resume": lambda: main(["train", str(trained["data"]), "--out",
                                               str(run), "--resume", "-q", "--no-progress"]),
    }


@pytest.mark.parametrize("update_manifest", [False, True],
                         ids=["manifest-as-was", "manifest-updated"])
@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_a_payload_in_any_checkpoint_file_never_runs(trained, tmp_path, capsys, name,
                                                     update_manifest):
    marker = tmp_path / "payload-ran"
    data = payload_bytes(marker, tmp_path)
    for path_name in resume_paths(trained, trained["checkpoints"]):
        run = tmp_path / path_name.replace(" ", "_")
        shutil.copytree(trained["checkpoints"], run / "checkpoints")
        newest = sorted((run / "checkpoints").iterdir())[-1]
        plant(newest, name, data, update_manifest)
        assert_refused(resume_paths(trained, run / "checkpoints")[path_name], marker, capsys,
                       expected_refusal(name, update_manifest))


def test_a_legacy_pickled_checkpoint_is_never_read(trained, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "checkpoint-000002.pt").write_bytes(payload_bytes(marker, tmp_path))
    for call in resume_paths(trained, checkpoints).values():
        assert_refused(call, marker, capsys, "pyrovi 0.1.0")


def test_a_few_overwritten_bytes_in_the_weights_are_refused(trained, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained["model"], folder)
    weights = bytearray((folder / "weights.safetensors").read_bytes())
    weights[-200:-160] = bytes(40)  # 40 bytes inside the last tensor's values
    (folder / "weights.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ModelFileError, match="weights.safetensors.*corrupted or altered"):
        pyrovi.SCVI.load(folder)


def test_the_saved_model_loads_back_exactly(trained):
    model = pyrovi.SCVI.load(trained["model"])
    np.testing.assert_array_equal(model.get_latent_representation(), trained["latent"])


def test_a_pyrovi_0_1_0_model_loads_through_the_restricted_reader():
    # tests/data/legacy_0_1_0 was written by pyrovi 0.1.0 (torch.save pickle): an SCVI on
    # the first 200 genes of pbmc68k_reduced, with the latent space it gave then.
    adata = pyrovi.datasets.pbmc68k_reduced()[:, :200].copy()
    model = pyrovi.SCVI.load(LEGACY / "scvi_0.1.0", adata)
    np.testing.assert_allclose(model.get_latent_representation(),
                               np.load(LEGACY / "latent.npy", allow_pickle=False),
                               rtol=1e-5, atol=1e-6)
    assert model.is_trained and len(model.history) == 5


# -- saving replaces atomically ----------------------------------------------------------------


def small_model(seed: int):
    adata = simulate_counts(n_cells=100, n_genes=20, n_clusters=2, seed=seed)
    pyrovi.SCVI.setup_anndata(adata)
    return pyrovi.SCVI(adata, n_hidden=8, n_latent=2).train(max_epochs=1, progress_bar=False,
                                                             seed=seed)


def test_overwriting_a_saved_model_leaves_no_file_of_the_first(tmp_path):
    first, second = small_model(0), small_model(1)
    first.save(tmp_path / "model", save_anndata=True)
    second.save(tmp_path / "model", overwrite=True)
    assert not (tmp_path / "model" / SAVED_ADATA).exists()
    with pytest.raises(ValueError, match="No AnnData was saved"):
        pyrovi.SCVI.load(tmp_path / "model")
    loaded = pyrovi.SCVI.load(tmp_path / "model", second.adata.copy())
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  second.get_latent_representation())
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left


def test_an_interrupted_save_leaves_the_previous_model_intact(tmp_path, monkeypatch):
    from pyrovi.io import bundle

    first, second = small_model(0), small_model(1)
    first.save(tmp_path / "model")
    write_bytes = bundle._write_bytes

    def dies_at_the_weights(path, data):
        if path.name == "weights.safetensors":
            raise KeyboardInterrupt
        write_bytes(path, data)

    monkeypatch.setattr(bundle, "_write_bytes", dies_at_the_weights)
    with pytest.raises(KeyboardInterrupt):
        second.save(tmp_path / "model", overwrite=True)
    monkeypatch.undo()
    loaded = pyrovi.SCVI.load(tmp_path / "model", first.adata.copy())
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  first.get_latent_representation())
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_overwrite_never_replaces_a_folder_holding_other_files(tmp_path):
    model = small_model(0)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        model.save(tmp_path / "results", overwrite=True)
    assert (tmp_path / "results" / "notes.txt").read_text() == "mine"
    model.save(tmp_path / "model")
    (tmp_path / "model" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        model.save(tmp_path / "model", overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save(tmp_path / "model")
