"""One generic gradient check over the public differentiable API: reverse-mode ``jax.jit(jax.grad)`` and, where
the function is not itself one compiled program, eager ``jax.grad`` against central finite differences, in
float64.

Time convention (as everywhere in diffjax): t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε and
λ_t = log(α_t²/σ_t²) increases in t.

Table-driven: every entry of ``CASES`` is a scalar function f(θ) of a small float64 vector θ built from one public
diffjax function (vector outputs are reduced with fixed weights, ``_proj``), and θ collects everything the
function is differentiable in (times, log-SNRs, examples, model parameters, path and sampler parameters).
Randomness is fixed (fixed keys, probes, dequantisation noise), so f is a deterministic smooth function of θ.

Calibration of the reference. The central difference (f(θ + h_i·e_i) − f(θ − h_i·e_i))/(2h_i), with the step
relative to the coordinate (h_i = h·max(|θ_i|, 0.1), h = 1e-5), has truncation error h_i²·|f'''|/6 and rounding
error about ε·|f|/h_i; with ε = 2.2e-16 both are ~1e-11 relative for the O(1)-scaled functions here, so the
default rtol of 1e-6 leaves a wide margin (measured: the worst case agrees to 2e-9 of ‖∇f‖_∞) and still catches
any gradient error above one part in a million (the negative controls at the end include a 1e-4 relative error,
a halved gradient and detached parameters). The test also checks that the reference itself is converged: the
differences at h and 2h agree to a quarter of the tolerance. Adaptive ODE solves are only smooth in θ up to the
solver tolerance (the accepted steps move with θ), so those cases run at rtol = atol = 1e-10 with h = 1e-4 and
rtol = 1e-5; fixed-grid solves are compared as tightly as closed forms. Errors are measured in the max norm
relative to the gradient's max norm.

Where a closed form is known the case also carries it (``exact``), e.g. t_from_log_snr of a learned
LogSNRPath λ(t) = a·logit(t) + b, whose inverse is t = sigmoid((λ − b)/a): dt/dλ = 1/λ̇(t) and
dt/d(a, b) = −(∂λ/∂(a, b))/λ̇(t), a gradient that used to be silently zero.

Two cases guard library bugs this table found (NaN gradients of a LogSNRPath at an end where λ = ±∞, and of
time_grid's λ-grids there; both fixed by evaluating λ only at finite points, the infinite end chosen without
gradient).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax as dj

# Module-level constants are numpy float64 (never jnp arrays: they would be float32 at import time).
T = 0.35  # an interior time (t = 0 noise, t = 1 data)
X = np.array([0.8, -0.4])  # one 2-D example
EPS = np.array([-0.6, 1.1])  # one fixed noise draw
PRED = np.array([0.3, -0.7])  # one fixed prediction
XS = np.array([[0.8, -0.4], [-0.2, 0.5], [1.1, 0.3]])  # a batch of three examples


def _proj(y):
    """A fixed linear functional of an array output: Σ_i w_i·y_i with w_i = cos(i + 1) (no symmetric zeros)."""
    y = jnp.asarray(y)
    w = jnp.cos(jnp.arange(1, y.size + 1, dtype=y.dtype))
    return jnp.sum(w * y.reshape(-1))


@dataclasses.dataclass(frozen=True)
class Case:
    """f(θ) and its θ₀, built by ``build()`` inside the test (after float64 is on).

    ``build()`` returns (f, θ₀), or ({label: f_i}, θ₀) for several functions of the same θ, which are checked as
    one scalar f = Σ_i w_i·f_i/max(|f_i(θ₀)|, 1) (one compiled program instead of many; fixed weights
    w_i = cos(i + 1), each part scaled to O(1) so that the max-norm tolerance weighs them alike); if that
    check fails, every part is checked on its own and the failing labels are reported.

    h: finite-difference step; rtol: max-norm tolerance relative to ‖∇f‖_∞; atol: absolute floor (for
    gradients that are exactly 0); exact: optional closed-form gradient θ ↦ ∇f(θ); eager: also check the eager
    ``jax.grad`` (besides ``jax.jit(jax.grad)``); slow: mark the case slow; xfail: a known library bug (the
    reason), run as a strict xfail so that the case fails loudly once the bug is fixed.
    """

    name: str
    build: Callable[[], tuple[Callable | dict[str, Callable], np.ndarray]]
    h: float = 1e-5
    rtol: float = 1e-6
    atol: float = 1e-10
    exact: Callable | None = None
    eager: bool = True
    slow: bool = False
    xfail: str | None = None


def _combine(parts, theta0):
    """Σ_i w_i·f_i(θ)/max(|f_i(θ₀)|, 1), w_i = cos(i + 1): one scalar from several (see :class:`Case`)."""
    theta0 = jnp.asarray(np.asarray(theta0, np.float64))
    fns = list(parts.values())
    coef = [math.cos(i + 1) / max(abs(float(g(theta0))), 1.0) for i, g in enumerate(fns)]

    def f(theta):
        return sum(c * g(theta) for c, g in zip(coef, fns, strict=True))

    return f


def _central_differences(f, theta, h):
    """(f(θ + h_i·e_i) − f(θ − h_i·e_i))/(2h_i) with the step relative to the coordinate, h_i = h·max(|θ_i|, 0.1)
    (a parameter of size 0.01, such as EDM's σ_min, gets a step of 1e-4 of itself)."""
    theta = np.asarray(theta, np.float64)
    out = np.empty_like(theta)
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h * max(abs(theta[i]), 0.1)
        out[i] = (float(f(jnp.asarray(theta + e))) - float(f(jnp.asarray(theta - e)))) / (
            2.0 * e[i]
        )
    return out


def _max_err(g, ref):
    g, ref = np.asarray(g, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(g - ref))), float(np.max(np.abs(ref)))


def check_gradient(f, theta, *, h=1e-5, rtol=1e-6, atol=1e-10, exact=None, eager=True):
    """Assert that jax.jit(jax.grad(f)) (and, with ``eager``, jax.grad(f)) match central differences at θ, and
    ``exact`` where given. The finite differences evaluate the same compiled program (its value output)."""
    theta = jnp.asarray(np.asarray(theta, np.float64))
    value_and_grad = jax.jit(jax.value_and_grad(f))
    value, g_jit = value_and_grad(theta)
    assert jnp.shape(value) == (), f"f must be scalar, got shape {jnp.shape(value)}"
    assert value.dtype == jnp.float64, f"f computed in {value.dtype}, not float64"
    assert np.isfinite(float(value)), f"f(θ₀) = {float(value)}"
    grads = {"jit(grad)": g_jit}
    if eager:
        grads["grad"] = jax.grad(f)(theta)

    def f_value(th):
        return value_and_grad(th)[0]

    fd = _central_differences(f_value, theta, h)
    fd_2h = _central_differences(f_value, theta, 2.0 * h)
    fd_err, scale = _max_err(fd, fd_2h)
    tol = rtol * scale + atol
    # the reference must be converged well inside the tolerance, or the comparison means nothing
    assert fd_err <= 0.25 * tol, (
        f"finite differences not converged: |FD(h) − FD(2h)| = {fd_err:.3g}, tol {tol:.3g}"
    )
    for label, g in grads.items():
        assert np.all(np.isfinite(np.asarray(g))), f"{label} is not finite: {g}"
        err, _ = _max_err(g, fd)
        assert err <= tol, (
            f"{label} differs from central differences by {err:.3g} > {tol:.3g}\n"
            f"  {label} = {np.asarray(g)}\n  FD      = {fd}"
        )
        if exact is not None:
            ref = np.asarray(exact(np.asarray(theta)), np.float64)
            err, scale_exact = _max_err(g, ref)
            assert err <= rtol * scale_exact + atol, (
                f"{label} differs from the closed form by {err:.3g}\n  {label} = {np.asarray(g)}\n  exact = {ref}"
            )
    if eager:  # eager and jitted reverse mode are the same computation
        np.testing.assert_allclose(
            np.asarray(grads["grad"]), np.asarray(g_jit), rtol=1e-9, atol=1e-9 * scale + atol
        )


# ---------------------------------------------------------------------------------------------------------------
# Paths: every coefficient w.r.t. t and w.r.t. the path's parameters (θ = [t, params...])
# ---------------------------------------------------------------------------------------------------------------
def _logit(t):
    return jnp.log(t) - jnp.log1p(-t)


def _logit_lam(p, t):
    """A learned schedule λ(t) = p₀·logit(t) + p₁ (infinite at both ends; inverse t = sigmoid((λ − p₁)/p₀))."""
    return p[0] * _logit(t) + p[1]


def _poly_lam(p, t):
    """A learned schedule with finite ends: λ(t) = p₀ + p₁·(2t − 1) + p₂·(2t − 1)³ (increasing for p₁, p₂ > 0)."""
    u = 2.0 * t - 1.0
    return p[0] + p[1] * u + p[2] * u**3


# name: (constructor from a parameter vector, θ₀ of the parameters)
PATHS = {
    "linear": (lambda p: dj.LinearPath(), ()),
    "cosine": (lambda p: dj.CosinePath(), ()),
    "vp": (lambda p: dj.VPPath(p[0], p[1]), (0.5, 8.0)),
    "ve": (lambda p: dj.VEPath(p[0], p[1]), (0.02, 5.0)),
    "edm": (lambda p: dj.EDMPath(p[0], p[1], p[2]), (0.01, 10.0, 5.0)),
    "logsnr_logit": (lambda p: dj.LogSNRPath(_logit_lam, p), (1.5, -0.5)),
    "logsnr_poly": (lambda p: dj.LogSNRPath(_poly_lam, p), (0.3, 4.0, 2.0)),
}
PATH_METHODS = (
    "alpha",
    "sigma",
    "d_alpha",
    "d_sigma",
    "d_sigma_sq",
    "log_snr",
    "d_log_snr",
)


def _path_case(path_name):
    """Every coefficient of one path, θ = [t, path parameters...] (one part per method)."""
    make, p0 = PATHS[path_name]

    def part(method):
        return lambda theta: getattr(make(theta[1:]), method)(theta[0])

    def build():
        return {m: part(m) for m in PATH_METHODS}, np.array([T, *p0])

    return Case(f"path-{path_name}", build)


def _t_from_log_snr_case(path_name, lam, exact=None):
    make, p0 = PATHS[path_name]

    def build():
        def f(theta):
            return make(theta[1:]).t_from_log_snr(theta[0])

        return f, np.array([lam, *p0])

    return Case(f"t_from_log_snr-{path_name}", build, exact=exact)


def _exact_t_logit(theta):
    """∇ of t = sigmoid((λ − b)/a) w.r.t. (λ, a, b): (1/λ̇, −logit(t)/λ̇, −1/λ̇) with λ̇ = a/(t(1 − t))."""
    lam, a, b = theta
    t = 1.0 / (1.0 + math.exp(-(lam - b) / a))
    dlam = a / (t * (1.0 - t))
    return np.array([1.0 / dlam, -math.log(t / (1.0 - t)) / dlam, -1.0 / dlam])


def _exact_t_linear(theta):
    t = 1.0 / (1.0 + math.exp(-0.5 * theta[0]))
    return np.array([0.5 * t * (1.0 - t)])


def _round_trip_case(path_name):
    """t ↦ t_from_log_snr(log_snr(t)) is the identity for every parameter value: ∇ = (1, 0, …, 0) exactly."""
    make, p0 = PATHS[path_name]

    def build():
        def f(theta):
            path = make(theta[1:])
            return path.t_from_log_snr(path.log_snr(theta[0]))

        return f, np.array([T, *p0])

    return Case(
        f"t_from_log_snr-round_trip-{path_name}",
        build,
        exact=lambda theta: np.eye(1, theta.size)[0],
    )


PATH_CASES = [_path_case(p) for p in PATHS]
T_FROM_LOG_SNR_CASES = [
    _t_from_log_snr_case("linear", 0.7, exact=_exact_t_linear),
    _t_from_log_snr_case("cosine", -1.2),
    _t_from_log_snr_case("vp", 0.4),
    _t_from_log_snr_case("ve", 1.5),
    _t_from_log_snr_case("edm", 2.0),
    _t_from_log_snr_case("logsnr_logit", 0.9, exact=_exact_t_logit),
    _t_from_log_snr_case("logsnr_poly", 1.0),
    _round_trip_case("vp"),
    _round_trip_case("logsnr_logit"),
    _round_trip_case("logsnr_poly"),
]


# ---------------------------------------------------------------------------------------------------------------
# Targets: interpolate, target, convert w.r.t. (t, inputs, path parameters)
# ---------------------------------------------------------------------------------------------------------------
def _targets_case(path_name, eager=True):
    """interpolate, target of every kind, conditional velocity and score; θ = [t, x (2), ε (2), params...]
    (the conditional fields read θ[1:3] as x_t and θ[3:5] as x)."""
    make, p0 = PATHS[path_name]

    def split(theta):
        return make(theta[5:]), theta[0], theta[1:3], theta[3:5]

    def target(kind):
        return lambda theta: _proj(dj.target(kind, *split(theta)))

    def build():
        parts = {"interpolate": lambda theta: _proj(dj.interpolate(*split(theta)))}
        parts |= {f"target-{k}": target(k) for k in dj.KINDS}
        parts["conditional_velocity"] = lambda theta: _proj(dj.conditional_velocity(*split(theta)))
        parts["conditional_score"] = lambda theta: _proj(dj.conditional_score(*split(theta)))
        return parts, np.array([T, *X, *EPS, *p0])

    return Case(f"targets-{path_name}", build, eager=eager)


CONVERT_PAIRS = [
    ("score", "velocity"),
    ("velocity", "score"),
    ("eps", "data"),
    ("data", "velocity"),
    ("v", "eps"),
    ("data", "v"),
    ("eps", "score"),
]


def _convert_case(path_name):
    """convert for several (src, dst) pairs; θ = [t, pred (2), x_t (2), params...]."""
    make, p0 = PATHS[path_name]

    def pair(src, dst):
        def f(theta):
            t, pred, x_t, p = theta[0], theta[1:3], theta[3:5], theta[5:]
            return _proj(dj.convert(pred, src=src, dst=dst, path=make(p), t=t, x_t=x_t))

        return f

    def build():
        return {f"{s}->{d}": pair(s, d) for s, d in CONVERT_PAIRS}, np.array([T, *PRED, *X, *p0])

    return Case(f"convert-{path_name}", build)


TARGET_CASES = [
    _targets_case("vp", eager=False),
    _targets_case("logsnr_logit"),
    _convert_case("vp"),
]


# ---------------------------------------------------------------------------------------------------------------
# Losses: dj.loss / dj.batch_loss w.r.t. the model, the path and the time sampler; implied weightings w.r.t. λ
# ---------------------------------------------------------------------------------------------------------------
def _affine(theta, t, x):
    """A tiny model fn(t, x_t) = θ₀·x_t + θ₁·t (any prediction kind)."""
    return theta[0] * x + theta[1] * t


MODEL0 = (0.7, -0.3)


def _loss_case(name, make_objective, extra=(), *, closure=False, batch=None, eager=True):
    """θ = [model (2), objective parameters...]; the objective is ``make_objective(θ[2:])``."""

    def build():
        key = jax.random.key(3)

        def f(theta):
            obj = make_objective(theta[2:])
            m = theta[:2]
            model = (lambda t, x: _affine(m, t, x)) if closure else eqx.Partial(_affine, m)
            if batch is None:
                return dj.loss(obj, model, jnp.asarray(X), key)
            return dj.batch_loss(obj, model, jnp.asarray(XS), key, stratified=batch == "stratified")

        return f, np.array([*MODEL0, *extra])

    return Case(f"loss-{name}", build, eager=eager)


LOSS_CASES = [
    _loss_case("flow_matching", lambda p: dj.flow_matching()),
    _loss_case("ddpm-vp_params", lambda p: dj.ddpm(dj.VPPath(p[0], p[1])), (0.5, 8.0), eager=False),
    _loss_case(
        "edm-p_mean_sigma_data",
        lambda p: dj.edm(p_mean=p[0], sigma_data=p[1]),
        (-1.2, 0.5),
        eager=False,
    ),
    _loss_case("v_prediction", lambda p: dj.v_prediction(), closure=True),
    _loss_case(
        "sd3-logit_normal_mean_std",
        lambda p: dj.sd3(shift=3.0, mean=p[0], std=p[1]),
        (0.4, 1.2),
        eager=False,
    ),
    _loss_case(
        "weighted_objective-sigmoid_bias",
        lambda p: dj.weighted_objective(dj.CosinePath(), "v", dj.losses.SigmoidWeighting(p[0])),
        (1.5,),
    ),
    _loss_case(
        "batch_loss-flow_matching-stratified",
        lambda p: dj.flow_matching(),
        batch="stratified",
        eager=False,
    ),
]


def _implied_case(name, make_objective, lam, extra=(), *, what="weight", exact=None, eager=True):
    """θ = [λ, objective parameters...]."""

    def build():
        def f(theta):
            w = dj.implied_weighting(make_objective(theta[1:]))
            return getattr(w, what)(theta[0])

        return f, np.array([lam, *extra])

    return Case(f"implied_weighting-{what}-{name}", build, exact=exact, eager=eager)


def _exact_fm_weight(theta):  # flow matching on the linear path: w(λ) = e^{−λ/2}
    return np.array([-0.5 * math.exp(-0.5 * theta[0])])


def _exact_sigmoid_weight(theta):  # a weighted_objective's w(λ) is its weighting, whatever the path
    lam, bias = theta[0], theta[-1]
    s = 1.0 / (1.0 + math.exp(-(bias - lam)))
    g = np.zeros(theta.size)
    g[0], g[-1] = -s * (1.0 - s), s * (1.0 - s)
    return g


IMPLIED_CASES = [
    _implied_case("flow_matching", lambda p: dj.flow_matching(), 0.8, exact=_exact_fm_weight),
    _implied_case("ddpm-vp_params", lambda p: dj.ddpm(dj.VPPath(p[0], p[1])), -0.5, (0.5, 8.0)),
    _implied_case("edm-p_mean", lambda p: dj.edm(p_mean=p[0]), 1.5, (-1.2,), eager=False),
    _implied_case("sd3-mean", lambda p: dj.sd3(shift=3.0, mean=p[0]), -1.0, (0.4,)),
    _implied_case(
        "weighted_objective-logsnr_schedule",
        lambda p: dj.weighted_objective(
            dj.LogSNRPath(_poly_lam, p[:3]),
            "eps",
            dj.losses.SigmoidWeighting(p[3]),
            dj.losses.LogitNormal(),
        ),
        0.6,
        (*PATHS["logsnr_poly"][1], 1.5),
        exact=_exact_sigmoid_weight,
    ),
]


def _sampler_case(name, make_sampler, params, path_name="linear", eager=True):
    """A time sampler's density(t), cdf(t) and icdf(u) (exact inverse CDF); θ = [t, u, sampler parameters...]."""
    make_path, p0 = PATHS[path_name]

    def build():
        path = make_path(p0)
        parts = {
            "density": lambda theta: make_sampler(theta[2:]).density(theta[0], path),
            "cdf": lambda theta: make_sampler(theta[2:]).cdf(theta[0], path),
            "icdf": lambda theta: make_sampler(theta[2:]).icdf(theta[1], path),
        }
        return parts, np.array([T, 0.6, *params])

    return Case(f"time_sampler-{name}", build, eager=eager)


SAMPLER_CASES = [
    _sampler_case(
        "logit_normal", lambda p: dj.losses.LogitNormal(p[0], p[1]), (0.4, 1.2), eager=False
    ),
    # the CDF is a bisection root find with implicit gradients (d/dt = 1/g', d/dscale = −∂g/∂scale / g')
    _sampler_case("mode", lambda p: dj.losses.ModeSampler(p[0]), (1.29,)),
]


def _loss_at_case():
    """The integrand loss_at(objective, fn, x, t, ε) and Objective.weight(t), θ = [model (2), t, x (2), ε (2)]."""

    def build():
        obj = dj.weighted_objective(
            dj.CosinePath(), "eps", dj.losses.SigmoidWeighting(1.0), dj.losses.LogitNormal(0.2, 1.1)
        )

        def loss_at(theta):
            model = eqx.Partial(_affine, theta[:2])
            return dj.losses.loss_at(obj, model, theta[3:5], theta[2], theta[5:7])

        parts = {"loss_at": loss_at, "weight": lambda theta: obj.weight(theta[2])}
        return parts, np.array([*MODEL0, T, *X, *EPS])

    return Case("loss_at-and-weight-wrt_model_t_x_eps", build)


def _divergence_case():
    """divergence_exact and divergence_hutchinson (fixed probes) of a model's field, θ = [model (3), x (2)]."""

    def build():
        probes = jnp.asarray([[1.0, -1.0], [-1.0, -1.0]])

        def field(theta):
            return lambda z: _smooth_velocity_model(theta[:3], T, z)

        parts = {
            "exact-value": lambda theta: _proj(dj.divergence_exact(field(theta), theta[3:5])[0]),
            "exact-div": lambda theta: dj.divergence_exact(field(theta), theta[3:5])[1],
            "hutchinson-div": lambda theta: dj.divergence_hutchinson(
                field(theta), theta[3:5], probes
            )[1],
        }
        return parts, np.array([*VEL0, *X])

    return Case("divergence-exact_and_hutchinson", build, eager=False)


def _time_grid_case(path_name, kind, xfail=None):
    """time_grid(path, 4, kind) (λ-based kinds go through t_from_log_snr), w.r.t. the path's parameters."""
    make, p0 = PATHS[path_name]

    def build():
        return (lambda theta: _proj(dj.time_grid(make(theta), 4, kind))), np.array(p0)

    return Case(f"time_grid-{kind}-{path_name}", build, eager=False, xfail=xfail)


def _normal_case():
    def build():
        return (lambda theta: dj.Normal(theta[0]).log_prob(theta[1:3])), np.array([1.7, *X])

    return Case("normal_prior-log_prob-wrt_scale_x", build)


def _logsnr_ends_case():
    """α and σ at both ends of λ(t) = a·logit(t) + b (λ = ∓∞ there): the values 0 and 1 for every (a, b), so
    the gradient w.r.t. (a, b) is 0."""
    make, p0 = PATHS["logsnr_logit"]

    def f(theta):
        path = make(theta)
        return path.alpha(0.0) + path.sigma(0.0) + path.alpha(1.0) + path.sigma(1.0)

    return Case(
        "path-logsnr_logit-infinite_ends-wrt_params",
        lambda: (f, np.array(p0)),
        eager=False,
    )


MISC_CASES = [
    _loss_at_case(),
    _divergence_case(),
    _normal_case(),
    _time_grid_case("vp", "log_snr"),
    _time_grid_case("logsnr_logit", "log_snr"),
    _logsnr_ends_case(),
]


# ---------------------------------------------------------------------------------------------------------------
# Likelihood and bits/dim through the ODE solve. These public functions (and the samplers below) are
# equinox.filter_jit programs as a whole, so reverse mode through them is compiled whether or not the caller
# jits, by the same JVP and transposition rules: their cases check jit(grad) only (eager=False), since each
# compile of a differentiated solve costs seconds. So do the other expensive cases (elbo, the losses with
# normal-CDF samplers), whose eager reverse pass compiles hundreds of primitives one by one.
# ---------------------------------------------------------------------------------------------------------------
def _smooth_velocity_model(theta, t, x):
    """u(t, x) = θ₀·x + θ₁·t·tanh(x) + θ₂: smooth in (θ, t, x)."""
    return theta[0] * x + theta[1] * t * jnp.tanh(x) + theta[2]


VEL0 = (-0.5, 0.8, 0.3)
# adaptive solves are smooth in θ only to their tolerance (1e-10): a larger step and a looser comparison
ADAPTIVE = dict(h=1e-4, rtol=1e-5, atol=1e-9)


def _velocity(theta, path=None, kind="velocity"):
    path = dj.LinearPath() if path is None else path
    return dj.velocity_field(eqx.Partial(_smooth_velocity_model, theta), kind, path)


def _ll_case(name, *, case_kw=None, **ll_kwargs):
    """θ = [model (3), x (2)] on the linear path with a velocity model."""

    def build():
        kw = dict(ll_kwargs)
        path = dj.LinearPath()

        def f(theta):
            return dj.log_likelihood(_velocity(theta[:3]), path, theta[3:5], **kw)

        return f, np.array([*VEL0, *X])

    return Case(f"log_likelihood-{name}", build, **({"eager": False} | (case_kw or {})))


def _ll_hutchinson_vp_case():
    """Hutchinson trace with fixed probes (key) for an ε-model on VPPath(β_min, β_max), θ = [model (3), x (2),
    β_min, β_max]: the path enters through the conversion to a velocity and the interval [0, 1 − t_eps]."""

    def build():
        key = jax.random.key(5)

        def f(theta):
            path = dj.VPPath(theta[5], theta[6])
            u = _velocity(theta[:3], path, "eps")
            return dj.log_likelihood(
                u,
                path,
                theta[3:5],
                key=key,
                trace="hutchinson",
                num_probes=2,
                num_steps=12,
                solver="euler",
            )

        return f, np.array([*VEL0, *X, 0.5, 8.0])

    return Case(
        "log_likelihood-model_x_vp_params-eps_model-hutchinson-fixed_key", build, eager=False
    )


def _bpd_case():
    def build():
        k = jnp.asarray([2, 5])
        u = jnp.asarray([[0.3, 0.8]])  # fixed dequantisation noise, shape (num_dequant, *k.shape)

        def f(theta):
            return dj.bits_per_dim(
                _velocity(theta),
                dj.LinearPath(),
                k,
                num_levels=8,
                dequant_noise=u,
                num_steps=10,
                solver="euler",
            )

        return f, np.array(VEL0)

    return Case("bits_per_dim-model-fixed_grid-exact_trace-fixed_dequant", build, eager=False)


LIKELIHOOD_CASES = [
    _ll_case("model_and_x-adaptive_tol1e-10", rtol=1e-10, atol=1e-10, case_kw=ADAPTIVE),
    _ll_hutchinson_vp_case(),
    _bpd_case(),
]


# ---------------------------------------------------------------------------------------------------------------
# Sampling: probability-flow ODE and reverse SDE
# ---------------------------------------------------------------------------------------------------------------
def _ode_case(name, *, case_kw=None, **kwargs):
    """θ = [model (3), x0 (2)]: the sample x_{t1} of the linear path's PF-ODE from x0."""

    def build():
        key = jax.random.key(7)
        path = dj.LinearPath()

        def f(theta):
            return _proj(
                dj.sample_ode(_velocity(theta[:3]), path, key, x0=theta[3:5], **kwargs).samples
            )

        return f, np.array([*VEL0, *EPS])

    return Case(f"sample_ode-{name}", build, **({"eager": False} | (case_kw or {})))


def _ode_log_prob_case():
    """Fixed Heun steps on VPPath(β_min, β_max) for an ε-model, with log p of the sample from the same solve
    (exact trace): f = log p + proj(sample), θ = [model (3), β_min, β_max, x0 (2)]. The path enters through the
    conversion to a velocity; x0 through the flow and the prior's log-density."""

    def build():
        key = jax.random.key(8)

        def f(theta):
            path = dj.VPPath(theta[3], theta[4])
            u = _velocity(theta[:3], path, "eps")
            res = dj.sample_ode(u, path, key, x0=theta[5:7], num_steps=8, log_prob=True)
            return res.log_prob + _proj(res.samples)

        return f, np.array([*VEL0, 0.5, 8.0, *EPS])

    return Case("sample_ode-model_vp_params_x0-fixed_heun-log_prob", build, eager=False)


def _scaled_diffusion(scale, g, t):
    return scale * g(t)


def _sde_case():
    """Euler–Maruyama with a fixed key for score_sde's reverse SDE on VPPath(β_min, β_max), scaled:
    g = c·√(σ²λ̇) (``forward_sde_diffusion``), an ε-model for both the velocity and the score, one Langevin
    corrector step; θ = [model (3), β_min, β_max, c, x0 (2)]."""

    def build():
        key = jax.random.key(12)

        def f(theta):
            path = dj.VPPath(theta[3], theta[4])
            model = eqx.Partial(_smooth_velocity_model, theta[:3])
            u, s = dj.velocity_field(model, "eps", path), dj.score_field(model, "eps", path)
            g = eqx.Partial(_scaled_diffusion, theta[5], dj.forward_sde_diffusion(path))
            res = dj.sample_sde(
                u, s, path, key, x0=theta[6:8], diffusion=g, num_steps=12, langevin_steps=1
            )
            return _proj(res.samples)

        return f, np.array([*VEL0, 0.5, 8.0, 0.8, *EPS])

    return Case("sample_sde-euler_maruyama-langevin-model_vp_params_g_x0", build, eager=False)


SAMPLING_CASES = [
    _ode_case("model_and_x0-adaptive_tol1e-10", rtol=1e-10, atol=1e-10, case_kw=ADAPTIVE),
    _ode_log_prob_case(),
    _sde_case(),
]


# ---------------------------------------------------------------------------------------------------------------
# ELBO (diffjax.vlb.elbo(fn, kind, path, x, key, *, num_samples, t0, t1, log_snr_range, sampler, decoder, ...))
# ---------------------------------------------------------------------------------------------------------------
def _eps_model(theta, t, x):
    """A tiny ε-model ε̂ = θ₀·x_t + θ₁·t·x_t + θ₂ (explicitly t-dependent, so a schedule moves its output)."""
    return theta[0] * x + theta[1] * t * x + theta[2]


EPS_MODEL0 = (0.6, 0.4, -0.1)


def _elbo_case(name, make_path, extra=(), **kwargs):
    """θ = [ε-model (3), path parameters...]; f = dj.elbo(...).elbo with a fixed key."""

    def build():
        key = jax.random.key(21)

        def f(theta):
            model = eqx.Partial(_eps_model, theta[:3])
            return dj.elbo(
                model, "eps", make_path(theta[3:]), jnp.asarray(X), key, num_samples=8, **kwargs
            ).elbo

        return f, np.array([*EPS_MODEL0, *extra])

    return Case(f"elbo-{name}", build, eager=False)


ELBO_CASES = [
    # λ-importance sampling: t = t_from_log_snr(λ) carries the schedule's gradient into the model's t input
    _elbo_case(
        "model_and_logsnr_schedule-importance",
        lambda p: dj.LogSNRPath(_logit_lam, p),
        PATHS["logsnr_logit"][1],
        log_snr_range=(-5.0, 5.0),
    ),
]


# ---------------------------------------------------------------------------------------------------------------
# The Gaussian-mixture oracle: θ = [t, x (2), means (4)]
# ---------------------------------------------------------------------------------------------------------------
MIX_MEANS = np.array([[1.0, -0.5], [-0.8, 0.6]])
MIX_WEIGHTS = np.array([0.3, 0.7])
MIX_VARS = np.array([0.2, 0.35])


MIXTURE_METHODS = ("marginal_log_prob", "score", "velocity", "divergence", "posterior_mean")


def _mixture_case(path_name, eager=True):
    make, p0 = PATHS[path_name]

    def build():
        path = make(p0)

        def part(method):
            def f(theta):
                gm = dj.GaussianMixture(
                    jnp.asarray(MIX_WEIGHTS), theta[3:7].reshape(2, 2), jnp.asarray(MIX_VARS)
                )
                return _proj(getattr(gm, method)(path, theta[0], theta[1:3]))

            return f

        return {m: part(m) for m in MIXTURE_METHODS}, np.array([T, *X, *MIX_MEANS.reshape(-1)])

    return Case(f"mixture-{path_name}", build, eager=eager)


MIXTURE_CASES = [_mixture_case("cosine", eager=False)]


CASES = (
    PATH_CASES
    + T_FROM_LOG_SNR_CASES
    + TARGET_CASES
    + LOSS_CASES
    + IMPLIED_CASES
    + SAMPLER_CASES
    + MISC_CASES
    + LIKELIHOOD_CASES
    + SAMPLING_CASES
    + ELBO_CASES
    + MIXTURE_CASES
)


def test_case_names_are_unique():
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def _marks(case):
    marks = [pytest.mark.slow] if case.slow else []
    if case.xfail:
        marks.append(pytest.mark.xfail(reason=case.xfail, raises=AssertionError, strict=True))
    return marks


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=_marks(c)) for c in CASES])
def test_gradient_matches_finite_differences(case, x64):
    f, theta = case.build()
    kw = dict(h=case.h, rtol=case.rtol, atol=case.atol, exact=case.exact, eager=case.eager)
    if callable(f):
        check_gradient(f, theta, **kw)
        return
    try:
        check_gradient(_combine(f, theta), theta, **kw)
    except AssertionError as err:
        failing = []
        for label, part in f.items():
            try:
                check_gradient(part, theta, **kw)
            except AssertionError as part_err:
                failing.append(f"{label}: {part_err}")
        raise AssertionError(f"{err}\nfailing parts:\n" + "\n".join(failing)) from None


# ---------------------------------------------------------------------------------------------------------------
# Negative controls: the same check must fail for a deliberately wrong gradient
# ---------------------------------------------------------------------------------------------------------------
def _scaled_grad(factor):
    @jax.custom_vjp
    def ident(y):
        return y

    ident.defvjp(lambda y: (y, None), lambda _, g: (factor * g,))
    return ident


def _vp_alpha(theta):
    return dj.VPPath(theta[1], theta[2]).alpha(theta[0])


NEGATIVE = {
    # the backward pass returns half the gradient
    "half_gradient": lambda theta: _scaled_grad(0.5)(_vp_alpha(theta)),
    # a relative error of 1e-4, 100x the tolerance: the check is sharp, not just sign-level
    "gradient_off_by_1e-4": lambda theta: _scaled_grad(1.0 + 1e-4)(_vp_alpha(theta)),
    # the path parameters are cut off from the graph: their gradient is silently 0
    "stop_gradient_params": lambda theta: dj.VPPath(*jax.lax.stop_gradient(theta[1:])).alpha(
        theta[0]
    ),
    # t_from_log_snr with its schedule parameters detached (the old, silently zero, gradient)
    "t_from_log_snr_detached_params": lambda theta: dj.LogSNRPath(
        _logit_lam, jax.lax.stop_gradient(theta[1:])
    ).t_from_log_snr(theta[0]),
}
NEGATIVE_THETA = {
    "half_gradient": (T, 0.5, 8.0),
    "gradient_off_by_1e-4": (T, 0.5, 8.0),
    "stop_gradient_params": (T, 0.5, 8.0),
    "t_from_log_snr_detached_params": (0.9, 1.5, -0.5),
}


@pytest.mark.parametrize("name", list(NEGATIVE))
def test_negative_control_wrong_gradient_fails(name, x64):
    theta = np.array(NEGATIVE_THETA[name])
    with pytest.raises(AssertionError, match="differs from central differences"):
        check_gradient(NEGATIVE[name], theta)


def test_negative_control_baseline_passes(x64):
    """The controls' functions with their true gradients pass the same check (so the failures are the errors)."""
    check_gradient(_vp_alpha, np.array([T, 0.5, 8.0]))
    check_gradient(
        lambda th: dj.LogSNRPath(_logit_lam, th[1:]).t_from_log_snr(th[0]),
        np.array([0.9, 1.5, -0.5]),
    )
