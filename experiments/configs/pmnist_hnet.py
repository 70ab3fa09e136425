"""Task-conditioned hypernetwork on Permuted MNIST (von Oswald et al. 2020, ICLR).

The authors' defaults for the PermutedMNIST-10 classifier (``hypercl``,
``mnist/train_args_default.py::_set_default_permuted`` and ``mnist/train_args.py``):
target MLP 1000-1000 (ReLU, biases) with one 10-way head per task
(``num_tasks * 10`` outputs, task t reads its own slice); a chunked
hypernetwork [e_t (24) ; c_i (8)] -> 25 -> 25 -> 78,000 weights per chunk, ELU,
Xavier-uniform weights, embeddings N(0, 1); Adam lr 1e-4 (theta and embeddings),
a fresh optimizer per task, batch 128, 5,000 iterations per task; beta 0.1 with
the look-ahead; task id given at test (task-IL). Published: about 97.6 % (PermutedMNIST-10).

Inputs as in the authors' code: MNIST in [0, 1] (``data.scale='unit'``) padded
by 2 pixels to 32x32 (``data.pad=2``; 1,024 inputs, 2,126,100 target weights).
The trainer counts epochs, not iterations: 11 epochs of ceil(60,000 / 128) = 469
batches = 5,159 iterations per task (>= the authors' 5,000).
Set e.g. ``--config.train.epochs=2`` for a shortened run.
"""

import os

from experiments.configs.base import SHARED_MNIST, base_config
from experiments.methods import hnet_config


def get_config():
    c = base_config()
    c.method = "hnet"
    c.data.source = "mnist"
    c.data.dir = SHARED_MNIST if os.path.isdir(SHARED_MNIST) else ""
    c.data.scale = "unit"
    c.data.pad = 2
    c.stream.kind = "permuted"
    c.stream.num_tasks = 10
    c.stream.train_subset = 0
    c.model.hidden = (1000, 1000)
    c.model.use_bias = True
    c.train.optimizer = "adam"
    c.train.lr = 1e-4
    c.train.epochs = 11
    c.train.batch_size = 128
    c.hnet = hnet_config()  # the PMNIST defaults (see experiments/methods.py)
    return c
