"""O-LoRA: one LoRA per task on a frozen model, each new one kept orthogonal to the earlier ones.

Wang, Chen, Ge, Xia, Bao, Zheng, Zhang, Gui, Huang (2023), "Orthogonal Subspace Learning
for Language Model Continual Learning", Findings of EMNLP (official code:
github.com/cmnfriend/O-LoRA).

Every chosen Dense kernel W (Flax layout (d_in, d_out)) gets one low-rank adapter per task,
``A_t`` (r, d_in) and ``B_t`` (d_out, r) (PyTorch's ``lora_A.weight`` and ``lora_B.weight``),
and the model runs with

    W_eff = W + (alpha / r) sum_t (B_t A_t)^T                        (all tasks' LoRAs, merged)

(a task's ``B`` starts at 0, so tasks not yet trained add nothing: no task id is needed at
test time). Training task t updates only ``A_t`` and ``B_t``; the base weights and the
earlier tasks' LoRAs stay frozen. The loss adds, over the adapted layers,

    lambda_1 sum_{s<t} L_orth(A_s, A_t) + lambda_2 (||A_t||_F + ||B_t||_F),

with ``L_orth(A_s, A_t) = sum_{j,k} |O[j, k]|^p`` for ``O = A_s A_t^T`` (r, r): ``p = 2``
(``orthogonality="squared"``, the form issue 13 quotes for the paper) or ``p = 1``
(``"abs"``, the code's ``torch.abs(torch.mm(param, param_.T)).sum()``). The rule adds the
penalty's gradient itself (closed form, below) rather than through a loss term, so the
logged task loss is the task's own.

Facts checked in the official code (``src/uie_trainer_lora.py`` ``training_step``,
``src/peft/tuners/lora.py``, ``src/run_uie_lora.py``, ``scripts/order_1.sh``):

- the orthogonality term is the absolute sum above, between the concatenated earlier LoRAs'
  A (``lora_A``, r_sum rows) and the new one (``loranew_A``), summed over adapted layers; the
  L2 term is ``torch.norm(param, p=2)`` (the Frobenius norm, not squared) of ``loranew_A`` and
  ``loranew_B``; ``lamda_1`` 0.5 and ``lamda_2`` 0 (defaults, and most scripts; the
  long-sequence scripts use lamda_1 in {0.5, 5} and lamda_2 in {0, 0.1, 0.3});
- r = 8 (``lora_dim``), ``lora_alpha`` 32 (scale alpha / r = 4), dropout 0.1 on the LoRA
  input; ``loranew_A`` is drawn by ``kaiming_uniform_(a=sqrt(5))`` (U(-1/sqrt(d_in),
  1/sqrt(d_in))) and ``loranew_B`` is 0; the target modules are peft's T5 defaults ``q`` and ``v``
  (a clx ViT: ``attn/query`` and ``attn/value``);
- every ``lora_`` parameter of earlier tasks is frozen (``requires_grad = False``), and each
  task is a separate run (a new AdamW, lr 1e-3 constant, weight decay 0).

Where clx differs: the T LoRAs are allocated up front (static shapes: ``num_tasks`` is fixed
when the model is built) and summed, where the code concatenates them task by task: the same
function. No dropout on the LoRA input (clx's apply has no randomness). The default
``orthogonality`` is the squared form; ``"abs"`` gives the code's. The stored pages gave only
the paper's abstract, so its equation was not rechecked.

Gradients of the penalty with respect to ``A_t`` (what ``update`` adds; tested against
``jax.grad``): with ``O_s = A_s A_t^T`` and ``m_s = [s < t]``,
``"squared"``: ``2 sum_s m_s O_s^T A_s``; ``"abs"``: ``sum_s m_s sign(O_s)^T A_s``;
the L2 term's: ``A_t / ||A_t||_F`` (0 at 0, as torch's norm backward).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from clx.core import ContinualTransformation, Evidence
from clx.projection._common import kernel_paths
from clx.tree import check_nonnegative, concrete_int, path_str

ORTHOGONALITIES = ("squared", "abs")


def lora_key(path: str) -> str:
    """The key of a kernel path in ``params["lora"]`` ('layers/0/kernel' -> 'layers.0.kernel')."""
    return path.replace("/", ".")


class LoRAModel:
    """A frozen base model with one LoRA per task on chosen Dense kernels, as a clx model.

    Params: ``{"net": the base's params, "lora": {key: {"A": (T, r, d_in), "B": (T, d_out, r)}}}``
    (float32; ``key`` = the kernel path with '/' -> '.', :func:`lora_key`). ``apply`` runs the base
    with every adapted kernel replaced by ``W + scale sum_t A_t^T B_t^T``, ``scale = alpha / r``.

    Args:
      base: a clx model (``apply(params, x, task_id)``), e.g. a ``clx.FunctionalModel``.
      base_params: its params (nested dicts).
      num_tasks: T, the number of LoRAs (>= 1).
      rank: r (>= 1, at most min(d_in, d_out) of every adapted kernel).
      layers: the 2-D kernel paths to adapt (e.g. ``['blocks/0/attn/query/kernel', ...]``);
        default every 2-D ``kernel`` (Conv kernels are not adapted).
      alpha: LoRA's alpha (the scale is alpha / r); the code: 32 with r = 8.

    Raises:
      ValueError: T or r < 1, an unknown path or a non-2-D kernel in ``layers``, a rank above
        ``min(d_in, d_out)`` of a layer, ``alpha`` <= 0.
    """

    def __init__(
        self,
        base,
        base_params,
        num_tasks: int,
        rank: int = 8,
        layers: Sequence[str] | None = None,
        *,
        alpha: float = 32.0,
    ):
        for what, v in (("num_tasks", num_tasks), ("rank", rank)):
            if isinstance(v, bool) or int(v) != v or int(v) < 1:
                raise ValueError(f"LoRAModel: {what} must be an integer >= 1, got {v!r}.")
        if not float(alpha) > 0:
            raise ValueError(f"LoRAModel: alpha must be > 0, got {alpha} (the code uses 32).")
        self.base = base
        self.num_tasks, self.rank, self.alpha = int(num_tasks), int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        kernels = kernel_paths(base_params, layers, who="LoRAModel")
        flat = dict((path_str(p), leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(base_params)[0])
        self.shapes: dict[str, tuple[int, int]] = {}
        for path, _ in kernels:
            shape = tuple(flat[path].shape)
            if len(shape) != 2:
                raise ValueError(
                    f"LoRAModel: {path!r} has shape {shape}; LoRA adapts 2-D Dense kernels only; leave it out."
                )
            if self.rank > min(shape):
                raise ValueError(
                    f"LoRAModel: rank {self.rank} exceeds min(d_in, d_out) = {min(shape)} of {path!r} {shape}; "
                    "lower the rank or leave the layer out."
                )
            self.shapes[path] = shape
        self.paths = tuple(self.shapes)

    def init(self, base_params, key: jax.Array) -> dict:
        """The params: the base's, and per adapted layer ``A`` ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (the code's
        ``kaiming_uniform_(a=sqrt(5))``) and ``B = 0``, for all T tasks."""
        keys = jax.random.split(key, len(self.paths))
        lora = {}
        for k, path in zip(keys, self.paths):
            d_in, d_out = self.shapes[path]
            bound = 1.0 / np.sqrt(d_in)
            a = jax.random.uniform(k, (self.num_tasks, self.rank, d_in), jnp.float32, -bound, bound)
            lora[lora_key(path)] = {"A": a, "B": jnp.zeros((self.num_tasks, d_out, self.rank), jnp.float32)}
        return {"net": base_params, "lora": lora}

    def delta(self, lora_layer: dict) -> jax.Array:
        """``scale sum_t A_t^T B_t^T`` (d_in, d_out) for one layer's ``{"A", "B"}``."""
        return self.scale * jnp.einsum("tri,tor->io", lora_layer["A"], lora_layer["B"], precision="highest")

    def merged(self, params) -> Any:
        """The base params with every adapted kernel replaced by ``W + delta``."""
        deltas = {p: self.delta(params["lora"][lora_key(p)]) for p in self.paths}

        def leaf(path, w):
            d = deltas.get(path_str(path))
            return w if d is None else w + d.astype(w.dtype)

        return jax.tree_util.tree_map_with_path(leaf, params["net"])

    def apply(self, params, x: jax.Array, task_id=None) -> jax.Array:
        """The base's logits with every task's LoRA merged (``task_id`` goes to the base, e.g. a MultiHead)."""
        return self.base.apply(self.merged(params), x, task_id)

    def extra_results(self, params) -> dict:
        """``olora_lora_params`` (adapter parameters per task) and ``olora_layers``."""
        per_task = sum(self.rank * (d_in + d_out) for d_in, d_out in self.shapes.values())
        return {"olora_lora_params_per_task": int(per_task), "olora_layers": list(self.paths)}


def orthogonality_penalty(lora: dict, task_id, orthogonality: str = "squared") -> jax.Array:
    """``sum_layers sum_{s<t} sum_{j,k} |(A_s A_t^T)[j, k]|^p`` (p = 2 for "squared", 1 for "abs"), a float32
    scalar, for ``lora`` = ``params["lora"]`` and the current task ``t`` (int or traced int32 scalar)."""
    t = jnp.asarray(task_id, jnp.int32).reshape(-1)[0]
    total = jnp.zeros((), jnp.float32)
    for layer in lora.values():
        a = layer["A"].astype(jnp.float32)
        o = jnp.einsum("sri,ki->srk", a, a[t], precision="highest")  # (T, r, r): A_s A_t^T
        earlier = (jnp.arange(a.shape[0]) < t).astype(jnp.float32)[:, None, None]
        f = o**2 if orthogonality == "squared" else jnp.abs(o)
        total = total + jnp.sum(earlier * f)
    return total


def _penalty_grad(a: jax.Array, t, orthogonality: str) -> jax.Array:
    """The penalty's gradient with respect to ``A_t`` (r, d_in) for one layer's ``A`` (T, r, d_in)."""
    o = jnp.einsum("sri,ki->srk", a, a[t], precision="highest")
    earlier = (jnp.arange(a.shape[0]) < t).astype(a.dtype)[:, None, None]
    w = 2.0 * o if orthogonality == "squared" else jnp.sign(o)
    return jnp.einsum("srk,sri->ki", earlier * w, a, precision="highest")


def _norm_grad(x: jax.Array) -> jax.Array:
    n = jnp.sqrt(jnp.sum(x * x))
    return jnp.where(n > 0, x / jnp.where(n > 0, n, 1.0), 0.0)


class OLoRAState(NamedTuple):
    """State of :func:`olora`: ``inner_state``, the optimizer's state over ``params["lora"]``."""

    inner_state: Any


def olora(
    optimizer: optax.GradientTransformation,
    lambda_1: float = 0.5,
    lambda_2: float = 0.0,
    *,
    orthogonality: str = "squared",
    trainable: Sequence[str] = (),
    reset_optimizer: bool = True,
) -> ContinualTransformation:
    """O-LoRA (Wang et al. 2023): trains task t's LoRA of a :class:`LoRAModel`, kept orthogonal to the earlier ones.

    The rule owns ``optimizer`` (``needs`` has ``"optimizer"``; the code: AdamW, lr 1e-3, constant):
    use it alone or last in ``clx.chain``. ``update(grads, state, params, task_id=t)`` keeps only
    the gradients of ``A_t`` and ``B_t`` (every other slot, and the base, gets exactly 0), adds
    ``lambda_1`` times the orthogonality penalty's and ``lambda_2`` times the L2 term's gradient
    (module docstring), steps the optimizer on ``params["lora"]`` and masks the steps again, so
    the earlier tasks' LoRAs and the base weights never move (bit for bit), whatever the
    optimizer's moments. ``consolidate`` re-initialises the optimizer (each task is a new run in
    the code) and moves nothing.

    Args:
      optimizer: an optax transformation (e.g. ``optax.adam(1e-3)``).
      lambda_1: the orthogonality weight (>= 0, may be traced); the code: 0.5.
      lambda_2: the L2 weight on the new LoRA (>= 0, may be traced); the code: 0.
      orthogonality: "squared" (sum of squared entries of A_s A_t^T) or "abs" (the code's sum of
        absolute values).
      trainable: path prefixes under ``params["net"]`` that also take plain optimizer steps (e.g.
        ``('head',)`` for a task-IL MultiHead); default none: the base is frozen.
      reset_optimizer: a fresh optimizer state at every consolidate.

    Returns:
      A ContinualTransformation named "olora", state :class:`OLoRAState`, needs ``{"optimizer"}``;
      params must be a :class:`LoRAModel`'s ``{"net", "lora"}``.

    Raises:
      ValueError: in the factory, a concrete ``lambda_1``/``lambda_2`` < 0 or an unknown
        ``orthogonality``; at init, params without ``"net"`` and ``"lora"``; at update, no
        ``task_id`` or (concrete) one outside [0, T).
    """
    name = "olora"
    check_nonnegative(name, "lambda_1", lambda_1)
    check_nonnegative(name, "lambda_2", lambda_2)
    if orthogonality not in ORTHOGONALITIES:
        raise ValueError(f"{name}: orthogonality must be one of {ORTHOGONALITIES}, got {orthogonality!r}.")
    trainable = tuple(trainable)

    def trains(key: str) -> bool:
        return any(key == p or key.startswith(p.rstrip("/") + "/") for p in trainable)

    def split(params):
        if not (isinstance(params, dict) and set(params) == {"net", "lora"}):
            raise ValueError(
                f"{name}: params must be a LoRAModel's {{'net', 'lora'}}, got keys "
                f"{sorted(params) if isinstance(params, dict) else type(params).__name__}; build the model with "
                "clx.projection.LoRAModel and its params with model.init(base_params, key)."
            )
        return {"net": _net_trainable(params["net"]), "lora": params["lora"]}

    def _net_trainable(net) -> dict:
        return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(net)[0] if trains(path_str(p))}

    def init(params):
        return OLoRAState(optimizer.init(split(params)))

    def update(updates, state, params=None, *, task_id=None, **extra):
        del extra
        if task_id is None:
            raise ValueError(f"{name}.update needs the task_id extra (clx.fit passes it): update(g, s, p, task_id=t).")
        if params is None:
            raise ValueError(f"{name}.update needs params (the LoRAs' A for the orthogonality gradient).")
        t = jnp.asarray(task_id, jnp.int32).reshape(-1)[0]
        num_tasks = next(iter(params["lora"].values()))["A"].shape[0] if params["lora"] else 1
        tc = concrete_int(task_id)
        if tc is not None and not 0 <= tc < num_tasks:
            raise ValueError(f"{name}: task_id {tc} is outside [0, {num_tasks}): the model has {num_tasks} LoRAs.")
        onehot = (jnp.arange(num_tasks) == t).astype(jnp.float32)[:, None, None]
        l1 = jnp.asarray(lambda_1, jnp.float32)
        l2 = jnp.asarray(lambda_2, jnp.float32)

        lora_grads = {}
        for key, g in updates["lora"].items():
            a = params["lora"][key]["A"].astype(jnp.float32)
            b = params["lora"][key]["B"].astype(jnp.float32)
            extra_a = l1 * _penalty_grad(a, t, orthogonality) + l2 * _norm_grad(a[t])
            extra_b = l2 * _norm_grad(b[t])
            lora_grads[key] = {
                "A": (onehot * (g["A"].astype(jnp.float32) + extra_a[None])).astype(g["A"].dtype),
                "B": (onehot * (g["B"].astype(jnp.float32) + extra_b[None])).astype(g["B"].dtype),
            }
        grads = {"net": _net_trainable(updates["net"]), "lora": lora_grads}
        steps, inner_state = optimizer.update(grads, state.inner_state, split(params))
        lora_steps = {
            key: {k: (onehot * s.astype(jnp.float32)).astype(s.dtype) for k, s in layer.items()}
            for key, layer in steps["lora"].items()
        }

        def net_step(path, g):
            key = path_str(path)
            return steps["net"][key].astype(g.dtype) if trains(key) else jnp.zeros_like(g)

        net_steps = jax.tree_util.tree_map_with_path(net_step, updates["net"])
        return {"net": net_steps, "lora": lora_steps}, OLoRAState(inner_state)

    def consolidate(state, params, evidence: Evidence):
        del evidence
        return None, (OLoRAState(optimizer.init(split(params))) if reset_optimizer else state)

    return ContinualTransformation(init, update, consolidate, needs=frozenset({"optimizer"}), name=name)
