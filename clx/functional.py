"""Flax NNX models as pure functions, with the Dense- and Conv-layer taps rules need.

``FunctionalModel.from_module(module)`` splits an NNX module once (``nnx.split``)
into a static graph and a params pytree (plain nested dicts of arrays), and gives

- ``apply(params, x, task_id) -> logits``, a pure function for jit/grad/vmap;
- ``apply_with_taps(params, x, task_id, perturbations=None)``, which also returns
  the inputs of every ``nnx.Linear`` and ``nnx.Conv`` layer, keyed by the path of
  its kernel in ``params`` (``'layers/0/kernel'``). Adding ``perturbations``
  (zeros, one per layer, shaped like the layer's pre-bias output flattened to
  (N, m)) and differentiating with respect to them yields the gradient of the loss
  with respect to each layer's output ``delta``, so a kernel gradient factors as
  ``g = X^T delta``. Rules that project the input space (GPM) use this to project
  the (N, d) inputs instead of the (d, m) gradient when that is cheaper.

A Conv layer's "input" is its im2col patch matrix (:func:`conv_patches`): one row
per example and output position (example-major: all positions of example 0
first, row-major over the output grid), one column per kernel row in the order of
``kernel.reshape(k_h * k_w * c_in, c_out)``, taken with the layer's own strides,
padding and dilations. Then ``g_kernel.reshape(d, c_out) == patches^T @ delta``
exactly (up to float rounding), as for a Dense layer; this is the representation
matrix of GPM's conv layers (Saha et al. 2021, Sec. 4; the authors' code builds it
in a Python loop over examples and positions, with PyTorch's channel-major
(c_in, k_h, k_w) row order: the same subspace up to that permutation of rows).

Layers are tapped by giving each ``nnx.Linear`` of the merged copy its own
``dot_general`` and each ``nnx.Conv`` its own ``conv_general_dilated``; the module
passed in is never modified. Memory: a Conv tap holds ``N x d`` floats, k_h k_w
times the layer's input (GPM's AlexNet conv2 on 125 examples: 18,000 x 576).
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from clx.tree import path_str


class FunctionalModel:
    """A pure-function view of a Flax NNX module.

    Attributes:
      graphdef: the module's static structure.
      template: the abstract ``nnx.State`` of its parameters.
      takes_task_id: whether ``module.__call__`` has a ``task_id`` argument
        (multi-head models); if not, ``task_id`` is ignored.
    """

    def __init__(self, graphdef, template, takes_task_id: bool):
        self.graphdef = graphdef
        self.template = template
        self.takes_task_id = takes_task_id

    @classmethod
    def from_module(cls, module: nnx.Module) -> tuple["FunctionalModel", dict]:
        """Splits ``module`` into (FunctionalModel, params).

        Returns:
          The functional model and its params as nested dicts of arrays.

        Raises:
          ValueError: if the module holds state other than ``nnx.Param`` (batch
            statistics, RNG counters), which clx's pure apply cannot carry yet.
        """
        model, params = cls._split(module)
        return model, nnx.to_pure_dict(params)

    @classmethod
    def abstract(cls, module: nnx.Module) -> "FunctionalModel":
        """The FunctionalModel of a module's structure alone (e.g. one from
        ``nnx.eval_shape``: no weights need exist). Raises as ``from_module``."""
        return cls._split(module)[0]

    @classmethod
    def _split(cls, module):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        if jax.tree.leaves(rest):
            kinds = sorted(
                {type(v).__name__ for v in jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))}
            )
            raise ValueError(
                "clx.FunctionalModel supports modules whose state is only nnx.Param; this one also "
                f"holds {kinds}. "
                "Remove BatchNorm/Dropout RNG state or keep it outside the model."
            )
        template = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
        takes_task_id = "task_id" in inspect.signature(type(module).__call__).parameters
        return cls(graphdef, template, takes_task_id), params

    def _merge(self, params) -> nnx.Module:
        state = jax.tree.map(lambda a: a, self.template)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)

    def _call(self, module, x, task_id):
        return module(x, task_id=task_id) if self.takes_task_id else module(x)

    def apply(self, params, x: jax.Array, task_id=None) -> jax.Array:
        """Logits of the model on ``x`` (batch first), for task ``task_id``
        (int scalar or (batch,) int array; ignored by single-head models)."""
        return self._call(self._merge(params), x, task_id)

    def apply_with_taps(self, params, x, task_id=None, perturbations: dict | None = None):
        """Logits and the inputs of every Dense and Conv layer (a Conv's: its im2col patches).

        Args:
          params: the params pytree.
          x: (batch, ...) inputs.
          task_id: as in ``apply``.
          perturbations: optional ``{kernel path: array}`` added to each layer's
            pre-bias output; pass zeros and differentiate to get ``delta``.

        Returns:
          ``(logits, layer_inputs)`` with ``layer_inputs[path]`` of shape (N, d):
          a Dense layer's input with all leading axes flattened (N = batch for an
          MLP); a Conv layer's im2col patches, N = batch x output positions
          (example-major), d = k_h k_w c_in in the order of the kernel's rows.

        Raises:
          ValueError: if a layer is applied more than once while perturbations
            are given (the factored gradient needs one call per layer); a grouped
            Conv (``feature_group_count > 1``), whose kernel is not one matrix
            over the patches.
        """
        module = self._merge(params)
        inputs: dict[str, jax.Array] = {}
        for mpath, sub in nnx.iter_modules(module):
            key = path_str(tuple(mpath) + ("kernel",))
            if isinstance(sub, nnx.Linear):
                sub.dot_general = _tap(key, sub.dot_general, inputs, perturbations)
            elif isinstance(sub, nnx.Conv):
                sub.conv_general_dilated = _conv_tap(key, sub.conv_general_dilated, inputs, perturbations)
        logits = self._call(module, x, task_id)
        return logits, inputs

    def tap_shapes(self, params, x, task_id=None) -> dict[str, jax.ShapeDtypeStruct]:
        """Shapes of each Dense and Conv layer's pre-bias output, flattened to (N, m), for ``x``."""
        shapes: dict[str, Any] = {}

        def run(params, x):
            module = self._merge(params)
            for mpath, sub in nnx.iter_modules(module):
                key = path_str(tuple(mpath) + ("kernel",))
                if isinstance(sub, nnx.Linear):
                    sub.dot_general = _shape_tap(key, sub.dot_general, shapes)
                elif isinstance(sub, nnx.Conv):
                    sub.conv_general_dilated = _shape_tap(key, sub.conv_general_dilated, shapes)
            return self._call(module, x, task_id)

        jax.eval_shape(run, params, x)
        return shapes


def _record(key: str, flat: jax.Array, inputs: dict, perturbations: dict | None, kind: str) -> None:
    """Stores a layer's (N, d) inputs under ``key`` (appending the rows of a repeated call)."""
    if key in inputs:
        if perturbations is not None:
            raise ValueError(
                f"{kind} layer {key!r} is applied more than once; factored gradients need one call "
                "per layer. Use a rule that does not declare 'taps'."
            )
        flat = jnp.concatenate([inputs[key], flat], axis=0)
    inputs[key] = flat


def _perturb(key: str, out: jax.Array, perturbations: dict | None) -> jax.Array:
    if perturbations is not None and key in perturbations:
        out = out + perturbations[key].reshape(out.shape)
    return out


def _tap(key: str, dot_general: Callable, inputs: dict, perturbations: dict | None) -> Callable:
    def tapped(lhs, rhs, *args, **kwargs):
        _record(key, lhs.reshape(-1, lhs.shape[-1]), inputs, perturbations, "Dense")
        return _perturb(key, dot_general(lhs, rhs, *args, **kwargs), perturbations)

    return tapped


def _shape_tap(key: str, dot_general: Callable, shapes: dict) -> Callable:
    def tapped(lhs, rhs, *args, **kwargs):
        out = dot_general(lhs, rhs, *args, **kwargs)
        n = 1
        for s in out.shape[:-1]:
            n *= s
        shapes[key] = jax.ShapeDtypeStruct((n, out.shape[-1]), out.dtype)
        return out

    return tapped


_CHANNELS_LAST = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}


def conv_patches(
    x: jax.Array,
    kernel_shape: tuple[int, ...],
    strides=1,
    padding="VALID",
    input_dilation=1,
    kernel_dilation=1,
) -> jax.Array:
    """The im2col patch matrix of a channels-last convolution, as (N, d).

    For ``x`` (B, *spatial, c_in) and a kernel (*window, c_in, c_out) (Flax's
    ``nnx.Conv`` layout, 1 to 3 spatial dims), returns the (B * P, d) matrix X,
    P the number of output positions and d = prod(window) * c_in, with

        conv(x, kernel).reshape(B * P, c_out) == X @ kernel.reshape(d, c_out)

    Rows are example-major (the P positions of example 0 first, row-major over
    the output grid), so the first n examples' rows are a prefix; columns follow
    the kernel's row order (window positions, then input channels). Built with
    ``jax.lax.conv_general_dilated_patches`` (at HIGHEST precision, so the patches
    are the inputs bit for bit), whose channel-major (c_in, *window) features are
    reordered to (*window, c_in).

    Args:
      x: (B, *spatial, c_in) inputs.
      kernel_shape: the kernel's shape (*window, c_in, c_out) (``c_out`` may be omitted).
      strides, input_dilation, kernel_dilation: an int or one per spatial dim.
      padding: 'VALID', 'SAME', or one (low, high) pair per spatial dim, as ``lax.conv_general_dilated``.

    Raises:
      ValueError: ``x`` and ``kernel_shape`` disagree on the number of spatial
        dims or on ``c_in``, or more than 3 spatial dims.
    """
    x = jnp.asarray(x)
    nsp = x.ndim - 2
    if nsp not in _CHANNELS_LAST:
        raise ValueError(f"conv_patches: x must be (batch, 1 to 3 spatial dims, channels), got shape {x.shape}.")
    kernel_shape = tuple(int(s) for s in kernel_shape)
    if len(kernel_shape) == nsp + 2:
        kernel_shape = kernel_shape[:-1]
    if len(kernel_shape) != nsp + 1 or kernel_shape[-1] != x.shape[-1]:
        raise ValueError(
            f"conv_patches: kernel_shape {kernel_shape} does not fit x of shape {x.shape}: it must be "
            f"(*window ({nsp} dims), c_in={x.shape[-1]}[, c_out])."
        )
    window = kernel_shape[:-1]

    def per_dim(v):
        return (int(v),) * nsp if isinstance(v, int) else tuple(int(a) for a in v)

    return _patches(x, window, per_dim(strides), padding, per_dim(input_dilation), per_dim(kernel_dilation))


def _patches(x, window, strides, padding, lhs_dilation, rhs_dilation):
    nsp = len(window)
    if not isinstance(padding, str):
        padding = tuple(tuple(int(a) for a in p) for p in padding)
    p = jax.lax.conv_general_dilated_patches(
        x,
        window,
        strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_CHANNELS_LAST[nsp],
        precision=jax.lax.Precision.HIGHEST,
    )
    c = x.shape[-1]
    lead = p.shape[:-1]  # (B, *out_spatial)
    p = p.reshape(*lead, c, *window)  # channel-major features -> (*window, c_in)
    p = jnp.moveaxis(p, len(lead), -1)
    return p.reshape(-1, math.prod(window) * c)


def _conv_tap(key: str, conv: Callable, inputs: dict, perturbations: dict | None) -> Callable:
    def tapped(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, *args, **kwargs):
        dn = kwargs.get("dimension_numbers")
        groups = kwargs.get("feature_group_count", 1)
        if groups != 1:
            raise ValueError(
                f"Conv layer {key!r} has feature_group_count={groups}; clx taps only ungrouped convolutions "
                "(one (k_h k_w c_in, c_out) kernel matrix over the patches). Use a rule without 'taps'."
            )
        nsp = lhs.ndim - 2
        if dn is not None and tuple(jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dn)) != tuple(
            jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST[nsp])
        ):
            raise ValueError(f"Conv layer {key!r} is not channels-last; clx taps only Flax's NHWC/HWIO layout.")
        ones = (1,) * nsp
        flat = _patches(
            lhs,
            tuple(rhs.shape[:-2]),
            tuple(window_strides),
            padding,
            tuple(lhs_dilation or ones),
            tuple(rhs_dilation or ones),
        )
        _record(key, flat, inputs, perturbations, "Conv")
        out = conv(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, *args, **kwargs)
        return _perturb(key, out, perturbations)

    return tapped


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
):
    """``jax.lax.conv_general_dilated`` whose gradients are computed with forward ops (fast in a scan on CPU).

    Same signature, semantics and forward value as ``jax.lax.conv_general_dilated``
    (it *is* that call); only the reverse-mode rule differs (``jax.custom_vjp``).
    Pass it to ``nnx.Conv(..., conv_general_dilated=clx.functional.conv_general_dilated)``;
    clx's conv models (``LeNet``, ``AlexNet``, ``ResNet18``) do.

    Why: on XLA:CPU the backward convolutions that jax's autodiff of
    ``lax.conv_general_dilated`` emits run 10-25x slower inside a ``lax.scan`` /
    while-loop body than jitted alone, while forward convolutions are fast in
    both (measured, jax 0.12 CPU, LeNet conv2 5x5x20->50 on 12x12, batch 32:
    kernel gradient 58 ms per step in a scan vs 3.7 ms alone; input gradient
    47 ms vs 5.2 ms). ``clx.fit`` runs each epoch as a ``lax.scan`` of train
    steps, so every conv model trained 5-10x slower than it could. Written as
    forward ops, the same gradients take 6.3 ms (kernel) and 4.8 ms (input) in the scan.
    End to end (2 loaded cores): a scan of 50 SGD steps of ``LeNet`` (28x28x1, batch 32)
    143 -> 25 ms per step (``benchmarks/projection_overhead.py --models lenet``); the
    split-MNIST CNN GPM run's epochs 7-10 s -> 1-2.6 s, the same ACC.

    For channels-last ``lhs`` (B, *spatial, c_in), ``rhs`` (*window, c_in, c_out),
    output cotangent ``g`` (B, *out, c_out), strides s and explicit padding
    (lo, hi) per spatial dim (strings converted with ``jax.lax.padtype_to_pads``):

    - kernel gradient: ``X = conv_general_dilated_patches(lhs, window, s, pads)``
      reshaped to (B * prod(out), c_in * prod(window)) (features channel-major,
      (c_in, *window)), then ``X.T @ g.reshape(-1, c_out)`` (c_in * prod(window),
      c_out), reshaped to (c_in, *window, c_out) and moved to (*window, c_in, c_out);
    - input gradient: a VALID stride-1 forward conv of ``g`` dilated by s - 1
      zeros between entries and zero-padded by ``K - 1 - lo`` low and
      ``H + lo - 1 - (O - 1) s`` high (K window, H input, O output size per dim;
      negative pads crop; all via one ``lax.pad``), with the kernel flipped along
      its window axes and its in/out channels swapped: (*window, c_out, c_in).

    Both run at the call's ``precision`` (the patches at HIGHEST, so they are the
    inputs exactly). Falls back to plain ``lax.conv_general_dilated`` (the same
    value, jax's own gradient) for anything else: not 1 to 3 spatial dims,
    ``dimension_numbers`` other than channels-last (None means NCHW/OIHW in lax,
    so it falls back), any lhs/rhs dilation != 1, grouped convolutions, a
    ``preferred_element_type`` or ``out_sharding``, or lhs/rhs of different or non-float dtypes.
    Only reverse mode is defined on the fast path (a ``custom_vjp``): ``jax.jvp``
    through it raises; grad-of-grad works.
    """
    lhs = jnp.asarray(lhs)
    rhs = jnp.asarray(rhs)
    nsp = lhs.ndim - 2
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    kwargs = dict(
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    if out_sharding is not None:
        kwargs["out_sharding"] = out_sharding
    fast = (
        out_sharding is None
        and nsp in _CHANNELS_LAST
        and rhs.ndim == lhs.ndim
        and dimension_numbers is not None
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
        and lhs.dtype == rhs.dtype
        and jnp.issubdtype(lhs.dtype, jnp.floating)
        and all(int(d) == 1 for d in (lhs_dilation or ()))
        and all(int(d) == 1 for d in (rhs_dilation or ()))
    )
    if fast:
        try:
            dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            fast = tuple(dn) == tuple(jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CHANNELS_LAST[nsp]))
        except (TypeError, ValueError):
            fast = False
    if not fast:
        return jax.lax.conv_general_dilated(*args, **kwargs)
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(lhs.shape[1:-1], rhs.shape[:-2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _fast_conv(lhs, rhs, strides, pads, _hashable(precision))


def _hashable(precision):
    return tuple(precision) if isinstance(precision, list) else precision


def _conv_fwd_value(lhs, rhs, strides, pads, precision):
    return jax.lax.conv_general_dilated(
        lhs, rhs, strides, pads, dimension_numbers=_CHANNELS_LAST[lhs.ndim - 2], precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _fast_conv(lhs, rhs, strides, pads, precision):
    return _conv_fwd_value(lhs, rhs, strides, pads, precision)


def _fast_conv_fwd(lhs, rhs, strides, pads, precision):
    return _conv_fwd_value(lhs, rhs, strides, pads, precision), (lhs, rhs)


def _fast_conv_bwd(strides, pads, precision, res, g):
    lhs, rhs = res
    nsp = lhs.ndim - 2
    dn = _CHANNELS_LAST[nsp]
    window = rhs.shape[:-2]
    c_in, c_out = rhs.shape[-2:]
    # kernel gradient: patches^T @ g, the patch features channel-major (c_in, *window)
    p = jax.lax.conv_general_dilated_patches(
        lhs, window, strides, pads, dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST
    )
    gk = jnp.matmul(p.reshape(-1, p.shape[-1]).T, g.reshape(-1, c_out), precision=precision)
    gk = jnp.moveaxis(gk.reshape(c_in, *window, c_out), 0, -2).astype(rhs.dtype)
    # input gradient: a forward conv of the dilated, padded g with the flipped, in/out-swapped kernel
    config = [(0, 0, 0)]
    for k, (lo, _), s, h, o in zip(window, pads, strides, lhs.shape[1:-1], g.shape[1:-1]):
        config.append((k - 1 - lo, h + lo - 1 - (o - 1) * s, s - 1))
    config.append((0, 0, 0))
    gp = jax.lax.pad(g, jnp.zeros((), g.dtype), config)
    kf = jnp.swapaxes(jnp.flip(rhs, tuple(range(nsp))), -1, -2)
    gx = jax.lax.conv_general_dilated(gp, kf, (1,) * nsp, "VALID", dimension_numbers=dn, precision=precision)
    return gx.astype(lhs.dtype), gk


_fast_conv.defvjp(_fast_conv_fwd, _fast_conv_bwd)
