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
