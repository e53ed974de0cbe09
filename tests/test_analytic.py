"""The Gaussian-mixture oracle against independent references.

Time convention: t = 0 is noise, t = 1 is data. References: scipy densities, autodiff of the oracle's own
log-density (score), finite differences in t (continuity equation), the full Jacobian trace (divergence),
Tweedie's formula, and Monte Carlo moments.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import diffjax as dj
from diffjax.analytic import GaussianMixture

PATHS = {
    "linear": lambda: dj.LinearPath(),
    "cosine": lambda: dj.CosinePath(),
    "vp": lambda: dj.VPPath(),
    "ve": lambda: dj.VEPath(),
    "edm": lambda: dj.EDMPath(),
    "logsnr": lambda: dj.LogSNRPath(lambda t: 2 * jnp.log(t) - 2 * jnp.log1p(-t) - 1.0, t_eps=1e-4),
}

W = np.array([0.2, 0.5, 0.3])
MU = np.array([[1.0, -1.0, 0.5], [-2.0, 0.5, 0.0], [0.3, 2.0, -1.5]])
VAR = np.array([[0.3, 0.5, 0.2], [0.2, 0.1, 0.4], [0.6, 0.25, 0.15]])


def mixture():
    return GaussianMixture(W, MU, VAR)


def np_mixture_logpdf(x, w, mu, var):
    comps = [
        np.log(w[k]) + stats.multivariate_normal(mu[k], np.diag(var[k])).logpdf(x)
        for k in range(len(w))
    ]
    return np.logaddexp.reduce(comps)


def test_log_prob_and_marginal_vs_scipy(x64):
    gm = mixture()
    rng = np.random.default_rng(0)
    for name, mk in PATHS.items():
        path = mk()
        for t in [path.t_min, 0.3, 0.8, path.t_max]:
            a, s = float(path.alpha(t)), float(path.sigma(t))
            for x in rng.normal(size=(3, 3)) * 2:
                ref = np_mixture_logpdf(x, W, a * MU, a**2 * VAR + s**2)
                got = float(gm.marginal_log_prob(path, t, jnp.asarray(x)))
                assert got == pytest.approx(ref, rel=1e-10, abs=1e-10), (name, t)
    x = jnp.asarray(rng.normal(size=3))
    assert float(gm.log_prob(x)) == pytest.approx(np_mixture_logpdf(np.asarray(x), W, MU, VAR))


@pytest.mark.parametrize("name", list(PATHS))
def test_score_is_gradient_and_continuity_equation(name, x64):
    """score = ∇ log p_t; ∂_t log p_t + ∇·u + u·∇log p_t = 0 (continuity) at random points and times."""
    gm = mixture()
    path = PATHS[name]()
    rng = np.random.default_rng(1)
    h = 1e-5
    for t in rng.uniform(0.05, 0.95, size=3):
        for x in rng.normal(size=(3, 3)) * 1.5:
            x = jnp.asarray(x)
            logp = lambda z, tt: gm.marginal_log_prob(path, tt, z)
            score = gm.score(path, t, x)
            np.testing.assert_allclose(score, jax.grad(logp)(x, t), rtol=1e-9, atol=1e-10)
            dt_logp = (logp(x, t + h) - logp(x, t - h)) / (2 * h)
            u = gm.velocity(path, t, x)
            jac = jax.jacfwd(lambda z: gm.velocity(path, t, z))(x)
            div = jnp.trace(jac)
            resid = dt_logp + div + u @ score
            scale = 1.0 + abs(float(dt_logp)) + abs(float(div))
            assert abs(float(resid)) < 1e-6 * scale, (name, t, float(resid))
            # closed-form divergence vs full Jacobian trace
            assert float(gm.divergence(path, t, x)) == pytest.approx(float(div), rel=1e-9, abs=1e-9)


def test_negative_control_continuity_detects_wrong_velocity(x64):
    """Dropping the ½ in the velocity's variance term breaks the continuity equation."""
    gm = mixture()
    path = dj.CosinePath()
    t, x = 0.4, jnp.array([0.2, -0.3, 0.7])
    logp = lambda z, tt: gm.marginal_log_prob(path, tt, z)
    h = 1e-5
    dt_logp = (logp(x, t + h) - logp(x, t - h)) / (2 * h)

    def wrong_u(z):
        _, _, da, m, c, dc, _, r = gm._stats(path, t, z)
        return r @ (da * gm.means + dc / c * (z - m))

    resid = dt_logp + jnp.trace(jax.jacfwd(wrong_u)(x)) + wrong_u(x) @ gm.score(path, t, x)
    assert abs(float(resid)) > 1e-2


@pytest.mark.parametrize("name", list(PATHS))
def test_posterior_means_tweedie_and_velocity_decomposition(name, x64):
    """x̂ = (x + σ²∇log p)/α (Tweedie), ε̂ = −σ∇log p, u = α̇x̂ + σ̇ε̂, x = αx̂ + σε̂."""
    gm = mixture()
    path = PATHS[name]()
    rng = np.random.default_rng(2)
    for t in [0.2, 0.6, 0.9]:
        a, s, da, ds = (float(v) for v in path.coefficients(t))
        for x in rng.normal(size=(2, 3)):
            x = jnp.asarray(x)
            g = jax.grad(lambda z: gm.marginal_log_prob(path, t, z))(x)
            xhat, ehat = gm.posterior_mean(path, t, x), gm.eps_posterior_mean(path, t, x)
            np.testing.assert_allclose(xhat, (x + s**2 * g) / a, rtol=1e-8, atol=1e-9)
            np.testing.assert_allclose(ehat, -s * g, rtol=1e-8, atol=1e-9)
            np.testing.assert_allclose(a * xhat + s * ehat, x, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(
                gm.velocity(path, t, x), da * xhat + ds * ehat, rtol=1e-8, atol=1e-9
            )
            np.testing.assert_allclose(
                gm.predict("v", path, t, x), a * ehat - s * xhat, rtol=1e-8, atol=1e-9
            )


@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "ve", "edm"])
def test_finite_at_both_ends(name):
    gm = mixture()
    path = PATHS[name]()
    x = jnp.array([0.1, -0.4, 2.0])
    for t in [0.0, path.t_max, 1.0 if name != "vp" else path.t_max]:
        for f in (gm.velocity, gm.score, gm.posterior_mean, gm.eps_posterior_mean):
            assert bool(jnp.all(jnp.isfinite(f(path, t, x)))), (name, t, f.__name__)
        assert bool(jnp.isfinite(gm.divergence(path, t, x)))
    # VP: the velocity at t = 1 exists (d_sigma_sq is finite) although σ̇ = −∞ there
    vp = dj.VPPath()
    assert bool(jnp.all(jnp.isfinite(gm.velocity(vp, 1.0, x))))


def test_velocity_at_data_end_linear_is_posterior_limit(x64):
    """On the linear path at t = 0 the velocity is E[x] − x_0 (x̂ = E[x], ε̂ = x_0)."""
    gm = mixture()
    x = jnp.array([0.3, -0.1, 0.2])
    np.testing.assert_allclose(gm.velocity(dj.LinearPath(), 0.0, x), gm.mean() - x, atol=1e-12)


def test_sample_moments():
    gm = mixture()
    xs = gm.sample(jax.random.key(0), 200_000)
    mean = np.asarray(W @ MU)
    second = sum(W[k] * (np.diag(VAR[k]) + np.outer(MU[k], MU[k])) for k in range(3))
    cov = second - np.outer(mean, mean)
    np.testing.assert_allclose(np.mean(xs, 0), mean, atol=0.02)
    np.testing.assert_allclose(np.cov(np.asarray(xs).T), cov, atol=0.04)
    np.testing.assert_allclose(gm.covariance(), cov, rtol=1e-5)


def test_jit_vmap_grad_agree_with_eager():
    gm = mixture()
    path = dj.CosinePath()
    xs = jax.random.normal(jax.random.key(1), (5, 3))
    ts = jnp.linspace(0.1, 0.9, 5)
    for f in (gm.velocity, gm.score, gm.posterior_mean, gm.marginal_log_prob, gm.divergence):
        eager = [f(path, t, x) for t, x in zip(ts, xs)]
        batched = jax.vmap(f, in_axes=(None, 0, 0))(path, ts, xs)
        jitted = jax.jit(lambda p, t, x, f=f: f(p, t, x))(path, ts[0], xs[0])
        np.testing.assert_allclose(batched, np.stack(eager), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(jitted, eager[0], rtol=1e-5, atol=1e-6)
    # grad through the mixture parameters (a learned oracle) and through t
    g = jax.grad(lambda m: GaussianMixture(W, m, VAR).marginal_log_prob(path, 0.5, xs[0]))(
        jnp.asarray(MU)
    )
    assert g.shape == MU.shape and bool(jnp.all(jnp.isfinite(g)))


def test_bad_input():
    gm = mixture()
    with pytest.raises(ValueError, match="shape"):
        gm.velocity(dj.LinearPath(), 0.5, jnp.zeros(2))
    with pytest.raises(ValueError, match="kind"):
        gm.predict("noise", dj.LinearPath(), 0.5, jnp.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture([0.5, 0.5], MU, VAR)
    with pytest.raises(ValueError, match="positive"):
        GaussianMixture(W, MU, -VAR)
    with pytest.raises(Exception, match="t must lie in"):
        gm.velocity(dj.LinearPath(), 1.5, jnp.zeros(3))
