"""The baselines of GPM's Permuted-MNIST table on GPM's setup (Saha, Garg, Roy 2021, Table 1).

The training setup is ``pmnist_gpm.py``'s: 10 tasks, MLP 784-100-100-10 without
biases, one shared head (domain-IL), SGD lr 0.01, batch 10, 5 epochs per task,
54,000 training images per task. Every method of ``method`` runs on the same stream
from the same initial params. Published (Table 1, ACC % / BWT): GPM 93.91 / -0.03,
EWC 90.16 / -0.04, A-GEM 83.51 / -0.14, GEM 83.55 / -0.14, ER_Res 87.29 / -0.11,
Multitask (joint) 96.71.

Method settings: A-GEM keeps 250 examples per task and a reference batch of 256
(Chaudhry et al.'s ``fc_permute_mnist.py``), GEM 256 per task with memory strength
0.5 (Lopez-Paz & Ranzato's ``run_experiments.sh``), ER a reservoir of 1,000. GPM's
own per-baseline learning rates and memory sizes (its appendix) were not found in
the sources read for this config, so every method here uses GPM's SGD 0.01; a row
that differs from the table by more than a point may differ in these settings.
EWC's lambda is not known either; with SGD 0.01 the default of the regularization
entry (1e5, van de Ven's Split-MNIST task-IL value) gave a NaN loss in task 1 (in
``benchmarks/baselines.py --avalanche``'s 256-256 MLP), 100 and 1,000 diverged
(training losses 1.4e4 and 2.3e4 in task 1) and 10,000 (NaN), and a sweep on seed 0
gave lambda 1 / 3 / 10: ACC 72.93 / 75.30 / 77.01 %
(``--config.sweep.key=ewc.lam --config.sweep.grid='(1.0,3.0,10.0)'``), so 10 is set.
With 10, seeds 0-2 (one fit_members run): ACC 76.46 +- 0.64 %, BWT -18.61 +- 0.83 %;
seed 0's learning accuracy falls from 97.3 % (task 1) to 87.0 % (task 10) while the
old tasks are still forgotten. On this config (seed 0, one sweep run of lambda 30 and
100 as two members) both larger values diverge in the tenth task (training loss 4.1e4
/ NaN), and before that they do worse than 10 (their mean accuracy over the tasks
seen, after the sixth task: 86.2 % against 90.7 %); the diagonal step bound does not
explain the divergence (lr * lambda * max sum F = 0.01 * 30 * 1.15 = 0.35 < 2, with
the summed Fisher of the lambda-10 run; not yet understood: a guess, untested, is that
SGD keeps the task loss's sharpness near 2 / lr and the penalty's curvature adds to it). No lambda tried (1 to
100) comes near GPM's 90.16 / -0.04 on this network at SGD 0.01 and 5 epochs; GPM's
own EWC settings (learning rate, epochs, Fisher estimate) remain unknown.
"""

from experiments.configs import pmnist_gpm


def get_config():
    c = pmnist_gpm.get_config()
    c.method = "gpm,finetune,joint,er,agem,gem"
    c.er.buffer_size = 1000
    c.agem.memory_per_task = 250
    c.agem.reference_batch_size = 256
    c.gem.memory_per_task = 256
    c.gem.memory_strength = 0.5
    c.ewc.lam = 10.0  # the best of the stable values measured (see above); 100 and above diverge with SGD 0.01
    return c
