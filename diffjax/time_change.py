"""The variable a probability-flow ODE is integrated in: an exact change of time and of scale.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε.

For dx/dt = u_t(x), a monotone increasing s = s(t) and a scale c(t) > 0, the state y = x/c obeys

    dy/ds = (u_t(c·y) − ċ·y) / (c·ṡ),        and the log-density integral   dℓ/ds = ∇·u_t(x) / ṡ,

so the solution is the same curve and log p the same number (in exact arithmetic); only what the adaptive solver
sees changes — the step sizes, the NFE and how its tolerances read. Two variables:

* :class:`PathTime`: s = t, c = 1 (the path's own time).
* :class:`LinearPathTime`: s = τ = α/(α + σ) = sigmoid(λ/2) and c = α + σ. Every Gaussian path is the linear path
  x_τ = τ·x + (1 − τ)·ε run at another speed and scaled by α + σ (Kingma & Gao 2023, App. of "Understanding
  Diffusion Objectives"; Karras et al. 2022 §3 on scaling and time), so in (τ, y) the probability-flow ODE of
  *every* Gaussian path with the same data is the linear path's ODE: the VP path's √(1 − t) behaviour at the data
  end and its compressed noise end are undone, and a VE/EDM state of scale σ_max becomes O(1). For the linear
  path it is the identity.

Each is an ``equinox.Module`` (a PyTree with no leaves of its own); a new variable is one new subclass.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .paths import AbstractPath

__all__ = ["AbstractTimeChange", "PathTime", "LinearPathTime", "as_time_change"]


class AbstractTimeChange(eqx.Module):
    """An increasing integration variable s(t) with a state scale c(t) > 0 (t = 0 noise, t = 1 data)."""

    @abc.abstractmethod
    def s_of_t(self, path: AbstractPath, t: Float[Array, ""]) -> Float[Array, ""]:
        """s at time t."""

    @abc.abstractmethod
    def t_of_s(self, path: AbstractPath, s: Float[Array, ""]) -> Float[Array, ""]:
        """The exact inverse of :meth:`s_of_t` (clamped to the variable's range outside it)."""

    @abc.abstractmethod
    def ds_dt(self, path: AbstractPath, t: Float[Array, ""]) -> Float[Array, ""]:
        """ṡ = ds/dt > 0."""

    @abc.abstractmethod
    def scale(self, path: AbstractPath, t: Float[Array, ""]) -> tuple[Float[Array, ""], Float[Array, ""]]:
        """(c, dc/dt): the state integrated is y = x/c."""


class PathTime(AbstractTimeChange):
    """s = t, c = 1: integrate in the path's own time (t = 0 noise, t = 1 data)."""

    def s_of_t(self, path, t):
        return t

    def t_of_s(self, path, s):
        return s

    def ds_dt(self, path, t):
        return jnp.ones_like(t)

    def scale(self, path, t):
        return jnp.ones_like(t), jnp.zeros_like(t)


class LinearPathTime(AbstractTimeChange):
    """s = τ = α/(α + σ) ∈ [0, 1] and c = α + σ: the linear path's time and scale (t = 0 noise, t = 1 data).

    τ̇ = (α̇σ − ασ̇)/(α + σ)² > 0 is finite wherever the path's derivatives are; the inverse is
    t = ``path.t_from_log_snr``(2·logit τ), since α/σ = τ/(1 − τ).
    """

    def s_of_t(self, path, t):
        a, s, _, _ = path.coefficients(t)
        return a / (a + s)

    def t_of_s(self, path, tau):
        # τ outside [0, 1] (an initial step-size guess may probe past an end) is clamped: log of a negative is NaN
        tau = jnp.clip(tau, 0.0, 1.0)
        return path.t_from_log_snr(2.0 * (jnp.log(tau) - jnp.log1p(-tau)))

    def ds_dt(self, path, t):
        a, s, da, ds = path.coefficients(t)
        return (da * s - a * ds) / jnp.square(a + s)

    def scale(self, path, t):
        a, s, da, ds = path.coefficients(t)
        return a + s, da + ds


_NAMES = {"t": PathTime, "linear": LinearPathTime}


def as_time_change(time: str | AbstractTimeChange) -> AbstractTimeChange:
    """The variable for a user-facing name (``"t"``, ``"linear"``) or an :class:`AbstractTimeChange`."""
    if isinstance(time, AbstractTimeChange):
        return time
    if time in _NAMES:
        return _NAMES[time]()
    raise ValueError(
        f"unknown time={time!r}; expected 't' (the path's time), 'linear' (the linear path's time "
        "τ = α/(α+σ), the default) or a diffjax.time_change.AbstractTimeChange instance"
    )
