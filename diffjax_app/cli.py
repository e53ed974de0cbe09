"""The ``diffjax`` command line: train, sample, evaluate likelihoods, and a few-minute demo.

Time convention: **t = 0 is noise, t = 1 is data**. Samples integrate the probability-flow ODE from noise to data,
likelihoods integrate it back.

    diffjax train --data checkerboard --objective fm --steps 3000 --workdir runs/cb
    diffjax sample --workdir runs/cb --n 2000
    diffjax likelihood --workdir runs/cb --data checkerboard --n 1000
    diffjax demo                      # flow matching on the checkerboard, ~80 s on 2 CPU cores

``train`` resumes from the workdir's newest intact checkpoint (and continues to a larger ``--steps``); one
process trains into a workdir at a time; Ctrl-C or SIGTERM saves a checkpoint at the current step. Every command
prints progress bars and one-line notices on stderr and ends with ONE line of JSON on stdout holding its metrics
(also when they cannot be stored); the full metrics are in ``WORKDIR/metrics.json``, figures in ``WORKDIR/*.png``.

Exit status: 0 success; 2 an ordinary problem (bad flag, missing/locked/foreign workdir, unwritable file,
damaged checkpoints, a refused no-op), printed as one line with the fix; 1 a numerical failure (training
diverged, an ODE solve failed); 130/143 interrupted by SIGINT/SIGTERM. ``--debug`` shows the traceback.

JAX's persistent compilation cache is on (``--cache-dir``, ``$DIFFJAX_CACHE_DIR``, default
``~/.cache/diffjax/jax``; ``off`` disables it), so a second run skips most compilation. This module imports
neither JAX nor diffjax until a command runs: ``diffjax --help`` is instant.
"""

from __future__ import annotations

import time

_T_IMPORT = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from . import cache as cache_lib, startup  # noqa: E402
from .config import DATA_CLASSES, DATASETS, DEFAULT_PATH, OBJECTIVES, PATHS  # noqa: E402
from .errors import RunError, describe_os_error, notice, quiet_dependency_logs  # noqa: E402

__all__ = ["main", "build_parser"]

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


def _number(kind, what: str, ok):
    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
        return v

    parse.__name__ = what
    return parse


_positive_int = _number(int, "a positive integer", lambda v: v >= 1)
_nonneg_int = _number(int, "an integer >= 0", lambda v: v >= 0)
_positive_float = _number(float, "a positive number", lambda v: v > 0 and math.isfinite(v))
_decay = _number(float, "a number in [0, 1)", lambda v: 0 <= v < 1)
_probability = _number(float, "a number in [0, 1]", lambda v: 0 <= v <= 1)
_finite_float = _number(float, "a finite number", math.isfinite)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        default=None,
        help="JAX persistent compilation cache; 'off' disables it (default: $DIFFJAX_CACHE_DIR or "
        "~/.cache/diffjax/jax)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _names(what, valid, default, help_text):
    return dict(
        type=_choice(what, valid),
        choices=valid,
        default=default,
        metavar="{" + ",".join(valid) + "}",
        help=help_text,
    )


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", **_names("data set", DATASETS, "checkerboard", "training data"))
    p.add_argument("--objective", **_names("objective", OBJECTIVES, "fm", "training objective"))
    own = ", ".join(f"{k} {v}" for k, v in DEFAULT_PATH.items())
    p.add_argument(
        "--path", **_names("path", PATHS, None, f"Gaussian path (default: the objective's: {own})")
    )
    p.add_argument("--steps", type=_positive_int, required=True, help="total optimizer steps")
    p.add_argument(
        "--batch-size", type=_positive_int, default=None, help="batch (default: 256; digits 64)"
    )
    p.add_argument(
        "--lr", type=_positive_float, default=1e-3, help="peak learning rate (cosine decay)"
    )
    p.add_argument("--warmup", type=_nonneg_int, default=100, help="linear warm-up steps")
    p.add_argument(
        "--ema-decay", type=_decay, default=0.999, help="EMA decay of the sampled parameters"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, data and noise")
    p.add_argument("--hidden", type=_positive_int, default=256, help="MLP width (2-D data)")
    p.add_argument("--depth", type=_positive_int, default=3, help="MLP hidden layers (2-D data)")
    p.add_argument("--unet-base", type=_positive_int, default=32, help="UNet channels (digits)")
    p.add_argument(
        "--checkpoint-every", type=_positive_int, default=1000, help="steps between checkpoints"
    )
    p.add_argument(
        "--steps-per-dispatch",
        type=_positive_int,
        default=1,
        help="optimizer steps per jitted dispatch (a lax.scan; bit-identical for every value, faster for "
        "small models; a dispatch never crosses a log point or checkpoint)",
    )
    p.add_argument("--no-figures", action="store_true", help="do not write PNG figures")
    p.add_argument(
        "--conditional",
        action="store_true",
        help=f"train a class-conditional model (data sets with classes: {', '.join(DATA_CLASSES)}); "
        "sample it with --class and --guidance",
    )
    p.add_argument(
        "--cond-dropout",
        type=_probability,
        default=None,
        help="with --conditional: probability of replacing a label by the null label (classifier-free "
        "guidance; default 0.1)",
    )


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the noise (and of the dequantization)"
    )
    p.add_argument(
        "--rtol",
        type=_positive_float,
        default=None,
        help="adaptive ODE solver tolerance (default: sample 1e-5; likelihood diffjax's 1e-6, which reaches "
        "1e-4 nats)",
    )
    p.add_argument(
        "--atol",
        type=_positive_float,
        default=None,
        help="adaptive ODE solver tolerance (default: sample 1e-5; likelihood diffjax's 3e-6)",
    )
    p.add_argument(
        "--num-steps",
        type=_positive_int,
        default=None,
        help="fixed-step solve with this many steps instead of the adaptive Tsit5",
    )


class _DefaultsFormatter(argparse.HelpFormatter):
    """Help lines end with ``(default: X)`` where a flag has a default worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or action.required:
            return text
        if "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    fmt = _DefaultsFormatter
    parser = argparse.ArgumentParser(
        prog="diffjax",
        description="Diffusion and flow matching in JAX (t = 0 noise, t = 1 data).",
        formatter_class=fmt,
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,likelihood,demo}")
    sub.required = True
    add = lambda name, help_text: sub.add_parser(
        name, help=help_text, description=help_text, formatter_class=fmt
    )

    p = add("train", "train a model (resumes from WORKDIR's newest intact checkpoint)")
    p.add_argument("--workdir", required=True, help="the run's directory")
    _add_train_flags(p)
    _add_common(p)

    p = add("sample", "sample with the PF-ODE; writes samples.npy, figures and sample quality")
    p.add_argument("--workdir", required=True, help="a trained run's directory")
    p.add_argument("--n", type=_positive_int, default=1000, help="samples to draw")
    p.add_argument("--no-figures", action="store_true", help="do not write PNG figures")
    p.add_argument(
        "--class",
        dest="cls",
        type=_nonneg_int,
        default=None,
        metavar="C",
        help="conditional runs: draw samples of class C in 0..K-1 (default: all classes evenly, sample i of "
        "class i mod K)",
    )
    p.add_argument(
        "--guidance",
        type=_finite_float,
        default=None,
        metavar="W",
        help="conditional runs: classifier-free guidance weight (1 = the conditional model, 0 = the "
        "unconditional one, > 1 sharper; default 1)",
    )
    _add_eval_flags(p)
    _add_common(p)

    p = add("likelihood", "held-out NLL (nats; bits/dim for digits) with the exact trace")
    p.add_argument("--workdir", required=True, help="a trained run's directory")
    p.add_argument(
        "--data", **_names("data set", DATASETS, None, "held-out data (default: the run's)")
    )
    p.add_argument(
        "--n", type=_positive_int, default=None, help="held-out examples (default 1000; digits 300)"
    )
    _add_eval_flags(p)
    _add_common(p)

    p = add("demo", "flow matching on the checkerboard end to end (~80 s on 2 CPU cores)")
    p.add_argument("--workdir", default=os.path.join("runs", "demo"), help="the demo's directory")
    p.add_argument("--steps", type=_positive_int, default=DEMO_STEPS, help="training steps")
    p.add_argument("--batch-size", type=_positive_int, default=DEMO_BATCH, help="batch size")
    p.add_argument("--n", type=_positive_int, default=2000, help="samples to draw")
    p.add_argument("--n-test", type=_positive_int, default=1000, help="held-out points for the NLL")
    p.add_argument(
        "--fresh", action="store_true", help="delete a previous demo run in WORKDIR first"
    )
    _add_common(p)
    return parser


# ----------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------


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


_SUMMARY_KEYS = {
    "train": (
        "data", "objective", "path", "num_classes", "cond_dropout", "start_step", "step", "steps_run", "final_loss", "train_wall_s",
        "steps_per_s", "time_to_first_step_s", "num_params",
    ),
    "sample": (
        "n", "step", "class", "guidance", "nfe_mean", "sample_wall_s", "figures", "warnings",
    ),  # and diffjax_app.metrics' DISTANCE_KEYS and HEADLINE_KEYS (imported once a sample has run)
    "likelihood": (
        "data", "trained_on", "condition", "n", "step", "nll", "nll_se", "true_nll", "bits_per_dim", "bits_per_dim_se",
        "likelihood_wall_s", "warnings",
    ),
}  # fmt: skip


def _summary(command: str, r: dict, workdir: str) -> dict:
    keys = _SUMMARY_KEYS[command]
    if command == "sample":
        from .metrics import DISTANCE_KEYS, HEADLINE_KEYS  # noqa: PLC0415 (loaded by the sampler already)

        keys = (*keys, *DISTANCE_KEYS, *HEADLINE_KEYS)
    return {"command": command, "workdir": workdir, **{k: r[k] for k in keys if k in r}}


def _config_from_args(args):
    from .config import ExperimentConfig  # noqa: PLC0415

    if args.conditional and args.data not in DATA_CLASSES:
        raise RunError(
            f"--conditional needs a data set with classes; --data {args.data} has none (data sets with "
            f"classes: {', '.join(DATA_CLASSES)})"
        )
    if args.cond_dropout is not None and not args.conditional:
        raise RunError("--cond-dropout applies to conditional runs only: add --conditional")
    return ExperimentConfig(
        data=args.data,
        objective=args.objective,
        path=args.path,
        steps=args.steps,
        batch_size=args.batch_size or (64 if args.data == "digits" else 256),
        lr=args.lr,
        warmup=args.warmup,
        ema_decay=args.ema_decay,
        seed=args.seed,
        hidden=args.hidden,
        depth=args.depth,
        unet_base=args.unet_base,
        num_classes=DATA_CLASSES[args.data] if args.conditional else None,
        cond_dropout=args.cond_dropout,
    )


def _run(args, t_start: float) -> dict:
    progress = not args.no_progress
    workdir = os.path.abspath(args.workdir)
    if args.command == "train":
        from .train_runner import run_train  # noqa: PLC0415 (after the cache is configured)

        r = run_train(
            _config_from_args(args),
            workdir,
            checkpoint_every=args.checkpoint_every,
            steps_per_dispatch=args.steps_per_dispatch,
            progress=progress,
            figures=not args.no_figures,
            t_start=t_start,
        )
        return _summary("train", r, workdir)
    if args.command == "sample":
        from .sample_runner import run_sample  # noqa: PLC0415

        r = run_sample(
            workdir,
            args.n,
            seed=args.seed,
            rtol=args.rtol,
            atol=args.atol,
            num_steps=args.num_steps,
            progress=progress,
            figures=not args.no_figures,
            cls=args.cls,
            guidance=args.guidance,
        )
        return _summary("sample", r, workdir)
    if args.command == "likelihood":
        from .likelihood_runner import run_likelihood  # noqa: PLC0415

        r = run_likelihood(
            workdir,
            args.data,
            args.n,
            seed=args.seed,
            rtol=args.rtol,
            atol=args.atol,
            num_steps=args.num_steps,
            progress=progress,
        )
        return _summary("likelihood", r, workdir)
    from .demo import run_demo  # noqa: PLC0415

    return run_demo(args, t_start, progress)


# ----------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------


def _is(e: BaseException, module: str, *names: str) -> bool:
    """isinstance against classes of an already imported module (the CLI imports no module to classify)."""
    mod = sys.modules.get(module)
    return mod is not None and any(isinstance(e, getattr(mod, n, ())) for n in names)


def _exit_status(e: BaseException) -> int:
    """2: an ordinary problem (its message says the fix); 1: a numerical failure; 130/143: interrupted."""
    if _is(e, "diffjax.train", "TrainingInterrupted"):
        return 143 if getattr(e, "signal", "") == "SIGTERM" else 130
    if isinstance(e, KeyboardInterrupt):
        return 130
    if _is(e, "diffjax.solve", "SolveError") or _is(e, "diffjax.train", "NonFiniteStateError"):
        return 1
    if _is(e, "diffjax_app.errors", "NonFiniteError"):
        return 1
    if isinstance(e, (RunError, OSError)) or _is(e, "diffjax.checkpoint", "WorkdirLockedError"):
        return 2
    if isinstance(e, ValueError) and _raised_by_diffjax(e):
        return 2  # a validation error of diffjax's or diffjax_app's own (it names the value and the fix)
    return 1


def _raised_by_diffjax(e: BaseException) -> bool:
    """Whether ``e`` was raised by diffjax's own code (not deep inside JAX, orbax or another dependency)."""
    import traceback  # noqa: PLC0415

    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return False
    parts = os.path.normpath(frames[-1].filename).split(os.sep)
    return "diffjax" in parts or "diffjax_app" in parts


def _message(e: BaseException, argv: list[str]) -> str:
    if _is(e, "diffjax.train", "TrainingInterrupted"):
        return f"{e}; resume: {shlex.join(['diffjax', *argv])}"
    if isinstance(e, KeyboardInterrupt):
        return (
            "interrupted before any result was written (a train run keeps its earlier checkpoints)"
        )
    if isinstance(e, OSError) and not str(e).startswith(("cannot", "could not")) and e.strerror:
        return f"{describe_os_error(e)} (check the path and its permissions)"
    text = " ".join(str(e).split()) or type(e).__name__
    if _exit_status(e) == 1 and not (
        _is(e, "diffjax.solve", "SolveError")
        or _is(e, "diffjax.train", "NonFiniteStateError")
        or _is(e, "diffjax_app.errors", "NonFiniteError")
    ):
        return f"internal error: {type(e).__name__}: {text} (rerun with --debug for the traceback)"
    return text


@contextlib.contextmanager
def _one_line_warnings(prog: str):
    """Show Python warnings (e.g. a damaged checkpoint skipped) as one line each on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.simplefilter(
            "ignore", DeprecationWarning
        )  # dependencies' deprecations are not the user's
        warnings.simplefilter("ignore", FutureWarning)
        warnings.showwarning = lambda message, category, *a, **k: notice(
            f"warning: {message}", prefix=prog
        )
        yield


def _configure_cache(args, sub) -> str | None:
    """Turn on the compilation cache; an unwritable explicit --cache-dir is an error, an unwritable default
    one only a notice (the run goes on without the cache)."""
    try:
        path = cache_lib.resolve_cache_dir(args.cache_dir)
    except (AttributeError, ValueError) as e:
        sub.error(str(e))
    if path is None:
        return None
    try:
        return cache_lib.enable_compilation_cache(path)
    except cache_lib.CacheDirError as e:
        if args.cache_dir is not None:
            sub.exit(2, f"{sub.prog}: error: {e}\n")
        notice(f"warning: compilation cache off: {e}", prefix=sub.prog)
        return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``diffjax`` console script (exit statuses: see the module docstring).

    ``argv`` None (the console script, ``python -m diffjax_app``): the process is the command's own, its start is
    the origin of ``time_to_first_step_s`` and the garbage collector is paused for the start-up
    (:mod:`diffjax_app.startup`). A list (tests, other programs): timed from this call, the collector untouched.
    """
    own_process = argv is None
    t_start = _process_start() if own_process else time.perf_counter()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[args.command]  # for error messages
    debug = args.debug or bool(os.environ.get("DIFFJAX_DEBUG"))
    if not debug:  # orbax logs through absl (e.g. "Given directory is read only" for every reader)
        quiet_dependency_logs()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_one_line_warnings(sub.prog))
        if own_process:  # no cyclic GC while JAX & co. are imported and the first programs traced
            # (diffjax_app.startup); the runners resume it after their first step or chunk, this at the latest
            startup.pause_gc()
            stack.callback(startup.resume_gc)
        try:
            if args.command == "train":
                # a multi-process job (srun, mpirun, JAX_COORDINATOR_ADDRESS, a TPU pod) starts JAX's distributed
                # runtime before anything touches a device; one process: nothing happens
                from diffjax.distributed import initialize_distributed  # noqa: PLC0415

                initialize_distributed()
            cache = _configure_cache(args, sub)
            # The runners solve with throw=False and check each solve's status on the host, so their compiled
            # programs hold no host callback and the persistent cache stores them.
            result = _run(args, t_start)
        except (Exception, KeyboardInterrupt) as e:
            if debug:
                raise
            print(f"{sub.prog}: error: {_message(e, argv)}", file=sys.stderr, flush=True)
            sys.exit(_exit_status(e))
    result["cache_dir"] = cache
    _emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
