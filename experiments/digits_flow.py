"""Normalizing-flow baseline for ``experiments/digits.py``: a flowjax spline flow trained for a wall-clock budget.

The flow is a density on the same model space as the diffusion model, y = 2(k + u)/17 − 1 with uniform
dequantization u (fresh for every training batch), so its bits/dim use the same convention:
bpd = −(E_u[log p(y)] + D·log(2/17))/(D ln 2) (``diffjax.data.dequantization_log_volume``).

Default architecture: a masked autoregressive flow (Papamakarios et al. 2017) whose transformers are
rational-quadratic splines (Durkan et al. 2019, "Neural Spline Flows") on [−4, 4], 4 layers, MADE width 64
(chosen by validation NLL among widths 64/128/256, 4 or 8 layers, coupling vs autoregressive, weight decay and
learning rate: every variant overfits the 1347 training images within ~1000 steps, so model selection matters
more than the time budget; see experiments/README.md).
Training: Adam, maximum likelihood, a validation split held out of the *training* images, and the parameters
with the best validation NLL are the ones evaluated (early stopping by wall time, not by test data).

Needs ``flowjax`` (``pip install -e ".[experiments]"``).
"""

from __future__ import annotations

import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from diffjax import data as data_lib

ARCHS = ("maf_spline", "coupling_spline", "maf_affine")


def build_flow(
    key, dim: int, arch: str = "maf_spline", *, flow_layers: int = 4, nn_width: int = 64
):
    """A flowjax distribution on R^dim with a standard normal base."""
    from flowjax import bijections, distributions, flows  # noqa: PLC0415

    base = distributions.Normal(jnp.zeros(dim))
    spline = bijections.RationalQuadraticSpline(knots=8, interval=4.0)
    if arch == "maf_spline":
        return flows.masked_autoregressive_flow(
            key, base_dist=base, transformer=spline, flow_layers=flow_layers, nn_width=nn_width
        )
    if arch == "coupling_spline":
        return flows.coupling_flow(
            key,
            base_dist=base,
            transformer=spline,
            flow_layers=2 * flow_layers,
            nn_width=nn_width,
            nn_depth=2,
        )
    if arch == "maf_affine":
        return flows.masked_autoregressive_flow(
            key, base_dist=base, flow_layers=2 * flow_layers, nn_width=nn_width
        )
    raise ValueError(f"unknown flow architecture {arch!r}; choose one of {', '.join(ARCHS)}")


def flow_bits_per_dim(
    train_k,
    test_k,
    key,
    *,
    seconds: float,
    arch: str = "maf_spline",
    flow_layers: int = 4,
    nn_width: int = 64,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    val_size: int = 150,
    eval_every: int = 50,
    num_dequant: int = 4,
    max_steps: int | None = None,
) -> dict:
    """Train a flow on dequantized ``train_k`` for ``seconds`` of wall time; return its test bits/dim.

    ``val_size`` training images are held out for model selection; the test images are used once, at the end,
    averaged over ``num_dequant`` dequantization draws. The budget counts compilation and validation too;
    training also stops after ``max_steps`` steps (rounded up to a multiple of ``eval_every``) when given.
    """
    import paramax  # noqa: PLC0415

    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    train_k, test_k = jnp.asarray(train_k), jnp.asarray(test_k)
    if val_size >= train_k.shape[0]:
        raise ValueError(f"val_size={val_size} leaves no training images (have {train_k.shape[0]})")
    d = int(np.prod(train_k.shape[1:]))
    k_init, k_split, k_train, k_val, k_test = jax.random.split(key, 5)
    perm = jax.random.permutation(k_split, train_k.shape[0])
    val_k = train_k[perm[:val_size]].reshape(val_size, d)
    fit_k = train_k[perm[val_size:]].reshape(-1, d)
    tic = time.perf_counter()
    dist = build_flow(k_init, d, arch, flow_layers=flow_layers, nn_width=nn_width)
    params, static = eqx.partition(
        dist, eqx.is_inexact_array, is_leaf=lambda x: isinstance(x, paramax.NonTrainable)
    )
    opt = optax.adamw(lr, weight_decay=weight_decay) if weight_decay else optax.adam(lr)
    opt_state = opt.init(params)

    def nll(params, y):
        return -jnp.mean(paramax.unwrap(eqx.combine(params, static)).log_prob(y))

    @jax.jit
    def train_chunk(params, opt_state, key):
        def body(carry, k):
            params, opt_state = carry
            kb, kq = jax.random.split(k)
            idx = jax.random.randint(kb, (batch_size,), 0, fit_k.shape[0])
            y = data_lib.digits_to_model_space(fit_k[idx], kq)
            loss, g = jax.value_and_grad(nll)(params, y)
            up, opt_state = opt.update(g, opt_state, params)
            return (optax.apply_updates(params, up), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            body, (params, opt_state), jax.random.split(key, eval_every)
        )
        return params, opt_state, jnp.mean(losses)

    @jax.jit
    def mean_nll(params, k, key):
        ys = jax.vmap(lambda kk: data_lib.digits_to_model_space(k, kk))(
            jax.random.split(key, num_dequant)
        )
        return nll(params, ys.reshape(-1, d))

    best, best_val, best_step, steps, history = params, math.inf, 0, 0, []
    while time.perf_counter() - tic < seconds and (max_steps is None or steps < max_steps):
        k_train, sub = jax.random.split(k_train)
        params, opt_state, loss = train_chunk(params, opt_state, sub)
        steps += eval_every
        v = float(mean_nll(params, val_k, k_val))
        if not math.isfinite(v):
            raise FloatingPointError(f"flow baseline: validation NLL is {v} at step {steps}")
        history.append({"step": steps, "train_nll": float(loss), "val_nll": v})
        if v < best_val:
            best, best_val, best_step = params, v, steps
    wall = time.perf_counter() - tic
    test_nll = float(mean_nll(best, test_k.reshape(len(test_k), d), k_test))
    bpd = (test_nll - d * data_lib.dequantization_log_volume()) / (d * math.log(2.0))
    return {
        "arch": arch,
        "flow_layers": flow_layers,
        "nn_width": nn_width,
        "bits_per_dim": bpd,
        "steps": steps,
        "train_wall_s": wall,
        "best_val_nll": best_val,
        "best_step": best_step,
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(best))),
        "history": history,
    }
