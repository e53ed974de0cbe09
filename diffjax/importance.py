"""The noise schedule as importance sampling: variance-minimizing time proposals and EDM2's uncertainty weighting.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε, λ_t = log(α_t²/σ_t²) increases in t.

Kingma & Gao 2023 ("Understanding Diffusion Objectives", §3–4): an objective with λ-weighting w(λ) has the
expectation ½∫ w(λ)·E‖ε̂ − ε‖² dλ whatever density p(λ) its training times are drawn from; with the factor
c(t) = w·λ̇/(2πκ²) (:class:`diffjax.losses.KingmaGaoWeight`) each example's loss is the importance-sampling
estimate ½(w(λ)/p(λ))·ℓ(λ), ℓ = ‖ε̂ − ε‖². The proposal p changes only the estimator's variance,

    Var = ∫ m(λ)/p(λ) dλ − L²,   m(λ) = E[(½w(λ)ℓ(λ))² | λ],

which is smallest for p*(λ) ∝ √m(λ) (VDM, Kingma et al. 2021, App. I.2, trains its schedule for the same end;
Kingma & Gao's "adaptive noise schedule" keeps a histogram of the loss over λ). With p constant on the bins of
a fixed λ grid the minimum of Σ_b M_b/p_b subject to Σ_b p_b·Δ_b = 1 (M_b = ∫_b m) is p_b ∝ √(M_b/Δ_b): the
mass of bin b is ∝ Δ_b·√(mean of m over the bin). Within a bin the proposal is uniform in λ, so the
mean of the observed (½wℓ)² over the examples that fell in the bin estimates M_b/Δ_b without bias.

:class:`AdaptiveLogSNR` is that proposal: a piecewise-constant density in λ whose bin masses follow exponential
moving averages of the observed (½wℓ)² per bin, mixed with a uniform floor so that p > 0 on the whole range
(the estimate stays unbiased only where p > 0). Its statistics are PyTree leaves, so an updated proposal enters a
compiled step as an argument (no recompilation). Online use: the proposal at step s depends only on the draws of
steps < s, so conditionally on the past every step's loss is still an unbiased estimate of the same expectation;
only its variance changes. :func:`make_adaptive_step` is a jitted training step that updates the model and then
the proposal from that step's own draws.

:func:`uncertainty_batch_loss` is EDM2's learned uncertainty weighting (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", §5): the model also returns a scalar u(t) and each
example's loss L becomes L/e^{u(t)} + u(t), whose minimiser in u is u*(t) = log E[L | t], so the effective
weighting is w(λ)/E[L | λ]: every noise level contributes equally to the gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .losses import (
    AbstractTimeSampler,
    AbstractWeighting,
    ELBOWeighting,
    Objective,
    Uniform,
    _loss_at,
    draw,
    weighted_objective,
)
from .paths import AbstractPath

__all__ = [
    "AdaptiveLogSNR",
    "variance_minimizing_objective",
    "integrand_samples",
    "update_proposal",
    "make_adaptive_step",
    "uncertainty_batch_loss",
]

Scalar = Float[ArrayLike, ""]


class AdaptiveLogSNR(AbstractTimeSampler):
    """A piecewise-constant density in λ on the grid ``edges``, adapted to minimise the loss estimate's variance.

    Bin b = [edges_b, edges_{b+1}) of width Δ_b has probability mass

        P_b = (1 − floor)·Δ_b·√μ_b / Σ_c Δ_c·√μ_c + floor·Δ_b / Σ_c Δ_c,   μ_b = sums_b / counts_b,

    where ``sums`` and ``counts`` are exponential moving averages (decay ``decay``) of Σ(½wℓ)² and of the number
    of examples per bin (:meth:`update`); a bin never observed takes the mean μ of the observed ones (all bins
    equal at the start: uniform in λ). The density of λ is P_b/Δ_b inside the grid and 0 outside; the CDF is
    piecewise linear in λ, t = ``path.t_from_log_snr(λ)`` (t = 0 noise, t = 1 data), and the density in t is
    p(λ_t)·λ̇_t. The grid must cover the objective's λ range (:func:`variance_minimizing_objective` builds it so),
    otherwise the part outside would never be sampled.

    Args:
        edges: the increasing bin edges in λ (K + 1 finite values).
        decay: EMA decay of the per-bin statistics, in [0, 1).
        floor: the uniform share of the mixture, in (0, 1]: the density is at least floor/(λ_K − λ_0).
    """

    edges: Float[Array, " K1"]
    sums: Float[Array, " K"]
    counts: Float[Array, " K"]
    decay: float = eqx.field(static=True)
    floor: float = eqx.field(static=True)

    def __init__(self, edges, decay: float = 0.99, floor: float = 0.05, *, sums=None, counts=None):
        edges = jnp.asarray(edges, dtype=jnp.result_type(float))
        if not isinstance(edges, jax.core.Tracer):
            if edges.ndim != 1 or edges.shape[0] < 2 or not bool(jnp.all(jnp.isfinite(edges))):
                raise ValueError(
                    f"AdaptiveLogSNR: edges must be a 1-D array of at least 2 finite log-SNR values, got "
                    f"shape {edges.shape}; build it with variance_minimizing_objective(...) or jnp.linspace"
                )
            if not bool(jnp.all(jnp.diff(edges) > 0)):
                raise ValueError("AdaptiveLogSNR: edges must be strictly increasing in λ")
        if not 0.0 <= float(decay) < 1.0:
            raise ValueError(f"AdaptiveLogSNR: decay must lie in [0, 1), got decay={decay}")
        if not 0.0 < float(floor) <= 1.0:
            raise ValueError(
                f"AdaptiveLogSNR: floor must lie in (0, 1] (p > 0 everywhere keeps the loss unbiased), got "
                f"floor={floor}"
            )
        k = edges.shape[0] - 1
        self.edges = edges
        self.sums = jnp.zeros(k, edges.dtype) if sums is None else jnp.asarray(sums, edges.dtype)
        self.counts = (
            jnp.zeros(k, edges.dtype) if counts is None else jnp.asarray(counts, edges.dtype)
        )
        self.decay = float(decay)
        self.floor = float(floor)

    def masses(self) -> Float[Array, " K"]:
        """P_b, the probability of each bin (sums to 1)."""
        widths = jnp.diff(self.edges)
        seen = self.counts > 0
        mean = self.sums / jnp.where(seen, self.counts, 1.0)
        fallback = jnp.where(
            jnp.any(seen), jnp.sum(jnp.where(seen, mean, 0.0)) / jnp.maximum(jnp.sum(seen), 1), 1.0
        )
        score = widths * jnp.sqrt(jnp.where(seen, mean, fallback))
        total = jnp.sum(score)
        adaptive = jnp.where(
            total > 0, score / jnp.where(total > 0, total, 1.0), widths / jnp.sum(widths)
        )
        return (1.0 - self.floor) * adaptive + self.floor * widths / jnp.sum(widths)

    def _cumulative(self):
        return jnp.concatenate([jnp.zeros(1, self.edges.dtype), jnp.cumsum(self.masses())])

    def log_snr_cdf(self, lam: Scalar) -> Float[Array, ""]:
        """P(Λ ≤ λ), piecewise linear on the grid (0 below it, 1 above it)."""
        lam = jnp.clip(jnp.asarray(lam, self.edges.dtype), self.edges[0], self.edges[-1])
        return jnp.interp(lam, self.edges, self._cumulative())

    def log_snr_icdf(self, u: Scalar) -> Float[Array, ""]:
        """The λ with P(Λ ≤ λ) = u (the cumulative masses are strictly increasing: floor > 0)."""
        return jnp.interp(jnp.asarray(u, self.edges.dtype), self._cumulative(), self.edges)

    def log_snr_density(self, lam: Scalar) -> Float[Array, ""]:
        """p(λ) = P_b/Δ_b in bin b, 0 outside the grid."""
        lam = jnp.asarray(lam, self.edges.dtype)
        k = self.edges.shape[0] - 1
        b = jnp.clip(jnp.searchsorted(self.edges, lam, side="right") - 1, 0, k - 1)
        dens = self.masses()[b] / (self.edges[b + 1] - self.edges[b])
        return jnp.where((lam >= self.edges[0]) & (lam <= self.edges[-1]), dens, 0.0)

    def icdf(self, u, path):
        return path.t_from_log_snr(self.log_snr_icdf(u))

    def _cdf(self, t, path):
        return self.log_snr_cdf(path.log_snr(t))

    def _density(self, t, path):
        return self.log_snr_density(path.log_snr(t)) * path.d_log_snr(t)

    def update(self, lams: Float[Array, " n"], values: Float[Array, " n"]) -> AdaptiveLogSNR:
        """The proposal after observing the λ-integrand ``values`` = ½w(λ_i)ℓ_i at ``lams`` (pure, jittable).

        sums_b ← decay·sums_b + Σ_{i ∈ b} values_i², counts_b ← decay·counts_b + #{i ∈ b}. Use
        :func:`integrand_samples` for the values of a batch.
        """
        lams, values = jnp.asarray(lams, self.edges.dtype), jnp.asarray(values, self.edges.dtype)
        k = self.edges.shape[0] - 1
        b = jnp.clip(jnp.searchsorted(self.edges, lams, side="right") - 1, 0, k - 1)
        onehot = jax.nn.one_hot(b, k, dtype=self.edges.dtype)
        sums = self.decay * self.sums + onehot.T @ jnp.square(values)
        counts = self.decay * self.counts + jnp.sum(onehot, axis=0)
        return eqx.tree_at(lambda s: (s.sums, s.counts), self, (sums, counts))


def variance_minimizing_objective(
    path: AbstractPath,
    prediction,
    weighting: AbstractWeighting | None = None,
    *,
    num_bins: int = 32,
    decay: float = 0.99,
    floor: float = 0.05,
    space=None,
    margin: float = 1e-5,
) -> Objective:
    """The objective ½∫ w(λ)·E‖ε̂ − ε‖² dλ with an :class:`AdaptiveLogSNR` proposal over its whole λ range.

    The λ range is [λ(lo), λ(hi)] with (lo, hi) = ``t_range`` = [max(path.t_min, margin),
    min(path.t_max, 1 − margin)] (t = 0 noise, t = 1 data), split into ``num_bins`` equal bins; the proposal
    starts uniform in λ. Default weighting: the ELBO's w = 1. Its expectation equals that of
    ``losses.weighted_objective(path, prediction, weighting)`` with any time sampler, for every state of the
    proposal; update the proposal with :func:`update_proposal` (or train with :func:`make_adaptive_step`).
    """
    weighting = ELBOWeighting() if weighting is None else weighting
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(
            f"variance_minimizing_objective: num_bins must be an int >= 1, got {num_bins!r}"
        )
    probe = weighted_objective(path, prediction, weighting, Uniform(), space=space, margin=margin)
    lo, hi = probe.t_range
    lam_lo, lam_hi = (float(path.log_snr(v)) for v in (lo, hi))
    if not (jnp.isfinite(lam_lo) and jnp.isfinite(lam_hi)):
        raise ValueError(
            f"variance_minimizing_objective: the log-SNR range [{lam_lo}, {lam_hi}] of t_range=({lo}, {hi}) "
            "is not finite; pass a margin > 0"
        )
    proposal = AdaptiveLogSNR(jnp.linspace(lam_lo, lam_hi, num_bins + 1), decay, floor)
    return weighted_objective(path, prediction, weighting, proposal, space=space, margin=margin)


def integrand_samples(
    objective: Objective, fn, xs: Float[Array, " batch *shape"], key: PRNGKeyArray
) -> tuple[Float[Array, " batch"], Float[Array, " batch"], Float[Array, " batch"]]:
    """``(losses, lams, values)`` of a batch with the draws of :func:`diffjax.losses.batch_loss` for ``key``.

    ``losses`` are the per-example losses (their mean is ``batch_loss``), ``lams`` the λ of the drawn times and
    ``values`` the λ-integrand ½w(λ)ℓ = c(t)·‖ŷ − y‖²·π(t)/λ̇_t, which does not depend on the time sampler
    (t = 0 noise, t = 1 data). Pure, no check inside.
    """
    n = jnp.shape(xs)[0]
    path, sampler = objective.path, objective.time_sampler
    mass = objective.mass()

    def one(x, k):
        t, eps = draw(objective, k, x)
        per = _loss_at(objective, fn, x, t, eps)
        value = per * sampler._density(t, path) / path.d_log_snr(t)
        return mass * per, path.log_snr(t), value

    return jax.vmap(one)(xs, jax.random.split(key, n))


def update_proposal(objective: Objective, lams, values) -> Objective:
    """``objective`` with its :class:`AdaptiveLogSNR` proposal updated by ``(lams, values)`` (pure)."""
    if not isinstance(objective.time_sampler, AdaptiveLogSNR):
        raise ValueError(
            f"update_proposal: the objective's time sampler must be an AdaptiveLogSNR, got "
            f"{type(objective.time_sampler).__name__}; build the objective with variance_minimizing_objective"
        )
    new = objective.time_sampler.update(lams, values)
    return eqx.tree_at(lambda o: o.time_sampler, objective, new)


def make_adaptive_step(
    apply: Callable, optimizer, ema_decay: float, *, schedule=None, donate: bool = True
) -> Callable:
    """A jitted ``step(state, objective, batch) -> (state, objective, metrics)`` that also adapts the proposal.

    The model update is exactly :func:`diffjax.train.make_train_step`'s with the objective of the call; then
    the proposal of ``objective`` (an :class:`AdaptiveLogSNR`, see :func:`variance_minimizing_objective`) is
    updated with the λ-integrand of the same draws at the parameters before the update (one more forward pass).
    The objective is an argument: an updated proposal reuses the compiled step. Metrics add ``"loss_sq"``, the
    batch mean of the squared per-example losses (for the estimator's variance). t = 0 noise, t = 1 data.
    """
    from . import train  # noqa: PLC0415 (optax and the train module load only for training)

    if not isinstance(ema_decay, float | int) or not 0 <= ema_decay < 1:
        raise ValueError(f"make_adaptive_step: ema_decay must lie in [0, 1), got {ema_decay}")

    def step(state, objective, batch):
        step_fn = train._step_fn(
            "make_adaptive_step", apply, objective, optimizer, ema_decay, schedule, None, True
        )
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        per, lams, values = integrand_samples(
            objective, lambda t, x: apply(state.params, t, x), batch, key
        )
        new_state, metrics = step_fn(state, batch)
        metrics = dict(metrics, loss_sq=jnp.mean(jnp.square(per)))
        return new_state, update_proposal(objective, lams, values), metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())


def uncertainty_batch_loss(
    objective: Objective, fn, xs: Float[Array, " batch *shape"], key: PRNGKeyArray
) -> Float[Array, ""]:
    """EDM2's uncertainty-weighted loss: mean over the batch of L_i/e^{u(t_i)} + u(t_i).

    ``fn(t, x_t)`` returns ``(prediction, u)`` with u a scalar (the model's log-uncertainty head, a function of
    t; EDM2 feeds it the noise embedding). L_i is the objective's per-example loss at the draws of
    :func:`diffjax.losses.batch_loss` for ``key`` (t = 0 noise, t = 1 data). For fixed t the minimiser is
    u* = log E[L | t], so the gradient reaching the prediction is that of L/E[L | t]: each noise level weighs
    equally. Pass to ``diffjax.train.fit`` as ``loss_fn`` with an ``apply`` that returns the pair.
    """
    n = jnp.shape(xs)[0]
    mass = objective.mass()

    def one(x, k):
        t, eps = draw(objective, k, x)
        out = fn(t, objective.path.alpha(t) * x + objective.path.sigma(t) * eps)
        if not (isinstance(out, tuple) and len(out) == 2 and jnp.shape(out[1]) == ()):
            raise ValueError(
                "uncertainty_batch_loss: fn(t, x_t) must return (prediction, u) with u a scalar "
                f"log-uncertainty, got {jax.tree.map(jnp.shape, out)}"
            )
        pred, u = out
        per = mass * _loss_at(objective, lambda t_, x_: pred, x, t, eps)  # the one evaluation above
        return per * jnp.exp(-u) + u

    return jnp.mean(jax.vmap(one)(xs, jax.random.split(key, n)))
