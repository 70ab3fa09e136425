"""The regularization family (EWC, online EWC, SI, MAS, L2, LwF): each quantity against a
hand computation, the penalties against jax.grad of the explicit losses, weight 0 against
fine-tuning bit for bit through the trainer's own train steps, and bad input."""

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
from clx.regularization import diagonal_fisher, ewc, l2, lwf, mas, mas_importance, online_ewc, si

LR, BATCH = 0.1, 10


# --- a tiny linear softmax model, and the quantities by hand (float64 NumPy) ------------------------------------------


def linear_apply(params, x, task_id=None):
    del task_id
    return x @ params["w"] + params["b"]


def linear_params(seed=0, d=4, k=3):
    rng = np.random.default_rng(seed)  # NumPy draws: no random-number program to compile per shape
    return {
        "w": jnp.asarray(rng.normal(size=(d, k)), jnp.float32),
        "b": jnp.asarray(0.5 * rng.normal(size=k), jnp.float32),
    }


def linear_data(seed=1, n=7, d=4, k=3):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(n, d)), jnp.float32), jnp.asarray(rng.integers(0, k, n), jnp.int32)


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def hand_fisher(params, x, weights_of_example):
    """1/n sum_i sum_c weights_of_example(i, p_i)[c] (d log p_c(x_i) / d theta)^2 for the linear model."""
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    x = np.asarray(x, np.float64)
    fw, fb = np.zeros_like(w), np.zeros_like(b)
    for i, xi in enumerate(x):
        p = _softmax(xi @ w + b)
        for c, weight in enumerate(weights_of_example(i, p)):
            dz = np.eye(len(b))[c] - p  # d log p_c / d z
            fw += weight * np.outer(xi, dz) ** 2
            fb += weight * dz**2
    return {"w": fw / len(x), "b": fb / len(x)}


def _close(got, want, rtol=1e-5, atol=1e-7):
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=rtol, atol=atol, err_msg=k)


# --- the Fisher ------------------------------------------------------------------------------------------------------


def test_true_empirical_and_predicted_fisher_equal_the_per_example_hand_computation():
    params, (x, y) = linear_params(), linear_data()
    t = jnp.int32(0)
    _close(diagonal_fisher(linear_apply, params, x, y, t), hand_fisher(params, x, lambda i, p: p))
    onehot = lambda c: np.eye(3)[c]  # noqa: E731
    _close(
        diagonal_fisher(linear_apply, params, x, y, t, variant="empirical"),
        hand_fisher(params, x, lambda i, p: onehot(int(y[i]))),
    )
    _close(
        diagonal_fisher(linear_apply, params, x, y, t, variant="predicted"),
        hand_fisher(params, x, lambda i, p: onehot(int(np.argmax(p)))),
    )


def test_sampled_fisher_uses_the_documented_labels_and_averages_to_the_true_fisher():
    params, (x, y) = linear_params(), linear_data()
    seed, t = 3, 2
    base = jax.random.fold_in(jax.random.key(seed), t)
    logp = jax.nn.log_softmax(linear_apply(params, x), -1)
    labels = [int(jax.random.categorical(jax.random.fold_in(base, i), logp[i])) for i in range(len(x))]
    got = diagonal_fisher(linear_apply, params, x, y, jnp.int32(t), variant="sample", seed=seed)
    _close(got, hand_fisher(params, x, lambda i, p: np.eye(3)[labels[i]]))
    # an unbiased estimate of the true Fisher: its mean over 4000 seeds (vmapped)
    many = jax.vmap(lambda s: diagonal_fisher(linear_apply, params, x, y, jnp.int32(t), variant="sample", seed=s))(
        jnp.arange(4000)
    )
    true = hand_fisher(params, x, lambda i, p: p)
    for k in true:
        np.testing.assert_allclose(np.asarray(many[k]).mean(0), true[k], rtol=0.06, atol=1e-3, err_msg=k)


@pytest.mark.parametrize("variant", ["true", "empirical", "sample"])
def test_fisher_does_not_depend_on_the_chunk_size_or_on_repeating_the_sample(variant):
    params, (x, y) = linear_params(), linear_data(n=11)
    f = lambda x, y, chunk: diagonal_fisher(linear_apply, params, x, y, jnp.int32(0), variant=variant, chunk_size=chunk)  # noqa: E731
    ref = f(x, y, None)  # one chunk of 11
    chex.assert_trees_all_close(f(x, y, 3), ref, rtol=1e-6, atol=1e-8)  # 4 chunks, the last one padded
    if variant != "sample":  # a mean of per-example squares: the same on the sample repeated 3 times
        # (the square of a batch-mean gradient would shrink as the batch grows)
        chex.assert_trees_all_close(f(jnp.tile(x, (3, 1)), jnp.tile(y, 3), 5), ref, rtol=1e-5, atol=1e-8)


def test_fisher_over_the_seen_classes_is_the_softmax_over_them():
    params, (x, y) = linear_params(k=4), linear_data(k=2)
    got = diagonal_fisher(linear_apply, params, x, y, jnp.int32(0), num_active=2)
    # the softmax over the first 2 of 4 classes: the other two logits get no gradient
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    want_w, want_b = np.zeros_like(w), np.zeros_like(b)
    for xi in np.asarray(x, np.float64):
        p = _softmax((xi @ w + b)[:2])
        for c in range(2):
            dz = np.concatenate([np.eye(2)[c] - p, [0.0, 0.0]])
            want_w += p[c] * np.outer(xi, dz) ** 2
            want_b += p[c] * dz**2
    _close(got, {"w": want_w / len(x), "b": want_b / len(x)})


def _tapped(kind):
    """A small TappedModel and its params: an MLP with biases and a shared head, one with 3 heads (clx.MultiHead,
    untapped: the per-example way), or a LeNet (convs over many positions: the per-example way)."""
    rngs = nnx.Rngs(0)
    if kind == "lenet":
        module = clx.models.LeNet((16, 16, 1), 5, channels=(3, 4), hidden=6, use_bias=True, rngs=rngs)
    else:
        module = clx.MLP(64, (16, 12), 5, num_heads=3 if kind == "heads" else 1, use_bias=True, rngs=rngs)
    return clx.FunctionalModel.from_module(module)


@pytest.mark.parametrize("kind", ["mlp", "heads", "lenet"])
@pytest.mark.parametrize("variant", ["true", "empirical", "sample", "predicted"])
def test_factored_fisher_equals_the_per_example_fisher(kind, variant):
    """Given apply_with_taps, the Dense layers' Fisher is (X * X)^T (Delta * Delta) with no per-example gradient
    formed: the same numbers as the per-example way, every variant, over the seen classes too, for every leaf (the
    heads and the convs go the per-example way beside it), whatever the chunk size."""
    from clx.regularization._common import factored_layers

    model, params = _tapped(kind)
    rng = np.random.default_rng(0)
    side = 16 if kind == "lenet" else 8
    x = jnp.asarray(rng.normal(size=(23, side, side, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, 23), jnp.int32)
    layers = factored_layers(model.apply_with_taps, params, x, jnp.int32(1))
    factored = {"mlp": 3, "heads": 2, "lenet": 2}[kind]  # LeNet: fc and head have one row per example
    assert len(layers) == factored and all(bias is not None for _, bias in layers), layers
    for active in (None, 3):
        want = diagonal_fisher(model.apply, params, x, y, jnp.int32(1), variant=variant, num_active=active, seed=4)
        for chunk in (None, 5):
            got = diagonal_fisher(
                model.apply,
                params,
                x,
                y,
                jnp.int32(1),
                variant=variant,
                num_active=active,
                seed=4,
                chunk_size=chunk,
                apply_with_taps=model.apply_with_taps,
            )
            chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-9)


class _SharedRows(nnx.Module):
    """A head on the flattened input plus a Dense layer on two learned rows that do not scale with the batch (its
    per-example gradients do not factor, though it has 2 input rows for 2 examples)."""

    def __init__(self, rngs):
        self.rows = nnx.Param(jnp.ones((2, 4)))
        self.shared = nnx.Linear(4, 5, rngs=rngs)
        self.head = nnx.Linear(64, 5, rngs=rngs)

    def __call__(self, x):
        return self.head(x.reshape(x.shape[0], -1)) + jnp.sum(self.shared(self.rows[...]), axis=0)


def test_a_layer_whose_rows_do_not_scale_with_the_batch_is_not_factored():
    from clx.regularization._common import factored_layers

    model, params = clx.FunctionalModel.from_module(_SharedRows(nnx.Rngs(0)))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(9, 8, 8, 1)), jnp.float32)
    y = jnp.zeros(9, jnp.int32)
    assert factored_layers(model.apply_with_taps, params, x, jnp.int32(0)) == (("head/kernel", "head/bias"),)
    want = diagonal_fisher(model.apply, params, x, y, jnp.int32(0))
    got = diagonal_fisher(model.apply, params, x, y, jnp.int32(0), apply_with_taps=model.apply_with_taps)
    chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "heads", "lenet"])
def test_factored_mas_importance_equals_the_per_example_importance(kind):
    """MAS's |X|^T |Delta| for the Dense layers (the rest per-example): the per-example numbers, any chunk size."""
    model, params = _tapped(kind)
    side = 16 if kind == "lenet" else 8
    x = jnp.asarray(np.random.default_rng(1).normal(size=(19, side, side, 1)), jnp.float32)
    want = mas_importance(model.apply, params, x, jnp.int32(2))
    for chunk in (None, 4):
        got = mas_importance(
            model.apply, params, x, jnp.int32(2), chunk_size=chunk, apply_with_taps=model.apply_with_taps
        )
        chex.assert_trees_all_close(got, want, rtol=2e-5, atol=1e-9)


def test_the_trainer_hands_the_rule_the_models_taps():
    """fit's evidence carries the model's apply_with_taps (EWC's Fisher takes the factored way); a model without
    one gets None."""
    seen = []

    def consolidate(state, params, evidence):
        seen.append(evidence.apply_with_taps)
        return None, state

    rule = clx.ContinualTransformation(optax.sgd(0.1).init, optax.sgd(0.1).update, consolidate, name="probe")
    stream = data.make_stream(data.load_source("digits"), "permuted", 2, seed=0, train_subset=20)
    model, params = clx.FunctionalModel.from_module(clx.MLP(64, (8,), 10, rngs=nnx.Rngs(0)))
    clx.fit(model, params, rule, stream, epochs=1, batch_size=BATCH, progress=False)
    assert seen and all(f == model.apply_with_taps for f in seen)


# --- EWC, online EWC -------------------------------------------------------------------------------------------------


def _evidence(x, y, t, apply_fn=linear_apply):
    return clx.Evidence(jnp.int32(t), x, y, {}, apply_fn)


def _tasks(num=3):
    """(params at the end of task t, its evidence x, y) for three tasks."""
    return [(linear_params(10 + t), *linear_data(20 + t, n=9)) for t in range(num)]


def test_offline_ewc_gradient_equals_the_sum_of_per_task_penalty_gradients_after_three_tasks():
    lam = 7.0
    rule = ewc(lam)
    state = rule.init(linear_params(0))
    fishers = []
    for t, (theta, x, y) in enumerate(_tasks()):
        moves, state = jax.jit(rule.consolidate)(state, theta, _evidence(x, y, t))
        assert moves is None
        fishers.append((diagonal_fisher(linear_apply, theta, x, y, jnp.int32(t)), theta))
    assert int(state.num_tasks) == 3
    theta = linear_params(99)

    def penalty(p):
        return sum(
            lam / 2 * sum(jnp.sum(f[k] * (p[k] - a[k]) ** 2) for k in p)
            for f, a in fishers  # one per old task
        )

    zeros = jax.tree.map(jnp.zeros_like, theta)
    got, _ = jax.jit(rule.update)(zeros, state, theta)
    chex.assert_trees_all_close(got, jax.grad(penalty)(theta), rtol=1e-5, atol=1e-6)
    # and it is added to the incoming gradient
    ones = jax.tree.map(jnp.ones_like, theta)
    chex.assert_trees_all_close(rule.update(ones, state, theta)[0], jax.tree.map(lambda g: g + 1, got), rtol=1e-6)


def test_online_ewc_decays_the_running_fisher_and_pulls_to_the_latest_params():
    lam, gamma = 3.0, 0.7
    rule = online_ewc(lam, gamma, fisher="empirical")
    state = rule.init(linear_params(0))
    fs = []
    for t, (theta, x, y) in enumerate(_tasks()):
        _, state = rule.consolidate(state, theta, _evidence(x, y, t))
        fs.append(diagonal_fisher(linear_apply, theta, x, y, jnp.int32(t), variant="empirical"))
    latest = _tasks()[-1][0]
    running = jax.tree.map(lambda a, b, c: gamma**2 * a + gamma * b + c, *fs)
    chex.assert_trees_all_close(state.fisher, running, rtol=1e-6)
    theta = linear_params(99)
    zeros = jax.tree.map(jnp.zeros_like, theta)
    want = jax.tree.map(lambda f, p, a: lam * gamma * f * (p - a), running, theta, latest)
    chex.assert_trees_all_close(rule.update(zeros, state, theta)[0], want, rtol=1e-5, atol=1e-6)


# --- SI --------------------------------------------------------------------------------------------------------------


def test_si_importance_on_a_quadratic_trained_by_sgd_is_the_analytic_path_integral():
    h = jnp.array([0.5, 1.0, 2.0, 3.0, 0.1])
    target = jnp.array([1.0, -2.0, 0.5, 0.0, 3.0])
    start = jnp.array([0.0, 0.0, 0.0, 1.0, 0.0])
    lr, steps, xi = 0.1, 25, 0.1
    rule = clx.chain(si(1.0, xi), optax.sgd(lr))
    params = {"w": start}
    state = rule.init(params)
    update = jax.jit(lambda g, s, p: rule.update(g, s, p, task_id=jnp.int32(0)))
    for _ in range(steps):
        grads = {"w": h * (params["w"] - target)}  # L = 1/2 sum h (w - target)^2
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
    _, state = rule.consolidate(state, params, None)
    # SGD: w_k - target = r^k e, r = 1 - lr h; omega = sum_k -g_k (w_{k+1} - w_k) = sum_k lr g_k^2
    e, r = np.asarray(start - target, np.float64), 1.0 - lr * np.asarray(h, np.float64)
    hh = np.asarray(h, np.float64)
    omega = lr * hh**2 * e**2 * (1 - r ** (2 * steps)) / (1 - r**2)
    delta = (r**steps - 1) * e
    got = np.asarray(state[0].importance["w"])
    np.testing.assert_allclose(got, omega / (delta**2 + xi), rtol=1e-4)
    assert np.all(got[np.abs(e) > 0] > 0)
    np.testing.assert_array_equal(state[0].omega["w"], 0.0)  # reset for the next task
    np.testing.assert_array_equal(state[0].anchor["w"], params["w"])


def test_si_integrates_the_actual_parameter_change_of_the_optimizer():
    """With Adam the change is not -lr g: omega must follow theta_{k+1} - theta_k, last step included."""
    rule = clx.chain(si(0.5), optax.adam(0.05))
    params = {"w": jnp.array([0.3, -1.0, 2.0])}
    state = rule.init(params)
    want = np.zeros(3)
    for k in range(6):
        g = {"w": jnp.array([1.0, -0.5, 0.2]) * (k + 1) + params["w"]}
        updates, state = rule.update(g, state, params, task_id=jnp.int32(0))
        new = optax.apply_updates(params, updates)
        want += -np.asarray(g["w"], np.float64) * np.asarray(new["w"] - params["w"], np.float64)
        params = new
    moved = np.asarray(params["w"] - jnp.array([0.3, -1.0, 2.0]), np.float64)
    _, state = rule.consolidate(state, params, None)
    np.testing.assert_allclose(state[0].importance["w"], want / (moved**2 + 0.1), rtol=1e-4)


def test_si_total_gradient_option_integrates_the_gradient_with_the_penalty():
    params = {"w": jnp.array([1.0, 2.0])}
    grads = {"w": jnp.array([0.5, -0.5])}
    for total in (False, True):
        rule = si(2.0, total_gradient=total)
        state = rule.init(params)
        state = state._replace(importance={"w": jnp.array([1.0, 3.0])}, anchor={"w": jnp.array([0.0, 0.0])})
        out, new = rule.update(grads, state, params)
        penalised = grads["w"] + 2 * 2.0 * jnp.array([1.0, 3.0]) * params["w"]
        np.testing.assert_allclose(out["w"], penalised, rtol=1e-6)
        np.testing.assert_allclose(new.prev_grad["w"], penalised if total else grads["w"], rtol=1e-6)


# --- MAS -------------------------------------------------------------------------------------------------------------


def test_mas_importance_is_the_mean_absolute_per_example_gradient_of_the_squared_output_norm():
    params, (x, _) = linear_params(), linear_data()
    w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
    want_w, want_b = np.zeros_like(w), np.zeros_like(b)
    for xi in np.asarray(x, np.float64):
        f = xi @ w + b  # d ||f||^2 / dW = 2 x f^T, / db = 2 f
        want_w += np.abs(2 * np.outer(xi, f))
        want_b += np.abs(2 * f)
    want = {"w": want_w / len(x), "b": want_b / len(x)}
    for chunk in (None, 2):
        _close(mas_importance(linear_apply, params, x, jnp.int32(0), chunk_size=chunk), want)
    # summed over tasks (the authors' accumulation), the penalty gradient is 2 lam Omega (theta - theta*)
    rule = mas(0.5)
    state = rule.init(params)
    tasks = _tasks(2)
    for t, (theta, xt, _) in enumerate(tasks):
        _, state = rule.consolidate(state, theta, _evidence(xt, None, t))
    omega = jax.tree.map(
        jnp.add, *[mas_importance(linear_apply, th, xt, jnp.int32(t)) for t, (th, xt, _) in enumerate(tasks)]
    )
    chex.assert_trees_all_close(state.importance, omega, rtol=1e-6)
    theta = linear_params(99)
    zeros = jax.tree.map(jnp.zeros_like, theta)
    want = jax.tree.map(lambda o, p, a: 2 * 0.5 * o * (p - a), omega, theta, tasks[-1][0])
    chex.assert_trees_all_close(rule.update(zeros, state, theta)[0], want, rtol=1e-5, atol=1e-6)


# --- the pull back to the anchor ------------------------------------------------------------------------------------


PULLING = {
    "ewc": lambda: ewc(50.0),
    "online_ewc": lambda: online_ewc(50.0, 0.9),
    "mas": lambda: mas(5.0),
    "l2": lambda: l2(5.0),
    "si": lambda: si(5.0),
}


@pytest.mark.parametrize("name", sorted(PULLING))
def test_penalty_gradient_pulls_the_params_back_to_the_anchor(name):
    rule = clx.chain(PULLING[name](), optax.sgd(0.01))
    params, (x, y) = linear_params(), linear_data(n=20)
    state = rule.init(params)
    ids = jnp.int32(0)
    for _ in range(10):  # a little full-batch SGD on task 0 (SI's path integral needs a path)
        g = jax.grad(lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(linear_apply(p, x), y)))(params)
        updates, state = rule.update(g, state, params, task_id=ids)
        params = optax.apply_updates(params, updates)
    _, state = rule.consolidate(state, params, _evidence(x, y, 0))
    anchor = params
    away = jax.tree.map(lambda a, d: a + 0.3 * d, anchor, linear_params(5))
    zeros = jax.tree.map(jnp.zeros_like, away)
    updates, _ = rule.update(zeros, state, away, task_id=jnp.int32(1))
    after = optax.apply_updates(away, updates)
    dist = lambda p: math.sqrt(sum(float(jnp.sum((p[k] - anchor[k]) ** 2)) for k in p))  # noqa: E731
    assert dist(after) < dist(away) - 1e-6


def test_l2_has_no_penalty_on_the_first_task():
    params = linear_params()
    rule = l2(10.0)
    grads = jax.tree.map(jnp.ones_like, params)
    away = jax.tree.map(lambda p: p + 1.0, params)
    chex.assert_trees_all_equal(rule.update(grads, rule.init(params), away)[0], grads)


# --- LwF -------------------------------------------------------------------------------------------------------------


def _kd(logits, target, temp, n_cur=None, n_tgt=None):
    """-sum_c q_c log p_c per example, NumPy float64, with the first n classes kept."""
    logits, target = np.asarray(logits, np.float64), np.asarray(target, np.float64)
    out = []
    for z, zo in zip(logits, target):
        nc = len(z) if n_cur is None else n_cur
        nt = len(z) if n_tgt is None else n_tgt
        log_p = np.log(_softmax(z[:nc] / temp))
        q = np.zeros(nc)
        q[:nt] = _softmax(zo[:nt] / temp)
        out.append(-np.sum(q * log_p))
    return np.array(out)


def _batch(x, y, logits, t=0):
    return clx.Batch(x, y, jnp.full(len(y), t, jnp.int32), jnp.ones(len(y), jnp.float32), logits)


def test_lwf_shared_head_distils_the_old_logits_and_is_zero_on_the_first_task():
    params, (x, y) = linear_params(k=6), linear_data(k=6)
    old = linear_params(7, k=6)
    temp = 2.0
    rule = lwf(0.5, temp)
    state = rule.init(params)
    batch = _batch(x, y, linear_apply(params, x))
    assert float(rule.loss(params, state, batch, linear_apply)) == 0.0
    for t in (1, 2):
        state = rule.init(params)._replace(old_params=old, num_tasks=jnp.int32(t))
        got = float(rule.loss(params, state, batch, linear_apply))
        want = 0.5 * t * temp**2 * _kd(batch.logits, linear_apply(old, x), temp).mean()
        np.testing.assert_allclose(got, want, rtol=1e-5)
    # class-IL, 2 classes per task, at task 2: targets over 4 old classes, current softmax over 6 seen ones; class mean
    rule = lwf(1.0, temp, classes_per_task=2, class_mean=True)
    state = rule.init(params)._replace(old_params=old, num_tasks=jnp.int32(2))
    got = float(rule.loss(params, state, batch, linear_apply))
    want = 2 * temp**2 * _kd(batch.logits, linear_apply(old, x), temp, 6, 4).mean() / 6
    np.testing.assert_allclose(got, want, rtol=1e-5)
    rule = lwf(1.0, temp, classes_per_task=3, weighting="constant", t_squared=False)
    state = rule.init(params)._replace(old_params=old, num_tasks=jnp.int32(1))
    got = float(rule.loss(params, state, batch, linear_apply))
    np.testing.assert_allclose(got, _kd(batch.logits, linear_apply(old, x), temp, 6, 3).mean(), rtol=1e-5)


def test_lwf_distillation_gradient_is_zero_at_the_old_params():
    params, (x, y) = linear_params(k=3), linear_data()
    rule = lwf(1.0, 2.0)
    state = rule.init(params)._replace(num_tasks=jnp.int32(1))  # old params = params
    g = jax.grad(lambda p: rule.loss(p, state, _batch(x, y, linear_apply(p, x)), linear_apply))(params)
    chex.assert_trees_all_close(g, jax.tree.map(jnp.zeros_like, params), atol=1e-6)
    moved = jax.tree.map(lambda p, d: p + 0.3 * d, params, linear_params(5, k=3))
    g = jax.grad(lambda p: rule.loss(p, state, _batch(x, y, linear_apply(p, x)), linear_apply))(moved)
    assert max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g)) > 1e-3


def test_lwf_multi_head_distils_every_old_head():
    model, params = clx.FunctionalModel.from_module(clx.MLP(5, (8,), 2, num_heads=3, rngs=nnx.Rngs(0)))
    _, old = clx.FunctionalModel.from_module(clx.MLP(5, (8,), 2, num_heads=3, rngs=nnx.Rngs(1)))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(6, 5)), jnp.float32)
    y = jnp.zeros(6, jnp.int32)
    rule = lwf(1.0, 2.0, num_tasks=3)
    state = rule.init(params)._replace(old_params=old, num_tasks=jnp.int32(2))
    batch = _batch(x, y, model.apply(params, x, 2), t=2)
    got = float(rule.loss(params, state, batch, model.apply))
    want = sum(4.0 * _kd(model.apply(params, x, j), model.apply(old, x, j), 2.0).mean() for j in (0, 1))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# --- weight 0 is fine-tuning, bit for bit, through the trainer's train steps ----------------------------------------


def _stream(kind):
    return data.make_stream(data.load_source("digits"), kind, 2, seed=0, train_subset=40)


@functools.lru_cache(maxsize=None)
def _model(heads):
    """An MLP 64-16 with one shared head of 10 outputs, or ``heads`` heads of 5 (split_task_il, 2 tasks)."""
    outputs = 5 if heads > 1 else 10
    return clx.FunctionalModel.from_module(clx.MLP(64, (16,), outputs, num_heads=heads, rngs=nnx.Rngs(0)))


def _two_tasks(rule, heads=1):
    """Trains two tasks (one epoch each, batch 10) with the trainer's train steps and consolidates after each."""
    model, params = _model(heads)
    stream = _stream("split_task_il" if heads > 1 else "permuted")
    params = jax.tree.map(jnp.copy, params)  # the steps donate their inputs
    state = rule.init(params)
    key = jax.random.key_data(jax.random.key(0))
    programs = functools.lru_cache(clx.train.make_train_steps_fn(model, rule, BATCH))
    consolidate = jax.jit(rule.consolidate)
    for t in range(2):
        task = stream.task(t)
        x, y = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
        ids = jnp.full(len(y), t, jnp.int32)
        params, state, _ = programs(math.ceil(len(y) / BATCH))(None, params, state, x, y, ids, key, t, 0, 0)
        moves, state = consolidate(state, params, clx.Evidence(jnp.int32(t), x[:20], y[:20], {}, model.apply))
        assert moves is None
    return params


@functools.lru_cache(maxsize=None)
def _finetuned(heads):
    return _two_tasks(clx.chain(optax.sgd(LR)), heads)


def _all_zero():
    """Every method of the family at weight 0, in one chain (one compile; any member that perturbed the
    gradient, the loss or the params would make the chain differ from fine-tuning)."""
    return clx.chain(ewc(0.0), online_ewc(0.0, 0.9), si(0.0), mas(0.0), l2(0.0), lwf(0.0), optax.sgd(LR))


def test_weight_zero_trains_bit_identically_to_fine_tuning():
    chex.assert_trees_all_equal(_two_tasks(_all_zero()), _finetuned(1))


def test_lwf_weight_zero_on_a_multi_head_model_trains_bit_identically_to_fine_tuning():
    chex.assert_trees_all_equal(_two_tasks(clx.chain(lwf(0.0, num_tasks=2), optax.sgd(LR)), 2), _finetuned(2))


@pytest.mark.parametrize(
    "make,heads",
    [(lambda: ewc(100.0), 1), (lambda: si(100.0), 1), (lambda: lwf(5.0, num_tasks=2), 2)],
    ids=["ewc", "si", "lwf multi-head"],
)
def test_the_same_walk_with_a_positive_weight_trains_differently(make, heads):
    """The zero-weight checks are not vacuous: on the same walk the penalty / loss term does act."""
    strong = _two_tasks(clx.chain(make(), optax.sgd(LR)), heads)
    ref = _finetuned(heads)
    assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(strong), jax.tree.leaves(ref))) > 1e-4


# --- traced hyperparameters and vmapped seeds ------------------------------------------------------------------------


def test_a_traced_weight_builds_inside_jit_and_vmap():
    params, (x, y) = linear_params(), linear_data()
    state = ewc(1.0).init(params)
    _, state = ewc(1.0).consolidate(state, params, _evidence(x, y, 0))
    away = jax.tree.map(lambda p: p + 1.0, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    lams = jnp.array([0.0, 1.0, 2.0])
    out = jax.vmap(lambda lam: ewc(lam).update(zeros, state, away)[0])(lams)
    one = ewc(1.0).update(zeros, state, away)[0]
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[2], out), jax.tree.map(lambda a: 2 * a, one), rtol=1e-6)
    for make in (lambda v: si(v), lambda v: mas(v), lambda v: l2(v), lambda v: online_ewc(v, v), lambda v: lwf(v, v)):
        jax.jit(lambda v: make(v).init(params))(jnp.float32(0.5))  # no concrete check on a traced value


# --- bad input -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: ewc(-1.0), "ewc: lam must be a finite value >= 0, got -1.0"),
        (lambda: ewc(1.0, fisher="diagonal"), "unknown Fisher variant 'diagonal'"),
        (lambda: ewc(1.0, num_samples=0), "num_samples must be None or an integer >= 1"),
        (lambda: online_ewc(-2.0), "online_ewc: lam must be"),
        (lambda: online_ewc(1.0, gamma=0.0), r"gamma must lie in \(0, 1\], got 0.0"),
        (lambda: online_ewc(1.0, gamma=1.5), r"gamma must lie in \(0, 1\], got 1.5"),
        (lambda: si(-0.1), "si: c must be a finite value >= 0"),
        (lambda: si(1.0, xi=0.0), "si: xi must be a finite value > 0"),
        (lambda: mas(-1.0), "mas: lam must be"),
        (lambda: mas(1.0, chunk_size=0), "chunk_size must be None or an integer >= 1"),
        (lambda: l2(float("nan")), "l2: lam must be a finite value >= 0, got nan"),
        (lambda: lwf(-1.0), "lwf: alpha must be"),
        (lambda: lwf(1.0, temperature=0.0), "lwf: temperature must be a finite value > 0, got 0.0"),
        (lambda: lwf(1.0, temperature=-2.0), "lwf: temperature must be"),
        (lambda: lwf(num_tasks=2, classes_per_task=2), "exclude each other"),
        (lambda: lwf(weighting="mean"), "unknown weighting 'mean'"),
        (lambda: lwf(num_tasks=0), "num_tasks must be None or an integer >= 1"),
        (
            lambda: diagonal_fisher(linear_apply, linear_params(), *linear_data(), 0, variant="diag"),
            "unknown Fisher variant",
        ),
    ],
)
def test_bad_arguments_raise_at_build_time(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_update_without_params_and_too_few_evidence_examples_raise():
    params, (x, y) = linear_params(), linear_data(n=5)
    for rule in (ewc(1.0), online_ewc(1.0), si(1.0), mas(1.0), l2(1.0)):
        with pytest.raises(ValueError, match="update needs the params"):
            rule.update(params, rule.init(params))
    for rule in (ewc(1.0, num_samples=6), mas(1.0, num_samples=6)):
        with pytest.raises(ValueError, match="holds 5 examples but num_samples=6"):
            rule.consolidate(rule.init(params), params, _evidence(x, y, 0))
