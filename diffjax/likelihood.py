"""Exact log-likelihoods of flow / probability-flow ODE models, and bits per dimension.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε.

Instantaneous change of variables (Chen et al. 2018; FFJORD, Grathwohl et al. 2019; score_sde, Song et al. 2021).
Along dX/dt = u_t(X), d/dt log p_t(X_t) = −∇·u_t(X_t), hence (formulas sheet §5.1)

    log p_{t1}(x) = log p_{t0}(X_{t0}) − ∫_{t0}^{t1} ∇·u_t(X_t) dt.

For one data point x we integrate the augmented ODE

    d/dt [X, ℓ] = [u_t(X), ∇·u_t(X)],   X(t1) = x,  ℓ(t1) = 0,

**backwards** from t1 = 1 − t_eps (data end) to t0 (noise end, ``path.t_min``) with diffrax, so that
ℓ(t0) = ∫_{t1}^{t0} ∇·u dt = −∫_{t0}^{t1} ∇·u dt and

    log p_{t1}(x) = prior_log_prob(X(t0)) + ℓ(t0).

This is Meta ``flow_matching``'s ``ODESolver.compute_likelihood`` (time grid 1 → 0) and, with s = 1 − t, score_sde's
``likelihood.py``. The trace ∇·u is exact (D forward-mode JVPs per evaluation, :func:`diffjax.fields.divergence_exact`)
or the Hutchinson–Skilling estimate vᵀ(∂u/∂x)v with probes drawn once from ``key`` and **held fixed for the whole
solve** (the trajectory does not depend on v, so the log-likelihood estimate is unbiased; its exponential is not).

Endpoints. Paths that are singular at the data end (``path.t_eps`` > 0, e.g. :class:`~diffjax.VPPath`) stop at
t1 = 1 − t_eps, and paths with σ_1 > 0 (VE, EDM) never reach clean data: the value computed is log p_{t1}(x), the
density of the data perturbed as x_{t1} = α x + σ ε. The result always reports the size of that perturbation
r = σ_{t1}/α_{t1} and the scale term log α_{t1} per dimension; ``endpoint="gaussian"`` applies the correction

    log p_data(x) ≈ log p_{t1}(α_{t1} x) + D·log α_{t1}

(evaluate the ODE at α x and add the Jacobian of x ↦ αx). Exactly: log p_{t1}(αx) + D log α = log (p_data ∗ N(0, r² I))(x),
the data density smoothed by a Gaussian of standard deviation r, so the remaining error is the smoothing,
≈ (r²/2)·Δp/p = O(r²) per dimension (for VP with t_eps = 1e-5, r ≈ 1e-3 and log α ≈ −5e-7). This residual depends
on the data and is not estimated. The prior mismatch at the noise end (α_{t0} ≠ 0 for VP, the N(0, σ_max² I) prior
of VE/EDM) is another model error that the result does not hide: pass ``prior_log_prob`` to change the prior.

Both public functions are wrapped in ``equinox.filter_jit``: arrays (x, keys, PyTree leaves of the velocity or
path) are traced, everything else (callables, strings, Python numbers such as rtol or t0) is static, so define the
velocity once and reuse it — a fresh ``lambda`` per call recompiles. Inside an outer ``jax.jit`` they inline.

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
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .fields import divergence_exact, divergence_hutchinson, make_probes
from .paths import AbstractPath, check_time, trusted_time

__all__ = ["LikelihoodResult", "log_likelihood", "log_likelihood_with_stats", "bits_per_dim"]

TRACES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
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
        endpoint_correction: the term added at the data end: D·log α_{t1} for ``endpoint="gaussian"``, else 0.
        endpoint_sigma_ratio: r = σ_{t1}/α_{t1}, the standard deviation of the Gaussian perturbation of the data
            that log p_{t1} describes (0 for paths that reach clean data at t1 = 1). Always reported.
        endpoint_log_alpha: log α_{t1}, the per-dimension correction estimate (nats/dim). Always reported.
        num_steps: solver steps taken (accepted + rejected).
        num_accepted_steps, num_rejected_steps: from diffrax's statistics.
        nfe: evaluations of the augmented field [u, ∇·u] made by the solver (each one is one linearisation of u
            plus D JVPs for the exact trace, or ``num_probes`` JVPs for Hutchinson). Exact for explicit
            Runge–Kutta solvers ((stages − FSAL)·num_steps + FSAL, checked by counting); −1 where the count is
            not known. One further evaluation at (t1, x) checks that the field is finite there.
        t0, t1: the integration interval (noise end, data end).
        dtype: the floating-point precision of the computation, ``"float32"`` or ``"float64"``.
    """

    log_prob: Float[Array, ""]
    prior_log_prob: Float[Array, ""]
    x0: Float[Array, "*shape"]
    delta_log_prob: Float[Array, ""]
    endpoint_correction: Float[Array, ""]
    endpoint_sigma_ratio: Float[Array, ""]
    endpoint_log_alpha: Float[Array, ""]
    num_steps: Int[Array, ""]
    num_accepted_steps: Int[Array, ""]
    num_rejected_steps: Int[Array, ""]
    nfe: Int[Array, ""]
    t0: Float[Array, ""]
    t1: Float[Array, ""]
    dtype: str = eqx.field(static=True)


def _augmented_field(closed, chunk_size):
    """d/dt [X, ℓ] = [u_t(X), ∇·u_t(X)], called as ``field(t, y, (velocity, data))``.

    ``data`` = (probes, t_lo, t_hi) travels either as diffrax ``args`` (``closed=None``; needed by
    ``BacksolveAdjoint``, which differentiates w.r.t. ``args`` and refuses closed-over tracers) or is closed over
    (``closed=data``; about 1.5x faster for vmapped Hutchinson solves on CPU than carrying the probes as
    ``args``). The velocity is always in ``args`` so that ``BacksolveAdjoint`` sees its PyTree leaves.
    """

    def field(t, y, args):
        velocity, data = args
        probes, t_lo, t_hi = closed if closed is not None else data
        z, _ = y
        # Keep every evaluation inside [t0, t1]: stages never leave the interval, but an initial step-size guess
        # may, and paths/oracles check t ∈ [0, 1].
        t = jnp.clip(t, t_lo, t_hi)
        f = lambda v: velocity(t, v)
        if probes is None:
            u, div = divergence_exact(f, z, chunk_size=chunk_size)
        elif probes.shape[0] == 1:
            # One probe: a plain JVP (a vmap over a batch of one lowers to slower batched kernels on CPU).
            v = probes[0]
            u, jv = jax.jvp(f, (z,), (v,))
            div = jnp.sum(v * jv)
        else:
            u, div = divergence_hutchinson(f, z, probes)
        return u.astype(z.dtype), div.astype(z.dtype)

    return field


def _nfe(solver, num_steps):
    tab = getattr(solver, "tableau", None)
    if isinstance(solver, diffrax.Euler):
        return num_steps
    if tab is not None and hasattr(tab, "num_stages") and hasattr(tab, "fsal"):
        fsal = int(bool(tab.fsal))
        return (tab.num_stages - fsal) * num_steps + fsal
    return jnp.full_like(num_steps, -1)


def _is_concrete(v) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(v))


@eqx.filter_jit
def log_likelihood_with_stats(
    velocity: Field,
    path: AbstractPath,
    x: Float[ArrayLike, "*shape"],
    *,
    key: PRNGKeyArray | None = None,
    trace: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    solver: diffrax.AbstractSolver | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    max_steps: int = 4096,
    t_eps: float | None = None,
    t0: float | None = None,
    prior_log_prob: Callable[[Float[Array, "*shape"]], Float[Array, ""]] | None = None,
    endpoint: str = "none",
    adjoint: diffrax.AbstractAdjoint | None = None,
    num_steps: int | None = None,
    chunk_size: int | None = None,
) -> LikelihoodResult:
    """log p(x) of ONE example under the flow dX/dt = u_t(X), with solver statistics (t = 0 noise, t = 1 data).

    Integrates d/dt [X, ℓ] = [u_t(X), ∇·u_t(X)] from t1 = 1 − t_eps (X = x, ℓ = 0) down to t0 and returns
    log p = prior_log_prob(X(t0)) + ℓ(t0) (+ the endpoint correction), i.e.
    log p_{t1}(x) = log p_{t0}(X_{t0}) − ∫_{t0}^{t1} ∇·u dt (formulas sheet §5.1).

    Args:
        velocity: per-example velocity u(t, x) -> same shape as x (e.g. ``diffjax.fields.velocity_field`` of a
            model of any prediction kind). It may close over parameters; ``jax.grad`` flows through the solve.
        path: the Gaussian path; supplies t_eps, t_min, the prior at t = 0 and (α, σ) at t1 for the endpoint.
        x: one example of any shape (use ``jax.vmap`` for batches).
        key: PRNG key for the Hutchinson probes (required for ``trace="hutchinson"``; drawn once, fixed in time).
        trace: ``"exact"`` (D forward-mode JVPs per evaluation, no cross-example blocks) or ``"hutchinson"``.
        num_probes: Hutchinson probes averaged per evaluation (variance ∝ 1/num_probes).
        probe: ``"rademacher"`` (lower variance) or ``"gaussian"``.
        solver: a diffrax solver (default ``diffrax.Tsit5()``).
        rtol, atol: tolerances of ``diffrax.PIDController`` (ignored with ``num_steps``).
        max_steps: step budget of the adaptive solve; reaching it raises an error that says so.
        t_eps: the data end is t1 = 1 − t_eps (default ``path.t_eps``).
        t0: the noise end (default ``path.t_min``); must be < t1.
        prior_log_prob: log-density of X(t0) for one example (default ``path.prior.log_prob``).
        endpoint: ``"none"`` (return log p_{t1}(x)) or ``"gaussian"`` (start at α_{t1}·x and add D·log α_{t1};
            see the module docstring). Either way the result reports σ_{t1}/α_{t1} and log α_{t1}.
        adjoint: a diffrax adjoint (default ``diffrax.RecursiveCheckpointAdjoint()``; ``BacksolveAdjoint`` needs
            the parameters as PyTree leaves of ``velocity``).
        num_steps: if given, a fixed grid of ``num_steps`` equal steps (``diffrax.StepTo``) instead of the
            adaptive controller.
        chunk_size: bounds how many JVPs of the exact trace run at once (memory vs speed for large D).

    Returns:
        A :class:`LikelihoodResult`; ``.log_prob`` is log p(x) in nats and ``.dtype`` names the precision.

    Raises:
        ValueError: bad ``trace``/``probe``/``endpoint``/``num_probes``/``num_steps``/interval, or a Hutchinson
            trace without ``key``.
        EquinoxRuntimeError (also under jit): the solver hit ``max_steps`` or failed otherwise, or the
            log-likelihood or X(t0) is non-finite.
    """
    if trace not in TRACES:
        raise ValueError(f"unknown trace={trace!r}; expected one of {TRACES}")
    if probe not in PROBES:
        raise ValueError(f"unknown probe={probe!r}; expected one of {PROBES}")
    if endpoint not in ENDPOINTS:
        raise ValueError(f"unknown endpoint={endpoint!r}; expected one of {ENDPOINTS}")
    if trace == "hutchinson" and key is None:
        raise ValueError(
            "trace='hutchinson' needs a PRNG key for its probes: pass key=jax.random.key(...) "
            "(or use trace='exact')"
        )
    if int(num_probes) < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if num_steps is not None and int(num_steps) < 1:
        raise ValueError(
            f"num_steps must be a positive integer (fixed grid) or None, got {num_steps}"
        )
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")

    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    dtype = x.dtype
    t_eps = path.t_eps if t_eps is None else t_eps
    t_lo = path.t_min if t0 is None else t0
    t_hi = 1.0 - t_eps
    if _is_concrete((t_lo, t_hi)):
        lo, hi = float(t_lo), float(t_hi)
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError(
                f"need 0 <= t0 < t1 = 1 - t_eps <= 1 (t=0 noise, t=1 data); got t0={lo}, t1={hi} "
                f"(t_eps={t_eps})"
            )
    if not _is_concrete(
        (t_lo, t_hi)
    ):  # traced ends: checked at run time (the solver's own times are trusted)
        t_lo, t_hi = check_time(t_lo), check_time(t_hi)
    t_lo = jnp.asarray(t_lo, dtype)
    t_hi = jnp.asarray(t_hi, dtype)
    if prior_log_prob is None:
        prior_log_prob = path.prior.log_prob
    solver = diffrax.Tsit5() if solver is None else solver
    adjoint = diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint

    # Endpoint: log p_{t1} describes data perturbed as α x + σ ε.
    a1, s1, _, _ = path.coefficients(t_hi)
    a1 = jnp.asarray(a1, dtype)
    s1 = jnp.asarray(s1, dtype)
    log_a1 = jnp.log(a1)
    sigma_ratio = s1 / a1
    if endpoint == "gaussian":
        x_start = a1 * x
        correction = x.size * log_a1
    else:
        x_start = x
        correction = jnp.zeros((), dtype)

    probes = None
    if trace == "hutchinson":
        probes = make_probes(key, x.shape, int(num_probes), probe, dtype)
    data = (probes, t_lo, t_hi)
    if isinstance(adjoint, diffrax.BacksolveAdjoint):
        field, args = _augmented_field(None, chunk_size), (velocity, data)
    else:
        field, args = _augmented_field(data, chunk_size), (velocity, None)

    if num_steps is None:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
        steps_budget = int(max_steps)
    else:
        controller = diffrax.StepTo(ts=jnp.linspace(t_hi, t_lo, int(num_steps) + 1))
        steps_budget = int(num_steps)

    y_start = (x_start, jnp.zeros((), dtype))
    # One evaluation at the data end, where singular fields usually break: a NaN/inf there would otherwise make
    # the adaptive controller reject every step and surface only as max_steps.
    u_start, div_start = field(t_hi, y_start, args)
    x_start = eqx.error_if(
        x_start,
        jnp.logical_not(jnp.all(jnp.isfinite(u_start)) & jnp.isfinite(div_start)),
        "diffjax.log_likelihood: non-finite log-likelihood (NaN/inf) — the velocity field produced "
        "NaN/inf (or a non-finite divergence) at the data end t1 = 1 - t_eps for this x; paths singular "
        "at t = 1 (e.g. VPPath, or data-prediction models, whose conversion divides by sigma) need "
        "t_eps > 0: t_eps = 1 - diffjax.integration_interval(path, kind)[1]",
    )
    y_start = (x_start, y_start[1])

    with (
        trusted_time()
    ):  # solver times lie in [t0, t1], checked above; a NaN time fails the solve instead
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            solver,
            t0=t_hi,
            t1=t_lo,
            dt0=None,
            y0=y_start,
            args=args,
            stepsize_controller=controller,
            saveat=diffrax.SaveAt(t1=True),
            max_steps=steps_budget,
            adjoint=adjoint,
            throw=False,
        )
    x0 = sol.ys[0][0]
    delta = sol.ys[1][0]
    prior = jnp.asarray(prior_log_prob(x0), dtype)
    log_prob = prior + delta + correction

    hit_max = sol.result == diffrax.RESULTS.max_steps_reached
    other_failure = jnp.logical_and(
        sol.result != diffrax.RESULTS.successful, jnp.logical_not(hit_max)
    )
    log_prob = eqx.error_if(
        log_prob,
        hit_max,
        f"diffjax.log_likelihood: the ODE solver reached max_steps={steps_budget} before getting from "
        "the data end t1 to the noise end t0. Fix: raise max_steps, loosen rtol/atol, or pass num_steps "
        "for a fixed grid. (A velocity field that returns NaN/inf also exhausts max_steps, because the "
        "adaptive controller rejects every non-finite step.)",
    )
    log_prob = eqx.error_if(
        log_prob,
        other_failure,
        "diffjax.log_likelihood: the ODE solve failed (diffrax returned an unsuccessful result other than "
        "max_steps, e.g. a step size that underflowed); check the velocity field for singularities on "
        "[t0, t1] and try a larger t_eps",
    )
    bad = jnp.logical_not(jnp.isfinite(log_prob) & jnp.all(jnp.isfinite(x0)))
    log_prob = eqx.error_if(
        log_prob,
        bad,
        "diffjax.log_likelihood: non-finite log-likelihood (NaN/inf) — the velocity field produced "
        "non-finite values or its divergence/trajectory blew up on [t0, t1] (or prior_log_prob is "
        "non-finite at X(t0)); check the field near the data end t1 and consider a larger t_eps",
    )

    n = jnp.asarray(sol.stats["num_steps"])
    return LikelihoodResult(
        log_prob=log_prob,
        prior_log_prob=prior,
        x0=x0,
        delta_log_prob=delta,
        endpoint_correction=jnp.asarray(correction, dtype),
        endpoint_sigma_ratio=sigma_ratio,
        endpoint_log_alpha=log_a1,
        num_steps=n,
        num_accepted_steps=jnp.asarray(sol.stats["num_accepted_steps"]),
        num_rejected_steps=jnp.asarray(sol.stats["num_rejected_steps"]),
        nfe=jnp.asarray(_nfe(solver, n)),
        t0=t_lo,
        t1=t_hi,
        dtype=str(jnp.dtype(dtype)),
    )


def log_likelihood(velocity: Field, path: AbstractPath, x: Float[ArrayLike, "*shape"], **kwargs):
    """log p(x) in nats for ONE example x under the flow of ``velocity`` on ``path`` (t = 0 noise, t = 1 data).

    log p_{t1}(x) = log p_{t0}(X_{t0}) − ∫_{t0}^{t1} ∇·u_t(X_t) dt, solved backwards from the data end
    t1 = 1 − t_eps to the noise end t0 with diffrax. Same keyword arguments as
    :func:`log_likelihood_with_stats` (key, trace, num_probes, probe, solver, rtol, atol, max_steps, t_eps, t0,
    prior_log_prob, endpoint, adjoint, num_steps, chunk_size), which also returns the prior term, the integral,
    the endpoint perturbation σ_{t1}/α_{t1}, step counts, NFE and the precision. Batch with ``jax.vmap``.
    """
    return log_likelihood_with_stats(velocity, path, x, **kwargs).log_prob


@eqx.filter_jit
def bits_per_dim(
    velocity: Field,
    path: AbstractPath,
    k: Int[ArrayLike, "*shape"],
    *,
    key: PRNGKeyArray | None = None,
    n_bits: int = 8,
    n_levels: int | None = None,
    data_range: Sequence[float] = (-1.0, 1.0),
    num_dequant: int = 1,
    dequant_noise: Float[ArrayLike, " n *shape"] | None = None,
    **ll_kwargs,
) -> Float[Array, ""]:
    """Bits per dimension of ONE integer-valued example k ∈ {0, …, L−1}^D with uniform dequantisation.

    L = ``n_levels`` or 2^``n_bits``. Dequantise y = (k + u)/L ∈ [0, 1)^D with u ~ U[0, 1)^D, map to the model
    space x = a·y + b with (b, a + b) = ``data_range``, and (formulas sheet §5.3; Theis et al. 2016)

        bpd = (−log p_x(x) − D·log(a/L)) / (D·ln 2),

    averaged over ``num_dequant`` draws of u. E_u[bpd] ≥ −log₂ P(k)/D for the discrete model
    P(k) = ∫_bin p_y (Jensen). For L = 256 the offset −log₂(a/L) is 7 for data in [−1, 1] and 8 for [0, 1]
    (score_sde's ``offset``). The log-density is the value of :func:`log_likelihood` (t = 0 noise, t = 1 data).

    Args:
        velocity, path: as in :func:`log_likelihood`.
        k: one example of integer levels (any shape; batch with ``jax.vmap``).
        key: PRNG key for the dequantisation noise (and the Hutchinson probes, a fresh one per draw).
        n_bits, n_levels: number of levels L (``n_levels`` wins, e.g. 17 for sklearn digits).
        data_range: (lo, hi) of the model space; x = lo + (hi − lo)·y.
        num_dequant: number of dequantisation draws averaged.
        dequant_noise: optional explicit u of shape (num_dequant, *k.shape) in [0, 1) (common random numbers
            across models); then ``key`` is only used for Hutchinson probes.
        **ll_kwargs: passed to :func:`log_likelihood` (trace, solver, rtol, atol, endpoint, …; not ``key``).
    """
    if "key" in ll_kwargs:
        raise ValueError(
            "pass key once, to bits_per_dim (it is split for dequantisation and probes)"
        )
    levels = int(n_levels) if n_levels is not None else 2 ** int(n_bits)
    if levels < 2:
        raise ValueError(f"need at least 2 levels, got n_levels={n_levels}, n_bits={n_bits}")
    lo, hi = (float(v) for v in data_range)
    if not hi > lo:
        raise ValueError(f"data_range must be (lo, hi) with hi > lo, got {data_range}")
    num_dequant = int(num_dequant)
    if num_dequant < 1:
        raise ValueError(f"num_dequant must be >= 1, got {num_dequant}")
    k = jnp.asarray(k)
    dtype = jnp.result_type(float)
    kf = k.astype(dtype)
    if dequant_noise is None:
        if key is None:
            raise ValueError(
                "bits_per_dim needs key= for the dequantisation noise (or dequant_noise=)"
            )
        key_u, key_ll = jax.random.split(key)
        u = jax.random.uniform(key_u, (num_dequant, *k.shape), dtype)
    else:
        u = jnp.asarray(dequant_noise, dtype)
        if u.shape != (num_dequant, *k.shape):
            raise ValueError(
                f"dequant_noise must have shape (num_dequant, *k.shape) = {(num_dequant, *k.shape)}, "
                f"got {u.shape}"
            )
        key_ll = key
    if ll_kwargs.get("trace", "exact") == "hutchinson":
        if key_ll is None:
            raise ValueError("trace='hutchinson' needs key= for its probes")
        keys = jax.random.split(key_ll, num_dequant)
    else:
        keys = None
    a = hi - lo
    d = k.size

    def one(ui, ki):
        x = lo + a * (kf + ui) / levels
        return log_likelihood(velocity, path, x, key=ki, **ll_kwargs)

    logp = jax.vmap(one)(u, keys) if keys is not None else jax.vmap(lambda ui: one(ui, None))(u)
    nll_bits = -(logp + d * math.log(a / levels)) / (d * math.log(2.0))
    return jnp.mean(nll_bits)
