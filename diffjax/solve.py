"""One solve wrapper for every ODE that diffjax integrates: the interval, the solver, the NFE, the diagnosis.

Time convention: **t = 0 is noise, t = 1 is data**. Every interval is written (t0, t1) with t0 < t1, t0 at the
noise end and t1 at the data end, whichever way it is integrated: samplers go t0 → t1, likelihoods t1 → t0.

:func:`diffeqsolve` wraps ``diffrax.diffeqsolve`` with ``throw=False`` and turns its result, together with two
plain evaluations of the field at the ends of the interval, into one :class:`Status` code:

===  ==================  ===========================================================================
0    ``SUCCESSFUL``
1    ``NONFINITE_END``    the field is NaN/inf at t0 or t1 (an adaptive controller then rejects every step
                          and would otherwise report only ``max_steps``)
2    ``MAX_STEPS``        the step budget ran out before the end of the interval
3    ``SOLVER_FAILED``    another diffrax failure (e.g. the step size underflowed)
4    ``NONFINITE``        the solve finished but its result is NaN/inf
===  ==================  ===========================================================================

A public entry point raises for a nonzero status with one ``equinox.error_if`` per call (``throw=True``, the
default; the message names the fix), or returns the code in its result (``throw=False``) for callers that check it
on the host with :func:`raise_if_failed` — such programs contain no host callback and can be stored in JAX's
persistent compilation cache (the command line does this).
"""

from __future__ import annotations

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
    "SolveError",
    "interval",
    "resolve_solver",
    "nfe",
    "diffeqsolve",
    "throw_if_failed",
    "raise_if_failed",
]

SUCCESSFUL, NONFINITE_END, MAX_STEPS, SOLVER_FAILED, NONFINITE = range(5)

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
        raise ValueError(f"num_steps must be None (adaptive) or a Python int >= 1, got {num_steps!r}")
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
    saveat: diffrax.SaveAt,
    ends_ok: Bool[Array, ""],
    adjoint: diffrax.AbstractAdjoint | None = None,
):
    """``diffrax.diffeqsolve`` of ``field(t, y, args)`` from ``t_start`` to ``t_end`` with ``throw=False``.

    ``ends_ok`` says whether the field was finite at both ends of the interval (computed by the caller, which
    knows what to evaluate there). Returns ``(solution, status, nfe)``; the status ignores the finiteness of
    the solution, which the caller checks on the quantity it reports (:func:`final_status`).
    """
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(field),
        solver,
        t_start,
        t_end,
        None,
        y0,
        args=args,
        saveat=saveat,
        stepsize_controller=controller,
        max_steps=max_steps,
        adjoint=diffrax.RecursiveCheckpointAdjoint() if adjoint is None else adjoint,
        throw=False,
    )
    ok = sol.result == diffrax.RESULTS.successful
    max_hit = sol.result == diffrax.RESULTS.max_steps_reached
    status = jnp.where(
        ok,
        SUCCESSFUL,
        jnp.where(jnp.logical_not(ends_ok), NONFINITE_END, jnp.where(max_hit, MAX_STEPS, SOLVER_FAILED)),
    )
    return sol, status.astype(jnp.int32), nfe(solver, sol.stats["num_steps"])


def final_status(status: Int[Array, ""], *outputs) -> Int[Array, ""]:
    """``status``, or ``NONFINITE`` when it is ``SUCCESSFUL`` but any of ``outputs`` is NaN/inf."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(o)) for o in outputs]))
    return jnp.where((status == SUCCESSFUL) & jnp.logical_not(finite), NONFINITE, status).astype(jnp.int32)


def throw_if_failed(x, status: Int[Array, ""], messages: dict[int, str]):
    """``x``, with one ``equinox.error_if`` that raises ``messages[status]`` for a nonzero status (under jit)."""
    codes = sorted(messages)
    index = jnp.argmax(jnp.asarray(codes) == status)
    return eqx.branched_error_if(x, status != SUCCESSFUL, index, tuple(messages[c] for c in codes))


def raise_if_failed(result, messages: dict[int, str] | None = None) -> None:
    """On the host: raise :class:`SolveError` for a failed solve, with the message of its most frequent nonzero
    code and how many examples failed.

    ``result`` is a result module with ``status`` and ``messages`` (a :class:`~diffjax.SampleResult` or
    :class:`~diffjax.LikelihoodResult` computed with ``throw=False``, vmapped or not), or a status array with
    ``messages`` given as a dict.
    """
    import numpy as np  # noqa: PLC0415

    if hasattr(result, "status"):
        messages = dict(result.messages) if messages is None else messages
        result = result.status
    status = np.asarray(result)
    bad = status[status != SUCCESSFUL]
    if bad.size == 0:
        return
    codes, counts = np.unique(bad, return_counts=True)
    code = int(codes[np.argmax(counts)])
    text = (messages or {}).get(code, f"solve failed with status {code}")
    raise SolveError(f"{text} ({int(bad.size)} of {int(status.size)} solves failed)")
