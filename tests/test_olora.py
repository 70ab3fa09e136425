"""O-LoRA: a LoRA per task on a frozen model, the new one pushed orthogonal to the earlier ones."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx.projection import LoRAModel, olora, orthogonality_penalty

T, R = 3, 2


def _setup(seed=0):
    base, base_params = clx.FunctionalModel.from_module(clx.MLP(12, (8,), 4, use_bias=True, rngs=nnx.Rngs(seed)))
    model = LoRAModel(base, base_params, T, rank=R)
    return base, base_params, model, model.init(base_params, jax.random.key(seed))


def _loss(model, params, x, y):
    logits = model.apply(params, x, None)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _train(model, params, rule, state, task, x, y, steps=5):
    grad = jax.grad(lambda p: _loss(model, p, x, y))

    @jax.jit
    def step(params, state):
        updates, state = rule.update(grad(params), state, params, task_id=jnp.int32(task))
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def _data(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (16, 12)), jax.random.randint(k2, (16,), 0, 4)


def test_the_model_starts_as_its_base_and_merges_every_task_s_lora():
    base, base_params, model, params = _setup()
    x, _ = _data(1)
    np.testing.assert_array_equal(jax.jit(model.apply)(params, x), jax.jit(base.apply)(base_params, x))  # B = 0
    a = params["lora"]["layers.0.kernel"]["A"]
    bound = 1 / np.sqrt(12)
    assert a.shape == (T, R, 12) and float(jnp.abs(a).max()) <= bound
    b = jax.random.normal(jax.random.key(2), (T, 8, R))
    lora = {**params["lora"], "layers.0.kernel": {"A": a, "B": b}}
    merged = jax.jit(model.merged)({**params, "lora": lora})
    want = np.asarray(base_params["layers"][0]["kernel"]) + (32 / R) * sum(
        np.asarray(a[t]).T @ np.asarray(b[t]).T for t in range(T)
    )
    np.testing.assert_allclose(merged["layers"][0]["kernel"], want, rtol=1e-5, atol=1e-5)


def test_training_a_task_leaves_the_base_and_earlier_loras_untouched_bit_for_bit():
    _, _, model, params = _setup()
    rule = olora(optax.adam(1e-2), lambda_1=0.5, lambda_2=0.1)
    state = rule.init(params)
    x0, y0 = _data(3)
    params, state = _train(model, params, rule, state, 0, x0, y0)
    _, state = rule.consolidate(state, params, None)
    after_0, out_0 = params, model.apply(params, x0)
    x1, y1 = _data(4)
    params, state = _train(model, params, rule, state, 1, x1, y1)
    jax.tree.map(np.testing.assert_array_equal, params["net"], after_0["net"])
    for layer, old in zip(params["lora"].values(), after_0["lora"].values()):
        for k in ("A", "B"):
            np.testing.assert_array_equal(layer[k][0], old[k][0])  # task 0's LoRA
            np.testing.assert_array_equal(layer[k][2], old[k][2])  # task 2's, not trained yet
            assert float(jnp.abs(layer[k][1] - old[k][1]).max()) > 0  # task 1's moved
    # so task 0's outputs change only through task 1's LoRA: removing it restores them exactly
    lora = {k: {"A": v["A"], "B": v["B"].at[1].set(0.0)} for k, v in params["lora"].items()}
    np.testing.assert_allclose(model.apply({**params, "lora": lora}, x0), out_0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["squared", "abs"])
def test_the_penalty_gradient_is_jax_grad_of_the_written_formula(kind):
    _, _, model, params = _setup()
    lam1, lam2, t = 0.7, 0.3, 2
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(5), a.shape), params)

    def written(lora):  # lambda_1 sum_layers sum_{s<t} sum |A_s A_t^T|^p + lambda_2 (||A_t|| + ||B_t||)
        total = 0.0
        for layer in lora.values():
            for s in range(t):
                o = layer["A"][s] @ layer["A"][t].T
                total += lam1 * (jnp.sum(o**2) if kind == "squared" else jnp.sum(jnp.abs(o)))
            total += lam2 * (jnp.linalg.norm(layer["A"][t]) + jnp.linalg.norm(layer["B"][t]))
        return total

    want = jax.jit(jax.grad(written))(params["lora"])
    zero = jax.tree.map(jnp.zeros_like, params)
    rule = olora(optax.sgd(1.0), lambda_1=lam1, lambda_2=lam2, orthogonality=kind)
    out, _ = jax.jit(rule.update)(zero, rule.init(params), params, task_id=jnp.int32(t))
    for key in params["lora"]:
        for k in ("A", "B"):
            np.testing.assert_allclose(-out["lora"][key][k][t], want[key][k][t], rtol=1e-5, atol=1e-6)
            assert float(jnp.abs(out["lora"][key][k][:t]).max()) == 0.0
    l2 = sum(float(jnp.linalg.norm(v["A"][t]) + jnp.linalg.norm(v["B"][t])) for v in params["lora"].values())
    pen = jax.jit(orthogonality_penalty, static_argnums=2)(params["lora"], t, kind)
    np.testing.assert_allclose(lam1 * float(pen), float(jax.jit(written)(params["lora"])) - lam2 * l2, rtol=1e-5)


def test_lambda_zero_is_plain_lora_training_of_the_task_s_slice():
    _, _, model, params = _setup()
    x, y = _data(6)
    rule = olora(optax.adam(1e-2), lambda_1=0.0)
    ref = optax.adam(1e-2)
    state, ref_state = rule.init(params), ref.init(params["lora"])
    grad = jax.jit(jax.grad(lambda p: _loss(model, p, x, y)))
    update, ref_update = jax.jit(rule.update), jax.jit(ref.update)
    for _ in range(3):
        g = grad(params)
        out, state = update(g, state, params, task_id=jnp.int32(1))
        masked = jax.tree.map(lambda a: a * (jnp.arange(T) == 1).reshape(-1, *([1] * (a.ndim - 1))), g["lora"])
        want, ref_state = ref_update(masked, ref_state)
        jax.tree.map(lambda o, w: np.testing.assert_allclose(o, w, rtol=1e-6, atol=1e-9), out["lora"], want)
        params = optax.apply_updates(params, out)


def test_the_penalty_drives_the_new_a_orthogonal_to_the_old():
    _, _, model, params = _setup()
    rule = olora(optax.sgd(0.5), lambda_1=1.0)
    zero = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(lambda p, s: rule.update(zero, s, p, task_id=jnp.int32(1)))
    state = rule.init(params)
    before = float(orthogonality_penalty(params["lora"], 1))
    for _ in range(40):
        out, state = update(params, state)
        params = optax.apply_updates(params, out)
    assert float(orthogonality_penalty(params["lora"], 1)) < 1e-3 * before


def test_bad_inputs_raise():
    base, base_params, _, params = _setup()
    with pytest.raises(ValueError, match="rank must be an integer >= 1"):
        LoRAModel(base, base_params, T, rank=0)
    with pytest.raises(ValueError, match=r"rank 5 exceeds min\(d_in, d_out\) = 4 of 'layers/1/kernel'"):
        LoRAModel(base, base_params, T, rank=5)
    with pytest.raises(ValueError, match="num_tasks must be an integer >= 1"):
        LoRAModel(base, base_params, 0)
    with pytest.raises(ValueError, match="not 2-D kernels"):
        LoRAModel(base, base_params, T, layers=["layers/0/bias"])
    with pytest.raises(ValueError, match="lambda_1 must be a finite value >= 0"):
        olora(optax.sgd(0.1), lambda_1=-1.0)
    with pytest.raises(ValueError, match="orthogonality must be one of"):
        olora(optax.sgd(0.1), orthogonality="l1")
    rule = olora(optax.sgd(0.1))
    with pytest.raises(ValueError, match="params must be a LoRAModel's"):
        rule.init(base_params)
    zero = jax.tree.map(jnp.zeros_like, params)
    with pytest.raises(ValueError, match="task_id 3 is outside"):
        rule.update(zero, rule.init(params), params, task_id=jnp.int32(3))
    with pytest.raises(ValueError, match="needs the task_id"):
        rule.update(zero, rule.init(params), params)
