"""The PyTree core: fields with parameters as leaves, trace estimators, the solve wrapper, Brownian increments.

Time convention: t = 0 is noise, t = 1 is data. Compile behaviour and memory are read from the compiled programs
(XLA's memory analysis), not timed.
"""

from __future__ import annotations

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax as dj
from diffjax import fields, solve
from diffjax.analytic import GaussianMixture


def mlp_apply(params, t, x):
    """A small MLP velocity model(t, x) for one 2-D example."""
    w1, w, w2 = params
    h = jnp.tanh(w1 @ jnp.concatenate([x, t[None]]))
    h = jnp.tanh(w @ h)
    return w2 @ h


def mlp_params(hidden, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return (
        jax.random.normal(k[0], (hidden, 3)) * 0.5,
        jax.random.normal(k[1], (hidden, hidden)) / hidden**0.5,
        jax.random.normal(k[2], (2, hidden)) * 0.1,
    )


def nbytes(tree):
    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree))


def temp_bytes(fn, *args):
    return eqx.filter_jit(fn).lower(*args).lowered.compile().memory_analysis().temp_size_in_bytes


# --------------------------------------------------------------------------------------------------------------
# fields are PyTrees: no recompile for new parameters, no constants in the program
# --------------------------------------------------------------------------------------------------------------


def test_new_parameters_do_not_recompile():
    """A second eager call with new parameters of the same shapes reuses the compiled program."""
    path = dj.LinearPath()
    traces = []

    def apply(params, t, x):
        traces.append(1)  # runs at trace time only
        return mlp_apply(params, t, x)

    key = jax.random.key(0)
    field = lambda seed: dj.velocity_field(
        eqx.Partial(apply, mlp_params(8, seed)), "velocity", path
    )
    for run in (
        lambda u: dj.sample_ode(u, path, key, shape=(2,), num_steps=4).samples,
        lambda u: dj.log_likelihood(u, path, jnp.ones(2), num_steps=4),
        lambda u: dj.sample_sde(u, u, path, key, shape=(2,), num_steps=4).samples,
    ):
        first = run(field(0))
        n = len(traces)
        second = run(field(1))
        assert len(traces) == n  # not traced again
        assert not np.allclose(first, second)  # and the new parameters were used
    # negative control: a closure over the parameters is a static part of the program and recompiles
    n = len(traces)
    for seed in range(2):
        p = mlp_params(8, seed)
        u = dj.velocity_field(lambda t, x, p=p: apply(p, t, x), "velocity", path)
        dj.sample_ode(u, path, key, shape=(2,), num_steps=4)
    assert len(traces) > n


def test_program_size_does_not_grow_with_parameters():
    path = dj.LinearPath()
    key = jax.random.key(0)

    def text(hidden):
        u = dj.velocity_field(eqx.Partial(mlp_apply, mlp_params(hidden)), "velocity", path)
        f = lambda u, k: dj.sample_ode(u, path, k, shape=(2,)).samples
        return len(eqx.filter_jit(f).lower(u, key).as_text())

    small, large = text(4), text(400)  # 160k more parameters
    assert large < 1.2 * small, (small, large)
    # negative control: the same parameters closed over become constants of the program
    p = mlp_params(400)
    u = dj.velocity_field(lambda t, x: mlp_apply(p, t, x), "velocity", path)
    closed = len(
        eqx.filter_jit(lambda k: dj.sample_ode(u, path, k, shape=(2,)).samples).lower(key).as_text()
    )
    assert closed > 10 * large


@pytest.mark.parametrize("which", ["sample_ode", "log_likelihood"])
def test_vmapped_solve_memory_does_not_scale_with_batch_times_parameters(which):
    """Under vmap, the adaptive solve must not hold one copy of the parameters per example (it did: a lax.cond
    failure probe broadcast every weight to [N, ...], 16 MB for 1 MB of parameters at N = 16)."""
    path = dj.LinearPath()
    params = mlp_params(500)  # 1 MB of float32 parameters
    u = dj.velocity_field(eqx.Partial(mlp_apply, params), "velocity", path)

    def run(u, keys):
        if which == "sample_ode":
            return jax.vmap(lambda k: dj.sample_ode(u, path, k, shape=(2,)).samples)(keys)
        return jax.vmap(lambda k: dj.log_likelihood(u, path, jax.random.normal(k, (2,))))(keys)

    for n in (16, 64):
        temp = temp_bytes(run, u, jax.random.split(jax.random.key(0), n))
        assert temp < 0.1 * n * nbytes(params), (n, temp, nbytes(params))


# --------------------------------------------------------------------------------------------------------------
# trace estimators
# --------------------------------------------------------------------------------------------------------------


def test_exact_trace_matches_jacobian_for_every_chunking():
    w = jax.random.normal(jax.random.key(1), (37, 37)) / 6.0
    f = lambda x: jnp.tanh(w @ x) * jnp.sum(x)
    x = jax.random.normal(jax.random.key(2), (37,))
    ref = float(jnp.trace(jax.jacfwd(f)(x)))
    for est in (
        fields.ExactTrace(),
        fields.ExactTrace(1),
        fields.ExactTrace(5),
        fields.ExactTrace(64),
    ):
        y, div = est(f, x, None)
        np.testing.assert_allclose(float(div), ref, rtol=2e-5)
        np.testing.assert_allclose(y, f(x), rtol=1e-6)
    # any shape: an image-like example
    g = lambda z: jnp.sin(z) * jnp.mean(z)
    z = jax.random.normal(jax.random.key(3), (3, 4, 2))
    full = jax.jacfwd(lambda v: g(v.reshape(z.shape)).reshape(-1))(z.reshape(-1))
    np.testing.assert_allclose(
        float(dj.divergence_exact(g, z)[1]), float(jnp.trace(full)), rtol=2e-5
    )
    with pytest.raises(ValueError, match="chunk_size"):
        fields.ExactTrace(0)


def test_exact_trace_memory_is_linear_in_dimension():
    """32×32×3 = 3072 dims: the old trace materialised a D×D identity and all D columns (9.4M floats)."""
    d = 32 * 32 * 3
    scale = jnp.linspace(0.5, 1.5, d)
    f = lambda x: jnp.tanh(scale * x) + 0.1 * jnp.mean(x)
    x = jnp.zeros((32, 32, 3))
    fr = lambda x: f(x.reshape(-1)).reshape(x.shape)
    temp = temp_bytes(lambda x: dj.divergence_exact(fr, x)[1], x)
    assert temp < 4 * (fields.EXACT_TRACE_BUDGET + 16 * d) * 2, temp  # O(D), far below D² floats
    assert temp < 0.05 * d * d * 4
    ref = float(jnp.sum(scale) + 0.1)  # tanh'(0) = 1; the mean term adds 0.1·Σ 1/D
    np.testing.assert_allclose(float(dj.divergence_exact(fr, x)[1]), ref, rtol=1e-5)


def test_hutchinson_is_unbiased_and_as_trace_converts_names():
    w = jax.random.normal(jax.random.key(1), (6, 6))
    f = lambda x: w @ x
    x = jnp.ones(6)
    est = fields.as_trace("hutchinson", num_probes=20000)
    _, div = est(f, x, est.init(jax.random.key(0), x))
    np.testing.assert_allclose(
        float(div), float(jnp.trace(w)), atol=5 * float(jnp.sqrt(2 * jnp.sum(w**2) / 20000))
    )
    g = fields.as_trace("hutchinson", probe="gaussian")
    assert g.sampler is jax.random.normal
    assert isinstance(fields.as_trace("exact"), fields.ExactTrace)
    assert fields.as_trace(est) is est
    with pytest.raises(ValueError, match="trace"):
        fields.as_trace("sobol")
    with pytest.raises(ValueError, match="key"):
        est.init(None, x)


# --------------------------------------------------------------------------------------------------------------
# the solve wrapper: status codes, throw=False, messages
# --------------------------------------------------------------------------------------------------------------


def mixture():
    return GaussianMixture(
        jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.0], [1.0, 1.0]]), jnp.array([0.2, 0.3])
    )


def test_throw_false_returns_status_and_host_raises_its_message():
    gm, path = mixture(), dj.LinearPath()
    u = dj.velocity_field(gm.model("velocity", path), "velocity", path)
    keys = jax.random.split(jax.random.key(0), 3)
    r = jax.vmap(lambda k: dj.sample_ode(u, path, k, shape=(2,), max_steps=2, throw=False))(keys)
    assert np.all(np.asarray(r.status) == solve.MAX_STEPS)
    with pytest.raises(solve.SolveError, match=r"max_steps=2.*3 of 3"):
        solve.raise_if_failed(r)
    ok = dj.sample_ode(u, path, keys[0], shape=(2,), throw=False)
    assert int(ok.status) == solve.SUCCESSFUL
    solve.raise_if_failed(ok)  # no error
    ll = dj.log_likelihood_with_stats(u, path, jnp.ones(2), max_steps=2, throw=False)
    assert int(ll.status) == solve.MAX_STEPS
    # a field that is NaN at the data end is named as such, not as max_steps
    data_u = dj.velocity_field(gm.model("data", path), "data", path)
    bad = dj.log_likelihood_with_stats(data_u, path, jnp.ones(2), throw=False)
    assert int(bad.status) == solve.NONFINITE_END
    with pytest.raises(solve.SolveError, match="integration_interval"):
        solve.raise_if_failed(bad)


def test_throw_false_programs_have_no_host_callback():
    """Programs built with throw=False can be stored in JAX's persistent compilation cache."""
    gm, path = mixture(), dj.LinearPath()
    u = dj.velocity_field(gm.model("velocity", path), "velocity", path)
    key = jax.random.key(0)

    def jaxpr(f, *args):
        return str(jax.make_jaxpr(f)(*args))

    assert "callback" not in jaxpr(
        lambda k: dj.sample_ode(u, path, k, shape=(2,), throw=False).samples, key
    )
    assert "callback" not in jaxpr(
        lambda x: dj.log_likelihood(u, path, x, throw=False), jnp.ones(2)
    )
    s = dj.score_field(gm.model("score", path), "score", path)
    assert "callback" not in jaxpr(
        lambda k: (
            dj.sample_sde(u, s, path, k, shape=(2,), num_steps=5, t0=0.1, throw=False).samples
        ),
        key,
    )
    # negative control: with throw=True there is exactly the one check per call
    assert (
        jaxpr(lambda k: dj.sample_ode(u, path, k, shape=(2,)).samples, key).count("callback") >= 1
    )


def test_user_function_behaves_the_same_wherever_it_was_first_traced():
    """No check state leaks across traces (a thread-local 'trusted time' flag used to)."""
    path = dj.LinearPath()
    gm = mixture()
    x, e = jnp.ones(2), jnp.zeros(2)
    user = jax.jit(lambda t: dj.interpolate(path, t, x, e))
    u = dj.velocity_field(lambda t, z: gm.velocity(path, t, z) + 0 * user(t), "velocity", path)
    dj.sample_ode(
        u, path, jax.random.key(0), shape=(2,), num_steps=3
    )  # first trace inside a solver
    with pytest.raises(
        (eqx.EquinoxRuntimeError, jax.errors.JaxRuntimeError), match=r"t must lie in \[0"
    ):
        jax.block_until_ready(user(jnp.asarray(2.0)))


# --------------------------------------------------------------------------------------------------------------
# reverse SDE with a diffrax solver: exact Brownian increments on uneven grids
# --------------------------------------------------------------------------------------------------------------


def test_diffrax_sde_brownian_increments_have_variance_h_on_a_log_snr_grid():
    """200 steps of a log-SNR grid on the linear path: 62 steps are shorter than the VirtualBrownianTree
    tolerance 1/(8n) used before, whose increments had var(ΔW)/h ≈ 0.2–0.3 on the first steps."""
    path = dj.LinearPath()
    zero = lambda t, x: jnp.zeros_like(x)
    n, m = 200, 200
    ts = np.asarray(dj.time_grid(path, n, "log_snr"))
    h = np.diff(ts)
    short = h < 1.0 / (8 * n)
    assert short.sum() > 50

    def traj(k):
        r = dj.sample_sde(
            zero,
            zero,
            path,
            k,
            shape=(1,),
            num_steps=n,
            grid="log_snr",
            method=diffrax.Euler(),
            diffusion=1.0,
            x0=jnp.zeros(1),
            save_trajectory=True,
        )
        return r.trajectory[:, 0]

    xs = np.asarray(jax.jit(jax.vmap(traj))(jax.random.split(jax.random.key(0), m)))
    ratio = (np.diff(xs, axis=1) ** 2).mean(axis=0) / h  # E = 1, sd √(2/m) = 0.1 per step
    assert abs(ratio[short].mean() - 1) < 5 * np.sqrt(2 / (m * short.sum())), ratio[short].mean()
    assert np.all((ratio > 0.5) & (ratio < 1.6)), (ratio.min(), ratio.max())

    # negative control: the old tree's increments on the same grid fail the same test
    def old(k):
        bm = diffrax.VirtualBrownianTree(ts[0], ts[-1], tol=1.0 / (8 * n), shape=(), key=k)
        return jax.vmap(bm.evaluate)(jnp.asarray(ts[:20]), jnp.asarray(ts[1:21]))

    inc = np.asarray(jax.jit(jax.vmap(old))(jax.random.split(jax.random.key(1), m)))
    assert abs(((inc**2).mean(axis=0) / h[:20]).mean() - 1) > 0.3


def test_float32_state_under_x64_keeps_its_precision(x64):
    """A float32 x0 with x64 enabled: fixed-step ODE grids, the diffrax SDE's constant g and log_prob follow the
    state's dtype (the float64 grid/g used to crash diffrax's float32 stage buffers)."""
    path = dj.CosinePath()
    gm = mixture()
    u = dj.velocity_field(gm.model("v", path), "v", path)
    s = dj.score_field(gm.model("eps", path), "eps", path)
    x0 = jnp.ones(2, jnp.float32)
    key = jax.random.key(0)
    r = dj.sample_ode(u, path, key, x0=x0, num_steps=8, log_prob=True)
    assert r.samples.dtype == jnp.float32 and r.log_prob.dtype == jnp.float32
    r = dj.sample_sde(u, s, path, key, x0=x0, num_steps=8, t0=0.01, t1=0.99, method=diffrax.Heun())
    assert r.samples.dtype == jnp.float32
    assert int(r.nfe) == 2 * 8  # Heun: two drift evaluations per step
