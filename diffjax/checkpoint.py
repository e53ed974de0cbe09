"""Checkpointing of a training state with orbax: guarded by the run's configuration, verified, one writer per run.

A checkpoint of step ``s`` in ``workdir`` is the orbax directory ``workdir/<s>/`` holding two items:

* ``state``: the train state PyTree (e.g. :class:`diffjax.train.TrainState`: params, optimizer state, EMA
  params, step, key) saved as is with ``ocp.args.StandardSave``;
* ``meta``: JSON with the run's ``config`` (a flat dict of JSON values), the ``tree`` spec of the state
  (``{path: [shape, dtype]}`` for every leaf) and free-form ``extra`` data (e.g. the loss history);

and, once orbax has finished writing it, ``diffjax_manifest.json``: the size and SHA-256 of every file of the step
directory (written atomically, by process 0 only). A copy of the config is written to ``workdir/config.json`` for
people reading the directory.

Restoring is done against an *abstract* state (``jax.eval_shape`` of the initialiser, leaves
``jax.ShapeDtypeStruct`` with the target sharding), so nothing is allocated twice and the restored arrays land
directly with the requested sharding (replicated parameters for data parallelism). Before any array is read,
:func:`restore_latest` checks that the stored config equals the current one and that every leaf has the same
shape and dtype, and raises a ``ValueError`` naming the differing keys otherwise: resuming a run with another
learning rate, model width or seed silently would give a run that is neither the old one nor the new one.

Integrity
---------
Saves are asynchronous (orbax writes in a background thread after copying the arrays to host memory) and atomic
(a temporary directory renamed when complete), so a process killed mid-save leaves the previous checkpoints
intact. What atomicity does not catch is damage after the fact (a truncated copy, a deleted file, flipped bits on
disk). :func:`verify_step` checks a step against its manifest; a step without one (the process was killed between
orbax's rename and the manifest) is checked by restoring it and requiring every floating leaf to be finite.
:func:`restore_latest` walks the steps from the newest to the oldest, reports each damaged one in one
:class:`DamagedCheckpointWarning` line and restores the newest intact one; the writer (``quarantine=True``) moves
damaged step directories to ``workdir/damaged/<step>`` (nothing is deleted) so that they are neither rotated
into the kept set nor in the way of a new save of that step. Readers change nothing on disk and work on read-only
workdirs.

One writer per workdir
----------------------
:func:`workdir_lock` holds an exclusive ``flock`` on ``workdir/.diffjax.lock`` (released by the OS on any exit,
``kill -9`` included) and records the holder (pid, host, command, start time) in it; a second writer fails at
once with :class:`WorkdirLockedError` naming the holder. Readers never lock.

Example::

    with workdir_lock(workdir):
        manager = make_manager(workdir, keep=3)
        save(manager, step, state, config.to_dict())
        manager.wait_until_finished()          # also writes the manifests of the finished steps
        manager.close()
    abstract = jax.eval_shape(lambda: state)
    restored = restore_latest(workdir, abstract, config.to_dict())   # Restored(state, step, meta) or None
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shlex
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import Collection, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "make_manager",
    "save",
    "restore_latest",
    "read_metadata",
    "verify_step",
    "write_manifest",
    "workdir_lock",
    "tree_spec",
    "config_diff",
    "Restored",
    "CheckpointError",
    "WorkdirError",
    "WorkdirLockedError",
    "DamagedCheckpointWarning",
]

CONFIG_FILE = "config.json"
MANIFEST_FILE = "diffjax_manifest.json"
LOCK_FILE = ".diffjax.lock"
DAMAGED_DIR = "damaged"


class CheckpointError(ValueError):
    """Every checkpoint of a workdir is damaged (or the one asked for is); the message names steps and reasons."""


class WorkdirError(ValueError):
    """The workdir is a file, or cannot be created, read or written; the message names the path and the fix."""


class WorkdirLockedError(RuntimeError):
    """Another process is writing to the workdir; the message names it (pid, host, since, command)."""


class DamagedCheckpointWarning(UserWarning):
    """A checkpoint step is damaged and was skipped (one line: the step, the reason, the step used instead)."""


class Restored(NamedTuple):
    """The result of :func:`restore_latest`.

    Attributes:
        state: the restored PyTree, in the structure (and shardings) of the abstract state.
        step: the checkpoint's step.
        meta: its JSON metadata ``{"config", "tree", "extra"}``.
    """

    state: Any
    step: int
    meta: dict


# ----------------------------------------------------------------------------------------------------------
# Workdirs and managers
# ----------------------------------------------------------------------------------------------------------


def _writable_workdir(workdir) -> str:
    """The absolute path of ``workdir``, created if needed and checked writable (else :class:`WorkdirError`)."""
    path = os.path.abspath(os.fspath(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(
            f"workdir {path} is a file, not a directory: pass a directory path (it is created if missing)"
        )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WorkdirError(
            f"cannot create workdir {path} ({e.strerror or type(e).__name__}): choose a writable location"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".diffjax-write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"workdir {path} is not writable ({e.strerror or type(e).__name__}): fix its permissions or "
            "choose another workdir (reading a run, e.g. sampling from it, works read-only)"
        ) from None
    return path


def _readable_workdir(workdir) -> str | None:
    """The absolute path of an existing workdir to read, None if it does not exist (nothing is created)."""
    path = os.path.abspath(os.fspath(workdir))
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        raise WorkdirError(f"workdir {path} is a file, not a directory: pass the run's directory")
    try:
        os.listdir(path)
    except OSError as e:
        raise WorkdirError(
            f"cannot read workdir {path} ({e.strerror or type(e).__name__}): fix its permissions"
        ) from None
    return path


class _Manager(ocp.CheckpointManager):
    """An orbax ``CheckpointManager`` that writes the manifest of each step it saved once the save has finished.

    orbax calls ``wait_until_finished`` at the start of every save (the previous save must finish first) and in
    ``close``; so the manifest of step s is written when the next save starts, or when the caller waits/closes.
    """

    def __init__(self, *args, **kwargs):
        self._diffjax_pending: list[int] = []
        super().__init__(*args, **kwargs)

    def wait_until_finished(self):
        super().wait_until_finished()
        pending, self._diffjax_pending = self._diffjax_pending, []
        for step in pending:
            if step in self.all_steps():
                write_manifest(self.directory, step)


def make_manager(
    workdir: str | os.PathLike,
    keep: int | None = 3,
    *,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` over ``workdir`` keeping the last ``keep`` checkpoints (None: all).

    A writer (default) creates ``workdir`` and checks that it can write there (else :class:`WorkdirError`);
    temporary directories left by a process killed mid-save are removed. ``read_only=True`` gives a manager that
    writes nothing (no directory, no cleanup, no rotation), for readers of a run, including read-only workdirs.
    """
    if keep is not None and (not isinstance(keep, int) or keep < 1):
        raise ValueError(f"make_manager: keep must be a positive int or None, got {keep!r}")
    if read_only:
        path = os.path.abspath(os.fspath(workdir))
        options = ocp.CheckpointManagerOptions(
            read_only=True,
            create=False,
            cleanup_tmp_directories=False,
            save_interval_steps=0,
            enable_async_checkpointing=False,
        )
    else:
        path = _writable_workdir(workdir)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return _Manager(path, options=options, item_handlers=handlers)


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


def _atomic_write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
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
    exiting (a manager from :func:`make_manager` then also writes the step's manifest). Returns whether a save
    was started (False if checkpoint ``step`` already exists).
    """
    step = int(step)
    if step in manager.all_steps():
        return False
    config = _jsonable(config)
    meta = {"config": config, "tree": tree_spec(state), "extra": dict(extra or {})}
    # the previous save must finish first anyway (orbax waits for it): this also writes its manifest
    manager.wait_until_finished()
    if jax.process_index() == 0:
        _atomic_write_json(os.path.join(os.fspath(manager.directory), CONFIG_FILE), config)
    started = manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        force=force,
    )
    if started and isinstance(manager, _Manager):
        manager._diffjax_pending.append(step)
    return started


# ----------------------------------------------------------------------------------------------------------
# Manifests and verification
# ----------------------------------------------------------------------------------------------------------


def _step_files(step_dir: str) -> Iterator[tuple[str, str]]:
    """``(relative path, absolute path)`` of every file under ``step_dir`` except the manifest, sorted."""
    found = []
    for root, dirs, files in os.walk(step_dir):
        dirs.sort()
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, step_dir).replace(os.sep, "/")
            if rel != MANIFEST_FILE and not rel.startswith(f"{MANIFEST_FILE}.tmp"):
                found.append((rel, full))
    return iter(sorted(found))


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(workdir: str | os.PathLike, step: int) -> str | None:
    """Record the size and SHA-256 of every file of the finished step ``step`` in ``<step>/diffjax_manifest.json``.

    Written atomically (a temporary file renamed) and only by ``jax.process_index() == 0``; returns its path
    (None on other processes). Called by the managers of :func:`make_manager` after each save has finished.
    """
    if jax.process_index() != 0:
        return None
    step_dir = os.path.join(os.fspath(workdir), str(int(step)))
    files = {
        rel: {"size": os.path.getsize(p), "sha256": _sha256(p)} for rel, p in _step_files(step_dir)
    }
    manifest = {
        "step": int(step),
        "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": files,
    }
    path = os.path.join(step_dir, MANIFEST_FILE)
    _atomic_write_json(path, manifest)
    return path


def _file_check(step_dir: str) -> tuple[str | None, bool]:
    """``(reason or None, whether a usable manifest was found)`` from the files of a step directory alone."""
    if not os.path.isdir(step_dir):
        return "step directory missing", False
    present = dict(_step_files(step_dir))
    if not present:
        return "empty step directory", False
    try:
        with open(os.path.join(step_dir, MANIFEST_FILE)) as f:
            recorded = json.load(f)["files"]
        if not isinstance(recorded, dict):
            raise TypeError("files is not a dict")
    except FileNotFoundError:
        return None, False
    except (OSError, ValueError, KeyError, TypeError):
        return (
            None,
            False,
        )  # an unreadable manifest: fall back to the restore check, do not condemn the data
    problems = []
    for rel in sorted(recorded):
        entry = recorded[rel]
        if rel not in present:
            problems.append(f"file {rel} missing")
            continue
        size = os.path.getsize(present[rel])
        if size != entry.get("size"):
            problems.append(f"file {rel}: size {size} != {entry.get('size')} recorded")
        elif _sha256(present[rel]) != entry.get("sha256"):
            problems.append(f"checksum mismatch in {rel}")
    if not problems:
        return None, True
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + more, True


def _describe(e: BaseException) -> str:
    """``"<type>: <first line>"``, short (tensorstore appends its whole spec to the first line)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    first = lines[0].split(" See full TensorStore details")[0] if lines else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


@jax.jit
def _finite_flags(leaves):
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def _nonfinite_leaves(tree) -> list[str]:
    """Key paths of the floating leaves of ``tree`` holding a NaN or an infinity (one jitted reduction)."""
    pairs = [
        (path, leaf)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
        if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact)
    ]
    if not pairs:
        return []
    flags = np.asarray(_finite_flags([leaf for _, leaf in pairs]))
    return [
        jax.tree_util.keystr(path) for (path, _), ok in zip(pairs, flags, strict=True) if not ok
    ]


def _read_meta(manager, step) -> dict:
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not isinstance(meta, dict) or not {"config", "tree"} <= set(meta):
        raise ValueError("the metadata item lacks 'config' or 'tree'")
    meta.setdefault("extra", {})
    return meta


def _restore_state(manager, step, abstract_state):
    args = ocp.args.Composite(state=ocp.args.StandardRestore(_with_sharding(abstract_state)))
    return manager.restore(step, args=args)["state"]


def _abstract_from_metadata(manager, step):
    """An abstract state in the stored structure, on the first device (for checks without a target)."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    metadata = manager.item_metadata(step)["state"]
    tree = getattr(metadata, "tree", metadata)

    def abstract(m):
        if hasattr(m, "shape") and hasattr(m, "dtype"):
            return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device)
        return m

    return jax.tree.map(abstract, tree)


def verify_step(workdir: str | os.PathLike, step: int) -> str | None:
    """None if checkpoint ``step`` of ``workdir`` is intact, else a one-line reason.

    With a manifest, every recorded file must be present with its recorded size and SHA-256. Without one (the
    writer was killed between orbax's finalisation and the manifest), the step is restored and every floating
    leaf must be finite. Read-only: nothing is written. Reasons look like ``"file state/xyz: size 120 != 4096
    recorded"``, ``"file ... missing"``, ``"checksum mismatch in ..."``, ``"empty step directory"``,
    ``"not restorable: <exception type and first line>"``.
    """
    path = _readable_workdir(workdir)
    if path is None:
        return f"workdir {os.path.abspath(os.fspath(workdir))} missing"
    step = int(step)
    reason, has_manifest = _file_check(os.path.join(path, str(step)))
    if reason is not None or has_manifest:
        return reason
    manager = make_manager(path, read_only=True)
    try:
        try:
            _read_meta(manager, step)
            state = _restore_state(manager, step, _abstract_from_metadata(manager, step))
        except Exception as e:  # noqa: BLE001 (any orbax/tensorstore failure is the reason)
            return f"not restorable: {_describe(e)}"
        bad = _nonfinite_leaves(state)
        return _nonfinite_reason(bad) if bad else None
    finally:
        manager.close()


def _nonfinite_reason(bad: list[str]) -> str:
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return f"non-finite values in {', '.join(bad[:3])}{more} (no manifest)"


# ----------------------------------------------------------------------------------------------------------
# Restoring
# ----------------------------------------------------------------------------------------------------------


def _as_manager(workdir_or_manager) -> tuple[ocp.CheckpointManager | None, bool]:
    """``(manager, owned)``; a path gives a read-only manager, or None when the directory does not exist."""
    if isinstance(workdir_or_manager, ocp.CheckpointManager):
        return workdir_or_manager, False
    path = _readable_workdir(workdir_or_manager)
    if path is None:
        return None, False
    return make_manager(path, keep=None, read_only=True), True


def read_metadata(workdir_or_manager, step: int | None = None) -> dict | None:
    """The JSON metadata ``{"config", "tree", "extra"}`` of checkpoint ``step`` (default: latest intact), or None.

    Read-only: a workdir that does not exist gives None and is not created. With ``step=None`` the newest step
    whose files are intact and whose metadata reads is used (damaged ones are skipped without a word; the
    restore reports them; steps rotated away by a live writer while being read are not damage, see
    :func:`restore_latest`). Raises :class:`CheckpointError` if the step asked for, or every step, is damaged.
    """
    manager, owned = _as_manager(workdir_or_manager)
    if manager is None:
        return None
    directory = os.fspath(manager.directory)

    def attempt(s):
        reason, _ = _file_check(os.path.join(directory, str(s)))
        if reason is not None:
            return None, reason
        try:
            return _read_meta(manager, s), None
        except Exception as e:  # noqa: BLE001
            return None, f"not restorable: {_describe(e)}"

    try:
        if step is not None:
            meta, reason = attempt(int(step))
            if meta is None:
                raise CheckpointError(_all_damaged_message(directory, [(int(step), reason)]))
            return meta
        meta, _ = _newest_intact(manager, attempt)
        return meta
    finally:
        if owned:
            manager.close()


READ_ROUNDS = 6
"""How many times a reader re-lists the steps when the ones it tried vanished (rotated away by a live writer)."""


def _gone(directory: str, step: int) -> bool:
    return not os.path.isdir(os.path.join(directory, str(step)))


def _newest_intact(manager, attempt):
    """``(result, damaged)`` of the newest step for which ``attempt(step) -> (result, reason)`` gives a result.

    A live writer saves and rotates while a reader reads: a step can vanish between the listing and the read, or
    while its files are read (an orbax or "file missing" error on a directory being deleted). Such a step is not
    damaged. After each pass the steps whose directory is gone are dropped from the damaged ones, and if any
    step vanished the listing is read again (newer steps have appeared) and the untried steps are tried, at most
    :data:`READ_ROUNDS` passes with a short growing pause. ``damaged`` lists ``(step, reason)`` of the steps that
    failed and are still present, newest first. Raises :class:`CheckpointError` if steps exist and none succeeds.
    """
    import time  # noqa: PLC0415

    directory = os.fspath(manager.directory)
    damaged: dict[int, str] = {}
    for round_ in range(READ_ROUNDS):
        if round_:
            time.sleep(0.05 * 2**round_)
            manager.reload()
        vanished = False
        for step in sorted(manager.all_steps(), reverse=True):
            if step in damaged:
                continue
            result, reason = attempt(step)
            if result is not None:
                still = [
                    (s, r)
                    for s, r in sorted(damaged.items(), reverse=True)
                    if not _gone(directory, s)
                ]
                return result, still
            if _gone(directory, step):
                vanished = True
            else:
                damaged[step] = reason
        for s in [s for s in damaged if _gone(directory, s)]:
            del damaged[s]
            vanished = True
        if not vanished:
            break
    if damaged:
        raise CheckpointError(
            _all_damaged_message(directory, sorted(damaged.items(), reverse=True))
        )
    return None, []


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


def _check_compatible(where: str, meta: dict, abstract_state, config, ignore) -> None:
    """Raise ValueError if the stored config (outside ``ignore``) or the state's tree differ from the current."""
    diff = {k: v for k, v in config_diff(meta["config"], config).items() if k not in ignore}
    if diff:
        lines = "; ".join(f"{k}: checkpoint={a!r} vs current={b!r}" for k, (a, b) in diff.items())
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


def _try_restore(manager, step: int, abstract_state, config, ignore):
    """``(Restored, None)`` for an intact step, ``(None, reason)`` for a damaged one; ValueError on a mismatch."""
    directory = os.fspath(manager.directory)
    reason, has_manifest = _file_check(os.path.join(directory, str(step)))
    if reason is not None:
        return None, reason
    try:
        meta = _read_meta(manager, step)
    except Exception as e:  # noqa: BLE001 (orbax/tensorstore errors become the reason)
        return None, f"not restorable: {_describe(e)}"
    _check_compatible(f"{directory}/{step}", meta, abstract_state, config, ignore)
    try:
        state = _restore_state(manager, step, abstract_state)
    except Exception as e:  # noqa: BLE001
        return None, f"not restorable: {_describe(e)}"
    if not has_manifest:
        bad = _nonfinite_leaves(state)
        if bad:
            return None, _nonfinite_reason(bad)
    return Restored(state, int(step), meta), None


def _quarantine(manager, step: int) -> str:
    """Move step directory ``step`` to ``workdir/damaged/<step>[.n]`` (never deleted); returns the new path."""
    directory = os.fspath(manager.directory)
    target_dir = os.path.join(directory, DAMAGED_DIR)
    dest = os.path.join(target_dir, str(step))
    if jax.process_index() == 0:
        os.makedirs(target_dir, exist_ok=True)
        n = 1
        while os.path.exists(dest):
            dest = os.path.join(target_dir, f"{step}.{n}")
            n += 1
        os.replace(os.path.join(directory, str(step)), dest)
    return dest


def _all_damaged_message(directory: str, damaged) -> str:
    reasons = "; ".join(f"step {s}: {r}" for s, r in damaged)
    return (
        f"every checkpoint in {directory} is damaged ({reasons}): nothing can be resumed. Move the step "
        f"directories away (e.g. into {os.path.join(directory, DAMAGED_DIR)}/) to start the run afresh, "
        "or use another workdir"
    )


def restore_latest(
    workdir_or_manager,
    abstract_state,
    config: Mapping[str, Any],
    *,
    ignore: Collection[str] = (),
    quarantine: bool = False,
) -> Restored | None:
    """Restore the newest intact checkpoint into the structure of ``abstract_state``: a :class:`Restored`, or None.

    Steps are tried from the newest to the oldest. A damaged one (see :func:`verify_step`; also any orbax error
    while reading it) is reported in one :class:`DamagedCheckpointWarning` line naming the step, the reason and
    the step restored instead, and skipped. A step that vanishes while it is read (a live writer rotated it
    away: readers run beside training) is not damage: the steps are listed again and the newest intact one is
    restored (see :data:`READ_ROUNDS`).

    Args:
        workdir_or_manager: a directory written by :func:`save` (a missing or empty one gives None; it is read
            through a read-only manager, so read-only workdirs work) or a manager.
        abstract_state: the target PyTree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape(init)``), optionally
            with shardings (leaves without one are restored replicated over all devices).
        config: the current run's config; it must equal the stored one, except for the keys in ``ignore``.
        quarantine: (for the writer of the run) move each damaged step directory to ``workdir/damaged/<step>``
            (suffixed ``.1``, ``.2`` ... if taken) and reload the manager, so that the step can be saved again and
            rotation keeps intact steps only. Readers (False) change nothing on disk.

    Raises:
        ValueError: the stored config differs (the message names every differing key with both values), or the
            state's structure, shapes or dtypes differ (the message names the differing leaves). Not damage.
        CheckpointError: every step is damaged (nothing is moved; the message says what to do).
        WorkdirError: the path is a file or cannot be read.
    """
    manager, owned = _as_manager(workdir_or_manager)
    if manager is None:
        return None
    directory = os.fspath(manager.directory)
    try:
        restored, damaged = _newest_intact(
            manager, lambda step: _try_restore(manager, step, abstract_state, config, ignore)
        )
        if restored is None:
            return None
        for bad_step, why in damaged:
            moved = ""
            if quarantine:
                moved = f"; moved to {_quarantine(manager, bad_step)}"
            warnings.warn(
                f"checkpoint step {bad_step} in {directory} is damaged ({why}); falling back to step "
                f"{restored.step}{moved}",
                DamagedCheckpointWarning,
                stacklevel=2,
            )
        if quarantine and damaged:
            if jax.process_count() > 1:
                ocp.multihost.sync_global_processes("diffjax_checkpoint_quarantine")
            manager.reload()
        return restored
    finally:
        if owned:
            manager.close()


# ----------------------------------------------------------------------------------------------------------
# One writer per workdir
# ----------------------------------------------------------------------------------------------------------

_HELD: dict[str, list[int]] = {}
"""This process's held workdir locks: realpath -> [file descriptor, depth, owning thread] (re-entrant within the
thread that holds it; another thread of the process is refused like another process)."""
_HELD_GUARD = threading.Lock()


def _holder_text(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode())
        command = str(info.get("command", "?"))
        if len(command) > 200:
            command = command[:197] + "..."
        return (
            f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('since', '?')}, "
            f"command: {command}"
        )
    except (ValueError, UnicodeDecodeError, AttributeError):
        return "holder unknown (it is just starting)"


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[str]:
    """Hold the one-writer lock of ``workdir`` (created if missing) for the duration of the ``with`` block.

    An exclusive, non-blocking ``fcntl.flock`` on ``workdir/.diffjax.lock``; the OS releases it when the process
    ends in any way (``kill -9`` included), so there is never a stale lock. The holder's pid, host, command
    line and start time are written into the file. Re-entrant within the thread that holds it (a count keyed by
    the real path; another thread of the same process is refused like another process), so an application holding it may call :func:`diffjax.train.fit`, which takes it too. Under
    multi-process JAX only process 0 locks. Readers do not lock. Yields the workdir's absolute path.

    Raises:
        WorkdirLockedError: another process holds it (raised at once; the message names the holder).
        WorkdirError: the workdir is a file or not writable.
    """
    import fcntl  # noqa: PLC0415 (POSIX only)

    path = _writable_workdir(workdir)
    if jax.process_index() != 0:
        yield path
        return
    key = os.path.realpath(path)
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None and held[2] != threading.get_ident():
            raise WorkdirLockedError(
                f"workdir {path} is being written by another thread of this process (pid {os.getpid()}): "
                "wait for it to finish, or use another workdir"
            )
        if held is not None:
            held[1] += 1
        else:
            lock_path = os.path.join(path, LOCK_FILE)
            try:
                fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise WorkdirError(
                    f"cannot create the lock file {lock_path} ({e.strerror}): fix the workdir's permissions"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raw = os.pread(fd, 65536, 0)
                os.close(fd)
                raise WorkdirLockedError(
                    f"workdir {path} is being written by another run ({_holder_text(raw)}): wait for it to "
                    "finish, or use another workdir"
                ) from None
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": shlex.join(sys.argv) if sys.argv else "?",
                "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            }
            data = json.dumps(info).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            _HELD[key] = [fd, 1, threading.get_ident()]
    try:
        yield path
    finally:
        with _HELD_GUARD:
            held = _HELD[key]
            held[1] -= 1
            if held[1] == 0:
                del _HELD[key]
                os.close(held[0])  # releases the flock
