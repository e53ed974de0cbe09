"""Prediction kinds as PyTrees: what a network predicts, and the exact linear maps between kinds.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε with x data and ε ~ N(0, I).

Every Gaussian-path parameterization is linear in the posterior means (x̂, ε̂) = (E[x | x_t], E[ε | x_t]) at fixed
(t, x_t). A kind is the pair of coefficients (c, d) of its *linear representation* y = c·x̂ + d·ε̂, plus an
``encode``/``decode`` pair between the prediction and that representation (the identity except for the score,
whose representation is ε̂ = −σ·ŝ, Tweedie). With x_t = α·x̂ + σ·ε̂, one 2×2 solve of determinant Δ = c·σ − d·α
converts any kind to any other exactly (:func:`diffjax.targets.convert`); a conversion is singular only where Δ
of the source kind vanishes (Kingma & Gao 2023, App. D; formulas sheet §1.3).

===============  =========================  ===================  ======================
kind             prediction                 (c, d)               κ² = ‖ŷ − y‖²/‖ε̂ − ε‖²
===============  =========================  ===================  ======================
:class:`Eps`     ε̂                          (0, 1)               1
:class:`Data`    x̂ (the optimal denoiser)   (1, 0)               σ²/α² = e^{−λ}
:class:`V`       α·ε̂ − σ·x̂ (Salimans & Ho)  (−σ, α)              (α² + σ²)²/α²
:class:`Velocity` α̇·x̂ + σ̇·ε̂ (flow matching)  (α̇, σ̇)            ((α̇σ − σ̇α)/α)² = σ²λ̇²/4
:class:`Score`   ŝ = −ε̂/σ                   (0, 1) after encode  1/σ²
===============  =========================  ===================  ======================

Kinds are ``equinox.Module`` instances with no leaves: they pass through ``jit`` as part of the PyTree structure.
Users may name them by string (``"eps"``, ``"data"``, ``"v"``, ``"velocity"``, ``"score"``); each public entry
point converts the string once with :func:`as_kind`. A new kind is one new subclass of :class:`AbstractKind`.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["AbstractKind", "Eps", "Data", "V", "Velocity", "Score", "KINDS", "as_kind"]

Coefficients = tuple  # (α, σ, α̇, σ̇) at one time


class AbstractKind(eqx.Module):
    """A prediction kind: y = c·x̂ + d·ε̂ after ``encode`` (t = 0 noise, t = 1 data)."""

    name: ClassVar[str]
    #: kinds with the same ``basis`` share the linear representation (c, d): converting between them needs
    #: only ``encode``/``decode``, no 2×2 solve (ε and score).
    basis: ClassVar[str]

    @abc.abstractmethod
    def coefficients(self, a, s, da, ds) -> tuple:
        """(c, d) with encode(prediction) = c·x̂ + d·ε̂, from (α, σ, α̇, σ̇) at the prediction's time."""

    def encode(self, pred: Float[Array, "*shape"], a, s) -> Float[Array, "*shape"]:
        """The prediction's linear representation c·x̂ + d·ε̂ (identity for every kind but the score)."""
        return pred

    def decode(self, y: Float[Array, "*shape"], a, s) -> Float[Array, "*shape"]:
        """Inverse of :meth:`encode`."""
        return y

    def determinant(self, a, s, da, ds):
        """Δ = c·σ − d·α: the conversion from this kind to any other divides by Δ (singular where Δ = 0)."""
        c, d = self.coefficients(a, s, da, ds)
        return c * s - d * a

    def target(self, a, s, da, ds, x, eps):
        """The regression target of this kind for one draw (x, ε): decode(c·x + d·ε)."""
        c, d = self.coefficients(a, s, da, ds)
        return self.decode(c * x + d * eps, a, s)

    @abc.abstractmethod
    def error_scale_sq(self, a, s, da, ds):
        """κ² with ‖ŷ − y‖² = κ²·‖ε̂ − ε‖² for predictions of this kind from one network output."""

    def __repr__(self):
        return f"{type(self).__name__}()"


class Eps(AbstractKind):
    """ε-prediction (DDPM, Ho et al. 2020): ε̂ = E[ε | x_t]."""

    name: ClassVar[str] = "eps"
    basis: ClassVar[str] = "eps"

    def coefficients(self, a, s, da, ds):
        return jnp.zeros_like(a), jnp.ones_like(a)

    def error_scale_sq(self, a, s, da, ds):
        return jnp.ones_like(a)


class Data(AbstractKind):
    """Data (x0-) prediction, the optimal denoiser x̂ = E[x | x_t] (EDM's D, Karras et al. 2022)."""

    name: ClassVar[str] = "data"
    basis: ClassVar[str] = "data"

    def coefficients(self, a, s, da, ds):
        return jnp.ones_like(a), jnp.zeros_like(a)

    def error_scale_sq(self, a, s, da, ds):
        return jnp.square(s / a)


class V(AbstractKind):
    """v-prediction v̂ = α·ε̂ − σ·x̂ (Salimans & Ho 2022, general form; Δ = −(α² + σ²) is never 0)."""

    name: ClassVar[str] = "v"
    basis: ClassVar[str] = "v"

    def coefficients(self, a, s, da, ds):
        return -s, a

    def error_scale_sq(self, a, s, da, ds):
        return jnp.square(a * a + s * s) / jnp.square(a)


class Velocity(AbstractKind):
    """The probability-flow velocity û = α̇·x̂ + σ̇·ε̂ (flow matching, Lipman et al. 2023)."""

    name: ClassVar[str] = "velocity"
    basis: ClassVar[str] = "velocity"

    def coefficients(self, a, s, da, ds):
        return da, ds

    def error_scale_sq(self, a, s, da, ds):
        # σλ̇/2 = (α̇σ − σ̇α)/α
        return jnp.square((da * s - ds * a) / a)


class Score(AbstractKind):
    """The score ŝ = ∇log p_t(x_t) = −ε̂/σ (Tweedie); represented as ε̂ = −σ·ŝ, so no division by σ is
    made unless the destination needs it."""

    name: ClassVar[str] = "score"
    basis: ClassVar[str] = "eps"

    def coefficients(self, a, s, da, ds):
        return jnp.zeros_like(a), jnp.ones_like(a)

    def encode(self, pred, a, s):
        return -s * pred

    def decode(self, y, a, s):
        return -y / s

    def error_scale_sq(self, a, s, da, ds):
        return 1.0 / jnp.square(s)


_BY_NAME = {k.name: k for k in (Eps, Data, V, Velocity, Score)}
KINDS = tuple(_BY_NAME)


def as_kind(kind: str | AbstractKind, name: str = "kind") -> AbstractKind:
    """The kind object for a user-facing name (``"eps"``, ``"data"``, ``"v"``, ``"velocity"``, ``"score"``) or
    a kind instance (returned unchanged). ``name`` is the argument's name, used in the error message."""
    if isinstance(kind, AbstractKind):
        return kind
    if isinstance(kind, str) and kind in _BY_NAME:
        return _BY_NAME[kind]()
    raise ValueError(
        f"unknown prediction kind {name}={kind!r}; expected one of {KINDS} or a diffjax.kinds.AbstractKind "
        "instance (e.g. diffjax.kinds.Eps())"
    )
