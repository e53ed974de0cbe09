"""Figures of a run: loss curve, samples beside held-out data, probability-flow trajectories, sample strips.

Time convention: **t = 0 is noise, t = 1 is data**; a trajectory runs from its noise end t0 to its data end t1.

Every figure has a builder ``*_figure(...)`` that returns a ``matplotlib.figure.Figure`` (the tests read its
Axes) and a ``plot_*(..., out, ...)`` that writes it as a PNG and returns ``out``. Figures are drawn on the Agg
canvas without pyplot (no global figure state; nothing to close) and matplotlib is imported inside the
functions, so importing this module costs nothing.

``config`` is either a title string or any object with the attributes ``data``, ``objective``, ``path_name``
and ``is_image`` (an ``ExperimentConfig``, or a ``types.SimpleNamespace`` in a notebook); ``None`` means no
title, and whether the data are images is then read from the arrays' shape.

What makes the figures readable:

* 2-D panels have equal aspect, ticks and the axis labels x₁, x₂, and their limits come from the held-out
  data (robust percentiles plus a small margin, :func:`data_limits`), not from the samples or trajectories.
* Trajectories are thin and faint; their noise end (t0) and data end (t1) are marked and named with their t
  values in the legend. Paths whose noise end lies outside the data's range (VE/EDM paths start at σ up to
  80) are clipped by the axes, and a note says how many and how far out they start.
* Loss curves: a log axis with plain-number tick labels when every loss is positive, y-limits from robust
  percentiles of the curve after its first 5 % (an initial spike does not flatten the rest; off-scale values
  are counted in a note) and a moving average over the raw window means.
* Digit grids: a framed panel with a row and a column index per digit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "DPI",
    "data_limits",
    "figure",
    "loss_figure",
    "plot_loss",
    "plot_sample_strip",
    "plot_samples",
    "plot_trajectories",
    "sample_strip_figure",
    "samples_figure",
    "save",
    "title_of",
    "trajectories_figure",
]

#: Resolution of the written PNGs.
DPI = 130
_X1, _X2 = "x₁", "x₂"
_DATA_COLOR, _SAMPLE_COLOR = "tab:blue", "tab:orange"
_NOISE_COLOR, _END_COLOR = "tab:purple", "tab:orange"


# ----------------------------------------------------------------------------------------------------------
# Canvas, titles, limits
# ----------------------------------------------------------------------------------------------------------


def figure(nrows: int = 1, ncols: int = 1, *, figsize=None, **subplot_kw):
    """A new ``(Figure, axes)`` on an Agg canvas (constrained layout), like ``pyplot.subplots`` without pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, **subplot_kw)
    return fig, axes


def save(fig, out, *, dpi: int = DPI) -> str:
    """Write ``fig`` to ``out`` (PNG unless the suffix says otherwise) and return the path as a string."""
    out = os.fspath(out)
    fig.savefig(out, dpi=dpi)
    return out


def title_of(config) -> str:
    """The figure title of ``config``: the string itself, or "DATA · OBJECTIVE on PATH path" from its attributes."""
    if config is None:
        return ""
    if isinstance(config, str):
        return config
    data = getattr(config, "data", None)
    objective = getattr(config, "objective", None)
    path = getattr(config, "path_name", None) or getattr(config, "path", None)
    parts = [str(p) for p in (data, objective) if p is not None]
    head = " · ".join(parts)
    return f"{head} on {path} path" if path else head


def _is_image(config, x) -> bool:
    flag = getattr(config, "is_image", None) if not isinstance(config, str) else None
    if flag is not None:
        return bool(flag)
    return np.ndim(x) > 2  # (N, H, W, C) images vs (N, 2) points


def _points(x, max_n: int | None = None) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"expected 2-D points of shape (n, 2), got shape {x.shape}")
    x = x[:, :2]
    return x if max_n is None else x[:max_n]


def data_limits(x, *, q: float = 0.25, margin: float = 0.06) -> tuple[tuple[float, float], ...]:
    """Square axis limits ``((x₁ lo, x₁ hi), (x₂ lo, x₂ hi))`` around 2-D data ``x`` of shape (n, 2).

    The box spans the [q, 100 − q] percentiles of each coordinate (robust to a few outliers), widened to the
    larger of the two spans (so that equal aspect fills a square panel) plus ``margin`` of that span on each
    side. Non-finite rows are ignored.
    """
    x = _points(x)
    x = x[np.all(np.isfinite(x), axis=1)]
    if len(x) == 0:
        return (-1.0, 1.0), (-1.0, 1.0)
    lo = np.percentile(x, q, axis=0)
    hi = np.percentile(x, 100.0 - q, axis=0)
    span = float(np.max(hi - lo))
    if not span > 0:
        span = max(1.0, float(np.max(np.abs(lo))))
    half = span / 2 + margin * span
    centre = (lo + hi) / 2
    return tuple((float(c - half), float(c + half)) for c in centre)


def _inside(x: np.ndarray, limits) -> np.ndarray:
    (a, b), (c, d) = limits
    return (x[:, 0] >= a) & (x[:, 0] <= b) & (x[:, 1] >= c) & (x[:, 1] <= d)


def _square_axes(ax, limits, *, xlabel: bool = True, ylabel: bool = True) -> None:
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    ax.set_aspect("equal", adjustable="box")
    ax.tick_params(labelsize=7)
    if xlabel:
        ax.set_xlabel(_X1)
    if ylabel:
        ax.set_ylabel(_X2)


def _scatter(ax, x, color, limits, size=None):
    if size is None:  # 1.2 pt² at 2000 points, larger for fewer (up to 4)
        size = float(np.clip(2400.0 / max(len(x), 1), 1.2, 4.0))
    ax.scatter(x[:, 0], x[:, 1], s=size, alpha=0.5, c=color, linewidths=0, rasterized=True)
    return int(np.sum(~_inside(x, limits)))


def _with_outside(text: str, outside: int) -> str:
    return text + (f"; {outside} outside the axes" if outside else "")


# ----------------------------------------------------------------------------------------------------------
# Loss curve
# ----------------------------------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    """A plain-number tick label: 0.002, 1.5, 300, 12000 (no powers of ten)."""
    s = f"{v:.4g}"
    return np.format_float_positional(float(s), trim="-") if "e" in s else s


_MANTISSAS = (
    (1.0,),
    (1.0, 2.0, 5.0),
    (1.0, 1.5, 2.0, 3.0, 5.0, 7.0),
    tuple(float(m) for m in range(1, 10)),
    (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0),
)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """3–8 round tick values in [lo, hi] (0 < lo < hi) for a log axis: decades, then 1-2-5, then finer.

    A set is taken when it has at least 3 ticks spanning at least half of the axis (in log); else round
    linear steps (a narrow range such as 0.9–1.3).
    """
    e0, e1 = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    span = math.log(hi / lo)
    for mant in _MANTISSAS:
        ticks = [float(f"{m * 10.0**e:.12g}") for e in range(e0, e1 + 1) for m in mant]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) > 8:
            ticks = ticks[:: math.ceil(len(ticks) / 8)]
        if len(ticks) >= 3 and math.log(ticks[-1] / ticks[0]) >= 0.5 * span:
            return ticks
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    lin = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
    return [float(f"{t:.12g}") for t in lin if lo <= t <= hi and t > 0]


def _moving_average(y: np.ndarray, w: int) -> np.ndarray:
    c = np.cumsum(np.insert(y, 0, 0.0))
    return (c[w:] - c[:-w]) / w


def loss_figure(history: Mapping, config=None, *, smooth: bool = True, skip_frac: float = 0.05):
    """The training loss against the step (``history["step"]``, ``history["loss"]``: window means).

    Log y axis with plain tick labels when every loss is positive, else linear (the ELBO can be negative). The
    y-limits are the 1st and 99th percentiles of the curve after its first ``skip_frac`` of points, padded by
    8 % (of the log span on a log axis), so an initial spike leaves the rest readable; values off the scale are
    counted in a note. ``smooth``: a moving average over ~4 % of the points, on top of the raw curve.
    """
    step = np.asarray(history.get("step", []), dtype=float)
    loss = np.asarray(history.get("loss", []), dtype=float)
    fig, ax = figure(figsize=(5.6, 3.6))
    ax.set_xlabel("training step")
    ax.set_ylabel("loss")
    title = title_of(config)
    if title:
        ax.set_title(title, fontsize=9)
    ok = np.isfinite(loss) & np.isfinite(step)
    step, loss = step[ok], loss[ok]
    if len(loss) == 0:
        ax.text(0.5, 0.5, "no losses recorded", ha="center", va="center", transform=ax.transAxes)
        return fig
    smoothing = smooth and len(loss) >= 20
    ax.plot(
        step,
        loss,
        lw=0.8,
        alpha=0.45 if smoothing else 1.0,
        color="tab:blue",
        label="loss (mean over each logging window)",
    )
    if smoothing:
        w = max(3, len(loss) // 25)
        ma = _moving_average(loss, w)
        ax.plot(step[w - 1 :], ma, lw=1.6, color="navy", label=f"moving average of {w} windows")
        ax.legend(fontsize=7, loc="upper right")
    body = loss[int(len(loss) * skip_frac) :] if len(loss) >= 20 else loss
    lo, hi = float(np.percentile(body, 1)), float(np.percentile(body, 99))
    positive = bool(np.all(loss > 0))
    if positive:
        ax.set_yscale("log")
        if hi <= lo:
            lo, hi = lo / 1.5, hi * 1.5
        pad = (hi / lo) ** 0.08
        lo, hi = lo / pad, hi * pad
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter  # noqa: PLC0415

        ax.yaxis.set_major_locator(FixedLocator(_log_ticks(lo, hi)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        if hi <= lo:
            lo, hi = lo - 1.0, hi + 1.0
        pad = 0.08 * (hi - lo)
        lo, hi = lo - pad, hi + pad
    ax.set_ylim(lo, hi)
    ax.set_xlim(float(step[0]), float(step[-1]) if step[-1] > step[0] else float(step[0]) + 1.0)
    ax.grid(True, which="major", lw=0.4, alpha=0.5)
    above, below = int(np.sum(loss > hi)), int(np.sum(loss < lo))
    if above or below:
        notes = []
        if above:
            notes.append(f"{above} above the axis (max {_fmt(float(np.max(loss)))})")
        if below:
            notes.append(f"{below} below it (min {_fmt(float(np.min(loss)))})")
        ax.text(
            0.01, 0.01, "values off-scale: " + ", ".join(notes), transform=ax.transAxes, fontsize=7
        )
    return fig


def plot_loss(history: Mapping, out, config=None, **kwargs) -> str:
    """Write :func:`loss_figure` to ``out`` (PNG); return the path."""
    return save(loss_figure(history, config, **kwargs), out)


# ----------------------------------------------------------------------------------------------------------
# Samples beside held-out data
# ----------------------------------------------------------------------------------------------------------


def _digit_grid(x, rows: int = 8, cols: int = 8):
    """Up to rows×cols images (N, H, W, 1) in [−1, 1] tiled with a 1-pixel border; (rows·(H+2), cols·(W+2))."""
    x = np.clip(np.asarray(x, dtype=float)[: rows * cols, ..., 0], -1, 1)
    h, w = x.shape[1:3]
    if len(x) < rows * cols:
        x = np.concatenate([x, np.full((rows * cols - len(x), h, w), -1.0)])
    x = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    return (
        x.reshape(rows, cols, h + 2, w + 2)
        .transpose(0, 2, 1, 3)
        .reshape(rows * (h + 2), cols * (w + 2))
    )


def _digit_panel(ax, x, name: str, rows: int = 8, cols: int = 8) -> None:
    """A framed grid of digits; the axes index the digits (row r, column c: image r·cols + c)."""
    n = min(len(x), rows * cols)
    ax.imshow(
        _digit_grid(x, rows, cols),
        cmap="gray_r",
        vmin=-1,
        vmax=1,
        extent=(-0.5, cols - 0.5, rows - 0.5, -0.5),
        interpolation="nearest",
    )
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    ax.tick_params(labelsize=7, length=2)
    ax.set_xlabel("column")
    ax.set_ylabel("row")
    ax.set_title(f"{name} (first {n})", fontsize=9)


def samples_figure(samples, data, config=None, *, limits=None, max_points: int = 2000):
    """Samples beside held-out data: 2-D scatter panels on the data's limits, or two 8×8 grids of digits.

    2-D: both panels share :func:`data_limits` of ``data`` (or ``limits``), equal aspect, axes x₁, x₂; each
    title gives the number of points and how many fall outside the axes.
    """
    title = title_of(config)
    if _is_image(config, data):
        fig, axes = figure(1, 2, figsize=(8.4, 4.6))
        for ax, x, name in ((axes[0], data, "held-out data"), (axes[1], samples, "samples")):
            _digit_panel(ax, np.asarray(x), name)
    else:
        d, s = _points(data, max_points), _points(samples, max_points)
        limits = limits or data_limits(d)
        fig, axes = figure(1, 2, figsize=(8.4, 5.3), sharex=True, sharey=True)
        for i, (ax, x, name, c) in enumerate(
            (
                (axes[0], d, "held-out data", _DATA_COLOR),
                (axes[1], s, "samples (probability-flow ODE)", _SAMPLE_COLOR),
            )
        ):
            outside = _scatter(ax, x, c, limits)
            _square_axes(ax, limits, ylabel=i == 0)
            ax.set_title(_with_outside(f"{name}\nn = {len(x)}", outside), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_samples(samples, data, out, config=None, **kwargs) -> str:
    """Write :func:`samples_figure` to ``out`` (PNG); return the path."""
    return save(samples_figure(samples, data, config, **kwargs), out)


# ----------------------------------------------------------------------------------------------------------
# Probability-flow trajectories
# ----------------------------------------------------------------------------------------------------------


def _image_trajectories(traj, ts, title: str, snapshots: int = 6, rows: int = 6):
    idx = np.unique(np.linspace(0, len(ts) - 1, snapshots).round().astype(int))
    rows = min(rows, len(traj))
    fig, axes = figure(rows, len(idx), figsize=(1.35 * len(idx), 1.35 * rows + 0.6), squeeze=False)
    for r in range(rows):
        for c, j in enumerate(idx):
            ax = axes[r, c]
            ax.imshow(
                np.clip(traj[r, j, ..., 0], -1, 1),
                cmap="gray_r",
                vmin=-1,
                vmax=1,
                interpolation="nearest",
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                end = " (noise)" if c == 0 else " (data)" if c == len(idx) - 1 else ""
                ax.set_title(f"t = {ts[j]:.3g}{end}", fontsize=7)
            if c == 0:
                ax.set_ylabel(f"sample {r}", fontsize=7)
    fig.suptitle(
        (title + "\n" if title else "") + "probability-flow ODE, t = 0 noise → t = 1 data",
        fontsize=9,
    )
    return fig


def trajectories_figure(
    traj,
    ts,
    config=None,
    *,
    data=None,
    data_range=None,
    max_paths: int = 300,
):
    """Probability-flow ODE paths from the noise end t0 = ``ts[0]`` to the data end t1 = ``ts[-1]``.

    ``traj``: (n, len(ts), 2) for 2-D data, or (n, len(ts), H, W, 1) for digits (then a grid of snapshots
    along t). 2-D: the axes cover the DATA's range — :func:`data_limits` of ``data`` (held-out data), or
    ``data_range`` = ((lo, hi), (lo, hi)), or else of the paths' data ends — so the paths' starts at the noise
    end (σ_{t0} up to 80 on VE/EDM paths) are clipped, and a note counts them.
    """
    traj = np.asarray(traj, dtype=float)[:max_paths]
    ts = np.asarray(ts, dtype=float)
    if traj.ndim < 3 or traj.shape[1] != len(ts):
        raise ValueError(f"traj must be (n, len(ts)={len(ts)}, ...), got shape {traj.shape}")
    title = title_of(config)
    if _is_image(config, traj[:, -1]):
        return _image_trajectories(traj, ts, title)
    if data_range is not None:
        limits = tuple((float(a), float(b)) for a, b in data_range)
    else:
        limits = data_limits(data if data is not None else traj[:, -1])
    from matplotlib.collections import LineCollection  # noqa: PLC0415

    fig, ax = figure(figsize=(5.4, 5.6))
    paths = traj[..., :2]
    ax.add_collection(
        LineCollection(paths, linewidths=0.35, colors="0.3", alpha=0.18, label="ODE paths")
    )
    start, end = paths[:, 0], paths[:, -1]
    ax.scatter(
        start[:, 0],
        start[:, 1],
        s=5,
        marker="x",
        linewidths=0.6,
        c=_NOISE_COLOR,
        alpha=0.8,
        label=f"noise end, t0 = {ts[0]:.3g}",
        zorder=3,
    )
    ax.scatter(
        end[:, 0],
        end[:, 1],
        s=5,
        linewidths=0,
        c=_END_COLOR,
        alpha=0.9,
        label=f"data end, t1 = {ts[-1]:.3g}",
        zorder=4,
    )
    _square_axes(ax, limits)
    out_start = int(np.sum(~_inside(start, limits)))
    if out_start:
        far = float(np.max(np.abs(start)))
        ax.text(
            0.01,
            0.01,
            f"{out_start} of {len(start)} paths start outside the axes\n"
            f"(noise end up to |x| = {far:.3g}): clipped to the data's range",
            transform=ax.transAxes,
            fontsize=7,
            va="bottom",
            bbox=dict(facecolor="white", alpha=0.85, lw=0, pad=2),
        )
    ax.legend(loc="upper right", fontsize=7, markerscale=2.5, framealpha=0.9)
    head = (title + "\n") if title else ""
    ax.set_title(
        head + f"probability-flow ODE, {len(paths)} paths (t = 0 noise → t = 1 data)", fontsize=9
    )
    return fig


def plot_trajectories(traj, ts, out, config=None, **kwargs) -> str:
    """Write :func:`trajectories_figure` to ``out`` (PNG); return the path. Pass ``data=`` (held-out data)."""
    return save(trajectories_figure(traj, ts, config, **kwargs), out)


# ----------------------------------------------------------------------------------------------------------
# A strip of 2-D sample panels, one per model
# ----------------------------------------------------------------------------------------------------------


def sample_strip_figure(
    panels: Sequence,
    *,
    data=None,
    data_caption: str = "",
    title: str = "",
    limits=None,
    max_points: int = 2000,
    ncols: int | None = None,
):
    """One scatter panel per model on shared, labelled axes (the data's limits); held-out data first.

    ``panels``: ``(name, samples)`` or ``(name, samples, caption)`` triples, or a mapping name → samples; the
    caption (e.g. "support 93 %, p = 0.41") goes under the name in the panel's title. Limits:
    :func:`data_limits` of ``data``, else ``limits``, else of the first panel.
    """
    items = list(panels.items()) if isinstance(panels, Mapping) else list(panels)
    rows = [(p[0], _points(p[1], max_points), p[2] if len(p) > 2 else "") for p in items]
    if data is not None:
        rows.insert(0, ("held-out data", _points(data, max_points), data_caption))
    if not rows:
        raise ValueError("sample_strip_figure: no panels to draw")
    if limits is None:
        limits = data_limits(rows[0][1])
    n = len(rows)
    ncols = ncols or (n if n <= 7 else math.ceil(n / math.ceil(n / 6)))
    nrows = math.ceil(n / ncols)
    fig, axes = figure(
        nrows,
        ncols,
        figsize=(2.35 * ncols + 0.4, 3.3 * nrows + (0.4 if title else 0.1)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.set_visible(False)
            continue
        name, x, caption = rows[i]
        color = _DATA_COLOR if (data is not None and i == 0) else _SAMPLE_COLOR
        outside = _scatter(ax, x, color, limits)
        r, c = divmod(i, ncols)
        bottom = r == nrows - 1 or i + ncols >= n
        _square_axes(ax, limits, xlabel=bottom, ylabel=c == 0)
        if bottom:
            ax.xaxis.set_tick_params(labelbottom=True)
        ax.set_title(
            name
            + ("\n" + caption if caption else "")
            + (f"\n{outside} outside" if outside else ""),
            fontsize=8,
        )
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def plot_sample_strip(panels: Sequence, out, **kwargs) -> str:
    """Write :func:`sample_strip_figure` to ``out`` (PNG); return the path."""
    return save(sample_strip_figure(panels, **kwargs), out)
