"""Checkpoint I/O faults and async saving (core/checkpoint/checkpointer.py, algorithms/trainer.py).

A full disk, an I/O error or a permission error while a checkpoint or hf/ is written (injected into the
DCP file writer, the finishing fsync, the directory creation, the safetensors writer) gives one line naming
the path and its free space (StorageError, exit 1 through the CLI), removes the partial write and leaves
the previous checkpoint loadable (and the previous hf/ byte-identical). A run whose disk clearly cannot hold
its checkpoints stops before the first step. train.async_save writes the same bytes as a sync save, resumes
exactly, and a kill while it writes never leaves a checkpoint `latest()` would pick. `rl bench checkpoint`
prints its table.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from tiny_pretrain import ROOT, TINY, fast

from algorithms.pretrain import PretrainConfig, PretrainTrainer
from core.checkpoint import checkpointer
from core.checkpoint.checkpointer import check_disk_space, estimate_checkpoint_bytes
from core.checkpoint.sharded import load_full_state
from core.errors import StorageError
from core.utils.metrics import read_metrics
from rl.config import load_config

FAST = fast(**{"data.synthetic.n_eval": 10, "eval.num_problems": 5, "train.device": "cpu"})
GiB = 2**30


def trainer(run_dir: Path, *overrides: str) -> PretrainTrainer:
    return PretrainTrainer(load_config(PretrainConfig, TINY, [*FAST, f"run.dir={run_dir}", *overrides]))


def disk_full_in_dcp_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """DCP's file writer writes part of a tensor, then the disk is full."""

    def write_item(transforms, stream, data, *args, **kwargs):
        stream.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_filesystem, "_write_item", write_item)


def slow_dcp_writes(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every tensor DCP writes takes `seconds` longer: a background write overlaps the next steps."""
    real = dcp_filesystem._write_item

    def write_item(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    monkeypatch.setattr(dcp_filesystem, "_write_item", write_item)


def assert_only(root: Path, names: list[str]) -> None:
    """Exactly these entries under checkpoints/: no temporary directory is left behind."""
    assert sorted(p.name for p in root.iterdir()) == names


def weights(t: PretrainTrainer) -> list[torch.Tensor]:
    return [s.master.clone() for s in t.engine.optimizer.shards]


# ---- storage faults --------------------------------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, async_save):
    run = tmp_path / "run"
    t = trainer(run, f"train.async_save={str(async_save).lower()}", "train.keep_last=1")
    t.advance()
    t.save()
    t.checkpoints.wait()
    at_step_1 = weights(t)
    t.advance()
    with monkeypatch.context() as m:
        disk_full_in_dcp_writes(m)
        with pytest.raises(StorageError) as failure:
            t.save()
            t.checkpoints.wait()  # async: the write fails in the background and is reported here
    message = str(failure.value)
    assert "\n" not in message and f"{run}/checkpoints/step_2" in message
    assert "No space left on device" in message and "GiB free there" in message
    assert_only(run / "checkpoints", ["step_1"])  # not pruned, no .tmp-step_2
    resumed = trainer(run)
    assert resumed.step_count == 1
    assert all(torch.equal(a, b) for a, b in zip(at_step_1, weights(resumed), strict=True))
    t.save()  # space is back: the next save works
    t.checkpoints.wait()
    assert_only(run / "checkpoints", ["step_2"])


def test_an_io_error_finishing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    t = trainer(run, "train.keep_last=1")
    t.advance()
    t.save()
    t.advance()

    def fsync_fails(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path / "trainer.pt"))

    monkeypatch.setattr(checkpointer, "_fsync_tree", fsync_fails)
    with pytest.raises(StorageError, match=r"step_2 failed: Input/output error \(errno 5\)"):
        t.save()
    assert_only(run / "checkpoints", ["step_1"])
    assert checkpointer.latest_checkpoint(run / "checkpoints").name == "step_1"


def test_a_read_only_checkpoint_directory_is_one_line(tmp_path, monkeypatch):
    run = tmp_path / "run"
    t = trainer(run)
    t.advance()
    t.save()
    root = run / "checkpoints"
    root.chmod(0o555)
    try:
        if os.access(root, os.W_OK):  # root ignores the mode bits: the same failure, injected
            real_mkdir = Path.mkdir

            def mkdir(self, *args, **kwargs):
                if self.name.startswith(".tmp-"):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
                return real_mkdir(self, *args, **kwargs)

            monkeypatch.setattr(Path, "mkdir", mkdir)
        t.advance()
        with pytest.raises(StorageError, match=r"checkpoints/step_2 failed: Permission denied"):
            t.save()
    finally:
        root.chmod(0o755)
    assert_only(root, ["step_1"])


def test_a_failed_export_keeps_the_previous_hf(tmp_path, monkeypatch):
    import core.bridge.hf

    run = tmp_path / "run"
    t = trainer(run)
    t.advance()
    t.export()
    before = {p.name: p.read_bytes() for p in (run / "hf").iterdir()}
    t.advance()

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))

    monkeypatch.setattr(core.bridge.hf, "save_file", save_file)
    with pytest.raises(
        StorageError, match=re.escape(f"writing export {run}/hf failed: No space left on device")
    ):
        t.export()
    assert {p.name: p.read_bytes() for p in (run / "hf").iterdir()} == before
    assert sorted(p.name for p in run.iterdir() if p.name.endswith("hf")) == ["hf"]  # no .tmp-hf, .old-hf


def test_the_cli_says_a_storage_error_in_one_line_with_exit_1(tmp_path, monkeypatch, capsys):
    from rl.cli import main

    run = tmp_path / "run"
    disk_full_in_dcp_writes(monkeypatch)
    argv = ["pretrain", str(TINY), *FAST, f"run.dir={run}", "train.max_steps=2", "failure.max_restarts=2"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: writing checkpoint {run}/checkpoints/step_2"), err
    assert "No space left on device" in err[0] and "restart" not in err[0]  # not retried: it would fail again
    assert not (run / "hf").exists() and list((run / "checkpoints").iterdir()) == []


# ---- the disk check before training -----------------------------------------------------------------------


def test_the_disk_check_wants_room_for_keep_last_plus_one_checkpoints(tmp_path):
    size = 10 * GiB
    check_disk_space(tmp_path, size, keep_last=2, free=30 * GiB)  # step_N, step_2N and the new one
    with pytest.raises(StorageError, match=r"5.00 GiB free, but keep_last=2 checkpoints of about 10.00 GiB"):
        check_disk_space(tmp_path, size, keep_last=2, free=5 * GiB)
    with pytest.raises(StorageError, match="need 30.00 GiB"):
        check_disk_space(tmp_path, size, keep_last=2, free=29 * GiB)
    check_disk_space(tmp_path, size, keep_last=2, free=10 * GiB, existing=2)  # a resume: two are there
    assert estimate_checkpoint_bytes(1000, 2, 1000) == 1000 * (2 + 12)  # bf16 weights + fp32 Adam
    assert estimate_checkpoint_bytes(1000, 4, 10) == 4000 + 120  # LoRA: few trained parameters


def test_the_checkpoint_estimate_matches_a_written_checkpoint_and_a_small_disk_stops_the_run(
    tmp_path, monkeypatch
):
    run = tmp_path / "run"
    t = trainer(run, "train.max_steps=1")
    t.fit()
    written = sum(f.stat().st_size for f in (run / "checkpoints/step_1/model").rglob("*") if f.is_file())
    estimate = t.checkpoint_bytes()
    assert 0.9 < written / estimate < 1.2, (written, estimate)

    monkeypatch.setattr(checkpointer, "free_bytes", lambda path: estimate)  # room for one, not three
    fresh = trainer(tmp_path / "fresh", "train.max_steps=1")
    with pytest.raises(StorageError, match=r"checkpoints: 0.00 GiB free, but keep_last=2 checkpoints"):
        fresh.fit()
    assert not (tmp_path / "fresh/checkpoints").exists() and not (tmp_path / "fresh/metrics.jsonl").exists()


# ---- async saving ------------------------------------------------------------------------------------------


def _model_states(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_full_state(p / "model") for p in sorted((run / "checkpoints").glob("step_*"))}


def _assert_same_checkpoints(a: Path, b: Path) -> None:
    states_a, states_b = _model_states(a), _model_states(b)
    assert list(states_a) == list(states_b)
    for step, state in states_a.items():
        assert state.keys() == states_b[step].keys()
        for key, value in state.items():
            other = states_b[step][key]
            same = torch.equal(value, other) if torch.is_tensor(value) else value == other
            assert same, (step, key)
        trainer_a = torch.load(a / "checkpoints" / step / "trainer.pt", weights_only=False)
        assert trainer_a == torch.load(b / "checkpoints" / step / "trainer.pt", weights_only=False)


def write_after_the_next_step(monkeypatch: pytest.MonkeyPatch, t: PretrainTrainer) -> None:
    """DCP writes checkpoints/step_N only once the step after N has updated the weights (or N is the last):
    what the background write reads must be the copy staged at step N, not the live tensors."""
    real = dcp_filesystem._write_item

    def write_item(transforms, stream, *args, **kwargs):
        step = int(re.search(r"step_(\d+)", stream.name).group(1))
        deadline = time.time() + 120
        while t.step_count <= step < t.cfg.train.max_steps and time.time() < deadline:
            time.sleep(0.01)
        return real(transforms, stream, *args, **kwargs)

    monkeypatch.setattr(dcp_filesystem, "_write_item", write_item)


def test_async_save_writes_what_a_sync_save_writes_and_resumes_exactly(tmp_path, monkeypatch):
    steps = ["train.max_steps=6", "train.save_every=3"]
    sync, background = tmp_path / "sync", tmp_path / "async"
    trainer(sync, *steps).fit()
    t = trainer(background, *steps, "train.async_save=true")
    write_after_the_next_step(monkeypatch, t)
    t.fit()
    assert not list((background / "checkpoints").glob(".tmp-*"))  # fit returned with step_6 complete
    _assert_same_checkpoints(sync, background)
    losses = [(r["step"], r["train/loss"]) for r in read_metrics(sync)]
    assert [(r["step"], r["train/loss"]) for r in read_metrics(background)] == losses

    import shutil

    shutil.rmtree(background / "checkpoints/step_6")
    resumed = trainer(background, *steps, "train.async_save=true")
    write_after_the_next_step(monkeypatch, resumed)
    assert resumed.step_count == 3
    resumed.fit()
    assert [(r["step"], r["train/loss"]) for r in read_metrics(background)] == losses
    _assert_same_checkpoints(sync, background)


_KILLED_MID_SAVE = """
import os, signal, sys, time
sys.path.insert(0, {tests!r})
import test_checkpoint_io as t
import pytest
run = t.trainer(t.Path({run!r}), "train.async_save=true")
run.advance(); run.save(); run.checkpoints.wait()  # step_1 complete
run.advance()
with pytest.MonkeyPatch.context() as m:
    t.slow_dcp_writes(m, 0.5)
    run.save()  # step_2 staged; its write has only started
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_a_kill_during_an_async_save_never_leaves_a_checkpoint_that_looks_complete(tmp_path):
    run = tmp_path / "run"
    script = _KILLED_MID_SAVE.format(tests=str(ROOT / "tests"), run=str(run))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".tmp-step_2", "step_1"]
    assert not (run / "checkpoints/.tmp-step_2/COMPLETE").exists()
    resumed = trainer(run, "train.async_save=true")
    assert resumed.step_count == 1  # from step_1
    resumed.advance()
    resumed.save()
    resumed.checkpoints.wait()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1", "step_2"]


def _rl_pretrain(run: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "rl.cli", "pretrain", str(TINY), *FAST, f"run.dir={run}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_async_save_on_two_ranks_writes_what_a_sync_save_writes(tmp_path):
    """parallel.dp=2 (gloo): the background writes coordinate over their own gloo group."""
    steps = ["parallel.dp=2", "train.max_steps=4", "train.save_every=2"]
    _rl_pretrain(tmp_path / "sync", *steps)
    _rl_pretrain(tmp_path / "async", *steps, "train.async_save=true")
    _assert_same_checkpoints(tmp_path / "sync", tmp_path / "async")


# ---- the benchmark ------------------------------------------------------------------------------------------


def test_bench_checkpoint_prints_sync_and_async_rows(capsys):
    from rl.cli import main

    assert main(["bench", "checkpoint", "--preset", "llama_tiny", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("implementation"))
    table = {line[:28].strip(): line[28:].split() for line in lines[start + 1 :] if line.strip()}
    assert set(table) == {"no save (step only)", "sync dcp.save (baseline)", "async_save"}
    for name in ("sync dcp.save (baseline)", "async_save"):
        stall, next_step, complete, gib, ratio = table[name]
        assert 0 < float(stall) <= float(complete) and float(next_step) > 0 and float(gib) > 0, table
        assert ratio.endswith("x") and float(ratio[:-1]) > 0
    assert table["sync dcp.save (baseline)"][-1] == "1.00x"
