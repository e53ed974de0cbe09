"""Training throughput of diffjax's train step against a hand-written minimal optax loop.

Both train the same time-conditioned MLP (``diffjax.nn.MLP(2, hidden=256, depth=3)``) with conditional flow
matching on the linear path (x_t = t·x + (1 − t)·ε, t = 0 noise, t = 1 data; target velocity u = x − ε,
t ~ U(0, 1)) on 2-D data, with the same optimizer (clip + AdamW, warm-up + cosine) and the same parameter EMA,
jitted with the state donated. The baseline writes the loss inline; diffjax goes through
``losses.batch_loss(flow_matching(LinearPath()))`` and ``train.make_train_step``. Reported: steps/s (median of
interleaved repeats, best and median), their ratio (target ≥ 0.95), XLA's flop/byte count per step (independent
of machine load) and the cold start (trace + compile + first step) of each. ``diffjax_step_hand_loss`` runs
diffjax's train step on the baseline's inline loss, separating the step's overhead from the objective's.
A PyTorch step of the same MLP is timed if torch is installed (optional ``bench`` extra).

Usage: ``python benchmarks/train.py [--quick] [--batch 1024] [--steps 200] [--repeats 5]``.
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


def time_steps(step, state, batch, n):
    for _ in range(n):
        state, out = step(state, batch)
    jax.block_until_ready((state, out))
    return state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 256, fewer steps")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    batch_size = args.batch or (256 if args.quick else 1024)
    steps = args.steps or (25 if args.quick else 50)
    repeats = args.repeats or (8 if args.quick else 20)

    config = train.TrainConfig(learning_rate=1e-3, warmup_steps=100, total_steps=100_000)
    apply, params = nn.split(nn.MLP(2, hidden=256, depth=3, rngs=nnx.Rngs(0)))
    optimizer = train.make_optimizer(config)
    batch = jnp.asarray(data.toy_sample("8gaussians", jax.random.key(1), batch_size))
    key = jax.random.key(0)

    def fresh_diffjax():
        return train.init_state(jax.tree.map(jnp.copy, params), optimizer, key)

    def fresh_baseline():
        p = jax.tree.map(jnp.copy, params)
        return (p, optimizer.init(p), jax.tree.map(jnp.copy, p), jnp.zeros((), jnp.int32), key)

    def hand_loss(
        objective, fn, xs, key
    ):  # the baseline's loss behind diffjax's step: isolates the step
        n = xs.shape[0]
        k_t, k_e = jax.random.split(key)
        t = jax.random.uniform(k_t, (n,))
        eps = jax.random.normal(k_e, xs.shape)
        x_t = t[:, None] * xs + (1 - t[:, None]) * eps
        return jnp.mean(jnp.sum(jnp.square(jax.vmap(fn)(t, x_t) - (xs - eps)), axis=-1))

    steps_fns = {
        "diffjax_step_hand_loss": (
            lambda: train.make_train_step(
                apply, None, optimizer, config.ema_decay, loss_fn=hand_loss
            ),
            fresh_diffjax,
        ),
        "diffjax": (
            lambda: train.make_train_step(
                apply, losses.flow_matching(LinearPath()), optimizer, config.ema_decay
            ),
            fresh_diffjax,
        ),
        "optax_by_hand": (
            lambda: hand_written_step(apply, optimizer, config.ema_decay),
            fresh_baseline,
        ),
    }
    cold, compiled, states, costs = {}, {}, {}, {}
    for name, (make, fresh) in steps_fns.items():
        step, state = make(), fresh()
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state, out = step(state, batch)
        jax.block_until_ready((state, out))
        cold[name] = time.perf_counter() - t0
        compiled[name], states[name] = step, time_steps(step, state, batch, 10)
        cost = step.lower(states[name], batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        costs[name] = {k: cost.get(k) for k in ("flops", "bytes accessed")}

    rates = {name: [] for name in steps_fns}
    for _ in range(repeats):  # interleaved, so that machine load affects both alike
        for name in steps_fns:
            t0 = time.perf_counter()
            states[name] = time_steps(compiled[name], states[name], batch, steps)
            rates[name].append(steps / (time.perf_counter() - t0))
    # best of many short interleaved repeats: the least disturbed by other load on the machine
    best = {name: max(r) for name, r in rates.items()}
    median = {name: statistics.median(r) for name, r in rates.items()}
    result = {
        "device": str(jax.devices()[0]),
        "n_devices": jax.device_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "batch": batch_size,
        "mlp": "MLP(2, hidden=256, depth=3, time_dim=64)",
        "steps_per_s_best": {k: round(v, 1) for k, v in best.items()},
        "steps_per_s_median": {k: round(v, 1) for k, v in median.items()},
        "ratio_diffjax_over_optax_best": round(best["diffjax"] / best["optax_by_hand"], 3),
        "ratio_diffjax_over_optax_median": round(median["diffjax"] / median["optax_by_hand"], 3),
        "ratio_diffjax_step_hand_loss_over_optax_best": round(
            best["diffjax_step_hand_loss"] / best["optax_by_hand"], 3
        ),
        "xla_cost_per_step": costs,
        "cold_start_s": {k: round(v, 3) for k, v in cold.items()},
        "all_rates": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }
    result["torch"] = torch_step_rate(batch_size, steps, repeats)
    print(json.dumps(result, indent=2))


def torch_step_rate(batch_size, steps, repeats):
    """Steps/s of the same MLP and flow-matching step in PyTorch (eager, CPU/GPU), or why it was skipped."""
    try:
        import torch  # noqa: PLC0415
    except ImportError:
        return "not installed (optional `bench` extra: torch, flow_matching); skipped"
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

    for _ in range(10):
        step()
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if dev == "cuda":
            torch.cuda.synchronize()
        rates.append(steps / (time.perf_counter() - t0))
    return {
        "device": dev,
        "steps_per_s": round(statistics.median(rates), 1),
        "note": "eager, no EMA, "
        + (
            "flow_matching AffineProbPath(CondOTScheduler)"
            if fm_path is not None
            else "hand-written path"
        ),
    }


if __name__ == "__main__":
    main()
