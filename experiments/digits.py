"""A small UNet on scikit-learn's 8×8 digits: test bits/dim against Gaussian and normalizing-flow baselines.

Time convention: t = 0 is noise, t = 1 is data.

Data: 1797 images with 17 grey levels (0..16), a fixed 300-image test split (``diffjax.data.load_digits``),
mapped to model space y = 2(k + u)/17 − 1 with uniform dequantization u (fresh at every training step).
Bits/dim: bpd = −(log p(y) + D·log(2/17))/(D ln 2) with one dequantization draw u per test image; for the UNet
log p(y) by the probability-flow ODE with the exact trace (``diffjax.likelihood.bits_per_dim(num_levels=17)``).

**Every model is scored on the same test images in the same convention**: the first ``--n-test`` images of the
test split (default 50, at most 300), one uniform dequantization draw per image, the bpd above. The baselines:

* a diagonal Gaussian (per-pixel mean and variance fitted to dequantized training data): exact log-density;
* a full-covariance Gaussian (same, with a 1e-4 ridge): exact log-density;
* a normalizing flow (``experiments/digits_flow.py``: flowjax masked autoregressive flow with rational-quadratic
  spline transformers, Durkan et al. 2019) trained by maximum likelihood on freshly dequantized batches for the
  same wall time as the UNet (``--flow-seconds``; model selection on images held out of the training split).
  Needs ``flowjax`` (``pip install -e ".[experiments]"``); without it the summary says the flow was not run.

The Gaussians are maximum-likelihood fits in closed form (milliseconds): giving them "the same wall time" as the
UNet changes nothing, so the script reports their fitting time instead.

    python experiments/digits.py --steps 1500 --n-test 50
    python experiments/digits.py --quick            # 60 steps, 10 test images, a 10 s two-layer flow (a smoke test)

Writes runs/digits/ (the UNet run: metrics.json, samples.png, trajectories.png, loss.png) and
runs/digits/summary.json; prints one JSON line (the last line of stdout).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diffjax_app import cache  # noqa: E402
from diffjax_app.errors import quiet_dependency_logs  # noqa: E402

T0 = time.perf_counter()
TEST_SIZE = 300
#: The UNet's sample-quality keys copied into the summary when present.
SAMPLE_KEYS = (
    "energy_distance",
    "energy_distance_floor",
    "mmd_rbf",
    "mmd_rbf_floor",
    "mmd_p_value",
    "test_n",
    "power_vs_blur",
)


def _defaults(args) -> None:
    for name, full, quick in (
        ("steps", 1500, 60),
        ("batch_size", 64, 32),
        ("unet_base", 16, 8),
        ("n", 64, 16),
        ("n_test", 50, 10),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.workdir is None:
        args.workdir = os.path.join("runs", "digits_quick" if args.quick else "digits")


def _parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--objective", default="fm", help="fm, eps, v, edm, sd3, elbo")
    p.add_argument("--path", default=None)
    p.add_argument("--steps", type=int, default=None, help="default 1500 (--quick: 60)")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 (--quick: 32)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--unet-base", type=int, default=None, help="default 16 (--quick: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=None, help="samples to draw (default 64; --quick: 16)")
    p.add_argument(
        "--n-test",
        type=int,
        default=None,
        help=f"test images for EVERY model's bits/dim: the first N of the {TEST_SIZE}-image test split "
        "(default 50; --quick: 10)",
    )
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument(
        "--workdir", default=None, help="default runs/digits (--quick: runs/digits_quick)"
    )
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--flow-seconds",
        type=float,
        default=None,
        help="wall-time budget of the flow baseline (default: the UNet's training time in this run; "
        "--quick: 10)",
    )
    p.add_argument(
        "--flow-arch", default="maf_spline", help="maf_spline, coupling_spline, maf_affine"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke test: a UNet of base 8 for 60 steps, 16 samples, 10 test images, a 10 s "
        "two-layer flow",
    )
    return p


def _gaussians(train_k, test_k, key) -> dict:
    from diffjax_app.metrics import gaussian_bits_per_dim  # noqa: PLC0415

    out = {}
    for name, full in (("diagonal_gaussian", False), ("full_cov_gaussian", True)):
        tic = time.perf_counter()
        bpd = gaussian_bits_per_dim(train_k, test_k, key, full_cov=full, num_dequant=1)
        out[name] = {
            "bits_per_dim": bpd,
            "n_test": int(len(test_k)),
            "fit_and_eval_s": time.perf_counter() - tic,
        }
    return out


def _flow(args, train_k, test_k, budget, progress) -> dict:
    import jax  # noqa: PLC0415

    if importlib.util.find_spec("flowjax") is None:
        return {"not_run": "flowjax is not installed (pip install -e '.[experiments]')"}
    from digits_flow import flow_bits_per_dim  # noqa: PLC0415

    flow = flow_bits_per_dim(
        train_k,
        test_k,
        jax.random.key(args.seed),
        seconds=budget,
        arch=args.flow_arch,
        flow_layers=2 if args.quick else 4,
        test_dequant=1,
        progress=progress,
    )
    flow.pop("history")
    return flow


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    _defaults(args)
    if not 1 <= args.n_test <= TEST_SIZE:
        p.error(f"--n-test {args.n_test} must be between 1 and {TEST_SIZE} (the test split's size)")
    try:
        cache.enable_compilation_cache(args.cache_dir)
    except cache.CacheDirError as e:
        p.error(str(e))
    quiet_dependency_logs()
    import jax  # noqa: PLC0415

    from diffjax import data as data_lib  # noqa: PLC0415
    from diffjax_app.config import ExperimentConfig  # noqa: PLC0415
    from diffjax_app.likelihood_runner import run_likelihood  # noqa: PLC0415
    from diffjax_app.sample_runner import run_sample  # noqa: PLC0415
    from diffjax_app.train_runner import run_train  # noqa: PLC0415
    from diffjax_app.workdir import write_json  # noqa: PLC0415

    try:
        config = ExperimentConfig(
            data="digits",
            objective=args.objective,
            path=args.path,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            unet_base=args.unet_base,
            seed=args.seed,
            ema_decay=0.995,
        )
    except ValueError as e:
        p.error(str(e))
    progress = not args.no_progress
    wd = args.workdir
    tr = run_train(config, wd, checkpoint_every=args.steps, progress=progress, t_start=T0)
    budget = args.flow_seconds or (10.0 if args.quick else tr.get("train_wall_s"))
    if budget is None and importlib.util.find_spec("flowjax"):
        p.error(
            "the UNet's training time is unknown (no record of it in the workdir): pass --flow-seconds"
        )
    sa = run_sample(wd, args.n, progress=progress)
    n = args.n_test
    li = run_likelihood(wd, "digits", n, rtol=args.rtol, atol=args.atol, progress=progress)
    if li["n"] != n:
        raise RuntimeError(f"the likelihood runner scored {li['n']} test images, not {n}")

    train_k = data_lib.load_digits("train")
    test_k = data_lib.load_digits("test")[:n]  # the likelihood runner's images: the first n
    comparison = (
        f"all models on the same {n} test images (the first {n} of the {TEST_SIZE}-image test split), "
        "one uniform dequantization draw per image, bpd = -(log p(y) + 64 log(2/17))/(64 ln 2)"
    )
    print(f"[digits] {comparison}", file=sys.stderr, flush=True)
    baselines = _gaussians(train_k, test_k, jax.random.key(0))
    flow = _flow(args, train_k, test_k, budget, progress)
    summary = {
        "comparison": comparison,
        "n_test": n,
        "unet": {
            "objective": config.objective,
            "path": config.path_name,
            "steps": tr["step"],
            "num_params": tr["num_params"],
            "train_wall_s": tr["train_wall_s"],
            "final_loss": tr["final_loss"],
            "bits_per_dim": li["bits_per_dim"],
            "bits_per_dim_se": li["bits_per_dim_se"],
            "n_test": li["n"],
            "likelihood_wall_s": li["likelihood_wall_s"],
            **{k: sa[k] for k in SAMPLE_KEYS if k in sa},
        },
        "baselines": baselines,
        "normalizing_flow": flow,
        "uniform_bits_per_dim": math.log2(17.0),
        "wall_s": time.perf_counter() - T0,
        "figures": {**tr.get("figures", {}), **sa.get("figures", {})},
        "warnings": tr.get("warnings", []) + sa.get("warnings", []) + li.get("warnings", []),
    }
    try:
        write_json(os.path.join(wd, "summary.json"), summary)
    except OSError as e:
        summary["warnings"].append(f"summary.json not written: {e}")
        print(f"[digits] warning: summary.json not written: {e}", file=sys.stderr)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
