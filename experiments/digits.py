"""A small UNet on scikit-learn's 8×8 digits: test bits/dim against Gaussian baselines.

Time convention: t = 0 is noise, t = 1 is data.

Data: 1797 images with 17 grey levels (0..16), a fixed 300-image test split (``diffjax.data.load_digits``),
mapped to model space y = 2(k + u)/17 − 1 with uniform dequantization u (fresh at every training step).
Bits/dim: bpd = −(log p(y) + D·log(2/17))/(D ln 2) with one dequantization draw per test image; log p(y) by the
probability-flow ODE with the exact trace (``diffjax.likelihood.bits_per_dim(num_levels=17)``).

Baselines, in the same convention and on the same test images:

* a diagonal Gaussian (per-pixel mean and variance fitted to dequantized training data): exact bpd;
* a full-covariance Gaussian (same, with a 1e-4 ridge): exact bpd.

* a normalizing flow (``experiments/digits_flow.py``: flowjax masked autoregressive flow with rational-quadratic
  spline transformers, Durkan et al. 2019) trained by maximum likelihood on freshly dequantized batches for the
  same wall time as the UNet (``--flow-seconds``; model selection on images held out of the training split).
  Needs ``flowjax`` (``pip install -e ".[experiments]"``); without it the summary says the flow was not run.

The Gaussians are maximum-likelihood fits in closed form (milliseconds): giving them "the same wall time" as the
UNet changes nothing, so the script reports their fitting time instead.

    python experiments/digits.py --steps 1500 --n-test 50

Writes runs/digits/ (the UNet run: metrics.json, samples.png, trajectories.png, loss.png) and
runs/digits/summary.json; prints one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
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
    p.add_argument("--objective", default="fm", help="fm, eps, v, edm, sd3, elbo")
    p.add_argument("--path", default=None)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--unet-base", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=64, help="samples to draw")
    p.add_argument(
        "--n-test", type=int, default=50, help="test images for the UNet's bits/dim (max 300)"
    )
    p.add_argument("--rtol", type=float, default=1e-5)
    p.add_argument("--atol", type=float, default=1e-5)
    p.add_argument("--workdir", default=os.path.join("runs", "digits"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--flow-seconds",
        type=float,
        default=None,
        help="wall-time budget of the flow baseline (default: the UNet's training time in this run)",
    )
    p.add_argument(
        "--flow-arch", default="maf_spline", help="maf_spline, coupling_spline, maf_affine"
    )
    args = p.parse_args(argv)
    _cache.enable_compilation_cache(args.cache_dir)
    import jax  # noqa: PLC0415

    from diffjax import data as data_lib, experiment as exp  # noqa: PLC0415

    config = exp.ExperimentConfig(
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
    progress = not args.no_progress
    wd = args.workdir
    tr = exp.run_train(config, wd, checkpoint_every=args.steps, progress=progress, t_start=T0)
    if (
        tr.get("train_wall_s") is None
        and args.flow_seconds is None
        and importlib.util.find_spec("flowjax")
    ):
        p.error(
            "the UNet's training time is unknown (no record of it in the workdir): pass --flow-seconds"
        )
    sa = exp.run_sample(wd, args.n, progress=progress)
    li = exp.run_likelihood(
        wd, "digits", args.n_test, rtol=args.rtol, atol=args.atol, progress=progress
    )

    train_k = data_lib.load_digits("train")
    test_k = data_lib.load_digits("test")
    baselines = {}
    for name, full in (("diagonal_gaussian", False), ("full_cov_gaussian", True)):
        tic = time.perf_counter()
        all_bpd = exp.gaussian_bits_per_dim(train_k, test_k, jax.random.key(0), full_cov=full)
        fit_s = time.perf_counter() - tic
        sub_bpd = exp.gaussian_bits_per_dim(
            train_k, test_k[: li["n"]], jax.random.key(0), full_cov=full
        )
        baselines[name] = {
            "bits_per_dim_test300": all_bpd,
            f"bits_per_dim_first{li['n']}": sub_bpd,
            "fit_and_eval_s": fit_s,
        }
    if importlib.util.find_spec("flowjax") is None:
        flow = {"not_run": "flowjax is not installed (pip install -e '.[experiments]')"}
    else:
        from digits_flow import flow_bits_per_dim  # noqa: PLC0415

        budget = args.flow_seconds or tr["train_wall_s"]
        flow = flow_bits_per_dim(
            train_k, test_k, jax.random.key(args.seed), seconds=budget, arch=args.flow_arch
        )
        flow["bits_per_dim_test300"] = flow.pop("bits_per_dim")
        flow.pop("history")
    summary = {
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
            "energy_distance": sa["energy_distance"],
            "energy_distance_floor": sa["energy_distance_floor"],
        },
        "baselines": baselines,
        "normalizing_flow": flow,
        "uniform_bits_per_dim": float(jax.numpy.log2(17.0)),
        "wall_s": time.perf_counter() - T0,
        "figures": sa.get("figures", {}),
    }
    exp._write_json(os.path.join(wd, "summary.json"), summary)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
