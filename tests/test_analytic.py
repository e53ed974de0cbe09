"""The Gaussian-mixture oracle against independent references.

Time convention: t = 0 is noise, t = 1 is data. References: scipy densities, autodiff of the oracle's own
log-density (score), finite differences in t (continuity equation), the full Jacobian trace (divergence),
Tweedie's formula, and Monte Carlo moments.
"""

import equinox as eqx
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


# ---------------------------------------------------------------------------------------------------------
# The oracle as a PyTree inside compiled solvers
# ---------------------------------------------------------------------------------------------------------
def _jaxpr_text(f, *args):
    return str(jax.make_jaxpr(jax.jit(f))(*args))


def test_jaxpr_without_host_callbacks():
    """Inside jit (as in an ODE solve) the oracle compiles in no runtime check: no host callback per step."""
    gm = mixture()
    x, t = jnp.array([0.1, -0.4, 2.0]), jnp.asarray(0.3)
    for name in ("linear", "vp", "logsnr"):
        path = PATHS[name]()
        fns = {
            "velocity": lambda t, x: gm.velocity(path, t, x),
            "score": lambda t, x: gm.score(path, t, x),
            "divergence": lambda t, x: gm.divergence(path, t, x),
            "marginal_log_prob": lambda t, x: gm.marginal_log_prob(path, t, x),
            "predict": lambda t, x: gm.predict("v", path, t, x),
            "model": lambda t, x: gm.model("data", path)(t, x),
        }
        for what, f in fns.items():
            assert "callback" not in _jaxpr_text(f, t, x), (name, what)
    # negative control: the search finds the callback of a runtime check
    checked = lambda t, x: dj.paths.check_time(t) * x
    assert "callback" in _jaxpr_text(checked, t, x)


def test_model_is_a_pytree_with_the_mixture_as_leaves():
    gm = mixture()
    path = dj.VPPath()
    model = gm.model("velocity", path)
    leaves = jax.tree_util.tree_leaves(model)
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)
    assert any(leaf is gm.means for leaf in leaves) and any(
        leaf is path.beta_max for leaf in leaves
    )
    t, x = 0.4, jnp.array([0.2, -0.3, 0.7])
    want = np.asarray(gm.velocity(path, t, x))
    # a plain jax.jit takes the model as an argument
    got = jax.jit(lambda m, t, x: m(t, x))(model, jnp.asarray(t), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # one filter_jit program serves a new mixture of the same shapes (its arrays are arguments, not constants)
    traces = []

    @eqx.filter_jit
    def call(m, t, x):
        traces.append(None)
        return m(t, x)

    other = GaussianMixture(W[::-1].copy(), MU + 1.0, VAR * 2.0)
    np.testing.assert_allclose(call(model, t, x), want, rtol=1e-5, atol=1e-6)
    got2 = call(other.model("velocity", path), t, x)
    np.testing.assert_allclose(got2, other.velocity(path, t, x), rtol=1e-5, atol=1e-6)
    assert len(traces) == 1
    assert not np.allclose(got2, want)
    # grad reaches the mixture through the model: d/dμ of Σ u equals finite differences
    g = eqx.filter_grad(lambda m: jnp.sum(m(t, x)))(model).mixture.means
    h = 1e-3
    e = np.zeros(MU.shape)
    e[1, 2] = h
    plus = GaussianMixture(W, MU + e, VAR).velocity(path, t, x)
    minus = GaussianMixture(W, MU - e, VAR).velocity(path, t, x)
    np.testing.assert_allclose(g[1, 2], jnp.sum(plus - minus) / (2 * h), rtol=1e-3, atol=1e-5)


class _FlowKind(dj.kinds.AbstractKind):
    """A user kind with the velocity's linear representation (α̇, σ̇) but not the Velocity class."""

    name = "flow"
    basis = "flow"

    def coefficients(self, a, s, da, ds):
        return da, ds

    def error_scale_sq(self, a, s, da, ds):
        return jnp.square((da * s - ds * a) / a)


@pytest.mark.parametrize("name", ["cosine", "ve", "logsnr"])
def test_predict_takes_kind_objects(name, x64):
    gm = mixture()
    path = PATHS[name]()
    x, t = jnp.array([0.2, -0.3, 0.7]), 0.35
    kinds = dj.kinds
    for obj in (kinds.Eps(), kinds.Data(), kinds.V(), kinds.Velocity(), kinds.Score()):
        np.testing.assert_array_equal(gm.predict(obj, path, t, x), gm.predict(obj.name, path, t, x))
        np.testing.assert_array_equal(gm.model(obj, path)(t, x), gm.predict(obj.name, path, t, x))
    # a kind of another class goes through its linear representation c·x̂ + d·ε̂: here the velocity
    np.testing.assert_allclose(
        gm.predict(_FlowKind(), path, t, x), gm.velocity(path, t, x), rtol=1e-10, atol=1e-12
    )


def test_concrete_time_checked_under_jit():
    gm = mixture()
    with pytest.raises(Exception, match="t must lie in"):
        jax.jit(lambda x: gm.velocity(dj.LinearPath(), 1.5, x))(jnp.zeros(3))
    with pytest.raises(Exception, match="t must lie in"):
        gm.model("eps", dj.LinearPath())(-0.1, jnp.zeros(3))
