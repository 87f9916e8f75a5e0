"""The ``pyrovi`` command line: train (killed and resumed) and its outputs, embed, card,
packaged datasets, errors, help."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import anndata
import numpy as np
import pandas as pd
import pytest
import torch

import pyrovi
from pyrovi import plotting
from pyrovi.cli import main
from pyrovi.datasets import PACKAGED_DATASETS, simulate_counts
from pyrovi.infer import checkpoint

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models train much faster on one thread when the cores are shared."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def h5ad(tmp_path):
    """A small simulated data set with batches and cell types, written to an h5ad file."""
    path = tmp_path / "data.h5ad"
    simulate_counts(n_cells=300, n_genes=40, n_clusters=3, n_batches=2, seed=4).write_h5ad(path)
    return path


def train_args(data, out, *extra):
    return ["train", str(data), "--model", "scvi", "--batch-key", "batch", "--labels-key",
            "cluster", "--n-latent", "4", "--n-hidden", "32", "--max-epochs", "3",
            "--device", "cpu", "--out", str(out), "--no-progress", "-q", *extra]


@pytest.fixture
def trained(h5ad, tmp_path):
    """``pyrovi train`` run in this process: its output folder."""
    assert main(train_args(h5ad, tmp_path / "run")) == 0
    return tmp_path / "run"


def assert_png(path, min_side=200):
    """``path`` is a real PNG picture: its signature, and pixels that are not all alike."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 10_000
    image = imread(path)
    assert image.ndim == 3 and min(image.shape[:2]) >= min_side
    assert image[..., :3].std() > 0.01


def test_help_of_the_command_and_each_subcommand(capsys):
    for argv in (["--help"], ["train", "--help"], ["embed", "--help"], ["card", "--help"],
                 ["datasets", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert "usage: pyrovi" in out
        if argv[0] == "train":
            for output in ("model/", "history.csv", "checkpoints/", "adata.h5ad", "X_pyrovi",
                           "X_umap", "umap.png", "history.png", "card/README.md",
                           'pip install "pyrovi[plot]"', "packaged dataset"):
                assert output in out, output
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_train_writes_model_history_and_checkpoint(trained, h5ad):
    history = pd.read_csv(trained / "history.csv", index_col="epoch")
    assert list(history.index) == [0, 1, 2]
    assert {"elbo_train", "elbo_validation", "kl_weight"} <= set(history.columns)
    assert [p.name for p in checkpoint.list_checkpoints(trained / "checkpoints")] == [
        "checkpoint-000003"]
    model = pyrovi.SCVI.load(trained / "model", anndata.read_h5ad(h5ad))
    assert model.init_params["n_latent"] == 4 and model.registry.batch_key == "batch"
    np.testing.assert_allclose(model.history.to_numpy(), history.to_numpy(), rtol=1e-12)


def test_train_writes_the_latent_space_its_umap_pictures_and_card(trained, h5ad):
    written = anndata.read_h5ad(trained / "adata.h5ad")
    source = anndata.read_h5ad(h5ad)
    assert written.obs_names.equals(source.obs_names)
    assert written.var_names.equals(source.var_names)
    model = pyrovi.SCVI.load(trained / "model", source)
    np.testing.assert_allclose(written.obsm["X_pyrovi"], model.get_latent_representation(),
                               rtol=1e-5, atol=1e-5)
    assert written.obsm["X_umap"].shape == (300, 2)
    assert np.isfinite(written.obsm["X_umap"]).all()
    assert "_pyrovi" not in written.uns  # the set-up's registration is not written out
    # The UMAP is the latent space's, and the same for the same seed.
    np.testing.assert_array_equal(
        written.obsm["X_umap"], plotting.umap_coordinates(written.obsm["X_pyrovi"], seed=0))
    # ... and leaves torch on the threads it had (numba's OpenMP layer shares the setting).
    assert torch.get_num_threads() == 1
    assert_png(trained / "umap.png")
    assert_png(trained / "history.png")
    card = json.loads((trained / "card" / "card.json").read_text())
    assert card["setup_arguments"]["labels_key"] == "cluster"
    assert card["training"]["history"]["epochs_trained"] == 3
    assert card["reproduce"].startswith(f"pyrovi train {h5ad} --model scvi")
    assert "--no-progress" not in card["reproduce"] and "-q" not in card["reproduce"].split()
    assert (trained / "card" / "README.md").read_text().startswith("# SCVI on data.h5ad")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.slow
def test_train_killed_midway_resumes_to_the_same_run(tmp_path):
    """SIGKILL a real run after its first checkpoint; --resume finishes it."""
    data = tmp_path / "slow.h5ad"
    # Enough minibatches per epoch (~85 of 32 cells) that the run is still going when the
    # first checkpoint (after 2 of 12 epochs) appears.
    simulate_counts(n_cells=3000, n_genes=100, n_batches=2, seed=1).write_h5ad(data)
    # Without the UMAP and the card, which other tests check, to keep this one short.
    args = ["train", str(data), "--batch-key", "batch", "--n-latent", "4", "--n-hidden", "32",
            "--batch-size", "32", "--max-epochs", "12", "--checkpoint-every", "2",
            "--device", "cpu", "--seed", "7", "--no-progress", "-q", "--no-umap", "--no-card"]
    out = tmp_path / "run"
    # The subprocess uses the threads this process uses, for the comparison with the
    # uninterrupted run below.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "pyrovi", *args, "--out", str(out)]
    log = tmp_path / "killed.log"
    # Output to a file, not a pipe nobody reads while polling (a full pipe would block it).
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while not checkpoint.list_checkpoints(out / "checkpoints"):
                assert process.poll() is None, f"training ended early: {log.read_text()}"
                assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
                time.sleep(0.01)
            process.send_signal(signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "model").exists() and not (out / "history.csv").exists()
    interrupted_at = checkpoint.epochs_done(checkpoint.latest_checkpoint(out / "checkpoints"))
    assert interrupted_at < 12

    finished = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr
    history = pd.read_csv(out / "history.csv", index_col="epoch")
    assert list(history.index) == list(range(12))  # none lost, none twice
    assert "X_umap" not in anndata.read_h5ad(out / "adata.h5ad").obsm
    assert (out / "history.png").is_file() and not (out / "umap.png").exists()
    assert not (out / "card").exists()

    # The same command uninterrupted (in this process) gives the same run.
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    straight = pd.read_csv(tmp_path / "straight" / "history.csv", index_col="epoch")
    pd.testing.assert_index_equal(history.columns, straight.columns)
    np.testing.assert_allclose(history.to_numpy(), straight.to_numpy(), rtol=1e-5)

    # The saved model loads and embeds.
    assert main(["embed", str(out / "model"), str(data), "--out",
                 str(tmp_path / "embedded.h5ad"), "-q"]) == 0
    assert anndata.read_h5ad(tmp_path / "embedded.h5ad").obsm["X_pyrovi"].shape == (3000, 4)


def test_embed_writes_obsm_and_leaves_the_input(trained, h5ad, tmp_path):
    before = h5ad.read_bytes()
    out = tmp_path / "embedded.h5ad"
    assert main(["embed", str(trained / "model"), str(h5ad), "--out", str(out), "--key",
                 "X_test", "-q"]) == 0
    assert h5ad.read_bytes() == before
    embedded = anndata.read_h5ad(out)
    model = pyrovi.SCVI.load(trained / "model", anndata.read_h5ad(h5ad))
    np.testing.assert_allclose(embedded.obsm["X_test"], model.get_latent_representation(),
                               rtol=1e-6, atol=1e-6)
    assert "_pyrovi" not in embedded.uns  # loading's registration is not written out

    # Query cells with the genes in another order: the model's gene check refuses them,
    # unless asked to use the model's genes.
    query = anndata.read_h5ad(h5ad)[:50]
    query = query[:, query.var_names[::-1]].copy()
    query.write_h5ad(tmp_path / "query.h5ad")
    assert main(["embed", str(trained / "model"), str(tmp_path / "query.h5ad"), "--out",
                 str(tmp_path / "q.h5ad"), "-q"]) == 1
    assert main(["embed", str(trained / "model"), str(tmp_path / "query.h5ad"), "--out",
                 str(tmp_path / "q.h5ad"), "--subset-genes", "-q"]) == 0
    assert anndata.read_h5ad(tmp_path / "q.h5ad").obsm["X_pyrovi"].shape == (50, 4)

    # Writing over the input needs --overwrite.
    assert main(["embed", str(trained / "model"), str(h5ad), "--out", str(h5ad), "-q"]) == 1
    assert h5ad.read_bytes() == before
    assert main(["embed", str(trained / "model"), str(h5ad), "--out", str(h5ad),
                 "--overwrite", "-q"]) == 0
    assert "X_pyrovi" in anndata.read_h5ad(h5ad).obsm


def test_card_writes_markdown_and_json(trained, h5ad, tmp_path):
    out = tmp_path / "card" / "README.md"
    assert main(["card", str(trained / "model"), str(h5ad), "--out", str(out),
                 "--labels-key", "cluster", "--n-samples", "1", "--max-cells", "100",
                 "--no-embedding", "--title", "Test card", "-q"]) == 0
    text = out.read_text()
    assert text.startswith("# Test card") and "Training set" in text
    assert (tmp_path / "card" / "README.json").exists()
    assert main(["card", str(trained / "model"), str(h5ad), "--out", str(out), "-q"]) == 1


def test_errors_give_the_library_message_and_a_nonzero_status(trained, h5ad, tmp_path,
                                                              capsys):
    def run(argv):
        status = main(argv)
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return status, err

    status, err = run(train_args(tmp_path / "missing.h5ad", tmp_path / "x"))
    assert status == 1 and "missing.h5ad" in err and "does not exist" in err

    adata = anndata.read_h5ad(h5ad)
    with pytest.raises(KeyError) as expected:
        pyrovi.SCVI.setup_anndata(adata, batch_key="donor")
    args = train_args(h5ad, tmp_path / "y")
    args[args.index("batch")] = "donor"
    status, err = run(args)
    assert status == 1 and str(expected.value) in err
    assert not (tmp_path / "y" / "model").exists()

    with pytest.raises(SystemExit) as exit_:
        main(train_args(h5ad, tmp_path / "z", "--model", "scanvi"))
    assert exit_.value.code == 2 and "invalid choice: 'scanvi'" in capsys.readouterr().err

    status, err = run(train_args(h5ad, tmp_path / "t", "--model", "totalvi"))
    assert status == 1 and "--protein-obsm-key" in err

    # An earlier run in --out is neither mixed with nor silently replaced.
    status, err = run(train_args(h5ad, trained))
    assert status == 1 and "--resume" in err and "--overwrite" in err

    status, err = run(["embed", str(tmp_path / "nomodel"), str(h5ad), "--out",
                       str(tmp_path / "e.h5ad")])
    assert status == 1 and "No saved pyrovi model" in err

    status, err = run(["card", str(trained / "model"), str(h5ad), "--out",
                       str(tmp_path / "c.md"), "--labels-key", "cell_type"])
    assert status == 1 and "no column 'cell_type'" in err


def test_resume_of_a_finished_run_and_overwrite(trained, h5ad):
    history = pd.read_csv(trained / "history.csv")
    umap = anndata.read_h5ad(trained / "adata.h5ad").obsm["X_umap"]
    outputs = ["adata.h5ad", "umap.png", "history.png", "card/README.md", "card/card.json"]
    for output in outputs:
        (trained / output).unlink()
    assert main(train_args(h5ad, trained, "--resume")) == 0
    pd.testing.assert_frame_equal(pd.read_csv(trained / "history.csv"), history)
    # A resumed run ends with the same outputs as a straight one.
    assert all((trained / output).is_file() for output in outputs)
    np.testing.assert_array_equal(anndata.read_h5ad(trained / "adata.h5ad").obsm["X_umap"],
                                  umap)
    assert main(train_args(h5ad, trained, "--overwrite", "--max-epochs", "2")) == 0
    assert len(pd.read_csv(trained / "history.csv")) == 2
    assert [p.name for p in checkpoint.list_checkpoints(trained / "checkpoints")] == [
        "checkpoint-000002"]


# -- packaged datasets -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pbmc_run(tmp_path_factory):
    """``pyrovi train pbmc68k_reduced --labels-key bulk_labels``, briefly: its output folder."""
    pytest.importorskip("scanpy", reason="pbmc68k_reduced ships with scanpy")
    out = tmp_path_factory.mktemp("pbmc") / "demo"
    assert main(["train", "pbmc68k_reduced", "--labels-key", "bulk_labels", "--n-latent", "4",
                 "--n-hidden", "32", "--max-epochs", "2", "--device", "cpu", "--out",
                 str(out), "--no-progress", "-q"]) == 0
    return out


def test_datasets_lists_the_packaged_datasets(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    pbmc = next(line for line in lines if line.startswith("pbmc68k_reduced "))
    assert "700 cells x 765 genes" in pbmc
    assert "bulk_labels" in out
    for name, entry in PACKAGED_DATASETS.items():
        assert any(line.startswith(f"{name} ") and entry.description in line
                   for line in lines), name


def test_train_on_a_packaged_dataset_writes_every_output(pbmc_run):
    written = anndata.read_h5ad(pbmc_run / "adata.h5ad")
    assert written.shape == (700, 765)
    assert written.obsm["X_pyrovi"].shape == (700, 4)
    assert written.obsm["X_umap"].shape == (700, 2)
    assert list(pd.read_csv(pbmc_run / "history.csv", index_col="epoch").index) == [0, 1]
    assert_png(pbmc_run / "umap.png")
    assert_png(pbmc_run / "history.png")
    card = json.loads((pbmc_run / "card" / "card.json").read_text())
    assert card["title"] == "SCVI on pbmc68k_reduced"
    assert card["setup_arguments"]["labels_key"] == "bulk_labels"
    assert {row["group"] for row in card["differential_expression"]} == set(
        written.obs["bulk_labels"].cat.categories)
    text = (pbmc_run / "card" / "README.md").read_text()
    assert "pyrovi train pbmc68k_reduced --labels-key bulk_labels" in text


def test_embed_and_card_take_a_packaged_dataset(pbmc_run, tmp_path):
    out = tmp_path / "embedded.h5ad"
    assert main(["embed", str(pbmc_run / "model"), "pbmc68k_reduced", "--out", str(out),
                 "-q"]) == 0
    np.testing.assert_allclose(anndata.read_h5ad(out).obsm["X_pyrovi"],
                               anndata.read_h5ad(pbmc_run / "adata.h5ad").obsm["X_pyrovi"],
                               rtol=1e-5, atol=1e-5)
    card = tmp_path / "card" / "README.md"
    assert main(["card", str(pbmc_run / "model"), "pbmc68k_reduced", "--out", str(card),
                 "--labels-key", "bulk_labels", "--n-samples", "1", "--max-cells", "100",
                 "--no-embedding", "-q"]) == 0
    # The dataset is the model's training data, so the card keeps the split.
    assert "Training set" in card.read_text() and "Validation set" in card.read_text()


def test_a_file_wins_over_a_packaged_dataset_of_the_same_name(h5ad, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.replace(h5ad, tmp_path / "simulated")  # the packaged "simulated" has 1000 cells
    assert main(train_args("simulated", tmp_path / "run", "--no-card")) == 0
    assert anndata.read_h5ad(tmp_path / "run" / "adata.h5ad").n_obs == 300


def test_an_unknown_dataset_fails_in_one_line_listing_the_names(tmp_path, capsys):
    for command in (train_args("pbmc68k", tmp_path / "run"),
                    ["embed", str(tmp_path / "model"), "pbmc68k", "--out",
                     str(tmp_path / "e.h5ad")],
                    ["card", str(tmp_path / "model"), "pbmc68k", "--out",
                     str(tmp_path / "card")]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert "'pbmc68k' does not exist" in err and "not a packaged dataset" in err
        assert all(name in err for name in PACKAGED_DATASETS)
    assert not (tmp_path / "run").exists()


def test_without_the_plot_extra_train_writes_all_but_the_pictures(trained, h5ad, monkeypatch,
                                                                   caplog):
    """No matplotlib or umap-learn: the rest is written, and the log says what to install."""
    assert (trained / "umap.png").exists()  # from the run with the plot extra
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "umap", None)
    with caplog.at_level(logging.WARNING, logger="pyrovi"):
        assert main(train_args(h5ad, trained, "--overwrite")) == 0
    for output in ("model", "history.csv", "checkpoints", "adata.h5ad", "card/README.md",
                   "card/card.json"):
        assert (trained / output).exists(), output
    # An earlier run's pictures are not left to pass for this run's.
    assert not (trained / "umap.png").exists() and not (trained / "history.png").exists()
    written = anndata.read_h5ad(trained / "adata.h5ad")
    assert written.obsm["X_pyrovi"].shape == (300, 4) and "X_umap" not in written.obsm
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    hint = [m for m in warnings if 'pip install "pyrovi[plot]"' in m]
    assert len(hint) == 1 and 'pip install -e ".[plot]"' in hint[0]
    assert "matplotlib" in hint[0] and "umap-learn" in hint[0] and "umap.png" in hint[0]


def test_without_matplotlib_the_umap_is_still_computed(h5ad, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.WARNING, logger="pyrovi"):
        assert main(train_args(h5ad, tmp_path / "run", "--no-card")) == 0
    assert anndata.read_h5ad(tmp_path / "run" / "adata.h5ad").obsm["X_umap"].shape == (300, 2)
    assert not list((tmp_path / "run").glob("*.png"))
    assert not (tmp_path / "run" / "card").exists()
    assert any('pip install "pyrovi[plot]"' in r.getMessage() for r in caplog.records)
