"""The continuous-time ELBO (variational lower bound) of a diffusion model of any prediction kind.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε, λ_t = log(α_t²/σ_t²) increases in t.
VDM (Kingma et al. 2021, "Variational Diffusion Models") puts data at s = 0; map by s = 1 − t (and VDM's
γ = −λ).

For one example x of D numbers and an integration window [t0, t1] (t0 at the noise end, t1 at the data end),

    −ELBO(x) = KL(q(x_{t0} | x) ‖ p_0)                                       (prior term, noise end)
             + E_q[−log p(x | x_{t1})]                                       (reconstruction, data end)
             + ½ ∫_{λ(t0)}^{λ(t1)} E_ε ‖ε̂_θ(x_λ; λ) − ε‖² dλ                  (diffusion term)

(formulas sheet, "Continuous-time ELBO"; formulas-detailed.md §2.1 with w ≡ 1 and §6.2):

* prior: q(x_{t0} | x) = N(α_{t0}x, σ_{t0}² I) against p_0 = N(0, τ² I) (``path.prior``), in closed form
  ½ Σ_i [(σ_{t0}² + α_{t0}² x_i²)/τ² − 1 − log(σ_{t0}²/τ²)];
* reconstruction with the continuous Gaussian decoder p(x | x_{t1}) = N(x; x_{t1}/α_{t1}, (σ_{t1}/α_{t1})² I):
  its expectation over ε is exactly (D/2)(log 2π − λ(t1) + 1) (no Monte Carlo needed). For integer data the
  VDM discrete decoder (``decoder="discrete"``) puts a softmax over the bin centres of each coordinate;
* diffusion term: ε̂ comes from the model of any kind by the exact conversion
  :func:`diffjax.targets.convert` (src=kind, dst="eps"; the kind is a name or a :mod:`diffjax.kinds` object). It is estimated by Monte Carlo, one ε per time:

  - ``"importance"`` (default): λ ~ U[λ(t0), λ(t1)] (stratified), t = ``path.t_from_log_snr(λ)``, weight
    (λ1 − λ0) — no λ̇ is needed and the weight is bounded (the integrand E‖ε̂ − ε‖² ≤ D for the exact model);
  - ``"stratified"``: t stratified over [t0, t1], weight (t1 − t0)·λ̇_t;
  - ``"antithetic"``: antithetic pairs (t, ε) and (t0 + t1 − t, −ε) of uniform times, weight (t1 − t0)·λ̇_t;
  - ``"uniform"``: iid t ~ U(t0, t1), weight (t1 − t0)·λ̇_t (the plain VDM estimator).

  All four are unbiased. Measured on Gaussian data with the exact denoiser (CosinePath, λ ∈ [−8, 9], D = 3,
  32 samples; ``tests/test_vlb.py``) the variances are about uniform 55 : antithetic 48 : stratified 30 :
  importance 5, so λ-uniform importance sampling is the default. What remains is mostly the χ² noise of ε
  at high SNR, where ε̂ ≈ 0 and ‖ε̂ − ε‖² ≈ ‖ε‖² (no control variate is applied).

``ELBOResult.stderr`` is the standard error of the Monte Carlo part. For iid samples it is the usual
sample-std/√n; for the stratified samplers it is the conservative "collapsed strata" estimate
(1/n)·√(Σ_j (y_{2j} − y_{2j+1})²) (it can only overestimate), and for antithetic pairs it is the std of pair
means/√(n/2). These need an even ``num_samples``.

The bound holds against the *model* per point (ELBO(x) ≤ log p_model(x), p_model the reverse SDE with
g² = σ²λ̇ followed by the decoder); against the data density only in expectation. With the exact denoiser,
ELBO(x) → log p_data(x) as the λ range widens (formulas-detailed.md §6.2; checked in the tests).

:func:`elbo` validates its arguments once, at its entry (kind, sampler and decoder names, the window; a traced
window gets one ``equinox.error_if``); the per-sample code that ``vmap`` runs holds no checks. It works under
``jit``, ``vmap`` and ``grad``: pass the model as a PyTree (``equinox.Partial(apply, params)``, an
``equinox.Module``, ``GaussianMixture.model``) to differentiate with respect to its parameters or to reuse one
``equinox.filter_jit`` program for new parameters; a learned schedule is a path whose leaves are parameters.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .kinds import AbstractKind, Eps, as_kind
from .paths import AbstractPath, Normal
from .targets import convert_at

__all__ = [
    "ELBOResult",
    "elbo",
    "elbo_bits_per_dim",
    "AbstractTimeEstimator",
    "LogSNRImportance",
    "StratifiedTime",
    "AntitheticTime",
    "UniformTime",
    "AbstractDecoder",
    "GaussianDecoder",
    "DiscreteDecoder",
    "SAMPLERS",
    "DECODERS",
]

Scalar = Float[ArrayLike, ""]


class ELBOResult(eqx.Module):
    """The ELBO of one example and its terms, in nats (batched along a leading axis under ``vmap``).

    elbo = −(prior_kl + reconstruction + diffusion); ``stderr`` is the Monte Carlo standard error of ``elbo``
    (from the diffusion term, plus the reconstruction term for the discrete decoder).
    ``num_dims`` is D, the number of scalars in one example (static), used by :func:`elbo_bits_per_dim`.
    """

    elbo: Float[Array, "*batch"]
    prior_kl: Float[Array, "*batch"]
    reconstruction: Float[Array, "*batch"]
    diffusion: Float[Array, "*batch"]
    stderr: Float[Array, "*batch"]
    log_snr_min: Float[Array, "*batch"]
    log_snr_max: Float[Array, "*batch"]
    num_dims: int = eqx.field(static=True)


def elbo_bits_per_dim(
    elbo: ELBOResult | Float[ArrayLike, "*batch"],
    num_dims: int | None = None,
    *,
    num_levels: int | None = None,
    scale: float = 1.0,
) -> Float[Array, "*batch"]:
    """Bits per dimension of an ELBO: −ELBO/(D ln 2), plus the dequantisation offset for continuous decoders.

    (:func:`diffjax.likelihood.bits_per_dim` is the exact-likelihood counterpart: it runs the ODE itself.)

    For integer data with L = ``num_levels`` levels, dequantised as y = (k + u)/L ∈ [0, 1) and modelled in
    x = a·y + b (a = ``scale``), the continuous ELBO in x-space gives a bound on the discrete bpd of

        bpd = −ELBO_x/(D ln 2) − log₂(a/L)       (+7 for L = 256, x ∈ [−1, 1]; +8 for x ∈ [0, 1])

    (formulas-detailed.md §5.3, as score_sde's offset). Leave ``num_levels=None`` for a discrete decoder
    (VDM reports −ELBO/(D ln 2) with no offset) or for continuous data.

    Args:
        elbo: an :class:`ELBOResult` (then ``num_dims`` defaults to its D) or ELBO values in nats.
        num_dims: D, the number of scalars per example.
        num_levels: L, the number of integer levels of the dequantised data, or None.
        scale: a, the slope of the map from y ∈ [0, 1) to the model's space.
    """
    if isinstance(elbo, ELBOResult):
        num_dims = elbo.num_dims if num_dims is None else num_dims
        value = elbo.elbo
    else:
        value = jnp.asarray(elbo)
    if num_dims is None or int(num_dims) <= 0:
        raise ValueError(
            f"elbo_bits_per_dim: num_dims must be a positive int (D, scalars per example), got {num_dims}"
        )
    bpd = -value / (int(num_dims) * math.log(2.0))
    if num_levels is not None:
        if int(num_levels) < 2 or float(scale) <= 0:
            raise ValueError(
                f"elbo_bits_per_dim: need num_levels >= 2 and scale > 0, got num_levels={num_levels}, "
                f"scale={scale}"
            )
        bpd = bpd - math.log2(float(scale) / int(num_levels))
    return bpd


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _resolve_window(path: AbstractPath, t0, t1, log_snr_range):
    """(t0, t1, λ0, λ1) with 0 ≤ t0 < t1 ≤ 1 (t = 0 noise, t = 1 data), checked once.

    The window is evaluated at trace time where its inputs are concrete (also inside ``jit``): a bad window
    raises ``ValueError`` and nothing is compiled in. Where it depends on traced values (traced t0/t1 or
    log_snr_range, a path whose parameters are traced) the same conditions are one ``equinox.error_if``.
    """
    f = jnp.result_type(float)
    lam_min = lam_max = None
    with jax.ensure_compile_time_eval():
        if log_snr_range is not None:
            if t0 is not None or t1 is not None:
                raise ValueError(
                    "elbo: give either t0/t1 or log_snr_range=(lam_min, lam_max), not both"
                )
            lam_min, lam_max = (jnp.asarray(v, f) for v in log_snr_range)
            if lam_min.shape != () or lam_max.shape != ():
                raise ValueError(
                    f"elbo: log_snr_range must be two scalars, got shapes {lam_min.shape}, "
                    f"{lam_max.shape}"
                )
            if _is_concrete(lam_min, lam_max):
                if not (bool(jnp.isfinite(lam_min)) and bool(jnp.isfinite(lam_max))):
                    raise ValueError(
                        f"elbo: log_snr_range must be finite, got ({float(lam_min)}, {float(lam_max)})"
                    )
                if not float(lam_min) < float(lam_max):
                    raise ValueError(
                        f"elbo: log_snr_range needs lam_min < lam_max, got ({float(lam_min)}, "
                        f"{float(lam_max)})"
                    )
            t0 = path.t_from_log_snr(lam_min)
            t1 = path.t_from_log_snr(lam_max)
        else:
            t0 = jnp.asarray(path.t_min if t0 is None else t0, f)
            t1 = jnp.asarray(path.t_max if t1 is None else t1, f)
        if t0.shape != () or t1.shape != ():
            raise ValueError(f"elbo: t0 and t1 must be scalars, got shapes {t0.shape}, {t1.shape}")
        if _is_concrete(t0, t1) and not (0.0 <= float(t0) < float(t1) <= 1.0):
            raise ValueError(
                f"elbo: need 0 <= t0 < t1 <= 1 (t=0 noise, t=1 data), got t0={float(t0)}, "
                f"t1={float(t1)}"
            )
        lam0, lam1 = path.log_snr(t0), path.log_snr(t1)
        concrete = _is_concrete(t0, t1, lam0, lam1)
        if log_snr_range is not None:
            concrete = concrete and _is_concrete(lam_min, lam_max)
        if concrete:
            if not (bool(jnp.isfinite(lam0)) and bool(jnp.isfinite(lam1))):
                raise ValueError(
                    f"elbo: the log-SNR is infinite on the integration window (λ(t0={float(t0):.6g})"
                    f" = {float(lam0)}, λ(t1={float(t1):.6g}) = {float(lam1)}); the ELBO needs a "
                    "finite range. Pass log_snr_range=(lam_min, lam_max), e.g. (-10.0, 12.0), or "
                    f"t0/t1 strictly inside (0, 1) for {type(path).__name__}"
                )
            if log_snr_range is not None:
                for want, got in ((lam_min, lam0), (lam_max, lam1)):
                    if abs(float(got) - float(want)) > 1e-4 * (1.0 + abs(float(want))):
                        raise ValueError(
                            f"elbo: log_snr_range=({float(lam_min)}, {float(lam_max)}) lies outside"
                            f" what {type(path).__name__} reaches on [0, 1] (λ({float(t0):.6g}) = "
                            f"{float(lam0):.6g}, λ({float(t1):.6g}) = {float(lam1):.6g}); "
                            "choose a range inside path.log_snr on [0, 1]"
                        )
                # the requested endpoints exactly (t_from_log_snr is the exact inverse on the path's range)
                lam0, lam1 = lam_min, lam_max
            elif not float(lam0) < float(lam1):
                raise ValueError(
                    f"elbo: the log-SNR must increase over the window, got λ(t0) = {float(lam0)}, "
                    f"λ(t1) = {float(lam1)}"
                )
            return t0, t1, lam0, lam1
    # traced window: the same conditions, once, at runtime
    ok = (t0 >= 0) & (t0 < t1) & (t1 <= 1) & jnp.isfinite(lam0) & jnp.isfinite(lam1) & (lam0 < lam1)
    if log_snr_range is not None:
        for want, got in ((lam_min, lam0), (lam_max, lam1)):
            ok = ok & (jnp.abs(got - want) <= 1e-4 * (1.0 + jnp.abs(want)))
    lam0 = eqx.error_if(
        lam0,
        ~ok,
        "diffjax.vlb.elbo: the window must satisfy 0 <= t0 < t1 <= 1 with a finite log-SNR increasing "
        "from λ(t0) to λ(t1), and log_snr_range must lie inside what the path reaches on [0, 1]",
    )
    if log_snr_range is not None:
        # the requested endpoints exactly; the `0·λ` keeps the check in the program
        lam0, lam1 = lam_min + 0.0 * lam0, lam_max + 0.0 * lam1
    return t0, t1, lam0, lam1


def _pair_se(y: Float[Array, " n"]) -> Float[Array, ""]:
    """Collapsed-strata SE of mean(y) for one sample per stratum (conservative)."""
    n = y.shape[0]
    d = y[0::2] - y[1::2]
    return jnp.sqrt(jnp.sum(d * d)) / n


# ---------------------------------------------------------------------------------------------------------------
# Monte Carlo estimators of the diffusion term ½∫ E‖ε̂ − ε‖² dλ over the window (t0 noise end, t1 data end)
# ---------------------------------------------------------------------------------------------------------------
class AbstractTimeEstimator(eqx.Module):
    """How the diffusion term's n samples (t_i, ε_i, weight_i) are drawn, and the variance of their mean.

    Defaults: one uniform per stratum u_i = (i + U_i)/n, t = t0 + u(t1 − t0) with weight (t1 − t0)·λ̇_t,
    iid ε, and the collapsed-strata variance (pairs of strata; needs an even n).
    """

    even: ClassVar[bool] = True

    def uniforms(self, key, n, dtype):
        return (jnp.arange(n, dtype=dtype) + jax.random.uniform(key, (n,), dtype)) / n

    def times(self, path, u, window):
        t0, t1, _, _ = window
        ts = t0 + u * (t1 - t0)
        return ts, (t1 - t0) * jax.vmap(path.d_log_snr)(ts)

    def noises(self, key, n, shape, dtype):
        return jax.random.normal(key, (n, *shape), dtype)

    def variance(self, y):
        return jnp.square(_pair_se(y))


class LogSNRImportance(AbstractTimeEstimator):
    """λ stratified-uniform on [λ(t0), λ(t1)], t = ``path.t_from_log_snr(λ)``, weight λ(t1) − λ(t0): no λ̇ and a
    bounded weight (the default; lowest variance in ``tests/test_vlb.py``)."""

    def times(self, path, u, window):
        t0, t1, lam0, lam1 = window
        ts = jnp.clip(jax.vmap(path.t_from_log_snr)(lam0 + u * (lam1 - lam0)), t0, t1)
        return ts, jnp.broadcast_to(lam1 - lam0, u.shape)


class StratifiedTime(AbstractTimeEstimator):
    """t stratified over [t0, t1], weight (t1 − t0)·λ̇_t."""


class AntitheticTime(AbstractTimeEstimator):
    """Antithetic pairs (u, ε) and (1 − u, −ε) of uniform times; the variance is that of the pair means."""

    def uniforms(self, key, n, dtype):
        v = jax.random.uniform(key, (n // 2,), dtype)
        return jnp.stack([v, 1.0 - v], axis=1).reshape(n)

    def noises(self, key, n, shape, dtype):
        e = jax.random.normal(key, (n // 2, *shape), dtype)
        return jnp.stack([e, -e], axis=1).reshape((n, *shape))

    def variance(self, y):
        pm = 0.5 * (y[0::2] + y[1::2])
        return jnp.var(pm, ddof=1) / pm.shape[0]


class UniformTime(AbstractTimeEstimator):
    """iid t ~ U(t0, t1), weight (t1 − t0)·λ̇_t (the plain VDM estimator)."""

    even: ClassVar[bool] = False

    def uniforms(self, key, n, dtype):
        return jax.random.uniform(key, (n,), dtype)

    def variance(self, y):
        return jnp.var(y, ddof=1) / y.shape[0]


_SAMPLERS = {
    "importance": LogSNRImportance,
    "stratified": StratifiedTime,
    "antithetic": AntitheticTime,
    "uniform": UniformTime,
}
SAMPLERS = tuple(_SAMPLERS)


# ---------------------------------------------------------------------------------------------------------------
# decoders: the reconstruction term E_q[−log p(x | x_{t1})] at the data end
# ---------------------------------------------------------------------------------------------------------------
class AbstractDecoder(eqx.Module):
    """``reconstruction(path, x, t1, lam1, key, n)`` → (E[−log p(x | x_{t1})], variance of the estimate)."""

    @abc.abstractmethod
    def reconstruction(self, path, x, t1, lam1, key, n): ...


class GaussianDecoder(AbstractDecoder):
    """p(x | x_{t1}) = N(x; x_{t1}/α, (σ/α)² I); its expectation over ε is (D/2)(log 2π − λ(t1) + 1) exactly."""

    def reconstruction(self, path, x, t1, lam1, key, n):
        value = 0.5 * x.size * (math.log(2.0 * math.pi) - lam1 + 1.0)
        return jnp.asarray(value, x.dtype), jnp.zeros((), x.dtype)


class DiscreteDecoder(AbstractDecoder):
    """VDM's discrete decoder: per coordinate a softmax over the ``num_levels`` bin centres
    lo + (k + ½)(hi − lo)/L of ``data_range`` = (lo, hi), logits −½((x_{t1}/α − x_k)·α/σ)², averaged over
    n draws of ε."""

    num_levels: int = eqx.field(static=True)
    data_range: tuple[float, float] = eqx.field(static=True)

    def __check_init__(self):
        lo, hi = self.data_range
        if not hi > lo or self.num_levels < 2:
            raise ValueError(
                "elbo: discrete decoder needs data_range=(lo, hi) with hi > lo and num_levels >= 2, got "
                f"{self.data_range}, {self.num_levels}"
            )

    def reconstruction(self, path, x, t1, lam1, key, n):
        lo, hi = self.data_range
        levels = self.num_levels
        width = (hi - lo) / levels
        centres = lo + (jnp.arange(levels, dtype=x.dtype) + 0.5) * width
        idx = (
            jnp.clip(jnp.round((x - lo) / width - 0.5), 0, levels - 1).astype(jnp.int32).reshape(-1)
        )
        a1, s1 = path.alpha(t1), path.sigma(t1)

        def nll(k):
            e = jax.random.normal(k, x.shape, x.dtype)
            z = (a1 * x + s1 * e).reshape(-1) / a1
            logp = jax.nn.log_softmax(
                -0.5 * jnp.square((z[:, None] - centres[None, :]) * (a1 / s1)), axis=-1
            )
            return -jnp.sum(jnp.take_along_axis(logp, idx[:, None], axis=-1))

        rec = jax.lax.map(nll, jax.random.split(key, n))
        return jnp.mean(rec), jnp.var(rec, ddof=1) / n


DECODERS = ("gaussian", "discrete")


def _as_estimator(sampler):
    if isinstance(sampler, AbstractTimeEstimator):
        return sampler
    if sampler not in _SAMPLERS:
        raise ValueError(
            f"elbo: unknown sampler={sampler!r}; expected one of {SAMPLERS} or an estimator"
        )
    return _SAMPLERS[sampler]()


def _as_decoder(decoder, num_levels, data_range):
    if isinstance(decoder, AbstractDecoder):
        return decoder
    if decoder == "gaussian":
        return GaussianDecoder()
    if decoder == "discrete":
        return DiscreteDecoder(int(num_levels), tuple(float(v) for v in data_range))
    raise ValueError(f"elbo: unknown decoder={decoder!r}; expected one of {DECODERS} or a decoder")


def _check_elbo_args(fn, path, prior, num_samples, estimator):
    if not callable(fn):
        raise ValueError(f"elbo: fn must be a callable model fn(t, x_t), got {type(fn).__name__}")
    if not isinstance(path, AbstractPath):
        raise ValueError(f"elbo: path must be a diffjax path, got {type(path).__name__}")
    if num_samples < 2 or (estimator.even and num_samples % 2):
        raise ValueError(
            f"elbo: num_samples must be >= 2 (and even for {type(estimator).__name__}, which pairs samples for "
            f"its standard error), got {num_samples}"
        )
    if not isinstance(prior, Normal):
        raise ValueError(
            f"elbo: prior must be a diffjax.paths.Normal (closed-form KL), got {type(prior).__name__}"
        )


def _prior_kl(path, prior, t0, x):
    """KL(N(α_{t0} x, σ_{t0}² I) ‖ N(0, τ² I)) at the noise end, in closed form."""
    a0, s0 = path.alpha(t0), path.sigma(t0)
    tau2 = jnp.square(prior.scale)
    r = jnp.square(s0) / tau2
    return 0.5 * (x.size * (r - 1.0 - jnp.log(r)) + jnp.square(a0) * jnp.sum(jnp.square(x)) / tau2)


def _diffusion_term(fn, kind, path, x, keys, n, estimator, window):
    """(½·mean of weight·‖ε̂ − ε‖² over n samples, the variance of that mean); keys = (times, noises)."""
    k_u, k_eps = keys
    ts, weights = estimator.times(path, estimator.uniforms(k_u, n, x.dtype), window)
    eps = estimator.noises(k_eps, n, x.shape, x.dtype)

    def sq_err(t, e):  # per sample, unchecked: t lies in the validated window by construction
        coefficients = path.coefficients(t)
        a, s, _, _ = coefficients
        x_t = a * x + s * e
        pred = fn(t, x_t)
        if jnp.shape(pred) != x_t.shape:
            raise ValueError(
                f"elbo: the model returned shape {jnp.shape(pred)} for an example of shape {x_t.shape}"
            )
        return jnp.sum(jnp.square(convert_at(pred, kind, Eps(), coefficients, x_t) - e))

    y = 0.5 * weights * jax.vmap(sq_err)(ts, eps)
    return jnp.mean(y), estimator.variance(y)


def elbo(
    fn: Callable,
    kind: str | AbstractKind,
    path: AbstractPath,
    x: Float[Array, "*shape"],
    key: PRNGKeyArray,
    *,
    num_samples: int = 32,
    t0: Scalar | None = None,
    t1: Scalar | None = None,
    log_snr_range: tuple[Scalar, Scalar] | None = None,
    sampler: str | AbstractTimeEstimator = "importance",
    prior: Normal | None = None,
    decoder: str | AbstractDecoder = "gaussian",
    num_levels: int = 256,
    data_range: tuple[float, float] = (-1.0, 1.0),
) -> ELBOResult:
    """Monte Carlo estimate of the continuous-time VDM ELBO (Kingma et al. 2021) of ONE example, in nats.

    Time: t = 0 is noise, t = 1 is data; the window [t0, t1] runs from the noise end t0 to the data end t1.

        ELBO(x) = −KL(N(α_{t0}x, σ_{t0}²I) ‖ p_0) + E[log p(x | x_{t1})] − ½∫_{λ(t0)}^{λ(t1)} E‖ε̂ − ε‖² dλ

    (see the module docstring for each term and the samplers). Batch with ``jax.vmap`` over (x, key).
    Differentiable with respect to the model's and the path's leaves (the Monte Carlo draw is fixed by ``key``).

    Args:
        fn: the model, ``fn(t, x_t) -> prediction`` of kind ``kind`` for scalar t and one example; a PyTree
            (``equinox.Partial``, an ``equinox.Module``) to differentiate or recompile-free ``filter_jit``.
        kind: a name in :data:`diffjax.kinds.KINDS` ("eps", "data", "v", "velocity", "score") or a kind object.
        path: the Gaussian path the model was trained on.
        x: one data example (any shape; D = x.size). For ``decoder="discrete"`` x holds bin centres.
        key: PRNG key for the times and noises.
        num_samples: Monte Carlo samples (one (t, ε) each) for the diffusion term; even unless "uniform".
        t0, t1: integration window (default ``path.t_min``, ``path.t_max``). Must have finite log-SNR.
        log_snr_range: alternatively (λ_min, λ_max), mapped by ``path.t_from_log_snr``; needed for paths whose
            log-SNR is infinite at t = 0 or t = 1 (LinearPath, CosinePath).
        sampler: "importance" (:class:`LogSNRImportance`, default), "stratified" (:class:`StratifiedTime`),
            "antithetic" (:class:`AntitheticTime`), "uniform" (:class:`UniformTime`), or an estimator object.
        prior: the noise-end distribution p_0 (a :class:`diffjax.paths.Normal`); default ``path.prior``.
        decoder: "gaussian" (:class:`GaussianDecoder`) or "discrete" (:class:`DiscreteDecoder` with
            ``num_levels`` and ``data_range``), or a decoder object.

    Returns:
        :class:`ELBOResult` with elbo, prior_kl, reconstruction (= E[−log p(x|x_{t1})]), diffusion, stderr.
    """
    kind = as_kind(kind, "kind")
    estimator = _as_estimator(sampler)
    dec = _as_decoder(decoder, num_levels, data_range)
    prior = path.prior if prior is None else prior
    _check_elbo_args(fn, path, prior, int(num_samples), estimator)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    window = _resolve_window(path, t0, t1, log_snr_range)
    k_u, k_eps, k_rec = jax.random.split(key, 3)
    n = int(num_samples)
    prior_kl = _prior_kl(path, prior, window[0], x)
    diffusion, var = _diffusion_term(fn, kind, path, x, (k_u, k_eps), n, estimator, window)
    reconstruction, var_rec = dec.reconstruction(path, x, window[1], window[3], k_rec, n)
    return ELBOResult(
        elbo=-(prior_kl + reconstruction + diffusion),
        prior_kl=prior_kl,
        reconstruction=jnp.asarray(reconstruction, x.dtype),
        diffusion=diffusion,
        stderr=jnp.sqrt(var + var_rec),
        log_snr_min=window[2],
        log_snr_max=window[3],
        num_dims=x.size,
    )
