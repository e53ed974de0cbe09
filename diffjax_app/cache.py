"""JAX's persistent compilation cache for the command line and the experiment scripts.

The first run of ``diffjax train`` compiles the train step, the ODE sampler and the likelihood solve (tens of seconds
on a small CPU); with the persistent cache a second run loads the compiled executables from disk instead. Library
code never calls this (no global state in the library); only entry points (``diffjax_app.cli``,
``experiments/*.py``) do, before their first compilation.

Where: ``--cache-dir`` if given, else ``$DIFFJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffjax/jax`` (default
``~/.cache/diffjax/jax``). ``DIFFJAX_CACHE_DIR=off`` (or ``none``/``0``/empty) turns it off.

Runtime checks. JAX does not write executables that contain host callbacks to the persistent cache, and
``equinox.error_if`` is a host callback. The library keeps them out of the programs the command line compiles:
the train step draws its times inside [0, 1] and checks nothing at run time, and the runners call the samplers
and likelihoods with ``throw=False`` and check each solve's ``status`` on the host
(:func:`diffjax.solve.raise_if_failed`). Nothing here changes any global state of JAX's dependencies.
"""

from __future__ import annotations

import os

__all__ = [
    "ENV_VAR",
    "default_cache_dir",
    "resolve_cache_dir",
    "enable_compilation_cache",
    "CacheDirError",
]

ENV_VAR = "DIFFJAX_CACHE_DIR"
_OFF = ("", "0", "off", "none", "false", "no")


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/diffjax/jax``, i.e. ``~/.cache/diffjax/jax`` by default."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffjax", "jax")


def resolve_cache_dir(cache_dir: str | None = None) -> str | None:
    """The cache directory to use (None: caching off). Precedence: argument, ``$DIFFJAX_CACHE_DIR``, default."""
    if cache_dir is None:
        cache_dir = os.environ.get(ENV_VAR)
        if cache_dir is None:
            return default_cache_dir()
    if cache_dir.strip().lower() in _OFF:
        return None
    return os.path.abspath(os.path.expanduser(cache_dir))


class CacheDirError(OSError):
    """The compilation cache directory cannot be created or written (the message says how to turn it off)."""


def _check_writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        what = (e.strerror or type(e).__name__).lower()
        raise CacheDirError(
            f"cannot write the compilation cache directory {path} ({what}); pass --cache-dir off, or a "
            f"writable --cache-dir (or set ${ENV_VAR})"
        ) from e


def enable_compilation_cache(
    cache_dir: str | None = None, min_compile_time_s: float = 0.0
) -> str | None:
    """Turn on JAX's persistent compilation cache in ``resolve_cache_dir(cache_dir)``; returns the directory.

    Every compilation that takes at least ``min_compile_time_s`` seconds is written (0: all of them). Must run
    before the process's first compilation: JAX initialises the cache once, at the first compile. Raises
    :class:`CacheDirError` (one line, with the fix) if the directory cannot be written.
    """
    import jax  # noqa: PLC0415

    path = resolve_cache_dir(cache_dir)
    if path is None:
        return None
    _check_writable(path)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
