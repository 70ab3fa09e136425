"""Helpers shared by the regularization methods: argument checks, per-example chunking and the
quadratic-penalty gradient."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from clx.tree import check_nonnegative, check_positive, concrete_float  # noqa: F401 (re-exported)

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
