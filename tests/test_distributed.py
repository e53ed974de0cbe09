"""``initialize_distributed``: its reading of the environment (a pure function, no cluster started), the one-line
errors for half-set variables, and that ``diffjax train`` calls it before anything else.

(No time convention is involved; elsewhere t = 0 is noise and t = 1 is data.)
"""

from __future__ import annotations

import pytest

from diffjax import distributed, train

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
