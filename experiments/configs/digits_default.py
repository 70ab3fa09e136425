"""The embedded default: permuted sklearn digits, 5 tasks, GPM beside fine-tuning
and joint training (the upper bound).

Runs on 2 CPU cores in a few minutes with no files: `make demo`.
"""

from experiments.configs.base import base_config


def get_config():
    c = base_config()
    c.method = "gpm,finetune,joint"
    c.data.source = "digits"
    c.stream.kind = "permuted"
    c.stream.num_tasks = 5
    c.model.hidden = (100, 100)
    c.train.lr = 0.05
    c.train.epochs = 10
    c.train.batch_size = 10
    c.gpm.threshold = (0.90, 0.97, 0.97)
    c.gpm.num_samples = 300
    return c
