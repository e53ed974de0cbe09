"""Tests for diffjax.targets against the formula sheet (formulas-detailed.md §1.1–§1.3) written out in numpy.

Time convention: t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε.
Coefficients (α, σ, α̇, σ̇) come from independent numpy closed forms (sheet §1.4), not from diffjax.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from diffjax.paths import CosinePath, EDMPath, LinearPath, LogSNRPath, VEPath, VPPath
from diffjax.targets import (
    KINDS,
    conditional_score,
    conditional_velocity,
    convert,
    error_scale_sq,
    interpolate,
    target,
)

SHIFT = 3.0


def _shifted_logit(t):
    return 2.0 * (jnp.log(t) - jnp.log1p(-t)) - 2.0 * math.log(SHIFT)


# ---------------------------------------------------------------------------------------------------------------
# numpy coefficients (α, σ, α̇, σ̇) from the sheet's §1.4
# ---------------------------------------------------------------------------------------------------------------


def _np_linear(t):
    return t, 1.0 - t, 1.0, -1.0


def _np_cosine(t):
    h = np.pi / 2
    return np.sin(h * t), np.cos(h * t), h * np.cos(h * t), -h * np.sin(h * t)


def _np_vp(t, bmin=0.1, bmax=20.0):
    s = 1.0 - t
    a = np.exp(-0.25 * s**2 * (bmax - bmin) - 0.5 * s * bmin)
    sig = np.sqrt(1.0 - a**2)
    da = 0.5 * (bmin + s * (bmax - bmin)) * a
    return a, sig, da, -a * da / sig


def _np_ve(t, smin=0.01, smax=50.0):
    sig = smin * (smax / smin) ** (1.0 - t)
    return 1.0, sig, 0.0, -sig * np.log(smax / smin)


def _np_edm(t, smin=0.002, smax=80.0, rho=7.0):
    A, B = smax ** (1 / rho), smin ** (1 / rho)
    base = A + t * (B - A)
    return 1.0, base**rho, 0.0, rho * base ** (rho - 1) * (B - A)


def _np_logsnr(t, k=SHIFT):
    n = np.sqrt(t**2 + k**2 * (1 - t) ** 2)
    a, sig = t / n, k * (1 - t) / n
    ldot = 2.0 / (t * (1 - t))
    return a, sig, 0.5 * a * sig**2 * ldot, -0.5 * sig * a**2 * ldot


PATHS = {
    "linear": (LinearPath, _np_linear),
    "cosine": (CosinePath, _np_cosine),
    "vp": (lambda: VPPath(0.1, 20.0), _np_vp),
    "ve": (lambda: VEPath(0.01, 50.0), _np_ve),
    "edm": (lambda: EDMPath(0.002, 80.0, 7.0), _np_edm),
    "logsnr": (lambda: LogSNRPath(_shifted_logit), _np_logsnr),
}
NAMES = list(PATHS)
TS = (0.1, 0.5, 0.9)
SHAPE = (2, 3)


def _draw(seed, n=3):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=SHAPE) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# the sheet's §1.3 conversion table in numpy (x = x_t)
# ---------------------------------------------------------------------------------------------------------------


def _ref_target(kind, c, x0, e):
    a, s, da, ds = c
    return {
        "eps": e,
        "data": x0,
        "v": a * e - s * x0,
        "velocity": da * x0 + ds * e,
        "score": -e / s,
    }[kind]


def _ref_convert(src, dst, p, x, c):
    """Sheet §1.3, row ``src``, column ``dst``; 'via' entries compose through (x̂, ε̂)."""
    a, s, da, ds = c
    D = da * s - ds * a
    lam_dot = 2 * (da / a - ds / s)
    if src == dst:
        return p
    if dst == "v":  # definition v = αε − σx
        return a * _ref_convert(src, "eps", p, x, c) - s * _ref_convert(src, "data", p, x, c)
    table = {
        ("eps", "data"): lambda: (x - s * p) / a,
        ("eps", "score"): lambda: -p / s,
        ("eps", "velocity"): lambda: (da / a) * x - (s * lam_dot / 2) * p,
        ("data", "eps"): lambda: (x - a * p) / s,
        ("data", "score"): lambda: -(x - a * p) / s**2,
        ("data", "velocity"): lambda: (ds / s) * x + (D / s) * p,
        ("velocity", "data"): lambda: (s * p - ds * x) / D,
        ("velocity", "eps"): lambda: (da * x - a * p) / D,
        ("velocity", "score"): lambda: (a * p - da * x) / (s * D),
        ("score", "data"): lambda: (x + s**2 * p) / a,
        ("score", "eps"): lambda: -s * p,
        ("score", "velocity"): lambda: (da / a) * x + (s**2 * lam_dot / 2) * p,
        ("v", "data"): lambda: (a * x - s * p) / (a**2 + s**2),
        ("v", "eps"): lambda: (s * x + a * p) / (a**2 + s**2),
        ("v", "score"): lambda: -((s * x + a * p) / (a**2 + s**2)) / s,
        ("v", "velocity"): lambda: (
            da * ((a * x - s * p) / (a**2 + s**2)) + ds * ((s * x + a * p) / (a**2 + s**2))
        ),
    }
    return table[(src, dst)]()


def _ref_kappa_sq(kind, c):
    a, s, da, ds = c
    lam_dot = 2 * (da / a - ds / s)
    return {
        "eps": 1.0,
        "data": s**2 / a**2,
        "v": (a**2 + s**2) ** 2 / a**2,
        "velocity": s**2 * lam_dot**2 / 4,
        "score": 1 / s**2,
    }[kind]


def _np(a):
    return np.asarray(a, dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# interpolate / conditional quantities / target
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_interpolate_and_targets(name, x64):
    factory, cf = PATHS[name]
    path = factory()
    x0, e, _ = _draw(0)
    for t in TS:
        c = cf(np.float64(t))
        a, s, da, ds = c
        xt = _np(interpolate(path, t, jnp.asarray(x0), jnp.asarray(e)))
        np.testing.assert_allclose(xt, a * x0 + s * e, rtol=1e-12, atol=1e-13)
        for kind in KINDS:
            got = _np(target(kind, path, t, jnp.asarray(x0), jnp.asarray(e)))
            np.testing.assert_allclose(
                got, _ref_target(kind, c, x0, e), rtol=1e-11, atol=1e-12, err_msg=kind
            )


@pytest.mark.parametrize("name", NAMES)
def test_conditional_velocity(name, x64):
    """u_t(x_t|x) = α̇x + σ̇ε = d/dt x_t along fixed (x, ε) (sheet §1.1)."""
    factory, cf = PATHS[name]
    path = factory()
    x0, e, _ = _draw(1)
    h = 1e-6
    for t in TS:
        a, s, da, ds = cf(np.float64(t))
        xt = a * x0 + s * e
        got = _np(conditional_velocity(path, t, jnp.asarray(xt), jnp.asarray(x0)))
        np.testing.assert_allclose(got, da * x0 + ds * e, rtol=1e-10, atol=1e-11)
        ap, sp, _, _ = cf(np.float64(t + h))
        am, sm, _, _ = cf(np.float64(t - h))
        fd = ((ap - am) * x0 + (sp - sm) * e) / (2 * h)
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-7)
        # and d/dt of diffjax's own interpolate via jax.jvp along fixed (x, ε)
        _, tangent = jax.jvp(
            lambda tt: interpolate(path, tt, jnp.asarray(x0), jnp.asarray(e)),
            (jnp.asarray(t),),
            (jnp.asarray(1.0),),
        )
        np.testing.assert_allclose(_np(tangent), got, rtol=1e-10, atol=1e-11)
        # and the velocity target from the same (x, ε)
        np.testing.assert_allclose(
            _np(target("velocity", path, t, jnp.asarray(x0), jnp.asarray(e))), got, rtol=1e-10
        )


def _gauss_logpdf(xt, mean, std):
    d = xt.size
    return (
        -0.5 * jnp.sum(((xt - mean) / std) ** 2) - d * jnp.log(std) - 0.5 * d * jnp.log(2 * jnp.pi)
    )


@pytest.mark.parametrize("name", NAMES)
def test_conditional_score(name, x64):
    """∇_{x_t} log N(x_t; αx, σ²I) = −ε/σ (sheet §1.1)."""
    factory, cf = PATHS[name]
    path = factory()
    x0, e, _ = _draw(2)
    for t in TS:
        a, s, _, _ = cf(np.float64(t))
        xt = a * x0 + s * e
        got = _np(conditional_score(path, t, jnp.asarray(xt), jnp.asarray(x0)))
        np.testing.assert_allclose(got, -e / s, rtol=1e-10, atol=1e-12)
        auto = jax.grad(_gauss_logpdf)(jnp.asarray(xt), jnp.asarray(a * x0), jnp.asarray(s))
        np.testing.assert_allclose(got, _np(auto), rtol=1e-10, atol=1e-12)
        # scipy log-density, central differences in each coordinate
        flat = xt.ravel()
        h = 1e-5 * max(s, 1e-3)
        fd = np.empty_like(flat)
        for i in range(flat.size):
            up, dn = flat.copy(), flat.copy()
            up[i] += h
            dn[i] -= h
            lp = scipy.stats.norm.logpdf(up, loc=(a * x0).ravel(), scale=s).sum()
            ld = scipy.stats.norm.logpdf(dn, loc=(a * x0).ravel(), scale=s).sum()
            fd[i] = (lp - ld) / (2 * h)
        np.testing.assert_allclose(got.ravel(), fd, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_convert_all_pairs_vs_sheet(name, x64):
    factory, cf = PATHS[name]
    path = factory()
    x0, e, p = _draw(3)
    for t in TS:
        c = cf(np.float64(t))
        xt = c[0] * x0 + c[1] * e
        for src, dst in itertools.product(KINDS, KINDS):
            got = _np(
                convert(jnp.asarray(p), src=src, dst=dst, path=path, t=t, x_t=jnp.asarray(xt))
            )
            want = _ref_convert(src, dst, p, xt, c)
            scale = np.max(np.abs(want)) + 1.0
            np.testing.assert_allclose(
                got, want, rtol=1e-9, atol=1e-10 * scale, err_msg=f"{src}->{dst} at t={t}"
            )
            # consistency: converting the exact src target gives the exact dst target
            y_src = _ref_target(src, c, x0, e)
            y = _np(
                convert(jnp.asarray(y_src), src=src, dst=dst, path=path, t=t, x_t=jnp.asarray(xt))
            )
            np.testing.assert_allclose(
                y,
                _ref_target(dst, c, x0, e),
                rtol=1e-9,
                atol=1e-10 * (np.max(np.abs(y)) + 1),
                err_msg=f"{src}->{dst} at t={t}",
            )


@pytest.mark.parametrize("name", NAMES)
def test_convert_round_trips(name, x64):
    factory, cf = PATHS[name]
    path = factory()
    x0, e, p = _draw(4)
    for t in TS:
        c = cf(np.float64(t))
        xt = jnp.asarray(c[0] * x0 + c[1] * e)
        for src, dst in itertools.product(KINDS, KINDS):
            y = convert(jnp.asarray(p), src=src, dst=dst, path=path, t=t, x_t=xt)
            back = _np(convert(y, src=dst, dst=src, path=path, t=t, x_t=xt))
            np.testing.assert_allclose(back, p, rtol=1e-12, atol=1e-12, err_msg=f"{src}<->{dst}")


def test_score_to_velocity_identity(x64):
    """Sheet §1.2: u = (σ²α̇/α − σ̇σ)s + (α̇/α)x, and σ²α̇/α − σ̇σ = σ²λ̇/2."""
    path = VPPath(0.1, 20.0)
    _, _, s_hat = _draw(5)
    xt = _draw(6)[0]
    for t in (0.05, 0.5, 0.95):
        a, s, da, ds = _np_vp(t)
        want = (s**2 * da / a - ds * s) * s_hat + (da / a) * xt
        got = convert(jnp.asarray(s_hat), src="score", dst="velocity", path=path, t=t, x_t=xt)
        np.testing.assert_allclose(_np(got), want, rtol=1e-11)
        lam_dot = float(path.d_log_snr(t))
        np.testing.assert_allclose(s**2 * da / a - ds * s, s**2 * lam_dot / 2, rtol=1e-10)
    # negative control: dropping the ½ breaks the identity
    a, s, da, ds = _np_vp(0.5)
    got = _np(convert(jnp.asarray(s_hat), src="score", dst="velocity", path=path, t=0.5, x_t=xt))
    wrong = s**2 * float(path.d_log_snr(0.5)) * s_hat + (da / a) * xt
    assert not np.allclose(got, wrong, rtol=1e-3)


def test_cosine_velocity_is_minus_half_pi_v(x64):
    path = CosinePath()
    x0, e, v_hat = _draw(7)
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        u = target("velocity", path, t, jnp.asarray(x0), jnp.asarray(e))
        v = target("v", path, t, jnp.asarray(x0), jnp.asarray(e))
        np.testing.assert_allclose(_np(u), -(np.pi / 2) * _np(v), rtol=1e-12, atol=1e-14)
        xt = jnp.asarray(np.sin(np.pi * t / 2) * x0 + np.cos(np.pi * t / 2) * e)
        conv = convert(jnp.asarray(v_hat), src="v", dst="velocity", path=path, t=t, x_t=xt)
        np.testing.assert_allclose(_np(conv), -(np.pi / 2) * v_hat, rtol=1e-12, atol=1e-14)


REGULAR_AT_NOISE_END = [  # α = 0 at t = 0
    ("data", "velocity"),
    ("v", "eps"),
    ("eps", "score"),
    ("score", "eps"),
    ("v", "data"),
    ("data", "v"),
    ("velocity", "eps"),
    ("velocity", "data"),
]
REGULAR_AT_DATA_END = [  # σ = 0 at t = 1 (LinearPath)
    ("eps", "velocity"),
    ("eps", "data"),
    ("v", "eps"),
    ("v", "data"),
    ("v", "velocity"),
    ("velocity", "data"),
]


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("src,dst", REGULAR_AT_NOISE_END)
def test_convert_regular_at_noise_end(name, src, dst, x64):
    factory, cf = PATHS[name]
    path = factory()
    x0, e, p = _draw(8)
    a, s, da, ds = cf(np.float64(0.0))
    assert a == 0.0
    xt = s * e
    got = _np(convert(jnp.asarray(p), src=src, dst=dst, path=path, t=0.0, x_t=jnp.asarray(xt)))
    assert np.all(np.isfinite(got))
    # limit value: compare with the sheet formula just inside (t = 1e-7)
    tin = 1e-7
    c = cf(np.float64(tin))
    want = _ref_convert(src, dst, p, xt, c)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src,dst", REGULAR_AT_DATA_END)
def test_convert_regular_at_data_end_linear(src, dst, x64):
    path = LinearPath()
    x0, e, p = _draw(9)
    xt = x0  # α = 1, σ = 0
    got = _np(convert(jnp.asarray(p), src=src, dst=dst, path=path, t=1.0, x_t=jnp.asarray(xt)))
    assert np.all(np.isfinite(got))
    want = _ref_convert(src, dst, p, xt, _np_linear(np.float64(1 - 1e-9)))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # the exact targets at t = 1: v = ε, u = x − ε, x̂ = x_t
    with np.errstate(divide="ignore"):
        y_src = _ref_target(src, _np_linear(1.0), x0, e)
    y = _np(convert(jnp.asarray(y_src), src=src, dst=dst, path=path, t=1.0, x_t=jnp.asarray(xt)))
    with np.errstate(divide="ignore"):
        y_want = _ref_target(dst, _np_linear(1.0), x0, e)
    np.testing.assert_allclose(y, y_want, atol=1e-12)


def test_targets_finite_at_endpoints_linear(x64):
    path = LinearPath()
    x0, e, _ = (jnp.asarray(a) for a in _draw(10))
    for kind in ("eps", "data", "v", "velocity"):
        for t in (0.0, 1.0):
            assert np.all(np.isfinite(_np(target(kind, path, t, x0, e)))), (kind, t)
    np.testing.assert_allclose(_np(target("velocity", path, 1.0, x0, e)), _np(x0 - e))


# ---------------------------------------------------------------------------------------------------------------
# error scale κ²
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_error_scale_sq_with_real_conversion(name, x64):
    factory, cf = PATHS[name]
    path = factory()
    x0, e, e_hat = _draw(11)
    for t in TS:
        c = cf(np.float64(t))
        xt = c[0] * x0 + c[1] * e
        err_eps = np.sum((e_hat - e) ** 2)
        for kind in KINDS:
            y = _ref_target(kind, c, x0, e)
            y_hat = _ref_convert("eps", kind, e_hat, xt, c) if kind != "eps" else e_hat
            kappa_sq = float(error_scale_sq(kind, path, t))
            np.testing.assert_allclose(
                np.sum((y_hat - y) ** 2), kappa_sq * err_eps, rtol=1e-9, err_msg=kind
            )
            np.testing.assert_allclose(kappa_sq, _ref_kappa_sq(kind, c), rtol=1e-10, err_msg=kind)
            # also through diffjax's own convert
            y_hat2 = _np(convert(jnp.asarray(e_hat), src="eps", dst=kind, path=path, t=t, x_t=xt))
            np.testing.assert_allclose(np.sum((y_hat2 - y) ** 2), kappa_sq * err_eps, rtol=1e-9)
        # negative control: velocity κ² without the ¼ is wrong
        a, s, da, ds = c
        wrong = s**2 * (2 * (da / a - ds / s)) ** 2
        assert not math.isclose(float(error_scale_sq("velocity", path, t)), wrong, rel_tol=1e-3)


@pytest.mark.parametrize("name", ["cosine", "vp", "logsnr"])
def test_error_scale_sq_vp_identities(name, x64):
    """VP paths (α² + σ² = 1): κ²_v = 1/α² = 1 + e^{−λ}; κ²_data = e^{−λ}."""
    factory, cf = PATHS[name]
    path = factory()
    for t in TS:
        a, s, _, _ = cf(np.float64(t))
        lam = np.log(a**2 / s**2)
        np.testing.assert_allclose(
            float(error_scale_sq("v", path, t)), 1 + np.exp(-lam), rtol=1e-10
        )
        np.testing.assert_allclose(float(error_scale_sq("data", path, t)), np.exp(-lam), rtol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# jit / vmap / grad
# ---------------------------------------------------------------------------------------------------------------


def _all_targets(path, t, x0, e):
    xt = interpolate(path, t, x0, e)
    out = {
        "interpolate": xt,
        "cond_velocity": conditional_velocity(path, t, xt, x0),
        "cond_score": conditional_score(path, t, xt, x0),
    }
    for kind in KINDS:
        out["target_" + kind] = target(kind, path, t, x0, e)
    for kind in ("v", "velocity"):
        out["kappa_" + kind] = error_scale_sq(kind, path, t)
    for src, dst in JIT_PAIRS:
        out[f"{src}->{dst}"] = convert(e * 0.7 + x0, src=src, dst=dst, path=path, t=t, x_t=xt)
    return out


# a few representative pairs (the numbers of all 20 are checked against the sheet above); more would
# only slow compilation
JIT_PAIRS = [("score", "velocity"), ("velocity", "score"), ("data", "v"), ("eps", "data")]


def _close(got, want, k):
    want = _np(want)
    atol = 1e-14 * (np.max(np.abs(want)) + 1.0)  # XLA fusion may reorder a cancelling sum
    np.testing.assert_allclose(_np(got), want, rtol=1e-12, atol=atol, err_msg=k)


# the targets code is path-agnostic; path-level jit/vmap equality for every path is in test_paths.py
@pytest.mark.parametrize("name", ["vp", "logsnr"])
def test_jit_vmap_match_eager(name, x64):
    path = PATHS[name][0]()
    x0, e, _ = (jnp.asarray(a) for a in _draw(12))
    xs = jnp.stack([x0, x0 + 1.0, -x0])
    es = jnp.stack([e, 2 * e, e - 1.0])
    ts = jnp.asarray([0.1, 0.5, 0.9])
    eager_t = [_all_targets(path, float(t), x0, e) for t in ts]
    eager_x = [_all_targets(path, 0.5, xs[i], es[i]) for i in range(3)]
    jit_out = jax.jit(_all_targets)(path, ts[1], x0, e)
    vt = jax.jit(jax.vmap(_all_targets, in_axes=(None, 0, None, None)))(path, ts, x0, e)

    def small(path, t, x0, e):  # un-jitted vmap is op-by-op: keep it small
        xt = interpolate(path, t, x0, e)
        return {
            "target_velocity": target("velocity", path, t, x0, e),
            "score->velocity": convert(
                e * 0.7 + x0, src="score", dst="velocity", path=path, t=t, x_t=xt
            ),
            "kappa_velocity": error_scale_sq("velocity", path, t),
        }

    vt_eager = jax.vmap(small, in_axes=(None, 0, None, None))(path, ts, x0, e)
    vx_eager = jax.vmap(small, in_axes=(None, None, 0, 0))(path, 0.5, xs, es)
    vx = jax.jit(jax.vmap(_all_targets, in_axes=(None, None, 0, 0)))(path, 0.5, xs, es)
    for k in eager_t[0]:
        _close(jit_out[k], eager_t[1][k], k)
        for i in range(3):
            _close(vt[k][i], eager_t[i][k], k)
            _close(vx[k][i], eager_x[i][k], k)
            if k in vt_eager:
                _close(vt_eager[k][i], eager_t[i][k], k)
                _close(vx_eager[k][i], eager_x[i][k], k)


@pytest.mark.parametrize("name", NAMES)
def test_grad_through_targets(name, x64):
    factory, cf = PATHS[name]
    path = factory()
    x0, e, w = _draw(13)
    h = 1e-6

    def f(t):  # one scalar per kind, differentiated together (one compilation)
        return jnp.stack(
            [
                jnp.sum(jnp.asarray(w) * target(k, path, t, jnp.asarray(x0), jnp.asarray(e)))
                for k in KINDS
            ]
        )

    def f_np(t):
        return np.array([np.sum(w * _ref_target(k, cf(np.float64(t)), x0, e)) for k in KINDS])

    ts = jnp.asarray([0.3, 0.7])
    g = jax.jit(jax.vmap(jax.jacfwd(f)))(ts)
    g_rev = jax.jit(jax.vmap(jax.jacrev(f)))(ts)
    for i, t in enumerate((0.3, 0.7)):
        fd = (f_np(t + h) - f_np(t - h)) / (2 * h)
        np.testing.assert_allclose(_np(g[i]), fd, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(_np(g_rev[i]), fd, rtol=1e-6, atol=1e-7)
    # grad w.r.t. the prediction of a conversion is the (linear) coefficient: data -> eps is −α/σ
    a, s, _, _ = cf(np.float64(0.4))
    xt = jnp.asarray(a * x0 + s * e)
    g = jax.grad(lambda p: jnp.sum(convert(p, src="data", dst="eps", path=path, t=0.4, x_t=xt)))(
        jnp.asarray(w)
    )
    np.testing.assert_allclose(_np(g), np.full(SHAPE, -a / s), rtol=1e-11)


def test_targets_under_jit_do_not_recompile_for_new_path_values(x64):
    traces = []

    @jax.jit
    def f(path, t, x0, e):
        traces.append(1)
        return target("velocity", path, t, x0, e)

    x0, e, _ = (jnp.asarray(a) for a in _draw(14))
    f(VPPath(0.1, 20.0), 0.5, x0, e)
    out = f(VPPath(0.3, 20.0), 0.5, x0, e)
    assert len(traces) == 1
    a, s, da, ds = _np_vp(0.5, bmin=0.3)
    np.testing.assert_allclose(_np(out), da * _np(x0) + ds * _np(e), rtol=1e-12)


def test_float32_dtypes():
    path = VPPath()
    x0 = jnp.ones(SHAPE)
    for kind in KINDS:
        assert target(kind, path, 0.5, x0, x0).dtype == jnp.float32
    assert convert(x0, src="score", dst="velocity", path=path, t=0.5, x_t=x0).dtype == jnp.float32
    assert error_scale_sq("velocity", path, 0.5).dtype == jnp.float32


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_unknown_kind_raises():
    path = LinearPath()
    x = jnp.ones(3)
    with pytest.raises(ValueError, match="x0"):
        target("x0", path, 0.5, x, x)
    with pytest.raises(ValueError, match="src"):
        convert(x, src="noise", dst="eps", path=path, t=0.5, x_t=x)
    with pytest.raises(ValueError, match="dst"):
        convert(x, src="eps", dst="flow", path=path, t=0.5, x_t=x)
    with pytest.raises(ValueError):
        error_scale_sq("epsilon", path, 0.5)


def test_shape_mismatch_raises():
    path = LinearPath()
    a, b = jnp.ones(3), jnp.ones(4)
    with pytest.raises(ValueError, match="shape"):
        interpolate(path, 0.5, a, b)
    with pytest.raises(ValueError, match="shape"):
        conditional_velocity(path, 0.5, a, b)
    with pytest.raises(ValueError, match="shape"):
        conditional_score(path, 0.5, a, b)
    with pytest.raises(ValueError, match="shape"):
        target("eps", path, 0.5, a, b)
    with pytest.raises(ValueError, match="shape"):
        convert(a, src="eps", dst="data", path=path, t=0.5, x_t=jnp.ones((3, 1)))


def _assert_time_error(fn, *args):
    with pytest.raises(Exception) as info:
        jax.block_until_ready(fn(*args))
    msg = str(info.value)
    assert "t must lie in" in msg or "t is NaN" in msg, msg


_X3 = jnp.ones(3)
_BAD_T_FNS = [
    lambda p, t: interpolate(p, t, _X3, _X3),
    lambda p, t: conditional_velocity(p, t, _X3, _X3),
    lambda p, t: conditional_score(p, t, _X3, _X3),
    lambda p, t: target("v", p, t, _X3, _X3),
    lambda p, t: convert(_X3, src="eps", dst="velocity", path=p, t=t, x_t=_X3),
    lambda p, t: error_scale_sq("data", p, t),
]
_BAD_T_JITTED = [jax.jit(fn) for fn in _BAD_T_FNS]


@pytest.mark.parametrize("i", range(len(_BAD_T_FNS)))
def test_bad_time_raises_eager_and_jit(i):
    path = VPPath()
    for bad in (1.5, -0.1, float("nan")):
        _assert_time_error(_BAD_T_FNS[i], path, bad)
        _assert_time_error(_BAD_T_JITTED[i], path, bad)
