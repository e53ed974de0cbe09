"""``import diffjax`` stays light: the heavy submodules (checkpoint, data, nn, train) and those of the ODE solves
(solve, grids, sampling, likelihood: diffrax) load lazily; the application layer ``diffjax_app`` is never
imported by the numerics, and its command line starts without JAX.

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
LAZY = ("checkpoint", "data", "nn", "train", "solve", "grids", "sampling", "likelihood")
#: what training never uses: loaded only by the ODE solves (sampling, likelihood) and the plots
NOT_FOR_TRAINING = ("diffrax", "optimistix", "lineax", "matplotlib", "sklearn")


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


def test_training_imports_no_solver():
    # `diffjax train` imports its runner: the model, optimizer and checkpoints, but no ODE solver or plotting
    # library (they cost ~0.5 s of its start-up); the solver loads with the first solve
    out = run_python(
        "import json, sys\n"
        "import diffjax_app.train_runner, diffjax_app.build\n"
        f"names = {NOT_FOR_TRAINING!r}\n"
        "before = sorted({m.split('.')[0] for m in sys.modules} & set(names))\n"
        "import diffjax as dj\n"
        "dj.paths.LinearPath()  # the paths need no solver\n"
        "solve_ok = callable(dj.sample_ode) and 'diffrax' in sys.modules\n"
        "print(json.dumps({'loaded': before, 'solve_ok': solve_ok}))\n"
    )
    assert out["loaded"] == [], f"the train runner loaded {out['loaded']}"
    assert out["solve_ok"]  # and the lazy names still resolve (negative control of the check above)


def test_lazy_names_resolve():
    out = run_python(
        "import json, sys\n"
        "import diffjax as dj\n"
        "from diffjax import log_likelihood, SolveError, time_grid\n"
        "ok = dj.log_likelihood is log_likelihood and dj.SolveError is sys.modules['diffjax.solve'].SolveError\n"
        "ok = ok and dj.sample_ode is dj.sampling.sample_ode and time_grid is dj.sampling.time_grid\n"
        "ns = {}\n"
        "exec('from diffjax import *', ns)\n"
        "missing = [n for n in dj.__all__ if n not in ns]\n"
        "listed = all(n in dir(dj) for n in ('sample_ode', 'bits_per_dim', 'solve', 'likelihood'))\n"
        "print(json.dumps({'ok': ok, 'missing': missing, 'listed': listed}))\n"
    )
    assert out["ok"] and out["listed"] and out["missing"] == []


def test_lazy_submodules_resolve():
    out = run_python(
        "import json, sys\n"
        "import diffjax as dj\n"
        "ok = callable(dj.nn.split) and callable(dj.data.toy_sample) and callable(dj.train.fit)\n"
        "ok = ok and callable(dj.checkpoint.save) and dj.checkpoint is sys.modules['diffjax.checkpoint']\n"
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


@pytest.mark.parametrize("name", ("checkpoint", "data", "nn", "train", "sampling"))
def test_each_lazy_submodule_imports_on_its_own(name):
    # `import diffjax.<name>` first (not via the attribute): the package's __getattr__ must not get in the way
    out = run_python(
        f"import json, importlib; m = importlib.import_module('diffjax.{name}'); import diffjax\n"
        f"print(json.dumps({{'same': diffjax.{name} is m}}))\n"
    )
    assert out["same"]


def _application_imports(path: str) -> list[str]:
    """The ``diffjax_app`` imports of one Python file."""
    import ast  # noqa: PLC0415

    mods = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.append(node.module)
    return [m for m in mods if m.split(".")[0] == "diffjax_app"]


def test_numerics_never_import_the_application_layer(tmp_path):
    pkg = os.path.join(ROOT, "diffjax")
    offenders = {
        name: _application_imports(os.path.join(pkg, name))
        for name in sorted(os.listdir(pkg))
        if name.endswith(".py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
    # negative control: the same scan finds an application import where there is one
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom diffjax_app.cli import main\nimport diffjax_app.metrics as m\n")
    assert _application_imports(str(bad)) == ["diffjax_app.cli", "diffjax_app.metrics"]


def test_command_line_help_loads_no_jax():
    out = run_python(
        "import json, sys, io, contextlib\n"
        "from diffjax_app import cli\n"
        "buf = io.StringIO()\n"
        "try:\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        cli.main(['train', '--help'])\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'diffjax', 'numpy'})\n"
        "print(json.dumps({'code': code, 'loaded': loaded, 'help': buf.getvalue()}))\n"
    )
    assert out["code"] == 0 and out["loaded"] == []
    assert "(default: 0.001)" in out["help"] and "{fm,eps,v,edm,sd3,elbo}" in out["help"]
