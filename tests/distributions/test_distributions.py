"""Count distributions: log-densities against scipy/mpmath, float32 accuracy, gradients,
moments, shapes and validation."""

from __future__ import annotations

import mpmath
import numpy as np
import pyro
import pytest
import scipy.sparse as sp
import torch
from scipy import special, stats

from pyrovi.data.csr import gather_csr_rows
from pyrovi.distributions import (
    NegativeBinomial,
    NonzeroPositions,
    Poisson,
    ZeroInflatedNegativeBinomial,
    _fast_nb,
    log_nb_positive,
    log_zinb_positive,
    nb_log_prob,
    zinb_log_prob,
)
from pyrovi.distributions._functional import THETA_SWITCH

EPS32 = float(np.finfo(np.float32).eps)


def recorded(x: torch.Tensor) -> NonzeroPositions:
    """The non-zero positions of ``x``, as a loader records them for a sparse minibatch."""
    flat = torch.nonzero(x.reshape(-1) > 0).squeeze(1)
    return NonzeroPositions(flat, flat % x.shape[-1], x.reshape(-1)[flat], x)


class EvaluationPath:
    """The distributions and functions with ``method`` (and recorded positions) fixed."""

    def __init__(self, name: str):
        self.name = name
        self.method = "gather" if name == "known" else name

    def nonzero(self, x):
        return recorded(x) if self.name == "known" and x.dim() else None

    def log_nb_positive(self, x, mu, theta):
        return log_nb_positive(x, mu, theta, method=self.method, nonzero=self.nonzero(x))

    def log_zinb_positive(self, x, mu, theta, zi_logits):
        return log_zinb_positive(x, mu, theta, zi_logits, method=self.method,
                                 nonzero=self.nonzero(x))

    def _scoring(self, cls):
        path = self

        class Scoring(cls):
            def log_prob(self, value):
                self.nonzero = path.nonzero(value)
                return super().log_prob(value)

        return Scoring

    def NegativeBinomial(self, *args, **kwargs):  # noqa: N802 - stands for the class
        return self._scoring(NegativeBinomial)(*args, method=self.method, **kwargs)

    def ZeroInflatedNegativeBinomial(self, *args, **kwargs):  # noqa: N802
        return self._scoring(ZeroInflatedNegativeBinomial)(*args, method=self.method, **kwargs)

    def make_all(self, mu, theta, zi_logits, **kwargs):
        return [self.NegativeBinomial(mu, theta, **kwargs),
                self.ZeroInflatedNegativeBinomial(mu, theta, zi_logits, **kwargs),
                Poisson(mu, **kwargs)]


@pytest.fixture(params=["tables", "dense-tables", "gather", "known", "dense"])
def evaluation_path(request):
    """Every way of evaluating the NB terms, chosen by ``method=``: per-gene count tables
    at the non-zero counts found by search (the CPU default for sparse counts) or at every
    entry (for dense counts; where a mean is 0 it is the former), lgamma at the non-zero
    counts, at the non-zero positions a loader recorded (every count tensor is given its
    positions), at every entry (the accelerator default)."""
    return EvaluationPath(request.param)


def random_grid(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts 0..5000, theta log-uniform on [1e-4, 1e6], mu log-uniform on [1e-6, 1e4].

    A sixth of the counts are 0 and a sixth are 1..9, where the extremes of the other two
    parameters matter most; a sixth of mu sit near the count (around the mode, where
    log p is small and relative errors largest); some mu are exactly 0 (with x = 0, so
    that log p is finite). Parameters are rounded to float32 so that float32 and float64
    evaluations see identical inputs.
    """
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 5001, n).astype(np.float64)
    k = n // 6
    x[:k] = 0
    x[k : 2 * k] = rng.integers(1, 10, k)
    theta = 10 ** rng.uniform(-4, 6, n)
    mu = 10 ** rng.uniform(-6, 4, n)
    near = slice(2 * k, 3 * k)
    mu[near] = np.maximum(x[near] + rng.normal(0, 1, k) * np.sqrt(x[near] + 1), 1e-3)
    mu[: k // 4] = 0.0
    theta = theta.astype(np.float32).astype(np.float64)
    mu = mu.astype(np.float32).astype(np.float64)
    return x, mu, theta


def nb_logpmf_scipy(x, mu, theta):
    with np.errstate(divide="ignore"):
        return stats.nbinom.logpmf(x, n=theta, p=theta / (theta + mu))


def nb_logpmf_mpmath(x: float, mu: float, theta: float) -> float:
    """The negative binomial log-pmf to 40 significant digits."""
    if mu == 0:
        return 0.0 if x == 0 else -np.inf
    with mpmath.workdps(40):
        x, mu, theta = mpmath.mpf(x), mpmath.mpf(mu), mpmath.mpf(theta)
        value = (
            mpmath.loggamma(x + theta)
            - mpmath.loggamma(theta)
            - mpmath.loggamma(x + 1)
            + theta * mpmath.log(theta / (theta + mu))
            + x * mpmath.log(mu / (theta + mu))
        )
        return float(value)


def nb_logpmf_naive(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """The textbook formula (scVI's), to show what the float32 test guards against."""
    return (
        torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
        + theta * torch.log(theta / (theta + mu))
        + torch.xlogy(x, mu / (theta + mu))
    )


def t64(*arrays):
    return [torch.as_tensor(a, dtype=torch.float64) for a in arrays]


# ---------------------------------------------------------------------------------------
# Log-densities
# ---------------------------------------------------------------------------------------


def test_nb_log_prob_matches_scipy_float64(evaluation_path):
    x, mu, theta = random_grid(6000, seed=1)
    ours = evaluation_path.NegativeBinomial(*t64(mu, theta)).log_prob(torch.as_tensor(x)).numpy()
    # scipy takes p = theta / (theta + mu), whose rounding costs it relative accuracy
    # eps * theta / mu in log(1 - p): up to ~5e-6 relative at x > 0, and ~1e-10 absolute
    # at x = 0, in the corner theta = 1e6, mu = 1e-6 (checked against mpmath below).
    np.testing.assert_allclose(ours, nb_logpmf_scipy(x, mu, theta), rtol=1e-5, atol=1e-9)


def test_nb_log_prob_matches_mpmath_float64(evaluation_path):
    x, mu, theta = random_grid(300, seed=2)
    # The corners of the grid, and both sides of the branch switch.
    corners = [
        (x_, m, t)
        for x_ in (0.0, 1.0, 5000.0)
        for m in (1e-6, 1.0, 1e4)
        for t in (1e-4, THETA_SWITCH * (1 - 1e-7), THETA_SWITCH, THETA_SWITCH * (1 + 1e-7), 1e6)
    ]
    x = np.concatenate([x, [c[0] for c in corners]])
    mu = np.concatenate([mu, [c[1] for c in corners]])
    theta = np.concatenate([theta, [c[2] for c in corners]])
    reference = np.array([nb_logpmf_mpmath(*args) for args in zip(x, mu, theta, strict=True)])
    ours = evaluation_path.log_nb_positive(*t64(x, mu, theta)).numpy()
    np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-13)


def test_scipy_reference_is_accurate_at_the_extremes():
    # Guards the 1e-5 comparison with scipy above. Rounding p = theta / (theta + mu) to
    # float64 costs scipy up to eps64 * theta / mu / log(theta / mu) ~ 4e-6 relative at
    # theta / mu = 1e12 (and 2e-5 relative, 2e-11 absolute, at x = 0, where log p ~ -mu).
    # The fourth point is the worst one found on the random grid (4.9e-6).
    x = np.array([0.0, 1.0, 1000.0, 1671.0, 5000.0, 5000.0])
    mu = np.array([1e-6, 1e-6, 1e-6, 1.0090270734508522e-06, 1e4, 1e-6])
    theta = np.array([1e6, 1e6, 1e6, 858050.625, 1e-4, 1e-4])
    reference = np.array([nb_logpmf_mpmath(*args) for args in zip(x, mu, theta, strict=True)])
    np.testing.assert_allclose(nb_logpmf_scipy(x, mu, theta), reference, rtol=6e-6, atol=1e-10)


def float32_tolerance(x: np.ndarray, mu: np.ndarray, log_p: np.ndarray) -> np.ndarray:
    """What float32 can achieve: 1e-4 relative, plus a few roundings of the largest terms.

    log p contains x * log(mu), lgamma(x + 1) and mu (or their small-theta analogues)
    separately; near the mode they cancel to a log p of a few nats, so at x ~ 5000 a
    float32 result is only good to ~eps32 * 4e4 ~ 5e-3 nats, i.e. ~1e-3 relative. Any
    formula that does not rewrite the density in deviance (saddle-point) form shares
    this, including ``torch.distributions.Poisson``.
    """
    with np.errstate(divide="ignore"):
        log_mu = np.log(np.where(x > 0, mu, 1.0))
    largest_terms = special.gammaln(x + 1) + x * np.abs(log_mu) + mu
    return 1e-4 * np.abs(log_p) + 4 * EPS32 * largest_terms


def test_nb_log_prob_float32_close_to_float64(evaluation_path):
    x, mu, theta = random_grid(20000, seed=3)
    lp64 = evaluation_path.log_nb_positive(*t64(x, mu, theta)).numpy()
    args32 = [torch.as_tensor(a, dtype=torch.float32) for a in (x, mu, theta)]
    lp32 = evaluation_path.log_nb_positive(*args32).double().numpy()
    finite = np.isfinite(lp64)
    np.testing.assert_array_equal(lp32[~finite], lp64[~finite])
    err = np.abs(lp32 - lp64)[finite]
    assert np.all(err <= float32_tolerance(x, mu, lp64)[finite])
    # Up to x = 9 (no large cancelling terms) float32 is good to 1e-5 relative.
    small = finite & (x < 10) & (np.abs(lp64) > 1e-3)
    np.testing.assert_allclose(lp32[small], lp64[small], rtol=1e-5)


@pytest.mark.parametrize("theta", [1e4, 1e6])
def test_nb_log_prob_float32_at_large_theta(theta, evaluation_path):
    x = np.array([0, 1, 3, 10, 100, 1000, 5000, 5000, 5000], dtype=np.float64)
    mu = np.array([1e-6, 1.0, 2.5, 12.0, 90.0, 1000.0, 4900.0, 5000.0, 1e4])
    theta = np.full_like(x, theta)
    lp64 = evaluation_path.log_nb_positive(*t64(x, mu, theta)).numpy()
    args32 = [torch.as_tensor(a, dtype=torch.float32) for a in (x, mu, theta)]
    tol = float32_tolerance(x, mu, lp64)
    err = np.abs(evaluation_path.log_nb_positive(*args32).double().numpy() - lp64)
    assert np.all(err <= tol)
    # The textbook formula cannot meet that: lgamma(1e6) ~ 1.3e7 has float32 spacing 1.
    naive_err = np.abs(nb_logpmf_naive(*args32).double().numpy() - lp64)
    assert np.any(naive_err > 10 * tol)


def test_nb_large_theta_approaches_poisson():
    x = torch.arange(0.0, 60.0, dtype=torch.float64)
    mu = torch.tensor(17.0, dtype=torch.float64)
    nb = NegativeBinomial(mu, torch.tensor(1e10, dtype=torch.float64)).log_prob(x)
    np.testing.assert_allclose(nb.numpy(), Poisson(mu).log_prob(x).numpy(), rtol=1e-7)


def test_zinb_log_prob_matches_scipy_mixture(evaluation_path):
    x, mu, theta = random_grid(6000, seed=4)
    rng = np.random.default_rng(5)
    zi_logits = rng.uniform(-10, 10, x.shape)
    d = evaluation_path.ZeroInflatedNegativeBinomial(*t64(mu, theta, zi_logits))
    ours = d.log_prob(torch.as_tensor(x)).numpy()
    log_pi = -np.logaddexp(0.0, -zi_logits)
    log_keep = -np.logaddexp(0.0, zi_logits)
    log_nb = nb_logpmf_scipy(x, mu, theta)
    expected = np.where(x == 0, np.logaddexp(log_pi, log_keep + log_nb), log_keep + log_nb)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-9)


def test_poisson_log_prob_matches_scipy():
    rng = np.random.default_rng(6)
    x = rng.integers(0, 5001, 5000).astype(np.float64)
    x[:500] = 0
    mu = 10 ** rng.uniform(-6, 4, x.shape)
    mu[:100] = 0.0
    ours = Poisson(torch.as_tensor(mu)).log_prob(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(ours, stats.poisson.logpmf(x, mu), rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------------------------------
# mu = 0 and gradients
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("theta", [1e-4, 1.0, THETA_SWITCH, 1e6])
def test_mu_zero(dtype, theta, evaluation_path):
    x = torch.tensor([0.0, 1.0, 7.0, 5000.0], dtype=dtype)
    mu = torch.zeros(4, dtype=dtype, requires_grad=True)
    theta = torch.tensor(theta, dtype=dtype, requires_grad=True)
    zi_logits = torch.tensor(0.3, dtype=dtype, requires_grad=True)
    for d in evaluation_path.make_all(mu, theta, zi_logits):
        lp = d.log_prob(x)
        assert lp[0].item() == 0.0
        assert torch.all(lp[1:] == -torch.inf)
        # d log p(0) / d mu at mu = 0 is -1, times the probability (1 - pi) of the NB
        # component for the ZINB. The impossible entries must not leak NaN into it (as
        # 0 * inf from their x / mu) when they are masked out of the loss.
        masked = torch.where(torch.isfinite(lp), lp, 0.0).sum()
        grads = torch.autograd.grad(masked, [mu, theta, zi_logits], allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        keep = 1 - torch.sigmoid(zi_logits) if isinstance(d, ZeroInflatedNegativeBinomial) else 1
        torch.testing.assert_close(grads[0][0], -keep * torch.ones((), dtype=dtype))
        assert torch.all(grads[0][1:] == 0)
        assert torch.all(d.sample((1000,)) == 0)


def extreme_grid(dtype):
    values = torch.cartesian_prod(
        torch.tensor([0.0, 1.0, 3.0, 10.0, 1000.0, 5000.0], dtype=torch.float64),
        torch.tensor([1e-6, 1e-3, 1.0, 100.0, 1e4], dtype=torch.float64),
        torch.tensor([1e-4, 1e-2, 1.0, 9.99, 10.0, 10.01, 1e3, 1e6], dtype=torch.float64),
        torch.tensor([-10.0, 0.0, 10.0], dtype=torch.float64),
    ).to(dtype)
    x, mu, theta, zi_logits = values.unbind(-1)
    # Plus mu = 0, where log p is finite only at x = 0.
    n0 = 8
    x = torch.cat([x, torch.zeros(n0, dtype=dtype)])
    mu = torch.cat([mu, torch.zeros(n0, dtype=dtype)])
    theta = torch.cat([theta, torch.logspace(-4, 6, n0, dtype=dtype)])
    zi_logits = torch.cat([zi_logits, torch.linspace(-5, 5, n0, dtype=dtype)])
    return x, mu, theta, zi_logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_on_extreme_grid(dtype, evaluation_path):
    x, mu, theta, zi_logits = extreme_grid(dtype)
    for make in (
        lambda m, t, z: evaluation_path.NegativeBinomial(m, t),
        lambda m, t, z: evaluation_path.ZeroInflatedNegativeBinomial(m, t, z),
        lambda m, t, z: Poisson(m),
    ):
        params = [p.clone().requires_grad_() for p in (mu, theta, zi_logits)]
        lp = make(*params).log_prob(x)
        assert torch.isfinite(lp).all()
        grads = torch.autograd.grad(lp.sum(), params, allow_unused=True)
        for g in grads:
            assert g is None or torch.isfinite(g).all()


def test_nb_gradients_match_analytic_float64(evaluation_path):
    x, mu, theta, _ = extreme_grid(torch.float64)
    keep = mu > 0
    x, mu, theta = x[keep], mu[keep], theta[keep]
    mu_ = mu.clone().requires_grad_()
    theta_ = theta.clone().requires_grad_()
    d_mu, d_theta = torch.autograd.grad(
        evaluation_path.log_nb_positive(x, mu_, theta_).sum(), [mu_, theta_])
    xn, mn, tn = x.numpy(), mu.numpy(), theta.numpy()
    expected_mu = xn / mn - (tn + xn) / (tn + mn)
    # psi(x + theta) - psi(theta) cancels badly for large theta in float64 too; evaluate
    # it as the sum 1/theta + ... + 1/(theta + x - 1) instead.
    psi_diff = np.array(
        [np.sum(1.0 / (t + np.arange(int(k)))) for k, t in zip(xn, tn, strict=True)]
    )
    expected_theta = psi_diff - np.log1p(mn / tn) + (mn - xn) / (tn + mn)
    np.testing.assert_allclose(d_mu.numpy(), expected_mu, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(d_theta.numpy(), expected_theta, rtol=1e-6, atol=1e-12)


def reference_zinb(x, mu, theta, zi_logits):
    """ZINB log-density written directly (float64 only), differentiated by autograd."""
    log_nb = (
        torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
        + theta * (torch.log(theta) - torch.log(theta + mu))
        + x * (torch.log(mu) - torch.log(theta + mu))
    )
    log_keep = -torch.nn.functional.softplus(zi_logits)
    zero = torch.logaddexp(zi_logits + log_keep, log_keep + log_nb)
    return torch.where(x == 0, zero, log_keep + log_nb)


@pytest.mark.parametrize("density", [0.1, 0.6])  # both evaluation paths (sparse / dense)
@pytest.mark.parametrize("zero_inflated", [False, True])
@pytest.mark.parametrize("upstream", ["per_entry", "per_cell"])
def test_hand_written_gradients_match_autograd_of_the_direct_formula(
    density, zero_inflated, upstream, evaluation_path
):
    # Cells x genes with a per-gene theta (broadcast, as in scVI), theta below the
    # Stirling switch so that the direct formula is accurate in float64. The upstream
    # gradient is generic (per entry) or one value per cell broadcast over the genes (a
    # per-cell sum, as in every model: theta's gradient is then a matrix-vector product).
    gen = torch.Generator().manual_seed(0)
    n, g = 40, 30
    x = torch.poisson(torch.rand(n, g, generator=gen, dtype=torch.float64) * 20)
    x = x * (torch.rand(n, g, generator=gen, dtype=torch.float64) < density)
    mu = torch.rand(n, g, generator=gen, dtype=torch.float64) * 15 + 1e-3
    theta = torch.exp(torch.randn(g, generator=gen, dtype=torch.float64)).clamp(max=9.0)
    logits = torch.randn(n, g, generator=gen, dtype=torch.float64)
    weights = torch.randn(n, g, generator=gen, dtype=torch.float64)
    cell_weights = torch.randn(n, generator=gen, dtype=torch.float64)
    params = [mu, theta] + ([logits] if zero_inflated else [])

    def grads(fn):
        leaves = [p.clone().requires_grad_() for p in params]
        value = fn(x, *leaves)
        if upstream == "per_entry":
            objective = (value * weights).sum()
        else:
            objective = (value.sum(-1) * cell_weights).sum()
        return torch.autograd.grad(objective, leaves)

    if zero_inflated:
        fused = grads(
            lambda *a: evaluation_path.ZeroInflatedNegativeBinomial(*a[1:]).log_prob(a[0]))
        direct = grads(reference_zinb)
    else:
        fused = grads(lambda *a: evaluation_path.NegativeBinomial(*a[1:]).log_prob(a[0]))
        direct = grads(lambda x_, m, t: reference_zinb(x_, m, t, torch.full_like(m, -50.0)))
    for a, b in zip(fused, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_hand_written_gradients_match_finite_differences_on_both_theta_branches(
    zero_inflated, evaluation_path
):
    # Central differences of the value in float64 (relative steps, as theta spans 1e-2 to
    # 1e4), with theta on either side of the Stirling switch and counts up to 5000.
    x = torch.tensor([[0.0, 1.0, 3.0, 40.0, 5000.0, 0.0]] * 3, dtype=torch.float64)
    mu = torch.tensor([[0.5], [20.0], [3000.0]], dtype=torch.float64).expand(3, 6).clone()
    theta = torch.tensor([0.05, 2.0, 9.5, 10.5, 300.0, 1e4], dtype=torch.float64)
    logits = torch.linspace(-3, 3, 18, dtype=torch.float64).reshape(3, 6)
    params = [mu, theta, logits] if zero_inflated else [mu, theta]
    make = ZeroInflatedNegativeBinomial if zero_inflated else NegativeBinomial

    leaves = [p.clone().requires_grad_() for p in params]
    analytic = torch.autograd.grad(make(*leaves).log_prob(x).sum(), leaves)
    for i, p in enumerate(params):
        for j in range(p.numel()):
            step = 1e-6 * max(1.0, abs(p.view(-1)[j].item()))
            up, down = [q.clone() for q in params], [q.clone() for q in params]
            up[i].view(-1)[j] += step
            down[i].view(-1)[j] -= step
            # Difference entrywise before summing: untouched entries cancel exactly.
            numeric = (make(*up).log_prob(x) - make(*down).log_prob(x)).sum().item() / (2 * step)
            assert analytic[i].view(-1)[j].item() == pytest.approx(numeric, rel=1e-6, abs=1e-7)


# ---------------------------------------------------------------------------------------
# Moments of samples
# ---------------------------------------------------------------------------------------

N_SAMPLES = 200_000


def assert_moments(d, n: int = N_SAMPLES, n_se: float = 5.0):
    """Sample mean and variance within ``n_se`` standard errors of ``d.mean``/``d.variance``."""
    torch.manual_seed(0)
    s = d.sample((n,)).double()
    assert torch.all(s >= 0) and torch.all(s == s.round())
    mean, var = s.mean(0), s.var(0)
    se_mean = (d.variance.double() / n).sqrt()
    # Standard error of the sample variance, estimated from the samples (fourth moment).
    se_var = ((s - mean).square().std(0) / n**0.5).clamp(min=1e-12)
    assert torch.all((mean - d.mean.double()).abs() <= n_se * se_mean + 1e-12), (mean, d.mean)
    assert torch.all((var - d.variance.double()).abs() <= n_se * se_var), (var, d.variance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nb_sample_moments(dtype):
    mu = torch.tensor([3.0, 20.0, 10.0, 200.0, 0.5], dtype=dtype)
    theta = torch.tensor([0.5, 5.0, 1e6, 30.0, 1e-2], dtype=dtype)
    assert_moments(NegativeBinomial(mu, theta))


def test_nb_sample_tiny_theta():
    # Nearly all mass at 0, with a very heavy tail: just check the samples are valid.
    s = NegativeBinomial(torch.tensor([1.0, 1e4]), torch.tensor([1e-4, 1e-4])).sample((10_000,))
    assert torch.isfinite(s).all() and torch.all(s >= 0)
    assert (s == 0).double().mean() > 0.99


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zinb_sample_moments(dtype):
    mu = torch.tensor([10.0, 5.0, 50.0], dtype=dtype)
    theta = torch.tensor([2.0, 1e6, 0.7], dtype=dtype)
    zi_logits = torch.tensor([-1.0, 0.5, -3.0], dtype=dtype)
    assert_moments(ZeroInflatedNegativeBinomial(mu, theta, zi_logits))


def test_zinb_moments_formulae():
    mu, theta, logits = torch.tensor(6.0), torch.tensor(1.5), torch.tensor(0.4)
    d = ZeroInflatedNegativeBinomial(mu, theta, logits)
    pi = torch.sigmoid(logits)
    nb_var = mu + mu**2 / theta
    second_moment = (1 - pi) * (nb_var + mu**2)
    torch.testing.assert_close(d.mean, (1 - pi) * mu)
    torch.testing.assert_close(d.variance, second_moment - d.mean**2)
    torch.testing.assert_close(d.zi_probs, pi)


def test_poisson_sample_moments():
    assert_moments(Poisson(torch.tensor([0.3, 4.0, 150.0])))


# ---------------------------------------------------------------------------------------
# Shapes, constraints, validation, devices
# ---------------------------------------------------------------------------------------


def make_all(mu, theta, zi_logits, **kwargs):
    return [
        NegativeBinomial(mu, theta, **kwargs),
        ZeroInflatedNegativeBinomial(mu, theta, zi_logits, **kwargs),
        Poisson(mu, **kwargs),
    ]


def test_support_and_constraints():
    from torch.distributions import constraints

    nb, zinb, pois = make_all(torch.ones(2), torch.ones(2), torch.zeros(2))
    for d in (nb, zinb, pois):
        assert d.support is constraints.nonnegative_integer
        assert d.arg_constraints["mu"] is constraints.nonnegative
        assert not d.has_rsample
    assert nb.arg_constraints == {"mu": constraints.nonnegative, "theta": constraints.positive}
    assert zinb.arg_constraints["theta"] is constraints.positive
    assert zinb.arg_constraints["zi_logits"] is constraints.real
    assert set(pois.arg_constraints) == {"mu"}


def test_parameters_broadcast_and_exposed():
    mu = torch.rand(4, 1) * 5
    theta = torch.rand(3) + 0.5
    zi_logits = torch.tensor(-0.5)
    nb, zinb, pois = make_all(mu, theta, zi_logits)
    assert nb.batch_shape == zinb.batch_shape == (4, 3)
    assert pois.batch_shape == (4, 1)
    for d in (nb, zinb):
        torch.testing.assert_close(d.mu, mu.expand(4, 3))
        torch.testing.assert_close(d.theta, theta.expand(4, 3))
    torch.testing.assert_close(zinb.zi_logits, zi_logits.expand(4, 3))
    torch.testing.assert_close(pois.mu, mu)
    torch.testing.assert_close(pois.rate, mu)
    torch.testing.assert_close(nb.mean, mu.expand(4, 3))
    torch.testing.assert_close(nb.variance, mu + mu**2 / theta)
    assert "mu" in repr(pois) and "zi_logits" in repr(zinb) and "theta" in repr(nb)
    # Python scalars are accepted too.
    assert NegativeBinomial(2.0, 3.0).log_prob(torch.tensor(1.0)).shape == ()


def test_expand():
    mu, theta, zi_logits = torch.rand(3) * 4, torch.rand(3) + 0.1, torch.randn(3)
    x = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 5.0]])
    for d in make_all(mu, theta, zi_logits):
        # Reading a lazy or derived attribute first must not break expand (pyro's own
        # ZeroInflatedDistribution.expand fails once ``gate`` has been computed).
        _ = d.mean, d.variance
        if isinstance(d, ZeroInflatedNegativeBinomial):
            _ = d.gate, d.zi_probs
        e = d.expand(torch.Size([2, 3]))
        assert type(e) is type(d)
        assert e.batch_shape == (2, 3)
        torch.testing.assert_close(e.log_prob(x), d.log_prob(x))
        torch.testing.assert_close(e.mean, d.mean.expand(2, 3))
        torch.testing.assert_close(e.variance, d.variance.expand(2, 3))
        assert e.sample().shape == (2, 3)
        assert d.sample((5,)).shape == (5, 3)


def test_to_event_inside_plate():
    n_cells, n_genes = 7, 4
    x = torch.poisson(torch.full((n_cells, n_genes), 3.0))
    mu = torch.rand(n_cells, n_genes) * 5 + 0.1
    theta = torch.rand(n_genes) + 0.5
    zi_logits = torch.randn(n_genes)
    for d in make_all(mu, theta, zi_logits):

        def model(d=d):
            with pyro.plate("cells", n_cells):
                pyro.sample("x", d.to_event(1), obs=x)

        trace = pyro.poutine.trace(model).get_trace()
        trace.compute_log_prob()
        log_prob = trace.nodes["x"]["log_prob"]
        assert log_prob.shape == (n_cells,)
        torch.testing.assert_close(log_prob, d.log_prob(x).sum(-1))


@pytest.mark.parametrize("which", ["nb", "zinb", "poisson"])
def test_validation(which):
    def make(mu=1.0, theta=1.0, zi_logits=0.0):
        args = [torch.as_tensor(v) for v in (mu, theta, zi_logits)]
        nb, zinb, pois = make_all(*args, validate_args=True)
        return {"nb": nb, "zinb": zinb, "poisson": pois}[which]

    with pytest.raises(ValueError):
        make(mu=-1.0)
    if which != "poisson":
        with pytest.raises(ValueError):
            make(theta=0.0)
        with pytest.raises(ValueError):
            make(theta=-2.0)
    if which == "zinb":
        with pytest.raises(ValueError):
            make(zi_logits=float("nan"))
    d = make()
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor(1.5))
    with pytest.raises(ValueError):
        d.log_prob(torch.tensor(-1.0))
    assert torch.isfinite(d.log_prob(torch.tensor(2.0)))
    # Validation off: no checks at construction.
    make_all(torch.tensor(-1.0), torch.tensor(-1.0), torch.tensor(0.0), validate_args=False)


def test_device_agnostic():
    # The meta device stands in for an accelerator: any tensor created on the CPU inside
    # the distributions would fail to combine with meta tensors.
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("meta")
    mu = torch.ones(2, 3, device=device)
    theta = torch.full((3,), 20.0, device=device)
    zi_logits = torch.zeros(3, device=device)
    x = torch.ones(2, 3, device=device)
    for d in make_all(mu, theta, zi_logits, validate_args=False):
        for out in (d.log_prob(x), d.mean, d.variance, d.sample((4,)), d.expand([5, 2, 3]).mean):
            assert out.device.type == device.type
    for theta_value in (0.5, 1e6):  # both branches of log_nb_positive
        lp = log_nb_positive(x, mu, torch.full((3,), theta_value, device=device))
        assert lp.device.type == device.type


def test_log_factorial_table_matches_lgamma_and_falls_back():
    _log_factorial = _fast_nb._log_factorial

    for values in ([0.0, 1.0, 7.0, 1000.0, 65535.0], [3.0, 70000.0], [2.5, 4.0]):
        x = torch.tensor(values, dtype=torch.float64)
        torch.testing.assert_close(_log_factorial(x), torch.lgamma(x + 1), rtol=1e-12, atol=0)
    x32 = torch.tensor([0.0, 5.0, 40000.0])
    torch.testing.assert_close(_log_factorial(x32), torch.lgamma(x32.double() + 1).float())


def test_recorded_nonzero_positions_give_the_same_zinb_values_and_gradients():
    # A minibatch densified from CSR rows carries its non-zero positions; the ZINB
    # log-density and its gradients must not depend on whether they were recorded.
    rng = np.random.default_rng(11)
    counts = sp.random(64, 300, density=0.3, format="csr", random_state=rng,
                       data_rvs=lambda n: rng.integers(1, 400, n)).astype(np.float32)
    tagged, positions = gather_csr_rows(counts.indptr, counts.indices, counts.data,
                                        counts.shape[1], np.arange(counts.shape[0]))
    assert positions.describe(tagged)
    plain = tagged.clone()
    assert not positions.describe(plain)  # another tensor: its non-zeros are searched
    mu = rng.uniform(0.01, 50, plain.shape)
    theta = 10 ** rng.uniform(-2, 4, plain.shape[1])
    logits = rng.uniform(-5, 5, plain.shape)
    results = []
    for x in (tagged, plain):
        params = [torch.tensor(p, dtype=torch.float32, requires_grad=True)
                  for p in (mu, theta, logits)]
        value = ZeroInflatedNegativeBinomial(*params, nonzero=positions).log_prob(x)
        value.sum().backward()
        results.append([value.detach()] + [p.grad for p in params])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def count_table_grid(dtype):
    """Cells x genes with one theta per gene over [1e-4, 1e6] (both sides of the Stirling
    switch), counts 1..15 (read from the per-gene tables) and up to 5000 (computed
    directly), some zeros, mu over [1e-6, 1e4]."""
    rng = np.random.default_rng(21)
    n, g = 60, 24
    theta = 10 ** rng.uniform(-4, 6, g)
    theta[:3] = (THETA_SWITCH * (1 - 1e-7), THETA_SWITCH, THETA_SWITCH * (1 + 1e-7))
    x = rng.integers(1, 16, (n, g)).astype(np.float64)
    x[rng.random((n, g)) < 0.15] = 0
    tail = rng.random((n, g)) < 0.1
    x[tail] = rng.integers(16, 5001, tail.sum())
    mu = 10 ** rng.uniform(-6, 4, (n, g))
    near = rng.random((n, g)) < 0.3
    mu[near] = np.maximum(x[near], 0.5) * rng.uniform(0.8, 1.25, near.sum())
    logits = rng.uniform(-4, 4, (n, g))
    return [torch.tensor(a, dtype=dtype) for a in (x, mu, theta, logits)]


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_count_tables_match_the_direct_terms(zero_inflated):
    # Counts below _TABLE_COUNTS read lgamma/digamma differences from per-gene tables (terms
    # in the input's precision, R(k) summed in float64): the value matches mpmath and the
    # value and gradients the direct
    # lgamma/digamma/Stirling evaluation, in float64 and (to float32 accuracy) in float32.
    x, mu, theta, logits = count_table_grid(torch.float64)
    positions = _fast_nb._ZeroTermPositions(x)
    assert _fast_nb._uses_count_tables(positions, theta)
    make = ZeroInflatedNegativeBinomial if zero_inflated else NegativeBinomial

    params = [mu, theta, logits] if zero_inflated else [mu, theta]

    def value_and_grads(dtype, method="tables"):
        leaves = [p.detach().to(dtype).requires_grad_() for p in params]
        value = make(*leaves, method=method).log_prob(x.to(dtype))
        return [value.detach(), *torch.autograd.grad(value.sum(), leaves)]

    tables = value_and_grads(torch.float64)
    tables32 = value_and_grads(torch.float32)
    direct = value_and_grads(torch.float64, "gather")
    for a, b in zip(tables, direct, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)

    some = (slice(0, 60, 7), slice(None))
    reference = np.array([
        nb_logpmf_mpmath(*args) for args in zip(x[some].reshape(-1).tolist(),
                                                mu[some].reshape(-1).tolist(),
                                                theta.expand_as(x)[some].reshape(-1).tolist(),
                                                strict=True)
    ])
    if not zero_inflated:
        np.testing.assert_allclose(tables[0][some].reshape(-1).numpy(), reference,
                                   rtol=1e-10, atol=1e-12)
    # float32 at the non-zero counts (zeros do not touch the tables; the ZINB's zero
    # term is checked elsewhere).
    positive = x.numpy() > 0
    lp64 = tables[0].numpy()[positive]
    tolerance = float32_tolerance(x.numpy()[positive], mu.numpy()[positive], lp64)
    assert np.all(np.abs(tables32[0].double().numpy()[positive] - lp64) <= tolerance)
    # The theta gradient (summed over cells) where float32 cancellation used to bite.
    np.testing.assert_allclose(tables32[2].double().numpy(), tables[2].numpy(),
                               rtol=2e-3, atol=1e-3 * float(tables[2].abs().max()))


@pytest.mark.parametrize("zero_inflated", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dense_tables_match_the_gathered_evaluation(zero_inflated, dtype, monkeypatch):
    # Reading the tables at every entry (zeros included, counts >= 64 by lgamma/Stirling)
    # gives the gathered evaluation's value and gradients; in float32 to float32 accuracy.
    x, mu, theta, logits = count_table_grid(torch.float64)
    x[:5, :5] = 64.0  # the first count above the dense tables
    runs = []
    dense_table_terms = _fast_nb.dense_table_terms
    monkeypatch.setattr(_fast_nb, "dense_table_terms",
                        lambda *a: runs.append(dense_table_terms(*a)) or runs[-1])
    make = ZeroInflatedNegativeBinomial if zero_inflated else NegativeBinomial
    params = [mu, theta, logits] if zero_inflated else [mu, theta]

    def value_and_grads(method, dtype):
        leaves = [p.detach().to(dtype).requires_grad_() for p in params]
        value = make(*leaves, method=method).log_prob(x.to(dtype))
        return [value.detach().double(),
                *(g.double() for g in torch.autograd.grad(value.sum(), leaves))]

    gathered = value_and_grads("gather", torch.float64)
    dense = value_and_grads("dense-tables", dtype)
    assert len(runs) == 1 and runs[0] is not None  # not the fallback
    tolerance = 1e-9 if dtype == torch.float64 else 2e-4
    for a, b in zip(dense, gathered, strict=True):
        torch.testing.assert_close(a, b, rtol=tolerance, atol=tolerance * float(b.abs().max()))


def test_dense_tables_fall_back_where_a_mean_is_zero_or_counts_are_not_integers():
    x, mu, theta, logits = count_table_grid(torch.float64)
    assert _fast_nb.dense_table_terms(x, mu, theta, logits, True,
                                      _fast_nb._large_count_terms) is not None
    mu_zero = mu.clone()
    mu_zero[0, 0] = 0.0
    halves = x.clone()
    halves[0, 0] = 2.5
    for counts, means in ((x, mu_zero), (halves, mu)):
        assert _fast_nb.dense_table_terms(counts, means, theta, logits, True,
                                          _fast_nb._large_count_terms) is None
        fallback = log_zinb_positive(counts, means, theta, logits, method="dense-tables")
        torch.testing.assert_close(
            fallback, log_zinb_positive(counts, means, theta, logits, method="gather"))


def test_auto_reads_the_tables_at_every_entry_when_most_counts_are_non_zero():
    gen = torch.Generator().manual_seed(0)
    dense = torch.poisson(torch.full((20, 30), 5.0), generator=gen)
    sparse = dense * (torch.rand(20, 30, generator=gen) < 0.1)
    assert _fast_nb.default_method(dense) == "dense-tables"
    assert _fast_nb.default_method(sparse) == "tables"
    assert _fast_nb.default_method(sparse, recorded(sparse)) == "tables"


def test_non_integer_counts_do_not_use_the_count_tables():
    # The tables hold integer counts only; a non-integer x (e.g. a continuous relaxation)
    # must get lgamma(x + theta) exactly, not the table entry of its integer part.
    gen = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.full((50, 20), 4.0, dtype=torch.float64), generator=gen)
    x[::3] += 0.5
    mu = torch.rand(50, 20, generator=gen, dtype=torch.float64) * 10 + 0.1
    theta = torch.rand(20, generator=gen, dtype=torch.float64) * 8 + 0.5
    assert _fast_nb._uses_count_tables(_fast_nb._ZeroTermPositions(x), theta)
    ours = log_nb_positive(x, mu, theta)
    direct = (torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)
              + theta * torch.log(theta / (theta + mu)) + x * torch.log(mu / (theta + mu)))
    torch.testing.assert_close(ours, direct, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------
# The reference log-densities and every fast evaluation of them
# ---------------------------------------------------------------------------------------


def test_reference_log_densities_match_scipy():
    x, mu, theta = random_grid(3000, seed=5)
    keep = theta < 1e4  # the plain formula is the definition, exact in float64 there
    x, mu, theta = x[keep], mu[keep], theta[keep]
    np.testing.assert_allclose(nb_log_prob(*t64(x, mu, theta)).numpy(),
                               nb_logpmf_scipy(x, mu, theta), rtol=1e-5, atol=1e-9)
    logits = np.random.default_rng(6).uniform(-4, 4, x.size)
    pi = special.expit(logits)
    with np.errstate(divide="ignore"):
        expected = np.where(x == 0, np.log(pi + (1 - pi) * np.exp(nb_logpmf_scipy(0, mu, theta))),
                            np.log1p(-pi) + nb_logpmf_scipy(x, mu, theta))
    np.testing.assert_allclose(zinb_log_prob(*t64(x, mu, theta, logits)).numpy(), expected,
                               rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("zero_inflated", [False, True])
def test_every_evaluation_matches_the_reference(evaluation_path, zero_inflated):
    # Values and gradients (autograd of the plain formula against the hand-written ones)
    # of a (cells, genes) minibatch with a per-gene theta, in float64.
    x, mu, theta, logits = count_table_grid(torch.float64)
    x[:, :2] = 0.0  # whole genes without counts
    params = [mu, theta, logits] if zero_inflated else [mu, theta]
    fast = evaluation_path.log_zinb_positive if zero_inflated else evaluation_path.log_nb_positive
    reference = zinb_log_prob if zero_inflated else nb_log_prob
    keep = theta < 1e4  # where the plain formula is accurate in float64
    results = []
    for fn in (fast, reference):
        leaves = [p.detach().clone().requires_grad_() for p in params]
        value = fn(x, *leaves)
        finite = torch.where(torch.isfinite(value), value, 0.0)
        results.append([value.detach(), *torch.autograd.grad(finite.sum(), leaves)])
    (value, *grads), (ref_value, *ref_grads) = results
    torch.testing.assert_close(value[:, keep], ref_value[:, keep], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(grads[0][:, keep], ref_grads[0][:, keep], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(grads[1][keep], ref_grads[1][keep], rtol=1e-6, atol=1e-6)
    if zero_inflated:
        torch.testing.assert_close(grads[2], ref_grads[2], rtol=1e-9, atol=1e-9)


def test_reference_method_is_the_reference():
    x, mu, theta, logits = count_table_grid(torch.float64)
    assert torch.equal(log_nb_positive(x, mu, theta, method="reference"),
                       nb_log_prob(x, mu, theta))
    assert torch.equal(
        ZeroInflatedNegativeBinomial(mu, theta, logits, method="reference").log_prob(x),
        zinb_log_prob(x, mu, theta, logits))
    with pytest.raises(ValueError, match="method must be one of"):
        log_nb_positive(x, mu, theta, method="fast")


def test_recorded_positions_apply_only_to_the_tensor_they_describe():
    # A distribution given the observed counts' positions and asked about another value
    # (a posterior predictive draw) must not use them.
    x = torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 2.0]])
    other = torch.tensor([[5.0, 0.0, 1.0], [0.0, 4.0, 0.0]])
    mu, theta = torch.full((2, 3), 2.0), torch.tensor([1.0, 2.0, 3.0])
    d = NegativeBinomial(mu, theta, nonzero=recorded(x))
    assert torch.equal(d.log_prob(other), NegativeBinomial(mu, theta).log_prob(other))
    assert torch.equal(d.log_prob(x), NegativeBinomial(mu, theta).log_prob(x))
