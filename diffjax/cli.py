"""The ``diffjax`` command line: train, sample, evaluate likelihoods, and a few-minute demo.

Time convention: **t = 0 is noise, t = 1 is data**. Samples integrate the probability-flow ODE from noise to data,
likelihoods integrate it back.

    diffjax train --data checkerboard --objective fm --steps 3000 --workdir runs/cb
    diffjax sample --workdir runs/cb --n 2000
    diffjax likelihood --workdir runs/cb --data checkerboard --n 1000
    diffjax demo                      # flow matching on the checkerboard, ~80 s on 2 CPU cores

``train`` resumes from the workdir's latest checkpoint (and continues to a larger ``--steps``). Every command
prints progress bars on stderr and ends with ONE line of JSON on stdout holding its metrics; the full metrics
(loss curve, timings, ...) are in ``WORKDIR/metrics.json``, figures in ``WORKDIR/*.png``.

JAX's persistent compilation cache is on (``--cache-dir``, ``$DIFFJAX_CACHE_DIR``, default
``~/.cache/diffjax/jax``; ``off`` disables it), so a second run skips most compilation.
"""

from __future__ import annotations

import time

_T_IMPORT = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

from . import _cache  # noqa: E402

__all__ = ["main", "build_parser"]

DATASETS = ("checkerboard", "moons", "8gaussians", "spirals", "mixture", "digits")
OBJECTIVES = ("fm", "eps", "v", "edm", "sd3", "elbo")
PATHS = ("linear", "cosine", "vp", "ve", "edm")

#: ``diffjax demo`` defaults: training + sampling + likelihood take about 80 s on 2 free CPU cores.
DEMO_STEPS = 12000
DEMO_BATCH = 512


def _process_start() -> float:
    """The process start as a ``time.perf_counter()`` value (Linux: from /proc; else this module's import)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 3600:
            return time.perf_counter() - age
    except (OSError, ValueError, IndexError):
        pass
    return _T_IMPORT


def _choice(what: str, valid):
    def parse(value: str) -> str:
        if value not in valid:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {value!r}; valid {what}s are: {', '.join(valid)}"
            )
        return value

    parse.__name__ = what
    return parse


def _positive_int(value: str) -> int:
    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return v


def _positive_float(value: str) -> float:
    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        default=None,
        help="JAX persistent compilation cache (default: $DIFFJAX_CACHE_DIR or ~/.cache/diffjax/jax; "
        "'off' disables it)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_train_flags(p: argparse.ArgumentParser, *, steps_default: int | None) -> None:
    p.add_argument("--data", type=_choice("data set", DATASETS), default="checkerboard")
    p.add_argument("--objective", type=_choice("objective", OBJECTIVES), default="fm")
    p.add_argument(
        "--path",
        type=_choice("path", PATHS),
        default=None,
        help="Gaussian path (default: the objective's own: fm/sd3 linear, eps/elbo vp, v cosine, edm edm)",
    )
    p.add_argument(
        "--steps", type=_positive_int, default=steps_default, required=steps_default is None
    )
    p.add_argument("--batch-size", type=_positive_int, default=None)
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hidden", type=_positive_int, default=256, help="MLP width (2-D data)")
    p.add_argument("--depth", type=_positive_int, default=3, help="MLP hidden layers (2-D data)")
    p.add_argument("--unet-base", type=_positive_int, default=32, help="UNet channels (digits)")
    p.add_argument("--checkpoint-every", type=_positive_int, default=1000)
    p.add_argument("--no-figures", action="store_true", help="do not write PNG figures")


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rtol", type=_positive_float, default=1e-5, help="adaptive ODE solver tolerance"
    )
    p.add_argument("--atol", type=_positive_float, default=1e-5)
    p.add_argument(
        "--num-steps",
        type=_positive_int,
        default=None,
        help="fixed-step solve with this many steps instead of the adaptive Tsit5",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffjax",
        description="Diffusion and flow matching in JAX (t = 0 noise, t = 1 data).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,likelihood,demo}")
    sub.required = True

    p = sub.add_parser("train", help="train a model (resumes from WORKDIR's latest checkpoint)")
    p.add_argument("--workdir", required=True)
    _add_train_flags(p, steps_default=None)
    _add_common(p)

    p = sub.add_parser(
        "sample", help="sample with the PF-ODE, write samples.png and sample quality"
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--n", type=_positive_int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-figures", action="store_true")
    _add_eval_flags(p)
    _add_common(p)

    p = sub.add_parser("likelihood", help="held-out NLL (nats; bits/dim for digits), exact trace")
    p.add_argument("--workdir", required=True)
    p.add_argument("--data", type=_choice("data set", DATASETS), default=None)
    p.add_argument(
        "--n", type=_positive_int, default=None, help="held-out examples (default 1000; digits 300)"
    )
    p.add_argument("--seed", type=int, default=0)
    _add_eval_flags(p)
    _add_common(p)

    p = sub.add_parser(
        "demo", help="flow matching on the checkerboard end to end (~80 s on 2 CPU cores)"
    )
    p.add_argument("--workdir", default=os.path.join("runs", "demo"))
    p.add_argument("--steps", type=_positive_int, default=DEMO_STEPS)
    p.add_argument("--batch-size", type=_positive_int, default=DEMO_BATCH)
    p.add_argument("--n", type=_positive_int, default=2000, help="samples to draw")
    p.add_argument("--n-test", type=_positive_int, default=1000, help="held-out points for the NLL")
    p.add_argument(
        "--fresh", action="store_true", help="delete a previous demo run in WORKDIR first"
    )
    _add_common(p)
    return parser


def _finite(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _emit(result: dict) -> None:
    print(json.dumps(_finite(result), sort_keys=True), flush=True)


def _train_summary(r: dict, workdir: str) -> dict:
    keys = (
        "data",
        "objective",
        "path",
        "start_step",
        "step",
        "steps_run",
        "final_loss",
        "train_wall_s",
        "steps_per_s",
        "time_to_first_step_s",
        "num_params",
    )
    return {"command": "train", "workdir": workdir, **{k: r.get(k) for k in keys}}


def _sample_summary(r: dict, workdir: str) -> dict:
    keys = (
        "n",
        "step",
        "nfe_mean",
        "energy_distance",
        "energy_distance_floor",
        "mmd_rbf",
        "mmd_rbf_floor",
        "sample_wall_s",
        "figures",
    )
    return {"command": "sample", "workdir": workdir, **{k: r.get(k) for k in keys}}


def _likelihood_summary(r: dict, workdir: str) -> dict:
    keys = ("data", "n", "step", "nll", "nll_se", "true_nll", "bits_per_dim", "bits_per_dim_se")
    out = {k: r[k] for k in keys if k in r}
    out["likelihood_wall_s"] = r.get("likelihood_wall_s")
    return {"command": "likelihood", "workdir": workdir, **out}


def _config_from_args(args, exp):
    batch = args.batch_size or (64 if args.data == "digits" else 256)
    return exp.ExperimentConfig(
        data=args.data,
        objective=args.objective,
        path=args.path,
        steps=args.steps,
        batch_size=batch,
        lr=args.lr,
        warmup=args.warmup,
        ema_decay=args.ema_decay,
        seed=args.seed,
        hidden=args.hidden,
        depth=args.depth,
        unet_base=args.unet_base,
    )


def _run(args, parser, t_start: float) -> dict:
    from . import experiment as exp  # noqa: PLC0415 (after the cache is configured)

    progress = not args.no_progress
    if args.command == "train":
        config = _config_from_args(args, exp)
        r = exp.run_train(
            config,
            args.workdir,
            checkpoint_every=args.checkpoint_every,
            progress=progress,
            figures=not args.no_figures,
            t_start=t_start,
        )
        return _train_summary(r, os.path.abspath(args.workdir))
    if args.command in ("sample", "likelihood") and not exp.has_checkpoint(args.workdir):
        raise exp.NoCheckpointError(f"no checkpoint in {args.workdir}; run diffjax train first")
    if args.command == "sample":
        r = exp.run_sample(
            args.workdir,
            args.n,
            seed=args.seed,
            rtol=args.rtol,
            atol=args.atol,
            num_steps=args.num_steps,
            progress=progress,
            figures=not args.no_figures,
        )
        return _sample_summary(r, os.path.abspath(args.workdir))
    if args.command == "likelihood":
        r = exp.run_likelihood(
            args.workdir,
            args.data,
            args.n,
            seed=args.seed,
            rtol=args.rtol,
            atol=args.atol,
            num_steps=args.num_steps,
            progress=progress,
        )
        return _likelihood_summary(r, os.path.abspath(args.workdir))
    if args.command == "demo":
        return _demo(args, exp, t_start, progress)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks it
    return {}


def _demo(args, exp, t_start: float, progress: bool) -> dict:
    workdir = os.path.abspath(args.workdir)
    if args.fresh and os.path.isdir(workdir):
        if not os.path.exists(os.path.join(workdir, exp.EXPERIMENT_FILE)):
            raise ValueError(
                f"--fresh: {workdir} does not look like a diffjax run; not deleting it"
            )
        shutil.rmtree(workdir)
    config = exp.ExperimentConfig(
        data="checkerboard",
        objective="fm",
        steps=args.steps,
        batch_size=args.batch_size,
        lr=2e-3,
        warmup=100,
        ema_decay=0.995,
    )
    log = lambda msg: print(f"[diffjax demo] {msg}", file=sys.stderr, flush=True)
    log(f"training flow matching on the checkerboard for {args.steps} steps into {workdir}")
    tr = exp.run_train(
        config, workdir, checkpoint_every=args.steps, progress=progress, t_start=t_start
    )
    log(f"sampling {args.n} points with the adaptive probability-flow ODE")
    sa = exp.run_sample(workdir, args.n, progress=progress)
    log(f"held-out negative log-likelihood of {args.n_test} points (exact trace)")
    li = exp.run_likelihood(workdir, "checkerboard", args.n_test, progress=progress)
    wall = time.perf_counter() - t_start
    files = {
        "metrics": os.path.join(workdir, exp.METRICS_FILE),
        **sa.get("figures", {}),
        **tr.get("figures", {}),
    }
    log(
        f"done in {wall:.0f} s: held-out NLL {li['nll']:.3f} ± {li['nll_se']:.3f} nats "
        f"(true density: {li['true_nll']:.3f}); energy distance {sa['energy_distance']:.4f} "
        f"(data-vs-data floor {sa['energy_distance_floor']:.4f})"
    )
    for name, path in files.items():
        log(f"  {name:13s} {path}")
    return {
        "command": "demo",
        "workdir": workdir,
        "steps": tr["step"],
        "final_loss": tr["final_loss"],
        "train_wall_s": tr["train_wall_s"],
        "time_to_first_step_s": tr["time_to_first_step_s"],
        "nll": li["nll"],
        "nll_se": li["nll_se"],
        "true_nll": li["true_nll"],
        "energy_distance": sa["energy_distance"],
        "energy_distance_floor": sa["energy_distance_floor"],
        "mmd_rbf": sa["mmd_rbf"],
        "mmd_rbf_floor": sa["mmd_rbf_floor"],
        "wall_s": wall,
        "files": files,
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffjax`` console script. Returns 0; bad input exits with status 2 (argparse)."""
    t_start = _process_start() if argv is None else time.perf_counter()
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # for error messages
    try:
        cache = _cache.resolve_cache_dir(args.cache_dir)
    except (AttributeError, ValueError) as e:
        sub.error(str(e))
    if cache is not None:
        _cache.enable_compilation_cache(cache)
    from .experiment import NoCheckpointError, NonFiniteError  # noqa: PLC0415
    from .solve import SolveError  # noqa: PLC0415

    try:
        # The runners solve with throw=False and check each solve's status on the host, so their compiled
        # programs hold no host callback and the persistent cache stores them.
        result = _run(args, parser, t_start)
    except NoCheckpointError as e:
        sub.error(str(e))
    except (NonFiniteError, SolveError) as e:
        print(f"{sub.prog}: error: {e}", file=sys.stderr)
        sys.exit(1)
    except ValueError as e:
        if os.environ.get("DIFFJAX_DEBUG"):
            raise
        sub.error(str(e))
    result["cache_dir"] = cache
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
