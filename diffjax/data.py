"""Data sets for experiments: 2-D toy distributions generated in code and scikit-learn's 8×8 digits.

Time convention (used everywhere in diffjax): t = 0 is noise, t = 1 is data; the samples here are the data end.

Toy distributions are pure functions ``sample_<name>(key, n) -> (n, 2)`` (jit-able with static ``n``), each scaled
to lie (essentially) within [−4, 4]²; :func:`toy_sample` dispatches by name. ``"mixture"`` is a fixed 3-component
Gaussian mixture with diagonal covariances whose constants (``MIXTURE_WEIGHTS``, ``MIXTURE_MEANS``,
``MIXTURE_VARIANCES``) build the exact oracle ``diffjax.analytic.GaussianMixture``.

Digits: :func:`load_digits` returns integer images with 17 grey levels 0..16; :func:`digits_to_model_space` maps
them to [−1, 1] with optional uniform dequantization, and :func:`dequantization_log_volume` gives the exact
log-Jacobian term for bits/dim. :func:`epoch_batches` makes a deterministic shuffled epoch from a key.

Large data sets: :class:`HostLoader` is ``batch_fn(step)`` for a data set held in host memory. It shuffles
indices, not the array (:func:`epoch_order`: the permutation of :func:`epoch_batches`, n integers), gathers
each batch on the host with NumPy, prepares the next batches in a background thread, and gives process i of P
its contiguous rows [i·B/P, (i+1)·B/P) of every global batch of B rows (the layout ``diffjax.train`` shards).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

__all__ = [
    "TOY_NAMES",
    "MIXTURE_WEIGHTS",
    "MIXTURE_MEANS",
    "MIXTURE_VARIANCES",
    "EIGHT_GAUSSIANS_RADIUS",
    "EIGHT_GAUSSIANS_STD",
    "eight_gaussians_centers",
    "MOONS_NOISE",
    "SPIRALS_NOISE",
    "DIGITS_LEVELS",
    "DIGITS_TEST_SIZE",
    "sample_checkerboard",
    "sample_moons",
    "sample_8gaussians",
    "sample_spirals",
    "sample_mixture",
    "toy_sample",
    "load_digits",
    "load_digits_with_labels",
    "sample_8gaussians_with_labels",
    "DIGITS_CLASSES",
    "digits_to_model_space",
    "model_space_to_digits",
    "dequantization_log_volume",
    "epoch_batches",
    "epoch_order",
    "HostLoader",
]


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be a non-negative Python int (number of samples), got {n!r}")
    return int(n)


def _dtype():
    return jnp.result_type(float)


# ----------------------------------------------------------------------------------------------------------
# 2-D toy distributions
# ----------------------------------------------------------------------------------------------------------


def sample_checkerboard(key: PRNGKeyArray, n: int) -> Float[Array, "n 2"]:
    """Uniform on the "black" squares of a 4×4 checkerboard covering [−4, 4]² (squares of side 2).

    Square (i, j) = (⌊x/2⌋, ⌊y/2⌋) ∈ {−2, −1, 0, 1}² is black iff i + j is even: 8 squares of area 4, so the
    density is 1/32 there and 0 elsewhere. Each marginal is U[−4, 4] (variance 16/3), the mean is 0.
    """
    n = _check_n(n)
    k_cell, k_u = jax.random.split(key)
    cell = jax.random.randint(k_cell, (n,), 0, 8)
    j = cell // 2 - 2  # row in {-2..1}
    i = 2 * (cell % 2) + (j % 2) - 2  # column with i + j even
    u = jax.random.uniform(k_u, (n, 2), _dtype())
    return 2.0 * (jnp.stack([i, j], axis=-1).astype(u.dtype) + u)


MOONS_NOISE = 0.1
"""Standard deviation of the Gaussian noise of ``sample_moons`` (in the original moon coordinates)."""


def sample_moons(key: PRNGKeyArray, n: int) -> Float[Array, "n 2"]:
    """Two interleaving half circles (scikit-learn's ``make_moons``), centred and scaled by 2.

    Upper moon: (cos θ, sin θ); lower moon: (1 − cos θ, ½ − sin θ), θ ~ U[0, π], each point in either moon with
    probability ½, plus N(0, ``MOONS_NOISE``² I) noise; then x ↦ 2·(x − (½, ¼)). Result within about [−3, 3]².
    """
    n = _check_n(n)
    k_moon, k_theta, k_noise = jax.random.split(key, 3)
    dt = _dtype()
    upper = jax.random.bernoulli(k_moon, 0.5, (n,))
    theta = jnp.pi * jax.random.uniform(k_theta, (n,), dt)
    c, s = jnp.cos(theta), jnp.sin(theta)
    x = jnp.where(upper, c, 1.0 - c)
    y = jnp.where(upper, s, 0.5 - s)
    pts = jnp.stack([x, y], axis=-1) + MOONS_NOISE * jax.random.normal(k_noise, (n, 2), dt)
    return 2.0 * (pts - jnp.asarray([0.5, 0.25], dt))


EIGHT_GAUSSIANS_RADIUS = 2.0
"""Radius of the circle carrying the 8 centres of ``sample_8gaussians``."""
EIGHT_GAUSSIANS_STD = 0.25
"""Standard deviation of each of the 8 isotropic components."""


def eight_gaussians_centers(dtype=None) -> Float[Array, "8 2"]:
    """The 8 centres R·(cos(2πk/8), sin(2πk/8)), k = 0..7, with R = ``EIGHT_GAUSSIANS_RADIUS``."""
    dtype = _dtype() if dtype is None else dtype
    ang = 2.0 * jnp.pi * jnp.arange(8, dtype=dtype) / 8
    return EIGHT_GAUSSIANS_RADIUS * jnp.stack([jnp.cos(ang), jnp.sin(ang)], axis=-1)


def eight_gaussians_mixture():
    """The 8-Gaussians data set (:func:`sample_8gaussians`) as a :class:`diffjax.GaussianMixture`: equal weights,
    centres :func:`eight_gaussians_centers`, variance ``EIGHT_GAUSSIANS_STD``² — its exact density, score and
    velocity on any path (t = 0 noise, t = 1 data)."""
    from .analytic import GaussianMixture  # noqa: PLC0415

    return GaussianMixture(
        np.full(8, 1 / 8), np.asarray(eight_gaussians_centers()), np.full(8, EIGHT_GAUSSIANS_STD**2)
    )


def sample_8gaussians(key: PRNGKeyArray, n: int) -> Float[Array, "n 2"]:
    """Equal mixture of 8 Gaussians N(c_k, s² I) with centres c_k on a circle of radius 2 and s = 0.25."""
    return sample_8gaussians_with_labels(key, n)[0]


def sample_8gaussians_with_labels(
    key: PRNGKeyArray, n: int
) -> tuple[Float[Array, "n 2"], Int[Array, " n"]]:
    """(points, labels): the draw of :func:`sample_8gaussians` (the same points for the same key) and the index
    k ∈ 0..7 (int32) of the centre c_k each point was drawn around, its class."""
    n = _check_n(n)
    k_c, k_noise = jax.random.split(key)
    dt = _dtype()
    idx = jax.random.randint(k_c, (n,), 0, 8)
    x = eight_gaussians_centers(dt)[idx] + EIGHT_GAUSSIANS_STD * jax.random.normal(
        k_noise, (n, 2), dt
    )
    return x, idx.astype(jnp.int32)


SPIRALS_NOISE = 0.1
"""Standard deviation of the Gaussian noise of ``sample_spirals`` (after scaling)."""


def sample_spirals(key: PRNGKeyArray, n: int) -> Float[Array, "n 2"]:
    """Two interleaved Archimedean spirals r = (3.5/3π)·θ, θ = 3π√u with u ~ U[0, 1] (uniform along area).

    The second arm is the first rotated by π; each arm with probability ½; plus N(0, ``SPIRALS_NOISE``² I).
    The radius reaches 3.5, so samples lie within about [−3.9, 3.9]².
    """
    n = _check_n(n)
    k_arm, k_u, k_noise = jax.random.split(key, 3)
    dt = _dtype()
    theta = 3.0 * jnp.pi * jnp.sqrt(jax.random.uniform(k_u, (n,), dt))
    r = (3.5 / (3.0 * jnp.pi)) * theta
    sign = jnp.where(jax.random.bernoulli(k_arm, 0.5, (n,)), 1.0, -1.0).astype(dt)
    pts = (sign * r)[:, None] * jnp.stack([jnp.cos(theta), jnp.sin(theta)], axis=-1)
    return pts + SPIRALS_NOISE * jax.random.normal(k_noise, (n, 2), dt)


MIXTURE_WEIGHTS = np.array([0.5, 0.3, 0.2])
"""Component weights π_k of the "mixture" toy (sum to 1)."""
MIXTURE_MEANS = np.array([[-1.5, -0.5], [1.5, -0.5], [0.0, 1.5]])
"""Component means μ_k, shape (3, 2)."""
MIXTURE_VARIANCES = np.array([[0.30, 0.10], [0.15, 0.40], [0.50, 0.05]])
"""Per-dimension component variances s_k², shape (3, 2): component k is N(μ_k, diag(s_k²))."""


def sample_mixture(key: PRNGKeyArray, n: int) -> Float[Array, "n 2"]:
    """Draws from Σ_k π_k N(μ_k, diag(s_k²)) with the constants ``MIXTURE_WEIGHTS``, ``MIXTURE_MEANS`` and
    ``MIXTURE_VARIANCES``; build the exact oracle as ``GaussianMixture(MIXTURE_WEIGHTS, MIXTURE_MEANS,
    MIXTURE_VARIANCES)`` (diffjax.analytic)."""
    n = _check_n(n)
    k_c, k_noise = jax.random.split(key)
    dt = _dtype()
    idx = jax.random.choice(k_c, 3, (n,), p=jnp.asarray(MIXTURE_WEIGHTS, dt))
    means = jnp.asarray(MIXTURE_MEANS, dt)[idx]
    std = jnp.sqrt(jnp.asarray(MIXTURE_VARIANCES, dt))[idx]
    return means + std * jax.random.normal(k_noise, (n, 2), dt)


_TOYS = {
    "checkerboard": sample_checkerboard,
    "moons": sample_moons,
    "8gaussians": sample_8gaussians,
    "spirals": sample_spirals,
    "mixture": sample_mixture,
}
TOY_NAMES: tuple[str, ...] = tuple(_TOYS)
"""Names accepted by :func:`toy_sample`."""


def toy_sample(name: str, key: PRNGKeyArray, n: int) -> Float[Array, "n 2"]:
    """``n`` samples of the 2-D toy distribution ``name`` (one of ``TOY_NAMES``)."""
    try:
        fn = _TOYS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"toy_sample: unknown distribution name={name!r}; valid names are {', '.join(TOY_NAMES)}"
        ) from None
    return fn(key, n)


# ----------------------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------------------

DIGITS_LEVELS = 17
"""scikit-learn's digits have integer grey levels 0..16."""
DIGITS_CLASSES = 10
"""Number of digit classes (0..9) of :func:`load_digits_with_labels`."""
DIGITS_TEST_SIZE = 300
"""Size of the fixed test split; the train split has the remaining 1797 − 300 = 1497 images."""


def load_digits(split: str = "train", seed: int = 0) -> Int[Array, "N 8 8 1"]:
    """scikit-learn's 8×8 handwritten digits (1797 images, bundled with scikit-learn: no download).

    Returns int32 images of shape (N, 8, 8, 1) with values in 0..16 (``DIGITS_LEVELS`` = 17 grey levels).
    The split is fixed given ``seed``: the images are permuted by ``numpy.random.default_rng(seed)``; the first
    300 form ``"test"``, the other 1497 ``"train"`` (disjoint, in permuted order). ``"all"`` returns the 1797
    images in the original order. :func:`load_digits_with_labels` gives the same images with their classes.
    """
    return load_digits_with_labels(split, seed)[0]


def load_digits_with_labels(
    split: str = "train", seed: int = 0
) -> tuple[Int[Array, "N 8 8 1"], Int[Array, " N"]]:
    """(images, labels): the images of :func:`load_digits` (same split, same order) and their digit classes
    0..9 (int32), for class-conditional models (``DIGITS_CLASSES`` = 10)."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"load_digits: split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits as _sk_load

    bunch = _sk_load()
    images = np.asarray(bunch.images)
    labels = np.asarray(bunch.target).astype(np.int32)
    k = np.rint(images).astype(np.int32)
    if not np.array_equal(k, images) or k.min() < 0 or k.max() >= DIGITS_LEVELS:
        raise RuntimeError("load_digits: scikit-learn's digits are not integers in 0..16")
    k = k[..., None]
    if split == "all":
        return jnp.asarray(k), jnp.asarray(labels)
    perm = np.random.default_rng(seed).permutation(k.shape[0])
    idx = perm[:DIGITS_TEST_SIZE] if split == "test" else perm[DIGITS_TEST_SIZE:]
    return jnp.asarray(k[idx]), jnp.asarray(labels[idx])


def dequantization_log_volume(num_levels: int = DIGITS_LEVELS) -> float:
    """log(2/num_levels): the log-width of one quantization bin in model space [−1, 1], per dimension.

    For a density p on model space and a discrete image k with D dimensions, uniform dequantization gives
    log P(k) ≥ E_u[log p(y)] + D·log(2/num_levels) (Theis et al. 2016; Ho et al. 2019). Bits/dim:
    bpd = −(E_u[log p(y)] + D·log(2/num_levels)) / (D·ln 2).
    """
    return math.log(2.0 / num_levels)


def digits_to_model_space(
    k: Int[Array, "*shape"], key: PRNGKeyArray | None = None, num_levels: int = DIGITS_LEVELS
) -> Float[Array, "*shape"]:
    """Map integer levels k ∈ {0..num_levels−1} to [−1, 1]: y = 2·(k + u)/num_levels − 1.

    Level k owns the bin [2k/num_levels − 1, 2(k+1)/num_levels − 1) of width 2/num_levels; the bins tile [−1, 1).
    With ``key``, u ~ U[0, 1) independently per entry (uniform dequantization: y is uniform in k's bin, and the
    exact per-dimension log-Jacobian is ``dequantization_log_volume(num_levels)`` = log(2/num_levels)). Without a key,
    u = ½ (the bin centre). The inverse is :func:`model_space_to_digits`.
    """
    if not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    k = jnp.asarray(k)
    dt = _dtype()
    if key is None:
        u = jnp.asarray(0.5, dt)
    else:
        u = jax.random.uniform(key, k.shape, dt)
    return 2.0 * (k.astype(dt) + u) / num_levels - 1.0


def model_space_to_digits(
    x: Float[Array, "*shape"], num_levels: int = DIGITS_LEVELS
) -> Int[Array, "*shape"]:
    """Map model-space values back to integer levels: the bin containing x, k = clip(⌊(x + 1)·num_levels/2⌋, 0, n−1).

    This is the nearest level centre 2(k + ½)/num_levels − 1, and exactly inverts :func:`digits_to_model_space`
    (with or without dequantization). Values outside [−1, 1] are clipped to the end levels.
    """
    if not isinstance(num_levels, int) or num_levels < 2:
        raise ValueError(f"num_levels must be an integer >= 2, got {num_levels!r}")
    x = jnp.asarray(x)
    k = jnp.floor((x + 1.0) * (num_levels / 2.0))
    return jnp.clip(k, 0, num_levels - 1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------------------


def epoch_batches(data: PyTree[Array], batch_size: int, key: PRNGKeyArray) -> PyTree[Array]:
    """One shuffled epoch: ``data`` permuted by ``jax.random.permutation(key, N)`` and reshaped to
    (num_batches, batch_size, ...), with num_batches = N // batch_size (the remainder is dropped).

    Deterministic given ``key`` (e.g. ``jax.random.fold_in(key, epoch)``), so training resumes exactly. ``data``
    may be an array or a PyTree of arrays sharing the leading axis N (permuted together).
    """
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("epoch_batches: data has no arrays")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"epoch_batches: every array in data needs the same leading axis, got sizes {sizes}"
        )
    (n,) = sizes
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"epoch_batches: batch_size must be a Python int, got {batch_size!r}")
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"epoch_batches: batch_size must be in [1, N={n}] (N = number of examples), got {batch_size}"
        )
    nb = n // batch_size
    perm = jax.random.permutation(key, n)[: nb * batch_size]
    return jax.tree_util.tree_map(
        lambda a: jnp.asarray(a)[perm].reshape((nb, batch_size) + jnp.shape(a)[1:]), data
    )


def epoch_order(key: PRNGKeyArray, n: int) -> np.ndarray:
    """The order of epoch ``key`` over n examples: ``jax.random.permutation(key, n)`` as host int64 indices.

    The same order as :func:`epoch_batches` (and ``diffjax.train.dataset_batch_fn``) uses, computed on the CPU
    backend (n integers; threefry and the sort-based shuffle give the same permutation on every backend).
    """
    n = _check_n(n)
    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # no CPU backend registered: use the default device (same permutation)
        return np.asarray(jax.random.permutation(key, n), np.int64)
    with jax.default_device(cpu):
        return np.asarray(jax.random.permutation(jax.device_put(key, cpu), n), np.int64)


class HostLoader:
    """``loader(step)``: this process's rows of global batch ``step`` of a data set in host memory, prefetched.

    Step s reads batch i = s mod m of epoch e = s div m (m = n // batch_size; the remainder of each epoch is
    dropped), whose rows are ``order[i·B:(i+1)·B]`` with ``order = epoch_order(fold_in(key, e), n)``: a pure
    function of (key, step), so a resumed run sees exactly the batches of an uninterrupted one, and the global
    batch is the one ``diffjax.train.dataset_batch_fn(data, batch_size, key)`` returns for the same step.

    * **Host shuffle**: only the n indices are permuted; each batch is gathered with ``numpy.take`` from the
      host copy of ``data`` (no device copy of the data set, no permuted copy of it).
    * **Prefetch**: after serving step s, a background thread gathers steps s + 1 … s + ``prefetch`` (and the
      next epoch's order), so the host work overlaps the device's step. ``prefetch=0`` turns it off.
    * **Per process**: with ``process_count`` = P processes (default ``jax.process_count()``), process
      ``process_index`` = i gets rows [i·B/P, (i+1)·B/P) of every global batch: the processes' parts are
      disjoint and together are the global batch, the layout ``diffjax.train.shard_batch`` expects.

    ``data`` is an array or a PyTree of arrays sharing the leading axis (e.g. ``(images, labels)``); it is
    converted to NumPy once. Returns a PyTree of NumPy arrays of B/P rows. ``close()`` (or ``with``) stops the
    thread. Time convention elsewhere: t = 0 is noise, t = 1 is data (the examples here are the data end).
    """

    def __init__(
        self,
        data: PyTree,
        batch_size: int,
        key: PRNGKeyArray,
        *,
        process_index: int | None = None,
        process_count: int | None = None,
        prefetch: int = 2,
    ):
        leaves = jax.tree_util.tree_leaves(data)
        if not leaves:
            raise ValueError("HostLoader: data has no arrays")
        self._data = jax.tree_util.tree_map(np.asarray, data)
        sizes = {
            np.shape(leaf)[0] if np.ndim(leaf) else None
            for leaf in jax.tree_util.tree_leaves(self._data)
        }
        if len(sizes) != 1 or None in sizes:
            raise ValueError(
                f"HostLoader: every array in data needs the same leading axis, got sizes {sizes}"
            )
        (n,) = sizes
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise ValueError(f"HostLoader: batch_size must be a Python int, got {batch_size!r}")
        if not 1 <= batch_size <= n:
            raise ValueError(
                f"HostLoader: batch_size must be in [1, N={n}] (N = number of examples), got {batch_size}"
            )
        count = jax.process_count() if process_count is None else process_count
        index = jax.process_index() if process_index is None else process_index
        if not (
            isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count
        ):
            raise ValueError(
                f"HostLoader: need 0 <= process_index < process_count, got process_index={index!r}, "
                f"process_count={count!r}"
            )
        if batch_size % count:
            raise ValueError(
                f"HostLoader: the global batch_size={batch_size} must be a multiple of process_count={count} "
                "(each process takes batch_size / process_count contiguous rows)"
            )
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"HostLoader: prefetch must be an int >= 0, got {prefetch!r}")
        self.n, self.batch_size, self.key = int(n), int(batch_size), key
        self.process_index, self.process_count, self.prefetch = index, count, prefetch
        self.batches_per_epoch = self.n // self.batch_size
        share = self.batch_size // count
        self._rows = slice(index * share, (index + 1) * share)
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._pending: dict[int, Future] = {}
        self._pool = ThreadPoolExecutor(max_workers=1) if prefetch else None

    def order(self, epoch: int) -> np.ndarray:
        """The global order of ``epoch`` (cached for the current and next epoch)."""
        with self._lock:
            got = self._orders.get(epoch)
        if got is None:
            got = epoch_order(jax.random.fold_in(self.key, epoch), self.n)
            with self._lock:
                self._orders[epoch] = got
                for e in [e for e in self._orders if e < epoch - 1 or e > epoch + 1]:
                    del self._orders[e]
        return got

    def indices(self, step: int) -> np.ndarray:
        """This process's example indices for ``step``."""
        epoch, i = divmod(int(step), self.batches_per_epoch)
        rows = self.order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return rows[self._rows]

    def _gather(self, step):
        idx = self.indices(step)
        return jax.tree_util.tree_map(lambda a: np.take(a, idx, axis=0), self._data)

    def __call__(self, step: int) -> PyTree:
        step = int(step)
        if step < 0:
            raise ValueError(f"HostLoader: step must be >= 0, got {step}")
        if self._pool is None:
            return self._gather(step)
        future = self._pending.pop(step, None)
        batch = future.result() if future is not None else self._gather(step)
        for s in [s for s in self._pending if not step < s <= step + self.prefetch]:
            self._pending.pop(s).cancel()
        for s in range(step + 1, step + self.prefetch + 1):
            if s not in self._pending:
                self._pending[s] = self._pool.submit(self._gather, s)
        return batch

    def close(self):
        """Stop the prefetch thread (pending batches are dropped)."""
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
