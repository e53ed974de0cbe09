"""Benchmark: diffjax's Euler–Maruyama ``sample_sde`` against a hand-written ``lax.scan`` loop and diffrax.

Time convention: t = 0 is noise, t = 1 is data. Workload: the exact fields of a 2-D, 3-component Gaussian mixture
on LinearPath, g = 1, vmapped over a batch of points (default 4096 points, 500 steps).

* ``diffjax``: ``jax.vmap(lambda k: sample_sde(u, s, path, k, shape=(2,), ...).samples)``.
* ``scan``: a minimal hand-written per-example EM loop with the same steps, the same fields and the same
  per-example, per-step key splitting, vmapped the same way (the ≤ 1.2× target is against this).
* ``scan_batched_noise``: the same loop on the whole batch with one key per step (cheaper RNG), for reference.
* ``diffrax``: ``diffeqsolve`` with ``diffrax.Euler`` on MultiTerm(ODETerm, ControlTerm) driven by a
  ``VirtualBrownianTree``, vmapped; for reference.
* ``ode_adaptive``: ``sample_ode`` with adaptive Tsit5 (rtol = atol = 1e-5), and with the log-likelihood.

Cold = first call (trace + compile + run); warm = best of repeated calls (robust to other load on the machine). Run: ``python benchmarks/sampling.py``
(``--quick`` for a smaller run).
"""

from __future__ import annotations

import argparse
import time

import diffrax
import jax
import jax.numpy as jnp
import lineax

import diffjax as dj
from diffjax.analytic import GaussianMixture
from diffjax.sampling import sample_ode, sample_sde


def _timeit(fn, *args, repeats=5):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    cold = time.perf_counter() - t
    warm = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        warm.append(time.perf_counter() - t)
    return cold, min(warm)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 points, 100 steps, 3 repeats")
    parser.add_argument("--points", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    n = args.points or (1024 if args.quick else 4096)
    steps = args.steps or (100 if args.quick else 500)
    repeats = 3 if args.quick else 7

    gm = GaussianMixture([0.5, 0.3, 0.2], [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], [0.3, 0.4, 0.6])
    path = dj.LinearPath()
    u, s = gm.model("velocity", path), gm.model("score", path)
    g = 1.0
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    x0 = jax.random.normal(jax.random.PRNGKey(1), (n, 2))

    @jax.jit
    def diffjax_em(keys, x0):
        return jax.vmap(
            lambda k, x: sample_sde(u, s, path, k, x0=x, diffusion=g, num_steps=steps).samples
        )(keys, x0)

    ts = jnp.linspace(path.t_min, path.t_max, steps + 1)

    @jax.jit
    def scan_em(keys, x0):
        def one(key, x):
            def step(x, inp):
                t, t_next, k = inp
                h = t_next - t
                x = x + h * (u(t, x) + 0.5 * g * g * s(t, x))
                return x + g * jnp.sqrt(h) * jax.random.normal(k, x.shape, x.dtype), None

            x, _ = jax.lax.scan(step, x, (ts[:-1], ts[1:], jax.random.split(key, steps)))
            return x

        return jax.vmap(one)(keys, x0)

    @jax.jit
    def scan_em_batched_noise(key, x0):
        uu, ss = jax.vmap(u, (None, 0)), jax.vmap(s, (None, 0))

        def step(x, inp):
            t, t_next, k = inp
            h = t_next - t
            x = x + h * (uu(t, x) + 0.5 * g * g * ss(t, x))
            return x + g * jnp.sqrt(h) * jax.random.normal(k, x.shape, x.dtype), None

        x, _ = jax.lax.scan(step, x0, (ts[:-1], ts[1:], jax.random.split(key, steps)))
        return x

    @jax.jit
    def diffrax_em(keys, x0):
        def one(key, x):
            bm = diffrax.VirtualBrownianTree(
                path.t_min, path.t_max, tol=1.0 / (8 * steps), shape=(2,), key=key
            )
            terms = diffrax.MultiTerm(
                diffrax.ODETerm(lambda t, y, a: u(t, y) + 0.5 * g * g * s(t, y)),
                diffrax.ControlTerm(
                    lambda t, y, a: lineax.DiagonalLinearOperator(g * jnp.ones_like(y)), bm
                ),
            )
            sol = diffrax.diffeqsolve(
                terms,
                diffrax.Euler(),
                path.t_min,
                path.t_max,
                (path.t_max - path.t_min) / steps,
                x,
                max_steps=steps + 1,
            )
            return sol.ys[-1]

        return jax.vmap(one)(keys, x0)

    @jax.jit
    def ode(keys):
        r = jax.vmap(lambda k: sample_ode(u, path, k, shape=(2,)))(keys)
        return r.samples, jnp.max(r.nfe)

    @jax.jit
    def ode_lp(keys):
        r = jax.vmap(lambda k: sample_ode(u, path, k, shape=(2,), log_prob=True))(keys)
        return r.samples, r.log_prob, jnp.max(r.nfe)

    print(
        f"backend={jax.default_backend()} devices={jax.devices()} x64={jax.config.jax_enable_x64}"
    )
    print(f"workload: 2-D mixture oracle fields, LinearPath, g={g}, {n} points, {steps} EM steps")
    rows = [
        ("diffjax sample_sde (EM, lax.scan)", diffjax_em, (keys, x0)),
        ("hand-written lax.scan EM (same keys)", scan_em, (keys, x0)),
        ("hand-written lax.scan EM, batched noise", scan_em_batched_noise, (keys[0], x0)),
        ("diffrax Euler + VirtualBrownianTree", diffrax_em, (keys, x0)),
        ("diffjax sample_ode adaptive Tsit5", ode, (keys,)),
        ("diffjax sample_ode adaptive + log_prob", ode_lp, (keys,)),
    ]
    results = {}
    for name, fn, a in rows:
        cold, warm = _timeit(fn, *a, repeats=repeats)
        results[name] = (cold, warm)
        print(f"{name:45s} cold {cold * 1e3:9.1f} ms   warm {warm * 1e3:9.2f} ms")
    base = results["hand-written lax.scan EM (same keys)"][1]
    ours = results["diffjax sample_sde (EM, lax.scan)"][1]
    dfx = results["diffrax Euler + VirtualBrownianTree"][1]
    print(f"ratio diffjax / hand-written scan (warm): {ours / base:.3f}  (target <= 1.2)")
    print(f"ratio diffrax / hand-written scan (warm): {dfx / base:.3f}")
    print(f"adaptive ODE max NFE per sample: {int(ode(keys)[1])}")


if __name__ == "__main__":
    main()
