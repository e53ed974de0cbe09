r"""Sample quality with power: closed-form cross-entropies, support fractions, and a permutation two-sample test
whose power against a known-bad model is measured at the same sample size.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; every function here looks only at
the data end (samples at t = 1 and held-out data), never at a time.

Why: a distance below its data-vs-data "floor" (:func:`energy_distance`, :func:`mmd_rbf` between two held-out
sets) does not say that a model is good; it may only say that the metric has no power at this sample size. In the
weighting study only 57–77% of the samples fell inside the checkerboard's squares (a good model: 93%), yet every
distance was below the floor. This module reports, beside the old distances and floors, numbers that can fail:

**True density** (:func:`true_log_density`), where the data distribution is known in closed form:

* ``checkerboard``: uniform on the 8 black squares of side 2 of a 4×4 board on [−4, 4]², square
  (i, j) = (⌊x/2⌋, ⌊y/2⌋) ∈ {−2, −1, 0, 1}² black iff i + j is even (``diffjax.data.sample_checkerboard``):
  log p = log(1/32) inside, −∞ outside.
* ``mixture``: Σ_k π_k N(μ_k, diag(s_k²)) with ``diffjax.data.MIXTURE_*``; ``8gaussians``: (1/8) Σ_k N(c_k, s² I),
  c_k = R(cos 2πk/8, sin 2πk/8), R = ``EIGHT_GAUSSIANS_RADIUS``, s = ``EIGHT_GAUSSIANS_STD``.
* ``moons``, ``spirals``, ``digits``: no closed form (None).

**Support fraction** (:func:`support_fraction`, checkerboard only): f̂ = #{x_i inside}/n with the binomial standard
error √(f̂(1 − f̂)/n). A perfect model has f = 1.

**Cross-entropy** (:func:`cross_entropy`): H(q, p) = −E_q[log p(X)] estimated by −(1/n) Σ log p(x_i) with standard
error sd(log p(x_i))/√n (nats). Beside it the same estimator on held-out data of the same size estimates the data's
own entropy H(p) = H(p, p). H(q, p) = H(q) + KL(q‖p) is not a divergence: a sample concentrated on the modes scores
*below* H(p) (too sharp), mass in low-density regions scores above it (too broad); a value equal to H(p) within
the errors is necessary, not sufficient, for q = p. For the checkerboard H(q, p) = +∞ as soon as q puts any mass
off the squares, and the density is flat on them: the estimator is taken over the points *inside* the support
only, where it is log 32 exactly (standard error 0) — all the information is in the support fraction, reported
together with it.

**Two-sample test** (:func:`two_sample_test`): H0: the samples X (n points) and the held-out data Y (m points)
come from the same distribution. Base statistic: the unbiased MMD² (Gretton et al. 2012, eq. 3)

    MMD²_u = Σ_{i≠j} k(x_i, x_j)/(n(n−1)) + Σ_{i≠j} k(y_i, y_j)/(m(m−1)) − 2 Σ_{i,j} k(x_i, y_j)/(nm)

with RBF kernels k_h(a, b) = exp(−‖a − b‖²/(2h²)), h = m̃·c, m̃ the median heuristic (the median pairwise
distance; Gretton et al. 2012, §8). The default ``"mmd_agg"`` takes c ∈ (1/16, ⅛, ¼, ½, 1, 2) and the statistic
T = max_h (MMD²_h − mean_π MMD²_h)/sd_π MMD²_h, each bandwidth standardised by its permutation distribution (an
aggregated test in the spirit of MMDAgg, Schrab et al. 2023). The old statistic, the MMD² of the *mean* kernel
over c ∈ (¼, ½, 1, 2) (``"mmd"``, as :func:`mmd_rbf`), and the energy distance (``"energy"``; Székely & Rizzo 2013,
E = 2E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖, the V-statistic MMD² of the kernel −‖a − b‖, Sejdinovic et al. 2013) are
available but have little power here: on the checkerboard at n = 1000 they reject 25% of the mass moved off the
squares in 28–40% (``"mmd"``) and 12% (``"energy"``) of the repetitions, and the checkerboard blurred by 0.2 sd
(31% off the squares) in 10% and 8%; ``"mmd_agg"`` rejects both in 95–98% (table below). Averaging kernels lets
the wide bandwidths, whose null variance is largest, drown the narrow ones that see the squares' edges.

Null distribution by permutation (Good 2005; Phipson & Smyth 2010): pool Z = (X, Y) (N = n + m points), draw B
relabellings π_b (the "X" of relabelling b a uniformly random n-subset of Z, drawn by selection sampling, Knuth's
Algorithm S), and

    p = (1 + #{b : T(π_b) ≥ T}) / (1 + B),

a valid p-value (P(p ≤ α) ≤ α under H0, for every B; Phipson & Smyth 2010). The standardisation uses the mean and
sd over all B + 1 labellings (the observed one included), a symmetric function of them, so the B + 1 statistics
stay exchangeable under H0 and the test exact. All statistics come from pooled N×N kernel matrices K in one batched
computation: with s_b ∈ {0, 1}^N the indicator of relabelling b's X, q_b = s_bᵀ K s_b, l_b = s_bᵀ K 1 and
τ_b = s_bᵀ diag K give Σ_XX = q_b, Σ_XY = l_b − q_b, Σ_YY = 1ᵀK1 − 2l_b + q_b (one (B + 1)×N by N×N matrix
product per bandwidth; cost O(H·B·N²), no loop over permutations). K is centred by its mean first (no statistic
changes, the rounding shrinks), and T(π_b) ≥ T is taken with a tolerance of 16 machine epsilons × mean|K| (in the
units of T; conservative: exact ties of float-rounded statistics count as ≥).

The default bandwidths are the median heuristic of the *pooled* sample (on ≤ 500 points taken at evenly spaced
ranks of Z's projection on (1, …, 1), a function of the pooled set only), so the kernel does not depend on the
labels and the permutation test is exact. (:func:`mmd_rbf` in :func:`sample_quality` keeps the old rule, the
median of the held-out data × (¼, ½, 1, 2), so its numbers stay comparable with earlier runs.)

**Power** (:func:`power`): the rejection rate at level α over R repetitions of the test on fresh pairs
(bad-model sample, data sample) of the test's sample size, with its binomial standard error √(r(1 − r)/R). A "not
rejected" means something only where the power against a model one would call bad is high. The bad models
(:class:`BadModel` = a source of data pairs + a corruption):

* :class:`Blur`: the data plus N(0, diag((c·sd)²)) noise, sd the per-coordinate standard deviation of the
  held-out data, c = 0.2 in :func:`sample_quality` (on the checkerboard c = 0.1, 0.2, 0.3 leave 83%, 69%, 57%
  of the mass on the squares: c = 0.2–0.3 is the weighting study's failure mode);
* :class:`OffSupport` (checkerboard): each point replaced with probability f by a uniform draw on the 8 white
  squares, f = 0.25 in :func:`sample_quality` (a good model: 7% off).

For the toy data sets the pairs are fresh draws from the data distribution (:class:`ToyPairs`, so the rate
estimates the unconditional power); otherwise (digits) two disjoint random halves of the pooled held-out sets
(:class:`HeldOutPairs`, the power conditional on the held-out data).

Measured rejection rates of ``"mmd_agg"`` at n = 1000 per side, α = 0.05, R = 40 repetitions of B = 39 relabellings
(se ≤ 0.08):

==================  ============  =======  ==========  =====
bad model           checkerboard  mixture  8gaussians  moons
==================  ============  =======  ==========  =====
none (the size)     0.03          0.00     0.08        0.00
blur, c = 0.1       0.08          0.08     0.28        0.15
blur, c = 0.2       0.95          0.43     1.00        0.98
off support, 10%    0.20
off support, 25%    0.98
==================  ============  =======  ==========  =====

So at n = 1000 the test separates the weighting study's failure mode from the data, but not a model 10% off the
squares or blurred by 0.1 sd: there, "not rejected" says nothing, and the support fraction (se ≈ 0.01 at
n = 1000) is the sharper measure.

Cost and caps (2 CPU cores): the test and the power use at most ``test_max_n`` = 1000 points per side
(N ≤ 2000): one test with 499 relabellings takes ~0.15 s, one power study (R = 40, B = 39) ~3 s on idle cores
(sample_quality runs one per bad model). Raise ``test_max_n`` for more power at a cost ∝ n² (∝ B·n² for the
relabellings).

References: A. Gretton, K. Borgwardt, M. Rasch, B. Schölkopf, A. Smola, "A kernel two-sample test", JMLR 13
(2012); G. Székely, M. Rizzo, "Energy statistics: a class of statistics based on distances", J. Stat. Plan.
Inference 143 (2013); D. Sejdinovic, B. Sriperumbudur, A. Gretton, K. Fukumizu, "Equivalence of distance-based
and RKHS-based statistics in hypothesis testing", Ann. Stat. 41 (2013); P. Good, "Permutation, Parametric and
Bootstrap Tests of Hypotheses" (2005); A. Schrab, I. Kim, M. Albert, B. Laurent, B. Guedj, A. Gretton, "MMD
aggregated two-sample test", JMLR 24 (2023); B. Phipson, G. Smyth, "Permutation p-values should never be zero",
Stat. Appl. Genet. Mol. Biol. 9 (2010).
"""

from __future__ import annotations

import abc
import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from diffjax import data as data_lib

__all__ = [
    "DISTANCE_KEYS",
    "HEADLINE_KEYS",
    "DATA_NAMES",
    "DENSITY_NAMES",
    "BANDWIDTH_FACTORS",
    "AGG_BANDWIDTH_FACTORS",
    "STATISTICS",
    "Estimate",
    "true_log_density",
    "support_fraction",
    "cross_entropy",
    "true_nll",
    "energy_distance",
    "mmd_rbf",
    "mmd_bandwidths",
    "two_sample_test",
    "AbstractPairs",
    "ToyPairs",
    "HeldOutPairs",
    "AbstractCorruption",
    "Blur",
    "OffSupport",
    "BadModel",
    "power",
    "sample_quality",
    "gaussian_bits_per_dim",
]

#: The keys of :func:`sample_quality` that summaries report: the distances with their data-vs-data floors, and
#: the metrics with power (present where they apply).
DISTANCE_KEYS = ("energy_distance", "energy_distance_floor", "mmd_rbf", "mmd_rbf_floor")
HEADLINE_KEYS = (
    "support_fraction",
    "support_fraction_se",
    "cross_entropy",
    "cross_entropy_se",
    "data_entropy",
    "mmd_p_value",
    "test_n",
    "power_vs_blur",
    "power_vs_off_support",
)

DATA_NAMES: tuple[str, ...] = (*data_lib.TOY_NAMES, "digits")
"""The data sets the metrics know by name."""
DENSITY_NAMES: tuple[str, ...] = ("checkerboard", "mixture", "8gaussians")
"""The data sets whose log-density is known in closed form (:func:`true_log_density`)."""
BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0)
"""RBF bandwidths of :func:`mmd_rbf` (and of the ``"mmd"`` test) as multiples of the median pairwise distance."""
AGG_BANDWIDTH_FACTORS = (1 / 16, 1 / 8, 0.25, 0.5, 1.0, 2.0)
"""Bandwidths of the aggregated ``"mmd_agg"`` test (the default), as multiples of the median pairwise distance."""
STATISTICS = ("mmd_agg", "mmd", "energy")
"""The statistics of :func:`two_sample_test`."""
_MEDIAN_POINTS = 500
_TIE_EPS = 16.0


class Estimate(NamedTuple):
    """A Monte-Carlo estimate: ``value`` ± ``se`` (one standard error) from ``n`` independent terms."""

    value: float
    se: float
    n: int


def _check_name(data_name, where: str) -> str:
    if not isinstance(data_name, str) or data_name not in DATA_NAMES:
        raise ValueError(
            f"{where}: unknown data_name={data_name!r}; valid names are {', '.join(DATA_NAMES)}"
        )
    return data_name


def _points(x, where: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1 or (dim is not None and (x.ndim != 2 or x.shape[1] != dim)):
        want = f"(n, {dim})" if dim is not None else "(n, ...)"
        raise ValueError(f"{where}: x must have shape {want} (n points), got {x.shape}")
    return x


# ----------------------------------------------------------------------------------------------------------
# Closed-form densities (numpy, float64)
# ----------------------------------------------------------------------------------------------------------


def _checkerboard_inside(x: np.ndarray) -> np.ndarray:
    """Square (i, j) = (⌊x/2⌋, ⌊y/2⌋) ∈ {−2..1}² is black iff i + j is even (``sample_checkerboard``)."""
    ij = np.floor(x / 2.0)
    on_board = np.all((ij >= -2) & (ij <= 1), axis=-1)
    return on_board & (np.sum(ij, axis=-1) % 2 == 0)


def _gmm_log_density(x, weights, means, variances) -> np.ndarray:
    """log Σ_k π_k N(x; μ_k, diag(v_k)), a stable log-sum-exp over k (numpy, float64)."""
    w = np.asarray(weights, np.float64)
    m = np.asarray(means, np.float64)
    v = np.broadcast_to(np.asarray(variances, np.float64), m.shape)
    d = m.shape[1]
    quad = np.sum((x[:, None, :] - m[None]) ** 2 / v[None], axis=-1)
    lj = np.log(w / w.sum()) - 0.5 * (quad + np.sum(np.log(v), -1) + d * math.log(2 * math.pi))
    top = np.max(lj, axis=1, keepdims=True)
    return (top + np.log(np.sum(np.exp(lj - top), axis=1, keepdims=True)))[:, 0]


def _eight_gaussians_centers() -> np.ndarray:
    ang = 2.0 * np.pi * np.arange(8) / 8
    return data_lib.EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(ang), np.sin(ang)], -1)


def true_log_density(data_name: str, x) -> np.ndarray | None:
    """log p_data(x_i) in nats for each of the points ``x`` (n, 2), where the data density is known in closed form.

    ``checkerboard``: log(1/32) on the black squares, −∞ elsewhere; ``mixture`` and ``8gaussians``: the exact
    Gaussian-mixture log-density (the constants of ``diffjax.data``); None for ``moons``, ``spirals`` and
    ``digits``. Points are the data end (t = 1). Computed in numpy float64; not traceable. Raises ``ValueError``
    for an unknown name or a wrong shape.
    """
    _check_name(data_name, "true_log_density")
    if data_name not in DENSITY_NAMES:
        return None
    x = _points(x, "true_log_density", 2)
    if data_name == "checkerboard":
        return np.where(_checkerboard_inside(x), -math.log(32.0), -np.inf)
    if data_name == "mixture":
        return _gmm_log_density(
            x, data_lib.MIXTURE_WEIGHTS, data_lib.MIXTURE_MEANS, data_lib.MIXTURE_VARIANCES
        )
    return _gmm_log_density(
        x, np.full(8, 1 / 8), _eight_gaussians_centers(), data_lib.EIGHT_GAUSSIANS_STD**2
    )


def support_fraction(data_name: str, x) -> Estimate | None:
    """The fraction of the points ``x`` (n, 2) inside the data's support, with its binomial standard error.

    Only the checkerboard has a bounded support (its 8 black squares): f̂ = #{inside}/n, se = √(f̂(1 − f̂)/n).
    None for the other data sets (a Gaussian mixture's support is the whole plane).
    """
    _check_name(data_name, "support_fraction")
    if data_name != "checkerboard":
        return None
    x = _points(x, "support_fraction", 2)
    n = len(x)
    if n == 0:
        raise ValueError("support_fraction: x holds no points")
    f = float(np.mean(_checkerboard_inside(x)))
    return Estimate(f, math.sqrt(f * (1.0 - f) / n), n)


def cross_entropy(data_name: str, samples) -> Estimate | None:
    """H(q, p) = −E_q[log p_data]: −mean log p_data(samples) in nats, its standard error, and the points used.

    se = sd(log p(x_i))/√n (sample sd, ddof = 1). For the **checkerboard** the mean is over the samples *inside*
    the support only (``n`` = how many; outside, log p = −∞): there it is log 32 exactly with se 0, so report it
    with :func:`support_fraction`, which carries the information. Applied to held-out data of the same size it
    estimates the data's entropy H(p). None where the density is not known (see :func:`true_log_density`).
    """
    lp = true_log_density(data_name, samples)
    if lp is None:
        return None
    lp = lp[np.isfinite(lp)] if data_name == "checkerboard" else lp
    n = len(lp)
    if n == 0:
        return Estimate(math.nan, math.nan, 0)
    if n == 1:
        se = math.nan
    elif np.all(lp == lp[0]):  # the flat checkerboard: exactly 0, not the rounding of np.std
        se = 0.0
    else:
        se = float(np.std(lp, ddof=1) / math.sqrt(n))
    return Estimate(float(-np.mean(lp)), se, n)


def true_nll(data: str, x) -> float | None:
    """The data distribution's own mean NLL on ``x`` (nats) where it is known in closed form."""
    if data == "checkerboard":
        return math.log(32.0)  # uniform density 1/32 on the black squares
    if data in ("mixture", "8gaussians"):
        from diffjax.analytic import GaussianMixture  # noqa: PLC0415

        if data == "mixture":
            gm = GaussianMixture(
                data_lib.MIXTURE_WEIGHTS, data_lib.MIXTURE_MEANS, data_lib.MIXTURE_VARIANCES
            )
        else:
            gm = GaussianMixture(
                np.full(8, 1 / 8),
                np.asarray(data_lib.eight_gaussians_centers()),
                np.full(8, data_lib.EIGHT_GAUSSIANS_STD**2),
            )
        return float(-jnp.mean(jax.vmap(gm.log_prob)(jnp.asarray(x))))
    return None


# ----------------------------------------------------------------------------------------------------------
# Distances (moved from diffjax.experiment; numbers unchanged)
# ----------------------------------------------------------------------------------------------------------


def _sq_dists(a, b):
    a = jnp.asarray(a, jnp.float32).reshape(len(a), -1)
    b = jnp.asarray(b, jnp.float32).reshape(len(b), -1)
    d = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(d, 0.0)


@jax.jit
def energy_distance(x, y):
    """Energy distance E = 2E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ ≥ 0 (Székely & Rizzo 2013; V-statistics).

    Zero iff the distributions are equal; in the units of the data; no bandwidth to choose.
    """
    dxy = jnp.sqrt(_sq_dists(x, y) + 1e-12)
    dxx = jnp.sqrt(_sq_dists(x, x) + 1e-12)
    dyy = jnp.sqrt(_sq_dists(y, y) + 1e-12)
    return 2.0 * jnp.mean(dxy) - jnp.mean(dxx) - jnp.mean(dyy)


@jax.jit
def mmd_rbf(x, y, bandwidths):
    """Unbiased MMD² with the kernel k(a, b) = mean_h exp(−‖a − b‖²/(2h²)) over ``bandwidths`` (Gretton et al. 2012).

    MMD² = E k(X, X') + E k(Y, Y') − 2 E k(X, Y), the diagonal terms left out of the within-sample means.
    """
    h = jnp.asarray(bandwidths, jnp.float32)

    def k(d):
        return jnp.mean(jnp.exp(-d[..., None] / (2.0 * h * h)), axis=-1)

    kxx, kyy, kxy = k(_sq_dists(x, x)), k(_sq_dists(y, y)), k(_sq_dists(x, y))
    n, m = kxx.shape[0], kyy.shape[0]
    sxx = (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
    syy = (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    return sxx + syy - 2.0 * jnp.mean(kxy)


def mmd_bandwidths(data) -> Float[Array, " 4"]:
    """The old bandwidth rule: the median pairwise distance of ``data[:500]`` times (¼, ½, 1, 2) (float32)."""
    data = np.asarray(data)[:_MEDIAN_POINTS]
    med = jnp.sqrt(jnp.median(_sq_dists(data, data)))
    return jnp.asarray(BANDWIDTH_FACTORS, jnp.float32) * med


# ----------------------------------------------------------------------------------------------------------
# Permutation two-sample test
# ----------------------------------------------------------------------------------------------------------


def _pairwise_sq(a, b):
    d = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(d, 0.0)


def _pooled_bandwidths(z, factors):
    """Median heuristic × ``factors`` on ≤ 500 points of the pooled sample at evenly spaced ranks of its
    projection on (1, …, 1): a function of the pooled *set*, so the kernel does not depend on the labels."""
    n = z.shape[0]
    k = min(n, _MEDIAN_POINTS)
    order = jnp.argsort(jnp.sum(z, axis=1))
    sub = z[order[np.round(np.linspace(0, n - 1, k)).astype(np.int32)]]
    med = jnp.sqrt(_lower_median(_pairwise_sq(sub, sub)))
    return jnp.asarray(factors, z.dtype) * med


def _lower_median(v, iters: int = 48):
    """The ⌈M/2⌉-th smallest of the M entries of ``v`` ≥ 0, by bisection on the value (to float resolution):
    48 counting passes instead of a sort (XLA's CPU sort of 250 000 entries costs 15× more)."""
    v = v.reshape(-1)
    target = (v.size + 1) // 2

    def body(_, bounds):
        lo, hi = bounds
        mid = 0.5 * (lo + hi)
        ok = jnp.sum(v <= mid) >= target
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    _, hi = jax.lax.fori_loop(0, iters, body, (jnp.zeros((), v.dtype), jnp.max(v)))
    return hi


def _relabellings(key, n: int, big_n: int, num: int, dtype):
    """``num`` independent uniformly random n-subsets of N = ``big_n`` points as 0/1 rows (num, N).

    Sequential selection sampling (Knuth, TAOCP vol. 2, Algorithm S), all rows at once: with u = uniform(key,
    (N, num)), point i joins row b's subset iff u[i, b]·(N − i) < n − c_b (c_b: points taken so far), which gives
    every n-subset probability 1/C(N, n) and exactly n ones per row. A scan over N with a vector of ``num`` (no
    sort: XLA's CPU sort made ``jax.random.permutation`` 10× slower than the statistics themselves).
    """
    u = jax.random.uniform(key, (big_n, num), dtype)

    def step(c, inp):
        u_i, remaining = inp
        take = u_i * remaining < (n - c)
        return c + take, take

    remaining = (big_n - jnp.arange(big_n)).astype(dtype)
    _, s = jax.lax.scan(step, jnp.zeros(num, jnp.int32), (u, remaining))
    return s.T.astype(dtype)


def _kernel_rows(kern, s, n: int, m: int, unbiased: bool):
    """The two-sample statistic of every labelling row of ``s`` (R, N) for one pooled kernel matrix, and its
    rounding scale. Unbiased MMD² (diagonals left out) or the V-statistic (energy distance with k = −‖a − b‖)."""
    kern = kern - jnp.mean(kern)  # no statistic changes (its weights sum to 0); smaller rounding
    q = jnp.sum((s @ kern) * s, axis=1)  # Σ_XX
    row = jnp.sum(kern, axis=1)
    lin = s @ row
    total = jnp.sum(row)
    sxx, sxy, syy = q, lin - q, total - 2.0 * lin + q
    if unbiased:
        diag = jnp.diagonal(kern)
        tr_x = s @ diag
        tr_y = jnp.sum(diag) - tr_x
        stats = (sxx - tr_x) / (n * (n - 1)) + (syy - tr_y) / (m * (m - 1)) - 2.0 * sxy / (n * m)
    else:
        stats = sxx / n**2 + syy / m**2 - 2.0 * sxy / (n * m)
    return stats, _TIE_EPS * jnp.finfo(kern.dtype).eps * jnp.mean(jnp.abs(kern))


def _test_core(x, y, key, bandwidths, num_permutations: int, statistic: str):
    """Unchecked permutation test; ``x`` (n, D), ``y`` (m, D) of one float dtype. Returns (T, p, bandwidths)."""
    n, m = x.shape[0], y.shape[0]
    big_n = n + m
    z = jnp.concatenate([x, y], axis=0)
    d2 = _pairwise_sq(z, z)
    s0 = (jnp.arange(big_n) < n).astype(z.dtype)
    s = jnp.concatenate([s0[None], _relabellings(key, n, big_n, num_permutations, z.dtype)])
    if statistic == "energy":
        h = jnp.zeros((0,), z.dtype)
        stats, tol = _kernel_rows(-jnp.sqrt(d2 + 1e-12), s, n, m, False)
    else:
        factors = AGG_BANDWIDTH_FACTORS if statistic == "mmd_agg" else BANDWIDTH_FACTORS
        h = _pooled_bandwidths(z, factors) if bandwidths is None else bandwidths
        # the barrier keeps XLA from fusing (recomputing) the exponentials into each of their consumers
        rbf = [
            jax.lax.optimization_barrier(jnp.exp(-d2 / (2.0 * h[i] ** 2)))
            for i in range(h.shape[0])
        ]
        if statistic == "mmd":
            stats, tol = _kernel_rows(sum(rbf) / len(rbf), s, n, m, True)
        else:  # max over bandwidths of the statistic standardised by its permutation distribution
            rows, tols = zip(*(_kernel_rows(k, s, n, m, True) for k in rbf))
            rows, tols = jnp.stack(rows, axis=1), jnp.stack(tols)
            mean, sd = jnp.mean(rows, axis=0), jnp.std(rows, axis=0)
            ok = sd > 0
            safe = jnp.where(ok, sd, 1.0)
            stats = jnp.max(jnp.where(ok, (rows - mean) / safe, 0.0), axis=1)
            tol = jnp.max(jnp.where(ok, tols / safe, 0.0))
    t_obs, t_perm = stats[0], stats[1:]
    p = (1.0 + jnp.sum(t_perm >= t_obs - tol)) / (1.0 + num_permutations)
    return t_obs, p.astype(z.dtype), h


@functools.partial(jax.jit, static_argnames=("num_permutations", "statistic"))
def _test_jit(x, y, key, bandwidths, num_permutations, statistic):
    x = eqx.error_if(
        x,
        ~(jnp.all(jnp.isfinite(x)) & jnp.all(jnp.isfinite(y))),
        "two_sample_test: x or y holds NaN/inf (check the samples before testing them)",
    )
    return _test_core(x, y, key, bandwidths, num_permutations, statistic)


def _prepare_pair(x, y, where: str):
    dt = jnp.result_type(float)
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or x.shape[1:] != y.shape[1:]:
        raise ValueError(
            f"{where}: x and y must be point sets (n, ...) and (m, ...) with the same point shape, got "
            f"{x.shape} and {y.shape}"
        )
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(
            f"{where}: need at least 2 points per sample, got {x.shape[0]} and {y.shape[0]}"
        )
    return x.reshape(x.shape[0], -1).astype(dt), y.reshape(y.shape[0], -1).astype(dt)


def _check_int(value, name: str, where: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{where}: {name} must be a Python int >= {low}, got {value!r}")
    return int(value)


def _check_statistic(statistic, where: str) -> str:
    if statistic not in STATISTICS:
        raise ValueError(
            f"{where}: statistic must be one of {', '.join(STATISTICS)}, got {statistic!r}"
        )
    return statistic


def two_sample_test(
    x: Float[Array, "n ..."],
    y: Float[Array, "m ..."],
    key: PRNGKeyArray,
    num_permutations: int = 499,
    *,
    bandwidths=None,
    statistic: str = "mmd_agg",
) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Permutation test of H0: ``x`` and ``y`` come from one distribution. Returns ``(statistic, p_value)``.

    ``statistic``:

    * ``"mmd_agg"`` (default): T = max_h (MMD²_h − mean_b MMD²_h)/sd_b MMD²_h, the unbiased RBF MMD² of each
      bandwidth h standardised by its permutation distribution (mean and sd over the B + 1 labellings, the observed
      one included, so the B + 1 statistics stay exchangeable and the test exact), h = ``bandwidths`` or the pooled
      median heuristic × (1/16, ⅛, ¼, ½, 1, 2) (``AGG_BANDWIDTH_FACTORS``). An aggregated test in the spirit of
      MMDAgg (Schrab et al. 2023): it keeps the power of the best bandwidth, which the mean kernel loses.
    * ``"mmd"``: the unbiased MMD² of the mean kernel mean_h exp(−‖a − b‖²/(2h²)) (Gretton et al. 2012; as
      :func:`mmd_rbf`), h = ``bandwidths`` or the pooled median × (¼, ½, 1, 2).
    * ``"energy"``: the energy distance (Székely & Rizzo 2013, V-statistic, as :func:`energy_distance`).

    p = (1 + #{T_perm ≥ T})/(1 + B) over B = ``num_permutations`` relabellings, each a uniformly random n-subset of
    the pooled points Z = concatenate(x, y) (drawn from ``key`` by selection sampling, ``_relabellings``) taken as
    "x". All B statistics in one batched computation (module docstring); O(H·(B + 1)·N²) time, O(H·N² + B·N)
    memory, N = n + m, H bandwidths. Points of any shape (flattened); float32, or float64 under x64. Jitted; works
    under ``jit`` and ``vmap``; a NaN/inf input raises (``eqx.error_if``). Points are the data end (t = 1).
    """
    x, y = _prepare_pair(x, y, "two_sample_test")
    num_permutations = _check_int(num_permutations, "num_permutations", "two_sample_test")
    statistic = _check_statistic(statistic, "two_sample_test")
    if bandwidths is not None and statistic != "energy":
        bandwidths = jnp.asarray(bandwidths, x.dtype).reshape(-1)
        if bandwidths.shape[0] == 0:
            raise ValueError(
                "two_sample_test: bandwidths is empty; pass None for the median heuristic"
            )
    else:
        bandwidths = None
    t, p, _ = _test_jit(x, y, key, bandwidths, num_permutations, statistic)
    return t, p


# ----------------------------------------------------------------------------------------------------------
# Power against known-bad models
# ----------------------------------------------------------------------------------------------------------


class AbstractPairs(eqx.Module):
    """A source of (a, b): two independent samples of ``n`` points (field ``n``) of the data distribution (the
    data end, t = 1)."""

    @abc.abstractmethod
    def __call__(self, key: PRNGKeyArray) -> tuple[Array, Array]: ...


class ToyPairs(AbstractPairs):
    """Fresh draws of the toy distribution ``data_name`` (``diffjax.data.toy_sample``): the unconditional power."""

    data_name: str = eqx.field(static=True)
    n: int = eqx.field(static=True)

    def __call__(self, key):
        ka, kb = jax.random.split(key)
        return (
            data_lib.toy_sample(self.data_name, ka, self.n),
            data_lib.toy_sample(self.data_name, kb, self.n),
        )


class HeldOutPairs(AbstractPairs):
    """Two disjoint random subsets of ``n`` points of a held-out ``pool`` (≥ 2n points): the power conditional on
    the held-out data, for data sets without a generator (digits)."""

    pool: Array
    n: int = eqx.field(static=True)

    def __check_init__(self):
        if 2 * self.n > self.pool.shape[0]:
            raise ValueError(
                f"HeldOutPairs: the pool holds {self.pool.shape[0]} points, fewer than 2n = {2 * self.n}"
            )

    def __call__(self, key):
        perm = jax.random.permutation(key, self.pool.shape[0])
        return self.pool[perm[: self.n]], self.pool[perm[self.n : 2 * self.n]]


class AbstractCorruption(eqx.Module):
    """Turns a data sample into a bad model's sample: ``corruption(key, a) -> a'`` (same shape). Each concrete
    class names itself in the class attribute ``name`` (the key ``power_vs_<name>`` of :func:`sample_quality`)."""

    name = "corruption"

    @abc.abstractmethod
    def __call__(self, key: PRNGKeyArray, a: Array) -> Array: ...

    @abc.abstractmethod
    def describe(self) -> str: ...


class Blur(AbstractCorruption):
    """a + N(0, diag(noise_std²)); :func:`sample_quality` uses noise_std = ``blur_scale`` (0.2) × the
    per-coordinate sd of the held-out data (``relative`` records that factor, for :meth:`describe`)."""

    noise_std: Array
    relative: float = eqx.field(static=True, default=0.2)
    name = "blur"

    def __call__(self, key, a):
        noise = jax.random.normal(key, a.shape, a.dtype)
        return a + jnp.asarray(self.noise_std, a.dtype).reshape(a.shape[1:]) * noise

    def describe(self):
        return f"data + N(0, ({self.relative:g}*sd)^2) per coordinate, sd of the held-out data"


class OffSupport(AbstractCorruption):
    """Checkerboard: each point replaced with probability ``fraction`` by a uniform draw on the 8 white squares
    (i + j odd), so a fraction of the mass lies off the support."""

    fraction: float = eqx.field(static=True, default=0.25)
    name = "off_support"

    def __call__(self, key, a):
        km, kc, ku = jax.random.split(key, 3)
        n = a.shape[0]
        cell = jax.random.randint(kc, (n,), 0, 8)
        j = cell // 2 - 2
        i = 2 * (cell % 2) + (j + 1) % 2 - 2  # i + j odd
        u = jax.random.uniform(ku, (n, 2), a.dtype)
        white = 2.0 * (jnp.stack([i, j], axis=-1).astype(a.dtype) + u)
        off = jax.random.bernoulli(km, self.fraction, (n, 1))
        return jnp.where(off, white, a)

    def describe(self):
        return f"checkerboard with {self.fraction:.0%} of its mass uniform on the white squares"


class BadModel(eqx.Module):
    """One repetition of a power study: ``bad(key) -> (model_sample, data_sample)``, the model sample a corrupted
    data sample, the data sample independent of it."""

    pairs: AbstractPairs
    corruption: AbstractCorruption

    def __call__(self, key):
        kp, kc = jax.random.split(key)
        a, b = self.pairs(kp)
        return self.corruption(kc, a), b


@eqx.filter_jit
def _draw_pairs(bad, keys):
    """All repetitions' (model sample, data sample) at once, flattened to (R, n, D) in the default float dtype."""
    x, y = jax.vmap(bad)(keys)
    dt = jnp.result_type(float)
    return x.reshape(x.shape[:2] + (-1,)).astype(dt), y.reshape(y.shape[:2] + (-1,)).astype(dt)


@functools.partial(jax.jit, static_argnames=("num_permutations", "statistic"))
def _rejection_rate(xs, ys, keys, alpha, num_permutations, statistic):
    """The fraction of the R tests (xs[r], ys[r]) with p ≤ alpha; one program for every bad model of a shape."""

    def one(args):
        x, y, k = args
        _, p, _ = _test_core(x, y, k, None, num_permutations, statistic)
        return p <= alpha

    return jnp.mean(jax.lax.map(one, (xs, ys, keys)).astype(jnp.float32))


def power(
    bad: BadModel,
    key: PRNGKeyArray,
    *,
    repeats: int = 40,
    num_permutations: int = 39,
    alpha: float = 0.05,
    statistic: str = "mmd_agg",
) -> Estimate:
    """The rejection rate of :func:`two_sample_test` at level ``alpha`` against the bad model ``bad``.

    ``repeats`` times: draw (model sample, data sample) = ``bad(k)`` and test them with ``statistic``
    (pooled-median bandwidths) and ``num_permutations`` relabellings: 39 makes the level exactly 2/40 = 0.05
    (p ≤ 0.05 iff at most one relabelling reaches T) at a twelfth of the cost of 499; the power of the reported
    test (more relabellings) is at least about this. Returns Estimate(rate, √(r(1 − r)/R), R). Under H0 (no
    corruption) the rate estimates the size (≤ α). The R pairs are drawn first (a vmap of ``bad``), then tested by
    one compiled program (a ``lax.map`` over the repetitions) shared by every bad model of the same sample size
    ``bad.pairs.n``.
    """
    if not isinstance(bad, BadModel):
        raise ValueError(
            f"power: bad must be a BadModel(pairs, corruption), got {type(bad).__name__}"
        )
    repeats = _check_int(repeats, "repeats", "power")
    num_permutations = _check_int(num_permutations, "num_permutations", "power")
    statistic = _check_statistic(statistic, "power")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"power: alpha must be in (0, 1), got {alpha!r}")
    k_draw, k_test = jax.random.split(key)
    xs, ys = _draw_pairs(bad, jax.random.split(k_draw, repeats))
    keys = jax.random.split(k_test, repeats)
    rate = float(_rejection_rate(xs, ys, keys, float(alpha), num_permutations, statistic))
    return Estimate(rate, math.sqrt(rate * (1.0 - rate) / repeats), repeats)


# ----------------------------------------------------------------------------------------------------------
# Everything together
# ----------------------------------------------------------------------------------------------------------


def sample_quality(
    samples,
    data,
    reference=None,
    *,
    data_name: str | None = None,
    key: PRNGKeyArray | None = None,
    max_n: int = 2000,
    test_max_n: int = 1000,
    num_permutations: int = 499,
    power_repeats: int = 40,
    power_permutations: int = 39,
    blur_scale: float = 0.2,
    off_support_fraction: float = 0.25,
    alpha: float = 0.05,
) -> dict:
    """Sample-quality metrics of ``samples`` against held-out ``data`` (both the data end, t = 1); a JSON-able dict.

    Always (as before; ``max_n`` points of each): ``energy_distance``, ``mmd_rbf`` (bandwidths ``mmd_bandwidths``:
    the median pairwise distance of the held-out data × (¼, ½, 1, 2)); with ``reference`` (a second independent
    held-out set) ``energy_distance_floor`` and ``mmd_rbf_floor``, the same metrics between the two data sets (what
    a perfect model scores at this sample size — below it is *not* evidence of a good model).

    The permutation test (:func:`two_sample_test`, ``"mmd_agg"``) of the first ``test_n`` = min(n, ``test_max_n``)
    samples against as many held-out points: ``mmd_test_statistic`` (the largest standardised MMD² over the
    bandwidths ``mmd_test_bandwidths``, the pooled median × (1/16 … 2); in null standard deviations),
    ``mmd_p_value`` (``test_permutations`` relabellings; small = the samples are distinguishable from the data).
    Its power at the same ``test_n`` (``power_repeats`` tests of ``power_permutations`` relabellings at level
    ``power_alpha``): ``power_vs_blur`` (± ``power_vs_blur_se``; the data blurred by N(0, (``blur_scale``·sd)²))
    and, for the checkerboard, ``power_vs_off_support`` (± ``_se``; ``off_support_fraction`` of the mass on the
    white squares); ``power_models`` describes them, ``power_pairs`` says where the pairs come from ("fresh toy
    draws" or "held-out split"). Without a generator (``data_name`` None or digits) the pairs are disjoint halves
    of data + reference: the power is then at ``power_n`` ≤ test_n. A p-value above α means something only where
    the power is high: it then says the model is better than the bad one. Cost: ~3 s per bad model at
    test_n = 1000 on 2 idle CPU cores (the reason for the cap ``test_max_n``).

    With a ``data_name`` whose density is known: ``cross_entropy`` (± ``cross_entropy_se``, over
    ``cross_entropy_n`` samples) beside ``data_entropy`` (± ``data_entropy_se``: the same estimator on as many
    held-out points); for the checkerboard ``support_fraction`` (± ``support_fraction_se``), the cross-entropies
    then over the points inside the support (log 32 exactly; see :func:`cross_entropy`). ``key`` (default
    ``jax.random.key(0)``) drives the permutations and the power study.
    """
    max_n = _check_int(max_n, "max_n", "sample_quality", 2)
    test_max_n = _check_int(test_max_n, "test_max_n", "sample_quality", 2)
    if data_name is not None:
        _check_name(data_name, "sample_quality")
    key = jax.random.key(0) if key is None else key
    k_test, k_blur, k_off = jax.random.split(key, 3)
    samples = np.asarray(samples)[:max_n]
    data = np.asarray(data)[:max_n]
    _prepare_pair(samples, data, "sample_quality")
    if not (np.all(np.isfinite(samples)) and np.all(np.isfinite(data))):
        raise ValueError("sample_quality: samples or data hold NaN/inf; check them before scoring")
    bw = mmd_bandwidths(data)
    out = {
        "energy_distance": float(energy_distance(samples, data)),
        "mmd_rbf": float(mmd_rbf(samples, data, bw)),
        "mmd_bandwidths": [float(b) for b in bw],
    }
    if reference is not None:
        reference = np.asarray(reference)[: len(samples)]
        out["energy_distance_floor"] = float(energy_distance(reference, data))
        out["mmd_rbf_floor"] = float(mmd_rbf(reference, data, bw))

    if data_name is not None:
        frac = support_fraction(data_name, samples)
        if frac is not None:
            out["support_fraction"], out["support_fraction_se"] = frac.value, frac.se
        ce = cross_entropy(data_name, samples)
        if ce is not None:
            h = cross_entropy(data_name, data[: len(samples)])
            out["cross_entropy"], out["cross_entropy_se"], out["cross_entropy_n"] = ce
            out["data_entropy"], out["data_entropy_se"], out["data_entropy_n"] = h

    test_n = min(len(samples), len(data), test_max_n)
    xs, ys = _prepare_pair(samples[:test_n], data[:test_n], "sample_quality")
    t, p, h = _test_jit(xs, ys, k_test, None, num_permutations, "mmd_agg")
    out["test_n"] = test_n
    out["test_permutations"] = num_permutations
    out["mmd_test_statistic"] = float(t)
    out["mmd_test_bandwidths"] = [float(b) for b in h]
    out["mmd_p_value"] = float(p)

    pool = data if reference is None else np.concatenate([data, reference], axis=0)
    sd = np.std(pool.reshape(len(pool), -1), axis=0)
    if data_name in data_lib.TOY_NAMES:
        pairs = ToyPairs(data_name, test_n)
        out["power_pairs"] = "fresh toy draws"
    else:
        pairs = HeldOutPairs(jnp.asarray(pool, jnp.result_type(float)), min(test_n, len(pool) // 2))
        out["power_pairs"] = "held-out split"
    out["power_n"] = pairs.n
    corruptions = [(Blur(jnp.asarray(blur_scale * sd, jnp.result_type(float)), blur_scale), k_blur)]
    if data_name == "checkerboard":
        corruptions.append((OffSupport(off_support_fraction), k_off))
    out["power_alpha"] = float(alpha)
    out["power_repeats"] = power_repeats
    out["power_models"] = {}
    for corr, k in corruptions:
        est = power(
            BadModel(pairs, corr),
            k,
            repeats=power_repeats,
            num_permutations=power_permutations,
            alpha=alpha,
        )
        out[f"power_vs_{corr.name}"], out[f"power_vs_{corr.name}_se"] = est.value, est.se
        out["power_models"][corr.name] = corr.describe()
    return out


# ----------------------------------------------------------------------------------------------------------
# Digits baseline (moved from diffjax.experiment; unchanged)
# ----------------------------------------------------------------------------------------------------------


def gaussian_bits_per_dim(
    train_k, test_k, key, *, full_cov: bool = False, num_dequant: int = 4
) -> float:
    """Exact bits/dim of a Gaussian fitted by maximum likelihood to dequantized training digits.

    Model space y = 2(k + u)/17 − 1 (``diffjax.data.digits_to_model_space``); per-pixel (diagonal) Gaussian or, with
    ``full_cov``, a full-covariance Gaussian (ridge 1e-4). bpd = −(log N(y) + D·log(2/17))/(D ln 2), averaged
    over test images and ``num_dequant`` dequantization draws — the same convention as the likelihood runner.
    """
    k_fit, k_test = jax.random.split(key)
    y = data_lib.digits_to_model_space(jnp.asarray(train_k), k_fit).reshape(len(train_k), -1)
    y = y.astype(jnp.float64) if jax.config.read("jax_enable_x64") else y
    mu = jnp.mean(y, 0)
    d = y.shape[1]
    yt = jnp.stack(
        [
            data_lib.digits_to_model_space(jnp.asarray(test_k), k).reshape(len(test_k), -1)
            for k in jax.random.split(k_test, num_dequant)
        ]
    )
    z = yt - mu
    if full_cov:
        cov = jnp.cov(y, rowvar=False) + 1e-4 * jnp.eye(d)
        chol = jnp.linalg.cholesky(cov)
        sol = jax.scipy.linalg.solve_triangular(chol, z.reshape(-1, d).T, lower=True).T
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
        quad = jnp.sum(sol * sol, -1)
    else:
        var = jnp.var(y, 0) + 1e-6
        logdet = jnp.sum(jnp.log(var))
        quad = jnp.sum(z.reshape(-1, d) ** 2 / var, -1)
    log_p = -0.5 * (quad + logdet + d * math.log(2 * math.pi))
    bpd = -(log_p + d * data_lib.dequantization_log_volume()) / (d * math.log(2.0))
    return float(jnp.mean(bpd))
