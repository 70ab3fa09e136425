"""The replay family (clx.replay): buffers, ER, A-GEM, GEM, DER, DER++, and their registry entries."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx import data, replay
from clx.replay import _buffer
from experiments.methods import replay as replay_methods

LR = 0.1


def _batch(ids, weights=None, y=None, t=None, logits=None):
    """A Batch whose inputs (1,) hold the example ids, so a buffer's content is readable."""
    ids = jnp.asarray(ids, jnp.float32)
    w = jnp.ones(ids.shape, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    y = jnp.zeros(ids.shape, jnp.int32) if y is None else jnp.asarray(y, jnp.int32)
    t = jnp.zeros(ids.shape, jnp.int32) if t is None else jnp.asarray(t, jnp.int32)
    return clx.Batch(ids[:, None], y, t, w, logits)


def _model(heads=1):
    return clx.FunctionalModel.from_module(clx.MLP(64, (16,), 10, num_heads=heads, use_bias=True, rngs=nnx.Rngs(0)))


@functools.cache
def _stream():
    return data.make_stream(data.load_source("digits"), "permuted", 2, seed=0, train_subset=40)


@functools.cache
def _task_arrays(t):
    task = _stream().task(t)
    return jnp.asarray(task.x_train).reshape(40, -1), jnp.asarray(task.y_train)


def _task(t=0, n=40):
    """The first n training examples of task t of a 2-task permuted-digits stream, flattened."""
    x, y = _task_arrays(t)
    return x[:n], y[:n]


@functools.cache
def _program(model, rule, batch_size, num_steps):
    return clx.train.make_train_steps_fn(model, rule, batch_size)(num_steps)


def _steps(model, rule, params, state, x, y, task, num_steps=1, batch_size=None, seed=0):
    prog = _program(model, rule, batch_size or len(y), num_steps)
    ids = jnp.full(len(y), task, jnp.int32)
    key = jax.random.key_data(jax.random.key(seed))
    return prog(None, jax.tree.map(jnp.copy, params), state, x, y, ids, key, task, 0, 0)


# --- buffers ----------------------------------------------------------------------------------------------------------


def test_reservoir_keeps_each_item_with_probability_capacity_over_n_and_never_padding():
    cap, n, b, trials = 10, 50, 10, 2000
    ids = np.arange(n + n // b * 2, dtype=np.float32)  # two padding examples per batch, ids >= n
    real = np.concatenate([np.arange(n).reshape(-1, b), np.full((n // b, 2), -1)], axis=1)
    padded = np.where(real >= 0, real, n + np.arange(real.size).reshape(real.shape))
    weights = (real >= 0).astype(np.float32)

    def run(key):
        buf = replay.reservoir_buffer(cap, (1,))
        for i in range(n // b):
            buf = replay.insert(buf, _batch(padded[i], weights[i]), jax.random.fold_in(key, i))
        return buf

    bufs = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), trials))
    assert np.all(np.asarray(bufs.count) == n) and np.all(np.asarray(bufs.valid))
    kept = np.asarray(bufs.x)[..., 0].astype(int)  # (trials, cap)
    assert kept.max() < n, "a padding example was inserted"
    assert all(len(set(row)) == cap for row in kept)  # no example twice
    freq = np.bincount(kept.ravel(), minlength=n) / trials
    sigma = np.sqrt(cap / n * (1 - cap / n) / trials)
    np.testing.assert_allclose(freq, cap / n, atol=5 * sigma)
    del ids


def test_batch_insertion_equals_item_by_item_algorithm_r_on_the_same_draws():
    cap = 6
    buf = replay.reservoir_buffer(cap, (1,))
    key = jax.random.key(3)
    for step in range(4):  # batches of 8 after the buffer is full: slots collide within a batch
        b = _batch(np.arange(8) + 8 * step, weights=[1, 1, 0, 1, 1, 1, 1, 1])
        k = jax.random.fold_in(key, step)
        slots, _ = _buffer._draws(buf, b, k)
        want = np.asarray(buf.x)[:, 0].copy()
        for i, s in enumerate(np.asarray(slots)):  # Algorithm R one item at a time: later items overwrite
            if s >= 0:
                want[s] = float(b.x[i, 0])
        buf = replay.insert(buf, b, k)
        np.testing.assert_array_equal(np.asarray(buf.x)[:, 0], want)
    assert int(buf.count) == 4 * 7


def test_class_balanced_buffer_keeps_equal_counts_per_class():
    labels = np.array([0] * 60 + [1] * 12 + [2] * 7 + [0] * 20)
    np.random.default_rng(0).shuffle(labels)
    buf = replay.class_balanced_buffer(17, (1,), 3)  # 5 slots per class; the remainder is unused
    assert replay.capacity(buf) == 15
    key = jax.random.key(0)
    for i in range(0, len(labels), 11):
        chunk = labels[i : i + 11]
        buf = jax.jit(replay.insert)(buf, _batch(np.arange(i, i + len(chunk)), y=chunk), jax.random.fold_in(key, i))
    y, valid = np.asarray(buf.y), np.asarray(buf.valid)
    np.testing.assert_array_equal(np.bincount(y[valid], minlength=3), [5, 5, 5])
    np.testing.assert_array_equal(np.asarray(buf.count), [80, 12, 7])
    ids = np.asarray(buf.x)[valid, 0].astype(int)
    np.testing.assert_array_equal(labels[ids], y[valid])  # each stored example kept its own label


def test_task_rings_keep_each_tasks_latest_examples():
    insert = jax.jit(replay.insert)
    buf = replay.task_ring_buffer(4, 3, (1,))
    buf = insert(buf, _batch(np.arange(10), t=[0] * 7 + [1] * 3))
    buf = insert(buf, _batch(np.arange(10, 13), t=[1, 1, 5]))  # task 5 is beyond the memory: dropped
    x, valid = np.asarray(buf.x)[:, 0], np.asarray(buf.valid)
    assert sorted(x[:4]) == [3, 4, 5, 6] and sorted(x[4:8]) == [8, 9, 10, 11]
    assert not valid[8:].any() and np.asarray(buf.count).tolist() == [7, 5, 0]


def test_sample_draws_distinct_filled_slots_and_weights_zero_from_an_empty_buffer():
    empty = replay.reservoir_buffer(20, (1,))
    drawn = replay.sample(empty, jax.random.key(0), 5)
    np.testing.assert_array_equal(drawn.weights, 0.0)
    buf = replay.insert(empty, _batch(np.arange(1, 8)), jax.random.key(1))  # 7 filled slots
    keys = jax.random.split(jax.random.key(2), 20)
    many = jax.jit(jax.vmap(lambda k: replay.sample(buf, k, 10)))(keys)
    few = jax.jit(jax.vmap(lambda k: replay.sample(buf, k, 4)))(keys)
    for s in range(20):
        got = np.asarray(many.x[s])[np.asarray(many.weights[s]) > 0, 0]
        assert sorted(got) == list(range(1, 8))  # fewer filled slots than draws: each once
        got = np.asarray(few.x[s])[:, 0]
        assert np.all(np.asarray(few.weights[s]) == 1) and len(set(got)) == 4 and set(got) <= set(range(1, 8))
    assert len({tuple(np.asarray(few.x[s])[:, 0]) for s in range(20)}) > 10  # the draws differ by key


# --- A-GEM and GEM ---------------------------------------------------------------------------------------------------


def _tree(key, scale=1.0):
    k1, k2 = jax.random.split(key)
    return {"a": scale * jax.random.normal(k1, (3, 4)), "b": {"c": scale * jax.random.normal(k2, (5,))}}


def _dot(a, b):
    return float(sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_agem_projection_makes_the_dot_product_nonnegative_and_leaves_agreeing_gradients_alone():
    hits = 0
    for s in range(30):
        g, r = _tree(jax.random.key(2 * s)), _tree(jax.random.key(2 * s + 1))
        out = replay.project_agem(g, r)
        if _dot(g, r) < 0:
            hits += 1
            assert abs(_dot(out, r)) <= 1e-5 * _dot(r, r)
            chex.assert_trees_all_close(out, jax.tree.map(lambda a, b: a - _dot(g, r) / _dot(r, r) * b, g, r))
        else:
            chex.assert_trees_all_equal(out, g)
    assert 0 < hits < 30


def _kkt(v, gram, dots, mask, margin):
    """max |min(v - margin, grad)| over the masked rows of the scaled problem, in float64."""
    v, p, q = (np.asarray(a, np.float64) for a in (v, gram, dots))
    scale = np.max(np.diag(p)[mask])
    grad = (p @ v + q) / scale
    return np.abs(np.minimum(v - margin, grad)[mask]).max()


@pytest.mark.parametrize("margin", [0.0, 0.5])
def test_gem_dual_solution_meets_the_kkt_conditions(margin):
    rng = np.random.default_rng(0)
    solve = jax.jit(replay.solve_gem_dual, static_argnames=("tol", "max_iter"))
    active = 0
    for _ in range(40):
        t, p = 8, 300
        G = rng.normal(size=(t, p)).astype(np.float32)
        g = (-(rng.random(t) @ G) + rng.normal(size=p)).astype(np.float32)  # conflicts with several tasks
        mask = rng.random(t) < 0.75
        mask[0] = True
        gram, dots = (G.astype(np.float64) @ G.T.astype(np.float64)).astype(np.float32), (G @ g).astype(np.float32)
        v, _ = solve(gram, dots, mask, margin)
        assert _kkt(v, gram, dots, mask, margin) <= 1e-6
        assert np.all(np.asarray(v)[~mask] == 0)
        active += int(np.sum(np.asarray(v)[mask] > margin + 1e-6))
    assert active > 40  # the bounds are not all trivially tight


def _ref_rule_state(rule, params, x0, y0):
    """The rule's state after inserting task 0's examples (its memory of the old task)."""
    state = rule.init(params)
    b = clx.Batch(x0, y0, jnp.zeros_like(y0), jnp.ones(y0.shape, jnp.float32))
    return state._replace(memory=replay.insert(state.memory, b))


@pytest.mark.parametrize("skip_unseen", [True, False])
def test_gem_with_one_old_task_and_no_margin_is_agem_on_the_same_reference_gradient(skip_unseen):
    model, params = _model()
    x0, y0 = _task(0, 16)
    x1, y1 = _task(1, 16)
    grad_fn = lambda p, b: jax.grad(lambda q: clx.replay._common.mean_ce(model.apply(q, b.x), b.y, b.weights))(p)  # noqa: E731
    b1 = clx.Batch(x1, y1, jnp.ones_like(y1), jnp.ones(16, jnp.float32))
    gem = replay.gem(16, 3, (64,), memory_strength=0.0, skip_unseen=skip_unseen)

    @jax.jit
    def both(sign):
        g_ref = grad_fn(params, clx.Batch(x0, y0, jnp.zeros_like(y0), jnp.ones(16)))
        g = jax.tree.map(lambda r, n: sign * r + 0.3 * n, g_ref, _tree_like(params, 7))
        out, _ = gem.update(g, _ref_rule_state(gem, params, x0, y0), params, task_id=1, batch=b1, grad_fn=grad_fn)
        return g, g_ref, out, replay.project_agem(g, g_ref)

    for sign in (1.0, -1.0):  # once aligned with g_ref, once against it
        g, g_ref, out, agem_out = both(sign)
        chex.assert_trees_all_close(out, agem_out, atol=1e-6)
        if sign > 0:
            chex.assert_trees_all_equal(out, g)
        else:
            assert _dot(g, g_ref) < 0 and abs(_dot(out, g_ref)) < 1e-4 * _dot(g_ref, g_ref)


def test_gem_skipping_the_unseen_tasks_gives_the_update_of_the_masked_batch():
    """Task by task under a cond (the tasks not yet old skipped) or all memories as one masked vmapped batch: the
    same projected update and the same memory, with two old tasks of four and a constraint violated."""
    model, params = _model()
    grad_fn = lambda p, b: jax.grad(lambda q: clx.replay._common.mean_ce(model.apply(q, b.x), b.y, b.weights))(p)  # noqa: E731
    state = replay.gem(8, 4, (64,)).init(params)
    examples = [_task(0, 8), _task(1, 8), tuple(a[8:] for a in _task(0, 16))]  # tasks 0, 1 and 2 (the current)
    for t, (x, y) in enumerate(examples):
        state = state._replace(memory=replay.insert(state.memory, clx.Batch(x, y, jnp.full_like(y, t), jnp.ones(8))))
    x2, y2 = examples[2]
    b2 = clx.Batch(x2, y2, jnp.full_like(y2, 2), jnp.ones(8, jnp.float32))
    g_old = grad_fn(params, clx.Batch(*_task(0, 8), jnp.zeros(8, jnp.int32), jnp.ones(8)))
    g = jax.tree.map(lambda r, n: -r + 0.1 * n, g_old, _tree_like(params, 3))  # against task 0's gradient
    outs = [
        jax.jit(
            lambda g, s: replay.gem(8, 4, (64,), skip_unseen=skip).update(
                g, s, params, task_id=2, batch=b2, grad_fn=grad_fn
            )
        )(g, state)
        for skip in (True, False)
    ]
    assert _dot(g, g_old) < 0 and _dot(outs[0][0], g_old) >= -1e-5
    chex.assert_trees_all_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_equal(outs[0][1], outs[1][1])


def _tree_like(params, seed):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


def test_agem_trains_task_0_as_finetuning_and_projects_against_the_old_memory_at_task_1():
    model, params = _model()
    x0, y0 = _task(0, 16)
    rule = clx.chain(replay.agem(16, 2, (64,), reference_batch_size=32), optax.sgd(LR))
    p0, state, _ = _steps(model, rule, params, rule.init(params), x0, y0, task=0)
    ft = clx.chain(optax.sgd(LR))
    ref, _, _ = _steps(model, ft, params, ft.init(params), x0, y0, task=0)
    chex.assert_trees_all_equal(p0, ref)  # no old task: the gradient is untouched
    mem = state[0].memory
    assert np.asarray(mem.count).tolist() == [16, 0]
    x1, y1 = _task(1, 16)
    p1, _, _ = _steps(model, rule, p0, state, -x1, (y1 + 3) % 10, task=1)
    g = jax.tree.map(lambda a, b: (a - b) / LR, p0, p1)
    g_ref = jax.grad(lambda p: clx.replay._common.mean_ce(model.apply(p, x0), y0, jnp.ones(16)))(p0)
    assert _dot(g, g_ref) >= -1e-5 * _dot(g_ref, g_ref)


# --- ER ---------------------------------------------------------------------------------------------------------------


def test_er_with_an_empty_buffer_is_bit_identical_to_finetuning():
    model, params = _model()
    x, y = _task(0, 30)
    er = clx.chain(replay.er(64, (64,)), optax.sgd(LR))
    ft = clx.chain(optax.sgd(LR))
    ours, state, _ = _steps(model, er, params, er.init(params), x, y, task=0)  # one step from the empty buffer
    ref, _, _ = _steps(model, ft, params, ft.init(params), x, y, task=0)
    chex.assert_trees_all_equal(ours, ref)
    assert int(state[0].buffer.count) == 30  # ... and the batch went into the buffer


def test_er_total_loss_is_the_mean_over_the_concatenated_batch_as_mammoth():
    model, params = _model(heads=2)
    x0, y0 = _task(0, 20)
    x1, y1 = _task(1, 10)
    er = replay.er(32, (64,), replay_batch_size=8)

    def both(params):
        state = er.init(params)
        b0 = clx.Batch(x0, y0, jnp.zeros_like(y0), jnp.ones(20))
        state = state._replace(buffer=replay.insert(state.buffer, b0, jax.random.key(1)))
        key = jax.random.key(5)
        w = jnp.ones(10).at[-2:].set(0.0)  # two padding examples
        batch = clx.Batch(x1, y1, jnp.ones_like(y1), w, model.apply(params, x1, jnp.ones_like(y1)), key)
        total = clx.replay._common.mean_ce(batch.logits, y1, w) + er.loss(params, state, batch, model.apply)
        mem = replay.sample(state.buffer, jax.random.fold_in(key, 0), 8)
        xs = jnp.concatenate([x1[:8], mem.x])
        ts = jnp.concatenate([jnp.ones(8, jnp.int32), mem.task_ids])
        ce = optax.softmax_cross_entropy_with_integer_labels(
            model.apply(params, xs, ts), jnp.concatenate([y1[:8], mem.y])
        )
        return total, jnp.mean(ce)

    total, want = jax.jit(both)(params)
    np.testing.assert_allclose(total, want, rtol=1e-6)


# --- DER, DER++ ----------------------------------------------------------------------------------------------------


def test_der_stores_the_logits_of_the_step_at_insertion_and_its_loss_is_mammoths():
    model, params = _model()
    x, y = _task(0, 24)
    rule = clx.chain(replay.derpp(32, (64,), 10, alpha=0.3, beta=0.7, replay_batch_size=6), optax.sgd(LR))
    new, state, _ = _steps(model, rule, params, rule.init(params), x, y, task=0)
    buf = state[0].buffer
    valid = np.asarray(buf.valid)
    assert valid.sum() == 24
    stored_x = buf.x[valid]
    chex.assert_trees_all_close(buf.logits[valid], model.apply(params, stored_x), atol=1e-6)  # the params before
    assert not np.allclose(buf.logits[valid], model.apply(new, stored_x), atol=1e-3)

    der = rule.members[0]

    def both(new, buf_state):
        key = jax.random.key(2)
        batch = clx.Batch(x[:6], y[:6], jnp.zeros(6, jnp.int32), jnp.ones(6), model.apply(new, x[:6]), key)
        got = der.loss(new, buf_state, batch, model.apply)
        m1 = replay.sample(buf_state.buffer, jax.random.fold_in(key, 0), 6)
        m2 = replay.sample(buf_state.buffer, jax.random.fold_in(key, 2), 6)
        mse = jnp.mean(jnp.square(model.apply(new, m1.x) - m1.logits))  # F.mse_loss: mean over all elements
        ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(new, m2.x), m2.y))
        return got, mse, ce, m1.x, m2.x

    got, mse, ce, x1, x2 = jax.jit(both)(new, state[0])
    assert not np.array_equal(x1, x2)  # two independent draws
    np.testing.assert_allclose(got, 0.3 * mse + 0.7 * ce, rtol=1e-6)


def test_der_term_is_zero_with_an_empty_buffer():
    model, params = _model()
    x, y = _task(0, 8)
    der = replay.der(16, (64,), 10, alpha=1.0)
    batch = clx.Batch(x, y, jnp.zeros(8, jnp.int32), jnp.ones(8), model.apply(params, x), jax.random.key(0))
    assert float(der.loss(params, der.init(params), batch, model.apply)) == 0.0


# --- bad input --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: replay.er(0, (64,)), "buffer_size must be an integer >= 1"),
        (lambda: replay.er(10, (64,), replay_batch_size=11), "replay_batch_size=11 is larger than the buffer"),
        (lambda: replay.class_balanced_buffer(5, (64,), 10), "capacity >= 10"),
        (lambda: replay.reservoir_buffer(0, (64,)), "capacity must be an integer >= 1"),
        (lambda: replay.der(10, (64,), 10, alpha=-1.0), "alpha must be a finite value >= 0"),
        (lambda: replay.derpp(10, (64,), 10, beta=-0.5), "beta must be a finite value >= 0"),
        (lambda: replay.agem(10, 2, (64,), reference_batch_size=256), "reference_batch_size=256 is larger"),
        (lambda: replay.gem(0, 2, (64,)), "memory_per_task must be an integer >= 1"),
        (lambda: replay.gem(16, 2, (64,), memory_strength=-1.0), "memory_strength must be"),
        (lambda: replay.sample(replay.reservoir_buffer(4, (1,)), jax.random.key(0), 5), "replay batch of 5"),
    ],
)
def test_bad_arguments_raise_naming_the_value_and_the_fix(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_er_with_a_training_batch_larger_than_the_buffer_raises_at_trace_time():
    model, params = _model()
    x, y = _task(0, 20)
    rule = clx.chain(replay.er(8, (64,)), optax.sgd(LR))
    with pytest.raises(ValueError, match="larger than the buffer"):
        _steps(model, rule, params, rule.init(params), x, y, task=0)


# --- registry ---------------------------------------------------------------------------------------------------------


def _config(name):
    from tests import _cl_tiny

    return _cl_tiny.digits_config(name)


@pytest.mark.parametrize("name", ["er", "agem", "gem", "der", "derpp"])
def test_registry_entries_build_their_rule_from_the_config_and_the_model(name):
    from experiments import methods

    config = _config(name)
    method = methods.get(name)
    method.check(config)
    model, params = _model()
    assert replay_methods.model_shapes(model) == ((64,), 10)
    rule = method.make_rule(config, model)
    assert rule.members[0].name == name
    state = rule.init(params)
    assert state[0][0].x.shape[1:] == (64,)


def test_registry_rejects_a_gem_memory_for_fewer_tasks_than_the_stream():
    config = _config("gem")
    config.gem.num_tasks = 1
    with pytest.raises(ValueError, match="gem.num_tasks"):
        replay_methods.GEM.check(config)
    config = _config("derpp")
    config.derpp.replay_batch_size = 500
    with pytest.raises(ValueError, match="larger than the buffer"):
        replay_methods.DERPP.check(config)
