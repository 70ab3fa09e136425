"""SGP: Scaled Gradient Projection.

Saha, Roy (2023), "Continual Learning with Scaled Gradient Projection", AAAI.

SGP keeps GPM's memory (the same bases, grown by the same energy criterion,
``clx.subspace.expand``) and gives every basis direction u_i an importance
lambda_i in [0, 1] from the singular values of the tasks' representations
(Eq. 2, alpha the scale coefficient):

    lambda_i = (alpha + 1) s_i / (alpha s_i + max_j s_j).

A layer's gradient is then projected with the scaled projector (Eq. 6):

    g  <-  (I - M diag(lambda) M^T) g,

so directions that carry little of the old tasks' energy stay partly trainable;
with every lambda_i = 1 this is GPM.

At each later task (Eqs. 3-5) the representation R is split into its part in the
stored span and the rest. The new directions come from R_hat = R - M M^T R as in
GPM; their s_i are R_hat's singular values. An old direction's new-task score is
the norm of R's component along it, ``s_j = ||u_j^T R||`` (the authors' code
computes it as ``sqrt(sum_k (u_j^T U_c,k)^2 S_c,k^2)`` from the SVD of
``M M^T R``: the same number). Old and new scores are scaled together by Eq. 2
(one max over the layer's stored directions), and an old direction's importance
accumulates: ``lambda_j <- min(lambda_j + lambda_j^new, 1)``.

Since a new direction u_i is a left singular vector of R_hat and orthogonal to
the old span, ``||u_i^T R|| = s_i`` too, so clx computes every score as a row norm
of ``M^T R`` on the expanded basis.

Differences from the authors' code (sahagobinda/SGP, ``update_SGP``): the first
task's rank follows GPM's Eq. 5 as ``clx.gpm`` does (the code keeps one
direction fewer); everything else (alpha = 10, the accumulation and the clip,
freezing 1-D parameters after the first task with ``freeze_vectors``) follows it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx import subspace as sub
from clx.core import ContinualTransformation
from clx.projection._gpm import _memory_rule
from clx.tree import concrete_float


class SGPState(NamedTuple):
    subspaces: dict[str, sub.Subspace]  # kernel path -> subspace of R^d, importance = SGP's lambda
    projectors: dict[str, jax.Array]  # kernel path -> (d, d) I - M diag(lambda) M^T


def sgp_importance(old: sub.Subspace, new: sub.Subspace, representation: jax.Array, alpha) -> jax.Array:
    """The importances of an expanded basis (Saha & Roy 2023, Eqs. 2 and 5).

    Args:
      old: the layer's subspace before this task (its ``importance`` accumulated so far).
      new: ``clx.subspace.expand(old, representation, threshold)``.
      representation: (d, n) the task's representation matrix R.
      alpha: the scale coefficient (> 0; a float or a traced scalar).

    Returns:
      (d,) float32: ``min(lambda_old + lambda_new, 1)`` on the old directions,
      ``lambda_new`` on the directions added for this task, 0 on unused columns;
      ``lambda_new = (alpha + 1) s / (alpha s + max s)`` with ``s = ||M^T R||``
      row-wise over the expanded basis M (max over its used columns).
    """
    coef = sub.matmul(new.basis.T, representation.astype(new.basis.dtype))
    score = jnp.where(new.mask, jnp.sqrt(jnp.sum(coef**2, axis=1)), 0.0)
    top = jnp.max(score)
    denom = alpha * score + top
    scaled = jnp.where(denom > 0, (alpha + 1.0) * score / jnp.where(denom > 0, denom, 1.0), 0.0)
    scaled = jnp.minimum(scaled, 1.0)  # exactly 1 at the max in exact arithmetic; float32 can round above
    accumulated = jnp.clip(scaled + old.importance, 0.0, 1.0)
    return jnp.where(old.mask, accumulated, jnp.where(new.mask, scaled, 0.0)).astype(new.importance.dtype)


def sgp(
    threshold: float | Sequence[float] | dict[str, float] | Callable = 0.97,
    alpha: float = 10.0,
    num_samples: int | Sequence[int] | dict[str, int] = 300,
    layers: Sequence[str] | None = None,
    freeze_vectors: bool = False,
) -> ContinualTransformation:
    """Scaled Gradient Projection (Saha & Roy 2023, Algorithm 1).

    Chain it before the optimizer, as GPM: ``clx.chain(clx.sgp(0.97, alpha=10.0), optax.sgd(0.05))``.

    Args:
      threshold: GPM's energy threshold in (0, 1] (Eqs. 1 and 5), per layer as
        for :func:`clx.gpm` (a float, a sequence, a dict or a function of the
        task index; the paper's CIFAR-100 setup: ``lambda t: 0.97 + 0.003 * t``).
      alpha: the scale coefficient of Eq. 2 (> 0; the authors' ``scale_coff``,
        default 10; a traced scalar in a sweep). Large alpha takes every importance to 1 (GPM).
      num_samples, layers, freeze_vectors: as for :func:`clx.gpm` (the authors'
        SGP code freezes every 1-D parameter after the first task).

    Returns:
      A ContinualTransformation named "sgp" with state :class:`SGPState`
      (``subspaces[path].importance`` holds the lambdas), needing ``"taps"`` and
      ``"representations"`` as GPM.

    Raises:
      ValueError: ``alpha`` not a finite number > 0, and everything :func:`clx.gpm` raises.
    """
    try:
        value = concrete_float(alpha)  # None for a traced sweep value (checked by the sweep's own range)
    except (TypeError, ValueError):
        raise ValueError(f"sgp: alpha must be a number > 0 (the paper uses 10), got {alpha!r}.") from None
    if value is not None:
        if not (value > 0 and value < float("inf")):
            raise ValueError(f"sgp: alpha must be a finite number > 0 (the paper uses 10), got {value}.")
        alpha = value

    def importance(old, new, rep):
        return sgp_importance(old, new, rep, alpha)

    return _memory_rule("sgp", threshold, num_samples, layers, freeze_vectors, importance, SGPState)
