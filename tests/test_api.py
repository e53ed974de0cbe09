"""The public API: every name in ``diffjax.__all__`` exists, and the submodules import."""

import importlib

import diffjax


def test_all_names_exist():
    missing = [name for name in diffjax.__all__ if not hasattr(diffjax, name)]
    assert not missing, missing
    assert len(set(diffjax.__all__)) == len(diffjax.__all__)


def test_submodules_import_and_declare_all():
    for mod in [
        "paths",
        "targets",
        "losses",
        "fields",
        "sampling",
        "likelihood",
        "vlb",
        "analytic",
        "nn",
        "data",
        "train",
        "checkpoint",
        "cli",
        "experiment",
    ]:
        m = importlib.import_module(f"diffjax.{mod}")
        for name in getattr(m, "__all__", []):
            assert hasattr(m, name), (mod, name)
