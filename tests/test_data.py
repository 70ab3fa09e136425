"""Tests for clx.data: sources (digits, MNIST IDX, TFDS via mock_data) and task streams."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from clx import data
from clx.data import Source, _sources, load_source, make_stream

MNIST_DIR = os.environ.get("CLX_MNIST_DIR", "/work/shared/data/mnist")
if not os.path.isdir(MNIST_DIR):  # the repo's shared data, relative to a checkout
    MNIST_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "mnist")

FAST = settings(max_examples=20, deadline=None)


# --------------------------------------------------------------------------- #
# helpers / fixtures
# --------------------------------------------------------------------------- #


def synthetic_source(num_classes=6, per_class=5, shape=(4, 5, 2), seed=0, name="syn"):
    """Gaussian pixels (all distinct a.s.), every class present in train and test."""
    rng = np.random.default_rng(seed)
    n_tr, n_te = num_classes * per_class, num_classes * 2
    y_tr = rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int32)
    y_te = rng.permutation(np.repeat(np.arange(num_classes), 2)).astype(np.int32)
    return Source(
        name=name,
        x_train=rng.standard_normal((n_tr, *shape)).astype(np.float32),
        y_train=y_tr,
        x_test=rng.standard_normal((n_te, *shape)).astype(np.float32),
        y_test=y_te,
        num_classes=num_classes,
    )


@pytest.fixture(scope="module")
def digits():
    return load_source("digits")


@pytest.fixture(scope="module")
def mnist():
    if not all(os.path.isfile(os.path.join(MNIST_DIR, n)) for pair in data.MNIST_FILES.values() for n in pair):
        pytest.skip(f"MNIST files not found in {MNIST_DIR}")
    return load_source("mnist", data_dir=MNIST_DIR)


def task_arrays(task):
    return (task.x_train, task.y_train, task.x_test, task.y_test)


def assert_tasks_equal(a, b):
    assert a.task_id == b.task_id and a.classes == b.classes
    for u, v in zip(task_arrays(a), task_arrays(b)):
        assert u.dtype == v.dtype and u.shape == v.shape
        assert u.tobytes() == v.tobytes()


def recover_perm(src_img, task_img):
    """The permutation p with task_img == src_img[p] (pixels are distinct)."""
    s, t = src_img.ravel(), task_img.ravel()
    perm = np.empty(len(s), np.int64)
    perm[np.argsort(t, kind="stable")] = np.argsort(s, kind="stable")
    return perm


# --------------------------------------------------------------------------- #
# Source validation
# --------------------------------------------------------------------------- #


def _good_arrays():
    s = synthetic_source()
    return dict(
        name="s",
        x_train=s.x_train,
        y_train=s.y_train,
        x_test=s.x_test,
        y_test=s.y_test,
        num_classes=6,
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (
            dict(y_train=np.array([0, 6, -1] + [1] * 27, np.int32)),
            r"y_train has 2 labels outside \[0, 6\): values -1, 6\. Fix: remap",
        ),
        (dict(y_test=np.full((12,), 9, np.int32)), r"y_test has 12 labels outside \[0, 6\): values 9\. Fix"),
        (dict(x_train=np.zeros((30, 4, 5), np.float32)), r"x_train must be 4-D .*x\[\.\.\., None\]"),
        (dict(x_test=np.zeros((12, 4, 5, 2), np.float64)), r"x_test must be float32, got float64.*astype"),
        (dict(y_train=np.zeros((30,), np.int64)), r"y_train must be int32, got int64"),
        (dict(y_train=np.zeros((30, 6), np.int32)), r"y_train must be 1-D.*one-hot"),
        (dict(y_test=np.zeros((11,), np.int32)), r"x_test has 12 images but y_test has 11 labels"),
        (dict(x_test=np.zeros((12, 5, 4, 2), np.float32)), r"same \(H, W, C\)"),
        (dict(num_classes=0), r"num_classes must be >= 1"),
        (dict(x_train=[[0.0]]), r"must be numpy arrays.*np\.asarray"),
    ],
)
def test_source_validation(change, match):
    kwargs = _good_arrays()
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        Source(**kwargs)


def test_source_ok_and_input_shape():
    s = Source(**_good_arrays())
    assert s.input_shape == (4, 5, 2)


# --------------------------------------------------------------------------- #
# digits
# --------------------------------------------------------------------------- #


def test_digits_source(digits):
    from sklearn.datasets import load_digits

    full = load_digits()
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.x_train.shape == (1438, 8, 8, 1) and digits.x_test.shape == (359, 8, 8, 1)
    assert digits.x_train.dtype == np.float32 and digits.y_train.dtype == np.int32
    assert digits.x_train.min() == 0.0 and digits.x_train.max() == 1.0
    np.testing.assert_array_equal(digits.x_train * 16, np.round(digits.x_train * 16))
    # Stratified: each class sends round(0.2 * n_c) examples to test, the rest to train.
    n_c = np.bincount(full.target, minlength=10)
    np.testing.assert_array_equal(np.bincount(digits.y_test, minlength=10), np.round(0.2 * n_c))
    np.testing.assert_array_equal(
        np.bincount(digits.y_train, minlength=10) + np.bincount(digits.y_test, minlength=10), n_c
    )
    # Every image of the split is an image of the dataset, with its label.
    all_x = np.concatenate([digits.x_train, digits.x_test]).reshape(-1, 64) * 16
    all_y = np.concatenate([digits.y_train, digits.y_test])
    key = lambda x, y: sorted(map(bytes, np.column_stack([x, y]).astype(np.uint8)))  # noqa: E731
    assert key(all_x, all_y) == key(full.data, full.target)


def test_digits_split_is_fixed(digits):
    again = load_source("DIGITS")  # names are case-insensitive
    for f in ("x_train", "y_train", "x_test", "y_test"):
        assert getattr(digits, f).tobytes() == getattr(again, f).tobytes()


# --------------------------------------------------------------------------- #
# MNIST (real files)
# --------------------------------------------------------------------------- #


def test_mnist_known_statistics(mnist):
    assert mnist.num_classes == 10
    assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.x_test.shape == (10000, 28, 28, 1)
    assert mnist.x_train.dtype == np.float32 and mnist.y_train.dtype == np.int32
    assert mnist.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.y_test[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(mnist.y_train).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(mnist.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    # (x/255 - 0.1307)/0.3081: background pixel value, and train mean/std ~ 0/1.
    np.testing.assert_allclose(mnist.x_train.min(), -0.1307 / 0.3081, rtol=1e-6)
    np.testing.assert_allclose(mnist.x_train.max(), (1 - 0.1307) / 0.3081, rtol=1e-6)
    assert abs(float(mnist.x_train.mean(dtype=np.float64))) < 1e-3
    assert abs(float(mnist.x_train.std(dtype=np.float64)) - 1.0) < 1e-3


def test_permuted_mnist_task(mnist):
    stream = make_stream(mnist, "permuted", 10, seed=3, train_subset=50)
    task = stream.task(9)
    assert task.x_train.shape == (50, 28, 28, 1) and task.x_test.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(task.y_test, mnist.y_test)
    np.testing.assert_array_equal(
        np.sort(task.x_test.reshape(10000, -1), axis=1), np.sort(mnist.x_test.reshape(10000, -1), axis=1)
    )
    assert not np.array_equal(task.x_test, mnist.x_test)


# --------------------------------------------------------------------------- #
# MNIST IDX parsing and its errors (small fake files in tmp_path)
# --------------------------------------------------------------------------- #


def idx_bytes(magic, arr):
    return struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def write_gz(path, payload):
    with gzip.open(path, "wb") as f:
        f.write(payload)


def write_fake_mnist(d, n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    raw = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = data.MNIST_FILES[split]
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, (n,), dtype=np.uint8)
        write_gz(d / img_name, idx_bytes(2051, x))
        write_gz(d / lbl_name, idx_bytes(2049, y))
        raw[split] = (x, y)
    return raw


def write_sums(d):
    lines = []
    for pair in data.MNIST_FILES.values():
        for n in pair:
            lines.append(f"{hashlib.sha256((d / n).read_bytes()).hexdigest()}  {n}\n")
    (d / "SHA256SUMS").write_text("".join(lines))


def test_fake_mnist_roundtrip_and_normalisation(tmp_path):
    raw = write_fake_mnist(tmp_path)
    write_sums(tmp_path)  # a correct SHA256SUMS is checked and passes
    src = load_source("mnist", data_dir=str(tmp_path))
    for split in ("train", "test"):
        x, y = raw[split]
        got_x, got_y = getattr(src, f"x_{split}"), getattr(src, f"y_{split}")
        assert got_x.shape == (len(x), 28, 28, 1) and got_x.dtype == np.float32
        np.testing.assert_allclose(got_x[..., 0], (x / 255.0 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got_y, y)


def test_mnist_needs_data_dir():
    with pytest.raises(ValueError, match=r"needs data_dir: pass the directory"):
        load_source("mnist")


def test_mnist_missing_files(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"2 file\(s\) missing.*train-labels-idx1-ubyte\.gz, "
        r"t10k-images-idx3-ubyte\.gz\. .*named exactly train-images-idx3-ubyte\.gz",
    ):
        load_source("mnist", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"4 file\(s\) missing"):
        load_source("mnist", data_dir=tmp_path / "nope")


def test_mnist_truncated_gzip(tmp_path):
    write_fake_mnist(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz is not a readable gzip file.*truncated"):
        load_source("mnist", data_dir=tmp_path)


def test_mnist_not_gzip(tmp_path):
    write_fake_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"definitely not gzip data")
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz is not a readable gzip file"):
        load_source("mnist", data_dir=tmp_path)


def test_mnist_wrong_magic(tmp_path):
    write_fake_mnist(tmp_path)
    # A labels file in the images slot: magic 2049 where 2051 is expected.
    write_gz(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(2049, np.zeros((4,), np.uint8)))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz has IDX magic number 2049, expected 2051"):
        load_source("mnist", data_dir=tmp_path)


def test_mnist_bad_payload_length(tmp_path):
    write_fake_mnist(tmp_path)
    x = np.zeros((6, 28, 28), np.uint8)
    write_gz(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(2051, x)[:-100])
    with pytest.raises(
        ValueError,
        match=r"train-images-idx3-ubyte\.gz header says images of shape "
        r"\(6, 28, 28\) = 4704 bytes but the payload has 4604 bytes",
    ):
        load_source("mnist", data_dir=tmp_path)
    write_gz(tmp_path / "train-images-idx3-ubyte.gz", b"\x00\x00\x08")
    with pytest.raises(ValueError, match=r"fewer than the 16-byte IDX images header"):
        load_source("mnist", data_dir=tmp_path)


def test_mnist_count_mismatch(tmp_path):
    write_fake_mnist(tmp_path)
    write_gz(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(2049, np.zeros((5,), np.uint8)))
    with pytest.raises(
        ValueError,
        match=r"train-images-idx3-ubyte\.gz has 6 images but "
        r"train-labels-idx1-ubyte\.gz has 5 labels",
    ):
        load_source("mnist", data_dir=tmp_path)


def test_mnist_label_out_of_range(tmp_path):
    write_fake_mnist(tmp_path)
    write_gz(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(2049, np.array([1, 10, 12, 3], np.uint8)))
    with pytest.raises(ValueError, match=r"y_test has 2 labels outside \[0, 10\): values 10, 12"):
        load_source("mnist", data_dir=tmp_path)


def test_mnist_sha256_mismatch(tmp_path):
    write_fake_mnist(tmp_path)
    write_sums(tmp_path)
    write_fake_mnist(tmp_path, seed=1)  # same shapes, other bytes: only the hash can tell
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz fails its SHA256 check"):
        load_source("mnist", data_dir=tmp_path)
    (tmp_path / "SHA256SUMS").write_text("not a checksum line\n")
    with pytest.raises(ValueError, match=r"SHA256SUMS line 1 is not"):
        load_source("mnist", data_dir=tmp_path)


# --------------------------------------------------------------------------- #
# TFDS path (tfds.testing.mock_data; no network, no TensorFlow)
# --------------------------------------------------------------------------- #


def test_tfds_mock_data_source(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=40):
        src = load_source("cifar10", data_dir=tmp_path)
        raw = tfds.data_source("cifar10", split="train", data_dir=tmp_path)
        raw_x = np.stack([raw[i]["image"] for i in range(len(raw))])
        raw_y = np.array([raw[i]["label"] for i in range(len(raw))])
        src100 = load_source("cifar100", data_dir=tmp_path)
    assert src.name == "cifar10" and src.num_classes == 10 and src100.num_classes == 100
    assert src.x_train.shape == (40, 32, 32, 3) and src.x_test.shape == (40, 32, 32, 3)
    assert src.x_train.dtype == np.float32 and src.y_train.dtype == np.int32
    np.testing.assert_array_equal(src.x_train, raw_x.astype(np.float32) / 255)
    np.testing.assert_array_equal(src.y_train, raw_y)
    assert 0.0 <= src.x_train.min() and src.x_train.max() <= 1.0
    assert src.x_train.std() > 0.1  # random images, not constants
    stream = make_stream(src, "permuted", 2, seed=0)
    assert stream.input_shape == (32, 32, 3) and stream.task(1).x_train.shape == (40, 32, 32, 3)


def test_tfds_unknown_name():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(
        ValueError,
        match=r"unknown dataset 'no_such_dataset_xyz'\. Built-in names: "
        r"'digits', 'mnist'",
    ):
        load_source("no_such_dataset_xyz")


def test_tfds_not_prepared(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(
        ValueError,
        match=r"load_source\('cifar10'\): TFDS could not find or prepare.*"
        r"Built-in names are 'digits', 'mnist', 'notmnist'; a TFDS dataset must be prepared under data_dir",
    ):
        load_source("cifar10", data_dir=tmp_path, download=False)


_TINY = {"train": ("train", 40), "test": ("t10k", 20)}  # split -> (IDX file prefix, examples kept)


@pytest.fixture(scope="module")
def tiny_mnist_builder():
    """A TFDS builder (registered as ``clx_test_tiny_mnist``) that prepares the first MNIST images of each split
    from the IDX files in its manual directory: TFDS's own preparation path, offline and without TensorFlow
    (``tfds.features.Tensor``, not ``Image``, whose PNG encoding needs TensorFlow)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    if not all(os.path.isfile(os.path.join(MNIST_DIR, n)) for pair in data.MNIST_FILES.values() for n in pair):
        pytest.skip(f"MNIST files not found in {MNIST_DIR}")

    class ClxTestTinyMnist(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        MANUAL_DOWNLOAD_INSTRUCTIONS = "The four MNIST IDX .gz files."

        def _info(self):
            features = {
                "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=10),
            }
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(dl_manager.manual_dir, *_TINY[split]) for split in _TINY}

        def _generate_examples(self, manual_dir, prefix, n):
            with gzip.open(manual_dir / f"{prefix}-images-idx3-ubyte.gz") as f:
                x = np.frombuffer(f.read(), np.uint8, offset=16)[: n * 784].reshape(n, 28, 28, 1)
            with gzip.open(manual_dir / f"{prefix}-labels-idx1-ubyte.gz") as f:
                y = np.frombuffer(f.read(), np.uint8, offset=8)[:n]
            for i in range(n):
                yield i, {"image": x[i], "label": int(y[i])}

    return ClxTestTinyMnist


def _manual_dir(tmp_path):
    """A TFDS data_dir whose default manual directory (``downloads/manual``) holds the MNIST IDX files."""
    manual = tmp_path / "downloads" / "manual"
    manual.mkdir(parents=True)
    for pair in data.MNIST_FILES.values():
        for n in pair:
            os.symlink(os.path.join(os.path.abspath(MNIST_DIR), n), manual / n)
    return tmp_path


def test_tfds_prepares_from_local_files_offline(tiny_mnist_builder, tmp_path):
    """load_source prepares a TFDS dataset from manual files (no network) and reads it back: in a fresh
    install this needs importlib_resources, which tensorflow-datasets imports but does not declare."""
    ref = load_source("mnist", data_dir=MNIST_DIR, scale="unit")
    src = load_source("clx_test_tiny_mnist", data_dir=_manual_dir(tmp_path))
    assert (tmp_path / "clx_test_tiny_mnist" / "1.0.0").is_dir()
    assert src.num_classes == 10 and src.x_train.shape == (40, 28, 28, 1) and src.x_test.shape == (20, 28, 28, 1)
    for split, (_, n) in _TINY.items():  # TFDS shuffles the records: compare as sets of (image, label)
        got = sorted((x.tobytes(), int(y)) for x, y in zip(getattr(src, f"x_{split}"), getattr(src, f"y_{split}")))
        want = sorted(
            (x.tobytes(), int(y)) for x, y in zip(getattr(ref, f"x_{split}")[:n], getattr(ref, f"y_{split}")[:n])
        )
        assert got == want
    again = load_source("clx_test_tiny_mnist", data_dir=tmp_path, download=False)  # prepared: no manual files needed
    np.testing.assert_array_equal(again.x_train, src.x_train)


def _prepare_tfds_mnist(data_dir):
    """TFDS's own MNIST builder, prepared through clx from the IDX files in ``data_dir``'s manual directory."""
    from tensorflow_datasets.core import dataset_builder

    # Where TFDS uses importlib_resources, cached per process (lru_cache): recomputed in each test.
    caches = [dataset_builder.DatasetBuilder.__dict__[k].fget.__func__ for k in ("code_path", "url_infos")]
    for cache in caches:
        cache.cache_clear()
    try:
        return _sources._load_tfds("mnist", _manual_dir(data_dir), True)
    finally:
        for cache in caches:
            cache.cache_clear()


def test_tfds_mnist_preparation_error_names_the_missing_module(tmp_path):
    """TFDS's MNIST builder needs TensorFlow to extract the files: the error names the module and the
    pip install, not "prepare the dataset" (and it gets that far: importlib_resources is installed)."""
    pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("importlib_resources")  # a clx dependency
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: TFDS would prepare all of MNIST")
    with pytest.raises(ModuleNotFoundError, match=r"TFDS needs the Python module 'tensorflow'") as info:
        _prepare_tfds_mnist(tmp_path)
    assert "`pip install tensorflow`" in str(info.value) and "prepared under data_dir" not in str(info.value)


def test_tfds_missing_importlib_resources_names_it(tmp_path, monkeypatch):
    """Without importlib_resources (tensorflow-datasets imports it when it prepares data but declares it only
    for Python < 3.9) the error names it and the pip install."""
    pytest.importorskip("tensorflow_datasets")
    from tensorflow_datasets.core import dataset_builder

    class Missing:
        def __getattr__(self, attr):
            raise ModuleNotFoundError("No module named 'importlib_resources'", name="importlib_resources")

    monkeypatch.setattr(dataset_builder, "importlib_resources", Missing())
    with pytest.raises(ModuleNotFoundError) as info:
        _prepare_tfds_mnist(tmp_path)
    msg = str(info.value)
    assert "TFDS needs the Python module 'importlib_resources'" in msg and "`pip install importlib_resources`" in msg
    assert info.value.name == "importlib_resources" and "prepared under data_dir" not in msg


class _FakeDataSource:
    """A random-access source like tfds's ArrayRecordDataSource, batched reads counted."""

    def __init__(self, n):
        self.n, self.batched_calls = n, 0

    def __len__(self):
        return self.n

    def _rec(self, i):
        return {"image": np.full((3, 2, 1), i % 256, np.uint8), "label": np.int64(i % 4)}

    def __getitem__(self, i):
        return self._rec(i)

    def __getitems__(self, keys):
        self.batched_calls += 1
        return [self._rec(i) for i in keys]


def test_tfds_split_reader_uses_batched_reads():
    fake = _FakeDataSource(2500)
    x, y = data._read_tfds_split("fake", "train", fake)
    assert fake.batched_calls == 3  # chunks of 1024
    assert x.shape == (2500, 3, 2, 1) and x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 0, 0, 0], (np.arange(2500) % 256).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, np.arange(2500) % 4)


# --------------------------------------------------------------------------- #
# streams: configuration and errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "kind, scenario, outputs, heads",
    [
        ("permuted", "domain_il", 6, 1),
        ("rotated", "domain_il", 6, 1),
        ("split_task_il", "task_il", 2, 3),
        ("split_domain_il", "domain_il", 2, 1),
        ("split_class_il", "class_il", 6, 1),
        ("label_permuted", "domain_il", 6, 1),
        ("permuted_task_il", "task_il", 6, 3),
        ("permuted_class_il", "class_il", 18, 1),
    ],
)
def test_stream_attributes(kind, scenario, outputs, heads):
    src = synthetic_source()
    stream = make_stream(src, kind, 3)
    assert (stream.kind, stream.scenario, stream.num_outputs, stream.num_heads) == (kind, scenario, outputs, heads)
    assert stream.num_tasks == len(stream) == 3 and stream.input_shape == (4, 5, 2)
    tasks = list(stream)
    assert [t.task_id for t in tasks] == [0, 1, 2]
    for t in tasks:
        for a in task_arrays(t):
            assert not a.flags.writeable
        assert t.x_train.dtype == np.float32 and t.y_train.dtype == np.int32
        assert t.y_train.min() >= 0 and t.y_train.max() < stream.num_outputs
        assert t.y_test.min() >= 0 and t.y_test.max() < stream.num_outputs
    assert src.x_train.flags.writeable  # the source is never touched
    assert_tasks_equal(stream.task(1), stream.task(1))  # repeatable (and cached tests)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (
            dict(kind="shuffled", num_tasks=2),
            ValueError,
            r"unknown kind 'shuffled'; valid kinds are 'permuted', 'rotated', 'split_task_il', 'split_domain_il', "
            r"'split_class_il'",
        ),
        (dict(kind="permuted", num_tasks=0), ValueError, r"num_tasks must be >= 1, got 0"),
        (
            dict(kind="split_task_il", num_tasks=4),
            ValueError,
            r"6 classes and num_tasks=4; use num_tasks in \[1, 2, 3, 6\]",
        ),
        (dict(kind="split_class_il", num_tasks=7), ValueError, r"use num_tasks in \[1, 2, 3, 6\]"),
        (
            dict(kind="split_class_il", num_tasks=2, class_order="sorted"),
            ValueError,
            r"class_order must be 'natural' or 'random'",
        ),
        (dict(kind="permuted", num_tasks=2, train_subset=0), ValueError, r"train_subset must be None or an int >= 1"),
        (dict(kind="permuted", num_tasks=2, seed=-1), ValueError, r"seed must be a non-negative int"),
        (dict(kind="rotated", num_tasks=2, max_angle=float("nan")), ValueError, r"max_angle must be a finite"),
    ],
)
def test_stream_config_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        make_stream(synthetic_source(), **kwargs)


def test_stream_task_id_errors():
    stream = make_stream(synthetic_source(), "permuted", 3)
    with pytest.raises(IndexError, match=r"task id 3 out of range: this stream has 3 tasks, ids 0\.\.2"):
        stream.task(3)
    with pytest.raises(IndexError, match=r"task id -1 out of range"):
        stream.task(-1)
    with pytest.raises(TypeError, match=r"task id must be an integer"):
        stream.task(1.0)
    assert stream.task(np.int64(2)).task_id == 2


def test_split_rejects_empty_class():
    s = synthetic_source()
    y = s.y_train.copy()
    y[y == 4] = 0
    src = Source("gap", s.x_train, y, s.x_test, s.y_test, 6)
    with pytest.raises(ValueError, match=r"classes \[4\] of 'gap' have no training examples"):
        make_stream(src, "split_task_il", 3)


def test_make_stream_needs_source():
    with pytest.raises(ValueError, match=r"source must be a clx\.data\.Source"):
        make_stream(np.zeros((3, 2, 2, 1)), "permuted", 2)


# --------------------------------------------------------------------------- #
# streams: properties
# --------------------------------------------------------------------------- #

KIND = st.sampled_from(list(data.KINDS))


@FAST
@given(
    kind=KIND,
    seed=st.integers(0, 2**31),
    num_tasks=st.sampled_from([1, 2, 3, 6]),
    subset=st.one_of(st.none(), st.integers(1, 40)),
    order=st.sampled_from(["natural", "random"]),
)
def test_streams_deterministic_for_seed(kind, seed, num_tasks, subset, order):
    src = synthetic_source()
    kw = dict(class_order=order, train_subset=subset, max_angle=90.0)
    a = make_stream(src, kind, num_tasks, seed, **kw)
    b = make_stream(src, kind, num_tasks, seed, **kw)
    for t in range(num_tasks):
        assert_tasks_equal(a.task(t), b.task(t))


@FAST
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(1, 4))
def test_permuted_different_seed_differs(seed, num_tasks):
    src = synthetic_source()
    a = make_stream(src, "permuted", num_tasks, seed)
    b = make_stream(src, "permuted", num_tasks, seed + 1)
    for t in range(num_tasks):
        assert not np.array_equal(a.task(t).x_train, b.task(t).x_train)
    if num_tasks > 1:  # tasks of one stream differ from each other too
        assert not np.array_equal(a.task(0).x_train, a.task(1).x_train)


@FAST
@given(seed=st.integers(0, 2**31), num_tasks=st.integers(1, 5))
def test_label_permuted_relabels_each_task_by_a_permutation_and_keeps_the_inputs(seed, num_tasks):
    src = synthetic_source()
    stream = make_stream(src, "label_permuted", num_tasks, seed)
    perms = []
    for t in range(num_tasks):
        task = stream.task(t)
        np.testing.assert_array_equal(task.x_train, src.x_train)  # inputs untouched
        np.testing.assert_array_equal(task.x_test, src.x_test)
        perm = np.full(src.num_classes, -1)
        for split_src, split_task in ((src.y_train, task.y_train), (src.y_test, task.y_test)):
            for c in range(src.num_classes):  # one label per class, the same in train and test
                got = np.unique(split_task[split_src == c])
                assert len(got) == 1 and perm[c] in (-1, got[0])
                perm[c] = got[0]
        assert sorted(perm) == list(range(src.num_classes))  # a permutation of the classes
        perms.append(tuple(perm))
    if num_tasks >= 3:  # 6 classes: 720 permutations, three equal draws are (nearly) impossible
        assert len(set(perms)) > 1


def test_random_class_order_and_subset_depend_on_seed():
    src = synthetic_source(num_classes=10, per_class=4)
    orders = {make_stream(src, "split_class_il", 5, s, class_order="random").class_order for s in range(5)}
    assert len(orders) > 1
    assert make_stream(src, "split_class_il", 5, 0).class_order == tuple(range(10))
    subsets = [make_stream(src, "rotated", 2, s, train_subset=10).task(1).y_train.tobytes() for s in range(5)]
    assert len(set(subsets)) > 1


@FAST
@given(
    seed=st.integers(0, 2**31),
    num_tasks=st.integers(1, 4),
    shape=st.tuples(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3)),
    subset=st.one_of(st.none(), st.integers(1, 20)),
)
def test_permuted_task_is_pure_permutation(seed, num_tasks, shape, subset):
    src = synthetic_source(shape=shape, seed=seed % 7)
    stream = make_stream(src, "permuted", num_tasks, seed, train_subset=subset)
    d = int(np.prod(shape))
    sx_tr, sx_te = src.x_train.reshape(len(src.x_train), d), src.x_test.reshape(len(src.x_test), d)
    for t in range(num_tasks):
        task = stream.task(t)
        assert task.classes == tuple(range(6))
        tx_te = task.x_test.reshape(len(task.x_test), d)
        # Sorting each image's pixels gives the source's.
        np.testing.assert_array_equal(np.sort(tx_te, axis=1), np.sort(sx_te, axis=1))
        # One permutation for every image of the task, train and test alike.
        perm = recover_perm(sx_te[0], tx_te[0])
        np.testing.assert_array_equal(tx_te, sx_te[:, perm])
        np.testing.assert_array_equal(task.y_test, src.y_test)
        if subset is None:
            np.testing.assert_array_equal(task.x_train.reshape(-1, d), sx_tr[:, perm])
            np.testing.assert_array_equal(task.y_train, src.y_train)
        else:
            assert len(task.y_train) == min(subset, len(src.y_train))
            # Each kept example is a permuted source example with its own label.
            rows = {bytes(r): y for r, y in zip(sx_tr[:, perm], src.y_train)}
            for r, y in zip(task.x_train.reshape(-1, d), task.y_train):
                assert rows[bytes(r)] == y
    if d >= 6:
        perm0 = recover_perm(sx_te[0], stream.task(0).x_test.reshape(-1, d)[0])
        assert not np.array_equal(perm0, np.arange(d))  # task 0 is permuted too


@FAST
@given(
    kind=st.sampled_from(["split_task_il", "split_domain_il", "split_class_il"]),
    ct=st.sampled_from([(2, 1), (2, 2), (4, 2), (6, 3), (6, 2), (10, 5), (9, 3)]),
    seed=st.integers(0, 2**31),
    order=st.sampled_from(["natural", "random"]),
)
def test_split_partition_and_label_remap(kind, ct, seed, order):
    num_classes, num_tasks = ct
    k = num_classes // num_tasks
    src = synthetic_source(num_classes=num_classes, per_class=3, seed=seed % 5)
    stream = make_stream(src, kind, num_tasks, seed, class_order=order)
    class_order = stream.class_order
    assert sorted(class_order) == list(range(num_classes))
    if order == "natural":
        assert class_order == tuple(range(num_classes))
    assert stream.num_outputs == (num_classes if kind == "split_class_il" else k)
    assert stream.num_heads == (num_tasks if kind == "split_task_il" else 1)
    seen = []
    for t in range(num_tasks):
        task = stream.task(t)
        assert task.classes == class_order[t * k : (t + 1) * k]
        seen.extend(task.classes)
        for split in ("train", "test"):
            sx, sy = getattr(src, f"x_{split}"), getattr(src, f"y_{split}")
            mask = np.isin(sy, task.classes)
            tx, ty = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
            np.testing.assert_array_equal(tx, sx[mask])  # exactly the task's examples, in order
            orig = sy[mask]
            if kind != "split_class_il":  # task-IL and domain-IL: the position inside the group
                want = [task.classes.index(c) for c in orig]
                assert set(ty.tolist()) <= set(range(k))
            else:
                want = [class_order.index(c) for c in orig]
                assert set(ty.tolist()) <= set(range(t * k, (t + 1) * k))
            assert ty.tolist() == want
    # The tasks partition the classes.
    assert sorted(seen) == list(range(num_classes)) and len(seen) == len(set(seen))
    assert sum(len(stream.task(t).y_train) for t in range(num_tasks)) == len(src.y_train)


def test_split_digits_task_il_labels(digits):
    stream = make_stream(digits, "split_task_il", 5)
    task = stream.task(3)
    assert task.classes == (6, 7)
    np.testing.assert_array_equal(task.y_train, digits.y_train[np.isin(digits.y_train, (6, 7))] - 6)
    dil = make_stream(digits, "split_domain_il", 5).task(3)  # "first or second digit of the pair"
    np.testing.assert_array_equal(dil.y_train, task.y_train)
    cil = make_stream(digits, "split_class_il", 5).task(3)
    np.testing.assert_array_equal(cil.y_test, digits.y_test[np.isin(digits.y_test, (6, 7))])


@pytest.mark.parametrize("seed", [0, 3])
def test_permuted_scenarios_share_the_inputs_and_shift_the_class_il_labels(seed):
    """van de Ven & Tolias's three Permuted-MNIST scenarios: the same permuted images in every scenario; task-IL
    and domain-IL keep the digit as the label (task-IL with one head per task), class-IL gives task t's digit c the
    label t * C + c of one head of T * C outputs."""
    src = synthetic_source()
    C, T = src.num_classes, 3
    dom = make_stream(src, "permuted", T, seed)
    til = make_stream(src, "permuted_task_il", T, seed)
    cil = make_stream(src, "permuted_class_il", T, seed)
    assert (til.num_heads, til.num_outputs, cil.num_heads, cil.num_outputs) == (T, C, 1, T * C)
    for t in range(T):
        d, a, c = dom.task(t), til.task(t), cil.task(t)
        for x in (a.x_train, c.x_train):
            assert x.tobytes() == d.x_train.tobytes()
        assert a.x_test.tobytes() == d.x_test.tobytes() == c.x_test.tobytes()
        np.testing.assert_array_equal(a.y_train, src.y_train)
        np.testing.assert_array_equal(c.y_train, src.y_train + t * C)
        np.testing.assert_array_equal(c.y_test, src.y_test + t * C)
        assert c.classes == a.classes == tuple(range(C))


@FAST
@given(subset=st.integers(1, 40), seed=st.integers(0, 1000))
def test_split_train_subset(subset, seed):
    src = synthetic_source(per_class=8)
    full = make_stream(src, "split_task_il", 3, seed)
    sub = make_stream(src, "split_task_il", 3, seed, train_subset=subset)
    for t in range(3):
        f, s = full.task(t), sub.task(t)
        assert len(s.y_train) == min(subset, len(f.y_train))
        rows = {bytes(x): y for x, y in zip(f.x_train, f.y_train)}
        assert len({bytes(x) for x in s.x_train}) == len(s.y_train)  # no repeats
        for x, y in zip(s.x_train, s.y_train):
            assert rows[bytes(x)] == y
        np.testing.assert_array_equal(s.x_test, f.x_test)  # test sets are never cut


def test_rotated_task0_is_source(digits):
    stream = make_stream(digits, "rotated", 4)
    task = stream.task(0)
    np.testing.assert_array_equal(task.x_train, digits.x_train)
    np.testing.assert_array_equal(task.x_test, digits.x_test)
    np.testing.assert_array_equal(task.y_train, digits.y_train)
    assert not np.allclose(stream.task(1).x_train, digits.x_train)


def test_rotated_180_is_a_flip(digits):
    stream = make_stream(digits, "rotated", 2, max_angle=360.0)  # task 1: 180 degrees
    task = stream.task(1)
    np.testing.assert_allclose(task.x_test, np.flip(digits.x_test, axis=(1, 2)), atol=1e-5)
    np.testing.assert_array_equal(task.y_test, digits.y_test)


@FAST
@given(num_tasks=st.integers(1, 5), max_angle=st.floats(-360, 360), t=st.integers(0, 4))
def test_rotated_angle_schedule(num_tasks, max_angle, t):
    t = t % num_tasks
    src = synthetic_source(shape=(7, 7, 1))
    task = make_stream(src, "rotated", num_tasks, max_angle=max_angle).task(t)
    angle = t * max_angle / num_tasks
    want = ndimage.rotate(src.x_test, angle, axes=(1, 2), reshape=False, order=1, cval=float(src.x_train.min()))
    np.testing.assert_allclose(task.x_test, want, atol=1e-6)
    assert task.x_test.dtype == np.float32 and task.x_test.shape == src.x_test.shape


def test_rotated_mnist_corners_are_background(mnist):
    task = make_stream(mnist, "rotated", 2, max_angle=90.0, train_subset=20).task(1)  # 45 degrees
    background = np.float32(-0.1307 / 0.3081)
    np.testing.assert_allclose(task.x_train[:, 0, 0, 0], background, rtol=1e-6)


def test_scale_and_pad_options():
    base = data.load_source("digits")
    padded = data.load_source("digits", pad=2)
    assert padded.x_train.shape[1:] == (12, 12, 1)
    np.testing.assert_array_equal(padded.x_train[:, 2:-2, 2:-2], base.x_train)
    assert np.all(padded.x_test[:, :2] == base.x_train.min())  # background, not a new value
    with pytest.raises(ValueError, match="scale must be 'default' or 'unit'"):
        data.load_source("digits", scale="minmax")
    with pytest.raises(ValueError, match="pad must be >= 0"):
        data.load_source("digits", pad=-1)


def test_mnist_unit_scale(mnist):
    unit = data.load_source("mnist", MNIST_DIR, scale="unit")
    assert unit.x_train.min() == 0.0 and unit.x_train.max() == 1.0
    np.testing.assert_allclose((unit.x_test[:50] - data.MNIST_MEAN) / data.MNIST_STD, mnist.x_test[:50], atol=1e-5)


# --------------------------------------------------------------------------- #
# TaskStream.test_set
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize(
    "kind",
    [
        "permuted",
        "rotated",
        "split_task_il",
        "split_domain_il",
        "split_class_il",
        "permuted_task_il",
        "permuted_class_il",
    ],
)
def test_test_set_equals_task_test_split(kind, cache, monkeypatch):
    if not cache:  # the uncached path recomputes the test split every call
        monkeypatch.setattr("clx.data._streams._TEST_CACHE_BYTES", 0)
    src = synthetic_source()
    kw = dict(train_subset=7, class_order="random", max_angle=90.0)
    for t in range(3):
        # A fresh stream per order, so neither call can reuse the other's cache.
        x_te, y_te = make_stream(src, kind, 3, seed=5, **kw).test_set(t)
        task = make_stream(src, kind, 3, seed=5, **kw).task(t)
        for got, want in ((x_te, task.x_test), (y_te, task.y_test)):
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes()
            assert not got.flags.writeable


def test_test_set_builds_no_training_arrays(monkeypatch):
    monkeypatch.setattr("clx.data._streams._TEST_CACHE_BYTES", 0)
    src = synthetic_source()
    stream = make_stream(src, "permuted", 3, seed=1)
    sizes = []
    transform = stream._transform
    monkeypatch.setattr(stream, "_transform", lambda t, x, y: sizes.append(len(x)) or transform(t, x, y))
    stream.test_set(2)
    assert sizes == [len(src.y_test)]


@pytest.mark.parametrize("bad", [3, -1, 10, 1.0, "0", None])
def test_test_set_bad_task_id_raises_like_task(bad):
    stream = make_stream(synthetic_source(), "split_task_il", 3)
    with pytest.raises((IndexError, TypeError)) as want:
        stream.task(bad)
    with pytest.raises(want.type, match="^" + re.escape(str(want.value)) + "$"):
        stream.test_set(bad)
