"""``run_train``: train a config into its workdir with ``diffjax.train.fit`` (t = 0 noise, t = 1 data).

One writer per workdir (``diffjax.checkpoint.workdir_lock``: a second trainer is refused at once, naming the
holder), resumed from the newest intact checkpoint, and never a silent no-op: a ``steps`` below what the workdir
is trained to is refused, an equal one is reported in one line. Ctrl-C / SIGTERM save a checkpoint at the
current step (``diffjax.train.TrainingInterrupted``); a state that turns NaN is never saved
(``diffjax.train.NonFiniteStateError``).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import numpy as np

from diffjax import checkpoint as ckpt, conditioning, losses, train

from .build import build_model, train_batch_fn
from .config import ExperimentConfig
from .errors import NonFiniteError, RunError, notice
from .startup import resume_gc
from .workdir import (
    EXPERIMENT_FILE,
    make_run_dir,
    read_config_file,
    read_metrics,
    steps_in,
    try_write,
    update_metrics,
    write_json,
)

__all__ = ["run_train"]


def _prepare(workdir: str, config: ExperimentConfig) -> int:
    """Refuse a workdir holding another run, or trained further than ``config.steps``; write experiment.json.

    Returns the step the run resumes from (0 for a new run)."""
    trained = _intact_step(workdir)
    if os.path.exists(os.path.join(workdir, EXPERIMENT_FILE)) and steps_in(workdir):
        diff = read_config_file(workdir).differences(config)
        if diff:
            items = "; ".join(f"{k}: workdir={a!r} vs now={b!r}" for k, (a, b) in diff.items())
            raise RunError(
                f"{workdir} holds a run with another config ({items}); use a new --workdir or the same flags"
            )
    if trained > config.steps:
        raise RunError(
            f"{workdir} is already trained to {trained} steps, more than --steps {config.steps}: pass "
            f"--steps {trained} or more (more continues training); sample and likelihood use it as it is"
        )
    if trained == config.steps:
        notice(
            f"{workdir} is already trained to {trained} steps: nothing to train (a larger --steps continues)"
        )
    elif trained:
        notice(f"resuming {workdir} from step {trained} to {config.steps}")
    if jax.process_index() == 0:  # one writer of the shared workdir's files in a multi-process job
        write_json(os.path.join(workdir, EXPERIMENT_FILE), config.to_dict())
    return trained


def _intact_step(workdir: str) -> int:
    """The newest checkpoint step that verifies (0 if none): a damaged newer one is left to ``fit``, which
    reports it in one line, moves it aside and resumes from this one."""
    for step in sorted(steps_in(workdir), reverse=True):
        if ckpt.verify_step(workdir, step) is None:
            return step
    return 0


def _first_step_timer(batch_fn, t_start: float, first_dispatch: int = 1):
    """``batch_fn`` that records the time of its call for the second dispatch (call n + 1 for a first dispatch of
    n steps: it is then compiled and running), and then ends the CLI's garbage-collector pause of the start-up
    (:mod:`diffjax_app.startup`)."""
    first: dict[str, float] = {}
    calls = [0]

    def timed(s):
        calls[0] += 1
        if calls[0] == first_dispatch + 1:
            first["t"] = time.perf_counter() - t_start
            resume_gc()
        return batch_fn(s)

    return timed, first


def _result(config, objective, params, state, history, start_step, wall, first) -> dict:
    step = int(state.step)
    ran = step - start_step
    return {
        "data": config.data,
        "objective": config.objective,
        "path": config.path_name,
        "prediction": objective.prediction.name,
        "num_classes": config.num_classes,
        "cond_dropout": config.cond_dropout,
        "start_step": start_step,
        "step": step,
        "steps_run": ran,
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "history": history,
        "train_wall_s": wall,
        "steps_per_s": ran / wall if ran and wall > 0 else None,
        "time_to_first_step_s": first.get("t"),
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }


def run_train(
    config: ExperimentConfig,
    workdir,
    *,
    checkpoint_every: int = 1000,
    log_every: int | None = None,
    steps_per_dispatch: int = 1,
    progress: bool = True,
    figures: bool = True,
    t_start: float | None = None,
) -> dict:
    """Train ``config`` into ``workdir`` with ``diffjax.train.fit``, resuming from its newest intact checkpoint.

    A workdir trained to s steps and run again with ``steps`` = N > s continues from step s (the cosine decay is
    re-planned over N steps; the first s steps are those of the earlier run). A workdir written with another
    config, or trained beyond N, raises ``RunError`` naming the difference.

    ``t_start`` (a ``time.perf_counter()`` value, default: now) is the origin of the reported
    ``time_to_first_step_s`` (the CLI passes the process start, so it covers imports and compilation). A run
    that is already complete trains nothing (``steps_run`` = 0) and reports the timing of the run that trained
    it, with ``timing_from_earlier_run`` = True. ``steps_per_dispatch`` = K runs K optimizer steps per jitted
    dispatch (``diffjax.train.fit``; the trained state is bit-identical for every K, so K is not part of the
    run's config and a run may be resumed with another K). Returns the ``train`` section of ``metrics.json``.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    train.initialize_distributed()  # multi-process jobs: before any device is used (idempotent; the CLI did it)
    workdir = make_run_dir(workdir)
    with ckpt.workdir_lock(workdir):  # first: a second writer is refused before any other work
        config = config.resolved()
        start_step = _prepare(workdir, config)
        apply, params, objective, _ = build_model(config)
        log_every = log_every or max(1, min(100, config.steps // 100))
        # fit's first dispatch after start_step (it ends at the first log point, checkpoint or the end)
        n1 = 1
        if start_step < config.steps:
            n1 = train._dispatch_length(
                start_step, config.steps, steps_per_dispatch, log_every, checkpoint_every
            )
        batch_fn, first = _first_step_timer(train_batch_fn(config), t_start, n1)
        loss_fn = None
        if (
            config.conditional
        ):  # (xs, labels) batches; a label becomes the null label w.p. cond_dropout
            dropout = conditioning.ClassDropout(config.num_classes, config.cond_dropout)
            loss_fn = functools.partial(losses.conditional_batch_loss, dropout=dropout)
        t0 = time.perf_counter()
        state, history = train.fit(
            apply,
            params,
            objective,
            batch_fn,
            config.train_config(),
            workdir=workdir,
            checkpoint_every=checkpoint_every,
            log_every=log_every,
            steps_per_dispatch=steps_per_dispatch,
            progress=progress,
            loss_fn=loss_fn,
            extra_config=config.guarded_config(),
        )
        jax.block_until_ready(state.params)
        wall = time.perf_counter() - t0
        if not np.all(np.isfinite(np.asarray(history["loss"], np.float64))):
            raise NonFiniteError(
                "the training losses contain NaN/inf: lower --lr or check the data"
            )
        result = _result(config, objective, params, state, history, start_step, wall, first)
        _keep_earlier_timing(result, read_metrics(workdir).get("train") or {})
        if jax.process_index() != 0:  # the other processes of a multi-process job: process 0 writes
            return result
        update_metrics(workdir, "train", result, config=config.to_dict())
        if figures and history["loss"]:
            from .plots import plot_loss  # noqa: PLC0415 (matplotlib)

            out = os.path.join(workdir, "loss.png")
            warnings: list[str] = []
            if try_write(lambda: plot_loss(history, out, config), out, warnings):
                result["figures"] = {"loss": out}
                update_metrics(workdir, "train", result)
    return result


def _keep_earlier_timing(result: dict, prev: dict) -> None:
    """A complete run trains nothing: keep the timing of the run that did the training, and say so."""
    if result["steps_run"] == 0 and prev.get("step") == result["step"] and prev.get("train_wall_s"):
        for k in ("train_wall_s", "steps_per_s", "time_to_first_step_s"):
            result[k] = prev.get(k)
        result["timing_from_earlier_run"] = True
