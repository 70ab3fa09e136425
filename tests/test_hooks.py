"""Each hook of the contract, wired through the trainer, checked by an invariant
that fails when the wiring is wrong (the rules are in tests/_rules.py)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import clx
from clx import data
from tests import _rules

LR = 0.1


def _stream(num_tasks=2, n=53):
    return data.make_stream(data.load_source("digits"), "permuted", num_tasks, seed=0, train_subset=n)


def _model():
    return clx.FunctionalModel.from_module(clx.MLP(64, (16,), 10, use_bias=True, rngs=nnx.Rngs(0)))


def _fit(rule, num_tasks=2, n=53, epochs=2):
    model, params = _model()
    return clx.fit(
        model, params, rule, _stream(num_tasks, n), epochs=epochs, batch_size=10, evidence_samples=20, progress=False
    )


def _finetune():
    return _fit(clx.chain(optax.sgd(LR)))


def _task0(n=30):
    task = _stream(1, n).task(0)
    return jnp.asarray(task.x_train), jnp.asarray(task.y_train)


def _ce(model, p, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y))


# --- a loss term ------------------------------------------------------------------------------------------------------


def test_loss_term_of_weight_zero_is_bit_identical_to_finetuning():
    ours, ref = _fit(clx.chain(_rules.logit_penalty(0.0), optax.sgd(LR))), _finetune()
    chex.assert_trees_all_equal(ours.params, ref.params)
    np.testing.assert_array_equal(ours.accuracy_matrix, ref.accuracy_matrix)


def test_loss_term_is_differentiated_with_the_task_loss_in_one_pass():
    model, params = _model()
    x, y = _task0()
    w = 0.3
    rule = clx.chain(_rules.logit_penalty(w), optax.sgd(LR))
    steps = clx.train.make_train_steps_fn(model, rule, batch_size=len(y))(1)  # one step over the whole batch
    ids = jnp.zeros(len(y), jnp.int32)
    key = jax.random.key_data(jax.random.key(0))
    new, _, _ = steps(None, jax.tree.map(jnp.copy, params), rule.init(params), x, y, ids, key, 0, 0, 0)

    def total(p):  # the batch order does not matter for a mean over the whole set
        logits = model.apply(p, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.mean(ce) + w * jnp.mean(jnp.sum(jnp.square(logits), -1))

    want = jax.tree.map(lambda p, g: p - LR * g, params, jax.grad(total)(params))
    chex.assert_trees_all_close(new, want, atol=1e-6)

    # One forward/backward: the step with the term runs as many matrix products as the step without it.
    def n_dots(r):
        prog = clx.train.make_train_steps_fn(model, r, batch_size=len(y))(1)
        text = prog.lower(None, params, r.init(params), x, y, ids, key, 0, 0, 0).as_text()
        return text.count("dot_general")

    assert n_dots(rule) == n_dots(clx.chain(optax.sgd(LR)))


# --- a reference gradient on other data ----------------------------------------------------------------------------


def test_reference_gradient_is_the_task_gradient_on_the_stored_batch_and_projection_holds():
    model, params = _model()
    x, y = _task0(40)
    rule = clx.chain(_rules.ref_projection(16, (8, 8, 1)), optax.sgd(LR))
    ev = clx.Evidence(jnp.int32(0), x[:20], y[:20], {}, model.apply)
    _, state = rule.consolidate(rule.init(params), params, ev)  # stores x[:16] as the reference batch
    steps = clx.train.make_train_steps_fn(model, rule, batch_size=len(y))(1)
    key = jax.random.key_data(jax.random.key(0))
    x1 = x[::-1] + 0.5  # another task's batch
    new, state, _ = steps(None, jax.tree.map(jnp.copy, params), state, x1, y, jnp.ones(len(y), jnp.int32), key, 1, 0, 0)

    g_ref = jax.grad(lambda p: _ce(model, p, x[:16], y[:16]))(params)
    chex.assert_trees_all_close(state[0].last_ref, g_ref, atol=1e-6)
    g = jax.tree.map(lambda a, b: (a - b) / LR, params, new)  # the projected gradient the step took
    dot = sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)))
    assert dot >= -1e-4


def test_reference_gradient_rule_with_nothing_stored_is_bit_identical_to_finetuning():
    ours = _fit(clx.chain(_rules.ref_projection(16, (8, 8, 1)), optax.sgd(LR)), num_tasks=1)
    ref = _fit(clx.chain(optax.sgd(LR)), num_tasks=1)
    chex.assert_trees_all_equal(ours.params, ref.params)


# --- a buffer that inserts the batch ----------------------------------------------------------------------------------


def test_buffer_inserts_every_real_example_once_and_no_padding():
    n = 53  # batch 10: the epoch's last batch has 7 zero-weight padding examples
    r = _fit(clx.chain(_rules.ring_buffer(64, (8, 8, 1)), optax.sgd(LR)), num_tasks=1, n=n, epochs=1)
    buf = r.rule_state[0]
    assert int(buf.count) == n
    stored = np.asarray(buf.x)[:n].reshape(n, -1)
    train = np.asarray(_stream(1, n).task(0).x_train).reshape(n, -1)
    np.testing.assert_array_equal(stored[np.lexsort(stored.T)], train[np.lexsort(train.T)])
    np.testing.assert_array_equal(np.asarray(buf.x)[n:], 0.0)


# --- a move of the params at a task boundary ------------------------------------------------------------------------


def test_boundary_move_of_zero_changes_nothing():
    ours, ref = _fit(clx.chain(_rules.shrink(1.0, 0.0), optax.sgd(LR))), _finetune()
    chex.assert_trees_all_equal(ours.params, ref.params)
    np.testing.assert_array_equal(ours.accuracy_matrix, ref.accuracy_matrix)


def test_boundary_move_is_applied_to_the_params_after_each_task():
    ours = _fit(clx.chain(_rules.shrink(0.5), optax.sgd(LR)), num_tasks=1)
    ref = _fit(clx.chain(optax.sgd(LR)), num_tasks=1)
    chex.assert_trees_all_equal(ours.params, jax.tree.map(lambda p: 0.5 * p, ref.params))
    # ... and the accuracy after the task is measured on the moved params.
    model, _ = _model()
    x, y = (
        _stream(1).test_set(0)
        if hasattr(_stream(1), "test_set")
        else (_stream(1).task(0).x_test, _stream(1).task(0).y_test)
    )
    moved_acc = float(jnp.mean(jnp.argmax(model.apply(ours.params, jnp.asarray(x)), -1) == jnp.asarray(y)))
    assert abs(moved_acc - ours.accuracy_matrix[0, 0]) < 1e-6


# --- a key per step ---------------------------------------------------------------------------------------------------


def _key_recorder():
    """Records the step keys it receives in update and (as batch.key) in its loss term, as uint32 key data."""

    def init(params):
        return (jnp.zeros((2, 2), jnp.uint32), jnp.zeros((2, 2), jnp.uint32), jnp.zeros((), jnp.int32))

    def loss(params, state, batch, apply_fn):
        return 0.0 * jnp.sum(jax.random.key_data(batch.key).astype(jnp.float32))

    def update(updates, state, params=None, *, key, **extra):
        seen, _, n = state
        return updates, (seen.at[n % 2].set(jax.random.key_data(key)), seen, n + 1)

    return clx.ContinualTransformation(
        init, update, lambda s, p, ev: (None, s), loss=loss, needs=frozenset({"key"}), name="key_recorder"
    )


def test_key_need_gives_each_step_and_each_seed_its_own_key_from_the_named_stream():
    model, params = _model()
    x, y = _task0(20)
    ids = jnp.zeros(len(y), jnp.int32)
    rule = clx.chain(_key_recorder(), optax.sgd(0.0))
    steps = clx.train.make_train_steps_fn(model, rule, batch_size=10)(2)  # two steps: batches 0 and 1
    for seed in (0, 1):
        key = jax.random.key(seed)
        p = jax.tree.map(jnp.copy, params)  # the train steps donate the params
        _, state, _ = steps(None, p, rule.init(p), x, y, ids, jax.random.key_data(key), 3, 4, 0)
        seen = np.asarray(state[0][0])
        for i in (0, 1):
            np.testing.assert_array_equal(seen[i], jax.random.key_data(clx.train.step_key(key, 3, 4, i)))
        assert not np.array_equal(seen[0], seen[1])
    # resuming at batch 1 gives batch 1 the same key as the uninterrupted run
    one = clx.train.make_train_steps_fn(model, rule, batch_size=10)(1)
    _, state, _ = one(None, params, rule.init(params), x, y, ids, jax.random.key_data(jax.random.key(1)), 3, 4, 1)
    np.testing.assert_array_equal(state[0][0][0], jax.random.key_data(clx.train.step_key(jax.random.key(1), 3, 4, 1)))
