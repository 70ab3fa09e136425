"""The gradient-projection family: a layer's gradient is projected out of the
input-space subspaces of old tasks (GPM, Saha et al. 2021; SGP, Saha & Roy 2023,
scales the projection per direction; TRGP, Lin et al. 2022, reuses old tasks' frozen weights through
per-task scale matrices), on the shared toolkit ``clx.subspace``; and continual fine-tuning in orthogonal
subspaces (CoSO, Cheng et al. 2025; O-LoRA, Wang et al. 2023; SVD-split, Nayak et al. 2025, which keeps each
weight's updates off its own top singular subspaces).
Each method lives in its own private module."""

from clx.projection._adam_nscl import AdamNSCLState, adam_nscl
from clx.projection._common import check_per_layer, kernel_paths, per_layer, project_kernel
from clx.projection._coso import CoSOState, coso
from clx.projection._gpm import GPMState, gpm
from clx.projection._ogd import OGDState, ogd
from clx.projection._olora import LoRAModel, OLoRAState, olora, orthogonality_penalty
from clx.projection._sgp import SGPState, sgp, sgp_importance
from clx.projection._svd_split import SVDSplitState, svd_split
from clx.projection._trgp import TRGPModel, TRGPState, check_epsilon, task_basis, trgp, trust_region

__all__ = [
    "AdamNSCLState",
    "CoSOState",
    "GPMState",
    "LoRAModel",
    "OLoRAState",
    "OGDState",
    "SGPState",
    "TRGPModel",
    "TRGPState",
    "SVDSplitState",
    "adam_nscl",
    "check_epsilon",
    "check_per_layer",
    "coso",
    "gpm",
    "kernel_paths",
    "ogd",
    "olora",
    "orthogonality_penalty",
    "per_layer",
    "project_kernel",
    "sgp",
    "sgp_importance",
    "task_basis",
    "trgp",
    "trust_region",
    "svd_split",
]
