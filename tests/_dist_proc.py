"""Helper process for tests/test_distributed.py (not collected by pytest: the name does not start with ``test_``).

Trains a tiny MLP with flow matching on 2-D data (t = 0 noise, t = 1 data), 4 steps of a global batch of 16,
with ``diffjax.train.fit`` in several layouts, and writes the results to ``--out`` (process 0 only):
``<name>.npz`` (every leaf of the final state, gathered to the host) and ``result.json`` (histories, shardings,
checks).

* ``single`` (one process; run it with ``--xla_force_host_platform_device_count=4``):
  ``auto`` (``make_mesh()``, replicated), ``explicit`` (``jax.make_mesh``, Explicit axes, replicated),
  ``fsdp`` (Explicit mesh, ``fsdp_axis="data"``, workdir), the layout of a direct restore of its last
  checkpoint into FSDP shardings, and ``batch_loss`` (plain, stratified, class-conditional) under an Explicit
  mesh against no mesh.
* ``multi`` (one of 2 processes, each with 2 forced CPU devices; ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` set): ``auto`` with batch_fn giving the GLOBAL batch, ``fsdp``
  (Explicit mesh, FSDP, batch_fn giving the process's SHARE of rows [8i, 8i + 8), a workdir),
  ``fsdp_resumed`` (step 4 deleted, resumed from step 2 at K = 2 steps per dispatch); and that a second
  ``initialize_distributed`` call returns True without raising.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffjax import distributed  # noqa: E402

if __name__ == "__main__" and "multi" in sys.argv:
    # first of all, before any other JAX call (the library's contract)
    import jax  # noqa: E402

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert distributed.initialize_distributed() is True

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from diffjax import checkpoint, conditioning, data, losses, nn, train  # noqa: E402

STEPS, BATCH = 4, 16
BATCHES = np.asarray(data.toy_sample("moons", jax.random.key(1), STEPS * BATCH)).reshape(
    STEPS, BATCH, 2
)
CONFIG = train.TrainConfig(warmup_steps=1, total_steps=STEPS, batch_size=BATCH, ema_decay=0.9)


def model():
    return nn.split(nn.MLP(2, hidden=16, depth=2, time_dim=8, rngs=nnx.Rngs(0)))


def fit(mesh, *, fsdp=None, workdir=None, batch_fn=None, k=1):
    apply, params = model()
    return train.fit(
        apply,
        params,
        losses.flow_matching(),
        batch_fn or (lambda s: BATCHES[s]),
        CONFIG,
        mesh=mesh,
        fsdp_axis=fsdp,
        workdir=workdir,
        checkpoint_every=2,
        log_every=1,
        progress=False,
        steps_per_dispatch=k,
    )


def gathered(tree):
    """Every leaf as a host array (an all-gather across processes where a leaf is not fully addressable)."""
    if jax.process_count() == 1:
        return [np.asarray(x) for x in jax.tree.leaves(tree)]
    return [
        np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(tree)
    ]


def specs(tree):
    return [str(x.sharding.spec) for x in jax.tree.leaves(tree)]


def drop_last(workdir):
    """Delete the last checkpoint (step 4) so that the next fit resumes from step 2."""
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(workdir, str(STEPS)))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("drop_last")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["single", "multi"])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    explicit = jax.make_mesh((jax.device_count(),), ("data",))
    result = {
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "axis_types": [str(t) for t in explicit.axis_types],
    }
    states = {}

    def record(name, state, history):
        states[name] = gathered(state)
        result[name] = {
            "history": history,
            "param_specs": specs(state.params),
            "mu_specs": specs(state.opt_state),
            "ema_specs": specs(state.ema_params),
        }

    if args.mode == "single":
        record("auto", *fit(train.make_mesh()))
        record("explicit", *fit(explicit))
        work = os.path.join(args.out, "fsdp")
        record("fsdp", *fit(explicit, fsdp="data", workdir=work))
        # a direct restore of step 2 lands in the FSDP layout it is asked for
        apply, params = model()
        optimizer = train.make_optimizer(CONFIG)
        shapes = jax.eval_shape(
            lambda: train.init_state(params, optimizer, jax.random.key(CONFIG.seed))
        )
        shardings = train.state_sharding(shapes, explicit, "data")
        abstract = jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
        )
        restored = checkpoint.restore_latest(work, abstract, CONFIG.to_dict())
        result["restored_step"] = restored.step
        result["restored_param_specs"] = specs(restored.state.params)
        result["restored_mu_specs"] = specs(restored.state.opt_state)
        # batch_loss itself under an Explicit mesh (jit, batch split over "data") = without a mesh
        xs = BATCHES[0]
        objective = losses.flow_matching()

        def loss(p, x, stratified):
            return losses.batch_loss(
                objective,
                lambda t, y: apply(p, t, y),
                x,
                jax.random.key(3),
                stratified=stratified,
            )

        for stratified in (False, True):
            plain = float(jax.jit(loss, static_argnums=2)(params, xs, stratified))
            sharded_xs = jax.device_put(
                xs, jax.sharding.NamedSharding(explicit, jax.sharding.PartitionSpec("data"))
            )
            with jax.set_mesh(explicit):
                on_mesh = float(jax.jit(loss, static_argnums=2)(params, sharded_xs, stratified))
            result[f"batch_loss_stratified={stratified}"] = [plain, on_mesh]
        # a class-conditional model (its label lookup is a gather) with condition dropout, jitted on arrays of the
        # Explicit mesh without `jax.set_mesh`
        capply, cparams = nn.split(
            nn.MLP(2, hidden=16, depth=2, time_dim=8, num_classes=3, rngs=nnx.Rngs(0))
        )
        dropout = conditioning.ClassDropout(3, 0.3)

        @jax.jit
        def closs(p, batch):
            fn = lambda t, y, c: capply(p, t, y, c)  # noqa: E731
            return losses.conditional_batch_loss(
                objective, fn, batch, jax.random.key(4), dropout=dropout
            )

        labels = np.arange(BATCH) % 3
        rows = jax.sharding.NamedSharding(explicit, jax.sharding.PartitionSpec("data"))
        on_mesh = closs(
            jax.device_put(
                cparams, jax.sharding.NamedSharding(explicit, jax.sharding.PartitionSpec())
            ),
            (jax.device_put(xs, rows), jax.device_put(labels, rows)),
        )
        result["conditional_loss"] = [float(closs(cparams, (xs, labels))), float(on_mesh)]
    else:
        result["second_initialize"] = distributed.initialize_distributed()
        record("auto", *fit(train.make_mesh()))
        i, n = jax.process_index(), jax.process_count()
        share = BATCH // n
        work = os.path.join(args.out, "fsdp")
        local = lambda s: BATCHES[s][i * share : (i + 1) * share]  # noqa: E731
        record("fsdp", *fit(explicit, fsdp="data", workdir=work, batch_fn=local))
        drop_last(work)
        record("fsdp_resumed", *fit(explicit, fsdp="data", workdir=work, batch_fn=local, k=2))
        # a share of the wrong size is refused with the layout in the message
        try:
            train.shard_batch(jnp.zeros((3, 2)), explicit, global_batch_size=BATCH)
            result["bad_share"] = None
        except ValueError as e:
            result["bad_share"] = str(e)
    if jax.process_index() == 0:
        for name, leaves in states.items():
            np.savez(os.path.join(args.out, f"{name}.npz"), *leaves)
        with open(os.path.join(args.out, "result.json"), "w") as f:
            json.dump(result, f)
    print("done", flush=True)


if __name__ == "__main__":
    main()
