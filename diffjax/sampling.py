"""Sampling: probability-flow ODE (with the log-likelihood in the same pass) and the reverse-time SDE family.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε.
Samplers integrate forward in t, from ``t0 = path.t_min`` (the prior, x_0 ~ ``path.prior``) to
``t1 = path.t_max = 1 − path.t_eps`` (the data end).

Everything here is a **per-example** function: ``velocity(t, x)`` and ``score(t, x)`` take a scalar t and ONE
example x of any shape, and the samplers return ONE sample. Batch with ``jax.vmap`` over keys (and/or x0)::

    u = diffjax.velocity_field(equinox.Partial(apply, params), "eps", path)
    sample = jax.vmap(lambda k: sample_ode(u, path, k, shape=(2,)).samples)(jax.random.split(key, n))

Both samplers are ``equinox.filter_jit``-ed: arrays — the PyTree leaves of the fields (the model's parameters),
keys, x0 — are arguments of the compiled program, so a second call with new parameters of the same shapes does
not recompile; Python values (shape, rtol, num_steps, solver names) are static. Inside an outer ``jax.jit`` they
inline. They run under ``jit``, ``vmap`` and ``grad`` and keep the whole solve on the device.

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

from . import solve
from .fields import AbstractTrace, ConstantDiffusion, ForwardSDEDiffusion, as_trace
from .grids import GRID_KINDS, time_grid
from .paths import AbstractPath

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

_SDE_METHODS = ("euler_maruyama",)
#: A diffrax SDE solve's Brownian tree is resolved to (shortest step of the grid) / this.
BROWNIAN_TOL_FRACTION = 16.0


class SampleResult(eqx.Module):
    """What a sampler returns, for ONE example (vmap for batches). t = 0 is noise, t = 1 is data.

    Attributes:
        samples: the sample x_{t1} (shape ``shape``).
        log_prob: log-likelihood of ``samples`` under the model (``sample_ode(..., log_prob=True)``), else None.
        trajectory: states at ``ts`` (leading axis over times) when a trajectory was requested, else None.
        ts: the times of ``trajectory`` (increasing, noise → data), else None.
        num_steps: solver steps taken (accepted + rejected for adaptive solvers).
        nfe: evaluations of the vector field by the solver (one evaluation of the drift/velocity, or of the
            augmented [u, −∇·u] field, counts 1; see each sampler's docstring). −1 when unknown for a custom
            solver. ``sample_ode`` also evaluates u once at each end of the interval for its diagnosis (not
            counted).
        status: 0 on success, else a :mod:`diffjax.solve` code (with ``throw=False``; with ``throw=True`` a
            failure raises instead). :func:`diffjax.solve.raise_if_failed` turns it into an error on the host.
            ``NONFINITE_INPUT`` for a given ``x0`` (or ``x0_log_prob``) that holds NaN/inf; then ``samples`` is
            NaN (the solve ran from zeros).
        t_fail: for ``NONFINITE_FIELD`` the time where the velocity turns NaN/inf (the solve, from the noise end
            t0 towards the data end t1, could not get past it), for ``MAX_STEPS`` / ``SOLVER_FAILED`` where the
            solve stopped; NaN otherwise (t = 0 noise, t = 1 data). Always NaN for ``sample_sde``.
        messages: the message of each nonzero code (static).
    """

    samples: Array
    log_prob: Array | None = None
    trajectory: Array | None = None
    ts: Array | None = None
    num_steps: Int[Array, ""] | int = 0
    nfe: Int[Array, ""] | int = 0
    status: Int[Array, ""] | int = 0
    t_fail: Float[Array, ""] | float = math.nan
    messages: tuple = eqx.field(static=True, default=())


def forward_sde_diffusion(path: AbstractPath) -> ForwardSDEDiffusion:
    """g_t with g_t² = σ_t²λ̇_t (a :class:`diffjax.fields.ForwardSDEDiffusion`; t = 0 noise, t = 1 data).

    σ²λ̇ = 2σ²α̇/α − d(σ²)/dt (finite where σ̇ is not, e.g. VP at t = 1). With this g the reverse SDE is
    score_sde's ``reverse()`` SDE and the continuous limit of DDPM/VDM ancestral sampling (formula sheet §4).
    For ``VPPath`` g² = β(1 − t) (β at the papers' time s = 1 − t). Paths with α_0 = 0 (LinearPath,
    CosinePath) have g → ∞ at t = 0: start such SDEs at t0 > 0.
    """
    if not isinstance(path, AbstractPath):
        raise ValueError(f"path must be a diffjax path, got {type(path).__name__}")
    return ForwardSDEDiffusion(path)


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


def _finite(*arrays):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))


def _checked_start(x0, given):
    """(x0 or zeros, whether it is finite): a NaN/inf x0 the user passed is reported as NONFINITE_INPUT and the
    solve starts from zeros instead, so that one bad row of a vmapped batch does not keep the whole batch
    stepping until max_steps. A drawn x0 is finite and not checked."""
    if not given:
        return x0, jnp.asarray(True)
    ok = _finite(x0)
    return jnp.where(ok, x0, jnp.zeros_like(x0)), ok


# ---------------------------------------------------------------------------------------------------------------
# ODE
# ---------------------------------------------------------------------------------------------------------------
def _ode_messages(max_steps, rtol, atol):
    return {
        solve.NONFINITE_INPUT: (
            "diffjax.sample_ode: the starting point x0 (or x0_log_prob) holds NaN/inf: check the x0 you passed; "
            "its sample is NaN"
        ),
        solve.NONFINITE_END: (
            "diffjax.sample_ode: the velocity field is NaN/inf at an end of [t0, t1] (evaluated at the starting "
            "point). A data-prediction converted to a velocity divides by sigma (0 at t = 1 on LinearPath and "
            "CosinePath), an eps/score-prediction by alpha (0 at t = 0): pass t0, t1 = "
            "diffjax.integration_interval(path, kind)."
        ),
        solve.NONFINITE_FIELD: (
            "diffjax.sample_ode: the velocity field is NaN/inf inside [t0, t1], just above t = {t} (t = 0 noise, "
            "t = 1 data; the solve from the noise end t0 towards the data end t1 could not get past t = {t}): "
            "the model diverged there, or a kind conversion divides by alpha or sigma where it vanishes; "
            "evaluate the field just above that t, and if t is near an end pass t0, t1 = "
            "diffjax.integration_interval(path, kind)."
        ),
        solve.MAX_STEPS: (
            f"diffjax.sample_ode: the ODE solver reached max_steps={max_steps} at t = {{t}} before t1, with a "
            f"finite field. Increase max_steps, loosen rtol/atol (now {rtol}/{atol}), or use fixed steps "
            "(num_steps=N)."
        ),
        solve.SOLVER_FAILED: (
            "diffjax.sample_ode: the ODE solver failed at t = {t} (step size collapsed or non-finite values in "
            "the vector field); check the velocity field near that time and the time range."
        ),
        solve.NONFINITE: (
            "diffjax.sample_ode: non-finite samples; the velocity field is singular on [t0, t1] (try t1 < 1 or "
            "t0, t1 = diffjax.integration_interval(path, kind))."
        ),
    }


def _ode_field(trace: AbstractTrace | None, t0, t1):
    """The vector field of the sampler's solve, ``field(t, y, (velocity, trace_state))``.

    Times are clipped to [t0, t1]: the stages never leave it, but the controller's first step-size guess may,
    and paths are defined on [0, 1] only. The field's output is cast to the state's dtype (a float64 model
    under x64 with a float32 x0 integrates in float32).
    """
    if trace is None:
        return lambda t, y, args: args[0](jnp.clip(t, t0, t1), y).astype(y.dtype)

    def field(t, y, args):
        velocity, state = args
        t = jnp.clip(t, t0, t1)
        u, div = trace(lambda z: velocity(t, z), y[0], state)
        return u.astype(y[0].dtype), -div.astype(y[0].dtype)

    return field


def _ode_controller(path, num_steps, grid, t0, t1, rtol, atol):
    if num_steps is None:
        return diffrax.PIDController(rtol=rtol, atol=atol), None
    grid_ts = time_grid(path, num_steps, grid, t0=t0, t1=t1).astype(
        t0.dtype
    )  # the state's precision
    return diffrax.StepTo(ts=grid_ts), grid_ts


def _save_times(save_ts, save_trajectory, grid_ts, t0, t1):
    if save_ts is not None:
        return jnp.asarray(save_ts, t0.dtype)
    if save_trajectory:
        return grid_ts if grid_ts is not None else jnp.linspace(t0, t1, 101)
    return None


@eqx.filter_jit
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
    trace: str | AbstractTrace = "exact",
    num_probes: int = 1,
    t0: Scalar | None = None,
    t1: Scalar | None = None,
    throw: bool = True,
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

    Log-likelihood (``log_prob=True``): the same solve integrates d/dt [x, ℓ] = [u_t(x), −∇·u_t(x)], ℓ(t0) = 0,
    so that (instantaneous change of variables, sheet §5.1)

        log p_{t1}(x_{t1}) = log p_{t0}(x_{t0}) − ∫_{t0}^{t1} ∇·u_t(x_t) dt,

    with log p_{t0}(x_{t0}) = ``x0_log_prob`` if given, else ``path.prior.log_prob(x0)``. ``trace`` is
    ``"exact"`` / :class:`~diffjax.fields.ExactTrace` or ``"hutchinson"`` / :class:`~diffjax.fields.Hutchinson`
    (``num_probes`` Rademacher probes drawn once from ``key``, fixed for the whole solve: an unbiased estimate).

    Returns a :class:`SampleResult` (``trajectory``/``ts`` at ``save_ts``, or when ``save_trajectory``: the grid
    for fixed steps, else 101 uniform times). ``nfe`` = stages × steps for fixed steps (Euler N, Heun 2N), and
    (stages − 1) × (accepted + rejected) + 1 for adaptive FSAL Runge–Kutta (checked against counted calls).

    Raises:
        ValueError: bad solver/grid/trace names or arguments.
        EquinoxRuntimeError (``throw=True``, also under jit): a NaN/inf ``x0`` or ``x0_log_prob``, a field
            that is NaN/inf at t0 or t1 or inside the interval (the message names the time), ``max_steps``
            reached with a finite field, another solver failure, or non-finite samples. With ``throw=False``
            the code is returned in ``status`` (and the time in ``t_fail``) instead.
    """
    solve.check_steps(num_steps, max_steps)
    if grid not in GRID_KINDS:
        raise ValueError(f"unknown grid={grid!r}; expected one of {GRID_KINDS}")
    trace_obj = as_trace(trace, num_probes=num_probes) if log_prob else None
    solver_obj = solve.resolve_solver(solver, num_steps)
    t0, t1 = solve.interval(path, t0, t1)
    k_x0, k_probe = jax.random.split(key)
    x0, x0_ok = _checked_start(_initial_state(path, k_x0, shape, x0), x0 is not None)
    if log_prob and x0_log_prob is not None:
        x0_ok = x0_ok & jnp.all(jnp.isfinite(jnp.asarray(x0_log_prob)))
    t0, t1 = t0.astype(x0.dtype), t1.astype(x0.dtype)
    controller, grid_ts = _ode_controller(path, num_steps, grid, t0, t1, rtol, atol)
    traj_ts = _save_times(save_ts, save_trajectory, grid_ts, t0, t1)
    if trace_obj is None:
        y0, args = x0, (velocity, None)
    else:
        y0, args = (x0, jnp.zeros((), x0.dtype)), (velocity, trace_obj.init(k_probe, x0))
    ends_ok = _finite(velocity(t0, x0), velocity(t1, x0))
    sol, status, nfe, t_fail = solve.diffeqsolve(
        _ode_field(trace_obj, t0, t1),
        y0,
        t0,
        t1,
        args=args,
        solver=solver_obj,
        controller=controller,
        max_steps=max_steps if num_steps is None else num_steps,
        ends_ok=ends_ok,
        input_ok=x0_ok,
        save_ts=traj_ts,
    )
    xs = sol.ys if trace_obj is None else sol.ys[0]
    samples = xs[-1]
    lp = None
    if trace_obj is not None:
        prior_lp = path.prior.log_prob(x0) if x0_log_prob is None else jnp.asarray(x0_log_prob)
        lp = (prior_lp + sol.ys[1][-1]).astype(x0.dtype)
    status, t_fail = solve.final_status(
        status, t_fail, samples, *(() if lp is None else (lp,)), ends_ok=ends_ok
    )
    nan = jnp.full((), jnp.nan, x0.dtype)
    samples = jnp.where(x0_ok, samples, nan)
    lp = None if lp is None else jnp.where(x0_ok, lp, nan)
    traj = (
        None if traj_ts is None else jnp.where(x0_ok, xs[:-1], nan)
    )  # a bad row's path is not a path
    if throw:
        samples = solve.throw_if_failed(
            samples, status, _ode_messages(max_steps, rtol, atol), t_fail
        )
    return SampleResult(
        samples=samples,
        log_prob=lp,
        trajectory=traj,
        ts=traj_ts,
        num_steps=sol.stats["num_steps"],
        nfe=nfe,
        status=status,
        t_fail=t_fail,
        messages=tuple(sorted(_ode_messages(max_steps, rtol, atol).items())),
    )


# ---------------------------------------------------------------------------------------------------------------
# SDE
# ---------------------------------------------------------------------------------------------------------------
_SDE_MESSAGES = {
    solve.NONFINITE_INPUT: (
        "diffjax.sample_sde: the starting point x0 holds NaN/inf: check the x0 you passed; its sample is NaN"
    ),
    solve.SOLVER_FAILED: (
        "diffjax.sample_sde: diffusion g_t must be finite and >= 0 on the time grid (g → ∞ at t = 0 for "
        "forward_sde_diffusion of LinearPath/CosinePath: start at t0 > 0)"
    ),
    solve.NONFINITE: (
        "diffjax.sample_sde: non-finite samples (singular fields at t0/t1, or steps too large for g)"
    ),
}


def _diffusion(diffusion) -> tuple[Callable, bool]:
    """(g as a callable of t, whether g is statically zero)."""
    if callable(diffusion):
        return diffusion, False
    if not isinstance(diffusion, jax.core.Tracer) and not isinstance(diffusion, jax.Array):
        v = float(diffusion)
        if not (v >= 0.0 and math.isfinite(v)):
            raise ValueError(
                f"diffusion must be a finite constant g >= 0 or a callable t -> g_t >= 0, got {diffusion!r}"
            )
        if v == 0.0:
            return ConstantDiffusion(jnp.zeros((), jnp.result_type(float))), True
    return ConstantDiffusion(jnp.asarray(diffusion, jnp.result_type(float))), False


def _check_sde_args(num_steps, langevin_steps, method):
    for name, v, lo in (("num_steps", num_steps, 1), ("langevin_steps", langevin_steps, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be a Python int >= {lo}, got {v!r}")
    if isinstance(method, str):
        if method not in _SDE_METHODS:
            raise ValueError(
                f"unknown method={method!r}; expected one of {_SDE_METHODS} or a diffrax SDE solver instance "
                "(e.g. diffrax.Heun(), diffrax.SRA1(), diffrax.ShARK())"
            )
    elif not isinstance(method, diffrax.AbstractSolver):
        raise ValueError(f"method must be 'euler_maruyama' or a diffrax solver, got {method!r}")
    elif langevin_steps > 0:
        raise ValueError("langevin_steps > 0 is only supported with method='euler_maruyama'")


class _Drift(eqx.Module):
    velocity: Callable
    score: Callable
    zero: bool = eqx.field(static=True)

    def __call__(self, t, x, g):
        u = self.velocity(t, x)
        f = u if self.zero else u + (0.5 * g * g) * self.score(t, x)
        return f.astype(x.dtype)


@eqx.filter_jit
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
    throw: bool = True,
) -> SampleResult:
    """One sample of the reverse-time SDE family, from noise (t0) to data (t1) (sheet §4, Song et al. 2021):

        dX = [u_t(X) + ½ g_t² ∇log p_t(X)] dt + g_t dW,   X_{t0} ~ p_{t0} ≈ ``path.prior``,

    which has the marginals p_t for every g_t ≥ 0 (t = 0 noise, t = 1 data). g = 0 is the probability-flow ODE
    (then this is its Euler method and ``score`` is never called); g² = σ²λ̇ (:func:`forward_sde_diffusion`) is
    score_sde's reverse SDE.

    Args:
        velocity, score: per-example fields (t, x) -> array (from any model via ``diffjax.fields``).
        diffusion: g as a callable t -> g_t >= 0 (e.g. :func:`forward_sde_diffusion`) or a constant >= 0.
        num_steps, grid: N steps on ``time_grid(path, N, grid, t0=t0, t1=t1)``.
        method: ``"euler_maruyama"``: X_{i+1} = X_i + h_i f(t_i, X_i) + g(t_i) √h_i ξ_i, a plain ``lax.scan``
            with ξ_i from ``jax.random.split(key, N)[i]`` (g evaluated once on the grid, before the loop).
            Or a diffrax SDE solver instance (e.g. ``diffrax.Heun()``, ``diffrax.SRA1()``, ``diffrax.ShARK()``),
            solved with ``diffeqsolve`` on the same grid (``StepTo``), driven by a ``VirtualBrownianTree``
            (with space-time Lévy area when the solver needs it) resolved to 1/16 of the grid's shortest step, so
            that every increment has variance h_i however uneven the grid (a tolerance of 1/(8N) undercut the
            short steps of log-SNR grids). Differentiable (reverse mode).
        langevin_steps, langevin_snr: predictor–corrector (Euler–Maruyama only). After each predictor step,
            ``langevin_steps`` Langevin steps at the new time t (score_sde's ``LangevinCorrector``):
            x ← x + η s + √(2η) ξ, s = ∇log p_t(x), ξ ~ N(0, I), η = 2 (r ‖ξ‖/‖s‖)² with r = ``langevin_snr``.
            Caveat (inherited from score_sde): because η depends on x, repeated corrector steps are a
            time-changed Langevin diffusion whose invariant density is ∝ p_t·‖∇log p_t‖², not p_t; the bias is
            O(1/D). The corrector runs after each predictor step (at t_1, …, t_N = t1).
        x0: the start x_{t0}; default a draw from ``path.prior``.
        final_denoise: return Tweedie's E[x_data | x_{t1}] = (x + σ²∇log p)/α at t1 (one more score call).
        save_trajectory: also return all N + 1 states on the grid (``trajectory``, ``ts``).
        throw: raise on failure (default) or return the code in ``status``.

    Returns a :class:`SampleResult`; ``nfe`` counts drift evaluations (each: one velocity + one score call, or
    one velocity call when g is the constant 0) plus one per corrector step and one for ``final_denoise``; for a
    diffrax solver, stages × steps for explicit Runge–Kutta methods (e.g. 2 per step for ``diffrax.Heun()``) and
    −1 where the count is not known.

    Raises:
        ValueError: bad method/grid names, negative constant diffusion, Langevin with a diffrax method.
        EquinoxRuntimeError (``throw=True``, also under jit): a NaN/inf ``x0``, a callable g that is negative
            or non-finite on the grid, or non-finite samples.
    """
    _check_sde_args(num_steps, langevin_steps, method)
    g_fn, g_zero = _diffusion(diffusion)
    x0, x0_ok = _checked_start(
        _initial_state(path, jax.random.fold_in(key, 0x5D0), shape, x0), x0 is not None
    )
    ts = time_grid(path, num_steps, grid, t0=t0, t1=t1).astype(x0.dtype)
    gs = jax.vmap(g_fn)(ts[:-1]).astype(x0.dtype)
    g_ok = jnp.all((gs >= 0) & jnp.isfinite(gs))
    drift = _Drift(velocity, score, g_zero)
    if isinstance(method, str):
        x, traj = _euler_maruyama(
            drift, score, ts, gs, x0, key, langevin_steps, langevin_snr, save_trajectory
        )
    else:
        x, traj = _diffrax_sde(method, drift, g_fn, ts, x0, key, save_trajectory)
    # drift evaluations: one per Euler–Maruyama step (+ the corrector's), stages × steps for a diffrax solver
    nfe = (
        num_steps * (1 + langevin_steps)
        if isinstance(method, str)
        else solve.nfe(method, num_steps)
    )
    if final_denoise:
        a, s, _, _ = path.coefficients(ts[-1])
        x = (x + s * s * score(ts[-1], x)) / a
        nfe += 1
    status = jnp.where(g_ok, solve.SUCCESSFUL, solve.SOLVER_FAILED)
    status, _ = solve.final_status(status, jnp.nan, x)
    status = jnp.where(x0_ok, status, solve.NONFINITE_INPUT).astype(jnp.int32)
    x = jnp.where(x0_ok, x, jnp.full((), jnp.nan, x.dtype))
    if throw:
        x = solve.throw_if_failed(x, status, _SDE_MESSAGES)
    return SampleResult(
        samples=x,
        trajectory=jnp.concatenate([x0[None], traj], axis=0) if save_trajectory else None,
        ts=ts if save_trajectory else None,
        num_steps=jnp.asarray(num_steps),
        nfe=jnp.asarray(nfe),
        status=status,
        t_fail=jnp.full((), jnp.nan, x.dtype),
        messages=tuple(sorted(_SDE_MESSAGES.items())),
    )


def _euler_maruyama(drift, score, ts, gs, x0, key, langevin_steps, snr, save_trajectory):
    """X_{i+1} = X_i + h_i f(t_i, X_i) + g_i √h_i ξ_i as a ``lax.scan`` (+ optional Langevin corrector)."""
    keys = jax.random.split(key, ts.shape[0] - 1)

    def step(x, inp):
        t, t_next, g, k = inp
        h = t_next - t
        if langevin_steps:
            k, kc = jax.random.split(k)
        x = x + h * drift(t, x, g)
        if not drift.zero:
            x = x + (g * jnp.sqrt(h)) * jax.random.normal(k, x.shape, x.dtype)
        if langevin_steps:
            x = _langevin(score, t_next, x, kc, langevin_steps, snr)
        return x, (x if save_trajectory else None)

    return jax.lax.scan(step, x0, (ts[:-1], ts[1:], gs, keys))


def _langevin(score, t, x, key, n, snr):
    def body(x, k):
        s = score(t, x)
        xi = jax.random.normal(k, x.shape, x.dtype)
        eta = 2.0 * jnp.square(snr * jnp.linalg.norm(xi) / jnp.linalg.norm(s))
        return x + eta * s + jnp.sqrt(2.0 * eta) * xi, None

    x, _ = jax.lax.scan(body, x, jax.random.split(key, n))
    return x


def _levy_area(solver):
    levy = getattr(solver, "minimal_levy_area", None)
    if isinstance(levy, type) and issubclass(levy, diffrax.AbstractSpaceTimeTimeLevyArea):
        return diffrax.SpaceTimeTimeLevyArea
    if isinstance(levy, type) and issubclass(levy, diffrax.AbstractSpaceTimeLevyArea):
        return diffrax.SpaceTimeLevyArea
    return diffrax.BrownianIncrement


def _diffrax_sde(solver, drift, g_fn, ts, x0, key, save_trajectory):
    """A diffrax SDE solve on the grid ``ts`` with exact Brownian increments per step."""
    n = ts.shape[0] - 1
    # The tree resolves the path to ``tol``; it must be far below the shortest step, or that step's increment
    # has too little variance (1/(8n) undercut 62 of 200 steps of a log-SNR grid: var(ΔW)/h ≈ 0.2–0.3).
    bm = diffrax.VirtualBrownianTree(
        ts[0],
        ts[-1],
        tol=jnp.min(jnp.diff(ts)) / BROWNIAN_TOL_FRACTION,
        shape=jax.ShapeDtypeStruct(x0.shape, x0.dtype),
        key=key,
        levy_area=_levy_area(solver),
    )
    f = diffrax.ODETerm(lambda t, y, args: args[0](t, y, args[1](t).astype(y.dtype)))
    diff = diffrax.ControlTerm(
        lambda t, y, args: lineax.DiagonalLinearOperator(
            args[1](t).astype(y.dtype) * jnp.ones_like(y)
        ),
        bm,
    )
    saveat = diffrax.SaveAt(ts=ts[1:]) if save_trajectory else diffrax.SaveAt(t1=True)
    sol = diffrax.diffeqsolve(
        diffrax.MultiTerm(f, diff),
        solver,
        ts[0],
        ts[-1],
        None,
        x0,
        args=(drift, g_fn),
        saveat=saveat,
        stepsize_controller=diffrax.StepTo(ts=ts),
        max_steps=n,
        throw=False,
    )
    return sol.ys[-1], (sol.ys if save_trajectory else None)
