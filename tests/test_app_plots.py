"""Tests for diffjax_app.plots: every figure renders to a PNG and its Axes say what a reader needs.

Time convention: t = 0 is noise, t = 1 is data; a trajectory runs from its noise end t0 to its data end t1.

The inputs are small numpy arrays with a known range (a checkerboard inside [−4, 4]²); the checks read the
matplotlib Axes that the builders return: labels, limits that contain the data and exclude far-away noise ends,
a legend naming t0 and t1, log loss axes whose limits ignore an initial spike. Negative control: the limit rule
of the old ``trajectories.png`` (1.6 × the 99.5th percentile of |x| at the data end, ±6.4 here) fails the same
range check.
"""

import subprocess
import sys
import types

import numpy as np
import pytest

from diffjax_app import plots

PNG = b"\x89PNG\r\n\x1a\n"
HALF_WIDTH = 4.0  # the checkerboard lies in [−4, 4]²
TS = np.linspace(0.0, 1.0, 11)
CONFIG = types.SimpleNamespace(data="checkerboard", objective="edm", path_name="ve", is_image=False)


def _checkerboard(rng, n):
    x = rng.uniform(-HALF_WIDTH, HALF_WIDTH, (4 * n, 2))
    keep = (np.floor(x[:, 0] / 2) + np.floor(x[:, 1] / 2)) % 2 == 0
    return x[keep][:n]


@pytest.fixture(scope="module")
def toy():
    rng = np.random.default_rng(0)
    data = _checkerboard(rng, 600)
    end = _checkerboard(rng, 120)
    eps = rng.normal(size=end.shape)
    # A VE-like path x_t = x + σ_t ε with σ from 80 at the noise end t0 = 0 down to 0.01 at the data end t1 = 1.
    sigma = 80.0 ** (1.0 - TS)
    sigma[-1] = 0.01
    traj = end[:, None, :] + sigma[None, :, None] * eps[:, None, :]
    return data, traj


def _is_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    return head == PNG and path.stat().st_size > 1000


def _covers_data_only(lim, lo, hi, slack=0.25):
    """The axis shows [lo, hi] and at most ``slack`` of its width beyond it on either side."""
    width = hi - lo
    return (
        lim[0] <= lo
        and lim[1] >= hi
        and lim[0] >= lo - slack * width
        and lim[1] <= hi + slack * width
    )


def test_module_imports_without_matplotlib():
    code = "import sys, diffjax_app.plots; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trajectories_on_the_data_range_with_named_ends(toy, tmp_path):
    data, traj = toy
    fig = plots.trajectories_figure(traj, TS, CONFIG, data=data)
    (ax,) = fig.axes
    lo, hi = data.min(0), data.max(0)
    assert _covers_data_only(ax.get_xlim(), lo[0], hi[0])
    assert _covers_data_only(ax.get_ylim(), lo[1], hi[1])
    assert ax.get_xlabel() == "x₁" and ax.get_ylabel() == "x₂"
    assert ax.get_aspect() == 1.0
    # Noise ends at σ = 80 lie far outside the axes; the data ends inside them.
    start, end = traj[:, 0], traj[:, -1]
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    far = np.abs(start).max(1) > 20
    assert far.sum() > 100
    assert np.all(
        (start[far, 0] < x0) | (start[far, 0] > x1) | (start[far, 1] < y0) | (start[far, 1] > y1)
    )
    assert np.all((end[:, 0] > x0) & (end[:, 0] < x1) & (end[:, 1] > y0) & (end[:, 1] < y1))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert any("noise" in s and "t0 = 0" in s for s in legend), legend
    assert any("data" in s and "t1 = 1" in s for s in legend), legend
    notes = " ".join(t.get_text() for t in ax.texts)
    n_out = int(np.sum(np.abs(start).max(1) > x1))
    assert "clipped" in notes and f"of {len(traj)} paths start outside" in notes and n_out > 0
    assert "edm" in ax.get_title() and "ve path" in ax.get_title()
    # The lines are thin and faint.
    (paths,) = ax.collections[:1]
    assert paths.get_linewidths()[0] <= 0.5 and paths.get_alpha() <= 0.3
    out = plots.plot_trajectories(traj, TS, tmp_path / "traj.png", CONFIG, data=data)
    assert _is_png(tmp_path / "traj.png") and out == str(tmp_path / "traj.png")


def test_old_trajectory_limits_fail_the_range_check(toy):
    """Negative control: the old rule (1.6 × 99.5th percentile of |x_t1|) spans ±6.4 around data in ±4."""
    data, traj = toy
    old = float(np.percentile(np.abs(traj[:, -1]), 99.5)) * 1.6
    lo, hi = data.min(0), data.max(0)
    assert old > 6.0
    assert not _covers_data_only((-old, old), lo[0], hi[0])
    # And taking the limits from the noise end instead of the data would not exclude it either.
    wide = plots.data_limits(traj[:, 0])
    assert not _covers_data_only(wide[0], lo[0], hi[0])


def test_trajectory_limits_without_data_follow_the_data_end(toy):
    _, traj = toy
    fig = plots.trajectories_figure(traj, TS, "a title")
    (ax,) = fig.axes
    end = traj[:, -1]
    assert _covers_data_only(ax.get_xlim(), end[:, 0].min(), end[:, 0].max())
    fig = plots.trajectories_figure(traj, TS, None, data_range=((-1, 1), (-2, 2)))
    assert fig.axes[0].get_xlim() == (-1.0, 1.0) and fig.axes[0].get_ylim() == (-2.0, 2.0)


def test_loss_axes_readable_despite_an_initial_spike(tmp_path):
    rng = np.random.default_rng(1)
    step = np.arange(10, 2010, 10)
    loss = 1.0 + 0.5 * np.exp(-step / 400) + 0.03 * rng.normal(size=len(step))
    loss[:3] = [60.0, 12.0, 5.0]
    fig = plots.loss_figure({"step": list(step), "loss": list(loss)}, CONFIG)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    y0, y1 = ax.get_ylim()
    rest = loss[10:]
    assert y1 < 5.0, "the spike sets the upper limit"
    assert y0 <= np.percentile(rest, 2) and y1 >= np.percentile(rest, 98)
    ticks = [t for t in ax.get_yticks() if y0 <= t <= y1]
    labels = [lab.get_text() for lab in ax.get_yticklabels() if lab.get_text()]
    assert len(ticks) >= 3 and labels
    assert all("$" not in s and "^" not in s and "e" not in s for s in labels), labels
    assert ax.get_xlabel() == "training step" and ax.get_ylabel() == "loss"
    assert len(ax.lines) == 2  # raw window means and their moving average
    assert f"{np.sum(loss > y1)} above the axis (max 60)" in " ".join(
        t.get_text() for t in ax.texts
    )
    plots.plot_loss({"step": step, "loss": loss}, tmp_path / "loss.png", CONFIG)
    assert _is_png(tmp_path / "loss.png")


def test_loss_linear_when_not_positive_and_empty_history():
    step = np.arange(1, 51)
    loss = -3.0 + np.exp(-step / 10.0)  # an ELBO-like loss below zero
    (ax,) = plots.loss_figure({"step": step, "loss": loss}).axes
    assert ax.get_yscale() == "linear"
    y0, y1 = ax.get_ylim()
    assert y0 <= loss.min() and y1 >= np.percentile(loss[2:], 99)
    (ax,) = plots.loss_figure({"step": [], "loss": []}).axes
    assert "no losses" in ax.texts[0].get_text()


def test_plain_log_ticks():
    assert plots._log_ticks(0.05, 20.0) == [0.1, 1.0, 10.0]
    assert plots._log_ticks(0.6, 4.0) == [0.7, 1.0, 1.5, 2.0, 3.0]  # 1-2-5 gives only two
    ticks = plots._log_ticks(0.9, 1.3)
    assert len(ticks) >= 3 and all(0.9 <= t <= 1.3 for t in ticks)
    assert [plots._fmt(v) for v in (0.002, 1.5, 300.0, 12000.0, 1e-6)] == [
        "0.002",
        "1.5",
        "300",
        "12000",
        "0.000001",
    ]


def test_samples_2d_share_the_data_limits(toy, tmp_path):
    data, traj = toy
    samples = np.concatenate([traj[:, -1], [[50.0, 50.0]]])  # one far-off sample
    fig = plots.samples_figure(samples, data, CONFIG)
    axes = fig.axes
    assert len(axes) == 2
    for ax in axes:
        assert ax.get_xlim() == axes[0].get_xlim() and ax.get_ylim() == axes[0].get_ylim()
        assert ax.get_aspect() == 1.0 and ax.get_xlabel() == "x₁"
        assert len(ax.get_xticks()) > 2
    assert axes[0].get_ylabel() == "x₂"
    lo, hi = data.min(0), data.max(0)
    assert _covers_data_only(axes[0].get_xlim(), lo[0], hi[0])
    assert f"n = {len(samples)}" in axes[1].get_title() and "1 outside" in axes[1].get_title()
    assert "checkerboard" in fig.get_suptitle()
    plots.plot_samples(samples, data, tmp_path / "samples.png", CONFIG)
    assert _is_png(tmp_path / "samples.png")


def test_digit_grids_have_a_frame_and_indices(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, (70, 8, 8, 1))
    cfg = types.SimpleNamespace(data="digits", objective="fm", path_name="linear", is_image=True)
    fig = plots.samples_figure(x[:40], x, cfg)
    for ax, name in zip(fig.axes, ("held-out data (first 64)", "samples (first 40)")):
        assert ax.get_title() == name
        assert ax.get_xlabel() == "column" and ax.get_ylabel() == "row"
        assert list(ax.get_xticks()) == list(range(8)) and list(ax.get_yticks()) == list(range(8))
        assert ax.axison and all(s.get_visible() for s in ax.spines.values())
    # Without a config the shape decides: images.
    assert plots.samples_figure(x, x).axes[0].get_xlabel() == "column"
    traj = rng.uniform(-1, 1, (3, len(TS), 8, 8, 1))
    fig = plots.trajectories_figure(traj, TS, cfg)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0] == "t = 0 (noise)" and titles[-1] == "t = 1 (data)"
    assert fig.axes[0].get_ylabel() == "sample 0"
    plots.plot_samples(x, x, tmp_path / "digits.png", cfg)
    plots.plot_trajectories(traj, TS, tmp_path / "dtraj.png", cfg)
    assert _is_png(tmp_path / "digits.png") and _is_png(tmp_path / "dtraj.png")


def test_sample_strip_shared_labelled_axes_with_captions(toy, tmp_path):
    data, traj = toy
    panels = [("fm", traj[:, -1], "support 93 %"), ("eps", traj[:, -1] * 1.3, "support 61 %")]
    fig = plots.sample_strip_figure(panels, data=data, title="checkerboard")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split("\n")[0] for ax in axes] == ["held-out data", "fm", "eps"]
    assert "support 93 %" in axes[1].get_title() and "support 61 %" in axes[2].get_title()
    lo, hi = data.min(0), data.max(0)
    for ax in axes:
        assert ax.get_xlim() == axes[0].get_xlim() and ax.get_ylim() == axes[0].get_ylim()
        assert ax.get_aspect() == 1.0 and ax.get_xlabel() == "x₁"
        assert _covers_data_only(ax.get_xlim(), lo[0], hi[0])
    assert axes[0].get_ylabel() == "x₂"
    # Wrapped into rows: 9 panels on 2 × 5 axes, the lowest panel of each column labelled, one hidden.
    many = [(f"m{i}", traj[:, -1]) for i in range(8)]
    fig = plots.sample_strip_figure(many, data=data)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 9 and len(fig.axes) == 10
    assert [ax.get_xlabel() for ax in visible] == [""] * 4 + ["x₁"] * 5
    out = plots.plot_sample_strip(dict(fm=traj[:, -1]), tmp_path / "strip.png", data=data)
    assert _is_png(tmp_path / "strip.png") and out.endswith("strip.png")
    with pytest.raises(ValueError, match="no panels"):
        plots.sample_strip_figure([])


def test_titles_from_strings_and_configs():
    assert plots.title_of("my run") == "my run"
    assert plots.title_of(CONFIG) == "checkerboard · edm on ve path"
    assert plots.title_of(None) == ""
    with pytest.raises(ValueError, match="shape"):
        plots.data_limits(np.zeros((5, 1)))
