"""Exact log-likelihoods of flow / probability-flow ODE models, and bits per dimension.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε.

Instantaneous change of variables (Chen et al. 2018; FFJORD, Grathwohl et al. 2019; score_sde, Song et al. 2021).
Along dX/dt = u_t(X), d/dt log p_t(X_t) = −∇·u_t(X_t), hence (formulas sheet §5.1)

    log p_{t1}(x) = log p_{t0}(X_{t0}) − ∫_{t0}^{t1} ∇·u_t(X_t) dt.

For one data point x we integrate the augmented ODE

    d/dt [X, ℓ] = [u_t(X), ∇·u_t(X)],   X(t1) = x,  ℓ(t1) = 0,

**backwards** from t1 (data end, ``path.t_max`` = 1 − t_eps by default) to t0 (noise end, ``path.t_min``) with
diffrax, so that
ℓ(t0) = ∫_{t1}^{t0} ∇·u dt = −∫_{t0}^{t1} ∇·u dt and

    log p_{t1}(x) = prior_log_prob(X(t0)) + ℓ(t0).

This is Meta ``flow_matching``'s ``ODESolver.compute_likelihood`` (time grid 1 → 0) and, with s = 1 − t, score_sde's
``likelihood.py``. The trace ∇·u is exact (D forward-mode JVPs per evaluation, :func:`diffjax.fields.divergence_exact`)
or the Hutchinson–Skilling estimate vᵀ(∂u/∂x)v with probes drawn once from ``key`` and **held fixed for the whole
solve** (the trajectory does not depend on v, so the log-likelihood estimate is unbiased; its exponential is not).

Endpoints. Paths that are singular at the data end (``path.t_eps`` > 0, e.g. :class:`~diffjax.VPPath`) stop at
t1 = ``path.t_max`` = 1 − t_eps, and paths with σ_1 > 0 (VE, EDM) never reach clean data: the value computed is log p_{t1}(x), the
density of the data perturbed as x_{t1} = α x + σ ε. The result always reports the size of that perturbation
r = σ_{t1}/α_{t1} and the scale term log α_{t1} per dimension; ``endpoint="gaussian"`` applies the correction

    log p_data(x) ≈ log p_{t1}(α_{t1} x) + D·log α_{t1}

(evaluate the ODE at α x and add the Jacobian of x ↦ αx). Exactly: log p_{t1}(αx) + D log α = log (p_data ∗ N(0, r² I))(x),
the data density smoothed by a Gaussian of standard deviation r, so the remaining error is the smoothing,
≈ (r²/2)·Δp/p = O(r²) per dimension (for VP with t_eps = 1e-5, r ≈ 1e-3 and log α ≈ −5e-7). This residual depends
on the data and is not estimated. The prior mismatch at the noise end (α_{t0} ≠ 0 for VP, the N(0, σ_max² I) prior
of VE/EDM) is another model error that the result does not hide: pass ``prior_log_prob`` to change the prior.

Both public functions are wrapped in ``equinox.filter_jit``: arrays (x, keys, PyTree leaves of the velocity or
path — pass the model as ``equinox.Partial(apply, params)`` inside a :class:`~diffjax.VelocityField`) are traced,
everything else (strings, Python numbers such as rtol or t0) is static. A second call with new parameters of the
same shapes reuses the compiled program; a fresh ``lambda`` per call recompiles. Inside an outer ``jax.jit`` they
inline.

Everything is per example (``x`` of any shape), jittable (no host round-trips inside the solve), vmappable over
examples and differentiable w.r.t. parameters the velocity closes over (``diffrax.RecursiveCheckpointAdjoint``
by default; ``diffrax.BacksolveAdjoint`` differentiates only w.r.t. PyTree leaves of the velocity, so pass the
velocity as an ``equinox.Module`` or ``jax.tree_util.Partial`` in that case).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from . import solve
from .fields import AbstractTrace, ExactTrace, as_trace
from .paths import AbstractPath
from .time_change import AbstractTimeChange, as_time_change

__all__ = [
    "LikelihoodResult",
    "log_likelihood",
    "log_likelihood_with_stats",
    "bits_per_dim",
    "bits_per_dim_with_stats",
    "BitsPerDimResult",
    "probes_for_precision",
    "log_density_norm",
    "DEFAULT_RTOL",
    "DEFAULT_ATOL",
]

ENDPOINTS = ("none", "gaussian")

Field = Callable[[Float[Array, ""], Float[Array, "*shape"]], Float[Array, "*shape"]]


class LikelihoodResult(eqx.Module):
    """The log-likelihood of one example and how it was computed (t = 0 noise, t = 1 data).

    Under ``jax.vmap`` every numeric field gains the batch dimension.

    Attributes:
        log_prob: the returned log-density in nats, ``prior_log_prob + delta_log_prob + endpoint_correction``.
            Without an endpoint correction this is log p_{t1}(x).
        prior_log_prob: log p_{t0}(X(t0)) under the prior (default ``path.prior``).
        x0: X(t0), the noise-end latent of x (same shape as x): re-scoring under another prior needs no new
            solve, ``prior.log_prob(x0) + delta_log_prob + endpoint_correction``.
        delta_log_prob: ℓ(t0) = −∫_{t0}^{t1} ∇·u_t(X_t) dt (the change-of-variables integral).
        log_prob_se: the standard error of ``log_prob`` over the Hutchinson probes, in nats: with k ≥ 2 probes
            the solve integrates one ℓ_k per probe along the same trajectory (X does not depend on the probes)
            and reports ℓ = mean_k ℓ_k with SE = std(ℓ_k, ddof=1)/√k, whose square is an unbiased estimate of
            the variance of ``log_prob`` over probe draws for this x. 0 for the exact trace; NaN for one probe
            (no spread to measure). SE ∝ 1/√k: :func:`probes_for_precision` gives the k for a target.
        endpoint_correction: the term added at the data end: D·log α_{t1} for ``endpoint="gaussian"``, else 0.
        endpoint_sigma_ratio: r = σ_{t1}/α_{t1}, the standard deviation of the Gaussian perturbation of the data
            that log p_{t1} describes (0 for paths that reach clean data at t1 = 1). Always reported.
        endpoint_log_alpha: log α_{t1}, the per-dimension correction estimate (nats/dim). Always reported.
        num_steps: solver steps taken (accepted + rejected).
        num_accepted_steps, num_rejected_steps: from diffrax's statistics.
        nfe: evaluations of the augmented field [u, ∇·u] made by the solver (each one is one linearisation of u
            plus D JVPs for the exact trace, or ``num_probes`` JVPs for Hutchinson). Exact for explicit
            Runge–Kutta solvers ((stages − FSAL)·num_steps + FSAL, checked by counting); −1 where the count is
            not known. The diagnosis evaluates u (without its divergence) once more, at (t1, x).
        t0, t1: the integration interval (noise end, data end).
        status: 0 on success, else a :mod:`diffjax.solve` code (returned with ``throw=False``;
            :func:`diffjax.solve.raise_if_failed` raises its message on the host). ``NONFINITE_INPUT`` for an x
            that holds NaN/inf (then ``log_prob`` and ``x0`` are NaN; the solve ran on zeros).
        t_fail: for ``NONFINITE_FIELD`` the time where the velocity turns NaN/inf (the backward solve, which
            runs from the data end t1 down to the noise end t0, could not get below it), for ``MAX_STEPS`` /
            ``SOLVER_FAILED`` where the solve stopped; NaN otherwise. t = 0 noise, t = 1 data.
        dtype: the floating-point precision of the computation, ``"float32"`` or ``"float64"``.
    """

    log_prob: Float[Array, ""]
    prior_log_prob: Float[Array, ""]
    x0: Float[Array, "*shape"]
    delta_log_prob: Float[Array, ""]
    log_prob_se: Float[Array, ""]
    endpoint_correction: Float[Array, ""]
    endpoint_sigma_ratio: Float[Array, ""]
    endpoint_log_alpha: Float[Array, ""]
    num_steps: Int[Array, ""]
    num_accepted_steps: Int[Array, ""]
    num_rejected_steps: Int[Array, ""]
    nfe: Int[Array, ""]
    t0: Float[Array, ""]
    t1: Float[Array, ""]
    status: Int[Array, ""]
    t_fail: Float[Array, ""]
    dtype: str = eqx.field(static=True)
    messages: tuple = eqx.field(static=True, default=())


def _messages(max_steps):
    return {
        solve.NONFINITE_INPUT: (
            "diffjax.log_likelihood: the data point x holds NaN/inf (check the input data: missing values, or a "
            "preprocessing or dequantisation step that produced NaN/inf); its log_prob is NaN"
        ),
        solve.NONFINITE_END: (
            "diffjax.log_likelihood: the velocity field is NaN/inf at the data end t1 for this x; paths "
            "singular at t = 1 (e.g. VPPath) or data-prediction models (whose conversion divides by sigma) need "
            "t1 < 1, ε/score models t0 > 0: pass t0, t1 = diffjax.integration_interval(path, kind)"
        ),
        solve.NONFINITE_FIELD: (
            "diffjax.log_likelihood: the velocity field is NaN/inf inside the interval, just below t = {t} "
            "(t = 0 noise, t = 1 data; the likelihood integrates from the data end t1 down to the noise end t0 "
            "and could not get below t = {t}): the model diverged there, or a kind conversion divides by alpha "
            "or sigma where it vanishes; evaluate the field just below that t, and if t is near the noise end "
            "pass t0, t1 = diffjax.integration_interval(path, kind)"
        ),
        solve.MAX_STEPS: (
            f"diffjax.log_likelihood: the ODE solver reached max_steps={max_steps} at t = {{t}} on its way from "
            "the data end t1 down to the noise end t0 (t = 0 noise, t = 1 data), with a finite field. Fix: raise "
            "max_steps, loosen rtol/atol, or pass num_steps for a fixed grid (if t is near t0, a field that "
            "grows like 1/alpha there, e.g. an eps/score model: pass t0, t1 = diffjax.integration_interval(path, "
            "kind))"
        ),
        solve.SOLVER_FAILED: (
            "diffjax.log_likelihood: the ODE solve failed at t = {t} (diffrax returned an unsuccessful result "
            "other than max_steps, e.g. a step size that underflowed); check the velocity field for "
            "singularities on [t0, t1]"
        ),
        solve.NONFINITE: (
            "diffjax.log_likelihood: non-finite log-likelihood (NaN/inf): the divergence or the trajectory blew "
            "up on [t0, t1], or prior_log_prob is non-finite at X(t0); check the field near the data end t1"
        ),
    }


#: Default tolerances of the adaptive likelihood solve, with :func:`log_density_norm` and the linear-path time.
#: Measured in float32 against the Gaussian-mixture oracle (``benchmarks/likelihood.py``, 4,096 points, exact
#: trace, exact prior): max |error| 2.9e-5 to 3.2e-5 nats for the 3-component mixture on the linear, cosine and VP
#: paths; 9.1e-5 and 6.1e-5 for an 8-Gaussian ring of standard deviation 0.05 on the linear and cosine paths, and
#: 1.1e-4 on VP (below 1e-4 at 128 points, tests/test_likelihood.py). The previous defaults (rtol = atol = 1e-5,
#: diffrax's RMS norm, time t) gave up to 2e-4 (mixture) and 3e-4 (ring).
DEFAULT_RTOL = 1e-6
DEFAULT_ATOL = 3e-6


def log_density_norm(error) -> Float[Array, ""]:
    """Step-size control for the reported quantity: max(RMS over the state x, |ℓ|) of the scaled error.

    The likelihood integrates [x, ℓ]; diffrax's default RMS norm over all D + 1 components divides the error of ℓ —
    the log-density that is reported — by √(D + 1), so in 64-D a step could leave ℓ eight times less accurate
    than the tolerance. With this norm every accepted step keeps ℓ's own local error within atol + rtol·|ℓ|, and
    x's RMS error within its tolerance (the error in x reaches log p through the prior and the divergence along
    the trajectory). Pass ``norm=optimistix.rms_norm`` for diffrax's default.
    """
    # optimistix's RMS norm (diffrax's default) has a gradient that stays finite at zero error
    if not (isinstance(error, tuple) and len(error) == 2 and jnp.ndim(error[1]) <= 1):
        return optx.rms_norm(error)  # e.g. BacksolveAdjoint's adjoint solve, whose state is larger
    x_err, ell_err = error
    # k Hutchinson probes integrated side by side (ℓ of shape (k,)): the reported value is their mean, whose
    # error is the mean of theirs
    return jnp.maximum(optx.rms_norm(x_err), jnp.abs(jnp.mean(ell_err)))


def _augmented_field(trace: AbstractTrace, closed, per_probe: bool = False):
    """d/ds [y, ℓ] = [(u_t(c·y) − ċ·y)/(c·ṡ), ∇·u_t(c·y)/ṡ] in the integration variable s of a time change
    (:mod:`diffjax.time_change`; s = t and c = 1 gives d/dt [X, ℓ] = [u, ∇·u]), called as
    ``field(s, y, (velocity, data))``. With ``per_probe`` ℓ has shape (k,): one integral per Hutchinson probe
    (:meth:`~diffjax.fields.AbstractTrace.per_probe`), same trajectory, same cost.

    ``data`` = (trace state, t_lo, t_hi, path, time change) travels either as diffrax ``args`` (``closed=None``;
    needed by ``BacksolveAdjoint``, which differentiates w.r.t. ``args`` and refuses closed-over tracers) or is
    closed over (``closed=data``; about 1.5x faster for vmapped Hutchinson solves on CPU than carrying the probes
    as ``args``). The velocity is always in ``args``, so its PyTree leaves are arguments of the solve.
    """

    def field(s, y, args):
        velocity, data = args
        state, t_lo, t_hi, path, change = closed if closed is not None else data
        z, _ = y
        # Keep every evaluation inside [t0, t1]: stages never leave the interval, but an initial step-size guess
        # may, and paths/oracles are defined on [0, 1] only (t_of_s clamps its own domain).
        t = jnp.clip(change.t_of_s(path, s), t_lo, t_hi).astype(z.dtype)
        c, dc = change.scale(path, t)
        g = change.ds_dt(path, t)
        evaluate = trace.per_probe if per_probe else trace
        u, div = evaluate(lambda v: velocity(t, v), c * z, state)
        return ((u - dc * z) / (c * g)).astype(z.dtype), (div / g).astype(z.dtype)

    return field


def _probe_mean_and_se(ell, trace, dtype):
    """(ℓ, its standard error over the probes): ℓ of shape (k,) is averaged (SE = std/√k, ddof = 1); a scalar ℓ
    is the exact trace's (SE 0) or one probe's (SE NaN: no spread to measure)."""
    if jnp.ndim(ell) == 1:
        k = ell.shape[0]
        return jnp.mean(ell), (jnp.std(ell, ddof=1) / math.sqrt(k)).astype(dtype)
    if isinstance(trace, ExactTrace):
        return ell, jnp.zeros((), dtype)
    return ell, jnp.full((), jnp.nan, dtype)


def probes_for_precision(standard_error: float, target: float, *, num_probes: int = 1) -> int:
    """Hutchinson probes needed for a target standard error: k = ⌈num_probes·(standard_error/target)²⌉.

    The probes' estimates are independent given the trajectory, so the standard error of their mean falls as
    1/√k: an SE of ``standard_error`` measured with ``num_probes`` probes becomes ``target`` at the k returned.
    Both in the same unit (nats, or bits/dim as :func:`bits_per_dim_with_stats` reports it). Measure the SE on
    a few representative examples (``log_likelihood_with_stats(..., trace="hutchinson", num_probes=4)``) and
    take a high quantile, since it varies between examples. Example: 0.045 bits/dim with 4 probes on a trained
    28×28 model (issue 15) needs ⌈4·(0.045/0.01)²⌉ = 81 probes for 0.01 bits/dim.
    """
    se, tgt = float(standard_error), float(target)
    if not (math.isfinite(se) and se >= 0):
        raise ValueError(
            f"standard_error must be a finite number >= 0, got {standard_error!r} (it is NaN for one probe: "
            "measure it with num_probes >= 2)"
        )
    if not (math.isfinite(tgt) and tgt > 0):
        raise ValueError(f"target must be a finite number > 0, got {target!r}")
    if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
        raise ValueError(
            f"num_probes must be an int >= 1 (the probes the SE was measured with), got {num_probes!r}"
        )
    return max(1, math.ceil(num_probes * (se / tgt) ** 2 - 1e-9))


def _check_args(endpoint, num_steps, max_steps):
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint={endpoint!r}; expected one of {ENDPOINTS}")
    solve.check_steps(num_steps, max_steps)


def _as_float(x):
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def _endpoint(path, t1, x, endpoint):
    """(start of the backward solve, correction, σ/α at t1, log α at t1): log p_{t1} describes αx + σε."""
    a1, s1, _, _ = path.coefficients(t1)
    a1, s1 = a1.astype(x.dtype), s1.astype(x.dtype)
    log_a1 = jnp.log(a1)
    if endpoint == "gaussian":
        return a1 * x, x.size * log_a1, s1 / a1, log_a1
    return x, jnp.zeros((), x.dtype), s1 / a1, log_a1


def _controller(change, path, interval, rtol, atol, norm, num_steps):
    """The PID controller on the log-density norm, or ``num_steps`` equal steps in the integration variable
    (in the dtype of the interval, which is x's: a path's float64 leaves under x64 must not promote the grid)."""
    if num_steps is None:
        return diffrax.PIDController(
            rtol=rtol, atol=atol, norm=log_density_norm if norm is None else norm
        )
    s_lo, s_hi = (change.s_of_t(path, t).astype(t.dtype) for t in interval)
    return diffrax.StepTo(ts=jnp.linspace(s_hi, s_lo, num_steps + 1))


def _solve(
    velocity,
    path,
    change,
    trace,
    state,
    x_start,
    interval,
    x_ok,
    *,
    solver,
    controller,
    max_steps,
    adjoint,
    num_ell=0,
):
    """The backward solve of [y, ℓ] from the data end to the noise end in the variable of ``change``.

    Returns (solution, status, nfe, t_fail in t, ends_ok); the solution's state is y = x/c.
    """
    t_lo, t_hi = interval
    data = (state, t_lo, t_hi, path, change)
    per_probe = num_ell > 0
    if isinstance(adjoint, diffrax.BacksolveAdjoint):
        field, args = _augmented_field(trace, None, per_probe), (velocity, data)
    else:
        field, args = _augmented_field(trace, data, per_probe), (velocity, None)
    # One evaluation at the data end, where the backward solve starts and singular fields usually break (a NaN
    # there makes the controller reject every step, which would otherwise read as max_steps).
    ends_ok = jnp.all(jnp.isfinite(velocity(t_hi, x_start)))
    dtype = x_start.dtype
    sol, status, nfe, s_fail = solve.diffeqsolve(
        field,
        (
            x_start / change.scale(path, t_hi)[0].astype(dtype),
            jnp.zeros((num_ell,) if per_probe else (), dtype),
        ),
        change.s_of_t(path, t_hi).astype(dtype),
        change.s_of_t(path, t_lo).astype(dtype),
        args=args,
        solver=solver,
        controller=controller,
        max_steps=max_steps,
        ends_ok=ends_ok,
        input_ok=x_ok,
        adjoint=adjoint,
    )
    # where a failed solve stopped, back in the library's time (t = 0 noise, t = 1 data)
    t_fail = jnp.where(jnp.isnan(s_fail), s_fail, change.t_of_s(path, s_fail).astype(s_fail.dtype))
    return sol, status, nfe, t_fail, ends_ok


@eqx.filter_jit
def log_likelihood_with_stats(
    velocity: Field,
    path: AbstractPath,
    x: Float[ArrayLike, "*shape"],
    *,
    key: PRNGKeyArray | None = None,
    trace: str | AbstractTrace = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: diffrax.AbstractSolver | None = None,
    rtol: float = DEFAULT_RTOL,
    atol: float = DEFAULT_ATOL,
    norm: Callable | None = None,
    time: str | AbstractTimeChange = "linear",
    max_steps: int = 4096,
    t0: float | None = None,
    t1: float | None = None,
    prior_log_prob: Callable[[Float[Array, "*shape"]], Float[Array, ""]] | None = None,
    endpoint: str = "none",
    adjoint: diffrax.AbstractAdjoint | None = None,
    num_steps: int | None = None,
    chunk_size: int | None = None,
    throw: bool = True,
) -> LikelihoodResult:
    """log p(x) of ONE example under the flow dX/dt = u_t(X), with solver statistics (t = 0 noise, t = 1 data).

    Integrates d/dt [X, ℓ] = [u_t(X), ∇·u_t(X)] from t1 (X = x, ℓ = 0) down to t0 and returns
    log p = prior_log_prob(X(t0)) + ℓ(t0) (+ the endpoint correction), i.e.
    log p_{t1}(x) = log p_{t0}(X_{t0}) − ∫_{t0}^{t1} ∇·u dt (formulas sheet §5.1).

    Args:
        velocity: per-example velocity u(t, x) (a :class:`~diffjax.VelocityField` of a model of any kind).
            For log p(x | c) pass the field of ``diffjax.Conditioned(model, c)``; the field of a guided model
            (``diffjax.CFGModel``) gives the density of the guided sampler's output, which is not p(x | c) for w ≠ 1.
        path: the Gaussian path; supplies the default interval, the prior at t = 0 and (α, σ) at t1.
        x: one example of any shape (use ``jax.vmap`` for batches).
        key: PRNG key for the Hutchinson probes (drawn once, fixed along the solve).
        trace: ``"exact"`` / :class:`~diffjax.fields.ExactTrace` (D forward-mode JVPs per evaluation, O(D)
            memory) or ``"hutchinson"`` / :class:`~diffjax.fields.Hutchinson` (``num_probes``, ``probe``), or
            :class:`~diffjax.fields.HutchPlusPlus` (lower variance at the same JVPs where the Jacobian has a few
            large directions). With k ≥ 2 probes the k estimates are integrated side by side along the one
            solve and ``log_prob_se`` reports their standard error (SE ∝ 1/√k; :func:`probes_for_precision`).
        solver: a diffrax solver or name (default Tsit5; Heun with ``num_steps``).
        rtol, atol: tolerances of ``diffrax.PIDController`` (ignored with ``num_steps``); the defaults
            (:data:`DEFAULT_RTOL` = 1e-6, :data:`DEFAULT_ATOL` = 3e-6) reach ≤ 1e-4 nats on the oracle problems
            of ``benchmarks/likelihood.py`` in float32.
        norm: the controller's error norm over the scaled error of [x, ℓ] (default :func:`log_density_norm`,
            which bounds the log-density's own error; ``optimistix.rms_norm`` is diffrax's default).
        max_steps: step budget of the adaptive solve; reaching it raises an error that says so.
        t0, t1: the noise and data ends (default ``path.t_min``, ``path.t_max``); 0 ≤ t0 < t1 ≤ 1.
        prior_log_prob: log-density of X(t0) for one example (default ``path.prior.log_prob``).
        endpoint: ``"none"`` (return log p_{t1}(x)) or ``"gaussian"`` (start at α_{t1}·x and add D·log α_{t1};
            see the module docstring). Either way the result reports σ_{t1}/α_{t1} and log α_{t1}.
        adjoint: a diffrax adjoint (default ``RecursiveCheckpointAdjoint``; ``BacksolveAdjoint`` differentiates
            w.r.t. the PyTree leaves of ``velocity``).
        time: the variable the ODE is integrated in (:mod:`diffjax.time_change`): ``"linear"`` (default,
            :class:`~diffjax.time_change.LinearPathTime`: τ = α/(α+σ) with the state scaled by 1/(α+σ), in which
            every Gaussian path's flow is the linear path's), ``"t"`` (the path's own time) or an instance. The
            change of variables is exact: only step sizes and NFE differ (measured at equal accuracy,
            ``benchmarks/likelihood.py``: the same NFE on the linear path, where it is the identity; t/τ NFE
            0.79–0.95 on cosine and 1.11–1.33 on VP, the most for narrow components).
        num_steps: a fixed grid of ``num_steps`` steps (``diffrax.StepTo``), equal in the integration variable,
            instead of the controller.
        chunk_size: how many JVPs of the exact trace run at once (default: a 65,536-float budget).
        throw: raise on failure (default) or return the code in ``status``.

    Returns:
        A :class:`LikelihoodResult`; ``.log_prob`` is log p(x) in nats and ``.dtype`` names the precision.

    Raises:
        ValueError: bad ``trace``/``probe``/``endpoint``/``num_probes``/``num_steps``/interval, or a Hutchinson
            trace without ``key``.
        EquinoxRuntimeError (``throw=True``, also under jit): NaN/inf in x, a NaN/inf field at the data end or
            inside the interval (the message names the time), ``max_steps``, another solver failure, or a
            non-finite result.
    """
    _check_args(endpoint, num_steps, max_steps)
    trace = as_trace(trace, num_probes=num_probes, probe=probe, chunk_size=chunk_size)
    x = _as_float(x)
    # A NaN/inf data point is reported as such (not as a NaN field), and solved as zeros so that one bad row of a
    # vmapped batch does not keep the whole batch stepping until max_steps.
    x_ok = jnp.all(jnp.isfinite(x))
    x = jnp.where(x_ok, x, jnp.zeros_like(x))
    t_lo, t_hi = solve.interval(path, t0, t1, x.dtype)
    x_start, correction, sigma_ratio, log_a1 = _endpoint(path, t_hi, x, endpoint)
    change = as_time_change(time)
    # k >= 2 Hutchinson probes: one integral per probe (same trajectory), for the standard error of their mean
    k = getattr(trace, "num_probes", 1)
    k = k if isinstance(k, int) and k > 1 else 0
    sol, status, nfe, t_fail, ends_ok = _solve(
        velocity,
        path,
        change,
        trace,
        trace.init(key, x),
        x_start,
        (t_lo, t_hi),
        x_ok,
        solver=solve.resolve_solver(solver, num_steps),
        controller=_controller(change, path, (t_lo, t_hi), rtol, atol, norm, num_steps),
        max_steps=max_steps if num_steps is None else num_steps,
        adjoint=adjoint,
        num_ell=k,
    )
    x0 = sol.ys[0][0] * change.scale(path, t_lo)[0].astype(x.dtype)
    delta, se = _probe_mean_and_se(sol.ys[1][0], trace, x.dtype)
    prior = jnp.asarray(
        (path.prior.log_prob if prior_log_prob is None else prior_log_prob)(x0), x.dtype
    )
    log_prob = prior + delta + correction
    status, t_fail = solve.final_status(status, t_fail, log_prob, x0, ends_ok=ends_ok)
    nan = jnp.full((), jnp.nan, x.dtype)
    # a bad input row was solved from zeros: none of its outputs may look like a result
    log_prob, x0 = jnp.where(x_ok, log_prob, nan), jnp.where(x_ok, x0, nan)
    prior, delta = jnp.where(x_ok, prior, nan), jnp.where(x_ok, delta, nan)
    se = jnp.where(x_ok, se, nan)
    if throw:
        log_prob = solve.throw_if_failed(log_prob, status, _messages(max_steps), t_fail)
    return LikelihoodResult(
        log_prob=log_prob,
        prior_log_prob=prior,
        x0=x0,
        delta_log_prob=delta,
        log_prob_se=se,
        endpoint_correction=jnp.asarray(correction, x.dtype),
        endpoint_sigma_ratio=sigma_ratio,
        endpoint_log_alpha=log_a1,
        num_steps=jnp.asarray(sol.stats["num_steps"]),
        num_accepted_steps=jnp.asarray(sol.stats["num_accepted_steps"]),
        num_rejected_steps=jnp.asarray(sol.stats["num_rejected_steps"]),
        nfe=jnp.asarray(nfe),
        t0=t_lo,
        t1=t_hi,
        status=status,
        t_fail=t_fail,
        dtype=str(jnp.dtype(x.dtype)),
        messages=tuple(sorted(_messages(max_steps).items())),
    )


def log_likelihood(velocity: Field, path: AbstractPath, x: Float[ArrayLike, "*shape"], **kwargs):
    """log p(x) in nats for ONE example x under the flow of ``velocity`` on ``path`` (t = 0 noise, t = 1 data).

    log p_{t1}(x) = log p_{t0}(X_{t0}) − ∫_{t0}^{t1} ∇·u_t(X_t) dt, solved backwards from the data end t1 to the
    noise end t0 with diffrax. Same keyword arguments as :func:`log_likelihood_with_stats` (key, trace,
    num_probes, probe, solver, rtol, atol, norm, time, max_steps, t0, t1, prior_log_prob, endpoint, adjoint,
    num_steps, chunk_size, throw), which also returns the prior term, the integral, the endpoint perturbation
    σ_{t1}/α_{t1}, step counts, NFE, the status and the precision. Batch with ``jax.vmap``.
    """
    return log_likelihood_with_stats(velocity, path, x, **kwargs).log_prob


def _dequantisation(key, k, num_dequant, dequant_noise, dtype):
    """(u of shape (num_dequant, *k.shape) in [0, 1), the key left for Hutchinson probes)."""
    if dequant_noise is None:
        if key is None:
            raise ValueError(
                "bits_per_dim needs key= for the dequantisation noise (or dequant_noise=)"
            )
        key_u, key_ll = jax.random.split(key)
        return jax.random.uniform(key_u, (num_dequant, *k.shape), dtype), key_ll
    u = jnp.asarray(dequant_noise, dtype)
    if u.shape != (num_dequant, *k.shape):
        raise ValueError(
            f"dequant_noise must have shape (num_dequant, *k.shape) = {(num_dequant, *k.shape)}, got {u.shape}"
        )
    return u, key


def _dequantised_log_likelihoods(
    velocity, path, k, key, n_bits, num_levels, data_range, num_dequant, dequant_noise, ll_kwargs
):
    """The checked arguments of :func:`bits_per_dim` and the vmapped :func:`log_likelihood_with_stats` of each
    dequantisation draw x = lo + a·(k + u)/L: ``(results, L, a, number of draws)`` (t = 0 noise, t = 1 data)."""
    if "key" in ll_kwargs:
        raise ValueError(
            "pass key once, to bits_per_dim (it is split for dequantisation and probes)"
        )
    levels = int(num_levels) if num_levels is not None else 2 ** int(n_bits)
    if levels < 2:
        raise ValueError(f"need at least 2 levels, got num_levels={num_levels}, n_bits={n_bits}")
    lo, hi = (float(v) for v in data_range)
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range}")
    if int(num_dequant) < 1:
        raise ValueError(f"num_dequant must be >= 1, got {num_dequant}")
    k = jnp.asarray(k)
    dtype = jnp.result_type(float)
    u, key_ll = _dequantisation(key, k, int(num_dequant), dequant_noise, dtype)
    hutchinson = not isinstance(as_trace(ll_kwargs.get("trace", "exact")), ExactTrace)
    if hutchinson and key_ll is None:
        raise ValueError("a Hutchinson trace needs key= for its probes")
    keys = jax.random.split(key_ll, u.shape[0]) if hutchinson else None
    a = hi - lo

    def one(ui, ki):
        x = lo + a * (k.astype(dtype) + ui) / levels
        return log_likelihood_with_stats(velocity, path, x, key=ki, **ll_kwargs)

    r = jax.vmap(one)(u, keys) if keys is not None else jax.vmap(lambda ui: one(ui, None))(u)
    return r, levels, a, u.shape[0]


class BitsPerDimResult(eqx.Module):
    """Bits per dimension of one integer-valued example and how it was computed (vmap for batches).

    Attributes:
        bits_per_dim: the mean over the dequantisation draws (NaN if a solve failed).
        standard_error: its standard error over the Hutchinson probes in bits/dim (the draws' ``log_prob_se``
            combined: √(Σ_i se_i²)/(n·D·ln 2)); 0 for the exact trace, NaN for one probe. The spread over the
            dequantisation draws is not included.
        status: the first nonzero :mod:`diffjax.solve` code among the draws' solves, else 0.
        t_fail: that solve's ``t_fail`` (t = 0 noise, t = 1 data), else NaN.
        messages: the likelihood's message for each code (static), for :func:`diffjax.solve.raise_if_failed`.
    """

    bits_per_dim: Float[Array, ""]
    standard_error: Float[Array, ""]
    status: Int[Array, ""]
    t_fail: Float[Array, ""]
    messages: tuple = eqx.field(static=True, default=())


@eqx.filter_jit
def bits_per_dim_with_stats(
    velocity: Field,
    path: AbstractPath,
    k: Int[ArrayLike, "*shape"],
    *,
    key: PRNGKeyArray | None = None,
    n_bits: int = 8,
    num_levels: int | None = None,
    data_range: Sequence[float] = (-1.0, 1.0),
    num_dequant: int = 1,
    dequant_noise: Float[ArrayLike, " n *shape"] | None = None,
    **ll_kwargs,
) -> BitsPerDimResult:
    """:func:`bits_per_dim` with its Hutchinson standard error and the solves' status (never raises for a
    failed solve: check ``status`` with :func:`diffjax.solve.raise_if_failed`). Same arguments; t = 0 noise,
    t = 1 data."""
    r, levels, a, n = _dequantised_log_likelihoods(
        velocity,
        path,
        k,
        key,
        n_bits,
        num_levels,
        data_range,
        num_dequant,
        dequant_noise,
        {**ll_kwargs, "throw": False},
    )
    k = jnp.asarray(k)
    dtype = jnp.result_type(float)
    logp = jnp.where(r.status == solve.SUCCESSFUL, r.log_prob, jnp.nan)
    scale = k.size * math.log(2.0)
    nll_bits = -(logp + k.size * math.log(a / levels)) / scale
    se = jnp.sqrt(jnp.sum(jnp.square(r.log_prob_se))) / (n * scale)
    bad = r.status != solve.SUCCESSFUL
    first = jnp.argmax(bad)
    return BitsPerDimResult(
        bits_per_dim=jnp.mean(nll_bits),
        standard_error=se.astype(dtype),
        status=jnp.where(jnp.any(bad), r.status[first], solve.SUCCESSFUL).astype(jnp.int32),
        t_fail=jnp.where(jnp.any(bad), r.t_fail[first], jnp.nan).astype(r.t_fail.dtype),
        messages=r.messages,
    )


@eqx.filter_jit
def bits_per_dim(
    velocity: Field,
    path: AbstractPath,
    k: Int[ArrayLike, "*shape"],
    *,
    key: PRNGKeyArray | None = None,
    n_bits: int = 8,
    num_levels: int | None = None,
    data_range: Sequence[float] = (-1.0, 1.0),
    num_dequant: int = 1,
    dequant_noise: Float[ArrayLike, " n *shape"] | None = None,
    **ll_kwargs,
) -> Float[Array, ""]:
    """Bits per dimension of ONE integer-valued example k ∈ {0, …, L−1}^D with uniform dequantisation.

    L = ``num_levels`` or 2^``n_bits``. Dequantise y = (k + u)/L ∈ [0, 1)^D with u ~ U[0, 1)^D, map to the model
    space x = a·y + b with (b, a + b) = ``data_range``, and (formulas sheet §5.3; Theis et al. 2016)

        bpd = (−log p_x(x) − D·log(a/L)) / (D·ln 2),

    averaged over ``num_dequant`` draws of u. E_u[bpd] ≥ −log₂ P(k)/D for the discrete model
    P(k) = ∫_bin p_y (Jensen). For L = 256 the offset −log₂(a/L) is 7 for data in [−1, 1] and 8 for [0, 1]
    (score_sde's ``offset``). The log-density is the value of :func:`log_likelihood` (t = 0 noise, t = 1 data).

    Args:
        velocity, path: as in :func:`log_likelihood`.
        k: one example of integer levels (any shape; batch with ``jax.vmap``).
        key: PRNG key for the dequantisation noise (and the Hutchinson probes, a fresh one per draw).
        n_bits, num_levels: number of levels L (``num_levels`` wins, e.g. 17 for sklearn digits).
        data_range: (lo, hi) of the model space; x = lo + (hi − lo)·y.
        num_dequant: number of dequantisation draws averaged.
        dequant_noise: optional explicit u of shape (num_dequant, *k.shape) in [0, 1) (common random numbers
            across models); then ``key`` is only used for Hutchinson probes.
        **ll_kwargs: passed to :func:`log_likelihood` (trace, solver, rtol, atol, endpoint, …; not ``key``).
            With ``throw=False`` a failed solve makes the result NaN instead of raising.
    """
    r, levels, a, _ = _dequantised_log_likelihoods(
        velocity,
        path,
        k,
        key,
        n_bits,
        num_levels,
        data_range,
        num_dequant,
        dequant_noise,
        ll_kwargs,
    )
    k = jnp.asarray(k)
    logp = jnp.where(r.status == solve.SUCCESSFUL, r.log_prob, jnp.nan)
    nll_bits = -(logp + k.size * math.log(a / levels)) / (k.size * math.log(2.0))
    return jnp.mean(nll_bits)
