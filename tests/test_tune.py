"""experiments.tune: the winner is the tuning ACCs' argmax, the two streams differ, bad input writes nothing."""

import json
import os

import _cl_tiny  # tests/ is on sys.path under pytest
import numpy as np
import pytest

from clx import data
from experiments import tune as tune_lib

GRID = (0.01, 0.3)
SEEDS = (0, 1)


def _config(method="finetune"):
    c = _cl_tiny.digits_config(method)  # permuted digits, 2 tasks x 1 epoch
    c.model.hidden = (16,)
    c.stream.train_subset = 200
    c.checkpoint.enabled = False
    return c


def _json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("tune") / "run")
    report = tune_lib.tune(_config(), workdir, key="train.lr", grid=GRID, seeds=SEEDS, command="pytest")
    return workdir, report


def test_the_winner_is_the_argmax_of_the_tuning_accs(tuned):
    workdir, report = tuned
    saved = _json(os.path.join(workdir, "tuning.json"))
    assert saved["grid"] == list(GRID) and saved["criterion"] == "acc" and saved["seeds"] == list(SEEDS)
    values = saved["tuning"]["values"]
    assert [v["value"] for v in values] == list(GRID)
    for v in values:  # each mean is the mean of that value's members' results.json ACCs
        accs = [
            _json(os.path.join(workdir, "tuning", f"train.lr={v['value']:g}_seed_{s}", "results.json"))["acc"]
            for s in SEEDS
        ]
        assert v["acc_per_seed"] == accs
        np.testing.assert_allclose(v["acc_mean"], np.mean(accs), rtol=1e-12)
        np.testing.assert_allclose(v["acc_std"], np.std(accs), rtol=1e-12)
    means = [v["acc_mean"] for v in values]
    assert means[0] != means[1]  # otherwise the test below could not tell argmax from "the first value"
    assert saved["winner_index"] == int(np.argmax(means)) and saved["winner"] == GRID[int(np.argmax(means))]
    # the evaluation ran the winner only, with the same seeds, and the gap is tuning minus evaluation
    ev = saved["evaluation"]
    eval_dirs = sorted(os.listdir(os.path.join(workdir, "evaluation")))
    assert eval_dirs == sorted([f"train.lr={saved['winner']:g}_seed_{s}" for s in SEEDS] + ["members_summary.json"])
    np.testing.assert_allclose(ev["acc_mean"], np.mean(ev["acc_per_seed"]), rtol=1e-12)
    assert saved["gap"] == pytest.approx(max(means) - ev["acc_mean"], abs=1e-12)
    assert json.loads(json.dumps(report)) == saved


def test_the_evaluation_stream_is_not_the_tuning_stream(tuned):
    workdir, _ = tuned
    saved = _json(os.path.join(workdir, "tuning.json"))
    tune_dir = os.path.join(workdir, "tuning", f"train.lr={GRID[0]:g}_seed_0")
    eval_dir = os.path.join(workdir, "evaluation", f"train.lr={saved['winner']:g}_seed_0")
    tune_cfg, eval_cfg = (
        _json(os.path.join(tune_dir, "results.json"))["config"],
        _json(os.path.join(eval_dir, "results.json"))["config"],
    )
    assert eval_cfg["seed"] == _config().seed == saved["evaluation"]["stream_seed"] == 0
    assert tune_cfg["seed"] == tune_lib.TUNE_SEED_OFFSET == saved["tuning"]["stream_seed"]
    source = data.load_source("digits")
    streams = [data.make_stream(source, "permuted", 2, seed=c["seed"], train_subset=200) for c in (tune_cfg, eval_cfg)]
    for t in range(2):  # other permutations: every task's inputs differ, the labels do not
        (xa, ya), (xb, yb) = streams[0].test_set(t), streams[1].test_set(t)
        assert not np.array_equal(xa, xb) and np.array_equal(ya, yb)
        np.testing.assert_array_equal(np.sort(xa, axis=None), np.sort(xb, axis=None))  # the same pixels, moved
    assert saved["tuning"]["tasks_shared_with_evaluation"] == []


def test_the_report_states_the_winner_and_the_gap(tuned):
    workdir, report = tuned
    text = open(os.path.join(workdir, "TUNING.md")).read()
    assert f"Winner: **train.lr={report['winner']:g}**" in text
    assert "highest mean acc over the seeds on the tuning stream; on a tie the first value in grid order" in text
    assert f"**{100 * report['gap']:+.2f}** points" in text
    for v in report["tuning"]["values"]:
        row = f"| {v['value']:g} | {100 * v['acc_mean']:.2f} ± {100 * v['acc_std']:.2f} |"
        assert row in text and (("winner" in text.split(row)[1].split("\n")[0]) == (v["value"] == report["winner"]))
    assert f"{100 * report['evaluation']['acc_mean']:.2f} ± {100 * report['evaluation']['acc_std']:.2f}" in text


def test_a_finished_tuning_is_not_overwritten(tuned):
    workdir, _ = tuned
    before = {n: os.path.getmtime(os.path.join(workdir, n)) for n in ("tuning.json", "TUNING.md")}
    with pytest.raises(FileExistsError, match="already holds a finished tuning.*pass --overwrite"):
        tune_lib.tune(_config(), workdir, key="train.lr", grid=GRID, seeds=SEEDS)
    # --overwrite replaces it only once every check passed: a bad grid still leaves it as it was
    with pytest.raises(ValueError, match="at least 2 values"):
        tune_lib.tune(_config(), workdir, key="train.lr", grid=[0.1], seeds=SEEDS, overwrite=True)
    assert before == {n: os.path.getmtime(os.path.join(workdir, n)) for n in before}


def _split(c):
    c.stream.kind = "split_task_il"
    c.stream.num_tasks = 5


def _rotated(c):
    c.stream.kind = "rotated"


@pytest.mark.parametrize(
    "grid,kwargs,edit,error,match",
    [
        ([0.1], {}, None, ValueError, r"a tuning grid \(--grid\) needs at least 2 values, got \[0.1\]"),
        ([], {}, None, ValueError, "the tuning grid is empty"),
        ("", {}, None, ValueError, "the tuning grid is empty"),
        ("0.1,abc", {}, None, ValueError, r"grid value 'abc' .in '0.1,abc'. is not a finite number"),
        ("0.1,,0.2", {}, None, ValueError, "grid value '' .* is not a finite number"),
        ([0.1, "0.2"], {}, None, ValueError, "grid value '0.2' .* is not a finite number"),
        ([0.1, float("nan")], {}, None, ValueError, "grid value nan .* is not a finite number"),
        ([0.1, 0.1], {}, None, ValueError, "repeats a value"),
        ([0.1, -1.0], {}, None, ValueError, r"config.sweep.grid sets train.lr: train.lr must be > 0, got -1.0"),
        (GRID, {"key": "gpm.threshold"}, None, ValueError, r"not supported for method 'finetune'"),
        (GRID, {"key": ""}, None, ValueError, "name the hyperparameter to tune with --key"),
        (GRID, {"method": "gpm,finetune"}, None, ValueError, "tunes one method.*--method"),
        (GRID, {"criterion": "loss"}, None, ValueError, "unknown criterion 'loss'"),
        (GRID, {"seeds": ()}, None, ValueError, "no seeds given"),
        (GRID, {"seeds": "0,x"}, None, ValueError, "--seeds must be comma-separated integers"),
        (GRID, {"seeds": (0, 0)}, None, ValueError, "repeats a seed"),
        (GRID, {"tune_tasks": 3}, None, ValueError, r"--tune-tasks must be in \[1, 2\]"),
        (GRID, {"tune_tasks": 2}, _split, ValueError, "a split stream cuts the classes"),
        (GRID, {"tune_tasks": 1, "criterion": "bwt"}, None, ValueError, "bwt needs at least 2 tuning tasks"),
        (GRID, {"tune_stream_seed": 0}, None, ValueError, "must be >= 0 and differ from config.seed=0"),
        (GRID, {}, _rotated, ValueError, "the same tasks as the evaluation stream"),
        (GRID, {"grid2": "0.1,0.2"}, None, ValueError, "--grid2 is set but --key2 is empty"),
        (GRID, {"key2": "train.lr", "grid2": (0.1, 0.2)}, None, ValueError, "--key2 repeats --key"),
        (GRID, {"key2": "ewc.lam", "grid2": (0.1, 0.2)}, None, ValueError, "not supported for method 'finetune'"),
        (GRID, {"key2": "ewc.lam", "grid2": (5.0,)}, None, ValueError, r"grid \(--grid2\) needs at least 2"),
        (GRID, {"key2": "ewc.lam", "grid2": ""}, None, ValueError, "empty; pass the values to try, e.g. --grid2"),
    ],
)
def test_bad_input_raises_before_anything_is_written(tmp_path, grid, kwargs, edit, error, match):
    c = _config()
    if edit is not None:
        edit(c)
    workdir = tmp_path / "w"
    args = {"key": "train.lr", "seeds": SEEDS, **kwargs}
    with pytest.raises(error, match=match):
        tune_lib.tune(c, str(workdir), grid=grid, **args)
    assert not workdir.exists() and os.listdir(tmp_path) == []


def test_pick_takes_the_best_mean_the_first_on_a_tie_and_never_nan():
    assert tune_lib.pick([0.5, 0.7, 0.6]) == 1
    assert tune_lib.pick([0.7, 0.5, 0.7]) == 0  # a tie: the first in grid order
    assert tune_lib.pick([np.nan, 0.1, 0.2]) == 2  # a diverged value never wins
    assert tune_lib.pick([0.3, 0.1, 0.2], "forgetting") == 1  # forgetting: the lowest
    with pytest.raises(ValueError, match="every grid value's tuning acc is NaN"):
        tune_lib.pick([np.nan, np.nan])
    assert tune_lib.parse_grid(" 1e-3, 0.5 ,2") == [0.001, 0.5, 2.0]


def test_two_hyperparameters_are_tuned_as_one_grid_of_pairs(tmp_path):
    """--key ewc.lam --key2 train.lr: every pair in the one tuning run, the winner the best pair, evaluated alone."""
    workdir = str(tmp_path / "run")
    lams, lrs = (1.0, 100.0), (0.01, 0.3)
    report = tune_lib.tune(
        _config("ewc"), workdir, key="ewc.lam", grid=lams, key2="train.lr", grid2=lrs, seeds=(0,), command="pytest"
    )
    points = [[a, b] for a in lams for b in lrs]
    assert report["points"] == points and report["keys"] == ["ewc.lam", "train.lr"]
    values = report["tuning"]["values"]
    assert [v["value"] for v in values] == points
    for v in values:
        name = f"ewc.lam={v['value'][0]:g}_train.lr={v['value'][1]:g}_seed_0"
        assert v["acc_per_seed"] == [_json(os.path.join(workdir, "tuning", name, "results.json"))["acc"]]
    means = [v["acc_mean"] for v in values]
    assert report["winner"] == points[int(np.argmax(means))]
    win = report["winner"]
    assert sorted(os.listdir(os.path.join(workdir, "evaluation"))) == [
        f"ewc.lam={win[0]:g}_train.lr={win[1]:g}_seed_0",
        "members_summary.json",
    ]
    md = open(os.path.join(workdir, "TUNING.md")).read()
    assert "| ewc.lam | train.lr | tuning ACC % |" in md and f"ewc.lam={win[0]:g}, train.lr={win[1]:g}" in md
