"""Run a function on N gloo processes on this machine and collect what each rank returns.

    def check(rank: int, world_size: int, scale: float) -> dict:   # module-level: it is pickled
        ...                                                        # default group is initialised
        return {"loss": loss}                                     # anything torch.save can write

    results = run_distributed(check, 2, 0.5)                      # [rank0_result, rank1_result]

Workers are forked from a fork server (a clean process started once, with torch imported, so they
inherit no threads or process groups from the test process and skip the torch import), use one
thread each, rendezvous over TCP on a free 127.0.0.1 port, and write their result (or traceback) to a
temporary directory. The first failing rank stops the whole world and its traceback is raised here;
a world that outlives `timeout` is killed and raises TimeoutError. Keep worlds few and tensors tiny:
each spawn pays a torch import.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# The fork server imports these once; every rank is then forked from it (a clean, thread-free
# process) instead of paying a fresh torch import (seconds on a busy machine) per rank and per world.
_PRELOAD = [
    "torch",
    "torch.distributed",
    "torch.nn.functional",
    "pytest",
    "core.parallel",
    "core.tensor_parallel",
    "core.engine",  # torch.distributed.checkpoint and the model: seconds per rank otherwise
]


class DistributedTestError(RuntimeError):
    """A rank raised: the message carries its rank and traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    args: tuple[Any, ...],
    out_dir: str,
    backend: str,
    timeout_s: float,
) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        result = fn(rank, world_size, *args)
        dist.destroy_process_group()
        torch.save(result, out / f"rank{rank}.tmp")
        os.replace(out / f"rank{rank}.tmp", out / f"rank{rank}.pt")  # the parent never reads half a file
    except BaseException:
        # Written before any teardown, so this root cause predates the peers' broken-connection errors.
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        os._exit(1)  # no group teardown: peers blocked in a collective are killed by the parent


def _first_error(out: Path, procs: list[mp.Process]) -> str | None:
    """The earliest-written traceback (the root cause: other ranks then fail on broken connections),
    or a note for a rank that died without writing one."""
    errors = sorted(out.glob("rank*.err"), key=lambda p: p.stat().st_mtime_ns)
    if errors:
        rank = int(errors[0].stem.removeprefix("rank"))
        others = f" (ranks failing after it: {len(errors) - 1})" if len(errors) > 1 else ""
        return f"rank {rank} of {len(procs)} failed{others}:\n{errors[0].read_text()}"
    for rank, proc in enumerate(procs):
        if proc.exitcode not in (None, 0):
            return f"rank {rank} of {len(procs)} exited with code {proc.exitcode} (killed or crashed)"
    return None


def _stop(procs: list[mp.Process]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join(timeout=10)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    backend: str = "gloo",
    start_method: str = "forkserver",
) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` processes after init_process_group; return
    the per-rank results in rank order. fn and args must be picklable (fn defined at module level)."""
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    with tempfile.TemporaryDirectory(prefix="dist_test_") as out_dir:
        out = Path(out_dir)
        port = free_port()
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, port, args, out_dir, backend, timeout),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            _wait(procs, out, timeout)
        finally:
            _stop(procs)
        # weights_only=False: the ranks' own results (any object), from this call's private temp directory
        return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world_size)]


def _wait(procs: list[mp.Process], out: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(proc.is_alive() for proc in procs):
        error = _first_error(out, procs)
        if error is not None:
            raise DistributedTestError(error)
        if time.monotonic() > deadline:
            alive = [rank for rank, proc in enumerate(procs) if proc.is_alive()]
            raise TimeoutError(f"distributed test exceeded {timeout:.0f}s; ranks still running: {alive}")
        time.sleep(0.05)
    error = _first_error(out, procs)
    if error is not None:
        raise DistributedTestError(error)
