"""Shared experiment logic for the ``diffjax`` command line and the ``experiments/`` scripts.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε. Samples are
drawn by integrating the probability-flow ODE from the prior at t0 to the data end t1, likelihoods by integrating
it backwards from the data (``diffjax.sampling``, ``diffjax.likelihood``).

One run lives in one *workdir*::

    workdir/
      experiment.json      the ExperimentConfig (what to rebuild the model, path and objective from)
      <step>/              orbax checkpoints of the TrainState (diffjax.train.fit; resumed automatically)
      config.json          the config guarded by the checkpoints (written by diffjax.checkpoint)
      metrics.json         {"config", "train", "sample", "likelihood"}: loss curve, timings, NLL / bits/dim,
                           sample quality (energy distance and RBF-MMD² against held-out data)
      loss.png, samples.png, trajectories.png

Entry points: :func:`run_train`, :func:`run_sample`, :func:`run_likelihood` (each returns the dict it also stores
in ``metrics.json``). Builders map names to objects: :data:`OBJECTIVES`, :data:`PATHS`, :data:`DATASETS`; an
unknown name raises ``ValueError`` listing the valid ones.

Objectives (name → preset of ``diffjax.losses``, default path, what the network predicts):

==========  =========================================================  ===========  ==========
name        loss                                                       path         prediction
==========  =========================================================  ===========  ==========
``fm``      conditional flow matching (Lipman et al. 2023)             ``linear``   velocity
``eps``     DDPM L_simple (Ho et al. 2020), continuous time            ``vp``       ε
``v``       v-prediction (Salimans & Ho 2022)                          ``cosine``   v
``edm``     EDM (Karras et al. 2022), preconditioned data prediction   ``edm``      data
``sd3``     SD3 rectified flow with logit-normal t (Esser et al. 2024) ``linear``   velocity
``elbo``    VDM continuous-time ELBO (Kingma et al. 2021), w(λ) = 1    ``vp``       ε
==========  =========================================================  ===========  ==========
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import checkpoint as ckpt, data as data_lib, losses, nn, paths, solve, train
from .fields import integration_interval, velocity_field
from .likelihood import bits_per_dim, log_likelihood_with_stats
from .sampling import sample_ode

__all__ = [
    "OBJECTIVES",
    "PATHS",
    "DATASETS",
    "DEFAULT_PATH",
    "ExperimentConfig",
    "NoCheckpointError",
    "NonFiniteError",
    "build_path",
    "build_objective",
    "build_model",
    "load_config",
    "has_checkpoint",
    "restore",
    "train_batch_fn",
    "held_out",
    "run_train",
    "run_sample",
    "run_likelihood",
    "energy_distance",
    "mmd_rbf",
    "sample_quality",
    "gaussian_bits_per_dim",
    "read_metrics",
    "update_metrics",
]

EXPERIMENT_FILE = "experiment.json"
METRICS_FILE = "metrics.json"

PATHS: dict[str, Callable[[], paths.AbstractPath]] = {
    "linear": paths.LinearPath,
    "cosine": paths.CosinePath,
    "vp": paths.VPPath,
    "ve": paths.VEPath,
    "edm": paths.EDMPath,
}

DEFAULT_PATH = {
    "fm": "linear",
    "eps": "vp",
    "v": "cosine",
    "edm": "edm",
    "sd3": "linear",
    "elbo": "vp",
}

OBJECTIVES: dict[str, Callable[..., losses.Objective]] = {
    "fm": lambda path, sd: losses.flow_matching(path),
    "eps": lambda path, sd: losses.ddpm(path),
    "v": lambda path, sd: losses.v_prediction(path),
    "edm": lambda path, sd: losses.edm(path, sigma_data=sd),
    "sd3": lambda path, sd: losses.sd3(path),
    "elbo": lambda path, sd: losses.vdm(path, "eps"),
}

DATASETS: tuple[str, ...] = (*data_lib.TOY_NAMES, "digits")

#: Seeds of the held-out sets of the toy data (training draws fresh batches from the run's seed instead).
_TEST_KEY = 2_000_003
_REFERENCE_KEY = 2_000_029


def _unknown(what: str, name, valid) -> ValueError:
    return ValueError(f"unknown {what} {name!r}; valid {what}s are: {', '.join(valid)}")


def _check_name(what: str, name, valid) -> str:
    if name not in valid:
        raise _unknown(what, name, valid)
    return name


# ----------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a run (JSON-serialisable; stored as ``workdir/experiment.json``).

    Attributes:
        data: a 2-D toy name (``diffjax.data.TOY_NAMES``) or ``"digits"`` (scikit-learn 8×8, UNet).
        objective: one of :data:`OBJECTIVES`.
        path: one of :data:`PATHS`; None → the objective's default (:data:`DEFAULT_PATH`).
        steps: total optimizer steps (a later run with more steps on the same workdir continues training).
        batch_size, lr, warmup, ema_decay, grad_clip, seed: optimisation (``diffjax.train.TrainConfig``; the
            learning rate warms up linearly, then decays by a cosine to 0 at ``steps``).
        hidden, depth, time_dim: the MLP of 2-D data (``diffjax.nn.MLP``).
        unet_base, unet_mults: the UNet of digits (``diffjax.nn.UNet``).
        time_scale: highest angular frequency of both models' time features (``diffjax.nn.SMOOTH_TIME_SCALE``).
            Stored with the run, so a checkpoint trained with other time features is refused, not resumed.
        sigma_data: σ_d of EDM's preconditioning and loss weight; None → the data's standard deviation.
    """

    data: str = "checkerboard"
    objective: str = "fm"
    path: str | None = None
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    warmup: int = 100
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    hidden: int = 256
    depth: int = 3
    time_dim: int = 64
    unet_base: int = 32
    unet_mults: tuple[int, ...] = (1, 2)
    time_scale: float = nn.SMOOTH_TIME_SCALE
    sigma_data: float | None = None

    def __post_init__(self):
        _check_name("data set", self.data, DATASETS)
        _check_name("objective", self.objective, tuple(OBJECTIVES))
        if self.path is not None:
            _check_name("path", self.path, tuple(PATHS))
        object.__setattr__(self, "unet_mults", tuple(int(m) for m in self.unet_mults))
        for name in ("steps", "batch_size", "hidden", "depth", "time_dim", "unet_base"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ExperimentConfig: {name}={v!r} must be a positive integer")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"ExperimentConfig: warmup={self.warmup!r} must be an integer >= 0")
        if not self.lr > 0:
            raise ValueError(f"ExperimentConfig: lr={self.lr!r} must be > 0")
        if not (isinstance(self.time_scale, (int, float)) and self.time_scale > 0):
            raise ValueError(f"ExperimentConfig: time_scale={self.time_scale!r} must be > 0")
        object.__setattr__(self, "time_scale", float(self.time_scale))
        if self.time_dim % 2:
            raise ValueError(f"ExperimentConfig: time_dim={self.time_dim} must be even")
        if self.data == "digits" and self.batch_size > 1497:
            raise ValueError(
                f"ExperimentConfig: batch_size={self.batch_size} exceeds the 1497 training digits"
            )

    @property
    def path_name(self) -> str:
        """The path actually used (the objective's default when ``path`` is None)."""
        return self.path if self.path is not None else DEFAULT_PATH[self.objective]

    @property
    def is_image(self) -> bool:
        return self.data == "digits"

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        return (8, 8, 1) if self.is_image else (2,)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["unet_mults"] = list(self.unet_mults)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExperimentConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"ExperimentConfig: unknown fields {unknown}; valid: {sorted(fields)}")
        return cls(**d)

    def replace(self, **changes) -> ExperimentConfig:
        return dataclasses.replace(self, **changes)

    def resolved(self) -> ExperimentConfig:
        """A copy with ``path`` and ``sigma_data`` filled in (what is stored in the workdir)."""
        sd = self.sigma_data
        if sd is None:
            sd = round(_data_std(self.data), 4)
        return self.replace(path=self.path_name, sigma_data=float(sd))

    def train_config(self) -> train.TrainConfig:
        return train.TrainConfig(
            learning_rate=float(self.lr),
            warmup_steps=min(self.warmup, self.steps - 1),
            total_steps=self.steps,
            ema_decay=float(self.ema_decay),
            grad_clip=float(self.grad_clip),
            batch_size=self.batch_size,
            seed=self.seed,
        )

    def guarded_config(self) -> dict[str, Any]:
        """What the checkpoints must agree with to resume (``fit``'s ``extra_config``).

        Everything but the number of steps: a later run with more steps extends the run (``fit`` lets
        ``total_steps`` differ). The ``warmup_steps`` of ``TrainConfig`` is clamped to ``steps − 1``, so it is
        overridden by the unclamped ``warmup`` for the same reason.
        """
        d = {f"exp_{k}": v for k, v in self.to_dict().items() if k != "steps"}
        d["warmup_steps"] = self.warmup
        return d


def _data_std(name: str) -> float:
    """Overall standard deviation of the data in model space (σ_d of EDM)."""
    if name == "digits":
        x = data_lib.digits_to_model_space(data_lib.load_digits("train"), jax.random.key(0))
    else:
        x = data_lib.toy_sample(name, jax.random.key(0), 20_000)
    return float(jnp.std(x))


# ----------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------


def build_path(name: str) -> paths.AbstractPath:
    """The path called ``name`` (one of :data:`PATHS`) with its default constants."""
    return PATHS[_check_name("path", name, tuple(PATHS))]()


def build_objective(
    name: str, path: paths.AbstractPath | str | None = None, sigma_data: float = 0.5
):
    """The objective ``name`` (one of :data:`OBJECTIVES`) on ``path`` (default: :data:`DEFAULT_PATH`)."""
    _check_name("objective", name, tuple(OBJECTIVES))
    if path is None or isinstance(path, str):
        path = build_path(DEFAULT_PATH[name] if path is None else path)
    return OBJECTIVES[name](path, sigma_data)


def build_model(config: ExperimentConfig):
    """``(apply, params, objective, path)`` for a resolved config.

    ``apply(params, t, x)`` is the per-example prediction of kind ``objective.prediction`` (t = 0 noise, t = 1
    data). For ``edm`` the raw network F is wrapped in EDM's preconditioning D = c_skip·x + c_out·F(c_noise, c_in·x)
    (``diffjax.nn.edm_precondition``), so the network sees unit-variance inputs and targets.
    """
    config = config.resolved() if config.sigma_data is None or config.path is None else config
    path = build_path(config.path_name)
    objective = build_objective(config.objective, path, config.sigma_data)
    rngs = nnx.Rngs(config.seed)
    if config.is_image:
        model = nn.UNet(
            1,
            base=config.unet_base,
            mults=config.unet_mults,
            time_scale=config.time_scale,
            rngs=rngs,
        )
    else:
        model = nn.MLP(
            2,
            hidden=config.hidden,
            depth=config.depth,
            time_dim=config.time_dim,
            time_scale=config.time_scale,
            rngs=rngs,
        )
    raw_apply, params = nn.split(model)
    if config.objective == "edm":
        sd = float(config.sigma_data)

        def apply(params, t, x):
            return nn.edm_precondition(lambda c, z: raw_apply(params, c, z), path, sd)(t, x)

    else:
        apply = raw_apply
    return apply, params, objective, path


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def train_batch_fn(config: ExperimentConfig) -> Callable[[int], jax.Array]:
    """``batch_fn(step)``, deterministic in the step (so resumed runs see the same data).

    Toy data: a fresh batch ``toy_sample(data, fold_in(key(seed), step), batch_size)`` per step (an endless
    stream; the held-out set uses other keys). Digits: shuffled epochs of the 1497 training images
    (``train.dataset_batch_fn``), uniformly dequantized afresh at every step (``data.digits_to_model_space``).
    """
    base = jax.random.key(config.seed)
    if config.is_image:
        images = np.asarray(data_lib.load_digits("train"))
        ints = train.dataset_batch_fn(images, config.batch_size, jax.random.fold_in(base, 1))
        dequant = jax.jit(data_lib.digits_to_model_space)
        k_deq = jax.random.fold_in(base, 2)
        return lambda s: dequant(ints(s), jax.random.fold_in(k_deq, s))
    name, bs = config.data, config.batch_size
    sample = jax.jit(lambda k: data_lib.toy_sample(name, k, bs))
    k_data = jax.random.fold_in(base, 3)
    return lambda s: sample(jax.random.fold_in(k_data, s))


def held_out(data: str, n: int | None = None, *, reference: bool = False):
    """Held-out data. Toy: ``n`` fresh samples from fixed keys, disjoint from training (``reference=True``: a
    second independent set, to measure the noise floor of sample-quality metrics). Digits: the fixed 300-image
    test split as integer levels 0..16 (first ``n``)."""
    _check_name("data set", data, DATASETS)
    if data == "digits":
        k = data_lib.load_digits("test")
        if reference:
            k = data_lib.load_digits("train")
        return k if n is None else k[:n]
    n = 1000 if n is None else n
    key = jax.random.key(_REFERENCE_KEY if reference else _TEST_KEY)
    return data_lib.toy_sample(data, key, n)


def _true_nll(data: str, x) -> float | None:
    """The data distribution's own mean NLL on ``x`` (nats) where it is known in closed form."""
    if data == "checkerboard":
        return math.log(32.0)  # uniform density 1/32 on the black squares
    if data in ("mixture", "8gaussians"):
        from .analytic import GaussianMixture  # noqa: PLC0415

        if data == "mixture":
            gm = GaussianMixture(
                data_lib.MIXTURE_WEIGHTS, data_lib.MIXTURE_MEANS, data_lib.MIXTURE_VARIANCES
            )
        else:
            gm = GaussianMixture(
                np.full(8, 1 / 8),
                np.asarray(data_lib.eight_gaussians_centers()),
                np.full(8, data_lib.EIGHT_GAUSSIANS_STD**2),
            )
        return float(-jnp.mean(jax.vmap(gm.log_prob)(jnp.asarray(x))))
    return None


# ----------------------------------------------------------------------------------------------------------
# Workdir I/O
# ----------------------------------------------------------------------------------------------------------


class NoCheckpointError(ValueError):
    """The workdir holds no checkpoint (run ``diffjax train`` first)."""


class NonFiniteError(RuntimeError):
    """A result holds NaN/inf, or a solve failed (its message says which and how to fix it)."""


def _check_finite(values, what: str) -> None:
    if not np.all(np.isfinite(np.asarray(values, dtype=np.float64))):
        raise NonFiniteError(
            f"{what} contain NaN/inf: a solve failed (the ODE solver's max_steps, or a field that is singular "
            "on [t0, t1]) or training diverged"
        )


def has_checkpoint(workdir) -> bool:
    """Whether ``workdir`` holds a finished orbax checkpoint (a directory named by its step)."""
    workdir = os.fspath(workdir)
    if not os.path.isdir(workdir):
        return False
    return any(n.isdigit() and os.path.isdir(os.path.join(workdir, n)) for n in os.listdir(workdir))


def load_config(workdir) -> ExperimentConfig:
    """The ExperimentConfig stored in ``workdir`` (``NoCheckpointError`` if it has none)."""
    workdir = os.fspath(workdir)
    path = os.path.join(workdir, EXPERIMENT_FILE)
    if not has_checkpoint(workdir) or not os.path.exists(path):
        raise NoCheckpointError(f"no checkpoint in {workdir}; run diffjax train first")
    with open(path) as f:
        return ExperimentConfig.from_dict(json.load(f))


def _write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, allow_nan=True)
    os.replace(tmp, path)


def read_metrics(workdir) -> dict:
    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def update_metrics(workdir, section: str, values: dict) -> dict:
    """Store ``values`` as ``metrics.json[section]`` (other sections are kept)."""
    metrics = read_metrics(workdir)
    metrics[section] = values
    _write_json(os.path.join(os.fspath(workdir), METRICS_FILE), metrics)
    return metrics


def restore(workdir):
    """``(config, apply, ema_params, objective, path, step)`` from the latest checkpoint of ``workdir``.

    Raises ``ValueError`` if the checkpoint was written under another config than ``experiment.json`` states.
    """
    workdir = os.fspath(workdir)
    config = load_config(workdir)
    apply, params, objective, path = build_model(config)
    tc = config.train_config()
    optimizer = train.make_optimizer(tc)
    abstract = jax.eval_shape(
        lambda: train.init_state(params, optimizer, jax.random.key(config.seed))
    )
    meta = ckpt.read_metadata(workdir)
    if meta is None:
        raise NoCheckpointError(f"no checkpoint in {workdir}; run diffjax train first")
    # The checkpoint must have been written by this config (experiment.json can be edited, and runs written by
    # older versions lack newer keys such as exp_time_scale): the model would otherwise differ silently.
    restored = ckpt.restore_latest(workdir, abstract, {**meta["config"], **config.guarded_config()})
    if restored is None:
        raise NoCheckpointError(f"no checkpoint in {workdir}; run diffjax train first")
    state, step = restored
    return config, apply, state.ema_params, objective, path, step


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


def _check_same_config(workdir: str, config: ExperimentConfig) -> None:
    """Refuse to train into a workdir whose checkpoints come from another config (all but ``steps``); then
    write ``experiment.json``."""
    exp_file = os.path.join(workdir, EXPERIMENT_FILE)
    if os.path.exists(exp_file):
        with open(exp_file) as f:
            old = ExperimentConfig.from_dict(json.load(f))
        diff = {
            k: (v, config.to_dict()[k])
            for k, v in old.to_dict().items()
            if k != "steps" and v != config.to_dict()[k]
        }
        if diff and has_checkpoint(workdir):
            items = "; ".join(f"{k}: workdir={a!r} vs now={b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{workdir} holds a run with another config ({items}); use a new --workdir or the same flags"
            )
    _write_json(exp_file, config.to_dict())


def run_train(
    config: ExperimentConfig,
    workdir,
    *,
    checkpoint_every: int = 1000,
    log_every: int | None = None,
    progress: bool = True,
    figures: bool = True,
    t_start: float | None = None,
) -> dict:
    """Train ``config`` into ``workdir`` with ``diffjax.train.fit``, resuming from its latest checkpoint.

    A workdir trained to s steps and run again with ``steps`` = N > s continues from step s (the cosine decay is
    re-planned over N steps; the first s steps are those of the earlier run). A workdir written with another
    config raises ``ValueError`` naming the differing fields.

    ``t_start`` (a ``time.perf_counter()`` value, default: now) is the origin of the reported
    ``time_to_first_step_s`` (the CLI passes the process start, so it covers imports and compilation). A run
    that is already complete trains nothing (``steps_run`` = 0) and reports the timing of the run that trained
    it, with ``timing_from_earlier_run`` = True. Returns the ``train`` section of ``metrics.json``.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    workdir = os.path.abspath(os.fspath(workdir))
    config = config.resolved()
    os.makedirs(workdir, exist_ok=True)
    _check_same_config(workdir, config)

    apply, params, objective, _ = build_model(config)
    tc = config.train_config()
    batch_fn = train_batch_fn(config)
    first: dict[str, float] = {}
    calls = [0]

    def timed_batch_fn(s):
        # The second call happens once the first step has been compiled and dispatched.
        calls[0] += 1
        if calls[0] == 2:
            first["t"] = time.perf_counter()
        return batch_fn(s)

    log_every = log_every or max(1, min(100, config.steps // 100))
    t0 = time.perf_counter()
    start_step = _latest_step(workdir)
    state, history = train.fit(
        apply,
        params,
        objective,
        timed_batch_fn,
        tc,
        workdir=workdir,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        progress=progress,
        extra_config=config.guarded_config(),
    )
    jax.block_until_ready(state.params)
    wall = time.perf_counter() - t0
    _check_finite(history["loss"], "the training losses")
    step = int(state.step)
    ran = step - start_step
    result = {
        "data": config.data,
        "objective": config.objective,
        "path": config.path_name,
        "prediction": objective.prediction.name,
        "start_step": start_step,
        "step": step,
        "steps_run": ran,
        "num_params": int(sum(np.size(x) for x in jax.tree.leaves(params))),
        "final_loss": history["loss"][-1] if history["loss"] else None,
        "history": history,
        "train_wall_s": wall,
        "steps_per_s": ran / wall if ran and wall > 0 else None,
        "time_to_first_step_s": (first["t"] - t_start) if "t" in first else None,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
    }
    metrics = read_metrics(workdir)
    prev = metrics.get("train") or {}
    if ran == 0 and prev.get("step") == step and prev.get("train_wall_s") is not None:
        # Nothing left to train: keep the timing of the run that did the training (a resumed, complete run
        # would otherwise report ~0 s), and say so.
        for k in ("train_wall_s", "steps_per_s", "time_to_first_step_s"):
            result[k] = prev.get(k)
        result["timing_from_earlier_run"] = True
    metrics["config"] = config.to_dict()
    metrics["train"] = result
    _write_json(os.path.join(workdir, METRICS_FILE), metrics)
    if figures and history["loss"]:
        result["figures"] = {"loss": plot_loss(history, os.path.join(workdir, "loss.png"), config)}
        update_metrics(workdir, "train", result)
    return result


def _latest_step(workdir: str) -> int:
    if not has_checkpoint(workdir):
        return 0
    steps = [int(n) for n in os.listdir(workdir) if n.isdigit()]
    return max(steps) if steps else 0


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------


def _interval(path: paths.AbstractPath, kind) -> tuple[float, float]:
    """(t0, t1) of the ODE for a ``kind`` model (``diffjax.fields.integration_interval``), shared by sampling
    and likelihood.

    ε/score models convert to a velocity with a division by α, data models with a division by σ: on the linear
    and cosine paths (α = 0 at t = 0, σ = 0 at t = 1) those ends move in by 1e-3.
    """
    t0, t1 = (float(v) for v in integration_interval(path, kind))
    return t0, t1


def _chunks(n: int, chunk: int):
    for i in range(0, n, chunk):
        yield i, min(chunk, n - i)


def _bar(total: int, desc: str, progress: bool, unit: str = "sample"):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)


def _sample_chunks(sample_chunk, params, keys, chunk, progress):
    """Run ``sample_chunk`` over ``keys`` in chunks of one compiled shape; check each solve's status on the host.

    Returns (samples per chunk, NFE per chunk, seconds to the first chunk)."""
    n = keys.shape[0]
    out, nfes = [], []
    tic = time.perf_counter()
    first = None
    with _bar(n, "sample", progress) as bar:
        for i, m in _chunks(n, chunk):
            k = keys[i : i + m]
            if m < chunk:  # pad to one compiled shape
                k = jnp.concatenate([k, keys[:1].repeat(chunk - m, 0)])
            r = sample_chunk(params, k)
            solve.raise_if_failed(np.asarray(r.status)[:m], dict(r.messages))
            out.append(np.asarray(r.samples)[:m])
            if first is None:
                first = time.perf_counter() - tic
            nfes.append(np.asarray(r.nfe)[:m])
            bar.update(m)
    return out, nfes, first


def run_sample(
    workdir,
    n: int = 1000,
    *,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    num_steps: int | None = None,
    chunk: int | None = None,
    num_trajectories: int = 300,
    progress: bool = True,
    figures: bool = True,
) -> dict:
    """Draw ``n`` samples with the EMA parameters by the probability-flow ODE (noise t0 → data t1).

    The model (any prediction kind) becomes a velocity with ``diffjax.fields.velocity_field``; each sample is
    one adaptive ``diffjax.sampling.sample_ode`` solve (Tsit5, rtol/atol), vmapped over keys in chunks; with
    ``num_steps`` a fixed Heun grid instead. Sample quality is measured against held-out data (energy distance
    and RBF-MMD², with the value between two independent held-out sets as the noise floor). Writes
    ``samples.npy``, ``samples.png``, ``trajectories.png`` and the ``sample`` section of ``metrics.json``.
    """
    if n < 1:
        raise ValueError(f"run_sample: n={n} must be >= 1")
    workdir = os.path.abspath(os.fspath(workdir))
    config, apply, ema, objective, path, step = restore(workdir)
    kind = objective.prediction
    t0, t1 = _interval(path, kind)
    shape = config.shape
    chunk = chunk or (64 if config.is_image else 500)
    chunk = min(chunk, n)
    save_ts = jnp.linspace(t0, t1, 21)

    kw = dict(shape=shape, t0=t0, t1=t1, rtol=rtol, atol=atol, num_steps=num_steps, throw=False)

    @functools.partial(jax.jit, static_argnums=2)
    def sample_chunk(params, keys, with_trajectory=False):
        # diffrax checks SaveAt(ts) with a host callback, which keeps a program out of the persistent
        # cache: the samples come from a program without it, the plotted trajectories from a second one
        u = velocity_field(eqx.Partial(apply, params), kind, path)
        extra = dict(save_ts=save_ts) if with_trajectory else {}
        return jax.vmap(lambda k: sample_ode(u, path, k, **kw, **extra))(keys)

    keys = jax.random.split(jax.random.key(seed), n)
    tic = time.perf_counter()
    out, nfes, first = _sample_chunks(sample_chunk, ema, keys, chunk, progress)
    wall = time.perf_counter() - tic
    traj_keys = keys[: min(num_trajectories, n)]
    trajs = [np.asarray(sample_chunk(ema, traj_keys, True).trajectory)]
    samples = np.concatenate(out)
    traj = np.concatenate(trajs)[:num_trajectories]
    nfe = np.concatenate(nfes)
    _check_finite(samples, "the samples")
    np.save(os.path.join(workdir, "samples.npy"), samples)

    ref = held_out(config.data, n if not config.is_image else None)
    if config.is_image:
        ref_x = np.asarray(data_lib.digits_to_model_space(ref, jax.random.key(1)))
        floor_x = np.asarray(
            data_lib.digits_to_model_space(
                held_out("digits", len(ref_x), reference=True), jax.random.key(2)
            )
        )
    else:
        ref_x = np.asarray(ref)
        floor_x = np.asarray(held_out(config.data, n, reference=True))
    quality = sample_quality(samples, ref_x, floor_x)
    result = {
        "data": config.data,
        "objective": config.objective,
        "step": step,
        "n": n,
        "solver": "tsit5 (adaptive)" if num_steps is None else f"heun, {num_steps} steps",
        "rtol": rtol,
        "atol": atol,
        "t0": t0,
        "t1": t1,
        "nfe_mean": float(np.mean(nfe)),
        "sample_wall_s": wall,
        "first_chunk_s": first,
        **quality,
    }
    if figures:
        result["figures"] = {
            "samples": plot_samples(samples, ref_x, os.path.join(workdir, "samples.png"), config),
            "trajectories": plot_trajectories(
                traj, np.asarray(save_ts), os.path.join(workdir, "trajectories.png"), config
            ),
        }
    update_metrics(workdir, "sample", result)
    return result


# ----------------------------------------------------------------------------------------------------------
# Likelihood
# ----------------------------------------------------------------------------------------------------------


def _likelihood_chunks(eval_chunk, params, xs, keys, chunk, is_image, progress):
    """Run ``eval_chunk`` over (xs, keys) in chunks of one compiled shape; check each solve's status on the
    host (bits/dim report a failed solve as NaN). Returns (values per chunk, NFE per chunk)."""
    total = len(xs)
    vals, nfes = [], []
    with _bar(total, "likelihood", progress) as bar:
        for i, m in _chunks(total, chunk):
            xb, kb = xs[i : i + m], keys[i : i + m]
            if m < chunk:
                xb = jnp.concatenate([xb, xb[:1].repeat(chunk - m, 0)])
                kb = jnp.concatenate([kb, kb[:1].repeat(chunk - m, 0)])
            out = eval_chunk(params, xb, kb)
            if is_image:
                vals.append(np.asarray(out)[:m])
            else:
                solve.raise_if_failed(np.asarray(out.status)[:m], dict(out.messages))
                vals.append(np.asarray(out.log_prob)[:m])
                nfes.append(np.asarray(out.nfe)[:m])
            bar.update(m)
    return vals, nfes


def run_likelihood(
    workdir,
    data: str | None = None,
    n: int | None = None,
    *,
    seed: int = 0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    num_steps: int | None = None,
    chunk: int | None = None,
    progress: bool = True,
) -> dict:
    """Held-out log-likelihood of the EMA model by the probability-flow ODE with the exact trace.

    2-D data: mean NLL in nats of ``n`` held-out points (``diffjax.likelihood.log_likelihood_with_stats``,
    ``trace="exact"``: log p_{t1}(x) = log p_{t0}(X_{t0}) − ∫ ∇·u dt, t = 0 noise, t = 1 data). Digits: bits/dim
    of the first ``n`` test images with one uniform dequantization each, with the 17-level convention of
    ``diffjax.data`` (y = 2(k + u)/17 − 1; ``diffjax.likelihood.bits_per_dim(num_levels=17)``). Paths that stop
    before clean data (VP: t1 = 1 − 1e-5; VE/EDM: σ_{t1} > 0; data models on the linear and cosine paths:
    t1 = 1 − 1e-3, see :func:`diffjax.fields.integration_interval`) give the density of the slightly perturbed data
    (no endpoint correction). Writes the ``likelihood`` section of ``metrics.json``.
    """
    workdir = os.path.abspath(os.fspath(workdir))
    config, apply, ema, objective, path, step = restore(workdir)
    data = config.data if data is None else data
    _check_name("data set", data, DATASETS)
    if (data == "digits") != config.is_image:
        raise ValueError(
            f"the model in {workdir} was trained on {config.data!r} and cannot evaluate data={data!r} "
            f"(different shape)"
        )
    kind = objective.prediction
    t0, t1 = _interval(path, kind)
    ll_kwargs = dict(
        solver="tsit5", rtol=rtol, atol=atol, num_steps=num_steps, t0=t0, t1=t1, throw=False
    )
    if config.is_image:
        xs = held_out("digits", n)
        chunk = min(chunk or 50, len(xs))

        @jax.jit
        def eval_chunk(params, ks, keys):
            u = velocity_field(eqx.Partial(apply, params), kind, path)
            return jax.vmap(
                lambda k, key: bits_per_dim(
                    u, path, k, key=key, num_levels=data_lib.DIGITS_LEVELS, **ll_kwargs
                )
            )(ks, keys)

    else:
        xs = held_out(data, n)
        chunk = min(chunk or 500, len(xs))

        @jax.jit
        def eval_chunk(params, xb, keys):
            u = velocity_field(eqx.Partial(apply, params), kind, path)
            return jax.vmap(lambda x: log_likelihood_with_stats(u, path, x, **ll_kwargs))(xb)

    total = len(xs)
    keys = jax.random.split(jax.random.key(seed), total)
    tic = time.perf_counter()
    vals, nfes = _likelihood_chunks(eval_chunk, ema, xs, keys, chunk, config.is_image, progress)
    wall = time.perf_counter() - tic
    v = np.concatenate(vals).astype(np.float64)
    _check_finite(v, "the log-likelihoods" if not config.is_image else "the bits/dim")
    se = float(np.std(v, ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    result = {
        "data": data,
        "trained_on": config.data,
        "objective": config.objective,
        "path": config.path_name,
        "step": step,
        "n": int(total),
        "trace": "exact",
        "solver": "tsit5 (adaptive)" if num_steps is None else f"tsit5, {num_steps} fixed steps",
        "rtol": rtol,
        "atol": atol,
        "t0": t0,
        "t1": t1,
        "likelihood_wall_s": wall,
    }
    if config.is_image:
        result.update(bits_per_dim=float(np.mean(v)), bits_per_dim_se=se)
    else:
        nll = -v
        result.update(
            nll=float(np.mean(nll)),
            nll_se=se,
            nfe_mean=float(np.mean(np.concatenate(nfes))),
            true_nll=_true_nll(data, xs),
        )
    update_metrics(workdir, "likelihood", result)
    return result


# ----------------------------------------------------------------------------------------------------------
# Sample-quality metrics (jnp)
# ----------------------------------------------------------------------------------------------------------


def _sq_dists(a, b):
    a = jnp.asarray(a, jnp.float32).reshape(len(a), -1)
    b = jnp.asarray(b, jnp.float32).reshape(len(b), -1)
    d = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * a @ b.T
    return jnp.maximum(d, 0.0)


@jax.jit
def energy_distance(x, y):
    """Energy distance E = 2E‖X − Y‖ − E‖X − X'‖ − E‖Y − Y'‖ ≥ 0 (Székely & Rizzo 2013; V-statistics).

    Zero iff the distributions are equal; in the units of the data; no bandwidth to choose.
    """
    dxy = jnp.sqrt(_sq_dists(x, y) + 1e-12)
    dxx = jnp.sqrt(_sq_dists(x, x) + 1e-12)
    dyy = jnp.sqrt(_sq_dists(y, y) + 1e-12)
    return 2.0 * jnp.mean(dxy) - jnp.mean(dxx) - jnp.mean(dyy)


@jax.jit
def mmd_rbf(x, y, bandwidths):
    """Unbiased MMD² with the kernel k(a, b) = mean_h exp(−‖a − b‖²/(2h²)) over ``bandwidths`` (Gretton et al. 2012).

    MMD² = E k(X, X') + E k(Y, Y') − 2 E k(X, Y), the diagonal terms left out of the within-sample means.
    """
    h = jnp.asarray(bandwidths, jnp.float32)

    def k(d):
        return jnp.mean(jnp.exp(-d[..., None] / (2.0 * h * h)), axis=-1)

    kxx, kyy, kxy = k(_sq_dists(x, x)), k(_sq_dists(y, y)), k(_sq_dists(x, y))
    n, m = kxx.shape[0], kyy.shape[0]
    sxx = (jnp.sum(kxx) - jnp.trace(kxx)) / (n * (n - 1))
    syy = (jnp.sum(kyy) - jnp.trace(kyy)) / (m * (m - 1))
    return sxx + syy - 2.0 * jnp.mean(kxy)


def sample_quality(samples, data, reference=None, max_n: int = 2000) -> dict:
    """Energy distance and RBF-MMD² between ``samples`` and held-out ``data``.

    Bandwidths: the median pairwise distance m of the held-out data times (¼, ½, 1, 2). With ``reference`` (a
    second independent held-out set) the same metrics between the two data sets are reported as ``*_floor``:
    what a perfect model scores at this sample size.
    """
    samples = np.asarray(samples)[:max_n]
    data = np.asarray(data)[:max_n]
    med = float(jnp.sqrt(jnp.median(_sq_dists(data[:500], data[:500]))))
    bw = jnp.asarray([0.25, 0.5, 1.0, 2.0], jnp.float32) * med
    out = {
        "energy_distance": float(energy_distance(samples, data)),
        "mmd_rbf": float(mmd_rbf(samples, data, bw)),
        "mmd_bandwidths": [float(b) for b in bw],
    }
    if reference is not None:
        reference = np.asarray(reference)[: len(samples)]
        out["energy_distance_floor"] = float(energy_distance(reference, data))
        out["mmd_rbf_floor"] = float(mmd_rbf(reference, data, bw))
    return out


def gaussian_bits_per_dim(
    train_k, test_k, key, *, full_cov: bool = False, num_dequant: int = 4
) -> float:
    """Exact bits/dim of a Gaussian fitted by maximum likelihood to dequantized training digits.

    Model space y = 2(k + u)/17 − 1 (``diffjax.data.digits_to_model_space``); per-pixel (diagonal) Gaussian or, with
    ``full_cov``, a full-covariance Gaussian (ridge 1e-4). bpd = −(log N(y) + D·log(2/17))/(D ln 2), averaged
    over test images and ``num_dequant`` dequantization draws — the same convention as :func:`run_likelihood`.
    """
    k_fit, k_test = jax.random.split(key)
    y = data_lib.digits_to_model_space(jnp.asarray(train_k), k_fit).reshape(len(train_k), -1)
    y = y.astype(jnp.float64) if jax.config.read("jax_enable_x64") else y
    mu = jnp.mean(y, 0)
    d = y.shape[1]
    yt = jnp.stack(
        [
            data_lib.digits_to_model_space(jnp.asarray(test_k), k).reshape(len(test_k), -1)
            for k in jax.random.split(k_test, num_dequant)
        ]
    )
    z = yt - mu
    if full_cov:
        cov = jnp.cov(y, rowvar=False) + 1e-4 * jnp.eye(d)
        chol = jnp.linalg.cholesky(cov)
        sol = jax.scipy.linalg.solve_triangular(chol, z.reshape(-1, d).T, lower=True).T
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(chol)))
        quad = jnp.sum(sol * sol, -1)
    else:
        var = jnp.var(y, 0) + 1e-6
        logdet = jnp.sum(jnp.log(var))
        quad = jnp.sum(z.reshape(-1, d) ** 2 / var, -1)
    log_p = -0.5 * (quad + logdet + d * math.log(2 * math.pi))
    bpd = -(log_p + d * data_lib.dequantization_log_volume()) / (d * math.log(2.0))
    return float(jnp.mean(bpd))


# ----------------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)
# ----------------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _title(config: ExperimentConfig) -> str:
    return f"{config.data} · {config.objective} on {config.path_name} path"


def plot_loss(history: dict, out: str, config: ExperimentConfig) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(history["step"], history["loss"], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (window mean)")
    if min(history["loss"]) > 0:
        ax.set_yscale("log")
    ax.set_title(_title(config), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _digit_grid(x, rows: int = 8, cols: int = 8):
    x = np.clip(np.asarray(x)[: rows * cols, ..., 0], -1, 1)
    x = (
        np.concatenate([x, np.full((rows * cols - len(x), 8, 8), -1.0)])
        if len(x) < rows * cols
        else x
    )
    x = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
    return x.reshape(rows, cols, 10, 10).transpose(0, 2, 1, 3).reshape(rows * 10, cols * 10)


def plot_samples(samples, data, out: str, config: ExperimentConfig) -> str:
    """Samples beside held-out data (2-D: scatter plots on the same axes; digits: 8×8 grids)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    if config.is_image:
        for ax, x, name in ((axes[0], data, "held-out data"), (axes[1], samples, "samples")):
            ax.imshow(_digit_grid(x), cmap="gray_r", vmin=-1, vmax=1)
            ax.set_title(name)
            ax.axis("off")
    else:
        lim = float(np.percentile(np.abs(np.asarray(data)), 99.5)) * 1.1
        for ax, x, name, c in (
            (axes[0], data, "held-out data", "tab:blue"),
            (axes[1], samples, "samples (PF-ODE)", "tab:orange"),
        ):
            x = np.asarray(x)[:2000]
            ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, c=c)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_title(f"{name} (n={len(x)})")
    fig.suptitle(_title(config), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_trajectories(traj, ts, out: str, config: ExperimentConfig) -> str:
    """ODE trajectories from noise (t0) to data (t1): 2-D paths, or digit snapshots along t."""
    plt = _plt()
    traj = np.asarray(traj)
    if config.is_image:
        idx = np.linspace(0, len(ts) - 1, 6).round().astype(int)
        rows = min(6, len(traj))
        fig, axes = plt.subplots(
            rows, len(idx), figsize=(1.4 * len(idx), 1.4 * rows), squeeze=False
        )
        for r in range(rows):
            for c, j in enumerate(idx):
                ax = axes[r, c]
                ax.imshow(np.clip(traj[r, j, ..., 0], -1, 1), cmap="gray_r", vmin=-1, vmax=1)
                ax.axis("off")
                if r == 0:
                    ax.set_title(f"t={ts[j]:.2f}", fontsize=8)
    else:
        fig, ax = plt.subplots(figsize=(5, 5))
        for p in traj[:300]:
            ax.plot(p[:, 0], p[:, 1], lw=0.4, alpha=0.4, c="gray")
        ax.scatter(
            traj[:300, 0, 0], traj[:300, 0, 1], s=3, c="tab:blue", label=f"t={ts[0]:.3g} (noise)"
        )
        ax.scatter(
            traj[:300, -1, 0], traj[:300, -1, 1], s=3, c="tab:orange", label=f"t={ts[-1]:.3g}"
        )
        lim = float(np.percentile(np.abs(traj[:, -1]), 99.5)) * 1.6
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.legend(loc="upper right", fontsize=7)
    fig.suptitle(_title(config) + " — probability-flow ODE", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
