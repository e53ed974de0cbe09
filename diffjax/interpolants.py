"""Stochastic interpolants: flows from any source distribution, not only Gaussian noise.

Time convention (used everywhere in diffjax): **t = 0 is the source (noise end), t = 1 is data.**

Albergo, Boffi & Vanden-Eijnden 2023 ("Stochastic Interpolants: A Unifying Framework for Flows and Diffusions"):

    x_t = α_t·x₁ + β_t·x₀ + γ_t·z,    x₀ ~ source,  x₁ ~ data,  z ~ N(0, I),

with (α_t, β_t) = (``path.alpha``, ``path.sigma``) of any diffjax path that runs exactly from the source to the
data (α_0 = 0, β_0 = 1, α_1 = 1, β_1 = 0: ``LinearPath``, ``CosinePath``, ``PolynomialPath(n ≥ 1)``) and a latent
noise scale γ_t (:class:`ZeroGamma`, :class:`BrownianGamma` γ = √(a·t(1 − t)), :class:`ConstantGamma`). The
coupling of (x₀, x₁) is the caller's: independent draws here, an optimal-transport pairing in
:mod:`diffjax.couplings`. The marginal density ρ_t of x_t solves the transport equation with the velocity

    b(t, x) = E[α̇·x₁ + β̇·x₀ + γ̇·z | x_t = x],

the minimiser of E‖b̂(t, x_t) − (α̇x₁ + β̇x₀ + γ̇z)‖² (:func:`conditional_velocity` is the regression target).
The ODE dx/dt = b started at x₀ ~ ρ_0 (the source, smoothed by N(0, γ_0² I) if γ_0 ≠ 0) ends at the data,
and log ρ_1(x) = log ρ_0(x₀) − ∫_0^1 ∇·b(t, x_t) dt along it: :func:`sample_ode` and :func:`log_likelihood` run
diffjax's own solvers (:func:`diffjax.sampling.sample_ode`, :func:`diffjax.likelihood.log_likelihood_with_stats`)
with the source in place of the path's prior. A Gaussian source N(0, I) with γ = 0 is exactly the Gaussian path
(α, σ) = (α, β). The closed-form oracle for Gaussian-mixture source and data is
:class:`diffjax.analytic.InterpolantMixture` (``GaussianMixture.interpolant_marginal``).

Everything here is an ``equinox.Module`` (sources, γ schedules, the interpolant); numeric parameters are leaves.
Public functions validate their inputs once (shapes, times, whether a source has a log-density) and are
``equinox.filter_jit``-ed; the methods used inside solvers and losses (``coefficients``, ``_interpolate``,
``_velocity_target``) are pure. Per example: x₀, x₁, z are ONE example each; batch with ``jax.vmap``.
"""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .analytic import GaussianMixture
from .paths import AbstractPath, LinearPath, check_time

__all__ = [
    "AbstractSource",
    "GaussianSource",
    "MixtureSource",
    "EmpiricalSource",
    "AbstractGamma",
    "ZeroGamma",
    "BrownianGamma",
    "ConstantGamma",
    "StochasticInterpolant",
    "interpolate",
    "conditional_velocity",
    "sample_conditional",
    "sample_ode",
    "log_likelihood",
    "log_likelihood_with_stats",
]

Scalar = Float[ArrayLike, ""]
_ENDPOINT_TOL = 1e-6


def _concrete(*values) -> bool:
    return not any(
        isinstance(leaf, jax.core.Tracer) for v in values for leaf in jax.tree_util.tree_leaves(v)
    )


# ---------------------------------------------------------------------------------------------------------------
# sources: the distribution of x₀ at t = 0
# ---------------------------------------------------------------------------------------------------------------
class AbstractSource(eqx.Module):
    """The distribution of x₀ at the noise end t = 0 (t = 1 is data).

    Subclasses implement ``sample(key, shape, dtype=None)`` (one draw of one example) and, where the density is
    known, ``log_prob(x)`` (one example) with ``has_log_prob = True``. ``event_shape`` is the shape of one
    example, or None where any shape works.
    """

    #: whether :meth:`log_prob` is available (exact likelihoods need it).
    has_log_prob: ClassVar[bool] = False

    @property
    def event_shape(self) -> tuple[int, ...] | None:
        """The shape of one example, or None if the source takes any shape."""
        return None

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, shape: tuple[int, ...], dtype=None) -> Array:
        """One draw of one example of the given shape."""

    def log_prob(self, x: Float[Array, "*shape"]) -> Float[Array, ""]:
        """log p₀(x) of one example; only sources with ``has_log_prob`` implement it."""
        raise ValueError(
            f"{type(self).__name__} has no log-density: an exact likelihood needs a source with log_prob "
            "(GaussianSource, MixtureSource, or an AbstractSource subclass with has_log_prob = True)"
        )

    def smoothed(self, var: Float[ArrayLike, ""]) -> AbstractSource:
        """The law of x₀ + √var·z, z ~ N(0, I) independent (for γ_0 ≠ 0). Closed form where implemented."""
        raise ValueError(
            f"{type(self).__name__} cannot be smoothed by N(0, γ_0² I) in closed form; use a γ with γ_0 = 0 "
            "(ZeroGamma, BrownianGamma) for likelihoods from this source"
        )


def _check_shape(source: AbstractSource, shape, name: str = "shape") -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    want = source.event_shape
    if want is not None and shape != tuple(want):
        raise ValueError(
            f"{name}={shape} does not match the source's example shape {tuple(want)} "
            f"({type(source).__name__}); source and data must have the same shape (one example; vmap for "
            "batches)"
        )
    return shape


class GaussianSource(AbstractSource):
    """A diagonal Gaussian N(mean, diag(scale²)) as the source (t = 0 noise end, t = 1 data).

    ``mean`` and ``scale`` broadcast against each other; if either is not a scalar their broadcast shape is the
    example shape (``event_shape``), else any shape works. ``GaussianSource()`` is N(0, I), the prior of the
    Gaussian paths.

    Raises:
        ValueError: a scale that is not > 0, or mean and scale that do not broadcast.
    """

    mean: Float[Array, "*shape"]
    scale: Float[Array, "*shape"]
    has_log_prob: ClassVar[bool] = True

    def __init__(
        self, mean: Float[ArrayLike, "*shape"] = 0.0, scale: Float[ArrayLike, "*shape"] = 1.0
    ):
        f = jnp.result_type(float)
        mean, scale = jnp.asarray(mean, f), jnp.asarray(scale, f)
        try:
            np.broadcast_shapes(mean.shape, scale.shape)
        except ValueError:
            raise ValueError(
                f"GaussianSource: mean {mean.shape} and scale {scale.shape} do not broadcast"
            ) from None
        if _concrete(scale) and not bool(jnp.all(scale > 0)):
            raise ValueError(f"GaussianSource: scale must be > 0 everywhere, got {scale}")
        self.mean, self.scale = mean, scale

    @property
    def event_shape(self):
        shape = np.broadcast_shapes(self.mean.shape, self.scale.shape)
        return tuple(shape) if shape else None

    def sample(self, key, shape, dtype=None):
        dtype = jnp.result_type(float) if dtype is None else dtype
        shape = _check_shape(self, shape)
        z = jax.random.normal(key, shape, dtype)
        return (self.mean + self.scale * z).astype(dtype)

    def log_prob(self, x):
        m, s = jnp.broadcast_to(self.mean, x.shape), jnp.broadcast_to(self.scale, x.shape)
        return (
            -0.5 * jnp.sum(jnp.square((x - m) / s))
            - jnp.sum(jnp.log(s))
            - 0.5 * x.size * math.log(2 * math.pi)
        )

    def smoothed(self, var):
        return GaussianSource(self.mean, jnp.sqrt(jnp.square(self.scale) + var))

    def as_mixture(self, dim: int) -> GaussianMixture:
        """This Gaussian as a one-component :class:`~diffjax.analytic.GaussianMixture` in ``dim`` dimensions."""
        m = jnp.broadcast_to(self.mean, (dim,))[None]
        v = jnp.broadcast_to(jnp.square(self.scale), (dim,))[None]
        return GaussianMixture(jnp.ones((1,), m.dtype), m, v)


class MixtureSource(AbstractSource):
    """A diagonal Gaussian mixture (:class:`diffjax.analytic.GaussianMixture`) as the source; examples are
    vectors of shape (D,). t = 0 is the source (noise end), t = 1 is data."""

    mixture: GaussianMixture
    has_log_prob: ClassVar[bool] = True

    def __init__(self, mixture: GaussianMixture):
        if not isinstance(mixture, GaussianMixture):
            raise ValueError(
                f"MixtureSource: mixture must be a diffjax.GaussianMixture, got {type(mixture).__name__}"
            )
        self.mixture = mixture

    @property
    def event_shape(self):
        return (self.mixture.dim,)

    def sample(self, key, shape, dtype=None):
        dtype = jnp.result_type(float) if dtype is None else dtype
        _check_shape(self, shape)
        return self.mixture.sample(key, 1)[0].astype(dtype)

    def log_prob(self, x):
        return self.mixture.log_prob(x)

    def smoothed(self, var):
        m = self.mixture
        return MixtureSource(eqx.tree_at(lambda q: q.variances, m, m.variances + var))

    def as_mixture(self, dim: int) -> GaussianMixture:
        """The mixture itself (``dim`` must be its dimension)."""
        _check_shape(self, (dim,), "data shape")
        return self.mixture


class EmpiricalSource(AbstractSource):
    """Uniform draws from a finite set of points (N, *shape): a source that can be sampled but has no density,
    so likelihoods from it are refused with a clear error. t = 0 is the source, t = 1 is data."""

    points: Float[Array, " N *shape"]

    def __init__(self, points: Float[ArrayLike, " N *shape"]):
        points = jnp.asarray(points)
        if points.ndim < 2 or points.shape[0] < 1:
            raise ValueError(
                f"EmpiricalSource: points must have shape (N, *example_shape) with N >= 1, got {points.shape}"
            )
        if not jnp.issubdtype(points.dtype, jnp.floating):
            points = points.astype(jnp.result_type(float))
        self.points = points

    @property
    def event_shape(self):
        return tuple(self.points.shape[1:])

    def sample(self, key, shape, dtype=None):
        dtype = jnp.result_type(float) if dtype is None else dtype
        _check_shape(self, shape)
        i = jax.random.randint(key, (), 0, self.points.shape[0])
        return self.points[i].astype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# γ_t: the latent noise of the interpolant
# ---------------------------------------------------------------------------------------------------------------
class AbstractGamma(eqx.Module):
    """The latent noise scale γ_t ≥ 0 of an interpolant (t = 0 source, t = 1 data).

    Subclasses give γ², its derivative d(γ²)/dt (finite where γ̇ is not, e.g. √(t(1 − t)) at the ends) and γ̇.
    """

    @abc.abstractmethod
    def gamma_sq(self, t: Float[Array, ""]) -> Float[Array, ""]: ...

    @abc.abstractmethod
    def d_gamma_sq(self, t: Float[Array, ""]) -> Float[Array, ""]: ...

    def gamma(self, t: Float[Array, ""]) -> Float[Array, ""]:
        """γ_t."""
        return jnp.sqrt(self.gamma_sq(t))

    def d_gamma(self, t: Float[Array, ""]) -> Float[Array, ""]:
        """γ̇_t = d(γ²)/dt / (2γ) (infinite where γ = 0 and d(γ²)/dt ≠ 0)."""
        return 0.5 * self.d_gamma_sq(t) / self.gamma(t)


class ZeroGamma(AbstractGamma):
    """γ_t = 0: the deterministic interpolant x_t = α_t·x₁ + β_t·x₀ (t = 0 source, t = 1 data)."""

    def gamma_sq(self, t):
        return jnp.zeros_like(t)

    def d_gamma_sq(self, t):
        return jnp.zeros_like(t)

    def gamma(self, t):
        return jnp.zeros_like(t)

    def d_gamma(self, t):
        return jnp.zeros_like(t)


class BrownianGamma(AbstractGamma):
    """γ_t = √(a·t(1 − t)) (t = 0 source, t = 1 data; Albergo et al. 2023, §3.3: a Brownian bridge of variance
    a). γ² = a·t(1 − t), d(γ²)/dt = a(1 − 2t), γ̇ = a(1 − 2t)/(2γ) (infinite at both ends, where γ = 0; the marginal velocity only
    needs γ·γ̇ = ½d(γ²)/dt, which is finite)."""

    scale: Float[Array, ""]

    def __init__(self, scale: Scalar = 1.0):
        if _concrete(scale):
            v = float(np.asarray(scale))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(
                    f"BrownianGamma: scale a must be a finite number > 0 (γ = √(a·t(1 − t))), got scale={scale!r}"
                )
        self.scale = jnp.asarray(scale, jnp.result_type(float))

    def gamma_sq(self, t):
        return self.scale * t * (1.0 - t)

    def d_gamma_sq(self, t):
        return self.scale * (1.0 - 2.0 * t)


class ConstantGamma(AbstractGamma):
    """γ_t = σ for every t ∈ [0, 1] (t = 0 source, t = 1 data; I-CFM / OT-CFM's x_t = t·x₁ + (1 − t)·x₀ + σz, Tong et al. 2024): γ̇ = 0. γ_0 = σ ≠ 0,
    so the ODE starts from the source smoothed by N(0, σ² I) (closed form for Gaussian and mixture sources)."""

    value: Float[Array, ""]

    def __init__(self, value: Scalar = 0.1):
        if _concrete(value):
            v = float(np.asarray(value))
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(
                    f"ConstantGamma: value must be a finite number >= 0, got value={value!r}"
                )
        self.value = jnp.asarray(value, jnp.result_type(float))

    def gamma_sq(self, t):
        return jnp.square(self.value) * jnp.ones_like(t)

    def d_gamma_sq(self, t):
        return jnp.zeros_like(t)

    def gamma(self, t):
        return self.value * jnp.ones_like(t)

    def d_gamma(self, t):
        return jnp.zeros_like(t)


# ---------------------------------------------------------------------------------------------------------------
# the interpolant
# ---------------------------------------------------------------------------------------------------------------
class StochasticInterpolant(eqx.Module):
    """x_t = α_t·x₁ + β_t·x₀ + γ_t·z between ``source`` (t = 0) and the data (t = 1); Albergo et al. 2023.

    α_t = ``path.alpha(t)``, β_t = ``path.sigma(t)`` and γ_t = ``gamma``. The path must run exactly from the
    source to the data — α_0 = 0, β_0 = 1, α_1 = 1, β_1 = 0, with finite α̇, β̇ at both ends (it is
    integrated over all of [0, 1] in t, whatever the path's ``t_min``/``t_max``) — which is checked at construction: ``LinearPath`` (default), ``CosinePath``,
    ``PolynomialPath(n ≥ 1)``, ``SigmaMinPath(0)``. (``VPPath``/``SubVPPath`` have α_0 ≠ 0, ``SigmaMinPath(σ>0)``
    and ``ICFMPath`` have β_1 ≠ 0 or extra noise: write I-CFM as ``LinearPath`` with ``ConstantGamma(σ)``.)

    Args:
        source: an :class:`AbstractSource` (x₀ at t = 0).
        path: the (α, β) pair, any diffjax path meeting the end conditions above.
        gamma: an :class:`AbstractGamma` (default :class:`ZeroGamma`).

    Raises:
        ValueError: a source, path or gamma of the wrong type, or a path that does not meet the end conditions.
    """

    source: AbstractSource
    path: AbstractPath
    gamma: AbstractGamma

    def __init__(
        self,
        source: AbstractSource,
        path: AbstractPath | None = None,
        gamma: AbstractGamma | None = None,
    ):
        path = LinearPath() if path is None else path
        gamma = ZeroGamma() if gamma is None else gamma
        if not isinstance(source, AbstractSource):
            raise ValueError(
                f"StochasticInterpolant: source must be a diffjax.interpolants.AbstractSource (GaussianSource, "
                f"MixtureSource, EmpiricalSource, or a subclass with sample(key, shape)), got "
                f"{type(source).__name__}"
            )
        if not isinstance(path, AbstractPath):
            raise ValueError(
                f"StochasticInterpolant: path must be a diffjax path, got {type(path).__name__}"
            )
        if not isinstance(gamma, AbstractGamma):
            raise ValueError(
                f"StochasticInterpolant: gamma must be a diffjax.interpolants.AbstractGamma (ZeroGamma, "
                f"BrownianGamma, ConstantGamma), got {type(gamma).__name__}"
            )
        if _concrete(path):
            coeffs = [float(c) for t in (0.0, 1.0) for c in path.coefficients(t)]
            if not all(math.isfinite(c) for c in coeffs):
                raise ValueError(
                    f"StochasticInterpolant: the path must be regular on all of [0, 1] (t = 0 source, t = 1 "
                    f"data), but {type(path).__name__} has (α, β, α̇, β̇) = {coeffs[:4]} at t = 0 and "
                    f"{coeffs[4:]} at t = 1"
                )
            ends = {
                "alpha_0": (float(path.alpha(0.0)), 0.0),
                "beta_0": (float(path.sigma(0.0)), 1.0),
                "alpha_1": (float(path.alpha(1.0)), 1.0),
                "beta_1": (float(path.sigma(1.0)), 0.0),
            }
            bad = {k: v for k, (v, want) in ends.items() if not abs(v - want) <= _ENDPOINT_TOL}
            if bad:
                raise ValueError(
                    f"StochasticInterpolant: {type(path).__name__} does not run from the source to the data: "
                    f"need alpha_0 = 0, beta_0 = 1, alpha_1 = 1, beta_1 = 0 (α = path.alpha, β = path.sigma), "
                    f"got {bad}; use LinearPath, CosinePath or PolynomialPath(n >= 1)"
                )
        self.source, self.path, self.gamma = source, path, gamma

    # pure, for solvers and losses ------------------------------------------------------------------------
    def coefficients(self, t: Float[Array, ""]):
        """(α, β, γ, α̇, β̇, γ̇) at one time (t = 0 source, t = 1 data); pure (no check)."""
        a, b, da, db = self.path.coefficients(t)
        return a, b, self.gamma.gamma(t), da, db, self.gamma.d_gamma(t)

    def _interpolate(self, t, x0, x1, z):
        a, b, g, _, _, _ = self.coefficients(t)
        out = a * x1 + b * x0
        return out if z is None else out + g * z

    def _velocity_target(self, t, x0, x1, z):
        _, _, _, da, db, dg = self.coefficients(t)
        out = da * x1 + db * x0
        return out if z is None else out + dg * z

    def start(self) -> AbstractSource:
        """The law of x_t at t = 0: the source, smoothed by N(0, γ_0² I) where γ_0 ≠ 0 (β_0 = 1, α_0 = 0)."""
        if isinstance(self.gamma, ZeroGamma | BrownianGamma):
            return self.source
        g0 = self.gamma.gamma_sq(jnp.zeros((), jnp.result_type(float)))
        if _concrete(g0) and float(g0) == 0.0:  # any other γ that vanishes at the source
            return self.source
        return self.source.smoothed(g0)


def _check_interpolant(interpolant):
    if not isinstance(interpolant, StochasticInterpolant):
        raise ValueError(
            f"interpolant must be a diffjax.interpolants.StochasticInterpolant, got {type(interpolant).__name__}"
        )


def _check_pair(interpolant, x0, x1, z):
    x0, x1 = jnp.asarray(x0), jnp.asarray(x1)
    if x0.shape != x1.shape:
        raise ValueError(
            f"shape mismatch: x0 (source) has shape {x0.shape} but x1 (data) has shape {x1.shape} (one example "
            "each; use jax.vmap for batches)"
        )
    _check_shape(interpolant.source, x1.shape, "data shape")
    if z is None:
        if not isinstance(interpolant.gamma, ZeroGamma):
            raise ValueError(
                f"z is required: the interpolant's gamma is {type(interpolant.gamma).__name__}, not ZeroGamma "
                "(pass z ~ N(0, I) of the data's shape)"
            )
        return x0, x1, None
    z = jnp.asarray(z)
    if z.shape != x1.shape:
        raise ValueError(
            f"shape mismatch: z has shape {z.shape} but x1 (data) has shape {x1.shape}"
        )
    return x0, x1, z


def interpolate(
    interpolant: StochasticInterpolant,
    t: Scalar,
    x0: Float[Array, "*shape"],
    x1: Float[Array, "*shape"],
    z: Float[Array, "*shape"] | None = None,
) -> Float[Array, "*shape"]:
    """x_t = α_t·x₁ + β_t·x₀ + γ_t·z for one example (t = 0 source, t = 1 data). ``z`` may be omitted only
    with ``ZeroGamma``. Checked: shapes (x0, x1, z and the source's example shape), t ∈ [0, 1]."""
    _check_interpolant(interpolant)
    x0, x1, z = _check_pair(interpolant, x0, x1, z)
    return interpolant._interpolate(check_time(t), x0, x1, z)


def conditional_velocity(
    interpolant: StochasticInterpolant,
    t: Scalar,
    x0: Float[Array, "*shape"],
    x1: Float[Array, "*shape"],
    z: Float[Array, "*shape"] | None = None,
) -> Float[Array, "*shape"]:
    """The regression target α̇_t·x₁ + β̇_t·x₀ + γ̇_t·z (t = 0 source, t = 1 data), whose conditional mean
    given x_t is the marginal velocity b(t, x_t) (Albergo et al. 2023, Thm. 2.6). With ``BrownianGamma``, γ̇ is
    infinite at t ∈ {0, 1}: sample t inside (0, 1). Checked like :func:`interpolate`."""
    _check_interpolant(interpolant)
    x0, x1, z = _check_pair(interpolant, x0, x1, z)
    return interpolant._velocity_target(check_time(t), x0, x1, z)


def sample_conditional(
    interpolant: StochasticInterpolant, key: PRNGKeyArray, t: Scalar, x1: Float[Array, "*shape"]
) -> tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    """(x_t, target) for one data example x₁ with x₀ ~ source and z ~ N(0, I) drawn independently from ``key``
    (the independent coupling; t = 0 source, t = 1 data): the training pair of the velocity regression."""
    _check_interpolant(interpolant)
    x1 = jnp.asarray(x1)
    if not jnp.issubdtype(x1.dtype, jnp.floating):
        x1 = x1.astype(jnp.result_type(float))
    _check_shape(interpolant.source, x1.shape, "data shape")
    t = check_time(t)
    k0, kz = jax.random.split(key)
    x0 = interpolant.source.sample(k0, x1.shape, x1.dtype)
    z = (
        None
        if isinstance(interpolant.gamma, ZeroGamma)
        else jax.random.normal(kz, x1.shape, x1.dtype)
    )
    return interpolant._interpolate(t, x0, x1, z), interpolant._velocity_target(t, x0, x1, z)


@eqx.filter_jit
def sample_ode(
    interpolant: StochasticInterpolant,
    velocity,
    key: PRNGKeyArray,
    *,
    shape: tuple[int, ...],
    log_prob: bool = False,
    **kwargs,
):
    """One sample of dx/dt = b(t, x) from x₀ ~ the interpolant's start (t = 0, the source) to t = 1 (data).

    ``velocity(t, x)`` is the interpolant's velocity b (a trained model of it, or the oracle
    :class:`diffjax.analytic.InterpolantMixture`). Runs :func:`diffjax.sampling.sample_ode` with x₀ drawn from
    :meth:`StochasticInterpolant.start` over [0, 1]; ``kwargs`` (solver, rtol, atol, num_steps, grid, max_steps,
    save_trajectory, trace, throw, …) are passed on. With ``log_prob=True`` the same solve returns
    log ρ_1(x₁) = log ρ_0(x₀) − ∫_0^1 ∇·b dt, which needs a source with a log-density.

    Raises:
        ValueError: ``shape`` not the source's example shape, ``log_prob=True`` with a source without a
            log-density, or bad solver arguments (from ``diffjax.sample_ode``).
    """
    from . import sampling  # noqa: PLC0415 (diffrax only on first use)

    _check_interpolant(interpolant)
    shape = _check_shape(interpolant.source, shape)
    start = interpolant.start()
    k0, k1 = jax.random.split(key)
    x0 = start.sample(k0, shape)
    lp0 = None
    if log_prob:
        _check_log_prob(start)
        lp0 = start.log_prob(x0)
    for name in ("x0", "x0_log_prob", "t0", "t1"):
        if name in kwargs:
            raise ValueError(
                f"{name} is set by the interpolant (its start at t = 0); do not pass it"
            )
    return sampling.sample_ode(
        velocity,
        interpolant.path,
        k1,
        x0=x0,
        x0_log_prob=lp0,
        log_prob=log_prob,
        t0=0.0,
        t1=1.0,
        **kwargs,
    )


def _check_log_prob(source):
    if not getattr(source, "has_log_prob", False):
        raise ValueError(
            f"the source {type(source).__name__} has no log-density, so an exact likelihood is not defined: "
            "use a source with log_prob (GaussianSource, MixtureSource, or an AbstractSource subclass with "
            "has_log_prob = True)"
        )


def log_likelihood_with_stats(
    interpolant: StochasticInterpolant, velocity, x: Float[ArrayLike, "*shape"], **kwargs
):
    """log ρ_1(x) of ONE example under the interpolant's flow dx/dt = b(t, x) (t = 0 source, t = 1 data).

    log ρ_1(x) = log ρ_0(x₀) − ∫_0^1 ∇·b(t, x_t) dt with x₀ = X(0) from the backward solve of
    :func:`diffjax.likelihood.log_likelihood_with_stats` over [0, 1], and log ρ_0 the log-density of the source
    (smoothed by N(0, γ_0² I) where γ_0 ≠ 0). ``kwargs`` are passed on (trace, key, solver, rtol, atol,
    max_steps, num_steps, throw, …); ``time`` defaults to ``"t"`` (the interpolant's own time).
    Returns a :class:`diffjax.likelihood.LikelihoodResult`.

    Raises:
        ValueError: a source without a log-density, x of a shape other than the source's example shape,
            ``t0``/``t1``/``prior_log_prob`` given (the interpolant fixes them).
    """
    from . import likelihood  # noqa: PLC0415 (diffrax only on first use)

    _check_interpolant(interpolant)
    start = interpolant.start()
    _check_log_prob(start)
    _check_shape(interpolant.source, jnp.shape(x), "x")
    for name in ("t0", "t1", "prior_log_prob", "endpoint"):
        if name in kwargs:
            raise ValueError(
                f"{name} is set by the interpolant (t0 = 0 source, t1 = 1 data); do not pass it"
            )
    kwargs.setdefault("time", "t")
    return likelihood.log_likelihood_with_stats(
        velocity, interpolant.path, x, t0=0.0, t1=1.0, prior_log_prob=start.log_prob, **kwargs
    )


def log_likelihood(
    interpolant: StochasticInterpolant, velocity, x: Float[ArrayLike, "*shape"], **kwargs
) -> Float[Array, ""]:
    """log ρ_1(x) in nats for ONE example (see :func:`log_likelihood_with_stats`; t = 0 source, t = 1 data)."""
    return log_likelihood_with_stats(interpolant, velocity, x, **kwargs).log_prob
