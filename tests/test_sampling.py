"""Tests for diffjax.sampling against independent references.

Time convention: t = 0 is noise, t = 1 is data; samplers run from t0 (prior) to t1 (data).

References: the analytic Gaussian mixture (exact fields, exact samples, exact log-density), a calibrated two-sample
MMD test whose null distribution comes from true-vs-true draws, closed-form EDM σ grids written here in numpy,
high-accuracy adaptive solves for fixed-step convergence orders, and finite differences for gradients.
Negative controls (a wrong drift, a wrong mixture) must be rejected by the same test. Everything runs in float64.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax as dj
from diffjax.analytic import GaussianMixture
from diffjax.sampling import (
    GRID_KINDS,
    forward_sde_diffusion,
    sample_ode,
    sample_sde,
    time_grid,
)


@pytest.fixture(autouse=True, scope="module")
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


# under jit equinox raises EquinoxRuntimeError; eagerly the same message arrives in a JaxRuntimeError
RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)

W = [0.5, 0.3, 0.2]
MU = [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]]
VAR = [[0.3, 0.5], [0.4, 0.2], [0.6, 0.3]]


def mixture():
    return GaussianMixture(W, MU, VAR)


# ---------------------------------------------------------------------------------------------------------------
# statistics helpers (independent of diffjax.sampling)
# ---------------------------------------------------------------------------------------------------------------
def _mmd2(x, y, bw):
    """Unbiased MMD² with the RBF kernel exp(−‖a − b‖²/(2 bw²))."""

    @jax.jit
    def k(a, b):
        d2 = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2 * a @ b.T
        return jnp.exp(-d2 / (2 * bw * bw))

    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    sxx = (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
    syy = (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    return sxx + syy - 2 * jnp.mean(kxy)


_NULL_CACHE = {}


def _mmd_null(gm, n, reps=100):
    """Bandwidth (median heuristic on true samples) and the 99th percentile of MMD² between two independent
    sets of n true samples: the calibrated rejection threshold."""
    if (n, gm.dim) in _NULL_CACHE:
        return _NULL_CACHE[(n, gm.dim)]
    pool = gm.sample(jax.random.PRNGKey(1234), 2000)
    d = jnp.sqrt(jnp.sum((pool[:1000, None] - pool[None, 1000:]) ** 2, -1))
    bw = float(jnp.median(d))
    keys = jax.random.split(jax.random.PRNGKey(99), reps)

    @jax.jit
    def one(k):
        ka, kb = jax.random.split(k)
        return _mmd2(gm.sample(ka, n), gm.sample(kb, n), bw)

    null = np.asarray(jax.lax.map(one, keys))
    out = bw, float(np.quantile(null, 0.99))
    _NULL_CACHE[(n, gm.dim)] = out
    return out


def _matches(gm, samples, key=None):
    """(MMD test passes, moments within 4 SE, details)."""
    samples = jnp.asarray(samples)
    n = samples.shape[0]
    key = jax.random.PRNGKey(7) if key is None else key
    bw, thr = _mmd_null(gm, n)
    ref = gm.sample(key, n)
    mmd = float(_mmd2(samples, ref, bw))
    # moments: SEs from a large true sample (fourth moments for the covariance entries)
    big = np.asarray(gm.sample(jax.random.PRNGKey(4321), 50_000))
    mean, cov = np.asarray(gm.mean()), np.asarray(gm.covariance())
    c = big - mean
    prods = c[:, :, None] * c[:, None, :]
    se_mean = np.sqrt(np.diag(cov) / n)
    se_cov = np.sqrt(prods.reshape(len(big), -1).var(0) / n).reshape(cov.shape)
    s = np.asarray(samples)
    z_mean = np.abs(s.mean(0) - mean) / se_mean
    z_cov = np.abs(np.cov(s.T, bias=True) - cov) / se_cov
    moments_ok = bool(np.all(z_mean < 4) and np.all(z_cov < 4))
    info = f"mmd2={mmd:.3g} thr={thr:.3g} z_mean={z_mean} z_cov={z_cov.ravel()}"
    return mmd <= thr, moments_ok, info


def _exact_marginal(gm, path, t, key, n):
    """n exact draws of x_t = α_t x + σ_t ε."""
    kx, ke = jax.random.split(key)
    a, s = path.alpha(t), path.sigma(t)
    return a * gm.sample(kx, n) + s * jax.random.normal(ke, (n, gm.dim))


# ---------------------------------------------------------------------------------------------------------------
# time grids
# ---------------------------------------------------------------------------------------------------------------
GRID_PATHS = {
    "linear": dj.LinearPath,
    "cosine": dj.CosinePath,
    "vp": dj.VPPath,
    "ve": dj.VEPath,
    "edm": dj.EDMPath,
}


@pytest.mark.parametrize("name", list(GRID_PATHS))
@pytest.mark.parametrize("kind", GRID_KINDS)
def test_time_grid_increasing_with_exact_ends(name, kind):
    path = GRID_PATHS[name]()
    for t0, t1, n in [(None, None, 17), (0.1, 0.9, 5)]:
        ts = np.asarray(time_grid(path, n, kind, t0=t0, t1=t1))
        lo = path.t_min if t0 is None else t0
        hi = path.t_max if t1 is None else t1
        assert ts.shape == (n + 1,)
        assert ts[0] == lo and ts[-1] == hi
        assert np.all(np.diff(ts) > 0), ts


def test_log_snr_grid_is_uniform_in_log_snr():
    # VP (finite λ at both ends): λ_t = −log(e^Γ − 1), Γ = ½s²(β_max − β_min) + sβ_min, s = 1 − t (numpy)
    path = dj.VPPath()
    ts = np.asarray(time_grid(path, 12, "log_snr"))
    s = 1.0 - ts
    gam = 0.5 * s**2 * (20.0 - 0.1) + s * 0.1
    lam = -np.log(np.expm1(gam))
    np.testing.assert_allclose(np.diff(lam), np.full(12, (lam[-1] - lam[0]) / 12), rtol=1e-6)
    # LinearPath: λ = 2 logit(t) is infinite at both ends; clipped at t = 1e-3 and 1 − 1e-3
    ts = np.asarray(time_grid(dj.LinearPath(), 10, "log_snr"))
    lam_ends = 2 * np.log(1e-3 / (1 - 1e-3))
    lam = 2 * np.log(ts[1:-1] / (1 - ts[1:-1]))
    np.testing.assert_allclose(lam, lam_ends + np.arange(1, 10) * (-2 * lam_ends) / 10, atol=1e-9)


def test_edm_grid_matches_closed_form_sigma():
    sigma_min, sigma_max, rho, n = 0.002, 80.0, 7.0, 18
    path = dj.EDMPath(sigma_min, sigma_max, rho)
    ts = time_grid(path, n, "edm", rho=rho)
    i = np.arange(n + 1)
    sig = (
        sigma_max ** (1 / rho) + i / n * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    np.testing.assert_allclose(np.asarray(jax.vmap(path.sigma)(ts)), sig, rtol=1e-10)
    # on EDMPath, uniform-in-t is exactly the ρ-grid
    np.testing.assert_allclose(np.asarray(ts), i / n, atol=1e-12)
    # a different ρ on VEPath (α = 1): σ_i follows the closed form with that path's σ range
    ve = dj.VEPath(0.01, 50.0)
    ts = time_grid(ve, n, "edm", rho=3.0)
    sig = (50.0 ** (1 / 3) + i / n * (0.01 ** (1 / 3) - 50.0 ** (1 / 3))) ** 3
    np.testing.assert_allclose(np.asarray(jax.vmap(ve.sigma)(ts)), sig, rtol=1e-9)


def test_time_grid_bad_input():
    path = dj.LinearPath()
    with pytest.raises(ValueError, match="grid kind"):
        time_grid(path, 10, "karras")
    with pytest.raises(ValueError, match="num_steps"):
        time_grid(path, 0)
    with pytest.raises(ValueError, match="t0"):
        time_grid(path, 10, t0=0.8, t1=0.2)
    with pytest.raises(ValueError, match="rho"):
        time_grid(path, 10, "edm", rho=-1.0)


def test_time_grid_jit_matches_eager():
    path = dj.CosinePath()
    for kind in GRID_KINDS:
        eager = time_grid(path, 9, kind, t0=0.05, t1=0.95)
        jitted = jax.jit(lambda a, b, k=kind: time_grid(path, 9, k, t0=a, t1=b))(0.05, 0.95)
        np.testing.assert_allclose(jitted, eager, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# distributional tests against the mixture
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pathname", ["linear", "cosine"])
def test_ode_samples_match_mixture(pathname):
    gm = mixture()
    path = GRID_PATHS[pathname]()
    u = gm.model("velocity", path)
    keys = jax.random.split(jax.random.PRNGKey(0), 1000)
    res = jax.jit(jax.vmap(lambda k: sample_ode(u, path, k, shape=(2,))))(keys)
    mmd_ok, mom_ok, info = _matches(gm, res.samples)
    assert mmd_ok and mom_ok, info
    assert int(jnp.max(res.num_steps)) < 200


def _sde_samples(gm, path, diffusion, n, steps, key, score_scale=1.0, x0=None, **kw):
    u = gm.model("velocity", path)
    s0 = gm.model("score", path)
    s = (lambda t, x: score_scale * s0(t, x)) if score_scale != 1.0 else s0
    keys = jax.random.split(key, n)

    def one(k, x):
        return sample_sde(
            u, s, path, k, shape=(2,), x0=x, diffusion=diffusion, num_steps=steps, **kw
        ).samples

    if x0 is None:
        return jax.jit(jax.vmap(lambda k: one(k, None)))(keys)
    return jax.jit(jax.vmap(one))(keys, x0)


SDE_CASES = {
    "g0": (dj.LinearPath, 0.0, {}),
    "g1": (dj.LinearPath, 1.0, {}),
    "forward_vp": (dj.VPPath, "forward", {}),
}


@pytest.mark.parametrize("case", list(SDE_CASES))
def test_sde_samples_match_mixture(case):
    gm = mixture()
    make, g, kw = SDE_CASES[case]
    path = make()
    n = 1000
    x0 = None
    if g == "forward":
        g = forward_sde_diffusion(path)
        # VP's α_0 = 6.6e-3 ≠ 0: start from the exact p_{t0} so that only the sampler is tested
        x0 = _exact_marginal(gm, path, path.t_min, jax.random.PRNGKey(5), n)
    x = _sde_samples(gm, path, g, n, 400, jax.random.PRNGKey(1), x0=x0, **kw)
    mmd_ok, mom_ok, info = _matches(gm, x)
    assert mmd_ok and mom_ok, info


def test_predictor_corrector_matches_mixture_in_16d():
    # score_sde's snr rule η = 2(r‖ξ‖/‖s‖)² relies on ‖s‖ concentrating, i.e. on dimension; in 2-D the per-example
    # ratio is heavy-tailed. So the predictor–corrector sampler is checked on a 16-D mixture.
    d = 16
    mu = np.zeros((2, d))
    mu[0, :4], mu[1, :4] = 1.5, -1.5
    gm = GaussianMixture([0.6, 0.4], mu, [0.5, 0.3])
    path = dj.LinearPath()
    u, s = gm.model("velocity", path), gm.model("score", path)
    keys = jax.random.split(jax.random.PRNGKey(2), 1000)
    x = jax.jit(
        jax.vmap(
            lambda k: (
                sample_sde(
                    u, s, path, k, shape=(d,), diffusion=1.0, num_steps=200, langevin_steps=1
                ).samples
            )
        )
    )(keys)
    mmd_ok, _, info = _matches(gm, x)
    assert mmd_ok, info
    # the snr rule makes η depend on x, so the corrector's invariant density is ∝ p_t·‖∇log p_t‖² (a time-changed
    # Langevin diffusion): variances are inflated by O(1/D) (documented in sample_sde). The mean is unbiased.
    se = np.sqrt(np.diag(np.asarray(gm.covariance())) / x.shape[0])
    assert np.all(np.abs(np.asarray(x).mean(0) - np.asarray(gm.mean())) < 4 * se)


def test_negative_controls_are_rejected():
    gm = mixture()
    path = dj.LinearPath()
    # wrong drift: g² ∇log p instead of ½ g² ∇log p (g = 2)
    x = _sde_samples(gm, path, 2.0, 1000, 400, jax.random.PRNGKey(1), score_scale=2.0)
    mmd_ok, _, info = _matches(gm, x)
    assert not mmd_ok, info
    # true samples from a slightly different mixture (weights and one mean moved)
    wrong = GaussianMixture([0.4, 0.4, 0.2], [[-2.0, 0.0], [2.0, 1.3], [0.0, -2.5]], VAR)
    mmd_ok, _, info = _matches(gm, wrong.sample(jax.random.PRNGKey(3), 1000))
    assert not mmd_ok, info
    # and a positive control of the test itself: fresh true samples pass
    mmd_ok, mom_ok, info = _matches(gm, gm.sample(jax.random.PRNGKey(11), 1000))
    assert mmd_ok and mom_ok, info


# ---------------------------------------------------------------------------------------------------------------
# log-likelihood in the same pass
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pathname", ["linear", "cosine"])
def test_log_prob_matches_mixture_density(pathname):
    gm = mixture()
    path = GRID_PATHS[pathname]()
    u = gm.model("velocity", path)
    x0 = jax.random.normal(jax.random.PRNGKey(3), (8, 2))
    res = jax.jit(
        jax.vmap(
            lambda x: sample_ode(
                u, path, jax.random.PRNGKey(0), x0=x, log_prob=True, rtol=1e-9, atol=1e-9
            )
        )
    )(x0)
    ref = jax.vmap(gm.log_prob)(res.samples)
    np.testing.assert_allclose(res.log_prob, ref, atol=1e-4)
    # negative control: the wrong sign of the divergence integral is far off
    prior = jax.vmap(path.prior.log_prob)(x0)
    wrong = prior - (res.log_prob - prior)
    assert float(jnp.max(jnp.abs(wrong - ref))) > 0.1


def test_log_prob_mid_path_with_exact_start_density():
    # sheet §6.1 recipe: start at t0 > 0 from the exact p_{t0}, compare with the exact p_{t1} at t1 < 1
    gm = mixture()
    path = dj.VPPath()
    u = gm.model("velocity", path)
    t0, t1 = 0.2, 0.9
    x0 = _exact_marginal(gm, path, t0, jax.random.PRNGKey(8), 4)

    def one(x):
        lp0 = gm.marginal_log_prob(path, t0, x)
        return sample_ode(
            u, path, jax.random.PRNGKey(0), x0=x, x0_log_prob=lp0, log_prob=True,
            t0=t0, t1=t1, rtol=1e-9, atol=1e-9,
        )  # fmt: skip

    res = jax.vmap(one)(x0)
    ref = jax.vmap(lambda x: gm.marginal_log_prob(path, t1, x))(res.samples)
    np.testing.assert_allclose(res.log_prob, ref, atol=1e-4)


def test_hutchinson_log_prob_is_unbiased():
    gm = mixture()
    path = dj.LinearPath()
    u = gm.model("velocity", path)
    x0 = jnp.array([0.3, -0.7])
    exact = sample_ode(u, path, jax.random.PRNGKey(0), x0=x0, log_prob=True, rtol=1e-8, atol=1e-8)
    keys = jax.random.split(jax.random.PRNGKey(1), 64)
    est = jax.jit(
        jax.vmap(
            lambda k: sample_ode(
                u, path, k, x0=x0, log_prob=True, trace="hutchinson", num_probes=2,
                rtol=1e-8, atol=1e-8,
            ).log_prob
        )
    )(keys)  # fmt: skip
    se = float(jnp.std(est)) / 8.0
    assert abs(float(jnp.mean(est)) - float(exact.log_prob)) < 4 * se + 1e-6
    assert float(jnp.std(est)) > 0  # probes really vary


# ---------------------------------------------------------------------------------------------------------------
# fixed-step solvers: convergence order and NFE
# ---------------------------------------------------------------------------------------------------------------
def test_fixed_step_convergence_orders():
    gm = mixture()
    path = dj.LinearPath()
    u = gm.model("velocity", path)
    x0 = jax.random.normal(jax.random.PRNGKey(2), (8, 2))
    ref = jax.vmap(
        lambda x: (
            sample_ode(
                u, path, jax.random.PRNGKey(0), x0=x, solver="dopri8", rtol=1e-11, atol=1e-11
            ).samples
        )
    )(x0)

    def err(solver, n):
        r = jax.vmap(
            lambda x: sample_ode(u, path, jax.random.PRNGKey(0), x0=x, solver=solver, num_steps=n)
        )(x0)
        return float(jnp.max(jnp.abs(r.samples - ref))), int(r.nfe[0])

    # Euler reaches its asymptotic rate only beyond ~200 steps here; Heun already at 32
    for solver, order, per_step, ns in [
        ("euler", 1, 1, [256, 512, 1024]),
        ("heun", 2, 2, [32, 64, 128]),
    ]:
        out = [err(solver, n) for n in ns]
        errs = np.array([e for e, _ in out])
        assert [f for _, f in out] == [per_step * n for n in ns]
        ratios = errs[:-1] / errs[1:]
        assert np.all(ratios > 2**order * 0.75) and np.all(ratios < 2**order * 1.3), (solver, errs)


def test_nfe_matches_counted_evaluations():
    gm = mixture()
    path = dj.CosinePath()
    calls = []

    def u(t, x):
        jax.debug.callback(lambda: calls.append(1))
        return gm.velocity(path, t, x)

    x0 = jnp.array([0.5, -1.0])
    for kw in [dict(solver="euler", num_steps=7), dict(solver="heun", num_steps=5), {}]:
        calls.clear()
        r = sample_ode(u, path, jax.random.PRNGKey(0), x0=x0, **kw)
        jax.block_until_ready(r.samples)
        # + one evaluation at each end of [t0, t1] for the failure diagnosis
        assert int(r.nfe) + 2 == len(calls), (kw, int(r.nfe), len(calls))


# ---------------------------------------------------------------------------------------------------------------
# SDE specifics
# ---------------------------------------------------------------------------------------------------------------
def test_sde_g0_equals_ode_euler_and_diffrax_heun_g0_equals_ode_heun():
    gm = mixture()
    path = dj.LinearPath()
    u, s = gm.model("velocity", path), gm.model("score", path)
    x0 = jnp.array([0.4, 1.1])
    k = jax.random.PRNGKey(0)
    for grid in ["uniform", "log_snr"]:
        ode = sample_ode(u, path, k, x0=x0, solver="euler", num_steps=20, grid=grid).samples
        sde = sample_sde(u, s, path, k, x0=x0, diffusion=0.0, num_steps=20, grid=grid).samples
        np.testing.assert_allclose(sde, ode, rtol=1e-12, atol=1e-12)
    ode = sample_ode(u, path, k, x0=x0, solver="heun", num_steps=20).samples
    sde = sample_sde(u, s, path, k, x0=x0, diffusion=0.0, num_steps=20, method=diffrax.Heun())
    np.testing.assert_allclose(sde.samples, ode, rtol=1e-10, atol=1e-10)


def test_em_noise_has_brownian_variance():
    # zero drift, constant g: X_{t1} − X_{t0} ~ N(0, g² (t1 − t0)) per coordinate
    path = dj.LinearPath()
    zero = lambda t, x: jnp.zeros_like(x)
    keys = jax.random.split(jax.random.PRNGKey(4), 4000)
    g = 1.5
    x = jax.jit(
        jax.vmap(
            lambda k: (
                sample_sde(
                    zero, zero, path, k, x0=jnp.zeros(2), diffusion=g, num_steps=50, grid="log_snr"
                ).samples
            )
        )
    )(keys)
    var = np.asarray(x).var(0)
    se = g**2 * np.sqrt(2 / 4000)
    assert np.all(np.abs(var - g**2) < 4 * se), var
    assert abs(float(np.corrcoef(np.asarray(x).T)[0, 1])) < 4 / np.sqrt(4000)


def test_forward_sde_diffusion_vp_is_beta():
    path = dj.VPPath(0.1, 20.0)
    g = forward_sde_diffusion(path)
    for t in [0.0, 0.3, 0.7, 1.0 - 1e-5]:
        assert abs(float(g(t)) ** 2 - (0.1 + (1 - t) * 19.9)) < 1e-8
    # LinearPath: σ²λ̇ = 2(1 − t)/t
    gl = forward_sde_diffusion(dj.LinearPath())
    assert abs(float(gl(0.25)) ** 2 - 2 * 0.75 / 0.25) < 1e-10


def test_sde_save_trajectory_and_final_denoise():
    gm = mixture()
    path = dj.VPPath()
    u, s = gm.model("velocity", path), gm.model("score", path)
    r = sample_sde(
        u, s, path, jax.random.PRNGKey(0), shape=(2,), num_steps=30, save_trajectory=True,
        final_denoise=True, langevin_steps=2,
    )  # fmt: skip
    assert r.trajectory.shape == (31, 2) and r.ts.shape == (31,)
    assert int(r.nfe) == 30 * 3 + 1
    # Tweedie: (x + σ² ∇log p)/α equals the oracle posterior mean at t1
    t1 = path.t_max
    np.testing.assert_allclose(
        r.samples, gm.posterior_mean(path, t1, r.trajectory[-1]), rtol=1e-8, atol=1e-8
    )


# ---------------------------------------------------------------------------------------------------------------
# jit / vmap / grad agree with eager
# ---------------------------------------------------------------------------------------------------------------
def test_jit_and_vmap_match_eager():
    gm = mixture()
    path = dj.CosinePath()
    u, s = gm.model("velocity", path), gm.model("score", path)
    keys = jax.random.split(jax.random.PRNGKey(6), 3)

    def ode(k):
        r = sample_ode(u, path, k, shape=(2,), log_prob=True)
        return r.samples, r.log_prob

    def sde(k):
        return sample_sde(u, s, path, k, shape=(2,), diffusion=0.7, num_steps=40).samples

    for fn in (ode, sde):
        eager = [fn(k) for k in keys]
        batched = jax.jit(jax.vmap(fn))(keys)
        for i, e in enumerate(eager):
            for a, b in zip(jax.tree_util.tree_leaves(e), jax.tree_util.tree_leaves(batched)):
                np.testing.assert_allclose(b[i], a, rtol=1e-7, atol=1e-9)
        jitted = jax.jit(fn)(keys[0])
        for a, b in zip(jax.tree_util.tree_leaves(eager[0]), jax.tree_util.tree_leaves(jitted)):
            np.testing.assert_allclose(b, a, rtol=1e-7, atol=1e-9)


# Gradients of sample_ode (adaptive and fixed, with log_prob) and sample_sde against finite differences are in
# tests/test_gradients.py, with the other public functions.


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
def test_errors():
    gm = mixture()
    path = dj.LinearPath()
    u, s = gm.model("velocity", path), gm.model("score", path)
    k = jax.random.PRNGKey(0)
    # eager: equinox surfaces the same message through a JaxRuntimeError
    with pytest.raises(RUNTIME_ERRORS, match="max_steps"):
        jax.block_until_ready(sample_ode(u, path, k, shape=(2,), max_steps=2).samples)
    with pytest.raises(RUNTIME_ERRORS, match="max_steps"):
        jax.jit(lambda k: sample_ode(u, path, k, shape=(2,), max_steps=2).samples)(
            k
        ).block_until_ready()
    with pytest.raises(ValueError, match="grid"):
        sample_ode(u, path, k, shape=(2,), num_steps=5, grid="karras")
    with pytest.raises(ValueError, match="solver"):
        sample_ode(u, path, k, shape=(2,), solver="rk4")
    with pytest.raises(ValueError, match="num_steps"):
        sample_ode(u, path, k, shape=(2,), solver="euler")
    with pytest.raises(ValueError, match="trace"):
        sample_ode(u, path, k, shape=(2,), log_prob=True, trace="skilling")
    with pytest.raises(ValueError, match="method"):
        sample_sde(u, s, path, k, shape=(2,), method="milstein")
    with pytest.raises(ValueError, match="grid"):
        sample_sde(u, s, path, k, shape=(2,), grid="cosine")
    with pytest.raises(ValueError, match="diffusion"):
        sample_sde(u, s, path, k, shape=(2,), diffusion=-1.0)
    with pytest.raises(RUNTIME_ERRORS, match="diffusion"):
        jax.block_until_ready(
            sample_sde(u, s, path, k, shape=(2,), diffusion=lambda t: t - 0.5, num_steps=10).samples
        )
    with pytest.raises(ValueError, match="shape"):
        sample_ode(u, path, k)
    # a singular velocity gives non-finite samples → error, not silent NaNs
    bad = lambda t, x: x / (t - 0.5)  # singular at the grid point t = 0.5
    with pytest.raises(RUNTIME_ERRORS):
        jax.block_until_ready(
            sample_sde(bad, s, path, k, shape=(2,), diffusion=0.0, num_steps=4).samples
        )


# ---------------------------------------------------------------------------------------------------------------
# integration_interval: where a kind's velocity is finite
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pathname", list(GRID_PATHS))
def test_integration_interval_avoids_exactly_the_singular_ends(pathname):
    path = GRID_PATHS[pathname]()
    lo, hi = float(path.t_min), float(path.t_max)
    x_t = jnp.array([0.3, -1.2])
    pred = jnp.array([0.7, 0.4])
    for kind in dj.KINDS:
        t0, t1 = (float(v) for v in dj.integration_interval(path, kind))
        # independent closed form: data divides by σ, eps/score by α (formulas sheet §1.3)
        a0, s1 = float(path.alpha(lo)), float(path.sigma(hi))
        want0 = lo + 1e-3 if kind in ("eps", "score") and a0 == 0.0 else lo
        want1 = hi - 1e-3 if kind == "data" and s1 == 0.0 else hi
        np.testing.assert_allclose([t0, t1], [want0, want1], atol=1e-7, err_msg=kind)
        for t in (t0, t1):
            u = dj.convert(pred, src=kind, dst="velocity", path=path, t=t, x_t=x_t)
            assert np.all(np.isfinite(np.asarray(u))), (pathname, kind, t)
        jt = jax.jit(lambda p, kind=kind: dj.integration_interval(p, kind))(path)
        np.testing.assert_allclose([float(v) for v in jt], [t0, t1], atol=1e-7)
    if pathname in ("linear", "cosine"):  # negative control: the raw ends really are singular
        bad = [
            dj.convert(pred, src="data", dst="velocity", path=path, t=1.0, x_t=x_t),
            dj.convert(pred, src="eps", dst="velocity", path=path, t=0.0, x_t=x_t),
        ]
        assert not any(np.all(np.isfinite(np.asarray(b))) for b in bad)
    with pytest.raises(ValueError, match="kind"):
        dj.integration_interval(path, "noise")
    with pytest.raises(ValueError, match="margin"):
        dj.integration_interval(path, "data", margin=0.0)


def test_data_model_on_linear_path_samples_on_its_interval():
    gm = mixture()
    path = dj.LinearPath()
    u = dj.velocity_field(gm.model("data", path), "data", path)
    k = jax.random.PRNGKey(3)
    # over [0, 1] the field is 0/0 at t = 1: a clear solver error, not a misleading time error or NaNs
    # (the ends are probed whatever the step budget: a small one keeps the failing solve short)
    with pytest.raises(RUNTIME_ERRORS, match="NaN/inf at an end"):
        jax.block_until_ready(sample_ode(u, path, k, shape=(2,), max_steps=64).samples)
    t0, t1 = dj.integration_interval(path, "data")
    keys = jax.random.split(jax.random.PRNGKey(0), 1000)
    xs = jax.jit(jax.vmap(lambda k: sample_ode(u, path, k, shape=(2,), t0=t0, t1=t1).samples))(keys)
    mmd_ok, mom_ok, info = _matches(
        gm, xs
    )  # σ_{t1} = 1e-3 of leftover noise is far below the tolerance
    assert mmd_ok and mom_ok, info
