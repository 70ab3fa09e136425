"""Defaults shared by every experiment config; each config file edits a copy.

The method blocks (``c.gpm``, ``c.hnet``, ...) come from the registry: every
registered method's ``config()`` with its paper's defaults (experiments/methods/).
"""

import os

import ml_collections
from ml_collections import config_dict

from experiments import methods

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARED_MNIST = os.path.normpath(os.path.join(REPO_ROOT, "..", "shared", "data", "mnist"))


def mnist_dir() -> str:
    """``SHARED_MNIST`` when it exists, else "" (then ``clx.data`` loads MNIST through TFDS)."""
    return SHARED_MNIST if os.path.isdir(SHARED_MNIST) else ""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "gpm,finetune"  # comma-separated: each method runs on the same stream
    c.seed = 0
    c.seeds = ()  # several seeds -> one vmapped program over them (members); () = just `seed`
    # (members differ in init and batch order; they share the stream drawn from `seed`: permutations, class order)
    c.progress = True

    # A small grid of one scalar hyperparameter, vmapped with the seeds (members = values x seeds).
    c.sweep = ml_collections.ConfigDict()
    c.sweep.key = ""  # '' (none) | a key each method lists in `sweepable`: 'gpm.threshold' (every layer), 'train.lr'
    c.sweep.grid = ()  # the values of sweep.key
    c.sweep.key2 = ""  # '' | a second sweepable key, crossed with the first: members = grid x grid2 x seeds
    c.sweep.grid2 = ()  # the values of sweep.key2

    # Checkpoints in <workdir>[/<method>]/checkpoints; a workdir holding one resumes from it.
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.enabled = True
    c.checkpoint.every_steps = 0  # also save every N optimizer steps inside a task (0: task ends only)
    c.checkpoint.every_tasks = 1  # save at the end of every N-th task (and of the last)
    c.checkpoint.max_to_keep = 3

    # Data parallelism over jax.make_mesh of all devices (see docs/scaling.md).
    c.mesh = ml_collections.ConfigDict()
    c.mesh.enabled = "auto"  # auto (a mesh when there are several devices) | on | off
    c.mesh.shape = ()  # () = (all devices,) on 'data'; (-1, 2) = data x model (large params split on 'model')

    # Multi-host: jax.distributed.initialize before anything else (TPU pods / SLURM: leave the fields empty).
    c.distributed = ml_collections.ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ""  # 'host0:1234' on plain GPU hosts
    c.distributed.num_processes = 0  # 0 = auto-detect
    c.distributed.process_id = -1  # -1 = auto-detect

    c.data = ml_collections.ConfigDict()
    c.data.source = "digits"  # digits | mnist | any prepared TFDS dataset name
    c.data.dir = ""  # MNIST IDX directory or TFDS data_dir; '' = none / TFDS default
    c.data.scale = "default"  # default (MNIST standardised like the GPM code) | unit ([0, 1], as hypercl)
    c.data.pad = 0  # background pixels added on each side (hypercl pads MNIST to 32x32: 2)

    c.stream = ml_collections.ConfigDict()
    c.stream.kind = "permuted"  # permuted | rotated | split_task_il | split_domain_il | split_class_il
    c.stream.num_tasks = 5
    c.stream.train_subset = 0  # >0: keep this many training examples per task
    c.stream.max_angle = 180.0  # rotated streams
    c.stream.class_order = "natural"  # split streams: natural | random

    c.model = ml_collections.ConfigDict()
    c.model.kind = "mlp"  # mlp | lenet | alexnet | resnet18 | vit (_registry.MODEL_KINDS; CNNs: stream.input_shape)
    c.model.hidden = (100, 100)
    c.model.use_bias = False
    c.model.init = "torch"  # torch (PyTorch Linear default) | xavier (Glorot uniform, Mammoth) | lecun
    c.model.nf = 20  # kind = resnet18: base filters (GPM's reduced ResNet-18: 20; the full width: 64)
    c.model.channels = ()  # kind = alexnet: the 3 convs' channels; () = GPM's (64, 128, 256)
    c.model.fc = ()  # kind = alexnet: the 2 fc widths; () = GPM's (2048, 2048)
    # kind = vit (clx.models.ViT; use_bias and init above apply to it too):
    c.model.patch_size = 0  # side of the square patches; 0 = H // 4 (a 4x4 grid: 7 on MNIST, 2 on 8x8 digits)
    c.model.dim = 64  # token width
    c.model.depth = 4  # encoder blocks
    c.model.heads = 4  # attention heads (dividing dim)
    c.model.mlp_dim = 128  # hidden width of each block's MLP
    c.model.pretrained = ""  # a directory written by experiments.pretrain_vit: every member starts from its params

    c.train = ml_collections.ConfigDict()
    c.train.optimizer = "sgd"
    c.train.lr = 0.01
    c.train.momentum = 0.0
    c.train.epochs = 5
    c.train.batch_size = 10
    c.train.eval_batch_size = 1000
    # class-IL: the task loss over the classes seen so far (van de Ven's active classes), not all outputs
    c.train.seen_classes_only = False
    # several members (seeds x sweep values): clx.fit_members' member_axis (auto | vmap | map | loop;
    # auto = loop on a CPU, vmap elsewhere)
    c.train.member_axis = "auto"

    # What is scored after each task (clx.fit's evaluate, task_metrics).
    c.eval = ml_collections.ConfigDict()
    c.eval.tasks = "seen"  # seen (tasks 0..t+1: the accuracy matrix) | current (tasks t, t+1: long streams)
    c.eval.plasticity_metrics = False  # clx.metrics.plasticity_metrics on each task's evidence sample
    c.eval.plasticity_metrics_tau = 0.0  # ReDo's dormancy threshold for those diagnostics
    # Continual evaluation (De Lange et al. 2023): every N optimizer steps, inside the jitted epoch, each seen task's
    # accuracy on a fixed test subsample -> min-ACC, WC-ACC, the stability gap (results.json); unset (None) = off.
    c.eval.every_steps = config_dict.placeholder(int)
    c.eval.samples = 200  # the subsample per task (clx.train.EVAL_SAMPLES; 1,000 costs about 5x the time)

    # TensorBoard event files in <workdir>/<method>[/<member>]/tensorboard, written after each task (experiments/logs)
    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = True

    for name, method in methods.METHODS.items():  # c.gpm, c.hnet, ...: each method's block and defaults
        if method.config is not None:
            if name in c:
                raise ValueError(f"method {name!r} names a config block that base_config already has; rename it.")
            c[name] = method.config()
    return c
