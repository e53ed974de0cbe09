"""One- and few-step generation with flow maps: MeanFlow and shortcut-model objectives and their sampler.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε, and the
probability-flow ODE dx/dτ = v_τ(x) carries the prior at τ = 0 to the data at τ = 1.

Model convention: an **average-velocity model** ``u(s, x, t)``. x is the state at time s, t the target time
(t ≥ s runs towards the data). Its flow map is

    X_{s→t}(x) = x + (t − s)·u(s, x, t),   with u(s, x, s) = v_s(x), the instantaneous PF-ODE velocity.

The exact u is the mean of v along the ODE trajectory, u(s, x, t) = (1/(t − s))∫_s^t v_τ(x_τ) dτ with x_s = x
(``GaussianMixture.average_velocity_model`` is it in closed-form accuracy). It is diffjax's per-example model
convention ``model(t, x, *cond)`` with the target time in the condition slot, so a network from
``diffjax.nn.split`` (e.g. :class:`diffjax.nn.FlowMapMLP`, called ``apply(params, s, x, t)``) trains with
``diffjax.train.fit(apply, params, objective, batch_fn, config, loss_fn=diffjax.flow_maps.batch_loss)``.

Objectives (``equinox.Module``; numbers are leaves, structure is static):

* :class:`MeanFlow` (Geng et al. 2025, "Mean Flows for One-step Generative Modeling", arXiv:2505.13447). The
  paper puts noise at its time 1 and writes u(z_t, r, t) with r < t; here its t is 1 − s and its r is 1 − t.
  Differentiating X_{s→t}(x_s) = const along a trajectory gives the **MeanFlow identity**

      u(s, x_s, t) = v_s(x_s) + (t − s)·d/ds u(s, x_s, t),   d/ds u = ∂_x u·v_s + ∂_s u,

  and training regresses u on sg(v_cond + (t − s)·JVP), with v_cond = α̇_s·x + σ̇_s·ε the conditional velocity
  of the path and JVP the forward-mode derivative of the model along (ds, dx, dt) = (1, v_cond, 0).
* :class:`Shortcut` (Frans et al. 2024, "One Step Diffusion via Shortcut Models", arXiv:2410.12557; the paper
  uses this time convention already): flow matching at step d = 0 plus the self-consistency
  u(s, x, s + 2d) = ½·u(s, x, s + d) + ½·u(s + d, x', s + 2d), x' = x + d·u(s, x, s + d), on dyadic d.

Both train through :func:`loss` (one example) and :func:`batch_loss` (a batch; ``fit``'s ``loss_fn``);
:func:`meanflow_target` and :func:`shortcut_target` are their regression targets. :func:`sample_flow_map` takes
N uniform flow-map steps from noise to data (N = NFE; 1 is one-step generation)::

    from flax import nnx
    import diffjax as dj

    apply, params = dj.nn.split(dj.nn.FlowMapMLP(2, rngs=nnx.Rngs(0)))
    objective = dj.flow_maps.MeanFlow()                      # or dj.flow_maps.Shortcut(num_steps=128)
    state, _ = dj.train.fit(apply, params, objective, batch_fn, config, loss_fn=dj.flow_maps.batch_loss)
    model = equinox.Partial(apply, state.ema_params)         # u(s, x, t)
    keys = jax.random.split(key, 1000)
    xs = jax.vmap(lambda k: dj.sample_flow_map(model, dj.LinearPath(), k, num_steps=1, shape=(2,)).samples)(keys)
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray

from .losses import AbstractTimeSampler, LogitNormal, Uniform
from .paths import AbstractPath, LinearPath

__all__ = [
    "AbstractFlowMapObjective",
    "MeanFlow",
    "Shortcut",
    "meanflow_target",
    "shortcut_target",
    "loss",
    "batch_loss",
    "sample_flow_map",
]

Scalar = Float[ArrayLike, ""]


def _float(v) -> Array:
    return jnp.asarray(v, dtype=jnp.result_type(float))


def _is_concrete(*vals) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in vals)


def _noise(key, x):
    return jax.random.normal(key, jnp.shape(x), dtype=jnp.result_type(x, float))


def _check_output(pred, x, who: str) -> None:
    if jnp.shape(pred) != jnp.shape(x):
        raise ValueError(
            f"{who}: the model u(s, x, t) returned shape {jnp.shape(pred)} for x of shape {jnp.shape(x)}; an "
            "average-velocity model maps one example to an array of the same shape (vmap for batches)"
        )


def _check_common(owner: str, path, time_sampler, margin) -> None:
    if not isinstance(path, AbstractPath):
        raise ValueError(f"{owner}: path must be a diffjax path, got {type(path).__name__}")
    if not isinstance(time_sampler, AbstractTimeSampler):
        raise ValueError(
            f"{owner}: time_sampler must be a diffjax.losses time sampler (e.g. LogitNormal(-0.4, 1.0)), got "
            f"{type(time_sampler).__name__}"
        )
    if not 0.0 <= float(margin) < 0.5:
        raise ValueError(f"{owner}: margin must lie in [0, 0.5), got margin={margin}")
    lo, hi = max(float(path.t_min), float(margin)), min(float(path.t_max), 1.0 - float(margin))
    if not lo < hi:
        raise ValueError(
            f"{owner}: margin={margin} leaves no time interval on {type(path).__name__} (t_min={path.t_min}, "
            f"t_max={path.t_max})"
        )


# ---------------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------------


class AbstractFlowMapObjective(eqx.Module):
    """A training objective for an average-velocity model u(s, x, t) (t = 0 noise, t = 1 data).

    Subclasses implement ``_loss(model, x, key)`` (one example); ``_batch_loss`` defaults to the mean of
    ``_loss`` over the batch with independent keys. Times are drawn from ``time_sampler`` truncated (by its exact
    inverse CDF, not clipped) to ``t_range`` = [max(path.t_min, margin), min(path.t_max, 1 − margin)]; unlike
    :class:`diffjax.losses.Objective` the loss is not multiplied by the truncated mass (these losses are not
    integrals over a λ-weighting, and the mass is 1 − O(margin) for the default samplers).
    """

    path: eqx.AbstractVar[AbstractPath]
    time_sampler: eqx.AbstractVar[AbstractTimeSampler]
    margin: eqx.AbstractVar[float]

    @property
    def t_range(self) -> tuple[float, float]:
        """[lo, hi]: where the objective's input times s are drawn (t = 0 noise, t = 1 data)."""
        return max(float(self.path.t_min), self.margin), min(
            float(self.path.t_max), 1.0 - self.margin
        )

    def time_at(self, u: Scalar) -> Float[Array, ""]:
        """t = F⁻¹(F(lo) + u·(F(hi) − F(lo))): the time drawn for u ∈ [0, 1], π truncated to ``t_range``."""
        dtype = jnp.result_type(float)
        lo, hi = (jnp.asarray(v, dtype) for v in self.t_range)
        f_lo, f_hi = (self.time_sampler._cdf(v, self.path) for v in (lo, hi))
        t = self.time_sampler.icdf(f_lo + jnp.asarray(u, dtype) * (f_hi - f_lo), self.path)
        return jnp.clip(t, lo, hi)  # rounding only

    def _draw_time(self, key: PRNGKeyArray) -> Float[Array, ""]:
        return self.time_at(jax.random.uniform(key, (), dtype=jnp.result_type(float)))

    def _state(self, s, x, eps):
        """(x_s, v_cond) = (α_s·x + σ_s·ε, α̇_s·x + σ̇_s·ε) at a library time s (unchecked)."""
        a, sg, da, dsg = self.path.coefficients(s)
        return a * x + sg * eps, da * x + dsg * eps

    @abc.abstractmethod
    def _loss(self, model, x, key) -> Float[Array, ""]: ...

    def _batch_loss(self, model, xs, key) -> Float[Array, ""]:
        keys = jax.random.split(key, jnp.shape(xs)[0])
        return jnp.mean(jax.vmap(lambda x, k: self._loss(model, x, k))(xs, keys))


class MeanFlow(AbstractFlowMapObjective):
    """MeanFlow (Geng et al. 2025, arXiv:2505.13447) in diffjax time (t = 0 noise, t = 1 data).

    For one example x: draw two times from π (``time_sampler``, truncated to ``t_range``), let s ≤ t be the
    smaller and the larger, and with probability 1 − ``ratio`` set t = s (plain flow matching; the paper's
    r = t). With ε ~ N(0, I), x_s = α_s·x + σ_s·ε and v = α̇_s·x + σ̇_s·ε (the path's conditional velocity;
    x − ε on :class:`~diffjax.paths.LinearPath`):

        (u, ∂u) = jax.jvp((s', x') ↦ model(s', x', t), (s, x_s), (1, v)),   u_tgt = sg(v + (t − s)·∂u),
        Δ = u − u_tgt,    loss = ‖Δ‖² / sg(‖Δ‖² + c)^p        (‖·‖² summed over the example's dimensions).

    At the exact average velocity E[u_tgt | x_s] = v_s + (t − s)·d/ds u = u (the MeanFlow identity, with
    E[v | x_s] = v_s(x_s)), so u is the minimiser of the plain MSE (``power=0``). The adaptive weight
    1/sg(‖Δ‖² + c)^p (the paper's p = 1, c = 1e-3; p = ½ gives the gradients of the pseudo-Huber loss
    2·√(‖Δ‖² + c)) makes the loss robust to large errors; for p > 0 its minimiser is no longer the conditional
    mean in general.

    π defaults to the paper's logit-normal (−0.4, 1.0): the paper's time sigmoid(n), n ~ N(−0.4, 1), is 1 − t
    here, which is :class:`diffjax.losses.LogitNormal` (−0.4, 1.0) (logit t ~ N(0.4, 1), biased to the data end).

    Args:
        path: the Gaussian path (any diffjax path; default linear).
        time_sampler: π of the two times.
        ratio: the probability that t ≠ s (paper: 0.25).
        power: p of the adaptive weight (paper: 1; 0 is the plain MSE).
        c: the constant of the adaptive weight (> 0 when p > 0).
        margin: the objective's distance from t = 0 and t = 1 (see ``t_range``).
    """

    path: AbstractPath
    time_sampler: AbstractTimeSampler
    ratio: Float[Array, ""]
    power: Float[Array, ""]
    c: Float[Array, ""]
    margin: float = eqx.field(static=True)

    def __init__(
        self,
        path: AbstractPath | None = None,
        time_sampler: AbstractTimeSampler | None = None,
        ratio: Scalar = 0.25,
        power: Scalar = 1.0,
        c: Scalar = 1e-3,
        *,
        margin: float = 1e-5,
    ):
        path = LinearPath() if path is None else path
        time_sampler = LogitNormal(-0.4, 1.0) if time_sampler is None else time_sampler
        _check_common("MeanFlow", path, time_sampler, margin)
        if _is_concrete(ratio, power, c):
            if not 0.0 <= float(ratio) <= 1.0:
                raise ValueError(
                    f"MeanFlow: ratio (the probability that t != s) must lie in [0, 1], got {ratio}"
                )
            if not float(power) >= 0.0:
                raise ValueError(f"MeanFlow: power must be >= 0 (0: plain MSE), got {power}")
            if not float(c) >= 0.0 or (float(power) > 0.0 and not float(c) > 0.0):
                raise ValueError(
                    f"MeanFlow: c must be > 0 when power > 0 (the weight is 1/(|Δ|² + c)^p), got c={c}"
                )
        self.path = path
        self.time_sampler = time_sampler
        self.ratio = _float(ratio)
        self.power = _float(power)
        self.c = _float(c)
        self.margin = float(margin)

    def draw_times(self, key: PRNGKeyArray) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """(s, t) with s ≤ t both from π truncated to ``t_range``, and t = s with probability 1 − ratio."""
        k_a, k_b, k_keep = jax.random.split(key, 3)
        a, b = self._draw_time(k_a), self._draw_time(k_b)
        s, t = jnp.minimum(a, b), jnp.maximum(a, b)
        return s, jnp.where(jax.random.bernoulli(k_keep, self.ratio), t, s)

    def _loss(self, model, x, key):
        k_t, k_eps = jax.random.split(key)
        s, t = self.draw_times(k_t)
        x_s, v = self._state(s, x, _noise(k_eps, x))
        u, u_tgt = _meanflow_pair(model, s, x_s, t, v, "MeanFlow")
        sq = jnp.sum(jnp.square(u - jax.lax.stop_gradient(u_tgt)))
        return sq / jax.lax.stop_gradient(jnp.power(sq + self.c, self.power))


def _meanflow_pair(model, s, x, t, v, who):
    """(u(s, x, t), v + (t − s)·d/ds u) with d/ds u the JVP along (ds, dx, dt) = (1, v, 0)."""
    s = jnp.asarray(s, jnp.result_type(s, float))
    u, du = jax.jvp(lambda s_, x_: model(s_, x_, t), (s, x), (jnp.ones_like(s), v.astype(x.dtype)))
    _check_output(u, x, who)
    return u, v + (t - s) * du


def meanflow_target(
    model, s: Scalar, x: Float[Array, "*shape"], t: Scalar, v: Float[Array, "*shape"]
) -> Float[Array, "*shape"]:
    """The MeanFlow regression target v + (t − s)·d/ds u(s, x, t) for one example (t = 0 noise, t = 1 data).

    d/ds u = ∂_x u·v + ∂_s u is one ``jax.jvp`` of ``model`` with tangents (ds, dx, dt) = (1, v, 0). With the
    exact velocity v = v_s(x) and the exact average velocity u this equals u(s, x, t) (the MeanFlow identity);
    :class:`MeanFlow` uses the conditional velocity instead and stops its gradient. Not stop-gradiented here.
    """
    if jnp.shape(v) != jnp.shape(x):
        raise ValueError(
            f"meanflow_target: v has shape {jnp.shape(v)} but x has shape {jnp.shape(x)} (one example each)"
        )
    return _meanflow_pair(model, s, jnp.asarray(x), t, jnp.asarray(v), "meanflow_target")[1]


def shortcut_target(
    model,
    s: Scalar,
    x: Float[Array, "*shape"],
    d: Scalar,
    *,
    instantaneous: bool | Bool[Array, ""] = False,
) -> Float[Array, "*shape"]:
    """The shortcut self-consistency target ½·u(s, x, s + d) + ½·u(s + d, x', s + 2d), x' = x + d·u(s, x, s + d).

    Two flow-map steps of size d; for the exact average velocity it equals u(s, x, s + 2d), since
    X_{s→s+2d} = X_{s+d→s+2d}∘X_{s→s+d} (t = 0 noise, t = 1 data). With ``instantaneous`` (a bool, may be
    traced) the two half steps query the model at step 0 instead, u(s, x, s) and u(s + d, x', s + d): two Euler
    steps of its velocity (:class:`Shortcut` does this at its finest level). Not stop-gradiented here.
    """
    x = jnp.asarray(x)
    s = jnp.asarray(s, jnp.result_type(s, float))
    d = jnp.asarray(d, s.dtype)
    q = jnp.where(instantaneous, jnp.zeros_like(d), d)
    u1 = model(s, x, s + q)
    _check_output(u1, x, "shortcut_target")
    x1 = x + d * u1
    u2 = model(s + d, x1, s + d + q)
    return 0.5 * (u1 + u2)


class Shortcut(AbstractFlowMapObjective):
    """Shortcut models (Frans et al. 2024, arXiv:2410.12557) for u(s, x, t) (t = 0 noise, t = 1 data).

    The step size is d = t − s. Two terms, each a squared error summed over the example's dimensions:

    * flow matching at d = 0: ‖u(s, x_s, s) − v‖², s ~ π truncated to ``t_range``, x_s = α_s·x + σ_s·ε,
      v = α̇_s·x + σ̇_s·ε;
    * self-consistency on the dyadic grid of the sampling interval [t_min, t_max] = [path.t_min, path.t_max]
      (length L) with M = ``num_steps`` (a power of two) as its finest step: a level k ~ U{0, …, log2 M − 1},
      the step 2d = L·2^{−k}, s = t_min + j·2d with j ~ U{0, …, 2^k − 1}, and

          ‖u(s, x_s, s + 2d) − sg(shortcut_target(u, s, x_s, d))‖²,

      where at the finest level (d = L/M) the two half steps query u at step 0 (``instantaneous``): the paper's
      code feeds its smallest step token there, which is also the one trained by flow matching.

    A fraction ``consistency_fraction`` of each batch (the paper's 1/4: ``bootstrap_every`` = 4) takes the
    self-consistency term, the rest flow matching; :func:`batch_loss` splits the batch (the first
    round(fraction·B) examples), :func:`loss` draws the term for one example with that probability (the same
    expectation). π defaults to U(0, 1) (the paper draws the flow-matching times on the grid of 1/M). The paper's
    clipping of x' and the target to [−4, 4] is not applied.

    Args:
        path: the Gaussian path (default linear).
        time_sampler: π of the flow-matching times.
        num_steps: M, the finest grid (a power of two >= 2; paper: 128). Sample with ``sample_flow_map`` and
            num_steps a power of two up to M.
        consistency_fraction: the fraction of the batch for self-consistency, in [0, 1].
        margin: the flow-matching times' distance from t = 0 and t = 1 (see ``t_range``).
    """

    path: AbstractPath
    time_sampler: AbstractTimeSampler
    num_steps: int = eqx.field(static=True)
    consistency_fraction: float = eqx.field(static=True)
    margin: float = eqx.field(static=True)

    def __init__(
        self,
        path: AbstractPath | None = None,
        time_sampler: AbstractTimeSampler | None = None,
        num_steps: int = 128,
        consistency_fraction: float = 0.25,
        *,
        margin: float = 1e-5,
    ):
        path = LinearPath() if path is None else path
        time_sampler = Uniform() if time_sampler is None else time_sampler
        _check_common("Shortcut", path, time_sampler, margin)
        if (
            isinstance(num_steps, bool)
            or not isinstance(num_steps, int)
            or num_steps < 2
            or num_steps & (num_steps - 1)
        ):
            raise ValueError(
                f"Shortcut: num_steps (M, the finest grid) must be a power of two >= 2, got {num_steps!r}"
            )
        if not 0.0 <= float(consistency_fraction) <= 1.0:
            raise ValueError(
                f"Shortcut: consistency_fraction must lie in [0, 1], got {consistency_fraction}"
            )
        self.path = path
        self.time_sampler = time_sampler
        self.num_steps = num_steps
        self.consistency_fraction = float(consistency_fraction)
        self.margin = float(margin)

    @property
    def levels(self) -> int:
        """log2 M: the number of self-consistency levels (steps 2d = L, L/2, …, 2L/M)."""
        return int(math.log2(self.num_steps))

    def draw_step(
        self, key: PRNGKeyArray
    ) -> tuple[Float[Array, ""], Float[Array, ""], Bool[Array, ""]]:
        """(s, d, finest) of one self-consistency example: s = t_min + j·2d on the dyadic grid, the half step d,
        and whether d = L/M is the finest step (t = 0 noise, t = 1 data)."""
        k_level, k_j = jax.random.split(key)
        dtype = jnp.result_type(float)
        lo, hi = float(self.path.t_min), float(self.path.t_max)
        k = jax.random.randint(k_level, (), 0, self.levels)
        j = jax.random.randint(k_j, (), 0, jnp.left_shift(1, k))
        two_d = (hi - lo) * jnp.exp2(-k.astype(dtype))
        return lo + j.astype(dtype) * two_d, 0.5 * two_d, k == self.levels - 1

    def _flow_matching(self, model, x, key):
        k_t, k_eps = jax.random.split(key)
        s = self._draw_time(k_t)
        x_s, v = self._state(s, x, _noise(k_eps, x))
        pred = model(s, x_s, s)
        _check_output(pred, x_s, "Shortcut")
        return jnp.sum(jnp.square(pred - v))

    def _consistency(self, model, x, key):
        k_t, k_eps = jax.random.split(key)
        s, d, finest = self.draw_step(k_t)
        x_s, _ = self._state(s, x, _noise(k_eps, x))
        target = jax.lax.stop_gradient(shortcut_target(model, s, x_s, d, instantaneous=finest))
        pred = model(s, x_s, s + 2.0 * d)
        return jnp.sum(jnp.square(pred - target))

    def _loss(self, model, x, key):
        k_choice, k_term = jax.random.split(key)
        return jax.lax.cond(
            jax.random.bernoulli(k_choice, self.consistency_fraction),
            lambda: self._consistency(model, x, k_term),
            lambda: self._flow_matching(model, x, k_term),
        )

    def _batch_loss(self, model, xs, key):
        n = jnp.shape(xs)[0]
        m = int(round(self.consistency_fraction * n))
        keys = jax.random.split(key, n)
        total = jnp.zeros((), jnp.result_type(xs, float))
        if m > 0:
            total += jnp.sum(
                jax.vmap(lambda x, k: self._consistency(model, x, k))(xs[:m], keys[:m])
            )
        if m < n:
            total += jnp.sum(
                jax.vmap(lambda x, k: self._flow_matching(model, x, k))(xs[m:], keys[m:])
            )
        return total / n


def _check_objective(objective, who: str) -> None:
    if not isinstance(objective, AbstractFlowMapObjective):
        raise ValueError(
            f"diffjax.flow_maps.{who}: objective must be a flow-map objective (MeanFlow(...) or Shortcut(...)), "
            f"got {type(objective).__name__}; diffusion objectives train with diffjax.losses.{who}"
        )


def loss(
    objective: AbstractFlowMapObjective, model, x: Float[Array, "*shape"], key: PRNGKeyArray
) -> Float[Array, ""]:
    """A one-sample estimate of ``objective`` for ONE example x and an average-velocity ``model(s, x, t)``.

    t = 0 is noise, t = 1 is data. The objective draws its times and noise from ``key`` (see :class:`MeanFlow`,
    :class:`Shortcut`); ``model`` returns an array of x's shape (else ``ValueError``). Differentiable in the
    model's parameters (the targets are stop-gradiented); no runtime check inside a training step.
    """
    _check_objective(objective, "loss")
    return objective._loss(model, jnp.asarray(x), key)


def batch_loss(
    objective: AbstractFlowMapObjective, model, xs: Float[Array, " batch *shape"], key: PRNGKeyArray
) -> Float[Array, ""]:
    """The mean over a batch of per-example losses: ``loss_fn`` of ``diffjax.train.fit`` for flow-map models.

    ``fit`` calls it as ``batch_loss(objective, fn, xs, key)`` with ``fn(s, x, t) = apply(params, s, x, t)``
    (t = 0 noise, t = 1 data). :class:`MeanFlow` averages :func:`loss` over independent keys; :class:`Shortcut`
    splits the batch between its two terms (see there).
    """
    _check_objective(objective, "batch_loss")
    xs = jnp.asarray(xs)
    if xs.ndim < 1 or xs.shape[0] < 1:
        raise ValueError(
            f"diffjax.flow_maps.batch_loss: xs must be a non-empty batch (leading axis), got shape {xs.shape}"
        )
    return objective._batch_loss(model, xs, key)


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


def _check_num_steps(num_steps) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(
            f"sample_flow_map: num_steps must be a Python int >= 1 (the number of flow-map steps, = NFE; 1 is "
            f"one-step generation), got {num_steps!r}"
        )


def _start(path, key, shape, x0):
    if shape is not None:
        try:
            shape = tuple(int(n) for n in shape)
        except TypeError:
            raise ValueError(
                f"sample_flow_map: shape must be a tuple of ints (the shape of one example), got {shape!r}"
            ) from None
    if x0 is None:
        if shape is None:
            raise ValueError(
                "sample_flow_map: pass shape=(...) (the shape of one example) or x0 (the state at t0)"
            )
        return path.prior.sample(key, shape), False
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        x0 = x0.astype(jnp.result_type(float))
    if shape is not None and shape != x0.shape:
        raise ValueError(
            f"sample_flow_map: x0 has shape {x0.shape} but shape={shape}; pass one of them, or matching ones"
        )
    return x0, True


def _messages(solve) -> dict[int, str]:
    return {
        solve.NONFINITE_INPUT: (
            "diffjax.sample_flow_map: the starting point x0 holds NaN/inf: check the x0 you passed; its sample "
            "is NaN"
        ),
        solve.NONFINITE: (
            "diffjax.sample_flow_map: non-finite samples: the model returned NaN/inf along the steps"
        ),
    }


@eqx.filter_jit
def sample_flow_map(
    model,
    path: AbstractPath,
    key: PRNGKeyArray,
    *,
    num_steps: int,
    shape: tuple[int, ...] | None = None,
    x0: Float[Array, "*shape"] | None = None,
    t0: Scalar | None = None,
    t1: Scalar | None = None,
    save_trajectory: bool = False,
    throw: bool = True,
):
    """One sample from N = ``num_steps`` flow-map steps of an average-velocity model u(s, x, t).

    t = 0 is noise, t = 1 is data; t0 = ``path.t_min`` and t1 = ``path.t_max`` by default (0 ≤ t0 < t1 ≤ 1).
    On the uniform grid t_k = t0 + k·(t1 − t0)/N, from x_{t0} = ``x0`` or a draw from ``path.prior`` (key):

        x_{t_{k+1}} = x_{t_k} + (t_{k+1} − t_k)·u(t_k, x_{t_k}, t_{k+1}),   k = 0, …, N − 1.

    With the exact u every N gives the exact ODE endpoint X_{t0→t1}(x0) (the steps compose by the semigroup
    property); N = 1 is one-step generation (MeanFlow, shortcut models), and for the plain velocity
    u(s, x, t) = v_s(x) it is Euler's method. ``nfe`` = N exactly.

    ``equinox.filter_jit``-ed: the model's array leaves (its parameters) are arguments of the compiled program, so
    a second call with new parameters of the same shapes does not recompile; ``num_steps``, ``shape`` and the
    flags are static. Batch with ``jax.vmap`` over keys and/or x0.

    Returns a :class:`diffjax.SampleResult` (``trajectory`` = the N + 1 states at ``ts`` = the grid when
    ``save_trajectory``). ``status`` is 5 (``NONFINITE_INPUT``) for a NaN/inf ``x0`` (its sample is NaN) and 4
    (``NONFINITE``) for non-finite samples; with ``throw=True`` (default) either raises instead.

    Raises:
        ValueError: ``num_steps`` not an int >= 1, neither ``shape`` nor ``x0`` given, ``x0`` and ``shape``
            disagree, bad t0/t1, or a model whose output does not have x's shape.
    """
    from . import solve  # noqa: PLC0415 (solve and sampling load diffrax: not at `import diffjax`)
    from .sampling import SampleResult  # noqa: PLC0415

    _check_num_steps(num_steps)
    num_steps = int(num_steps)
    if not isinstance(path, AbstractPath):
        raise ValueError(f"sample_flow_map: path must be a diffjax path, got {type(path).__name__}")
    t0, t1 = solve.interval(path, t0, t1)
    x0, given = _start(path, key, shape, x0)
    ok = jnp.all(jnp.isfinite(x0)) if given else jnp.asarray(True)
    x0 = jnp.where(ok, x0, jnp.zeros_like(x0))
    ts = t0.astype(x0.dtype) + (t1 - t0).astype(x0.dtype) * (
        jnp.arange(num_steps + 1, dtype=x0.dtype) / num_steps
    )
    ts = ts.at[-1].set(t1.astype(x0.dtype))

    def step(x, times):
        s, t = times
        u = model(s, x, t)
        _check_output(u, x, "sample_flow_map")
        x = x + (t - s) * jnp.asarray(u).astype(x.dtype)
        return x, (x if save_trajectory else None)

    x1, xs = jax.lax.scan(step, x0, (ts[:-1], ts[1:]))
    nan = jnp.full((), jnp.nan, x0.dtype)
    status = jnp.where(
        ok,
        jnp.where(jnp.all(jnp.isfinite(x1)), solve.SUCCESSFUL, solve.NONFINITE),
        solve.NONFINITE_INPUT,
    ).astype(jnp.int32)
    samples = jnp.where(ok, x1, nan)
    if throw:
        samples = solve.throw_if_failed(samples, status, _messages(solve))
    trajectory = None
    if save_trajectory:
        trajectory = jnp.where(ok, jnp.concatenate([x0[None], xs]), nan)
    n = jnp.asarray(num_steps, jnp.int32)
    return SampleResult(
        samples=samples,
        trajectory=trajectory,
        ts=ts if save_trajectory else None,
        num_steps=n,
        nfe=n,
        status=status,
        t_fail=nan,
        messages=tuple(sorted(_messages(solve).items())),
    )
