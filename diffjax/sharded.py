"""Sharded evaluation: sampling, log-likelihoods and bits/dim over a batch split across every device and process.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**. Samplers integrate from t0
(noise) to t1 (data), likelihoods from t1 down to t0 (:mod:`diffjax.sampling`, :mod:`diffjax.likelihood`).

Each device solves its own rows: the batch axis is split over a mesh axis with ``jax.shard_map`` and every
device runs a ``jax.vmap`` of the per-example solver on its rows. The adaptive while-loops therefore never
synchronise across devices (``jit(vmap(...))`` of a sharded batch lets GSPMD put an all-reduce into the solver's
loop condition: one cross-device sync per step, and a solver failure that ends in a collective timeout and
aborts the process — issue 15; ``benchmarks/README.md`` "Sharded evaluation" has the collective counts and
timings: on a 2-core CPU with forced devices the speeds were within noise, the gain is expected where a
collective costs a rendezvous, on GPUs and across hosts, and is not yet measured there). ``check_vma`` is
off: the exact trace's JVPs against a constant identity, the adaptive while-loop carry and the Hutchinson/fixed-
step ``cond`` branches mix device-varying and replicated values, which is correct here (nothing is reduced
across devices) but which the varying-manual-axes type check rejects.

Failures never abort or hang: every solve runs with ``throw=False`` and returns its :mod:`diffjax.solve` status;
the statuses are gathered to the host (one ``process_allgather`` when there are several processes, which every
process reaches) and ``throw=True`` (the default) raises :class:`diffjax.solve.SolveError` with the message of
the first failing example on **every** process.

Layout (the same as ``diffjax.train``'s data-parallel batches): the global batch of N rows is split into
contiguous blocks, process p holding rows [p·N/P, (p+1)·N/P) and, within it, each of its devices a contiguous
block. Pass either a global ``jax.Array`` (e.g. from :func:`shard_batch`) or this process's rows as a host array
(one process: the whole batch). Example i (global index) draws its noise / probes from ``fold_in(key, i)``,
whatever the number of devices or processes, so results do not depend on the device count.

Results come back as global arrays sharded over the batch axis (a :class:`~diffjax.LikelihoodResult`,
:class:`~diffjax.SampleResult` or :class:`~diffjax.likelihood.BitsPerDimResult` whose leaves have the global batch
dimension); :func:`gather` brings them to the host as NumPy arrays of the same global shape on every process.

The entry points are ``equinox.filter_jit``-ed with the mesh and options static: a second call with new
parameters or data of the same shapes reuses the compiled program.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxtyping import Array, Float, PRNGKeyArray

from . import solve
from .likelihood import (
    BitsPerDimResult,
    LikelihoodResult,
    bits_per_dim_with_stats,
    log_likelihood_with_stats,
)
from .paths import AbstractPath
from .sampling import SampleResult, sample_ode

__all__ = [
    "BATCH_AXIS",
    "batch_mesh",
    "shard_batch",
    "gather",
    "sharded_log_likelihood",
    "sharded_bits_per_dim",
    "sharded_sample",
]

#: The default name of the mesh axis that the batch is split over.
BATCH_AXIS = "batch"


def batch_mesh(axis_name: str = BATCH_AXIS, devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: every device of every process, ``jax.devices()``), axis ``axis_name``."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("batch_mesh: devices is empty; pass None for every device")
    return Mesh(np.asarray(devices), (axis_name,))


def _check_mesh(mesh, axis_name):
    mesh = batch_mesh(axis_name) if mesh is None else mesh
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"mesh must be a jax.sharding.Mesh (or None for every device), got {type(mesh).__name__}"
        )
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name={axis_name!r} is not an axis of the mesh {tuple(mesh.axis_names)}: pass "
            f"axis_name= one of them, or mesh=diffjax.sharded.batch_mesh({axis_name!r})"
        )
    return mesh


def shard_batch(local, mesh: Mesh | None = None, axis_name: str = BATCH_AXIS) -> Array:
    """The global batch as one ``jax.Array`` split over ``axis_name``, from this process's contiguous rows.

    ``local`` (a host or device array, or a PyTree of them with a common leading axis) holds this process's rows
    [p·N/P, (p+1)·N/P) of the global batch (one process: the whole batch); the global batch has N = P·len(local)
    rows and is split over the mesh axis in contiguous blocks. Uses ``jax.make_array_from_process_local_data``.
    """
    mesh = _check_mesh(mesh, axis_name)
    sharding = NamedSharding(mesh, P(axis_name))
    n_dev = mesh.shape[axis_name]

    def one(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return a  # already a global array
        a = np.asarray(a) if not isinstance(a, jax.Array) else a
        if a.ndim == 0:
            raise ValueError("shard_batch: every array needs a leading batch axis, got a scalar")
        local_devices = len(
            [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        )
        share = max(1, local_devices * n_dev // mesh.devices.size)
        if a.shape[0] % share:
            raise ValueError(
                f"shard_batch: this process's {a.shape[0]} rows do not split evenly over its {share} shard(s) of "
                f"mesh axis {axis_name!r}: pass a multiple of {share} rows per process (pad the batch and drop the "
                "padded rows' results)"
            )
        return jax.make_array_from_process_local_data(sharding, a)

    return jax.tree.map(one, local)


def _as_global(x, mesh, axis_name, name):
    """x as a global array split over ``axis_name`` (checked: the global batch divides the axis size)."""
    if isinstance(x, jax.Array) and (
        not x.is_fully_addressable
        or (isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh)
    ):
        out = x  # already global
    else:
        out = shard_batch(x, mesh, axis_name)
    n_dev = mesh.shape[axis_name]
    if out.ndim == 0 or out.shape[0] % n_dev:
        raise ValueError(
            f"{name} must have a leading batch axis whose global size is a multiple of the {n_dev} devices of mesh "
            f"axis {axis_name!r}, got shape {out.shape}: pad the batch (and drop the padded rows' results)"
        )
    target = NamedSharding(mesh, P(axis_name))
    if not out.sharding.is_equivalent_to(target, out.ndim):
        out = jax.device_put(out, target)
    return out


def gather(tree):
    """Host NumPy copies of a PyTree of global arrays, with the global shapes, the same on every process.

    One process: ``jax.device_get``. Several: ``jax.experimental.multihost_utils.process_allgather(tiled=True)``,
    a collective that every process must call. Non-array leaves (messages, dtype names) pass through.
    """
    arrays, static = eqx.partition(tree, eqx.is_array)
    if jax.process_count() == 1:
        host = jax.device_get(arrays)
    else:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        host = multihost_utils.process_allgather(arrays, tiled=True)
    host = jax.tree.map(np.asarray, host)
    return eqx.combine(host, static)


def _raise(result, throw):
    """On the host and on every process: raise the first failing example's message (SolveError)."""
    if not throw:
        return
    fields = gather((result.status, result.t_fail))
    solve.raise_if_failed(fields[0], dict(result.messages), t_fail=fields[1])


def _options(kwargs, forbidden):
    for name in forbidden:
        if name in kwargs:
            raise ValueError(f"{name}= is set by the sharded entry point; do not pass it")
    try:
        options = tuple(sorted(kwargs.items()))
        hash(options)
    except TypeError as e:
        raise ValueError(
            f"the keyword options must be hashable Python values (they are compiled into the program): {e}"
        ) from None
    return options


def _run(per_example, fields, batch, key, mesh, axis_name):
    """shard_map over ``axis_name`` of a vmap of ``per_example(fields, row, key_i)`` (key_i = fold_in(key, i) for
    the global row index i; None without a key); ``fields`` replicated."""
    dynamic, static = eqx.partition(fields, eqx.is_array)

    def body(dynamic, batch, key):
        fields = eqx.combine(dynamic, static)
        n = jax.tree.leaves(batch)[0].shape[0]
        index = jax.lax.axis_index(axis_name) * n + jnp.arange(n)
        if key is None:
            return jax.vmap(lambda row: per_example(fields, row, None))(batch)
        return jax.vmap(lambda row, i: per_example(fields, row, jax.random.fold_in(key, i)))(
            batch, index
        )

    mapped = jax.shard_map(
        body, mesh=mesh, in_specs=(P(), P(axis_name), P()), out_specs=P(axis_name), check_vma=False
    )
    return mapped(dynamic, batch, key)


@eqx.filter_jit
def _likelihood_program(velocity, path, x, key, mesh, axis_name, options):
    opts = dict(options)

    def one(fields, xi, ki):
        return log_likelihood_with_stats(*fields, xi, key=ki, throw=False, **opts)

    return _run(one, (velocity, path), x, key, mesh, axis_name)


@eqx.filter_jit
def _bpd_program(velocity, path, k, key, mesh, axis_name, options):
    opts = dict(options)

    def one(fields, ki, kk):
        return bits_per_dim_with_stats(*fields, ki, key=kk, **opts)

    return _run(one, (velocity, path), k, key, mesh, axis_name)


@eqx.filter_jit
def _sample_program(velocity, path, index, key, mesh, axis_name, options):
    opts = dict(options)

    def one(fields, _, ki):
        return sample_ode(*fields, ki, throw=False, **opts)

    return _run(one, (velocity, path), index, key, mesh, axis_name)


def sharded_log_likelihood(
    velocity: Callable,
    path: AbstractPath,
    x: Float[Array, " n *shape"],
    *,
    key: PRNGKeyArray | None = None,
    mesh: Mesh | None = None,
    axis_name: str = BATCH_AXIS,
    throw: bool = True,
    **kwargs,
) -> LikelihoodResult:
    """:func:`diffjax.log_likelihood_with_stats` of every row of ``x``, each device solving its own rows.

    log p_{t1}(x) = log p_{t0}(X_{t0}) − ∫_{t0}^{t1} ∇·u_t(X_t) dt per row (t = 0 noise, t = 1 data), solved per
    device with no cross-device communication (module docstring). ``x``: a global array or this process's
    contiguous rows; the global batch must be a multiple of the mesh axis size. Row i's Hutchinson probes come
    from ``fold_in(key, i)``. ``kwargs``: the keyword options of ``log_likelihood_with_stats`` (trace,
    num_probes, rtol, atol, max_steps, num_steps, t0, t1, …) as Python values.

    Returns the :class:`~diffjax.LikelihoodResult` with global arrays (leading axis N, sharded over
    ``axis_name``); :func:`gather` for host copies. With ``throw=True`` (default) a failed solve raises
    :class:`diffjax.solve.SolveError` on every process (first failing row, how many failed); with ``throw=False``
    check ``status`` yourself (``diffjax.solve.raise_if_failed(gather(result))``).
    """
    mesh = _check_mesh(mesh, axis_name)
    options = _options(kwargs, ("throw",))
    x = _as_global(x, mesh, axis_name, "x")
    result = _likelihood_program(velocity, path, x, key, mesh, axis_name, options)
    _raise(result, throw)
    return result


def sharded_bits_per_dim(
    velocity: Callable,
    path: AbstractPath,
    k: Float[Array, " n *shape"],
    *,
    key: PRNGKeyArray,
    mesh: Mesh | None = None,
    axis_name: str = BATCH_AXIS,
    throw: bool = True,
    **kwargs,
) -> BitsPerDimResult:
    """:func:`diffjax.likelihood.bits_per_dim_with_stats` of every row of the integer batch ``k``, sharded.

    Row i uses ``fold_in(key, i)`` for its dequantisation noise and probes. ``kwargs``: n_bits, num_levels,
    data_range, num_dequant and the likelihood's options (trace, num_probes, rtol, …) as Python values. Returns
    per-row bits/dim, their Hutchinson standard error, status and t_fail as global arrays; ``throw`` as in
    :func:`sharded_log_likelihood`. The data set's bits/dim is the mean over rows (t = 0 noise, t = 1 data).
    """
    mesh = _check_mesh(mesh, axis_name)
    if key is None:
        raise ValueError(
            "sharded_bits_per_dim needs key= (dequantisation noise, and the Hutchinson probes)"
        )
    options = _options(kwargs, ("throw", "dequant_noise"))
    k = _as_global(k, mesh, axis_name, "k")
    result = _bpd_program(velocity, path, k, key, mesh, axis_name, options)
    _raise(result, throw)
    return result


def sharded_sample(
    velocity: Callable,
    path: AbstractPath,
    key: PRNGKeyArray,
    num_samples: int,
    *,
    shape: tuple[int, ...],
    mesh: Mesh | None = None,
    axis_name: str = BATCH_AXIS,
    throw: bool = True,
    **kwargs,
) -> SampleResult:
    """``num_samples`` draws of :func:`diffjax.sample_ode` (noise at t = 0 → data at t = 1), split over devices.

    Sample i starts from the prior draw of ``fold_in(key, i)`` (so the samples do not depend on the number of
    devices or processes; ``num_samples`` must be a multiple of the mesh axis size). ``kwargs``: the options of
    ``sample_ode`` (rtol, atol, max_steps, num_steps, solver, log_prob, trace, t0, t1, …) as Python values.
    Returns the :class:`~diffjax.SampleResult` with global arrays (``samples`` of shape (num_samples, *shape));
    ``throw`` as in :func:`sharded_log_likelihood`.
    """
    mesh = _check_mesh(mesh, axis_name)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a Python int >= 1, got {num_samples!r}")
    n_dev = mesh.shape[axis_name]
    if num_samples % n_dev:
        raise ValueError(
            f"num_samples={num_samples} must be a multiple of the {n_dev} devices of mesh axis {axis_name!r}: "
            f"ask for {math.ceil(num_samples / n_dev) * n_dev} and drop the extra samples"
        )
    options = _options({**kwargs, "shape": tuple(shape)}, ("throw", "x0"))
    index = (
        jax.device_put(jnp.arange(num_samples, dtype=jnp.int32), NamedSharding(mesh, P(axis_name)))
        if jax.process_count() == 1
        else shard_batch(
            np.arange(num_samples, dtype=np.int32).reshape(jax.process_count(), -1)[
                jax.process_index()
            ],
            mesh,
            axis_name,
        )
    )
    result = _sample_program(velocity, path, index, key, mesh, axis_name, options)
    _raise(result, throw)
    return result
