"""Learning-rate schedules and what train() does with options it is not given."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import pyrovi
from pyrovi.infer import TrainingPlan, default_max_epochs, fit
from pyrovi.infer.defaults import (
    AUTO,
    CONVERGING,
    SCVI_TOOLS,
    SCVI_TOOLS_OPTIONS,
    SCVI_TOOLS_TOTALVI,
    converging_batch_size,
    converging_lr,
    resolve_run,
)
from pyrovi.infer.schedules import LearningRateSchedule
from pyrovi.models.training import weights_digest
from tests.infer.test_infer import _Toy


def test_warmup_rises_linearly_to_the_peak():
    schedule = LearningRateSchedule(lr=0.01, warmup_steps=4)
    assert schedule.varies
    assert [schedule.rate(s) for s in range(6)] == pytest.approx(
        [0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert not LearningRateSchedule(lr=0.01).varies


def test_cosine_decay_after_the_warmup_reaches_its_floor_at_the_runs_end():
    schedule = LearningRateSchedule(lr=1.0, warmup_steps=2, decay_to=0.1, total_steps=12,
                                    first_step=100)
    rates = [schedule.rate(100 + s) for s in range(13)]
    assert rates[:2] == pytest.approx([0.5, 1.0])
    # Half a cosine over the 10 steps after the warm-up: 1 at its start, 0.1 at its end.
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 10)) for k in range(11)]
    assert rates[2:] == pytest.approx(expected)
    assert np.all(np.diff(rates[1:]) <= 0)


def test_plateau_rule_is_torchs_reduce_on_plateau():
    """The same values give the same reductions as torch's ReduceLROnPlateau in the mode
    scvi-tools uses (absolute threshold)."""
    values = [10.0, 9.0, 8.995, 8.9995, 9.1, 8.0, 8.0, 8.0, 8.0, 7.0, 7.5, 7.5, 7.5, 7.5]
    ours = LearningRateSchedule(lr=1.0, reduce_on_plateau=True, factor=0.5, patience=2,
                                threshold=1e-2, min_lr=0.2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=2, threshold=1e-2, threshold_mode="abs", min_lr=0.2)
    rates = []
    for value in values:
        ours.end_epoch(value)
        theirs.step(value)
        rates.append((ours.rate(100), optimizer.param_groups[0]["lr"]))
    assert [a for a, _ in rates] == pytest.approx([b for _, b in rates])
    assert min(a for a, _ in rates) == pytest.approx(0.2)  # floored at min_lr


def test_schedule_state_round_trip():
    schedule = LearningRateSchedule(lr=1.0, reduce_on_plateau=True, patience=1, factor=0.5)
    for value in (3.0, 3.0, 3.0, 2.0, 2.5):
        schedule.end_epoch(value)
    again = LearningRateSchedule(lr=1.0, reduce_on_plateau=True, patience=1, factor=0.5)
    again.load_state(schedule.state())
    assert again.state() == schedule.state() and again.rate(0) == schedule.rate(0) == 0.5


def test_training_loop_applies_warmup_and_plateau_each_step():
    """The history's learning rate is the schedule's: warm-up over 2 epochs of 3 steps,
    then halved after every second epoch (the monitored KL weight never improves)."""
    x = np.random.default_rng(0).normal(size=(90, 1)).astype(np.float32)
    history = fit(_Toy(False), {"x": x}, max_epochs=5, batch_size=27, lr=0.1, seed=0,
                  train_size=1.0, progress_bar=False, n_epochs_kl_warmup=None,
                  lr_warmup_epochs=2, reduce_lr_on_plateau=True, lr_patience=1,
                  lr_factor=0.5, lr_scheduler_metric="kl_weight").history
    # The rate of each epoch's last step: 3/6 and 6/6 of the peak, then the halvings
    # (after the epochs' rows: a row shows the rate its epoch trained with).
    assert history["lr"].tolist() == pytest.approx([0.05, 0.1, 0.1, 0.05, 0.05])


def test_a_constant_rate_leaves_the_optimiser_alone():
    x = np.random.default_rng(0).normal(size=(90, 1)).astype(np.float32)
    history = fit(_Toy(False), {"x": x}, max_epochs=2, seed=0, progress_bar=False).history
    assert "lr" not in history


def test_plateau_rule_without_validation_cells_is_refused():
    x = np.random.default_rng(0).normal(size=(20, 1)).astype(np.float32)
    with pytest.raises(ValueError, match="no validation"):
        fit(_Toy(False), {"x": x}, max_epochs=2, train_size=1.0, progress_bar=False,
            reduce_lr_on_plateau=True)


@pytest.mark.parametrize("option, value", [("lr_factor", 1.0), ("lr_factor", 0.0),
                                           ("lr_patience", 0), ("lr_min", -1.0),
                                           ("lr_warmup_epochs", -1)])
def test_bad_schedule_options_are_refused(option, value):
    with pytest.raises(ValueError, match=option):
        TrainingPlan(**{option: value})


def resolve(max_epochs=None, batch_size=None, lr=None, early_stopping=None,
            n_epochs_kl_warmup=AUTO, n_steps_kl_warmup=AUTO, options=None,
            fixed=SCVI_TOOLS, converging=CONVERGING):
    return resolve_run(fixed, converging, 1000, max_epochs, batch_size, lr, early_stopping,
                       n_epochs_kl_warmup, n_steps_kl_warmup, options or {})


def test_a_run_of_given_length_takes_scvi_tools_values():
    run = resolve(max_epochs=50)
    assert run["regime"] == "fixed" and run["plan"] == {}
    plan = TrainingPlan()  # its defaults are scvi-tools'
    assert (run["batch_size"], run["lr"], run["n_epochs_kl_warmup"],
            run["n_steps_kl_warmup"], run["early_stopping"]) == \
        (plan.batch_size, plan.lr, plan.n_epochs_kl_warmup, None, False)
    totalvi = resolve(max_epochs=50, fixed=SCVI_TOOLS_TOTALVI)
    assert (totalvi["batch_size"], totalvi["lr"], totalvi["n_steps_kl_warmup"],
            totalvi["early_stopping"]) == (256, 4e-3, 750, True)
    assert totalvi["plan"] == {"reduce_lr_on_plateau": True}  # as scvi-tools' TOTALVI.train


def test_a_run_of_chosen_length_takes_the_converging_defaults():
    run = resolve()
    assert run["regime"] == "converging"
    assert (run["batch_size"], run["lr"], run["early_stopping"]) == \
        (converging_batch_size(1000), converging_lr(converging_batch_size(1000)), True)
    assert run["n_epochs_kl_warmup"] == CONVERGING.n_epochs_kl_warmup
    assert run["plan"] == CONVERGING.plan


def test_converging_minibatches_give_about_32_steps_per_epoch():
    sizes = {n: converging_batch_size(n) for n in (10, 1268, 3844, 9000, 10 ** 5, 10 ** 6)}
    assert sizes == {10: 64, 1268: 64, 3844: 128, 9000: 256, 10 ** 5: 512, 10 ** 6: 512}
    assert converging_lr(64) == converging_lr(128) == pytest.approx(3e-3)
    assert converging_lr(512) == pytest.approx(6e-3)


def test_options_given_are_never_changed():
    run = resolve(batch_size=64, lr=2e-3, early_stopping=False, n_epochs_kl_warmup=None,
                  n_steps_kl_warmup=None, options={"lr_patience": 3})
    assert (run["batch_size"], run["lr"], run["early_stopping"], run["n_epochs_kl_warmup"],
            run["n_steps_kl_warmup"]) == (64, 2e-3, False, None, None)
    # A rate given is constant; a plateau option given stays the user's.
    assert "reduce_lr_on_plateau" not in run["plan"] and "lr_warmup_epochs" not in run["plan"]
    assert "lr_patience" not in run["plan"]
    # Steps given win over the default epochs of warm-up.
    assert resolve(n_steps_kl_warmup=100)["n_epochs_kl_warmup"] is None


def test_a_batch_size_given_alone_takes_its_default_rate():
    assert resolve(batch_size=512)["lr"] == pytest.approx(converging_lr(512))
    assert resolve(max_epochs=5, batch_size=512)["lr"] == SCVI_TOOLS.lr


def test_scvi_tools_options_and_explicit_arguments_give_the_same_run(small_adata):
    """train(max_epochs=N) is scvi-tools' run, the same as with every option spelled out
    (and as train(**SCVI_TOOLS_OPTIONS) with N its size rule)."""
    digests = []
    n_epochs = default_max_epochs(small_adata.n_obs)
    for options in ({"max_epochs": 3}, {"max_epochs": 3, **SCVI_TOOLS_OPTIONS}):
        pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
        model = pyrovi.SCVI(small_adata, n_hidden=16, n_latent=4)
        model.train(progress_bar=False, seed=0, **options)
        digests.append(weights_digest(model.module))
        assert "lr" not in model.history and model.train_params["defaults"] == "fixed"
    assert digests[0] == digests[1]
    model = pyrovi.SCVI(small_adata, n_hidden=16, n_latent=4)
    model.train(progress_bar=False, seed=0, check_val_every_n_epoch=10 ** 6,
                **SCVI_TOOLS_OPTIONS)
    assert len(model.history) == n_epochs and model.train_params["batch_size"] == 128


def test_default_run_converges_and_stops_early(small_adata):
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    model = pyrovi.SCVI(small_adata, n_hidden=16, n_latent=4)
    model.train(progress_bar=False, seed=0)
    params, history = model.train_params, model.history
    assert params["defaults"] == "converging" and params["early_stopping"]
    assert params["batch_size"] == converging_batch_size(small_adata.n_obs) == 64
    assert params["lr"] == pytest.approx(3e-3) and params["n_epochs_kl_warmup"] == 10
    # It stopped on the plateau, 10 epochs after its best, long before the epoch cap.
    validation = history["elbo_validation"]
    assert len(history) < default_max_epochs(small_adata.n_obs)
    assert validation.idxmin() == history.index[-1] - params["early_stopping_patience"]
    # And it trained: the held-out ELBO improved on the first epoch's by far.
    assert validation.min() < validation.iloc[0] - 0.1 * abs(validation.iloc[0])
    assert math.isfinite(validation.min())


def test_default_run_without_validation_cells_trains_to_the_epoch_cap(small_adata):
    pyrovi.SCVI.setup_anndata(small_adata)
    model = pyrovi.SCVI(small_adata, n_hidden=16, n_latent=4)
    model.train(progress_bar=False, seed=0, train_size=1.0, max_epochs=None)
    assert not model.train_params["early_stopping"]
    assert len(model.history) == default_max_epochs(small_adata.n_obs)
