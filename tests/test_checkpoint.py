"""Tests of diffjax.checkpoint: exact round trip, keep-last-K, refusal of incompatible configs and shapes, and a
real training process killed with SIGKILL and resumed to the bit-identical result of an uninterrupted run.

Time convention of the trained model: t = 0 is noise, t = 1 is data.
"""

import functools
import json
import os
import signal
import subprocess
import sys
import time

import _train_proc  # the helper process's run, for an in-process reference (tests/ is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import checkpoint, data, losses, nn, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "_train_proc.py")


@functools.cache
def trained_state(hidden=16, steps=2):
    """A state after a few steps, so that the optimizer moments, EMA, step and key are all non-trivial.

    Cached: the tests only read it (each call would compile its own train step).
    """
    config = train.TrainConfig(warmup_steps=1, total_steps=10, ema_decay=0.5)
    apply, params = nn.split(nn.MLP(2, hidden=hidden, depth=1, time_dim=8, rngs=nnx.Rngs(0)))
    optimizer = train.make_optimizer(config)
    step = train.make_train_step(apply, losses.flow_matching(), optimizer, config.ema_decay)
    state = train.init_state(params, optimizer, jax.random.key(3))
    for s in range(steps):
        state, _ = step(state, data.toy_sample("moons", jax.random.key(s), 8))
    return state, config


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
    state, config = trained_state()
    manager = checkpoint.make_manager(tmp_path, keep=2)
    assert checkpoint.save(manager, 2, state, config.to_dict(), extra={"note": [1, 2]})
    manager.wait_until_finished()
    manager.close()
    abstract = jax.eval_shape(lambda: state)
    restored, step, _ = checkpoint.restore_latest(tmp_path, abstract, config.to_dict())
    assert step == 2
    assert_trees_equal(restored, state)
    assert int(restored.step) == 2
    assert checkpoint.read_metadata(tmp_path)["extra"] == {"note": [1, 2]}
    assert json.loads((tmp_path / "config.json").read_text()) == config.to_dict()


def test_restore_from_nothing_is_none(tmp_path):
    state, config = trained_state()
    abstract = jax.eval_shape(lambda: state)
    assert checkpoint.restore_latest(tmp_path / "missing", abstract, config.to_dict()) is None
    assert checkpoint.restore_latest(tmp_path, abstract, config.to_dict()) is None


def test_keeps_last_k(tmp_path):
    state = {"w": jnp.arange(3.0)}
    manager = checkpoint.make_manager(tmp_path, keep=2)
    for s in range(1, 6):
        checkpoint.save(manager, s, {"w": state["w"] * s}, {"a": 1})
    manager.wait_until_finished()
    assert list(manager.all_steps()) == [4, 5]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["4", "5"]
    manager.close()
    restored, step, _ = checkpoint.restore_latest(tmp_path, jax.eval_shape(lambda: state), {"a": 1})
    assert step == 5
    np.testing.assert_array_equal(restored["w"], [0.0, 5.0, 10.0])


def test_refuses_incompatible_config(tmp_path):
    state, config = trained_state()
    manager = checkpoint.make_manager(tmp_path)
    checkpoint.save(manager, 2, state, config.to_dict())
    manager.wait_until_finished()
    manager.close()
    abstract = jax.eval_shape(lambda: state)
    other = config.replace(learning_rate=0.5, seed=7).to_dict()
    with pytest.raises(ValueError, match=r"\['learning_rate', 'seed'\]") as info:
        checkpoint.restore_latest(tmp_path, abstract, other)
    assert "checkpoint=0.001 vs current=0.5" in str(info.value)
    with pytest.raises(ValueError, match="extra_key"):
        checkpoint.restore_latest(tmp_path, abstract, {**config.to_dict(), "extra_key": 1})
    # ignored keys may differ; the others are still checked
    longer = config.replace(total_steps=99).to_dict()
    restored, step, _ = checkpoint.restore_latest(
        tmp_path, abstract, longer, ignore=("total_steps",)
    )
    assert step == 2
    assert_trees_equal(restored, state)
    with pytest.raises(ValueError, match="seed"):
        checkpoint.restore_latest(tmp_path, abstract, other, ignore=("total_steps",))


def test_fit_extends_a_run_to_a_larger_total(tmp_path):
    """fit with a larger total_steps continues from the checkpoint: the first s steps are the earlier run's."""
    apply, params = nn.split(nn.MLP(2, hidden=16, depth=1, time_dim=8, rngs=nnx.Rngs(0)))
    batch_fn = lambda s: data.toy_sample("moons", jax.random.key(s), 8)
    short = train.TrainConfig(warmup_steps=1, total_steps=3, batch_size=8)
    kw = dict(workdir=tmp_path, checkpoint_every=3, progress=False, log_every=1)
    s3, _ = train.fit(apply, params, losses.flow_matching(), batch_fn, short, **kw)
    s5, hist = train.fit(
        apply, params, losses.flow_matching(), batch_fn, short.replace(total_steps=5), **kw
    )
    assert int(s5.step) == 5 and hist["step"] == [1, 2, 3, 4, 5]
    assert not np.allclose(np.asarray(jax.tree.leaves(s5.params)[0]), jax.tree.leaves(s3.params)[0])
    with pytest.raises(ValueError, match="learning_rate"):
        train.fit(
            apply,
            params,
            losses.flow_matching(),
            batch_fn,
            short.replace(total_steps=6, learning_rate=0.5),
            **kw,
        )


def test_refuses_different_parameter_shapes(tmp_path):
    state, config = trained_state(hidden=16)
    manager = checkpoint.make_manager(tmp_path)
    checkpoint.save(manager, 2, state, config.to_dict())
    manager.wait_until_finished()
    manager.close()
    wider, _ = trained_state(hidden=32, steps=0)
    with pytest.raises(ValueError, match="shape/dtype changed") as info:
        checkpoint.restore_latest(tmp_path, jax.eval_shape(lambda: wider), config.to_dict())
    assert "[16]" in str(info.value) and "[32]" in str(info.value)


def _env(cache_dir=None):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    if (
        cache_dir is not None
    ):  # the test's processes share their compilations (same programs, same numbers)
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(cache_dir),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


def _cmd(workdir, sleep, progress=None):
    cmd = [sys.executable, HELPER, "resume", "--workdir", str(workdir), "--steps", "60"]
    cmd += ["--checkpoint-every", "10", "--sleep", str(sleep)]
    return cmd + (["--progress", str(progress)] if progress else [])


def _finalized_steps(workdir):
    if not workdir.exists():
        return []
    return sorted(int(p.name) for p in workdir.iterdir() if p.name.isdigit())


def _wait_for(condition, proc, what, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the training process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _progress(path):
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return -1


def _signal_and_collect(workdir, sig, tmp_path):
    """Resume ``workdir`` slowly, send ``sig`` after a few steps; the JSON report and the finalised steps."""
    progress = tmp_path / f"progress_{sig.name}"
    proc = subprocess.Popen(
        _cmd(workdir, 0.05, progress),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    start = max(_finalized_steps(workdir))
    _wait_for(lambda: _progress(progress) >= start + 2, proc, f"step {start + 2} before {sig.name}")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 128 + sig.value, err[-3000:]
    assert "Traceback" not in err
    return json.loads(out.strip().splitlines()[-1]), _finalized_steps(workdir)


def test_kill_interrupt_and_resume_are_bit_identical(tmp_path):
    """One run: kill -9, resume and SIGINT, resume and SIGTERM, resume to the end; a second writer meanwhile.

    Ends bit-identical to an uninterrupted run; each interrupt saved exactly the step it stopped at; the lock of a
    killed holder is free; a second fit on a held workdir fails at once naming the holder's pid.
    """
    run = tmp_path / "run"
    env = _env(tmp_path / "jax_cache")
    victim = subprocess.Popen(
        _cmd(run, 0.05), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # meanwhile the uninterrupted run, here (the same programs: same XLA flags, one CPU device)
    reference_state, reference_history = _train_proc.train_run(None, 60, 10)
    reference = _train_proc.flat_leaves(reference_state)
    _wait_for(lambda: _finalized_steps(run), victim, "writing a checkpoint")

    # a second writer (this test process) on the held workdir is refused at once, naming the holder
    apply, params = nn.split(nn.MLP(2, hidden=16, depth=2, time_dim=8, rngs=nnx.Rngs(0)))
    config = train.TrainConfig(learning_rate=3e-3, warmup_steps=5, total_steps=60, batch_size=32)
    t0 = time.monotonic()
    with pytest.raises(checkpoint.WorkdirLockedError) as info:
        train.fit(apply, params, losses.flow_matching(), lambda s: None, config, workdir=run)
    assert time.monotonic() - t0 < 5  # at once: before any compilation (typically ~0.01 s)
    message = str(info.value)
    assert f"pid {victim.pid} on " in message and "_train_proc.py resume" in message
    assert message.endswith("wait for it to finish, or use another workdir") and "\n" not in message
    assert victim.poll() is None  # the holder is unaffected

    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (run / "final.npz").exists()
    steps_at_kill = _finalized_steps(run)
    assert steps_at_kill and max(steps_at_kill) < 60
    with checkpoint.workdir_lock(run):  # the OS released the killed holder's lock
        pass

    # resume, then Ctrl-C: stops after a step and saves exactly that step; then the same with SIGTERM
    seen = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        before = max(_finalized_steps(run))
        info, steps = _signal_and_collect(run, sig, tmp_path)
        assert info["signal"] == sig.name and info["saved"] is True and info["start"] == before
        assert before + 2 <= info["interrupted"] < 60 and max(steps) == info["interrupted"]
        assert info["message"] == (
            f"interrupted by {sig.name} at step {info['interrupted']}; checkpoint saved in {run} "
            "(resume by running the same command again)"
        )
        assert checkpoint.verify_step(run, info["interrupted"]) is None
        seen[sig.name] = info["interrupted"]

    resumed = subprocess.run(
        _cmd(run, 0.0), env=_env(), capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    info = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert info["start"] == seen["SIGTERM"]  # it resumed, not restarted
    assert (
        info["step"] == 60 and info["n_history"] == 60
    )  # the loss history survived kill and signals

    a = reference
    b = np.load(run / "final.npz")
    assert sorted(a) == sorted(b.files) and any("params" in k for k in a)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert len(reference_history["loss"]) == 60
    # negative control: the run did change the parameters (the comparison is not between two initial states)
    init = nn.split(nn.MLP(2, hidden=16, depth=2, time_dim=8, rngs=nnx.Rngs(0)))[1]
    first = jax.tree_util.tree_flatten_with_path(init)[0][0]
    key = ".params" + jax.tree_util.keystr(first[0])
    assert not np.array_equal(a[key], np.asarray(first[1]))


def test_read_metadata_does_not_create_the_workdir(tmp_path):
    missing = tmp_path / "no_such_run"
    assert checkpoint.read_metadata(missing) is None
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert checkpoint.read_metadata(empty) is None
