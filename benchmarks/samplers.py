"""Benchmark: the exact solver error of diffjax's fixed-step samplers, against the Gaussian-mixture oracle.

Time convention: t = 0 is noise, t = 1 is data (x_t = α_t·x + σ_t·ε). float64 throughout.

The model is perfect — ``GaussianMixture.model(kind, path)`` is the exact prediction of its kind for a fixed 2-D,
6-component mixture with small variances — so the only error left in a sample is the sampler's discretisation
of the probability-flow ODE. For each (path, kind) — VP and cosine with an ε- and a data-model, the linear path
with a velocity model — a batch of starting points x0 is carried from t0 to t1 (``dj.integration_interval(path,
kind)``) by every sampler of ``dj.samplers`` at NFE 5, 10, 20, 50, 100, 200, 500, 1000, and by a reference
solve of the same ODE, from the same x0 over the same [t0, t1]: adaptive Dopri8 at rtol = atol = 1e-10 on the
oracle's exact PF-ODE velocity (``GaussianMixture.model("velocity", path)``), itself checked against
rtol = atol = 1e-12.

* Endpoint error: mean over the batch of the Euclidean norm ‖x_sampler − x_ref‖₂ of each 2-D sample.
* Each sampler runs on its customary grid (Euler: uniform in t; DDIM, DPM-Solver++ 2M/3M and UniPC: uniform in
  log-SNR; EDM Heun: Karras's ρ = 7 spacing); the full run adds the other grids for the VP ε-model.
* NFE = model evaluations, from ``res.nfe``: one per step, except EDM Heun (two per step, one on a step from
  α = 0 or to σ = 0), which gets the most steps whose NFE fits in the budget; errors are tabulated at the
  budget, orders fitted against the NFE actually spent (``nfe`` in the JSON).
* Order: p = −slope of the least-squares line of log(error) against log(NFE) over NFE ≥ 100 (budget; ≥ 20
  with ``--quick``), leaving out points within 30× of the reference's own error; the table also shows the local
  order between neighbours (UniPC reaches its order 3 only above NFE ≈ 200 here).
* Wall time: cold (first call: trace + compile + run) and warm (best of repeated calls) of one jitted, vmapped
  call per sampler at NFE 20 on 4096 points, beside ``sample_ode`` with fixed-step Heun (diffrax) at the same
  NFE on the log-SNR grid.
* End-step check (full run): where λ = ±inf at an end of [t0, t1] (cosine, linear), the log-SNR grid clips that
  end to λ(t ± 1e-3·(t1 − t0)), so its first/last step has a fixed size whatever N; 2M, 3M and UniPC are run
  again with that end moved inside by 1e-6, where λ is finite.

The last line of standard output is one JSON object: ``endpoint_error`` {sampler: {NFE: error}} and ``order``
{sampler: p} for the VP ε-model on the customary grids, then ``local_order``, ``nfe``, ``grid``, ``fit_nfe``,
``reference_error``, ``wall_ms``, ``other`` (the other paths and kinds), and in the full run ``grids`` (the VP
ε-model on the other grids) and ``finite_ends`` (the end-step check).

Run: ``python benchmarks/samplers.py`` (``--quick``: 16 points, NFE 10, 20, 50, 100, the customary grids only).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import diffjax as dj  # noqa: E402
from diffjax.analytic import GaussianMixture  # noqa: E402

#: sampler name → its customary grid.
SAMPLERS = {
    "euler": "uniform",
    "ddim": "log_snr",
    "dpmpp_2m": "log_snr",
    "dpmpp_3m": "log_snr",
    "unipc": "log_snr",
    "edm_heun": "edm",
}
#: model evaluations per step (EDM Heun: two, one on its last, Euler step; the others one).
EVALS_PER_STEP = {"edm_heun": 2}
#: (label, path, kind); the first is the headline case of the JSON's ``endpoint_error`` and ``order``.
CASES = (
    ("vp_eps", dj.paths.VPPath(), "eps"),
    ("vp_data", dj.paths.VPPath(), "data"),
    ("cosine_eps", dj.paths.CosinePath(), "eps"),
    ("cosine_data", dj.paths.CosinePath(), "data"),
    ("linear_velocity", dj.paths.LinearPath(), "velocity"),
)
ALL_GRIDS = ("uniform", "log_snr", "edm")
REF_TOL, CHECK_TOL = 1e-10, 1e-12
FIT_FLOOR = 30.0
TIMING_NFE = 20
#: the end-step check (full run): an end where λ = ±inf moved inside by this, so that λ is finite on the grid.
FINITE_END = 1e-6


def mixture() -> GaussianMixture:
    """6 components on a perturbed hexagon of radius 2, variances 0.01–0.06 per coordinate."""
    angles = np.arange(6) * np.pi / 3 + np.array([0.0, 0.1, -0.15, 0.05, 0.2, -0.1])
    radii = np.array([2.0, 1.8, 2.2, 1.6, 2.0, 2.4])
    means = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    variances = [[0.02, 0.05], [0.04, 0.02], [0.01, 0.03], [0.06, 0.04], [0.03, 0.01], [0.02, 0.02]]
    return GaussianMixture([0.25, 0.2, 0.15, 0.15, 0.15, 0.1], means, variances)


def num_steps_for(name: str, nfe: int, path, t0: float, t1: float) -> int:
    """The most steps within an NFE budget. EDM Heun spends 2 per step except on a step from α = 0 or to σ = 0,
    which stays Euler (``dj.sample``'s docstring): N = ⌊(NFE + k)/2⌋ with k such steps (0, 1 or 2)."""
    per = EVALS_PER_STEP.get(name, 1)
    if per == 1:
        return nfe
    k = int(float(path.alpha(t0)) == 0.0) + int(float(path.sigma(t1)) == 0.0)
    return max(1, (nfe + k) // per)


def reference(gm, path, t0, t1, x0s, tol):
    """Adaptive Dopri8 on the oracle's exact PF-ODE velocity, same x0 and [t0, t1]; (samples, max NFE)."""
    u = gm.model("velocity", path)
    key = jax.random.PRNGKey(0)

    @jax.jit
    def solve(x0s):
        def one(x0):
            r = dj.sample_ode(
                u,
                path,
                key,
                x0=x0,
                solver="dopri8",
                rtol=tol,
                atol=tol,
                max_steps=65536,
                t0=t0,
                t1=t1,
                throw=False,
            )
            return r.samples, r.nfe, r.status

        return jax.vmap(one)(x0s)

    xs, nfe, status = solve(x0s)
    if np.any(np.asarray(status) != 0):
        raise RuntimeError(f"reference solve failed (status {np.unique(np.asarray(status))})")
    return np.asarray(xs), int(np.max(nfe))


def sampler_fn(name, model, kind, path, grid, num_steps, t0, t1):
    """A jitted, vmapped ``dj.sample`` over a batch of x0 → (samples, nfe, status)."""
    sampler = dj.samplers.as_sampler(name)
    key = jax.random.PRNGKey(0)

    @jax.jit
    def run(x0s):
        def one(x0):
            r = dj.sample(
                sampler,
                model,
                kind,
                path,
                key,
                num_steps=num_steps,
                grid=grid,
                x0=x0,
                t0=t0,
                t1=t1,
                throw=False,
            )
            return r.samples, r.nfe, r.status

        return jax.vmap(one)(x0s)

    return run


def endpoint_error(xs, ref):
    err = np.linalg.norm(np.asarray(xs) - ref, axis=-1)
    return float(np.mean(err)) if np.all(np.isfinite(err)) else math.nan


def fit_order(nfes, errs, floor, fit_min):
    """(p, (lo, hi)) with error ∝ NFE^(−p) fitted on budget ≥ fit_min and error > FIT_FLOOR × floor."""
    pts = [
        (n, e)
        for (b, n), e in zip(nfes, errs)
        if b >= fit_min and math.isfinite(e) and e > FIT_FLOOR * floor
    ]
    if len(pts) < 2:
        return math.nan, None
    n, e = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    slope = np.polyfit(n, e, 1)[0]
    return float(-slope), (int(pts[0][0]), int(pts[-1][0]))


def sweep(gm, path, kind, x0s, budgets, fit_min, grids_of, quick_log, interval=None):
    """Errors of every sampler (on each of its grids) against the reference for one (path, kind), on
    ``interval`` or ``dj.integration_interval(path, kind)``."""
    t0, t1 = interval or (float(t) for t in dj.integration_interval(path, kind))
    ref, ref_nfe = reference(gm, path, t0, t1, x0s, REF_TOL)
    check, _ = reference(gm, path, t0, t1, x0s, CHECK_TOL)
    floor = endpoint_error(ref, check)
    model = gm.model(kind, path)
    rows = {}
    for name, grids in grids_of.items():
        for grid in grids:
            errs, nfes, failed = {}, {}, {}
            for b in budgets:
                fn = sampler_fn(
                    name, model, kind, path, grid, num_steps_for(name, b, path, t0, t1), t0, t1
                )
                xs, nfe, status = fn(x0s)
                status = np.asarray(status)
                errs[b] = endpoint_error(xs, ref)
                nfes[b] = int(np.max(nfe))
                if np.any(status != 0):
                    failed[b] = int(np.sum(status != 0))
            p, rng = fit_order(
                [(b, nfes[b]) for b in budgets], [errs[b] for b in budgets], floor, fit_min
            )
            rows[(name, grid)] = {
                "errors": errs,
                "nfe": nfes,
                "order": p,
                "fit": rng,
                "failed": failed,
            }
            quick_log(f"  {name}@{grid}: order {p:.2f}")
    return {"t0": t0, "t1": t1, "ref_nfe": ref_nfe, "floor": floor, "rows": rows}


def local_orders(r, budgets):
    """{"a-b": −Δlog(error)/Δlog(NFE)} between neighbouring budgets a < b."""
    out = {}
    for a, b in zip(budgets[:-1], budgets[1:]):
        ea, eb = r["errors"][a], r["errors"][b]
        ok = math.isfinite(ea) and math.isfinite(eb) and ea > 0 and eb > 0
        q = -math.log(eb / ea) / math.log(r["nfe"][b] / r["nfe"][a]) if ok else math.nan
        out[f"{a}-{b}"] = q
    return out


def print_table(label, path, kind, res, budgets):
    print(
        f"\n{label}: {type(path).__name__}, {kind}-model, t in [{res['t0']:.6g}, {res['t1']:.6g}]; "
        f"reference Dopri8 rtol=atol={REF_TOL:g} (max NFE {res['ref_nfe']}), "
        f"its error vs {CHECK_TOL:g}: {res['floor']:.1e}"
    )
    head = f"{'sampler':>10s} {'grid':>8s} | " + " ".join(f"{b:>8d}" for b in budgets)
    head += f" | {'order':>5s}  fit NFE"
    print(head)
    print("-" * len(head))
    for (name, grid), r in res["rows"].items():
        cells = []
        for b in budgets:
            e = r["errors"][b]
            cell = f"{e:8.1e}" if math.isfinite(e) else f"{'nan':>8s}"
            cells.append(cell + ("*" if b in r["failed"] else ""))
        fit = f"{r['fit'][0]}-{r['fit'][1]}" if r["fit"] else "-"
        print(f"{name:>10s} {grid:>8s} | " + " ".join(cells) + f" | {r['order']:5.2f}  {fit}")
        actual = [r["nfe"][b] for b in budgets]
        if actual != list(budgets):
            print(f"{'':>10s} {'(NFE)':>8s} | " + " ".join(f"{n:>8d}" for n in actual))
        local = " ".join(f"{q:8.2f}" for q in local_orders(r, budgets).values())
        print(f"{'':>10s} {'local p':>8s} | {'':>4s}" + local)
    if any(r["failed"] for r in res["rows"].values()):
        print("  * some samples of this run reported a nonzero status (throw=False)")


def timings(gm, n, repeats):
    """Cold/warm ms of one jitted vmapped call at TIMING_NFE on the VP ε-model, n points."""
    path, kind = dj.paths.VPPath(), "eps"
    t0, t1 = (float(t) for t in dj.integration_interval(path, kind))
    model = gm.model(kind, path)
    x0s = jax.random.normal(jax.random.PRNGKey(2), (n, 2))
    fns = {
        name: sampler_fn(
            name, model, kind, path, grid, num_steps_for(name, TIMING_NFE, path, t0, t1), t0, t1
        )
        for name, grid in SAMPLERS.items()
    }
    u = dj.velocity_field(model, kind, path)
    key = jax.random.PRNGKey(0)

    @jax.jit
    def heun(x0s):
        def one(x0):
            r = dj.sample_ode(
                u,
                path,
                key,
                x0=x0,
                solver="heun",
                num_steps=TIMING_NFE // 2,
                grid="log_snr",
                t0=t0,
                t1=t1,
                throw=False,
            )
            return r.samples, r.nfe, r.status

        return jax.vmap(one)(x0s)

    fns["sample_ode heun (diffrax)"] = heun
    out = {}
    for name, fn in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(fn(x0s))
        cold = time.perf_counter() - t
        warm = []
        for _ in range(repeats):
            t = time.perf_counter()
            jax.block_until_ready(fn(x0s))
            warm.append(time.perf_counter() - t)
        out[name] = {"cold": cold * 1e3, "warm": min(warm) * 1e3, "nfe": int(np.max(fn(x0s)[1]))}
    return out


def _num(x):
    return None if not math.isfinite(x) else float(f"{x:.4g}")


def _summary(res, budgets, grids=None):
    rows = {
        name: r
        for (name, grid), r in res["rows"].items()
        if grids is None or grid == grids.get(name)
    }
    return {
        "endpoint_error": {
            n: {str(b): _num(r["errors"][b]) for b in budgets} for n, r in rows.items()
        },
        "order": {n: _num(r["order"]) for n, r in rows.items()},
        "local_order": {
            n: {k: _num(q) for k, q in local_orders(r, budgets).items()} for n, r in rows.items()
        },
        "nfe": {n: {str(b): r["nfe"][b] for b in budgets} for n, r in rows.items()},
        "fit_nfe": {n: r["fit"] for n, r in rows.items()},
        "failed": {
            n: {str(b): k for b, k in r["failed"].items()} for n, r in rows.items() if r["failed"]
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="16 points, NFE 10-100, customary grids only"
    )
    parser.add_argument("--points", type=int, default=None, help="x0 draws per case (default 64)")
    args = parser.parse_args()
    n = args.points or (16 if args.quick else 64)
    budgets = (10, 20, 50, 100) if args.quick else (5, 10, 20, 50, 100, 200, 500, 1000)
    fit_min = 20 if args.quick else 100
    n_time, repeats = 4096, (5 if args.quick else 9)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    gm = mixture()
    x0s = jax.random.normal(jax.random.PRNGKey(1), (n, 2))
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPU cores, "
        f"{platform.machine()}, float64 (x64={jax.config.jax_enable_x64}); diffjax {dj.__version__}"
    )
    print(
        f"workload: 2-D 6-component Gaussian mixture oracle, {n} x0 ~ N(0, I); error = mean over x0 of "
        f"||x_sampler - x_ref||_2; order fitted on NFE >= {fit_min}"
    )
    results = {}
    t_start = time.perf_counter()
    for i, (label, path, kind) in enumerate(CASES):
        if i == 0 and not args.quick:
            grids_of = {
                name: (g,) + tuple(x for x in ALL_GRIDS if x != g) for name, g in SAMPLERS.items()
            }
        else:
            grids_of = {name: (g,) for name, g in SAMPLERS.items()}
        log(f"{label} ({time.perf_counter() - t_start:.0f} s)")
        results[label] = sweep(gm, path, kind, x0s, budgets, fit_min, grids_of, log)
        print_table(label, path, kind, results[label], budgets)
    finite = {}
    if not args.quick:
        # The log-SNR grid clips an infinite λ end to λ(t ± 1e-3·(t1 − t0)), so its first/last step has a
        # fixed size whatever N: the same solves with that end moved inside by FINITE_END, where λ is finite.
        for label, path, kind in CASES:
            t0, t1 = (float(t) for t in dj.integration_interval(path, kind))
            lam0, lam1 = (float(path.log_snr(t)) for t in (t0, t1))
            if all(math.isfinite(v) and abs(v) <= 40.0 for v in (lam0, lam1)):
                continue
            ends = (
                t0 if math.isfinite(lam0) and abs(lam0) <= 40.0 else t0 + FINITE_END,
                t1 if math.isfinite(lam1) and abs(lam1) <= 40.0 else t1 - FINITE_END,
            )
            key = f"{label}@[{ends[0]:.6g},{ends[1]:.7g}]"
            log(f"{key} ({time.perf_counter() - t_start:.0f} s)")
            grids_of = {name: ("log_snr",) for name in ("dpmpp_2m", "dpmpp_3m", "unipc")}
            finite[key] = sweep(gm, path, kind, x0s, budgets, fit_min, grids_of, log, ends)
            print_table(f"{label}, finite-λ ends", path, kind, finite[key], budgets)
    log(f"timing ({time.perf_counter() - t_start:.0f} s)")
    wall = timings(gm, n_time, repeats)
    print(
        f"\nwall time, VP eps-model, NFE {TIMING_NFE}, {n_time} points, one jitted vmapped call "
        f"(cold: first call incl. compile; warm: best of {repeats})"
    )
    for name, w in wall.items():
        print(f"{name:>26s}  cold {w['cold']:8.1f} ms  warm {w['warm']:8.2f} ms  NFE {w['nfe']}")

    head = results[CASES[0][0]]
    summary = _summary(head, budgets, SAMPLERS)
    out = {
        "endpoint_error": summary["endpoint_error"],
        "order": summary["order"],
        "local_order": summary["local_order"],
        "nfe": summary["nfe"],
        "grid": dict(SAMPLERS),
        "fit_nfe": summary["fit_nfe"],
        "failed": summary["failed"],
        "reference_error": {label: _num(r["floor"]) for label, r in results.items()},
        "wall_ms": {k: {"cold": _num(w["cold"]), "warm": _num(w["warm"])} for k, w in wall.items()},
        "timing_nfe": TIMING_NFE,
        "fit_min_nfe": fit_min,
        "other": {label: _summary(r, budgets, SAMPLERS) for label, r in list(results.items())[1:]},
    }
    if not args.quick:
        extra = {
            f"{name}@{grid}": r
            for (name, grid), r in head["rows"].items()
            if grid != SAMPLERS[name]
        }
        out["grids"] = {
            "endpoint_error": {
                k: {str(b): _num(r["errors"][b]) for b in budgets} for k, r in extra.items()
            },
            "order": {k: _num(r["order"]) for k, r in extra.items()},
        }
        out["finite_ends"] = {key: _summary(r, budgets) for key, r in finite.items()}
    log(f"done ({time.perf_counter() - t_start:.0f} s)")
    sys.stdout.flush()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    logging.getLogger("jax").setLevel(logging.ERROR)
    main()
