"""Shared by the native-engine and kernel tests: one torch thread per module, tokens of results, and
running a script under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported,
so in a fresh process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import torch

from rollout.types import GenerationResult


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny matmuls: one thread is several times faster than two on a shared machine. Import it into a
    test module to apply it there."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tokens_of(results: list[GenerationResult]) -> list[list[list[int]]]:
    return [[s.token_ids for s in r.samples] for r in results]


def run_under_triton_interpreter(script: str) -> str:
    """Runs `script` (Python source, dedented) in a fresh process under TRITON_INTERPRET=1 with this test
    directory as its working directory; fails the test with its stderr unless it exits 0. Returns stdout."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        cwd=os.path.dirname(__file__),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
