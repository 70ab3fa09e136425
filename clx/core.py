"""The core contract of clx: a continual-learning update rule is an optax
``GradientTransformation`` with a third function, ``consolidate``, called once at
every task boundary.

    ContinualTransformation(
        init(params) -> state,
        update(updates, state, params=None, **extra) -> (updates, state),   # optax's
        consolidate(state, params, evidence) -> state,                     # task end
    )

Every function is pure and jit-able and every state is a pytree, so a rule can be
jitted, vmapped over seeds, sharded and checkpointed like any optax state.
``chain`` composes clx rules and plain optax transforms; a plain optax transform
consolidates as the identity.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax
from flax import struct

Params = Any
Updates = Any
State = Any


class ContinualTransformation(NamedTuple):
    """An optax gradient transformation that also acts at task boundaries.

    Attributes:
      init: ``init(params) -> state``.
      update: ``update(updates, state, params=None, **extra) -> (updates, state)``,
        exactly optax's signature. The trainer passes, as ``extra``, ``task_id``
        (int32 scalar, the task being trained), ``layer_inputs`` and ``output_grads`` (see ``clx.functional``) so that rules
        that act on the input space of Dense layers can work on the factored
        gradient ``g = X^T delta``; rules that do not need them ignore them.
      consolidate: ``consolidate(state, params, evidence) -> state``, called once
        after each task with the ``Evidence`` gathered by the trainer.
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Updates, State]]
    consolidate: Callable[[State, Params, "Evidence"], State]


@struct.dataclass
class Evidence:
    """What a rule may look at when task ``task_id`` ends (a pytree).

    Gathered once by the trainer from a fixed-size sample of the finished task.

    Attributes:
      task_id: int32 scalar, index of the task that just ended.
      x: (n, ...) float32, the sample's inputs.
      y: (n,) int32, the sample's labels.
      representations: ``{kernel path: (d, n) float32}``, the inputs of every
        Dense layer on the sample, one column per example (the representation
        matrix R of Saha et al. 2021, Eq. 4). Kernel paths are '/'-joined keys of
        the params pytree, e.g. ``'layers/0/kernel'``. A layer applied to inputs
        with extra leading axes contributes one column per position.
      apply_fn: ``apply_fn(params, x, task_id) -> logits`` (static field), for
        rules that need logits or per-example gradients.
    """

    task_id: jax.Array
    x: jax.Array
    y: jax.Array
    representations: dict[str, jax.Array]
    apply_fn: Callable[..., jax.Array] = struct.field(pytree_node=False, default=None)


def _identity_consolidate(state, params, evidence):
    del params, evidence
    return state


def as_continual(tx: optax.GradientTransformation | ContinualTransformation) -> ContinualTransformation:
    """Wraps a plain optax transform as a ContinualTransformation.

    The result accepts (and ignores) extra keyword arguments in ``update`` and
    consolidates as the identity. A ContinualTransformation is returned unchanged.

    Raises:
      TypeError: if ``tx`` has no ``init``/``update`` functions.
    """
    if isinstance(tx, ContinualTransformation):
        return tx
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"clx.chain takes optax GradientTransformations or clx ContinualTransformations, "
            f"got {type(tx).__name__}; build one with e.g. optax.sgd(0.01) or clx.gpm(...)."
        )
    tx = optax.with_extra_args_support(tx)
    return ContinualTransformation(tx.init, tx.update, _identity_consolidate)


def chain(*transforms: optax.GradientTransformation | ContinualTransformation) -> ContinualTransformation:
    """Composes clx rules and plain optax transforms, applied left to right.

    ``clx.chain(clx.gpm(...), optax.sgd(0.01))`` is the whole GPM optimizer: the
    gradient is projected, then scaled by the learning rate. The state is a tuple
    with one entry per transform, like ``optax.chain``'s, and ``update`` passes
    the same ``params`` and ``**extra`` to every member. ``consolidate`` calls
    each member's ``consolidate`` (the identity for plain optax transforms).

    Raises:
      ValueError: if called with no transforms.
      TypeError: if a member is neither an optax nor a clx transformation.
    """
    if not transforms:
        raise ValueError("clx.chain needs at least one transformation.")
    members = tuple(as_continual(t) for t in transforms)

    def init(params):
        return tuple(m.init(params) for m in members)

    def update(updates, state, params=None, **extra):
        new_state = []
        for m, s in zip(members, state):
            updates, s = m.update(updates, s, params, **extra)
            new_state.append(s)
        return updates, tuple(new_state)

    def consolidate(state, params, evidence):
        return tuple(m.consolidate(s, params, evidence) for m, s in zip(members, state))

    return ContinualTransformation(init, update, consolidate)


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
