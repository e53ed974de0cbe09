"""Train, sample and evaluate one model on a 2-D toy data set (a thin wrapper of ``diffjax_app``'s runners).

Time convention: t = 0 is noise, t = 1 is data.

    python experiments/toy2d.py --data checkerboard --objective fm --steps 3000
    python experiments/toy2d.py --data moons --objective edm --path vp --workdir runs/toy2d/moons_edm_vp
    python experiments/toy2d.py --quick          # 200 steps, 200 samples, 100 test points (a smoke test)

Writes WORKDIR/metrics.json (loss curve, held-out NLL in nats, energy distance / MMD² against held-out data with
a permutation-test p-value and its power against known-bad models, and where the data density is known the
samples' cross-entropy under it and, for the checkerboard, the fraction inside its squares; timings) and
WORKDIR/{loss,samples,trajectories}.png; prints one JSON line with the headline numbers (the last line of
stdout). Re-running with the same flags resumes from the checkpoint (more --steps continues training).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffjax_app import cache  # noqa: E402
from diffjax_app.errors import quiet_dependency_logs  # noqa: E402

T0 = time.perf_counter()


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default 3000; --quick: 200)"
    )
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--n", type=int, default=None, help="samples to draw (default 2000; --quick: 200)"
    )
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="held-out points for the NLL (default 1000; --quick: 100)",
    )
    p.add_argument("--workdir", default=None, help="default runs/toy2d/DATA_OBJECTIVE[_PATH]")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: 200 steps, 200 samples, 100 test points, workdir suffix _quick",
    )
    return p


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    for name, full, quick in (("steps", 3000, 200), ("n", 2000, 200), ("n_test", 1000, 100)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    try:
        cache.enable_compilation_cache(args.cache_dir)
    except cache.CacheDirError as e:
        p.error(str(e))
    quiet_dependency_logs()
    from diffjax_app.config import ExperimentConfig  # noqa: PLC0415
    from diffjax_app.likelihood_runner import run_likelihood  # noqa: PLC0415
    from diffjax_app.metrics import DISTANCE_KEYS, HEADLINE_KEYS  # noqa: PLC0415
    from diffjax_app.sample_runner import run_sample  # noqa: PLC0415
    from diffjax_app.train_runner import run_train  # noqa: PLC0415

    if args.data == "digits":
        p.error("use experiments/digits.py for digits")
    try:
        config = ExperimentConfig(
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
    name += "_quick" if args.quick else ""
    workdir = args.workdir or os.path.join("runs", "toy2d", name)
    progress = not args.no_progress
    tr = run_train(config, workdir, checkpoint_every=args.steps, progress=progress, t_start=T0)
    sa = run_sample(workdir, args.n, progress=progress)
    li = run_likelihood(workdir, args.data, args.n_test, progress=progress)
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
        **{k: sa[k] for k in (*DISTANCE_KEYS, *HEADLINE_KEYS) if k in sa},
        "nfe_sample": sa["nfe_mean"],
        "figures": {**tr.get("figures", {}), **sa.get("figures", {})},
        "warnings": tr.get("warnings", []) + sa.get("warnings", []) + li.get("warnings", []),
        "wall_s": time.perf_counter() - T0,
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
