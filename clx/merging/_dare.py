"""DARE: drop and rescale a task vector's entries before merging.

Yu, Yu, Yu, Huang & Li 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch" (ICML), the DARE operation (Drop And REscale; the formula
below was checked against FusionBench's code, not against the paper's text): for a task
vector (delta parameters) delta,

    m ~ Bernoulli(p) per entry,   delta~ = (1 - m) * delta,   delta^ = delta~ / (1 - p),

so each entry is dropped with probability p and the survivors are rescaled by 1/(1 - p);
``E[delta^] = delta`` entry by entry (the variance of an entry is ``delta^2 p / (1 - p)``).
DARE is a preprocessing step: the sparsified task vectors are then merged by any merge
(task arithmetic, TIES, ...).

clx offers it as functions the caller composes (no flag on the merges):

    tvs = [clx.merging.dare(clx.merging.task_vector(ft, theta0), p, k) for ft, k in zip(models, keys)]
    theta = clx.merging.apply_task_vector(theta0, clx.merging.tree_sum(tvs), lam)      # DARE + TA
    theta = clx.merging.apply_task_vector(theta0, clx.merging.ties_task_vector(tvs), lam)  # DARE + TIES

or, for merges that take fine-tuned models (the continual ones, OPCM),
``dare_models(theta0, models, p, key)`` returns ``theta0 + dare(theta_t - theta0)`` per model
(one float rounding more than working on task vectors).

Checked against FusionBench (``fusion_bench/method/dare/utils.py``, commit 54c9e8c):
``mask = torch.rand_like(param) > sparsity_level`` then ``param * mask / (1 - sparsity_level)``
(``rescale=True``), applied to every parameter of the task vector by default
(``only_on_linear_weights: false``), ``sparsity_ratio: 0.5`` in its configs. clx keeps an
entry when ``uniform < 1 - p`` (the same law; with p = 0 every entry is kept, bit for bit)
and has no default p.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clx.merging._task_vectors import Params, check_models, check_same_structure
from clx.tree import concrete_float


def _check_p(who: str, p) -> None:
    v = concrete_float(p)
    if v is not None and not (0.0 <= v < 1.0):
        raise ValueError(f"{who}: the drop probability p must be in [0, 1), got {v}; p = 0 keeps every entry.")


def dare(tv: Params, p, key: jax.Array, rescale: bool = True) -> Params:
    """Drops each entry of the task vector ``tv`` with probability ``p`` and divides the rest by ``1 - p``.

    One uniform draw over all entries of all leaves (in ``jax.tree.leaves`` order), keep
    where ``u < 1 - p``.
    Pure and vmappable over ``key`` (and over ``p``, which may be traced).

    Args:
      tv: a task vector (any pytree of float arrays).
      p: the drop probability, in [0, 1).
      key: a ``jax.random`` key.
      rescale: divide the survivors by ``1 - p`` (DARE); False keeps them as they are
        (plain random drop, FusionBench's ``rescale: false``).

    Returns:
      A tree shaped and typed like ``tv``.

    Raises:
      ValueError: a concrete ``p`` outside [0, 1).
    """
    _check_p("dare", p)
    return _dare(tv, p, key, rescale)


@partial(jax.jit, static_argnums=3)
def _dare(tv, p, key, rescale: bool):
    leaves, treedef = jax.tree.flatten(tv)
    sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
    u = jax.random.uniform(key, (max(sum(sizes), 1),))  # one draw for all entries: one RNG program to compile
    offsets = np.cumsum([0] + sizes)

    def drop(x, lo, hi):
        keep = (u[lo:hi] < 1.0 - p).reshape(jnp.shape(x))
        kept = jnp.where(keep, x, jnp.zeros_like(x))
        return (kept / (1.0 - p)).astype(jnp.result_type(x)) if rescale else kept

    return jax.tree.unflatten(treedef, [drop(x, lo, hi) for x, lo, hi in zip(leaves, offsets[:-1], offsets[1:])])


def dare_models(pretrained: Params, finetuned: Sequence[Params], p, key: jax.Array, rescale: bool = True) -> list:
    """``[theta_0 + dare(theta_t - theta_0, p, key_t)]`` for each model, ``key_t = jax.random.split(key, T)[t]``.

    For merges that take fine-tuned models (``task_arithmetic``, ``ties_merging``, the
    continual merges, OPCM): DARE then that merge.

    Raises:
      TypeError: ``finetuned`` is not a list or tuple.
      ValueError: no model, a concrete ``p`` outside [0, 1), or trees that differ (the
        first differing leaf is named).
    """
    who = "dare_models"
    finetuned = check_models(who, finetuned)
    _check_p(who, p)
    check_same_structure(
        [pretrained, *finetuned], ["pretrained"] + [f"finetuned[{i}]" for i in range(len(finetuned))], who
    )
    keys = jax.random.split(key, len(finetuned))
    out = []
    for k, ft in zip(keys, finetuned):
        tv = dare(jax.tree.map(jnp.subtract, ft, pretrained), p, k, rescale)
        out.append(jax.tree.map(lambda p0, t: (p0 + t).astype(jnp.result_type(p0)), pretrained, tv))
    return out
