"""Seeds and a hyperparameter grid as one vmapped program: each member equals its own
run; experiments.main writes one results.json per member and a mean/std summary."""

import json
import os
import sys

import numpy as np
import optax
import pytest

import clx
from clx.train import fit, fit_members

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cl_tiny  # noqa: E402


def _rule(th):
    return clx.chain(clx.gpm(th, num_samples=_cl_tiny.SAMPLES), optax.sgd(0.3))


def test_members_equal_separate_runs():
    stream = _cl_tiny.stream()
    members = [(0, 0.9), (1, 0.9), (0, 0.99)]
    built = [_cl_tiny.model(seed=s) for s, _ in members]
    kw = dict(epochs=_cl_tiny.EPOCHS, batch_size=_cl_tiny.BATCH, evidence_samples=_cl_tiny.SAMPLES, progress=False)
    res = fit_members(
        built[0][0],
        [p for _, p in built],
        lambda hp: _rule(lambda t: hp),
        [v for _, v in members],
        stream,
        seeds=[s for s, _ in members],
        **kw,
    )
    assert res.accuracy_matrix.shape == (3, 2, 2) and res.losses.shape == (3, 2, _cl_tiny.EPOCHS)
    for m, (seed, th) in enumerate(members):
        model, params = _cl_tiny.model(seed=seed)
        one = fit(model, params, _rule(th), stream, seed=seed, **kw)
        np.testing.assert_allclose(res.accuracy_matrix[m], one.accuracy_matrix, atol=0.01)
        ranks = {k: int(np.asarray(s.mask)[m].sum()) for k, s in res.rule_state[0].subspaces.items()}
        assert ranks == {k: int(np.asarray(s.mask).sum()) for k, s in one.rule_state[0].subspaces.items()}
    # the threshold really is per member: 0.99 keeps more directions than 0.9 for the same seed
    r = {m: int(np.asarray(res.rule_state[0].subspaces["layers/0/kernel"].mask)[m].sum()) for m in (0, 2)}
    assert r[2] > r[0]
    # different seeds are different members
    assert not np.array_equal(res.accuracy_matrix[0], res.accuracy_matrix[1])


def test_two_hyperparameters_per_member_equal_separate_runs():
    """(M, 2) hparams: rule_fn gets member m's pair (a threshold and a learning rate here)."""
    stream = _cl_tiny.stream()
    points = [(0.9, 0.3), (0.99, 0.05)]
    model, params = _cl_tiny.model(seed=0)
    kw = dict(epochs=_cl_tiny.EPOCHS, batch_size=_cl_tiny.BATCH, evidence_samples=_cl_tiny.SAMPLES, progress=False)
    seen = []

    def rule(hp):
        seen.append(hp)
        return clx.chain(clx.gpm(lambda t: hp[0], num_samples=_cl_tiny.SAMPLES), optax.sgd(hp[1]))

    res = fit_members(model, [params, params], rule, points, stream, seeds=[0, 0], **kw)
    concrete = [h for h in seen if isinstance(h, tuple)]  # outside jit: the concrete pair as a tuple
    assert concrete and {tuple(round(v, 6) for v in h) for h in concrete} == set(points)
    for m, (th, lr) in enumerate(points):
        one = fit(
            model, params, clx.chain(clx.gpm(th, num_samples=_cl_tiny.SAMPLES), optax.sgd(lr)), stream, seed=0, **kw
        )
        np.testing.assert_allclose(res.accuracy_matrix[m], one.accuracy_matrix, atol=0.01)
        np.testing.assert_allclose(res.losses[m], one.losses, rtol=1e-4)
    with pytest.raises(ValueError, match=r"hparams must be \(M,\) or \(M, K\), got shape \(2, 1, 2\)"):
        fit_members(model, [params, params], rule, [[points[0]], [points[1]]], stream, seeds=[0, 0], **kw)


def test_fit_members_length_mismatch_is_an_error():
    model, params = _cl_tiny.model()
    with pytest.raises(
        ValueError, match="one params pytree, hyperparameter and seed each; got 1 params, 2 hparams, 2 seeds"
    ):
        fit_members(
            model, [params], lambda hp: _rule(0.9), [0.0, 0.0], _cl_tiny.stream(), seeds=[0, 1], epochs=1, batch_size=16
        )


def _config():
    c = _cl_tiny.digits_config("gpm")
    c.stream.train_subset = 300
    return c


def test_main_writes_one_result_per_member_and_a_summary(tmp_path):
    from experiments.main import run

    c = _config()
    c.seeds = (0, 1)
    c.sweep.key = "gpm.threshold"
    c.sweep.grid = (0.9, 0.97)
    run(c, str(tmp_path))
    summary = json.load(open(tmp_path / "members_summary.json"))
    assert summary["members"] == 4 and [g["name"] for g in summary["groups"]] == [
        "gpm.threshold=0.9",
        "gpm.threshold=0.97",
    ]
    for g in summary["groups"]:
        v = g["value"]
        accs = [json.load(open(tmp_path / f"gpm.threshold={v:g}_seed_{s}" / "results.json"))["acc"] for s in (0, 1)]
        assert g["acc_mean"] == pytest.approx(np.mean(accs)) and g["acc_std"] == pytest.approx(np.std(accs))
        assert g["acc_std"] > 0  # two seeds differ


def test_a_two_key_sweep_crosses_the_grids(tmp_path):
    """sweep.key x sweep.key2: one member per (value, value2) pair and seed, each equal to its own run."""
    from experiments.main import run

    c = _config()
    c.sweep.key, c.sweep.grid = "gpm.threshold", (0.9, 0.97)
    c.sweep.key2, c.sweep.grid2 = "train.lr", (0.05, 0.2)
    run(c, str(tmp_path))
    summary = json.load(open(tmp_path / "members_summary.json"))
    names = [f"gpm.threshold={a:g}_train.lr={b:g}" for a in (0.9, 0.97) for b in (0.05, 0.2)]
    assert [g["name"] for g in summary["groups"]] == names and summary["sweep_keys"] == ["gpm.threshold", "train.lr"]
    assert [g["value"] for g in summary["groups"]] == [[a, b] for a in (0.9, 0.97) for b in (0.05, 0.2)]
    accs = {}
    for name, (a, b) in zip(names, [(a, b) for a in (0.9, 0.97) for b in (0.05, 0.2)]):
        r = json.load(open(tmp_path / f"{name}_seed_0" / "results.json"))
        accs[name] = r["acc"]
        assert r["member"] == {"seed": 0, "members": 4, "gpm.threshold": a, "train.lr": b}
    assert len(set(accs.values())) > 1  # the pairs are really different rules
    # the pair (0.97, 0.2) run on its own
    one = _config()
    one.gpm.threshold, one.train.lr = (0.97,) * len(one.gpm.threshold), 0.2
    alone = run(one, str(tmp_path / "alone"))["gpm"]
    assert accs[names[3]] == pytest.approx(alone["acc"], abs=0.01)


@pytest.mark.parametrize(
    "key,grid,match",
    [
        ("nosuch.key", (0.5,), "cannot be swept"),
        ("gpm.threshold", (), "needs config.sweep.grid"),
        ("gpm.threshold", (0.9, 1.2), "threshold must be in"),
        ("", (0.5,), "config.sweep.key is empty"),
    ],
)
def test_bad_sweep_raises_before_writing(tmp_path, key, grid, match):
    from experiments.main import run

    c = _config()
    c.sweep.key, c.sweep.grid = key, grid
    with pytest.raises(ValueError, match=match):
        run(c, str(tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "key2,grid2,match",
    [
        ("train.lr", (), "config.sweep.key2='train.lr' needs config.sweep.grid2"),
        ("", (0.1,), "config.sweep.grid2 is set but config.sweep.key2 is empty"),
        ("gpm.threshold", (0.9,), "repeats config.sweep.key"),
        ("nosuch.key", (0.5,), "cannot be swept"),
        ("train.lr", (0.1, -1.0), r"config.sweep.grid2 sets train.lr: train.lr must be > 0, got -1.0"),
    ],
)
def test_bad_second_sweep_key_raises_before_writing(tmp_path, key2, grid2, match):
    from experiments.main import run

    c = _config()
    c.sweep.key, c.sweep.grid = "gpm.threshold", (0.9, 0.97)
    c.sweep.key2, c.sweep.grid2 = key2, grid2
    with pytest.raises(ValueError, match=match):
        run(c, str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_sweep_key_a_method_does_not_have_raises_before_writing(tmp_path):
    from experiments.main import run

    c = _config()
    c.method = "gpm,finetune"  # finetune has a learning rate but no GPM threshold
    c.sweep.key, c.sweep.grid = "gpm.threshold", (0.9,)
    with pytest.raises(ValueError, match="not supported for method 'finetune'"):
        run(c, str(tmp_path))
    assert os.listdir(tmp_path) == []
