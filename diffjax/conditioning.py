"""Conditions as PyTrees: binding a condition to a model, and dropping it during training.

Time convention: **t = 0 is noise, t = 1 is data**.

A *conditional model* is a per-example callable ``model(t, x, c)``: scalar t, one example x and one example's
condition c (a class label, or any PyTree), returning a prediction of some kind (:mod:`diffjax.kinds`). Every
solver, loss and likelihood in diffjax takes a model ``model(t, x)``; :class:`Conditioned` binds one condition to a
conditional model and is such a model, so conditioning needs no new sampler or likelihood:

    u = dj.velocity_field(Conditioned(model, c), kind, path)       # u_t(x | c)
    log p(x | c) = dj.log_likelihood(u, path, x)                    # conditional likelihood, one example
    jax.vmap(lambda x, c: dj.log_likelihood(dj.velocity_field(Conditioned(model, c), kind, path), path, x))

The condition is a leaf of :class:`Conditioned`, so ``jax.vmap`` over conditions and ``jit`` with new conditions
reuse one program.

*Condition dropout* (Ho & Salimans 2022, "Classifier-Free Diffusion Guidance") trains one network to be conditional
and unconditional at once: each training example's condition is replaced by a *null condition* ∅ with probability
p. For class labels (:class:`ClassDropout`) ∅ is the extra label ``num_classes``, whose embedding the network learns
(``diffjax.nn.MLP(num_classes=K)`` and ``UNet(num_classes=K)`` have K + 1 class embeddings); for any other PyTree
condition (:class:`ConditionDropout`) ∅ is a PyTree of the same structure given by the user. The model evaluated at
∅ is the unconditional model p(x) = Σ_c p(c) p(x | c) that classifier-free guidance needs.
"""

from __future__ import annotations

import abc
import numbers

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

__all__ = [
    "Conditioned",
    "AbstractConditionDropout",
    "ClassDropout",
    "ConditionDropout",
    "check_class_labels",
]


class Conditioned(eqx.Module):
    """``Conditioned(model, cond)(t, x) = model(t, x, cond)``: a conditional model with one condition bound.

    ``cond`` is one example's condition (e.g. a scalar int class label) and a PyTree leaf, so compiled solvers take
    it as an argument and ``jax.vmap`` maps over it. t = 0 is noise, t = 1 is data.
    """

    model: object
    cond: PyTree

    def __call__(
        self, t: Float[ArrayLike, ""], x: Float[Array, "*shape"]
    ) -> Float[Array, "*shape"]:
        return self.model(t, x, self.cond)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def check_class_labels(
    labels: Int[ArrayLike, "*batch"],
    num_classes: int,
    *,
    allow_null: bool = False,
    name: str = "cond",
) -> Int[Array, "*batch"]:
    """``labels`` as an int32 array, checked to be integers in [0, num_classes) (or ``num_classes``, the null
    label, when ``allow_null``): a Python ``ValueError`` for concrete labels, one ``equinox.error_if`` for traced
    ones. The error names the argument, the offending value and the valid range."""
    top = num_classes + 1 if allow_null else num_classes
    if isinstance(labels, numbers.Integral) and not isinstance(labels, bool):
        labels = np.int32(labels)
    arr = labels if isinstance(labels, jax.Array) else np.asarray(labels)
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise ValueError(
            f"{name} must hold integer class labels, got dtype {arr.dtype}; pass labels in 0..{num_classes - 1}"
            + (f" (or {num_classes}, the null label)" if allow_null else "")
        )
    valid = f"0..{top - 1}" + (f" ({num_classes} is the null label)" if allow_null else "")
    if _is_concrete(arr):
        bad = np.asarray((arr < 0) | (arr >= top))
        if bad.any():
            raise ValueError(
                f"{name}={np.asarray(arr)[bad].ravel()[0]} is not a class label of a model with "
                f"num_classes={num_classes}; labels must lie in {valid}"
            )
        return jnp.asarray(arr, jnp.int32)
    arr = eqx.error_if(
        arr,
        (arr < 0) | (arr >= top),
        f"{name} holds a label outside {valid} (num_classes={num_classes})",
    )
    return arr.astype(jnp.int32)


class AbstractConditionDropout(eqx.Module):
    """Replaces one example's condition by the null condition ∅ with probability ``probability`` (training only).

    ``drop(key)`` is the Bernoulli(p) draw; ``__call__(key, cond)`` returns ∅ where it is True, else ``cond``.
    ``check(conds)`` validates a batch of conditions once, at the loss's entry point.
    """

    probability: Float[ArrayLike, ""]

    def __check_init__(self):
        p = self.probability
        if _is_concrete(p) and not (np.ndim(p) == 0 and 0.0 <= float(p) <= 1.0):
            raise ValueError(
                f"condition dropout probability={p!r} must be a number in [0, 1] (the fraction of training "
                "examples whose condition is replaced by the null condition; 0.1 to 0.2 is usual)"
            )

    @property
    @abc.abstractmethod
    def null(self) -> PyTree:
        """The null condition ∅ (one example's)."""

    def check(self, conds: PyTree) -> PyTree:
        """A batch of conditions, validated (the default accepts any PyTree)."""
        return conds

    def drop(self, key: PRNGKeyArray) -> Bool[Array, ""]:
        return jax.random.bernoulli(key, jnp.asarray(self.probability, jnp.result_type(float)))

    def __call__(self, key: PRNGKeyArray, cond: PyTree) -> PyTree:
        drop = self.drop(key)
        return jax.tree.map(
            lambda n, c: jnp.where(drop, jnp.asarray(n, jnp.result_type(c)), c), self.null, cond
        )


class ClassDropout(AbstractConditionDropout):
    """Condition dropout for class labels 0..K−1 with the learned null label ∅ = K = ``num_classes``."""

    num_classes: int = eqx.field(static=True)

    def __init__(self, num_classes: int, probability: Float[ArrayLike, ""] = 0.1):
        if (
            isinstance(num_classes, bool)
            or not isinstance(num_classes, numbers.Integral)
            or num_classes < 1
        ):
            raise ValueError(
                f"ClassDropout: num_classes must be a positive int, got {num_classes!r}"
            )
        self.num_classes = int(num_classes)
        self.probability = probability

    @property
    def null(self):
        return jnp.asarray(self.num_classes, jnp.int32)

    def check(self, conds):
        return check_class_labels(conds, self.num_classes, allow_null=True, name="batch labels")


class ConditionDropout(AbstractConditionDropout):
    """Condition dropout for any PyTree condition, with a given null condition (same structure as one
    example's condition, e.g. zeros for an embedding the network never sees otherwise)."""

    null_cond: PyTree

    def __init__(self, null: PyTree, probability: Float[ArrayLike, ""] = 0.1):
        self.null_cond = null
        self.probability = probability

    @property
    def null(self):
        return self.null_cond
