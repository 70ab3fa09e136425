"""The gradient-projection family on GPM's Permuted-MNIST setup (Saha, Garg, Roy 2021, Sec. 5 and App. B).

The training setup is ``pmnist_gpm.py``'s: 10 tasks, MLP 784-100-100-10 without
biases, one shared head (domain-IL), SGD lr 0.01, batch 10, 5 epochs per task,
54,000 training images per task, 300 examples per task for the representation
matrices, thresholds 0.95 / 0.99 / 0.99. Every method of ``method`` runs on the
same stream from the same initial params.

Published on this setup (ACC % / BWT): GPM 93.91 / -0.03 and OGD 82.73 / -0.14
(Saha et al. 2021, Table 1, OGD rerun by GPM's authors). SGP (Saha & Roy 2023)
reports no Permuted-MNIST number; its run here uses GPM's thresholds and the
authors' scale coefficient alpha = 10.
"""

from experiments.configs import pmnist_gpm


def get_config():
    c = pmnist_gpm.get_config()
    c.method = "gpm,sgp"
    c.sgp.threshold = (0.95, 0.99, 0.99)
    c.sgp.num_samples = 300
    c.sgp.alpha = 10.0
    return c
