"""The analytic oracle: Gaussian-mixture data, for which every Gaussian path is closed form.

Time convention: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε.

For data Σ_k π_k N(μ_k, diag(s_k²)) the marginal at time t is p_t = Σ_k π_k N(α_t μ_k, diag(C_k)),
C_k = α_t² s_k² + σ_t². Per component (formulas sheet §6.1):

    s_k(x)     = −(x − α μ_k)/C_k                                  (score)
    u^{(k)}(x) = α̇ μ_k + ½ Ċ_k/C_k · (x − α μ_k),  Ċ_k = 2αα̇ s_k² + d(σ²)/dt   (velocity)
    E[x|x_t,k] = μ_k + α s_k² (x − α μ_k)/C_k,  E[ε|x_t,k] = σ (x − α μ_k)/C_k

mixed with the posterior responsibilities r_k(x) ∝ π_k N(x; α μ_k, C_k). These component forms are regular at
both ends of [0, 1] wherever C_k > 0 (the score form (α̇/α)x + … of the velocity is not), and d(σ²)/dt comes
from the path's ``d_sigma_sq`` so VP paths stay finite at t = 1.

The oracle is a PyTree: the mixture's arrays are leaves, and :meth:`GaussianMixture.model` returns a
:class:`MixtureModel` (mixture, kind, path), so compiled samplers take the oracle as an argument. Its methods check
their inputs at trace time only (x's shape; t ∈ [0, 1] where t is concrete) and compile in no runtime check, since
they run once per step inside ODE/SDE solvers; a traced t is the caller's to validate
(:func:`diffjax.paths.check_time` at the public entry point).

Stochastic interpolants (:mod:`diffjax.interpolants`): :class:`InterpolantMixture`
(``GaussianMixture.interpolant_marginal``) is the exact marginal — density, score, velocity, divergence — of
x_t = α_t·x₁ + β_t·x₀ + γ_t·z from a Gaussian-mixture source to Gaussian-mixture data (one component per pair).

Flow maps (:mod:`diffjax.flow_maps`): :meth:`GaussianMixture.flow_map` is the PF-ODE map X_{s→t} and
:meth:`GaussianMixture.average_velocity_model` the exact average-velocity model u(s, x, t) = (X_{s→t}(x) − x)/(t − s),
both from a high-accuracy diffrax solve of the exact velocity (diffrax is imported on first use).
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from .kinds import AbstractKind, Data, Eps, Score, Velocity, as_kind
from .paths import AbstractPath, check_time

__all__ = [
    "GaussianMixture",
    "MixtureModel",
    "ConditionalMixtureModel",
    "AverageVelocityModel",
    "InterpolantMixture",
]

Scalar = Float[ArrayLike, ""]


class GaussianMixture(eqx.Module):
    """A diagonal Gaussian mixture Σ_k π_k N(μ_k, diag(s_k²)) in D dimensions: the data distribution at t = 1.

    Args:
        weights: (K,) mixture weights (normalised here; must be positive).
        means: (K, D) component means.
        variances: (K, D) or (K,) or scalar component variances s_k² (> 0).
    """

    log_weights: Float[Array, " K"]
    means: Float[Array, "K D"]
    variances: Float[Array, "K D"]

    def __init__(self, weights, means, variances):
        f = jnp.result_type(float)
        weights = jnp.asarray(weights, f)
        means = jnp.asarray(means, f)
        if means.ndim == 1:
            means = means[None, :]
        if weights.ndim != 1 or weights.shape[0] != means.shape[0]:
            raise ValueError(
                f"GaussianMixture: weights must have shape (K,) matching means (K, D); got "
                f"weights {weights.shape}, means {means.shape}"
            )
        variances = jnp.asarray(variances, f)
        if variances.ndim == 1 and variances.shape[0] == means.shape[0]:
            variances = variances[:, None]
        try:
            variances = jnp.broadcast_to(variances, means.shape)
        except ValueError:
            raise ValueError(
                f"GaussianMixture: variances of shape {variances.shape} do not broadcast to means "
                f"{means.shape}"
            ) from None
        if not isinstance(weights, jax.core.Tracer) and not bool(jnp.all(weights > 0)):
            raise ValueError("GaussianMixture: weights must be positive")
        if not isinstance(variances, jax.core.Tracer) and not bool(jnp.all(variances > 0)):
            raise ValueError("GaussianMixture: variances must be positive")
        self.log_weights = jnp.log(weights) - jnp.log(jnp.sum(weights))
        self.means = means
        self.variances = variances

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def weights(self) -> Float[Array, " K"]:
        return jnp.exp(self.log_weights)

    def mean(self) -> Float[Array, " D"]:
        """E[x]."""
        return self.weights @ self.means

    def covariance(self) -> Float[Array, "D D"]:
        """Cov[x] = Σ_k π_k (diag(s_k²) + μ_kμ_kᵀ) − E[x]E[x]ᵀ."""
        w = self.weights
        m = self.mean()
        second = jnp.einsum("k,kd,ke->de", w, self.means, self.means) + jnp.diag(w @ self.variances)
        return second - jnp.outer(m, m)

    def _check_x(self, x):
        if jnp.shape(x) != (self.dim,):
            raise ValueError(
                f"GaussianMixture: x must have shape ({self.dim},) (one example; vmap for batches), "
                f"got {jnp.shape(x)}"
            )

    # --- data distribution (t = 1) -------------------------------------------------------------------
    def log_prob(self, x: Float[Array, " D"]) -> Float[Array, ""]:
        """log p_data(x) for one example."""
        self._check_x(x)
        return jax.nn.logsumexp(self._log_joint(x, self.means, self.variances))

    def sample(self, key: PRNGKeyArray, n: int) -> Float[Array, "n D"]:
        """n independent draws from the mixture."""
        kc, kn = jax.random.split(key)
        k = jax.random.categorical(kc, self.log_weights, shape=(n,))
        z = jax.random.normal(kn, (n, self.dim), self.means.dtype)
        return self.means[k] + jnp.sqrt(self.variances[k]) * z

    def _log_joint(self, x, m, c):
        """log π_k + log N(x; m_k, diag(c_k)) for every k."""
        d = x.shape[-1]
        quad = jnp.sum(jnp.square(x - m) / c, axis=-1)
        logdet = jnp.sum(jnp.log(c), axis=-1)
        return self.log_weights - 0.5 * (quad + logdet + d * math.log(2 * math.pi))

    # --- marginals along a path ----------------------------------------------------------------------
    # The public methods below validate their inputs once, at trace time: x's shape, and t ∈ [0, 1] where t is
    # concrete (a Python error; no runtime check is compiled in). A traced t — inside jit, vmap or an ODE
    # solver — is the caller's responsibility (diffjax.paths.check_time at the entry point): these methods run
    # once per solver step, where a runtime check (a host callback) would cost time and keep the program out of
    # the compilation cache.
    def _stats(self, path: AbstractPath, t, x):
        """Unchecked per-component statistics at (t, x): (α, σ, α̇, αμ_k, C_k, Ċ_k, log-joint_k, r_k)."""
        a, s, da, _ = path.coefficients(t)
        dsig2 = path.d_sigma_sq(t)
        m = a * self.means
        c = a * a * self.variances + s * s
        dc = 2.0 * a * da * self.variances + dsig2
        logj = self._log_joint(x, m, c)
        r = jax.nn.softmax(logj)
        return a, s, da, m, c, dc, logj, r

    def _inputs(self, t, x):
        self._check_x(x)
        return _boundary_time(t), x

    def marginal_log_prob(self, path: AbstractPath, t: Scalar, x: Float[Array, " D"]):
        """log p_t(x): the exact marginal density of x_t (t = 0 noise, t = 1 data)."""
        t, x = self._inputs(t, x)
        return jax.nn.logsumexp(self._stats(path, t, x)[6])

    def score(self, path: AbstractPath, t: Scalar, x: Float[Array, " D"]) -> Float[Array, " D"]:
        """∇_x log p_t(x) = Σ_k r_k·(−(x − αμ_k)/C_k) (t = 0 noise, t = 1 data)."""
        t, x = self._inputs(t, x)
        return self._score(path, t, x)

    def _score(self, path, t, x):
        _, _, _, m, c, _, _, r = self._stats(path, t, x)
        return r @ (-(x - m) / c)

    def velocity(self, path: AbstractPath, t: Scalar, x: Float[Array, " D"]) -> Float[Array, " D"]:
        """The marginal (probability-flow) velocity u_t(x) = Σ_k r_k (α̇μ_k + ½ Ċ_k/C_k (x − αμ_k)).

        t = 0 is noise, t = 1 is data.
        """
        t, x = self._inputs(t, x)
        return self._velocity(path, t, x)

    def _velocity(self, path, t, x):
        _, _, da, m, c, dc, _, r = self._stats(path, t, x)
        return r @ (da * self.means + 0.5 * dc / c * (x - m))

    def divergence(self, path: AbstractPath, t: Scalar, x: Float[Array, " D"]) -> Float[Array, ""]:
        """∇·u_t(x) = Σ_k r_k [(s_k − ∇log p_t)·u^{(k)} + ½ Σ_d Ċ_k/C_k] in closed form (t = 0 noise)."""
        t, x = self._inputs(t, x)
        _, _, da, m, c, dc, _, r = self._stats(path, t, x)
        sk = -(x - m) / c
        uk = da * self.means + 0.5 * dc / c * (x - m)
        score = r @ sk
        return jnp.sum(r * (jnp.sum((sk - score) * uk, axis=-1) + 0.5 * jnp.sum(dc / c, axis=-1)))

    def _posterior_means(self, path, t, x):
        """(x̂, ε̂) = (E[data | x_t = x], E[ε | x_t = x]), unchecked."""
        a, s, _, m, c, _, _, r = self._stats(path, t, x)
        z = (x - m) / c
        return r @ (self.means + a * self.variances * z), r @ (s * z)

    def posterior_mean(
        self, path: AbstractPath, t: Scalar, x: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        """E[data | x_t = x], the optimal data prediction (denoiser); t = 0 noise, t = 1 data."""
        t, x = self._inputs(t, x)
        return self._posterior_means(path, t, x)[0]

    def eps_posterior_mean(
        self, path: AbstractPath, t: Scalar, x: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        """E[ε | x_t = x], the optimal noise prediction; t = 0 noise, t = 1 data."""
        t, x = self._inputs(t, x)
        return self._posterior_means(path, t, x)[1]

    def predict(
        self, kind: str | AbstractKind, path: AbstractPath, t: Scalar, x: Float[Array, " D"]
    ) -> Float[Array, " D"]:
        """The exact (Bayes-optimal) prediction of ``kind`` at (t, x): a perfect model of that kind.

        ``kind`` is a name in :data:`diffjax.kinds.KINDS` or a kind object. The velocity and the score use their
        component forms (finite at both ends, VP at t = 1 included); every other kind is its linear
        representation c·x̂ + d·ε̂ of the posterior means (``kind.target``), e.g. v = α·ε̂ − σ·x̂.
        t = 0 is noise, t = 1 is data.
        """
        kind = as_kind(kind)
        t, x = self._inputs(t, x)
        return self._predict(kind, path, t, x)

    def _predict(self, kind: AbstractKind, path, t, x):
        if isinstance(kind, Velocity):
            return self._velocity(path, t, x)
        if isinstance(kind, Score):
            return self._score(path, t, x)
        xhat, ehat = self._posterior_means(path, t, x)
        if isinstance(kind, Data):
            return xhat
        if isinstance(kind, Eps):
            return ehat
        return kind.target(*path.coefficients(t), xhat, ehat)

    def model(self, kind: str | AbstractKind, path: AbstractPath) -> MixtureModel:
        """A perfect model ``model(t, x)`` of the given prediction kind on ``path`` (t = 0 noise, t = 1 data).

        The model is a PyTree (:class:`MixtureModel`) whose leaves are this mixture's and the path's arrays, so
        a sampler or likelihood compiled with ``equinox.filter_jit`` takes them as arguments (a new mixture of
        the same shapes reuses the program) and ``grad`` reaches them.
        """
        if not isinstance(path, AbstractPath):
            raise ValueError(f"GaussianMixture.model: path must be a diffjax path, got {path!r}")
        return MixtureModel(self, as_kind(kind), path)

    # --- flow maps ---------------------------------------------------------------------------------------
    def flow_map(
        self,
        path: AbstractPath,
        s: Scalar,
        t: Scalar,
        x: Float[Array, " D"],
        *,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = 4096,
    ) -> Float[Array, " D"]:
        """The exact flow map X_{s→t}(x) of the probability-flow ODE dx/dτ = u_τ(x) (:meth:`velocity`).

        t = 0 is noise, t = 1 is data; x is the state at time s, the result the state at time t (t < s runs the
        ODE backwards). Computed as X_{s→t}(x) = x + (t − s)·ū(s, x, t) with the average velocity

            ū(s, x, t) = ∫_0^1 u_{s + r(t − s)}(X_{s→s+r(t−s)}(x)) dr,

        i.e. w(1) for dw/dr = u_{s+r(t−s)}(x + (t − s)·w), w(0) = 0, a diffrax ``Tsit5`` solve over r ∈ [0, 1]
        with ``PIDController(rtol, atol)``. Written in r, the solve never divides by t − s: at t = s the field
        is constant and ū = u_s(x) exactly. Tolerances default to 1e-10 in float64 (1e-6 in float32, which
        cannot reach 1e-10). The solve uses ``diffrax.ForwardMode()``, so ``jax.jvp`` (and ``jax.jacfwd``)
        differentiate it with respect to s, t, x and the mixture's and the path's leaves; reverse mode
        (``jax.grad``) is not supported. A solve that fails (``max_steps``) raises.
        """
        self._check_x(x)
        s, t = _boundary_time(s), _boundary_time(t)
        return x + (t - s) * self._average_velocity(path, s, x, t, rtol, atol, max_steps)

    def _average_velocity(self, path, s, x, t, rtol, atol, max_steps):
        """ū(s, x, t) of :meth:`flow_map` (unchecked inputs)."""
        import diffrax  # noqa: PLC0415 (only here: `import diffjax` and training never load it)

        dtype = jnp.result_type(x, s, t, float)
        x = jnp.asarray(x, dtype)
        tight = 1e-10 if jnp.finfo(dtype).bits > 32 else 1e-6
        rtol, atol = (tight if v is None else float(v) for v in (rtol, atol))

        def field(r, w, args):
            mixture, path, s, x, t = args
            return mixture._velocity(path, s + r * (t - s), x + (t - s) * w)

        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(field),
            diffrax.Tsit5(),
            t0=jnp.asarray(0.0, dtype),
            t1=jnp.asarray(1.0, dtype),
            dt0=None,
            y0=jnp.zeros_like(x),
            args=(self, path, jnp.asarray(s, dtype), x, jnp.asarray(t, dtype)),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            adjoint=diffrax.ForwardMode(),
            max_steps=max_steps,
        )
        return sol.ys[-1]

    def average_velocity_model(
        self,
        path: AbstractPath,
        *,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int = 4096,
    ) -> AverageVelocityModel:
        """The exact average-velocity model ``u(s, x, t)`` of this mixture on ``path`` (t = 0 noise, t = 1 data).

        u(s, x, t) = (X_{s→t}(x) − x)/(t − s) with X the exact flow map (:meth:`flow_map`), and
        u(s, x, s) = u_s(x), the exact velocity: the flow-map model that :mod:`diffjax.flow_maps` trains
        (MeanFlow, shortcut models) and samples with ``sample_flow_map``. It satisfies the MeanFlow identity
        u = v + (t − s)·d/ds u and the semigroup X_{s→t} = X_{r→t}∘X_{s→r} to the solve's tolerance. A PyTree
        (:class:`AverageVelocityModel`), so compiled samplers take it as an argument; ``jax.jvp`` works through
        it (forward-mode solve), ``jax.grad`` does not.
        """
        if not isinstance(path, AbstractPath):
            raise ValueError(
                f"GaussianMixture.average_velocity_model: path must be a diffjax path, got {path!r}"
            )
        if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(
                f"GaussianMixture.average_velocity_model: max_steps must be a Python int >= 1, got "
                f"{max_steps!r}"
            )
        return AverageVelocityModel(self, path, rtol, atol, max_steps)

    # --- stochastic interpolants ------------------------------------------------------------------------
    def interpolant_marginal(self, interpolant) -> InterpolantMixture:
        """The exact marginal of ``interpolant`` from its Gaussian(-mixture) source to this mixture as the data,
        under the independent coupling: an :class:`InterpolantMixture` (t = 0 source, t = 1 data).

        The source must be a :class:`~diffjax.interpolants.GaussianSource` or
        :class:`~diffjax.interpolants.MixtureSource` of this mixture's dimension.
        """
        from .interpolants import StochasticInterpolant  # noqa: PLC0415 (interpolants imports this module)

        if not isinstance(interpolant, StochasticInterpolant):
            raise ValueError(
                "GaussianMixture.interpolant_marginal: interpolant must be a "
                f"diffjax.interpolants.StochasticInterpolant, got {type(interpolant).__name__}"
            )
        as_mixture = getattr(interpolant.source, "as_mixture", None)
        if as_mixture is None:
            raise ValueError(
                "GaussianMixture.interpolant_marginal: the closed form needs a Gaussian or Gaussian-mixture "
                f"source (GaussianSource, MixtureSource), got {type(interpolant.source).__name__}"
            )
        return InterpolantMixture(as_mixture(self.dim), self, interpolant.path, interpolant.gamma)

    # --- classes ---------------------------------------------------------------------------------------
    def _class_labels(self, labels):
        k = self.log_weights.shape[0]
        labels = jnp.arange(k, dtype=jnp.int32) if labels is None else jnp.asarray(labels)
        if labels.shape != (k,) or not jnp.issubdtype(labels.dtype, jnp.integer):
            raise ValueError(
                f"GaussianMixture: labels must be ({k},) integers (the class of each component), got "
                f"{labels.shape} {labels.dtype}"
            )
        return labels

    def conditional(self, c, labels=None) -> GaussianMixture:
        """The class-conditional data distribution p(x | c): the components of class c with weights
        π_k / Σ_{j: labels_j = c} π_j (the others get weight 0, log-weight −∞).

        ``labels`` (K,) gives each component's class (default: class k is component k); c may be traced (the
        result is a mixture of the same shapes, so everything closed form — ``marginal_log_prob``, ``score``,
        ``velocity``, ``predict``, ``sample`` — is that of p_t(x | c)). A label with no component gives NaN.
        """
        labels = self._class_labels(labels)
        masked = jnp.where(labels == c, self.log_weights, -jnp.inf)
        return eqx.tree_at(lambda m: m.log_weights, self, masked - jax.nn.logsumexp(masked))

    def conditional_model(
        self, kind: str | AbstractKind, path: AbstractPath, labels=None
    ) -> ConditionalMixtureModel:
        """A perfect class-conditional model ``model(t, x, c)`` of ``kind`` on ``path``: c ∈ 0..C−1 gives the
        exact prediction for p(x | c), c = C (the null label, C = number of classes) that for p(x) — the exact
        pair of predictions classifier-free guidance combines. t = 0 is noise, t = 1 is data."""
        if not isinstance(path, AbstractPath):
            raise ValueError(
                f"GaussianMixture.conditional_model: path must be a diffjax path, got {path!r}"
            )
        labels = self._class_labels(labels)
        num_classes = int(jnp.max(labels)) + 1
        return ConditionalMixtureModel(self, as_kind(kind), path, labels, num_classes)


class InterpolantMixture(eqx.Module):
    """The exact marginal of the stochastic interpolant x_t = α_t·x₁ + β_t·x₀ + γ_t·z between two Gaussian
    mixtures under the independent coupling (t = 0 source, t = 1 data; Albergo et al. 2023).

    Source Σ_j ρ_j N(m_j, diag(v_j)), data Σ_k π_k N(μ_k, diag(s_k²)), z ~ N(0, I), all independent: given the
    pair (j, k), x_t is Gaussian, so the marginal is a mixture with one component per pair,

        ρ_t = Σ_{j,k} ρ_j π_k N(M_jk, diag(C_jk)),   M_jk = α μ_k + β m_j,   C_jk = α² s_k² + β² v_j + γ²,

    (α, β = ``path.alpha``, ``path.sigma``; γ from ``gamma``). Per pair, (α̇x₁ + β̇x₀ + γ̇z, x_t) are jointly
    Gaussian and E[α̇x₁ + β̇x₀ + γ̇z | x_t = x, j, k] = Ṁ_jk + ½(Ċ_jk/C_jk)(x − M_jk) with Ṁ = α̇μ_k + β̇m_j and
    Ċ = 2αα̇s_k² + d(β²)/dt·v_j + d(γ²)/dt (finite where γ̇ is not). The velocity is the mixture of these with
    the posterior responsibilities r_jk(x) ∝ ρ_j π_k N(x; M_jk, C_jk); the score is Σ r_jk·(−(x − M_jk)/C_jk).
    With a N(0, I) source and γ = 0 it is :class:`GaussianMixture`'s marginal on the path (α, σ) = (α, β).

    A PyTree (both mixtures, the path and γ are leaves); calling it, ``oracle(t, x)``, gives the velocity, so it
    is a field for :func:`diffjax.interpolants.sample_ode` and :func:`diffjax.interpolants.log_likelihood`.
    Methods check x's shape and a concrete t ∈ [0, 1]; a traced t is the caller's to validate.
    """

    source: GaussianMixture
    target: GaussianMixture
    path: AbstractPath
    gamma: eqx.Module

    def __check_init__(self):
        if self.source.dim != self.target.dim:
            raise ValueError(
                f"InterpolantMixture: source dimension {self.source.dim} != data dimension {self.target.dim}"
            )

    @property
    def dim(self) -> int:
        return self.target.dim

    def _stats(self, t, x):
        """Per pair (flattened j-major): (log-joint, M, C, Ṁ, Ċ, responsibilities); unchecked."""
        a, b, da, db = self.path.coefficients(t)
        dbeta_sq = self.path.d_sigma_sq(t)
        g2, dg2 = self.gamma.gamma_sq(t), self.gamma.d_gamma_sq(t)
        src, tgt = self.source, self.target
        d = self.dim
        m = (a * tgt.means[None, :, :] + b * src.means[:, None, :]).reshape(-1, d)
        c = (a * a * tgt.variances[None] + b * b * src.variances[:, None] + g2).reshape(-1, d)
        dm = (da * tgt.means[None] + db * src.means[:, None]).reshape(-1, d)
        dc = 2.0 * a * da * tgt.variances[None] + dbeta_sq * src.variances[:, None] + dg2
        dc = jnp.broadcast_to(dc, (src.means.shape[0], tgt.means.shape[0], d)).reshape(-1, d)
        logw = (src.log_weights[:, None] + tgt.log_weights[None, :]).reshape(-1)
        quad = jnp.sum(jnp.square(x - m) / c, axis=-1)
        logj = logw - 0.5 * (quad + jnp.sum(jnp.log(c), axis=-1) + d * math.log(2 * math.pi))
        return logj, m, c, dm, dc, jax.nn.softmax(logj)

    def _inputs(self, t, x):
        self.target._check_x(x)
        return _boundary_time(t), x

    def log_prob(self, t: Scalar, x: Float[Array, " D"]) -> Float[Array, ""]:
        """log ρ_t(x), the exact marginal density of x_t (t = 0 source, t = 1 data)."""
        t, x = self._inputs(t, x)
        return jax.nn.logsumexp(self._stats(t, x)[0])

    def score(self, t: Scalar, x: Float[Array, " D"]) -> Float[Array, " D"]:
        """∇_x log ρ_t(x) = Σ r_jk·(−(x − M_jk)/C_jk) (t = 0 source, t = 1 data)."""
        t, x = self._inputs(t, x)
        _, m, c, _, _, r = self._stats(t, x)
        return r @ (-(x - m) / c)

    def velocity(self, t: Scalar, x: Float[Array, " D"]) -> Float[Array, " D"]:
        """b(t, x) = E[α̇x₁ + β̇x₀ + γ̇z | x_t = x] = Σ r_jk (Ṁ_jk + ½Ċ_jk/C_jk·(x − M_jk)) (t = 0 source)."""
        t, x = self._inputs(t, x)
        return self._velocity(t, x)

    def _velocity(self, t, x):
        _, m, c, dm, dc, r = self._stats(t, x)
        return r @ (dm + 0.5 * dc / c * (x - m))

    def divergence(self, t: Scalar, x: Float[Array, " D"]) -> Float[Array, ""]:
        """∇·b(t, x) = Σ r_jk [(s_jk − ∇log ρ_t)·b_jk + ½ Σ_d Ċ_jk/C_jk] in closed form (t = 0 source)."""
        t, x = self._inputs(t, x)
        _, m, c, dm, dc, r = self._stats(t, x)
        sk = -(x - m) / c
        uk = dm + 0.5 * dc / c * (x - m)
        score = r @ sk
        return jnp.sum(r * (jnp.sum((sk - score) * uk, axis=-1) + 0.5 * jnp.sum(dc / c, axis=-1)))

    def __call__(self, t: Scalar, x: Float[Array, " D"]) -> Float[Array, " D"]:
        """The velocity b(t, x) (a field for the samplers; t = 0 source, t = 1 data), as :meth:`velocity`."""
        return self.velocity(t, x)


class MixtureModel(eqx.Module):
    """The exact model of ``kind`` for ``mixture`` data on ``path``: ``model(t, x) = mixture.predict(...)``.

    An ``equinox.Module`` (the mixture's and the path's arrays are leaves; the kind has none), built by
    :meth:`GaussianMixture.model`. Called with a concrete t it checks t ∈ [0, 1]; a traced t (inside a solver)
    is not checked. t = 0 is noise, t = 1 is data.
    """

    mixture: GaussianMixture
    kind: AbstractKind
    path: AbstractPath

    def __call__(self, t: Scalar, x: Float[Array, " D"]) -> Float[Array, " D"]:
        return self.mixture.predict(self.kind, self.path, t, x)


class ConditionalMixtureModel(eqx.Module):
    """The exact class-conditional model of ``kind``: ``model(t, x, c)`` predicts for p(x | c) (c ∈ 0..C−1) or,
    at the null label c = C = ``num_classes``, for p(x). Built by :meth:`GaussianMixture.conditional_model`.
    t = 0 is noise, t = 1 is data."""

    mixture: GaussianMixture
    kind: AbstractKind
    path: AbstractPath
    labels: Array
    num_classes: int = eqx.field(static=True)

    def __call__(self, t: Scalar, x: Float[Array, " D"], c) -> Float[Array, " D"]:
        cond = self.mixture.conditional(c, self.labels)
        mixture = eqx.tree_at(
            lambda m: m.log_weights,
            self.mixture,
            jnp.where(c == self.num_classes, self.mixture.log_weights, cond.log_weights),
        )
        return mixture.predict(self.kind, self.path, t, x)


class AverageVelocityModel(eqx.Module):
    """The exact average-velocity model u(s, x, t) = (X_{s→t}(x) − x)/(t − s) of a mixture on a path, with
    u(s, x, s) = u_s(x) (built by :meth:`GaussianMixture.average_velocity_model`; t = 0 noise, t = 1 data).

    x is the state at time s, t the target time; x + (t − s)·u(s, x, t) is the exact flow map X_{s→t}(x).
    Concrete times are checked to lie in [0, 1]; traced ones (inside a sampler) are not.
    """

    mixture: GaussianMixture
    path: AbstractPath
    rtol: float | None = eqx.field(static=True)
    atol: float | None = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __call__(self, s: Scalar, x: Float[Array, " D"], t: Scalar) -> Float[Array, " D"]:
        self.mixture._check_x(x)
        s, t = _boundary_time(s), _boundary_time(t)
        return self.mixture._average_velocity(
            self.path, s, x, t, self.rtol, self.atol, self.max_steps
        )


def _boundary_time(t):
    """t as a float scalar; t ∈ [0, 1] is checked (Python error) only where t is concrete.

    A traced t is passed through unchecked: it comes from a solver or from a caller that validated it.
    """
    if isinstance(t, jax.core.Tracer):
        if t.shape != ():
            raise ValueError(
                f"t must be a scalar (one time per example; use jax.vmap for batches), got shape {t.shape}"
            )
        return t if jnp.issubdtype(t.dtype, jnp.floating) else t.astype(jnp.result_type(float))
    with jax.ensure_compile_time_eval():  # concrete under jit too: the check resolves at trace time
        return check_time(t)


# =====================================================================================================
# Closed-form ELBO and model likelihood for Gaussian data N(μ, diag(s²)) (formulas-detailed.md §6.2).
# The oracles of tests/test_vlb.py for diffjax.vlb.elbo; time convention t = 0 noise, t = 1 data.
# =====================================================================================================


def _gaussian_window(path, lam_min, lam_max, prior_scale):
    from .paths import CosinePath

    path = CosinePath() if path is None else path
    f = jnp.result_type(float)
    lam_min = jnp.asarray(lam_min, f)
    lam_max = jnp.asarray(lam_max, f)
    tau = path.prior.scale if prior_scale is None else jnp.asarray(prior_scale, f)
    return path, lam_min, lam_max, tau


def gaussian_elbo(
    x: Float[Array, "*shape"],
    mu: Float[ArrayLike, "*shape"],
    s2: Float[ArrayLike, "*shape"],
    *,
    lam_min: Scalar,
    lam_max: Scalar,
    path: AbstractPath | None = None,
    prior_scale: Scalar | None = None,
    return_terms: bool = False,
):
    """Closed-form continuous-time ELBO of x for data N(μ, diag(s²)) and the exact denoiser (sheet §6.2).

    Window λ ∈ [lam_min, lam_max] (noise end λ_min at t0 = path.t_from_log_snr(λ_min), data end λ_max);
    t = 0 is noise, t = 1 is data. With u = s² e^λ (per coordinate) and τ = ``prior_scale``
    (default ``path.prior.scale``; ``path`` defaults to the variance-preserving ``CosinePath``):

        −ELBO = ½ Σ_i [(σ₀² + α₀² x_i²)/τ² − 1 − log(σ₀²/τ²)]               (prior KL, noise end)
              + (D/2)(log 2π − λ_max + 1)                                   (Gaussian decoder, data end)
              + Σ_i [½(log(1+u_i) + 1/(1+u_i)) − (x_i − μ_i)²/(2 s_i² (1+u_i))]_{u_min}^{u_max}

    The last line is ½∫ E‖ε − ε̂*‖² dλ with E‖ε − ε̂*‖² = Σ_i (u_i/(1+u_i))² + (x_i − μ_i)² e^λ/(1+u_i)².
    Returns the ELBO (nats), or (elbo, prior_kl, reconstruction, diffusion) with ``return_terms=True``.
    """
    path, lam_min, lam_max, tau = _gaussian_window(path, lam_min, lam_max, prior_scale)
    x = jnp.asarray(x, jnp.result_type(float))
    mu = jnp.broadcast_to(jnp.asarray(mu, x.dtype), x.shape)
    s2 = jnp.broadcast_to(jnp.asarray(s2, x.dtype), x.shape)
    d = x.size
    t0 = path.t_from_log_snr(lam_min)
    a0, sg0 = path.alpha(t0), path.sigma(t0)
    r = jnp.square(sg0 / tau)
    prior_kl = 0.5 * (d * (r - 1.0 - jnp.log(r)) + jnp.sum(jnp.square(a0 * x / tau)))
    reconstruction = 0.5 * d * (math.log(2 * math.pi) - lam_max + 1.0)

    def antiderivative(lam):
        u = s2 * jnp.exp(lam)
        return jnp.sum(
            0.5 * (jnp.log1p(u) + 1.0 / (1.0 + u)) - jnp.square(x - mu) / (2.0 * s2 * (1.0 + u))
        )

    diffusion = antiderivative(lam_max) - antiderivative(lam_min)
    value = -(prior_kl + reconstruction + diffusion)
    if return_terms:
        return value, prior_kl, reconstruction, diffusion
    return value


def gaussian_model_log_prob(
    x: Float[Array, "*shape"],
    mu: Float[ArrayLike, "*shape"],
    s2: Float[ArrayLike, "*shape"],
    *,
    lam_min: Scalar,
    lam_max: Scalar,
    path: AbstractPath | None = None,
    prior_scale: Scalar | None = None,
    rtol: float = 1e-10,
    atol: float = 1e-12,
) -> Float[Array, ""]:
    """log p_model(x): the generative model the ELBO bounds, for data N(μ, diag(s²)) and the exact score.

    p_model is the reverse SDE with g² = σ²λ̇ and the exact score, started at N(0, τ² I) at the noise end
    (λ_min) and run to λ_max, followed by the Gaussian decoder N(x; x_{t1}/α₁, (σ₁/α₁)² I). Per coordinate it
    is Gaussian with moments from the ODEs of formulas-detailed.md §6.2 (t = 0 noise, t = 1 data):

        dM/dt = α̇μ + k(M − αμ),   dV/dt = 2kV + g²,   k = (Ċ − g²)/(2C),   C = α²s² + σ²,   g² = σ²λ̇
        M(t0) = 0, V(t0) = τ²,    p_model(x) = N(x; M(t1)/α₁, (V(t1) + σ₁²)/α₁²)

    integrated in λ (dt = dλ/λ̇, non-stiff) with diffrax's Dopri5 at the given tolerances.
    """
    import diffrax

    path, lam_min, lam_max, tau = _gaussian_window(path, lam_min, lam_max, prior_scale)
    x = jnp.asarray(x, jnp.result_type(float))
    mu = jnp.broadcast_to(jnp.asarray(mu, x.dtype), x.shape)
    s2 = jnp.broadcast_to(jnp.asarray(s2, x.dtype), x.shape)

    def rhs(lam, y, args):
        m, v = y
        t = path.t_from_log_snr(lam)
        a, sg, da, _ = path.coefficients(t)
        dlam = path.d_log_snr(t)
        dsig2 = path.d_sigma_sq(t)
        c = a * a * s2 + sg * sg
        c_dot = 2.0 * a * da * s2 + dsig2
        g2_over = sg * sg  # g²/λ̇
        k_over = (c_dot / dlam - g2_over) / (2.0 * c)  # k/λ̇
        dm = (da / dlam) * mu + k_over * (m - a * mu)
        dv = 2.0 * k_over * v + g2_over
        return dm, dv

    y0 = (jnp.zeros_like(x), jnp.broadcast_to(jnp.square(tau), x.shape).astype(x.dtype))
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(rhs),
        diffrax.Dopri5(),
        t0=lam_min,
        t1=lam_max,
        dt0=None,
        y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        max_steps=100_000,
    )
    m1, v1 = sol.ys[0][-1], sol.ys[1][-1]
    t1 = path.t_from_log_snr(lam_max)
    a1, sg1 = path.alpha(t1), path.sigma(t1)
    mean = m1 / a1
    var = (v1 + sg1 * sg1) / (a1 * a1)
    return -0.5 * jnp.sum(jnp.square(x - mean) / var + jnp.log(2 * math.pi * var))


__all__ += ["gaussian_elbo", "gaussian_model_log_prob"]
