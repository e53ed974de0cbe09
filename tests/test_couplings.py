"""Couplings (``diffjax.couplings``) and the coupled losses, against independent oracles.

Time convention: t = 0 is noise, t = 1 is data; the noise x0 is paired with the data x1.

Oracles: scipy's ``linear_sum_assignment`` (exact OT), the Gibbs form of the entropic plan (log π + C/ε is a sum
f_i + g_j, which fixes ε = 2σ²), closed-form expected pair costs, finite differences of the Brownian bridge and
of a Gaussian log-density, a NumPy recomputation of the coupled loss, and a 4-device subprocess for the global
batch. Negative controls: the independent coupling lowers no cost, a plan with the wrong ε fails the Gibbs test,
a per-device pairing differs from the global one.

Cost: small batches, one shape per solver where possible (~20 s on one core).
"""

import functools
import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.stats import multivariate_normal

import diffjax as dj
from diffjax import couplings as C, losses

B = 32  # the batch size of most tests (one compiled program per solver)


def sq_cost(x0, x1):
    """C[i, j] = ‖x1_i − x0_j‖² in float64 NumPy (the oracle's own cost)."""
    a = np.asarray(x1, np.float64).reshape(len(x1), -1)
    b = np.asarray(x0, np.float64).reshape(len(x0), -1)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


@pytest.fixture(scope="module")
def batch():
    k0, k1 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k0, (B, 2))
    x1 = jax.random.normal(k1, (B, 2)) * jnp.array([1.5, 0.5]) + jnp.array([3.0, -1.0])
    return x0, x1


@pytest.fixture(scope="module")
def pair_fn():
    return eqx.filter_jit(lambda c, k, x0, x1: c.pair(k, x0, x1))


# ---------------------------------------------------------------------------------------------------------------
# pairings
# ---------------------------------------------------------------------------------------------------------------


def test_exact_ot_equals_linear_sum_assignment(batch, pair_fn):
    x0, x1 = batch
    cost = sq_cost(x0, x1)
    rows, cols = linear_sum_assignment(cost)
    optimum = cost[rows, cols].sum()
    j = np.asarray(pair_fn(C.MinibatchOT(), jax.random.key(1), x0, x1))
    assert sorted(j.tolist()) == list(range(B))  # a permutation: every noise used once
    np.testing.assert_allclose(cost[np.arange(B), j].sum(), optimum, rtol=1e-6)
    # examples of any shape (here (2, 1)) are flattened for the cost: the same optimum
    jr = np.asarray(pair_fn(C.MinibatchOT(), jax.random.key(1), x0[..., None], x1[..., None]))
    np.testing.assert_allclose(cost[np.arange(B), jr].sum(), optimum, rtol=1e-6)
    # negative control: the identity pairing is not optimal here
    assert np.trace(cost) > 1.5 * optimum


def test_sinkhorn_plan_marginals_and_gibbs_form(batch):
    x0, x1 = batch
    sigma = 0.7
    plan = np.asarray(C.SchrodingerBridge(sigma, num_iterations=300).plan(x0, x1), np.float64)
    np.testing.assert_allclose(plan.sum(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(plan.sum(axis=1), 1.0 / B, rtol=1e-3)
    np.testing.assert_allclose(plan.sum(axis=0), 1.0 / B, rtol=1e-3)

    def interaction(eps):
        # log π_ij + C_ij/ε = f_i + g_j exactly for the entropic plan with that ε: the double-centred matrix is 0
        m = np.log(plan) + sq_cost(x0, x1) / eps
        return np.abs(m - m.mean(0) - m.mean(1)[:, None] + m.mean()).max()

    assert interaction(2 * sigma**2) < 1e-2
    assert interaction(sigma**2) > 1.0  # negative control: ε = σ² is not the plan's regularisation
    # MinibatchOT(Sinkhorn) with relative ε: ε·mean(C)
    eps_rel = 0.05
    p2 = np.asarray(C.Sinkhorn(eps_rel, 300).plan(jnp.asarray(sq_cost(x0, x1), jnp.float32)))
    np.testing.assert_allclose(p2.sum(axis=1), 1.0 / B, rtol=1e-3)
    np.testing.assert_allclose(p2.sum(axis=0), 1.0 / B, rtol=1e-3)
    m = np.log(p2) + sq_cost(x0, x1) / (eps_rel * sq_cost(x0, x1).mean())
    assert np.abs(m - m.mean(0) - m.mean(1)[:, None] + m.mean()).max() < 2e-2


def test_ot_lowers_the_mean_pair_cost_independent_does_not(pair_fn):
    # x0 ~ N(0, I), x1 ~ N(μ, diag(s²)) in 2-D: E‖x1 − x0‖² = ‖μ‖² + Σ s² + 2 under the independent coupling
    mu, s = np.array([3.0, -1.0]), np.array([1.5, 0.5])
    expected = (mu**2).sum() + (s**2).sum() + 2.0
    means = {name: [] for name in ("independent", "ot", "sinkhorn", "sb")}
    cps = {
        "independent": C.Independent(),
        "ot": C.MinibatchOT(),
        "sinkhorn": C.MinibatchOT(C.Sinkhorn(0.01, 200)),
        "sb": C.SchrodingerBridge(0.3),
    }
    for r in range(8):
        k0, k1, kp = jax.random.split(jax.random.key(100 + r), 3)
        x0 = jax.random.normal(k0, (B, 2))
        x1 = jax.random.normal(k1, (B, 2)) * s + mu
        cost = sq_cost(x0, x1)
        for name, cp in cps.items():
            j = np.asarray(pair_fn(cp, kp, x0, x1))
            means[name].append(cost[np.arange(B), j].mean())
    m = {k: float(np.mean(v)) for k, v in means.items()}
    # 256 independent pairs: the standard error of the mean cost is ~0.5; the OT cost (W2² of the empirical
    # measures, ≈ ‖μ‖² + (1.5 − 1)² + (0.5 − 1)² = 10.5 in the limit) is far below
    assert abs(m["independent"] - expected) < 2.0  # negative control: no reduction
    assert m["ot"] < 0.85 * expected
    assert m["sinkhorn"] < 0.9 * expected and m["sb"] < 0.9 * expected


# ---------------------------------------------------------------------------------------------------------------
# the Brownian bridge
# ---------------------------------------------------------------------------------------------------------------


def test_bridge_velocity_and_score_against_finite_differences(x64):
    sigma = 0.8
    sb = C.SchrodingerBridge(sigma)
    rng = np.random.default_rng(0)
    x0, x1, z = rng.normal(size=(3, 3))
    for t in (0.1, 0.37, 0.8):
        gamma = sigma * np.sqrt(t * (1 - t))
        np.testing.assert_allclose(float(sb.std(t)), gamma, rtol=1e-12)

        # a path x_t of fixed (x0, x1, z): its time derivative is the conditional velocity at x_t
        def path(s):
            return s * x1 + (1 - s) * x0 + sigma * np.sqrt(s * (1 - s)) * z

        h = 1e-6
        fd = (path(t + h) - path(t - h)) / (2 * h)
        u = np.asarray(sb.conditional_velocity(t, path(t), x0, x1))
        np.testing.assert_allclose(u, fd, rtol=1e-6, atol=1e-8)
        # the score: finite differences of scipy's Gaussian log-density N(μ_t, γ² I)
        mean = t * x1 + (1 - t) * x0
        x = mean + rng.normal(size=3) * gamma

        def logpdf(y):
            return multivariate_normal(mean, gamma**2 * np.eye(3)).logpdf(y)

        fd_score = np.array([(logpdf(x + h * e) - logpdf(x - h * e)) / (2 * h) for e in np.eye(3)])
        np.testing.assert_allclose(
            np.asarray(sb.conditional_score(t, x, x0, x1)), fd_score, rtol=1e-5
        )
        # sample(): mean μ_t and std γ_t
        xs = jax.vmap(lambda k: sb.sample(k, t, x0, x1))(jax.random.split(jax.random.key(3), 4000))
        np.testing.assert_allclose(np.asarray(xs).mean(0), mean, atol=5 * gamma / np.sqrt(4000))
        np.testing.assert_allclose(np.asarray(xs).std(0), gamma, rtol=0.06)


# ---------------------------------------------------------------------------------------------------------------
# the coupled loss
# ---------------------------------------------------------------------------------------------------------------


def linear_model(theta, t, x):
    w, b = theta
    return w @ x + b * t


@pytest.fixture(scope="module")
def loss_fns():
    obj = dj.flow_matching()

    def make(coupling, stratified=False):
        def f(theta, xs, key):
            return dj.batch_loss(
                obj,
                functools.partial(linear_model, theta),
                xs,
                key,
                coupling=coupling,
                stratified=stratified,
            )

        return jax.jit(f)

    return obj, make


THETA = (jnp.array([[0.3, -0.2], [0.1, 0.5]]), jnp.array([1.0, -0.5]))


def test_default_coupling_is_bit_identical(batch, loss_fns):
    _, x1 = batch
    obj, _ = loss_fns
    fn = functools.partial(linear_model, THETA)
    key = jax.random.key(5)
    for stratified in (False, True):
        ref = dj.batch_loss(obj, fn, x1, key, stratified=stratified)
        for cp in (None, "independent", C.Independent()):
            out = dj.batch_loss(obj, fn, x1, key, stratified=stratified, coupling=cp)
            assert np.asarray(out).tobytes() == np.asarray(ref).tobytes()


def test_ot_loss_against_numpy_recomputation(batch, loss_fns):
    # the coupled loss = mean_i ‖u(t_i, t_i x_i + (1 − t_i) ε_{j_i}) − (x_i − ε_{j_i})‖², with (t_i, ε_i) the
    # draws of losses.draw for the keys of batch_loss and j the scipy assignment of the noises to the data
    _, x1 = batch
    obj, make = loss_fns
    key = jax.random.key(7)
    ts, eps = jax.vmap(lambda x, k: losses.draw(obj, k, x))(x1, jax.random.split(key, B))
    ts, eps, xs = (np.asarray(a, np.float64) for a in (ts, eps, x1))
    rows, cols = linear_sum_assignment(sq_cost(eps, xs))
    e = eps[cols[np.argsort(rows)]]
    w, b = (np.asarray(a, np.float64) for a in THETA)
    xt = ts[:, None] * xs + (1 - ts[:, None]) * e
    pred = xt @ w.T + ts[:, None] * b
    expected = np.mean(((pred - (xs - e)) ** 2).sum(-1)) * float(obj.mass())
    out = make(C.MinibatchOT())(THETA, x1, key)
    np.testing.assert_allclose(float(out), expected, rtol=1e-5)
    # negative control: the unpaired loss is a different number
    assert abs(float(make(None)(THETA, x1, key)) - expected) > 0.05 * expected


def test_bridge_loss_against_numpy_recomputation(batch):
    # the SB loss: x_t = t x + (1 − t) ε_j + γ_t z, velocity target x − ε_j + γ̇_t z (score target −z/γ_t), with
    # (t, ε) the draws of losses.draw, j the coupling's pairing (key fold_in(key, 2); its law is the plan tested
    # above) and z from fold_in(key, 3), one key per example — recomputed here in NumPy float64
    _, x1 = batch
    sigma = 0.6
    sb = C.SchrodingerBridge(sigma)
    key = jax.random.key(17)
    obj_v = dj.flow_matching()
    ts, eps = jax.vmap(lambda x, k: losses.draw(obj_v, k, x))(x1, jax.random.split(key, B))
    j = np.asarray(sb.pair(jax.random.fold_in(key, 2), eps, x1))
    zkeys = jax.random.split(jax.random.fold_in(key, 3), B)
    z = np.asarray(jax.vmap(lambda k, x: jax.random.normal(k, x.shape))(zkeys, x1), np.float64)
    t, e, x = (
        np.asarray(ts, np.float64)[:, None],
        np.asarray(eps, np.float64)[j],
        np.asarray(x1, np.float64),
    )
    g = sigma * np.sqrt(t * (1 - t))
    dg = sigma * (1 - 2 * t) / (2 * np.sqrt(t * (1 - t)))
    xt = t * x + (1 - t) * e + g * z
    w, b = (np.asarray(a, np.float64) for a in THETA)
    pred = xt @ w.T + t * b
    mass = float(obj_v.mass())
    fn = functools.partial(linear_model, THETA)
    for obj, target in (
        (obj_v, x - e + dg * z),
        (losses.Objective(dj.LinearPath(), "score"), -z / g),
    ):
        expected = mass * np.mean(((pred - target) ** 2).sum(-1))
        out = dj.batch_loss(obj, fn, x1, key, coupling=sb)
        np.testing.assert_allclose(float(out), expected, rtol=2e-5)
    # negative control: without the bridge noise (σ → 0 in the target) the number differs
    assert (
        abs(
            mass * np.mean(((pred - (x - e)) ** 2).sum(-1))
            - float(dj.batch_loss(obj_v, fn, x1, key, coupling=sb))
        )
        > 1e-2
    )


@pytest.mark.parametrize("coupling", ["ot", "sb"])
def test_coupled_loss_jit_grad_and_no_recompile(batch, loss_fns, coupling):
    _, x1 = batch
    obj, make = loss_fns
    cp = C.as_coupling(coupling)
    f = make(cp)
    key = jax.random.key(11)
    if coupling == "ot":  # jit equals eager (one eager run: op-by-op dispatch is slow)
        eager = dj.batch_loss(obj, functools.partial(linear_model, THETA), x1, key, coupling=cp)
        np.testing.assert_allclose(float(f(THETA, x1, key)), float(eager), rtol=1e-5)
    # the loss is quadratic in θ (a linear model), so a central difference is exact up to rounding
    g = jax.jit(jax.grad(f))(THETA, x1, key)
    d = (jnp.array([[0.4, -1.0], [0.7, 0.2]]), jnp.array([-0.3, 0.9]))
    h = 0.05
    plus = jax.tree.map(lambda a, b: a + h * b, THETA, d)
    minus = jax.tree.map(lambda a, b: a - h * b, THETA, d)
    fd = (float(f(plus, x1, key)) - float(f(minus, x1, key))) / (2 * h)
    directional = sum(float(jnp.sum(a * b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(d)))
    np.testing.assert_allclose(directional, fd, rtol=2e-3)
    # a second call with new parameters and data of the same shapes reuses the program
    f(jax.tree.map(lambda a: a + 1.0, THETA), x1 + 1.0, jax.random.key(12))
    assert f._cache_size() == 1


def test_coupling_composes_with_kinds_weightings_and_conditions(batch):
    _, x1 = batch
    key = jax.random.key(13)
    mlp = lambda t, x: jnp.tanh(x) * t
    # ε-prediction on the VP path with stratified times (the OT path's own wiring is checked above)
    out = dj.batch_loss(dj.ddpm(), mlp, x1, key, coupling="ot", stratified=True)
    assert np.isfinite(float(out))
    sb_score = losses.Objective(dj.LinearPath(), "score")
    assert np.isfinite(float(dj.batch_loss(sb_score, mlp, x1, key, coupling="sb")))
    labels = jnp.arange(B) % 3
    out = dj.conditional_batch_loss(
        dj.flow_matching(),
        lambda t, x, c: x * t + c,
        (x1, labels),
        key,
        dropout=dj.ClassDropout(3, 0.1),
        coupling="ot",
    )
    assert np.isfinite(float(out))


def test_known_ot_map_is_approached_as_the_batch_grows(pair_fn):
    # N(0, I) → N(m, A²) with A symmetric positive definite: the OT map is T(x) = m + A x. Under the OT coupling
    # E[x1 − x0 | x0] = (A − I) x0 + m, the velocity at t = 0; a least-squares fit of x1 − x0 on (x0, 1) over
    # minibatch-OT pairs approaches it as the batch grows; independent pairs give E[x1 − x0 | x0] = m − x0.
    a = np.array([[1.5, 0.5], [0.5, 0.8]])
    m = np.array([2.0, -1.0])
    truth = np.concatenate([a - np.eye(2), m[None]], axis=0)

    def fit_error(coupling, batch_size, n_total=1024):
        rows = []
        for r in range(n_total // batch_size):
            k0, k1, kp = jax.random.split(jax.random.key(1000 + r), 3)
            x0 = jax.random.normal(k0, (batch_size, 2))
            x1 = jax.random.normal(k1, (batch_size, 2)) @ jnp.asarray(a, jnp.float32) + m
            j = np.asarray(pair_fn(coupling, kp, x0, x1))
            rows.append((np.asarray(x0)[j], np.asarray(x1)))
        x0 = np.concatenate([r[0] for r in rows])
        x1 = np.concatenate([r[1] for r in rows])
        feats = np.concatenate([x0, np.ones((len(x0), 1))], axis=1)
        coef, *_ = np.linalg.lstsq(feats, x1 - x0, rcond=None)
        return np.abs(coef - truth).max()

    err_small = fit_error(C.MinibatchOT(), 8)
    err_large = fit_error(C.MinibatchOT(), 256)
    err_indep = fit_error(C.Independent(), 256)
    assert err_large < 0.15 < err_small and err_large < 0.5 * err_small
    assert err_indep > 0.5  # negative control


# ---------------------------------------------------------------------------------------------------------------
# the global batch on 4 devices
# ---------------------------------------------------------------------------------------------------------------

FOUR_DEVICES = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np, equinox as eqx
from jax.sharding import NamedSharding, PartitionSpec as P
import diffjax as dj
from diffjax import couplings as C, losses, train

mesh = train.make_mesh()
k0, k1 = jax.random.split(jax.random.key(0))
x0 = jax.random.normal(k0, (32, 2))
x1 = jax.random.normal(k1, (32, 2)) * 2.0 + 1.0
data = NamedSharding(mesh, P("data"))
out = {"n_devices": len(jax.devices())}
for name, cp in {"ot": C.MinibatchOT(), "sb": C.SchrodingerBridge(0.5)}.items():
    one = eqx.filter_jit(cp.pair)(jax.random.key(3), x0, x1)
    sharded = jax.jit(lambda k, a, b: cp.pair(k, a, b), in_shardings=(None, data, data))(
        jax.random.key(3), jax.device_put(x0, data), jax.device_put(x1, data))
    out[name] = bool(np.array_equal(np.asarray(one), np.asarray(sharded)))
    out[name + "_shards"] = len(jax.device_put(x1, data).addressable_shards)
# negative control: pairing each device's shard separately (what a per-device plan does) differs
per_device = jax.shard_map(lambda a, b: C.MinibatchOT()._pair(jax.random.key(3), a, b),
                           mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"),
                           check_vma=False)(x0, x1)
out["per_device_differs"] = not np.array_equal(
    np.asarray(per_device), np.asarray(eqx.filter_jit(C.MinibatchOT().pair)(jax.random.key(3), x0, x1)))
# a data-parallel train step with the OT loss equals the one-device step
apply = lambda p, t, x: jnp.tanh(p["w"] @ x + p["b"] * t)
params = {"w": jnp.array([[0.3, -0.2], [0.1, 0.5]]), "b": jnp.array([1.0, -0.5])}
opt = train.make_optimizer(train.TrainConfig(warmup_steps=1, total_steps=10, batch_size=32))
loss_fn = functools.partial(losses.batch_loss, coupling="ot")
losses_ = []
for m in (None, mesh):
    state = train.init_state(params, opt, jax.random.key(0))
    step = train.make_train_step(apply, dj.flow_matching(), opt, 0.9, mesh=m, loss_fn=loss_fn, donate=False)
    if m is not None:
        state = train.replicate(state, m)
    b = train.shard_batch(np.asarray(x1), m) if m is not None else x1
    state, metrics = step(state, b)
    losses_.append(float(metrics["loss"]))
out["step_losses"] = losses_
print(json.dumps(out))
"""


def test_global_batch_pairing_on_four_devices():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0",
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(
        [sys.executable, "-c", FOUR_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 4 and out["ot_shards"] == 4
    assert out["ot"] and out["sb"]  # exact (Hungarian) and entropic (Sinkhorn) pairings
    assert out["per_device_differs"]
    one, four = out["step_losses"]
    np.testing.assert_allclose(four, one, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------


def test_bad_inputs_are_refused(batch):
    x0, x1 = batch
    obj = dj.flow_matching()
    fn = lambda t, x: x
    key = jax.random.key(0)
    with pytest.raises(
        ValueError, match=r"coupling='sinkhorn_ot' is not a coupling; expected one of"
    ):
        dj.batch_loss(obj, fn, x1, key, coupling="sinkhorn_ot")
    with pytest.raises(ValueError, match=r"batch has shape \(1, 2\); use a batch of at least 2"):
        dj.batch_loss(obj, fn, x1[:1], key, coupling="ot")
    assert np.isfinite(float(dj.batch_loss(obj, fn, x1[:1], key, coupling="independent")))
    with pytest.raises(ValueError, match=r"noise x0 has shape \(32, 2\) but the data x1 has shape"):
        C.MinibatchOT().pair(key, x0, x1[:, :1])
    with pytest.raises(ValueError, match=r"noise x0 has shape \(31, 2\)"):
        C.SchrodingerBridge().plan(x0[:31], x1)
    with pytest.raises(ValueError, match="batch of shape \\(1, 2\\)"):
        C.Independent().pair(key, x0[:1], x1[:1])
    with pytest.raises(ValueError, match="LinearPath's mean; got an objective on VPPath"):
        dj.batch_loss(dj.ddpm(), fn, x1, key, coupling="sb")
    with pytest.raises(ValueError, match="prediction='eps', space='eps'"):
        dj.batch_loss(losses.Objective(dj.LinearPath(), "eps"), fn, x1, key, coupling="sb")
    with pytest.raises(ValueError, match=r"t=1.0 must lie strictly inside \(0, 1\)"):
        C.SchrodingerBridge().conditional_velocity(1.0, x1[0], x0[0], x1[0])
    with pytest.raises(ValueError, match=r"t=0.0 must lie strictly inside"):
        C.SchrodingerBridge().conditional_score(0.0, x1[0], x0[0], x1[0])
    with pytest.raises(ValueError, match="sigma must be > 0, got sigma=0.0"):
        C.SchrodingerBridge(0.0)
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        C.Sinkhorn(-1.0)
    with pytest.raises(ValueError, match="num_iterations must be an int >= 1"):
        C.Sinkhorn(0.1, 0)
    with pytest.raises(ValueError, match="solver must be Hungarian"):
        C.MinibatchOT("hungarian")
