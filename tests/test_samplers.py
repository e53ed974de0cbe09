"""Tests for diffjax.samplers (DDIM, DPM-Solver++ 2M/3M, UniPC, EDM Heun, Euler) against independent references.

Time convention: t = 0 is noise, t = 1 is data; samplers run from t0 (noise) to t1 (data).

References: the closed-form PF-ODE flow of a Gaussian (x_t − α_t μ = (x_0 − α_0 μ)·√((α_t² s² + σ_t²)/(α_0² s² +
σ_0²)) per coordinate, written out here in numpy), high-accuracy adaptive diffrax solves of the Gaussian mixture's
exact velocity, evaluation counts by a host callback, and finite differences for gradients. Negative controls: a
first-order method must fail the second-order bound, a perturbed model must fail the accuracy bound.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax as dj
from diffjax import samplers as S
from diffjax.analytic import GaussianMixture

RUNTIME_ERRORS = (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError)


@pytest.fixture(autouse=True, scope="module")
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


MU = np.array([0.7, -0.4])
S2 = np.array([0.05, 0.3])
X0 = np.array([[1.0, -0.5], [-0.3, 0.8], [0.2, 1.7], [-1.4, -0.9]])


def _gaussian():
    return GaussianMixture(jnp.ones(1), jnp.asarray(MU)[None], jnp.asarray(S2)[None])


def _gaussian_flow(path, t0, t1, x0):
    """The exact PF-ODE map of the data N(μ, diag s²) from t0 to t1, in numpy."""
    a0, s0 = float(path.alpha(t0)), float(path.sigma(t0))
    a1, s1 = float(path.alpha(t1)), float(path.sigma(t1))
    scale = np.sqrt((a1**2 * S2 + s1**2) / (a0**2 * S2 + s0**2))
    return a1 * MU + (x0 - a0 * MU) * scale


def _endpoint_errors(sampler, path, kind, steps, grid="log_snr"):
    model = _gaussian().model(kind, path)
    t0, t1 = dj.integration_interval(path, kind)
    exact = _gaussian_flow(path, t0, t1, X0)
    errs = []
    for n in steps:
        res = jax.vmap(
            lambda x0: S.sample(
                sampler, model, kind, path, jax.random.key(0), x0=x0, num_steps=n, grid=grid
            )
        )(jnp.asarray(X0))
        errs.append(float(np.mean(np.linalg.norm(np.asarray(res.samples) - exact, axis=-1))))
    return np.asarray(errs)


def _order(steps, errs):
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0]


# ---------------------------------------------------------------------------------------------------------------
# orders of convergence against the closed-form Gaussian flow
# ---------------------------------------------------------------------------------------------------------------
ORDERS = [
    ("euler", "uniform", 1.0),
    ("ddim", "log_snr", 1.0),
    ("dpmpp_2m", "log_snr", 2.0),
    ("dpmpp_3m", "log_snr", 3.0),
    ("unipc", "log_snr", 3.0),
    ("edm_heun", "log_snr", 2.0),
]


@pytest.mark.parametrize("name, grid, order", ORDERS)
def test_order_of_convergence_vp_eps(name, grid, order):
    steps = [20, 40, 80]
    errs = _endpoint_errors(name, dj.paths.VPPath(), "eps", steps, grid)
    measured = _order(steps, errs)
    # the Gaussian's flow is linear, so a method may converge faster than its order (3M: ~4), never slower
    assert order - 0.35 <= measured <= order + 1.3, (name, errs, measured)


def test_second_order_bound_rejects_a_first_order_method():
    """Negative control: DDIM does not pass the bound that DPM-Solver++ 2M passes."""
    steps = [20, 40, 80]
    assert _order(steps, _endpoint_errors("ddim", dj.paths.VPPath(), "eps", steps)) < 2.0 - 0.35


@pytest.mark.parametrize("path_name", ["cosine", "linear"])
def test_multistep_converges_on_paths_with_vanishing_alpha_or_sigma(path_name):
    """CosinePath (α = 0 at t = 0, σ = 0 at t = 1) with an ε-model and LinearPath with a velocity model run from
    t = 0 to t = 1 (the final step to σ = 0 is the denoising step x = α·D)."""
    path = dj.paths.CosinePath() if path_name == "cosine" else dj.paths.LinearPath()
    kind = "eps" if path_name == "cosine" else "velocity"
    names = ("dpmpp_2m", "unipc") if path_name == "cosine" else ("dpmpp_3m", "edm_heun")
    for name in names:
        errs = _endpoint_errors(name, path, kind, [10, 40])
        assert np.all(np.isfinite(errs)), (name, errs)
        assert errs[1] < 1e-2 and errs[1] < errs[0] / 3, (name, errs)


def test_every_kind_gives_the_same_samples():
    """The sampler converts any kind exactly: eps, data, velocity and score models of the same mixture agree."""
    gm = GaussianMixture([0.6, 0.4], [[1.0, 0.0], [-1.0, 0.5]], [[0.1, 0.2], [0.3, 0.1]])
    path = dj.paths.VPPath()
    t0, t1 = dj.integration_interval(path, "eps")
    outs = [
        S.sample(
            "dpmpp_2m",
            gm.model(k, path),
            k,
            path,
            jax.random.key(3),
            x0=jnp.asarray(X0[0]),
            num_steps=12,
            t0=t0,
            t1=t1,
        ).samples
        for k in ("eps", "data", "velocity", "score")
    ]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], atol=1e-9)


class _Offset(eqx.Module):
    """``model(t, x) + delta``: a perturbed model with the same PyTree structure as the exact one."""

    model: object
    delta: jax.Array

    def __call__(self, t, x):
        return self.model(t, x) + self.delta


# ---------------------------------------------------------------------------------------------------------------
# the mixture against an adaptive reference solve
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixture_case():
    gm = GaussianMixture(
        [0.5, 0.3, 0.2],
        [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
        [[0.3, 0.5], [0.4, 0.2], [0.6, 0.3]],
    )
    path = dj.paths.VPPath()
    model = gm.model("eps", path)
    t0, t1 = dj.integration_interval(path, "eps")
    x0 = jnp.asarray(X0)
    u = dj.velocity_field(model, "eps", path)
    ref = jax.vmap(
        lambda x: (
            dj.sample_ode(
                u,
                path,
                jax.random.key(1),
                x0=x,
                solver="dopri8",
                rtol=1e-11,
                atol=1e-11,
                t0=t0,
                t1=t1,
                max_steps=20000,
            ).samples
        )
    )(x0)
    return gm, path, model, x0, np.asarray(ref)


def test_multistep_beats_euler_at_equal_evaluations(mixture_case):
    """At 40 evaluations every exponential integrator (λ-uniform grid) beats Euler (uniform grid) at 40, and UniPC and
    DPM-Solver++ 3M beat Euler at 80; a model perturbed by 1e-2 in ε fails the bound (negative control)."""
    gm, path, model, x0, ref = mixture_case

    def err(name, n, delta=0.0, grid="log_snr"):
        m = _Offset(model, jnp.asarray(delta))  # one program for the model and its perturbed copy
        res = jax.vmap(
            lambda x: S.sample(
                name, m, "eps", path, jax.random.key(0), x0=x, num_steps=n, grid=grid
            )
        )(x0)
        return float(np.mean(np.linalg.norm(np.asarray(res.samples) - ref, axis=-1)))

    euler40, euler80 = err("euler", 40, grid="uniform"), err("euler", 80, grid="uniform")
    for name in ("dpmpp_2m", "dpmpp_3m", "unipc"):
        assert err(name, 40) < euler40, name
    assert err("unipc", 40) < euler80 and err("dpmpp_3m", 40) < euler80
    assert err("unipc", 40, delta=1e-2) > euler80


# ---------------------------------------------------------------------------------------------------------------
# evaluations counted, jit / vmap / grad
# ---------------------------------------------------------------------------------------------------------------
class _Counting(eqx.Module):
    model: object

    def __call__(self, t, x):
        jax.debug.callback(lambda: _CALLS.append(1))
        return self.model(t, x)


_CALLS: list = []


@pytest.mark.parametrize(
    "name, path_name, n, expected",
    [
        ("euler", "vp", 7, 7),
        ("ddim", "vp", 7, 7),
        ("dpmpp_2m", "vp", 7, 7),
        ("dpmpp_3m", "vp", 7, 7),
        ("unipc", "vp", 7, 7),
        ("edm_heun", "vp", 7, 14),
        (
            "edm_heun",
            "linear",
            7,
            12,
        ),  # the first step starts at α = 0 and the last ends at σ = 0: both Euler
    ],
)
def test_nfe_is_the_number_of_model_calls(name, path_name, n, expected):
    path = dj.paths.VPPath() if path_name == "vp" else dj.paths.LinearPath()
    kind = "eps" if path_name == "vp" else "velocity"
    model = _Counting(_gaussian().model(kind, path))
    _CALLS.clear()
    res = S.sample(name, model, kind, path, jax.random.key(0), x0=jnp.asarray(X0[0]), num_steps=n)
    jax.block_until_ready(res.samples)
    jax.effects_barrier()
    assert int(res.nfe) == expected == len(_CALLS)


def test_no_recompile_on_new_parameters_and_vmap_matches_loop():
    path = dj.paths.VPPath()
    traces = []

    class Model(eqx.Module):
        gm: GaussianMixture

        def __call__(self, t, x):
            traces.append(1)
            return self.gm.predict("eps", path, t, x)

    def gm(shift):
        return GaussianMixture([0.5, 0.5], [[shift, 0.0], [-1.0, 0.5]], [[0.1, 0.2], [0.3, 0.1]])

    keys = jax.random.split(jax.random.key(5), 3)
    batch = jax.vmap(
        lambda k: S.sample("unipc", Model(gm(1.0)), "eps", path, k, shape=(2,), num_steps=8).samples
    )
    out = batch(keys)
    n_traces = len(traces)
    batch(keys)
    jax.vmap(
        lambda k: S.sample("unipc", Model(gm(2.0)), "eps", path, k, shape=(2,), num_steps=8).samples
    )(keys)
    assert len(traces) == n_traces  # same shapes, new leaves: the compiled program is reused
    loop = np.stack(
        [
            S.sample("unipc", Model(gm(1.0)), "eps", path, k, shape=(2,), num_steps=8).samples
            for k in keys
        ]
    )
    np.testing.assert_allclose(out, loop, atol=1e-12)


@pytest.mark.parametrize("name", ["dpmpp_3m", "unipc", "edm_heun"])
def test_gradient_matches_finite_differences(name):
    path = dj.paths.VPPath()
    model = _gaussian().model("eps", path)

    def f(x0):
        return jnp.sum(
            jnp.sin(
                S.sample(name, model, "eps", path, jax.random.key(0), x0=x0, num_steps=9).samples
            )
        )

    x0 = jnp.asarray(X0[1])
    g = jax.grad(f)(x0)
    h = 1e-6
    fd = np.array([(f(x0.at[i].add(h)) - f(x0.at[i].add(-h))) / (2 * h) for i in range(2)])
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def test_edm_churn_samples_the_data_distribution():
    """With the exact model, EDM's stochastic sampler (churn) draws from the data Gaussian: mean and variance within
    5 standard errors; the same key gives the same sample and another key another one."""
    path = dj.paths.VPPath()
    model = _gaussian().model("eps", path)
    sampler = S.EDMHeun(churn=30.0)
    keys = jax.random.split(jax.random.key(7), 2000)
    xs = np.asarray(
        jax.vmap(
            lambda k: S.sample(sampler, model, "eps", path, k, shape=(2,), num_steps=32).samples
        )(keys)
    )
    n = xs.shape[0]
    assert np.all(np.abs(xs.mean(0) - MU) < 5 * np.sqrt(S2 / n))
    assert np.all(np.abs(xs.var(0) - S2) < 5 * S2 * np.sqrt(2 / n))
    a = S.sample(sampler, model, "eps", path, keys[0], shape=(2,), num_steps=32).samples
    np.testing.assert_allclose(a, xs[0], atol=1e-12)
    assert not np.allclose(xs[0], xs[1])


def test_float32_default_accuracy(mixture_case):
    """In float32 (the default dtype) UniPC at 20 steps is within 5e-3 of the float64 reference."""
    gm, path, model, x0, ref = mixture_case
    jax.config.update("jax_enable_x64", False)
    try:
        p32 = dj.paths.VPPath()
        m32 = GaussianMixture(
            [0.5, 0.3, 0.2],
            [[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]],
            [[0.3, 0.5], [0.4, 0.2], [0.6, 0.3]],
        ).model("eps", p32)
        res = jax.vmap(
            lambda x: S.sample("unipc", m32, "eps", p32, jax.random.key(0), x0=x, num_steps=40)
        )(jnp.asarray(np.asarray(x0), jnp.float32))
        assert res.samples.dtype == jnp.float32
        assert float(np.mean(np.linalg.norm(np.asarray(res.samples) - ref, axis=-1))) < 5e-3
    finally:
        jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------------------------------------------------------
# grids and bad inputs
# ---------------------------------------------------------------------------------------------------------------
def test_shifted_grid_is_sd3_shift_on_the_linear_path():
    ts = np.asarray(dj.time_grid(dj.paths.LinearPath(), 8, "shifted", shift=3.0))
    tau = 1.0 - np.linspace(0.0, 1.0, 9)
    np.testing.assert_allclose(ts, 1.0 - 3.0 * tau / (1.0 + 2.0 * tau), atol=1e-15)
    lam = np.log(ts[1:-1] ** 2 / (1 - ts[1:-1]) ** 2)
    lam_uniform = np.log((1 - tau[1:-1]) ** 2 / tau[1:-1] ** 2)
    np.testing.assert_allclose(
        lam, lam_uniform - 2 * np.log(3.0), atol=1e-12
    )  # λ lowered by 2 log s
    vp = np.asarray(dj.time_grid(dj.paths.VPPath(), 10, "shifted", shift=3.0))
    assert np.all(np.diff(vp) > 0)


def test_custom_grid_array():
    path = dj.paths.VPPath()
    model = _gaussian().model("eps", path)
    t0, t1 = (float(v) for v in dj.integration_interval(path, "eps"))
    ts = jnp.asarray(dj.time_grid(path, 12, "log_snr", t0=t0, t1=t1))
    a = S.sample(
        "dpmpp_2m", model, "eps", path, jax.random.key(0), x0=jnp.asarray(X0[0]), grid=ts
    ).samples
    b = S.sample(
        "dpmpp_2m", model, "eps", path, jax.random.key(0), x0=jnp.asarray(X0[0]), num_steps=12
    ).samples
    np.testing.assert_allclose(a, b, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sampler="dpm++"), "unknown sampler"),
        (dict(sampler="dpmpp_3m", num_steps=2), "needs num_steps >= 3"),
        (dict(sampler="unipc", num_steps=1), "needs num_steps >= 2"),
        (dict(num_steps=None, grid=jnp.array([0.0, 0.5, 0.4, 1.0])), "increase strictly"),
        (dict(grid="karras"), "unknown grid"),
        (dict(num_steps=0), "num_steps must be a Python int >= 1"),
        (dict(num_steps=3, grid=jnp.array([0.0, 0.5, 1.0])), "the grid has 2 steps"),
        (dict(t0=0.6, t1=0.5), "need 0 <= t0 < t1 <= 1"),
    ],
)
def test_bad_inputs_are_refused_with_clear_errors(kwargs, match):
    path = dj.paths.VPPath()
    args = dict(sampler="dpmpp_2m", num_steps=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sampler = args.pop("sampler")
        S.sample(
            sampler,
            _gaussian().model("eps", path),
            "eps",
            path,
            jax.random.key(0),
            shape=(2,),
            **args,
        )


def test_edm_heun_refuses_negative_parameters():
    with pytest.raises(ValueError, match="churn must be >= 0"):
        S.EDMHeun(churn=-1.0)


def test_traced_bad_grid_and_nonfinite_x0_raise_at_run_time():
    path = dj.paths.VPPath()
    model = _gaussian().model("eps", path)
    f = jax.jit(
        lambda ts: (
            S.sample(
                "ddim", model, "eps", path, jax.random.key(0), x0=jnp.zeros(2), grid=ts
            ).samples
        )
    )
    with pytest.raises(RUNTIME_ERRORS, match="increase strictly"):
        jax.block_until_ready(f(jnp.array([0.0, 0.5, 0.4, 0.9])))
    with pytest.raises(RUNTIME_ERRORS, match="x0 holds NaN"):
        S.sample(
            "ddim", model, "eps", path, jax.random.key(0), x0=jnp.array([jnp.nan, 0.0]), num_steps=4
        )
    res = S.sample(
        "ddim",
        model,
        "eps",
        path,
        jax.random.key(0),
        x0=jnp.array([jnp.nan, 0.0]),
        num_steps=4,
        throw=False,
    )
    assert int(res.status) == dj.solve.NONFINITE_INPUT and np.all(np.isnan(res.samples))
