"""Data sources and continual-learning task streams (numpy only).

Two layers:

* :class:`Source` (``clx.data._sources``): one image-classification dataset, whole
  and in memory, ``x_*`` float32 ``(N, H, W, C)`` normalised, ``y_*`` int32 ``(N,)``;
  :func:`load_source` reads ``"digits"`` (scikit-learn, no files), ``"mnist"`` (the
  original IDX files, SHA256-checked), ``"notmnist"`` (GPM's pickles), any TFDS dataset,
  or several joined by ``+`` (:func:`mix_sources`: GPM's 5-datasets).
* :class:`TaskStream` (``clx.data._streams``): a deterministic sequence of
  :class:`Task` s made from a source by :func:`make_stream`, one of :data:`KINDS`
  (``permuted``, ``permuted_task_il``, ``permuted_class_il``, ``rotated``, ``split_task_il``,
  ``split_domain_il``, ``split_class_il``, ``label_permuted``, ``finetune``: the
  :data:`FINETUNE_CHANGES` in order) with its scenario.

See those modules for shapes, label conventions and the errors raised.
"""

from clx.data._sources import BUILTIN_SOURCES as BUILTIN_SOURCES
from clx.data._sources import MNIST_FILES as MNIST_FILES
from clx.data._sources import MNIST_MEAN as MNIST_MEAN
from clx.data._sources import MNIST_STD as MNIST_STD
from clx.data._sources import NOTMNIST_FILES as NOTMNIST_FILES
from clx.data._sources import NOTMNIST_URL as NOTMNIST_URL
from clx.data._sources import Source as Source
from clx.data._sources import _read_tfds_split as _read_tfds_split  # for tests
from clx.data._sources import load_source as load_source
from clx.data._sources import mix_sources as mix_sources
from clx.data._streams import FINETUNE_CHANGES as FINETUNE_CHANGES
from clx.data._streams import KINDS as KINDS
from clx.data._streams import Task as Task
from clx.data._streams import TaskStream as TaskStream
from clx.data._streams import make_stream as make_stream

__all__ = [
    "BUILTIN_SOURCES",
    "FINETUNE_CHANGES",
    "KINDS",
    "MNIST_FILES",
    "MNIST_MEAN",
    "MNIST_STD",
    "NOTMNIST_FILES",
    "NOTMNIST_URL",
    "Source",
    "Task",
    "TaskStream",
    "load_source",
    "make_stream",
    "mix_sources",
]
