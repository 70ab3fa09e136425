"""Range checks of every numeric value of an experiment config, before anything runs or is written.

:data:`RULES` maps each numeric key (``section.name``) to its range and what the
value means; a tuple value (``model.hidden``, ``gpm.threshold``, ``seeds``) is checked
entry by entry, and every ``sweep.grid`` value against the rule of ``sweep.key``.
``experiments.run.prepare`` calls :func:`check_config` first; the methods' own
``check`` hooks then test what one value cannot say alone (e.g. a threshold per layer).
``tests/test_script.py`` fails for a numeric key of any config or method block that
has no rule here, so a new value cannot skip the check.
"""

from __future__ import annotations

import dataclasses
import math
import numbers


@dataclasses.dataclass(frozen=True)
class Range:
    """``lo <= x <= hi`` (``<`` where open), finite, an int if ``integer``; ``also`` lists extra allowed values."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    also: tuple = ()
    unset_ok: bool = False  # None (the key left unset: off) is allowed

    def ok(self, x) -> bool:
        if x is None:
            return self.unset_ok
        if isinstance(x, bool) or not isinstance(x, numbers.Real):
            return False
        if self.integer and not isinstance(x, numbers.Integral):
            return False
        if x in self.also:
            return True
        if not math.isfinite(x):
            return False
        if self.lo is not None and not (x > self.lo if self.lo_open else x >= self.lo):
            return False
        return self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = "a finite number"
        if self.integer:
            text = "an integer" + ("" if text == "a finite number" else f" {text}")
        text += "".join(f" or {a}" for a in self.also)
        return text + (" or unset (None: off)" if self.unset_ok else "")


POSITIVE = Range(0, lo_open=True)
NONNEGATIVE = Range(0)
COUNT = Range(1, integer=True)  # sizes and counts
OPTIONAL_COUNT = Range(0, integer=True)  # 0 = a default (the whole task, the training batch's size, off)
FRACTION = Range(0, 1, lo_open=True)  # (0, 1]

#: key -> (range, what the value is: shown in the message). Tuple values are checked entry by entry.
RULES: dict[str, tuple[Range, str]] = {
    "seed": (OPTIONAL_COUNT, "the run's seed"),
    "seeds": (OPTIONAL_COUNT, "each member's seed"),
    "checkpoint.every_steps": (OPTIONAL_COUNT, "optimizer steps between saves inside a task; 0 = at task ends"),
    "checkpoint.every_tasks": (COUNT, "tasks between saves at task ends (the last task is always saved)"),
    "checkpoint.max_to_keep": (COUNT, "checkpoints kept"),
    "mesh.shape": (Range(1, integer=True, also=(-1,)), "devices per mesh axis; -1 = the rest"),
    "distributed.num_processes": (OPTIONAL_COUNT, "processes; 0 = auto-detect"),
    "distributed.process_id": (Range(-1, integer=True), "this process's id; -1 = auto-detect"),
    "data.pad": (OPTIONAL_COUNT, "background pixels added on each side"),
    "stream.num_tasks": (COUNT, "tasks in the stream"),
    "stream.train_subset": (OPTIONAL_COUNT, "training examples kept per task; 0 = all"),
    "stream.max_angle": (Range(-360, 360), "the last rotated task's angle in degrees"),
    "model.hidden": (COUNT, "units per hidden layer"),
    "model.nf": (COUNT, "the ResNet-18's base filters (GPM: 20)"),
    "model.channels": (COUNT, "the AlexNet's conv channels"),
    "model.fc": (COUNT, "the AlexNet's fc widths"),
    "model.patch_size": (OPTIONAL_COUNT, "the ViT's patch side; 0 = H // 4"),
    "model.dim": (COUNT, "the ViT's token width"),
    "model.depth": (COUNT, "the ViT's encoder blocks"),
    "model.heads": (COUNT, "the ViT's attention heads"),
    "model.mlp_dim": (COUNT, "the ViT's MLP hidden width"),
    "train.lr": (POSITIVE, "the learning rate"),
    "train.momentum": (Range(0, 1, hi_open=True), "SGD momentum; 0 = none"),
    "train.epochs": (COUNT, "epochs per task"),
    "train.batch_size": (COUNT, "examples per training step"),
    "train.eval_batch_size": (COUNT, "examples per evaluation step"),
    # methods (experiments/methods/)
    "gpm.threshold": (FRACTION, "the share of each layer's activation energy its basis keeps"),
    "gpm.threshold_step": (Range(0, 1), "what each layer's threshold grows by per task (GPM's CIFAR-100: 0.003)"),
    "gpm.num_samples": (COUNT, "examples per task in the representation matrices"),
    "sgp.threshold": (FRACTION, "the share of each layer's activation energy its basis keeps"),
    "sgp.threshold_step": (Range(0, 1), "what each layer's threshold grows by per task"),
    "sgp.num_samples": (COUNT, "examples per task in the representation matrices"),
    "sgp.alpha": (POSITIVE, "SGP's scale coefficient of Eq. 2 (the paper: 10)"),
    "adam_nscl.a": (POSITIVE, "the null space's factor: eigenvalues <= a x the smallest (the paper: 10 or 30)"),
    "adam_nscl.lr": (POSITIVE, "Adam's learning rate on the first task (the official code: 1e-4)"),
    "adam_nscl.later_lr": (NONNEGATIVE, "Adam's learning rate after the first task (the code: 5e-5); 0 = lr"),
    "adam_nscl.weight_decay": (NONNEGATIVE, "the coupled L2 weight decay (the code: 5e-5)"),
    "adam_nscl.num_samples": (OPTIONAL_COUNT, "examples per task in the covariance; 0 = the whole task"),
    "adam_nscl.batch_size": (COUNT, "examples per batch mean of covariance='batch_means' (the code: 32)"),
    "svd_split.fraction": (Range(0, 1, hi_open=True), "s of the first task: k = floor(max(d, m) s) frozen"),
    "svd_split.fraction_step": (NONNEGATIVE, "what s grows by per task"),
    "svd_split.min_retention": (Range(0, 1), "the adaptive rule's lower bound, a fraction of min(d, m)"),
    "svd_split.target_retention": (Range(0, 1), "the adaptive rule's upper bound, a fraction of min(d, m)"),
    "svd_split.num_samples": (COUNT, "evidence examples per task for the adaptive rule's importance"),
    "ogd.memory_per_task": (COUNT, "gradients stored per task (the paper: 200)"),
    "ogd.num_tasks": (OPTIONAL_COUNT, "tasks the memory holds; 0 = stream.num_tasks"),
    "ogd.tol": (Range(0, 1, lo_open=True, hi_open=True), "the relative residual below which a gradient is dropped"),
    "ogd.max_gib": (POSITIVE, "the largest memory of stored gradients allowed, in GiB"),
    "trgp.threshold": (FRACTION, "GPM's energy threshold per projected layer"),
    "trgp.epsilon": (Range(0, 1), "the trust-region threshold on ||M M^T g|| / ||g|| (the code: 0.2 on PMNIST)"),
    "trgp.num_samples": (COUNT, "examples per task in the representation matrices"),
    "trgp.selection_examples": (COUNT, "examples whose summed gradient picks the trust region (the code: 300)"),
    "trgp.rank": (OPTIONAL_COUNT, "columns a task basis may hold per layer; 0 = the layer's input size"),
    "trgp.num_regions": (COUNT, "old tasks in a trust region (the code: 2)"),
    "coso.lr": (POSITIVE, "Adam's learning rate (the official code: 3e-4 to 4e-4)"),
    "coso.rank": (COUNT, "r, the optimization subspace's dimension per weight (the code: 15 to 70)"),
    "coso.sketch_size": (COUNT, "l, the Frequent-Directions sketch's columns (the code: 100 to 160)"),
    "coso.update_every": (COUNT, "K, steps between SVDs of the gradient (the code: 1)"),
    "coso.threshold": (FRACTION, "the share of the sketch's energy kept for the history (the code: 0.98)"),
    "coso.decay": (NONNEGATIVE, "the sketch's decay before each merge (the code: 1.0)"),
    "olora.rank": (COUNT, "r, each task's LoRA rank (the code: 8)"),
    "olora.alpha": (POSITIVE, "LoRA's alpha, the scale is alpha / r (the code: 32)"),
    "olora.lambda_1": (NONNEGATIVE, "the orthogonality weight (the code: 0.5)"),
    "olora.lambda_2": (NONNEGATIVE, "the L2 weight on the new LoRA (the code: 0)"),
    "hnet.emb_dim": (COUNT, "the task embedding size"),
    "hnet.chunk_dim": (COUNT, "weights per chunk"),
    "hnet.chunk_emb_dim": (COUNT, "the chunk embedding size"),
    "hnet.hidden": (COUNT, "units per hypernetwork hidden layer"),
    "hnet.rnn_hidden": (COUNT, "the recurrent hypernetwork's hidden state size"),
    "hnet.beta": (NONNEGATIVE, "the output regularizer's strength"),
    "hnet.num_sampled": (OPTIONAL_COUNT, "old tasks regularized per step; 0 = all"),
    "hnet.emb_std": (POSITIVE, "the task embeddings' initial std"),
    "hnet.chunk_emb_std": (POSITIVE, "the chunk embeddings' initial std"),
    "hnet.temperature": (POSITIVE, "the softmax temperature of HNET+ENT"),
    "ewc.lam": (NONNEGATIVE, "the penalty's strength"),
    "ewc.num_samples": (OPTIONAL_COUNT, "Fisher examples per task; 0 = the whole task"),
    "ewc.chunk_size": (OPTIONAL_COUNT, "per-example gradients at a time; 0 = automatic"),
    "online_ewc.lam": (NONNEGATIVE, "the penalty's strength"),
    "online_ewc.gamma": (FRACTION, "the decay of older Fishers"),
    "online_ewc.num_samples": (OPTIONAL_COUNT, "Fisher examples per task; 0 = the whole task"),
    "online_ewc.chunk_size": (OPTIONAL_COUNT, "per-example gradients at a time; 0 = automatic"),
    "si.c": (NONNEGATIVE, "the penalty's strength"),
    "si.xi": (POSITIVE, "the damping of the importance's denominator"),
    "mas.lam": (NONNEGATIVE, "the penalty's strength"),
    "mas.num_samples": (OPTIONAL_COUNT, "importance examples per task; 0 = the whole task"),
    "mas.chunk_size": (OPTIONAL_COUNT, "per-example gradients at a time; 0 = automatic"),
    "l2.lam": (NONNEGATIVE, "the penalty's strength"),
    "lwf.alpha": (NONNEGATIVE, "the distillation loss's weight"),
    "lwf.temperature": (POSITIVE, "the distillation temperature"),
    "er.buffer_size": (COUNT, "examples in the replay buffer"),
    "er.replay_batch_size": (OPTIONAL_COUNT, "replayed examples per step; 0 = the training batch's size"),
    "der.buffer_size": (COUNT, "examples in the replay buffer"),
    "der.alpha": (NONNEGATIVE, "the logit MSE's weight"),
    "der.replay_batch_size": (OPTIONAL_COUNT, "replayed examples per step; 0 = the training batch's size"),
    "derpp.buffer_size": (COUNT, "examples in the replay buffer"),
    "derpp.alpha": (NONNEGATIVE, "the logit MSE's weight"),
    "derpp.beta": (NONNEGATIVE, "the replayed cross-entropy's weight"),
    "derpp.replay_batch_size": (OPTIONAL_COUNT, "replayed examples per step; 0 = the training batch's size"),
    "agem.memory_per_task": (COUNT, "examples kept per task"),
    "agem.reference_batch_size": (COUNT, "examples in the reference gradient's batch"),
    "agem.num_tasks": (OPTIONAL_COUNT, "tasks the memory holds; 0 = stream.num_tasks"),
    "gem.memory_per_task": (COUNT, "examples kept per task"),
    "gem.memory_strength": (NONNEGATIVE, "the margin of the dual's constraint"),
    "gem.num_tasks": (OPTIONAL_COUNT, "tasks the memory holds; 0 = stream.num_tasks"),
    "l2_init.lam": (NONNEGATIVE, "the pull towards the initial params"),
    "shrink_perturb.shrink": (Range(0, 1), "the factor on the params at each task boundary; 1 = no shrink"),
    "shrink_perturb.sigma": (NONNEGATIVE, "the std of the noise added at each task boundary"),
    "shrink_perturb_steps.sigma": (NONNEGATIVE, "the std of the noise added after every step"),
    "shrink_perturb_steps.weight_decay": (NONNEGATIVE, "the coupled weight decay added to the gradient"),
    "shrink_perturb_steps.shrink": (Range(0, 1), "the factor on the stepped params; 1 = no shrink"),
    "upgd.beta_utility": (Range(0, 1, hi_open=True), "the utility trace's decay"),
    "upgd.sigma": (NONNEGATIVE, "the std of UPGD's perturbation"),
    "upgd.weight_decay": (NONNEGATIVE, "UPGD's decoupled weight decay"),
    "upgd.step_scale": (POSITIVE, "the gated step's multiple of train.lr (1: the optimizer file, 2: the README)"),
    "spectral.strength": (NONNEGATIVE, "the spectral penalty's strength"),
    "spectral.exponent": (POSITIVE, "k in (sigma_max^k - 1)^2"),
    "cbp.replacement_rate": (Range(0, 1), "hidden units replaced per layer per step"),
    "cbp.decay": (Range(0, 1, hi_open=True), "the utility's running-average decay"),
    "cbp.maturity": (COUNT, "steps a fresh unit is protected from replacement"),
    "redo.tau": (NONNEGATIVE, "ReDo's dormancy threshold"),
    "redo.period": (COUNT, "steps between recycles"),
    "eval.plasticity_metrics_tau": (NONNEGATIVE, "ReDo's dormancy threshold for the per-task diagnostics"),
    "eval.every_steps": (Range(1, integer=True, unset_ok=True), "continual evaluation every this many optimizer steps"),
    "eval.samples": (COUNT, "each task's test subsample for continual evaluation"),
}

#: Numeric keys checked otherwise: every ``sweep.grid`` (``grid2``) value against the rule of ``sweep.key`` (``key2``).
SPECIAL = ("sweep.grid", "sweep.grid2")


def check_config(config) -> None:
    """Raises ValueError naming the first value outside its range (:data:`RULES`); keys the config lacks are skipped.

    The message reads ``config.train.eval_batch_size must be an integer >= 1, got 0 (examples per evaluation
    step).``; a tuple's message names the bad entry.
    """
    for key, (rule, what) in RULES.items():
        section, _, name = key.rpartition(".")
        block = config.get(section) if section else config
        if block is None or name not in block:
            continue
        _check(f"config.{key}", block[name], rule, what)
    for k, g in (("key", "grid"), ("key2", "grid2")):
        key = str(config.get("sweep", {}).get(k, ""))
        if key in RULES:
            rule, what = RULES[key]
            _check(f"config.sweep.{g} sets {key}: {key}", tuple(config.sweep[g]), rule, what, fix=f"fix sweep.{g}")


def _check(name: str, value, rule: Range, what: str, fix: str = "") -> None:
    entries = list(value) if isinstance(value, (tuple, list)) else [value]
    for i, x in enumerate(entries):
        if rule.ok(x):
            continue
        where = f" at entry {i} of {tuple(value)}" if isinstance(value, (tuple, list)) else ""
        raise ValueError(f"{name} must be {rule}, got {x!r}{where} ({what})" + (f"; {fix}." if fix else "."))
