"""Task-conditioned hypernetworks for continual learning.

von Oswald, Henning, Sacramento, Grewe (2020), "Continual learning with
hypernetworks", ICLR (arXiv:1906.00695). A hypernetwork ``f(e, theta)`` maps a
learned task embedding ``e_t`` to the weights of a *target network*; continual
learning only has to keep the hypernetwork's outputs for the old embeddings fixed,
which the output regularizer (their Eq. 2) does:

    L_total = L_task(theta, e_T, D_T)
              + (beta / (T-1)) * sum_{t<T} || f(e_t, theta*) - f(e_t, theta + dtheta) ||^2

with ``theta*`` the hypernetwork weights before task ``T`` and ``dtheta`` the
look-ahead: the step the optimizer would take on the task loss alone (a constant:
the gradient is not propagated through it, as in the authors' code, ``hypercl``).

The pieces, all pure functions on pytrees, one private module each:

* :class:`TargetNetwork` (``_target``) -- any Flax NNX module as a pure
  ``apply(params, x)`` whose parameters come from a flat vector (cut and reshaped
  into the module's parameter template, obtained with ``nnx.eval_shape`` +
  ``nnx.split``, so the target's weights are never allocated). By default the
  vector is laid out as PyTorch stores the parameters (each kernel as (out, in),
  then its bias), as in the authors' code: which weights share a chunk matters
  (see the class docstring).
* :class:`Hypernetwork` (``_hypernetworks``) -- ``init(key) -> theta`` and
  ``apply(theta, e) -> (n_target,)``: :func:`mlp_hypernetwork` (one output per
  target weight), :func:`chunked_hypernetwork` (the paper's chunking: the same
  small network generates chunk ``i`` from ``[e_t; c_i]`` with learned chunk
  embeddings ``c_i``), :func:`recurrent_hypernetwork` (Chandra, Varshney, Srijith,
  Gupta 2023, "Continual Learning with Dependency Preserving Hypernetworks", WACV:
  a GRU or LSTM scanned over the chunks, so chunk ``k`` depends on chunks ``j < k``).
* :class:`HyperModel` (``_model``) -- hypernetwork + target + one embedding per
  task, as a plain :class:`clx.core.Model` (``apply``, ``predict``,
  ``extra_results``; no Dense taps) that ``clx.train.fit`` runs like any other;
  params ``{"hnet": theta, "task_emb": (T, e)}``. ``predict`` does HNET+ENT task
  inference for class-IL with :func:`entropy_task_inference` (the embedding whose
  generated network has the lowest predictive entropy on the input).
* :func:`output_regularizer` (``_regularizer``) -- the regularizer above as a
  ContinualTransformation that wraps the optimizer (so the look-ahead is the real
  step; it declares the ``"optimizer"`` need), stores ``f(e_t, theta*)`` at
  ``consolidate`` and trains only the current task's embedding.
"""

from clx.hnet._hypernetworks import (
    ACTIVATIONS,
    Hypernetwork,
    chunked_hypernetwork,
    mlp_hypernetwork,
    recurrent_hypernetwork,
)
from clx.hnet._model import HyperModel, entropy_task_inference
from clx.hnet._regularizer import HnetRegState, output_regularizer, output_regularizer_loss
from clx.hnet._target import TargetNetwork

__all__ = [
    "ACTIVATIONS",
    "HnetRegState",
    "HyperModel",
    "Hypernetwork",
    "TargetNetwork",
    "chunked_hypernetwork",
    "entropy_task_inference",
    "mlp_hypernetwork",
    "output_regularizer",
    "output_regularizer_loss",
    "recurrent_hypernetwork",
]
