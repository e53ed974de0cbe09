"""Regression targets and exact conversions between parameterizations.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε with x data and ε ~ N(0, I).

Prediction kinds are the modules of :mod:`diffjax.kinds` (``Eps``, ``Data``, ``V``, ``Velocity``, ``Score``);
every function here also accepts their names as strings:

* ``"eps"``: ε̂ = E[ε | x_t]
* ``"data"``: x̂ = E[x | x_t] (a.k.a. x0-prediction; the optimal denoiser)
* ``"v"``: v̂ = α·ε̂ − σ·x̂ (Salimans & Ho 2022, general form)
* ``"velocity"``: û = α̇·x̂ + σ̇·ε̂ (the flow-matching velocity, Lipman et al. 2023)
* ``"score"``: ŝ = ∇log p_t(x_t) = −ε̂/σ (Tweedie)

Every conversion is linear in the prediction at fixed (t, x_t): writing each kind as c·x̂ + d·ε̂ and using
x_t = α·x̂ + σ·ε̂, one 2×2 solve gives the exact coefficients. The score is handled as −σ·ŝ = ε̂ so that
conversions that do not divide by α or σ mathematically do not divide numerically either. A conversion is
singular only where the mathematics is (e.g. ε → data at α = 0, data → velocity at σ = 0).

The public functions validate their inputs once (kind names, shapes, t ∈ [0, 1]: a Python error for concrete
t, one ``equinox.error_if`` for traced t); :func:`convert_at` is the unchecked form for library code.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .kinds import KINDS, AbstractKind, as_kind
from .paths import AbstractPath, check_time

__all__ = [
    "KINDS",
    "interpolate",
    "conditional_velocity",
    "conditional_score",
    "target",
    "convert",
    "convert_at",
    "error_scale_sq",
]

Scalar = Float[ArrayLike, ""]
Kind = str | AbstractKind


def _check_same_shape(a, b, na: str, nb: str) -> None:
    if jnp.shape(a) != jnp.shape(b):
        raise ValueError(
            f"shape mismatch: {na} has shape {jnp.shape(a)} but {nb} has shape {jnp.shape(b)} "
            "(diffjax functions act on one example; use jax.vmap for batches)"
        )


def interpolate(
    path: AbstractPath, t: Scalar, x: Float[Array, "*shape"], eps: Float[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """x_t = α_t·x + σ_t·ε (t = 0 noise, t = 1 data)."""
    _check_same_shape(x, eps, "x", "eps")
    a, s, _, _ = path.coefficients(check_time(t))
    return a * x + s * eps


def conditional_velocity(
    path: AbstractPath, t: Scalar, x_t: Float[Array, "*shape"], x: Float[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """u_t(x_t | x) = (α̇ − (σ̇/σ)·α)·x + (σ̇/σ)·x_t  (= α̇·x + σ̇·ε); Lipman et al. 2023, eq. for Gaussian paths.

    Singular at σ = 0 (t = 1 on paths that reach the data exactly); use :func:`target` with ε there.
    """
    _check_same_shape(x_t, x, "x_t", "x")
    a, s, da, ds = path.coefficients(check_time(t))
    r = ds / s
    return (da - r * a) * x + r * x_t


def conditional_score(
    path: AbstractPath, t: Scalar, x_t: Float[Array, "*shape"], x: Float[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """∇_{x_t} log p_t(x_t | x) = −(x_t − α_t·x)/σ_t²  (= −ε/σ). Singular at σ = 0 (t = 1)."""
    _check_same_shape(x_t, x, "x_t", "x")
    a, s, _, _ = path.coefficients(check_time(t))
    return -(x_t - a * x) / jnp.square(s)


def target(
    kind: Kind, path: AbstractPath, t: Scalar, x: Float[Array, "*shape"], eps: Float[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """The regression target of a prediction kind for one draw (x, ε) at time t (t = 0 noise, t = 1 data).

    eps → ε, data → x, v → α·ε − σ·x, velocity → α̇·x + σ̇·ε, score → −ε/σ (singular at σ = 0).
    """
    kind = as_kind(kind)
    _check_same_shape(x, eps, "x", "eps")
    return kind.target(*path.coefficients(check_time(t)), x, eps)


def convert_at(pred, src: AbstractKind, dst: AbstractKind, coefficients, x_t):
    """The unchecked conversion of ``pred`` from kind ``src`` to ``dst`` at (α, σ, α̇, σ̇) = ``coefficients``.

    With src = c_s·x̂ + d_s·ε̂ (after ``src.encode``) and x_t = α·x̂ + σ·ε̂, (x̂, ε̂) solve a 2×2 system of
    determinant Δ = c_s·σ − d_s·α, and dst = c_d·x̂ + d_d·ε̂ (then ``dst.decode``). For library code inside
    solvers and losses, whose inputs are valid by construction; users call :func:`convert`.
    """
    a, s, da, ds = coefficients
    y = src.encode(pred, a, s)
    if src.basis != dst.basis:
        cs, d_s = src.coefficients(a, s, da, ds)
        cd, dd = dst.coefficients(a, s, da, ds)
        det = cs * s - d_s * a
        y = ((cd * s - dd * a) * y + (dd * cs - cd * d_s) * x_t) / det
    return dst.decode(y, a, s)


def convert(
    pred: Float[Array, "*shape"],
    *,
    src: Kind,
    dst: Kind,
    path: AbstractPath,
    t: Scalar,
    x_t: Float[Array, "*shape"],
) -> Float[Array, "*shape"]:
    """Convert a prediction at (t, x_t) from kind ``src`` to kind ``dst`` exactly.

    With src = c_s·x̂ + d_s·ε̂ and x_t = α·x̂ + σ·ε̂, (x̂, ε̂) solve a 2×2 system of determinant
    Δ = c_s·σ − d_s·α, and dst = c_d·x̂ + d_d·ε̂. Special cases of the general formula (formulas sheet §1.3):

    * score → velocity (the seed's identity): u = (σ²·α̇/α − σ̇·σ)·s + (α̇/α)·x_t
    * velocity → score: s = (α·u − α̇·x_t)/(σ·(α̇σ − σ̇α))
    * ε → data: x̂ = (x_t − σ·ε̂)/α (singular at α = 0, t = 0)
    * data → velocity: u = (σ̇/σ)·x_t + ((α̇σ − σ̇α)/σ)·x̂ (singular at σ = 0, t = 1)

    Time: t = 0 is noise, t = 1 is data.
    """
    src, dst = as_kind(src, "src"), as_kind(dst, "dst")
    _check_same_shape(pred, x_t, "pred", "x_t")
    return convert_at(pred, src, dst, path.coefficients(check_time(t)), x_t)


def error_scale_sq(kind: Kind, path: AbstractPath, t: Scalar) -> Float[Array, ""]:
    """κ_t² with ‖ŷ − y‖² = κ_t²·‖ε̂ − ε‖² for predictions of ``kind`` from one network output.

    eps: 1; data: σ²/α² = e^{−λ}; v: (α² + σ²)²/α²; velocity: σ²λ̇²/4; score: 1/σ² (formulas sheet §1.3).
    """
    return as_kind(kind).error_scale_sq(*path.coefficients(check_time(t)))
