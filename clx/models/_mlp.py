"""The MLP of the published benchmarks (Flax NNX), with an optional stack of per-task heads."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clx.tree import check_task_ids, concrete

# PyTorch's nn.Linear default, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the init of the
# authors' code for GPM and most continual-learning baselines.
TORCH_LINEAR_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# Glorot/Xavier uniform, U(-a, a) with a = sqrt(6 / (fan_in + fan_out)): Mammoth's backbones (``xavier``).
_INITS = {
    "torch": TORCH_LINEAR_INIT,
    "lecun": nnx.initializers.lecun_normal(),
    "xavier": nnx.initializers.xavier_uniform(),
}


class MultiHead(nnx.Module):
    """One linear head per task, stacked: kernel (num_heads, d, k), bias (num_heads, k).

    ``__call__(x, task_id)`` applies head ``task_id`` (an int scalar, or one id
    per example, shape (batch,)) to x (batch, d) and returns (batch, k) logits.
    Heads are not ``nnx.Linear`` layers, so projection rules leave them alone
    (each task trains only its own head).

    Raises:
      ValueError: ``task_id`` is None, or a concrete id outside [0, num_heads).
        A traced id out of range is reported under ``checkify.checkify`` (inside
        jit too: ``unknown task id {id}: the model has {num_heads} heads``);
        without checkify its logits are NaN, never another task's head.
    """

    def __init__(self, d: int, k: int, num_heads: int, use_bias: bool, kernel_init, *, rngs: nnx.Rngs):
        keys = jax.random.split(rngs.params(), num_heads)
        self.kernel = nnx.Param(jax.vmap(lambda key: kernel_init(key, (d, k), jnp.float32))(keys))
        self.bias = nnx.Param(jnp.zeros((num_heads, k), jnp.float32)) if use_bias else None

    def __call__(self, x, task_id):
        if task_id is None:
            raise ValueError("a multi-head model needs task_id (task-incremental evaluation).")
        num_heads = self.kernel.shape[0]
        ids = concrete(task_id)
        if ids is not None and ids.size and not ((ids >= 0) & (ids < num_heads)).all():
            bad = int(ids.reshape(-1)[np.flatnonzero((ids.reshape(-1) < 0) | (ids.reshape(-1) >= num_heads))[0]])
            raise ValueError(
                f"unknown task id {bad}: the model has {num_heads} heads (tasks 0..{num_heads - 1}); "
                "build the MLP with num_heads = the stream's number of tasks."
            )
        task_id = jnp.broadcast_to(jnp.asarray(task_id, jnp.int32), x.shape[:1])
        check_task_ids(task_id, num_heads, "heads")
        # out of range under jit without checkify: NaN logits (never another task's head)
        w = self.kernel[...].at[task_id].get(mode="fill", fill_value=jnp.nan)  # (batch, d, k)
        y = jnp.einsum("bd,bdk->bk", x, w)
        if self.bias is not None:
            y = y + self.bias[...].at[task_id].get(mode="fill", fill_value=jnp.nan)
        return y


class MLP(nnx.Module):
    """Fully connected ReLU network on flattened inputs.

    GPM's Permuted-MNIST network is ``MLP(784, (100, 100), 10, use_bias=False)``
    (Saha et al. 2021, Sec. 5). With one shared head, every layer, head included,
    is an ``nnx.Linear`` in ``self.layers`` (params ``layers/0/kernel`` ...
    ``layers/L/kernel``, input to output: the order of a per-layer threshold
    list); with ``num_heads > 1`` the hidden layers are followed by a
    ``MultiHead`` (``head/kernel``) chosen by ``task_id``.

    Args:
      in_features: size of the flattened input (e.g. 784 for MNIST).
      hidden: widths of the hidden layers.
      num_outputs: logits per head.
      num_heads: 1 for a shared head (domain-IL, class-IL), the number of tasks
        for task-IL.
      use_bias: GPM's MLP has no biases.
      init: 'torch' (PyTorch's Linear default, as in the papers' code), 'xavier'
        (Glorot uniform, Mammoth's backbones) or 'lecun'. Biases start at zero.

    Raises:
      ValueError: an unknown init, non-positive sizes.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (100, 100),
        num_outputs: int = 10,
        num_heads: int = 1,
        use_bias: bool = True,
        init: str = "torch",
        *,
        rngs: nnx.Rngs,
    ):
        if init not in _INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {sorted(_INITS)}.")
        sizes = [int(in_features), *map(int, hidden)]
        if min(sizes + [int(num_outputs), int(num_heads)]) < 1:
            raise ValueError(
                f"MLP sizes must be >= 1: in_features={in_features}, hidden={hidden}, "
                f"num_outputs={num_outputs}, num_heads={num_heads}."
            )
        kinit = _INITS[init]
        if num_heads == 1:  # the shared head is the last Dense layer: params flatten input to output
            sizes.append(int(num_outputs))
        self.layers = nnx.List(
            [nnx.Linear(a, b, use_bias=use_bias, kernel_init=kinit, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.head = MultiHead(sizes[-1], num_outputs, num_heads, use_bias, kinit, rngs=rngs) if num_heads > 1 else None

    def __call__(self, x, task_id=None):
        x = x.reshape(x.shape[0], -1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last or self.head is not None:
                x = nnx.relu(x)
        return x if self.head is None else self.head(x, task_id)
