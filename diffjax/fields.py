"""Model adapters and divergences: from a network of any prediction kind to the fields the solvers need.

Time convention: **t = 0 is noise, t = 1 is data**. A model is a per-example function ``fn(t, x)`` with scalar t
and one example x of any shape, returning a prediction of one of the kinds in :data:`diffjax.targets.KINDS`.
Batching is ``jax.vmap``; divergences act on one example and never build cross-example Jacobian blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .paths import AbstractPath
from .targets import KINDS, _coeffs, convert

__all__ = [
    "velocity_field",
    "integration_interval",
    "score_field",
    "reverse_sde_drift",
    "divergence_exact",
    "divergence_hutchinson",
    "make_probes",
]

Field = Callable[[Float[Array, ""], Float[Array, "*shape"]], Float[Array, "*shape"]]


def _check(kind):
    if kind not in KINDS:
        raise ValueError(f"unknown parameterization kind={kind!r}; expected one of {KINDS}")


def velocity_field(fn: Field, kind: str, path: AbstractPath) -> Field:
    """The probability-flow velocity u_t(x) of a model predicting ``kind`` on ``path``.

    Exact conversion (``diffjax.convert``); for kind = "velocity" the model is returned unchanged.
    Singular only where the conversion is: ε- and score-models where α = 0, data-models where σ = 0 (on the
    linear and cosine paths: t = 0 and t = 1). :func:`integration_interval` gives the interval to integrate on.
    """
    _check(kind)
    if kind == "velocity":
        return fn
    return lambda t, x: convert(fn(t, x), src=kind, dst="velocity", path=path, t=t, x_t=x)


DEFAULT_ENDPOINT_EPS = 1e-3


def integration_interval(
    path: AbstractPath, kind: str, *, t_eps: float = DEFAULT_ENDPOINT_EPS
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(t0, t1): where to integrate the velocity of a ``kind`` model on ``path`` (t = 0 noise, t = 1 data).

    Starts from the path's own interval [``path.t_min``, ``path.t_max``] and moves an end inward by ``t_eps``
    where the conversion to a velocity divides by zero. Writing the prediction as c·x̂ + d·ε̂ and
    x_t = α·x̂ + σ·ε̂, the conversion solves a 2×2 system of determinant Δ = c·σ − d·α (``diffjax.convert``):

    * ``"data"`` (c, d = 1, 0): Δ = σ, singular where σ = 0, the data end of ``LinearPath`` and ``CosinePath``;
    * ``"eps"``, ``"score"`` (0, 1): Δ = −α, singular where α = 0, their noise end;
    * ``"v"`` (−σ, α): Δ = −(α² + σ²) < 0 and ``"velocity"``: never singular.

    Near a singular end the field is finite but ill-conditioned (an error δ in ε̂ moves u by ~δ·α̇/α), which is
    why ``t_eps`` is 1e-3 rather than machine precision. A sampler run on the returned interval leaves data
    perturbed by σ_{t1} at the data end (σ_{t1} ≈ 1e-3 for the linear path), which ``log_likelihood`` reports
    (``endpoint_sigma_ratio``) with ``t_eps = 1 − t1``. Works under ``jit`` (the ends are arrays).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown parameterization kind={kind!r}; expected one of {KINDS}")
    if not 0.0 < t_eps < 0.5:
        raise ValueError(f"t_eps must lie in (0, 0.5), got {t_eps}")
    f = jnp.result_type(float)
    t0 = jnp.asarray(path.t_min, f)
    t1 = jnp.asarray(path.t_max, f)
    if kind == "velocity":
        return t0, t1

    def singular(t):
        a, s, da, ds = path.coefficients(t)
        c, d = _coeffs(kind, a, s, da, ds)
        det = c * s - d * a
        return jnp.logical_not(jnp.isfinite(det) & (det != 0))

    t0 = jnp.where(singular(t0), t0 + t_eps, t0)
    t1 = jnp.where(singular(t1), t1 - t_eps, t1)
    return t0, t1


def score_field(fn: Field, kind: str, path: AbstractPath) -> Field:
    """The score ∇log p_t(x) of a model predicting ``kind`` on ``path`` (exact conversion; ŝ = −ε̂/σ)."""
    _check(kind)
    if kind == "score":
        return fn
    return lambda t, x: convert(fn(t, x), src=kind, dst="score", path=path, t=t, x_t=x)


def reverse_sde_drift(velocity: Field, score: Field, diffusion: Callable) -> Field:
    """Drift of the reverse-time family f = u_t + ½·g_t²·∇log p_t (t from 0 noise to 1 data).

    dX = f dt + g_t dW has the marginals p_t for every g_t ≥ 0 (g = 0: the probability-flow ODE).
    """

    def drift(t, x):
        g = diffusion(t)
        return velocity(t, x) + 0.5 * jnp.square(g) * score(t, x)

    return drift


def divergence_exact(
    f: Callable[[Float[Array, "*shape"]], Float[Array, "*shape"]],
    x: Float[Array, "*shape"],
    *,
    chunk_size: int | None = None,
) -> tuple[Float[Array, "*shape"], Float[Array, ""]]:
    """(f(x), ∇·f(x)) with the exact trace Σ_i e_iᵀ (∂f/∂x) e_i.

    One linearisation of f, then D forward-mode JVPs against the basis vectors (vmapped; ``chunk_size``
    bounds how many run at once, trading speed for memory on large D). One example only.
    """
    shape = x.shape
    d = x.size
    y, lin = jax.linearize(lambda z: f(z.reshape(shape)).reshape(-1), x.reshape(-1))
    eye = jnp.eye(d, dtype=x.dtype)
    if chunk_size is None or chunk_size >= d:
        cols = jax.vmap(lin)(eye)  # row i = J e_i
    else:
        cols = jax.lax.map(lin, eye, batch_size=chunk_size)
    return y.reshape(shape), jnp.trace(cols)


def divergence_hutchinson(
    f: Callable[[Float[Array, "*shape"]], Float[Array, "*shape"]],
    x: Float[Array, "*shape"],
    probes: Float[Array, " k *shape"],
) -> tuple[Float[Array, "*shape"], Float[Array, ""]]:
    """(f(x), mean_k v_kᵀ (∂f/∂x) v_k): the Hutchinson–Skilling estimate of ∇·f with fixed probes.

    Unbiased for any probes with E[vvᵀ] = I (Hutchinson 1990, Skilling 1989; FFJORD, Grathwohl et al. 2019).
    One linearisation and k forward-mode JVPs.
    """
    if probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape (k, *{x.shape}), got {probes.shape}")
    y, lin = jax.linearize(f, x)
    jv = jax.vmap(lin)(probes)
    return y, jnp.mean(jnp.sum((probes * jv).reshape(probes.shape[0], -1), axis=-1))


def make_probes(
    key: PRNGKeyArray,
    shape: tuple[int, ...],
    num_probes: int = 1,
    kind: str = "rademacher",
    dtype=None,
) -> Float[Array, " k *shape"]:
    """``num_probes`` Hutchinson probes with E[vvᵀ] = I: Rademacher (±1) or standard Gaussian."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if kind == "rademacher":
        return jax.random.rademacher(key, (num_probes, *shape), dtype=dtype)
    if kind == "gaussian":
        return jax.random.normal(key, (num_probes, *shape), dtype=dtype)
    raise ValueError(f"unknown probe kind {kind!r}; expected 'rademacher' or 'gaussian'")
