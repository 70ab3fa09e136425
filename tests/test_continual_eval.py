"""Continual evaluation (De Lange et al. 2023): curves inside the jitted epoch, min-ACC, WC-ACC, the stability gap."""

import math
import os
import sys

import jax
import numpy as np
import pytest

import clx
from clx.train import fit, fit_members
from experiments import report, run

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cl_tiny as tiny  # noqa: E402

nan = math.nan
EVERY = 10


def _fit(rule=None, **kw):
    m, params = tiny.model()
    return fit(
        m,
        params,
        rule or tiny.rule(),
        tiny.stream(3, train_subset=200),
        epochs=2,
        batch_size=16,
        evidence_samples=tiny.SAMPLES,
        progress=False,
        **kw,
    )


@pytest.fixture(scope="module")
def plain():
    return _fit()


@pytest.fixture(scope="module")
def evaluated():
    return _fit(eval_every_steps=EVERY, eval_samples=10_000)  # capped by the smallest test set: whole test sets


def test_continual_evaluation_leaves_training_bit_identical(plain, evaluated):
    np.testing.assert_array_equal(plain.accuracy_matrix, evaluated.accuracy_matrix)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), plain.params, evaluated.params))
    assert plain.eval_curves is None


def test_points_at_every_k_steps_and_each_task_end(evaluated):
    c = evaluated.eval_curves
    steps_per_task = 2 * math.ceil(200 / 16)  # 2 epochs of 13 batches
    expected = [*range(EVERY, steps_per_task + 1, EVERY), steps_per_task]
    for t in range(3):
        assert c["step"][c["task"] == t].tolist() == sorted(set(expected))
    assert c["task_steps"].tolist() == [steps_per_task] * 3
    np.testing.assert_array_equal(c["global_step"], c["task"] * steps_per_task + c["step"])
    seen = c["task"][:, None] >= np.arange(3)[None, :]
    assert np.isfinite(c["accuracy"][seen]).all() and np.isnan(c["accuracy"][~seen]).all()


def test_the_task_end_point_is_the_accuracy_matrix_row(evaluated):
    # With eval_samples >= every test set the subsample is the whole test set (permuted), and GPM's consolidate
    # does not move the params: the last point of task t scores R[t, 0..t] exactly.
    c = evaluated.eval_curves
    for t in range(3):
        last = np.flatnonzero(c["task"] == t)[-1]
        np.testing.assert_allclose(c["accuracy"][last, : t + 1], evaluated.accuracy_matrix[t, : t + 1], rtol=1e-6)


def test_members_vmapped_give_the_single_runs_curves(evaluated):
    m, p0 = tiny.model()
    _, p1 = tiny.model(seed=1)
    out = fit_members(
        m,
        [p0, p1],
        lambda hp: tiny.rule(),
        [0.0, 0.0],
        tiny.stream(3, train_subset=200),
        seeds=[0, 1],
        member_axis="vmap",
        epochs=2,
        batch_size=16,
        evidence_samples=tiny.SAMPLES,
        progress=False,
        eval_every_steps=EVERY,
        eval_samples=10_000,
    )
    acc = out.eval_curves["accuracy"]
    assert acc.shape == (2, *evaluated.eval_curves["accuracy"].shape)
    np.testing.assert_allclose(acc[0], evaluated.eval_curves["accuracy"], atol=1e-6)


def test_a_crashed_run_resumes_to_the_same_curves(tmp_path, evaluated):
    class Crash(Exception):
        pass

    def crash(n, pos):
        if pos["task"] == 1 and pos["step"] > 0:
            raise Crash

    # every_steps above the epoch's 13 batches: one save at each epoch's end, so the crash after task 1's first
    # epoch resumes mid-task, with that epoch's points read back from the checkpoint's metadata
    opts = clx.train.CheckpointOptions(str(tmp_path / "ck"), every_steps=20, async_save=False)
    with pytest.raises(Crash):
        _fit(eval_every_steps=EVERY, eval_samples=10_000, checkpoint=opts, on_save=crash)
    resumed = _fit(eval_every_steps=EVERY, eval_samples=10_000, checkpoint=opts)
    assert resumed.resumed_from["task"] == 1
    for k in ("task", "step", "global_step"):
        np.testing.assert_array_equal(resumed.eval_curves[k], evaluated.eval_curves[k])
    np.testing.assert_array_equal(resumed.eval_curves["accuracy"], evaluated.eval_curves["accuracy"])


def test_continual_metrics_on_a_hand_made_case():
    # task 0 learned to 0.9, drops to 0.5 early in task 1, recovers to 0.8; task 2 drops it to 0.6
    acc = np.array(
        [
            [0.5, nan, nan],
            [0.9, nan, nan],  # end of task 0
            [0.5, 0.4, nan],
            [0.8, 0.9, nan],  # end of task 1
            [0.6, 0.7, 0.5],
            [0.7, 0.8, 0.95],  # end of task 2
        ]
    )
    task = np.array([0, 0, 1, 1, 2, 2])
    m = clx.metrics.continual_metrics(acc, task)
    np.testing.assert_allclose(m["min_acc_per_task"], [nan, 0.5, (0.5 + 0.7) / 2])
    np.testing.assert_allclose(m["wc_acc_per_task"], [0.9, 0.9 / 2 + 0.5 / 2, 0.95 / 3 + 2 / 3 * 0.6])
    np.testing.assert_allclose(m["stability_gap"], [0.9 - 0.5, 0.9 - 0.7, nan])
    assert m["min_acc"] == pytest.approx(0.6) and m["wc_acc"] == pytest.approx(0.95 / 3 + 0.4)
    assert m["stability_gap_mean"] == pytest.approx(0.3)


@pytest.mark.parametrize(
    "acc, task, match",
    [
        (np.full((2, 2), 0.5), np.array([0, 2]), "without gaps"),
        (np.full((2, 2), 0.5), np.array([1, 1]), "from 0"),
        (np.full((2, 2), 50.0), np.array([0, 1]), "percent"),
        (np.array([[0.5, nan], [nan, 0.5]]), np.array([0, 1]), "task 0 is missing"),
        (np.full((3,), 0.5), np.array([0, 0, 0]), "shapes"),
    ],
)
def test_continual_metrics_refuses_bad_curves(acc, task, match):
    with pytest.raises(ValueError, match=match):
        clx.metrics.continual_metrics(acc, task)


def test_bad_eval_every_steps_and_samples_raise_before_training():
    for bad in (0, -1, 2.5):  # the issue: "eval.every_steps below 1" is bad input; None is off
        with pytest.raises(ValueError, match="eval_every_steps must be an integer >= 1"):
            _fit(eval_every_steps=bad)
    with pytest.raises(ValueError, match="eval_samples must be an integer >= 1"):
        _fit(eval_every_steps=5, eval_samples=0)
    c = tiny.digits_config("finetune")
    assert c.eval.every_steps is None  # off unless set
    for bad in (0, -3):
        c.eval.every_steps = bad
        with pytest.raises(ValueError, match=rf"config.eval.every_steps must be an integer >= 1 or unset .*got {bad}"):
            run.prepare(c)


def test_results_and_report_carry_the_continual_metrics(tmp_path, evaluated):
    R = evaluated.accuracy_matrix
    results = {
        "method": "gpm",
        "accuracy_matrix": R,
        **clx.metrics.summarize(R),
        **run.continual_results(evaluated.eval_curves),
        "config": {"stream": {"kind": "permuted"}},
    }
    report.write_results(tmp_path / "gpm", results)
    back = report.load_results(tmp_path / "gpm")
    assert back["min_acc"] == pytest.approx(results["min_acc"])
    assert len(back["continual_eval"]["accuracy"]) == len(evaluated.eval_curves["task"])
    text = report.build_report([tmp_path], tmp_path / "report")
    assert "| min-ACC % | WC-ACC % | stability gap % |" in text
    assert f"{100 * results['wc_acc']:.2f}" in text
    png = tmp_path / "report" / "setup1_continual_eval.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # runs without continual evaluation keep the narrower table
    assert "min-ACC" not in report.format_summary_table({"ft": {"acc": 0.5}})
