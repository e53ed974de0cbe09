"""Guidance as PyTrees: rules that combine two predictions, and guided models that any sampler or likelihood takes.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε, λ_t = log(α_t²/σ_t²).

A guided model evaluates a *main* prediction ŷ_main and a *guide* prediction ŷ_guide at the same (t, x), converts
both exactly to a prediction space (:mod:`diffjax.kinds`), combines them with a rule and converts the result back to
the models' kind, so it is a drop-in model ``model(t, x)`` of that kind: ``dj.velocity_field(guided, kind, path)``
is the guided probability-flow field, and ``sample_ode`` / ``sample_sde`` / ``log_likelihood`` take it unchanged.

* :class:`CFGModel` — classifier-free guidance (Ho & Salimans 2022): main = the conditional network at c, guide =
  the same network at the null condition ∅; both come from ONE batched call (``vmap`` over the pair (∅, c)).
* :class:`AutoguidedModel` — autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of
  Itself"): the guide is a second, weaker model (fewer parameters or fewer training steps) at the same condition.

Rules (``rule(t, path, guide, main)``, pure and per example):

* :class:`CFG` — ŷ = ŷ_guide + w·(ŷ_main − ŷ_guide): w = 0 is the guide (for CFG: p(x)), w = 1 the main model
  (p(x | c)), w > 1 extrapolates (:func:`cfg` is the bare function);
* :class:`APG` — adaptive projected guidance (Sadat et al. 2025, "Eliminating Oversaturation and Artifacts of High
  Guidance Scales in Diffusion Models"): the update Δ = ŷ_main − ŷ_guide, norm-capped at r, split into its parts
  parallel and orthogonal to ŷ_main; ŷ = ŷ_main + (w − 1)(Δ_⊥ + η·Δ_∥) (:func:`apg`). η = 1, r = ∞ is CFG;
* :class:`TimeInterval`, :class:`LogSNRInterval` — a rule applied only for t (or λ) in an interval and the main
  prediction (no guidance) outside (Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
  Sample and Distribution Quality"; their σ-interval of an α = 1 path is a λ-interval, λ = −2 log σ:
  :meth:`LogSNRInterval.from_sigma`).

**Which space.** At fixed (t, x) every conversion between kinds is affine in the prediction, y_dst = A·y_src + B·x
(A, B depend on t; ``diffjax.targets.convert``). CFG's combination has weights (1 − w, w) summing to one, and an
affine map commutes with such a combination, so CFG (and autoguidance, and their interval forms) gives *the same
field* in ε-, data-, v-, velocity- or score-space: only the w of a rule applied to *one* term (e.g. a score
difference without its base) would pick up the t-dependent factor A. Nonlinear rules do depend on the space: APG's
projection and norm cap act on the vector it is given (Sadat et al. use the data prediction, its default here).
``space`` is therefore a field of every guided model; :func:`guided_space` gives each rule's default (the models'
own kind for affine rules: no conversion at all).

**Guided likelihood.** The guided field is not the probability-flow field of p(x | c)^w p(x)^{1−w} nor of any
diffusion of it: its marginals are not those of a forward process. ``log_likelihood`` of the guided field is the
exact density of the *guided sampler's* output (the push-forward of the prior along the guided ODE), a different
density from p(x | c) unless w = 1. The Gaussian-mixture oracle tests both.
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree

from .kinds import AbstractKind, Data, as_kind
from .paths import AbstractPath
from .targets import convert_at

__all__ = [
    "cfg",
    "apg",
    "AbstractGuidance",
    "CFG",
    "APG",
    "TimeInterval",
    "LogSNRInterval",
    "AbstractGuidedModel",
    "CFGModel",
    "AutoguidedModel",
    "guided_space",
]

Scalar = Float[ArrayLike, ""]


# ---------------------------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------------------------
def cfg(
    guide: Float[Array, "*shape"], main: Float[Array, "*shape"], weight: Scalar
) -> Float[Array, "*shape"]:
    """Classifier-free guidance ŷ_guide + w·(ŷ_main − ŷ_guide) (w = 0: guide, w = 1: main)."""
    return guide + weight * (main - guide)


def apg(
    guide: Float[Array, "*shape"],
    main: Float[Array, "*shape"],
    weight: Scalar,
    parallel: Scalar = 0.0,
    norm_threshold: Scalar = math.inf,
) -> Float[Array, "*shape"]:
    """Adaptive projected guidance of one example (Sadat et al. 2025, Alg. 1 without momentum).

    Δ = (ŷ_main − ŷ_guide)·min(1, r/‖Δ‖),  Δ_∥ = (⟨Δ, ŷ_main⟩/‖ŷ_main‖²)·ŷ_main,  Δ_⊥ = Δ − Δ_∥,
    ŷ = ŷ_main + (w − 1)·(Δ_⊥ + η·Δ_∥),   with η = ``parallel``, r = ``norm_threshold`` (norms over the example).

    η = 1 and r = ∞ give CFG exactly; η = 0 drops the parallel part that Sadat et al. find causes oversaturation.
    Where ŷ_main = 0 the projection is taken as 0 (Δ_∥ = 0).
    """
    diff = main - guide
    norm = jnp.sqrt(jnp.sum(jnp.square(diff)))
    diff = diff * jnp.minimum(1.0, norm_threshold / jnp.where(norm > 0, norm, 1.0))
    mm = jnp.sum(jnp.square(main))
    par = jnp.where(mm > 0, jnp.sum(diff * main) / jnp.where(mm > 0, mm, 1.0), 0.0) * main
    return main + (weight - 1.0) * (diff - par + parallel * par)


def _check_real(value, name: str, *, low=-math.inf, low_open=False, allow_inf=False):
    """A Python check of a concrete hyperparameter (traced ones pass: they are the caller's)."""
    if isinstance(value, jax.core.Tracer):
        return value
    if np.ndim(value) != 0:
        raise ValueError(f"{name} must be a real scalar, got shape {np.shape(value)}")
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{name}={value!r} must be a finite number")
    if v < low or (low_open and v == low):
        raise ValueError(f"{name}={value!r} must be {'>' if low_open else '>='} {low}")
    return value


class AbstractGuidance(eqx.Module):
    """A guidance rule ``rule(t, path, guide, main)`` → the guided prediction (same space as its inputs).

    t = 0 is noise, t = 1 is data; ``path`` gives the rule access to α, σ, λ at t (interval rules).
    """

    @abc.abstractmethod
    def __call__(self, t: Scalar, path: AbstractPath, guide, main): ...

    @property
    def affine(self) -> bool:
        """Whether the rule is affine in (guide, main) with weights summing to one: then it gives the same field in
        every prediction space, and its default space is the models' kind."""
        return True


class CFG(AbstractGuidance):
    """Classifier-free guidance with weight w (``weight``): ŷ_guide + w·(ŷ_main − ŷ_guide). Any real w; w = 0 is
    the guide (unconditional), w = 1 the main (conditional) model, w > 1 sharpens toward the condition."""

    weight: Scalar

    def __check_init__(self):
        _check_real(self.weight, "CFG weight")

    def __call__(self, t, path, guide, main):
        return cfg(guide, main, self.weight)


class APG(AbstractGuidance):
    """Adaptive projected guidance (:func:`apg`) with weight w, parallel factor η ≥ 0 and norm cap r > 0
    (default ∞: no cap). Not affine: its default space is the data prediction, as in Sadat et al. 2025."""

    weight: Scalar
    parallel: Scalar = 0.0
    norm_threshold: Scalar = math.inf

    @property
    def affine(self) -> bool:
        return False

    def __check_init__(self):
        _check_real(self.weight, "APG weight")
        _check_real(self.parallel, "APG parallel (eta)", low=0.0)
        _check_real(
            self.norm_threshold, "APG norm_threshold", low=0.0, low_open=True, allow_inf=True
        )

    def __call__(self, t, path, guide, main):
        return apg(guide, main, self.weight, self.parallel, self.norm_threshold)


class _IntervalGuidance(AbstractGuidance):
    rule: AbstractGuidance
    low: Scalar
    high: Scalar

    def __check_init__(self):
        if not isinstance(self.rule, AbstractGuidance):
            raise ValueError(
                f"{type(self).__name__}: rule must be a guidance rule (e.g. CFG(2.0)), got {type(self.rule).__name__}"
            )
        what = type(self).__name__
        _check_real(self.low, f"{what} low", allow_inf=True)
        _check_real(self.high, f"{what} high", allow_inf=True)
        concrete = not any(isinstance(v, jax.core.Tracer) for v in (self.low, self.high))
        if concrete and not float(self.low) < float(self.high):
            raise ValueError(
                f"{what}: the interval needs low < high, got low={self.low}, high={self.high}"
            )

    @property
    def affine(self) -> bool:
        return self.rule.affine

    @abc.abstractmethod
    def _variable(self, t, path): ...

    def __call__(self, t, path, guide, main):
        v = self._variable(t, path)
        inside = (v >= self.low) & (v <= self.high)
        return jnp.where(inside, self.rule(t, path, guide, main), main)


class TimeInterval(_IntervalGuidance):
    """``rule`` for t ∈ [low, high] and the main prediction elsewhere (t = 0 noise, t = 1 data)."""

    def _variable(self, t, path):
        return t


class LogSNRInterval(_IntervalGuidance):
    """``rule`` for λ_t ∈ [low, high] and the main prediction elsewhere (Kynkäänniemi et al. 2024)."""

    def _variable(self, t, path):
        return path.log_snr(t)

    @classmethod
    def from_sigma(
        cls, rule: AbstractGuidance, sigma_low: float, sigma_high: float
    ) -> LogSNRInterval:
        """The interval σ ∈ (σ_lo, σ_hi] of an α = 1 (EDM) path, as λ = −2 log σ ∈ [−2 log σ_hi, −2 log σ_lo]
        (their ImageNet-512 EDM2 setting is σ ∈ (0.28, 5.42])."""
        if not 0 < sigma_low < sigma_high:
            raise ValueError(
                f"from_sigma: need 0 < sigma_low < sigma_high, got {sigma_low}, {sigma_high}"
            )
        return cls(rule, -2.0 * math.log(sigma_high), -2.0 * math.log(sigma_low))


def guided_space(rule: AbstractGuidance, kind: str | AbstractKind) -> AbstractKind:
    """The default guidance space: the models' ``kind`` for an affine rule (no conversion, and every space gives the
    same field), the data prediction otherwise (:class:`APG`)."""
    return as_kind(kind) if rule.affine else Data()


# ---------------------------------------------------------------------------------------------------------------
# guided models
# ---------------------------------------------------------------------------------------------------------------
class AbstractGuidedModel(eqx.Module):
    """A model ``model(t, x)`` of ``kind``: the rule's combination, in ``space``, of a guide and a main prediction."""

    kind: eqx.AbstractVar[AbstractKind]
    path: eqx.AbstractVar[AbstractPath]
    guidance: eqx.AbstractVar[AbstractGuidance]
    space: eqx.AbstractVar[AbstractKind]

    @abc.abstractmethod
    def predictions(self, t, x) -> tuple[Array, Array]:
        """(guide, main) predictions of ``kind`` at (t, x)."""

    def __call__(self, t: Scalar, x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        guide, main = self.predictions(t, x)
        same = type(self.space) is type(self.kind)
        if not same:
            coeffs = self.path.coefficients(t)
            both = convert_at(jnp.stack([guide, main]), self.kind, self.space, coeffs, x)
            guide, main = both[0], both[1]
        out = self.guidance(t, self.path, guide, main)
        return out if same else convert_at(out, self.space, self.kind, coeffs, x)


def _check_parts(caller, model, kind, path, guidance):
    if not callable(model):
        raise ValueError(
            f"{caller}: model must be a callable conditional model(t, x, c), got {type(model).__name__}"
        )
    if not isinstance(path, AbstractPath):
        raise ValueError(f"{caller}: path must be a diffjax path, got {type(path).__name__}")
    if not isinstance(guidance, AbstractGuidance):
        raise ValueError(
            f"{caller}: guidance must be a rule such as diffjax.guidance.CFG(2.0), got {type(guidance).__name__}; "
            "a bare number w is CFG(w)"
        )


def _as_rule(guidance):
    if isinstance(guidance, AbstractGuidance):
        return guidance
    if isinstance(guidance, (int, float, np.number)) or (
        isinstance(guidance, jax.Array) and guidance.ndim == 0
    ):
        return CFG(guidance)
    return guidance  # rejected by _check_parts with its type


class CFGModel(AbstractGuidedModel):
    """Classifier-free guidance of one conditional network ``model(t, x, c)`` of ``kind`` at condition ``cond``.

    guide = model(t, x, ∅), main = model(t, x, c), evaluated in ONE batched call (``jax.vmap`` over the stacked
    conditions (∅, c)); combined by ``guidance`` (a rule, or a number w meaning :class:`CFG`(w)) in ``space``
    (default :func:`guided_space`). ``null`` is ∅ (for ``diffjax.nn`` models and the oracle: ``num_classes``).
    The result is a model ``(t, x) ↦ ŷ`` of ``kind``. t = 0 is noise, t = 1 is data.
    """

    model: object
    kind: AbstractKind
    path: AbstractPath
    cond: PyTree
    null: PyTree
    guidance: AbstractGuidance
    space: AbstractKind

    def __init__(self, model, kind, path, cond, null, guidance, space=None):
        guidance = _as_rule(guidance)
        _check_parts("CFGModel", model, kind, path, guidance)
        c_def, n_def = jax.tree.structure(cond), jax.tree.structure(null)
        if c_def != n_def:
            raise ValueError(
                f"CFGModel: cond and null must have the same structure, got {c_def} and {n_def}"
            )
        for c, n in zip(jax.tree.leaves(cond), jax.tree.leaves(null), strict=True):
            if jnp.shape(c) != jnp.shape(n):
                raise ValueError(
                    f"CFGModel: cond (one example's condition) has a leaf of shape {jnp.shape(c)} but null has "
                    f"{jnp.shape(n)}; pass one condition (vmap the guided sampler over a batch of conditions)"
                )
        self.model, self.kind, self.path = model, as_kind(kind), path
        self.cond, self.null, self.guidance = cond, null, guidance
        self.space = guided_space(guidance, kind) if space is None else as_kind(space, "space")

    def predictions(self, t, x):
        pair = jax.tree.map(
            lambda n, c: jnp.stack([jnp.asarray(n, jnp.result_type(c)), jnp.asarray(c)]),
            self.null,
            self.cond,
        )
        preds = jax.vmap(lambda c: self.model(t, x, c))(pair)
        return preds[0], preds[1]


class AutoguidedModel(AbstractGuidedModel):
    """Autoguidance (Karras et al. 2024): main = ``model``, guide = ``guide`` (a weaker model of the same task and
    ``kind``), both at condition ``cond`` (``model(t, x, c)``), or both unconditional ``model(t, x)`` when
    ``cond`` is None. Combined by ``guidance`` (a rule or a number w: :class:`CFG`(w), ŷ_guide + w(ŷ_main − ŷ_guide))
    in ``space``. Two network calls (different networks). t = 0 is noise, t = 1 is data.
    """

    model: object
    guide: object
    kind: AbstractKind
    path: AbstractPath
    cond: PyTree
    guidance: AbstractGuidance
    space: AbstractKind

    def __init__(self, model, guide, kind, path, guidance, cond=None, space=None):
        guidance = _as_rule(guidance)
        _check_parts("AutoguidedModel", model, kind, path, guidance)
        if not callable(guide):
            raise ValueError(
                f"AutoguidedModel: guide must be a callable model, got {type(guide).__name__}"
            )
        self.model, self.guide, self.kind, self.path = model, guide, as_kind(kind), path
        self.cond, self.guidance = cond, guidance
        self.space = guided_space(guidance, kind) if space is None else as_kind(space, "space")

    def predictions(self, t, x):
        args = () if self.cond is None else (self.cond,)
        return self.guide(t, x, *args), self.model(t, x, *args)
