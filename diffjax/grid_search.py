"""Optimized inference grids for the fixed-step samplers: the N + 1 times of a sampler's grid, learned.

Time convention: **t = 0 is noise, t = 1 is data**; a grid increases from the noise end t0 to the data end t1,
x_t = α_t·x + σ_t·ε.

Every sampler of :mod:`diffjax.samplers` is a differentiable ``lax.scan`` over its grid, so its endpoint x_N(θ)
is a differentiable function of the grid's times. In the spirit of LD3 (Tong et al. 2024, "Learning to
Discretize Denoising Diffusion ODEs"), GITS (Chen et al. 2024) and "Align Your Steps" (Sabour et al. 2024),
:func:`optimize_grid` chooses the grid that carries a few *training* starting points closest to a teacher's
endpoints:

    θ* = argmin_θ  (1/B) Σ_b ‖x_N(θ; x0_b) − x_ref(x0_b)‖   (or its square, ``loss="squared"``),

with x_ref an adaptive, high-accuracy solve of the same probability-flow ODE from the same x0 (or the same
sampler on many steps). The grid is parameterized so that it is increasing with fixed ends by construction:

    Δ = softmax(θ) (N positive increments summing to 1),  t_0 = t0,  t_i = t0 + (t1 − t0)·Σ_{j<i} Δ_j,  t_N = t1,

and θ starts at log(diff(initial grid)), so zero optimizer steps return the initial grid (up to rounding).
Optimization is Adam (optax) with a cosine-decayed learning rate, one jitted ``lax.scan`` over the steps; the
result is a plain array for ``dj.sample(..., grid=ts)`` and generalizes to starting points it was not fitted on
(the benchmark measures it on held-out points).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .fields import integration_interval, velocity_field
from .grids import GRID_KINDS, time_grid
from .kinds import AbstractKind, as_kind
from .paths import AbstractPath
from .samplers import AbstractSampler, _check_grid_array, _Grid, _Prediction, as_sampler

__all__ = ["optimize_grid", "grid_from_logits", "grid_logits", "grid_loss"]

Scalar = Float[ArrayLike, ""]


def grid_from_logits(logits: Float[Array, " N"], t0: Scalar, t1: Scalar) -> Float[Array, " N+1"]:
    """The increasing grid t0 = t_0 < … < t_N = t1 (t = 0 noise, t = 1 data) whose increments are
    (t1 − t0)·softmax(``logits``): strictly increasing and with fixed ends for any finite logits."""
    inc = jax.nn.softmax(logits)
    ts = t0 + (t1 - t0) * jnp.concatenate([jnp.zeros((1,), inc.dtype), jnp.cumsum(inc)])
    return ts.at[0].set(t0).at[-1].set(t1)


def grid_logits(ts: Float[ArrayLike, " N+1"]) -> Float[Array, " N"]:
    """Logits θ with ``grid_from_logits(θ, ts[0], ts[-1]) == ts`` (up to rounding): θ = log(diff(ts))."""
    ts = jnp.asarray(ts)
    return jnp.log(jnp.diff(ts))


def grid_loss(
    sampler: AbstractSampler,
    model,
    kind: AbstractKind,
    path: AbstractPath,
    ts: Float[Array, " N+1"],
    x0s: Float[Array, " B *shape"],
    targets: Float[Array, " B *shape"],
    key: PRNGKeyArray,
    squared: bool = True,
) -> Float[Array, ""]:
    """Mean over the batch of ‖x_N − target‖² (``squared``) or ‖x_N − target‖ for ``sampler`` on the grid ``ts`` (t = 0 noise, t = 1 data).

    Pure and unchecked (library code, differentiable in ``ts``): callers validate the grid.
    """
    pred = _Prediction(model, kind, path)

    def one(x0, target):
        x, _, _ = sampler.run(pred, _Grid.on(path, ts.astype(x0.dtype)), x0, key, False)
        sq = jnp.sum((x - target) ** 2)
        return sq if squared else jnp.sqrt(sq + 1e-30)

    return jnp.mean(jax.vmap(one)(x0s, targets))


@eqx.filter_jit
def _teacher_ode(model, kind, path, x0s, t0, t1, tol, max_steps):
    from .sampling import sample_ode

    u = velocity_field(model, kind, path)
    key = jax.random.PRNGKey(0)

    def one(x0):
        return sample_ode(
            u,
            path,
            key,
            x0=x0,
            solver="dopri8",
            rtol=tol,
            atol=tol,
            max_steps=max_steps,
            t0=t0,
            t1=t1,
        ).samples

    return jax.vmap(one)(x0s)


@eqx.filter_jit
def _teacher_sampler(sampler, model, kind, path, x0s, ts, key):
    pred = _Prediction(model, kind, path)
    grid = _Grid.on(path, ts.astype(x0s.dtype))
    return jax.vmap(lambda x0: sampler.run(pred, grid, x0, key, False)[0])(x0s)


def _optimize(
    sampler, model, kind, path, ts_init, x0s, targets, key, steps, learning_rate, squared
):
    import optax

    t0, t1 = ts_init[0], ts_init[-1]
    theta0 = grid_logits(ts_init)
    schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=0.05)
    opt = optax.adam(schedule)

    def loss(theta):
        return grid_loss(
            sampler, model, kind, path, grid_from_logits(theta, t0, t1), x0s, targets, key, squared
        )

    def step(carry, _):
        theta, state = carry
        value, g = jax.value_and_grad(loss)(theta)
        g = jnp.where(jnp.isfinite(g), g, 0.0)
        upd, state = opt.update(g, state, theta)
        return (optax.apply_updates(theta, upd), state), value

    (theta, _), losses = jax.lax.scan(step, (theta0, opt.init(theta0)), None, length=steps)
    final = loss(theta)
    ts = grid_from_logits(theta, t0, t1)
    return ts, jnp.concatenate([losses, final[None]])


@eqx.filter_jit
def _optimize_all(
    sampler, model, kind, path, ts_inits, x0s, targets, key, steps, learning_rate, squared
):
    """_optimize from each initial grid (vmapped: one program), then the grid of the lowest final loss."""
    run = lambda ts: _optimize(  # noqa: E731
        sampler, model, kind, path, ts, x0s, targets, key, steps, learning_rate, squared
    )
    ts, losses = jax.vmap(run)(ts_inits)
    final = jnp.where(jnp.isfinite(losses[:, -1]), losses[:, -1], jnp.inf)
    best = jnp.argmin(final)
    return ts[best], losses[best]


def _initial_grid(path, num_steps, init, t0, t1):
    if isinstance(init, str):
        if init not in GRID_KINDS:
            raise ValueError(
                f"unknown init={init!r}; expected one of {GRID_KINDS} or an increasing array"
            )
        return time_grid(path, num_steps, init, t0=t0, t1=t1)
    ts = _check_grid_array(init)
    if ts.shape[0] != num_steps + 1:
        raise ValueError(
            f"init has {ts.shape[0]} times but num_steps={num_steps} needs num_steps + 1 = "
            f"{num_steps + 1}; pass a grid of that length or a grid kind {GRID_KINDS}"
        )
    return ts


def optimize_grid(
    sampler: str | AbstractSampler,
    model,
    kind: str | AbstractKind,
    path: AbstractPath,
    num_steps: int,
    x0_train: Float[ArrayLike, " B *shape"],
    *,
    teacher: None | int | Float[ArrayLike, " B *shape"] = None,
    init: str | Float[ArrayLike, " N+1"] | tuple = ("log_snr", "uniform"),
    t0: Scalar | None = None,
    t1: Scalar | None = None,
    steps: int = 400,
    learning_rate: float = 0.05,
    loss: str = "norm",
    teacher_tol: float | None = None,
    key: PRNGKeyArray | None = None,
    return_losses: bool = False,
) -> Float[Array, " N+1"] | tuple[Float[Array, " N+1"], Float[Array, " steps+1"]]:
    """An inference grid of ``num_steps`` steps for ``sampler``, optimized so that its endpoints match a
    teacher's on the training starting points ``x0_train`` (LD3, Tong et al. 2024; see the module docstring).

    t = 0 is noise, t = 1 is data: the grid increases from t0 (noise, where ``x0_train`` lives) to t1 (data); both
    ends stay fixed. Use the result as ``dj.sample(sampler, model, kind, path, key, grid=ts)``.

    Args:
        sampler: a name in ``diffjax.samplers.SAMPLERS`` or an ``AbstractSampler`` instance (e.g.
            ``DPMSolverPP3M(lower_order_final=False)``).
        model, kind, path: the model ``model(t, x)`` predicting ``kind`` on ``path`` (a PyTree, e.g.
            ``GaussianMixture.model(kind, path)`` or ``eqx.Partial(apply, params)``).
        num_steps: N, the grid's number of steps (N + 1 times); at least the sampler's ``min_steps``.
        x0_train: (B, *shape) starting points at t0, e.g. draws of ``path.prior`` with a key of their own; the
            grid generalizes to other points of the same distribution, so measure it on held-out ones.
        teacher: the reference endpoints. ``None``: an adaptive Dopri8 solve of the model's PF-ODE velocity from
            each x0 over [t0, t1] at rtol = atol = ``teacher_tol`` (default 1e-10 in float64, 1e-6 in float32).
            An int M: the same sampler on the M-step ``init`` grid. An array of shape (B, *shape): the endpoints.
        init: the starting grid, a grid kind of ``diffjax.time_grid`` or an increasing array of N + 1 times, or
            a tuple of them (multi-start: each is optimized, all in one vmapped program, and the grid of the
            lowest final training loss is returned; the landscape has local minima, so several starts help).
        t0, t1: the interval, by default ``diffjax.integration_interval(path, kind)`` (ignored when ``init`` is
            an array: its ends are the interval).
        steps: Adam steps (0 returns the initial grid); ``learning_rate``: Adam's peak rate on the logits, cosine
            decayed to 5 % of it.
        loss: ``"norm"`` (default), the mean Euclidean distance (1/B) Σ ‖x_N − x_ref‖ (the benchmark's error), or
            ``"squared"``, the mean squared distance, which weighs the worst points more.
        key: the sampler's key (EDM Heun's churn noise); default ``jax.random.PRNGKey(0)``.
        return_losses: also return the training loss (``loss``) before each step and after the last
            (``steps`` + 1 values).

    Returns the grid, a (N + 1,) array of times increasing from t0 to t1 (and the losses).

    Raises:
        ValueError: an unknown sampler or init grid kind, num_steps not an int >= the sampler's ``min_steps``,
            ``x0_train`` without a batch axis, a teacher array of another shape, steps < 0, learning_rate <= 0,
            an ``init`` array that is not increasing inside [0, 1] or not of length num_steps + 1.
    """
    sampler = as_sampler(sampler)
    kind = as_kind(kind)
    if not isinstance(path, AbstractPath):
        raise ValueError(f"path must be a diffjax path, got {type(path).__name__}")
    if not callable(model):
        raise ValueError(f"model must be a callable model(t, x), got {type(model).__name__}")
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, int)
        or num_steps < sampler.min_steps
    ):
        raise ValueError(
            f"num_steps must be a Python int >= {sampler.min_steps} for {type(sampler).__name__} "
            f"(a k-step method needs k steps), got num_steps={num_steps!r}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a Python int >= 0 (optimizer steps), got steps={steps!r}")
    if not float(learning_rate) > 0:
        raise ValueError(f"learning_rate must be > 0, got learning_rate={learning_rate!r}")
    if loss not in ("norm", "squared"):
        raise ValueError(f"loss must be 'norm' or 'squared', got loss={loss!r}")
    dtype = jnp.result_type(float)
    x0s = jnp.asarray(x0_train)
    if not jnp.issubdtype(x0s.dtype, jnp.floating):
        x0s = x0s.astype(dtype)
    if x0s.ndim < 2 or x0s.shape[0] < 1:
        raise ValueError(
            f"x0_train must be a batch (B, *shape) of starting points with B >= 1, got shape {x0s.shape}; "
            "add a leading axis for one point (x0[None])"
        )
    key = jax.random.PRNGKey(0) if key is None else key
    inits = tuple(init) if isinstance(init, (tuple, list)) else (init,)
    if not inits:
        raise ValueError(
            f"init must be a grid kind, an array or a non-empty tuple of them, got {init!r}"
        )
    if any(isinstance(i, str) for i in inits) and (t0 is None or t1 is None):
        d0, d1 = integration_interval(path, kind)
        t0 = d0 if t0 is None else t0
        t1 = d1 if t1 is None else t1
    grids = [_initial_grid(path, num_steps, i, t0, t1) for i in inits]
    concrete = not any(isinstance(g, jax.core.Tracer) for g in grids)
    ends = {(float(g[0]), float(g[-1])) for g in grids} if concrete else set()
    if len(ends) > 1:
        raise ValueError(f"the init grids must share their ends (t0, t1), got {sorted(ends)}")
    ts_init = jnp.stack([jnp.asarray(g, x0s.dtype) for g in grids])
    if teacher is None:
        tol = (
            teacher_tol
            if teacher_tol is not None
            else (1e-10 if x0s.dtype == jnp.float64 else 1e-6)
        )
        targets = _teacher_ode(model, kind, path, x0s, ts_init[0, 0], ts_init[0, -1], tol, 65536)
    elif isinstance(teacher, int) and not isinstance(teacher, bool):
        if teacher < max(num_steps, sampler.min_steps):
            raise ValueError(
                f"teacher={teacher} steps must be at least num_steps={num_steps} (use many more, e.g. 1000)"
            )
        ts_ref = time_grid(path, teacher, "log_snr", t0=ts_init[0, 0], t1=ts_init[0, -1])
        targets = _teacher_sampler(sampler, model, kind, path, x0s, ts_ref, key)
    else:
        targets = jnp.asarray(teacher, x0s.dtype)
        if targets.shape != x0s.shape:
            raise ValueError(
                f"teacher endpoints must have the shape of x0_train {x0s.shape}, got {targets.shape}"
            )
    if not isinstance(targets, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(targets))):
        raise ValueError(
            "the teacher's endpoints hold NaN/inf: check the model, x0_train and t0/t1"
        )
    ts, losses = _optimize_all(
        sampler,
        model,
        kind,
        path,
        ts_init,
        x0s,
        targets,
        key,
        steps,
        jnp.asarray(learning_rate, x0s.dtype),
        loss == "squared",
    )
    return (ts, losses) if return_losses else ts
