"""Ordinary accidents on real files and real processes (issue 9): nothing is lost, every failure is one line.

Time convention: t = 0 is noise, t = 1 is data. The runs are tiny (a 16-unit MLP, a few steps); what is checked is
the exit status, the one-line message (cause and fix, no traceback) and what is left on disk.

* a second writer on a workdir is refused at once, naming the holder; readers work while it trains;
* Ctrl-C (SIGINT) saves a checkpoint at the current step and prints a one-line resume hint; resuming continues
  from that step;
* a bit-flipped latest checkpoint is reported in one line and the run falls back to the older intact step;
* on a read-only workdir ``sample`` and ``likelihood`` still print their JSON line, with a one-line warning;
* refused no-ops (a smaller ``--steps``, a demo over other settings) and plain mistakes (a workdir that is a
  file, a missing experiment.json, an unwritable cache directory) exit with status 2 and one line.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from diffjax.checkpoint import MANIFEST_FILE
from diffjax_app import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden", "16", "--depth", "1", "--batch-size", "16", "--warmup", "2", "--no-progress"]
OFF = ["--cache-dir", "off"]
EVAL = ["--num-steps", "4", "--no-progress", *OFF]


def _env():
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )


def _diffjax(*args) -> list[str]:
    return [sys.executable, "-m", "diffjax_app", *args]


def _read_only_prefix() -> list[str]:
    """Root ignores file modes: drop the capabilities that let it, so a read-only workdir is read-only."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip(
            "running as root without setpriv: cannot make a directory read-only for this process"
        )
    caps = "-dac_override,-dac_read_search,-fowner"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}", "--"]


def _main(capsys, *argv) -> tuple[int, dict | None, str]:
    """Run the CLI in-process: (exit status, the JSON line or None, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else None), err


def _one_line_error(err: str) -> str:
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1, err
    return errors[0]


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("run4")
    argv = [
        "train",
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
        "--workdir",
        str(workdir),
        "--no-figures",
    ]
    assert cli.main([*argv, *TINY, *OFF]) == 0
    return workdir


def _copy(src, dst):
    shutil.copytree(src, dst)
    for lock in (".diffjax.lock", ".metrics.lock"):
        if os.path.exists(os.path.join(dst, lock)):
            os.remove(os.path.join(dst, lock))
    return dst


def test_smaller_steps_is_refused_and_equal_steps_reported(run4, capsys):
    before = (run4 / "experiment.json").read_text()
    code, out, err = _main(capsys, "train", "--steps", "3", "--workdir", str(run4), *TINY, *OFF)
    line = _one_line_error(err)
    assert code == 2 and out is None
    assert "already trained to 4 steps, more than --steps 3" in line and "--steps 4" in line
    assert (run4 / "experiment.json").read_text() == before  # not rewritten with the smaller count
    code, out, err = _main(
        capsys, "train", "--steps", "4", "--workdir", str(run4), "--no-figures", *TINY, *OFF
    )
    assert code == 0 and out["steps_run"] == 0 and "nothing to train" in err


def test_workdir_mistakes_are_one_line(run4, tmp_path, capsys):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    for command in ("train", "sample"):
        extra = ["--steps", "2", *TINY] if command == "train" else ["--no-progress"]
        code, _, err = _main(capsys, command, "--workdir", str(a_file), *extra, *OFF)
        assert code == 2 and "is a file" in _one_line_error(err)
    # checkpoints without experiment.json: not "no checkpoint"
    no_exp = _copy(run4, tmp_path / "noexp")
    os.remove(no_exp / "experiment.json")
    code, _, err = _main(capsys, "sample", "--workdir", str(no_exp), *EVAL)
    line = _one_line_error(err)
    assert code == 2 and "holds checkpoints but no experiment.json" in line
    # a config edited by hand no longer matches the checkpoint: refused, naming the key
    edited = _copy(run4, tmp_path / "edited")
    cfg = json.loads((edited / "experiment.json").read_text())
    (edited / "experiment.json").write_text(json.dumps({**cfg, "hidden": 32}))
    code, _, err = _main(capsys, "sample", "--workdir", str(edited), *EVAL)
    assert code == 2 and "exp_hidden" in _one_line_error(err)


def test_unwritable_cache_dir(run4, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")  # a file where the cache directory should be: unwritable even for root
    code, _, err = _main(
        capsys, "sample", "--workdir", str(run4), "--cache-dir", str(blocker / "c"), "--no-progress"
    )
    assert code == 2 and "--cache-dir off" in _one_line_error(err)
    # the default location unwritable: a one-line notice, and the command runs without the cache
    monkeypatch.delenv("DIFFJAX_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    code, out, err = _main(
        capsys,
        "likelihood",
        "--workdir",
        str(run4),
        "--n",
        "4",
        "--num-steps",
        "4",
        "--no-progress",
    )
    assert (
        code == 0
        and out["cache_dir"] is None
        and "compilation cache off" in err
        and "Traceback" not in err
    )


def test_other_data_set_is_reported(run4, capsys):
    code, out, err = _main(
        capsys, "likelihood", "--workdir", str(run4), "--data", "moons", "--n", "4", *EVAL
    )
    assert code == 0 and out["data"] == "moons" and out["trained_on"] == "checkerboard"
    assert "trained on 'checkerboard'" in err
    code, _, err = _main(
        capsys, "likelihood", "--workdir", str(run4), "--data", "digits", "--n", "4", *EVAL
    )
    assert code == 2 and "another shape" in _one_line_error(err)


def test_demo_over_other_settings_is_refused(tmp_path, capsys):
    workdir = tmp_path / "demo"
    workdir.mkdir()
    from diffjax_app.demo import demo_config  # noqa: PLC0415

    (workdir / "experiment.json").write_text(json.dumps(demo_config(12, 512).resolved().to_dict()))
    (workdir / "12").mkdir()  # a checkpoint directory: the workdir holds a trained demo
    code, _, err = _main(
        capsys, "demo", "--workdir", str(workdir), "--steps", "3", "--no-progress", *OFF
    )
    line = _one_line_error(err)
    assert code == 2 and "other settings" in line and "steps" in line and "--fresh" in line
    assert (workdir / "12").exists()  # nothing deleted


def _flip(path, n=64):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + n] = bytes(b ^ 0xFF for b in data[mid : mid + n])
    path.write_bytes(bytes(data))


def test_damaged_latest_checkpoint_falls_back(run4, tmp_path, capsys):
    workdir = _copy(run4, tmp_path / "flipped")
    files = [p for p in (workdir / "4").rglob("*") if p.is_file() and "manifest" not in p.name]
    _flip(max(files, key=lambda p: p.stat().st_size))
    code, out, err = _main(
        capsys, "sample", "--workdir", str(workdir), "--n", "8", "--no-figures", *EVAL
    )
    assert code == 0 and out["step"] == 2  # the older intact step
    warned = [line for line in err.splitlines() if "damaged" in line]
    assert len(warned) == 1 and "step 4" in warned[0] and "step 2" in warned[0], err
    # the writer moves the damaged step aside (nothing deleted) and trains on from step 2
    code, out, err = _main(
        capsys, "train", "--steps", "4", "--workdir", str(workdir), "--no-figures", *TINY, *OFF
    )
    assert code == 0 and out["start_step"] == 2 and out["step"] == 4 and out["steps_run"] == 2, err
    assert any((workdir / "damaged").iterdir())


def test_read_only_workdir_still_prints_results(run4, tmp_path):
    workdir = _copy(run4, tmp_path / "ro")
    prefix = _read_only_prefix()
    os.chmod(tmp_path, 0o755)
    for root, _dirs, files in os.walk(workdir):
        for name in files:
            os.chmod(os.path.join(root, name), 0o444)
        os.chmod(root, 0o555)
    try:
        code = (
            "import json, sys\n"
            "from diffjax_app import cli\n"
            "w = sys.argv[1]\n"
            "for cmd in (['sample', '--n', '8'], ['likelihood', '--n', '4'], ['train', '--steps', '6']):\n"
            "    try:\n"
            "        cli.main([cmd[0], '--workdir', w, *cmd[1:], '--num-steps', '4', '--no-progress',"
            " '--cache-dir', 'off'] if cmd[0] != 'train' else [*cmd, '--workdir', w, '--cache-dir', 'off'])\n"
            "    except SystemExit as e:\n"
            "        print(json.dumps({'exit': e.code}), flush=True)\n"
        )
        proc = subprocess.run(
            [*prefix, sys.executable, "-c", code, str(workdir)],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        for root, _dirs, _files in os.walk(workdir):
            os.chmod(root, 0o755)
    lines = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r.get("command") for r in lines[:2]] == ["sample", "likelihood"], proc.stderr[-3000:]
    sample, likelihood, train = lines
    assert sample["n"] == 8 and sample["energy_distance"] is not None and sample["warnings"]
    assert likelihood["nll"] is not None and likelihood["warnings"]
    assert train == {"exit": 2}
    assert "cannot write into --workdir" in proc.stderr and "Traceback" not in proc.stderr
    assert "could not write samples.npy" in proc.stderr
    assert not (workdir / "samples.npy").exists()


def _wait_for(predicate, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.2)
    return False


def test_one_writer_readers_and_sigint(tmp_path, capsys):
    workdir = tmp_path / "long"
    train = _diffjax(
        "train",
        "--steps",
        "1000000",
        "--checkpoint-every",
        "50",
        "--workdir",
        str(workdir),
        *TINY,
        *OFF,
    )
    holder = subprocess.Popen(
        train, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # wait for a finished step (its manifest is written once orbax has finalised it): a bare step directory
        # can still be in flight, and a reader then finds no checkpoint
        assert _wait_for(
            lambda: (
                workdir.exists()
                and any(
                    p.name.isdigit() and (p / MANIFEST_FILE).exists() for p in workdir.iterdir()
                )
            ),
            120,
            holder,
        )
        # a second writer is refused at once, naming the holder
        tic = time.monotonic()
        second = subprocess.run(
            _diffjax(
                "train", "--steps", "20", "--lr", "0.01", "--workdir", str(workdir), *TINY, *OFF
            ),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert str(holder.pid) in _one_line_error(second.stderr)
        assert time.monotonic() - tic < 60
        # a reader works while the run trains
        code, out, err = _main(
            capsys, "sample", "--workdir", str(workdir), "--n", "8", "--no-figures", *EVAL
        )
        assert code == 0 and out["step"] >= 50, err
    finally:
        holder.send_signal(signal.SIGINT)
        stdout, stderr = holder.communicate(timeout=120)
    assert holder.returncode == 130, stderr[-2000:]
    line = _one_line_error(stderr)
    assert (
        "interrupted by SIGINT at step" in line and "resume: diffjax train" in line and stdout == ""
    )
    step = int(line.split("at step ")[1].split(";")[0].split()[0])
    assert (workdir / str(step)).is_dir()  # the checkpoint of the interrupted step
    code, out, err = _main(
        capsys,
        "train",
        "--steps",
        str(step + 2),
        "--workdir",
        str(workdir),
        "--no-figures",
        *TINY,
        *OFF,
    )
    assert code == 0 and out["start_step"] == step and out["steps_run"] == 2, err


def test_exit_statuses_of_interrupts_and_internal_errors():
    from diffjax import train  # noqa: PLC0415

    def interrupted(name):
        return train.TrainingInterrupted(
            "x", step=3, signal=name, workdir=None, saved=False, state=None, history={}
        )

    assert cli._exit_status(interrupted("SIGTERM")) == 143
    assert cli._exit_status(interrupted("SIGINT")) == 130
    assert cli._exit_status(KeyboardInterrupt()) == 130
    try:  # a ValueError raised deep inside a dependency is an internal error (exit 1), not a usage error
        import numpy as np  # noqa: PLC0415

        np.zeros(3).reshape(2)
    except ValueError as e:
        assert cli._exit_status(e) == 1 and "internal error" in cli._message(e, [])
    try:  # one of diffjax's own validation errors is an ordinary problem (exit 2)
        from diffjax_app.config import ExperimentConfig  # noqa: PLC0415

        ExperimentConfig(steps=0)
    except ValueError as e:
        assert cli._exit_status(e) == 2 and "steps=0" in cli._message(e, [])
