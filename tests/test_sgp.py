"""SGP (Saha & Roy 2023): importances against a NumPy transcription of the authors' update_SGP, the scaled
projection's invariant, GPM recovered at large alpha step for step, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clx
from clx import subspace as sub
from tests import _cl_tiny

ALPHA = 10.0


def _low_rank(rng, d, n, k, scales):
    left = np.linalg.qr(rng.normal(size=(d, k)))[0] * np.asarray(scales)
    return (left @ rng.normal(size=(k, n))).astype(np.float32)


def _reference(reps, ranks, alpha):
    """The authors' update_SGP (sahagobinda/SGP, main_sgp_cifar100.py) in NumPy, with the ranks given
    (clx follows GPM's Eq. 5 on the first task where the code keeps one direction fewer)."""
    basis, importance = None, None
    for t, (r_mat, rank) in enumerate(zip(reps, ranks)):
        r_mat = r_mat.astype(np.float64)
        if t == 0:
            u, s, _ = np.linalg.svd(r_mat, full_matrices=False)
            basis, importance = u[:, :rank], (alpha + 1) * s[:rank] / (alpha * s[:rank] + s[:rank].max())
            continue
        r_old = basis.shape[1]
        proj = basis @ basis.T @ r_mat
        uc, sc, _ = np.linalg.svd(proj, full_matrices=False)
        on_old = np.sqrt(((basis.T @ uc[:, :r_old]) ** 2) @ sc[:r_old] ** 2)
        u, s, _ = np.linalg.svd(r_mat - proj, full_matrices=False)
        add = rank - r_old
        scores = np.hstack([on_old, s[:add]])
        scaled = (alpha + 1) * scores / (alpha * scores + scores.max())
        scaled[:r_old] = np.clip(scaled[:r_old] + importance, 0, 1)
        basis, importance = np.hstack([basis, u[:, :add]]), scaled
    return basis, importance


def test_importances_and_span_match_the_authors_update_over_three_tasks():
    rng = np.random.default_rng(0)
    d = 24
    reps = [_low_rank(rng, d, 40, 5, [5, 3, 2, 1, 0.5]) for _ in range(3)]
    s, ranks = sub.empty(d), []
    for r_mat in reps:
        new = sub.expand(s, jnp.asarray(r_mat), 0.9)
        s = new._replace(importance=clx.projection.sgp_importance(s, new, jnp.asarray(r_mat), ALPHA))
        ranks.append(int(sub.rank(s)))
    assert ranks[0] < ranks[1] < ranks[2] <= d  # each task adds directions
    basis, importance = _reference(reps, ranks, ALPHA)
    k = ranks[-1]
    got_basis = np.asarray(s.basis)[:, :k]
    np.testing.assert_allclose(got_basis @ got_basis.T, basis @ basis.T, atol=1e-4)  # same span
    # the same directions in the same order (up to sign), so the same per-direction importance
    np.testing.assert_allclose(np.abs(np.sum(got_basis * basis, axis=0)), 1.0, atol=1e-3)
    np.testing.assert_allclose(np.asarray(s.importance)[:k], importance, atol=1e-4)
    assert not np.asarray(s.importance)[k:].any()
    assert np.all((importance > 0) & (importance <= 1))


def test_old_importances_only_grow_and_stay_at_most_one():
    rng = np.random.default_rng(1)
    s = sub.empty(16)
    for t in range(4):
        r_mat = jnp.asarray(_low_rank(rng, 16, 30, 4, [4, 2, 1, 0.3]))
        new = sub.expand(s, r_mat, 0.95)
        imp = clx.projection.sgp_importance(s, new, r_mat, ALPHA)
        old = np.asarray(s.mask)
        assert np.all(np.asarray(imp)[old] >= np.asarray(s.importance)[old] - 1e-7)
        assert np.all(np.asarray(imp) <= 1.0) and np.all(np.asarray(imp) >= 0.0)
        s = new._replace(importance=imp)


def test_scaled_projection_keeps_one_minus_lambda_of_each_direction():
    rng = np.random.default_rng(2)
    model, params = _cl_tiny.model((16,))
    rule = clx.sgp(0.9, alpha=ALPHA, num_samples=40)
    state = rule.init(params)
    x = jnp.asarray(rng.normal(size=(40, 64)), jnp.float32)
    reps = clx.train.make_evidence_fn(model)(params, x, jnp.int32(0))
    _, state = rule.consolidate(state, params, clx.Evidence(jnp.int32(0), x, jnp.zeros(40, jnp.int32), reps))
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    out, _ = rule.update(grads, state, params)
    for path, s in state.subspaces.items():
        b = np.asarray(s.basis)[:, np.asarray(s.mask)]
        lam = np.asarray(s.importance)[np.asarray(s.mask)]
        assert 0 < b.shape[1] and np.any(lam < 0.99)  # a real scaling, not GPM's
        g = _leaf(grads, path)
        np.testing.assert_allclose(b.T @ _leaf(out, path), (1 - lam)[:, None] * (b.T @ g), atol=1e-4)


def _leaf(tree, path):
    leaves = {clx.tree.path_str(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    return np.asarray(leaves[path])


def test_large_alpha_is_gpm_step_for_step():
    stream = _cl_tiny.stream(num_tasks=2, train_subset=128)
    results = {}
    for name, rule in (
        ("gpm", clx.gpm(0.95, num_samples=48)),
        ("sgp", clx.sgp(0.95, alpha=1e30, num_samples=48)),
    ):
        model, params = _cl_tiny.model((16,))
        results[name] = clx.fit(
            model, params, clx.chain(rule, optax.sgd(0.3)), stream, epochs=1, batch_size=16,
            evidence_samples=48, progress=False,
        )  # fmt: skip
    for a, b in zip(jax.tree.leaves(results["gpm"].params), jax.tree.leaves(results["sgp"].params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    sgp_state = next(s for s in results["sgp"].rule_state if isinstance(s, clx.SGPState))
    for s in sgp_state.subspaces.values():
        np.testing.assert_array_equal(np.asarray(s.importance), np.asarray(s.mask, np.float32))


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf"), "ten"])
def test_bad_alpha_is_refused_in_the_factory(alpha):
    with pytest.raises(ValueError, match="sgp: alpha must be"):
        clx.sgp(alpha=alpha)


def test_bad_threshold_names_sgp():
    _, params = _cl_tiny.model((16,))
    with pytest.raises(ValueError, match="threshold must be in"):
        clx.sgp(1.5)
    with pytest.raises(ValueError, match="sgp: 3 thresholds given for 2 projected layers"):
        clx.sgp((0.9, 0.9, 0.9)).init(params)
