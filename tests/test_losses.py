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
from diffjax.kinds import Eps, as_kind
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
        "vdm_linear",
        lambda: L.vdm(LinearPath()),
        coeffs_linear,
        "eps",
        lambda l: np.ones_like(l),
        p_linear_uniform,
    ),
    (
        "vdm_cosine_velocity",
        lambda: L.vdm(CosinePath(), "velocity"),
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
    assert obj.prediction.name == kind and obj.prediction == as_kind(kind)
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
    "fm_linear": lambda: L.flow_matching(margin=0.0),
    "ddpm_cosine": lambda: L.ddpm(CosinePath(), margin=0.0),
    "ddpm_vp": lambda: L.ddpm(VPPath(), margin=0.0),
    "edm": lambda: L.edm(margin=0.0),
    "sd3_ln": lambda: L.sd3(mean=M, std=S, margin=0.0),
    "sd3_mode": lambda: L.sd3(sampler="mode", margin=0.0),
    "sd3_cosmap_shift": lambda: L.sd3(sampler="cosmap", shift=3.0, margin=0.0),
    "logsnr_normal_vp": lambda: L.Objective(
        VPPath(), "eps", time_sampler=L.LogSNRNormal(1.0, 3.0), margin=0.0
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


def test_vdm_schedule_invariance():
    """VDM preset: equal λ endpoints ⇒ equal expectation over t, for ε̂ a fixed function of (λ, x_t/α)."""
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
        obj = L.vdm(path, margin=0.0)
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


def test_draw_truncates_to_t_range():
    """t ~ U(0, 1) truncated to [0.1, 0.9]: uniform there, no point mass at the ends (clipping would put 10%
    of the draws on each end), and the loss carries Z = 0.8."""
    obj = L.flow_matching(margin=0.1)
    keys = jax.random.split(jax.random.key(0), 4000)
    ts = np.asarray(jax.jit(jax.vmap(lambda k: L.draw(obj, k, jnp.zeros(2))[0]))(keys))
    assert ts.min() >= 0.1 and ts.max() <= 0.9
    assert obj.t_range == (0.1, 0.9)
    assert np.mean((ts == 0.1) | (ts == 0.9)) == 0.0
    assert scipy.stats.kstest(ts, scipy.stats.uniform(0.1, 0.8).cdf).pvalue > 1e-3
    np.testing.assert_allclose(float(obj.mass()), 0.8, rtol=1e-14)


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
        L.score_matching(LinearPath(), margin=0.0)
    L.score_matching(VPPath(), margin=0.0)  # t_max = 1 − 1e-5 < 1


def test_all_names_exported():
    for name in L.__all__:
        assert hasattr(L, name), name


# ----------------------------------------------------------------------------------------------------------------
# Truncated time sampling: every preset's expectation is its documented integral (bug 2: clipping biased it)
# ----------------------------------------------------------------------------------------------------------------

D = 3  # data dimension: x ~ N(0, I_D)
LO, HI = (
    1e-5,
    1.0 - 1e-5,
)  # every default preset's t_range here (margin 1e-5; VPPath's t_max = 1 − 1e-5 too)


@pytest.fixture
def f32():
    """Run one test in float32 (this module enables float64 for everything else)."""
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", old)


# (α, σ, α̇, σ̇) in jnp for the exact models, written from the formula sheet (§1.4), not from diffjax.
def jc_linear(t):
    return t, 1.0 - t, jnp.ones_like(t), -jnp.ones_like(t)


def jc_cosine(t):
    h = 0.5 * jnp.pi
    return jnp.sin(h * t), jnp.cos(h * t), h * jnp.cos(h * t), -h * jnp.sin(h * t)


def jc_vp(t, bmin=0.1, bmax=20.0):
    s = 1.0 - t
    gamma = 0.5 * s**2 * (bmax - bmin) + s * bmin
    beta = bmin + s * (bmax - bmin)
    a = jnp.exp(-0.5 * gamma)
    sig = jnp.sqrt(-jnp.expm1(-gamma))
    da = 0.5 * beta * a
    return a, sig, da, -a * da / sig


def jc_edm(t, smin=0.002, smax=80.0, rho=7.0):
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    base = a + t * (b - a)
    return jnp.ones_like(t), base**rho, jnp.zeros_like(t), rho * base ** (rho - 1) * (b - a)


# λ(t) in numpy and the VP inverse, for the integration ranges and the closed-form weightings
def lam_linear(t):
    return 2.0 * scipy.special.logit(t)


def lam_cosine(t):
    return 2.0 * np.log(np.tan(0.5 * np.pi * t))


def _vp_gamma(t, bmin=0.1, bmax=20.0):
    s = 1.0 - t
    return 0.5 * s**2 * (bmax - bmin) + s * bmin


def lam_vp(t):
    return -np.log(np.expm1(_vp_gamma(t)))


def beta_vp_of_lam(lam, bmin=0.1, bmax=20.0):  # β at papers' time s(λ) = 1 − t(λ)
    s = (-bmin + np.sqrt(bmin**2 + 2.0 * (bmax - bmin) * np.logaddexp(0.0, -lam))) / (bmax - bmin)
    return bmin + s * (bmax - bmin)


def lam_edm(t, smin=0.002, smax=80.0, rho=7.0):
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return -2.0 * rho * np.log(a + t * (b - a))


def exact_model(kind, jc):
    """The Bayes-optimal prediction of ``kind`` for x ~ N(0, I): ε̂ = σx_t/(α² + σ²), x̂ = αx_t/(α² + σ²)."""

    def fn(t, x_t):
        a, s, da, ds = jc(t)
        n = a * a + s * s
        e, x = s * x_t / n, a * x_t / n
        return {
            "eps": e,
            "data": x,
            "v": a * e - s * x,
            "velocity": da * x + ds * e,
            "score": -x_t / n,
        }[kind]

    return fn


def _mode_g(u, s):
    return u + s * (np.cos(0.5 * np.pi * u) ** 2 - 1.0 + u)


def _mode_density(t, s):  # π(t) = 1/g'(g⁻¹(t)), g⁻¹ by brentq
    u = scipy.optimize.brentq(lambda v: _mode_g(v, s) - t, 0.0, 1.0, xtol=1e-15, rtol=1e-15)
    return 1.0 / (1.0 + s * (1.0 - 0.5 * np.pi * np.sin(np.pi * u)))


def _t_lin(lam):
    return scipy.special.expit(0.5 * lam)


def _shift_density(dens, shift):  # π'(t') = π(t)·s/(1 + (s − 1)t')², t = st'/(1 + (s − 1)t')
    return lambda tp: (
        dens(shift * tp / (1 + (shift - 1) * tp)) * shift / (1 + (shift - 1) * tp) ** 2
    )


_EDM_Z = scipy.stats.norm.cdf(-2 * np.log(0.002), 2.4, 2.4) - scipy.stats.norm.cdf(
    -2 * np.log(80.0), 2.4, 2.4
)
_cosmap_density = lambda t: 2.0 / (np.pi * (t**2 + (1 - t) ** 2))
_mode_129 = np.vectorize(lambda t: _mode_density(t, 1.29))

# (id, objective at its DEFAULT margin, prediction kind, jnp coefficients, numpy λ(t), closed-form w(λ))
PRESETS = [
    (
        "ddpm_vp",
        lambda: L.ddpm(),
        "eps",
        jc_vp,
        lam_vp,
        lambda l: 2.0 * scipy.special.expit(-l) / beta_vp_of_lam(l),
    ),
    ("vdm_vp", lambda: L.vdm(), "eps", jc_vp, lam_vp, lambda l: np.ones_like(l)),
    ("vdm_linear", lambda: L.vdm(LinearPath()), "eps", jc_linear, lam_linear, np.ones_like),
    (
        "vdm_linear_velocity",
        lambda: L.vdm(LinearPath(), "velocity"),
        "velocity",
        jc_linear,
        lam_linear,
        np.ones_like,
    ),
    (
        "v_prediction",
        lambda: L.v_prediction(),
        "v",
        jc_cosine,
        lam_cosine,
        lambda l: 2 / np.pi * np.exp(-l / 2),
    ),
    (
        "flow_matching",
        lambda: L.flow_matching(),
        "velocity",
        jc_linear,
        lam_linear,
        lambda l: np.exp(-l / 2),
    ),
    (
        "score_matching",
        lambda: L.score_matching(),
        "score",
        jc_vp,
        lam_vp,
        lambda l: 2.0 / beta_vp_of_lam(l),  # 2p/σ² = 2/(σ²λ̇) = 2/β
    ),
    (
        "edm",
        lambda: L.edm(),
        "data",
        jc_edm,
        lam_edm,
        lambda l: 8 * npdf(l, 2.4, 2.4**2) * (np.exp(-l) + 0.25) / _EDM_Z,
    ),
    (
        "sd3_logit_normal",
        lambda: L.sd3(),
        "velocity",
        jc_linear,
        lam_linear,
        lambda l: 2 * (1 + np.exp(-l / 2)) ** 2 * npdf(l, 0.0, 4.0),
    ),
    (
        "sd3_mode",
        lambda: L.sd3(sampler="mode"),
        "velocity",
        jc_linear,
        lam_linear,
        lambda l: np.exp(-l / 2) * _mode_129(_t_lin(l)),
    ),
    (
        "sd3_cosmap",
        lambda: L.sd3(sampler="cosmap"),
        "velocity",
        jc_linear,
        lam_linear,
        lambda l: np.exp(-l / 2) * _cosmap_density(_t_lin(l)),
    ),
    (
        "sd3_uniform",
        lambda: L.sd3(sampler="uniform"),
        "velocity",
        jc_linear,
        lam_linear,
        lambda l: np.exp(-l / 2),
    ),
    (
        "sd3_shift3",
        lambda: L.sd3(shift=3.0),
        "velocity",
        jc_linear,
        lam_linear,
        lambda l: 2 * (1 + np.exp(-l / 2)) ** 2 * npdf(l, -2 * np.log(3.0), 4.0),
    ),
    (
        "sd3_mode_shift3",
        lambda: L.sd3(sampler="mode", shift=3.0),
        "velocity",
        jc_linear,
        lam_linear,
        lambda l: np.exp(-l / 2) * _shift_density(_mode_129, 3.0)(_t_lin(l)),
    ),
    (
        "sd3_cosmap_shift3",
        lambda: L.sd3(sampler="cosmap", shift=3.0),
        "velocity",
        jc_linear,
        lam_linear,
        lambda l: np.exp(-l / 2) * _shift_density(_cosmap_density, 3.0)(_t_lin(l)),
    ),
    (
        "sigmoid",
        lambda: L.sigmoid(),
        "eps",
        jc_cosine,
        lam_cosine,
        lambda l: scipy.special.expit(2.0 - l),
    ),
    (
        "min_snr",
        lambda: L.min_snr(),
        "eps",
        jc_cosine,
        lam_cosine,
        lambda l: sech(l / 2) * np.minimum(1.0, 5.0 * np.exp(-l)) / np.pi,
    ),
    (
        "weighted_objective",
        lambda: L.weighted_objective(LinearPath(), "data", L.SigmoidWeighting(1.0)),
        "data",
        jc_linear,
        lam_linear,
        lambda l: scipy.special.expit(1.0 - l),
    ),
    # a sampler whose tails are far thinner than w: per-sample factors up to ~1e8 at the ends. (With SD3's
    # std = 0.8 the tail beyond 1 − F = 1e-16 still carries 6e-6 of the integral: float64's u cannot reach it.)
    (
        "weighted_objective_logit_normal_eps",
        lambda: L.weighted_objective(
            VPPath(), "velocity", L.SigmoidWeighting(1.0), L.LogitNormal(M, 2.0), space="eps"
        ),
        "velocity",
        jc_vp,
        lam_vp,
        lambda l: scipy.special.expit(1.0 - l),
    ),
]

_U_POINTS = sorted(
    {*(10.0 ** -np.arange(1, 10)), *(1 - 10.0 ** -np.arange(1, 10)), 0.25, 0.5, 0.75}
)


def _quad_u(f, points=_U_POINTS):
    val, err = scipy.integrate.quad(
        f, 0.0, 1.0, points=points, limit=1000, epsabs=0.0, epsrel=1e-11
    )
    return val


def _expected_loss_given_t(obj, fn, t):
    """E_{x ~ N(0, I_D), ε}[loss_at(t)] exactly: with the exact model ŷ − y = a·x + b·ε coordinate-wise, so
    E‖ŷ − y‖² = D(a² + b²), which is loss_at at (x, ε) = (1, 0) plus at (0, 1)."""
    one, zero = jnp.ones(D), jnp.zeros(D)
    return L.loss_at(obj, fn, one, t, zero) + L.loss_at(obj, fn, zero, t, one)


def _library_expectation(obj, fn):
    """∫_0^1 Z·E[loss_at(time_at(u))] du: the expectation of ``loss`` over the library's own truncated draw."""
    f = jax.jit(lambda u: obj.mass() * _expected_loss_given_t(obj, fn, obj.time_at(u)))
    return _quad_u(lambda u: float(f(u)))


def _documented(w, lam_lo, lam_hi):
    """½∫ w(λ)·D·sigmoid(λ) dλ over [λ(lo), λ(hi)] (E‖ε̂ − ε‖² = D·sigmoid(λ) for N(0, I) data)."""
    pts = [p for p in (-10.0, -5.0, -2.0, 0.0, 2.0, 5.0, 10.0) if lam_lo < p < lam_hi]
    val, _ = scipy.integrate.quad(
        lambda l: 0.5 * float(w(np.float64(l))) * D * scipy.special.expit(l),
        lam_lo,
        lam_hi,
        points=pts,
        limit=500,
        epsabs=0.0,
        epsrel=1e-11,
    )
    return val


@pytest.mark.parametrize("case", PRESETS, ids=[c[0] for c in PRESETS])
def test_preset_expected_loss_is_documented_integral(case):
    """E[loss] over t (through the library's truncated draw) and (x, ε) equals ½∫ w(λ)·E‖ε̂ − ε‖² dλ on
    [λ(lo), λ(hi)] with the closed-form w(λ), for every preset at its default margin."""
    _, make, kind, jc, lam, w = case
    obj = make()
    assert obj.t_range == pytest.approx((LO, HI), abs=1e-15) and obj.margin == 1e-5
    got = _library_expectation(obj, exact_model(kind, jc))
    want = _documented(w, lam(LO), lam(HI))
    np.testing.assert_allclose(got, want, rtol=1e-8)


@pytest.mark.parametrize(
    "path,lam,jc,bias",
    [(LinearPath(), lam_linear, jc_linear, D), (VPPath(), lam_vp, jc_vp, D / 2)],
    ids=["linear", "vp"],
)
def test_negative_control_clipped_sampling_is_biased(path, lam, jc, bias):
    """The former sampling, t = clip(π⁻¹(u), lo, hi) with no factor Z, fails the check above for the VDM loss:
    the clipped mass (1e-5 at the data end) meets c(t) ≈ 1/(2·margin) there and adds ≈ D (linear), D/2 (VP)."""
    obj = L.vdm(path)
    fn = exact_model("eps", jc)
    lo, hi = obj.t_range
    f = jax.jit(
        lambda u: _expected_loss_given_t(
            obj, fn, jnp.clip(obj.time_sampler.icdf(u, obj.path), lo, hi)
        )
    )
    clipped = _quad_u(lambda u: float(f(u)), points=sorted({*_U_POINTS, lo, hi}))
    want = _documented(np.ones_like, lam(LO), lam(HI))
    assert (
        abs(clipped - want) > 1e-2 * want
    )  # would fail test_preset_expected_loss_is_documented_integral
    np.testing.assert_allclose(clipped - want, bias, rtol=2e-3)
    np.testing.assert_allclose(_library_expectation(obj, fn), want, rtol=1e-8)  # the fix


def test_loss_is_mass_times_loss_at_of_draw():
    """``loss`` = Z·loss_at at the (t, ε) of ``draw``, with t inside t_range; ``time_at`` maps [0, 1] onto it."""
    fn = make_net(0, dim=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=3))
    for obj in (L.sd3(sampler="mode", shift=3.0), L.flow_matching(margin=0.2)):
        lo, hi = obj.t_range

        @jax.jit
        @jax.vmap
        def both(key, obj=obj):
            t, eps = L.draw(obj, key, x)
            return t, L.loss(obj, fn, x, key), obj.mass() * L.loss_at(obj, fn, x, t, eps)

        ts, got, want = both(jax.random.split(jax.random.key(0), 3))
        assert np.all((lo <= np.asarray(ts)) & (np.asarray(ts) <= hi))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-13)
        ends = jax.jit(jax.vmap(obj.time_at))(jnp.array([0.0, 0.5, 1.0]))
        np.testing.assert_allclose(np.asarray(ends)[[0, 2]], [lo, hi], rtol=1e-12)
        assert lo < float(ends[1]) < hi
    # Z for the logit-normal against scipy: Φ((logit hi + m)/s) − Φ((logit lo + m)/s)
    obj = L.sd3(mean=M, std=S, margin=0.05)
    z = np.diff(scipy.stats.norm.cdf((scipy.special.logit([0.05, 0.95]) + M) / S))[0]
    np.testing.assert_allclose(float(obj.mass()), z, rtol=1e-13)


def test_truncated_logit_normal_draws(f32):
    """draw's t follows π truncated to t_range (KS against scipy's truncated CDF), float32."""
    obj = L.sd3(mean=M, std=S, margin=0.2)
    keys = jax.random.split(jax.random.key(1), 4000)
    ts = np.asarray(jax.jit(jax.vmap(lambda k: L.draw(obj, k, jnp.zeros(2))[0]))(keys), np.float64)
    assert ts.dtype == np.float64 and ts.min() >= 0.2 and ts.max() <= 0.8
    F = lambda t: scipy.stats.norm.cdf((scipy.special.logit(t) + M) / S)
    cdf = lambda t: (F(np.clip(t, 0.2, 0.8)) - F(0.2)) / (F(0.8) - F(0.2))
    assert scipy.stats.kstest(ts, cdf).pvalue > 1e-3
    # negative control: the untruncated sampler is rejected
    assert scipy.stats.kstest(ts, F).pvalue < 1e-6


def _velocity_model_linear():
    return exact_model("velocity", jc_linear)


def _mc(obj, fn, n, seed):
    xs = jax.random.normal(jax.random.key(seed), (n, D))
    key = jax.random.key(seed + 1)

    @jax.jit
    def run(xs, key):
        per = jax.vmap(lambda x, k: L.loss(obj, fn, x, k))(xs, jax.random.split(key, n))
        return (
            per,
            L.batch_loss(obj, fn, xs, key),
            L.batch_loss(obj, fn, xs, jax.random.key(seed + 2), stratified=True),
        )

    per, plain, strat = run(xs, key)
    assert per.dtype == jnp.float32
    np.testing.assert_allclose(float(plain), float(jnp.mean(per)), rtol=1e-5)
    se = float(jnp.std(per)) / math.sqrt(n)
    return float(plain), float(strat), se


def test_batch_loss_monte_carlo_truncated(f32):
    """Monte Carlo, float32: flow matching on the linear path with margin 0.1 and the exact model. E‖û − u‖² =
    D/(t² + (1 − t)²), so E[loss] = ∫_{0.1}^{0.9} D/(t² + (1 − t)²) dt = 2D·arctan(0.8) (t = 0 noise, 1 data).
    Tolerance 4 standard errors (2^15 examples); clipping (+0.2·D/0.82) or dropping Z (÷0.8) would be > 25 SE off."""
    obj = L.flow_matching(margin=0.1)
    plain, strat, se = _mc(obj, _velocity_model_linear(), 2**15, 0)
    want = 2 * D * math.atan(0.8)
    assert abs(plain - want) < 4 * se, (plain, want, se)
    assert abs(strat - want) < 4 * se, (strat, want, se)  # stratified: variance ≤ plain
    for wrong in (want + 0.2 * D / 0.82, want / 0.8):
        assert abs(wrong - want) > 25 * se


def test_batch_loss_monte_carlo_sd3_default(f32):
    """Monte Carlo, float32, SD3 at its defaults (logit-normal(0, 1), margin 1e-5) against ½∫ w·D·sigmoid dλ."""
    obj = L.sd3()
    plain, strat, se = _mc(obj, _velocity_model_linear(), 2**15, 10)
    want = _documented(
        lambda l: 2 * (1 + np.exp(-l / 2)) ** 2 * npdf(l, 0.0, 4.0), lam_linear(LO), lam_linear(HI)
    )
    assert abs(plain - want) < 4 * se, (plain, want, se)
    assert abs(strat - want) < 4 * se, (strat, want, se)


# ----------------------------------------------------------------------------------------------------------------
# CDFs and the root-find inverse of the mode sampler
# ----------------------------------------------------------------------------------------------------------------


def _trunc_norm_cdf_vp(t, mean=2.0, std=4.0):
    lo, hi = lam_vp(0.0), lam_vp(1 - 1e-5)
    dist = scipy.stats.truncnorm((lo - mean) / std, (hi - mean) / std, loc=mean, scale=std)
    return dist.cdf(lam_vp(t))


_mode_cdf = lambda s: np.vectorize(
    lambda t: scipy.optimize.brentq(lambda v: _mode_g(v, s) - t, 0, 1, xtol=1e-15, rtol=1e-15)
)
_ln_cdf = lambda t: scipy.stats.norm.cdf((scipy.special.logit(t) + M) / S)

# (id, sampler and path factory (called inside the test, so leaves are float64), independent numpy CDF)
CDF_CASES = [
    (
        "uniform",
        lambda: (L.Uniform(0.2, 0.7), LinearPath()),
        lambda t: np.clip((t - 0.2) / 0.5, 0, 1),
    ),
    ("logit_normal", lambda: (L.LogitNormal(M, S), LinearPath()), _ln_cdf),
    ("mode_1.29", lambda: (L.ModeSampler(1.29), LinearPath()), _mode_cdf(1.29)),
    ("mode_-1", lambda: (L.ModeSampler(-1.0), LinearPath()), _mode_cdf(-1.0)),
    ("cosmap", lambda: (L.CosMap(), LinearPath()), lambda t: 2 / np.pi * np.arctan(t / (1 - t))),
    ("logsnr_normal_vp", lambda: (L.LogSNRNormal(2.0, 4.0), VPPath()), _trunc_norm_cdf_vp),
    (
        "shifted_ln",
        lambda: (L.Shifted(L.LogitNormal(M, S), 3.0), LinearPath()),
        lambda t: _ln_cdf(3 * t / (1 + 2 * t)),
    ),
    (
        "shifted_mode",
        lambda: (L.Shifted(L.ModeSampler(0.5), 0.5), LinearPath()),
        lambda t: _mode_cdf(0.5)(0.5 * t / (1 - 0.5 * t)),
    ),
]


@pytest.mark.parametrize("case", CDF_CASES, ids=[c[0] for c in CDF_CASES])
def test_sampler_cdf(case):
    """cdf against an independent numpy/scipy CDF; cdf∘icdf = id; d cdf/dt (jax.grad) = density."""
    _, make, ref = case
    sampler, path = make()
    t = np.linspace(0.03, 0.97, 25)
    if isinstance(sampler, L.Uniform):
        t = np.linspace(0.21, 0.69, 25)
    u = np.linspace(0.02, 0.98, 25)

    @jax.jit
    @jax.vmap
    def f(s, v):
        roundtrip = sampler.cdf(sampler.icdf(v, path), path)
        return (
            sampler.cdf(s, path),
            jax.grad(sampler.cdf)(s, path),
            sampler.density(s, path),
            roundtrip,
        )

    cdf, dcdf, dens, back = (np.asarray(a) for a in f(jnp.asarray(t), jnp.asarray(u)))
    np.testing.assert_allclose(cdf, ref(t), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(dcdf, dens, rtol=1e-9)
    np.testing.assert_allclose(back, u, rtol=1e-11)
    with pytest.raises(ValueError, match="t must lie in"):
        sampler.cdf(1.5, path)


def test_mode_inverse_icdf_gradients(x64):
    """Bug 1 for ModeSampler: the bisection gave zero gradients. u = g⁻¹(t): du/dt = 1/g'(u) and
    du/ds = −(cos²(πu/2) − 1 + u)/g'(u), against closed forms and central finite differences."""
    s0, t0 = 1.29, 0.3
    u = float(_mode_cdf(s0)(t0))
    gp = 1.0 + s0 * (1.0 - 0.5 * np.pi * np.sin(np.pi * u))
    want_t, want_s = 1.0 / gp, -(np.cos(0.5 * np.pi * u) ** 2 - 1.0 + u) / gp

    def inv(t, s):
        return L.ModeSampler(s).inverse_icdf(t)

    np.testing.assert_allclose(float(inv(t0, s0)), u, rtol=1e-14)
    g_t, g_s = jax.grad(inv, argnums=(0, 1))(t0, s0)
    np.testing.assert_allclose([float(g_t), float(g_s)], [want_t, want_s], rtol=1e-10)
    h = 1e-6
    fd_t = (float(inv(t0 + h, s0)) - float(inv(t0 - h, s0))) / (2 * h)
    fd_s = (float(inv(t0, s0 + h)) - float(inv(t0, s0 - h))) / (2 * h)
    np.testing.assert_allclose([float(g_t), float(g_s)], [fd_t, fd_s], rtol=1e-7)
    # jit + vmap over t; gradient through the sampler's density in its scale (used by a learned sampler)
    ts = jnp.linspace(0.05, 0.95, 7)
    gv = jax.jit(jax.vmap(jax.grad(inv), in_axes=(0, None)))(ts, s0)
    us = _mode_cdf(s0)(np.asarray(ts))
    np.testing.assert_allclose(
        np.asarray(gv), 1 / (1 + s0 * (1 - 0.5 * np.pi * np.sin(np.pi * us))), rtol=1e-10
    )
    path = LinearPath()
    gd = jax.grad(lambda s: L.ModeSampler(s).density(t0, path))(s0)
    fd = (
        float(L.ModeSampler(s0 + h).density(t0, path))
        - float(L.ModeSampler(s0 - h).density(t0, path))
    ) / (2 * h)
    np.testing.assert_allclose(float(gd), fd, rtol=1e-6)


def test_mode_inverse_icdf_float32(f32):
    sampler = L.ModeSampler(1.29)
    ts = np.linspace(0.01, 0.99, 21).astype(np.float32)
    got = np.asarray(jax.jit(jax.vmap(sampler.inverse_icdf))(jnp.asarray(ts)), np.float64)
    assert jax.vmap(sampler.inverse_icdf)(jnp.asarray(ts)).dtype == jnp.float32
    want = _mode_cdf(1.29)(ts.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=0, atol=4e-7)
    g = float(jax.grad(sampler.inverse_icdf)(jnp.float32(0.3)))
    u = float(_mode_cdf(1.29)(0.3))
    np.testing.assert_allclose(g, 1 / (1 + 1.29 * (1 - 0.5 * np.pi * np.sin(np.pi * u))), rtol=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# No host callback in a training step; boundary checks only where a user gives t
# ----------------------------------------------------------------------------------------------------------------


def _learned_schedule_objective():
    path = LogSNRPath(
        lambda p, t: p[0] * (jnp.log(t) - jnp.log1p(-t)) + p[1], params=jnp.array([2.0, 0.5])
    )
    return L.Objective(
        path, "eps", time_sampler=L.LogSNRNormal(0.0, 3.0), loss_weight=L.LogSNRRate(0.5)
    )


CALLBACK_FREE = {
    "sd3_mode_shift": lambda: L.sd3(sampler="mode", shift=3.0),
    "kingma_gao_mode_data": lambda: L.weighted_objective(
        CosinePath(), "data", L.SigmoidWeighting(), L.ModeSampler(), space="eps"
    ),
    "learned_schedule": _learned_schedule_objective,
}


@pytest.mark.parametrize("name", list(CALLBACK_FREE))
def test_training_step_has_no_callback(name, f32):
    """The jitted loss and its gradient (wrt the model, and wrt the objective's own leaves, e.g. a learned
    schedule) contain no host callback: no check_time/error_if inside a training step."""
    obj = CALLBACK_FREE[name]()
    xs = jnp.ones((4, 3))
    params = (jnp.eye(3), jnp.ones(3))
    key = jax.random.key(0)

    def step(obj, p, k, stratified):
        return L.batch_loss(obj, lambda t, z: _mlp(p, t, z), xs, k, stratified=stratified)

    for stratified in (False, True):
        f = jax.jit(lambda p, k: step(obj, p, k, stratified))
        assert "callback" not in str(jax.make_jaxpr(f)(params, key))
        g = jax.jit(jax.grad(lambda o, p, k: step(o, p, k, stratified), argnums=(0, 1)))
        assert "callback" not in str(jax.make_jaxpr(g)(obj, params, key))
    # positive control: loss_at takes a user's t and checks it (one error_if, a callback)
    jaxpr = jax.make_jaxpr(lambda t: L.loss_at(obj, lambda t, z: z, jnp.ones(3), t, jnp.ones(3)))(
        0.5
    )
    assert "callback" in str(jaxpr)


def test_learned_schedule_gradient_through_truncation():
    """A learned LogSNRPath schedule: the gradient of the truncated-sampling loss wrt the schedule parameters
    (through t_from_log_snr's implicit gradients) matches central finite differences, and is finite although
    λ = ±∞ at the path's ends (LogSNRNormal truncates to that range)."""
    obj = _learned_schedule_objective()
    fn = make_net(3, dim=3)
    xs = jnp.asarray(np.random.default_rng(4).normal(size=(8, 3)))
    key = jax.random.key(5)

    def f(p):
        o = eqx.tree_at(lambda o: o.path.params, obj, p)
        return L.batch_loss(o, fn, xs, key, stratified=True)

    p0 = obj.path.params
    vg = jax.jit(jax.value_and_grad(f))
    _, g = vg(p0)
    h = 1e-6
    for i in range(2):
        e = jnp.zeros(2).at[i].set(h)
        fd = (float(vg(p0 + e)[0]) - float(vg(p0 - e)[0])) / (2 * h)
        np.testing.assert_allclose(float(g[i]), fd, rtol=1e-6)
    assert np.all(np.abs(np.asarray(g)) > 1e-8)  # the schedule does receive a gradient


def test_objective_kinds_and_margin():
    obj = L.Objective(LinearPath(), "eps", space="velocity", margin=0.01)
    assert isinstance(obj.prediction, Eps) and obj.prediction.name == "eps"
    assert obj.space.name == "velocity" and obj.margin == 0.01 and obj.t_range == (0.01, 0.99)
    assert L.Objective(LinearPath(), Eps()).space == Eps()  # kind objects accepted as well
    with pytest.raises(ValueError, match="margin"):
        L.Objective(LinearPath(), "eps", margin=0.5)
    with pytest.raises(TypeError):
        L.flow_matching(t_eps=1e-3)  # renamed: the objective's margin is not the path's t_eps
    assert not hasattr(L, "elbo")  # the VDM loss is L.vdm; the ELBO estimator is diffjax.elbo
    # the objective (kinds included) passes through jit as an argument
    fn = make_net(0, dim=2)
    f = eqx.filter_jit(lambda o, x, k: L.loss(o, fn, x, k))
    x, key = jnp.ones(2), jax.random.key(0)
    np.testing.assert_allclose(float(f(obj, x, key)), float(L.loss(obj, fn, x, key)), rtol=1e-12)


def test_per_dimension_averages_over_coordinates():
    """losses.per_dimension: the flow-matching loss of the zero model is E‖x − ε‖² = D·(c² + 1) for x ≡ c; the
    per-dimension loss is c² + 1 whatever D (Monte Carlo over 65,536 coordinates, SE ≈ 0.01), for plain and
    conditional batches; the summed loss (the default) is the negative control."""
    import functools

    from diffjax.conditioning import ClassDropout

    objective = L.flow_matching(LinearPath())
    zero = lambda t, x, *c: jnp.zeros_like(x)  # noqa: E731
    xs = jnp.full((1024, 8, 8, 1), 0.5)
    key = jax.random.key(0)
    per_dim = jax.jit(lambda xs, key: L.per_dimension()(objective, zero, xs, key))(xs, key)
    assert abs(float(per_dim) - 1.25) < 0.05
    assert abs(float(L.batch_loss(objective, zero, xs, key)) - 64 * 1.25) < 64 * 0.05  # the sum: D times
    labels = jnp.zeros(1024, jnp.int32)
    conditional = functools.partial(L.conditional_batch_loss, dropout=ClassDropout(10, 0.0))
    cond = L.per_dimension(conditional)(objective, zero, (xs, labels), key)
    assert abs(float(cond) - 1.25) < 0.05
    with pytest.raises(ValueError, match="loss_fn must be a batch loss"):
        L.per_dimension("sum")
