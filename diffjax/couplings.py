"""Couplings: which noise sample is paired with which data point inside a training batch.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x₁ + σ_t·x₀ with x₀ the noise (ε) and x₁ the data.

Conditional flow matching trains u_θ(t, x_t) on pairs (x₀, x₁) drawn from a coupling π(x₀, x₁) whose marginals
are the noise and the data. The learned marginal velocity transports the noise to the data for *every* coupling;
the coupling decides how straight the paths are, and so how few solver steps sampling needs:

* :class:`Independent` — π = p₀ ⊗ p₁ (every data point with its own independent noise; the default, and what
  :func:`diffjax.losses.batch_loss` does without a coupling).
* :class:`MinibatchOT` — within a batch of B pairs, the optimal-transport plan of the empirical measures under the
  cost ‖x₁ − x₀‖² (Tong et al. 2023, "Improving and generalizing flow-based generative models with minibatch
  optimal transport", arXiv:2302.00482; Pooladian et al. 2023, "Multisample flow matching", arXiv:2304.14772).
  Exact (:class:`Hungarian`: a permutation, every noise used once, no duplicate pairs) or entropic
  (:class:`Sinkhorn`).
* :class:`SchrodingerBridge` — the entropic plan with ε = 2σ² paired with the Brownian-bridge path
  x_t = t·x₁ + (1 − t)·x₀ + σ·√(t(1 − t))·z, z ~ N(0, I) (SB-CFM of Tong et al. 2023; SF2M, Tong et al. 2024,
  "Simulation-free Schrödinger bridges via score and flow matching", arXiv:2307.03672). Its conditional velocity
  and score are :meth:`SchrodingerBridge.conditional_velocity` and :meth:`SchrodingerBridge.conditional_score`.

A coupling is one component of an objective: pass ``coupling=`` to :func:`diffjax.losses.batch_loss` (or
:func:`~diffjax.losses.conditional_batch_loss`). It draws the batch's times and noises exactly as without a
coupling, then re-pairs the noises with the data points (each data point is kept once, with its time; only which
noise it gets changes), so it composes with every prediction kind, weighting and time sampler of
:mod:`diffjax.losses`. Everything here is an ``equinox.Module``; numbers are leaves.

Global batch under data parallelism: inside a ``jax.jit``-ed training step whose batch is sharded over a mesh
(``diffjax.train.make_train_step(mesh=...)``, ``fit``), the loss sees the *global* batch as one array (GSPMD), so
the plan is computed over the whole global batch, not per device (torchcfm #19); the tests check that the
pairing on 4 devices equals the pairing on one. (Under ``shard_map``/``pmap`` the function would see only its
shard: do not call a coupling there.)

The OT solvers come from ott-jax, imported on first use (``import diffjax`` stays light): the entropic plan is
``ott.solvers.linear.sinkhorn.Sinkhorn`` with ``min_iterations == max_iterations`` (a fixed-length
``lax.scan``, no data-dependent loop), the exact assignment ``ott.tools.unreg.hungarian`` (optax's Hungarian
algorithm, O(B³): meant for batches up to a few hundred).
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from .paths import check_time

__all__ = [
    "AbstractCoupling",
    "Independent",
    "MinibatchOT",
    "SchrodingerBridge",
    "AbstractOTSolver",
    "Hungarian",
    "Sinkhorn",
    "as_coupling",
    "cost_matrix",
    "COUPLINGS",
]

Scalar = Float[ArrayLike, ""]


def _float(v) -> Array:
    return jnp.asarray(v, dtype=jnp.result_type(float))


def _is_concrete(*vals) -> bool:
    return not any(isinstance(v, jax.core.Tracer) for v in vals)


def cost_matrix(
    x0: Float[Array, " batch *shape"], x1: Float[Array, " batch *shape"]
) -> Float[Array, "batch batch"]:
    """C[i, j] = ‖x1[i] − x0[j]‖² over the flattened example dimensions: row i a data point, column j a noise.

    Written as ‖x1‖² + ‖x0‖² − 2·x1·x0ᵀ (one matrix product), clipped at 0. No gradient flows through it
    (a coupling chooses indices; the pairs themselves carry the gradients of the loss).
    """
    a = jax.lax.stop_gradient(jnp.reshape(x1, (jnp.shape(x1)[0], -1)))
    b = jax.lax.stop_gradient(jnp.reshape(x0, (jnp.shape(x0)[0], -1)))
    sq = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * (a @ b.T)
    return jnp.maximum(sq, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# OT solvers (ott-jax)
# ---------------------------------------------------------------------------------------------------------------


class AbstractOTSolver(eqx.Module):
    """Solves the balanced OT problem between two uniform empirical measures of equal size B for a cost matrix,
    and turns its plan into a pairing: for each row (data point) i, one column (noise) index j_i."""

    @abc.abstractmethod
    def _pair(self, key: PRNGKeyArray, cost: Float[Array, "n n"]) -> Int[Array, " n"]: ...


class Hungarian(AbstractOTSolver):
    """Exact optimal assignment: the permutation j minimising Σ_i C[i, j_i] (the exact OT plan between two
    uniform empirical measures of equal size is a permutation, Birkhoff–von Neumann).

    ``ott.tools.unreg.hungarian`` (optax's JAX Hungarian algorithm): jittable, O(B³) work in a loop; the pairing
    is deterministic (the key is unused) and uses every noise exactly once (no duplicate pairs, torchcfm #142).
    """

    def _pair(self, key, cost):
        from ott.geometry import geometry  # noqa: PLC0415 (ott loads on first use)
        from ott.tools import unreg  # noqa: PLC0415

        n = cost.shape[0]
        _, out = unreg.hungarian(geometry.Geometry(cost_matrix=cost))
        rows, cols = out.paired_indices
        return jnp.zeros((n,), jnp.int32).at[rows].set(cols.astype(jnp.int32))


class Sinkhorn(AbstractOTSolver):
    """Entropic OT plan π = argmin ⟨π, C⟩ − ε·H(π) with uniform marginals 1/B, by ott-jax's Sinkhorn
    (log-domain) run for exactly ``num_iterations`` iterations (``min_iterations == max_iterations``: a
    ``lax.scan`` of fixed length, so it jits with no data-dependent loop and the same program every call).

    Pairing: each data point i keeps its row and draws its noise j_i ~ π(· | i) = π[i, :]/Σ_j π[i, j] (the
    pairs' joint law is π; data points are never duplicated, noises may be).

    Args:
        epsilon: the entropic regularisation ε > 0 (a leaf).
        num_iterations: Sinkhorn iterations (static).
        relative: if True (default), ε is relative to the mean of the cost matrix (ε·mean C, scale-free); if
            False it is absolute (in the units of C = ‖x₁ − x₀‖²).
    """

    epsilon: Float[Array, ""]
    num_iterations: int = eqx.field(static=True)
    relative: bool = eqx.field(static=True)

    def __init__(self, epsilon: Scalar = 0.01, num_iterations: int = 200, *, relative: bool = True):
        if _is_concrete(epsilon) and not float(epsilon) > 0:
            raise ValueError(
                f"Sinkhorn: epsilon must be > 0, got epsilon={epsilon}; for the exact plan use Hungarian()"
            )
        if not (isinstance(num_iterations, int) and num_iterations >= 1):
            raise ValueError(
                f"Sinkhorn: num_iterations must be an int >= 1, got num_iterations={num_iterations!r}"
            )
        self.epsilon = _float(epsilon)
        self.num_iterations = num_iterations
        self.relative = bool(relative)

    def plan(self, cost: Float[Array, "n m"]) -> Float[Array, "n m"]:
        """The entropic plan for ``cost`` (rows and columns uniform marginals; entries sum to 1)."""
        from ott.geometry import geometry  # noqa: PLC0415 (ott loads on first use)
        from ott.problems.linear import linear_problem  # noqa: PLC0415
        from ott.solvers.linear import sinkhorn  # noqa: PLC0415

        cost = jax.lax.stop_gradient(cost)
        eps = jax.lax.stop_gradient(self.epsilon)
        if self.relative:
            eps = eps * jnp.mean(cost)
        geom = geometry.Geometry(cost_matrix=cost, epsilon=eps)
        solver = sinkhorn.Sinkhorn(
            min_iterations=self.num_iterations,
            max_iterations=self.num_iterations,
            inner_iterations=1,
            implicit_diff=None,
        )
        return solver(linear_problem.LinearProblem(geom)).matrix

    def _pair(self, key, cost):
        logits = jnp.log(jnp.maximum(self.plan(cost), jnp.finfo(cost.dtype).tiny))
        keys = jax.random.split(key, cost.shape[0])
        return jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, logits).astype(
            jnp.int32
        )


# ---------------------------------------------------------------------------------------------------------------
# Couplings
# ---------------------------------------------------------------------------------------------------------------


class AbstractCoupling(eqx.Module):
    """A coupling of noise x₀ and data x₁ inside a batch (t = 0 noise, t = 1 data).

    ``pair(key, x0, x1)`` returns, for each data point x1[i], the index j_i of its noise x0[j_i]. Subclasses
    implement the pure ``_pair``. ``_loss_at(objective, fn, x, t, eps, key)`` is the per-example loss of one pair
    (default: the objective's own Gaussian-path loss at x_t = α_t·x + σ_t·ε; :class:`SchrodingerBridge` adds its
    bridge noise), ``check(objective)`` validates the combination once, at the entry point.
    """

    @abc.abstractmethod
    def _pair(
        self, key: PRNGKeyArray, x0: Float[Array, " n *shape"], x1: Float[Array, " n *shape"]
    ) -> Int[Array, " n"]: ...

    def pair(
        self, key: PRNGKeyArray, x0: Float[Array, " n *shape"], x1: Float[Array, " n *shape"]
    ) -> Int[Array, " n"]:
        """Indices j (shape (n,)) pairing data x1[i] with noise x0[j[i]] (t = 0 noise x0, t = 1 data x1).

        Validates the shapes (equal, with a batch of at least 2) and is otherwise pure: jit/vmap-able.
        """
        _check_batch("pair", x0, x1)
        return self._pair(key, x0, x1)

    def check(self, objective) -> None:
        """Raise ``ValueError`` if this coupling cannot be used with ``objective`` (nothing to check here)."""

    def _loss_at(self, objective, fn, x, t, eps, key):
        from .losses import _loss_at  # noqa: PLC0415 (losses imports this module lazily)

        del key
        return _loss_at(objective, fn, x, t, eps)


def _check_batch(caller: str, x0, x1) -> None:
    s0, s1 = jnp.shape(x0), jnp.shape(x1)
    if s0 != s1:
        raise ValueError(
            f"{caller}: the noise x0 has shape {s0} but the data x1 has shape {s1}; a coupling pairs two batches "
            "of the same shape (batch, *example_shape)"
        )
    if len(s1) < 1 or s1[0] < 2:
        raise ValueError(
            f"{caller}: a coupling pairs examples within a batch, got a batch of shape {s1} (size "
            f"{s1[0] if s1 else 'none'}); use a batch of at least 2 examples, or coupling='independent'"
        )


def _check_interior(caller: str, t):
    """check_time, and for a concrete t also 0 < t < 1: the bridge collapses to a point at both ends
    (γ_0 = γ_1 = 0), where its conditional velocity and score are singular."""
    if _is_concrete(t) and jnp.ndim(t) == 0 and not 0.0 < float(t) < 1.0:
        raise ValueError(
            f"SchrodingerBridge.{caller}: t={float(t)} must lie strictly inside (0, 1) (t = 0 noise, t = 1 "
            "data): the bridge has zero width at the ends, where this is singular; use e.g. t in [1e-5, 1 - 1e-5]"
        )
    return check_time(t)


class Independent(AbstractCoupling):
    """π = p₀ ⊗ p₁: every data point keeps its own independent noise (pair(i) = i). The default coupling."""

    def _pair(self, key, x0, x1):
        return jnp.arange(jnp.shape(x1)[0], dtype=jnp.int32)


class MinibatchOT(AbstractCoupling):
    """Minibatch optimal-transport coupling (OT-CFM; Tong et al. 2023, Pooladian et al. 2023).

    Within each batch, noises x₀ and data x₁ are paired by the OT plan between the two empirical measures for the
    cost ‖x₁ − x₀‖² (flattened). As the batch grows the pairing tends to the OT coupling of p₀ and p₁, whose
    displacement interpolation has straight, non-crossing paths: the learned velocity then needs fewer solver
    steps (t = 0 noise, t = 1 data).

    Args:
        solver: :class:`Hungarian` (default: the exact assignment, a permutation) or :class:`Sinkhorn` (the
            entropic plan with a fixed iteration budget; cheaper for large batches).
    """

    solver: AbstractOTSolver

    def __init__(self, solver: AbstractOTSolver | None = None):
        solver = Hungarian() if solver is None else solver
        if not isinstance(solver, AbstractOTSolver):
            raise ValueError(
                f"MinibatchOT: solver must be Hungarian() or Sinkhorn(epsilon, num_iterations), got "
                f"{type(solver).__name__}"
            )
        self.solver = solver

    def _pair(self, key, x0, x1):
        return self.solver._pair(key, cost_matrix(x0, x1))


class SchrodingerBridge(AbstractCoupling):
    """The Schrödinger-bridge coupling of SB-CFM / SF2M (Tong et al. 2023, 2024) with diffusion level σ.

    Pairs: the entropic OT plan for the cost ‖x₁ − x₀‖² with ε = 2σ² (absolute), which is the static
    Schrödinger bridge of the Brownian motion σ·W between p₀ and p₁; each data point draws its noise from its row
    of the plan (:class:`Sinkhorn`, ``num_iterations`` iterations). Path: given a pair, the Brownian bridge
    (t = 0 noise x₀, t = 1 data x₁)

        x_t = μ_t + γ_t·z,   μ_t = t·x₁ + (1 − t)·x₀,   γ_t = σ·√(t(1 − t)),   z ~ N(0, I),

    with conditional velocity and score (the path p_t(x | x₀, x₁) = N(μ_t, γ_t² I))

        u_t(x | x₀, x₁) = x₁ − x₀ + (γ̇_t/γ_t)·(x − μ_t) = x₁ − x₀ + ((1 − 2t)/(2t(1 − t)))·(x − μ_t),
        ∇log p_t(x | x₀, x₁) = −(x − μ_t)/γ_t².

    Their marginal regressions are the probability-flow velocity and the score of the bridge's marginals, which
    start at p₀ (γ₀ = 0) and end at p₁ (γ₁ = 0); σ → 0 is :class:`MinibatchOT` with an entropic plan.

    In a loss (:func:`diffjax.losses.batch_loss`) the objective must use ``LinearPath`` (μ_t is its α_t x₁ +
    σ_t x₀) and predict, with the error taken in the same space, the ``"velocity"`` (target u_t) or the
    ``"score"`` (target −z/γ_t); any time sampler and loss weight c(t) apply. Keep the objective's ``margin`` > 0:
    γ̇_t is infinite at both ends.

    Args:
        sigma: the bridge's diffusion level σ > 0 (a leaf; torchcfm's default 1.0).
        num_iterations: Sinkhorn iterations of the plan (static).
    """

    sigma: Float[Array, ""]
    num_iterations: int = eqx.field(static=True)

    def __init__(self, sigma: Scalar = 1.0, num_iterations: int = 100):
        if _is_concrete(sigma) and not float(sigma) > 0:
            raise ValueError(
                f"SchrodingerBridge: sigma must be > 0, got sigma={sigma}; sigma -> 0 is "
                "MinibatchOT(Sinkhorn(...)) or MinibatchOT() (exact)"
            )
        if not (isinstance(num_iterations, int) and num_iterations >= 1):
            raise ValueError(
                f"SchrodingerBridge: num_iterations must be an int >= 1, got {num_iterations!r}"
            )
        self.sigma = _float(sigma)
        self.num_iterations = num_iterations

    @property
    def epsilon(self) -> Float[Array, ""]:
        """ε = 2σ², the entropic regularisation of the plan (absolute, on the cost ‖x₁ − x₀‖²)."""
        return 2.0 * jnp.square(self.sigma)

    def _sinkhorn(self) -> Sinkhorn:
        return Sinkhorn(self.epsilon, self.num_iterations, relative=False)

    def plan(
        self, x0: Float[Array, " n *shape"], x1: Float[Array, " n *shape"]
    ) -> Float[Array, "n n"]:
        """The entropic plan π[i, j] between data x1[i] and noise x0[j] (marginals 1/n; sums to 1)."""
        _check_batch("SchrodingerBridge.plan", x0, x1)
        return self._sinkhorn().plan(cost_matrix(x0, x1))

    def _pair(self, key, x0, x1):
        return self._sinkhorn()._pair(key, cost_matrix(x0, x1))

    # --- the Brownian bridge (t = 0 noise x0, t = 1 data x1) ---

    def std(self, t: Scalar) -> Float[Array, ""]:
        """γ_t = σ·√(t(1 − t)) (t = 0 noise, t = 1 data)."""
        return self._std(check_time(t))

    def _std(self, t):
        return self.sigma * jnp.sqrt(t * (1.0 - t))

    def _d_std(self, t):
        return self.sigma * (1.0 - 2.0 * t) / (2.0 * jnp.sqrt(t * (1.0 - t)))

    def mean(self, t: Scalar, x0: Float[Array, "*shape"], x1: Float[Array, "*shape"]):
        """μ_t = t·x₁ + (1 − t)·x₀ (t = 0 noise, t = 1 data)."""
        t = check_time(t)
        return t * x1 + (1.0 - t) * x0

    def sample(self, key: PRNGKeyArray, t: Scalar, x0, x1) -> Float[Array, "*shape"]:
        """x_t = μ_t + γ_t·z, z ~ N(0, I), for ONE pair (t = 0 noise x0, t = 1 data x1)."""
        t = check_time(t)
        z = jax.random.normal(key, jnp.shape(x1), dtype=jnp.result_type(x1, float))
        return t * x1 + (1.0 - t) * x0 + self._std(t) * z

    def conditional_velocity(self, t: Scalar, x, x0, x1) -> Float[Array, "*shape"]:
        """u_t(x | x₀, x₁) = x₁ − x₀ + ((1 − 2t)/(2t(1 − t)))·(x − μ_t), for t in (0, 1) (t = 0 noise)."""
        t = _check_interior("conditional_velocity", t)
        return x1 - x0 + (1.0 - 2.0 * t) / (2.0 * t * (1.0 - t)) * (x - (t * x1 + (1.0 - t) * x0))

    def conditional_score(self, t: Scalar, x, x0, x1) -> Float[Array, "*shape"]:
        """∇ₓ log N(x; μ_t, γ_t² I) = −(x − μ_t)/γ_t², for t in (0, 1) (t = 0 noise, t = 1 data)."""
        t = _check_interior("conditional_score", t)
        return -(x - (t * x1 + (1.0 - t) * x0)) / jnp.square(self._std(t))

    def check(self, objective) -> None:
        from .kinds import Score, Velocity  # noqa: PLC0415
        from .paths import LinearPath  # noqa: PLC0415

        if not isinstance(objective.path, LinearPath):
            raise ValueError(
                "SchrodingerBridge: the Brownian bridge mu_t = t*x1 + (1 - t)*x0 is the LinearPath's mean; got "
                f"an objective on {type(objective.path).__name__}; use e.g. diffjax.flow_matching(LinearPath())"
            )
        pred, space = objective.prediction, objective.space
        if not (type(pred) is type(space) and isinstance(space, (Velocity, Score))):
            raise ValueError(
                "SchrodingerBridge: the objective must predict 'velocity' or 'score' with the error in the same "
                f"space (the bridge's targets), got prediction={pred.name!r}, space={space.name!r}; the other "
                "kinds' conversions assume x_t = alpha*x + sigma*eps without bridge noise"
            )

    def _loss_at(self, objective, fn, x, t, eps, key):
        from .kinds import Score  # noqa: PLC0415

        z = jax.random.normal(key, jnp.shape(x), dtype=jnp.result_type(x, float))
        g = self._std(t)
        x_t = t * x + (1.0 - t) * eps + g * z
        pred = fn(t, x_t)
        if isinstance(objective.space, Score):
            target = -z / g
        else:
            target = x - eps + self._d_std(t) * z
        return objective._weight(t) * jnp.sum(jnp.square(pred - target))


#: the names accepted by :func:`as_coupling` (and ``coupling=`` of the losses).
COUPLINGS = {
    "independent": Independent,
    "ot": MinibatchOT,
    "minibatch_ot": MinibatchOT,
    "sb": SchrodingerBridge,
    "schrodinger_bridge": SchrodingerBridge,
}


def as_coupling(
    coupling: str | AbstractCoupling | None, argument: str = "coupling"
) -> AbstractCoupling:
    """The coupling module for a name (``"independent"``, ``"ot"``/``"minibatch_ot"``, ``"sb"``/
    ``"schrodinger_bridge"``, each with its defaults), a module (returned as is) or None (:class:`Independent`).
    """
    if coupling is None:
        return Independent()
    if isinstance(coupling, AbstractCoupling):
        return coupling
    if isinstance(coupling, str) and coupling in COUPLINGS:
        return COUPLINGS[coupling]()
    raise ValueError(
        f"{argument}={coupling!r} is not a coupling; expected one of {sorted(COUPLINGS)} or a "
        "diffjax.couplings module (Independent(), MinibatchOT(Hungarian() | Sinkhorn(eps)), "
        "SchrodingerBridge(sigma))"
    )
