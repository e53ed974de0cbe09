"""Tests for diffjax.paths against independent numpy/scipy closed forms (formulas-detailed.md §0–§1.4).

Time convention: t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε, λ_t = log(α²/σ²) increasing in t.

Every reference below is written in numpy from the formula sheet (never from diffjax's own output); derivatives
are checked against central finite differences of those closed forms and against ``jax.grad``.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from diffjax.paths import (
    AffinePath,
    CosinePath,
    EDMPath,
    ICFMPath,
    LinearPath,
    LogSNRPath,
    PolynomialPath,
    SigmaMinPath,
    SubVPPath,
    VEPath,
    VPPath,
    check_time,
)

SHIFT = 3.0  # LogSNRPath: λ(t) = 2·logit(t) − 2·log(SHIFT) (SD3-style shifted logit, VP scaling)


def _shifted_logit(t):
    return 2.0 * (jnp.log(t) - jnp.log1p(-t)) - 2.0 * math.log(SHIFT)


def _shifted_logit_params(k, t):
    return 2.0 * (jnp.log(t) - jnp.log1p(-t)) - 2.0 * jnp.log(k)


# ---------------------------------------------------------------------------------------------------------------
# numpy references (formula sheet §1.4); every function takes a float64 numpy array t
# ---------------------------------------------------------------------------------------------------------------


def _ref_linear():
    return dict(
        alpha=lambda t: t,
        sigma=lambda t: 1.0 - t,
        d_alpha=lambda t: np.ones_like(t),
        d_sigma=lambda t: -np.ones_like(t),
        lam=lambda t: 2.0 * scipy.special.logit(t),
        t_of_lam=lambda lam: scipy.special.expit(lam / 2.0),
    )


def _ref_cosine():
    h = np.pi / 2
    return dict(
        alpha=lambda t: np.sin(h * t),
        sigma=lambda t: np.cos(h * t),
        d_alpha=lambda t: h * np.cos(h * t),
        d_sigma=lambda t: -h * np.sin(h * t),
        lam=lambda t: 2.0 * np.log(np.tan(h * t)),
        t_of_lam=lambda lam: (2.0 / np.pi) * np.arctan(np.exp(lam / 2.0)),
    )


def _ref_vp(bmin=0.1, bmax=20.0):
    db = bmax - bmin

    def gamma(t):
        s = 1.0 - t
        return 0.5 * s**2 * db + s * bmin

    def beta(t):
        return bmin + (1.0 - t) * db

    def alpha(t):  # score_sde's marginal_prob, s = 1 − t
        s = 1.0 - t
        return np.exp(-0.25 * s**2 * db - 0.5 * s * bmin)

    def sigma(t):
        return np.sqrt(-np.expm1(-gamma(t)))

    def d_alpha(t):
        return 0.5 * beta(t) * alpha(t)

    def t_of_lam(lam):
        sp = np.logaddexp(0.0, -lam)
        return 1.0 - (-bmin + np.sqrt(bmin**2 + 2.0 * db * sp)) / db

    return dict(
        alpha=alpha,
        sigma=sigma,
        d_alpha=d_alpha,
        d_sigma=lambda t: -alpha(t) * d_alpha(t) / sigma(t),
        lam=lambda t: -np.log(np.expm1(gamma(t))),
        t_of_lam=t_of_lam,
        beta=beta,
    )


def _ref_ve(smin=0.01, smax=50.0):
    L = np.log(smax / smin)

    def sigma(t):
        return smin * (smax / smin) ** (1.0 - t)

    return dict(
        alpha=lambda t: np.ones_like(t),
        sigma=sigma,
        d_alpha=lambda t: np.zeros_like(t),
        d_sigma=lambda t: -sigma(t) * L,
        lam=lambda t: -2.0 * np.log(sigma(t)),
        t_of_lam=lambda lam: 1.0 - np.log(np.exp(-lam / 2.0) / smin) / L,
    )


def _ref_edm(smin=0.002, smax=80.0, rho=7.0):
    A, B = smax ** (1.0 / rho), smin ** (1.0 / rho)
    return dict(
        alpha=lambda t: np.ones_like(t),
        sigma=lambda t: (A + t * (B - A)) ** rho,
        d_alpha=lambda t: np.zeros_like(t),
        d_sigma=lambda t: rho * (A + t * (B - A)) ** (rho - 1.0) * (B - A),
        lam=lambda t: -2.0 * np.log((A + t * (B - A)) ** rho),
        t_of_lam=lambda lam: (np.exp(-lam / (2.0 * rho)) - A) / (B - A),
    )


def _ref_logsnr(k=SHIFT):
    # e^λ = t²/(k²(1−t)²) ⇒ α² = sigmoid(λ) = t²/(t² + k²(1−t)²)
    def norm(t):
        return np.sqrt(t**2 + k**2 * (1.0 - t) ** 2)

    def alpha(t):
        return t / norm(t)

    def sigma(t):
        return k * (1.0 - t) / norm(t)

    def lam_dot(t):
        return 2.0 / (t * (1.0 - t))

    return dict(
        alpha=alpha,
        sigma=sigma,
        d_alpha=lambda t: 0.5 * alpha(t) * sigma(t) ** 2 * lam_dot(t),
        d_sigma=lambda t: -0.5 * sigma(t) * alpha(t) ** 2 * lam_dot(t),
        lam=lambda t: 2.0 * scipy.special.logit(t) - 2.0 * np.log(k),
        t_of_lam=lambda lam: scipy.special.expit(lam / 2.0 + np.log(k)),
    )


# name -> (factory, numpy reference); factories are called inside tests so x64 leaves are float64.
PATHS = {
    "linear": (LinearPath, _ref_linear),
    "cosine": (CosinePath, _ref_cosine),
    "vp": (lambda: VPPath(0.1, 20.0), _ref_vp),
    "ve": (lambda: VEPath(0.01, 50.0), _ref_ve),
    "edm": (lambda: EDMPath(0.002, 80.0, 7.0), _ref_edm),
    "logsnr": (lambda: LogSNRPath(_shifted_logit), _ref_logsnr),
    "logsnr_params": (
        lambda: LogSNRPath(_shifted_logit_params, params=jnp.asarray(SHIFT)),
        _ref_logsnr,
    ),
}
NAMES = list(PATHS)
T_INTERIOR = np.array([0.05, 0.2, 0.5, 0.8, 0.95])
FD_H = 1e-6


def _fd(f, t, h=FD_H):
    return (f(t + h) - f(t - h)) / (2.0 * h)


def _eval(path, method, ts):
    return np.array([float(getattr(path, method)(float(t))) for t in ts])


# ---------------------------------------------------------------------------------------------------------------
# values against closed forms
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_alpha_sigma_closed_form(name, x64):
    factory, ref = PATHS[name]
    path, r = factory(), ref()
    ts = np.concatenate([T_INTERIOR, [0.0, 0.3, 0.7, 1.0]])
    if name.startswith("logsnr"):
        ts = T_INTERIOR  # λ = ±∞ at the ends
    np.testing.assert_allclose(_eval(path, "alpha", ts), r["alpha"](ts), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(_eval(path, "sigma", ts), r["sigma"](ts), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        _eval(path, "sigma_sq", ts), r["sigma"](ts) ** 2, rtol=1e-12, atol=1e-15
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("method", ["alpha", "sigma"])
def test_derivatives_vs_finite_differences(name, method, x64):
    """d_alpha, d_sigma against central differences of the numpy closed forms and against the sheet's column."""
    factory, ref = PATHS[name]
    path, r = factory(), ref()
    got = _eval(path, "d_" + method, T_INTERIOR)
    fd = _fd(r[method], T_INTERIOR)
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got, r["d_" + method](T_INTERIOR), rtol=1e-11, atol=1e-14)
    # jax.grad of the public α / σ agrees with the closed-form derivative.
    g = np.array([float(jax.grad(getattr(path, method))(float(t))) for t in T_INTERIOR])
    np.testing.assert_allclose(g, r["d_" + method](T_INTERIOR), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", NAMES)
def test_d_sigma_sq_vs_finite_differences(name, x64):
    factory, ref = PATHS[name]
    path, r = factory(), ref()
    got = _eval(path, "d_sigma_sq", T_INTERIOR)
    np.testing.assert_allclose(got, _fd(lambda t: r["sigma"](t) ** 2, T_INTERIOR), rtol=1e-6)
    g = np.array([float(jax.grad(path.sigma_sq)(float(t))) for t in T_INTERIOR])
    np.testing.assert_allclose(got, g, rtol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_log_snr_and_its_derivative(name, x64):
    factory, ref = PATHS[name]
    path, r = factory(), ref()
    lam = _eval(path, "log_snr", T_INTERIOR)
    a, s = r["alpha"](T_INTERIOR), r["sigma"](T_INTERIOR)
    np.testing.assert_allclose(lam, np.log(a**2 / s**2), rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(lam, r["lam"](T_INTERIOR), rtol=1e-11, atol=1e-12)
    assert np.all(np.diff(lam) > 0), "λ must increase in t (t=0 noise, t=1 data)"
    dlam = _eval(path, "d_log_snr", T_INTERIOR)
    np.testing.assert_allclose(dlam, _fd(r["lam"], T_INTERIOR), rtol=1e-6)
    g = np.array([float(jax.grad(path.log_snr)(float(t))) for t in T_INTERIOR])
    np.testing.assert_allclose(dlam, g, rtol=1e-10)
    # sheet §0: λ̇ = 2(α̇/α − σ̇/σ) > 0
    da, ds = r["d_alpha"](T_INTERIOR), r["d_sigma"](T_INTERIOR)
    np.testing.assert_allclose(dlam, 2 * (da / a - ds / s), rtol=1e-10)
    assert np.all(dlam > 0)


@pytest.mark.parametrize("name", NAMES)
def test_t_from_log_snr_inverse(name, x64):
    factory, ref = PATHS[name]
    path, r = factory(), ref()
    ts = np.linspace(0.02, 0.98, 13)
    lam = r["lam"](ts)
    got = np.asarray(jax.jit(jax.vmap(path.t_from_log_snr))(jnp.asarray(lam)))
    np.testing.assert_allclose(got, ts, rtol=0, atol=1e-10)
    np.testing.assert_allclose(got, r["t_of_lam"](lam), rtol=0, atol=1e-10)
    # round trip through the code's own λ; eager scalar call once
    rt = np.asarray(
        jax.jit(jax.vmap(lambda t: path.t_from_log_snr(path.log_snr(t))))(jnp.asarray(ts))
    )
    np.testing.assert_allclose(rt, ts, rtol=0, atol=1e-10)
    np.testing.assert_allclose(float(path.t_from_log_snr(float(lam[3]))), ts[3], atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_coefficients_matches_closed_form(name, x64):
    factory, ref = PATHS[name]
    path, r = factory(), ref()
    for t in (0.1, 0.5, 0.9):
        got = np.array([float(c) for c in path.coefficients(t)])
        want = np.array([r[k](np.float64(t)) for k in ("alpha", "sigma", "d_alpha", "d_sigma")])
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_D_t_identity_positive(name, x64):
    """D_t = α̇σ − σ̇α = ασλ̇/2 > 0 (sheet §0)."""
    factory, ref = PATHS[name]
    path, r = factory(), ref()
    for t in T_INTERIOR:
        a, s, da, ds = (float(c) for c in path.coefficients(float(t)))
        D = da * s - ds * a
        assert D > 0
        np.testing.assert_allclose(D, a * s * float(path.d_log_snr(float(t))) / 2, rtol=1e-10)
        ra, rs = r["alpha"](t), r["sigma"](t)
        np.testing.assert_allclose(D, ra * rs * _fd(r["lam"], np.float64(t)) / 2, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# numbers from the sheet, endpoints, priors
# ---------------------------------------------------------------------------------------------------------------


def test_vp_sheet_numbers(x64):
    p = VPPath(0.1, 20.0)
    np.testing.assert_allclose(float(p.log_snr(0.0)), -10.050, atol=5e-4)
    np.testing.assert_allclose(float(p.log_snr(1 - 1e-3)), 9.115, atol=5e-4)
    np.testing.assert_allclose(float(p.log_snr(1 - 1e-5)), 13.815, atol=5e-4)
    np.testing.assert_allclose(float(p.alpha(0.0)), math.exp(-5.025), rtol=1e-12)
    assert p.t_eps == 1e-5 and p.t_min == 0.0 and p.t_max == 1 - 1e-5
    lo, hi = p.log_snr_range()
    np.testing.assert_allclose([float(lo), float(hi)], [-10.050, 13.815], atol=5e-4)


def test_ve_edm_sheet_numbers(x64):
    lo, hi = VEPath(0.01, 50.0).log_snr_range()
    np.testing.assert_allclose([float(lo), float(hi)], [-7.824, 9.210], atol=5e-4)
    lo, hi = EDMPath(0.002, 80.0, 7.0).log_snr_range()
    np.testing.assert_allclose([float(lo), float(hi)], [-8.76, 12.43], atol=5e-3)
    # a uniform t-grid is EDM's ρ-spaced sampling grid (N = 18, σ_0 = 80, σ_17 = 0.002)
    edm, N = EDMPath(), 18
    A, B = 80 ** (1 / 7), 0.002 ** (1 / 7)
    want = [(A + i / (N - 1) * (B - A)) ** 7 for i in range(N)]
    got = [float(edm.sigma(i / (N - 1))) for i in range(N)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert got[0] == pytest.approx(80.0) and got[-1] == pytest.approx(0.002)


def test_vp_d_sigma_sq_finite_at_data_end(x64):
    p, r = VPPath(0.1, 20.0), _ref_vp()
    dss = float(p.d_sigma_sq(1.0))
    assert math.isfinite(dss)
    # −2αα̇ at t = 1: α = 1, α̇ = β_min/2
    np.testing.assert_allclose(dss, -0.1, rtol=1e-12)
    np.testing.assert_allclose(dss, -2 * r["alpha"](1.0) * r["d_alpha"](1.0), rtol=1e-12)
    for t in (0.0, 0.5, 0.99, 1.0 - 1e-5):
        want = -2 * r["alpha"](t) * r["d_alpha"](t)
        np.testing.assert_allclose(float(p.d_sigma_sq(t)), want, rtol=1e-12)
    # σ̇ itself is singular there (documented), so t_eps > 0
    assert float(p.d_sigma(1.0)) == -math.inf
    assert float(p.sigma(1.0)) == 0.0 and float(p.alpha(1.0)) == 1.0


def test_vp_diffusion_equals_beta(x64):
    """score_sde: g² = β(s) = σ²λ̇ with s = 1 − t."""
    p, r = VPPath(0.1, 20.0), _ref_vp()
    for t in (0.0, 0.1, 0.5, 0.9, 0.999):
        beta = 0.1 + (1 - t) * 19.9
        np.testing.assert_allclose(float(p.sigma_sq(t) * p.d_log_snr(t)), beta, rtol=1e-10)
        np.testing.assert_allclose(float(p.beta(t)), beta, rtol=1e-12)
        np.testing.assert_allclose(
            r["sigma"](t) ** 2 * _fd(r["lam"], np.float64(t), h=1e-7), beta, rtol=1e-5
        )


def test_ve_diffusion_equals_sigma_sq_lambda_dot(x64):
    """score_sde VE: g(s) = σ√(2 log(σ_max/σ_min)), so g² = σ²λ̇."""
    p = VEPath(0.01, 50.0)
    for t in (0.0, 0.3, 1.0):
        sig = 0.01 * 5000 ** (1 - t)
        g2 = sig**2 * 2 * math.log(5000)
        np.testing.assert_allclose(float(p.sigma_sq(t) * p.d_log_snr(t)), g2, rtol=1e-11)


def test_endpoints_linear(x64):
    p = LinearPath()
    assert float(p.alpha(0.0)) == 0.0 and float(p.sigma(0.0)) == 1.0
    assert float(p.alpha(1.0)) == 1.0 and float(p.sigma(1.0)) == 0.0
    assert float(p.log_snr(0.0)) == -math.inf and float(p.log_snr(1.0)) == math.inf
    assert float(p.t_from_log_snr(-math.inf)) == 0.0
    assert float(p.t_from_log_snr(math.inf)) == 1.0
    assert p.t_eps == 0.0 and p.t_min == 0.0 and p.t_max == 1.0


def test_cosine_endpoint_values(x64):
    p = CosinePath()
    assert float(p.alpha(0.0)) == 0.0 and float(p.sigma(0.0)) == 1.0
    np.testing.assert_allclose(float(p.alpha(1.0)), 1.0, rtol=1e-15)
    np.testing.assert_allclose(float(p.sigma(1.0)), 0.0, atol=1e-15)


def test_cosine_data_end_float32():
    p = CosinePath()
    assert float(p.sigma(1.0)) == 0.0
    assert float(p.log_snr(1.0)) == math.inf
    assert float(p.log_snr(0.0)) == -math.inf


def test_t_from_log_snr_clips_to_range(x64):
    ve, edm, vp = VEPath(), EDMPath(), VPPath()
    assert float(ve.t_from_log_snr(100.0)) == 1.0 and float(ve.t_from_log_snr(-100.0)) == 0.0
    assert float(edm.t_from_log_snr(100.0)) == 1.0 and float(edm.t_from_log_snr(-100.0)) == 0.0
    assert float(vp.t_from_log_snr(-100.0)) == 0.0
    np.testing.assert_allclose(float(vp.t_from_log_snr(100.0)), 1.0, atol=1e-12)


@pytest.mark.parametrize(
    "name,scale",
    [("linear", 1.0), ("cosine", 1.0), ("vp", 1.0), ("ve", 50.0), ("edm", 80.0), ("logsnr", 1.0)],
)
def test_prior(name, scale, x64):
    prior = PATHS[name][0]().prior
    np.testing.assert_allclose(float(prior.scale), scale)
    x = np.random.default_rng(0).normal(size=(3, 4)) * 7.0
    want = scipy.stats.norm.logpdf(x, loc=0.0, scale=scale).sum()
    np.testing.assert_allclose(float(prior.log_prob(jnp.asarray(x))), want, rtol=1e-12)
    np.testing.assert_allclose(
        float(jax.jit(lambda pr, x: pr.log_prob(x))(prior, jnp.asarray(x))), want, rtol=1e-12
    )
    draws = prior.sample(jax.random.PRNGKey(0), (20000,))
    assert draws.shape == (20000,) and draws.dtype == jnp.float64
    np.testing.assert_allclose(float(jnp.std(draws)), scale, rtol=0.03)
    np.testing.assert_allclose(float(jnp.mean(draws)), 0.0, atol=0.05 * scale)
    # grad of log_prob is −x/scale²
    g = jax.grad(prior.log_prob)(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(g), -x / scale**2, rtol=1e-12)


def test_float32_default_dtype():
    p = VPPath()
    assert p.beta_min.dtype == jnp.float32
    for m in (
        "alpha",
        "sigma",
        "d_alpha",
        "d_sigma",
        "sigma_sq",
        "d_sigma_sq",
        "log_snr",
        "d_log_snr",
    ):
        assert getattr(p, m)(0.5).dtype == jnp.float32, m
    assert p.prior.sample(jax.random.PRNGKey(0), (2,)).dtype == jnp.float32


def test_float64_when_enabled(x64):
    p = VPPath()
    assert p.beta_min.dtype == jnp.float64
    assert p.alpha(0.5).dtype == jnp.float64
    assert LinearPath().alpha(1).dtype == jnp.float64  # integer t is promoted to float


# ---------------------------------------------------------------------------------------------------------------
# jit / vmap / grad: same numbers as eager
# ---------------------------------------------------------------------------------------------------------------

SCALAR_METHODS = (
    "alpha",
    "sigma",
    "d_alpha",
    "d_sigma",
    "sigma_sq",
    "d_sigma_sq",
    "log_snr",
    "d_log_snr",
)


def _all_methods(path, t, x):
    out = {m: getattr(path, m)(t) for m in SCALAR_METHODS}
    out["t_from_log_snr"] = path.t_from_log_snr(path.log_snr(t))
    out["coefficients"] = jnp.stack(path.coefficients(t))
    out["prior_log_prob"] = path.prior.log_prob(x * t)
    if isinstance(path, VPPath):
        out["beta"] = path.beta(t)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_jit_vmap_match_eager(name, x64):
    path = PATHS[name][0]()
    t_np = np.array([0.05, 0.5, 0.95])
    ts = jnp.asarray(t_np)
    x = jnp.arange(6.0).reshape(2, 3)
    eager = [_all_methods(path, float(t), x) for t in t_np]
    jitted = jax.jit(_all_methods)
    # un-jitted vmap runs op by op: check it on a small subset
    vmapped = jax.vmap(
        lambda p, t, x: {m: getattr(p, m)(t) for m in ("alpha", "d_sigma_sq", "d_log_snr")},
        in_axes=(None, 0, None),
    )(path, ts, x)
    jit_vmapped = jax.jit(jax.vmap(_all_methods, in_axes=(None, 0, None)))(path, ts, x)
    for i, t in enumerate(ts):
        j = jitted(path, t, x)
        for k, v in eager[i].items():
            np.testing.assert_allclose(np.asarray(j[k]), np.asarray(v), rtol=1e-12, err_msg=k)
            if k in vmapped:
                np.testing.assert_allclose(
                    np.asarray(vmapped[k][i]), np.asarray(v), rtol=1e-12, err_msg=k
                )
            np.testing.assert_allclose(
                np.asarray(jit_vmapped[k][i]), np.asarray(v), rtol=1e-12, err_msg=k
            )
    # log_snr_range and the prior sample under jit
    lo, hi = path.log_snr_range()
    jlo, jhi = jax.jit(lambda p: p.log_snr_range())(path)
    np.testing.assert_allclose([float(jlo), float(jhi)], [float(lo), float(hi)], rtol=1e-12)
    key = jax.random.PRNGKey(1)
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda p, k: p.prior.sample(k, (4,)))(path, key)),
        np.asarray(path.prior.sample(key, (4,))),
        rtol=1e-12,
    )


@pytest.mark.parametrize("name", NAMES)
def test_grad_of_alpha_under_jit_and_vmap(name, x64):
    factory, ref = PATHS[name]
    path, r = factory(), ref()
    ts = jnp.asarray(T_INTERIOR)
    g = jax.jit(jax.vmap(jax.grad(lambda p, t: p.alpha(t), argnums=1), in_axes=(None, 0)))(path, ts)
    np.testing.assert_allclose(np.asarray(g), _fd(r["alpha"], T_INTERIOR), rtol=1e-6, atol=1e-9)
    # second derivative: grad of d_log_snr vs finite differences of the numpy λ̇ (interior only)
    gg = jax.vmap(jax.grad(path.d_log_snr))(ts)
    fd2 = (
        r["lam"](T_INTERIOR + 1e-4) - 2 * r["lam"](T_INTERIOR) + r["lam"](T_INTERIOR - 1e-4)
    ) / 1e-8
    np.testing.assert_allclose(np.asarray(gg), fd2, rtol=1e-4, atol=1e-4)


def test_grad_wrt_path_parameters(x64):
    """Paths are PyTrees with trainable leaves: d α / d β_min and d α / d(shift) vs finite differences."""
    t = 0.3
    g = jax.grad(lambda p: p.alpha(t))(VPPath(0.1, 20.0))
    fd = (_ref_vp(0.1 + 1e-6)["alpha"](t) - _ref_vp(0.1 - 1e-6)["alpha"](t)) / 2e-6
    np.testing.assert_allclose(float(g.beta_min), fd, rtol=1e-7)
    fd = (_ref_vp(0.1, 20 + 1e-6)["alpha"](t) - _ref_vp(0.1, 20 - 1e-6)["alpha"](t)) / 2e-6
    np.testing.assert_allclose(float(g.beta_max), fd, rtol=1e-7)
    # constructing the path inside grad / vmap (tracer leaves) works too
    g2 = jax.grad(lambda b: VPPath(b, 20.0).alpha(t))(0.1)
    np.testing.assert_allclose(float(g2), float(g.beta_min), rtol=1e-12)
    bs = jnp.array([0.1, 0.2, 0.5])
    a = jax.vmap(lambda b: VPPath(b, 20.0).alpha(t))(bs)
    np.testing.assert_allclose(
        np.asarray(a), [_ref_vp(float(b))["alpha"](t) for b in bs], rtol=1e-12
    )
    # LogSNRPath with params
    path = PATHS["logsnr_params"][0]()
    gk = jax.grad(lambda p: p.sigma(t))(path).params
    fd = (_ref_logsnr(SHIFT + 1e-6)["sigma"](t) - _ref_logsnr(SHIFT - 1e-6)["sigma"](t)) / 2e-6
    np.testing.assert_allclose(float(gk), fd, rtol=1e-7)
    # EDM: d σ / d ρ
    ge = jax.grad(lambda p: p.sigma(t))(EDMPath(0.002, 80.0, 7.0)).rho
    fd = (_ref_edm(rho=7 + 1e-6)["sigma"](t) - _ref_edm(rho=7 - 1e-6)["sigma"](t)) / 2e-6
    np.testing.assert_allclose(float(ge), fd, rtol=1e-6)


def test_path_is_jit_argument_without_recompile(x64):
    traces = []

    @jax.jit
    def f(path, t):
        traces.append(1)  # Python side effect: runs once per trace
        return path.alpha(t), path.d_sigma_sq(t)

    t = 0.3
    a1, _ = f(VPPath(0.1, 20.0), t)
    a2, _ = f(VPPath(0.2, 20.0), t)
    a3, _ = f(VPPath(0.05, 15.0), t)
    assert len(traces) == 1
    np.testing.assert_allclose(float(a1), _ref_vp(0.1)["alpha"](t), rtol=1e-12)
    np.testing.assert_allclose(float(a2), _ref_vp(0.2)["alpha"](t), rtol=1e-12)
    np.testing.assert_allclose(float(a3), _ref_vp(0.05, 15.0)["alpha"](t), rtol=1e-12)
    # same for the other parametric paths
    g = jax.jit(lambda p, t: (traces.append(1), p.sigma(t))[1])
    n = len(traces)
    g(VEPath(0.01, 50.0), t)
    g(VEPath(0.02, 30.0), t)
    g(EDMPath(0.002, 80.0, 7.0), t)
    g(EDMPath(0.01, 60.0, 5.0), t)
    assert len(traces) == n + 2  # one trace per path class


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------

BAD_T = [1.5, -0.1, float("nan")]
PUBLIC_T_METHODS = SCALAR_METHODS + ("coefficients",)


def _assert_time_error(fn, *args):
    with pytest.raises(Exception) as info:
        out = fn(*args)
        jax.block_until_ready(out)
    msg = str(info.value)
    assert "t must lie in" in msg or "t is NaN" in msg, msg


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", BAD_T)
def test_bad_time_raises_eager(name, bad):
    path = PATHS[name][0]()
    for m in PUBLIC_T_METHODS:
        _assert_time_error(getattr(path, m), bad)
    if isinstance(path, VPPath):
        _assert_time_error(path.beta, bad)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", BAD_T)
def test_bad_concrete_time_is_a_python_value_error(name, bad):
    """A concrete t outside [0, 1] is refused at Python level, naming the value and the convention."""
    path = PATHS[name][0]()
    with pytest.raises(ValueError) as info:
        path.alpha(bad)
    msg = str(info.value)
    if math.isnan(bad):
        assert "t is NaN" in msg, msg
    else:
        assert "t must lie in [0, 1] (t = 0 noise, t = 1 data)" in msg and repr(bad) in msg, msg


def _callback_free(f, *args):
    text = str(jax.make_jaxpr(f)(*args))
    return "callback" not in text


@pytest.mark.parametrize("name", NAMES)
def test_path_methods_are_pure_under_jit_and_vmap(name):
    """Under jit/vmap/grad the path methods add no runtime check: no host callback in the program, and a
    traced bad t is not an error (entry points validate with check_time; positive control below)."""
    path = PATHS[name][0]()

    def every_method(p, t):
        out = [getattr(p, m)(t) for m in SCALAR_METHODS]
        out += list(p.coefficients(t)) + [p.t_from_log_snr(p.log_snr(t))]
        return jnp.stack(out)

    assert _callback_free(every_method, path, 0.5)
    assert _callback_free(jax.vmap(every_method, in_axes=(None, 0)), path, jnp.array([0.2, 0.7]))
    assert _callback_free(
        jax.grad(lambda p, t: every_method(p, t).sum(), argnums=(0, 1)), path, 0.3
    )
    jax.block_until_ready(jax.vmap(path.alpha)(jnp.array([0.2, 1.5])))  # traced: no error
    # positive control: the boundary validator does put one check (a callback) into the program
    assert not _callback_free(check_time, 0.5)
    assert not _callback_free(jax.vmap(check_time), jnp.array([0.2, 0.7]))


def test_check_time_under_jit_and_vmap():
    f = jax.jit(lambda t: check_time(t))
    jax.block_until_ready(f(0.5))  # good t passes
    for bad in BAD_T:
        _assert_time_error(f, bad)
    _assert_time_error(jax.vmap(check_time), jnp.array([0.2, 1.5]))
    _assert_time_error(jax.jit(jax.vmap(check_time)), jnp.array([0.2, -0.5]))
    # a path method composed with the validator raises, as public entry points do
    path = LinearPath()
    _assert_time_error(jax.jit(lambda t: path.alpha(check_time(t))), 1.5)
    with pytest.raises(Exception, match=r"t0 must lie in \[0.1, 0.9\]"):
        jax.block_until_ready(jax.jit(lambda t: check_time(t, 0.1, 0.9, name="t0"))(0.95))


def test_check_time():
    assert float(check_time(0.0)) == 0.0 and float(check_time(1.0)) == 1.0
    assert check_time(1).dtype == jnp.result_type(float)
    _assert_time_error(check_time, 1.0 + 1e-6)
    with pytest.raises(ValueError, match="scalar"):
        check_time(jnp.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="scalar"):
        LinearPath().alpha(jnp.array([0.1, 0.2]))
    with pytest.raises(ValueError, match="scalar"):  # the shape check also runs when tracing
        jax.jit(LinearPath().alpha)(jnp.array([0.1, 0.2]))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="beta_min"):
        VPPath(20.0, 0.1)
    with pytest.raises(ValueError):
        VPPath(0.1, 0.1)
    with pytest.raises(ValueError):
        VPPath(-0.1, 20.0)
    with pytest.raises(ValueError):
        VEPath(50.0, 0.01)
    with pytest.raises(ValueError):
        EDMPath(80.0, 0.002)
    with pytest.raises(ValueError):
        EDMPath(0.002, 80.0, 0.0)


@pytest.mark.parametrize(
    "fn",
    [
        lambda t: -t,  # decreasing
        lambda t: jnp.sin(6.0 * t),  # increases then decreases
        lambda t: jnp.zeros_like(t),  # constant
    ],
)
def test_logsnr_non_monotone_raises(fn):
    with pytest.raises(ValueError, match="increasing"):
        LogSNRPath(fn)


def test_logsnr_monotone_accepted_and_t_eps():
    p = LogSNRPath(lambda t: 10.0 * t - 5.0, t_eps=1e-3)
    assert p.t_min == 1e-3 and p.t_max == 1 - 1e-3
    np.testing.assert_allclose(float(p.t_from_log_snr(0.0)), 0.5, atol=1e-6)
    # negative control: the check can be switched off
    LogSNRPath(lambda t: -t, check=False)


def test_no_leaked_state_between_traces():
    """No global state: tracing (and failing to trace) one function in another context changes nothing
    afterwards: a jitted path method stays callback-free, the validator keeps its check, eager errors stay."""
    path = VPPath()

    def f(t):
        return path.alpha(t) + path.d_sigma_sq(t)

    before = str(jax.make_jaxpr(f)(0.3))
    before_check = str(jax.make_jaxpr(check_time)(0.3))

    def failing(t):
        path.alpha(t)
        raise RuntimeError("fails mid-trace")

    with pytest.raises(RuntimeError):
        jax.jit(failing)(0.3)
    jax.jit(jax.vmap(jax.grad(f)))(jnp.array([0.1, 0.9]))  # traced inside vmap/grad/jit
    jax.eval_shape(lambda t: jax.vmap(check_time)(t), jnp.zeros(3))
    assert str(jax.make_jaxpr(f)(0.3)) == before and "callback" not in before
    assert str(jax.make_jaxpr(check_time)(0.3)) == before_check and "callback" in before_check
    with pytest.raises(Exception, match="t must lie in"):
        jax.block_until_ready(jax.jit(check_time)(1.5))
    with pytest.raises(ValueError, match="t must lie in"):
        path.alpha(1.5)


def test_nan_time_gets_its_own_message():
    with pytest.raises(Exception, match="t is NaN"):
        jax.block_until_ready(jax.jit(check_time)(jnp.asarray(float("nan"))))
    with pytest.raises(Exception, match="t must lie in"):
        jax.block_until_ready(jax.jit(check_time)(jnp.asarray(1.5)))
    # concrete values: Python errors, with the same two messages
    with pytest.raises(ValueError, match="t is NaN"):
        check_time(float("nan"))
    with pytest.raises(
        ValueError, match=r"t must lie in \[0, 1\] \(t = 0 noise, t = 1 data\), got t = 1.5"
    ):
        check_time(1.5)


# ---------------------------------------------------------------------------------------------------------------
# LogSNRPath: the inverse λ ↦ t (root find with implicit gradients) and infinite ends
# ---------------------------------------------------------------------------------------------------------------


def _logit(t):
    return jnp.log(t) - jnp.log1p(-t)


def _scaled_logit(p, t):  # λ(t) = p·logit(t): t(λ) = sigmoid(λ/p), λ̇ = p/(t(1 − t))
    return p * _logit(t)


def test_t_from_log_snr_gradients_are_implicit(x64):
    """Bug 1: the bisection's jnp.where gave dt/dλ = dt/dp = 0. Now dt/dλ = 1/λ̇ and dt/dp = −(∂λ/∂p)/λ̇:
    checked against the closed form t = sigmoid(λ/p) and central finite differences, under grad, jit, vmap."""
    p0, lam0 = 2.0, 0.7

    def t_of(p, lam):
        return LogSNRPath(_scaled_logit, params=p).t_from_log_snr(lam)

    t = scipy.special.expit(lam0 / p0)
    want_dlam = t * (1 - t) / p0  # 1/λ̇
    want_dp = -(lam0 / p0) * t * (1 - t) / p0  # −logit(t)/λ̇
    assert want_dlam == pytest.approx(0.12124869751125, rel=1e-12)
    np.testing.assert_allclose(float(t_of(p0, lam0)), t, rtol=1e-15)
    g_p, g_lam = jax.grad(t_of, argnums=(0, 1))(p0, lam0)
    np.testing.assert_allclose([float(g_lam), float(g_p)], [want_dlam, want_dp], rtol=1e-12)
    h = 1e-6
    fd_lam = (float(t_of(p0, lam0 + h)) - float(t_of(p0, lam0 - h))) / (2 * h)
    fd_p = (float(t_of(p0 + h, lam0)) - float(t_of(p0 - h, lam0))) / (2 * h)
    np.testing.assert_allclose([float(g_lam), float(g_p)], [fd_lam, fd_p], rtol=1e-8)
    # under jit and vmap, over a grid of λ, and through a downstream quantity α(t(λ))
    lams = jnp.linspace(-8.0, 8.0, 9)
    g = jax.jit(jax.vmap(jax.grad(t_of, argnums=(0, 1)), in_axes=(None, 0)))(p0, lams)
    ts = scipy.special.expit(np.asarray(lams) / p0)
    np.testing.assert_allclose(np.asarray(g[1]), ts * (1 - ts) / p0, rtol=1e-11)
    np.testing.assert_allclose(
        np.asarray(g[0]), -np.asarray(lams) / p0 * ts * (1 - ts) / p0, rtol=1e-11
    )
    path = LogSNRPath(_scaled_logit, params=jnp.asarray(p0))
    ga = jax.grad(lambda pth: pth.alpha(pth.t_from_log_snr(lam0)))(path).params
    # α(t(λ)) = √sigmoid(λ) does not depend on the schedule: the two implicit terms must cancel
    np.testing.assert_allclose(float(ga), 0.0, atol=1e-13)


def test_t_from_log_snr_exact_float64(x64):
    path = LogSNRPath(lambda t: 2.0 * _logit(t))
    ts = np.concatenate([np.geomspace(1e-10, 0.5, 30), 1 - np.geomspace(1e-10, 0.5, 30)])
    lam = 2.0 * scipy.special.logit(ts)
    got = np.asarray(jax.jit(jax.vmap(path.t_from_log_snr))(jnp.asarray(lam)))
    # relative error of the root: ε·|λ|/|λ̇·t| ≈ ε·|λ|/2 from rounding in λ itself; 1 − t likewise
    tol = 4e-16 * (1.0 + np.abs(lam))
    np.testing.assert_array_less(np.abs(got - ts) / ts, tol)
    # negative control: the former fixed 60 halvings of [0, 1] stop at a bracket of 2^-60 ≈ 8.7e-19, which is
    # not float64 precision for t < 1e-3
    assert np.any(2.0**-60 / ts[ts < 1e-3] > 4e-16 * (1.0 + np.abs(lam[ts < 1e-3])))


def test_t_from_log_snr_exact_float32():
    path = LogSNRPath(lambda t: 2.0 * _logit(t))
    assert path.t_from_log_snr(0.7).dtype == jnp.float32
    ts = np.concatenate([np.geomspace(1e-6, 0.5, 20), 1 - np.geomspace(1e-4, 0.5, 20)])
    lam = (2.0 * scipy.special.logit(ts)).astype(np.float32)
    want = scipy.special.expit(lam.astype(np.float64) / 2.0)
    got = np.asarray(jax.jit(jax.vmap(path.t_from_log_snr))(jnp.asarray(lam)), dtype=np.float64)
    ulp = np.spacing(want.astype(np.float32)).astype(np.float64)
    # λ(t) rounds to float32 too: allow its ε·|λ| effect on t plus two float32 spacings
    tol = 2 * ulp + 1.2e-7 * np.abs(lam) * want * (1 - want)
    np.testing.assert_array_less(np.abs(got - want), tol)
    g = float(jax.grad(path.t_from_log_snr)(jnp.float32(0.7)))
    t = scipy.special.expit(0.35)
    np.testing.assert_allclose(g, t * (1 - t) / 2, rtol=1e-5)


def test_t_from_log_snr_clips_outside_the_range(x64):
    path = LogSNRPath(lambda t: 10.0 * t - 5.0, t_eps=1e-3)
    lo, hi = path.t_min, path.t_max
    for lam, want in (
        (100.0, hi),
        (-100.0, lo),
        (math.inf, hi),
        (-math.inf, lo),
        (5.0, hi),
        (-5.0, lo),
    ):
        assert float(path.t_from_log_snr(lam)) == want, lam
        assert float(jax.grad(path.t_from_log_snr)(lam)) == 0.0, lam
    assert math.isnan(float(path.t_from_log_snr(float("nan"))))
    # inside: exact and with dt/dλ = 1/10
    np.testing.assert_allclose(float(path.t_from_log_snr(1.0)), 0.6, rtol=1e-15)
    np.testing.assert_allclose(float(jax.grad(path.t_from_log_snr)(1.0)), 0.1, rtol=1e-12)
    # a path with λ(0) = −∞, λ(1) = +∞ maps ±∞ to its ends
    logit_path = LogSNRPath(lambda t: 2.0 * _logit(t))
    assert float(logit_path.t_from_log_snr(-math.inf)) == 0.0
    assert float(logit_path.t_from_log_snr(math.inf)) == 1.0
    assert np.all(
        np.isfinite(jax.vmap(jax.grad(logit_path.t_from_log_snr))(jnp.array([-jnp.inf, jnp.inf])))
    )


def _alpha_is_t(t):  # λ = log(t²/(1 − t²)) ⇔ α = t, σ = √(1 − t²): λ = −∞ at t = 0, +∞ at t = 1
    return 2.0 * jnp.log(t) - jnp.log1p(-jnp.square(t))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_logsnr_path_with_infinite_ends(dtype, request):
    """Bug 9: α̇, σ̇ were 0·∞ = NaN where λ = ±∞. Against the closed form α = t, σ = √(1 − t²)."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    delta = float(np.sqrt(np.finfo(dtype).eps))
    path = LogSNRPath(_alpha_is_t)
    # negative control: the plain product ½α·sigmoid(−λ)·λ̇ is NaN at t = 0
    raw = 0.5 * path.alpha(0.0) * jax.nn.sigmoid(-path.log_snr(0.0)) * path.d_log_snr(0.0)
    assert math.isnan(float(raw))
    rtol = 1e-12 if dtype == "float64" else 2e-5
    ts = np.array([0.1, 0.5, 0.9])
    coeffs = np.array(jax.jit(jax.vmap(path.coefficients))(jnp.asarray(ts, dtype))).T
    want = np.stack([ts, np.sqrt(1 - ts**2), np.ones(3), -ts / np.sqrt(1 - ts**2)], axis=1)
    np.testing.assert_allclose(coeffs, want, rtol=rtol)

    methods = ("alpha", "d_alpha", "d_sigma", "d_sigma_sq")

    def ends(p):
        return {(m, t): getattr(p, m)(jnp.asarray(t, dtype)) for m in methods for t in (0.0, 1.0)}

    got = {k: float(v) for k, v in jax.jit(ends)(path).items()}
    # eager agrees with jit
    for k in (("d_alpha", 0.0), ("d_sigma_sq", 1.0)):
        np.testing.assert_allclose(float(getattr(path, k[0])(k[1])), got[k], rtol=1e-6)
    # the ends: α̇ = 1 exactly (α̈ = 0); σ̇(0) = 0 and d(σ²)/dt = −2t to within the nudge δ
    assert got["alpha", 0.0] == 0.0 and got["alpha", 1.0] == 1.0
    np.testing.assert_allclose(got["d_alpha", 0.0], 1.0, rtol=rtol)
    np.testing.assert_allclose(got["d_alpha", 1.0], 1.0, rtol=max(rtol, 4 * delta))
    assert abs(got["d_sigma", 0.0]) <= 2 * delta
    assert abs(got["d_sigma_sq", 0.0]) <= 3 * delta
    np.testing.assert_allclose(got["d_sigma_sq", 1.0], -2.0, atol=3 * delta)
    # σ̇ → −∞ at t = 1: finite there, the value at 1 − δ (documented)
    want_ds1 = -(1 - delta) / np.sqrt(1 - (1 - delta) ** 2)
    np.testing.assert_allclose(got["d_sigma", 1.0], want_ds1, rtol=1e-3)
    a, s, da, ds = (float(c) for c in path.coefficients(0.0))
    assert (a, s) == (0.0, 1.0) and da == pytest.approx(1.0, rel=rtol) and abs(ds) <= 2 * delta
    # gradients at the ends are finite (no NaN from the infinite branch leaks through jnp.where)
    grads = jax.jit(jax.vmap(jax.grad(lambda t: path.d_alpha(t) + path.d_sigma_sq(t))))
    assert np.all(np.isfinite(np.asarray(grads(jnp.asarray([0.0, 1.0], dtype)))))


# ---------------------------------------------------------------------------------------------------------------
# General affine paths (issue 14): PolynomialPath, SigmaMinPath, ICFMPath, SubVPPath. Every reference is written
# out below in numpy from the papers' formulas (flow_matching's PolynomialConvexScheduler, Lipman et al. 2023
# eq. 20, torchcfm's ConditionalFlowMatcher(sigma), score_sde's subVPSDE.marginal_prob); inverses come from a
# scipy root find of the numpy λ, not from the code's closed forms. t = 0 noise, t = 1 data.
# ---------------------------------------------------------------------------------------------------------------


def _ref_poly(n):
    return dict(
        alpha=lambda t: t**n,
        sigma=lambda t: 1.0 - t**n,
        d_alpha=lambda t: n * t ** (n - 1.0),
        d_sigma=lambda t: -n * t ** (n - 1.0),
    )


def _ref_sigma_min(m):
    return dict(
        alpha=lambda t: t,
        sigma=lambda t: 1.0 - (1.0 - m) * t,
        d_alpha=lambda t: np.ones_like(t),
        d_sigma=lambda t: -(1.0 - m) * np.ones_like(t),
    )


def _ref_icfm(sig):
    # x_t = t·x1 + (1 − t)·x0 + σ·z, x0, z ~ N(0, I): the noise part has std √((1 − t)² + σ²)
    return dict(
        alpha=lambda t: t,
        sigma=lambda t: np.sqrt((1.0 - t) ** 2 + sig**2),
        d_alpha=lambda t: np.ones_like(t),
        d_sigma=lambda t: -(1.0 - t) / np.sqrt((1.0 - t) ** 2 + sig**2),
    )


def _ref_subvp(bmin=0.1, bmax=20.0):
    # score_sde subVPSDE.marginal_prob at s = 1 − t: mean coeff exp(−Γ/2), std 1 − exp(−Γ)
    def gam(t):
        s = 1.0 - t
        return 0.5 * s**2 * (bmax - bmin) + s * bmin

    def beta(t):
        return bmin + (1.0 - t) * (bmax - bmin)

    return dict(
        alpha=lambda t: np.exp(-0.5 * gam(t)),
        sigma=lambda t: 1.0 - np.exp(-gam(t)),
        d_alpha=lambda t: 0.5 * beta(t) * np.exp(-0.5 * gam(t)),
        d_sigma=lambda t: -beta(t) * np.exp(-gam(t)),
        gamma=gam,
        beta=beta,
    )


def _aff_alpha(t):
    return t


def _aff_sigma(t):
    return 1.0 - t * t


def _affp_sigma(p, t):
    return 1.0 - (1.0 - p) * t


def _ref_affine():
    return dict(
        alpha=lambda t: t,
        sigma=lambda t: 1.0 - t * t,
        d_alpha=lambda t: np.ones_like(t),
        d_sigma=lambda t: -2.0 * t,
    )


NEW_PATHS = {
    "poly2": (lambda: PolynomialPath(2.0), lambda: _ref_poly(2.0)),
    "poly_half": (lambda: PolynomialPath(0.5), lambda: _ref_poly(0.5)),
    "sigma_min": (lambda: SigmaMinPath(0.05), lambda: _ref_sigma_min(0.05)),
    "icfm": (lambda: ICFMPath(0.3), lambda: _ref_icfm(0.3)),
    "subvp": (lambda: SubVPPath(0.1, 20.0), _ref_subvp),
    "affine": (lambda: AffinePath(_aff_alpha, _aff_sigma), _ref_affine),
    "affine_params": (
        lambda: AffinePath(lambda p, t: t, _affp_sigma, params=jnp.asarray(0.05)),
        lambda: _ref_sigma_min(0.05),
    ),
}
_NEW_METHODS = (
    "alpha",
    "sigma",
    "d_alpha",
    "d_sigma",
    "sigma_sq",
    "d_sigma_sq",
    "log_snr",
    "d_log_snr",
)


@jax.jit
def _new_path_table(path, ts, lams):
    """Every method of a path at the times ``ts`` (and the inverse at ``lams``) in one program per path class."""
    out = {m: jax.vmap(getattr(path, m))(ts) for m in _NEW_METHODS}
    out["inverse"] = jax.vmap(path.t_from_log_snr)(lams)
    out["d_inverse"] = jax.vmap(jax.grad(path.t_from_log_snr))(lams)
    out["grad_alpha"] = jax.vmap(jax.grad(path.alpha))(ts)
    out["grad_sigma"] = jax.vmap(jax.grad(path.sigma))(ts)
    return out


def _np_lam(r):
    return lambda t: np.log(r["alpha"](t) ** 2 / r["sigma"](t) ** 2)


@pytest.mark.parametrize("name", list(NEW_PATHS))
def test_new_path_closed_forms(name, x64):
    """α, σ, their derivatives, σ², d(σ²)/dt, λ, λ̇ and the inverse t(λ) against numpy and finite differences."""
    import scipy.optimize

    factory, ref = NEW_PATHS[name]
    path, r = factory(), ref()
    ts = T_INTERIOR
    lam_np = _np_lam(r)
    lams = lam_np(ts)
    got = {
        k: np.asarray(v)
        for k, v in _new_path_table(path, jnp.asarray(ts), jnp.asarray(lams)).items()
    }
    for m in ("alpha", "sigma", "d_alpha", "d_sigma"):
        np.testing.assert_allclose(got[m], r[m](ts), rtol=1e-11, atol=1e-14, err_msg=m)
    for m in ("alpha", "sigma"):
        np.testing.assert_allclose(got["d_" + m], _fd(r[m], ts), rtol=1e-6, err_msg=m)
        np.testing.assert_allclose(got["grad_" + m], r["d_" + m](ts), rtol=1e-10, err_msg=m)
    np.testing.assert_allclose(got["sigma_sq"], r["sigma"](ts) ** 2, rtol=1e-11)
    np.testing.assert_allclose(got["d_sigma_sq"], _fd(lambda t: r["sigma"](t) ** 2, ts), rtol=1e-6)
    np.testing.assert_allclose(got["log_snr"], lams, rtol=1e-11, atol=1e-12)
    assert np.all(np.diff(got["log_snr"]) > 0), "λ must increase in t (t = 0 noise, t = 1 data)"
    np.testing.assert_allclose(got["d_log_snr"], _fd(lam_np, ts), rtol=1e-6)
    # the inverse: a scipy root find of the numpy λ, and dt/dλ = 1/λ̇
    roots = [
        scipy.optimize.brentq(lambda t, y=y: lam_np(t) - y, 1e-9, 1 - 1e-9, xtol=1e-15)
        for y in lams
    ]
    np.testing.assert_allclose(got["inverse"], roots, atol=1e-10)
    np.testing.assert_allclose(got["inverse"], ts, atol=1e-10)
    np.testing.assert_allclose(got["d_inverse"], 1.0 / _fd(lam_np, ts), rtol=1e-6)
    # eager agrees with the compiled table
    np.testing.assert_allclose(float(path.d_sigma(0.3)), r["d_sigma"](0.3), rtol=1e-11)


def test_new_path_ends_priors_and_clipping(x64):
    """Endpoint values, default intervals, priors (I-CFM's x_0 ~ N(0, (1 + σ²) I)) and the clipped inverse."""
    p2, ph, sm, ic, sv, af, _ = (f() for f, _ in NEW_PATHS.values())
    for p, (a0, s0, a1, s1) in [
        (p2, (0.0, 1.0, 1.0, 0.0)),
        (sm, (0.0, 1.0, 1.0, 0.05)),
        (ic, (0.0, math.sqrt(1.09), 1.0, 0.3)),
        (sv, (math.exp(-0.5 * 10.05), 1.0 - math.exp(-10.05), 1.0, 0.0)),
    ]:
        got = [float(p.alpha(0.0)), float(p.sigma(0.0)), float(p.alpha(1.0)), float(p.sigma(1.0))]
        np.testing.assert_allclose(
            got, [a0, s0, a1, s1], rtol=1e-12, atol=1e-15, err_msg=type(p).__name__
        )
        assert np.isfinite(float(p.d_sigma(1.0))) and np.isfinite(float(p.d_alpha(0.0)))
    assert (p2.t_min, p2.t_max, ph.t_min, ph.t_max, sv.t_max) == (1e-5, 1.0, 1e-5, 1.0, 1.0)
    assert PolynomialPath(1.0).t_min == 0.0
    assert float(ic.prior.scale) == pytest.approx(math.sqrt(1 + 0.09), rel=1e-14)
    assert all(float(p.prior.scale) == 1.0 for p in (p2, ph, sm, sv))
    # sub-VP's data end is regular: σ̇_1 = −β_min (VP's is −∞)
    np.testing.assert_allclose(float(sv.d_sigma(1.0)), -0.1, rtol=1e-12)
    assert float(af.prior.scale) == 1.0 and (af.t_min, af.t_max) == (0.0, 1.0)
    for p in (p2, ph, sm, ic, sv, af):
        lo, hi = float(p.t_from_log_snr(-1e4)), float(p.t_from_log_snr(1e4))
        assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(1.0, abs=1e-12), type(
            p
        ).__name__


def test_subvp_diffusion_is_score_sde(x64):
    """g² = σ²λ̇ of the reverse SDE is score_sde's sub-VP diffusion β(s)(1 − e^{−2Γ(s)})."""
    from diffjax.fields import ForwardSDEDiffusion

    r = _ref_subvp()
    g = jax.vmap(ForwardSDEDiffusion(SubVPPath()))(jnp.asarray(T_INTERIOR))
    want = r["beta"](T_INTERIOR) * (1.0 - np.exp(-2.0 * r["gamma"](T_INTERIOR)))
    np.testing.assert_allclose(np.asarray(g) ** 2, want, rtol=1e-10)


def test_new_path_parameters_grad_vmap_no_recompile(x64):
    """Parameters are leaves: grad vs finite differences of the numpy forms, vmap over them, one trace."""
    t = 0.4
    checks = [
        (lambda v: PolynomialPath(v).sigma(t), lambda v: _ref_poly(v)["sigma"](t), 2.5),
        (lambda v: SigmaMinPath(v).log_snr(t), lambda v: _np_lam(_ref_sigma_min(v))(t), 0.05),
        (lambda v: ICFMPath(v).sigma(t), lambda v: _ref_icfm(v)["sigma"](t), 0.3),
        (lambda v: SubVPPath(v, 20.0).sigma(t), lambda v: _ref_subvp(v)["sigma"](t), 0.1),
        (lambda v: ICFMPath(v).t_from_log_snr(0.5), None, 0.3),
        # AffinePath's bisection inverse: implicit gradient vs the closed form t = 1/(e^{−λ/2} + 1 − p)
        (
            lambda v: AffinePath(lambda p, t: t, _affp_sigma, params=v).t_from_log_snr(0.5),
            lambda v: 1.0 / (np.exp(-0.25) + 1.0 - v),
            0.05,
        ),
    ]
    for f, ref, v in checks:
        g = float(jax.grad(f)(v))
        if (
            ref is None
        ):  # dt/dσ at fixed λ by finite differences of the code's inverse (implicit function)
            fd = (float(f(v + 1e-6)) - float(f(v - 1e-6))) / 2e-6
        else:
            fd = (ref(v + 1e-6) - ref(v - 1e-6)) / 2e-6
        np.testing.assert_allclose(g, fd, rtol=1e-6)
    vs = jnp.asarray([0.1, 0.2, 0.4])
    np.testing.assert_allclose(
        np.asarray(jax.vmap(lambda v: ICFMPath(v).sigma(t))(vs)),
        [_ref_icfm(float(v))["sigma"](t) for v in vs],
        rtol=1e-12,
    )
    traces = []

    @jax.jit
    def f(path, t):
        traces.append(1)
        return path.alpha(t) + path.d_sigma_sq(t) + path.t_from_log_snr(path.log_snr(t))

    for s in (0.1, 0.2, 0.5):
        f(ICFMPath(s), jnp.asarray(0.3))
    assert len(traces) == 1


def test_new_path_bad_arguments():
    for make, arg in [
        (lambda: PolynomialPath(0.0), "exponent"),
        (lambda: PolynomialPath(-1.0), "exponent"),
        (lambda: PolynomialPath(float("nan")), "exponent"),
        (lambda: SigmaMinPath(1.0), "sigma_min"),
        (lambda: SigmaMinPath(-0.1), "sigma_min"),
        (lambda: ICFMPath(0.0), "sigma"),
        (lambda: ICFMPath(-0.2), "sigma"),
        (lambda: SubVPPath(20.0, 0.1), "beta_min"),
        (lambda: SubVPPath(0.1, 20.0, t_eps=0.7), "t_eps"),
        (lambda: AffinePath(_aff_alpha, lambda t: 1.0 - t + 2.0 * t * t), "strictly increasing"),
        (lambda: AffinePath(lambda t: t - 0.5, _aff_sigma), "alpha"),
        (lambda: AffinePath(_aff_alpha, lambda t: 0.5 - t), "sigma"),
        (lambda: AffinePath(0.5, _aff_sigma), "functions"),
    ]:
        with pytest.raises(ValueError, match=arg):
            make()
    # negative control: the edges of the valid ranges are accepted
    PolynomialPath(1e-3), SigmaMinPath(0.0), ICFMPath(1e-6), SubVPPath(0.1, 0.2)
    AffinePath(_aff_alpha, lambda t: 1.0 - t + 2.0 * t * t, check=False)


# --- the new paths through conversions, samplers and likelihoods, against the Gaussian-mixture oracle ----------
_W = np.array([0.4, 0.6])
_MU = np.array([[-1.0, 0.5], [1.5, -0.5]])
_S2 = np.array([[0.3, 0.2], [0.1, 0.4]])


def _np_mixture(path_ref, t, x):
    """(log p_t(x), u_t(x)) of the mixture data on a path, written out in numpy/scipy (formula sheet §6.1)."""
    a, s = path_ref["alpha"](t), path_ref["sigma"](t)
    da, ds = path_ref["d_alpha"](t), path_ref["d_sigma"](t)
    c = a**2 * _S2 + s**2
    logj = np.log(_W) + np.array(
        [scipy.stats.multivariate_normal(a * _MU[k], np.diag(c[k])).logpdf(x) for k in range(2)]
    )
    r = np.exp(logj - scipy.special.logsumexp(logj))
    uk = da * _MU + (a * da * _S2 + s * ds) / c * (x - a * _MU)
    return scipy.special.logsumexp(logj), r @ uk


@jax.jit
def _kinds_to_velocity(mix, path, t, x):
    """The oracle's prediction of every kind at (t, x), converted to a velocity by diffjax.convert."""
    from diffjax.targets import convert

    kinds = ("eps", "data", "v", "score", "velocity")
    return jnp.stack(
        [
            convert(mix.predict(k, path, t, x), src=k, dst="velocity", path=path, t=t, x_t=x)
            for k in kinds
        ]
    )


@pytest.mark.parametrize("name", ["poly2", "sigma_min", "icfm", "subvp", "affine"])
def test_new_paths_convert_and_sample(name, x64):
    """Every kind converts to the numpy velocity of the mixture; DPM-Solver++(2M) on one Gaussian N(μ, diag(s²))
    lands on the closed-form flow map x₁ = α₁μ + √(C₁/C₀)·(x₀ − α₀μ), C = α²s² + σ² (the PF-ODE keeps
    (x − αμ)/√C constant)."""
    from diffjax import GaussianMixture, sample

    factory, ref = NEW_PATHS[name]
    path, r = factory(), ref()
    mix = GaussianMixture(_W, _MU, _S2)
    x = jnp.asarray([0.3, -0.2])
    for t in (0.3, 0.8):
        _, u_np = _np_mixture(r, t, np.asarray(x))
        got = np.asarray(_kinds_to_velocity(mix, path, jnp.asarray(t), x))
        np.testing.assert_allclose(got, np.broadcast_to(u_np, got.shape), rtol=1e-9, atol=1e-10)
    mu, s2 = _MU[1], _S2[1]
    gauss = GaussianMixture([1.0], mu[None], s2[None])
    lo, hi = float(path.t_min), float(path.t_max)
    x0 = np.array([0.7, -1.1]) * float(path.prior.scale)

    def flow(x0):
        c = lambda t: r["alpha"](t) ** 2 * s2 + r["sigma"](t) ** 2  # noqa: E731
        return r["alpha"](hi) * mu + np.sqrt(c(hi) / c(lo)) * (x0 - r["alpha"](lo) * mu)

    key = jax.random.PRNGKey(0)
    got = sample(
        "dpmpp_2m", gauss.model("velocity", path), "velocity", path, key, num_steps=64, x0=x0
    )
    assert int(got.nfe) == 64
    # second order on the log-SNR grid: 64 steps leave 2.5e-4 (I-CFM) to 4.1e-3 (PolynomialPath(2), λ ∈ [−28, 12])
    np.testing.assert_allclose(np.asarray(got.samples), flow(x0), atol=6e-3)
    assert (
        np.max(np.abs(np.asarray(got.samples) - flow(x0 + 0.05))) > 0.01
    )  # control: another start


@pytest.mark.parametrize("name", ["poly2", "icfm", "subvp", "affine"])
def test_new_paths_exact_likelihood(name, x64):
    """log_likelihood (default linear-path time: τ = tⁿ for PolynomialPath, a root find per step for AffinePath)
    of the oracle's velocity equals the numpy log p_{t1}. The path's own prior is exact for I-CFM
    (N(0, (1 + σ²) I)), PolynomialPath and AffinePath; sub-VP's α_0 ≠ 0 gets the exact p_{t0}."""
    import equinox as eqx

    from diffjax import GaussianMixture, log_likelihood, velocity_field

    factory, ref = NEW_PATHS[name]
    path, r = factory(), ref()
    mix = GaussianMixture(_W, _MU, _S2)
    t0, t1 = float(path.t_min), float(path.t_max)
    u = velocity_field(mix.model("velocity", path), "velocity", path)
    prior = eqx.Partial(mix.marginal_log_prob, path, jnp.asarray(t0)) if name == "subvp" else None
    xs = [jnp.asarray([0.3, -0.2]), jnp.asarray([-1.2, 0.9])]
    got = [
        float(log_likelihood(u, path, x, prior_log_prob=prior, rtol=1e-9, atol=1e-9)) for x in xs
    ]
    want = [_np_mixture(r, t1, np.asarray(x))[0] for x in xs]
    np.testing.assert_allclose(got, want, atol=1e-4)
