"""NegativeBinomialMixture: log-density against scipy, float32 accuracy, limits, gradients,
moments, component posterior, shapes and validation."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch
from scipy import special, stats

from pyrovi.distributions import NegativeBinomial, NegativeBinomialMixture

EPS32 = float(np.finfo(np.float32).eps)


def random_grid(n: int, seed: int) -> dict[str, np.ndarray]:
    """Counts 0..2000, means log-uniform on [1e-3, 1e4], thetas on [1e-2, 1e5], logits on
    [-30, 30].

    A sixth of the counts are 0 and a sixth 1..9; for a sixth of the entries one of the
    two means sits near the count (log p small, relative errors largest). Parameters are
    rounded to float32 so that float32 and float64 evaluations see identical inputs.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2001, n).astype(np.float64)
    k = n // 6
    x[:k] = 0
    x[k : 2 * k] = rng.integers(1, 10, k)
    g = {
        "mu1": 10 ** rng.uniform(-3, 4, n),
        "mu2": 10 ** rng.uniform(-3, 4, n),
        "theta1": 10 ** rng.uniform(-2, 5, n),
        "theta2": 10 ** rng.uniform(-2, 5, n),
        "mixture_logits": rng.uniform(-30, 30, n),
    }
    near = slice(2 * k, 3 * k)
    g["mu2"][near] = np.maximum(x[near] + rng.normal(0, 1, k) * np.sqrt(x[near] + 1), 1e-3)
    g = {name: v.astype(np.float32).astype(np.float64) for name, v in g.items()}
    g["x"] = x
    return g


def corner_grid() -> dict[str, np.ndarray]:
    """Every combination of extreme and ordinary values of the five inputs."""
    values = np.array(
        np.meshgrid(
            [0.0, 1.0, 7.0, 2000.0],
            [1e-3, 1.0, 1e4],
            [1e-3, 30.0, 1e4],
            [1e-2, 1.0, 1e5],
            [1e-2, 10.0, 1e5],
            [-30.0, -1.0, 0.0, 2.0, 30.0],
            indexing="ij",
        )
    ).reshape(6, -1)
    values = values.astype(np.float32).astype(np.float64)
    names = ["x", "mu1", "mu2", "theta1", "theta2", "mixture_logits"]
    return dict(zip(names, values, strict=True))


def full_grid() -> dict[str, np.ndarray]:
    a, b = random_grid(4000, seed=1), corner_grid()
    return {name: np.concatenate([a[name], b[name]]) for name in a}


def nb_logpmf_scipy(x, mu, theta):
    return stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))


def mixture_reference(g: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted component log-densities and the mixture log-density, in float64 by scipy."""
    logits = g["mixture_logits"]
    log_w1 = -np.logaddexp(0.0, -logits)
    log_w2 = -np.logaddexp(0.0, logits)
    a1 = log_w1 + nb_logpmf_scipy(g["x"], g["mu1"], g["theta1"])
    a2 = log_w2 + nb_logpmf_scipy(g["x"], g["mu2"], g["theta2"])
    return a1, a2, special.logsumexp(np.stack([a1, a2]), axis=0)


def make(g: dict[str, np.ndarray], dtype=torch.float64, theta2: bool = True, **kwargs):
    def t(name):
        return torch.as_tensor(g[name], dtype=dtype)

    extra = {"theta2": t("theta2")} if theta2 else {}
    d = NegativeBinomialMixture(t("mu1"), t("mu2"), t("theta1"), t("mixture_logits"), **extra,
                                **kwargs)
    return d, t("x")


# ---------------------------------------------------------------------------------------
# Log-density
# ---------------------------------------------------------------------------------------


def test_log_prob_matches_scipy_float64():
    g = full_grid()
    d, x = make(g)
    _, _, expected = mixture_reference(g)
    assert np.isfinite(expected).all()
    np.testing.assert_allclose(d.log_prob(x).numpy(), expected, rtol=1e-6, atol=1e-12)


def test_theta2_defaults_to_theta1():
    g = random_grid(1000, seed=2)
    g["theta2"] = g["theta1"]
    d_default, x = make(g, theta2=False)
    d_given, _ = make(g, theta2=True)
    assert torch.equal(d_default.theta2, d_default.theta1)
    assert torch.equal(d_default.log_prob(x), d_given.log_prob(x))
    _, _, expected = mixture_reference(g)
    np.testing.assert_allclose(d_default.log_prob(x).numpy(), expected, rtol=1e-6, atol=1e-12)
    # A different theta2 does change the density (it is not ignored).
    g["theta2"] = g["theta1"] * 3.0
    d_other, _ = make(g)
    assert not torch.allclose(d_other.log_prob(x), d_default.log_prob(x))


def component_tolerances(g: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The float32 error allowed on each weighted component log-density ``log w_i NB_i``.

    1e-4 relative plus a few roundings of the largest terms of the NB log-density
    (``lgamma(x + 1)``, ``x log mu``, ``mu``; see ``float32_tolerance`` in
    test_distributions.py), plus a few roundings of ``softplus(+-logits)``.
    """
    a1, a2, _ = mixture_reference(g)
    x = g["x"]

    def one(mu, a):
        largest = special.gammaln(x + 1) + x * np.abs(np.log(mu)) + mu
        return 1e-4 * np.abs(a) + 4 * EPS32 * (largest + np.abs(g["mixture_logits"]) + 1)

    return one(g["mu1"], a1), one(g["mu2"], a2)


def float32_tolerance(g: dict[str, np.ndarray]) -> np.ndarray:
    """The components' tolerances weighted by their posterior probabilities: the error of
    ``logaddexp(a1, a2)`` is that average of the errors of ``a1`` and ``a2``."""
    a1, a2, lp = mixture_reference(g)
    tol1, tol2 = component_tolerances(g)
    return np.exp(a1 - lp) * tol1 + np.exp(a2 - lp) * tol2


def test_log_prob_float32_close_to_float64():
    g = full_grid()
    _, _, expected = mixture_reference(g)
    d32, x32 = make(g, dtype=torch.float32)
    lp32 = d32.log_prob(x32).double().numpy()
    err = np.abs(lp32 - expected)
    tol = float32_tolerance(g)
    assert np.all(err <= tol), (err / tol).max()
    # Small counts (no large cancelling terms): 2e-5 relative.
    small = (g["x"] < 10) & (np.abs(expected) > 1e-3)
    np.testing.assert_allclose(lp32[small], expected[small], rtol=2e-5)


def test_log_prob_sums_to_one():
    x = torch.arange(0.0, 3000.0, dtype=torch.float64).unsqueeze(-1)
    d = NegativeBinomialMixture(
        torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64),
        torch.tensor([20.0, 200.0, 45.0], dtype=torch.float64),
        torch.tensor([2.0, 0.7, 1e4], dtype=torch.float64),
        torch.tensor([-1.0, 0.3, 4.0], dtype=torch.float64),
        theta2=torch.tensor([5.0, 30.0, 3.0], dtype=torch.float64),
    )
    total = d.log_prob(x).exp().sum(0)
    torch.testing.assert_close(total, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_reduce_to_one_negative_binomial(dtype):
    g = random_grid(3000, seed=3)
    x = torch.as_tensor(g["x"], dtype=dtype)
    nb1 = NegativeBinomial(*(torch.as_tensor(g[n], dtype=dtype) for n in ("mu1", "theta1")))
    nb2 = NegativeBinomial(*(torch.as_tensor(g[n], dtype=dtype) for n in ("mu2", "theta2")))
    lp1, lp2 = nb1.log_prob(x), nb2.log_prob(x)
    for value, target, other in [(torch.inf, lp1, lp2), (-torch.inf, lp2, lp1)]:
        g["mixture_logits"] = np.full_like(g["x"], value)
        d, _ = make(g, dtype=dtype)
        assert torch.equal(d.log_prob(x), target)
        # A finite logit of 1e4 leaves the other component a weight of exp(-1e4): exactly
        # nothing wherever the other component is not 1e4 nats more likely to begin with.
        g["mixture_logits"] = np.full_like(g["x"], np.sign(value) * 1e4)
        d, _ = make(g, dtype=dtype)
        keep = (other - target) < 5e3
        assert keep.float().mean() > 0.8
        assert torch.equal(d.log_prob(x)[keep], target[keep])
        # Then the gradient flows to the dominant component only.
        params = [d.mu1, d.mu2, d.theta1, d.theta2]
        params = [p.clone().requires_grad_() for p in params]
        mu1, mu2, theta1, theta2 = params
        lp = NegativeBinomialMixture(mu1, mu2, theta1, d.mixture_logits, theta2).log_prob(x)
        grads = torch.autograd.grad(lp[keep].sum(), params)
        dominant, negligible = (grads[0], grads[1]) if value > 0 else (grads[1], grads[0])
        assert torch.all(negligible[keep] == 0)
        mu_dominant = (mu1 if value > 0 else mu2).detach().clone().requires_grad_()
        theta_dominant = theta1 if value > 0 else theta2
        expected = torch.autograd.grad(
            NegativeBinomial(mu_dominant, theta_dominant.detach()).log_prob(x)[keep].sum(),
            mu_dominant,
        )[0]
        torch.testing.assert_close(dominant, expected)


def extreme_params(dtype) -> list[torch.Tensor]:
    values = torch.cartesian_prod(
        torch.tensor([0.0, 1.0, 10.0, 2000.0]),
        torch.tensor([1e-8, 1e-3, 1.0, 1e4]),
        torch.tensor([1e-8, 1e-3, 1.0, 1e4]),
        torch.tensor([1e-4, 1.0, 1e6, 1e8]),
        torch.tensor([1e-4, 1.0, 1e6, 1e8]),
        torch.tensor([-1e4, -30.0, 0.0, 30.0, 1e4]),
    ).to(dtype)
    return list(values.unbind(-1))


def test_finite_log_prob_and_gradients_at_extremes_float32():
    x, *params = extreme_params(torch.float32)
    params = [p.clone().requires_grad_() for p in params]
    mu1, mu2, theta1, theta2, logits = params
    d = NegativeBinomialMixture(mu1, mu2, theta1, logits, theta2=theta2)
    lp = d.log_prob(x)
    assert torch.isfinite(lp).all()
    grads = torch.autograd.grad(lp.sum(), params)
    for name, grad in zip(["mu1", "mu2", "theta1", "theta2", "logits"], grads, strict=True):
        assert torch.isfinite(grad).all(), name
    posterior = d.component_posterior(x)
    assert torch.isfinite(posterior).all()
    assert torch.all((posterior >= 0) & (posterior <= 1))
    grads = torch.autograd.grad(posterior.sum(), params)
    assert all(torch.isfinite(grad).all() for grad in grads)


# ---------------------------------------------------------------------------------------
# Moments, sampling and the component posterior
# ---------------------------------------------------------------------------------------


def assert_moments(d, n: int = 200_000, n_se: float = 5.0):
    """Sample mean and variance within ``n_se`` standard errors of ``d.mean``/``d.variance``."""
    torch.manual_seed(0)
    s = d.sample((n,)).double()
    assert torch.all(s >= 0) and torch.all(s == s.round())
    mean, var = s.mean(0), s.var(0)
    se_mean = (d.variance.double() / n).sqrt()
    # Standard error of the sample variance, estimated from the samples (fourth moment).
    se_var = (s - mean).square().std(0) / n**0.5
    assert torch.all((mean - d.mean.double()).abs() <= n_se * se_mean), (mean, d.mean)
    assert torch.all((var - d.variance.double()).abs() <= n_se * se_var), (var, d.variance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_moments(dtype):
    def t(*v):
        return torch.tensor(v, dtype=dtype)

    mu1, mu2 = t(2.0, 5.0, 30.0, 0.1), t(50.0, 8.0, 300.0, 40.0)
    theta1, theta2 = t(10.0, 1.0, 1e4, 0.5), t(3.0, 1e6, 2.0, 20.0)
    logits = t(0.0, -1.5, 2.0, 1.0)
    assert_moments(NegativeBinomialMixture(mu1, mu2, theta1, logits, theta2=theta2))
    assert_moments(NegativeBinomialMixture(mu1, mu2, theta1, logits))


def test_moments_formulae():
    mu1, mu2 = torch.tensor(3.0), torch.tensor(40.0)
    theta1, theta2, logits = torch.tensor(2.0), torch.tensor(7.0), torch.tensor(-0.4)
    d = NegativeBinomialMixture(mu1, mu2, theta1, logits, theta2=theta2)
    w = torch.sigmoid(logits)
    second_moment = w * (mu1 + mu1**2 / theta1 + mu1**2) + (1 - w) * (
        mu2 + mu2**2 / theta2 + mu2**2
    )
    torch.testing.assert_close(d.mixture_probs, w)
    torch.testing.assert_close(d.mean, w * mu1 + (1 - w) * mu2)
    torch.testing.assert_close(d.variance, second_moment - d.mean**2)


def test_sampled_component_proportions():
    # Background ~ 5 +- 2.4 and foreground ~ 500 +- 72: a count below 100 identifies the
    # component that drew it (misclassification probability < 1e-12).
    logits = torch.tensor([-2.0, 0.0, 1.5, 4.0])
    d = NegativeBinomialMixture(
        torch.tensor(5.0), torch.tensor(500.0), torch.tensor(50.0), logits
    ).expand(torch.Size([4]))
    n = 100_000
    torch.manual_seed(1)
    s = d.sample((n,))
    w = torch.sigmoid(logits).double()
    se = (w * (1 - w) / n).sqrt()
    proportion = (s < 100).double().mean(0)
    assert torch.all((proportion - w).abs() <= 5 * se), (proportion, w)
    # And the posterior recovers the component of each draw.
    posterior = d.component_posterior(s)
    assert torch.all(torch.where(s < 100, 1 - posterior, posterior) < 1e-6)


def test_posterior_averages_to_prior_weight():
    # E[P(1 | x)] = w for x drawn from the mixture, however much the components overlap.
    logits = torch.tensor([-1.0, 0.5], dtype=torch.float64)
    d = NegativeBinomialMixture(
        torch.tensor([4.0, 10.0], dtype=torch.float64),
        torch.tensor([9.0, 14.0], dtype=torch.float64),
        torch.tensor([3.0, 5.0], dtype=torch.float64),
        logits,
        theta2=torch.tensor([6.0, 1.0], dtype=torch.float64),
    )
    n = 100_000
    torch.manual_seed(2)
    posterior = d.component_posterior(d.sample((n,)))
    se = posterior.std(0) / n**0.5
    assert torch.all((posterior.mean(0) - torch.sigmoid(logits)).abs() <= 5 * se)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_component_posterior_matches_bayes_rule(dtype):
    g = full_grid()
    d, x = make(g, dtype=dtype)
    logits = g["mixture_logits"]
    # expit(-l), not 1 - expit(l), which has no significant digits left at l = 30.
    w1, w2 = special.expit(logits), special.expit(-logits)
    p1 = stats.nbinom.pmf(g["x"], n=g["theta1"], p=g["theta1"] / (g["theta1"] + g["mu1"]))
    p2 = stats.nbinom.pmf(g["x"], n=g["theta2"], p=g["theta2"] / (g["theta2"] + g["mu2"]))
    # Bayes' rule in probability space wherever the densities do not underflow ...
    usable = (w1 * p1 + w2 * p2) > 1e-250
    assert usable.mean() > 0.5
    w1, w2, p1, p2 = w1[usable], w2[usable], p1[usable], p2[usable]
    expected = w1 * p1 / (w1 * p1 + w2 * p2)
    # ... and through log-densities everywhere.
    a1, _, lp = mixture_reference(g)
    expected_log = np.exp(a1 - lp)
    ours = d.component_posterior(x).double().numpy()
    if dtype == torch.float64:
        np.testing.assert_allclose(ours[usable], expected, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(ours, expected_log, rtol=1e-6, atol=1e-12)
    else:
        # The posterior is sigmoid(l + log NB1 - log NB2): its error is that of the
        # log-density difference times the slope of the sigmoid, P(1 | x) P(2 | x).
        tol1, tol2 = component_tolerances(g)
        slope = expected_log * (1 - expected_log)
        err = np.abs(ours - expected_log)
        assert np.all(err <= 2 * slope * (tol1 + tol2) + 4 * EPS32), err.max()
        np.testing.assert_allclose(ours[usable], expected, rtol=5e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------
# Shapes, constraints, validation
# ---------------------------------------------------------------------------------------


def test_constraints():
    from torch.distributions import constraints

    d = NegativeBinomialMixture(1.0, 2.0, 3.0, 0.0)
    assert d.support is constraints.nonnegative_integer
    assert not d.has_rsample
    for name in ("mu1", "mu2", "theta1", "theta2"):
        assert d.arg_constraints[name] is constraints.positive
    assert d.arg_constraints["mixture_logits"] is constraints.real


def test_broadcasting_and_expand():
    mu1 = torch.rand(4, 1) + 0.1
    mu2 = torch.rand(3) * 50 + 1
    theta1 = torch.tensor(2.0)
    logits = torch.randn(4, 3)
    theta2 = torch.rand(1, 3) + 0.5
    d = NegativeBinomialMixture(mu1, mu2, theta1, logits, theta2=theta2)
    assert d.batch_shape == (4, 3) and d.event_shape == ()
    for name, value in [("mu1", mu1), ("mu2", mu2), ("theta1", theta1), ("theta2", theta2),
                        ("mixture_logits", logits)]:
        torch.testing.assert_close(getattr(d, name), value.expand(4, 3))
    assert d.mean.shape == d.variance.shape == (4, 3)
    assert d.sample().shape == (4, 3) and d.sample((5,)).shape == (5, 4, 3)
    x = torch.poisson(torch.full((2, 4, 3), 3.0))
    assert d.log_prob(x).shape == d.component_posterior(x).shape == (2, 4, 3)
    assert d.log_prob(torch.tensor(1.0)).shape == (4, 3)
    assert "mixture_logits" in repr(d) and "theta2" in repr(d)

    for dist in (d, NegativeBinomialMixture(mu1, mu2, theta1, logits)):
        e = dist.expand(torch.Size([2, 4, 3]))
        assert type(e) is NegativeBinomialMixture and e.batch_shape == (2, 4, 3)
        torch.testing.assert_close(e.log_prob(x), dist.log_prob(x))
        torch.testing.assert_close(e.component_posterior(x), dist.component_posterior(x))
        torch.testing.assert_close(e.mean, dist.mean.expand(2, 4, 3))
        torch.testing.assert_close(e.variance, dist.variance.expand(2, 4, 3))
        torch.testing.assert_close(e.theta2, dist.theta2.expand(2, 4, 3))
        assert e.sample().shape == (2, 4, 3)

    # Python scalars are accepted too.
    assert NegativeBinomialMixture(1.0, 5.0, 2.0, 0.5).log_prob(torch.tensor(3.0)).shape == ()


def test_masked_to_event_inside_plate():
    # How TotalVI uses it: proteins as the event, unmeasured ones masked out.
    n_cells, n_proteins = 6, 5
    y = torch.poisson(torch.full((n_cells, n_proteins), 20.0))
    background = torch.rand(n_cells, n_proteins) * 5 + 1
    d = NegativeBinomialMixture(
        background, background * 6, torch.rand(n_proteins) + 1, torch.randn(n_cells, n_proteins)
    )
    measured = torch.tensor([True, True, False, True, False])

    def model():
        with pyro.plate("cells", n_cells):
            pyro.sample("y", d.mask(measured).to_event(1), obs=y)

    trace = pyro.poutine.trace(model).get_trace()
    trace.compute_log_prob()
    torch.testing.assert_close(
        trace.nodes["y"]["log_prob"], d.log_prob(y)[:, measured].sum(-1)
    )


def test_validation():
    def make_one(mu1=1.0, mu2=5.0, theta1=2.0, logits=0.0, theta2=3.0):
        args = [torch.as_tensor(v) for v in (mu1, mu2, theta1, logits)]
        return NegativeBinomialMixture(*args, theta2=torch.as_tensor(theta2),
                                       validate_args=True)

    for bad in [{"mu1": -1.0}, {"mu2": 0.0}, {"theta1": 0.0}, {"theta2": -2.0},
                {"logits": float("nan")}]:
        with pytest.raises(ValueError):
            make_one(**bad)
    d = make_one()
    for value in (torch.tensor(1.5), torch.tensor(-1.0), torch.tensor([2.0, -3.0])):
        with pytest.raises(ValueError):
            d.log_prob(value)
        with pytest.raises(ValueError):
            d.component_posterior(value)
    assert torch.isfinite(d.log_prob(torch.tensor(2.0)))
    assert 0 < d.component_posterior(torch.tensor(2.0)) < 1
    assert d.expand(torch.Size([3]))._validate_args
    with pytest.raises(ValueError):
        d.expand(torch.Size([3])).log_prob(torch.tensor(0.5))
    # Validation off: no checks.
    d = NegativeBinomialMixture(
        torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(-1.0), torch.tensor(0.0),
        validate_args=False,
    )
    d.log_prob(torch.tensor(0.5))


def test_device_agnostic():
    # The meta device stands in for an accelerator: any tensor created on the CPU inside
    # the distribution would fail to combine with meta tensors.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")
    mu1 = torch.ones(2, 3, device=device)
    theta1 = torch.full((3,), 20.0, device=device)
    logits = torch.zeros(3, device=device)
    x = torch.ones(2, 3, device=device)
    d = NegativeBinomialMixture(mu1, mu1 * 4, theta1, logits, validate_args=False)
    for out in (d.log_prob(x), d.component_posterior(x), d.mean, d.variance,
                d.sample((4,)), d.expand([5, 2, 3]).mean):
        assert out.device.type == device.type
