"""Fields and trace estimators as PyTrees: from a network of any prediction kind to what the solvers integrate.

Time convention: **t = 0 is noise, t = 1 is data**. A *model* is a per-example callable ``model(t, x)`` with scalar
t and one example x of any shape, returning a prediction of a kind in :mod:`diffjax.kinds`. Pass it as a PyTree
whose parameters are leaves — ``equinox.Partial(apply, params)``, an ``equinox.Module``, or the oracle's
``GaussianMixture.model(kind, path)`` — so that compiled samplers and likelihoods take the parameters as
arguments: a second call with new parameters of the same shapes reuses the program, and the program's size does
not grow with the parameter count. (A plain closure works too, but it is a static part of the program: its
captured arrays are compiled in as constants and a fresh closure per call recompiles.)

* :class:`VelocityField` / :class:`ScoreField` hold (model, kind, path) and return u_t(x) / ∇log p_t(x) by the
  exact conversion of :func:`diffjax.targets.convert`; :func:`velocity_field` and :func:`score_field` build them
  from a kind's name.
* :class:`ReverseSDEDrift`, :class:`ForwardSDEDiffusion`, :class:`ConstantDiffusion`: the pieces of the reverse-time
  SDE family f = u + ½g²∇log p.
* Trace estimators :class:`ExactTrace` (O(D) extra memory per example, whatever D: its JVPs run in chunks of
  65,536 // D columns), :class:`Hutchinson` (fixed probes) and :class:`HutchPlusPlus` (exact on a sketched
  low-rank part, Hutchinson on the rest); :func:`divergence_exact` and :func:`divergence_hutchinson` are the
  one-call forms. ``per_probe`` returns each probe's estimate (the likelihood's standard error).

Batching is ``jax.vmap``; divergences act on one example and never build cross-example Jacobian blocks.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from .kinds import AbstractKind, Score, Velocity, as_kind
from .paths import AbstractPath
from .targets import convert_at

__all__ = [
    "AbstractField",
    "VelocityField",
    "ScoreField",
    "ReverseSDEDrift",
    "ForwardSDEDiffusion",
    "ConstantDiffusion",
    "velocity_field",
    "score_field",
    "integration_interval",
    "reverse_sde_drift",
    "AbstractTrace",
    "ExactTrace",
    "Hutchinson",
    "HutchPlusPlus",
    "as_trace",
    "divergence_exact",
    "divergence_hutchinson",
    "make_probes",
]

Model = Callable[[Float[Array, ""], Float[Array, "*shape"]], Float[Array, "*shape"]]

#: The exact trace runs at most this many floats of Jacobian-vector products at once (chunk × D), so its extra
#: memory is max(D, this) floats per example: O(D).
EXACT_TRACE_BUDGET = 1 << 16


# ---------------------------------------------------------------------------------------------------------------
# fields
# ---------------------------------------------------------------------------------------------------------------
class AbstractField(eqx.Module):
    """A time-dependent vector field ``field(t, x)`` on one example (t = 0 noise, t = 1 data)."""

    @abc.abstractmethod
    def __call__(self, t: Float[Array, ""], x: Float[Array, "*shape"]) -> Float[Array, "*shape"]: ...


class _ConvertedField(AbstractField):
    """``model`` (predicting ``kind`` on ``path``) converted exactly to the kind ``output`` of the field."""

    model: Model
    kind: AbstractKind
    path: AbstractPath
    output: ClassVar[AbstractKind]

    def __call__(self, t, x):
        pred = self.model(t, x)
        if type(self.kind) is type(self.output):
            return pred
        return convert_at(pred, self.kind, self.output, self.path.coefficients(t), x)


class VelocityField(_ConvertedField):
    """The probability-flow velocity u_t(x) of a ``model`` predicting ``kind`` on ``path``.

    u = convert(model(t, x), src=kind, dst=velocity) exactly; singular only where the conversion is: ε- and
    score-models where α = 0, data-models where σ = 0 (on the linear and cosine paths t = 0 and t = 1;
    :func:`integration_interval` gives where to integrate). t = 0 is noise, t = 1 is data.
    """

    output: ClassVar[AbstractKind] = Velocity()


class ScoreField(_ConvertedField):
    """The score ∇log p_t(x) of a ``model`` predicting ``kind`` on ``path`` (exact conversion; ŝ = −ε̂/σ)."""

    output: ClassVar[AbstractKind] = Score()


def _check_model(fn, name="fn"):
    if not callable(fn):
        raise ValueError(f"{name} must be a callable model(t, x), got {type(fn).__name__}")
    if not isinstance(fn, AbstractField) and isinstance(fn, AbstractPath):
        raise ValueError(f"{name} is a path; pass the model first: velocity_field(model, kind, path)")


def velocity_field(fn: Model, kind: str | AbstractKind, path: AbstractPath) -> VelocityField:
    """:class:`VelocityField` of ``fn`` (a model of ``kind``, by name or object) on ``path``."""
    _check_model(fn)
    if not isinstance(path, AbstractPath):
        raise ValueError(f"path must be a diffjax path, got {type(path).__name__}")
    return VelocityField(fn, as_kind(kind), path)


def score_field(fn: Model, kind: str | AbstractKind, path: AbstractPath) -> ScoreField:
    """:class:`ScoreField` of ``fn`` (a model of ``kind``, by name or object) on ``path``."""
    _check_model(fn)
    if not isinstance(path, AbstractPath):
        raise ValueError(f"path must be a diffjax path, got {type(path).__name__}")
    return ScoreField(fn, as_kind(kind), path)


class ForwardSDEDiffusion(eqx.Module):
    """g_t with g_t² = σ_t²λ̇_t: the diffusion of the time-reversed forward SDE (t = 0 noise, t = 1 data).

    σ²λ̇ = 2σ²α̇/α − d(σ²)/dt (finite where σ̇ is not, e.g. VP at t = 1). With this g the reverse SDE is
    score_sde's ``reverse()`` SDE and the continuous limit of DDPM/VDM ancestral sampling (formula sheet §4).
    For ``VPPath`` g² = β(1 − t). Paths with α_0 = 0 (linear, cosine) have g → ∞ at t = 0.
    """

    path: AbstractPath

    def __call__(self, t):
        a, s, da, _ = self.path.coefficients(t)
        g2 = 2.0 * s * s * da / a - self.path.d_sigma_sq(t)
        return jnp.sqrt(jnp.maximum(g2, 0.0))


class ConstantDiffusion(eqx.Module):
    """g_t = value for every t (value ≥ 0; 0 is the probability-flow ODE)."""

    value: Float[Array, ""]

    def __call__(self, t):
        return self.value * jnp.ones_like(t)


class ReverseSDEDrift(eqx.Module):
    """Drift of the reverse-time family f = u_t + ½·g_t²·∇log p_t (t from 0 noise to 1 data).

    dX = f dt + g_t dW has the marginals p_t for every g_t ≥ 0 (g = 0: the probability-flow ODE).
    """

    velocity: AbstractField | Model
    score: AbstractField | Model
    diffusion: Callable

    def __call__(self, t, x):
        g = self.diffusion(t)
        return self.velocity(t, x) + 0.5 * jnp.square(g) * self.score(t, x)


def reverse_sde_drift(velocity, score, diffusion) -> ReverseSDEDrift:
    """:class:`ReverseSDEDrift` of (velocity, score, g)."""
    return ReverseSDEDrift(velocity, score, diffusion)


DEFAULT_MARGIN = 1e-3


def integration_interval(
    path: AbstractPath, kind: str | AbstractKind, *, margin: float = DEFAULT_MARGIN
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """(t0, t1): where to integrate the velocity of a ``kind`` model on ``path`` (t = 0 noise, t = 1 data).

    Starts from the path's own interval [``path.t_min``, ``path.t_max``] and moves an end inward by ``margin``
    where the conversion to a velocity divides by zero. Writing the prediction as c·x̂ + d·ε̂ and
    x_t = α·x̂ + σ·ε̂, the conversion solves a 2×2 system of determinant Δ = c·σ − d·α (``diffjax.convert``):

    * ``"data"`` (c, d = 1, 0): Δ = σ, singular where σ = 0, the data end of ``LinearPath`` and ``CosinePath``;
    * ``"eps"``, ``"score"`` (0, 1): Δ = −α, singular where α = 0, their noise end;
    * ``"v"`` (−σ, α): Δ = −(α² + σ²) < 0 and ``"velocity"``: never singular.

    Near a singular end the field is finite but ill-conditioned (an error δ in ε̂ moves u by ~δ·α̇/α), which is
    why ``margin`` is 1e-3 rather than machine precision. A sampler run on the returned interval leaves data
    perturbed by σ_{t1} at the data end (σ_{t1} ≈ 1e-3 for the linear path), which ``log_likelihood`` reports
    (``endpoint_sigma_ratio``). Works under ``jit`` (the ends are arrays).
    """
    kind = as_kind(kind)
    if not 0.0 < margin < 0.5:
        raise ValueError(f"margin must lie in (0, 0.5), got margin={margin}")
    f = jnp.result_type(float)
    t0 = jnp.asarray(path.t_min, f)
    t1 = jnp.asarray(path.t_max, f)
    if isinstance(kind, Velocity):
        return t0, t1

    def singular(t):
        det = kind.determinant(*path.coefficients(t))
        return jnp.logical_not(jnp.isfinite(det) & (det != 0))

    t0 = jnp.where(singular(t0), t0 + margin, t0)
    t1 = jnp.where(singular(t1), t1 - margin, t1)
    return t0, t1


# ---------------------------------------------------------------------------------------------------------------
# trace estimators
# ---------------------------------------------------------------------------------------------------------------
class AbstractTrace(eqx.Module):
    """A divergence estimator: ``estimator(f, x, state)`` → (f(x), ∇·f(x) or its estimate), one example.

    ``init(key, x)`` draws the estimator's state (the probes) once per solve; they stay fixed along it.
    """

    def init(self, key: PRNGKeyArray | None, x: Float[Array, "*shape"]):
        """The state held fixed for a whole solve (None for the exact trace)."""
        return None

    @abc.abstractmethod
    def __call__(self, f, x, state) -> tuple[Float[Array, "*shape"], Float[Array, ""]]: ...

    def per_probe(self, f, x, state) -> tuple[Float[Array, "*shape"], Float[Array, " k"]]:
        """(f(x), the estimate of each probe, shape (k,)); their mean is ``__call__``'s divergence. An exact
        estimator has one "probe", its exact value. Integrating the k estimates side by side along one solve
        (whose trajectory does not depend on the probes) gives k estimates of the log-density whose spread is
        the standard error of their mean (``LikelihoodResult.log_prob_se``)."""
        y, div = self(f, x, state)
        return y, div[None]


class ExactTrace(AbstractTrace):
    """The exact trace Σ_i e_iᵀ(∂f/∂x)e_i: one linearisation of f, then D forward-mode JVPs.

    The JVPs run ``chunk_size`` at a time (default: as many as fit in ``EXACT_TRACE_BUDGET`` = 65,536 floats,
    at least one). When all D fit (D² ≤ the budget) they run as one batch against the identity; otherwise each
    runs against a one-hot vector built inside the loop and is reduced at once to its diagonal entry, so the
    extra memory is at most max(chunk × D, budget) floats: O(D) per example, no D × D identity or Jacobian.
    """

    chunk_size: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.chunk_size is not None and (
            isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1
        ):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {self.chunk_size!r}")

    def __call__(self, f, x, state=None):
        shape, d = x.shape, x.size
        y, lin = jax.linearize(lambda z: f(z.reshape(shape)).reshape(-1), x.reshape(-1))
        chunk = self.chunk_size or max(1, EXACT_TRACE_BUDGET // max(d, 1))
        chunk = min(chunk, d)

        if chunk >= d:  # all D columns at once: D² <= max(D, budget) floats
            return y.reshape(shape), jnp.trace(jax.vmap(lin)(jnp.eye(d, dtype=x.dtype)))

        def diag(i):
            return lin(jax.nn.one_hot(i, d, dtype=x.dtype))[i]

        return y.reshape(shape), jnp.sum(jax.lax.map(diag, jnp.arange(d), batch_size=chunk))


class Hutchinson(AbstractTrace):
    """The Hutchinson–Skilling estimate mean_k v_kᵀ(∂f/∂x)v_k with ``num_probes`` fixed probes.

    Unbiased for any probes with E[vvᵀ] = I (Hutchinson 1990, Skilling 1989; FFJORD, Grathwohl et al. 2019):
    ``sampler(key, shape, dtype)`` is ``jax.random.rademacher`` (default, lower variance) or
    ``jax.random.normal``. One linearisation and ``num_probes`` forward-mode JVPs per evaluation.
    """

    num_probes: int = eqx.field(static=True, default=1)
    sampler: Callable = eqx.field(static=True, default=jax.random.rademacher)

    def __check_init__(self):
        if isinstance(self.num_probes, bool) or not isinstance(self.num_probes, int) or self.num_probes < 1:
            raise ValueError(f"num_probes must be an int >= 1, got {self.num_probes!r}")

    def init(self, key, x):
        if key is None:
            raise ValueError(
                "the Hutchinson trace needs a PRNG key for its probes: pass key=jax.random.key(...) "
                "(or use the exact trace)"
            )
        return self.sampler(key, (self.num_probes, *x.shape), dtype=x.dtype)

    def __call__(self, f, x, state):
        probes = state
        if probes.shape[1:] != x.shape:
            raise ValueError(f"probes must have shape (k, *{x.shape}), got {probes.shape}")
        if probes.shape[0] == 1:  # a plain JVP (a vmap over one probe lowers to slower batched kernels)
            y, jv = jax.jvp(f, (x,), (probes[0],))
            return y, jnp.sum(probes[0] * jv)
        y, per = self.per_probe(f, x, probes)
        return y, jnp.mean(per)

    def per_probe(self, f, x, state):
        """(f(x), v_kᵀ(∂f/∂x)v_k for each of the k probes): one linearisation, the k JVPs as one batch."""
        probes = state
        if probes.shape[1:] != x.shape:
            raise ValueError(f"probes must have shape (k, *{x.shape}), got {probes.shape}")
        y, lin = jax.linearize(f, x)
        jv = jax.vmap(lin)(probes)
        return y, jnp.sum((probes * jv).reshape(probes.shape[0], -1), axis=-1)


class HutchPlusPlus(AbstractTrace):
    """Hutch++ (Meyer, Musco, Musco & Woodruff 2021): the exact trace of a rank-``rank`` part plus Hutchinson on
    the rest, an unbiased estimate with lower variance where ∂f/∂x has a few large directions.

    With J = ∂f/∂x and a fixed sketch S (``rank`` Gaussian vectors, drawn once per solve), Q = orth(J·S) (a QR
    of ``rank`` JVPs) and ``num_probes`` fixed Rademacher probes v_k independent of S:

        tr J = tr(QᵀJQ) + mean_k w_kᵀ J w_k,   w_k = (I − QQᵀ) v_k,

    exact in expectation for any Q (E[w wᵀ] = I − QQᵀ), with the variance of Hutchinson on the deflated
    (I − QQᵀ)J(I − QQᵀ) instead of J. Cost per evaluation: one linearisation and 2·``rank`` + ``num_probes``
    JVPs, against ``num_probes`` for :class:`Hutchinson`: compare at equal JVPs (``benchmarks/device.py``,
    ``tests/test_likelihood_stats.py``). ``per_probe`` gives tr(QᵀJQ) + w_kᵀJw_k for each k, so the likelihood's
    standard error is the residual's.
    """

    num_probes: int = eqx.field(static=True, default=2)
    rank: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        for name in ("num_probes", "rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")

    def init(self, key, x):
        if key is None:
            raise ValueError(
                "the Hutch++ trace needs a PRNG key for its sketch and probes: pass key=jax.random.key(...)"
            )
        if self.rank >= x.size:
            raise ValueError(
                f"rank={self.rank} must be below the dimension D={x.size} of an example (use the exact trace)"
            )
        k_s, k_v = jax.random.split(key)
        sketch = jax.random.normal(k_s, (self.rank, *x.shape), x.dtype)
        return sketch, jax.random.rademacher(k_v, (self.num_probes, *x.shape), dtype=x.dtype)

    def per_probe(self, f, x, state):
        sketch, probes = state
        shape, d = x.shape, x.size
        y, lin = jax.linearize(lambda z: f(z.reshape(shape)).reshape(-1), x.reshape(-1))
        js = jax.vmap(lin)(sketch.reshape(self.rank, d))  # (r, D): J·S
        q, _ = jnp.linalg.qr(js.T)  # (D, r), orthonormal columns
        low = jnp.sum(q.T * jax.vmap(lin)(q.T))  # tr(QᵀJQ)
        v = probes.reshape(self.num_probes, d)
        w = v - (v @ q) @ q.T
        rest = jnp.sum(w * jax.vmap(lin)(w), axis=-1)
        return y.reshape(shape), low + rest

    def __call__(self, f, x, state):
        y, per = self.per_probe(f, x, state)
        return y, jnp.mean(per)


_PROBE_SAMPLERS = {"rademacher": jax.random.rademacher, "gaussian": jax.random.normal}


def _probe_sampler(probe: str | Callable) -> Callable:
    if callable(probe):
        return probe
    if probe not in _PROBE_SAMPLERS:
        raise ValueError(f"unknown probe={probe!r}; expected 'rademacher', 'gaussian' or a sampler function")
    return _PROBE_SAMPLERS[probe]


def as_trace(
    trace: str | AbstractTrace,
    *,
    num_probes: int = 1,
    probe: str | Callable = "rademacher",
    chunk_size: int | None = None,
) -> AbstractTrace:
    """The estimator for a user-facing name: ``"exact"`` → :class:`ExactTrace` (``chunk_size``),
    ``"hutchinson"`` → :class:`Hutchinson` (``num_probes``, ``probe``); an estimator is returned unchanged."""
    if isinstance(trace, AbstractTrace):
        return trace
    if trace == "exact":
        return ExactTrace(chunk_size)
    if trace == "hutchinson":
        return Hutchinson(int(num_probes), _probe_sampler(probe))
    raise ValueError(
        f"unknown trace={trace!r}; expected 'exact', 'hutchinson' or a diffjax.fields.AbstractTrace instance"
    )


def divergence_exact(
    f: Callable[[Float[Array, "*shape"]], Float[Array, "*shape"]],
    x: Float[Array, "*shape"],
    *,
    chunk_size: int | None = None,
) -> tuple[Float[Array, "*shape"], Float[Array, ""]]:
    """(f(x), ∇·f(x)) with the exact trace (:class:`ExactTrace`; O(D) extra memory). One example only."""
    return ExactTrace(chunk_size)(f, x)


def divergence_hutchinson(
    f: Callable[[Float[Array, "*shape"]], Float[Array, "*shape"]],
    x: Float[Array, "*shape"],
    probes: Float[Array, " k *shape"],
) -> tuple[Float[Array, "*shape"], Float[Array, ""]]:
    """(f(x), mean_k v_kᵀ(∂f/∂x)v_k) for fixed ``probes`` (:class:`Hutchinson`). One example only."""
    return Hutchinson(int(probes.shape[0]))(f, x, probes)


def make_probes(
    key: PRNGKeyArray,
    shape: tuple[int, ...],
    num_probes: int = 1,
    kind: str = "rademacher",
    dtype=None,
) -> Float[Array, " k *shape"]:
    """``num_probes`` Hutchinson probes with E[vvᵀ] = I: Rademacher (±1) or standard Gaussian."""
    dtype = jnp.result_type(float) if dtype is None else dtype
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    return _probe_sampler(kind)(key, (num_probes, *shape), dtype=dtype)
