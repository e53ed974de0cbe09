"""Tests for diffjax.data: toy 2-D distributions, digits, dequantization and epoch batching.

Statistical checks use facts about each distribution computed independently in numpy (square parity, circle radii,
nearest centres, mixture moments), with tolerances of several standard errors.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import data

N = 20000


@pytest.fixture(scope="module")
def samples():
    key = jax.random.key(0)
    return {name: np.asarray(data.toy_sample(name, key, N)) for name in data.TOY_NAMES}


def test_all_exported():
    for name in data.__all__:
        assert hasattr(data, name)
    assert set(data.TOY_NAMES) == {"checkerboard", "moons", "8gaussians", "spirals", "mixture"}


@pytest.mark.parametrize("name", ["checkerboard", "moons", "8gaussians", "spirals", "mixture"])
def test_toy_shape_determinism_range_and_jit(name):
    key = jax.random.key(1)
    a = data.toy_sample(name, key, 500)
    assert a.shape == (500, 2) and jnp.issubdtype(a.dtype, jnp.floating)
    assert np.all(np.isfinite(np.asarray(a)))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(data.toy_sample(name, key, 500)))
    b = data.toy_sample(name, jax.random.key(2), 500)
    assert not np.allclose(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a)).max() < 4.5
    fn = getattr(data, f"sample_{name}")
    jitted = jax.jit(fn, static_argnums=1)(key, 500)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(a), rtol=1e-6, atol=1e-6)
    assert data.toy_sample(name, key, 0).shape == (0, 2)


def test_toy_bad_input():
    with pytest.raises(ValueError, match="checkerboard"):
        data.toy_sample("swissroll", jax.random.key(0), 10)
    with pytest.raises(ValueError, match="n must"):
        data.toy_sample("moons", jax.random.key(0), -1)
    with pytest.raises(ValueError, match="n must"):
        data.sample_moons(jax.random.key(0), 10.0)


def test_checkerboard_black_squares_only_and_balanced(samples):
    x = samples["checkerboard"]
    i, j = np.floor(x[:, 0] / 2), np.floor(x[:, 1] / 2)
    assert np.all((i + j) % 2 == 0)
    assert x.min() >= -4 and x.max() <= 4
    # 8 black squares, each with probability 1/8
    cells, counts = np.unique(np.stack([i, j], 1), axis=0, return_counts=True)
    assert len(cells) == 8
    se = math.sqrt(N * (1 / 8) * (7 / 8))
    assert np.all(np.abs(counts - N / 8) < 5 * se)
    # uniform within a square: the fractional position has mean 1/2 and variance 1/12
    frac = x / 2 - np.floor(x / 2)
    np.testing.assert_allclose(frac.mean(0), 0.5, atol=5 * math.sqrt(1 / 12 / N))
    np.testing.assert_allclose(frac.var(0), 1 / 12, atol=0.005)
    # negative control: Gaussian points violate the parity rule
    g = np.asarray(jax.random.normal(jax.random.key(9), (1000, 2))) * 2
    assert np.mean((np.floor(g[:, 0] / 2) + np.floor(g[:, 1] / 2)) % 2 == 0) < 0.7


def _moon_residuals(x):
    p = x / 2 + np.array([0.5, 0.25])  # back to make_moons coordinates
    r_upper = np.linalg.norm(p, axis=1) - 1.0
    r_lower = np.linalg.norm(p - np.array([1.0, 0.5]), axis=1) - 1.0
    return p, r_upper, r_lower


def test_moons_lie_on_two_half_circles(samples):
    p, r_upper, r_lower = _moon_residuals(samples["moons"])
    near = np.minimum(np.abs(r_upper), np.abs(r_lower))
    assert near.max() < 6 * data.MOONS_NOISE
    # each moon takes half the points (assignment by the nearer circle; ambiguous only where they cross)
    upper = np.abs(r_upper) < np.abs(r_lower)
    assert abs(upper.mean() - 0.5) < 0.03
    # away from the crossings, the upper moon is the upper half circle (y ≥ 0 up to noise) and the lower
    # moon the lower half circle (y ≤ 0.5 up to noise)
    clear_upper = upper & (np.abs(r_lower) > 4 * data.MOONS_NOISE)
    clear_lower = ~upper & (np.abs(r_upper) > 4 * data.MOONS_NOISE)
    assert clear_upper.sum() > N / 4 and clear_lower.sum() > N / 4
    assert np.all(p[clear_upper, 1] > -5 * data.MOONS_NOISE)
    assert np.all(p[clear_lower, 1] < 0.5 + 5 * data.MOONS_NOISE)
    assert np.mean(near < 3 * data.MOONS_NOISE) > 0.99
    # negative control: checkerboard points are mostly not on the moons
    _, ru, rl = _moon_residuals(samples["checkerboard"])
    assert np.mean(np.minimum(np.abs(ru), np.abs(rl)) < 3 * data.MOONS_NOISE) < 0.8


def test_8gaussians_balanced_assignment(samples):
    x = samples["8gaussians"]
    ang = 2 * np.pi * np.arange(8) / 8
    centers = 2.0 * np.stack([np.cos(ang), np.sin(ang)], 1)
    np.testing.assert_allclose(np.asarray(data.eight_gaussians_centers()), centers, atol=1e-6)
    d = np.linalg.norm(x[:, None, :] - centers[None], axis=-1)
    idx = d.argmin(1)
    counts = np.bincount(idx, minlength=8)
    se = math.sqrt(N * (1 / 8) * (7 / 8))
    assert np.all(np.abs(counts - N / 8) < 5 * se)
    resid = x - centers[idx]
    np.testing.assert_allclose(resid.std(0), data.EIGHT_GAUSSIANS_STD, rtol=0.05)
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.05)


def test_spirals_radius_distribution_and_symmetry(samples):
    x = samples["spirals"]
    # without noise r = 3.5·sqrt(u): r² ~ U[0, 12.25]; noise adds 2σ² to E r²
    r2 = np.sum(x**2, axis=1)
    expected = 12.25 / 2 + 2 * data.SPIRALS_NOISE**2
    se = math.sqrt(12.25**2 / 12 / N)
    assert abs(r2.mean() - expected) < 5 * se + 0.02
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.06)  # arms are π-rotations of each other
    # points near the spiral curve: for the noiseless point, r = (3.5/3π)·θ with θ the unwrapped angle of the arm
    theta = np.linspace(0, 3 * np.pi, 4000)
    r = (3.5 / (3 * np.pi)) * theta
    arm = np.stack([r * np.cos(theta), r * np.sin(theta)], 1)
    curve = np.concatenate([arm, -arm])
    sub = x[:2000]
    dmin = np.sqrt(((sub[:, None, :] - curve[None]) ** 2).sum(-1)).min(1)
    assert dmin.max() < 6 * data.SPIRALS_NOISE


def test_mixture_moments_match_constants(samples):
    w, mu, var = data.MIXTURE_WEIGHTS, data.MIXTURE_MEANS, data.MIXTURE_VARIANCES
    assert w.shape == (3,) and mu.shape == (3, 2) and var.shape == (3, 2)
    np.testing.assert_allclose(w.sum(), 1.0)
    assert np.all(var > 0)
    mean = (w[:, None] * mu).sum(0)
    second = sum(w[k] * (np.diag(var[k]) + np.outer(mu[k], mu[k])) for k in range(3))
    cov = second - np.outer(mean, mean)
    x = samples["mixture"]
    se_mean = np.sqrt(np.diag(cov) / N)
    assert np.all(np.abs(x.mean(0) - mean) < 5 * se_mean)
    np.testing.assert_allclose(np.cov(x.T), cov, atol=0.05)
    # responsibilities: fraction closest (in Mahalanobis sense) to each component ≈ weights
    logp = -0.5 * (((x[:, None, :] - mu[None]) ** 2) / var[None]).sum(-1) - 0.5 * np.log(var).sum(
        -1
    )
    comp = np.argmax(np.log(w)[None] + logp, axis=1)
    np.testing.assert_allclose(np.bincount(comp, minlength=3) / N, w, atol=0.03)


# ------------------------------------------------------------------------------------------------ digits


def test_load_digits_splits():
    from sklearn.datasets import load_digits as sk_load

    ref = sk_load().images
    train, test = data.load_digits("train"), data.load_digits("test")
    assert train.shape == (1497, 8, 8, 1) and test.shape == (300, 8, 8, 1)
    assert jnp.issubdtype(train.dtype, jnp.integer)
    for a in (train, test):
        assert int(a.min()) == 0 and int(a.max()) == 16
    # train + test is exactly the data set, each image used once (multiset equality, robust to duplicates)
    both = np.concatenate([np.asarray(train), np.asarray(test)]).reshape(-1, 64)
    ref_rows = ref.reshape(-1, 64).astype(np.int64)
    np.testing.assert_array_equal(
        both[np.lexsort(both.T[::-1])], ref_rows[np.lexsort(ref_rows.T[::-1])]
    )
    # deterministic given the seed; another seed gives another split
    np.testing.assert_array_equal(np.asarray(data.load_digits("test")), np.asarray(test))
    assert not np.array_equal(np.asarray(data.load_digits("test", seed=1)), np.asarray(test))
    np.testing.assert_array_equal(np.asarray(data.load_digits("all"))[..., 0], ref)
    with pytest.raises(ValueError, match="split"):
        data.load_digits("valid")


def test_dequantization_bins_and_round_trip():
    n = 17
    k = jax.random.randint(jax.random.key(0), (4000,), 0, n)
    y = data.digits_to_model_space(k, jax.random.key(1), num_levels=n)
    kn, yn = np.asarray(k), np.asarray(y)
    lo, hi = 2 * kn / n - 1, 2 * (kn + 1) / n - 1
    assert np.all(yn >= lo - 1e-6) and np.all(yn < hi + 1e-6)
    assert yn.min() >= -1 and yn.max() <= 1
    np.testing.assert_array_equal(np.asarray(data.model_space_to_digits(y, n)), kn)
    # u = (y + 1)·n/2 − k is U[0, 1)
    u = (yn + 1) * n / 2 - kn
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / len(u))
    assert abs(u.var() - 1 / 12) < 0.006
    # deterministic and keyed
    np.testing.assert_array_equal(
        yn, np.asarray(data.digits_to_model_space(k, jax.random.key(1), num_levels=n))
    )
    # no key: bin centres, exact values
    c = np.asarray(data.digits_to_model_space(jnp.arange(n)))
    np.testing.assert_allclose(c, 2 * (np.arange(n) + 0.5) / n - 1, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(data.model_space_to_digits(c)), np.arange(n))
    np.testing.assert_allclose(c[0], -1 + 1 / n, atol=1e-7)
    # nearest level and clipping
    np.testing.assert_array_equal(
        np.asarray(data.model_space_to_digits(jnp.array([-1.5, -1.0, 1.0, 3.0, 0.0]))),
        [0, 0, 16, 16, 8],
    )
    np.testing.assert_allclose(data.dequantization_log_volume(17), math.log(2 / 17))
    # images keep their shape, and the jitted map agrees
    img = data.load_digits("test")[:4]
    yi = jax.jit(data.digits_to_model_space)(img, jax.random.key(2))
    assert yi.shape == img.shape
    np.testing.assert_array_equal(np.asarray(data.model_space_to_digits(yi)), np.asarray(img))
    with pytest.raises(ValueError, match="num_levels"):
        data.digits_to_model_space(k, num_levels=1)


# ------------------------------------------------------------------------------------------------ batching


def test_epoch_batches_is_a_deterministic_permutation():
    x = jnp.arange(103)
    labels = 10 * jnp.arange(103)
    key = jax.random.key(0)
    b = data.epoch_batches(x, 10, key)
    assert b.shape == (10, 10)
    flat = np.asarray(b).ravel()
    assert len(np.unique(flat)) == 100 and set(flat) <= set(range(103))  # no repeats, 3 dropped
    np.testing.assert_array_equal(np.asarray(data.epoch_batches(x, 10, key)), np.asarray(b))
    assert not np.array_equal(np.asarray(data.epoch_batches(x, 10, jax.random.key(1))), b)
    # PyTrees are permuted together
    bx, by = data.epoch_batches((x, labels), 10, key)
    np.testing.assert_array_equal(np.asarray(by), 10 * np.asarray(bx))
    np.testing.assert_array_equal(np.asarray(bx), np.asarray(b))
    # trailing dimensions are kept
    imgs = data.load_digits("test")
    bi = data.epoch_batches(imgs, 64, key)
    assert bi.shape == (4, 64, 8, 8, 1)
    # under jit with a static batch size
    bj = jax.jit(data.epoch_batches, static_argnums=1)(x, 10, key)
    np.testing.assert_array_equal(np.asarray(bj), np.asarray(b))
    with pytest.raises(ValueError, match="batch_size"):
        data.epoch_batches(x, 0, key)
    with pytest.raises(ValueError, match="batch_size"):
        data.epoch_batches(x, 104, key)
    with pytest.raises(ValueError, match="leading axis"):
        data.epoch_batches((x, labels[:50]), 10, key)


def test_host_loader_epochs_processes_and_determinism():
    """HostLoader: every example at most once per epoch (all but the n mod B dropped), the processes' parts
    disjoint and covering the global batch, a pure function of (key, step), the same global batches as
    epoch_batches (the order of dataset_batch_fn), and prefetching serves out-of-order steps correctly."""
    n, batch, procs = 103, 12, 3
    x = np.arange(n)
    labels = 10 * np.arange(n)
    key = jax.random.key(4)
    loaders = [
        data.HostLoader((x, labels), batch, key, process_index=i, process_count=procs, prefetch=2)
        for i in range(procs)
    ]
    per_epoch = n // batch
    assert loaders[0].batches_per_epoch == per_epoch == 8
    for epoch in range(2):
        seen = []
        for i in range(per_epoch):
            step = epoch * per_epoch + i
            parts = [ld(step) for ld in loaders]
            for px, py in parts:
                assert px.shape == (batch // procs,) and isinstance(px, np.ndarray)
                np.testing.assert_array_equal(py, 10 * px)  # a PyTree's leaves stay aligned
            glob = np.concatenate([p[0] for p in parts])
            # the processes' contiguous parts are the global batch of epoch_batches, in order
            ref = np.asarray(
                data.epoch_batches(jnp.asarray(x), batch, jax.random.fold_in(key, epoch))[i]
            )
            np.testing.assert_array_equal(glob, ref)
            seen.append(glob)
        seen = np.concatenate(seen)
        assert (
            len(np.unique(seen)) == seen.size == per_epoch * batch
        )  # once per epoch, n mod B dropped
    # deterministic, out of order (a resume) and with or without prefetch; a new key gives a new order
    fresh = data.HostLoader(
        (x, labels), batch, key, process_index=1, process_count=procs, prefetch=0
    )
    for step in (13, 2, 14, 0, 15):
        np.testing.assert_array_equal(fresh(step)[0], loaders[1](step)[0])
    other = data.HostLoader(
        x, batch, jax.random.key(5), process_index=0, process_count=1, prefetch=0
    )
    assert not np.array_equal(other(0), np.concatenate([ld(0)[0] for ld in loaders]))
    for ld in loaders:
        ld.close()
    with pytest.raises(ValueError, match="multiple of process_count"):
        data.HostLoader(x, 10, key, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index"):
        data.HostLoader(x, 12, key, process_index=3, process_count=3)
    with pytest.raises(ValueError, match="batch_size"):
        data.HostLoader(x, 104, key)
