"""Tests of diffjax.train: optimisation, purity, compile behaviour, EMA/schedule math, data order, data parallelism.

Time convention: t = 0 is noise, t = 1 is data (the flow-matching objective draws t ~ U(0, 1)).
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import analytic, data, losses, nn, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(hidden=32):
    return nn.split(nn.MLP(2, hidden=hidden, depth=2, time_dim=16, rngs=nnx.Rngs(0)))


def make(config, hidden=32, donate=False):
    apply, params = tiny(hidden)
    objective = losses.flow_matching()
    optimizer = train.make_optimizer(config)
    step = train.make_train_step(
        apply,
        objective,
        optimizer,
        config.ema_decay,
        schedule=train.make_schedule(config),
        donate=donate,
    )
    state = train.init_state(params, optimizer, jax.random.key(config.seed))
    return apply, objective, step, state


def test_train_step_decreases_flow_matching_loss():
    config = train.TrainConfig(learning_rate=1e-2, warmup_steps=10, total_steps=150, batch_size=128)
    apply, objective, step, state = make(config, donate=True)
    xs = data.toy_sample("8gaussians", jax.random.key(1), 4096)
    batch_fn = train.dataset_batch_fn(xs, config.batch_size, jax.random.key(2))
    held_out = data.toy_sample("8gaussians", jax.random.key(9), 4096)

    def evaluate(params):  # same (t, ε) draws for both evaluations: a paired comparison
        fn = lambda t, x: apply(params, t, x)
        return float(losses.batch_loss(objective, fn, held_out, jax.random.key(7)))

    # the oracle: the exact minimiser of the flow-matching loss is the mixture's marginal velocity
    mixture = analytic.GaussianMixture(
        jnp.full(8, 1 / 8), data.eight_gaussians_centers(), data.EIGHT_GAUSSIANS_STD**2
    )
    optimum = float(
        losses.batch_loss(
            objective, mixture.model("velocity", objective.path), held_out, jax.random.key(7)
        )
    )
    before = evaluate(state.params)
    # a constant-β EMA kept on the host alongside (the old behaviour without warm-up): a negative control
    treedef = jax.tree.structure(state.params)
    constant_ema = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
    beta = config.ema_decay
    for s in range(config.total_steps):
        state, metrics = step(state, batch_fn(s))
        constant_ema = [
            beta * e + (1 - beta) * np.asarray(p)
            for e, p in zip(constant_ema, jax.tree.leaves(state.params), strict=True)
        ]
    after = evaluate(state.params)
    assert int(state.step) == config.total_steps
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    # training closes most of the gap to the optimum (zero-initialised output: before = E‖x − ε‖²)
    assert optimum < after < before
    assert after - optimum < 0.3 * (before - optimum), (optimum, before, after)
    # with the warm-up β_n = min(β, (1 + n)/(10 + n)) the EMA after 150 steps is a trained model ...
    ema_gap = evaluate(state.ema_params) - optimum
    assert ema_gap < 0.4 * (before - optimum), (optimum, before, ema_gap)
    # ... while a constant β = 0.999 over 150 steps has barely moved from the start (weight 0.86 on θ_0)
    constant = jax.tree.unflatten(treedef, [jnp.asarray(e, jnp.float32) for e in constant_ema])
    assert evaluate(constant) - optimum > 0.5 * (before - optimum)


def test_train_step_is_pure_and_compiles_once():
    config = train.TrainConfig(warmup_steps=2, total_steps=20, batch_size=16)
    apply, params = tiny()
    traces = []

    def counting_apply(p, t, x):
        traces.append(1)
        return apply(p, t, x)

    optimizer = train.make_optimizer(config)
    step = train.make_train_step(
        counting_apply, losses.flow_matching(), optimizer, 0.9, donate=False
    )
    state = train.init_state(params, optimizer, jax.random.key(0))
    batch = data.toy_sample("moons", jax.random.key(1), 16)
    s1, m1 = step(state, batch)
    n_traces = len(traces)
    assert n_traces > 0
    s1b, m1b = step(state, batch)  # same inputs → same outputs (and the input state is unchanged)
    for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s1b, m1b)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    s2, m2 = step(s1, data.toy_sample("moons", jax.random.key(2), 16))
    assert len(traces) == n_traces, "the second call with the same shapes retraced"
    assert int(s2.step) == 2
    # different step → different randomness (fold_in(key, step)): a negative control of the purity check
    s1c, m1c = step(s1, batch)
    assert float(m1c["loss"]) != float(m1["loss"])


def test_ema_and_schedule_match_numpy():
    # β = 0.4: the warm-up (1 + n)/(10 + n) is below β for n = 0..4 and above it from n = 5 (both regimes)
    beta = 0.4
    config = train.TrainConfig(
        learning_rate=1e-2, warmup_steps=3, total_steps=8, ema_decay=beta, final_lr_fraction=0.1
    )
    _, _, step, state = make(config)
    ema = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
    lrs = []
    for s in range(config.total_steps):
        state, metrics = step(state, data.toy_sample("moons", jax.random.key(s), 32))
        beta_s = min(beta, (1 + s) / (10 + s))
        ema = [
            beta_s * e + (1 - beta_s) * np.asarray(p)
            for e, p in zip(ema, jax.tree.leaves(state.params), strict=True)
        ]
        lrs.append(float(metrics["lr"]))
    for e, got in zip(ema, jax.tree.leaves(state.ema_params), strict=True):
        np.testing.assert_allclose(np.asarray(got), e, rtol=1e-5, atol=1e-7)
    # η(s): linear warm-up 0 → η over W steps, then η_end + (η − η_end)·½(1 + cos(π(s − W)/(T − W)))
    lr, w, total, end = 1e-2, 3, 8, 1e-3
    expected = [
        lr * s / w
        if s < w
        else end + (lr - end) * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w)))
        for s in range(total)
    ]
    np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-9)


def test_ema_update_formula():
    e = {"a": jnp.array([1.0, 2.0]), "b": jnp.array(3.0)}
    p = {"a": jnp.array([3.0, -2.0]), "b": jnp.array(0.0)}
    out = train.ema_update(e, p, 0.75)
    np.testing.assert_allclose(out["a"], [1.5, 1.0])
    np.testing.assert_allclose(out["b"], 2.25)
    # with a step: β_2 = min(0.75, 3/12) = 0.25, so θ̄ = 0.25·θ̄ + 0.75·θ
    out = train.ema_update(e, p, 0.75, step=2)
    np.testing.assert_allclose(out["a"], [2.5, -1.0])
    np.testing.assert_allclose(out["b"], 0.75)
    # past the warm-up (n = 50: 51/60 = 0.85 > 0.75) the decay is β itself
    np.testing.assert_allclose(train.ema_update(e, p, 0.75, step=50)["a"], [1.5, 1.0])


def _init_weight_closed_form(beta, n_updates):
    """W(N) = Π_{n<N} min(β, (1 + n)/(10 + n)), by the telescoped closed form (independent of the code).

    (1 + n)/(10 + n) < β exactly for n < n* = ⌈(10β − 1)/(1 − β)⌉; up to there the product is 9!·m!/(m + 9)!
    (m = min(N, n*)), after it every factor is β.
    """
    n_star = max(0, math.ceil((10 * beta - 1) / (1 - beta)))
    m = min(n_updates, n_star)
    log_w = math.lgamma(10) + math.lgamma(m + 1) - math.lgamma(m + 10)
    return float(np.exp(log_w + (n_updates - m) * np.log(beta)))


@pytest.mark.parametrize("beta", [0.999, 0.9, 0.5])
def test_ema_init_weight_matches_closed_form(beta):
    for n in [0, 1, 2, 9, 80, 81, 82, 500, 1500, 9000, 20000]:
        np.testing.assert_allclose(
            train.ema_init_weight(beta, n), _init_weight_closed_form(beta, n), rtol=1e-9
        )
        np.testing.assert_allclose(train.ema_init_weight(beta, n, warmup=False), beta**n, rtol=1e-9)
    # the first update keeps 1/10 of θ_0 (β_0 = 1/10), the second 1/10·2/11
    np.testing.assert_allclose(train.ema_init_weight(beta, 1), min(beta, 0.1))
    np.testing.assert_allclose(train.ema_init_weight(beta, 2), min(beta, 0.1) * min(beta, 2 / 11))


def _zeroing_optimizer():
    """An 'optimizer' whose first update sets the parameters to 0 (u = −θ), and keeps them there.

    The EMA is linear in the iterates, θ̄_N = W(N)·θ_0 + Σ_{k≥1} w_k·θ_k, so with θ_0 = 1 and θ_k = 0 the EMA after N
    steps IS the weight W(N) it still puts on the initial parameters.
    """
    import optax

    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda grads, state, params: (jax.tree.map(jnp.negative, params), state),
    )


@pytest.mark.parametrize("warmup", [True, False])
def test_train_step_ema_weight_on_init(warmup):
    beta, n_steps = 0.999, 1500  # the README tour's run
    optimizer = _zeroing_optimizer()
    step = train.make_train_step(
        lambda p, t, x: p["w"] * x,
        None,
        optimizer,
        beta,
        loss_fn=lambda objective, fn, batch, key: jnp.sum(fn(0.5, batch) ** 2),
        ema_warmup=warmup,
    )
    state = train.init_state({"w": jnp.ones(())}, optimizer, jax.random.key(0))
    batch = jnp.ones((4,))
    weights = {}
    for s in range(n_steps):
        state, _ = step(state, batch)
        if s + 1 in (1, 2, 10, 100, 1500):
            weights[s + 1] = float(state.ema_params["w"])
    assert float(state.params["w"]) == 0.0 and int(state.step) == n_steps
    for n, got in weights.items():
        expected = _init_weight_closed_form(beta, n) if warmup else beta**n
        np.testing.assert_allclose(got, expected, rtol=2e-4)  # float32 product of n factors
    if warmup:
        assert weights[1500] < 0.01  # a 1,500-step run's EMA no longer remembers the initialisation
    else:
        assert weights[1500] > 0.2  # the bug: 0.999^1500 = 0.22 of the EMA is still θ_0


def test_ema_decay_at_under_jit_vmap_grad():
    steps = jnp.arange(0, 20_000, 997)
    eager = np.array([float(train.ema_decay_at(0.999, int(s))) for s in steps])
    expected = np.minimum(0.999, (1.0 + np.asarray(steps)) / (10.0 + np.asarray(steps)))
    np.testing.assert_allclose(eager, expected, rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(lambda s: train.ema_decay_at(0.999, s)))(steps), eager, rtol=1e-7
    )
    # ∂β_n/∂β is 1 past the warm-up and 0 inside it
    g = jax.vmap(jax.grad(lambda b, s: train.ema_decay_at(b, s)), in_axes=(None, 0))(0.999, steps)
    np.testing.assert_array_equal(np.asarray(g), (np.asarray(steps) >= 8990).astype(np.float32))
    np.testing.assert_allclose(train.ema_decay_at(0.999, 3, warmup=False), 0.999)


def test_dataset_batch_fn_is_a_deterministic_partition():
    xs = np.arange(20, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
    key = jax.random.key(5)
    fn = train.dataset_batch_fn(xs, 6, key)
    epoch0 = np.concatenate([fn(s) for s in range(3)])[:, 0]
    assert sorted(epoch0.tolist()) == sorted(set(epoch0.tolist()))  # no repeats within an epoch
    epoch1 = np.concatenate([fn(s) for s in range(3, 6)])[:, 0]
    assert not np.array_equal(epoch0, epoch1)  # a new order each epoch
    fresh = train.dataset_batch_fn(xs, 6, key)  # a resumed run
    np.testing.assert_array_equal(fresh(4), fn(4))
    np.testing.assert_array_equal(fresh(1), fn(1))


def test_config_validation():
    with pytest.raises(ValueError, match="warmup_steps"):
        train.TrainConfig(warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="ema_decay"):
        train.TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="learning_rate"):
        train.TrainConfig(learning_rate=0.0)
    d = train.TrainConfig(grad_clip=float("inf")).to_dict()
    assert json.loads(json.dumps(d))["grad_clip"] == "inf"


def test_fit_runs_and_logs(tmp_path):
    config = train.TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=12, batch_size=16)
    apply, params = tiny(16)
    xs = data.toy_sample("moons", jax.random.key(1), 256)
    seen = []
    state, history = train.fit(
        apply,
        params,
        losses.flow_matching(),
        train.dataset_batch_fn(xs, 16, jax.random.key(2)),
        config,
        workdir=tmp_path,
        checkpoint_every=5,
        log_every=4,
        callback=lambda s, st, m: seen.append(s),
        progress=False,
    )
    assert int(state.step) == 12
    assert history["step"] == [4, 8, 12] and seen == [4, 8, 12]
    assert len(history["loss"]) == 3 and all(np.isfinite(history["loss"]))
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [5, 10, 12]
    assert np.isfinite(
        np.asarray(jax.tree.leaves(params)[0])
    ).all()  # the caller's params were not donated


def test_multi_device_matches_single_device():
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "_train_proc.py"), "devices", "--steps", "15"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 8
    assert out["batch_devices_many"] == 8 and out["batch_devices_one"] == 1
    assert out["param_devices_many"] == 8 and out["param_replicated_many"]
    np.testing.assert_allclose(out["loss_many"], out["loss_one"], rtol=1e-5)
    assert out["max_param_diff"] < 1e-5
    assert "not divisible" in out["indivisible_error"]


# ----------------------------------------------------------------------------------------------------------
# fit's safety: non-finite states are never saved; SIGINT/SIGTERM stop after a step with a checkpoint
# ----------------------------------------------------------------------------------------------------------


def _fit(workdir, total=6, batch_fn=None, **kw):
    config = train.TrainConfig(learning_rate=3e-3, warmup_steps=1, total_steps=total, batch_size=16)
    apply, params = tiny(16)
    if batch_fn is None:
        batch_fn = train.dataset_batch_fn(
            data.toy_sample("moons", jax.random.key(1), 128), 16, jax.random.key(2)
        )
    kw = dict(dict(checkpoint_every=2, log_every=3, progress=False), **kw)
    return train.fit(apply, params, losses.flow_matching(), batch_fn, config, workdir=workdir, **kw)


@pytest.mark.parametrize(
    "log_every, total, message",
    [
        (
            3,
            6,
            r"at the log point of step 6: params, EMA params, optimizer state \(finite at step 4, "
            r"so it arose in steps 5-6\); not saved; the last checkpoint in \S+ is step 4\. Lower the learning",
        ),
        (
            100,
            8,
            r"before saving step 6: params, EMA params, optimizer state \(finite at step 4, so it arose "
            r"in steps 5-6\); not saved; the last checkpoint in \S+ is step 4\. Lower the learning rate, clip "
            r"gradients \(TrainConfig.grad_clip\) or check the data for NaN/inf",
        ),
    ],
    ids=["at a log point", "before a save"],
)
def test_nonfinite_state_is_never_saved(tmp_path, log_every, total, message):
    from diffjax import checkpoint

    good = train.dataset_batch_fn(
        data.toy_sample("moons", jax.random.key(1), 128), 16, jax.random.key(2)
    )

    def batch_fn(s):  # the data of step 5 (index 4) holds a NaN
        batch = good(s)
        return np.where(s == 4, np.nan, batch) if s == 4 else batch

    seen = []
    with pytest.raises(train.NonFiniteStateError, match=message) as info:
        _fit(
            tmp_path,
            total=total,
            batch_fn=batch_fn,
            log_every=log_every,
            callback=lambda s, st, m: seen.append(s),
        )
    error = info.value
    assert isinstance(error, FloatingPointError) and "\n" not in str(error)
    assert (error.step, error.since, error.last_checkpoint) == (6, 4, 4)
    assert error.parts == ("params", "EMA params", "optimizer state")
    assert 6 not in seen  # the callback never sees the non-finite state
    steps = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
    assert steps == [2, 4]  # nothing saved at or after the NaN
    for step in steps:
        assert checkpoint.verify_step(tmp_path, step) is None
    restored = checkpoint.restore_latest(
        tmp_path,
        jax.eval_shape(
            lambda: train.init_state(
                tiny(16)[1], train.make_optimizer(train.TrainConfig()), jax.random.key(0)
            )
        ),
        checkpoint.read_metadata(tmp_path)["config"],
    )
    assert restored.step == 4
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state))
    if log_every == 3:  # without a workdir the message says nothing was saved
        with pytest.raises(
            train.NonFiniteStateError, match=r"steps 4-6\); no workdir, nothing saved\. "
        ):
            _fit(None, total=total, batch_fn=batch_fn, log_every=log_every)


def test_huge_learning_rate_stops_with_the_step(tmp_path):
    config = train.TrainConfig(
        learning_rate=1e30, warmup_steps=1, total_steps=6, batch_size=16, grad_clip=float("inf")
    )
    apply, params = tiny(16)
    batch_fn = lambda s: data.toy_sample("moons", jax.random.key(s), 16)
    with pytest.raises(train.NonFiniteStateError, match=r"step \d") as info:
        train.fit(
            apply,
            params,
            losses.flow_matching(),
            batch_fn,
            config,
            workdir=tmp_path,
            checkpoint_every=100,
            log_every=1,
            progress=False,
        )
    assert info.value.step <= 3 and info.value.last_checkpoint is None
    assert "last checkpoint in" in str(info.value) and "is step none" in str(info.value)
    assert not [p for p in tmp_path.iterdir() if p.name.isdigit()]


def _in_main_thread():
    import threading

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can only be installed in the main thread")


def test_sigint_saves_the_current_step_and_resumes_bit_identically(tmp_path):
    import signal

    from diffjax import checkpoint

    _in_main_thread()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    good = train.dataset_batch_fn(
        data.toy_sample("moons", jax.random.key(1), 128), 16, jax.random.key(2)
    )

    def batch_fn(s):  # Ctrl-C while step 3 (index 2) runs: inside a log window of 2 steps
        if s == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return good(s)

    with pytest.raises(train.TrainingInterrupted) as info:
        _fit(tmp_path, batch_fn=batch_fn, log_every=2)
    error = info.value
    assert str(error) == (
        f"interrupted by SIGINT at step 3; checkpoint saved in {tmp_path} "
        "(resume by running the same command again)"
    )
    assert (error.step, error.signal, error.saved, error.workdir) == (
        3,
        "SIGINT",
        True,
        str(tmp_path),
    )
    assert int(error.state.step) == 3 and error.history["step"] == [2]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [2, 3]
    assert checkpoint.verify_step(tmp_path, 3) is None

    # resumed == uninterrupted, the state bit for bit and the history (the window 3-4 spans the interrupt)
    resumed, hist = _fit(tmp_path, log_every=2)
    reference, ref_hist = _fit(None, log_every=2)
    assert hist == ref_hist and hist["step"] == [2, 4, 6]
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.step) == 6
    # negative control: the checkpoint of step 3 is not the final state
    assert not np.array_equal(
        np.asarray(jax.tree.leaves(error.state.params)[0]),
        np.asarray(jax.tree.leaves(resumed.params)[0]),
    )


def test_second_signal_interrupts_at_once():
    import signal

    _in_main_thread()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    during = []

    def twice(step, state, metrics):
        during.append(signal.getsignal(signal.SIGTERM))
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(
                os.getpid(), signal.SIGINT
            )  # the second one: the default, KeyboardInterrupt at once

    signal.signal(
        signal.SIGTERM, signal.SIG_IGN
    )  # an ignored signal (e.g. of a background job) stays ignored
    try:
        with pytest.raises(KeyboardInterrupt):
            _fit(None, log_every=1, callback=twice)
        assert during == [signal.SIG_IGN, signal.SIG_IGN]
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before[1])
    assert signal.getsignal(signal.SIGINT) is before[0]
