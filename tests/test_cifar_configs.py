"""GPM's conv-net configs through TFDS mock data: split_cifar100_alexnet (AlexNet, thresholds 0.97 + 0.003 t) and
five_datasets_resnet (ResNet-18 on CIFAR-10, MNIST, SVHN, Fashion-MNIST, notMNIST), and the data layer they need:
clx.data.mix_sources (several datasets as one source) and the notMNIST pickles."""

import os
import pickle

import numpy as np
import pytest

import clx
from clx.data import Source, load_source, mix_sources


def _source(name, n, shape, classes, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, *shape)).astype(np.float32)
    return Source(name, x, (np.arange(n) % classes).astype(np.int32), x[:4].copy(), np.zeros(4, np.int32), classes)


def test_mix_sources_pads_widens_standardises_and_offsets_labels():
    gray = _source("gray", 12, (28, 28, 1), 3, 0)
    colour = _source("colour", 10, (32, 32, 3), 2, 1)
    mixed = mix_sources([colour, gray])
    assert mixed.input_shape == (32, 32, 3) and mixed.num_classes == 5 and mixed.name == "colour+gray"
    assert len(mixed.x_train) == 22 and len(mixed.x_test) == 8
    np.testing.assert_array_equal(mixed.y_train, np.r_[colour.y_train, gray.y_train + 2])
    np.testing.assert_array_equal(mixed.y_test, np.r_[colour.y_test, gray.y_test + 2])
    g = mixed.x_train[10:]  # the grayscale part: 2 zero pixels on each side (as GPM pads MNIST), 3 equal channels
    np.testing.assert_array_equal(g[..., 0], g[..., 1])
    np.testing.assert_array_equal(g[..., 0], g[..., 2])
    for part in (mixed.x_train[:10], g):  # each part standardised by its own training statistics
        np.testing.assert_allclose(part.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
        np.testing.assert_allclose(part.std(axis=(0, 1, 2)), 1.0, atol=1e-4)
    border = g[:, :2].reshape(-1)
    assert np.allclose(border, border[0]) and not np.allclose(g[:, 2:30, 2:30], border[0])  # the zero padding
    raw = mix_sources([colour, gray], standardize=False)
    np.testing.assert_array_equal(raw.x_train[10:, 2:30, 2:30, 1], gray.x_train[..., 0])
    assert (raw.x_train[10:, :2] == 0).all() and (raw.x_train[10:, 30:] == 0).all()
    np.testing.assert_array_equal(raw.x_train[:10], colour.x_train)
    with pytest.raises(ValueError, match="two or more"):
        mix_sources([colour])
    with pytest.raises(ValueError, match=r"\['two'\] have neither 1 nor 3 channels"):
        mix_sources([colour, _source("two", 4, (32, 32, 2), 2, 2)])
    with pytest.raises(ValueError, match="empty or repeated part"):
        load_source("digits+digits")


def _write_notmnist(directory, n_train=30, n_test=10, seed=0):
    """Fake notMNIST in the authors' format (notmnist_convert/notmnist.py): dicts of 'features' uint8
    (N, 1, 32, 32) and 'labels' uint8 (N,), pickled with the highest protocol."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    for fname, n in zip(clx.data.NOTMNIST_FILES, (n_train, n_test)):
        d = {
            "features": rng.integers(0, 256, (n, 1, 32, 32), dtype=np.uint8),
            "labels": np.arange(n, dtype=np.uint8) % 10,
        }
        with open(os.path.join(directory, fname), "wb") as f:
            pickle.dump(d, f, pickle.HIGHEST_PROTOCOL)
    return d


def test_notmnist_reads_the_authors_pickles_and_names_the_fix_when_missing(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"notmnist_train\.pkl and notmnist_test\.pkl are not in .*notmnist_convert"
    ):
        load_source("notmnist", tmp_path)
    test = _write_notmnist(tmp_path / "notmnist")
    s = load_source("notmnist", tmp_path)
    assert s.input_shape == (32, 32, 1) and s.num_classes == 10 and (len(s.x_train), len(s.x_test)) == (30, 10)
    np.testing.assert_allclose(s.x_test[..., 0], test["features"][:, 0] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(s.y_test, test["labels"])
    with open(tmp_path / "notmnist" / "notmnist_test.pkl", "wb") as f:  # a pickle that would run code is refused
        pickle.dump({"features": os.system, "labels": []}, f)
    with pytest.raises(ValueError, match=r"not the authors' pickle of numpy arrays \(UnpicklingError: global posix"):
        load_source("notmnist", tmp_path)


# --- the configs on tfds.testing.mock_data ---------------------------------------------------------------------------


@pytest.mark.slow
def test_split_cifar100_alexnet_is_gpms_setup_and_trains_on_mock_data(tmp_path):
    """The config holds the authors' values; a cut run (3 tasks of 10 mock CIFAR-100 classes, 64 examples, 1 epoch)
    trains GPM and fine-tuning, and GPM's thresholds grow by 0.003 per task."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments.configs import split_cifar100_alexnet
    from experiments.run import prepare, run

    c = split_cifar100_alexnet.get_config()
    assert (c.model.kind, c.data.source, c.stream.kind, c.stream.num_tasks) == (
        "alexnet",
        "cifar100",
        "split_task_il",
        10,
    )
    assert (c.train.lr, c.train.momentum, c.train.batch_size, c.train.epochs, c.train.eval_batch_size) == (
        0.01,
        0.0,
        64,
        200,
        64,
    )
    assert (c.gpm.threshold, c.gpm.threshold_step, tuple(c.gpm.num_samples), c.gpm.freeze_vectors) == (
        0.97,
        0.003,
        (24, 100, 100, 125, 125),
        True,
    )
    from experiments.methods.projection import _memory_args

    th = _memory_args(c, None, "gpm")["threshold"]
    assert [round(th(t), 6) for t in (0, 1, 9)] == [0.97, 0.973, 0.997]
    c.gpm.threshold_step = 0.01
    with pytest.raises(ValueError, match=r"passes 1 by the last of 10 tasks"):
        _memory_args(c, None, "gpm")
    c = split_cifar100_alexnet.get_config("sgp")  # SGP's own script: lr 0.05, alpha 10, the same schedule
    assert (c.method, c.train.lr, c.sgp.alpha, c.sgp.freeze_vectors, tuple(c.sgp.num_samples)) == (
        "sgp",
        0.05,
        10.0,
        True,
        (24, 100, 100, 125, 125),
    )
    assert round(_memory_args(c, None, "sgp")["threshold"](4), 6) == 0.982
    c = split_cifar100_alexnet.get_config("small")
    c.data.dir = str(tmp_path / "tfds")
    c.stream.train_subset = 64  # one batch per task
    c.gpm.num_samples = (8, 16, 16, 32, 32)  # the authors' pattern, cut to the 64 examples of a task
    c.model.channels, c.model.fc = (4, 8, 8), (16, 16)  # a small AlexNet (GPM's is 64-128-256, 2048-2048)
    c.progress = c.checkpoint.enabled = c.log.tensorboard = False  # orbax's saves would double the test's time
    with tfds.testing.mock_data(num_examples=1000):
        results = run(c, str(tmp_path / "out"))
    for name in ("gpm", "finetune"):
        A = np.asarray(results[name]["accuracy_matrix"])
        assert A.shape == (10, 10) and np.isfinite(np.diag(A)).all(), name
    ranks = results["gpm"]["gpm_basis_ranks"]
    assert sorted(ranks) == ["conv1/kernel", "conv2/kernel", "conv3/kernel", "fc1/kernel", "fc2/kernel"]
    assert all(0 < r for r in ranks.values())
    c = split_cifar100_alexnet.get_config("sgp")  # SGP's variant builds its rule on the same model
    c.data.dir, c.model.channels, c.model.fc = str(tmp_path / "tfds"), (4, 8, 8), (16, 16)
    with tfds.testing.mock_data(num_examples=1000):
        assert [m.name for m in prepare(c).methods] == ["sgp"]


@pytest.mark.slow
def test_five_datasets_resnet_is_gpms_setup_and_trains_on_mock_data(tmp_path):
    """The config holds the authors' values; the five TFDS/notMNIST parts form one 50-class source, 10 classes per
    task, 32x32x3; a cut run (nf = 2, 32 examples per task, 1 epoch) trains GPM on all 20 conv layers; without
    notMNIST's files the run stops naming them."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from experiments.configs import five_datasets_resnet
    from experiments.run import prepare, run

    c = five_datasets_resnet.get_config()
    assert c.data.source == "cifar10+mnist+svhn_cropped+fashion_mnist+notmnist"
    assert (c.model.kind, c.model.nf, c.stream.kind, c.stream.num_tasks) == ("resnet18", 20, "split_task_il", 5)
    assert (c.train.lr, c.train.momentum, c.train.batch_size, c.train.epochs) == (0.1, 0.0, 64, 100)
    assert (c.gpm.threshold, c.gpm.threshold_step, c.gpm.freeze_vectors) == (0.965, 0.0, True)
    assert tuple(c.gpm.num_samples) == (10,) * 9 + (50,) * 4 + (100,) * 7
    c.data.dir = str(tmp_path / "tfds")
    with tfds.testing.mock_data(num_examples=40), pytest.raises(FileNotFoundError, match="notMNIST"):
        prepare(c)
    _write_notmnist(tmp_path / "tfds" / "notmnist", n_train=40, n_test=10)
    c = five_datasets_resnet.get_config("small")
    c.data.dir = str(tmp_path / "tfds")
    c.model.nf = 2
    c.stream.train_subset = 32
    c.train.batch_size = c.train.eval_batch_size = 32
    c.gpm.num_samples = (8,) * 20
    c.method = "gpm"
    c.progress = c.checkpoint.enabled = c.log.tensorboard = False
    with tfds.testing.mock_data(num_examples=40):
        s = prepare(c).stream
        assert (s.input_shape, s.num_heads, s.num_outputs, s.source.num_classes) == ((32, 32, 3), 5, 10, 50)
        assert [s.task_classes(t) for t in (0, 4)] == [tuple(range(10)), tuple(range(40, 50))]
        x_mnist = s.task(1).x_train  # MNIST: 28x28 padded to 32, 3 equal channels, standardised
        assert np.array_equal(x_mnist[..., 0], x_mnist[..., 2]) and abs(float(x_mnist.mean())) < 0.5
        results = run(c, str(tmp_path / "out"))
    A = np.asarray(results["gpm"]["accuracy_matrix"])
    assert A.shape == (5, 5) and np.isfinite(np.diag(A)).all()
    assert len(results["gpm"]["gpm_basis_ranks"]) == 20
