"""Hypernetworks as pure functions: ``init(key) -> theta``, ``apply(theta, e) -> (n_target,)``.

* :func:`mlp_hypernetwork`: one output per target weight (von Oswald et al. 2020,
  "Continual learning with hypernetworks", ICLR, Sec. 2);
* :func:`chunked_hypernetwork`: the paper's chunking, one small network generating
  chunk ``i`` from ``[e_t; c_i]`` with learned chunk embeddings ``c_i``;
* :func:`recurrent_hypernetwork`: Chandra, Varshney, Srijith, Gupta 2023,
  "Continual Learning with Dependency Preserving Hypernetworks", WACV: a GRU or
  LSTM scanned over the chunks, so chunk ``k`` depends on chunks ``j < k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "elu": jax.nn.elu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


class Hypernetwork(NamedTuple):
    """A hypernetwork as two pure functions.

    Attributes:
      init: ``init(key) -> theta``, the trainable weights (a pytree; chunk
        embeddings included, they are part of theta and regularized with it).
      apply: ``apply(theta, e) -> (num_outputs,) float32``, the flat target
        weights for one task embedding ``e`` of shape (emb_dim,); several
        embeddings (m, emb_dim) give (m, num_outputs) in one batched computation.
      num_outputs: number of generated weights (must equal the target's ``num_params``).
      emb_dim: task-embedding size.
      name: 'mlp', 'chunked' or 'recurrent'.
    """

    init: Callable[[jax.Array], Any]
    apply: Callable[[Any, jax.Array], jax.Array]
    num_outputs: int
    emb_dim: int
    name: str


def _check_sizes(**sizes):
    for k, v in sizes.items():
        vals = v if isinstance(v, (tuple, list)) else (v,)
        if any(int(s) < 1 for s in vals):
            raise ValueError(f"{k} must be >= 1, got {v}; choose a positive size.")


def _dense_init(key, sizes: Sequence[int]) -> list[dict]:
    """Xavier-uniform kernels, zero biases: the init of the authors' code."""
    keys = jax.random.split(key, len(sizes) - 1)
    xavier = jax.nn.initializers.glorot_uniform()
    return [
        {"kernel": xavier(k, (a, b), jnp.float32), "bias": jnp.zeros((b,), jnp.float32)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def _mlp(layers: list[dict], h: jax.Array, act) -> jax.Array:
    for i, layer in enumerate(layers):
        h = h @ layer["kernel"] + layer["bias"]
        if i < len(layers) - 1:
            h = act(h)
    return h


def _with_chunk_embeddings(e: jax.Array, chunk_emb: jax.Array) -> jax.Array:
    """The inputs ``[e_t ; c_i]`` of every chunk: (*lead, n_chunks, emb_dim + chunk_emb_dim).

    ``e`` is one embedding (emb_dim,) or several (m, emb_dim) (``lead`` = () or
    (m,)); ``chunk_emb`` is (n_chunks, chunk_emb_dim). Each embedding is paired
    with every chunk embedding, the task embedding first (von Oswald et al. 2020,
    Sec. 2; Chandra et al. 2023, Sec. 3).
    """
    lead = e.shape[:-1]
    return jnp.concatenate(
        [
            jnp.broadcast_to(e[..., None, :], (*lead, chunk_emb.shape[0], e.shape[-1])),
            jnp.broadcast_to(chunk_emb, (*lead, *chunk_emb.shape)),
        ],
        axis=-1,
    )


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown hypernetwork activation {name!r}; choose one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def mlp_hypernetwork(
    num_outputs: int, emb_dim: int, hidden: Sequence[int] = (100, 100), activation: str = "relu"
) -> Hypernetwork:
    """The full hypernetwork: an MLP ``e (emb_dim,) -> hidden -> (num_outputs,)``.

    von Oswald et al. 2020, Sec. 2 (no chunking): one output unit per target weight,
    so its last layer alone has ``hidden[-1] * num_outputs`` weights.

    Raises:
      ValueError: a size < 1 or an unknown activation.
    """
    _check_sizes(num_outputs=num_outputs, emb_dim=emb_dim, hidden=tuple(hidden) or (1,))
    act = _activation(activation)
    sizes = [int(emb_dim), *map(int, hidden), int(num_outputs)]

    def init(key):
        return {"layers": _dense_init(key, sizes)}

    def apply(theta, e):
        return _mlp(theta["layers"], e, act)

    return Hypernetwork(init, apply, int(num_outputs), int(emb_dim), "mlp")


def chunked_hypernetwork(
    num_outputs: int,
    emb_dim: int,
    chunk_dim: int,
    chunk_emb_dim: int,
    hidden: Sequence[int] = (25, 25),
    activation: str = "relu",
    chunk_emb_std: float = 1.0,
) -> Hypernetwork:
    """The chunked hypernetwork of von Oswald et al. 2020 (Sec. 2, "Model compression").

    The target's ``num_outputs`` weights are produced in ``n_chunks = ceil(num_outputs /
    chunk_dim)`` chunks by one small MLP ``[e_t ; c_i] (emb_dim + chunk_emb_dim,) ->
    hidden -> (chunk_dim,)``, with a learned chunk embedding ``c_i`` per chunk
    (part of theta: ``theta["chunk_emb"]``, (n_chunks, chunk_emb_dim), init
    N(0, chunk_emb_std^2)); all chunks are one batched matmul, concatenated and
    cut to ``num_outputs`` (the last chunk's surplus is dropped). Its size is about
    ``hidden[-1] * chunk_dim``, independent of the target: the compressive regime.

    Raises:
      ValueError: ``chunk_dim < 1`` (or any size < 1), an unknown activation.
    """
    if int(chunk_dim) < 1:
        raise ValueError(f"chunk_dim must be >= 1, got {chunk_dim}; pick the number of weights one chunk generates.")
    _check_sizes(num_outputs=num_outputs, emb_dim=emb_dim, chunk_emb_dim=chunk_emb_dim, hidden=tuple(hidden) or (1,))
    act = _activation(activation)
    n_chunks = math.ceil(int(num_outputs) / int(chunk_dim))
    sizes = [int(emb_dim) + int(chunk_emb_dim), *map(int, hidden), int(chunk_dim)]

    def init(key):
        k1, k2 = jax.random.split(key)
        return {
            "layers": _dense_init(k1, sizes),
            "chunk_emb": chunk_emb_std * jax.random.normal(k2, (n_chunks, int(chunk_emb_dim)), jnp.float32),
        }

    def apply(theta, e):
        lead = e.shape[:-1]  # () or (m,): several embeddings are one big matmul
        h = _with_chunk_embeddings(e, theta["chunk_emb"])
        out = _mlp(theta["layers"], h.reshape(-1, h.shape[-1]), act)
        return out.reshape(*lead, -1)[..., : int(num_outputs)]

    return Hypernetwork(init, apply, int(num_outputs), int(emb_dim), "chunked")


def recurrent_hypernetwork(
    num_outputs: int,
    emb_dim: int,
    chunk_dim: int,
    chunk_emb_dim: int = 8,
    hidden_size: int = 64,
    cell: str = "gru",
    chunk_emb_std: float = 1.0,
) -> Hypernetwork:
    """The dependency-preserving recurrent hypernetwork (Chandra et al. 2023, Sec. 3).

    A GRU or LSTM cell is scanned (``jax.lax.scan``) over the ``n_chunks =
    ceil(num_outputs / chunk_dim)`` chunks: step ``i`` reads ``[e_t ; c_i]`` and
    the state left by chunks ``0..i-1`` and emits chunk ``i = W_out h_i + b_out``
    (``chunk_dim`` weights; the last chunk is cut). So chunk ``k`` depends on the
    inputs of every chunk ``j <= k`` and on none after it. Chunk embeddings
    ``theta["chunk_emb"]`` (n_chunks, chunk_emb_dim) are learned, as in the
    chunked hypernetwork.

    Raises:
      ValueError: ``chunk_dim < 1`` (or any size < 1), ``cell`` not 'gru'/'lstm'.
    """
    if int(chunk_dim) < 1:
        raise ValueError(f"chunk_dim must be >= 1, got {chunk_dim}; pick the number of weights one chunk generates.")
    if cell not in ("gru", "lstm"):
        raise ValueError(f"unknown recurrent cell {cell!r}; choose 'gru' or 'lstm'.")
    _check_sizes(num_outputs=num_outputs, emb_dim=emb_dim, chunk_emb_dim=chunk_emb_dim, hidden_size=hidden_size)
    n_chunks = math.ceil(int(num_outputs) / int(chunk_dim))
    d_in, hs = int(emb_dim) + int(chunk_emb_dim), int(hidden_size)
    gates = 3 if cell == "gru" else 4

    def init(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        xavier = jax.nn.initializers.glorot_uniform()
        ortho = jax.nn.initializers.orthogonal()
        return {
            "w_in": xavier(k1, (d_in, gates * hs), jnp.float32),
            "w_h": jnp.concatenate([ortho(k, (hs, hs), jnp.float32) for k in jax.random.split(k2, gates)], axis=1),
            "b": jnp.zeros((gates * hs,), jnp.float32),
            "out": _dense_init(k3, [hs, int(chunk_dim)])[0],
            "chunk_emb": chunk_emb_std * jax.random.normal(k4, (n_chunks, int(chunk_emb_dim)), jnp.float32),
        }

    def apply(theta, e):
        lead = e.shape[:-1]  # () or (m,)
        xs = _with_chunk_embeddings(e, theta["chunk_emb"])
        xw = jnp.moveaxis(xs @ theta["w_in"] + theta["b"], -2, 0)  # (n_chunks, *lead, gates*hs), one matmul

        if cell == "gru":

            def step(h, xi):
                hw = h @ theta["w_h"]
                r = jax.nn.sigmoid(xi[..., :hs] + hw[..., :hs])
                z = jax.nn.sigmoid(xi[..., hs : 2 * hs] + hw[..., hs : 2 * hs])
                n = jnp.tanh(xi[..., 2 * hs :] + r * hw[..., 2 * hs :])
                h = (1.0 - z) * n + z * h
                return h, h

            carry = jnp.zeros((*lead, hs), jnp.float32)
        else:

            def step(carry, xi):
                h, cst = carry
                g = xi + h @ theta["w_h"]
                i, f, o = (jax.nn.sigmoid(g[..., k * hs : (k + 1) * hs]) for k in range(3))
                cst = f * cst + i * jnp.tanh(g[..., 3 * hs :])
                h = o * jnp.tanh(cst)
                return (h, cst), h

            carry = (jnp.zeros((*lead, hs), jnp.float32), jnp.zeros((*lead, hs), jnp.float32))

        _, hs_all = jax.lax.scan(step, carry, xw)  # (n_chunks, *lead, hidden_size)
        out = jnp.moveaxis(hs_all, 0, -2) @ theta["out"]["kernel"] + theta["out"]["bias"]
        return out.reshape(*lead, -1)[..., : int(num_outputs)]

    return Hypernetwork(init, apply, int(num_outputs), int(emb_dim), "recurrent")
