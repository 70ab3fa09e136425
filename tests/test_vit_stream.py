"""The ViT in the experiment script (config.model.kind = "vit", config.model.pretrained) and the vit_stream config:
a tiny ViT saved here as experiments.pretrain_vit does is every member's start, a wrong or missing pretrained
directory fails before the workdir is touched, and GPM's layer globs pick the attention projections."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clx
from clx import data
from experiments import methods
from experiments.configs import vit_stream
from experiments.main import run  # experiments.run.run, as the script calls it
from experiments.methods._registry import build_classifier
from experiments.pretrain_vit import INFO_FILE, PARAMS_DIR, build, load_pretrained

# The digits variant's ViT (patch 2 on 8x8: 16 patches + the class token), as pretrain_vit writes its arguments.
TINY = {
    "input_shape": [8, 8, 1],
    "num_outputs": 10,
    "patch_size": 2,
    "dim": 16,
    "depth": 1,
    "attention_heads": 2,
    "mlp_dim": 32,
}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A workdir laid out as experiments.pretrain_vit writes it (params/ and vit.json) holding a ViT of seed 7 (the
    weights need not be trained: the tests check that they are the start, not what they know)."""
    workdir = tmp_path_factory.mktemp("vit_pretrain")
    clx.models.save_params(workdir / PARAMS_DIR, build(TINY, seed=7))
    (workdir / INFO_FILE).write_text(json.dumps({"model": TINY, "source": "digits"}))
    return str(workdir)


def _config(method="finetune", pretrained_dir=""):
    c = vit_stream.get_config("digits")
    c.method = method
    c.progress = False
    c.checkpoint.enabled = False
    c.stream.num_tasks = 2
    c.stream.train_subset = 160
    c.train.epochs = 1
    c.model.pretrained = pretrained_dir
    return c


def _leaves_equal(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_the_configs_describe_the_pretrained_vit():
    c = vit_stream.get_config()
    assert (c.model.kind, c.stream.kind, c.stream.num_tasks, c.data.source) == ("vit", "finetune", 7, "mnist")
    assert (c.model.patch_size, c.model.dim, c.model.depth, c.model.heads, c.model.mlp_dim) == (0, 64, 4, 4, 128)
    assert (c.train.optimizer, c.train.lr) == ("adam", 1e-3)
    assert c.gpm.layers == vit_stream.ATTENTION and c.gpm.threshold == 0.97
    assert c.method == "finetune,gpm,joint,svd_split" and c.svd_split.layers == vit_stream.SPLIT
    with pytest.raises(ValueError, match="unknown vit_stream variant"):
        vit_stream.get_config("cifar")


def test_every_seed_starts_from_the_pretrained_params(pretrained):
    _, saved, info = load_pretrained(pretrained)
    assert info["model"]["patch_size"] == 2 and info["model"]["dim"] == 16
    c = _config(pretrained_dir=pretrained)
    stream = data.make_stream(data.load_source("digits"), "finetune", 2, seed=0, train_subset=160)
    model, p0 = build_classifier(c, stream, seed=0)
    _, p3 = build_classifier(c, stream, seed=3)
    assert _leaves_equal(p0, saved) and _leaves_equal(p3, saved)
    assert jax.tree.leaves(p0)[0] is not jax.tree.leaves(p3)[0]  # fresh arrays: fit donates its params
    c.model.pretrained = ""
    _, r0 = build_classifier(c, stream, seed=0)
    _, r3 = build_classifier(c, stream, seed=3)
    assert not _leaves_equal(r0, saved) and not _leaves_equal(r0, r3)  # without it: a random start per seed
    assert jax.tree.structure(r0) == jax.tree.structure(p0)


def test_the_script_runs_svd_split_on_the_pretrained_vit(pretrained, tmp_path):
    c = _config("svd_split", pretrained_dir=pretrained)
    r = run(c, str(tmp_path))["svd_split"]
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert np.asarray(saved["accuracy_matrix"]).shape == (2, 2) and np.isfinite(saved["acc"])
    # FWT's baseline is the accuracy of the untrained params: here the pretrained model's on each task
    model, params, _ = load_pretrained(pretrained)
    stream = data.make_stream(data.load_source("digits"), "finetune", 2, seed=c.seed, train_subset=160)
    for t in range(2):
        task = stream.task(t)
        logits = model.apply(params, jnp.asarray(task.x_test))
        acc = float(np.mean(np.argmax(np.asarray(logits), -1) == task.y_test))
        assert r["random_baseline"][t] == pytest.approx(acc, abs=1e-6)
    # SVD-split's ranks after the 2 tasks (what task 2 would freeze): floor(max(d, m) x 0.07 x 3), the 16x16
    # attention matrices and the 16x32 / 32x16 MLP of the one block; patch embedding and head not split
    assert r["svd_split_frozen_ranks"] == {
        **{f"blocks/0/attn/{n}/kernel": 3 for n in ("key", "out", "query", "value")},
        "blocks/0/fc1/kernel": 6,
        "blocks/0/fc2/kernel": 6,
    }


def test_gpm_projects_the_attention_projections_only():
    c = _config("gpm")
    c.model.depth = 2
    stream = data.make_stream(data.load_source("digits"), "finetune", 2, seed=0, train_subset=16)
    model, params = build_classifier(c, stream, seed=0)
    state = methods.get("gpm").make_rule(c, model).init(params)
    gpm = next(s for s in state if isinstance(s, clx.GPMState))
    names = ("key", "out", "query", "value")
    assert set(gpm.projectors) == {f"blocks/{i}/attn/{n}/kernel" for i in range(2) for n in names}


def test_a_layer_glob_that_matches_nothing_raises(workdir_with_old_results):
    workdir, sentinel = workdir_with_old_results
    c = _config("gpm")
    c.gpm.layers = "blocks/*/attn/*/kernel,blocks/*/mlp/kernel"
    with pytest.raises(ValueError, match=r"\['blocks/\*/mlp/kernel'\] match no 2-D/4-D kernel"):
        run(c, str(workdir))
    assert sentinel.read_text() == '{"old": true}'


def test_a_missing_pretrained_directory_raises_before_the_workdir_is_touched(tmp_path):
    workdir = tmp_path / "new_workdir"
    c = _config(pretrained_dir=str(tmp_path / "no_such_dir"))
    with pytest.raises(FileNotFoundError, match="no vit.json in .*no_such_dir.*experiments.pretrain_vit"):
        run(c, str(workdir))
    assert not workdir.exists()


def test_a_pretrained_vit_of_other_sizes_names_the_fields(pretrained, workdir_with_old_results):
    workdir, sentinel = workdir_with_old_results
    c = _config(pretrained_dir=pretrained)
    c.model.dim = 32
    c.model.mlp_dim = 64
    with pytest.raises(ValueError, match=r"dim: config 32 \(model.dim\), pretrained 16; mlp_dim: config 64"):
        run(c, str(workdir))
    c = _config(pretrained_dir=pretrained)
    c.model.kind = "mlp"
    with pytest.raises(ValueError, match="config.model.kind is 'mlp'"):
        run(c, str(workdir))
    assert sorted(os.listdir(workdir)) == ["results.json"] and sentinel.read_text() == '{"old": true}'


def test_the_head_of_a_task_il_stream_does_not_fit_a_shared_head(pretrained, workdir_with_old_results):
    workdir, _ = workdir_with_old_results
    c = _config(pretrained_dir=pretrained)
    c.stream.kind = "split_task_il"
    c.stream.num_tasks = 5
    with pytest.raises(ValueError, match="num_outputs: config 2 .*pretrained 10.*num_heads: config 5"):
        run(c, str(workdir))


def test_the_vit_builds_without_a_pretrained_directory_for_every_patch_rule():
    c = _config()
    stream = data.make_stream(data.load_source("digits"), "finetune", 2, seed=0, train_subset=16)
    c.model.patch_size = 0  # H // 4 = 2 on 8x8
    model, params = build_classifier(c, stream, seed=0)
    assert params["patch_embed"]["kernel"].shape == (4, 16)
    assert isinstance(model, clx.FunctionalModel)
