"""Gaussian probability paths x_t = α_t·x + σ_t·ε.

Nothing here assumes a variance-preserving path (α² + σ² = 1), α_0 = 0 or σ_1 = 0: any pair (α_t, σ_t) with a
strictly increasing log-SNR λ_t is a path (the general affine paths of flow matching, Lipman et al. 2024,
"Flow Matching Guide and Code" §4.8). The prior at t = 0 is N(0, σ_0² I) where α_0 = 0; where α_0 ≠ 0 (VP,
sub-VP) it is a documented approximation.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data.**
Papers that put data at time 0 (score_sde, VDM, Kingma & Gao, SD3) map to this convention by s = 1 − t.

A path is an immutable PyTree (an ``equinox.Module``): its numeric parameters are leaves, so a path passes
through ``jit``, ``vmap``, ``grad`` and shardings as an ordinary argument, and a learned schedule is a path whose
leaves are trained.

Every path provides, for a scalar ``t`` in [0, 1]:

* ``alpha(t)``, ``sigma(t)`` and their time derivatives ``d_alpha(t)``, ``d_sigma(t)``;
* ``sigma_sq(t)`` and ``d_sigma_sq(t)`` = d(σ²)/dt, which stays finite where σ̇ does not (VP at t = 1);
* ``log_snr(t)`` λ_t = log(α_t²/σ_t²) (increasing in t), ``d_log_snr(t)`` and the exact inverse
  ``t_from_log_snr(lam)``;
* ``prior``: the distribution of x_0 (the noise end) used by samplers and likelihoods;
* ``t_eps``: a property of the path, its distance from an end inside which its coefficients are singular
  (0 for paths that are regular on all of [0, 1]); ``[t_min, t_max]`` is what remains, ``[0, 1 − t_eps]`` for
  paths singular only at the data end. Samplers and likelihoods integrate over it by default.

Checks at the boundary, pure core. The path methods are pure functions of t: under ``jit``/``vmap``/``grad`` they
add no runtime check (no host callback), so they can sit inside solvers and training steps. With a concrete
(non-traced) t they still refuse, at Python level, a non-scalar t and one outside [0, 1] (``ValueError``).
Public entry points that take a user's time (``targets``, ``sampling``, ``likelihood``, ``losses.loss_at``)
validate it once with :func:`check_time`, which also checks traced times (one ``equinox.branched_error_if``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

__all__ = [
    "AbstractPath",
    "LinearPath",
    "CosinePath",
    "VPPath",
    "VEPath",
    "EDMPath",
    "LogSNRPath",
    "PolynomialPath",
    "SigmaMinPath",
    "ICFMPath",
    "SubVPPath",
    "AffinePath",
    "Normal",
    "check_time",
]

Scalar = Float[ArrayLike, ""]

_NAN_MESSAGE = (
    "diffjax: {name} is NaN. Inside a solver this usually means the field returned NaN/inf and the step "
    "size became NaN: a data-prediction converted to a velocity divides by sigma (singular at t = 1 "
    "on the linear and cosine paths), an eps/score-prediction by alpha (singular at t = 0); integrate "
    "over diffjax.integration_interval(path, kind)"
)


def _range_message(name: str, lo: float, hi: float) -> str:
    return f"diffjax: {name} must lie in [{lo:g}, {hi:g}] (t = 0 noise, t = 1 data)"


def _is_traced(t) -> bool:
    return isinstance(t, jax.core.Tracer)


def _as_time(t: Scalar, lo: float = 0.0, hi: float = 1.0, name: str = "t") -> Float[Array, ""]:
    """``t`` as a float scalar array; a concrete (non-traced) t outside ``[lo, hi]`` raises ``ValueError``.

    Pure: a traced t is returned unchecked (no runtime check, no host callback).
    """
    if not _is_traced(t):
        v = np.asarray(t)
        if v.shape != ():
            raise ValueError(
                f"{name} must be a scalar (per-example functions take one time; use jax.vmap for "
                f"batches), got shape {v.shape}"
            )
        v = float(v)
        if math.isnan(v):
            raise ValueError(_NAN_MESSAGE.format(name=name))
        if not lo <= v <= hi:
            raise ValueError(f"{_range_message(name, lo, hi)}, got {name} = {v!r}")
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    if t.shape != ():
        raise ValueError(
            f"{name} must be a scalar (per-example functions take one time; use jax.vmap for batches), "
            f"got shape {t.shape}"
        )
    return t


def check_time(t: Scalar, lo: float = 0.0, hi: float = 1.0, name: str = "t") -> Float[Array, ""]:
    """Validate a user's time at a public entry point and return it as a float scalar array.

    diffjax's time runs from t = 0 (noise) to t = 1 (data). A non-scalar ``t`` raises ``ValueError``. A concrete
    ``t`` outside ``[lo, hi]`` (or NaN, with its own message) raises ``ValueError`` at once; a traced ``t``
    (under ``jit``/``vmap``/``grad``) gets one ``equinox.branched_error_if``, which raises when the program
    runs. Call it once per entry point; the path methods themselves stay pure (see the module docstring).
    """
    traced = _is_traced(t)
    t = _as_time(t, lo, hi, name)
    if not traced:
        return t
    bad = jnp.logical_not((t >= lo) & (t <= hi))  # NaN is bad too
    return eqx.branched_error_if(
        t,
        bad,
        jnp.where(jnp.isnan(t), 0, 1),
        (_NAN_MESSAGE.format(name=name), _range_message(name, lo, hi)),
    )


def _bisection_steps(dtype) -> int:
    # The bracket halves each step: 64 halvings of [0, 1] reach the float32 spacing at t for t >= 1e-12,
    # 128 the float64 spacing for t >= 1e-22.
    return 64 if jnp.finfo(dtype).bits <= 32 else 128


@eqx.filter_jit
def _monotone_inverse(fn: Callable, y: Scalar, lo: float, hi: float) -> Float[Array, ""]:
    """The t in [lo, hi] with fn(t) = y, for a scalar fn increasing on [lo, hi].

    ``y`` below fn(lo) gives lo, above fn(hi) gives hi (the clipped inverse). The root is found by bisection
    (``optimistix.Bisection``, run until the bracket is at the float spacing of t) and differentiated by the
    implicit function theorem (``optimistix.ImplicitAdjoint``): dt/dy = 1/fn'(t) and, for parameters θ that
    ``fn`` carries (a bound method of a Module, an ``eqx.Partial``), dt/dθ = −(∂fn/∂θ)/fn'(t). At a clipped end
    the gradient is 0. Works under jit, vmap and grad; no runtime check (``throw=False``).
    """
    import optimistix as optx  # noqa: PLC0415 (only here: training and `import diffjax` never load it)

    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        y = y.astype(jnp.result_type(float))
    lo_a, hi_a = jnp.asarray(lo, y.dtype), jnp.asarray(hi, y.dtype)
    mid = 0.5 * (lo_a + hi_a)
    below, above = y <= fn(lo_a), y >= fn(hi_a)
    inside = jnp.logical_not(below | above)
    # outside the range (and for NaN) solve a harmless problem instead, so that no NaN reaches the gradient
    y_safe = jnp.where(inside & jnp.logical_not(jnp.isnan(y)), y, jax.lax.stop_gradient(fn(mid)))
    sol = optx.root_find(
        lambda t, target: fn(t) - target,
        optx.Bisection(rtol=0.0, atol=0.0, flip=False),
        mid,
        args=y_safe,
        options=dict(lower=lo_a, upper=hi_a),
        max_steps=_bisection_steps(y.dtype),
        adjoint=optx.ImplicitAdjoint(),
        throw=False,  # with zero tolerances the solve always "runs out of steps": that is the stopping rule
    )
    t = jnp.where(below, lo_a, jnp.where(above, hi_a, sol.value))
    return jnp.where(jnp.isnan(y), jnp.nan, t)


class Normal(eqx.Module):
    """Isotropic Gaussian N(0, scale² I): the prior of a path at t = 0 (the noise end)."""

    scale: Float[Array, ""]

    def __init__(self, scale: Scalar = 1.0):
        self.scale = jnp.asarray(scale, dtype=jnp.result_type(float))

    def log_prob(self, x: Float[Array, "*shape"]) -> Float[Array, ""]:
        """log N(x; 0, scale² I), summed over every dimension of x (one example)."""
        d = x.size
        return -0.5 * jnp.sum(jnp.square(x / self.scale)) - d * (
            jnp.log(self.scale) + 0.5 * math.log(2 * math.pi)
        )

    def sample(self, key: PRNGKeyArray, shape: tuple[int, ...], dtype=None) -> Array:
        """A draw of the given shape."""
        dtype = jnp.result_type(float) if dtype is None else dtype
        return self.scale.astype(dtype) * jax.random.normal(key, shape, dtype)


class AbstractPath(eqx.Module):
    """A Gaussian path x_t = α_t·x + σ_t·ε with t = 0 noise and t = 1 data.

    Subclasses implement ``alpha``, ``sigma``, ``d_alpha``, ``d_sigma``, ``t_from_log_snr`` and ``prior``.
    The remaining methods have generic forms that subclasses override where a closed form is more accurate.
    Public methods are pure functions of t: a concrete t must be a scalar in [0, 1] (``ValueError``), a traced
    one is not checked (entry points validate user times with :func:`check_time`).
    """

    @abc.abstractmethod
    def _alpha(self, t): ...

    @abc.abstractmethod
    def _sigma(self, t): ...

    @abc.abstractmethod
    def _d_alpha(self, t): ...

    @abc.abstractmethod
    def _d_sigma(self, t): ...

    @abc.abstractmethod
    def t_from_log_snr(self, lam: Scalar) -> Float[Array, ""]:
        """The exact inverse of ``log_snr``: the t in [0, 1] with λ_t = lam (clipped to the path's range)."""

    @property
    @abc.abstractmethod
    def prior(self) -> Normal:
        """The distribution used for x_0 at the noise end t = 0."""

    @property
    def t_eps(self) -> float:
        """The path's distance from an end inside which its coefficients are singular (0: regular on [0, 1]).

        A property of the path (e.g. VP's σ̇ = −∞ at t = 1); [t_min, t_max] is the rest of [0, 1].
        """
        return 0.0

    @property
    def t_min(self) -> float:
        """Default start of integration (noise end)."""
        return 0.0

    @property
    def t_max(self) -> float:
        """Default end of integration (data end): 1 − t_eps."""
        return 1.0 - self.t_eps

    # Public API: pure in t (a concrete t is checked at Python level; traced times are not checked).
    def alpha(self, t: Scalar) -> Float[Array, ""]:
        """α_t, the data coefficient (t = 0 noise, t = 1 data)."""
        return self._alpha(_as_time(t))

    def sigma(self, t: Scalar) -> Float[Array, ""]:
        """σ_t, the noise coefficient (t = 0 noise, t = 1 data)."""
        return self._sigma(_as_time(t))

    def d_alpha(self, t: Scalar) -> Float[Array, ""]:
        """dα/dt."""
        return self._d_alpha(_as_time(t))

    def d_sigma(self, t: Scalar) -> Float[Array, ""]:
        """dσ/dt."""
        return self._d_sigma(_as_time(t))

    def sigma_sq(self, t: Scalar) -> Float[Array, ""]:
        """σ_t²."""
        return jnp.square(self._sigma(_as_time(t)))

    def d_sigma_sq(self, t: Scalar) -> Float[Array, ""]:
        """d(σ²)/dt = 2σσ̇, written so that it stays finite where σ̇ is not (VP paths at t = 1)."""
        return self._d_sigma_sq(_as_time(t))

    def _d_sigma_sq(self, t):
        return 2.0 * self._sigma(t) * self._d_sigma(t)

    def log_snr(self, t: Scalar) -> Float[Array, ""]:
        """λ_t = log(α_t²/σ_t²), increasing in t (−∞ at pure noise, +∞ at clean data where σ = 0)."""
        return self._log_snr(_as_time(t))

    def _log_snr(self, t):
        return 2.0 * (jnp.log(self._alpha(t)) - jnp.log(self._sigma(t)))

    def d_log_snr(self, t: Scalar) -> Float[Array, ""]:
        """dλ/dt = 2(α̇/α − σ̇/σ) > 0."""
        return self._d_log_snr(_as_time(t))

    def _d_log_snr(self, t):
        return 2.0 * (self._d_alpha(t) / self._alpha(t) - self._d_sigma(t) / self._sigma(t))

    def coefficients(self, t: Scalar):
        """(α, σ, α̇, σ̇) at one time (t = 0 noise, t = 1 data)."""
        return self._coefficients(_as_time(t))

    def _coefficients(self, t):
        return self._alpha(t), self._sigma(t), self._d_alpha(t), self._d_sigma(t)

    def log_snr_range(self) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """(λ at t_min, λ at t_max): the log-SNR interval that the path's default integration covers."""
        return self._log_snr(jnp.asarray(float(self.t_min))), self._log_snr(
            jnp.asarray(float(self.t_max))
        )


class LinearPath(AbstractPath):
    """CondOT / rectified-flow path: α_t = t, σ_t = 1 − t (t = 0 noise, t = 1 data).

    Lipman et al. 2023 ("Flow Matching for Generative Modeling"), Liu et al. 2023 (rectified flow).
    λ_t = 2·logit(t), with inverse t = sigmoid(λ/2). Regular on all of [0, 1]; the prior is N(0, I) exactly.
    """

    def _alpha(self, t):
        return t

    def _sigma(self, t):
        return 1.0 - t

    def _d_alpha(self, t):
        return jnp.ones_like(t)

    def _d_sigma(self, t):
        return -jnp.ones_like(t)

    def _log_snr(self, t):
        return 2.0 * (jnp.log(t) - jnp.log1p(-t))

    def _d_log_snr(self, t):
        return 2.0 / (t * (1.0 - t))

    def t_from_log_snr(self, lam):
        return jax.nn.sigmoid(0.5 * jnp.asarray(lam))

    @property
    def prior(self):
        return Normal(1.0)


class CosinePath(AbstractPath):
    """Variance-preserving cosine path: α_t = sin(πt/2), σ_t = cos(πt/2) (t = 0 noise, t = 1 data).

    Nichol & Dhariwal 2021 without the 0.008 offset; λ_t = 2·log tan(πt/2), inverse t = (2/π)·arctan(e^{λ/2}).
    Regular on [0, 1]; the prior N(0, I) is exact.
    """

    # σ is written as sin(π(1 − t)/2) so that it is exactly 0 at t = 1 in float32 (cos(π/2) is not),
    # and every other quantity is expressed through α and σ so that the endpoints stay exact.
    def _alpha(self, t):
        return jnp.sin(0.5 * jnp.pi * t)

    def _sigma(self, t):
        return jnp.sin(0.5 * jnp.pi * (1.0 - t))

    def _d_alpha(self, t):
        return 0.5 * jnp.pi * self._sigma(t)

    def _d_sigma(self, t):
        return -0.5 * jnp.pi * self._alpha(t)

    def _d_sigma_sq(self, t):
        return -jnp.pi * self._alpha(t) * self._sigma(t)

    def _log_snr(self, t):
        return 2.0 * (jnp.log(self._alpha(t)) - jnp.log(self._sigma(t)))

    def _d_log_snr(self, t):
        return jnp.pi / (self._alpha(t) * self._sigma(t))

    def t_from_log_snr(self, lam):
        return (2.0 / jnp.pi) * jnp.arctan(jnp.exp(0.5 * jnp.asarray(lam)))

    @property
    def prior(self):
        return Normal(1.0)


def _linear_beta(beta_min, beta_max, t):
    """score_sde's linear β at its time s = 1 − t (t = 0 noise, t = 1 data): β_min + s·(β_max − β_min)."""
    return beta_min + (1.0 - t) * (beta_max - beta_min)


def _linear_beta_integral(beta_min, beta_max, t):
    """Γ(t) = ∫_0^{1−t} β(s) ds = ½s²(β_max − β_min) + s·β_min with s = 1 − t (VP and sub-VP)."""
    s = 1.0 - t
    return 0.5 * s**2 * (beta_max - beta_min) + s * beta_min


class VPPath(AbstractPath):
    """score_sde's variance-preserving SDE with linear β, time-reversed to t = 0 noise, t = 1 data.

    With s = 1 − t, β(s) = β_min + s(β_max − β_min) and Γ = ∫_0^s β = ½s²(β_max − β_min) + sβ_min:
    α_t = exp(−Γ/2), σ_t = √(1 − e^{−Γ}) (Song et al. 2021, "Score-Based Generative Modeling through SDEs").

    * At t = 0, α_0 = e^{−Γ(1)/2} ≈ 6.6e-3 for the defaults, so the N(0, I) prior is slightly off (documented).
    * At t = 1, σ = 0 and σ̇ = −αα̇/σ is infinite: ``t_eps`` = 1e-5 (score_sde's likelihood eps); samplers and
      likelihoods stop at 1 − t_eps. ``d_sigma_sq`` = −2αα̇ stays finite.
    """

    beta_min: Float[Array, ""]
    beta_max: Float[Array, ""]
    eps: float = eqx.field(static=True, default=1e-5)

    def __init__(self, beta_min: Scalar = 0.1, beta_max: Scalar = 20.0, t_eps: float = 1e-5):
        if not (isinstance(beta_min, jax.core.Tracer) or isinstance(beta_max, jax.core.Tracer)):
            if not (0 < float(beta_min) < float(beta_max)):
                raise ValueError(
                    f"VPPath needs 0 < beta_min < beta_max, got beta_min={beta_min}, "
                    f"beta_max={beta_max}"
                )
        self.beta_min = jnp.asarray(beta_min, dtype=jnp.result_type(float))
        self.beta_max = jnp.asarray(beta_max, dtype=jnp.result_type(float))
        self.eps = float(t_eps)

    @property
    def t_eps(self):
        return self.eps

    def _gamma(self, t):
        return _linear_beta_integral(self.beta_min, self.beta_max, t)

    def beta(self, t: Scalar) -> Float[Array, ""]:
        """β at papers' time s = 1 − t; also the reverse-SDE diffusion g² = σ²λ̇ of score_sde."""
        return _linear_beta(self.beta_min, self.beta_max, _as_time(t))

    def _alpha(self, t):
        return jnp.exp(-0.5 * self._gamma(t))

    def _sigma(self, t):
        return jnp.sqrt(-jnp.expm1(-self._gamma(t)))

    def _d_alpha(self, t):
        beta = self.beta_min + (1.0 - t) * (self.beta_max - self.beta_min)
        return 0.5 * beta * self._alpha(t)

    def _d_sigma(self, t):
        return -self._alpha(t) * self._d_alpha(t) / self._sigma(t)

    def _d_sigma_sq(self, t):
        return -2.0 * self._alpha(t) * self._d_alpha(t)

    def _log_snr(self, t):
        # λ = −log(e^Γ − 1)
        g = self._gamma(t)
        return -(g + jnp.log(-jnp.expm1(-g)))

    def _d_log_snr(self, t):
        g = self._gamma(t)
        beta = self.beta_min + (1.0 - t) * (self.beta_max - self.beta_min)
        # dλ/dt = β e^Γ/(e^Γ − 1) = β/(1 − e^{−Γ})
        return beta / (-jnp.expm1(-g))

    def t_from_log_snr(self, lam):
        lam = jnp.asarray(lam)
        db = self.beta_max - self.beta_min
        gamma = jax.nn.softplus(-lam)  # Γ with λ = −log(e^Γ − 1)
        s = (-self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * db * gamma)) / db
        return jnp.clip(1.0 - s, 0.0, 1.0)

    @property
    def prior(self):
        return Normal(1.0)


class VEPath(AbstractPath):
    """score_sde's variance-exploding path: α_t = 1, σ_t = σ_min·(σ_max/σ_min)^{1−t} (t = 0 noise, t = 1 data).

    The prior is N(0, σ_max² I) (mismatch with the true p_0 of order ‖x‖²/σ_max²). The data end keeps σ = σ_min,
    as in score_sde. λ_t = −2 log σ_t is finite on [0, 1].
    """

    sigma_min: Float[Array, ""]
    sigma_max: Float[Array, ""]

    def __init__(self, sigma_min: Scalar = 0.01, sigma_max: Scalar = 50.0):
        if not isinstance(sigma_min, jax.core.Tracer) and not isinstance(
            sigma_max, jax.core.Tracer
        ):
            if not (0 < float(sigma_min) < float(sigma_max)):
                raise ValueError(
                    f"VEPath needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}"
                )
        self.sigma_min = jnp.asarray(sigma_min, dtype=jnp.result_type(float))
        self.sigma_max = jnp.asarray(sigma_max, dtype=jnp.result_type(float))

    def _log_ratio(self):
        return jnp.log(self.sigma_max) - jnp.log(self.sigma_min)

    def _alpha(self, t):
        return jnp.ones_like(t)

    def _sigma(self, t):
        return self.sigma_min * jnp.exp((1.0 - t) * self._log_ratio())

    def _d_alpha(self, t):
        return jnp.zeros_like(t)

    def _d_sigma(self, t):
        return -self._sigma(t) * self._log_ratio()

    def _log_snr(self, t):
        return -2.0 * (jnp.log(self.sigma_min) + (1.0 - t) * self._log_ratio())

    def _d_log_snr(self, t):
        return 2.0 * self._log_ratio() * jnp.ones_like(t)

    def t_from_log_snr(self, lam):
        t = 1.0 - (-0.5 * jnp.asarray(lam) - jnp.log(self.sigma_min)) / self._log_ratio()
        return jnp.clip(t, 0.0, 1.0)

    @property
    def prior(self):
        return Normal(self.sigma_max)


class EDMPath(AbstractPath):
    """EDM-style path (Karras et al. 2022): α_t = 1, σ_t = (σ_max^{1/ρ} + t(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ.

    t = 0 is noise (σ = σ_max), t = 1 is data (σ = σ_min). A uniform grid in t is exactly EDM's ρ-spaced sampling
    grid (σ_min = 0.002, σ_max = 80, ρ = 7). The prior is N(0, σ_max² I).
    """

    sigma_min: Float[Array, ""]
    sigma_max: Float[Array, ""]
    rho: Float[Array, ""]

    def __init__(self, sigma_min: Scalar = 0.002, sigma_max: Scalar = 80.0, rho: Scalar = 7.0):
        if not any(isinstance(v, jax.core.Tracer) for v in (sigma_min, sigma_max, rho)):
            if not (0 < float(sigma_min) < float(sigma_max)) or float(rho) <= 0:
                raise ValueError(
                    f"EDMPath needs 0 < sigma_min < sigma_max and rho > 0, got sigma_min={sigma_min}, "
                    f"sigma_max={sigma_max}, rho={rho}"
                )
        f = jnp.result_type(float)
        self.sigma_min = jnp.asarray(sigma_min, dtype=f)
        self.sigma_max = jnp.asarray(sigma_max, dtype=f)
        self.rho = jnp.asarray(rho, dtype=f)

    def _base(self, t):
        a, b = self.sigma_max ** (1.0 / self.rho), self.sigma_min ** (1.0 / self.rho)
        return a + t * (b - a), b - a

    def _alpha(self, t):
        return jnp.ones_like(t)

    def _sigma(self, t):
        return self._base(t)[0] ** self.rho

    def _d_alpha(self, t):
        return jnp.zeros_like(t)

    def _d_sigma(self, t):
        base, slope = self._base(t)
        return self.rho * base ** (self.rho - 1.0) * slope

    def _log_snr(self, t):
        return -2.0 * self.rho * jnp.log(self._base(t)[0])

    def _d_log_snr(self, t):
        base, slope = self._base(t)
        return -2.0 * self.rho * slope / base

    def t_from_log_snr(self, lam):
        a, b = self.sigma_max ** (1.0 / self.rho), self.sigma_min ** (1.0 / self.rho)
        base = jnp.exp(-0.5 * jnp.asarray(lam) / self.rho)
        return jnp.clip((base - a) / (b - a), 0.0, 1.0)

    @property
    def prior(self):
        return Normal(self.sigma_max)


def _nudge(dtype) -> float:
    """δ = √(machine ε) of ``dtype`` (1.5e-8 in float64, 3.5e-4 in float32): how far :class:`LogSNRPath` moves
    t inward at an end where λ is infinite (see there)."""
    return float(np.sqrt(np.finfo(dtype).eps))


class LogSNRPath(AbstractPath):
    """A variance-preserving path from any increasing log-SNR function λ(t) (t = 0 noise, t = 1 data).

    α_t = √sigmoid(λ_t), σ_t = √sigmoid(−λ_t) (Kingma et al. 2021, VDM, with γ = −λ). Derivatives come from
    forward-mode autodiff of ``fn``: α̇ = ½α·sigmoid(−λ)·λ̇, σ̇ = −½σ·sigmoid(λ)·λ̇ and
    d(σ²)/dt = −sigmoid(λ)·sigmoid(−λ)·λ̇.
    ``fn`` is called as ``fn(t)`` or, if ``params`` is given, ``fn(params, t)``; ``params`` is a PyTree leaf of
    the path, so a learned schedule trains through ``grad``.

    Infinite ends. Where λ or λ̇ is infinite (λ = ±∞ at an end, e.g. λ(t) = log(t²/(1 − t²)), which is
    α = t), the products above are 0·∞; there the derivatives are taken at t moved inward by δ = √ε of the dtype
    (1.5e-8 in float64, 3.5e-4 in float32): the value returned is the derivative at t ± δ, off from the limit
    by about δ·|second derivative| (α̇(0) = 1 for α = t is exact; σ̇(0) = −δ instead of 0). Where the derivative
    itself diverges (σ̇ at σ = 0) this gives a large finite number, not ∞: such an end belongs in ``t_eps``.
    α, σ and λ themselves are exact at the ends.

    The inverse ``t_from_log_snr`` is a bisection root find (``optimistix``) to the float spacing of t, with
    implicit gradients: dt/dλ = 1/λ̇(t) and dt/dparams = −(∂λ/∂params)/λ̇(t).

    SD3's timestep shift by a factor s is ``LogSNRPath(lambda t: 2*logit(t) - 2*log(s))`` up to the VP scaling.

    At construction (with concrete values) λ is evaluated on a grid of [t_min, t_max]; a function that is not
    strictly increasing there is refused with ``ValueError``.

    Args:
        fn: the log-SNR λ(t), increasing in t.
        params: optional PyTree of parameters passed as the first argument.
        t_eps: the path's distance from both ends inside which λ may be singular; t_min = t_eps,
            t_max = 1 − t_eps (default 0).
        check: evaluate monotonicity at construction (skipped automatically under tracing).
    """

    fn: Callable = eqx.field(static=True)
    params: object = None
    eps: float = eqx.field(static=True, default=0.0)

    def __init__(self, fn: Callable, params=None, t_eps: float = 0.0, check: bool = True):
        self.fn = fn
        self.params = params
        self.eps = float(t_eps)
        if check and not any(_is_traced(leaf) for leaf in jax.tree_util.tree_leaves(params)):
            ts = jnp.linspace(self.eps, 1.0 - self.eps, 257)
            lam = jax.vmap(self._lam)(ts)
            finite = jnp.isfinite(lam)
            diffs = jnp.diff(jnp.where(finite, lam, jnp.nan))
            ok = bool(jnp.all(jnp.where(jnp.isnan(diffs), True, diffs > 0)))
            if not ok:
                i = int(jnp.argmax(jnp.where(jnp.isnan(diffs), False, diffs <= 0)))
                raise ValueError(
                    "LogSNRPath: the log-SNR function must be strictly increasing in t (t=0 noise, "
                    f"t=1 data); it decreases between t={float(ts[i]):.4f} and t={float(ts[i + 1]):.4f} "
                    f"(λ={float(lam[i]):.4g} → {float(lam[i + 1]):.4g})"
                )

    @property
    def t_eps(self):
        return self.eps

    @property
    def t_min(self):
        return self.eps

    def _lam(self, t):
        return self.fn(t) if self.params is None else self.fn(self.params, t)

    def _dlam(self, t):
        return jax.jvp(self._lam, (t,), (jnp.ones_like(t),))

    def _dlam_regular(self, t):
        """(λ, λ̇) at t, or at t moved inward by δ where λ or λ̇ is not finite (see the class docstring).

        The point is chosen first (without gradient) and λ, λ̇ evaluated once there, so no NaN from the
        infinite end reaches a gradient.
        """
        lam, dlam = jax.lax.stop_gradient(self._dlam(t))
        bad = jnp.logical_not(jnp.isfinite(lam) & jnp.isfinite(dlam))
        delta = _nudge(t.dtype)
        t_in = jnp.where(t < 0.5, t + delta, t - delta)
        return self._dlam(jnp.where(bad, t_in, t))

    def _lam_finite(self, t):
        """(λ at t where it is finite, else at t = ½; where λ(t) = ±∞).

        α = √sigmoid(λ) and σ = √sigmoid(−λ) take their limits 0 or 1 at an infinite end, whose gradient with
        respect to the schedule's parameters is 0; evaluating λ there would give 0·∞ = NaN in the chain rule
        (∂λ/∂params is infinite at that end). The end is found without gradient, λ is evaluated at a finite
        point instead, and its cotangent is masked.
        """
        raw = jax.lax.stop_gradient(self._lam(t))
        bad = jnp.logical_not(jnp.isfinite(raw))
        lam = self._lam(jnp.where(bad, jnp.asarray(0.5, t.dtype), t))
        return lam, bad, raw

    def _alpha_sigma(self, t):
        """(α, σ) from one evaluation of λ at a finite point (their limits 0/1 at an infinite end)."""
        lam, bad, raw = self._lam_finite(t)
        alpha = jnp.where(bad, (raw > 0).astype(lam.dtype), jnp.exp(0.5 * jax.nn.log_sigmoid(lam)))
        sigma = jnp.where(bad, (raw < 0).astype(lam.dtype), jnp.exp(0.5 * jax.nn.log_sigmoid(-lam)))
        return alpha, sigma

    def _alpha(self, t):
        return self._alpha_sigma(t)[0]

    def _sigma(self, t):
        return self._alpha_sigma(t)[1]

    @staticmethod
    def _d_alpha_from(lam, dlam):
        # d/dt √sigmoid(λ) = ½ √sigmoid(λ) · sigmoid(−λ) · λ̇
        return 0.5 * jnp.exp(0.5 * jax.nn.log_sigmoid(lam)) * jax.nn.sigmoid(-lam) * dlam

    @staticmethod
    def _d_sigma_from(lam, dlam):
        return -0.5 * jnp.exp(0.5 * jax.nn.log_sigmoid(-lam)) * jax.nn.sigmoid(lam) * dlam

    def _d_alpha(self, t):
        return self._d_alpha_from(*self._dlam_regular(t))

    def _d_sigma(self, t):
        return self._d_sigma_from(*self._dlam_regular(t))

    def _d_sigma_sq(self, t):
        lam, dlam = self._dlam_regular(t)
        return -jax.nn.sigmoid(lam) * jax.nn.sigmoid(-lam) * dlam

    def _coefficients(self, t):
        # inside every solver step: λ once for (α, σ), one JVP pair for the derivatives
        lam_r, dlam_r = self._dlam_regular(t)
        alpha, sigma = self._alpha_sigma(t)
        return alpha, sigma, self._d_alpha_from(lam_r, dlam_r), self._d_sigma_from(lam_r, dlam_r)

    def _log_snr(self, t):
        return self._lam(t)

    def _d_log_snr(self, t):
        return self._dlam(t)[1]

    def t_from_log_snr(self, lam):
        """The t in [t_min, t_max] with λ(t) = lam (clipped to the ends outside the path's λ range).

        Bisection to the float spacing of t with implicit gradients (dt/dλ = 1/λ̇, dt/dparams =
        −(∂λ/∂params)/λ̇); works under jit, vmap and grad.
        """
        lam = jnp.asarray(lam, dtype=jnp.result_type(lam, float))
        return _monotone_inverse(self._lam, lam, float(self.t_min), float(self.t_max))

    @property
    def prior(self):
        return Normal(1.0)


# ---------------------------------------------------------------------------------------------------------------
# General affine paths (issue 14): not variance-preserving, closed-form λ and inverse. t = 0 noise, t = 1 data.
# ---------------------------------------------------------------------------------------------------------------
def _concrete(*values) -> bool:
    """Whether every value is concrete (not traced): constructors validate concrete parameters only."""
    return not any(_is_traced(leaf) for v in values for leaf in jax.tree_util.tree_leaves(v))


class PolynomialPath(AbstractPath):
    """flow_matching's polynomial convex schedule: α_t = tⁿ, σ_t = 1 − tⁿ (t = 0 noise, t = 1 data).

    Meta ``flow_matching``'s ``PolynomialConvexScheduler(n)`` (α + σ = 1; Lipman et al. 2024, "Flow Matching
    Guide and Code" §4.8); n = 1 is :class:`LinearPath`. α̇ = n·tⁿ⁻¹, σ̇ = −n·tⁿ⁻¹,
    λ_t = 2(n·log t − log(1 − tⁿ)), λ̇ = 2n/(t(1 − tⁿ)), and the exact inverse tⁿ = sigmoid(λ/2), i.e.
    t = exp(log sigmoid(λ/2)/n). The prior N(0, I) is exact (α_0 = 0, σ_0 = 1).

    The noise end: for 0 < n < 1, α̇ = n·tⁿ⁻¹ is infinite at t = 0; for n > 1, α̇ = σ̇ = 0 there, so the velocity
    vanishes and the linear-path time τ = α/(α + σ) = tⁿ of ``log_likelihood`` (``time="linear"``, the default)
    has dτ/dt = 0: its field is 0/0 at τ = 0. ``t_min`` = ``t_eps`` = 1e-5 by default for n ≠ 1 (α(t_min) ≤ 1e-5ⁿ,
    a prior error far below solver tolerances) and 0 for n = 1. The data end is regular for every n > 0, so
    ``t_max`` = 1. (:class:`~diffjax.interpolants.StochasticInterpolant` integrates over [0, 1] in t itself, where
    n ≥ 1 is regular.)

    Args:
        exponent: n > 0 (a leaf: it can be trained or vmapped; checked at construction when concrete).
        t_eps: the distance from the noise end to start at (default: 0 for n = 1, else 1e-5).

    Raises:
        ValueError: n ≤ 0, not finite, or t_eps outside [0, 0.5).
    """

    exponent: Float[Array, ""]
    eps: float = eqx.field(static=True, default=0.0)

    def __init__(self, exponent: Scalar = 2.0, t_eps: float | None = None):
        default_eps = 1e-5
        if _concrete(exponent):
            n = float(np.asarray(exponent))
            if not (math.isfinite(n) and n > 0):
                raise ValueError(
                    f"PolynomialPath: exponent must be a finite number > 0 (α_t = t^n, σ_t = 1 − t^n; n = 1 is "
                    f"LinearPath), got exponent={exponent!r}"
                )
            default_eps = 0.0 if n == 1.0 else 1e-5
        if t_eps is None:
            t_eps = default_eps
        if not 0.0 <= float(t_eps) < 0.5:
            raise ValueError(f"PolynomialPath: t_eps must lie in [0, 0.5), got t_eps={t_eps!r}")
        self.exponent = jnp.asarray(exponent, dtype=jnp.result_type(float))
        self.eps = float(t_eps)

    @property
    def t_eps(self):
        return self.eps

    @property
    def t_min(self):
        return self.eps

    @property
    def t_max(self):
        return 1.0

    def _alpha(self, t):
        return t**self.exponent

    def _sigma(self, t):
        return 1.0 - t**self.exponent

    def _d_alpha(self, t):
        return self.exponent * t ** (self.exponent - 1.0)

    def _d_sigma(self, t):
        return -self._d_alpha(t)

    def _log_snr(self, t):
        return 2.0 * (self.exponent * jnp.log(t) - jnp.log1p(-(t**self.exponent)))

    def _d_log_snr(self, t):
        return 2.0 * self.exponent / (t * (1.0 - t**self.exponent))

    def t_from_log_snr(self, lam):
        lam = jnp.asarray(lam, dtype=jnp.result_type(lam, float))
        return jnp.exp(jax.nn.log_sigmoid(0.5 * lam) / self.exponent)

    @property
    def prior(self):
        return Normal(1.0)


class SigmaMinPath(AbstractPath):
    """Lipman et al.'s σ_min path ("OT path"): α_t = t, σ_t = 1 − (1 − σ_min)·t (t = 0 noise, t = 1 data).

    Lipman et al. 2023, "Flow Matching for Generative Modeling", eq. 20 (their time runs the same way: t = 1 is
    data). σ_min = 0 is :class:`LinearPath`; with σ_min > 0 the data end keeps σ_1 = σ_min, so samplers and
    likelihoods describe the data smoothed by N(0, σ_min² I) (``log_likelihood`` reports σ_1/α_1 = σ_min).
    With k = 1 − σ_min: α̇ = 1, σ̇ = −k, λ_t = 2(log t − log σ_t), λ̇ = 2/(t·σ_t) (since σ + k·t = 1) and the
    exact inverse t = 1/(e^{−λ/2} + k), clipped to [0, 1]. The prior N(0, I) is exact.

    Args:
        sigma_min: σ_min ∈ [0, 1) (a leaf; checked at construction when concrete).

    Raises:
        ValueError: σ_min outside [0, 1) (at σ_min = 1 the path never leaves the noise: λ is not increasing).
    """

    sigma_min: Float[Array, ""]

    def __init__(self, sigma_min: Scalar = 1e-4):
        if _concrete(sigma_min):
            v = float(np.asarray(sigma_min))
            if not 0.0 <= v < 1.0:
                raise ValueError(
                    f"SigmaMinPath: sigma_min must lie in [0, 1) (σ_t = 1 − (1 − σ_min)·t must fall from 1 for "
                    f"λ_t to increase; 0 is LinearPath), got sigma_min={sigma_min!r}"
                )
        self.sigma_min = jnp.asarray(sigma_min, dtype=jnp.result_type(float))

    def _alpha(self, t):
        return t

    def _sigma(self, t):
        return 1.0 - (1.0 - self.sigma_min) * t

    def _d_alpha(self, t):
        return jnp.ones_like(t)

    def _d_sigma(self, t):
        return -(1.0 - self.sigma_min) * jnp.ones_like(t)

    def _log_snr(self, t):
        return 2.0 * (jnp.log(t) - jnp.log(self._sigma(t)))

    def _d_log_snr(self, t):
        return 2.0 / (t * self._sigma(t))

    def t_from_log_snr(self, lam):
        lam = jnp.asarray(lam, dtype=jnp.result_type(lam, float))
        return jnp.clip(1.0 / (jnp.exp(-0.5 * lam) + (1.0 - self.sigma_min)), 0.0, 1.0)

    @property
    def prior(self):
        return Normal(1.0)


class ICFMPath(AbstractPath):
    """I-CFM's path with constant σ > 0 as a Gaussian path: α_t = t, σ_t = √((1 − t)² + σ²) (t = 0 noise,
    t = 1 data).

    Tong et al. 2024 ("Improving and generalizing flow-based generative models with minibatch optimal transport"),
    torchcfm's ``ConditionalFlowMatcher(sigma)``: x_t = t·x₁ + (1 − t)·x₀ + σ·z with x₀, z ~ N(0, I) independent.
    Given the data point x₁, (1 − t)x₀ + σz ~ N(0, ((1 − t)² + σ²) I), so x_t = α_t x₁ + σ_t ε with the α, σ
    above: the same marginals p_t, hence the same marginal velocity. I-CFM's conditional target x₁ − x₀ differs
    from this path's α̇x₁ + σ̇ε = x₁ − (1 − t)ε/σ_t, but both have the regression minimiser
    E[x₁ − x₀ | x_t] = E[x₁ + σ̇ε | x_t] (E[x₀ | x_t, x₁] = ((1 − t)/σ_t²)·(x_t − t·x₁)).

    σ̇ = −(1 − t)/σ_t, d(σ²)/dt = −2(1 − t), λ_t = 2 log t − log((1 − t)² + σ²), λ̇ = 2/t + 2(1 − t)/σ_t² > 0, and
    with q = e^{λ/2} (clipped to q ≤ 1/σ, the data end) the exact inverse is the positive root of
    (1 − q²)t² + 2q²t − q²(1 + σ²) = 0:  t = q(1 + σ²)/(q + √(1 + σ² − σ²q²)).

    Both ends are regular; σ_1 = σ, so the data end is the data smoothed by N(0, σ² I), and the noise end is
    x_0 ~ N(0, (1 + σ²) I): the prior is ``Normal(√(1 + σ²))`` (exact).

    Raises:
        ValueError: σ ≤ 0 or not finite (σ = 0 is :class:`LinearPath`).
    """

    sigma_const: Float[Array, ""]

    def __init__(self, sigma: Scalar = 0.1):
        if _concrete(sigma):
            v = float(np.asarray(sigma))
            if not (math.isfinite(v) and v > 0):
                raise ValueError(
                    f"ICFMPath: sigma must be a finite number > 0 (σ = 0 is LinearPath), got sigma={sigma!r}"
                )
        self.sigma_const = jnp.asarray(sigma, dtype=jnp.result_type(float))

    def _alpha(self, t):
        return t

    def _sigma(self, t):
        return jnp.sqrt(jnp.square(1.0 - t) + jnp.square(self.sigma_const))

    def _d_alpha(self, t):
        return jnp.ones_like(t)

    def _d_sigma(self, t):
        return -(1.0 - t) / self._sigma(t)

    def _d_sigma_sq(self, t):
        return -2.0 * (1.0 - t)

    def _log_snr(self, t):
        return 2.0 * jnp.log(t) - jnp.log(jnp.square(1.0 - t) + jnp.square(self.sigma_const))

    def _d_log_snr(self, t):
        return 2.0 / t + 2.0 * (1.0 - t) / (jnp.square(1.0 - t) + jnp.square(self.sigma_const))

    def t_from_log_snr(self, lam):
        lam = jnp.asarray(lam, dtype=jnp.result_type(lam, float))
        s2 = jnp.square(self.sigma_const)
        # q = e^{λ/2} ≤ 1/σ (λ ≤ λ_1 = −2 log σ): beyond the data end the root would not exist
        q = jnp.exp(0.5 * jnp.minimum(lam, -2.0 * jnp.log(self.sigma_const)))
        disc = jnp.maximum(1.0 + s2 - s2 * q * q, 0.0)
        return jnp.clip(q * (1.0 + s2) / (q + jnp.sqrt(disc)), 0.0, 1.0)

    @property
    def prior(self):
        return Normal(jnp.sqrt(1.0 + jnp.square(self.sigma_const)))


class SubVPPath(AbstractPath):
    """score_sde's sub-VP SDE with linear β, time-reversed to t = 0 noise, t = 1 data.

    With s = 1 − t and Γ = ½s²(β_max − β_min) + sβ_min as in :class:`VPPath`: α_t = e^{−Γ/2} (as VP) and
    σ_t = 1 − e^{−Γ} (a standard deviation, not a variance: score_sde ``subVPSDE.marginal_prob``; Song et al.
    2021, eq. 29; formulas-detailed.md §1.4). α² + σ² < 1 inside (0, 1): not variance preserving.

    α̇ = ½βα, σ̇ = −β·e^{−Γ} (finite at t = 1, unlike VP: σ̇_1 = −β_min), λ_t = −Γ − 2 log(1 − e^{−Γ}),
    λ̇ = β(1 + e^{−Γ})/(1 − e^{−Γ}), and the reverse SDE's g² = σ²λ̇ = β(1 − e^{−2Γ}) is score_sde's sub-VP
    diffusion. Exact inverse: with r = e^λ, y = e^{−Γ} is the root in (0, 1) of r(1 − y)² = y, so
    Γ = log(1 + m²/2 + m√(1 + m²/4)), m = e^{−λ/2}, and t = 1 − s(Γ) as for VP.

    The ends: α_0 = e^{−Γ(1)/2} ≈ 6.6e-3 for the defaults, so the N(0, I) prior is slightly off (as VP). The
    data end is regular (σ_1 = 0, σ̇_1 finite); only λ̇ is infinite there. ``t_eps`` (default 0; score_sde's
    likelihood uses 1e-5) moves the data end of the default interval.

    Raises:
        ValueError: not 0 < β_min < β_max, or t_eps outside [0, 0.5).
    """

    beta_min: Float[Array, ""]
    beta_max: Float[Array, ""]
    eps: float = eqx.field(static=True, default=0.0)

    def __init__(self, beta_min: Scalar = 0.1, beta_max: Scalar = 20.0, t_eps: float = 0.0):
        if _concrete(beta_min, beta_max):
            if not (0 < float(beta_min) < float(beta_max)):
                raise ValueError(
                    f"SubVPPath needs 0 < beta_min < beta_max, got beta_min={beta_min}, beta_max={beta_max}"
                )
        if not 0.0 <= float(t_eps) < 0.5:
            raise ValueError(f"SubVPPath: t_eps must lie in [0, 0.5), got t_eps={t_eps!r}")
        self.beta_min = jnp.asarray(beta_min, dtype=jnp.result_type(float))
        self.beta_max = jnp.asarray(beta_max, dtype=jnp.result_type(float))
        self.eps = float(t_eps)

    @property
    def t_eps(self):
        return self.eps

    def _gamma(self, t):
        return _linear_beta_integral(self.beta_min, self.beta_max, t)

    def _beta(self, t):
        return _linear_beta(self.beta_min, self.beta_max, t)

    def beta(self, t: Scalar) -> Float[Array, ""]:
        """β at papers' time s = 1 − t (t = 0 noise, t = 1 data)."""
        return self._beta(_as_time(t))

    def _alpha(self, t):
        return jnp.exp(-0.5 * self._gamma(t))

    def _sigma(self, t):
        return -jnp.expm1(-self._gamma(t))

    def _d_alpha(self, t):
        return 0.5 * self._beta(t) * self._alpha(t)

    def _d_sigma(self, t):
        return -self._beta(t) * jnp.exp(-self._gamma(t))

    def _log_snr(self, t):
        g = self._gamma(t)
        return -g - 2.0 * jnp.log(-jnp.expm1(-g))

    def _d_log_snr(self, t):
        g = self._gamma(t)
        return self._beta(t) * (1.0 + jnp.exp(-g)) / (-jnp.expm1(-g))

    def t_from_log_snr(self, lam):
        lam = jnp.asarray(lam, dtype=jnp.result_type(lam, float))
        # m = e^{−λ/2}; λ below −80 is far below λ(0) for any sensible β (clipped to t = 0 anyway): no overflow
        m = jnp.exp(-0.5 * jnp.maximum(lam, -80.0))
        gamma = jnp.log1p(0.5 * m * m + m * jnp.sqrt(1.0 + 0.25 * m * m))
        db = self.beta_max - self.beta_min
        s = (-self.beta_min + jnp.sqrt(self.beta_min**2 + 2.0 * db * gamma)) / db
        return jnp.clip(1.0 - s, 0.0, 1.0)

    @property
    def prior(self):
        return Normal(1.0)


class AffinePath(AbstractPath):
    """Any affine Gaussian path from two functions: x_t = α(t)·x + σ(t)·ε (t = 0 noise, t = 1 data).

    The general (α_t, σ_t) pair of flow matching's ``AffineProbPath`` (Lipman et al. 2024, "Flow Matching Guide and
    Code" §4.8), not only variance-preserving ones. ``alpha`` and ``sigma`` are called as ``alpha(t)`` or, if
    ``params`` is given, ``alpha(params, t)`` (the same for ``sigma``); ``params`` is a PyTree leaf of the path, so
    a learned pair trains through ``grad``. Derivatives are forward-mode JVPs of the two functions, λ_t =
    2(log α − log σ) and λ̇ = 2(α̇/α − σ̇/σ), and ``t_from_log_snr`` is a bisection root find (``optimistix``) to
    the float spacing of t with implicit gradients (dt/dλ = 1/λ̇, dt/dparams = −(∂λ/∂params)/λ̇), as
    :class:`LogSNRPath`. Prefer a closed-form class where there is one (:class:`PolynomialPath`,
    :class:`SigmaMinPath`, :class:`ICFMPath`, :class:`SubVPPath`).

    ``d_sigma_sq`` is 2σσ̇ (an end where σ̇ is infinite, such as σ = √(1 − t²) at t = 1, belongs in ``t_eps``).
    The prior is N(0, σ(t_min)² I), exact where α(t_min) = 0.

    At construction (with concrete parameters) α, σ and λ are evaluated on a grid of [t_min, t_max]: α or σ that
    is negative or NaN, or a λ that is not strictly increasing, is refused with ``ValueError``.

    Args:
        alpha, sigma: the data and noise coefficients α(t), σ(t) on [0, 1].
        params: optional PyTree of parameters passed as their first argument.
        t_eps: distance from both ends inside which the pair may be singular; t_min = t_eps, t_max = 1 − t_eps.
        check: run the construction check (skipped automatically under tracing).
    """

    alpha_fn: Callable = eqx.field(static=True)
    sigma_fn: Callable = eqx.field(static=True)
    params: object = None
    eps: float = eqx.field(static=True, default=0.0)

    def __init__(
        self, alpha: Callable, sigma: Callable, params=None, t_eps: float = 0.0, check: bool = True
    ):
        if not (callable(alpha) and callable(sigma)):
            raise ValueError(
                f"AffinePath: alpha and sigma must be functions of t (or of (params, t)), got "
                f"{type(alpha).__name__} and {type(sigma).__name__}"
            )
        if not 0.0 <= float(t_eps) < 0.5:
            raise ValueError(f"AffinePath: t_eps must lie in [0, 0.5), got t_eps={t_eps!r}")
        self.alpha_fn, self.sigma_fn, self.params, self.eps = alpha, sigma, params, float(t_eps)
        if check and _concrete(params):
            self._check_pair()

    def _check_pair(self):
        ts = np.linspace(self.eps, 1.0 - self.eps, 257)
        tj = jnp.asarray(ts, jnp.result_type(float))
        a, s = (np.asarray(jax.vmap(f)(tj)) for f in (self._alpha, self._sigma))
        for name, v in (("alpha", a), ("sigma", s)):
            bad = np.logical_not(v >= 0)  # negative or NaN
            if bad.any():
                i = int(np.argmax(bad))
                raise ValueError(
                    f"AffinePath: {name}(t) must be >= 0 on [t_min, t_max] (t=0 noise, t=1 data); "
                    f"{name}({ts[i]:.4f}) = {v[i]!r}"
                )
        with np.errstate(divide="ignore", invalid="ignore"):
            lam = 2.0 * (np.log(a) - np.log(s))
        if np.any(np.isnan(lam)):
            i = int(np.argmax(np.isnan(lam)))
            raise ValueError(
                f"AffinePath: alpha and sigma are both 0 at t={ts[i]:.4f}: the log-SNR is undefined there"
            )
        diffs = np.diff(lam)
        bad = (
            np.logical_not(diffs > 0) & np.isfinite(lam[1:])
            | (lam[1:] == -np.inf)
            | (lam[:-1] == np.inf)
        )
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                "AffinePath: the log-SNR λ = log(α²/σ²) must be strictly increasing in t (t=0 noise, t=1 data); "
                f"it does not increase between t={ts[i]:.4f} and t={ts[i + 1]:.4f} "
                f"(λ={lam[i]:.4g} → {lam[i + 1]:.4g}): make α/σ increasing"
            )

    @property
    def t_eps(self):
        return self.eps

    @property
    def t_min(self):
        return self.eps

    def _call(self, fn, t):
        return fn(t) if self.params is None else fn(self.params, t)

    def _alpha(self, t):
        return self._call(self.alpha_fn, t)

    def _sigma(self, t):
        return self._call(self.sigma_fn, t)

    def _jvp(self, fn, t):
        return jax.jvp(lambda t: self._call(fn, t), (t,), (jnp.ones_like(t),))

    def _d_alpha(self, t):
        return self._jvp(self.alpha_fn, t)[1]

    def _d_sigma(self, t):
        return self._jvp(self.sigma_fn, t)[1]

    def _coefficients(self, t):
        a, da = self._jvp(self.alpha_fn, t)
        s, ds = self._jvp(self.sigma_fn, t)
        return a, s, da, ds

    def _d_log_snr(self, t):
        a, s, da, ds = self._coefficients(t)
        return 2.0 * (da / a - ds / s)

    def t_from_log_snr(self, lam):
        """The t in [t_min, t_max] with λ(t) = lam (clipped to the ends outside the path's λ range).

        Bisection to the float spacing of t with implicit gradients; works under jit, vmap and grad.
        """
        lam = jnp.asarray(lam, dtype=jnp.result_type(lam, float))
        return _monotone_inverse(self._log_snr, lam, float(self.t_min), float(self.t_max))

    @property
    def prior(self):
        return Normal(self._sigma(jnp.asarray(float(self.t_min), jnp.result_type(float))))
