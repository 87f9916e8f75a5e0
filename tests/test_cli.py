"""The ``pyrovi`` command line: train (killed and resumed), embed, card, errors, help."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import anndata
import numpy as np
import pandas as pd
import pytest

import pyrovi
from pyrovi.cli import main
from pyrovi.datasets import simulate_counts
from pyrovi.infer import checkpoint


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


def test_help_of_the_command_and_each_subcommand(capsys):
    for argv in (["--help"], ["train", "--help"], ["embed", "--help"], ["card", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        assert "usage: pyrovi" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main([])
    assert exit_.value.code == 2


def test_train_writes_model_history_and_checkpoint(trained, h5ad):
    history = pd.read_csv(trained / "history.csv", index_col="epoch")
    assert list(history.index) == [0, 1, 2]
    assert {"elbo_train", "elbo_validation", "kl_weight"} <= set(history.columns)
    assert [p.name for p in checkpoint.list_checkpoints(trained / "checkpoints")] == [
        "checkpoint-000003.pt"]
    model = pyrovi.SCVI.load(trained / "model", anndata.read_h5ad(h5ad))
    assert model.init_params["n_latent"] == 4 and model.registry.batch_key == "batch"
    np.testing.assert_allclose(model.history.to_numpy(), history.to_numpy(), rtol=1e-12)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_train_killed_midway_resumes_to_the_same_run(tmp_path):
    """SIGKILL a real run after its first checkpoint; --resume finishes it."""
    data = tmp_path / "slow.h5ad"
    # Enough minibatches per epoch (~85 of 32 cells) that the run is still going when the
    # first checkpoint (after 2 of 12 epochs) appears.
    simulate_counts(n_cells=3000, n_genes=100, n_batches=2, seed=1).write_h5ad(data)
    args = ["train", str(data), "--batch-key", "batch", "--n-latent", "4", "--n-hidden", "32",
            "--batch-size", "32", "--max-epochs", "12", "--checkpoint-every", "2",
            "--device", "cpu", "--seed", "7", "--no-progress", "-q"]
    out = tmp_path / "run"
    # The environment as is: the subprocess then uses the threads this process uses, for the
    # comparison with the uninterrupted run below.
    env = dict(os.environ)
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
    assert main(train_args(h5ad, trained, "--resume")) == 0
    pd.testing.assert_frame_equal(pd.read_csv(trained / "history.csv"), history)
    assert main(train_args(h5ad, trained, "--overwrite", "--max-epochs", "2")) == 0
    assert len(pd.read_csv(trained / "history.csv")) == 2
    assert [p.name for p in checkpoint.list_checkpoints(trained / "checkpoints")] == [
        "checkpoint-000002.pt"]
