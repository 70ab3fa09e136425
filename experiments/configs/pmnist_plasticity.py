"""Loss of plasticity on long Permuted-MNIST streams, and its cures (one config, six variants).

The shape of the plasticity papers, scaled to what runs on 2 CPU cores:

- Kumar, Marklund & Van Roy 2023 ("Maintaining Plasticity in Continual Learning via
  Regenerative Regularization"): Permuted MNIST, 10,000 images per task, one pass, batch 16,
  500 tasks; SGD lr 1e-2 and Adam lr 1e-3 (their Table 3; L2 Init lambda 1e-2).
- Dohare et al. 2024 (Nature, "Loss of plasticity in deep continual learning"): Online Permuted
  MNIST, MLP 784-2000-2000-2000-10, batch 1, SGD 0.003, 800 tasks of 60,000 images.

Here: the MLP is 784-100-100-10 with biases (PyTorch's init), each task 10,000 training
images seen once in batches of 16 (625 steps), ``stream.num_tasks`` tasks (200 by default;
the papers' 500 / 800 are a ``--config.stream.num_tasks`` away, at the wall time the
benchmark prints). What is scored is what the papers plot: each task's **online accuracy**
(the accuracy on its training stream as it is learned, ``results.json`` ``online_accuracy``;
``online_acc`` is its mean over tasks), the test accuracy on the task just learned (the
diagonal of the accuracy matrix: ``eval.tasks = "current"``, so old tasks are not scored
and ACC / BWT are n/a), and ``clx.metrics.plasticity_metrics`` on 300 examples of each task
(dormant units, effective and stable rank, weight and gradient norms).

Variants (``--config experiments/configs/pmnist_plasticity.py:VARIANT``):

- ``sgd`` (default): SGD lr 1e-2; backprop (``finetune``) beside every cure;
- ``adam``: Adam lr 1e-3 (Kumar et al.: Adam loses plasticity faster);
- ``label_permuted``: Label-permuted MNIST in the shape of Elsayed & Mahmood 2024 ("Addressing
  Loss of Plasticity and Catastrophic Forgetting in Continual Learning", their label-permuted
  EMNIST; checked in the authors' code, github.com/mohmdelsayed/upgd at b75e90a:
  ``core/task/label_permuted_emnist.py``, ``core/network/fcn_relu.py``,
  ``experiments/label_permuted_emnist.py``): the images stay, the labels are reshuffled every
  2,500 examples (one task), **batch 1** (so 2,500 steps a task), MLP **784-300-150-10**,
  400 tasks = their 1,000,000 samples, SGD 1e-2 (the top of their grid 1e-2 .. 1e-5). Differences:
  MNIST's 10 classes instead of EMNIST's 47 (EMNIST is not here offline), inputs standardised
  instead of scaled to [-1, 1], and each task's 2,500 examples a random subset of the 60,000
  drawn per task and seen once (theirs continue a shuffled loader over the whole set). The noise-drawing rules (UPGD,
  shrink & perturb per step) cost about 5 ms a step here at this width (threefry on 2 CPU
  cores), so a million of their steps take hours on a CPU: run them with a smaller
  ``--config.stream.num_tasks`` there. Measured (backprop, seeds 0-2, 1,315 s on 2 loaded cores):
  online accuracy 86.7 % (tasks 1-10) -> 95.8 % (391-400), no loss of plasticity on MNIST in a
  million steps (README);
- ``digits``, ``digits_adam``, ``digits_label_permuted``: the same on scikit-learn's 8x8 digits
  (MLP 64-32-32-10, all 1,438 training images per task, 50 tasks; SGD lr 0.1, since 90 steps of
  1e-2 learn nothing there), about a minute per method, for tests and tutorials.

``python -m experiments.report RUNDIR`` draws each method's online accuracy and diagnostics
against the task index (``setup1_plasticity.png``).
"""

from experiments.configs.base import base_config, mnist_dir

VARIANTS = ("sgd", "adam", "label_permuted", "digits", "digits_adam", "digits_label_permuted")
METHODS = "finetune,l2_init,shrink_perturb,shrink_perturb_steps,cbp,redo,spectral"


def get_config(variant: str = "sgd"):
    if variant not in VARIANTS:
        raise ValueError(f"pmnist_plasticity takes one of {VARIANTS} after the colon, got {variant!r}.")
    digits = variant.startswith("digits")
    adam = variant.endswith("adam")
    online = variant == "label_permuted"  # the UPGD paper's shape: one example a step, 1M examples
    c = base_config()
    c.method = METHODS if adam else METHODS + ",upgd"  # UPGD is an SGD-like optimizer of its own
    c.data.source = "digits" if digits else "mnist"
    c.data.dir = "" if digits else mnist_dir()
    c.stream.kind = "label_permuted" if variant.endswith("label_permuted") else "permuted"
    c.stream.num_tasks = 50 if digits else (400 if online else 200)
    c.stream.train_subset = (0 if digits else 10_000) if c.stream.kind == "permuted" else (0 if digits else 2_500)
    c.model.hidden = (32, 32) if digits else ((300, 150) if online else (100, 100))
    c.model.use_bias = True
    c.train.optimizer = "adam" if adam else "sgd"
    c.train.lr = 1e-3 if adam else (0.1 if digits else 1e-2)  # digits: 90 steps a task, SGD needs 0.1 to learn
    c.train.epochs = 1
    c.train.batch_size = 1 if online else 16
    c.eval.tasks = "current"
    c.eval.plasticity_metrics = True
    c.checkpoint.max_to_keep = 2
    c.checkpoint.every_tasks = 1 if digits else 25  # tasks of about a second: a save per task would dominate
    return c
