"""The replay family: ER, A-GEM, GEM, DER, DER++ (``clx.replay``).

The buffers need one example's shape and the width of the logits, and ``make_rule``
does not see the stream, so both come from the model: the registry's models
(``build_mlp``) flatten their input, so one example is a vector of the first Dense
layer's input size (``layers/0/kernel`` rows: 784 on MNIST, 64 on digits) and the
buffers store flattened inputs, which the MLP takes as they are; the logits' width is
the model's output on one such input (``jax.eval_shape``, nothing computed). A
model without such a kernel (a CNN entry) should pass its stream's ``input_shape``.

Defaults are Mammoth's Split-MNIST best arguments (``utils/best_args.py``,
``seq-mnist``, batch 10, one epoch); the learning rate belongs to ``config.train``, so
the values per buffer size are in :data:`MAMMOTH_SPLIT_MNIST` for the config files.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import clx
from experiments.methods._registry import Method, optimizer, register, swept

#: Mammoth's ``best_args['seq-mnist']`` (lr, minibatch_size = replay batch, alpha, beta; batch 10, 1 epoch).
MAMMOTH_SPLIT_MNIST = {
    "er": {
        200: dict(lr=0.01, replay_batch_size=10),
        500: dict(lr=0.1, replay_batch_size=10),
        5120: dict(lr=0.1, replay_batch_size=10),
    },
    "der": {
        200: dict(lr=0.03, replay_batch_size=10, alpha=0.2),
        500: dict(lr=0.03, replay_batch_size=128, alpha=1.0),
        5120: dict(lr=0.1, replay_batch_size=128, alpha=0.5),
    },
    "derpp": {
        200: dict(lr=0.03, replay_batch_size=128, alpha=0.2, beta=1.0),
        500: dict(lr=0.03, replay_batch_size=10, alpha=1.0, beta=0.5),
        5120: dict(lr=0.1, replay_batch_size=64, alpha=0.2, beta=0.5),
    },
}


def model_shapes(model) -> tuple[tuple[int, ...], int]:
    """(one example's shape as the model takes it, the width of its logits) of a registry model.

    Raises:
      ValueError: the model has no ``template`` with a 2-D ``kernel`` (not a
        ``clx.FunctionalModel`` of a flattening MLP).
    """
    template = getattr(model, "template", None)
    kernels = []
    if template is not None:
        abstract = nnx.to_pure_dict(template)
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
            name = clx.tree.path_str(path)
            if name.endswith("kernel") and len(leaf.shape) == 2:
                kernels.append((name != "layers/0/kernel", name, leaf.shape))
    if not kernels:
        raise ValueError(
            f"replay methods read one example's shape from the model's first Dense kernel, and "
            f"{type(model).__name__} has none; build the rule with clx.replay.* and the stream's input_shape."
        )
    d = min(kernels)[2][0]
    out = jax.eval_shape(lambda p: model.apply(p, jnp.zeros((1, d), jnp.float32), jnp.zeros((1,), jnp.int32)), abstract)
    return (int(d),), int(out.shape[-1])


def _batch(value) -> int | None:
    """A config replay-batch size: 0 means 'as many as the training batch' (None)."""
    return None if int(value) == 0 else int(value)


def _num_tasks(config, block) -> int:
    return int(block.num_tasks) or int(config.stream.num_tasks)


def _check_tasks(config, name) -> None:
    block = config[name]
    if int(block.num_tasks) and int(block.num_tasks) < int(config.stream.num_tasks):
        raise ValueError(
            f"config.{name}.num_tasks={block.num_tasks} is smaller than config.stream.num_tasks="
            f"{config.stream.num_tasks}: the memory has no room for the later tasks; set {name}.num_tasks to 0 "
            f"(the stream's) or >= {config.stream.num_tasks}."
        )


# --- ER ------------------------------------------------------------------------------------------------------------


def er_config() -> ml_collections.ConfigDict:
    """``config.er``: Chaudhry et al. 2019 / Mammoth (reservoir buffer, replay batch = training batch)."""
    c = ml_collections.ConfigDict()
    c.buffer_size = 200  # Mammoth's grid: 200 | 500 | 5120 (see MAMMOTH_SPLIT_MNIST for lr)
    c.replay_batch_size = 0  # 0: the training batch's size (Mammoth's Split MNIST: minibatch_size 10 = batch 10)
    return c


def er_rule(config, model, hp=None):
    """``clx.chain(clx.replay.er(...), optimizer)``; ``hp``: a swept ``train.lr``."""
    shape, _ = model_shapes(model)
    c = config.er
    return clx.chain(clx.replay.er(c.buffer_size, shape, _batch(c.replay_batch_size)), optimizer(config, hp))


def _check_er(config):
    c = config.er
    clx.replay.er(c.buffer_size, (1,), _batch(c.replay_batch_size))


ER = register(Method("er", er_rule, config=er_config, sweepable=("train.lr",), check=_check_er))


# --- DER, DER++ ------------------------------------------------------------------------------------------------------


def der_config() -> ml_collections.ConfigDict:
    """``config.der``: Mammoth's Split-MNIST best arguments for buffer 200 (there lr 0.03)."""
    c = ml_collections.ConfigDict()
    c.buffer_size = 200
    c.alpha = 0.2  # logit MSE weight
    c.replay_batch_size = 10  # Mammoth's minibatch_size (0: the training batch's size)
    return c


def derpp_config() -> ml_collections.ConfigDict:
    """``config.derpp``: Mammoth's Split-MNIST best arguments for buffer 200 (there lr 0.03)."""
    c = ml_collections.ConfigDict()
    c.buffer_size = 200
    c.alpha = 0.2  # logit MSE weight
    c.beta = 1.0  # replayed cross-entropy weight
    c.replay_batch_size = 128  # Mammoth's minibatch_size (0: the training batch's size)
    return c


def der_rule(config, model, hp=None):
    """``clx.chain(clx.replay.der(...), optimizer)``; ``hp``: a swept ``der.alpha`` or ``train.lr``."""
    shape, k = model_shapes(model)
    c = config.der
    alpha = swept(config, hp, "der.alpha", c.alpha)
    rule = clx.replay.der(c.buffer_size, shape, k, alpha, 0.0, _batch(c.replay_batch_size))
    return clx.chain(rule, optimizer(config, hp))


def derpp_rule(config, model, hp=None):
    """``clx.chain(clx.replay.derpp(...), optimizer)``; ``hp``: a swept ``derpp.alpha``/``derpp.beta``/``train.lr``."""
    shape, k = model_shapes(model)
    c = config.derpp
    alpha = swept(config, hp, "derpp.alpha", c.alpha)
    beta = swept(config, hp, "derpp.beta", c.beta)
    rule = clx.replay.derpp(c.buffer_size, shape, k, alpha, beta, _batch(c.replay_batch_size))
    return clx.chain(rule, optimizer(config, hp))


def _check_der(config):
    c = config.der
    clx.replay.der(c.buffer_size, (1,), 1, c.alpha, 0.0, _batch(c.replay_batch_size))


def _check_derpp(config):
    c = config.derpp
    clx.replay.derpp(c.buffer_size, (1,), 1, c.alpha, c.beta, _batch(c.replay_batch_size))


DER = register(Method("der", der_rule, config=der_config, sweepable=("der.alpha", "train.lr"), check=_check_der))
DERPP = register(
    Method(
        "derpp",
        derpp_rule,
        config=derpp_config,
        sweepable=("derpp.alpha", "derpp.beta", "train.lr"),
        check=_check_derpp,
    )
)


# --- A-GEM, GEM ------------------------------------------------------------------------------------------------------


def agem_config() -> ml_collections.ConfigDict:
    """``config.agem``: Chaudhry et al. 2019's code (250 memory slots per task on MNIST, reference batch 256)."""
    c = ml_collections.ConfigDict()
    c.memory_per_task = 250  # mem_size 25 per class x 10 classes
    c.reference_batch_size = 256  # EPS_MEM_BATCH_SIZE
    c.num_tasks = 0  # tasks the memory holds; 0: config.stream.num_tasks
    return c


def agem_rule(config, model, hp=None):
    """``clx.chain(clx.replay.agem(...), optimizer)``; ``hp``: a swept ``train.lr``."""
    shape, _ = model_shapes(model)
    c = config.agem
    rule = clx.replay.agem(c.memory_per_task, _num_tasks(config, c), shape, c.reference_batch_size)
    return clx.chain(rule, optimizer(config, hp))


def _check_agem(config):
    _check_tasks(config, "agem")
    c = config.agem
    clx.replay.agem(c.memory_per_task, _num_tasks(config, c), (1,), c.reference_batch_size)


def gem_config() -> ml_collections.ConfigDict:
    """``config.gem``: Lopez-Paz & Ranzato 2017's run_experiments.sh (n_memories 256, memory_strength 0.5)."""
    c = ml_collections.ConfigDict()
    c.memory_per_task = 256  # n_memories
    c.memory_strength = 0.5  # gamma: the dual's lower bound v >= gamma (the code's margin)
    c.num_tasks = 0  # tasks the memory holds (one reference gradient each); 0: config.stream.num_tasks
    return c


def gem_rule(config, model, hp=None):
    """``clx.chain(clx.replay.gem(...), optimizer)``; ``hp``: a swept ``gem.memory_strength`` or ``train.lr``."""
    shape, _ = model_shapes(model)
    c = config.gem
    strength = swept(config, hp, "gem.memory_strength", c.memory_strength)
    rule = clx.replay.gem(c.memory_per_task, _num_tasks(config, c), shape, strength)
    return clx.chain(rule, optimizer(config, hp))


def _check_gem(config):
    _check_tasks(config, "gem")
    c = config.gem
    clx.replay.gem(c.memory_per_task, _num_tasks(config, c), (1,), c.memory_strength)


AGEM = register(Method("agem", agem_rule, config=agem_config, sweepable=("train.lr",), check=_check_agem))
GEM = register(
    Method("gem", gem_rule, config=gem_config, sweepable=("gem.memory_strength", "train.lr"), check=_check_gem)
)
