"""Loss-of-plasticity cures (L2-init, shrink & perturb, continual backprop, ReDo,
UPGD, spectral regularization), as rules that move the params at task boundaries
or perturb the update. One private module per method, re-exported here."""

from clx.plasticity._cbp import CBPState, cbp
from clx.plasticity._l2_init import L2InitState, l2_init
from clx.plasticity._redo import ReDoState, dormant_scores, redo
from clx.plasticity._shrink_perturb import (
    ShrinkPerturbState,
    ShrinkPerturbStepsState,
    shrink_perturb,
    shrink_perturb_steps,
)
from clx.plasticity._spectral import SpectralState, spectral_regularization
from clx.plasticity._upgd import UPGDState, upgd

__all__ = [
    "CBPState",
    "L2InitState",
    "ReDoState",
    "ShrinkPerturbState",
    "ShrinkPerturbStepsState",
    "SpectralState",
    "UPGDState",
    "cbp",
    "dormant_scores",
    "l2_init",
    "redo",
    "shrink_perturb",
    "shrink_perturb_steps",
    "spectral_regularization",
    "upgd",
]
