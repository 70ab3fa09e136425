"""Weight averaging, all at once and continual.

The uniform average of the fine-tuned models' params (Wortsman et al. 2022, "Model soups:
averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time", ICML, the uniform soup; the "Simple Averaging" baseline of FusionBench,
``fusion_bench/method/simple_average.py``):

    theta = (1/T) sum_t theta_t.

The continual form is FusionBench's OPCM baseline ``ContinualWeightAverageForCLIP``
(``fusion_bench/method/opcm/weight_average.py``, read at commit 54c9e8c): the first model
is taken as it is and model t (counting from 0) enters as a running mean,

    theta^(0) = theta_0' (the first fine-tuned model),   theta^(t) = (t theta^(t-1) + theta_t) / (t + 1),

which after T models is the uniform average (up to float rounding). The pre-trained params
play no part except as the state's shape template before the first model.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx.merging._task_vectors import ContinualMerge, Params, check_models, check_same_structure


def weight_average(finetuned: Sequence[Params]) -> Params:
    """The uniform average ``(1/T) sum_t theta_t`` of one or more models, in the first model's dtypes.

    Raises:
      TypeError: ``finetuned`` is not a list or tuple.
      ValueError: no model, or trees that differ (the first differing leaf is named).
    """
    who = "weight_average"
    finetuned = check_models(who, finetuned)
    check_same_structure(finetuned, [f"finetuned[{i}]" for i in range(len(finetuned))], who)
    n = len(finetuned)
    return jax.tree.map(lambda *xs: (sum(xs[1:], xs[0]) / n).astype(jnp.result_type(xs[0])), *finetuned)


class ContinualAverageState(NamedTuple):
    merged: Params  # params-shaped: the running mean of the models so far (the pre-trained params before any)
    count: jax.Array  # () int32: t, the models merged so far


def continual_weight_average() -> ContinualMerge:
    """Continual weight average: ``theta^(t) = (t theta^(t-1) + theta_t) / (t + 1)`` (FusionBench's OPCM baseline).

    The first model replaces the initial state exactly (``(0 * theta + theta_0') / 1``, as
    long as the initial params are finite).

    Returns:
      A :class:`ContinualMerge` named "continual_weight_average" with state
      :class:`ContinualAverageState`.

    Raises:
      ValueError: in ``merge_next``, a model whose tree differs from the state's (the first
        differing leaf is named).
    """
    who = "continual_weight_average"

    def init(pretrained):
        return ContinualAverageState(pretrained, jnp.zeros((), jnp.int32))

    def merge_next(state, finetuned):
        check_same_structure([state.merged, finetuned], ["merged", "finetuned"], who)
        t = state.count.astype(jnp.float32)

        def step(m, f):
            dtype = jnp.result_type(m)
            return ((m * t + f) / (t + 1.0)).astype(dtype)

        return ContinualAverageState(jax.tree.map(step, state.merged, finetuned), state.count + 1)

    return ContinualMerge(init, merge_next, who)
