"""One contract test over every rule (after optax's contrib/_common_test.py).

Every registered method, built by its registry entry exactly as the experiment
script builds it, and the minimal rule of each contract hook (tests/_rules.py), is
checked for: init / train steps / consolidate under jax.jit; the same programs
vmapped over 3 seeds (each member equal to its own run); consolidate keeping the
state's tree structure, shapes and dtypes; composing inside a further clx.chain
with an optax transform; and an orbax save/restore round trip that restores the
state exactly.

A new method joins by adding one line to CONTRACT (a test fails while a registered
method is missing from it).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import clx
from clx import checkpoint as ckpt_lib
from experiments import methods
from tests import _cl_tiny, _rules

BATCH, STEPS, SEEDS = 8, 3, (0, 1, 2)


def _registered(name):
    """(config, model_and_params(seed), rule): the method as the experiment script builds it."""

    def build():
        config = _cl_tiny.digits_config(name)
        config.model.hidden = (16,)
        for block in ("gpm", "sgp", "trgp"):  # GPM's memory: one threshold per layer of this model
            config[block].threshold = (0.9, 0.9)
            config[block].num_samples = 24  # the evidence sample below
        config.ogd.memory_per_task = 16  # gradients from the evidence sample below
        if "hnet" in config:
            config.hnet.chunk_dim = 500
            config.hnet.hidden = (8,)
            config.hnet.task_id_at_test = True  # digits_config's stream is permuted (domain-IL)
        stream = _stream()
        method = methods.get(name)
        model, _ = method.build_model(config, stream, 0)
        return (lambda seed: method.build_model(config, stream, seed)), method.make_rule(config, model)

    return build


def _fixture(make_rule):
    def build():
        return (lambda seed: _cl_tiny.model((16,), seed)), clx.chain(make_rule(), optax.sgd(0.1))

    return build


CONTRACT = {
    # every registered method (experiments/methods/)
    "finetune": _registered("finetune"),
    "joint": _registered("joint"),
    "gpm": _registered("gpm"),
    "sgp": _registered("sgp"),
    "adam_nscl": _registered("adam_nscl"),
    "ogd": _registered("ogd"),
    "coso": _registered("coso"),
    "olora": _registered("olora"),
    "trgp": _registered("trgp"),
    "svd_split": _registered("svd_split"),
    "hnet": _registered("hnet"),
    "ewc": _registered("ewc"),
    "online_ewc": _registered("online_ewc"),
    "si": _registered("si"),
    "mas": _registered("mas"),
    "l2": _registered("l2"),
    "lwf": _registered("lwf"),
    "er": _registered("er"),
    "agem": _registered("agem"),
    "gem": _registered("gem"),
    "der": _registered("der"),
    "derpp": _registered("derpp"),
    "l2_init": _registered("l2_init"),
    "shrink_perturb": _registered("shrink_perturb"),
    "shrink_perturb_steps": _registered("shrink_perturb_steps"),
    "cbp": _registered("cbp"),
    "redo": _registered("redo"),
    "upgd": _registered("upgd"),
    "spectral": _registered("spectral"),
    # the minimal rule of each hook (tests/_rules.py)
    "hook: loss term": _fixture(lambda: _rules.logit_penalty(0.1)),
    "hook: reference gradient": _fixture(lambda: _rules.ref_projection(8, (8, 8, 1))),
    "hook: batch-inserting buffer": _fixture(lambda: _rules.ring_buffer(32, (8, 8, 1))),
    "hook: boundary move": _fixture(lambda: _rules.shrink(0.9, 0.01)),
}


def _stream():
    return _cl_tiny.stream(num_tasks=2, train_subset=64)


def test_every_registered_method_is_in_the_contract_test():
    assert set(methods.METHODS) <= set(CONTRACT), f"add {sorted(set(methods.METHODS) - set(CONTRACT))} to CONTRACT"


def _task_arrays():
    task = _stream().task(0)
    return jnp.asarray(task.x_train), jnp.asarray(task.y_train), jnp.zeros(len(task.y_train), jnp.int32)


def _evidence(model, params, rule, x, y, t=0):
    reps = clx.train.make_evidence_fn(model)(params, x, jnp.int32(t)) if "representations" in rule.needs else {}
    return clx.Evidence(jnp.int32(t), x, y, reps, model.apply)


def _one_member(build, seed):
    """Init, STEPS train steps, consolidate, under jit, for one seed: (params, state after steps, moved params,
    consolidated state)."""
    model_fn, rule = build()
    model, params = model_fn(seed)
    x, y, ids = _task_arrays()
    state0 = jax.jit(rule.init)(params)
    steps = clx.train.make_train_steps_fn(model, rule, BATCH)(STEPS)
    key = jax.random.key_data(jax.random.key(seed))
    params, state, _ = steps(None, params, state0, x, y, ids, key, 0, 0, 0)
    ev = _evidence(model, params, rule, x[:24], y[:24])
    moves, new_state = jax.jit(rule.consolidate)(state, params, ev)
    moved = params if moves is None else optax.apply_updates(params, moves)
    return params, state, moved, new_state, state0


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_jit_and_consolidate_keeps_structure_shapes_and_dtypes(name):
    params, state, moved, new_state, state0 = _one_member(CONTRACT[name], 0)
    for s in (state, new_state):
        assert jax.tree.structure(s) == jax.tree.structure(state0)
        chex.assert_trees_all_equal_shapes_and_dtypes(s, state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(moved, params)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves(moved))


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_vmapped_over_three_seeds_equals_each_seed_alone(name):
    model_fn, rule = CONTRACT[name]()
    built = [model_fn(s) for s in SEEDS]
    model = built[0][0]
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)  # noqa: E731
    params = stack([p for _, p in built])
    state = jax.vmap(rule.init)(params)
    x, y, ids = _task_arrays()
    keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for s in SEEDS])
    steps = clx.train.make_train_steps_fn(model, lambda hp: rule, BATCH, member_axis="vmap")(STEPS)
    params, state, _ = steps(jnp.zeros(len(SEEDS)), params, state, x, y, ids, keys, 0, 0, 0)
    ev = _evidence(model, jax.tree.map(lambda a: a[0], params), rule, x[:24], y[:24])
    reps = (
        jax.vmap(lambda p: clx.train.make_evidence_fn(model)(p, x[:24], jnp.int32(0)))(params)
        if "representations" in rule.needs
        else {}
    )
    evs = clx.Evidence(jnp.int32(0), jnp.stack([ev.x] * 3), jnp.stack([ev.y] * 3), reps, model.apply)
    moves, new_state = jax.jit(jax.vmap(rule.consolidate, in_axes=(0, 0, clx.Evidence(None, 0, 0, 0, model.apply))))(
        state, params, evs
    )
    for m, seed in enumerate(SEEDS):
        p1, s1, moved1, ns1, _ = _one_member(CONTRACT[name], seed)
        member = lambda tree: jax.tree.map(lambda a: a[m], tree)  # noqa: E731
        chex.assert_trees_all_close(member(params), p1, atol=1e-5)
        chex.assert_trees_all_close(member(new_state), ns1, atol=1e-4)
        if moves is not None:
            chex.assert_trees_all_close(optax.apply_updates(member(params), member(moves)), moved1, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_composes_inside_a_further_chain_with_an_optax_transform(name):
    model_fn, rule = CONTRACT[name]()
    model, params = model_fn(0)
    outer = clx.chain(optax.clip_by_global_norm(1e9), rule)  # a clip that never binds: same steps as the rule
    assert outer.needs == rule.needs and (outer.loss is None) == (rule.loss is None)
    x, y, ids = _task_arrays()
    key = jax.random.key_data(jax.random.key(0))
    inner_p, _, _ = clx.train.make_train_steps_fn(model, rule, BATCH)(STEPS)(
        None, jax.tree.map(jnp.copy, params), rule.init(params), x, y, ids, key, 0, 0, 0
    )
    outer_p, _, _ = clx.train.make_train_steps_fn(model, outer, BATCH)(STEPS)(
        None, jax.tree.map(jnp.copy, params), outer.init(params), x, y, ids, key, 0, 0, 0
    )
    chex.assert_trees_all_close(outer_p, inner_p, atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_orbax_round_trip_restores_the_state_exactly(name, tmp_path):
    _, _, _, new_state, _ = _one_member(CONTRACT[name], 0)
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), {"rule": name}, async_save=False)
    ck.save({"rule_state": new_state}, {"position": {"task": 1, "epoch": 0, "step": 0}})
    ck.close()
    target = jax.tree.map(jnp.zeros_like, {"rule_state": new_state})
    restored, _ = ckpt_lib.Checkpointer(str(tmp_path / "ck"), {"rule": name}).restore(target)
    assert jax.tree.structure(restored["rule_state"]) == jax.tree.structure(new_state)
    chex.assert_trees_all_equal(restored["rule_state"], new_state)
