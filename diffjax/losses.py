"""Weighted diffusion and flow-matching objectives as (prediction, weighting, time sampler) triples.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε, λ_t = log(α_t²/σ_t²) increases in t.
Papers with data at time 0 (VDM, Kingma & Gao, SD3) map by s = 1 − t; SD3's time is written τ = 1 − t here.

Kingma & Gao 2023 ("Understanding Diffusion Objectives", arXiv:2303.00848) show that every objective of the form

    L(x) = E_{t~π, ε}[ c(t)·‖ŷ − y‖² ]        (network output converted to a kind ``space``, target y of that kind)

equals, per sample, an ε-MSE with a weighting over log-SNR:

    c(t)·‖ŷ − y‖² = c(t)·κ_t²·‖ε̂ − ε‖² = ½·(w(λ_t)/p(λ_t))·‖ε̂ − ε‖²,
    w(λ) = 2·c(t)·π(t)·κ_t²/λ̇_t at t = t(λ),   p(λ) = π(t)/λ̇_t  (the density of λ_t when t ~ π),

with κ_t² = ``targets.error_scale_sq(space, path, t)``. So E[L] = ½∫ w(λ)·E‖ε̂ − ε‖² dλ: w(λ) is what the objective
*is*, the path and the time sampler only choose where it is Monte Carlo sampled (formulas-detailed.md §2).

Building blocks (all ``equinox.Module``; strings are static fields, numbers are leaves; jit/vmap/grad-able):

* time samplers π(t): :class:`Uniform`, :class:`LogitNormal`, :class:`ModeSampler`, :class:`CosMap`,
  :class:`LogSNRNormal`, :class:`Shifted`; each has ``sample``, ``density``, an exact ``cdf`` and its exact inverse
  ``icdf`` (so batches can be stratified in t and the sampler truncated exactly);
* per-sample loss factors c(t): :class:`ConstantWeight`, :class:`EDMWeight`, :class:`MinSNR`,
  :class:`LogSNRRate` (VDM's ½λ̇), :class:`KingmaGaoWeight` (realises any λ-weighting w);
* λ-weightings w(λ): :class:`ELBOWeighting`, :class:`SigmoidWeighting`, :class:`ExpWeighting`,
  :class:`EDMWeighting`, :class:`LogitNormalWeighting`, :class:`CosineEpsWeighting`;
* :class:`Objective` with :func:`loss` / :func:`loss_at` / :func:`batch_loss`, :func:`weighted_objective`,
  the published presets (:func:`ddpm`, :func:`vdm`, :func:`v_prediction`, :func:`flow_matching`,
  :func:`score_matching`, :func:`edm`, :func:`sd3`, :func:`sigmoid`, :func:`min_snr`) written in their native form,
  and :func:`implied_weighting`, which recovers w(λ) and p(λ) of any objective;
* couplings (:mod:`diffjax.couplings`): ``batch_loss(..., coupling=MinibatchOT())`` re-pairs the batch's noises
  with its data points (minibatch OT, the Schrödinger bridge) before the per-example losses.

Prediction kinds are the modules of :mod:`diffjax.kinds`; an :class:`Objective` converts the names ``"eps"``,
``"data"``, ``"v"``, ``"velocity"``, ``"score"`` once, at construction (``objective.prediction.name`` is the string).

Endpoints: truncation, not clipping. Times are drawn from π *truncated* to [lo, hi] = ``objective.t_range``
= [max(path.t_min, margin), min(path.t_max, 1 − margin)], with the objective's ``margin`` (default 1e-5), because
c(t), κ_t² or the conversion between kinds is singular at t = 0 (α = 0) or t = 1 (σ = 0) for many triples (e.g.
λ̇ = ∞ at both ends of the linear path). With F the sampler's exact CDF and Z = F(hi) − F(lo) (``objective.mass()``):

    t = F⁻¹(F(lo) + u·Z),  u ~ U(0, 1),    and each example's loss is multiplied by Z,

so that E[loss] = ∫_lo^hi π(t)·c(t)·E‖ŷ − y‖² dt = ½∫_{λ(lo)}^{λ(hi)} w(λ)·E‖ε̂ − ε‖² dλ exactly, with the same
implied w(λ) as the untruncated objective, restricted to the λ range [λ(lo), λ(hi)]. (Clipping t into [lo, hi]
instead would put the mass F(lo) and 1 − F(hi) on the two end points, where c can be of order 1/margin: for the
VDM loss that adds about D, the data dimension, to the expectation.) No time is checked inside a training step:
the library's own times lie in [lo, hi] by construction, so ``loss`` and ``batch_loss`` add no host callback; the
public functions that take a user's t (``loss_at``, ``density``, ``cdf``, ``Objective.weight``) validate it once.
"""

from __future__ import annotations

import abc
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from .conditioning import AbstractConditionDropout, Conditioned
from .kinds import AbstractKind, as_kind
from .paths import (
    AbstractPath,
    CosinePath,
    EDMPath,
    LinearPath,
    VPPath,
    _monotone_inverse,
    check_time,
)
from .targets import convert_at

__all__ = [
    "conditional_batch_loss",
    "per_dimension",
    "AbstractTimeSampler",
    "Uniform",
    "LogitNormal",
    "ModeSampler",
    "CosMap",
    "LogSNRNormal",
    "Shifted",
    "AbstractLossWeight",
    "ConstantWeight",
    "EDMWeight",
    "MinSNR",
    "LogSNRRate",
    "KingmaGaoWeight",
    "AbstractWeighting",
    "ELBOWeighting",
    "SigmoidWeighting",
    "ExpWeighting",
    "EDMWeighting",
    "LogitNormalWeighting",
    "CosineEpsWeighting",
    "Objective",
    "draw",
    "loss_at",
    "loss",
    "batch_loss",
    "weighted_objective",
    "ImpliedWeighting",
    "implied_weighting",
    "ddpm",
    "vdm",
    "v_prediction",
    "flow_matching",
    "score_matching",
    "edm",
    "sd3",
    "sigmoid",
    "min_snr",
]

Scalar = Float[ArrayLike, ""]

MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)


def _float(v) -> Array:
    return jnp.asarray(v, dtype=jnp.result_type(float))


def _is_concrete(*vals) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in vals)


def _normal_pdf(z):
    return jnp.exp(-0.5 * jnp.square(z)) / math.sqrt(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------------------------
# Time samplers
# ---------------------------------------------------------------------------------------------------------------


class AbstractTimeSampler(eqx.Module):
    """A distribution π(t) of training times (t = 0 noise, t = 1 data).

    Subclasses implement ``icdf(u, path)`` (the exact inverse CDF, increasing in u ∈ [0, 1]), ``_cdf(t, path)``
    (its exact inverse, the CDF P(T ≤ t)) and ``_density(t, path)`` (π(t) on [0, 1]); the underscored forms take a
    valid t unchecked (library code), the public ``cdf``/``density`` validate a user's t with
    :func:`diffjax.paths.check_time`. ``sample(key, path)`` is ``icdf(U(0, 1))``.
    """

    @abc.abstractmethod
    def icdf(self, u: Scalar, path: AbstractPath) -> Float[Array, ""]:
        """The inverse CDF: the t with P(T ≤ t) = u (t = 0 noise, t = 1 data)."""

    @abc.abstractmethod
    def _cdf(self, t, path): ...

    @abc.abstractmethod
    def _density(self, t, path): ...

    def cdf(self, t: Scalar, path: AbstractPath) -> Float[Array, ""]:
        """P(T ≤ t), the exact inverse of ``icdf`` (t = 0 noise, t = 1 data)."""
        return self._cdf(check_time(t), path)

    def density(self, t: Scalar, path: AbstractPath) -> Float[Array, ""]:
        """π(t), the density of the sampled time at t (t = 0 noise, t = 1 data)."""
        return self._density(check_time(t), path)

    def sample(self, key: PRNGKeyArray, path: AbstractPath) -> Float[Array, ""]:
        """One scalar time t ~ π (t = 0 noise, t = 1 data), untruncated (objectives truncate, see the module)."""
        u = jax.random.uniform(key, (), dtype=jnp.result_type(float))
        return self.icdf(u, path)


class Uniform(AbstractTimeSampler):
    """t ~ U(t_min, t_max), by default U(0, 1) as in the papers (t = 0 noise, t = 1 data).

    The default does not adapt to the path; an objective truncates it to its ``t_range`` anyway (module docstring).
    CDF (t − t_min)/(t_max − t_min) on [t_min, t_max].
    """

    t_min: Float[Array, ""]
    t_max: Float[Array, ""]

    def __init__(self, t_min: Scalar = 0.0, t_max: Scalar = 1.0):
        if _is_concrete(t_min, t_max) and not (0.0 <= float(t_min) < float(t_max) <= 1.0):
            raise ValueError(
                f"Uniform needs 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}"
            )
        self.t_min = _float(t_min)
        self.t_max = _float(t_max)

    def icdf(self, u, path):
        return self.t_min + jnp.asarray(u) * (self.t_max - self.t_min)

    def _cdf(self, t, path):
        return jnp.clip((t - self.t_min) / (self.t_max - self.t_min), 0.0, 1.0)

    def _density(self, t, path):
        t = jnp.asarray(t)
        inside = (t >= self.t_min) & (t <= self.t_max)
        return jnp.where(inside, 1.0 / (self.t_max - self.t_min), 0.0).astype(t.dtype)


class LogitNormal(AbstractTimeSampler):
    """SD3's logit-normal time density (Esser et al. 2024, arXiv:2403.03206, §3.1), in diffjax time.

    SD3's time is τ = 1 − t (τ = 0 data): τ = sigmoid(n), n ~ N(mean, std²), with density
    π_ln(τ) = φ((logit τ − m)/s)/(s·τ(1 − τ)) and CDF Φ((logit τ − m)/s). Here t = 1 − τ = sigmoid(−n), i.e.
    logit t ~ N(−mean, std²), CDF Φ((logit t + mean)/std), and π(t) = π_ln(1 − t). A positive ``mean`` biases
    towards noise (small t), as in SD3. On the linear path λ = 2·logit t ~ N(−2·mean, (2·std)²). SD3's default is
    mean = 0, std = 1.
    """

    mean: Float[Array, ""]
    std: Float[Array, ""]

    def __init__(self, mean: Scalar = 0.0, std: Scalar = 1.0):
        if _is_concrete(std) and not float(std) > 0:
            raise ValueError(f"LogitNormal needs std > 0, got std={std}")
        self.mean = _float(mean)
        self.std = _float(std)

    def icdf(self, u, path):
        return jax.nn.sigmoid(-self.mean + self.std * ndtri(jnp.asarray(u)))

    def _cdf(self, t, path):
        return ndtr((jnp.log(t) - jnp.log1p(-t) + self.mean) / self.std)

    def _density(self, t, path):
        z = (-(jnp.log(t) - jnp.log1p(-t)) - self.mean) / self.std
        return _normal_pdf(z) / (self.std * t * (1.0 - t))


class ModeSampler(AbstractTimeSampler):
    """SD3's "mode sampling with heavy tails" (Esser et al. 2024, §3.1), in diffjax time.

    SD3: τ = f_mode(u) = 1 − u − s·(cos²(πu/2) − 1 + u), u ~ U(0, 1), τ = 1 − t. Here t = g(u) = 1 − f_mode(u)
    = u + s·(cos²(πu/2) − 1 + u), which is increasing in u (so g is the inverse CDF) exactly when
    −1 ≤ s ≤ 2/(π − 2) ≈ 1.7519; other scales raise ``ValueError``. The CDF is g⁻¹ (:meth:`inverse_icdf`, a
    bisection root find with implicit gradients) and the density π(t) = 1/g'(g⁻¹(t)) with
    g'(u) = 1 + s·(1 − (π/2)·sin(πu)). s = 0 is uniform; π(½) = 1/(1 − s(π/2 − 1)). The density is symmetric
    under t ↔ 1 − t.
    """

    scale: Float[Array, ""]

    def __init__(self, scale: Scalar = 1.29):
        if _is_concrete(scale) and not (-1.0 <= float(scale) <= MODE_SCALE_MAX):
            raise ValueError(
                f"ModeSampler needs -1 <= scale <= 2/(pi-2) ~ {MODE_SCALE_MAX:.4f} (f_mode is not monotone "
                f"outside), got scale={scale}"
            )
        self.scale = _float(scale)

    def _g(self, u):
        return u + self.scale * (jnp.square(jnp.cos(0.5 * jnp.pi * u)) - 1.0 + u)

    def _dg(self, u):
        return 1.0 + self.scale * (1.0 - 0.5 * jnp.pi * jnp.sin(jnp.pi * u))

    def icdf(self, u, path):
        return jnp.clip(self._g(jnp.asarray(u)), 0.0, 1.0)

    def inverse_icdf(self, t: Scalar) -> Float[Array, ""]:
        """g⁻¹(t), the CDF at t (0 below t = 0, 1 above t = 1).

        Bisection to the float spacing of u (``optimistix``), differentiated implicitly: d/dt = 1/g'(u),
        d/dscale = −(cos²(πu/2) − 1 + u)/g'(u) at u = g⁻¹(t). Pure (no check of t); jit/vmap/grad-able.
        """
        return _monotone_inverse(self._g, jnp.asarray(t, jnp.result_type(t, float)), 0.0, 1.0)

    def _cdf(self, t, path):
        return self.inverse_icdf(t)

    def _density(self, t, path):
        return 1.0 / self._dg(self.inverse_icdf(t))


class CosMap(AbstractTimeSampler):
    """SD3's CosMap sampler (Esser et al. 2024, §3.1), in diffjax time.

    SD3: τ = 1 − 1/(tan(πu/2) + 1), u ~ U(0, 1), π(τ) = 2/(π(τ² + (1 − τ)²)). Here t = 1 − τ(1 − u)
    = sin(πu/2)/(sin(πu/2) + cos(πu/2)), so that on the linear path λ = 2·logit t = 2·log tan(πu/2) is exactly
    the cosine schedule's λ at time u. CDF u = (2/π)·arctan(t/(1 − t)); the density is symmetric:
    π(t) = 2/(π(t² + (1 − t)²)).
    """

    def icdf(self, u, path):
        a = 0.5 * jnp.pi * jnp.asarray(u)
        s, c = jnp.sin(a), jnp.cos(a)
        return s / (s + c)

    def _cdf(self, t, path):
        return (2.0 / jnp.pi) * jnp.arctan2(t, 1.0 - t)

    def _density(self, t, path):
        return 2.0 / (jnp.pi * (jnp.square(t) + jnp.square(1.0 - t)))


class LogSNRNormal(AbstractTimeSampler):
    """λ ~ N(mean, std²) truncated to the path's λ range [λ(t_min), λ(t_max)]; t = path.t_from_log_snr(λ).

    Sampled exactly by the inverse CDF: λ = mean + std·Φ⁻¹(Φ(a) + u(Φ(b) − Φ(a))), a, b the standardised ends;
    the CDF in t is (Φ((λ_t − mean)/std) − Φ(a))/(Φ(b) − Φ(a)). Density in t: π(t) = N_trunc(λ_t)·λ̇_t (t = 0
    noise, t = 1 data). EDM's ln σ ~ N(P_mean, P_std²) with σ = e^{−λ/2} (α = 1) is
    ``LogSNRNormal(−2·P_mean, 2·P_std)``; SD3's logit-normal on the linear path is ``LogSNRNormal(−2·m, 2·s)``.
    """

    mean: Float[Array, ""]
    std: Float[Array, ""]

    def __init__(self, mean: Scalar = 0.0, std: Scalar = 1.0):
        if _is_concrete(std) and not float(std) > 0:
            raise ValueError(f"LogSNRNormal needs std > 0, got std={std}")
        self.mean = _float(mean)
        self.std = _float(std)

    def _cdf_ends(self, path):
        return tuple(self._end_cdf(path, float(t)) for t in (path.t_min, path.t_max))

    def _end_cdf(self, path, t):
        """Φ((λ(t) − mean)/std) at an end t of the path, where λ may be ±∞ (then Φ is 0 or 1 with zero
        gradient: the chain rule through λ = ±∞ would give 0·∞ = NaN for the path's and the sampler's leaves,
        e.g. a learned schedule, so those gradients are cut there)."""
        t = jnp.asarray(t, jnp.result_type(float))
        finite = jnp.isfinite(jax.lax.stop_gradient(path.log_snr(t)))

        def gate(leaf):
            return jnp.where(finite, leaf, jax.lax.stop_gradient(leaf))

        path = jax.tree_util.tree_map(
            lambda leaf: gate(leaf) if eqx.is_inexact_array(leaf) else leaf, path
        )
        lam = path.log_snr(t)
        lam_safe = jnp.where(finite, lam, 0.0)
        return jnp.where(
            finite, ndtr((lam_safe - self.mean) / self.std), jnp.where(lam > 0, 1.0, 0.0)
        )

    def icdf(self, u, path):
        p_lo, p_hi = self._cdf_ends(path)
        p = jnp.clip(p_lo + jnp.asarray(u) * (p_hi - p_lo), p_lo, p_hi)
        lam = self.mean + self.std * ndtri(p)
        return path.t_from_log_snr(lam)

    def _cdf(self, t, path):
        p_lo, p_hi = self._cdf_ends(path)
        p = ndtr((path.log_snr(t) - self.mean) / self.std)
        return jnp.clip((p - p_lo) / (p_hi - p_lo), 0.0, 1.0)

    def log_snr_density(self, lam: Scalar, path: AbstractPath) -> Float[Array, ""]:
        """The truncated normal density of λ."""
        p_lo, p_hi = self._cdf_ends(path)
        lam_lo, lam_hi = path.log_snr_range()
        inside = (lam >= lam_lo) & (lam <= lam_hi)
        dens = _normal_pdf((lam - self.mean) / self.std) / (self.std * (p_hi - p_lo))
        return jnp.where(inside, dens, 0.0)

    def _density(self, t, path):
        return self.log_snr_density(path.log_snr(t), path) * path.d_log_snr(t)


class Shifted(AbstractTimeSampler):
    """SD3's resolution-dependent timestep shift (Esser et al. 2024, §5.3.2) applied to a base sampler.

    In SD3 time τ = 1 − t: τ' = s·τ/(1 + (s − 1)·τ). In diffjax time: t' = t/(s − (s − 1)·t), with inverse
    t = s·t'/(1 + (s − 1)·t'), CDF F'(t') = F(t) and density π'(t') = π(t)·s/(1 + (s − 1)·t')². s > 1 moves
    samples towards noise; on the linear path it shifts log-SNR by λ' = λ − 2·log s. SD3 uses s = √(m/n)
    (pixel-count ratio), 3.0 at 1024².
    """

    base: AbstractTimeSampler
    shift: Float[Array, ""]

    def __init__(self, base: AbstractTimeSampler, shift: Scalar):
        if _is_concrete(shift) and not float(shift) > 0:
            raise ValueError(f"Shifted needs shift > 0, got shift={shift}")
        self.base = base
        self.shift = _float(shift)

    def _forward(self, t):
        return t / (self.shift - (self.shift - 1.0) * t)

    def _backward(self, t):
        return jnp.clip(self.shift * t / (1.0 + (self.shift - 1.0) * t), 0.0, 1.0)

    def icdf(self, u, path):
        return self._forward(self.base.icdf(u, path))

    def _cdf(self, t, path):
        return self.base._cdf(self._backward(t), path)

    def _density(self, t, path):
        denom = 1.0 + (self.shift - 1.0) * t
        return self.base._density(self._backward(t), path) * self.shift / jnp.square(denom)


# ---------------------------------------------------------------------------------------------------------------
# λ-weightings w(λ)
# ---------------------------------------------------------------------------------------------------------------


class AbstractWeighting(eqx.Module):
    """A weighting w(λ) over log-SNR (Kingma & Gao 2023): L_w = ½∫ w(λ)·E‖ε̂ − ε‖² dλ."""

    @abc.abstractmethod
    def __call__(self, lam: Scalar) -> Float[Array, ""]:
        """w(λ)."""


class ELBOWeighting(AbstractWeighting):
    """w(λ) = 1: the continuous-time ELBO's diffusion term (VDM, Kingma et al. 2021)."""

    def __call__(self, lam):
        return jnp.ones_like(jnp.asarray(lam, dtype=jnp.result_type(float)))


class SigmoidWeighting(AbstractWeighting):
    """w(λ) = sigmoid(b − λ) (Kingma & Gao 2023; monotone, so the loss is an ELBO of noise-augmented data)."""

    bias: Float[Array, ""]

    def __init__(self, bias: Scalar = 2.0):
        self.bias = _float(bias)

    def __call__(self, lam):
        return jax.nn.sigmoid(self.bias - jnp.asarray(lam))


class ExpWeighting(AbstractWeighting):
    """w(λ) = e^{−k·λ}. Flow matching / rectified flow on the linear path with t ~ U(0, 1) is k = ½."""

    k: Float[Array, ""]

    def __init__(self, k: Scalar = 0.5):
        self.k = _float(k)

    def __call__(self, lam):
        return jnp.exp(-self.k * jnp.asarray(lam))


class EDMWeighting(AbstractWeighting):
    """EDM's implied weighting (Karras et al. 2022; formulas-detailed.md §2.4):

    w(λ) = (2/σ_d²)·N(λ; −2·P_mean, (2·P_std)²)·(e^{−λ} + σ_d²) = 8·N(λ; 2.4, 2.4²)·(e^{−λ} + 0.25) by default.
    """

    p_mean: Float[Array, ""]
    p_std: Float[Array, ""]
    sigma_data: Float[Array, ""]

    def __init__(self, p_mean: Scalar = -1.2, p_std: Scalar = 1.2, sigma_data: Scalar = 0.5):
        self.p_mean = _float(p_mean)
        self.p_std = _float(p_std)
        self.sigma_data = _float(sigma_data)

    def __call__(self, lam):
        lam = jnp.asarray(lam)
        s = 2.0 * self.p_std
        n = _normal_pdf((lam + 2.0 * self.p_mean) / s) / s
        sd2 = jnp.square(self.sigma_data)
        return 2.0 / sd2 * n * (jnp.exp(-lam) + sd2)


class LogitNormalWeighting(AbstractWeighting):
    """Rectified flow with SD3's logit-normal(m, s) times (formulas-detailed.md §2.4, §3):

    w(λ) = 2·(1 + e^{−λ/2})²·N(λ; −2m, (2s)²) = e^{−λ/2}·π_ln(τ(λ)).
    """

    mean: Float[Array, ""]
    std: Float[Array, ""]

    def __init__(self, mean: Scalar = 0.0, std: Scalar = 1.0):
        self.mean = _float(mean)
        self.std = _float(std)

    def __call__(self, lam):
        lam = jnp.asarray(lam)
        s = 2.0 * self.std
        n = _normal_pdf((lam + 2.0 * self.mean) / s) / s
        return 2.0 * jnp.square(1.0 + jnp.exp(-0.5 * lam)) * n


class CosineEpsWeighting(AbstractWeighting):
    """w(λ) = sech(λ/2)/π: ε-MSE with t ~ U(0, 1) on the VP cosine path (IDDPM "cosine", no offset)."""

    def __call__(self, lam):
        return 1.0 / (jnp.pi * jnp.cosh(0.5 * jnp.asarray(lam)))


# ---------------------------------------------------------------------------------------------------------------
# Per-sample loss factors c(t)
# ---------------------------------------------------------------------------------------------------------------


class AbstractLossWeight(eqx.Module):
    """A per-sample factor c(t) multiplying ‖ŷ − y‖² (t = 0 noise, t = 1 data).

    Called as ``c(t, path=..., space=..., time_sampler=...)``; ``space`` is the kind (a
    :class:`diffjax.kinds.AbstractKind`) in which the error is taken. Library code calls it with valid times
    only: it is pure and checks nothing (no host callback inside a training step).
    """

    @abc.abstractmethod
    def __call__(
        self,
        t: Scalar,
        *,
        path: AbstractPath,
        space: AbstractKind,
        time_sampler: AbstractTimeSampler,
    ) -> Float[Array, ""]: ...


class ConstantWeight(AbstractLossWeight):
    """c(t) = value (default 1): the plain MSE of DDPM's L_simple, flow matching, v-prediction."""

    value: Float[Array, ""]

    def __init__(self, value: Scalar = 1.0):
        self.value = _float(value)

    def __call__(self, t, *, path, space, time_sampler):
        return self.value * jnp.ones_like(jnp.asarray(t))


class EDMWeight(AbstractLossWeight):
    """EDM's loss weight (Karras et al. 2022, ``training/loss.py``): c = (σ̃² + σ_d²)/(σ̃·σ_d)².

    σ̃ = σ_t/α_t = e^{−λ/2} is the noise level of the equivalent VE process (σ̃ = σ for EDM's α = 1 paths), so
    c = 1/σ_d² + α²/σ² is defined for every path. Meant for the error in data space (x-MSE).
    """

    sigma_data: Float[Array, ""]

    def __init__(self, sigma_data: Scalar = 0.5):
        self.sigma_data = _float(sigma_data)

    def __call__(self, t, *, path, space, time_sampler):
        a, s, _, _ = path.coefficients(t)
        return 1.0 / jnp.square(self.sigma_data) + jnp.square(a / s)


class MinSNR(AbstractLossWeight):
    """Min-SNR-γ (Hang et al. 2023): the loss equals min(SNR, γ)·‖x̂ − x‖², SNR = α²/σ² = e^λ.

    c(t) = min(SNR, γ)·κ²_data/κ²_space: for space "eps" min(SNR, γ)/SNR, for "data" min(SNR, γ), for "v" on
    VP paths min(SNR, γ)/(SNR + 1), as in the paper.
    """

    gamma: Float[Array, ""]

    def __init__(self, gamma: Scalar = 5.0):
        self.gamma = _float(gamma)

    def __call__(self, t, *, path, space, time_sampler):
        coeffs = path.coefficients(t)
        a, s, _, _ = coeffs
        # min(SNR, γ)·κ²_data = min(1, γ·σ²/α²), finite at α = 0.
        return jnp.minimum(1.0, self.gamma * jnp.square(s / a)) / space.error_scale_sq(*coeffs)


class LogSNRRate(AbstractLossWeight):
    """c(t) = scale·λ̇_t. With scale = ½, space "eps" and t ~ U(0, 1) this is VDM's diffusion loss
    ½·λ̇·‖ε̂ − ε‖² (Kingma et al. 2021, γ = −λ; the ELBO's w = 1)."""

    scale: Float[Array, ""]

    def __init__(self, scale: Scalar = 0.5):
        self.scale = _float(scale)

    def __call__(self, t, *, path, space, time_sampler):
        return self.scale * path.d_log_snr(t)


class KingmaGaoWeight(AbstractLossWeight):
    """The factor that realises a λ-weighting w with any sampler and error space (formulas-detailed.md §2.3):

    c(t) = w(λ_t)·λ̇_t/(2·π(t)·κ_t²),  κ_t² = space.error_scale_sq(α, σ, α̇, σ̇) (``targets.error_scale_sq``),

    so that c·‖ŷ − y‖² = ½·(w(λ)/p(λ))·‖ε̂ − ε‖² and E = ½∫ w(λ)·E‖ε̂ − ε‖² dλ.
    """

    weighting: AbstractWeighting

    def __call__(self, t, *, path, space, time_sampler):
        lam = path.log_snr(t)
        kappa_sq = space.error_scale_sq(*path.coefficients(t))
        return (
            self.weighting(lam)
            * path.d_log_snr(t)
            / (2.0 * time_sampler._density(t, path) * kappa_sq)
        )


# ---------------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------------


class Objective(eqx.Module):
    """A training objective E_{t~π, ε}[ c(t)·‖ŷ − y‖² ] (t = 0 noise, t = 1 data), π truncated to ``t_range``.

    Args:
        path: the Gaussian path x_t = α_t·x + σ_t·ε.
        prediction: the kind the network ``fn(t, x_t)`` outputs: a :class:`diffjax.kinds.AbstractKind` or its
            name (``"eps"``, ``"data"``, ``"v"``, ``"velocity"``, ``"score"``), converted once with
            :func:`diffjax.kinds.as_kind`; ``objective.prediction.name`` is the string.
        space: the kind in which the squared error is taken; the prediction is converted exactly
            (``targets.convert_at``) and the target is that kind's ``target``. Defaults to ``prediction``.
        time_sampler: π(t) (default U(0, 1)).
        loss_weight: c(t) (default 1).
        margin: the objective's distance from t = 0 and t = 1: times are drawn from π truncated (not clipped)
            to [lo, hi] = [max(path.t_min, margin), min(path.t_max, 1 − margin)], away from the ends where
            conversions, κ² or c(t) may be singular (α = 0 at t = 0, σ = 0 or λ̇ = ∞ at t = 1); each example's
            loss carries the mass Z = F(hi) − F(lo). Not the path's ``t_eps`` (where the *path* is singular).
            The expectation is ½∫_{λ(lo)}^{λ(hi)} w(λ)·E‖ε̂ − ε‖² dλ (module docstring).
    """

    path: AbstractPath
    time_sampler: AbstractTimeSampler
    loss_weight: AbstractLossWeight
    prediction: AbstractKind
    space: AbstractKind
    margin: float = eqx.field(static=True)

    def __init__(
        self,
        path: AbstractPath,
        prediction: str | AbstractKind,
        space: str | AbstractKind | None = None,
        time_sampler: AbstractTimeSampler | None = None,
        loss_weight: AbstractLossWeight | None = None,
        *,
        margin: float = 1e-5,
    ):
        prediction = as_kind(prediction, "prediction")
        space = prediction if space is None else as_kind(space, "space")
        if not isinstance(path, AbstractPath):
            raise ValueError(f"path must be a diffjax AbstractPath, got {type(path).__name__}")
        if not (0.0 <= float(margin) < 0.5):
            raise ValueError(f"margin must lie in [0, 0.5), got margin={margin}")
        self.path = path
        self.prediction = prediction
        self.space = space
        self.time_sampler = Uniform() if time_sampler is None else time_sampler
        self.loss_weight = ConstantWeight() if loss_weight is None else loss_weight
        self.margin = float(margin)
        lo, hi = self.t_range
        if not lo < hi:
            raise ValueError(
                f"margin={margin} leaves no time interval on {type(path).__name__} (t_min={path.t_min}, "
                f"t_max={path.t_max}): need max(t_min, margin) < min(t_max, 1 - margin)"
            )

    @property
    def t_range(self) -> tuple[float, float]:
        """[lo, hi] = [max(path.t_min, margin), min(path.t_max, 1 − margin)]: where times are drawn
        (t = 0 noise, t = 1 data)."""
        return max(float(self.path.t_min), self.margin), min(
            float(self.path.t_max), 1.0 - self.margin
        )

    def _cdf_range(self):
        dtype = jnp.result_type(float)
        lo, hi = (jnp.asarray(v, dtype) for v in self.t_range)
        cdf = self.time_sampler._cdf
        return lo, hi, cdf(lo, self.path), cdf(hi, self.path)

    def mass(self) -> Float[Array, ""]:
        """Z = F(hi) − F(lo): the probability that π puts on ``t_range``; every sampled loss is multiplied by it,
        so that E[loss] = ∫_lo^hi π(t)·c(t)·E‖ŷ − y‖² dt."""
        _, _, f_lo, f_hi = self._cdf_range()
        return f_hi - f_lo

    def time_at(self, u: Scalar) -> Float[Array, ""]:
        """The time drawn for u ∈ [0, 1]: t = F⁻¹(F(lo) + u·(F(hi) − F(lo))), the inverse CDF of π truncated to
        ``t_range`` (t = 0 noise, t = 1 data). u ~ U(0, 1) gives t ~ π(t)/Z on [lo, hi]."""
        return self._time_at(self._cdf_range(), u)

    def _time_at(self, cdf_range, u):
        lo, hi, f_lo, f_hi = cdf_range
        t = self.time_sampler.icdf(f_lo + jnp.asarray(u) * (f_hi - f_lo), self.path)
        return jnp.clip(t, lo, hi)  # rounding only: the probability mass is already inside [lo, hi]

    def weight(self, t: Scalar) -> Float[Array, ""]:
        """c(t) at a user's time (checked)."""
        return self._weight(check_time(t))

    def _weight(self, t):
        return self.loss_weight(t, path=self.path, space=self.space, time_sampler=self.time_sampler)


def _check_fn_output(pred, x) -> None:
    if jnp.shape(pred) != jnp.shape(x):
        raise ValueError(
            f"the model fn(t, x_t) returned shape {jnp.shape(pred)} but the example x has shape "
            f"{jnp.shape(x)}; fn must map one example to a prediction of the same shape (vmap for batches)"
        )


def _noise(key, x):
    return jax.random.normal(key, jnp.shape(x), dtype=jnp.result_type(x, float))


def draw(
    objective: Objective, key: PRNGKeyArray, x: Float[Array, "*shape"]
) -> tuple[Float[Array, ""], Float[Array, "*shape"]]:
    """The (t, ε) that :func:`loss` uses for ``key``: t = ``objective.time_at(u)``, u ~ U(0, 1) (π truncated to
    ``objective.t_range``), ε ~ N(0, I). t = 0 is noise, t = 1 is data."""
    k_t, k_eps = jax.random.split(key)
    u = jax.random.uniform(k_t, (), dtype=jnp.result_type(float))
    return objective.time_at(u), _noise(k_eps, x)


def _loss_at(objective: Objective, fn, x, t, eps):
    """c(t)·‖ŷ − y‖² with no check of t (library times)."""
    path = objective.path
    coeffs = path.coefficients(t)
    a, s, _, _ = coeffs
    x_t = a * x + s * eps
    pred = fn(t, x_t)
    _check_fn_output(pred, x)
    src, dst = objective.prediction, objective.space
    if type(src) is not type(dst):
        pred = convert_at(pred, src, dst, coeffs, x_t)
    y = dst.target(*coeffs, x, eps)
    return objective._weight(t) * jnp.sum(jnp.square(pred - y))


def loss_at(
    objective: Objective,
    fn,
    x: Float[Array, "*shape"],
    t: Scalar,
    eps: Float[Array, "*shape"],
) -> Float[Array, ""]:
    """The per-example loss at a given time and noise: c(t)·‖convert(fn(t, x_t)) − target‖², summed over dims.

    x_t = α_t·x + σ_t·ε (t = 0 noise, t = 1 data); ``fn(t, x_t)`` returns a prediction of kind
    ``objective.prediction`` with the shape of x (else ``ValueError``). ``t`` is validated (it is the user's).
    This is the integrand: :func:`loss` is ``objective.mass()·loss_at`` at the drawn (t, ε), so
    E[loss] = ∫_lo^hi π(t)·E[loss_at(t)] dt.
    """
    if jnp.shape(x) != jnp.shape(eps):
        raise ValueError(
            f"shape mismatch: x has shape {jnp.shape(x)} but eps has shape {jnp.shape(eps)} "
            "(diffjax functions act on one example; use jax.vmap for batches)"
        )
    return _loss_at(objective, fn, x, check_time(t), eps)


def loss(
    objective: Objective, fn, x: Float[Array, "*shape"], key: PRNGKeyArray
) -> Float[Array, ""]:
    """A one-sample Monte Carlo estimate of the objective for ONE example x: Z·:func:`loss_at` at the (t, ε) of
    :func:`draw`, Z = ``objective.mass()``. Unbiased for ∫_lo^hi π(t)·c(t)·E‖ŷ − y‖² dt = ½∫ w(λ)·E‖ε̂ − ε‖² dλ
    over [λ(lo), λ(hi)]. t = 0 is noise, t = 1 is data. No runtime check (the drawn t is valid)."""
    t, eps = draw(objective, key, x)
    return objective.mass() * _loss_at(objective, fn, x, t, eps)


def batch_loss(
    objective: Objective,
    fn,
    xs: Float[Array, " batch *shape"],
    key: PRNGKeyArray,
    *,
    stratified: bool = False,
    coupling=None,
) -> Float[Array, ""]:
    """Mean over the batch of per-example losses with independent keys (``jax.vmap`` of :func:`loss`).

    With ``stratified=True`` the times are low-discrepancy (VDM): u_i = (u_0 + i/B) mod 1 with one u_0 ~ U(0, 1),
    t_i = ``objective.time_at(u_i)`` through the sampler's exact (truncated) inverse CDF. Each t_i is still
    marginally π truncated to ``t_range`` and each loss carries Z, so the estimate stays unbiased with lower
    variance. Pure: no host callback, so a jitted training step stays cacheable.

    ``coupling`` (:mod:`diffjax.couplings`: ``"independent"``, ``"ot"``, ``"sb"`` or a module such as
    ``MinibatchOT()``) pairs the batch's noises with its data points before the per-example losses: the times and
    noises are drawn exactly as without it, then noise ε_{j_i} goes with data point x_i, j = ``coupling.pair``
    (t = 0 noise, t = 1 data). Inside a jitted, data-parallel step the pairing is over the global batch. The
    default (None or ``Independent()``) is the unpaired loss, bit for bit. For ``diffjax.train.fit`` pass
    ``loss_fn=functools.partial(batch_loss, coupling=MinibatchOT())``.
    """
    coupling = _coupling_at_boundary("batch_loss", coupling, objective, xs)
    return _batch_loss(objective, lambda c: fn, xs, None, key, stratified, coupling)


def conditional_batch_loss(
    objective: Objective,
    fn,
    batch: tuple[Float[Array, " batch *shape"], PyTree],
    key: PRNGKeyArray,
    *,
    dropout: AbstractConditionDropout,
    stratified: bool = False,
    coupling=None,
) -> Float[Array, ""]:
    """:func:`batch_loss` of a conditional model ``fn(t, x, c)`` on ``batch = (xs, conds)`` with condition dropout.

    Each example's condition c_i is replaced by the null condition ∅ with probability ``dropout.probability``
    (drawn from ``fold_in(key, 1)``; the (t, ε) draws use the rest of ``key`` exactly as :func:`batch_loss` does),
    so that one network learns p(x | c) and, at ∅, p(x) (Ho & Salimans 2022). The loss of example i is that of
    :func:`loss` for the model ``(t, x) ↦ fn(t, x, c_i)`` (t = 0 noise, t = 1 data). ``conds`` is validated once
    by ``dropout.check`` (for :class:`~diffjax.conditioning.ClassDropout`: integer labels in 0..K, K = ∅).
    Pass to ``diffjax.train.fit`` as ``loss_fn=functools.partial(conditional_batch_loss, dropout=...)``.
    ``coupling`` re-pairs the noises with the (data, condition) examples as in :func:`batch_loss`.
    """
    if not isinstance(dropout, AbstractConditionDropout):
        raise ValueError(
            f"conditional_batch_loss: dropout must be a diffjax.conditioning ClassDropout or ConditionDropout, "
            f"got {type(dropout).__name__}; pass dropout=ClassDropout(num_classes, 0.1) (probability 0 keeps "
            "every condition)"
        )
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError(
            f"conditional_batch_loss: batch must be a pair (xs, conds), got {type(batch).__name__}"
        )
    xs, conds = batch
    n = jnp.shape(xs)[0]
    lead = {jnp.shape(c)[:1] for c in jax.tree.leaves(conds)}
    if lead != {(n,)}:
        raise ValueError(
            f"conditional_batch_loss: every leaf of conds must have the batch size {n} as its first axis (one "
            f"condition per example), got leading shapes {sorted(lead)}"
        )
    coupling = _coupling_at_boundary("conditional_batch_loss", coupling, objective, xs)
    conds = dropout.check(conds)
    drop_keys = _rows_like(xs, jax.random.split(jax.random.fold_in(key, 1), n))
    conds = jax.vmap(dropout)(drop_keys, conds)
    return _batch_loss(
        objective, lambda c: Conditioned(fn, c), xs, conds, key, stratified, coupling
    )


def per_dimension(loss_fn=None):
    """A ``loss_fn`` for :func:`diffjax.train.fit` that averages over the D coordinates of an example.

    Every objective here sums its error over the coordinates of an example (c(t)·‖ŷ − y‖², the form whose
    weighting w(λ) the module docstring derives), so the loss and its gradient grow with D: at 32×32×3 the
    gradient norm at initialisation is ~2,000 against ``TrainConfig.grad_clip = 1.0``, and clipping is then
    always on. ``per_dimension(loss_fn)`` returns ``loss_fn(objective, fn, batch, key) / D`` with D the size of
    one example (of ``batch[0]`` for a conditional batch ``(xs, conds)``): the same objective up to the constant
    1/D (the same weighting w(λ), the same minimiser), with losses and gradient norms that do not grow with the
    image size, so the default clip threshold means the same at every D. Use it for image-sized data; the
    default sum is kept so that existing runs keep their trajectories (t = 0 noise, t = 1 data).

    Args:
        loss_fn: the batch loss to rescale (``batch_loss``, ``conditional_batch_loss`` or a partial of either;
            default :func:`batch_loss`).

    Example: ``dj.train.fit(apply, params, objective, batches, config, loss_fn=dj.losses.per_dimension())``.
    """
    loss_fn = batch_loss if loss_fn is None else loss_fn
    if not callable(loss_fn):
        raise ValueError(
            f"per_dimension: loss_fn must be a batch loss such as diffjax.batch_loss, got {loss_fn!r}"
        )
    return functools.partial(_per_dimension_loss, loss_fn)


def _per_dimension_loss(loss_fn, objective, fn, batch, key, **kwargs):
    xs = batch[0] if isinstance(batch, tuple) else batch
    dim = math.prod(jnp.shape(xs)[1:])
    return loss_fn(objective, fn, batch, key, **kwargs) / dim


def _coupling_at_boundary(caller, coupling, objective, xs):
    """The coupling module for ``coupling`` (None: no coupling, the unpaired loss), validated against the
    objective and the batch once, at the entry point."""
    if coupling is None:
        return None
    from . import couplings  # noqa: PLC0415 (loaded only when a coupling is asked for)

    coupling = couplings.as_coupling(coupling, f"{caller}: coupling")
    if isinstance(coupling, couplings.Independent):
        return None
    shape = jnp.shape(xs)
    if len(shape) < 1 or shape[0] < 2:
        raise ValueError(
            f"{caller}: coupling={type(coupling).__name__}() pairs noises and data within a batch, but the batch "
            f"has shape {shape}; use a batch of at least 2 examples, or coupling='independent'"
        )
    coupling.check(objective)
    return coupling


def _rows_like(xs, per_row):
    """``per_row`` (one entry per example) sharded like the batch axis of ``xs`` when a mesh with Explicit axes
    (``jax.make_mesh``'s default) splits that axis, since ``vmap`` needs its mapped operands sharded alike; the
    unchanged array otherwise (no mesh, or Auto axes: the same program as before)."""
    sharding = jax.typeof(xs).sharding
    axis = sharding.spec[0] if len(sharding.spec) else None
    if axis is None:
        return per_row
    # a NamedSharding on xs's own mesh: also valid in a jit of sharded arrays outside `jax.set_mesh`
    target = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(axis))
    return jax.sharding.reshard(per_row, target)


def _batch_loss(objective, model_for, xs, conds, key, stratified, coupling=None):
    """Mean per-example loss; example i uses the model ``model_for(conds_i)`` (``conds`` may be None)."""
    if coupling is not None:
        return _coupled_batch_loss(objective, model_for, xs, conds, key, stratified, coupling)
    n = jnp.shape(xs)[0]
    if not stratified:
        keys = _rows_like(xs, jax.random.split(key, n))
        return jnp.mean(
            jax.vmap(lambda x, c, k: loss(objective, model_for(c), x, k))(xs, conds, keys)
        )
    k_u, k_eps = jax.random.split(key)
    dtype = jnp.result_type(float)
    u0 = jax.random.uniform(k_u, (), dtype=dtype)
    us = _rows_like(xs, jnp.mod(u0 + jnp.arange(n, dtype=dtype) / n, 1.0))
    eps_keys = _rows_like(xs, jax.random.split(k_eps, n))
    cdf_range = objective._cdf_range()
    mass = cdf_range[3] - cdf_range[2]

    def one(x, c, u, k):
        t = objective._time_at(cdf_range, u)
        return _loss_at(objective, model_for(c), x, t, _noise(k, x))

    return mass * jnp.mean(jax.vmap(one)(xs, conds, us, eps_keys))


def _coupled_batch_loss(objective, model_for, xs, conds, key, stratified, coupling):
    """:func:`_batch_loss` with the noises re-paired by ``coupling``: the (t_i, ε_i) are drawn from the same keys
    as the unpaired loss, then example i gets ε_{j_i}, j = coupling's pairing (from ``fold_in(key, 2)``); a
    coupling's own per-example noise (the Schrödinger bridge's z) comes from ``fold_in(key, 3)``."""
    n = jnp.shape(xs)[0]
    dtype = jnp.result_type(float)
    if not stratified:
        ts, eps = jax.vmap(lambda x, k: draw(objective, k, x))(xs, jax.random.split(key, n))
        mass = objective.mass()
    else:
        k_u, k_eps = jax.random.split(key)
        u0 = jax.random.uniform(k_u, (), dtype=dtype)
        us = jnp.mod(u0 + jnp.arange(n, dtype=dtype) / n, 1.0)
        cdf_range = objective._cdf_range()
        mass = cdf_range[3] - cdf_range[2]
        ts = jax.vmap(lambda u: objective._time_at(cdf_range, u))(us)
        eps = jax.vmap(_noise)(jax.random.split(k_eps, n), xs)
    eps = eps[coupling._pair(jax.random.fold_in(key, 2), eps, xs)]
    extra = jax.random.split(jax.random.fold_in(key, 3), n)

    def one(x, c, t, e, k):
        return coupling._loss_at(objective, model_for(c), x, t, e, k)

    return mass * jnp.mean(jax.vmap(one)(xs, conds, ts, eps, extra))


def weighted_objective(
    path: AbstractPath,
    prediction: str | AbstractKind,
    weighting: AbstractWeighting,
    time_sampler: AbstractTimeSampler | None = None,
    *,
    space: str | AbstractKind | None = None,
    margin: float = 1e-5,
) -> Objective:
    """The Kingma–Gao triple (prediction, w(λ), π): an objective whose expectation is ½∫ w(λ)·E‖ε̂ − ε‖² dλ
    over [λ(lo), λ(hi)], (lo, hi) = ``t_range`` (t = 0 noise, t = 1 data).

    The error is taken in ``space`` (default: the prediction's own kind, which needs no conversion) with the
    factor c(t) = w(λ_t)·λ̇_t/(2π(t)κ_t²) (:class:`KingmaGaoWeight`). t ~ π defaults to U(0, 1).
    """
    return Objective(
        path,
        prediction,
        space=space,
        time_sampler=Uniform() if time_sampler is None else time_sampler,
        loss_weight=KingmaGaoWeight(weighting),
        margin=margin,
    )


# ---------------------------------------------------------------------------------------------------------------
# Implied weighting
# ---------------------------------------------------------------------------------------------------------------


class ImpliedWeighting(eqx.Module):
    """The λ-weighting and λ-density of an objective (Kingma & Gao 2023; formulas-detailed.md §2.3).

    ``weight(lam)`` = w(λ) = 2·c(t)·π(t)·κ²_space(t)/λ̇_t and ``density(lam)`` = p(λ) = π(t)/λ̇_t at
    t = path.t_from_log_snr(λ), for scalar λ (use ``jax.vmap`` for arrays). Both are 0 outside the λ range that
    the objective samples, [λ(lo), λ(hi)] with (lo, hi) = ``objective.t_range``. The objective's expectation is
    ½∫ w(λ)·E‖ε̂ − ε‖² dλ over that range. p is the untruncated sampler's density restricted to the range (it
    integrates to Z = ``objective.mass()``); the drawn λ has density p/Z there and each sample carries Z.
    """

    objective: Objective

    def _t(self, lam):
        lam = jnp.asarray(lam, dtype=jnp.result_type(float))
        path = self.objective.path
        lo, hi = self.objective.t_range
        lam_lo, lam_hi = path.log_snr(lo), path.log_snr(hi)
        inside = (lam >= lam_lo) & (lam <= lam_hi)
        t = jnp.clip(path.t_from_log_snr(jnp.clip(lam, lam_lo, lam_hi)), lo, hi)
        return t, inside

    def density(self, lam: Scalar) -> Float[Array, ""]:
        """p(λ) = π(t_λ)/λ̇(t_λ): the density of λ_t under the objective's (untruncated) time sampler."""
        t, inside = self._t(lam)
        obj = self.objective
        p = obj.time_sampler._density(t, obj.path) / obj.path.d_log_snr(t)
        return jnp.where(inside, p, 0.0)

    def weight(self, lam: Scalar) -> Float[Array, ""]:
        """w(λ) = 2·c(t)·π(t)·κ²(t)/λ̇(t), with L = ½∫ w(λ)·E‖ε̂ − ε‖² dλ."""
        t, inside = self._t(lam)
        obj = self.objective
        path = obj.path
        w = (
            2.0
            * obj._weight(t)
            * obj.time_sampler._density(t, path)
            * obj.space.error_scale_sq(*path.coefficients(t))
            / path.d_log_snr(t)
        )
        return jnp.where(inside, w, 0.0)


def implied_weighting(objective: Objective) -> ImpliedWeighting:
    """w(λ) and p(λ) of ``objective`` (see :class:`ImpliedWeighting`)."""
    return ImpliedWeighting(objective)


# ---------------------------------------------------------------------------------------------------------------
# Published objectives, in their native form. Each expectation is ½∫ w(λ)·E‖ε̂ − ε‖² dλ over [λ(lo), λ(hi)],
# (lo, hi) = objective.t_range = [max(path.t_min, margin), min(path.t_max, 1 − margin)] (module docstring).
# ---------------------------------------------------------------------------------------------------------------


def ddpm(path: AbstractPath | None = None, *, margin: float = 1e-5) -> Objective:
    """DDPM's L_simple (Ho et al. 2020) in continuous time: ‖ε̂ − ε‖², t ~ U(0, 1), default score_sde's VP path.

    Implied w(λ) = 2·p(λ) (the path's λ density): 2·sigmoid(−λ)/β(1 − t_λ) on the VP path, sech(λ/2)/π on the
    cosine path, ¼sech²(λ/4) on the linear one.
    """
    return Objective(
        VPPath() if path is None else path,
        "eps",
        "eps",
        Uniform(),
        ConstantWeight(),
        margin=margin,
    )


def vdm(
    path: AbstractPath | None = None,
    prediction: str | AbstractKind = "eps",
    *,
    margin: float = 1e-5,
) -> Objective:
    """VDM's continuous-time diffusion loss (Kingma et al. 2021): ½·λ̇_t·‖ε̂ − ε‖², t ~ U(0, 1) (w = 1).

    The expectation is ½∫_{λ(lo)}^{λ(hi)} E‖ε̂ − ε‖² dλ over the objective's range (lo, hi) = t_range: the
    diffusion term of the −ELBO (the −ELBO minus prior and reconstruction terms). This is the training loss; the
    ELBO *estimator* with all three terms is ``diffjax.elbo`` (``diffjax.vlb``). A path with finite λ ends (VP,
    VE, EDM, a VDM LogSNRPath) fixes the bound; on the linear and cosine paths the ends are λ(margin),
    λ(1 − margin). Predictions of another kind are converted to ε. Default path: VPPath().
    """
    return Objective(
        VPPath() if path is None else path,
        prediction,
        "eps",
        Uniform(),
        LogSNRRate(0.5),
        margin=margin,
    )


def v_prediction(path: AbstractPath | None = None, *, margin: float = 1e-5) -> Objective:
    """v-prediction MSE (Salimans & Ho 2022): ‖v̂ − v‖², v = α·ε − σ·x, t ~ U(0, 1), default cosine path.

    Implied w(λ) = (2/π)·e^{−λ/2} on the cosine path (identical in shape to flow matching).
    """
    return Objective(
        CosinePath() if path is None else path,
        "v",
        "v",
        Uniform(),
        ConstantWeight(),
        margin=margin,
    )


def flow_matching(path: AbstractPath | None = None, *, margin: float = 1e-5) -> Objective:
    """Conditional flow matching (Lipman et al. 2023): L_CFM = ‖u_θ(t, x_t) − u_t(x_t|x)‖², t ~ U(0, 1),
    u_t(x_t|x) = α̇·x + σ̇·ε. Default: the linear (CondOT / rectified-flow) path, implied w(λ) = e^{−λ/2} exactly.
    """
    return Objective(
        LinearPath() if path is None else path,
        "velocity",
        "velocity",
        Uniform(),
        ConstantWeight(),
        margin=margin,
    )


def score_matching(path: AbstractPath | None = None, *, margin: float = 1e-5) -> Objective:
    """Conditional (denoising) score matching: L_CSM = ‖s_θ(t, x_t) − ∇log p_t(x_t|x)‖², t ~ U(0, 1),
    ∇log p_t(x_t|x) = −ε/σ_t. Default: VPPath().

    The target is singular where σ = 0 (t = 1 on paths that reach the data): the sampled times must stay below it,
    through the path's t_max < 1 or margin > 0; otherwise ``ValueError``. Even then the variance grows like 1/σ²
    near the data end: the implied w(λ) = 2p(λ)/σ²_{t(λ)} grows without bound (e^{λ/2} on the linear path,
    2/β(1 − t_λ) on the VP path).
    """
    path = VPPath() if path is None else path
    obj = Objective(path, "score", "score", Uniform(), ConstantWeight(), margin=margin)
    _, hi = obj.t_range
    if _is_concrete(*jax.tree_util.tree_leaves(path)) and float(path.sigma(hi)) <= 0.0:
        raise ValueError(
            f"score_matching: sigma_t = 0 at the largest sampled time t={hi} (the conditional score -eps/sigma "
            "is singular there); use margin > 0 or a path with t_max < 1"
        )
    return obj


def edm(
    path: AbstractPath | None = None,
    *,
    p_mean: Scalar = -1.2,
    p_std: Scalar = 1.2,
    sigma_data: Scalar = 0.5,
    margin: float = 1e-5,
) -> Objective:
    """EDM's training loss (Karras et al. 2022, ``training/loss.py``): λ(σ)·‖D(x_t; σ) − x‖², with
    ln σ ~ N(P_mean, P_std²) (i.e. λ = −2 ln σ ~ N(−2P_mean, (2P_std)²), truncated to the path's range) and
    λ(σ) = (σ² + σ_d²)/(σσ_d)². The network predicts the data (its preconditioning D is part of ``fn``).

    Default path: ``EDMPath()`` (σ ∈ [0.002, 80], α = 1); any path works with σ → σ/α. Implied weighting
    8·N(λ; 2.4, 2.4²)·(e^{−λ} + 0.25)/Z_path, Z_path the normal's mass on the path's λ range (1 − 1.3e-5 on the
    default path).
    """
    return Objective(
        EDMPath() if path is None else path,
        "data",
        "data",
        LogSNRNormal(-2.0 * _float(p_mean), 2.0 * _float(p_std)),
        EDMWeight(sigma_data),
        margin=margin,
    )


def sd3(
    path: AbstractPath | None = None,
    *,
    sampler: str = "logit_normal",
    shift: Scalar = 1.0,
    mean: Scalar = 0.0,
    std: Scalar = 1.0,
    mode_scale: Scalar = 1.29,
    margin: float = 1e-5,
) -> Objective:
    """Stable Diffusion 3's rectified-flow loss (Esser et al. 2024): ‖û − u‖² with t from SD3's samplers.

    SD3's network predicts v_Θ ≈ ε − x = −u in its time τ = 1 − t; the loss ‖v_Θ − (ε − x)‖² equals the velocity
    MSE here. ``sampler``: "logit_normal" (:class:`LogitNormal` (mean, std), SD3's default 0, 1), "mode"
    (:class:`ModeSampler` (mode_scale)), "cosmap" (:class:`CosMap`) or "uniform". ``shift`` ≠ 1 wraps the sampler
    in :class:`Shifted` (SD3 uses 3.0 at 1024²). Default path: linear. Implied w(λ) = e^{−λ/2}·π(t_λ) on it, with
    π the (shifted) sampler's density and t_λ = sigmoid(λ/2).
    """
    if sampler == "logit_normal":
        ts: AbstractTimeSampler = LogitNormal(mean, std)
    elif sampler == "mode":
        ts = ModeSampler(mode_scale)
    elif sampler == "cosmap":
        ts = CosMap()
    elif sampler == "uniform":
        ts = Uniform()
    else:
        raise ValueError(
            f"sd3: unknown sampler={sampler!r}; expected 'logit_normal', 'mode', 'cosmap' or 'uniform'"
        )
    if not _is_concrete(shift) or float(shift) != 1.0:
        ts = Shifted(ts, shift)
    return Objective(
        LinearPath() if path is None else path,
        "velocity",
        "velocity",
        ts,
        ConstantWeight(),
        margin=margin,
    )


def sigmoid(
    path: AbstractPath | None = None,
    bias: Scalar = 2.0,
    *,
    prediction: str | AbstractKind = "eps",
    time_sampler: AbstractTimeSampler | None = None,
    margin: float = 1e-5,
) -> Objective:
    """Kingma & Gao's sigmoid-weighted loss: ½·sigmoid(b − λ)·λ̇/π(t)·‖ε̂ − ε‖² (w(λ) = sigmoid(b − λ)).

    Written in ε-space as in the paper; ``prediction`` is what the network outputs (converted to ε).
    Default path: cosine; default t ~ U(0, 1).
    """
    return Objective(
        CosinePath() if path is None else path,
        prediction,
        "eps",
        Uniform() if time_sampler is None else time_sampler,
        KingmaGaoWeight(SigmoidWeighting(bias)),
        margin=margin,
    )


def min_snr(
    path: AbstractPath | None = None,
    gamma: Scalar = 5.0,
    *,
    prediction: str | AbstractKind = "eps",
    margin: float = 1e-5,
) -> Objective:
    """Min-SNR-γ weighting (Hang et al. 2023): min(SNR, γ)·‖x̂ − x‖², written in the prediction's own space
    (ε: min(SNR, γ)/SNR·‖ε̂ − ε‖²), t ~ U(0, 1). Default path: cosine; on it w(λ) = sech(λ/2)·min(1, γe^{−λ})/π.
    """
    return Objective(
        CosinePath() if path is None else path,
        prediction,
        prediction,
        Uniform(),
        MinSNR(gamma),
        margin=margin,
    )
