"""Shared pytest fixtures for diffjax.

Time convention (used in every test): t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε.
"""

import jax
import pytest


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
