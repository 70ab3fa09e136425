"""The experiment script: bad input fails early and loses nothing; a run writes the results."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from experiments import methods
from experiments.configs import pmnist_gpm
from experiments.configs.base import SHARED_MNIST
from experiments.main import run

import _cl_tiny  # tests/ is on sys.path under pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
    return _cl_tiny.digits_config("gpm,finetune")


@pytest.fixture
def workdir_with_old_results(tmp_path):
    sentinel = tmp_path / "results.json"
    sentinel.write_text('{"old": true}')
    return tmp_path, sentinel



@pytest.mark.parametrize("key,value,match", [
    ("method", "gpm,nosuchmethod", "unknown method"),
    ("method", "", "config.method is empty"),
    ("stream.kind", "shuffled", "unknown stream.kind"),
    ("data.source", "no_such_dataset_xyz", "no_such_dataset_xyz"),
    ("gpm.threshold", (0.9, 1.5, 0.9), "threshold must be in"),
    ("gpm.threshold", (0.9, 0.9), "2 thresholds given for 3 projected layers"),
    ("train.optimizer", "rmsprop", "unknown train.optimizer"),
])
def test_bad_config_raises_before_writing(workdir_with_old_results, key, value, match):
    workdir, sentinel = workdir_with_old_results
    c = _tiny()
    section, _, name = key.rpartition(".")
    target = c[section] if section else c
    with c.unlocked():
        target[name] = value
    with pytest.raises(ValueError, match=match):
        run(c, str(workdir))
    assert sentinel.read_text() == '{"old": true}'
    assert sorted(os.listdir(workdir)) == ["results.json"]


def test_bad_hnet_layout_raises_before_any_method_runs(workdir_with_old_results):
    workdir, sentinel = workdir_with_old_results
    c = _cl_tiny.digits_config("gpm,hnet")  # gpm would run first and write its results
    c.hnet = methods.hnet_config()
    c.hnet.layout = "jax"
    with pytest.raises(ValueError, match="hnet.layout must be one of"):
        run(c, str(workdir))
    assert sentinel.read_text() == '{"old": true}'
    assert sorted(os.listdir(workdir)) == ["results.json"]


def test_mnist_dir_missing_or_corrupt(tmp_path, workdir_with_old_results):
    workdir, sentinel = workdir_with_old_results
    c = pmnist_gpm.get_config()
    c.data.dir = str(tmp_path / "empty")
    os.makedirs(c.data.dir)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        run(c, str(workdir))
    if not os.path.isdir(SHARED_MNIST):
        pytest.skip("no ../shared/data/mnist")
    bad = tmp_path / "bad"
    shutil.copytree(SHARED_MNIST, bad)
    os.remove(bad / "SHA256SUMS")
    with gzip.open(bad / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x01" + (10000).to_bytes(4, "big") + b"\x01" * 100)  # too short
    c.data.dir = str(bad)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        run(c, str(workdir))
    assert sentinel.read_text() == '{"old": true}'


def test_labels_beyond_model_outputs_raise():
    import optax
    from flax import nnx

    import clx
    from clx import data
    from clx.train import fit

    stream = data.make_stream(data.load_source("digits"), "split_class_il", 2, seed=0)  # 10 outputs needed
    model, params = clx.FunctionalModel.from_module(clx.MLP(64, (8,), 5, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="5 outputs per head but the stream needs 10"):
        fit(model, params, clx.chain(optax.sgd(0.1)), stream, epochs=1, batch_size=10, progress=False)


def test_method_registry_names():
    assert methods.parse(" GPM , finetune") == ["gpm", "finetune"]
    with pytest.raises(ValueError, match="names a method twice"):
        methods.parse("gpm,gpm")


def _cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "experiments.main", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_cli_runs_and_rejects_unknown_config_key(tmp_path):
    workdir = tmp_path / "run"
    config = "experiments/configs/digits_default.py"
    proc = _cli(f"--config={config}", f"--workdir={workdir}", "--config.method=gpm,finetune",
                "--config.stream.num_tasks=2", "--config.train.epochs=1", "--config.progress=False")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("gpm", "finetune"):
        res = json.load(open(workdir / method / "results.json"))
        for key in ("accuracy_matrix", "acc", "bwt", "fwt", "forgetting", "learning_accuracy", "wall_seconds", "config"):
            assert key in res
        R = np.array(res["accuracy_matrix"], dtype=float)
        assert R.shape == (2, 2) and np.isfinite(np.diag(R)).all()
        assert abs(res["acc"] - R[-1].mean()) < 1e-9
        assert res["config"]["stream"]["num_tasks"] == 2
        assert (workdir / method / "accuracy_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    before = (workdir / "gpm" / "results.json").read_bytes()
    proc = _cli(f"--config={config}", f"--workdir={workdir}", "--config.train.no_such_key=3")
    assert proc.returncode != 0
    assert "no_such_key" in proc.stderr
    assert (workdir / "gpm" / "results.json").read_bytes() == before


def test_pmnist_hnet_has_the_authors_settings():
    """hypercl's _set_default_permuted, including the PyTorch layout of the generated vector."""
    from experiments.configs import pmnist_hnet

    c = pmnist_hnet.get_config()
    h = c.hnet
    assert (c.data.scale, c.data.pad, c.model.hidden, c.train.lr, c.train.batch_size) == ("unit", 2, (1000, 1000), 1e-4, 128)
    assert (h.type, h.emb_dim, h.chunk_emb_dim, h.chunk_dim, h.hidden, h.activation) == ("chunked", 24, 8, 78000, (25, 25), "elu")
    assert (h.beta, h.lookahead, h.layout, h.per_task_heads) == (0.1, True, "torch", True)
    assert c.train.epochs * -(-60000 // c.train.batch_size) >= 5000  # at least the authors' 5,000 iterations


def test_hnet_through_the_script(tmp_path):
    """The hnet rule is built from the model build_model returns (MethodSpec.rule_from_model), single and members."""
    c = _tiny()
    c.method = "hnet"
    c.hnet = methods.hnet_config()
    c.hnet.chunk_dim = 2000
    c.hnet.hidden = (16,)
    c.train.optimizer, c.train.lr = "adam", 1e-3
    c.train.epochs = 3
    c.model.hidden = (32,)
    r = run(c, str(tmp_path / "one"))["hnet"]
    assert r["acc"] > 0.5 and r["bwt"] > -0.05  # chance is 0.1; old tasks kept by the regularizer
    assert r["hnet_params"] / r["target_params"] == pytest.approx(r["compression_ratio"])
    c.seeds = (0, 1)
    run(c, str(tmp_path / "two"))
    summary = json.load(open(tmp_path / "two" / "members_summary.json"))
    assert summary["members"] == 2
