"""Benchmark: cold vs warm start of the command line (JAX's persistent compilation cache), and ``import diffjax``.

Prints the two start-up figures of issue 10 first:

* ``import diffjax`` against ``import jax, equinox, diffrax`` (fresh interpreters, interleaved, best of
  ``--import-runs``; target: within 0.5 s);
* ``diffjax train`` (checkerboard, fm, 200 steps, batch 256) from process start to its first step, cold (a fresh
  compilation cache) and warm (the cache filled by the cold run; best and median of ``--warm-runs``; target:
  ≤ 3 s warm),

then a table of every command: ``train``, ``sample --n 500`` and ``likelihood --n 500`` run into fresh workdirs
that share one fresh cache directory, the first run of each cold, the later ones warm (process wall time, and
train's start-to-first-step time), and the time of ``diffjax train --help``. The machine's load average is
printed before and after: on a shared machine the best of several runs is the figure to compare. Time
convention of the runs: t = 0 noise, t = 1 data.

Usage: ``python benchmarks/startup.py [--warm-runs 3] [--import-runs 5]`` (about 2–3 minutes on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

TRAIN = ["--data", "checkerboard", "--objective", "fm", "--steps", "200", "--batch-size", "256"]


def run(args, env):
    tic = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "diffjax_app", *args], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - tic
    if out.returncode != 0:
        raise SystemExit(f"diffjax {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return wall, json.loads(out.stdout.strip().splitlines()[-1])


def import_times(statements, repeats):
    """Best-of-``repeats`` import time of each statement, each in a fresh interpreter, the statements interleaved."""
    times = {s: [] for s in statements}
    for _ in range(repeats):
        for stmt in statements:
            code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            times[stmt].append(float(out.stdout))
    return {s: min(v) for s, v in times.items()}


def help_time(repeats=3):
    """Best-of wall time of ``diffjax train --help`` in a fresh process (the CLI imports no JAX for it)."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "diffjax_app", "train", "--help"], capture_output=True
        )
        times.append(time.perf_counter() - tic)
    return min(times)


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--warm-runs", type=int, default=3, help="warm train runs (best and median)"
    )
    parser.add_argument("--import-runs", type=int, default=5, help="fresh interpreters per import")
    opts = parser.parse_args()
    root = tempfile.mkdtemp(prefix="diffjax-startup-")
    env = dict(os.environ, DIFFJAX_CACHE_DIR=os.path.join(root, "cache"))
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPU cores, {load()}, "
        f"cache {env['DIFFJAX_CACHE_DIR']}",
        flush=True,
    )
    rows = []
    train_firsts = []
    for cmd, extra, runs in (
        ("train", TRAIN, 1 + opts.warm_runs),
        ("sample", ["--n", "500"], 2),
        ("likelihood", ["--n", "500"], 2),
    ):
        walls, firsts = [], []
        for i in range(runs):
            # train writes run0, run1, ...; sample and likelihood read run0 (cold) and run1 (warm)
            wd = os.path.join(root, f"run{i}")
            wall, res = run([cmd, *extra, "--workdir", wd, "--no-progress"], env)
            walls.append(wall)
            firsts.append(res.get("time_to_first_step_s"))
        rows.append((cmd, walls, firsts))
        if cmd == "train":
            train_firsts = firsts
    imports = import_times(("import diffjax", "import jax, equinox, diffrax"), opts.import_runs)
    dj, base = imports["import diffjax"], imports["import jax, equinox, diffrax"]
    warm = train_firsts[1:]
    print(f"after the runs: {load()}")
    print()
    print(
        f"import diffjax {dj:.2f} s vs import jax, equinox, diffrax {base:.2f} s: {dj - base:+.2f} s "
        f"(best of {opts.import_runs}, interleaved; target within 0.5 s)"
    )
    print(
        f"diffjax train start -> first step: cold {train_firsts[0]:.2f} s, warm best {min(warm):.2f} s / "
        f"median {statistics.median(warm):.2f} s of {len(warm)} (target warm <= 3 s)"
    )
    print()
    print(
        f"{'command':<12}{'cold wall':>12}{'warm wall':>12}{'cold first step':>18}{'warm first step':>18}"
    )
    for cmd, walls, firsts in rows:
        w = min(walls[1:])
        f = firsts[0], min(firsts[1:]) if firsts[1] is not None else None
        f = [f"{v:.1f} s" if v is not None else "-" for v in f]
        print(f"{cmd:<12}{walls[0]:>10.1f} s{w:>10.1f} s{f[0]:>18}{f[1]:>18}")
    print("(warm: best of the warm runs)")
    print(f"diffjax train --help: {help_time():.2f} s (best of 3, process start included)")


if __name__ == "__main__":
    main()
