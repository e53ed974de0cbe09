"""Tests for diffjax.vlb: the continuous-time VDM ELBO for any path and prediction kind.

Time convention: t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε, λ_t = log(α_t²/σ_t²) increasing in t.

Oracles (independent of the code under test): the closed-form ELBO for Gaussian data N(μ, s²I) written here in
numpy from formulas-detailed.md §6.2, scipy quadrature of its λ-integrand, a closed-form solution of the sheet's
M/V ODE for p_model (derived below), Gauss–Hermite quadrature for the discrete decoder, finite differences.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special

from diffjax.analytic import GaussianMixture, gaussian_elbo, gaussian_model_log_prob
from diffjax.kinds import Eps
from diffjax.paths import CosinePath, LinearPath, LogSNRPath, VPPath
from diffjax.vlb import ELBOResult, elbo, elbo_bits_per_dim

D = 3
MU = np.array(
    [1.0, -1.0, 0.2]
)  # ‖μ‖² = 2.04 reproduces the sheet's expectation gaps (prior term ½α₀²‖μ‖²)
S2 = 0.25  # s = 0.5


def _gm():
    return GaussianMixture(jnp.ones(1), jnp.asarray(MU)[None], S2)


# ---------------------------------------------------------------------------------------------------------
# Independent numpy oracles (formulas-detailed.md §6.2)
# ---------------------------------------------------------------------------------------------------------
def _coeffs0(path_name, lam):
    """(α², σ²) at log-SNR lam for the paths used here (VP: α² = sigmoid(λ); CondOT: α = sigmoid(λ/2))."""
    if path_name in ("cosine", "vp"):
        return special.expit(lam), special.expit(-lam)
    a = special.expit(lam / 2)
    return a * a, (1 - a) ** 2


def np_neg_elbo_terms(x, mu, s2, lo, hi, path_name="cosine", tau=1.0):
    x, mu = np.asarray(x, float), np.asarray(mu, float)
    d = x.size
    a02, s02 = _coeffs0(path_name, lo)
    kl = 0.5 * np.sum((s02 + a02 * x**2) / tau**2 - 1.0 - np.log(s02 / tau**2))
    rec = 0.5 * d * (np.log(2 * np.pi) - hi + 1.0)

    def F(u):
        return 0.5 * d * (np.log1p(u) + 1.0 / (1.0 + u)) - np.sum((x - mu) ** 2) / (
            2 * s2 * (1 + u)
        )

    diff = F(s2 * np.exp(hi)) - F(s2 * np.exp(lo))
    return kl, rec, diff


def np_elbo(x, mu, s2, lo, hi, path_name="cosine", tau=1.0):
    return -sum(np_neg_elbo_terms(x, mu, s2, lo, hi, path_name, tau))


def np_logp(x, mu, s2):
    x = np.asarray(x, float)
    return -0.5 * np.sum((x - mu) ** 2) / s2 - 0.5 * x.size * np.log(2 * np.pi * s2)


def np_integrand(lam, x, mu, s2):
    """E_ε‖ε − ε̂*‖² = D(u/(1+u))² + ‖x − μ‖² e^λ/(1+u)², u = s² e^λ."""
    u = s2 * np.exp(lam)
    return (
        np.asarray(x).size * (u / (1 + u)) ** 2
        + np.sum((np.asarray(x) - mu) ** 2) * np.exp(lam) / (1 + u) ** 2
    )


def np_model_logp(x, mu, s2, lo, hi, tau=1.0):
    """log p_model in closed form (VP path), solving the sheet's M/V ODE exactly.

    In the scaled variables m = M/α, w = V/α² and ν = e^{−λ} the ODE becomes dm/dν = (m − μ)/(s² + ν),
    dw/dν = 2w/(s² + ν) − 1, so m(ν₁) = μ(ν₀ − ν₁)/(s² + ν₀) (m(ν₀) = 0) and
    w = (s² + ν) + c(s² + ν)² with c = (w₀ − s² − ν₀)/(s² + ν₀)², w₀ = τ²/α₀². p_model = N(m₁, w₁ + ν₁).
    """
    nu0, nu1 = np.exp(-lo), np.exp(-hi)
    w0 = tau**2 / special.expit(lo)
    m1 = np.asarray(mu) * (nu0 - nu1) / (s2 + nu0)
    c = (w0 - s2 - nu0) / (s2 + nu0) ** 2
    var = (s2 + nu1) + c * (s2 + nu1) ** 2 + nu1
    return float(np.sum(-0.5 * (np.asarray(x) - m1) ** 2 / var - 0.5 * np.log(2 * np.pi * var)))


def _points(n=40, seed=0):
    """Typical points plus outliers (up to 35 data standard deviations away)."""
    rng = np.random.default_rng(seed)
    typical = MU + np.sqrt(S2) * rng.standard_normal((n, D))
    dirs = rng.standard_normal((12, D))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    radii = np.array([2.0, 5.0, 10.0, 17.5] * 3)
    return np.concatenate(
        [typical, MU + radii[:, None] * dirs, [MU + 17.5 * np.ones(D) / np.sqrt(3)]]
    )


# ---------------------------------------------------------------------------------------------------------
# Closed form against quadrature
# ---------------------------------------------------------------------------------------------------------
def test_closed_form_diffusion_term_vs_quadrature(x64):
    for x in [MU, MU + 0.4, np.array([3.0, 2.0, -4.0])]:
        for lo, hi in [(-3.0, 4.0), (-8.0, 9.0), (-14.0, 16.0)]:
            quad = (
                0.5
                * integrate.quad(
                    np_integrand, lo, hi, args=(x, MU, S2), epsabs=1e-13, epsrel=1e-12
                )[0]
            )
            diff = np_neg_elbo_terms(x, MU, S2, lo, hi)[2]
            assert abs(diff - quad) < 1e-9 * (1 + abs(quad))
            # the appended helper: every term against quadrature / the sheet
            for path, name in [(CosinePath(), "cosine"), (LinearPath(), "linear")]:
                val, kl, rec, dif = gaussian_elbo(
                    jnp.asarray(x), MU, S2, lam_min=lo, lam_max=hi, path=path, return_terms=True
                )
                kl_np, rec_np, _ = np_neg_elbo_terms(x, MU, S2, lo, hi, name)
                assert abs(float(dif) - quad) < 1e-9 * (1 + abs(quad))
                np.testing.assert_allclose(
                    [float(kl), float(rec)], [kl_np, rec_np], rtol=1e-10, atol=1e-12
                )
                assert abs(float(val) + kl_np + rec_np + quad) < 1e-8


def test_gaussian_model_log_prob_ode_vs_closed_form(x64):
    pts = jnp.asarray(_points(6))
    f = jax.jit(
        jax.vmap(
            lambda x, lo, hi: gaussian_model_log_prob(x, MU, S2, lam_min=lo, lam_max=hi),
            in_axes=(0, None, None),
        )
    )
    for lo, hi in [(-3.0, 4.0), (-8.0, 9.0)]:
        got = np.asarray(f(pts, lo, hi))
        want = np.array([np_model_logp(p, MU, S2, lo, hi) for p in np.asarray(pts)])
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------
# Monte Carlo ELBO of the exact denoiser of every kind against the closed form
# ---------------------------------------------------------------------------------------------------------
CASES = [
    ("cosine", "eps", (-8.0, 9.0)),
    ("cosine", "data", (-8.0, 9.0)),
    ("cosine", "velocity", (-8.0, 9.0)),
    ("cosine", "v", (-8.0, 9.0)),
    ("cosine", "score", (-8.0, 9.0)),
    ("vp", "eps", None),  # the path's default window [t_min, t_max] has finite λ
    ("vp", "score", (-6.0, 8.0)),
    ("linear", "velocity", (-6.0, 8.0)),
    ("linear", "data", (-6.0, 8.0)),
]


def _path(name):
    return {"cosine": CosinePath, "vp": VPPath, "linear": LinearPath}[name]()


@pytest.mark.parametrize("path_name,kind,rng", CASES)
def test_mc_elbo_matches_closed_form(x64, path_name, kind, rng):
    path = _path(path_name)
    gm = _gm()
    x = jnp.asarray(MU + np.array([0.3, -0.6, 0.4]))
    res = jax.jit(
        lambda k: elbo(gm.model(kind, path), kind, path, x, k, num_samples=8192, log_snr_range=rng)
    )(jax.random.key(1))
    lo, hi = (float(res.log_snr_min), float(res.log_snr_max)) if rng is None else rng
    if rng is None:  # VP default window: λ(t_min) ≈ −10.05, λ(1 − 1e-5) ≈ 13.8
        assert -10.1 < lo < -10.0 and 13.7 < hi < 13.9
    kl, rec, diff = np_neg_elbo_terms(np.asarray(x), MU, S2, lo, hi, path_name)
    np.testing.assert_allclose(float(res.prior_kl), kl, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(float(res.reconstruction), rec, rtol=1e-9)
    se = float(res.stderr)
    assert 0 < se < 0.3
    assert abs(float(res.diffusion) - diff) < 3 * se
    assert abs(float(res.elbo) + kl + rec + diff) < 3 * se


# ---------------------------------------------------------------------------------------------------------
# The three properties of the sheet (and the negative control)
# ---------------------------------------------------------------------------------------------------------
def test_property1_elbo_below_model_likelihood_per_point(x64):
    pts = _points(60, seed=3)
    for lo, hi in [(-3.0, 4.0), (-8.0, 9.0)]:
        gaps = np.array(
            [np_model_logp(p, MU, S2, lo, hi) - np_elbo(p, MU, S2, lo, hi) for p in pts]
        )
        assert gaps.min() >= -1e-10, gaps.min()
    # the estimator respects it too, at the worst outlier (within its SE)
    x = jnp.asarray(MU + 17.5 * np.ones(D) / np.sqrt(3))
    path, gm = CosinePath(), _gm()
    res = jax.jit(
        lambda k: elbo(
            gm.model("eps", path), "eps", path, x, k, num_samples=512, log_snr_range=(-3.0, 4.0)
        )  # fmt: skip
    )(jax.random.key(0))
    assert float(res.elbo) <= np_model_logp(np.asarray(x), MU, S2, -3.0, 4.0) + 3 * float(
        res.stderr
    )


def test_property2_expected_elbo_below_expected_data_loglik(x64):
    """E_x ELBO ≤ E_x log p_data = −(D/2) log(2πe s²); sheet: gap 0.155 at [−3, 4], 1.1e-3 at [−8, 9]."""
    elogp = -0.5 * D * np.log(2 * np.pi * np.e * S2)
    gaps = {}
    for lo, hi in [(-3.0, 4.0), (-8.0, 9.0)]:
        a02, s02 = special.expit(lo), special.expit(-lo)
        ekl = 0.5 * np.sum(s02 + a02 * (MU**2 + S2) - 1 - np.log(s02))
        erec = 0.5 * D * (np.log(2 * np.pi) - hi + 1)
        ediff = 0.5 * D * np.log((1 + S2 * np.exp(hi)) / (1 + S2 * np.exp(lo)))
        gaps[lo] = elogp + ekl + erec + ediff
        assert gaps[lo] > 0
    assert abs(gaps[-3.0] - 0.155) < 1e-3, gaps
    assert abs(gaps[-8.0] - 1.1e-3) < 3e-5, gaps
    # the Monte Carlo estimator, averaged over data drawn from p_data under vmap, agrees
    gm, path = _gm(), CosinePath()
    n = 512
    xs = gm.sample(jax.random.key(5), n)
    keys = jax.random.split(jax.random.key(6), n)
    res = jax.jit(
        jax.vmap(
            lambda x, k: elbo(
                gm.model("eps", path), "eps", path, x, k, num_samples=8, log_snr_range=(-3.0, 4.0)
            )  # fmt: skip
        )
    )(xs, keys)
    mean = float(jnp.mean(res.elbo))
    se = float(jnp.std(res.elbo) / math.sqrt(n))
    assert abs(mean - (elogp - gaps[-3.0])) < 3 * se
    assert mean < np.mean([np_logp(p, MU, S2) for p in np.asarray(xs)])


def test_property3_convergence_to_data_loglik(x64):
    # the point of the sheet's measurement: ‖x‖² = 1, ‖x − μ‖² = 0.725 (the gap is affine in both)
    nm = np.linalg.norm(MU)
    c = (1 + nm**2 - 0.725) / (2 * nm)
    x = c * MU / nm + np.sqrt(1 - c**2) * np.array([1.0, 1.0, 0.0]) / np.sqrt(2)
    gap = {r: np_logp(x, MU, S2) - np_elbo(x, MU, S2, *r) for r in [(-8, 9), (-14, 16), (-20, 24)]}
    np.testing.assert_allclose(gap[(-8, 9)], 8.1e-4, rtol=0.01)
    np.testing.assert_allclose(gap[(-14, 16)], 8.1e-7, rtol=0.01)
    np.testing.assert_allclose(gap[(-20, 24)], 5.0e-10, rtol=0.05)
    # every point, outliers included, converges
    for p in _points(10):
        g = [
            abs(np_logp(p, MU, S2) - np_elbo(p, MU, S2, lo, hi))
            for lo, hi in [(-8, 9), (-14, 16), (-20, 24)]
        ]
        assert g[2] < g[1] < g[0] and g[2] < 1e-6
    # the estimator agrees with log p_data within its SE at the widest range, and the helper with numpy
    gm, path = _gm(), CosinePath()
    res = jax.jit(
        lambda k: elbo(
            gm.model("eps", path),
            "eps",
            path,
            jnp.asarray(x),
            k,
            num_samples=4096,
            log_snr_range=(-14.0, 16.0),
        )  # fmt: skip
    )(jax.random.key(2))
    assert abs(float(res.elbo) - np_logp(x, MU, S2)) < 3 * float(res.stderr)
    helper = float(gaussian_elbo(jnp.asarray(x), MU, S2, lam_min=-14.0, lam_max=16.0))
    assert abs(helper - np_elbo(x, MU, S2, -14.0, 16.0)) < 1e-10


def test_negative_control_per_point_bound_against_data_fails_for_outlier(x64):
    """Per point, ELBO ≤ log p_data is NOT a theorem: the bound is against p_model.

    At λ ∈ [−3, 4] the model's p_model is much wider than p_data (its prior is only partly noised and its
    decoder has σ/α = e^{−2}), so an outlier 35 data-stds away gets a far higher ELBO than log p_data: +41 nats
    (the sheet's counterexample), still below log p_model.
    """
    x = MU + 17.5 * np.ones(D) / np.sqrt(3)
    excess = np_elbo(x, MU, S2, -3.0, 4.0) - np_logp(x, MU, S2)
    assert 40.0 < excess < 43.0  # the bound "ELBO ≤ log p_data" fails by ~41 nats
    assert 0.25 < np_elbo(x, MU, S2, -8.0, 9.0) - np_logp(x, MU, S2) < 0.35  # +0.30 at [−8, 9]
    assert np_elbo(x, MU, S2, -3.0, 4.0) <= np_model_logp(x, MU, S2, -3.0, 4.0)


# ---------------------------------------------------------------------------------------------------------
# Variance of the estimators
# ---------------------------------------------------------------------------------------------------------
def test_variance_reduction(x64):
    gm, path = _gm(), CosinePath()
    x = jnp.asarray(MU + np.array([0.3, -0.6, 0.4]))
    keys = jax.random.split(jax.random.key(7), 1000)
    var, se2 = {}, {}
    for s in ["uniform", "antithetic", "stratified", "importance"]:
        res = jax.jit(
            jax.vmap(
                lambda k, s=s: elbo(
                    gm.model("eps", path),
                    "eps",
                    path,
                    x,
                    k,
                    num_samples=32,
                    log_snr_range=(-8.0, 9.0),
                    sampler=s,
                )  # fmt: skip
            )
        )(keys)
        var[s] = float(jnp.var(res.elbo))
        se2[s] = float(jnp.mean(jnp.square(res.stderr)))
    # measured (1000 repetitions of 32 samples): uniform ≈ 55, antithetic ≈ 48, stratified ≈ 30, importance ≈ 5
    assert var["antithetic"] < var["uniform"], var
    assert var["stratified"] < 0.7 * var["uniform"], var
    assert var["importance"] < 0.2 * var["uniform"], var
    assert var["importance"] < var["stratified"], var
    # the reported SE is calibrated (iid / pairs) or conservative (collapsed strata)
    for s in ["uniform", "antithetic"]:
        assert 0.75 < se2[s] / var[s] < 1.33, (s, se2, var)
    for s in ["stratified", "importance"]:
        assert se2[s] / var[s] > 0.75, (s, se2, var)


# ---------------------------------------------------------------------------------------------------------
# jit / vmap / grad, decoders, bpd, errors
# ---------------------------------------------------------------------------------------------------------
def _elbo_of_mean(m, x, key, kind="velocity"):
    path = CosinePath()
    model = GaussianMixture(jnp.ones(1), m[None], S2).model(kind, path)
    return elbo(model, kind, path, x, key, num_samples=4, log_snr_range=(-5.0, 6.0)).elbo


def _elbo_of_theta(theta, x, key):
    """A cheap one-parameter data-prediction model x̂ = θ·x_t (keeps the eager evaluation fast)."""
    model = lambda t, z: theta * z
    return elbo(model, "data", CosinePath(), x, key, num_samples=2, log_snr_range=(-5.0, 6.0)).elbo


def test_jit_vmap_grad_agree_with_eager(x64):
    xs = jnp.asarray(_points(2)[:3])
    key = jax.random.key(3)
    # eager vs jit, value and grad w.r.t. a model parameter
    theta = jnp.asarray(0.7)
    np.testing.assert_allclose(
        jax.jit(_elbo_of_theta)(theta, xs[0], key), _elbo_of_theta(theta, xs[0], key), rtol=1e-12
    )
    g_eager = jax.grad(_elbo_of_theta)(theta, xs[0], key)
    np.testing.assert_allclose(
        jax.jit(jax.grad(_elbo_of_theta))(theta, xs[0], key), g_eager, rtol=1e-10
    )
    # vmap over examples equals a loop; grad w.r.t. the exact model's mean equals finite differences of the
    # (common-random-number, hence deterministic) jitted ELBO
    m = jnp.asarray(MU + 0.1)
    keys = jax.random.split(key, 3)
    f = jax.jit(_elbo_of_mean)
    batched = jax.jit(jax.vmap(_elbo_of_mean, in_axes=(None, 0, 0)))(m, xs, keys)
    np.testing.assert_allclose(batched, [f(m, xs[i], keys[i]) for i in range(3)], rtol=1e-12)
    g_jit = jax.jit(jax.grad(_elbo_of_mean))(m, xs[0], key)
    h = 1e-5
    fd = [
        (f(m.at[i].add(h), xs[0], key) - f(m.at[i].add(-h), xs[0], key)) / (2 * h) for i in range(D)
    ]
    np.testing.assert_allclose(g_jit, fd, rtol=1e-6, atol=1e-8)
    assert isinstance(
        jax.jit(lambda k: elbo(lambda t, x: x, "eps", VPPath(), xs[0], k))(key), ELBOResult
    )


def test_discrete_decoder_and_bits_per_dim(x64):
    # one coordinate, L = 8 bins on [−1, 1]; x the centre of bin k = 2
    levels, path, lam_hi = 8, CosinePath(), 3.0
    centres = -1 + (np.arange(levels) + 0.5) * 2 / levels
    x = jnp.asarray([centres[2]])
    res = jax.jit(
        lambda k: elbo(
            lambda t, z: jnp.zeros_like(z),
            "eps",
            path,
            x,
            k,
            num_samples=512,
            log_snr_range=(-4.0, lam_hi),
            decoder="discrete",
            num_levels=levels,
        )  # fmt: skip
    )(jax.random.key(0))
    # Gauss–Hermite oracle: −E_ε log softmax_k(−½((x + e^{−λ/2}ε − x_k) e^{λ/2})²)[2]
    g, w = np.polynomial.hermite_e.hermegauss(80)
    z = centres[2] + np.exp(-lam_hi / 2) * g
    logits = -0.5 * ((z[:, None] - centres[None, :]) * np.exp(lam_hi / 2)) ** 2
    nll = -(logits[:, 2] - special.logsumexp(logits, axis=1))
    want = np.sum(w * nll) / np.sqrt(2 * np.pi)
    assert abs(float(res.reconstruction) - want) < 4 * float(res.stderr) + 1e-12
    # bits/dim: −ELBO/(D ln 2) (+ log₂(L/a) for dequantised continuous data: +7 for 8 bits on [−1, 1])
    np.testing.assert_allclose(elbo_bits_per_dim(res), -float(res.elbo) / math.log(2))
    np.testing.assert_allclose(
        elbo_bits_per_dim(-100.0, 10, num_levels=256, scale=2.0), 100 / (10 * math.log(2)) + 7.0
    )
    np.testing.assert_allclose(
        elbo_bits_per_dim(-100.0, 10, num_levels=256), 100 / (10 * math.log(2)) + 8
    )


def test_errors():
    model = lambda t, x: x
    x, key = jnp.zeros(3), jax.random.key(0)
    with pytest.raises(ValueError, match="log_snr_range"):
        elbo(model, "eps", CosinePath(), x, key)  # λ = ±∞ at t = 0, 1
    with pytest.raises(ValueError, match="log_snr_range"):
        jax.jit(lambda k: elbo(model, "eps", LinearPath(), x, k).elbo)(key)
    with pytest.raises(ValueError, match="finite"):
        elbo(model, "eps", CosinePath(), x, key, log_snr_range=(-np.inf, 5.0))
    with pytest.raises(ValueError, match="outside"):
        elbo(
            model, "eps", VPPath(), x, key, log_snr_range=(-14.0, 5.0)
        )  # VP reaches only λ ≥ −10.05
    with pytest.raises(ValueError, match="kind"):
        elbo(model, "noise", CosinePath(), x, key, log_snr_range=(-3.0, 4.0))
    with pytest.raises(ValueError, match="sampler"):
        elbo(model, "eps", CosinePath(), x, key, log_snr_range=(-3.0, 4.0), sampler="sobol")
    with pytest.raises(ValueError, match="decoder"):
        elbo(model, "eps", CosinePath(), x, key, log_snr_range=(-3.0, 4.0), decoder="bernoulli")
    with pytest.raises(ValueError, match="even"):
        elbo(model, "eps", CosinePath(), x, key, log_snr_range=(-3.0, 4.0), num_samples=7)
    with pytest.raises(ValueError, match="not both"):
        elbo(model, "eps", CosinePath(), x, key, t0=0.1, log_snr_range=(-3.0, 4.0))
    with pytest.raises(ValueError, match="t0 < t1"):
        elbo(model, "eps", CosinePath(), x, key, t0=0.8, t1=0.2)


# ---------------------------------------------------------------------------------------------------------
# Gradients w.r.t. PyTree leaves of the model and the schedule; compile behaviour
# ---------------------------------------------------------------------------------------------------------
class _ScaledEps(eqx.Module):
    """ε̂ = θ·(exact ε̂): a one-parameter ε-model whose parameter θ is a leaf (as are the oracle's arrays)."""

    theta: jax.Array
    exact: eqx.Module

    def __call__(self, t, z):
        return self.theta * self.exact(t, z)


def _central_fd(f, v, h):
    return (f(v + h) - f(v - h)) / (2 * h)


def test_grad_wrt_model_parameter_matches_finite_differences(x64):
    path = CosinePath()
    x = jnp.asarray(MU + np.array([0.3, -0.6, 0.4]))
    key = jax.random.key(11)  # fixed Monte Carlo draw: the estimate is a smooth function of θ

    @eqx.filter_jit
    def value(model):
        return elbo(model, "eps", path, x, key, num_samples=16, log_snr_range=(-5.0, 6.0)).elbo

    model = _ScaledEps(jnp.asarray(0.8), _gm().model("eps", path))
    grad = eqx.filter_grad(value)(model)
    fd = _central_fd(lambda th: value(eqx.tree_at(lambda m: m.theta, model, th)), model.theta, 1e-5)
    np.testing.assert_allclose(grad.theta, fd, rtol=1e-7)
    assert abs(float(fd)) > 1.0  # θ = 0.8 is far from the optimum θ = 1: a real slope is checked
    # the gradient also reaches the oracle's means through the same model PyTree
    g_mu = grad.exact.mixture.means[0]
    for i in range(D):
        shift = lambda h, i=i: eqx.tree_at(
            lambda m: m.exact.mixture.means, model, model.exact.mixture.means.at[0, i].add(h)
        )
        fd_i = (value(shift(1e-5)) - value(shift(-1e-5))) / 2e-5
        np.testing.assert_allclose(g_mu[i], fd_i, rtol=1e-6, atol=1e-9)


def _learned_log_snr(params, t):
    """λ(t) = b + s·2·logit(t) (s > 0): a learnable variance-preserving schedule."""
    return params[0] + params[1] * 2.0 * (jnp.log(t) - jnp.log1p(-t))


def test_grad_wrt_learned_schedule_matches_finite_differences(x64):
    """Through path.t_from_log_snr (the λ-importance sampler's times), by implicit differentiation.

    With the λ range fixed, the schedule enters only through the model's time input t = t(λ; θ) (a VP path's
    x_λ depends on λ alone; the prior term's α(t0) is α at λ_min); the model here is the exact ε-model of
    *another* path (cosine), so it depends on t. Before LogSNRPath.t_from_log_snr had implicit gradients this
    derivative came out 0.
    """
    x = jnp.asarray(MU + np.array([0.3, -0.6, 0.4]))
    key = jax.random.key(12)
    model = _gm().model("eps", CosinePath())

    @jax.jit
    @jax.value_and_grad
    def value_and_grad(params):
        path = LogSNRPath(_learned_log_snr, params, t_eps=1e-3)
        return elbo(model, "eps", path, x, key, num_samples=16, log_snr_range=(-5.0, 6.0)).elbo

    params = jnp.asarray([0.3, 0.7])
    grad = value_and_grad(params)[1]
    value = lambda p: value_and_grad(p)[0]
    fd = [_central_fd(lambda h, i=i: value(params.at[i].add(h)), 0.0, 1e-5) for i in range(2)]
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-9)
    assert np.all(np.abs(fd) > 1e-3), fd  # a real slope (a zero gradient would fail)


def test_filter_jit_reuses_program_for_new_parameters(x64):
    path = CosinePath()
    x = jnp.asarray(MU)
    traces = []

    @eqx.filter_jit
    def run(model, key):
        traces.append(None)
        return elbo(model, "eps", path, x, key, num_samples=8, log_snr_range=(-5.0, 6.0))

    key = jax.random.key(4)
    m1 = _ScaledEps(jnp.asarray(0.9), _gm().model("eps", path))
    m2 = _ScaledEps(
        jnp.asarray(1.1),
        GaussianMixture(jnp.ones(1), jnp.asarray(MU)[None] + 0.5, S2).model("eps", path),
    )
    r1, r2 = run(m1, key), run(m2, key)
    assert len(traces) == 1
    assert float(r1.elbo) != float(r2.elbo)
    # the same numbers as the model compiled in as a constant, with the kind given as an object
    closed = jax.jit(
        lambda k: elbo(m2, Eps(), path, x, k, num_samples=8, log_snr_range=(-5.0, 6.0))
    )
    np.testing.assert_allclose(r2.elbo, closed(key).elbo, rtol=1e-12)


def test_window_checks_compile_nothing_unless_traced(x64):
    """A concrete window is checked at trace time (no host callback in the program); a traced one once."""
    gm, x = _gm(), jnp.asarray(MU)
    path = CosinePath()
    text = str(
        jax.make_jaxpr(
            lambda k: (
                elbo(
                    gm.model("eps", path),
                    "eps",
                    path,
                    x,
                    k,
                    num_samples=4,
                    log_snr_range=(-5.0, 6.0),
                ).elbo
            )
        )(jax.random.key(0))
    )
    assert "callback" not in text
    # the window of a traced path is checked at runtime: VP reaches only λ ≥ −10.05
    f = jax.jit(
        lambda bmax, k: (
            elbo(
                lambda t, z: z,
                "eps",
                VPPath(0.1, bmax),
                x,
                k,
                num_samples=4,
                log_snr_range=(-14.0, 5.0),
            ).elbo
        )
    )
    with pytest.raises(Exception, match="log_snr_range must lie inside"):
        jax.block_until_ready(f(jnp.asarray(20.0), jax.random.key(0)))
    assert np.isfinite(
        float(
            jax.jit(
                lambda bmax, k: (
                    elbo(
                        lambda t, z: z,
                        "eps",
                        VPPath(0.1, bmax),
                        x,
                        k,
                        num_samples=4,
                        log_snr_range=(-9.0, 5.0),
                    ).elbo
                )
            )(jnp.asarray(20.0), jax.random.key(0))
        )
    )
