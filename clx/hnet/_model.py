"""A hypernetwork, its target network and one embedding per task, as a clx model,
and HNET+ENT task inference (von Oswald et al. 2020, "Continual learning with
hypernetworks", ICLR, Sec. 4.1)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from clx.hnet._hypernetworks import Hypernetwork, _check_sizes
from clx.hnet._target import TargetNetwork
from clx.tree import check_task_ids, concrete, concrete_int

_MASKED_LOGIT = -1e9  # logits of other tasks' classes in class-IL: exp underflows to exactly 0


def _scalar_task(task_id):
    """One task id for the batch: the hypernetwork generates one set of weights per call."""
    t = jnp.asarray(task_id, jnp.int32)
    return t.reshape(-1)[0] if t.ndim else t


def _task_entropies(head_logits, num_trained, temperature):
    """(num_tasks, batch) softmax entropies at ``temperature``; +inf for tasks >= max(num_trained, 1)."""
    logp = jax.nn.log_softmax(head_logits / temperature, axis=-1)
    ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    n = jnp.maximum(jnp.asarray(num_trained, jnp.int32), 1)
    return jnp.where(jnp.arange(head_logits.shape[0])[:, None] < n, ent, jnp.inf)


def entropy_task_inference(head_logits: jax.Array, num_trained, temperature: float = 1.0) -> jax.Array:
    """HNET+ENT task inference (von Oswald et al. 2020, Sec. 4.1): per example, the
    task whose network is the most confident.

    Args:
      head_logits: (num_tasks, batch, head_size) float32, task ``t``'s head of the
        network generated from embedding ``t``, on every example
        (:meth:`HyperModel.all_head_logits`).
      num_trained: int32 scalar (concrete or traced), the tasks trained so far;
        only tasks ``0..num_trained-1`` compete (task 0 always does, so an
        untrained model still answers).
      temperature: the softmax temperature of the entropy (``soft_temp``, 1 in the paper).

    Returns:
      (batch,) int32: per example, the task ``t^`` whose softmax (at
      ``temperature``) has the lowest entropy.

    Raises:
      ValueError: a concrete ``num_trained`` outside [0, num_tasks].
    """
    num_tasks = head_logits.shape[0]
    n = concrete_int(num_trained)
    if n is not None and not 0 <= n <= num_tasks:
        raise ValueError(f"unknown task: num_trained={n} but the model has only {num_tasks} task embeddings.")
    return jnp.argmin(_task_entropies(head_logits, num_trained, temperature), axis=0).astype(jnp.int32)


class HyperModel:
    """A task-conditioned hypernetwork and its target network, as a clx model.

    A plain :class:`clx.core.Model` (``apply``, ``predict``, ``extra_results``): it
    has no Dense-layer taps, so rules that need ``"taps"`` or ``"representations"``
    (GPM) do not apply to it.

    Params: ``{"hnet": theta, "task_emb": (num_tasks, emb_dim) float32}``
    (embeddings init N(0, emb_std^2), the authors' default std 1).

    Output heads follow the authors' code (``hypercl``, ``mnist/train_utils.py``):
    the target may have ``num_tasks * head_size`` outputs, task ``t`` using
    outputs ``[t*head_size, (t+1)*head_size)`` (``per_task_heads=True``), or just
    ``head_size`` outputs shared by all tasks (each task has its own generated
    weights anyway).

    * ``scenario='task_il'`` (also Permuted MNIST with the task id given):
      ``apply(params, x, t) -> (batch, head_size)`` logits of task ``t``'s head.
    * ``scenario='class_il'``: labels are ``t*head_size + c``;
      ``apply -> (batch, num_tasks*head_size)`` with task ``t``'s logits in its
      slots and -1e9 elsewhere (training = the task's own softmax, as in the
      authors' CL3 with ``infer_output_head``); ``predict`` does HNET+ENT
      (:func:`entropy_task_inference`).

    Args:
      target: the :class:`TargetNetwork`.
      hnet: a :class:`Hypernetwork` with ``num_outputs == target.num_params``.
      num_tasks: number of task embeddings.
      head_size: outputs per task (classes of one task).
      scenario: 'task_il' or 'class_il'.
      per_task_heads: see above; checked against the target's output size.
      emb_std: std of the task embeddings' normal init.
      temperature: softmax temperature of the entropy (``soft_temp``, 1 in the paper).
      input_shape: a single input's shape, to check the target's output size.

    Raises:
      ValueError: the hypernetwork's output size differs from the target's
        parameter count; the target's output size is not ``head_size`` (or
        ``num_tasks * head_size``); an unknown scenario; sizes < 1.
    """

    def __init__(
        self,
        target: TargetNetwork,
        hnet: Hypernetwork,
        num_tasks: int,
        head_size: int,
        *,
        scenario: str = "task_il",
        per_task_heads: bool = True,
        emb_std: float = 1.0,
        temperature: float = 1.0,
        input_shape: Sequence[int] | None = None,
    ):
        if hnet.num_outputs != target.num_params:
            raise ValueError(
                f"the hypernetwork generates {hnet.num_outputs} weights but the target network has "
                f"{target.num_params} parameters; build the hypernetwork with "
                f"num_outputs={target.num_params} (target.num_params)."
            )
        if scenario not in ("task_il", "class_il"):
            raise ValueError(f"unknown scenario {scenario!r}; choose 'task_il' or 'class_il'.")
        _check_sizes(num_tasks=num_tasks, head_size=head_size)
        self.target, self.hnet = target, hnet
        self.num_tasks, self.head_size = int(num_tasks), int(head_size)
        self.scenario, self.per_task_heads = scenario, bool(per_task_heads)
        self.emb_std, self.temperature = float(emb_std), float(temperature)
        if input_shape is not None:
            want = self.num_tasks * self.head_size if self.per_task_heads else self.head_size
            got = target.output_shape(input_shape)
            if got != (want,):
                raise ValueError(
                    f"the target network outputs {got} per example but "
                    f"{'num_tasks * head_size' if self.per_task_heads else 'head_size'} "
                    f"= {want} are needed; build the target with {want} outputs."
                )

    # -- params ---------------------------------------------------------------------
    def init(self, key: jax.Array) -> dict:
        """Fresh params: ``{"hnet": hnet.init(k1), "task_emb": N(0, emb_std^2) (num_tasks, emb_dim)}``."""
        k1, k2 = jax.random.split(key)
        return {
            "hnet": self.hnet.init(k1),
            "task_emb": self.emb_std * jax.random.normal(k2, (self.num_tasks, self.hnet.emb_dim), jnp.float32),
        }

    def num_hnet_params(self, params) -> int:
        """Trainable hypernetwork weights (chunk embeddings included) plus task embeddings."""
        return int(sum(np.prod(l.shape) for l in jax.tree.leaves(params)))

    def compression_ratio(self, params) -> float:
        """(hypernetwork weights + chunk and task embeddings) / target weights (the paper's ratio)."""
        return self.num_hnet_params(params) / self.target.num_params

    def extra_results(self, params) -> dict:
        """Keys for an experiment's results.json."""
        return {
            "compression_ratio": self.compression_ratio(params),
            "hnet_params": self.num_hnet_params(params),
            "target_params": self.target.num_params,
            "hnet_type": self.hnet.name,
        }

    # -- generation -----------------------------------------------------------------
    def _embedding(self, params, task_id):
        t = _scalar_task(task_id)
        check_task_ids(t, self.num_tasks, "task embeddings")  # reported under checkify, inside jit too
        # an out-of-range id under jit without checkify gives NaN weights (fit checks the stream's ids first)
        return params["task_emb"].at[t].get(mode="fill", fill_value=jnp.nan)

    def _check_task(self, task_id):
        ids = concrete(task_id)
        if ids is None:
            return  # traced: see _embedding
        ids = np.unique(ids)
        if ids.size > 1:
            raise ValueError(
                f"one hypernetwork call generates one task's network, but the batch mixes task ids "
                f"{ids.tolist()}; split the batch by task."
            )
        t = int(ids[0]) if ids.size else None
        if t is not None and not 0 <= t < self.num_tasks:
            raise ValueError(
                f"unknown task id {t}: the model has embeddings for tasks 0..{self.num_tasks - 1}; "
                "build the HyperModel with more num_tasks."
            )

    def generate_flat(self, params, task_id) -> jax.Array:
        """(n_target,) generated weights of task ``task_id``. Raises ValueError on an unknown (concrete) id."""
        self._check_task(task_id)
        return self.hnet.apply(params["hnet"], self._embedding(params, task_id))

    def generate(self, params, task_id) -> dict:
        """The target's params (pure dict) for task ``task_id``."""
        return self.target.unflatten(self.generate_flat(params, task_id))

    def _head_logits(self, flat, x, t):
        out = self.target.apply(self.target.unflatten(flat), x)
        out = out.reshape(out.shape[0], -1)
        if self.per_task_heads:
            out = jax.lax.dynamic_slice_in_dim(out, t * self.head_size, self.head_size, axis=1)
        return out  # (batch, head_size)

    # -- the clx model interface ----------------------------------------------------
    def apply(self, params, x, task_id=None):
        """Logits on ``x`` (batch first) of task ``task_id`` (int scalar, or a (batch,)
        array whose entries must all be equal: one generated network per call).

        Shapes: task_il (batch, head_size); class_il (batch, num_tasks*head_size).

        Raises:
          ValueError: ``task_id`` is None or a concrete id outside [0, num_tasks).
            A traced id out of range is reported under ``checkify.checkify``
            (inside jit too); without checkify it gives NaN logits.
        """
        if task_id is None:
            raise ValueError("a hypernetwork model needs task_id to pick the task embedding.")
        self._check_task(task_id)
        t = _scalar_task(task_id)
        logits = self._head_logits(self.generate_flat(params, t), x, t)
        if self.scenario == "task_il":
            return logits
        full = jnp.full((x.shape[0], self.num_tasks * self.head_size), _MASKED_LOGIT, logits.dtype)
        return jax.lax.dynamic_update_slice_in_dim(full, logits, t * self.head_size, axis=1)

    def all_head_logits(self, params, x) -> jax.Array:
        """(num_tasks, batch, head_size): every task embedding's network on ``x``, own head each."""
        flats = self.hnet.apply(params["hnet"], params["task_emb"])  # (num_tasks, n_target)
        return jax.vmap(lambda f, t: self._head_logits(f, x, t))(flats, jnp.arange(self.num_tasks))

    def task_entropies(self, params, x, num_trained, logits=None) -> jax.Array:
        """(num_tasks, batch) predictive entropies of each embedding's network on ``x``
        (softmax at ``temperature``); +inf for tasks >= num_trained (task 0 always competes)."""
        logits = self.all_head_logits(params, x) if logits is None else logits
        return _task_entropies(logits, num_trained, self.temperature)

    def infer_task(self, params, x, num_trained, logits=None) -> jax.Array:
        """(batch,) int32: the lowest-entropy task among the first ``num_trained`` (HNET+ENT,
        :func:`entropy_task_inference`). Raises ValueError as it does."""
        logits = self.all_head_logits(params, x) if logits is None else logits
        return entropy_task_inference(logits, num_trained, self.temperature)

    def predict(self, params, x, task_id, num_trained):
        """(batch,) int32 predictions.

        task_il: ``argmax`` of task ``task_id``'s head. class_il (HNET+ENT, von
        Oswald et al. 2020, Sec. 4.1): per example, the task ``t^`` among the first
        ``num_trained`` embeddings whose generated network has the lowest entropy
        of its softmax (:func:`entropy_task_inference`); the prediction is
        ``t^ * head_size + argmax`` of that head.

        Raises:
          ValueError: a concrete ``task_id`` or ``num_trained`` outside the model's tasks.
        """
        if self.scenario == "task_il":
            return jnp.argmax(self.apply(params, x, task_id), axis=-1).astype(jnp.int32)
        logits = self.all_head_logits(params, x)
        t_hat = entropy_task_inference(logits, num_trained, self.temperature)  # checks num_trained
        chosen = jnp.take_along_axis(logits, t_hat[None, :, None], axis=0)[0]  # (batch, head_size)
        return (t_hat * self.head_size + jnp.argmax(chosen, axis=-1)).astype(jnp.int32)
