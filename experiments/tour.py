"""The README's API tour: train flow matching, sample the PF-ODE, compute an exact likelihood (t=0 noise, t=1 data).

    python experiments/tour.py            # 1500 steps, 2000 samples, 500 test points
    python experiments/tour.py --quick    # 300 steps, 500 samples, 100 test points

Human-readable lines go to stderr; stdout is one JSON line.
"""

import argparse
import json
import math
import sys

import equinox as eqx
import jax
from flax import nnx

import diffjax as dj

args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
args.add_argument("--quick", action="store_true", help="300 steps, 500 samples, 100 test points")
quick = args.parse_args().quick
steps, n_samples, n_test = (300, 500, 100) if quick else (1500, 2000, 500)

path = dj.LinearPath()  # x_t = t·x + (1 − t)·ε: t = 0 noise, t = 1 data
objective = dj.flow_matching(path)  # E‖u_θ(t, x_t) − (x − ε)‖², t ~ U[0, 1]; w(λ) = e^{−λ/2}
apply, params = dj.nn.split(dj.nn.MLP(2, hidden=128, rngs=nnx.Rngs(0)))  # pure apply(params, t, x)

data = dj.data.toy_sample("checkerboard", jax.random.key(0), 50_000)
config = dj.train.TrainConfig(learning_rate=2e-3, total_steps=steps, batch_size=256)
batches = dj.train.dataset_batch_fn(data, config.batch_size, jax.random.key(1))
state, history = dj.train.fit(
    apply, params, objective, batches, config
)  # workdir=... to checkpoint/resume

model = eqx.Partial(apply, state.ema_params)  # a PyTree: the parameters are leaves, not constants
velocity = dj.velocity_field(
    model, objective.prediction, path
)  # any kind: eps, data, v, score, velocity
draw = lambda key: (
    dj.sample_ode(velocity, path, key, shape=(2,)).samples
)  # adaptive Tsit5, one example
samples = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(2), n_samples))

test = dj.data.toy_sample("checkerboard", jax.random.key(3), n_test)
log_p = jax.jit(jax.vmap(lambda x: dj.log_likelihood(velocity, path, x)))(test)  # exact trace, nats
nll = float(-log_p.mean())
w0 = float(dj.implied_weighting(objective).weight(0.0))  # FM: w(λ) = e^{−λ/2}, = 1 at λ = 0
print(
    f"loss {history['loss'][-1]:.3f}   held-out NLL {nll:.3f} nats   samples {samples.shape}",
    file=sys.stderr,
)
print("implied weighting of FM at λ=0:", w0, file=sys.stderr)
print(
    json.dumps(
        {
            "steps": steps,
            "final_loss": float(history["loss"][-1]),
            "held_out_nll": nll,
            "true_nll": math.log(32.0),  # uniform on 8 squares of area 4
            "n_samples": int(samples.shape[0]),
            "n_test": n_test,
            "implied_weight_at_0": w0,
        }
    ),
    flush=True,
)
