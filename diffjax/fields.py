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
from .targets import KINDS, convert

__all__ = [
    "velocity_field",
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
    Singular only where the conversion is (e.g. ε- or score-models at t = 0, where α = 0).
    """
    _check(kind)
    if kind == "velocity":
        return fn
    return lambda t, x: convert(fn(t, x), src=kind, dst="velocity", path=path, t=t, x_t=x)


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
    key: PRNGKeyArray, shape: tuple[int, ...], num_probes: int = 1, kind: str = "rademacher", dtype=None
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
