"""Gaussian probability paths x_t = α_t·x + σ_t·ε.

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
* ``t_eps``: the documented distance from an endpoint below which the path's derivatives are singular
  (0 for paths that are regular on all of [0, 1]). Samplers and likelihoods integrate over
  ``[t_min, t_max]`` = ``[0, 1 − t_eps]`` by default.

Values of t outside [0, 1] raise a runtime error (``equinox.error_if``), also under ``jit``.
"""

from __future__ import annotations

import abc
import contextlib
import math
import threading
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

__all__ = [
    "AbstractPath",
    "LinearPath",
    "CosinePath",
    "VPPath",
    "VEPath",
    "EDMPath",
    "LogSNRPath",
    "Normal",
    "check_time",
    "trusted_time",
]

Scalar = Float[ArrayLike, ""]


_TRUST = threading.local()


@contextlib.contextmanager
def trusted_time():
    """Trace-time scope in which :func:`check_time` adds no runtime check.

    For library code whose times lie in [0, 1] by construction (e.g. ``losses.loss`` draws t from a sampler
    and clips it): the runtime check is an ``equinox.error_if`` host callback that costs ~15% of a small
    training step on CPU and keeps XLA's persistent compilation cache from storing the program. Shape checks
    still run. The scope only affects code traced inside it, on this thread.
    """
    depth = getattr(_TRUST, "depth", 0)
    _TRUST.depth = depth + 1
    try:
        yield
    finally:
        _TRUST.depth = depth


def check_time(t: Scalar, lo: float = 0.0, hi: float = 1.0) -> Float[Array, ""]:
    """Return ``t`` as a float array, raising (also under ``jit``) if it lies outside ``[lo, hi]``.

    diffjax's time runs from t = 0 (noise) to t = 1 (data). Inside :func:`trusted_time` the value check is
    skipped (times produced by the library itself).
    """
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    if t.shape != ():
        raise ValueError(
            f"t must be a scalar (per-example functions take one time; use jax.vmap for batches), "
            f"got shape {t.shape}"
        )
    if getattr(_TRUST, "depth", 0):
        return t
    is_nan = jnp.isnan(t)
    bad = jnp.logical_not((t >= lo) & (t <= hi))  # NaN is bad too
    return eqx.branched_error_if(
        t,
        bad,
        jnp.where(is_nan, 0, 1),
        (
            "diffjax: t is NaN. Inside a solver this usually means the field returned NaN/inf and the step "
            "size became NaN: a data-prediction converted to a velocity divides by sigma (singular at t = 1 "
            "on the linear and cosine paths), an eps/score-prediction by alpha (singular at t = 0); integrate "
            "over diffjax.integration_interval(path, kind)",
            f"diffjax: t must lie in [{lo}, {hi}] (t=0 is noise, t=1 is data)",
        ),
    )


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
    Public methods check that t lies in [0, 1].
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
        """Distance from t = 1 below which this path's derivatives are singular (0: regular on [0, 1])."""
        return 0.0

    @property
    def t_min(self) -> float:
        """Default start of integration (noise end)."""
        return 0.0

    @property
    def t_max(self) -> float:
        """Default end of integration (data end): 1 − t_eps."""
        return 1.0 - self.t_eps

    # Public API: checked time.
    def alpha(self, t: Scalar) -> Float[Array, ""]:
        """α_t, the data coefficient (t = 0 noise, t = 1 data)."""
        return self._alpha(check_time(t))

    def sigma(self, t: Scalar) -> Float[Array, ""]:
        """σ_t, the noise coefficient (t = 0 noise, t = 1 data)."""
        return self._sigma(check_time(t))

    def d_alpha(self, t: Scalar) -> Float[Array, ""]:
        """dα/dt."""
        return self._d_alpha(check_time(t))

    def d_sigma(self, t: Scalar) -> Float[Array, ""]:
        """dσ/dt."""
        return self._d_sigma(check_time(t))

    def sigma_sq(self, t: Scalar) -> Float[Array, ""]:
        """σ_t²."""
        return jnp.square(self._sigma(check_time(t)))

    def d_sigma_sq(self, t: Scalar) -> Float[Array, ""]:
        """d(σ²)/dt = 2σσ̇, written so that it stays finite where σ̇ is not (VP paths at t = 1)."""
        return self._d_sigma_sq(check_time(t))

    def _d_sigma_sq(self, t):
        return 2.0 * self._sigma(t) * self._d_sigma(t)

    def log_snr(self, t: Scalar) -> Float[Array, ""]:
        """λ_t = log(α_t²/σ_t²), increasing in t (−∞ at pure noise, +∞ at clean data where σ = 0)."""
        return self._log_snr(check_time(t))

    def _log_snr(self, t):
        return 2.0 * (jnp.log(self._alpha(t)) - jnp.log(self._sigma(t)))

    def d_log_snr(self, t: Scalar) -> Float[Array, ""]:
        """dλ/dt = 2(α̇/α − σ̇/σ) > 0."""
        return self._d_log_snr(check_time(t))

    def _d_log_snr(self, t):
        return 2.0 * (self._d_alpha(t) / self._alpha(t) - self._d_sigma(t) / self._sigma(t))

    def coefficients(self, t: Scalar):
        """(α, σ, α̇, σ̇) at one checked time."""
        t = check_time(t)
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
        s = 1.0 - t
        return 0.5 * s**2 * (self.beta_max - self.beta_min) + s * self.beta_min

    def beta(self, t: Scalar) -> Float[Array, ""]:
        """β at papers' time s = 1 − t; also the reverse-SDE diffusion g² = σ²λ̇ of score_sde."""
        return self.beta_min + (1.0 - check_time(t)) * (self.beta_max - self.beta_min)

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


class LogSNRPath(AbstractPath):
    """A variance-preserving path from any increasing log-SNR function λ(t) (t = 0 noise, t = 1 data).

    α_t = √sigmoid(λ_t), σ_t = √sigmoid(−λ_t) (Kingma et al. 2021, VDM, with γ = −λ). Derivatives come from
    forward-mode autodiff of ``fn``; the inverse ``t_from_log_snr`` is bisection (60 halvings), exact to float
    precision. ``fn`` is called as ``fn(t)`` or, if ``params`` is given, ``fn(params, t)``; ``params`` is a
    PyTree leaf of the path, so a learned schedule trains through ``grad``.

    SD3's timestep shift by a factor s is ``LogSNRPath(lambda t: 2*logit(t) - 2*log(s))`` up to the VP scaling.

    At construction (with concrete values) λ is evaluated on a grid of [t_min, t_max]; a function that is not
    strictly increasing there is refused with ``ValueError``.

    Args:
        fn: the log-SNR λ(t), increasing in t.
        params: optional PyTree of parameters passed as the first argument.
        t_eps: distance from both ends where λ may be infinite; integration uses [t_eps, 1 − t_eps].
        check: evaluate monotonicity at construction (skipped automatically under tracing).
    """

    fn: Callable = eqx.field(static=True)
    params: object = None
    eps: float = eqx.field(static=True, default=0.0)

    def __init__(self, fn: Callable, params=None, t_eps: float = 0.0, check: bool = True):
        self.fn = fn
        self.params = params
        self.eps = float(t_eps)
        if check and not any(
            isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(params)
        ):
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

    def _alpha(self, t):
        return jnp.exp(0.5 * jax.nn.log_sigmoid(self._lam(t)))

    def _sigma(self, t):
        return jnp.exp(0.5 * jax.nn.log_sigmoid(-self._lam(t)))

    def _d_alpha(self, t):
        lam, dlam = self._dlam(t)
        # d/dt √sigmoid(λ) = ½ √sigmoid(λ) · sigmoid(−λ) · λ̇
        return 0.5 * self._alpha(t) * jax.nn.sigmoid(-lam) * dlam

    def _d_sigma(self, t):
        lam, dlam = self._dlam(t)
        return -0.5 * self._sigma(t) * jax.nn.sigmoid(lam) * dlam

    def _d_sigma_sq(self, t):
        lam, dlam = self._dlam(t)
        return -jax.nn.sigmoid(lam) * jax.nn.sigmoid(-lam) * dlam

    def _log_snr(self, t):
        return self._lam(t)

    def _d_log_snr(self, t):
        return self._dlam(t)[1]

    def t_from_log_snr(self, lam):
        lam = jnp.asarray(lam, dtype=jnp.result_type(float))
        lo0 = jnp.asarray(self.t_min, lam.dtype)
        hi0 = jnp.asarray(1.0 - self.eps, lam.dtype)

        def body(_, carry):
            lo, hi = carry
            mid = 0.5 * (lo + hi)
            up = self._lam(mid) < lam
            return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 60, body, (lo0, hi0))
        return 0.5 * (lo + hi)

    @property
    def prior(self):
        return Normal(1.0)
