"""The small ViT: its patch order and taps, a GPM run through clx.fit, its weights from orbax
and from a safetensors file with Hugging Face names, the finetune stream, the pretraining script."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import clx
from clx import data
from clx.models import ViT

TINY = dict(patch_size=2, dim=16, depth=2, attention_heads=2, mlp_dim=24)  # 8x8 digits: 16 patches, 17 tokens


def tiny(seed=0, shape=(8, 8, 1), **kw):
    return ViT(shape, 10, **{**TINY, **kw}, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def digits():
    return data.load_source("digits")


def _flat(tree):
    return {clx.tree.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------- #
# the model
# --------------------------------------------------------------------------- #


def test_patches_are_the_grid_cells_row_major_in_row_column_channel_order():
    vit = nnx.eval_shape(lambda: tiny(shape=(8, 8, 3)))  # the patches need no weights
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 3)).astype(np.float32)
    patches = np.asarray(vit.patches(jnp.asarray(x)))
    assert patches.shape == (2, 16, 12)
    for i in range(4):
        for j in range(4):
            np.testing.assert_array_equal(
                patches[:, i * 4 + j], x[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(2, 12)
            )
    np.testing.assert_array_equal(np.asarray(vit.patches(jnp.asarray(x.reshape(2, -1)))), patches)  # flat inputs


def test_functional_model_taps_every_linear_once_with_batch_times_tokens_rows():
    vit = tiny()
    model, params = clx.FunctionalModel.from_module(vit)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 8, 8, 1)), jnp.float32)
    logits, taps = jax.jit(model.apply_with_taps)(params, x)
    linears = {clx.tree.path_str(tuple(p) + ("kernel",)) for p, m in nnx.iter_modules(vit) if isinstance(m, nnx.Linear)}
    assert len(linears) == 1 + 6 * TINY["depth"] + 1  # patch_embed, (q, k, v, out, fc1, fc2) per block, head
    assert set(taps) == linears and logits.shape == (3, 10)
    kernels = _flat(params)
    for path, rows in taps.items():
        n = 3 if path == "head/kernel" else 3 * 16 if path == "patch_embed/kernel" else 3 * 17
        assert rows.shape == (n, kernels[path].shape[0]), path
    np.testing.assert_array_equal(taps["patch_embed/kernel"], np.asarray(vit.patches(x)).reshape(48, 4))
    np.testing.assert_array_equal(taps["blocks/0/attn/query/kernel"], taps["blocks/0/attn/key/kernel"])
    # factored gradients (perturbations) need each Linear applied once: tracing them does not raise
    shapes = model.tap_shapes(params, x)
    assert shapes["blocks/1/fc1/kernel"].shape == (51, 24) and shapes["head/kernel"].shape == (3, 10)
    zeros = {k: jnp.zeros(s.shape, s.dtype) for k, s in shapes.items()}
    _, taps2 = jax.eval_shape(model.apply_with_taps, params, x, None, zeros)
    assert set(taps2) == linears


def test_multi_head_vit_has_a_stacked_untapped_head_chosen_by_task_id():
    vit = nnx.eval_shape(lambda: ViT((8, 8, 1), 2, num_heads=3, **TINY, rngs=nnx.Rngs(0)))
    model = clx.FunctionalModel.abstract(vit)
    params = nnx.to_pure_dict(nnx.state(vit, nnx.Param))
    assert params["head"]["kernel"].shape == (3, 16, 2) and model.takes_task_id
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    shapes = model.tap_shapes(params, x, task_id=1)
    assert "head/kernel" not in shapes and len(shapes) == 1 + 6 * TINY["depth"]
    assert jax.eval_shape(model.apply, params, x, 2).shape == (2, 2)
    with pytest.raises(ValueError, match=r"unknown task id 3: the model has 3 heads"):
        jax.eval_shape(lambda p, x: model.apply(p, x, 3), params, x)  # a concrete id


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(shape=(9, 8, 1)), r"not a whole number of 2x2 patches"),
        (dict(dim=15), r"dim=15 must be a multiple of attention_heads=2"),
        (dict(depth=0), r"ViT sizes must be >= 1"),
        (dict(init="he"), r"unknown init 'he'"),
    ],
)
def test_bad_sizes_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        tiny(**kw)


@pytest.mark.slow
def test_gpm_chain_trains_the_vit_through_fit_on_a_two_task_stream(digits):
    stream = data.make_stream(digits, "finetune", 2, seed=0, train_subset=64)
    model, params = clx.FunctionalModel.from_module(tiny(depth=1))
    rule = clx.chain(clx.gpm(0.97, num_samples=8), optax.sgd(0.05))
    r = clx.fit(model, params, rule, stream, epochs=1, batch_size=16, evidence_samples=8, progress=False)
    assert np.isfinite(r.losses).all() and np.isfinite(r.accuracy_matrix[np.tril_indices(2)]).all()
    assert all(np.isfinite(v).all() for v in jax.tree.leaves(r.params))
    is_gpm = lambda s: isinstance(s, clx.GPMState)  # noqa: E731
    gpm_state = next(s for s in jax.tree.leaves(r.rule_state, is_leaf=is_gpm) if is_gpm(s))
    dims = {k: s.basis.shape[0] for k, s in gpm_state.subspaces.items()}
    ranks = {k: int(s.mask.sum()) for k, s in gpm_state.subspaces.items()}
    assert len(dims) == 1 + 6 + 1  # every Linear's input space, head included
    assert dims["blocks/0/fc2/kernel"] == 24 and dims["patch_embed/kernel"] == 4 and dims["head/kernel"] == 16
    assert all(0 < ranks[k] <= dims[k] for k in dims), ranks  # both tasks' representations stored


# --------------------------------------------------------------------------- #
# weights: orbax and safetensors
# --------------------------------------------------------------------------- #


def test_orbax_round_trip_and_its_errors(tmp_path):
    vit = tiny(seed=0)
    _, params = clx.FunctionalModel.from_module(vit)
    path = clx.models.save_params(tmp_path / "p", params)
    loaded = clx.models.load_params(path, nnx.eval_shape(lambda: tiny(seed=1)))  # a model's structure is enough
    assert _flat(loaded).keys() == _flat(params).keys()
    for k, v in _flat(params).items():
        np.testing.assert_array_equal(_flat(loaded)[k], v, err_msg=k)
    with pytest.raises(ValueError, match=r"exists; pass overwrite=True"):
        clx.models.save_params(path, params)
    clx.models.save_params(path, params, overwrite=True)
    with pytest.raises(ValueError, match=r"shape mismatches: \['blocks/0/fc1/bias: checkpoint \(24,\), model \(8,\)"):
        clx.models.load_params(path, nnx.eval_shape(lambda: tiny(mlp_dim=8)))
    with pytest.raises(ValueError, match=r"params of the model not in the checkpoint: \['blocks/2/attn/key/bias'"):
        clx.models.load_params(path, nnx.eval_shape(lambda: tiny(depth=3)))
    with pytest.raises(FileNotFoundError, match=r"no checkpoint directory"):
        clx.models.load_params(tmp_path / "nothing", vit)


def _hf_tensors(params, prefix="vit."):
    """A ViTForImageClassification state dict written by hand from clx params: PyTorch names,
    (out, in) Linear weights, a (dim, c, p, p) Conv2d patch projection."""
    f = _flat(params)
    dim = f["cls_token"].shape[-1]
    k = f["patch_embed/kernel"]  # (p*p*c, dim), rows (row, column, channel)
    p = 2
    out = {
        f"{prefix}embeddings.patch_embeddings.projection.weight": k.reshape(p, p, -1, dim).transpose(3, 2, 0, 1),
        f"{prefix}embeddings.patch_embeddings.projection.bias": f["patch_embed/bias"],
        f"{prefix}embeddings.cls_token": f["cls_token"],
        f"{prefix}embeddings.position_embeddings": f["pos_embed"],
        f"{prefix}layernorm.weight": f["norm/scale"],
        f"{prefix}layernorm.bias": f["norm/bias"],
        "classifier.weight": f["head/kernel"].T,
        "classifier.bias": f["head/bias"],
    }
    for i in range(TINY["depth"]):
        t, b = f"{prefix}encoder.layer.{i}", f"blocks/{i}"
        lin = {
            "attention.attention.query": "attn/query",
            "attention.attention.key": "attn/key",
            "attention.attention.value": "attn/value",
            "attention.output.dense": "attn/out",
            "intermediate.dense": "fc1",
            "output.dense": "fc2",
        }
        for torch_name, path in lin.items():
            out[f"{t}.{torch_name}.weight"] = f[f"{b}/{path}/kernel"].T
            out[f"{t}.{torch_name}.bias"] = f[f"{b}/{path}/bias"]
        for torch_name, path in (("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
            out[f"{t}.{torch_name}.weight"] = f[f"{b}/{path}/scale"]
            out[f"{t}.{torch_name}.bias"] = f[f"{b}/{path}/bias"]
    return {n: np.ascontiguousarray(a) for n, a in out.items()}


def _hf_vit_numpy(t, x, prefix="vit.", heads=2, p=2, eps=1e-6):
    """Hugging Face's ViTForImageClassification forward (modeling_vit.py) in numpy, on its own tensors."""
    from scipy.special import erf

    def ln(h, name):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]

    def linear(h, name):
        return h @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    xc = x.transpose(0, 3, 1, 2).astype(np.float64)  # NCHW
    b, c, hh, ww = xc.shape
    w = t[f"{prefix}embeddings.patch_embeddings.projection.weight"]  # (dim, c, p, p): Conv2d, stride p
    dim = w.shape[0]
    cells = xc.reshape(b, c, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    emb = cells @ w.reshape(dim, -1).T + t[f"{prefix}embeddings.patch_embeddings.projection.bias"]
    cls = np.broadcast_to(t[f"{prefix}embeddings.cls_token"], (b, 1, dim))
    h = np.concatenate([cls, emb], 1) + t[f"{prefix}embeddings.position_embeddings"]
    n, hd = h.shape[1], dim // heads
    for i in range(TINY["depth"]):
        L = f"{prefix}encoder.layer.{i}"
        a = ln(h, f"{L}.layernorm_before")
        q, k, v = (
            linear(a, f"{L}.attention.attention.{m}").reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
            for m in ("query", "key", "value")
        )
        s = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, n, dim)
        h = linear(ctx, f"{L}.attention.output.dense") + h
        m = linear(ln(h, f"{L}.layernorm_after"), f"{L}.intermediate.dense")
        h = linear(0.5 * m * (1 + erf(m / np.sqrt(2))), f"{L}.output.dense") + h
    return linear(ln(h, f"{prefix}layernorm")[:, 0], "classifier")


def test_safetensors_with_hugging_face_names_loads_to_the_same_logits(tmp_path):
    from safetensors.numpy import save_file

    vit = tiny(seed=0, shape=(8, 8, 3))
    model, params = clx.FunctionalModel.from_module(vit)
    tensors = _hf_tensors(params)
    # the (dim, c, p, p) weight is a PyTorch Conv2d's: as a stride-p convolution of the NCHW
    # image it gives the ViT's patch embedding, token (i, j) at i * (W/p) + j
    x = np.random.default_rng(2).standard_normal((2, 8, 8, 3)).astype(np.float32)
    w = tensors["vit.embeddings.patch_embeddings.projection.weight"]
    conv = jax.lax.conv_general_dilated(
        x.transpose(0, 3, 1, 2), w, (2, 2), "VALID", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )
    emb = np.asarray(conv).reshape(2, 16, 16).transpose(0, 2, 1)  # (b, dim, 4*4) -> (b, tokens, dim)
    np.testing.assert_allclose(emb, np.asarray(vit.patches(x)) @ np.asarray(params["patch_embed"]["kernel"]), atol=1e-5)

    tensors["vit.pooler.dense.weight"] = np.zeros((16, 16), np.float32)  # a ViTModel's pooler, skipped
    save_file(tensors, str(tmp_path / "model.safetensors"))
    fresh = nnx.eval_shape(lambda: tiny(seed=7, shape=(8, 8, 3)))  # every param comes from the file
    loaded = clx.models.from_safetensors(
        tmp_path / "model.safetensors", fresh, clx.models.hf_vit_name_map(fresh, prefix="vit."), ignore=("vit.pooler.",)
    )
    for k, v in _flat(params).items():
        np.testing.assert_array_equal(_flat(loaded)[k], v, err_msg=k)
    logits = jax.jit(model.apply)(loaded, x)
    np.testing.assert_array_equal(logits, jax.jit(model.apply)(params, x))
    # and they are the logits of Hugging Face's ViT forward on the file's tensors
    np.testing.assert_allclose(logits, _hf_vit_numpy(tensors, x), rtol=1e-4, atol=1e-5)


def test_safetensors_errors_list_missing_unused_and_misshapen_names(tmp_path):
    from safetensors.numpy import save_file

    vit = tiny()
    _, params = clx.FunctionalModel.from_module(vit)
    tensors = _hf_tensors(params, prefix="")
    del tensors["encoder.layer.1.output.dense.bias"]
    tensors["encoder.layer.0.extra.weight"] = np.zeros(3, np.float32)
    tensors["embeddings.position_embeddings"] = np.zeros((1, 5, 16), np.float32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as e:
        clx.models.from_safetensors(tmp_path / "bad.safetensors", vit)
    msg = str(e.value)
    assert "params of the model not in the file (pass keep=... to keep the model's own): ['blocks/1/fc2/bias'" in msg
    assert (
        "tensors of the file not in the name map (pass ignore=... to skip them): ['encoder.layer.0.extra.weight']"
        in msg
    )
    assert "embeddings.position_embeddings -> pos_embed: file (1, 5, 16) -> (1, 5, 16), model (1, 17, 16)" in msg
    # a backbone-only file (a ViTModel's) into a model with a new head: keep=("head",)
    good = _hf_tensors(params, prefix="")
    del good["classifier.weight"], good["classifier.bias"]
    save_file(good, str(tmp_path / "backbone.safetensors"))
    fresh = tiny(seed=3)
    loaded = clx.models.from_safetensors(tmp_path / "backbone.safetensors", fresh, keep=("head",))
    np.testing.assert_array_equal(
        loaded["head"]["kernel"], nnx.to_pure_dict(nnx.state(fresh, nnx.Param))["head"]["kernel"]
    )
    np.testing.assert_array_equal(loaded["blocks"][1]["fc2"]["kernel"], params["blocks"][1]["fc2"]["kernel"])
    with pytest.raises(FileNotFoundError, match="no file"):
        clx.models.from_safetensors(tmp_path / "none.safetensors", vit)


# --------------------------------------------------------------------------- #
# the finetune stream
# --------------------------------------------------------------------------- #


def test_finetune_stream_tasks_apply_their_change_and_keep_the_labels(digits):
    from scipy import ndimage

    stream = data.make_stream(digits, "finetune", 7, seed=0)
    assert (stream.scenario, stream.num_outputs, stream.num_heads) == ("domain_il", 10, 1)
    assert data.FINETUNE_CHANGES == ("rotated90", "mirrored", "inverted", "noisy", "blurred", "shrunk", "permuted")
    x, y = digits.x_test, digits.y_test
    lo, hi = float(digits.x_train.min()), float(digits.x_train.max())
    xs = [stream.test_set(t)[0] for t in range(7)]
    for t in range(7):
        yt = stream.task(t).y_test
        np.testing.assert_array_equal(yt, y)  # labels unchanged, in range
        assert yt.min() >= 0 and yt.max() < stream.num_outputs
        assert not np.array_equal(xs[t], x)  # no task is the source's domain
        for u in range(t):
            assert not np.allclose(xs[t], xs[u]), (t, u)
    np.testing.assert_array_equal(xs[0], np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_array_equal(xs[1], x[:, :, ::-1])
    np.testing.assert_allclose(xs[2], lo + hi - x, atol=1e-6)
    noise = xs[3] - x
    assert xs[3].min() >= lo and xs[3].max() <= hi and 0.1 < np.abs(noise).mean() < 0.4
    np.testing.assert_array_equal(data.make_stream(digits, "finetune", 4, seed=0).test_set(3)[0], xs[3])  # seeded
    assert not np.array_equal(data.make_stream(digits, "finetune", 4, seed=1).test_set(3)[0], xs[3])
    np.testing.assert_allclose(xs[4], ndimage.gaussian_filter(x, (0, 2, 2, 0), mode="constant", cval=lo), atol=1e-6)
    assert xs[4].std() < x.std()
    # shrunk: 8x8 -> the middle 4x4 (output 2..5 reads input 0.5..6.5), the outer 2 pixels background
    assert (xs[5][:, :2] == lo).all() and (xs[5][:, -2:] == lo).all() and (xs[5][:, :, :2] == lo).all()
    assert (xs[5][:, :, -2:] == lo).all()
    np.testing.assert_allclose(xs[5][:, 2, 2], (x[:, 0, 0] + x[:, 0, 1] + x[:, 1, 0] + x[:, 1, 1]) / 4, atol=1e-6)
    np.testing.assert_allclose(xs[5][:, 4, 3], (x[:, 4, 2] + x[:, 4, 3] + x[:, 5, 2] + x[:, 5, 3]) / 4, atol=1e-6)
    flat = xs[6].reshape(len(x), -1)
    np.testing.assert_array_equal(np.sort(flat, 1), np.sort(x.reshape(len(x), -1), 1))  # values of each image permuted
    with pytest.raises(ValueError, match=r"'finetune' has 7 kinds of task .* use num_tasks <= 7"):
        data.make_stream(digits, "finetune", 8)


# --------------------------------------------------------------------------- #
# the pretraining script
# --------------------------------------------------------------------------- #


@pytest.mark.slow
def test_pretrain_script_saves_params_that_load_back_to_its_accuracy(tmp_path, digits):
    from experiments import pretrain_vit

    work = str(tmp_path / "w")
    argv = ["--workdir", work, "--source", "digits", "--steps", "6", "--chunk", "6", "--batch-size", "32"]
    argv += ["--dim", "16", "--depth", "1", "--heads", "2", "--mlp-dim", "24"]
    info = pretrain_vit.main(argv)
    with open(os.path.join(work, "vit.json")) as f:
        assert json.load(f) == info
    assert info["model"]["patch_size"] == 2 and info["steps"] == 6
    model, params, info2 = pretrain_vit.load_pretrained(work)
    pred = np.argmax(np.asarray(model.apply(params, jnp.asarray(digits.x_test))), -1)
    assert np.mean(pred == digits.y_test) == pytest.approx(info["test_accuracy"], abs=1e-9)
    with pytest.raises(ValueError, match="already holds params/"):
        pretrain_vit.main(argv)


# --------------------------------------------------------------------------- #
# CLIP's vision tower (Hugging Face CLIPVisionModelWithProjection names)
# --------------------------------------------------------------------------- #

CLIP_TINY = dict(
    patch_size=4,
    dim=8,
    depth=2,
    attention_heads=2,
    mlp_dim=16,
    pre_norm=True,
    activation="quick_gelu",
    patch_bias=False,
    projection_dim=6,
    layer_norm_eps=1e-5,
)  # 8x8x3 images: 4 patches, 5 tokens


def _clip_tensors(seed=0, dim=8, depth=2, p=4, c=3, n=4, mlp=16, proj=6):
    """A random CLIPModel-shaped state dict (vision tower, projection, a stand-in text tower), PyTorch layout."""
    rng = np.random.default_rng(seed)
    r = lambda *s: rng.standard_normal(s).astype(np.float32) * 0.5  # noqa: E731
    v = "vision_model."
    t = {
        f"{v}embeddings.patch_embedding.weight": r(dim, c, p, p),
        f"{v}embeddings.class_embedding": r(dim),
        f"{v}embeddings.position_embedding.weight": r(n + 1, dim),
        "visual_projection.weight": r(proj, dim),
        "text_model.embeddings.token_embedding.weight": r(5, dim),
        "text_projection.weight": r(proj, dim),
        "logit_scale": np.array(2.6592, np.float32),
    }
    for name in ("pre_layrnorm", "post_layernorm"):
        t[f"{v}{name}.weight"], t[f"{v}{name}.bias"] = 1 + r(dim), r(dim)
    for i in range(depth):
        L = f"{v}encoder.layers.{i}."
        for name in ("layer_norm1", "layer_norm2"):
            t[f"{L}{name}.weight"], t[f"{L}{name}.bias"] = 1 + r(dim), r(dim)
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{L}self_attn.{name}.weight"], t[f"{L}self_attn.{name}.bias"] = r(dim, dim), r(dim)
        t[f"{L}mlp.fc1.weight"], t[f"{L}mlp.fc1.bias"] = r(mlp, dim), r(mlp)
        t[f"{L}mlp.fc2.weight"], t[f"{L}mlp.fc2.bias"] = r(dim, mlp), r(dim)
    return t


def _clip_image_embeds_numpy(t, x, heads=2, p=4, depth=2, eps=1e-5):
    """CLIPVisionModelWithProjection's image_embeds (transformers modeling_clip.py) in float64 numpy:
    CLIPVisionEmbeddings (bias-free stride-p conv, class_embedding first, position_embedding added),
    pre_layrnorm, CLIPEncoderLayers (layer_norm1, self_attn scaled head_dim**-0.5, residual, layer_norm2,
    fc1, quick_gelu x*sigmoid(1.702x), fc2, residual), post_layernorm on token 0, visual_projection."""
    t = {k: np.asarray(a, np.float64) for k, a in t.items()}
    v = "vision_model."

    def ln(h, name):
        mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
        return (h - mu) / np.sqrt(var + eps) * t[f"{name}.weight"] + t[f"{name}.bias"]

    def linear(h, name):
        return h @ t[f"{name}.weight"].T + t[f"{name}.bias"]

    xc = x.transpose(0, 3, 1, 2).astype(np.float64)  # pixel_values, NCHW
    b, c, hh, ww = xc.shape
    w = t[f"{v}embeddings.patch_embedding.weight"]
    dim = w.shape[0]
    # Conv2d(kernel p, stride p, bias=False) then flatten(2).transpose(1, 2): the grid row-major
    emb = np.einsum("bchpwq,dcpq->bhwd", xc.reshape(b, c, hh // p, p, ww // p, p), w).reshape(b, -1, dim)
    cls = np.broadcast_to(t[f"{v}embeddings.class_embedding"], (b, 1, dim))
    h = np.concatenate([cls, emb], 1) + t[f"{v}embeddings.position_embedding.weight"]
    h = ln(h, f"{v}pre_layrnorm")
    n, hd = h.shape[1], dim // heads
    for i in range(depth):
        L = f"{v}encoder.layers.{i}"
        a = ln(h, f"{L}.layer_norm1")
        q, k, vv = (
            linear(a, f"{L}.self_attn.{m}").reshape(b, n, heads, hd).transpose(0, 2, 1, 3)
            for m in ("q_proj", "k_proj", "v_proj")
        )
        s = q @ k.transpose(0, 1, 3, 2) * hd**-0.5
        s = np.exp(s - s.max(-1, keepdims=True))
        ctx = ((s / s.sum(-1, keepdims=True)) @ vv).transpose(0, 2, 1, 3).reshape(b, n, dim)
        h = h + linear(ctx, f"{L}.self_attn.out_proj")
        m = linear(ln(h, f"{L}.layer_norm2"), f"{L}.mlp.fc1")
        h = h + linear(m / (1 + np.exp(-1.702 * m)), f"{L}.mlp.fc2")
    pooled = ln(h[:, 0], f"{v}post_layernorm")
    return pooled @ t["visual_projection.weight"].T


def test_clip_vision_safetensors_load_to_the_transformers_forward(tmp_path):
    from safetensors.numpy import save_file

    tensors = _clip_tensors()
    save_file(tensors, str(tmp_path / "clip.safetensors"))
    vit = ViT((8, 8, 3), 3, **CLIP_TINY, rngs=nnx.Rngs(0))
    model, own = clx.FunctionalModel.from_module(vit)
    params = clx.models.from_safetensors(
        tmp_path / "clip.safetensors",
        vit,
        clx.models.clip_vision_name_map(vit),
        ignore=clx.models.CLIP_NON_VISION,
        keep=("head",),  # CLIP has no classifier: the ViT's own head stays
    )
    f = _flat(params)
    np.testing.assert_array_equal(f["cls_token"], tensors["vision_model.embeddings.class_embedding"][None, None])
    np.testing.assert_array_equal(f["proj/kernel"], tensors["visual_projection.weight"].T)
    np.testing.assert_array_equal(f["head/kernel"], _flat(own)["head/kernel"])
    assert "patch_embed/bias" not in f and f["pre_norm/scale"].shape == (8,)
    x = np.random.default_rng(1).standard_normal((3, 8, 8, 3)).astype(np.float32)
    embeds = _clip_image_embeds_numpy(tensors, x)  # (3, 6)
    want = embeds @ f["head/kernel"].astype(np.float64) + f["head/bias"]
    np.testing.assert_allclose(jax.jit(model.apply)(params, x), want, rtol=1e-5, atol=1e-5)


def test_clip_vision_errors_list_missing_and_unexpected_names(tmp_path):
    from safetensors.numpy import save_file

    tensors = _clip_tensors()
    del tensors["vision_model.encoder.layers.1.mlp.fc2.bias"]
    tensors["vision_model.encoder.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    vit = nnx.eval_shape(lambda: ViT((8, 8, 3), 3, **CLIP_TINY, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError) as e:  # the text tower not ignored, a bias missing, a stray tensor
        clx.models.from_safetensors(tmp_path / "bad.safetensors", vit, clx.models.clip_vision_name_map(vit))
    msg = str(e.value)
    assert "params of the model not in the file (pass keep=... to keep the model's own): ['blocks/1/fc2/bias'" in msg
    assert "'head/bias', 'head/kernel']" in msg
    assert (
        "tensors of the file not in the name map (pass ignore=... to skip them): ['logit_scale', "
        "'text_model.embeddings.token_embedding.weight', 'text_projection.weight', "
        "'vision_model.encoder.layers.0.extra.weight']" in msg
    )
    # a default ViT (no pre_norm, no projection) is not CLIP's shape: the map entries it lacks are named
    plain = nnx.eval_shape(
        lambda: ViT((8, 8, 3), 3, **{**CLIP_TINY, "pre_norm": False, "projection_dim": None}, rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError, match=r"map entries for params the model lacks: \['vision_model.pre_layrnorm"):
        clx.models.from_safetensors(
            tmp_path / "bad.safetensors",
            plain,
            clx.models.clip_vision_name_map(plain),
            ignore=clx.models.CLIP_NON_VISION,
            keep=("head",),
        )


def test_default_vit_param_paths_are_unchanged_and_clip_options_add_only_theirs():
    def shapes(vit):
        leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(vit, nnx.Param)))[0]
        return {clx.tree.path_str(p): tuple(v.shape) for p, v in leaves}

    base = shapes(nnx.eval_shape(lambda: tiny()))
    want = {"patch_embed/kernel": (4, 16), "patch_embed/bias": (16,), "cls_token": (1, 1, 16)}
    want |= {"pos_embed": (1, 17, 16), "norm/scale": (16,), "norm/bias": (16,)}
    want |= {"head/kernel": (16, 10), "head/bias": (10,)}
    for i in range(2):
        for ln in ("norm1", "norm2"):
            want |= {f"blocks/{i}/{ln}/scale": (16,), f"blocks/{i}/{ln}/bias": (16,)}
        for lin, shape in (("attn/query", (16, 16)), ("attn/key", (16, 16)), ("attn/value", (16, 16)),
                           ("attn/out", (16, 16)), ("fc1", (16, 24)), ("fc2", (24, 16))):  # fmt: skip
            want |= {f"blocks/{i}/{lin}/kernel": shape, f"blocks/{i}/{lin}/bias": (shape[1],)}
    assert base == want
    # the same draws for the same seed: a default ViT's params are today's, whatever the new options' defaults
    a = _flat(nnx.to_pure_dict(nnx.state(tiny(seed=4), nnx.Param)))
    b = _flat(nnx.to_pure_dict(nnx.state(tiny(seed=4, pre_norm=False, activation="gelu", projection_dim=None))))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    clip = shapes(nnx.eval_shape(lambda: tiny(pre_norm=True, patch_bias=False, projection_dim=5)))
    added = {"pre_norm/scale": (16,), "pre_norm/bias": (16,), "proj/kernel": (16, 5), "head/kernel": (5, 10)}
    assert clip == {**{k: s for k, s in want.items() if k != "patch_embed/bias"}, **added}
    # a ViT's name map leaves out exactly the biases the model lacks
    m = clx.models.hf_vit_name_map(nnx.eval_shape(lambda: tiny(patch_bias=False)))
    assert "embeddings.patch_embeddings.projection.bias" not in m and "encoder.layer.0.output.dense.bias" in m
    with pytest.raises(ValueError, match=r"unknown activation 'relu'"):
        tiny(activation="relu")
    with pytest.raises(ValueError, match=r"projection_dim must be a positive int"):
        tiny(projection_dim=0)
