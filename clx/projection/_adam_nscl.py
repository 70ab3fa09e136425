"""Adam-NSCL: Adam in the null space of the old tasks' feature covariance.

Wang, Li, Sun, Xu (2021), "Training Networks in Null Space of Feature Covariance
for Continual Learning", CVPR (official code: github.com/ShipengWang/Adam-NSCL).

For every projected layer l with input features x (a Dense layer's input, a Conv
layer's im2col patch), the rule keeps the uncentered covariance of all the inputs
of the tasks seen so far,

    C_l = (1 / n) sum_i x_i x_i^T          (d, d), n = inputs seen over all tasks,

updated at the end of each task (the paper's incremental update of the covariance):
``C <- (n_old C + R R^T) / (n_old + n_new)`` for the task's representation matrix
R (d, n_new). Its eigendecomposition ``C = V diag(lambda) V^T`` gives the
approximate null space: the eigenvectors U = V[:, lambda <= a * lambda_min] (the
paper's singular values of C below ``a`` times the smallest one, ``a > 0``). While
later tasks train, the Adam update (not the gradient) of each projected kernel W
(Flax layout (d, m)) is projected (the paper's Algorithm 1):

    Delta W  <-  U U^T Delta W,

so the layer's outputs ``x^T W`` on inputs x in the range of C (old tasks' features)
do not move: ``x^T U U^T Delta W = 0`` when x is orthogonal to U.

Facts checked in the official code (``optim/adam_svd.py``, ``svd_agent/``):

- the first task trains with plain Adam (``len(self.transforms) == 0``);
- the null space is ``eigen_value <= eigen_value[-1] * thres`` from ``torch.svd`` of the
  accumulated covariance (``eigen_value[-1]`` its smallest singular value), one ``thres``
  (the paper's ``a``) for all feature layers: 10 in the scripts for 10-split CIFAR-100 and
  25-split TinyImageNet, 30 for 20-split CIFAR-100 (``scripts_svd/adamnscl.sh``);
- the Adam step is computed first (``get_update``), then projected (``update @ transform``);
- Adam is rebuilt for every task (``reset_model_opt=True``), and the learning rate of the
  projected layers is 1e-4 on the first task and 5e-5 after (``model_lr``/``svd_lr``),
  betas (0.9, 0.999), eps 1e-8, coupled L2 weight decay 5e-5 (added to the gradient before Adam);
- the projected layers have no biases (ResNet-18 convs, ``bias=False``): nothing is
  augmented with a constant 1; batch-norm params and the task heads are not projected.

Where clx differs from the official code, deliberately:

- **Covariance.** The code's forward hook (``svd_based.py``, ``compute_cov``) first
  averages each mini-batch's inputs and sums the outer products of those batch means
  (``torch.mean(fea_in, 0, True)``; for a Conv layer it unfolds the batch-mean image), a
  rank-one term per batch, not the covariance of the inputs. clx follows the paper's
  definition by default (``covariance="inputs"``: every column of the evidence);
  ``covariance="batch_means"`` with ``batch_size`` reproduces the code's estimate on the
  evidence sample. The code sums where clx averages; a rescaled covariance has the same
  eigenvectors and the selection is relative to ``lambda_min``, so the projector is the same.
- **Numerical zero.** Eigenvalues at or below ``d * eps_float32 * lambda_max`` (a rank-deficient
  covariance, e.g. fewer evidence columns than d) are always in the null space: in float32
  ``lambda_min`` of such a matrix is round-off, and ``a * lambda_min`` would select an
  arbitrary subset of the exact null space.
- **Scale.** The code divides ``U U^T`` by its Frobenius norm (``transform / torch.norm(transform)``,
  shrinking every projected step by ``1/sqrt(rank U)``), which the paper does not; clx uses
  ``U U^T`` unless ``normalize_projector=True``.
- **Adam.** optax's Adam puts eps outside the bias-corrected sqrt(v), torch's inside
  (``sqrt(v) + eps`` then ``* sqrt(1 - b2^t)``): the same up to eps.
- **Scope.** Every 2-D/4-D ``kernel`` is projected by default (``layers`` to choose);
  ``clx.MultiHead``'s 3-D heads never are; 1-D params (biases, norms) take plain Adam steps
  (the code trains batch norm with its own lr and an EWC-style penalty, not reproduced).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from clx import subspace as sub
from clx.core import ContinualTransformation, Evidence
from clx.projection._common import (
    check_adam,
    check_finite,
    check_kernel_shape,
    check_per_layer,
    kernel_paths,
    per_layer,
    project_kernel,
)
from clx.tree import concrete_float, path_str

COVARIANCES = ("inputs", "batch_means")


class AdamNSCLState(NamedTuple):
    """State of :func:`adam_nscl` (a pytree; fixed shapes, so one compile for all tasks).

    Attributes:
      adam_state: the wrapped optax Adam state (``optax.adam``, or
        ``optax.chain(optax.add_decayed_weights, optax.adam)`` with weight decay).
      covariances: ``{kernel path: (d, d) float32}``, the uncentered covariance of the
        layer's inputs over all finished tasks (zeros before the first consolidate).
      counts: ``{kernel path: () float32}``, the number of input columns averaged into it.
      projectors: ``{kernel path: (d, d) float32}``, ``U U^T`` on the approximate null
        space (the identity before the first consolidate: the first task is plain Adam).
    """

    adam_state: Any
    covariances: dict[str, jax.Array]
    counts: dict[str, jax.Array]
    projectors: dict[str, jax.Array]


def check_a(a):
    """Checks one value of ``a`` (the null-space threshold factor): a float > 0. Returns it as a float."""
    value = concrete_float(a)
    if value is None:  # a traced value (a sweep member): checked by the caller's concrete runs
        return a
    if not value > 0:
        raise ValueError(
            f"adam_nscl: a must be > 0 (the null space keeps eigenvalues <= a * lambda_min), got {a}; "
            "the paper uses 10 or 30."
        )
    return value


def null_space_mask(cov: jax.Array, a) -> tuple[jax.Array, jax.Array]:
    """The approximate null space of a symmetric PSD ``cov`` (d, d) float32.

    Returns ``(vectors, mask)``: ``vectors`` (d, d) the eigenvectors (columns, eigenvalues
    ascending, ``jnp.linalg.eigh``) and ``mask`` (d,) bool, True for the eigenvalues
    ``lambda <= max(a * lambda_min, d * eps * lambda_max)`` (eigenvalues clipped at 0;
    eps = float32 machine epsilon). Static shapes: the null space is a mask, not a slice.
    """
    lam, vectors = jnp.linalg.eigh(cov.astype(jnp.float32), symmetrize_input=True)
    lam = jnp.maximum(lam, 0.0)
    d = cov.shape[0]
    zero = d * jnp.finfo(jnp.float32).eps * lam[-1]
    mask = lam <= jnp.maximum(jnp.asarray(a, jnp.float32) * lam[0], zero)
    return vectors, mask


def null_space_projector(cov: jax.Array, a, normalize: bool = False) -> jax.Array:
    """``U U^T`` (d, d) float32 for the null space of :func:`null_space_mask`; divided by its
    Frobenius norm ``sqrt(rank U)`` when ``normalize`` (the official code's scaling)."""
    vectors, mask = null_space_mask(cov, a)
    u = vectors * mask.astype(vectors.dtype)[None, :]
    p = sub.matmul(u, u.T)
    if normalize:
        p = p / jnp.sqrt(jnp.maximum(jnp.sum(mask), 1).astype(p.dtype))
    return p


def feature_columns(rep: jax.Array, num_examples: int, covariance: str, batch_size: int | None, *, path: str):
    """The columns whose outer products are averaged into the covariance, (d, k) float32.

    ``covariance="inputs"``: ``rep`` itself (d, num_examples * P), P columns per example
    (1 for a Dense layer, the output positions of a Conv layer, example-major).
    ``"batch_means"``: the official code's estimate: the examples are cut into
    ``num_examples // batch_size`` consecutive batches (a remainder is dropped) and each
    batch's mean is taken per position, giving (d, num_batches * P).
    """
    if covariance == "inputs":
        return rep
    cols = rep.shape[1]
    if num_examples < 1 or cols % num_examples:
        raise ValueError(
            f"adam_nscl: representation of {path!r} has {cols} columns, not a multiple of the evidence's "
            f"{num_examples} examples (one column per example and output position)."
        )
    nb = num_examples // batch_size
    if nb < 1:
        raise ValueError(
            f"adam_nscl: covariance='batch_means' needs at least batch_size={batch_size} evidence examples, got "
            f"{num_examples}; collect a larger evidence sample or lower batch_size."
        )
    positions = cols // num_examples
    r = rep.reshape(rep.shape[0], num_examples, positions)[:, : nb * batch_size]
    r = r.reshape(rep.shape[0], nb, batch_size, positions).mean(axis=2)
    return r.reshape(rep.shape[0], nb * positions)


def adam_nscl(
    learning_rate: float | optax.Schedule,
    a: float | Sequence[float] | dict[str, float] | Callable = 10.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    layers: Sequence[str] | None = None,
    *,
    later_learning_rate: float | None = None,
    reset_adam: bool = True,
    covariance: str = "inputs",
    batch_size: int | None = None,
    normalize_projector: bool = False,
) -> ContinualTransformation:
    """Adam-NSCL (Wang et al. 2021, Algorithm 1): Adam whose kernel updates lie in the
    null space of the old tasks' uncentered feature covariance.

    The rule owns its optimizer (it wraps ``optax.adam``; ``needs`` has ``"optimizer"``):
    use it alone, or last in ``clx.chain``. ``update`` returns the final steps.

    Args:
      learning_rate: Adam's learning rate (a float > 0, a traced scalar, or an optax
        schedule). The official code: 1e-4 on the first task (``model_lr``).
      a: the null-space factor: the eigenvectors of the accumulated covariance with
        eigenvalue ``<= a * lambda_min`` (and every numerically-zero one) span the
        update space. A float > 0 for every layer; a sequence (one per projected layer,
        in the order of ``layers`` or ``jax.tree_util``'s flattening order); a dict
        from kernel path to value; or a function of the finished task's index returning
        one of these. Paper/code: 10 (CIFAR-100 10 tasks, TinyImageNet), 30 (CIFAR-100 20 tasks).
      b1, b2, eps: Adam's (0.9, 0.999, 1e-8, the code's torch defaults).
      weight_decay: coupled L2 (``optax.add_decayed_weights`` before Adam, as torch
        Adam's ``weight_decay``); the code uses 5e-5 on CIFAR-100. Needs ``params`` in update.
      layers: kernel paths to project (e.g. ``['layers/0/kernel']``); default every
        2-D (Dense) or 4-D (Conv) parameter named ``kernel``.
      later_learning_rate: when given, the learning rate on tasks after the first
        (``task_id > 0``; the code's ``svd_lr`` 5e-5): the steps are scaled by
        ``later_learning_rate / learning_rate`` (exact for Adam, whose step is linear in
        the learning rate). Needs a constant ``learning_rate`` and the ``task_id`` extra.
      reset_adam: re-initialise Adam's moments and step count at every consolidate
        (the code builds a new Adam per task).
      covariance: ``"inputs"`` (the paper: every evidence column) or ``"batch_means"``
        (the code: outer products of per-batch means of ``batch_size`` examples).
      batch_size: the batch size of ``"batch_means"`` (the code: 32 or 16).
      normalize_projector: divide ``U U^T`` by its Frobenius norm, as the code does.

    Returns:
      A ContinualTransformation named "adam_nscl", state :class:`AdamNSCLState`, needs
      ``{"optimizer", "representations"}``. ``update(grads, state, params, task_id=...)``
      takes the Adam step and left-multiplies every projected kernel's step, as its
      (d, m) matrix (a Conv kernel (k_h, k_w, c_in, c_out) as (k_h k_w c_in, c_out)),
      by the (d, d) projector. ``consolidate(state, params, evidence)`` averages
      ``evidence.representations[path]`` (d, n) float32 into the covariance, recomputes
      the projector (``jnp.linalg.eigh``, jit-able) and returns ``(None, state)``.

    Raises:
      ValueError: in the factory, a concrete ``learning_rate``/``later_learning_rate`` <= 0
        (or ``later_learning_rate`` with a schedule),
        ``a`` <= 0, ``b1``/``b2`` outside [0, 1), ``eps`` or ``weight_decay`` < 0, an unknown
        ``covariance``, ``batch_means`` without a ``batch_size`` >= 1; at init, an unknown
        layer path or a list of ``a`` of the wrong length; at update, ``weight_decay``
        without params, ``later_learning_rate`` without ``task_id``, a gradient whose shape
        does not match the state; at consolidate, missing representations, one of the
        wrong shape or (when concrete) holding NaN/inf, too few examples for ``batch_size``.
    """
    name = "adam_nscl"
    lr = concrete_float(learning_rate) if not callable(learning_rate) else None
    if lr is not None and not lr > 0:
        raise ValueError(f"{name}: learning_rate must be > 0, got {learning_rate} (the paper uses 1e-4).")
    if later_learning_rate is not None:
        if callable(learning_rate):
            raise ValueError(
                f"{name}: later_learning_rate needs a constant learning_rate, not a schedule; put the change of "
                "rate into the schedule instead."
            )
        later = concrete_float(later_learning_rate)
        if later is not None and not later > 0:
            raise ValueError(f"{name}: later_learning_rate must be > 0 or None, got {later_learning_rate}.")
    check_adam(name, b1, b2, eps)
    if not float(weight_decay) >= 0:
        raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay}.")
    if covariance not in COVARIANCES:
        raise ValueError(f"{name}: covariance must be one of {COVARIANCES}, got {covariance!r}.")
    if covariance == "batch_means":
        if batch_size is None or isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(
                f"{name}: covariance='batch_means' needs batch_size, an int >= 1 (the code: 32), got {batch_size!r}."
            )
        batch_size = int(batch_size)
    a = check_per_layer(a, check_a)
    decay = float(weight_decay)
    adam = optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    if decay > 0:
        adam = optax.chain(optax.add_decayed_weights(decay), adam)

    def projected(params):
        return kernel_paths(params, layers, who=name)

    def factors(paths, task_id):
        return per_layer(a, paths, task_id, check_a, who=name, what="a value")

    def init(params):
        chosen = projected(params)
        factors([p for p, _ in chosen], 0)  # lengths and dict keys, checked early
        return AdamNSCLState(
            adam.init(params),
            {p: jnp.zeros((s[0], s[0]), jnp.float32) for p, s in chosen},
            {p: jnp.zeros((), jnp.float32) for p, _ in chosen},
            {p: jnp.eye(s[0], dtype=jnp.float32) for p, s in chosen},
        )

    def update(updates, state, params=None, *, task_id=None, **extra):
        del extra
        if decay > 0 and params is None:
            raise ValueError(f"{name}: weight_decay > 0 needs params: update(grads, state, params).")
        if later_learning_rate is not None and task_id is None:
            raise ValueError(
                f"{name}(later_learning_rate=...).update needs the task_id extra (clx.fit passes it): "
                "update(grads, state, params, task_id=t)."
            )
        steps, adam_state = adam.update(updates, state.adam_state, params)
        seen = set()

        def project(path, u):
            key = path_str(path)
            if key not in state.projectors:
                return u
            seen.add(key)
            q = state.projectors[key]
            check_kernel_shape(name, path, u, q.shape[0])
            return project_kernel(u, q)

        steps = jax.tree_util.tree_map_with_path(project, steps)
        missing = sorted(set(state.projectors) - seen)
        if missing:
            raise ValueError(
                f"{name}: the state projects layers {missing} that the gradient does not have; build the state "
                "with init on these params."
            )
        if later_learning_rate is not None:
            ratio = jnp.asarray(later_learning_rate, jnp.float32) / jnp.asarray(learning_rate, jnp.float32)
            scale = jnp.where(jnp.asarray(task_id).reshape(-1)[0] > 0, ratio, 1.0)
            steps = jax.tree.map(lambda s: (s * scale).astype(s.dtype), steps)
        return steps, state._replace(adam_state=adam_state)

    def consolidate(state, params, evidence: Evidence):
        paths = [p for p, _ in projected(params)]
        missing = [p for p in paths if p not in evidence.representations]
        if missing:
            raise ValueError(
                f"{name}: the evidence has no representation matrices for {missing}; it has "
                f"{sorted(evidence.representations)}. Declare 'representations' (the rule does) and train a "
                "TappedModel (clx.FunctionalModel) so the trainer records every Dense and Conv layer's inputs."
            )
        n_examples = int(evidence.x.shape[0])
        covs, counts, projectors = {}, {}, {}
        for p, factor in zip(paths, factors(paths, evidence.task_id)):
            rep = evidence.representations[p]
            d = state.covariances[p].shape[0]
            if rep.ndim != 2 or rep.shape[0] != d:
                raise ValueError(
                    f"{name}: representation of {p!r} has shape {rep.shape} but the layer's inputs live in R^{d}; "
                    "it must be (d, n) = (kernel rows, examples [x positions for a conv layer])."
                )
            check_finite(name, f"representation of {p!r}", rep)
            cols = feature_columns(rep.astype(jnp.float32), n_examples, covariance, batch_size, path=p)
            n_old, n_new = state.counts[p], jnp.float32(cols.shape[1])
            total = n_old + n_new
            cov = (n_old * state.covariances[p] + sub.matmul(cols, cols.T)) / jnp.maximum(total, 1.0)
            covs[p], counts[p] = cov, total
            projectors[p] = null_space_projector(cov, factor, normalize_projector)
        adam_state = adam.init(params) if reset_adam else state.adam_state
        return None, AdamNSCLState(adam_state, covs, counts, projectors)

    return ContinualTransformation(
        init, update, consolidate, needs=frozenset({"optimizer", "representations"}), name=name
    )
