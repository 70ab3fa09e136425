"""Every ```python block of README.md runs as written in a fresh Python.

A block that cannot (a sketch, a long or GPU-only run) says so on the line before it:
``<!-- not-run: why -->``; those are skipped, with the reason, and listed by
``test_not_run_blocks_give_a_reason``.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.*?)\s*-->\s*$")


def _blocks():
    """(line of the opening fence, code, reason or None) of every python block."""
    text = README.read_text()
    out = []
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = [s for s in text[: m.start()].splitlines() if s.strip()]
        marker = _NOT_RUN.search(before[-1]) if before else None
        out.append((line, m.group(1), marker.group(1) if marker else None))
    return out


BLOCKS = _blocks()


def test_not_run_blocks_give_a_reason():
    assert BLOCKS, "README.md has no python block"
    skipped = {line: reason for line, _, reason in BLOCKS if reason is not None}
    assert all(skipped.values()), f"a not-run marker without a reason: {skipped}"
    assert len(skipped) < len(BLOCKS), f"every block is marked not-run: {skipped}"
    print(f"README blocks not run: {skipped}")


@pytest.mark.parametrize("line,code,reason", BLOCKS, ids=[f"line{b[0]}" for b in BLOCKS])
def test_readme_block_runs(line, code, reason, tmp_path):
    if reason is not None:
        pytest.skip(f"README.md line {line} is marked not-run: {reason}")
    env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"README.md line {line} failed:\n{proc.stderr[-3000:]}"
