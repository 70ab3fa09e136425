"""OPCM: continual model merging by orthogonal projection and adaptive scaling.

Tang, Yang, Shen, Luo, Hu, Du & Tao 2025, "Merging Models on the Fly Without Retraining: A
Sequential Approach to Scalable Continual Model Merging" (arXiv 2501.09522); the steps
below are those of the authors' FusionBench code (the paper's text was not opened here). Models
theta_1, theta_2, ... arrive one at a time, each with task vector ``tau_t = theta_t - theta_0``.

For every projected weight matrix W (m x n) the merge keeps the unscaled sum ``S`` of the
(projected) task vectors and, for a new tau:

1. SVD of the merged task vector so far, ``S = U diag(s) V^T`` (the reduced SVD, k = min(m, n)).
2. Split rank ``r``: the first index i (0-based) with ``cumsum(s)[i] / sum(s) > alpha``;
   the first r singular directions are the old tasks' principal subspace.
3. Project tau onto the basis, ``P = U^T tau V`` (k x k), zero its top-left r x r block (the
   component inside the old tasks' principal subspace) and its diagonal, and map back:
   ``tau' = tau - U (P o M) V^T`` with M the mask of the zeroed entries.
4. ``S <- S + tau'``.

Every other leaf (biases, norms, anything not projected) adds its task vector unprojected,
``S <- S + tau``. Then the whole merged task vector is rescaled to the running mean of the
task vectors' norms (the adaptive lambda_t of the paper):

    theta^(t) = theta_0 + (mean_{i<=t} ||tau_i||) / ||S^(t)|| * S^(t),

norms over all leaves together. The first model is taken as it is (``S^(1) = tau_1``, so
``theta^(1) = theta_0 + tau_1``).

Checked against FusionBench's ``OPCMForCLIP`` (``fusion_bench/method/opcm/opcm.py`` and
``utils.py``, ``config/method/opcm/opcm.yaml``: ``alpha: 0.5``; read at commit 54c9e8c):

- ``split_rank = (s.cumsum(0) / s.sum() > alpha).float().argmax()`` (step 2, the same
  expression here; 0 when no entry exceeds alpha or S is 0). FusionBench's
  ``docs/algorithms/opcm.md`` writes ``r = min{k : sum_{i<=k} s_i / sum_i s_i > alpha}`` with
  1-based k, one more than the code's 0-based index; clx follows the code;
- ``projected = u.T @ task_tv @ v`` with the *full* SVD, then the diagonal and the
  ``[:split_rank, :split_rank]`` block zeroed, and ``u @ projected @ v.T``: the full SVD's
  extra columns are never zeroed, so ``tau - U_k (P_k o M) V_k^T`` over the reduced SVD is
  the same matrix (clx computes that, cheaper);
- the code keeps ``previous_lambda_t * previous_merged_tv + cleaned_task_tv`` and divides
  by ``lambda_t = ||.|| / mean norm``: the merged model is ``theta_0 + S / lambda_t`` with S
  the unscaled sum, as above (the state here holds S directly);
- the projection applies to ``nn.Linear`` weights only; every other parameter (Linear
  biases, LayerNorm, embeddings, the patch-embedding conv) adds its task vector
  unprojected. clx projects every 2-D leaf by default (a Flax ``Linear`` kernel (in, out):
  the projection is the same for W and W^T); pass ``project=`` to choose, e.g. to leave an
  ``Embed`` table out as FusionBench does.

The diagonal switch: the code behind the paper's numbers called
``projected_task_tv.diag().fill_(0)``, which fills a copy, so the diagonal was not zeroed;
FusionBench fixed it on 2025-03-18 (commit 2c3df13, "fix bug": ``.diagonal().fill_(0)``, a
view). ``zero_diagonal=True`` (the default) is the fixed behaviour; ``zero_diagonal=False``
reproduces the code of the paper's numbers (only the r x r block zeroed).

Baseline at r = 0: with ``zero_diagonal=False`` and an ``alpha`` below ``s_1 / sum(s)`` at
every step (any alpha small enough, e.g. 1e-6, as long as S != 0), nothing is removed and
OPCM is task arithmetic rescaled to the mean task-vector norm,
``theta_0 + mean_t ||tau_t|| * sum_t tau_t / ||sum_t tau_t||``.

The SVD without a gather (``svd="gram"``, clx's addition): with the params FSDP-sharded
(``clx.sharding.fsdp_shardings`` splits each kernel along its longer axis), LAPACK's SVD
needs the whole matrix on every device, so XLA all-gathers each kernel. ``clx.subspace.gram_svd``
takes the eigendecomposition of the k x k Gram matrix (``S^T S`` for a tall S, ``S S^T`` for a
wide one; a cross-shard sum, an all-reduce of k x k floats) and forms the long factor
shard by shard (``U = S V / s``). The Gram squares the condition number: directions with
``s_i < sqrt(k * eps) * s_1`` are treated as null (s = 0, no division by 0) and those a little
above it are approximate. Measured in float32 against the full SVD (max |s_gram - s_svd| / s_1;
split rank r at alpha 0.5; max |tau'_gram - tau'_svd| / max |tau|):

- Gaussian (256, 64), (64, 256), (1024, 256) (cond ~3), 3 draws each: 2e-6 / r equal / 1e-5;
- square Gaussian (64, 64), (512, 512) (cond 2e3..2e4), 3 draws each, and (256, 64), (512, 512)
  of geometric singular values from 1 to 1e-3 or 1e-6: up to 8e-3 (the null threshold
  ``sqrt(k * eps)``, as the tail is cut to 0) / r equal but twice off by one on (512, 512)
  (141 vs 140, 51 vs 50: the tail's share of ``sum(s)`` moves the cumulative fraction) /
  up to 7e-2 (the zeroed diagonal ``u_i^T tau v_i`` of tail directions, whose ``u_i`` the
  Gram only knows approximately; the top-r block is accurate);
- the task vectors of ``clx.models.ViT`` fine-tuned 9 Adam steps (lr 1e-3, random data; S the
  sum of two, cond up to 1e6): dim 16 (8x8 input, depth 1, MLP 32): 1.3e-3 / r equal on all
  8 matrices / 3e-2, merged params after 3 models within 7e-5 of the full-SVD merge; dim 64
  (28x28, patch 4, depth 2, MLP 128): 2.8e-3 / r equal on all 14 / 1.6e-2, merged within
  1.4e-4; the dim-16 ViT after 3 Adam steps at lr 1e-2 (tests/test_sharding_model.py): within
  3.9e-4 (5 of 256 entries of one kernel ~0.4).

Speed on one CPU thread (benchmarks/merging.py): a 1024x1024 gram SVD 269 ms against
``jnp.linalg.svd`` 445 ms, the OPCM step 357 against 560 ms.

So ``"gram"`` keeps OPCM's split and protected block but is not the full SVD to float
tolerance in the tail. The default is ``svd="full"`` everywhere (the exact method; on a mesh XLA
gathers each sharded kernel into the SVD); ``"gram"`` is opt-in for params sharded along their
long axis, and ``"auto"`` picks ``"gram"`` when ``jax.device_count() > 1``, else ``"full"``.

Shapes and dtypes: the SVD and products run in float32 at least (``Precision.HIGHEST``);
S is stored in the promoted dtype of the params and float32; ``merged`` has the params'
dtypes.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from clx.merging._task_vectors import (
    ContinualMerge,
    Params,
    check_open_unit,
    check_same_structure,
    tree_norm,
)
from clx.subspace import gram_svd, matmul
from clx.tree import path_str


def split_rank(s: jax.Array, alpha) -> jax.Array:
    """OPCM's split rank: the first index i with ``cumsum(s)[i] / sum(s) > alpha`` (0 if none), an int32 scalar."""
    frac = jnp.cumsum(s) / jnp.sum(s)
    return jnp.argmax(frac > alpha).astype(jnp.int32)


SVD_METHODS = ("auto", "full", "gram")


def check_svd(who: str, svd) -> str:
    """Checks ``svd=`` and resolves ``"auto"``: ``"gram"`` when JAX sees more than one device, else ``"full"``."""
    if svd not in SVD_METHODS:
        raise ValueError(f"{who}: svd must be one of {SVD_METHODS}, got {svd!r}.")
    if svd == "auto":
        return "gram" if jax.device_count() > 1 else "full"
    return svd


@partial(jax.jit, static_argnums=(3, 4))
def opcm_projection(merged_tv: jax.Array, tau: jax.Array, alpha, zero_diagonal: bool = True, svd: str = "full"):
    """OPCM's projection of a new task vector ``tau`` (m, n) against the merged task vector ``merged_tv`` (m, n).

    ``merged_tv = U diag(s) V^T`` (reduced SVD, k = min(m, n)), ``r = split_rank(s, alpha)``,
    ``P = U^T tau V`` (k, k); the returned ``tau - U (P o M) V^T`` has ``U_r^T tau' V_r = 0``
    (M covers the top-left r x r block) and, with ``zero_diagonal``, ``u_i^T tau' v_i = 0``
    for every i < k.

    ``svd`` (static): ``"full"`` is LAPACK's SVD (XLA gathers a sharded matrix onto every
    device for it); ``"gram"`` is ``clx.subspace.gram_svd`` (the k x k Gram's eigh, no gather
    of a matrix sharded along its long axis; see the module docstring for its accuracy);
    ``"auto"`` is ``"gram"`` when ``jax.device_count() > 1`` and ``"full"`` otherwise.

    Returns:
      ``(tau', r)``: tau' (m, n) in float32 (or wider), r an int32 scalar.

    Raises:
      ValueError: ``svd`` not one of "auto", "full", "gram".
    """
    svd = check_svd("opcm_projection", svd)
    dtype = jnp.promote_types(jnp.result_type(tau), jnp.float32)
    merged_tv, tau = merged_tv.astype(dtype), tau.astype(dtype)
    if svd == "gram":
        u, s, vh = gram_svd(merged_tv)
    else:
        u, s, vh = jnp.linalg.svd(merged_tv, full_matrices=False)
    r = split_rank(s, alpha)
    p = matmul(matmul(u.T, tau), vh.T)
    i = jnp.arange(s.shape[0])
    mask = (i[:, None] < r) & (i[None, :] < r)
    if zero_diagonal:
        mask = mask | (i[:, None] == i[None, :])
    removed = matmul(matmul(u, jnp.where(mask, p, jnp.zeros_like(p))), vh)
    return tau - removed, r


def _default_project(path: str, leaf) -> bool:
    del path
    return jnp.ndim(leaf) == 2


class OPCMState(NamedTuple):
    pretrained: Params  # params-shaped: theta_0
    sum_tv: Params  # params-shaped (params dtype promoted with float32): S, the unscaled sum of projected task vectors
    merged: Params  # params-shaped: theta_0 + mean_norm / ||S|| * S
    norm_sum: jax.Array  # () float32: sum of the task vectors' norms ||tau_i|| so far
    count: jax.Array  # () int32: t, the models merged so far


def opcm(
    alpha=0.5,
    zero_diagonal: bool = True,
    project: Callable[[str, jax.Array], bool] | None = None,
    svd: str = "full",
) -> ContinualMerge:
    """OPCM (Tang et al. 2025): orthogonal projection of each new task vector, then rescaling to the mean norm.

    Args:
      alpha: the share of the merged task vector's singular-value mass that is protected,
        in (0, 1) (may be traced); FusionBench's default 0.5.
      zero_diagonal: also zero the projected diagonal (FusionBench since 2025-03-18, the
        default); False reproduces the code behind the paper's numbers.
      project: ``project(path, leaf) -> bool`` says which leaves are projected (``path`` a
        ``clx.tree.path_str`` string, ``leaf`` the pre-trained array; static); default
        every 2-D leaf. A projected leaf must be 2-D.
      svd: how the merged task vector is decomposed: ``"full"`` (LAPACK SVD), ``"gram"``
        (eigh of the k x k Gram matrix, no all-gather of a kernel sharded along its long
        axis; the tail singular values only to about sqrt(eps) of the largest), or ``"auto"``
        (``"gram"`` when ``jax.device_count() > 1``, else ``"full"``). Default ``"full"``.

    Returns:
      A :class:`ContinualMerge` named "opcm" with state :class:`OPCMState`.

    Raises:
      ValueError: a concrete ``alpha`` outside (0, 1) (here); in ``merge_next``, a model
        whose tree differs from theta_0's (the first differing leaf is named), or a
        projected leaf that is not 2-D.
      TypeError: ``zero_diagonal`` not a bool.
      ValueError: ``svd`` not one of "auto", "full", "gram".
    """
    who = "opcm"
    check_open_unit(who, "alpha", alpha)
    svd = check_svd(who, svd)
    if not isinstance(zero_diagonal, bool):
        raise TypeError(f"{who}: zero_diagonal must be True or False, got {zero_diagonal!r}.")
    choose = _default_project if project is None else project

    def init(pretrained):
        def zeros(p):
            return jnp.zeros(jnp.shape(p), jnp.promote_types(jnp.result_type(p), jnp.float32))

        zero = jnp.zeros((), jnp.float32)
        return OPCMState(pretrained, jax.tree.map(zeros, pretrained), pretrained, zero, jnp.zeros((), jnp.int32))

    def merge_next(state, finetuned):
        check_same_structure([state.pretrained, finetuned], ["pretrained", "finetuned"], who)
        flat, treedef = jax.tree_util.tree_flatten_with_path(state.pretrained)
        sums = treedef.flatten_up_to(state.sum_tv)
        fts = treedef.flatten_up_to(finetuned)
        taus = [f.astype(s.dtype) - p.astype(s.dtype) for (_, p), f, s in zip(flat, fts, sums)]  # in S's dtype
        projected = []
        for (path, p), tau in zip(flat, taus):
            on = bool(choose(path_str(path), p))
            if on and jnp.ndim(p) != 2:
                raise ValueError(
                    f"{who}: leaf '{path_str(path)}' is chosen for projection but has shape {jnp.shape(p)}; "
                    "only 2-D leaves can be projected (fix the project= predicate)."
                )
            projected.append(on)

        def first():
            return taus

        def later():
            return [
                opcm_projection(s, tau, alpha, zero_diagonal, svd)[0].astype(s.dtype) if on else tau
                for s, tau, on in zip(sums, taus, projected)
            ]

        cleaned = jax.lax.cond(state.count == 0, first, later)
        new_sums = [s + c for s, c in zip(sums, cleaned)]
        norm_sum = state.norm_sum + tree_norm(taus)
        count = state.count + 1
        mean_norm = norm_sum / count.astype(jnp.float32)
        s_norm = tree_norm(new_sums)
        scale = mean_norm / jnp.where(s_norm > 0, s_norm, 1.0)
        merged = [(p + scale * s).astype(jnp.result_type(p)) for (_, p), s in zip(flat, new_sums)]
        return OPCMState(
            state.pretrained,
            jax.tree.unflatten(treedef, new_sums),
            jax.tree.unflatten(treedef, merged),
            norm_sum,
            count,
        )

    return ContinualMerge(init, merge_next, who)
