"""Start N ranks on this machine and run a function on each inside an initialised process group.

Used by training commands when `parallel.*` asks for more than one rank: gloo on CPU, NCCL on GPU
(one GPU per rank). A failing rank stops the whole world and its traceback is re-raised in the parent.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _entry(
    rank: int, fn: Callable[..., Any], world_size: int, port: int, backend: str, timeout_s: float, args
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    os.environ.setdefault("LOCAL_RANK", str(rank))
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 600.0,
) -> None:
    """Runs fn(rank, world_size, *args) on world_size spawned processes; collectives time out after timeout_s."""
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"{world_size} ranks need {world_size} GPUs, found {torch.cuda.device_count()}")
    mp.spawn(
        _entry, args=(fn, world_size, free_port(), backend, timeout_s, args), nprocs=world_size, join=True
    )
