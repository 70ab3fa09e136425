"""Bad inputs through the public API: each gets a clear, early error (type and message checked), and a
batch larger than a task's training set trains as one padded batch."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import checkify

import clx
from clx import data
from clx import train as train_lib
from clx.train import fit, fit_members, make_epoch_fn, make_eval_fn, make_train_steps_fn


@functools.cache
def _digits():
    return data.load_source("digits")


def _stream(num_tasks=2, n=20, kind="permuted"):
    return data.make_stream(_digits(), kind, num_tasks, seed=0, train_subset=n)


def _model(hidden=(16,), out=10, heads=1, seed=0):
    return clx.FunctionalModel.from_module(clx.MLP(64, hidden, out, num_heads=heads, rngs=nnx.Rngs(seed)))


def _fit(stream=None, rule=None, **kw):
    model, params = kw.pop("model", None) or _model()
    kw = {"epochs": 1, "batch_size": 10, "evidence_samples": 8, "progress": False, **kw}
    return fit(model, params, optax.sgd(0.1) if rule is None else rule, stream or _stream(), **kw)


# --- item 4: the caller's params -------------------------------------------------------------------------------------


def test_two_rules_train_from_the_same_initial_params():
    """fit donates only the trainer's own copies: the caller's params stay intact for a second rule, which trains
    exactly as it does from a fresh copy (this failed with "Array has been deleted")."""
    model, params = _model()
    before = jax.tree.map(np.array, params)
    stream = _stream()
    kw = {"epochs": 2, "batch_size": 10, "evidence_samples": 8, "progress": False}
    fit(model, params, clx.chain(clx.ewc(lam=10.0), optax.sgd(0.1)), stream, **kw)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))
    jax.tree.map(np.testing.assert_array_equal, params, before)  # unchanged, bit for bit
    second = fit(model, params, clx.chain(clx.gpm(0.9, num_samples=8), optax.sgd(0.1)), stream, **kw)
    fresh = fit(
        model, jax.tree.map(jnp.asarray, before), clx.chain(clx.gpm(0.9, num_samples=8), optax.sgd(0.1)), stream, **kw
    )
    np.testing.assert_array_equal(second.accuracy_matrix, fresh.accuracy_matrix)
    jax.tree.map(np.testing.assert_array_equal, second.params, fresh.params)


# --- item 5: a batch larger than the task -----------------------------------------------------------------------------


def test_batch_larger_than_the_task_is_one_padded_batch_equal_to_batch_n():
    stream = data.make_stream(_digits(), "permuted", 2, seed=0)  # every task: all 1438 training digits
    n = stream.task(0).y_train.shape[0]
    assert n == 1438
    runs = []
    for batch in (n, n + 1):  # 1439: crashed with a reshape error inside the jitted step
        model, params = _model()
        rule = clx.chain(clx.gpm(0.9, num_samples=20), optax.sgd(0.5))  # taps: the shapes of a padded batch
        runs.append(fit(model, params, rule, stream, epochs=3, batch_size=batch, evidence_samples=20, progress=False))
    same, padded = runs
    np.testing.assert_allclose(padded.losses, same.losses, rtol=1e-5)
    assert not np.allclose(same.losses[:, 0], same.losses[:, -1])  # it did train
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), padded.params, same.params)
    np.testing.assert_allclose(padded.accuracy_matrix, same.accuracy_matrix, atol=2 / 359)


# --- item 7: range checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(eval_batch_size=0), r"eval_batch_size must be an integer >= 1, got 0\."),  # was ZeroDivisionError
        (dict(eval_batch_size=-5), r"eval_batch_size must be an integer >= 1, got -5\."),
        (dict(epochs=0), r"epochs must be an integer >= 1, got 0\."),
        (dict(epochs=1.5), r"epochs must be an integer >= 1, got 1\.5\."),
        (dict(batch_size=-1), r"batch_size must be an integer >= 1, got -1\."),
        (dict(batch_size=2.5), r"batch_size must be an integer >= 1, got 2\.5\."),
        (dict(batch_size="10"), r"batch_size must be an integer >= 1, got '10'\."),
        (dict(evidence_samples=0), r"evidence_samples must be an integer >= 1, got 0\."),
        (dict(checkpoint=dict(every_steps=-1)), r"checkpoint.every_steps must be an integer >= 0, got -1\."),
        (dict(checkpoint=dict(max_to_keep=1)), r"checkpoint.max_to_keep must be an integer >= 2, got 1\."),
    ],
)
def test_bad_fit_arguments_raise_value_error_naming_the_argument(kw, match, monkeypatch):
    monkeypatch.setattr(train_lib._TaskData, "__init__", _no_data_work)
    with pytest.raises(ValueError, match=match):
        if "checkpoint" in kw:
            kw = {"checkpoint": clx.CheckpointOptions("/nonexistent", **kw["checkpoint"])}
        _fit(**kw)


def _no_data_work(*a, **k):
    raise AssertionError("the error came too late (after the data or the training were touched)")


def test_bad_program_arguments_raise_value_error():
    model, _ = _model()
    with pytest.raises(ValueError, match=r"eval_batch_size must be an integer >= 1, got 0\."):
        make_eval_fn(model, 0)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0\."):
        make_epoch_fn(model, optax.sgd(0.1), 0)
    with pytest.raises(ValueError, match=r"batch_size must be an integer >= 1, got 0\."):
        make_train_steps_fn(model, optax.sgd(0.1), 0)


def test_non_finite_member_hparams_are_refused():
    model, params = _model()
    with pytest.raises(ValueError, match=r"fit_members: hparams must be finite, got \[0.1, nan\]"):
        fit_members(model, [params] * 2, optax.sgd, [0.1, np.nan], _stream(), seeds=[0, 1], epochs=1, batch_size=10)


@pytest.mark.parametrize("threshold", [0.0, 1.5, -0.1, float("nan"), [0.9, 1.2], "high"])
def test_gpm_threshold_outside_0_1_is_refused(threshold):
    with pytest.raises(ValueError, match=r"threshold must be (in|a number in) \(0, 1\]"):
        clx.gpm(threshold)


# --- item 7: non-finite inputs ----------------------------------------------------------------------------------------


class _Poisoned:
    """A stream whose task ``t`` has one NaN pixel in its ``split`` ("train" or "test") inputs."""

    def __init__(self, stream, t, split):
        self._stream, self._t, self._split = stream, t, split

    def __getattr__(self, name):
        return getattr(self._stream, name)

    def _poison(self, x):
        x = np.array(x)
        x[3, 0, 0, 0] = np.nan
        return x

    def test_set(self, t):
        x, y = self._stream.test_set(t)
        return (self._poison(x) if (t, self._split) == (self._t, "test") else x), y

    def task(self, t):
        task = self._stream.task(t)
        if t == self._t:
            task = dataclasses.replace(task, **{f"x_{self._split}": self._poison(getattr(task, f"x_{self._split}"))})
        return task


def test_nan_in_a_later_tasks_test_images_is_refused_before_training(monkeypatch):
    monkeypatch.setattr(train_lib._TaskData, "train", _no_data_work)
    with pytest.raises(ValueError, match=r"task 1 test: 1 of \d+ inputs hold NaN or inf \(first at index 3\)"):
        _fit(_Poisoned(_stream(2), 1, "test"))


def test_nan_in_training_images_is_refused_before_the_task_trains(monkeypatch):
    monkeypatch.setattr(train_lib, "tqdm", _no_data_work)  # the task's epochs must not start
    with pytest.raises(ValueError, match=r"task 0 train: 1 of 20 inputs hold NaN or inf \(first at index 3\)"):
        _fit(_Poisoned(_stream(2), 0, "train"))


def _gpm_evidence(reps):
    return clx.Evidence(jnp.int32(0), jnp.zeros((4, 8, 8, 1)), jnp.zeros((4,), jnp.int32), reps, None)


def test_nan_representations_handed_to_gpm_consolidate_are_refused_naming_the_layer():
    model, params = _model()
    rule = clx.gpm(0.9, num_samples=4)
    state = rule.init(params)
    reps = {"layers/0/kernel": jnp.ones((64, 4)), "layers/1/kernel": jnp.ones((16, 4)).at[2, 1].set(jnp.nan)}
    with pytest.raises(ValueError, match=r"gpm: representation of 'layers/1/kernel' holds NaN or inf \(1 entries\)"):
        rule.consolidate(state, params, _gpm_evidence(reps))  # was: every subspace silently of rank 0
    err, _ = jax.jit(checkify.checkify(rule.consolidate))(state, params, _gpm_evidence(reps))
    with pytest.raises(checkify.JaxRuntimeError, match=r"gpm: representation of 'layers/1/kernel' holds NaN or inf"):
        err.throw()
    with pytest.raises(ValueError, match=r"representation of 'layers/1/kernel' has shape \(15, 4\) but the layer's"):
        rule.consolidate(state, params, _gpm_evidence({**reps, "layers/1/kernel": jnp.ones((15, 4))}))


def test_the_trainer_refuses_non_finite_representations_before_consolidate():
    reps = {"layers/0/kernel": jnp.ones((3, 2)), "layers/1/kernel": jnp.full((3, 2), jnp.inf)}
    with pytest.raises(FloatingPointError, match=r"task 4's evidence sample hold NaN or inf in layers \['layers/1/k"):
        train_lib._check_representations(reps, 4)


# --- item 7: task ids the model does not have -------------------------------------------------------------------------


def test_fit_refuses_a_stream_with_more_tasks_than_the_model_has_heads(monkeypatch):
    monkeypatch.setattr(train_lib._TaskData, "__init__", _no_data_work)
    stream = _stream(5, kind="split_task_il")
    with pytest.raises(
        ValueError,
        match=r"the stream has 5 tasks \(ids 0..4\) but the model refuses task id 4: unknown task id 4: the model "
        r"has 3 heads \(tasks 0..2\)",
    ):
        _fit(stream, model=_model(out=2, heads=3))  # was: tasks 3 and 4 silently trained head 2


def test_a_multi_head_model_refuses_an_unknown_task_id_eagerly_and_under_jit_with_checkify():
    model, params = _model(out=2, heads=3)
    x = jnp.ones((4, 64))
    with pytest.raises(ValueError, match=r"unknown task id 3: the model has 3 heads \(tasks 0..2\)"):
        model.apply(params, x, 3)
    with pytest.raises(ValueError, match=r"unknown task id -1: the model has 3 heads"):
        model.apply(params, x, np.array([0, -1, 1, 2]))
    checked = jax.jit(checkify.checkify(model.apply))
    err, _ = checked(params, x, jnp.int32(3))
    with pytest.raises(checkify.JaxRuntimeError, match=r"unknown task id 3: the model has 3 heads \(tasks 0..2\)"):
        err.throw()
    err, logits = checked(params, x, jnp.array([0, 1, 2, 1]))
    assert err.get() is None
    np.testing.assert_allclose(logits, model.apply(params, x, np.array([0, 1, 2, 1])), rtol=1e-6)
    # without checkify: NaN logits, never another task's head
    assert np.isnan(np.asarray(jax.jit(model.apply)(params, x, jnp.int32(7)))).all()


def test_a_hypernetwork_refuses_an_unknown_task_id_under_jit_with_checkify():
    target = clx.TargetNetwork.from_module_fn(lambda: clx.MLP(6, (5,), 2, rngs=nnx.Rngs(0)))
    hnet = clx.mlp_hypernetwork(target.num_params, 3, (4,))
    model = clx.HyperModel(target, hnet, 2, 2, per_task_heads=False, input_shape=(6,))
    params, x = model.init(jax.random.key(0)), jnp.ones((3, 6))
    with pytest.raises(ValueError, match=r"unknown task id 2: the model has embeddings for tasks 0..1"):
        model.apply(params, x, 2)
    err, _ = jax.jit(checkify.checkify(model.apply))(params, x, jnp.int32(2))
    with pytest.raises(checkify.JaxRuntimeError, match=r"unknown task id 2: the model has 2 task embeddings"):
        err.throw()
    assert jax.jit(checkify.checkify(model.apply))(params, x, jnp.int32(1))[0].get() is None


# --- item 8: rule state vs gradient, plain optax in fit ---------------------------------------------------------------


def test_a_gpm_state_of_other_params_names_the_layer_and_both_shapes():
    _, small = _model(hidden=(16,))
    _, big = _model(hidden=(32,))
    rule = clx.gpm(0.9)
    state = rule.init(big)  # projectors (64, 64) and (32, 32)
    grads = jax.tree.map(jnp.ones_like, small)  # kernels (64, 16) and (16, 10)
    match = (
        r"gpm: the gradient of \['layers'\]\[1\]\['kernel'\] has shape \(16, 10\) but the rule's state for it is a "
        r"subspace of R\^32 \(projector \(32, 32\)\), so it needs shape \(32, m\)"
    )
    with pytest.raises(ValueError, match=match):
        rule.update(grads, state, small)
    with pytest.raises(ValueError, match=match):  # at trace time, not a dot_general message
        jax.jit(rule.update)(grads, state, small)
    with pytest.raises(ValueError, match=r"gpm: the state projects layers \['layers/1/kernel'\] that the gradient"):
        rule.update({"layers": {0: grads["layers"][0]}}, state)


def test_a_rule_whose_updates_are_not_shaped_like_the_params_is_named():
    bad = clx.ContinualTransformation(
        lambda p: (),
        lambda u, s, params=None, **e: (jax.tree.map(lambda g: g[:1], u), s),
        lambda s, p, ev: (None, s),
        name="truncating",
    )
    with pytest.raises(
        ValueError,
        match=r"rule 'chain\(truncating, optax\)' returned an update of shape \(1,\) for parameter "
        r"\['layers'\]\[0\]\['bias'\] of shape \(16,\)",
    ):
        _fit(rule=clx.chain(bad, optax.sgd(0.1)))


def test_fit_wraps_a_plain_optax_transform_and_refuses_other_objects():
    plain = _fit(rule=optax.sgd(0.1), epochs=2)  # was: AttributeError 'GradientTransformationExtraArgs' ... 'needs'
    chained = _fit(rule=clx.chain(optax.sgd(0.1)), epochs=2)
    np.testing.assert_array_equal(plain.losses, chained.losses)
    np.testing.assert_array_equal(plain.accuracy_matrix, chained.accuracy_matrix)
    with pytest.raises(TypeError, match=r"fit takes optax GradientTransformations or clx ContinualTransformations, "):
        _fit(rule="sgd")
