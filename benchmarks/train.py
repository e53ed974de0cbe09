"""Training throughput: diffjax's train step (one step per dispatch and K fused steps per dispatch) against a
hand-written minimal optax loop and a PyTorch eager step.

Every variant trains the demo's time-conditioned MLP (``diffjax.nn.MLP(2, hidden=256, depth=3, time_dim=64)``,
what ``diffjax demo`` / ``diffjax train`` fit on 2-D data at batch 256) with conditional flow matching on the
linear path (x_t = t·x + (1 − t)·ε, t = 0 noise, t = 1 data; target velocity u = x − ε, t ~ U(0, 1)), with the
same optimizer (clip + AdamW, warm-up + cosine) and, for the JAX variants, the same parameter EMA, jitted with the
state donated. The baseline writes the loss inline; diffjax goes through
``losses.batch_loss(flow_matching(LinearPath()))`` and ``train.make_train_step`` (K = 1) or
``train.make_multi_step`` (K steps in one ``lax.scan`` dispatch, bit-identical to K single steps; what
``fit(steps_per_dispatch=K)`` runs), swept over K = 4, 16, 64. ``diffjax_step_hand_loss`` runs diffjax's step on
the baseline's inline loss, separating the step's overhead from the objective's. PyTorch (optional ``bench``
extra: torch, flow_matching) runs the same MLP eagerly with Meta flow_matching's ``AffineProbPath
(CondOTScheduler)`` for the noisy point and target (no EMA).

All variants, PyTorch included, are timed in interleaved windows of the same number of steps (a multiple of
the largest K), so that machine load affects them alike; reported are the best and the median window. Also: XLA's
flop/byte count per step (independent of load), the cold start (trace + compile + first step) of the K = 1
programs, and ``fit`` itself end to end at K = 1 and the best K with the demo's per-step ``batch_fn`` (a jitted
``toy_sample`` per step, as ``diffjax_app.build.train_batch_fn`` builds it), timed between its log points.

Usage: ``python benchmarks/train.py [--quick] [--batch 256] [--steps 128] [--repeats 12]``. The last line of
standard output is one JSON object with ``fused_vs_single`` (best-K steps/s over K = 1), ``speedup_vs_torch``
(best-K diffjax steps/s over PyTorch eager, when torch is installed), ``best_k`` and the rest.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from diffjax import data, losses, nn, train
from diffjax.paths import LinearPath


def hand_written_step(apply, optimizer, ema_decay):
    """The minimal optax loop: flow matching on the linear path written out by hand."""

    def loss_fn(params, batch, key):
        n = batch.shape[0]
        k_t, k_e = jax.random.split(key)
        t = jax.random.uniform(k_t, (n,))
        eps = jax.random.normal(k_e, batch.shape)
        x_t = t[:, None] * batch + (1 - t[:, None]) * eps
        pred = jax.vmap(lambda tt, xx: apply(params, tt, xx))(t, x_t)
        return jnp.mean(jnp.sum(jnp.square(pred - (batch - eps)), axis=-1))

    def step(state, batch):
        params, opt_state, ema, s, key = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, jax.random.fold_in(key, s))
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        return (params, opt_state, ema, s + 1, key), loss

    return jax.jit(step, donate_argnums=0)


KS = (4, 16, 64)  # the sweep of steps per dispatch (K = 1 is the plain step)


def hand_loss(objective, fn, xs, key):
    """The baseline's inline loss behind diffjax's step (``loss_fn``): isolates the step from the objective."""
    n = xs.shape[0]
    k_t, k_e = jax.random.split(key)
    t = jax.random.uniform(k_t, (n,))
    eps = jax.random.normal(k_e, xs.shape)
    x_t = t[:, None] * xs + (1 - t[:, None]) * eps
    return jnp.mean(jnp.sum(jnp.square(jax.vmap(fn)(t, x_t) - (xs - eps)), axis=-1))


class JaxVariant:
    """A jitted step (or K-step scan) with its own state and input, run ``n`` steps at a time."""

    def __init__(self, step, state, batch, k=1):
        self.step, self.state, self.batch, self.k = step, state, batch, k

    def run(self, n):
        state, out = self.state, None
        for _ in range(n // self.k):
            state, out = self.step(state, self.batch)
        jax.block_until_ready((state, out))
        self.state = state


def build_variants(batch_size):
    """The JAX variants (name -> JaxVariant), each compiled and warmed up; their cold starts and XLA costs."""
    config = train.TrainConfig(learning_rate=1e-3, warmup_steps=100, total_steps=100_000)
    apply, params = nn.split(nn.MLP(2, hidden=256, depth=3, time_dim=64, rngs=nnx.Rngs(0)))
    optimizer, schedule = train.make_optimizer(config), train.make_schedule(config)
    objective = losses.flow_matching(LinearPath())
    batch = jnp.asarray(data.toy_sample("8gaussians", jax.random.key(1), batch_size))
    stacked = jnp.asarray(data.toy_sample("8gaussians", jax.random.key(2), max(KS) * batch_size))
    stacked = stacked.reshape(max(KS), batch_size, 2)  # distinct batches for the fused steps
    args = (apply, objective, optimizer, config.ema_decay)

    def fresh_diffjax():
        return train.init_state(jax.tree.map(jnp.copy, params), optimizer, jax.random.key(0))

    def fresh_baseline():
        p = jax.tree.map(jnp.copy, params)
        key = jax.random.key(0)  # fresh: the donated state takes its buffers
        return (p, optimizer.init(p), jax.tree.map(jnp.copy, p), jnp.zeros((), jnp.int32), key)

    makers = {
        "diffjax_step_hand_loss": lambda: (
            train.make_train_step(apply, None, optimizer, config.ema_decay, loss_fn=hand_loss),
            fresh_diffjax(),
            batch,
        ),
        "diffjax": lambda: (
            train.make_train_step(*args, schedule=schedule),
            fresh_diffjax(),
            batch,
        ),
        "optax_by_hand": lambda: (
            hand_written_step(apply, optimizer, config.ema_decay),
            fresh_baseline(),
            batch,
        ),
    }
    for k in KS:
        makers[f"diffjax_k{k}"] = lambda k=k: (
            train.make_multi_step(*args, schedule=schedule),
            fresh_diffjax(),
            stacked[:k],
        )
    variants, cold, costs = {}, {}, {}
    for name, make in makers.items():
        step, state, inputs = make()
        k = inputs.shape[0] if inputs.ndim == 3 else 1
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state, out = step(state, inputs)
        jax.block_until_ready((state, out))
        cold[name] = time.perf_counter() - t0
        variants[name] = JaxVariant(step, state, inputs, k)
        variants[name].run(max(k, 8))  # warm
        if k == 1:  # XLA's count per step (the fused programs count k times the same body)
            cost = step.lower(variants[name].state, inputs).compile().cost_analysis()
            cost = cost[0] if isinstance(cost, list) else cost
            costs[name] = {c: cost.get(c) for c in ("flops", "bytes accessed")}
    return variants, cold, costs


def time_interleaved(runners, steps, repeats):
    """Steps/s of every runner (name -> run(n)) in ``repeats`` rounds of one ``steps``-step window each,
    interleaved (round-robin) so that the load of the machine affects all alike; also the process's CPU time
    per step (all threads), which other processes' load moves less than the wall time."""
    rates = {name: [] for name in runners}
    cpu_ms = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(steps)
            rates[name].append(steps / (time.perf_counter() - t0))
            cpu_ms[name].append(1e3 * (time.process_time() - c0) / steps)
    return rates, cpu_ms


def fit_rate(batch_size, k, total, log_every):
    """Steps/s of ``train.fit`` itself at ``steps_per_dispatch=k`` on the demo's per-step data source (a jitted
    ``toy_sample`` of the checkerboard per step), timed between the first and the last log point (compiles and
    the first window excluded; each log point syncs with the device)."""
    config = train.TrainConfig(warmup_steps=100, total_steps=total, batch_size=batch_size)
    apply, params = nn.split(nn.MLP(2, hidden=256, depth=3, time_dim=64, rngs=nnx.Rngs(0)))
    sample = jax.jit(lambda key: data.toy_sample("checkerboard", key, batch_size))
    k_data = jax.random.fold_in(jax.random.key(0), 3)
    times = {}
    train.fit(
        apply,
        params,
        losses.flow_matching(LinearPath()),
        lambda s: sample(jax.random.fold_in(k_data, s)),
        config,
        log_every=log_every,
        progress=False,
        callback=lambda step, state, means: times.setdefault(step, time.perf_counter()),
        steps_per_dispatch=k,
    )
    first, last = min(times), max(times)
    return (last - first) / (times[last] - times[first])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer windows, a shorter fit")
    parser.add_argument("--batch", type=int, default=256, help="batch size (the demo's: 256)")
    parser.add_argument("--steps", type=int, default=None, help="steps per window (multiple of 64)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved windows per variant")
    args = parser.parse_args()
    steps = args.steps or (64 if args.quick else 128)
    steps = -(-steps // max(KS)) * max(KS)  # every K divides the window
    repeats = args.repeats or (7 if args.quick else 15)

    variants, cold, costs = build_variants(args.batch)
    runners = {name: v.run for name, v in variants.items()}
    torch_runs, torch_note = torch_runners(args.batch)
    runners.update(torch_runs)
    rates, cpu_ms = time_interleaved(runners, steps, repeats)
    by_k = {1: "diffjax", **{k: f"diffjax_k{k}" for k in KS}}
    median = {name: statistics.median(r) for name, r in rates.items()}
    best_k = max(by_k, key=lambda k: median[by_k[k]])
    fit_rates = {k: [] for k in dict.fromkeys((1, best_k))}
    for _ in range(2 if args.quick else 3):  # interleaved too; log points every 128 steps
        for k in fit_rates:
            fit_rates[k].append(fit_rate(args.batch, k, 384 if args.quick else 768, 128))
    result = summary(args, rates, best_k, by_k, cold, costs, torch_note)
    result["cpu_ms_per_step_median"] = {
        k: round(statistics.median(v), 3) for k, v in cpu_ms.items()
    }
    result["fit_steps_per_s_median"] = {
        f"k{k}": round(statistics.median(v), 1) for k, v in fit_rates.items()
    }
    result["fit_fused_vs_single"] = round(paired(fit_rates[best_k], fit_rates[1]), 3)
    result["fit_all_rates"] = {f"k{k}": [round(x, 1) for x in v] for k, v in fit_rates.items()}
    print_table(rates)
    print(json.dumps(result))


def paired(a, b):
    """The median over windows of a[i] / b[i]: both measured in the same round, so slow changes of the
    machine's load cancel (the best-of and median of each variant alone move by 10-40 % between runs here)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def summary(args, rates, best_k, by_k, cold, costs, torch_note):
    """The JSON result: the headline ratios (medians of per-round ratios) first, then the detail."""
    r = lambda x: round(x, 3)  # noqa: E731
    fused, single = rates[by_k[best_k]], rates["diffjax"]
    median = {name: round(statistics.median(v), 1) for name, v in rates.items()}
    result = {
        "fused_vs_single": r(paired(fused, single)),
        "best_k": best_k,
        "steps_per_s_median": {f"k{k}": median[name] for k, name in by_k.items()},
    }
    if "torch_eager" in rates:
        result["speedup_vs_torch"] = r(paired(fused, rates["torch_eager"]))
        result["speedup_vs_torch_k1"] = r(paired(single, rates["torch_eager"]))
        result["torch_steps_per_s_median"] = median["torch_eager"]
    result.update(
        {
            "fused_vs_optax_by_hand": r(paired(fused, rates["optax_by_hand"])),
            "ratio_diffjax_over_optax": r(paired(single, rates["optax_by_hand"])),
            "ratio_diffjax_step_hand_loss_over_optax": r(
                paired(rates["diffjax_step_hand_loss"], rates["optax_by_hand"])
            ),
            "steps_per_s_median_all": median,
            "steps_per_s_best_all": {k: round(max(v), 1) for k, v in rates.items()},
            "device": str(jax.devices()[0]),
            "n_devices": jax.device_count(),
            "jax": jax.__version__,
            "python": platform.python_version(),
            "torch": torch_note,
            "batch": args.batch,
            "mlp": "MLP(2, hidden=256, depth=3, time_dim=64)",
            "xla_cost_per_step": costs,
            "cold_start_s": {k: round(v, 3) for k, v in cold.items()},
            "all_rates": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        }
    )
    return result


def print_table(rates):
    """A readable table before the JSON line."""
    print(f"{'variant':<26} {'median steps/s':>15} {'best':>8}")
    for name, r in rates.items():
        print(f"{name:<26} {statistics.median(r):>15.1f} {max(r):>8.1f}")


def torch_runners(batch_size):
    """``({"torch_eager": run(n)}, note)``: n PyTorch eager steps of the same MLP and flow-matching loss
    (CPU/GPU), or ``({}, why)`` when torch is not installed. On CPU the thread count is the faster of 1 and all
    cores in a short trial: OpenMP's threads spin at barriers, and on a loaded 2-core machine 2 threads were 10x
    slower than 1 (9 against 85 steps/s), so torch is credited with its better setting."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return {}, "not installed (optional `bench` extra: torch, flow_matching); skipped"
    import math  # noqa: PLC0415

    dev = "cuda" if torch.cuda.is_available() else "cpu"

    class Net(torch.nn.Module):
        def __init__(self, dim=2, hidden=256, depth=3, time_dim=64):
            super().__init__()
            self.time_dim = time_dim
            self.layers = torch.nn.ModuleList(
                torch.nn.Linear((dim if i == 0 else hidden) + time_dim, hidden)
                for i in range(depth)
            )
            self.out = torch.nn.Linear(hidden, dim)

        def forward(self, t, x):
            half = self.time_dim // 2
            freqs = 1000.0 * torch.exp(
                -math.log(10000.0) * torch.arange(half, device=x.device) / half
            )
            arg = t[:, None] * freqs
            e = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
            h = x
            for layer in self.layers:
                h = torch.nn.functional.silu(layer(torch.cat([h, e], dim=-1)))
            return self.out(h)

    net = Net().to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.0)
    x = torch.randn(batch_size, 2, device=dev)

    try:  # Meta flow_matching's CondOT path, as its users write the training step
        from flow_matching.path import AffineProbPath  # noqa: PLC0415
        from flow_matching.path.scheduler import CondOTScheduler  # noqa: PLC0415

        fm_path = AffineProbPath(scheduler=CondOTScheduler())
    except ImportError:
        fm_path = None

    def step():
        t = torch.rand(batch_size, device=dev)
        eps = torch.randn_like(x)
        if fm_path is not None:
            sample = fm_path.sample(x_0=eps, x_1=x, t=t)  # flow_matching: x_0 noise, x_1 data
            x_t, u_t = sample.x_t, sample.dx_t
        else:
            x_t, u_t = t[:, None] * x + (1 - t[:, None]) * eps, x - eps
        loss = ((net(t, x_t) - u_t) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()

    def runner(threads):
        def run(n):
            torch.set_num_threads(threads)
            for _ in range(n):
                step()
            if dev == "cuda":
                torch.cuda.synchronize()

        return run

    cores = torch.get_num_threads()
    trial = {}
    for n in sorted({1, cores}) if dev == "cpu" else [cores]:
        runner(n)(5)  # warm
        t0 = time.perf_counter()
        runner(n)(20)
        trial[n] = round(20 / (time.perf_counter() - t0), 1)
    threads = max(trial, key=trial.get)
    runs = {"torch_eager": runner(threads)}
    path = "flow_matching AffineProbPath(CondOTScheduler)" if fm_path else "hand-written path"
    note = (
        f"torch {torch.__version__} eager on {dev}, {threads} thread(s) (trial steps/s by threads: "
        f"{trial}), no EMA, {path}"
    )
    return runs, note


if __name__ == "__main__":
    main()
