"""Benchmark: cold vs warm start of the command line (JAX's persistent compilation cache), and ``import diffjax``.

Runs ``diffjax train`` (200 steps), ``sample --n 500`` and ``likelihood --n 500`` twice each, into two fresh
workdirs that share one fresh cache directory: the first run of each command compiles (cold), the second loads
the compiled programs from the cache (warm). Prints process wall time, ``train``'s start-to-first-step time, and
the time of ``diffjax train --help`` and of ``import diffjax`` beside ``import jax, equinox, diffrax``. Time convention of the runs: t = 0 noise,
t = 1 data.

Usage: ``python benchmarks/startup.py`` (about 2 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def run(args, env):
    tic = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "diffjax_app", *args], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - tic
    if out.returncode != 0:
        raise SystemExit(f"diffjax {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return wall, json.loads(out.stdout.strip().splitlines()[-1])


def import_time(stmt, repeats=3):
    times = []
    for _ in range(repeats):
        code = f"import time; t = time.perf_counter(); {stmt}; print(time.perf_counter() - t)"
        times.append(
            float(
                subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
            )
        )
    return min(times)


def help_time(repeats=3):
    """Best-of wall time of ``diffjax train --help`` in a fresh process (the CLI imports no JAX for it)."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        subprocess.run([sys.executable, "-m", "diffjax_app", "train", "--help"], capture_output=True)
        times.append(time.perf_counter() - tic)
    return min(times)


def main():
    root = tempfile.mkdtemp(prefix="diffjax-startup-")
    env = dict(os.environ, DIFFJAX_CACHE_DIR=os.path.join(root, "cache"))
    rows = []
    train = [
        "train",
        "--data",
        "checkerboard",
        "--objective",
        "fm",
        "--steps",
        "200",
        "--batch-size",
        "256",
    ]
    for cmd, extra in (
        ("train", train[1:]),
        ("sample", ["--n", "500"]),
        ("likelihood", ["--n", "500"]),
    ):
        walls, firsts = [], []
        for run_id in ("a", "b"):
            wd = os.path.join(root, run_id)
            wall, res = run([cmd, *extra, "--workdir", wd, "--no-progress"], env)
            walls.append(wall)
            firsts.append(res.get("time_to_first_step_s"))
        rows.append((cmd, walls, firsts))
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPU cores, cache {env['DIFFJAX_CACHE_DIR']}"
    )
    print(
        f"{'command':<12}{'cold wall':>12}{'warm wall':>12}{'cold first step':>18}{'warm first step':>18}"
    )
    for cmd, walls, firsts in rows:
        f = [f"{v:.1f} s" if v is not None else "-" for v in firsts]
        print(f"{cmd:<12}{walls[0]:>10.1f} s{walls[1]:>10.1f} s{f[0]:>18}{f[1]:>18}")
    print(f"diffjax train --help: {help_time():.2f} s (best of 3, process start included)")
    print(
        f"import diffjax: {import_time('import diffjax'):.2f} s; "
        f"import jax, equinox, diffrax: {import_time('import jax, equinox, diffrax'):.2f} s (best of 3)"
    )


if __name__ == "__main__":
    main()
