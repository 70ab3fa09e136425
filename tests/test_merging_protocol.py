"""experiments.merging, the continual-merging protocol, end to end on a tiny digits ViT: the saved
fine-tuned models give the recorded accuracies, the first continual merge is the first model of its
order, continual TA ends at all-at-once TA, orders are seeded permutations, a rerun reuses the
fine-tuned models and gives the same numbers, and bad input fails before anything is written."""

import json
import os

import jax
import numpy as np
import pytest

import clx
from experiments import merging, pretrain_vit

TASKS, ORDERS, STEPS, SAMPLES = 3, 2, 12, 100  # digits: 1,438 training examples = 12 batches of 128


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A random-init tiny ViT for 8x8 digits as the 'pretrained' model, and one protocol run on it."""
    root = tmp_path_factory.mktemp("merging")
    pre = str(root / "pre")
    kwargs = {
        "input_shape": [8, 8, 1],
        "num_outputs": 10,
        "patch_size": 4,
        "dim": 8,
        "depth": 1,
        "attention_heads": 2,
        "mlp_dim": 16,
    }
    module = pretrain_vit.build(kwargs, seed=0)
    clx.models.save_params(os.path.join(pre, pretrain_vit.PARAMS_DIR), module)
    with open(os.path.join(pre, pretrain_vit.INFO_FILE), "w") as f:
        json.dump({"model": kwargs, "source": "digits", "test_accuracy": None}, f)
    work = str(root / "out")
    argv = ["--pretrained", pre, "--workdir", work, "--tasks", str(TASKS), "--orders", str(ORDERS)]
    argv += ["--steps", str(STEPS), "--lr", "1e-2", "--eval-samples", str(SAMPLES), "--chunk", "12"]
    out = merging.main(argv)
    return pre, work, argv, out


def _loaded(pre, work):
    model, params, info = pretrain_vit.load_pretrained(pre)
    fts = [clx.models.load_params(os.path.join(work, "finetuned", f"task_{t}"), params) for t in range(TASKS)]
    return model, params, fts


def test_outputs_and_orders(run):
    pre, work, argv, out = run
    assert os.path.isfile(os.path.join(work, "merging.md")) and os.path.isfile(os.path.join(work, "merging.json"))
    with open(os.path.join(work, "merging.json")) as f:
        assert json.load(f)["orders"] == out["orders"]
    md = open(os.path.join(work, "merging.md")).read()
    for name in ("pretrained", "fine-tuned", *merging.MERGES):
        assert f"| {name} |" in md
    orders = np.asarray(out["orders"])
    assert orders.shape == (ORDERS, TASKS)
    for o in orders:
        assert sorted(o.tolist()) == list(range(TASKS))
    np.testing.assert_array_equal(orders, merging.draw_orders(TASKS, ORDERS, 0))
    many = merging.draw_orders(TASKS, 20, 0)
    np.testing.assert_array_equal(many[:ORDERS], orders)  # the first R of a longer draw: reproducible from the seed
    assert len({tuple(o) for o in many}) > 1
    assert not np.array_equal(merging.draw_orders(7, 5, 0), merging.draw_orders(7, 5, 1))


def test_recorded_accuracy_is_the_saved_models(run):
    pre, work, argv, out = run
    model, params, fts = _loaded(pre, work)
    stream = merging.load_stream({"source": "digits"}, merging._parser().parse_args(argv))
    xs, ys = merging.eval_sets(stream, SAMPLES, 0)
    assert xs.shape[:2] == (TASKS, SAMPLES)
    acc = clx.train.make_eval_fn(model)
    ft = np.asarray(out["finetuned_matrix"])
    for t in range(TASKS):
        for j in range(TASKS):
            assert float(acc(fts[t], xs[j], ys[j], j, TASKS)) == pytest.approx(ft[t, j], abs=1e-9)
        assert out["finetune"][t]["accuracy"] == ft[t, t]
        assert out["methods"]["fine-tuned"]["per_task"][t] == ft[t, t]
        assert out["finetune"][t]["change"] == clx.data.FINETUNE_CHANGES[t]
    pre_acc = [float(acc(params, xs[j], ys[j], j, TASKS)) for j in range(TASKS)]
    np.testing.assert_allclose(out["methods"]["pretrained"]["per_task"], pre_acc, atol=1e-9)
    # fine-tuning moved every model
    for t in range(TASKS):
        assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fts[t]), jax.tree.leaves(params)))


def test_matrices_and_summaries(run):
    pre, work, argv, out = run
    orders = np.asarray(out["orders"])
    ft = np.asarray(out["finetuned_matrix"])
    for name in ("continual TA", "continual TIES", "continual average", "OPCM", "OPCM (diag kept)"):
        r = out["methods"][name]
        mats = np.asarray(r["accuracy_matrices"])
        assert mats.shape == (ORDERS, TASKS, TASKS)
        np.testing.assert_allclose(r["acc_per_order"], mats[:, -1].mean(axis=1))
        np.testing.assert_allclose(r["bwt_per_order"], [clx.metrics.bwt(m) for m in mats])
        assert r["acc_mean"] == pytest.approx(np.mean(r["acc_per_order"]))
        assert r["acc_std"] == pytest.approx(np.std(r["acc_per_order"]))
    # the first merge of the continual average (and of OPCM: theta_0 + tau_1) is the first model of the order
    for name in ("continual average", "OPCM", "OPCM (diag kept)"):
        mats = np.asarray(out["methods"][name]["accuracy_matrices"])
        for r, o in enumerate(orders):
            np.testing.assert_allclose(mats[r, 0], ft[o[0], o], atol=1.5 / SAMPLES, err_msg=name)
    np.testing.assert_array_equal(
        np.asarray(out["methods"]["continual average"]["accuracy_matrices"])[:, 0],
        np.stack([ft[o[0], o] for o in orders]),
    )
    # continual TA after all T models is all-at-once TA (up to the rounding of the order of the additions)
    ta = out["methods"]["task arithmetic"]["acc_mean"]
    np.testing.assert_allclose(out["methods"]["continual TA"]["acc_per_order"], ta, atol=1.5 / SAMPLES)
    dare = out["methods"]["DARE + TA"]
    assert len(dare["acc_per_order"]) == ORDERS and np.asarray(dare["per_task_per_draw"]).shape == (ORDERS, TASKS)


def test_merging_one_model_with_lambda_one_is_that_model(run):
    pre, work, argv, out = run
    model, params, fts = _loaded(pre, work)
    stacked = merging.stack(fts)
    merged = merging.continual_merged(
        clx.merging.continual_task_arithmetic(1.0), params, stacked, np.asarray([[2, 0, 1]], np.int32)
    )
    first = jax.tree.map(lambda a: a[0, 0], merged)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), first, fts[2])


def test_rerun_reuses_finetuned_models_and_gives_the_same_numbers(run):
    pre, work, argv, out = run
    ckpt = os.path.join(work, "finetuned", "task_0")
    stamp = os.path.getmtime(ckpt)
    again = merging.main(argv + ["--methods", "continual average"])
    assert os.path.getmtime(ckpt) == stamp
    assert all(r["reused"] for r in again["finetune"])
    assert again["finetuned_matrix"] == out["finetuned_matrix"]
    assert again["orders"] == out["orders"]
    for key in ("acc_per_order", "bwt_per_order", "accuracy_matrices"):
        assert again["methods"]["continual average"][key] == out["methods"]["continual average"][key]
    assert set(again["methods"]) == {"pretrained", "fine-tuned", "continual average"}
    with pytest.raises(ValueError, match="other settings"):
        merging.main([*argv, "--steps", "13", "--methods", "continual average"])


@pytest.mark.parametrize(
    "extra, err, match",
    [
        (["--orders", "0"], ValueError, "--orders must be >= 1"),
        (["--tasks", "0"], ValueError, "--tasks must be in 1..7"),
        (["--tasks", "8"], ValueError, "--tasks must be in 1..7"),
        (["--lr", "0"], ValueError, "--lr must be a positive"),
        (["--methods", "TA,OPCM"], ValueError, "unknown \\['TA'\\]"),
    ],
)
def test_bad_input_fails_before_writing(run, tmp_path, extra, err, match):
    pre = run[0]
    work = tmp_path / "never"
    with pytest.raises(err, match=match):
        merging.main(["--pretrained", pre, "--workdir", str(work), *extra])
    assert not work.exists()


def test_missing_pretrained_dir(tmp_path):
    work = tmp_path / "never"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        merging.main(["--pretrained", str(tmp_path / "nope"), "--workdir", str(work)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no vit.json"):
        merging.main(["--pretrained", str(tmp_path / "empty"), "--workdir", str(work)])
    assert not work.exists()
