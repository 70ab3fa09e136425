"""Helpers shared by the replay methods: weighted losses on buffer batches and argument checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from clx.tree import concrete_float


def weighted_ce(logits, y, weights):
    """(sum_i w_i CE_i, sum_i w_i): the weighted cross-entropy numerator and its weight."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(ce * weights), jnp.sum(weights)


def mean_ce(logits, y, weights):
    """The weighted mean cross-entropy ``sum(w ce) / max(sum(w), 1)`` (the trainer's task loss); 0 for no weight."""
    s, w = weighted_ce(logits, y, weights)
    return s / jnp.maximum(w, 1.0)


def tree_dot(a, b) -> jax.Array:
    """The inner product of two pytrees of the same structure, over every leaf (float32 scalar)."""
    return sum((jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))), jnp.zeros((), jnp.float32))


def check_weight(who: str, name: str, value) -> None:
    """Raises ValueError for a concrete negative (or non-finite) weight; a traced sweep value passes."""
    v = concrete_float(value)
    if v is not None and not (v >= 0 and v < float("inf")):
        raise ValueError(f"{who}: {name} must be a finite value >= 0, got {v}; pass {name} >= 0 (0 switches it off).")


def check_batch_size(who: str, name: str, n, buffer_size: int) -> int:
    """``n`` as an int in [1, buffer_size], else ValueError naming the fix."""
    try:
        value = int(n)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: {name} must be an integer >= 1, got {n!r}.") from None
    if value != n or value < 1:
        raise ValueError(f"{who}: {name} must be an integer >= 1, got {n!r}.")
    if value > buffer_size:
        raise ValueError(
            f"{who}: {name}={value} is larger than the buffer ({buffer_size} examples), and replay batches are "
            f"drawn without replacement; use {name} <= {buffer_size} or a larger buffer."
        )
    return value


def check_size(who: str, name: str, value) -> int:
    """``value`` as an int >= 1, else ValueError."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: {name} must be an integer >= 1, got {value!r}.") from None
    if v != value or v < 1:
        raise ValueError(f"{who}: {name} must be an integer >= 1, got {value!r}; give it at least 1.")
    return v
