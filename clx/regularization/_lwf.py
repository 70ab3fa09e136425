"""LwF: learning without forgetting, distillation to the previous model on the current inputs.

Li & Hoiem (2017), "Learning without Forgetting", TPAMI, Eqs. 2-3. At the end of each
task the params are kept as the old model theta_o; while task t > 0 trains, a loss term
on the current batch pulls the current outputs towards the old model's outputs on the
same inputs, with temperature T (the paper's T = 2):

    q = softmax(f(x; theta_o) / T)   (a constant),     log p = log_softmax(f(x; theta) / T)
    KD(x) = -sum_c q_c log p_c  *  T^2                (the soft cross-entropy, Hinton's T^2)

    loss term = alpha * w_t * mean over distilled heads of (the batch mean of KD)

The soft cross-entropy differs from KL(q || p) by the entropy of q, a constant, so
both give the same gradient. The term is a ``loss`` of the rule: the trainer adds it to
the task loss before its one backward pass, and for a shared head the current outputs
are the step's own live logits (``batch.logits``); the old model's outputs come from
``apply_fn(theta_o, batch.x, ...)`` under ``stop_gradient``. Zero on the first task.

Heads:

- one shared head (domain-IL, class-IL; ``num_tasks=None``): the logits are distilled.
  With ``classes_per_task=k`` (class-IL, labels t*k..(t+1)*k-1 as clx's
  ``split_class_il`` stream): the old model's targets cover the t*k classes seen
  before task t (zero probability elsewhere) and the current softmax the (t+1) k
  classes seen so far, as van de Ven's code does;
- one head per task (task-IL, ``num_tasks`` heads, ``apply(params, x, j)`` selects head
  j): the head of every old task j < t is distilled, each through ``apply_fn(params,
  batch.x, j)`` (vmapped over the ``num_tasks`` heads, masked to j < t; these outputs
  are not in the step's logits, which are the current task's head).

Weighting ``w_t``: "old_tasks" (default) weighs the mean over heads by the number t of
old tasks: in task-IL the sum over old heads, Li & Hoiem's ``sum_o lambda_o L_old``
with lambda_o = alpha; with a shared head ``t * KD``, the relative weight of van de
Ven & Tolias 2019 (their loss ``(1/(t+1)) L_new + (1 - 1/(t+1)) L_KD`` is this one times
1/(t+1), which Adam does not see). "constant": w_t = 1.

Options for van de Ven's 2019 code (GMvandeVen/continual-learning at 86802a8,
``utils.loss_fn_kd``): it multiplies by T^2 (``t_squared=True``, the default here) and
averages -q log p over the classes as well as the batch (``class_mean=True``: KD is
divided by the number of classes in the current softmax); his current code sums over
the classes and drops T^2 (``class_mean=False, t_squared=False``).

Shapes: ``old_params`` like the params.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation
from clx.regularization._common import MASKED_LOGIT, check_nonnegative, check_optional_int, check_positive, copy_tree

#: How the distillation of several old tasks is weighed (module docs).
LWF_WEIGHTINGS = ("old_tasks", "constant")


class LwFState(NamedTuple):
    old_params: object  # params-shaped: theta_o, the params at the end of the latest task
    num_tasks: jax.Array  # () int32, tasks finished so far (the old tasks distilled)


def _masked(z, num):
    """``z`` (..., C) with the classes c >= num taken out of the softmax (None: all kept)."""
    if num is None:
        return z
    return jnp.where(jnp.arange(z.shape[-1]) < num, z, MASKED_LOGIT)


def soft_cross_entropy(logits, target_logits, temperature, *, num_current=None, num_target=None):
    """Per-example ``-sum_c softmax(target/T)_c log_softmax(logits/T)_c`` (no T^2, no reduction).

    ``num_current`` / ``num_target`` (ints or traced scalars, or None) keep only the
    first classes in the current softmax / the targets (zero target probability
    elsewhere). Shapes: (..., C) -> (...).
    """
    q = jax.nn.softmax(_masked(target_logits / temperature, num_target), axis=-1)
    if num_target is not None:
        q = jnp.where(jnp.arange(q.shape[-1]) < num_target, q, 0.0)
    log_p = jax.nn.log_softmax(_masked(logits / temperature, num_current), axis=-1)
    return -jnp.sum(q * log_p, axis=-1)


def lwf(
    alpha: float = 1.0,
    temperature: float = 2.0,
    *,
    num_tasks: int | None = None,
    classes_per_task: int | None = None,
    t_squared: bool = True,
    class_mean: bool = False,
    weighting: str = "old_tasks",
) -> ContinualTransformation:
    """Learning without forgetting (Li & Hoiem 2017): a distillation loss term.

    ``clx.chain(clx.regularization.lwf(), optax.adam(1e-3))``.

    Args:
      alpha: the weight of the distillation (Li & Hoiem's lambda_o = 1); a float or a
        traced sweep value; 0 switches it off.
      temperature: T > 0 (2 in Li & Hoiem and van de Ven).
      num_tasks: None for a shared head; the number of heads of a multi-head
        (task-IL) model, static: every old task's head is distilled.
      classes_per_task: with a shared head in class-IL, k: distil only the classes
        seen so far (module docs); None: every output.
      t_squared: multiply by T^2 (Hinton et al.; van de Ven 2019).
      class_mean: divide by the number of classes in the current softmax (van de Ven
        2019's mean over classes).
      weighting: "old_tasks" or "constant" (module docs).

    Returns:
      A ContinualTransformation named "lwf" with state ``LwFState`` and a loss term;
      ``update`` leaves the gradient alone.

    Raises:
      ValueError: a concrete negative ``alpha``, a concrete ``temperature`` <= 0,
        ``num_tasks``/``classes_per_task`` < 1, both given, an unknown ``weighting``.
    """
    check_nonnegative("lwf", "alpha", alpha)
    check_positive("lwf", "temperature", temperature)
    num_tasks = check_optional_int("lwf", "num_tasks", num_tasks)
    classes_per_task = check_optional_int("lwf", "classes_per_task", classes_per_task)
    if num_tasks is not None and classes_per_task is not None:
        raise ValueError(
            "lwf: num_tasks (one head per task, task-IL) and classes_per_task (a shared class-IL head) exclude each "
            "other; pass num_tasks for a multi-head model, classes_per_task for class-IL."
        )
    if weighting not in LWF_WEIGHTINGS:
        raise ValueError(f"lwf: unknown weighting {weighting!r}; choose one of {LWF_WEIGHTINGS}.")
    scale = temperature**2 if t_squared else 1.0

    def batch_mean(kd, weights):  # kd (..., B) -> (...)
        return jnp.sum(kd * weights, axis=-1) / jnp.maximum(jnp.sum(weights), 1.0)

    def loss(params, state, batch, apply_fn):
        t = state.num_tasks
        old_tasks = t.astype(jnp.float32)
        if num_tasks is None:
            target = jax.lax.stop_gradient(apply_fn(state.old_params, batch.x, batch.task_ids))
            if classes_per_task is None:
                kd = soft_cross_entropy(batch.logits, target, temperature)
                classes = batch.logits.shape[-1]
            else:
                classes = (t + 1) * classes_per_task
                kd = soft_cross_entropy(
                    batch.logits, target, temperature, num_current=classes, num_target=t * classes_per_task
                )
            term = batch_mean(kd, batch.weights)
            term = term * (old_tasks if weighting == "old_tasks" else 1.0)
        else:
            heads = jnp.arange(num_tasks, dtype=jnp.int32)
            current = jax.vmap(lambda j: apply_fn(params, batch.x, j))(heads)  # (H, B, k)
            target = jax.lax.stop_gradient(jax.vmap(lambda j: apply_fn(state.old_params, batch.x, j))(heads))
            per_head = batch_mean(soft_cross_entropy(current, target, temperature), batch.weights)  # (H,)
            summed = jnp.sum(jnp.where(heads < t, per_head, 0.0))
            term = summed if weighting == "old_tasks" else summed / jnp.maximum(old_tasks, 1.0)
            classes = current.shape[-1]
        if class_mean:
            term = term / classes
        return alpha * jnp.where(t > 0, scale * term, 0.0)

    def init(params):
        return LwFState(copy_tree(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        del params, extra
        return updates, state

    def consolidate(state, params, evidence):
        del evidence
        return None, LwFState(copy_tree(params), state.num_tasks + 1)

    return ContinualTransformation(init, update, consolidate, loss=loss, name="lwf")
