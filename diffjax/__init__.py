"""diffjax: diffusion and flow matching in JAX.

Time convention everywhere: **t = 0 is noise, t = 1 is data**; x_t = α_t·x + σ_t·ε, λ_t = log(α_t²/σ_t²).

Submodules: ``paths`` (Gaussian paths), ``targets`` (parameterizations and exact conversions), ``losses``
(weighted objectives and presets), ``fields`` (model adapters, divergences), ``sampling`` (PF-ODE and reverse
SDE), ``likelihood`` (exact log-likelihood, bits/dim), ``vlb`` (continuous-time ELBO), ``analytic``
(Gaussian-mixture oracle), ``solve`` and ``grids`` (ODE solves and time grids), ``nn`` (flax models), ``data``,
``train``, ``checkpoint``, ``samplers`` (fixed-step samplers for few evaluations: DDIM, DPM-Solver++, UniPC, EDM
Heun), ``flow_maps`` (MeanFlow and shortcut models), ``conditioning`` (conditional models, condition dropout),
``guidance`` (classifier-free guidance and its variants), ``couplings`` (minibatch OT and Schrödinger-bridge pairings), ``interpolants`` (non-Gaussian sources), ``schedules`` (learned monotone log-SNR schedules, VDM's
joint step), ``importance`` (the schedule as importance sampling: variance-minimizing λ proposals, EDM2's
uncertainty weighting) and ``transfer`` (a trained model used exactly on another path and kind). ``nn``, ``data``, ``train`` and ``checkpoint`` are
imported lazily, on first use (``dj.train.fit`` or ``import diffjax.train``), so that ``import diffjax`` does not
load flax, optax, orbax or scikit-learn; so are ``solve``, ``grids``, ``sampling``, ``samplers`` and
``likelihood`` (with their names, e.g. ``dj.sample_ode``, ``dj.sample``), so that training never loads diffrax. The application layer (experiment runs, metrics,
figures, the ``diffjax`` command) is the separate package ``diffjax_app``; nothing here imports it.
"""

import importlib
from typing import TYPE_CHECKING

from . import (
    analytic as analytic,
    conditioning as conditioning,
    couplings as couplings,
    fields as fields,
    flow_maps as flow_maps,
    guidance as guidance,
    importance as importance,
    interpolants as interpolants,
    kinds as kinds,
    losses as losses,
    paths as paths,
    schedules as schedules,
    targets as targets,
    time_change as time_change,
    transfer as transfer,
    vlb as vlb,
)
from .analytic import GaussianMixture as GaussianMixture
from .conditioning import (
    ClassDropout as ClassDropout,
    ConditionDropout as ConditionDropout,
    Conditioned as Conditioned,
)
from .couplings import (
    AbstractCoupling as AbstractCoupling,
    Hungarian as Hungarian,
    Independent as Independent,
    MinibatchOT as MinibatchOT,
    SchrodingerBridge as SchrodingerBridge,
    Sinkhorn as Sinkhorn,
)
from .fields import (
    AbstractField as AbstractField,
    AbstractTrace as AbstractTrace,
    ExactTrace as ExactTrace,
    Hutchinson as Hutchinson,
    HutchPlusPlus as HutchPlusPlus,
    ScoreField as ScoreField,
    VelocityField as VelocityField,
    divergence_exact as divergence_exact,
    divergence_hutchinson as divergence_hutchinson,
    integration_interval as integration_interval,
    score_field as score_field,
    velocity_field as velocity_field,
)
from .flow_maps import (
    MeanFlow as MeanFlow,
    Shortcut as Shortcut,
    sample_flow_map as sample_flow_map,
)
from .guidance import (
    APG as APG,
    CFG as CFG,
    AutoguidedModel as AutoguidedModel,
    CFGModel as CFGModel,
    LogSNRInterval as LogSNRInterval,
    TimeInterval as TimeInterval,
)
from .interpolants import (
    AbstractGamma as AbstractGamma,
    AbstractSource as AbstractSource,
    BrownianGamma as BrownianGamma,
    ConstantGamma as ConstantGamma,
    EmpiricalSource as EmpiricalSource,
    GaussianSource as GaussianSource,
    MixtureSource as MixtureSource,
    StochasticInterpolant as StochasticInterpolant,
    ZeroGamma as ZeroGamma,
)
from .kinds import (
    AbstractKind as AbstractKind,
    Data as Data,
    Eps as Eps,
    Score as Score,
    V as V,
    Velocity as Velocity,
)
from .losses import (
    ImpliedWeighting as ImpliedWeighting,
    Objective as Objective,
    batch_loss as batch_loss,
    conditional_batch_loss as conditional_batch_loss,
    ddpm as ddpm,
    edm as edm,
    flow_matching as flow_matching,
    implied_weighting as implied_weighting,
    loss as loss,
    min_snr as min_snr,
    score_matching as score_matching,
    sd3 as sd3,
    sigmoid as sigmoid,
    v_prediction as v_prediction,
    weighted_objective as weighted_objective,
)
from .paths import (
    AbstractPath as AbstractPath,
    AffinePath as AffinePath,
    CosinePath as CosinePath,
    EDMPath as EDMPath,
    ICFMPath as ICFMPath,
    LinearPath as LinearPath,
    LogSNRPath as LogSNRPath,
    Normal as Normal,
    PolynomialPath as PolynomialPath,
    SigmaMinPath as SigmaMinPath,
    SubVPPath as SubVPPath,
    VEPath as VEPath,
    VPPath as VPPath,
)
from .targets import (
    KINDS as KINDS,
    conditional_score as conditional_score,
    conditional_velocity as conditional_velocity,
    convert as convert,
    interpolate as interpolate,
    target as target,
)
from .time_change import LinearPathTime as LinearPathTime, PathTime as PathTime
from .transfer import TransferredModel as TransferredModel
from .vlb import ELBOResult as ELBOResult, elbo as elbo

__version__ = "0.1.0"

# Submodules imported on first attribute access (PEP 562), so that ``import diffjax`` loads only what every user
# needs (JAX, equinox and the paths/objectives): ``checkpoint`` (orbax, tensorstore), ``nn`` (flax), ``train``
# (optax) and ``data`` (scikit-learn's digits) are heavy; ``solve``, ``grids``, ``sampling`` and ``likelihood``
# load diffrax, lineax and optimistix, which training does not use (``diffjax train`` starts ~0.5 s sooner).
# ``dj.sample_ode``, ``from diffjax import log_likelihood`` and ``import diffjax.train`` work as before; the
# module is imported once, on first use, and then bound as an ordinary attribute.
_LAZY_SUBMODULES = frozenset(
    {
        "checkpoint",
        "data",
        "grid_search",
        "grids",
        "likelihood",
        "nn",
        "samplers",
        "sampling",
        "sharded",
        "solve",
        "train",
    }
)
_LAZY_NAMES = {
    "LikelihoodResult": "likelihood",
    "bits_per_dim": "likelihood",
    "log_likelihood": "likelihood",
    "log_likelihood_with_stats": "likelihood",
    "SampleResult": "sampling",
    "forward_sde_diffusion": "sampling",
    "sample_ode": "sampling",
    "sample_sde": "sampling",
    "time_grid": "sampling",
    "SolveError": "solve",
    "raise_if_failed": "solve",
    "sample": "samplers",
    "DDIM": "samplers",
    "DPMSolverPP2M": "samplers",
    "DPMSolverPP3M": "samplers",
    "EDMHeun": "samplers",
    "UniPC": "samplers",
    "optimize_grid": "grid_search",
    "BitsPerDimResult": "likelihood",
    "bits_per_dim_with_stats": "likelihood",
    "probes_for_precision": "likelihood",
}

if TYPE_CHECKING:  # static analysers see the lazy names as ordinary attributes
    from . import (
        checkpoint as checkpoint,
        data as data,
        grid_search as grid_search,
        grids as grids,
        likelihood as likelihood,
        nn as nn,
        samplers as samplers,
        sampling as sampling,
        sharded as sharded,
        solve as solve,
        train as train,
    )
    from .grid_search import optimize_grid as optimize_grid
    from .likelihood import (
        BitsPerDimResult as BitsPerDimResult,
        LikelihoodResult as LikelihoodResult,
        bits_per_dim as bits_per_dim,
        bits_per_dim_with_stats as bits_per_dim_with_stats,
        log_likelihood as log_likelihood,
        log_likelihood_with_stats as log_likelihood_with_stats,
        probes_for_precision as probes_for_precision,
    )
    from .samplers import (
        DDIM as DDIM,
        DPMSolverPP2M as DPMSolverPP2M,
        DPMSolverPP3M as DPMSolverPP3M,
        EDMHeun as EDMHeun,
        UniPC as UniPC,
        sample as sample,
    )
    from .sampling import (
        SampleResult as SampleResult,
        forward_sde_diffusion as forward_sde_diffusion,
        sample_ode as sample_ode,
        sample_sde as sample_sde,
        time_grid as time_grid,
    )
    from .solve import SolveError as SolveError, raise_if_failed as raise_if_failed


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        # import_module also binds the submodule as an attribute of this package: this runs once per name
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
        globals()[name] = value  # bound once: later lookups do not come here
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _LAZY_SUBMODULES | set(_LAZY_NAMES))


__all__ = [
    "AbstractField",
    "APG",
    "AutoguidedModel",
    "CFG",
    "CFGModel",
    "ClassDropout",
    "ConditionDropout",
    "Conditioned",
    "conditional_batch_loss",
    "LogSNRInterval",
    "TimeInterval",
    "AbstractKind",
    "AbstractPath",
    "AbstractTrace",
    "batch_loss",
    "bits_per_dim",
    "conditional_score",
    "conditional_velocity",
    "convert",
    "CosinePath",
    "Data",
    "ddpm",
    "divergence_exact",
    "divergence_hutchinson",
    "edm",
    "EDMPath",
    "elbo",
    "ELBOResult",
    "Eps",
    "ExactTrace",
    "flow_matching",
    "MeanFlow",
    "Shortcut",
    "sample_flow_map",
    "forward_sde_diffusion",
    "GaussianMixture",
    "Hutchinson",
    "HutchPlusPlus",
    "implied_weighting",
    "ImpliedWeighting",
    "integration_interval",
    "interpolate",
    "KINDS",
    "LikelihoodResult",
    "LinearPath",
    "LinearPathTime",
    "log_likelihood",
    "log_likelihood_with_stats",
    "LogSNRPath",
    "loss",
    "min_snr",
    "Normal",
    "PathTime",
    "Objective",
    "raise_if_failed",
    "sample",
    "sample_ode",
    "sample_sde",
    "DDIM",
    "DPMSolverPP2M",
    "DPMSolverPP3M",
    "EDMHeun",
    "UniPC",
    "SampleResult",
    "Score",
    "score_field",
    "score_matching",
    "ScoreField",
    "sd3",
    "sigmoid",
    "SolveError",
    "target",
    "time_grid",
    "V",
    "v_prediction",
    "Velocity",
    "velocity_field",
    "VelocityField",
    "VEPath",
    "VPPath",
    "weighted_objective",
    "AffinePath",
    "PolynomialPath",
    "SigmaMinPath",
    "ICFMPath",
    "SubVPPath",
    "AbstractSource",
    "GaussianSource",
    "MixtureSource",
    "EmpiricalSource",
    "AbstractGamma",
    "ZeroGamma",
    "BrownianGamma",
    "ConstantGamma",
    "StochasticInterpolant",
    "AbstractCoupling",
    "Independent",
    "MinibatchOT",
    "SchrodingerBridge",
    "Hungarian",
    "Sinkhorn",
]

__all__ += ["BitsPerDimResult", "bits_per_dim_with_stats", "probes_for_precision"]
