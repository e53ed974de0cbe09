"""Tests for diffjax.interpolants and the mixture-to-mixture oracle diffjax.analytic.InterpolantMixture.

Time convention: t = 0 is the source (noise end), t = 1 is data; x_t = α_t·x₁ + β_t·x₀ + γ_t·z.

Oracles: the pair-wise Gaussian marginal and Gaussian conditioning written out in numpy/scipy, finite differences
(score, divergence, the continuity equation ∂ρ/∂t + ∇·(ρb) = 0), Monte Carlo draws of (x₀, x₁, z), the mixtures'
own closed-form log-densities; never the code's output against itself. Everything runs in float64 (a module
fixture), with compiled functions shared through module-scope fixtures.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

W_SRC = np.array([0.35, 0.65])
MU_SRC = np.array([[-2.0, 0.0], [1.5, 1.0]])
V_SRC = np.array([[0.3, 0.5], [0.4, 0.2]])
W_TGT = np.array([0.5, 0.2, 0.3])
MU_TGT = np.array([[2.0, -1.0], [0.0, 2.0], [-1.0, -1.5]])
V_TGT = np.array([[0.2, 0.3], [0.25, 0.25], [0.5, 0.1]])
GAMMA_A = 0.5  # BrownianGamma: γ² = a·t(1 − t)


@pytest.fixture(scope="module", autouse=True)
def _x64():
    previous = bool(jax.config.jax_enable_x64)
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="module")
def setup(_x64):
    import diffjax as dj
    from diffjax import interpolants as si

    src = dj.GaussianMixture(W_SRC, MU_SRC, V_SRC)
    tgt = dj.GaussianMixture(W_TGT, MU_TGT, V_TGT)
    interp = si.StochasticInterpolant(
        si.MixtureSource(src), dj.LinearPath(), si.BrownianGamma(GAMMA_A)
    )
    oracle = tgt.interpolant_marginal(interp)
    return dict(dj=dj, si=si, src=src, tgt=tgt, interp=interp, oracle=oracle)


# ---------------------------------------------------------------------------------------------------------------
# numpy references: linear path α = t, β = 1 − t, γ² = a·t(1 − t)
# ---------------------------------------------------------------------------------------------------------------
def _coef(t):
    """(α, β, γ², α̇, β̇, γγ̇) of the linear interpolant with BrownianGamma(a)."""
    return t, 1.0 - t, GAMMA_A * t * (1 - t), 1.0, -1.0, 0.5 * GAMMA_A * (1 - 2 * t)


def _np_pairs(t):
    """Per pair (j, k): log weight, mean and diagonal variance of x_t, and Cov(α̇x₁ + β̇x₀ + γ̇z, x_t), mean of it."""
    a, b, g2, da, db, ggd = _coef(t)
    out = []
    for j in range(2):
        for k in range(3):
            mean = a * MU_TGT[k] + b * MU_SRC[j]
            var = a * a * V_TGT[k] + b * b * V_SRC[j] + g2
            cov_w = (
                da * a * V_TGT[k] + db * b * V_SRC[j] + ggd
            )  # Cov(w_i, x_t,i), independent coordinates
            mean_w = da * MU_TGT[k] + db * MU_SRC[j]
            out.append((math.log(W_SRC[j] * W_TGT[k]), mean, var, cov_w, mean_w))
    return out


def _np_log_prob(t, x):
    return scipy.special.logsumexp(
        [
            lw + scipy.stats.multivariate_normal(m, np.diag(v)).logpdf(x)
            for lw, m, v, _, _ in _np_pairs(t)
        ]
    )


def _np_velocity(t, x):
    """E[α̇x₁ + β̇x₀ + γ̇z | x_t = x] by Gaussian conditioning per pair, mixed with scipy responsibilities."""
    pairs = _np_pairs(t)
    logj = np.array(
        [lw + scipy.stats.multivariate_normal(m, np.diag(v)).logpdf(x) for lw, m, v, _, _ in pairs]
    )
    r = np.exp(logj - scipy.special.logsumexp(logj))
    cond = np.array([mw + cw / v * (x - m) for _, m, v, cw, mw in pairs])
    return r @ cond


XS = np.array([[0.3, -0.4], [1.8, -0.9], [-1.0, 1.7]])


# ---------------------------------------------------------------------------------------------------------------
# the oracle
# ---------------------------------------------------------------------------------------------------------------
def test_oracle_density_velocity_vs_numpy(setup):
    o = setup["oracle"]
    f = jax.jit(
        jax.vmap(lambda o, t, x: (o.log_prob(t, x), o.velocity(t, x)), in_axes=(None, None, 0))
    )
    for t in (0.0, 0.35, 0.8, 1.0):
        lp, u = f(o, jnp.asarray(t), jnp.asarray(XS))
        np.testing.assert_allclose(np.asarray(lp), [_np_log_prob(t, x) for x in XS], rtol=1e-12)
        np.testing.assert_allclose(
            np.asarray(u), [_np_velocity(t, x) for x in XS], rtol=1e-10, atol=1e-12
        )

    # the ends are the source and the data (scipy mixtures)
    def np_mix(w, mu, v, x):
        return scipy.special.logsumexp(
            [
                math.log(w[k]) + scipy.stats.multivariate_normal(mu[k], np.diag(v[k])).logpdf(x)
                for k in range(len(w))
            ]
        )

    lp0, _ = f(o, jnp.asarray(0.0), jnp.asarray(XS))
    lp1, _ = f(o, jnp.asarray(1.0), jnp.asarray(XS))
    np.testing.assert_allclose(
        np.asarray(lp0), [np_mix(W_SRC, MU_SRC, V_SRC, x) for x in XS], rtol=1e-12
    )
    np.testing.assert_allclose(
        np.asarray(lp1), [np_mix(W_TGT, MU_TGT, V_TGT, x) for x in XS], rtol=1e-12
    )
    # eager (concrete t) agrees with the compiled program
    np.testing.assert_allclose(
        float(o.log_prob(0.35, jnp.asarray(XS[0]))), _np_log_prob(0.35, XS[0]), rtol=1e-12
    )


def test_oracle_density_integrates_to_one(setup):
    o = setup["oracle"]
    g = np.linspace(-9.0, 9.0, 181)
    grid = jnp.asarray(np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2))
    lp = jax.jit(jax.vmap(o.log_prob, in_axes=(None, 0)))(jnp.asarray(0.35), grid)
    mass = float(jnp.sum(jnp.exp(lp))) * (g[1] - g[0]) ** 2
    np.testing.assert_allclose(mass, 1.0, atol=1e-6)


def test_oracle_continuity_equation_finite_differences(setup):
    """∂ρ/∂t + ∇·(ρb) = 0 with every derivative a central difference; control: b without its γ̇z term."""
    si, dj = setup["si"], setup["dj"]
    o = setup["oracle"]
    wrong = setup["tgt"].interpolant_marginal(
        si.StochasticInterpolant(si.MixtureSource(setup["src"]), dj.LinearPath(), si.ZeroGamma())
    )

    @jax.jit
    def residual(o, u_from, t, x):
        h, k = 1e-5, 1e-5
        rho = lambda t, x: jnp.exp(o.log_prob(t, x))  # noqa: E731
        flux = lambda x: rho(t, x) * u_from.velocity(t, x)  # noqa: E731
        dt = (rho(t + h, x) - rho(t - h, x)) / (2 * h)
        e = jnp.eye(2)
        div = sum((flux(x + k * e[i])[i] - flux(x - k * e[i])[i]) / (2 * k) for i in range(2))
        return dt + div, jnp.abs(dt) + jnp.abs(div)

    for t in (0.2, 0.6):
        for x in XS:
            res, scale = residual(o, o, jnp.asarray(t), jnp.asarray(x))
            assert abs(float(res)) < 1e-6 * float(scale) + 1e-9, (t, x, float(res), float(scale))
    res, scale = residual(o, wrong, jnp.asarray(0.2), jnp.asarray(XS[0]))
    assert abs(float(res)) > 1e-3 * float(scale)


def test_oracle_score_and_divergence_finite_differences(setup):
    o = setup["oracle"]

    @jax.jit
    def fd(o, t, x):
        h, e = 1e-6, jnp.eye(2)
        score = jnp.stack(
            [
                (o.log_prob(t, x + h * e[i]) - o.log_prob(t, x - h * e[i])) / (2 * h)
                for i in range(2)
            ]
        )
        div = sum(
            (o.velocity(t, x + h * e[i])[i] - o.velocity(t, x - h * e[i])[i]) / (2 * h)
            for i in range(2)
        )
        return o.score(t, x), score, o.divergence(t, x), div

    for t in (0.0, 0.5, 1.0):
        s, s_fd, d, d_fd = fd(o, jnp.asarray(t), jnp.asarray(XS[1]))
        np.testing.assert_allclose(np.asarray(s), np.asarray(s_fd), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(float(d), float(d_fd), rtol=1e-6, atol=1e-8)


def test_oracle_velocity_is_the_conditional_mean_monte_carlo(setup):
    """E[(target − b(x_t))·f(x_t)] = 0 for f = 1, x₁, x₂ over Monte Carlo draws (x₀, x₁, z) from
    sample_conditional; the moments of x_t match the pair mixture. Control: b of the γ = 0 interpolant fails."""
    si, dj = setup["si"], setup["dj"]
    interp, o = setup["interp"], setup["oracle"]
    wrong = setup["tgt"].interpolant_marginal(
        si.StochasticInterpolant(si.MixtureSource(setup["src"]), dj.LinearPath(), si.ZeroGamma())
    )
    n, t = 40_000, 0.3
    x1 = setup["tgt"].sample(jax.random.PRNGKey(3), n)
    keys = jax.random.split(jax.random.PRNGKey(4), n)

    @jax.jit
    def draws(interp, o, wrong, keys, x1):
        xt, target = jax.vmap(lambda k, x: si.sample_conditional(interp, k, t, x))(keys, x1)
        return (
            xt,
            target,
            jax.vmap(o.velocity, (None, 0))(t, xt),
            jax.vmap(wrong.velocity, (None, 0))(t, xt),
        )

    xt, target, b, b_wrong = (np.asarray(v) for v in draws(interp, o, wrong, keys, x1))
    feats = np.concatenate([np.ones((n, 1)), xt], axis=1)

    def z_scores(b):
        prod = (target - b)[:, :, None] * feats[:, None, :]  # (n, D, F)
        return np.abs(prod.mean(0)) / (prod.std(0) / math.sqrt(n))

    assert z_scores(b).max() < 4.5, z_scores(b)
    assert z_scores(b_wrong).max() > 10.0
    # moments of x_t against the numpy pair mixture
    pairs = _np_pairs(t)
    w = np.array([math.exp(lw) for lw, *_ in pairs])
    mean = sum(wi * m for wi, (_, m, *_r) in zip(w, pairs))
    second = sum(wi * (np.diag(v) + np.outer(m, m)) for wi, (_, m, v, *_r) in zip(w, pairs))
    cov = second - np.outer(mean, mean)
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(xt.mean(0) - mean) < 4.5 * se)
    np.testing.assert_allclose(np.cov(xt.T), cov, atol=0.05)


def test_gaussian_source_reduces_to_gaussian_paths(setup):
    """N(0, I) source with γ = 0 is the Gaussian path (α, σ) = (α, β); with γ = σ constant (I-CFM) it is
    ICFMPath(σ): same density and velocity as GaussianMixture's closed forms on those paths."""
    dj, si, tgt = setup["dj"], setup["si"], setup["tgt"]
    cases = [
        (si.StochasticInterpolant(si.GaussianSource(), dj.CosinePath()), dj.CosinePath()),
        (
            si.StochasticInterpolant(si.GaussianSource(), dj.LinearPath(), si.ConstantGamma(0.3)),
            dj.ICFMPath(0.3),
        ),
    ]

    @jax.jit
    def both(o, tgt, path, t, x):
        return (
            o.log_prob(t, x),
            tgt.marginal_log_prob(path, t, x),
            o.velocity(t, x),
            tgt.velocity(path, t, x),
        )

    ts, xs = np.repeat([0.0, 0.4, 0.9], 2), np.tile(XS[:2], (3, 1))
    for interp, path in cases:
        o = tgt.interpolant_marginal(interp)
        lp, lp_ref, u, u_ref = jax.vmap(both, (None, None, None, 0, 0))(
            o, tgt, path, jnp.asarray(ts), jnp.asarray(xs)
        )
        np.testing.assert_allclose(np.asarray(lp), np.asarray(lp_ref), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(u), np.asarray(u_ref), rtol=1e-10, atol=1e-12)


def test_start_distribution_with_gamma_at_the_source(setup):
    """With γ_0 = σ ≠ 0 (ConstantGamma) the ODE starts from the source smoothed by N(0, σ² I): its closed form is
    the oracle's ρ_0 (numpy pairs at t = 0 with the extra variance); with BrownianGamma it is the source."""
    dj, si, src = setup["dj"], setup["si"], setup["src"]
    x = jnp.asarray(XS[0])
    for source in (si.MixtureSource(src), si.GaussianSource(jnp.asarray([0.5, -0.5]), 1.5)):
        interp = si.StochasticInterpolant(source, dj.LinearPath(), si.ConstantGamma(0.3))
        o = setup["tgt"].interpolant_marginal(interp)
        np.testing.assert_allclose(
            float(interp.start().log_prob(x)), float(o.log_prob(0.0, x)), rtol=1e-12
        )
    want = scipy.special.logsumexp(
        [
            math.log(W_SRC[j])
            + scipy.stats.multivariate_normal(MU_SRC[j], np.diag(V_SRC[j] + 0.09)).logpdf(XS[0])
            for j in range(2)
        ]
    )
    smoothed = si.StochasticInterpolant(
        si.MixtureSource(src), dj.LinearPath(), si.ConstantGamma(0.3)
    ).start()
    np.testing.assert_allclose(float(smoothed.log_prob(x)), want, rtol=1e-12)
    assert setup["interp"].start() is setup["interp"].source


# ---------------------------------------------------------------------------------------------------------------
# sampling and likelihood through diffjax's solvers
# ---------------------------------------------------------------------------------------------------------------
TRACES = []


class _Counting(eqx.Module):
    """The oracle's velocity, recording each trace (a Python side effect runs only while tracing)."""

    inner: eqx.Module

    def __call__(self, t, x):
        TRACES.append(1)
        return self.inner(t, x)


def test_exact_likelihood_equals_target_density(setup):
    si, interp, tgt = setup["si"], setup["interp"], setup["tgt"]
    xs = tgt.sample(jax.random.PRNGKey(7), 3)

    def run(interp, oracle):
        res = [
            si.log_likelihood_with_stats(interp, _Counting(oracle), x, rtol=1e-8, atol=1e-8)
            for x in xs
        ]
        return jax.tree_util.tree_map(lambda *v: jnp.stack(v), *res)

    res = run(interp, setup["oracle"])
    want = [_np_log_prob(1.0, np.asarray(x)) for x in xs]
    np.testing.assert_allclose(np.asarray(res.log_prob), want, atol=1e-4)
    # control: the same latents scored under N(0, I) instead of the source are far off
    wrong = jax.vmap(si.GaussianSource().log_prob)(res.x0) + res.delta_log_prob
    assert np.min(np.abs(np.asarray(wrong - res.log_prob))) > 0.1
    # a second call with another source and data of the same shapes reuses the program
    n_traces = len(TRACES)
    src2 = setup["dj"].GaussianMixture(W_SRC[::-1], MU_SRC + 0.5, V_SRC * 1.5)
    interp2 = eqx.tree_at(lambda i: i.source, interp, si.MixtureSource(src2))
    res2 = run(interp2, tgt.interpolant_marginal(interp2))
    assert len(TRACES) == n_traces
    np.testing.assert_allclose(
        np.asarray(res2.log_prob), np.asarray(jax.vmap(tgt.log_prob)(xs)), atol=1e-4
    )


def test_samples_from_the_source_match_the_target(setup):
    """ODE samples from the mixture source: their log-densities (same solve) are the target's, their component
    counts pass a chi-square test against the weights and their mean is the target's; control: the source."""
    si, interp, o, tgt = setup["si"], setup["interp"], setup["oracle"], setup["tgt"]
    n = 200
    keys = jax.random.split(jax.random.PRNGKey(11), n)
    res = jax.vmap(lambda k: si.sample_ode(interp, o, k, shape=(2,), log_prob=True))(keys)
    xs = np.asarray(res.samples)
    np.testing.assert_allclose(
        np.asarray(res.log_prob), np.asarray(jax.vmap(tgt.log_prob)(res.samples)), atol=1e-3
    )

    def chi2_p(x):
        logj = np.stack(
            [
                np.log(W_TGT[k])
                + scipy.stats.multivariate_normal(MU_TGT[k], np.diag(V_TGT[k])).logpdf(x)
                for k in range(3)
            ],
            1,
        )
        counts = np.bincount(np.argmax(logj, 1), minlength=3)
        return scipy.stats.chisquare(counts, W_TGT * len(x)).pvalue

    # components overlap little, so the most likely component is (almost) the one drawn from
    assert chi2_p(xs) > 1e-3
    mean = W_TGT @ MU_TGT
    assert np.all(np.abs(xs.mean(0) - mean) < 5 * xs.std(0) / math.sqrt(n))
    x_src = np.asarray(setup["src"].sample(jax.random.PRNGKey(12), n))
    assert np.any(np.abs(x_src.mean(0) - mean) > 5 * x_src.std(0) / math.sqrt(n))


# ---------------------------------------------------------------------------------------------------------------
# the interpolant's functions: closed forms, jit/vmap/grad, bad inputs
# ---------------------------------------------------------------------------------------------------------------
def test_interpolate_and_target_closed_form_jit_vmap_grad(setup):
    si, interp = setup["si"], setup["interp"]
    x0, x1, z = (jnp.asarray(v) for v in ([0.5, -1.0], [2.0, 0.3], [0.1, 0.7]))
    t = 0.3
    a, b, g2, da, db, ggd = _coef(t)
    g = math.sqrt(g2)
    want_x = a * np.asarray(x1) + b * np.asarray(x0) + g * np.asarray(z)
    want_u = da * np.asarray(x1) + db * np.asarray(x0) + ggd / g * np.asarray(z)
    np.testing.assert_allclose(np.asarray(si.interpolate(interp, t, x0, x1, z)), want_x, rtol=1e-14)
    np.testing.assert_allclose(
        np.asarray(si.conditional_velocity(interp, t, x0, x1, z)), want_u, rtol=1e-14
    )
    ts = jnp.asarray([0.1, 0.3, 0.7])
    f = jax.jit(jax.vmap(lambda i, t: si.interpolate(i, t, x0, x1, z), (None, 0)))
    np.testing.assert_allclose(np.asarray(f(interp, ts))[1], want_x, rtol=1e-14)
    # d x_t / dt is the conditional target (grad vs the closed form and finite differences)
    jac = jax.jacfwd(lambda t: si.interpolate(interp, t, x0, x1, z))(0.3)
    np.testing.assert_allclose(np.asarray(jac), want_u, rtol=1e-12)
    fd = (
        np.asarray(si.interpolate(interp, t + 1e-6, x0, x1, z))
        - np.asarray(si.interpolate(interp, t - 1e-6, x0, x1, z))
    ) / 2e-6
    np.testing.assert_allclose(np.asarray(jac), fd, rtol=1e-6)
    # gradient of the oracle's log-density w.r.t. the source means vs finite differences
    o = setup["oracle"]
    lp = jax.jit(lambda o: o.log_prob(0.4, jnp.asarray(XS[0])))
    gm = jax.jit(jax.grad(lambda o: o.log_prob(0.4, jnp.asarray(XS[0]))))(o).source.means
    h = 1e-6
    o_p = eqx.tree_at(lambda o: o.source.means, o, o.source.means.at[1, 0].add(h))
    o_m = eqx.tree_at(lambda o: o.source.means, o, o.source.means.at[1, 0].add(-h))
    np.testing.assert_allclose(
        float(gm[1, 0]), (float(lp(o_p)) - float(lp(o_m))) / (2 * h), rtol=1e-6
    )
    # a bad traced time is caught at run time
    with pytest.raises(Exception, match="t must lie in"):
        jax.jit(lambda t: si.interpolate(interp, t, x0, x1, z))(1.5)


def test_bad_inputs(setup):
    dj, si, interp, tgt = setup["dj"], setup["si"], setup["interp"], setup["tgt"]
    o = setup["oracle"]
    x = jnp.zeros(2)
    emp = si.StochasticInterpolant(
        si.EmpiricalSource(np.asarray(tgt.sample(jax.random.PRNGKey(0), 5)))
    )
    with pytest.raises(ValueError, match="no log-density"):
        si.log_likelihood(emp, o, x)
    with pytest.raises(ValueError, match="no log-density"):
        si.sample_ode(emp, o, jax.random.PRNGKey(0), shape=(2,), log_prob=True)
    with pytest.raises(ValueError, match="Gaussian or Gaussian-mixture source"):
        tgt.interpolant_marginal(emp)
    # mismatched shapes: source (2,) against data (3,)
    with pytest.raises(ValueError, match="shape"):
        si.interpolate(interp, 0.5, jnp.zeros(2), jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(ValueError, match="example shape"):
        si.interpolate(interp, 0.5, jnp.zeros(3), jnp.zeros(3), jnp.zeros(3))
    with pytest.raises(ValueError, match="example shape"):
        si.log_likelihood(interp, o, jnp.zeros(3))
    with pytest.raises(ValueError, match="example shape"):
        si.sample_ode(interp, o, jax.random.PRNGKey(0), shape=(3,))
    with pytest.raises(ValueError, match="shape"):
        dj.GaussianMixture([1.0], [[0.0, 0.0, 0.0]], 1.0).interpolant_marginal(interp)
    with pytest.raises(ValueError, match="z is required"):
        si.interpolate(interp, 0.5, x, x)
    # paths that do not run from the source to the data, or are singular at an end
    for path in (dj.VPPath(), dj.SigmaMinPath(0.1), dj.ICFMPath(0.2), dj.PolynomialPath(0.5)):
        with pytest.raises(ValueError, match="StochasticInterpolant"):
            si.StochasticInterpolant(si.GaussianSource(), path)
    for make, arg in [
        (lambda: si.StochasticInterpolant(tgt), "source"),
        (lambda: si.StochasticInterpolant(si.GaussianSource(), "linear"), "path"),
        (lambda: si.BrownianGamma(-1.0), "scale"),
        (lambda: si.GaussianSource(0.0, 0.0), "scale"),
        (lambda: si.EmpiricalSource(np.zeros(3)), "points"),
    ]:
        with pytest.raises(ValueError, match=arg):
            make()
    for name in ("t0", "prior_log_prob"):
        with pytest.raises(ValueError, match=name):
            si.log_likelihood(interp, o, x, **{name: None})
    # negative control: valid constructions and draws work
    for path in (dj.LinearPath(), dj.CosinePath(), dj.PolynomialPath(2.0), dj.SigmaMinPath(0.0)):
        si.StochasticInterpolant(si.GaussianSource(), path)
    xt, u = si.sample_conditional(emp, jax.random.PRNGKey(1), 0.5, x)
    assert xt.shape == u.shape == (2,)
