"""L2: an isotropic quadratic pull towards the previous task's params.

The baseline of the regularization papers (e.g. Kirkpatrick et al. 2017, Fig. 2A, "L2";
van de Ven et al. 2022): while task t > 0 trains,

    L(theta) = L_t(theta) + lam/2 ||theta - theta*_{t-1}||^2,

theta*_{t-1} the params at the end of task t-1; no penalty on task 0. The penalty
enters as its analytic gradient ``lam (theta - theta*)``, added in ``update`` (chain the
rule before the optimizer). EWC with every Fisher entry 1, without the sum over tasks.

Shapes: ``anchor`` is shaped like the params.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation
from clx.regularization._common import check_nonnegative, copy_tree, need_params


class L2State(NamedTuple):
    anchor: object  # params-shaped: theta*, the params at the end of the latest task
    active: jax.Array  # () float32: 1.0 once a task has ended (the penalty is on), 0.0 before
    num_tasks: jax.Array  # () int32, consolidations so far


def l2(lam: float) -> ContinualTransformation:
    """An L2 penalty ``lam/2 ||theta - theta_{t-1}||^2`` to the previous task's params.

    Args:
      lam: the penalty strength >= 0 (a float or a traced sweep value); no paper
        default, tune it per benchmark.

    Returns:
      A ContinualTransformation named "l2" with state ``L2State``.

    Raises:
      ValueError: a concrete negative ``lam``; in ``update``, no params.
    """
    check_nonnegative("l2", "lam", lam)

    def init(params):
        return L2State(copy_tree(params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

    def update(updates, state, params=None, **extra):
        del extra
        need_params("l2", params)
        weight = lam * state.active
        return jax.tree.map(lambda g, p, a: g + weight * (p - a).astype(g.dtype), updates, params, state.anchor), state

    def consolidate(state, params, evidence):
        del evidence
        return None, L2State(copy_tree(params), jnp.ones((), jnp.float32), state.num_tasks + 1)

    return ContinualTransformation(init, update, consolidate, name="l2")
