"""Multi-process and multi-device training: ``initialize_distributed``'s reading of the environment (a pure
function, no cluster), meshes with Explicit or Auto axes, FSDP (sharded parameters, EMA and optimizer state)
and a real 2-process run on loopback compared with one process.

Time convention: t = 0 is noise, t = 1 is data (flow matching draws t ~ U(0, 1) and ε per row of the global
batch from ``fold_in(key(seed), s)`` at step s).

Cost: one helper process with 4 forced CPU devices (tests/_dist_proc.py ``single``) and two with 2 devices each
(``multi``, coordinator 127.0.0.1:<free port>, gloo collectives), started together by one module fixture and
bounded by a timeout (every process is killed on failure or timeout); about 25-35 s on 2 loaded cores.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from diffjax import distributed, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HELPER = os.path.join(ROOT, "tests", "_dist_proc.py")
TIMEOUT_S = 150


# ------------------------------------------------------------------------------------------------------------
# The environment → jax.distributed.initialize arguments (no cluster started)
# ------------------------------------------------------------------------------------------------------------

SLURM = {
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "3",
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_NODELIST": "node[001-002]",
    "SLURM_LOCALID": "3",
}
OMPI5 = {
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_RANK": "2",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
    "PMIX_RANK": "2",
}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"PATH": "/bin", "HOME": "/root"}, None),
        ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),  # a one-task SLURM job
        ({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"}, None),
        ({"JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}, None),
        (
            {
                "JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": "1",
            },
            {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1},
        ),
        (SLURM, {"num_processes": 8, "process_id": 3, "cluster_detection_method": "slurm"}),
        (  # an explicit address wins over SLURM's; count and id still from SLURM
            {**SLURM, "JAX_COORDINATOR_ADDRESS": "head:999"},
            {"num_processes": 8, "process_id": 3, "coordinator_address": "head:999"},
        ),
        (  # Open MPI 5 / PMIx: the address must be passed, count and id from the launcher
            {**OMPI5, "JAX_COORDINATOR_ADDRESS": "head:999"},
            {"num_processes": 4, "process_id": 2, "coordinator_address": "head:999"},
        ),
        (  # PMIx rank when OMPI_COMM_WORLD_RANK is absent; several ranks on a node: one device each
            {
                "OMPI_COMM_WORLD_SIZE": "4",
                "PMIX_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
                "JAX_COORDINATOR_ADDRESS": "head:999",
            },
            {
                "num_processes": 4,
                "process_id": 1,
                "coordinator_address": "head:999",
                "local_device_ids": [1],
            },
        ),
        (  # Open MPI 4: JAX reads the launcher's URI itself
            {**OMPI5, "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1:34911"},
            {"num_processes": 4, "process_id": 2, "cluster_detection_method": "ompi"},
        ),
        ({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4", "TPU_WORKER_ID": "2"}, {}),  # JAX detects all
        ({"TPU_WORKER_HOSTNAMES": "t1", "TPU_WORKER_ID": "0"}, None),  # a one-host TPU VM
        ({"TPU_PROCESS_ADDRESSES": "a:1,b:1"}, {}),
        ({"DIFFJAX_DISTRIBUTED": "auto"}, {}),
        ({**SLURM, "DIFFJAX_DISTRIBUTED": "off"}, None),  # one process by hand inside an allocation
        ({"SLURM_NTASKS": "4", "DIFFJAX_DISTRIBUTED": "off"}, None),
    ],
)
def test_distributed_kwargs(env, expected):
    assert distributed.distributed_kwargs(env) == expected
    assert train.distributed_kwargs is distributed.distributed_kwargs  # re-exported


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, "set JAX_NUM_PROCESSES and JAX_PROCESS_ID"),
        ({"JAX_NUM_PROCESSES": "2"}, "JAX_NUM_PROCESSES is set but JAX_PROCESS_ID is not"),
        ({"JAX_PROCESS_ID": "0"}, "JAX_PROCESS_ID is set but JAX_NUM_PROCESSES is not"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"}, "JAX_COORDINATOR_ADDRESS is not set"),
        (
            {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
            "need 0 <= id < count",
        ),
        ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"}, "is not an integer"),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, "needs a port"),
        (OMPI5, "mpirun -x JAX_COORDINATOR_ADDRESS"),
        ({"SLURM_NTASKS": "4"}, "SLURM_PROCID is not set: start every task with srun"),
        (  # sbatch's own shell: no job step
            {"SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"},
            "SLURM_STEP_NODELIST, SLURM_LOCALID not set",
        ),
    ],
)
def test_half_set_variables_fail_in_one_line(env, match):
    with pytest.raises(ValueError, match=match) as info:
        distributed.distributed_kwargs(env)
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=match):  # the same check before any cluster is contacted
        distributed.initialize_distributed(env)


def test_one_process_does_nothing():
    assert distributed.initialize_distributed({}) is False
    assert distributed.initialize_distributed({"SLURM_NTASKS": "1"}) is False


def test_cli_train_initializes_before_anything_else(monkeypatch, tmp_path, capsys):
    """``diffjax train`` reads the launcher's variables first: a half-set environment stops it with exit status
    2 and the one-line fix, before the workdir is even created."""
    from diffjax_app import cli  # noqa: PLC0415

    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--workdir", str(workdir), "--steps", "2", "--cache-dir", "off"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "set JAX_NUM_PROCESSES and JAX_PROCESS_ID" in err[0]
    assert not workdir.exists()


# ------------------------------------------------------------------------------------------------------------
# Real runs: 4 devices in one process, and 2 processes x 2 devices on loopback
# ------------------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_"))
        and not k.startswith(("OMPI_", "PMIX_", "TPU_"))
    }
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        **extra,
    )
    return env


def _load(out):
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    states = {}
    for name in result:
        path = os.path.join(out, f"{name}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                states[name] = [z[f"arr_{i}"] for i in range(len(z.files))]
    return result, states


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start the one-process 4-device run and the 2-process run together; wait (bounded), kill all on failure."""
    single_out = tmp_path_factory.mktemp("single")
    multi_out = tmp_path_factory.mktemp("multi")
    port = _free_port()
    procs = {
        "single": subprocess.Popen(
            [sys.executable, HELPER, "single", "--out", str(single_out)],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    }
    for i in range(2):
        procs[f"multi{i}"] = subprocess.Popen(
            [sys.executable, HELPER, "multi", "--out", str(multi_out)],
            env=_env(
                2,
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    deadline = time.monotonic() + TIMEOUT_S
    outputs, failed = {}, None
    try:
        for name, proc in procs.items():
            try:
                out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed = f"{name} did not finish within {TIMEOUT_S} s"
                break
            outputs[name] = (proc.returncode, out, err)
            if proc.returncode != 0:
                failed = f"{name} exited with {proc.returncode}:\n{err[-3000:]}"
                break
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    if failed:
        pytest.fail(failed)
    return _load(single_out), _load(multi_out)


def _max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max(float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b, strict=True))


def _bitwise(a, b) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b, strict=True)
    )


def test_explicit_mesh_and_fsdp_on_four_devices(runs):
    """One process, 4 devices: fit on a ``jax.make_mesh`` mesh (Explicit axes) equals fit on the Auto mesh bit
    for bit; FSDP shards parameters, EMA and Adam's moments on their largest divisible dimension and equals the
    replicated run to 1e-6, and its checkpoint restores into the FSDP layout (the resume itself is checked
    on 2 processes); ``batch_loss`` (plain, stratified) and ``conditional_batch_loss`` of a class-conditional
    MLP under an Explicit mesh equal their values without one."""
    (result, states), _ = runs
    assert result["device_count"] == 4 and result["axis_types"] == ["AxisType.Explicit"]
    assert _bitwise(states["explicit"], states["auto"])
    assert result["explicit"]["history"] == result["auto"]["history"]
    assert set(result["auto"]["param_specs"]) == {"P()"}  # the default stays replicated
    # the MLP's leaves: biases (16,), kernels (16, 16) / (26, 16) / (16, 2) ...: sharded where divisible by 4
    specs = result["fsdp"]["param_specs"]
    assert "P()" in specs and any("'data'" in s for s in specs)
    assert sum("'data'" in s for s in specs) >= len(specs) - 1
    assert result["fsdp"]["ema_specs"] == specs
    assert [s for s in result["fsdp"]["mu_specs"] if s != "P()"]  # Adam's moments sharded too
    assert (
        0 < _max_diff(states["fsdp"], states["auto"]) < 1e-6
    )  # not the same program, same numbers
    assert np.allclose(
        result["fsdp"]["history"]["loss"], result["auto"]["history"]["loss"], rtol=1e-6
    )
    assert result["restored_step"] == 4 and result["restored_param_specs"] == specs
    assert result["restored_mu_specs"] == result["fsdp"]["mu_specs"]
    for name in ("batch_loss_stratified=False", "batch_loss_stratified=True", "conditional_loss"):
        plain, on_mesh = result[name]
        assert on_mesh == pytest.approx(plain, rel=1e-6), name


@pytest.mark.multiprocess
def test_two_processes_match_one_process(runs):
    """2 processes x 2 CPU devices (jax.distributed on loopback, gloo): data-parallel fit on the global batch,
    and FSDP on an Explicit mesh fed with each process's share of rows, both equal the one-process 4-device run
    to 1e-6 with the same loss history; the FSDP run resumed from its checkpoint at step 2 (at K = 2 steps per
    dispatch) ends bit for bit where it ended uninterrupted, with the same history; a second ``initialize_distributed`` returns True; a share of the wrong size is
    refused naming the layout."""
    (ref, ref_states), (result, states) = runs
    assert (result["process_count"], result["device_count"], result["local_devices"]) == (2, 4, 2)
    assert result["second_initialize"] is True
    for name in ("auto", "fsdp"):
        assert _max_diff(states[name], ref_states["auto"]) < 1e-6, name
        assert np.allclose(
            result[name]["history"]["loss"], ref["auto"]["history"]["loss"], rtol=1e-6
        )
    assert result["fsdp"]["param_specs"] == ref["fsdp"]["param_specs"]
    assert _bitwise(states["fsdp_resumed"], states["fsdp"])
    assert result["fsdp_resumed"]["history"] == result["fsdp"]["history"]
    assert "rows [i·B/P, (i+1)·B/P) on process i" in result["bad_share"]
