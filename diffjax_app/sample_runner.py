"""``run_sample``: samples of a trained run by the probability-flow ODE, noise (t0) → data (t1), and their
quality against held-out data (``diffjax_app.metrics``)."""

from __future__ import annotations

import functools
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from diffjax import conditioning, data as data_lib, guidance as guidance_lib, solve
from diffjax.fields import integration_interval, velocity_field
from diffjax.sampling import sample_ode

from .build import held_out, held_out_labels
from .config import DATA_CLASSES
from .errors import NonFiniteError, RunError
from .progress import first_rows, run_chunks
from .workdir import restore, try_write, update_metrics

__all__ = ["run_sample", "reference_sets"]


def reference_sets(config, n: int):
    """(held-out data, an independent second held-out set) in model space, for the sample-quality metrics."""
    if config.is_image:
        ref = held_out("digits")
        ref_x = np.asarray(data_lib.digits_to_model_space(ref, jax.random.key(1)))
        floor = held_out("digits", len(ref_x), reference=True)
        return ref_x, np.asarray(data_lib.digits_to_model_space(floor, jax.random.key(2)))
    return np.asarray(held_out(config.data, n)), np.asarray(
        held_out(config.data, n, reference=True)
    )


def class_reference_sets(config, n: int, cls: int):
    """:func:`reference_sets` restricted to the examples of class ``cls`` (data sets with classes)."""
    ref_x, floor_x = reference_sets(config, n)
    keep = held_out_labels(config.data, len(ref_x)) == cls
    keep_floor = held_out_labels(config.data, len(floor_x), reference=True) == cls
    return ref_x[keep], floor_x[keep_floor]


def _check_condition(run, cls, guidance, workdir) -> tuple[int | None, float]:
    """``(class, guidance weight)`` of a sample run: refused on an unconditional run, checked on a conditional one."""
    k = run.config.num_classes
    if k is None:
        if cls is not None or guidance is not None:
            flag = "--class" if cls is not None else "--guidance"
            raise RunError(
                f"{flag} needs a class-conditional run, but {workdir} is unconditional (train one with "
                f"--conditional on {' or '.join(DATA_CLASSES)})"
            )
        return None, 1.0
    if cls is not None and not 0 <= cls < k:
        raise RunError(
            f"--class {cls} is out of range: the run {workdir} has {k} classes, valid classes are 0..{k - 1}"
        )
    w = 1.0 if guidance is None else float(guidance)
    if not np.isfinite(w):
        raise RunError(f"--guidance {guidance!r} must be a finite number")
    return cls, w


def _sampler(run, kw: dict, save_ts):
    kind, path, k = run.objective.prediction, run.path, run.config.num_classes

    def model(params, c, w):
        net = eqx.Partial(run.apply, params)
        if k is None:
            return net
        if w is None:  # guidance weight 1: the conditional model itself (one network call per step)
            return conditioning.Conditioned(net, c)
        return guidance_lib.CFGModel(net, kind, path, cond=c, null=k, guidance=guidance_lib.CFG(w))

    @functools.partial(jax.jit, static_argnums=(4, 5))
    def sample_chunk(params, keys, classes, w, with_trajectory=False, guided=False):
        # diffrax checks SaveAt(ts) with a host callback, which keeps a program out of the persistent
        # cache: the samples come from a program without it, the plotted trajectories from a second one
        extra = dict(save_ts=save_ts) if with_trajectory else {}

        def one(key, c):
            u = velocity_field(model(params, c, w if guided else None), kind, path)
            return sample_ode(u, path, key, **kw, **extra)

        return jax.vmap(one)(keys, classes)

    return sample_chunk


def _draw(sample_chunk, ema, keys, chunk: int, progress: bool, classes=None, w=1.0, guided=False):
    def check(r, m):
        solve.raise_if_failed(
            first_rows(r.status, m), dict(r.messages), t_fail=first_rows(r.t_fail, m)
        )
        return first_rows(r.samples, m), first_rows(r.nfe, m)

    tic = time.perf_counter()
    classes = np.zeros(len(keys), np.int32) if classes is None else classes
    w = jnp.asarray(w, jnp.result_type(float))
    outs, first = run_chunks(
        lambda k, c: sample_chunk(ema, k, c, w, False, guided),
        (keys, classes),
        chunk,
        "sample",
        progress,
        check,
    )
    wall = time.perf_counter() - tic
    samples = np.concatenate([s for s, _ in outs])
    if not np.all(np.isfinite(samples)):
        raise NonFiniteError(
            "the samples contain NaN/inf: the model diverged (check its training loss)"
        )
    return samples, np.concatenate([nfe for _, nfe in outs]), wall, first


def _figures(run, samples, ref_x, traj, save_ts, workdir, warnings) -> dict:
    from .plots import plot_samples, plot_trajectories  # noqa: PLC0415 (matplotlib)

    out = {}
    f = os.path.join(workdir, "samples.png")
    if try_write(lambda: plot_samples(samples, ref_x, f, run.config), f, warnings):
        out["samples"] = f
    f = os.path.join(workdir, "trajectories.png")
    ts = np.asarray(save_ts)
    if try_write(lambda: plot_trajectories(traj, ts, f, run.config, data=ref_x), f, warnings):
        out["trajectories"] = f
    return out


def run_sample(
    workdir,
    n: int = 1000,
    *,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    num_steps: int | None = None,
    chunk: int | None = None,
    num_trajectories: int = 300,
    progress: bool = True,
    figures: bool = True,
    cls: int | None = None,
    guidance: float | None = None,
) -> dict:
    """Draw ``n`` samples with the EMA parameters by the probability-flow ODE (noise t0 → data t1).

    The model (any prediction kind) becomes a velocity with ``diffjax.fields.velocity_field``; each sample is
    one adaptive ``diffjax.sampling.sample_ode`` solve (Tsit5, rtol/atol), vmapped over keys in chunks; with
    ``num_steps`` a fixed Heun grid instead. Sample quality: ``diffjax_app.metrics.sample_quality`` against
    held-out data. Writes ``samples.npy``, ``samples.png``, ``trajectories.png`` and the ``sample`` section of
    ``metrics.json``; on a read-only workdir the result is returned with one-line ``warnings`` instead.

    A class-conditional run (``num_classes`` K) draws class ``cls`` (0..K−1; None: all classes evenly, sample i
    of class i mod K) with classifier-free guidance weight ``guidance`` (``diffjax.CFGModel`` with ``CFG(w)``,
    null label K; None or 1: the conditional model, 0: the unconditional one). The sample quality of one class is
    measured against that class's held-out examples, without the density-based metrics of the whole data set.
    ``cls`` or ``guidance`` on an unconditional run raise ``RunError``.
    """
    from .metrics import sample_quality  # noqa: PLC0415

    if n < 1:
        raise ValueError(f"run_sample: n={n} must be >= 1")
    rtol, atol = (1e-5 if v is None else v for v in (rtol, atol))
    run = restore(workdir)
    workdir = os.path.abspath(os.fspath(workdir))
    cls, w = _check_condition(run, cls, guidance, workdir)
    guided = run.config.conditional and w != 1.0
    if not run.config.conditional:
        classes = np.zeros(n, np.int32)
    elif cls is None:
        classes = (np.arange(n) % run.config.num_classes).astype(np.int32)
    else:
        classes = np.full(n, cls, np.int32)
    t0, t1 = (float(v) for v in integration_interval(run.path, run.objective.prediction))
    chunk = min(chunk or (64 if run.config.is_image else 500), n)
    save_ts = jnp.linspace(t0, t1, 21)
    kw = dict(
        shape=run.config.shape, t0=t0, t1=t1, rtol=rtol, atol=atol, num_steps=num_steps, throw=False
    )
    sample_chunk = _sampler(run, kw, save_ts)
    keys = jax.random.split(jax.random.key(seed), n)
    samples, nfe, wall, first = _draw(
        sample_chunk, run.ema_params, keys, chunk, progress, classes, w, guided
    )
    warnings: list[str] = []
    try_write(
        lambda: np.save(os.path.join(workdir, "samples.npy"), samples), "samples.npy", warnings
    )
    if cls is None:
        ref_x, floor_x = reference_sets(run.config, n)
        data_name = run.config.data
    else:  # one class: against that class's held-out examples (the data set's density is another's)
        ref_x, floor_x = class_reference_sets(run.config, max(n, 1000), cls)
        data_name = None
    quality = sample_quality(
        samples, ref_x, floor_x, data_name=data_name, key=jax.random.key(seed + 1)
    )
    result = {
        "data": run.config.data,
        "objective": run.config.objective,
        "step": run.step,
        "n": n,
        **(
            {
                "class": cls,
                "classes": "all, evenly (sample i of class i mod K)" if cls is None else [cls],
                "num_classes": run.config.num_classes,
                "guidance": w,
                "quality_against": "all held-out data" if cls is None else f"held-out class {cls}",
            }
            if run.config.conditional
            else {}
        ),
        "solver": "tsit5 (adaptive)" if num_steps is None else f"heun, {num_steps} steps",
        "rtol": rtol,
        "atol": atol,
        "t0": t0,
        "t1": t1,
        "nfe_mean": float(np.mean(nfe)),
        "sample_wall_s": wall,
        "first_chunk_s": first,
        **quality,
    }
    if figures:
        m = min(num_trajectories, n)
        wt = jnp.asarray(w, jnp.result_type(float))
        traj = sample_chunk(run.ema_params, keys[:m], classes[:m], wt, True, guided).trajectory
        traj = np.asarray(traj)
        result["figures"] = _figures(run, samples, ref_x, traj, save_ts, workdir, warnings)
    try_write(lambda: update_metrics(workdir, "sample", result), "metrics.json", warnings)
    result["warnings"] = warnings
    return result
