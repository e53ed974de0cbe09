"""The public API: every name in ``diffjax.__all__`` exists, and the submodules import."""

import importlib

import diffjax


def test_all_names_exist():
    missing = [name for name in diffjax.__all__ if not hasattr(diffjax, name)]
    assert not missing, missing
    assert len(set(diffjax.__all__)) == len(diffjax.__all__)


def test_all_names_resolve_by_import():
    # `from diffjax import name` for every exported name (what `from diffjax import *` does)
    namespace: dict = {}
    exec("from diffjax import *", namespace)
    missing = [name for name in diffjax.__all__ if name not in namespace]
    assert not missing, missing
    for name in diffjax.__all__:
        assert namespace[name] is getattr(diffjax, name)


def test_lazy_submodules_are_attributes():
    for mod in ["nn", "data", "train", "checkpoint"]:
        assert getattr(diffjax, mod) is importlib.import_module(f"diffjax.{mod}")
    assert callable(diffjax.nn.split) and callable(diffjax.data.toy_sample)
    assert callable(diffjax.train.fit)


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
        "solve",
        "grids",
        "kinds",
    ]:
        m = importlib.import_module(f"diffjax.{mod}")
        for name in getattr(m, "__all__", []):
            assert hasattr(m, name), (mod, name)


def test_application_modules_declare_all():
    for mod in ["config", "build", "workdir", "errors", "cache", "metrics", "plots", "progress",
                "train_runner", "sample_runner", "likelihood_runner", "demo", "cli"]:  # fmt: skip
        m = importlib.import_module(f"diffjax_app.{mod}")
        for name in getattr(m, "__all__", []):
            assert hasattr(m, name), (mod, name)
