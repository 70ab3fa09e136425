"""Regularization methods: penalties that pull the params towards old tasks'
solutions (EWC, online EWC, SI, MAS, L2), applied as analytic gradients in
``update``, and distillation to the old model (LwF), a loss term. The per-example
diagonal Fisher and MAS importance they rest on are public too. One private module
per method, re-exported here."""

from clx.regularization._ewc import EWCState, OnlineEWCState, ewc, online_ewc
from clx.regularization._fisher import FISHER_VARIANTS, diagonal_fisher
from clx.regularization._l2 import L2State, l2
from clx.regularization._lwf import LWF_WEIGHTINGS, LwFState, lwf, soft_cross_entropy
from clx.regularization._mas import MASState, mas, mas_importance
from clx.regularization._si import SIState, si

__all__ = [
    "EWCState",
    "FISHER_VARIANTS",
    "L2State",
    "LWF_WEIGHTINGS",
    "LwFState",
    "MASState",
    "OnlineEWCState",
    "SIState",
    "diagonal_fisher",
    "ewc",
    "l2",
    "lwf",
    "mas",
    "mas_importance",
    "online_ewc",
    "si",
    "soft_cross_entropy",
]
