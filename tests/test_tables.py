"""experiments.tables: every row of every published table builds a config the script accepts, and bad names
are refused before anything runs."""

import json
import os

import pytest

from experiments import methods, tables
from experiments.configs.base import SHARED_MNIST


@pytest.mark.parametrize("table", sorted(tables.TABLES))
def test_every_row_builds_a_checked_config_of_its_method(table):
    for row, (module, variant, method, published, source) in tables.TABLES[table].items():
        c = tables._config(module, variant, method, (0, 1, 2))
        assert c.method == method and tuple(c.seeds) == (0, 1, 2), row
        methods.check_config(methods.get(method), c)
        assert published is None or 0 < published <= 100, row
        assert published is None or source, row


def test_split_mnist_vdv_rows_use_each_scenarios_stream_and_strengths():
    c = tables._config("split_mnist_vdv", "domain_il", "ewc", (0,))
    assert c.stream.kind == "split_domain_il" and c.ewc.lam == 1e10 and c.si.c == 5e4
    assert not c.train.seen_classes_only
    c = tables._config("split_mnist_vdv", "class_il", "si", (0,))
    assert c.stream.kind == "split_class_il" and c.ewc.lam == 1e9 and c.si.c == 5e3
    assert c.train.seen_classes_only  # van de Ven's active classes: the class-IL loss over the classes seen so far


def test_pmnist_vdv_rows_use_each_scenarios_head_and_the_authors_strengths():
    c = tables._config("pmnist_vdv", "task_il", "online_ewc", (0,))
    assert c.stream.kind == "permuted_task_il" and (c.ewc.lam, c.online_ewc.lam, c.online_ewc.gamma) == (100, 500, 0.8)
    c = tables._config("pmnist_vdv", "domain_il", "si", (0,))
    assert c.stream.kind == "permuted" and c.si.c == 5 and not c.train.seen_classes_only
    c = tables._config("pmnist_vdv", "class_il", "ewc", (0,))
    assert c.stream.kind == "permuted_class_il" and (c.ewc.lam, c.si.c) == (1, 0.1) and c.train.seen_classes_only
    with pytest.raises(ValueError, match="pmnist_vdv takes one of"):
        tables._config("pmnist_vdv", "class", "ewc", (0,))


def test_unknown_table_or_row_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="unknown table 'nosuch'; choose one of"):
        tables.build("nosuch", str(tmp_path), (0,))
    with pytest.raises(ValueError, match=r"has no rows \['er_7'\]"):
        tables.build("split_mnist_derpp", str(tmp_path), (0,), ["er_7"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="build checks the row's data: needs ../shared/data/mnist")
def test_a_row_already_run_is_read_not_rerun(tmp_path):
    out = tmp_path / "split_mnist_derpp" / "er_200"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"acc": 0.8, "wall_seconds": 12.0}))
    text = tables.build("split_mnist_derpp", str(tmp_path), (0,), ["er_200"])
    assert "| er_200 | 80.43 | 80.00 ± 0.00 (n=1) | -0.43 | 12 |" in text
    assert (tmp_path / "split_mnist_derpp" / "TABLE.md").read_text() == text


@pytest.mark.skipif(not os.path.isdir(SHARED_MNIST), reason="build checks the row's data: needs ../shared/data/mnist")
def test_a_random_class_order_row_runs_one_run_per_seed(tmp_path, monkeypatch):
    """Members of one fit_members run share one stream, so a row whose class order is drawn from the seed runs (here:
    reads) one run per seed and reports their mean and std."""
    c = tables._config("split_mnist_vdv", "domain_il", "ewc", (1, 2))
    assert c.stream.class_order == "random"  # van de Ven's protocol: a digit-to-task order per seed
    for s, acc in ((1, 0.5), (2, 0.7)):
        out = tmp_path / "split_mnist_vdv" / "ewc_domain_il" / f"seed_{s}"
        out.mkdir(parents=True)
        (out / "results.json").write_text(json.dumps({"acc": acc, "wall_seconds": 10.0}))
    monkeypatch.setattr("experiments.run.run", lambda *a, **k: pytest.fail("a row already run was run again"))
    text = tables.build("split_mnist_vdv", str(tmp_path), (1, 2), ["ewc_domain_il"])
    assert "| ewc_domain_il | 63.95 | 60.00 ± 10.00 (n=2) | -3.95 | 20 |" in text
