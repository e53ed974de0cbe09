"""Benchmark: diffjax.likelihood.log_likelihood against a hand-written minimal diffrax likelihood.

Time convention: t = 0 is noise, t = 1 is data. Both implementations integrate d/dt [x, ℓ] = [u, ∇·u] from t = 1 to
t = 0 with the same diffrax solver (Tsit5), PIDController(rtol, atol), max_steps and SaveAt(t1=True) on the same
per-example field, batched with jax.vmap under jax.jit. Reported per case:

* cold: first call (trace + compile + run), seconds;
* warm: median over repeats of a call on the same shapes (``block_until_ready``), interleaving the two
  implementations to share machine-load drift; ratio = diffjax / minimal (target <= 1.1);
* for the mixture, the max |error| of each against the exact oracle log-density.

Cases: the 2-D, 3-component Gaussian mixture oracle on LinearPath (4096 points, exact trace); a random 64-D MLP
velocity (256 points) with exact and Hutchinson (1 Rademacher probe) traces. If ``torch`` and ``flow_matching``
are importable (the optional ``bench`` extra), Meta flow_matching's ``ODESolver.compute_likelihood`` is timed on the
mixture field too; otherwise the script says they are not installed.

Usage: ``python benchmarks/likelihood.py [--quick]``
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import diffrax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from diffjax.analytic import GaussianMixture  # noqa: E402
from diffjax.likelihood import log_likelihood  # noqa: E402
from diffjax.paths import LinearPath  # noqa: E402

RTOL = ATOL = 1e-5
MAX_STEPS = 4096


def minimal_log_likelihood(velocity, prior_log_prob, x, probe=None):
    """The textbook version: augmented ODE from t = 1 (data) to t = 0 (noise), no checks, no statistics."""

    def vf(t, y, args):
        z, _ = y
        u, jvp = jax.linearize(lambda v: velocity(t, v), z)
        if probe is None:
            div = jnp.trace(jax.vmap(jvp)(jnp.eye(z.size, dtype=z.dtype)))
        else:
            div = jnp.sum(probe * jvp(probe))
        return u, div

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        diffrax.Tsit5(),
        1.0,
        0.0,
        None,
        (x, jnp.zeros((), x.dtype)),
        stepsize_controller=diffrax.PIDController(rtol=RTOL, atol=ATOL),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=MAX_STEPS,
    )
    return prior_log_prob(sol.ys[0][0]) + sol.ys[1][0]


def block(x):
    return jax.block_until_ready(x)


def cold(fn, *args):
    tic = time.perf_counter()
    out = block(fn(*args))
    return time.perf_counter() - tic, out


def warm_interleaved(fns, args, repeats):
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            tic = time.perf_counter()
            block(fn(*args))
            times[i].append(time.perf_counter() - tic)
    return [statistics.median(t) for t in times]


def report(name, n, c_dj, c_min, w_dj, w_min, extra=""):
    print(
        f"{name:<34} n={n:<5} cold diffjax {c_dj:6.2f}s  minimal {c_min:6.2f}s | "
        f"warm diffjax {w_dj * 1e3:9.1f}ms  minimal {w_min * 1e3:9.1f}ms  ratio {w_dj / w_min:5.3f}{extra}"
    )


def bench_mixture(n, repeats):
    path = LinearPath()
    gm = GaussianMixture(
        jnp.array([0.5, 0.3, 0.2]),
        jnp.array([[-1.0, 0.5], [1.0, 1.0], [0.5, -1.5]]),
        jnp.array([[0.3, 0.2], [0.1, 0.4], [0.2, 0.2]]),
    )
    xs = gm.sample(jax.random.key(0), n)
    v = lambda t, z: gm.velocity(path, t, z)
    dj = jax.jit(
        jax.vmap(lambda x: log_likelihood(v, path, x, rtol=RTOL, atol=ATOL, max_steps=MAX_STEPS))
    )
    mn = jax.jit(jax.vmap(lambda x: minimal_log_likelihood(v, path.prior.log_prob, x)))
    c_dj, out_dj = cold(dj, xs)
    c_mn, out_mn = cold(mn, xs)
    w_dj, w_mn = warm_interleaved([dj, mn], (xs,), repeats)
    ref = jax.vmap(gm.log_prob)(xs)
    err_dj = float(jnp.max(jnp.abs(out_dj - ref)))
    err_mn = float(jnp.max(jnp.abs(out_mn - ref)))
    report(
        "mixture 2-D, exact trace",
        n,
        c_dj,
        c_mn,
        w_dj,
        w_mn,
        f" | max|err| vs oracle: diffjax {err_dj:.1e}, minimal {err_mn:.1e}",
    )
    return gm, path, xs, ref


def init_mlp(key, dim=64, width=256):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (width, dim + 1)) / math.sqrt(dim + 1),
        "b1": jnp.zeros(width),
        "w2": jax.random.normal(k2, (width, width)) / math.sqrt(width),
        "b2": jnp.zeros(width),
        "w3": 0.5 * jax.random.normal(k3, (dim, width)) / math.sqrt(width),
        "b3": jnp.zeros(dim),
    }


def mlp(params, t, x):
    h = jnp.tanh(params["w1"] @ jnp.concatenate([x, t[None]]) + params["b1"])
    h = jnp.tanh(params["w2"] @ h + params["b2"])
    return params["w3"] @ h + params["b3"]


def bench_mlp(n, repeats, trace):
    dim = 64
    params = init_mlp(jax.random.key(1), dim)
    path = LinearPath()
    xs = jax.random.normal(jax.random.key(2), (n, dim))
    keys = jax.random.split(jax.random.key(3), n)
    v = lambda t, z: mlp(params, t, z)
    if trace == "exact":
        dj = jax.jit(
            jax.vmap(
                lambda x, k: log_likelihood(v, path, x, rtol=RTOL, atol=ATOL, max_steps=MAX_STEPS)
            )
        )
        mn = jax.jit(jax.vmap(lambda x, k: minimal_log_likelihood(v, path.prior.log_prob, x)))
    else:
        dj = jax.jit(
            jax.vmap(
                lambda x, k: log_likelihood(
                    v,
                    path,
                    x,
                    key=k,
                    trace="hutchinson",
                    rtol=RTOL,
                    atol=ATOL,
                    max_steps=MAX_STEPS,
                )
            )
        )
        # The same probe as diffjax draws (fields.make_probes: one Rademacher vector from the key).
        mn = jax.jit(
            jax.vmap(
                lambda x, k: minimal_log_likelihood(
                    v, path.prior.log_prob, x, probe=jax.random.rademacher(k, (1, dim), x.dtype)[0]
                )
            )
        )
    c_dj, out_dj = cold(dj, xs, keys)
    c_mn, out_mn = cold(mn, xs, keys)
    w_dj, w_mn = warm_interleaved([dj, mn], (xs, keys), repeats)
    diff = float(jnp.max(jnp.abs(out_dj - out_mn)))
    report(
        f"MLP 64-D, {trace} trace",
        n,
        c_dj,
        c_mn,
        w_dj,
        w_mn,
        f" | max|diffjax - minimal| {diff:.1e}",
    )


def bench_flow_matching(gm, xs, ref, repeats):
    have = all(importlib.util.find_spec(m) is not None for m in ("torch", "flow_matching"))
    if not have:
        print(
            "flow_matching / torch: not installed (optional `bench` extra) -- skipping "
            "ODESolver.compute_likelihood"
        )
        return
    import torch
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    w = torch.tensor(np.asarray(gm.weights), dtype=torch.float32)
    mu = torch.tensor(np.asarray(gm.means), dtype=torch.float32)
    var = torch.tensor(np.asarray(gm.variances), dtype=torch.float32)

    class Oracle(ModelWrapper):
        """The same mixture velocity on the linear path, in torch (t = 0 noise, t = 1 data)."""

        def __init__(self):
            super().__init__(torch.nn.Identity())

        def forward(self, x, t, **extras):
            t = t.reshape(-1, 1, 1) if t.dim() > 0 else t
            m = t * mu[None]
            c = t * t * var[None] + (1 - t) ** 2
            dc = 2 * t * var[None] - 2 * (1 - t)
            d = x[:, None, :] - m
            logj = torch.log(w)[None] - 0.5 * ((d * d / c) + torch.log(2 * math.pi * c)).sum(-1)
            r = torch.softmax(logj, dim=-1)
            uk = mu[None] + 0.5 * dc / c * d
            return (r[..., None] * uk).sum(1)

    solver = ODESolver(velocity_model=Oracle())
    x = torch.tensor(np.asarray(xs), dtype=torch.float32)
    normal = torch.distributions.Independent(
        torch.distributions.Normal(torch.zeros(2, dtype=torch.float32), 1.0), 1
    )

    def run(exact):
        return solver.compute_likelihood(
            x_1=x,
            log_p0=normal.log_prob,
            step_size=None,
            method="dopri5",
            atol=ATOL,
            rtol=RTOL,
            exact_divergence=exact,
            time_grid=torch.tensor([1.0, 0.0], dtype=torch.float32),
        )[1]

    for exact in (True, False):
        tic = time.perf_counter()
        out = run(exact)
        c = time.perf_counter() - tic
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            run(exact)
            times.append(time.perf_counter() - tic)
        err = float(np.max(np.abs(out.detach().numpy() - np.asarray(ref))))
        print(
            f"flow_matching compute_likelihood (dopri5, exact_divergence={exact}) n={len(xs)}: "
            f"first {c:.2f}s, median {statistics.median(times) * 1e3:.1f}ms, max|err| vs oracle {err:.1e}"
        )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and repeats")
    args = ap.parse_args()
    n_mix, n_mlp, repeats = (512, 64, 3) if args.quick else (4096, 256, 5)
    print(
        f"jax {jax.__version__}, diffrax {diffrax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"dtype {jnp.result_type(float)}; Tsit5, PIDController(rtol={RTOL}, atol={ATOL}), "
        f"max_steps={MAX_STEPS}"
    )
    gm, _, xs, ref = bench_mixture(n_mix, repeats)
    bench_mlp(n_mlp, repeats, "exact")
    bench_mlp(n_mlp, repeats, "hutchinson")
    bench_flow_matching(gm, xs, ref, repeats)


if __name__ == "__main__":
    main()
