"""One solve wrapper for every ODE that diffjax integrates: the interval, the solver, the NFE, the diagnosis.

Time convention: **t = 0 is noise, t = 1 is data**. Every interval is written (t0, t1) with t0 < t1, t0 at the
noise end and t1 at the data end, whichever way it is integrated: samplers go t0 → t1, likelihoods t1 → t0.

:func:`diffeqsolve` wraps ``diffrax.diffeqsolve`` with ``throw=False`` and turns its result, together with two
plain evaluations of the field at the ends of the interval, into one status code (an int32):

===  ===================  ==========================================================================
0    ``SUCCESSFUL``
1    ``NONFINITE_END``     the field is NaN/inf at t0 or t1 (an adaptive controller then rejects every step
                           and would otherwise report only ``max_steps``)
2    ``MAX_STEPS``         the step budget ran out before the end of the interval, with a finite field
3    ``SOLVER_FAILED``     another diffrax failure (e.g. the step size underflowed)
4    ``NONFINITE``         the solve finished but its result is NaN/inf
5    ``NONFINITE_INPUT``   the caller's input (the data point x of a likelihood, a sampler's x0) is NaN/inf;
                           the solve then runs on zeros instead, so that one bad row of a vmapped batch does
                           not keep the whole batch stepping until ``max_steps``
6    ``NONFINITE_FIELD``   the field is NaN/inf *inside* the interval: a step from the time where the solve
                           stopped (``t_fail``) gave a NaN/inf state or error estimate and the solve never got
                           past it (adaptive: it shrinks the step until ``max_steps``; fixed steps: the NaN
                           reaches the result)
===  ===================  ==========================================================================

How ``NONFINITE_FIELD`` is found without extra field evaluations: the step-size controller is wrapped
(:class:`WatchedController`) so that its state records, for every attempted step [a, b] that started from a
finite state, whether the candidate state and its error estimate were finite, and the time the solve has reached.
diffrax returns that state with ``SaveAt(controller_state=True)``. A solve that failed (or, with fixed steps,
whose result is NaN/inf) after a non-finite attempt that reached beyond the time where it stopped is reported as
``NONFINITE_FIELD`` at that time. (Evaluating the field once more at the last accepted (t, y) does not work: an
adaptive solver creeps up to the edge of the NaN region, where the field is still finite — it was evaluated
there as the last accepted stage.) The extra work is one ``isfinite`` reduction over the state per step.

``t_fail`` (returned by :func:`diffeqsolve` and carried by the results as ``t_fail``) is in the library's time
(t = 0 noise, t = 1 data) whichever way the solve runs; messages may contain ``{t}``, filled with it: to two
decimals by :func:`throw_if_failed` (the message is static, so it is one of 101 variants), in full by
:func:`raise_if_failed` when it is given the result (or ``t_fail=``).

A public entry point raises for a nonzero status with one ``equinox.error_if`` per call (``throw=True``, the
default; the message names the fix), or returns the code in its result (``throw=False``) for callers that check it
on the host with :func:`raise_if_failed` — such programs contain no host callback and can be stored in JAX's
persistent compilation cache (the command line does this).
"""

from __future__ import annotations

import math

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from .paths import AbstractPath, check_time

__all__ = [
    "SUCCESSFUL",
    "NONFINITE_END",
    "MAX_STEPS",
    "SOLVER_FAILED",
    "NONFINITE",
    "NONFINITE_INPUT",
    "NONFINITE_FIELD",
    "CODE_NAMES",
    "SolveError",
    "WatchedController",
    "interval",
    "resolve_solver",
    "nfe",
    "diffeqsolve",
    "throw_if_failed",
    "raise_if_failed",
]

SUCCESSFUL, NONFINITE_END, MAX_STEPS, SOLVER_FAILED, NONFINITE, NONFINITE_INPUT, NONFINITE_FIELD = (
    range(7)
)
#: Short names of the codes, used by :func:`raise_if_failed` to summarise a batch with several kinds of failure.
CODE_NAMES = {
    SUCCESSFUL: "successful",
    NONFINITE_END: "nonfinite_end",
    MAX_STEPS: "max_steps",
    SOLVER_FAILED: "solver_failed",
    NONFINITE: "nonfinite",
    NONFINITE_INPUT: "nonfinite_input",
    NONFINITE_FIELD: "nonfinite_field",
}

FIXED_SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
}
ADAPTIVE_SOLVERS = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "bosh3": diffrax.Bosh3,
}


class SolveError(RuntimeError):
    """A solve that did not succeed, raised on the host by :func:`raise_if_failed`."""


def _is_concrete(v) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(v))


def interval(path: AbstractPath, t0=None, t1=None, dtype=None) -> tuple[Array, Array]:
    """(t0, t1) as arrays: the path's [t_min, t_max] by default (t = 0 noise, t = 1 data), validated once.

    Concrete ends must satisfy 0 ≤ t0 < t1 ≤ 1 (``ValueError``); traced ends get one runtime check each.
    """
    t0 = path.t_min if t0 is None else t0
    t1 = path.t_max if t1 is None else t1
    dtype = jnp.result_type(float) if dtype is None else dtype
    if _is_concrete((t0, t1)):
        a, b = float(t0), float(t1)
        if not (0.0 <= a < b <= 1.0):
            raise ValueError(
                f"need 0 <= t0 < t1 <= 1 (t = 0 noise, t = 1 data; t0 is the noise end), got t0={a}, t1={b}"
            )
        return jnp.asarray(a, dtype), jnp.asarray(b, dtype)
    return check_time(t0, name="t0").astype(dtype), check_time(t1, name="t1").astype(dtype)


def resolve_solver(solver, num_steps: int | None) -> diffrax.AbstractSolver:
    """A diffrax solver from a name or an instance; default Tsit5 (adaptive) or Heun (with ``num_steps``)."""
    if solver is None:
        return diffrax.Heun() if num_steps is not None else diffrax.Tsit5()
    if isinstance(solver, diffrax.AbstractSolver):
        return solver
    if isinstance(solver, str):
        name = solver.lower()
        if name in FIXED_SOLVERS:
            if num_steps is None:
                raise ValueError(
                    f"solver={solver!r} is a fixed-step solver: pass num_steps=N (and optionally grid=...), or "
                    f"use an adaptive solver ({tuple(ADAPTIVE_SOLVERS)})"
                )
            return FIXED_SOLVERS[name]()
        if name in ADAPTIVE_SOLVERS:
            return ADAPTIVE_SOLVERS[name]()
    raise ValueError(
        f"unknown solver={solver!r}; expected one of {tuple(FIXED_SOLVERS) + tuple(ADAPTIVE_SOLVERS)} or a "
        "diffrax.AbstractSolver instance"
    )


def check_steps(num_steps, max_steps) -> None:
    """Python checks of the step arguments shared by every solve."""
    if isinstance(num_steps, bool) or (num_steps is not None and not isinstance(num_steps, int)):
        raise ValueError(
            f"num_steps must be None (adaptive) or a Python int >= 1, got {num_steps!r}"
        )
    if num_steps is not None and num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"max_steps must be a Python int >= 1, got {max_steps!r}")


def nfe(solver: diffrax.AbstractSolver, num_steps) -> Int[Array, ""]:
    """Field evaluations of ``num_steps`` steps (accepted + rejected) of an explicit Runge–Kutta solver:
    (stages − FSAL)·steps + FSAL; Euler one per step; −1 where the count is not known."""
    num_steps = jnp.asarray(num_steps)
    if isinstance(solver, diffrax.Euler):
        return num_steps
    tab = getattr(solver, "tableau", None)
    if isinstance(solver, diffrax.AbstractERK) and tab is not None:
        fsal = int(bool(tab.fsal))
        return (tab.num_stages - fsal) * num_steps + fsal
    return jnp.full_like(num_steps, -1)


def _tree_finite(tree) -> Bool[Array, ""]:
    leaves = jax.tree_util.tree_leaves(tree)
    ok = jnp.asarray(True)
    for leaf in leaves:
        ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


def _watch_init(watch, terms, t0, t1, y0, dt0, args, func, error_order):
    """The wrapped controller's first step and state, plus (time reached, a, b) = (t0, NaN, NaN); times are
    stored times direction (so that "reached" grows either way), t = 0 noise, t = 1 data."""
    tnext, inner = watch.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
    t_now = jax.lax.stop_gradient(watch.direction * t0)
    nan = jnp.full_like(t_now, jnp.nan)
    return tnext, (inner, t_now, nan, nan)


def _watch_adapt(watch, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
    """The wrapped controller's decision; records [a, b] = [t0, t1] of a non-finite step from a finite state.

    diffrax hands the controller times multiplied by ``direction`` (so that they increase); the record is in the
    library's time (t = 0 noise, t = 1 data)."""
    inner, _, lo, hi = state
    direction = watch.direction
    keep, next_t0, next_t1, made_jump, inner, result = watch.controller.adapt_step_size(
        t0, t1, y0, y1_candidate, args, y_error, error_order, inner
    )
    # diffrax turns a NaN error estimate into inf before it gets here; both count as non-finite.
    bad = _tree_finite(y0) & jnp.logical_not(_tree_finite(y1_candidate) & _tree_finite(y_error))
    a, b, now = (jax.lax.stop_gradient(direction * v) for v in (t0, t1, next_t0))
    lo = jnp.where(bad, a, lo).astype(lo.dtype)
    hi = jnp.where(bad, b, hi).astype(hi.dtype)
    return keep, next_t0, next_t1, made_jump, (inner, now.astype(lo.dtype), lo, hi), result


class WatchedController(diffrax.AbstractAdaptiveStepSizeController):
    """An adaptive step-size controller that also records, in its state, the last attempted step [a, b] (in
    the library's time, t = 0 noise, t = 1 data) whose candidate state or error estimate was NaN/inf although
    it started from a finite state, and the time the solve has reached. Decisions are the wrapped controller's;
    the extra work is one ``isfinite`` reduction over the state per step.

    State: ``(inner_state, t_reached, a, b)`` (a = b = NaN until a step is non-finite); returned by diffrax with
    ``SaveAt(controller_state=True)``.
    """

    controller: diffrax.AbstractAdaptiveStepSizeController
    direction: Int[Array, ""] | int = 1

    @property
    def rtol(self):
        return self.controller.rtol

    @property
    def atol(self):
        return self.controller.atol

    @property
    def norm(self):  # pyright: ignore[reportIncompatibleMethodOverride]
        return self.controller.norm

    def wrap(self, direction):
        return WatchedController(self.controller.wrap(direction), direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return _watch_init(self, terms, t0, t1, y0, dt0, args, func, error_order)

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        return _watch_adapt(
            self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
        )


class _WatchedFixed(diffrax.AbstractStepSizeController):
    """:class:`WatchedController` for a fixed-step controller (``StepTo``); with fixed steps the first non-finite
    step is the one recorded (later steps start from a NaN state)."""

    controller: diffrax.AbstractStepSizeController
    direction: Int[Array, ""] | int = 1

    def wrap(self, direction):
        return _WatchedFixed(self.controller.wrap(direction), direction)

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        return _watch_init(self, terms, t0, t1, y0, dt0, args, func, error_order)

    def adapt_step_size(
        self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
    ):
        return _watch_adapt(
            self, t0, t1, y0, y1_candidate, args, y_error, error_order, controller_state
        )


def diffeqsolve(
    field,
    y0,
    t_start,
    t_end,
    *,
    args,
    solver: diffrax.AbstractSolver,
    controller: diffrax.AbstractStepSizeController,
    max_steps: int,
    ends_ok: Bool[Array, ""],
    input_ok: Bool[Array, ""] | bool = True,
    save_ts: Array | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
):
    """``diffrax.diffeqsolve`` of ``field(t, y, args)`` from ``t_start`` to ``t_end`` with ``throw=False``.

    Saves the end (``SaveAt(t1=True)``, plus ``ts=save_ts`` when given). ``ends_ok`` says whether the field was
    finite at the ends of the interval (computed by the caller, which knows what to evaluate there); ``input_ok``
    whether the caller's input was finite (the caller replaces a non-finite input by a finite one before the
    solve). Returns ``(solution, status, nfe, t_fail)``: the status ignores the finiteness of the solution,
    which the caller checks with :func:`final_status` on the quantity it reports; ``t_fail`` is where a failed
    solve stopped (for ``NONFINITE_FIELD``: where the field turns NaN/inf), or for a successful fixed-step solve
    the start of its first non-finite step (used by :func:`final_status`), else NaN. Times: t = 0 noise,
    t = 1 data, whichever way the solve runs.
    """
    adaptive = isinstance(controller, diffrax.AbstractAdaptiveStepSizeController)
    watched = WatchedController(controller) if adaptive else _WatchedFixed(controller)
    if save_ts is None:
        saveat = diffrax.SaveAt(t1=True, controller_state=True)
    else:
        saveat = diffrax.SaveAt(ts=save_ts, t1=True, controller_state=True)
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        t_start,
        t_end,
        None,
        y0,
        args=args,
        saveat=saveat,
        stepsize_controller=watched,
        max_steps=max_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        throw=False,
    )
    _, t_reached, bad_lo, bad_hi = sol.controller_state
    ok = sol.result == diffrax.RESULTS.successful
    max_hit = sol.result == diffrax.RESULTS.max_steps_reached
    # A non-finite attempted step that reached beyond where the solve stopped: the solve never got past it. Its
    # end may be NaN: an inf candidate makes diffrax's PID controller propose a NaN step (inf/inf in its error
    # scale), after which every attempt is non-finite; that counts as beyond.
    forward = jnp.asarray(t_end) > jnp.asarray(t_start)
    behind = jnp.where(forward, bad_hi <= t_reached, bad_hi >= t_reached)
    beyond = jnp.isfinite(bad_lo) & jnp.logical_not(behind)
    status = jnp.where(
        ok,
        SUCCESSFUL,
        jnp.where(
            jnp.logical_not(ends_ok),
            NONFINITE_END,
            jnp.where(beyond, NONFINITE_FIELD, jnp.where(max_hit, MAX_STEPS, SOLVER_FAILED)),
        ),
    )
    status = jnp.where(input_ok, status, NONFINITE_INPUT).astype(jnp.int32)
    nan = jnp.full_like(t_reached, jnp.nan)
    t_fail = jnp.where(ok, bad_lo if not adaptive else nan, t_reached)
    return sol, status, nfe(solver, sol.stats["num_steps"]), t_fail


_TIMED = (NONFINITE_FIELD, MAX_STEPS, SOLVER_FAILED)


def final_status(status: Int[Array, ""], t_fail, *outputs, ends_ok=True):
    """``(status, t_fail)`` after checking the reported ``outputs``: a ``SUCCESSFUL`` status with a NaN/inf
    output becomes ``NONFINITE_END`` (field NaN/inf at an end, ``ends_ok`` False), ``NONFINITE_FIELD`` (a
    fixed-step solve whose step from ``t_fail`` turned non-finite) or ``NONFINITE``. ``t_fail`` is kept only
    for the codes it describes (``NONFINITE_FIELD``, ``MAX_STEPS``, ``SOLVER_FAILED``), else NaN; it is a time
    of the path (t = 0 noise, t = 1 data), whichever way the solve ran."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(o)) for o in outputs]))
    t_fail = jnp.asarray(t_fail)
    code = jnp.where(
        jnp.logical_not(ends_ok),
        NONFINITE_END,
        jnp.where(jnp.isfinite(t_fail), NONFINITE_FIELD, NONFINITE),
    )
    status = jnp.where((status == SUCCESSFUL) & jnp.logical_not(finite), code, status).astype(
        jnp.int32
    )
    timed = jnp.any(jnp.stack([status == c for c in _TIMED]))
    return status, jnp.where(timed, t_fail, jnp.nan).astype(t_fail.dtype)


#: Resolution of the time written into a static ``throw=True`` message (101 variants of a ``{t}`` message).
_T_BINS = 100


def throw_if_failed(x, status: Int[Array, ""], messages: dict[int, str], t_fail=None):
    """``x``, with one ``equinox.error_if`` that raises ``messages[status]`` for a nonzero status (under jit).

    Messages are static: one containing ``{t}`` is expanded into 101 variants with t_fail rounded to 0.01
    (t = 0 noise, t = 1 data), plus one for an unknown time, and the variant is chosen at run time.
    """
    codes = sorted(messages)
    texts = [messages[c] for c in codes]
    index = jnp.argmax(jnp.asarray(codes) == status)
    for k, c in enumerate(codes):
        if "{t}" not in messages[c]:
            continue
        texts[k] = messages[c].replace("{t}", "t_fail (unknown)")
        if t_fail is None:
            continue
        base = len(texts)
        texts += [messages[c].replace("{t}", f"{i / _T_BINS:.2f}") for i in range(_T_BINS + 1)]
        t = jnp.asarray(t_fail)
        b = jnp.round(jnp.clip(jnp.nan_to_num(t), 0.0, 1.0) * _T_BINS).astype(jnp.int32)
        index = jnp.where((status == c) & jnp.isfinite(t), base + b, index)
    return eqx.branched_error_if(x, status != SUCCESSFUL, index, tuple(texts))


def _format_t(t) -> str:
    return f"{float(t):.5g}" if t is not None and math.isfinite(float(t)) else "t_fail (unknown)"


def raise_if_failed(result, messages: dict[int, str] | None = None, *, t_fail=None) -> None:
    """On the host: raise :class:`SolveError` for a failed solve, with the message of the first failing example,
    its index, how many failed and (when several codes occur) how many of each.

    ``result`` is a result module with ``status``, ``messages`` and ``t_fail`` (a :class:`~diffjax.SampleResult`
    or :class:`~diffjax.LikelihoodResult` computed with ``throw=False``, vmapped or not), or a status array
    with ``messages`` given as a dict (and optionally ``t_fail``, the matching array, so that a message that
    names the time of the failure can fill it in; times are the path's, t = 0 noise and t = 1 data).
    """
    import numpy as np  # noqa: PLC0415

    if hasattr(result, "status"):
        messages = dict(result.messages) if messages is None else messages
        t_fail = getattr(result, "t_fail", None) if t_fail is None else t_fail
        result = result.status
    status = np.asarray(result)
    flat = status.reshape(-1)
    bad = np.flatnonzero(flat != SUCCESSFUL)
    if bad.size == 0:
        return
    first = int(bad[0])
    code = int(flat[first])
    text = (messages or {}).get(code, f"solve failed with status {code}")
    if "{t}" in text:
        t = (
            None
            if t_fail is None
            else np.broadcast_to(np.asarray(t_fail), status.shape).reshape(-1)[first]
        )
        text = text.replace("{t}", _format_t(t))
    where = ""
    if status.ndim:
        index = np.unravel_index(first, status.shape)
        where = (
            f", the first at index {index[0] if status.ndim == 1 else tuple(int(i) for i in index)}"
        )
    codes, counts = np.unique(flat[bad], return_counts=True)
    kinds = ""
    if codes.size > 1:
        kinds = "; " + ", ".join(
            f"{int(n)} {CODE_NAMES.get(int(c), c)}" for c, n in zip(codes, counts)
        )
    raise SolveError(f"{text} ({int(bad.size)} of {int(flat.size)} solves failed{where}{kinds})")
