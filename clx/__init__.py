"""clx: continual learning in JAX/Flax.

Continual-learning methods are pure functional update rules that compose like
optax transforms (``clx.chain``) and act at task boundaries (``consolidate``).
"""

from clx import data, hnet, metrics, subspace
from clx import checkpoint, sharding  # noqa: E402 -- scale and survival (issue 4)
from clx.core import ContinualTransformation, Evidence, as_continual, chain
from clx.functional import FunctionalModel
from clx.gpm import GPMState, gpm
from clx.hnet import HyperModel, TargetNetwork, chunked_hypernetwork, mlp_hypernetwork, output_regularizer, recurrent_hypernetwork
from clx.models import MLP
from clx.subspace import Subspace

__all__ = [
    "ContinualTransformation", "Evidence", "FunctionalModel", "GPMState", "MLP", "Subspace",
    "as_continual", "chain", "data", "gpm", "metrics", "subspace",
    "HyperModel", "TargetNetwork", "chunked_hypernetwork", "hnet", "mlp_hypernetwork", "output_regularizer",
    "recurrent_hypernetwork",
    "checkpoint", "sharding",
]
