"""The registry: one :class:`Method` entry per method holds everything the experiment script knows of it."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import clx

DATA_MODES = ("sequential", "joint")
OPTIMIZERS = ("sgd", "adam")


def build_mlp(config, stream, seed: int):
    """The ``clx.MLP`` of ``config.model`` for ``stream``, as (FunctionalModel, params)."""
    module = clx.MLP(
        int(np.prod(stream.input_shape)),
        tuple(config.model.hidden),
        stream.num_outputs,
        num_heads=stream.num_heads,
        use_bias=config.model.use_bias,
        init=config.model.init,
        rngs=nnx.Rngs(seed),
    )
    return clx.FunctionalModel.from_module(module)


#: ``config.model.kind`` values :func:`build_classifier` builds.
MODEL_KINDS = ("mlp", "lenet", "alexnet", "resnet18", "vit")

# The ViT keyword arguments a pretrained directory must agree on with the config (the rest, e.g. init, only set
# the random start that the pretrained params replace).
_VIT_FIELDS = (
    "input_shape",
    "num_outputs",
    "num_heads",
    "patch_size",
    "dim",
    "depth",
    "attention_heads",
    "mlp_dim",
    "use_bias",
    "layer_norm_eps",
)


def vit_kwargs(config, stream) -> dict:
    """``clx.models.ViT``'s keyword arguments from ``config.model`` (``patch_size`` 0: ``H // 4``) and ``stream``."""
    m = config.model
    shape = tuple(int(s) for s in stream.input_shape)
    return {
        "input_shape": shape,
        "num_outputs": int(stream.num_outputs),
        "num_heads": int(stream.num_heads),
        "patch_size": int(m.patch_size) or max(1, shape[0] // 4),
        "dim": int(m.dim),
        "depth": int(m.depth),
        "attention_heads": int(m.heads),
        "mlp_dim": int(m.mlp_dim),
        "use_bias": bool(m.use_bias),
        "init": str(m.init),
    }


def _vit_defaults() -> dict:
    import inspect

    return {
        k: p.default
        for k, p in inspect.signature(clx.models.ViT.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def check_pretrained(config, stream=None) -> None:
    """Raises if ``config.model.pretrained`` is set and cannot be the ViT's start: a missing directory (or one
    without ``vit.json`` / ``params``: FileNotFoundError), another model kind, or (with ``stream``) ViT
    arguments that differ from the config's (ValueError naming each field, both values and the config key)."""
    directory = str(config.model.get("pretrained", "") or "")
    if not directory:
        return
    kind = str(config.model.get("kind", "mlp")).lower()
    if kind != "vit":
        raise ValueError(
            f"config.model.pretrained={directory!r} holds a ViT written by experiments.pretrain_vit, and "
            f"config.model.kind is {config.model.kind!r}; set config.model.kind='vit' or config.model.pretrained=''."
        )
    from experiments.pretrain_vit import INFO_FILE, PARAMS_DIR

    path = os.path.abspath(directory)
    for need in (INFO_FILE, PARAMS_DIR):
        if not os.path.exists(os.path.join(path, need)):
            raise FileNotFoundError(
                f"config.model.pretrained={directory!r}: no {need} in {path}; point it at a directory written by "
                f"`python -m experiments.pretrain_vit --workdir DIR`, or set it to '' to start from random weights."
            )
    if stream is None:
        return
    with open(os.path.join(path, INFO_FILE)) as f:
        saved = json.load(f)["model"]
    defaults = _vit_defaults()
    want = vit_kwargs(config, stream)
    keys = {
        "patch_size": "model.patch_size",
        "dim": "model.dim",
        "depth": "model.depth",
        "attention_heads": "model.heads",
        "mlp_dim": "model.mlp_dim",
        "use_bias": "model.use_bias",
        "input_shape": "the stream's input_shape (data.source, data.pad)",
        "num_outputs": "the stream's outputs",
        "num_heads": "the stream's heads (stream.kind)",
        "layer_norm_eps": "the ViT's layer_norm_eps",
    }
    diff = []
    for field in _VIT_FIELDS:
        ours = want.get(field, defaults.get(field))
        theirs = saved.get(field, defaults.get(field))
        if isinstance(theirs, list):
            theirs = tuple(theirs)
        if ours != theirs:
            diff.append(f"{field}: config {ours!r} ({keys[field]}), pretrained {theirs!r}")
    if diff:
        raise ValueError(
            f"config.model.pretrained={directory!r} was trained with other ViT arguments than the config's: "
            + "; ".join(diff)
            + ". Set those config values to the pretrained model's (its vit.json), or pretrain a matching ViT."
        )


@functools.lru_cache(maxsize=4)
def _pretrained_host_params(path: str, stamp: float, kwargs: tuple):
    """The pretrained params as numpy arrays (cached: every member and method starts from them; fresh jax
    arrays are made per call, as ``fit`` donates its params)."""
    del stamp
    from experiments.pretrain_vit import PARAMS_DIR

    module = clx.models.ViT(**dict(kwargs), rngs=nnx.Rngs(0))
    params = clx.models.load_params(os.path.join(path, PARAMS_DIR), module)
    return jax.tree.map(np.asarray, params)


def build_vit(config, stream, seed: int):
    """``clx.models.ViT`` of ``config.model`` (:func:`vit_kwargs`) for ``stream``, as (FunctionalModel, params).

    With ``config.model.pretrained`` (a directory written by ``experiments.pretrain_vit``) the params are the
    pretrained ones for every seed (seeds then differ only in the batch order); else a random init from ``seed``.

    Raises:
      FileNotFoundError: a missing pretrained directory. ValueError: its ViT arguments differ from the
        config's (see :func:`check_pretrained`).
    """
    check_pretrained(config, stream)
    kwargs = vit_kwargs(config, stream)
    module = clx.models.ViT(**kwargs, rngs=nnx.Rngs(seed))
    model, params = clx.FunctionalModel.from_module(module)
    directory = str(config.model.get("pretrained", "") or "")
    if directory:
        path = os.path.abspath(directory)
        stamp = os.path.getmtime(os.path.join(path, "vit.json"))
        key = tuple(sorted((k, v) for k, v in kwargs.items()))
        host = _pretrained_host_params(path, stamp, key)
        params = jax.tree.map(lambda a: jnp.array(a, copy=True), host)
    return model, params


def build_classifier(config, stream, seed: int):
    """The model of ``config.model.kind`` for ``stream``, as (FunctionalModel, params).

    "mlp": :func:`build_mlp`; "lenet": ``clx.LeNet``, "alexnet": ``clx.AlexNet`` (GPM's;
    ``config.model.channels`` / ``fc``, when not empty, its conv channels / fc widths) and
    "resnet18": ``clx.models.ResNet18`` (GPM's reduced one, ``config.model.nf`` base
    filters), on ``stream.input_shape`` with the stream's outputs and heads
    (``config.model.init``; LeNet also ``config.model.use_bias``); "vit":
    :func:`build_vit` (``config.model.patch_size``, ``dim``, ``depth``, ``heads``,
    ``mlp_dim``, ``use_bias``, ``init``; ``config.model.pretrained``: a starting point).

    Raises:
      ValueError: an unknown kind (the message lists :data:`MODEL_KINDS`).
    """
    kind = str(config.model.get("kind", "mlp")).lower()
    if kind == "vit":
        return build_vit(config, stream, seed)
    check_pretrained(config)  # a pretrained directory is for the ViT only
    if kind == "mlp":
        return build_mlp(config, stream, seed)
    if kind == "lenet":
        module = clx.models.LeNet(
            tuple(stream.input_shape),
            stream.num_outputs,
            num_heads=stream.num_heads,
            use_bias=config.model.use_bias,
            init=config.model.init,
            rngs=nnx.Rngs(seed),
        )
    elif kind == "alexnet":
        sizes = {k: tuple(config.model.get(f, ())) for k, f in (("channels", "channels"), ("hidden", "fc"))}
        module = clx.models.AlexNet(
            tuple(stream.input_shape),
            stream.num_outputs,
            num_heads=stream.num_heads,
            init=config.model.init,
            **{k: v for k, v in sizes.items() if v},  # () = the model's own (GPM's) sizes
            rngs=nnx.Rngs(seed),
        )
    elif kind == "resnet18":
        module = clx.models.ResNet18(
            tuple(stream.input_shape),
            stream.num_outputs,
            num_heads=stream.num_heads,
            nf=int(config.model.get("nf", 20)),
            init=config.model.init,
            rngs=nnx.Rngs(seed),
        )
    else:
        raise ValueError(f"unknown config.model.kind {config.model.kind!r}; choose one of {MODEL_KINDS}.")
    return clx.FunctionalModel.from_module(module)


def layer_paths(model, patterns: str) -> list[str] | None:
    """The 2-D / 4-D ``kernel`` paths of ``model``'s params matched by ``patterns``, in flattening order.

    ``model``: a ``clx.FunctionalModel`` (its ``template``'s shapes) or a params pytree. ``patterns``:
    comma-separated exact paths or ``fnmatch`` globs (``"blocks/*/attn/*/kernel"``: every attention
    projection of a ViT); "" -> None (the rule's default: every kernel).

    Raises:
      ValueError: a pattern that matches no kernel (the message lists the kernels).
    """
    import fnmatch

    wanted = [p.strip() for p in str(patterns).split(",") if p.strip()]
    if not wanted:
        return None
    template = nnx.to_pure_dict(model.template) if hasattr(model, "template") else model
    if not isinstance(template, dict):
        raise ValueError(
            f"choosing layers by name needs a clx.FunctionalModel or a params dict, got {type(model).__name__}; "
            "leave the layers setting empty (every kernel)."
        )
    kernels = [
        clx.tree.path_str(path)
        for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]
        if clx.tree.path_str(path).split("/")[-1] == "kernel" and len(leaf.shape) in (2, 4)
    ]
    unmatched = [w for w in wanted if not any(fnmatch.fnmatchcase(k, w) for k in kernels)]
    if unmatched:
        raise ValueError(f"layer patterns {unmatched} match no 2-D/4-D kernel of the model; its kernels: {kernels}.")
    return [k for k in kernels if any(fnmatch.fnmatchcase(k, w) for w in wanted)]


def _no_results(rule_state, member) -> dict:
    del rule_state, member
    return {}


def _default_evidence_samples(config) -> int:
    del config
    return 300


def _no_check(config) -> None:
    del config


@dataclasses.dataclass(frozen=True)
class Method:
    """Everything the experiment script knows of one method; ``experiments/run.py`` names none.

    Attributes:
      name: the name in ``config.method`` (lower case), and of its config block.
      make_rule: ``(config, model, hp=None) -> rule``, the ContinualTransformation
        (the method chained with its optimizer) that trains ``model`` (what
        ``build_model`` returned). ``hp`` is None (every value from the config) or
        one member's swept values ``{key: value}`` (``config.sweep.key`` and, for a
        two-key grid, ``config.sweep.key2``; a float, or a traced scalar inside the
        vmapped program): read them with :func:`swept`. Raises ValueError for a bad value,
        e.g. a GPM threshold outside (0, 1]; the script builds the rule with
        every grid value before it writes anything.
      config: ``() -> ConfigDict``, the method's ``config.<name>`` block with the
        paper's defaults (``configs/base.py`` adds it to every config), or None.
      sweepable: the ``config.sweep.key`` / ``key2`` values ``make_rule`` takes in ``hp``.
      results: ``(rule_state, member) -> dict`` of JSON-able entries added to
        results.json; ``member`` is None (one run) or the member's index on the
        state's leading axis.
      data_mode: "sequential" (task t trains on task t) or "joint" (on tasks 0..t).
      build_model: ``(config, stream, seed) -> (model, params)``.
      evidence_samples: ``config -> int``, examples per task in the evidence
        handed to ``consolidate``.
      check: ``config -> None``; raises ValueError for a bad ``config.<name>``
        value that ``make_rule`` would only see later (called before any method runs).
    """

    name: str
    make_rule: Callable[..., clx.ContinualTransformation]
    config: Callable[[], ml_collections.ConfigDict] | None = None
    sweepable: tuple[str, ...] = ("train.lr",)
    results: Callable[[Any, int | None], dict] = _no_results
    data_mode: str = "sequential"
    build_model: Callable[..., tuple[Any, Any]] = build_classifier
    evidence_samples: Callable[[ml_collections.ConfigDict], int] = _default_evidence_samples
    check: Callable[[ml_collections.ConfigDict], None] = _no_check

    def __post_init__(self):
        if not (self.name.isidentifier() and self.name == self.name.lower()):
            raise ValueError(
                f"a method name must be a lower-case Python identifier (it names config.<name>), got {self.name!r}."
            )
        if self.data_mode not in DATA_MODES:
            raise ValueError(f"method {self.name!r}: data_mode must be one of {DATA_MODES}, got {self.data_mode!r}.")
        object.__setattr__(self, "sweepable", tuple(self.sweepable))

    @property
    def cumulative(self) -> bool:
        """``fit``'s ``cumulative``: True in the joint data mode."""
        return self.data_mode == "joint"


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds ``method`` to :data:`METHODS`; returns it.

    Raises:
      ValueError: a method of that name is already registered.
    """
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered; pick another name.")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``.

    Raises:
      ValueError: an unknown name (the message lists the known ones).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}.")
    return METHODS[name]


def parse(method: str) -> list[str]:
    """Splits ``config.method`` ('gpm' or 'gpm,finetune') and checks each name.

    Raises:
      ValueError: an empty, repeated or unknown method name (the message lists the known ones).
    """
    names = [m.strip().lower() for m in str(method).split(",") if m.strip()]
    if not names:
        raise ValueError(f"config.method is empty; choose from {sorted(METHODS)}.")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known methods: {sorted(METHODS)}.")
    if len(set(names)) != len(names):
        raise ValueError(f"config.method names a method twice: {names}.")
    return names


def check_config(method: Method, config) -> None:
    """Raises ValueError if ``config`` lacks ``method``'s block, or ``method.check`` finds a bad value."""
    if method.config is not None and method.name not in config:
        raise ValueError(
            f"method {method.name!r} needs a config.{method.name} block, and this config has none: "
            f"add `c.{method.name} = methods.get({method.name!r}).config()` to the config file "
            "(configs/base.py adds the block of every method registered before base_config() runs)."
        )
    method.check(config)


def check_sweep(method: Method, key: str) -> None:
    """Raises ValueError if ``method`` does not list ``key`` in ``sweepable``."""
    if key not in method.sweepable:
        can = f"it sweeps {list(method.sweepable)}" if method.sweepable else "it has no sweepable hyperparameter"
        raise ValueError(
            f"config.sweep.key={key!r} cannot be swept: it is not supported for method {method.name!r} ({can})."
        )


def swept(config, hp, key: str, default):
    """The swept value of ``key`` in ``make_rule``'s ``hp``, else ``default``.

    ``hp`` is None (no sweep), ``{key: value}`` per swept key (``experiments.run``: ``sweep.key`` and
    ``sweep.key2``; a value is a float or a traced scalar), or one bare value for ``config.sweep.key``.
    """
    if hp is None:
        return default
    if isinstance(hp, Mapping):
        return hp.get(key, default)
    return hp if config.sweep.key == key else default


def optimizer(config, hp=None) -> optax.GradientTransformation:
    """The base optimizer of ``config.train`` (``optimizer``, ``lr``, ``momentum``).

    ``hp`` replaces ``train.lr`` when ``config.sweep.key == "train.lr"`` (a float or
    a traced scalar). Raises ValueError for an unknown optimizer or a concrete lr <= 0.
    """
    train = config.train
    if train.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown train.optimizer {train.optimizer!r}; choose one of {OPTIMIZERS}.")
    lr = swept(config, hp, "train.lr", train.lr)
    value = clx.tree.concrete_float(lr)
    if value is not None and not value > 0:
        raise ValueError(f"train.lr must be > 0, got {value}.")
    if train.optimizer == "adam":
        return optax.adam(lr)
    return optax.sgd(lr, momentum=train.momentum or None)
