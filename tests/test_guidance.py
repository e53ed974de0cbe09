"""Conditioning and guidance against the Gaussian-mixture oracle, written out independently in numpy and scipy.

t = 0 is noise, t = 1 is data. Classes are the mixture's components: p(x | c) is one Gaussian, p(x) the mixture,
and the guided field of the exact models is u_∅ + w(u_c − u_∅) with closed-form velocities.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.integrate import solve_ivp

import diffjax as dj
from diffjax import guidance as G

PATH = dj.LinearPath()  # α = t, σ = 1 − t
W2 = np.array([0.3, 0.7])
M2 = np.array([[-1.5, 0.5], [1.5, -0.5]])
V2 = np.array([[0.3, 0.2], [0.25, 0.4]])


def np_velocity(t, x, w, m, v):
    """Mixture velocity on the linear path, written out: Σ_k r_k (μ_k + ½ Ċ_k/C_k (x − tμ_k))."""
    a, s = t, 1.0 - t
    c = a * a * v + s * s
    dc = 2 * a * v - 2 * s
    logj = np.log(w) - 0.5 * np.sum((x - a * m) ** 2 / c + np.log(2 * np.pi * c), axis=-1)
    r = np.exp(logj - logj.max())
    r /= r.sum()
    return r @ (m + 0.5 * dc / c * (x - a * m))


def np_log_prob(x, w, m, v):
    logj = np.log(w) - 0.5 * np.sum((x - m) ** 2 / v + np.log(2 * np.pi * v), axis=-1)
    return np.log(np.sum(np.exp(logj - logj.max()))) + logj.max()


@pytest.fixture(scope="module")
def oracle():
    gm = dj.GaussianMixture(W2, M2, V2)
    return gm, gm.conditional_model("velocity", PATH)


def test_oracle_class_conditionals_are_closed_form(oracle):
    gm, cm = oracle
    x = np.array([0.4, -0.2])
    for c in (0, 1):
        sub = (np.ones(1), M2[c : c + 1], V2[c : c + 1])
        np.testing.assert_allclose(
            gm.conditional(c).log_prob(jnp.asarray(x)), np_log_prob(x, *sub), rtol=1e-5
        )
        for t in (0.0, 0.3, 0.9):
            np.testing.assert_allclose(
                cm(t, jnp.asarray(x), c), np_velocity(t, x, *sub), rtol=1e-4, atol=1e-5
            )
    # the null label (2 = number of classes) is the unconditional mixture
    np.testing.assert_allclose(
        cm(0.3, jnp.asarray(x), 2), np_velocity(0.3, x, W2, M2, V2), rtol=1e-4, atol=1e-5
    )


def _guided_np(t, x, w):
    u0 = np_velocity(t, x, W2, M2, V2)
    u1 = np_velocity(t, x, np.ones(1), M2[1:], V2[1:])
    return u0 + w * (u1 - u0)


@pytest.mark.parametrize("space", ["velocity", "eps", "data", "v", "score"])
def test_cfg_field_is_the_closed_form_in_every_space(oracle, space):
    """CFG is affine with weights summing to 1, so it is one field whatever the space (exact conversions)."""
    _, cm = oracle
    kind = "eps" if space == "velocity" else "velocity"  # a model of another kind than the space
    model = oracle[0].conditional_model(kind, PATH)
    g = dj.CFGModel(model, kind, PATH, cond=1, null=2, guidance=dj.CFG(3.0), space=space)
    u = dj.velocity_field(g, kind, PATH)
    for t in (0.2, 0.5, 0.8):
        x = np.array([0.3, -0.4])
        np.testing.assert_allclose(
            u(t, jnp.asarray(x)), _guided_np(t, x, 3.0), rtol=2e-4, atol=2e-4
        )


def test_apg_reduces_to_cfg_and_differs_otherwise(oracle):
    _, cm = oracle
    x, t = jnp.array([0.3, -0.4]), 0.5
    cfg_u = dj.velocity_field(
        dj.CFGModel(cm, "velocity", PATH, 1, 2, dj.CFG(3.0)), "velocity", PATH
    )
    full = dj.CFGModel(cm, "velocity", PATH, 1, 2, dj.APG(3.0, parallel=1.0))  # η = 1, r = ∞: CFG
    assert full.space == dj.Data()
    np.testing.assert_allclose(
        dj.velocity_field(full, "velocity", PATH)(t, x), cfg_u(t, x), rtol=1e-4, atol=1e-5
    )
    proj = dj.velocity_field(dj.CFGModel(cm, "velocity", PATH, 1, 2, dj.APG(3.0)), "velocity", PATH)
    assert (
        np.max(np.abs(proj(t, x) - cfg_u(t, x))) > 1e-2
    )  # negative control: the projection changes the field
    # the norm cap: ‖Δ‖ capped at r
    g, m = jnp.array([0.0, 0.0]), jnp.array([3.0, 4.0])
    np.testing.assert_allclose(
        G.apg(g, m, 2.0, parallel=1.0, norm_threshold=1.0), m + m / 5.0, rtol=1e-6
    )


def test_interval_applies_guidance_only_inside(oracle):
    _, cm = oracle
    rule = dj.TimeInterval(dj.CFG(4.0), 0.3, 0.6)
    u = dj.velocity_field(dj.CFGModel(cm, "velocity", PATH, 1, 2, rule), "velocity", PATH)
    x = np.array([0.3, -0.4])
    np.testing.assert_allclose(
        u(0.45, jnp.asarray(x)), _guided_np(0.45, x, 4.0), rtol=2e-4, atol=2e-4
    )
    np.testing.assert_allclose(
        u(0.8, jnp.asarray(x)), _guided_np(0.8, x, 1.0), rtol=2e-4, atol=2e-4
    )
    lam = dj.LogSNRInterval(dj.CFG(4.0), PATH.log_snr(0.3), PATH.log_snr(0.6))
    u2 = dj.velocity_field(dj.CFGModel(cm, "velocity", PATH, 1, 2, lam), "velocity", PATH)
    for t in (0.45, 0.8, 0.1):
        np.testing.assert_allclose(
            u2(t, jnp.asarray(x)), u(t, jnp.asarray(x)), rtol=1e-5, atol=1e-6
        )
    s = dj.LogSNRInterval.from_sigma(dj.CFG(2.0), 0.28, 5.42)
    np.testing.assert_allclose([s.low, s.high], [-2 * np.log(5.42), -2 * np.log(0.28)])


@pytest.fixture(scope="module")
def guided_loglik(oracle):
    """log p of one x under the CFG field of weight w at class c (one program for every w and c)."""
    _, cm = oracle

    @eqx.filter_jit
    def f(model, x, c, w):
        g = dj.CFGModel(model, "velocity", PATH, c, jnp.asarray(2), dj.CFG(w))
        return jax.vmap(
            lambda xi: dj.log_likelihood(dj.velocity_field(g, "velocity", PATH), PATH, xi)
        )(x)

    return functools.partial(f, cm)


def test_guided_likelihood_at_w0_and_w1_is_exact(oracle, guided_loglik):
    gm, _ = oracle
    x = np.asarray(gm.sample(jax.random.key(0), 12))
    exact_c = np.array([np_log_prob(xi, np.ones(1), M2[1:], V2[1:]) for xi in x])
    exact = np.array([np_log_prob(xi, W2, M2, V2) for xi in x])
    ll1 = np.asarray(guided_loglik(jnp.asarray(x), jnp.asarray(1), jnp.asarray(1.0)))
    ll0 = np.asarray(guided_loglik(jnp.asarray(x), jnp.asarray(1), jnp.asarray(0.0)))
    assert np.max(np.abs(ll1 - exact_c)) < 1e-4
    assert np.max(np.abs(ll0 - exact)) < 1e-4
    assert np.max(np.abs(ll1 - exact)) > 0.1  # negative control: p(x | c) is not p(x)


def test_guided_likelihood_is_the_density_of_the_guided_flow():
    """1-D: the guided ODE's push-forward density from scipy (x1 = flow(x0), p = N(x0)/|dx1/dx0|) equals
    log_likelihood of the guided field; it is neither p(x | c) nor p(x|c)^w p(x)^(1−w) normalised."""
    w_, m_, v_ = np.array([0.5, 0.5]), np.array([[-1.0], [1.0]]), np.array([[0.25], [0.25]])
    gm = dj.GaussianMixture(w_, m_, v_)
    cm = gm.conditional_model("velocity", PATH)
    w = 3.0

    def u(t, x):
        u0 = np_velocity(t, x, w_, m_, v_)
        return u0 + w * (np_velocity(t, x, np.ones(1), m_[1:], v_[1:]) - u0)

    def flow(x0):
        return solve_ivp(lambda t, x: u(t, x), (0.0, 1.0), [x0], rtol=1e-10, atol=1e-10).y[0, -1]

    x0s, h = np.array([-0.8, 0.0, 0.6, 1.2]), 1e-4
    x1s = np.array([flow(x0) for x0 in x0s])
    jac = np.array([(flow(x0 + h) - flow(x0 - h)) / (2 * h) for x0 in x0s])
    expected = -0.5 * x0s**2 - 0.5 * np.log(2 * np.pi) - np.log(jac)
    g = dj.CFGModel(cm, "velocity", PATH, 1, 2, dj.CFG(w))
    ll = jax.vmap(lambda x: dj.log_likelihood(dj.velocity_field(g, "velocity", PATH), PATH, x))(
        jnp.asarray(x1s[:, None], jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(ll), expected, atol=2e-4)
    exact_c = np.array([np_log_prob(np.array([x]), np.ones(1), m_[1:], v_[1:]) for x in x1s])
    assert np.max(np.abs(np.asarray(ll) - exact_c)) > 0.05  # the guided density is another density


def test_guided_samples_move_away_from_the_other_class():
    """Two overlapping 1-D classes at ±1: w = 1 samples p(x | +) (mean 1, var 0.25); w = 4 pushes them past
    the class mean, away from the other class, and makes them no wider."""
    gm = dj.GaussianMixture([0.5, 0.5], [[-1.0], [1.0]], [0.25, 0.25])
    cm = gm.conditional_model("velocity", PATH)
    x0 = jax.random.normal(jax.random.key(3), (2000, 1))

    @jax.jit
    def samples(w):
        u = dj.velocity_field(dj.CFGModel(cm, "velocity", PATH, 1, 2, dj.CFG(w)), "velocity", PATH)
        return jax.vmap(
            lambda z: dj.sample_ode(u, PATH, jax.random.key(0), x0=z, num_steps=32).samples
        )(x0)

    s1, s4 = np.asarray(samples(1.0))[:, 0], np.asarray(samples(4.0))[:, 0]
    se = 0.5 / np.sqrt(len(s1))
    assert abs(s1.mean() - 1.0) < 4 * se and abs(s1.var() - 0.25) < 0.03
    assert s4.mean() > 1.0 + 6 * se and s4.std() <= s1.std() * 1.02


def test_guidance_functions_under_jit_vmap_grad():
    key = jax.random.split(jax.random.key(0), 2)
    g, m = jax.random.normal(key[0], (5, 3)), jax.random.normal(key[1], (5, 3))
    traces = []

    @jax.jit
    def f(g, m, w):
        traces.append(1)
        return jax.vmap(lambda a, b: jnp.sum(G.apg(a, b, w, 0.5, 2.0) ** 2))(g, m)

    f(g, m, 2.0)
    f(g, m, 3.0)
    assert len(traces) == 1  # a new weight is an argument, not a recompilation
    for fn in (
        lambda a: jnp.sum(G.apg(a, m[0], 2.5, 0.3, 1.5) ** 2),
        lambda a: jnp.sum(G.cfg(a, m[0], 2.5) ** 3),
    ):
        a0 = np.asarray(g[0], np.float64)
        grad = np.asarray(jax.grad(fn)(g[0]))
        fd = [(fn(jnp.asarray(a0 + e)) - fn(jnp.asarray(a0 - e))) / 2e-3 for e in 1e-3 * np.eye(3)]
        np.testing.assert_allclose(grad, np.asarray(fd), rtol=2e-2, atol=2e-2)


def test_condition_dropout_frequency():
    d = dj.ClassDropout(10, 0.25)
    keys = jax.random.split(jax.random.key(1), 8000)
    out = np.asarray(jax.vmap(d)(keys, jnp.full(8000, 3)))
    frac = np.mean(out == 10)
    assert set(np.unique(out)) == {3, 10}
    assert abs(frac - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 8000)
    assert np.all(np.asarray(jax.vmap(dj.ClassDropout(10, 0.0))(keys, jnp.full(8000, 3))) == 3)


def test_conditional_batch_loss_matches_per_example_losses():
    """p = 0: example i's loss is loss(Conditioned(fn, c_i)) at the batch_loss keys; p = 1: every example sees ∅."""
    obj = dj.flow_matching(PATH)

    def fn(t, x, c):
        return x * (1.0 + c) + t

    xs = jax.random.normal(jax.random.key(2), (6, 2))
    cs = jnp.array([0, 1, 2, 3, 0, 1])
    key = jax.random.key(5)
    keys = jax.random.split(key, 6)
    want0 = np.mean(
        [dj.losses.loss(obj, dj.Conditioned(fn, c), x, k) for x, c, k in zip(xs, cs, keys)]
    )
    want1 = np.mean([dj.losses.loss(obj, dj.Conditioned(fn, 4), x, k) for x, k in zip(xs, keys)])
    for p, want in ((0.0, want0), (1.0, want1)):
        got = jax.jit(
            lambda xs, cs, p=p: dj.conditional_batch_loss(
                obj, fn, (xs, cs), key, dropout=dj.ClassDropout(4, p)
            )
        )(xs, cs)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(want0 - want1) > 1e-2


def test_bad_conditions_and_guidance_arguments():
    obj = dj.flow_matching(PATH)
    xs = jnp.zeros((3, 2))
    drop = dj.ClassDropout(4, 0.1)
    fn = lambda t, x, c: x * c  # noqa: E731 (uses c: an unused label would be dead code, its check too)
    with pytest.raises(ValueError, match="batch labels=7 is not a class label"):
        dj.conditional_batch_loss(
            obj, fn, (xs, jnp.array([0, 7, 1])), jax.random.key(0), dropout=drop
        )
    with pytest.raises(Exception, match="outside 0..4"):
        jax.jit(
            lambda c: dj.conditional_batch_loss(obj, fn, (xs, c), jax.random.key(0), dropout=drop)
        )(jnp.array([0, 9, 1])).block_until_ready()
    with pytest.raises(ValueError, match="first axis"):
        dj.conditional_batch_loss(obj, fn, (xs, jnp.array([0, 1])), jax.random.key(0), dropout=drop)
    with pytest.raises(ValueError, match="integer class labels"):
        dj.conditional_batch_loss(
            obj, fn, (xs, jnp.array([0.0, 1.0, 2.0])), jax.random.key(0), dropout=drop
        )
    with pytest.raises(ValueError, match=r"probability=1.5"):
        dj.ClassDropout(4, 1.5)
    with pytest.raises(ValueError, match="finite"):
        dj.CFG(float("nan"))
    with pytest.raises(ValueError, match="low < high"):
        dj.TimeInterval(dj.CFG(2.0), 0.7, 0.2)
    with pytest.raises(ValueError, match="parallel"):
        dj.APG(2.0, parallel=-1.0)
    with pytest.raises(ValueError, match="shape"):
        dj.CFGModel(fn, "velocity", PATH, jnp.array([1, 2]), jnp.asarray(4), dj.CFG(2.0))
    with pytest.raises(ValueError, match="guidance must be a rule"):
        dj.CFGModel(fn, "velocity", PATH, 1, 4, "strong")


def test_networks_take_a_class_label():
    mlp = dj.nn.MLP(2, 16, 2, num_classes=3, zero_init_output=False, rngs=nnx.Rngs(0))
    x = jnp.array([0.1, -0.2])
    outs = [np.asarray(mlp(0.5, x, c)) for c in range(4)]
    assert min(np.abs(a - b).max() for i, a in enumerate(outs) for b in outs[i + 1 :]) > 1e-4
    with pytest.raises(ValueError, match=r"c=5 is not a class label.*0..3 \(3 is the null label\)"):
        mlp(0.5, x, 5)
    with pytest.raises(ValueError, match="needs a class label"):
        mlp(0.5, x)
    with pytest.raises(ValueError, match="unconditional"):
        dj.nn.MLP(2, 8, 1, rngs=nnx.Rngs(0))(0.5, x, 1)
    unet = dj.nn.UNet(1, 8, (1, 2), num_classes=10, rngs=nnx.Rngs(0))
    apply, params = dj.nn.split(mlp)
    y = jax.vmap(lambda x, c: apply(params, 0.5, x, c))(jnp.stack([x, x]), jnp.array([0, 3]))
    np.testing.assert_allclose(y, np.stack([outs[0], outs[3]]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="must be one integer"):
        unet(0.5, jnp.ones((8, 8, 1)), jnp.array([1, 2]))


def test_autoguidance_is_the_closed_form_with_a_weaker_guide(oracle):
    """Autoguidance: main = the exact class-1 model, guide = a 'bad version' (the class-1 Gaussian with doubled
    variances); the guided velocity is u_guide + w(u_main − u_guide), written out in numpy."""
    gm, cm = oracle
    weak = dj.GaussianMixture(W2, M2, 2 * V2).conditional_model("velocity", PATH)
    g = dj.AutoguidedModel(cm, weak, "velocity", PATH, 2.5, cond=1)
    u = dj.velocity_field(g, "velocity", PATH)
    for t in (0.3, 0.7):
        x = np.array([0.2, 0.1])
        main = np_velocity(t, x, np.ones(1), M2[1:], V2[1:])
        guide = np_velocity(t, x, np.ones(1), M2[1:], 2 * V2[1:])
        np.testing.assert_allclose(
            u(t, jnp.asarray(x)), guide + 2.5 * (main - guide), rtol=2e-4, atol=2e-4
        )
