"""Model merging: task vectors and their merges, as pure functions over params pytrees.

All at once: ``task_arithmetic``, ``ties_merging`` (and ``ties_task_vector``),
``weight_average``; DARE (``dare``, ``dare_models``) sparsifies task vectors before any
merge. Continual (models arriving one at a time, a :class:`ContinualMerge` of
``init(pretrained) -> state`` and ``merge_next(state, finetuned) -> state``):
``continual_task_arithmetic``, ``continual_ties_merging``, ``continual_weight_average``
and ``opcm``; ``merge_sequence`` / ``merge_scan`` run one over a list or a stack of models.
One private module per method, re-exported here."""

from clx.merging._dare import dare, dare_models
from clx.merging._opcm import OPCMState, opcm, opcm_projection, split_rank
from clx.merging._task_arithmetic import ContinualTAState, continual_task_arithmetic, task_arithmetic
from clx.merging._task_vectors import (
    ContinualMerge,
    apply_task_vector,
    check_same_structure,
    merge_scan,
    merge_sequence,
    task_vector,
    tree_norm,
    tree_sum,
)
from clx.merging._ties import ContinualTIESState, continual_ties_merging, ties_merging, ties_task_vector, trim_top_k
from clx.merging._weight_average import ContinualAverageState, continual_weight_average, weight_average

__all__ = [
    "ContinualAverageState",
    "ContinualMerge",
    "ContinualTAState",
    "ContinualTIESState",
    "OPCMState",
    "apply_task_vector",
    "check_same_structure",
    "continual_task_arithmetic",
    "continual_ties_merging",
    "continual_weight_average",
    "dare",
    "dare_models",
    "merge_scan",
    "merge_sequence",
    "opcm",
    "opcm_projection",
    "split_rank",
    "task_arithmetic",
    "task_vector",
    "ties_merging",
    "ties_task_vector",
    "tree_norm",
    "tree_sum",
    "trim_top_k",
    "weight_average",
]
