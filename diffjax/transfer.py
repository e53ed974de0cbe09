"""Schedule transfer: a model trained on one Gaussian path and kind, used on another path and kind, exactly.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε,
λ_t = log(α_t²/σ_t²) increasing in t.

Every Gaussian path is the same family up to a change of time and a scale (Kingma et al. 2021, VDM, §"invariance
to the noise schedule"; Kingma & Gao 2023, "Understanding Diffusion Objectives", §2; Meta ``flow_matching``'s
``ScheduleTransformedModel``, which does this for velocity models only). Let the source path have (α, σ) and the
new path (α′, σ′). At times with equal log-SNR,

    λ′(t′) = λ(t),   i.e.   t = path.t_from_log_snr(new_path.log_snr(t′)),

the ratios α/α′ and σ/σ′ are equal, to k(t′) = (α + σ)/(α′ + σ′) (written with the sums, which are finite and
positive at both ends where α or σ vanishes), and

    x_t = α·x + σ·ε = k·(α′·x + σ′·ε) = k·x′_{t′}.

So the two noisy variables are the same random variable up to the scale k, and the posterior means
x̂ = E[x | x_t] and ε̂ = E[ε | x_t] are the same functions of it: they depend on the path only through λ.
A model of any kind on the source path therefore gives (x̂, ε̂) at (t′, x′) on the new path by evaluating it at
(t, k·x′); every kind on the new path is then exact (:mod:`diffjax.kinds`):

* ε̂ and x̂ (kinds ``eps`` and ``data``) are unchanged;
* v = α·ε̂ − σ·x̂ scales: v′ = α′·ε̂ − σ′·x̂ = v/k;
* the score depends on the path's σ: ŝ′ = −ε̂/σ′ = k·ŝ (ŝ = −ε̂/σ);
* the velocity depends on the new path's derivatives: û′ = α̇′·x̂ + σ̇′·ε̂ (d/dt′ of the new path),
  which is not a rescaling of the source velocity (the time map has its own speed).

:class:`TransferredModel` does the conversion in two exact linear steps with :func:`diffjax.targets.convert_at`:
source kind → a *frame-invariant* kind N on the source path at (t, x = k·x′), rescale N's value to the new path
(ε̂, x̂: unchanged; v: divided by k), then N → the new kind on the new path at (t′, x′). N is the new kind's own
basis where that is ε, x̂ or v (then the second step is only the score's decode), else the source's basis (then the
first step is only the score's encode), else (velocity → velocity) v, whose conversions are never singular. So
every step divides only where the direct conversion between the two kinds does (ε/score-models at α = 0,
data-models at σ = 0, a score at σ′ = 0): same-basis transfers (ε → score, data → data, v → v, …) stay finite
at both ends.

Where the source cannot serve. The source path covers log-SNRs λ ∈ [λ(t_lo), λ(t_hi)], the range of its
``t_from_log_snr`` (t ∈ [0, 1] for the closed-form paths, [t_min, t_max] for :class:`~diffjax.LogSNRPath`): VP
reaches only λ ≥ −10.05 at t = 0 (defaults), VE only [−2 log σ_max, −2 log σ_min] = [−7.8, 9.2], EDM
[−8.8, 12.4]; the linear and cosine paths cover all of [−∞, ∞]. A t′ whose λ′ lies outside that range cannot be
served:

* with a concrete t′ (and concrete path parameters) the call raises ``ValueError``, naming t′, λ′, the source's
  range and :meth:`TransferredModel.t_range`, the interval of t′ that can be served;
* with a traced t′ (inside ``jit``, ``vmap``, a solver), where no Python check is possible, t is **clipped** to
  the source's end (``t_from_log_snr`` clips): the source is evaluated at its own end SNR and the scale k is
  still (α + σ)/(α′ + σ′). The value is then the prediction of a model whose SNR is frozen at the source's end —
  finite, but not the new path's exact prediction. Integrate over :meth:`TransferredModel.t_range` (e.g.
  ``sample_ode(..., t0=lo, t1=hi)``) to stay inside.

Ends. Where λ′ = ±∞ (α′ = 0 at the linear/cosine noise end, σ′ = 0 at their data end) the source end must be
infinite too (linear/cosine sources) and then the match is exact: λ = λ′ = ±∞, t is the source's end, and
k = (α + σ)/(α′ + σ′) is the common ratio (1 for linear ↔ cosine). Conversions that are singular at those ends
on the new path (ε → data at α′ = 0, data → velocity at σ′ = 0, any kind → score at σ′ = 0) are singular for
the direct model too; the velocity of a VP *new* path at t′ = 1 uses σ̇′ = −∞ and is not finite there (VP's
``t_eps``).

Everything is a PyTree (the source model's, the paths' leaves are leaves; the kinds have none) and a pure
function of (t′, x′): it works under ``jit``, ``vmap`` and ``grad``, with no runtime check and no host callback
inside, so it can be the model of a sampler or a likelihood. :func:`transfer` is the checked constructor.

Example::

    >>> import jax.numpy as jnp, diffjax
    >>> from diffjax.transfer import transfer
    >>> mix = diffjax.GaussianMixture(jnp.ones(2), jnp.array([[-1.0], [1.0]]), 0.1)
    >>> vp, lin = diffjax.VPPath(), diffjax.LinearPath()
    >>> u = transfer(mix.model("eps", vp), "eps", vp, to_path=lin, to_kind="velocity")
    >>> x = jnp.array([0.3])
    >>> bool(jnp.allclose(u(0.5, x), mix.predict("velocity", lin, 0.5, x), rtol=1e-5))
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from .kinds import AbstractKind, Data, Eps, V, as_kind
from .paths import AbstractPath, check_time
from .targets import convert_at

__all__ = ["TransferredModel", "transfer"]

Scalar = Float[ArrayLike, ""]
Model = Callable[[Float[Array, ""], Float[Array, "*shape"]], Float[Array, "*shape"]]

# Kinds whose linear representation c·x̂ + d·ε̂ has coefficients homogeneous in (α, σ): the value on the new path
# is the value on the source path times k^(−degree). (The velocity's coefficients are α̇, σ̇: not frame-invariant.)
_FRAME_INVARIANT = {"eps": (Eps(), 0), "data": (Data(), 0), "v": (V(), 1)}


def _via(src: AbstractKind, dst: AbstractKind) -> tuple[AbstractKind, int]:
    """The frame-invariant kind N of the two-step conversion (see the module docstring), and its degree."""
    for kind in (dst, src):
        if kind.basis in _FRAME_INVARIANT:
            return _FRAME_INVARIANT[kind.basis]
    return _FRAME_INVARIANT["v"]


def _is_traced(*trees) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def _as_time(t):
    """t′ as a float scalar: a concrete t′ is checked to be a scalar in [0, 1]; a traced one only for shape."""
    if isinstance(t, jax.core.Tracer):
        if t.shape != ():
            raise ValueError(
                f"t must be a scalar (one time per example; use jax.vmap for batches), got shape {t.shape}"
            )
        return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.result_type(float))
    with jax.ensure_compile_time_eval():
        return check_time(t, name="t_new")


def _lam_tol(lam, dtype) -> float:
    # λ′ and the source's end λ are computed by different formulas: allow their rounding (relative to |λ|).
    return 64.0 * float(np.finfo(dtype).eps) * (1.0 + abs(lam))


class TransferredModel(eqx.Module):
    """``model`` (predicting ``kind`` on ``path``) as an exact model of ``new_kind`` on ``new_path``.

    ``self(t_new, x_new)`` for ONE example (t = 0 noise, t = 1 data on both paths):

        λ′ = new_path.log_snr(t_new),   t = path.t_from_log_snr(λ′),   k = (α_t + σ_t)/(α′_{t_new} + σ′_{t_new}),
        (x̂, ε̂) from model(t, k·x_new) of ``kind`` on ``path``,   result = ``new_kind`` of (x̂, ε̂) on ``new_path``

    (see the module docstring for the math, which ends are exact and what happens outside the source's λ range:
    a ``ValueError`` for a concrete t_new, clipping for a traced one). Build it with :func:`transfer`.

    Attributes:
        model: the source model ``model(t, x)``, a callable PyTree (its leaves stay leaves).
        kind: the source's prediction kind.
        path: the source's path.
        new_kind: the kind the transferred model predicts.
        new_path: the path the transferred model lives on.
    """

    model: Model
    kind: AbstractKind
    path: AbstractPath
    new_kind: AbstractKind
    new_path: AbstractPath

    # --- the time map and the scale ----------------------------------------------------------------------
    def source_log_snr_range(self) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """(λ_lo, λ_hi): the log-SNRs the source can serve, λ at the ends of ``path.t_from_log_snr``'s range."""
        f = jnp.result_type(float)
        ends = [jnp.clip(self.path.t_from_log_snr(jnp.asarray(v, f)), 0.0, 1.0) for v in (-jnp.inf, jnp.inf)]
        return self.path.log_snr(ends[0]), self.path.log_snr(ends[1])

    def t_range(self) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """(t′_lo, t′_hi): the times on ``new_path`` that the source can serve (t = 0 noise, t = 1 data).

        The interval to integrate a sampler or likelihood over, e.g. ``sample_ode(u, new_path, key, t0=lo,
        t1=hi)``; [0, 1] when the source covers the new path's whole λ range (linear ↔ cosine).
        """
        lo, hi = self.source_log_snr_range()
        f = jnp.result_type(float)
        return tuple(
            jnp.clip(self.new_path.t_from_log_snr(lam), 0.0, 1.0).astype(f) for lam in (lo, hi)
        )

    def source_time(self, t_new: Scalar) -> Float[Array, ""]:
        """t = path.t_from_log_snr(new_path.log_snr(t_new)), the source time of equal log-SNR (clipped to the
        source's range; see the module docstring)."""
        return self._source_time(_as_time(t_new))

    def _source_time(self, t_new):
        t = self.path.t_from_log_snr(self.new_path.log_snr(t_new))
        return jnp.clip(t, 0.0, 1.0).astype(t_new.dtype)

    def scale(self, t_new: Scalar) -> Float[Array, ""]:
        """k = (α_t + σ_t)/(α′_{t_new} + σ′_{t_new}), with x_t = k·x′_{t_new} at equal log-SNR."""
        t_new = _as_time(t_new)
        return self._scale(self._source_time(t_new), t_new)

    def _scale(self, t, t_new):
        return (self.path.alpha(t) + self.path.sigma(t)) / (
            self.new_path.alpha(t_new) + self.new_path.sigma(t_new)
        )

    def _check_range(self, t_new):
        """ValueError for a concrete t_new whose λ′ the source cannot serve (no check when anything is traced)."""
        if _is_traced(t_new, self.path, self.new_path):
            return
        with jax.ensure_compile_time_eval():
            lam = float(self.new_path.log_snr(t_new))
            lo, hi = (float(v) for v in self.source_log_snr_range())
            if math.isnan(lam) or not (
                lo - _lam_tol(lo, t_new.dtype) <= lam <= hi + _lam_tol(hi, t_new.dtype)
            ):
                t_lo, t_hi = (float(v) for v in self.t_range())
                raise ValueError(
                    f"diffjax.transfer: t_new = {float(t_new)!r} on {type(self.new_path).__name__} has "
                    f"log-SNR {lam:.6g}, outside the range [{lo:.6g}, {hi:.6g}] that the source path "
                    f"{type(self.path).__name__} reaches on its times [0, 1] (t = 0 noise, t = 1 data), so "
                    f"the source model cannot serve it. Use t_new in [{t_lo:.6g}, {t_hi:.6g}] "
                    "(TransferredModel.t_range(); e.g. sample_ode(..., t0=lo, t1=hi)), or a source path "
                    "whose log-SNR range covers it"
                )

    # --- the model ---------------------------------------------------------------------------------------
    def __call__(self, t_new: Scalar, x_new: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
        """The ``new_kind`` prediction at (t_new, x_new) on ``new_path``, for one example."""
        t_new = _as_time(t_new)
        self._check_range(t_new)
        x_new = jnp.asarray(x_new)
        t = self._source_time(t_new)
        k = self._scale(t, t_new)
        x = k * x_new
        pred = self.model(t, x)
        via, degree = _via(self.kind, self.new_kind)
        y = convert_at(pred, self.kind, via, self.path.coefficients(t), x)
        if degree:
            y = y / k**degree
        return convert_at(y, via, self.new_kind, self.new_path.coefficients(t_new), x_new)


def transfer(
    model: Model,
    kind: str | AbstractKind,
    path: AbstractPath,
    *,
    to_path: AbstractPath,
    to_kind: str | AbstractKind | None = None,
) -> TransferredModel:
    """``model``, trained to predict ``kind`` on ``path``, as an exact model of ``to_kind`` on ``to_path``.

    No retraining: every Gaussian path is the same family up to the time map λ′(t′) = λ(t) and the scale
    x_t = k·x′_{t′}, k = (α + σ)/(α′ + σ′) (VDM's invariance, Kingma & Gao 2023 §2; the module docstring has the
    math, the ends and the λ range the source can serve). t = 0 is noise, t = 1 is data on both paths.

    Args:
        model: the source model ``model(t, x)`` (one example), a callable PyTree such as ``eqx.Partial(apply,
            params)`` or an ``equinox.Module``.
        kind: the source's prediction kind, a name in :data:`diffjax.kinds.KINDS` or a kind object.
        path: the source's path (a :class:`~diffjax.paths.AbstractPath`).
        to_path: the path to use the model on.
        to_kind: the kind to predict there (default: ``kind``).

    Returns:
        A :class:`TransferredModel`; :meth:`TransferredModel.t_range` gives the times on ``to_path`` it serves.

    Raises:
        ValueError: an unknown kind name, a path argument that is not a diffjax path, or a model that is not
            callable (the message names the argument, its value and the fix).
    """
    for name, value in (("path", path), ("to_path", to_path)):
        if not isinstance(value, AbstractPath):
            raise ValueError(
                f"diffjax.transfer: {name} must be a diffjax path (a diffjax.paths.AbstractPath such as "
                f"diffjax.VPPath() or diffjax.LinearPath()), got {name}={value!r}"
            )
    if not callable(model) or isinstance(model, AbstractPath):
        raise ValueError(
            f"diffjax.transfer: model must be a callable model(t, x), got model={model!r}; call "
            "transfer(model, kind, path, to_path=..., to_kind=...)"
        )
    kind = as_kind(kind, "kind")
    to_kind = kind if to_kind is None else as_kind(to_kind, "to_kind")
    return TransferredModel(model, kind, path, to_kind, to_path)
