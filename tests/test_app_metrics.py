"""Tests of diffjax_app.metrics: closed-form densities, support fractions, cross-entropies, the permutation two-sample
test (its p-value, size and power) and sample_quality, each against an oracle written out here in numpy/scipy.

Time convention (used everywhere in diffjax): t = 0 is noise, t = 1 is data; everything here is at the data end.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import cdist

from diffjax import data as data_lib
from diffjax_app import metrics as M

# ------------------------------------------------------------------------------------------------------------
# Oracles (numpy / scipy, independent of the module)
# ------------------------------------------------------------------------------------------------------------


def _black(x):
    """The checkerboard's black squares: side-2 cells of [−4, 4]², counted from the corner (−4, −4), whose
    column + row index is even (the corner cell [−4, −2)² is black)."""
    c = np.floor((x[:, 0] + 4.0) / 2.0)
    r = np.floor((x[:, 1] + 4.0) / 2.0)
    on = (c >= 0) & (c <= 3) & (r >= 0) & (r <= 3)
    return on & ((c + r) % 2 == 0)


def _white_uniform(rng, n):
    """Uniform draws on the 8 white cells (column + row odd), written out cell by cell."""
    cells = [(c, r) for c in range(4) for r in range(4) if (c + r) % 2 == 1]
    idx = rng.integers(0, 8, n)
    corner = np.array([(-4.0 + 2 * c, -4.0 + 2 * r) for c, r in cells])[idx]
    return corner + 2.0 * rng.random((n, 2))


def _mixture_logpdf(x, weights, means, variances):
    dens = sum(
        w * stats.multivariate_normal(mean=m, cov=np.diag(np.broadcast_to(v, m.shape))).pdf(x)
        for w, m, v in zip(weights, means, variances)
    )
    return np.log(dens)


def _mmd_u(x, y, h):
    """Unbiased MMD² of the RBF kernel of bandwidth h, by the definition (scipy distances)."""
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / (2 * h * h))
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return (
        (kxx.sum() - np.trace(kxx)) / (n * (n - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2 * k(x, y).mean()
    )


def _energy(x, y, eps=0.0):
    """Energy distance (V-statistic); ``eps`` = 1e-12 adds the module's sqrt(d² + 1e-12) on every pair."""
    d = lambda a, b: np.sqrt(cdist(a, b, "sqeuclidean") + eps)
    return 2 * d(x, y).mean() - d(x, x).mean() - d(y, y).mean()


def _oracle_test(z, n, labels, statistic, h):
    """A plain loop over the labellings (row 0: observed). Returns (statistic, p)."""
    rows = []
    for s in labels:
        x, y = z[s == 1], z[s == 0]
        if statistic == "energy":
            rows.append([_energy(x, y, 1e-12)])
        elif statistic == "mmd":
            rows.append([np.mean([_mmd_u(x, y, hh) for hh in h])])  # mmd of the mean kernel
        else:
            rows.append([_mmd_u(x, y, hh) for hh in h])
    rows = np.asarray(rows)
    if statistic == "mmd_agg":
        rows = np.max((rows - rows.mean(0)) / rows.std(0), axis=1)
    else:
        rows = rows[:, 0]
    t = rows[0]
    b = len(rows) - 1
    return t, (1 + np.sum(rows[1:] >= t - 1e-9 * abs(t))) / (1 + b)


def _toy(name, seed, n):
    return np.asarray(data_lib.toy_sample(name, jax.random.key(seed), n))


# ------------------------------------------------------------------------------------------------------------
# Densities, support, cross-entropy
# ------------------------------------------------------------------------------------------------------------


def test_checkerboard_density_and_support_by_hand():
    # every cell centre, points just inside/outside the board, and cell corners' interiors
    centres = np.array([(-3.0 + 2 * c, -3.0 + 2 * r) for c in range(4) for r in range(4)])
    extra = np.array(
        [
            [-3.99, -3.99],
            [3.99, 3.99],
            [-4.01, -3.0],
            [4.5, 0.5],
            [0.01, 0.01],
            [-0.01, 0.01],
            [1.0, 9.0],
        ]
    )
    x = np.concatenate([centres, extra])
    want = _black(x)
    assert want.sum() == 8 + 3  # 8 black centres; (−3.99, −3.99), (3.99, 3.99) and (0.01, 0.01)
    lp = M.true_log_density("checkerboard", x)
    np.testing.assert_array_equal(np.isfinite(lp), want)
    np.testing.assert_allclose(lp[want], -math.log(32.0))
    assert np.all(lp[~want] == -np.inf)
    f = M.support_fraction("checkerboard", x)
    p = want.mean()
    assert f.n == len(x)
    assert f.value == pytest.approx(p)
    assert f.se == pytest.approx(math.sqrt(p * (1 - p) / len(x)))
    # the data themselves are inside; density integrates to 1 over the board (Monte Carlo on a grid)
    assert M.support_fraction("checkerboard", _toy("checkerboard", 0, 4000)).value == 1.0
    g = np.stack(np.meshgrid(np.linspace(-3.99, 3.99, 400), np.linspace(-3.99, 3.99, 400)), -1)
    dens = np.exp(M.true_log_density("checkerboard", g.reshape(-1, 2)))
    assert dens.mean() * 64.0 == pytest.approx(1.0, abs=0.01)


def test_checkerboard_cross_entropy_over_inside_points():
    rng = np.random.default_rng(0)
    x = np.concatenate([_toy("checkerboard", 1, 300), _white_uniform(rng, 100)])
    ce = M.cross_entropy("checkerboard", x)
    assert ce.n == 300 and ce.value == pytest.approx(math.log(32.0)) and ce.se == 0.0
    assert M.support_fraction("checkerboard", x).value == pytest.approx(0.75)


@pytest.mark.parametrize("name", ["mixture", "8gaussians"])
def test_cross_entropy_against_scipy(name):
    if name == "mixture":
        w, mu, var = data_lib.MIXTURE_WEIGHTS, data_lib.MIXTURE_MEANS, data_lib.MIXTURE_VARIANCES
    else:
        ang = 2 * np.pi * np.arange(8) / 8
        w = np.full(8, 1 / 8)
        mu = data_lib.EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(ang), np.sin(ang)], -1)
        var = np.full((8, 2), data_lib.EIGHT_GAUSSIANS_STD**2)
    x = _toy(name, 2, 500).astype(np.float64)
    lp = _mixture_logpdf(x, w, mu, var)
    np.testing.assert_allclose(M.true_log_density(name, x), lp, rtol=1e-10, atol=1e-12)
    ce = M.cross_entropy(name, x)
    assert ce.n == 500
    assert ce.value == pytest.approx(-lp.mean(), rel=1e-10)
    assert ce.se == pytest.approx(lp.std(ddof=1) / math.sqrt(500), rel=1e-8)
    # a too-broad model scores above the data's entropy, by many standard errors
    broad = M.cross_entropy(name, 1.5 * x)
    assert broad.value - ce.value > 5 * math.hypot(broad.se, ce.se)
    # true_nll (moved from diffjax.experiment) is the same mean
    assert M.true_nll(name, x) == pytest.approx(-lp.mean(), rel=1e-5)


def test_unknown_densities_and_names():
    for name in ("moons", "spirals", "digits"):
        assert M.true_log_density(name, np.zeros((3, 2))) is None
        assert M.cross_entropy(name, np.zeros((3, 2))) is None
        assert M.support_fraction(name, np.zeros((3, 2))) is None
    assert M.support_fraction("mixture", np.zeros((3, 2))) is None
    with pytest.raises(ValueError, match="unknown data_name='checkerbord'"):
        M.true_log_density("checkerbord", np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        M.true_log_density("mixture", np.zeros((3, 3)))
    assert M.true_nll("checkerboard", np.zeros((3, 2))) == pytest.approx(math.log(32.0))


# ------------------------------------------------------------------------------------------------------------
# Permutation test
# ------------------------------------------------------------------------------------------------------------


def test_relabellings_are_uniform_subsets():
    s = np.asarray(M._relabellings(jax.random.key(3), 2, 6, 3000, jnp.float32))
    assert s.shape == (3000, 6) and np.all(s.sum(1) == 2)
    codes = [int("".join(str(int(v)) for v in row), 2) for row in s]
    _, counts = np.unique(codes, return_counts=True)
    assert len(counts) == 15  # C(6, 2)
    assert stats.chisquare(counts).pvalue > 1e-3


def _pooled_median(z):
    d2 = np.sort(cdist(z, z, "sqeuclidean").ravel())
    return math.sqrt(d2[(d2.size + 1) // 2 - 1])  # the lower median, the zero diagonal included


@pytest.mark.parametrize("statistic", ["mmd_agg", "mmd", "energy"])
def test_p_value_against_numpy_loop(x64, statistic):
    # a tiny example with the default (pooled-median) bandwidths, the module's relabellings replayed in a loop
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 2))
    y = rng.normal(size=(7, 2)) + np.array([0.8, 0.0])
    key = jax.random.key(7)
    num = 40
    t, p = M.two_sample_test(x, y, key, num, statistic=statistic)
    z = np.concatenate([x, y])
    factors = {"mmd_agg": (1 / 16, 1 / 8, 0.25, 0.5, 1, 2), "mmd": (0.25, 0.5, 1, 2), "energy": ()}
    h = _pooled_median(z) * np.array(factors[statistic])
    s0 = (np.arange(12) < 5).astype(float)
    labels = np.concatenate([s0[None], np.asarray(M._relabellings(key, 5, 12, num, jnp.float64))])
    t_ref, p_ref = _oracle_test(z, 5, labels, statistic, h)
    assert float(t) == pytest.approx(t_ref, rel=1e-9, abs=1e-12)
    assert float(p) == pytest.approx(p_ref, abs=1e-12)
    assert 1 / 41 <= float(p) <= 1


def test_jit_vmap_match_eager_and_checks():
    x, y = _toy("moons", 3, 40), _toy("moons", 4, 30)
    key = jax.random.key(1)
    eager = M.two_sample_test(x, y, key, 49)
    jitted = jax.jit(functools.partial(M.two_sample_test, num_permutations=49))(x, y, key)
    np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-4)  # float32 z-scores
    keys = jnp.stack([key, jax.random.key(2)])
    vmapped = jax.vmap(lambda k: M.two_sample_test(x, y, k, 49))(keys)
    np.testing.assert_allclose(np.asarray(vmapped)[:, 0], np.asarray(eager), rtol=1e-4)
    # points of any shape are flattened
    np.testing.assert_allclose(
        M.two_sample_test(x[..., None], y[..., None], key, 49), eager, rtol=1e-6
    )
    assert float(eager[1]) * 50 == pytest.approx(round(float(eager[1]) * 50))  # p on the grid k/50
    with pytest.raises(ValueError, match="same point shape"):
        M.two_sample_test(x, np.zeros((5, 3)), key)
    with pytest.raises(ValueError, match="num_permutations"):
        M.two_sample_test(x, y, key, 0)
    with pytest.raises(ValueError, match="statistic must be one of"):
        M.two_sample_test(x, y, key, statistic="mmd2")
    with pytest.raises(Exception, match="NaN"):
        jax.block_until_ready(M.two_sample_test(np.where(x > 1, np.nan, x), y, key, 49))


def test_size_under_h0_and_power_against_a_clearly_wrong_model():
    # power() with no corruption: 100 tests of two independent checkerboard samples (n = m = 50) at the level
    # 2/40 = 0.05 exactly; the rejection count must lie in the Binomial(100, 0.05) band
    reps, n = 100, 50
    null = M.BadModel(M.ToyPairs("checkerboard", n), M.Blur(jnp.zeros(2)))
    size = M.power(null, jax.random.key(5), repeats=reps)
    assert size.n == reps
    rejected = round(size.value * reps)
    assert stats.binom.sf(rejected - 1, reps, 0.05) > 1e-3  # not too many rejections
    # the same test against a model with all its mass on the white squares: rejected every time
    wrong = M.BadModel(M.ToyPairs("checkerboard", n), M.OffSupport(1.0))
    est = M.power(wrong, jax.random.key(6), repeats=reps)
    assert est.value == 1.0 and est.se == 0.0
    assert "0.2*sd" in M.Blur(jnp.zeros(2)).describe()
    with pytest.raises(ValueError, match="BadModel"):
        M.power(M.Blur(jnp.zeros(2)), jax.random.key(0))


def test_p_values_are_uniform_under_h0():
    # 40 vmapped tests of independent 8-Gaussian samples (n = m = 30): p uniform on {1/40, ..., 1}
    reps, n = 40, 30
    keys = jax.random.split(jax.random.key(11), reps)
    draw = lambda k, i: data_lib.sample_8gaussians(jax.random.fold_in(k, i), n)
    test = jax.vmap(
        lambda k: M.two_sample_test(draw(k, 0), draw(k, 1), jax.random.fold_in(k, 2), 39)[1]
    )
    p = np.asarray(test(keys))
    assert stats.binom.sf(int(np.sum(p <= 0.05)) - 1, reps, 0.05) > 1e-3
    grid = np.arange(1, 41) / 40
    assert stats.kstest(p, lambda v: np.searchsorted(grid, v + 1e-9) / 40).pvalue > 1e-3


def test_rejects_the_weighting_studys_failure_mode():
    # n = 1000 samples with ~25% of the mass off the squares (written out here): moved to the white squares, or
    # blurred by N(0, 0.5²) per coordinate; the same test keeps data vs data (a positive control)
    n = 1000
    rng = np.random.default_rng(4)
    data, good = _toy("checkerboard", 20, n), _toy("checkerboard", 21, n).copy()
    moved = good.copy()
    off = rng.random(n) < 0.25
    moved[off] = _white_uniform(rng, int(off.sum()))
    blurred = good + 0.5 * rng.normal(size=good.shape)
    key = jax.random.key(3)
    for bad in (moved, blurred):
        frac = _black(bad).mean()
        assert 0.6 < frac < 0.8
        assert M.support_fraction("checkerboard", bad).value == pytest.approx(frac)
        _, p = M.two_sample_test(bad, data, key, 99)
        assert float(p) <= 0.05
    _, p_null = M.two_sample_test(good, data, key, 99)
    assert float(p_null) > 0.05


# ------------------------------------------------------------------------------------------------------------
# sample_quality
# ------------------------------------------------------------------------------------------------------------


def test_sample_quality_checkerboard_keys_and_values():
    rng = np.random.default_rng(5)
    n = 150
    data, ref = _toy("checkerboard", 30, n), _toy("checkerboard", 31, n)
    samples = _toy("checkerboard", 32, n).copy()
    samples[:30] = _white_uniform(rng, 30)  # 20% off the squares
    q = M.sample_quality(
        samples, data, ref, data_name="checkerboard", test_max_n=100, power_repeats=6
    )
    assert q["energy_distance"] == pytest.approx(_energy(samples, data), rel=1e-3, abs=1e-5)
    assert q["energy_distance_floor"] == pytest.approx(_energy(ref, data), rel=1e-3, abs=1e-5)
    med = np.sqrt(np.median(cdist(data, data, "sqeuclidean")))
    np.testing.assert_allclose(q["mmd_bandwidths"], med * np.array([0.25, 0.5, 1, 2]), rtol=1e-4)
    want = np.mean(
        [_mmd_u(samples, data, h) for h in q["mmd_bandwidths"]]
    )  # the mean kernel's MMD²
    assert q["mmd_rbf"] == pytest.approx(want, rel=1e-3, abs=1e-6)
    assert q["support_fraction"] == pytest.approx(0.8)
    assert q["support_fraction_se"] == pytest.approx(math.sqrt(0.8 * 0.2 / n))
    assert q["cross_entropy"] == pytest.approx(math.log(32)) and q["cross_entropy_n"] == 120
    assert q["data_entropy"] == pytest.approx(math.log(32)) and q["data_entropy_n"] == n
    assert q["test_n"] == 100 and q["power_n"] == 100 and q["power_pairs"] == "fresh toy draws"
    assert 0 < q["mmd_p_value"] <= 1 and len(q["mmd_test_bandwidths"]) == 6
    for name in ("blur", "off_support"):
        assert 0 <= q[f"power_vs_{name}"] <= 1 and name in q["power_models"]
    assert q["power_repeats"] == 6 and q["power_alpha"] == 0.05


def test_sample_quality_mixture_and_unnamed_data():
    # the sizes of the checkerboard test above (compiled programs shared where both run in one process)
    n = 150
    data, ref, samples = _toy("mixture", 40, n), _toy("mixture", 41, n), _toy("mixture", 42, n)
    w, mu, var = data_lib.MIXTURE_WEIGHTS, data_lib.MIXTURE_MEANS, data_lib.MIXTURE_VARIANCES
    q = M.sample_quality(samples, data, ref, data_name="mixture", test_max_n=100, power_repeats=6)
    lp_s = _mixture_logpdf(samples.astype(np.float64), w, mu, var)
    lp_d = _mixture_logpdf(data.astype(np.float64), w, mu, var)
    assert q["cross_entropy"] == pytest.approx(-lp_s.mean(), rel=1e-9)
    assert q["cross_entropy_se"] == pytest.approx(lp_s.std(ddof=1) / math.sqrt(n), rel=1e-7)
    assert q["data_entropy"] == pytest.approx(-lp_d.mean(), rel=1e-9)
    assert q["data_entropy_se"] == pytest.approx(lp_d.std(ddof=1) / math.sqrt(n), rel=1e-7)
    assert "support_fraction" not in q and "power_vs_off_support" not in q
    # without a name: no density; the power from disjoint halves of data + reference
    q = M.sample_quality(samples, data, ref, test_max_n=100, power_repeats=6)
    assert "cross_entropy" not in q and q["power_pairs"] == "held-out split" and q["power_n"] == 100
    # image-shaped points (digits): a split of the held-out pool, blurred per pixel
    pool = np.random.default_rng(6).normal(size=(200, 2, 1))
    bad = M.BadModel(M.HeldOutPairs(jnp.asarray(pool), 100), M.Blur(jnp.full(2, 5.0)))
    assert M.power(bad, jax.random.key(0), repeats=6).value == 1.0
    with pytest.raises(ValueError, match="fewer than 2n"):
        M.HeldOutPairs(jnp.asarray(pool), 101)
    with pytest.raises(ValueError, match="NaN"):
        M.sample_quality(np.full((5, 2), np.nan), data)
    with pytest.raises(ValueError, match="unknown data_name"):
        M.sample_quality(samples, data, data_name="board")
