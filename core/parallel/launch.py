"""Start N ranks on this machine and run a function on each inside an initialised process group.

Used by training commands when `parallel.*` asks for more than one rank: gloo on CPU, NCCL on GPU
(one GPU per rank). The parent watches the world until every rank has exited:
- a rank that raises: its traceback is re-raised here (torch's ProcessRaisedException);
- a rank that dies (a signal, an exit code without a traceback) or hangs (heartbeat.py: frozen, or no
  progress past its phase's limit): RankFailure, one line naming the rank, its phase and step.
Whatever happens, no rank outlives the call: the others are SIGKILLed (which also ends a stopped process;
a rank stuck in a collective would never answer anything gentler).
"""

from __future__ import annotations

import multiprocessing.connection
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core.parallel import heartbeat
from core.parallel.heartbeat import HangPolicy, SharedBoard

POLL_S = 0.5  # how often the parent looks at the heartbeats
# After the first rank fails, how long the parent waits for the others' exits before choosing which one
# to name: a killed rank's peers raise "connection closed" right after it, and the killed one is the cause.
_FAILURE_GRACE_S = 1.0


class RankFailure(RuntimeError):
    """A rank died or hung; every rank was killed. One line: the rank, its phase and step, what happened."""

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    board: SharedBoard,
    args,
) -> None:
    heartbeat.install(board, rank)
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
        heartbeat.uninstall()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str | None = None,
    timeout_s: float = 600.0,
    hang: HangPolicy | None = None,
) -> None:
    """Runs fn(rank, world_size, *args) on world_size spawned processes; collectives time out after
    timeout_s; with `hang`, a rank that hangs (see heartbeat.py) stops the world at once."""
    backend = backend or default_backend()
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"{world_size} ranks need {world_size} GPUs, found {torch.cuda.device_count()}")
    board = SharedBoard(world_size, mp.get_context("spawn"))
    _start_resource_tracker()
    world = mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), backend, timeout_s, board, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    try:
        _watch(world, board, hang)
    finally:
        _kill(world.processes)
        for path in world.error_files:
            if os.path.exists(path):
                os.remove(path)


def _watch(world: mp.ProcessContext, board: SharedBoard, hang: HangPolicy | None) -> None:
    """Until every rank has exited 0; raises at the first failure or hang."""
    running = {p.sentinel: rank for rank, p in enumerate(world.processes)}
    while running:
        ready = multiprocessing.connection.wait(list(running), timeout=POLL_S)
        for sentinel in ready:
            world.processes[running.pop(sentinel)].join()
        if any(p.exitcode not in (None, 0) for p in world.processes):
            time.sleep(_FAILURE_GRACE_S)
            _raise_failure(world, board)
        if hang is None:
            continue
        beats = [b for b in board.read() if world.processes[b.rank].exitcode is None]  # still running
        found = heartbeat.find_hang(beats, hang, len(world.processes))
        if found is not None:
            raise RankFailure(str(found), found.beat.rank)


def _raise_failure(world: mp.ProcessContext, board: SharedBoard) -> None:
    """The root cause among the ranks that exited non-zero: a rank killed by a signal (its peers then fail
    on broken connections), else the first traceback written."""
    failed = [(rank, p.exitcode) for rank, p in enumerate(world.processes) if p.exitcode not in (None, 0)]
    killed = [(rank, code) for rank, code in failed if code < 0]
    traced = [rank for rank, _ in failed if os.path.exists(world.error_files[rank])]
    if not killed and traced:
        first = min(traced, key=lambda r: os.path.getmtime(world.error_files[r]))
        with open(world.error_files[first], "rb") as f:
            trace = pickle.load(f)
        raise mp.ProcessRaisedException(
            f"\n\n-- Process {first:d} terminated with the following error:\n{trace}",
            first,
            world.processes[first].pid,
        )
    rank, code = killed[0] if killed else failed[0]
    beat = board.read()[rank]
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    raise RankFailure(
        f"rank {rank} of {len(world.processes)} (pid {world.processes[rank].pid}) {how} in phase "
        f"'{beat.phase}' of step {beat.step}; every rank was killed",
        rank,
    )


def _start_resource_tracker() -> None:
    """Ranks SIGKILLed after a failure leave their semaphores (tqdm's lock) to multiprocessing's resource
    tracker, which removes them and warns about each: start it (it takes this interpreter's -W flags)
    without that warning, so that a failure stays one line. A no-op when it is running already."""
    from multiprocessing import resource_tracker

    quiet = "ignore:resource_tracker:UserWarning"
    sys.warnoptions.append(quiet)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(quiet)


def _kill(processes: list) -> None:
    """SIGKILL every rank still running (stopped ones included) and reap it."""
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join()
