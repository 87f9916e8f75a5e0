"""The SVI machinery: minibatch scaling, KL warm-up, splits, per-cell terms, devices."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from pyrovi.data.tensors import shuffled_minibatches
from pyrovi.infer import (
    MinibatchScaling,
    cell_plate,
    default_max_epochs,
    evaluate_dataset,
    fit,
    kl_scale,
    kl_weight_schedule,
    loss_and_terms,
    resolve_device,
    split_indices,
)
from pyrovi.infer.objective import trace_elbo_surrogate_loss
from pyrovi.infer.training import EarlyStopping


def toy_model(x, n_obs=None, kl_weight=1.0):
    with cell_plate(x.shape[0], n_obs):
        with kl_scale(kl_weight):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


def toy_guide(x, n_obs=None, kl_weight=1.0):
    with cell_plate(x.shape[0], n_obs), kl_scale(kl_weight):
        pyro.sample("z", dist.Normal(x.expand(-1, 2) * 0.3, 0.5).to_event(1))


def closed_form_terms(x):
    """Exact -log p(x|z) is random; KL(q||p) of N(0.3x, 0.25) vs N(0, 1) is closed form."""
    mu, var = 0.3 * x.expand(-1, 2), 0.25
    return (0.5 * (var + mu**2 - 1.0 - np.log(var))).sum(-1)


def test_per_cell_terms_match_loss_and_closed_form_kl():
    x = torch.randn(64, 1)
    pyro.set_rng_seed(0)
    loss, terms = loss_and_terms(Trace_ELBO(), toy_model, toy_guide, x=x)
    torch.testing.assert_close(loss, terms.negative_elbo.sum())
    # The Monte Carlo KL averages to the closed form over many cells.
    x_big = torch.randn(20000, 1)
    _, big = loss_and_terms(Trace_ELBO(), toy_model, toy_guide, x=x_big)
    assert abs(big.kl.mean() - closed_form_terms(x_big).mean()) < 0.02


def score_function_model(x, rate):
    with pyro.plate("cells", x.shape[0]):
        k = pyro.sample("k", dist.Poisson(torch.full((x.shape[0],), 2.0)))
        pyro.sample("x", dist.Normal(k, 1.0), obs=x.squeeze(-1))


def score_function_guide(x, rate):
    with pyro.plate("cells", x.shape[0]):
        pyro.sample("k", dist.Poisson(rate.expand(x.shape[0])))


@pytest.mark.parametrize("reparameterised", [True, False])
def test_sync_free_surrogate_equals_pyros(reparameterised):
    # Same traces, same surrogate loss and gradient as Trace_ELBO's own method, for a
    # reparameterised guide and for one with a score-function (Poisson) site.
    x = torch.randn(32, 1) + 2.0
    rate = torch.tensor(1.5, requires_grad=True)
    model, guide = (
        (lambda x, rate: toy_model(x * rate), lambda x, rate: toy_guide(x * rate))
        if reparameterised
        else (score_function_model, score_function_guide)
    )
    elbo = Trace_ELBO()
    pyro.set_rng_seed(1)
    [(model_trace, guide_trace)] = list(elbo._get_traces(model, guide, (x, rate), {}))
    ours = trace_elbo_surrogate_loss(model_trace, guide_trace)
    _, pyros = elbo._differentiable_loss_particle(model_trace, guide_trace)
    torch.testing.assert_close(ours, pyros)
    (grad_ours,) = torch.autograd.grad(ours, rate, retain_graph=True)
    (grad_pyro,) = torch.autograd.grad(pyros, rate)
    torch.testing.assert_close(grad_ours, grad_pyro)
    assert grad_ours != 0


def test_cell_plate_scales_minibatch_to_dataset_size():
    x = torch.randn(50, 1)
    pyro.set_rng_seed(1)
    loss_full, terms = loss_and_terms(Trace_ELBO(), toy_model, toy_guide, x=x)
    pyro.set_rng_seed(1)
    loss_scaled, terms_scaled = loss_and_terms(Trace_ELBO(), toy_model, toy_guide, x=x, n_obs=500)
    torch.testing.assert_close(loss_scaled, 10 * loss_full)
    # The per-cell terms are reported unscaled.
    torch.testing.assert_close(terms_scaled.negative_elbo, terms.negative_elbo)


@pytest.mark.parametrize("kl_weight", [0.0, 0.25])
def test_kl_weight_scales_only_the_latent_sites(kl_weight):
    x = torch.randn(40, 1)
    pyro.set_rng_seed(2)
    loss, terms = loss_and_terms(Trace_ELBO(), toy_model, toy_guide, x=x, kl_weight=kl_weight)
    expected = terms.reconstruction.sum() + kl_weight * terms.kl.sum()
    torch.testing.assert_close(loss, expected)


def plain_model(x):
    """The toy model as pyrovi's models are written: no inference arguments."""
    with cell_plate(x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([x.shape[0], 2]).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x)


def plain_guide(x):
    with cell_plate(x.shape[0]):
        pyro.sample("z", dist.Normal(x.expand(-1, 2) * 0.3, 0.5).to_event(1))


@pytest.mark.parametrize("kl_weight", [0.0, 0.25, 1.0])
def test_minibatch_scaling_handler_equals_explicit_arguments(kl_weight):
    x = torch.randn(40, 1)
    pyro.set_rng_seed(3)
    explicit, _ = loss_and_terms(Trace_ELBO(), toy_model, toy_guide, x=x, n_obs=300,
                                 kl_weight=kl_weight)
    pyro.set_rng_seed(3)
    with MinibatchScaling(n_obs=300, kl_weight=kl_weight) as scaling:
        handled, terms = loss_and_terms(Trace_ELBO(), plain_model, plain_guide, x=x)
    assert scaling.saw_cell_plate
    assert handled.item() == explicit.item()
    expected = 300 / 40 * (terms.reconstruction.sum() + kl_weight * terms.kl.sum())
    torch.testing.assert_close(handled, expected)


class _Toy(torch.nn.Module):
    def __init__(self, legacy: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([0.3]))
        self.legacy = legacy

    def model(self, x, n_obs=None, kl_weight=1.0):
        # A legacy model receives neither argument from the loop any more.
        assert n_obs is None and kl_weight == 1.0
        (toy_model if self.legacy else plain_model)(x)

    def guide(self, x, n_obs=None, kl_weight=1.0):
        with cell_plate(x.shape[0], n_obs), kl_scale(kl_weight):
            pyro.sample("z", dist.Normal(x.expand(-1, 2) * self.weight, 0.5).to_event(1))


def test_models_written_for_explicit_arguments_train_as_before():
    x = np.random.default_rng(0).normal(size=(90, 1)).astype(np.float32)
    histories = [
        fit(_Toy(legacy), {"x": x}, max_epochs=3, batch_size=32, seed=0, progress_bar=False,
            n_epochs_kl_warmup=2).history
        for legacy in (True, False)
    ]
    assert histories[0]["kl_weight"].tolist() == [0.0, 0.5, 1.0]
    assert histories[0].equals(histories[1])


def test_training_a_model_without_cell_plate_is_refused():
    class NoPlate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loc = torch.nn.Parameter(torch.zeros(1))

        def model(self, x):
            pyro.sample("x", dist.Normal(self.loc, 1.0).expand(x.shape).to_event(2), obs=x)

        def guide(self, x):
            pass

    with pytest.raises(ValueError, match="no sample site inside a plate named 'cells'"):
        fit(NoPlate(), {"x": np.zeros((20, 1), np.float32)}, max_epochs=1, batch_size=10,
            progress_bar=False)


def test_kl_warmup_schedule_and_default_epochs():
    assert kl_weight_schedule(0, 0, 400) == 0.0
    assert kl_weight_schedule(100, 0, 400) == 0.25
    assert kl_weight_schedule(800, 0, 400) == 1.0
    assert kl_weight_schedule(5, 50, 400, n_steps_kl_warmup=100) == 0.5
    assert kl_weight_schedule(5, 50, None, None) == 1.0
    assert default_max_epochs(700) == 400
    assert default_max_epochs(100_000) == 80
    assert default_max_epochs(10**8) == 1


def test_split_sizes_disjoint_and_seeded():
    candidates = np.arange(1000)
    train, val = split_indices(candidates, 0.9, None, np.random.default_rng(0))
    assert len(train) == 900 and len(val) == 100 and not set(train) & set(val)
    train2, _ = split_indices(candidates, 0.9, None, np.random.default_rng(0))
    np.testing.assert_array_equal(train, train2)
    train, val = split_indices(candidates, 0.5, 0.2, np.random.default_rng(0))
    assert (len(train), len(val)) == (500, 200)
    with pytest.raises(ValueError, match="at most 1"):
        split_indices(candidates, 0.9, 0.2)


def test_minibatches_cover_every_cell_once_and_never_leave_a_singleton():
    index = torch.arange(257)
    batches = shuffled_minibatches(index, 128)
    assert [b.numel() for b in batches] == [128, 129]
    assert torch.equal(torch.sort(torch.cat(batches)).values, index)


def test_early_stopping_patience():
    stopper = EarlyStopping(patience=2, min_delta=0.1)
    assert [stopper.should_stop(v) for v in (5.0, 4.0, 3.95, 3.92)] == [False, False, False, True]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


class TwoClusters(torch.nn.Module):
    """x_n ~ N(mu_{c_n}, 1) with c_n ~ Categorical(1/2, 1/2), a pair whose guide enumerates
    c_n: it declares ``required_elbo = "enum"``, which is all ``fit`` needs to know."""

    required_elbo = "enum"
    max_plate_nesting = 1

    def __init__(self):
        super().__init__()
        self.means = torch.nn.Parameter(torch.tensor([-0.5, 0.5]))
        self.assign = torch.nn.Linear(1, 2)

    def model(self, x):
        with cell_plate(x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=torch.zeros(2)).expand([x.shape[0]]))
            pyro.sample("x", dist.Normal(self.means[c], 1.0), obs=x[:, 0])

    def guide(self, x):
        with cell_plate(x.shape[0]):
            pyro.sample("c", dist.Categorical(logits=self.assign(x)),
                        infer={"enumerate": "parallel"})


def test_a_pair_declaring_enumeration_trains_with_traceenum_elbo():
    """The cluster of every cell is summed out; the means are recovered and the per-cell
    terms of the history are the exact expectation over the cluster (the ELBO of a cell
    is at most log p(x_n), here within 0.05 nats of it after training)."""
    from pyrovi.infer import make_elbo

    assert isinstance(make_elbo("trace", TwoClusters()), TraceEnum_ELBO)
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(300, 1, generator=generator) - 3,
                   torch.randn(300, 1, generator=generator) + 3])
    module = TwoClusters()
    result = fit(module, {"x": x}, max_epochs=60, batch_size=100, lr=0.05, seed=0,
                 progress_bar=False, n_epochs_kl_warmup=None)
    assert torch.allclose(module.means.detach().sort().values, torch.tensor([-3.0, 3.0]),
                          atol=0.25)
    mixture = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2)),
                                     dist.Normal(module.means.detach(), 1.0))
    log_evidence = mixture.log_prob(x[:, 0]).mean()
    elbo = -result.history["elbo_train"].iloc[-1]
    assert log_evidence - 0.05 < elbo <= log_evidence + 1e-3


class ModelSideClusters(TwoClusters):
    """TwoClusters with c_n enumerated in the model instead (the guide has no site for it):
    the loss is -log p(x) exactly, by Pyro's tensor contraction."""

    def model(self, x):
        with cell_plate(x.shape[0]):
            c = pyro.sample("c", dist.Categorical(logits=torch.zeros(2)).expand([x.shape[0]]),
                            infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(self.means[c], 1.0), obs=x[:, 0])

    def guide(self, x):
        pass


@pytest.mark.parametrize("validate", [False, True])
def test_enumeration_the_summed_form_does_not_serve_takes_pyros_contraction(validate):
    """Traces pyrovi takes unpacked are packed for Pyro's contraction where its own sum does
    not apply (here a site enumerated in the model); the loss is -log p(x) in closed form,
    and the ELBO's own Pyro methods still pack."""
    from pyrovi.infer import make_elbo

    module = ModelSideClusters()
    x = torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    mixture = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2)),
                                     dist.Normal(module.means.detach(), 1.0))
    expected = -mixture.log_prob(x[:, 0]).sum()
    elbo = make_elbo("trace", module)
    with pyro.validation_enabled(validate):
        loss, _ = loss_and_terms(elbo, module.model, module.guide, x=x)
        pyros = elbo.loss(module.model, module.guide, x)
    torch.testing.assert_close(loss.detach(), expected)
    assert pyros == pytest.approx(expected.item(), rel=1e-5)


def test_terms_of_a_site_the_model_enumerates_are_each_cells_marginal():
    """Per-cell terms (training's and evaluation's) sum the model-enumerated cluster out:
    each cell's negative ELBO is -log p(x_n), in the reconstruction, with no KL; and the
    history's ELBO is the training loss."""
    from pyrovi.infer import make_elbo

    module = ModelSideClusters()
    x = torch.randn(30, 1, generator=torch.Generator().manual_seed(1))
    mixture = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2)),
                                     dist.Normal(module.means.detach(), 1.0))
    expected = -mixture.log_prob(x[:, 0])
    _, terms = loss_and_terms(make_elbo("trace", module), module.model, module.guide, x=x)
    evaluated = evaluate_dataset(module, {"x": x}, None, batch_size=7)
    for each in (terms, evaluated):
        torch.testing.assert_close(each.reconstruction, expected)
        torch.testing.assert_close(each.kl, torch.zeros(30))
    history = fit(module, {"x": x}, max_epochs=3, batch_size=10, lr=0.05, seed=0,
                  progress_bar=False, n_epochs_kl_warmup=None, train_size=1.0).history
    np.testing.assert_allclose(history["elbo_train"], history["train_loss"], rtol=1e-5)


def test_evaluation_enumerates_the_guides_discrete_site():
    """The held-out terms of a pair whose guide enumerates are exact in that site (the
    closed form sum over clusters), not one sampled cluster."""
    module = TwoClusters()
    x = torch.randn(25, 1, generator=torch.Generator().manual_seed(2)) * 3
    terms = evaluate_dataset(module, {"x": x}, None, batch_size=10)
    with torch.no_grad():
        log_q = torch.log_softmax(module.assign(x), -1)
        log_joint = math.log(0.5) + dist.Normal(module.means, 1.0).log_prob(x)
        expected = (log_q.exp() * (log_q - log_joint)).sum(-1)
    torch.testing.assert_close(terms.negative_elbo, expected)
