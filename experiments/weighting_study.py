"""Does the weighting decide what a model is good at? The same MLP, data and step budget under six objectives.

Time convention: t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε, λ_t = log(α_t²/σ_t²).

Kingma & Gao (2023) write every objective as ½∫ w(λ)·E‖ε̂ − ε‖² dλ: the objectives below differ (up to the
parameterization and the path) only in w(λ). The ELBO weighting (w = 1, ``elbo``) is the one that bounds the
likelihood; flow matching (w = e^{−λ/2}), v-prediction, EDM and SD3's logit-normal put more weight at low SNR,
which is thought to favour sample quality. This script measures both on held-out data: the NLL (nats, exact
trace, PF-ODE) and the quality of PF-ODE samples (``diffjax_app.metrics.sample_quality``): energy distance and
RBF-MMD² beside their data-vs-data floor, a permutation test's p-value and its power against known-bad models
(the data blurred by N(0, (0.2·sd)²); for the checkerboard, 25 % of the mass moved onto the white squares), and where the density is known
the fraction of samples inside the checkerboard's squares and the samples' cross-entropy under the true density.

    python experiments/weighting_study.py --data checkerboard --steps 1500
    python experiments/weighting_study.py --data checkerboard --steps 1500 --path cosine   # one path for all
    python experiments/weighting_study.py --quick     # fm and elbo, 150 steps, 300 samples (a smoke test)

By default each objective runs in its published form, on its own path (fm/sd3: linear, eps/elbo: VP, v: cosine,
edm: EDM), so path and weighting change together. ``--path`` puts every objective on the same path: the
objectives then differ only in the prediction kind, the time sampler and the weighting, which is the comparison
Kingma & Gao's view is about.

Writes runs/weighting/DATA/OBJECTIVE/ (one workdir per objective, see ``diffjax_app``), and
runs/weighting/DATA/summary.{json,md}, samples.png (all objectives beside held-out data on shared, labelled
axes, each panel titled with its support fraction or p-value), weightings.png (the implied w(λ) of each
objective, normalised to integrate to 1 over the plotted range). Prints one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffjax_app import cache  # noqa: E402
from diffjax_app.config import (  # noqa: E402
    DATASETS,
    DEFAULT_PATH,
    OBJECTIVES,
    PATHS,
    ExperimentConfig,
)
from diffjax_app.errors import quiet_dependency_logs  # noqa: E402


def _num(v, fmt: str) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def _table(rows) -> str:
    """Markdown table of the rows; the columns of the new metrics appear when a row has them."""
    cols = [
        ("objective", lambda r: r["objective"]),
        ("path", lambda r: r["path"]),
        ("prediction", lambda r: r["prediction"]),
        ("final loss", lambda r: _num(r["final_loss"], ".4g")),
        ("test NLL (nats)", lambda r: f"{r['nll']:.3f} ± {r['nll_se']:.3f}"),
    ]
    if any("support_fraction" in r for r in rows):
        cols.append(
            (
                "in support",
                lambda r: (
                    f"{_num(r.get('support_fraction'), '.1%')} ± "
                    f"{_num(r.get('support_fraction_se'), '.1%')}"
                ),
            )
        )
    if any("cross_entropy" in r for r in rows) and not any("support_fraction" in r for r in rows):
        # (on the checkerboard the cross-entropy inside the support is log 32 exactly: no information)
        cols.append(
            (
                "cross-entropy (nats)",
                lambda r: (
                    f"{_num(r.get('cross_entropy'), '.3f')} ± "
                    f"{_num(r.get('cross_entropy_se'), '.3f')}"
                ),
            )
        )
    cols += [
        ("energy dist.", lambda r: _num(r["energy_distance"], ".4f")),
        ("MMD²", lambda r: _num(r["mmd_rbf"], ".5f")),
    ]
    if any("mmd_p_value" in r for r in rows):
        cols.append(("MMD test p", lambda r: _num(r.get("mmd_p_value"), ".3f")))
    cols += [
        ("NFE", lambda r: _num(r["nfe_sample"], ".0f")),
        ("train s", lambda r: _num(r["train_wall_s"], ".0f")),
    ]
    head = "| " + " | ".join(c for c, _ in cols) + " |\n" + "|---" * len(cols) + "|\n"
    return head + "\n".join("| " + " | ".join(f(r) for _, f in cols) + " |" for r in rows) + "\n"


def _note(args, rows) -> str:
    r0 = rows[0]
    note = (
        f"\nData: {args.data}; path: {args.path or 'each objective its own'}; {args.steps} steps × batch "
        f"{args.batch_size} per objective; NLL on {args.n_test} held-out points (true density: "
        f"{r0['true_nll']}); sample metrics on {args.n} samples (data-vs-data floor: energy "
        f"{r0['energy_distance_floor']:.4f}, MMD² {r0['mmd_rbf_floor']:.5f})."
    )
    if "mmd_p_value" in r0:
        note += (
            f" MMD permutation test on {r0.get('test_n')} points per side: a small p says the samples differ "
            "from the data; its power at this size against the data blurred by N(0, (0.2·sd)²) is "
            f"{_num(r0.get('power_vs_blur'), '.2f')}"
        )
        if "power_vs_off_support" in r0:
            note += (
                ", against 25 % of the mass moved onto the white squares "
                f"{_num(r0.get('power_vs_off_support'), '.2f')}"
            )
        note += " (a p-value above 0.05 is weak evidence unless the power is high)."
    return note + "\n"


def _caption(row) -> str:
    parts = []
    if row.get("support_fraction") is not None:
        parts.append(f"in support {row['support_fraction']:.0%}")
    elif row.get("cross_entropy") is not None:
        parts.append(f"CE {row['cross_entropy']:.2f} nats")
    if row.get("mmd_p_value") is not None:
        parts.append(f"p = {row['mmd_p_value']:.3f}")
    if not parts:
        parts.append(f"energy {row['energy_distance']:.4f}")
    parts.append(f"NLL {row['nll']:.2f}")
    return ", ".join(parts[:2]) + ("\n" + ", ".join(parts[2:]) if len(parts) > 2 else "")


def _plot_weightings(objectives, out, sigma_data, path=None):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from diffjax import losses  # noqa: PLC0415
    from diffjax_app.build import build_objective  # noqa: PLC0415
    from diffjax_app.plots import figure, save  # noqa: PLC0415

    lam = jnp.linspace(-12.0, 12.0, 481)
    fig, ax = figure(figsize=(6.4, 3.8))
    for name in objectives:
        obj = build_objective(name, path, sigma_data=sigma_data)
        w = jax.vmap(losses.implied_weighting(obj).weight)(lam)
        w = w / jnp.trapezoid(w, lam)
        ax.plot(lam, w, label=f"{name} ({path or DEFAULT_PATH[name]})")
    ax.set_xlabel("log-SNR λ  (noise ← → data)")
    ax.set_ylabel("implied w(λ), normalised on [−12, 12]")
    ax.set_yscale("log")
    ax.set_ylim(1e-5, 2)
    ax.legend(fontsize=7)
    return save(fig, out)


def _plot_samples(root, rows, data_name, n, out):
    import numpy as np  # noqa: PLC0415

    from diffjax_app.build import held_out  # noqa: PLC0415
    from diffjax_app.plots import plot_sample_strip  # noqa: PLC0415

    ref = np.asarray(held_out(data_name, max(n, 1000)))
    panels = [
        (
            f"{r['objective']} ({r['path']})",
            np.load(os.path.join(root, r["objective"], "samples.npy")),
            _caption(r),
        )
        for r in rows
    ]
    return plot_sample_strip(
        panels,
        out,
        data=ref,
        data_caption=f"n = {len(ref)}",
        title=f"{data_name}: PF-ODE samples of each objective (t = 0 noise → t = 1 data), "
        "axes on the held-out data's range",
    )


def _quality(sa) -> dict:
    """The sample runner's quality metrics that the study's rows keep."""
    from diffjax_app.metrics import DISTANCE_KEYS, HEADLINE_KEYS  # noqa: PLC0415

    return {k: sa[k] for k in (*DISTANCE_KEYS, *HEADLINE_KEYS) if k in sa}


def _parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="checkerboard")
    p.add_argument(
        "--objectives",
        default=None,
        help=f"comma-separated (default {','.join(OBJECTIVES)}; --quick: fm,elbo)",
    )
    p.add_argument(
        "--path",
        default=None,
        help="one path for every objective (linear, cosine, vp, ve, edm); default: each objective's own",
    )
    p.add_argument("--steps", type=int, default=None, help="default 1500 (--quick: 150)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--n", type=int, default=None, help="samples per objective (default 1000; --quick: 300)"
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="held-out points for the NLL (default 500; --quick: 100)",
    )
    p.add_argument(
        "--workdir",
        default=None,
        help="default runs/weighting/DATA (--quick: runs/weighting_quick)",
    )
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: fm and elbo, 150 steps, 300 samples, 100 test points",
    )
    return p


def _args(p, argv):
    args = p.parse_args(argv)
    for name, full, quick in (
        ("objectives", ",".join(OBJECTIVES), "fm,elbo"),
        ("steps", 1500, 150),
        ("n", 1000, 300),
        ("n_test", 500, 100),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    for o in objectives:
        if o not in OBJECTIVES:
            p.error(f"unknown objective {o!r}; valid objectives are: {', '.join(OBJECTIVES)}")
    if args.path is not None and args.path not in PATHS:
        p.error(f"unknown path {args.path!r}; valid paths are: {', '.join(PATHS)}")
    if args.data not in DATASETS:
        p.error(f"unknown data set {args.data!r}; valid data sets are: {', '.join(DATASETS)}")
    if args.data == "digits":
        p.error("the weighting study runs on 2-D data; use experiments/digits.py for digits")
    root = args.workdir or os.path.join(
        "runs",
        "weighting_quick" if args.quick else "weighting",
        args.data + (f"_{args.path}" if args.path else ""),
    )
    return args, objectives, root


def _run_one(o, args, root, progress) -> dict:
    from diffjax_app.likelihood_runner import run_likelihood  # noqa: PLC0415
    from diffjax_app.sample_runner import run_sample  # noqa: PLC0415
    from diffjax_app.train_runner import run_train  # noqa: PLC0415

    config = ExperimentConfig(
        data=args.data,
        objective=o,
        path=args.path,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        ema_decay=0.995,
    )
    wd = os.path.join(root, o)
    print(f"[weighting_study] {o}: training {args.steps} steps into {wd}", file=sys.stderr)
    tr = run_train(config, wd, checkpoint_every=args.steps, progress=progress)
    sa = run_sample(wd, args.n, progress=progress)
    li = run_likelihood(wd, args.data, args.n_test, progress=progress)
    return {
        "objective": o,
        "path": tr["path"],
        "prediction": tr["prediction"],
        "final_loss": tr["final_loss"],
        "train_wall_s": tr["train_wall_s"],
        "nll": li["nll"],
        "nll_se": li["nll_se"],
        "true_nll": li["true_nll"],
        **_quality(sa),
        "nfe_sample": sa["nfe_mean"],
        "nfe_likelihood": li["nfe_mean"],
    }


def main(argv=None):
    p = _parser()
    args, objectives, root = _args(p, argv)
    try:
        cache.enable_compilation_cache(args.cache_dir)
    except cache.CacheDirError as e:
        p.error(str(e))
    quiet_dependency_logs()
    from diffjax_app.workdir import write_json  # noqa: PLC0415

    os.makedirs(root, exist_ok=True)
    progress = not args.no_progress
    rows = []
    t_all = time.perf_counter()
    for o in objectives:
        rows.append(_run_one(o, args, root, progress))
        # Write after each objective so that a partial study is still readable.
        summary = {"args": vars(args), "rows": rows, "wall_s": time.perf_counter() - t_all}
        write_json(os.path.join(root, "summary.json"), summary)
    table = _table(rows)
    note = _note(args, rows)
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(table + note)
    figs = {}
    try:  # the figures are a bonus; never lose the table over them
        figs["samples"] = _plot_samples(
            root, rows, args.data, args.n, os.path.join(root, "samples.png")
        )
        sd = ExperimentConfig(data=args.data).resolved().sigma_data
        figs["weightings"] = _plot_weightings(
            objectives, os.path.join(root, "weightings.png"), sd, args.path
        )
    except Exception as e:
        print(f"[weighting_study] figure skipped: {type(e).__name__}: {e}", file=sys.stderr)
    summary = {
        "args": vars(args),
        "rows": rows,
        "figures": figs,
        "wall_s": time.perf_counter() - t_all,
    }
    write_json(os.path.join(root, "summary.json"), summary)
    print(table + note, file=sys.stderr)
    print(
        json.dumps({"summary": os.path.abspath(os.path.join(root, "summary.json")), "rows": rows}),
        flush=True,
    )
    return summary


if __name__ == "__main__":
    main()
