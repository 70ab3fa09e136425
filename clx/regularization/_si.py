"""SI: synaptic intelligence, a per-parameter importance from the path integral of the loss.

Zenke, Poole, Ganguli (2017), "Continual Learning Through Synaptic Intelligence", ICML.
While task mu trains, every step k adds to the running path integral (Eq. 3, online)

    omega  +=  -g_k * (theta_{k+1} - theta_k)

with the step's gradient g_k and the *actual* change of the params (whatever the
optimizer made of the gradient: Adam, momentum, clipping). At the end of the task
(Eq. 5)

    Omega  +=  omega / ((theta*_mu - theta*_{mu-1})^2 + xi),     omega <- 0,  theta* <- theta

and while later tasks train the surrogate loss c * sum_k Omega_k (theta_k - theta*_k)^2
(Eq. 4) enters as its analytic gradient ``2 c Omega (theta - theta*)``, added in
``update`` (chain the rule before the optimizer).

``update`` sees theta_k and g_k but not theta_{k+1}, which the optimizer after it in
the chain produces. So the state keeps the previous step's params and gradient, and
the increment of step k is added at step k+1 (from the params it receives) and, for
the task's last step, at ``consolidate``. The first step of a task adds nothing (the
kept gradient is 0 after ``init`` and after each ``consolidate``), so a move of the
params at a task boundary is never counted. Every saved array is a fresh copy, never
an alias of the live params (the bug that makes every importance 0 in a library that
keeps a reference to the weights).

Which gradient: by default the gradient as SI receives it, before its own penalty is
added: the task loss's (plus the loss terms and gradient changes of the rules before
it in the chain). This is the authors' code (ganguli-lab/pathint, ``optimizers.py``:
``vars['unreg_grads']``, the gradient of the loss without the regularizer). With
``total_gradient=True`` it is the gradient after SI's penalty is added, as in van de
Ven's code (GMvandeVen/continual-learning, ``update_importance_estimates`` reads
``p.grad`` of the total loss, surrogate included).

Shapes: every state field but the counter is shaped like the params.

Differences from the authors' code: pathint clips Omega at 0 (``tf.nn.relu``) after
each task; clx follows Eq. 5 (no clip), as van de Ven's code does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from clx.core import ContinualTransformation
from clx.regularization._common import check_nonnegative, check_positive, copy_tree, need_params, penalty_gradient


class SIState(NamedTuple):
    omega: object  # params-shaped: the running path integral of the current task, sum_k -g_k (theta_{k+1} - theta_k)
    importance: object  # params-shaped: Omega, summed over the finished tasks (0 before task 1)
    anchor: object  # params-shaped: theta*, the params at the end of the latest task (the init before that)
    prev_params: object  # params-shaped: theta_k, the params the previous step started from
    prev_grad: object  # params-shaped: g_k, the previous step's gradient (0 at a task's start)
    num_tasks: jax.Array  # () int32, consolidations so far


def si(c: float, xi: float = 0.1, *, total_gradient: bool = False) -> ContinualTransformation:
    """Synaptic intelligence (Zenke et al. 2017, Eqs. 3-5), chained before the optimizer.

    ``clx.chain(clx.regularization.si(10.0), optax.adam(1e-3))``.

    Args:
      c: the surrogate-loss strength c >= 0 (a float or a traced sweep value). van de
        Ven & Tolias 2019, Split MNIST: 10 / 5e4 / 5e3 for task / domain / class-IL
        (recalled in DESIGN.md); Zenke et al. tune c per benchmark.
      xi: the damping xi > 0 of Eq. 5 (0.1 in Zenke et al. on MNIST and van de Ven).
      total_gradient: False (the authors' code): omega integrates the gradient SI
        receives, before its own penalty; True (van de Ven's code): after it.

    Returns:
      A ContinualTransformation named "si" with state ``SIState``; it needs nothing
      beyond ``params`` and never moves the params.

    Raises:
      ValueError: a concrete negative ``c``, a concrete ``xi`` <= 0; in ``update``,
        no params.
    """
    check_nonnegative("si", "c", c)
    check_positive("si", "xi", xi)

    def zeros(params):  # a fresh buffer per field: the trainer donates the state, so no two fields may share one
        return jax.tree.map(jnp.zeros_like, params)

    def init(params):
        return SIState(zeros(params), zeros(params), copy_tree(params), copy_tree(params), zeros(params), jnp.int32(0))

    def step_increment(state, params):
        """omega plus the previous step's term -g_k (theta_{k+1} - theta_k)."""
        return jax.tree.map(lambda w, g, p, q: w - g * (p - q), state.omega, state.prev_grad, params, state.prev_params)

    def update(updates, state, params=None, **extra):
        del extra
        need_params("si", params)
        omega = step_increment(state, params)
        penalised = penalty_gradient(updates, params, 2.0 * c, state.importance, state.anchor)
        integrated = penalised if total_gradient else updates
        new = state._replace(omega=omega, prev_params=copy_tree(params), prev_grad=copy_tree(integrated))
        return penalised, new

    def consolidate(state, params, evidence):
        del evidence
        omega = step_increment(state, params)
        importance = jax.tree.map(
            lambda big, w, p, a: big + w / (jnp.square(p - a) + xi), state.importance, omega, params, state.anchor
        )
        return None, SIState(
            zeros(params), importance, copy_tree(params), copy_tree(params), zeros(params), state.num_tasks + 1
        )

    return ContinualTransformation(init, update, consolidate, name="si")
