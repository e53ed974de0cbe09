"""The ``diffjax`` command line end to end on tiny runs (t = 0 noise, t = 1 data).

One module-scoped run trains a 16-unit MLP for a few steps; ``sample`` and ``likelihood`` then read it back.
Numbers are checked for validity (finite, right counts, resumed step counts), and the metrics against independent
computations where cheap (the energy distance against a numpy implementation; the checkerboard's true NLL log 32).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffjax_app import build, cache as _cache, cli, config, metrics, train_runner, workdir

TINY = ["--hidden", "16", "--depth", "1", "--batch-size", "16", "--warmup", "2", "--no-progress"]
EVAL = ["--num-steps", "8", "--no-progress", "--cache-dir", "off"]


def _json_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # exactly one line on stdout
    return json.loads(out[0])


def _finite(*xs):
    return all(isinstance(x, (int, float)) and math.isfinite(x) for x in xs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run: (workdir, the JSON line that ``train`` printed)."""
    workdir = tmp_path_factory.mktemp("run")
    argv = ["train", "--data", "checkerboard", "--steps", "4", "--workdir", str(workdir)]
    with pytest.MonkeyPatch.context() as mp:
        lines = []
        mp.setattr(cli, "_emit", lambda r: lines.append(json.loads(json.dumps(cli._finite(r)))))
        assert cli.main([*argv, *TINY, "--cache-dir", "off"]) == 0
    assert len(lines) == 1
    return workdir, lines[0]


def test_json_line_is_valid_json(capsys):
    # Argument errors are found before any work; a valid run's output is checked on the fixture's run below.
    assert cli._finite({"a": float("nan"), "b": [1.0, float("inf")]}) == {
        "a": None,
        "b": [1.0, None],
    }
    cli._emit({"x": 1.5, "y": float("nan")})
    assert _json_line(capsys) == {"x": 1.5, "y": None}


def test_train_result_and_metrics(trained):
    workdir, r = trained
    assert (
        r["command"] == "train" and r["step"] == 4 and r["steps_run"] == 4 and r["start_step"] == 0
    )
    assert _finite(r["final_loss"], r["train_wall_s"], r["time_to_first_step_s"])
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["config"]["objective"] == "fm" and metrics["config"]["path"] == "linear"
    assert len(metrics["train"]["history"]["loss"]) >= 1
    assert (workdir / "loss.png").stat().st_size > 0


def test_train_resumes_and_continues(trained, capsys):
    """Resumed with two fused steps per dispatch (the first run had one): K is a run option, not config."""
    trained, _ = trained
    capsys.readouterr()
    argv = ["train", "--data", "checkerboard", "--steps", "6", "--workdir", str(trained)]
    cli.main([*argv, *TINY, "--cache-dir", "off", "--no-figures", "--steps-per-dispatch", "2"])
    r = _json_line(capsys)
    assert (r["start_step"], r["step"], r["steps_run"]) == (4, 6, 2)
    history = json.loads((trained / "metrics.json").read_text())["train"]["history"]
    assert history["step"][-1] == 6 and history["step"][0] == 1  # the history covers both runs


def test_complete_run_keeps_its_training_time(tmp_path, capsys):
    argv = ["train", "--data", "checkerboard", "--steps", "3", "--workdir", str(tmp_path)]
    cli.main([*argv, *TINY, "--cache-dir", "off", "--no-figures"])
    first = _json_line(capsys)
    cli.main([*argv, *TINY, "--cache-dir", "off", "--no-figures"])  # nothing left to train
    again = _json_line(capsys)
    assert (first["steps_run"], again["steps_run"], again["step"]) == (3, 0, 3)
    assert again["train_wall_s"] == first["train_wall_s"] and _finite(first["train_wall_s"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())["train"]
    assert metrics["timing_from_earlier_run"] is True


def test_sample_prints_finite_metrics(trained, capsys):
    trained, _ = trained
    capsys.readouterr()
    cli.main(["sample", "--workdir", str(trained), "--n", "12", *EVAL])
    r = _json_line(capsys)
    assert r["command"] == "sample" and r["n"] == 12
    assert _finite(r["energy_distance"], r["mmd_rbf"], r["nfe_mean"], r["sample_wall_s"])
    samples = np.load(trained / "samples.npy")
    assert samples.shape == (12, 2) and np.all(np.isfinite(samples))
    assert r["nfe_mean"] == 16  # Heun: 2 evaluations × 8 fixed steps
    for name in ("samples", "trajectories"):
        assert (trained / f"{name}.png").stat().st_size > 0


def test_likelihood_prints_finite_nll(trained, capsys):
    trained, _ = trained
    capsys.readouterr()
    cli.main(
        ["likelihood", "--workdir", str(trained), "--data", "checkerboard", "--n", "10", *EVAL]
    )
    r = _json_line(capsys)
    assert r["command"] == "likelihood" and r["n"] == 10
    assert _finite(r["nll"], r["nll_se"])
    assert r["true_nll"] == pytest.approx(math.log(32.0))
    # An almost untrained model is worse than the true density (negative control for a too-good NLL).
    assert r["nll"] > math.log(32.0)


def test_unknown_data_set_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "cifar", "--steps", "2", "--workdir", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown data set 'cifar'" in err and "checkerboard" in err  # names the valid ones


def test_bad_flag_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--steps", "-3", "--workdir", str(tmp_path)])
    assert e.value.code == 2
    assert "positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sample", "likelihood"])
def test_no_checkpoint_exits_2(tmp_path, capsys, command):
    empty = tmp_path / "empty"
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--workdir", str(empty), "--cache-dir", "off"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{empty} does not exist; train into it first (diffjax train --workdir {empty}" in err
    assert "Traceback" not in err
    assert not empty.exists()  # nothing created


def test_resume_with_another_config_exits_2(trained, capsys):
    trained, _ = trained
    capsys.readouterr()
    argv = [
        "train",
        "--data",
        "checkerboard",
        "--steps",
        "8",
        "--lr",
        "0.5",
        "--workdir",
        str(trained),
    ]
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, *TINY, "--cache-dir", "off"])
    assert e.value.code == 2
    assert "lr" in capsys.readouterr().err


def test_builders_reject_unknown_names():
    with pytest.raises(ValueError, match="valid objectives are: fm, eps, v, edm, sd3, elbo"):
        build.build_objective("score")
    with pytest.raises(ValueError, match="valid paths are"):
        build.build_path("sqrt")
    with pytest.raises(ValueError, match="valid data sets are"):
        config.ExperimentConfig(data="mnist")
    cfg = config.ExperimentConfig(objective="edm", steps=5).resolved()
    assert config.ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_start_up_programs_match_the_eager_computation():
    # build.py fuses start-up work into single jitted programs (fewer programs to load on a warm start): the
    # MLP's initial parameters are bitwise those of the eager ops, each step's toy batch that of the jitted
    # sampler fed an eagerly folded key (as before; eager sampling differs from jitted by an ulp)
    import jax  # noqa: PLC0415

    from diffjax import data as data_lib, nn  # noqa: PLC0415

    cfg = config.ExperimentConfig(data="moons", steps=5, hidden=16, depth=2, batch_size=8, seed=3).resolved()
    _, fused = build._init_network(cfg)
    _, eager = nn.split(build._network(cfg))
    leaves = jax.tree.leaves(fused)
    assert len(leaves) == len(jax.tree.leaves(eager)) > 0
    assert all(np.array_equal(a, b) for a, b in zip(leaves, jax.tree.leaves(eager), strict=True))
    batch = build.train_batch_fn(cfg)
    key = jax.random.fold_in(jax.random.key(3), 3)
    sample = jax.jit(lambda k: data_lib.toy_sample("moons", k, 8))
    for s in (0, 7):
        ref = sample(jax.random.fold_in(key, s))
        assert np.array_equal(batch(s), ref)


def test_stored_data_std_is_the_measured_one():
    # sigma_data comes from build.DATA_STD (no program at start-up); it must stay what the data give
    assert set(build.DATA_STD) == set(config.DATASETS)
    for name, value in build.DATA_STD.items():
        measured = build.measured_data_std(name)
        assert measured == pytest.approx(value, rel=1e-6) and round(measured, 4) == round(value, 4), name
    assert config.ExperimentConfig(data="moons").resolved().sigma_data == round(build.DATA_STD["moons"], 4)


def test_energy_distance_and_mmd_against_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 2)), rng.normal(1.0, 1.0, size=(30, 2))
    d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    ref = 2 * d(x, y).mean() - d(x, x).mean() - d(y, y).mean()
    assert float(metrics.energy_distance(x, y)) == pytest.approx(ref, rel=1e-4, abs=1e-5)
    h = 0.7
    k = lambda a, b: np.exp(-(d(a, b) ** 2) / (2 * h * h))
    kxx, kyy = k(x, x), k(y, y)
    ref = (
        (kxx.sum() - np.trace(kxx)) / (40 * 39)
        + (kyy.sum() - np.trace(kyy)) / (30 * 29)
        - 2 * k(x, y).mean()
    )
    assert float(metrics.mmd_rbf(x, y, np.array([h]))) == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert abs(float(metrics.energy_distance(x, x))) < 1e-4  # zero for identical samples


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(_cache.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _cache.resolve_cache_dir() == str(tmp_path / "diffjax" / "jax")
    monkeypatch.setenv(_cache.ENV_VAR, str(tmp_path / "env"))
    assert _cache.resolve_cache_dir() == str(tmp_path / "env")
    assert _cache.resolve_cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")  # flag wins
    assert _cache.resolve_cache_dir("off") is None


def test_cache_off_switches(monkeypatch, tmp_path):
    # --cache-dir off, or DIFFJAX_CACHE_DIR=off, turns the cache off before JAX is configured
    parser = cli.build_parser()
    args = parser.parse_args(["sample", "--workdir", str(tmp_path), "--cache-dir", "off"])
    assert cli._configure_cache(args, parser) is None
    monkeypatch.setenv(_cache.ENV_VAR, "off")
    args = parser.parse_args(["sample", "--workdir", str(tmp_path)])
    assert cli._configure_cache(args, parser) is None


_OWN_PROCESS = """
import gc, json, os, sys
import jax
from diffjax_app import cli
sys.argv = ["diffjax", "train", "--data", "checkerboard", "--steps", "2", "--workdir", sys.argv[1], *sys.argv[2:]]
try:
    cli.main()
except SystemExit:
    pass
d = jax.config.jax_compilation_cache_dir
print(json.dumps({
    "dir": d, "files": sorted(os.listdir(d)) if d else [],
    "min_time": jax.config.jax_persistent_cache_min_compile_time_secs,
    "min_size": jax.config.jax_persistent_cache_min_entry_size_bytes,
    "gc_on": gc.isenabled(), "frozen": gc.get_freeze_count(),
}))
"""


def test_command_caches_every_program_by_default(tmp_path):
    # `diffjax train` in a process of its own, no flag and no $DIFFJAX_CACHE_DIR: the persistent cache is on at
    # the default place and keeps even the smallest programs (JAX's defaults skip those compiled in < 1 s, so a
    # warm start would compile them again); the start-up's GC pause has ended (diffjax_app.startup)
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    env = {k: v for k, v in os.environ.items() if k != _cache.ENV_VAR}
    env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu")
    argv = [*TINY, "--batch-size", "8", "--no-figures"]
    proc = subprocess.run(
        [sys.executable, "-c", _OWN_PROCESS, str(tmp_path / "run"), *argv],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    result, state = json.loads(lines[-2]), json.loads(lines[-1])
    expected = str(tmp_path / "xdg" / "diffjax" / "jax")
    assert result["cache_dir"] == expected and state["dir"] == expected
    assert state["min_time"] == 0 and state["min_size"] == 0
    assert any(f.startswith("jit_step_fn-") for f in state["files"]), state["files"]
    assert len(state["files"]) >= 5  # the small programs too (the batch sampler, the finiteness check, ...)
    assert state["gc_on"] and state["frozen"] > 0


def test_gc_pause_is_scoped():
    import gc  # noqa: PLC0415

    from diffjax_app import startup  # noqa: PLC0415

    assert gc.isenabled() and not startup.gc_paused()
    startup.resume_gc()  # not paused here: nothing happens
    assert gc.isenabled() and gc.get_freeze_count() == 0
    startup.pause_gc()
    try:
        assert not gc.isenabled() and startup.gc_paused()
    finally:
        startup.resume_gc()
    assert gc.isenabled() and not startup.gc_paused() and gc.get_freeze_count() > 0
    gc.unfreeze()
    gc.disable()  # a collector that someone else turned off stays off
    try:
        startup.pause_gc()
        startup.resume_gc()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_run_with_other_time_features_is_refused(tmp_path):
    cfg = config.ExperimentConfig(
        data="checkerboard", steps=2, batch_size=16, hidden=16, depth=1, warmup=1, time_scale=1000.0
    )
    train_runner.run_train(cfg, tmp_path, progress=False, figures=False)
    with pytest.raises(ValueError, match="time_scale"):
        train_runner.run_train(cfg.replace(time_scale=30.0, steps=4), tmp_path, progress=False)
    with pytest.raises(ValueError, match="time_scale"):
        config.ExperimentConfig(time_scale=0.0)
    # sampling reads experiment.json: if it disagrees with the checkpoint, restoring is refused
    cfg_file = tmp_path / "experiment.json"
    stored = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**stored, "time_scale": 30.0}))
    with pytest.raises(ValueError, match="exp_time_scale"):
        workdir.restore(tmp_path)
    cfg_file.write_text(json.dumps(stored))
    assert workdir.restore(tmp_path).step == 2


def test_digits_likelihood_checks_each_solve_and_matches_bits_per_dim(tmp_path, capsys):
    """The runner dequantizes each test image with its own key and checks every solve's status; its bits/dim
    equal the library's ``bits_per_dim`` given the same dequantization noise (t = 0 noise, t = 1 data)."""
    import jax  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415
    from diffjax import data as data_lib  # noqa: PLC0415

    argv = ["train", "--data", "digits", "--steps", "2", "--batch-size", "8", "--unet-base", "4"]
    assert (
        cli.main(
            [
                *argv,
                "--warmup",
                "1",
                "--workdir",
                str(tmp_path),
                "--no-figures",
                "--no-progress",
                "--cache-dir",
                "off",
            ]
        )
        == 0
    )
    capsys.readouterr()
    cli.main(["likelihood", "--workdir", str(tmp_path), "--n", "2", *EVAL])
    r = _json_line(capsys)
    assert r["n"] == 2 and _finite(r["bits_per_dim"], r["bits_per_dim_se"])
    run = workdir.restore(tmp_path)
    images = data_lib.load_digits("test")[:2]
    keys = jax.random.split(jax.random.key(0), 2)  # the runner's keys for --seed 0
    u_field = dj.velocity_field(eqx_partial(run), run.objective.prediction, run.path)
    t0, t1 = (float(v) for v in dj.integration_interval(run.path, run.objective.prediction))
    ref = []
    for k, key in zip(images, keys):
        noise = jax.random.uniform(key, k.shape)[None]
        ref.append(
            dj.bits_per_dim(
                u_field,
                run.path,
                k,
                num_levels=17,
                dequant_noise=noise,
                solver="tsit5",
                num_steps=8,
                t0=t0,
                t1=t1,
            )
        )
    assert r["bits_per_dim"] == pytest.approx(float(np.mean(ref)), rel=1e-5)
    # negative control: other dequantization noise gives other bits/dim (a wrong key would move the mean of u
    # by about 2.3/64 per pixel, ~2e-3 bits/dim, far outside the tolerance above)
    other = dj.bits_per_dim(
        u_field,
        run.path,
        images[0],
        num_levels=17,
        dequant_noise=jnp_zeros(images[0]),
        solver="tsit5",
        num_steps=8,
        t0=t0,
        t1=t1,
    )
    assert abs(float(other) - float(ref[0])) > 1e-2


def jnp_zeros(k):
    return np.zeros((1, *np.shape(k)), np.float32)


def eqx_partial(run):
    import equinox as eqx  # noqa: PLC0415

    return eqx.Partial(run.apply, run.ema_params)
