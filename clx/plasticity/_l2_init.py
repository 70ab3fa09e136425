"""L2 Init: an L2 pull towards the initial params, at every step.

Kumar, Marklund & Van Roy 2023, "Maintaining Plasticity in Continual Learning via
Regenerative Regularization", Section 3:

    L_reg(theta) = L_train(theta) + lam ||theta - theta_0||_2^2,

theta_0 the params at time step 0 (no 1/2: the gradient of the term is
``2 lam (theta - theta_0)``). The penalty enters as that analytic gradient, added in
``update`` (chain the rule before the optimizer, so with Adam it is the paper's coupled
L2 term through Adam, as a PyTorch loss term is). Unlike ``clx.regularization.l2`` the
anchor never moves: it is the exact copy of the params given to ``init``, for every task.

The paper's values (Appendix A.1.3, Table 3): lam = 1e-2 on Permuted MNIST with SGD
(lr 1e-2) and with Adam (lr 1e-3), swept over {1e-2, 1e-3, 1e-4, 1e-5}; 1e-3 on
Continual ImageNet; "a single value, lam = 1e-2, achieves the best performance across
problems" (A.2.5).

Shapes: ``init_params`` is shaped like the params.
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from clx.core import ContinualTransformation
from clx.plasticity._common import check_nonnegative, copy_tree, need_params


class L2InitState(NamedTuple):
    init_params: object  # params-shaped: theta_0, a copy of the params handed to init (never changed)


def l2_init(lam) -> ContinualTransformation:
    """L2 Init: adds ``2 lam (theta - theta_0)``, the gradient of ``lam ||theta - theta_0||^2``, to the updates.

    Kumar, Marklund & Van Roy 2023, Eq. in Section 3 (the penalty has no 1/2). The
    penalty is on from the first step of the first task; ``consolidate`` moves
    nothing and keeps the state (theta_0 stays the initial params).

    Args:
      lam: the strength lambda >= 0 (a float or a traced sweep value); the paper's
        Permuted MNIST value is 1e-2.

    Returns:
      A ContinualTransformation named "l2_init" with state :class:`L2InitState`;
      chain it before the optimizer: ``clx.chain(l2_init(1e-2), optax.sgd(1e-2))``.

    Raises:
      ValueError: a concrete negative or non-finite ``lam`` (here); in ``update``, no params.
    """
    check_nonnegative("l2_init", "lam", lam)

    def init(params):
        return L2InitState(copy_tree(params))

    def update(updates, state, params=None, **extra):
        del extra
        need_params("l2_init", params)

        def pull(g, p, p0):
            return g + (2.0 * lam * (p - p0)).astype(g.dtype)

        return jax.tree.map(pull, updates, params, state.init_params), state

    def consolidate(state, params, evidence):
        del params, evidence
        return None, state

    return ContinualTransformation(init, update, consolidate, name="l2_init")
