"""Starting JAX's distributed runtime from the launcher's environment (``jax.distributed.initialize``).

A multi-process job (several hosts, or several processes on one host each owning some devices) must call
``jax.distributed.initialize`` once per process, before any other JAX call touches a device. JAX detects some
launchers itself; :func:`initialize_distributed` adds the ones it does not, checks the variables first (one
line naming the missing variable and the fix instead of JAX's "Number of processes must be defined") and may
be called any number of times. The decision is the pure function :func:`distributed_kwargs` (environment →
keyword arguments of ``jax.distributed.initialize``, or None on one process), which the tests check without a
cluster.

Recognised environments, first match wins:

1. **Explicit variables** (any launcher, or by hand): ``JAX_COORDINATOR_ADDRESS`` = ``host:port`` of process 0
   (the coordinator listens there), ``JAX_NUM_PROCESSES`` = the number of processes, ``JAX_PROCESS_ID`` = this
   process's index in ``0 .. JAX_NUM_PROCESSES − 1``. Count and id may instead come from SLURM or Open MPI
   (below) while the address comes from ``JAX_COORDINATOR_ADDRESS``. ``JAX_LOCAL_DEVICE_IDS`` (e.g. ``0,1``)
   restricts the devices this process uses; JAX reads it itself.
2. **SLURM** (``srun``): ``SLURM_NTASKS`` > 1 with ``SLURM_PROCID``. JAX's own SLURM detection supplies the
   coordinator (the first node of ``SLURM_STEP_NODELIST``, a port derived from ``SLURM_JOB_ID``) and gives
   task i of a node the device ``SLURM_LOCALID`` (one task per GPU). Outside ``srun`` (a batch script's own
   shell) the step variables are missing and the call fails with that fix.
3. **Open MPI 5 / PMIx** (``mpirun``/``prterun``): ``OMPI_COMM_WORLD_SIZE`` > 1, rank ``OMPI_COMM_WORLD_RANK``
   (else ``PMIX_RANK``). Open MPI 5 exports no address JAX could use, so ``JAX_COORDINATOR_ADDRESS`` must be
   passed to every rank: ``mpirun -x JAX_COORDINATOR_ADDRESS=$(hostname):12345 ...``. With several ranks on
   a node (``OMPI_COMM_WORLD_LOCAL_SIZE`` > 1) rank r of the node gets the device ``OMPI_COMM_WORLD_LOCAL_RANK``
   (one rank per GPU, as JAX does for SLURM). Open MPI 4 (``OMPI_MCA_orte_hnp_uri`` set) is detected by JAX.
4. **Cloud TPU VMs / GKE**: ``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES`` listing more than one host, or
   ``MEGASCALE_COORDINATOR_ADDRESS`` (multislice): JAX detects everything (no arguments). On a TPU VM pod
   whose environment lists no workers (JAX reads them from the metadata server), set
   ``DIFFJAX_DISTRIBUTED=auto`` to call ``jax.distributed.initialize()`` with JAX's auto-detection.

``DIFFJAX_DISTRIBUTED=off`` forces one process whatever the launcher says (e.g. a single process started by
hand inside a multi-task SLURM allocation).

Nothing else (one process, or a launcher's variables saying one task) means one process: nothing to do.
(No time convention is involved here; elsewhere in diffjax t = 0 is noise and t = 1 is data.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["distributed_kwargs", "initialize_distributed"]

_JAX = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_LOCALID")


def _int(env: Mapping[str, str], name: str) -> int | None:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"initialize_distributed: {name}={raw!r} is not an integer") from None


def _count_and_id(env: Mapping[str, str]) -> tuple[int, int, str] | None:
    """(process count, process id, where they came from) from the JAX variables or a launcher; None if none
    says more than one process."""
    n, i = _int(env, "JAX_NUM_PROCESSES"), _int(env, "JAX_PROCESS_ID")
    if n is not None or i is not None:
        if n is None or i is None:
            missing = "JAX_NUM_PROCESSES" if n is None else "JAX_PROCESS_ID"
            given = "JAX_PROCESS_ID" if n is None else "JAX_NUM_PROCESSES"
            raise ValueError(
                f"initialize_distributed: {given} is set but {missing} is not; set both (the number of processes "
                "and this process's index) with JAX_COORDINATOR_ADDRESS=host:port of process 0, or unset them"
            )
        return n, i, "JAX_NUM_PROCESSES/JAX_PROCESS_ID"
    n = _int(env, "SLURM_NTASKS")
    if n is not None and n > 1:
        i = _int(env, "SLURM_PROCID")
        if i is None:
            raise ValueError(
                f"initialize_distributed: SLURM_NTASKS={n} but SLURM_PROCID is not set: start every task with "
                "srun (srun python train.py ...), not from the batch script's own shell (or set "
                "DIFFJAX_DISTRIBUTED=off to run one process)"
            )
        return n, i, "SLURM"
    n = _int(env, "OMPI_COMM_WORLD_SIZE")
    if n is not None and n > 1:
        i = _int(env, "OMPI_COMM_WORLD_RANK")
        i = _int(env, "PMIX_RANK") if i is None else i
        if i is None:
            raise ValueError(
                f"initialize_distributed: OMPI_COMM_WORLD_SIZE={n} but neither OMPI_COMM_WORLD_RANK nor "
                "PMIX_RANK is set; start the processes with mpirun/prterun"
            )
        return n, i, "Open MPI"
    return None


def _tpu_multi_host(env: Mapping[str, str]) -> bool:
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(
        env.get("MEGASCALE_COORDINATOR_ADDRESS")
    )


def distributed_kwargs(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The keyword arguments of ``jax.distributed.initialize`` for this environment, or None for one process.

    Pure: reads only ``environ`` (default ``os.environ``), starts nothing. See the module docstring for the
    variables. An empty dict means "let JAX detect everything" (TPU VMs, ``DIFFJAX_DISTRIBUTED=auto``);
    ``cluster_detection_method`` names the launcher JAX should read the coordinator from (SLURM, Open MPI 4).

    Raises:
        ValueError: half-set or inconsistent variables, in one line naming the variable and the fix (e.g.
            ``JAX_COORDINATOR_ADDRESS`` without a process count and id, or a process id out of range).
    """
    env = os.environ if environ is None else environ
    address = (env.get("JAX_COORDINATOR_ADDRESS") or "").strip() or None
    if address is not None and ":" not in address:
        raise ValueError(
            f"initialize_distributed: JAX_COORDINATOR_ADDRESS={address!r} needs a port: host:port of process 0 "
            "(e.g. 10.0.0.1:12345)"
        )
    switch = (env.get("DIFFJAX_DISTRIBUTED") or "").strip().lower()
    if switch in ("off", "0", "none", "false"):
        return None
    if switch == "auto":
        return {} if address is None else {"coordinator_address": address}
    found = _count_and_id(env)
    if found is None or found[0] == 1:
        if found is None and _tpu_multi_host(env):
            return {} if address is None else {"coordinator_address": address}
        if address is not None and found is None:
            raise ValueError(
                "initialize_distributed: JAX_COORDINATOR_ADDRESS is set but not the number of processes and this "
                "process's index: set JAX_NUM_PROCESSES and JAX_PROCESS_ID too (or start the processes with srun "
                "or mpirun, which set them), or unset JAX_COORDINATOR_ADDRESS for one process"
            )
        return None
    n, i, source = found
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(
            f"initialize_distributed: process id {i} and count {n} (from {source}) need 0 <= id < count"
        )
    kwargs: dict[str, Any] = {"num_processes": n, "process_id": i}
    if address is not None:
        kwargs["coordinator_address"] = address
    elif source == "SLURM":
        missing = [v for v in _SLURM_STEP if not env.get(v)]
        if missing:
            raise ValueError(
                f"initialize_distributed: SLURM_NTASKS={n} but {', '.join(missing)} not set (no job step): start "
                "every task with srun, or set JAX_COORDINATOR_ADDRESS=host:port of task 0 (or "
                "DIFFJAX_DISTRIBUTED=off to run one process)"
            )
        kwargs["cluster_detection_method"] = "slurm"
    elif source == "Open MPI":
        if not env.get("OMPI_MCA_orte_hnp_uri"):
            raise ValueError(
                f"initialize_distributed: Open MPI with {n} ranks but no coordinator address (Open MPI 5/PMIx "
                "exports none): pass JAX_COORDINATOR_ADDRESS=host:port of rank 0 to every rank, e.g. "
                "mpirun -x JAX_COORDINATOR_ADDRESS=$(hostname):12345 ..."
            )
        kwargs["cluster_detection_method"] = "ompi"
    else:
        raise ValueError(
            f"initialize_distributed: {source} say {n} processes but JAX_COORDINATOR_ADDRESS is not set: set it "
            "to host:port of process 0 on every process"
        )
    if source == "Open MPI" and "cluster_detection_method" not in kwargs:
        local_rank, local_size = (
            _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"),
            _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE"),
        )
        if local_rank is not None and (local_size or 1) > 1 and not env.get("JAX_LOCAL_DEVICE_IDS"):
            kwargs["local_device_ids"] = [local_rank]
    return kwargs


def initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Start JAX's distributed runtime when the environment describes a multi-process job; idempotent.

    Call it first, before any other JAX call (``jax.devices()``, creating an array): afterwards
    ``jax.devices()`` lists the devices of every process and ``jax.process_index()`` is this process's index.
    The variables it reads are those of :func:`distributed_kwargs` (``JAX_COORDINATOR_ADDRESS`` +
    ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID``; SLURM's ``srun``; Open MPI 5/PMIx with
    ``JAX_COORDINATOR_ADDRESS``; Cloud TPU VMs). On one process it does nothing.

    Returns:
        True when the process runs in an initialised multi-process runtime after the call (started by this
        call, or already by an earlier call of this function or of ``jax.distributed.initialize``); False on
        one process. A second call returns True again without doing anything.

    Raises:
        ValueError: half-set variables (one line naming the variable and the fix).
        RuntimeError: JAX was already used in this process before the call (it must come first).
    """
    import jax  # noqa: PLC0415 (the CLI imports this module before it needs JAX)

    if jax.distributed.is_initialized():
        return True
    kwargs = distributed_kwargs(environ)
    if kwargs is None:
        return False
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "before" in str(e).lower() or "already" in str(e).lower():
            raise RuntimeError(
                "initialize_distributed must run before any other JAX call in the process (JAX's devices were "
                f"already initialised): call it first, at the top of the program ({e})"
            ) from e
        raise
    return True
