"""Tests for the digits experiment's normalizing-flow baseline (experiments/digits_flow.py, needs flowjax).

The bits/dim convention is checked against an independent closed form: for a fixed (untrainable) diagonal
Gaussian, E_u[log N(y; m, s²)] over uniform dequantization inside a bin of width w centred at c is
log N(c; m, s²) − w²/(24 s²), so the expected bpd is known exactly.
"""

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax import data

pytest.importorskip("flowjax")
paramax = pytest.importorskip("paramax")

_PATH = os.path.join(os.path.dirname(__file__), "..", "experiments", "digits_flow.py")
_spec = importlib.util.spec_from_file_location("digits_flow", _PATH)
digits_flow = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(digits_flow)


def test_bits_per_dim_convention_matches_closed_form(monkeypatch):
    from flowjax.distributions import Normal

    train_k, test_k = data.load_digits("train")[:300], data.load_digits("test")
    d = 64
    m = np.linspace(-0.5, 0.5, d)
    s = np.linspace(0.4, 0.9, d)
    fixed = paramax.non_trainable(Normal(jnp.asarray(m), jnp.asarray(s)))
    monkeypatch.setattr(digits_flow, "build_flow", lambda *a, **k: fixed)
    r = digits_flow.flow_bits_per_dim(
        train_k, test_k, jax.random.key(0), seconds=0.01, eval_every=2, num_dequant=8, val_size=50
    )
    # Independent closed form (numpy): bin centre c, width w = 2/17.
    w = 2.0 / 17
    c = (np.asarray(test_k).reshape(len(test_k), d) + 0.5) * w - 1.0
    e_logp = np.sum(
        -0.5 * np.log(2 * np.pi * s**2) - (c - m) ** 2 / (2 * s**2) - w**2 / (24 * s**2), axis=1
    )
    expected = -(np.mean(e_logp) + d * math.log(w)) / (d * math.log(2))
    # Monte Carlo over 8 draws × 300 images: the per-dim std of the dequantization noise term is < 1e-3 bpd.
    np.testing.assert_allclose(r["bits_per_dim"], expected, atol=3e-3)
    assert r["num_params"] == 0


def test_flow_learns_in_100_steps():
    train_k, test_k = data.load_digits("train"), data.load_digits("test")[:100]
    r = digits_flow.flow_bits_per_dim(
        train_k,
        test_k,
        jax.random.key(0),
        seconds=600.0,
        flow_layers=2,
        nn_width=64,
        eval_every=25,
        max_steps=100,
    )
    h = r["history"]
    assert len(h) == 4 and r["steps"] == 100
    assert h[-1]["val_nll"] < h[0]["val_nll"] - 5.0  # nats per image: it is learning
    assert math.isfinite(r["bits_per_dim"]) and r["bits_per_dim"] < math.log2(17)


def test_bad_arguments_raise():
    k = data.load_digits("test")
    with pytest.raises(ValueError, match="seconds"):
        digits_flow.flow_bits_per_dim(k, k, jax.random.key(0), seconds=0.0)
    with pytest.raises(ValueError, match="val_size"):
        digits_flow.flow_bits_per_dim(k[:10], k, jax.random.key(0), seconds=1.0, val_size=10)
    with pytest.raises(ValueError, match="unknown flow architecture"):
        digits_flow.build_flow(jax.random.key(0), 4, "glow")
