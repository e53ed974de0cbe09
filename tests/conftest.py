"""Shared pytest fixtures for diffjax.

Time convention (used in every test): t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε.
"""

import os

# The suite is dominated by XLA compile time (hundreds of small programs, each run a few times). LLVM's
# optimisation passes are most of that time on CPU and buy nothing for programs this small: compile them
# unoptimised (the same IEEE operations; about 30% off the suite's wall time). Benchmarks and users keep XLA's
# defaults. Set before jax initialises its backend; subprocesses started by tests inherit it. An XLA_FLAGS
# already in the environment is kept as it is.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import signal  # noqa: E402

# A shell without job control starts a background command (``cmd &``, ``nohup``) with SIGINT ignored, and every
# process it starts inherits that: the tests of Ctrl-C handling (in this process and in the training processes
# they start) would then see no SIGINT at all. Give the suite the interactive default; a child started after this
# gets SIGINT at its default too (exec resets a caught signal, and Python installs its handler).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Enable float64 for one test and restore the previous setting afterwards.

    Build paths and arrays *inside* the test (after this fixture runs) so that their leaves are float64.
    """
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)
