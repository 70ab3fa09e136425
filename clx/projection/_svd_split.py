"""SVD-split: constrained full fine-tuning in the low singular subspace of every weight.

Nayak, Killamsetty, Han, Bhandwaldar, Chanda, Xu, Wang, Pareja, Silkin, Eyceoz,
Srivastava (2025), "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for
Continual Learning" (arXiv 2504.07097; the authors call it "adaptive SVD").

At the start of every task each chosen weight is split by its SVD. In Flax's (in, out)
kernel layout, ``W = A diag(s) B^T`` with A (d, r) the input-side and B (m, r) the
output-side singular vectors, r = min(d, m), singular values descending (A is
PyTorch's V and B its U, for the (out, in) weight ``W^T = U S V^T``). The top ``k``
triplets are frozen, the rest learn the task: every update ``G`` of the (d, m) kernel
is projected off both frozen subspaces,

    G  <-  (I - A_k A_k^T) G (I - B_k B_k^T),

so ``A_k^T W = diag(s_k) B_k^T`` and ``W B_k = A_k diag(s_k)`` hold while the task
trains: the frozen triplets (the block ``A_k^T W B_k = diag(s_k)`` and W's action on
their subspaces) are unchanged, whatever the rest does.

Rank rules (``rank_rule``):

- ``"fraction"`` (the released code, ``notebooks/finetune_svd.py``'s
  ``auto_generate_target_svd_config`` and ``run_finetuning.sh``): task ``t`` freezes
  ``k = min(floor(max(d, m) * s_t), min(d, m))`` with ``s_t = fraction + t *
  fraction_step``; the script's T5 stream starts at 0.07 and adds 0.07 per task.
- ``"adaptive"`` (the paper's layer-importance rule, as the code's commented-out
  variant of the same function computes it): after task ``t`` (for tasks ``t + 1, ...``),
  per layer the importance ``I`` = the mean over the evidence's columns of the cosine
  similarity between the first ``q = min(d, m)`` entries of the layer's input ``x`` and
  of its output ``W^T x``; ``I_n = I / (mean of I over the split layers + 1e-8)``; and
  ``k = clip(round(q * min_retention + I_n * q * (target_retention - min_retention)), 1, q)``
  (the code: min_retention 1/2, target_retention 1). Task 0 has no evidence yet and
  uses the fraction rule's ``s_0``.

Checked against the authors' repository Red-Hat-AI-Innovation-Team/orthogonal-subspace-learning
(``svd/projected_gradient_descent.py``, ``notebooks/finetune_svd.py``,
``notebooks/run_finetuning.sh``, commit a5f91f6 of 2025-04-23) and their later
trainer Red-Hat-AI-Innovation-Team/mini_trainer (``src/mini_trainer/osft_utils.py``:
``project_gradient_to_orthogonal_space`` and ``project_parameter_to_orthogonal_space``).
The paper's own text was not in the sources searched; the formulas above are the code's.

Differences from the authors' code, on purpose:

- The code re-parametrises each weight by its factors and trains ``U_low``,
  ``S_low`` and ``V_low`` (AdamW on the factors), projecting the factor gradients
  ``dU_low -= U_high U_high^T dU_low`` and ``dV_low -= dV_low V_high^T V_high``
  (``mini_trainer`` also re-projects the factors after each step, as AdamW's scaling
  rotates them back in). clx keeps the params W and projects W's update on both sides.
  Both keep exactly the constraint above (``U_high^T W`` and ``W V_high`` fixed); they
  differ in how the free part is parametrised (clx: plain gradient descent on it; the
  code: on its factors, a step scaled by the low singular values), so the runs are not
  step-for-step the same.
- The projection is linear: chained before SGD it projects the gradient; before Adam,
  Adam's per-coordinate scaling would leave the subspace, so either chain it after the
  optimizer (it then projects the final step) or pass ``optimizer=`` and the rule projects
  the gradient, steps, and projects the step, as ``mini_trainer`` does.
- Weights it does not split (biases, LayerNorm scales, embeddings, 3-D
  ``cls_token`` / ``pos_embed`` / ``clx.MultiHead``) train freely, as the code leaves
  every parameter outside its config trainable. Conv kernels (k_h, k_w, c_in, c_out)
  are split as their (k_h k_w c_in, c_out) matrix.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from clx.core import ContinualTransformation, Evidence
from clx.projection._common import check_finite, kernel_paths
from clx.tree import by_path, concrete_float, path_str

RANK_RULES = ("fraction", "adaptive")


class SVDSplitState(NamedTuple):
    left: dict[str, jax.Array]  # kernel path -> (d, r) A: input-side singular vectors of the task's start W
    right: dict[str, jax.Array]  # kernel path -> (m, r) B: output-side singular vectors
    singular_values: dict[str, jax.Array]  # kernel path -> (r,) s, descending
    rank: dict[str, jax.Array]  # kernel path -> int32 scalar k: frozen triplets (the first k columns of A and B)
    task: jax.Array  # int32 scalar: the task being trained (consolidations so far)
    inner: optax.OptState  # the owned optimizer's state; () without one


def _check_fraction(name: str, value, what: str, hi_open: bool = True) -> None:
    v = concrete_float(value)
    if v is None:
        return
    ok = (0.0 <= v < 1.0) if hi_open else (v >= 0.0)
    if not ok:
        rng = "in [0, 1)" if hi_open else ">= 0"
        raise ValueError(f"svd_split: {name} must be {rng} ({what}), got {v!r}.")


def frozen_rank(shape: tuple[int, int], fraction) -> jax.Array:
    """The fraction rule's k for a (d, m) weight: ``min(floor(max(d, m) * fraction), min(d, m))`` (int32)."""
    d, m = shape
    k = jnp.floor(max(d, m) * jnp.asarray(fraction, jnp.float32)).astype(jnp.int32)
    return jnp.clip(k, 0, min(d, m))


def layer_importance(kernel: jax.Array, inputs: jax.Array) -> jax.Array:
    """The adaptive rule's importance of a (d, m) kernel on inputs (d, n): the mean over the n columns of
    ``cos(x[:q], (W^T x)[:q])``, q = min(d, m) (the authors' code adds 1e-8 to each norm)."""
    d, m = kernel.shape
    q = min(d, m)
    y = kernel.T @ inputs  # (m, n)
    xq, yq = inputs[:q], y[:q]
    xq = xq / (jnp.linalg.norm(xq, axis=0, keepdims=True) + 1e-8)
    yq = yq / (jnp.linalg.norm(yq, axis=0, keepdims=True) + 1e-8)
    return jnp.mean(jnp.sum(xq * yq, axis=0))


def split_projection(g: jax.Array, a: jax.Array, b: jax.Array, rank: jax.Array) -> jax.Array:
    """``(I - A_k A_k^T) g (I - B_k B_k^T)`` for a (d, m) g, A (d, r), B (m, r) and k = ``rank`` (traced ok).

    With k = 0 it returns ``g`` exactly (every subtracted term is an exact zero)."""
    mask = (jnp.arange(a.shape[1]) < rank).astype(g.dtype)
    ak, bk = a * mask, b * mask
    g = g - ak @ (ak.T @ g)
    return g - (g @ bk) @ bk.T


def svd_split(
    fraction=0.07,
    fraction_step=0.07,
    *,
    rank_rule: str = "fraction",
    min_retention: float = 0.5,
    target_retention: float = 1.0,
    layers: Sequence[str] | None = None,
    optimizer: optax.GradientTransformation | None = None,
    reset_optimizer: bool = True,
) -> ContinualTransformation:
    """SVD-split (Nayak et al. 2025; module docs): updates kept off each weight's top-k singular subspaces.

    ``clx.chain(optax.sgd(lr), clx.projection.svd_split())`` or, with Adam,
    ``clx.chain(clx.projection.svd_split(optimizer=optax.adam(lr)))``.

    Args:
      fraction: ``s_0`` of the fraction rule, in [0, 1) (the authors' script: 0.07); a
        float or a traced scalar (a swept value). 0 with ``fraction_step`` 0: nothing is
        frozen and the rule is the identity (with ``optimizer``: that optimizer, step for step).
      fraction_step: added to ``s`` per task, >= 0 (the script: 0.07). ``k`` is capped
        at ``min(d, m)`` (every direction frozen) as in the code.
      rank_rule: ``"fraction"`` (the released code) or ``"adaptive"`` (the paper's
        importance rule from task 1 on; needs the evidence's representations).
      min_retention, target_retention: the adaptive rule's bounds as fractions of
        ``min(d, m)``, 0 <= min_retention <= target_retention <= 1 (the code: 1/2, 1).
      layers: kernel paths to split; default every 2-D (Dense) or 4-D (Conv) leaf named
        ``kernel``. Other leaves pass through unchanged.
      optimizer: an optax transformation the rule owns: ``update`` projects the
        gradient, applies it, and projects its step (``needs`` then has "optimizer").
      reset_optimizer: re-initialise ``optimizer``'s state at every task boundary (the
        authors start a new optimizer per task).

    Returns:
      A ContinualTransformation named "svd_split", state :class:`SVDSplitState`.
      ``init(params)`` takes the SVD of every split kernel (float32,
      ``jnp.linalg.svd(full_matrices=False)``) and task 0's rank;
      ``update(updates, state, params)`` projects every split kernel's update;
      ``consolidate(state, params, evidence)`` re-splits the current params with the next
      task's rank and returns ``(None, state)``.

    Raises:
      ValueError: a concrete ``fraction`` outside [0, 1) or ``fraction_step`` < 0; an
        unknown ``rank_rule``; retention bounds out of order or outside [0, 1]; at init,
        a ``layers`` path that is not a 2-D or 4-D kernel (e.g. a bias or the ViT's 3-D
        ``pos_embed``) or params without kernels; at consolidate with the adaptive rule,
        missing or non-finite representations; at update, an update of another shape
        than the state's kernel (names the layer).
      TypeError: ``optimizer`` is not an optax GradientTransformation.
    """
    name = "svd_split"
    _check_fraction("fraction", fraction, "s_0 of k = floor(max(d, m) * s_t)")
    _check_fraction("fraction_step", fraction_step, "what s grows by per task", hi_open=False)
    if rank_rule not in RANK_RULES:
        raise ValueError(f"{name}: rank_rule must be one of {RANK_RULES}, got {rank_rule!r}.")
    lo, hi = float(min_retention), float(target_retention)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(
            f"{name}: need 0 <= min_retention <= target_retention <= 1 (fractions of min(d, m)), got "
            f"min_retention={min_retention!r}, target_retention={target_retention!r} (the code: 0.5 and 1.0)."
        )
    if optimizer is not None and not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"{name}: optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}.")
    adaptive = rank_rule == "adaptive"

    def chosen(params):
        return kernel_paths(params, layers, who=name)

    def kernels(params) -> dict[str, jax.Array]:
        flat = by_path(params)
        return {p: jnp.asarray(flat[p], jnp.float32).reshape(shape) for p, shape in chosen(params)}

    def decompose(mats: dict[str, jax.Array]):
        left, right, values = {}, {}, {}
        for p, w in mats.items():
            a, s, bt = jnp.linalg.svd(w, full_matrices=False)
            left[p], right[p], values[p] = a, bt.T, s
        return left, right, values

    def fraction_ranks(mats, task):
        s = jnp.asarray(fraction, jnp.float32) + jnp.asarray(task, jnp.float32) * jnp.asarray(
            fraction_step, jnp.float32
        )
        return {p: frozen_rank(w.shape, s) for p, w in mats.items()}

    def init(params):
        mats = kernels(params)
        left, right, values = decompose(mats)
        task = jnp.zeros((), jnp.int32)
        inner = optimizer.init(params) if optimizer is not None else ()
        return SVDSplitState(left, right, values, fraction_ranks(mats, task), task, inner)

    def project(updates, state):
        def one(path, g):
            key = path_str(path)
            if key not in state.left:
                return g
            a, b = state.left[key], state.right[key]
            d, m = a.shape[0], b.shape[0]
            if g.size != d * m:
                raise ValueError(
                    f"{name}: the update of {key!r} has shape {g.shape}, the state splits a ({d}, {m}) kernel; "
                    "build the state with init on these params."
                )
            out = split_projection(g.reshape(d, m).astype(jnp.float32), a, b, state.rank[key])
            return out.astype(g.dtype).reshape(g.shape)

        return jax.tree_util.tree_map_with_path(one, updates)

    def update(updates, state, params=None, **extra):
        del extra
        updates = project(updates, state)
        if optimizer is None:
            return updates, state
        updates, inner = optimizer.update(updates, state.inner, params)
        return project(updates, state), state._replace(inner=inner)

    def consolidate(state, params, evidence: Evidence):
        mats = kernels(params)
        left, right, values = decompose(mats)
        task = state.task + 1
        ranks = fraction_ranks(mats, task)
        if adaptive:
            missing = [p for p in mats if p not in evidence.representations]
            if missing:
                raise ValueError(
                    f"{name}(rank_rule='adaptive'): the evidence has no representations for {missing}; it has "
                    f"{sorted(evidence.representations)}."
                )
            importance = {}
            for p, w in mats.items():
                rep = jnp.asarray(evidence.representations[p], jnp.float32)
                if rep.ndim != 2 or rep.shape[0] != w.shape[0]:
                    raise ValueError(
                        f"{name}: representation of {p!r} has shape {rep.shape}; the kernel has {w.shape[0]} rows."
                    )
                check_finite(name, f"representation of {p!r}", rep)
                importance[p] = layer_importance(w, rep)
            mean = sum(importance.values()) / len(importance)
            for p, w in mats.items():
                q = min(w.shape)
                scaled = importance[p] / (mean + 1e-8)
                k = jnp.round(q * lo + scaled * q * (hi - lo))
                ranks[p] = jnp.clip(k, 1, q).astype(jnp.int32)
        inner = state.inner
        if optimizer is not None and reset_optimizer:
            inner = optimizer.init(params)
        return None, SVDSplitState(left, right, values, ranks, task, inner)

    needs = set()
    if adaptive:
        needs.add("representations")
    if optimizer is not None:
        needs.add("optimizer")
    return ContinualTransformation(init, update, consolidate, needs=frozenset(needs), name=name)
