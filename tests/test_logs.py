"""experiments.logs: the TensorBoard event files a run writes, read back record by record."""

import collections
import glob
import math
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from experiments import logs

nan = math.nan


def read_events(directory):
    """{tag: [(step, value)]} from the TFRecord-framed Event protos of every event file in ``directory``."""
    out = collections.defaultdict(list)
    for path in sorted(glob.glob(f"{directory}/events.out.tfevents.*")):
        data, i = open(path, "rb").read(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                out[v.tag].append((event.step, v.simple_value))
    return out


def _info(t, members=2):
    """What fit's on_task_end hands over after task t of a 3-task, 2-epoch run of two members."""
    row = np.array([[0.9 - 0.1 * t, 0.8, nan], [0.7, 0.6, nan]])
    row[:, t + 1 :] = nan
    return {
        "accuracy": row,
        "losses": np.array([[2.0, 1.0], [3.0, 1.5]]) / (t + 1),
        "train_accuracy": np.array([[0.5, 0.6], [0.4, 0.45]]),
        "task_metrics": {"dormant_fraction": np.array([0.1 * (t + 1), 0.0])},
        "eval_curves": {
            "global_step": np.array([10, 20]) + 20 * t,
            "accuracy": np.stack([row, row]).transpose(1, 0, 2),
        },
        "rule_state": {"rank": np.array([3 + t, 5 + t])},
        "wall_seconds": 1.5 * (t + 1),
    }


def test_each_member_gets_its_own_scalars_at_the_documented_steps(tmp_path):
    dirs = [str(tmp_path / "seed_0"), str(tmp_path / "seed_1")]
    log = logs.TensorBoardLog(dirs, lambda state, m: {"ranks": {"layer0": int(state["rank"][m])}}, epochs=2)
    for t in range(2):
        log(t, _info(t))
    log.close()
    first, second = (read_events(f"{d}/{logs.SUBDIR}") for d in dirs)
    assert first["train/loss"] == [(1, 2.0), (2, 1.0), (3, 1.0), (4, 0.5)]
    assert second["train/loss"] == [(1, 3.0), (2, 1.5), (3, 1.5), (4, 0.75)]
    assert first["accuracy/task_0"] == [(1, pytest.approx(0.9)), (2, pytest.approx(0.8))]
    assert first["accuracy/task_1"] == [(2, pytest.approx(0.8))]  # only seen tasks
    assert first["accuracy/acc_seen"][-1] == (2, pytest.approx(0.8))
    assert second["accuracy/acc_seen"][-1] == (2, pytest.approx(0.65))
    assert [s for s, _ in first["continual_eval/task_0"]] == [10, 20, 30, 40]
    assert first["plasticity/dormant_fraction"] == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2))]
    assert first["method/ranks/layer0"] == [(1, 3.0), (2, 4.0)] and second["method/ranks/layer0"] == [
        (1, 5.0),
        (2, 6.0),
    ]
    assert first["time/wall_seconds"] == [(1, 1.5), (2, 3.0)]
    assert first["train/online_accuracy"] == [(1, 0.5), (2, 0.5)]


def test_a_single_run_and_no_continual_evaluation(tmp_path):
    info = _info(0)
    one = {k: (np.asarray(v)[0] if k in ("accuracy", "losses", "train_accuracy") else v) for k, v in info.items()}
    one["task_metrics"], one["eval_curves"] = {}, None
    log = logs.TensorBoardLog([str(tmp_path)], lambda state, m: {"note": "text is skipped", "m": m}, epochs=2)
    log(0, one)
    log.close()
    events = read_events(f"{tmp_path}/{logs.SUBDIR}")
    assert not any(tag.startswith(("continual_eval", "plasticity")) for tag in events)
    assert "method/note" not in events and "method/m" not in events  # None and text are not scalars
    assert events["accuracy/task_0"] == [(1, pytest.approx(0.9))]
