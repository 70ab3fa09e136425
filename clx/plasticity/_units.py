"""What the unit-replacing rules (continual backprop, ReDo) share: the hidden layers of an MLP
found in the params, the owned optimizer's checks, the bound of a fresh input weight, and the
reset of a set of units (fresh input weights, zero input bias, zero outgoing weights, zero
optimizer moments) written into the final updates.

A hidden layer is named by the path of the kernel that produces it (``'layers/0/kernel'``):
its units are that (d, m) kernel's columns; their activations ``h`` are the input of the next
Dense kernel (m, k), whose rows are the units' outgoing weights. "Next" is the next 2-D
``.../kernel`` leaf in the params' flatten order (numeric for ``clx.MLP``'s ``layers/0``,
``layers/1``, ...) whose input size is m.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clx.tree import concrete_float, path_str

#: Bound b of the uniform U(-b, b) a fresh input weight is drawn from, by fan_in d and fan_out m. "kaiming":
#: the loss-of-plasticity code's default (``gnt.py`` ``compute_bounds``, ``cbp_linear.py`` ``get_layer_bound``:
#: calculate_gain('relu') sqrt(3 / d)); "torch": PyTorch's Linear default (clx.MLP's "torch" init); "lecun":
#: sqrt(3 / d); "xavier": Glorot uniform sqrt(6 / (d + m)), the ReDo code's ``nn.initializers.xavier_uniform()``.
INIT_BOUNDS = {
    "kaiming": lambda d, m: math.sqrt(2.0) * math.sqrt(3.0 / d),
    "torch": lambda d, m: math.sqrt(1.0 / d),
    "lecun": lambda d, m: math.sqrt(3.0 / d),
    "xavier": lambda d, m: math.sqrt(6.0 / (d + m)),
}


class Hidden(NamedTuple):
    """One hidden layer: its units are the columns of ``kernel`` and the rows of ``out``."""

    kernel: str  # path of the (d, m) kernel producing the layer
    bias: str | None  # path of its (m,) bias, None without one
    out: str  # path of the next (m, k) kernel; its input tap is the layer's activation h (N, m)
    out_bias: str | None  # path of the next layer's (k,) bias, None without one
    d: int
    m: int


def check_init(who: str, init: str) -> None:
    if init not in INIT_BOUNDS:
        raise ValueError(f"{who}: init must be one of {sorted(INIT_BOUNDS)}, got {init!r}.")


def check_count(who: str, name: str, value) -> None:
    """ValueError for a concrete value that is not an integer >= 1; a traced sweep value passes."""
    v = concrete_float(value)
    if v is not None and (v < 1 or v != int(v)):
        raise ValueError(f"{who}: {name} must be an integer >= 1, got {value!r}.")


def normalize_layers(who: str, layers) -> tuple[str, ...] | None:
    """``layers`` as a tuple of kernel paths (a module path ``'layers/0'`` gets ``'/kernel'``), or None."""
    if layers is None:
        return None
    if isinstance(layers, str) or not all(isinstance(s, str) for s in layers):
        raise TypeError(f"{who}: layers must be a sequence of kernel paths like ('layers/0/kernel',), got {layers!r}.")
    out = tuple(s if s.endswith("kernel") else s.rstrip("/") + "/kernel" for s in layers)
    if not out:
        raise ValueError(f"{who}: layers is empty; pass None for every hidden layer or name at least one.")
    return out


def hidden_layers(who: str, params, layers: tuple[str, ...] | None) -> tuple[Hidden, ...]:
    """The hidden layers of ``params`` (all of them, or those named by ``layers``), in flatten order.

    Raises:
      ValueError: a named layer is not a 2-D kernel of the params or has no next Dense kernel of
        matching input size (the last Dense layer, a layer before a multi-head ``head``, a Conv);
        no hidden layer at all.
    """
    flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    kernels = [k for k, x in flat.items() if k.endswith("kernel") and jnp.ndim(x) == 2]
    found = {}
    for a, b in zip(kernels, kernels[1:]):
        (d, m), (mb, _) = flat[a].shape, flat[b].shape
        if m == mb:
            bias, out_bias = a[: -len("kernel")] + "bias", b[: -len("kernel")] + "bias"
            found[a] = Hidden(
                a, bias if bias in flat else None, b, out_bias if out_bias in flat else None, int(d), int(m)
            )
    if layers is None:
        if not found:
            raise ValueError(
                f"{who}: the params have no hidden Dense layer (two consecutive 2-D kernels (d, m), (m, k)); "
                f"kernels found: {kernels}. The rule replaces the hidden units of an MLP."
            )
        return tuple(found.values())
    missing = [s for s in layers if s not in found]
    if missing:
        raise ValueError(
            f"{who}: layers {missing} are not hidden Dense layers of the model; choose among {sorted(found)} "
            "(the kernel path of a layer followed by another Dense layer; Conv layers and a layer before a "
            "multi-head head are not supported)."
        )
    return tuple(found[s] for s in layers)


def need_taps(who: str, layer_inputs, layers: tuple[Hidden, ...]) -> None:
    if layer_inputs is None:
        raise ValueError(
            f"{who}: update needs layer_inputs= (it declares the 'taps' need); call "
            "update(grads, state, params, layer_inputs=..., key=...) as the clx trainer does."
        )
    for h in layers:
        if h.out not in layer_inputs:
            raise ValueError(
                f"{who}: layer_inputs has no tap {h.out!r}, the activation of hidden layer {h.kernel!r}; "
                f"taps: {sorted(layer_inputs)}."
            )


class Selection(NamedTuple):
    """Which units of one hidden layer are reset: either K slots ``index`` (K,) int32 with ``valid`` (K,) bool
    (continual backprop), or ``index`` None and ``valid`` a (m,) bool mask (ReDo)."""

    index: jax.Array | None
    valid: jax.Array


def _take(x, axis, sel):
    return x if sel.index is None else jnp.take(x, sel.index, axis=axis)


def _put(x, axis, sel, new):
    """``x`` with the selected units along ``axis`` set to ``new`` (shaped like ``_take(x, axis, sel)``)."""
    if sel.index is None:
        shape = [1] * x.ndim
        shape[axis] = -1
        return jnp.where(sel.valid.reshape(shape), new, x)
    shape = [1] * x.ndim
    shape[axis] = -1
    kept = jnp.take(x, sel.index, axis=axis)
    vals = jnp.where(sel.valid.reshape(shape), new, kept).astype(x.dtype)
    index = (slice(None),) * axis + (sel.index,)
    return x.at[index].set(vals, unique_indices=True)


def fresh_inputs(key, h: Hidden, sel: Selection, init: str, dtype):
    """Fresh input weights of the selected units, U(-b, b): (d, K) for K slots, (d, m) for a mask.

    Unit j's column is drawn from ``fold_in(key, j)`` alone, so it does not depend on the number of
    slots (a concrete or a traced rate) or on which slot holds the unit.
    """
    units = jnp.arange(h.m) if sel.index is None else sel.index
    b = INIT_BOUNDS[init](h.d, h.m)
    cols = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j), (h.d,), dtype, -b, b))(units)
    return cols.T


def reset_units(steps, params, inner, layers, selections, fresh, absorb=None):
    """Writes the resets of ``selections`` into the final ``steps`` and zeroes the optimizer's moments.

    For each hidden layer (in order; a later layer's reset overwrites an earlier one's where they meet):
    the selected units' input weights become ``fresh``, their input bias 0, their outgoing weights 0,
    as steps ``new - theta`` (entries not selected keep the optimizer's step bit for bit); ``absorb[i]``
    (k,) or None is added to the next layer's bias step. Every params-shaped subtree of the optimizer
    state ``inner`` (Adam's mu and nu, momentum's trace, ...) gets 0 at the input weights, input bias and
    outgoing weights of the selected units; its other leaves (step counts) are kept.
    """
    flat_steps = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(steps)[0]}
    flat_params = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    for i, (h, sel) in enumerate(zip(layers, selections)):
        u, p = flat_steps[h.kernel], flat_params[h.kernel]
        flat_steps[h.kernel] = _put(u, 1, sel, fresh[i] - _take(p, 1, sel))
        if h.bias is not None:
            flat_steps[h.bias] = _put(flat_steps[h.bias], 0, sel, -_take(flat_params[h.bias], 0, sel))
        flat_steps[h.out] = _put(flat_steps[h.out], 0, sel, -_take(flat_params[h.out], 0, sel))
        if absorb is not None and absorb[i] is not None and h.out_bias is not None:
            ub = flat_steps[h.out_bias]
            flat_steps[h.out_bias] = jnp.where(jnp.any(sel.valid), ub + absorb[i].astype(ub.dtype), ub)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    treedef = jax.tree.structure(params)
    new_steps = jax.tree.unflatten(treedef, [flat_steps[k] for k in paths])

    shapes = [jnp.shape(x) for x in jax.tree.leaves(params)]

    def params_like(node):
        if isinstance(node, jax.Array) or not jax.tree.leaves(node):
            return False
        try:
            return jax.tree.structure(node) == treedef and [jnp.shape(x) for x in jax.tree.leaves(node)] == shapes
        except Exception:  # noqa: BLE001 (a node that is no pytree of arrays)
            return False

    def zero_moments(node):
        if not params_like(node):
            return node
        flat = dict(zip(paths, jax.tree.leaves(node)))
        for h, sel in zip(layers, selections):
            flat[h.kernel] = _put(flat[h.kernel], 1, sel, jnp.zeros((), flat[h.kernel].dtype))
            if h.bias is not None:
                flat[h.bias] = _put(flat[h.bias], 0, sel, jnp.zeros((), flat[h.bias].dtype))
            flat[h.out] = _put(flat[h.out], 0, sel, jnp.zeros((), flat[h.out].dtype))
        return jax.tree.unflatten(treedef, [flat[k] for k in paths])

    new_inner = jax.tree.map(zero_moments, inner, is_leaf=params_like)
    return new_steps, new_inner
