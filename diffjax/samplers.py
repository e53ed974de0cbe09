"""Fixed-step samplers for few evaluations: exponential integrators (DDIM, DPM-Solver++ 2M/3M, UniPC), EDM's Heun
sampler with stochastic churn, and Euler; each a ``lax.scan`` with its history in the carry.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε, ℓ_t = log(α_t/σ_t) = λ_t/2 (half the
log-SNR). Every sampler integrates the probability-flow ODE of a model of any prediction kind on any Gaussian
path, from t0 (noise) to t1 (data) on an increasing grid t_0 < … < t_N.

**Exponential integrators.** Written with the data prediction D = x̂(t, x) (the model converted exactly by
:func:`diffjax.targets.convert_at`), the PF-ODE is dx/dt = (σ̇/σ)·x + α·ℓ̇·D, whose linear part is solved
exactly (Lu et al. 2022, "DPM-Solver++", eq. 9):

    x_t / σ_t = x_s / σ_s + ∫_{ℓ_s}^{ℓ_t} e^ℓ D(ℓ) dℓ.

With h = ℓ_t − ℓ_s and D expanded in ℓ around ℓ_s,

    x_t = (σ_t/σ_s)·x_s + α_t·[φ₁ D + φ₂ (h D′) + ψ (½h² D″)] + O(h⁴),
    φ₁ = 1 − e^{−h},  φ₂ = 1 − φ₁/h,  ψ = 1 − 2φ₂/h,

and the multistep methods estimate hD′ and ½h²D″ from the previous steps' predictions. α_t·φ₁ is computed as
α_t − α_s·σ_t/σ_s, which stays finite where α_s = 0 (the noise end of ``LinearPath``/``CosinePath``, h = ∞) and
where σ_t = 0 (their data end, where the step is x_t = α_t·D: the "final denoising step"). A step whose h or
whose history's h is infinite falls back to the highest order its finite history allows (first order at such
ends), and the first steps of a k-step method use orders 1, …, k − 1 (the usual warm start).

Every sampler here is an ``equinox.Module`` (its parameters are leaves or static fields); :func:`sample` runs one
of them for ONE example (``jax.vmap`` over keys or x0 for batches) and reports the number of model evaluations.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from . import solve
from .fields import integration_interval
from .grids import GRID_KINDS, time_grid
from .kinds import AbstractKind, Data, Velocity, as_kind
from .paths import AbstractPath
from .sampling import SampleResult, _checked_start, _initial_state
from .targets import convert_at

__all__ = [
    "AbstractSampler",
    "Euler",
    "DDIM",
    "DPMSolverPP2M",
    "DPMSolverPP3M",
    "UniPC",
    "EDMHeun",
    "SAMPLERS",
    "as_sampler",
    "sample",
]

Scalar = Float[ArrayLike, ""]


class _Prediction(eqx.Module):
    """A model of ``kind`` on ``path`` seen as a data prediction D(t, x) or a velocity u(t, x) (exact conversions;
    t = 0 noise, t = 1 data)."""

    model: object
    kind: AbstractKind
    path: AbstractPath

    def _as(self, dst, t, x):
        pred = self.model(t, x)
        if type(self.kind) is not type(dst):
            pred = convert_at(pred, self.kind, dst, self.path.coefficients(t), x)
        return pred.astype(x.dtype)

    def data(self, t, x):
        return self._as(Data(), t, x)

    def velocity(self, t, x):
        return self._as(Velocity(), t, x)


class _Grid(eqx.Module):
    """α, σ, ℓ = log(α/σ) at the grid times, and the steps' h_i = ℓ_{i+1} − ℓ_i (±inf where α or σ vanish)."""

    ts: Array
    alpha: Array
    sigma: Array
    ell: Array
    h: Array

    @staticmethod
    def on(path: AbstractPath, ts):
        a, s, _, _ = jax.vmap(path.coefficients)(ts)
        with jax.numpy_dtype_promotion("standard"):
            ell = jnp.log(a) - jnp.log(s)
        ell = ell.astype(ts.dtype)
        d = ell[1:] - ell[:-1]
        h = jnp.where(jnp.isfinite(ell[1:]) & jnp.isfinite(ell[:-1]), d, jnp.inf)
        return _Grid(ts, a.astype(ts.dtype), s.astype(ts.dtype), ell, h)


class AbstractSampler(eqx.Module):
    """A fixed-step sampler of the probability-flow ODE (t = 0 noise, t = 1 data).

    Subclasses implement :meth:`run`, one solve of one example over a grid, and set ``min_steps``.
    """

    #: the fewest steps the method is defined for (a k-step method needs k).
    min_steps: ClassVar[int] = 1
    #: the order of convergence in the step size (the papers' figure; measured in benchmarks/samplers.py).
    order: ClassVar[int]

    @abc.abstractmethod
    def run(
        self, prediction: _Prediction, grid: _Grid, x0: Array, key: PRNGKeyArray, save: bool
    ) -> tuple[Array, Array | None, Array]:
        """(x at t_N, the states at t_1..t_N when ``save`` else None, the number of model evaluations)."""


def _scan(body, carry, xs, save):
    def step(c, inp):
        c, x = body(c, inp)
        return c, (x if save else None)

    return jax.lax.scan(step, carry, xs)


# ---------------------------------------------------------------------------------------------------------------
# Euler
# ---------------------------------------------------------------------------------------------------------------
class Euler(AbstractSampler):
    """Euler's method in t on the velocity: x_{i+1} = x_i + (t_{i+1} − t_i)·u(t_i, x_i). Order 1, N evaluations
    (never at t_N, so a data-model with σ = 0 at t1 is fine)."""

    order: ClassVar[int] = 1

    def run(self, prediction, grid, x0, key, save):
        def body(x, inp):
            t, t_next = inp
            x = x + (t_next - t) * prediction.velocity(t, x)
            return x, x

        x, traj = _scan(body, x0, (grid.ts[:-1], grid.ts[1:]), save)
        return x, traj, jnp.asarray(grid.ts.shape[0] - 1)


# ---------------------------------------------------------------------------------------------------------------
# exponential multistep integrators in data prediction
# ---------------------------------------------------------------------------------------------------------------
def _safe(v, ok):
    return jnp.where(ok, v, jnp.ones_like(v))


def _phis(h):
    """(φ₁, φ₂, ψ) at h (finite h only; callers mask the infinite case). φ₂ and ψ by series for small h."""
    phi1 = -jnp.expm1(-h)
    small = jnp.abs(h) < 1e-2
    hs = _safe(h, ~small)
    phi2 = jnp.where(small, h / 2 - h * h / 6 + h**3 / 24, 1.0 - phi1 / hs)
    psi = jnp.where(small, h / 3 - h * h / 12 + h**3 / 60, 1.0 - 2.0 * phi2 / hs)
    return phi1, phi2, psi


#: Below this many steps the last step is first order and the one before at most second order (``lower_order_final``
#: of DPM-Solver and diffusers): a short grid's last step is long, and extrapolating D over it is unstable.
LOWER_ORDER_FINAL_STEPS = 15


def _final_caps(n: int, lower_order_final: bool):
    """(mask of steps allowed order ≥ 2, mask allowed order 3) from the lower-order-final rule (static)."""
    cap2, cap3 = np.ones(n, bool), np.ones(n, bool)
    if lower_order_final and n < LOWER_ORDER_FINAL_STEPS:
        cap2[-1:] = False
        cap3[-2:] = False
    return jnp.asarray(cap2), jnp.asarray(cap3)


def _history_weights(grid: _Grid, order: int, lower_order_final: bool = False):
    """Per step i, (A_i, W_i): x_{i+1} = A_i·x_i + Σ_k W_{i,k}·D_{i−k} (k < ``order``) for DPM-Solver++ of
    multistep order ``order``, with the warm start and the fall back to lower orders where h is infinite (and,
    with ``lower_order_final``, on the last steps of a short grid)."""
    a, s, h = grid.alpha, grid.sigma, grid.h
    n = h.shape[0]
    cap2, cap3 = _final_caps(n, lower_order_final)
    ratio = s[1:] / s[:-1]
    base = a[1:] - a[:-1] * ratio  # α_t·φ₁, finite at both singular ends
    w = [base] + [jnp.zeros_like(base)] * (order - 1)
    if order >= 2:
        usable = jnp.isfinite(h) & (
            h != 0
        )  # a repeated grid time gives h = 0: no slope from that step
        ok2 = jnp.concatenate([jnp.zeros((1,), bool), usable[1:] & usable[:-1]]) & cap2
        h_prev = jnp.concatenate([jnp.ones((1,), h.dtype), h[:-1]])
        hi, hp = _safe(h, ok2), _safe(h_prev, ok2)
        c = hi / (2.0 * hp)  # D ≈ (1 + c)·D_i − c·D_{i−1} = D_i + ½h·D′
        w2 = [base * (1 + c), -base * c]
    if order >= 3:
        ok3 = ok2 & cap3 & jnp.concatenate([jnp.zeros((2,), bool), usable[: max(n - 2, 0)]])[:n]
        h_pp = jnp.concatenate([jnp.ones((2,), h.dtype), h[:-2]])[:n]
        hi, hp, hpp = _safe(h, ok3), _safe(h_prev, ok3), _safe(h_pp, ok3)
        r0, r1 = hp / hi, hpp / hi
        phi1, phi2, psi = _phis(hi)
        at = a[1:]
        # D1 ≈ hD′ and D2 ≈ ½h²D″ from divided differences over ℓ_i, ℓ_{i−1}, ℓ_{i−2}
        d10 = jnp.stack([1 / r0, -1 / r0, 0 * r0])
        d11 = jnp.stack([0 * r1, 1 / r1, -1 / r1])
        d2 = (d10 - d11) / (r0 + r1)
        d1 = d10 + r0 / (r0 + r1) * (d10 - d11)
        first = jnp.stack([at * phi1, 0 * at, 0 * at])
        w3 = first + at * phi2 * d1 + at * psi * d2
        w = [jnp.where(ok3, w3[k], jnp.where(ok2, w2[k], w[k])) for k in range(2)] + [
            jnp.where(ok3, w3[2], 0.0)
        ]
    elif order == 2:
        w = [jnp.where(ok2, w2[k], w[k]) for k in range(2)]
    return ratio, jnp.stack(w, axis=1)


def _unic_weights(grid: _Grid):
    """Per step i, the weights (V_i, U_i) of UniC-p (Zhao et al. 2023, bh2) with p = the predictor's order:
    x^c_{i+1} = A_i·x_i + V_{i,0}·D_i + V_{i,1}·D_{i−1} + U_i·D(t_{i+1}, x̃_{i+1}); used only where h_i is finite."""
    a, s, h = grid.alpha, grid.sigma, grid.h
    ratio = s[1:] / s[:-1]
    fin = jnp.isfinite(h) & (h != 0)
    hi = _safe(h, fin)
    phi1 = -jnp.expm1(-hi)
    at = a[1:]
    base = at * phi1
    # order 1 (first step, or after an infinite step): trapezoid ½(D_i + D_{i+1}) in the exponential form
    v1 = jnp.stack([0.5 * base, 0 * base], axis=1)
    u1 = 0.5 * base
    # order 2: rks = (r, 1), r = −h_{i−1}/h_i; Vandermonde R = [[1, 1], [r, 1]], b from the φ-recursion
    ok2 = jnp.concatenate([jnp.zeros((1,), bool), fin[1:] & fin[:-1]])
    hp = _safe(jnp.concatenate([jnp.ones((1,), h.dtype), h[:-1]]), ok2)
    hi2 = _safe(h, ok2)
    r = -hp / hi2
    # UniPC's recursion hφ_k with hh = −h and B(h) = e^{−h} − 1 = −φ₁: g₁ = φ₁/h − 1, g₂ = g₁/(−h) − ½,
    # b_k = k!·g_k / B(h); (ρ0, ρ1) solve [[1, 1], [r, 1]]·ρ = (b₁, b₂). Uniform steps give Adams–Moulton's
    # (5/12, 8/12, −1/12) as h → 0.
    g1 = -jnp.expm1(-hi2) / hi2 - 1.0
    b1 = g1 / jnp.expm1(-hi2)
    g2 = g1 / (-hi2) - 0.5
    b2 = 2.0 * g2 / jnp.expm1(-hi2)
    rho0 = (b1 - b2) / (1.0 - r)
    rho1 = b1 - rho0
    # x^c = A x + base·[D_i + ρ0 (D_{i−1} − D_i)/r + ρ1 (D_{i+1} − D_i)]
    b2w = at * -jnp.expm1(-hi2)
    v2 = jnp.stack([b2w * (1 - rho0 / r - rho1), b2w * rho0 / r], axis=1)
    u2 = b2w * rho1
    v = jnp.where(ok2[:, None], v2, v1)
    u = jnp.where(ok2, u2, u1)
    return ratio, v, u, fin


class _DataMultistep(AbstractSampler):
    """DPM-Solver++ multistep of order ``multistep_order`` in data prediction; N model evaluations for N steps.

    ``lower_order_final`` (default True, as in DPM-Solver and diffusers): on grids of fewer than 15 steps the last
    step is first order and the one before at most second order.
    """

    multistep_order: ClassVar[int]
    lower_order_final: bool = eqx.field(static=True, default=True)

    def run(self, prediction, grid, x0, key, save):
        k = self.multistep_order
        ratio, w = _history_weights(grid, k, self.lower_order_final)

        def body(carry, inp):
            x, hist = carry
            t, r, wi = inp
            d = prediction.data(t, x)
            hist = jnp.concatenate([d[None], hist[:-1]], axis=0)
            x = r * x + jnp.tensordot(wi, hist, axes=1)
            return (x, hist), x

        hist0 = jnp.zeros((k,) + x0.shape, x0.dtype)
        (x, _), traj = _scan(body, (x0, hist0), (grid.ts[:-1], ratio, w.astype(x0.dtype)), save)
        return x, traj, jnp.asarray(grid.ts.shape[0] - 1)


class DDIM(_DataMultistep):
    """DDIM (Song et al. 2021) = DPM-Solver++ 1: x_t = (σ_t/σ_s)·x_s + (α_t − α_s σ_t/σ_s)·D(s, x_s), exact for the
    linear part, order 1. It is also Euler's method on x/α in σ/α (Karras et al. 2022)."""

    order: ClassVar[int] = 1
    multistep_order: ClassVar[int] = 1


class DPMSolverPP2M(_DataMultistep):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): D ≈ (1 + c)·D_i − c·D_{i−1}, c = h_i/(2h_{i−1}); order 2.
    The same as UniPC's predictor UniP-2 with B(h) = e^h − 1."""

    order: ClassVar[int] = 2
    min_steps: ClassVar[int] = 2
    multistep_order: ClassVar[int] = 2


class DPMSolverPP3M(_DataMultistep):
    """DPM-Solver++(3M): the third-order multistep method in data prediction (Lu et al. 2022, App.; the
    official code's ``multistep_dpm_solver_third_update`` with the D″ weight ψ = 1 − 2φ₂/h of the exact Taylor
    expansion, see the module docstring); order 3."""

    order: ClassVar[int] = 3
    min_steps: ClassVar[int] = 3
    multistep_order: ClassVar[int] = 3


class UniPC(AbstractSampler):
    """UniPC-2 (Zhao et al. 2023, "UniPC", bh2, data prediction): the UniP-2 predictor (= DPM-Solver++ 2M)
    followed at every step but the last by the UniC-2 corrector, which reuses the next step's model evaluation
    at the predicted point: N evaluations for N steps, order 3 (p + 1 with the corrector). ``lower_order_final``:
    as for :class:`DPMSolverPP2M`."""

    order: ClassVar[int] = 3
    min_steps: ClassVar[int] = 2
    lower_order_final: bool = eqx.field(static=True, default=True)

    def run(self, prediction, grid, x0, key, save):
        ratio, w = _history_weights(grid, 2, self.lower_order_final)
        _, v, u, fin = _unic_weights(grid)
        n = grid.h.shape[0]
        prev = lambda a: jnp.concatenate([jnp.zeros_like(a[:1]), a[:-1]])  # noqa: E731
        use_c = jnp.concatenate([jnp.zeros((1,), bool), fin[:-1]])
        dt = x0.dtype

        def body(carry, inp):
            x_pred, x_prev, hist_prev = (
                carry  # x_i predicted, x_{i-1} corrected, [D_{i-1}, D_{i-2}]
            )
            t, r, wi, r_p, v_p, u_p, c = inp
            d = prediction.data(t, x_pred)
            x_corr = r_p * x_prev + jnp.tensordot(v_p, hist_prev, axes=1) + u_p * d
            x = jnp.where(c, x_corr, x_pred)
            hist = jnp.concatenate([d[None], hist_prev[:-1]], axis=0)
            x_next = r * x + jnp.tensordot(wi, hist, axes=1)
            return (x_next, x, hist), x_next

        xs = (grid.ts[:-1], ratio, w, prev(ratio), prev(v), prev(u), use_c)
        xs = jax.tree.map(lambda a: a.astype(dt) if a.dtype != bool else a, xs)
        hist0 = jnp.zeros((2,) + x0.shape, dt)
        (x, _, _), traj = _scan(body, (x0, x0, hist0), xs, save)
        return x, traj, jnp.asarray(n)


# ---------------------------------------------------------------------------------------------------------------
# EDM Heun with churn
# ---------------------------------------------------------------------------------------------------------------
class EDMHeun(AbstractSampler):
    """Karras et al. 2022 ("EDM", Alg. 2) on any Gaussian path: Heun's method on x̃ = x/α in σ̃ = σ/α, where the
    PF-ODE is dx̃/dσ̃ = ε̂ = (x̃ − D)/σ̃; optional stochastic churn. Order 2 (deterministic).

    Step i: with γ_i = min(``churn``/N, √2 − 1) where σ̃_i ∈ [``s_tmin``, ``s_tmax``] (else 0), move back to
    σ̃̂ = (1 + γ_i)·σ̃_i (the time t̂ with λ = λ_i − 2 log(1 + γ_i)) adding noise of variance
    ``s_noise``²·(σ̃̂² − σ̃_i²) to x̃; then the Euler step x_E (= DDIM from t̂ to t_{i+1}) and, where σ_{i+1} > 0
    and α(t̂) > 0, the trapezoidal correction x = x_E + ½(σ_{i+1} − α_{i+1}σ̃̂)(ε̂(t_{i+1}, x_E) − ε̂(t̂, x̂)).
    A step to σ = 0 (the data end of ``LinearPath``) or from α = 0 (its noise end) stays Euler, as EDM's last
    step does. Evaluations: N + (number of corrected steps), as ``nfe``.
    """

    churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0
    order: ClassVar[int] = 2

    def __check_init__(self):
        for name in ("churn", "s_tmin", "s_tmax", "s_noise"):
            v = getattr(self, name)
            if not isinstance(v, jax.core.Tracer) and not float(v) >= 0:
                raise ValueError(f"EDMHeun: {name} must be >= 0, got {name}={v}")

    def _churned_times(self, path, grid):
        n = grid.h.shape[0]
        st = grid.sigma[:-1] / grid.alpha[:-1]
        gamma = jnp.minimum(self.churn / n, math.sqrt(2.0) - 1.0)
        on = jnp.isfinite(st) & (st >= self.s_tmin) & (st <= self.s_tmax) & (self.churn > 0)
        lam_hat = 2.0 * grid.ell[:-1] - 2.0 * jnp.log1p(jnp.where(on, gamma, 0.0))
        t_hat = jax.vmap(path.t_from_log_snr)(_safe(lam_hat, on)).astype(grid.ts.dtype)
        t_hat = jnp.where(on, jnp.clip(t_hat, grid.ts[0], grid.ts[:-1]), grid.ts[:-1])
        a_hat, s_hat, _, _ = jax.vmap(path.coefficients)(t_hat)
        st_hat = s_hat / _safe(a_hat, a_hat > 0)
        extra = jnp.where(on, jnp.sqrt(jnp.maximum(st_hat**2 - st**2, 0.0)), 0.0)
        return on, t_hat, a_hat, s_hat, self.s_noise * extra

    def run(self, prediction, grid, x0, key, save):
        path = prediction.path
        dt = x0.dtype
        on, t_hat, a_hat, s_hat, noise = self._churned_times(path, grid)
        a0 = grid.alpha[:-1]
        heun = (a_hat > 0) & (grid.sigma[1:] > 0)
        keys = jax.random.split(key, grid.h.shape[0])

        def eps(t, x, d, a, s):
            return (x - a * d) / s

        def body(x, inp):
            churned, t_h, a_h, s_h, nz, a_i, t1, a1, s1, hn, k = inp
            xi = jax.random.normal(k, x.shape, dt)
            x_h = jnp.where(churned, a_h * (x / _safe(a_i, a_i > 0) + nz * xi), x)
            d = prediction.data(t_h, x_h)
            x_e = (s1 / s_h) * x_h + (a1 - a_h * s1 / s_h) * d

            def correct(xe):
                d_e = prediction.data(t1, xe)
                st_h = s_h / _safe(a_h, a_h > 0)
                return xe + 0.5 * (s1 - a1 * st_h) * (
                    eps(t1, xe, d_e, a1, _safe(s1, s1 > 0)) - eps(t_h, x_h, d, a_h, s_h)
                )

            x = jax.lax.cond(hn, correct, lambda xe: xe, x_e)
            return x, x

        xs = (
            on,
            t_hat,
            a_hat,
            s_hat,
            noise,
            a0,
            grid.ts[1:],
            grid.alpha[1:],
            grid.sigma[1:],
            heun,
            keys,
        )
        xs = jax.tree.map(
            lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, xs
        )
        x, traj = _scan(body, x0, xs, save)
        return x, traj, grid.h.shape[0] + jnp.sum(heun)


SAMPLERS = {
    "euler": Euler,
    "ddim": DDIM,
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_3m": DPMSolverPP3M,
    "unipc": UniPC,
    "edm_heun": EDMHeun,
}


def as_sampler(sampler: str | AbstractSampler) -> AbstractSampler:
    """The sampler object for a name in :data:`SAMPLERS` or an :class:`AbstractSampler` (returned unchanged)."""
    if isinstance(sampler, AbstractSampler):
        return sampler
    if isinstance(sampler, str) and sampler in SAMPLERS:
        return SAMPLERS[sampler]()
    raise ValueError(
        f"unknown sampler={sampler!r}; expected one of {tuple(SAMPLERS)} or a diffjax.samplers.AbstractSampler "
        "instance (e.g. diffjax.samplers.DPMSolverPP2M())"
    )


# ---------------------------------------------------------------------------------------------------------------
# the entry point
# ---------------------------------------------------------------------------------------------------------------
_MESSAGES = {
    solve.NONFINITE_INPUT: (
        "diffjax.sample: the starting point x0 holds NaN/inf: check the x0 you passed; its sample is NaN"
    ),
    solve.NONFINITE: (
        "diffjax.sample: non-finite samples. The model's prediction is NaN/inf somewhere on the grid: an eps- or "
        "score-model divides by alpha (0 at t = 0 on LinearPath/CosinePath), a data-model's velocity by sigma; "
        "keep the default t0, t1 = diffjax.integration_interval(path, kind), or check the model"
    ),
}


def _check_grid_array(grid):
    """An increasing grid given as an array: checked in Python when concrete, by one error_if when traced."""
    ts = jnp.asarray(grid)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(
            f"grid must be a grid kind {GRID_KINDS} or a 1-D array of >= 2 times, got shape {ts.shape}"
        )
    if not jnp.issubdtype(ts.dtype, jnp.floating):
        ts = ts.astype(jnp.result_type(float))
    if not isinstance(ts, jax.core.Tracer):
        v = np.asarray(ts)
        if not (np.all(np.diff(v) > 0) and v[0] >= 0 and v[-1] <= 1):
            raise ValueError(
                "grid must increase strictly from the noise end to the data end inside [0, 1] (t = 0 noise, "
                f"t = 1 data), got {np.array2string(v, precision=4, threshold=12)}"
            )
        return ts
    bad = jnp.any(jnp.diff(ts) <= 0) | (ts[0] < 0) | (ts[-1] > 1)
    return eqx.error_if(
        ts, bad, "diffjax.sample: grid must increase strictly inside [0, 1] (t = 0 noise)"
    )


def _grid_times(path, kind, num_steps, grid, t0, t1, rho, shift):
    if not isinstance(grid, str):
        if num_steps is not None and num_steps != jnp.shape(grid)[0] - 1:
            raise ValueError(
                f"num_steps={num_steps} but the grid has {jnp.shape(grid)[0] - 1} steps; pass one"
            )
        if t0 is not None or t1 is not None:
            raise ValueError("pass t0/t1 or a grid array, not both (the grid's ends are t0 and t1)")
        return grid  # checked by sample
    if grid not in GRID_KINDS:
        raise ValueError(
            f"unknown grid={grid!r}; expected one of {GRID_KINDS} or an increasing array of times"
        )
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    if t0 is None or t1 is None:
        d0, d1 = integration_interval(path, kind)
        t0 = d0 if t0 is None else t0
        t1 = d1 if t1 is None else t1
    return time_grid(path, num_steps, grid, rho=rho, t0=t0, t1=t1, shift=shift)


def sample(
    sampler: str | AbstractSampler,
    model,
    kind: str | AbstractKind,
    path: AbstractPath,
    key: PRNGKeyArray,
    *,
    num_steps: int | None = None,
    grid: str | Float[ArrayLike, " N+1"] = "log_snr",
    shape: tuple[int, ...] | None = None,
    x0: Float[Array, "*shape"] | None = None,
    t0: Scalar | None = None,
    t1: Scalar | None = None,
    rho: float = 7.0,
    shift: float = 3.0,
    save_trajectory: bool = False,
    throw: bool = True,
) -> SampleResult:
    """One sample of the probability-flow ODE with a fixed-step ``sampler``, from noise (t0) to data (t1).

    t = 0 is noise, t = 1 is data. ``model(t, x)`` predicts ``kind`` on ``path`` (any kind: it is converted
    exactly to what the sampler needs). x_{t0} is ``x0`` or a draw from ``path.prior`` (``key``; EDM's churn noise
    uses the rest of ``key``). Batch with ``jax.vmap`` over keys or x0.

    Args:
        sampler: an :class:`AbstractSampler` (``DPMSolverPP2M()``, ``EDMHeun(churn=40)``, …) or a name in
            :data:`SAMPLERS`.
        num_steps, grid: N steps on ``time_grid(path, N, grid, rho=rho, shift=shift, t0=t0, t1=t1)``, ``grid`` in
            ``("uniform", "log_snr", "edm", "shifted")``; or ``grid`` an increasing array of times t_0 < … < t_N
            (then ``num_steps`` may be omitted).
        t0, t1: the interval; by default ``diffjax.integration_interval(path, kind)``, which keeps ε/score-models
            away from α = 0 and data-models' velocities away from σ = 0.
        save_trajectory: also return the N + 1 states on the grid (``trajectory``, ``ts``).
        throw: raise on a non-finite input or sample (also under jit), or return the code in ``status``.

    Returns a :class:`~diffjax.sampling.SampleResult` with ``nfe`` the number of model evaluations: N for Euler,
    DDIM, DPM-Solver++ and UniPC; N + (corrected steps) for EDMHeun (2N, less one for a last step that ends at
    σ = 0 and one for a first step that starts at α = 0, which stay Euler).

    Raises:
        ValueError: an unknown sampler or grid, num_steps below the sampler's ``min_steps`` (a k-step method needs
            k steps), a grid that is not increasing inside [0, 1], bad t0/t1.
    """
    sampler = as_sampler(sampler)
    kind = as_kind(kind)
    if not isinstance(path, AbstractPath):
        raise ValueError(f"path must be a diffjax path, got {type(path).__name__}")
    if not callable(model):
        raise ValueError(f"model must be a callable model(t, x), got {type(model).__name__}")
    if not isinstance(grid, str):
        grid = _check_grid_array(grid)
    return _sample(
        sampler,
        model,
        kind,
        path,
        key,
        num_steps,
        grid,
        shape,
        x0,
        t0,
        t1,
        rho,
        shift,
        save_trajectory,
        throw,
    )


@eqx.filter_jit
def _sample(
    sampler,
    model,
    kind,
    path,
    key,
    num_steps,
    grid,
    shape,
    x0,
    t0,
    t1,
    rho,
    shift,
    save_trajectory,
    throw,
):
    ts = _grid_times(path, kind, num_steps, grid, t0, t1, rho, shift)
    n = ts.shape[0] - 1
    if n < sampler.min_steps:
        raise ValueError(
            f"{type(sampler).__name__} is a {sampler.min_steps}-step method: it needs num_steps >= "
            f"{sampler.min_steps}, got {n}; use more steps or DDIM / Euler"
        )
    k_x0, k_run = jax.random.split(key)
    x0, ok = _checked_start(_initial_state(path, k_x0, shape, x0), x0 is not None)
    ts = ts.astype(x0.dtype)
    x, traj, nfe = sampler.run(
        _Prediction(model, kind, path), _Grid.on(path, ts), x0, k_run, save_trajectory
    )
    status, _ = solve.final_status(jnp.asarray(solve.SUCCESSFUL), jnp.nan, x)
    status = jnp.where(ok, status, solve.NONFINITE_INPUT).astype(jnp.int32)
    x = jnp.where(ok, x, jnp.full((), jnp.nan, x.dtype))
    if throw:
        x = solve.throw_if_failed(x, status, _MESSAGES)
    return SampleResult(
        samples=x,
        trajectory=jnp.concatenate([x0[None], traj], axis=0) if save_trajectory else None,
        ts=ts if save_trajectory else None,
        num_steps=jnp.asarray(n),
        nfe=jnp.asarray(nfe),
        status=status,
        t_fail=jnp.full((), jnp.nan, x.dtype),
        messages=tuple(sorted(_MESSAGES.items())),
    )
