"""A-GEM: averaged gradient episodic memory.

Chaudhry, Ranzato, Rohrbach, Elhoseiny (2019), "Efficient Lifelong Learning with
A-GEM", ICLR, Eq. 11. With g the task gradient and g_ref the gradient of the loss on
a random batch from the episodic memory of all earlier tasks,

    g  <-  g - (g . g_ref / g_ref . g_ref) g_ref     if g . g_ref < 0,   else g,

over the whole parameter vector (every leaf of the pytree). After the projection
g . g_ref = 0 >= 0; an update that did not increase the memory loss is untouched.

Memory, as the authors' code (``fc_permute_mnist.py``, ``imp_method == 'A-GEM'``): an
episodic memory of a fixed number of samples per task, written while the task trains
(every batch goes into the current task's slots) and used as reference only for the
tasks before the current one; the reference batch is ``reference_batch_size`` (256,
``EPS_MEM_BATCH_SIZE``) examples drawn without replacement from the filled memory of
those tasks (all of it while it holds fewer). During the first task there is no
reference and g is unchanged.

Shapes: memory (num_tasks * memory_per_task, *input_shape) in a
:class:`TaskRingBuffer`; g_ref is params-shaped. ``update`` takes the raw gradient,
so chain A-GEM before the optimizer.

Differences from the authors' code: their memory is a ring per class within each
task (``mem_size`` = 25 per class, 250 per task on MNIST); clx keeps one ring per
task (its last ``memory_per_task`` examples, default 250). Mammoth's ``models/agem.py``
instead stores one training batch per task at the task's end.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation
from clx.replay._buffer import TaskRingBuffer, insert, sample, task_ring_buffer
from clx.replay._common import check_batch_size, check_size, tree_dot


class AGEMState(NamedTuple):
    memory: TaskRingBuffer  # num_tasks * memory_per_task slots of input_shape


def project_agem(g, g_ref):
    """A-GEM's Eq. 11 on pytrees: ``g - (g.g_ref / g_ref.g_ref) g_ref`` if ``g.g_ref < 0``, else ``g`` exactly."""
    dot = tree_dot(g, g_ref)
    norm = tree_dot(g_ref, g_ref)
    violated = dot < 0
    coef = jnp.where(violated, dot / jnp.where(norm > 0, norm, 1.0), 0.0)
    return jax.tree.map(lambda a, r: jnp.where(violated, a - coef.astype(a.dtype) * r, a), g, g_ref)


def agem(
    memory_per_task: int, num_tasks: int, input_shape: Sequence[int], reference_batch_size: int = 256
) -> ContinualTransformation:
    """A-GEM (Chaudhry et al. 2019, Eq. 11), chained before the optimizer.

    ``clx.chain(clx.replay.agem(250, 10, (784,)), optax.sgd(0.1))``.

    Args:
      memory_per_task: episodic-memory slots per task (the authors' MNIST: 250).
      num_tasks: tasks the memory holds (static; examples of a task id >= num_tasks
        are not stored, so build it with the stream's number of tasks).
      input_shape: one example's shape as the model takes it.
      reference_batch_size: examples in the reference batch (the paper: 256).

    Returns:
      A ContinualTransformation named "agem" with state ``AGEMState`` that needs
      ``"batch"`` (the memory stores it), ``"grad_fn"`` (the reference gradient)
      and ``"key"`` (the reference draw).

    Raises:
      ValueError: ``memory_per_task < 1``, ``num_tasks < 1``, a bad
        ``input_shape``, ``reference_batch_size`` < 1 or larger than the memory.
    """
    memory_per_task = check_size("agem", "memory_per_task", memory_per_task)
    num_tasks = check_size("agem", "num_tasks", num_tasks)
    reference_batch_size = check_batch_size(
        "agem", "reference_batch_size", reference_batch_size, memory_per_task * num_tasks
    )
    task_ring_buffer(1, 1, input_shape)  # checks input_shape now

    def init(params):
        del params
        return AGEMState(task_ring_buffer(memory_per_task, num_tasks, input_shape))

    def update(updates, state, params=None, *, task_id, batch, grad_fn, key, **extra):
        del extra
        old = state.memory.task_ids < task_id
        ref = sample(state.memory, jax.random.fold_in(key, 0), reference_batch_size, mask=old)
        g_ref = grad_fn(params, ref)  # zeros when nothing is drawn (every weight 0)
        # The draw reads the memory and the insert writes it: tie the memory to g_ref so the read is done first and
        # the insert can write in place (else XLA copies the whole memory every step, as the trainer's note says).
        g_ref, memory = jax.lax.optimization_barrier((g_ref, state.memory))
        return project_agem(updates, g_ref), AGEMState(insert(memory, batch))

    def consolidate(state, params, evidence):
        del params, evidence
        return None, state

    return ContinualTransformation(init, update, consolidate, needs=frozenset({"batch", "grad_fn", "key"}), name="agem")
