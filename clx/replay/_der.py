"""DER and DER++: dark experience replay.

Buzzega, Boschini, Porrello, Abati, Calderara (2020), "Dark Experience for General
Continual Learning: a Strong, Simple Baseline", NeurIPS, Algorithm 1 (DER and DER++).
A reservoir buffer keeps, with each example, the logits z the model gave it when it
was inserted (the step's forward pass, before the step's update). Each step adds to
the task loss

    DER:    alpha * MSE(h(x'), z'),              (x', z') ~ M
    DER++:  alpha * MSE(h(x'), z') + beta * CE(h(x''), y''),   (x'', y'') ~ M, drawn independently

and then inserts the current batch with its logits. As Mammoth's ``models/der.py`` and
``models/derpp.py`` (the authors' code): ``F.mse_loss``, the mean over every element
of the (n, k) logits of the draw; CE the mean over the draw; both terms skipped while
the buffer is empty (here: exactly 0, every draw has weight 0); the two DER++ draws of
``minibatch_size`` are independent (keys ``fold_in(key, 0)`` and ``fold_in(key, 2)``;
insertion ``fold_in(key, 1)``); the stored logits are the step's outputs as constants
(``outputs.data``). Draws are without replacement (Mammoth's ``get_data``); while the
buffer holds fewer than ``replay_batch_size`` examples, the means are over the examples
drawn.

Shapes: buffer x (buffer_size, *input_shape), logits (buffer_size, num_outputs), the
width of the model's logits (one head's for a multi-head model: each example is
replayed through the head of its stored task id).

Differences from the authors' code: none in the loss; Mammoth applies its data
augmentation to the buffer draws (not on MNIST).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation
from clx.replay._buffer import ReservoirBuffer, insert, reservoir_buffer, sample
from clx.replay._common import check_batch_size, check_size, check_weight, mean_ce
from clx.tree import concrete_float


class DERState(NamedTuple):
    buffer: ReservoirBuffer  # buffer_size slots of input_shape, with (buffer_size, num_outputs) logits


def der(
    buffer_size: int,
    input_shape: Sequence[int],
    num_outputs: int,
    alpha: float = 0.2,
    beta: float = 0.0,
    replay_batch_size: int | None = None,
    *,
    name: str = "der",
) -> ContinualTransformation:
    """DER (``beta=0``) or DER++ (``beta>0``; see :func:`derpp`), chained before the optimizer.

    ``clx.chain(clx.replay.der(200, (784,), 10, alpha=0.2), optax.sgd(0.03))``.

    Args:
      buffer_size: examples in the reservoir buffer.
      input_shape: one example's shape as the model takes it.
      num_outputs: the width of the model's logits (stored per example).
      alpha: weight of the logit-matching MSE (Mammoth Split MNIST, buffer 200: 0.2).
      beta: weight of the replayed cross-entropy (0: DER; DER++ on Split MNIST,
        buffer 200: 1.0). Floats or traced sweep values.
      replay_batch_size: examples per buffer draw (Mammoth's ``minibatch_size``);
        None: as many as the training batch.
      name: the rule's name.

    Returns:
      A ContinualTransformation with state ``DERState``, a loss term, and needs
      ``"batch"`` (``update`` inserts the batch and its logits) and ``"key"``.

    Raises:
      ValueError: ``buffer_size < 1``, ``num_outputs < 1``, a concrete negative
        ``alpha`` or ``beta``, ``replay_batch_size`` < 1 or larger than the buffer.
    """
    who = name
    buffer_size = check_size(who, "buffer_size", buffer_size)
    num_outputs = check_size(who, "num_outputs", num_outputs)
    check_weight(who, "alpha", alpha)
    check_weight(who, "beta", beta)
    if replay_batch_size is not None:
        replay_batch_size = check_batch_size(who, "replay_batch_size", replay_batch_size, buffer_size)
    reservoir_buffer(1, input_shape)  # checks input_shape now
    with_ce = concrete_float(beta) != 0.0  # a concrete beta of 0 (DER) skips the second draw's forward pass

    def init(params):
        del params
        return DERState(reservoir_buffer(buffer_size, input_shape, num_outputs))

    def loss(params, state, batch, apply_fn):
        n = replay_batch_size or check_batch_size(
            who, "the training batch (replay_batch_size=None)", batch.x.shape[0], buffer_size
        )
        mem = sample(state.buffer, jax.random.fold_in(batch.key, 0), n)
        sq = jnp.sum(jnp.square(apply_fn(params, mem.x, mem.task_ids) - mem.logits), axis=-1)
        mse = jnp.sum(mem.weights * sq) / (jnp.maximum(jnp.sum(mem.weights), 1.0) * num_outputs)
        total = alpha * mse
        if with_ce:
            mem2 = sample(state.buffer, jax.random.fold_in(batch.key, 2), n)
            total = total + beta * mean_ce(apply_fn(params, mem2.x, mem2.task_ids), mem2.y, mem2.weights)
        return total

    def update(updates, state, params=None, *, batch, key, **extra):
        del params, extra
        return updates, DERState(insert(state.buffer, batch, jax.random.fold_in(key, 1)))

    def consolidate(state, params, evidence):
        del params, evidence
        return None, state

    return ContinualTransformation(init, update, consolidate, loss=loss, needs=frozenset({"batch", "key"}), name=name)


def derpp(
    buffer_size: int,
    input_shape: Sequence[int],
    num_outputs: int,
    alpha: float = 0.2,
    beta: float = 1.0,
    replay_batch_size: int | None = None,
) -> ContinualTransformation:
    """DER++ (Buzzega et al. 2020, Algorithm 1): :func:`der` with the replayed cross-entropy weighted ``beta``.

    Defaults: Mammoth's Split-MNIST best arguments for buffer 200 (alpha 0.2, beta 1.0;
    there lr 0.03, minibatch_size 128, batch 10). Named "derpp"; raises as :func:`der`.
    """
    return der(buffer_size, input_shape, num_outputs, alpha, beta, replay_batch_size, name="derpp")
