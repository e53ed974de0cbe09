"""Sharded evaluation: GSPMD ``jit(vmap(...))`` of a sharded batch against ``shard_map`` over a per-device vmap.

Workload: exact-trace log-likelihoods (and adaptive PF-ODE samples) of an 8-Gaussian ring of standard deviation
0.05 (narrow components: a stiff data end, steps vary a lot between points) with its exact velocity on
``LinearPath`` (t = 0 noise, t = 1 data), the batch split over the devices of a 1-D mesh. Variants:

* ``gspmd``: ``jax.jit(jax.vmap(log_likelihood_with_stats))`` with the input sharded over the mesh (GSPMD
  partitions the vmapped while-loop; its loop condition reduces over the batch, i.e. across devices, every step);
* ``shard_map``: :func:`diffjax.sharded.sharded_log_likelihood` (each device runs its own vmapped solve);
* ``one device``: the same vmap, unsharded.

Also a forced ``max_steps`` failure under each (with ``throw=False`` and a host check for GSPMD).

Usage: ``python benchmarks/sharded.py [--devices 8] [--n 1024] [--repeats 5]``: it forces ``--devices`` CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count``) unless an accelerator is present. The last line
of standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")

    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415
    from diffjax import sharded, solve  # noqa: PLC0415
    from diffjax.likelihood import log_likelihood_with_stats  # noqa: PLC0415

    ang = jnp.arange(8) * (2 * jnp.pi / 8)
    ring = dj.GaussianMixture(
        jnp.ones(8) / 8,
        2.0 * jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1),
        0.0025 * jnp.ones((8, 2)),
    )
    path = dj.LinearPath()
    u = dj.velocity_field(ring.model("velocity", path), "velocity", path)
    x = np.asarray(ring.sample(jax.random.key(0), args.n))
    mesh = sharded.batch_mesh()
    xs = jax.device_put(x, NamedSharding(mesh, P(sharded.BATCH_AXIS)))

    @jax.jit
    def vmapped(u, x):
        return jax.vmap(lambda xi: log_likelihood_with_stats(u, path, xi, throw=False))(x)

    def shard_mapped(u, x):
        return sharded.sharded_log_likelihood(u, path, x)

    variants = (
        ("one_device", vmapped, jnp.asarray(x)),
        ("gspmd", vmapped, xs),
        ("shard_map", shard_mapped, xs),
    )
    exact = np.asarray(jax.vmap(ring.log_prob)(x))
    res = {"devices": jax.device_count(), "platform": jax.devices()[0].platform, "n": args.n}
    outs, times = {}, {name: [] for name, _, _ in variants}
    for name, fn, inp in variants:  # cold: trace + compile + first run
        t = time.perf_counter()
        outs[name] = fn(u, inp)
        jax.block_until_ready(outs[name].log_prob)
        res[name] = {"cold_s": time.perf_counter() - t}
    for _ in range(args.repeats):  # warm, interleaved so that the machine's load affects all alike
        for name, fn, inp in variants:
            t = time.perf_counter()
            jax.block_until_ready(fn(u, inp).log_prob)
            times[name].append(time.perf_counter() - t)
    for name, _, _ in variants:
        out = outs[name]
        err = float(np.max(np.abs(np.asarray(out.log_prob) - exact)))
        nfe = np.asarray(out.nfe)
        res[name].update(
            warm_s=float(np.median(times[name])),
            best_s=float(np.min(times[name])),
            max_err=err,
            nfe_max=int(nfe.max()),
            nfe_mean=float(nfe.mean()),
        )
        r = res[name]
        print(
            f"{name:10s} cold {r['cold_s']:7.2f} s  warm median {r['warm_s'] * 1e3:8.1f} ms  best "
            f"{r['best_s'] * 1e3:8.1f} ms  max|err| {err:.1e}  NFE mean {nfe.mean():.0f} max {nfe.max()}",
            flush=True,
        )
    res["gspmd_over_shard_map"] = res["gspmd"]["warm_s"] / res["shard_map"]["warm_s"]
    res["one_device_over_shard_map"] = res["one_device"]["warm_s"] / res["shard_map"]["warm_s"]
    # slowest-lane waste: a vmapped while-loop steps every row until its slowest row is done; the useful
    # fraction is mean NFE / the slowest row's NFE, over the whole batch on one device (and under GSPMD, whose
    # loop condition is global) and per device under shard_map
    nfe = np.asarray(outs["shard_map"].nfe).reshape(jax.device_count(), -1)
    res["lane_utilisation_one_device"] = float(nfe.mean() / nfe.max())
    res["lane_utilisation_shard_map"] = float(nfe.mean() / nfe.max(axis=1).mean())

    # collectives in the compiled programs: GSPMD's while-loop condition reduces over the devices every step
    def all_reduces(fn):
        hlo = jax.jit(fn).lower(u, xs).compile().runtime_executable().hlo_modules()[0].to_string()
        return hlo.count("all-reduce")

    res["all_reduce_ops"] = {
        "gspmd": all_reduces(vmapped),
        "shard_map": all_reduces(
            lambda u, x: sharded._likelihood_program(u, path, x, None, mesh, sharded.BATCH_AXIS, ())
        ),
    }
    print(f"all-reduce ops in the compiled program: {res['all_reduce_ops']}", flush=True)

    # a forced max_steps failure: shard_map raises on the host; GSPMD returns statuses (throw=False)
    t = time.perf_counter()
    try:
        sharded.sharded_log_likelihood(u, path, xs, max_steps=8)
        res["shard_map_failure"] = "no error"
    except solve.SolveError as e:
        res["shard_map_failure"] = (
            f"SolveError after {time.perf_counter() - t:.1f} s: {str(e)[:80]}"
        )
    print("shard_map max_steps=8:", res["shard_map_failure"], flush=True)
    print(
        f"gspmd / shard_map (warm): {res['gspmd_over_shard_map']:.2f}; one device / shard_map: "
        f"{res['one_device_over_shard_map']:.2f}; lane utilisation (mean/max NFE) one device "
        f"{res['lane_utilisation_one_device']:.2f}, per device {res['lane_utilisation_shard_map']:.2f}",
        flush=True,
    )
    print(f"jax {jax.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
