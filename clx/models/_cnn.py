"""The convolutional networks of the gradient-projection papers (Flax NNX, channels-last inputs).

- :class:`LeNet`: a small LeNet-style CNN for MNIST-sized inputs (conv 5x5 20 -
  pool - conv 5x5 50 - pool - fc 500 - heads), the conv path that trains on CPUs.
- :class:`AlexNet`: the 5-layer AlexNet of GPM's CIFAR-100 experiments (Saha,
  Garg, Roy 2021, "Gradient Projection Memory for Continual Learning", ICLR; the
  authors' ``main_cifar100.py``), also used by SGP and TRGP.
- :class:`BatchStatNorm`: batch normalization with batch statistics only
  (PyTorch's ``BatchNorm*d(track_running_stats=False)``, as in the authors'
  code), whose only state is ``nnx.Param`` scale and bias, so
  ``clx.FunctionalModel`` accepts the models.

Every conv and fc layer is an ``nnx.Conv``/``nnx.Linear`` without bias (GPM's
convention), so ``clx.gpm`` projects all of them by default, and the per-task
heads are a ``clx.MultiHead`` (3-D kernel), which projection rules leave alone:
each task trains its own head, as in the authors' code. With ``num_heads == 1``
the shared head is an ``nnx.Linear`` (projected, as for ``clx.MLP``).

Every ``nnx.Conv`` here and in ``ResNet18`` takes
``conv_general_dilated=clx.functional.conv_general_dilated``: lax's convolution with
its gradients written as forward ops (the same values; on CPU 5-10x faster inside
``clx.fit``'s scan of train steps). The Conv taps of ``clx.FunctionalModel`` wrap it.

Inputs are (batch, H, W, C) as ``clx.data`` streams hand them (``stream.input_shape``);
flat (batch, H*W*C) inputs are reshaped to ``input_shape``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from clx.functional import conv_general_dilated
from clx.models._mlp import _INITS, MultiHead


def _conv(c_in: int, c_out: int, kernel: tuple[int, int], use_bias: bool, kinit, rngs: nnx.Rngs) -> nnx.Conv:
    """An unpadded stride-1 ``nnx.Conv`` on clx's :func:`clx.functional.conv_general_dilated` (fast gradients
    inside ``lax.scan`` on CPU)."""
    return nnx.Conv(
        c_in,
        c_out,
        kernel,
        padding="VALID",
        use_bias=use_bias,
        kernel_init=kinit,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


class BatchStatNorm(nnx.Module):
    """Batch normalization over every axis but the last, with the batch's own statistics.

    ``y = scale * (x - mean) / sqrt(var + eps) + bias``, mean and (biased) variance
    over all axes but the feature axis of *this* batch, in training and
    evaluation alike: PyTorch's ``BatchNorm1d/2d(track_running_stats=False)``,
    which GPM's AlexNet and ResNet-18 use (Saha et al. 2021, the authors'
    ``main_cifar100.py``, ``main_five_dataset.py``). There are no running
    averages: the only state is the ``nnx.Param`` ``scale`` (ones) and ``bias``
    (zeros), each (num_features,), so a model holding it is a pure function of
    its params (``clx.FunctionalModel``). Its outputs on one example depend on the
    rest of the batch (also at evaluation, as in the authors' code; ``clx.fit``
    evaluates in batches of ``eval_batch_size`` and pads the last training batch
    of an epoch with repeated examples, which enter the statistics).

    Args:
      num_features: size of the last axis.
      epsilon: added to the variance (PyTorch's 1e-5).

    Raises:
      ValueError: ``num_features < 1`` or ``epsilon < 0``; at call, an input whose
        last axis is not ``num_features``.
    """

    def __init__(self, num_features: int, epsilon: float = 1e-5):
        if int(num_features) < 1 or not float(epsilon) >= 0:
            raise ValueError(f"BatchStatNorm needs num_features >= 1 and epsilon >= 0, got {num_features}, {epsilon}.")
        self.scale = nnx.Param(jnp.ones((int(num_features),), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((int(num_features),), jnp.float32))
        self.epsilon = float(epsilon)

    def __call__(self, x):
        if x.shape[-1] != self.scale.shape[0]:
            raise ValueError(f"BatchStatNorm({self.scale.shape[0]}) got inputs with {x.shape[-1]} features: {x.shape}.")
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes)
        var = jnp.mean(jnp.square(x - mean), axis=axes)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * self.scale[...] + self.bias[...]


def _as_images(x, input_shape):
    if x.shape[1:] == tuple(input_shape):
        return x
    if x.ndim >= 2 and math.prod(x.shape[1:]) == math.prod(input_shape):
        return x.reshape(x.shape[0], *input_shape)
    raise ValueError(
        f"the model takes (batch, {', '.join(map(str, input_shape))}) inputs (or flat ones), got {x.shape}."
    )


def _pool(x):
    return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # PyTorch MaxPool2d(2): floor


def _check_sizes(name, **sizes):
    bad = {k: v for k, v in sizes.items() if (min(v) if isinstance(v, tuple) else v) < 1}
    if bad:
        raise ValueError(f"{name} sizes must be >= 1, got {bad}.")


def _head(d, num_outputs, num_heads, use_bias, kinit, rngs):
    if num_heads == 1:
        return nnx.Linear(d, num_outputs, use_bias=use_bias, kernel_init=kinit, rngs=rngs)
    return MultiHead(d, num_outputs, num_heads, use_bias, kinit, rngs=rngs)


def _apply_head(head, x, task_id):
    return head(x) if isinstance(head, nnx.Linear) else head(x, task_id)


class LeNet(nnx.Module):
    """A LeNet-style CNN: conv 5x5 - ReLU - maxpool 2 - conv 5x5 - ReLU - maxpool 2 - fc - ReLU - head(s).

    The Caffe LeNet widths (20, 50 channels; 500 hidden units), valid padding,
    stride 1. On 28x28x1 MNIST: 24x24x20 -> 12x12x20 -> 8x8x50 -> 4x4x50 = 800 ->
    500. Params: ``conv1/kernel`` (5, 5, c, 20), ``conv2/kernel`` (5, 5, 20, 50),
    ``fc/kernel`` (800, 500) and ``head/kernel`` ((num_heads, 500, k) for a
    ``MultiHead``, else (500, k)): sorted, the projected layers flatten conv1,
    conv2, fc (the order of a per-layer GPM threshold list).

    Args:
      input_shape: (H, W, C) of one example (``stream.input_shape``).
      num_outputs: logits per head.
      num_heads: 1 (a shared, projected ``nnx.Linear`` head) or the number of
        tasks (task-IL: a ``MultiHead`` chosen by ``task_id``, unprojected).
      channels: the two convs' output channels.
      hidden: width of the fc layer.
      use_bias: biases on every layer (default False, GPM's convention: then
        projection covers every shared parameter).
      init: 'torch' (PyTorch's default for Conv2d and Linear), 'xavier' or 'lecun'.

    Raises:
      ValueError: an unknown init, non-positive sizes, an input too small for the
        two convs and pools; at call, inputs that are neither (B, *input_shape) nor flat.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_outputs: int = 10,
        num_heads: int = 1,
        channels: Sequence[int] = (20, 50),
        hidden: int = 500,
        use_bias: bool = False,
        init: str = "torch",
        *,
        rngs: nnx.Rngs,
    ):
        if init not in _INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {sorted(_INITS)}.")
        h, w, c = (int(s) for s in input_shape)
        c1, c2 = (int(s) for s in channels)
        _check_sizes(
            "LeNet",
            input_shape=(h, w, c),
            channels=(c1, c2),
            hidden=int(hidden),
            num_outputs=int(num_outputs),
            num_heads=int(num_heads),
        )
        oh, ow = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if oh < 1 or ow < 1:
            raise ValueError(f"LeNet needs inputs of at least 16x16 pixels, got input_shape={tuple(input_shape)}.")
        kinit = _INITS[init]
        self.input_shape = (h, w, c)
        self.conv1 = _conv(c, c1, (5, 5), use_bias, kinit, rngs)
        self.conv2 = _conv(c1, c2, (5, 5), use_bias, kinit, rngs)
        self.fc = nnx.Linear(oh * ow * c2, int(hidden), use_bias=use_bias, kernel_init=kinit, rngs=rngs)
        self.head = _head(int(hidden), int(num_outputs), int(num_heads), use_bias, kinit, rngs)

    def __call__(self, x, task_id=None):
        x = _as_images(x, self.input_shape)
        x = _pool(nnx.relu(self.conv1(x)))
        x = _pool(nnx.relu(self.conv2(x)))
        x = nnx.relu(self.fc(x.reshape(x.shape[0], -1)))
        return _apply_head(self.head, x, task_id)


class AlexNet(nnx.Module):
    """GPM's 5-layer AlexNet (Saha et al. 2021, Sec. 5 and App. B; ``AlexNet`` in the authors' ``main_cifar100.py``).

    conv 4x4 64 - BN - ReLU - maxpool 2 - conv 3x3 128 - BN - ReLU - maxpool 2 -
    conv 2x2 256 - BN - ReLU - maxpool 2 - fc 2048 - BN - ReLU - fc 2048 - BN -
    ReLU - per-task heads; no padding, stride 1, no biases (on 32x32x3: 29 -> 14 ->
    12 -> 6 -> 5 -> 2, so fc1 takes 2*2*256 = 1024). Batch norm uses batch
    statistics only (:class:`BatchStatNorm`, the code's
    ``track_running_stats=False``). Params, sorted: ``bn1..bn5/{scale,bias}``,
    ``conv1..conv3/kernel`` (4-D), ``fc1, fc2/kernel``, ``head/kernel``; GPM's
    default layers are the five conv and fc kernels (in the order conv1, conv2,
    conv3, fc1, fc2, the authors' ``batch_list``/threshold order), not the heads.
    The authors' code also freezes the batch-norm params after the first task:
    ``clx.gpm(..., freeze_vectors=True)``.

    Differences from the authors' code: dropout (0.2 after the convs 1-2, 0.5
    after conv3 and the fc layers) is omitted, since clx's models are pure
    functions without RNG state; the per-task heads are one stacked
    ``clx.MultiHead``, evaluated only for the example's task (the code evaluates all).

    Args:
      input_shape: (H, W, C) of one example (32x32x3 for CIFAR-100).
      num_outputs: logits per head (10 on 10-task CIFAR-100).
      num_heads: the number of tasks (task-IL), or 1 for a shared ``nnx.Linear`` head.
      channels: the three convs' channels; hidden: the two fc widths.
      init: 'torch' (PyTorch's default, as the authors' code), 'xavier' or 'lecun'.

    Raises:
      ValueError: an unknown init, non-positive sizes, an input too small; at
        call, inputs that are neither (B, *input_shape) nor flat.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (32, 32, 3),
        num_outputs: int = 10,
        num_heads: int = 10,
        channels: Sequence[int] = (64, 128, 256),
        hidden: Sequence[int] = (2048, 2048),
        init: str = "torch",
        *,
        rngs: nnx.Rngs,
    ):
        if init not in _INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {sorted(_INITS)}.")
        h, w, c = (int(s) for s in input_shape)
        ch = tuple(int(s) for s in channels)
        hid = tuple(int(s) for s in hidden)
        if len(ch) != 3 or len(hid) != 2:
            raise ValueError(f"AlexNet takes 3 conv channels and 2 fc widths, got {channels}, {hidden}.")
        _check_sizes(
            "AlexNet",
            input_shape=(h, w, c),
            channels=ch,
            hidden=hid,
            num_outputs=int(num_outputs),
            num_heads=int(num_heads),
        )
        s = [h, w]
        for k in (4, 3, 2):
            s = [(a - k + 1) // 2 for a in s]
        if min(s) < 1:
            raise ValueError(f"AlexNet needs inputs of at least 19x19 pixels, got input_shape={tuple(input_shape)}.")
        kinit = _INITS[init]
        self.input_shape = (h, w, c)
        self.conv1 = _conv(c, ch[0], (4, 4), False, kinit, rngs)
        self.bn1 = BatchStatNorm(ch[0])
        self.conv2 = _conv(ch[0], ch[1], (3, 3), False, kinit, rngs)
        self.bn2 = BatchStatNorm(ch[1])
        self.conv3 = _conv(ch[1], ch[2], (2, 2), False, kinit, rngs)
        self.bn3 = BatchStatNorm(ch[2])
        self.fc1 = nnx.Linear(s[0] * s[1] * ch[2], hid[0], use_bias=False, kernel_init=kinit, rngs=rngs)
        self.bn4 = BatchStatNorm(hid[0])
        self.fc2 = nnx.Linear(hid[0], hid[1], use_bias=False, kernel_init=kinit, rngs=rngs)
        self.bn5 = BatchStatNorm(hid[1])
        self.head = _head(hid[1], int(num_outputs), int(num_heads), False, kinit, rngs)

    def __call__(self, x, task_id=None):
        x = _as_images(x, self.input_shape)
        x = _pool(nnx.relu(self.bn1(self.conv1(x))))
        x = _pool(nnx.relu(self.bn2(self.conv2(x))))
        x = _pool(nnx.relu(self.bn3(self.conv3(x))))
        x = nnx.relu(self.bn4(self.fc1(x.reshape(x.shape[0], -1))))
        x = nnx.relu(self.bn5(self.fc2(x)))
        return _apply_head(self.head, x, task_id)
