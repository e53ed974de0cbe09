"""The README's API tour: train flow matching, sample the PF-ODE, compute an exact likelihood (t=0 noise, t=1 data)."""

import equinox as eqx
import jax
from flax import nnx

import diffjax as dj

path = dj.LinearPath()  # x_t = t·x + (1 − t)·ε: t = 0 noise, t = 1 data
objective = dj.flow_matching(path)  # E‖u_θ(t, x_t) − (x − ε)‖², t ~ U[0, 1]; w(λ) = e^{−λ/2}
apply, params = dj.nn.split(dj.nn.MLP(2, hidden=128, rngs=nnx.Rngs(0)))  # pure apply(params, t, x)

data = dj.data.toy_sample("checkerboard", jax.random.key(0), 50_000)
config = dj.train.TrainConfig(learning_rate=2e-3, total_steps=1500, batch_size=256)
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
samples = jax.jit(jax.vmap(draw))(jax.random.split(jax.random.key(2), 2000))

test = dj.data.toy_sample("checkerboard", jax.random.key(3), 500)
log_p = jax.jit(jax.vmap(lambda x: dj.log_likelihood(velocity, path, x)))(test)  # exact trace, nats
print(
    f"loss {history['loss'][-1]:.3f}   held-out NLL {-log_p.mean():.3f} nats   samples {samples.shape}"
)
print("implied weighting of FM at λ=0:", dj.implied_weighting(objective).weight(0.0))  # = e^0 = 1
