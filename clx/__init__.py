"""clx: continual learning in JAX/Flax.

Continual-learning methods are pure functional update rules that compose like
optax transforms (``clx.chain``) and act at task boundaries (``consolidate``).
The contract is in ``clx.core``; the methods sit in one package per family
(``clx.projection``, ``clx.regularization``, ``clx.replay``, ``clx.plasticity``,
``clx.merging``, ``clx.hnet``), on the shared pieces (``clx.subspace``,
``clx.functional``, ``clx.tree``), trained by ``clx.train``.
"""

from clx import (
    checkpoint,
    data,
    hnet,
    merging,
    metrics,
    models,
    plasticity,
    projection,
    regularization,
    replay,
    sharding,
    subspace,
    train,
    tree,
)
from clx.core import Batch, ContinualTransformation, Evidence, Model, TappedModel, as_continual, chain
from clx.functional import FunctionalModel
from clx.hnet import (
    HyperModel,
    TargetNetwork,
    chunked_hypernetwork,
    mlp_hypernetwork,
    output_regularizer,
    recurrent_hypernetwork,
)
from clx.models import MLP
from clx.projection import AdamNSCLState, GPMState, OGDState, SGPState, adam_nscl, gpm, ogd, sgp
from clx.regularization import (
    EWCState,
    L2State,
    LwFState,
    MASState,
    OnlineEWCState,
    SIState,
    diagonal_fisher,
    ewc,
    l2,
    lwf,
    mas,
    online_ewc,
    si,
)
from clx.replay import AGEMState, DERState, ERState, GEMState, agem, der, derpp, er, gem
from clx.subspace import Subspace
from clx.train import CheckpointOptions, FitResult, fit, fit_members

__all__ = [
    # the core contract
    "Batch",
    "ContinualTransformation",
    "Evidence",
    "Model",
    "TappedModel",
    "as_continual",
    "chain",
    # models as pure functions
    "FunctionalModel",
    "MLP",
    "models",
    # the method families
    "projection",
    "regularization",
    "replay",
    "plasticity",
    "merging",
    "hnet",
    # projection: subspaces, GPM and its family
    "AdamNSCLState",
    "GPMState",
    "OGDState",
    "SGPState",
    "Subspace",
    "adam_nscl",
    "gpm",
    "ogd",
    "sgp",
    "subspace",
    # regularization
    "EWCState",
    "L2State",
    "LwFState",
    "MASState",
    "OnlineEWCState",
    "SIState",
    "diagonal_fisher",
    "ewc",
    "l2",
    "lwf",
    "mas",
    "online_ewc",
    "si",
    # replay
    "AGEMState",
    "DERState",
    "ERState",
    "GEMState",
    "agem",
    "der",
    "derpp",
    "er",
    "gem",
    # hypernetworks
    "HyperModel",
    "TargetNetwork",
    "chunked_hypernetwork",
    "mlp_hypernetwork",
    "output_regularizer",
    "recurrent_hypernetwork",
    # training
    "CheckpointOptions",
    "FitResult",
    "fit",
    "fit_members",
    "train",
    # data, metrics, scale, utilities
    "checkpoint",
    "data",
    "metrics",
    "sharding",
    "tree",
]
