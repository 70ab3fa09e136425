"""GPM's reduced ResNet-18 (Flax NNX, channels-last inputs).

Saha, Garg, Roy (2021), "Gradient Projection Memory for Continual Learning", ICLR,
Sec. 5 and App. B (5-datasets and miniImageNet); the architecture as in the
authors' ``main_five_dataset.py`` (github.com/sahagobinda/GPM, read for this
module). It is the reduced ResNet-18 of Lopez-Paz & Ranzato's GEM code (2017,
``ResNet18(nclasses, nf=20)``) with GPM's changes: per-task heads, and a 2x2 average
pool before them where GEM pools the 4x4 map to 1x1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flax import nnx

from clx.functional import conv_general_dilated
from clx.models._cnn import BatchStatNorm, _apply_head, _as_images, _check_sizes, _head
from clx.models._mlp import _INITS

_PAD1 = ((1, 1), (1, 1))  # PyTorch's padding=1 (Flax's 'SAME' pads a stride-2 conv (0, 1), not (1, 1))

#: The authors' examples per task in each conv's representation matrix
#: (``get_representation_matrix_ResNet18``'s ``batch_list``, the three shortcuts taking
#: the count of their block's first conv), in the order ``jax.tree_util`` flattens
#: :class:`ResNet18`'s params: conv1, then per block conv1, conv2 (and shortcut).
GPM_NUM_SAMPLES: tuple[int, ...] = (10,) * 9 + (50,) * 4 + (100,) * 7


def _out(size: int, stride: int) -> int:
    return (size - 1) // stride + 1  # 3x3 conv with padding 1 (or 1x1 without): ceil(size / stride)


class BasicBlock(nnx.Module):
    """conv 3x3 (stride s) - BN - ReLU - conv 3x3 - BN, plus the shortcut, then ReLU.

    The shortcut is the identity, or, when ``stride != 1`` or the channels change,
    a 1x1 conv with stride s (no padding) followed by batch norm: params
    ``conv1``, ``bn1``, ``conv2``, ``bn2`` and ``shortcut``, ``shortcut_bn``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, kernel_init, *, rngs: nnx.Rngs):
        conv = dict(use_bias=False, kernel_init=kernel_init, conv_general_dilated=conv_general_dilated, rngs=rngs)
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), strides=stride, padding=_PAD1, **conv)
        self.bn1 = BatchStatNorm(c_out)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), strides=1, padding=_PAD1, **conv)
        self.bn2 = BatchStatNorm(c_out)
        if stride != 1 or c_in != c_out:
            self.shortcut = nnx.Conv(c_in, c_out, (1, 1), strides=stride, padding="VALID", **conv)
            self.shortcut_bn = BatchStatNorm(c_out)
        else:
            self.shortcut = self.shortcut_bn = None

    def __call__(self, x):
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return nnx.relu(out + short)


class ResNet18(nnx.Module):
    """GPM's reduced ResNet-18: 17 3x3 convs and 3 1x1 shortcut convs, nf = 20 base filters, per-task heads.

    conv 3x3 nf (stride 1, padding 1) - BN - ReLU - four stages of two
    :class:`BasicBlock` s with nf, 2 nf, 4 nf, 8 nf channels and first strides 1,
    2, 2, 2 - average pool 2x2 - per-task linear heads. On 32x32x3 inputs the
    maps are 32, 32, 16, 8, 4 pixels, pooled to 2x2, so the heads take
    8 nf x 4 = 640 features (the code's ``nf * 8 * 4``). Convs are ``nnx.Conv``
    without bias (the code's ``bias=False``), 3x3 ones with padding 1 as PyTorch
    pads (explicit ((1, 1), (1, 1)): Flax's 'SAME' would pad a stride-2 conv on
    one side only), the 1x1 shortcuts without padding. Batch norm uses batch
    statistics only (:class:`BatchStatNorm`, the code's
    ``BatchNorm2d(track_running_stats=False)``).

    Params, sorted: ``bn1``, ``conv1/kernel`` (3, 3, c, nf), ``head/kernel``,
    ``layer1``..``layer4`` / ``0``, ``1`` / ``conv1``, ``conv2``, ``bn1``, ``bn2``
    and, in the first block of stages 2-4, ``shortcut/kernel`` (1, 1, c_in,
    c_out) and ``shortcut_bn``. GPM's default layers are the 20 conv kernels
    (the heads are 3-D ``clx.MultiHead`` kernels, never projected), each its own
    basis, in flattening order: conv1, then per block conv1, conv2 and the
    shortcut, the order of the authors' representation list and their
    ``feature_list`` (``mat_final``: the shortcut after its block's conv2).

    GPM on this model as in the authors' code (checked in ``main_five_dataset.py``):

    - each conv's representation is its im2col patches with the layer's own stride
      and padding 1 for the 3x3 convs (``F.pad(act, (1, 1, 1, 1))`` then windows at
      the layer's stride), stride and no padding for the 1x1 shortcuts: exactly the
      patches ``clx.FunctionalModel``'s conv taps record for these layers;
    - examples per task in each representation (:data:`GPM_NUM_SAMPLES`, their
      ``batch_list`` "scaled"): 10 for conv1, stage 1, stage 2's first block and
      its shortcut and stage 2's second block's conv1; 50 for stage 2's last conv,
      stage 3's first block and its shortcut; 100 for the rest (7 layers), drawn
      from one forward pass of 100 training examples;
    - threshold 0.965 for all 20 layers and every task;
    - batch-norm scales and biases learn on the first task only
      (``clx.gpm(..., freeze_vectors=True)``: the code zeroes every 1-D gradient
      for ``task_id != 0``); the heads are per task and not projected.

    Differences from the authors' code: the per-task heads are one stacked
    ``clx.MultiHead`` evaluated only for the example's task (the code evaluates
    every head); the head's rows follow Flax's (H, W, C) flattening where
    PyTorch's are (C, H, W) (a fixed permutation of a freshly initialised layer).

    Args:
      input_shape: (H, W, C) of one example, at least 9x9 (32x32x3 for 5-datasets).
      num_outputs: logits per head (10 on 5-datasets).
      num_heads: the number of tasks (task-IL), or 1 for a shared ``nnx.Linear`` head.
      nf: base filters (20 in GPM; 64 is the full-width ResNet-18).
      num_blocks: blocks per stage ((2, 2, 2, 2): ResNet-18).
      init: 'torch' (PyTorch's default for Conv2d and Linear, as the authors' code),
        'xavier' or 'lecun'.

    Raises:
      ValueError: an unknown init, non-positive sizes, not four stages, an input
        smaller than 9x9; at call, inputs that are neither (B, *input_shape) nor flat.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (32, 32, 3),
        num_outputs: int = 10,
        num_heads: int = 5,
        nf: int = 20,
        num_blocks: Sequence[int] = (2, 2, 2, 2),
        init: str = "torch",
        *,
        rngs: nnx.Rngs,
    ):
        if init not in _INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {sorted(_INITS)}.")
        h, w, c = (int(s) for s in input_shape)
        blocks = tuple(int(b) for b in num_blocks)
        if len(blocks) != 4:
            raise ValueError(f"ResNet18 takes 4 stages of blocks, got num_blocks={tuple(num_blocks)}.")
        _check_sizes(
            "ResNet18",
            input_shape=(h, w, c),
            nf=int(nf),
            num_blocks=blocks,
            num_outputs=int(num_outputs),
            num_heads=int(num_heads),
        )
        s = [h, w]
        for stride in (2, 2, 2):
            s = [_out(a, stride) for a in s]
        pooled = [a // 2 for a in s]
        if min(pooled) < 1:
            raise ValueError(f"ResNet18 needs inputs of at least 9x9 pixels, got input_shape={tuple(input_shape)}.")
        kinit = _INITS[init]
        nf = int(nf)
        self.input_shape = (h, w, c)
        self.conv1 = nnx.Conv(
            c,
            nf,
            (3, 3),
            strides=1,
            padding=_PAD1,
            use_bias=False,
            kernel_init=kinit,
            conv_general_dilated=conv_general_dilated,
            rngs=rngs,
        )
        self.bn1 = BatchStatNorm(nf)
        c_in = nf
        for i, (n, first_stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            stage = []
            for b in range(n):
                stage.append(BasicBlock(c_in, nf * 2**i, first_stride if b == 0 else 1, kinit, rngs=rngs))
                c_in = nf * 2**i
            setattr(self, f"layer{i + 1}", nnx.List(stage))
        self.head = _head(c_in * math.prod(pooled), int(num_outputs), int(num_heads), False, kinit, rngs)

    def __call__(self, x, task_id=None):
        x = _as_images(x, self.input_shape)
        x = nnx.relu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        x = nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # PyTorch avg_pool2d(out, 2): floor
        return _apply_head(self.head, x.reshape(x.shape[0], -1), task_id)
