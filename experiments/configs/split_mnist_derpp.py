"""Mammoth's Split-MNIST setup for ER, DER and DER++ (Buzzega et al. 2020, NeurIPS,
"Dark Experience for General Continual Learning: a Strong, Simple Baseline").

Mammoth's ``seq-mnist``: 5 tasks of 2 digits, class-IL (one 10-way head), inputs in
[0, 1] (``ToTensor``, no normalisation), MLP 784-100-100-10 with biases (Glorot-uniform
kernels, zero biases: ``backbone/MNISTMLP.py``), SGD, batch
10, one epoch per task; the buffer is reservoir-sampled over the whole stream. The
learning rate, replay batch and loss weights are Mammoth's ``best_args['seq-mnist']``
for the chosen method and buffer size (``experiments.methods.replay.MAMMOTH_SPLIT_MNIST``).

Variants (after the colon): ``<method>_<buffer>`` with method er | der | derpp and
buffer 200 | 500 | 5120, e.g. ``--config experiments/configs/split_mnist_derpp.py:derpp_500``
(default ``derpp_200``). Published class-IL ACC (Buzzega et al. 2020, Table 2, as
recalled in shared/DESIGN.md, not re-read): ER 80.43 / 86.12 / 93.40, DER++ 85.61 /
91.00 / 95.30 for buffers 200 / 500 / 5120.
"""

from experiments.configs.base import base_config, mnist_dir
from experiments.methods.replay import MAMMOTH_SPLIT_MNIST


def get_config(variant: str = "derpp_200"):
    method, _, size = variant.rpartition("_")
    if method not in MAMMOTH_SPLIT_MNIST or not size.isdigit() or int(size) not in MAMMOTH_SPLIT_MNIST[method]:
        choices = [f"{m}_{b}" for m, sizes in MAMMOTH_SPLIT_MNIST.items() for b in sizes]
        raise ValueError(f"split_mnist_derpp takes one of {choices} after the colon, got {variant!r}.")
    best = MAMMOTH_SPLIT_MNIST[method][int(size)]
    c = base_config()
    c.method = method
    c.data.source = "mnist"
    c.data.dir = mnist_dir()
    c.data.scale = "unit"
    c.stream.kind = "split_class_il"
    c.stream.num_tasks = 5
    c.model.hidden = (100, 100)
    c.model.use_bias = True
    c.model.init = "xavier"  # Mammoth's MNISTMLP: xavier(), zero biases
    c.train.optimizer = "sgd"
    c.train.lr = best["lr"]
    c.train.epochs = 1
    c.train.batch_size = 10
    block = c[method]
    block.buffer_size = int(size)
    for key in ("replay_batch_size", "alpha", "beta"):
        if key in best:
            block[key] = best[key]
    return c
