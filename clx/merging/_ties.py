"""TIES-merging (trim, elect sign, disjoint merge), all at once and continual.

Yadav, Tam, Choshen, Raffel & Bansal 2023, "TIES-Merging: Resolving Interference When
Merging Models" (NeurIPS), Algorithm 1 ("TIES-Merging Procedure"). For task vectors tau_1..tau_T:

1. **Trim**: in each task vector keep the k % entries of largest magnitude, zero the rest
   (``trimmed_t``).
2. **Elect**: the sign of each entry is the sign of the sum of the trimmed values,
   ``gamma = sgn(sum_t trimmed_t)`` (the "mass" election: the sign of larger total
   magnitude wins).
3. **Disjoint merge**: average, per entry, only the trimmed values whose sign agrees with
   gamma, ``tau_m[p] = sum_{t in A_p} trimmed_t[p] / |A_p|``, with
   ``A_p = {t : sgn(trimmed_t[p]) = gamma[p]}`` (so zeros never count).

The merged params are ``theta_0 + lam * tau_m``.

What the authors' code does, and clx with it (``src/utils/merge_utils.py`` of
github.com/prateeky2806/ties-merging, and FusionBench's copy
``fusion_bench/method/ties_merging/ties_merging_utils.py`` at commit 54c9e8c; checked):

- **Trim over the whole model, not per leaf.** Each model's task vector is flattened into
  one vector (``state_dict_to_vector``) and ``topk_values_mask`` keeps its top k % over
  that whole vector; so do we (``jax.flatten_util.ravel_pytree`` of the tree).
- **Zero elected signs** (entries whose trimmed sum is exactly 0) take the majority sign,
  ``sgn(sum_p gamma[p])`` over the whole vector (``resolve_zero_signs(..., "majority")``);
  an entry then keeps the values ``> 0`` where gamma > 0 and ``< 0`` elsewhere
  (``torch.where(sign > 0, v > 0, v < 0)``). Both as in the code.
- ``merge="mean"`` is the paper's disjoint mean (``dis-mean``, the README's command);
  ``"sum"`` and ``"max"`` are the code's other aggregations (``max``: the largest agreeing
  magnitude times gamma).

Differences from the authors' code, deliberate: the trim keeps exactly
``n = max(1, floor(d k / 100))`` entries of the d (ties in magnitude broken towards the
earlier entry in ``jax.tree.leaves`` order); ``topk_values_mask`` keeps every entry with
``|x| >=`` the ``(d - floor(d k / 100))``-th smallest magnitude, i.e. ``floor(d k / 100) + 1``
entries plus any ties at the threshold.

Defaults: ``k = 20`` (the authors' README runs ``topk20``; FusionBench's ``threshold: 20``)
and ``merge="mean"`` (the README's ``dis-mean``). For lam the README sweeps ``linear+0.8+2.51+0.1``
(0.8 to 2.5) on validation data. clx's default ``lam = 1.0``: the disjoint mean keeps every
entry at the scale of one task vector, and 1.0 lies in that sweep; it is also the value we
recall the paper recommending without validation data (with k = 20), which could not be
checked here (the paper's text was not reachable): check before quoting it as the paper's.
FusionBench's ``config/method/ties_merging.yaml`` uses
``merge_func: sum`` with ``scaling_factor: 0.3`` and ``threshold: 20``: pass
``merge="sum", lam=0.3`` for that.

The continual form is FusionBench's OPCM baseline ``ContinualTiesMergingForCLIP``
(``fusion_bench/method/opcm/ties_merging.py``, ``config/method/opcm/ties_merging.yaml``:
``scaling_factor 0.5``, ``threshold 20``, ``merge_func sum``): with tau_m^(t) the merged
task vector so far (``theta^(t) - theta_0``),

    first model:  theta^(1) = theta_0 + lam * tau_1,
    later models: theta^(t) = theta^(t-1) + lam * TIES([tau_m^(t-1), tau_t]),

where TIES([a, b]) is trim/elect/disjoint-merge of the two vectors a and b (the already
merged task vector counts as one model; the previous merge is kept and the TIES result is
added on top, as the code does).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from clx.merging._task_vectors import (
    ContinualMerge,
    Params,
    apply_task_vector,
    check_models,
    check_nonnegative,
    check_same_structure,
)
from clx.tree import concrete_float

MERGES = ("mean", "sum", "max")


def _check_k(who: str, k) -> float:
    v = concrete_float(k)
    if v is None:
        raise TypeError(f"{who}: k must be a concrete number (it fixes how many entries the trim keeps), got a tracer.")
    if not (0.0 < v <= 100.0):
        raise ValueError(f"{who}: k is the percentage of entries each task vector keeps, in (0, 100]; got {v}.")
    return v


def _check_merge(who: str, merge: str) -> None:
    if merge not in MERGES:
        raise ValueError(f"{who}: merge must be one of {MERGES}, got {merge!r}; 'mean' is the paper's disjoint mean.")


def num_kept(d: int, k: float) -> int:
    """How many of ``d`` entries the trim keeps at ``k`` percent: ``max(1, floor(d k / 100))``."""
    return max(1, min(d, math.floor(d * k / 100 + 1e-9)))


def trim_top_k(x: jax.Array, k: float) -> jax.Array:
    """``x`` (1-D) with all but its ``num_kept(len(x), k)`` largest-magnitude entries set to 0.

    Ties in magnitude go to the earlier entry (``jax.lax.top_k``'s order).
    """
    n = num_kept(x.shape[0], k)
    _, idx = jax.lax.top_k(jnp.abs(x), n)
    keep = jnp.zeros(x.shape, bool).at[idx].set(True)
    return jnp.where(keep, x, jnp.zeros_like(x))


def elect_and_merge(trimmed: jax.Array, merge: str = "mean") -> jax.Array:
    """TIES's sign election and disjoint merge of trimmed task vectors ``trimmed`` (T, d) -> (d,).

    gamma = sgn(sum_t trimmed_t), zeros set to sgn(sum gamma) (the code's majority rule);
    the entries agreeing with gamma are averaged (``"mean"``, over the agreeing nonzero
    entries, 0 where none), summed (``"sum"``) or the largest magnitude taken times gamma
    (``"max"``).
    """
    _check_merge("elect_and_merge", merge)
    gamma = jnp.sign(jnp.sum(trimmed, axis=0))
    gamma = jnp.where(gamma == 0, jnp.sign(jnp.sum(gamma)), gamma)
    agree = jnp.where(gamma[None] > 0, trimmed > 0, trimmed < 0)
    selected = jnp.where(agree, trimmed, jnp.zeros_like(trimmed))
    if merge == "sum":
        return jnp.sum(selected, axis=0)
    if merge == "max":
        return jnp.max(jnp.abs(selected), axis=0) * gamma
    count = jnp.sum(selected != 0, axis=0)
    return jnp.sum(selected, axis=0) / jnp.maximum(count, 1).astype(selected.dtype)


def ties_task_vector(task_vectors: Sequence[Params], k=20, merge: str = "mean") -> Params:
    """TIES's merged task vector ``tau_m`` (trim over each whole task vector, elect, disjoint merge), unscaled.

    Args:
      task_vectors: a list of one or more task vectors of one structure.
      k: the percentage of each task vector's entries kept, in (0, 100], concrete.
      merge: "mean" (the paper's), "sum" or "max".

    Returns:
      tau_m, shaped and typed like ``task_vectors[0]`` (computed in the promoted dtype).

    Raises:
      TypeError: ``task_vectors`` is not a list/tuple, or ``k`` is traced.
      ValueError: no task vector, ``k`` outside (0, 100], an unknown ``merge``, or trees
        that differ (the first differing leaf is named).
    """
    who = "ties_task_vector"
    task_vectors = check_models(who, task_vectors)
    k = _check_k(who, k)
    _check_merge(who, merge)
    check_same_structure(task_vectors, [f"task_vectors[{i}]" for i in range(len(task_vectors))], who)
    flat0, unravel = ravel_pytree(task_vectors[0])
    flats = jnp.stack([flat0] + [ravel_pytree(tv)[0] for tv in task_vectors[1:]])
    return unravel(_ties_flat(flats, k, merge).astype(flat0.dtype))


@partial(jax.jit, static_argnums=(1, 2))
def _ties_flat(flats: jax.Array, k: float, merge: str) -> jax.Array:
    """Trim each row of ``flats`` (T, d), elect, disjoint-merge: (d,). One compiled program per (shape, k, merge)."""
    return elect_and_merge(jax.vmap(lambda x: trim_top_k(x, k))(flats), merge)


def ties_merging(pretrained: Params, finetuned: Sequence[Params], k=20, lam=1.0, merge: str = "mean") -> Params:
    """TIES-merging: ``theta_0 + lam * tau_m`` with tau_m from :func:`ties_task_vector` (Yadav et al. 2023, Alg. 1).

    Args:
      pretrained: theta_0, a params pytree.
      finetuned: a list of one or more fine-tuned params trees of theta_0's structure.
      k: percentage of each task vector kept by the trim, in (0, 100] (paper: 20).
      lam: the scaling lam >= 0, may be traced (clx default 1.0; FusionBench's config 0.3 with
        ``merge="sum"``).
      merge: "mean" (the paper's disjoint mean), "sum" or "max".

    Returns:
      The merged params, in ``pretrained``'s dtypes.

    Raises:
      TypeError, ValueError: as :func:`ties_task_vector`; also a concrete negative ``lam``.
    """
    who = "ties_merging"
    finetuned = check_models(who, finetuned)
    check_nonnegative(who, "lam", lam)
    check_same_structure(
        [pretrained, *finetuned], ["pretrained"] + [f"finetuned[{i}]" for i in range(len(finetuned))], who
    )
    tvs = [jax.tree.map(jnp.subtract, f, pretrained) for f in finetuned]
    return apply_task_vector(pretrained, ties_task_vector(tvs, k, merge), lam)


class ContinualTIESState(NamedTuple):
    pretrained: Params  # params-shaped: theta_0
    merged: Params  # params-shaped: theta^(t), the merged params after t models
    count: jax.Array  # () int32: t, the models merged so far


def continual_ties_merging(lam=0.5, k=20, merge: str = "sum") -> ContinualMerge:
    """Continual TIES (FusionBench's OPCM baseline): ``theta^(t) = theta^(t-1) + lam TIES([tau_m^(t-1), tau_t])``.

    The first model adds ``lam * tau_1`` untrimmed. Defaults are FusionBench's
    ``config/method/opcm/ties_merging.yaml``: ``lam = 0.5``, ``k = 20``, ``merge = "sum"``.

    Args:
      lam: the scaling lam >= 0 (may be traced).
      k: percentage kept by each trim, in (0, 100], concrete.
      merge: "sum" (FusionBench's continual default), "mean" or "max".

    Returns:
      A :class:`ContinualMerge` named "continual_ties_merging" with state :class:`ContinualTIESState`.

    Raises:
      TypeError: a traced ``k``.
      ValueError: a concrete negative ``lam``, ``k`` outside (0, 100], an unknown ``merge``
        (here); in ``merge_next``, a model whose tree differs from theta_0's.
    """
    who = "continual_ties_merging"
    check_nonnegative(who, "lam", lam)
    k = _check_k(who, k)
    _check_merge(who, merge)

    def init(pretrained):
        return ContinualTIESState(pretrained, pretrained, jnp.zeros((), jnp.int32))

    def merge_next(state, finetuned):
        check_same_structure([state.pretrained, finetuned], ["pretrained", "finetuned"], who)
        tau = jax.tree.map(jnp.subtract, finetuned, state.pretrained)

        def cast(tree):
            return jax.tree.map(lambda x, m: x.astype(jnp.result_type(m)), tree, state.merged)

        def first():
            return cast(tau)

        def later():
            prev = jax.tree.map(jnp.subtract, state.merged, state.pretrained)
            return cast(ties_task_vector([prev, tau], k, merge))

        delta = jax.lax.cond(state.count == 0, first, later)
        merged = jax.tree.map(lambda m, d: (m + lam * d).astype(jnp.result_type(m)), state.merged, delta)
        return ContinualTIESState(state.pretrained, merged, state.count + 1)

    return ContinualMerge(init, merge_next, who)
