"""The configuration of one experiment run, and the names the command line offers. Pure Python.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε.

Nothing here imports JAX, so ``diffjax --help`` and argument checks are instant; the names below are checked
against the builders (``diffjax_app.build``) and the numerics (``diffjax.data.TOY_NAMES``,
``diffjax.nn.SMOOTH_TIME_SCALE``) by the tests.

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
from typing import Any

__all__ = [
    "DATASETS",
    "OBJECTIVES",
    "PATHS",
    "DEFAULT_PATH",
    "TOY_DATASETS",
    "DIGITS_TRAIN_SIZE",
    "DATA_CLASSES",
    "ExperimentConfig",
    "unknown_name",
]

#: The 2-D toy data sets (``diffjax.data.TOY_NAMES``) and the 8×8 digits.
TOY_DATASETS: tuple[str, ...] = ("checkerboard", "moons", "8gaussians", "spirals", "mixture")
DATASETS: tuple[str, ...] = (*TOY_DATASETS, "digits")
OBJECTIVES: tuple[str, ...] = ("fm", "eps", "v", "edm", "sd3", "elbo")
PATHS: tuple[str, ...] = ("linear", "cosine", "vp", "ve", "edm")
DEFAULT_PATH: dict[str, str] = {
    "fm": "linear",
    "eps": "vp",
    "v": "cosine",
    "edm": "edm",
    "sd3": "linear",
    "elbo": "vp",
}
#: scikit-learn's digits split by ``diffjax.data.load_digits``: 1497 training, 300 test images.
DIGITS_TRAIN_SIZE = 1497
#: The data sets with class labels and their number of classes (``diffjax.data.DIGITS_CLASSES``; the 8 centres of
#: 8gaussians): the ones a class-conditional run (``num_classes``) may train on.
DATA_CLASSES: dict[str, int] = {"8gaussians": 8, "digits": 10}
#: ``diffjax.nn.SMOOTH_TIME_SCALE`` (checked by the tests): the models' highest time frequency.
_SMOOTH_TIME_SCALE = 30.0


def unknown_name(what: str, name, valid) -> ValueError:
    """The error for a name that is not one of ``valid``; it lists the valid ones."""
    return ValueError(f"unknown {what} {name!r}; valid {what}s are: {', '.join(valid)}")


def check_name(what: str, name, valid) -> str:
    if name not in valid:
        raise unknown_name(what, name, valid)
    return name


def _check_int(name: str, v, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"ExperimentConfig: {name}={v!r} must be an integer >= {lo}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a run (JSON-serialisable; stored as ``workdir/experiment.json``).

    Attributes:
        data: a 2-D toy name (:data:`TOY_DATASETS`) or ``"digits"`` (scikit-learn 8×8, UNet).
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
        num_classes: None (an unconditional model) or the data's number of classes (:data:`DATA_CLASSES`): a
            class-conditional network ``model(t, x, c)`` with the learned null label c = ``num_classes``.
        cond_dropout: the probability that a training example's label is replaced by the null label (classifier-
            free guidance; ``diffjax.ClassDropout``); None for unconditional runs, default 0.1 for conditional ones.
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
    time_scale: float = _SMOOTH_TIME_SCALE
    sigma_data: float | None = None
    num_classes: int | None = None
    cond_dropout: float | None = None

    def __post_init__(self):
        check_name("data set", self.data, DATASETS)
        check_name("objective", self.objective, OBJECTIVES)
        if self.path is not None:
            check_name("path", self.path, PATHS)
        object.__setattr__(self, "unet_mults", tuple(int(m) for m in self.unet_mults))
        for name in ("steps", "batch_size", "hidden", "depth", "time_dim", "unet_base"):
            _check_int(name, getattr(self, name), 1)
        _check_int("warmup", self.warmup, 0)
        if not self.lr > 0:
            raise ValueError(f"ExperimentConfig: lr={self.lr!r} must be > 0")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ExperimentConfig: ema_decay={self.ema_decay!r} must lie in [0, 1)")
        if not (isinstance(self.time_scale, (int, float)) and self.time_scale > 0):
            raise ValueError(f"ExperimentConfig: time_scale={self.time_scale!r} must be > 0")
        object.__setattr__(self, "time_scale", float(self.time_scale))
        if self.time_dim % 2:
            raise ValueError(f"ExperimentConfig: time_dim={self.time_dim} must be even")
        self._check_conditioning()
        if self.data == "digits" and self.batch_size > DIGITS_TRAIN_SIZE:
            raise ValueError(
                f"ExperimentConfig: batch_size={self.batch_size} exceeds the {DIGITS_TRAIN_SIZE} training "
                "digits; pass a smaller --batch-size"
            )

    def _check_conditioning(self) -> None:
        if self.num_classes is None:
            if self.cond_dropout is not None:
                raise ValueError(
                    f"ExperimentConfig: cond_dropout={self.cond_dropout!r} needs a conditional run "
                    "(num_classes; --conditional)"
                )
            return
        if self.data not in DATA_CLASSES:
            raise ValueError(
                f"data set {self.data!r} has no classes to condition on; the data sets with classes are: "
                f"{', '.join(DATA_CLASSES)}"
            )
        if self.num_classes != DATA_CLASSES[self.data]:
            raise ValueError(
                f"ExperimentConfig: num_classes={self.num_classes!r} but {self.data!r} has "
                f"{DATA_CLASSES[self.data]} classes"
            )
        p = 0.1 if self.cond_dropout is None else self.cond_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"ExperimentConfig: cond_dropout={p!r} must be a number in [0, 1]")
        object.__setattr__(self, "cond_dropout", float(p))

    @property
    def conditional(self) -> bool:
        return self.num_classes is not None

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

    def differences(self, other: ExperimentConfig, *, ignore=("steps",)) -> dict[str, tuple]:
        """``{field: (self's value, other's value)}`` for every field that differs, except ``ignore``."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in ignore and a[k] != b[k]}

    def resolved(self) -> ExperimentConfig:
        """A copy with ``path`` and ``sigma_data`` filled in (what is stored in the workdir)."""
        sd = self.sigma_data
        if sd is None:
            from .build import data_std  # noqa: PLC0415 (loads JAX)

            sd = round(data_std(self.data), 4)
        return self.replace(path=self.path_name, sigma_data=float(sd))

    def train_config(self):
        """The ``diffjax.train.TrainConfig`` of this run (warm-up clamped to ``steps − 1``)."""
        from diffjax import train  # noqa: PLC0415 (loads JAX and optax)

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
        # unconditional runs leave the conditioning keys out, so checkpoints written before they existed resume
        skip = {"steps"} | (set() if self.conditional else {"num_classes", "cond_dropout"})
        d = {f"exp_{k}": v for k, v in self.to_dict().items() if k not in skip}
        d["warmup_steps"] = self.warmup
        return d
