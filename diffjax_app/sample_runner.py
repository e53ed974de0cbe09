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

from diffjax import data as data_lib, solve
from diffjax.fields import integration_interval, velocity_field
from diffjax.sampling import sample_ode

from .build import held_out
from .errors import NonFiniteError
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


def _sampler(run, kw: dict, save_ts):
    @functools.partial(jax.jit, static_argnums=2)
    def sample_chunk(params, keys, with_trajectory=False):
        # diffrax checks SaveAt(ts) with a host callback, which keeps a program out of the persistent
        # cache: the samples come from a program without it, the plotted trajectories from a second one
        u = velocity_field(eqx.Partial(run.apply, params), run.objective.prediction, run.path)
        extra = dict(save_ts=save_ts) if with_trajectory else {}
        return jax.vmap(lambda k: sample_ode(u, run.path, k, **kw, **extra))(keys)

    return sample_chunk


def _draw(sample_chunk, ema, keys, chunk: int, progress: bool):
    def check(r, m):
        solve.raise_if_failed(
            first_rows(r.status, m), dict(r.messages), t_fail=first_rows(r.t_fail, m)
        )
        return first_rows(r.samples, m), first_rows(r.nfe, m)

    tic = time.perf_counter()
    outs, first = run_chunks(
        lambda k: sample_chunk(ema, k), (keys,), chunk, "sample", progress, check
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
) -> dict:
    """Draw ``n`` samples with the EMA parameters by the probability-flow ODE (noise t0 → data t1).

    The model (any prediction kind) becomes a velocity with ``diffjax.fields.velocity_field``; each sample is
    one adaptive ``diffjax.sampling.sample_ode`` solve (Tsit5, rtol/atol), vmapped over keys in chunks; with
    ``num_steps`` a fixed Heun grid instead. Sample quality: ``diffjax_app.metrics.sample_quality`` against
    held-out data. Writes ``samples.npy``, ``samples.png``, ``trajectories.png`` and the ``sample`` section of
    ``metrics.json``; on a read-only workdir the result is returned with one-line ``warnings`` instead.
    """
    from .metrics import sample_quality  # noqa: PLC0415

    if n < 1:
        raise ValueError(f"run_sample: n={n} must be >= 1")
    rtol, atol = (1e-5 if v is None else v for v in (rtol, atol))
    run = restore(workdir)
    workdir = os.path.abspath(os.fspath(workdir))
    t0, t1 = (float(v) for v in integration_interval(run.path, run.objective.prediction))
    chunk = min(chunk or (64 if run.config.is_image else 500), n)
    save_ts = jnp.linspace(t0, t1, 21)
    kw = dict(
        shape=run.config.shape, t0=t0, t1=t1, rtol=rtol, atol=atol, num_steps=num_steps, throw=False
    )
    sample_chunk = _sampler(run, kw, save_ts)
    keys = jax.random.split(jax.random.key(seed), n)
    samples, nfe, wall, first = _draw(sample_chunk, run.ema_params, keys, chunk, progress)
    warnings: list[str] = []
    try_write(
        lambda: np.save(os.path.join(workdir, "samples.npy"), samples), "samples.npy", warnings
    )
    ref_x, floor_x = reference_sets(run.config, n)
    quality = sample_quality(
        samples, ref_x, floor_x, data_name=run.config.data, key=jax.random.key(seed + 1)
    )
    result = {
        "data": run.config.data,
        "objective": run.config.objective,
        "step": run.step,
        "n": n,
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
        traj = np.asarray(sample_chunk(run.ema_params, keys[:num_trajectories], True).trajectory)
        result["figures"] = _figures(run, samples, ref_x, traj, save_ts, workdir, warnings)
    try_write(lambda: update_metrics(workdir, "sample", result), "metrics.json", warnings)
    result["warnings"] = warnings
    return result
