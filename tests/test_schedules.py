"""Learned noise schedules (diffjax.schedules). t = 0 is noise, t = 1 is data; λ_t increases in t."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from diffjax import losses, schedules, vlb
from diffjax.analytic import GaussianMixture, gaussian_elbo
from diffjax.fields import velocity_field
from diffjax.likelihood import log_likelihood
from diffjax.paths import CosinePath, LogSNRPath
from diffjax.sampling import sample_ode


def _randomise(schedule, key, scale=3.0):
    """The same schedule with every raw parameter drawn from N(0, scale²) (ends kept ordered by construction)."""
    leaves, treedef = jax.tree.flatten(schedule)
    keys = jax.random.split(key, len(leaves))
    new = [scale * jax.random.normal(k, jnp.shape(v), v.dtype) for k, v in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, new)


def _schedules(key, hidden=16):
    return [
        schedules.LearnedLinear(-6.0, 9.0),
        schedules.MonotoneNet(key, -6.0, 9.0, hidden=hidden),
    ]


def test_monotone_for_random_parameters(x64):
    ts = jnp.linspace(0.0, 1.0, 1025)
    for seed in range(4):
        for s in _schedules(jax.random.key(seed)):
            s = _randomise(s, jax.random.key(100 + seed))
            path = s.path
            lam = jax.vmap(path.log_snr)(ts)
            assert bool(jnp.all(jnp.diff(lam) > 0)), type(s).__name__
            assert bool(jnp.all(jax.vmap(path.d_log_snr)(ts) > 0))
            assert float(s.lam_max) > float(s.lam_min)
            np.testing.assert_allclose(lam[0], s.lam_min, rtol=0, atol=1e-12)
            np.testing.assert_allclose(lam[-1], s.lam_max, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="lam_min < lam_max"):
        schedules.LearnedLinear(3.0, 1.0)
    with pytest.raises(ValueError, match="hidden"):
        schedules.MonotoneNet(jax.random.key(0), hidden=0)


def test_pytree_no_recompile_and_grad():
    a, b = (schedules.MonotoneNet(jax.random.key(i), hidden=8) for i in range(2))
    pa, pb = a.path, b.path
    assert isinstance(pa, LogSNRPath) and pa.fn is schedules.schedule_log_snr
    assert jax.tree.structure(pa) == jax.tree.structure(pb)
    assert len(jax.tree.leaves(pa)) == len(jax.tree.leaves(a)) == 7
    traces = []

    @jax.jit
    def f(schedule):
        traces.append(1)
        p = schedule.path
        return p.log_snr(0.3) + p.d_log_snr(0.3) + p.alpha(0.3) + p.t_from_log_snr(1.0)

    for s in (a, b, _randomise(a, jax.random.key(5), 1.0), schedules.LearnedLinear()):
        jax.block_until_ready(f(s))
    assert (
        len(traces) == 2
    )  # one per structure (MonotoneNet, LearnedLinear), none per parameter value
    g = jax.grad(f)(a)
    for name in ("lam_min", "raw_gap", "w1", "b1", "w2", "b2", "w3"):
        assert float(jnp.max(jnp.abs(getattr(g, name)))) > 0, name


def _fd_check(fn, schedule, h=1e-6, seed=0):
    """Max relative error of the directional derivatives ∇fn·v against central differences (two random v)."""
    flat, unravel = ravel_pytree(schedule)
    f = lambda p: fn(unravel(p))  # noqa: E731
    vs = jax.random.normal(jax.random.key(seed), (2, flat.shape[0]), flat.dtype)
    vs = vs / jnp.linalg.norm(vs, axis=1, keepdims=True)
    grad, values = jax.jit(lambda p, q: (jax.grad(f)(p), jax.vmap(f)(q)))(
        flat, jnp.concatenate([flat + h * vs, flat - h * vs])
    )
    fd = (values[:2] - values[2:]) / (2 * h)
    return float(jnp.max(jnp.abs(vs @ grad - fd) / (1e-6 + jnp.abs(fd))))


def test_gradients_against_finite_differences(x64):
    mix = GaussianMixture([0.3, 0.7], [[-0.6, 0.2], [0.5, -0.4]], [0.05, 0.1])
    x = jnp.asarray([0.4, -0.3])
    key = jax.random.key(3)
    worst = {}
    for s in _schedules(jax.random.key(1), hidden=8):
        s = _randomise(s, jax.random.key(2), 1.0)
        lam_mid = 0.5 * (float(s.lam_min) + float(s.lam_max))
        checks = {
            "log_snr": lambda q: q.path.log_snr(0.37),
            "d_log_snr": lambda q: q.path.d_log_snr(0.37),
            "alpha": lambda q: q.path.alpha(0.61),
            "sigma": lambda q: q.path.sigma(0.61),
            "t_from_log_snr": lambda q: q.path.t_from_log_snr(lam_mid),
        }
        if isinstance(s, schedules.LearnedLinear):
            samplers = ()  # the same code as MonotoneNet's below; kept short for the test's run time
        else:
            samplers = ("importance", "stratified")
        for sampler in samplers:
            checks[f"elbo_{sampler}"] = lambda q, sampler=sampler: (
                vlb.elbo(
                    mix.model("eps", q.path), "eps", q.path, x, key, num_samples=8, sampler=sampler
                ).elbo
            )
        if samplers:
            checks["vdm_loss_sq"] = lambda q: schedules.vdm_losses(
                mix.model("eps", q.path), "eps", q.path, jnp.stack([x, -x]), key
            )[1]
        for name, fn in checks.items():
            err = _fd_check(fn, s)
            worst[f"{type(s).__name__}.{name}"] = err
            assert err < 1e-6, (type(s).__name__, name, err)
    print("max relative FD errors:", {k: f"{v:.1e}" for k, v in worst.items()})


def test_usable_everywhere(x64):
    mix = GaussianMixture([0.4, 0.6], [[-0.8, 0.3], [0.6, -0.2]], [0.04, 0.09])
    s = _randomise(
        schedules.MonotoneNet(jax.random.key(0), -8.0, 10.0, hidden=8), jax.random.key(9), 1.0
    )
    s = eqx.tree_at(lambda q: (q.lam_min, q.raw_gap), s, (jnp.asarray(-8.0), jnp.asarray(18.0)))
    xs = mix.sample(jax.random.key(1), 2)

    @jax.jit
    def run(schedule, key):
        path = schedule.path
        model = mix.model("eps", path)
        v = velocity_field(mix.model("velocity", path), "velocity", path)
        sample = sample_ode(v, path, key, shape=(2,), rtol=1e-6, atol=1e-6).samples
        prior = lambda z: mix.marginal_log_prob(path, 0.0, z)  # noqa: E731 (λ(0) = −8: N(0, I) is off by ~1e-3)
        ll = jax.vmap(
            lambda x: log_likelihood(v, path, x, rtol=1e-9, atol=1e-9, prior_log_prob=prior)
        )(xs)
        exact = jax.vmap(lambda x: mix.marginal_log_prob(path, 1.0, x))(xs)
        e = jax.vmap(lambda x: vlb.elbo(model, "eps", path, x, key, num_samples=8).elbo)(xs)
        bl = losses.batch_loss(losses.vdm(path), model, xs, key)
        return sample, ll, exact, e, bl

    sample, ll, exact, e, bl = run(s, jax.random.key(2))
    for arr in (sample, ll, e, bl):
        assert bool(jnp.all(jnp.isfinite(arr)))
    # the exact model's flow on the learned path transports the prior to p_{t=1} exactly
    np.testing.assert_allclose(ll, exact, atol=2e-5)


def _bent(net):
    """A staircase λ(t) with the same ends: steep (w2⁺ ≈ 4) and tall (w3⁺ ≈ 30) sigmoid steps; its Monte Carlo
    variance is about 2.3x that of the linear schedule on the Gaussian of the next test."""
    net = eqx.tree_at(lambda q: q.w2, net, net.w2 + 4.0)
    return eqx.tree_at(lambda q: q.w3, net, net.w3 + 30.0)


def _gauss_mmse(lam, x, mu, s2):
    """E_ε‖ε − ε̂*‖² for data N(μ, s²) and the exact denoiser at log-SNR λ (vlb docstring)."""
    u = s2 * jnp.exp(lam)
    return jnp.sum(jnp.square(u / (1 + u)) + jnp.square(x - mu) * jnp.exp(lam) / jnp.square(1 + u))


def test_expected_loss_depends_only_on_the_ends(x64):
    mu, s2 = jnp.asarray([0.3, -0.2]), jnp.asarray([0.2, 0.5])
    x = jnp.asarray([0.1, 0.4])
    lo, hi = -6.0, 9.0
    linear, net = _schedules(jax.random.key(4), hidden=16)
    bent = _bent(net)
    nodes, weights = np.polynomial.legendre.leggauss(200)
    ts, ws = jnp.asarray(0.5 * (nodes + 1)), jnp.asarray(0.5 * weights)
    want = -float(gaussian_elbo(x, mu, s2, lam_min=lo, lam_max=hi))
    model = GaussianMixture([1.0], mu[None], s2[None])
    xs = jnp.broadcast_to(x, (4096, 2))
    variances = {}
    for name, s in (("linear", linear), ("bent", bent)):
        path = s.path
        # quadrature: ½∫ λ̇ mmse(λ(t)) dt over t is the same ½∫ mmse dλ for every schedule with these ends
        diffusion = jnp.sum(
            ws
            * jax.vmap(lambda t: 0.5 * path.d_log_snr(t) * _gauss_mmse(path.log_snr(t), x, mu, s2))(
                ts
            )
        )
        _, kl, rec, diff_exact = gaussian_elbo(
            x, mu, s2, lam_min=lo, lam_max=hi, return_terms=True, path=path
        )
        np.testing.assert_allclose(diffusion, diff_exact, rtol=1e-9)
        # Monte Carlo: the mean of VDM's per-example losses is −ELBO(x) for either schedule
        per = jax.jit(schedules.vdm_per_example_losses, static_argnums=1)(
            model.model("eps", path), "eps", path, xs, jax.random.key(7)
        )
        se = float(jnp.std(per)) / np.sqrt(per.shape[0])  # stratified times: conservative
        assert abs(float(jnp.mean(per)) - want) < 4 * se, (name, float(jnp.mean(per)), want, se)
        variances[name] = float(jnp.var(per))
    assert variances["bent"] > 2 * variances["linear"], variances
    print("per-example loss variance:", variances)


def _oracle_apply(mix, lam, x):
    """The exact ε-prediction at log-SNR λ (a model conditioned on λ, as VDM's is on γ = −λ)."""
    cos = CosinePath()
    return mix.model("eps", cos)(cos.t_from_log_snr(lam), x)


def test_variance_step_reduces_the_loss_variance():
    # exact model conditioned on λ (so E[L̂] does not depend on the interior), ends frozen: only the shape moves
    mix = GaussianMixture([1.0], [[0.3, -0.2]], [[0.2, 0.5]])
    bad = _bent(schedules.MonotoneNet(jax.random.key(0), -6.0, 9.0, hidden=16))
    labels = jax.tree.map(lambda _: "interior", bad)
    labels = eqx.tree_at(lambda q: (q.lam_min, q.raw_gap), labels, ("ends", "ends"))
    opt = optax.multi_transform({"interior": optax.adam(0.1), "ends": optax.set_to_zero()}, labels)
    step = schedules.make_vdm_step(
        _oracle_apply,
        optax.set_to_zero(),
        opt,
        time_input="log_snr",
        stratified=False,
        donate=False,
    )
    state = schedules.init_vdm_state(mix, bad, optax.set_to_zero(), opt, jax.random.key(1))
    batch = 256
    data = mix.sample(jax.random.key(2), batch * 30)
    held_out = mix.sample(jax.random.key(5), 8192)

    @jax.jit
    def measure(schedule):
        path = schedule.path
        fn = lambda t, x: _oracle_apply(mix, path.log_snr(t), x)  # noqa: E731
        per = schedules.vdm_per_example_losses(
            fn, "eps", path, held_out, jax.random.key(3), stratified=False
        )
        return jnp.mean(per), jnp.var(per)

    m0, v0 = measure(state.schedule)
    for i in range(30):
        state, metrics = step(state, data[batch * i : batch * (i + 1)])
    m1, v1 = measure(state.schedule)
    m0, v0, m1, v1 = (float(v) for v in (m0, v0, m1, v1))
    print(
        f"per-example loss variance {v0:.4g} -> {v1:.4g} (x{v0 / v1:.2f}); mean {m0:.4f} -> {m1:.4f}"
    )
    assert v1 < 0.75 * v0
    # the bound is unchanged (same ends, model conditioned on λ): the means agree within Monte Carlo error
    assert abs(m1 - m0) < 4 * np.sqrt((v0 + v1) / held_out.shape[0])
    np.testing.assert_array_equal(state.schedule.lam_min, bad.lam_min)
    np.testing.assert_array_equal(state.params.means, mix.means)  # the model was held fixed
