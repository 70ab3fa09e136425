"""What the unit-replacing rules (continual backprop, ReDo) share: the hidden layers of an MLP or
a CNN found in the params, the owned optimizer's checks, the bound of a fresh input weight, the
per-unit statistics of a layer's activations, and the reset of a set of units (fresh input
weights, zero input bias, zero outgoing weights, zero optimizer moments) written into the final
updates.

A hidden layer is named by the path of the kernel that produces it (``'layers/0/kernel'``,
``'conv1/kernel'``), and its units are that kernel's last axis: the columns of a Dense (d, m)
kernel, the output channels (feature maps) of a 2-D Conv (kh, kw, c_in, m) kernel. "Next" is the
next 2-D (Dense) or 4-D (Conv) ``.../kernel`` leaf in the params' flatten order (numeric for
``clx.MLP``'s ``layers/0``, ``layers/1``, ..., alphabetical for ``clx.models.LeNet``'s ``conv1``,
``conv2``, ``fc``) that takes the m units; three transitions are recognised (``Hidden.kind``):

- ``"dense"``: Dense (d, m) -> Dense (m, k). Unit i's outgoing weights are row i of the next kernel;
  its activations are column i of the next layer's input tap (N, m).
- ``"conv"``: Conv (kh, kw, c_in, m) -> Conv (kh', kw', m, k). Channel c's outgoing weights are
  ``next[:, :, c, :]``; the next layer's tap is its im2col patch matrix (N P', kh' kw' m)
  (``clx.functional.conv_patches``: columns ordered (window offset, channel), channel fastest),
  so channel c's activations are the columns g m + c, g over the G = kh' kw' window offsets.
- ``"conv_dense"``: Conv (kh, kw, c_in, m) -> (pooling) -> flatten -> Dense (G m, k). The flatten
  of a channels-last (N, H, W, m) map (``x.reshape(N, -1)`` in ``clx.models.LeNet`` / ``AlexNet``)
  puts position p, channel c at index p m + c (positions x channels interleaved, channel fastest),
  so channel c's outgoing weights are the rows p m + c of the next kernel and its activations the
  tap's columns p m + c, p over the G = H W positions. (PyTorch flattens NCHW, channel-major: the
  loss-of-plasticity code's ``num_last_filter_outputs`` rows ``c G + p``.)

In all three the next kernel is viewed as (G, m, k) (``G = 1`` for Dense) and the tap as (R, G, m)
(R examples, or examples x output positions for a Conv next layer); a unit's statistics average
over R and G (:func:`unit_mean`), i.e. over the batch and the spatial positions for a channel.
For a ``"conv"`` layer the positions are weighted as the next layer's windows see them: with
stride 1 and 'VALID' padding a border position enters fewer windows than an interior one, and
'SAME' padding's zeros count; a 1x1 next conv sees each position once (the plain mean).

Normalization layers between a Conv layer and the next (``clx.models.AlexNet``'s batch norm) are
not supported: a Conv layer with m channels in params that hold a 1-D ``scale`` leaf of size m
raises (the loss-of-plasticity ``CBPConv`` resets the channel's batch-norm weight to 1, bias to 0
and running statistics; clx cannot tell from the params which norm follows which layer). Dense
layers are not checked (a norm after a Dense layer keeps its params, as before).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clx.tree import by_path, concrete_float, path_str

#: Bound b of the uniform U(-b, b) a fresh input weight is drawn from, by fan_in d and fan_out m (for a Conv
#: layer d = kh kw c_in and m = kh kw c_out, as torch's and Flax's initializers count them). "kaiming":
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
    """One hidden layer: its units are the last axis of ``kernel`` and, viewed as (G, m, k), axis 1 of ``out``."""

    kernel: str  # path of the (d, m) Dense or (kh, kw, c_in, m) Conv kernel producing the layer
    bias: str | None  # path of its (m,) bias, None without one
    out: str  # path of the next kernel; its input tap holds the layer's activations, (R, G m)
    out_bias: str | None  # path of the next layer's (k,) bias, None without one
    d: int  # fan-in of a unit: d, or kh kw c_in
    m: int  # units: columns, or channels
    kind: str = "dense"  # "dense", "conv" (Conv -> Conv) or "conv_dense" (Conv -> flatten -> Dense)
    groups: int = 1  # G: rows of the next kernel per unit (1; kh' kw' window offsets; H W positions)
    window: int = 1  # kh kw of a Conv layer (its fan-out is window m), 1 for Dense


def check_init(who: str, init, default: str = "") -> None:
    if init is None and default:
        return
    if init not in INIT_BOUNDS:
        none = " or None (the authors' code's bound per layer type)" if default else ""
        raise ValueError(f"{who}: init must be one of {sorted(INIT_BOUNDS)}{none}, got {init!r}.")


def layer_init(init: str | None, h: Hidden, dense_default: str, conv_default: str) -> str:
    """The bound's name for layer ``h``: ``init``, or for None the default of the layer's type."""
    if init is not None:
        return init
    return dense_default if h.kind == "dense" else conv_default


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


def _pair(a: str, b: str, shape_a, shape_b) -> tuple[str, int] | str:
    """(kind, G) when the kernel at ``b`` takes the units of the kernel at ``a``, else the reason it does not."""
    m = shape_a[-1]
    if len(shape_a) == 2 and len(shape_b) == 2 and shape_b[0] == m:
        return "dense", 1
    if len(shape_a) == 4 and len(shape_b) == 4 and shape_b[2] == m:
        return "conv", shape_b[0] * shape_b[1]
    if len(shape_a) == 4 and len(shape_b) == 2 and shape_b[0] % m == 0:
        return "conv_dense", shape_b[0] // m
    what = "Dense layer" if len(shape_a) == 2 else "Conv layer"
    takes = (
        f"a Dense kernel ({m}, k)"
        if len(shape_a) == 2
        else f"a Conv kernel (kh, kw, {m}, k) or a Dense kernel (G x {m}, k) over its flattened (H, W, {m}) maps"
    )
    return (
        f"{a!r} is a {what} with {m} units whose next kernel {b!r} {tuple(shape_b)} does not take them "
        f"(expected {takes})"
    )


def hidden_layers(who: str, params, layers: tuple[str, ...] | None) -> tuple[Hidden, ...]:
    """The hidden layers of ``params`` (all of them, or those named by ``layers``), in flatten order.

    Raises:
      ValueError: a named layer is not a Dense (2-D) or Conv (4-D) kernel of the params, or has no next
        kernel that takes its units (the output layer, a layer before a multi-head ``head``, a Conv
        followed by a layer of another size); a Conv layer with a possible normalization layer after it
        (a 1-D ``scale`` leaf of its channel count); no hidden layer at all.
    """
    flat = by_path(params)
    kernels = [k for k, x in flat.items() if k.endswith("kernel") and jnp.ndim(x) in (2, 4)]
    found, why = {}, {}
    for a, b in zip(kernels, kernels[1:]):
        shape_a, shape_b = tuple(int(s) for s in flat[a].shape), tuple(int(s) for s in flat[b].shape)
        pair = _pair(a, b, shape_a, shape_b)
        if isinstance(pair, str):
            why[a] = pair
            continue
        kind, groups = pair
        bias, out_bias = a[: -len("kernel")] + "bias", b[: -len("kernel")] + "bias"
        window = 1 if len(shape_a) == 2 else shape_a[0] * shape_a[1]
        found[a] = Hidden(
            a,
            bias if bias in flat else None,
            b,
            out_bias if out_bias in flat else None,
            math.prod(shape_a[:-1]),
            shape_a[-1],
            kind,
            groups,
            window,
        )
    if kernels:
        why.setdefault(kernels[-1], f"{kernels[-1]!r} is the last Dense/Conv kernel (an output layer)")
    if layers is None:
        if not found:
            raise ValueError(
                f"{who}: the params have no hidden Dense layer or Conv layer (a 2-D kernel (d, m) followed by "
                f"(m, k), or a 4-D Conv kernel (kh, kw, c_in, m) followed by a Conv or a Dense layer that takes its "
                f"m channels); kernels found: {kernels}. The rule replaces the hidden units of an MLP or a CNN."
            )
        chosen = tuple(found.values())
    else:
        missing = [s for s in layers if s not in found]
        if missing:
            reasons = "; ".join(
                why.get(s, f"{s!r} is no 2-D (Dense) or 4-D (Conv) kernel of the params") for s in missing
            )
            raise ValueError(
                f"{who}: layers {missing} are not hidden Dense layers or Conv layers of the model ({reasons}); "
                f"choose among {sorted(found)} (the kernel path of a layer followed by another layer that takes its "
                "units; a layer before a multi-head head and 1-D/3-D convolutions are not supported)."
            )
        chosen = tuple(found[s] for s in layers)
    for h in chosen:
        if h.kind == "dense":
            continue
        norms = [k for k, x in flat.items() if k.endswith("scale") and jnp.shape(x) == (h.m,)]
        if norms:
            raise ValueError(
                f"{who}: Conv layer {h.kernel!r} has {h.m} channels and the params hold normalization scales of that "
                f"size ({norms}); clx does not reset a normalization layer's per-channel params (the authors' CBPConv "
                "resets batch norm's weight to 1, bias to 0 and its running statistics). Use a model without "
                "normalization between its Conv layers (e.g. clx.models.LeNet), or pass layers= naming only the "
                "Dense layers to act on."
            )
    return chosen


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


def tap_units(h: Hidden, x):
    """The tap (R, G m) of the layer's next kernel as (R, G, m): unit c's activations at [:, :, c]."""
    return x if h.groups == 1 else x.reshape(-1, h.groups, h.m)


def out_units(h: Hidden, w):
    """The next kernel viewed as (G, m, k): unit c's outgoing weights at [:, c, :] ((m, k) for G = 1)."""
    return w.reshape(h.m, -1) if h.groups == 1 else w.reshape(h.groups, h.m, -1)


def unit_mean(h: Hidden, x):
    """(m,) mean of the tap ``x`` (R, G m) over the rows and the G groups (batch and positions)."""
    return jnp.mean(x, axis=0) if h.groups == 1 else jnp.mean(tap_units(h, x), axis=(0, 1))


def contribution(h: Hidden, a, w):
    """(m,) the contribution utility's term from ``a`` (R, G m) >= 0 (|h| or |h - f|) and the next kernel ``w``.

    ``"dense"``: ``mean_n a_ni mean_k |w_ik|`` (gnt.py). ``"conv"``: ``mean_{n,g} a mean_{g,k} |w|``, the product of
    the channel's means (convGnT.py ``update_utility``: ``features.abs().mean(dim=(0, 2, 3))`` times
    ``weight.abs().mean(dim=(0, 2, 3))``). ``"conv_dense"``: the mean over the G positions of the per-row products
    ``mean_n a_{n,p,c} mean_k |w_{(p,c),k}|`` (convGnT.py's ``.view(-1, num_last_filter_outputs).mean(dim=1)``).
    """
    if h.groups == 1:
        return jnp.mean(a, axis=0) * jnp.mean(jnp.abs(out_units(h, w)), axis=1)
    a, w = tap_units(h, a), jnp.abs(out_units(h, w))
    if h.kind == "conv":
        return jnp.mean(a, axis=(0, 1)) * jnp.mean(w, axis=(0, 2))
    return jnp.mean(jnp.mean(a, axis=0) * jnp.mean(w, axis=2), axis=0)


def summed_out(h: Hidden, w):
    """(m, k) each unit's outgoing weights summed over its G rows: what a constant activation 1 of it adds."""
    return out_units(h, w) if h.groups == 1 else jnp.sum(out_units(h, w), axis=0)


def fresh_inputs(key, h: Hidden, sel: Selection, init: str, dtype):
    """Fresh input weights of the selected units, U(-b, b): (d, K) for K slots, (d, m) for a mask.

    b is ``INIT_BOUNDS[init](d, window m)`` (fan-in d = kh kw c_in and fan-out kh kw c_out for a Conv).
    Unit j's column (for a Conv, its (kh, kw, c_in) filter flattened in the kernel's order) is drawn
    from ``fold_in(key, j)`` alone, so it does not depend on the number of slots (a concrete or a
    traced rate) or on which slot holds the unit.
    """
    units = jnp.arange(h.m) if sel.index is None else sel.index
    b = INIT_BOUNDS[init](h.d, h.window * h.m)
    cols = jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j), (h.d,), dtype, -b, b))(units)
    return cols.T


def _put_in(x, sel, new):
    """The kernel ``x`` with the selected units (its last axis) set to ``new`` (d, K) / (d, m) or a scalar."""
    if jnp.ndim(new):
        new = new.reshape(x.shape[:-1] + (-1,))
    return _put(x, x.ndim - 1, sel, new)


def _take_out(h, x, sel):
    return _take(out_units(h, x), 0 if h.groups == 1 else 1, sel)


def _put_out(h, x, sel, new):
    """The next kernel ``x`` with the selected units' outgoing weights set to ``new`` (shaped as ``_take_out``)."""
    return _put(out_units(h, x), 0 if h.groups == 1 else 1, sel, new).reshape(x.shape)


def reset_units(steps, params, inner, layers, selections, fresh, absorb=None):
    """Writes the resets of ``selections`` into the final ``steps`` and zeroes the optimizer's moments.

    For each hidden layer (in order; a later layer's reset overwrites an earlier one's where they meet):
    the selected units' input weights (a Conv channel's whole filter ``kernel[..., c]``) become ``fresh``,
    their input bias 0, their outgoing weights (every one of their G rows of the next kernel) 0, as steps
    ``new - theta`` (entries not selected keep the optimizer's step bit for bit); ``absorb[i]`` (k,) or None
    is added to the next layer's bias step. Every params-shaped subtree of the optimizer state ``inner``
    (Adam's mu and nu, momentum's trace, ...) gets 0 at the input weights, input bias and outgoing weights
    of the selected units; its other leaves (step counts) are kept.
    """
    flat_steps = by_path(steps)
    flat_params = by_path(params)
    for i, (h, sel) in enumerate(zip(layers, selections)):
        u, p = flat_steps[h.kernel], flat_params[h.kernel]
        flat_steps[h.kernel] = _put_in(
            u, sel, fresh[i].reshape(_take(p, p.ndim - 1, sel).shape) - _take(p, p.ndim - 1, sel)
        )
        if h.bias is not None:
            flat_steps[h.bias] = _put(flat_steps[h.bias], 0, sel, -_take(flat_params[h.bias], 0, sel))
        flat_steps[h.out] = _put_out(h, flat_steps[h.out], sel, -_take_out(h, flat_params[h.out], sel))
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
            flat[h.kernel] = _put_in(flat[h.kernel], sel, jnp.zeros((), flat[h.kernel].dtype))
            if h.bias is not None:
                flat[h.bias] = _put(flat[h.bias], 0, sel, jnp.zeros((), flat[h.bias].dtype))
            flat[h.out] = _put_out(h, flat[h.out], sel, jnp.zeros((), flat[h.out].dtype))
        return jax.tree.unflatten(treedef, [flat[k] for k in paths])

    new_inner = jax.tree.map(zero_moments, inner, is_leaf=params_like)
    return new_steps, new_inner
