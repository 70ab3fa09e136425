"""Data-parallel training on 8 fake CPU devices equals the 1-device run; mesh and
batch-size errors name the problem and the fix."""

import os
import sys

import jax
import numpy as np
import pytest

from clx import sharding as shd
from clx import subspace as sub

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cl_tiny  # noqa: E402

pytestmark = pytest.mark.cpu_devices8


def test_sharded_gpm_stream_equals_one_device(monkeypatch):
    single = _cl_tiny.run(None)
    mesh = shd.make_mesh()
    assert mesh.shape == {"data": 8}
    sharded = _cl_tiny.run(None, mesh=mesh)
    # params and every rule-state leaf stay replicated over the 8 devices
    for leaf in jax.tree.leaves((sharded.params, sharded.rule_state)):
        assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
    gs, g1 = sharded.rule_state[0], single.rule_state[0]
    for k in g1.subspaces:
        np.testing.assert_array_equal(np.asarray(gs.subspaces[k].mask), np.asarray(g1.subspaces[k].mask))
        assert int(sub.rank(g1.subspaces[k])) > 0
        # the basis spans the same subspace (columns may differ in sign): compare projectors, then columns up to sign
        np.testing.assert_allclose(
            np.asarray(sub.projector(gs.subspaces[k])), np.asarray(sub.projector(g1.subspaces[k])), atol=1e-4
        )
        m = np.asarray(g1.subspaces[k].mask)
        cos = np.abs(np.sum(np.asarray(gs.subspaces[k].basis)[:, m] * np.asarray(g1.subspaces[k].basis)[:, m], axis=0))
        assert cos.min() > 0.99
    np.testing.assert_allclose(sharded.accuracy_matrix, single.accuracy_matrix, atol=0.01)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5), sharded.params, single.params
    )

    # a (data 4, model 2) mesh: the first kernel (64, 32) is split over "model" once large params start at 1000
    mesh2 = shd.make_mesh((-1, 2))
    assert mesh2.shape == {"data": 4, "model": 2}
    small = {"big": np.zeros((64, 32), np.float32), "small": np.zeros((4,), np.float32)}
    s = shd.param_shardings(small, mesh2, min_size=1000)
    assert s["big"].spec == jax.sharding.PartitionSpec(None, "model") and s["small"].is_fully_replicated
    monkeypatch.setattr(shd, "MODEL_SHARD_MIN_SIZE", 1000)
    r = _cl_tiny.run(None, mesh=mesh2)
    k0 = r.params["layers"][0]["kernel"]
    assert k0.sharding.spec == jax.sharding.PartitionSpec(None, "model") and not k0.sharding.is_fully_replicated
    assert r.params["layers"][1]["kernel"].sharding.is_fully_replicated  # (32, 10): small
    np.testing.assert_allclose(r.accuracy_matrix, single.accuracy_matrix, atol=0.01)


def test_bad_mesh_and_batch_size_errors_then_members_on_a_mesh(tmp_path):
    with pytest.raises(
        ValueError, match=r"mesh shape \(3,\) needs 3 devices but there are 8.*use a shape whose product is 8"
    ):
        shd.make_mesh((3,))
    with pytest.raises(ValueError, match=r"8 devices are not divisible by 3"):
        shd.make_mesh((-1, 3))
    with pytest.raises(ValueError, match="needs a 'data' axis"):
        shd.make_mesh((8,), ("batch",))
    with pytest.raises(
        ValueError, match=r"train.batch_size=12 is not divisible by the 8 devices.*multiple of 8 \(e.g. 8 or 16\)"
    ):
        shd.check_batch_size(12, shd.make_mesh())
    from clx.train import fit

    m, params = _cl_tiny.model()
    with pytest.raises(ValueError, match="batch_size=12 is not divisible"):
        fit(
            m, params, _cl_tiny.rule(), _cl_tiny.stream(), epochs=1, batch_size=12, mesh=shd.make_mesh(), progress=False
        )

    # the experiment script checks the same before writing anything
    from experiments.configs import digits_default
    from experiments.main import run

    c = digits_default.get_config()
    c.method, c.stream.num_tasks, c.train.epochs, c.progress = "gpm", 2, 1, False
    c.train.batch_size = 10  # 8 devices: mesh.enabled=auto builds an 8-device mesh
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by the 8 devices"):
        run(c, str(tmp_path))
    c.train.batch_size, c.mesh.shape = 16, (3,)
    with pytest.raises(ValueError, match=r"mesh shape \(3,\) needs 3 devices but there are 8"):
        run(c, str(tmp_path))
    c.mesh.enabled = "sometimes"
    with pytest.raises(ValueError, match="mesh.enabled must be auto, on or off"):
        run(c, str(tmp_path))
    assert os.listdir(tmp_path) == []

    # (in this test to share its 8-device child process) members vmapped on a mesh equal members on one device
    from clx.train import fit_members

    stream = _cl_tiny.stream()
    built = [_cl_tiny.model(seed=s) for s in (0, 1)]
    kw = dict(epochs=1, batch_size=_cl_tiny.BATCH, evidence_samples=_cl_tiny.SAMPLES, progress=False)
    one = fit_members(
        built[0][0],
        [jax.tree.map(np.array, p) for _, p in built],
        lambda hp: _cl_tiny.rule(),
        [0.0, 0.0],
        stream,
        seeds=[0, 1],
        **kw,
    )
    many = fit_members(
        built[0][0],
        [p for _, p in built],
        lambda hp: _cl_tiny.rule(),
        [0.0, 0.0],
        stream,
        seeds=[0, 1],
        mesh=shd.make_mesh(),
        **kw,
    )
    np.testing.assert_allclose(many.accuracy_matrix, one.accuracy_matrix, atol=0.01)
    assert not np.array_equal(many.accuracy_matrix[0], many.accuracy_matrix[1])


#: One method per code path of the baselines issue (online EWC, MAS and L2 share EWC's; DER is DER++ without its
#: second draw): each trained on an 8-device data-parallel mesh must equal its 1-device run.
BASELINES = ("ewc", "si", "lwf", "er", "agem", "gem", "derpp")


def test_every_baseline_on_8_devices_equals_one_device():
    # One test (one child process) for all of them; each built by its registry entry as the experiment script does.
    from clx.train import fit
    from tests import test_contract

    mesh = shd.make_mesh()
    stream = _cl_tiny.stream(num_tasks=2, train_subset=64)
    for name in BASELINES:
        runs = []
        for m in (None, mesh):
            model_fn, rule = test_contract.CONTRACT[name]()
            model, params = model_fn(0)
            runs.append(
                fit(model, params, rule, stream, epochs=1, batch_size=16, evidence_samples=24, progress=False, mesh=m)
            )
        single, sharded = runs
        for leaf in jax.tree.leaves(sharded.params):
            assert len(leaf.sharding.device_set) == 8, name
        np.testing.assert_allclose(sharded.accuracy_matrix, single.accuracy_matrix, atol=0.02, err_msg=name)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4, err_msg=name),
            sharded.params,
            single.params,
        )
        # the rule state (Fisher, importances, buffers with their stored logits) agrees too
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(
                np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-3, rtol=1e-3, err_msg=name
            ),
            sharded.rule_state,
            single.rule_state,
        )


def test_continual_evaluation_on_8_devices_equals_one_device():
    from clx.train import fit

    stream = _cl_tiny.stream(num_tasks=2, train_subset=96)
    runs = []
    for mesh in (None, shd.make_mesh()):
        model, params = _cl_tiny.model()
        runs.append(
            fit(
                model,
                params,
                _cl_tiny.rule(),
                stream,
                epochs=1,
                batch_size=16,
                evidence_samples=_cl_tiny.SAMPLES,
                progress=False,
                mesh=mesh,
                eval_every_steps=2,
                eval_samples=64,
            )
        )
    single, sharded = (r.eval_curves for r in runs)
    np.testing.assert_array_equal(sharded["global_step"], single["global_step"])
    np.testing.assert_allclose(sharded["accuracy"], single["accuracy"], atol=1 / 64 + 1e-6)  # one example at most
