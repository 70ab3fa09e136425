"""Data sources: one image-classification dataset, whole and in memory.

A :class:`Source` holds ``x_*`` float32 ``(N, H, W, C)`` already normalised and
``y_*`` int32 ``(N,)`` in ``[0, num_classes)``. :func:`load_source` builds one from

- ``"digits"`` -- scikit-learn's bundled 8x8 digits (1,797 real images); a fixed
  stratified 80/20 train/test split. The embedded default: no files needed.
- ``"mnist"`` -- the four original MNIST IDX ``.gz`` files in ``data_dir``,
  checked (header, lengths, optional ``SHA256SUMS``) and normalised like the
  GPM / PyTorch reference code, ``(x / 255 - 0.1307) / 0.3081``.
- any other name -- a TensorFlow Datasets dataset read through
  ``tfds.data_source`` (random access, no TensorFlow needed once prepared).

Every optional image border (``pad``) is filled with the training set's minimum,
i.e. the background. Errors are ``ValueError`` (``FileNotFoundError`` for missing
MNIST files, ``ModuleNotFoundError`` for a module TFDS needs to prepare a dataset)
whose message names the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import math
import os
import re
import struct
import zlib
from typing import Any

import numpy as np

#: Names :func:`load_source` reads without TFDS.
BUILTIN_SOURCES: tuple[str, ...] = ("digits", "mnist")

#: The four original MNIST files (LeCun et al.), split -> (images, labels).
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
#: MNIST normalisation constants of the PyTorch / GPM reference code.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

_DIGITS_TEST_FRACTION = 0.2
_DIGITS_SPLIT_SEED = 0  # fixed: the digits test set is the same in every run


# --------------------------------------------------------------------------- #
# Source
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True, eq=False)
class Source:
    """One image-classification dataset, whole and in memory.

    Attributes:
      name: the dataset's name (for messages and logs).
      x_train: ``(N, H, W, C)`` float32, already normalised.
      y_train: ``(N,)`` int32 in ``[0, num_classes)``.
      x_test: ``(M, H, W, C)`` float32, same ``(H, W, C)`` as ``x_train``.
      y_test: ``(M,)`` int32 in ``[0, num_classes)``.
      num_classes: number of classes ``C >= 1``.

    Raises:
      ValueError: on construction, if an array is not a numpy array of the dtype and
        rank above, if images and labels disagree in count, if train and test images
        differ in ``(H, W, C)``, or if a label lies outside ``[0, num_classes)``; the
        message names the split, the bad values and the fix.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    def __post_init__(self):
        where = f"Source {self.name!r}"
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)):
            raise ValueError(f"{where}: num_classes must be an int, got {self.num_classes!r}.")
        if self.num_classes < 1:
            raise ValueError(f"{where}: num_classes must be >= 1, got {self.num_classes}.")
        for split in ("train", "test"):
            x = getattr(self, f"x_{split}")
            y = getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
                raise ValueError(
                    f"{where}: x_{split} and y_{split} must be numpy arrays, got "
                    f"{type(x).__name__} and {type(y).__name__}; wrap them with "
                    "np.asarray."
                )
            if x.ndim != 4:
                raise ValueError(
                    f"{where}: x_{split} must be 4-D (N, H, W, C), got shape "
                    f"{x.shape}; add a channel axis with x[..., None] for grayscale."
                )
            if x.dtype != np.float32:
                raise ValueError(
                    f"{where}: x_{split} must be float32, got {x.dtype}; normalise "
                    "and convert with .astype(np.float32)."
                )
            if y.ndim != 1:
                raise ValueError(
                    f"{where}: y_{split} must be 1-D (N,), got shape {y.shape}; "
                    "pass integer class ids, not one-hot vectors."
                )
            if y.dtype != np.int32:
                raise ValueError(f"{where}: y_{split} must be int32, got {y.dtype}; convert with .astype(np.int32).")
            if len(x) != len(y):
                raise ValueError(
                    f"{where}: x_{split} has {len(x)} images but y_{split} has "
                    f"{len(y)} labels; they must pair one to one."
                )
            bad = (y < 0) | (y >= self.num_classes)
            if bad.any():
                values = np.unique(y[bad])
                shown = ", ".join(str(v) for v in values[:10])
                more = f" (and {len(values) - 10} more)" if len(values) > 10 else ""
                raise ValueError(
                    f"{where}: y_{split} has {int(bad.sum())} labels outside "
                    f"[0, {self.num_classes}): values {shown}{more}. Fix: remap the "
                    "labels to 0..num_classes-1 or raise num_classes."
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"{where}: train images are {self.x_train.shape[1:]} but test images "
                f"are {self.x_test.shape[1:]}; both splits need the same (H, W, C)."
            )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(int(d) for d in self.x_train.shape[1:])


def load_source(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    scale: str = "default",
    pad: int = 0,
) -> Source:
    """Loads a dataset into a :class:`Source` (float32 images, int32 labels).

    Args:
      name: ``"digits"`` (scikit-learn's bundled 8x8 digits; ``data_dir`` unused),
        ``"mnist"`` (the four original IDX ``.gz`` files in ``data_dir``), or any
        TFDS dataset name (e.g. ``"cifar100"``, ``"fashion_mnist"``).
      data_dir: the directory with the MNIST files, or the TFDS data directory
        (``None``: TFDS's default, ``~/tensorflow_datasets``).
      download: TFDS only: whether TFDS may download and prepare the dataset when
        it is not prepared in ``data_dir`` yet (needs the network). ``False``
        fails fast instead.
      scale: ``"default"`` (the values below) or ``"unit"``: MNIST as ``x / 255``
        in [0, 1], as the hypernetwork paper's code (``hypercl``) feeds it (digits
        and TFDS sources are in [0, 1] already).
      pad: pixels of background (the training set's minimum value) added on each
        side of every image, e.g. 2 for MNIST at 32 x 32 as in ``hypercl``.

    Returns:
      digits: train 1,438 / test 359 images ``(8, 8, 1)``, values ``x / 16`` in
        [0, 1], 10 classes; the split is stratified (20 % of each class to test)
        and drawn with a fixed RNG (seed 0), so it is the same in every run.
      mnist: train 60,000 / test 10,000 images ``(28, 28, 1)``, values
        ``(x / 255 - 0.1307) / 0.3081``, 10 classes.
      TFDS: the ``train`` and ``test`` splits, ``image`` uint8 -> ``/ 255``
        float32 ``(H, W, C)``, ``label`` -> int32, ``num_classes`` from the
        ``label`` feature.

    Raises:
      ValueError: ``mnist`` without ``data_dir``; a corrupt MNIST file (unreadable
        gzip, wrong IDX magic, payload length != header dims, image/label counts
        disagree, SHA256 mismatch against a ``SHA256SUMS`` beside the files); an
        unknown dataset name; a TFDS dataset TFDS cannot find or prepare.
      FileNotFoundError: MNIST files missing (the message lists them).
      ModuleNotFoundError: TFDS needs a module to prepare the dataset that is not
        installed (the message names it and the ``pip install``).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"load_source: name must be a non-empty string, got {name!r}; use one "
            f"of {BUILTIN_SOURCES} or a TFDS dataset name."
        )
    if scale not in ("default", "unit"):
        raise ValueError(f"load_source: scale must be 'default' or 'unit', got {scale!r}.")
    if int(pad) < 0:
        raise ValueError(f"load_source: pad must be >= 0 pixels, got {pad}.")
    key = name.strip().lower()
    if key == "digits":
        source = _load_digits()
    elif key == "mnist":
        source = _load_mnist(data_dir, standardize=scale == "default")
    else:
        source = _load_tfds(name.strip(), data_dir, download)
    return _pad(source, int(pad)) if pad else source


def _pad(source: Source, pad: int) -> Source:
    fill = np.float32(source.x_train.min())
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return dataclasses.replace(
        source,
        x_train=np.pad(source.x_train, widths, constant_values=fill),
        x_test=np.pad(source.x_test, widths, constant_values=fill),
    )


def _load_digits() -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, np.float64) / 16.0).astype(np.float32)
    x = x.reshape(-1, 8, 8, 1)
    y = np.asarray(bunch.target, np.int32)
    # Own stratified split (not sklearn's) so the test set cannot change with a
    # scikit-learn release: per class, a seeded permutation; the first
    # round(0.2 * n_c) indices go to test. Both index sets are then shuffled.
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(_DIGITS_TEST_FRACTION * len(idx)))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = rng.permutation(np.concatenate(test_idx))
    return Source(
        name="digits",
        x_train=x[train_idx],
        y_train=y[train_idx],
        x_test=x[test_idx],
        y_test=y[test_idx],
        num_classes=10,
    )


# ----------------------------------- MNIST --------------------------------- #


def _load_mnist(data_dir, standardize: bool = True) -> Source:
    if data_dir is None:
        raise ValueError(
            "load_source('mnist') needs data_dir: pass the directory that holds "
            f"{_mnist_names()} (the original MNIST IDX files), e.g. "
            "load_source('mnist', data_dir='/path/to/mnist')."
        )
    data_dir = os.fspath(data_dir)
    names = [n for pair in MNIST_FILES.values() for n in pair]
    missing = [n for n in names if not os.path.isfile(os.path.join(data_dir, n))]
    if missing:
        raise FileNotFoundError(
            f"MNIST: {len(missing)} file(s) missing in {data_dir!r}: "
            f"{', '.join(missing)}. The directory must hold the four original IDX "
            f"files named exactly {', '.join(names)} (from "
            "https://storage.googleapis.com/cvdf-datasets/mnist/)."
        )
    sums_path = os.path.join(data_dir, "SHA256SUMS")
    if os.path.isfile(sums_path):
        _verify_sha256(sums_path, data_dir, names)

    arrays = {}
    for split, (img_name, lbl_name) in MNIST_FILES.items():
        img_path = os.path.join(data_dir, img_name)
        lbl_path = os.path.join(data_dir, lbl_name)
        images = _read_idx(img_path, _IDX_IMAGES_MAGIC)
        labels = _read_idx(lbl_path, _IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise ValueError(
                f"MNIST: {img_name} has {len(images)} images but {lbl_name} has "
                f"{len(labels)} labels; the pair is mismatched or one is "
                "corrupt -- replace both with the original files."
            )
        x = images.astype(np.float32)[..., None]  # (N, rows, cols, 1)
        np.divide(x, np.float32(255.0), out=x)
        if standardize:
            x -= np.float32(MNIST_MEAN)
            x /= np.float32(MNIST_STD)
        arrays[split] = (x, labels.astype(np.int32))
    if arrays["train"][0].shape[1:] != arrays["test"][0].shape[1:]:
        raise ValueError(
            f"MNIST: train images are {arrays['train'][0].shape[1:3]} but test "
            f"images are {arrays['test'][0].shape[1:3]}; one of the image files is "
            "not MNIST -- replace it with the original."
        )
    return Source(
        name="mnist",
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        num_classes=10,
    )


def _mnist_names() -> str:
    return ", ".join(n for pair in MNIST_FILES.values() for n in pair)


def _verify_sha256(sums_path: str, data_dir: str, names: list[str]) -> None:
    """Checks each file of ``names`` listed in ``SHA256SUMS`` (``sha256sum`` format)."""
    expected = {}
    with open(sums_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(None, 1)
            if len(parts) != 2 or len(parts[0]) != 64:
                raise ValueError(
                    f"MNIST: {sums_path} line {lineno} is not '<sha256>  <file>': "
                    f"{line!r}; fix or delete the SHA256SUMS file."
                )
            expected[parts[1].strip().lstrip("*")] = parts[0].lower()
    for n in names:
        if n not in expected:
            continue
        h = hashlib.sha256()
        with open(os.path.join(data_dir, n), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != expected[n]:
            raise ValueError(
                f"MNIST: {n} fails its SHA256 check (expected {expected[n]}, got "
                f"{h.hexdigest()}); the file is corrupt or not the original -- "
                "download it again."
            )


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Reads a gzipped IDX file of uint8: images ``(n, rows, cols)`` or labels ``(n,)``."""
    fname = os.path.basename(path)
    kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
    fix = "download the original file again"
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(
            f"MNIST: {fname} is not a readable gzip file ({e}); it is truncated or corrupt -- {fix}."
        ) from e
    ndims = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 + 4 * ndims
    got_magic = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if got_magic is not None and got_magic != magic:
        raise ValueError(
            f"MNIST: {fname} has IDX magic number {got_magic}, expected {magic} "
            f"({kind}); the file is not an IDX {kind} file (swapped names?) -- {fix}."
        )
    if len(raw) < header:
        raise ValueError(
            f"MNIST: {fname} holds {len(raw)} bytes, fewer than the {header}-byte IDX {kind} header -- {fix}."
        )
    dims = struct.unpack(">" + "I" * ndims, raw[4:header])
    want = math.prod(dims)
    got = len(raw) - header
    if got != want:
        raise ValueError(
            f"MNIST: {fname} header says {kind} of shape {dims} = {want} bytes but "
            f"the payload has {got} bytes -- {fix}."
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


# ------------------------------------ TFDS --------------------------------- #


def _load_tfds(name: str, data_dir, download: bool) -> Source:
    builtin = ", ".join(repr(n) for n in BUILTIN_SOURCES)
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - tfds is a dependency
        raise ValueError(
            f"load_source({name!r}): not a built-in source ({builtin}) and "
            "tensorflow_datasets is not installed; pip install tensorflow-datasets."
        ) from e
    not_found = getattr(getattr(tfds.core, "registered", None), "DatasetNotFoundError", ())
    try:
        train_src, test_src = tfds.data_source(
            name,
            split=["train", "test"],
            data_dir=None if data_dir is None else os.fspath(data_dir),
            download=download,
            # tfds.data_source picks array_record (random access) only without a data_dir; with one it would
            # prepare TFRecords, which need TensorFlow to write and which it cannot read back.
            builder_kwargs={"file_format": "array_record"},
        )
    except not_found as e:
        raise ValueError(
            f"load_source: unknown dataset {name!r}. Built-in names: {builtin}; any "
            "other name must be a registered TFDS dataset (see "
            "tfds.list_builders())."
        ) from e
    except Exception as e:  # TFDS raises many types when data is absent
        missing = _missing_module(e)
        if missing:  # TFDS imports some modules only when it prepares data: not a data problem
            raise ModuleNotFoundError(
                f"load_source({name!r}): TFDS needs the Python module {missing!r} to prepare the dataset, and it "
                f"is not installed ({type(e).__name__}: {_first_line(e)}); install it with `pip install "
                f"{_PIP_NAMES.get(missing, missing)}` and run again.",
                name=missing,
            ) from e
        raise ValueError(
            f"load_source({name!r}): TFDS could not find or prepare the dataset in "
            f"data_dir={data_dir!r} ({type(e).__name__}: {_first_line(e)}). Built-in "
            f"names are {builtin}; a TFDS dataset must be prepared under data_dir in "
            "array_record format (tfds.data_source(name, data_dir=...) with the "
            "network, or tfds.builder(name, data_dir=..., file_format='array_record')"
            ".download_and_prepare(...) with manual files)."
        ) from e

    features = train_src.dataset_info.features
    label_feature = features["label"] if "label" in features else None
    num_classes = getattr(label_feature, "num_classes", None)
    if not num_classes:
        raise ValueError(
            f"load_source({name!r}): the TFDS dataset has no 'label' ClassLabel "
            f"feature (features: {sorted(features)}); only image classification "
            "datasets with 'image' and 'label' are supported."
        )
    x_train, y_train = _read_tfds_split(name, "train", train_src)
    x_test, y_test = _read_tfds_split(name, "test", test_src)
    return Source(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=int(num_classes),
    )


#: Distribution names of modules TFDS may import lazily, where they differ from the module's.
_PIP_NAMES = {"apache_beam": "apache-beam", "PIL": "pillow", "cv2": "opencv-python"}


def _missing_module(e: BaseException) -> str | None:
    """The top-level module whose import failed somewhere in ``e``'s chain (causes, contexts, messages), or None."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ImportError) and getattr(e, "name", None):
            return e.name.split(".")[0]
        found = re.search(r"No module named '([\w.]+)'", str(e))
        if found:
            return found.group(1).split(".")[0]
        e = e.__cause__ or e.__context__
    return None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""


def _read_tfds_split(name: str, split: str, src: Any) -> tuple[np.ndarray, np.ndarray]:
    """Reads every record of a TFDS data source into ``(x float32, y int32)``."""
    n = len(src)
    if n == 0:
        raise ValueError(f"load_source({name!r}): TFDS split {split!r} is empty.")
    images = labels = None
    batched = True
    chunk = 1024
    for start in range(0, n, chunk):
        keys = list(range(start, min(n, start + chunk)))
        records = None
        if batched:
            try:
                records = src.__getitems__(keys)
            except TypeError:
                # tfds.testing.mock_data (tfds 4.9.10) installs a broken
                # __getitems__ on its mock reader; per-record reads work.
                batched = False
        if records is None:
            records = [src[k] for k in keys]
        for k, rec in zip(keys, records):
            if "image" not in rec or "label" not in rec:
                raise ValueError(
                    f"load_source({name!r}): records have keys {sorted(rec)}; expected 'image' and 'label'."
                )
            img = np.asarray(rec["image"])
            if img.ndim == 2:
                img = img[..., None]
            if images is None:
                if img.dtype != np.uint8 or img.ndim != 3:
                    raise ValueError(
                        f"load_source({name!r}): 'image' must be uint8 (H, W, C), got {img.dtype} {img.shape}."
                    )
                images = np.empty((n, *img.shape), np.uint8)
                labels = np.empty((n,), np.int64)
            if img.shape != images.shape[1:]:
                raise ValueError(
                    f"load_source({name!r}): {split} record {k} has image shape "
                    f"{img.shape}, record 0 has {images.shape[1:]}; variable-size "
                    "images are not supported -- resize them to one shape first."
                )
            images[k] = img
            labels[k] = int(rec["label"])
    x = images.astype(np.float32)
    x /= np.float32(255.0)
    return x, labels.astype(np.int32)
