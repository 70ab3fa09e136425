"""Checkpoints: a SIGKILLed run resumes to the uninterrupted result bit for bit; a
truncated newest checkpoint falls back to the previous one; a checkpoint of another
config is refused with what differs."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clx.checkpoint import Checkpointer, CheckpointMismatchError

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _cl_tiny  # noqa: E402


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    ckpt_dir = str(tmp_path_factory.mktemp("full") / "ckpt")
    result = _cl_tiny.run(ckpt_dir)
    result.checkpoint_dir = ckpt_dir
    return result


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """The checkpoint directory of a run that SIGKILLed itself in task 1, epoch 1 (after a mid-epoch save)."""
    tmp = tmp_path_factory.mktemp("killed")
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "_cl_tiny.py"), str(tmp / "ckpt"), "1", str(tmp / "x.npy")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-2000:])  # SIGKILL, before finishing
    assert not (tmp / "x.npy").exists()
    return str(tmp / "ckpt")


def _killed_run(killed, tmp_path):
    ckpt_dir = str(tmp_path / "ckpt")
    shutil.copytree(killed, ckpt_dir)
    return ckpt_dir


def test_chunked_checkpointed_run_equals_plain_run(uninterrupted):
    plain = _cl_tiny.run(None)
    np.testing.assert_array_equal(uninterrupted.accuracy_matrix, plain.accuracy_matrix)
    assert uninterrupted.resumed_from is None
    assert np.nanmin(np.diag(plain.accuracy_matrix)) > 0.5  # it learns: a wrong resume would show


def test_sigkill_mid_task_resumes_bit_identical_and_truncated_newest_falls_back(uninterrupted, killed, tmp_path, capfd):
    _truncated_newest_falls_back(uninterrupted, killed, tmp_path, capfd)  # (on a copy of the killed run's checkpoints)
    ckpt_dir = _killed_run(killed, tmp_path)
    resumed = _cl_tiny.run(ckpt_dir)
    assert resumed.resumed_from is not None
    assert resumed.resumed_from["task"] == 1 and (resumed.resumed_from["epoch"], resumed.resumed_from["step"]) != (0, 0)
    np.testing.assert_array_equal(resumed.accuracy_matrix, uninterrupted.accuracy_matrix)
    np.testing.assert_array_equal(resumed.random_baseline, uninterrupted.random_baseline)
    for a, b in zip(_leaves(resumed.rule_state), _leaves(uninterrupted.rule_state)):
        np.testing.assert_array_equal(a, b)
    # resuming a finished run trains nothing and returns the same matrix
    again = _cl_tiny.run(ckpt_dir)
    assert again.resumed_from == {"task": 2, "epoch": 0, "step": 0}
    np.testing.assert_array_equal(again.accuracy_matrix, uninterrupted.accuracy_matrix)


def _truncated_newest_falls_back(uninterrupted, killed, tmp_path, capfd):
    ckpt_dir = _killed_run(killed, tmp_path / "truncated")
    positions = _positions(ckpt_dir)
    newest, previous = sorted(positions)[-1], sorted(positions)[-2]
    truncated = 0
    for root, _, files in os.walk(os.path.join(ckpt_dir, str(newest), "state")):
        for f in files:
            p = os.path.join(root, f)
            size = os.path.getsize(p)
            if size > 16:
                with open(p, "r+b") as fh:
                    fh.truncate(size // 2)
                truncated += 1
    assert truncated
    capfd.readouterr()
    resumed = _cl_tiny.run(ckpt_dir)
    err = capfd.readouterr().err
    assert f"checkpoint {newest} in" in err and "unreadable" in err and f"falling back to checkpoint {previous}" in err
    assert resumed.resumed_from == positions[previous]
    np.testing.assert_array_equal(resumed.accuracy_matrix, uninterrupted.accuracy_matrix)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _positions(ckpt_dir):
    out = {}
    for name in os.listdir(ckpt_dir):
        if name.isdigit():
            out[int(name)] = json.load(open(os.path.join(ckpt_dir, name, "meta", "metadata")))["position"]
    return out


def test_checkpoint_of_another_config_is_a_clear_error(uninterrupted, tmp_path):
    ckpt_dir = str(tmp_path / "ckpt")
    shutil.copytree(uninterrupted.checkpoint_dir, ckpt_dir)
    with pytest.raises(CheckpointMismatchError, match=r"layers/0/kernel.*\[64, 32\].*\[64, 16\]"):
        _cl_tiny.run(ckpt_dir, hidden=(16,))
    with pytest.raises(CheckpointMismatchError, match=r"info.method: 'gpm' in the checkpoint, 'finetune' now"):
        _cl_tiny.run(ckpt_dir, info={"method": "finetune"})


def test_checkpointer_keeps_at_least_two(tmp_path):
    with pytest.raises(ValueError, match="max_to_keep must be >= 2"):
        Checkpointer(str(tmp_path), {}, max_to_keep=1)


def test_workdir_with_checkpoint_resumes_and_other_config_is_refused(tmp_path):
    from experiments.configs import digits_default
    from experiments.main import run

    c = digits_default.get_config()
    c.method, c.stream.num_tasks, c.stream.train_subset, c.train.epochs, c.gpm.num_samples = "gpm", 2, 200, 1, 40
    c.progress = False
    first = run(c, str(tmp_path))["gpm"]
    assert "resumed_from" not in first and os.path.isdir(tmp_path / "checkpoints")
    again = run(c, str(tmp_path))["gpm"]
    assert again["resumed_from"] == {"task": 2, "epoch": 0, "step": 0}
    np.testing.assert_array_equal(again["accuracy_matrix"], first["accuracy_matrix"])
    c.train.lr = 0.02
    with pytest.raises(CheckpointMismatchError, match=r"info.config.train.lr: 0.05 in the checkpoint, 0.02 now"):
        run(c, str(tmp_path))


def test_joint_training_resumes_after_an_exception_mid_task(tmp_path):
    """Cumulative (joint) mode reloads tasks 0..t on resume; a crash inside fit still leaves its saves."""
    import optax

    import clx
    from clx.train import CheckpointOptions, fit

    class Crash(Exception):
        pass

    def crash(n, pos):
        if pos["task"] == 1 and pos["epoch"] == 0 and pos["step"] > 0:
            raise Crash

    def run(ckpt_dir, on_save=None):
        m, params = _cl_tiny.model()
        return fit(
            m,
            params,
            clx.chain(optax.sgd(0.3)),
            _cl_tiny.stream(train_subset=128),
            epochs=1,
            batch_size=_cl_tiny.BATCH,
            evidence_samples=8,
            cumulative=True,
            progress=False,
            on_save=on_save,
            checkpoint=CheckpointOptions(ckpt_dir, every_steps=5, async_save=False),
        )

    full = run(str(tmp_path / "full"))
    with pytest.raises(Crash):
        run(str(tmp_path / "crashed"), on_save=crash)
    resumed = run(str(tmp_path / "crashed"))
    assert resumed.resumed_from["task"] == 1 and resumed.resumed_from["step"] > 0
    np.testing.assert_array_equal(resumed.accuracy_matrix, full.accuracy_matrix)
    np.testing.assert_array_equal(resumed.losses, full.losses)
