"""Checkpointing of a training state with orbax, guarded by the run's configuration.

A checkpoint of step ``s`` in ``workdir`` is the orbax directory ``workdir/<s>/`` holding two items:

* ``state``: the train state PyTree (e.g. :class:`diffjax.train.TrainState`: params, optimizer state, EMA
  params, step, key) saved as is with ``ocp.args.StandardSave``;
* ``meta``: JSON with the run's ``config`` (a flat dict of JSON values), the ``tree`` spec of the state
  (``{path: [shape, dtype]}`` for every leaf) and free-form ``extra`` data (e.g. the loss history).

A copy of the config is also written to ``workdir/config.json`` for people reading the directory.

Restoring is done against an *abstract* state (``jax.eval_shape`` of the initialiser, leaves
``jax.ShapeDtypeStruct`` with the target sharding), so nothing is allocated twice and the restored arrays land
directly with the requested sharding (replicated parameters for data parallelism). Before any array is read,
:func:`restore_latest` checks that the stored config equals the current one and that every leaf has the same
shape and dtype, and raises a ``ValueError`` naming the differing keys otherwise: resuming a run with another
learning rate, model width or seed silently would give a run that is neither the old one nor the new one.

Saves are asynchronous (orbax writes in a background thread after copying the arrays to host memory) and atomic
(a temporary directory renamed when complete), so a process killed mid-save leaves the previous checkpoints
intact and :func:`restore_latest` never sees a partial one. Only the last ``keep`` checkpoints are kept.

Example::

    manager = make_manager(workdir, keep=3)
    save(manager, step, state, config.to_dict())
    manager.wait_until_finished()
    abstract = jax.eval_shape(lambda: state)
    restored = restore_latest(workdir, abstract, config.to_dict())   # (state, step) or None
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "make_manager",
    "save",
    "restore_latest",
    "read_metadata",
    "tree_spec",
    "config_diff",
]

CONFIG_FILE = "config.json"


def make_manager(
    workdir: str | os.PathLike, keep: int | None = 3, *, async_save: bool = True
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` over ``workdir`` keeping the last ``keep`` checkpoints (None: all).

    Temporary directories left by a process killed mid-save are removed when the manager is created.
    """
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"make_manager: keep must be a positive int or None, got {keep!r}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.fspath(workdir)), options=options, item_names=("state", "meta")
    )


def _jsonable(config: Mapping[str, Any]) -> dict:
    """The config as it reads back from JSON (tuples become lists), so that comparisons are exact."""
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict of JSON values, got {type(config).__name__}")
    try:
        return json.loads(json.dumps(dict(config), sort_keys=True))
    except TypeError as e:
        raise ValueError(f"config must hold only JSON values (numbers, strings, lists): {e}") from e


def tree_spec(tree) -> dict[str, list]:
    """``{path: [shape, dtype]}`` for every array leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(path): [list(np.shape(leaf)), str(np.dtype(leaf.dtype))]
        for path, leaf in leaves
    }


def config_diff(stored: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
    """``{key: (stored value, current value)}`` for every key whose value differs (missing: ``"<absent>"``)."""
    a, b = _jsonable(stored), _jsonable(current)
    out = {}
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            out[k] = (va, vb)
    return out


def _write_config(workdir: str, config: dict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, path)  # atomic


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state,
    config: Mapping[str, Any],
    *,
    extra: Mapping[str, Any] | None = None,
    force: bool = True,
) -> bool:
    """Save ``state`` as checkpoint ``step`` together with ``config`` (and JSON ``extra``) as its metadata.

    Asynchronous: returns once the arrays are copied to host; call ``manager.wait_until_finished()`` before
    exiting. Returns whether a save was started (False if checkpoint ``step`` already exists).
    """
    step = int(step)
    if step in manager.all_steps():
        return False
    config = _jsonable(config)
    meta = {"config": config, "tree": tree_spec(state), "extra": dict(extra or {})}
    if jax.process_index() == 0:
        _write_config(os.fspath(manager.directory), config)
    return manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )


def _missing_workdir(workdir_or_manager) -> bool:
    """A path (not a manager) that is not a directory: nothing to read, and nothing is created."""
    return isinstance(workdir_or_manager, (str, os.PathLike)) and not os.path.isdir(
        workdir_or_manager
    )


def _as_manager(workdir_or_manager) -> tuple[ocp.CheckpointManager, bool]:
    if isinstance(workdir_or_manager, ocp.CheckpointManager):
        return workdir_or_manager, False
    return make_manager(workdir_or_manager, keep=None, async_save=False), True


def read_metadata(workdir_or_manager, step: int | None = None) -> dict | None:
    """The JSON metadata ``{"config", "tree", "extra"}`` of checkpoint ``step`` (default: latest), or None.

    Read-only: a workdir that does not exist gives None and is not created.
    """
    if _missing_workdir(workdir_or_manager):
        return None
    manager, owned = _as_manager(workdir_or_manager)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            return None
        return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        if owned:
            manager.close()


def _with_sharding(abstract_state):
    """Give every abstract leaf a sharding (replicated over all devices where none is set)."""
    replicated = None

    def fix(leaf):
        nonlocal replicated
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            if replicated is None:
                mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
                replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            sharding = replicated
        return jax.ShapeDtypeStruct(np.shape(leaf), leaf.dtype, sharding=sharding)

    return jax.tree.map(fix, abstract_state)


def restore_latest(
    workdir_or_manager, abstract_state, config: Mapping[str, Any], *, ignore: Collection[str] = ()
):
    """Restore the latest checkpoint into the structure of ``abstract_state``: ``(state, step)``, or None.

    Args:
        workdir_or_manager: a directory written by :func:`save` (a missing or empty one gives None) or a manager.
        abstract_state: the target PyTree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape(init)``), optionally
            with shardings (leaves without one are restored replicated over all devices).
        config: the current run's config; it must equal the stored one, except for the keys in ``ignore``.

    Raises:
        ValueError: the stored config differs (the message names every differing key with both values), or the
            state's structure, shapes or dtypes differ (the message names the differing leaves).
    """
    if _missing_workdir(workdir_or_manager):
        return None
    manager, owned = _as_manager(workdir_or_manager)
    try:
        step = manager.latest_step()
        if step is None:
            return None
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        where = f"{os.fspath(manager.directory)}/{step}"
        diff = {k: v for k, v in config_diff(meta["config"], config).items() if k not in ignore}
        if diff:
            lines = "; ".join(f"{k}: checkpoint={a!r} vs current={b!r}" for k, a, b in _items(diff))
            raise ValueError(
                f"refusing to restore checkpoint {where}: its config differs in {sorted(diff)} ({lines}). "
                "Use a new workdir for a new config, or pass the checkpoint's config to resume it."
            )
        stored, current = meta["tree"], tree_spec(abstract_state)
        if stored != current:
            missing = sorted(set(stored) - set(current))
            added = sorted(set(current) - set(stored))
            changed = sorted(
                f"{k}: checkpoint {stored[k]} vs current {current[k]}"
                for k in set(stored) & set(current)
                if stored[k] != current[k]
            )
            raise ValueError(
                f"refusing to restore checkpoint {where}: the state's parameters differ "
                f"(shape/dtype changed: {changed}; only in checkpoint: {missing}; only in current: {added}). "
                "The model or optimizer does not match the one that wrote the checkpoint."
            )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(_with_sharding(abstract_state))),
        )
        return restored["state"], int(step)
    finally:
        if owned:
            manager.close()


def _items(diff):
    for k, (a, b) in diff.items():
        yield k, a, b
