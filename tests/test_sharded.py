"""Sharded evaluation (diffjax.sharded) on 8 forced CPU devices, in a subprocess (the device count is fixed when
JAX starts; this test process has one device).

Oracles: the Gaussian mixture's exact log-density (diffjax.analytic) and the one-device vmap of the same
per-example solvers with the same per-row keys ``fold_in(key, i)``. Negative control: a forced ``max_steps``
failure raises SolveError within seconds, and the process goes on (no abort, no hang). Also: a second call with
new parameters does not trace again. t = 0 is noise, t = 1 is data.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent(
    """
    import json, time
    import equinox as eqx
    import jax, jax.numpy as jnp, numpy as np
    import diffjax as dj
    from diffjax import data, sharded, solve
    from diffjax.likelihood import bits_per_dim_with_stats, log_likelihood_with_stats

    out = {"devices": jax.device_count()}
    TRACES = []

    class Counted(eqx.Module):  # the mixture's velocity, counting its traces
        gm: dj.GaussianMixture

        def __call__(self, t, x):
            TRACES.append(1)
            return self.gm.velocity(path, t, x)

    def mixture(shift):
        return dj.GaussianMixture(data.MIXTURE_WEIGHTS, data.MIXTURE_MEANS + shift, data.MIXTURE_VARIANCES)

    path = dj.LinearPath()
    gm = mixture(0.0)
    x = np.asarray(gm.sample(jax.random.key(0), 32))
    u = Counted(gm)

    r = sharded.sharded_log_likelihood(u, path, x)
    host = sharded.gather(r)
    out["ll_shape"] = list(host.log_prob.shape)
    out["ll_sharding"] = str(r.log_prob.sharding.spec)
    out["ll_oracle_err"] = float(np.abs(host.log_prob - np.asarray(jax.vmap(gm.log_prob)(x))).max())
    one = jax.jit(jax.vmap(lambda xi: log_likelihood_with_stats(u, path, xi)))(jnp.asarray(x))
    out["ll_one_device_diff"] = float(np.abs(host.log_prob - np.asarray(one.log_prob)).max())
    out["nfe_equal"] = bool(np.array_equal(host.nfe, np.asarray(one.nfe)))

    # a second call, new parameters of the same shapes: no new trace, new numbers
    n = len(TRACES)
    gm2 = mixture(0.5)
    r2 = sharded.gather(sharded.sharded_log_likelihood(Counted(gm2), path, x))
    out["retraced"] = len(TRACES) != n
    out["ll2_oracle_err"] = float(np.abs(r2.log_prob - np.asarray(jax.vmap(gm2.log_prob)(x))).max())

    # samples: row i from fold_in(key, i), the same as one device
    key = jax.random.key(3)
    s = sharded.gather(sharded.sharded_sample(u, path, key, 16, shape=(2,), num_steps=8))
    ref = jax.vmap(lambda i: dj.sample_ode(u, path, jax.random.fold_in(key, i), shape=(2,), num_steps=8).samples)(
        jnp.arange(16))
    out["sample_shape"] = list(s.samples.shape)
    out["sample_diff"] = float(np.abs(s.samples - np.asarray(ref)).max())

    # bits/dim of integer data: the same as bits_per_dim_with_stats row by row with key fold_in(key, i)
    k = np.random.default_rng(0).integers(0, 17, (8, 2))
    opts = dict(num_levels=17, data_range=(-4.0, 4.0), num_steps=16)
    b = sharded.gather(sharded.sharded_bits_per_dim(u, path, k, key=key, **opts))
    ref = jax.vmap(lambda ki, i: bits_per_dim_with_stats(u, path, ki, key=jax.random.fold_in(key, i), **opts)
                   .bits_per_dim)(jnp.asarray(k), jnp.arange(8))
    out["bpd_diff"] = float(np.abs(b.bits_per_dim - np.asarray(ref)).max())

    # negative control: a forced max_steps failure raises on the host within seconds, and the process goes on
    t = time.perf_counter()
    try:
        sharded.sharded_log_likelihood(u, path, x, max_steps=3)
        out["failure"] = None
    except solve.SolveError as e:
        out["failure"] = str(e)
    out["failure_seconds"] = time.perf_counter() - t
    # and without throw the statuses come back
    st = sharded.gather(sharded.sharded_log_likelihood(u, path, x, max_steps=3, throw=False)).status
    out["statuses"] = sorted(set(int(v) for v in st))
    # a bad argument is refused before anything runs
    try:
        sharded.sharded_log_likelihood(u, path, x[:12])
    except ValueError as e:
        out["bad_batch"] = str(e)
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def result():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=400
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_likelihood_matches_oracle_and_one_device(result):
    assert result["devices"] == 8
    assert result["ll_shape"] == [32] and "batch" in result["ll_sharding"]
    assert (
        result["ll_oracle_err"] < 2e-4
    )  # the default tolerances' accuracy (benchmarks/likelihood.py)
    assert result["ll_one_device_diff"] < 5e-5 and result["nfe_equal"]
    assert result["ll2_oracle_err"] < 2e-4


def test_sharded_second_call_does_not_retrace(result):
    assert result["retraced"] is False


def test_sharded_sample_and_bits_per_dim_match_one_device(result):
    assert result["sample_shape"] == [16, 2]
    assert result["sample_diff"] < 1e-5
    assert result["bpd_diff"] < 1e-5


def test_sharded_failure_raises_within_seconds(result):
    assert result["failure"] is not None and "max_steps=3" in result["failure"]
    assert "32 of 32 solves failed" in result["failure"]
    assert (
        result["failure_seconds"] < 60
    )  # a compile and a 3-step solve; GSPMD aborted after 68 s (issue 15)
    assert result["statuses"] == [2]  # MAX_STEPS, returned with throw=False
    assert "multiple of 8" in result["bad_batch"]


MULTI = textwrap.dedent(
    """
    import json, sys, time
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import numpy as np
    import diffjax as dj
    from diffjax import data, sharded, solve

    gm = dj.GaussianMixture(data.MIXTURE_WEIGHTS, data.MIXTURE_MEANS, data.MIXTURE_VARIANCES)
    path = dj.LinearPath()
    u = dj.velocity_field(gm.model("velocity", path), "velocity", path)
    x = np.asarray(gm.sample(jax.random.key(0), 16))
    local = x[pid * 8 : (pid + 1) * 8]  # this process's contiguous rows of the global batch
    r = sharded.gather(sharded.sharded_log_likelihood(u, path, local))
    # a failure in process 1's rows only (a NaN row; the same compiled program): both processes raise
    bad = local.copy()
    if pid == 1:
        bad[3] = np.nan
    t = time.perf_counter()
    try:
        sharded.sharded_log_likelihood(u, path, bad)
        err = None
    except solve.SolveError as e:
        err = str(e)
    print(json.dumps({"devices": jax.device_count(), "log_prob": r.log_prob.tolist(),
                      "oracle": np.asarray(jax.vmap(gm.log_prob)(x)).tolist(), "error": err,
                      "seconds": time.perf_counter() - t}))
    """
)


@pytest.mark.multiprocess
def test_two_processes_gather_the_same_global_result_and_both_raise():
    """2 processes × 2 CPU devices on loopback: each passes its rows, both gather the whole batch (against the
    oracle), and a failure in one process's rows (a NaN row) raises SolveError on both, naming the global row
    (no hang: the run is bounded in time)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", MULTI, str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=300)
            assert p.returncode == 0, stderr[-3000:]
            outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for out in outs:
        assert out["devices"] == 4
        assert len(out["log_prob"]) == 16
        assert max(abs(a - b) for a, b in zip(out["log_prob"], out["oracle"])) < 2e-4
        assert (
            out["error"] is not None
            and "1 of 16 solves failed, the first at index 11" in out["error"]
        )
        assert out["seconds"] < 120
    assert outs[0]["log_prob"] == outs[1]["log_prob"]
