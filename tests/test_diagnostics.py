"""Failure diagnosis of the solves (diffjax.solve): the status names the real cause (t = 0 noise, t = 1 data).

* NaN/inf in the input (a likelihood's x, a sampler's x0) -> NONFINITE_INPUT, only for the bad rows of a batch;
* a field that is NaN/inf inside the interval -> NONFINITE_FIELD at the time where the solve stopped (diffrax's
  adaptive controller alone reports max_steps: it shrinks the step in front of the NaN until the budget runs out);
* negative control: a finite but stiff field with a small step budget -> still MAX_STEPS;
* good inputs -> SUCCESSFUL, log-likelihoods unchanged against the mixture's exact log-density.

Oracles: the analytic Gaussian mixture (exact marginal log-density and velocity), and fields whose NaN window is
known by construction. Failing solves get a small max_steps; compiled programs are shared between tests.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax as dj
from diffjax import solve
from diffjax.analytic import GaussianMixture

PATH = dj.LinearPath()
GM = GaussianMixture(
    jnp.array([0.3, 0.7]), jnp.array([[-1.0, 0.0], [1.0, 1.0]]), jnp.array([0.2, 0.3])
)
U = dj.velocity_field(GM.model("velocity", PATH), "velocity", PATH)
LO, HI = 0.4, 0.5  # the NaN window of WINDOW
MAX_STEPS = 48


def WINDOW(t, x):  # noqa: N802 - a module-level field, shared so that its programs compile once
    """The mixture's velocity, NaN for t in (0.4, 0.5)."""
    return jnp.where((t > LO) & (t < HI), jnp.nan, U(t, x))


def STIFF(t, x):  # noqa: N802
    """Finite everywhere but stiff: relaxation at rate 300 towards sin(40 t)."""
    return -300.0 * (x - jnp.sin(40.0 * t))


TOL = dict(rtol=1e-6, atol=1e-6)


@jax.jit
def ll_batch(xs):
    return jax.vmap(lambda x: dj.log_likelihood_with_stats(U, PATH, x, throw=False, **TOL))(xs)


def ll(field, x, max_steps=MAX_STEPS, **kw):
    return dj.log_likelihood_with_stats(field, PATH, x, max_steps=max_steps, throw=False, **kw)


def ode(field, max_steps=MAX_STEPS, **kw):
    return dj.sample_ode(
        field, PATH, jax.random.key(0), shape=(2,), max_steps=max_steps, throw=False, **kw
    )


def host_message(result, **kw):
    with pytest.raises(solve.SolveError) as info:
        solve.raise_if_failed(result, **kw)
    return str(info.value)


# --------------------------------------------------------------------------------------------------------------
# NaN/inf input
# --------------------------------------------------------------------------------------------------------------


def test_nan_data_point_is_named_and_only_its_row_flagged():
    xs = jnp.array([[0.5, 0.2], [-1.0, 0.3], [jnp.nan, 1.0], [1.2, 0.9], [0.0, -jnp.inf]])
    r = ll_batch(xs)
    np.testing.assert_array_equal(
        np.asarray(r.status), [0, 0, solve.NONFINITE_INPUT, 0, solve.NONFINITE_INPUT]
    )
    assert np.all(np.isnan(np.asarray(r.log_prob)[[2, 4]])) and np.all(np.isnan(r.x0[2]))
    # none of a bad row's outputs looks like a result (it was solved from zeros)
    assert np.all(np.isnan(np.asarray(r.prior_log_prob)[[2, 4]]))
    assert np.all(np.isnan(np.asarray(r.delta_log_prob)[[2, 4]]))
    assert np.all(np.isfinite(np.asarray(r.delta_log_prob)[[0, 1, 3]]))
    assert np.all(np.isnan(np.asarray(r.t_fail)))
    good = np.array([0, 1, 3])
    exact = jax.vmap(GM.log_prob)(xs[good])
    np.testing.assert_allclose(np.asarray(r.log_prob)[good], np.asarray(exact), atol=1e-4)
    # the bad rows ran on zeros: no extra steps for the batch (a NaN start would spin until max_steps)
    assert int(jnp.max(r.num_steps)) < 200
    msg = host_message(r)
    assert "data point x holds NaN/inf (check the input data" in msg
    assert "2 of 5 solves failed, the first at index 2)" in msg
    assert "\n" not in msg and "velocity" not in msg
    with pytest.raises(Exception, match=r"data point x holds NaN/inf \(check the input data"):
        dj.log_likelihood(U, PATH, jnp.array([jnp.inf, 0.0]), max_steps=MAX_STEPS)


def test_nan_x0_of_the_samplers():
    x0s = jnp.array([[0.1, -0.2], [jnp.nan, 0.0], [0.3, 0.4]])
    r = jax.vmap(lambda x0: ode(U, x0=x0))(x0s)
    np.testing.assert_array_equal(np.asarray(r.status), [0, solve.NONFINITE_INPUT, 0])
    assert np.all(np.isnan(np.asarray(r.samples[1]))) and np.all(np.isfinite(r.samples[::2]))
    assert "starting point x0" in host_message(r)
    # the good rows: successful, no time of failure, and raise_if_failed is silent on them
    good = jax.tree_util.tree_map(lambda a: a[::2], r)
    assert np.all(np.isnan(np.asarray(good.t_fail)))
    solve.raise_if_failed(good)
    s = dj.sample_sde(
        U, U, PATH, jax.random.key(0), x0=x0s[1], diffusion=0.0, num_steps=8, throw=False
    )
    assert int(s.status) == solve.NONFINITE_INPUT
    assert "starting point x0" in host_message(s)


# --------------------------------------------------------------------------------------------------------------
# NaN/inf field inside the interval
# --------------------------------------------------------------------------------------------------------------


def test_nan_field_inside_the_interval_sample_ode():
    r = ode(WINDOW)  # adaptive: without the diagnosis this read as max_steps
    assert int(r.status) == solve.NONFINITE_FIELD
    # integrating noise -> data, the solve creeps up to the window's lower edge and stops there
    assert LO - 0.05 <= float(r.t_fail) <= LO + 1e-6
    msg = host_message(r)
    assert "NaN/inf inside [t0, t1], just above t = 0.4" in msg and "max_steps" not in msg
    with pytest.raises(Exception, match=r"just above t = 0\.(39|40)"):
        dj.sample_ode(WINDOW, PATH, jax.random.key(0), shape=(2,), max_steps=MAX_STEPS)
    # fixed steps: the NaN reaches the samples; the first non-finite step starts below the window
    f = ode(WINDOW, num_steps=20)
    assert int(f.status) == solve.NONFINITE_FIELD
    assert LO - 0.05 - 1e-6 <= float(f.t_fail) <= LO + 1e-6


def test_nan_field_inside_the_interval_likelihood():
    r = ll(WINDOW, jnp.array([0.5, 0.2]))
    assert int(r.status) == solve.NONFINITE_FIELD
    # integrating data -> noise (t1 down to t0), the solve stops at the window's upper edge
    assert HI - 1e-6 <= float(r.t_fail) <= HI + 0.05
    msg = host_message(r)
    assert "just below t = 0.5" in msg and "data end t1 down to the noise end t0" in msg
    with pytest.raises(Exception, match=r"NaN/inf inside the interval, just below t = 0\.5"):
        dj.log_likelihood(WINDOW, PATH, jnp.array([0.5, 0.2]), max_steps=MAX_STEPS)
    # a status array with its t_fail, as the command line passes them after slicing off padding
    msg2 = host_message(np.asarray(r.status)[None], messages=dict(r.messages), t_fail=[r.t_fail])
    assert "just below t = 0.5" in msg2 and "the first at index 0" in msg2


def test_eps_model_singular_at_the_noise_end_is_named():
    """An ε-model's velocity divides by α = 0 at t = 0 (LinearPath); the backward solve cannot reach t0."""
    ue = dj.velocity_field(GM.model("eps", PATH), "eps", PATH)
    r = ll(ue, jnp.array([0.5, 0.2]))
    assert int(r.status) == solve.NONFINITE_FIELD and 0.0 <= float(r.t_fail) < 0.05
    assert "integration_interval" in host_message(r)


def test_finite_stiff_field_is_still_max_steps():
    """Negative control: finite everywhere, too stiff for 8 steps."""
    r, lk = ode(STIFF, max_steps=8), ll(STIFF, jnp.array([0.5, 0.2]), max_steps=8)
    assert int(r.status) == solve.MAX_STEPS and int(lk.status) == solve.MAX_STEPS
    assert 0.0 < float(r.t_fail) < 1.0 and 0.0 < float(lk.t_fail) < 1.0
    msg = host_message(r)
    assert (
        "max_steps=8" in msg and "NaN" not in msg and "Increase max_steps, loosen rtol/atol" in msg
    )
    assert "raise max_steps, loosen rtol/atol" in host_message(lk)


def test_batch_summary_with_several_codes():
    # a batch with two kinds of failure: the first one's message, the counts of each
    status = np.array([0, solve.MAX_STEPS, solve.NONFINITE_INPUT, solve.MAX_STEPS])
    msg = host_message(status, messages={solve.MAX_STEPS: "budget {t}", solve.NONFINITE_INPUT: "x"})
    assert msg.startswith("budget t_fail (unknown)")
    assert "3 of 4 solves failed, the first at index 1; 2 max_steps, 1 nonfinite_input" in msg
