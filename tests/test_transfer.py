"""Tests for diffjax.transfer: a model on one Gaussian path and kind used on another, exactly.

Time convention: t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε, λ_t = log(α_t²/σ_t²).
The oracle is the Gaussian mixture of diffjax.analytic: its exact model of a kind on the source path, transferred,
must equal its exact prediction of the new kind on the new path (computed independently, on the new path).
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.analytic import GaussianMixture
from diffjax.fields import velocity_field
from diffjax.kinds import KINDS, as_kind
from diffjax.likelihood import log_likelihood
from diffjax.paths import CosinePath, EDMPath, LinearPath, LogSNRPath, VEPath, VPPath
from diffjax.sampling import sample_ode
from diffjax.transfer import TransferredModel, transfer

TOL = 1e-6


def _bounded_log_snr(t):
    return 18.0 * t - 9.0  # λ ∈ [−9, 9]: a LogSNRPath whose range is bounded at both ends


def _paths():
    return {
        "linear": LinearPath(),
        "cosine": CosinePath(),
        "vp": VPPath(),
        "ve": VEPath(),
        "edm": EDMPath(),
        "logsnr": LogSNRPath(_bounded_log_snr),
    }


def _mixture(shift=0.0):
    return GaussianMixture(
        jnp.array([0.5, 0.3, 0.2]),
        jnp.array([[-1.0, 0.5], [1.2, -0.3], [0.2, 1.5]]) + shift,
        jnp.array([[0.3, 0.2], [0.1, 0.4], [0.25, 0.25]]),
    )


def _points(mixture, src, dst, n_lam=5):
    """(t′, x′) on ``dst`` at log-SNRs strictly inside the range both paths reach, x′ = α′·x + σ′·ε."""
    m = transfer(mixture.model("eps", src), "eps", src, to_path=dst)
    lo_s, hi_s = (float(v) for v in m.source_log_snr_range())
    back = transfer(mixture.model("eps", dst), "eps", dst, to_path=src)
    lo_d, hi_d = (float(v) for v in back.source_log_snr_range())
    lo, hi = max(lo_s, lo_d, -9.5), min(hi_s, hi_d, 11.0)
    lams = lo + (hi - lo) * jnp.array([0.02, 0.25, 0.5, 0.75, 0.98])[:n_lam]
    ts = jax.vmap(dst.t_from_log_snr)(lams)
    key = jax.random.PRNGKey(0)
    x = mixture.sample(key, 2)
    z = jax.random.normal(jax.random.PRNGKey(1), (2, mixture.dim))
    a, s = jax.vmap(dst.alpha)(ts), jax.vmap(dst.sigma)(ts)
    xs = a[:, None, None] * x[None] + s[:, None, None] * z[None]
    return jnp.repeat(ts, 2), xs.reshape(-1, mixture.dim)


@eqx.filter_jit
def _errors(mixture, src, dst, ts, xs, kind_pairs):
    """max_i |transferred − exact| / (1 + |exact|) for each (source kind, new kind) pair (one compile per
    structure: the kind pairs are static, the mixture, paths and points are arguments)."""
    out = []
    for k_src, k_dst in kind_pairs:
        model = transfer(mixture.model(k_src, src), k_src, src, to_path=dst, to_kind=k_dst)
        got = jax.vmap(model)(ts, xs)
        want = jax.vmap(lambda t, x, k=k_dst: mixture.predict(k, dst, t, x))(ts, xs)
        out.append(jnp.max(jnp.abs(got - want) / (1.0 + jnp.abs(want))))
    return jnp.stack(out)


ALL_KIND_PAIRS = tuple(itertools.product(KINDS, KINDS))
#: path pairs checked with every (source kind, new kind) pair; every other path pair takes two kind pairs of a
#: rotation that, over the 36 path pairs, covers every (source kind, new kind) pair at least twice. (The check's
#: cost is one compile per (path pair, kind pair): ~80 of them keep the test at a few seconds.)
FULL = {("vp", "linear")}


def _kind_pairs(i, pair):
    if pair in FULL:
        return ALL_KIND_PAIRS
    n = len(ALL_KIND_PAIRS)
    return (ALL_KIND_PAIRS[(2 * i) % n], ALL_KIND_PAIRS[(2 * i + 1) % n])


def test_transfer_matches_oracle_every_path_pair_and_kind(x64):
    paths = _paths()
    mixture = _mixture()
    seen_kinds, seen_pairs, worst = set(), set(), 0.0
    for i, (a, b) in enumerate(itertools.product(paths, paths)):
        pairs = _kind_pairs(i, (a, b))
        ts, xs = _points(mixture, paths[a], paths[b])
        errs = np.asarray(_errors(mixture, paths[a], paths[b], ts, xs, pairs))
        for (k_src, k_dst), e in zip(pairs, errs):
            assert e < TOL, f"{a}/{k_src} -> {b}/{k_dst}: error {e:.3g}"
        worst = max(worst, float(errs.max()))
        seen_kinds |= set(pairs)
        seen_pairs.add((a, b))
    assert seen_kinds == set(ALL_KIND_PAIRS) and len(seen_pairs) == len(paths) ** 2
    assert worst < 1e-9  # measured ~1e-13: float64 rounding, far inside TOL
    print(f"max transfer error over all pairs: {worst:.3g}")


@pytest.mark.parametrize("src_name, dst_name", [("linear", "cosine"), ("cosine", "linear")])
def test_exact_at_both_ends_for_full_range_paths(src_name, dst_name, x64):
    """Linear ↔ cosine cover λ ∈ [−∞, ∞]: at t′ = 0 (α′ = 0) and t′ = 1 (σ′ = 0) the match is exact for every
    kind pair whose direct conversion on the new path is regular there."""
    paths = _paths()
    src, dst = paths[src_name], paths[dst_name]
    mixture = _mixture()
    x = jnp.array([0.4, -0.7])
    checked = 0
    for t_new in (0.0, 1.0):
        a, s, da, ds = dst.coefficients(t_new)
        for k_src, k_dst in ALL_KIND_PAIRS:
            ks, kd = as_kind(k_src), as_kind(k_dst)
            regular = ks.basis == kd.basis or bool(ks.determinant(a, s, da, ds) != 0)
            if not regular or (k_dst == "score" and float(s) == 0.0):
                continue
            model = transfer(mixture.model(k_src, src), k_src, src, to_path=dst, to_kind=k_dst)
            got, want = model(t_new, x), mixture.predict(k_dst, dst, t_new, x)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"{k_src}->{k_dst}")
            checked += 1
    assert checked >= 30


# ---------------------------------------------------------------------------------------------------------------
# sampling and likelihood through the transferred model
# ---------------------------------------------------------------------------------------------------------------
def test_sampling_and_likelihood_match_direct_model(x64):
    """VP ε-oracle transferred to a linear-path velocity: sample_ode and log_likelihood agree with the oracle's
    direct linear velocity, and the samples are the VP probability-flow solution rescaled by 1/k."""
    vp, lin = VPPath(), LinearPath()
    mixture = _mixture()
    u = transfer(mixture.model("eps", vp), "eps", vp, to_path=lin, to_kind="velocity")
    direct = mixture.model("velocity", lin)
    lo, hi = (float(v) for v in u.t_range())
    assert abs(lo - 1 / (1 + np.exp(10.05 / 2))) < 1e-4 and hi == 1.0
    t0, t1 = 0.02, 0.995
    tol = dict(rtol=1e-10, atol=1e-10)
    x0 = jax.random.normal(jax.random.PRNGKey(3), (3, 2))
    key = jax.random.PRNGKey(0)

    def sample(field, path, x0, a, b):
        return sample_ode(field, path, key, x0=x0, t0=a, t1=b, **tol).samples

    got = jax.vmap(lambda x: sample(u, lin, x, t0, t1))(x0)
    want = jax.vmap(lambda x: sample(direct, lin, x, t0, t1))(x0)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-7)
    # the same curve in the source's own variables: x_t = k·x′ at the matched times
    s0, s1 = (float(u.source_time(t)) for t in (t0, t1))
    k0, k1 = (float(u.scale(t)) for t in (t0, t1))
    src_field = velocity_field(mixture.model("eps", vp), "eps", vp)
    on_vp = jax.vmap(lambda x: sample(src_field, vp, k0 * x, s0, s1))(x0)
    np.testing.assert_allclose(on_vp / k1, want, rtol=1e-7, atol=1e-7)

    xs = mixture.sample(jax.random.PRNGKey(4), 3)
    ll = dict(t0=t0, t1=t1, **tol)
    got_lp = jax.vmap(lambda x: log_likelihood(u, lin, x, **ll))(xs)
    want_lp = jax.vmap(lambda x: log_likelihood(direct, lin, x, **ll))(xs)
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# negative controls: a wrong transfer fails the same check by a wide margin
# ---------------------------------------------------------------------------------------------------------------
class _NoScale(TransferredModel):
    def _scale(self, t, t_new):
        return jnp.ones_like(t_new)


class _SameTime(TransferredModel):
    def _source_time(self, t_new):
        return t_new


@pytest.mark.parametrize("wrong", [_NoScale, _SameTime])
def test_wrong_transfer_fails_the_check(wrong, x64):
    vp, lin = VPPath(), LinearPath()
    mixture = _mixture()
    ts, xs = _points(mixture, vp, lin)
    right = transfer(mixture.model("eps", vp), "eps", vp, to_path=lin, to_kind="velocity")
    bad = wrong(right.model, right.kind, right.path, right.new_kind, right.new_path)
    want = jax.vmap(lambda t, x: mixture.predict("velocity", lin, t, x))(ts, xs)

    def err(m):
        return float(jnp.max(jnp.abs(jax.vmap(m)(ts, xs) - want) / (1.0 + jnp.abs(want))))

    assert err(right) < TOL
    assert err(bad) > 1e-2  # measured 0.1–1: four orders of magnitude above TOL at least


# ---------------------------------------------------------------------------------------------------------------
# jit / vmap / grad / compile behaviour
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("src_name, k_src, dst_name, k_dst", [
    ("vp", "eps", "linear", "velocity"),
    ("logsnr", "data", "edm", "score"),  # the source time is a bisection with implicit gradients
    ("ve", "velocity", "cosine", "v"),
])
def test_grad_matches_direct_oracle_and_finite_differences(src_name, k_src, dst_name, k_dst, x64):
    paths = _paths()
    src, dst = paths[src_name], paths[dst_name]
    mixture = _mixture()
    t, x = jnp.asarray(0.55), jnp.array([0.3, -0.4])
    w = jnp.array([0.7, -1.3])

    def transferred(means, t, x):
        mix = eqx.tree_at(lambda m: m.means, mixture, means)
        m = transfer(mix.model(k_src, src), k_src, src, to_path=dst, to_kind=k_dst)
        return jnp.dot(w, m(t, x))

    def direct(means, t, x):
        mix = eqx.tree_at(lambda m: m.means, mixture, means)
        return jnp.dot(w, mix.predict(k_dst, dst, t, x))

    g = jax.jit(jax.grad(transferred, argnums=(0, 1, 2)))(mixture.means, t, x)
    g_direct = jax.grad(direct, argnums=(0, 1, 2))(mixture.means, t, x)
    for a, b in zip(g, g_direct):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-7)
    # central finite differences in x and in one mixture mean (a leaf of the source model)
    h = 1e-6
    f = jax.jit(transferred)
    for i in range(2):
        e = jnp.zeros(2).at[i].set(h)
        fd = (f(mixture.means, t, x + e) - f(mixture.means, t, x - e)) / (2 * h)
        np.testing.assert_allclose(g[2][i], fd, rtol=1e-6, atol=1e-6)
    e = jnp.zeros_like(mixture.means).at[1, 0].set(h)
    fd = (f(mixture.means + e, t, x) - f(mixture.means - e, t, x)) / (2 * h)
    np.testing.assert_allclose(g[0][1, 0], fd, rtol=1e-6, atol=1e-6)


def test_jit_vmap_match_eager_and_no_recompile(x64):
    vp, ve = VPPath(), VEPath()
    traces = []

    @eqx.filter_jit
    def batch(model, ts, xs):
        traces.append(1)
        return jax.vmap(model)(ts, xs)

    ts = jnp.array([0.2, 0.5, 0.8])
    xs = jax.random.normal(jax.random.PRNGKey(0), (3, 2))
    for shift in (0.0, 0.3):
        mixture = _mixture(shift)
        m = transfer(mixture.model("v", ve), "v", ve, to_path=vp, to_kind="score")
        lo, hi = (float(v) for v in m.t_range())
        t_in = lo + (hi - lo) * ts
        got = batch(m, t_in, xs + shift)
        eager = jnp.stack([m(float(t), x) for t, x in zip(t_in, xs + shift)])
        np.testing.assert_allclose(got, eager, rtol=1e-12, atol=1e-12)
    assert len(traces) == 1  # new mixture, times and points of the same shapes: the same program


def test_traced_time_outside_range_is_clipped(x64):
    """Under jit (traced t′) there is no Python check: t is clipped to the source's end, documented meaning."""
    vp, lin = VPPath(), LinearPath()
    mixture = _mixture()
    m = transfer(mixture.model("velocity", vp), "velocity", vp, to_path=lin)
    x = jnp.array([0.2, 0.1])
    got = jax.jit(lambda t, y: m(t, y))(0.0, x)  # t′ traced: no Python range check
    assert float(jax.jit(lambda t: m.source_time(t))(0.0)) == 0.0
    # The source serves its end λ = −10.05 (VP at t = 0): v = α·ε̂ − σ·x̂ there at k·x′, v′ = v/k, and the
    # linear path at t′ = 0 (α′ = 0, σ′ = 1, α̇′ = 1, σ̇′ = −1) reads v′ as x̂′ = −v′, ε̂′ = x′, so its velocity
    # x̂′ − ε̂′ = −v′ − x′: finite, the source's end SNR frozen, not the exact linear-path prediction.
    a, s = float(vp.alpha(0.0)), float(vp.sigma(0.0))
    k = a + s  # α′ + σ′ = 1 at the linear path's t′ = 0
    xhat, ehat = mixture.posterior_mean(vp, 0.0, k * x), mixture.eps_posterior_mean(vp, 0.0, k * x)
    v_new = (a * ehat - s * xhat) / k
    np.testing.assert_allclose(got, -v_new - x, rtol=1e-10)
    exact = mixture.predict("velocity", lin, 0.0, x)
    assert float(jnp.max(jnp.abs(got - exact))) > 1e-3  # and it is not the exact prediction (documented)
    assert bool(jnp.all(jnp.isfinite(got)))


# ---------------------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(x64):
    vp, lin, ve = VPPath(), LinearPath(), VEPath()
    model = _mixture().model("eps", vp)
    with pytest.raises(ValueError, match=r"kind='epsilon'"):
        transfer(model, "epsilon", vp, to_path=lin)
    with pytest.raises(ValueError, match=r"to_kind='flow'"):
        transfer(model, "eps", vp, to_path=lin, to_kind="flow")
    with pytest.raises(ValueError, match=r"path must be a diffjax path.*path='vp'"):
        transfer(model, "eps", "vp", to_path=lin)
    with pytest.raises(ValueError, match=r"to_path must be a diffjax path.*to_path=None"):
        transfer(model, "eps", vp, to_path=None)
    with pytest.raises(ValueError, match=r"model must be a callable"):
        transfer(vp, "eps", vp, to_path=lin)
    m = transfer(model, "eps", vp, to_path=lin, to_kind="velocity")
    with pytest.raises(ValueError, match=r"t_new = 0\.0 on LinearPath has log-SNR -inf.*VPPath"):
        m(0.0, jnp.zeros(2))
    m_ve = transfer(_mixture().model("eps", ve), "eps", ve, to_path=vp)
    lo, hi = (float(v) for v in m_ve.t_range())
    with pytest.raises(ValueError, match=r"outside the range \[-7\.8.*, 9\.21.*\].*Use t_new in"):
        m_ve(0.5 * lo, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"outside the range"):
        m_ve(hi + 0.5 * (1.0 - hi), jnp.zeros(2))
    m_ve(lo, jnp.zeros(2))  # the ends of t_range are served
    m_ve(hi, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"t_new must lie in \[0, 1\]"):
        m(1.5, jnp.zeros(2))
