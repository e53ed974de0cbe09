"""Training: optimizer, train state, a pure jitted data-parallel train step, and a resumable ``fit`` loop.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε. The
objective (``diffjax.losses``) draws t and ε; this module only minimises its batch mean.

The pieces follow optax's pure ``init``/``update`` style:

* :class:`TrainConfig` — the run's hyper-parameters (immutable; ``to_dict()`` is stored with each checkpoint).
* :func:`make_optimizer` — ``chain(clip_by_global_norm(grad_clip), adamw(schedule))`` with the schedule
  η(s) = linear warm-up from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
  ``final_lr_fraction·learning_rate`` at ``total_steps`` (Loshchilov & Hutter 2017/2019).
* :class:`TrainState` — ONE PyTree ``(params, opt_state, ema_params, step, key)`` that orbax saves as is.
* :func:`make_train_step` — ``train_step(state, batch) -> (state, metrics)``, pure and jitted. The randomness of
  step s is ``fold_in(state.key, s)``, so a run resumed from a checkpoint draws exactly the same t and ε.
  The parameter EMA is θ̄ ← β_n·θ̄ + (1 − β_n)·θ after update n, with the warm-up β_n = min(β, (1 + n)/(10 + n))
  (:func:`ema_decay_at`), so a short run's EMA does not still weigh the initial parameters (a ``tree_map``; not
  ``optax.ema``, which averages updates).
* :func:`make_multi_step` — ``multi_step(state, batches) -> (state, metrics)``: K steps in one dispatch, a
  ``lax.scan`` of the same step over K batches stacked by :func:`stack_batches` (score_sde's ``n_jitted_steps``),
  bit-identical to K single steps. It pays the fixed cost of a dispatch once per K steps: on a loaded 2-core CPU
  (benchmarks/README.md) 1.4-1.7x the steps/s at batch 32, 1.1-1.24x at the demo's batch 256, where the
  arithmetic of the step already dominates.
* :func:`make_mesh`, :func:`shard_batch`, :func:`shard_batches`, :func:`replicate` — data parallelism (below).
* :func:`fit` — the loop: resume from the newest intact checkpoint, train, log, save every N steps and at the end;
  one writer per workdir, a non-finite state is never saved (:class:`NonFiniteStateError`), and SIGINT/SIGTERM
  save the current step and raise :class:`TrainingInterrupted`. ``steps_per_dispatch=K`` runs K steps per
  dispatch with the same results; dispatches end at every log point and checkpoint.

Data parallelism
----------------
``make_mesh()`` builds a 1-D mesh over ``jax.devices()`` with axis ``"data"``. The batch is split along its
first axis over that axis (``NamedSharding(mesh, P("data"))``) and the train state is replicated
(``NamedSharding(mesh, P())``). The jitted step is compiled with these shardings; XLA inserts the all-reduce of
the gradients. The result is the same as on one device up to float summation order (the tests check 8 CPU
devices against 1 to rtol 1e-5). The global batch size must be divisible by the number of devices. A mesh from
``jax.make_mesh`` (Explicit axes, JAX 0.10's default) works as well and gives the same numbers bit for bit: the
step's body runs with the axes as Auto axes (``jax.sharding.auto_axes``), its inputs and outputs keep the mesh's
shardings. ``fit(..., fsdp_axis="data")`` shards parameters, EMA and optimizer state over that axis instead of
replicating them (:func:`state_sharding`, :func:`fsdp_sharding`; same numbers to ~1e-7, checkpoints restore
into the same layout).

Multi-host (several processes, each with its own devices)
---------------------------------------------------------
1. Call :func:`initialize_distributed` first, before any other JAX call. It starts ``jax.distributed`` when the
   environment describes a multi-process job (``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` +
   ``JAX_PROCESS_ID``, SLURM's ``srun``, Open MPI 5/PMIx with ``JAX_COORDINATOR_ADDRESS``, Cloud TPU VMs; see
   :mod:`diffjax.distributed`), is a no-op on one process and may be called again. ``diffjax train`` calls it.
2. ``make_mesh()`` then spans the devices of all hosts (``jax.devices()`` is global, ordered by process).
3. Every process runs the same :func:`fit`. ``batch_fn(s)`` returns either the global batch of B rows (the
   same on every process, e.g. :func:`dataset_batch_fn`; each process keeps its rows) or the process's share:
   process i of P holds the contiguous rows [i·B/P, (i+1)·B/P) of step s's global batch (:func:`process_rows`).
   :func:`shard_batch` assembles the global array with ``jax.make_array_from_process_local_data`` and refuses
   any other number of rows. t and ε are drawn per row of the GLOBAL batch (key r for row r, whatever device
   holds it), so no two devices draw the same noise and the run equals one process on the same global batches
   (tests: 2 processes x 2 devices against 1 x 4, to 1e-6); folding the process or device index into the keys
   would instead tie the trajectory to the topology.
4. Checkpoints: every process calls ``save``/``restore`` (orbax coordinates them; the workdir must be on a
   shared file system); only process 0 writes ``config.json``. A resumed run continues every stream exactly:
   the state is restored into the same shardings, the keys and the data are functions of the step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import threading
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PRNGKeyArray, PyTree

from . import data as data_lib
from .distributed import distributed_kwargs, initialize_distributed

__all__ = [
    "TrainConfig",
    "TrainState",
    "make_optimizer",
    "make_schedule",
    "init_state",
    "ema_decay_at",
    "ema_init_weight",
    "ema_update",
    "make_train_step",
    "make_multi_step",
    "stack_batches",
    "make_mesh",
    "replicate",
    "shard_batch",
    "shard_batches",
    "initialize_distributed",
    "distributed_kwargs",
    "fsdp_sharding",
    "state_sharding",
    "process_rows",
    "dataset_batch_fn",
    "fit",
    "NonFiniteStateError",
    "TrainingInterrupted",
]


# ----------------------------------------------------------------------------------------------------------
# Configuration and optimizer
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a training run (immutable and hashable; safe as a static jit argument).

    Attributes:
        learning_rate: peak learning rate η_max of the schedule.
        warmup_steps: linear warm-up from 0 to η_max over this many steps (0: none).
        total_steps: number of optimizer steps of the run; the cosine decay ends here.
        weight_decay: AdamW decoupled weight decay λ (θ ← θ − η·(adam_update + λθ)).
        grad_clip: clip the global gradient norm to this value before Adam (``inf``: no clipping).
        ema_decay: β, the largest decay of the parameter EMA θ̄ ← β_n·θ̄ + (1 − β_n)·θ, where update n (counted
            from 0) uses β_n = min(β, (1 + n)/(10 + n)) (:func:`ema_decay_at`; 0: θ̄ = θ).
        batch_size: global batch size (over all devices and hosts).
        seed: seed of the training randomness (times t and noise ε of every step) and of the data order.
        b1, b2, eps: Adam's moment decay rates and denominator offset.
        final_lr_fraction: the learning rate at ``total_steps`` as a fraction of η_max.
    """

    learning_rate: float = 1e-3
    warmup_steps: int = 100
    total_steps: int = 10_000
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    batch_size: int = 256
    seed: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    final_lr_fraction: float = 0.0

    def __post_init__(self):
        def bad(name, why):
            raise ValueError(f"TrainConfig: {name}={getattr(self, name)!r} {why}")

        for name in ("warmup_steps", "total_steps", "batch_size", "seed"):
            if not isinstance(getattr(self, name), (int, np.integer)) or isinstance(
                getattr(self, name), bool
            ):
                bad(name, "must be an int")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0")
        if self.total_steps < 1:
            bad("total_steps", "must be >= 1")
        if not 0 <= self.warmup_steps < self.total_steps:
            bad("warmup_steps", f"must satisfy 0 <= warmup_steps < total_steps={self.total_steps}")
        if not self.weight_decay >= 0:
            bad("weight_decay", "must be >= 0")
        if not self.grad_clip > 0:
            bad("grad_clip", "must be > 0 (use float('inf') for no clipping)")
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "must lie in [0, 1)")
        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):
            bad("b1", f"(with b2={self.b2}, eps={self.eps}) needs 0 <= b1, b2 < 1 and eps > 0")
        if not 0 <= self.final_lr_fraction <= 1:
            bad("final_lr_fraction", "must lie in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (stored with every checkpoint; ``grad_clip=inf`` becomes a string)."""
        d = dataclasses.asdict(self)
        return {
            k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in d.items()
        }

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def make_schedule(config: TrainConfig) -> optax.Schedule:
    """η(s): linear warm-up 0 → η_max over ``warmup_steps``, cosine decay to ``final_lr_fraction``·η_max at
    ``total_steps`` (``optax.warmup_cosine_decay_schedule``; its ``decay_steps`` includes the warm-up)."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.total_steps,
        end_value=config.learning_rate * config.final_lr_fraction,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """``optax.chain(clip_by_global_norm(grad_clip), adamw(schedule, b1, b2, eps, weight_decay))``.

    The gradient g is rescaled to g·min(1, c/‖g‖₂) (global norm over all leaves) before Adam; see
    :func:`make_schedule` for η(s).
    """
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(
            make_schedule(config),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
        ),
    )


# ----------------------------------------------------------------------------------------------------------
# State and step
# ----------------------------------------------------------------------------------------------------------


class TrainState(NamedTuple):
    """The whole training state as one PyTree (saved by orbax as is).

    Attributes:
        params: the model parameters θ (any PyTree, e.g. the ``nnx.State`` from ``diffjax.nn.split``).
        opt_state: the optax state.
        ema_params: the EMA θ̄ of the parameters (same structure as ``params``).
        step: int32 scalar, the number of optimizer steps taken.
        key: the run's base PRNG key as raw ``uint32`` key data (``jax.random.key_data``), so that checkpoints
            hold plain arrays; step s uses ``fold_in(wrap_key_data(key), s)``.
    """

    params: PyTree
    opt_state: optax.OptState
    ema_params: PyTree
    step: Array
    key: Array


def _key_data(key) -> Array:
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.dtype != jnp.uint32:
        raise ValueError(
            f"key must be a jax.random.key(...) or a raw uint32 PRNGKey, got dtype {key.dtype}"
        )
    return key


def init_state(
    params: PyTree, optimizer: optax.GradientTransformation, key: PRNGKeyArray
) -> TrainState:
    """A fresh :class:`TrainState`: step 0, EMA = params, ``optimizer.init(params)``.

    The state holds copies of ``params`` and ``key``, so donating it to the train step leaves them usable.
    """
    params = jax.tree.map(jnp.copy, params)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        step=jnp.zeros((), jnp.int32),
        key=jnp.copy(_key_data(key)),
    )


EMA_WARMUP_OFFSET = 10
"""The 10 of the EMA warm-up β_n = min(β, (1 + n)/(10 + n)) (TensorFlow's ``ExponentialMovingAverage``)."""


def ema_decay_at(decay, step, *, warmup: bool = True) -> Array:
    """β_n, the EMA decay of update n (n = ``step``, the number of updates before this one, from 0).

        β_n = min(β, (1 + n)/(10 + n))        (``warmup=True``; β = ``decay``)
        β_n = β                               (``warmup=False``)

    This is the ``num_updates`` warm-up of TensorFlow's ``tf.train.ExponentialMovingAverage`` (also the default
    of flax/t5x-style EMAs). Why it is needed: with a constant β the EMA after N updates is

        θ̄_N = β^N·θ_0 + (1 − β)·Σ_{k=1..N} β^(N−k)·θ_k,

    so the initial (random) parameters θ_0 keep the weight β^N: 0.999^1500 = 0.22 after a 1,500-step run. With
    the warm-up the weight on θ_0 is W(N) = Π_{n=0..N−1} β_n (:func:`ema_init_weight`); while (1 + n)/(10 + n) < β,
    i.e. for n < n* = ⌈(10β − 1)/(1 − β)⌉ (8,990 for β = 0.999), the product telescopes to

        W(N) = 9!·N!/(N + 9)! = Π_{j=1..9} j/(N + j)   (N ≤ n*),

    and beyond it W(N) = W(n*)·β^(N − n*). W(1500) ≈ 9·10⁻²⁴. Early on, 1 − β_n = 9/(10 + n), so the EMA averages
    roughly the last (10 + n)/9 iterates (≈ 170 after 1,500 steps) and reaches its full window 1/(1 − β) only
    after n* updates. Works under jit (``step`` may be a traced int); the result has ``decay``'s float dtype
    (float32 by default).
    """
    decay = jnp.asarray(decay, jnp.result_type(float))
    if not warmup:
        return decay
    n = jnp.asarray(step).astype(decay.dtype)
    return jnp.minimum(decay, (1.0 + n) / (EMA_WARMUP_OFFSET + n))


def ema_init_weight(decay: float, num_updates: int, *, warmup: bool = True) -> float:
    """W(N) = Π_{n=0..N−1} β_n: the weight the EMA puts on the initial parameters θ_0 after N updates.

    The EMA is linear in the iterates, θ̄_N = W(N)·θ_0 + Σ_{k≥1} w_k·θ_k with Σ w = 1; see :func:`ema_decay_at` for
    β_n and the closed form. ``warmup=False`` gives β^N. Computed in float64 on the host.
    """
    if num_updates < 0:
        raise ValueError(f"ema_init_weight: num_updates={num_updates} must be >= 0")
    if not 0 <= decay < 1:
        raise ValueError(f"ema_init_weight: decay={decay} must lie in [0, 1)")
    n = np.arange(num_updates, dtype=np.float64)
    betas = np.full_like(n, decay)
    if warmup:
        betas = np.minimum(betas, (1.0 + n) / (EMA_WARMUP_OFFSET + n))
    return float(np.exp(np.sum(np.log(betas)))) if decay > 0 or num_updates == 0 else 0.0


def ema_update(ema_params: PyTree, params: PyTree, decay, step=None) -> PyTree:
    """θ̄ ← β_n·θ̄ + (1 − β_n)·θ, leaf by leaf, in each leaf's dtype.

    With ``step=None`` β_n = ``decay`` (a constant); with ``step`` = n (the number of updates before this one)
    β_n = min(β, (1 + n)/(10 + n)) with β = ``decay``, the warm-up of :func:`ema_decay_at`.
    """
    if step is not None:
        decay = ema_decay_at(decay, step)
    return jax.tree.map(
        lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params
    )


def _default_batch_loss():
    from . import losses  # noqa: PLC0415 (imported lazily: losses imports nothing from here)

    return losses.batch_loss


def make_train_step(
    apply: Callable,
    objective,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    *,
    schedule: optax.Schedule | None = None,
    mesh: Mesh | None = None,
    loss_fn: Callable | None = None,
    donate: bool = True,
    ema_warmup: bool = True,
    state_sharding: PyTree | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict[str, Array]]]:
    """A jitted pure ``train_step(state, batch) -> (new_state, metrics)``.

    With θ = ``state.params``, s = ``state.step`` and k_s = ``fold_in(state.key, s)``:

        L(θ) = batch_loss(objective, fn_θ, batch, k_s),   fn_θ(t, x_t) = apply(θ, t, x_t)  (per example;
        t = 0 noise, t = 1 data; the objective draws t and ε from k_s and says what fn predicts),
        g = ∇L(θ),  (u, opt_state) = optimizer.update(g, opt_state, θ),  θ ← θ + u,
        θ̄ ← β_s θ̄ + (1 − β_s) θ  with β_s = min(β, (1 + s)/(10 + s)),  s ← s + 1.

    The EMA warm-up β_s is derived from the step counter already in the state (:func:`ema_decay_at`), so the
    state's layout is unchanged and a resumed run continues the same β_s sequence.

    Args:
        apply: ``apply(params, t, x)`` for ONE example (e.g. from ``diffjax.nn.split``).
        objective: a ``diffjax.losses`` objective (e.g. ``losses.flow_matching(path)``).
        optimizer: from :func:`make_optimizer` (or any optax transformation).
        ema_decay: β, the largest decay of the parameter EMA.
        schedule: the learning-rate schedule reported in ``metrics["lr"]`` (NaN if not given).
        mesh: if given, the step is compiled for state replicated (or laid out by ``state_sharding``) and batch
            split over ``mesh``'s ``"data"`` axis (see :func:`replicate`, :func:`shard_batch`); otherwise
            shardings follow the inputs. Axes of either type (``jax.make_mesh``'s default Explicit, or Auto) are
            accepted: the step's body runs with the mesh's axes as Auto axes (``jax.sharding.auto_axes``), its
            inputs and outputs keep ``mesh``'s shardings, and the numbers are those of an Auto mesh.
        loss_fn: ``loss_fn(objective, fn, batch, key) -> scalar``; default ``diffjax.losses.batch_loss``.
        donate: donate the input state's buffers (the old state is unusable after the call).
        ema_warmup: use β_s = min(β, (1 + s)/(10 + s)) (default); False: a constant β_s = β, which leaves the
            weight β^s on the initial parameters (0.22 after 1,500 steps at β = 0.999).
        state_sharding: with ``mesh``, the shardings of the state (a ``NamedSharding`` for all of it, or a
            PyTree of them matching the state, e.g. :func:`state_sharding` with ``fsdp_axis``); default
            replicated. Input and output states have this layout.

    Metrics: ``loss`` (L before the update), ``grad_norm`` (‖g‖₂ before clipping), ``lr`` (η(s)).
    """
    step_fn = _step_fn(
        "make_train_step", apply, objective, optimizer, ema_decay, schedule, loss_fn, ema_warmup
    )
    return _jit_step(step_fn, mesh, donate, PartitionSpec("data"), state_sharding)


def _jit_step(fn, mesh, donate, batch_spec, state_sharding=None):
    """``fn(state, batch)`` jitted with the state donated (if ``donate``) and, with ``mesh``, the state laid out by
    ``state_sharding`` (default replicated) and the batch sharded by ``batch_spec``."""
    kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if mesh is not None:
        rep, data = _replicated(mesh), NamedSharding(mesh, batch_spec)
        state_sh = rep if state_sharding is None else state_sharding
        kwargs.update(in_shardings=(state_sh, data), out_shardings=(state_sh, rep))
        fn = _with_auto_axes(fn, mesh, state_sh)
    return jax.jit(fn, **kwargs)


def _explicit_axes(mesh: Mesh) -> tuple[str, ...]:
    types = getattr(mesh, "axis_types", None) or ()
    return tuple(n for n, t in zip(mesh.axis_names, types, strict=True) if t == AxisType.Explicit)


def _with_auto_axes(fn, mesh: Mesh, state_sh):
    """``fn`` unchanged on an Auto mesh; on a mesh with Explicit axes (``jax.make_mesh``'s default) its body runs
    with those axes turned Auto (``jax.sharding.auto_axes``): the step is a data-parallel program whose layout is
    fixed at its boundary (in/out shardings), and inside it XLA's propagation places the all-reduce exactly as
    on an Auto mesh (same numbers). Per-example code under an Explicit mesh would otherwise need every vmapped
    operand sharded alike (``Mapped away dimension ... should be sharded the same``)."""
    axes = _explicit_axes(mesh)
    if not axes:
        return fn
    state_specs = jax.tree.map(lambda sh: sh.spec, state_sh)

    def wrapped(state, batch):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return jax.sharding.auto_axes(
                fn, axes=axes, out_sharding=(state_specs, PartitionSpec())
            )(state, batch)

    return wrapped


def _step_fn(caller, apply, objective, optimizer, ema_decay, schedule, loss_fn, ema_warmup):
    """The pure, unjitted step of :func:`make_train_step`; :func:`make_multi_step` scans the very same function,
    so one step and K fused steps run the same operations."""
    if not callable(apply):
        raise ValueError(f"{caller}: apply must be callable, got {type(apply).__name__}")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"{caller}: ema_decay must lie in [0, 1), got {ema_decay}")
    batch_loss = _default_batch_loss() if loss_fn is None else loss_fn

    def step_fn(state: TrainState, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)

        def objective_loss(params):
            # fn_θ(t, x, *cond): a conditional apply(params, t, x, c) gets the condition its loss passes
            return batch_loss(objective, lambda t, x, *c: apply(params, t, x, *c), batch, key)

        loss, grads = jax.value_and_grad(objective_loss)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(
            state.ema_params, params, ema_decay_at(ema_decay, state.step, warmup=ema_warmup)
        )
        lr = schedule(state.step) if schedule is not None else jnp.asarray(jnp.nan, loss.dtype)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": jnp.asarray(lr)}
        new_state = TrainState(params, opt_state, ema, state.step + 1, state.key)
        return new_state, metrics

    return step_fn


def make_multi_step(
    apply: Callable,
    objective,
    optimizer: optax.GradientTransformation,
    ema_decay: float,
    *,
    schedule: optax.Schedule | None = None,
    mesh: Mesh | None = None,
    loss_fn: Callable | None = None,
    donate: bool = True,
    ema_warmup: bool = True,
    state_sharding: PyTree | None = None,
) -> Callable[[TrainState, PyTree], tuple[TrainState, dict[str, Array]]]:
    """A jitted ``multi_step(state, batches) -> (new_state, metrics)``: K optimizer steps in ONE dispatch.

    ``batches`` is K per-step batches stacked along a new leading axis (:func:`stack_batches`); ``jax.lax.scan`` runs the
    step of :func:`make_train_step` over it (score_sde's ``n_jitted_steps``), and ``metrics``
    holds each step's ``loss``, ``grad_norm`` and ``lr`` as arrays of length K. Step s of the scan draws its t and
    ε from ``fold_in(key, s)`` exactly as a single step does (t = 0 noise, t = 1 data), so K fused steps give
    the same state and metrics, bit for bit, as K calls of :func:`make_train_step` on the same batches (the tests
    check this on CPU).

    Why: a small model's step on CPU (or a GPU) is a few milliseconds of arithmetic next to a fixed cost per
    dispatch (Python, argument handling of the whole state PyTree, launching the program); K steps per dispatch
    pay that cost once. K is the leading size of ``batches``: each distinct K compiles once (jit's cache).
    The arguments are those of :func:`make_train_step`; with ``mesh`` each batch is split over ``"data"`` along
    its batch axis (axis 1 of ``batches``; :func:`shard_batches`) and the state is replicated.

    Example (a researcher's own loop, K = 16)::

        multi = make_multi_step(apply, objective, optimizer, 0.999, schedule=schedule)
        for s in range(0, total, 16):
            state, m = multi(state, stack_batches([batch_fn(s + i) for i in range(16)]))
    """
    step_fn = _step_fn(
        "make_multi_step", apply, objective, optimizer, ema_decay, schedule, loss_fn, ema_warmup
    )

    def multi_step_fn(state: TrainState, batches):
        return jax.lax.scan(step_fn, state, batches)

    return _jit_step(multi_step_fn, mesh, donate, PartitionSpec(None, "data"), state_sharding)


def stack_batches(batches) -> PyTree:
    """K per-step batches (a sequence of equal-structure PyTrees) stacked along a new leading axis.

    NumPy leaves are stacked on the host (one transfer per dispatch later); if any leaf is a ``jax.Array`` the
    stack is done by ``jnp.stack`` where the arrays already are (no round trip through the host).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("stack_batches: no batches to stack")

    def stack(*xs):
        if any(isinstance(x, jax.Array) for x in xs):
            return jnp.stack(xs)
        return np.stack([np.asarray(x) for x in xs])

    return jax.tree.map(stack, *batches)


# ----------------------------------------------------------------------------------------------------------
# Data parallelism
# ----------------------------------------------------------------------------------------------------------


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all of ``jax.devices()``, all hosts).

    Its axis is Auto. A mesh from ``jax.make_mesh((n,), ("data",))`` (Explicit axes, JAX 0.10's default) works
    in :func:`fit` and the step programs as well and gives the same numbers. ``jax.devices()`` lists the
    devices by process, so process i owns the rows [i·B/P, (i+1)·B/P) of a batch of B rows on P processes.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("make_mesh: devices is empty")
    return Mesh(np.array(devices), ("data",))


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _place(tree: PyTree, sharding) -> PyTree:
    # device_put(..., may_alias=False) still aliases the local shard on a multi-device mesh (jax 0.10), so copy.
    return jax.device_put(jax.tree.map(jnp.copy, tree), sharding)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Copies of the leaves of ``tree`` on every device of ``mesh`` (``NamedSharding(mesh, P())``).

    Always copies (never aliases the input buffers), so donating the result to the train step leaves ``tree``
    usable.
    """
    return _place(tree, _replicated(mesh))


def fsdp_sharding(tree: PyTree, mesh: Mesh, axis: str = "data") -> PyTree:
    """Fully-sharded-data-parallel layout of ``tree`` (arrays or ``jax.ShapeDtypeStruct``) over ``mesh``'s ``axis``.

    Each leaf is split over ``axis`` along its LARGEST dimension divisible by the axis size n (the first such
    one on ties), e.g. a (256, 512) kernel on n = 4 → ``P(None, "data")``; a leaf with no dimension divisible
    by n (a scalar, a bias of 10) is replicated (``P()``). The rule depends only on shapes, so parameters, their
    EMA and Adam's moments (same shapes) get the same layout. Returns a PyTree of ``NamedSharding``.
    """
    if axis not in mesh.axis_names:
        raise ValueError(
            f"fsdp_sharding: axis={axis!r} is not an axis of the mesh (axes {tuple(mesh.axis_names)}); pass one "
            "of them, e.g. fsdp_axis='data'"
        )
    n = int(mesh.shape[axis])

    def one(leaf):
        shape = tuple(np.shape(leaf))
        dims = [d for d, size in enumerate(shape) if size >= n and size % n == 0]
        if n == 1 or not dims:
            return _replicated(mesh)
        d = max(dims, key=lambda d: (shape[d], -d))
        return NamedSharding(
            mesh, PartitionSpec(*[axis if k == d else None for k in range(len(shape))])
        )

    return jax.tree.map(one, tree)


def state_sharding(state: TrainState, mesh: Mesh, fsdp_axis: str | None = None) -> PyTree:
    """The shardings of a :class:`TrainState` (arrays or ``jax.eval_shape`` of one) on ``mesh``.

    ``fsdp_axis=None``: everything replicated (one ``NamedSharding(mesh, P())``, data parallelism). With an axis
    name: params, EMA params and the optimizer state laid out by :func:`fsdp_sharding` over that axis (each
    device holds about 1/n of them; XLA gathers the parameters for the forward pass and reduce-scatters the
    gradients), ``step`` and ``key`` replicated. Pass the result to :func:`make_train_step`'s
    ``state_sharding``; :func:`fit` does this for ``fsdp_axis``.
    """
    rep = _replicated(mesh)
    if fsdp_axis is None:
        return rep
    return TrainState(
        params=fsdp_sharding(state.params, mesh, fsdp_axis),
        opt_state=fsdp_sharding(state.opt_state, mesh, fsdp_axis),
        ema_params=fsdp_sharding(state.ema_params, mesh, fsdp_axis),
        step=rep,
        key=rep,
    )


def shard_batch(batch: PyTree, mesh: Mesh, *, global_batch_size: int | None = None) -> PyTree:
    """Split ``batch`` along its first axis over ``mesh``'s ``"data"`` axis (``NamedSharding(mesh, P("data"))``).

    On one process ``batch`` is the global batch. With P processes, each process passes either

    * the GLOBAL batch (the same B rows on every process, e.g. from :func:`dataset_batch_fn`): the process
      keeps the rows it owns (:func:`process_rows`), or
    * ITS SHARE: the contiguous rows [i·B/P, (i+1)·B/P) of the global batch on process i (B/P rows),

    and the global array is assembled with ``jax.make_array_from_process_local_data``. Which one is told by the
    number of rows when ``global_batch_size`` = B is given (:func:`fit` gives ``config.batch_size``; another
    size is a ``ValueError``); without it the rows are taken as the share. The layout matters: each row's t and
    ε are drawn by its position in the global batch, so a share of other rows trains on another trajectory; a
    share whose rows the mesh does not place on this process is refused. B must be divisible by the number of
    devices.
    """
    return _shard(batch, mesh, PartitionSpec("data"), "shard_batch", global_batch_size)


def shard_batches(batches: PyTree, mesh: Mesh, *, global_batch_size: int | None = None) -> PyTree:
    """:func:`shard_batch` for K stacked batches (:func:`stack_batches`): split along the batch axis, axis 1
    (``P(None, "data")``); the leading steps axis is not split (every device runs all K steps)."""
    return _shard(batches, mesh, PartitionSpec(None, "data"), "shard_batches", global_batch_size)


def process_rows(mesh: Mesh, global_batch_size: int, process_index: int | None = None) -> slice:
    """The rows ``[lo, hi)`` of a global batch of ``global_batch_size`` rows that ``mesh`` places on the devices
    of process ``process_index`` (default: this process) when the batch is split over ``"data"``.

    For :func:`make_mesh` (devices in ``jax.devices()`` order, grouped by process) it is
    ``slice(i·B/P, (i+1)·B/P)``. Raises ``ValueError`` if the process's rows are not one contiguous block.
    """
    i = jax.process_index() if process_index is None else process_index
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    rows = set()
    for device, index in sharding.devices_indices_map((global_batch_size,)).items():
        if device.process_index == i:
            rows.update(range(global_batch_size)[index[0]])
    lo, hi = (min(rows), max(rows) + 1) if rows else (0, 0)
    if len(rows) != hi - lo:
        raise ValueError(
            f"process_rows: the mesh places non-contiguous rows of the batch on process {i}; build the mesh with "
            "the devices in jax.devices() order (diffjax.train.make_mesh or jax.make_mesh)"
        )
    return slice(lo, hi)


def _shard(tree: PyTree, mesh: Mesh, spec: PartitionSpec, caller: str, global_n=None) -> PyTree:
    sharding = NamedSharding(mesh, spec)
    axis = len(spec) - 1  # the axis split over "data"
    n_dev = mesh.devices.size
    n_proc = jax.process_count()
    multi = n_proc > 1
    leaves = jax.tree.leaves(tree)
    sizes = {np.shape(x)[axis] for x in leaves}
    if len(sizes) > 1:
        raise ValueError(
            f"{caller}: the leaves of the batch have different numbers of rows {sorted(sizes)}"
        )
    n_rows = sizes.pop() if sizes else 0
    rows = None
    if multi:
        if global_n is not None and n_rows == global_n:
            rows = process_rows(mesh, global_n)  # the global batch: keep this process's rows
            n = global_n
        elif global_n is not None and n_rows * n_proc != global_n:
            raise ValueError(
                f"{caller}: process {jax.process_index()} of {n_proc} got {n_rows} rows; pass the global batch "
                f"({global_n} rows, the same on every process) or this process's share ({global_n} / {n_proc} "
                f"= {global_n / n_proc:g} rows: rows [i·B/P, (i+1)·B/P) on process i)"
            )
        else:
            n = n_rows * n_proc
            mine = process_rows(mesh, n)
            i = jax.process_index()
            if (mine.start, mine.stop) != (i * n_rows, (i + 1) * n_rows):
                raise ValueError(
                    f"{caller}: the mesh places rows [{mine.start}, {mine.stop}) of the global batch on process "
                    f"{i}, not its share [{i * n_rows}, {(i + 1) * n_rows}); pass the global batch instead "
                    "(or build the mesh with devices in jax.devices() order)"
                )
    else:
        n = n_rows
    if n % n_dev:
        raise ValueError(
            f"{caller}: the global batch size {n} is not divisible by the {n_dev} devices of the "
            "mesh; choose batch_size as a multiple of the device count"
        )

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if multi:
            x = np.asarray(x)
            if rows is not None:
                x = x[(slice(None),) * axis + (rows,)]
            return jax.make_array_from_process_local_data(sharding, x)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, tree)


# ----------------------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------------------


def dataset_batch_fn(data, batch_size: int, key: PRNGKeyArray) -> Callable[[int], np.ndarray]:
    """``batch_fn(step)``: the batch of a finite data set for a given step, a pure function of (key, step).

    With n examples and m = n // batch_size batches per epoch (the remainder is dropped), step s reads batch
    i = s mod m of epoch e = s div m, whose order is ``jax.random.permutation(fold_in(key, e), n)``. A run
    resumed at step s therefore sees exactly the batches of an uninterrupted run. Batch i of epoch e is
    ``diffjax.data.epoch_batches(data, batch_size, fold_in(key, e))[i]``; the current epoch is cached on host. Leaves of ``data`` (a PyTree, e.g. ``(images, labels)``) share the first axis.
    """
    leaves = jax.tree.leaves(data)
    if not leaves:
        raise ValueError("dataset_batch_fn: data is empty")
    n = int(np.shape(leaves[0])[0])
    if any(np.shape(leaf)[0] != n for leaf in leaves):
        raise ValueError("dataset_batch_fn: every leaf of data must have the same first dimension")
    if not 1 <= batch_size <= n:
        raise ValueError(f"dataset_batch_fn: batch_size={batch_size} must lie in [1, n={n}]")
    per_epoch = n // batch_size
    cache: dict[int, Any] = {}

    def batch_fn(step: int):
        epoch, i = divmod(int(step), per_epoch)
        if epoch not in cache:
            cache.clear()
            batches = data_lib.epoch_batches(data, batch_size, jax.random.fold_in(key, epoch))
            cache[epoch] = jax.tree.map(np.asarray, batches)
        return jax.tree.map(lambda b: b[i], cache[epoch])

    return batch_fn


# ----------------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------------


class NonFiniteStateError(FloatingPointError):
    """The training state became non-finite (NaN/inf); nothing non-finite was saved.

    Attributes:
        step: the step at which it was found.
        since: the last step at which the state was checked and finite (it arose in steps ``since + 1 .. step``).
        parts: which parts are non-finite: a subset of ``("params", "EMA params", "optimizer state")``.
        workdir: the run's workdir (None without one).
        last_checkpoint: the newest checkpoint step in the workdir (None if there is none).
    """

    def __init__(self, message, *, step, since, parts, workdir, last_checkpoint):
        super().__init__(message)
        self.step, self.since, self.parts = step, since, tuple(parts)
        self.workdir, self.last_checkpoint = workdir, last_checkpoint


class TrainingInterrupted(Exception):  # noqa: N818 (it is not an error: the run was stopped on request)
    """``fit`` was stopped by SIGINT or SIGTERM after a dispatch (one step, or K with ``steps_per_dispatch``) and
    saved a checkpoint at exactly the step it reached.

    Attributes:
        step: the step at which training stopped (the state's step).
        signal: ``"SIGINT"`` or ``"SIGTERM"``.
        workdir: the run's workdir (None without one).
        saved: whether a checkpoint of ``step`` is in the workdir.
        state: the :class:`TrainState` at ``step``.
        history: the history up to ``step``.
    """

    def __init__(self, message, *, step, signal, workdir, saved, state, history):
        super().__init__(message)
        self.step, self.signal, self.workdir, self.saved = step, signal, workdir, saved
        self.state, self.history = state, history


_PARTS = ("params", "EMA params", "optimizer state")


def _all_finite(tree) -> Array:
    flags = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


@jax.jit
def _finite_parts(state: TrainState) -> Array:
    """``[params finite, EMA params finite, optimizer state finite]``: one small reduction, outside the step."""
    return jnp.stack(
        [_all_finite(state.params), _all_finite(state.ema_params), _all_finite(state.opt_state)]
    )


class _Stop:
    signal: str | None = None


@contextlib.contextmanager
def _stop_on_signals():
    """In the main thread: SIGINT/SIGTERM set ``stop.signal`` instead of interrupting (restored on exit).

    A signal also puts back its own default behaviour, so a second one of the same kind interrupts at once
    (e.g. during a slow save). Signals the process ignores (``SIG_IGN``, e.g. SIGINT of a background job) stay ignored.
    """
    stop = _Stop()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    previous = {}

    def handler(signum, frame):
        stop.signal = signal.Signals(signum).name
        # a second signal of the same kind interrupts at once; the other kind still only asks to stop (a
        # scheduler's SIGTERM after a Ctrl-C must not kill the interrupt's save)
        signal.signal(signum, defaults[signum])

    for sig in defaults:
        old = signal.getsignal(sig)
        if old is not signal.SIG_IGN:
            previous[sig] = signal.SIG_DFL if old is None else old
            signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _restore_run(manager, abstract, run_config, history, window):
    """The restored state (or None) and the history/window of the restored step (fit's resume)."""
    from . import checkpoint as ckpt  # noqa: PLC0415

    # total_steps may grow: a longer run continues from the checkpoint (only the schedule's length changes)
    restored = ckpt.restore_latest(
        manager, abstract, run_config, ignore=("total_steps",), quarantine=True
    )
    if restored is None:
        return None, history, window
    extra = restored.meta.get("extra", {})
    saved = extra.get("history", history)
    # keep only what was logged up to the restored step (the log is the checkpoint's, not later)
    keep_n = sum(1 for s in saved.get("step", []) if s <= restored.step)
    history = {k: list(v)[:keep_n] for k, v in saved.items()}
    # the metrics of the steps after the last log point, so that the next window mean is the uninterrupted one
    saved_window = extra.get("window", {})
    n = len(saved_window.get("loss", []))
    window = [{k: saved_window[k][i] for k in saved_window} for i in range(n)]
    return restored.state, history, window


def fit(
    apply: Callable,
    params: PyTree,
    objective,
    batch_fn: Callable[[int], PyTree],
    config: TrainConfig,
    *,
    workdir: str | os.PathLike | None = None,
    checkpoint_every: int = 1000,
    keep: int | None = 3,
    log_every: int = 100,
    callback: Callable[[int, TrainState, Mapping[str, float]], None] | None = None,
    progress: bool = True,
    mesh: Mesh | None = None,
    loss_fn: Callable | None = None,
    extra_config: Mapping[str, Any] | None = None,
    steps_per_dispatch: int = 1,
    fsdp_axis: str | None = None,
) -> tuple[TrainState, dict[str, list]]:
    """Train ``apply`` from ``params`` on ``objective`` for ``config.total_steps`` steps; resumable.

    Each step s calls ``batch_fn(s)`` for the GLOBAL batch of ``config.batch_size`` = B rows — it must be a
    deterministic function of s (e.g. :func:`dataset_batch_fn`, or ``lambda s: toy_sample(name,
    fold_in(key, s), n)``), so a resumed run sees the same data. The step's t and ε come from
    ``fold_in(key(seed), s)`` (t = 0 noise, t = 1 data), split into one key per row of the global batch.

    Several processes (after :func:`initialize_distributed`): every process runs the same ``fit``, and
    ``batch_fn(s)`` returns on each either the global batch (fit keeps the process's rows) or the process's
    share, the contiguous rows [i·B/P, (i+1)·B/P) of the global batch on process i of P (B/P rows); any other
    number of rows is a ``ValueError`` (:func:`shard_batch`). Row r of the global batch draws its t and ε from
    key r whatever device holds it, so no two devices draw the same noise, and the trajectory is that of one
    process on the same global batches (the tests check 2 processes against 1 to 1e-6). Resuming restores
    the state (orbax, every process) and the streams are functions of the step: a resumed run continues
    every one exactly. The workdir must be on a file system shared by the processes.

    ``mesh``: default :func:`make_mesh` (all devices, axis ``"data"``). A mesh from ``jax.make_mesh`` (Explicit
    axes) or with Auto axes; its ``"data"`` axis splits the batch. ``fsdp_axis`` (e.g. ``"data"``): shard the
    parameters, the EMA and the optimizer state over that mesh axis (:func:`state_sharding`; each leaf on its
    largest dimension divisible by the axis size, else replicated) instead of replicating them: about 1/n of
    the state per device, same numbers up to float summation order; checkpoints restore into the same
    layout. Default None: replicated.

    With ``workdir``: the run holds the workdir's one-writer lock (``diffjax.checkpoint.workdir_lock``; a second
    writer fails at once with ``WorkdirLockedError``); if it holds a checkpoint, training resumes from the newest
    intact one (damaged steps are reported in one ``DamagedCheckpointWarning`` line each and moved to
    ``workdir/damaged/``; its config must equal ``config.to_dict() | extra_config``, else ``ValueError``); a
    checkpoint is saved every ``checkpoint_every`` steps and at the end, keeping the last ``keep``, each with a
    manifest of its files' checksums. Resumed and uninterrupted runs give bit-identical states and histories.
    ``total_steps`` is the one key allowed to differ: a run trained to s steps and resumed with a larger
    ``total_steps`` continues from s, with the warm-up + cosine schedule re-planned over the new total (the
    optimizer state does not depend on it).

    Every ``log_every`` steps the metrics averaged over the window are appended to the history, passed to
    ``callback(step, state, metrics)`` and shown on the tqdm bar (which also shows steps/s and the ETA).

    ``steps_per_dispatch`` = K > 1 runs K optimizer steps per jitted call (:func:`make_multi_step`: a
    ``lax.scan`` over K stacked batches ``batch_fn(s), ..., batch_fn(s + K − 1)``), which pays the fixed cost of
    a dispatch once per K steps: the step rate of small models, dispatch-bound on CPU and GPU. The result is
    bit-identical to K = 1 (same states, histories and checkpoints; a run may be resumed with another K). A
    dispatch never crosses a log point, a checkpoint or ``total_steps``: where K does not reach the next one,
    the remainder runs as dispatches of power-of-two lengths (e.g. K = 16, ``log_every`` = 100: six of 16, one
    of 4), so at most 1 + log2(K) programs are compiled, each when first needed; a K above ``log_every`` or
    ``checkpoint_every`` is in effect capped by them. A signal stops the run at
    the end of the current dispatch (at most K steps later) and saves that step.

    Safety: before every save and at every log point, params, EMA params and optimizer state are checked to be
    finite (one jitted reduction outside the train step); if not, :class:`NonFiniteStateError` is raised and
    nothing is saved (the checkpoints on disk stay as they are). In the main thread, SIGINT (Ctrl-C) and SIGTERM
    stop the loop after the current dispatch (the current step at K = 1), save a checkpoint of exactly that
    step and raise :class:`TrainingInterrupted`; a second signal interrupts at once.

    Returns:
        ``(state, history)``: the final :class:`TrainState` (use ``state.ema_params`` for sampling) and
        ``{"step": [...], "loss": [...], "grad_norm": [...], "lr": [...]}`` (window means; restored from the
        checkpoint on resume, so it covers the whole run).

    Raises:
        NonFiniteStateError: the state became NaN/inf (the message names the steps, the parts, the last
            checkpoint and what to change).
        TrainingInterrupted: SIGINT/SIGTERM (the message says where the checkpoint is and how to resume).
        diffjax.checkpoint.WorkdirLockedError, diffjax.checkpoint.WorkdirError, diffjax.checkpoint.CheckpointError:
            another writer, an unusable workdir, every checkpoint damaged.
    """
    if checkpoint_every < 1 or log_every < 1:
        raise ValueError(
            f"fit: checkpoint_every={checkpoint_every} and log_every={log_every} must be >= 1"
        )
    _check_steps_per_dispatch(steps_per_dispatch)
    with contextlib.ExitStack() as stack:
        manager = None
        state = None
        if workdir is not None:
            from . import checkpoint as ckpt  # noqa: PLC0415 (orbax loads only when a run checkpoints)

            # first of all: a second writer fails at once, before any work
            workdir = stack.enter_context(ckpt.workdir_lock(workdir))
        mesh = make_mesh() if mesh is None else mesh
        optimizer = make_optimizer(config)
        schedule = make_schedule(config)
        run_config = {**config.to_dict(), **dict(extra_config or {})}

        def init():
            return init_state(params, optimizer, jax.random.key(config.seed))

        shapes = jax.eval_shape(init)
        state_sh = state_sharding(shapes, mesh, fsdp_axis)
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            jax.tree.map(lambda _: state_sh, shapes) if fsdp_axis is None else state_sh,
        )
        history: dict[str, list] = {"step": [], "loss": [], "grad_norm": [], "lr": []}
        window: list[dict] = []
        if workdir is not None:
            manager = ckpt.make_manager(workdir, keep=keep)
            stack.callback(manager.close)  # waits for the last save (and writes its manifest) first
            state, history, window = _restore_run(manager, abstract, run_config, history, window)
        if state is None:
            state = _place(init(), state_sh)
        stop = stack.enter_context(_stop_on_signals())
        steps = _Steps(
            (apply, objective, optimizer, config.ema_decay),
            {"schedule": schedule, "mesh": mesh, "loss_fn": loss_fn, "state_sharding": state_sh},
            steps_per_dispatch,
            config.batch_size,
        )
        loop = _Loop(state, history, window, manager, run_config, workdir)
        start, total = int(state.step), config.total_steps
        bar = None
        if progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            bar = stack.enter_context(
                tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.1)
            )
        events = _Events(log_every, checkpoint_every, total, callback, bar)
        done = _train(loop, steps, batch_fn, start, events, stop)
        if done < total:  # stopped by a signal (a signal in the last step lets the run finish)
            raise loop.interrupted(done, stop.signal or "a signal to another process")
        if manager is not None:
            manager.wait_until_finished()  # the last save completes under the handlers, not after them
    return loop.state, loop.history


def _check_steps_per_dispatch(k) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(
            f"fit: steps_per_dispatch={k!r} must be a positive int (the number of optimizer steps run in one "
            "jitted dispatch); pass e.g. steps_per_dispatch=1 (one step per call, the default) or 16"
        )


def _dispatch_length(done: int, total: int, k: int, log_every: int, checkpoint_every: int) -> int:
    """The number of steps of fit's next dispatch after ``done`` steps: K, or the largest power of two that does
    not pass the next log point, checkpoint or ``total``. A remainder r < K so costs at most log2(r) + 1
    dispatches, and the lengths ever compiled are K and the powers of two below it (not every remainder)."""
    boundary = min(
        total,
        (done // log_every + 1) * log_every,
        (done // checkpoint_every + 1) * checkpoint_every,
    )
    n = boundary - done
    return k if n >= k else 1 << (n.bit_length() - 1)


class _Steps:
    """fit's programs: the single step, and the K-step scan (built only for K > 1) that also serves the
    power-of-two remainders before a log point, checkpoint or the end (jit compiles each length once)."""

    def __init__(self, args, kwargs, k, batch_size):
        self.k, self.mesh, self.batch_size = int(k), kwargs["mesh"], batch_size
        self.single = make_train_step(*args, **kwargs)
        self.multi = make_multi_step(*args, **kwargs) if self.k > 1 else None

    def __call__(self, state, batch_fn, start: int, n: int):
        """Run steps ``start .. start + n − 1``; the metrics are scalars (n = 1) or arrays of length n."""
        if n == 1:  # the single-step program itself: K = 1 runs exactly the loop it always ran
            batch = shard_batch(batch_fn(start), self.mesh, global_batch_size=self.batch_size)
            return self.single(state, batch)
        batches = stack_batches(batch_fn(s) for s in range(start, start + n))
        return self.multi(
            state, shard_batches(batches, self.mesh, global_batch_size=self.batch_size)
        )


class _Events(NamedTuple):
    """When fit logs and saves, and whom it tells."""

    log_every: int
    checkpoint_every: int
    total: int
    callback: Callable | None
    bar: Any


def _train(loop: _Loop, steps: _Steps, batch_fn, start: int, ev: _Events, stop: _Stop) -> int:
    """fit's loop from step ``start``: dispatch, log, save, stop on a signal. Returns the steps done (< total
    only when a signal stopped it). Log points and saves fall on dispatch ends (:func:`_dispatch_length`)."""
    done = start
    while done < ev.total:
        n = _dispatch_length(done, ev.total, steps.k, ev.log_every, ev.checkpoint_every)
        loop.state, metrics = steps(loop.state, batch_fn, done, n)
        loop.window.append(metrics)
        done += n
        if done % ev.log_every == 0 or done == ev.total:
            means = loop.log(done)
            if ev.callback is not None:
                ev.callback(done, loop.state, means)
            if ev.bar is not None:
                ev.bar.set_postfix(loss=f"{means['loss']:.4g}", lr=f"{means['lr']:.2e}")
        if ev.bar is not None:
            ev.bar.update(n)
        if done % ev.checkpoint_every == 0 or done == ev.total:
            loop.save(done)
        if _should_stop(stop, done, ev.log_every):
            break
    return done


def _should_stop(stop: _Stop, done: int, sync_every: int) -> bool:
    """Whether to stop after step ``done``. With several processes they must stop at the same step (one
    stopping alone would wait in the save barrier while the others wait in the train step's all-reduce): the
    flag is agreed on by an all-gather every ``sync_every`` steps."""
    if jax.process_count() == 1:
        return stop.signal is not None
    if done % sync_every:
        return False
    from jax.experimental import multihost_utils  # noqa: PLC0415

    flags = multihost_utils.process_allgather(np.asarray(stop.signal is not None))
    return bool(np.any(flags))


class _Loop:
    """The mutable part of :func:`fit`'s loop: state, history, the current log window, saving and checks."""

    def __init__(self, state, history, window, manager, run_config, workdir):
        self.state, self.history, self.window = state, history, window
        self.manager, self.run_config, self.workdir = manager, run_config, workdir
        self.finite_at = int(
            state.step
        )  # a restored state was verified; a fresh one is the caller's

    def check_finite(self, step: int, where: str) -> None:
        if self.finite_at == step:
            return
        flags = np.asarray(_finite_parts(self.state))
        if flags.all():
            self.finite_at = step
            return
        parts = [name for name, ok in zip(_PARTS, flags, strict=True) if not ok]
        last = None
        if self.manager is not None:
            self.manager.wait_until_finished()
            last = max(self.manager.all_steps(), default=None)
        saved = (
            "no workdir, nothing saved"
            if self.manager is None
            else f"not saved; the last checkpoint in {self.workdir} is step "
            f"{'none' if last is None else last}"
        )
        steps = (
            f"step {step}" if step == self.finite_at + 1 else f"steps {self.finite_at + 1}-{step}"
        )
        raise NonFiniteStateError(
            f"training state became non-finite (NaN/inf) {where} {step}: {', '.join(parts)} "
            f"(finite at step {self.finite_at}, so it arose in {steps}); {saved}. Lower the learning rate, "
            "clip gradients (TrainConfig.grad_clip) or check the data for NaN/inf",
            step=step,
            since=self.finite_at,
            parts=parts,
            workdir=self.workdir,
            last_checkpoint=last,
        )

    def values(self, k: str) -> np.ndarray:
        """The window's per-step values of metric ``k`` in float64 (entries are scalars, length-n arrays from a
        fused dispatch, or floats restored from a checkpoint): one transfer per dispatch, at the log point."""
        return np.concatenate([np.asarray(m[k], np.float64).reshape(-1) for m in self.window])

    def log(self, done: int) -> dict[str, float]:
        means = {k: float(np.mean(self.values(k))) for k in self.window[0]}
        self.check_finite(done, "at the log point of step")
        self.window = []
        self.history["step"].append(done)
        for k in ("loss", "grad_norm", "lr"):
            self.history[k].append(means[k])
        return means

    def save(self, step: int) -> bool:
        if self.manager is None:
            return False
        from . import checkpoint as ckpt  # noqa: PLC0415

        self.check_finite(step, "before saving step")
        # orbax saves asynchronously: hand it snapshots, not the lists the loop keeps appending to
        extra = {
            "history": {k: list(v) for k, v in self.history.items()},
            "window": {
                k: self.values(k).tolist() if self.window else []
                for k in ("loss", "grad_norm", "lr")
            },
        }
        return ckpt.save(self.manager, step, self.state, self.run_config, extra=extra)

    def interrupted(self, step: int, name: str) -> TrainingInterrupted:
        saved = False
        if self.manager is not None:
            self.save(step)
            self.manager.wait_until_finished()
            saved = step in self.manager.all_steps()
        where = (
            f"checkpoint saved in {self.workdir} (resume by running the same command again)"
            if saved
            else "no workdir, nothing was saved"
        )
        return TrainingInterrupted(
            f"interrupted by {name} at step {step}; {where}",
            step=step,
            signal=name,
            workdir=self.workdir,
            saved=saved,
            state=self.state,
            history=self.history,
        )
