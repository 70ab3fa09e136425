"""CoSO: continual fine-tuning in a sequence of gradient subspaces, orthogonal to the old tasks'.

Cheng, Wan, Wu, Hou, Zhang (2025), "Continuous Subspace Optimization for Continual
Learning", NeurIPS (arXiv 2505.11816; official code: github.com/quinn-ch/CoSO).

Per projected weight, its gradient is viewed as a matrix ``G`` (a, b) whose subspace side
has dimension ``a`` (the code's PyTorch ``(out, in)`` weight: the rows, i.e. the layer's
*outputs*; for a Flax kernel (d_in, d_out) that is ``G = g.T``, ``a = d_out``). Each step:

1. ``G <- G - M M^T G``: the gradient is projected off the old tasks' subspace ``M`` (a, h);
2. every ``K`` steps of the task (``update_every``; at its first step too), the thin SVD
   ``G = U S V^T`` gives the optimization subspace ``P = U[:, :r]`` (a, r) and feeds the
   task's Frequent-Directions sketch ``Z`` (a, l) (below);
3. the inner optimizer (Adam) steps on the coordinates ``C = P^T G`` (r, b): its moments
   live in the subspace's coordinates (GaLore-style projected Adam) and are kept as they
   are when ``P`` changes (the code neither resets nor rotates them);
4. the update is mapped back, ``Delta = P step(C)`` (a, b), so it lies in span(P), and
   span(P) is in the range of the projected gradient, orthogonal to ``M``.

Frequent Directions (the code's ``DoubleSVD.increment_update``): with ``s`` the singular
values of ``G`` and ``delta = s_{l+1}`` (0 when G has at most l), the gradient enters as
``U[:, :l] diag(sqrt(max(s_j^2 - delta^2, 0)))``; it is appended to ``decay * Z`` and the
(a, 2l) result is shrunk back to l columns the same way, giving the new ``Z``. At the end
of a task (``consolidate``) the sketch's left singular vectors join ``M``: the first ``k``
of them, ``k = #{j : sum_{i<=j} sigma_i^2 / sum_i sigma_i^2 < threshold}`` (the code's
``update_historical_space``; note the strict ``<``: one direction fewer than the smallest
count reaching the threshold, as in GPM's code), then the sketch, the step count and the
inner optimizer's state are reset (the code pops Adam's moments and sets ``step = 0``).

Facts checked in the official code (quinn-ch/CoSO at 1a50a11: ``coso/coso_projector.py``,
``coso/adamw.py``, ``models/coso.py``, ``exps/*.json``):

- the projected weights are the ViT's ``attn.proj`` (attention output) weights only; the
  current task's classifier trains with plain AdamW (``fc_lrate``) and everything else is
  frozen (``requires_grad_(False)``): clx's ``layers=['.../attn/out/kernel', ...]`` with
  ``trainable=('head',)``;
- hyperparameters (``proj_rank`` = r, ``rank`` = the sketch size l, ``update_gap`` = K,
  ``db_decay``, ``threshold``): CIFAR-100 r 15, l 100, K 1; ImageNet-R (5/10/20 tasks)
  r 50, l 120, K 1; DomainNet r 70, l 160, K 20; ``db_decay`` 1.0 and ``threshold`` 0.98
  everywhere; lr 3e-4 to 4e-4 (cosine over epochs), weight decay 0, betas (0.9, 0.999);
- the optimizer is transformers' AdamW with its default ``eps = 1e-6``
  (``denom = sqrt(v) + eps``, step ``lr sqrt(1 - b2^t) / (1 - b1^t)``).

The stored pages gave only the paper's abstract, so the rules above are the code's.

Where clx differs: optax's Adam puts ``eps`` outside the bias-corrected ``sqrt(v)``
(torch's ``sqrt(v) + eps`` then scaled): the same up to eps. When a gradient has fewer than
l + 1 singular values the shrink value is 0 (the code would index past the end); the
sketch has ``min(l, a)`` columns (more cannot be independent). New history directions are
re-orthogonalised against ``M`` (twice) before they are stored; in exact arithmetic they
already are orthogonal, and the code stores them as they come. Weight decay is not
offered (0 in every config). The inner optimizer is pluggable (``inner``): with
``optax.sgd`` and full rank on an empty history CoSO is exactly SGD; Adam in a rotated
basis is not elementwise Adam (Adam is not rotation invariant), so full-rank CoSO with Adam
is Adam in the gradient's singular basis, not plain Adam.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from clx import subspace as sub
from clx.core import ContinualTransformation, Evidence
from clx.projection._common import check_adam, check_per_layer, kernel_paths, per_layer
from clx.tree import concrete, path_str

SIDES = ("output", "input")


class CoSOState(NamedTuple):
    """State of :func:`coso` (a pytree with fixed shapes).

    Attributes:
      inner_state: the inner optimizer's state over the coordinates: (r, b) per projected
        kernel, the parameter's own shape for every other leaf.
      bases: ``{kernel path: (a, r) float32}``, the current optimization subspace P.
      sketches: ``{kernel path: (a, l') float32}``, the task's Frequent-Directions sketch
        (columns ``u_j sigma_j``), ``l' = min(sketch_size, a)``; zeros at a task's start.
      history: ``{kernel path: clx.subspace.Subspace of R^a}``, the old tasks' subspace M.
      step: () int32, steps taken in the current task.
    """

    inner_state: Any
    bases: dict[str, jax.Array]
    sketches: dict[str, jax.Array]
    history: dict[str, sub.Subspace]
    step: jax.Array


def _as_matrix(g: jax.Array, side: str) -> jax.Array:
    """A kernel (or its gradient) as the (a, b) matrix whose subspace side is axis 0."""
    g2 = g.reshape(-1, g.shape[-1])  # (d_in, d_out); a Conv kernel as (k_h k_w c_in, c_out)
    return g2.T if side == "output" else g2


def _as_kernel(m: jax.Array, shape: tuple, side: str) -> jax.Array:
    return (m.T if side == "output" else m).reshape(shape)


def _matrix_shape(shape: tuple, side: str) -> tuple[int, int]:
    d, m = shape  # kernel_paths' (d_in, d_out)
    return (m, d) if side == "output" else (d, m)


def _shrunk(s: jax.Array, ell: int) -> jax.Array:
    """``sqrt(max(s_j^2 - s_ell^2, 0))`` for j < ell, zero-padded to ell; ``s_ell`` (the (ell+1)-th value) is 0
    when ``s`` has at most ell entries."""
    k = s.shape[0]
    cut = s[ell] if ell < k else jnp.zeros((), s.dtype)
    head = jnp.pad(s[:ell], (0, max(ell - k, 0)))
    return jnp.sqrt(jnp.maximum(head**2 - cut**2, 0.0))


def _signed(u: jax.Array) -> jax.Array:
    """``u`` with each column's sign fixed so that its largest-magnitude entry is positive: an SVD's signs are
    arbitrary and differ between batched (vmapped) and single calls; the subspaces are the same."""
    idx = jnp.argmax(jnp.abs(u), axis=0)
    sign = jnp.sign(jnp.take_along_axis(u, idx[None, :], axis=0))
    return u * jnp.where(sign == 0, 1.0, sign).astype(u.dtype)


def _svd_u(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The thin SVD's left singular vectors (sign-fixed by :func:`_signed`) and singular values of ``m``."""
    u, s, _ = jnp.linalg.svd(m, full_matrices=False)
    return _signed(u), s


def _pad_columns(u: jax.Array, n: int) -> jax.Array:
    return jnp.pad(u[:, :n], ((0, 0), (0, max(n - u.shape[1], 0))))


def frequent_directions(sketch: jax.Array, g: jax.Array, decay=1.0) -> jax.Array:
    """One Frequent-Directions step of the code's ``DoubleSVD`` on a gradient ``g`` (a, b).

    Returns the new sketch (a, l) for ``sketch`` (a, l): ``g``'s top-l directions,
    shrunk by its (l+1)-th singular value, appended to ``decay * sketch``, and the
    (a, 2l) result shrunk to l columns the same way. With ``decay = 1`` and no shrinkage
    (l >= the rank of everything fed) ``Z Z^T`` is exactly ``sum g g^T``; in general
    ``0 <= sum g g^T - Z Z^T`` (positive semi-definite).
    """
    return _fd_step(sketch, _svd_u(g), decay)


def _fd_step(sketch: jax.Array, svd_g: tuple[jax.Array, jax.Array], decay) -> jax.Array:
    ell = sketch.shape[1]
    u, s = svd_g
    new = _pad_columns(u, ell) * _shrunk(s, ell)
    merged = jnp.concatenate([jnp.asarray(decay, sketch.dtype) * sketch, new], axis=1)
    um, sm = _svd_u(merged)
    return _pad_columns(um, ell) * _shrunk(sm, ell)


def history_count(sigma: jax.Array, threshold) -> jax.Array:
    """The code's count of sketch directions kept at a task's end: ``#{j : cumsum(sigma^2)_j / sum(sigma^2) <
    threshold}`` for singular values ``sigma`` (descending); 0 for an all-zero sketch. An int32 scalar."""
    energy = sigma.astype(jnp.float32) ** 2
    total = jnp.sum(energy)
    ratio = jnp.cumsum(energy) / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, jnp.sum(ratio < threshold, dtype=jnp.int32), 0)


def append_directions(s: sub.Subspace, u: jax.Array, count) -> sub.Subspace:
    """Adds the first ``count`` columns of ``u`` (a, l) (orthonormal, meant orthogonal to ``s``) to the subspace
    ``s`` of R^a: re-orthogonalised against it twice and normalised; a column with a residual norm below 1e-3
    ends the run (it lies in ``s`` to float precision); the rank is capped at a."""
    a, ell = u.shape
    dtype = s.basis.dtype
    used = s.basis * s.mask.astype(dtype)
    u = u.astype(dtype)
    for _ in range(2):
        u = u - sub.matmul(used, sub.matmul(used.T, u))
    norms = jnp.linalg.norm(u, axis=0)
    good = jnp.cumprod((norms > 1e-3).astype(jnp.int32))  # a leading run of new directions
    u = u / jnp.where(norms > 0, norms, 1.0)
    old = sub.rank(s)
    add = jnp.minimum(jnp.minimum(jnp.asarray(count, jnp.int32), jnp.sum(good, dtype=jnp.int32)), a - old)
    cols = jnp.arange(a)
    shifted = jnp.take(u, jnp.clip(cols - old, 0, ell - 1), axis=1)
    new_cols = (cols >= old) & (cols < old + add)
    basis = jnp.where(new_cols[None, :], shifted, s.basis)
    importance = jnp.where(new_cols, jnp.ones_like(s.importance), s.importance)
    return sub.Subspace(basis, s.mask | new_cols, importance)


def _check_rank(value):
    try:
        ok = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError):
        ok = False
    if not ok or int(value) < 1:
        raise ValueError(
            f"coso: rank must be an integer >= 1 (the dimension of the optimization subspace), got {value!r}."
        )
    return int(value)


def _check_threshold(value):
    v = concrete(value)
    if v is None:  # traced (a sweep member)
        return value
    v = float(v)
    if not 0.0 < v <= 1.0:
        raise ValueError(
            f"coso: threshold must be in (0, 1] (the fraction of the sketch's energy kept for the history), got {v}; "
            "the code uses 0.98."
        )
    return v


def coso(
    learning_rate: float | optax.Schedule = 1e-3,
    rank: int | Sequence[int] | dict[str, int] = 15,
    *,
    sketch_size: int = 100,
    update_every: int = 1,
    threshold: float = 0.98,
    decay: float = 1.0,
    layers: Sequence[str] | None = None,
    trainable: Sequence[str] | None = None,
    side: str = "output",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    inner: optax.GradientTransformation | None = None,
    reset_optimizer: bool = True,
) -> ContinualTransformation:
    """CoSO (Cheng et al. 2025): Adam on the coordinates of a gradient subspace recomputed every
    ``update_every`` steps, orthogonal to a Frequent-Directions history of the old tasks' subspaces.

    The rule owns its optimizer (``needs`` has ``"optimizer"``): use it alone or last in ``clx.chain``.

    Args:
      learning_rate: Adam's learning rate (a float > 0, a traced scalar or an optax schedule);
        the code: 3e-4 (CIFAR-100), 4e-4 (ImageNet-R).
      rank: r, the dimension of the optimization subspace, ``1 <= r <= min(a, b)`` of each projected
        weight; an int, one per projected layer (a sequence in the order of ``layers``) or a dict from
        kernel path. The code: 15 (CIFAR-100), 50 (ImageNet-R), 70 (DomainNet).
      sketch_size: l, the columns of the Frequent-Directions sketch (int >= 1; at most a are used).
        The code: 100, 120, 160.
      update_every: K, steps between two SVDs of the gradient (int >= 1). The code: 1 (20 on DomainNet).
      threshold: the fraction of the sketch's energy whose directions join the history, in (0, 1]
        (may be traced); the code: 0.98.
      decay: the sketch's decay before each merge (``db_decay``, >= 0); the code: 1.0.
      layers: kernel paths to project (2-D Dense or 4-D Conv kernels); default every one. The code
        projects only the attention output projections (a clx ViT's ``blocks/i/attn/out/kernel``).
      trainable: path prefixes of the *other* params that take plain inner-optimizer steps
        (e.g. ``('head',)``); None: all of them; ``()``: none (frozen, as the code's backbone).
      side: ``"output"`` (the code: the subspace lives in the layer's output space, the rows of
        PyTorch's (out, in) weight) or ``"input"`` (the rows of Flax's (in, out) kernel, GPM's side:
        the update then leaves the layer's outputs on the old tasks' gradient inputs unchanged).
        Measured on 3-task Permuted MNIST (MLP 784-100-100-10 from scratch, 2,000 examples x 2
        epochs per task, lr 1e-3, seed 0): r 4 on every layer, output side ACC 48.3 % / BWT -6.3 %,
        input side 56.7 % / +0.5 %; r 10 on the hidden layers (head plain Adam), output 66.9 % /
        -16.3 %, input 74.4 % / -3.8 % (fine-tuning with SGD 0.01: 83.5 % / -5.7 %).
      b1, b2, eps: Adam's; eps 1e-6 as the code's transformers AdamW.
      inner: an optax transformation used instead of Adam on the coordinates (e.g. ``optax.sgd``);
        it must not need ``params`` (the coordinates are not shaped like them).
      reset_optimizer: re-initialise the inner optimizer at every consolidate (the code does).

    Returns:
      A ContinualTransformation named ``"coso"``, state :class:`CoSOState`, needs ``{"optimizer"}``.
      ``update(grads, state, params=None, **extra)`` returns the final steps (float32 math, each
      leaf in its gradient's dtype); ``consolidate(state, params, evidence)`` moves the sketch's top
      directions into the history and returns ``(None, state)``.

    Raises:
      ValueError: in the factory, a concrete ``learning_rate`` <= 0, ``rank`` or ``sketch_size`` or
        ``update_every`` < 1, a ``threshold`` outside (0, 1], ``decay`` < 0, an unknown ``side``,
        ``b1``/``b2`` outside [0, 1) or ``eps`` < 0; at init, an unknown ``layers`` path, a rank
        above ``min(a, b)`` of its weight (names the layer and both numbers), or a list of ranks of
        the wrong length; at update, a gradient that does not match the state.
    """
    name = "coso"
    lr = concrete(learning_rate) if not callable(learning_rate) else None
    if lr is not None and not float(lr) > 0:
        raise ValueError(f"{name}: learning_rate must be > 0, got {learning_rate} (the code uses 3e-4 to 4e-4).")
    rank = check_per_layer(rank, _check_rank)
    for what, v in (("sketch_size", sketch_size), ("update_every", update_every)):
        if isinstance(v, bool) or int(v) != v or int(v) < 1:
            raise ValueError(f"{name}: {what} must be an integer >= 1, got {v!r}.")
    sketch_size, update_every = int(sketch_size), int(update_every)
    threshold = _check_threshold(threshold)
    if not float(decay) >= 0:
        raise ValueError(f"{name}: decay must be >= 0, got {decay} (the code uses 1.0).")
    if side not in SIDES:
        raise ValueError(f"{name}: side must be one of {SIDES}, got {side!r}.")
    check_adam(name, b1, b2, eps)
    opt = inner if inner is not None else optax.adam(learning_rate, b1=b1, b2=b2, eps=eps)
    trainable = None if trainable is None else tuple(trainable)

    def chosen(params):
        """``{path: (rank, (a, b), l')}`` of the projected kernels, checked."""
        kernels = kernel_paths(params, layers, who=name)
        ranks = per_layer(rank, [p for p, _ in kernels], 0, _check_rank, who=name, what="rank")
        out = {}
        for (path, shape), r in zip(kernels, ranks):
            a, b = _matrix_shape(shape, side)
            if r > min(a, b):
                raise ValueError(
                    f"{name}: rank {r} for {path!r} exceeds min(a, b) = {min(a, b)} of its ({a}, {b}) gradient "
                    f"matrix; give that layer a rank <= {min(a, b)} (a dict or list of ranks) or leave it out of "
                    "layers."
                )
            out[path] = (r, (a, b), min(sketch_size, a))
        return out

    def trains(key: str) -> bool:
        return trainable is None or any(key == p or key.startswith(p.rstrip("/") + "/") for p in trainable)

    def coordinates(params, info):
        def leaf(path, p):
            key = path_str(path)
            if key in info:
                r, (_, b), _ = info[key]
                return jnp.zeros((r, b), jnp.float32)
            return jnp.zeros_like(p)

        return jax.tree_util.tree_map_with_path(leaf, params)

    def init(params):
        info = chosen(params)
        return CoSOState(
            opt.init(coordinates(params, info)),
            {k: jnp.zeros((a, r), jnp.float32) for k, (r, (a, _), _) in info.items()},
            {k: jnp.zeros((a, ell), jnp.float32) for k, (_, (a, _), ell) in info.items()},
            {k: sub.empty(a) for k, (_, (a, _), _) in info.items()},
            jnp.zeros((), jnp.int32),
        )

    def update(updates, state, params=None, **extra):
        del params, extra
        refresh = state.step % update_every == 0
        bases, sketches, seen = {}, {}, set()

        def to_coordinates(path, g):
            key = path_str(path)
            if key not in state.bases:
                return g if trains(key) else jnp.zeros_like(g)
            seen.add(key)
            a, r = state.bases[key].shape
            g2 = _as_matrix(g, side).astype(jnp.float32)
            if g2.shape[0] != a:
                raise ValueError(
                    f"{name}: the gradient of {key!r} has shape {g.shape}, whose {side} side has {g2.shape[0]} "
                    f"entries, but the state's subspace lives in R^{a}; build the state with init on these params."
                )
            g2 = sub.project_out(g2, state.history[key])

            def recompute(z):
                u, sv = _svd_u(g2)  # one SVD for the subspace and the sketch
                return u[:, :r], _fd_step(z, (u, sv), decay)

            basis, sketch = jax.lax.cond(refresh, recompute, lambda z: (state.bases[key], z), state.sketches[key])
            bases[key], sketches[key] = basis, sketch
            return sub.matmul(basis.T, g2)

        coords = jax.tree_util.tree_map_with_path(to_coordinates, updates)
        missing = sorted(set(state.bases) - seen)
        if missing:
            raise ValueError(
                f"{name}: the state projects layers {missing} that the gradient does not have; build the state with "
                "init on these params."
            )
        steps, inner_state = opt.update(coords, state.inner_state)

        def back(path, s, g):
            key = path_str(path)
            if key in bases:
                return _as_kernel(sub.matmul(bases[key], s), g.shape, side).astype(g.dtype)
            return s.astype(g.dtype) if trains(key) else jnp.zeros_like(g)

        steps = jax.tree_util.tree_map_with_path(back, steps, updates)
        return steps, CoSOState(inner_state, bases, sketches, state.history, state.step + 1)

    def consolidate(state, params, evidence: Evidence):
        del evidence
        info = chosen(params)
        history = {}
        for key, z in state.sketches.items():
            u, sigma = _svd_u(z)
            history[key] = append_directions(state.history[key], u, history_count(sigma, threshold))
        inner_state = opt.init(coordinates(params, info)) if reset_optimizer else state.inner_state
        sketches = jax.tree.map(jnp.zeros_like, state.sketches)
        return None, CoSOState(inner_state, state.bases, sketches, history, jnp.zeros((), jnp.int32))

    return ContinualTransformation(init, update, consolidate, needs=frozenset({"optimizer"}), name=name)
