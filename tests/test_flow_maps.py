"""Tests for diffjax.flow_maps (MeanFlow, shortcut models, the flow-map sampler) and the mixture's flow-map oracle.

Time convention: t = 0 is noise, t = 1 is data; an average-velocity model u(s, x, t) maps the state x at time s
to X_{s→t}(x) = x + (t − s)·u(s, x, t), and u(s, x, s) = v_s(x).

References, all independent of the code under test: the closed-form flow map of Gaussian data,
X_{s→t}(x) = α_t μ + √(C_t/C_s)·(x − α_s μ) with C = α²s² + σ² (written here); the mixture's exact velocity;
the MeanFlow identity u = v + (t − s)·d/ds u and the semigroup X_{s→s+2d} = X_{s+d→s+2d}∘X_{s→s+d}, which hold
for the exact u only (negative control: the plain velocity v in place of u); central finite differences. Float64.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import diffjax as dj
from diffjax import flow_maps as fm
from diffjax.analytic import GaussianMixture


@pytest.fixture(autouse=True, scope="module")
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)
W = [0.5, 0.3, 0.2]
MU = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]
VAR = [[0.3, 0.5], [0.4, 0.2], [0.6, 0.3]]
G_MU, G_VAR = np.array([0.7, -0.4]), np.array([0.3, 0.8])


def mixture():
    return GaussianMixture(W, MU, VAR)


def gaussian():
    """N(G_MU, diag(G_VAR)) written as a 3-component mixture (same shapes as mixture(): one compiled oracle)."""
    return GaussianMixture(W, np.tile(G_MU, (3, 1)), np.tile(G_VAR, (3, 1)))


def gaussian_flow_map(path, s, t, x):
    """Closed form for N(μ, diag(s²)) data: x − α μ grows like √C along the PF-ODE."""
    mu, var = jnp.asarray(G_MU), jnp.asarray(G_VAR)
    c_s = path.alpha(s) ** 2 * var + path.sigma(s) ** 2
    c_t = path.alpha(t) ** 2 * var + path.sigma(t) ** 2
    return path.alpha(t) * mu + jnp.sqrt(c_t / c_s) * (x - path.alpha(s) * mu)


class GaussianAverageVelocity(eqx.Module):
    """The closed-form average velocity of the Gaussian data (t ≠ s only)."""

    path: dj.AbstractPath

    def __call__(self, s, x, t):
        return (gaussian_flow_map(self.path, s, t, x) - x) / (t - s)


class VelocityAsAverage(eqx.Module):
    """Negative control: u(s, x, t) = v_s(x), right at t = s only."""

    mixture: GaussianMixture
    path: dj.AbstractPath

    def __call__(self, s, x, t):
        return self.mixture.velocity(self.path, s, x)


@eqx.filter_jit
def _oracle(mix, path, s, x, t, r):
    """For a batch: the oracle's u(s, x, t), its derivative d/ds u = ∂_x u·v_s + ∂_s u along the exact velocity
    (one ``jax.jvp``), and its flow map X_{s→r}(x). One compiled program per path, called by every check below
    with the same shapes (no recompilation)."""
    u = mix.average_velocity_model(path)

    def one(s, x, t, r):
        v = mix.velocity(path, s, x)
        value, du = jax.jvp(lambda s, x: u(s, x, t), (s, x), (jnp.ones_like(s), v))
        return value, du, v, mix.flow_map(path, s, r, x)

    return jax.vmap(one)(s, x, t, r)


def _average_velocity(mix, path, s, x, t):
    return _oracle(mix, path, s, x, t, s)[0]


def _batched(model_fn, mix, path):
    """A model on batches with times of shape (n, 1) (shortcut_target broadcasts), calling ``model_fn``."""
    return lambda s, x, t: model_fn(mix, path, s[:, 0], x, t[:, 0])


@eqx.filter_jit
def _velocity(mix, path, s, x, t):
    return jax.vmap(VelocityAsAverage(mix, path))(s, x, t)


def _inputs(n=24, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.0, 0.9, n)
    t = s + rng.uniform(0.0, 1.0, n) * (1.0 - s)
    t[:3] = s[:3]  # t = s: u is the velocity
    d = rng.uniform(0.0, 0.5, n) * (1.0 - s)
    r = rng.uniform(0.0, 1.0, n)  # either side of s: forward and backward maps
    x = rng.normal(size=(n, 2)) * 2.0
    return tuple(jnp.asarray(a) for a in (s, t, x, d, r))


@pytest.fixture(scope="module", params=["linear", "cosine"])
def path(request):
    return {"linear": dj.LinearPath(), "cosine": dj.CosinePath()}[request.param]


# ---------------------------------------------------------------------------------------------------------------
# The oracle
# ---------------------------------------------------------------------------------------------------------------
def test_oracle_flow_map_matches_gaussian_closed_form(path):
    s, _, x, _, r = _inputs()
    # forward (r > s) and backward (r < s) maps; the Gaussian has the mixture's shapes: the same program
    u, _, _, got = _oracle(gaussian(), path, s, x, r, r)
    want = jax.vmap(lambda s, r, x: gaussian_flow_map(path, s, r, x))(s, r, x)
    np.testing.assert_allclose(got, want, atol=1e-8, rtol=1e-8)
    np.testing.assert_allclose(x + (r - s)[:, None] * u, want, atol=1e-8, rtol=1e-8)
    # control: the mixture's map is not the Gaussian's
    assert float(jnp.max(jnp.abs(_oracle(mixture(), path, s, x, r, r)[3] - want))) > 0.1


def test_meanflow_identity_holds_for_the_exact_average_velocity(path):
    mix = mixture()
    s, t, x, _, _ = _inputs()
    u, du, v, _ = _oracle(mix, path, s, x, t, t)
    np.testing.assert_allclose(u[:3], v[:3], atol=1e-12)  # t = s: the velocity, with no 0/0
    ident = v + (t - s)[:, None] * du - u
    assert float(jnp.max(jnp.abs(ident))) < 1e-6
    # negative control: the plain velocity violates it by (t − s)·dv/ds wherever t ≠ s
    vel = VelocityAsAverage(mix, path)
    bad = jax.jit(
        jax.vmap(lambda s, x, t: fm.meanflow_target(vel, s, x, t, vel(s, x, s)) - vel(s, x, t))
    )
    ident_bad = bad(s, x, t)
    assert float(jnp.max(jnp.abs(ident_bad))) > 1e-2
    np.testing.assert_allclose(ident_bad[:3], 0.0, atol=1e-12)  # t = s: both are v


def test_meanflow_target_against_the_gaussian_closed_form():
    """diffjax's target v + (t − s)·JVP equals u for the closed-form Gaussian average velocity and velocity."""
    path = dj.CosinePath()
    s, t, x, _, _ = _inputs()
    s, t = s[3:], t[3:]  # t > s: the closed form divides by t − s
    x = x[3:]
    mu, var = jnp.asarray(G_MU), jnp.asarray(G_VAR)

    def velocity(s, x):  # α̇μ + ½(Ċ/C)(x − αμ)
        a, sg, da, dsg = path.coefficients(s)
        c, dc = a**2 * var + sg**2, 2 * a * da * var + 2 * sg * dsg
        return da * mu + 0.5 * dc / c * (x - a * mu)

    model = GaussianAverageVelocity(path)
    f = jax.jit(
        jax.vmap(
            lambda s, x, t: fm.meanflow_target(model, s, x, t, velocity(s, x)) - model(s, x, t)
        )
    )
    assert float(jnp.max(jnp.abs(f(s, x, t)))) < 1e-9
    g = jax.jit(
        jax.vmap(
            lambda s, x, t: (
                fm.meanflow_target(model, s, x, t, 1.1 * velocity(s, x)) - model(s, x, t)
            )
        )
    )
    assert float(jnp.max(jnp.abs(g(s, x, t)))) > 1e-2  # control: a wrong tangent


def test_shortcut_self_consistency_holds_for_the_exact_average_velocity(path):
    mix = mixture()
    s, _, x, d, _ = _inputs()
    s, d = s[:, None], d[:, None]
    for fn, exact in ((_average_velocity, True), (_velocity, False)):
        model = _batched(fn, mix, path)
        residual = fm.shortcut_target(model, s, x, d) - model(s, x, s + 2 * d)
        if exact:
            assert float(jnp.max(jnp.abs(residual))) < 1e-6
        else:  # the plain velocity is not a flow map
            assert float(jnp.max(jnp.abs(residual))) > 1e-2
    # instantaneous=True: two Euler steps of the velocity
    model = _batched(_average_velocity, mix, path)
    v = _velocity(mix, path, s[:, 0], x, s[:, 0])
    euler = 0.5 * (v + _velocity(mix, path, (s + d)[:, 0], x + d * v, s[:, 0]))
    got = fm.shortcut_target(model, s, x, d, instantaneous=True)
    np.testing.assert_allclose(got, euler, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# The loss's minimum: E[δ·(u − u_tgt)] = 0 at the exact u
# ---------------------------------------------------------------------------------------------------------------
class Perturbed(eqx.Module):
    """u_b + a·δ with u_b = v + b·(u* − v) (b = 1: exact, b = 0: the velocity) and δ = u* − v."""

    exact: eqx.Module
    vel: VelocityAsAverage
    a: jax.Array
    b: jax.Array

    def __call__(self, s, x, t):
        u, v = self.exact(s, x, t), self.vel(s, x, t)
        return v + (self.b + self.a) * (u - v)


@eqx.filter_jit
def _directional_derivatives(mix, path, b, xs, keys):
    """d/da loss(MeanFlow, u_b + a·δ) at a = 0, per example: 2·E[δ·(u_b − u_tgt)] (power 0: plain MSE)."""
    objective = fm.MeanFlow(path, ratio=1.0, power=0.0)
    exact, vel = mix.average_velocity_model(path), VelocityAsAverage(mix, path)

    def one(x, key):
        return jax.grad(lambda a: fm.loss(objective, Perturbed(exact, vel, a, b), x, key))(0.0)

    return jax.vmap(one)(xs, keys)


def test_meanflow_loss_is_minimal_at_the_exact_average_velocity():
    n = 2000
    mix, path = mixture(), dj.LinearPath()
    xs = mix.sample(jax.random.key(1), n)
    keys = jax.random.split(jax.random.key(2), n)
    for b, exact in ((1.0, True), (0.0, False)):
        g = np.asarray(_directional_derivatives(mix, path, jnp.asarray(b), xs, keys))
        mean, se = g.mean(), g.std(ddof=1) / np.sqrt(n)
        if exact:
            assert abs(mean) < 4 * se, (mean, se)
        else:  # the velocity is not the minimiser: the loss decreases towards u*
            assert mean < -8 * se, (mean, se)


# ---------------------------------------------------------------------------------------------------------------
# Objectives: draws, weighting, gradients
# ---------------------------------------------------------------------------------------------------------------
def test_meanflow_draw_times():
    obj = fm.MeanFlow(ratio=0.25)
    n = 4000
    s, t = jax.jit(jax.vmap(obj.draw_times))(jax.random.split(jax.random.key(0), n))
    lo, hi = obj.t_range
    assert bool(jnp.all((s >= lo) & (s <= t) & (t <= hi)))
    frac = float(jnp.mean(t > s))
    assert abs(frac - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n)
    # s is the smaller of two logit-normal(-0.4, 1) draws in the paper's time 1 − t: P(s ≤ q) = 1 − (1 − F(q))²
    q = 0.5
    f = float(obj.time_sampler.cdf(q, obj.path))
    p = 1.0 - (1.0 - f) ** 2
    assert abs(float(jnp.mean(s <= q)) - p) < 4 * np.sqrt(p * (1 - p) / n)


def test_shortcut_draw_step_is_on_the_dyadic_grid():
    obj = fm.Shortcut(dj.VPPath(), num_steps=8)
    lo, hi = obj.path.t_min, obj.path.t_max
    s, d, finest = jax.jit(jax.vmap(obj.draw_step))(jax.random.split(jax.random.key(0), 3000))
    s, d, finest = map(np.asarray, (s, d, finest))
    steps = (hi - lo) / (2 * d)  # 1, 2, 4 grid cells: levels 0..2
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-9)
    assert set(np.round(steps).astype(int)) == {1, 2, 4}
    j = (s - lo) / (2 * d)
    np.testing.assert_allclose(j, np.round(j), atol=1e-9)
    assert np.all(s + 2 * d <= hi + 1e-12) and np.all(s >= lo)
    np.testing.assert_array_equal(finest, np.isclose(d, (hi - lo) / 8))


def _small_mlp(seed=0):
    model = dj.nn.FlowMapMLP(
        2, hidden=8, depth=1, time_dim=4, zero_init_output=False, rngs=nnx.Rngs(seed)
    )
    return dj.nn.split(model)


XS = np.random.default_rng(3).normal(size=(16, 2))


def test_adaptive_weight_divides_the_plain_loss():
    apply, params = _small_mlp()
    xs, key = jnp.asarray(XS), jax.random.key(4)

    @jax.jit
    def value_and_grad(power, c):
        obj = fm.MeanFlow(ratio=1.0, power=power, c=c)  # numbers are leaves: one program for both
        return jax.value_and_grad(
            lambda p: fm.loss(obj, lambda s, x, t: apply(p, s, x, t), xs[0], key)
        )(params)

    l0, g0 = value_and_grad(0.0, 1e-3)
    lp, gp = value_and_grad(0.75, 0.1)  # the same draws: power and c are not drawn
    w = (float(l0) + 0.1) ** 0.75
    np.testing.assert_allclose(float(lp), float(l0) / w, rtol=1e-12)
    np.testing.assert_allclose(ravel_pytree(gp)[0], ravel_pytree(g0)[0] / w, rtol=1e-10, atol=1e-14)


class FrozenTarget(eqx.Module):
    """f_θ's value with f_θ0's derivatives in (s, x) (and, where t = s, f_θ0 itself): the objectives' targets no
    longer depend on θ, so the loss is an ordinary function of θ whose finite differences are the gradient that
    the stop-gradient defines at θ = θ0."""

    apply: dj.nn.Apply
    params: object
    params0: object
    freeze_t_equal_s: bool = eqx.field(static=True)

    def __call__(self, s, x, t):
        sg = jax.lax.stop_gradient
        f = self.apply(self.params, sg(s), sg(x), t)
        f = f + self.apply(self.params0, s, x, t) - self.apply(self.params0, sg(s), sg(x), t)
        if self.freeze_t_equal_s:
            f = jnp.where(t > s, f, self.apply(self.params0, s, x, t))
        return f


@pytest.mark.parametrize(
    "objective, freeze, stopped",
    [
        (fm.MeanFlow(ratio=1.0, power=0.0), False, True),
        # M = 2: the prediction has t − s = 1, the target's half steps query t = s
        (fm.Shortcut(num_steps=2, consistency_fraction=1.0), True, True),
        (
            fm.Shortcut(num_steps=2, consistency_fraction=0.0),
            False,
            False,
        ),  # flow matching: no target to stop
    ],
)
def test_loss_gradient_matches_finite_differences(objective, freeze, stopped):
    apply, params = _small_mlp()
    flat, unravel = ravel_pytree(params)
    xs, key = jnp.asarray(XS), jax.random.key(5)
    direction = jax.random.normal(jax.random.key(6), flat.shape, flat.dtype)
    h = 1e-5

    def frozen_loss(theta):
        return fm.batch_loss(
            objective, FrozenTarget(apply, unravel(theta), params, freeze), xs, key
        )

    def plain_loss(theta):
        return fm.batch_loss(objective, lambda s, x, t: apply(unravel(theta), s, x, t), xs, key)

    @jax.jit
    def derivatives(theta):
        def central(f):
            return (f(theta + h * direction) - f(theta - h * direction)) / (2 * h)

        return jax.grad(plain_loss)(theta) @ direction, central(frozen_loss), central(plain_loss)

    grad, fd, fd_plain = (float(v) for v in derivatives(flat))
    np.testing.assert_allclose(grad, fd, rtol=1e-6)
    if stopped:  # the control: differencing the loss itself also moves the stopped target
        assert abs(fd_plain - grad) > 1e-3 * abs(grad)
    else:
        np.testing.assert_allclose(grad, fd_plain, rtol=1e-6)


def test_train_step_runs_with_the_flow_map_loss():
    apply, params = _small_mlp()
    config = dj.train.TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10)
    step = dj.train.make_train_step(
        apply,
        fm.MeanFlow(),
        dj.train.make_optimizer(config),
        0.9,
        loss_fn=fm.batch_loss,
        donate=False,
    )
    state = dj.train.init_state(params, dj.train.make_optimizer(config), jax.random.key(0))
    new, metrics = step(state, jnp.asarray(XS))
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert float(jnp.max(jnp.abs(ravel_pytree(new.params)[0] - ravel_pytree(params)[0]))) > 0


# ---------------------------------------------------------------------------------------------------------------
# Sampler
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_steps", [1, 3])
def test_sampler_with_exact_average_velocity_reaches_the_exact_endpoint(num_steps):
    path = dj.CosinePath()
    x0 = jnp.array([0.4, -1.3])
    res = fm.sample_flow_map(
        GaussianAverageVelocity(path), path, jax.random.key(0), num_steps=num_steps, x0=x0,
        save_trajectory=True,
    )  # fmt: skip
    np.testing.assert_allclose(res.samples, gaussian_flow_map(path, 0.0, 1.0, x0), atol=1e-12)
    ts = np.linspace(0.0, 1.0, num_steps + 1)
    np.testing.assert_allclose(res.ts, ts, atol=1e-15)
    chain = jnp.stack([gaussian_flow_map(path, 0.0, t, x0) if t > 0 else x0 for t in ts])
    np.testing.assert_allclose(res.trajectory, chain, atol=1e-12)
    assert int(res.nfe) == num_steps == int(res.num_steps) and int(res.status) == 0


def test_sampler_plain_velocity_is_euler():
    path, mix = dj.LinearPath(), mixture()
    x0 = jnp.array([0.2, 0.1])
    res = fm.sample_flow_map(
        VelocityAsAverage(mix, path), path, jax.random.key(0), num_steps=2, x0=x0
    )
    x = x0 + 0.5 * mix.velocity(path, 0.0, x0)
    x = x + 0.5 * mix.velocity(path, 0.5, x)
    np.testing.assert_allclose(res.samples, x, atol=1e-14)


class CountingModel(eqx.Module):
    scale: jax.Array

    def __call__(self, s, x, t):
        CountingModel.traces += 1
        return self.scale * (x + t - s)


CountingModel.traces = 0


def test_sampler_vmap_jit_and_no_recompile():
    path = dj.VPPath()
    keys = jax.random.split(jax.random.key(0), 4)
    m1, m2 = CountingModel(jnp.asarray(0.5)), CountingModel(jnp.asarray(-0.25))
    batch = jax.vmap(lambda k: fm.sample_flow_map(m1, path, k, num_steps=2, shape=(2,)))(keys)
    assert batch.samples.shape == (4, 2) and batch.nfe.shape == (4,)
    one = [fm.sample_flow_map(m1, path, k, num_steps=2, shape=(2,)).samples for k in keys]
    np.testing.assert_allclose(batch.samples, jnp.stack(one), atol=1e-14)
    before = CountingModel.traces
    a = fm.sample_flow_map(m1, path, keys[0], num_steps=2, shape=(2,))
    b = fm.sample_flow_map(m2, path, keys[0], num_steps=2, shape=(2,))
    assert (
        CountingModel.traces == before
    )  # new parameters, same shapes: the compiled program is reused
    assert not np.allclose(a.samples, b.samples)
    inside = jax.jit(lambda m, k: fm.sample_flow_map(m, path, k, num_steps=2, shape=(2,)).samples)
    np.testing.assert_allclose(inside(m2, keys[0]), b.samples, atol=1e-14)


def test_sampler_default_interval_and_prior():
    path, m = dj.VPPath(), CountingModel(jnp.asarray(0.0))  # u = 0: the sample is x0
    res = fm.sample_flow_map(
        m, path, jax.random.key(3), num_steps=3, shape=(2,), save_trajectory=True
    )
    np.testing.assert_allclose(np.asarray(res.ts)[[0, -1]], [path.t_min, path.t_max], atol=1e-15)
    np.testing.assert_allclose(res.samples, res.trajectory[0], atol=0)


def test_sampler_bad_inputs():
    path, m = dj.LinearPath(), CountingModel(jnp.asarray(1.0))
    key = jax.random.key(0)
    for n in (0, -1, 1.5, True, None, jnp.asarray(2)):
        with pytest.raises(ValueError, match="num_steps must be a Python int >= 1"):
            fm.sample_flow_map(m, path, key, num_steps=n, shape=(2,))
    with pytest.raises(ValueError, match=r"x0 has shape \(2,\) but shape=\(3,\)"):
        fm.sample_flow_map(m, path, key, num_steps=1, shape=(3,), x0=jnp.zeros(2))
    with pytest.raises(ValueError, match="pass shape"):
        fm.sample_flow_map(m, path, key, num_steps=1)
    with pytest.raises(ValueError, match=r"returned shape \(3,\) for x of shape \(2,\)"):
        fm.sample_flow_map(lambda s, x, t: jnp.zeros(3), path, key, num_steps=1, shape=(2,))
    with pytest.raises(ValueError, match="t0 < t1"):
        fm.sample_flow_map(m, path, key, num_steps=1, shape=(2,), t0=0.7, t1=0.2)
    with pytest.raises(ValueError, match="path must be a diffjax path"):
        fm.sample_flow_map(m, "linear", key, num_steps=1, shape=(2,))
    bad = jnp.array([jnp.nan, 0.0])
    with pytest.raises(RUNTIME_ERRORS, match="x0 holds NaN"):
        fm.sample_flow_map(m, path, key, num_steps=1, x0=bad)
    res = fm.sample_flow_map(m, path, key, num_steps=1, x0=bad, throw=False)
    assert int(res.status) == dj.solve.NONFINITE_INPUT and bool(jnp.all(jnp.isnan(res.samples)))


def test_objective_bad_inputs():
    for kwargs, match in [
        (dict(ratio=1.5), "ratio"),
        (dict(power=-1.0), "power"),
        (dict(power=1.0, c=0.0), "c must be > 0"),
        (dict(path="linear"), "path must be a diffjax path"),
        (dict(time_sampler="logit_normal"), "time_sampler"),
        (dict(margin=0.6), "margin"),
    ]:
        with pytest.raises(ValueError, match=match):
            fm.MeanFlow(**kwargs)
    for n in (1, 3, 12, 2.0, True):
        with pytest.raises(ValueError, match="power of two"):
            fm.Shortcut(num_steps=n)
    with pytest.raises(ValueError, match="consistency_fraction"):
        fm.Shortcut(consistency_fraction=1.5)
    key, x = jax.random.key(0), jnp.zeros(2)
    # (traced only, with jax.eval_shape: the errors come at trace time, before anything runs)
    with pytest.raises(ValueError, match="flow-map objective"):
        fm.loss(dj.flow_matching(), lambda s, x, t: x, x, key)
    with pytest.raises(ValueError, match=r"returned shape \(3,\)"):
        jax.eval_shape(lambda: fm.loss(fm.MeanFlow(), lambda s, x, t: jnp.zeros(3), x, key))
    with pytest.raises(ValueError, match=r"returned shape \(3,\)"):
        jax.eval_shape(
            lambda: fm.batch_loss(
                fm.Shortcut(num_steps=4), lambda s, x, t: jnp.zeros(3), jnp.zeros((4, 2)), key
            )
        )


def test_flow_map_mlp():
    model = dj.nn.FlowMapMLP(3, hidden=8, depth=2, time_dim=4, rngs=nnx.Rngs(0))
    x = jnp.ones(3)
    assert model(0.1, x, 0.6).shape == (3,)
    np.testing.assert_array_equal(model(0.1, x, 0.6), 0.0)  # zero-initialised output layer
    with pytest.raises(ValueError, match="x must have shape"):
        model(0.1, jnp.ones(2), 0.6)
    # the two times are separate inputs: changing only t changes the output of a trained-looking net
    model = dj.nn.FlowMapMLP(
        3, hidden=8, depth=2, time_dim=4, zero_init_output=False, rngs=nnx.Rngs(0)
    )
    assert not np.allclose(model(0.1, x, 0.6), model(0.1, x, 0.9))
    assert not np.allclose(model(0.1, x, 0.6), model(0.3, x, 0.6))


def test_public_names():
    for name in fm.__all__:
        assert hasattr(fm, name), name
    assert dj.sample_flow_map is fm.sample_flow_map and dj.MeanFlow is fm.MeanFlow
    assert dj.Shortcut is fm.Shortcut and dj.flow_maps is fm
    assert dj.nn.FlowMapMLP is not None and dj.analytic.AverageVelocityModel is not None
