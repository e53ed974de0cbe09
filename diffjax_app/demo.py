"""``diffjax demo``: flow matching on the checkerboard end to end — train, sample, likelihood (t = 0 noise,
t = 1 data). Over an existing demo it reuses the trained model when the settings are the same and refuses
other settings (``--fresh`` retrains), so the reported numbers are always those of the settings asked for."""

from __future__ import annotations

import os
import shutil
import time

from .config import ExperimentConfig
from .errors import RunError, notice
from .workdir import EXPERIMENT_FILE, METRICS_FILE, has_checkpoint, load_config, read_config_file

__all__ = ["run_demo", "demo_config"]


def demo_config(steps: int, batch_size: int) -> ExperimentConfig:
    return ExperimentConfig(
        data="checkerboard",
        objective="fm",
        steps=steps,
        batch_size=batch_size,
        lr=2e-3,
        warmup=100,
        ema_decay=0.995,
    )


def _is_demo(stored: ExperimentConfig, config: ExperimentConfig) -> bool:
    """Whether ``stored`` is a demo run (the demo's settings but for steps and batch size)."""
    return not stored.differences(config.resolved(), ignore=("steps", "batch_size"))


def _delete_run(workdir: str) -> None:
    """Delete a run's files but the lock file this process holds (a second writer stays locked out)."""
    from diffjax import checkpoint as ckpt  # noqa: PLC0415

    for name in os.listdir(workdir):
        if name == ckpt.LOCK_FILE:
            continue
        path = os.path.join(workdir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def _prepare(workdir: str, config: ExperimentConfig, fresh: bool) -> None:
    """Under the workdir's lock: --fresh deletes a previous demo (only a demo); otherwise reuse a demo of the
    same settings, refuse one of other settings."""
    exists = os.path.exists(os.path.join(workdir, EXPERIMENT_FILE))
    if fresh and os.path.isdir(workdir) and os.listdir(workdir):
        if not exists or not _is_demo(read_config_file(workdir), config):
            raise RunError(
                f"--fresh: {workdir} does not hold a diffjax demo (another run, or not a diffjax run); "
                "not deleting it: pass another --workdir"
            )
        _delete_run(workdir)
        return
    if not (exists and has_checkpoint(workdir)):
        return
    diff = load_config(workdir).differences(config.resolved(), ignore=())
    if diff:
        items = "; ".join(f"{k}: workdir={a!r} vs now={b!r}" for k, (a, b) in diff.items())
        raise RunError(
            f"{workdir} holds a demo with other settings ({items}); pass --fresh to retrain it, or another "
            "--workdir"
        )
    notice(
        f"reusing the trained demo in {workdir} ({config.steps} steps; --fresh retrains it)",
        prefix="diffjax demo",
    )


def run_demo(args, t_start: float, progress: bool) -> dict:
    """Train (or reuse), sample and evaluate the demo; returns the JSON line's dict."""
    from diffjax import checkpoint as ckpt  # noqa: PLC0415

    from .likelihood_runner import run_likelihood  # noqa: PLC0415
    from .sample_runner import run_sample  # noqa: PLC0415
    from .train_runner import run_train  # noqa: PLC0415
    from .workdir import make_run_dir  # noqa: PLC0415

    workdir = make_run_dir(args.workdir)
    config = demo_config(args.steps, args.batch_size)
    log = lambda msg: notice(msg, prefix="[diffjax demo]")
    with ckpt.workdir_lock(workdir):  # held from the check (and --fresh's delete) through training
        _prepare(workdir, config, args.fresh)
        log(f"training flow matching on the checkerboard for {args.steps} steps into {workdir}")
        tr = run_train(
            config, workdir, checkpoint_every=args.steps, progress=progress, t_start=t_start
        )
    log(f"sampling {args.n} points with the adaptive probability-flow ODE")
    sa = run_sample(workdir, args.n, progress=progress)
    log(f"held-out negative log-likelihood of {args.n_test} points (exact trace)")
    li = run_likelihood(workdir, "checkerboard", args.n_test, progress=progress)
    wall = time.perf_counter() - t_start
    files = {
        "metrics": os.path.join(workdir, METRICS_FILE),
        **sa.get("figures", {}),
        **tr.get("figures", {}),
    }
    log(
        f"done in {wall:.0f} s: held-out NLL {li['nll']:.3f} ± {li['nll_se']:.3f} nats (true density: "
        f"{li['true_nll']:.3f}); {sa.get('support_fraction', float('nan')):.1%} of the samples inside the "
        f"squares; MMD two-sample p = {sa.get('mmd_p_value', float('nan')):.2f}"
    )
    for name, path in files.items():
        log(f"  {name:13s} {path}")
    keys = ("energy_distance", "energy_distance_floor", "mmd_rbf", "mmd_rbf_floor", "mmd_p_value",
            "support_fraction", "support_fraction_se", "power_vs_blur", "power_vs_off_support")  # fmt: skip
    return {
        "command": "demo",
        "workdir": workdir,
        "steps": tr["step"],
        "final_loss": tr["final_loss"],
        "train_wall_s": tr["train_wall_s"],
        "time_to_first_step_s": tr["time_to_first_step_s"],
        "nll": li["nll"],
        "nll_se": li["nll_se"],
        "true_nll": li["true_nll"],
        **{k: sa[k] for k in keys if k in sa},
        "wall_s": wall,
        "files": files,
        "warnings": sa.get("warnings", []) + li.get("warnings", []),
    }
