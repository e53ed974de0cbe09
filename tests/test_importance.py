"""Variance-minimizing time proposals and EDM2's uncertainty weighting (diffjax.importance).

Oracles: Gauss–Legendre quadrature in λ of the λ-integrand ½w(λ)·‖ε̂(x_λ) − ε‖² with the Gaussian-mixture
oracle's exact model (the expectation every proposal must reproduce), the closed-form minimiser u* = log E[L]
of L/e^u + u, and diffjax.train.make_train_step for the model update. t = 0 is noise, t = 1 is data.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import analytic, importance, losses, nn, train
from diffjax.paths import LinearPath, VPPath

GL_NODES, GL_WEIGHTS = np.polynomial.legendre.leggauss(24)


def _mixture():
    return analytic.GaussianMixture([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]], 0.05**2)


def _peaked(objective, key):
    """The objective's adaptive proposal pushed far from uniform by synthetic observations."""
    sampler = objective.time_sampler
    lams = jax.random.uniform(key, (4000,), minval=sampler.edges[0], maxval=sampler.edges[-1])
    return importance.update_proposal(
        objective, lams, jnp.exp(0.3 * lams) + 0.1 * jnp.sin(3 * lams)
    )


def _pieces(a, b, n=24):
    edges = np.linspace(a, b, n + 1)
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        yield 0.5 * (hi - lo) * GL_NODES + 0.5 * (hi + lo), 0.5 * (hi - lo) * GL_WEIGHTS


def _lambda_quadrature(objective, model, xs, eps, weighting):
    """½∫ w(λ)·mean_i ‖ε̂(x_{i,λ}) − ε_i‖² dλ over the objective's λ range (ε̂ from the oracle's ε-model)."""
    path = objective.path
    lo, hi = objective.t_range
    eps_model = model

    @jax.jit
    def integrand(lams):
        def at(lam):
            t = path.t_from_log_snr(lam)
            xt = path.alpha(t) * xs + path.sigma(t) * eps
            e = jax.vmap(lambda x: eps_model(t, x))(xt)
            return 0.5 * weighting(lam) * jnp.mean(jnp.sum(jnp.square(e - eps), -1))

        return jax.vmap(at)(lams)

    lam_lo, lam_hi = float(path.log_snr(lo)), float(path.log_snr(hi))
    return sum(float(jnp.sum(w * integrand(jnp.asarray(x)))) for x, w in _pieces(lam_lo, lam_hi))


def _u_quadrature(objective, fn, xs, eps, breaks):
    """∫_0^1 mean_i Z·c(t(u))·‖ŷ − y‖² du, by pieces between the u ``breaks`` (where the integrand kinks)."""

    @jax.jit
    def integrand(us):
        def at(u):
            t = objective.time_at(u)
            per = jax.vmap(lambda x, e: losses.loss_at(objective, fn, x, t, e))(xs, eps)
            return objective.mass() * jnp.mean(per)

        return jax.vmap(at)(us)

    total = 0.0
    for a, b in zip(breaks[:-1], breaks[1:], strict=True):
        for x, w in _pieces(a, b, 4):
            total += float(jnp.sum(w * integrand(jnp.asarray(x))))
    return total


@pytest.mark.parametrize("case", ["vp_eps", "linear_velocity"])
def test_any_proposal_leaves_the_expected_loss_unchanged(x64, case):
    mix = _mixture()
    path, kind = (VPPath(), "eps") if case == "vp_eps" else (LinearPath(), "velocity")
    weighting = losses.ELBOWeighting() if case == "vp_eps" else losses.SigmoidWeighting(2.0)
    objective = _peaked(
        importance.variance_minimizing_objective(path, kind, weighting, num_bins=8),
        jax.random.key(0),
    )
    masses = np.asarray(objective.time_sampler.masses())
    assert masses.max() / masses.min() > 20  # far from uniform
    xs = mix.sample(jax.random.key(1), 3)
    eps = jax.random.normal(jax.random.key(2), xs.shape)
    want = _lambda_quadrature(objective, mix.model("eps", path), xs, eps, weighting)

    breaks = np.concatenate([[0.0], np.cumsum(masses)])
    breaks[-1] = 1.0
    got = _u_quadrature(objective, mix.model(kind, path), xs, eps, breaks)
    np.testing.assert_allclose(got, want, rtol=1e-7)

    # the same weighting with times uniform in t (another proposal) has the same expectation
    uniform = losses.weighted_objective(path, kind, weighting, losses.Uniform())
    lo, hi = uniform.t_range
    t_breaks = np.asarray(path.t_from_log_snr(objective.time_sampler.edges))
    u_breaks = (np.clip(t_breaks, lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(
        _u_quadrature(uniform, mix.model(kind, path), xs, eps, u_breaks), want, rtol=1e-6
    )

    # control: the adaptive times without the importance factor (c = 1) are another objective
    unweighted = eqx.tree_at(lambda o: o.loss_weight, objective, losses.ConstantWeight())
    bad = _u_quadrature(unweighted, mix.model(kind, path), xs, eps, breaks)
    assert abs(bad - want) > 0.1 * abs(want)


@pytest.fixture(scope="module")
def vp_draws():
    """Per-example losses of the exact oracle model on VP (ELBO weighting) under a uniform-t and an adapted
    proposal, float32."""
    mix, path = _mixture(), VPPath()
    model = mix.model("eps", path)

    @jax.jit
    def draws(objective, key):
        kx, kl = jax.random.split(key)
        return importance.integrand_samples(objective, model, mix.sample(kx, 512), kl)

    adaptive = importance.variance_minimizing_objective(path, "eps", num_bins=32, decay=0.9)
    for i in range(12):
        _, lams, values = draws(adaptive, jax.random.key(i))
        adaptive = importance.update_proposal(adaptive, lams, values)
    out = {}
    for name, objective in (("uniform_t", losses.vdm(path)), ("adaptive", adaptive)):
        out[name] = np.concatenate(
            [np.asarray(draws(objective, jax.random.key(100 + i))[0]) for i in range(8)]
        )
    return out


def test_adapted_proposal_is_unbiased_and_cuts_the_variance(vp_draws):
    # quadrature value of ½∫ E‖ε̂ − ε‖² dλ for this mixture on VP over [λ(1e-5), λ(1 − 1e-5)] (float64, 4000 (x, ε)
    # pairs at 24 × 32 Gauss–Legendre nodes): 8.726 ± 0.03
    want = 8.726
    adaptive, uniform = vp_draws["adaptive"], vp_draws["uniform_t"]
    se = adaptive.std() / np.sqrt(adaptive.size)
    assert abs(adaptive.mean() - want) < 4 * se + 0.05
    ratio = uniform.var() / adaptive.var()
    assert ratio > 2.0, (
        ratio
    )  # measured 9.9 (uniform t is heavy-tailed on VP: its variance is underestimated)


def _tiny():
    apply, params = nn.split(nn.MLP(2, hidden=8, depth=1, time_dim=4, rngs=nnx.Rngs(0)))
    config = train.TrainConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10, batch_size=16)
    return apply, params, config


def test_adaptive_step_updates_model_like_train_step_and_compiles_once():
    apply, params, config = _tiny()
    traces = []

    def counted(p, t, x):
        traces.append(1)
        return apply(p, t, x)

    optimizer = train.make_optimizer(config)
    objective = importance.variance_minimizing_objective(LinearPath(), "velocity", num_bins=8)
    step = importance.make_adaptive_step(counted, optimizer, 0.9, donate=False)
    reference = train.make_train_step(apply, objective, optimizer, 0.9, donate=False)
    state = train.init_state(params, optimizer, jax.random.key(0))
    xs = jax.random.normal(jax.random.key(1), (16, 2))
    want, _ = reference(state, xs)
    new_state, new_objective, metrics = step(state, objective, xs)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert float(jnp.sum(new_objective.time_sampler.counts)) == pytest.approx(16.0)
    assert np.isfinite(float(metrics["loss_sq"]))
    n_traces = len(traces)
    for _ in range(2):
        new_state, new_objective, _ = step(new_state, new_objective, xs)
    assert len(traces) == n_traces  # an updated proposal reuses the compiled step
    counts = float(jnp.sum(new_objective.time_sampler.counts))
    assert counts == pytest.approx(16 * (1 + 0.99 + 0.99**2), rel=1e-6)


def test_uncertainty_loss_minimiser_is_log_mean_loss():
    mix, path = _mixture(), LinearPath()
    objective = losses.flow_matching(path)
    exact = mix.model("velocity", path)
    wrong = lambda t, x: exact(t, x) + 0.3  # a model with a nonzero loss
    xs, key = mix.sample(jax.random.key(0), 64), jax.random.key(1)
    per, _, _ = importance.integrand_samples(objective, wrong, xs, key)
    u_star = jnp.log(jnp.mean(per))  # argmin_u mean(L)/e^u + u

    def total(u):
        return importance.uncertainty_batch_loss(objective, lambda t, x: (wrong(t, x), u), xs, key)

    assert abs(float(jax.grad(total)(u_star))) < 1e-5
    assert (
        abs(float(jax.grad(total)(u_star + 1.0))) > 0.5
    )  # control: elsewhere the gradient is not 0
    np.testing.assert_allclose(total(u_star), 1.0 + u_star, rtol=1e-5)
    with pytest.raises(ValueError, match=r"\(prediction, u\)"):
        importance.uncertainty_batch_loss(objective, wrong, xs, key)


def test_proposal_density_cdf_and_icdf_agree(x64):
    objective = _peaked(
        importance.variance_minimizing_objective(VPPath(), "eps", num_bins=6), jax.random.key(3)
    )
    sampler, path = objective.time_sampler, objective.path
    lams = jnp.linspace(float(sampler.edges[0]) + 0.01, float(sampler.edges[-1]) - 0.01, 37)
    dcdf = jax.vmap(jax.grad(sampler.log_snr_cdf))(lams)
    np.testing.assert_allclose(dcdf, jax.vmap(sampler.log_snr_density)(lams), rtol=1e-12)
    us = jax.vmap(sampler.log_snr_cdf)(lams)
    np.testing.assert_allclose(jax.vmap(sampler.log_snr_icdf)(us), lams, rtol=1e-10, atol=1e-10)
    ts = jnp.linspace(0.05, 0.95, 11)
    h = 1e-6
    fd = (jax.vmap(lambda t: sampler._cdf(t + h, path) - sampler._cdf(t - h, path))(ts)) / (2 * h)
    np.testing.assert_allclose(fd, jax.vmap(lambda t: sampler.density(t, path))(ts), rtol=1e-5)
    assert float(jnp.sum(sampler.masses())) == pytest.approx(1.0, abs=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="strictly increasing"):
        importance.AdaptiveLogSNR(jnp.array([0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        importance.AdaptiveLogSNR(jnp.array([-jnp.inf, 1.0]))
    with pytest.raises(ValueError, match="floor"):
        importance.AdaptiveLogSNR(jnp.linspace(0, 1, 3), floor=0.0)
    with pytest.raises(ValueError, match="decay"):
        importance.AdaptiveLogSNR(jnp.linspace(0, 1, 3), decay=1.0)
    with pytest.raises(ValueError, match="num_bins"):
        importance.variance_minimizing_objective(VPPath(), "eps", num_bins=0)
    with pytest.raises(ValueError, match="AdaptiveLogSNR"):
        importance.update_proposal(losses.vdm(VPPath()), jnp.zeros(2), jnp.zeros(2))
