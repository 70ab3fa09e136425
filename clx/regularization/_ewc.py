"""EWC and online EWC: a Fisher-weighted quadratic pull towards old tasks' params.

Kirkpatrick, Pascanu, Rabinowitz, Veness, Desjardins, Rusu, Milan, Quan, Ramalho,
Grabska-Barwinska, Hassabis, Clopath, Kumaran, Hadsell (2017), "Overcoming catastrophic
forgetting in neural networks", PNAS, Eq. 3 (offline EWC: one penalty per old task):

    L(theta) = L_t(theta) + sum_{s<t} lam/2 sum_i F_{s,i} (theta_i - theta*_{s,i})^2

Schwarz, Czarnecki, Luketina, Grabska-Barwinska, Teh, Pascanu, Hadsell (2018),
"Progress & Compress: A scalable framework for continual learning", ICML, Sec. 2.1
(online EWC: one running Fisher, one penalty at the latest params):

    F*_t = gamma F*_{t-1} + F_t,
    L(theta) = L_t(theta) + lam/2 sum_i gamma F*_{t-1,i} (theta_i - theta*_{t-1,i})^2

(the decay gamma also weighs the penalty, as in Schwarz et al. and van de Ven's code).

Both are applied as the analytic penalty gradient added in ``update`` (elementwise, no
second backward pass): chain the rule before the optimizer,
``clx.chain(clx.regularization.ewc(1e5), optax.adam(1e-3))``.

Offline EWC in O(1) state. The gradient of the sum of per-task penalties is

    sum_s lam F_s (theta - theta*_s) = lam (A theta - b),   A = sum_s F_s,  b = sum_s F_s theta*_s,

exact and of fixed size whatever the number of tasks. clx stores A and the
precision-weighted mean anchor m = b / A (m_i = the latest anchor where A_i = 0), and
computes lam A (theta - m): the same quantity (A m = b), but theta - m subtracts two
nearby numbers instead of A theta - b two large ones, so it keeps float32 precision near
the anchor. ``consolidate`` updates m as the convex combination
m <- m + (F_t / (A + F_t)) (theta*_t - m).

The Fisher (:func:`clx.regularization.diagonal_fisher`) is computed at ``consolidate``
from the evidence sample, by default as the true Fisher (the expectation over the
model's own predictions); mean of per-example squared gradients.

Step size: the penalty's gradient is lam * F * (theta - anchor), so with plain SGD the
pull overshoots and diverges where lr * lam * F_i > 2; van de Ven's large lambdas
(1e5..1e10) are meant for Adam, which normalises the step.

Shapes: every state field but the counter is shaped like the params.

Differences from the authors' code: Kirkpatrick et al. published none. Against van de
Ven's (GMvandeVen/continual-learning, ``estimate_fisher``, ``ewc_loss``): it estimates the
Fisher with batch size 1 on the whole task (``fisher_n=None``; here the first
``num_samples`` of the evidence, the whole task in the registry's default), in class-IL
over the classes seen so far (here ``classes_per_task``), and its 2019 version with the
predicted label (here ``fisher="predicted"``); the penalty is the same.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation, Evidence
from clx.regularization._common import (
    check_nonnegative,
    check_optional_int,
    copy_tree,
    need_params,
    penalty_gradient,
)
from clx.regularization._fisher import check_variant, diagonal_fisher
from clx.tree import concrete_float


class EWCState(NamedTuple):
    precision: object  # params-shaped: A = sum over old tasks of their diagonal Fishers (0 before task 1)
    anchor: object  # params-shaped: m, the precision-weighted mean of the old tasks' params
    num_tasks: jax.Array  # () int32, consolidations so far


class OnlineEWCState(NamedTuple):
    fisher: object  # params-shaped: F*, the decayed running sum of the Fishers (0 before task 1)
    anchor: object  # params-shaped: theta*, the params at the end of the latest task
    num_tasks: jax.Array  # () int32, consolidations so far


def _fisher_fn(who, fisher, num_samples, chunk_size, seed, classes_per_task):
    check_variant(who, fisher)
    num_samples = check_optional_int(who, "num_samples", num_samples)
    chunk_size = check_optional_int(who, "chunk_size", chunk_size)
    classes_per_task = check_optional_int(who, "classes_per_task", classes_per_task)

    def task_fisher(params, evidence: Evidence):
        x, y = evidence.x, evidence.y
        if num_samples is not None:
            if x.shape[0] < num_samples:
                raise ValueError(
                    f"{who}: the evidence holds {x.shape[0]} examples but num_samples={num_samples}; collect a "
                    "larger evidence sample or lower num_samples."
                )
            x, y = x[:num_samples], y[:num_samples]
        active = None if classes_per_task is None else (evidence.task_id + 1) * classes_per_task
        return diagonal_fisher(
            evidence.apply_fn,
            params,
            x,
            y,
            evidence.task_id,
            variant=fisher,
            seed=seed,
            chunk_size=chunk_size,
            num_active=active,
            apply_with_taps=evidence.apply_with_taps,
        )

    return task_fisher


def ewc(
    lam: float,
    fisher: str = "true",
    *,
    num_samples: int | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    classes_per_task: int | None = None,
) -> ContinualTransformation:
    """Offline EWC (Kirkpatrick et al. 2017, Eq. 3): one quadratic penalty per old task, O(1) state.

    ``update`` adds ``lam * A * (theta - m)`` to the gradient, the gradient of
    ``sum_s lam/2 sum_i F_{s,i} (theta_i - theta*_{s,i})^2`` (module docs);
    ``consolidate`` adds the finished task's Fisher at the current params.

    Args:
      lam: the penalty strength lambda >= 0 (a float or a traced sweep value). No
        paper-wide default: van de Ven & Tolias 2019 use 1e5 / 1e10 / 1e9 on Split
        MNIST task / domain / class-IL and 100 on Permuted MNIST.
      fisher: the Fisher variant, one of ``clx.regularization.FISHER_VARIANTS``:
        "true" (default: the expectation over the model's predictive distribution),
        "empirical" (true labels), "sample" (one label sampled from the model's
        prediction), "predicted" (its argmax).
      num_samples: examples of the evidence used for the Fisher (its first
        ``num_samples``; None: all of it).
      chunk_size: examples per chunk of per-example gradients (None: automatic).
      seed: seeds the "sample" labels (folded with the task id).
      classes_per_task: None (the softmax over every output), or k: in class-IL, the
        Fisher of task t is taken over the (t+1) k classes seen so far (van de Ven).

    Returns:
      A ContinualTransformation named "ewc" with state ``EWCState``; it needs nothing
      beyond ``params`` and never moves the params.

    Raises:
      ValueError: a concrete negative ``lam``, an unknown ``fisher`` variant,
        ``num_samples``/``chunk_size``/``classes_per_task`` < 1; in ``update``, no
        params; at ``consolidate``, fewer evidence examples than ``num_samples``.
    """
    check_nonnegative("ewc", "lam", lam)
    task_fisher = _fisher_fn("ewc", fisher, num_samples, chunk_size, seed, classes_per_task)

    def init(params):
        return EWCState(jax.tree.map(jnp.zeros_like, params), copy_tree(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        del extra
        need_params("ewc", params)
        return penalty_gradient(updates, params, lam, state.precision, state.anchor), state

    def consolidate(state, params, evidence):
        f = task_fisher(params, evidence)

        def merge(m, f_t, total, p):  # m + (F_t / A') (theta*_t - m), a convex combination; theta*_t where A' = 0
            share = f_t / jnp.where(total > 0, total, 1.0)
            return jnp.where(total > 0, m + share * (p - m), p)

        precision = jax.tree.map(jnp.add, state.precision, f)
        anchor = jax.tree.map(merge, state.anchor, f, precision, params)
        return None, EWCState(precision, anchor, state.num_tasks + 1)

    return ContinualTransformation(init, update, consolidate, name="ewc")


def online_ewc(
    lam: float,
    gamma: float = 1.0,
    fisher: str = "true",
    *,
    num_samples: int | None = None,
    chunk_size: int | None = None,
    seed: int = 0,
    classes_per_task: int | None = None,
) -> ContinualTransformation:
    """Online EWC (Schwarz et al. 2018): F* <- gamma F* + F_t, one penalty at the latest params.

    ``update`` adds ``lam * gamma * F* * (theta - theta*)`` to the gradient;
    ``consolidate`` sets ``F* <- gamma F* + F_t`` and ``theta* <- theta``.

    Args:
      lam: the penalty strength lambda >= 0 (a float or a traced sweep value).
      gamma: the decay of older Fishers, in (0, 1] (1.0 in van de Ven & Tolias 2019;
        a float or a traced sweep value).
      fisher: the Fisher variant, one of ``clx.regularization.FISHER_VARIANTS``:
        "true" (default: the expectation over the model's predictive distribution),
        "empirical" (true labels), "sample" (one label sampled from the model's
        prediction), "predicted" (its argmax).
      num_samples: examples of the evidence used for the Fisher (its first
        ``num_samples``; None: all of it).
      chunk_size: examples per chunk of per-example gradients (None: automatic).
      seed: seeds the "sample" labels (folded with the task id).
      classes_per_task: None (the softmax over every output), or k: in class-IL, the
        Fisher of task t is taken over the (t+1) k classes seen so far (van de Ven).

    Returns:
      A ContinualTransformation named "online_ewc" with state ``OnlineEWCState``.

    Raises:
      ValueError: a concrete negative ``lam``, a concrete ``gamma`` outside (0, 1],
        an unknown ``fisher`` variant, ``num_samples``/``chunk_size``/``classes_per_task``
        < 1; in ``update``, no params; at ``consolidate``, too few evidence examples.
    """
    check_nonnegative("online_ewc", "lam", lam)
    g = concrete_float(gamma)
    if g is not None and not 0.0 < g <= 1.0:
        raise ValueError(
            f"online_ewc: gamma must lie in (0, 1], got {g}; 1.0 keeps every old Fisher at full weight, "
            "smaller values forget older tasks' Fishers geometrically."
        )
    task_fisher = _fisher_fn("online_ewc", fisher, num_samples, chunk_size, seed, classes_per_task)

    def init(params):
        return OnlineEWCState(jax.tree.map(jnp.zeros_like, params), copy_tree(params), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        del extra
        need_params("online_ewc", params)
        return penalty_gradient(updates, params, lam * gamma, state.fisher, state.anchor), state

    def consolidate(state, params, evidence):
        f = task_fisher(params, evidence)
        running = jax.tree.map(lambda old, new: gamma * old + new, state.fisher, f)
        return None, OnlineEWCState(running, copy_tree(params), state.num_tasks + 1)

    return ContinualTransformation(init, update, consolidate, name="online_ewc")
