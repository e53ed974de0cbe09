"""What a config is made of: its path, objective, model and data (t = 0 is noise, t = 1 is data).

Names map to objects here, and only here: :data:`PATH_CLASSES` and :data:`OBJECTIVE_PRESETS` over the names of
``diffjax_app.config``; an unknown name raises ``ValueError`` listing the valid ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from diffjax import data as data_lib, losses, nn, paths, train

from .config import DATASETS, DEFAULT_PATH, OBJECTIVES, PATHS, ExperimentConfig, check_name

__all__ = [
    "PATH_CLASSES",
    "OBJECTIVE_PRESETS",
    "build_path",
    "build_objective",
    "build_model",
    "train_batch_fn",
    "held_out",
    "held_out_labels",
    "data_std",
    "DATA_STD",
    "measured_data_std",
]

PATH_CLASSES: dict[str, Callable[[], paths.AbstractPath]] = {
    "linear": paths.LinearPath,
    "cosine": paths.CosinePath,
    "vp": paths.VPPath,
    "ve": paths.VEPath,
    "edm": paths.EDMPath,
}

OBJECTIVE_PRESETS: dict[str, Callable[..., losses.Objective]] = {
    "fm": lambda path, sd: losses.flow_matching(path),
    "eps": lambda path, sd: losses.ddpm(path),
    "v": lambda path, sd: losses.v_prediction(path),
    "edm": lambda path, sd: losses.edm(path, sigma_data=sd),
    "sd3": lambda path, sd: losses.sd3(path),
    "elbo": lambda path, sd: losses.vdm(path, "eps"),
}

#: Seeds of the held-out sets of the toy data (training draws fresh batches from the run's seed instead).
_TEST_KEY = 2_000_003
_REFERENCE_KEY = 2_000_029


#: σ_d of each data set in model space, as :func:`measured_data_std` computes it (on CPU, float32). Fixed here
#: so that no program runs for it at the start of every ``diffjax train`` (0.2–0.4 s) and so that a run's
#: config (``sigma_data``, rounded to 4 decimals) is the same on every machine; a test recomputes them.
DATA_STD = {
    "checkerboard": 2.3164055347442627,
    "moons": 1.4274616241455078,
    "8gaussians": 1.4360578060150146,
    "spirals": 1.7559309005737305,
    "mixture": 1.1937302350997925,
    "digits": 0.7081319689750671,
}


def data_std(name: str) -> float:
    """Overall standard deviation of the data in model space (σ_d of EDM): ``DATA_STD[name]``."""
    return DATA_STD[check_name("data set", name, DATASETS)]


def measured_data_std(name: str) -> float:
    """σ_d computed: the std of 20,000 toy samples drawn with ``key(0)``, or of the 1497 training digits
    dequantized with ``key(0)`` (one jitted program each)."""
    check_name("data set", name, DATASETS)
    if name == "digits":
        return float(_digits_std(data_lib.load_digits("train"), jax.random.key(0)))
    return float(_toy_std(jax.random.key(0), name=name))


@functools.partial(jax.jit, static_argnames="name")
def _toy_std(key, *, name: str):
    return jnp.std(data_lib.toy_sample(name, key, 20_000))


@jax.jit
def _digits_std(images, key):
    return jnp.std(data_lib.digits_to_model_space(images, key))


def build_path(name: str) -> paths.AbstractPath:
    """The path called ``name`` (one of ``PATHS``) with its default constants."""
    return PATH_CLASSES[check_name("path", name, PATHS)]()


def build_objective(
    name: str, path: paths.AbstractPath | str | None = None, sigma_data: float = 0.5
) -> losses.Objective:
    """The objective ``name`` (one of ``OBJECTIVES``) on ``path`` (default: its ``DEFAULT_PATH``)."""
    check_name("objective", name, OBJECTIVES)
    if path is None or isinstance(path, str):
        path = build_path(DEFAULT_PATH[name] if path is None else path)
    return OBJECTIVE_PRESETS[name](path, sigma_data)


def _network(config: ExperimentConfig):
    rngs = nnx.Rngs(config.seed)
    if config.is_image:
        return nn.UNet(
            1,
            base=config.unet_base,
            mults=config.unet_mults,
            time_scale=config.time_scale,
            num_classes=config.num_classes,
            rngs=rngs,
        )
    return nn.MLP(
        2,
        hidden=config.hidden,
        depth=config.depth,
        time_dim=config.time_dim,
        time_scale=config.time_scale,
        num_classes=config.num_classes,
        rngs=rngs,
    )


def _init_network(config: ExperimentConfig):
    """``nn.split`` of the config's freshly initialised network.

    The MLP (2-D data) is initialised by one jitted program: eagerly, each of its ~20 distinct init ops is a
    program of its own, lowered and looked up in the compilation cache on every start. The UNet's init program
    costs more to trace and lower than its eager ops do, so it stays eager. Both give the same parameters.
    """
    make = functools.partial(_network, config)
    return nn.split(make() if config.is_image else nnx.jit(make)())


def build_model(config: ExperimentConfig):
    """``(apply, params, objective, path)`` for a config (resolved first if needed).

    ``apply(params, t, x)`` is the per-example prediction of kind ``objective.prediction`` (t = 0 noise, t = 1
    data); a conditional config's (``num_classes`` K) is ``apply(params, t, x, c)``, c in 0..K−1 or K the null
    label. For ``edm`` the raw network F is wrapped in EDM's preconditioning D = c_skip·x + c_out·F(c_noise, c_in·x)
    (``diffjax.nn.edm_precondition``), so the network sees unit-variance inputs and targets.
    """
    config = config.resolved() if config.sigma_data is None or config.path is None else config
    path = build_path(config.path_name)
    objective = build_objective(config.objective, path, config.sigma_data)
    raw_apply, params = _init_network(config)
    if config.objective != "edm":
        return raw_apply, params, objective, path
    sd = float(config.sigma_data)

    def apply(params, t, x, *cond):
        return nn.edm_precondition(lambda s, z: raw_apply(params, s, z, *cond), path, sd)(t, x)

    return apply, params, objective, path


def train_batch_fn(config: ExperimentConfig) -> Callable[[int], jax.Array]:
    """``batch_fn(step)``, deterministic in the step (so resumed runs see the same data).

    A conditional config's batches are ``(xs, labels)``: for 8gaussians the same points as an unconditional
    run's with their centres' indices, for digits shuffled (image, label) pairs.

    Toy data: a fresh batch ``toy_sample(data, fold_in(key(seed), step), batch_size)`` per step (an endless
    stream; the held-out set uses other keys). Digits: shuffled epochs of the 1497 training images
    (``train.dataset_batch_fn``), uniformly dequantized afresh at every step (``data.digits_to_model_space``).
    """
    # each step's batch is one jitted program, fold_in of the step included (one dispatch per step, one program
    # to load on a warm start); the keys are arguments, not constants, so every seed shares the program
    base = jax.random.key(config.seed)
    labelled = config.conditional
    if config.is_image:
        # (image, label) pairs share one permutation: a conditional run sees the unconditional run's images
        images, labels = data_lib.load_digits_with_labels("train")
        pairs = train.dataset_batch_fn(
            (np.asarray(images), np.asarray(labels)), config.batch_size, jax.random.fold_in(base, 1)
        )
        dequant = jax.jit(
            lambda k, key, s: data_lib.digits_to_model_space(k, jax.random.fold_in(key, s))
        )
        k_deq = jax.random.fold_in(base, 2)

        def batch(s):
            ints, cs = pairs(s)
            xs = dequant(ints, k_deq, s)
            return (xs, cs) if labelled else xs

        return batch
    name, bs = config.data, config.batch_size
    if labelled:  # 8gaussians: the same points as toy_sample's, with their centres' indices
        draw = lambda key: data_lib.sample_8gaussians_with_labels(key, bs)  # noqa: E731
    else:
        draw = lambda key: data_lib.toy_sample(name, key, bs)  # noqa: E731
    sample = jax.jit(lambda key, s: draw(jax.random.fold_in(key, s)))
    k_data = jax.random.fold_in(base, 3)
    return lambda s: sample(k_data, s)


def held_out_labels(data: str, n: int | None = None, *, reference: bool = False) -> np.ndarray:
    """The class labels of :func:`held_out`'s examples (same arguments; data sets with classes only)."""
    if data == "digits":
        c = np.asarray(data_lib.load_digits_with_labels("train" if reference else "test")[1])
        return c if n is None else c[:n]
    if data != "8gaussians":
        raise ValueError(f"held_out_labels: data set {data!r} has no class labels")
    n = 1000 if n is None else n
    key = jax.random.key(_REFERENCE_KEY if reference else _TEST_KEY)
    return np.asarray(data_lib.sample_8gaussians_with_labels(key, n)[1])


def held_out(data: str, n: int | None = None, *, reference: bool = False):
    """Held-out data. Toy: ``n`` (default 1000) fresh samples from fixed keys, disjoint from training
    (``reference=True``: a second independent set, the noise floor of sample-quality metrics). Digits: the fixed
    300-image test split as integer levels 0..16 (first ``n``; ``reference=True``: the training images)."""
    check_name("data set", data, DATASETS)
    if data == "digits":
        k = data_lib.load_digits("train" if reference else "test")
        return k if n is None else k[:n]
    n = 1000 if n is None else n
    key = jax.random.key(_REFERENCE_KEY if reference else _TEST_KEY)
    return data_lib.toy_sample(data, key, n)
