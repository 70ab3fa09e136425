"""Tests for experiments.report: results round trip, CSV, PNG, atomic writes, summary."""

import csv
import json
import math
import os

import numpy as np
import pytest

from experiments import report

nan = math.nan

R3 = np.array(
    [
        [0.90, 0.10, nan],
        [0.80, 0.95, 0.20],
        [0.70, 0.85, 0.99],
    ]
)


def _results(**overrides):
    results = {
        "method": "gpm",
        "accuracy_matrix": R3,
        "acc": np.float64(2.54 / 3),
        "bwt": np.float32(-0.15),
        "fwt": 0.045,
        "forgetting": 0.15,
        "learning_accuracy": 2.84 / 3,
        "wall_seconds": 12.5,
        "config": {"lr": 0.01, "hidden": (100, 100), "seed": np.int64(0)},
        "baseline": np.array([0.1, 0.12, 0.09]),
        "extra_note": "kept",
        "missing_metric": nan,
    }
    results.update(overrides)
    return results


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    # Nested, not yet existing workdir: write_results creates it.
    workdir = tmp_path_factory.mktemp("run") / "nested" / "workdir"
    report.write_results(workdir, _results())
    return workdir


def _assert_no_temp_files(workdir):
    leftovers = [p.name for p in workdir.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert leftovers == []


def test_writes_the_three_files_and_nothing_else(written):
    assert sorted(p.name for p in written.iterdir()) == ["accuracy_matrix.csv", "accuracy_matrix.png", "results.json"]
    _assert_no_temp_files(written)


def test_results_round_trip(written):
    loaded = report.load_results(written / "results.json")
    assert set(loaded) == set(_results())
    R = np.asarray(loaded["accuracy_matrix"], dtype=float)
    assert R.shape == (3, 3)
    np.testing.assert_array_equal(np.isnan(R), np.isnan(R3))
    np.testing.assert_array_equal(R[~np.isnan(R)], R3[~np.isnan(R3)])
    assert loaded["acc"] == pytest.approx(2.54 / 3, abs=0)
    assert loaded["bwt"] == pytest.approx(float(np.float32(-0.15)), abs=0)
    assert loaded["fwt"] == 0.045
    assert loaded["forgetting"] == 0.15
    assert loaded["wall_seconds"] == 12.5
    assert loaded["config"] == {"lr": 0.01, "hidden": [100, 100], "seed": 0}
    assert loaded["baseline"] == [0.1, 0.12, 0.09]
    assert loaded["extra_note"] == "kept"
    assert math.isnan(loaded["missing_metric"])
    assert loaded["method"] == "gpm"


def test_load_results_accepts_the_workdir(written):
    a = report.load_results(written)
    b = report.load_results(written / "results.json")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_results_json_is_indented_and_writes_nan_as_json_nan(written):
    text = (written / "results.json").read_text()
    assert text.startswith('{\n  "')
    assert "NaN" in text
    assert json.loads(text)["accuracy_matrix"][0][1] == 0.1


def test_csv_parses_back_to_the_matrix(written):
    with open(written / "accuracy_matrix.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after_task", "task_0", "task_1", "task_2"]
    assert [r[0] for r in rows[1:]] == ["0", "1", "2"]
    assert rows[1][3] == ""  # NaN -> empty cell
    assert rows[2][1] == "0.800000"  # fractions with 6 decimals
    R = np.array([[float(c) if c else nan for c in r[1:]] for r in rows[1:]])
    np.testing.assert_array_equal(np.isnan(R), np.isnan(R3))
    np.testing.assert_allclose(R, R3, atol=1e-6, equal_nan=True)


def test_png_exists_and_has_png_signature(written):
    data = (written / "accuracy_matrix.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000


def test_rewrite_replaces_files_and_a_crash_leaves_the_old_results(tmp_path, monkeypatch):
    report.write_results(tmp_path, _results(accuracy_matrix=[[0.5]], acc=0.5))
    assert report.load_results(tmp_path)["acc"] == 0.5
    before = (tmp_path / "results.json").read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        report.write_results(tmp_path, _results(accuracy_matrix=[[0.25]], acc=0.25))
    monkeypatch.undo()

    assert (tmp_path / "results.json").read_bytes() == before
    _assert_no_temp_files(tmp_path)


def test_write_results_validates_the_matrix(tmp_path):
    results = _results()
    del results["accuracy_matrix"]
    with pytest.raises(KeyError, match="accuracy_matrix"):
        report.write_results(tmp_path, results)
    with pytest.raises(ValueError, match=r"2-D.*\(3,\)"):
        report.write_results(tmp_path, _results(accuracy_matrix=[0.1, 0.2, 0.3]))
    assert list(tmp_path.iterdir()) == []


def test_write_summary(tmp_path):
    rows = {
        "gpm": _results(),
        "ewc": {
            "acc": 0.9016,
            "bwt": -0.04,
            "fwt": nan,
            "forgetting": 0.05,
            "learning_accuracy": 0.93,
            "wall_seconds": np.float64(3.0),
        },
        "sgd": {"acc": 0.5},
    }
    table = report.write_summary(tmp_path, rows)
    assert (tmp_path / "summary.txt").read_text() == table
    lines = table.splitlines()
    assert lines[0].split() == [
        "method",
        "ACC",
        "%",
        "BWT",
        "%",
        "FWT",
        "%",
        "forgetting",
        "%",
        "learning",
        "acc",
        "%",
        "online",
        "acc",
        "%",
        "wall",
        "s",
    ]
    gpm = lines[2].split()
    # 2.54/3 -> 84.67 %, -0.15 -> -15.00 %, 0.045 -> +4.50 %, 0.15 -> 15.00 %,
    # 2.84/3 -> 94.67 %, 12.5 s.
    assert gpm == ["gpm", "84.67", "-15.00", "+4.50", "15.00", "94.67", "n/a", "12.5"]
    assert lines[3].split() == ["ewc", "90.16", "-4.00", "n/a", "5.00", "93.00", "n/a", "3.0"]
    assert lines[4].split() == ["sgd", "50.00", "n/a", "n/a", "n/a", "n/a", "n/a", "n/a"]

    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["gpm", "ewc", "sgd"]
    assert summary["ewc"]["acc"] == 0.9016 and math.isnan(summary["ewc"]["fwt"])
    assert summary["gpm"]["config"]["hidden"] == [100, 100]
    assert sorted(os.listdir(tmp_path)) == ["summary.json", "summary.txt"]


def _run(root, method, seed, acc_last, lr=0.01):
    R = np.array([[0.9, nan], [acc_last, 0.95]])
    results = _results(
        method=method,
        accuracy_matrix=R,
        acc=(acc_last + 0.95) / 2,
        bwt=acc_last - 0.9,
        config={"train": {"lr": lr}, "seed": seed, method: {"lam": 1.0}},
        member={"seed": seed, "members": 2},
    )
    report.write_results(root / method / f"seed_{seed}", results)


def test_report_over_workdirs_gives_mean_and_std_per_method_and_separates_setups(tmp_path):
    _run(tmp_path / "a", "ewc", 0, 0.70)
    _run(tmp_path / "a", "ewc", 1, 0.80)
    _run(tmp_path / "b", "ewc", 0, 0.50, lr=0.1)  # another setup: its own table
    out = tmp_path / "report"
    text = report.build_report([tmp_path / "a", tmp_path / "b"], out)
    assert "2 different setups" in text
    first = next(line for line in text.splitlines() if line.startswith("| ewc | 2 |"))
    acc_mean, acc_std = 100 * np.mean([0.825, 0.875]), 100 * np.std([0.825, 0.875])
    assert f"{acc_mean:.2f} ± {acc_std:.2f}" in first
    assert any(line.startswith("| ewc | 1 | 72.50") for line in text.splitlines())
    for name in ("setup1_acc_vs_tasks.png", "setup1_task_accuracy.png", "setup2_acc_vs_tasks.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "REPORT.md").read_text() == text


def test_report_over_a_directory_without_results_raises_and_writes_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no results.json"):
        report.build_report([tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(ValueError, match="does not exist"):
        report.build_report([tmp_path / "missing"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_report_of_a_long_stream_draws_the_plasticity_figure_with_binned_curves(tmp_path):
    T = 120  # more than 50 tasks: means over bins of 2 tasks
    R = np.full((T, T), nan)
    R[np.arange(T), np.arange(T)] = np.linspace(0.9, 0.6, T)
    for seed in (0, 1):
        results = _results(
            method="finetune",
            accuracy_matrix=R,
            acc=nan,
            bwt=nan,
            forgetting=nan,
            online_acc=0.5,
            online_accuracy=np.linspace(0.8, 0.4, T),
            task_metrics={"dormant_fraction": np.linspace(0, 0.3, T), "weight_norm": np.linspace(5, 9, T)},
            config={"eval": {"tasks": "current"}, "seed": seed},
            member={"seed": seed, "members": 2},
        )
        report.write_results(tmp_path / "run" / f"seed_{seed}", results)
    text = report.build_report([tmp_path / "run"], tmp_path / "out")
    row = next(line for line in text.splitlines() if line.startswith("| finetune | 2 |"))
    cells = row.split(" | ")
    assert (
        cells[2:4] == ["n/a", "n/a"] and cells[5] == "n/a" and cells[7] == "50.00 ± 0.00"
    )  # ACC BWT forgetting online
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["REPORT.md", "setup1_plasticity.png"]  # no ACC-vs-tasks figure for unscored old tasks
    assert (tmp_path / "out" / "setup1_plasticity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run" / "seed_0" / "accuracy_matrix.png").stat().st_size < 2_000_000  # capped heatmap
