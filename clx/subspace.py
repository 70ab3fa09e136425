"""Task subspaces over fixed-shape arrays: the toolkit of the projection family.

A subspace of a layer's input space R^d is stored at full capacity, so its shape
never changes while its rank grows from task to task (jit needs static shapes):

- ``basis``: (d, d) float32; columns ``[0, rank)`` are orthonormal, the rest zero;
- ``mask``: (d,) bool, True for the columns in use (always a prefix);
- ``importance``: (d,) float32 in [0, 1], a per-direction scale of the projection
  (1.0 for GPM; SGP's scaled projection uses smaller values).

Kernels follow Flax's layout (in, out) = (d, m): the subspace lives on axis 0, and
``project_out`` removes ``B diag(mask * importance) B^T g`` from a gradient ``g``.
A Conv kernel (kh, kw, cin, cout) is handled as (kh*kw*cin, cout).

Source: Saha, Garg, Roy (2021), "Gradient Projection Memory for Continual Learning",
ICLR; Eq. 5 (first task) and Eqs. 8-9 (later tasks) for ``expand``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Full float32 products for everything that builds or applies a basis. On GPUs/TPUs the
# default matmul precision is reduced (TF32 / bf16 passes), which leaves a projected
# gradient measurably non-orthogonal to the stored basis (on an H100 with the default
# precision, PMNIST-GPM gave BWT -3.87 % against -3.40 % on CPU; the run with this
# setting is still to be measured there). On CPU this changes nothing.
HIGHEST = jax.lax.Precision.HIGHEST


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b`` at full float32 precision (``Precision.HIGHEST``), the product every basis operation uses."""
    return jnp.matmul(a, b, precision=HIGHEST)


class Subspace(NamedTuple):
    basis: jax.Array  # (d, d) float32, orthonormal columns where mask
    mask: jax.Array  # (d,) bool, prefix of columns in use
    importance: jax.Array  # (d,) float32, 1.0 for GPM


def empty(d: int, dtype=jnp.float32) -> Subspace:
    """The zero subspace of R^d (rank 0) at full capacity d.

    Raises:
      ValueError: if ``d < 1``.
    """
    if int(d) < 1:
        raise ValueError(f"a subspace needs dimension d >= 1, got {d}.")
    return Subspace(jnp.zeros((d, d), dtype), jnp.zeros((d,), bool), jnp.zeros((d,), dtype))


def rank(s: Subspace) -> jax.Array:
    """Number of basis columns in use, an int32 scalar."""
    return jnp.sum(s.mask, dtype=jnp.int32)


def projector(s: Subspace) -> jax.Array:
    """The (d, d) matrix ``B diag(mask * importance) B^T`` (symmetric)."""
    scale = jnp.where(s.mask, s.importance, 0.0).astype(s.basis.dtype)
    return matmul(s.basis * scale, s.basis.T)


def complement_projector(s: Subspace) -> jax.Array:
    """The (d, d) matrix ``I - B diag(mask * importance) B^T`` that ``project_out`` applies."""
    d = s.basis.shape[0]
    return jnp.eye(d, dtype=s.basis.dtype) - projector(s)


def project_out(g: jax.Array, s: Subspace) -> jax.Array:
    """Removes the subspace's directions from a kernel gradient along axis 0.

    Args:
      g: (d, ...) gradient of a kernel whose input dimension is d (a Dense kernel
        (d, m), or a Conv kernel (kh, kw, cin, cout) with d = kh*kw*cin; then
        pass it reshaped to (d, cout)).
      s: the subspace of R^d.

    Returns:
      ``g - B diag(mask * importance) (B^T g)``, same shape and dtype as ``g``.
      With importance 1 the result satisfies ``B[:, mask]^T result == 0``.

    Raises:
      ValueError: if ``g.shape[0]`` differs from the subspace dimension.
    """
    d = s.basis.shape[0]
    if g.shape[0] != d:
        raise ValueError(f"gradient has {g.shape[0]} rows on axis 0 but the subspace lives in R^{d}.")
    flat = g.reshape(d, -1)
    scale = jnp.where(s.mask, s.importance, 0.0).astype(flat.dtype)
    coef = matmul(s.basis.T, flat) * scale[:, None]
    return (flat - matmul(s.basis, coef)).reshape(g.shape)


def gram_eigh(a: jax.Array, side: str = "left") -> tuple[jax.Array, jax.Array]:
    """Eigendecomposition of a Gram matrix of ``a`` (d, m), eigenvalues descending.

    ``side="left"``: ``a a^T`` (d, d), whose eigenvectors are ``a``'s left singular vectors;
    ``side="right"``: ``a^T a`` (m, m), the right ones. Returns ``(energy, vecs)``: the
    eigenvalues clipped at 0 (the squared singular values, padded with zeros past rank)
    in descending order and the eigenvectors as columns in the same order. The Gram is a
    sum over the contracted axis, so an ``a`` sharded along it is reduced, not gathered.
    """
    if side not in ("left", "right"):
        raise ValueError(f"gram_eigh: side must be 'left' or 'right', got {side!r}.")
    gram = matmul(a, a.T) if side == "left" else matmul(a.T, a)
    evals, evecs = jnp.linalg.eigh(gram)
    return jnp.clip(evals[::-1], 0.0), evecs[:, ::-1]


def gram_svd(a: jax.Array, rtol: float | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD ``a = U diag(s) V^T`` of ``a`` (d, m) through the eigendecomposition of its Gram matrix.

    With k = min(d, m): for d >= m, ``eigh(a^T a)`` gives V (m, k) and ``s^2``, and
    ``U = a V / s`` (d, k); for d < m, ``eigh(a a^T)`` gives U and ``V = a^T U / s``. Only
    the k x k Gram and products with ``a`` are needed, so an ``a`` sharded along its long
    axis is never gathered: the Gram is a cross-shard sum (an all-reduce of k x k) and the
    long-axis factor is computed shard by shard.

    Rank deficiency: directions with ``s^2 <= rtol * s_1^2`` (default ``rtol = k * eps`` of
    ``a``'s dtype) are treated as null: their ``s`` is 0 and their column of the long-axis
    factor is 0 (never a division by 0), where a full SVD returns some orthonormal completion.
    ``s`` is descending; signs follow ``eigh``'s eigenvectors (the SVD's are equally arbitrary).

    Accuracy: the Gram squares the condition number. An eigenvalue is accurate to about
    ``eps * s_1^2``, so ``s_i`` to about ``eps * s_1^2 / s_i``: the top singular values and
    vectors match a full SVD to float tolerance; a singular value near ``sqrt(eps) * s_1``
    (~3e-4 s_1 in float32) or below is noise, and its vectors too.

    Returns:
      ``(u, s, vh)``: u (d, k), s (k,), vh (k, m), in ``a``'s dtype.
    """
    d, m = a.shape
    k = min(d, m)
    if rtol is None:
        rtol = k * float(jnp.finfo(a.dtype).eps)
    wide = d < m
    energy, vecs = gram_eigh(a, side="left" if wide else "right")  # (k,), (k, k)
    keep = energy > rtol * energy[0]
    long = matmul(a.T, vecs) if wide else matmul(a, vecs)  # (m or d, k): the other factor times s
    norms = jnp.sqrt(jnp.sum(long * long, axis=0))  # (k,) ||a v_i||, more accurate than sqrt(energy) for small s
    s = jnp.where(keep, norms, 0.0)
    long = long * jnp.where(keep, 1.0 / jnp.where(keep & (norms > 0), norms, 1.0), 0.0)
    if wide:
        return vecs, s, long.T
    return long, s, vecs.T


def check_threshold(threshold) -> float:
    """Validates a concrete energy threshold; returns it as a float.

    Raises:
      ValueError: if it is not a number in (0, 1].
    """
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in (0, 1], got {threshold!r}.") from None
    if not 0.0 < value <= 1.0:
        raise ValueError(
            f"threshold must be in (0, 1] (a fraction of the representation's energy), got {value}; GPM uses 0.95-0.99."
        )
    return value


def expand(s: Subspace, representation: jax.Array, threshold) -> Subspace:
    """Grows a subspace by the directions of a representation matrix it does not explain.

    GPM's energy criterion (Saha et al. 2021, Eqs. 8-9): with ``R`` the (d, n)
    representation matrix, ``M`` the current basis and ``R_hat = R - M M^T R``,
    take the left singular vectors of ``R_hat`` in order of decreasing singular
    value and add the fewest k of them for which

        ||M M^T R||_F^2 + sum_{i<k} s_i(R_hat)^2  >=  threshold * ||R||_F^2.

    For an empty basis this is Eq. 5, the smallest k with ``||R_k||_F^2 >=
    threshold ||R||_F^2``. (The authors' code counts one direction fewer on the
    first task, ``r = sum(cumsum(ratio) < threshold)``; clx follows the paper.)
    Directions with zero energy are never added, and the rank is capped at d.
    The new directions are re-orthogonalised against the basis, so the basis
    stays orthonormal to float tolerance over many tasks.

    The decomposition is an SVD of ``R_hat`` when n <= d and an eigendecomposition
    of ``R_hat R_hat^T`` (d x d) when n > d, whichever is cheaper; the rank is a
    masked, not sliced, quantity, so the whole function runs under jit.

    Args:
      s: the current subspace of R^d.
      representation: (d, n) float array, one column per example.
      threshold: energy fraction in (0, 1], a Python float or a traced scalar.

    Returns:
      The expanded subspace (same shapes).

    Raises:
      ValueError: if the representation is not 2-D with d rows, or a concrete
        threshold is outside (0, 1].
    """
    d = s.basis.shape[0]
    if representation.ndim != 2 or representation.shape[0] != d:
        raise ValueError(
            f"representation matrix must be (d, n) = ({d}, n), got shape {representation.shape}; columns are examples."
        )
    if not isinstance(threshold, jax.core.Tracer):
        threshold = check_threshold(threshold)
    dtype = s.basis.dtype
    r_mat = representation.astype(dtype)
    n = r_mat.shape[1]

    used = s.basis * s.mask.astype(dtype)
    total = jnp.sum(r_mat**2)
    r_hat = r_mat - matmul(used, matmul(used.T, r_mat))
    if n <= d:
        u, sv, _ = jnp.linalg.svd(r_hat, full_matrices=False)  # (d, n), (n,)
        energy = sv**2
        u = jnp.pad(u, ((0, 0), (0, d - n)))
        energy = jnp.pad(energy, (0, d - n))
    else:
        energy, u = gram_eigh(r_hat, side="left")

    safe_total = jnp.where(total > 0, total, 1.0)
    explained = (total - jnp.sum(r_hat**2)) / safe_total
    before_k = explained + (jnp.cumsum(energy) - energy) / safe_total  # energy before adding k
    useful = energy > 1e-10 * safe_total
    add = jnp.sum((before_k < threshold) & useful, dtype=jnp.int32)
    old_rank = rank(s)
    add = jnp.minimum(add, d - old_rank)

    # Re-orthogonalise against the basis (twice is enough), then normalise.
    for _ in range(2):
        u = u - matmul(used, matmul(used.T, u))
    norms = jnp.linalg.norm(u, axis=0)
    u = u / jnp.where(norms > 0, norms, 1.0)

    cols = jnp.arange(d)
    shifted = jnp.take(u, jnp.clip(cols - old_rank, 0, d - 1), axis=1)
    new_cols = (cols >= old_rank) & (cols < old_rank + add)
    basis = jnp.where(new_cols[None, :], shifted, s.basis)
    importance = jnp.where(new_cols, jnp.ones_like(s.importance), s.importance)
    return Subspace(basis, s.mask | new_cols, importance)
