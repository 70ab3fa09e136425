"""clx.merging: exact math on hand-made cases, invariants, equivalences between the continual and
all-at-once forms, and every bad-input error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clx.merging as m

KEY = jax.random.key(0)
# one instance of each continual merge for the whole file: jit caches its compiled step per instance
MERGERS = {
    "continual_task_arithmetic": m.continual_task_arithmetic(),
    "continual_ties_merging": m.continual_ties_merging(),
    "continual_weight_average": m.continual_weight_average(),
    "opcm": m.opcm(),
}


def _tree(seed, scale=1.0):
    """A tiny params tree: two 2-D kernels (one non-square) and a bias (NumPy draws: no compiles)."""
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
    return {"layers": [{"kernel": f(6, 4), "bias": f(4)}, {"kernel": f(4, 4)}]}


def _models(n, seed=1):
    pre = _tree(seed)
    fts = [jax.tree.map(jnp.add, pre, _tree(100 * seed + i, 0.1)) for i in range(n)]
    return pre, fts


def _close(a, b, **kw):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw)


# --- task vectors and task arithmetic ---------------------------------------------------------------------------------


def test_task_arithmetic_with_one_model_and_lam_one_returns_it_exactly():
    pre = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.array([1.0, -2.0])}
    ft = {"w": pre["w"] * 3.0 - 5.0, "b": jnp.array([0.5, 4.0])}  # integer / dyadic values: every difference exact
    out = m.task_arithmetic(pre, [ft], lam=1.0)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ft)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert x.dtype == y.dtype


def test_task_arithmetic_is_theta0_plus_lam_times_the_sum_and_takes_a_traced_lam():
    pre, fts = _models(3)
    taus = [m.task_vector(f, pre) for f in fts]
    expect = m.apply_task_vector(pre, m.tree_sum(taus), 0.3)
    _close(m.task_arithmetic(pre, fts), expect, rtol=1e-6, atol=1e-6)  # default lam 0.3
    lams = jnp.array([0.0, 0.5])
    swept = jax.jit(jax.vmap(lambda lam: m.task_arithmetic(pre, fts, lam)))(lams)
    _close(jax.tree.map(lambda x: x[0], swept), pre, rtol=0, atol=0)
    _close(jax.tree.map(lambda x: x[1], swept), m.apply_task_vector(pre, m.tree_sum(taus), 0.5), rtol=1e-6, atol=1e-6)


def test_continual_task_arithmetic_equals_all_at_once_task_arithmetic():
    pre, fts = _models(4)
    state = m.merge_sequence(MERGERS["continual_task_arithmetic"], pre, fts)  # lam 0.3
    assert int(state.count) == 4
    _close(state.merged, m.task_arithmetic(pre, fts, 0.3), rtol=1e-6, atol=1e-6)


def test_continual_weight_average_equals_the_uniform_average_and_takes_the_first_model_as_is():
    pre, fts = _models(3)
    merger = MERGERS["continual_weight_average"]
    one = merger.merge_next(merger.init(pre), fts[0])
    _close(one.merged, fts[0], rtol=0, atol=0)
    _close(m.merge_sequence(merger, pre, fts).merged, m.weight_average(fts), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(MERGERS))
def test_a_jitted_scan_over_stacked_models_equals_the_python_loop(name):
    merger = MERGERS[name]
    pre, fts = _models(3)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *fts)
    scanned = jax.jit(lambda p, s: m.merge_scan(merger, p, s))(pre, stacked)
    looped = m.merge_sequence(merger, pre, fts)
    _close(scanned.merged, looped.merged, rtol=1e-5, atol=1e-6)
    assert int(scanned.count) == 3


# --- TIES -------------------------------------------------------------------------------------------------------------


def _split(v):
    """A 5-vector as a two-leaf tree, so a per-leaf trim would differ from the whole-vector trim."""
    v = jnp.asarray(v, jnp.float32)
    return {"a": v[:2], "b": v[2:]}


def _join(tree):
    return np.concatenate([np.asarray(tree["a"]), np.asarray(tree["b"])])


TAUS = [
    [3.0, -1.0, 0.5, 2.0, -4.0],  # top 3 of 5 (k = 60): 3, 2, -4
    [-2.0, 5.0, 1.0, -0.1, -3.0],  # -2, 5, -3
    [1.0, -6.0, 0.2, 0.3, 2.0],  # 1, -6, 2
]
# trimmed sums [2, -1, 0, 2, -5] -> elected signs [+, -, 0, +, -]; entry 2 has no trimmed value left.
# agreeing values: entry 0 {3, 1}, entry 1 {-6}, entry 2 {}, entry 3 {2}, entry 4 {-4, -3}
EXPECTED = {"mean": [2.0, -6.0, 0.0, 2.0, -3.5], "sum": [4.0, -6.0, 0.0, 2.0, -7.0], "max": [3.0, -6.0, 0.0, 2.0, -4.0]}


@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
def test_ties_trims_over_the_whole_vector_elects_signs_and_takes_the_disjoint_mean(merge):
    pre = _split(np.zeros(5))
    fts = [_split(t) for t in TAUS]
    out = m.ties_merging(pre, fts, k=60, lam=1.0, merge=merge)
    np.testing.assert_array_equal(_join(out), np.array(EXPECTED[merge], np.float32))
    half = m.ties_merging(pre, fts, k=60, lam=0.5, merge=merge)
    np.testing.assert_array_equal(_join(half), 0.5 * np.array(EXPECTED[merge], np.float32))


def test_ties_gives_a_zero_elected_sign_the_majority_sign_as_the_authors_code_does():
    # trimmed sums [0, 3]: entry 0's sign is 0 and takes sgn(0 + 1) = +, so only tau_1's +1 enters there
    tvs = [{"v": jnp.array([1.0, 2.0])}, {"v": jnp.array([-1.0, 1.0])}]
    np.testing.assert_array_equal(np.asarray(m.ties_task_vector(tvs, k=100)["v"]), [1.0, 1.5])


@settings(max_examples=5, deadline=None)
@given(d=st.sampled_from([1, 7, 40]), k=st.floats(0.5, 100.0), seed=st.integers(0, 1000))
def test_ties_trim_keeps_exactly_the_top_k_percent_entries(d, k, seed):
    x = jnp.asarray(np.random.default_rng(seed).standard_normal(d), jnp.float32)
    kept = np.asarray(jax.jit(m.trim_top_k, static_argnums=1)(x, k))
    n = max(1, int(np.floor(d * k / 100 + 1e-9)))
    assert np.count_nonzero(kept) == n
    top = np.argsort(-np.abs(np.asarray(x)), kind="stable")[:n]
    np.testing.assert_array_equal(np.flatnonzero(kept), np.sort(top))
    np.testing.assert_array_equal(kept[top], np.asarray(x)[top])


def test_ties_trim_keeps_exactly_k_entries_when_magnitudes_tie():
    kept = np.asarray(m.trim_top_k(jnp.ones(10), 30))
    np.testing.assert_array_equal(kept, [1, 1, 1, 0, 0, 0, 0, 0, 0, 0])


def test_continual_ties_adds_the_first_model_untrimmed_then_ties_of_merged_and_new_by_hand():
    pre = {"v": jnp.zeros(4)}
    merger = m.continual_ties_merging(lam=0.5, k=50, merge="sum")
    s1 = merger.merge_next(merger.init(pre), {"v": jnp.array([2.0, -1.0, 0.5, 4.0])})
    np.testing.assert_array_equal(np.asarray(s1.merged["v"]), [1.0, -0.5, 0.25, 2.0])
    # merged tv [1, -.5, .25, 2] -> top 2: [1, 0, 0, 2]; new tau [-3, 1, 2, .1] -> [-3, 0, 2, 0]
    # sums [-2, 0, 2, 2] -> signs [-, 0 -> +, +, +]; agreeing sums [-3, 0, 2, 2]; merged += 0.5 * that
    s2 = merger.merge_next(s1, {"v": jnp.array([-3.0, 1.0, 2.0, 0.1])})
    np.testing.assert_array_equal(np.asarray(s2.merged["v"]), [-0.5, -0.5, 1.25, 3.0])


# --- DARE -------------------------------------------------------------------------------------------------------------


def test_dare_is_unbiased_within_the_variance_of_the_mean_over_many_keys():
    tv = _tree(7)
    p, n = 0.7, 4000
    draws = jax.jit(jax.vmap(lambda k: m.dare(tv, p, k)))(jax.random.split(KEY, n))
    for x, d in zip(jax.tree.leaves(tv), jax.tree.leaves(draws)):
        x, d = np.asarray(x, np.float64), np.asarray(d, np.float64)
        sd_of_mean = np.abs(x) * np.sqrt(p / (1 - p) / n)  # one draw: x / (1 - p) w.p. 1 - p, else 0
        assert np.all(np.abs(d.mean(0) - x) <= 5 * sd_of_mean + 1e-6)
        survivors = d != 0
        np.testing.assert_allclose(d[survivors], np.broadcast_to(x / (1 - p), d.shape)[survivors], rtol=1e-6)
        drop_rate = 1 - survivors.mean()
        assert abs(drop_rate - p) <= 5 * np.sqrt(p * (1 - p) / survivors.size)


def test_dare_with_p_zero_is_the_identity_and_without_rescale_keeps_survivors_as_they_are():
    tv = _tree(3)
    same = m.dare(tv, 0.0, KEY)
    for x, y in zip(jax.tree.leaves(tv), jax.tree.leaves(same)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    raw = m.dare(tv, 0.5, KEY, rescale=False)
    scaled = m.dare(tv, 0.5, KEY)
    for x, r, s in zip(jax.tree.leaves(tv), jax.tree.leaves(raw), jax.tree.leaves(scaled)):
        x, r, s = np.asarray(x), np.asarray(r), np.asarray(s)
        assert np.all((r == 0) | (r == x)) and 0 < np.count_nonzero(r) < r.size
        np.testing.assert_allclose(s, 2 * r, rtol=1e-6)


def test_dare_models_then_task_arithmetic_is_task_arithmetic_of_the_dared_task_vectors():
    pre, fts = _models(2)
    keys = jax.random.split(KEY, 2)
    tvs = [m.dare(m.task_vector(f, pre), 0.5, k) for f, k in zip(fts, keys)]
    direct = m.apply_task_vector(pre, m.tree_sum(tvs), 0.3)
    _close(m.task_arithmetic(pre, m.dare_models(pre, fts, 0.5, KEY), 0.3), direct, rtol=1e-5, atol=1e-6)


# --- OPCM -------------------------------------------------------------------------------------------------------------


def test_split_rank_is_the_first_index_whose_cumulative_share_exceeds_alpha():
    s = jnp.array([4.0, 3.0, 2.0, 1.0])  # cumulative shares .4 .7 .9 1
    assert [int(m.split_rank(s, a)) for a in (0.3, 0.5, 0.75, 0.95)] == [0, 1, 2, 3]
    assert int(m.split_rank(jnp.array([1.0, 1.0]), 0.5)) == 1  # 0.5 is not > 0.5
    assert int(m.split_rank(jnp.zeros(3), 0.5)) == 0  # a zero merged task vector: nothing protected


def _with_singular_values(rng, shape, s):
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], shape[0])))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], shape[1])))
    return jnp.asarray((u[:, : len(s)] * np.asarray(s)) @ v[:, : len(s)].T, jnp.float32)


@pytest.mark.parametrize("shape", [(5, 4), (4, 6)])
@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_opcm_projection_zeroes_the_old_principal_block_and_matches_fusionbenchs_full_svd_formula(shape, zero_diagonal):
    rng = np.random.default_rng(1)
    merged_tv = _with_singular_values(rng, shape, [4.0, 3.0, 2.0, 1.0])
    tau = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    cleaned, r = m.opcm_projection(merged_tv, tau, 0.75, zero_diagonal)
    assert int(r) == 2
    u, s, vh = np.linalg.svd(np.asarray(merged_tv, np.float64), full_matrices=True)
    v = vh.T
    before, after = u.T @ np.asarray(tau, np.float64) @ v, u.T @ np.asarray(cleaned, np.float64) @ v
    np.testing.assert_allclose(after[:2, :2], 0, atol=1e-5)  # no component left in the old top-r subspace
    diag = np.arange(min(shape))
    if zero_diagonal:
        np.testing.assert_allclose(after[diag, diag], 0, atol=1e-5)
    else:
        np.testing.assert_allclose(after[diag[2:], diag[2:]], before[diag[2:], diag[2:]], atol=1e-5)
    # FusionBench: u.T @ tau @ v with the full SVD, zero the block (and the diagonal), map back
    ref = before.copy()
    ref[:2, :2] = 0
    if zero_diagonal:
        ref[diag, diag] = 0
    np.testing.assert_allclose(np.asarray(cleaned), u @ ref @ v.T, atol=1e-5)


def test_opcm_at_split_rank_zero_without_the_diagonal_fix_is_task_arithmetic_rescaled_to_the_mean_norm():
    pre, fts = _models(3)
    # alpha 1e-6 < s_1 / sum(s) for any nonzero merged task vector: r = 0 at every step
    state = m.merge_sequence(m.opcm(alpha=1e-6, zero_diagonal=False), pre, fts)
    taus = [m.task_vector(f, pre) for f in fts]
    total = m.tree_sum(taus)
    mean_norm = np.mean([float(m.tree_norm(t)) for t in taus])
    expect = m.apply_task_vector(pre, total, mean_norm / float(m.tree_norm(total)))
    _close(state.merged, expect, rtol=1e-5, atol=1e-6)


def test_opcm_takes_the_first_model_as_is_and_keeps_the_merged_norm_at_the_mean_task_vector_norm():
    pre, fts = _models(4)
    merger = jax.jit(MERGERS["opcm"].merge_next)
    state = MERGERS["opcm"].init(pre)
    norms = []
    for i, f in enumerate(fts):
        state = merger(state, f)
        norms.append(float(m.tree_norm(m.task_vector(f, pre))))
        if i == 0:
            _close(state.merged, fts[0], rtol=0, atol=1e-6)
        merged_norm = float(m.tree_norm(m.task_vector(state.merged, pre)))
        np.testing.assert_allclose(merged_norm, np.mean(norms), rtol=1e-5)
    # the bias (1-D) is never projected: S's bias is the plain sum of the task vectors' biases
    bias_sum = sum(np.asarray(f["layers"][0]["bias"] - pre["layers"][0]["bias"]) for f in fts)
    np.testing.assert_allclose(np.asarray(state.sum_tv["layers"][0]["bias"]), bias_sum, rtol=1e-5, atol=1e-6)


def test_opcm_project_predicate_chooses_the_projected_leaves():
    pre, fts = _models(2)
    none = m.merge_sequence(m.opcm(project=lambda path, leaf: False), pre, fts)
    _close(none.sum_tv, m.tree_sum([m.task_vector(f, pre) for f in fts]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="layers/0/bias.*only 2-D"):
        m.merge_sequence(m.opcm(project=lambda path, leaf: True), pre, fts)


# --- errors -----------------------------------------------------------------------------------------------------------


def test_a_tree_mismatch_names_the_first_differing_leaf_and_what_differs():
    pre, (ft,) = _models(1)
    wrong_shape = jax.tree.map(lambda x: x, ft)
    wrong_shape["layers"][1]["kernel"] = jnp.zeros((4, 5))
    with pytest.raises(ValueError, match=r"'layers/1/kernel' has shape \(4, 4\) in pretrained but \(4, 5\) in finetun"):
        m.task_arithmetic(pre, [ft, wrong_shape])
    missing = {"layers": [ft["layers"][0], {}]}
    with pytest.raises(ValueError, match="finetuned.* has no leaf 'layers/1/kernel'"):
        m.ties_merging(pre, [missing])
    renamed = {"layers": [{"kernel": ft["layers"][0]["kernel"], "b": ft["layers"][0]["bias"]}, ft["layers"][1]]}
    with pytest.raises(ValueError, match="leaf 0 is 'layers/0/bias' in pretrained but 'layers/0/b'"):
        m.task_vector(renamed, pre)
    for merger in MERGERS.values():
        with pytest.raises(ValueError, match="layers/1/kernel"):
            merger.merge_next(merger.init(pre), wrong_shape)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.2, 1.5])
def test_opcm_rejects_alpha_outside_the_open_unit_interval(alpha):
    with pytest.raises(ValueError, match=r"opcm: alpha must be in \(0, 1\)"):
        m.opcm(alpha)


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dare_rejects_p_outside_zero_to_one(p):
    tv = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"drop probability p must be in \[0, 1\)"):
        m.dare(tv, p, KEY)
    with pytest.raises(ValueError, match=r"drop probability p must be in \[0, 1\)"):
        m.dare_models(tv, [tv], p, KEY)


@pytest.mark.parametrize("k", [0.0, -5.0, 100.5])
def test_ties_rejects_k_outside_zero_to_hundred(k):
    pre, fts = _models(1)
    with pytest.raises(ValueError, match=r"k is the percentage .* in \(0, 100\]"):
        m.ties_merging(pre, fts, k=k)
    with pytest.raises(ValueError, match=r"in \(0, 100\]"):
        m.continual_ties_merging(k=k)
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda kk: m.ties_task_vector(fts, k=kk))(20.0)


def test_negative_lam_and_unknown_merge_are_rejected():
    pre, fts = _models(1)
    for call in (
        lambda: m.task_arithmetic(pre, fts, lam=-0.1),
        lambda: m.ties_merging(pre, fts, lam=-1.0),
        lambda: m.continual_task_arithmetic(-0.3),
        lambda: m.continual_ties_merging(lam=-0.5),
    ):
        with pytest.raises(ValueError, match="lam must be a finite value >= 0"):
            call()
    with pytest.raises(ValueError, match="merge must be one of"):
        m.ties_merging(pre, fts, merge="median")
    with pytest.raises(TypeError, match="zero_diagonal must be True or False"):
        m.opcm(zero_diagonal=1)


def test_fewer_than_one_model_is_rejected_and_a_lone_tree_is_a_type_error():
    pre, (ft,) = _models(1)
    for call in (
        lambda: m.task_arithmetic(pre, []),
        lambda: m.ties_merging(pre, []),
        lambda: m.weight_average([]),
        lambda: m.dare_models(pre, [], 0.5, KEY),
        lambda: m.merge_sequence(m.opcm(), pre, []),
    ):
        with pytest.raises(ValueError, match="at least one fine-tuned model"):
            call()
    with pytest.raises(ValueError, match="at least one fine-tuned model"):
        m.merge_scan(m.opcm(), pre, jax.tree.map(lambda x: x[None][:0], ft))
    with pytest.raises(TypeError, match="list or tuple"):
        m.task_arithmetic(pre, ft)
