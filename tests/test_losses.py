"""Tests for diffjax.losses against closed forms written here (formulas-detailed.md §1.3, §2.4, §3).

Time convention: t = 0 is noise, t = 1 is data. Everything numeric runs in float64 (module fixture).
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
import scipy.stats

import diffjax.losses as L
from diffjax.paths import CosinePath, EDMPath, LinearPath, LogSNRPath, VPPath


@pytest.fixture(autouse=True, scope="module")
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


# ----------------------------------------------------------------------------------------------------------------
# Independent closed forms (numpy), project time t: 0 noise, 1 data.
# ----------------------------------------------------------------------------------------------------------------


def coeffs_linear(t):
    return t, 1.0 - t, 1.0, -1.0


def coeffs_cosine(t):
    h = 0.5 * np.pi
    return np.sin(h * t), np.cos(h * t), h * np.cos(h * t), -h * np.sin(h * t)


def coeffs_edm(t, smin=0.002, smax=80.0, rho=7.0):
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    base = a + t * (b - a)
    return 1.0, base**rho, 0.0, rho * base ** (rho - 1) * (b - a)


def eps_hat_from(kind, out, x_t, c):
    """ε̂ from a network output of ``kind`` (formulas-detailed.md §1.3), written independently of diffjax."""
    a, s, da, ds = c
    if kind == "eps":
        return out
    if kind == "data":
        return (x_t - a * out) / s
    if kind == "v":
        return (s * x_t + a * out) / (a * a + s * s)
    if kind == "velocity":
        return (da * x_t - a * out) / (da * s - ds * a)
    if kind == "score":
        return -s * out
    raise AssertionError(kind)


def npdf(x, mean, var):
    return np.exp(-0.5 * (x - mean) ** 2 / var) / np.sqrt(2 * np.pi * var)


sech = lambda z: 1.0 / np.cosh(z)
p_linear_uniform = lambda lam: 1.0 / (8.0 * np.cosh(lam / 4.0) ** 2)  # t(1−t)/2
p_cosine_uniform = lambda lam: sech(lam / 2.0) / (2.0 * np.pi)

M, S = 0.3, 0.8  # logit-normal parameters used below

# (name, objective factory, path coefficients, prediction kind, w(λ), p(λ)) — table §2.4.
CASES = [
    (
        "fm_linear",
        lambda: L.flow_matching(),
        coeffs_linear,
        "velocity",
        lambda l: np.exp(-l / 2),
        p_linear_uniform,
    ),
    (
        "fm_cosine",
        lambda: L.flow_matching(CosinePath()),
        coeffs_cosine,
        "velocity",
        lambda l: np.pi / 2 * np.exp(-l / 2),
        p_cosine_uniform,
    ),
    (
        "eps_linear",
        lambda: L.ddpm(LinearPath()),
        coeffs_linear,
        "eps",
        lambda l: 0.25 * sech(l / 4) ** 2,
        p_linear_uniform,
    ),
    (
        "eps_cosine",
        lambda: L.ddpm(CosinePath()),
        coeffs_cosine,
        "eps",
        lambda l: sech(l / 2) / np.pi,
        p_cosine_uniform,
    ),
    (
        "v_cosine",
        lambda: L.v_prediction(),
        coeffs_cosine,
        "v",
        lambda l: 2 / np.pi * np.exp(-l / 2),
        p_cosine_uniform,
    ),
    (
        "x_cosine",
        lambda: L.Objective(CosinePath(), "data"),
        coeffs_cosine,
        "data",
        lambda l: np.exp(-l) * sech(l / 2) / np.pi,
        p_cosine_uniform,
    ),
    (
        "x_linear",
        lambda: L.Objective(LinearPath(), "data"),
        coeffs_linear,
        "data",
        lambda l: 0.25 * np.exp(-l) * sech(l / 4) ** 2,
        p_linear_uniform,
    ),
    (
        "edm",
        lambda: L.edm(),
        coeffs_edm,
        "data",
        lambda l: 8 * npdf(l, 2.4, 2.4**2) * (np.exp(-l) + 0.25),
        lambda l: npdf(l, 2.4, 2.4**2),
    ),
    (
        "sd3_logit_normal",
        lambda: L.sd3(mean=M, std=S),
        coeffs_linear,
        "velocity",
        lambda l: 2 * (1 + np.exp(-l / 2)) ** 2 * npdf(l, -2 * M, 4 * S**2),
        lambda l: npdf(l, -2 * M, 4 * S**2),
    ),
    (
        "sd3_cosmap",
        lambda: L.sd3(sampler="cosmap"),
        coeffs_linear,
        "velocity",
        # w = e^{−λ/2}π(t), p = π(t)/λ̇, π(t) = 2/(π(t² + (1−t)²)), t = sigmoid(λ/2)
        lambda l: np.exp(-l / 2) * 2 / (np.pi * (_sg(l / 2) ** 2 + _sg(-l / 2) ** 2)),
        lambda l: p_linear_uniform(l) * 2 / (np.pi * (_sg(l / 2) ** 2 + _sg(-l / 2) ** 2)),
    ),
    (
        "elbo_linear",
        lambda: L.elbo(LinearPath()),
        coeffs_linear,
        "eps",
        lambda l: np.ones_like(l),
        p_linear_uniform,
    ),
    (
        "elbo_cosine_velocity",
        lambda: L.elbo(CosinePath(), "velocity"),
        coeffs_cosine,
        "velocity",
        lambda l: np.ones_like(l),
        p_cosine_uniform,
    ),
    (
        "sigmoid_cosine_data",
        lambda: L.sigmoid(CosinePath(), 2.0, prediction="data"),
        coeffs_cosine,
        "data",
        lambda l: 1 / (1 + np.exp(l - 2.0)),
        p_cosine_uniform,
    ),
    (
        "min_snr_cosine",
        lambda: L.min_snr(CosinePath(), 5.0),
        coeffs_cosine,
        "eps",
        lambda l: sech(l / 2) * np.minimum(1.0, 5.0 * np.exp(-l)) / np.pi,
        p_cosine_uniform,
    ),
    # κ²_score = 1/σ²: w = 2p/σ² = t/(1−t) = e^{λ/2} on the linear path (derived by hand).
    (
        "score_linear",
        lambda: L.score_matching(LinearPath()),
        coeffs_linear,
        "score",
        lambda l: np.exp(l / 2),
        p_linear_uniform,
    ),
]


def _sg(z):
    return 1.0 / (1.0 + np.exp(-z))


def make_net(seed, dim=5):
    rng = np.random.default_rng(seed)
    w1 = jnp.asarray(rng.normal(size=(dim, dim)))
    b = jnp.asarray(rng.normal(size=dim))
    c = jnp.asarray(rng.normal(size=dim))

    def fn(t, x):
        return 2.0 * jnp.tanh(w1 @ x + 3.0 * t * b) + c * jnp.cos(t)

    return fn


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_per_sample_identity_against_closed_forms(case):
    """c(t)‖ŷ − y‖² = ½(w(λ)/p(λ))‖ε̂ − ε‖² for an arbitrary network output, per sample."""
    _, make, coeffs, kind, w, p = case
    obj = make()
    assert obj.prediction == kind
    fn = make_net(0)
    rng = np.random.default_rng(1)
    ts = np.array([0.013, 0.1, 0.37, 0.5, 0.71, 0.93, 0.987])
    xs, es = rng.normal(size=(len(ts), 5)), rng.normal(size=(len(ts), 5))
    got = np.asarray(
        jax.jit(jax.vmap(lambda x, t, e: L.loss_at(obj, fn, x, t, e)))(
            jnp.asarray(xs), jnp.asarray(ts), jnp.asarray(es)
        )
    )
    outs = np.asarray(
        jax.jit(jax.vmap(fn))(
            jnp.asarray(ts),
            jnp.asarray([coeffs(t)[0] * x + coeffs(t)[1] * e for t, x, e in zip(ts, xs, es)]),
        )
    )
    for i, t in enumerate(ts):
        c = coeffs(t)
        a, s = c[0], c[1]
        lam = 2 * np.log(a / s)
        x_t = a * xs[i] + s * es[i]
        e_hat = eps_hat_from(kind, outs[i], x_t, c)
        expected = 0.5 * w(lam) / p(lam) * np.sum((e_hat - es[i]) ** 2)
        np.testing.assert_allclose(got[i], expected, rtol=1e-10)


@pytest.mark.parametrize("kind", ["eps", "data", "v", "velocity", "score"])
@pytest.mark.parametrize("space", [None, "eps"])
def test_weighted_objective_realises_weighting(kind, space):
    """The Kingma–Gao factor realises w for every prediction kind and error space (logit-normal sampler)."""
    obj = L.weighted_objective(
        LinearPath(), kind, L.SigmoidWeighting(1.0), L.LogitNormal(M, S), space=space
    )
    fn = make_net(2)
    rng = np.random.default_rng(3)
    ts = np.array([0.05, 0.4, 0.8, 0.97])
    xs, es = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    xts = ts[:, None] * xs + (1 - ts[:, None]) * es
    got = np.asarray(
        jax.jit(jax.vmap(lambda x, t, e: L.loss_at(obj, fn, x, t, e)))(
            jnp.asarray(xs), jnp.asarray(ts), jnp.asarray(es)
        )
    )
    outs = np.asarray(jax.jit(jax.vmap(fn))(jnp.asarray(ts), jnp.asarray(xts)))
    for i, t in enumerate(ts):
        lam = 2 * np.log(t / (1 - t))
        e_hat = eps_hat_from(kind, outs[i], xts[i], coeffs_linear(t))
        expected = 0.5 * _sg(1.0 - lam) / npdf(lam, -2 * M, 4 * S**2) * np.sum((e_hat - es[i]) ** 2)
        np.testing.assert_allclose(got[i], expected, rtol=1e-10)


def test_negative_control_wrong_weighting_is_detected():
    """FM's per-sample loss is NOT ½(w/p)‖ε̂−ε‖² for the ε-MSE weighting: the identity test can fail."""
    obj = L.flow_matching()
    fn = make_net(0)
    t, x, e = 0.3, np.ones(5), np.linspace(-1, 1, 5)
    lam = 2 * np.log(t / (1 - t))
    x_t = t * x + (1 - t) * e
    e_hat = eps_hat_from(
        "velocity", np.asarray(fn(jnp.asarray(t), jnp.asarray(x_t))), x_t, coeffs_linear(t)
    )
    wrong = 0.5 * (0.25 * sech(lam / 4) ** 2) / p_linear_uniform(lam) * np.sum((e_hat - e) ** 2)
    got = float(L.loss_at(obj, fn, jnp.asarray(x), t, jnp.asarray(e)))
    assert abs(got - wrong) > 1e-3 * abs(got)


# ----------------------------------------------------------------------------------------------------------------
# implied_weighting
# ----------------------------------------------------------------------------------------------------------------

IMPLIED = [c for c in CASES if c[0] != "edm"] + [
    # EDM on a path wide enough that the truncated normal mass is < 1e-11.
    (
        "edm_wide",
        lambda: L.edm(EDMPath(1e-4, 1e4)),
        None,
        "data",
        lambda l: 8 * npdf(l, 2.4, 2.4**2) * (np.exp(-l) + 0.25),
        lambda l: npdf(l, 2.4, 2.4**2),
    ),
    (
        "sd3_shift3",
        lambda: L.sd3(mean=M, std=S, shift=3.0),
        None,
        "velocity",
        # λ' = λ − 2 log 3: a shifted logit-normal, λ ~ N(−2m − 2 log 3, 4s²)
        lambda l: 2 * (1 + np.exp(-l / 2)) ** 2 * npdf(l, -2 * M - 2 * np.log(3), 4 * S**2),
        lambda l: npdf(l, -2 * M - 2 * np.log(3), 4 * S**2),
    ),
]


@pytest.mark.parametrize("case", IMPLIED, ids=[c[0] for c in IMPLIED])
def test_implied_weighting_matches_table(case):
    _, make, _, _, w, p = case
    iw = L.implied_weighting(make())
    lam = np.linspace(-12.0, 12.0, 97)
    got_w, got_p = jax.jit(jax.vmap(lambda l: (iw.weight(l), iw.density(l))))(jnp.asarray(lam))
    np.testing.assert_allclose(got_w, w(lam), rtol=1e-9)
    np.testing.assert_allclose(got_p, p(lam), rtol=1e-9)


def test_fm_linear_weighting_is_exactly_exp():
    iw = L.implied_weighting(L.flow_matching())
    lam = jnp.linspace(-20.0, 20.0, 41)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(iw.weight))(lam), np.exp(-np.asarray(lam) / 2), rtol=1e-10
    )


def test_edm_default_path_truncation():
    """On EDMPath() the λ-normal is truncated to [λ(0), λ(1)]: w = closed form / Z, Z from scipy."""
    obj = L.edm()
    iw = L.implied_weighting(obj)
    lam_lo, lam_hi = -2 * np.log(80.0), -2 * np.log(0.002)
    z = scipy.stats.norm.cdf(lam_hi, 2.4, 2.4) - scipy.stats.norm.cdf(lam_lo, 2.4, 2.4)
    assert 1 - z > 1e-6  # the truncation is visible at this precision
    lam = np.linspace(-8.0, 12.0, 41)
    expected = 8 * npdf(lam, 2.4, 2.4**2) * (np.exp(-lam) + 0.25) / z
    f = jax.jit(jax.vmap(lambda l: (iw.weight(l), iw.density(l))))
    np.testing.assert_allclose(f(jnp.asarray(lam))[0], expected, rtol=1e-9)
    outside_w, outside_p = f(jnp.asarray([-9.0, 13.0]))
    assert np.all(np.asarray(outside_w) == 0.0) and np.all(np.asarray(outside_p) == 0.0)


DENSITY_CASES = {
    "fm_linear": lambda: L.flow_matching(t_eps=0.0),
    "ddpm_cosine": lambda: L.ddpm(CosinePath(), t_eps=0.0),
    "ddpm_vp": lambda: L.ddpm(VPPath(), t_eps=0.0),
    "edm": lambda: L.edm(t_eps=0.0),
    "sd3_ln": lambda: L.sd3(mean=M, std=S, t_eps=0.0),
    "sd3_mode": lambda: L.sd3(sampler="mode", t_eps=0.0),
    "sd3_cosmap_shift": lambda: L.sd3(sampler="cosmap", shift=3.0, t_eps=0.0),
    "logsnr_normal_vp": lambda: L.Objective(
        VPPath(), "eps", time_sampler=L.LogSNRNormal(1.0, 3.0), t_eps=0.0
    ),
}


@pytest.mark.parametrize("name", list(DENSITY_CASES))
def test_density_integrates_to_one(name):
    obj = DENSITY_CASES[name]()
    iw = L.implied_weighting(obj)
    dens = jax.jit(lambda l: iw.density(l))
    lo, hi = obj.t_range
    lam_lo = max(float(obj.path.log_snr(lo)), -60.0)
    lam_hi = min(float(obj.path.log_snr(hi)), 60.0)
    total, err = scipy.integrate.quad(lambda l: float(dens(l)), lam_lo, lam_hi, limit=200)
    mass_cut = 1e-5 if name == "ddpm_vp" else 0.0  # Uniform(0, 1) puts mass 1e-5 beyond VP's t_max
    np.testing.assert_allclose(total, 1.0 - mass_cut, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# Time samplers
# ----------------------------------------------------------------------------------------------------------------


def _samples(sampler, path, n=20000, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jax.jit(jax.vmap(lambda k: sampler.sample(k, path)))(keys))


def test_logit_normal_cdf_and_density():
    sampler, path = L.LogitNormal(M, S), LinearPath()
    tau = 1.0 - _samples(sampler, path, n=5000)  # SD3 time
    cdf = lambda x: scipy.stats.norm.cdf((np.log(x / (1 - x)) - M) / S)
    assert scipy.stats.kstest(tau, cdf).pvalue > 1e-3
    # negative control: the mirrored convention (t = sigmoid(n)) is rejected
    assert scipy.stats.kstest(1.0 - tau, cdf).pvalue < 1e-6
    t = np.linspace(0.01, 0.99, 50)
    tau = 1 - t
    expected = npdf(np.log(tau / (1 - tau)), M, S**2) / (tau * (1 - tau))
    got = jax.jit(jax.vmap(lambda s: sampler.density(s, path)))(jnp.asarray(t))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def _g_mode(u, s):
    return u + s * (np.cos(np.pi * u / 2) ** 2 - 1 + u)


@pytest.mark.parametrize("scale", [-1.0, 0.5, 1.29, L.MODE_SCALE_MAX])
def test_mode_sampler(scale):
    sampler, path = L.ModeSampler(scale), LinearPath()
    u = np.linspace(0, 1, 2001)
    t = np.asarray(jax.jit(jax.vmap(lambda v: sampler.icdf(v, path)))(jnp.asarray(u)))
    assert np.all(np.diff(t) >= 0) and t[0] == 0 and abs(t[-1] - 1) < 1e-15
    # SD3 form: τ = f_mode(u) = 1 − u − s(cos²(πu/2) − 1 + u) is 1 − t(u)
    np.testing.assert_allclose(
        1 - t, 1 - u - scale * (np.cos(np.pi * u / 2) ** 2 - 1 + u), atol=1e-15
    )
    if scale < L.MODE_SCALE_MAX:
        np.testing.assert_allclose(
            float(sampler.density(0.5, path)), 1 / (1 - scale * (np.pi / 2 - 1)), rtol=1e-10
        )
    # density integrates to 1 and matches the CDF (brentq inverse of g, independent of diffjax's bisection)
    dens = jax.jit(lambda s: sampler.density(s, path))
    total, _ = scipy.integrate.quad(lambda s: float(dens(s)), 0, 1, points=[0.5], limit=200)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    samples = _samples(sampler, path, n=2000)
    cdf = np.vectorize(
        lambda s: scipy.optimize.brentq(lambda v: _g_mode(v, scale) - s, 0, 1, xtol=1e-14)
    )
    assert scipy.stats.kstest(samples, cdf).pvalue > 1e-3


@pytest.mark.parametrize("scale", [-1.05, L.MODE_SCALE_MAX + 0.05, 3.0])
def test_mode_sampler_refuses_non_monotone_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        L.ModeSampler(scale)
    with pytest.raises(ValueError, match="scale"):
        L.sd3(sampler="mode", mode_scale=scale)


def test_cosmap_log_snr_equals_cosine_schedule():
    sampler, lin = L.CosMap(), LinearPath()
    u = np.linspace(0.01, 0.99, 99)
    h = 1e-6
    f = jax.jit(jax.vmap(lambda v: (sampler.icdf(v, lin), lin.log_snr(sampler.icdf(v, lin)))))
    t, lam = (np.asarray(a) for a in f(jnp.asarray(u)))
    np.testing.assert_allclose(lam, 2 * np.log(np.tan(np.pi * u / 2)), rtol=1e-12, atol=1e-12)
    # density = 1/t'(u), t'(u) by central differences
    tp = (np.asarray(f(jnp.asarray(u + h))[0]) - np.asarray(f(jnp.asarray(u - h))[0])) / (2 * h)
    dens = np.asarray(jax.jit(jax.vmap(lambda s: sampler.density(s, lin)))(jnp.asarray(t)))
    np.testing.assert_allclose(dens, 1 / tp, rtol=1e-7)
    np.testing.assert_allclose(dens, 2 / (np.pi * (t**2 + (1 - t) ** 2)), rtol=1e-12)


def test_shift_identity_and_density():
    s = 3.0
    base, lin = L.LogitNormal(M, S), LinearPath()
    shifted = L.Shifted(base, s)
    u = jnp.linspace(0.01, 0.99, 41)
    f = jax.jit(jax.vmap(lambda v: (base.icdf(v, lin), shifted.icdf(v, lin))))
    t, t_s = (np.asarray(a) for a in f(u))
    lam, lam_s = 2 * np.log(t / (1 - t)), 2 * np.log(t_s / (1 - t_s))
    np.testing.assert_allclose(lam_s, lam - 2 * np.log(s), rtol=1e-12, atol=1e-12)
    # SD3's form in τ = 1 − t: τ' = sτ/(1 + (s − 1)τ)
    tau, tau_s = 1 - t, 1 - t_s
    np.testing.assert_allclose(tau_s, s * tau / (1 + (s - 1) * tau), rtol=1e-12)
    dens = jax.jit(lambda t: shifted.density(t, lin))
    total, _ = scipy.integrate.quad(lambda t: float(dens(t)), 0, 1, limit=200)
    np.testing.assert_allclose(total, 1.0, atol=1e-8)
    with pytest.raises(ValueError, match="shift"):
        L.Shifted(base, 0.0)


def test_log_snr_normal_samples_truncated_normal():
    path = VPPath()
    sampler = L.LogSNRNormal(2.0, 4.0)
    t = _samples(sampler, path, n=5000)
    lam = np.asarray(jax.jit(jax.vmap(path.log_snr))(jnp.asarray(t)))
    lo, hi = [float(v) for v in path.log_snr_range()]
    assert lam.min() >= lo - 1e-9 and lam.max() <= hi + 1e-9
    dist = scipy.stats.truncnorm((lo - 2.0) / 4.0, (hi - 2.0) / 4.0, loc=2.0, scale=4.0)
    assert scipy.stats.kstest(lam, dist.cdf).pvalue > 1e-3
    t_grid = np.linspace(0.05, 0.95, 19)
    lam_grid, dl, got = jax.jit(
        jax.vmap(lambda s: (path.log_snr(s), path.d_log_snr(s), sampler.density(s, path)))
    )(jnp.asarray(t_grid))
    np.testing.assert_allclose(got, dist.pdf(lam_grid) * dl, rtol=1e-10)


def test_uniform_sampler():
    path = LinearPath()
    t = _samples(L.Uniform(0.2, 0.7), path, n=4000)
    assert t.min() >= 0.2 and t.max() <= 0.7
    assert scipy.stats.kstest(t, scipy.stats.uniform(0.2, 0.5).cdf).pvalue > 1e-3
    assert float(L.Uniform(0.2, 0.7).density(0.5, path)) == pytest.approx(2.0)
    assert float(L.Uniform(0.2, 0.7).density(0.8, path)) == 0.0
    with pytest.raises(ValueError):
        L.Uniform(0.5, 0.2)


# ----------------------------------------------------------------------------------------------------------------
# Schedule invariance and Monte Carlo
# ----------------------------------------------------------------------------------------------------------------


def test_elbo_schedule_invariance():
    """ELBO preset: equal λ endpoints ⇒ equal expectation over t, for ε̂ a fixed function of (λ, x_t/α)."""
    vp = VPPath()
    lo_vp, hi_vp = 0.0, vp.t_max
    lam0, lam1 = float(vp.log_snr(lo_vp)), float(vp.log_snr(hi_vp))
    lin = LogSNRPath(lambda t: lam0 + (lam1 - lam0) * t)
    rng = np.random.default_rng(5)
    x, e = jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.normal(size=3))
    w = jnp.asarray(rng.normal(size=(3, 3)))

    def g(lam, z):  # an arbitrary ε-predictor in (λ, x_t/α)
        return jnp.tanh(w @ z * 0.3 + 0.1 * lam)

    def model_for(path):
        return lambda t, x_t: g(path.log_snr(t), x_t / path.alpha(t))

    values = []
    for path in (vp, lin):
        obj = L.elbo(path, t_eps=0.0)
        f = jax.jit(lambda t, obj=obj, path=path: L.loss_at(obj, model_for(path), x, t, e))
        lo, hi = obj.t_range
        val, _ = scipy.integrate.quad(lambda t: float(f(t)), lo, hi, limit=400, epsrel=1e-11)
        values.append(val)
    direct, _ = scipy.integrate.quad(
        lambda l: 0.5 * float(jnp.sum((g(l, x + jnp.exp(-l / 2) * e) - e) ** 2)),
        lam0,
        lam1,
        epsrel=1e-11,
        limit=200,
    )
    np.testing.assert_allclose(values[0], direct, rtol=1e-8)
    np.testing.assert_allclose(values[1], direct, rtol=1e-8)


def test_batch_loss_plain_and_stratified():
    obj = L.sd3(mean=M, std=S)
    fn = make_net(7, dim=2)
    xs = jnp.asarray(np.random.default_rng(0).normal(size=(4096, 2)))
    key = jax.random.key(3)

    @jax.jit
    def run(xs, key, key2):
        keys = jax.random.split(key, xs.shape[0])
        per = jax.vmap(lambda x, k: L.loss(obj, fn, x, k))(xs, keys)
        plain = L.batch_loss(obj, fn, xs, key)
        strat = L.batch_loss(obj, fn, xs, key2, stratified=True)
        return per, plain, strat

    per, plain, strat = run(xs, key, jax.random.key(4))
    np.testing.assert_allclose(plain, jnp.mean(per), rtol=1e-12)
    se = float(jnp.std(per)) / math.sqrt(xs.shape[0])
    assert abs(float(strat) - float(plain)) < 5 * se * math.sqrt(2)


def test_draw_clips_to_t_range():
    obj = L.flow_matching(t_eps=0.1)
    keys = jax.random.split(jax.random.key(0), 500)
    ts = jax.jit(jax.vmap(lambda k: L.draw(obj, k, jnp.zeros(2))[0]))(keys)
    assert float(ts.min()) >= 0.1 and float(ts.max()) <= 0.9
    assert obj.t_range == (0.1, 0.9)


# ----------------------------------------------------------------------------------------------------------------
# jit / vmap / grad agree with eager; errors
# ----------------------------------------------------------------------------------------------------------------


def _mlp(params, t, x):
    w, b = params
    return jnp.tanh(w @ x + b * t)


def test_transforms_agree_with_eager():
    make = lambda: L.sigmoid(CosinePath(), prediction="velocity", time_sampler=L.ModeSampler())
    obj = make()
    rng = np.random.default_rng(0)
    params = (jnp.asarray(rng.normal(size=(3, 3))), jnp.asarray(rng.normal(size=3)))
    x = jnp.asarray(rng.normal(size=3))
    key = jax.random.key(11)

    def f(params, x, key):
        return L.loss(obj, lambda t, z: _mlp(params, t, z), x, key)

    eager = f(params, x, key)
    fj = jax.jit(f)
    np.testing.assert_allclose(fj(params, x, key), eager, rtol=1e-12)
    g_eager = jax.grad(f)(params, x, key)
    g_jit = jax.jit(jax.grad(f))(params, x, key)
    for a, b in zip(jax.tree_util.tree_leaves(g_eager), jax.tree_util.tree_leaves(g_jit)):
        np.testing.assert_allclose(a, b, rtol=1e-10)
    # grad against central finite differences in the bias
    db = jnp.asarray([1.0, -0.5, 0.25])
    h = 1e-6
    fd = (
        fj((params[0], params[1] + h * db), x, key) - fj((params[0], params[1] - h * db), x, key)
    ) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(g_eager[1], db), fd, rtol=1e-6)
    xs = jnp.stack([x, 2 * x, -x])
    keys = jax.random.split(key, 3)
    vm = jax.jit(jax.vmap(f, in_axes=(None, 0, 0)))(params, xs, keys)
    loop = jnp.stack([fj(params, xs[i], keys[i]) for i in range(3)])
    np.testing.assert_allclose(vm, loop, rtol=1e-12)
    # the objective itself passes through jit as an argument
    g = eqx.filter_jit(lambda obj, x, key: L.loss(obj, lambda t, z: _mlp(params, t, z), x, key))
    np.testing.assert_allclose(g(obj, x, key), eager, rtol=1e-12)


def test_unknown_kinds_and_samplers():
    with pytest.raises(ValueError, match="prediction"):
        L.Objective(LinearPath(), "noise")
    with pytest.raises(ValueError, match="space"):
        L.Objective(LinearPath(), "eps", space="x0")
    with pytest.raises(ValueError, match="sampler"):
        L.sd3(sampler="lognorm")
    with pytest.raises(ValueError, match="prediction"):
        L.weighted_objective(LinearPath(), "flow", L.ELBOWeighting())


def test_shape_mismatch():
    obj = L.flow_matching()
    with pytest.raises(ValueError, match="shape"):
        jax.jit(lambda x, k: L.loss(obj, lambda t, z: z[:2], x, k))(jnp.ones(3), jax.random.key(0))
    with pytest.raises(ValueError, match="shape"):
        jax.eval_shape(
            lambda xs, k: L.batch_loss(obj, lambda t, z: jnp.sum(z), xs, k),
            jnp.ones((4, 3)),
            jax.random.key(0),
        )


def test_time_outside_unit_interval_errors():
    obj = L.flow_matching()
    fn = lambda t, x: x
    with pytest.raises(Exception, match=r"t must lie in \[0"):
        L.loss_at(obj, fn, jnp.ones(2), 1.5, jnp.ones(2))
    with pytest.raises(Exception, match=r"t must lie in \[0"):
        jax.jit(lambda t: L.loss_at(obj, fn, jnp.ones(2), t, jnp.ones(2)))(-0.1)
    with pytest.raises(Exception, match=r"t must lie in \[0"):
        L.LogitNormal().density(1.2, LinearPath())


def test_score_matching_needs_sigma_positive():
    with pytest.raises(ValueError, match="sigma"):
        L.score_matching(LinearPath(), t_eps=0.0)
    L.score_matching(VPPath(), t_eps=0.0)  # t_max = 1 − 1e-5 < 1


def test_all_names_exported():
    for name in L.__all__:
        assert hasattr(L, name), name
