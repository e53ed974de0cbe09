"""Chunked evaluation with a progress bar (stderr), shared by the sample and likelihood runners."""

from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np

from .startup import resume_gc

__all__ = ["chunks", "bar", "run_chunks"]


def chunks(n: int, chunk: int):
    """``(start, size)`` of consecutive chunks of at most ``chunk`` items covering ``range(n)``."""
    for i in range(0, n, chunk):
        yield i, min(chunk, n - i)


def bar(total: int, desc: str, progress: bool, unit: str = "sample"):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)


def _pad(a, size: int):
    """``a`` padded to ``size`` rows by repeating its first row (one compiled shape for every chunk)."""
    if len(a) == size:
        return a
    return jnp.concatenate([a, jnp.repeat(a[:1], size - len(a), axis=0)])


def run_chunks(fn, inputs: tuple, chunk: int, desc: str, progress: bool, check):
    """``fn(*chunk_inputs)`` over the rows of ``inputs`` in padded chunks; ``check(out, m)`` per chunk.

    The first chunk compiles the program: the bar says so until it is done. Returns (the ``check`` values,
    seconds to the first chunk)."""
    n = len(inputs[0])
    outs, first = [], None
    tic = time.perf_counter()
    with bar(n, f"{desc} (compiling)", progress) as b:
        for i, m in chunks(n, chunk):
            out = fn(*(_pad(a[i : i + m], chunk) for a in inputs))
            outs.append(check(out, m))
            if first is None:
                first = time.perf_counter() - tic
                b.set_description(desc)
                resume_gc()  # the start-up is over (diffjax_app.startup)
            b.update(m)
    return outs, first


def first_rows(x, m: int) -> np.ndarray:
    return np.asarray(x)[:m]
