"""Fused training steps: K optimizer steps per dispatch (``make_multi_step``, ``fit(steps_per_dispatch=K)``)
equal K single steps bit for bit — states, EMA, optimizer state, step counter, per-step metrics, histories and
checkpoints — at K dividing and not dividing the log/checkpoint intervals and the total, across a resume that
changes K, and across a SIGINT in the middle of a dispatch.

Time convention: t = 0 is noise, t = 1 is data (the flow-matching objective draws t ~ U(0, 1) from
``fold_in(key(seed), s)`` at step s).

Cost: a tiny MLP, a batch of 16 and at most 16 steps; each fit compiles its own programs (the K-step scan and
its power-of-two remainders), so the number of fit calls is kept small and each reference run is shared.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
from flax import nnx

from diffjax import checkpoint, data, losses, nn, train

BATCH = 16
# 16 steps of data, drawn once: batch_fn(s) is a pure function of s (host NumPy, as a data loader gives)
BATCHES = np.asarray(data.toy_sample("moons", jax.random.key(1), 16 * BATCH)).reshape(16, BATCH, 2)
MODEL = nn.split(nn.MLP(2, hidden=16, depth=2, time_dim=8, rngs=nnx.Rngs(0)))
OBJECTIVE = losses.flow_matching()
# one plan for every fit: K = 2 divides log_every, checkpoint_every and total; K = 3 does not divide log_every
# (dispatches 3, 1 | 2, 2 | 3, 1); K = 4 does not divide checkpoint_every (4 | 2, 2 | 4). A checkpoint at 6 lies
# between log points, so it carries a non-empty window of per-step metrics.
PLAN = {"total": 12, "log_every": 4, "checkpoint_every": 6}


def batch_fn(s):
    return BATCHES[s]


def config(total, seed=0):
    return train.TrainConfig(warmup_steps=2, total_steps=total, batch_size=BATCH, seed=seed)


def run(workdir, k, total, log_every, checkpoint_every, batches=batch_fn, seed=0):
    apply, params = MODEL
    return train.fit(
        apply,
        params,
        OBJECTIVE,
        batches,
        config(total, seed),
        workdir=workdir,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        progress=False,
        steps_per_dispatch=k,
    )


def assert_bitwise_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert np.array_equal(x, y), "not bit-identical"


def saved(workdir):
    """Every checkpoint of a workdir: {step: (config, history, window)} as fit stored them."""
    steps = sorted(int(p) for p in os.listdir(workdir) if p.isdigit())
    out = {}
    for s in steps:
        meta = checkpoint.read_metadata(workdir, s)
        out[s] = (meta.get("config"), meta.get("extra"))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The K = 1 run (uninterrupted, with checkpoints) that every fused run is compared with."""
    workdir = tmp_path_factory.mktemp("reference")
    state, history = run(str(workdir), 1, **PLAN)
    assert history["step"] == [4, 8, 12] and sorted(saved(workdir)) == [6, 12]
    return state, history, saved(workdir)


def test_multi_step_equals_single_steps_bitwise():
    """The core claim, outside fit: one scan of K = 5 steps == 5 calls of the single step, every leaf and the
    per-step metrics; a different key (negative control) gives a different state through the same program."""
    apply, params = MODEL
    cfg = config(10)
    optimizer, schedule = train.make_optimizer(cfg), train.make_schedule(cfg)
    args = (apply, OBJECTIVE, optimizer, cfg.ema_decay)
    single = train.make_train_step(*args, schedule=schedule, donate=False)
    multi = train.make_multi_step(*args, schedule=schedule, donate=False)
    state0 = train.init_state(params, optimizer, jax.random.key(0))
    state, metrics = state0, []
    for s in range(5):
        state, m = single(state, BATCHES[s])
        metrics.append(m)
    fused, fused_metrics = multi(state0, train.stack_batches([BATCHES[s] for s in range(5)]))
    assert int(fused.step) == 5
    assert_bitwise_equal(fused, state)
    stacked = {k: np.stack([np.asarray(m[k]) for m in metrics]) for k in metrics[0]}
    assert_bitwise_equal(fused_metrics, stacked)
    assert fused_metrics["loss"].shape == (5,)
    # negative controls: the comparison fails for another seed and for a one-ulp change of one leaf
    other, _ = multi(
        state0._replace(key=jax.random.key_data(jax.random.key(1))),
        train.stack_batches([BATCHES[s] for s in range(5)]),
    )
    with pytest.raises(AssertionError, match="not bit-identical"):
        assert_bitwise_equal(other.params, state.params)
    leaves, treedef = jax.tree.flatten(state.ema_params)
    nudged = [np.nextafter(np.asarray(leaves[0]), np.inf)] + leaves[1:]
    with pytest.raises(AssertionError, match="not bit-identical"):
        assert_bitwise_equal(jax.tree.unflatten(treedef, nudged), state.ema_params)


@pytest.mark.parametrize("k", [2, 3])
def test_fit_fused_equals_single_steps_bitwise(tmp_path, reference, k):
    """fit at K = 2 (dividing every interval) and K = 3 (not dividing log_every) == fit at K = 1: final state,
    history, and every checkpoint's config, history and window (the per-step metrics since the last log)."""
    state, history = run(str(tmp_path), k, **PLAN)
    ref_state, ref_history, ref_saved = reference
    assert_bitwise_equal(state, ref_state)
    assert history == ref_history
    assert saved(tmp_path) == ref_saved
    assert int(state.step) == PLAN["total"] and len(ref_saved[6][1]["window"]["loss"]) == 2


def _in_main_thread():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed in the main thread")


def test_sigint_and_resume_across_k(tmp_path, reference):
    """K = 4, SIGINT while the batches of steps 1-4 are stacked: the dispatch finishes and step 4 is saved (not
    step 2); resumed at K = 1 and stopped again at step 7; resumed at K = 4 to the end (7 | 8-11): the final
    state, history and last checkpoint are the uninterrupted K = 1 run's, bit for bit."""
    _in_main_thread()

    def interrupting_at(index):
        def batches(s):
            if s == index:
                os.kill(os.getpid(), signal.SIGINT)
            return batch_fn(s)

        return batches

    for k, index, stopped_at in [(4, 1, 4), (1, 6, 7)]:
        with pytest.raises(train.TrainingInterrupted) as info:
            run(str(tmp_path), k, **PLAN, batches=interrupting_at(index))
        assert (info.value.step, info.value.saved) == (stopped_at, True)
        assert int(info.value.state.step) == stopped_at
        assert checkpoint.verify_step(tmp_path, stopped_at) is None
    state, history = run(str(tmp_path), 4, **PLAN)
    ref_state, ref_history, ref_saved = reference
    assert_bitwise_equal(state, ref_state)
    assert history == ref_history
    assert saved(tmp_path)[12] == ref_saved[12]
    assert sorted(saved(tmp_path)) == [6, 7, 12]  # keep=3: 4 was dropped


def test_dispatch_lengths_stay_within_events_and_few_programs():
    """The planner never crosses a log point, checkpoint or the end, sums to the total, and uses only K and
    powers of two below it (so at most 1 + log2(K) programs compile), for K dividing the intervals or not."""
    for k, log_every, ckpt_every, total in [
        (4, 5, 6, 13),
        (16, 100, 1000, 2000),
        (64, 100, 250, 1001),
        (3, 7, 7, 20),
    ]:
        done, lengths = 0, []
        while done < total:
            n = train._dispatch_length(done, total, k, log_every, ckpt_every)
            assert 1 <= n <= k
            crossed = [
                e for e in range(done + 1, done + n) if e % log_every == 0 or e % ckpt_every == 0
            ]
            assert not crossed, (k, done, n)
            lengths.append(n)
            done += n
        assert done == total
        allowed = {k} | {1 << i for i in range(k.bit_length()) if 1 << i < k}
        assert set(lengths) <= allowed, (k, sorted(set(lengths)))
    # K = 16, log_every = 100: six dispatches of 16 and one of 4 per window (7 instead of 100)
    lengths = []
    done = 0
    while done < 100:
        lengths.append(train._dispatch_length(done, 2000, 16, 100, 1000))
        done += lengths[-1]
    assert lengths == [16] * 6 + [4]


# 3 single steps against one fused dispatch of 3 on 4 CPU devices (batch split over "data", state
# replicated), in a fresh process: the programs fit compiles with its mesh, without fit's other work
FOUR_DEVICES = """
import json
import jax
import numpy as np
from flax import nnx
from diffjax import data, losses, nn, train

apply, params = nn.split(nn.MLP(2, hidden=16, depth=2, time_dim=8, rngs=nnx.Rngs(0)))
batches = np.asarray(data.toy_sample("moons", jax.random.key(1), 3 * 16)).reshape(3, 16, 2)
config = train.TrainConfig(warmup_steps=1, total_steps=6, batch_size=16)
optimizer, mesh = train.make_optimizer(config), train.make_mesh()
args = (apply, losses.flow_matching(), optimizer, config.ema_decay)
kw = dict(schedule=train.make_schedule(config), mesh=mesh)
single, multi = train.make_train_step(*args, **kw), train.make_multi_step(*args, **kw)
state = train.init_state(params, optimizer, jax.random.key(0))
one = train.replicate(state, mesh)
for b in batches:
    one, _ = single(one, train.shard_batch(b, mesh))
stacked = train.shard_batches(train.stack_batches(list(batches)), mesh)
fused, _ = multi(train.replicate(state, mesh), stacked)
leaves = [jax.tree.leaves(x) for x in (one, fused)]
print(json.dumps({
    "n_devices": jax.device_count(),
    "bitwise": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(*leaves, strict=True)),
    "stacked_shape": list(stacked.shape),
    "shard_shape": list(stacked.addressable_shards[0].data.shape),
    "param_devices": len(jax.tree.leaves(fused.params)[0].devices()),
}))
"""


def test_fused_fit_on_four_devices_is_bit_identical():
    """Data parallel: K stacked batches are split along the batch axis (axis 1), not the steps axis, and K fused
    steps equal K single steps bit for bit on 4 devices too (the all-reduce inside the scan included)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 4 and out["param_devices"] == 4
    assert out["stacked_shape"] == [3, 16, 2] and out["shard_shape"] == [3, 4, 2]
    assert out["bitwise"]


@pytest.mark.parametrize("bad", [0, -3, 2.0, 1.5, True, "4", None])
def test_bad_steps_per_dispatch_is_refused(tmp_path, bad):
    apply, params = MODEL
    with pytest.raises(
        ValueError, match=re.escape(f"steps_per_dispatch={bad!r} must be a positive int")
    ) as info:
        train.fit(
            apply,
            params,
            OBJECTIVE,
            batch_fn,
            config(4),
            workdir=str(tmp_path / "run"),
            progress=False,
            steps_per_dispatch=bad,
        )
    assert "steps_per_dispatch=1" in str(info.value)  # the fix
    assert not (tmp_path / "run").exists()  # refused before any work, the workdir not even created
