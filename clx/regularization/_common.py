"""Helpers shared by the regularization methods: argument checks, per-example chunking and the
quadratic-penalty gradient."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from clx.tree import by_path, check_nonnegative, check_positive, concrete_float  # noqa: F401 (re-exported)

#: Floats one chunk of per-example gradients may hold (64 MiB of float32) when no chunk size is given.
CHUNK_FLOATS = 2**24

#: A logit value that takes a class out of a softmax (finite, so no NaN reaches a gradient through ``where``).
MASKED_LOGIT = -1e9


def check_optional_int(who: str, name: str, value, minimum: int = 1) -> int | None:
    """``value`` as an int >= ``minimum``, or None; ValueError otherwise."""
    if value is None:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: {name} must be None or an integer >= {minimum}, got {value!r}.") from None
    if v != value or v < minimum:
        raise ValueError(f"{who}: {name} must be None or an integer >= {minimum}, got {value!r}.")
    return v


def need_params(who: str, params) -> None:
    """Raises ValueError when ``update`` was called without ``params`` (a penalty gradient needs them)."""
    if params is None:
        raise ValueError(
            f"{who}: update needs the params (its penalty gradient depends on them); call "
            "update(grads, state, params) as the clx trainer does."
        )


def num_params(params) -> int:
    """The number of scalars in a params pytree (static)."""
    return int(sum(math.prod(jnp.shape(a)) for a in jax.tree.leaves(params)))


def chunk_size_for(n: int, floats_per_example: int, chunk_size: int | None) -> int:
    """Examples per chunk: ``chunk_size`` when given, else as many as fit :data:`CHUNK_FLOATS`; in [1, n]."""
    if chunk_size is None:
        chunk_size = CHUNK_FLOATS // max(int(floats_per_example), 1)
    return max(1, min(int(chunk_size), max(int(n), 1)))


def sum_over_chunks(per_example: Callable, params, x, extras: tuple, chunk: int, *, batched: bool = False):
    """``sum_i w_i per_example(x_i, i, *extras_i)`` over the n examples of ``x``, ``chunk`` at a time.

    ``per_example(x_i, i, *extras_i) -> pytree shaped like params`` is vmapped over one
    chunk, and a ``lax.scan`` walks the chunks, so at most ``chunk`` per-example
    results are alive at once. The last chunk is padded with weight-0 copies of
    example 0 (their results are multiplied by 0, never kept). With ``batched``,
    ``per_example(x_c, i_c, w_c, *extras_c)`` takes a whole chunk (its indices and
    weights too) and returns the chunk's weighted sum itself.
    """
    n = x.shape[0]
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n

    def padded(a):
        if pad:
            a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, *a.shape[1:]))])
        return a.reshape(num_chunks, chunk, *a.shape[1:])

    index = jnp.arange(num_chunks * chunk, dtype=jnp.int32)
    weights = (index < n).astype(jnp.float32)
    xs = (padded(x), index.reshape(num_chunks, chunk), weights.reshape(num_chunks, chunk), *map(padded, extras))

    def body(total, chunk_data):
        xc, ic, wc, *ec = chunk_data
        if batched:
            return jax.tree.map(lambda t, v: t + v.astype(t.dtype), total, per_example(xc, ic, wc, *ec)), None
        values = jax.vmap(per_example)(xc, ic, *ec)
        total = jax.tree.map(lambda t, v: t + jnp.tensordot(wc, v, axes=1).astype(t.dtype), total, values)
        return total, None

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, _ = jax.lax.scan(body, zeros, xs)
    return total


def penalty_gradient(updates, params, weight, precision, anchor):
    """``updates + weight * precision * (params - anchor)``, leaf by leaf (the gradient of
    ``weight/2 sum precision (params - anchor)^2``)."""

    def pull(g, p, f, a):
        return g + weight * (f * (p - a)).astype(g.dtype)

    return jax.tree.map(pull, updates, params, precision, anchor)


def copy_tree(tree):
    """A copy of every leaf (so saved params never alias live buffers the trainer donates)."""
    return jax.tree.map(jnp.array, tree)


# --- per-example sums of Dense layers without per-example gradients ------------------------------------------------
#
# A Dense layer whose input holds one row per example has per-example kernel gradients x_i delta_i^T (delta_i: the
# gradient of example i's scalar with respect to the layer's pre-bias output, from one backward pass over the chunk
# through the model's zero perturbations), so sums over examples of elementwise functions of them factor:
# sum_i (x_i^2)(delta_i^2)^T = (X*X)^T (Delta*Delta) (the Fisher), sum_i |x_i||delta_i|^T = |X|^T |Delta| (MAS), and
# the bias's sum_i delta_i^2 or |delta_i|. The other params (convs over several positions, clx.MultiHead heads, a
# layer applied twice) keep their per-example gradients.


def factored_layers(apply_with_taps, params, x, task_id) -> tuple:
    """``((kernel path, bias path or None), ...)``: the layers of a ``clx.TappedModel`` (its ``apply_with_taps``;
    None: none) whose per-example gradients factor: one input row per example (1 row for 1 example and 2 for 2,
    so a layer applied to inputs that do not scale with the batch is left out) and one call (perturbations
    accepted), their kernel a leaf of ``params``."""
    if apply_with_taps is None:
        return ()
    leaves = by_path(params)
    kernels = set(leaves)
    try:
        for b in range(1, min(2, x.shape[0]) + 1):
            _, taps = jax.eval_shape(lambda p, xs: apply_with_taps(p, xs, task_id), params, x[:b])
            kernels &= {k for k, tap in taps.items() if tap.shape[0] == b}
        perts = {k: jnp.zeros((b, leaves[k].shape[-1]), jnp.float32) for k in kernels}
        jax.eval_shape(lambda p, xs, d: apply_with_taps(p, xs, task_id, d), params, x[:b], perts)
    except ValueError:  # a layer applied more than once: no factored gradients
        return ()
    bias = {k: k[: -len("kernel")] + "bias" for k in kernels}
    return tuple((k, bias[k] if bias[k] in leaves else None) for k in sorted(kernels))


def factored_floats(params, layers, rows_per_example: int) -> int:
    """Floats one example holds on the factored way: its inputs to the layers and ``rows_per_example`` rows of
    their widths (deltas, squares)."""
    leaves = by_path(params)
    inputs = sum(math.prod(leaves[k].shape[:-1]) for k, _ in layers)
    return inputs + rows_per_example * sum(leaves[k].shape[-1] for k, _ in layers)


def zero_perturbations(params, layers, b: int) -> dict:
    """``{kernel path: (b, m) zeros}``: the perturbations whose gradient is each layer's delta."""
    leaves = by_path(params)
    return {k: jnp.zeros((b, leaves[k].shape[-1]), jnp.float32) for k, _ in layers}


def sum_factored(rows: Callable, inputs: Callable, params, layers, x, extras: tuple, chunk: int) -> dict:
    """``{path: sum over the examples}`` for the kernels and biases of ``layers``: ``inputs(X)^T R`` and ``sum_i R_i``,
    where ``rows(x_c, i_c, *extras_c) -> (taps, R)`` gives a chunk's layer inputs and its (b, m) rows per layer."""
    leaves = by_path(params)
    template = {p: jnp.zeros(leaves[p].shape, jnp.float32) for k, b in layers for p in (k, b) if p}

    def per_chunk(xc, ic, wc, *ec):
        taps, r = rows(xc, ic, *ec)
        out = {}
        for kernel, bias in layers:
            rk = r[kernel] * wc[:, None]  # padding rows weigh 0
            out[kernel] = jnp.matmul(inputs(taps[kernel]).T, rk, precision="highest").reshape(leaves[kernel].shape)
            if bias:
                out[bias] = rk.sum(0).reshape(leaves[bias].shape)
        return out

    return sum_over_chunks(per_chunk, template, x, extras, chunk, batched=True)


class MergedApply:
    """``apply_fn`` on ``(rest, fixed)``, two dicts of params keyed by path, put back into the params pytree: the
    per-example way for the params the factored way leaves (``rest``). Hashable, for a jitted function's static
    arguments."""

    def __init__(self, apply_fn, params):
        self.apply_fn, self.treedef, self.paths = apply_fn, jax.tree.structure(params), tuple(by_path(params))

    def _key(self):
        return self.apply_fn, self.treedef, self.paths

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return isinstance(other, MergedApply) and self._key() == other._key()

    def split(self, params, layers) -> tuple[dict, dict]:
        """``(rest, fixed)``: the params the factored way leaves, and those it covers."""
        leaves = by_path(params)
        covered = {p for k, b in layers for p in (k, b) if p}
        return {p: v for p, v in leaves.items() if p not in covered}, {p: leaves[p] for p in covered}

    def unflatten(self, leaves: dict):
        return jax.tree_util.tree_unflatten(self.treedef, [leaves[p] for p in self.paths])

    def __call__(self, both, x, task_id):
        return self.apply_fn(self.unflatten({**both[0], **both[1]}), x, task_id)
