"""What the plasticity rules share: hyperparameter checks, the params check of ``update``,
copies of params-shaped trees and Gaussian noise shaped like the params."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation
from clx.tree import check_nonnegative, concrete_float  # noqa: F401 (re-exported)


def check_unit_interval(who: str, name: str, value) -> None:
    """Raises ValueError for a concrete value outside [0, 1]; a traced sweep value passes."""
    v = concrete_float(value)
    if v is not None and not (0.0 <= v <= 1.0):
        raise ValueError(f"{who}: {name} must be in [0, 1], got {v}; pass a value in [0, 1] (1 keeps the params).")


def need_params(who: str, params) -> None:
    """Raises ValueError when ``update`` was called without ``params``."""
    if params is None:
        raise ValueError(f"{who}: update needs the params; call update(grads, state, params) as the clx trainer does.")


def need_key(who: str, key) -> None:
    """Raises ValueError when ``update`` was called without ``key`` (a rule that declares the "key" need)."""
    if key is None:
        raise ValueError(
            f"{who}: update needs key= (it declares the 'key' need); call update(grads, state, params, key=k) "
            "as the clx trainer does."
        )


def copy_tree(tree):
    """A copy of every leaf (so stored params never alias live buffers the trainer donates)."""
    return jax.tree.map(jnp.array, tree)


def normal_like(key: jax.Array, tree):
    """Standard normal noise shaped like ``tree`` (each leaf's shape and dtype), one key per leaf:
    leaf i (in ``jax.tree.leaves`` order) draws from ``jax.random.split(key, n)[i]``."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, max(len(leaves), 1))
    noise = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(treedef, noise)


def check_optimizer(who: str, optimizer) -> None:
    """TypeError unless ``optimizer`` is a plain optax transformation (a clx rule would lose its hooks)."""
    if isinstance(optimizer, ContinualTransformation):
        raise TypeError(
            f"{who}: optimizer must be a plain optax optimizer (e.g. optax.sgd(0.01)), got the clx rule "
            f"{optimizer.name!r}; chain clx rules before this one instead."
        )
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"{who}: optimizer must be an optax GradientTransformation, got {type(optimizer).__name__}.")
