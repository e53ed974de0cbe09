"""Learned noise schedules: a monotone log-SNR λ_η(t) whose parameters η are trained (VDM, Kingma et al. 2021).

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε with α_t = √sigmoid(λ_t),
σ_t = √sigmoid(−λ_t) (variance preserving), λ_t increasing in t. VDM puts data at s = 0 and learns
γ(s) = −λ(1 − s); the networks below are VDM's, read through that map.

A schedule is an ``equinox.Module`` whose leaves are its parameters. ``schedule.path`` is the
:class:`diffjax.paths.LogSNRPath` of λ_η: a path like any other (samplers, likelihoods, ``vlb.elbo``, the
objectives of :mod:`diffjax.losses`), whose ``params`` leaf is the schedule itself and whose ``fn`` is one
module-level function shared by every schedule. So

* a new parameter value (one training step) is a new leaf value of the same PyTree structure: a jitted function
  taking the path or the schedule does not recompile;
* ``grad`` with respect to the schedule (or the path) reaches η through λ, λ̇ (forward-mode inside
  ``LogSNRPath``), α, σ and the inverse ``t_from_log_snr`` (bisection with implicit gradients,
  dt/dη = −(∂λ/∂η)/λ̇).

Both schedules are strictly increasing in t for every parameter value, by construction (positive weights as
softplus of raw parameters, increasing activations), and their ends are learnable with λ_max > λ_min by
construction (λ_max = λ_min + softplus(raw gap)). λ is finite on all of [0, 1] (t_eps = 0), so the ELBO window
is the whole interval: ``vlb.elbo(model, kind, schedule.path, x, key)`` needs no ``log_snr_range``.

* :class:`LearnedLinear`: λ(t) = λ_min + (λ_max − λ_min)·t (VDM's learned linear γ).
* :class:`MonotoneNet`: VDM's monotone network (``NoiseSchedule_NNet``; Kingma et al. 2021, App. H),
  γ̃(s) = l1(s) + l3(φ(l2(l1(s))))/H with φ = sigmoid, positive weights and H hidden units, rescaled to the
  learnable ends: λ(t) = λ_min + (λ_max − λ_min)·(γ̃(1) − γ̃(1 − t))/(γ̃(1) − γ̃(0)), i.e. γ(0) = −λ_max,
  γ(1) = −λ_min exactly.

Training the schedule (VDM §5 / App. I.2). The continuous-time ELBO depends on the schedule only through its
ends λ_min, λ_max (its diffusion term is ½∫_{λ_min}^{λ_max} E‖ε̂ − ε‖² dλ for a model that depends on λ), while the
variance of its Monte Carlo estimate with t ~ U(0, 1) depends on the whole shape: the schedule is the importance
distribution of λ (density 1/λ̇ at λ(t)). VDM therefore gives the model ∇_θ of the mean loss L̂ and the schedule
∇_η of the mean *squared* per-example loss E[L̂²] = Var[L̂] + E[L̂]² (the second part moves only the ends, which
lowers the bound). :func:`vdm_per_example_losses` is the per-example estimate, :func:`vdm_losses` the pair
(mean, mean square) and :func:`make_vdm_step` a jitted optax step updating both.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray, PyTree

from .kinds import AbstractKind, Eps, as_kind
from .paths import AbstractPath, LogSNRPath
from .targets import convert_at
from .vlb import AbstractDecoder, GaussianDecoder, _prior_kl

__all__ = [
    "AbstractSchedule",
    "LearnedLinear",
    "MonotoneNet",
    "schedule_log_snr",
    "vdm_per_example_losses",
    "vdm_losses",
    "VDMState",
    "init_vdm_state",
    "make_vdm_step",
]

Scalar = Float[ArrayLike, ""]

# VDM's CIFAR-10 ends γ_min = −13.3, γ_max = 5 in diffjax's convention λ = −γ.
DEFAULT_LOG_SNR_MIN = -5.0
DEFAULT_LOG_SNR_MAX = 13.3


def _float(v) -> Array:
    return jnp.asarray(v, dtype=jnp.result_type(float))


def _inv_softplus(y) -> Array:
    """softplus⁻¹(y) = log(e^y − 1) for y > 0, written stably (y + log(1 − e^{−y}))."""
    y = _float(y)
    return y + jnp.log(-jnp.expm1(-y))


def _check_ends(name: str, lam_min, lam_max) -> None:
    if any(isinstance(v, jax.core.Tracer) for v in (lam_min, lam_max)):
        return
    lo, hi = float(lam_min), float(lam_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(
            f"{name} needs finite log-SNR ends with lam_min < lam_max (t = 0 noise at lam_min, t = 1 data at "
            f"lam_max), got lam_min={lam_min}, lam_max={lam_max}; e.g. lam_min=-5.0, lam_max=13.3 (VDM)"
        )


def schedule_log_snr(schedule: AbstractSchedule, t: Scalar) -> Float[Array, ""]:
    """λ_η(t) = ``schedule.log_snr(t)``: the one static ``fn`` of every schedule's :class:`LogSNRPath`.

    Module-level (hashable, the same object for every schedule), so two schedules of the same structure give
    paths of the same PyTree structure and a jitted function does not recompile for new parameter values.
    """
    return schedule.log_snr(t)


class AbstractSchedule(eqx.Module):
    """A learned, strictly increasing log-SNR λ_η(t) with learnable ends (t = 0 noise, t = 1 data).

    Subclasses hold the parameters η as array leaves and implement ``log_snr(t)`` for a scalar t (pure, no
    check; ``vmap`` for batches). Every schedule has the learnable ends ``lam_min = λ(0)`` and
    ``lam_max = λ(1) = lam_min + softplus(raw_gap)`` (> lam_min by construction).
    """

    lam_min: Float[Array, ""]
    raw_gap: Float[Array, ""]

    @abc.abstractmethod
    def log_snr(self, t: Scalar) -> Float[Array, ""]:
        """λ_η(t), strictly increasing in t, with λ(0) = ``lam_min`` and λ(1) = ``lam_max``."""

    @property
    def gap(self) -> Float[Array, ""]:
        """λ_max − λ_min = softplus(raw_gap) > 0."""
        return jax.nn.softplus(self.raw_gap)

    @property
    def lam_max(self) -> Float[Array, ""]:
        """λ(1), the log-SNR at the data end."""
        return self.lam_min + self.gap

    @property
    def path(self) -> LogSNRPath:
        """The variance-preserving :class:`~diffjax.paths.LogSNRPath` of λ_η, with this schedule as its
        ``params`` leaf and :func:`schedule_log_snr` as its static ``fn`` (t = 0 noise, t = 1 data).

        No monotonicity check is run (monotone by construction; the check would cost a grid evaluation per
        call).
        """
        return LogSNRPath(schedule_log_snr, self, check=False)


class LearnedLinear(AbstractSchedule):
    """λ(t) = λ_min + (λ_max − λ_min)·t with learnable ends (t = 0 noise, t = 1 data).

    VDM's learned linear schedule γ(s) = γ_0 + (γ_1 − γ_0)·s with s = 1 − t, γ_0 = −λ_max, γ_1 = −λ_min. The
    parameters are ``lam_min`` and ``raw_gap`` (λ_max = λ_min + softplus(raw_gap), so λ_max > λ_min for any
    value).

    Args:
        lam_min: initial λ(0) (noise end); default −5 (VDM's γ_max = 5).
        lam_max: initial λ(1) (data end), > lam_min; default 13.3 (VDM's γ_min = −13.3).

    Example:
        >>> import jax.numpy as jnp
        >>> s = LearnedLinear(-5.0, 13.3)
        >>> round(float(s.path.log_snr(0.5)), 4)
        4.15
    """

    def __init__(
        self, lam_min: Scalar = DEFAULT_LOG_SNR_MIN, lam_max: Scalar = DEFAULT_LOG_SNR_MAX
    ):
        _check_ends("LearnedLinear", lam_min, lam_max)
        self.lam_min = _float(lam_min)
        self.raw_gap = _inv_softplus(_float(lam_max) - self.lam_min)

    def log_snr(self, t):
        return self.lam_min + self.gap * t


class MonotoneNet(AbstractSchedule):
    """VDM's monotone network schedule (Kingma et al. 2021, App. H; their ``NoiseSchedule_NNet``).

    In VDM's time s = 1 − t (s = 0 data), with w⁺ = softplus(w) > 0 and H hidden units:

        l1(s) = w1⁺·s + b1,   γ̃(s) = l1(s) + (1/H)·Σ_j w3⁺_j·sigmoid(w2⁺_j·l1(s) + b2_j),

    strictly increasing in s (dγ̃/ds = w1⁺·(1 + (1/H)Σ_j w3⁺_j w2⁺_j sigmoid′(·)) > 0), rescaled to the learnable
    ends γ(0) = −λ_max, γ(1) = −λ_min; in diffjax's time (t = 0 noise, t = 1 data)

        λ(t) = −γ(1 − t) = λ_min + (λ_max − λ_min)·(γ̃(1) − γ̃(1 − t))/(γ̃(1) − γ̃(0)),

    exact at both ends and strictly increasing for every parameter value (in floating point: while the
    softplus weights do not underflow, raw weights above about −87 in float32).

    Initialisation (as VDM's, near the linear schedule): l1 maps s to the γ range, w2⁺ = softplus(N(0, 1))
    with the sigmoid centres b2_j = −w2⁺_j·c_j spread uniformly over that range, and small output weights
    w3⁺ = 0.01, so λ starts within about 1e-3·(λ_max − λ_min) of :class:`LearnedLinear`.

    Args:
        key: PRNG key for the initial weights.
        lam_min, lam_max: initial ends λ(0) (noise) < λ(1) (data); defaults −5 and 13.3 (VDM).
        hidden: H, the number of hidden units (VDM: 1024).
    """

    w1: Float[Array, ""]
    b1: Float[Array, ""]
    w2: Float[Array, " hidden"]
    b2: Float[Array, " hidden"]
    w3: Float[Array, " hidden"]

    def __init__(
        self,
        key: PRNGKeyArray,
        lam_min: Scalar = DEFAULT_LOG_SNR_MIN,
        lam_max: Scalar = DEFAULT_LOG_SNR_MAX,
        hidden: int = 1024,
    ):
        _check_ends("MonotoneNet", lam_min, lam_max)
        if int(hidden) < 1:
            raise ValueError(f"MonotoneNet: hidden must be a positive int, got hidden={hidden}")
        hidden = int(hidden)
        f = jnp.result_type(float)
        self.lam_min = _float(lam_min)
        gap = _float(lam_max) - self.lam_min
        self.raw_gap = _inv_softplus(gap)
        k2, kc = jax.random.split(key)
        # l1(s) = γ_0 + (γ_1 − γ_0)·s ≈ VDM's γ(s) at initialisation
        self.w1 = _inv_softplus(gap)
        self.b1 = -(self.lam_min + gap)
        self.w2 = jax.random.normal(k2, (hidden,), f)
        centres = self.b1 + gap * jax.random.uniform(kc, (hidden,), f)
        self.b2 = -jax.nn.softplus(self.w2) * centres
        self.w3 = jnp.full((hidden,), _inv_softplus(0.01), f)

    @property
    def hidden(self) -> int:
        """H, the number of hidden units."""
        return self.w2.shape[0]

    def gamma_tilde(self, s: Scalar) -> Float[Array, ""]:
        """γ̃(s) = l1(s) + l3(sigmoid(l2(l1(s))))/H, increasing in VDM's time s = 1 − t (unnormalised)."""
        h1 = jax.nn.softplus(self.w1) * s + self.b1
        h2 = jax.nn.sigmoid(jax.nn.softplus(self.w2) * h1 + self.b2)
        return h1 + jnp.dot(jax.nn.softplus(self.w3), h2) / self.hidden

    def log_snr(self, t):
        t = jnp.asarray(t)
        one = jnp.ones_like(t)
        g0, g1, gs = self.gamma_tilde(0.0 * one), self.gamma_tilde(one), self.gamma_tilde(1.0 - t)
        return self.lam_min + self.gap * ((g1 - gs) / (g1 - g0))


# ---------------------------------------------------------------------------------------------------------------
# VDM's joint training: the model on the mean loss, the schedule on the mean squared loss
# ---------------------------------------------------------------------------------------------------------------
def _one_example_loss(fn, kind, path, decoder, prior, window, x, t, eps, key):
    """−ELBO of one example with one (t, ε): prior KL + reconstruction + ½(t1 − t0)λ̇_t‖ε̂ − ε‖²."""
    t0, t1, lam1 = window
    coefficients = path.coefficients(t)
    a, s, _, _ = coefficients
    x_t = a * x + s * eps
    pred = fn(t, x_t)
    if jnp.shape(pred) != x_t.shape:
        raise ValueError(
            f"vdm_per_example_losses: the model returned shape {jnp.shape(pred)} for an example of shape "
            f"{x_t.shape}; fn(t, x_t) maps one example to a prediction of the same shape"
        )
    eps_hat = convert_at(pred, kind, Eps(), coefficients, x_t)
    diffusion = 0.5 * (t1 - t0) * path.d_log_snr(t) * jnp.sum(jnp.square(eps_hat - eps))
    reconstruction, _ = decoder.reconstruction(path, x, t1, lam1, key, 2)
    return _prior_kl(path, prior, t0, x) + reconstruction + diffusion


def vdm_per_example_losses(
    fn: Callable,
    kind: str | AbstractKind,
    path: AbstractPath,
    xs: Float[Array, " batch *shape"],
    key: PRNGKeyArray,
    *,
    decoder: AbstractDecoder | None = None,
    prior=None,
    stratified: bool = True,
) -> Float[Array, " batch"]:
    """VDM's per-example continuous-time loss L̂_i, an unbiased one-sample estimate of −ELBO(x_i) in nats.

    With the window [t0, t1] = [path.t_min, path.t_max] (t = 0 noise, t = 1 data; all of [0, 1] for a
    schedule's path) and one (t_i, ε_i) per example,

        L̂_i = KL(N(α_{t0}x_i, σ_{t0}²I) ‖ p_0) + E[−log p(x_i | x_{t1})] + ½(t1 − t0)·λ̇(t_i)·‖ε̂(t_i, x_{t_i}) − ε_i‖²,

    t_i uniform on [t0, t1]: with ``stratified=True`` VDM's low-discrepancy times u_i = (u_0 + i/B) mod 1 (one
    u_0 per batch), else iid. The expectation is the −ELBO of :func:`diffjax.vlb.elbo`; unlike its default
    λ-uniform sampler, uniform t makes the variance depend on the schedule (the schedule is the importance
    distribution of λ), which is what VDM trains it on.

    Args:
        fn: the model ``fn(t, x_t)`` of kind ``kind`` for one example (a PyTree to differentiate).
        kind: the model's prediction kind (name or :mod:`diffjax.kinds` object); converted to ε exactly.
        path: the path, e.g. ``schedule.path``; the window must have finite λ (true for every schedule).
        xs: a batch of examples (leading axis).
        key: PRNG key for the times, noises and (discrete decoder) reconstruction draws.
        decoder: a :mod:`diffjax.vlb` decoder; default :class:`~diffjax.vlb.GaussianDecoder` (closed form);
            :class:`~diffjax.vlb.DiscreteDecoder` uses two draws of ε per example.
        prior: the noise-end distribution (a :class:`diffjax.paths.Normal`); default ``path.prior``.
        stratified: low-discrepancy times across the batch (default) or iid.

    Returns:
        (B,) per-example losses L̂_i.
    """
    kind = as_kind(kind, "kind")
    decoder = GaussianDecoder() if decoder is None else decoder
    if not isinstance(decoder, AbstractDecoder):
        raise ValueError(
            f"vdm_per_example_losses: decoder must be a diffjax.vlb decoder (GaussianDecoder(), "
            f"DiscreteDecoder(num_levels, data_range)), got {type(decoder).__name__}"
        )
    if not isinstance(path, AbstractPath):
        raise ValueError(
            f"vdm_per_example_losses: path must be a diffjax path, got {type(path).__name__}"
        )
    prior = path.prior if prior is None else prior
    xs = jnp.asarray(xs)
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        xs = xs.astype(jnp.result_type(float))
    n = xs.shape[0]
    dtype = xs.dtype
    t0, t1 = (jnp.asarray(float(v), dtype) for v in (path.t_min, path.t_max))
    window = (t0, t1, path.log_snr(t1))
    k_u, k_eps, k_rec = jax.random.split(key, 3)
    if stratified:
        u0 = jax.random.uniform(k_u, (), dtype)
        us = jnp.mod(u0 + jnp.arange(n, dtype=dtype) / n, 1.0)
    else:
        us = jax.random.uniform(k_u, (n,), dtype)
    ts = t0 + us * (t1 - t0)
    eps = jax.random.normal(k_eps, xs.shape, dtype)
    rec_keys = jax.random.split(k_rec, n)
    return jax.vmap(
        lambda x, t, e, k: _one_example_loss(fn, kind, path, decoder, prior, window, x, t, e, k)
    )(xs, ts, eps, rec_keys)


def vdm_losses(
    fn: Callable,
    kind: str | AbstractKind,
    path: AbstractPath,
    xs: Float[Array, " batch *shape"],
    key: PRNGKeyArray,
    **kwargs,
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(mean L̂_i, mean L̂_i²) over the batch: the model's loss and the schedule's loss (VDM §5).

    The first is minimised over the model, the second over the schedule (E[L̂²] = Var[L̂] + E[L̂]²: the variance
    of the estimator plus the squared bound, which only the ends move). Same arguments as
    :func:`vdm_per_example_losses` (t = 0 noise, t = 1 data).
    """
    per = vdm_per_example_losses(fn, kind, path, xs, key, **kwargs)
    return jnp.mean(per), jnp.mean(jnp.square(per))


class VDMState(NamedTuple):
    """The joint training state of a model and its learned schedule (one PyTree, saved by orbax as is).

    Attributes:
        params, opt_state, ema_params: the model's parameters θ, optax state and EMA (as in
            :class:`diffjax.train.TrainState`).
        schedule: the :class:`AbstractSchedule` η (its path is ``schedule.path``).
        schedule_opt_state: the schedule optimizer's state.
        step: int32 scalar, steps taken; key: the run's base key data (step s uses ``fold_in(key, s)``).
    """

    params: PyTree
    opt_state: PyTree
    ema_params: PyTree
    schedule: AbstractSchedule
    schedule_opt_state: PyTree
    step: Array
    key: Array


def init_vdm_state(
    params: PyTree, schedule: AbstractSchedule, optimizer, schedule_optimizer, key: PRNGKeyArray
) -> VDMState:
    """A fresh :class:`VDMState`: step 0, EMA = params, both optimizers initialised."""
    from . import train  # noqa: PLC0415 (optax loads only for training)

    if not isinstance(schedule, AbstractSchedule):
        raise ValueError(
            f"init_vdm_state: schedule must be a diffjax.schedules schedule (LearnedLinear, MonotoneNet), got "
            f"{type(schedule).__name__}"
        )
    base = train.init_state(params, optimizer, key)
    schedule = jax.tree.map(jnp.copy, schedule)
    return VDMState(
        base.params,
        base.opt_state,
        base.ema_params,
        schedule,
        schedule_optimizer.init(schedule),
        base.step,
        base.key,
    )


def make_vdm_step(
    apply: Callable,
    optimizer,
    schedule_optimizer,
    ema_decay: float = 0.0,
    *,
    kind: str | AbstractKind = "eps",
    time_input: str = "t",
    decoder: AbstractDecoder | None = None,
    stratified: bool = True,
    schedule_objective: str = "second_moment",
    donate: bool = True,
) -> Callable[[VDMState, Array], tuple[VDMState, dict[str, Array]]]:
    """A jitted ``step(state, batch) -> (state, metrics)`` training a model and its schedule jointly (VDM §5).

    With θ = ``state.params``, η = ``state.schedule``, k_s = ``fold_in(state.key, s)`` and L̂_i the per-example
    losses of :func:`vdm_per_example_losses` on ``η.path`` for the model ``apply(θ, t, x)``:

        g_θ = ∇_θ mean_i L̂_i,    g_η = ∇_η mean_i L̂_i²     (one forward pass, two cotangents),

    then θ and η are updated by their optimizers and θ̄ ← β_s θ̄ + (1 − β_s) θ (the EMA of
    :func:`diffjax.train.make_train_step`). For a model held fixed pass ``optax.set_to_zero()`` as ``optimizer``.

    Args:
        apply: ``apply(params, time, x)`` for one example, predicting ``kind``.
        optimizer, schedule_optimizer: optax transformations for θ and η.
        ema_decay: β of the parameter EMA, in [0, 1).
        kind: the model's prediction kind.
        time_input: what the model is given as its time: ``"t"`` (t ∈ [0, 1], t = 0 noise) or ``"log_snr"``
            (λ_η(t), as VDM conditions its network on γ_t: then the ELBO depends on η only through its ends, and
            the sampler's model is ``lambda t, x: apply(θ, η.path.log_snr(t), x)``).
        decoder, stratified: as in :func:`vdm_per_example_losses`.
        schedule_objective: ``"second_moment"`` (VDM: g_η = ∇_η mean L̂², cotangent 2L̂_i/B) or
            ``"variance"`` (g_η = ∇_η of the batch variance with the batch mean L̄ held fixed, cotangent
            2(L̂_i − L̄)/B: the ends then get no push towards E[L̂] = 0, which the second moment gives a loss that
            can be negative, as continuous-data −ELBOs in nats are).
        donate: donate the input state's buffers.

    Metrics: ``loss`` (mean L̂), ``loss_sq`` (mean L̂²), ``loss_var`` (their per-example variance
    loss_sq − loss²), ``grad_norm``, ``schedule_grad_norm``, ``log_snr_min``, ``log_snr_max``.
    """
    import optax  # noqa: PLC0415

    from . import train  # noqa: PLC0415

    if not callable(apply):
        raise ValueError(f"make_vdm_step: apply must be callable, got {type(apply).__name__}")
    if not 0 <= float(ema_decay) < 1:
        raise ValueError(f"make_vdm_step: ema_decay must lie in [0, 1), got {ema_decay}")
    if time_input not in ("t", "log_snr"):
        raise ValueError(f"make_vdm_step: time_input must be 't' or 'log_snr', got {time_input!r}")
    if schedule_objective not in ("second_moment", "variance"):
        raise ValueError(
            "make_vdm_step: schedule_objective must be 'second_moment' or 'variance', got "
            f"{schedule_objective!r}"
        )
    kind = as_kind(kind, "kind")

    def step(state: VDMState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)

        def per_example(params, schedule):
            path = schedule.path
            if time_input == "t":
                fn = lambda t, x: apply(params, t, x)  # noqa: E731
            else:
                fn = lambda t, x: apply(params, path.log_snr(t), x)  # noqa: E731
            return vdm_per_example_losses(
                fn, kind, path, batch, key, decoder=decoder, stratified=stratified
            )

        per, vjp = jax.vjp(per_example, state.params, state.schedule)
        n = per.shape[0]
        g_model, _ = vjp(jnp.full_like(per, 1.0 / n))
        centre = jnp.mean(per) if schedule_objective == "variance" else 0.0
        _, g_schedule = vjp(2.0 * jax.lax.stop_gradient(per - centre) / n)
        updates, opt_state = optimizer.update(g_model, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        s_updates, s_opt_state = schedule_optimizer.update(
            g_schedule, state.schedule_opt_state, state.schedule
        )
        schedule = optax.apply_updates(state.schedule, s_updates)
        ema = train.ema_update(state.ema_params, params, train.ema_decay_at(ema_decay, state.step))
        loss, loss_sq = jnp.mean(per), jnp.mean(jnp.square(per))
        metrics = {
            "loss": loss,
            "loss_sq": loss_sq,
            "loss_var": loss_sq - jnp.square(loss),
            "grad_norm": optax.global_norm(g_model),
            "schedule_grad_norm": optax.global_norm(g_schedule),
            "log_snr_min": state.schedule.lam_min,
            "log_snr_max": state.schedule.lam_max,
        }
        new = VDMState(params, opt_state, ema, schedule, s_opt_state, state.step + 1, state.key)
        return new, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())
