"""Invariants and exact cases of the subspace toolkit (clx.subspace)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clx import subspace as sub


def _random_subspace(d, k, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    basis = np.zeros((d, d), np.float32)
    basis[:, :k] = q[:, :k]
    mask = np.arange(d) < k
    return sub.Subspace(jnp.asarray(basis), jnp.asarray(mask), jnp.asarray(mask, jnp.float32))


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 40), m=st.integers(1, 12), data=st.data())
def test_project_out_is_orthogonal_to_masked_basis(d, m, data):
    k = data.draw(st.integers(0, d))
    seed = data.draw(st.integers(0, 2**16))
    s = _random_subspace(d, k, seed)
    g = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(d, m)), jnp.float32)
    out = sub.project_out(g, s)
    used = np.asarray(s.basis)[:, np.asarray(s.mask)]
    np.testing.assert_allclose(used.T @ np.asarray(out), 0.0, atol=1e-4)
    # The component outside the subspace is untouched.
    complement = np.eye(d) - used @ used.T
    np.testing.assert_allclose(complement @ np.asarray(out), complement @ np.asarray(g), atol=1e-4)
    # The cached projector gives the same result.
    np.testing.assert_allclose(np.asarray(sub.complement_projector(s) @ g), np.asarray(out), atol=1e-4)


def test_project_out_rejects_wrong_rows():
    with pytest.raises(ValueError, match="subspace lives in R\\^5"):
        sub.project_out(jnp.ones((4, 3)), sub.empty(5))


def _with_spectrum(d, n, singular_values, seed=0):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v, _ = np.linalg.qr(rng.normal(size=(n, n)))
    s = np.zeros((d, n))
    s[: len(singular_values), : len(singular_values)] = np.diag(singular_values)
    return (u @ s @ v.T).astype(np.float32), u


@pytest.mark.parametrize("n", [12, 40])  # n <= d uses the SVD, n > d the eigendecomposition
def test_expand_rank_follows_energy_criterion(n):
    # Energies 0.5, 0.25, 0.15, 0.06, 0.04 of the total: cumulative 0.5, 0.75, 0.9, 0.96, 1.0.
    energies = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
    r, u = _with_spectrum(20, n, np.sqrt(energies * 100.0))
    for threshold, want in [(0.5, 1), (0.74, 2), (0.75, 2), (0.8, 3), (0.95, 4), (0.97, 5), (1.0, 5)]:
        s = sub.expand(sub.empty(20), jnp.asarray(r), threshold)
        assert int(sub.rank(s)) == want, threshold
        basis = np.asarray(s.basis)[:, :want]
        np.testing.assert_allclose(basis.T @ basis, np.eye(want), atol=1e-5)
        # The chosen directions are the top singular directions of R.
        np.testing.assert_allclose(np.abs(basis.T @ u[:, :want]), np.eye(want), atol=1e-4)


def test_expand_second_task_counts_energy_already_explained():
    energies = np.array([0.5, 0.25, 0.15, 0.06, 0.04])
    r, u = _with_spectrum(20, 12, np.sqrt(energies * 100.0))
    first = sub.expand(sub.empty(20), jnp.asarray(r), 0.5)  # keeps direction u0
    assert int(sub.rank(first)) == 1
    # Same matrix again at 0.8: 0.5 is explained, u1 (0.25) and u2 (0.15) reach 0.9 >= 0.8.
    second = sub.expand(first, jnp.asarray(r), 0.8)
    assert int(sub.rank(second)) == 3
    b = np.asarray(second.basis)
    np.testing.assert_allclose(b[:, :3].T @ b[:, :3], np.eye(3), atol=1e-5)
    np.testing.assert_array_equal(b[:, 0], np.asarray(first.basis)[:, 0])  # old columns kept
    assert np.all(b[:, 3:] == 0)
    # Nothing new to add once the threshold is met.
    third = sub.expand(second, jnp.asarray(r), 0.85)
    np.testing.assert_array_equal(np.asarray(third.basis), b)


def test_expand_orthonormal_over_many_tasks_and_capped_at_d():
    d = 16
    s = sub.empty(d)
    rng = np.random.default_rng(3)
    step = jax.jit(sub.expand)
    for _ in range(8):
        s = step(s, jnp.asarray(rng.normal(size=(d, 5)), jnp.float32), 0.99)
        k = int(sub.rank(s))
        b = np.asarray(s.basis)[:, :k]
        np.testing.assert_allclose(b.T @ b, np.eye(k), atol=2e-5)
        assert np.all(np.asarray(s.mask) == (np.arange(d) < k))
    assert int(sub.rank(s)) == d


def test_expand_ignores_zero_energy_and_zero_matrix():
    s = sub.expand(sub.empty(6), jnp.zeros((6, 3)), 0.9)
    assert int(sub.rank(s)) == 0
    r = np.zeros((6, 4), np.float32)
    r[0] = 1.0  # rank one
    s = sub.expand(sub.empty(6), jnp.asarray(r), 1.0)
    assert int(sub.rank(s)) == 1


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan"), "x"])
def test_threshold_outside_unit_interval_raises(bad):
    with pytest.raises(ValueError, match="threshold must be"):
        sub.expand(sub.empty(4), jnp.ones((4, 2)), bad)


def test_expand_rejects_wrong_representation_shape():
    with pytest.raises(ValueError, match="representation matrix must be"):
        sub.expand(sub.empty(4), jnp.ones((3, 2)), 0.9)
