"""The one place where method names map to clx rules (the trainer knows none).

``build(name, config)`` returns a MethodSpec: the ContinualTransformation (rule
chained with the optimizer of ``config.train``) and the trainer's data mode.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
from flax import nnx

import clx

OPTIMIZERS = ("sgd", "adam")


def build_mlp(config, stream, seed: int):
    """The ``clx.MLP`` of ``config.model`` for ``stream``, as (FunctionalModel, params)."""
    module = clx.MLP(
        int(np.prod(stream.input_shape)), tuple(config.model.hidden), stream.num_outputs,
        num_heads=stream.num_heads, use_bias=config.model.use_bias, init=config.model.init,
        rngs=nnx.Rngs(seed),
    )
    return clx.FunctionalModel.from_module(module)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    name: str
    # the rule, or None when it needs the built model (then ``rule_from_model`` makes it)
    rule: clx.ContinualTransformation | None
    cumulative: bool = False  # joint training: task t trains on tasks 0..t
    evidence_samples: int = 300
    # (config, stream, seed) -> (model with apply/apply_recording/dense_output_shapes, params)
    build_model: object = build_mlp
    # (sweep key, value) -> the rule with that hyperparameter (the value may be traced inside jit);
    # None: the method cannot be swept. Raises ValueError for a key it does not support.
    rule_for: object = None
    # model -> the rule, for methods whose rule depends on the model ``build_model`` returns
    # (the hypernetwork's output regularizer needs the hypernetwork).
    rule_from_model: object = None

    def rule_with(self, model) -> clx.ContinualTransformation:
        """The rule to train ``model`` (a model from ``build_model``) with."""
        return self.rule if self.rule_from_model is None else self.rule_from_model(model)


def optimizer(train, lr=None) -> optax.GradientTransformation:
    """The base optimizer of ``config.train`` (``optimizer``, ``lr``, ``momentum``).

    ``lr`` overrides ``train.lr`` (a float or a traced scalar, for a learning-rate sweep).
    """
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown train.optimizer {train.optimizer!r}; choose one of {OPTIMIZERS}.")
    if not train.lr > 0:
        raise ValueError(f"train.lr must be > 0, got {train.lr}.")
    lr = train.lr if lr is None else lr
    if train.optimizer == "adam":
        return optax.adam(lr)
    return optax.sgd(lr, momentum=train.momentum or None)


def _sweep(name, make, keys):
    """A ``rule_for`` calling ``make(**{keys[key]: value})``."""

    def rule_for(key, value):
        if key not in keys:
            raise ValueError(f"config.sweep.key={key!r} is not supported for method {name!r}; "
                             f"it sweeps {sorted(keys)}.")
        return make(**{keys[key]: value})

    return rule_for


def _finetune(config):
    def make(lr=None):
        return clx.chain(optimizer(config.train, lr))

    return MethodSpec("finetune", make(), rule_for=_sweep("finetune", make, {"train.lr": "lr"}))


def _joint(config):
    def make(lr=None):
        return clx.chain(optimizer(config.train, lr))

    return MethodSpec("joint", make(), cumulative=True, rule_for=_sweep("joint", make, {"train.lr": "lr"}))


def _gpm(config):
    g = config.gpm

    def make(threshold=None, lr=None):
        if threshold is None:
            th = g.threshold if isinstance(g.threshold, float) else tuple(g.threshold)
        else:
            th = lambda t: threshold  # noqa: E731 -- one (possibly traced) value for every layer and task
        return clx.chain(clx.gpm(th, num_samples=g.num_samples), optimizer(config.train, lr))

    return MethodSpec("gpm", make(), evidence_samples=g.num_samples,
                      rule_for=_sweep("gpm", make, {"gpm.threshold": "threshold", "train.lr": "lr"}))


# --- task-conditioned hypernetworks (von Oswald et al. 2020; clx.hnet) -------------------


def build_hyper_model(config, stream, seed: int):
    """``config.hnet``'s hypernetwork over a ``clx.MLP`` target of ``config.model.hidden``.

    The target has ``num_tasks * head_size`` outputs (``hnet.per_task_heads``, the
    authors' layout) or ``head_size``; ``head_size`` is the stream's
    ``num_outputs`` (``num_outputs / num_tasks`` for class-IL, where the model
    infers the task by entropy, HNET+ENT). Returns (HyperModel, params); the
    target's weights are never allocated.
    """
    h = config.hnet
    class_il = stream.scenario == "class_il"
    T = stream.num_tasks
    if class_il and stream.num_outputs % T:
        raise ValueError(f"class-IL hypernetworks need num_outputs divisible by num_tasks, got {stream.num_outputs} "
                         f"and {T}.")
    head = stream.num_outputs // T if class_il else stream.num_outputs
    n_out = T * head if h.per_task_heads else head
    d_in = int(np.prod(stream.input_shape))
    target = clx.TargetNetwork.from_module_fn(lambda: clx.MLP(
        d_in, tuple(config.model.hidden), n_out, use_bias=config.model.use_bias, rngs=nnx.Rngs(0)), layout=h.layout)
    n = target.num_params
    if h.type == "chunked":
        hnet = clx.chunked_hypernetwork(n, h.emb_dim, h.chunk_dim, h.chunk_emb_dim, tuple(h.hidden), h.activation,
                                        chunk_emb_std=h.chunk_emb_std)
    elif h.type == "recurrent":
        hnet = clx.recurrent_hypernetwork(n, h.emb_dim, h.chunk_dim, h.chunk_emb_dim, h.rnn_hidden, h.cell,
                                          chunk_emb_std=h.chunk_emb_std)
    elif h.type == "mlp":
        hnet = clx.mlp_hypernetwork(n, h.emb_dim, tuple(h.hidden), h.activation)
    else:
        raise ValueError(f"unknown hnet.type {h.type!r}; choose 'chunked', 'recurrent' or 'mlp'.")
    model = clx.HyperModel(target, hnet, T, head, scenario="class_il" if class_il else "task_il",
                           per_task_heads=h.per_task_heads, emb_std=h.emb_std, temperature=h.temperature,
                           input_shape=stream.input_shape)
    return model, model.init(jax.random.key(seed))


def hnet_config():
    """The ``config.hnet`` block (defaults: the authors' Permuted-MNIST classifier hnet;
    see experiments/configs/pmnist_hnet.py and split_mnist_hnet.py)."""
    import ml_collections

    h = ml_collections.ConfigDict()
    h.type = "chunked"  # chunked | recurrent | mlp
    h.emb_dim = 24  # task embedding size (class_temb_size)
    h.chunk_dim = 78000  # weights per chunk (class_hyper_chunks)
    h.chunk_emb_dim = 8  # chunk embedding size (class_emb_size)
    h.hidden = (25, 25)  # hnet hidden layers (class_hnet_arch)
    h.activation = "elu"  # class_hnet_act
    h.cell = "gru"  # recurrent hnet: gru | lstm
    h.rnn_hidden = 64  # recurrent hnet: hidden state size
    h.beta = 0.1  # output-regularizer strength (class_beta)
    h.lookahead = True  # regularize at theta + dtheta (not no_lookahead)
    h.num_sampled = 0  # >0: regularize this many random old tasks per step (hnet_reg_batch_size); 0 = all
    h.reset_optimizer = True  # a fresh optimizer per task, as the authors' code
    h.emb_std = 1.0  # std_normal_temb
    h.chunk_emb_std = 1.0  # std_normal_emb
    h.temperature = 1.0  # soft_temp of HNET+ENT
    h.per_task_heads = True  # target has num_tasks * head_size outputs (the authors' layout)
    h.layout = "torch"  # order of the generated vector: 'torch' (the authors' code: W (out, in), then b) | 'flax'
    return h


def _hnet(config):
    if "hnet" not in config:
        raise ValueError("method 'hnet' needs a config.hnet block: use experiments/configs/pmnist_hnet.py or "
                         "split_mnist_hnet.py, or add `c.hnet = methods.hnet_config()` to your config.")
    h = config.hnet
    if not h.beta >= 0:
        raise ValueError(f"hnet.beta must be >= 0, got {h.beta}.")
    if h.layout not in clx.TargetNetwork.LAYOUTS:
        raise ValueError(f"hnet.layout must be one of {clx.TargetNetwork.LAYOUTS}, got {h.layout!r}.")
    opt = optimizer(config.train)

    def make(model):
        return clx.output_regularizer(model.hnet, opt, beta=h.beta, num_tasks=model.num_tasks,
                                      lookahead=h.lookahead, num_sampled=h.num_sampled or None,
                                      reset_optimizer=h.reset_optimizer, seed=config.seed)

    return MethodSpec("hnet", None, build_model=build_hyper_model, rule_from_model=make, evidence_samples=1)


BUILDERS = {"finetune": _finetune, "joint": _joint, "gpm": _gpm, "hnet": _hnet}


def parse(method: str) -> list[str]:
    """Splits ``config.method`` ('gpm' or 'gpm,finetune') and checks each name.

    Raises:
      ValueError: an empty or unknown method name (the message lists the known ones).
    """
    names = [m.strip().lower() for m in str(method).split(",") if m.strip()]
    if not names:
        raise ValueError(f"config.method is empty; choose from {sorted(BUILDERS)}.")
    unknown = [m for m in names if m not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known methods: {sorted(BUILDERS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"config.method names a method twice: {names}.")
    return names


def build(name: str, config) -> MethodSpec:
    """The MethodSpec for a known method name (see ``parse``)."""
    return BUILDERS[parse(name)[0]](config)
