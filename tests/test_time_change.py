"""The integration variables of diffjax.time_change against closed forms and finite differences.

Time convention: t = 0 is noise, t = 1 is data.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.analytic import GaussianMixture
from diffjax.fields import velocity_field
from diffjax.likelihood import log_likelihood_with_stats
from diffjax.paths import CosinePath, EDMPath, LinearPath, VEPath, VPPath
from diffjax.time_change import LinearPathTime, PathTime, as_time_change


class _NoScaleDerivative(LinearPathTime):
    """A broken change of variables (ċ dropped): the negative control of the exactness tests."""

    def scale(self, path, t):
        return super().scale(path, t)[0], jnp.zeros_like(t)

PATHS = [LinearPath(), CosinePath(), VPPath(), VEPath(), EDMPath()]
IDS = ["linear", "cosine", "VP", "VE", "EDM"]
TS = np.linspace(0.05, 0.95, 7)


@pytest.mark.parametrize("path", PATHS, ids=IDS)
def test_linear_time_closed_form_inverse_and_derivatives(path):
    """τ = α/(α+σ) written out in numpy, its inverse, and ṡ, ċ against central finite differences."""
    change = LinearPathTime()
    for t in TS:
        a, s = float(path.alpha(t)), float(path.sigma(t))
        tau = float(change.s_of_t(path, jnp.asarray(t)))
        np.testing.assert_allclose(tau, a / (a + s), rtol=1e-5)
        np.testing.assert_allclose(float(change.t_of_s(path, jnp.asarray(tau))), t, rtol=2e-4, atol=2e-5)
        h = 1e-3
        fd = lambda f: (float(f(jnp.asarray(t + h))) - float(f(jnp.asarray(t - h)))) / (2 * h)
        ds = fd(lambda u: change.s_of_t(path, u))
        np.testing.assert_allclose(float(change.ds_dt(path, jnp.asarray(t))), ds, rtol=2e-3, atol=1e-4)
        dc = fd(lambda u: change.scale(path, u)[0])
        c, dc_an = change.scale(path, jnp.asarray(t))
        np.testing.assert_allclose(float(c), a + s, rtol=1e-5)
        np.testing.assert_allclose(float(dc_an), dc, rtol=2e-3, atol=1e-3)


def test_path_time_is_the_identity_and_names_are_checked():
    path = VPPath()
    t = jnp.asarray(0.3)
    change = PathTime()
    assert float(change.s_of_t(path, t)) == float(change.t_of_s(path, t)) == float(t)
    assert float(change.ds_dt(path, t)) == 1.0 and change.scale(path, t) == (1.0, 0.0)
    assert isinstance(as_time_change("linear"), LinearPathTime)
    assert isinstance(as_time_change(change), PathTime)
    with pytest.raises(ValueError, match="unknown time='lambda'"):
        as_time_change("lambda")


def test_both_variables_agree_on_vp_for_hutchinson_and_fixed_steps():
    """The change of variables is exact: with one fixed probe (the same estimator) the two variables give the same
    estimate to solver accuracy, and 64 fixed Heun steps in τ reach the oracle's log p_{t1} (negative control: the
    same grid with ċ dropped from the transformed field misses it)."""
    gm = GaussianMixture(jnp.array([0.6, 0.4]), jnp.array([[-1.0, 0.0], [1.0, 0.5]]), jnp.array([[0.2, 0.3], [0.3, 0.1]]))
    path = VPPath()
    u = velocity_field(gm.model("velocity", path), "velocity", path)
    x = jnp.array([0.4, -0.3])
    key = jax.random.key(3)
    run = lambda **kw: log_likelihood_with_stats(u, path, x, key=key, trace="hutchinson", **kw).log_prob
    a, b = float(run(time="t")), float(run(time="linear"))
    np.testing.assert_allclose(a, b, atol=1e-4)
    # a fixed grid (uniform in τ) reaches the Hutchinson-free answer, which the one-probe estimate does not
    exact_prior = lambda z: gm.marginal_log_prob(path, path.t_min, z)  # VP's α_0 ≠ 0: not N(0, I)
    fixed = float(log_likelihood_with_stats(u, path, x, num_steps=64, prior_log_prob=exact_prior).log_prob)
    truth = float(gm.marginal_log_prob(path, path.t_max, x))
    np.testing.assert_allclose(fixed, truth, atol=2e-3)
    broken = log_likelihood_with_stats(
        u, path, x, num_steps=64, prior_log_prob=exact_prior, time=_NoScaleDerivative()
    ).log_prob
    assert abs(float(broken) - truth) > 1e-2


def test_fixed_grid_of_float32_input_under_x64(x64):
    """With x64 on, VP's leaves are float64; a float32 example keeps a float32 grid and result."""
    path = VPPath()
    gm = GaussianMixture(jnp.array([1.0]), jnp.array([[0.3, -0.2]]), jnp.array([[0.4, 0.2]]))
    u = velocity_field(gm.model("velocity", path), "velocity", path)
    x = jnp.array([0.1, 0.2], jnp.float32)
    exact_prior = lambda z: gm.marginal_log_prob(path, path.t_min, z)
    res = log_likelihood_with_stats(u, path, x, num_steps=32, prior_log_prob=exact_prior)
    assert res.dtype == "float32"
    np.testing.assert_allclose(float(res.log_prob), float(gm.marginal_log_prob(path, path.t_max, x)), atol=5e-3)
