"""The noise schedule as importance sampling: fixed VP, learned schedule and variance-minimizing proposal.

Time convention: **t = 0 is noise, t = 1 is data** (VDM's s = 1 − t, γ = −λ).

Kingma & Gao 2023: under the ELBO weighting w(λ) = 1 the diffusion loss is ½∫ E‖ε̂ − ε‖² dλ whatever the
schedule or the time proposal; they change only the variance of its Monte Carlo estimate. On each data set three
ε-models are trained for the SAME steps, batch size and optimizer (AdamW, warm-up + cosine, EMA 0.995, gradient
clipping 1), all under the ELBO weighting between the same λ ends as score_sde's VP path:

* ``fixed``: VDM's loss on ``VPPath()`` with t ~ U(0, 1) (``losses.vdm``);
* ``learned``: VDM's learned schedule (``diffjax.schedules``): the model gets ∇ of the loss, the schedule's
  parameters ∇ of the mean squared per-example loss (its variance: the expectation does not depend on them);
* ``adaptive``: the variance-minimizing proposal (``diffjax.importance.variance_minimizing_objective``, a
  32-bin histogram in λ updated online from each step's own draws by ``importance.make_adaptive_step``).

Reported per run: the variance of the per-batch loss estimate on fixed parameters (the run's final EMA parameters,
``--var-batches`` batches), the ELBO (VDM's discrete decoder on digits, in bits/dim; the continuous Gaussian
decoder on the 2-D toy, in nats) and the probability-flow ODE's NLL (bits/dim with uniform dequantization on
digits; nats on the toy, beside the data's true entropy). The headline ``variance_ratio`` compares, on the SAME
parameters (the fixed run's), the estimator variance of the fixed schedule's t ~ U(0, 1) with that of a
variance-minimizing proposal adapted on those parameters alone (``--adapt-batches`` batches, no training).
``transfer_max_abs_error`` is the largest error, in float64, of a model transferred between Gaussian paths and
prediction kinds (``diffjax.transfer``) against the mixture oracle's exact prediction on the new path.

    python experiments/schedules.py --quick    # toy + digits, short training (~9 min of CPU time)
    python experiments/schedules.py            # longer training, more test images

Writes WORKDIR/metrics.json and WORKDIR/schedules.png (learned λ(t), the proposals p(λ), the implied weightings)
and ends stdout with one JSON line with ``variance_ratio``, ``transfer_max_abs_error`` and the per-run tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

T0 = time.perf_counter()
RUNS = ("fixed", "learned", "adaptive")
#: digits: the λ at which VDM's discrete decoder also reads the model (beside the path's own end, λ ≈ 13.8 for
#: VP): 17 levels are 15x wider than 8-bit bins, and VDM's 8-bit λ_max = 13.3 minus 2·log 15 is about 8.
DECODER_LAMBDA = 8.0


def log(*a):
    print("[schedules]", *a, file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--toy-steps", type=int, default=None, help="2-D toy steps (6000; quick 2000)")
    p.add_argument("--digits-steps", type=int, default=None, help="UNet steps (4000; quick 600)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--var-batches", type=int, default=None, help="batches per variance (400; quick 150)"
    )
    p.add_argument("--adapt-batches", type=int, default=50, help="batches to adapt a proposal on")
    p.add_argument("--n-test", type=int, default=None, help="digits test images (100; quick 12)")
    p.add_argument(
        "--elbo-samples", type=int, default=None, help="Monte Carlo times per ELBO (64; quick 32)"
    )
    p.add_argument("--no-digits", action="store_true", help="the 2-D toy only")
    p.add_argument("--runs", default=",".join(RUNS), help="runs to train, comma-separated")
    p.add_argument("--no-transfer", action="store_true", help="skip the float64 transfer check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="default runs/schedules[_quick]")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quick", action="store_true", help="shorter training, fewer test images")
    return p


# ---------------------------------------------------------------------------------------------------------------
# training: one loop for the three runs (same optimizer, steps and batches)
# ---------------------------------------------------------------------------------------------------------------


def _config(steps, batch_size, seed):
    import diffjax as dj  # noqa: PLC0415

    return dj.train.TrainConfig(
        total_steps=steps,
        batch_size=batch_size,
        learning_rate=2e-3,
        warmup_steps=min(100, steps // 10),
        ema_decay=0.995,
        seed=seed,
    )


def train_fixed(apply, params, batch_fn, config):
    """VDM's loss on VPPath with t ~ U(0, 1): (EMA params, objective, path, seconds)."""
    import jax  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    path = dj.VPPath()
    objective = dj.losses.vdm(path)
    optimizer = dj.train.make_optimizer(config)
    step = dj.train.make_train_step(apply, objective, optimizer, config.ema_decay)
    state = dj.train.init_state(params, optimizer, jax.random.key(config.seed))
    tic = time.perf_counter()
    for s in range(config.total_steps):
        state, metrics = step(state, batch_fn(s))
    jax.block_until_ready(metrics)
    return state.ema_params, objective, path, time.perf_counter() - tic


def train_adaptive(apply, params, batch_fn, config):
    """The ELBO weighting with the online variance-minimizing proposal: (EMA params, objective, path, seconds)."""
    import jax  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415
    from diffjax import importance  # noqa: PLC0415

    path = dj.VPPath()
    objective = importance.variance_minimizing_objective(path, "eps", num_bins=32, decay=0.99)
    optimizer = dj.train.make_optimizer(config)
    step = importance.make_adaptive_step(apply, optimizer, config.ema_decay)
    state = dj.train.init_state(params, optimizer, jax.random.key(config.seed))
    tic = time.perf_counter()
    for s in range(config.total_steps):
        state, objective, metrics = step(state, objective, batch_fn(s))
    jax.block_until_ready(metrics)
    return state.ema_params, objective, path, time.perf_counter() - tic


def train_learned(apply, params, batch_fn, config):
    """VDM's learned schedule trained for low variance: (EMA params, objective, learned path, seconds).

    VDM's monotone network (64 hidden units) starts at the linear λ between VP's ends, which stay fixed (the
    ends set the bound; here all three runs share them), so only the schedule's shape is learned, on the
    variance of the per-example losses (``schedule_objective="variance"``), while the model is trained on their
    mean, in one step (``schedules.make_vdm_step``). The model sees t of the learned path, as in the fixed run.
    """
    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import optax  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415
    from diffjax import schedules  # noqa: PLC0415

    vp = dj.VPPath()
    lam_min, lam_max = (float(vp.log_snr(t)) for t in (vp.t_min, vp.t_max))
    schedule = schedules.MonotoneNet(jax.random.key(config.seed + 1), lam_min, lam_max, hidden=64)
    labels = jax.tree.map(lambda _: "shape", schedule)
    labels = eqx.tree_at(lambda s: (s.lam_min, s.raw_gap), labels, ("ends", "ends"))
    schedule_optimizer = optax.multi_transform(
        {"shape": optax.adam(config.learning_rate), "ends": optax.set_to_zero()}, labels
    )
    optimizer = dj.train.make_optimizer(config)
    step = schedules.make_vdm_step(
        apply, optimizer, schedule_optimizer, config.ema_decay, schedule_objective="variance"
    )
    key = jax.random.key(config.seed)
    state = schedules.init_vdm_state(params, schedule, optimizer, schedule_optimizer, key)
    tic = time.perf_counter()
    for s in range(config.total_steps):
        state, metrics = step(state, batch_fn(s))
    jax.block_until_ready(metrics)
    path = state.schedule.path
    return state.ema_params, dj.losses.vdm(path), path, time.perf_counter() - tic


TRAINERS = {"fixed": train_fixed, "learned": train_learned, "adaptive": train_adaptive}


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


def batch_estimates(objective, model, batch_fn, n_batches: int, offset: int):
    """The per-batch loss estimates (means of per-example losses) on ``n_batches`` batches, fixed parameters."""
    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from diffjax import importance  # noqa: PLC0415

    @eqx.filter_jit
    def one(objective, model, xs, key):
        return jnp.mean(importance.integrand_samples(objective, model, xs, key)[0])

    out = [
        one(objective, model, batch_fn(offset + i), jax.random.key(offset + i))
        for i in range(n_batches)
    ]
    return np.asarray(jax.device_get(out), np.float64)


def adapt_proposal(model, path, batch_fn, n_batches: int, offset: int):
    """A variance-minimizing proposal adapted on fixed parameters (no training): the adapted objective."""
    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415

    from diffjax import importance  # noqa: PLC0415

    objective = importance.variance_minimizing_objective(path, "eps", num_bins=32, decay=0.95)

    @eqx.filter_jit
    def update(objective, model, xs, key):
        _, lams, values = importance.integrand_samples(objective, model, xs, key)
        return importance.update_proposal(objective, lams, values)

    for i in range(n_batches):
        objective = update(objective, model, batch_fn(offset + i), jax.random.key(offset + i))
    return objective


def variance_summary(estimates) -> dict:
    import numpy as np  # noqa: PLC0415

    e = np.asarray(estimates)
    return {
        "mean": float(e.mean()),
        "se": float(e.std(ddof=1) / math.sqrt(len(e))),
        "variance": float(e.var(ddof=1)),
        "batches": len(e),
    }


def elbo_values(model, path, xs, key, num_samples: int, discrete: bool, lam_max=None):
    """Per-example ELBO (nats) of the ε-model, VDM's discrete decoder (17 levels on [−1, 1]) or the Gaussian one,
    over the path's own λ range or, with ``lam_max``, with the decoder at λ = lam_max."""
    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    kwargs = dict(num_samples=num_samples)
    if discrete:
        kwargs.update(decoder="discrete", num_levels=17, data_range=(-1.0, 1.0))
    if lam_max is not None:
        lo, _ = path.log_snr_range()
        kwargs.update(log_snr_range=(float(lo), float(lam_max)))

    @eqx.filter_jit
    def run(model, path, xs, keys):
        return jax.vmap(lambda x, k: dj.elbo(model, "eps", path, x, k, **kwargs).elbo)(xs, keys)

    keys = jax.random.split(key, xs.shape[0])
    return np.asarray(run(model, path, xs, keys), np.float64)


def ode_log_likelihood(model, path, xs):
    """Per-example log p(x) of the PF-ODE of the ε-model (exact trace, default tolerances)."""
    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    @eqx.filter_jit
    def run(model, path, xs):
        field = dj.fields.velocity_field(model, "eps", path)
        return jax.vmap(lambda x: dj.likelihood.log_likelihood(field, path, x))(xs)

    return np.asarray(run(model, path, xs), np.float64)


def proposal_curves(objectives: dict, lams):
    """p(λ) of each run's objective and its implied weighting w(λ) on the grid ``lams`` (numpy arrays)."""
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    out = {}
    for name, objective in objectives.items():
        implied = dj.implied_weighting(objective)
        out[name] = {
            "density": np.asarray(jax.vmap(implied.density)(lams)),
            "weight": np.asarray(jax.vmap(implied.weight)(lams)),
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# data sets
# ---------------------------------------------------------------------------------------------------------------


def _eight_gaussians():
    import diffjax as dj  # noqa: PLC0415

    return dj.data.eight_gaussians_mixture()


def run_dataset(name: str, args) -> dict:
    """Train the three runs on ``name`` ("toy" or "digits") and measure them."""
    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415

    data_key = jax.random.key(1000 + args.seed)
    if name == "toy":
        mixture = _eight_gaussians()

        @jax.jit
        def batch_fn(step):
            return mixture.sample(jax.random.fold_in(data_key, step), args.batch_size)

        def make():
            return dj.nn.split(dj.nn.MLP(2, hidden=128, depth=3, rngs=nnx.Rngs(args.seed)))

        steps = args.toy_steps
        test = np.asarray(mixture.sample(jax.random.key(77), args.n_test_toy))
    else:
        train_k = dj.data.load_digits("train")
        test_k = dj.data.load_digits("test")[: args.n_test]

        @jax.jit
        def batch_fn(step):
            k1, k2 = jax.random.split(jax.random.fold_in(data_key, step))
            idx = jax.random.randint(k1, (args.batch_size,), 0, train_k.shape[0])
            return dj.data.digits_to_model_space(train_k[idx], k2)

        def make():
            return dj.nn.split(dj.nn.UNet(1, 16, (1, 2), rngs=nnx.Rngs(args.seed)))

        steps = args.digits_steps
    config = _config(steps, args.batch_size, args.seed)
    runs, objectives = {}, {}
    for run in args.run_list:
        apply, params = make()
        ema, objective, path, secs = TRAINERS[run](apply, params, batch_fn, config)
        model = eqx.Partial(apply, ema)
        objectives[run] = objective
        est = batch_estimates(objective, model, batch_fn, args.var_batches, 10**6)
        runs[run] = {"train_s": secs, "own_estimator": variance_summary(est)}
        runs[run]["_model"], runs[run]["_path"] = model, path
        log(
            f"{name}/{run}: {steps} steps in {secs:.1f}s; loss {est.mean():.3f}, var {est.var():.4g}"
        )

    # the headline: one set of parameters (the fixed run's), t ~ U(0, 1) vs a proposal adapted on them
    fixed = runs["fixed"]
    adapted = adapt_proposal(
        fixed["_model"], fixed["_path"], batch_fn, args.adapt_batches, 2 * 10**6
    )
    same = {
        "uniform_t": variance_summary(
            batch_estimates(
                objectives["fixed"], fixed["_model"], batch_fn, args.var_batches, 3 * 10**6
            )
        ),
        "variance_minimizing": variance_summary(
            batch_estimates(adapted, fixed["_model"], batch_fn, args.var_batches, 3 * 10**6)
        ),
    }
    same["variance_ratio"] = same["uniform_t"]["variance"] / same["variance_minimizing"]["variance"]
    log(f"{name}: variance ratio on the fixed run's parameters {same['variance_ratio']:.2f}")

    tic = time.perf_counter()
    for run in args.run_list:
        model, path = runs[run].pop("_model"), runs[run].pop("_path")
        key = jax.random.key(5)
        if name == "toy":
            elbo = elbo_values(model, path, test, key, args.elbo_samples, discrete=False)
            ll = ode_log_likelihood(model, path, test)
            runs[run].update(
                elbo_nll_nats=float(-elbo.mean()),
                elbo_nll_se=float(elbo.std(ddof=1) / math.sqrt(len(elbo))),
                ode_nll_nats=float(-ll.mean()),
                ode_nll_se=float(ll.std(ddof=1) / math.sqrt(len(ll))),
            )
        else:
            centres = (2.0 * (np.asarray(test_k, np.float32) + 0.5) / 17.0 - 1.0).astype(np.float32)
            elbo = elbo_values(model, path, centres, key, args.elbo_samples, discrete=True)
            bpd_elbo = -elbo / (64 * math.log(2))
            short = elbo_values(
                model, path, centres, key, args.elbo_samples, discrete=True, lam_max=DECODER_LAMBDA
            )
            bpd_short = -short / (64 * math.log(2))
            y = np.asarray(dj.data.digits_to_model_space(test_k, jax.random.key(6)))
            ll = ode_log_likelihood(model, path, y)
            bpd_ode = -(ll + 64 * math.log(2 / 17)) / (64 * math.log(2))
            runs[run].update(
                elbo_bits_per_dim=float(bpd_elbo.mean()),
                elbo_bits_per_dim_se=float(bpd_elbo.std(ddof=1) / math.sqrt(len(bpd_elbo))),
                elbo_bits_per_dim_decoder_at_8=float(bpd_short.mean()),
                ode_bits_per_dim=float(bpd_ode.mean()),
                ode_bits_per_dim_se=float(bpd_ode.std(ddof=1) / math.sqrt(len(bpd_ode))),
            )
        log(
            f"{name}/{run}: {json.dumps({k: v for k, v in runs[run].items() if k != 'own_estimator'})}"
        )
    out = {
        "steps": steps,
        "runs": runs,
        "same_parameters": same,
        "eval_s": time.perf_counter() - tic,
    }
    if name == "toy":
        true = -np.asarray(jax.vmap(mixture.log_prob)(test))
        out["true_nll_nats"] = float(true.mean())
    out["_objectives"] = dict(objectives, adapted_on_fixed=adapted)
    return out


# ---------------------------------------------------------------------------------------------------------------
# figure and schedule transfer
# ---------------------------------------------------------------------------------------------------------------


def plot(results: dict, filename: str) -> str | None:
    """λ(t) of VP and of the learned schedules; p(λ) of every run; the implied weightings w(λ)."""
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        return None
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    names = list(results)
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 3.4 * len(names)), squeeze=False)
    ts = jnp.linspace(1e-3, 1 - 1e-3, 400)
    for row, name in zip(axes, names, strict=True):
        objectives = results[name]["_objectives"]
        for run in [r for r in ("fixed", "learned") if r in objectives]:
            path = objectives[run].path
            row[0].plot(ts, jax.vmap(path.log_snr)(ts), label=f"{run}: {type(path).__name__}")
        row[0].set(xlabel="t (0 noise, 1 data)", ylabel="λ(t)", title=f"{name}: log-SNR schedules")
        lo, hi = (float(v) for v in objectives["fixed"].path.log_snr_range())
        lams = jnp.linspace(lo + 1e-3, min(hi, 14.0) - 1e-3, 400)
        curves = proposal_curves(objectives, lams)
        for run, c in curves.items():
            row[1].plot(lams, c["density"], label=run)
            row[2].plot(lams, c["weight"], label=run)
        row[1].set(xlabel="λ", ylabel="p(λ)", title="proposal of λ (importance sampling)")
        row[2].set(xlabel="λ", ylabel="w(λ)", title="implied weighting (ELBO: w = 1)")
        row[2].set_ylim(0, 2)
        for ax in row:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(filename, dpi=90)
    plt.close(fig)
    del np
    return filename


def transfer_error() -> dict:
    """Largest error of a transferred oracle model against the exact prediction on the new path (float64).

    Every ordered pair of the six paths (linear, cosine, VP, VE, EDM and a bounded LogSNRPath), at five
    log-SNRs inside the range both reach and four points each: VP ε → linear for all 25 (source kind, new
    kind) pairs, every other pair of paths for two kind pairs of a rotation that covers all 25 (each pair is
    its own compiled program, so this bounds the cost). Error: max |transferred − exact| / (1 + |exact|).
    """
    import itertools  # noqa: PLC0415

    import equinox as eqx  # noqa: PLC0415
    import jax  # noqa: PLC0415

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp  # noqa: PLC0415

    import diffjax as dj  # noqa: PLC0415
    from diffjax.transfer import transfer  # noqa: PLC0415

    tic = time.perf_counter()
    paths = {
        "linear": dj.LinearPath(),
        "cosine": dj.CosinePath(),
        "vp": dj.VPPath(),
        "ve": dj.VEPath(),
        "edm": dj.EDMPath(),
        "logsnr": dj.LogSNRPath(_bounded_log_snr),
    }
    mixture = dj.GaussianMixture(
        jnp.array([0.5, 0.3, 0.2]),
        jnp.array([[-1.0, 0.5], [1.2, -0.3], [0.2, 1.5]]),
        jnp.array([[0.3, 0.2], [0.1, 0.4], [0.25, 0.25]]),
    )
    kind_pairs = tuple(itertools.product(dj.KINDS, dj.KINDS))

    @eqx.filter_jit
    def errors(src, dst, ts, xs, pairs):
        out = []
        for k_src, k_dst in pairs:
            m = transfer(mixture.model(k_src, src), k_src, src, to_path=dst, to_kind=k_dst)
            got = jax.vmap(m)(ts, xs)
            want = jax.vmap(lambda t, x, k=k_dst: mixture.predict(k, dst, t, x))(ts, xs)
            out.append(jnp.max(jnp.abs(got - want)))
        return jnp.stack(out)

    worst, per_pair, covered = 0.0, {}, set()
    for i, (a, b) in enumerate(itertools.product(paths, paths)):
        src, dst = paths[a], paths[b]
        ranges = [
            transfer(mixture.model("eps", p), "eps", p, to_path=q).source_log_snr_range()
            for p, q in ((src, dst), (dst, src))
        ]
        lo = max(-9.5, *(float(r[0]) for r in ranges))
        hi = min(11.0, *(float(r[1]) for r in ranges))
        lams = lo + (hi - lo) * jnp.array([0.02, 0.25, 0.5, 0.75, 0.98])
        ts = jnp.repeat(jax.vmap(dst.t_from_log_snr)(lams), 4)
        x = jnp.tile(mixture.sample(jax.random.key(i), 4), (5, 1))
        z = jax.random.normal(jax.random.key(100 + i), x.shape)
        xs = jax.vmap(dst.alpha)(ts)[:, None] * x + jax.vmap(dst.sigma)(ts)[:, None] * z
        n = len(kind_pairs)
        pairs = (
            kind_pairs
            if (a, b) == ("vp", "linear")
            else (kind_pairs[(2 * i) % n], kind_pairs[(2 * i + 1) % n])
        )
        err = float(jnp.max(errors(src, dst, ts, xs, pairs)))
        per_pair[f"{a}->{b}"] = err
        covered |= set(pairs)
        worst = max(worst, err)
    log(f"transfer: max error {worst:.3g} over 36 path pairs, {len(covered)} kind pairs")
    return {
        "max_abs_error": worst,
        "path_pairs": per_pair,
        "kind_pairs_covered": len(covered),
        "seconds": time.perf_counter() - tic,
    }


def _bounded_log_snr(t):
    return (
        18.0 * t - 9.0
    )  # λ ∈ [−9, 9]: a LogSNRPath bounded at both ends (a module-level, static fn)


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    for name, full, quick in (
        ("toy_steps", 6000, 2000),
        ("digits_steps", 4000, 600),
        ("var_batches", 400, 150),
        ("n_test", 100, 12),
        ("elbo_samples", 64, 32),
    ):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.n_test_toy = 256 if args.quick else 1000
    args.run_list = [r for r in args.runs.split(",") if r]
    if "fixed" not in args.run_list or set(args.run_list) - set(RUNS):
        p.error(f"--runs must name runs among {RUNS} and include fixed, got {args.runs!r}")
    workdir = args.workdir or os.path.join("runs", "schedules" + ("_quick" if args.quick else ""))
    os.makedirs(workdir, exist_ok=True)
    from diffjax_app import cache  # noqa: PLC0415
    from diffjax_app.errors import quiet_dependency_logs  # noqa: PLC0415

    try:
        cache.enable_compilation_cache(args.cache_dir)
    except cache.CacheDirError as e:
        p.error(str(e))
    quiet_dependency_logs()
    results = {"toy": run_dataset("toy", args)}
    if not args.no_digits:
        results["digits"] = run_dataset("digits", args)
    figure = plot(results, os.path.join(workdir, "schedules.png"))
    transfer = {"max_abs_error": None} if args.no_transfer else transfer_error()  # last: float64
    for r in results.values():
        r.pop("_objectives")
    headline = {
        "variance_ratio": results["digits" if "digits" in results else "toy"]["same_parameters"][
            "variance_ratio"
        ],
        "variance_ratio_toy": results["toy"]["same_parameters"]["variance_ratio"],
        "transfer_max_abs_error": transfer["max_abs_error"],
    }
    summary = {
        **headline,
        "transfer": transfer,
        "results": results,
        "figure": figure,
        "config": {k: v for k, v in vars(args).items() if k != "cache_dir"},
        "wall_s": time.perf_counter() - T0,
    }
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
        json.dump(summary, f, indent=1)
    line = {**headline, "workdir": os.path.abspath(workdir)}
    for d, r in results.items():
        line[d] = {
            run: {
                k: (round(v, 4) if isinstance(v, float) else v)
                for k, v in m.items()
                if k != "own_estimator"
            }
            | {"variance": round(m["own_estimator"]["variance"], 4)}
            for run, m in r["runs"].items()
        }
    line["wall_s"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(line), flush=True)
    return summary


if __name__ == "__main__":
    main()
