"""Replay buffers as fixed-shape pytrees, with pure, jit-able ``insert`` and ``sample``.

A buffer lives in a rule's state, so it is vmapped over seeds, sharded and saved in
checkpoints like any other state. Every buffer has the same fields (the slot
arrays have a leading ``capacity`` axis):

    x         (capacity, *input_shape) float32   stored inputs
    y         (capacity,) int32                  labels
    task_ids  (capacity,) int32                  the task each example came from
    logits    (capacity, num_logits) float32     the model's logits at insertion (DER), or None: not stored
    valid     (capacity,) bool                   the slot holds an example
    count     examples seen so far: () int32 (reservoir), (num_classes,) (class-balanced),
              (num_tasks,) (per-task rings)

Three insertion policies, one type each:

- :class:`ReservoirBuffer` (``reservoir_buffer``): Vitter's Algorithm R (Vitter 1985,
  "Random sampling with a reservoir", ACM TOMS): the n-th real example seen (0-based)
  goes to slot n while n < capacity, else to slot j ~ U{0..n} if j < capacity, else
  nowhere. After N examples every one of them is in the buffer with probability
  capacity / N. As Mammoth's ``utils/buffer.py`` (``reservoir``).
- :class:`ClassBalancedBuffer` (``class_balanced_buffer``): ``capacity // num_classes``
  slots per class (the remainder is unused), each class's slots a reservoir over that
  class's examples, so every class seen keeps the same number of examples once it has
  seen that many.
- :class:`TaskRingBuffer` (``task_ring_buffer``): ``slots_per_task`` slots per task,
  each a ring (the task's most recent examples), as GEM's episodic memory
  (Lopez-Paz & Ranzato 2017, ``model/gem.py``).

``insert(buffer, batch, key)`` inserts the real examples of a :class:`clx.Batch`
(weight > 0; padding is never inserted) in batch order. The result is exactly that
of inserting them one at a time; it is computed without a sequential loop: every
example's slot is drawn at once (its position n in the stream is known from a
cumulative sum), and an example is written only if no later example of the same
batch takes its slot, so one scatter with distinct slots writes the batch.

``sample(buffer, key, n, mask=None)`` draws ``n`` examples uniformly **without
replacement** from the filled slots (those with ``mask`` too), as Mammoth's
``Buffer.get_data`` and the A-GEM/ER code (``np.random.choice(..., replace=False)``);
when fewer than ``n`` slots qualify, all of them are drawn and the remaining draws get
weight 0 (Mammoth returns a smaller batch; a zero weight is the fixed-shape
equivalent). An empty buffer gives weights 0 everywhere, so a loss or gradient
weighted by them contributes nothing.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx.core import Batch


class ReservoirBuffer(NamedTuple):
    x: jax.Array  # (capacity, *input_shape) float32
    y: jax.Array  # (capacity,) int32
    task_ids: jax.Array  # (capacity,) int32
    logits: jax.Array | None  # (capacity, num_logits) float32, or None (num_logits = 0: no logits stored)
    valid: jax.Array  # (capacity,) bool
    count: jax.Array  # () int32, real examples seen (inserted or not)


class ClassBalancedBuffer(NamedTuple):
    x: jax.Array  # (capacity, *input_shape) float32; class c owns slots [c m, (c + 1) m), m = capacity // C
    y: jax.Array  # (capacity,) int32
    task_ids: jax.Array  # (capacity,) int32
    logits: jax.Array | None  # (capacity, num_logits) float32, or None
    valid: jax.Array  # (capacity,) bool
    count: jax.Array  # (num_classes,) int32, real examples of each class seen


class TaskRingBuffer(NamedTuple):
    x: jax.Array  # (num_tasks * m, *input_shape) float32; task t owns slots [t m, (t + 1) m), m = slots_per_task
    y: jax.Array  # (num_tasks * m,) int32
    task_ids: jax.Array  # (num_tasks * m,) int32
    logits: jax.Array | None  # (num_tasks * m, num_logits) float32, or None
    valid: jax.Array  # (num_tasks * m,) bool
    count: jax.Array  # (num_tasks,) int32, real examples of each task seen


def _positive_int(name: str, value, fix: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; {fix}.") from None
    if v != value or v < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}; {fix}.")
    return v


def _shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
        raise ValueError(
            f"input_shape must be a non-empty tuple of sizes >= 1 (one example's shape), got {input_shape!r}."
        )
    return shape


def _slots(capacity, input_shape, num_logits):
    num_logits = int(num_logits)
    if num_logits < 0:
        raise ValueError(f"num_logits must be >= 0 (0: store no logits), got {num_logits}.")
    return (
        jnp.zeros((capacity, *input_shape), jnp.float32),
        jnp.zeros((capacity,), jnp.int32),
        jnp.zeros((capacity,), jnp.int32),
        jnp.zeros((capacity, num_logits), jnp.float32) if num_logits else None,  # no zero-size array: orbax
        jnp.zeros((capacity,), bool),
    )


def reservoir_buffer(capacity: int, input_shape: Sequence[int], num_logits: int = 0) -> ReservoirBuffer:
    """An empty reservoir buffer (Algorithm R) of ``capacity`` examples of ``input_shape``.

    Raises:
      ValueError: ``capacity < 1``, a bad ``input_shape`` or ``num_logits < 0``.
    """
    capacity = _positive_int("buffer capacity", capacity, "give the buffer at least one slot")
    return ReservoirBuffer(*_slots(capacity, _shape(input_shape), num_logits), jnp.zeros((), jnp.int32))


def class_balanced_buffer(
    capacity: int, input_shape: Sequence[int], num_classes: int, num_logits: int = 0
) -> ClassBalancedBuffer:
    """An empty class-balanced buffer: ``capacity // num_classes`` reservoir slots per class.

    Raises:
      ValueError: ``capacity < 1``, ``num_classes < 1``, or ``capacity < num_classes``
        (a class would get no slot).
    """
    capacity = _positive_int("buffer capacity", capacity, "give the buffer at least one slot")
    num_classes = _positive_int("num_classes", num_classes, "pass the number of labels of the stream")
    if capacity < num_classes:
        raise ValueError(
            f"a class-balanced buffer of capacity {capacity} cannot hold one example of each of {num_classes} "
            f"classes; use a capacity >= {num_classes} (a multiple of {num_classes} uses every slot)."
        )
    per_class = capacity // num_classes
    return ClassBalancedBuffer(
        *_slots(per_class * num_classes, _shape(input_shape), num_logits), jnp.zeros((num_classes,), jnp.int32)
    )


def task_ring_buffer(
    slots_per_task: int, num_tasks: int, input_shape: Sequence[int], num_logits: int = 0
) -> TaskRingBuffer:
    """An empty per-task ring memory: ``slots_per_task`` slots for each of ``num_tasks`` tasks.

    Raises:
      ValueError: ``slots_per_task < 1`` or ``num_tasks < 1``.
    """
    m = _positive_int("memory per task", slots_per_task, "give each task at least one slot")
    t = _positive_int("num_tasks", num_tasks, "pass the number of tasks of the stream")
    return TaskRingBuffer(*_slots(m * t, _shape(input_shape), num_logits), jnp.zeros((t,), jnp.int32))


def capacity(buffer) -> int:
    """The number of slots of ``buffer`` (static)."""
    return buffer.valid.shape[0]


def _group_positions(groups, real, num_groups, counts):
    """Position of each real example in its group's stream: ``counts[g] + earlier real examples of g``."""
    onehot = jax.nn.one_hot(groups, num_groups, dtype=jnp.int32) * real[:, None].astype(jnp.int32)
    before = jnp.cumsum(onehot, axis=0) - onehot  # real examples of the same group earlier in the batch
    in_range = (groups >= 0) & (groups < num_groups)
    g = jnp.clip(groups, 0, num_groups - 1)
    n = counts[g] + jnp.take_along_axis(before, g[:, None], axis=1)[:, 0]
    return n, real & in_range, counts + jnp.sum(onehot, axis=0)


def _reservoir_slots(n, key, size):
    """Algorithm R's slot in a reservoir of ``size`` for the example at stream position n, or -1 (not kept)."""
    j = jax.random.randint(key, n.shape, 0, jnp.maximum(n, 0) + 1)  # j ~ U{0..n}, one draw per example
    slot = jnp.where(n < size, n, j)
    return jnp.where(slot < size, slot, -1)


def _draws(buffer, batch: Batch, key):
    """(slot per example or -1, new count), before resolving slots taken twice in one batch."""
    real = batch.weights > 0
    cap = capacity(buffer)
    if isinstance(buffer, ReservoirBuffer):
        n = buffer.count + jnp.cumsum(real.astype(jnp.int32)) - 1
        slot = _reservoir_slots(n, key, cap)
        return jnp.where(real, slot, -1), buffer.count + jnp.sum(real, dtype=jnp.int32)
    if isinstance(buffer, ClassBalancedBuffer):
        c = buffer.count.shape[0]
        per = cap // c
        n, ok, count = _group_positions(batch.y.astype(jnp.int32), real, c, buffer.count)
        local = _reservoir_slots(n, key, per)
        slot = jnp.where(ok & (local >= 0), batch.y * per + local, -1)
        return slot, count
    if isinstance(buffer, TaskRingBuffer):
        t = buffer.count.shape[0]
        per = cap // t
        n, ok, count = _group_positions(batch.task_ids.astype(jnp.int32), real, t, buffer.count)
        slot = jnp.where(ok, batch.task_ids * per + n % per, -1)
        return slot, count
    raise TypeError(f"not a clx.replay buffer: {type(buffer).__name__}")


def insert(buffer, batch: Batch, key=None):
    """``buffer`` with the real examples of ``batch`` inserted (pure; jit- and vmap-able).

    Args:
      buffer: a ReservoirBuffer, ClassBalancedBuffer or TaskRingBuffer.
      batch: a :class:`clx.Batch`; ``x`` (B, ...) is reshaped to the buffer's input
        shape, examples with ``weights == 0`` (padding) are skipped, and
        ``batch.logits`` (B, num_logits) is stored when the buffer keeps logits.
        A class-balanced buffer skips labels outside ``[0, num_classes)``; a ring
        memory skips task ids outside ``[0, num_tasks)``.
      key: a PRNG key (reservoir and class-balanced buffers; a ring ignores it).

    Returns:
      The new buffer (same shapes and dtypes).

    Raises:
      ValueError: the buffer keeps logits and ``batch.logits`` is None or of the
        wrong width; a reservoir/class-balanced buffer without a key.
    """
    num_logits = 0 if buffer.logits is None else buffer.logits.shape[1]
    if num_logits and (batch.logits is None or batch.logits.shape[-1] != num_logits):
        got = None if batch.logits is None else tuple(batch.logits.shape)
        raise ValueError(
            f"this buffer stores logits of width {num_logits}, but the batch has logits {got}; insert a batch "
            "with the model's logits (the rule must declare 'batch')."
        )
    if key is None and not isinstance(buffer, TaskRingBuffer):
        raise ValueError(f"inserting into a {type(buffer).__name__} draws random slots: pass a PRNG key.")
    slot, count = _draws(buffer, batch, key)
    # An example is written only if no later example of the batch takes the same slot (the later one wins, as
    # item-by-item insertion): the scatter then has distinct slots.
    b = slot.shape[0]
    later = jnp.arange(b)[None, :] > jnp.arange(b)[:, None]
    overwritten = jnp.any(later & (slot[None, :] == slot[:, None]) & (slot[None, :] >= 0), axis=1)
    cap = capacity(buffer)
    idx = jnp.where((slot >= 0) & ~overwritten, slot, cap + jnp.arange(b))  # distinct, out of bounds: dropped

    def put(store, values):
        return store.at[idx].set(values.astype(store.dtype), mode="drop", unique_indices=True)

    x = put(buffer.x, batch.x.reshape(b, *buffer.x.shape[1:]))
    logits = put(buffer.logits, batch.logits) if num_logits else buffer.logits
    return type(buffer)(
        x,
        put(buffer.y, batch.y),
        put(buffer.task_ids, batch.task_ids),
        logits,
        put(buffer.valid, jnp.ones((b,), bool)),
        count.astype(jnp.int32),
    )


def sample(buffer, key, n: int, mask=None) -> Batch:
    """``n`` examples drawn uniformly without replacement from the filled slots (pure).

    Args:
      buffer: any clx.replay buffer.
      key: a PRNG key.
      n: static number of draws, at most the buffer's capacity.
      mask: optional (capacity,) bool, which slots may be drawn (e.g. A-GEM's
        "tasks before the current one"); combined with the filled slots.

    Returns:
      A :class:`clx.Batch` of ``n`` examples: ``x`` (n, *input_shape), ``y``,
      ``task_ids``, ``weights`` (1 for a drawn example, 0 where fewer than ``n``
      slots qualify, all 0 for an empty buffer) and ``logits`` (n, num_logits),
      the logits stored at insertion, or None when the buffer keeps none.

    Raises:
      ValueError: ``n < 1`` or ``n`` larger than the buffer's capacity.
    """
    cap = capacity(buffer)
    if int(n) != n or not 1 <= int(n) <= cap:
        raise ValueError(
            f"a replay batch of {n} cannot be drawn without replacement from a buffer of {cap} slots; use a "
            f"replay batch between 1 and {cap} or a larger buffer."
        )
    eligible = buffer.valid if mask is None else buffer.valid & mask
    scores = jnp.where(eligible, jax.random.uniform(key, (cap,)), -1.0)  # the n largest: a uniform n-subset
    _, idx = jax.lax.top_k(scores, int(n))
    weights = eligible[idx].astype(jnp.float32)
    logits = None if buffer.logits is None else buffer.logits[idx]
    return Batch(buffer.x[idx], buffer.y[idx], buffer.task_ids[idx], weights, logits)


def num_filled(buffer) -> jax.Array:
    """int32 scalar: the number of filled slots."""
    return jnp.sum(buffer.valid, dtype=jnp.int32)
