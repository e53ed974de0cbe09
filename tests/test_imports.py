"""``import diffjax`` stays light: the heavy submodules (checkpoint, data, nn, train, experiment, cli) load lazily.

Each check runs in a fresh interpreter, since this test process has long imported everything. (No time
convention is involved here; elsewhere t = 0 is noise and t = 1 is data.)
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("orbax", "tensorstore", "matplotlib", "sklearn", "flax", "optax")
LAZY = ("checkpoint", "cli", "data", "experiment", "nn", "train")


def run_python(code: str) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_diffjax_loads_no_heavy_dependency():
    out = run_python(
        "import json, sys, time\n"
        "t = time.perf_counter()\n"
        "import diffjax\n"
        "dt = time.perf_counter() - t\n"
        f"heavy = {HEAVY!r}\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & set(heavy))\n"
        f"lazy = [n for n in {LAZY!r} if 'diffjax.' + n in sys.modules]\n"
        "print(json.dumps({'seconds': dt, 'loaded': loaded, 'lazy_loaded': lazy,"
        " 'n_modules': len(sys.modules)}))\n"
    )
    print(f"import diffjax: {out['seconds']:.2f} s, {out['n_modules']} modules")
    assert out["loaded"] == [], f"import diffjax loaded {out['loaded']}"
    assert out["lazy_loaded"] == [], f"import diffjax imported diffjax.{out['lazy_loaded']}"


def test_lazy_submodules_resolve():
    out = run_python(
        "import json, sys\n"
        "import diffjax as dj\n"
        "ok = callable(dj.nn.split) and callable(dj.data.toy_sample) and callable(dj.train.fit)\n"
        "ok = ok and callable(dj.checkpoint.save) and callable(dj.cli.main)\n"
        "ok = ok and dj.experiment is sys.modules['diffjax.experiment']\n"
        "import diffjax.train as train_mod\n"
        "from diffjax import nn as nn_mod\n"
        "ok = ok and train_mod is dj.train and nn_mod is dj.nn and 'optax' in sys.modules\n"
        "listed = all(n in dir(dj) for n in ('nn', 'data', 'train', 'checkpoint'))\n"
        "try:\n"
        "    dj.no_such_name\n"
        "    missing = None\n"
        "except AttributeError as e:\n"
        "    missing = str(e)\n"
        "print(json.dumps({'ok': ok, 'listed': listed, 'missing': missing}))\n"
    )
    assert out["ok"] and out["listed"]
    assert "no_such_name" in out["missing"]  # a negative control: unknown names still raise


@pytest.mark.parametrize("name", LAZY)
def test_each_lazy_submodule_imports_on_its_own(name):
    # `import diffjax.<name>` first (not via the attribute): the package's __getattr__ must not get in the way
    out = run_python(
        f"import json, importlib; m = importlib.import_module('diffjax.{name}'); import diffjax\n"
        f"print(json.dumps({{'same': diffjax.{name} is m}}))\n"
    )
    assert out["same"]
