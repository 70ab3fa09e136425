"""clx: continual learning in JAX/Flax.

Continual-learning methods are pure functional update rules that compose like
optax transforms (``clx.chain``) and act at task boundaries (``consolidate``).
"""

from clx import checkpoint, data, hnet, metrics, sharding, subspace
from clx.core import ContinualTransformation, Evidence, as_continual, chain
from clx.functional import FunctionalModel
from clx.gpm import GPMState, gpm
from clx.hnet import (HyperModel, TargetNetwork, chunked_hypernetwork, mlp_hypernetwork, output_regularizer,
                      recurrent_hypernetwork)
from clx.models import MLP
from clx.subspace import Subspace

__all__ = [
    # the core contract
    "ContinualTransformation", "Evidence", "as_continual", "chain",
    # models as pure functions
    "FunctionalModel", "MLP",
    # projection: subspaces and GPM
    "GPMState", "Subspace", "gpm", "subspace",
    # hypernetworks
    "HyperModel", "TargetNetwork", "chunked_hypernetwork", "hnet", "mlp_hypernetwork", "output_regularizer",
    "recurrent_hypernetwork",
    # data, metrics, scale
    "checkpoint", "data", "metrics", "sharding",
]
