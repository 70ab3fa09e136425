"""The trainer on its own: its train steps against a hand-written loop, its walk (the
accuracy matrix, the baseline, joint training, the evidence sample), its errors, its
member batching and its named PRNG streams, on tiny permuted-digits streams."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx import data
from clx.train import evidence_key, fit, fit_members, make_epoch_fn, make_eval_fn, make_train_steps_fn, shuffle_key
from clx.train import step_key as step_key_fn

T, N, B, SAMPLES = 3, 30, 10, 12


@functools.cache
def _digits():
    return data.load_source("digits")


def _stream(num_tasks=T, n=N):
    return data.make_stream(_digits(), "permuted", num_tasks, seed=0, train_subset=n)


def _model(seed=0, out=10, use_bias=True):
    return clx.FunctionalModel.from_module(clx.MLP(64, (16,), out, use_bias=use_bias, rngs=nnx.Rngs(seed)))


def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


def _mean_ce(model, params, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x), y))


def _counter(num_tasks):
    """Counts, through the "batch" need, the weight of every example by its task id, and the steps by the
    ``task_id`` extra that ``update`` receives."""

    def init(params):
        return jnp.zeros((num_tasks,), jnp.float32), jnp.zeros((num_tasks,), jnp.int32)

    def update(updates, state, params=None, *, batch, task_id, **extra):
        weights, steps = state
        return updates, (weights.at[batch.task_ids].add(batch.weights), steps.at[task_id].add(1))

    return clx.ContinualTransformation(
        init, update, lambda s, p, ev: (None, s), needs=frozenset({"batch"}), name="counter"
    )


def _evidence_recorder(samples):
    """Keeps the last evidence it was handed: task id, inputs, labels and both Dense layers' representations."""

    def init(params):
        return (
            jnp.full((), -1, jnp.int32),
            jnp.zeros((samples, 8, 8, 1), jnp.float32),
            jnp.zeros((samples,), jnp.int32),
            jnp.zeros((64, samples), jnp.float32),
            jnp.zeros((16, samples), jnp.float32),
        )

    def consolidate(state, params, ev):
        reps = ev.representations
        return None, (ev.task_id, ev.x, ev.y, reps["layers/0/kernel"], reps["layers/1/kernel"])

    return clx.ContinualTransformation(
        init,
        lambda u, s, params=None, **e: (u, s),
        consolidate,
        needs=frozenset({"representations"}),
        name="evidence_recorder",
    )


# --- the train steps -------------------------------------------------------------------------------------------------


def _hand_epoch(grad, params, x, y, order, lr):
    """Plain SGD over ``order`` in batches of B, the last one short (its mean over its real examples only)."""
    total = 0.0
    for i in range(math.ceil(len(order) / B)):
        bi = order[i * B : (i + 1) * B]
        loss, g = grad(params, x[bi], y[bi])
        params = jax.tree.map(lambda p, g: p - lr * g, params, g)
        total += float(loss) * len(bi)
    return params, total


def test_epoch_is_a_hand_written_sgd_loop_over_the_named_shuffle_with_the_last_batch_padded():
    n, lr, task, epoch = 53, 0.5, 2, 3  # 6 batches of 10; the last has 3 real and 7 zero-weight examples
    model, params = _model()
    tr = _stream(1, n).task(0)
    x, y = jnp.asarray(tr.x_train), jnp.asarray(tr.y_train)
    key = jax.random.key(7)
    rule = clx.chain(optax.sgd(lr))
    steps = make_train_steps_fn(model, rule, B)(6)
    ids = jnp.zeros(n, jnp.int32)
    new, _, loss_sum = steps(
        None, _copy(params), rule.init(params), x, y, ids, jax.random.key_data(key), task, epoch, 0
    )

    order = np.asarray(jax.random.permutation(shuffle_key(key, task, epoch), n))
    grad = jax.jit(jax.value_and_grad(lambda p, xb, yb: _mean_ce(model, p, xb, yb)))
    want, want_loss = _hand_epoch(grad, params, x, y, order, lr)
    chex.assert_trees_all_close(new, want, atol=2e-5)
    np.testing.assert_allclose(float(loss_sum), want_loss, rtol=1e-5)
    # the order matters at this learning rate, so the equality above pins the shuffle
    other, _ = _hand_epoch(grad, params, x, y, np.arange(n), lr)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(other))) > 1e-3


def test_online_accuracy_counts_predictions_made_before_each_step():
    n, lr, task, epoch = 53, 0.5, 1, 0
    model, params = _model()
    tr = _stream(1, n).task(0)
    x, y = jnp.asarray(tr.x_train), jnp.asarray(tr.y_train)
    key = jax.random.key(5)
    rule = clx.chain(optax.sgd(lr))
    body = clx.train._train_steps_fn(model, lambda hp: rule, B)
    run = jax.jit(functools.partial(body, num_steps=6))
    ids = jnp.zeros(n, jnp.int32)
    _, _, _, hits = run(None, _copy(params), rule.init(params), x, y, ids, jax.random.key_data(key), task, epoch, 0)

    order = np.asarray(jax.random.permutation(shuffle_key(key, task, epoch), n))
    grad = jax.jit(jax.value_and_grad(lambda p, xb, yb: _mean_ce(model, p, xb, yb)))
    want, p = 0, params
    for i in range(6):
        bi = order[i * B : (i + 1) * B]
        want += int(np.sum(np.argmax(np.asarray(model.apply(p, x[bi])), -1) == np.asarray(y[bi])))
        _, g = grad(p, x[bi], y[bi])
        p = jax.tree.map(lambda a, b: a - lr * b, p, g)
    assert int(hits) == want  # padding examples (7 in the last batch) are not counted
    # an accuracy after the steps would differ: the params learn the examples they are scored on
    after = int(np.sum(np.argmax(np.asarray(model.apply(p, x)), -1) == np.asarray(y)))
    assert after > want


def test_fit_reports_online_accuracy_per_task_and_epoch():
    model, params = _model()
    r = fit(model, params, optax.sgd(0.5), _stream(2, 40), epochs=3, batch_size=B, progress=False)
    assert r.train_accuracy.shape == (2, 3)
    assert np.all((r.train_accuracy >= 0) & (r.train_accuracy <= 1))
    assert np.all(r.train_accuracy[:, -1] > r.train_accuracy[:, 0])  # learning within each task
    np.testing.assert_allclose(r.train_accuracy * 40, np.round(r.train_accuracy * 40), atol=1e-9)  # counts / n


def test_an_epoch_in_two_calls_equals_one_call_and_make_epoch_fn_is_task0_epoch0():
    model, params = _model()
    tr = _stream(1, 33).task(0)
    x, y, ids = jnp.asarray(tr.x_train), jnp.asarray(tr.y_train), jnp.zeros(33, jnp.int32)
    key = jax.random.key(3)
    kd = jax.random.key_data(key)
    rule = clx.chain(optax.adam(0.01))  # a rule state that counts steps
    programs = make_train_steps_fn(model, rule, B)
    whole_p, whole_s, whole_l = programs(4)(None, _copy(params), rule.init(params), x, y, ids, kd, 1, 2, 0)
    p, s, l1 = programs(2)(None, _copy(params), rule.init(params), x, y, ids, kd, 1, 2, 0)
    p, s, l2 = programs(2)(None, p, s, x, y, ids, kd, 1, 2, 2)  # resume at batch 2 (of 4, the last padded)
    chex.assert_trees_all_close((p, s), (whole_p, whole_s), atol=1e-6)
    assert int(s[0][0].count) == 4
    np.testing.assert_allclose(float(l1 + l2), float(whole_l), rtol=1e-6)

    ep_p, ep_s, mean_loss = make_epoch_fn(model, rule, B)(_copy(params), rule.init(params), x, y, ids, key)
    ref_p, _, ref_l = programs(4)(None, _copy(params), rule.init(params), x, y, ids, kd, 0, 0, 0)
    chex.assert_trees_all_close(ep_p, ref_p, atol=1e-6)
    np.testing.assert_allclose(float(mean_loss), float(ref_l) / 33, rtol=1e-6)
    assert not np.allclose(np.asarray(ref_p["layers"][0]["kernel"]), np.asarray(whole_p["layers"][0]["kernel"]))


# --- the walk --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def walk():
    """3 tasks of 30 examples, 2 epochs: fine-tuning with a counter and an evidence recorder in the chain."""
    model, params = _model()
    initial = _copy(params)
    stream = _stream()
    rule = clx.chain(_counter(T), _evidence_recorder(SAMPLES), optax.sgd(0.1))
    r = fit(model, params, rule, stream, epochs=2, batch_size=B, seed=5, evidence_samples=SAMPLES, progress=False)
    return model, params, initial, stream, r


@pytest.fixture(scope="module")
def joint():
    model, params = _model()
    rule = clx.chain(_counter(2), optax.sgd(0.1))
    return fit(
        model,
        params,
        rule,
        _stream(2),
        epochs=1,
        batch_size=B,
        evidence_samples=SAMPLES,
        cumulative=True,
        progress=False,
    )


def test_accuracy_matrix_is_filled_through_the_next_task_and_matches_the_eval_program(walk):
    model, _, initial, stream, r = walk
    acc = r.accuracy_matrix
    assert acc.shape == (T, T) and r.random_baseline.shape == (T,) and r.losses.shape == (T, 2)
    evaluated = np.arange(T)[None, :] <= np.arange(T)[:, None] + 1  # R[t, j] for j <= t + 1
    np.testing.assert_array_equal(np.isfinite(acc), evaluated)
    assert np.all(np.isfinite(r.losses)) and np.all(r.losses > 0) and r.resumed_from is None
    evaluate = make_eval_fn(model)
    for j in range(T):
        x, y = stream.test_set(j)
        x, y = jnp.asarray(x), jnp.asarray(y)
        np.testing.assert_allclose(r.random_baseline[j], float(evaluate(initial, x, y, j, 0)), atol=1e-7)
        np.testing.assert_allclose(acc[T - 1, j], float(evaluate(r.params, x, y, j, T)), atol=1e-7)
    assert np.all(r.losses[:, 1] < r.losses[:, 0])  # each task's second epoch has a lower loss: it trains


def test_each_task_trains_on_its_own_examples_each_epoch(walk):
    weights, steps = walk[-1].rule_state[0]
    np.testing.assert_array_equal(weights, [2 * N] * T)  # padding has weight 0; every example seen once per epoch
    np.testing.assert_array_equal(steps, [2 * math.ceil(N / B)] * T)


def test_cumulative_trains_task_t_on_the_union_of_tasks_0_to_t(joint):
    weights, _ = joint.rule_state[0]
    np.testing.assert_array_equal(weights, [2 * N, N])  # task 0's examples in both tasks' runs, task 1's in one


def test_update_receives_the_trained_task_as_task_id_under_cumulative(joint):
    _, steps = joint.rule_state[0]
    np.testing.assert_array_equal(steps, [3, 6])  # ceil(30 / 10) steps in task 0, ceil(60 / 10) in task 1


def test_evidence_is_the_seeds_named_sample_and_representations_are_its_dense_inputs(walk):
    model, _, _, stream, r = walk
    task_id, xe, ye, rep0, rep1 = r.rule_state[1]
    assert int(task_id) == T - 1
    tr = stream.task(T - 1)
    pick = np.asarray(jax.random.permutation(evidence_key(jax.random.key(5), T - 1), N))[:SAMPLES]
    np.testing.assert_array_equal(xe, tr.x_train[pick])
    np.testing.assert_array_equal(ye, tr.y_train[pick])
    flat = np.asarray(xe).reshape(SAMPLES, -1)
    np.testing.assert_array_equal(rep0, flat.T)
    layer0 = r.params["layers"][0]
    np.testing.assert_allclose(rep1, np.maximum(flat @ layer0["kernel"] + layer0["bias"], 0).T, atol=1e-5)
    reps = clx.train.make_evidence_fn(model)(r.params, jnp.asarray(xe), T - 1)
    np.testing.assert_allclose(reps["layers/1/kernel"], rep1, atol=1e-6)


def test_fit_leaves_the_callers_params_usable(walk):
    params = walk[1]
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))


def test_nan_loss_raises_floating_point_error_naming_the_task():
    def loss(params, state, batch, apply_fn):
        return jnp.where(batch.task_ids[0] == 1, jnp.nan, 0.0)

    poison = clx.ContinualTransformation(
        lambda p: (), lambda u, s, params=None, **e: (u, s), lambda s, p, ev: (None, s), loss=loss, name="poison"
    )
    model, params = _model()
    with pytest.raises(FloatingPointError, match=r"in task 1, epoch 0"):
        fit(model, params, clx.chain(poison, optax.sgd(0.1)), _stream(2, 20), epochs=2, batch_size=B, progress=False)


# --- errors before training ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(epochs=0), "epochs must be an integer >= 1, got 0"),
        (dict(batch_size=0), "batch_size must be an integer >= 1, got 0"),
        (dict(evidence_samples=0), "evidence_samples must be an integer >= 1, got 0"),
    ],
)
def test_bad_fit_options_raise_value_error(kw, match):
    model, params = _model()
    with pytest.raises(ValueError, match=match):
        fit(model, params, optax.sgd(0.1), _stream(1, 10), **{"epochs": 1, "batch_size": B, **kw})


@pytest.mark.parametrize(
    "kw, match", [(dict(member_axis="pmap"), "member_axis must be one of"), (dict(scan_unroll=0), "scan_unroll")]
)
def test_bad_member_options_raise_value_error(kw, match):
    model, params = _model()
    with pytest.raises(ValueError, match=match):
        fit_members(
            model, [params], lambda hp: optax.sgd(0.1), [0.0], _stream(1, 10), seeds=[0], epochs=1, batch_size=B, **kw
        )
    with pytest.raises(ValueError, match="member_axis must be None, 'vmap', 'map' or 'loop'"):
        make_train_steps_fn(model, lambda hp: optax.sgd(0.1), B, member_axis="auto")


def test_model_with_another_output_size_than_the_stream_is_refused():
    model, params = _model(out=5)
    with pytest.raises(ValueError, match="the model has 5 outputs per head but the stream needs 10"):
        fit(model, params, optax.sgd(0.1), _stream(1, 10), epochs=1, batch_size=B, progress=False)


# --- members ---------------------------------------------------------------------------------------------------------

MEMBERS = [(0, 0.1), (1, 0.3)]  # (seed, learning rate)
MEMBER_KW = dict(epochs=1, batch_size=B, evidence_samples=SAMPLES, progress=False)


@pytest.fixture(scope="module")
def separate_runs():
    runs = []
    for seed, lr in MEMBERS:
        model, params = _model(seed)
        runs.append(fit(model, params, clx.chain(optax.sgd(lr)), _stream(2), seed=seed, **MEMBER_KW))
    return runs


@pytest.mark.parametrize("member_axis", ["map", "vmap"])
def test_fit_members_equals_separate_fits(separate_runs, member_axis):
    built = [_model(seed) for seed, _ in MEMBERS]
    res = fit_members(
        built[0][0],
        [p for _, p in built],
        lambda hp: clx.chain(optax.sgd(hp)),
        [lr for _, lr in MEMBERS],
        _stream(2),
        seeds=[s for s, _ in MEMBERS],
        member_axis=member_axis,
        **MEMBER_KW,
    )
    assert res.accuracy_matrix.shape == (2, 2, 2) and res.losses.shape == (2, 2, 1)
    for m, one in enumerate(separate_runs):
        np.testing.assert_allclose(res.accuracy_matrix[m], one.accuracy_matrix, atol=1e-6)
        np.testing.assert_allclose(res.random_baseline[m], one.random_baseline, atol=1e-6)
        np.testing.assert_allclose(res.losses[m], one.losses, rtol=1e-5)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[m], res.params), one.params, atol=1e-5)
    assert not np.allclose(res.losses[0], res.losses[1])  # the members really differ


# --- named PRNG streams ----------------------------------------------------------------------------------------------


def test_named_prng_streams_never_collide():
    key = jax.random.key(0)
    draws = {}
    for t in range(3):
        for e in (0, 1, 2, 999, 1000, 1001):
            draws[("shuffle", t, e)] = shuffle_key(key, t, e)
            for s in (0, 1, 1000):
                draws[("step", t, e, s)] = step_key_fn(key, t, e, s)
        draws[("evidence", t)] = evidence_key(key, t)
    draws[("shuffle seed 1", 0, 0)] = shuffle_key(jax.random.key(1), 0, 0)
    data_ = {k: tuple(np.asarray(jax.random.key_data(v)).tolist()) for k, v in draws.items()}
    assert len(set(data_.values())) == len(data_)
    # the old derivation fold_in(key, t * 1000 + e) collided: task 0 epoch 1000 was task 1 epoch 0
    old = lambda t, e: np.asarray(jax.random.key_data(jax.random.fold_in(key, t * 1000 + e)))  # noqa: E731
    np.testing.assert_array_equal(old(0, 1000), old(1, 0))
    assert data_[("shuffle", 0, 1000)] != data_[("shuffle", 1, 0)]
    # traced task / epoch / step (as inside the train steps) give the same keys as Python ints
    traced = jax.jit(lambda t, e, s: jax.random.key_data(step_key_fn(key, t, e, s)))(
        jnp.int32(2), jnp.int32(1000), jnp.int32(1)
    )
    np.testing.assert_array_equal(traced, jax.random.key_data(draws[("step", 2, 1000, 1)]))


# --- long streams: evaluate="current" and per-task metrics ----------------------------------------------------------


def _norm_metrics(params, x, y, task_id):
    """A per-task metric with a known value: the weight norm, and the mean label of the evidence sample."""
    del task_id
    return {"weight_norm": clx.metrics.weight_norm(params), "mean_label": jnp.mean(y.astype(jnp.float32))}


def test_evaluate_current_scores_only_tasks_t_and_t_plus_1_and_trains_the_same():
    model, p0 = _model()
    kw = dict(epochs=1, batch_size=B, evidence_samples=SAMPLES, progress=False)
    full = fit(model, _copy(p0), optax.sgd(0.1), _stream(), **kw)
    cur = fit(model, _copy(p0), optax.sgd(0.1), _stream(), evaluate="current", **kw)
    chex.assert_trees_all_equal(cur.params, full.params)
    for i in range(T):
        for j in range(T):
            if j in (i, i + 1):
                assert cur.accuracy_matrix[i, j] == full.accuracy_matrix[i, j]
            else:
                assert np.isnan(cur.accuracy_matrix[i, j])
    np.testing.assert_array_equal(cur.random_baseline[1:], full.random_baseline[1:])
    assert clx.metrics.learning_accuracy(cur.accuracy_matrix) == clx.metrics.learning_accuracy(full.accuracy_matrix)
    with pytest.raises(ValueError, match="R\\[2, 0\\] is NaN"):
        clx.metrics.acc(cur.accuracy_matrix)


def test_task_metrics_are_recorded_per_task_on_the_evidence_sample():
    model, p0 = _model()
    kw = dict(epochs=1, batch_size=B, evidence_samples=SAMPLES, progress=False)
    r = fit(model, _copy(p0), optax.sgd(0.1), _stream(), task_metrics=_norm_metrics, **kw)
    assert sorted(r.task_metrics) == ["mean_label", "weight_norm"]
    assert r.task_metrics["weight_norm"].shape == (T,)
    # after the last task (finetuning moves nothing at consolidate) the recorded norm is the final params'
    np.testing.assert_allclose(r.task_metrics["weight_norm"][-1], float(clx.metrics.weight_norm(r.params)), rtol=1e-6)
    assert len(set(r.task_metrics["weight_norm"].tolist())) == T  # the params moved between tasks
    # with members: (M, T), member 0 equal to the plain run (same seed, same params)
    rm = fit_members(
        model, [_copy(p0), _model(1)[1]], lambda hp: optax.sgd(0.1), [0.0, 0.0], _stream(), seeds=[0, 1],
        task_metrics=_norm_metrics, **kw,
    )  # fmt: skip
    assert rm.task_metrics["weight_norm"].shape == (2, T)
    np.testing.assert_allclose(rm.task_metrics["weight_norm"][0], r.task_metrics["weight_norm"], rtol=1e-5)
    np.testing.assert_allclose(rm.task_metrics["mean_label"][0], r.task_metrics["mean_label"], rtol=1e-6)


def test_long_stream_options_are_checked_before_training():
    model, p0 = _model()
    kw = dict(epochs=1, batch_size=B, progress=False)
    with pytest.raises(ValueError, match="evaluate must be one of"):
        fit(model, p0, optax.sgd(0.1), _stream(), evaluate="all", **kw)
    with pytest.raises(TypeError, match="task_metrics must be a function"):
        fit(model, p0, optax.sgd(0.1), _stream(), task_metrics={"a": 1}, **kw)
    with pytest.raises(ValueError, match="dict of scalars"):
        fit(model, p0, optax.sgd(0.1), _stream(), task_metrics=lambda p, x, y, t: {"x": x}, **kw)


# --- class-IL over the classes seen so far ---------------------------------------------------------------------------


@pytest.mark.parametrize("task", [0, 1])
def test_seen_classes_only_gives_the_outputs_of_unseen_classes_no_gradient(task):
    """Plain SGD on task ``task`` of a 5-task class-IL stream (2 classes a task): with the outputs of the classes
    not seen yet masked, only the head columns of classes 0 .. 2 (task + 1) - 1 move; unmasked, all ten do."""
    stream = data.make_stream(_digits(), "split_class_il", 5, seed=0, train_subset=40)
    model, params = _model()
    tr = stream.task(task)
    x, y = jnp.asarray(tr.x_train), jnp.asarray(tr.y_train)
    rule = clx.chain(optax.sgd(0.5))
    key_data = jax.random.key_data(jax.random.key(0))
    for active_k, moved in ((2, list(range(2 * (task + 1)))), (0, list(range(10)))):
        body = clx.train._train_steps_fn(model, lambda hp: rule, B, active_k=active_k)
        run = jax.jit(functools.partial(body, num_steps=math.ceil(len(y) / B)))
        ids = jnp.full(len(y), task, jnp.int32)
        new, *_ = run(None, _copy(params), rule.init(params), x, y, ids, key_data, task, 0, 0)
        head, head0 = new["layers"][1], params["layers"][1]
        changed = [
            c
            for c in range(10)
            if float(jnp.max(jnp.abs(head["kernel"][:, c] - head0["kernel"][:, c]))) > 0
            or float(jnp.abs(head["bias"][c] - head0["bias"][c])) > 0
        ]
        assert changed == moved, (active_k, changed)


@pytest.mark.parametrize("task", [0, 1])
def test_seen_classes_only_on_permuted_class_il_trains_only_the_outputs_seen(task):
    """van de Ven's Permuted-MNIST class-IL: task t owns outputs 10t .. 10t+9 of one head of 20; with the loss over
    the classes seen so far (k from the stream: 10), plain SGD on task ``task`` moves outputs 0 .. 10 (task + 1) - 1
    only, and the labels it trains on are task ``task``'s (10 task .. 10 task + 9)."""
    stream = data.make_stream(_digits(), "permuted_class_il", 2, seed=0, train_subset=40)
    active_k = clx.train.check_seen_classes_only(True, stream)
    assert active_k == 10
    model, params = _model(out=20)
    tr = stream.task(task)
    x, y = jnp.asarray(tr.x_train), jnp.asarray(tr.y_train)
    assert set(np.unique(tr.y_train)) <= set(range(10 * task, 10 * task + 10))
    rule = clx.chain(optax.sgd(0.5))
    body = clx.train._train_steps_fn(model, lambda hp: rule, B, active_k=active_k)
    run = jax.jit(functools.partial(body, num_steps=math.ceil(len(y) / B)))
    ids = jnp.full(len(y), task, jnp.int32)
    key_data = jax.random.key_data(jax.random.key(0))
    new, *_ = run(None, _copy(params), rule.init(params), x, y, ids, key_data, task, 0, 0)
    head, head0 = new["layers"][1]["kernel"], params["layers"][1]["kernel"]
    moved = [c for c in range(20) if float(jnp.max(jnp.abs(head[:, c] - head0[:, c]))) > 0]
    assert moved == list(range(10 * (task + 1))), moved


def test_seen_classes_only_is_refused_outside_class_il_before_training():
    model, params = _model()
    with pytest.raises(ValueError, match="seen_classes_only.*class-IL stream.*'domain_il'"):
        fit(model, params, optax.sgd(0.1), _stream(), epochs=1, batch_size=B, progress=False, seen_classes_only=True)


# --- the test-set cache ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("evaluate", ["seen", "current"])
def test_test_set_cache_is_bounded_and_changes_no_result(monkeypatch, evaluate):
    """With the cache budget cut to about two digits test sets, the placed test sets kept never exceed it (older
    ones are dropped and rebuilt on demand), and the accuracy matrix and baseline equal those of a run with every
    set cached, bit for bit."""
    stream = _stream(num_tasks=5)
    model, params = _model()

    def run():
        return fit(
            model, _copy(params), optax.sgd(0.1), stream, epochs=1, batch_size=B, progress=False, evaluate=evaluate
        )

    full = run()
    one = sum(a.nbytes for a in stream.test_set(0))
    budget = int(2.5 * one)
    monkeypatch.setattr(clx.train, "_TEST_CACHE_BYTES", budget)
    kept = []
    test = clx.train._TaskData.test

    def spy(self, t):
        out = test(self, t)
        kept.append(sum(a.nbytes for pair in self._tests.values() for a in pair))
        return out

    monkeypatch.setattr(clx.train._TaskData, "test", spy)
    small = run()
    assert max(kept) <= budget and max(kept) >= 2 * one
    np.testing.assert_array_equal(small.accuracy_matrix, full.accuracy_matrix)
    np.testing.assert_array_equal(small.random_baseline, full.random_baseline)


def test_fit_runs_lapack_single_threaded_on_cpu_and_restores_the_setting():
    """Inside a run on a CPU backend scipy's OpenBLAS (jaxlib's LAPACK) has one thread; after it, the caller's."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if jax.default_backend() != "cpu":
        pytest.skip("the limit applies on a CPU backend only")
    import scipy.linalg  # noqa: F401 -- scipy's OpenBLAS (the one jaxlib's LAPACK calls) loaded before the limits

    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
        seen = []
        model, params = _model()
        fit(
            model,
            params,
            optax.sgd(0.1),
            _stream(2),
            epochs=1,
            batch_size=B,
            progress=False,
            on_task_end=lambda t, info: seen.append(
                [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
            ),
        )
        after = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
    assert before and all(n == 2 for n in before)
    assert seen and all(n == 1 for ns in seen for n in ns)
    assert after == before
