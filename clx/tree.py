"""Small pytree and value helpers shared by every part of clx (one copy each)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

_NOT_CONCRETE = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError, TypeError)


def path_str(path) -> str:
    """'/'-joined string of a jax key path or a tuple of keys: ``'layers/0/kernel'``."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                k = getattr(k, attr)
                break
        parts.append(str(k))
    return "/".join(parts)


def by_path(tree) -> dict[str, Any]:
    """``{path_str(key path): leaf}`` for every leaf of ``tree``, in flattening order."""
    return {path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def concrete(value: Any) -> np.ndarray | None:
    """``value`` as a NumPy array when it is concrete, None when it is traced (inside jit/vmap).

    Lets a rule check a hyperparameter eagerly when it can and skip the check
    when the value is a traced sweep value.
    """
    try:
        return np.asarray(value)
    except _NOT_CONCRETE:
        return None


def concrete_float(value: Any) -> float | None:
    """``float(value)`` for a concrete scalar, None for a traced one."""
    v = concrete(value)
    return None if v is None else float(v)


def concrete_int(value: Any) -> int | None:
    """The first entry of a concrete int scalar or array as an int, None when traced."""
    v = concrete(value)
    return None if v is None else int(v.reshape(-1)[0])


def check_task_ids(task_ids, num_tasks: int, what: str = "tasks") -> None:
    """A ``checkify`` check that every (traced) task id is in ``[0, num_tasks)``.

    Under ``checkify.checkify`` (inside jit too) an out-of-range id is reported as
    ``unknown task id {id}: the model has {num_tasks} {what} ...``; without
    checkify the check is dropped (``checkify.debug_check``), so plain jitted calls pay nothing. Concrete
    ids are checked eagerly by the models themselves (ValueError).
    """
    ids = jnp.asarray(task_ids, jnp.int32).reshape(-1)
    if not ids.size:
        return
    valid = (ids >= 0) & (ids < num_tasks)
    first_bad = ids[jnp.argmin(valid)]
    checkify.debug_check(
        jnp.all(valid),
        f"unknown task id {{bad}}: the model has {num_tasks} {what} (tasks 0..{num_tasks - 1})",
        bad=first_bad,
    )


def check_nonnegative(who: str, name: str, value) -> None:
    """Raises ValueError for a concrete negative or non-finite value; a traced sweep value passes."""
    v = concrete_float(value)
    if v is not None and not (0.0 <= v < math.inf):
        raise ValueError(f"{who}: {name} must be a finite value >= 0, got {v}; pass {name} >= 0 (0 switches it off).")


def check_positive(who: str, name: str, value) -> None:
    """Raises ValueError for a concrete value that is not finite and > 0; a traced value passes."""
    v = concrete_float(value)
    if v is not None and not (0.0 < v < math.inf):
        raise ValueError(f"{who}: {name} must be a finite value > 0, got {v}.")
