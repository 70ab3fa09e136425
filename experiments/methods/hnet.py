"""Task-conditioned hypernetworks (von Oswald et al. 2020; ``clx.hnet``)."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from flax import nnx

import clx
from clx import data
from experiments.methods._registry import Method, optimizer, register


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
        raise ValueError(
            f"class-IL hypernetworks need num_outputs divisible by num_tasks, got {stream.num_outputs} and {T}."
        )
    head = stream.num_outputs // T if class_il else stream.num_outputs
    n_out = T * head if h.per_task_heads else head
    d_in = int(np.prod(stream.input_shape))
    target = clx.TargetNetwork.from_module_fn(
        lambda: clx.MLP(d_in, tuple(config.model.hidden), n_out, use_bias=config.model.use_bias, rngs=nnx.Rngs(0)),
        layout=h.layout,
    )
    n = target.num_params
    if h.type == "chunked":
        hnet = clx.chunked_hypernetwork(
            n, h.emb_dim, h.chunk_dim, h.chunk_emb_dim, tuple(h.hidden), h.activation, chunk_emb_std=h.chunk_emb_std
        )
    elif h.type == "recurrent":
        hnet = clx.recurrent_hypernetwork(
            n, h.emb_dim, h.chunk_dim, h.chunk_emb_dim, h.rnn_hidden, h.cell, chunk_emb_std=h.chunk_emb_std
        )
    elif h.type == "mlp":
        hnet = clx.mlp_hypernetwork(n, h.emb_dim, tuple(h.hidden), h.activation)
    else:
        raise ValueError(f"unknown hnet.type {h.type!r}; choose 'chunked', 'recurrent' or 'mlp'.")
    model = clx.HyperModel(
        target,
        hnet,
        T,
        head,
        scenario="class_il" if class_il else "task_il",
        per_task_heads=h.per_task_heads,
        emb_std=h.emb_std,
        temperature=h.temperature,
        input_shape=stream.input_shape,
    )
    return model, model.init(jax.random.key(seed))


def hnet_config() -> ml_collections.ConfigDict:
    """The ``config.hnet`` block (defaults: the authors' Permuted-MNIST classifier hnet;
    see experiments/configs/pmnist_hnet.py and split_mnist_hnet.py)."""
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
    # The hypernetwork generates the weights from the test example's task embedding, so it needs the task id at
    # test time. A domain-IL stream (permuted, rotated, split_domain_il) gives none in van de Ven & Tolias's
    # scenarios; True evaluates it as task-IL (von Oswald et al.'s PMNIST "CL1"). Class-IL infers the task.
    h.task_id_at_test = False
    return h


def check(config) -> None:
    """Raises ValueError for a bad ``hnet.beta`` or ``hnet.layout`` (``hnet.type`` is checked by ``build_model``),
    or a domain-IL stream without ``hnet.task_id_at_test`` (the method needs task labels the scenario does not give).
    """
    h = config.hnet
    if not h.beta >= 0:
        raise ValueError(f"hnet.beta must be >= 0, got {h.beta}.")
    if h.layout not in clx.TargetNetwork.LAYOUTS:
        raise ValueError(f"hnet.layout must be one of {clx.TargetNetwork.LAYOUTS}, got {h.layout!r}.")
    scenario = data.KINDS.get(config.stream.kind)
    if scenario == "domain_il" and not h.task_id_at_test:
        raise ValueError(
            f"method 'hnet' needs each test example's task id, and stream.kind={config.stream.kind!r} is domain-IL, "
            "which gives none at test time. Set hnet.task_id_at_test=True to evaluate with task ids (task-IL, "
            "von Oswald et al.'s PMNIST 'CL1'), or use a class-IL stream (split_class_il), where the task is "
            "inferred from the predictive entropy."
        )


def hnet_rule(config, model, hp=None):
    """The output regularizer of ``model``'s hypernetwork, owning ``config.train``'s optimizer."""
    h = config.hnet
    return clx.output_regularizer(
        model.hnet,
        optimizer(config, hp),
        beta=h.beta,
        num_tasks=model.num_tasks,
        lookahead=h.lookahead,
        num_sampled=h.num_sampled or None,
        reset_optimizer=h.reset_optimizer,
        seed=config.seed,
    )


HNET = register(
    Method(
        "hnet",
        hnet_rule,
        config=hnet_config,
        sweepable=(),
        build_model=build_hyper_model,
        check=check,
        evidence_samples=lambda config: 1,
    )
)
