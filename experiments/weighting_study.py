"""Does the weighting decide what a model is good at? The same MLP, data and step budget under six objectives.

Time convention: t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε, λ_t = log(α_t²/σ_t²).

Kingma & Gao (2023) write every objective as ½∫ w(λ)·E‖ε̂ − ε‖² dλ: the objectives below differ (up to the
parameterization and the path) only in w(λ). The ELBO weighting (w = 1, ``elbo``) is the one that bounds the
likelihood; flow matching (w = e^{−λ/2}), v-prediction, EDM and SD3's logit-normal put more weight at low SNR,
which is thought to favour sample quality. This script measures both on held-out data: the NLL (nats, exact
trace, PF-ODE) and the energy distance / RBF-MMD² of PF-ODE samples.

    python experiments/weighting_study.py --data checkerboard --steps 1500
    python experiments/weighting_study.py --data checkerboard --steps 1500 --path cosine   # one path for all

By default each objective runs in its published form, on its own path (fm/sd3: linear, eps/elbo: VP, v: cosine,
edm: EDM), so path and weighting change together. ``--path`` puts every objective on the same path: the
objectives then differ only in the prediction kind, the time sampler and the weighting, which is the comparison
Kingma & Gao's view is about.

Writes runs/weighting/DATA/OBJECTIVE/ (one workdir per objective, see diffjax.experiment), and
runs/weighting/DATA/summary.{json,md}, samples.png (all objectives side by side), weightings.png (the implied
w(λ) of each objective, normalised to integrate to 1 over the plotted range).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffjax import _cache  # noqa: E402

OBJECTIVES = ("fm", "eps", "v", "edm", "sd3", "elbo")


def _table(rows) -> str:
    head = (
        "| objective | path | prediction | final loss | test NLL (nats) | energy dist. | MMD² | NFE | train s |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['objective']} | {r['path']} | {r['prediction']} | {r['final_loss']:.4g} "
        f"| {r['nll']:.3f} ± {r['nll_se']:.3f} | {r['energy_distance']:.4f} | {r['mmd_rbf']:.5f} "
        f"| {r['nfe_sample']:.0f} | {r['train_wall_s']:.0f} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def _plot_weightings(exp, objectives, out, sigma_data, path=None):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from diffjax import losses  # noqa: PLC0415

    plt = exp._plt()
    lam = jnp.linspace(-12.0, 12.0, 481)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in objectives:
        obj = exp.build_objective(name, path, sigma_data=sigma_data)
        w = jax.vmap(losses.implied_weighting(obj).weight)(lam)
        w = w / jnp.trapezoid(w, lam)
        ax.plot(lam, w, label=f"{name} ({path or exp.DEFAULT_PATH[name]})")
    ax.set_xlabel("log-SNR λ  (noise ← → data)")
    ax.set_ylabel("implied w(λ), normalised")
    ax.set_yscale("log")
    ax.set_ylim(1e-5, 2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_samples(exp, root, objectives, data_name, out):
    import numpy as np  # noqa: PLC0415

    plt = exp._plt()
    ref = np.asarray(exp.held_out(data_name, 2000))
    n = len(objectives) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8))
    lim = float(np.percentile(np.abs(ref), 99.5)) * 1.1
    panels = [("held-out data", ref)] + [
        (o, np.load(os.path.join(root, o, "samples.npy"))) for o in objectives
    ]
    for ax, (name, x) in zip(axes, panels):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data", default="checkerboard")
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument(
        "--path",
        default=None,
        help="one path for every objective (linear, cosine, vp, ve, edm); default: each objective's own",
    )
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=1000, help="samples per objective")
    p.add_argument("--n-test", type=int, default=500, help="held-out points for the NLL")
    p.add_argument("--workdir", default=None, help="default runs/weighting/DATA")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    _cache.enable_compilation_cache(args.cache_dir)
    from diffjax import experiment as exp  # noqa: PLC0415

    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    for o in objectives:
        if o not in exp.OBJECTIVES:
            p.error(f"unknown objective {o!r}; valid objectives are: {', '.join(exp.OBJECTIVES)}")
    if args.path is not None and args.path not in exp.PATHS:
        p.error(f"unknown path {args.path!r}; valid paths are: {', '.join(exp.PATHS)}")
    root = args.workdir or os.path.join(
        "runs", "weighting", args.data + (f"_{args.path}" if args.path else "")
    )
    os.makedirs(root, exist_ok=True)
    progress = not args.no_progress
    rows = []
    t_all = time.perf_counter()
    for o in objectives:
        config = exp.ExperimentConfig(
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
        tr = exp.run_train(config, wd, checkpoint_every=args.steps, progress=progress)
        sa = exp.run_sample(wd, args.n, progress=progress)
        li = exp.run_likelihood(wd, args.data, args.n_test, progress=progress)
        rows.append(
            {
                "objective": o,
                "path": tr["path"],
                "prediction": tr["prediction"],
                "final_loss": tr["final_loss"],
                "train_wall_s": tr["train_wall_s"],
                "nll": li["nll"],
                "nll_se": li["nll_se"],
                "true_nll": li["true_nll"],
                "energy_distance": sa["energy_distance"],
                "energy_distance_floor": sa["energy_distance_floor"],
                "mmd_rbf": sa["mmd_rbf"],
                "mmd_rbf_floor": sa["mmd_rbf_floor"],
                "nfe_sample": sa["nfe_mean"],
                "nfe_likelihood": li["nfe_mean"],
            }
        )
        # Write after each objective so that a partial study is still readable.
        summary = {"args": vars(args), "rows": rows, "wall_s": time.perf_counter() - t_all}
        exp._write_json(os.path.join(root, "summary.json"), summary)
    table = _table(rows)
    floor = rows[0]
    note = (
        f"\nData: {args.data}; path: {args.path or 'each objective its own'}; {args.steps} steps × batch {args.batch_size} per objective; NLL on {args.n_test} "
        f"held-out points (true density: {floor['true_nll']}); sample metrics on {args.n} samples "
        f"(data-vs-data floor: energy {floor['energy_distance_floor']:.4f}, MMD² {floor['mmd_rbf_floor']:.5f}).\n"
    )
    with open(os.path.join(root, "summary.md"), "w") as f:
        f.write(table + note)
    figs = {
        "samples": _plot_samples(
            exp, root, objectives, args.data, os.path.join(root, "samples.png")
        )
    }
    try:
        sd = exp.ExperimentConfig(data=args.data).resolved().sigma_data
        figs["weightings"] = _plot_weightings(
            exp, objectives, os.path.join(root, "weightings.png"), sd, args.path
        )
    except Exception as e:  # the figure is a bonus; never lose the table over it
        print(f"[weighting_study] weighting plot skipped: {e}", file=sys.stderr)
    summary = {
        "args": vars(args),
        "rows": rows,
        "figures": figs,
        "wall_s": time.perf_counter() - t_all,
    }
    exp._write_json(os.path.join(root, "summary.json"), summary)
    print(table + note, file=sys.stderr)
    print(
        json.dumps({"summary": os.path.abspath(os.path.join(root, "summary.json")), "rows": rows})
    )
    return summary


if __name__ == "__main__":
    main()
