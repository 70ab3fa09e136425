"""The gradient-projection family: GPM (Saha, Garg, Roy 2021), SGP (Saha & Roy 2023), Adam-NSCL (Wang, Li, Sun,
Xu 2021), OGD (Farajtabar, Azizan, Mott, Li 2020), TRGP (Lin, Yang, Fan, Zhang 2022); CoSO (Cheng et al. 2025)
and O-LoRA (Wang et al. 2023)."""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
import optax

import clx
from experiments.methods._registry import Method, build_classifier, layer_paths, optimizer, register, swept


def gpm_config() -> ml_collections.ConfigDict:
    """``config.gpm``: the paper's Permuted-MNIST values (Saha et al. 2021, App. B)."""
    g = ml_collections.ConfigDict()
    g.threshold = (0.95, 0.99, 0.99)  # per projected layer, or one float (a sweep sets one value for every layer)
    g.threshold_step = 0.0  # added per task: task t's threshold is threshold + t * step (GPM's CIFAR-100: 0.003)
    g.num_samples = 300  # examples per task in the representation matrices (an int, or one per projected layer)
    g.freeze_vectors = False  # zero 1-D params' gradients (biases, batch norm) after task 0, as the authors' code
    g.layers = ""  # '' = every Dense/Conv kernel; else comma-separated kernel paths or globs ('blocks/*/attn/*/kernel')
    return g


def _memory_args(config, hp, name: str) -> dict:
    """GPM's and SGP's shared arguments from ``config.<name>``: threshold (swept ``<name>.threshold`` sets every
    layer; a traced value becomes a function of the task), plus ``threshold_step`` per task (then a function of
    the task: ``threshold + t * step``, GPM's 0.97 + 0.003 t on CIFAR-100), num_samples, freeze_vectors.

    Raises ValueError if a concrete threshold plus the step would pass 1 by the stream's last task."""
    g = config[name]
    threshold = g.threshold if isinstance(g.threshold, (int, float)) else tuple(g.threshold)
    threshold = swept(config, hp, f"{name}.threshold", threshold)
    step = float(g.get("threshold_step", 0.0))
    if step:
        base = threshold
        last = int(config.stream.num_tasks) - 1
        if clx.tree.concrete(base) is not None and max(np.atleast_1d(np.asarray(base, float))) + step * last > 1:
            raise ValueError(
                f"config.{name}.threshold {base} + {name}.threshold_step {step} x {last} passes 1 by the last of "
                f"{last + 1} tasks; lower the step or the threshold."
            )
        if isinstance(base, tuple):
            threshold = lambda t: tuple(b + step * t for b in base)  # noqa: E731
        else:
            threshold = lambda t: base + step * t  # noqa: E731
    elif clx.tree.concrete(threshold) is None:  # a traced sweep value: the rule takes it as a function of the task
        traced = threshold
        threshold = lambda t: traced  # noqa: E731
    num_samples = g.num_samples if isinstance(g.num_samples, int) else tuple(g.num_samples)
    return dict(threshold=threshold, num_samples=num_samples, freeze_vectors=bool(g.get("freeze_vectors", False)))


def gpm_rule(config, model, hp=None):
    """``clx.chain(clx.gpm(...), optimizer)``; ``hp``: a swept ``gpm.threshold`` (every layer) or ``train.lr``.
    ``gpm.layers`` (paths or globs, ``layer_paths``) picks the projected kernels."""
    layers = layer_paths(model, config.gpm.get("layers", ""))
    return clx.chain(clx.gpm(**_memory_args(config, hp, "gpm"), layers=layers), optimizer(config, hp))


def _basis_ranks(state_type, key: str):
    def results(rule_state, member) -> dict:
        """``{key: {kernel path: rank}}`` read from the chain state's member of ``state_type``."""
        state = next(s for s in rule_state if isinstance(s, state_type))
        masks = {k: np.asarray(s.mask) for k, s in state.subspaces.items()}
        return {key: {k: int(m.sum() if member is None else m[member].sum()) for k, m in masks.items()}}

    return results


gpm_basis_ranks = _basis_ranks(clx.GPMState, "gpm_basis_ranks")


def _evidence_samples(name: str):
    return lambda config: int(np.max(config[name].num_samples))


GPM = register(
    Method(
        "gpm",
        gpm_rule,
        config=gpm_config,
        sweepable=("gpm.threshold", "train.lr"),
        results=gpm_basis_ranks,
        evidence_samples=_evidence_samples("gpm"),
    )
)


def sgp_config() -> ml_collections.ConfigDict:
    """``config.sgp``: GPM's block plus the scale coefficient (Saha & Roy 2023; the authors' code: alpha 10)."""
    g = gpm_config()
    g.alpha = 10.0  # Eq. 2's scale coefficient (scale_coff in sahagobinda/SGP); large alpha -> GPM
    return g


def sgp_rule(config, model, hp=None):
    """``clx.chain(clx.sgp(...), optimizer)``; ``hp``: a swept ``sgp.threshold``, ``sgp.alpha`` or ``train.lr``."""
    alpha = swept(config, hp, "sgp.alpha", float(config.sgp.alpha))
    layers = layer_paths(model, config.sgp.get("layers", ""))
    return clx.chain(clx.sgp(alpha=alpha, **_memory_args(config, hp, "sgp"), layers=layers), optimizer(config, hp))


def sgp_results(rule_state, member) -> dict:
    """``sgp_basis_ranks`` and ``sgp_mean_importance`` (the mean lambda over each layer's stored directions)."""
    out = _basis_ranks(clx.SGPState, "sgp_basis_ranks")(rule_state, member)
    state = next(s for s in rule_state if isinstance(s, clx.SGPState))
    means = {}
    for k, s in state.subspaces.items():
        mask, imp = np.asarray(s.mask), np.asarray(s.importance)
        if member is not None:
            mask, imp = mask[member], imp[member]
        means[k] = float(imp[mask].mean()) if mask.any() else 0.0
    return {**out, "sgp_mean_importance": means}


SGP = register(
    Method(
        "sgp",
        sgp_rule,
        config=sgp_config,
        sweepable=("sgp.threshold", "sgp.alpha", "train.lr"),
        results=sgp_results,
        evidence_samples=_evidence_samples("sgp"),
    )
)


# --- Adam-NSCL -------------------------------------------------------------------------------------------------------

#: ``adam_nscl.covariance`` values (``clx.projection.adam_nscl``'s).
NSCL_COVARIANCES = ("inputs", "batch_means")


def adam_nscl_config() -> ml_collections.ConfigDict:
    """``config.adam_nscl``: the official code's values (ShipengWang/Adam-NSCL, ``scripts_svd/adamnscl.sh`` for
    10-split CIFAR-100, as read for ``clx.projection._adam_nscl``).

    The rule owns its optimizer (Adam), so ``config.train.optimizer``, ``train.lr`` and ``train.momentum`` do
    not apply to it: its learning rates are ``lr`` (the first task) and ``later_lr`` (every later task);
    ``train.batch_size`` and ``train.epochs`` do.
    """
    c = ml_collections.ConfigDict()
    c.a = 10.0  # null space: eigenvalues <= a * lambda_min of the accumulated covariance (the code's svd_thres)
    c.lr = 1e-4  # Adam's learning rate on the first task (the code's model_lr)
    c.later_lr = 5e-5  # on every later task (svd_lr); 0: lr throughout
    c.weight_decay = 5e-5  # coupled L2 added to the gradient before Adam (model_weight_decay)
    c.num_samples = 0  # examples per task averaged into the covariance; 0: the whole task (the code's hook)
    c.covariance = "inputs"  # inputs (the paper: every input) | batch_means (the code: outer products of batch means)
    c.batch_size = 32  # the batch of covariance="batch_means" (the code's batch_size)
    c.normalize_projector = False  # divide U U^T by its Frobenius norm, as the code does (the paper does not)
    c.reset_adam = True  # a new Adam per task (the code's reset_model_opt)
    return c


def _nscl_args(config) -> dict:
    c = config.adam_nscl
    return dict(
        weight_decay=float(c.weight_decay),
        covariance=str(c.covariance),
        batch_size=int(c.batch_size) if c.covariance == "batch_means" else None,
        normalize_projector=bool(c.normalize_projector),
        reset_adam=bool(c.reset_adam),
    )


def adam_nscl_rule(config, model, hp=None):
    """``clx.chain(clx.projection.adam_nscl(...))``: the rule is the whole optimizer (its own Adam; nothing of
    ``config.train`` but the batch size and epochs applies). ``hp``: a swept ``adam_nscl.a`` or ``adam_nscl.lr``
    (with ``later_lr`` 0 the swept rate holds for every task; with ``later_lr`` > 0 it sets the first task's only)."""
    del model
    c = config.adam_nscl
    a = swept(config, hp, "adam_nscl.a", float(c.a))
    lr = swept(config, hp, "adam_nscl.lr", float(c.lr))
    later = float(c.later_lr) or None
    return clx.chain(clx.projection.adam_nscl(lr, a, later_learning_rate=later, **_nscl_args(config)))


def _check_adam_nscl(config) -> None:
    """The values one range cannot say alone: the covariance kind (a string), the rule's own checks."""
    c = config.adam_nscl
    if c.covariance not in NSCL_COVARIANCES:
        raise ValueError(
            f"config.adam_nscl.covariance must be one of {NSCL_COVARIANCES}, got {c.covariance!r} (inputs: the "
            "paper's covariance of every input; batch_means: the official code's estimate)."
        )
    if c.covariance == "batch_means" and int(c.num_samples) and int(c.num_samples) < int(c.batch_size):
        raise ValueError(
            f"config.adam_nscl.num_samples={c.num_samples} is below adam_nscl.batch_size={c.batch_size}: "
            "covariance='batch_means' averages whole batches of the evidence; raise num_samples (0: the whole "
            "task) or lower batch_size."
        )
    clx.projection.adam_nscl(
        float(c.lr), float(c.a), later_learning_rate=float(c.later_lr) or None, **_nscl_args(config)
    )


def adam_nscl_results(rule_state, member) -> dict:
    """``adam_nscl_null_space_dims``: ``{kernel path: dim of the update space}`` after the last task (the input
    dimension d before any task), read from each projector P as ``tr(P)^2 / ||P||_F^2`` (= rank U for
    ``U U^T`` and for the code's normalised ``U U^T / ||U U^T||_F`` alike)."""
    state = next(s for s in rule_state if isinstance(s, clx.projection.AdamNSCLState))
    dims = {}
    for k, p in state.projectors.items():
        p = np.asarray(p, np.float64)
        if member is not None:
            p = p[member]
        fro = float(np.sum(p * p))
        dims[k] = int(round(float(np.trace(p)) ** 2 / fro)) if fro > 0 else 0
    return {"adam_nscl_null_space_dims": dims}


#: Stand-in for "the whole task": ``clx.fit`` caps the evidence sample at the task's size.
WHOLE_TASK = 2**31 - 1


ADAM_NSCL = register(
    Method(
        "adam_nscl",
        adam_nscl_rule,
        config=adam_nscl_config,
        sweepable=("adam_nscl.a", "adam_nscl.lr"),
        results=adam_nscl_results,
        evidence_samples=lambda config: int(config.adam_nscl.num_samples) or WHOLE_TASK,
        check=_check_adam_nscl,
    )
)


# --- OGD -------------------------------------------------------------------------------------------------------------


def ogd_config() -> ml_collections.ConfigDict:
    """``config.ogd``: Farajtabar et al. 2020 (200 ground-truth-logit gradients per task, every parameter).

    OGD replaces SGD's step: it is chained before ``config.train``'s optimizer (the paper: plain SGD, lr 1e-3;
    with momentum or Adam the step is no longer the projected gradient).
    """
    c = ml_collections.ConfigDict()
    c.memory_per_task = 200  # gradients stored per task (the paper's 200)
    c.num_tasks = 0  # tasks the memory holds (its rows: memory_per_task x num_tasks); 0: config.stream.num_tasks
    c.exclude = ""  # comma-separated param paths or prefixes left out (e.g. 'head': train a MultiHead's heads freely)
    c.tol = 1e-4  # a gradient whose residual after Gram-Schmidt is <= tol x its norm is dropped
    c.max_gib = 2.0  # refuse a memory larger than this (memory_per_task x num_tasks x params x 4 bytes)
    return c


def _ogd_args(config) -> dict:
    c = config.ogd
    tasks = int(c.num_tasks) or int(config.stream.num_tasks)
    exclude = tuple(e.strip() for e in str(c.exclude).split(",") if e.strip())
    return dict(num_tasks=tasks, exclude=exclude, tol=float(c.tol), max_bytes=int(float(c.max_gib) * 2**30))


def ogd_rule(config, model, hp=None):
    """``clx.chain(clx.projection.ogd(...), optimizer)``; ``hp``: a swept ``train.lr``."""
    del model
    return clx.chain(clx.projection.ogd(int(config.ogd.memory_per_task), **_ogd_args(config)), optimizer(config, hp))


def _check_ogd(config) -> None:
    c = config.ogd
    subset = int(config.stream.get("train_subset", 0))
    if 0 < subset < int(c.memory_per_task):
        raise ValueError(
            f"config.ogd.memory_per_task={c.memory_per_task} exceeds the {subset} training examples per task "
            f"(config.stream.train_subset): OGD stores the gradients of memory_per_task of them; lower "
            f"ogd.memory_per_task to <= {subset}."
        )
    if int(c.num_tasks) and int(c.num_tasks) < int(config.stream.num_tasks):
        raise ValueError(
            f"config.ogd.num_tasks={c.num_tasks} is smaller than config.stream.num_tasks={config.stream.num_tasks}: "
            f"the memory has no rows for the later tasks' gradients; set ogd.num_tasks to 0 (the stream's) or "
            f">= {config.stream.num_tasks}."
        )
    clx.projection.ogd(int(c.memory_per_task), **_ogd_args(config))


def ogd_results(rule_state, member) -> dict:
    """``ogd_stored_directions`` (orthonormal gradients kept after the last task; dependent ones are dropped) and
    ``ogd_projected_params`` (P, the length of each stored vector)."""
    state = next(s for s in rule_state if isinstance(s, clx.projection.OGDState))
    count = np.asarray(state.count)
    return {
        "ogd_stored_directions": int(count if member is None else count[member]),
        "ogd_projected_params": int(state.vectors.shape[-1]),
    }


OGD = register(
    Method(
        "ogd",
        ogd_rule,
        config=ogd_config,
        sweepable=("train.lr",),
        results=ogd_results,
        evidence_samples=lambda config: int(config.ogd.memory_per_task),
        check=_check_ogd,
    )
)


# --- TRGP ------------------------------------------------------------------------------------------------------------


def trgp_config() -> ml_collections.ConfigDict:
    """``config.trgp``: the official code's Permuted-MNIST values (LYang-666/TRGP, ``main_pmnist.py``).

    The rule owns its optimizer (``config.train``'s, built by ``optimizer``: W and the scale matrices share
    its learning rate, as in the code) and the model is the classifier wrapped in a ``TRGPModel``.
    """
    c = ml_collections.ConfigDict()
    c.threshold = (0.95, 0.99, 0.99)  # per projected layer, or one float (the code: np.array([0.95, 0.99, 0.99]))
    c.epsilon = 0.2  # trust-region threshold on ||M_j M_j^T g|| / ||g|| (the code's eplison_1)
    c.num_samples = 300  # examples per task in the representation matrices (the code's batch_list)
    c.selection_examples = 300  # examples whose summed gradient picks the region (the code: 300 random ones)
    c.rank = 0  # columns a task basis may hold per layer (0: the layer's input size d, no cap)
    c.num_regions = 2  # trust-region slots per task (the code's top-k, k = 2)
    return c


def _trgp_args(config, hp) -> dict:
    c = config.trgp
    threshold = c.threshold if isinstance(c.threshold, (int, float)) else tuple(c.threshold)
    threshold = swept(config, hp, "trgp.threshold", threshold)
    if clx.tree.concrete(threshold) is None:
        traced = threshold
        threshold = lambda t: traced  # noqa: E731
    return dict(
        threshold=threshold,
        epsilon=swept(config, hp, "trgp.epsilon", float(c.epsilon)),
        num_samples=c.num_samples if isinstance(c.num_samples, int) else tuple(c.num_samples),
        selection_batches=max(1, math.ceil(int(c.selection_examples) / int(config.train.batch_size))),
    )


def trgp_rule(config, model, hp=None):
    """``clx.chain(clx.projection.trgp(optimizer, ...))``; ``hp``: a swept ``trgp.threshold`` (every layer),
    ``trgp.epsilon`` or ``train.lr``."""
    del model
    return clx.chain(clx.projection.trgp(optimizer(config, hp), **_trgp_args(config, hp)))


def trgp_build_model(config, stream, seed: int):
    """The classifier of ``config.model`` wrapped in a ``clx.projection.TRGPModel`` with room for the stream's tasks."""
    net, net_params = build_classifier(config, stream, seed)
    c = config.trgp
    return clx.projection.TRGPModel.wrap(
        net, net_params, int(config.stream.num_tasks), rank=int(c.rank) or None, num_regions=int(c.num_regions)
    )


def _check_trgp(config) -> None:
    c = config.trgp
    if int(c.selection_examples) < 1 or int(c.rank) < 0 or int(c.num_regions) < 1:
        raise ValueError(
            f"config.trgp: selection_examples ({c.selection_examples}) and num_regions ({c.num_regions}) must be "
            f">= 1 and rank ({c.rank}) >= 0 (0: no cap)."
        )
    clx.projection.trgp(optimizer(config), **_trgp_args(config, None))


def trgp_results(rule_state, member) -> dict:
    """``trgp_basis_ranks`` (the union U per layer after the last task), ``trgp_task_ranks`` (each task's basis
    rank as asked, before the cap), ``trgp_regions`` (per layer, each task's trust region: the old tasks chosen)
    and ``trgp_projection_ratios`` (per layer and task, ``||M_j M_j^T g|| / ||g||`` of every older task j)."""
    state = next(s for s in rule_state if isinstance(s, clx.projection.TRGPState))

    def pick(a):
        a = np.asarray(a)
        return a if member is None else a[member]

    out = {"trgp_basis_ranks": {}, "trgp_task_ranks": {}, "trgp_regions": {}, "trgp_projection_ratios": {}}
    for k, s in state.subspaces.items():
        out["trgp_basis_ranks"][k] = int(pick(s.mask).sum())
        out["trgp_task_ranks"][k] = [int(v) for v in pick(state.wanted[k])]
        out["trgp_regions"][k] = [[int(j) for j in row if j >= 0] for row in pick(state.regions[k])]
        ratios = pick(state.norms[k])
        out["trgp_projection_ratios"][k] = [[round(float(v), 4) for v in ratios[t, :t]] for t in range(len(ratios))]
    return out


TRGP = register(
    Method(
        "trgp",
        trgp_rule,
        config=trgp_config,
        sweepable=("trgp.threshold", "trgp.epsilon", "train.lr"),
        results=trgp_results,
        build_model=trgp_build_model,
        evidence_samples=_evidence_samples("trgp"),
        check=_check_trgp,
    )
)


# --- CoSO and O-LoRA (issue 13: continual fine-tuning in orthogonal subspaces) --------------------------------------


def _split_names(spec: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in str(spec).split(",") if s.strip())


def coso_config() -> ml_collections.ConfigDict:
    """``config.coso``: CoSO (Cheng et al. 2025; quinn-ch/CoSO ``exps/*.json``, as read for ``clx.projection.coso``).

    The code's ViT-B values are r 15-70 and l 100-160 on 768-wide weights; the defaults here are scaled to clx's
    small models (r 8, l 32). The rule owns its Adam: ``config.train.optimizer``/``lr`` do not apply to it.
    """
    c = ml_collections.ConfigDict()
    c.lr = 3e-4  # Adam's learning rate (the code: 3e-4 CIFAR-100, 4e-4 ImageNet-R)
    c.rank = 4  # r, the optimization subspace per weight (the code's proj_rank: 15 / 50 / 70); <= min(weight shape)
    c.sketch_size = 16  # l, the Frequent-Directions sketch (the code's rank: 100 / 120 / 160)
    c.update_every = 1  # K, steps between SVDs of the gradient (the code's update_gap: 1; 20 on DomainNet)
    c.threshold = 0.98  # energy of the sketch kept for the history at a task's end (the code: 0.98)
    c.decay = 1.0  # the sketch's decay before each merge (db_decay: 1.0)
    c.layers = ""  # kernel paths or globs to project ('' every kernel; the code: 'blocks/*/attn/out/kernel' in a ViT)
    c.trainable = "all"  # the other params: all | '' (frozen, the code's backbone) | comma-separated prefixes ('head')
    c.side = "output"  # the subspace side: output (the code: rows of torch's (out, in) weight) | input
    return c


def _coso_args(config, model) -> dict:
    c = config.coso
    layers = layer_paths(model, c.layers)
    trainable = None if str(c.trainable).strip() == "all" else _split_names(c.trainable)
    return dict(
        rank=int(c.rank),
        sketch_size=int(c.sketch_size),
        update_every=int(c.update_every),
        decay=float(c.decay),
        layers=layers,
        trainable=trainable,
        side=str(c.side),
    )


def coso_rule(config, model, hp=None):
    """``clx.chain(clx.projection.coso(...))`` (the whole optimizer); ``hp``: a swept ``coso.lr`` or ``.threshold``."""
    c = config.coso
    lr = swept(config, hp, "coso.lr", float(c.lr))
    threshold = swept(config, hp, "coso.threshold", float(c.threshold))
    return clx.chain(clx.projection.coso(lr, threshold=threshold, **_coso_args(config, model)))


def _check_coso(config) -> None:
    c = config.coso
    clx.projection.coso(
        float(c.lr),
        int(c.rank),
        sketch_size=int(c.sketch_size),
        update_every=int(c.update_every),
        threshold=float(c.threshold),
        decay=float(c.decay),
        side=str(c.side),
    )


def coso_results(rule_state, member) -> dict:
    """``coso_history_dims``: ``{kernel path: dimension of the old tasks' subspace}`` after the last task."""
    state = next(s for s in rule_state if isinstance(s, clx.projection.CoSOState))
    dims = {}
    for k, h in state.history.items():
        mask = np.asarray(h.mask)
        dims[k] = int(mask.sum() if member is None else mask[member].sum())
    return {"coso_history_dims": dims}


COSO = register(
    Method(
        "coso",
        coso_rule,
        config=coso_config,
        sweepable=("coso.lr", "coso.threshold"),
        results=coso_results,
        evidence_samples=lambda config: 1,
        check=_check_coso,
    )
)


def olora_config() -> ml_collections.ConfigDict:
    """``config.olora``: O-LoRA (Wang et al. 2023; cmnfriend/O-LoRA, as read for ``clx.projection.olora``).

    The model is ``config.model``'s network, frozen, with ``num_tasks`` LoRAs (``clx.projection.LoRAModel``); the
    optimizer is ``config.train``'s (the code: AdamW, lr 1e-3 constant).
    """
    c = ml_collections.ConfigDict()
    c.rank = 8  # r (the code's lora_dim)
    c.alpha = 32.0  # LoRA's alpha, scale alpha / r (the code: 32)
    c.lambda_1 = 0.5  # orthogonality weight (the code's lamda_1)
    c.lambda_2 = 0.0  # L2 (Frobenius norm) on the new LoRA (lamda_2)
    c.orthogonality = "squared"  # squared (sum of squared entries of A_s A_t^T, as issue 13) | abs (the code's)
    c.layers = ""  # 2-D kernel paths or globs ('' every one; the code: q and v, 'blocks/*/attn/[qv]*/kernel')
    c.trainable = ""  # base params that also train, comma-separated prefixes ('head' for a task-IL MultiHead)
    return c


def build_lora_model(config, stream, seed: int):
    """``config.model``'s network (``build_classifier``) wrapped in a ``clx.projection.LoRAModel`` with
    ``stream.num_tasks`` LoRAs on ``config.olora.layers``; returns (model, params)."""
    base, base_params = build_classifier(config, stream, seed)
    c = config.olora
    layers = layer_paths(base_params, c.layers)
    if layers is not None:
        layers = [p for p in layers if np.ndim(_leaf(base_params, p)) == 2]
    model = clx.projection.LoRAModel(
        base, base_params, int(stream.num_tasks), int(c.rank), layers, alpha=float(c.alpha)
    )
    return model, model.init(base_params, jax.random.key(seed))


def _leaf(tree, path: str):
    for k in path.split("/"):
        tree = tree[k] if k in tree else tree[int(k)]
    return tree


def olora_rule(config, model, hp=None):
    """``clx.chain(clx.projection.olora(optimizer, ...))``; ``hp``: a swept ``olora.lambda_1`` or ``train.lr``."""
    c = config.olora
    lambda_1 = swept(config, hp, "olora.lambda_1", float(c.lambda_1))
    return clx.chain(
        clx.projection.olora(
            optimizer(config, hp),
            lambda_1,
            float(c.lambda_2),
            orthogonality=str(c.orthogonality),
            trainable=_split_names(c.trainable),
        )
    )


def _check_olora(config) -> None:
    c = config.olora
    clx.projection.olora(optax.sgd(1.0), float(c.lambda_1), float(c.lambda_2), orthogonality=str(c.orthogonality))
    for what in ("rank",):
        if int(c[what]) < 1:
            raise ValueError(f"config.olora.{what} must be >= 1, got {c[what]}.")


OLORA = register(
    Method(
        "olora",
        olora_rule,
        config=olora_config,
        sweepable=("olora.lambda_1", "train.lr"),
        build_model=build_lora_model,
        evidence_samples=lambda config: 1,
        check=_check_olora,
    )
)


# --- SVD-split (Nayak et al. 2025) -------------------------------------------------------------------------------

#: ``svd_split.rank_rule`` values (``clx.projection.svd_split``'s).
SVD_SPLIT_RANK_RULES = ("fraction", "adaptive")


def svd_split_config() -> ml_collections.ConfigDict:
    """``config.svd_split``: the released code's rank rule (Red-Hat-AI-Innovation-Team/orthogonal-subspace-learning,
    ``notebooks/run_finetuning.sh``: s starts at 0.07 and grows by 0.07 per task; k = floor(max(d, m) s)).

    The rule owns ``config.train``'s optimizer: it projects the gradient, steps, and projects the step, so the
    frozen triplets stay exact under Adam too (``clx.projection.svd_split``'s docs).
    """
    c = ml_collections.ConfigDict()
    c.fraction = 0.07  # s of the first task, in [0, 1)
    c.fraction_step = 0.07  # added to s per task
    c.rank_rule = "fraction"  # fraction (the released code) | adaptive (the paper's layer importance, from task 1)
    c.min_retention = 0.5  # adaptive: k >= round(min_retention x min(d, m)) for a layer of mean importance ...
    c.target_retention = 1.0  # ... up to target_retention x min(d, m) (the code's d/2 and d)
    c.num_samples = 100  # adaptive: evidence examples per task for the importance
    c.layers = ""  # '' = every Dense/Conv kernel; else comma-separated kernel paths or globs
    c.reset_optimizer = True  # a fresh optimizer state per task (the authors run one script per task)
    return c


def _svd_split_args(config, model, hp) -> dict:
    c = config.svd_split
    return dict(
        fraction=swept(config, hp, "svd_split.fraction", float(c.fraction)),
        fraction_step=float(c.fraction_step),
        rank_rule=str(c.rank_rule),
        min_retention=float(c.min_retention),
        target_retention=float(c.target_retention),
        layers=None if model is None else layer_paths(model, c.layers),
        reset_optimizer=bool(c.reset_optimizer),
    )


def svd_split_rule(config, model, hp=None):
    """``clx.chain(clx.projection.svd_split(..., optimizer=optimizer))``; ``hp``: a swept ``svd_split.fraction``
    or ``train.lr``."""
    return clx.chain(clx.projection.svd_split(**_svd_split_args(config, model, hp), optimizer=optimizer(config, hp)))


def _check_svd_split(config) -> None:
    c = config.svd_split
    if c.rank_rule not in SVD_SPLIT_RANK_RULES:
        raise ValueError(
            f"config.svd_split.rank_rule must be one of {SVD_SPLIT_RANK_RULES}, got {c.rank_rule!r} (fraction: the "
            "released code's k = floor(max(d, m) s); adaptive: the paper's layer importance)."
        )
    clx.projection.svd_split(**_svd_split_args(config, None, None))


def svd_split_results(rule_state, member) -> dict:
    """``svd_split_frozen_ranks``: ``{kernel path: k}`` the state holds after the last task (what a next task
    would freeze; the ranks of task t are the fraction rule's or the adaptive rule's at that boundary)."""
    state = next(s for s in rule_state if isinstance(s, clx.projection.SVDSplitState))
    return {
        "svd_split_frozen_ranks": {
            k: int(np.asarray(v) if member is None else np.asarray(v)[member]) for k, v in state.rank.items()
        }
    }


SVD_SPLIT = register(
    Method(
        "svd_split",
        svd_split_rule,
        config=svd_split_config,
        sweepable=("svd_split.fraction", "train.lr"),
        results=svd_split_results,
        evidence_samples=lambda config: int(config.svd_split.num_samples),
        check=_check_svd_split,
    )
)
