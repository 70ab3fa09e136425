"""Pieces every member of the gradient-projection family shares (GPM, and SGP,
TRGP, Adam-NSCL, ... as they join): which kernels are projected, per-layer values of
a hyperparameter, and the cheaper of two exact ways to apply a projector."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import checkify

from clx import subspace as sub
from clx.tree import concrete, path_str


def kernel_paths(params, layers: Sequence[str] | None = None, *, who: str = "projection") -> list[tuple[str, tuple]]:
    """The Dense (2-D) and Conv (4-D) ``kernel`` leaves to project, as ``[(path, (d, m))]`` in flattening order.

    The shape returned is the kernel's matrix shape: ``(d_in, d_out)`` for a Dense
    kernel; ``(k_h * k_w * c_in, c_out)`` for a Conv kernel (k_h, k_w, c_in,
    c_out), the rows of ``kernel.reshape(d, c_out)``, which is what the layer's
    im2col patches (``clx.functional.conv_patches``) multiply. So ``d`` is always
    the dimension of the layer's input space (its subspace lives in R^d).

    Args:
      params: the params pytree.
      layers: kernel paths to keep (in this order), e.g. ``['layers/0/kernel']``;
        None: every 2-D or 4-D leaf named ``kernel`` (all Dense and 2-D Conv
        layers; 3-D leaves, such as ``clx.MultiHead``'s stacked heads, are never
        taken), in the order ``jax.tree_util`` flattens the params (sorted keys).
      who: the rule's name, for error messages.

    Raises:
      ValueError: an unknown or non-2-D/4-D path in ``layers``; params without such kernels.
    """
    kernels = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = path_str(path)
        if key.split("/")[-1] == "kernel" and jnp.ndim(leaf) in (2, 4):
            shape = tuple(leaf.shape)
            kernels.append((key, (math.prod(shape[:-1]), shape[-1])))
    if layers is None:
        chosen = kernels
    else:
        known = dict(kernels)
        unknown = [p for p in layers if p not in known]
        if unknown:
            raise ValueError(
                f"{who}: layers {unknown} are not 2-D kernels (Dense) or 4-D kernels (Conv) of the params; "
                f"known: {sorted(known)}."
            )
        chosen = [(p, known[p]) for p in layers]
    if not chosen:
        raise ValueError(f"{who}: the params have no 2-D (Dense) or 4-D (Conv) 'kernel' leaves to project.")
    return chosen


def check_per_layer(value, check: Callable[[Any], Any]):
    """Checks a per-layer hyperparameter given as a value, a sequence or a dict
    (not a function of the task: that is checked by :func:`per_layer` when called
    with a concrete task index). Returns it normalised (tuples for sequences)."""
    if callable(value):
        return value
    if isinstance(value, dict):
        return {k: check(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(check(v) for v in value)
    return check(value)


def per_layer(
    value, paths: list[str], task_id, check: Callable[[Any], Any], *, who: str = "projection", what: str = "threshold"
) -> list:
    """One value per projected layer, in the order of ``paths``.

    Args:
      value: a float for every layer; a sequence with one value per path; a dict
        from path to value; or a function of the task index returning any of these.
      paths: the projected kernel paths.
      task_id: the task index (int or traced int32 scalar) passed to a function ``value``.
      check: validates one concrete value (e.g. ``clx.subspace.check_threshold``);
        skipped for values computed from a traced task index.
      who, what: the rule's and the hyperparameter's names, for error messages.

    Raises:
      ValueError: a sequence of the wrong length, a dict missing a path, a value
        that fails ``check``.
    """
    if callable(value):
        value = value(task_id)
        if concrete(task_id) is not None:
            value = jax.tree.map(check, value)
    if isinstance(value, dict):
        missing = [p for p in paths if p not in value]
        if missing:
            raise ValueError(f"{who}: {what} dict has no entry for layers {missing}.")
        return [value[p] for p in paths]
    if isinstance(value, (list, tuple)):
        if len(value) != len(paths):
            raise ValueError(
                f"{who}: {len(value)} {what}s given for {len(paths)} projected layers {paths}; "
                "give one per layer or a single float."
            )
        return list(value)
    return [value] * len(paths)


def project_kernel(g: jax.Array, q: jax.Array, x: jax.Array | None = None, delta: jax.Array | None = None) -> jax.Array:
    """``Q g`` for a kernel gradient g and a (d, d) projector Q, by the cheaper exact route.

    ``g`` is a Dense kernel's (d, m) gradient, or a Conv kernel's (k_h, k_w, c_in,
    c_out) gradient, projected as its (d, m) = (k_h k_w c_in, c_out) matrix and
    returned in the kernel's shape. With the layer's inputs ``x`` (N, d) (a Conv's
    im2col patches, N = batch x positions) and output gradients ``delta`` (N, m)
    (the trainer's taps; ``g = x^T delta``), ``(x Q)^T delta`` costs
    2 N d^2 + 2 N d m FLOPs against 2 d^2 m for ``Q g``: at batch 10 on a
    784-input layer ten times fewer; on a conv layer N is large and ``Q g``
    usually wins. The choice is made from static shapes.
    Products run at full float32 precision (``clx.subspace.matmul``).

    Returns:
      g's shape and dtype.
    """
    q = q.astype(g.dtype)
    shape = g.shape
    g2 = g.reshape(-1, shape[-1]) if g.ndim != 2 else g
    d, m = g2.shape
    if x is not None and delta is not None:
        n = x.shape[0]
        if 2 * n * d * d + 2 * n * d * m < 2 * d * d * m:
            # einsum contracts N without materialising (X Q)^T (2.7x faster on CPU than .T @).
            xq = sub.matmul(x.astype(g.dtype), q)
            out = jnp.einsum("nd,nm->dm", xq, delta.astype(g.dtype), precision=sub.HIGHEST).astype(g.dtype)
            return out.reshape(shape)
    return sub.matmul(q, g2).reshape(shape)


def check_kernel_shape(who: str, path, g, d: int, x=None) -> None:
    """Raises (at trace time) if a kernel gradient ``g`` at ``path`` is not (d, m) (Dense) or
    (k_h, k_w, c_in, m) with k_h k_w c_in = d (Conv) for the state's subspace of R^d,
    or the layer's tapped inputs ``x`` are not (N, d).

    Raises:
      ValueError: names the rule, the parameter path (``jax.tree_util.keystr``) and both shapes.
    """
    if jnp.ndim(g) not in (2, 4) or math.prod(jnp.shape(g)[:-1]) != d:
        raise ValueError(
            f"{who}: the gradient of {jax.tree_util.keystr(tuple(path))} has shape {jnp.shape(g)} but the rule's "
            f"state for it is a subspace of R^{d} (projector ({d}, {d})), so it needs shape ({d}, m) or, for a "
            f"conv kernel, (k_h, k_w, c_in, m) with k_h k_w c_in = {d}; was the state built by init on other params?"
        )
    if x is not None and (jnp.ndim(x) != 2 or x.shape[1] != d):
        raise ValueError(
            f"{who}: the layer inputs of {jax.tree_util.keystr(tuple(path))} have shape {jnp.shape(x)} but the "
            f"rule's state for it needs (N, {d})."
        )


def check_adam(who: str, b1, b2, eps) -> None:
    """ValueError unless Adam's decay rates are in [0, 1) and its eps >= 0 (the rules that own an Adam)."""
    for what, v in (("b1", b1), ("b2", b2)):
        if not 0.0 <= float(v) < 1.0:
            raise ValueError(f"{who}: {what} must be in [0, 1), got {v}.")
    if not float(eps) >= 0:
        raise ValueError(f"{who}: eps must be >= 0, got {eps}.")


def check_finite(who: str, what: str, a) -> None:
    """Raises ValueError if a concrete array holds NaN/inf; under tracing, a ``checkify`` check (reported
    under ``checkify.checkify``, dropped otherwise: the trainer checks the evidence itself)."""
    if isinstance(a, jax.core.Tracer):
        checkify.debug_check(jnp.all(jnp.isfinite(a)), f"{who}: {what} holds NaN or inf")
        return
    if not bool(jnp.all(jnp.isfinite(a))):
        raise ValueError(
            f"{who}: {what} holds NaN or inf ({int(jnp.sum(~jnp.isfinite(a)))} entries); its subspace would "
            "silently get rank 0. Check the inputs and the params."
        )


def check_num_samples(value, who: str = "projection"):
    """Checks a per-layer ``num_samples`` (an int >= 1, a sequence of them, or a dict from kernel path to one;
    not a function: the column count must be static). Returns it normalised (ints; tuples for sequences).

    Raises:
      ValueError: a callable, or a value that is not an integer >= 1.
    """
    if callable(value):
        raise ValueError(f"{who}: num_samples must be an int, a sequence or a dict (static), not a function.")

    def check(v):
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise ValueError(f"{who}: num_samples must be integers >= 1, got {v!r}.")
        return int(v)

    return check_per_layer(value, check)


def example_columns(rep: jax.Array, num_examples: int, num_samples: int, *, who: str, path: str) -> jax.Array:
    """The columns of the first ``num_samples`` examples of a representation matrix ``rep`` (d, num_examples * P).

    A Dense layer has P = 1 column per example, a Conv layer one per output position
    (its im2col patches, example-major: ``clx.functional.conv_patches``), so the
    first ``num_samples * P`` columns are the first ``num_samples`` examples'. GPM's
    authors count a conv layer's samples in examples too (``batch_list`` in their
    ``main_cifar100.py``: 24 examples for AlexNet's conv1, 100 for conv2/conv3, 125
    for the fc layers).

    Raises:
      ValueError: ``rep``'s column count is not a multiple of ``num_examples``, or
        fewer than ``num_samples`` examples.
    """
    cols = rep.shape[1]
    if num_examples < 1 or cols % num_examples:
        raise ValueError(
            f"{who}: representation of {path!r} has {cols} columns, not a multiple of the evidence's "
            f"{num_examples} examples (one column per example and output position)."
        )
    if num_examples < num_samples:
        raise ValueError(
            f"{who}: representation of {path!r} has {num_examples} examples but num_samples={num_samples}; "
            "collect a larger evidence sample or lower num_samples."
        )
    return rep[:, : num_samples * (cols // num_examples)]
