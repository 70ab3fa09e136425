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

Two variants, chosen after the colon (``--config experiments/configs/pmnist_hnet.py:wide``):

* ``paper`` (default): the authors' settings above. Measured on an H100 (seed 0):
  ACC 96.02 %, BWT -0.01 %, compression ratio 0.955. Below the published 97.6 %:
  the later tasks are learned worse (task 0 98.1 %, task 9 94.0 %), not forgotten;
  even with ``hnet.beta=0`` the later tasks only reach about 97.3 %, so the gap is in
  learning a new task from a hypernetwork trained on the old ones, not in the
  regularizer. Its cause is not found yet (the init, the optimizers, the look-ahead
  and the regularizer were checked against ``hypercl``, and a plain-JAX version
  written without clx, ``benchmarks/hnet_reference.py``, behaves like clx).
* ``wide``: clx's setting that reaches the target: MNIST standardised and not padded
  (28x28, 1,886,100 target weights), hypernetwork hidden layers (50, 50), beta 0.01.
  Measured on an H100 (seed 0): ACC 97.10 %, BWT -0.03 %, compression ratio 2.11 (the
  hypernetwork is larger than its target here). Each change alone: standardised
  inputs 96.61 %, beta 0.01 96.64 % (BWT -0.10 %), both 96.79 %, standardised with
  hidden (50, 50) 96.92 %.
"""

from experiments.configs.base import base_config, mnist_dir
from experiments.methods import hnet_config


def get_config(variant: str = "paper"):
    if variant not in ("paper", "wide"):
        raise ValueError(f"pmnist_hnet takes 'paper' or 'wide' after the colon, got {variant!r}.")
    c = base_config()
    c.method = "hnet"
    c.data.source = "mnist"
    c.data.dir = mnist_dir()
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
    if variant == "wide":
        c.data.scale = "default"
        c.data.pad = 0
        c.hnet.hidden = (50, 50)
        c.hnet.beta = 0.01
    return c
