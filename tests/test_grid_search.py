"""Tests for diffjax.grid_search.optimize_grid (LD3-style optimized inference grids) against the mixture oracle.

Time convention: t = 0 is noise, t = 1 is data; a grid increases from t0 (noise) to t1 (data).

Reference: the oracle's exact flow map (``GaussianMixture.flow_map``, a high-accuracy solve of its exact PF-ODE)
from each starting point. The optimized grid is fitted on training points and judged on held-out points drawn
with another key. Negative control: zero optimizer steps return the initial (log-SNR) grid and its error.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax as dj
from diffjax import grid_search as G
from diffjax.analytic import GaussianMixture


@pytest.fixture(autouse=True, scope="module")
def _x64():
    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", old)


N_STEPS = 5
SAMPLER = "dpmpp_2m"


def _gm():
    """Three narrow components (the regime where a few-step grid matters)."""
    return GaussianMixture(
        [0.4, 0.35, 0.25],
        [[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]],
        [[0.02, 0.04], [0.03, 0.02], [0.05, 0.02]],
    )


@pytest.fixture(scope="module")
def problem():
    path = dj.paths.VPPath()
    gm = _gm()
    model = gm.model("eps", path)
    t0, t1 = (float(t) for t in dj.integration_interval(path, "eps"))
    x_train = jax.random.normal(jax.random.key(11), (16, 2))
    x_test = jax.random.normal(jax.random.key(12), (16, 2))
    flow = jax.jit(
        jax.vmap(lambda x: gm.flow_map(path, t0, t1, x, rtol=1e-10, atol=1e-10, max_steps=16384))
    )
    return dict(
        path=path,
        model=model,
        t0=t0,
        t1=t1,
        x_train=x_train,
        x_test=x_test,
        y_train=flow(x_train),
        y_test=np.asarray(flow(x_test)),
    )


def _held_out_error(p, ts):
    xs = jax.vmap(
        lambda x0: (
            dj.sample(
                SAMPLER, p["model"], "eps", p["path"], jax.random.key(0), grid=ts, x0=x0
            ).samples
        )
    )(p["x_test"])
    return float(np.mean(np.linalg.norm(np.asarray(xs) - p["y_test"], axis=-1)))


@pytest.fixture(scope="module")
def optimized(problem):
    p = problem
    run = lambda steps: G.optimize_grid(  # noqa: E731
        SAMPLER,
        p["model"],
        "eps",
        p["path"],
        N_STEPS,
        p["x_train"],
        teacher=p["y_train"],
        init="log_snr",
        steps=steps,
        learning_rate=0.05,
        return_losses=True,
    )
    return {steps: run(steps) for steps in (0, 150)}


def test_optimized_grid_is_increasing_with_fixed_ends(problem, optimized):
    ts, losses = optimized[150]
    ts = np.asarray(ts)
    assert ts.shape == (N_STEPS + 1,)
    assert np.all(np.diff(ts) > 0)
    assert ts[0] == problem["t0"] and ts[-1] == problem["t1"]
    assert losses.shape == (151,) and float(losses[-1]) < 0.5 * float(losses[0])


def test_optimized_grid_beats_log_snr_on_held_out_points(problem, optimized):
    log_snr = dj.time_grid(problem["path"], N_STEPS, "log_snr", t0=problem["t0"], t1=problem["t1"])
    base = _held_out_error(problem, log_snr)
    # negative control: zero optimizer steps give back the initial grid, hence its error
    ts0, losses0 = optimized[0]
    np.testing.assert_allclose(np.asarray(ts0), np.asarray(log_snr), rtol=1e-12, atol=1e-12)
    assert losses0.shape == (1,)
    np.testing.assert_allclose(_held_out_error(problem, ts0), base, rtol=1e-9)
    # the optimized grid, judged on points it was not fitted on (the oracle's flow map as reference)
    err = _held_out_error(problem, optimized[150][0])
    assert err < 0.5 * base, (err, base)


def test_grid_from_logits_round_trip_and_gradient():
    ts = jnp.array([0.0, 0.1, 0.35, 0.7, 0.99])
    theta = G.grid_logits(ts)
    np.testing.assert_allclose(G.grid_from_logits(theta, 0.0, 0.99), ts, atol=1e-12)
    # any finite logits give an increasing grid with the same ends; the map is differentiable (vs FD)
    out = G.grid_from_logits(jnp.array([5.0, -3.0, 0.0, 2.0]), 0.2, 0.9)
    assert np.all(np.diff(np.asarray(out)) > 0) and out[0] == 0.2 and out[-1] == 0.9
    f = lambda th: jnp.sum(G.grid_from_logits(th, 0.0, 1.0) ** 2)  # noqa: E731
    g = jax.grad(f)(theta)
    eps = 1e-6
    fd = [
        (f(theta.at[i].add(eps)) - f(theta.at[i].add(-eps))) / (2 * eps) for i in range(theta.size)
    ]
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)


def test_jit_matches_eager_and_no_recompile_on_second_call(problem):
    p = problem
    traces = []

    class Model(eqx.Module):
        inner: object

        def __call__(self, t, x):
            traces.append(1)
            return self.inner(t, x)

    def run(x_train, y_train, model):
        return G.optimize_grid(
            "ddim", model, "eps", p["path"], 3, x_train, teacher=y_train, steps=5, init="log_snr"
        )

    eager = run(p["x_train"], p["y_train"], Model(p["model"]))
    n = len(traces)
    again = run(p["x_test"], jnp.asarray(p["y_test"]), Model(_gm().model("eps", p["path"])))
    assert len(traces) == n  # same shapes, new values: the compiled program is reused
    jitted = jax.jit(run)(p["x_train"], p["y_train"], Model(p["model"]))
    np.testing.assert_allclose(jitted, eager, rtol=1e-10, atol=1e-12)
    assert not np.allclose(again, eager)


def _opt(p, **kw):
    args = dict(teacher=p["y_train"], steps=1)
    args.update(kw)
    return G.optimize_grid(
        args.pop("sampler", SAMPLER),
        p["model"],
        "eps",
        p["path"],
        args.pop("num_steps", N_STEPS),
        args.pop("x0_train", p["x_train"]),
        **args,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(init=jnp.array([0.0, 0.5, 0.4, 0.6, 0.8, 0.99])), "increase strictly"),
        (dict(init=jnp.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.5])), "inside \\[0, 1\\]"),
        (dict(init=jnp.array([-0.1, 0.2, 0.4, 0.6, 0.8, 0.9])), "inside \\[0, 1\\]"),
        (dict(init=jnp.array([0.0, 0.3, 0.6, 0.9])), "needs num_steps \\+ 1 = 6"),
        (dict(init="karras"), "unknown init"),
        (dict(num_steps=1), "num_steps must be a Python int >= 2"),
        (dict(num_steps=5.0), "num_steps must be a Python int"),
        (dict(sampler="heun3"), "unknown sampler"),
        (dict(x0_train=jnp.zeros(2)), "x0_train must be a batch"),
        (dict(teacher=jnp.zeros((3, 2))), "teacher endpoints must have the shape"),
        (dict(teacher=2), "teacher=2 steps must be at least"),
        (dict(steps=-1), "steps must be a Python int >= 0"),
        (dict(learning_rate=0.0), "learning_rate must be > 0"),
        (dict(loss="l1"), "loss must be"),
    ],
)
def test_bad_inputs_raise_clear_errors(problem, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _opt(problem, **kwargs)


@pytest.mark.parametrize(
    "grid, match",
    [
        (jnp.array([0.0, 0.5, 0.4, 0.6, 0.8, 0.99]), "increase strictly"),
        (jnp.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.2]), "inside \\[0, 1\\]"),
    ],
)
def test_sample_refuses_bad_explicit_grids(problem, grid, match):
    p = problem
    with pytest.raises(ValueError, match=match):
        dj.sample(
            SAMPLER, p["model"], "eps", p["path"], jax.random.key(0), grid=grid, x0=jnp.zeros(2)
        )
    with pytest.raises(ValueError, match="the grid has 5 steps"):
        dj.sample(
            SAMPLER,
            p["model"],
            "eps",
            p["path"],
            jax.random.key(0),
            num_steps=4,
            grid=jnp.linspace(0.0, 0.99, 6),
            x0=jnp.zeros(2),
        )
