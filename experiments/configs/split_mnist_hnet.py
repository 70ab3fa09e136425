"""Task-conditioned hypernetwork on Split MNIST, 5 tasks (von Oswald et al. 2020, ICLR).

The authors' defaults for the SplitMNIST classifier (``hypercl``,
``mnist/train_args_default.py::_set_default_split`` and ``mnist/train_args.py``):
target MLP 400-400 (ReLU, biases) with 5 two-way heads (10 outputs, task t reads
outputs 2t, 2t+1); chunked hypernetwork [e_t (96) ; c_i (96)] -> 10 -> 10 ->
42,000 weights per chunk, ReLU; Adam lr 1e-3, a fresh optimizer per task,
batch 128, 2,000 iterations per task; beta 0.01 with the look-ahead.

Two scenarios, one config (the training is the same; only the test differs):

* ``--config experiments/configs/split_mnist_hnet.py`` (or ``...:task_il``): task id
  given at test (CL1). Published: about 99.8 % (Table 2).
* ``--config experiments/configs/split_mnist_hnet.py:class_il``: one 10-way
  readout, the task inferred by the lowest predictive entropy over the trained
  embeddings (HNET+ENT, CL3 with ``infer_output_head``). Published: about 69 %.

The trainer counts epochs: 21 epochs of ~93 batches of 128 (each task holds
~11.8k images) = ~1,950-2,080 iterations per task, the authors' 2,000.
"""

from experiments.configs.base import base_config, mnist_dir


def get_config(scenario: str = "task_il"):
    if scenario not in ("task_il", "class_il"):
        raise ValueError(f"split_mnist_hnet takes 'task_il' or 'class_il' after the colon, got {scenario!r}.")
    c = base_config()
    c.method = "hnet"
    c.data.source = "mnist"
    c.data.dir = mnist_dir()
    c.stream.kind = "split_task_il" if scenario == "task_il" else "split_class_il"
    c.stream.num_tasks = 5
    c.stream.train_subset = 0
    c.model.hidden = (400, 400)
    c.model.use_bias = True
    c.train.optimizer = "adam"
    c.train.lr = 1e-3
    c.train.epochs = 21
    c.train.batch_size = 128
    h = c.hnet
    h.type = "chunked"
    h.emb_dim = 96
    h.chunk_dim = 42000
    h.chunk_emb_dim = 96
    h.hidden = (10, 10)
    h.activation = "relu"
    h.beta = 0.01
    return c
