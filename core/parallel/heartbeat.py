"""Heartbeats: every rank says which phase of which step it is in, so that whoever started the ranks can
tell a hung rank from a long phase, kill the world and name the rank (NVRx-style in-job hang detection).

Two signals per rank, both written into a `board` that the monitor reads:
- progress: `beat(phase, step)` from the training loop at each phase boundary (start, step, log, save,
  eval, export, done). Its age is how long the rank has been in its current phase.
- liveness: a daemon thread marks the process alive every LIVENESS_INTERVAL_S. A stopped process
  (SIGSTOP, a frozen node), or one whose interpreter never runs again, stops it; a rank that waits
  inside a collective keeps it.

The monitor is never a rank (a stopped process freezes all of its threads): the parent launcher for
spawned ranks (launch.py, over a SharedBoard in shared memory), the Ray driver for a worker group (over
a BeatTable in a small actor). `find_hang` declares rank r hung when
- its liveness is older than hang_timeout_s: the process is frozen, whatever its phase but "done" (an
  exiting rank stops its liveness thread); or
- its progress is older than its phase's limit: hang_timeout_s inside a training step or a log step,
  long_phase_timeout_s for the phases that are legitimately long and rare: start-up (data, model build,
  resume), the first step of a process (compilation, allocator warm-up), saves, evaluations, the export.
Liveness alone would miss a stuck collective (every thread alive, no progress); progress alone would need
either a small limit that kills long saves or a large one that waits an hour on a stopped rank.
The rank named is the frozen one when there is one (its peers only wait for it), else the one past its
limit by most.

Fault injection, for users testing their cluster's recovery (and for the tests), read in one place:
    TANDEM_FAULT="rank=1,step=3,signal=STOP"      rank 1 stops itself as it starts step 3
    TANDEM_FAULT="rank=0,step=5,signal=KILL"      rank 0 dies (as an OOM kill would)
    TANDEM_FAULT="rank=1,step=2,sleep=3600"       rank 1's loop blocks (alive, no progress: a stuck rank)
    keys: rank, step (required); phase (default step); signal=NAME or sleep=SECONDS (default signal=STOP);
    restart=N: fire only in the run after N restarts (default 0: the first run, so a restart recovers).
TANDEM_RESTART_COUNT (set by the launcher's restart loop, like torchrun's TORCHELASTIC_RESTART_COUNT)
says how many restarts this run has had.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Protocol

from core.errors import InputError

PHASES = ("start", "step", "log", "save", "eval", "export", "done")
LONG_PHASES = frozenset({"start", "save", "eval", "export", "done"})
LIVENESS_INTERVAL_S = 1.0
FAULT_ENV, RESTART_ENV = "TANDEM_FAULT", "TANDEM_RESTART_COUNT"


@dataclass(frozen=True)
class HangPolicy:
    hang_timeout_s: float
    long_phase_timeout_s: float

    def limit(self, phase: str, warm: bool) -> float:
        """How long a rank may stay in `phase`; warm: it has finished a step in this process."""
        if warm and phase not in LONG_PHASES:
            return self.hang_timeout_s
        return max(self.long_phase_timeout_s, self.hang_timeout_s)

    @property
    def frozen_after_s(self) -> float:
        """Liveness this old marks the process frozen when naming the rank (the trigger is hang_timeout_s)."""
        return min(5 * LIVENESS_INTERVAL_S, self.hang_timeout_s / 2)


def hang_policy(failure) -> HangPolicy | None:
    """The policy of a config's `failure` section (None: failure.hang_timeout_s is off)."""
    if failure.hang_timeout_s is None:
        return None
    return HangPolicy(failure.hang_timeout_s, failure.long_phase_timeout_s)


@dataclass(frozen=True)
class RankBeat:
    """What the monitor knows of one rank: its last progress beat and how old it and its liveness are."""

    rank: int
    pid: int  # 0 until the rank has started its heartbeat
    phase: str
    step: int
    warm: bool
    progress_age_s: float
    alive_age_s: float  # 0 until the liveness thread has started


@dataclass(frozen=True)
class Hang:
    beat: RankBeat
    frozen: bool  # its process stopped running (else: alive, but its loop made no progress)
    limit_s: float
    world_size: int

    def __str__(self) -> str:
        b = self.beat
        pid = f" (pid {b.pid})" if b.pid else ""
        if self.frozen:
            what = f"its process stopped running {b.alive_age_s:.0f}s ago (stopped or frozen)"
        else:
            what = f"no progress for {b.progress_age_s:.0f}s (limit {self.limit_s:g}s)"
        return (
            f"rank {b.rank} of {self.world_size}{pid} hung in phase '{b.phase}' of step {b.step}: {what}; "
            "every rank was killed"
        )


def find_hang(beats: list[RankBeat], policy: HangPolicy, world_size: int | None = None) -> Hang | None:
    """The hung rank, if any rank of `beats` (of a world of world_size, default len(beats)) is past its
    limit (see the module docstring)."""
    # A rank in "done" has finished its work and stops its liveness thread as it exits (tearing down its
    # process groups and interpreter can take seconds on a busy machine): only its progress limit counts.
    lively = [b for b in beats if b.phase != "done"]
    late = [
        b
        for b in beats
        if (b in lively and b.alive_age_s > policy.hang_timeout_s)
        or b.progress_age_s > policy.limit(b.phase, b.warm)
    ]
    if not late:
        return None
    frozen = [b for b in lively if b.alive_age_s > policy.frozen_after_s]
    if frozen:
        culprit = max(frozen, key=lambda b: b.alive_age_s)
    else:
        culprit = max(late, key=lambda b: b.progress_age_s - policy.limit(b.phase, b.warm))
    limit = policy.limit(culprit.phase, culprit.warm)
    return Hang(culprit, bool(frozen), limit, world_size or len(beats))


class Board(Protocol):
    """Where ranks write their beats (each rank only its own entry)."""

    def beat(self, rank: int, pid: int, phase: str, step: int, warm: bool) -> None: ...

    def alive(self, rank: int) -> None: ...


_PID, _PHASE, _STEP, _WARM, _PROGRESS_T, _ALIVE_T = range(6)


class SharedBoard:
    """The beats of a world of spawned ranks in shared memory: six doubles per rank (pid, phase index,
    step, warm, progress and liveness times from the machine-wide monotonic clock). Lock-free, so a rank
    stopped mid-write cannot block the reader; a torn read mixes two beats of one rank for one poll."""

    def __init__(self, world_size: int, context) -> None:
        self.world_size = world_size
        self.data = context.RawArray("d", world_size * 6)
        now = time.monotonic()
        for rank in range(world_size):  # a rank that never starts is in "start" since the launch
            self.data[rank * 6 + _PROGRESS_T] = now

    def beat(self, rank: int, pid: int, phase: str, step: int, warm: bool) -> None:
        row = rank * 6
        self.data[row + _PID], self.data[row + _PHASE] = pid, PHASES.index(phase)
        self.data[row + _STEP], self.data[row + _WARM] = step, float(warm)
        self.data[row + _PROGRESS_T] = time.monotonic()

    def alive(self, rank: int) -> None:
        self.data[rank * 6 + _ALIVE_T] = time.monotonic()

    def read(self) -> list[RankBeat]:
        now, d = time.monotonic(), self.data
        return [
            RankBeat(
                rank,
                int(d[r + _PID]),
                PHASES[int(d[r + _PHASE])],
                int(d[r + _STEP]),
                bool(d[r + _WARM]),
                now - d[r + _PROGRESS_T],
                now - d[r + _ALIVE_T] if d[r + _ALIVE_T] else 0.0,
            )
            for rank, r in ((rank, rank * 6) for rank in range(self.world_size))
        ]


class BeatTable:
    """The beats of ranks that may live on other machines, timed on arrival (for a Ray driver's actor)."""

    def __init__(self, world_size: int) -> None:
        now = time.monotonic()
        self.rows = {r: [0, "start", 0, False, now, 0.0] for r in range(world_size)}

    def beat(self, rank: int, pid: int, phase: str, step: int, warm: bool) -> None:
        self.rows[rank][:5] = [pid, phase, step, warm, time.monotonic()]

    def alive(self, rank: int) -> None:
        self.rows[rank][5] = time.monotonic()

    def read(self) -> list[RankBeat]:
        now = time.monotonic()
        return [
            RankBeat(rank, pid, phase, step, warm, now - progress_t, now - alive_t if alive_t else 0.0)
            for rank, (pid, phase, step, warm, progress_t, alive_t) in sorted(self.rows.items())
        ]


@dataclass(frozen=True)
class Fault:
    """A fault this process injects into itself at a beat (TANDEM_FAULT, see the module docstring)."""

    rank: int
    step: int
    phase: str = "step"
    signal: str = "STOP"
    sleep_s: float = 0.0
    restart: int = 0

    @classmethod
    def parse(cls, spec: str) -> Fault:
        try:
            fields = dict(item.split("=", 1) for item in spec.split(",") if item.strip())
            kwargs = {k.strip(): v.strip() for k, v in fields.items()}
            fault = cls(
                rank=int(kwargs.pop("rank")),
                step=int(kwargs.pop("step")),
                phase=kwargs.pop("phase", "step"),
                signal=kwargs.pop("signal", "STOP").upper().removeprefix("SIG"),
                sleep_s=float(kwargs.pop("sleep", 0.0)),
                restart=int(kwargs.pop("restart", 0)),
            )
            if kwargs:
                raise ValueError(f"unknown keys {sorted(kwargs)}")
            if fault.phase not in PHASES:
                raise ValueError(f"phase {fault.phase!r} is not one of {PHASES}")
            getattr(signal, f"SIG{fault.signal}")
        except (KeyError, ValueError, AttributeError) as e:
            raise InputError(
                f"{FAULT_ENV}={spec!r}: {e}; expected e.g. 'rank=1,step=3,signal=STOP' (keys: rank, step, "
                "phase, signal or sleep, restart)"
            ) from None
        return fault

    def fire(self) -> None:
        if self.sleep_s > 0:
            time.sleep(self.sleep_s)
        else:
            os.kill(os.getpid(), getattr(signal, f"SIG{self.signal}"))


def restart_count() -> int:
    return int(os.environ.get(RESTART_ENV, "0"))


def fault_from_env(rank: int) -> Fault | None:
    """This rank's fault from TANDEM_FAULT, if it names this rank and this run's restart count."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    fault = Fault.parse(spec)
    return fault if fault.rank == rank and fault.restart == restart_count() else None


class Heartbeat:
    """The rank side: progress beats into `board` and a liveness thread (see the module docstring)."""

    def __init__(self, board: Board, rank: int) -> None:
        self.board, self.rank, self.pid = board, rank, os.getpid()
        self.fault = fault_from_env(rank)
        self.steps_begun = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._live, name=f"heartbeat-rank{rank}", daemon=True)
        self._thread.start()

    def beat(self, phase: str, step: int) -> None:
        warm = self.steps_begun > 0  # the first step of a process compiles: it gets the long limit
        if phase == "step":
            self.steps_begun += 1
        self.board.beat(self.rank, self.pid, phase, step, warm)
        if self.fault is not None and (self.fault.phase, self.fault.step) == (phase, step):
            self.fault.fire()

    def _live(self) -> None:
        while not self._stop.is_set():
            self.board.alive(self.rank)
            self._stop.wait(LIVENESS_INTERVAL_S)

    def stop(self) -> None:
        self._stop.set()


# One heartbeat per process, like a signal handler: the loop's beats reach it without a handle through
# every layer, and a process that was not started by a monitor (one process, a Ray driver) has none.
_installed: Heartbeat | None = None


def install(board: Board, rank: int) -> Heartbeat:
    """Start this process's heartbeat (rank `rank`, into `board`) and beat "start"."""
    global _installed
    uninstall()
    _installed = Heartbeat(board, rank)
    _installed.beat("start", 0)
    return _installed


def uninstall() -> None:
    global _installed
    if _installed is not None:
        _installed.stop()
        _installed = None


def beat(phase: str, step: int) -> None:
    """This rank enters `phase` of step `step` (a no-op in a process without a heartbeat)."""
    if _installed is not None:
        _installed.beat(phase, step)
