"""The diagonal Fisher information from per-example gradients (EWC, online EWC).

For a model with predictive distribution p(c | x, theta) = softmax(f(x; theta))_c on
n examples x_1..x_n, the diagonal of the Fisher information is estimated as the mean
over examples of squared per-example gradients of a log-likelihood:

    "true"       F = 1/n sum_i sum_c p_c(x_i) (d log p_c(x_i) / d theta)^2
                 (the expectation over the model's own predictive distribution;
                 van de Ven's ``fisher_labels='all'``, the definition of the Fisher)
    "empirical"  F = 1/n sum_i (d log p_{y_i}(x_i) / d theta)^2   (the true labels y_i)
    "sample"     F = 1/n sum_i (d log p_{c_i}(x_i) / d theta)^2,  c_i ~ p(. | x_i)
                 (one label per example sampled from the model's prediction; an
                 unbiased one-sample estimate of "true")
    "predicted"  F = 1/n sum_i (d log p_{c_i}(x_i) / d theta)^2,  c_i = argmax p(. | x_i)
                 (van de Ven's 2019 code, the "Three scenarios" runs)

Always the mean of per-example squares (``jax.vmap(jax.grad(...))``), never the square
of a mini-batch mean gradient (which shrinks with the batch size). The examples are
processed ``chunk_size`` at a time (a ``lax.scan`` over chunks), so the memory is that
of ``chunk_size`` per-example gradients whatever n is; by default as many as fit 2^24
floats (a 500k-parameter MLP: 33 examples a chunk). "true" costs one backward pass per
class per example (van de Ven's code does the same).

Keys for "sample": example i (its index in ``x``) draws its label with
``jax.random.categorical(fold_in(fold_in(key(seed), task_id), i), log p(. | x_i))``,
so the estimate does not depend on the chunk size.

``num_active`` (an int or traced int32 scalar) keeps only the first ``num_active``
outputs in the softmax, as van de Ven does for class-IL (the classes seen so far).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from clx.regularization._common import MASKED_LOGIT, check_optional_int, chunk_size_for, num_params, sum_over_chunks

#: The Fisher variants of :func:`diagonal_fisher`.
FISHER_VARIANTS = ("true", "empirical", "sample", "predicted")


def check_variant(who: str, variant: str) -> str:
    """``variant`` if it is one of :data:`FISHER_VARIANTS`, else ValueError naming the choices."""
    if variant not in FISHER_VARIANTS:
        raise ValueError(
            f"{who}: unknown Fisher variant {variant!r}; choose one of {FISHER_VARIANTS} "
            "('true': the expectation over the model's predictions, the default)."
        )
    return variant


def _log_probs(apply_fn, params, x_i, task_id, num_active):
    logits = apply_fn(params, x_i[None], task_id)[0]
    if num_active is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < num_active, logits, MASKED_LOGIT)
    return jax.nn.log_softmax(logits)


def diagonal_fisher(
    apply_fn: Callable,
    params,
    x: jax.Array,
    y: jax.Array,
    task_id,
    *,
    variant: str = "true",
    seed=0,
    chunk_size: int | None = None,
    num_active=None,
):
    """The diagonal Fisher information of ``apply_fn`` at ``params`` on the examples ``x``.

    Args:
      apply_fn: ``apply_fn(params, x, task_id) -> logits`` (B, C).
      params: the params pytree.
      x: (n, ...) float32 inputs.
      y: (n,) int32 labels (read by "empirical" only).
      task_id: int32 scalar passed to ``apply_fn`` (selects the head of a multi-head
        model) and folded into the "sample" keys.
      variant: one of :data:`FISHER_VARIANTS` (module docs).
      seed: an int (or traced int32) seeding the "sample" labels.
      chunk_size: examples per chunk (None: as many as fit 2^24 floats of
        per-example gradients). The result does not depend on it.
      num_active: None (every output) or the number of leading outputs kept in the
        softmax (the rest are masked out).

    Returns:
      A pytree shaped like ``params``: the mean over the n examples of the
      per-example squared log-likelihood gradients.

    Raises:
      ValueError: an unknown variant, ``chunk_size < 1``, an empty ``x``.
    """
    check_variant("diagonal_fisher", variant)
    chunk_size = check_optional_int("diagonal_fisher", "chunk_size", chunk_size)
    n = int(x.shape[0])
    if n < 1:
        raise ValueError("diagonal_fisher: x holds no examples; pass at least one.")
    num_classes = int(jax.eval_shape(lambda p: apply_fn(p, x[:1], task_id), params).shape[-1])
    per_class = num_classes if variant == "true" else 1
    chunk = chunk_size_for(n, num_params(params) * (2 if per_class > 1 else 1), chunk_size)
    return _fisher(
        apply_fn, params, x, jnp.asarray(y, jnp.int32), task_id, seed, num_active, variant=variant, chunk=chunk
    )


@functools.partial(jax.jit, static_argnames=("apply_fn", "variant", "chunk"))
def _fisher(apply_fn, params, x, y, task_id, seed, num_active, *, variant, chunk):
    """The body of :func:`diagonal_fisher`, jitted so eager callers with the same model and shapes compile once."""
    n = x.shape[0]
    num_classes = jax.eval_shape(lambda p: apply_fn(p, x[:1], task_id), params).shape[-1]
    base_key = jax.random.fold_in(jax.random.key(seed), task_id)

    def grad_of_class(vjp, c):
        (g,) = vjp(jax.nn.one_hot(c, num_classes, dtype=jnp.float32))
        return g

    def per_example(x_i, i, y_i):
        logp, vjp = jax.vjp(lambda p: _log_probs(apply_fn, p, x_i, task_id, num_active), params)
        if variant == "true":
            probs = jax.lax.stop_gradient(jnp.exp(logp))

            def add_class(acc, c):
                g = grad_of_class(vjp, c)
                return jax.tree.map(lambda a, gc: a + probs[c] * jnp.square(gc), acc, g), None

            acc, _ = jax.lax.scan(add_class, jax.tree.map(jnp.zeros_like, params), jnp.arange(num_classes))
            return acc
        if variant == "empirical":
            label = y_i
        elif variant == "sample":
            label = jax.random.categorical(jax.random.fold_in(base_key, i), jax.lax.stop_gradient(logp))
        else:  # predicted
            label = jnp.argmax(logp)
        return jax.tree.map(jnp.square, grad_of_class(vjp, label))

    total = sum_over_chunks(per_example, params, x, (y,), chunk)
    return jax.tree.map(lambda t: t / n, total)
