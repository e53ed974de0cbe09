"""Tests for diffjax.nn: shapes, per-example/vmap semantics, the functional adapter, EDM preconditioning.

Time convention: t = 0 is noise, t = 1 is data.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from diffjax import nn
from diffjax.paths import EDMPath, LinearPath, VEPath


def _perturb(params, key, scale=0.1):
    """Random non-zero parameters (the output layers start at zero), built from a key.

    One normal draw sliced on the host: a draw per leaf shape would compile once per shape (slow on CPU).
    """
    leaves, treedef = jax.tree_util.tree_flatten(params)
    sizes = [leaf.size for leaf in leaves]
    z = np.asarray(jax.random.normal(key, (sum(sizes),), leaves[0].dtype))
    offsets = np.cumsum([0] + sizes)
    new = [
        p + scale * jnp.asarray(z[a:b].reshape(p.shape), p.dtype)
        for p, a, b in zip(leaves, offsets[:-1], offsets[1:])
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def test_all_exported():
    for name in nn.__all__:
        assert hasattr(nn, name)


# ------------------------------------------------------------------------------------------------ embedding


def test_sinusoidal_embedding_matches_numpy():
    emb = nn.SinusoidalEmbedding(8)
    t = 0.37
    k = np.arange(4)
    w = 1000.0 * 10000.0 ** (-k / 4)
    expected = np.concatenate([np.sin(w * t), np.cos(w * t)])
    np.testing.assert_allclose(np.asarray(emb(t)), expected, rtol=1e-4, atol=1e-4)
    # any real scalar works (EDM's c_noise is outside [0, 1])
    assert np.all(np.isfinite(np.asarray(emb(-1.5))))
    with pytest.raises(ValueError, match="even"):
        nn.SinusoidalEmbedding(7)
    with pytest.raises(ValueError, match="scalar"):
        emb(jnp.ones(2))


# ------------------------------------------------------------------------------------------------ MLP


def test_mlp_shapes_zero_init_and_bad_input():
    model = nn.MLP(3, hidden=16, depth=2, time_dim=8, rngs=nnx.Rngs(0))
    y = model(0.5, jnp.ones(3))
    assert y.shape == (3,)
    np.testing.assert_array_equal(np.asarray(y), 0.0)  # zero-initialised output layer
    with pytest.raises(ValueError, match="shape"):
        model(0.5, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="depth"):
        nn.MLP(3, depth=0, rngs=nnx.Rngs(0))


def test_mlp_apply_jit_vmap_agree_with_eager_and_time_matters():
    model = nn.MLP(2, hidden=32, depth=3, time_dim=16, zero_init_output=False, rngs=nnx.Rngs(1))
    apply, params = nn.split(model)
    key = jax.random.key(0)
    xs = jax.random.normal(key, (5, 2))
    ts = jnp.linspace(0.0, 1.0, 5)
    eager = np.stack([np.asarray(model(t, x)) for t, x in zip(ts, xs)])
    batched = jax.jit(jax.vmap(lambda t, x: apply(params, t, x)))(ts, xs)
    np.testing.assert_allclose(np.asarray(batched), eager, rtol=1e-5, atol=1e-6)
    # the model depends on t (negative control against an ignored time input)
    assert not np.allclose(
        np.asarray(apply(params, 0.1, xs[0])), np.asarray(apply(params, 0.9, xs[0]))
    )
    # split does not alter the model
    np.testing.assert_allclose(np.asarray(model(ts[2], xs[2])), eager[2], rtol=1e-6)


def test_mlp_grad_matches_finite_differences():
    with jax.enable_x64(True):
        model = nn.MLP(2, hidden=16, depth=2, time_dim=8, rngs=nnx.Rngs(2))
        apply, params = nn.split(model)
        params = _perturb(params, jax.random.key(3))
        assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float64
        xs = jax.random.normal(jax.random.key(4), (4, 2))
        ts = jnp.array([0.1, 0.4, 0.6, 0.95])

        def loss(p):
            pred = jax.vmap(lambda t, x: apply(p, t, x))(ts, xs)
            return jnp.mean(jnp.sum((pred - xs) ** 2, axis=-1))

        g_eager = jax.grad(loss)(params)
        g_jit = jax.jit(jax.grad(loss))(params)
        for a, b in zip(jax.tree_util.tree_leaves(g_eager), jax.tree_util.tree_leaves(g_jit)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
        # directional derivative against central differences
        direction = _perturb(jax.tree_util.tree_map(jnp.zeros_like, params), jax.random.key(5), 1.0)
        h = 1e-5
        plus = jax.tree_util.tree_map(lambda p, d: p + h * d, params, direction)
        minus = jax.tree_util.tree_map(lambda p, d: p - h * d, params, direction)
        fd = (loss(plus) - loss(minus)) / (2 * h)
        ad = sum(
            jnp.sum(g * d)
            for g, d in zip(
                jax.tree_util.tree_leaves(g_eager), jax.tree_util.tree_leaves(direction)
            )
        )
        np.testing.assert_allclose(float(ad), float(fd), rtol=1e-6)


# ------------------------------------------------------------------------------------------------ adapter


class _WithRngs(nnx.Module):
    """A model carrying non-Param state (an Rngs counter) that it does not use in __call__."""

    def __init__(self):
        self.rngs = nnx.Rngs(0)
        self.net = nn.MLP(2, hidden=8, depth=1, time_dim=4, zero_init_output=False, rngs=self.rngs)

    def __call__(self, t, x):
        return self.net(t, x)


def test_split_with_non_param_state_and_merge_round_trip():
    model = _WithRngs()
    apply, params = nn.split(model)
    # only Param leaves are in params
    flat = nnx.to_flat_state(params)
    assert all(isinstance(v, nnx.Param) for _, v in flat)
    xs = jax.random.normal(jax.random.key(0), (3, 2))
    ts = jnp.array([0.0, 0.5, 1.0])
    ref = np.stack([np.asarray(model(t, x)) for t, x in zip(ts, xs)])
    out = jax.jit(jax.vmap(lambda t, x: apply(params, t, x)))(ts, xs)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda p: jnp.sum(apply(p, 0.3, xs[0]) ** 2))(params)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree_util.tree_leaves(g))
    # Apply is a PyTree: it can be a jit argument
    out2 = jax.jit(lambda f, p, x: f(p, 0.5, x))(apply, params, xs[1])
    np.testing.assert_allclose(np.asarray(out2), ref[1], rtol=1e-5, atol=1e-6)
    # merge puts new parameters into a fresh model
    new_params = _perturb(params, jax.random.key(1))
    merged = nn.merge(apply, new_params)
    np.testing.assert_allclose(
        np.asarray(merged(0.5, xs[1])), np.asarray(apply(new_params, 0.5, xs[1])), rtol=1e-6
    )
    assert not np.allclose(np.asarray(merged(0.5, xs[1])), ref[1])
    with pytest.raises(ValueError, match="nnx"):
        nn.split(lambda t, x: x)


# ------------------------------------------------------------------------------------------------ UNet


@pytest.fixture(scope="module")
def unet():
    """One small U-Net shared by the tests below (initialisation compiles one op per parameter shape)."""
    model = nn.UNet(1, base=8, mults=(1, 2), rngs=nnx.Rngs(0))
    apply, params = nn.split(model)
    return model, apply, params


def test_unet_per_example_vmap_and_jit(unet):
    model, apply, params = unet
    xs = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    ts = jnp.array([0.1, 0.5, 0.9])
    single = jax.jit(lambda p, t, x: apply(p, t, x))
    y0 = single(params, ts[0], xs[0])
    assert y0.shape == (8, 8, 1)
    np.testing.assert_array_equal(np.asarray(y0), 0.0)  # zero-initialised output conv

    params = _perturb(params, jax.random.key(1), 0.05)
    f = jax.jit(jax.vmap(lambda p, t, x: apply(p, t, x), in_axes=(None, 0, 0)))
    batched = np.asarray(f(params, ts, xs))
    assert batched.shape == (3, 8, 8, 1) and np.all(np.isfinite(batched))
    np.testing.assert_allclose(
        batched[1], np.asarray(single(params, ts[1], xs[1])), rtol=1e-4, atol=1e-5
    )
    # examples do not interact (GroupNorm is per example): changing example 2 leaves example 0 alone
    batched2 = np.asarray(f(params, ts, xs.at[2].set(10.0)))
    np.testing.assert_allclose(batched2[0], batched[0], rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched2[2], batched[2])
    # time conditioning matters
    assert not np.allclose(batched[0], np.asarray(f(params, ts[::-1], xs))[0])


def test_unet_grad_finite_and_bad_shapes(unet):
    model, apply, params = unet
    x = jax.random.normal(jax.random.key(0), (8, 8, 1))
    g = jax.jit(jax.grad(lambda p: jnp.sum((apply(p, 0.5, x) - x) ** 2)))(params)
    leaves = jax.tree_util.tree_leaves(g)
    assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)
    # the zero-initialised output conv receives a non-zero gradient
    assert float(jnp.abs(g["conv_out"]["kernel"][...]).max()) > 0
    with pytest.raises(ValueError, match="divisible"):
        model(0.5, jnp.ones((7, 8, 1)))
    with pytest.raises(ValueError, match="shape"):
        model(0.5, jnp.ones((1, 8, 8, 1)))
    with pytest.raises(ValueError, match="shape"):
        model(0.5, jnp.ones((8, 8, 3)))


@pytest.mark.parametrize("size, channels, mults", [(32, 3, (1, 2, 2)), (16, 3, (1, 2, 2))])
def test_unet_larger_images_shapes(size, channels, mults):
    # Abstract initialisation and evaluation: checks the wiring for 32x32 without computing anything.
    abstract = nnx.eval_shape(lambda: nn.UNet(channels, base=8, mults=mults, rngs=nnx.Rngs(0)))
    apply, params = nn.split(abstract)
    x = jax.ShapeDtypeStruct((5, size, size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((5,), jnp.float32)
    f = jax.vmap(lambda p, t, x: apply(p, t, x), in_axes=(None, 0, 0))
    out = jax.eval_shape(f, params, t, x)
    assert out.shape == (5, size, size, channels)


# ------------------------------------------------------------------------------------------------ EDM


def test_edm_coefficients_at_sigma_equal_sigma_data():
    # VE path with sigma_min = 0.5: at t = 1 (data end) σ = 0.5 = σ_d exactly.
    path = VEPath(sigma_min=0.5, sigma_max=50.0)
    c_skip, c_out, c_in, c_noise = nn.edm_coefficients(path, 1.0, sigma_data=0.5)
    np.testing.assert_allclose(float(c_skip), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(c_out), 0.5 / math.sqrt(2), rtol=1e-6)
    np.testing.assert_allclose(float(c_in), 1.0 / (0.5 * math.sqrt(2)), rtol=1e-6)
    np.testing.assert_allclose(float(c_noise), 0.25 * math.log(0.5), rtol=1e-6)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8, 1.0])
def test_edm_precondition_matches_hand_formula(t):
    path = EDMPath()
    sd = 0.5
    sigma = float(path.sigma(t))
    x = np.array([0.3, -1.2, 2.0], dtype=np.float32)

    def raw(c, y):  # a known F(c_noise, x_in)
        return jnp.tanh(y) + c

    D = nn.edm_precondition(raw, path, sigma_data=sd)
    c_skip = sd**2 / (sigma**2 + sd**2)
    c_out = sigma * sd / math.sqrt(sigma**2 + sd**2)
    c_in = 1.0 / math.sqrt(sigma**2 + sd**2)
    c_noise = 0.25 * math.log(sigma)
    expected = c_skip * x + c_out * (np.tanh(c_in * x) + c_noise)
    np.testing.assert_allclose(np.asarray(D(t, jnp.asarray(x))), expected, rtol=2e-5, atol=1e-6)
    # jit and vmap agree with eager
    ts = jnp.full((2,), t)
    xs = jnp.stack([jnp.asarray(x), -jnp.asarray(x)])
    out = jax.jit(jax.vmap(D))(ts, xs)
    np.testing.assert_allclose(np.asarray(out[0]), expected, rtol=2e-5, atol=1e-6)


def test_edm_limits():
    path = EDMPath()  # σ ∈ [0.002, 80]
    x = jnp.array([0.7, -0.4])
    D = nn.edm_precondition(lambda c, y: jnp.tanh(y + c), path)
    # data end, σ = 0.002: D(x) ≈ x (c_skip → 1, c_out → σ)
    np.testing.assert_allclose(np.asarray(D(1.0, x)), np.asarray(x), atol=2e-3)
    # noise end, σ = 80: D ≈ σ_d F(c_noise, x/σ) (c_skip ≈ σ_d²/σ² ≈ 4e-5)
    c_noise = 0.25 * math.log(80.0)
    expected = 0.5 * np.tanh(np.asarray(x) / 80.0 + c_noise)
    np.testing.assert_allclose(np.asarray(D(0.0, x)), expected, rtol=1e-3, atol=1e-4)


def test_edm_general_path_rescales_by_alpha_and_is_finite_at_endpoints():
    path = LinearPath()  # α = t, σ = 1 − t
    sd = 0.5
    x = np.array([0.3, -1.1], dtype=np.float32)
    D = nn.edm_precondition(lambda c, y: jnp.sin(y) + 0.1 * c, path, sigma_data=sd)
    t = 0.6
    a, s = t, 1 - t
    st = s / a  # effective noise level of x_t/α
    xt = x / a
    expected = sd**2 / (st**2 + sd**2) * xt + st * sd / math.sqrt(st**2 + sd**2) * (
        np.sin(xt / math.sqrt(st**2 + sd**2)) + 0.1 * 0.25 * math.log(st)
    )
    np.testing.assert_allclose(np.asarray(D(t, jnp.asarray(x))), expected, rtol=1e-5, atol=1e-6)
    for t_end in (0.0, 1.0):
        assert np.all(np.isfinite(np.asarray(D(t_end, jnp.asarray(x)))))
    # t = 1: σ = 0, D = x exactly
    np.testing.assert_allclose(np.asarray(D(1.0, jnp.asarray(x))), x, rtol=1e-6)


def test_edm_with_network_grad_jit_agree():
    path = EDMPath()
    model = nn.MLP(2, hidden=16, depth=2, time_dim=8, zero_init_output=False, rngs=nnx.Rngs(0))
    apply, params = nn.split(model)
    xs = jax.random.normal(jax.random.key(0), (4, 2))
    ts = jnp.array([0.05, 0.3, 0.7, 0.99])

    def loss(p):
        D = nn.edm_precondition(lambda c, y: apply(p, c, y), path)
        return jnp.mean(jax.vmap(D)(ts, xs) ** 2)

    v1, g1 = jax.value_and_grad(loss)(params)
    v2, g2 = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="path"):
        nn.edm_precondition(lambda c, y: y, "edm")
