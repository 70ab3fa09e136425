"""The core contract of clx: a continual-learning method is an optax
``GradientTransformation`` with a third function, ``consolidate``, called once at
every task boundary, and three optional hooks:

    ContinualTransformation(
        init(params) -> state,
        update(updates, state, params=None, **extra) -> (updates, state),   # optax's
        consolidate(state, params, evidence) -> (moves, state),            # task end
        loss=None,     # loss(params, state, batch, apply_fn) -> scalar, added to the task loss
        needs=frozenset(),  # what the trainer must hand the rule (see NEEDS)
        name="",       # for error messages
    )

Every method family fits it without a special case in the trainer:

- **a change to the gradient** (GPM and its family, EWC-style penalty gradients,
  SI, MAS, UPGD): ``update``, as in optax;
- **a loss term on the current batch** (LwF's distillation, ER's and DER++'s replay
  losses): ``loss``. The trainer adds ``rule.loss(...)`` to the task loss *before*
  differentiating, so the term shares the task loss's one forward/backward pass;
  ``batch.logits`` in the loss is the model's (differentiable) output on ``batch.x``
  from that same forward pass;
- **gradients on other data** (A-GEM's reference gradient on a buffer batch, GEM's
  one per old task): declare ``"grad_fn"`` and ``update`` receives
  ``grad_fn(params, batch) -> grads`` of the task loss (optax's precedent:
  ``optax.contrib.sam``'s ``grad_fn``);
- **the current batch** (a replay buffer inserts it): declare ``"batch"`` and
  ``update`` receives ``batch`` (a :class:`Batch`, with the step's logits as constants);
- **moves of the params at a task boundary** (shrink & perturb, resets, merged
  weights): ``consolidate`` returns ``(moves, state)``; ``moves`` is an updates
  pytree that the trainer adds to the params (``optax.apply_updates``), or ``None``
  for no move (then the params are untouched, bit for bit);
- **layer taps** (the inputs and output gradients of every Dense and Conv layer; a
  Conv layer's inputs are its im2col patches): declare
  ``"taps"``; only rules that declare it pay for them;
- **randomness per step** (sampling a replay batch): declare ``"key"`` and
  ``update`` receives ``key`` (the loss term sees it as ``batch.key``), drawn from
  the run's seed, so vmapped seeds sample independently.

Every function is pure and jit-able and every state is a pytree, so a rule can be
jitted, vmapped over seeds, sharded and checkpointed like any optax state.
``chain`` composes clx rules and plain optax transforms; a plain optax transform
consolidates as the identity (no move, same state), has no loss and needs nothing,
and steps exactly as it does alone.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax
from flax import struct

Params = Any
Updates = Any
State = Any

#: What a rule can declare in ``needs``, and what the trainer then provides.
NEEDS: dict[str, str] = {
    "taps": "update receives layer_inputs {kernel path: (N, d)} and output_grads {kernel path: (N, m)} of every "
    "Dense and Conv layer (a Conv's N = batch x output positions, d its patch size k_h k_w c_in; the model must be "
    "a TappedModel with at least one such layer)",
    "representations": "evidence.representations holds every Dense and Conv layer's inputs (a Conv's im2col "
    "patches) on the evidence sample (the model must be a TappedModel with at least one such layer)",
    "batch": "update receives batch, the step's clx.Batch (inputs, labels, task ids, weights, logits)",
    "grad_fn": "update receives grad_fn(params, batch) -> the task loss's gradient on another batch",
    "optimizer": "the rule applies its own optimizer (its updates are final steps); at most one per chain",
    "key": "update receives key, a PRNG key unique to the member (seed), task, epoch and step, and the loss term "
    "sees the same key as batch.key (for sampling a replay batch); fold it in before each separate use",
}


class ContinualTransformation(NamedTuple):
    """An optax gradient transformation that also acts at task boundaries.

    Attributes:
      init: ``init(params) -> state``.
      update: ``update(updates, state, params=None, **extra) -> (updates, state)``,
        exactly optax's signature. The trainer always passes ``task_id`` (int32
        scalar, the task being trained) as an extra, and the extras of ``needs``
        (``layer_inputs``/``output_grads``, ``batch``, ``grad_fn``, ``key``); a rule ignores
        the extras it does not use (accept ``**extra``).
      consolidate: ``consolidate(state, params, evidence) -> (moves, state)``,
        called once after each task with the :class:`Evidence` gathered by the
        trainer. ``moves`` is ``None`` (the params stay as they are) or an updates
        pytree shaped like the params, added to them by the trainer.
      loss: ``None`` or ``loss(params, state, batch, apply_fn) -> float32 scalar``,
        added to the mean task loss before the trainer differentiates (one
        backward pass for both). ``batch`` is a :class:`Batch` whose ``logits``
        are the live (differentiable) outputs of the step's forward pass;
        ``apply_fn(params, x, task_id) -> logits`` runs the model on other inputs
        (a buffer batch, the old params). Weigh per-example terms by
        ``batch.weights`` (0 marks padding in an epoch's last batch).
      needs: a frozenset of keys of :data:`NEEDS`.
      name: a short name for error messages (``"gpm"``; ``chain`` joins its members').
      members: the members of a ``chain`` (empty for a single rule).
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Updates, State]]
    consolidate: Callable[[State, Params, "Evidence"], tuple[Updates | None, State]]
    loss: Callable[..., jax.Array] | None = None
    needs: frozenset = frozenset()
    name: str = ""
    members: tuple = ()


@struct.dataclass
class Batch:
    """One training step's mini-batch (a pytree), as a rule's ``loss`` and ``update`` see it.

    Attributes:
      x: (B, ...) float32 inputs.
      y: (B,) int32 labels.
      task_ids: (B,) int32, the task of each example.
      weights: (B,) float32, 1 for a real example and 0 for padding (the last
        batch of an epoch is padded to B); the task loss is
        ``sum(w * ce) / max(sum(w), 1)``.
      logits: (B, k) float32, the model's outputs on ``x`` at the step's params:
        differentiable inside ``loss``, constants in ``update``; None when a rule
        builds a Batch of its own (e.g. from a buffer) for ``grad_fn``.
      key: the step's PRNG key (a typed key array) when the rule declares
        ``"key"``, else None; the same key ``update`` receives.
    """

    x: jax.Array
    y: jax.Array
    task_ids: jax.Array
    weights: jax.Array
    logits: jax.Array | None = None
    key: jax.Array | None = None


@struct.dataclass
class Evidence:
    """What a rule may look at when task ``task_id`` ends (a pytree).

    Gathered once by the trainer from a fixed-size sample of the finished task.

    Attributes:
      task_id: int32 scalar, index of the task that just ended.
      x: (n, ...) float32, the sample's inputs.
      y: (n,) int32, the sample's labels.
      representations: ``{kernel path: (d, n) float32}``, the inputs of every
        Dense and Conv layer on the sample, one column per example (per example and
        output position for a Conv: its im2col patches; the representation
        matrix R of Saha et al. 2021, Eq. 4); filled when the rule declares
        ``"representations"``, else empty. Kernel paths are '/'-joined keys of
        the params pytree, e.g. ``'layers/0/kernel'``. A layer applied to inputs
        with extra leading axes contributes one column per position.
      apply_fn: ``apply_fn(params, x, task_id) -> logits`` (static field), for
        rules that need logits or per-example gradients.
      apply_with_taps: the model's ``apply_with_taps`` when it is a :class:`TappedModel`,
        else None (static field): per-example quantities of Dense layers without
        per-example gradients (the factored Fisher of
        :func:`clx.regularization.diagonal_fisher`).
    """

    task_id: jax.Array
    x: jax.Array
    y: jax.Array
    representations: dict[str, jax.Array]
    apply_fn: Callable[..., jax.Array] = struct.field(pytree_node=False, default=None)
    apply_with_taps: Callable | None = struct.field(pytree_node=False, default=None)


@runtime_checkable
class Model(Protocol):
    """What the trainer calls on a model (``clx.FunctionalModel``, ``clx.HyperModel``, your own).

    Required: ``apply(params, x, task_id) -> logits``, pure, with ``x`` (B, ...)
    float32, ``task_id`` an int32 scalar or (B,) array (ignored by single-head
    models) and logits (B, k) float32.

    Optional, found with ``getattr``:

    - ``predict(params, x, task_id, num_trained) -> (B,) int32`` predictions,
      used for evaluation instead of ``argmax apply`` (a hypernetwork that infers
      the task for class-IL from the ``num_trained`` tasks trained so far);
    - ``extra_results(params) -> dict`` of JSON-able facts the experiment script
      adds to ``results.json`` (a hypernetwork's compression ratio).

    Rules that declare ``"taps"`` or ``"representations"`` need a :class:`TappedModel`.
    """

    def apply(self, params, x: jax.Array, task_id=None) -> jax.Array: ...


@runtime_checkable
class TappedModel(Model, Protocol):
    """A :class:`Model` that also exposes its Dense and Conv layers' inputs and output gradients.

    - ``apply_with_taps(params, x, task_id, perturbations=None) -> (logits, layer_inputs)``:
      ``layer_inputs[kernel path]`` is the layer's input (N, d), N = batch x positions;
      ``perturbations[kernel path]`` (N, m), when given, is added to the layer's
      pre-bias output, so differentiating with respect to zeros gives ``delta``.
    - ``tap_shapes(params, x, task_id) -> {kernel path: ShapeDtypeStruct (N, m)}``,
      the shapes of those outputs ({} for a model with no Dense or Conv layers).
    """

    def apply_with_taps(self, params, x, task_id=None, perturbations=None): ...

    def tap_shapes(self, params, x, task_id=None) -> dict: ...


def needers(rule: ContinualTransformation) -> dict[str, list[str]]:
    """``{need: [names of the (chained) rules that declare it]}`` for a rule or chain."""
    out: dict[str, list[str]] = {}
    for m in rule.members or (rule,):
        if m.members:
            for need, names in needers(m).items():
                out.setdefault(need, []).extend(names)
        else:
            for need in sorted(m.needs):
                out.setdefault(need, []).append(m.name or "<unnamed rule>")
    return out


def check_needs(rule: ContinualTransformation, model, tap_shapes: dict | None = None) -> None:
    """Raises if ``model`` cannot give ``rule`` what it declares in ``needs``.

    Args:
      rule: a rule or chain.
      model: the model the trainer will run.
      tap_shapes: ``model.tap_shapes(...)`` on a sample batch, if already computed.

    Raises:
      ValueError: an unknown need, or taps/representations asked of a model that
        has no ``apply_with_taps`` or no Dense/Conv layer; names the rule and the fix.
    """
    who = needers(rule)
    unknown = sorted(set(who) - set(NEEDS))
    if unknown:
        raise ValueError(
            f"rule(s) {[n for k in unknown for n in who[k]]} declare unknown needs {unknown}; known: {sorted(NEEDS)}."
        )
    for need in ("taps", "representations"):
        if need not in who:
            continue
        if not isinstance(model, TappedModel):
            raise ValueError(
                f"rule {who[need][0]!r} needs {need!r} ({NEEDS[need]}), but the model "
                f"{type(model).__name__} has no apply_with_taps/tap_shapes; use a clx.FunctionalModel "
                "or drop the rule."
            )
        if tap_shapes is not None and not tap_shapes:
            raise ValueError(
                f"rule {who[need][0]!r} needs {need!r}, but the model {type(model).__name__} has no "
                "Dense (nnx.Linear) or Conv (nnx.Conv) layer to tap; give it one or drop the rule."
            )
    if rule.loss is not None and not callable(getattr(model, "apply", None)):
        raise ValueError(
            f"rule {rule.name!r} has a loss term, which calls the model's apply, but "
            f"{type(model).__name__} has no apply(params, x, task_id)."
        )


def _identity_consolidate(state, params, evidence):
    del params, evidence
    return None, state


def as_continual(
    tx: optax.GradientTransformation | ContinualTransformation, *, who: str = "clx.chain"
) -> ContinualTransformation:
    """Wraps a plain optax transform as a ContinualTransformation.

    The result accepts (and ignores) extra keyword arguments in ``update``,
    consolidates as the identity (no move, same state), has no loss term and
    needs nothing. A ContinualTransformation is returned unchanged.

    Args:
      tx: an optax or clx transformation.
      who: the caller's name, for the error message (``"clx.chain"``, ``"fit"``).

    Raises:
      TypeError: if ``tx`` has no ``init``/``update`` functions.
    """
    if isinstance(tx, ContinualTransformation):
        return tx
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise TypeError(
            f"{who} takes optax GradientTransformations or clx ContinualTransformations, "
            f"got {type(tx).__name__}; build one with e.g. optax.sgd(0.01) or clx.gpm(...)."
        )
    tx = optax.with_extra_args_support(tx)
    return ContinualTransformation(tx.init, tx.update, _identity_consolidate, name="optax")


def check_like_params(rule: ContinualTransformation, updates, params) -> None:
    """Raises if a rule's ``update`` returned updates not shaped like the params (a trace-time check).

    Raises:
      ValueError: a different pytree structure, or a leaf whose shape differs
        from its parameter's; names the rule, the parameter path and both shapes.
    """
    got, want = jax.tree.structure(updates), jax.tree.structure(params)
    if got != want:
        raise ValueError(
            f"rule {rule.name or '<unnamed rule>'!r} returned updates with pytree structure {got}, "
            f"but the params have {want}; its update must return one leaf per parameter."
        )
    for (path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params)):
        if jnp.shape(u) != jnp.shape(p):
            raise ValueError(
                f"rule {rule.name or '<unnamed rule>'!r} returned an update of shape {jnp.shape(u)} for parameter "
                f"{jax.tree_util.keystr(path)} of shape {jnp.shape(p)}; was its state built by init on other params?"
            )


def _add_moves(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return jax.tree.map(jnp.add, a, b)


def chain(*transforms: optax.GradientTransformation | ContinualTransformation) -> ContinualTransformation:
    """Composes clx rules and plain optax transforms, applied left to right.

    ``clx.chain(clx.gpm(...), optax.sgd(0.01))`` is the whole GPM optimizer: the
    gradient is projected, then scaled by the learning rate. The state is a tuple
    with one entry per transform, like ``optax.chain``'s, and:

    - ``update`` passes the same ``params`` and ``**extra`` to every member;
    - ``loss`` is the sum of the members' loss terms (None if none has one);
    - ``consolidate`` calls each member's ``consolidate`` in order; a member
      that moves the params hands the moved params to the members after it, and
      the chain's moves are the sum of its members' (None if none moves);
    - ``needs`` is the union of the members' needs.

    Raises:
      ValueError: if called with no transforms, or with two members that own
        an optimizer (``"optimizer"`` in their needs; names both).
      TypeError: if a member is neither an optax nor a clx transformation.
    """
    if not transforms:
        raise ValueError("clx.chain needs at least one transformation.")
    members = tuple(as_continual(t) for t in transforms)
    owners = needers(ContinualTransformation(None, None, None, members=members)).get("optimizer", [])
    if len(owners) > 1:
        raise ValueError(
            f"clx.chain: {owners} each apply their own optimizer; a chain can hold one. Pass the "
            "optimizer to one of them only."
        )
    with_loss = [(i, m) for i, m in enumerate(members) if m.loss is not None]

    def init(params):
        return tuple(m.init(params) for m in members)

    def update(updates, state, params=None, **extra):
        new_state = []
        for m, s in zip(members, state):
            updates, s = m.update(updates, s, params, **extra)
            new_state.append(s)
        return updates, tuple(new_state)

    def loss(params, state, batch, apply_fn):
        terms = [m.loss(params, state[i], batch, apply_fn) for i, m in with_loss]
        return terms[0] if len(terms) == 1 else sum(terms[1:], terms[0])

    def consolidate(state, params, evidence):
        moves, new_state = None, []
        for m, s in zip(members, state):
            move, s = m.consolidate(s, params, evidence)
            if move is not None:
                params = optax.apply_updates(params, move)
            moves = _add_moves(moves, move)
            new_state.append(s)
        return moves, tuple(new_state)

    return ContinualTransformation(
        init,
        update,
        consolidate,
        loss if with_loss else None,
        frozenset().union(*(m.needs for m in members)),
        "chain(" + ", ".join(m.name or "?" for m in members) + ")",
        members,
    )
