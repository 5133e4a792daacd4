"""One place that decides which tests this machine can run.

`@pytest.mark.gpu` (or `gpu(N)`: N devices) marks a test that needs CUDA; on a machine with fewer
devices it is skipped here, so no test repeats a `skipif(not torch.cuda.is_available())`. Tests that
spawn processes, start Ray, build an engine or compile are marked `slow`: `make test-fast` leaves them out.
A default per-test timeout (pyproject.toml, pytest-timeout) turns a hang into a failure with a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test`: two workers on the machine's cores) every worker and the processes
    its tests start compute on one thread: two workers with a thread per core each would make torch's
    OpenMP threads wait for each other at every op (3-6x slower steps on a 2-core machine). Set here, in
    the controller before it starts the workers, so that every thread of theirs starts with it (vLLM-CPU's
    attention checks that the thread which plans a batch and the one which runs it agree)."""
    if getattr(config.option, "numprocesses", None):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


# Seconds per test file in one process on 2 CPU cores (the files above 20 s; `--durations`, session 8).
# Under pytest-xdist each worker takes whole files in collection order, so the longest go first: the two
# workers then end close together instead of one finishing a long file alone.
FILE_SECONDS = {
    "test_hang.py": 215,
    "test_grpo_ray.py": 178,
    "test_ppo.py": 175,
    "test_pretrain_parallel.py": 172,
    "test_jobs.py": 153,
    "test_alignment.py": 113,
    "test_vllm_rl.py": 70,
    "test_pretrain.py": 59,
    "test_async_rl.py": 59,
    "test_ray_refit.py": 58,
    "test_rl_pipeline.py": 54,
    "test_checkpoint_io.py": 54,
    "test_ray_cluster.py": 50,
    "test_distill.py": 49,
    "test_bridge.py": 47,
    "test_spmd_ray.py": 35,
    "test_qat.py": 25,
    "test_generate_cli.py": 23,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if getattr(config.option, "numprocesses", None) or os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # stable: same-file order kept
    marked = [(item, item.get_closest_marker("gpu")) for item in items]
    marked = [(item, m) for item, m in marked if m is not None]
    if not marked:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item, marker in marked:
        need = int(marker.args[0]) if marker.args else 1
        if have < need:
            item.add_marker(pytest.mark.skip(reason=f"needs {need} CUDA device(s), this machine has {have}"))


@pytest.fixture(scope="session")
def tiny_pretrain_400(tmp_path_factory: pytest.TempPathFactory):
    """configs/pretrain_tiny.yaml stopped at step 400 (~70-80% held-out greedy accuracy: room to improve,
    wrong samples to learn from), run once per test session for every end-to-end test that starts from
    it (alignment, PPO, quantization, distillation): the run directory, with checkpoints/step_400. Under
    pytest-xdist the workers share one run (the first builds it under a file lock, the other waits)."""
    from filelock import FileLock

    from rl.cli import main

    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = tmp_path_factory.getbasetemp().parent  # the same directory for every worker of the session
    else:
        root = tmp_path_factory.mktemp("tiny_pretrain")
    run_dir = root / "tiny_pretrain_400"
    config = Path(__file__).resolve().parents[1] / "configs/pretrain_tiny.yaml"
    argv = ["pretrain", str(config), f"run.dir={run_dir}", "train.max_steps=400", "train.eval_every=0"]
    with FileLock(str(root / "tiny_pretrain_400.lock")):
        if not (run_dir / "hf").is_dir():  # hf/ is exported last: a finished run
            assert (
                main([*argv, "train.save_every=400", "train.log_every=100", "train.progress_bar=false"]) == 0
            )
    return run_dir
