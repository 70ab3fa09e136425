"""GPM: Gradient Projection Memory.

Saha, Garg, Roy (2021), "Gradient Projection Memory for Continual Learning", ICLR.

After each task, GPM stores for every layer a basis M of the input-space subspace
that the task's representations occupy (``clx.subspace.expand``, Eqs. 5, 8, 9).
While later tasks train, each layer's gradient is projected onto the orthogonal
complement (Eq. 10, in Flax's (in, out) kernel layout):

    g  <-  g - M M^T g = (I - M M^T) g

so the layer's outputs on old tasks' inputs do not move. The state holds, per
projected kernel, the subspace and the cached (d, d) complement projector
``Q = I - M M^T``, rebuilt only at ``consolidate``.

Two equivalent ways to apply Q are chosen per layer from static shapes: ``Q @ g``
(2 d^2 m FLOPs) or, when the trainer passes the layer's inputs X (N, d) and
output gradients delta (N, m), ``(X Q)^T delta`` (2 N d^2 + 2 N d m FLOPs, and
the unprojected ``X^T delta`` is then never formed). At batch 10 on a 784-input
layer the second is ten times cheaper.

Conv layers: a conv kernel (k_h, k_w, c_in, c_out) is projected as its
(k_h k_w c_in, c_out) matrix, its subspace spanned by the layer's im2col patches
(``clx.functional.conv_patches``; the trainer's evidence holds them as
(d, examples x positions)), as the authors' code does for AlexNet and ResNet-18.
``num_samples`` counts examples for every layer, as the authors' ``batch_list``
(AlexNet on CIFAR-100: 24 examples for conv1, 100 for conv2 and conv3, 125 for the
fc layers; a conv layer then has examples x positions columns: 24 x 29 x 29 = 20,184 for conv1).

Differences from the authors' code: the first task's rank follows the paper's Eq. 5
(the fewest directions reaching the threshold), where the code keeps one fewer;
biases, if a model has them, are not projected (GPM's models have none) and, with
``freeze_vectors=True``, frozen after the first task as the code does for its
batch-norm scales and biases (``train_projected``: every 1-D parameter's
gradient is zeroed for ``task_id != 0``); the patches' rows are in Flax's
(k_h, k_w, c_in) order where PyTorch's are (c_in, k_h, k_w): the same subspaces.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from clx import subspace as sub
from clx.core import ContinualTransformation, Evidence
from clx.projection._common import (
    check_finite,
    check_kernel_shape,
    check_num_samples,
    check_per_layer,
    example_columns,
    kernel_paths,
    per_layer,
    project_kernel,
)
from clx.tree import path_str


class GPMState(NamedTuple):
    subspaces: dict[str, sub.Subspace]  # kernel path -> subspace of R^d (d = kernel rows)
    projectors: dict[str, jax.Array]  # kernel path -> (d, d) I - M M^T


def gpm(
    threshold: float | Sequence[float] | dict[str, float] | Callable = 0.97,
    num_samples: int | Sequence[int] | dict[str, int] = 300,
    layers: Sequence[str] | None = None,
    freeze_vectors: bool = False,
) -> ContinualTransformation:
    """Gradient Projection Memory (Saha et al. 2021, Algorithm 1).

    Chain it before the optimizer: ``clx.chain(clx.gpm([0.95, 0.99, 0.99]),
    optax.sgd(0.01))``.

    Args:
      threshold: the energy threshold epsilon_th in (0, 1] of Eqs. 5 and 9. A
        float for every layer; a sequence with one value per projected layer, in
        the order of ``layers`` or, by default, the order ``jax.tree_util``
        flattens the params (sorted keys; input to output for ``clx.MLP``); a
        dict from kernel path to value; or a function of the task index returning either
        (the paper's CIFAR setup uses ``lambda t: 0.97 + 0.003 * t``). Paper
        defaults: (0.95, 0.99, 0.99) on Permuted MNIST, 0.97 + 0.003 t on CIFAR-100.
      num_samples: examples per task in each representation matrix: an int for
        every layer, a sequence with one per projected layer (order as for
        ``threshold``) or a dict from kernel path to int (300 on Permuted MNIST;
        ``(24, 100, 100, 125, 125)`` for AlexNet on CIFAR-100 in the authors'
        code). The columns of the first ``num_samples`` examples of the
        evidence's representations are used: ``num_samples`` columns for a
        Dense layer, ``num_samples x positions`` for a Conv layer.
      layers: kernel paths to project (e.g. ``['layers/0/kernel']``); by default
        every 2-D or 4-D parameter named ``kernel`` (all Dense and Conv layers;
        ``clx.MultiHead``'s per-task heads are 3-D and never projected).
      freeze_vectors: zero the gradient of every 1-D parameter (biases,
        batch-norm scales and biases) while tasks after the first train
        (``task_id > 0``), as the authors' code does; the model's 1-D params
        then learn on the first task only. Needs the ``task_id`` extra
        (``clx.fit`` always passes it).

    Returns:
      A ContinualTransformation named "gpm" with state ``GPMState`` that needs
      ``"taps"`` (``update`` uses the ``layer_inputs``/``output_grads`` extras for
      the cheaper ``(X Q)^T delta`` route; without them it computes ``Q g``) and
      ``"representations"`` (``consolidate`` reads ``evidence.representations``
      of every projected kernel). ``consolidate`` never moves the params.

    Raises:
      ValueError: a threshold outside (0, 1], a threshold or num_samples list
        of the wrong length, ``num_samples < 1`` (or a function), an unknown
        layer path, a kernel that is not 2-D or 4-D; at consolidate, missing
        representations, fewer than ``num_samples`` examples, or a column
        count that is not a multiple of the evidence's examples; with
        ``freeze_vectors``, an ``update`` called without ``task_id``; at
        consolidate, a representation of the wrong shape or (when concrete)
        holding NaN/inf; at trace time of ``update``, a gradient whose shape
        does not match the state's subspace (names the layer and both shapes)
        or a state built on other params.
    """
    return _memory_rule("gpm", threshold, num_samples, layers, freeze_vectors)


def _memory_rule(name, threshold, num_samples, layers, freeze_vectors, importance=None, state_type=GPMState):
    """GPM's rule (Algorithm 1) under the name ``name``, shared with SGP: ``importance(old, new, rep)``, when
    given, sets the expanded subspace's per-direction importance at consolidate (GPM keeps every direction at 1)."""
    threshold = check_per_layer(threshold, sub.check_threshold)
    if not isinstance(num_samples, (dict, list, tuple)) and not callable(num_samples) and int(num_samples) < 1:
        raise ValueError(f"{name}: num_samples must be >= 1, got {num_samples}.")
    num_samples = check_num_samples(num_samples, who=name)
    freeze_vectors = bool(freeze_vectors)

    def projected(params) -> list[tuple[str, tuple[int, ...]]]:
        return kernel_paths(params, layers, who=name)

    def thresholds(paths, task_id):
        return per_layer(threshold, paths, task_id, sub.check_threshold, who=name)

    def init(params):
        chosen = projected(params)
        subspaces = {p: sub.empty(shape[0]) for p, shape in chosen}
        projectors = {p: jnp.eye(shape[0], dtype=jnp.float32) for p, shape in chosen}
        thresholds([p for p, _ in chosen], 0)  # values, length and keys, checked early
        per_layer(num_samples, [p for p, _ in chosen], 0, int, who=name, what="num_samples value")
        return state_type(subspaces, projectors)

    def update(updates, state, params=None, *, layer_inputs=None, output_grads=None, task_id=None, **extra):
        del params, extra
        layer_inputs, output_grads = layer_inputs or {}, output_grads or {}
        if freeze_vectors and task_id is None:
            raise ValueError(
                f"{name}(freeze_vectors=True).update needs the task_id extra (the task being trained; clx.fit "
                "passes it): update(grads, state, params, task_id=t)."
            )
        keep = None if not freeze_vectors else (jnp.asarray(task_id) == 0)

        seen = set()

        def project(path, g):
            key = path_str(path)
            if key not in state.projectors:
                if keep is not None and jnp.ndim(g) == 1:
                    return jnp.where(keep, g, jnp.zeros_like(g))
                return g
            seen.add(key)
            q = state.projectors[key]
            check_kernel_shape(name, path, g, q.shape[0], layer_inputs.get(key))
            return project_kernel(g, q, layer_inputs.get(key), output_grads.get(key))

        out = jax.tree_util.tree_map_with_path(project, updates)
        missing = sorted(set(state.projectors) - seen)
        if missing:
            raise ValueError(
                f"{name}: the state projects layers {missing} that the gradient does not have (it has "
                f"{sorted(path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(updates)[0])}); build "
                "the state with init on these params."
            )
        return out, state

    def consolidate(state, params, evidence: Evidence):
        paths = [p for p, _ in projected(params)]  # the threshold order; state dicts come back key-sorted
        missing = [p for p in paths if p not in evidence.representations]
        if missing:
            raise ValueError(
                f"{name}: the evidence has no representation matrices for {missing}; it has "
                f"{sorted(evidence.representations)}. The trainer records the inputs of nnx.Linear and nnx.Conv layers."
            )
        subspaces, projectors = {}, {}
        samples = per_layer(num_samples, paths, evidence.task_id, int, who=name, what="num_samples value")
        n_examples = int(evidence.x.shape[0])
        for p, th, ns in zip(paths, thresholds(paths, evidence.task_id), samples):
            rep = evidence.representations[p]
            d = state.subspaces[p].basis.shape[0]
            if rep.ndim != 2 or rep.shape[0] != d:
                raise ValueError(
                    f"{name}: representation of {p!r} has shape {rep.shape} but the layer's subspace lives in R^{d}; "
                    "it must be (d, n) = (kernel rows, examples [x positions for a conv layer])."
                )
            check_finite(name, f"representation of {p!r}", rep)
            rep = example_columns(rep, n_examples, ns, who=name, path=p)
            s = sub.expand(state.subspaces[p], rep, th)
            if importance is not None:
                s = s._replace(importance=importance(state.subspaces[p], s, rep))
            subspaces[p] = s
            projectors[p] = sub.complement_projector(s)
        return None, state_type(subspaces, projectors)

    return ContinualTransformation(init, update, consolidate, needs=frozenset({"taps", "representations"}), name=name)
