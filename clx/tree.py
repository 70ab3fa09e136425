"""Small pytree and value helpers shared by every part of clx (one copy each)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

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
