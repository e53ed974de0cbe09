"""Helper process for the training tests (not collected by pytest: the name does not start with ``test_``).

Modes:

* ``resume --workdir D --steps N --checkpoint-every K [--sleep S] [--progress FILE]``: runs ``diffjax.train.fit``
  on a tiny MLP with flow matching on 2-D data (t = 0 noise, t = 1 data), resuming from D's latest checkpoint;
  prints JSON ``{"start": first step run, "step": final step}`` and writes the final state's leaves to
  ``D/final.npz``. ``--sleep`` slows every step so that a test can kill or signal the process mid-run;
  ``--progress`` names a file rewritten after every step with the step number. On ``TrainingInterrupted`` it
  prints JSON ``{"interrupted": step, "signal", "saved", "message", "start"}`` and exits with 128 + the signal
  number; on another exception JSON ``{"error": type name, "message", "seconds": time spent inside fit}``, exit 1.
* ``devices --steps N``: trains N steps on a mesh of all devices and on a mesh of one device (run it with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=8``) and prints JSON with both loss trajectories, the
  largest parameter difference and the shardings seen.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax import data, losses, nn, train


def tiny_model():
    model = nn.MLP(2, hidden=16, depth=2, time_dim=8, rngs=nnx.Rngs(0))
    return nn.split(model)


def train_run(workdir, steps, checkpoint_every, callback=None):
    """The run of ``resume`` (also called in-process by the tests for an uninterrupted reference)."""
    apply, params = tiny_model()
    config = train.TrainConfig(
        learning_rate=3e-3, warmup_steps=5, total_steps=steps, batch_size=32, ema_decay=0.9
    )
    xs = data.toy_sample("8gaussians", jax.random.key(1), 512)
    batch_fn = train.dataset_batch_fn(xs, config.batch_size, jax.random.key(2))
    return train.fit(
        apply,
        params,
        losses.flow_matching(),
        batch_fn,
        config,
        workdir=workdir,
        checkpoint_every=checkpoint_every,
        keep=2,
        log_every=1,
        callback=callback,
        progress=False,
    )


def flat_leaves(state) -> dict[str, np.ndarray]:
    """``{key path: array}`` of every leaf of ``state`` (what ``final.npz`` holds)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def resume(args):
    started = []

    def callback(step, state, metrics):
        if not started:
            started.append(step - 1)
        if args.progress:
            tmp = f"{args.progress}.tmp"
            with open(tmp, "w") as f:
                f.write(str(step))
            os.replace(tmp, args.progress)
        if args.sleep:
            time.sleep(args.sleep)

    t0 = time.monotonic()
    try:
        state, history = train_run(args.workdir, args.steps, args.checkpoint_every, callback)
    except train.TrainingInterrupted as e:
        info = {"interrupted": e.step, "signal": e.signal, "saved": e.saved, "message": str(e)}
        print(json.dumps({**info, "start": started[0] if started else None}), flush=True)
        sys.exit(128 + signal.Signals[e.signal].value)
    except Exception as e:  # noqa: BLE001 (reported to the test)
        info = {"error": type(e).__name__, "message": str(e), "seconds": time.monotonic() - t0}
        print(json.dumps(info), flush=True)
        sys.exit(1)
    np.savez(os.path.join(args.workdir, "final.npz"), **flat_leaves(state))
    print(
        json.dumps(
            {
                "start": started[0] if started else int(state.step),
                "step": int(state.step),
                "n_history": len(history["loss"]),
            }
        )
    )


def devices(args):
    apply, params = tiny_model()
    config = train.TrainConfig(learning_rate=3e-3, warmup_steps=5, total_steps=100, batch_size=64)
    optimizer = train.make_optimizer(config)
    objective = losses.flow_matching()
    out = {"n_devices": jax.device_count()}
    finals = {}
    for name, mesh in (("many", train.make_mesh()), ("one", train.make_mesh(jax.devices()[:1]))):
        step = train.make_train_step(
            apply,
            objective,
            optimizer,
            config.ema_decay,
            schedule=train.make_schedule(config),
            mesh=mesh,
        )
        state = train.replicate(train.init_state(params, optimizer, jax.random.key(0)), mesh)
        trajectory = []
        for s in range(args.steps):
            batch = data.toy_sample("moons", jax.random.fold_in(jax.random.key(3), s), 64)
            batch = train.shard_batch(batch, mesh)
            if s == 0:
                out[f"batch_devices_{name}"] = len(batch.sharding.device_set)
                out[f"batch_spec_{name}"] = str(batch.sharding.spec)
            state, metrics = step(state, batch)
            trajectory.append(float(metrics["loss"]))
        leaf = jax.tree.leaves(state.params)[0]
        out[f"param_devices_{name}"] = len(leaf.sharding.device_set)
        out[f"param_replicated_{name}"] = bool(leaf.sharding.is_fully_replicated)
        out[f"loss_{name}"] = trajectory
        finals[name] = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    out["max_param_diff"] = max(
        float(np.max(np.abs(a - b))) for a, b in zip(finals["many"], finals["one"], strict=True)
    )
    try:
        train.shard_batch(jnp.zeros((12, 2)), train.make_mesh())
        out["indivisible_error"] = None
    except ValueError as e:
        out["indivisible_error"] = str(e)
    print(json.dumps(out))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("resume", "devices"))
    parser.add_argument("--workdir")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--progress")
    args = parser.parse_args()
    {"resume": resume, "devices": devices}[args.mode](args)


if __name__ == "__main__":
    main()
