"""Sampling: probability-flow ODE (with the log-likelihood in the same pass) and the reverse-time SDE family.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε.
Samplers integrate forward in t, from ``t0 = path.t_min`` (the prior, x_0 ~ ``path.prior``) to
``t1 = path.t_max = 1 − path.t_eps`` (the data end).

Everything here is a **per-example** function: ``velocity(t, x)`` and ``score(t, x)`` take a scalar t and ONE
example x of any shape, and the samplers return ONE sample. Batch with ``jax.vmap`` over keys (and/or x0)::

    u = diffjax.fields.velocity_field(model, "eps", path)
    sample = jax.vmap(lambda k: sample_ode(u, path, k, shape=(2,)).samples)(jax.random.split(key, n))

All functions run under ``jit``, ``vmap`` and ``grad`` and keep the whole solve on the device.

* :func:`sample_ode` integrates the probability-flow ODE dx/dt = u_t(x) with diffrax (adaptive Tsit5 by default,
  or fixed steps on a :func:`time_grid`), and optionally the instantaneous change of variables
  d/dt [x, ℓ] = [u, −∇·u] in the same solve: log p_1(x_1) = log p_0(x_0) − ∫ ∇·u dt (formula sheet §5.1;
  Chen et al. 2018, Grathwohl et al. 2019 "FFJORD", Song et al. 2021).
* :func:`sample_sde` integrates dX = [u_t + ½g_t²∇log p_t] dt + g_t dW (formula sheet §4), which has the
  marginals p_t for every g_t ≥ 0; g = 0 is the ODE, g² = σ²λ̇ (:func:`forward_sde_diffusion`) is the
  time-reversed forward SDE of score_sde. Fixed-step Euler–Maruyama is a plain ``jax.lax.scan`` (with an optional
  Langevin corrector, score_sde's predictor–corrector sampler); any diffrax SDE solver can be used instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import lineax
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .fields import divergence_exact, divergence_hutchinson, make_probes
from .paths import AbstractPath, check_time, trusted_time

__all__ = [
    "SampleResult",
    "GRID_KINDS",
    "time_grid",
    "forward_sde_diffusion",
    "sample_ode",
    "sample_sde",
]

Field = Callable[[Float[Array, ""], Float[Array, "*shape"]], Float[Array, "*shape"]]
Scalar = Float[ArrayLike, ""]

GRID_KINDS = ("uniform", "log_snr", "edm")

#: Where λ_t is infinite at an end of the grid's interval (λ(0) = −∞ for LinearPath/CosinePath, λ(1) = +∞
#: where σ_1 = 0), the "log_snr" and "edm" grids use λ at t0 + δ (resp. t1 − δ) with δ = this × (t1 − t0).
LOG_SNR_CLIP_FRACTION = 1e-3
#: An end with |λ| above this is treated as infinite too (e.g. CosinePath's λ(1) = 2 log tan(π/2) evaluates to
#: ≈ 74 in float64 instead of +∞).
LOG_SNR_MAX = 40.0

_FIXED_SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
}
_ADAPTIVE_SOLVERS = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "bosh3": diffrax.Bosh3,
}
_SDE_METHODS = ("euler_maruyama",)


class SampleResult(eqx.Module):
    """What a sampler returns, for ONE example (vmap for batches). t = 0 is noise, t = 1 is data.

    Attributes:
        samples: the sample x_{t1} (shape ``shape``).
        log_prob: log-likelihood of ``samples`` under the model (``sample_ode(..., log_prob=True)``), else None.
        trajectory: states at ``ts`` (leading axis over times) when a trajectory was requested, else None.
        ts: the times of ``trajectory`` (increasing, noise → data), else None.
        num_steps: solver steps taken (accepted + rejected for adaptive solvers).
        nfe: evaluations of the vector field (one evaluation of the drift/velocity, or of the augmented
            [u, −∇·u] field, counts 1; see each sampler's docstring). −1 when unknown for a custom solver.
    """

    samples: Array
    log_prob: Array | None = None
    trajectory: Array | None = None
    ts: Array | None = None
    num_steps: Int[Array, ""] | int = 0
    nfe: Int[Array, ""] | int = 0


# ---------------------------------------------------------------------------------------------------------------
# time grids
# ---------------------------------------------------------------------------------------------------------------
def _is_concrete(v) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(v))


def _endpoints(path: AbstractPath, t0, t1):
    t0 = path.t_min if t0 is None else t0
    t1 = path.t_max if t1 is None else t1
    if _is_concrete((t0, t1)):
        a, b = float(t0), float(t1)
        if not (0.0 <= a < b <= 1.0):
            raise ValueError(
                f"need 0 <= t0 < t1 <= 1 (t = 0 noise, t = 1 data; samplers run noise → data), got t0={a}, "
                f"t1={b}"
            )
    f = jnp.result_type(float)
    t0, t1 = jnp.asarray(t0, f), jnp.asarray(t1, f)
    if not _is_concrete(
        (t0, t1)
    ):  # traced ends: checked at run time (the solver's own times are trusted)
        t0, t1 = check_time(t0), check_time(t1)
    return t0, t1


def _finite_log_snr_range(path: AbstractPath, t0, t1):
    """(λ(t0), λ(t1)) with an infinite end replaced by λ at t0 + δ / t1 − δ (δ = LOG_SNR_CLIP_FRACTION·(t1−t0))."""
    delta = LOG_SNR_CLIP_FRACTION * (t1 - t0)
    lam0, lam1 = path.log_snr(t0), path.log_snr(t1)
    lam0 = jnp.where(jnp.abs(lam0) <= LOG_SNR_MAX, lam0, path.log_snr(t0 + delta))
    lam1 = jnp.where(jnp.abs(lam1) <= LOG_SNR_MAX, lam1, path.log_snr(t1 - delta))
    return lam0, lam1


def time_grid(
    path: AbstractPath,
    num_steps: int,
    kind: str = "uniform",
    rho: float = 7.0,
    t0: Scalar | None = None,
    t1: Scalar | None = None,
) -> Float[Array, " num_steps+1"]:
    """An increasing grid t0 = t_0 < t_1 < … < t_N = t1 of ``num_steps`` + 1 times, from noise to data.

    t = 0 is noise, t = 1 is data; the defaults are t0 = ``path.t_min``, t1 = ``path.t_max`` = 1 − t_eps.

    Kinds (i = 0, …, N, N = ``num_steps``):

    * ``"uniform"``: t_i = t0 + (i/N)(t1 − t0).
    * ``"log_snr"``: uniform in log-SNR, λ_i = λ(t0) + (i/N)(λ(t1) − λ(t0)), t_i = ``path.t_from_log_snr(λ_i)``.
    * ``"edm"``: Karras et al. 2022 (EDM, eq. 5) ρ-spacing of the noise-to-signal ratio σ/α = e^{−λ/2}:
      σ̃_i = (σ̃_max^{1/ρ} + (i/N)(σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ with σ̃_max = e^{−λ(t0)/2},
      σ̃_min = e^{−λ(t1)/2}; then λ_i = −2 log σ̃_i and t_i = ``path.t_from_log_snr(λ_i)``. On
      ``EDMPath(rho=ρ)`` (α = 1) this grid is exactly uniform in t.

    Where λ is infinite at an end (λ(0) = −∞ for LinearPath/CosinePath, λ = +∞ where σ = 0; numerically: not
    finite or |λ| > ``LOG_SNR_MAX`` = 40), the λ range of the "log_snr"/"edm" grids is clipped to λ(t0 + δ) or
    λ(t1 − δ), δ = ``LOG_SNR_CLIP_FRACTION``·(t1 − t0) = 1e-3·(t1 − t0); the grid's first and last points are
    always exactly t0 and t1 (so the first/last step spans the clipped part of the λ range).

    Raises:
        ValueError: unknown ``kind``, ``num_steps`` < 1, ``rho`` <= 0, or not 0 <= t0 < t1 <= 1.
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind={kind!r}; expected one of {GRID_KINDS}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    if _is_concrete(rho) and float(rho) <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    t0, t1 = _endpoints(path, t0, t1)
    frac = jnp.arange(num_steps + 1, dtype=t0.dtype) / num_steps
    if kind == "uniform":
        ts = t0 + frac * (t1 - t0)
    else:
        lam0, lam1 = _finite_log_snr_range(path, t0, t1)
        if kind == "log_snr":
            lam = lam0 + frac * (lam1 - lam0)
        else:
            rho = jnp.asarray(rho, t0.dtype)
            # σ̃^{1/ρ} = e^{−λ/(2ρ)}; work with the ρ-th root directly (no overflow for large |λ|).
            a, b = jnp.exp(-0.5 * lam0 / rho), jnp.exp(-0.5 * lam1 / rho)
            lam = -2.0 * rho * jnp.log(a + frac * (b - a))
        ts = jax.vmap(path.t_from_log_snr)(lam)
        ts = jnp.clip(ts, t0, t1)
    return ts.at[0].set(t0).at[-1].set(t1)


# ---------------------------------------------------------------------------------------------------------------
# diffusion coefficients
# ---------------------------------------------------------------------------------------------------------------
def forward_sde_diffusion(path: AbstractPath) -> Callable[[Scalar], Float[Array, ""]]:
    """g_t with g_t² = σ_t²λ̇_t: the diffusion of the time-reversed forward SDE (t = 0 noise, t = 1 data).

    σ²λ̇ = 2σ²α̇/α − d(σ²)/dt (finite where σ̇ is not, e.g. VP at t = 1). With this g the reverse SDE is
    score_sde's ``reverse()`` SDE and the continuous limit of DDPM/VDM ancestral sampling (formula sheet §4).
    For ``VPPath`` g² = β(1 − t) (β at the papers' time s = 1 − t).

    Paths with α_0 = 0 (LinearPath, CosinePath) have g → ∞ at t = 0: start such SDEs at t0 > 0 (e.g. with x0
    drawn from the exact p_{t0}, or accept the prior's approximation there).
    """

    def g(t):
        t = check_time(t)
        a, s, da, _ = path.coefficients(t)
        g2 = 2.0 * s * s * da / a - path.d_sigma_sq(t)
        return jnp.sqrt(jnp.maximum(g2, 0.0))

    return g


def _diffusion_fn(diffusion) -> tuple[Callable, bool]:
    """(g as a function of t, whether g is statically zero)."""
    if callable(diffusion):
        return diffusion, False
    if _is_concrete(diffusion):
        v = float(diffusion)
        if not (v >= 0.0 and math.isfinite(v)):
            raise ValueError(
                f"diffusion must be a finite constant g >= 0 or a callable t -> g_t >= 0, got {diffusion!r}"
            )
        if v == 0.0:
            return (lambda t: jnp.zeros_like(jnp.asarray(t))), True
    return (lambda t: jnp.asarray(diffusion, jnp.result_type(float)) * jnp.ones_like(t)), False


# ---------------------------------------------------------------------------------------------------------------
# ODE
# ---------------------------------------------------------------------------------------------------------------
def _resolve_ode_solver(solver, num_steps):
    if solver is None:
        solver = "heun" if num_steps is not None else "tsit5"
    if isinstance(solver, str):
        name = solver.lower()
        if name in _FIXED_SOLVERS:
            if num_steps is None:
                raise ValueError(
                    f"solver={solver!r} is a fixed-step solver: pass num_steps=N (and optionally grid=...), or "
                    f"use an adaptive solver ({tuple(_ADAPTIVE_SOLVERS)})"
                )
            return _FIXED_SOLVERS[name]()
        if name in _ADAPTIVE_SOLVERS:
            return _ADAPTIVE_SOLVERS[name]()
        raise ValueError(
            f"unknown solver={solver!r}; expected one of {tuple(_FIXED_SOLVERS) + tuple(_ADAPTIVE_SOLVERS)} "
            f"or a diffrax.AbstractSolver instance"
        )
    if isinstance(solver, diffrax.AbstractSolver):
        return solver
    raise ValueError(f"solver must be a name or a diffrax.AbstractSolver, got {solver!r}")


def _stage_counts(solver) -> tuple[int, int] | None:
    """(evaluations per step, extra evaluations at the start) for the solvers we can count exactly."""
    if isinstance(solver, diffrax.Euler):
        return 1, 0
    tableau = getattr(type(solver), "tableau", None)
    if isinstance(solver, diffrax.AbstractERK) and tableau is not None:
        stages = len(tableau.c) + 1
        return (stages - 1, 1) if tableau.fsal else (stages, 0)
    return None


def sample_ode(
    velocity: Field,
    path: AbstractPath,
    key: PRNGKeyArray,
    *,
    shape: tuple[int, ...] | None = None,
    x0: Float[Array, "*shape"] | None = None,
    x0_log_prob: Float[ArrayLike, ""] | None = None,
    solver=None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    num_steps: int | None = None,
    grid: str = "uniform",
    save_trajectory: bool = False,
    save_ts: Float[ArrayLike, " T"] | None = None,
    log_prob: bool = False,
    trace: str = "exact",
    num_probes: int = 1,
    t0: Scalar | None = None,
    t1: Scalar | None = None,
) -> SampleResult:
    """One sample of the probability-flow ODE dx/dt = u_t(x), integrated from noise (t0) to data (t1).

    t = 0 is noise, t = 1 is data; t0 = ``path.t_min``, t1 = ``path.t_max`` = 1 − t_eps by default. x_{t0} is
    ``x0`` or a draw from ``path.prior`` (key). A velocity converted from an ε- or score-model is singular where
    α = 0, one from a data-model where σ = 0 (the ends of the linear and cosine paths): pass
    ``t0, t1 = diffjax.integration_interval(path, kind)``.

    Solvers (diffrax): by default adaptive ``Tsit5`` with ``PIDController(rtol, atol)`` and at most ``max_steps``
    steps. With ``num_steps`` = N, fixed steps on ``time_grid(path, N, grid)`` (diffrax ``StepTo``) with
    ``solver`` in {"euler", "heun" (default), "midpoint", "ralston"} or any diffrax solver; adaptive names are
    "tsit5", "dopri5", "dopri8", "bosh3".

    Log-likelihood (``log_prob=True``, a static flag: no extra work when off). The same solve integrates
    d/dt [x, ℓ] = [u_t(x), −∇·u_t(x)], ℓ(t0) = 0, so that (instantaneous change of variables, sheet §5.1)

        log p_{t1}(x_{t1}) = log p_{t0}(x_{t0}) − ∫_{t0}^{t1} ∇·u_t(x_t) dt,

    with log p_{t0}(x_{t0}) = ``x0_log_prob`` if given, else ``path.prior.log_prob(x0)``. ``trace="exact"`` uses
    ``divergence_exact`` (D forward-mode JVPs); ``"hutchinson"`` uses ``num_probes`` Rademacher probes drawn
    once from ``key`` and held fixed for the whole solve (unbiased estimate of the log-likelihood).

    Returns a :class:`SampleResult` with ``samples``, ``log_prob`` (None when not requested), ``trajectory``/``ts``
    (at ``save_ts``, or when ``save_trajectory``: the grid for fixed steps, else 101 uniform times),
    ``num_steps`` (accepted + rejected) and ``nfe``: evaluations of the (augmented) vector field,
    = stages × steps for fixed steps (Euler N, Heun/midpoint 2N), and for adaptive FSAL Runge–Kutta
    (stages − 1) × (accepted + rejected) + 1 (checked against counted calls).

    Raises:
        ValueError: bad solver/grid/trace names or arguments.
        EquinoxRuntimeError (also under jit): a field that is NaN/inf at t0 or t1 (probed at x0 only when the
            solve fails), ``max_steps`` reached, another solver failure, or non-finite samples.
    """
    if trace not in ("exact", "hutchinson"):
        raise ValueError(f"unknown trace={trace!r}; expected 'exact' or 'hutchinson'")
    if isinstance(num_steps, bool) or (num_steps is not None and not isinstance(num_steps, int)):
        raise ValueError(f"num_steps must be None (adaptive) or a Python int, got {num_steps!r}")
    if grid not in GRID_KINDS:
        raise ValueError(f"unknown grid={grid!r}; expected one of {GRID_KINDS}")
    if num_steps is None and (not isinstance(max_steps, int) or max_steps < 1):
        raise ValueError(f"max_steps must be a Python int >= 1, got {max_steps!r}")
    solver_obj = _resolve_ode_solver(solver, num_steps)
    t0, t1 = _endpoints(path, t0, t1)
    k_x0, k_probe = jax.random.split(key)
    x0 = _initial_state(path, k_x0, shape, x0)

    if log_prob:
        if trace == "exact":

            def vf(t, y, args):
                u, div = divergence_exact(lambda z: velocity(t, z), y[0])
                return u, -div

        else:
            probes = make_probes(k_probe, x0.shape, num_probes, dtype=x0.dtype)

            def vf(t, y, args):
                u, div = divergence_hutchinson(lambda z: velocity(t, z), y[0], probes)
                return u, -div

        y0 = (x0, jnp.zeros((), x0.dtype))
    else:

        def vf(t, y, args):
            return velocity(t, y)

        y0 = x0
    term = diffrax.ODETerm(vf)

    if num_steps is not None:
        grid_ts = time_grid(path, num_steps, grid, t0=t0, t1=t1)
        controller = diffrax.StepTo(ts=grid_ts)
        dt0 = None
        steps_cap = num_steps
    else:
        grid_ts = None
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        dt0 = None
        steps_cap = max_steps

    if save_ts is not None:
        traj_ts = jnp.asarray(save_ts, t0.dtype)
    elif save_trajectory:
        traj_ts = grid_ts if grid_ts is not None else jnp.linspace(t0, t1, 101)
    else:
        traj_ts = None
    saveat = diffrax.SaveAt(t1=True) if traj_ts is None else diffrax.SaveAt(ts=traj_ts, t1=True)

    with (
        trusted_time()
    ):  # solver times lie in [t0, t1], checked above; a NaN time fails the solve instead
        sol = diffrax.diffeqsolve(
            term,
            solver_obj,
            t0,
            t1,
            dt0,
            y0,
            saveat=saveat,
            stepsize_controller=controller,
            max_steps=steps_cap,
            throw=False,
        )
    ys = sol.ys
    xs = ys[0] if log_prob else ys
    samples = xs[-1]
    trajectory = xs[:-1] if traj_ts is not None else None

    failed = sol.result != diffrax.RESULTS.successful

    def probe_ends(_):
        # Only on failure (a NaN/inf at an end makes the adaptive controller reject every step, which would
        # otherwise surface as max_steps): is the field finite at t0 and t1, at the starting point x0?
        with trusted_time():
            return jnp.stack([jnp.all(jnp.isfinite(velocity(t, x0))) for t in (t0, t1)])

    ends_ok = jax.lax.cond(failed, probe_ends, lambda _: jnp.ones((2,), bool), None)
    samples = eqx.error_if(
        samples,
        jnp.logical_not(jnp.all(ends_ok)),
        "diffjax.sample_ode: the velocity field is NaN/inf at an end of [t0, t1] (evaluated at the starting "
        "point). A data-prediction converted to a velocity divides by sigma (0 at t = 1 on LinearPath and "
        "CosinePath), an eps/score-prediction by alpha (0 at t = 0): pass t0, t1 = "
        "diffjax.integration_interval(path, kind).",
    )
    max_hit = (sol.result == diffrax.RESULTS.max_steps_reached) & jnp.all(ends_ok)
    samples = eqx.error_if(
        samples,
        max_hit,
        f"diffjax.sample_ode: the ODE solver reached max_steps={steps_cap} before t1. Increase max_steps, "
        f"loosen rtol/atol (now {rtol}/{atol}), or use fixed steps (num_steps=N).",
    )
    samples = eqx.error_if(
        samples,
        failed & jnp.all(ends_ok) & jnp.logical_not(max_hit),
        "diffjax.sample_ode: the ODE solver failed (step size collapsed or non-finite values in the vector "
        "field); check the velocity field near t0/t1 and the time range.",
    )
    samples = eqx.error_if(
        samples,
        jnp.logical_not(jnp.all(jnp.isfinite(samples))),
        "diffjax.sample_ode: non-finite samples; the velocity field is singular on [t0, t1] (try t1 < 1 or "
        "a path with t_eps > 0).",
    )

    lp = None
    if log_prob:
        prior_lp = path.prior.log_prob(x0) if x0_log_prob is None else jnp.asarray(x0_log_prob)
        lp = prior_lp + ys[1][-1]

    n_steps = sol.stats["num_steps"]
    counts = _stage_counts(solver_obj)
    if counts is None:
        nfe = jnp.asarray(-1)
    else:
        per_step, extra = counts
        nfe = per_step * n_steps + extra
    return SampleResult(
        samples=samples,
        log_prob=lp,
        trajectory=trajectory,
        ts=traj_ts,
        num_steps=n_steps,
        nfe=nfe,
    )


def _initial_state(path, key, shape, x0):
    if x0 is None:
        if shape is None:
            raise ValueError("pass shape=(...) (the shape of one example) or x0")
        return path.prior.sample(key, tuple(shape))
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        x0 = x0.astype(jnp.result_type(float))
    if shape is not None and tuple(shape) != x0.shape:
        raise ValueError(f"x0 has shape {x0.shape} but shape={tuple(shape)}")
    return x0


# ---------------------------------------------------------------------------------------------------------------
# SDE
# ---------------------------------------------------------------------------------------------------------------
def sample_sde(
    velocity: Field,
    score: Field,
    path: AbstractPath,
    key: PRNGKeyArray,
    *,
    shape: tuple[int, ...] | None = None,
    diffusion: Callable[[Scalar], Float[Array, ""]] | float = 1.0,
    num_steps: int = 500,
    grid: str = "uniform",
    method="euler_maruyama",
    langevin_steps: int = 0,
    langevin_snr: float = 0.16,
    x0: Float[Array, "*shape"] | None = None,
    t0: Scalar | None = None,
    t1: Scalar | None = None,
    final_denoise: bool = False,
    save_trajectory: bool = False,
) -> SampleResult:
    """One sample of the reverse-time SDE family, from noise (t0) to data (t1) (sheet §4, Song et al. 2021):

        dX = [u_t(X) + ½ g_t² ∇log p_t(X)] dt + g_t dW,   X_{t0} ~ p_{t0} ≈ ``path.prior``,

    which has the marginals p_t for every g_t ≥ 0 (t = 0 noise, t = 1 data). g = 0 is the probability-flow ODE
    (then this is its Euler method and ``score`` is never called); g² = σ²λ̇ (:func:`forward_sde_diffusion`) is
    score_sde's reverse SDE.

    Args:
        velocity, score: per-example fields (t, x) -> array (from any model via ``diffjax.fields``).
        diffusion: g as a callable t -> g_t >= 0 or a constant float >= 0.
        num_steps, grid: N steps on ``time_grid(path, N, grid, t0=t0, t1=t1)``.
        method: ``"euler_maruyama"``: X_{i+1} = X_i + h_i f(t_i, X_i) + g(t_i) √h_i ξ_i, a plain ``lax.scan``
            with ξ_i from ``jax.random.split(key, N)[i]`` (g evaluated once on the grid, before the loop).
            Or a diffrax SDE solver instance (e.g. ``diffrax.Heun()``, ``diffrax.SRA1()``, ``diffrax.ShARK()``),
            solved with ``diffeqsolve`` on the same grid (``StepTo``) driven by a ``VirtualBrownianTree``
            (with space-time Lévy area when the solver needs it); slower for fixed steps, for reference.
        langevin_steps, langevin_snr: predictor–corrector (Euler–Maruyama only). After each predictor step,
            ``langevin_steps`` Langevin steps at the new time t (score_sde's ``LangevinCorrector``):
            x ← x + η s + √(2η) ξ, s = ∇log p_t(x), ξ ~ N(0, I), η = 2 (r ‖ξ‖/‖s‖)² with r = ``langevin_snr``;
            the norms are over the one example (score_sde takes them per example too, with a_i = 1).
            Caveat (inherited from score_sde): because η depends on x, repeated corrector steps are a
            time-changed Langevin diffusion whose invariant density is ∝ p_t·‖∇log p_t‖², not p_t; the bias is
            O(1/D) (negligible for images, ≈ +20% variance for a 16-D Gaussian after 200 steps).
            Unlike score_sde, which corrects *before* each predictor step (at t0, not at t1), the corrector
            here runs after each predictor step (at t_1, …, t_N = t1).
        x0: the start x_{t0}; default a draw from ``path.prior``.
        final_denoise: return Tweedie's E[x_data | x_{t1}] = (x + σ²∇log p)/α at t1 (one more score call).
        save_trajectory: also return all N + 1 states on the grid (``trajectory``, ``ts``).

    Returns a :class:`SampleResult`; ``nfe`` counts drift evaluations (each: one velocity + one score call, or
    one velocity call when g is the constant 0) plus one per corrector step and one for ``final_denoise``.

    Raises:
        ValueError: bad method/grid names, negative constant diffusion, Langevin with a diffrax method.
        EquinoxRuntimeError (also under jit): a callable g that is negative or non-finite on the grid, or
            non-finite samples.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    if (
        isinstance(langevin_steps, bool)
        or not isinstance(langevin_steps, int)
        or langevin_steps < 0
    ):
        raise ValueError(f"langevin_steps must be a Python int >= 0, got {langevin_steps!r}")
    if isinstance(method, str):
        if method not in _SDE_METHODS:
            raise ValueError(
                f"unknown method={method!r}; expected one of {_SDE_METHODS} or a diffrax SDE solver instance "
                f"(e.g. diffrax.Heun(), diffrax.SRA1(), diffrax.ShARK())"
            )
    elif not isinstance(method, diffrax.AbstractSolver):
        raise ValueError(f"method must be 'euler_maruyama' or a diffrax solver, got {method!r}")
    elif langevin_steps > 0:
        raise ValueError("langevin_steps > 0 is only supported with method='euler_maruyama'")
    g_fn, g_zero = _diffusion_fn(diffusion)
    ts = time_grid(path, num_steps, grid, t0=t0, t1=t1)
    x0 = _initial_state(path, jax.random.fold_in(key, 0x5D0), shape, x0)
    dtype = x0.dtype
    ts = ts.astype(dtype)

    gs = jax.vmap(g_fn)(ts[:-1]).astype(dtype)
    if not g_zero:
        gs = eqx.error_if(
            gs,
            jnp.logical_not(jnp.all((gs >= 0) & jnp.isfinite(gs))),
            "diffjax.sample_sde: diffusion g_t must be finite and >= 0 on the time grid (g → ∞ at t = 0 for "
            "forward_sde_diffusion of LinearPath/CosinePath: start at t0 > 0)",
        )

    def drift(t, x, g):
        u = velocity(t, x)
        if g_zero:
            return u
        return u + (0.5 * g * g) * score(t, x)

    if isinstance(method, str):
        keys = jax.random.split(key, num_steps)

        def step(x, inp):
            t, t_next, g, k = inp
            h = t_next - t
            if langevin_steps:
                k, kc = jax.random.split(k)
            x = x + h * drift(t, x, g)
            if not g_zero:
                x = x + (g * jnp.sqrt(h)) * jax.random.normal(k, x.shape, dtype)
            if langevin_steps:
                x = _langevin(score, t_next, x, kc, langevin_steps, langevin_snr)
            return x, (x if save_trajectory else None)

        with trusted_time():  # grid times lie in [t0, t1]
            x, traj = jax.lax.scan(step, x0, (ts[:-1], ts[1:], gs, keys))
    else:
        x, traj = _diffrax_sde(method, drift, g_fn, g_zero, ts, x0, key, save_trajectory)

    nfe = num_steps * (1 + langevin_steps)
    if final_denoise:
        t_end = ts[-1]
        a, s = path.alpha(t_end), path.sigma(t_end)
        x = (x + s * s * score(t_end, x)) / a
        nfe += 1
    x = eqx.error_if(
        x,
        jnp.logical_not(jnp.all(jnp.isfinite(x))),
        "diffjax.sample_sde: non-finite samples (singular fields at t0/t1, or steps too large for g)",
    )
    trajectory = None
    if save_trajectory:
        trajectory = jnp.concatenate([x0[None], traj], axis=0)
    return SampleResult(
        samples=x,
        log_prob=None,
        trajectory=trajectory,
        ts=ts if save_trajectory else None,
        num_steps=jnp.asarray(num_steps),
        nfe=jnp.asarray(nfe),
    )


def _langevin(score, t, x, key, n, snr):
    def body(x, k):
        s = score(t, x)
        xi = jax.random.normal(k, x.shape, x.dtype)
        eta = 2.0 * jnp.square(snr * jnp.linalg.norm(xi) / jnp.linalg.norm(s))
        return x + eta * s + jnp.sqrt(2.0 * eta) * xi, None

    x, _ = jax.lax.scan(body, x, jax.random.split(key, n))
    return x


def _diffrax_sde(solver, drift, g_fn, g_zero, ts, x0, key, save_trajectory):
    t0, t1 = ts[0], ts[-1]
    n = ts.shape[0] - 1
    levy = getattr(solver, "minimal_levy_area", None)
    bm_kwargs = {}
    if (
        levy is not None
        and isinstance(levy, type)
        and issubclass(levy, diffrax.AbstractSpaceTimeLevyArea)
    ):
        bm_kwargs["levy_area"] = (
            diffrax.SpaceTimeTimeLevyArea
            if issubclass(levy, diffrax.AbstractSpaceTimeTimeLevyArea)
            else diffrax.SpaceTimeLevyArea
        )
    bm = diffrax.VirtualBrownianTree(
        t0,
        t1,
        tol=1.0 / (8 * n),
        shape=jax.ShapeDtypeStruct(x0.shape, x0.dtype),
        key=key,
        **bm_kwargs,
    )

    def f(t, y, args):
        return drift(t, y, g_fn(t))

    def diff(t, y, args):
        return lineax.DiagonalLinearOperator(g_fn(t) * jnp.ones_like(y))

    terms = diffrax.MultiTerm(diffrax.ODETerm(f), diffrax.ControlTerm(diff, bm))
    saveat = diffrax.SaveAt(ts=ts[1:]) if save_trajectory else diffrax.SaveAt(t1=True)
    with trusted_time():  # grid times lie in [t0, t1]
        sol = diffrax.diffeqsolve(
            terms,
            solver,
            t0,
            t1,
            None,
            x0,
            saveat=saveat,
            stepsize_controller=diffrax.StepTo(ts=ts),
            max_steps=n,
        )
    return sol.ys[-1], (sol.ys if save_trajectory else None)
