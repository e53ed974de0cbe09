"""diffjax: diffusion and flow matching in JAX.

Time convention everywhere: t = 0 is noise, t = 1 is data; x_t = α_t·x + σ_t·ε.
"""

from .paths import (
    AbstractPath as AbstractPath,
    CosinePath as CosinePath,
    EDMPath as EDMPath,
    LinearPath as LinearPath,
    LogSNRPath as LogSNRPath,
    Normal as Normal,
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

__version__ = "0.1.0"
