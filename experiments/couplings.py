"""Couplings: independent vs minibatch-OT vs Schrödinger-bridge pairing of noise and data (``diffjax.couplings``).

Time convention: **t = 0 is noise (the source), t = 1 is data**; every flow runs from t = 0 to t = 1.

Part 1, the known OT map. Source N(0, I), target N(m, A²) in 2-D with A symmetric positive definite: the OT map is
T(x) = m + A·x and its displacement interpolation x_t = x + t·(T(x) − x) is straight. For each batch size B the
same number of (noise, data) pairs is drawn, paired within batches of B by the exact minibatch OT
(``MinibatchOT()``, ott-jax's Hungarian; all batches in one vmapped dispatch). Reported, as E‖· − T(x)‖ over 4000
test points: the learned *straight* map x ↦ x + u(0, x), with u(0, x) = E[x₁ − x₀ | x₀ = x] fitted by least
squares linear in x (the exact model class; it tends to T − id only if the pairing tends to the OT coupling); and,
for a whole field u(t, x) = Σ_k t^k (W_k x + b_k), k ≤ 5, fitted by least squares to the flow-matching target
x₁ − x₀ at x_t = t x₁ + (1 − t) x₀, t ~ U(0, 1) (the exact minimiser of the empirical CFM loss over that class),
its one-step map x + u(0, x) and its flow map (RK4, 100 steps). The independent coupling at the largest B is the
control: its straight map collapses towards m, while its flow map is T as well (for Gaussians every matrix
involved commutes with A).

Part 2, 2-D toys. Gaussian N(0, I) → checkerboard (trained with ``diffjax.batch_loss(..., coupling=...)`` on
``LinearPath``), and 8 Gaussians → moons (the 8-Gaussians mixture as a non-Gaussian source,
``diffjax.interpolants.MixtureSource``, with a small interpolant loss below). For each toy three MLP velocity
models are trained on the SAME batches, steps, initialisation and optimizer, differing only in the coupling:
``independent``, ``ot`` (exact minibatch OT) and ``sb`` (``SchrodingerBridge(sigma=0.5)``: entropic plan with
ε = 2σ² and the Brownian-bridge path). Reported per model: mean NFE of the adaptive solve (Tsit5,
rtol = atol = 1e-5), energy distance to held-out data at 2, 4, 8 Euler steps and adaptive (with the data-vs-data
floor), the test NLL by the exact-trace likelihood ODE (source log-density at t = 0), and two straightness
measures along Heun trajectories (32 steps): S = ∫ E‖(X₁ − X₀) − u(t, X_t)‖² dt (0 for straight paths;
Liu et al. 2023) and the path-length ratio E[∫‖u‖dt / ‖X₁ − X₀‖] (1 for straight paths). Trajectory plots:
WORKDIR/{checkerboard,moons}_trajectories.png.

    python experiments/couplings.py --quick   # 1000 steps per model at batch 128 (5 min on 2 loaded cores)
    python experiments/couplings.py           # 5000 steps per model at batch 256

Writes WORKDIR/metrics.json and ends stdout with one JSON line: ``nfe`` = {coupling: mean adaptive NFE over the
two toys}, ``nfe_reduction_ot`` = 1 − NFE(ot)/NFE(independent), the per-toy tables and the known-OT-map errors.
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

T0 = time.perf_counter()
COUPLINGS = ("independent", "ot", "sb")
SB_SIGMA = 0.5
EULER_STEPS = (2, 4, 8)
#: the known-OT-map toy: target N(M, A²)
A_MAT = ((1.5, 0.5), (0.5, 0.8))
M_VEC = (2.0, -1.0)
POLY_DEGREE = 5


def log(*a):
    print("[couplings]", *a, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps per model (5000; quick 1500)"
    )
    p.add_argument("--batch-size", type=int, default=None, help="(256; quick 128)")
    p.add_argument("--n", type=int, default=None, help="samples per metric (3000; quick 1000)")
    p.add_argument(
        "--n-nll", type=int, default=None, help="test points for the NLL (1000; quick 300)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default runs/couplings[_quick]")
    p.add_argument("--quick", action="store_true", help="shorter training and fewer samples")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Part 1: the known OT map
# ---------------------------------------------------------------------------------------------------------------


def _poly_features(t, x):
    """[t^k·x, t^k] for k = 0..POLY_DEGREE: the linear-in-x, polynomial-in-t velocity model's features."""
    import numpy as np  # noqa: PLC0415

    powers = np.stack([t**k for k in range(POLY_DEGREE + 1)], axis=1)  # (n, K)
    xf = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # (n, D + 1)
    return (powers[:, :, None] * xf[:, None, :]).reshape(len(x), -1)


def known_ot_map(batch_sizes, n_total: int, seed: int) -> dict:
    """Fit u(t, x) on minibatch-OT pairs at each batch size; errors of the one-step and flow maps against T."""
    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    a, m = np.asarray(A_MAT), np.asarray(M_VEC)
    pair = eqx.filter_jit(lambda c, k, x0, x1: jax.vmap(c.pair)(k, x0, x1))
    rng = np.random.default_rng(seed + 1)
    x_test = rng.normal(size=(4000, 2))
    t_map = x_test @ a.T + m

    def fit(coupling, b):
        r = n_total // b
        k0, k1, kp = jax.random.split(jax.random.key(seed * 100_003 + b), 3)
        x0 = jax.random.normal(k0, (r, b, 2))
        x1 = jax.random.normal(k1, (r, b, 2)) @ jax.numpy.asarray(a.T, x0.dtype) + m.astype(
            np.float32
        )
        # all r minibatches paired in one dispatch (the coupling is vmap-able)
        j = np.asarray(pair(coupling, jax.random.split(kp, r), x0, x1))
        x0 = np.take_along_axis(np.asarray(x0, np.float64), j[..., None], axis=1).reshape(-1, 2)
        x1 = np.asarray(x1, np.float64).reshape(-1, 2)
        # the learned straight map: u(0, x) = E[x1 - x0 | x0 = x], fitted linear in x (the exact model class)
        feats0 = np.concatenate([x0, np.ones((len(x0), 1))], axis=1)
        c0, *_ = np.linalg.lstsq(feats0, x1 - x0, rcond=None)
        straight = x_test + np.concatenate([x_test, np.ones((len(x_test), 1))], axis=1) @ c0
        # the whole field u(t, x), polynomial in t, and its flow map
        t = rng.uniform(size=len(x0))
        xt = t[:, None] * x1 + (1 - t[:, None]) * x0
        coef, *_ = np.linalg.lstsq(_poly_features(t, xt), x1 - x0, rcond=None)

        def u(tt, x):
            return _poly_features(np.full(len(x), tt), x) @ coef

        x, h = x_test.copy(), 1.0 / 100
        for i in range(100):  # RK4
            ti = i * h
            k1_ = u(ti, x)
            k2_ = u(ti + h / 2, x + h / 2 * k1_)
            k3_ = u(ti + h / 2, x + h / 2 * k2_)
            k4_ = u(ti + h, x + h * k3_)
            x = x + h / 6 * (k1_ + 2 * k2_ + 2 * k3_ + k4_)
        err = lambda y: float(np.mean(np.linalg.norm(y - t_map, axis=1)))
        return {
            "straight_map_error": err(straight),
            "one_step_error": err(x_test + u(0.0, x_test)),
            "flow_map_error": err(x),
        }

    out = {"ot": {}, "n_pairs": n_total, "batch_sizes": list(batch_sizes)}
    for b in batch_sizes:
        tic = time.perf_counter()
        out["ot"][str(b)] = fit(dj.MinibatchOT(), b)
        log(f"  known OT map, B={b}: {out['ot'][str(b)]} ({time.perf_counter() - tic:.1f}s)")
    out["independent"] = {str(batch_sizes[-1]): fit(dj.Independent(), batch_sizes[-1])}
    log(f"  known OT map, independent: {out['independent']}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# Part 2: 2-D toys
# ---------------------------------------------------------------------------------------------------------------


def eight_gaussians():
    """The 8-Gaussians data set as a GaussianMixture (the moons toy's source, with a log-density)."""
    import diffjax as dj  # noqa: PLC0415

    return dj.data.eight_gaussians_mixture()


def coupling_for(name: str):
    import diffjax as dj  # noqa: PLC0415

    return {
        "independent": dj.Independent(),
        "ot": dj.MinibatchOT(),
        "sb": dj.SchrodingerBridge(SB_SIGMA),
    }[name]


def interpolant_loss(interpolant, fn, xs, key, *, coupling, margin=1e-5):
    """The flow-matching loss of a stochastic interpolant from its source (t = 0) to the data xs (t = 1), with
    the source draws re-paired by ``coupling``: mean ‖fn(t, x_t) − (α̇x₁ + β̇x₀ + γ̇z)‖², t ~ U(margin, 1 − margin)
    (γ̇ is infinite at the ends of the Brownian γ)."""
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    n = xs.shape[0]
    k_t, k_0, k_p, k_z = jax.random.split(key, 4)
    t = jax.random.uniform(k_t, (n,), xs.dtype, margin, 1.0 - margin)
    x0 = jax.vmap(lambda k: interpolant.source.sample(k, xs.shape[1:]))(jax.random.split(k_0, n))
    x0 = x0[coupling.pair(k_p, x0, xs)]
    z = jax.random.normal(k_z, xs.shape, xs.dtype)
    xt = jax.vmap(interpolant._interpolate)(t, x0, xs, z)
    target = jax.vmap(interpolant._velocity_target)(t, x0, xs, z)
    return jnp.mean(jnp.sum(jnp.square(jax.vmap(fn)(t, xt) - target), axis=-1))


def train_model(toy: str, coupling_name: str, batch_fn, args):
    """One velocity MLP trained with ``coupling_name`` on ``toy``; returns (model, interpolant, seconds)."""
    import equinox as eqx  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415
    from diffjax import interpolants as si  # noqa: PLC0415

    coupling = coupling_for(coupling_name)
    gamma = si.BrownianGamma(SB_SIGMA**2) if coupling_name == "sb" else si.ZeroGamma()
    if toy == "checkerboard":
        # N(0, I) → checkerboard through the library objective: batch_loss with coupling= (SB adds its bridge)
        interpolant = si.StochasticInterpolant(si.GaussianSource(), dj.LinearPath(), gamma)
        objective = dj.flow_matching()
        loss_fn = functools.partial(dj.batch_loss, coupling=coupling)
    else:
        interpolant = si.StochasticInterpolant(
            si.MixtureSource(eight_gaussians()), dj.LinearPath(), gamma
        )
        objective = interpolant
        loss_fn = functools.partial(interpolant_loss, coupling=coupling)
    apply, params = dj.nn.split(
        nnx.jit(lambda: dj.nn.MLP(2, hidden=args.hidden, depth=3, rngs=nnx.Rngs(args.seed)))()
    )
    config = dj.train.TrainConfig(
        total_steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=2e-3,
        warmup_steps=min(100, args.steps // 10),
        ema_decay=0.995,
        seed=args.seed,
    )
    tic = time.perf_counter()
    state, hist = dj.train.fit(
        apply,
        params,
        objective,
        batch_fn,
        config,
        loss_fn=loss_fn,
        progress=False,
        steps_per_dispatch=50,
        log_every=max(50, args.steps // 10),
    )
    secs = time.perf_counter() - tic
    log(f"  {toy}/{coupling_name}: {args.steps} steps in {secs:.1f}s, loss {hist['loss'][-1]:.3f}")
    # sampling and likelihood need only the start (the source; the bridge's γ_0 = 0) and the path: evaluate
    # every coupling's model on the γ = 0 interpolant, so the three models share the compiled programs
    sampler = si.StochasticInterpolant(interpolant.source, interpolant.path, si.ZeroGamma())
    return eqx.Partial(apply, state.ema_params), sampler, secs


@functools.cache
def _programs():
    """Jitted batch programs (the model and interpolant are arguments: one compile per source and shape).

    The evaluation is compile-bound (each program runs a few times), so these are compiled without XLA's
    backend optimisation passes, as the test suite compiles everything; training keeps XLA's defaults (the OT
    solvers run thousands of times and are 2-3x slower unoptimised).
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from diffjax import interpolants as si  # noqa: PLC0415

    def jit(fn=None, **kw):
        if fn is None:
            return functools.partial(jit, **kw)
        return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)

    @jit
    def adaptive(model, interp, keys):
        def one(k):
            r = si.sample_ode(interp, model, k, shape=(2,))
            return r.samples, r.nfe

        return jax.vmap(one)(keys)

    def scan_solve(model, x0, num_steps, heun):
        """Euler or Heun on the uniform grid 0 = t_0 < ... < t_N = 1 (a lax.scan: cheap to compile); returns the
        N + 1 states and their times (t = 0 noise, t = 1 data)."""
        ts = jnp.linspace(0.0, 1.0, num_steps + 1, dtype=x0.dtype)

        def step(x, tt):
            t0, t1 = tt
            u0 = model(t0, x)
            if not heun:
                return x + (t1 - t0) * u0, x
            xe = x + (t1 - t0) * u0
            return x + 0.5 * (t1 - t0) * (u0 + model(t1, xe)), x

        x1, xs = jax.lax.scan(step, x0, (ts[:-1], ts[1:]))
        return jnp.concatenate([xs, x1[None]]), ts

    def start(interp, keys):
        # the x₀ that interpolants.sample_ode draws for the same key: every solver starts from the same points
        return jax.vmap(lambda k: interp.start().sample(jax.random.split(k)[0], (2,)))(keys)

    @jit(static_argnames="num_steps")
    def euler(model, interp, keys, num_steps):
        x0 = start(interp, keys)
        return jax.vmap(lambda x: scan_solve(model, x, num_steps, False)[0][-1])(x0)

    @jit
    def trajectories(model, interp, keys):
        """Heun, 32 uniform steps: the trajectory, the velocity along it and the straightness measures."""

        def one(x0):
            xs, ts = scan_solve(model, x0, 32, True)
            us = jax.vmap(model)(ts, xs)
            disp = xs[-1] - xs[0]
            dev = jnp.sum(jnp.square(disp[None] - us), axis=-1)
            speed = jnp.linalg.norm(us, axis=-1)
            trap = lambda f: jnp.sum(0.5 * (f[1:] + f[:-1]) * jnp.diff(ts))
            return xs, trap(dev), trap(speed) / (jnp.linalg.norm(disp) + 1e-12)

        return jax.vmap(one)(start(interp, keys))

    @jit
    def nll(model, interp, xs):
        return -jax.vmap(lambda x: si.log_likelihood(interp, model, x))(xs)

    return adaptive, euler, trajectories, nll


def evaluate(model, interp, test, floor_set, args, key) -> dict:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from diffjax_app import metrics  # noqa: PLC0415

    adaptive, euler, trajectories, nll = _programs()
    keys = jax.random.split(key, args.n)
    ed = lambda xs: float(metrics.energy_distance(jnp.asarray(xs), test))
    xs, nfe = adaptive(model, interp, keys)
    out = {"nfe": float(np.mean(np.asarray(nfe))), "energy_distance": {"adaptive": ed(xs)}}
    for n_steps in EULER_STEPS:
        out["energy_distance"][f"euler{n_steps}"] = ed(euler(model, interp, keys, n_steps))
    traj, dev, ratio = trajectories(model, interp, keys[: min(args.n, 1000)])
    out["straightness"] = float(np.mean(np.asarray(dev)))
    out["path_length_ratio"] = float(np.mean(np.asarray(ratio)))
    lp = np.asarray(nll(model, interp, floor_set[: args.n_nll]), np.float64)
    out["test_nll"] = float(np.mean(lp))
    out["test_nll_se"] = float(np.std(lp, ddof=1) / math.sqrt(len(lp)))
    return out, np.asarray(traj[:300])


def plot_trajectories(toy: str, trajs: dict, table: dict, workdir: str) -> str | None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(trajs), figsize=(4.2 * len(trajs), 4.2), squeeze=False)
    for ax, (name, tr) in zip(axes[0], trajs.items()):
        for path in tr[:200]:
            ax.plot(path[:, 0], path[:, 1], color="0.6", lw=0.4, alpha=0.6)
        ax.scatter(tr[:, 0, 0], tr[:, 0, 1], s=3, c="tab:blue", label="t = 0 (source)")
        ax.scatter(tr[:, -1, 0], tr[:, -1, 1], s=3, c="tab:red", label="t = 1 (samples)")
        r = table[name]
        ax.set_title(
            f"{name}: NFE {r['nfe']:.0f}, S {r['straightness']:.2f}, "
            f"ED(Euler 2) {r['energy_distance']['euler2']:.3f}",
            fontsize=8,
        )
        ax.set_aspect("equal")
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{toy}: trajectories (Heun, 32 steps; t = 0 noise → t = 1 data)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(workdir, f"{toy}_trajectories.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def toy_experiment(toy: str, args, workdir: str) -> dict:
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415
    from diffjax_app import metrics  # noqa: PLC0415

    data_name = "checkerboard" if toy == "checkerboard" else "moons"
    data_key = jax.random.key(args.seed + 17)
    # the same batches for every coupling: a pure function of the step
    batch_fn = lambda s: dj.data.toy_sample(
        data_name, jax.random.fold_in(data_key, s), args.batch_size
    )
    test = np.asarray(dj.data.toy_sample(data_name, jax.random.key(args.seed + 1001), args.n))
    floor_set = np.asarray(dj.data.toy_sample(data_name, jax.random.key(args.seed + 1002), args.n))
    table, trajs = {}, {}
    for name in COUPLINGS:
        model, interp, secs = train_model(toy, name, batch_fn, args)
        tic = time.perf_counter()
        table[name], trajs[name] = evaluate(
            model, interp, test, floor_set, args, jax.random.key(args.seed + 7)
        )
        table[name]["train_seconds"] = round(secs, 1)
        log(f"  {toy}/{name}: {json.dumps(table[name])} (eval {time.perf_counter() - tic:.1f}s)")
    floor = float(metrics.energy_distance(jax.numpy.asarray(floor_set), jax.numpy.asarray(test)))
    fig = plot_trajectories(toy, trajs, table, workdir)
    return {
        "source": "gaussian" if toy == "checkerboard" else "8gaussians",
        "floor": floor,
        "table": table,
        "figure": fig,
    }


def main(argv=None):
    args = _parser().parse_args(argv)
    q = args.quick
    args.steps = args.steps or (1000 if q else 5000)
    args.batch_size = args.batch_size or (128 if q else 256)
    args.n = args.n or (800 if q else 3000)
    args.n_nll = args.n_nll or (200 if q else 1000)
    args.hidden = 128 if q else 256
    workdir = args.workdir or os.path.join("runs", "couplings_quick" if q else "couplings")
    os.makedirs(workdir, exist_ok=True)
    log(f"steps={args.steps} batch={args.batch_size} n={args.n} workdir={workdir}")

    batch_sizes = (8, 32, 128) if q else (8, 32, 128, 512)
    results = {"known_ot_map": known_ot_map(batch_sizes, 8192 if q else 16384, args.seed)}
    results["toys"] = {toy: toy_experiment(toy, args, workdir) for toy in ("checkerboard", "moons")}
    toys = results["toys"]
    nfe = {
        c: round(sum(t["table"][c]["nfe"] for t in toys.values()) / len(toys), 2) for c in COUPLINGS
    }
    head = {
        "nfe": nfe,
        "nfe_reduction_ot": round(1.0 - nfe["ot"] / nfe["independent"], 3),
        "nfe_reduction_sb": round(1.0 - nfe["sb"] / nfe["independent"], 3),
        "nfe_by_toy": {k: {c: t["table"][c]["nfe"] for c in COUPLINGS} for k, t in toys.items()},
        "energy_distance": {
            k: {
                c: {s: round(v, 4) for s, v in t["table"][c]["energy_distance"].items()}
                for c in COUPLINGS
            }
            | {"floor": round(t["floor"], 4)}
            for k, t in toys.items()
        },
        "test_nll": {
            k: {c: round(t["table"][c]["test_nll"], 3) for c in COUPLINGS} for k, t in toys.items()
        },
        "straightness": {
            k: {c: round(t["table"][c]["straightness"], 3) for c in COUPLINGS}
            for k, t in toys.items()
        },
        "path_length_ratio": {
            k: {c: round(t["table"][c]["path_length_ratio"], 4) for c in COUPLINGS}
            for k, t in toys.items()
        },
        "known_ot_map_straight_map_error": {
            b: round(v["straight_map_error"], 4) for b, v in results["known_ot_map"]["ot"].items()
        }
        | {
            "independent": round(
                next(iter(results["known_ot_map"]["independent"].values()))["straight_map_error"], 4
            )
        },
        "known_ot_map_one_step_error": {
            b: round(v["one_step_error"], 4) for b, v in results["known_ot_map"]["ot"].items()
        }
        | {
            "independent": round(
                next(iter(results["known_ot_map"]["independent"].values()))["one_step_error"], 4
            )
        },
        "known_ot_map_flow_map_error": {
            b: round(v["flow_map_error"], 4) for b, v in results["known_ot_map"]["ot"].items()
        }
        | {
            "independent": round(
                next(iter(results["known_ot_map"]["independent"].values()))["flow_map_error"], 4
            )
        },
        "steps": args.steps,
        "batch_size": args.batch_size,
        "sb_sigma": SB_SIGMA,
        "seconds": round(time.perf_counter() - T0, 1),
    }
    results["headline"] = head
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(head))


if __name__ == "__main__":
    main()
