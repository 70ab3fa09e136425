"""ER: experience replay with a reservoir buffer.

Chaudhry, Rohrbach, Elhoseiny, Ajanthan, Dokania, Torr, Ranzato (2019), "On Tiny
Episodic Memories in Continual Learning" (arXiv:1902.10486), experience replay with
a reservoir memory ("ER-reservoir"). Every step trains on the current batch B_t and a
batch B_M drawn from the memory M, and then adds B_t to M by reservoir sampling.

The loss is the mean cross-entropy over the concatenation of the two batches, as
the authors' code (``fc_permute_mnist.py``, ``er_train_x_batch = concatenate(...)``)
and Mammoth's ``models/er.py`` (``inputs = torch.cat((inputs, buf_inputs))``, one
``self.loss``, a mean) both do:

    L = (sum_{i in B_t} CE_i + sum_{j in B_M} CE_j) / (|B_t| + |B_M|)

so with |B_M| = |B_t| each half is weighted 1/2 (the concatenation halves the task
loss once the buffer holds anything; with an empty buffer L is the plain task loss).
The trainer already adds the mean task loss CE_t = sum_{B_t} CE_i / |B_t|; this
rule's loss term is the difference,

    L - CE_t = |B_M| / (|B_t| + |B_M|) * (CE_M - CE_t),     CE_M = sum_{B_M} CE_j / |B_M|,

which is exactly 0 (and has an exactly-zero gradient) while the buffer is empty.
|B_t| and |B_M| count real examples (weight 1): padding of an epoch's last batch is
left out, and |B_M| is the number of examples drawn (fewer than asked while the
buffer holds fewer, as Mammoth's ``get_data``). B_M is drawn without replacement,
uniformly from the filled slots, in the loss term (key ``fold_in(key, 0)``), before
the step's insertion (``update``, ``fold_in(key, 1)``), as in Mammoth.

Shapes: the buffer holds ``buffer_size`` examples of ``input_shape`` (what the
model's ``apply`` takes for one example; ``batch.x`` is reshaped to it), their
labels and task ids (multi-head models replay each example through its own head).

Differences from the authors' code: none in the update; the reservoir draws j ~
U{0..n} (Vitter's Algorithm R, as Mammoth), where the A-GEM repository's
``update_reservior`` draws U{0..n-1}.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation
from clx.replay._buffer import ReservoirBuffer, insert, reservoir_buffer, sample
from clx.replay._common import check_batch_size, check_size, mean_ce, weighted_ce


class ERState(NamedTuple):
    buffer: ReservoirBuffer  # buffer_size slots of input_shape


def er(buffer_size: int, input_shape: Sequence[int], replay_batch_size: int | None = None) -> ContinualTransformation:
    """Experience replay (Chaudhry et al. 2019) with a reservoir buffer, chained before the optimizer.

    ``clx.chain(clx.replay.er(200, (784,)), optax.sgd(0.1))``.

    Args:
      buffer_size: examples in the buffer (Mammoth's Split-MNIST grid: 200, 500, 5120).
      input_shape: one example's shape as the model takes it (``(784,)`` for a
        flattening MLP on MNIST, ``(28, 28, 1)`` for a CNN).
      replay_batch_size: examples drawn from the buffer per step; None: as many as
        the training batch (Mammoth's ``minibatch_size`` = ``batch_size`` on Split MNIST).

    Returns:
      A ContinualTransformation named "er" with state ``ERState``, a loss term, and
      needs ``"batch"`` (``update`` inserts the step's batch) and ``"key"``.

    Raises:
      ValueError: ``buffer_size < 1``, a bad ``input_shape``, ``replay_batch_size``
        < 1 or larger than ``buffer_size`` (also when None resolves to a training
        batch larger than the buffer, at trace time).
    """
    buffer_size = check_size("er", "buffer_size", buffer_size)
    if replay_batch_size is not None:
        replay_batch_size = check_batch_size("er", "replay_batch_size", replay_batch_size, buffer_size)
    reservoir_buffer(1, input_shape)  # checks input_shape now

    def init(params):
        del params
        return ERState(reservoir_buffer(buffer_size, input_shape))

    def loss(params, state, batch, apply_fn):
        n = replay_batch_size or check_batch_size(
            "er", "the training batch (replay_batch_size=None)", batch.x.shape[0], buffer_size
        )
        mem = sample(state.buffer, jax.random.fold_in(batch.key, 0), n)
        s_m, v = weighted_ce(apply_fn(params, mem.x, mem.task_ids), mem.y, mem.weights)
        w = jnp.sum(batch.weights)
        ce_t = mean_ce(batch.logits, batch.y, batch.weights)
        return v / jnp.maximum(w + v, 1.0) * (s_m / jnp.maximum(v, 1.0) - ce_t)

    def update(updates, state, params=None, *, batch, key, **extra):
        del params, extra
        return updates, ERState(insert(state.buffer, batch, jax.random.fold_in(key, 1)))

    def consolidate(state, params, evidence):
        del params, evidence
        return None, state

    return ContinualTransformation(init, update, consolidate, loss=loss, needs=frozenset({"batch", "key"}), name="er")
