"""Small reference networks (``flax.nnx``) and a functional adapter that turns them into pure functions.

Time convention (used everywhere in diffjax): **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε.

Every model here is **per example**: ``model(t, x)`` takes a scalar time ``t`` and ONE example ``x`` and returns an
array of the same shape as ``x`` (a prediction of any kind: ε, data, v, velocity or score — the network does not
know which; the training code decides). Batching is ``jax.vmap``. The models accept any real scalar as ``t``
(``edm_precondition`` feeds them c_noise = ¼ ln σ, which lies outside [0, 1]); they do not check the range.

Models are deterministic (no dropout, no batch statistics), so a model is the pure function of its parameters
returned by :func:`split`::

    model = diffjax.nn.MLP(2, rngs=nnx.Rngs(0))
    apply, params = diffjax.nn.split(model)           # params: nnx.State of the nnx.Param leaves (a PyTree)
    pred = jax.vmap(lambda t, x: apply(params, t, x))(ts, xs)
    grads = jax.grad(lambda p: loss(apply, p))(params)

Contents:

* :class:`SinusoidalEmbedding` — Transformer/DDPM sinusoidal features of a scalar time.
* :class:`MLP` — time-conditioned MLP for vectors (toy 2-D data).
* :class:`FlowMapMLP` — the same with two times, an average-velocity model ``model(s, x, t)`` for flow maps.
* :class:`UNet` — small time-conditioned U-Net for images from 8×8 to 32×32 (Ho et al. 2020 layout).
* :func:`split`, :func:`merge`, :class:`Apply` — the functional adapter.
* :func:`edm_precondition` — EDM preconditioning (Karras et al. 2022) of a raw network into a data prediction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, ArrayLike, Float

from .conditioning import check_class_labels
from .paths import AbstractPath

__all__ = [
    "SinusoidalEmbedding",
    "MLP",
    "FlowMapMLP",
    "UNet",
    "Apply",
    "split",
    "merge",
    "edm_precondition",
    "edm_coefficients",
]

Scalar = Float[ArrayLike, ""]


def _param_dtype():
    """Float32 by default; float64 when the user has enabled x64."""
    return jnp.result_type(float)


def _as_float_scalar(t) -> Float[Array, ""]:
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.result_type(float))
    if t.shape != ():
        raise ValueError(
            f"t must be a scalar (models are per-example functions; use jax.vmap for batches), "
            f"got shape {t.shape}"
        )
    return t


_ZEROS = nnx.initializers.zeros


def _lecun_init(module: nnx.Module, key, exclude: tuple[tuple, ...] = ()) -> None:
    """Fill every ``kernel`` Param of ``module`` (except those under the paths in ``exclude``) with LeCun-normal
    values N(0, 1/fan_in), fan_in = prod(kernel.shape[:-1]) (LeCun et al. 1998; the variance of flax's default).

    All kernels come from ONE draw of jax.random.normal, sliced in order: on CPU every distinct random shape costs
    a separate XLA compilation (seconds each), so a per-layer draw makes a U-Net's initialisation slow.
    """
    kernels = [
        (path, var)
        for path, var in nnx.iter_graph(module)
        if isinstance(var, nnx.Param) and path and path[-1] == "kernel" and path[:-1] not in exclude
    ]
    if not kernels:
        return
    dtype = kernels[0][1].get_value().dtype
    sizes = [math.prod(var.get_value().shape) for _, var in kernels]
    z = jax.random.normal(key, (sum(sizes),), dtype)
    if not isinstance(z, jax.core.Tracer):
        z = np.asarray(z)  # host slicing: no per-shape compilation
    start = 0
    for (_, var), size in zip(kernels, sizes, strict=True):
        shape = var.get_value().shape
        fan_in = math.prod(shape[:-1])
        chunk = z[start : start + size].reshape(shape) * (1.0 / math.sqrt(fan_in))
        var.set_value(jnp.asarray(chunk, dtype))
        start += size


def _class_embedding(
    num_classes: int | None, dim: int, rngs: nnx.Rngs, owner: str
) -> nnx.Embed | None:
    """K + 1 learned class embeddings of size ``dim`` (row K = ``num_classes`` is the null label ∅ of classifier-free
    guidance), N(0, 1) at initialisation; None for an unconditional model."""
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(
            f"{owner}: num_classes must be None or a positive int, got {num_classes!r}"
        )
    dt = _param_dtype()
    embed = nnx.Embed(num_classes + 1, dim, embedding_init=_ZEROS, param_dtype=dt, rngs=rngs)
    z = jax.random.normal(rngs.params(), ((num_classes + 1) * dim,), dt)
    embed.embedding.set_value(z.reshape(num_classes + 1, dim))
    return embed


def _class_features(embed: nnx.Embed | None, num_classes, c, owner: str, dtype) -> Array | None:
    """The embedding of one class label c (an integer scalar in 0..K, K = ∅), or None for an unconditional model.

    Shape, dtype and (where c is concrete) range are checked here, at trace time; a traced out-of-range label gives
    NaN features (``mode="fill"``) rather than a silent wrong class: the public entry points that take labels
    (``conditional_batch_loss``, the CLI, ``check_class_labels``) check traced labels once, outside the solvers.
    """
    if embed is None:
        if c is not None:
            raise ValueError(
                f"{owner} is unconditional (num_classes=None) but was called with a condition; build it with "
                f"num_classes=K to train a class-conditional model"
            )
        return None
    if c is None:
        raise ValueError(
            f"{owner}(num_classes={num_classes}) needs a class label: call model(t, x, c) with c in "
            f"0..{num_classes - 1}, or c={num_classes} (the null label) for the unconditional model"
        )
    if jnp.shape(c) != ():
        raise ValueError(
            f"{owner}: the class label c must be one integer (models are per example; jax.vmap over labels), "
            f"got shape {jnp.shape(c)}"
        )
    if not isinstance(c, jax.core.Tracer):
        c = check_class_labels(c, num_classes, allow_null=True, name="c")
    elif not jnp.issubdtype(c.dtype, jnp.integer):
        raise ValueError(f"{owner}: the class label c must be an integer, got dtype {c.dtype}")
    table = embed.embedding.get_value()
    mesh = _explicit_mesh(c)
    if mesh is not None:
        # under Explicit axes a gather of batch-sharded labels must name its output sharding
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return table.at[c].get(mode="fill", fill_value=jnp.nan, out_sharding=spec).astype(dtype)
    return jnp.take(table, c, axis=0, mode="fill", fill_value=jnp.nan).astype(dtype)


def _explicit_mesh(x):
    """The (abstract) mesh ``x`` is typed on if it has Explicit axes (``jax.make_mesh``'s default: a jit of
    arrays on such a mesh, or inside ``jax.set_mesh``), else None (no mesh, or Auto axes: nothing changes)."""
    mesh = jax.typeof(x).sharding.mesh
    if mesh.empty or not any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types or ()):
        return None
    return mesh


# ----------------------------------------------------------------------------------------------------------
# Time embedding
# ----------------------------------------------------------------------------------------------------------


#: Default time features of the models: frequencies from 30 down to 0.03 rad per unit t. DDPM's scale (1000 rad per
#: unit t) makes a trained field oscillate in t, and adaptive PF-ODE solvers then resolve those oscillations: on the
#: checkerboard demo (flow matching, 3000 steps) the same NLL (3.799 nats) took 982 function evaluations per
#: likelihood solve with scale 1000 and 119 with scale 30.
SMOOTH_TIME_SCALE = 30.0
SMOOTH_MAX_PERIOD = 1000.0


class SinusoidalEmbedding(nnx.Module):
    """Sinusoidal (Fourier) features of a scalar time: no parameters.

    With h = dim/2 and frequencies ω_k = scale · max_period^{−k/h}, k = 0..h−1 (geometric from ``scale`` down to
    ``scale/max_period``):

        emb(t) = [sin(ω_0 t), …, sin(ω_{h−1} t), cos(ω_0 t), …, cos(ω_{h−1} t)].

    This is the Transformer position encoding (Vaswani et al. 2017) as used for the diffusion step in DDPM
    (Ho et al. 2020). DDPM feeds the integer step n ∈ {0..999}; here t ∈ [0, 1] (t = 0 noise, t = 1 data) and the
    default ``scale`` = 1000 makes the highest angular frequency 1000 rad per unit t, i.e. the same features as
    DDPM's at n = 1000·t. Any real t is accepted (EDM's c_noise = ¼ ln σ ∈ [−1.6, 1.1] for σ ∈ [0.002, 80]).

    Args:
        dim: even number of features.
        scale: the highest angular frequency ω_0.
        max_period: ratio between the highest and the lowest frequency.
    """

    def __init__(self, dim: int, scale: float = 1000.0, max_period: float = 10000.0):
        if not isinstance(dim, int) or dim < 2 or dim % 2:
            raise ValueError(f"SinusoidalEmbedding: dim must be an even integer >= 2, got {dim!r}")
        if not (scale > 0 and max_period > 1):
            raise ValueError(
                f"SinusoidalEmbedding: need scale > 0 and max_period > 1, got scale={scale}, "
                f"max_period={max_period}"
            )
        self.dim = dim
        self.scale = float(scale)
        self.max_period = float(max_period)

    def __call__(self, t: Scalar) -> Float[Array, " dim"]:
        t = _as_float_scalar(t)
        half = self.dim // 2
        k = jnp.arange(half, dtype=t.dtype)
        freqs = self.scale * jnp.exp(-math.log(self.max_period) * k / half)
        arg = freqs * t
        return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)])


# ----------------------------------------------------------------------------------------------------------
# MLP
# ----------------------------------------------------------------------------------------------------------


def _concat_stack(dim, hidden, depth, cond_dim, dt, rngs):
    """The layers of :class:`MLP` and :class:`FlowMapMLP`: ``depth`` Linear layers that each see the conditioning
    (width ``cond_dim``) concatenated to their input, and the output layer."""
    layers = nnx.List(
        [
            nnx.Linear(
                (dim if i == 0 else hidden) + cond_dim,
                hidden,
                kernel_init=_ZEROS,
                param_dtype=dt,
                rngs=rngs,
            )
            for i in range(depth)
        ]
    )
    return layers, nnx.Linear(hidden, dim, kernel_init=_ZEROS, param_dtype=dt, rngs=rngs)


def _concat_forward(layers, out, x, e):
    """h_1 = SiLU(W_1 [x; e]), h_{l+1} = SiLU(W_{l+1} [h_l; e]), out = W_out h_depth."""
    h = x
    for layer in layers:
        h = jax.nn.silu(layer(jnp.concatenate([h, e])))
    return out(h)


class MLP(nnx.Module):
    """Time-conditioned MLP for vector data: ``model(t, x)`` with scalar t and x of shape (dim,) → (dim,).

    Time enters by concatenation: with e = SinusoidalEmbedding(t) (t = 0 noise, t = 1 data),

        h_1 = SiLU(W_1 [x; e]),   h_{l+1} = SiLU(W_{l+1} [h_l; e])  (l = 1..depth−1),   out = W_out h_depth.

    Re-injecting e at every layer keeps the time signal strong in narrow nets (as in the toy models of
    Lipman et al. 2023 and Tong et al. 2023). The output layer is zero-initialised (``zero_init_output``), so an
    untrained model predicts exactly 0 (the mean of ε, and of the data for centred data).

    Args:
        dim: size of x.
        hidden: width of the hidden layers.
        depth: number of hidden layers (≥ 1).
        time_dim: size of the sinusoidal time embedding (even).
        time_scale: highest angular frequency of the time features (default 30: smooth in t, cheap to solve).
        zero_init_output: zero-initialise the last layer (default) instead of LeCun-normal.
        num_classes: None (an unconditional ``model(t, x)``) or K: a class-conditional ``model(t, x, c)`` with
            c ∈ 0..K−1, or c = K, the learned null label (classifier-free guidance). The class embedding (size
            ``time_dim``, learned) is concatenated with e at every layer.
        rngs: ``nnx.Rngs`` for the initialisation.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 64,
        *,
        time_scale: float = SMOOTH_TIME_SCALE,
        zero_init_output: bool = True,
        num_classes: int | None = None,
        rngs: nnx.Rngs,
    ):
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MLP: {name} must be a positive integer, got {v!r}")
        dt = _param_dtype()
        self.dim = dim
        self.num_classes = num_classes
        self.embed = SinusoidalEmbedding(time_dim, scale=time_scale, max_period=SMOOTH_MAX_PERIOD)
        self.class_embed = _class_embedding(num_classes, time_dim, rngs, "MLP")
        cond_dim = time_dim if num_classes is None else 2 * time_dim
        self.layers, self.out = _concat_stack(dim, hidden, depth, cond_dim, dt, rngs)
        _lecun_init(self, rngs.params(), exclude=(("out",),) if zero_init_output else ())

    def __call__(self, t: Scalar, x: Float[Array, " dim"], c=None) -> Float[Array, " dim"]:
        if x.shape != (self.dim,):
            raise ValueError(
                f"MLP: x must have shape ({self.dim},) (one example; use jax.vmap for batches), "
                f"got {x.shape}"
            )
        e = self.embed(t).astype(x.dtype)
        ce = _class_features(self.class_embed, self.num_classes, c, "MLP", x.dtype)
        if ce is not None:
            e = jnp.concatenate([e, ce])
        return _concat_forward(self.layers, self.out, x, e)


class FlowMapMLP(nnx.Module):
    """Average-velocity MLP for flow maps: ``model(s, x, t)`` with scalar s, t and x of shape (dim,) → (dim,).

    x is the state at time s and t the target time (t = 0 noise, t = 1 data); the flow map is
    x + (t − s)·model(s, x, t) (:mod:`diffjax.flow_maps`). The two times enter as in :class:`MLP`, by
    concatenation at every layer, with e = [SinusoidalEmbedding(s); SinusoidalEmbedding(t − s)] (the start and the
    step: MeanFlow's default conditioning, its (t, t − r) in the paper's reversed time; Geng et al. 2025):

        h_1 = SiLU(W_1 [x; e]),   h_{l+1} = SiLU(W_{l+1} [h_l; e]),   out = W_out h_depth  (zero-initialised).

    Args as for :class:`MLP` (``dim``, ``hidden``, ``depth``, ``time_dim`` per time, ``time_scale``,
    ``zero_init_output``, ``rngs``); no class conditioning.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        time_dim: int = 64,
        *,
        time_scale: float = SMOOTH_TIME_SCALE,
        zero_init_output: bool = True,
        rngs: nnx.Rngs,
    ):
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"FlowMapMLP: {name} must be a positive integer, got {v!r}")
        dt = _param_dtype()
        self.dim = dim
        self.embed = SinusoidalEmbedding(time_dim, scale=time_scale, max_period=SMOOTH_MAX_PERIOD)
        self.layers, self.out = _concat_stack(dim, hidden, depth, 2 * time_dim, dt, rngs)
        _lecun_init(self, rngs.params(), exclude=(("out",),) if zero_init_output else ())

    def __call__(self, s: Scalar, x: Float[Array, " dim"], t: Scalar) -> Float[Array, " dim"]:
        if x.shape != (self.dim,):
            raise ValueError(
                f"FlowMapMLP: x must have shape ({self.dim},) (one example; use jax.vmap for batches), "
                f"got {x.shape}"
            )
        s, t = _as_float_scalar(s), _as_float_scalar(t)
        e = jnp.concatenate([self.embed(s), self.embed(t - s)]).astype(x.dtype)
        return _concat_forward(self.layers, self.out, x, e)


# ----------------------------------------------------------------------------------------------------------
# U-Net
# ----------------------------------------------------------------------------------------------------------


def _groups(channels: int, max_groups: int = 8) -> int:
    """The largest number of groups ≤ max_groups that divides ``channels``."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class _ResBlock(nnx.Module):
    """Residual block with time conditioning (Ho et al. 2020):

    h = Conv(SiLU(GN(x))) + Dense(SiLU(temb));  out = skip(x) + Conv(SiLU(GN(h))).
    Kernels are created at zero and filled by the owner's ``_lecun_init``.
    """

    def __init__(self, c_in: int, c_out: int, t_dim: int, *, rngs: nnx.Rngs):
        dt = _param_dtype()
        self.norm1 = nnx.GroupNorm(c_in, num_groups=_groups(c_in), param_dtype=dt, rngs=rngs)
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), kernel_init=_ZEROS, param_dtype=dt, rngs=rngs)
        self.temb = nnx.Linear(t_dim, c_out, kernel_init=_ZEROS, param_dtype=dt, rngs=rngs)
        self.norm2 = nnx.GroupNorm(c_out, num_groups=_groups(c_out), param_dtype=dt, rngs=rngs)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), kernel_init=_ZEROS, param_dtype=dt, rngs=rngs)
        self.skip = (
            nnx.Conv(c_in, c_out, (1, 1), kernel_init=_ZEROS, param_dtype=dt, rngs=rngs)
            if c_in != c_out
            else None
        )

    def __call__(self, x, temb):
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + self.temb(jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class UNet(nnx.Module):
    """Small time-conditioned U-Net for images: ``model(t, x)`` with scalar t and x of shape (H, W, C) → (H, W, C).

    Layout (DDPM, Ho et al. 2020, without attention): time embedding e = MLP(Sinusoidal(t)) of size 4·base
    (t = 0 noise, t = 1 data); a 3×3 input conv; for each level i a residual block with base·mults[i] channels
    (GroupNorm, SiLU, e added after the first conv), then a stride-2 conv down-sampling (except at the last level);
    two residual blocks in the middle; a mirrored up path that concatenates the skip connections and up-samples by
    nearest-neighbour resize + conv; GroupNorm, SiLU and a zero-initialised 3×3 output conv (an untrained model
    predicts 0).

    H and W must be divisible by 2^(len(mults) − 1): ``mults=(1, 2)`` serves 8×8 digits, ``(1, 2, 2)`` 32×32.
    The per-example call adds and removes a batch axis of 1 internally, so the model composes with ``jax.vmap``.

    Args:
        channels: number of image channels C.
        base: channels at the first level.
        mults: channel multipliers per resolution level.
        time_scale: highest angular frequency of the time features (see ``SMOOTH_TIME_SCALE``).
        num_classes: None (an unconditional ``model(t, x)``) or K: a class-conditional ``model(t, x, c)`` with
            c ∈ 0..K−1, or c = K, the learned null label (classifier-free guidance). A learned class embedding
            of size 4·base is added to the time embedding (as in ADM, Dhariwal & Nichol 2021).
        rngs: ``nnx.Rngs`` for the initialisation.
    """

    def __init__(
        self,
        channels: int,
        base: int = 32,
        mults: Sequence[int] = (1, 2),
        *,
        time_scale: float = SMOOTH_TIME_SCALE,
        num_classes: int | None = None,
        rngs: nnx.Rngs,
    ):
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"UNet: channels must be a positive integer, got {channels!r}")
        if not isinstance(base, int) or base < 1:
            raise ValueError(f"UNet: base must be a positive integer, got {base!r}")
        mults = tuple(int(m) for m in mults)
        if not mults or any(m < 1 for m in mults):
            raise ValueError(
                f"UNet: mults must be a non-empty sequence of positive ints, got {mults}"
            )
        dt = _param_dtype()
        self.channels = channels
        self.mults = mults
        t_dim = 4 * base
        self.embed = SinusoidalEmbedding(base, scale=time_scale, max_period=SMOOTH_MAX_PERIOD)
        self.t_lin1 = nnx.Linear(base, t_dim, kernel_init=_ZEROS, param_dtype=dt, rngs=rngs)
        self.t_lin2 = nnx.Linear(t_dim, t_dim, kernel_init=_ZEROS, param_dtype=dt, rngs=rngs)
        self.num_classes = num_classes
        self.class_embed = _class_embedding(num_classes, t_dim, rngs, "UNet")
        self.conv_in = nnx.Conv(
            channels, base, (3, 3), kernel_init=_ZEROS, param_dtype=dt, rngs=rngs
        )

        chs = [base * m for m in mults]
        down, downsample = [], []
        c = base
        for i, ch in enumerate(chs):
            down.append(_ResBlock(c, ch, t_dim, rngs=rngs))
            c = ch
            last = i == len(chs) - 1
            downsample.append(
                None
                if last
                else nnx.Conv(
                    c, c, (3, 3), strides=(2, 2), kernel_init=_ZEROS, param_dtype=dt, rngs=rngs
                )
            )
        self.down = nnx.List(down)
        self.downsample = nnx.List(downsample)
        self.mid1 = _ResBlock(c, c, t_dim, rngs=rngs)
        self.mid2 = _ResBlock(c, c, t_dim, rngs=rngs)
        up, upsample = [], []
        for i in reversed(range(len(chs))):
            ch = chs[i]
            up.append(_ResBlock(c + ch, ch, t_dim, rngs=rngs))
            c = ch
            upsample.append(
                None
                if i == 0
                else nnx.Conv(c, chs[i - 1], (3, 3), kernel_init=_ZEROS, param_dtype=dt, rngs=rngs)
            )
            if i > 0:
                c = chs[i - 1]
        self.up = nnx.List(up)
        self.upsample = nnx.List(upsample)
        self.norm_out = nnx.GroupNorm(c, num_groups=_groups(c), param_dtype=dt, rngs=rngs)
        self.conv_out = nnx.Conv(
            c,
            channels,
            (3, 3),
            kernel_init=nnx.initializers.zeros,
            param_dtype=dt,
            rngs=rngs,
        )
        _lecun_init(self, rngs.params(), exclude=(("conv_out",),))

    def __call__(self, t: Scalar, x: Float[Array, "H W C"], c=None) -> Float[Array, "H W C"]:
        if x.ndim != 3 or x.shape[-1] != self.channels:
            raise ValueError(
                f"UNet: x must have shape (H, W, {self.channels}) (one example; use jax.vmap for "
                f"batches), got {x.shape}"
            )
        factor = 2 ** (len(self.mults) - 1)
        if x.shape[0] % factor or x.shape[1] % factor:
            raise ValueError(
                f"UNet: H and W must be divisible by 2^(len(mults)-1) = {factor} for mults="
                f"{self.mults}, got x.shape={x.shape}"
            )
        temb = self.embed(t).astype(x.dtype)
        temb = self.t_lin2(jax.nn.silu(self.t_lin1(temb)))
        ce = _class_features(self.class_embed, self.num_classes, c, "UNet", x.dtype)
        temb = (temb if ce is None else temb + ce)[None]
        h = self.conv_in(x[None])
        skips = []
        for block, ds in zip(self.down, self.downsample, strict=True):
            h = block(h, temb)
            skips.append(h)
            if ds is not None:
                h = ds(h)
        h = self.mid2(self.mid1(h, temb), temb)
        for block, us in zip(self.up, self.upsample, strict=True):
            h = block(jnp.concatenate([h, skips.pop()], axis=-1), temb)
            if us is not None:
                b, hh, ww, cc = h.shape
                h = jax.image.resize(h, (b, 2 * hh, 2 * ww, cc), method="nearest")
                h = us(h)
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h[0]


# ----------------------------------------------------------------------------------------------------------
# Functional adapter
# ----------------------------------------------------------------------------------------------------------


class Apply(eqx.Module):
    """The pure function ``apply(params, t, x) = merge(graphdef, params, rest)(t, x)`` of an ``nnx`` model.

    ``graphdef`` (the model's static structure) is a static field; ``rest`` (non-``nnx.Param`` state such as RNG
    counters, if any) is a PyTree leaf, so an ``Apply`` can itself be passed through ``jit``. Calling it does not
    mutate anything: the model is rebuilt from ``params`` on every call (at trace time under ``jit``).
    """

    graphdef: nnx.GraphDef = eqx.field(static=True)
    rest: nnx.State

    def __call__(self, params: nnx.State, t: Scalar, x: Array, *cond) -> Array:
        """The model's per-example output at time t (t = 0 noise, t = 1 data), one example x and, for a
        conditional model, its condition (``apply(params, t, x, c)``)."""
        return nnx.merge(self.graphdef, params, self.rest)(t, x, *cond)


def split(model: nnx.Module) -> tuple[Apply, nnx.State]:
    """Split an ``nnx`` model into a pure function and its parameters: ``apply, params = split(model)``.

    ``params`` is the ``nnx.State`` holding the model's ``nnx.Param`` variables (a PyTree whose leaves are arrays;
    optax, ``jax.grad`` and orbax treat it as any PyTree). ``apply(params, t, x)`` is pure and works under
    ``jit``, ``vmap`` and ``grad``; batch with ``jax.vmap(lambda t, x: apply(params, t, x))``. The model itself is
    not modified. Other state (anything that is not an ``nnx.Param``) is frozen into ``apply``.
    """
    if not isinstance(model, nnx.Module):
        raise ValueError(f"split: expected a flax.nnx.Module, got {type(model).__name__}")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return Apply(graphdef, rest), params


def merge(apply: Apply, params: nnx.State) -> nnx.Module:
    """The inverse of :func:`split`: a fresh ``nnx`` model holding ``params`` (e.g. trained or EMA parameters)."""
    if not isinstance(apply, Apply):
        raise ValueError(
            f"merge: expected the Apply returned by diffjax.nn.split, got {type(apply)}"
        )
    return nnx.merge(apply.graphdef, params, apply.rest)


# ----------------------------------------------------------------------------------------------------------
# EDM preconditioning
# ----------------------------------------------------------------------------------------------------------


def edm_coefficients(
    path: AbstractPath, t: Scalar, sigma_data: Scalar = 0.5
) -> tuple[Float[Array, ""], Float[Array, ""], Float[Array, ""], Float[Array, ""]]:
    """EDM's (c_skip, c_out, c_in, c_noise) at time t, in terms of the input x_t (t = 0 noise, t = 1 data).

    For a path with α = 1 (``EDMPath``, ``VEPath``), with σ = σ_t and σ_d = ``sigma_data`` (Karras et al. 2022,
    Table 1 and ``EDMPrecond`` in NVlabs/edm):

        c_skip = σ_d²/(σ² + σ_d²),  c_out = σσ_d/√(σ² + σ_d²),  c_in = 1/√(σ² + σ_d²),  c_noise = ¼ ln σ.

    For a general path x_t = α x + σ ε the same formulas are applied to the rescaled input x_t/α, which has noise
    level σ̃ = σ/α = e^{−λ/2} (EDM §2, scaled ODE). Folding the 1/α into the coefficients keeps them finite at α = 0:

        c_skip = σ_d² α/(σ² + α²σ_d²),  c_out = σσ_d/√(σ² + α²σ_d²),  c_in = 1/√(σ² + α²σ_d²),  c_noise = −λ/8,

    so that D = c_skip·x_t + c_out·F(c_noise, c_in·x_t). With α = 1 these are exactly the EDM expressions.
    c_noise is clipped to [−10, 10] (σ̃ ∈ [e^{−40}, e^{40}]) so that it stays finite where λ = ±∞ (σ = 0 or α = 0);
    the clip is inactive for every σ used in practice.
    """
    alpha, sigma = path.alpha(t), path.sigma(t)
    sd = jnp.asarray(sigma_data, dtype=jnp.result_type(alpha, float))
    denom = jnp.square(sigma) + jnp.square(alpha * sd)
    c_skip = jnp.square(sd) * alpha / denom
    c_out = sigma * sd * jax.lax.rsqrt(denom)
    c_in = jax.lax.rsqrt(denom)
    c_noise = jnp.clip(-0.125 * path.log_snr(t), -10.0, 10.0)
    return c_skip, c_out, c_in, c_noise


def edm_precondition(
    raw_fn: Callable[[Array, Array], Array], path: AbstractPath, sigma_data: Scalar = 0.5
) -> Callable[[Scalar, Array], Array]:
    """Wrap a raw network F(c_noise, x_in) into EDM's preconditioned data prediction D(t, x) (kind ``"data"``).

    D(t, x_t) = c_skip·x_t + c_out·F(c_noise, c_in·x_t) with the coefficients of :func:`edm_coefficients`
    (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", §5 and Table 1):
    for α = 1, c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ¼ ln σ with
    σ = ``path.sigma(t)``. Time t = 0 is noise, t = 1 is data. The input of F has unit variance and its target
    (x − c_skip·x_t)/c_out has unit variance for data of standard deviation σ_d. As σ → 0, D → x_t; as σ → ∞,
    D → σ_d·F (a bounded output).

    ``raw_fn`` is per example; e.g. ``lambda c, x: apply(params, c, x)`` for a model from :func:`split`.
    The result is a per-example ``fn(t, x)``; batch it with ``jax.vmap``.
    """
    if not isinstance(path, AbstractPath):
        raise ValueError(
            f"edm_precondition: path must be a diffjax path, got {type(path).__name__}"
        )

    def fn(t: Scalar, x: Array) -> Array:
        c_skip, c_out, c_in, c_noise = edm_coefficients(path, t, sigma_data)
        c_skip, c_out, c_in = (c.astype(x.dtype) for c in (c_skip, c_out, c_in))
        return c_skip * x + c_out * raw_fn(c_noise, c_in * x)

    return fn
