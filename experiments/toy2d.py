"""Train, sample and evaluate one model on a 2-D toy data set (a thin wrapper of ``diffjax.experiment``).

Time convention: t = 0 is noise, t = 1 is data.

    python experiments/toy2d.py --data checkerboard --objective fm --steps 3000
    python experiments/toy2d.py --data moons --objective edm --path vp --workdir runs/toy2d/moons_edm_vp

Writes WORKDIR/metrics.json (loss curve, held-out NLL in nats, energy distance / MMD² against held-out data,
timings) and WORKDIR/{loss,samples,trajectories}.png; prints one JSON line with the headline numbers.
Re-running with the same flags resumes from the checkpoint (more --steps continues training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffjax import _cache  # noqa: E402

T0 = time.perf_counter()


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--data", default="checkerboard", help="checkerboard, moons, 8gaussians, spirals, mixture"
    )
    p.add_argument("--objective", default="fm", help="fm, eps, v, edm, sd3, elbo")
    p.add_argument(
        "--path", default=None, help="linear, cosine, vp, ve, edm (default: the objective's)"
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=2000, help="samples to draw")
    p.add_argument("--n-test", type=int, default=1000, help="held-out points for the NLL")
    p.add_argument("--workdir", default=None, help="default runs/toy2d/DATA_OBJECTIVE[_PATH]")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    _cache.enable_compilation_cache(args.cache_dir)
    from diffjax import experiment as exp  # noqa: PLC0415

    if args.data == "digits":
        p.error("use experiments/digits.py for digits")
    try:
        config = exp.ExperimentConfig(
            data=args.data,
            objective=args.objective,
            path=args.path,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            ema_decay=0.995,
        )
    except ValueError as e:
        p.error(str(e))
    name = f"{args.data}_{args.objective}" + (f"_{args.path}" if args.path else "")
    workdir = args.workdir or os.path.join("runs", "toy2d", name)
    progress = not args.no_progress
    tr = exp.run_train(config, workdir, checkpoint_every=args.steps, progress=progress, t_start=T0)
    sa = exp.run_sample(workdir, args.n, progress=progress)
    li = exp.run_likelihood(workdir, args.data, args.n_test, progress=progress)
    out = {
        "workdir": os.path.abspath(workdir),
        "data": args.data,
        "objective": args.objective,
        "path": config.path_name,
        "steps": tr["step"],
        "train_wall_s": tr["train_wall_s"],
        "nll": li["nll"],
        "nll_se": li["nll_se"],
        "true_nll": li["true_nll"],
        "energy_distance": sa["energy_distance"],
        "energy_distance_floor": sa["energy_distance_floor"],
        "mmd_rbf": sa["mmd_rbf"],
        "mmd_rbf_floor": sa["mmd_rbf_floor"],
        "nfe_sample": sa["nfe_mean"],
        "wall_s": time.perf_counter() - T0,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
