"""Hangs and rank failures in a multi-rank `rl pretrain` (dp2 on gloo, from the CLI, faults injected with
TANDEM_FAULT): a stopped rank is found within failure.hang_timeout_s and named in one line, every rank is
killed (no process outlives the command); with failure.max_restarts the run restarts from its newest
checkpoint and ends on exactly the uninterrupted run's losses, after a hang as after a killed rank. Every
spawned run logs the straggler report. The hang rule itself (heartbeat.find_hang) is checked without
processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from tiny_pretrain import ROOT, TINY, fast

from core.errors import InputError
from core.parallel.heartbeat import Fault, HangPolicy, RankBeat, find_hang
from core.utils.metrics import read_metrics

FAST = fast(
    **{"train.max_steps": "6", "train.save_every": "2", "parallel.dp": "2", "failure.hang_timeout_s": "6"}
)
MARKER = "TANDEM_TEST_RUN"  # set in the command's environment; every process it starts inherits it


def marked(tag: str) -> list[int]:
    """Live processes whose environment carries MARKER=tag (the command and everything it started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"{MARKER}={tag}".encode() in environ.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def rl_pretrain(run_dir: Path, *overrides: str, fault: str | None = None) -> tuple[int, str, set[int]]:
    """(exit code, stderr, the pids of every process the command started, seen while it ran)."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", MARKER: tag}
    env.pop("TANDEM_FAULT", None)
    if fault is not None:
        env["TANDEM_FAULT"] = fault
    cmd = [sys.executable, "-m", "rl.cli", "pretrain", str(TINY), *FAST, f"run.dir={run_dir}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: set[int] = set()
    deadline = time.time() + 300
    while proc.poll() is None:
        assert time.time() < deadline, "rl pretrain did not finish"
        seen.update(marked(tag))
        time.sleep(0.5)
    _, stderr = proc.communicate()
    seen.discard(proc.pid)
    for _ in range(20):  # the command has exited: whatever it started must be gone too
        if not set(marked(tag)) & seen:
            break
        time.sleep(0.5)
    assert not set(marked(tag)) & seen, f"processes left behind: {set(marked(tag)) & seen}"
    return proc.returncode, stderr, seen


def losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("hang") / "reference"
    code, stderr, _ = rl_pretrain(run_dir)
    assert code == 0, stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, said",
    [
        # the stopped rank is named: its peer only waits for it (its process still runs)
        ("rank=1,step=3,signal=STOP", r"rank 1 of 2 \(pid \d+\) hung .* stopped running (\d+)s ago"),
        # a stuck rank whose process runs (as in a collective that never completes): every rank alive, none
        # progressing; the one past its limit by most is named
        (
            "rank=1,step=3,sleep=600",
            r"rank [01] of 2 \(pid \d+\) hung .* no progress for (\d+)s \(limit 6s\)",
        ),
    ],
    ids=["stopped", "stuck"],
)
def test_a_hung_rank_is_named_in_one_line_and_every_rank_is_killed(tmp_path, fault, said):
    started = time.time()
    code, stderr, seen = rl_pretrain(tmp_path / "run", fault=fault)
    assert code == 1, stderr[-3000:]
    assert len(seen) >= 2, seen  # the ranks ran (and were looked for) before the command stopped
    error = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1, stderr[-3000:]
    assert "phase 'step' of step 3" in error[0] and "To resume: rl pretrain" in error[0], error
    silent = re.search(said, error[0])
    assert silent is not None and 3 <= int(silent[1]) <= 12, error  # hang_timeout_s=6, polled
    assert "Traceback" not in stderr
    assert time.time() - started < 240  # not the 600 s collective timeout
    assert [s for s, _ in losses(tmp_path / "run")] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault, said",
    [
        ("rank=1,step=3,signal=STOP", "stopped running"),
        ("rank=1,step=3,signal=KILL", "was killed by SIGKILL in phase 'step' of step 3"),
    ],
    ids=["hang", "crash"],
)
def test_restart_after_a_hang_or_a_crash_matches_the_uninterrupted_run(tmp_path, reference, fault, said):
    run_dir = tmp_path / "run"
    code, stderr, _ = rl_pretrain(run_dir, "failure.max_restarts=1", fault=fault)
    assert code == 0, stderr[-3000:]
    assert "rank 1 of 2" in stderr and said in stderr and "restart 1 of 1" in stderr, stderr[-3000:]
    assert losses(run_dir) == losses(reference)  # bitwise: resumed from step_2, the fault fired once
    assert (run_dir / "hf" / "model.safetensors").is_file()


@pytest.mark.slow
def test_a_stopped_rank_of_a_ray_worker_group_is_found_and_the_group_rebuilt(
    tmp_path, reference, monkeypatch, caplog
):
    """The same run as a Ray worker group (placement): the driver finds the stopped rank from the
    HeartbeatBoard, rebuilds the group and the run ends on the in-process run's losses."""
    from ray_local import local_ray

    from algorithms.pretrain import PretrainConfig
    from rl.config import load_config
    from rl.training import run_command, training_command

    run_dir = tmp_path / "ray"
    overrides = [*FAST, f"run.dir={run_dir}", "placement.num_bundles=2", "failure.max_restarts=1"]
    cfg = load_config(PretrainConfig, TINY, overrides)
    monkeypatch.setenv("TANDEM_FAULT", "rank=1,step=3,signal=STOP")
    with local_ray(object_store_mb=256, num_cpus=2), caplog.at_level("WARNING", logger="rl.spmd_cluster"):
        assert run_command(training_command("pretrain"), cfg, "rl pretrain ...") is not None
    warned = [r.getMessage() for r in caplog.records if "restart 1 of 1" in r.getMessage()]
    assert len(warned) == 1 and "rank 1 of 2" in warned[0] and "stopped running" in warned[0], warned
    assert losses(run_dir) == losses(reference)


@pytest.mark.slow
def test_straggler_report_in_metrics(reference):
    rows = read_metrics(reference)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert 0 < r["perf/step_time_min"] <= r["perf/step_time_max"], r
        assert r["perf/slowest_rank"] in (0, 1), r


# ---- the hang rule, without processes ---------------------------------------------------------------------

POLICY = HangPolicy(hang_timeout_s=10, long_phase_timeout_s=100)


def rank_beat(rank: int, phase: str = "step", warm: bool = True, progress: float = 1.0, alive: float = 0.5):
    return RankBeat(rank, 100 + rank, phase, 7, warm, progress, alive)


def test_within_the_limits_nothing_is_hung():
    assert find_hang([rank_beat(0), rank_beat(1)], POLICY) is None
    # long phases and a process's first step (compilation) get the long limit
    assert (
        find_hang([rank_beat(0, "save", progress=50), rank_beat(1, "step", warm=False, progress=50)], POLICY)
        is None
    )
    # a rank that has not started its heartbeat yet (alive 0) is judged by its start-up progress only
    assert find_hang([rank_beat(0, "start", warm=False, progress=50, alive=0.0)], POLICY) is None
    # a finished rank stops its liveness as it exits (a slow teardown on a busy machine is not a hang),
    # while its peer may still be exporting
    assert (
        find_hang([rank_beat(0, "done", progress=20, alive=20), rank_beat(1, "export", progress=20)], POLICY)
        is None
    )
    hang = find_hang([rank_beat(0, "done", progress=101, alive=101)], POLICY)  # but not forever
    assert hang is not None and not hang.frozen and hang.limit_s == 100


def test_a_frozen_rank_is_named_even_when_a_waiting_peer_trips_first():
    # rank 0 waits in a collective for rank 1 (alive, no progress); rank 1's process stopped
    beats = [rank_beat(0, progress=11, alive=0.5), rank_beat(1, progress=9, alive=9)]
    hang = find_hang(beats, POLICY)
    assert hang is not None and hang.beat.rank == 1 and hang.frozen
    assert str(hang).startswith("rank 1 of 2 (pid 101) hung in phase 'step' of step 7: its process stopped")
    # a frozen process is hung in any phase, long ones included
    hang = find_hang([rank_beat(0, "save", progress=20, alive=20), rank_beat(1, "save", progress=20)], POLICY)
    assert hang is not None and hang.beat.rank == 0 and hang.frozen


def test_no_progress_past_the_limit_is_a_hang():
    hang = find_hang([rank_beat(0, progress=5), rank_beat(1, "eval", progress=101)], POLICY)
    assert hang is not None and hang.beat.rank == 1 and not hang.frozen and hang.limit_s == 100
    assert "no progress for 101s (limit 100s)" in str(hang)


def test_fault_spec():
    assert Fault.parse("rank=1,step=3") == Fault(rank=1, step=3, phase="step", signal="STOP")
    assert Fault.parse("rank=0, step=2, sleep=60, restart=1").sleep_s == 60
    for bad in ("rank=1", "rank=1,step=3,signal=NOPE", "rank=1,step=3,phase=lunch", "rank=1,step=3,x=1"):
        with pytest.raises(InputError, match="TANDEM_FAULT"):
            Fault.parse(bad)
