"""The experiment script: bad input fails early and loses nothing; a run writes the results."""

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

import _cl_tiny  # tests/ is on sys.path under pytest
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import clx
from experiments import methods
from experiments.configs import pmnist_gpm
from experiments.configs.base import SHARED_MNIST
from experiments.run import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny():
    return _cl_tiny.digits_config("gpm,finetune")


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("method", "gpm,nosuchmethod", "unknown method"),
        ("method", "", "config.method is empty"),
        ("stream.kind", "shuffled", "unknown stream.kind"),
        ("data.source", "no_such_dataset_xyz", "no_such_dataset_xyz"),
        ("gpm.threshold", (0.9, 1.5, 0.9), "threshold must be in"),
        ("gpm.threshold", (0.9, 0.9), "2 thresholds given for 3 projected layers"),
        ("train.optimizer", "rmsprop", "unknown train.optimizer"),
        ("train.seen_classes_only", True, "config.train.seen_classes_only .* needs a class-IL stream"),
        ("train.member_axis", "pmap", "config.train.member_axis must be one of"),
    ],
)
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
    c.hnet = methods.get("hnet").config()
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
    return subprocess.run(
        [sys.executable, "-m", "experiments.main", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_cli_runs_and_rejects_unknown_config_key(tmp_path):
    workdir = tmp_path / "run"
    config = "experiments/configs/digits_default.py"
    proc = _cli(
        f"--config={config}",
        f"--workdir={workdir}",
        "--config.method=gpm,finetune",
        "--config.stream.num_tasks=2",
        "--config.train.epochs=1",
        "--config.progress=False",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for method in ("gpm", "finetune"):
        res = json.load(open(workdir / method / "results.json"))
        for key in (
            "accuracy_matrix",
            "acc",
            "bwt",
            "fwt",
            "forgetting",
            "learning_accuracy",
            "wall_seconds",
            "config",
        ):
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
    assert (c.data.scale, c.data.pad, c.model.hidden, c.train.lr, c.train.batch_size) == (
        "unit",
        2,
        (1000, 1000),
        1e-4,
        128,
    )
    assert (h.type, h.emb_dim, h.chunk_emb_dim, h.chunk_dim, h.hidden, h.activation) == (
        "chunked",
        24,
        8,
        78000,
        (25, 25),
        "elu",
    )
    assert (h.beta, h.lookahead, h.layout, h.per_task_heads) == (0.1, True, "torch", True)
    assert c.train.epochs * -(-60000 // c.train.batch_size) >= 5000  # at least the authors' 5,000 iterations


def test_hnet_in_domain_il_needs_task_ids_at_test(workdir_with_old_results):
    """A method that needs task labels (hnet) in a scenario without them (permuted: domain-IL) is refused first."""
    tmp_path, sentinel = workdir_with_old_results
    c = _cl_tiny.digits_config("gpm,hnet")
    c.hnet = methods.get("hnet").config()
    with pytest.raises(ValueError, match="needs each test example's task id.*hnet.task_id_at_test=True"):
        run(c, str(tmp_path))
    assert json.loads(sentinel.read_text()) == {"old": True}


def test_hnet_through_the_script(tmp_path):
    """The hnet rule is built from the model its build_model returns (Method.make_rule), single and members."""
    c = _tiny()
    c.method = "hnet"
    c.hnet = methods.get("hnet").config()
    c.hnet.chunk_dim = 2000
    c.hnet.hidden = (16,)
    c.hnet.task_id_at_test = True
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


# --- the registry: every method is one entry; run.py and main.py know none ------------------------------------------

# One line per registered method: the config overrides that make it run in seconds on the tiny digits config.
METHOD_RUNS = [
    ("finetune", {}),
    ("joint", {}),
    ("gpm", {}),
    ("sgp", {}),
    ("adam_nscl", {"adam_nscl.lr": 1e-3, "adam_nscl.later_lr": 0.0}),
    ("ogd", {"ogd.memory_per_task": 50}),
    ("coso", {"coso.lr": 1e-3}),
    ("olora", {"train.optimizer": "adam", "train.lr": 1e-3}),
    ("trgp", {"trgp.num_samples": 50, "trgp.selection_examples": 20}),
    ("ewc", {"ewc.lam": 1.0}),
    ("online_ewc", {"online_ewc.lam": 1.0}),
    ("si", {"si.c": 1.0}),
    ("mas", {}),
    ("l2", {}),
    ("lwf", {}),
    ("er", {}),
    ("agem", {"agem.memory_per_task": 64, "agem.reference_batch_size": 32}),
    ("gem", {"gem.memory_per_task": 32}),
    ("der", {}),
    ("derpp", {}),
    ("l2_init", {}),
    ("shrink_perturb", {"shrink_perturb.shrink": 0.9, "shrink_perturb.sigma": 0.01}),
    ("shrink_perturb_steps", {}),
    ("cbp", {"cbp.replacement_rate": 0.01, "cbp.maturity": 5}),
    ("redo", {"redo.period": 20}),
    ("upgd", {}),
    ("spectral", {}),
    ("svd_split", {"train.optimizer": "adam", "train.lr": 1e-3}),
    (
        "hnet",
        {
            "hnet.chunk_dim": 2000,
            "hnet.hidden": (16,),
            "hnet.task_id_at_test": True,
            "model.hidden": (32,),
            "train.optimizer": "adam",
            "train.lr": 1e-3,
        },
    ),
]


def _json(path):
    with open(path) as f:
        return json.load(f)


def _set(c, key, value):
    section, _, leaf = key.rpartition(".")
    (c[section] if section else c)[leaf] = value


def test_every_registered_method_is_in_the_test_list():
    assert sorted(name for name, _ in METHOD_RUNS) == sorted(methods.METHODS)


@pytest.mark.parametrize("name,overrides", METHOD_RUNS, ids=[n for n, _ in METHOD_RUNS])
def test_every_method_runs_through_the_script(tmp_path, name, overrides):
    c = _cl_tiny.digits_config(name)
    for key, value in overrides.items():
        _set(c, key, value)
    r = run(c, str(tmp_path))[name]
    saved = _json(tmp_path / "results.json")
    assert saved["method"] == name and np.isfinite(saved["acc"]) and r["acc"] > 0.2  # chance is 0.1
    method = methods.get(name)
    assert (name in c) == (method.config is not None)  # base_config added its block
    for key in method.sweepable:  # each sweepable key is in the config (a float, or per-layer floats)
        section, _, leaf = key.rpartition(".")
        assert leaf in c[section], key


class L2State(NamedTuple):
    anchor: object  # the params at the end of the last task
    seen: jax.Array  # float32 scalar, 1 after the first task


def l2(lam):
    """A minimal continual rule: adds lam * (params - anchor) to the gradient; the anchor is set at consolidate."""

    def init(params):
        return L2State(jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32))

    def update(updates, state, params=None, **extra):
        del extra
        return jax.tree.map(lambda g, p, a: g + lam * state.seen * (p - a), updates, params, state.anchor), state

    def consolidate(state, params, evidence):
        del evidence
        return None, L2State(jax.tree.map(jnp.copy, params), jnp.ones((), jnp.float32))

    return clx.ContinualTransformation(init, update, consolidate, name="pull")


def _l2_config():
    c = ml_collections.ConfigDict()
    c.lam = 1.0  # strength of the pull to the last task's params
    return c


def _l2_rule(config, model, hp=None):
    del model
    return clx.chain(l2(methods.swept(config, hp, "pull.lam", config.pull.lam)), methods.optimizer(config, hp))


def _l2_results(rule_state, member):
    anchor = next(s for s in rule_state if isinstance(s, L2State)).anchor
    sq = sum(np.sum(np.square(np.asarray(a if member is None else a[member]))) for a in jax.tree.leaves(anchor))
    return {"l2_anchor_norm": float(np.sqrt(sq))}


@pytest.fixture
def l2_method():
    method = methods.register(
        methods.Method("pull", _l2_rule, config=_l2_config, sweepable=("pull.lam", "train.lr"), results=_l2_results)
    )
    yield method
    methods.METHODS.pop("pull", None)


def test_a_new_method_needs_no_edit_to_main_or_run(tmp_path, l2_method):
    c = _cl_tiny.digits_config("pull")  # base_config adds the pull block of the registered entry
    assert c.pull.lam == 1.0
    r = run(c, str(tmp_path / "one"))["pull"]
    saved = _json(tmp_path / "one" / "results.json")
    assert saved["method"] == "pull" and saved["l2_anchor_norm"] == r["l2_anchor_norm"] > 0
    assert r["acc"] > 0.2
    env = saved["environment"]
    for dist in ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint", "clx"):
        assert isinstance(env[dist], str) and env[dist][0].isdigit(), dist
    # its own hyperparameter sweeps as members of one program
    c.sweep.key, c.sweep.grid = "pull.lam", (0.0, 10.0)
    run(c, str(tmp_path / "sweep"))
    for v in ("0", "10"):
        res = _json(tmp_path / "sweep" / f"pull.lam={v}_seed_0" / "results.json")
        assert res["member"]["pull.lam"] == float(v) and res["l2_anchor_norm"] > 0


def test_main_and_run_name_no_method():
    import ast

    for path in ("experiments/main.py", "experiments/run.py"):
        with open(os.path.join(REPO, path)) as f:
            tree = ast.parse(f.read())
        docstrings = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body and isinstance(n.body[0], ast.Expr)
        }
        words = set()
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings:
                words.update(w for w in re.split(r"\W+", n.value.lower()) if w)
            elif isinstance(n, ast.Name):
                words.update(n.id.lower().split("_"))
            elif isinstance(n, ast.Attribute):
                words.update(n.attr.lower().split("_"))
        assert not words & set(methods.METHODS), (path, words & set(methods.METHODS))


def test_registering_a_name_twice_is_an_error(l2_method):
    with pytest.raises(ValueError, match="'pull' is already registered"):
        methods.register(methods.Method("pull", _l2_rule))
    with pytest.raises(ValueError, match="lower-case Python identifier"):
        methods.Method("L-2", _l2_rule)


def test_a_method_without_its_config_block_raises_before_writing(workdir_with_old_results, l2_method):
    workdir, sentinel = workdir_with_old_results
    c = _cl_tiny.digits_config("gpm,pull")
    del c["pull"]
    with pytest.raises(
        ValueError, match=r"'pull' needs a config.pull block.*`c.pull = methods.get\('pull'\).config\(\)`"
    ):
        run(c, str(workdir))
    assert sentinel.read_text() == '{"old": true}'
    assert sorted(os.listdir(workdir)) == ["results.json"]


def test_sweeping_a_key_the_method_does_not_list_raises_before_writing(tmp_path, l2_method):
    c = _cl_tiny.digits_config("pull")
    c.sweep.key, c.sweep.grid = "gpm.threshold", (0.9,)
    with pytest.raises(ValueError, match=r"not supported for method 'pull' \(it sweeps \['pull.lam', 'train.lr'\]\)"):
        run(c, str(tmp_path))
    c.sweep.key, c.sweep.grid = "pull.lam", (0.5,)
    c.method = "pull,hnet"
    c.hnet.task_id_at_test = True  # permuted digits are domain-IL: hnet needs task ids at test time
    with pytest.raises(ValueError, match="not supported for method 'hnet' .it has no sweepable hyperparameter"):
        run(c, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_a_bad_swept_value_raises_before_writing(tmp_path):
    c = _tiny()
    c.sweep.key, c.sweep.grid = "train.lr", (0.1, -1.0)
    with pytest.raises(ValueError, match="train.lr must be > 0, got -1.0"):
        run(c, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_unknown_method_lists_the_known_ones():
    known = re.escape(f"known methods: {sorted(methods.METHODS)}")
    assert "'gpm'" in known and "'ewc'" in known
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['nosuch'\]; " + known):
        methods.parse("gpm,nosuch")
    with pytest.raises(ValueError, match="unknown method 'nosuch'; " + known):
        methods.get("nosuch")
    with pytest.raises(ValueError, match=known):
        run(_cl_tiny.digits_config("nosuch"), "/nonexistent/never/written")


@pytest.mark.parametrize("scenario", ["task_il", "domain_il", "class_il"])
def test_split_cifar100_builds_its_stream_from_tfds_mock_data(tmp_path, scenario):
    """configs/split_cifar100.py through the TFDS path (mock data: random images, 100 classes): 10 tasks of 10
    classes, one head per task in task-IL, one 10-way head in domain-IL, 100 outputs in class-IL."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments.configs import split_cifar100
    from experiments.run import prepare

    c = split_cifar100.get_config(scenario)
    assert c.data.source == "cifar100" and c.stream.num_tasks == 10 and c.train.batch_size == 256
    c.data.dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=500):
        plan = prepare(c)
    s = plan.stream
    assert (s.num_heads, s.num_outputs) == {"task_il": (10, 10), "domain_il": (1, 10), "class_il": (1, 100)}[scenario]
    assert s.input_shape == (32, 32, 3)
    assert [set(s.task_classes(t)) for t in range(10)] == [set(range(10 * t, 10 * t + 10)) for t in range(10)]


def test_split_cifar100_trains_on_tfds_mock_data(tmp_path):
    """A shrunk class-IL split_cifar100 run (fine-tuning and ER) trains to an accuracy matrix with every evaluated
    entry (the seen tasks and the next one) finite and in [0, 1], the rest NaN."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments.configs import split_cifar100

    c = split_cifar100.get_config("class_il")
    c.method = "finetune,er"
    c.data.dir = str(tmp_path / "tfds")
    c.model.hidden = (16,)
    c.train.epochs, c.train.batch_size, c.train.eval_batch_size = 1, 64, 500
    c.er.buffer_size = 100
    c.stream.train_subset = 64  # one batch per task: every task shares one compiled program (the sizes differ)
    c.progress = False
    with tfds.testing.mock_data(num_examples=1000):
        results = run(c, str(tmp_path / "out"))
    assert sorted(results) == ["er", "finetune"]
    evaluated = np.tri(10, 10, 1, dtype=bool)  # after task i: tasks 0..i+1
    for name, r in results.items():
        A = np.asarray(r["accuracy_matrix"])
        assert A.shape == (10, 10) and np.isnan(A[~evaluated]).all(), name
        assert np.isfinite(A[evaluated]).all() and (0 <= A[evaluated]).all() and (A[evaluated] <= 1).all(), name


def test_pmnist_plasticity_digits_scores_the_current_task_and_records_the_diagnostics(tmp_path):
    from experiments.configs import pmnist_plasticity

    c = pmnist_plasticity.get_config("digits_adam")
    c.method, c.stream.num_tasks, c.progress = "finetune,l2_init", 3, False
    rows = run(c, str(tmp_path))
    for name in ("finetune", "l2_init"):
        saved = _json(tmp_path / name / "results.json")
        R = np.array(saved["accuracy_matrix"], dtype=float)
        assert np.isnan(R[2, 0]) and np.all(np.isfinite(np.diag(R)))  # old tasks not scored, each new one is
        assert np.isnan(saved["acc"]) and 0.2 < saved["learning_accuracy"] <= 1.0
        assert len(saved["online_accuracy"]) == 3
        assert saved["online_acc"] == pytest.approx(np.mean(saved["online_accuracy"]))
        metrics = saved["task_metrics"]
        assert {"dormant_fraction", "effective_rank", "weight_norm", "gradient_norm"} <= set(metrics)
        assert all(len(v) == 3 and np.all(np.isfinite(v)) for v in metrics.values())
        assert rows[name]["method"] == name
    with pytest.raises(ValueError, match="config.eval.tasks must be one of"):
        c.eval.tasks = "all"
        run(c, str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
