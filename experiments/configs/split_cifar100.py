"""10-split CIFAR-100 through TFDS, for users with the data: the baselines in the three scenarios.

    python -m experiments.main --config experiments/configs/split_cifar100.py:task_il \
        --workdir runs/split_cifar100_task_il [--config.data.dir ~/tensorflow_datasets]

The dataset is read with ``tfds.data_source('cifar100')`` from ``data.dir`` (TFDS's
default directory when empty); prepare it once where there is a network with
``tfds.builder('cifar100').download_and_prepare(file_format='array_record')``.
Tested on ``tfds.testing.mock_data`` (tests/test_experiments.py), never on the real data here.

The setup follows van de Ven, Tuytelaars & Tolias 2022 ("Three types of incremental
learning", Nature Machine Intelligence; the GMvandeVen/continual-learning defaults,
``param_values.py``): 10 tasks of 10 classes in the natural class order, inputs in
[0, 1], two fully connected hidden layers of 2,000 ReLU units, Adam lr 1e-4, batch
256, 5,000 iterations per task (5,000 training images per task: 256 epochs), EWC
lambda 1e3 / 1e3 / 1e2 and SI c 100 / 500 / 5 (task / domain / class-IL), 100
exemplars per class for the replay methods (ER and DER++: a reservoir of 10,000;
A-GEM: 1,000 per task).

Deliberate difference: van de Ven's network puts five convolutional layers,
pre-trained on CIFAR-10 and frozen, in front of the fully connected ones; clx has no
conv model yet (the issue on the gradient-projection family adds them), so here the
fully connected layers see the flattened pixels, and its numbers are not comparable
with the paper's. No published value is quoted for that reason.

Variants: ``:task_il`` (default), ``:domain_il``, ``:class_il``.
"""

from experiments.configs.base import base_config

SCENARIOS = {
    # scenario: (stream kind, EWC lambda, SI c)
    "task_il": ("split_task_il", 1e3, 100.0),
    "domain_il": ("split_domain_il", 1e3, 500.0),
    "class_il": ("split_class_il", 1e2, 5.0),
}


def get_config(scenario: str = "task_il"):
    if scenario not in SCENARIOS:
        raise ValueError(f"split_cifar100 takes one of {sorted(SCENARIOS)} after the colon, got {scenario!r}.")
    kind, lam, c_si = SCENARIOS[scenario]
    c = base_config()
    c.method = "finetune,joint,ewc,online_ewc,si,lwf,er,agem,derpp"
    c.data.source = "cifar100"
    c.data.dir = ""
    c.data.scale = "unit"
    c.stream.kind = kind
    c.stream.num_tasks = 10
    c.model.hidden = (2000, 2000)
    c.model.use_bias = True
    c.train.optimizer = "adam"
    c.train.lr = 1e-4
    c.train.epochs = 256  # 5,000 iterations of 256 over 5,000 images
    c.train.batch_size = 256
    c.ewc.lam = lam
    c.online_ewc.lam = lam
    c.online_ewc.gamma = 1.0
    c.si.c = c_si
    c.er.buffer_size = c.derpp.buffer_size = 10_000  # reservoir over the stream
    c.agem.memory_per_task = 1_000  # 100 per class, per-task rings
    return c
