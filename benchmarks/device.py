"""Device benchmark: training, sampling and likelihood throughput of a 32×32 UNet on whatever accelerator is present.

Time convention: t = 0 is noise, t = 1 is data (flow matching on ``LinearPath``, x_t = t·x + (1 − t)·ε).

Measures, on ``jax.devices()[0]`` (GPU/TPU when present, else the CPU):

* **training**: steps/s (and images/s) of ``diffjax.train.make_train_step`` (clip + AdamW + EMA, state donated)
  for ``diffjax.nn.UNet(3, base, mults=(1, 2, 2))`` on 32×32×3 images at a few batch sizes, and the gradient
  norm at initialisation against the default ``grad_clip = 1.0`` (the loss is summed over pixels);
* **sampling**: images/s of ``diffjax.sample_ode`` with a fixed Heun grid, vmapped over a batch;
* **likelihood**: images/s and bits/dim of ``bits_per_dim_with_stats`` with the Hutchinson trace (Rademacher
  probes, and Gaussian for comparison) on a fixed Heun grid, the per-image Hutchinson standard error in bits/dim
  and the probes needed for 0.01 bits/dim (:func:`diffjax.likelihood.probes_for_precision`); the NFE of an
  adaptive Hutchinson solve (default tolerances); and at 28×28×1 and 32×32×3 the time and memory of one
  augmented evaluation with the exact trace (D forward-mode JVPs; with ``--quick`` timed on 256 of the D
  columns and scaled by D/256) and with Hutchinson, so that time per image = NFE × time per evaluation;
* **memory**: the peak bytes in use on the device (``device.memory_stats()``) where the backend reports it, else
  the process's peak RSS; and XLA's temporary buffer size of each compiled likelihood evaluation.

The model is untrained: ``UNet`` zero-initialises its output and time layers (an untrained model predicts 0, whose
divergence is 0), so those zero kernels are replaced by N(0, 0.02²) draws to give a field with a non-trivial
Jacobian. Its bits/dim are those of a random network, not of a trained model; the times and memory are what a
trained model of the same size costs per evaluation, the NFE of a trained model differs.

Usage: ``python benchmarks/device.py [--quick]``. ``--quick`` (CPU, ~2–3 min): base 16, mults (1, 2), batches 4 and 8, short
runs, Rademacher probes only, the exact trace timed on 256 columns. The last line of standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import diffjax as dj
from diffjax import losses, nn, train
from diffjax.fields import Hutchinson, HutchPlusPlus
from diffjax.likelihood import (
    bits_per_dim_with_stats,
    log_likelihood_with_stats,
    probes_for_precision,
)


def peak_memory(device):
    """(bytes, source): the device's peak bytes in use where reported, else the process's peak RSS."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without memory statistics raise or return None
        stats = None
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device.memory_stats()['peak_bytes_in_use']"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024)), "peak RSS (ru_maxrss)"


def compile_with_memory(fn, *args):
    """(the compiled ``jax.jit(fn)`` for these arguments, XLA's temporary buffer bytes or None, compile s)."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t
    try:
        analysis = compiled.memory_analysis()
        temp = None if analysis is None else int(analysis.temp_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        temp = None
    return compiled, temp, seconds


def timed(fn, *args, repeats=2):
    """(first call incl. compile, median of ``repeats`` further calls) in seconds."""
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    cold = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return cold, float(np.median(times))


def make_model(channels, base, key, mults=(1, 2, 2)):
    """An untrained UNet whose zero-initialised kernels are replaced by N(0, 0.02²) (module docstring)."""
    model = nn.UNet(channels, base=base, mults=mults, rngs=nnx.Rngs(0))
    apply, params = nn.split(model)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [
        0.02 * jax.random.normal(k, p.shape, p.dtype) if p.ndim >= 2 and not jnp.any(p) else p
        for k, p in zip(keys, leaves)
    ]
    return apply, jax.tree.unflatten(treedef, leaves)


def smooth_images(key, n, size, channels):
    """Smooth random images in [−1, 1] (bilinear upsampling of 4×4 noise), as model-space data."""
    coarse = jax.random.uniform(key, (n, 4, 4, channels), minval=-1.0, maxval=1.0)
    return jax.image.resize(coarse, (n, size, size, channels), "linear")


def bench_training(apply, params, batches, steps, results):
    path = dj.LinearPath()
    config = train.TrainConfig(learning_rate=1e-4, warmup_steps=10, total_steps=10_000)
    optimizer = train.make_optimizer(config)
    objective = losses.flow_matching(path)
    out = {}
    for bs in batches:
        step = train.make_train_step(apply, objective, optimizer, config.ema_decay)
        state = train.init_state(params, optimizer, jax.random.key(0))
        batch = smooth_images(jax.random.key(bs), bs, 32, 3)
        t = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(state)
        cold = time.perf_counter() - t
        grad_norm = float(metrics["grad_norm"])
        t = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state, batch)
        jax.block_until_ready(state)
        dt = (time.perf_counter() - t) / steps
        out[str(bs)] = {
            "steps_per_s": 1.0 / dt,
            "images_per_s": bs / dt,
            "cold_s": cold,
            "grad_norm_at_init": grad_norm,
        }
        print(
            f"train  batch {bs:4d}: {1 / dt:8.2f} steps/s  {bs / dt:9.1f} images/s  (first step {cold:.1f} s; "
            f"grad norm at init {grad_norm:.1f} vs grad_clip {config.grad_clip})",
            flush=True,
        )
    results["train"] = out


def bench_sampling(u, n, num_steps, results):
    path = dj.LinearPath()
    keys = jax.random.split(jax.random.key(1), n)
    fn = eqx.filter_jit(
        lambda u, keys: jax.vmap(
            lambda k: dj.sample_ode(u, path, k, shape=(32, 32, 3), num_steps=num_steps).samples
        )(keys)
    )
    cold, warm = timed(fn, u, keys)
    results["sample"] = {
        "images_per_s": n / warm,
        "batch": n,
        "solver": f"heun, {num_steps} steps (NFE {2 * num_steps})",
        "cold_s": cold,
    }
    print(
        f"sample batch {n}: {n / warm:8.2f} images/s (Heun {num_steps} steps, NFE {2 * num_steps}; "
        f"cold {cold:.1f} s)",
        flush=True,
    )


def bench_bits_per_dim(u, n, num_steps, num_probes, probes, results):
    path = dj.LinearPath()
    k = jax.random.randint(jax.random.key(2), (n, 32, 32, 3), 0, 256)
    out = {}
    traces = {
        "rademacher": Hutchinson(num_probes),
        "gaussian": Hutchinson(num_probes, jax.random.normal),
        # Hutch++ at the same JVPs per evaluation: num_probes − 2 probes and a rank-1 sketch
        "hutch++": HutchPlusPlus(max(1, num_probes - 2), 1),
    }
    for probe in probes:
        fn = eqx.filter_jit(
            lambda u, k, key, trace=traces[probe]: jax.vmap(
                lambda ki, kk: bits_per_dim_with_stats(
                    u, path, ki, key=kk, trace=trace, num_steps=num_steps
                )
            )(k, jax.random.split(key, k.shape[0]))
        )
        cold, warm = timed(fn, u, k, jax.random.key(3), repeats=2)
        r = fn(u, k, jax.random.key(3))
        se = np.asarray(r.standard_error)
        out[probe] = {
            "images_per_s": n / warm,
            "bits_per_dim_mean": float(np.mean(r.bits_per_dim)),
            "se_bits_per_dim_median": float(np.median(se)),
            "se_bits_per_dim_max": float(np.max(se)),
            "probes_for_0.01_bpd": probes_for_precision(
                float(np.max(se)), 0.01, num_probes=traces[probe].num_probes
            ),
            "cold_s": cold,
        }
        print(
            f"bits/dim ({probe}, {traces[probe]!r}, Heun {num_steps} steps) batch {n}: {n / warm:8.2f} "
            f"images/s, bpd {np.mean(r.bits_per_dim):.3f}, SE median {np.median(se):.4f} max {np.max(se):.4f} "
            f"bits/dim -> {out[probe]['probes_for_0.01_bpd']} probes for 0.01",
            flush=True,
        )
    results["bits_per_dim"] = {
        "batch": n,
        "num_probes": num_probes,
        "solver": f"heun, {num_steps} steps",
        **out,
    }


def bench_evaluation(size, channels, base, mults, quick, results):
    """One augmented evaluation [u, ∇·u] of a size×size×channels UNet: exact trace and Hutchinson; adaptive NFE."""
    apply, params = make_model(channels, base, jax.random.key(10 + size), mults)
    path = dj.LinearPath()
    u = dj.velocity_field(eqx.Partial(apply, params), "velocity", path)
    x = smooth_images(jax.random.key(4), 1, size, channels)[0]
    d = x.size
    t = jnp.asarray(0.7)
    out = {"D": d}

    # exact trace: a linearisation and D JVPs, chunked as ExactTrace does (chunk = 65,536 // D columns at a time,
    # so the temporary memory is that of one chunk whatever the number of columns); --quick times m of the D
    # columns and scales by D/m
    m = 256 if quick else d
    chunk = max(1, (1 << 16) // d)

    def exact_cols(u, x):
        y, lin = jax.linearize(lambda z: u(t, z.reshape(x.shape)).reshape(-1), x.reshape(-1))

        def diag(i):
            return lin(jax.nn.one_hot(i, d, dtype=x.dtype))[i]

        return y, jnp.sum(jax.lax.map(diag, jnp.arange(m), batch_size=chunk))

    program, out["exact_temp_bytes"], _ = compile_with_memory(exact_cols, u, x)
    _, warm = timed(program, u, x, repeats=1 if quick else 2)
    per_eval = warm * d / m
    out["exact_s_per_eval"] = per_eval
    out["exact_timed_columns"] = m

    probes = jax.random.rademacher(jax.random.key(5), (4, *x.shape), x.dtype)
    hutch, out["hutchinson4_temp_bytes"], _ = compile_with_memory(
        lambda u, x, v: Hutchinson(4)(lambda z: u(t, z), x, v), u, x, probes
    )
    _, warm_h = timed(hutch, u, x, probes)
    out["hutchinson4_s_per_eval"] = warm_h

    # the NFE of an adaptive solve at the default tolerances (Hutchinson, 1 probe: the trajectory is the same)
    adaptive = eqx.filter_jit(
        lambda u, x, key: log_likelihood_with_stats(
            u, path, x, key=key, trace="hutchinson", max_steps=512, throw=False
        )
    )
    r = adaptive(u, x, jax.random.key(6))
    nfe = int(r.nfe)
    out["adaptive_nfe"] = nfe
    out["adaptive_status"] = int(r.status)
    out["exact_s_per_image"] = nfe * per_eval
    out["hutchinson4_s_per_image"] = nfe * warm_h
    results[f"eval_{size}x{size}x{channels}"] = out
    tb = out["exact_temp_bytes"]
    print(
        f"{size}x{size}x{channels} (D={d}): exact trace {per_eval:.3f} s/eval"
        f"{' (from ' + str(m) + ' columns)' if m < d else ''}, temp {tb / 2**20 if tb else float('nan'):.1f} "
        f"MiB; Hutchinson(4) {warm_h * 1e3:.1f} ms/eval, temp "
        f"{(out['hutchinson4_temp_bytes'] or float('nan')) / 2**20:.1f} MiB; adaptive NFE {nfe} -> exact "
        f"{nfe * per_eval:.0f} s/image, Hutchinson(4) {nfe * warm_h:.2f} s/image",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU-sized run (~2-3 min)")
    ap.add_argument(
        "--base", type=int, default=None, help="UNet base channels (default 16 quick, 64 full)"
    )
    ap.add_argument("--batches", type=int, nargs="*", default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per batch size")
    args = ap.parse_args()
    quick = args.quick
    base = args.base or (16 if quick else 64)
    mults = (1, 2) if quick else (1, 2, 2)
    batches = args.batches or ([4, 8] if quick else [32, 64, 128, 256])
    steps = args.steps or (3 if quick else 20)
    device = jax.devices()[0]
    results = {
        "device": f"{device.platform}: {device.device_kind}",
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "quick": quick,
        "unet": f"UNet(3, base={base}, mults={mults}), untrained (zero kernels redrawn)",
    }
    print(
        f"device {results['device']} ({jax.device_count()} devices), jax {jax.__version__}",
        flush=True,
    )
    t_all = time.perf_counter()
    apply, params = make_model(3, base, jax.random.key(0), mults)
    results["num_params"] = int(sum(p.size for p in jax.tree.leaves(params)))
    bench_training(apply, params, batches, steps, results)
    u = dj.velocity_field(eqx.Partial(apply, params), "velocity", dj.LinearPath())
    bench_sampling(u, 4 if quick else 64, 8 if quick else 50, results)
    probes = ("rademacher",) if quick else ("rademacher", "gaussian", "hutch++")
    bench_bits_per_dim(u, 2 if quick else 16, 4 if quick else 25, 4, probes, results)
    for size, channels in ((28, 1), (32, 3)):
        bench_evaluation(size, channels, base, mults, quick, results)
    mem, source = peak_memory(device)
    results["peak_memory_bytes"] = mem
    results["peak_memory_source"] = source
    results["total_s"] = time.perf_counter() - t_all
    print(
        f"peak memory {mem / 2**20:.0f} MiB ({source}); total {results['total_s']:.0f} s",
        flush=True,
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
