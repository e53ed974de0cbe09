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

Progress: one line on stderr after the first chunk (which includes compilation) and then every ``log_every``
steps, with the step, the training and validation NLL, the best validation NLL so far and the elapsed time
against the budget (``progress=False`` or ``--no-progress``: silent).

Needs ``flowjax`` (``pip install -e ".[experiments]"``). Standalone (prints one JSON line)::

    python experiments/digits_flow.py --seconds 60
    python experiments/digits_flow.py --quick      # 5 s, 2 layers, 20 test images
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from diffjax import data as data_lib  # noqa: E402

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
    test_dequant: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    log_every: int = 500,
) -> dict:
    """Train a flow on dequantized ``train_k`` for ``seconds`` of wall time; return its test bits/dim.

    ``val_size`` training images are held out for model selection (validation NLL averaged over
    ``num_dequant`` dequantization draws); the test images are used once, at the end, with ``test_dequant``
    draws per image (default ``num_dequant``; ``experiments/digits.py`` passes 1, the diffusion model's
    convention). ``bits_per_dim_se`` is the standard error over test images. The budget counts compilation and
    validation too; training also stops after ``max_steps`` steps (rounded up to a multiple of ``eval_every``)
    when given; at least one chunk of ``eval_every`` steps always runs. ``progress``: a line on stderr after the first chunk and every ``log_every`` steps.
    """
    import paramax  # noqa: PLC0415

    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    test_dequant = num_dequant if test_dequant is None else test_dequant
    if test_dequant < 1:
        raise ValueError(f"test_dequant must be >= 1, got {test_dequant}")
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

    @functools.partial(jax.jit, static_argnums=3)
    def image_nll(params, k, key, draws):
        """NLL of each image (nats), averaged over ``draws`` dequantizations: shape (len(k),)."""
        ys = jax.vmap(lambda kk: data_lib.digits_to_model_space(k, kk))(
            jax.random.split(key, draws)
        )
        dist = paramax.unwrap(eqx.combine(params, static))
        return -jnp.mean(dist.log_prob(ys.reshape(-1, d)).reshape(draws, len(k)), axis=0)

    def log(steps, loss, v, best_val, best_step):
        if progress:
            print(
                f"[digits_flow] step {steps:6d}  train NLL {loss:8.2f}  val NLL {v:8.2f}  "
                f"(best {best_val:.2f} at {best_step})  {time.perf_counter() - tic:6.1f} s of "
                f"{seconds:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    if progress:
        print(
            f"[digits_flow] training a {arch} flow ({flow_layers} layers, width {nn_width}) for "
            f"{seconds:.0f} s"
            + (f" or {max_steps} steps" if max_steps else "")
            + " (compiling first)",
            file=sys.stderr,
            flush=True,
        )
    best, best_val, best_step, steps, history, logged = params, math.inf, 0, 0, [], 0
    # At least one chunk: building the flow counts against the budget and can use up a small one.
    while steps == 0 or (
        time.perf_counter() - tic < seconds and (max_steps is None or steps < max_steps)
    ):
        k_train, sub = jax.random.split(k_train)
        params, opt_state, loss = train_chunk(params, opt_state, sub)
        steps += eval_every
        v = float(jnp.mean(image_nll(params, val_k, k_val, num_dequant)))
        if not math.isfinite(v):
            raise FloatingPointError(f"flow baseline: validation NLL is {v} at step {steps}")
        history.append({"step": steps, "train_nll": float(loss), "val_nll": v})
        if v < best_val:
            best, best_val, best_step = params, v, steps
        if steps == eval_every or steps - logged >= log_every:
            log(steps, float(loss), v, best_val, best_step)
            logged = steps
    wall = time.perf_counter() - tic
    if history and logged != steps:
        log(steps, history[-1]["train_nll"], history[-1]["val_nll"], best_val, best_step)
    per_image = np.asarray(image_nll(best, test_k.reshape(len(test_k), d), k_test, test_dequant))
    bpd = (per_image - d * data_lib.dequantization_log_volume()) / (d * math.log(2.0))
    se = float(np.std(bpd, ddof=1) / math.sqrt(len(bpd))) if len(bpd) > 1 else math.nan
    return {
        "arch": arch,
        "flow_layers": flow_layers,
        "nn_width": nn_width,
        "bits_per_dim": float(np.mean(bpd)),
        "bits_per_dim_se": se,
        "n_test": int(len(bpd)),
        "test_dequant": int(test_dequant),
        "steps": steps,
        "train_wall_s": wall,
        "best_val_nll": best_val,
        "best_step": best_step,
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(best))),
        "history": history,
    }


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--seconds", type=float, default=None, help="wall-time budget (default 60; --quick: 5)"
    )
    p.add_argument("--arch", default="maf_spline", choices=ARCHS)
    p.add_argument(
        "--n-test", type=int, default=None, help="first N test images (default 300; --quick: 20)"
    )
    p.add_argument(
        "--test-dequant", type=int, default=1, help="dequantization draws per test image"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="5 s, 2 layers, 20 test images")
    args = p.parse_args(argv)
    seconds = args.seconds or (5.0 if args.quick else 60.0)
    n_test = args.n_test or (20 if args.quick else 300)
    train_k, test_k = data_lib.load_digits("train"), data_lib.load_digits("test")[:n_test]
    r = flow_bits_per_dim(
        train_k,
        test_k,
        jax.random.key(args.seed),
        seconds=seconds,
        arch=args.arch,
        flow_layers=2 if args.quick else 4,
        test_dequant=args.test_dequant,
        progress=not args.no_progress,
    )
    r.pop("history")
    print(json.dumps(r), flush=True)
    return r


if __name__ == "__main__":
    main()
