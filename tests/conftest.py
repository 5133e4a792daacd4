"""One place that decides which tests this machine can run.

`@pytest.mark.gpu` (or `gpu(N)`: N devices) marks a test that needs CUDA; on a machine with fewer
devices it is skipped here, so no test repeats a `skipif(not torch.cuda.is_available())`. Tests that
spawn processes, start Ray, build an engine or compile are marked `slow`: `make test-fast` leaves them out.
A default per-test timeout (pyproject.toml, pytest-timeout) turns a hang into a failure with a traceback.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
    it (alignment, PPO, quantization, distillation): the run directory, with checkpoints/step_400."""
    from pathlib import Path

    from rl.cli import main

    run_dir = tmp_path_factory.mktemp("tiny_pretrain") / "pretrain"
    config = Path(__file__).resolve().parents[1] / "configs/pretrain_tiny.yaml"
    argv = ["pretrain", str(config), f"run.dir={run_dir}", "train.max_steps=400", "train.eval_every=0"]
    assert main([*argv, "train.save_every=400", "train.log_every=100", "train.progress_bar=false"]) == 0
    return run_dir
