"""The gradient-projection family: a layer's gradient is projected out of the
input-space subspaces of old tasks (GPM, Saha et al. 2021; SGP, Saha & Roy 2023,
scales the projection per direction), on the shared toolkit ``clx.subspace``; SVD-split (Nayak et al. 2025)
keeps each weight's updates off its own top singular subspaces.
Each method lives in its own private module."""

from clx.projection._adam_nscl import AdamNSCLState, adam_nscl
from clx.projection._common import check_per_layer, kernel_paths, per_layer, project_kernel
from clx.projection._gpm import GPMState, gpm
from clx.projection._ogd import OGDState, ogd
from clx.projection._sgp import SGPState, sgp, sgp_importance
from clx.projection._svd_split import SVDSplitState, svd_split

__all__ = [
    "AdamNSCLState",
    "GPMState",
    "OGDState",
    "SGPState",
    "SVDSplitState",
    "adam_nscl",
    "check_per_layer",
    "gpm",
    "kernel_paths",
    "ogd",
    "per_layer",
    "project_kernel",
    "sgp",
    "sgp_importance",
    "svd_split",
]
