"""clx.subspace.gram_svd (the thin SVD through the Gram matrix) and OPCM's ``svd="gram"`` on one
device: the full SVD's singular values, vectors (up to sign), split rank and projection on
well-conditioned matrices; exact zeros, no NaN, for rank-deficient ones; ``svd="auto"`` is the full
SVD on one device. The 8-device, gather-free case is in tests/test_sharding_model.py."""

import jax.numpy as jnp
import numpy as np
import pytest

import clx.merging as m
from clx.merging._opcm import split_rank
from clx.subspace import gram_svd


def _conditioned(rng, shape, s):
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], len(s))))
    return jnp.asarray((u * np.asarray(s)) @ v.T, jnp.float32)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (8, 8)])
def test_gram_svd_equals_the_full_svd_on_a_well_conditioned_matrix(shape):
    rng = np.random.default_rng(0)
    k = min(shape)
    a = _conditioned(rng, shape, np.linspace(3.0, 1.0, k))
    u, s, vh = gram_svd(a)
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    u_ref, s_ref, vh_ref = np.linalg.svd(np.asarray(a, np.float64), full_matrices=False)
    np.testing.assert_allclose(s, s_ref, atol=1e-5 * s_ref[0])
    assert np.all(np.diff(np.asarray(s)) <= 0)  # descending
    # vectors equal up to one sign per pair (u_i, v_i), the same sign on both sides
    sign = np.sign(np.sum(np.asarray(u) * u_ref, axis=0))
    np.testing.assert_allclose(np.asarray(u) * sign, u_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vh) * sign[:, None], vh_ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(u) @ np.diag(s) @ np.asarray(vh), a, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 4), (4, 7)])
def test_gram_svd_of_a_rank_deficient_matrix_zeroes_the_null_directions_without_nans(shape):
    rng = np.random.default_rng(1)
    a = _conditioned(rng, shape, [2.0, 1.0])  # rank 2 of k = 4
    u, s, vh = gram_svd(a)
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(vh))
    np.testing.assert_allclose(s[:2], [2.0, 1.0], atol=1e-5)
    assert np.all(np.asarray(s[2:]) == 0)
    long = np.asarray(u if shape[0] >= shape[1] else vh.T)
    assert np.all(long[:, 2:] == 0)  # the long factor's null columns: 0, never x / 0
    np.testing.assert_allclose(np.asarray(u) @ np.diag(s) @ np.asarray(vh), a, atol=1e-5)
    zu, zs, zvh = gram_svd(jnp.zeros(shape))
    assert np.all(np.asarray(zs) == 0) and np.all(np.isfinite(zu)) and np.all(np.isfinite(zvh))


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (6, 6)])
@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_opcm_projection_through_the_gram_equals_the_full_svd(shape, zero_diagonal):
    rng = np.random.default_rng(2)
    k = min(shape)
    merged_tv = _conditioned(rng, shape, np.geomspace(4.0, 1.0, k))
    tau = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    full, r_full = m.opcm_projection(merged_tv, tau, 0.6, zero_diagonal, "full")
    gram, r_gram = m.opcm_projection(merged_tv, tau, 0.6, zero_diagonal, "gram")
    assert int(r_gram) == int(r_full) > 0
    assert int(split_rank(gram_svd(merged_tv)[1], 0.6)) == int(r_full)
    np.testing.assert_allclose(gram, full, atol=2e-5)
    assert float(jnp.max(jnp.abs(full - tau))) > 0.1  # the projection removed something


def test_opcm_auto_is_the_full_svd_on_one_device_and_bad_svd_names_the_choices():
    rng = np.random.default_rng(3)
    tree = lambda: {"w": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32), "b": jnp.zeros(4)}
    pre, fts = tree(), [tree() for _ in range(3)]
    auto = m.merge_sequence(m.opcm(svd="auto"), pre, fts).merged  # one device: the full SVD
    default = m.merge_sequence(m.opcm(), pre, fts).merged
    full = m.merge_sequence(m.opcm(svd="full"), pre, fts).merged
    np.testing.assert_array_equal(default["w"], full["w"])
    gram = m.merge_sequence(m.opcm(svd="gram"), pre, fts).merged
    np.testing.assert_array_equal(auto["w"], full["w"])
    np.testing.assert_allclose(gram["w"], full["w"], atol=1e-4)
    with pytest.raises(ValueError, match=r"opcm: svd must be one of \('auto', 'full', 'gram'\), got 'qr'"):
        m.opcm(svd="qr")
    with pytest.raises(ValueError, match="opcm_projection: svd must be one of"):
        m.opcm_projection(pre["w"], fts[0]["w"], 0.5, True, "qr")
