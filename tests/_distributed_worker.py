"""One process of the 2-process x 4-CPU-device test (tests/test_distributed.py).

python tests/_distributed_worker.py PORT PROCESS_ID OUT.npy
"""

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)

from clx import sharding as shd  # noqa: E402

port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
shd.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=pid)
assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cl_tiny  # noqa: E402
import numpy as np  # noqa: E402

result = _cl_tiny.run(None, mesh=shd.make_mesh())
np.save(out, result.accuracy_matrix)
jax.distributed.shutdown()
