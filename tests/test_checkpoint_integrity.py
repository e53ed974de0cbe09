"""Checkpoint integrity on real files: manifests, damaged steps (truncated, deleted, bit-flipped files, empty step
directories), the fallback to the newest intact step, quarantine, workdirs that are files or read-only, and the
one-writer lock within a process. (Other processes: tests/test_checkpoint.py.)

Time convention of the trained model: t = 0 is noise, t = 1 is data.
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import checkpoint, data, losses, nn, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, EVERY = 6, 3


def _leaves(tree):
    return [np.array(x, copy=True) for x in jax.tree.leaves(tree)]


def assert_leaves_equal(tree, expected):
    got = _leaves(tree)
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


class Run:
    """A tiny fit (t = 0 noise, t = 1 data) with checkpoints at steps 3 and 6 and the states seen at those steps."""

    def __init__(self, root):
        self.apply, self.params = nn.split(
            nn.MLP(2, hidden=16, depth=1, time_dim=8, rngs=nnx.Rngs(0))
        )
        self.config = train.TrainConfig(
            learning_rate=3e-3, warmup_steps=1, total_steps=STEPS, batch_size=16, ema_decay=0.5
        )
        xs = data.toy_sample("moons", jax.random.key(1), 128)
        self.batch_fn = train.dataset_batch_fn(xs, 16, jax.random.key(2))
        self.template = os.path.join(root, "template")
        self.seen = {}  # step -> the state's leaves, copied inside the run (not read back from disk)
        state, self.history = self.fit(
            self.template, callback=lambda s, st, m: self.seen.__setitem__(s, _leaves(st))
        )
        self.final = _leaves(state)
        self.abstract = jax.eval_shape(
            lambda: train.init_state(
                self.params, train.make_optimizer(self.config), jax.random.key(0)
            )
        )

    def fit(self, workdir, **kw):
        kw = dict(dict(checkpoint_every=EVERY, keep=None, log_every=EVERY, progress=False), **kw)
        return train.fit(
            self.apply,
            self.params,
            losses.flow_matching(),
            self.batch_fn,
            self.config,
            workdir=workdir,
            **kw,
        )

    def copy(self, dest):
        shutil.copytree(self.template, dest)
        return str(dest)

    def restore(self, workdir, **kw):
        return checkpoint.restore_latest(workdir, self.abstract, self.config.to_dict(), **kw)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return Run(str(tmp_path_factory.mktemp("integrity")))


def largest_file(step_dir):
    files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
    files = [f for f in files if not f.endswith(checkpoint.MANIFEST_FILE)]
    return max(files, key=os.path.getsize)


def damage(path, how):
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif how == "delete":
        os.remove(path)
    elif how == "bitflip":  # same size: 64 bytes in the middle inverted
        raw = bytearray(open(path, "rb").read())
        mid = len(raw) // 2 - 32
        raw[mid : mid + 64] = bytes(b ^ 0xFF for b in raw[mid : mid + 64])
        with open(path, "wb") as f:
            f.write(raw)
    else:
        raise ValueError(how)


def snapshot(root):
    """Every path under ``root`` with its size and mtime: to show that readers change nothing."""
    out = {}
    for r, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(r, name)
            st = os.stat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


def damaged_warnings(record):
    return [w for w in record if issubclass(w.category, checkpoint.DamagedCheckpointWarning)]


def test_intact_run_has_manifests_and_restores_the_latest_step(run):
    assert sorted(int(p) for p in os.listdir(run.template) if p.isdigit()) == [3, 6]
    for step in (3, 6):
        step_dir = os.path.join(run.template, str(step))
        manifest = json.load(open(os.path.join(step_dir, checkpoint.MANIFEST_FILE)))
        on_disk = {
            os.path.relpath(os.path.join(r, f), step_dir)
            for r, _, fs in os.walk(step_dir)
            for f in fs
            if f != checkpoint.MANIFEST_FILE
        }
        assert set(manifest["files"]) == on_disk and len(on_disk) > 5
        for rel, entry in manifest[
            "files"
        ].items():  # checked with hashlib here, not with the module's code
            raw = open(os.path.join(step_dir, rel), "rb").read()
            assert entry == {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        assert checkpoint.verify_step(run.template, step) is None
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        restored = run.restore(run.template)
    assert not damaged_warnings(record)  # negative control of the fallback tests below
    assert restored.step == 6 and restored.meta["extra"]["history"]["step"] == [3, 6]
    assert_leaves_equal(restored.state, run.seen[6])
    assert_leaves_equal(restored.state, run.final)
    assert not np.array_equal(run.seen[3][0], run.seen[6][0])  # the two steps differ


REASONS = {
    "truncate": r"^file state/\S+: size \d+ != \d+ recorded$",
    "delete": r"^file state/\S+ missing$",
    "bitflip": r"^checksum mismatch in state/\S+$",
}


@pytest.mark.parametrize("how", ["truncate", "delete", "bitflip"])
def test_damaged_latest_step_falls_back_and_is_quarantined(run, tmp_path, how):
    workdir = run.copy(tmp_path / "run")
    victim = largest_file(os.path.join(workdir, "6"))
    size = os.path.getsize(victim)
    damage(victim, how)
    if how == "bitflip":
        assert os.path.getsize(victim) == size  # a same-size corruption: only the checksum sees it
    reason = checkpoint.verify_step(workdir, 6)
    assert reason is not None and re.match(REASONS[how], reason), reason
    assert checkpoint.verify_step(workdir, 3) is None

    # a reader: one warning line, the older step's exact arrays, nothing changed on disk
    before = snapshot(workdir)
    with pytest.warns(checkpoint.DamagedCheckpointWarning) as record:
        restored = run.restore(workdir)
    [w] = damaged_warnings(record)
    message = str(w.message)
    assert "\n" not in message and reason in message
    assert message.startswith(f"checkpoint step 6 in {workdir} is damaged (")
    assert message.endswith("falling back to step 3")
    assert restored.step == 3
    assert_leaves_equal(restored.state, run.seen[3])
    assert restored.meta["extra"]["history"]["step"] == [3]
    assert snapshot(workdir) == before

    # the writer: fit moves the damaged step away, resumes from 3 and ends where the uninterrupted run ended
    with pytest.warns(checkpoint.DamagedCheckpointWarning, match="moved to"):
        state, history = run.fit(workdir)
    moved = os.path.join(workdir, checkpoint.DAMAGED_DIR, "6")
    assert os.path.isdir(moved) and checkpoint.verify_step(os.path.dirname(moved), 6) == reason
    assert_leaves_equal(state, run.final)
    assert history == run.history
    assert checkpoint.verify_step(workdir, 6) is None  # the new step 6 is intact
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert run.restore(workdir).step == 6
    assert not damaged_warnings(record)


def test_quarantine_keeps_earlier_copies(run, tmp_path):
    workdir = run.copy(tmp_path / "run")
    for expected in ("6", "6.1"):
        damage(largest_file(os.path.join(workdir, "6")), "truncate")
        manager = checkpoint.make_manager(workdir, keep=None)
        with pytest.warns(checkpoint.DamagedCheckpointWarning):
            restored = run.restore(manager, quarantine=True)
        assert restored.step == 3 and list(manager.all_steps()) == [3]
        assert os.path.isdir(os.path.join(workdir, "damaged", expected))
        # the step number is free again: a new save of it works
        assert checkpoint.save(manager, 6, restored.state, run.config.to_dict())
        manager.close()
        assert checkpoint.verify_step(workdir, 6) is None


def test_step_without_manifest_is_checked_by_restoring(run, tmp_path):
    workdir = run.copy(tmp_path / "run")
    os.remove(
        os.path.join(workdir, "6", checkpoint.MANIFEST_FILE)
    )  # killed between finalize and manifest
    assert checkpoint.verify_step(workdir, 6) is None
    assert_leaves_equal(run.restore(workdir).state, run.seen[6])
    damage(largest_file(os.path.join(workdir, "6")), "truncate")
    reason = checkpoint.verify_step(workdir, 6)
    assert reason.startswith("not restorable: ") and "\n" not in reason and len(reason) < 300
    with pytest.warns(checkpoint.DamagedCheckpointWarning, match="not restorable"):
        assert run.restore(workdir).step == 3

    # a NaN saved without a manifest (e.g. by an older version) is damage too
    other = str(tmp_path / "nan")
    manager = checkpoint.make_manager(other)
    tree = {"w": jnp.array([1.0, jnp.nan]), "n": jnp.arange(2)}
    checkpoint.save(manager, 1, {"w": jnp.ones(2), "n": jnp.arange(2)}, {"a": 1})
    checkpoint.save(manager, 2, tree, {"a": 1})
    manager.close()
    os.remove(os.path.join(other, "2", checkpoint.MANIFEST_FILE))
    assert checkpoint.verify_step(other, 2) == "non-finite values in ['w'] (no manifest)"
    with pytest.warns(checkpoint.DamagedCheckpointWarning, match="non-finite"):
        restored = checkpoint.restore_latest(other, jax.eval_shape(lambda: tree), {"a": 1})
    assert restored.step == 1
    np.testing.assert_array_equal(restored.state["w"], [1.0, 1.0])


def test_empty_step_directory(run, tmp_path):
    workdir = run.copy(tmp_path / "run")
    os.mkdir(os.path.join(workdir, "9"))
    assert checkpoint.verify_step(workdir, 9) == "empty step directory"
    assert checkpoint.read_metadata(workdir)["extra"]["history"]["step"] == [3, 6]
    with pytest.warns(
        checkpoint.DamagedCheckpointWarning, match=r"step 9 .*\(empty step directory\)"
    ):
        assert run.restore(workdir).step == 6
    assert os.path.isdir(os.path.join(workdir, "9"))  # a reader moves nothing
    with pytest.warns(checkpoint.DamagedCheckpointWarning):
        state, _ = run.fit(
            workdir
        )  # complete already: nothing to train, but the empty step is moved
    assert os.path.isdir(os.path.join(workdir, "damaged", "9"))
    assert not os.path.exists(os.path.join(workdir, "9"))
    assert_leaves_equal(state, run.final)


def test_every_step_damaged_raises(run, tmp_path):
    workdir = run.copy(tmp_path / "run")
    for step in (3, 6):
        damage(largest_file(os.path.join(workdir, str(step))), "delete")
    before = snapshot(workdir)
    for call in (
        lambda: run.restore(workdir),
        lambda: run.restore(checkpoint.make_manager(workdir, keep=None), quarantine=True),
        lambda: checkpoint.read_metadata(workdir),
        lambda: run.fit(workdir),
    ):
        with pytest.raises(checkpoint.CheckpointError) as info:
            call()
        message = str(info.value)
        assert isinstance(info.value, ValueError) and "\n" not in message
        assert message.startswith(f"every checkpoint in {workdir} is damaged (step 6: file state/")
        assert "; step 3: file state/" in message and "missing" in message
        assert "start the run afresh, or use another workdir" in message
    after = snapshot(workdir)
    after.pop(checkpoint.LOCK_FILE), before.pop(checkpoint.LOCK_FILE)  # fit took the lock
    assert after == before  # nothing else changed: nothing moved


def test_config_mismatch_is_not_damage(run):
    other = run.config.replace(learning_rate=0.5).to_dict()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="learning_rate") as info:
            checkpoint.restore_latest(run.template, run.abstract, other)
    assert not isinstance(info.value, checkpoint.CheckpointError)
    assert not damaged_warnings(record)


def test_workdir_that_is_a_file_or_cannot_be_created(run, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    for call in (
        lambda: checkpoint.make_manager(a_file),
        lambda: run.restore(a_file),
        lambda: checkpoint.read_metadata(a_file),
        lambda: checkpoint.workdir_lock(a_file).__enter__(),
        lambda: run.fit(a_file),
    ):
        with pytest.raises(checkpoint.WorkdirError, match=f"workdir {a_file} is a file") as info:
            call()
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    with pytest.raises(
        checkpoint.WorkdirError, match=r"cannot create workdir .*a_file/sub \(Not a dir"
    ):
        run.fit(a_file / "sub")
    assert a_file.read_text() == "not a directory"


def test_workdir_lock_is_reentrant_and_records_the_holder(run, tmp_path):
    workdir = run.copy(tmp_path / "run")
    with checkpoint.workdir_lock(workdir):
        info = json.load(open(os.path.join(workdir, checkpoint.LOCK_FILE)))
        assert info["pid"] == os.getpid() and info["command"].split()[0].endswith(
            os.path.basename(sys.argv[0])
        )
        assert {"host", "since"} <= set(info)
        with checkpoint.workdir_lock(
            os.path.join(workdir, ".", "")
        ):  # the same directory, other spelling
            # readers never lock: they work while the run holds it
            assert run.restore(workdir).step == 6
            assert checkpoint.read_metadata(workdir)["config"] == run.config.to_dict()
            state, _ = run.fit(workdir)  # fit takes the lock too (re-entrant in one process)
        assert_leaves_equal(state, run.final)
    with checkpoint.workdir_lock(workdir):  # released on exit
        # another thread of this process is a second writer: refused at once, like another process
        import threading  # noqa: PLC0415

        errors = []

        def other():
            try:
                with checkpoint.workdir_lock(workdir):
                    errors.append(None)
            except checkpoint.WorkdirLockedError as e:
                errors.append(str(e))

        t = threading.Thread(target=other)
        t.start()
        t.join(30)
        assert errors and errors[0] is not None and "another thread" in errors[0]


def without_root_privileges(args, **kw):
    """Run ``args`` so that file permissions apply even as root (drop CAP_DAC_OVERRIDE and friends)."""
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is missing: cannot make a directory read-only")
        caps = "-dac_override,-dac_read_search,-fowner"
        args = [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--", *args]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


READER = r"""
import json, os, sys, warnings
import jax, numpy as np
from diffjax import checkpoint, train
intact, damaged, out = sys.argv[1:4]
result = {}
try:
    open(os.path.join(intact, "probe"), "w")
    result["write"] = "allowed"
except PermissionError:
    result["write"] = "denied"
from flax import nnx
from diffjax import nn
config = checkpoint.read_metadata(intact)["config"]
_, params = nn.split(nn.MLP(2, hidden=16, depth=1, time_dim=8, rngs=nnx.Rngs(0)))
optimizer = train.make_optimizer(train.TrainConfig(**config))
abstract = jax.eval_shape(lambda: train.init_state(params, optimizer, jax.random.key(0)))
restored = checkpoint.restore_latest(intact, abstract, config)
result["step"] = restored.step
result["verify"] = [checkpoint.verify_step(intact, s) for s in (3, 6)]
np.savez(os.path.join(out, "restored.npz"), *[np.asarray(x) for x in jax.tree.leaves(restored.state)])
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    result["fallback_step"] = checkpoint.restore_latest(damaged, abstract, config).step
result["warnings"] = [str(w.message) for w in record if w.category is checkpoint.DamagedCheckpointWarning]
for name, call in (("manager", lambda: checkpoint.make_manager(intact)),
                   ("lock", lambda: checkpoint.workdir_lock(intact).__enter__())):
    try:
        call()
        result[name] = "no error"
    except checkpoint.WorkdirError as e:
        result[name] = str(e)
print(json.dumps(result))
"""


def test_read_only_workdir(run, tmp_path):
    intact = run.copy(tmp_path / "intact")
    damaged = run.copy(tmp_path / "damaged")
    damage(largest_file(os.path.join(damaged, "6")), "bitflip")
    out = tmp_path / "out"
    out.mkdir()
    for root in (intact, damaged):
        for r, _, files in os.walk(root):
            for name in files:
                os.chmod(os.path.join(r, name), 0o444)
            os.chmod(r, 0o555)
    before = {root: snapshot(root) for root in (intact, damaged)}
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    try:
        proc = without_root_privileges(
            [sys.executable, "-c", READER, intact, damaged, str(out)], env=env
        )
    finally:
        for root in (intact, damaged):
            for r, _, _ in os.walk(root):
                os.chmod(r, 0o755)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["write"] == "denied"  # the directory really is read-only for the reader
    assert result["step"] == 6 and result["verify"] == [None, None]
    restored = np.load(out / "restored.npz")
    for i, expected in enumerate(run.seen[6]):
        np.testing.assert_array_equal(restored[f"arr_{i}"], expected)
    assert result["fallback_step"] == 3
    [warning] = result["warnings"]
    assert "checksum mismatch" in warning and warning.endswith("falling back to step 3")
    assert result["manager"].startswith(f"workdir {intact} is not writable (Permission denied)")
    assert result["lock"].startswith(f"workdir {intact} is not writable")
    for root in (intact, damaged):
        assert snapshot(root) == before[root]  # nothing written, moved or cleaned


@pytest.mark.parametrize("reader", ["restore", "read_metadata"])
def test_steps_rotated_away_while_read_are_not_damage(run, tmp_path, monkeypatch, reader):
    """A live writer saves step 6 and rotates step 3 away while a reader reads step 3 (the only one it listed):
    the reader lists the steps again and reads step 6, with no damage reported. A step damaged in place is still
    reported beside it (the control)."""
    workdir = run.copy(tmp_path / "run")
    hidden = str(tmp_path / "step6")
    os.replace(
        os.path.join(workdir, "6"), hidden
    )  # not yet written, as far as the reader first sees
    original = checkpoint._read_meta
    calls = []

    def writer_acts_during_the_read(manager, step):
        calls.append(step)
        if step == 3 and len(calls) == 1:
            shutil.rmtree(os.path.join(workdir, "3"))  # rotation deletes it mid-read
            os.replace(hidden, os.path.join(workdir, "6"))  # the new step is finalised
        return original(manager, step)

    monkeypatch.setattr(checkpoint, "_read_meta", writer_acts_during_the_read)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if reader == "restore":
            restored = run.restore(workdir)
            assert restored.step == 6
            assert_leaves_equal(restored.state, run.seen[6])
        else:
            assert checkpoint.read_metadata(workdir)["extra"]["history"]["step"] == [3, 6]
    assert not damaged_warnings(record)
    assert calls == [3, 6]

    # every step vanishing for good is "no checkpoint", not "every checkpoint is damaged"
    monkeypatch.setattr(
        checkpoint,
        "_read_meta",
        lambda manager, step: (
            shutil.rmtree(os.path.join(workdir, str(step))),
            original(manager, step),
        )[1],
    )
    assert (
        run.restore(workdir) if reader == "restore" else checkpoint.read_metadata(workdir)
    ) is None

    # control: a step damaged in place (its directory stays) is reported, rotation or not
    workdir = run.copy(tmp_path / "again")
    damage(largest_file(os.path.join(workdir, "6")), "truncate")
    monkeypatch.setattr(checkpoint, "_read_meta", original)
    if reader == "restore":
        with pytest.warns(
            checkpoint.DamagedCheckpointWarning, match="step 6 .*falling back to step 3"
        ):
            assert run.restore(workdir).step == 3
    else:
        for step in (3, 6):
            damage(largest_file(os.path.join(workdir, str(step))), "delete")
        with pytest.raises(checkpoint.CheckpointError, match="every checkpoint"):
            checkpoint.read_metadata(workdir)
