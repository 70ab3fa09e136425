"""Task arithmetic, all at once and continual.

Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt, Hajishirzi & Farhadi 2023, "Editing Models
with Task Arithmetic" (ICLR), Sec. 2 and Sec. 4 (adding task vectors):

    theta = theta_0 + lam * sum_t tau_t,        tau_t = theta_t - theta_0,

with one scaling coefficient lam for all tasks (the paper picks it on held-out validation
data from {0, 0.05, ..., 1}; FusionBench's ``config/method/task_arithmetic.yaml`` uses 0.3,
the default here).

The continual form is FusionBench's OPCM baseline ``ContinualTaskArithmeticForCLIP``
(``fusion_bench/method/opcm/task_arithmetic.py``, ``config/method/opcm/task_arithmetic.yaml``,
read at commit 54c9e8c): the merged model starts at theta_0 and each arriving model adds
``lam * tau_t``:

    theta^(t) = theta^(t-1) + lam * tau_t,      theta^(0) = theta_0,   lam = 0.3,

so after T models it is all-at-once task arithmetic of those T models (equal up to the
float rounding of the order of the additions).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx.merging._task_vectors import (
    ContinualMerge,
    Params,
    check_models,
    check_nonnegative,
    check_same_structure,
)


def task_arithmetic(pretrained: Params, finetuned: Sequence[Params], lam=0.3) -> Params:
    """Task arithmetic: ``theta_0 + lam * sum_t (theta_t - theta_0)`` (Ilharco et al. 2023, Sec. 2).

    Args:
      pretrained: theta_0, a params pytree.
      finetuned: a list of one or more fine-tuned params trees of theta_0's structure.
      lam: the scaling coefficient lam >= 0 (may be traced); FusionBench's default 0.3.

    Returns:
      The merged params, in ``pretrained``'s dtypes. With one model and ``lam = 1`` it is
      that model (up to the rounding of ``theta_0 + (theta_1 - theta_0)``, exact when the
      subtraction is).

    Raises:
      TypeError: ``finetuned`` is not a list or tuple.
      ValueError: no model, a concrete negative ``lam``, or trees that differ (the first
        differing leaf is named).
    """
    who = "task_arithmetic"
    finetuned = check_models(who, finetuned)
    check_nonnegative(who, "lam", lam)
    check_same_structure(
        [pretrained, *finetuned], ["pretrained"] + [f"finetuned[{i}]" for i in range(len(finetuned))], who
    )

    def merge(p, *fts):
        total = sum((f - p for f in fts[1:]), fts[0] - p)
        return (p + lam * total).astype(jnp.result_type(p))

    return jax.tree.map(merge, pretrained, *finetuned)


class ContinualTAState(NamedTuple):
    pretrained: Params  # params-shaped: theta_0
    merged: Params  # params-shaped: theta^(t), the merged params after t models
    count: jax.Array  # () int32: t, the models merged so far


def continual_task_arithmetic(lam=0.3) -> ContinualMerge:
    """Continual task arithmetic: ``theta^(t) = theta^(t-1) + lam * (theta_t - theta_0)``.

    FusionBench's ``ContinualTaskArithmeticForCLIP`` (OPCM baselines; default ``lam = 0.3``).

    Args:
      lam: the scaling coefficient lam >= 0 (may be traced).

    Returns:
      A :class:`ContinualMerge` named "continual_task_arithmetic" with state
      :class:`ContinualTAState`.

    Raises:
      ValueError: a concrete negative ``lam`` (here); in ``merge_next``, a model whose
        tree differs from theta_0's (the first differing leaf is named).
    """
    who = "continual_task_arithmetic"
    check_nonnegative(who, "lam", lam)

    def init(pretrained):
        return ContinualTAState(pretrained, pretrained, jnp.zeros((), jnp.int32))

    def merge_next(state, finetuned):
        check_same_structure([state.pretrained, finetuned], ["pretrained", "finetuned"], who)
        merged = jax.tree.map(
            lambda m, f, p: (m + lam * (f - p)).astype(jnp.result_type(m)), state.merged, finetuned, state.pretrained
        )
        return ContinualTAState(state.pretrained, merged, state.count + 1)

    return ContinualMerge(init, merge_next, who)
