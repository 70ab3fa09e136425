"""One minimal rule per hook of the contract (test fixtures, not methods).

Each is the smallest rule that uses its hook, so that a test can check the hook is
wired: a loss term, a reference gradient on other data, a buffer that inserts the
batch, a move of the params at a task boundary.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

import clx


def logit_penalty(weight: float) -> clx.ContinualTransformation:
    """Loss term ``weight * sum_i w_i ||logits_i||^2 / sum_i w_i`` on the step's own logits
    (``batch.logits``, from the task loss's forward pass)."""

    def loss(params, state, batch, apply_fn):
        per_example = jnp.sum(jnp.square(batch.logits), axis=-1)
        return weight * jnp.sum(batch.weights * per_example) / jnp.maximum(jnp.sum(batch.weights), 1.0)

    return clx.ContinualTransformation(
        lambda p: (), lambda u, s, params=None, **e: (u, s), lambda s, p, ev: (None, s), loss=loss, name="logit_penalty"
    )


class RefGradState(NamedTuple):
    x: jax.Array  # (n, ...) the reference batch, stored at consolidate
    y: jax.Array  # (n,)
    stored: jax.Array  # () bool
    last_ref: object  # the reference gradient of the last step (params-shaped)


def ref_projection(num_ref: int, input_shape) -> clx.ContinualTransformation:
    """A-GEM's projection with a reference batch kept from the first task's evidence:
    if g . g_ref < 0, g <- g - (g . g_ref / g_ref . g_ref) g_ref (Chaudhry et al. 2019, Eq. 11)."""

    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return RefGradState(
            jnp.zeros((num_ref, *input_shape), jnp.float32),
            jnp.zeros((num_ref,), jnp.int32),
            jnp.zeros((), bool),
            zeros,
        )

    def update(updates, state, params=None, *, grad_fn, **extra):
        ref = clx.Batch(state.x, state.y, jnp.zeros_like(state.y), jnp.ones(state.y.shape, jnp.float32))
        g_ref = grad_fn(params, ref)
        dot = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(g_ref)))
        norm = sum(jnp.vdot(b, b) for b in jax.tree.leaves(g_ref))
        coef = jnp.where(state.stored & (dot < 0), dot / jnp.maximum(norm, 1e-30), 0.0)
        projected = jax.tree.map(lambda g, r: g - coef * r, updates, g_ref)
        return projected, state._replace(last_ref=g_ref)

    def consolidate(state, params, evidence):
        keep = ~state.stored
        x = jnp.where(keep, evidence.x[:num_ref].reshape(state.x.shape), state.x)
        y = jnp.where(keep, evidence.y[:num_ref], state.y)
        return None, state._replace(x=x, y=y, stored=jnp.ones((), bool))

    return clx.ContinualTransformation(init, update, consolidate, needs=frozenset({"grad_fn"}), name="ref_projection")


class BufferState(NamedTuple):
    x: jax.Array  # (capacity, ...) inserted inputs, oldest overwritten first
    count: jax.Array  # () int32, real examples inserted so far


def ring_buffer(capacity: int, input_shape) -> clx.ContinualTransformation:
    """Inserts every real (weight 1) example of each batch into a fixed-size ring."""

    def init(params):
        return BufferState(jnp.zeros((capacity, *input_shape), jnp.float32), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, *, batch, **extra):
        real = batch.weights > 0
        offsets = jnp.cumsum(real) - 1
        slots = jnp.where(real, (state.count + offsets) % capacity, capacity)  # padding goes out of bounds: dropped
        x = state.x.at[slots].set(batch.x.reshape(-1, *input_shape), mode="drop")
        return updates, BufferState(x, state.count + jnp.sum(real).astype(jnp.int32))

    return clx.ContinualTransformation(
        init, update, lambda s, p, ev: (None, s), needs=frozenset({"batch"}), name="ring_buffer"
    )


def shrink(factor: float, noise: float = 0.0, seed: int = 0) -> clx.ContinualTransformation:
    """Shrink & perturb at every task boundary: theta <- factor * theta + noise * eps (Ash & Adams 2020)."""

    def consolidate(state, params, evidence):
        key = jax.random.fold_in(jax.random.key(seed), evidence.task_id)
        leaves, tree = jax.tree.flatten(params)
        keys = jax.random.split(key, len(leaves))
        moves = [(factor - 1.0) * p + noise * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)]
        return jax.tree.unflatten(tree, moves), state

    return clx.ContinualTransformation(lambda p: (), lambda u, s, params=None, **e: (u, s), consolidate, name="shrink")
