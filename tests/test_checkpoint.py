"""Checkpoints: a SIGKILLed run resumes to the uninterrupted result bit for bit; a
truncated newest checkpoint, or one whose data or metadata no longer matches its
checksums, falls back to the previous one; a checkpoint of another config or other
code is refused with what differs, one of other checkpoint settings is resumed; the
experiment script checks its workdir before any training."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from clx import checkpoint
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
    c.checkpoint.every_steps, c.checkpoint.max_to_keep = 7, 4  # how often it saves: not what it computes
    assert run(c, str(tmp_path))["gpm"]["resumed_from"] == {"task": 2, "epoch": 0, "step": 0}
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


# --- integrity: checksums of every array and of the metadata ---------------------------------------------------------


def _largest_data_file(step_dir):
    """The largest array-data file orbax wrote for a checkpoint (an OCDBT data file, else a zarr chunk)."""
    found = []
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
        for f in files:
            if os.path.basename(root) == "d" or re.fullmatch(r"\d+(\.\d+)*", f):  # ocdbt.process_0/d/<hash>, zarr 0.0
                found.append((os.path.getsize(os.path.join(root, f)), os.path.join(root, f)))
    assert found, f"no array data files under {step_dir}/state"
    return max(found)[1]


def _flip_two_bits_that_orbax_reads(step_dir):
    """Flips two bits of the largest array-data file where orbax still reads the checkpoint, with other values.

    The data is zstd-compressed: a flip in a block header fails to decode (an unreadable checkpoint, tested
    above); one in the coded values is read without complaint. Candidates from the middle of the file on.
    """
    import jax
    import orbax.checkpoint as ocp

    def read():
        with ocp.StandardCheckpointer() as c:
            return [np.asarray(a) for a in jax.tree.leaves(c.restore(os.path.join(step_dir, "state")))]

    good, path = read(), _largest_data_file(step_dir)
    original = open(path, "rb").read()
    for i in range(len(original) // 2, len(original) - 1, 97):
        data = bytearray(original)
        data[i] ^= 0x10
        data[i + 1] ^= 0x01
        open(path, "wb").write(bytes(data))
        try:
            bad = read()
        except Exception:  # noqa: BLE001 -- undecodable: try the next position
            continue
        if any(not np.array_equal(a, b, equal_nan=True) for a, b in zip(bad, good)):
            return path
    raise AssertionError(f"no two-bit flip in {path} that orbax reads")


def _newest_and_previous(ckpt_dir):
    positions = _positions(ckpt_dir)
    return positions, sorted(positions)[-1], sorted(positions)[-2]


def test_flipped_bits_in_the_newest_checkpoint_fall_back_with_a_checksum_warning(
    uninterrupted, killed, tmp_path, capfd
):
    ckpt_dir = _killed_run(killed, tmp_path)
    positions, newest, previous = _newest_and_previous(ckpt_dir)
    _flip_two_bits_that_orbax_reads(os.path.join(ckpt_dir, str(newest)))  # orbax alone would resume from it
    capfd.readouterr()
    resumed = _cl_tiny.run(ckpt_dir)
    err = capfd.readouterr().err
    assert f"checkpoint {newest} in" in err and "array checksum mismatch" in err, err[-3000:]
    assert f"falling back to checkpoint {previous}" in err
    assert resumed.resumed_from == positions[previous]
    np.testing.assert_array_equal(resumed.accuracy_matrix, uninterrupted.accuracy_matrix)
    np.testing.assert_array_equal(resumed.losses, uninterrupted.losses)


def test_damaged_metadata_or_256_damaged_bytes_fall_back_and_never_train_on_them(
    uninterrupted, killed, tmp_path, capfd
):
    # a changed digit in the newest checkpoint's JSON: still valid JSON, but not what was saved
    ckpt_dir = _killed_run(killed, tmp_path / "meta")
    positions, newest, previous = _newest_and_previous(ckpt_dir)
    meta_file = os.path.join(ckpt_dir, str(newest), "meta", "metadata")
    text = open(meta_file).read()
    assert '"step": ' in text
    open(meta_file, "w").write(text.replace('"step": ', '"step": 1', 1))
    capfd.readouterr()
    resumed = _cl_tiny.run(ckpt_dir)
    err = capfd.readouterr().err
    assert f"checkpoint {newest} in" in err and "metadata checksum mismatch" in err, err[-3000:]
    assert resumed.resumed_from == positions[previous]
    np.testing.assert_array_equal(resumed.accuracy_matrix, uninterrupted.accuracy_matrix)
    # 256 bytes of noise in the array data (the NaN-loss case): found before any training step
    ckpt_dir = _killed_run(killed, tmp_path / "noise")
    path = _largest_data_file(os.path.join(ckpt_dir, str(newest)))
    data = bytearray(open(path, "rb").read())
    mid = len(data) // 2
    data[mid : mid + 256] = np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8).tobytes()
    open(path, "wb").write(bytes(data))
    capfd.readouterr()
    resumed = _cl_tiny.run(ckpt_dir)  # a FloatingPointError ("lower train.lr") here would fail the test
    err = capfd.readouterr().err
    assert f"checkpoint {newest} in" in err and f"falling back to checkpoint {previous}" in err, err[-3000:]
    assert resumed.resumed_from == positions[previous]
    np.testing.assert_array_equal(resumed.accuracy_matrix, uninterrupted.accuracy_matrix)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tmp_path):
    w = np.random.default_rng(0).normal(size=(64, 64)).astype(np.float32)
    ckpt = Checkpointer(str(tmp_path), {"run": 1}, async_save=False)
    for v in (1.0, 2.0):
        ckpt.save({"w": v * w}, {"position": {"task": 0, "epoch": 0, "step": 0}})
    ckpt.close()
    for step in (0, 1):
        path = _largest_data_file(os.path.join(str(tmp_path), str(step)))
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x04
        open(path, "wb").write(bytes(data))
    with pytest.raises(
        checkpoint.CheckpointCorruptError,
        match=r"none of the checkpoints \[0, 1\] .* can be used.*checksum mismatch in w",
    ):
        Checkpointer(str(tmp_path), {"run": 1}).restore({"w": np.zeros_like(w)})


# --- the code is part of the fingerprint; checkpoint settings are not -------------------------------------------------


def test_other_code_or_library_versions_are_refused_with_the_differences(uninterrupted, tmp_path, monkeypatch):
    ckpt_dir = str(tmp_path / "ckpt")
    shutil.copytree(uninterrupted.checkpoint_dir, ckpt_dir)
    saved = checkpoint.code_fingerprint()
    assert saved["clx_version"] and len(saved["clx_source_sha256"]) == 64
    assert set(saved["libraries"]) >= {"jax", "flax", "optax", "orbax-checkpoint", "numpy"}
    edited = {**saved, "clx_source_sha256": "cd34" * 16}  # as if a clx source file had changed
    monkeypatch.setattr(checkpoint, "code_fingerprint", lambda: edited)
    with pytest.raises(CheckpointMismatchError) as e:
        _cl_tiny.run(ckpt_dir)
    msg = str(e.value)
    assert f"code.clx_source_sha256: '{saved['clx_source_sha256']}' in the checkpoint, '{'cd34' * 16}' now" in msg
    assert "written at git commit" in msg and "fresh --workdir" in msg and f"delete {ckpt_dir}" in msg
    upgraded = {**saved, "libraries": {**saved["libraries"], "jax": "9.9.9"}}
    monkeypatch.setattr(checkpoint, "code_fingerprint", lambda: upgraded)
    with pytest.raises(CheckpointMismatchError, match=r"code.libraries.jax: '[0-9.]+' in the checkpoint, '9.9.9' now"):
        _cl_tiny.run(ckpt_dir)
    monkeypatch.setattr(checkpoint, "code_fingerprint", lambda: saved)
    assert _cl_tiny.run(ckpt_dir).resumed_from == {"task": 2, "epoch": 0, "step": 0}  # the same code resumes


def test_source_hash_sees_every_source_file(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    before = checkpoint.source_sha256(str(tmp_path / "pkg"))
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython.pyc").write_bytes(b"\0")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    assert checkpoint.source_sha256(str(tmp_path / "pkg")) == before
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    assert checkpoint.source_sha256(str(tmp_path / "pkg")) != before
    assert checkpoint.source_sha256(str(tmp_path / "pkg"), "a.py") != checkpoint.source_sha256(str(tmp_path / "pkg"))


def test_every_steps_may_change_on_resume(uninterrupted, killed, tmp_path):
    from clx.train import CheckpointOptions

    ckpt_dir = _killed_run(killed, tmp_path)
    positions, newest, _ = _newest_and_previous(ckpt_dir)
    resumed = _cl_tiny.run(CheckpointOptions(ckpt_dir, every_steps=5, max_to_keep=4, info={"method": "gpm"}))
    assert resumed.resumed_from == positions[newest]  # saved every 12 steps, resumed saving every 5
    np.testing.assert_array_equal(resumed.accuracy_matrix, uninterrupted.accuracy_matrix)


def test_every_tasks_saves_every_nth_task_end_and_the_last_and_resumes_exactly(tmp_path):
    """every_tasks=2 on 5 tasks saves after tasks 2, 4 and 5 only; a run that dies after task 3 resumes from task 2
    and ends with the uninterrupted run's accuracy matrix and losses."""
    import optax

    import clx
    from clx.train import CheckpointOptions, fit

    class Crash(Exception):
        pass

    def crash(t, info):
        if t == 2:
            raise Crash

    def run(ckpt_dir, on_save=None, on_task_end=None):
        m, params = _cl_tiny.model()
        return fit(
            m,
            params,
            clx.chain(optax.sgd(0.3)),
            _cl_tiny.stream(5, train_subset=64),
            epochs=1,
            batch_size=_cl_tiny.BATCH,
            evidence_samples=8,
            progress=False,
            on_save=on_save,
            on_task_end=on_task_end,
            checkpoint=CheckpointOptions(ckpt_dir, every_tasks=2, max_to_keep=5, async_save=False),
        )

    saved = []
    full = run(str(tmp_path / "full"), on_save=lambda n, pos: saved.append(pos["task"]))
    assert saved == [2, 4, 5]
    with pytest.raises(Crash):
        run(str(tmp_path / "crashed"), on_task_end=crash)
    resumed = run(str(tmp_path / "crashed"))
    assert resumed.resumed_from == {"task": 2, "epoch": 0, "step": 0}
    np.testing.assert_array_equal(resumed.accuracy_matrix, full.accuracy_matrix)
    np.testing.assert_array_equal(resumed.losses, full.losses)


# --- the experiment script checks its workdir before any training -------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
    import experiments.run

    def fail(*args, **kwargs):
        raise AssertionError("training started before the workdir was checked")

    monkeypatch.setattr(experiments.run, "fit", fail)
    monkeypatch.setattr(experiments.run, "fit_members", fail)


def _no_checkpoints():
    c = _cl_tiny.digits_config("finetune")
    c.checkpoint.enabled = False
    return c


def test_workdir_that_is_a_file_fails_before_training(tmp_path, no_training):
    from experiments.run import run

    f = tmp_path / "results"
    f.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match=rf"the workdir {re.escape(str(f))} is a file.*another --workdir"):
        run(_no_checkpoints(), str(f))
    with pytest.raises(
        NotADirectoryError,
        match=rf"the workdir {re.escape(str(f / 'sub'))} cannot be created: {re.escape(str(f))} is a file",
    ):
        run(_no_checkpoints(), str(f / "sub"))
    assert f.read_text() == "not a directory"


def test_read_only_workdir_fails_before_training(tmp_path, no_training):
    from experiments.run import run

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:  # root (with CAP_DAC_OVERRIDE) ignores permissions: the simulated test below stands in for it
        (ro / "probe").write_text("")
    except PermissionError:
        pass
    else:
        ro.chmod(0o755)
        pytest.skip("this user writes into read-only directories (root)")
    try:
        with pytest.raises(
            PermissionError, match=rf"the workdir {re.escape(str(ro))} is not writable.*another --workdir"
        ):
            run(_no_checkpoints(), str(ro))
        with pytest.raises(PermissionError, match=rf"the workdir {re.escape(str(ro / 'new'))} is not writable"):
            run(_no_checkpoints(), str(ro / "new"))
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_unwritable_workdir_fails_before_training_even_as_root(tmp_path, no_training, monkeypatch):
    """The same path as a read-only directory, with the probe's write refused (root ignores permissions)."""
    import tempfile

    from experiments.run import run

    def refused(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", os.path.join(dir, ".clx-write-probe-x"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(
        PermissionError, match=rf"the workdir {re.escape(str(tmp_path / 'w'))} is not writable \(Permission denied"
    ):
        run(_no_checkpoints(), str(tmp_path / "w"))
