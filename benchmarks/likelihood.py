"""Benchmark: exact log-likelihoods at equal accuracy (≤ 1e-4 nats) — diffjax's default, a minimal hand-written
diffrax solve and Meta flow_matching, with wall time and field evaluations (NFE).

Time convention: t = 0 is noise, t = 1 is data. Every implementation integrates d/dt [x, ℓ] = [u, ∇·u] from the
data end t1 to the noise end t0 with the exact trace and returns log p_{t0}(x(t0)) + ℓ(t0); the prior at t0 is
the oracle's exact marginal, so the only error is the solver's.

What is compared, per case:

* **diffjax default**: ``diffjax.log_likelihood(velocity, path, x, prior_log_prob=...)`` with no tuning at all —
  the default must reach the accuracy by itself.
* **minimal**: the textbook diffrax solve (Tsit5, ``PIDController(rtol=tol, atol=tol)``, diffrax's RMS norm over
  [x, ℓ]), at the *loosest* tol of the grid ``TOLS`` that reaches max |error| ≤ 1e-4 nats over all points.
* **flow_matching** (when the ``bench`` extra is installed): ``ODESolver.compute_likelihood`` (dopri5, exact
  divergence, one ODE for the whole batch), tuned the same way.

Cases: the 2-D, 3-component Gaussian mixture oracle (4096 points) on the linear, cosine and VP paths; the same
held to an 8-Gaussian ring of standard deviation 0.05 (narrow components, where the data end is stiff); a random
64-D tanh MLP velocity on the linear path (256 points), whose reference is a float64 Dopri8 solve at tol 1e-11.

Also printed: NFE of the same solve written in other time variables (the linear-path time τ = α/(α+σ) with the
state scaled by 1/(α+σ), under which every Gaussian path's probability-flow ODE is the linear path's; and the
log-SNR λ), at the loosest tolerance that reaches 1e-4 nats. The change of variables is exact, so only the NFE
can differ.

Wall times: warm = median of repeats of a jitted call, the implementations interleaved (the machine's load moves
all of them alike); cold = first call (trace + compile + run).

Usage: ``python benchmarks/likelihood.py [--quick]`` (``--quick``: 512 mixture points, 64 MLP points, 3 repeats).
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
from diffjax.likelihood import log_likelihood_with_stats  # noqa: E402
from diffjax.paths import CosinePath, LinearPath, VPPath  # noqa: E402

TARGET = 1e-4
TOLS = (1e-4, 3e-5, 1e-5, 3e-6, 1e-6, 3e-7, 1e-7)
MAX_STEPS = 8192
TSIT5_NFE = 6  # new stages per step (FSAL)


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


# --- the textbook solve, in t or in another time variable -----------------------------------------------------
def minimal_log_likelihood(velocity, prior_log_prob, x, t0, t1, tol, change=None):
    """Augmented ODE from t1 (data) to t0 (noise), Tsit5 + PID(tol, tol), no checks; returns (log p, steps).

    ``change`` = (s(t), t(s), ds/dt, c(t), dc/dt) integrates in s with the state y = x/c (exact change of
    variables: dy/ds = (u − ċ·y)/(c·ṡ), dℓ/ds = ∇·u/ṡ); None integrates in t."""
    if change is None:
        change = (lambda t: t, lambda s: s, jnp.ones_like, jnp.ones_like, jnp.zeros_like)
    s_of_t, t_of_s, ds_dt, c_of_t, dc_dt = change
    lo, hi = jnp.asarray(t0, x.dtype), jnp.asarray(t1, x.dtype)

    def vf(s, y, args):
        z, _ = y
        t = jnp.clip(t_of_s(s), lo, hi)
        c, dc, g = c_of_t(t), dc_dt(t), ds_dt(t)
        u, lin = jax.linearize(lambda v: velocity(t, v), c * z)
        div = jnp.trace(jax.vmap(lin)(jnp.eye(z.size, dtype=z.dtype)))
        return (u - dc * z) / (c * g), div / g

    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(vf),
        diffrax.Tsit5(),
        s_of_t(hi),
        s_of_t(lo),
        None,
        (x / c_of_t(hi), jnp.zeros((), x.dtype)),
        stepsize_controller=diffrax.PIDController(rtol=tol, atol=tol),
        saveat=diffrax.SaveAt(t1=True),
        max_steps=MAX_STEPS,
    )
    return prior_log_prob(sol.ys[0][0] * c_of_t(lo)) + sol.ys[1][0], sol.stats["num_steps"]


def linear_time(path):
    """τ = α/(α+σ) = sigmoid(λ/2) and c = α+σ: every Gaussian path's PF-ODE becomes the linear path's."""
    coef = path.coefficients
    return (
        lambda t: (lambda a, s, da, ds: a / (a + s))(*coef(t)),
        lambda u: path.t_from_log_snr(2.0 * (jnp.log(u) - jnp.log1p(-u))),
        lambda t: (lambda a, s, da, ds: (da * s - a * ds) / (a + s) ** 2)(*coef(t)),
        lambda t: (lambda a, s, da, ds: a + s)(*coef(t)),
        lambda t: (lambda a, s, da, ds: da + ds)(*coef(t)),
    )


def log_snr_time(path):
    """s = λ_t, unscaled state (finite only where both ends have finite λ, e.g. VP)."""
    return (path.log_snr, path.t_from_log_snr, path.d_log_snr, jnp.ones_like, jnp.zeros_like)


def tuned(make_fn, xs, ref):
    """(tol, fn, out, cold seconds) for the loosest tol of TOLS whose max |error| ≤ TARGET (the tightest if none does)."""
    for tol in TOLS:
        fn = make_fn(tol)
        c, out = cold(fn, xs)
        if float(np.max(np.abs(np.asarray(out[0], np.float64) - ref))) <= TARGET:
            break
    return tol, fn, out, c


def stats_line(name, out, ref, w, c):
    lp, steps = out
    err = float(np.max(np.abs(np.asarray(lp, np.float64) - ref)))
    nfe = np.asarray(steps) * TSIT5_NFE
    return (
        f"  {name:<34} warm {w * 1e3:8.1f} ms  cold {c:5.2f} s  NFE max {int(nfe.max()):4d} "
        f"mean {float(nfe.mean()):6.1f}  max|err| {err:.1e}"
    )


def compare(title, key, v, path, prior, make, xs, ref, repeats, results):
    """diffjax's untuned default against the minimal solve at its tuned tolerance, interleaved; prints both and
    returns the minimal solve's output (log p, steps)."""

    def dj_one(x):
        r = log_likelihood_with_stats(v, path, x, prior_log_prob=prior)
        return r.log_prob, r.num_steps

    dj = jax.jit(jax.vmap(dj_one))
    c_dj, out_dj = cold(dj, xs)
    tol, mn, out_mn, c_mn = tuned(make, xs, ref)
    w_dj, w_mn = warm_interleaved([dj, mn], (xs,), repeats)
    print(title)
    print(stats_line("diffjax default", out_dj, ref, w_dj, c_dj))
    print(stats_line(f"minimal diffrax, tol {tol:.0e}", out_mn, ref, w_mn, c_mn))
    print(f"  ratio minimal / diffjax (warm): {w_mn / w_dj:.2f}")
    results[key] = dict(diffjax_ms=w_dj * 1e3, minimal_ms=w_mn * 1e3, minimal_tol=tol)
    return out_mn


# --- cases ----------------------------------------------------------------------------------------------------
def wide_mixture():
    return GaussianMixture(
        jnp.array([0.5, 0.3, 0.2]),
        jnp.array([[-1.0, 0.5], [1.0, 1.0], [0.5, -1.5]]),
        jnp.array([[0.3, 0.2], [0.1, 0.4], [0.2, 0.2]]),
    )


def ring_mixture():
    ang = jnp.arange(8) * (2 * jnp.pi / 8)
    means = 2.0 * jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
    return GaussianMixture(jnp.ones(8) / 8, means, 0.0025 * jnp.ones((8, 2)))


def bench_oracle(name, gm, path, n, repeats, results):
    xs = gm.sample(jax.random.key(0), n)
    t0, t1 = float(path.t_min), float(path.t_max)
    v = lambda t, z: gm.velocity(path, t, z)
    exact_prior = lambda z: gm.marginal_log_prob(path, t0, z)
    ref = np.asarray(jax.vmap(lambda x: gm.marginal_log_prob(path, t1, x))(xs), np.float64)

    make = lambda tol, ch=None: jax.jit(
        jax.vmap(lambda x: minimal_log_likelihood(v, exact_prior, x, t0, t1, tol, ch))
    )
    title = f"{name} ({n} points, exact trace)"
    out_mn = compare(title, name, v, path, exact_prior, make, xs, ref, repeats, results)
    nfe_t = int(np.max(out_mn[1])) * TSIT5_NFE
    changes = {"linear time τ": linear_time(path)}
    if math.isfinite(float(path.log_snr(t0))):
        changes["log-SNR λ"] = log_snr_time(path)
    for cname, ch in changes.items():
        tol_c, _, out_c, _ = tuned(lambda tol, ch=ch: make(tol, ch), xs, ref)
        err = float(np.max(np.abs(np.asarray(out_c[0], np.float64) - ref)))
        nfe_c = int(np.max(out_c[1])) * TSIT5_NFE
        print(
            f"  time variable {cname:<14} tol {tol_c:.0e}: NFE max {nfe_c:4d} (t: {nfe_t}), "
            f"max|err| {err:.1e}, NFE ratio t / {cname.split()[-1]} = {nfe_t / nfe_c:.2f}"
        )
    return xs, ref


def init_mlp(key, dim=64, width=256):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (width, dim + 1)) / math.sqrt(dim + 1),
        "w2": jax.random.normal(k2, (width, width)) / math.sqrt(width),
        "w3": 0.5 * jax.random.normal(k3, (dim, width)) / math.sqrt(width),
    }


def mlp(params, t, x):
    h = jnp.tanh(params["w1"] @ jnp.concatenate([x, t[None]]))
    h = jnp.tanh(params["w2"] @ h)
    return params["w3"] @ h


def mlp_reference(params, xs):
    """float64 Dopri8 at tol 1e-11 of the same (float32-drawn) weights; x64 is on for this one solve only."""
    host = {k: np.asarray(v, np.float64) for k, v in params.items()}
    jax.config.update("jax_enable_x64", True)
    try:
        p64 = {k: jnp.asarray(v, jnp.float64) for k, v in host.items()}
        prior = LinearPath().prior.log_prob

        def one(x):
            def vf(t, y, args):
                u, lin = jax.linearize(lambda z: mlp(p64, t, z), y[0])
                return u, jnp.trace(jax.vmap(lin)(jnp.eye(x.size, dtype=x.dtype)))

            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(vf), diffrax.Dopri8(), 1.0, 0.0, None, (x, jnp.zeros((), x.dtype)),
                stepsize_controller=diffrax.PIDController(rtol=1e-11, atol=1e-11),
                saveat=diffrax.SaveAt(t1=True), max_steps=MAX_STEPS,
            )
            return prior(sol.ys[0][0]) + sol.ys[1][0]

        return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(np.asarray(xs), jnp.float64)))
    finally:
        jax.config.update("jax_enable_x64", False)


def bench_mlp(n, repeats, results):
    params = init_mlp(jax.random.key(1))
    path = LinearPath()
    xs = jax.random.normal(jax.random.key(2), (n, 64))
    ref = mlp_reference(params, xs)
    v = lambda t, z: mlp(params, t, z)

    prior = path.prior.log_prob
    make = lambda tol: jax.jit(
        jax.vmap(lambda x: minimal_log_likelihood(v, prior, x, 0.0, 1.0, tol))
    )
    title = f"random MLP 64-D, linear path ({n} points, exact trace: 64 JVPs per evaluation)"
    compare(title, "mlp64", v, path, prior, make, xs, ref, repeats, results)
    return params, xs, ref


# --- Meta flow_matching ---------------------------------------------------------------------------------------
def _have_flow_matching():
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "flow_matching"))


def _torch_mixture(gm):
    import torch

    w = torch.tensor(np.asarray(gm.weights), dtype=torch.float32)
    mu = torch.tensor(np.asarray(gm.means), dtype=torch.float32)
    var = torch.tensor(np.asarray(gm.variances), dtype=torch.float32)

    def velocity(x, t):
        """The mixture's exact velocity on the linear path, in torch (t = 0 noise, t = 1 data)."""
        m, c = t * mu[None], t * t * var[None] + (1 - t) ** 2
        dc, d = 2 * t * var[None] - 2 * (1 - t), x[:, None, :] - m
        logj = torch.log(w)[None] - 0.5 * ((d * d / c) + torch.log(2 * math.pi * c)).sum(-1)
        return (torch.softmax(logj, dim=-1)[..., None] * (mu[None] + 0.5 * dc / c * d)).sum(1)

    return velocity


def _torch_mlp(params):
    import torch

    w = {k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in params.items()}

    def velocity(x, t):
        tt = torch.full((x.shape[0], 1), float(t), dtype=x.dtype)
        h = torch.tanh(torch.cat([x, tt], 1) @ w["w1"].T)
        return torch.tanh(h @ w["w2"].T) @ w["w3"].T

    return velocity


def bench_flow_matching(name, velocity, xs, ref, w_dj, repeats):
    """flow_matching's compute_likelihood on the same field, tuned to ≤ TARGET like the minimal solve."""
    import torch
    from flow_matching.solver import ODESolver
    from flow_matching.utils import ModelWrapper

    calls = [0]

    class Model(ModelWrapper):
        def __init__(self):
            super().__init__(torch.nn.Identity())

        def forward(self, x, t, **extras):
            calls[0] += 1
            return velocity(x, t)

    solver, x = ODESolver(velocity_model=Model()), torch.tensor(np.asarray(xs), dtype=torch.float32)
    dim = x.shape[1]
    normal = torch.distributions.Independent(torch.distributions.Normal(torch.zeros(dim), 1.0), 1)

    def run(tol):
        return solver.compute_likelihood(
            x_1=x, log_p0=normal.log_prob, step_size=None, method="dopri5", atol=tol, rtol=tol,
            exact_divergence=True, time_grid=torch.tensor([1.0, 0.0]),
        )[1]

    for tol in TOLS:
        calls[0] = 0
        tic = time.perf_counter()
        out = run(tol).detach().numpy()
        first, nfe = time.perf_counter() - tic, calls[0]
        err = float(np.max(np.abs(out.astype(np.float64) - ref)))
        if err <= TARGET:
            break
    # torch at the faster of 1 thread and its default (on a loaded 2-core machine OpenMP's spinning threads can
    # make the default many times slower); the same tolerance for both
    rates = {}
    default_threads = torch.get_num_threads()
    for threads in sorted({1, default_threads}):
        torch.set_num_threads(threads)
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            run(tol)
            times.append(time.perf_counter() - tic)
        rates[threads] = statistics.median(times)
    torch.set_num_threads(default_threads)
    threads, w = min(rates.items(), key=lambda kv: kv[1])
    print(
        f"  {'flow_matching dopri5, tol ' + f'{tol:.0e}':<34} warm {w * 1e3:8.1f} ms  first {first:5.2f} s  "
        f"NFE {nfe:4d} (one ODE for the batch, {threads} torch thread(s))  max|err| {err:.1e}  "
        "ratio flow_matching / diffjax: "
        f"{w / w_dj:.2f}"
    )
    return w


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer points and repeats")
    args = ap.parse_args()
    n_mix, n_mlp, repeats = (512, 64, 3) if args.quick else (4096, 256, 5)
    print(
        f"jax {jax.__version__}, diffrax {diffrax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}, "
        f"dtype {jnp.result_type(float)}; target max|err| <= {TARGET:g} nats; tolerance grid {TOLS}"
    )
    fm = _have_flow_matching()
    if not fm:
        print("flow_matching / torch: not installed (optional `bench` extra) -- skipping them")
    results = {}
    for gname, gm in (("mixture", wide_mixture()), ("ring", ring_mixture())):
        for pname, path in (("linear", LinearPath()), ("cosine", CosinePath()), ("VP", VPPath())):
            name = f"{gname} 2-D, {pname} path"
            xs, ref = bench_oracle(name, gm, path, n_mix, repeats, results)
            if fm and pname == "linear":
                bench_flow_matching(
                    name, _torch_mixture(gm), xs, ref, results[name]["diffjax_ms"] / 1e3, repeats
                )
    params, xs, ref = bench_mlp(n_mlp, repeats, results)
    if fm:
        bench_flow_matching("mlp64", _torch_mlp(params), xs, ref, results["mlp64"]["diffjax_ms"] / 1e3, 1)


if __name__ == "__main__":
    main()
