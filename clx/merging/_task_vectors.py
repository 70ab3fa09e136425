"""Task vectors and what every merge shares: the tree check, the argument checks and the
continual-merge interface.

A task vector (Ilharco et al. 2023, "Editing Models with Task Arithmetic", Sec. 2) is the
difference ``tau = theta_ft - theta_0`` between a fine-tuned model's params and the
pre-trained params it started from, leaf by leaf. Every function here works on any pytree
of arrays (dicts, lists, NamedTuples, ``nnx.State``); all trees handed to one call must have
the same structure and leaf shapes (checked, the first differing leaf named).

A continual merge (the merges that take the models one at a time: continual task
arithmetic, continual TIES, continual weight average, OPCM) is a :class:`ContinualMerge`,
a pair of pure functions over a NamedTuple state with a ``merged`` field (the merged params
so far):

    merger = clx.merging.opcm(alpha=0.5)
    state = merger.init(pretrained)
    for finetuned in stream:                   # or jax.lax.scan over stacked models
        state = merger.merge_next(state, finetuned)
    state.merged                               # the merged params

``merge_sequence`` (a Python loop) and ``merge_scan`` (``jax.lax.scan`` over models stacked
on a leading axis) run that loop.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx.tree import check_nonnegative, concrete_float, path_str  # noqa: F401 (check_nonnegative re-exported)

Params = Any


# --- checks -----------------------------------------------------------------------------------------------------------


def _leaves_with_paths(tree):
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def check_same_structure(trees: Sequence[Params], names: Sequence[str] | None = None, who: str = "merging") -> None:
    """Raises ValueError unless every tree in ``trees`` has the structure and leaf shapes of ``trees[0]``.

    The message names the first leaf (in ``jax.tree.leaves`` order, as a ``clx.tree.path_str``
    path such as ``'layers/0/kernel'``) where a tree differs and what differs: a leaf missing
    or extra, a different path at that position, or a different shape. Shapes are static,
    so the check runs at trace time inside ``jit`` too. Dtypes are not compared (a merge
    computes in the promoted dtype and returns ``trees[0]``'s dtypes).

    Args:
      trees: two or more pytrees (fewer: nothing to compare, no error).
      names: a name per tree for the message (default ``tree 0``, ``tree 1``, ...).
      who: the function named in the message.
    """
    trees = list(trees)
    if names is None:
        names = [f"tree {i}" for i in range(len(trees))]
    ref = _leaves_with_paths(trees[0])
    ref_def = jax.tree.structure(trees[0])
    for tree, name in zip(trees[1:], names[1:]):
        other = _leaves_with_paths(tree)
        for i in range(max(len(ref), len(other))):
            if i >= len(other):
                raise ValueError(
                    f"{who}: {name} has no leaf '{path_str(ref[i][0])}' ({names[0]} has it, shape "
                    f"{jnp.shape(ref[i][1])}); every model must have the params tree of {names[0]}."
                )
            if i >= len(ref):
                raise ValueError(
                    f"{who}: {name} has an extra leaf '{path_str(other[i][0])}' that {names[0]} lacks; every model "
                    f"must have the params tree of {names[0]}."
                )
            (p_ref, x_ref), (p_other, x_other) = ref[i], other[i]
            if p_ref != p_other:
                raise ValueError(
                    f"{who}: leaf {i} is '{path_str(p_ref)}' in {names[0]} but '{path_str(p_other)}' in {name}; "
                    f"every model must have the params tree of {names[0]}."
                )
            if jnp.shape(x_ref) != jnp.shape(x_other):
                raise ValueError(
                    f"{who}: leaf '{path_str(p_ref)}' has shape {jnp.shape(x_ref)} in {names[0]} but "
                    f"{jnp.shape(x_other)} in {name}; every model must have the params tree of {names[0]}."
                )
        if jax.tree.structure(tree) != ref_def:  # same paths and shapes, different containers (dict vs FrozenDict ...)
            raise ValueError(
                f"{who}: {name} has the leaves of {names[0]} in a different container structure "
                f"({jax.tree.structure(tree)} vs {ref_def})."
            )


def check_models(who: str, finetuned) -> list:
    """``finetuned`` as a list of one or more models; ValueError for none, TypeError for a lone tree."""
    if not isinstance(finetuned, (list, tuple)):
        raise TypeError(
            f"{who}: finetuned must be a list or tuple of params trees (one per fine-tuned model), got "
            f"{type(finetuned).__name__}; wrap a single model as [model]."
        )
    if len(finetuned) < 1:
        raise ValueError(f"{who}: needs at least one fine-tuned model, got none.")
    return list(finetuned)


def check_open_unit(who: str, name: str, value) -> None:
    """Raises ValueError for a concrete value outside the open interval (0, 1); a traced value passes."""
    v = concrete_float(value)
    if v is not None and not (0.0 < v < 1.0):
        raise ValueError(f"{who}: {name} must be in (0, 1), got {v}; pass a value strictly between 0 and 1.")


# --- task vectors -----------------------------------------------------------------------------------------------------


def task_vector(finetuned: Params, pretrained: Params) -> Params:
    """The task vector ``tau = finetuned - pretrained``, leaf by leaf (Ilharco et al. 2023, Sec. 2).

    Shapes and dtypes: every leaf of the result has the shape of both inputs and the
    promoted dtype of the pair (the fine-tuned leaf's dtype when both agree).

    Raises:
      ValueError: the trees differ (the first differing leaf is named).
    """
    check_same_structure([pretrained, finetuned], ["pretrained", "finetuned"], "task_vector")
    return jax.tree.map(jnp.subtract, finetuned, pretrained)


def apply_task_vector(pretrained: Params, tv: Params, scale=1.0) -> Params:
    """``pretrained + scale * tv``, leaf by leaf, in ``pretrained``'s dtypes.

    ``scale`` may be traced (a swept value); a concrete negative ``scale`` is allowed (task
    negation, Ilharco et al. 2023, Sec. 3).

    Raises:
      ValueError: the trees differ (the first differing leaf is named).
    """
    check_same_structure([pretrained, tv], ["pretrained", "task vector"], "apply_task_vector")
    return jax.tree.map(lambda p, t: (p + scale * t).astype(jnp.result_type(p)), pretrained, tv)


def tree_sum(trees: Sequence[Params]) -> Params:
    """The leafwise sum of one or more trees of one structure, added left to right."""
    return jax.tree.map(lambda *xs: sum(xs[1:], xs[0]), *trees)


def tree_norm(tree: Params) -> jax.Array:
    """The Euclidean norm of all leaves together (the tree as one flat vector), a float32 scalar."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


# --- the continual-merge interface ------------------------------------------------------------------------------------


class ContinualMerge(NamedTuple):
    """A merge that takes fine-tuned models one at a time.

    Attributes:
      init: ``init(pretrained) -> state``; the state is a NamedTuple of arrays with a
        ``merged`` field, the merged params so far (the pre-trained params before any model).
      merge_next: ``merge_next(state, finetuned) -> state``, pure and jit-able (the step count
        lives in the state, so ``jax.lax.scan`` can run it over stacked models).
      name: for error messages.
    """

    init: Callable[[Params], Any]
    merge_next: Callable[[Any, Params], Any]
    name: str = ""


def merge_sequence(merger: ContinualMerge, pretrained: Params, finetuned: Sequence[Params]):
    """Runs ``merger`` over a list of fine-tuned models in order (a Python loop of one jitted
    ``merge_next``, compiled once for all models); returns the final state."""
    finetuned = check_models(merger.name or "merge_sequence", finetuned)
    state = merger.init(pretrained)
    step = jax.jit(merger.merge_next)
    for model in finetuned:
        state = step(state, model)
    return state


def merge_scan(merger: ContinualMerge, pretrained: Params, stacked: Params):
    """Runs ``merger`` over models stacked on a leading axis (``jax.lax.scan``); returns the final state.

    ``stacked`` has the params structure, every leaf with a leading axis of length T >= 1
    (``jax.tree.map(lambda *xs: jnp.stack(xs), *models)``).

    Raises:
      ValueError: a leaf without the leading axis, leading axes of different lengths, or
        T = 0.
    """
    who = merger.name or "merge_scan"
    lengths = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(stacked)}
    if None in lengths or len(lengths) != 1:
        raise ValueError(
            f"{who}: every leaf of the stacked models needs one leading model axis, got lengths {lengths}."
        )
    if lengths == {0}:
        raise ValueError(f"{who}: needs at least one fine-tuned model, got a stack of 0.")

    def body(state, model):
        return merger.merge_next(state, model), None

    state, _ = jax.lax.scan(body, merger.init(pretrained), stacked)
    return state
