"""``run_likelihood``: held-out log-likelihood of a trained run by the probability-flow ODE with the exact
trace (t = 0 noise, t = 1 data; the ODE is integrated from the data back to the noise)."""

from __future__ import annotations

import math
import os
import time

import equinox as eqx
import jax
import numpy as np

from diffjax import conditioning, data as data_lib, solve
from diffjax.fields import integration_interval, velocity_field
from diffjax.likelihood import DEFAULT_ATOL, DEFAULT_RTOL, log_likelihood_with_stats

from .build import held_out, held_out_labels
from .config import DATASETS, check_name
from .errors import NonFiniteError, RunError, notice
from .progress import first_rows, run_chunks
from .workdir import restore, try_write, update_metrics

__all__ = ["run_likelihood"]


def _check_data(data: str, config, workdir: str) -> None:
    check_name("data set", data, DATASETS)
    if (data == "digits") != config.is_image:
        raise RunError(
            f"the model in {workdir} was trained on {config.data!r} and cannot evaluate --data {data} "
            f"(examples of another shape); pass --data {config.data}"
        )
    if data != config.data:
        notice(
            f"the model in {workdir} was trained on {config.data!r}: evaluating it on held-out "
            f"{data!r} points (an out-of-distribution likelihood)"
        )


def _evaluator(run, ll_kwargs: dict):
    """A jitted chunk evaluator returning the ``LikelihoodResult`` of each example: 2-D points as they are,
    integer digits dequantized first, y = 2(k + u)/17 − 1 with one u ~ U[0, 1)^D per image from its key (the
    convention of ``diffjax.likelihood.bits_per_dim(num_levels=17)``), so that every solve's status is checked."""
    kind, path = run.objective.prediction, run.path

    def point(params, x, c):
        net = eqx.Partial(run.apply, params)
        if run.config.conditional:  # log p(x | c); c = num_classes: the unconditional model
            net = conditioning.Conditioned(net, c)
        u = velocity_field(net, kind, path)
        return log_likelihood_with_stats(u, path, x, **ll_kwargs)

    if run.config.is_image:
        dequant = lambda k, key: data_lib.digits_to_model_space(k, key)
        return jax.jit(
            lambda params, ks, keys, cs: jax.vmap(
                lambda k, key, c: point(params, dequant(k, key), c)
            )(ks, keys, cs)
        )
    return jax.jit(
        lambda params, xb, keys, cs: jax.vmap(lambda x, c: point(params, x, c))(xb, cs)
    )


def _evaluate(eval_chunk, run, xs, keys, classes, chunk: int, progress: bool):
    """log p (nats, of the dequantized point for digits) and NFE per example; each solve's status is checked
    on the host, so a failure is reported with its cause (NaN input, NaN field at a time, max_steps)."""

    def check(out, m):
        solve.raise_if_failed(
            first_rows(out.status, m), dict(out.messages), t_fail=first_rows(out.t_fail, m)
        )
        return first_rows(out.log_prob, m), first_rows(out.nfe, m)

    fn = lambda xb, kb, cb: eval_chunk(run.ema_params, xb, kb, cb)
    outs, _ = run_chunks(fn, (xs, keys, classes), chunk, "likelihood", progress, check)
    v = np.concatenate([o for o, _ in outs]).astype(np.float64)
    if not np.all(np.isfinite(v)):
        raise NonFiniteError(
            "the log-likelihoods contain NaN/inf: an ODE solve failed (raise max_steps or loosen --rtol/--atol)"
        )
    return v, np.concatenate([n for _, n in outs])


def _true_conditional_nll(xs, classes) -> float:
    """Mean −log p(x | c) of 8gaussians points under their own centre: N(x; centre_c, s² I), s = 0.25."""
    x = np.asarray(xs, np.float64)
    mu = np.asarray(data_lib.eight_gaussians_centers(), np.float64)[np.asarray(classes)]
    s2 = data_lib.EIGHT_GAUSSIANS_STD**2
    return float(np.mean(np.sum((x - mu) ** 2, -1) / (2 * s2) + np.log(2 * np.pi * s2)))


def _bits_per_dim(log_p: np.ndarray, shape) -> np.ndarray:
    """bpd = −(log p(y) + D·log(2/17)) / (D·ln 2) for dequantized 17-level digits (``diffjax.data``)."""
    d = int(np.prod(shape))
    return -(log_p + d * data_lib.dequantization_log_volume()) / (d * math.log(2.0))


def run_likelihood(
    workdir,
    data: str | None = None,
    n: int | None = None,
    *,
    seed: int = 0,
    rtol: float | None = None,
    atol: float | None = None,
    num_steps: int | None = None,
    chunk: int | None = None,
    progress: bool = True,
) -> dict:
    """Held-out log-likelihood of the EMA model by the probability-flow ODE with the exact trace.

    2-D data: mean NLL in nats of ``n`` held-out points (``diffjax.likelihood.log_likelihood_with_stats``,
    ``trace="exact"``: log p_{t1}(x) = log p_{t0}(X_{t0}) − ∫ ∇·u dt, t = 0 noise, t = 1 data). Digits: bits/dim
    of the first ``n`` test images with one uniform dequantization each, with the 17-level convention of
    ``diffjax.data`` (y = 2(k + u)/17 − 1; ``diffjax.likelihood.bits_per_dim(num_levels=17)``). Paths that stop
    before clean data (VP: t1 = 1 − 1e-5; VE/EDM: σ_{t1} > 0; data models on the linear and cosine paths:
    t1 = 1 − 1e-3, see :func:`diffjax.fields.integration_interval`) give the density of the slightly perturbed data
    (no endpoint correction). Evaluating another data set than the run's is reported in one line. Writes the
    ``likelihood`` section of ``metrics.json`` (on a read-only workdir: returned with one-line ``warnings``).

    A class-conditional run gives the conditional log p(x | c) with each held-out example's own label
    (``condition`` = "labels"); on another data set than the run's, which has no labels for it, the
    unconditional model (the null label; ``condition`` = "null").
    """
    from .metrics import true_nll  # noqa: PLC0415

    rtol = DEFAULT_RTOL if rtol is None else rtol
    atol = DEFAULT_ATOL if atol is None else atol
    run = restore(workdir)
    workdir = os.path.abspath(os.fspath(workdir))
    data = run.config.data if data is None else data
    _check_data(data, run.config, workdir)
    t0, t1 = (float(v) for v in integration_interval(run.path, run.objective.prediction))
    ll_kwargs = dict(
        solver="tsit5", rtol=rtol, atol=atol, time="linear", num_steps=num_steps, t0=t0, t1=t1,
        throw=False,
    )
    xs = held_out(data, n)
    condition = None
    classes = np.zeros(len(xs), np.int32)
    if run.config.conditional:
        if data == run.config.data:
            condition, classes = "labels", np.asarray(held_out_labels(data, n), np.int32)
        else:
            condition, classes = "null", np.full(len(xs), run.config.num_classes, np.int32)
    chunk = min(chunk or (50 if run.config.is_image else 500), len(xs))
    keys = jax.random.split(jax.random.key(seed), len(xs))
    tic = time.perf_counter()
    v, nfe = _evaluate(_evaluator(run, ll_kwargs), run, xs, keys, classes, chunk, progress)
    wall = time.perf_counter() - tic
    if run.config.is_image:
        v = _bits_per_dim(v, run.config.shape)
    se = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    result = {
        "data": data,
        "trained_on": run.config.data,
        "objective": run.config.objective,
        "path": run.config.path_name,
        "step": run.step,
        "n": int(len(xs)),
        **({"condition": condition} if condition else {}),
        "trace": "exact",
        "solver": "tsit5 (adaptive)" if num_steps is None else f"tsit5, {num_steps} fixed steps",
        "rtol": rtol,
        "atol": atol,
        "time": ll_kwargs["time"],
        "norm": "log_density",  # diffjax's default error norm (the runner passes none)
        "t0": t0,
        "t1": t1,
        "likelihood_wall_s": wall,
    }
    if run.config.is_image:
        result.update(
            bits_per_dim=float(np.mean(v)), bits_per_dim_se=se, nfe_mean=float(np.mean(nfe))
        )
    else:
        result.update(
            nll=float(np.mean(-v)),
            nll_se=se,
            nfe_mean=float(np.mean(nfe)),
            true_nll=(
                _true_conditional_nll(xs, classes) if condition == "labels" else true_nll(data, xs)
            ),
        )
    warnings: list[str] = []
    try_write(lambda: update_metrics(workdir, "likelihood", result), "metrics.json", warnings)
    result["warnings"] = warnings
    return result
