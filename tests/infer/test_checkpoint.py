"""Training checkpoints: exact resume, atomic writes, and refusing the wrong checkpoint."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import pyrovi
from pyrovi.datasets import simulate_cite_seq, simulate_counts
from pyrovi.infer import checkpoint
from pyrovi.io.checkpoint_files import read_checkpoint

#: Three runs that exercise different parts of the saved state: the epoch-based warm-up with
#: validation every other epoch (history rows with and without validation columns); the
#: step-based warm-up with a merged one-cell last minibatch (261 training cells in
#: minibatches of 65, so the step counter is not epochs × minibatches) and early stopping
#: whose tracker matters at the interruption (here the ELBO of epoch 0 stays the best by
#: 25 through epoch 4, so the run stops after epoch 4; a tracker started afresh at the
#: resume would take epoch 4 as its best and stop four epochs later); TotalVI with its
#: defaults (scvi-tools' plateau rule among them).
RUNS = {
    "scvi-epoch-warmup": ("SCVI", dict(batch_size=64, n_epochs_kl_warmup=6,
                                       check_val_every_n_epoch=2)),
    "scvi-steps-early-stopping": ("SCVI", dict(
        batch_size=65, n_steps_kl_warmup=25, early_stopping=True,
        early_stopping_monitor="elbo_train", early_stopping_patience=4,
        early_stopping_min_delta=25.0)),
    "totalvi": ("TOTALVI", dict(batch_size=64)),
    # The learning-rate schedule's state: warm-up, cosine decay to the run's end (not to
    # the end of the epochs left at the resume) and a plateau rule that has waited.
    "scvi-lr-schedule": ("SCVI", dict(batch_size=64, lr=1e-2, lr_warmup_epochs=2,
                                      lr_decay_to=0.1, reduce_lr_on_plateau=True,
                                      lr_patience=1, lr_scheduler_metric="elbo_train")),
}


def build(model_class: str, init_seed: int = 0):
    """A small model on fresh simulated data; ``init_seed`` sets its initial weights."""
    if model_class == "TOTALVI":
        adata = simulate_cite_seq(n_cells=290, n_genes=30, n_proteins=5, seed=2)
        pyrovi.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                     batch_key="batch")
    else:
        adata = simulate_counts(n_cells=290, n_genes=60, n_clusters=3, n_batches=2, seed=1)
        pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    torch.manual_seed(init_seed)
    return getattr(pyrovi, model_class)(adata, n_latent=4, n_hidden=32)


def interrupt_after(monkeypatch, epoch: int) -> None:
    """Make training stop with ``KeyboardInterrupt`` once ``epoch``'s checkpoint is due."""
    write = checkpoint.CheckpointWriter.__call__

    def write_then_interrupt(self, end):
        write(self, end)
        if end.epoch == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.CheckpointWriter, "__call__", write_then_interrupt)


def assert_same_weights(a, b) -> None:
    state_a, state_b = a.module.state_dict(), b.module.state_dict()
    assert list(state_a) == list(state_b)
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("run", list(RUNS))
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(run, tmp_path, monkeypatch):
    model_class, options = RUNS[run]
    options = dict(options, max_epochs=10, seed=3, progress_bar=False, device="cpu")
    straight = build(model_class).train(**options)

    with monkeypatch.context() as patch:
        interrupt_after(patch, epoch=3)
        with pytest.raises(KeyboardInterrupt):
            build(model_class).train(**options, checkpoint_dir=tmp_path, checkpoint_every=2)
    # Epochs 0-3 ran: the checkpoint after 4 epochs is the last (and, keeping 1, the only).
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-000004"]

    # Other initial weights: everything must come from the checkpoint.
    resumed = build(model_class, init_seed=1)
    resumed.train(resume_from=tmp_path, progress_bar=False)

    pd.testing.assert_frame_equal(resumed.history, straight.history, check_exact=True)
    assert list(resumed.history.index) == list(range(len(straight.history)))
    assert_same_weights(resumed, straight)
    assert (resumed.train_indices == straight.train_indices).all()
    assert (resumed.validation_indices == straight.validation_indices).all()
    assert resumed.train_params == straight.train_params
    assert resumed.is_trained
    # Same representation from the same weights (eval mode, posterior mean).
    assert (resumed.get_latent_representation() == straight.get_latent_representation()).all()
    # The run's end is checkpointed: resuming it again trains nothing and changes nothing.
    final = read_checkpoint(tmp_path)
    assert final["finished"] and final["epochs_done"] == len(straight.history)
    again = build(model_class, init_seed=2).train(resume_from=tmp_path, progress_bar=False)
    pd.testing.assert_frame_equal(again.history, straight.history, check_exact=True)
    assert_same_weights(again, straight)


def test_load_checkpoint_restores_the_model_of_that_epoch(tmp_path):
    model = build("SCVI")
    model.train(max_epochs=6, seed=0, progress_bar=False, checkpoint_dir=tmp_path,
                checkpoint_every=2, keep_checkpoints=None)
    assert [checkpoint.epochs_done(p) for p in checkpoint.list_checkpoints(tmp_path)] == [2, 4, 6]
    adata = simulate_counts(n_cells=290, n_genes=60, n_clusters=3, n_batches=2, seed=1)
    at_four = pyrovi.SCVI.load_checkpoint(tmp_path / "checkpoint-000004", adata)
    assert list(at_four.history.index) == [0, 1, 2, 3]
    pd.testing.assert_frame_equal(at_four.history, model.history.iloc[:4], check_exact=True)
    latest = pyrovi.SCVI.load_checkpoint(tmp_path, adata)
    assert_same_weights(latest, model)
    # Resuming the model loaded at epoch 4 supersedes the later checkpoints of that run.
    at_four.train(resume_from=tmp_path / "checkpoint-000004", progress_bar=False,
                  keep_checkpoints=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-000006"]
    pd.testing.assert_frame_equal(at_four.history, model.history, check_exact=True)


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from pyrovi.io import bundle

    write_bytes = bundle._write_bytes
    partial_folders = []

    def fail_in_second_write(path, data):
        # The second checkpoint dies halfway through its files, before it is renamed in.
        if path.parent not in partial_folders:
            partial_folders.append(path.parent)
        if len(partial_folders) == 2 and path.name == "optimizer.safetensors":
            raise OSError("disk went away")
        write_bytes(path, data)

    monkeypatch.setattr(bundle, "_write_bytes", fail_in_second_write)
    with pytest.raises(OSError, match="disk went away"):
        build("SCVI").train(max_epochs=5, seed=0, progress_bar=False, checkpoint_dir=tmp_path)
    monkeypatch.undo()

    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-000001"]
    assert not partial_folders[1].exists()  # cleaned up
    state = read_checkpoint(tmp_path)
    assert state["epochs_done"] == 1 and not state["finished"]
    # A process killed while writing leaves its temporary folder: it is ignored, then removed.
    stale = tmp_path / ".checkpoint-000002.partial-1234abcd"
    stale.mkdir()
    (stale / "model.json").write_bytes(b"half a checkpoint")
    assert checkpoint.latest_checkpoint(tmp_path).name == "checkpoint-000001"
    resumed = build("SCVI").train(resume_from=tmp_path, progress_bar=False)
    assert list(resumed.history.index) == [0, 1, 2, 3, 4]
    assert not stale.exists()
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["checkpoint-000005"]


def test_wrong_checkpoints_and_arguments_are_refused(tmp_path):
    build("SCVI").train(max_epochs=2, seed=0, progress_bar=False, checkpoint_dir=tmp_path)
    # A fresh run must not mix its checkpoints with another run's.
    with pytest.raises(FileExistsError, match="resume"):
        build("SCVI").train(max_epochs=2, progress_bar=False, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="max_epochs=2"):
        build("SCVI").train(resume_from=tmp_path, max_epochs=5)
    adata = simulate_counts(n_cells=290, n_genes=60, n_clusters=3, n_batches=2, seed=1)
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    with pytest.raises(ValueError, match="n_latent=4"):
        pyrovi.SCVI(adata, n_latent=5, n_hidden=32).train(resume_from=tmp_path)
    linear = adata.copy()
    pyrovi.LDVAE.setup_anndata(linear, batch_key="batch")
    with pytest.raises(TypeError, match="checkpoint of a SCVI"):
        pyrovi.LDVAE(linear, n_latent=4, n_hidden=32).train(resume_from=tmp_path)
    fewer = adata[:200].copy()
    pyrovi.SCVI.setup_anndata(fewer, batch_key="batch")
    with pytest.raises(ValueError, match="other cells"):
        pyrovi.SCVI(fewer, n_latent=4, n_hidden=32).train(resume_from=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        build("SCVI").train(resume_from=tmp_path / "elsewhere")
    model = build("SCVI").train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        build("SCVI").train(resume_from=tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        read_checkpoint(tmp_path / "saved")
    with pytest.raises(ValueError, match="checkpoint_dir"):
        build("SCVI").train(max_epochs=1, checkpoint_every=2)
