"""The ViT's params sharded FSDP-style over a ``model`` axis of 8 fake CPU devices
(``clx.sharding.fsdp_shardings``): fine-tuning steps and the merges (task arithmetic, OPCM) give
the 1-device results to float tolerance; OPCM's SVDs run on sharded kernels: with ``svd="full"`` XLA
gathers each kernel to every device before the LAPACK SVD, with ``svd="gram"`` (opt-in; ``"auto"`` on more
than one device) nothing is gathered, only the k x k Gram reduced (asserted on the compiled programs);
a kernel that the axis does not divide is named in the error."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

import clx
from clx import sharding as shd
from clx.merging._opcm import check_svd
from clx.tree import path_str

pytestmark = pytest.mark.cpu_devices8

# dims divisible by 8: patch_embed (4, 16), attention (16, 16), fc1 (16, 32), fc2 (32, 16), head (16, 10)
VIT = dict(input_shape=(8, 8, 1), num_outputs=10, patch_size=2, dim=16, depth=1, attention_heads=2, mlp_dim=32)


def _setup():
    from flax import nnx

    model, params = clx.FunctionalModel.from_module(clx.models.ViT(**VIT, rngs=nnx.Rngs(0)))
    mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    return model, params, mesh


def _leaves(tree):
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_fsdp_shardings_split_kernels_and_name_bad_leaves():
    model, params, mesh = _setup()
    assert jax.device_count() == 8
    shardings = shd.fsdp_shardings(params, mesh)
    placed = shd.put_tree(params, shardings)
    for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(placed)[0], jax.tree.leaves(shardings)):
        name, shape = path_str(path), leaf.shape
        if leaf.ndim == 2:
            dim = 0 if shape[0] >= shape[1] else 1
            assert s.spec[dim] == "model" and s.spec[1 - dim] is None, name
            local = list(shape)
            local[dim] //= 8
            assert leaf.addressable_shards[0].data.shape == tuple(local), name  # each device holds 1/8
        else:
            assert s.is_fully_replicated, name
    assert _leaves(placed).keys() == _leaves(params).keys()
    with pytest.raises(ValueError, match=r"leaf 'layer/kernel' of shape \(12, 6\).*larger dimension \(12\)"):
        shd.fsdp_shardings({"layer": {"kernel": jnp.zeros((12, 6)), "bias": jnp.zeros(6)}}, mesh)
    ok = shd.fsdp_shardings({"layer": {"kernel": jnp.zeros((12, 6))}}, mesh, min_size=100)  # small: replicated
    assert ok["layer"]["kernel"].is_fully_replicated
    with pytest.raises(ValueError, match="no 'model'"):
        shd.fsdp_shardings(params, jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,)))


def test_finetuning_and_merging_on_sharded_params_equal_one_device():
    model, params, mesh = _setup()
    sharded = shd.put_tree(params, shd.fsdp_shardings(params, mesh))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((96, 8, 8, 1), np.float32))
    y = jnp.asarray(rng.integers(0, 10, 96).astype(np.int32))
    tids = jnp.zeros(96, jnp.int32)
    rule = clx.as_continual(optax.adam(1e-2))
    steps = clx.train.make_train_steps_fn(model, rule, 32)(3)  # the trainer's own program, 3 Adam steps

    def finetune(p, seed):
        p = jax.tree.map(jnp.copy, p)
        kd = jax.random.key_data(jax.random.key(seed))
        p, _, loss = steps(None, p, rule.init(p), x, y, tids, kd, 0, 0, 0)
        return p, float(loss)

    one = [finetune(params, s) for s in range(3)]
    eight = [finetune(sharded, s) for s in range(3)]
    for (p1, l1), (p8, l8) in zip(one, eight):
        assert l8 == pytest.approx(l1, rel=1e-5)
        a, b = _leaves(p1), _leaves(p8)
        for k in a:
            if k.endswith("attn/key/bias"):
                # softmax ignores a bias added to every key: the exact gradient is 0, the computed one rounding
                # noise (~1e-10) that Adam's m / sqrt(v) blows up to +-lr per step, differently on 1 and 8 devices
                assert np.abs(a[k] - b[k]).max() <= 3 * 1e-2 * 2 + 1e-6
                continue
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=2e-6, err_msg=k)
    assert any(not np.array_equal(u, v) for u, v in zip(_leaves(one[0][0]).values(), _leaves(params).values()))

    # merges: the same fine-tuned models (the 1-device ones), placed sharded or not
    fts1 = [p for p, _ in one]
    fts8 = [shd.put_tree(p, shd.fsdp_shardings(p, mesh)) for p in fts1]
    ta1 = clx.merging.task_arithmetic(params, fts1, lam=0.3)
    ta8 = clx.merging.task_arithmetic(sharded, fts8, lam=0.3)
    merged = {}
    for k, v in _leaves(ta1).items():
        np.testing.assert_allclose(_leaves(ta8)[k], v, rtol=0, atol=1e-6, err_msg=k)
    # OPCM, both SVDs: each equals its 1-device result (params on one device, unsharded)
    for svd in ("full", "gram"):
        o1 = clx.merging.merge_sequence(clx.merging.opcm(alpha=0.5, svd=svd), params, fts1)
        o8 = clx.merging.merge_sequence(clx.merging.opcm(alpha=0.5, svd=svd), sharded, fts8)
        for k, v in _leaves(o1.merged).items():
            np.testing.assert_allclose(_leaves(o8.merged)[k], v, rtol=0, atol=2e-5, err_msg=f"{svd} {k}")
        assert (
            float(jnp.max(jnp.abs(o1.merged["blocks"][0]["fc1"]["kernel"] - ta1["blocks"][0]["fc1"]["kernel"]))) > 1e-4
        )
        merged[svd] = o8.merged
    assert check_svd("opcm", "auto") == "gram"  # "auto" on 8 devices (the default stays "full")
    for k, v in _leaves(merged["gram"]).items():
        # not the full SVD to float tolerance: the Gram's float32 error on the small singular directions
        # (zeroed diagonal of the tail) moved 5 of 256 entries of one kernel by up to 3.9e-4 (entries ~0.4)
        np.testing.assert_allclose(v, _leaves(merged["full"])[k], rtol=0, atol=1e-3, err_msg=k)

    # OPCM's SVD on a sharded kernel. "full": XLA all-gathers it and runs the LAPACK SVD on every device;
    # "gram": no gather, only all-reduces of the k x k Gram / projection (and of the k column norms)
    for name in ("fc1", "fc2"):  # (16, 32) sharded along 32, (32, 16) along 32: both sides of the Gram
        w = fts8[1]["blocks"][0][name]["kernel"]
        s = jax.tree.map(jnp.subtract, fts8[0], sharded)["blocks"][0][name]["kernel"]
        assert not w.sharding.is_fully_replicated and not s.sharding.is_fully_replicated
        hlo = clx.merging.opcm_projection.lower(s, w, 0.5, True, "full").compile().as_text()
        svd = [line for line in hlo.splitlines() if "custom_call_target" in line and "gesdd" in line]
        assert svd and "all-gather" in hlo, name
        if name == "fc1":  # here the SVD's operand is the gather itself (for fc2 a layout-copy fusion of the gather)
            assert any("all-gather" in line.split("custom-call(")[1] for line in svd if "custom-call(" in line)
        hlo = clx.merging.opcm_projection.lower(s, w, 0.5, True, "gram").compile().as_text()
        assert "all-gather" not in hlo and "gesdd" not in hlo and "all-to-all" not in hlo, name
        assert any("custom_call_target" in line and "syevd" in line for line in hlo.splitlines()), name
        reduces = [
            line.split("=")[1].split("all-reduce(")[0].strip() for line in hlo.splitlines() if " all-reduce(" in line
        ]
        assert reduces and set(reduces) <= {"f32[16,16]{0,1}", "f32[16,16]{1,0}", "f32[16]{0}"}, (name, reduces)
