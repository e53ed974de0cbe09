"""Time grids for fixed-step samplers: uniform in t, uniform in log-SNR, EDM's ρ-spacing and SD3's shift.

Time convention: **t = 0 is noise, t = 1 is data**; a grid increases from the noise end t0 to the data end t1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from .paths import AbstractPath
from .solve import interval

__all__ = ["GRID_KINDS", "LOG_SNR_CLIP_FRACTION", "LOG_SNR_MAX", "time_grid"]

Scalar = Float[ArrayLike, ""]

GRID_KINDS = ("uniform", "log_snr", "edm", "shifted")

#: Where λ_t is infinite at an end of the grid's interval (λ(0) = −∞ for LinearPath/CosinePath, λ(1) = +∞
#: where σ_1 = 0), the "log_snr" and "edm" grids use λ at t0 + δ (resp. t1 − δ) with δ = this × (t1 − t0).
LOG_SNR_CLIP_FRACTION = 1e-3
#: An end with |λ| above this is treated as infinite too (e.g. CosinePath's λ(1) = 2 log tan(π/2) evaluates to
#: ≈ 74 in float64 instead of +∞).
LOG_SNR_MAX = 40.0


def _finite_log_snr_range(path: AbstractPath, t0, t1):
    """(λ(t0), λ(t1)) with an infinite end replaced by λ at t0 + δ / t1 − δ (δ = LOG_SNR_CLIP_FRACTION·(t1−t0)).

    Which end is infinite is decided without gradient and λ is evaluated only at the chosen point, so no NaN
    from the infinite end reaches a gradient with respect to t0, t1 or the path's parameters.
    """
    delta = LOG_SNR_CLIP_FRACTION * (t1 - t0)

    def end(t, t_in):
        raw = jax.lax.stop_gradient(path.log_snr(t))
        return path.log_snr(jnp.where(jnp.abs(raw) <= LOG_SNR_MAX, t, t_in))

    return end(t0, t0 + delta), end(t1, t1 - delta)


def _shifted(frac, shift):
    """SD3's time shift on the fraction of the interval: with τ = 1 − frac (1 at the noise end),
    τ' = sτ/(1 + (s − 1)τ), returned as 1 − τ'; strictly increasing for every s > 0."""
    tau = 1.0 - frac
    return 1.0 - shift * tau / (1.0 + (shift - 1.0) * tau)


def time_grid(
    path: AbstractPath,
    num_steps: int,
    kind: str = "uniform",
    rho: float = 7.0,
    t0: Scalar | None = None,
    t1: Scalar | None = None,
    shift: float = 3.0,
) -> Float[Array, " num_steps+1"]:
    """An increasing grid t0 = t_0 < t_1 < … < t_N = t1 of ``num_steps`` + 1 times, from noise to data.

    t = 0 is noise, t = 1 is data; the defaults are t0 = ``path.t_min``, t1 = ``path.t_max`` = 1 − t_eps.

    Kinds (i = 0, …, N, N = ``num_steps``):

    * ``"uniform"``: t_i = t0 + (i/N)(t1 − t0).
    * ``"log_snr"``: uniform in log-SNR, λ_i = λ(t0) + (i/N)(λ(t1) − λ(t0)), t_i = ``path.t_from_log_snr(λ_i)``.
    * ``"edm"``: Karras et al. 2022 (EDM, eq. 5) ρ-spacing of the noise-to-signal ratio σ/α = e^{−λ/2}:
      σ̃_i = (σ̃_max^{1/ρ} + (i/N)(σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ with σ̃_max = e^{−λ(t0)/2},
      σ̃_min = e^{−λ(t1)/2}; then λ_i = −2 log σ̃_i and t_i = ``path.t_from_log_snr(λ_i)``. On
      ``EDMPath(rho=ρ)`` (α = 1) this grid is exactly uniform in t.
    * ``"shifted"``: the uniform grid moved towards the noise end by ``shift`` = s (Esser et al. 2024, "SD3";
      the "flow shift" of flow-matching samplers): with τ_i = 1 − i/N (1 at the noise end),
      t_i = t0 + (1 − sτ_i/(1 + (s − 1)τ_i))(t1 − t0). On ``LinearPath`` over [0, 1] this is SD3's shift in its
      time τ = 1 − t and lowers the log-SNR of every grid point by exactly 2 log s; s = 1 is the uniform grid,
      s > 1 spends more steps at high noise.

    Where λ is infinite at an end (λ(0) = −∞ for LinearPath/CosinePath, λ = +∞ where σ = 0; numerically: not
    finite or |λ| > ``LOG_SNR_MAX`` = 40), the λ range of the "log_snr"/"edm" grids is clipped to λ(t0 + δ) or
    λ(t1 − δ), δ = ``LOG_SNR_CLIP_FRACTION``·(t1 − t0) = 1e-3·(t1 − t0); the grid's first and last points are
    always exactly t0 and t1 (so the first/last step spans the clipped part of the λ range).

    Raises:
        ValueError: unknown ``kind``, ``num_steps`` < 1, ``rho`` <= 0, ``shift`` <= 0, or not 0 <= t0 < t1 <= 1.
    """
    if kind not in GRID_KINDS:
        raise ValueError(f"unknown grid kind={kind!r}; expected one of {GRID_KINDS}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a Python int >= 1, got {num_steps!r}")
    if not isinstance(rho, jax.core.Tracer) and float(rho) <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    if not isinstance(shift, jax.core.Tracer) and not float(shift) > 0:
        raise ValueError(f"shift must be > 0 (1 is the uniform grid), got shift={shift}")
    t0, t1 = interval(path, t0, t1)
    frac = jnp.arange(num_steps + 1, dtype=t0.dtype) / num_steps
    if kind == "uniform":
        ts = t0 + frac * (t1 - t0)
    elif kind == "shifted":
        ts = t0 + _shifted(frac, jnp.asarray(shift, t0.dtype)) * (t1 - t0)
    else:
        lam0, lam1 = _finite_log_snr_range(path, t0, t1)
        if kind == "log_snr":
            lam = lam0 + frac * (lam1 - lam0)
        else:
            rho = jnp.asarray(rho, t0.dtype)
            # σ̃^{1/ρ} = e^{−λ/(2ρ)}; work with the ρ-th root directly (no overflow for large |λ|).
            a, b = jnp.exp(-0.5 * lam0 / rho), jnp.exp(-0.5 * lam1 / rho)
            lam = -2.0 * rho * jnp.log(a + frac * (b - a))
        ts = jax.vmap(path.t_from_log_snr)(lam)
        ts = jnp.clip(ts, t0, t1)
    return ts.at[0].set(t0).at[-1].set(t1)
