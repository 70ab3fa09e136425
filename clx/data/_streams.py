"""Continual-learning task streams made from a :class:`~clx.data.Source` (numpy only).

A :class:`TaskStream` is a sequence of :class:`Task` s made from a source,
deterministic from a seed, each task built lazily by ``stream.task(t)`` (its test
split alone by ``stream.test_set(t)``). :func:`make_stream` knows seven kinds, named
after the benchmarks of the field and the scenarios of van de Ven & Tolias (2019),
"Three scenarios for continual learning" (arXiv:1904.07734):

==================  ===========  =====================================================
kind                scenario     what changes between tasks
==================  ===========  =====================================================
``permuted``        domain_il    a fixed random pixel permutation per task
                                 (Permuted MNIST, Goodfellow et al. 2013, "An empirical
                                 investigation of catastrophic forgetting...")
``permuted_task_il`` task_il     the same permutations; one head of ``num_classes``
                                 outputs per task (van de Ven & Tolias 2019's
                                 Permuted-MNIST task-IL)
``permuted_class_il`` class_il   the same permutations; task ``t``'s class ``c`` is
                                 label ``t * num_classes + c`` of one shared head of
                                 ``num_tasks * num_classes`` outputs (their class-IL)
``rotated``         domain_il    every image rotated by ``t * max_angle / num_tasks``
                                 degrees (Rotated MNIST, Lopez-Paz & Ranzato 2017, GEM)
``split_task_il``   task_il      a disjoint group of classes; labels 0..k-1 inside the
                                 task, one head per task (Split MNIST, Zenke et al.
                                 2017, "Continual learning through synaptic
                                 intelligence")
``split_domain_il`` domain_il    the same groups; labels 0..k-1 inside the task, one
                                 shared head of k outputs (Split MNIST domain-IL: "first
                                 or second digit of the pair", van de Ven & Tolias 2019)
``split_class_il``  class_il     the same groups; one shared head over all classes
``label_permuted``  domain_il    the inputs stay; the labels are a fixed random
                                 permutation of the classes per task (Label-permuted
                                 MNIST, Elsayed & Mahmood 2024, "Addressing Loss of
                                 Plasticity and Catastrophic Forgetting in Continual
                                 Learning": a plasticity stream, nothing to keep)
``finetune``        domain_il    a different kind of input change per task, in the
                                 order of ``FINETUNE_CHANGES``: rotated 90 degrees,
                                 mirrored, inverted, noisy, blurred, shrunk,
                                 permuted (distinct domains for fine-tuning a
                                 pretrained model; at most 7 tasks)
==================  ===========  =====================================================

Each kind is one :class:`_KindSpec` entry of ``_KIND_SPECS`` (its scenario, whether
tasks are class groups, its heads, its label map and its input change); adding a kind
means adding one entry there (and a row above). The outputs per head follow from the
scenario: ``k`` (a task's classes: ``num_classes // num_tasks`` for the split kinds, all
``num_classes`` otherwise), ``num_tasks * k`` in class-IL.

Label conventions (``Task.classes`` lists the original class ids of a task in the
order of the stream's class order):

* permuted / rotated / finetune / permuted_task_il: labels are the source labels, ``num_outputs = num_classes``
  (permuted_task_il: ``num_heads = num_tasks``).
* permuted_class_il: task ``t``'s label of class ``c`` is ``t * num_classes + c``;
  ``num_outputs = num_tasks * num_classes``.
* label_permuted: task ``t``'s label of class ``c`` is ``perm_t[c]``, the ``t``-th of
  ``num_tasks`` permutations of ``0..C-1`` drawn in order from
  ``np.random.default_rng([seed, 0x1AB31])`` (task 0 is permuted too);
  ``num_outputs = num_classes``.
* split_task_il: label = position of the original class inside the task's group,
  ``0..k-1`` with ``k = num_classes // num_tasks``; ``num_heads = num_tasks``.
* split_domain_il: the same labels ``0..k-1``, ``num_outputs = k``, one head.
* split_class_il: label = position of the original class in the stream's class order,
  so task ``t`` owns labels ``t*k .. (t+1)*k - 1``; ``num_outputs = num_classes``.

Every error is a ``ValueError`` (``IndexError`` for a task id out of range,
``TypeError`` for a non-integer task id) whose message names the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Iterator

import numpy as np

from clx.data._sources import Source

# Test sets are cached per task only while all of them together stay this small.
_TEST_CACHE_BYTES = 64 << 20
# Stream tag for the train_subset shuffle so it is independent of the other draws.
_SUBSET_STREAM = 0x5B5E7

# An input change: (t, x (n, H, W, C) float32) -> a new array of task t's inputs.
_InputChange = Callable[[int, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------- #
# Stream kinds: one description each
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class _KindSpec:
    """How one stream kind turns a source into task ``t``.

    Attributes:
      scenario: ``'domain_il' | 'task_il' | 'class_il'`` (van de Ven & Tolias 2019).
      split: True: the classes, in the stream's class order, are cut into
        ``num_tasks`` groups of ``k = num_classes // num_tasks`` (``make_stream``
        requires ``num_classes % num_tasks == 0`` and every class present in
        training) and task ``t`` holds only the examples of group ``t``. False: every
        task holds every example and ``k = num_classes``.
      head_per_task: True: ``num_heads = num_tasks``; False: one shared head.
      labels: ``(class_order, k, num_tasks, seed) -> lut``: an int32 ``(num_classes,)``
        table from source label to task label (the same for every task), an int32
        ``(num_tasks, num_classes)`` table (row ``t`` for task ``t``), or None to keep
        the source labels.
      inputs: ``(source, num_tasks, seed, max_angle) -> change``, called once per
        stream (it precomputes what the kind draws from ``seed``); ``change(t, x)``
        returns task ``t``'s version of the images ``x`` as a new array.
    """

    scenario: str
    split: bool
    head_per_task: bool
    labels: Callable[[tuple[int, ...], int, int, int], np.ndarray | None]
    inputs: Callable[[Source, int, int, float], _InputChange]


def _source_labels(class_order, k, num_tasks, seed):
    return None


# Stream tag for the label permutations, so they are independent of the other draws.
_LABEL_STREAM = 0x1AB31


def _labels_permuted(class_order, k, num_tasks, seed):
    """Label-permuted: row ``t`` is the ``t``-th permutation of the classes."""
    rng = np.random.default_rng([seed, _LABEL_STREAM])
    return np.stack([rng.permutation(len(class_order)) for _ in range(num_tasks)]).astype(np.int32)


def _labels_in_group(class_order, k, num_tasks, seed):
    """Task-IL: position of the class inside its group, ``0..k-1``."""
    lut = np.full((len(class_order),), -1, np.int32)
    lut[np.asarray(class_order)] = np.tile(np.arange(k, dtype=np.int32), num_tasks)
    return lut


def _labels_in_order(class_order, k, num_tasks, seed):
    """Class-IL: position of the class in the stream's class order."""
    lut = np.full((len(class_order),), -1, np.int32)
    lut[np.asarray(class_order)] = np.arange(len(class_order), dtype=np.int32)
    return lut


def _labels_after_tasks(class_order, k, num_tasks, seed):
    """Class-IL over whole tasks: row ``t`` maps the class at position ``i`` of the class order to ``t * k + i``."""
    lut = np.empty((num_tasks, len(class_order)), np.int32)
    lut[:, np.asarray(class_order)] = np.arange(num_tasks, dtype=np.int32)[:, None] * k + np.arange(k, dtype=np.int32)
    return lut


def _permuted(source: Source, num_tasks: int, seed: int, max_angle: float) -> _InputChange:
    """Task ``t``: the ``t``-th of ``num_tasks`` permutations of the ``H*W*C`` values,
    drawn in order from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    d = math.prod(source.input_shape)
    perms = [rng.permutation(d) for _ in range(num_tasks)]
    return functools.partial(_permute, perms)


def _permute(perms, t, x):
    flat = x.reshape(len(x), -1)
    return np.take(flat, perms[t], axis=1).reshape(x.shape)


def _rotated(source: Source, num_tasks: int, seed: int, max_angle: float) -> _InputChange:
    """Task ``t``: every image rotated by ``t * max_angle / num_tasks`` degrees."""
    # Background for rotation: the darkest training pixel (0 before
    # normalisation), so rotated corners look like the image background.
    return functools.partial(_rotate, max_angle, num_tasks, float(source.x_train.min()))


def _rotate(max_angle, num_tasks, cval, t, x):
    angle = t * max_angle / num_tasks
    if angle % 360.0 == 0.0:
        return x.copy()
    from scipy import ndimage

    return ndimage.rotate(x, angle, axes=(1, 2), reshape=False, order=1, mode="constant", cval=cval)


#: The input change of task ``t`` of a ``finetune`` stream (module docs and ``_finetune``).
FINETUNE_CHANGES: tuple[str, ...] = ("rotated90", "mirrored", "inverted", "noisy", "blurred", "shrunk", "permuted")
# Noise of the ``noisy`` task: Gaussian, this standard deviation in units of the source's pixel range.
_NOISE_STD = 0.3
# Gaussian blur of the ``blurred`` task: this standard deviation in pixels, along H and W.
_BLUR_SIGMA = 2.0
# Stream tags so the finetune draws are independent of the other draws.
_NOISE_STREAM = 0x401CE
_FINETUNE_PERM_STREAM = 0xF17E


def _finetune(source: Source, num_tasks: int, seed: int, max_angle: float) -> _InputChange:
    """Task ``t`` applies ``FINETUNE_CHANGES[t]`` to every image; with ``lo, hi`` the
    source's smallest and largest training pixel (the background and the ink):

    - ``rotated90``: rotated by 90 degrees counter-clockwise as the ``rotated`` kind does
      (``scipy.ndimage.rotate``, bilinear, ``reshape=False``, corners filled with
      ``lo``): on square images exactly ``np.rot90(x, 1, axes=(1, 2))``;
    - ``mirrored``: left-right flipped, ``x[:, :, ::-1]``;
    - ``inverted``: ``lo + hi - x`` (``1 - x`` for images in [0, 1]; for standardised
      MNIST, ``1 - x`` of the raw [0, 1] image, standardised again);
    - ``noisy``: ``clip(x + e, lo, hi)``, ``e ~ N(0, (0.3 (hi - lo))^2)`` per value,
      drawn from ``np.random.default_rng([seed, 0x401CE, t, n])`` for an array of ``n``
      images (so a task's train and test splits get their own noise, the same on
      every build);
    - ``blurred``: ``scipy.ndimage.gaussian_filter`` with sigma 2 pixels along H and W,
      borders filled with ``lo``;
    - ``shrunk``: zoomed out by 2 about the image centre (``scipy.ndimage.affine_transform``,
      output pixel ``o`` reads input ``2 o - c``, ``c = (H - 1) / 2, (W - 1) / 2``, bilinear,
      outside filled with ``lo``): the digit at half size in the middle;
    - ``permuted``: a fixed permutation of the ``H*W*C`` values, drawn from
      ``np.random.default_rng([seed, 0xF17E])``.

    Task 0 is changed too: no task is the source (the pretraining) domain.

    Raises:
      ValueError: ``num_tasks > len(FINETUNE_CHANGES)``.
    """
    if num_tasks > len(FINETUNE_CHANGES):
        raise ValueError(
            f"make_stream: 'finetune' has {len(FINETUNE_CHANGES)} kinds of task {FINETUNE_CHANGES}, "
            f"got num_tasks={num_tasks}; use num_tasks <= {len(FINETUNE_CHANGES)}."
        )
    lo, hi = float(source.x_train.min()), float(source.x_train.max())
    perm = np.random.default_rng([seed, _FINETUNE_PERM_STREAM]).permutation(math.prod(source.input_shape))
    return functools.partial(_finetune_change, seed, lo, hi, perm)


def _finetune_change(seed, lo, hi, perm, t, x):
    change = FINETUNE_CHANGES[t]
    if change == "rotated90":
        return _rotate(90.0, 1, lo, 1, x)
    if change == "mirrored":
        return np.array(x[:, :, ::-1], copy=True)
    if change == "inverted":
        return (np.float32(lo + hi) - x).astype(np.float32)
    if change == "noisy":
        rng = np.random.default_rng([seed, _NOISE_STREAM, t, len(x)])
        e = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(_NOISE_STD * (hi - lo))
        return np.clip(x + e, np.float32(lo), np.float32(hi))
    if change == "blurred":
        from scipy import ndimage

        return ndimage.gaussian_filter(x, sigma=(0.0, _BLUR_SIGMA, _BLUR_SIGMA, 0.0), mode="constant", cval=lo)
    if change == "shrunk":
        from scipy import ndimage

        ch, cw = (x.shape[1] - 1) / 2, (x.shape[2] - 1) / 2
        m = np.diag([1.0, 2.0, 2.0, 1.0])
        return ndimage.affine_transform(x, m, offset=(0.0, -ch, -cw, 0.0), order=1, mode="constant", cval=lo)
    return _permute([perm], 0, x)  # "permuted"


def _unchanged(source: Source, num_tasks: int, seed: int, max_angle: float) -> _InputChange:
    return _copy


def _copy(t, x):
    return np.array(x, copy=True)


_KIND_SPECS: dict[str, _KindSpec] = {
    "permuted": _KindSpec(
        "domain_il",
        split=False,
        head_per_task=False,
        labels=_source_labels,
        inputs=_permuted,
    ),
    "rotated": _KindSpec(
        "domain_il",
        split=False,
        head_per_task=False,
        labels=_source_labels,
        inputs=_rotated,
    ),
    "split_task_il": _KindSpec(
        "task_il",
        split=True,
        head_per_task=True,
        labels=_labels_in_group,
        inputs=_unchanged,
    ),
    "split_domain_il": _KindSpec(
        "domain_il",
        split=True,
        head_per_task=False,
        labels=_labels_in_group,
        inputs=_unchanged,
    ),
    "split_class_il": _KindSpec(
        "class_il",
        split=True,
        head_per_task=False,
        labels=_labels_in_order,
        inputs=_unchanged,
    ),
    "label_permuted": _KindSpec(
        "domain_il",
        split=False,
        head_per_task=False,
        labels=_labels_permuted,
        inputs=_unchanged,
    ),
    "finetune": _KindSpec(
        "domain_il",
        split=False,
        head_per_task=False,
        labels=_source_labels,
        inputs=_finetune,
    ),
    "permuted_task_il": _KindSpec(
        "task_il",
        split=False,
        head_per_task=True,
        labels=_source_labels,
        inputs=_permuted,
    ),
    "permuted_class_il": _KindSpec(
        "class_il",
        split=False,
        head_per_task=False,
        labels=_labels_after_tasks,
        inputs=_permuted,
    ),
}

#: Stream kinds :func:`make_stream` knows, mapped to their scenario.
KINDS: dict[str, str] = {name: spec.scenario for name, spec in _KIND_SPECS.items()}


# --------------------------------------------------------------------------- #
# Tasks and streams
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """One task of a stream. Arrays are read-only.

    Attributes:
      task_id: position in the stream, ``0 <= task_id < num_tasks``.
      x_train: ``(n, H, W, C)`` float32.
      y_train: ``(n,)`` int32, labels in the stream's output space (module docs).
      x_test: ``(m, H, W, C)`` float32.
      y_test: ``(m,)`` int32.
      classes: original class ids of the task, in stream class order; for split
        streams and permuted_class_il ``classes[i]`` is the class behind task-IL
        label ``i`` / class-IL label ``task_id * k + i``.
    """

    task_id: int
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[int, ...]


class TaskStream:
    """A deterministic sequence of :class:`Task` s; build one with :func:`make_stream`.

    Tasks are made on demand by :meth:`task` (the same ``t`` gives byte-equal arrays
    every time), a task's test split alone by :meth:`test_set`; only the per-task
    permutations / class groups / subset indices are precomputed, and test sets are
    cached while all of them together are small.

    Attributes:
      kind: one of :data:`KINDS` (``'permuted' | 'permuted_task_il' | 'permuted_class_il' | 'rotated' |
        'split_task_il' | 'split_domain_il' | 'split_class_il' | 'label_permuted' | 'finetune'``).
      scenario: ``'domain_il'`` (permuted, rotated, split_domain_il, label_permuted, finetune), ``'task_il'``
        (split_task_il, permuted_task_il) or ``'class_il'`` (split_class_il, permuted_class_il).
      num_tasks: number of tasks ``T``.
      num_outputs: logits per head: ``num_classes`` (permuted, permuted_task_il, rotated,
        split_class_il, label_permuted, finetune), ``num_classes // num_tasks`` (split_task_il,
        split_domain_il) or ``num_tasks * num_classes`` (permuted_class_il).
      num_heads: ``num_tasks`` for split_task_il and permuted_task_il, else 1.
      input_shape: ``(H, W, C)``.
      class_order: all class ids in the stream's order (``tuple(range(C))`` unless
        ``class_order='random'`` in a split stream).
      source, seed: what the stream was made from.
    """

    def __init__(
        self,
        source: Source,
        kind: str,
        num_tasks: int,
        seed: int,
        max_angle: float,
        class_order: tuple[int, ...],
        train_subset: int | None,
    ):
        self._source = source
        self._kind = kind
        self._spec = spec = _KIND_SPECS[kind]
        self._num_tasks = num_tasks
        self._seed = seed
        self._class_order = class_order
        self._train_subset = train_subset
        C = source.num_classes
        self._k = C // num_tasks if spec.split else C
        self._inputs = spec.inputs(source, num_tasks, seed, max_angle)
        self._label_map = spec.labels(class_order, self._k, num_tasks, seed)
        cache_ok = source.x_test.nbytes * num_tasks <= _TEST_CACHE_BYTES
        self._test_cache: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache_ok else None

    # ---- read-only attributes ------------------------------------------------
    @property
    def kind(self) -> str:
        return self._kind

    @property
    def scenario(self) -> str:
        return self._spec.scenario

    @property
    def num_tasks(self) -> int:
        return self._num_tasks

    @property
    def num_outputs(self) -> int:
        return self._k * self._num_tasks if self._spec.scenario == "class_il" else self._k

    @property
    def num_heads(self) -> int:
        return self._num_tasks if self._spec.head_per_task else 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self._source.input_shape

    @property
    def class_order(self) -> tuple[int, ...]:
        return self._class_order

    @property
    def source(self) -> Source:
        return self._source

    @property
    def seed(self) -> int:
        return self._seed

    def __len__(self) -> int:
        return self._num_tasks

    def __iter__(self) -> Iterator[Task]:
        for t in range(self._num_tasks):
            yield self.task(t)

    def __repr__(self) -> str:
        return (
            f"TaskStream(source={self._source.name!r}, kind={self._kind!r}, "
            f"num_tasks={self._num_tasks}, seed={self._seed}, "
            f"num_outputs={self.num_outputs}, num_heads={self.num_heads})"
        )

    # ---- tasks ---------------------------------------------------------------
    def task_classes(self, t: int) -> tuple[int, ...]:
        """Original class ids of task ``t`` (see :attr:`Task.classes`)."""
        t = self._check_t(t)
        if self._spec.split:
            return self._class_order[t * self._k : (t + 1) * self._k]
        return self._class_order

    def task(self, t: int) -> Task:
        """Builds task ``t`` (deterministic: same stream and ``t`` -> same arrays).

        Raises:
          TypeError: ``t`` is not an integer.
          IndexError: ``t`` is outside ``[0, num_tasks)``.
        """
        t = self._check_t(t)
        src = self._source
        classes = self.task_classes(t)
        tr_idx = self._subset(t, self._rows(classes, src.y_train), len(src.y_train))
        x_tr = src.x_train if tr_idx is None else src.x_train[tr_idx]
        y_tr = src.y_train if tr_idx is None else src.y_train[tr_idx]
        x_tr, y_tr = _readonly(*self._transform(t, x_tr, y_tr))
        x_te, y_te = self.test_set(t)
        return Task(
            task_id=t,
            x_train=x_tr,
            y_train=y_tr,
            x_test=x_te,
            y_test=y_te,
            classes=tuple(int(c) for c in classes),
        )

    def test_set(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """The test split of task ``t`` alone, without building its training arrays.

        Returns:
          ``(x_test, y_test)``: ``(m, H, W, C)`` float32 and ``(m,)`` int32,
          read-only, equal to ``task(t).x_test`` and ``task(t).y_test`` (the same
          array objects while the stream caches its test sets).

        Raises:
          TypeError: ``t`` is not an integer.
          IndexError: ``t`` is outside ``[0, num_tasks)``.
        """
        t = self._check_t(t)
        cached = self._test_cache.get(t) if self._test_cache is not None else None
        if cached is None:
            src = self._source
            te_idx = self._rows(self.task_classes(t), src.y_test)
            if te_idx is None:
                x_te, y_te = src.x_test, src.y_test
            else:
                x_te, y_te = src.x_test[te_idx], src.y_test[te_idx]
            cached = _readonly(*self._transform(t, x_te, y_te))
            if self._test_cache is not None:
                self._test_cache[t] = cached
        return cached

    def _check_t(self, t) -> int:
        try:
            t = operator.index(t)
        except TypeError:
            raise TypeError(f"task id must be an integer, got {type(t).__name__} {t!r}.") from None
        if not 0 <= t < self._num_tasks:
            raise IndexError(
                f"task id {t} out of range: this stream has {self._num_tasks} tasks, ids 0..{self._num_tasks - 1}."
            )
        return t

    def _rows(self, classes: tuple[int, ...], y: np.ndarray) -> np.ndarray | None:
        """Indices of the examples of ``classes`` in ``y`` (None = all rows)."""
        return np.flatnonzero(np.isin(y, classes)) if self._spec.split else None

    def _subset(self, t: int, idx: np.ndarray | None, n_all: int):
        """First ``train_subset`` of ``idx`` (None = all rows) after a seeded shuffle."""
        if self._train_subset is None:
            return idx
        if idx is None:
            idx = np.arange(n_all)
        rng = np.random.default_rng([self._seed, _SUBSET_STREAM, t])
        return rng.permutation(idx)[: self._train_subset]

    def _transform(self, t: int, x: np.ndarray, y: np.ndarray):
        """Applies task ``t``'s input change and label map; always returns new arrays."""
        x = self._inputs(t, x)
        if self._label_map is not None:
            y = (self._label_map[t] if self._label_map.ndim == 2 else self._label_map)[y]
        else:
            y = np.array(y, copy=True)
        return np.ascontiguousarray(x, np.float32), np.ascontiguousarray(y, np.int32)


def _readonly(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    for a in arrays:
        a.setflags(write=False)
    return arrays


def make_stream(
    source: Source,
    kind: str,
    num_tasks: int,
    seed: int = 0,
    *,
    max_angle: float = 180.0,
    class_order: str = "natural",
    train_subset: int | None = None,
) -> TaskStream:
    """Makes a continual-learning task stream from a :class:`Source`.

    Args:
      source: the dataset.
      kind: ``'permuted'`` -- task ``t`` applies the ``t``-th of ``num_tasks`` fixed
        pixel permutations (over the ``H*W*C`` flattened values, drawn in order from
        ``np.random.default_rng(seed)``; task 0 is permuted too), labels unchanged
        (Goodfellow et al. 2013); ``'permuted_task_il'`` the same tasks with one head
        per task, ``'permuted_class_il'`` with task ``t``'s class ``c`` as label
        ``t * num_classes + c`` of one head (van de Ven & Tolias 2019). ``'rotated'``
        -- task ``t`` rotates every image by ``t * max_angle / num_tasks`` degrees (``scipy.ndimage.rotate``,
        ``reshape=False``, bilinear ``order=1``, corners filled with the darkest
        training pixel, i.e. the background), labels unchanged; task 0 is the
        source. ``'split_task_il'`` / ``'split_domain_il'`` / ``'split_class_il'`` --
        the classes, in ``class_order``, are cut into ``num_tasks`` groups of
        ``k = num_classes // num_tasks``; task ``t`` holds the examples of group
        ``t`` with labels ``0..k-1`` (task-IL: one head per task; domain-IL: one
        shared head of k outputs) or ``t*k..(t+1)*k-1`` (class-IL)
        (Zenke et al. 2017; scenarios per van de Ven & Tolias 2019).
        ``'label_permuted'`` -- the source's images; task ``t`` relabels class ``c``
        as ``perm_t[c]`` (see the module docs; Elsayed & Mahmood 2024).
        ``'finetune'`` -- task ``t`` applies the ``t``-th input change of
        ``FINETUNE_CHANGES`` (rotated 90 degrees, mirrored, inverted, noisy, blurred,
        shrunk, permuted; details in ``_finetune``), labels unchanged: distinct domains, none
        of them the source's, for fine-tuning a model pretrained on the source.
      num_tasks: ``T >= 1``; split kinds need ``num_classes % T == 0``; finetune
        ``T <= len(FINETUNE_CHANGES)`` (7).
      seed: the stream's seed (permutations, random class order, subsets).
        Same seed -> byte-identical tasks.
      max_angle: rotated only, degrees (finite).
      class_order: split kinds: ``'natural'`` (0..C-1) or ``'random'`` (a
        permutation drawn from ``np.random.default_rng(seed)``).
      train_subset: if set (``>= 1``), each task keeps only the first
        ``train_subset`` training examples after a shuffle seeded by ``(seed, t)``
        (all of them if fewer); test sets are never cut.

    Returns:
      A :class:`TaskStream`; tasks are built lazily by ``stream.task(t)``.

    Raises:
      ValueError: unknown ``kind`` (lists the valid ones); ``num_tasks < 1``;
        ``num_tasks > 7`` for finetune;
        ``num_classes % num_tasks != 0`` for a split kind (lists counts that work);
        a split group with no training examples; bad ``seed``, ``max_angle``,
        ``class_order`` or ``train_subset``.
    """
    if not isinstance(source, Source):
        raise ValueError(
            f"make_stream: source must be a clx.data.Source, got "
            f"{type(source).__name__}; build one with load_source(...) or Source(...)."
        )
    if kind not in KINDS:
        raise ValueError(f"make_stream: unknown kind {kind!r}; valid kinds are {', '.join(repr(k) for k in KINDS)}.")
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)):
        raise ValueError(f"make_stream: num_tasks must be an int, got {num_tasks!r}.")
    num_tasks = int(num_tasks)
    if num_tasks < 1:
        raise ValueError(f"make_stream: num_tasks must be >= 1, got {num_tasks}; a stream needs at least one task.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"make_stream: seed must be a non-negative int, got {seed!r}.")
    seed = int(seed)
    try:
        max_angle = float(max_angle)
    except (TypeError, ValueError):
        max_angle = math.nan
    if not math.isfinite(max_angle):
        raise ValueError(f"make_stream: max_angle must be a finite number of degrees, got {max_angle!r}.")
    if train_subset is not None:
        if isinstance(train_subset, bool) or not isinstance(train_subset, (int, np.integer)) or train_subset < 1:
            raise ValueError(f"make_stream: train_subset must be None or an int >= 1, got {train_subset!r}.")
        train_subset = int(train_subset)
    if class_order not in ("natural", "random"):
        raise ValueError(f"make_stream: class_order must be 'natural' or 'random', got {class_order!r}.")

    C = source.num_classes
    order = tuple(range(C))
    if _KIND_SPECS[kind].split:
        if C % num_tasks != 0:
            works = [d for d in range(1, C + 1) if C % d == 0]
            raise ValueError(
                f"make_stream: {kind} needs num_classes divisible by num_tasks, but "
                f"{source.name!r} has {C} classes and num_tasks={num_tasks}; use "
                f"num_tasks in {works}."
            )
        if class_order == "random":
            order = tuple(int(c) for c in np.random.default_rng(seed).permutation(C))
        counts = np.bincount(source.y_train, minlength=C)
        empty = [c for c in range(C) if counts[c] == 0]
        if empty:
            raise ValueError(
                f"make_stream: classes {empty} of {source.name!r} have no training "
                "examples, so a split task would be (partly) empty; use a source "
                "with every class present."
            )
    return TaskStream(source, kind, num_tasks, seed, max_angle, order, train_subset)
