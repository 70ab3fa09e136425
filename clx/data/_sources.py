"""Data sources: one image-classification dataset, whole and in memory.

A :class:`Source` holds ``x_*`` float32 ``(N, H, W, C)`` already normalised and
``y_*`` int32 ``(N,)`` in ``[0, num_classes)``. :func:`load_source` builds one from

- ``"digits"`` -- scikit-learn's bundled 8x8 digits (1,797 real images); a fixed
  stratified 80/20 train/test split. The embedded default: no files needed.
- ``"mnist"`` -- the four original MNIST IDX ``.gz`` files in ``data_dir``,
  checked (header, lengths, optional ``SHA256SUMS``) and normalised like the
  GPM / PyTorch reference code, ``(x / 255 - 0.1307) / 0.3081``.
- ``"notmnist"`` -- notMNIST (letters A-J, 32x32), which TFDS does not have, from
  the pickles GPM's 5-datasets loader downloads (``notmnist_train.pkl`` /
  ``notmnist_test.pkl`` of github.com/nkundiushuti/notmnist_convert).
- any other name -- a TensorFlow Datasets dataset read through
  ``tfds.data_source`` (random access, no TensorFlow needed once prepared).
- several names joined by ``+`` -- one source of several datasets (the
  5-datasets benchmark: ``"cifar10+mnist+svhn_cropped+fashion_mnist+notmnist"``),
  each dataset's classes after the previous ones', so a ``split_task_il`` stream of
  as many tasks as datasets (10 classes each) has one dataset per task.

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
import pickle
import re
import struct
import zlib
from typing import Any

import numpy as np

#: Names :func:`load_source` reads without TFDS.
BUILTIN_SOURCES: tuple[str, ...] = ("digits", "mnist", "notmnist")

#: notMNIST's two files (GPM's ``dataloader/five_datasets.py``, from notmnist.zip of
#: github.com/nkundiushuti/notmnist_convert): pickled dicts of 'features' uint8 (N, 1, 32, 32) and 'labels' (N,).
NOTMNIST_FILES: tuple[str, str] = ("notmnist_train.pkl", "notmnist_test.pkl")
NOTMNIST_URL = "https://github.com/nkundiushuti/notmnist_convert/blob/master/notmnist.zip?raw=true"

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
        ``"mnist"`` (the four original IDX ``.gz`` files in ``data_dir``),
        ``"notmnist"`` (:data:`NOTMNIST_FILES` in ``<data_dir>/notmnist/`` or
        ``data_dir``), any TFDS dataset name (e.g. ``"cifar100"``,
        ``"fashion_mnist"``), or several of these joined by ``+`` (see Returns;
        every part but ``notmnist`` and ``digits`` is then read through TFDS, ``mnist`` too).
      data_dir: the directory with the MNIST files, or the TFDS data directory
        (``None``: TFDS's default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``,
        which is also where ``notmnist`` is looked for).
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
      notmnist: the pickles' 90/10 train/test split of notMNIST_small (about 18,700
        images in all), ``(32, 32, 1)`` in [0, 1], 10 classes (A-J).
      ``"a+b+..."``: every part brought to the largest height, width and channel
        count among them (smaller images padded with zeros, centred, as GPM pads
        MNIST to 32x32; grayscale repeated to 3 channels, as GPM does); with
        ``scale="default"`` each part standardised per channel by its own training
        mean and std (GPM normalises each dataset by its own statistics), with
        ``"unit"`` left in [0, 1]; part ``i``'s labels offset by the classes of
        parts ``0..i-1``; ``num_classes`` their sum (:func:`mix_sources`).

    Raises:
      ValueError: ``mnist`` without ``data_dir``; a ``+`` name with an empty or
        repeated part, or parts whose channels are neither 1 nor the largest count;
        a notMNIST pickle that is not the documented dict; a corrupt MNIST file (unreadable
        gzip, wrong IDX magic, payload length != header dims, image/label counts
        disagree, SHA256 mismatch against a ``SHA256SUMS`` beside the files); an
        unknown dataset name; a TFDS dataset TFDS cannot find or prepare.
      FileNotFoundError: MNIST files missing (the message lists them); notMNIST
        files missing (the message names where they go and :data:`NOTMNIST_URL`).
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
    if "+" in key:
        source = _load_mixture(name.strip(), data_dir, download, standardize=scale == "default")
    elif key == "digits":
        source = _load_digits()
    elif key == "mnist":
        source = _load_mnist(data_dir, standardize=scale == "default")
    elif key == "notmnist":
        source = _load_notmnist(data_dir)
    else:
        source = _load_tfds(name.strip(), data_dir, download)
    return _pad(source, int(pad)) if pad else source


# --------------------------------- mixtures -------------------------------- #


def _load_mixture(name: str, data_dir, download: bool, standardize: bool) -> Source:
    parts = [p.strip() for p in name.split("+")]
    keys = [p.lower() for p in parts]
    if not all(parts) or len(set(keys)) != len(keys):
        raise ValueError(
            f"load_source({name!r}): a '+' name joins distinct dataset names, e.g. "
            "'cifar10+mnist+svhn_cropped+fashion_mnist+notmnist'; this one has an empty or repeated part."
        )
    sources = []
    for part, key in zip(parts, keys):
        if key == "notmnist":
            sources.append(_load_notmnist(data_dir))
        elif key == "digits":
            sources.append(_load_digits())
        else:  # 'mnist' too: inside a mixture data_dir is the TFDS directory
            sources.append(_load_tfds(part, data_dir, download))
    return mix_sources(sources, standardize=standardize, name=name)


def mix_sources(sources, *, standardize: bool = True, name: str | None = None) -> Source:
    """One :class:`Source` of several datasets, each one's classes after the previous ones'.

    Every source's images are padded with zeros (centred; the extra pixel of an odd
    difference at the bottom / right) to the largest height and width among them and
    grayscale ones repeated to the largest channel count (3 for any colour part);
    with ``standardize``, each part's train and test images are then standardised
    per channel by that part's own training mean and std (a zero std counts as 1).
    Part ``i``'s labels are offset by the classes of parts ``0..i-1``.

    Args:
      sources: two or more :class:`Source` s.
      standardize: as above; False keeps the values (e.g. [0, 1]).
      name: the result's name (default: the parts' names joined by ``+``).

    Raises:
      ValueError: fewer than two sources, a non-Source, or a part whose channel count
        is neither 1 nor the largest one.
    """
    sources = list(sources)
    if len(sources) < 2 or not all(isinstance(s, Source) for s in sources):
        raise ValueError(f"mix_sources needs two or more clx.data.Source objects, got {sources!r:.200}.")
    h = max(s.input_shape[0] for s in sources)
    w = max(s.input_shape[1] for s in sources)
    c = max(s.input_shape[2] for s in sources)
    bad = [s.name for s in sources if s.input_shape[2] not in (1, c)]
    if bad:
        raise ValueError(
            f"mix_sources: {bad} have neither 1 nor {c} channels; only grayscale parts are widened (repeated)."
        )
    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    offset = 0
    for s in sources:
        fitted = {split: _fit(getattr(s, f"x_{split}"), h, w, c) for split in ("train", "test")}
        if standardize:
            mean = fitted["train"].mean(axis=(0, 1, 2), dtype=np.float64)
            std = fitted["train"].std(axis=(0, 1, 2), dtype=np.float64)
            std = np.where(std > 0, std, 1.0)
            for split in fitted:
                fitted[split] = ((fitted[split] - mean) / std).astype(np.float32)
        for split in ("train", "test"):
            xs[split].append(fitted[split])
            ys[split].append((getattr(s, f"y_{split}") + offset).astype(np.int32))
        offset += s.num_classes
    return Source(
        name=name or "+".join(s.name for s in sources),
        x_train=np.concatenate(xs["train"]),
        y_train=np.concatenate(ys["train"]),
        x_test=np.concatenate(xs["test"]),
        y_test=np.concatenate(ys["test"]),
        num_classes=int(offset),
    )


def _fit(x: np.ndarray, h: int, w: int, c: int) -> np.ndarray:
    """``x`` (N, h0, w0, c0) zero-padded (centred) to (N, h, w, c0), then channels repeated to c."""
    dh, dw = h - x.shape[1], w - x.shape[2]
    if dh or dw:
        x = np.pad(x, ((0, 0), (dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2), (0, 0)))
    if x.shape[3] != c:
        x = np.repeat(x, c, axis=3)
    return np.ascontiguousarray(x, np.float32)


# ---------------------------------- notMNIST -------------------------------- #


def _tfds_default_dir() -> str:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets"))


def _load_notmnist(data_dir) -> Source:
    root = os.path.expanduser(os.fspath(data_dir)) if data_dir else _tfds_default_dir()
    places = [os.path.join(root, "notmnist"), root]
    found = next((d for d in places if all(os.path.isfile(os.path.join(d, f)) for f in NOTMNIST_FILES)), None)
    if found is None:
        raise FileNotFoundError(
            f"notMNIST: {' and '.join(NOTMNIST_FILES)} are not in {places[0]!r} (nor in {places[1]!r}). notMNIST "
            "is not a TFDS dataset; 5-datasets (GPM) uses the authors' pickles: download notmnist.zip from "
            f"{NOTMNIST_URL} (the file GPM's dataloader/five_datasets.py fetches) and unzip it into {places[0]!r} "
            "(or point data.dir / data_dir at the directory holding <dir>/notmnist/)."
        )
    arrays = {}
    for split, fname in zip(("train", "test"), NOTMNIST_FILES):
        path = os.path.join(found, fname)
        with open(path, "rb") as f:
            try:
                d = _NumpyUnpickler(f, encoding="latin1").load()
            except Exception as e:
                raise ValueError(
                    f"notMNIST: {path} is not the authors' pickle of numpy arrays ({type(e).__name__}: "
                    f"{_first_line(e)}); download notmnist.zip again from {NOTMNIST_URL}."
                ) from e
        if not isinstance(d, dict) or "features" not in d or "labels" not in d:
            raise ValueError(
                f"notMNIST: {path} must hold a dict with 'features' (N, 1, 32, 32) uint8 and 'labels' (N,), "
                f"got {type(d).__name__} {sorted(d) if isinstance(d, dict) else ''}."
            )
        x, y = np.asarray(d["features"]), np.asarray(d["labels"]).reshape(-1)
        if x.ndim == 4 and x.shape[1] == 1:
            x = x[:, 0]
        if x.ndim != 3 or x.dtype != np.uint8 or len(x) != len(y):
            raise ValueError(
                f"notMNIST: {path} has features {x.dtype} {x.shape} and {len(y)} labels; expected uint8 "
                "(N, 1, H, W) and N labels."
            )
        arrays[split] = ((x.astype(np.float32) / np.float32(255.0))[..., None], y.astype(np.int32))
    return Source(
        name="notmnist",
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        num_classes=10,
    )


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickles dicts of numpy arrays only (no other globals: a data file cannot run code)."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("builtins", "bytearray"),
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a notMNIST pickle")


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
