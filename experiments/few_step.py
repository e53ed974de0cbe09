"""Few-step generation: fixed-step samplers on a flow model against one-step flow maps and the adaptive solve.

Time convention: **t = 0 is noise, t = 1 is data** (every sampler runs from t0 = 0 to t1 = 1 on LinearPath).

On each data set three models are trained for the SAME number of steps, batch size and optimizer (AdamW, lr
2e-3 with warm-up and cosine decay, EMA 0.995; a 256-wide, 3-layer MLP for the 2-D toys):

* ``flow``: a velocity model u(t, x) (``nn.MLP``) trained by conditional flow matching on ``LinearPath``;
* ``meanflow``: an average-velocity model u(s, x, t) (``nn.FlowMapMLP``) trained with ``flow_maps.MeanFlow``
  (Geng et al. 2025: logit-normal times, a fraction ``--mf-ratio`` of the pairs with t != s, adaptive weight p);
* ``shortcut``: the same network trained with ``flow_maps.Shortcut`` (Frans et al. 2024, M = 128).

The flow model is sampled with every ``diffjax.samplers`` method at NFE 1, 2, 4, 10, 50 where the method is
defined (a k-step method needs k steps; EDM Heun spends up to 2 evaluations per step, so at a budget B it takes
the most steps whose NFE is <= B, and the NFE it used is reported), each on the uniform grid and on the samplers'
default log-SNR grid, and with the adaptive PF-ODE (Tsit5, rtol = atol = 1e-5). The flow-map models take 1, 2, 4,
10, 50 uniform flow-map steps (``sample_flow_map``, NFE = steps). On 8 Gaussians the samplers also run on the
mixture's exact velocity (rows ``oracle:*``): their own discretisation error, without a model's.

Metrics, against held-out data of the same size as the samples: energy distance and RBF-MMD²
(``diffjax_app.metrics``) with their data-vs-data floors (two independent held-out sets); on the checkerboard the
fraction of samples inside its squares; on 8 Gaussians (a ``diffjax.analytic.GaussianMixture``) the NLL of the
samples under the true density, −E log p_data(samples), beside the data's own entropy; on both toys the total
variation between 16 x 16 histograms (``binned_tv``: it sees where inside a square the mass sits). Digits (8x8, ``nn.UNet``
flow model only: there is no flow-map UNet) report the energy distance of the quantized samples to the test set.

    python experiments/few_step.py --quick    # 4000 steps per model, digits skipped (5.5 min on 2 CPU cores)
    python experiments/few_step.py            # 12000 steps per model, digits included (9 min)

Writes WORKDIR/metrics.json and WORKDIR/{checkerboard,8gaussians,digits}_grid.png (rows: methods, columns: NFE)
and ends stdout with one JSON line: ``energy_distance_1step`` (one-step MeanFlow, checkerboard),
``energy_distance_adaptive`` (the flow model's adaptive solve, checkerboard), the floor, their ratio (raw and
above the floor), the same for TV, and the per-method tables.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

T0 = time.perf_counter()
NFES = (1, 2, 4, 10, 50)
#: (row name, sampler name, grid) of the flow model's fixed-step rows: every sampler on the uniform grid, and on
#: the samplers' default log-SNR grid. DDIM equals Euler exactly on LinearPath with a velocity model
#: (x_t = x_s + (t − s)·u), so it is run once, on the uniform grid, as a check.
SAMPLER_ROWS = (
    ("euler", "euler", "uniform"),
    ("ddim", "ddim", "uniform"),
    ("dpmpp_2m", "dpmpp_2m", "uniform"),
    ("dpmpp_3m", "dpmpp_3m", "uniform"),
    ("unipc", "unipc", "uniform"),
    ("edm_heun", "edm_heun", "uniform"),
    ("euler@log_snr", "euler", "log_snr"),
    ("dpmpp_2m@log_snr", "dpmpp_2m", "log_snr"),
    ("dpmpp_3m@log_snr", "dpmpp_3m", "log_snr"),
    ("unipc@log_snr", "unipc", "log_snr"),
    ("edm_heun@log_snr", "edm_heun", "log_snr"),
)
#: the rows sampled with the exact velocity of the 8-Gaussians mixture (the samplers' own error), and on digits.
UNIFORM_ROWS = tuple(r for r in SAMPLER_ROWS if r[2] == "uniform" and r[0] != "ddim")
FLOW_MAP_ROWS = ("meanflow", "shortcut")
#: the half-width of the box of the binned total variation per toy (the checkerboard lies in [−4, 4]²) and its
#: number of bins per axis (16: cells 0.5 wide, four per side of a checkerboard square).
TV_BOX = {"checkerboard": 4.0, "8gaussians": 3.0}
TV_BINS = 16
#: the rows of the PNG grids (the log-SNR rows are in the tables only).
FIGURE_ROWS = tuple(r[0] for r in SAMPLER_ROWS if r[2] == "uniform") + FLOW_MAP_ROWS


def log(*a):
    print("[few_step]", *a, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=None, help="toy training steps (12000; quick 4000)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--n", type=int, default=None, help="toy samples per setting (4000; quick 2000)")
    p.add_argument("--digits-steps", type=int, default=3000, help="UNet steps (full mode only)")
    p.add_argument("--digits-n", type=int, default=300, help="digit samples per setting")
    p.add_argument(
        "--mf-ratio", type=float, default=0.25, help="MeanFlow: fraction of pairs t != s"
    )
    p.add_argument("--mf-power", type=float, default=1.0, help="MeanFlow: adaptive-weight power p")
    p.add_argument(
        "--data", default="checkerboard,8gaussians", help="toy data sets, comma-separated"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default runs/few_step[_quick]")
    p.add_argument("--cache-dir", default=None)
    p.add_argument(
        "--quick", action="store_true", help="shorter training, fewer samples, no digits"
    )
    return p


# ---------------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------------


def _fit(
    apply, params, objective, batch_fn, steps, batch_size, seed, loss_fn=None, per_dispatch=50
):
    """``train.fit`` with the shared optimizer; returns (EMA parameters, final loss, seconds).

    ``per_dispatch`` steps run in one jitted scan: 50 for the MLPs (dispatch-bound on CPU); the UNet uses 1, since
    on XLA:CPU a scan of 10 UNet steps measured 3.6x slower per step than single steps (200 steps: 161 s vs 44 s).
    """
    import diffjax as dj  # noqa: PLC0415

    config = dj.train.TrainConfig(
        total_steps=steps,
        batch_size=batch_size,
        learning_rate=2e-3,
        warmup_steps=min(100, steps // 10),
        ema_decay=0.995,
        seed=seed,
    )
    tic = time.perf_counter()
    state, hist = dj.train.fit(
        apply,
        params,
        objective,
        batch_fn,
        config,
        loss_fn=loss_fn,
        progress=False,
        steps_per_dispatch=per_dispatch,
        log_every=max(50, steps // 10),
    )
    return state.ema_params, float(hist["loss"][-1]), time.perf_counter() - tic


def train_toy_models(batch_fn, args) -> dict:
    """The three models of one toy data set: {name: (model, final loss, train seconds)} (t = 0 noise)."""
    import equinox as eqx  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    path = dj.LinearPath()
    specs = {
        "flow": (dj.nn.MLP, dj.flow_matching(path), None),
        "meanflow": (
            dj.nn.FlowMapMLP,
            dj.MeanFlow(path, ratio=args.mf_ratio, power=args.mf_power),
            dj.flow_maps.batch_loss,
        ),
        "shortcut": (dj.nn.FlowMapMLP, dj.Shortcut(path, num_steps=128), dj.flow_maps.batch_loss),
    }
    out = {}
    for name, (net, objective, loss_fn) in specs.items():
        apply, params = dj.nn.split(nnx.jit(lambda net=net: net(2, rngs=nnx.Rngs(args.seed)))())
        ema, loss, secs = _fit(
            apply, params, objective, batch_fn, args.steps, args.batch_size, args.seed, loss_fn
        )
        out[name] = (eqx.Partial(apply, ema), loss, secs)
        log(f"  {name}: {args.steps} steps in {secs:.1f}s, final loss {loss:.4f}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _programs():
    """The three jitted batch samplers (parameters are arguments: one compile per method, NFE and shape)."""
    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415
    import diffjax.samplers as samplers  # noqa: PLC0415

    path = dj.LinearPath()

    @eqx.filter_jit
    def fixed(model, keys, sampler, num_steps, grid, shape):
        def one(k):
            r = samplers.sample(
                sampler, model, "velocity", path, k, num_steps=num_steps, grid=grid, shape=shape
            )
            return r.samples, r.nfe

        return jax.vmap(one)(keys)

    @eqx.filter_jit
    def adaptive(model, keys, shape):
        def one(k):
            r = dj.sample_ode(dj.velocity_field(model, "velocity", path), path, k, shape=shape)
            return r.samples, r.nfe

        return jax.vmap(one)(keys)

    @eqx.filter_jit
    def flow_map(model, keys, num_steps, shape):
        def one(k):
            r = dj.sample_flow_map(model, path, k, num_steps=num_steps, shape=shape)
            return r.samples, r.nfe

        return jax.vmap(one)(keys)

    return fixed, adaptive, flow_map


def sampler_steps(sampler: str, grid: str, budget: int) -> int | None:
    """The number of steps of ``sampler`` for an NFE budget (None where it is not defined at that budget).

    One evaluation per step except EDM Heun, whose NFE is N + (its corrected steps): counted here on the grid
    (a step from α = 0, the noise end t = 0, or to σ = 0, the data end t = 1, stays Euler), and the most steps
    whose NFE fits the budget are taken.
    """
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415
    import diffjax.samplers as samplers  # noqa: PLC0415

    if budget < samplers.as_sampler(sampler).min_steps:
        return None
    if sampler != "edm_heun":
        return budget
    path = dj.LinearPath()
    best = None
    for n in range(1, budget + 1):
        ts = dj.grids.time_grid(path, n, grid, t0=0.0, t1=1.0)
        a, s, _, _ = jax.vmap(path.coefficients)(ts)
        nfe = n + int(np.sum((np.asarray(a)[:-1] > 0) & (np.asarray(s)[1:] > 0)))
        if nfe <= budget:
            best = n
    return best


def draw_all(models: dict, key, n: int, shape, rows=SAMPLER_ROWS, prefix: str = "") -> dict:
    """{prefix + row: {nfe label: (samples as numpy, mean NFE)}} for the sampler ``rows`` of ``models["flow"]``,
    the flow-map models present in ``models`` and the adaptive solve ("adaptive")."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    fixed, adaptive, flow_map = _programs()
    keys = jax.random.split(key, n)
    flow = models["flow"][0]
    draws: dict[str, dict] = {}
    for row, sampler, grid in rows:
        draws[prefix + row] = {}
        for b in NFES:
            steps = sampler_steps(sampler, grid, b)
            if steps is not None:
                xs, nfe = fixed(flow, keys, sampler, steps, grid, shape)
                draws[prefix + row][b] = (np.asarray(xs), float(np.mean(nfe)))
    for row in FLOW_MAP_ROWS:
        if row in models:
            draws[row] = {}
            for b in NFES:
                xs, nfe = flow_map(models[row][0], keys, b, shape)
                draws[row][b] = (np.asarray(xs), float(np.mean(nfe)))
    xs, nfe = adaptive(flow, keys, shape)
    draws[prefix + "adaptive"] = {"adaptive": (np.asarray(xs), float(np.mean(nfe)))}
    return draws


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------


def eight_gaussians():
    """The 8-Gaussians data set (``diffjax.data.sample_8gaussians``) written as a GaussianMixture: its density."""
    import diffjax as dj  # noqa: PLC0415

    return dj.data.eight_gaussians_mixture()


def binned_tv(xs, ys, lim: float, bins: int = TV_BINS) -> float:
    """Total variation ½·Σ|p̂ − q̂| between the histograms of two 2-D point sets on a bins × bins grid of
    [−lim, lim]² (points outside count in no bin, so mass outside the box adds to the distance)."""
    import numpy as np  # noqa: PLC0415

    edges = np.linspace(-lim, lim, bins + 1)

    def hist(z):
        h, _, _ = np.histogram2d(z[:, 0], z[:, 1], bins=(edges, edges))
        return h / len(z)

    p, q = hist(np.asarray(xs)), hist(np.asarray(ys))
    return float(0.5 * (np.sum(np.abs(p - q)) + abs(p.sum() - q.sum())))


def make_scorer(data: str, test):
    """score(xs) -> dict: energy distance, MMD² to ``test`` and, where known, the data set's own metric.

    2-D toys also get the binned total variation to ``test`` (:func:`binned_tv`, a grid of cells 0.5 wide on
    the checkerboard): unlike the energy distance and the MMD at the median bandwidth it sees where inside a
    square the mass sits.
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from diffjax_app import metrics  # noqa: PLC0415

    test_np = np.asarray(test)
    test = jnp.asarray(test)
    bandwidths = metrics.mmd_bandwidths(test)
    log_p = jax.jit(jax.vmap(eight_gaussians().log_prob)) if data == "8gaussians" else None

    def score(xs) -> dict:
        xs = np.asarray(xs, np.float32).reshape(len(xs), -1)
        finite = np.all(np.isfinite(xs), axis=1)
        out = {"nonfinite": int(np.sum(~finite))}
        xs = xs[finite]
        out["energy_distance"] = float(metrics.energy_distance(jnp.asarray(xs), test))
        out["mmd2"] = float(metrics.mmd_rbf(jnp.asarray(xs), test, bandwidths))
        if data in TV_BOX:
            out["tv"] = binned_tv(xs, test_np, TV_BOX[data])
        if data == "checkerboard":
            out["in_support"] = metrics.support_fraction(data, xs).value
        if log_p is not None:
            lp = np.asarray(log_p(jnp.asarray(xs)), np.float64)
            out["nll_true"] = float(-np.mean(lp))
            out["nll_true_se"] = float(np.std(lp, ddof=1) / math.sqrt(len(lp)))
        return out

    return score


def score_draws(draws: dict, score) -> dict:
    """{row: {nfe label: metrics + "nfe"}} for the draws of :func:`draw_all`."""
    return {
        row: {str(b): {**score(xs), "nfe": nfe} for b, (xs, nfe) in cells.items()}
        for row, cells in draws.items()
    }


# ---------------------------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------------------------


def _label(m: dict) -> str:
    tv = f"  TV {m['tv']:.2f}" if "tv" in m else ""
    return f"ED {m['energy_distance']:.3f}{tv}"


def plot_grid(draws: dict, table: dict, reference, panel, filename: str, title: str) -> str | None:
    """Rows: methods; columns: NFE; a last row with the adaptive solve and the held-out data."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError as e:
        log("figure not written:", e)
        return None
    rows = [r for r in FIGURE_ROWS if r in draws]
    fig, axes = plt.subplots(
        len(rows) + 1, len(NFES), figsize=(1.9 * len(NFES), 1.9 * (len(rows) + 1))
    )
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for i, row in enumerate(rows):
        axes[i, 0].set_ylabel(row, fontsize=9)
        for j, b in enumerate(NFES):
            if b in draws[row]:
                xs, nfe = draws[row][b]
                panel(axes[i, j], xs)
                axes[i, j].set_title(f"NFE {nfe:g}  {_label(table[row][str(b)])}", fontsize=7)
    xs, nfe = draws["adaptive"]["adaptive"]
    panel(axes[-1, 0], xs)
    axes[-1, 0].set_ylabel("reference", fontsize=9)
    axes[-1, 0].set_title(
        f"adaptive NFE {nfe:.0f}  {_label(table['adaptive']['adaptive'])}", fontsize=7
    )
    panel(axes[-1, 1], reference)
    axes[-1, 1].set_title("held-out data", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(filename, dpi=80)
    plt.close(fig)
    return filename


def points_panel(lim: float):
    def panel(ax, xs):
        ax.scatter(xs[:2000, 0], xs[:2000, 1], s=0.3, c="k", alpha=0.5, linewidths=0)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")

    return panel


def digits_panel(ax, xs):
    import numpy as np  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    k = np.asarray(dj.data.model_space_to_digits(np.asarray(xs[:16]))).reshape(4, 4, 8, 8)
    ax.imshow(k.transpose(0, 2, 1, 3).reshape(32, 32), cmap="gray_r", vmin=0, vmax=16)


# ---------------------------------------------------------------------------------------------------------------
# experiments
# ---------------------------------------------------------------------------------------------------------------

_TEST_KEY, _REF_KEY, _DATA_KEY, _SAMPLE_KEY = 2_000_003, 2_000_029, 1, 7


def toy_experiment(data: str, args, workdir: str) -> dict:
    """Train the three models on a 2-D toy, sample every method at every NFE, score against held-out data."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    log(f"{data}: training flow, meanflow, shortcut")
    data_key = jax.random.fold_in(jax.random.key(_DATA_KEY), args.seed)
    draw = jax.jit(
        lambda s: dj.data.toy_sample(data, jax.random.fold_in(data_key, s), args.batch_size)
    )
    models = train_toy_models(draw, args)
    test = np.asarray(dj.data.toy_sample(data, jax.random.key(_TEST_KEY), args.n))
    ref = np.asarray(dj.data.toy_sample(data, jax.random.key(_REF_KEY), args.n))
    score = make_scorer(data, test)
    tic = time.perf_counter()
    draws = draw_all(models, jax.random.key(_SAMPLE_KEY), args.n, (2,))
    if data == "8gaussians":  # the exact velocity: what the samplers lose with a perfect model
        oracle = {"flow": (eight_gaussians().model("velocity", dj.LinearPath()),)}
        key = jax.random.key(_SAMPLE_KEY)
        draws.update(draw_all(oracle, key, args.n, (2,), UNIFORM_ROWS, prefix="oracle:"))
    sample_s = time.perf_counter() - tic
    table = score_draws(draws, score)
    lim = 1.15 * float(np.max(np.abs(test)))
    fig = plot_grid(
        draws,
        table,
        ref,
        points_panel(lim),
        os.path.join(workdir, f"{data}_grid.png"),
        f"{data}: {args.steps} training steps per model",
    )
    log(f"{data}: sampled every setting in {sample_s:.1f}s")
    return {
        "floor": score(ref),
        "table": table,
        "train": {k: {"final_loss": v[1], "train_s": v[2]} for k, v in models.items()},
        "sample_s": sample_s,
        "figure": fig,
    }


def digits_experiment(args, workdir: str) -> dict:
    """A flow-matching UNet on 8x8 digits, every sampler at every NFE; ED in grey levels (0..16) to the test set."""
    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    train, test = dj.data.load_digits("train"), dj.data.load_digits("test")
    data_key = jax.random.key(_DATA_KEY)

    @jax.jit
    def batch_fn(step):
        k1, k2 = jax.random.split(jax.random.fold_in(data_key, step))
        idx = jax.random.randint(k1, (128,), 0, train.shape[0])
        return dj.data.digits_to_model_space(train[idx], k2)

    apply, params = dj.nn.split(dj.nn.UNet(1, 16, (1, 2), rngs=nnx.Rngs(args.seed)))
    log(f"digits: training the UNet for {args.digits_steps} steps")
    ema, loss, train_s = _fit(
        apply,
        params,
        dj.flow_matching(dj.LinearPath()),
        batch_fn,
        args.digits_steps,
        128,
        args.seed,
        per_dispatch=1,
    )
    log(f"  flow: {train_s:.1f}s, final loss {loss:.4f}")
    levels = np.asarray(test, np.float32).reshape(len(test), -1)
    ed_test = make_scorer("digits", levels)

    def score(xs):
        k = np.asarray(dj.data.model_space_to_digits(np.asarray(xs)), np.float32)
        return ed_test(k.reshape(len(k), -1))

    tic = time.perf_counter()
    model = {"flow": (eqx.Partial(apply, ema),)}
    draws = draw_all(model, jax.random.key(_SAMPLE_KEY), args.digits_n, (8, 8, 1), UNIFORM_ROWS)
    sample_s = time.perf_counter() - tic
    table = score_draws(draws, score)
    ref = np.asarray(train[: len(test)], np.float32)
    floor = ed_test(ref.reshape(len(ref), -1))
    fig = plot_grid(
        draws,
        table,
        dj.data.digits_to_model_space(train[:16]),
        digits_panel,
        os.path.join(workdir, "digits_grid.png"),
        f"digits: UNet flow model, {args.digits_steps} steps",
    )
    log(f"digits: sampled every setting in {sample_s:.1f}s")
    return {
        "floor": floor,
        "table": table,
        "train_s": train_s,
        "final_loss": loss,
        "sample_s": sample_s,
        "figure": fig,
    }


# ---------------------------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------------------------


def compact(table: dict, key: str = "energy_distance") -> dict:
    """{row: {nfe label: table[row][nfe][key]}} rounded for the JSON line."""
    return {
        row: {b: round(m[key], 5) for b, m in cells.items() if key in m}
        for row, cells in table.items()
    }


def headline(results: dict) -> dict:
    """The numbers of the issue: one-step MeanFlow vs the adaptive flow model on the checkerboard."""
    cb = results["checkerboard"]
    t, floor = cb["table"], cb["floor"]["energy_distance"]
    one, ada = t["meanflow"]["1"]["energy_distance"], t["adaptive"]["adaptive"]["energy_distance"]
    excess = (one - floor) / (ada - floor) if ada > floor else None
    return {
        "energy_distance_1step": one,
        "energy_distance_adaptive": ada,
        "energy_distance_floor": floor,
        "ratio_1step_to_adaptive": one / ada,
        "target_2x_met": bool(one <= 2.0 * ada),
        "target_2x_met_above_floor": bool(excess is not None and excess <= 2.0),
        "ratio_above_floor": excess,
        "nfe_adaptive": t["adaptive"]["adaptive"]["nfe"],
        "energy_distance_shortcut_1step": t["shortcut"]["1"]["energy_distance"],
        "tv_1step": t["meanflow"]["1"]["tv"],
        "tv_adaptive": t["adaptive"]["adaptive"]["tv"],
        "tv_shortcut_1step": t["shortcut"]["1"]["tv"],
        "tv_floor": cb["floor"]["tv"],
        "in_support_1step": t["meanflow"]["1"]["in_support"],
        "in_support_adaptive": t["adaptive"]["adaptive"]["in_support"],
        "in_support_shortcut_1step": t["shortcut"]["1"]["in_support"],
    }


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    for name, full, quick in (("steps", 12000, 4000), ("n", 4000, 2000)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    workdir = args.workdir or os.path.join("runs", "few_step" + ("_quick" if args.quick else ""))
    os.makedirs(workdir, exist_ok=True)
    from diffjax_app import cache  # noqa: PLC0415
    from diffjax_app.errors import quiet_dependency_logs  # noqa: PLC0415

    try:
        cache.enable_compilation_cache(args.cache_dir)
    except cache.CacheDirError as e:
        p.error(str(e))
    quiet_dependency_logs()
    datasets = [d for d in args.data.split(",") if d]
    if "checkerboard" not in datasets:
        p.error("--data must include checkerboard (the headline numbers are measured there)")
    results = {d: toy_experiment(d, args, workdir) for d in datasets}
    if args.quick:
        results["digits"] = "skipped in --quick"
    else:
        results["digits"] = digits_experiment(args, workdir)
    summary = {
        **headline(results),
        "config": {k: v for k, v in vars(args).items() if k not in ("cache_dir",)},
        "results": results,
        "wall_s": time.perf_counter() - T0,
    }
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    line = {**headline(results), "workdir": os.path.abspath(workdir)}
    for d, r in results.items():
        if isinstance(r, str):
            line[d] = r
            continue
        line[d] = {"floor": r["floor"], "energy_distance": compact(r["table"])}
        for key in ("tv", "in_support", "nll_true", "nfe"):
            if key in r["floor"] or key == "nfe":
                line[d][key] = compact(r["table"], key)
        line[d]["figure"] = r["figure"]
    line["wall_s"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(line), flush=True)
    return summary


if __name__ == "__main__":
    main()
