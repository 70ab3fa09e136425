"""Exact values of the plasticity diagnostics in clx.metrics on hand-made features."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import clx
from clx import metrics


def test_effective_rank_of_rank_one_and_of_equal_singular_values():
    u = np.arange(1.0, 6.0)[:, None] * np.array([[1.0, -2.0, 0.5]])  # rank 1
    assert float(metrics.effective_rank(u)) == pytest.approx(1.0, abs=1e-5)
    assert float(metrics.effective_rank(3.0 * np.eye(4))) == pytest.approx(4.0, abs=1e-5)
    # singular values (3, 1): p = (3/4, 1/4), erank = exp(-sum p log p)
    p = np.array([0.75, 0.25])
    assert float(metrics.effective_rank(np.diag([3.0, 1.0]))) == pytest.approx(np.exp(-(p * np.log(p)).sum()), 1e-5)


def test_stable_rank_and_approximate_rank():
    assert float(metrics.stable_rank(np.eye(4))) == pytest.approx(4.0, 1e-6)
    assert float(metrics.stable_rank(np.diag([2.0, 1.0]))) == pytest.approx(1.25, 1e-6)  # (4 + 1) / 4
    # singular values (10, 1, 0.01): 99 % of the sum needs the first two
    assert int(metrics.approximate_rank(np.diag([10.0, 1.0, 0.01]))) == 2


def test_dormant_fraction_counts_units_at_or_below_tau():
    f = np.array([[0.0, 1.0, 4.0, 0.1], [0.0, 3.0, 4.0, 0.1]])  # mean |h|: 0, 2, 4, 0.1; layer mean 1.525
    assert float(metrics.dormant_fraction(f, 0.0)) == pytest.approx(0.25)
    assert float(metrics.dormant_fraction(f, 0.1)) == pytest.approx(0.5)  # 0.1 / 1.525 = 0.066 <= 0.1
    assert float(metrics.dormant_fraction(np.zeros((3, 5)), 0.0)) == 1.0
    with pytest.raises(ValueError, match="tau must be >= 0"):
        metrics.dormant_fraction(f, -0.1)


def test_norms_match_numpy():
    tree = {"a": jnp.array([3.0, 4.0]), "b": {"c": jnp.array([[12.0]])}}
    assert float(metrics.weight_norm(tree)) == pytest.approx(13.0)
    assert float(metrics.gradient_norm(tree)) == pytest.approx(13.0)


def test_plasticity_metrics_reads_the_hidden_features_of_an_mlp():
    model, params = clx.FunctionalModel.from_module(clx.MLP(6, (5, 4), 3, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (16, 6))
    y = jnp.arange(16) % 3
    out = jax.jit(lambda p: metrics.plasticity_metrics(model, p, x, y, 0))(params)
    _, inputs = model.apply_with_taps(params, x, 0)
    hidden = [k for k in sorted(inputs) if inputs[k].shape[1] != 6]
    assert len(hidden) == 2
    assert len([n for n in out if n.startswith("effective_rank/")]) == 2, sorted(out)
    ranks = [float(metrics.effective_rank(inputs[k])) for k in hidden]
    assert float(out["effective_rank"]) == pytest.approx(np.mean(ranks), 1e-5)
    assert 0.0 <= float(out["accuracy"]) <= 1.0
    with pytest.raises(ValueError, match="apply_with_taps"):
        metrics.plasticity_metrics(object(), params, x, y, 0)
