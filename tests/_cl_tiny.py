"""A tiny GPM run on permuted sklearn digits shared by the checkpoint, sharding and
distributed tests (also run as a script by their subprocesses)."""

import numpy as np
import optax
from flax import nnx

import clx
from clx import data

EPOCHS, BATCH, SAMPLES = 2, 16, 48


def stream(num_tasks=2, train_subset=512):
    return data.make_stream(data.load_source("digits"), "permuted", num_tasks, seed=0, train_subset=train_subset)


def model(hidden=(32,), seed=0):
    return clx.FunctionalModel.from_module(clx.MLP(64, hidden, 10, use_bias=False, rngs=nnx.Rngs(seed)))


class TinyCNN(nnx.Module):
    """8x8x1 -> conv 3x3 (3 channels) - ReLU - maxpool 2 -> 3x3x3 -> conv 2x2 (4) - ReLU -> 2x2x4 -> flatten 16 -> 3.

    conv1 -> conv2 is a "conv" transition (G = 4 window offsets), conv2 -> fc a "conv_dense" one (G = 4 positions);
    the Conv case of the unit-replacing rules' tests (test_cbp, test_redo)."""

    def __init__(self, rngs):
        self.conv1 = nnx.Conv(1, 3, (3, 3), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(3, 4, (2, 2), padding="VALID", rngs=rngs)
        self.fc = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), strides=(2, 2))
        x = nnx.relu(self.conv2(x))
        return self.fc(x.reshape(x.shape[0], -1))


def rule():
    return clx.chain(clx.gpm(0.95, num_samples=SAMPLES), optax.sgd(0.3))


def run(checkpoint=None, on_save=None, mesh=None, hidden=(32,), num_tasks=2, info=None):
    from clx.train import CheckpointOptions, fit

    m, params = model(hidden)
    if isinstance(checkpoint, str):
        checkpoint = CheckpointOptions(checkpoint, every_steps=12, info=info or {"method": "gpm"})
    return fit(
        m,
        params,
        rule(),
        stream(num_tasks),
        epochs=EPOCHS,
        batch_size=BATCH,
        evidence_samples=SAMPLES,
        progress=False,
        mesh=mesh,
        checkpoint=checkpoint,
        on_save=on_save,
    )


if __name__ == "__main__":  # python tests/_cl_tiny.py CKPT_DIR KILL_TASK OUT.npy: SIGKILL itself mid-task
    import os
    import signal
    import sys

    kill_task = int(sys.argv[2])

    def on_save(n, pos):
        if pos["task"] == kill_task and pos["step"] > 0 and pos["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGKILL)

    r = run(sys.argv[1], on_save=on_save)
    np.save(sys.argv[3], r.accuracy_matrix)


def digits_config(method):
    """The digits experiment config cut to 2 tasks x 1 epoch (GPM and SGP on 50 samples, no progress bars)."""
    from experiments.configs import digits_default

    c = digits_default.get_config()
    c.method = method
    c.stream.num_tasks = 2
    c.train.epochs = 1
    c.gpm.num_samples = c.sgp.num_samples = 50
    c.progress = False
    return c
