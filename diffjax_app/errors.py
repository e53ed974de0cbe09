"""The errors and notices of the application layer: one line each, naming the cause and the fix.

The command line prints a :class:`RunError` (and the ``ValueError`` of a bad config, the ``OSError`` of a file
it cannot use, a locked workdir, a damaged checkpoint) as ``diffjax <command>: error: <message>`` and exits with
status 2; a numerical failure (a diverged training run, a failed ODE solve) exits with status 1; the traceback
is shown only with ``--debug``. Notices (:func:`notice`) are one line on stderr and never stop a run.
"""

from __future__ import annotations

import sys

__all__ = [
    "RunError",
    "NoCheckpointError",
    "NonFiniteError",
    "notice",
    "describe_os_error",
    "quiet_dependency_logs",
]


class RunError(ValueError):
    """An ordinary problem with a run (a missing or foreign workdir, a refused no-op); exit status 2."""


class NoCheckpointError(RunError):
    """The workdir holds no checkpoint (run ``diffjax train`` first)."""


class NonFiniteError(RuntimeError):
    """A result holds NaN/inf (its message says which and how to fix it); exit status 1."""


def notice(message: str, *, prefix: str = "diffjax") -> None:
    """Print one line ``<prefix>: <message>`` on stderr (progress bars and warnings share stderr)."""
    print(f"{prefix}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)


def describe_os_error(e: OSError) -> str:
    """``"permission denied: /path"``-style text of an ``OSError`` (its errno text and file name)."""
    what = (e.strerror or type(e).__name__).lower()
    where = e.filename if e.filename is not None else ""
    return f"{what}: {where}" if where else what


def quiet_dependency_logs() -> None:
    """Keep dependencies' routine log lines off stderr in entry points (the CLI, the experiment scripts).

    orbax logs through absl, e.g. ``Given directory is read only`` for every read-only reader of a workdir;
    errors still show. Only entry points call this: it sets the level of the process's ``absl`` logger.
    """
    import logging  # noqa: PLC0415

    logging.getLogger("absl").setLevel(logging.ERROR)
