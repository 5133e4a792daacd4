"""Atomic training checkpoints: checkpoints/step_N, written under a temporary name and then renamed.

A checkpoint directory holds
  model/              torch.distributed.checkpoint (DCP) shards of the model and optimizer state (global
                      names and offsets: it loads at any parallel layout)
  trainer.pt          the loop's state: step, scheduler, data position, ... (rank 0's view)
  rng_rank{R}.pt      each rank's RNG states
  meta.json           what the checkpoint is, for the next stage: {"stage", "step", "arch",
                      "model_config", "tokenizer"} (the architecture as our TransformerConfig and its HF
                      name; the tokenizer files are copied into tokenizer/ next to it)
  COMPLETE            written last, inside the temporary directory, before the rename
A crash or SIGKILL at any point leaves either the previous good checkpoint or a `.tmp-*` directory that
`latest_checkpoint` ignores and the next save removes, never a half-written `step_N`.

Async saving (train.async_save): the DCP state is copied to CPU memory in the calling thread (the only stall
of the training step) and written by a background thread (torch.distributed.checkpoint.async_save, as
torchtitan and Megatron do). The checkpoint stays `.tmp-step_N` until that write has finished: COMPLETE, the
rename and keep_last pruning happen in `wait()`, which the next save, the end of fit, the export and close
call. Pruning follows the rename, so the older checkpoints are removed only once a newer one is complete.

Storage faults: an OSError (no space, I/O error, no permission) while writing removes the temporary
directory and raises StorageError naming the path and its free space; the previous checkpoints are untouched.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from core.errors import InputError, StorageError

STEP_RE = re.compile(r"^step_(\d+)$")
MARKER = "COMPLETE"
META = "meta.json"
TOKENIZER_DIR = "tokenizer"


def rng_state() -> dict[str, Any]:
    """Plain values and tensors only (numpy's key array as a list), so that it loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, keys.tolist(), pos, has_gauss, cached)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = STEP_RE.match(child.name)
        if m and (child / MARKER).is_file():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def _prune(root: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ---- storage faults ------------------------------------------------------------------------------------

WRITE_ERRORS = (OSError, CheckpointException)  # DCP reports a writer's OSError inside a CheckpointException


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _os_error(e: BaseException) -> BaseException:
    """The OSError behind a write failure (DCP wraps each rank's exception in a CheckpointException)."""
    if isinstance(e, CheckpointException):
        for failure in e.failures.values():  # rank -> (exception, traceback summary)
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, OSError):
                return inner
    return e


def storage_error(e: BaseException, what: str, path: Path) -> StorageError:
    """One line for a failed write: what failed, where, why and the free space there."""
    cause = _os_error(e)
    reason = f"{cause.strerror} (errno {cause.errno})" if isinstance(cause, OSError) else str(cause)
    return StorageError(
        f"writing {what} {path} failed: {reason}; {_gib(free_bytes(path))} free there. The partial write "
        "was removed and the previous checkpoint is intact: free space (or fix permissions), then rerun"
    )


def estimate_checkpoint_bytes(n_params: int, param_bytes: int, n_trained: int) -> int:
    """Bytes of one checkpoint: every parameter in its dtype, plus the fp32 master weight and the two AdamW
    moments (3 x 4 bytes) of each trained parameter (the loop state and RNG are small)."""
    return n_params * param_bytes + n_trained * 12


def check_disk_space(
    root: str | Path, checkpoint_bytes: int, keep_last: int, free: int | None = None, existing: int = 0
) -> None:
    """StorageError before training when the disk under `root` cannot hold the run's checkpoints: at peak
    keep_last + 1 of them (a new one is complete before the oldest is pruned), `existing` already there.
    `free`: the free bytes (default: measured)."""
    needed = checkpoint_bytes * max(1, keep_last + 1 - existing)
    free = free_bytes(root) if free is None else free
    if free < needed:
        raise StorageError(
            f"{root}: {_gib(free)} free, but keep_last={keep_last} checkpoints of about "
            f"{_gib(checkpoint_bytes)} each need {_gib(needed)}: free space, lower train.keep_last "
            "or pick another run.dir"
        )


# ---- one checkpoint manager for every loop -------------------------------------------------------------


class CheckpointManager:
    """checkpoints/step_N of one run, for every loop (pretrain, sft, dpo, rm, grpo, ...).

    save: `write_model(tmp)` fills tmp/model (and whatever else the loop's model needs: a scheduler, ...)
    collectively on every rank, either itself or through `write_state` (sync or async DCP); the manager
    adds the loop state (`trainer.pt`, from Stateful-like objects' state_dict()), each rank's RNG,
    meta.json and the tokenizer files, and once the model is written the COMPLETE marker, then renames tmp
    to step_N (atomic) and prunes to keep_last. Works in a single process, on every rank of a
    torch.distributed world, and on a Ray driver whose workers write the model (no world there).
    """

    def __init__(self, root: str | Path, keep_last: int = 2, async_save: bool = False) -> None:
        self.root, self.keep_last, self.async_save = Path(root), keep_last, async_save
        self._writes: list[Future] = []  # background DCP writes of the checkpoint being saved
        self._pending: tuple[int, Path, Path, list[Future]] | None = None  # (step, tmp, final, writes)
        self._async_group: dist.ProcessGroup | None = None

    def latest(self) -> Path | None:
        return latest_checkpoint(self.root)

    def write_state(self, state_dict: dict[str, Any], path: Path) -> None:
        """dcp.save of state_dict to `path` (collective), for a loop's write_model. async_save: staged to
        CPU memory now, written by a background thread; the checkpoint completes in `wait()`."""
        if not self.async_save:
            dcp.save(state_dict, checkpoint_id=str(path))
            return
        self._writes.append(dcp.async_save(state_dict, checkpoint_id=str(path), process_group=self._group()))

    def _group(self) -> dist.ProcessGroup | None:
        """A gloo group of its own for the background writes: DCP coordinates ranks over it from the
        writer thread, which must not share a communicator with the training step (and needs a CPU one)."""
        if dist.is_initialized() and self._async_group is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def save(
        self,
        step: int,
        write_model: Callable[[Path], None],
        state: dict[str, Any],
        meta: dict[str, Any],
        tokenizer_dir: str | Path | None = None,
    ) -> Path:
        """Write checkpoints/step_N (see the class docstring); returns its path, which exists once the
        write is complete (at once without async writes, else after `wait()`)."""
        self.wait()  # one checkpoint in flight at a time
        final, tmp = self.root / f"step_{step}", self.root / f".tmp-step_{step}"
        try:
            if _is_rank0():
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp-*"):
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            _barrier()
            write_model(tmp)
            rank = dist.get_rank() if dist.is_initialized() else 0
            torch.save({"rng": rng_state()}, tmp / f"rng_rank{rank}.pt")
            _barrier()
            if _is_rank0():
                torch.save(state, tmp / "trainer.pt")
                if tokenizer_dir is not None:
                    from core.bridge.hf import copy_tokenizer_files

                    (tmp / TOKENIZER_DIR).mkdir()
                    copy_tokenizer_files(tokenizer_dir, tmp / TOKENIZER_DIR)
                (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2) + "\n")
        except BaseException as e:  # CheckpointException is a BaseException
            writes, self._writes = self._writes, []
            self._abandon(tmp, writes)
            if isinstance(e, WRITE_ERRORS):
                raise storage_error(e, "checkpoint", final) from e
            raise
        writes, self._writes = self._writes, []
        self._pending = (step, tmp, final, writes)
        if not writes:  # written already: complete it now
            self.wait()
        return final

    def wait(self) -> Path | None:
        """Finish the checkpoint in flight, if any (collective): wait for its model write, then COMPLETE,
        the rename to step_N and keep_last pruning. Returns its path (None: nothing was in flight)."""
        if self._pending is None:
            return None
        step, tmp, final, writes = self._pending
        self._pending = None
        try:
            for write in writes:
                write.result()
            _barrier()
            if _is_rank0():
                (tmp / MARKER).write_text(f"{step}\n")
                _fsync_tree(tmp)
                if final.exists():  # a re-save of the same step after a resume: replace it whole
                    shutil.rmtree(final)
                os.replace(tmp, final)
                _prune(self.root, self.keep_last)
        except BaseException as e:
            self._abandon(tmp, writes)
            if isinstance(e, WRITE_ERRORS):
                raise storage_error(e, "checkpoint", final) from e
            raise
        _barrier()
        return final

    def close(self) -> None:
        """Drop a checkpoint still in flight without completing it (after a failure elsewhere): its writes
        are waited for, its temporary directory removed; the complete checkpoints are untouched."""
        if self._pending is not None:
            _, tmp, _, writes = self._pending
            self._pending = None
            self._abandon(tmp, writes)

    @staticmethod
    def _abandon(tmp: Path, writes: list[Future]) -> None:
        for write in writes:  # let a background write end before its directory goes
            write.exception()
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def load_state(path: str | Path) -> dict[str, Any]:
        """The loop state of a complete checkpoint, with this rank's RNG under "rng" (when saved)."""
        path = Path(path)
        if not (path / MARKER).is_file():
            raise InputError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
        from core.checkpoint.safe_load import load_pt

        state = load_pt(path / "trainer.pt")
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_file = path / f"rng_rank{rank}.pt"
        if rng_file.is_file():
            state["rng"] = load_pt(rng_file)["rng"]
        return state


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """meta.json of a checkpoint directory (None for checkpoints written before it existed)."""
    file = Path(path) / META
    if not file.is_file():
        return None
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{file}:{e.lineno}: invalid JSON ({e.msg})") from None
    for key in ("stage", "step", "arch", "model_config"):
        if key not in meta:
            raise InputError(f"{file}: missing field {key!r}")
    return meta
