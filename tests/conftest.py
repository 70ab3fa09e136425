"""Shared pytest setup: 8 fake CPU devices for the tests that ask for them.

A test marked ``@pytest.mark.cpu_devices8`` runs in a child pytest process whose
JAX has 8 CPU devices (``jax_num_cpu_devices``, set here, before any device use,
when ``CLX_TEST_CPU_DEVICES`` is in the environment). The session itself keeps
one device: giving every xdist worker 8 devices would change the other tests
(``experiments.main`` builds an 8-device mesh by default, and batch 10 does not
divide over it). The child costs one interpreter start (a few seconds) per test.
"""

import os
import subprocess
import sys

# One OpenBLAS thread per xdist worker (numpy's and jaxlib's CPU LAPACK: the SVDs of GPM and its family). With
# pytest -n 2 on 2 cores, two workers each spinning up a thread per core made a (100, 784) SVD 5-40x slower
# (86 / 393 ms numpy / jax against 16 / 9 ms with one thread, measured on the loaded development machine).
# The Makefile sets it too: this covers a bare `pytest` when numpy is not imported yet.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# JAX's persistent compilation cache, shared by the xdist workers and every child process (the 8-device children,
# the notebook kernels, the experiment subprocesses) through the environment, set here before any of them starts.
# Many tests compile the same programs (fit builds fresh jitted closures per call: identical HLO, recompiled);
# with the cache each is compiled once per suite run. Measured on 2 loaded cores: tests/test_contract.py
# 473 s -> 246 s wall, 12.6 -> 6.4 CPU minutes, from an empty cache. The cache is keyed by the HLO, the compile
# options and the jax version, so a stale entry is never used; CLX_TEST_JAX_CACHE=0 switches it off.
if os.environ.get("CLX_TEST_JAX_CACHE", "1") != "0":
    import tempfile

    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "clx-test-jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

NUM_FAKE_DEVICES = 8
_ENV = "CLX_TEST_CPU_DEVICES"

if os.environ.get(_ENV):  # the child process: fake devices before anything touches JAX's backend
    import jax

    jax.config.update("jax_num_cpu_devices", int(os.environ[_ENV]))


def pytest_configure(config):
    config.addinivalue_line("markers", "cpu_devices8: runs in a child process with 8 fake CPU devices")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if not pyfuncitem.get_closest_marker("cpu_devices8") or os.environ.get(_ENV):
        return None  # an ordinary test, or already the 8-device child: run it here
    env = {**os.environ, _ENV: str(NUM_FAKE_DEVICES), "JAX_PLATFORMS": "cpu"}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            "-p",
            "no:randomly",
            pyfuncitem.nodeid,
        ],
        cwd=str(pyfuncitem.config.rootpath),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    if proc.returncode != 0 or " passed" not in out:
        pytest.fail(
            f"in the {NUM_FAKE_DEVICES}-device child process (exit {proc.returncode}):\n{out[-6000:]}", pytrace=False
        )
    return True


@pytest.fixture
def workdir_with_old_results(tmp_path):
    """(workdir, its results.json of an earlier run): a test that fails early asserts the file is untouched."""
    sentinel = tmp_path / "results.json"
    sentinel.write_text('{"old": true}')
    return tmp_path, sentinel
