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

* Optimized grids (VP and cosine ε-models): ``dj.grid_search.optimize_grid`` fits the N + 1 times of a sampler's
  grid (LD3-style: softmax increments, fixed ends, Adam on the mean endpoint distance to an adaptive Dopri8
  teacher at 1e-10) on 256 training x0 drawn with PRNGKey(7), from 8 starting grids (the lowest training loss
  wins); the error is then measured on this benchmark's own x0 (PRNGKey(1)), which the fit never saw. Rows
  ``{sampler}_optimized``: UniPC at NFE 5, 10, 20 and DPM-Solver++ 2M/3M at 10 (``--quick``: UniPC at 10). The
  full run also tabulates the fixed grids tried at NFE 10 (log-SNR, uniform, EDM ρ, SD3 shift, λ trimmed at the
  data end). Issue 12's criterion, best multistep at NFE 10 ≤ Euler (uniform) at NFE 100, is printed per case.

The last line of standard output is one JSON object: ``endpoint_error`` {sampler: {NFE: error}} and ``order``
{sampler: p} for the VP ε-model on the customary grids, then ``local_order``, ``nfe``, ``grid``, ``fit_nfe``,
``reference_error``, ``wall_ms``, ``other`` (the other paths and kinds), and in the full run ``grids`` (the VP
ε-model on the other grids) and ``finite_ends`` (the end-step check); the optimized rows are extra samplers
``{sampler}_optimized`` in ``endpoint_error`` (and in ``other["cosine_eps"]``), with details and the criterion in
``optimized_grids`` and (full run) ``tried_grids_nfe10``.

Run: ``python benchmarks/samplers.py`` (``--quick``: 16 points, NFE 10, 20, 50, 100, the customary grids only;
``--optimized``: only the optimized-grid study, VP and cosine ε with Euler and the fixed and optimized grids).
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
#: Optimized grids (``dj.grid_search.optimize_grid``): the cases, samplers and NFE they are fitted for (full run;
#: ``--quick``: UniPC at NFE 10), on OPT_TRAIN training points x0 ~ N(0, I) drawn with OPT_KEY (the
#: benchmark's held-out points use PRNGKey(1)), from each of the initial grids of ``initial_grids``.
OPT_CASES = ("vp_eps", "cosine_eps")
#: issue 12: the best multistep sampler at NFE 10 against Euler (uniform grid) at this NFE.
CRITERION_EULER_NFE = 100
OPT_SAMPLERS = {"unipc": (5, 10, 20), "dpmpp_2m": (10,), "dpmpp_3m": (10,)}
OPT_SAMPLERS_QUICK = {"unipc": (10,)}
OPT_TRAIN, OPT_KEY, OPT_STEPS, OPT_LR, OPT_STARTS = 256, 7, 600, 0.05, 8
#: the fixed grids tried at NFE 10 (full run) for 2M, 3M and UniPC: (label, time_grid kind, keyword arguments);
#: "trim λ≤c" is N − 1 log-SNR steps up to λ = c, then one step to t1.
TRIED_GRIDS = (
    ("log_snr", "log_snr", {}),
    ("uniform", "uniform", {}),
    ("edm ρ=3", "edm", {"rho": 3.0}),
    ("edm ρ=7", "edm", {"rho": 7.0}),
    ("shift 0.3", "shifted", {"shift": 0.3}),
    ("shift 0.5", "shifted", {"shift": 0.5}),
    ("shift 3", "shifted", {"shift": 3.0}),
    ("trim λ≤4", "trim", {"cut": 4.0}),
    ("trim λ≤6", "trim", {"cut": 6.0}),
)


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


def fixed_grid(path, n, kind, t0, t1, **kw):
    """A grid of ``TRIED_GRIDS`` as a numpy array (t = 0 noise, t = 1 data)."""
    if kind == "trim":
        cut = float(path.t_from_log_snr(kw["cut"]))
        return np.concatenate(
            [np.asarray(dj.time_grid(path, n - 1, "log_snr", t0=t0, t1=cut)), [t1]]
        )
    return np.asarray(dj.time_grid(path, n, kind, t0=t0, t1=t1, **kw))


def initial_grids(path, n, t0, t1):
    """The starts of the grid optimization (multi-start; the lowest training loss wins)."""
    grids = [fixed_grid(path, n, "log_snr", t0, t1), fixed_grid(path, n, "uniform", t0, t1)]
    grids += [fixed_grid(path, n, "shifted", t0, t1, shift=s) for s in (0.3, 0.5, 0.7)]
    grids += [fixed_grid(path, n, "edm", t0, t1, rho=r) for r in (3.0, 5.0)]
    grids += [fixed_grid(path, n, "trim", t0, t1, cut=6.0)]
    return tuple(grids)


def grid_sampler_fn(name, model, kind, path, x0s):
    """A jitted function of an explicit grid array (one compile per sampler): its samples from ``x0s``."""
    sampler = dj.samplers.as_sampler(name)
    key = jax.random.PRNGKey(0)

    @jax.jit
    def run(ts):
        def one(x0):
            return dj.sample(sampler, model, kind, path, key, grid=ts, x0=x0, throw=False).samples

        return jax.vmap(one)(x0s)

    return run


def optimized_rows(gm, path, kind, x0s, ref, t0, t1, plan, quick_log):
    """Held-out errors of ``names`` on grids optimized for each NFE on training points of their own key."""
    model = gm.model(kind, path)
    x_train = jax.random.normal(jax.random.PRNGKey(OPT_KEY), (OPT_TRAIN, 2))
    out = {}
    for name, nfes in plan.items():
        run = grid_sampler_fn(name, model, kind, path, x0s)
        for n in nfes:
            t = time.perf_counter()
            ts, losses = dj.grid_search.optimize_grid(
                name,
                model,
                kind,
                path,
                n,
                x_train,
                init=initial_grids(path, n, t0, t1),
                steps=OPT_STEPS,
                learning_rate=OPT_LR,
                return_losses=True,
            )
            secs = time.perf_counter() - t
            losses = np.asarray(losses)
            err = endpoint_error(run(ts), ref)
            init_err = endpoint_error(
                run(jax.numpy.asarray(fixed_grid(path, n, "log_snr", t0, t1))), ref
            )
            out.setdefault(name, {})[n] = {
                "error": err,
                "log_snr_error": init_err,
                "train_error": float(losses[-1]),
                "train_error_start": float(losses[0]),
                "grid": [float(v) for v in np.asarray(ts)],
                "seconds": secs,
            }
            quick_log(
                f"  {name}_optimized @ {n}: held-out {err:.2e} (log_snr {init_err:.2e}), {secs:.0f} s"
            )
    return out


def tried_grids(gm, path, kind, x0s, ref, t0, t1, n):
    """{sampler: {grid label: held-out error}} at NFE ``n`` on the fixed grids of TRIED_GRIDS."""
    model = gm.model(kind, path)
    out = {}
    for name in OPT_SAMPLERS:
        run = grid_sampler_fn(name, model, kind, path, x0s)
        out[name] = {
            label: endpoint_error(run(jax.numpy.asarray(fixed_grid(path, n, k, t0, t1, **kw))), ref)
            for label, k, kw in TRIED_GRIDS
        }
    return out


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
    return {"t0": t0, "t1": t1, "ref_nfe": ref_nfe, "floor": floor, "rows": rows, "ref": ref}


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


def print_optimized(label, res, opt, tried, budgets):
    """The optimized-grid rows beside Euler at its largest NFE, and (full run) the fixed grids tried at NFE 10."""
    euler = res["rows"][("euler", "uniform")]["errors"]
    nfes = sorted({n for rows in opt.values() for n in rows})
    print(
        f"\n{label}: optimized grids (dj.grid_search.optimize_grid, {OPT_TRAIN} training x0 with key "
        f"{OPT_KEY}, {OPT_STEPS} Adam steps, {OPT_STARTS} starts); "
        "held-out error on this benchmark's x0"
    )
    head = (
        f"{'sampler':>20s} | "
        + " ".join(f"{n:>8d}" for n in nfes)
        + " | log_snr grid at the same NFE"
    )
    print(head)
    print("-" * len(head))
    for name, rows in opt.items():
        cells = " ".join(f"{rows[n]['error']:8.1e}" if n in rows else f"{'':8s}" for n in nfes)
        base = " ".join(
            f"{rows[n]['log_snr_error']:8.1e}" if n in rows else f"{'':8s}" for n in nfes
        )
        print(f"{name + '_optimized':>20s} | {cells} | {base}")
    big = CRITERION_EULER_NFE
    print(f"{'euler (uniform)':>20s} | " + " ".join(f"{euler.get(n, math.nan):8.1e}" for n in nfes))
    if 10 in nfes:
        best = min(rows[10]["error"] for rows in opt.values() if 10 in rows)
        verdict = "MET" if best <= euler[big] else "NOT met"
        print(
            f"criterion: best optimized multistep at NFE 10 = {best:.2e} vs Euler at NFE {big} = "
            f"{euler[big]:.2e}: {verdict}"
        )
    for name, rows in opt.items():
        for n in rows:
            print(f"  {name} NFE {n} grid: " + " ".join(f"{v:.5g}" for v in rows[n]["grid"]))
    if tried:
        print(f"\n{label}: fixed grids at NFE 10 (held-out error)")
        labels = [lab for lab, _, _ in TRIED_GRIDS]
        print(f"{'sampler':>10s} | " + " ".join(f"{lab:>9s}" for lab in labels))
        for name, errs in tried.items():
            print(f"{name:>10s} | " + " ".join(f"{errs[lab]:9.2e}" for lab in labels))


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
    parser.add_argument(
        "--optimized",
        action="store_true",
        help="only the optimized-grid study: VP and cosine eps, Euler (uniform) and the optimized/fixed grids",
    )
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
        if args.optimized and label not in OPT_CASES:
            continue
        if args.optimized:
            grids_of = {"euler": ("uniform",)}
        elif i == 0 and not args.quick:
            grids_of = {
                name: (g,) + tuple(x for x in ALL_GRIDS if x != g) for name, g in SAMPLERS.items()
            }
        else:
            grids_of = {name: (g,) for name, g in SAMPLERS.items()}
        log(f"{label} ({time.perf_counter() - t_start:.0f} s)")
        results[label] = sweep(gm, path, kind, x0s, budgets, fit_min, grids_of, log)
        print_table(label, path, kind, results[label], budgets)
    optimized, tried = {}, {}
    for label, path, kind in CASES:
        if label not in OPT_CASES:
            continue
        r = results[label]
        log(f"{label}: optimized grids ({time.perf_counter() - t_start:.0f} s)")
        plan = OPT_SAMPLERS_QUICK if args.quick else OPT_SAMPLERS
        optimized[label] = optimized_rows(
            gm, path, kind, x0s, r["ref"], r["t0"], r["t1"], plan, log
        )
        if not args.quick:
            tried[label] = tried_grids(gm, path, kind, x0s, r["ref"], r["t0"], r["t1"], 10)
        print_optimized(label, r, optimized[label], tried.get(label), budgets)
    finite = {}
    if not args.quick and not args.optimized:
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
    wall = {} if args.optimized else timings(gm, n_time, repeats)
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
    for label, opt in optimized.items():
        dst = out if label == CASES[0][0] else out["other"][label]
        for name, rows in opt.items():
            dst["endpoint_error"][f"{name}_optimized"] = {
                str(n): _num(r["error"]) for n, r in rows.items()
            }
    big = CRITERION_EULER_NFE
    out["optimized_grids"] = {
        label: {
            "criterion_nfe10": {
                "best_optimized": _num(min(r[10]["error"] for r in opt.values() if 10 in r)),
                f"euler_{big}": _num(results[label]["rows"][("euler", "uniform")]["errors"][big]),
                "met": bool(
                    min(r[10]["error"] for r in opt.values() if 10 in r)
                    <= results[label]["rows"][("euler", "uniform")]["errors"][big]
                ),
            },
            "train": {
                "points": OPT_TRAIN,
                "key": OPT_KEY,
                "steps": OPT_STEPS,
                "learning_rate": OPT_LR,
            },
            "rows": {
                name: {
                    str(n): {k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()}
                    for n, r in rows.items()
                }
                for name, rows in opt.items()
            },
        }
        for label, opt in optimized.items()
    }
    if tried:
        out["tried_grids_nfe10"] = {
            label: {name: {g: _num(e) for g, e in errs.items()} for name, errs in t.items()}
            for label, t in tried.items()
        }
    if not args.quick and not args.optimized:
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
