"""The experiment script's input checks: every numeric config value has a range (experiments/checks.py), a bad
one fails before anything is written, and ``experiments.main`` prints a user error in one or two lines."""

import glob
import importlib.util
import numbers
import os
import subprocess
import sys

import _cl_tiny  # tests/ is on sys.path under pytest
import ml_collections
import pytest

from clx import checkpoint as ckpt_lib
from experiments import checks, main, methods
from experiments.configs import base
from experiments.run import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "experiments", "configs", "*.py")))


def _numeric_leaves(d, prefix=""):
    """Keys of every number, and every tuple that is empty or holds numbers, in a (nested) ConfigDict."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            yield from _numeric_leaves(v, key + ".")
        elif isinstance(v, (tuple, list)):
            if all(isinstance(x, numbers.Number) and not isinstance(x, bool) for x in v):
                yield key
        elif isinstance(v, numbers.Number) and not isinstance(v, bool):
            yield key


def _config_files():
    out = {}
    for path in CONFIGS:
        spec = importlib.util.spec_from_file_location(f"_cfg_{os.path.basename(path)[:-3]}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "get_config"):
            out[os.path.basename(path)] = module.get_config()
    return out


def test_every_numeric_config_value_has_a_range_check():
    """A numeric value added to a config file or a method's block must get a rule in experiments/checks.py."""
    trees = {"base_config()": base.base_config(), **_config_files()}
    for name, method in methods.METHODS.items():
        if method.config is not None:
            block = ml_collections.ConfigDict()
            block[name] = method.config()
            trees[f"methods.get({name!r}).config()"] = block
    missing = {
        f"{where}: {key}"
        for where, tree in trees.items()
        for key in _numeric_leaves(tree)
        if key not in checks.RULES and key not in checks.SPECIAL
    }
    assert not missing, f"numeric config values without a rule in experiments/checks.py RULES: {sorted(missing)}"
    for where, tree in trees.items():  # and every shipped default passes its rule
        checks.check_config(tree)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("train.eval_batch_size", 0, r"^config\.train\.eval_batch_size must be an integer >= 1, got 0 \("),
        ("gpm.num_samples", 0, r"^config\.gpm\.num_samples must be an integer >= 1, got 0 \(examples per task"),
        ("gpm.threshold", 1.5, r"^config\.gpm\.threshold must be in \(0, 1\], got 1\.5 \("),
        ("gpm.threshold", (0.9, 1.5, 0.9), r"threshold must be in \(0, 1\], got 1\.5 at entry 1 of \(0\.9, 1\.5"),
        ("train.lr", -0.1, r"^config\.train\.lr must be > 0, got -0\.1 \(the learning rate\)\.$"),
        ("train.lr", float("nan"), r"config\.train\.lr must be > 0, got nan"),
        ("train.momentum", 1.0, r"config\.train\.momentum must be in \[0, 1\), got 1\.0"),
        ("train.epochs", 0, r"config\.train\.epochs must be an integer >= 1, got 0"),
        ("stream.num_tasks", 0, r"config\.stream\.num_tasks must be an integer >= 1"),
        ("model.hidden", (100, 0), r"config\.model\.hidden must be an integer >= 1, got 0 at entry 1"),
        ("seed", -1, r"config\.seed must be an integer >= 0, got -1"),
        ("checkpoint.max_to_keep", 0, r"config\.checkpoint\.max_to_keep must be an integer >= 1"),
        ("ewc.lam", -1.0, r"config\.ewc\.lam must be >= 0, got -1\.0"),
        ("er.buffer_size", 0, r"config\.er\.buffer_size must be an integer >= 1"),
        ("mesh.shape", (0,), r"config\.mesh\.shape must be an integer >= 1 or -1, got 0"),
    ],
)
def test_out_of_range_value_raises_before_writing(workdir_with_old_results, key, value, match):
    workdir, sentinel = workdir_with_old_results
    c = _cl_tiny.digits_config("gpm,finetune")
    section, _, name = key.rpartition(".")
    with c.unlocked(), c.ignore_type():
        (c[section] if section else c)[name] = value
    with pytest.raises(ValueError, match=match):
        run(c, str(workdir))
    assert sentinel.read_text() == '{"old": true}'
    assert sorted(os.listdir(workdir)) == ["results.json"]


def test_a_swept_value_is_checked_against_its_key(tmp_path):
    c = _cl_tiny.digits_config("gpm")
    c.sweep.key, c.sweep.grid = "gpm.threshold", (0.9, 1.5)
    with pytest.raises(ValueError, match=r"config\.sweep\.grid sets gpm\.threshold: gpm\.threshold must be in"):
        run(c, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_check_config_skips_missing_sections():
    c = ml_collections.ConfigDict({"train": {"lr": 0.1}})  # no gpm, no stream, ...
    checks.check_config(c)
    c.train.lr = 0.0
    with pytest.raises(ValueError, match="config.train.lr must be > 0, got 0.0"):
        checks.check_config(c)


def test_user_error_is_at_most_two_lines():
    assert main.user_error(ValueError("config.train.lr must be > 0, got -1.0.")) == (
        "error: config.train.lr must be > 0, got -1.0. (rerun with --traceback for the traceback)"
    )
    diff = "\n  ".join(f"info.config.k{i}: {i} in the checkpoint, {i + 1} now" for i in range(6))
    e = ckpt_lib.CheckpointMismatchError(
        f"the checkpoint 1 in /w/checkpoints was written by a different run:\n  {diff}\n"
        "Use a fresh --workdir (or delete /w/checkpoints) to start this run over."
    )
    lines = main.user_error(e).splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: the checkpoint 1 in /w/checkpoints")
    assert "info.config.k2: 2 in the checkpoint, 3 now (+3 more)" in lines[0]
    assert lines[1].strip().startswith("Use a fresh --workdir")


def _script(tmp_path, *args):
    cmd = [sys.executable, "-m", "experiments.main", "--config", "experiments/configs/digits_default.py"]
    cmd += ["--workdir", str(tmp_path / "w"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


def _lines(text):
    return [s for s in text.splitlines() if s.strip()]


@pytest.mark.parametrize(
    "args,names",
    [
        (["--config.train.eval_batch_size=0"], "config.train.eval_batch_size must be an integer >= 1, got 0"),
        (["--config.data.source=mnist", "--config.data.dir=/nonexistent/mnist"], "4 file(s) missing"),
    ],
    ids=["bad_value", "missing_data"],
)
def test_script_prints_a_user_error_in_two_lines(tmp_path, args, names):
    proc = _script(tmp_path, *args)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = _lines(proc.stderr)
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: ") and names in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "w")


def test_script_traceback_flag_shows_the_traceback(tmp_path):
    proc = _script(tmp_path, "--config.train.lr=-1", "--traceback")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "config.train.lr must be > 0, got -1.0" in proc.stderr


def test_script_internal_error_keeps_its_traceback(tmp_path):
    code = (
        "import sys; from absl import app; from experiments import main\n"
        "def broken(config, workdir): raise RuntimeError('internal: a bug')\n"
        "main.run = broken\n"
        "sys.argv = ['main', '--config', 'experiments/configs/digits_default.py', '--workdir', sys.argv[1]]\n"
        "app.run(main.main)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "w")], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "RuntimeError: internal: a bug" in proc.stderr
    assert "error: internal" not in proc.stderr
