"""The ``diffjax`` command line on class-conditional runs (t = 0 noise, t = 1 data): ``train --conditional`` on
8gaussians, ``sample --class C --guidance W`` and the conditional likelihood, and the one-line refusals (exit 2).

One module-scoped run trains a 32-unit MLP for 60 steps (a few seconds); its class-3 samples with guidance 2 land
mostly at centre 3 (a loose check: the network is tiny).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from diffjax import data as data_lib
from diffjax_app import build, cli, config

TINY = ["--hidden", "32", "--depth", "1", "--batch-size", "64", "--warmup", "2", "--no-progress"]
EVAL = ["--num-steps", "8", "--no-progress", "--cache-dir", "off"]


def _json_line(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return json.loads(out[0])


def _refused(capsys, argv) -> str:
    """Runs argv expecting exit status 2 with exactly one error line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert len(errors) == 1, captured.err
    assert captured.out == ""
    return errors[0]


@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cond")
    argv = [
        "train",
        "--data",
        "8gaussians",
        "--conditional",
        "--steps",
        "60",
        "--workdir",
        str(workdir),
    ]
    extra = ["--lr", "1e-2", "--ema-decay", "0", "--no-figures", "--cache-dir", "off"]
    with pytest.MonkeyPatch.context() as mp:
        lines = []
        mp.setattr(cli, "_emit", lambda r: lines.append(json.loads(json.dumps(cli._finite(r)))))
        assert cli.main([*argv, *TINY, *extra]) == 0
    assert len(lines) == 1
    return workdir, lines[0]


def test_8gaussians_labels_are_the_data_points():
    import jax  # noqa: PLC0415

    key = jax.random.key(7)
    x, c = data_lib.sample_8gaussians_with_labels(key, 200)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(data_lib.sample_8gaussians(key, 200)))
    centres = np.asarray(data_lib.eight_gaussians_centers())
    nearest = np.argmin(((np.asarray(x)[:, None] - centres[None]) ** 2).sum(-1), 1)
    assert (
        np.mean(nearest == np.asarray(c)) > 0.95
    )  # the label is the centre the point was drawn around
    np.testing.assert_array_equal(
        np.asarray(build.held_out("8gaussians", 50)),
        np.asarray(data_lib.sample_8gaussians_with_labels(jax.random.key(build._TEST_KEY), 50)[0]),
    )


def test_conditional_train_records_classes(cond_run):
    workdir, r = cond_run
    assert r["num_classes"] == 8 and r["cond_dropout"] == 0.1 and r["step"] == 60
    assert math.isfinite(r["final_loss"])
    stored = json.loads((workdir / "experiment.json").read_text())
    assert stored["num_classes"] == 8 and stored["cond_dropout"] == 0.1


def test_sample_class_with_guidance(cond_run, capsys):
    workdir, _ = cond_run
    capsys.readouterr()
    argv = ["sample", "--workdir", str(workdir), "--n", "64", "--class", "3", "--guidance", "2.0"]
    assert cli.main([*argv, "--no-figures", *EVAL]) == 0
    r = _json_line(capsys)
    assert r["class"] == 3 and r["guidance"] == 2.0 and r["n"] == 64
    x = np.load(workdir / "samples.npy")
    assert x.shape == (64, 2) and np.all(np.isfinite(x))
    centres = np.asarray(data_lib.eight_gaussians_centers())
    nearest = np.argmin(((x[:, None] - centres[None]) ** 2).sum(-1), 1)
    assert np.mean(nearest == 3) > 0.5, np.bincount(nearest, minlength=8)
    m = json.loads((workdir / "metrics.json").read_text())["sample"]
    assert m["class"] == 3 and m["guidance"] == 2.0 and m["quality_against"] == "held-out class 3"
    assert "cross_entropy" not in m  # the data set's density is not one class's


def test_conditional_likelihood_uses_labels(cond_run, capsys):
    workdir, _ = cond_run
    capsys.readouterr()
    assert cli.main(["likelihood", "--workdir", str(workdir), "--n", "16", *EVAL]) == 0
    r = _json_line(capsys)
    assert r["condition"] == "labels" and r["n"] == 16
    assert math.isfinite(r["nll"]) and math.isfinite(r["true_nll"])


def test_conditional_errors(cond_run, tmp_path, capsys):
    workdir, _ = cond_run
    line = _refused(capsys, ["sample", "--workdir", str(workdir), "--class", "8", *EVAL])
    assert "0..7" in line
    line = _refused(capsys, ["sample", "--workdir", str(workdir), "--guidance", "inf", *EVAL])
    assert "finite" in line
    line = _refused(
        capsys,
        [
            "train",
            "--data",
            "checkerboard",
            "--conditional",
            "--steps",
            "2",
            "--workdir",
            str(tmp_path / "cb"),
        ],
    )
    assert "8gaussians" in line and "digits" in line
    assert not (tmp_path / "cb").exists()
    # resuming with other conditioning flags is refused, naming the difference
    argv = ["train", "--data", "8gaussians", "--steps", "60", "--workdir", str(workdir), *TINY]
    line = _refused(capsys, [*argv, "--lr", "1e-2", "--ema-decay", "0", "--cache-dir", "off"])
    assert "num_classes" in line


def test_class_on_unconditional_run_is_refused(tmp_path, capsys):
    argv = ["train", "--data", "8gaussians", "--steps", "2", "--workdir", str(tmp_path), *TINY]
    assert cli.main([*argv, "--no-figures", "--cache-dir", "off"]) == 0
    capsys.readouterr()
    line = _refused(capsys, ["sample", "--workdir", str(tmp_path), "--class", "1", *EVAL])
    assert "--class" in line and "unconditional" in line
    stored = json.loads((tmp_path / "experiment.json").read_text())
    assert stored["num_classes"] is None and stored["cond_dropout"] is None


def test_config_conditioning_checks():
    with pytest.raises(ValueError, match="no classes"):
        config.ExperimentConfig(data="moons", num_classes=2)
    with pytest.raises(ValueError, match="10 classes"):
        config.ExperimentConfig(data="digits", num_classes=8, batch_size=64)
    with pytest.raises(ValueError, match="cond_dropout"):
        config.ExperimentConfig(data="8gaussians", cond_dropout=0.1)
    c = config.ExperimentConfig(data="8gaussians", num_classes=8)
    assert c.cond_dropout == 0.1 and "exp_num_classes" in c.guarded_config()
    assert "exp_num_classes" not in config.ExperimentConfig().guarded_config()
    assert config.ExperimentConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
