"""A small Vision Transformer (Flax NNX) and its weights: orbax checkpoints and safetensors files.

- :class:`ViT`: Dosovitskiy et al. (2021), "An Image is Worth 16x16 Words: Transformers
  for Image Recognition at Scale" (ICLR), Eqs. 1-4: non-overlapping patches, a linear
  patch embedding, a learned class token and position embedding, ``depth`` pre-LN
  blocks of multi-head self-attention and a GELU MLP, a final LayerNorm, and a linear
  head on the class token. Every matrix is an ``nnx.Linear`` applied once per forward,
  so ``clx.FunctionalModel``'s taps and the projection rules (GPM, ...) see each one.
- :func:`save_params` / :func:`load_params`: a params pytree to and from an orbax
  checkpoint directory (``orbax.checkpoint.StandardCheckpointer``).
- :func:`from_safetensors` with :func:`hf_vit_name_map`: weights as model hubs publish
  them (PyTorch names, (out, in) Linear weights), mapped onto a :class:`ViT` by the
  names of Hugging Face ``transformers``' ``ViTModel`` / ``ViTForImageClassification``;
  with :func:`clip_vision_name_map`, CLIP's vision tower (``CLIPVisionModel``,
  ``CLIPVisionModelWithProjection``, ``CLIPModel`` files) onto a ViT with the CLIP options.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clx.models._cnn import _apply_head, _as_images, _check_sizes, _head
from clx.models._mlp import _INITS
from clx.tree import by_path, path_str

# The position embedding and the class token start as N(0, 0.02^2): the original ViT's
# ``posemb_init`` (vit_jax ``AddPositionEmbs``; its class token starts at zero) and
# Hugging Face's ``initializer_range`` (a truncated normal there) for both.
_EMBED_INIT = nnx.initializers.normal(0.02)


class Attention(nnx.Module):
    """Multi-head softmax self-attention with separate ``query``, ``key``, ``value`` and ``out`` ``nnx.Linear``.

    x (batch, n, dim) -> (batch, n, dim): ``q, k, v = x W_q, x W_k, x W_v`` each split
    into ``heads`` slices of ``dim // heads`` features (head ``h`` owns features
    ``h * hd .. (h + 1) * hd - 1``, as ``transformers``' ``ViTSelfAttention``),
    ``softmax(q k^T / sqrt(hd)) v`` per head, heads concatenated, then ``out``.
    """

    def __init__(self, dim: int, heads: int, use_bias: bool, kernel_init, *, rngs: nnx.Rngs):
        self.heads = heads
        lin = lambda: nnx.Linear(dim, dim, use_bias=use_bias, kernel_init=kernel_init, rngs=rngs)  # noqa: E731
        self.query, self.key, self.value, self.out = lin(), lin(), lin(), lin()

    def __call__(self, x):
        b, n, d = x.shape
        hd = d // self.heads
        q = self.query(x).reshape(b, n, self.heads, hd)
        k = self.key(x).reshape(b, n, self.heads, hd)
        v = self.value(x).reshape(b, n, self.heads, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (hd**-0.5)
        weights = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d)
        return self.out(o)


def _quick_gelu(x):
    """``x * sigmoid(1.702 x)``: transformers' ``QuickGELUActivation`` (``ACT2FN["quick_gelu"]``), CLIP's MLP."""
    return x * jax.nn.sigmoid(1.702 * x)


#: The MLP activations a :class:`ViT` may use: exact (erf) GELU, or CLIP's quick GELU.
ACTIVATIONS: dict[str, Callable] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": _quick_gelu,
}


class Block(nnx.Module):
    """A pre-LN encoder block: ``x + attn(norm1(x))``, then ``x + fc2(act(fc1(norm2(x))))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        use_bias: bool,
        kernel_init,
        eps: float,
        *,
        rngs,
        activation: str = "gelu",
    ):
        self.activation = activation
        self.norm1 = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.attn = Attention(dim, heads, use_bias, kernel_init, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp_dim, use_bias=use_bias, kernel_init=kernel_init, rngs=rngs)
        self.fc2 = nnx.Linear(mlp_dim, dim, use_bias=use_bias, kernel_init=kernel_init, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        # "gelu": exact (erf) GELU, transformers' "gelu" (ACT2FN), so hub weights give their logits
        return x + self.fc2(ACTIVATIONS[self.activation](self.fc1(self.norm2(x))))


class ViT(nnx.Module):
    """A small Vision Transformer (Dosovitskiy et al. 2021, Eqs. 1-4), pre-LN, class-token head.

    Shapes (defaults on 28x28x1 MNIST, ``patch_size=7``: ``n = (28/7)^2 = 16`` patches of
    ``p*p*c = 49`` values, 17 tokens with the class token):

    - input x: (batch, H, W, C) (``stream.input_shape``) or flat (batch, H*W*C);
    - patches: (batch, n, p*p*c), patch ``(i, j)`` of the (H/p, W/p) grid at token
      ``1 + i * (W/p) + j`` (row-major), its values in (row, column, channel) order,
      i.e. ``x.reshape(b, H/p, p, W/p, p, C).transpose(0, 1, 3, 2, 4, 5)``;
    - ``patch_embed`` (Linear p*p*c -> dim), prepend ``cls_token``, add ``pos_embed``:
      (batch, n + 1, dim);
    - ``depth`` blocks, each ``x + attn(norm1(x))`` (multi-head softmax attention,
      ``attention_heads`` heads of ``dim // attention_heads``) then
      ``x + fc2(gelu(fc1(norm2(x))))`` (exact erf GELU);
    - ``norm`` (LayerNorm) of the class token, ``head``: (batch, num_outputs) logits.

    CLIP options (all off by default: a default ViT computes today's function with today's
    params): ``pre_norm=True`` adds a LayerNorm ``pre_norm`` on the (batch, n + 1, dim)
    tokens after the position embedding, before the blocks; ``activation="quick_gelu"``
    uses ``x * sigmoid(1.702 x)`` in every MLP; ``patch_bias=False`` drops the patch
    embedding's bias; ``projection_dim=k`` adds ``proj``, a bias-free Linear dim -> k on the
    normed class token, and the head then reads the (batch, k) projection. With
    ``pre_norm=True, activation="quick_gelu", patch_bias=False, projection_dim=512,
    layer_norm_eps=1e-5`` the ViT computes Hugging Face's ``CLIPVisionModelWithProjection``
    image embeddings (before the head): see :func:`clip_vision_name_map`.

    Params (``nnx.to_pure_dict`` paths): ``patch_embed/{kernel (p*p*c, dim), bias}``,
    ``cls_token`` (1, 1, dim), ``pos_embed`` (1, n + 1, dim),
    ``blocks/{i}/norm1/{scale, bias}``, ``blocks/{i}/attn/{query, key, value, out}/{kernel
    (dim, dim), bias}``, ``blocks/{i}/norm2/{scale, bias}``, ``blocks/{i}/fc1/{kernel (dim,
    mlp_dim), bias}``, ``blocks/{i}/fc2/{kernel (mlp_dim, dim), bias}``, ``norm/{scale,
    bias}``, and ``head/{kernel, bias}``: (dim, k) for the shared ``nnx.Linear`` head, or
    (num_heads, dim, k) and (num_heads, k) for a task-IL ``clx.models.MultiHead``. The CLIP
    options add ``pre_norm/{scale, bias}`` (dim,) and ``proj/kernel`` (dim, projection_dim)
    (the head's input width then ``projection_dim``), and ``patch_bias=False`` removes
    ``patch_embed/bias``; every other path is the same.

    Taps (``clx.FunctionalModel.apply_with_taps``): every ``nnx.Linear`` is applied once
    per forward; its input has leading axes flattened, so ``patch_embed/kernel`` gets
    (batch * n, p*p*c), each block's Linears (batch * (n + 1), d_in) (query, key and value
    the same rows), ``proj`` (batch, dim) and the shared head (batch, dim or projection_dim).
    ``clx.gpm`` projects all of them by default (its representations count ``n + 1`` columns
    per example, as a conv layer's positions); the 3-D ``cls_token``/``pos_embed`` and a
    ``MultiHead`` are never projected.

    Differences from the paper: no dropout (clx models are pure functions without RNG
    state); the head is one Linear on the class token (the paper pretrains with an MLP
    head, fine-tunes with a Linear one). Hugging Face's ``ViTModel`` computes the same
    function (checked against ``transformers/models/vit/modeling_vit.py``: pre-LN
    ``layernorm_before``/``layernorm_after``, separate query/key/value Linears with
    scaling ``head_size ** -0.5``, exact GELU, final ``layernorm``, classifier on token
    0), so :func:`from_safetensors` loads its weights; build the ViT with its
    ``layer_norm_eps`` (``ViTConfig``'s default 1e-12) for the same logits.

    Args:
      input_shape: (H, W, C); H and W multiples of ``patch_size``.
      num_outputs: logits per head.
      num_heads: 1 (a shared ``nnx.Linear`` head) or the number of tasks (task-IL: a
        ``clx.models.MultiHead`` chosen by ``task_id``, as ``clx.MLP``).
      patch_size: side p of the square, non-overlapping patches.
      dim: token width; depth: number of blocks; attention_heads: heads per
        attention (dividing ``dim``); mlp_dim: hidden width of each block's MLP.
      use_bias: biases on every Linear (the ViT has them).
      init: the Linears' kernel init: 'xavier' (Glorot uniform, the original ViT's
        ``MlpBlock`` init in vit_jax; default), 'torch' or 'lecun'. Biases start at zero, LayerNorms at
        scale 1 / bias 0, ``cls_token`` and ``pos_embed`` at N(0, 0.02^2).
      layer_norm_eps: epsilon of every LayerNorm (1e-6, the original ViT's; 1e-12 for
        Hugging Face ViT weights; 1e-5 for CLIP's, ``CLIPVisionConfig``'s default).
      pre_norm: a LayerNorm on the tokens before the blocks (CLIP's ``pre_layrnorm``).
      activation: the MLP activation, ``"gelu"`` (exact erf GELU) or ``"quick_gelu"``
        (``x * sigmoid(1.702 x)``, CLIP's ``hidden_act``).
      patch_bias: a bias on the patch embedding; None (default) follows ``use_bias``
        (CLIP's patch conv has none: pass False).
      projection_dim: None (default) or the width of a bias-free Linear ``proj`` between
        the normed class token and the head (CLIP's ``visual_projection``, 512 for
        ViT-B/32).

    Raises:
      ValueError: an unknown init or activation, non-positive sizes or projection_dim, H or W not a multiple of
        ``patch_size``, ``dim`` not a multiple of ``attention_heads``; at call,
        inputs that are neither (batch, *input_shape) nor flat.
    """

    def __init__(
        self,
        input_shape: Sequence[int] = (28, 28, 1),
        num_outputs: int = 10,
        num_heads: int = 1,
        *,
        patch_size: int = 7,
        dim: int = 64,
        depth: int = 4,
        attention_heads: int = 4,
        mlp_dim: int = 128,
        use_bias: bool = True,
        init: str = "xavier",
        layer_norm_eps: float = 1e-6,
        pre_norm: bool = False,
        activation: str = "gelu",
        patch_bias: bool | None = None,
        projection_dim: int | None = None,
        rngs: nnx.Rngs,
    ):
        if init not in _INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {sorted(_INITS)}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"ViT: unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}.")
        if projection_dim is not None and int(projection_dim) < 1:
            raise ValueError(
                f"ViT: projection_dim must be a positive int or None (no projection), got {projection_dim!r}."
            )
        h, w, c = (int(s) for s in input_shape)
        p, dim, depth, attention_heads, mlp_dim = map(int, (patch_size, dim, depth, attention_heads, mlp_dim))
        _check_sizes(
            "ViT",
            input_shape=(h, w, c),
            num_outputs=int(num_outputs),
            num_heads=int(num_heads),
            patch_size=p,
            dim=dim,
            depth=depth,
            attention_heads=attention_heads,
            mlp_dim=mlp_dim,
        )
        if h % p or w % p:
            raise ValueError(
                f"ViT: input_shape {(h, w, c)} is not a whole number of {p}x{p} patches; "
                f"pick a patch_size that divides {h} and {w}."
            )
        if dim % attention_heads:
            raise ValueError(f"ViT: dim={dim} must be a multiple of attention_heads={attention_heads}.")
        if not float(layer_norm_eps) > 0:
            raise ValueError(f"ViT: layer_norm_eps must be > 0, got {layer_norm_eps!r}.")
        kinit = _INITS[init]
        self.input_shape = (h, w, c)
        self.patch_size = p
        self.num_patches = (h // p) * (w // p)
        patch_bias = use_bias if patch_bias is None else bool(patch_bias)
        self.patch_embed = nnx.Linear(p * p * c, dim, use_bias=patch_bias, kernel_init=kinit, rngs=rngs)
        self.cls_token = nnx.Param(_EMBED_INIT(rngs.params(), (1, 1, dim), jnp.float32))
        self.pos_embed = nnx.Param(_EMBED_INIT(rngs.params(), (1, self.num_patches + 1, dim), jnp.float32))
        eps = float(layer_norm_eps)
        # only when asked, so a default ViT's params (and its saved checkpoints) keep their paths
        self.pre_norm = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs) if pre_norm else None
        self.blocks = nnx.List(
            [
                Block(dim, attention_heads, mlp_dim, use_bias, kinit, eps, rngs=rngs, activation=activation)
                for _ in range(depth)
            ]
        )
        self.norm = nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)
        width = dim if projection_dim is None else int(projection_dim)
        proj = nnx.Linear(dim, width, use_bias=False, kernel_init=kinit, rngs=rngs) if projection_dim else None
        self.proj = proj
        self.head = _head(width, int(num_outputs), int(num_heads), use_bias, kinit, rngs)

    def patches(self, x):
        """(batch, H, W, C) or flat images -> (batch, n, p*p*c) patches (order in the class docs)."""
        x = _as_images(x, self.input_shape)
        h, w, c = self.input_shape
        p = self.patch_size
        x = x.reshape(x.shape[0], h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(x.shape[0], self.num_patches, p * p * c)

    def __call__(self, x, task_id=None):
        tokens = self.patch_embed(self.patches(x))  # (b, n, dim)
        b, _, dim = tokens.shape
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, dim))
        x = jnp.concatenate([cls, tokens], axis=1) + self.pos_embed[...]
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x)
        features = self.norm(x[:, 0])
        if self.proj is not None:
            features = self.proj(features)
        return _apply_head(self.head, features, task_id)


# --------------------------------------------------------------------------- #
# orbax checkpoints of a params pytree
# --------------------------------------------------------------------------- #


def _pure_params(model_or_params) -> dict:
    if isinstance(model_or_params, nnx.Module):
        return nnx.to_pure_dict(nnx.state(model_or_params, nnx.Param))
    return model_or_params


def save_params(directory: str | os.PathLike, params, *, overwrite: bool = False) -> str:
    """Saves a params pytree (or an ``nnx.Module``'s ``nnx.Param`` state) to an orbax checkpoint.

    Writes ``directory`` with ``orbax.checkpoint.StandardCheckpointer`` (arrays
    copied to the host first; the write is atomic: a half-written save is never
    visible) and waits for it to finish.

    Args:
      directory: the checkpoint directory to create (made absolute).
      params: a pytree of arrays (e.g. ``FunctionalModel.from_module``'s params) or an NNX module.
      overwrite: replace an existing ``directory``.

    Returns:
      The absolute path written.

    Raises:
      ValueError: ``directory`` exists and ``overwrite`` is False; a leaf that is not an array.
    """
    import orbax.checkpoint as ocp  # here: `import clx` stays fast

    path = os.path.abspath(os.fspath(directory))
    if os.path.exists(path) and not overwrite:
        raise ValueError(f"save_params: {path!r} exists; pass overwrite=True or choose a new directory.")
    tree = _pure_params(params)
    bad = [k for k, v in by_path(tree).items() if not hasattr(v, "shape")]
    if bad:
        raise ValueError(f"save_params: leaves {bad[:5]} are not arrays; pass a params pytree of arrays.")
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, host, force=overwrite)
        ckptr.wait_until_finished()
    return path


def load_params(directory: str | os.PathLike, like) -> dict:
    """Reads a params pytree saved by :func:`save_params` into the structure of ``like``.

    Args:
      directory: the checkpoint directory.
      like: the model the params are for (an NNX module, e.g. a freshly built
        :class:`ViT`) or a params pytree of the same structure (arrays or
        ``jax.ShapeDtypeStruct``).

    Returns:
      The params, nested dicts of ``jax.Array`` shaped like ``like`` (use them with
      ``clx.FunctionalModel.from_module(model)[0].apply``).

    Raises:
      FileNotFoundError: ``directory`` does not exist.
      ValueError: the checkpoint's names or shapes differ from ``like``'s (lists the
        missing, unexpected and mismatched params).
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_params: no checkpoint directory {path!r}; save one with save_params first.")
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _pure_params(like))
    with ocp.StandardCheckpointer() as ckptr:
        saved = by_path(ckptr.metadata(path).item_metadata.tree)
        want = by_path(target)
        problems = _mismatches(
            missing=sorted(set(want) - set(saved)),
            unused=sorted(set(saved) - set(want)),
            shapes=[
                f"{k}: checkpoint {tuple(saved[k].shape)}, model {tuple(want[k].shape)}"
                for k in sorted(set(want) & set(saved))
                if tuple(saved[k].shape) != tuple(want[k].shape)
            ],
            missing_what="params of the model not in the checkpoint",
            unused_what="params in the checkpoint the model does not have",
        )
        if problems:
            raise ValueError(f"load_params: {path!r} does not fit the model: {problems}.")
        return ckptr.restore(path, target)


def _mismatches(missing, unused, shapes, missing_what, unused_what) -> str:
    parts = []
    if missing:
        parts.append(f"{len(missing)} {missing_what}: {missing}")
    if unused:
        parts.append(f"{len(unused)} {unused_what}: {unused}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: {shapes}")
    return "; ".join(parts)


# --------------------------------------------------------------------------- #
# safetensors files with PyTorch names
# --------------------------------------------------------------------------- #


def _linear_weight(w: np.ndarray) -> np.ndarray:
    """PyTorch ``nn.Linear.weight`` (out, in) -> Flax kernel (in, out)."""
    return np.ascontiguousarray(w.T) if w.ndim == 2 else w


def _patch_conv_weight(w: np.ndarray) -> np.ndarray:
    """PyTorch ``Conv2d.weight`` (dim, c, p, p) -> the patch Linear's (p*p*c, dim) kernel,
    rows in the ViT's (row, column, channel) patch order."""
    if w.ndim != 4:
        return w
    dim, c, ph, pw = w.shape
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(ph * pw * c, dim))


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _token_rows(w: np.ndarray) -> np.ndarray:
    """CLIP's ``class_embedding`` (dim,) -> (1, 1, dim); ``position_embedding.weight`` (n, dim) -> (1, n, dim)."""
    return w.reshape((1,) * (3 - w.ndim) + w.shape) if w.ndim < 3 else w


#: Conversions a name map may name: the PyTorch tensor -> the Flax param.
CONVERSIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": _linear_weight,  # (out, in) weight -> (in, out) kernel
    "patch_conv": _patch_conv_weight,  # Conv2d (dim, c, p, p) -> (p*p*c, dim)
    "same": _same,  # biases, LayerNorm weight -> scale / bias -> bias, cls token, position embedding
    "token_rows": _token_rows,  # CLIP's (dim,) class embedding / (n, dim) position table -> (1, 1 or n, dim)
}


def hf_vit_name_map(model: ViT, prefix: str = "", classifier: str | None = "classifier") -> dict[str, tuple[str, str]]:
    """Hugging Face ``transformers`` ViT names -> :class:`ViT` param paths and conversions.

    The names are those of ``ViTModel`` (``transformers/models/vit/modeling_vit.py``,
    checked in the stored huggingface/transformers source): per block ``i``

    ============================================================  ==============================  ==========
    PyTorch name (``{prefix}`` first)                              clx param                       conversion
    ============================================================  ==============================  ==========
    ``embeddings.patch_embeddings.projection.weight`` / ``.bias``  ``patch_embed/kernel`` / bias   patch_conv
    ``embeddings.cls_token``                                       ``cls_token``                   same
    ``embeddings.position_embeddings``                             ``pos_embed``                   same
    ``encoder.layer.{i}.layernorm_before.weight`` / ``.bias``      ``blocks/{i}/norm1/scale`` ...  same
    ``encoder.layer.{i}.attention.attention.query.weight``         ``blocks/{i}/attn/query/kernel``  linear
    (``.key``, ``.value`` likewise; ``.bias`` -> ``/bias``)
    ``encoder.layer.{i}.attention.output.dense.weight``            ``blocks/{i}/attn/out/kernel``  linear
    ``encoder.layer.{i}.layernorm_after.weight`` / ``.bias``       ``blocks/{i}/norm2/scale`` ...  same
    ``encoder.layer.{i}.intermediate.dense.weight``                ``blocks/{i}/fc1/kernel``       linear
    ``encoder.layer.{i}.output.dense.weight``                      ``blocks/{i}/fc2/kernel``       linear
    ``layernorm.weight`` / ``.bias``                               ``norm/scale`` / ``norm/bias``  same
    ``classifier.weight`` / ``.bias`` (no prefix)                  ``head/kernel`` / ``head/bias``  linear
    ============================================================  ==============================  ==========

    The Conv2d patch projection (dim, c, p, p) becomes the Linear over flattened
    patches by ``weight.transpose(2, 3, 1, 0).reshape(p*p*c, dim)``: rows in the ViT's
    (row, column, channel) order within a patch; HF flattens the conv's output grid
    row-major, the ViT's token order. Inputs must be laid out as the PyTorch model's
    (NCHW there, NHWC here, the same normalisation).

    Args:
      model: the :class:`ViT` to load into (its depth and biases decide the entries).
      prefix: put before every backbone name: ``""`` for a ``ViTModel`` file,
        ``"vit."`` for ``ViTForImageClassification``.
      classifier: the name of the classifier Linear (``ViTForImageClassification``'s
        ``"classifier"``); None, or a model with a ``MultiHead``, maps no head (keep the
        model's own head with ``from_safetensors(..., keep=("head",))``).

    Returns:
      ``{pytorch name: (clx param path, conversion)}``, conversions from :data:`CONVERSIONS`.
    """
    linear, norm = _map_helpers(model, prefix)
    m = {
        **linear("embeddings.patch_embeddings.projection", "patch_embed", "patch_conv"),
        f"{prefix}embeddings.cls_token": ("cls_token", "same"),
        f"{prefix}embeddings.position_embeddings": ("pos_embed", "same"),
    }
    for i in range(len(model.blocks)):
        t, b = f"encoder.layer.{i}", f"blocks/{i}"
        m.update(norm(f"{t}.layernorm_before", f"{b}/norm1"))
        for name in ("query", "key", "value"):
            m.update(linear(f"{t}.attention.attention.{name}", f"{b}/attn/{name}"))
        m.update(linear(f"{t}.attention.output.dense", f"{b}/attn/out"))
        m.update(norm(f"{t}.layernorm_after", f"{b}/norm2"))
        m.update(linear(f"{t}.intermediate.dense", f"{b}/fc1"))
        m.update(linear(f"{t}.output.dense", f"{b}/fc2"))
    m.update(norm("layernorm", "norm"))
    if classifier is not None and isinstance(model.head, nnx.Linear):
        m[f"{classifier}.weight"] = ("head/kernel", "linear")
        if model.head.bias is not None:
            m[f"{classifier}.bias"] = ("head/bias", "same")
    return m


def _map_helpers(model: nnx.Module, prefix: str):
    """``linear`` and ``norm`` map-entry builders (PyTorch name, clx path); a bias only where the model has one."""
    have = set(by_path(nnx.to_pure_dict(nnx.state(model, nnx.Param))))

    def linear(torch_name: str, path: str, conv: str = "linear") -> dict:
        out = {f"{prefix}{torch_name}.weight": (f"{path}/kernel", conv)}
        if f"{path}/bias" in have:
            out[f"{prefix}{torch_name}.bias"] = (f"{path}/bias", "same")
        return out

    def norm(torch_name: str, path: str) -> dict:
        return {
            f"{prefix}{torch_name}.weight": (f"{path}/scale", "same"),
            f"{prefix}{torch_name}.bias": (f"{path}/bias", "same"),
        }

    return linear, norm


#: The tensors of a Hugging Face ``CLIPModel`` file (``openai/clip-vit-base-patch32``'s
#: ``model.safetensors``) outside the vision tower: ``from_safetensors(..., ignore=CLIP_NON_VISION)``.
#: ``position_ids`` is a buffer (``persistent=False`` in today's transformers; older files carry it).
CLIP_NON_VISION = ("text_model.", "text_projection.", "logit_scale", "vision_model.embeddings.position_ids")


def clip_vision_name_map(
    model: ViT, prefix: str = "vision_model.", projection: str | None = "visual_projection"
) -> dict[str, tuple[str, str]]:
    """Hugging Face ``transformers`` CLIP vision-tower names -> :class:`ViT` param paths and conversions.

    For ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` files (e.g.
    ``openai/clip-vit-base-patch32``, FusionBench's merging backbone) into a ViT built with
    ``pre_norm=True, activation="quick_gelu", patch_bias=False, layer_norm_eps=1e-5`` (and
    ``projection_dim=512`` to load the projection). Checked against
    ``transformers/models/clip/modeling_clip.py`` (stored huggingface/transformers source):
    ``CLIPVisionEmbeddings`` (a bias-free Conv2d ``patch_embedding`` of stride p, a (dim,)
    ``class_embedding`` prepended, ``position_embedding`` an ``nn.Embedding(n + 1, dim)``
    added), ``CLIPVisionTransformer.forward`` (``pre_layrnorm`` on all tokens, the encoder,
    ``post_layernorm`` on token 0 only), ``CLIPEncoderLayer`` (pre-LN: ``layer_norm1``,
    ``self_attn``, residual, ``layer_norm2``, ``mlp``, residual), ``CLIPAttention``
    (``q_proj``/``k_proj``/``v_proj``/``out_proj`` with biases, heads split as
    ``view(b, n, -1, head_dim)``, scale ``head_dim ** -0.5``), ``CLIPMLP`` (``fc1``,
    ``ACT2FN[hidden_act]``, ``fc2``; ``QuickGELUActivation`` is ``x * sigmoid(1.702 x)`` in
    ``activations.py``), ``visual_projection = nn.Linear(hidden, projection_dim,
    bias=False)``; ``configuration_clip.py``: ``CLIPVisionConfig`` defaults ``hidden_act=
    "quick_gelu"``, ``layer_norm_eps=1e-5`` (every LayerNorm), 768 wide, 12 layers, 12
    heads, 3072 MLP, patch 32, image 224, projection 512. Per layer ``i``:

    ==================================================  ==============================  ==========
    PyTorch name (``{prefix}`` first)                    clx param                       conversion
    ==================================================  ==============================  ==========
    ``embeddings.patch_embedding.weight`` (no bias)      ``patch_embed/kernel``          patch_conv
    ``embeddings.class_embedding`` (dim,)                ``cls_token`` (1, 1, dim)       token_rows
    ``embeddings.position_embedding.weight`` (n+1, dim)  ``pos_embed`` (1, n+1, dim)     token_rows
    ``pre_layrnorm.weight`` / ``.bias`` (sic)            ``pre_norm/scale`` / ``bias``   same
    ``encoder.layers.{i}.layer_norm1.weight`` / ``bias``  ``blocks/{i}/norm1/...``        same
    ``encoder.layers.{i}.self_attn.q_proj.weight``       ``blocks/{i}/attn/query/kernel``  linear
    (``k_proj`` -> key, ``v_proj`` -> value, ``out_proj`` -> out; ``.bias`` -> ``/bias``)
    ``encoder.layers.{i}.layer_norm2.weight`` / ``bias``  ``blocks/{i}/norm2/...``        same
    ``encoder.layers.{i}.mlp.fc1.weight`` / ``.bias``    ``blocks/{i}/fc1/...``          linear
    ``encoder.layers.{i}.mlp.fc2.weight`` / ``.bias``    ``blocks/{i}/fc2/...``          linear
    ``post_layernorm.weight`` / ``.bias``                ``norm/scale`` / ``norm/bias``  same
    ``{projection}.weight`` (no prefix; proj_dim, dim)   ``proj/kernel`` (dim, proj_dim)  linear
    ==================================================  ==============================  ==========

    No head is mapped: CLIP classifies zero-shot with its text tower (not supported
    here); load with ``keep=("head",)`` and train the ViT's own head (or a
    ``MultiHead``). Inputs: (batch, 224, 224, 3) NHWC images normalised as CLIP's image
    processor does (resize, centre crop, CLIP's mean/std), the same pixels as the
    PyTorch model's NCHW ``pixel_values``.

    Args:
      model: the :class:`ViT` to load into (its depth and biases decide the entries).
      prefix: put before every vision-tower name: ``"vision_model."`` for
        ``CLIPVisionModel*`` and ``CLIPModel`` files.
      projection: the name of the projection Linear (``"visual_projection"``), or None
        for a ``CLIPVisionModel`` file and a ViT without ``projection_dim``.

    Returns:
      ``{pytorch name: (clx param path, conversion)}``, conversions from :data:`CONVERSIONS`.
    """
    linear, norm = _map_helpers(model, prefix)
    m = {
        **linear("embeddings.patch_embedding", "patch_embed", "patch_conv"),
        f"{prefix}embeddings.class_embedding": ("cls_token", "token_rows"),
        f"{prefix}embeddings.position_embedding.weight": ("pos_embed", "token_rows"),
        **norm("pre_layrnorm", "pre_norm"),
    }
    for i in range(len(model.blocks)):
        t, b = f"encoder.layers.{i}", f"blocks/{i}"
        m.update(norm(f"{t}.layer_norm1", f"{b}/norm1"))
        for name, path in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("out_proj", "out")):
            m.update(linear(f"{t}.self_attn.{name}", f"{b}/attn/{path}"))
        m.update(norm(f"{t}.layer_norm2", f"{b}/norm2"))
        m.update(linear(f"{t}.mlp.fc1", f"{b}/fc1"))
        m.update(linear(f"{t}.mlp.fc2", f"{b}/fc2"))
    m.update(norm("post_layernorm", "norm"))
    if projection is not None:
        m[f"{projection}.weight"] = ("proj/kernel", "linear")
    return m


def from_safetensors(
    path: str | os.PathLike,
    model: nnx.Module,
    name_map: Mapping[str, tuple[str, str | Callable]] | None = None,
    *,
    ignore: Sequence[str] = (),
    keep: Sequence[str] = (),
) -> dict:
    """The params of ``model`` read from a safetensors file with PyTorch names.

    Every tensor of the file is converted by its ``name_map`` entry (transposing
    (out, in) Linear weights to (in, out) kernels, the patch Conv2d to the patch
    Linear, LayerNorm ``weight`` to ``scale``: :func:`hf_vit_name_map`) and cast to
    the model's dtype. Nothing is guessed: every param of the model must be filled
    (or listed in ``keep``), every tensor of the file used (or listed in ``ignore``),
    every shape equal; otherwise nothing is returned.

    Args:
      path: a ``.safetensors`` file.
      model: the NNX module to load into (its params give names, shapes, dtypes);
        it is not modified.
      name_map: ``{pytorch name: (param path, conversion)}``, a conversion a name
        in :data:`CONVERSIONS` or a function of the numpy array; None:
        ``hf_vit_name_map(model)`` (a :class:`ViT` only).
      ignore: prefixes of file names to skip (``("pooler.",)`` for ``ViTModel``'s pooler).
      keep: prefixes of param paths that keep the model's values (``("head",)``: a new
        head for a backbone-only file).

    Returns:
      The params as nested dicts of ``jax.Array``, shaped like
      ``clx.FunctionalModel.from_module(model)[1]``.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: params of the model the file does not fill, tensors of the file the
        map does not use, map entries naming params the model does not have, shape
        mismatches after conversion, an unknown conversion (all listed in one message);
        ``name_map=None`` for a model that is not a :class:`ViT`.
    """
    from safetensors.numpy import load_file  # here: safetensors is needed only to read such files

    p = os.fspath(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"from_safetensors: no file {p!r}.")
    if name_map is None:
        if not isinstance(model, ViT):
            raise ValueError(
                f"from_safetensors: pass a name_map for a {type(model).__name__}; the default map is for clx ViT."
            )
        name_map = hf_vit_name_map(model)
    bad_conv = sorted({str(c) for _, c in name_map.values() if not callable(c) and c not in CONVERSIONS})
    if bad_conv:
        raise ValueError(f"from_safetensors: unknown conversions {bad_conv}; use {sorted(CONVERSIONS)} or a function.")
    tensors = load_file(p)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    want = by_path(params)
    kept = {k for k in want if any(k == q or k.startswith(q.rstrip("/") + "/") for q in keep)}
    loaded: dict[str, np.ndarray] = {}
    shapes, unknown_targets = [], []
    for name, arr in tensors.items():
        if name not in name_map or any(name.startswith(q) for q in ignore):
            continue
        target, conv = name_map[name]
        if target not in want:
            unknown_targets.append(f"{name} -> {target}")
            continue
        value = (conv if callable(conv) else CONVERSIONS[conv])(np.asarray(arr))
        if tuple(value.shape) != tuple(want[target].shape):
            shapes.append(
                f"{name} -> {target}: file {tuple(arr.shape)} -> {tuple(value.shape)}, model {want[target].shape}"
            )
            continue
        loaded[target] = value.astype(want[target].dtype)
    unused = sorted(n for n in tensors if n not in name_map and not any(n.startswith(q) for q in ignore))
    missing = sorted(k for k in want if k not in loaded and k not in kept)
    problems = _mismatches(
        missing=missing,
        unused=unused,
        shapes=shapes,
        missing_what="params of the model not in the file (pass keep=... to keep the model's own)",
        unused_what="tensors of the file not in the name map (pass ignore=... to skip them)",
    )
    if unknown_targets:
        problems += ("; " if problems else "") + f"map entries for params the model lacks: {unknown_targets}"
    if problems:
        raise ValueError(f"from_safetensors: {p!r} does not fit {type(model).__name__}: {problems}.")
    flat_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [jnp.asarray(loaded[path_str(k)]) if path_str(k) in loaded else v for k, v in flat_leaves]
    return jax.tree_util.tree_unflatten(treedef, leaves)
