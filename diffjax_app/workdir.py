"""The files of one run, and restoring its model (t = 0 is noise, t = 1 is data).

One run lives in one *workdir*::

    workdir/
      experiment.json      the ExperimentConfig (what to rebuild the model, path and objective from)
      <step>/              orbax checkpoints of the TrainState (diffjax.train.fit; verified, resumed automatically)
      config.json          the config guarded by the checkpoints (written by diffjax.checkpoint)
      .diffjax.lock        held by the one process that trains into the workdir (diffjax.checkpoint.workdir_lock)
      metrics.json         {"config", "train", "sample", "likelihood"}: loss curve, timings, NLL / bits/dim,
                           sample quality (diffjax_app.metrics)
      samples.npy, loss.png, samples.png, trajectories.png

Readers (sampling, likelihood) never lock and never write a checkpoint: they work while a run trains, and on a
read-only workdir (their results are then printed, not stored, with a one-line notice).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any, NamedTuple

from .config import ExperimentConfig
from .errors import NoCheckpointError, RunError, describe_os_error, notice

__all__ = [
    "EXPERIMENT_FILE",
    "METRICS_FILE",
    "RestoredRun",
    "check_run_dir",
    "make_run_dir",
    "steps_in",
    "has_checkpoint",
    "latest_step",
    "load_config",
    "read_config_file",
    "write_json",
    "read_metrics",
    "update_metrics",
    "try_write",
    "restore",
]

EXPERIMENT_FILE = "experiment.json"
METRICS_FILE = "metrics.json"
_METRICS_LOCK = ".metrics.lock"


def check_run_dir(workdir) -> str:
    """The absolute path of an existing run directory; a one-line ``RunError`` otherwise (for readers)."""
    workdir = os.path.abspath(os.fspath(workdir))
    if os.path.isfile(workdir):
        raise RunError(
            f"--workdir {workdir} is a file, not a run directory; pass the run's directory"
        )
    if not os.path.isdir(workdir):
        raise NoCheckpointError(
            f"{workdir} does not exist; train into it first (diffjax train --workdir {workdir} ...)"
        )
    return workdir


def make_run_dir(workdir) -> str:
    """Create (if needed) the run directory of a writer and check that it can be written into."""
    workdir = os.path.abspath(os.fspath(workdir))
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise RunError(f"--workdir {workdir} is a file, not a directory; pass a directory path")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise RunError(
            f"cannot write into --workdir {workdir} ({describe_os_error(e)}); "
            "pass a directory you can write to"
        ) from e
    return workdir


def steps_in(workdir) -> list[int]:
    """The checkpoint steps in ``workdir`` (directories named by their step; integrity is not checked)."""
    workdir = os.fspath(workdir)
    if not os.path.isdir(workdir):
        return []
    return sorted(
        int(n)
        for n in os.listdir(workdir)
        if n.isdigit() and os.path.isdir(os.path.join(workdir, n))
    )


def has_checkpoint(workdir) -> bool:
    """Whether ``workdir`` holds a checkpoint directory (named by its step; integrity is checked on restore)."""
    return bool(steps_in(workdir))


def latest_step(workdir) -> int:
    """The largest checkpoint step in ``workdir`` (0 if none)."""
    steps = steps_in(workdir)
    return steps[-1] if steps else 0


def load_config(workdir) -> ExperimentConfig:
    """The ExperimentConfig stored in ``workdir``; one-line errors for each way it can be missing."""
    workdir = check_run_dir(workdir)
    path = os.path.join(workdir, EXPERIMENT_FILE)
    if not has_checkpoint(workdir):
        raise NoCheckpointError(
            f"no checkpoint in {workdir}; train first (diffjax train --workdir {workdir} ...)"
        )
    if not os.path.exists(path):
        raise RunError(
            f"{workdir} holds checkpoints but no {EXPERIMENT_FILE} (deleted, or written by "
            "diffjax.train.fit directly): restore the file, or load the checkpoint with diffjax.checkpoint"
        )
    return read_config_file(workdir)


def read_config_file(workdir) -> ExperimentConfig:
    """``workdir/experiment.json`` as an ExperimentConfig (whether or not checkpoints exist)."""
    path = os.path.join(os.fspath(workdir), EXPERIMENT_FILE)
    try:
        with open(path) as f:
            return ExperimentConfig.from_dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise RunError(f"cannot read {path}: {' '.join(str(e).split())}") from e


def write_json(path: str, obj) -> None:
    """Write ``obj`` as JSON atomically (a temporary file renamed over ``path``)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_metrics(workdir) -> dict:
    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        notice(f"{path} is not valid JSON; starting it afresh")
        return {}


@contextlib.contextmanager
def _metrics_lock(workdir: str):
    """Serialise read-modify-write of metrics.json between a trainer and readers (blocking flock)."""
    import fcntl  # noqa: PLC0415

    with open(os.path.join(workdir, _METRICS_LOCK), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def update_metrics(workdir, section: str, values: dict, **more: dict) -> dict:
    """Store ``values`` as ``metrics.json[section]`` (and ``more`` as further sections); others are kept."""
    workdir = os.fspath(workdir)
    with _metrics_lock(workdir):
        metrics = read_metrics(workdir)
        metrics[section] = values
        metrics.update(more)
        write_json(os.path.join(workdir, METRICS_FILE), metrics)
    return metrics


def try_write(write: Callable[[], Any], what: str, warnings: list[str]) -> Any:
    """Run ``write()``; on an ``OSError`` (read-only workdir, full disk) note it in one line and go on.

    The notice is also appended to ``warnings`` (the runner's result carries them), so results computed at
    length are always reported even when they cannot be stored. Returns ``write()``'s value, or None.
    """
    try:
        return write()
    except OSError as e:
        msg = f"could not write {what} ({describe_os_error(e)}); the results are printed but not stored"
        notice(msg)
        warnings.append(msg)
        return None


class RestoredRun(NamedTuple):
    """A trained run read back: its config, model (``apply``, EMA parameters), objective, path and step."""

    config: ExperimentConfig
    apply: Callable
    ema_params: Any
    objective: Any
    path: Any
    step: int


def restore(workdir) -> RestoredRun:
    """The latest intact checkpoint of ``workdir`` (a damaged newer one is reported and skipped), read-only.

    Raises ``ValueError`` if the checkpoint was written under another config than ``experiment.json`` states.
    """
    import jax  # noqa: PLC0415

    from diffjax import checkpoint as ckpt, train  # noqa: PLC0415

    from .build import build_model  # noqa: PLC0415

    workdir = check_run_dir(workdir)
    config = load_config(workdir)
    apply, params, objective, path = build_model(config)
    tc = config.train_config()
    optimizer = train.make_optimizer(tc)
    abstract = jax.eval_shape(
        lambda: train.init_state(params, optimizer, jax.random.key(config.seed))
    )
    # The checkpoint must have been written by this config (experiment.json can be edited, and runs written by
    # older versions lack newer keys such as exp_time_scale): the model would otherwise differ silently.
    guarded = {**tc.to_dict(), **config.guarded_config()}
    restored = ckpt.restore_latest(workdir, abstract, guarded, ignore=("total_steps",))
    if restored is None:
        raise NoCheckpointError(
            f"no checkpoint in {workdir}; train first (diffjax train --workdir {workdir} ...)"
        )
    state, step = restored[0], restored[1]  # diffjax.checkpoint.Restored(state, step, meta)
    return RestoredRun(config, apply, state.ema_params, objective, path, int(step))
