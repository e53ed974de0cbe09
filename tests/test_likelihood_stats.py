"""Image-sized likelihoods: the Hutchinson standard error, the probe budget, bits/dim with statistics and the
exact trace's memory bound (t = 0 noise, t = 1 data).

Oracles: the empirical spread of the estimate over independent probe draws on the Gaussian-mixture oracle
(diffjax.analytic), the mixture's exact log-density, the closed-form divergence of an elementwise map, and XLA's
own memory analysis of the compiled program. Negative controls: the SE without its 1/√k, one probe (no spread),
the unchunked exact trace's D × D identity.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax as dj
from diffjax import solve
from diffjax.fields import EXACT_TRACE_BUDGET, ExactTrace, Hutchinson, HutchPlusPlus
from diffjax.likelihood import (
    bits_per_dim_with_stats,
    log_likelihood_with_stats,
    probes_for_precision,
)

PATH = dj.LinearPath()
SEEDS = 256


def mixture_4d():
    means = np.array([[-1.0, 0.5, 0.0, 1.0], [1.0, 1.0, -0.5, 0.0], [0.5, -1.5, 1.0, -1.0]])
    variances = np.array([[0.3, 0.2, 0.1, 0.4], [0.1, 0.4, 0.3, 0.2], [0.2, 0.2, 0.5, 0.1]])
    return dj.GaussianMixture(np.array([0.5, 0.3, 0.2]), means, variances)


@jax.jit
def _hutch(gm, x, keys, k4, k16):
    u = dj.velocity_field(gm.model("velocity", PATH), "velocity", PATH)

    def run(trace):
        def one(key):
            r = log_likelihood_with_stats(u, PATH, x, key=key, trace=trace)
            return r.log_prob, r.log_prob_se, r.status

        return jax.vmap(one)(keys)

    one = log_likelihood_with_stats(u, PATH, x, key=keys[0], trace="hutchinson")
    exact = log_likelihood_with_stats(u, PATH, x)
    # Hutch++ with 2 probes and a rank-1 sketch: 4 JVPs per evaluation, as many as Hutchinson(4)
    return run(Hutchinson(k4)), run(Hutchinson(k16)), exact, one, run(HutchPlusPlus(2, 1))


@pytest.fixture(scope="module")
def spread():
    gm = mixture_4d()
    x = jnp.array([0.3, -0.2, 0.5, 0.1])
    keys = jax.random.split(jax.random.key(0), SEEDS)
    # k = 4 and 16 probes over the same 256 seeds (a Python int is static: close over it)
    fn = jax.jit(lambda gm, x, keys: _hutch.__wrapped__(gm, x, keys, 4, 16))
    (lp4, se4, st4), (lp16, se16, st16), exact, one, (lpp, sepp, stpp) = fn(gm, x, keys)
    return dict(
        exact=float(gm.log_prob(x)),
        exact_solve=exact,
        one_probe=one,
        lp4=np.asarray(lp4),
        se4=np.asarray(se4),
        lp16=np.asarray(lp16),
        se16=np.asarray(se16),
        lpp=np.asarray(lpp),
        sepp=np.asarray(sepp),
        status=np.concatenate([np.asarray(st4), np.asarray(st16), np.asarray(stpp)]),
    )


def test_multi_probe_estimate_is_unbiased(spread):
    assert np.all(spread["status"] == solve.SUCCESSFUL)
    for lp in (spread["lp4"], spread["lp16"], spread["lpp"]):
        assert lp.std() > 1e-3  # an estimate, not the exact trace
        assert abs(lp.mean() - spread["exact"]) < 4 * lp.std(ddof=1) / math.sqrt(lp.size)


def test_reported_se_matches_empirical_spread_over_seeds(spread):
    """E[SE²] is the variance of log_prob over probe draws: the reported SE against the spread over 256 seeds."""
    for lp, se in ((spread["lp4"], spread["se4"]), (spread["lp16"], spread["se16"])):
        ratio = np.mean(se**2) / lp.var(ddof=1)
        assert 0.7 < ratio < 1.4, ratio
    # negative control: the probes' own spread, without the 1/√k, overstates the SE 2x (4x in variance)
    ratio = np.mean((spread["se4"] * 2) ** 2) / spread["lp4"].var(ddof=1)
    assert not 0.7 < ratio < 1.4
    # SE ∝ 1/√k: 16 probes halve the spread of 4
    assert 0.4 < spread["lp16"].std() / spread["lp4"].std() < 0.6


def test_hutch_plus_plus_lowers_the_variance_at_equal_cost(spread):
    """Hutch++ (2 probes, rank 1: 4 JVPs per evaluation) against Hutchinson with 4 probes (4 JVPs): unbiased
    (above), and its variance over the 256 seeds is lower (2.6x measured); its SE is the deflated residual's."""
    assert spread["lpp"].var() < spread["lp4"].var() / 1.5
    ratio = np.mean(spread["sepp"] ** 2) / spread["lpp"].var(ddof=1)
    assert 0.6 < ratio < 1.6, ratio


def test_exact_trace_se_is_zero_and_one_probe_is_nan(spread):
    r = spread["exact_solve"]
    assert float(r.log_prob_se) == 0.0
    assert abs(float(r.log_prob) - spread["exact"]) < 2e-4
    assert np.isnan(float(spread["one_probe"].log_prob_se))
    assert np.isfinite(float(spread["one_probe"].log_prob))


def test_probes_for_precision():
    # the trained 28x28 figure: 0.045 bits/dim with 4 probes -> 81 probes for 0.01
    assert probes_for_precision(0.045, 0.01, num_probes=4) == 81
    assert probes_for_precision(0.10, 0.01) == 100
    assert probes_for_precision(0.005, 0.01) == 1
    for bad in (
        dict(standard_error=float("nan"), target=0.01),
        dict(standard_error=0.1, target=0.0),
    ):
        with pytest.raises(ValueError, match="standard_error|target"):
            probes_for_precision(**bad)
    with pytest.raises(ValueError, match="num_probes"):
        probes_for_precision(0.1, 0.01, num_probes=0)


def test_bits_per_dim_with_stats_against_oracle():
    gm = dj.GaussianMixture(
        np.array([0.5, 0.5]),
        np.array([[-1.0, 0.5], [1.0, -0.5]]),
        np.array([[0.5, 0.4], [0.3, 0.6]]),
    )
    u = dj.velocity_field(gm.model("velocity", PATH), "velocity", PATH)
    levels, lo, hi = 17, -4.0, 4.0
    k = jnp.array([7, 10])
    noise = jnp.array([[0.25, 0.75], [0.5, 0.1]])
    r = bits_per_dim_with_stats(
        u, PATH, k, num_levels=levels, data_range=(lo, hi), num_dequant=2, dequant_noise=noise
    )
    xs = lo + (hi - lo) * (k + noise) / levels
    logp = np.asarray(jax.vmap(gm.log_prob)(xs))
    oracle = np.mean(-(logp + 2 * math.log((hi - lo) / levels)) / (2 * math.log(2.0)))
    assert abs(float(r.bits_per_dim) - oracle) < 2e-4
    assert int(r.status) == 0 and float(r.standard_error) == 0.0
    # a failed solve is a status and NaN, not an exception (negative control for the status path; the same
    # program: a NaN in the dequantisation noise makes x NaN)
    bad = bits_per_dim_with_stats(
        u,
        PATH,
        k,
        num_levels=levels,
        data_range=(lo, hi),
        num_dequant=2,
        dequant_noise=noise.at[1, 0].set(jnp.nan),
    )
    assert int(bad.status) == solve.NONFINITE_INPUT and np.isnan(float(bad.bits_per_dim))
    assert "NaN/inf" in dict(bad.messages)[solve.NONFINITE_INPUT]


def _temp_bytes(trace, d):
    f = lambda z: jnp.tanh(z + 0.5 * jnp.roll(z, 1))  # noqa: E731
    fn = jax.jit(lambda z: trace(f, z)[1])
    compiled = fn.lower(jax.ShapeDtypeStruct((d,), jnp.float32)).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    return analysis.temp_size_in_bytes, fn


def test_exact_trace_memory_is_bounded_and_exact():
    """D = 4096 (a 64×64 image): the chunked exact trace needs O(max(D, budget)) floats, not the D² = 16.8M of
    an identity; its value is the closed form Σ sech²(z_i) (the roll only adds off-diagonal entries)."""
    d = 4096
    bound = 4 * 4 * (EXACT_TRACE_BUDGET + 16 * d)  # float32 bytes, with 4x slack for XLA's buffers
    temp, fn = _temp_bytes(ExactTrace(), d)
    assert temp < bound, (temp, bound)
    # negative control: all D columns at once (chunk_size = D) holds the D x D identity
    temp_all, _ = _temp_bytes(ExactTrace(chunk_size=d), d)
    assert temp_all > 4 * d * d // 2 > bound
    z = jax.random.normal(jax.random.key(1), (d,))
    expected = np.sum(1.0 / np.cosh(np.asarray(z + 0.5 * jnp.roll(z, 1), np.float64)) ** 2)
    np.testing.assert_allclose(float(fn(z)), expected, rtol=1e-5)
