"""2 processes x 4 CPU devices on localhost (jax.distributed, gloo collectives) give
the accuracy matrix of one process."""

import os
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _cl_tiny  # noqa: E402


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    outs = [tmp_path / f"acc{i}.npy" for i in range(2)]
    logs = [open(tmp_path / f"log{i}.txt", "w+") for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(HERE, "_distributed_worker.py"), str(port), str(i), str(outs[i])],
            stdout=logs[i],
            stderr=subprocess.STDOUT,
            env=env,
        )
        for i in range(2)
    ]
    try:
        deadline = time.time() + 240
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    finally:
        for p in procs:  # never leave a worker behind (one may hang if the other failed)
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = []
    for f in logs:
        f.seek(0)
        texts.append(f.read()[-3000:])
        f.close()
    assert [p.returncode for p in procs] == [0, 0], texts
    a0, a1 = np.load(outs[0]), np.load(outs[1])
    np.testing.assert_array_equal(a0, a1)  # both hosts hold the same (replicated) results
    single = _cl_tiny.run(None)
    np.testing.assert_allclose(a0, single.accuracy_matrix, atol=0.01)
    assert np.nanmin(np.diag(a0)) > 0.5
