"""clx: continual learning in JAX/Flax.

Continual-learning methods are pure functional update rules that compose like
optax transforms (``clx.chain``) and act at task boundaries (``consolidate``).
"""

from clx import data, metrics, subspace
from clx.core import ContinualTransformation, Evidence, as_continual, chain
from clx.functional import FunctionalModel
from clx.gpm import GPMState, gpm
from clx.models import MLP
from clx.subspace import Subspace

__all__ = [
    "ContinualTransformation", "Evidence", "FunctionalModel", "GPMState", "MLP", "Subspace",
    "as_continual", "chain", "data", "gpm", "metrics", "subspace",
]
